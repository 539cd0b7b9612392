/* Dense model layers (forward/backward pairs) and their naive references.
 * See ops.h for shapes; backward functions accumulate. */
#include "model/ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "core/fastmath.h"
#include "core/moe.h"

void moe_model_encoder_forward(float *out, const uint8_t *inp, const float *wte, const float *wpe,
                               int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *we = wte + (size_t)inp[(size_t)b * T + t] * C, *wp = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = we[i] + wp[i];
        }
}

void moe_model_encoder_backward(float *dwte, float *dwpe, const float *dout, const uint8_t *inp,
                                int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *we = dwte + (size_t)inp[(size_t)b * T + t] * C, *wp = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) {
                we[i] += d[i];
                wp[i] += d[i];
            }
        }
}

/* Reductions over a row in 8 lanes added in a fixed order: the compiler
 * vectorises them (it may not reorder a single running float sum), and the
 * result depends on nothing but the row. */
#define LANES 8
static inline float lanes_total(const float *s)
{
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

MOE_TARGET_CLONES void moe_model_layernorm_forward(float *restrict out, float *mean, float *rstd,
                                                   const float *restrict inp, const float *weight,
                                                   const float *bias, int N, int C, float eps)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float s[LANES] = {0}, q[LANES] = {0};
        int i = 0;
        for (; i + LANES <= C; i += LANES)
            for (int l = 0; l < LANES; l++) s[l] += x[i + l];
        for (; i < C; i++) s[0] += x[i];
        const float m = lanes_total(s) / C;
        /* two passes: no cancellation for rows with a large mean */
        for (i = 0; i + LANES <= C; i += LANES)
            for (int l = 0; l < LANES; l++) q[l] += (x[i + l] - m) * (x[i + l] - m);
        for (; i < C; i++) q[0] += (x[i] - m) * (x[i] - m);
        const float r = 1.0f / sqrtf(lanes_total(q) / C + eps);
        for (i = 0; i < C; i++) o[i] = (x[i] - m) * r * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

MOE_TARGET_CLONES void moe_model_layernorm_backward(float *restrict dinp, float *restrict dweight,
                                                    float *restrict dbias, const float *restrict dout,
                                                    const float *restrict inp, const float *weight,
                                                    const float *mean, const float *rstd, int N, int C)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        const float m = mean[n], r = rstd[n];
        /* dx = r * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = w * dy */
        float a[LANES] = {0}, b[LANES] = {0};
        int i = 0;
        for (; i + LANES <= C; i += LANES)
            for (int l = 0; l < LANES; l++) {
                const float norm = (x[i + l] - m) * r, dnorm = weight[i + l] * dy[i + l];
                a[l] += dnorm;
                b[l] += dnorm * norm;
            }
        for (; i < C; i++) {
            const float norm = (x[i] - m) * r, dnorm = weight[i] * dy[i];
            a[0] += dnorm;
            b[0] += dnorm * norm;
        }
        const float dnorm_mean = lanes_total(a) / C, dnorm_norm_mean = lanes_total(b) / C;
        for (i = 0; i < C; i++) {
            const float norm = (x[i] - m) * r, dnorm = weight[i] * dy[i];
            dbias[i] += dy[i];
            dweight[i] += norm * dy[i];
            dx[i] += r * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
        }
    }
}

/* Every row of out (n, m) = bias, or 0 without a bias: the C operand of a beta = 1 GEMM. */
static void fill_rows(float *out, const float *bias, int n, int m)
{
    for (int r = 0; r < n; r++) {
        if (bias) memcpy(out + (size_t)r * m, bias, (size_t)m * sizeof *out);
        else memset(out + (size_t)r * m, 0, (size_t)m * sizeof *out);
    }
}

/* Adds the column sums of a (n, m) into acc (m). */
static void add_colsums(float *acc, const float *a, int n, int m)
{
    for (int r = 0; r < n; r++) {
        const float *row = a + (size_t)r * m;
        for (int j = 0; j < m; j++) acc[j] += row[j];
    }
}

void moe_model_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                              int N, int C, int OC)
{
    fill_rows(out, bias, N, OC);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, 1.0f,
                out, OC);
}

void moe_model_matmul_forward_ref(float *out, const float *inp, const float *weight,
                                  const float *bias, int N, int C, int OC)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < C; i++) s += (double)inp[(size_t)n * C + i] * weight[(size_t)o * C + i];
            out[(size_t)n * OC + o] = (float)s;
        }
}

void moe_model_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                               const float *inp, const float *weight, int N, int C, int OC)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f,
                dinp, C);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f,
                dweight, C);
    if (dbias) add_colsums(dbias, dout, N, OC);
}

void moe_model_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                                   const float *inp, const float *weight, int N, int C, int OC)
{
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++) {
            double s = 0.0;
            for (int o = 0; o < OC; o++) s += (double)dout[(size_t)n * OC + o] * weight[(size_t)o * C + i];
            dinp[(size_t)n * C + i] += (float)s;
        }
    for (int o = 0; o < OC; o++) {
        for (int i = 0; i < C; i++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) s += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * C + i];
            dweight[(size_t)o * C + i] += (float)s;
        }
        if (dbias) {
            double s = 0.0;
            for (int n = 0; n < N; n++) s += dout[(size_t)n * OC + o];
            dbias[o] += (float)s;
        }
    }
}

/* Largest of x[0..n) (n >= 1), over 8 lanes so that the loop vectorises
 * (a float max reduction is not reassociated by the compiler on its own). */
static inline float row_max(const float *x, int n)
{
    float m[8];
    for (int l = 0; l < 8; l++) m[l] = x[0];
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (; j < n; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
    for (int l = 1; l < 8; l++) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

/* x[j] = exp(x[j] - mx) for j < n; returns their sum (8 lanes, fixed order). */
static inline float row_exp_sum(float *x, int n, float mx)
{
    float s[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) s[l] += (x[j + l] = moe_fast_expf(x[j + l] - mx));
    for (; j < n; j++) s[0] += (x[j] = moe_fast_expf(x[j] - mx));
    return lanes_total(s);
}

/* Causal softmax of the scaled scores of row t in place: entries j <= t become
 * probabilities, entries j > t become 0. */
MOE_TARGET_CLONES static void causal_softmax_row(float *row, int t, int T)
{
    const float mx = row_max(row, t + 1);
    const float inv = 1.0f / row_exp_sum(row, t + 1, mx);
    for (int j = 0; j <= t; j++) row[j] *= inv;
    for (int j = t + 1; j < T; j++) row[j] = 0.0f;
}

/* In place on rows [t0, t0 + n) of a (T, T) block holding dP = dL/dP in
 * columns [0, cols): dS = P * (dP - sum_j P dP) * scale, the softmax backward
 * folded with the score scale; zero above the diagonal. P and d point at row t0. */
MOE_TARGET_CLONES static void causal_softmax_backward(float *d, const float *P, int t0, int n, int cols, int T,
                                    float scale)
{
    for (int i = 0; i < n; i++) {
        const int t = t0 + i;
        float *dr = d + (size_t)i * T;
        const float *pr = P + (size_t)i * T;
        float acc[8] = {0};
        int j = 0;
        for (; j + 8 <= t + 1; j += 8)
            for (int l = 0; l < 8; l++) acc[l] += pr[j + l] * dr[j + l];
        for (; j <= t; j++) acc[0] += pr[j] * dr[j];
        const float dot = lanes_total(acc);
        for (j = 0; j <= t; j++) dr[j] = pr[j] * (dr[j] - dot) * scale;
        for (int j = t + 1; j < cols; j++) dr[j] = 0.0f;
    }
}

/* Causal attention works on row blocks of ATT_ROWS queries: block [r0, r1)
 * only needs keys [0, r1), so the GEMMs skip the masked upper-right blocks
 * (5/8 of the full T x T work at T = 4 blocks, 1/2 as T grows). */
enum { ATT_ROWS = 32 };

void moe_model_attention_forward(float *out, float *att, const float *inp, int B, int T, int C,
                                 int NH)
{
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = inp + (size_t)b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
            float *P = att + ((size_t)b * NH + h) * T * T;
            float *o = out + (size_t)b * T * C + h * hs;
            for (int r0 = 0; r0 < T; r0 += ATT_ROWS) {
                const int r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T, n = r1 - r0;
                float *Pb = P + (size_t)r0 * T;
                /* S = scale q k^T on rows [r0, r1), keys [0, r1) */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, hs, scale,
                            q + (size_t)r0 * C3, C3, k, C3, 0.0f, Pb, T);
                for (int t = r0; t < r1; t++) causal_softmax_row(P + (size_t)t * T, t, T);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, r1, 1.0f, Pb, T, v, C3,
                            0.0f, o + (size_t)r0 * C, C);
            }
        }
}

void moe_model_attention_forward_ref(float *out, float *att, const float *inp, int B, int T, int C,
                                     int NH)
{
    const int hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = inp + ((size_t)b * T + t) * C3 + h * hs;
                float *P = att + (((size_t)b * NH + h) * T + t) * T;
                for (int j = 0; j < T; j++) {
                    const float *k = inp + ((size_t)b * T + j) * C3 + C + h * hs;
                    double s = 0.0;
                    for (int i = 0; i < hs; i++) s += (double)q[i] * k[i];
                    P[j] = (float)(s * scale);
                }
                causal_softmax_row(P, t, T);
                float *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) {
                    double s = 0.0;
                    for (int j = 0; j <= t; j++)
                        s += (double)P[j] * inp[((size_t)b * T + j) * C3 + 2 * C + h * hs + i];
                    o[i] = (float)s;
                }
            }
}

void moe_model_attention_backward(float *dinp, float *scratch, const float *dout, const float *inp,
                                  const float *att, int B, int T, int C, int NH)
{
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const size_t base = (size_t)b * T * C3 + h * hs;
            const float *q = inp + base, *k = q + C, *v = q + 2 * C;
            float *dq = dinp + base, *dk = dq + C, *dv = dq + 2 * C;
            const float *P = att + ((size_t)b * NH + h) * T * T;
            const float *dO = dout + (size_t)b * T * C + h * hs;
            for (int r0 = 0; r0 < T; r0 += ATT_ROWS) {
                const int r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T, n = r1 - r0;
                const float *Pb = P + (size_t)r0 * T, *dOb = dO + (size_t)r0 * C;
                float *dS = scratch + (size_t)r0 * T;
                /* dP = dout v^T; dv += P^T dout (rows [r0, r1), keys [0, r1)) */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, hs, 1.0f, dOb, C, v, C3,
                            0.0f, dS, T);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, n, 1.0f, Pb, T, dOb, C,
                            1.0f, dv, C3);
                causal_softmax_backward(dS, Pb, r0, n, r1, T, scale);
                /* dq += dS k; dk += dS^T q */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, r1, 1.0f, dS, T, k, C3,
                            1.0f, dq + (size_t)r0 * C3, C3);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, n, 1.0f, dS, T,
                            q + (size_t)r0 * C3, C3, 1.0f, dk, C3);
            }
        }
}

void moe_model_attention_backward_ref(float *dinp, float *scratch, const float *dout,
                                      const float *inp, const float *att, int B, int T, int C,
                                      int NH)
{
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
#define Q(t) (inp + ((size_t)b * T + (t)) * C3 + h * hs)
#define DQ(t) (dinp + ((size_t)b * T + (t)) * C3 + h * hs)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *P = att + ((size_t)b * NH + h) * T * T;
            for (int t = 0; t < T; t++) {
                const float *dO = dout + ((size_t)b * T + t) * C + h * hs;
                for (int j = 0; j < T; j++) {
                    double s = 0.0;
                    for (int i = 0; i < hs; i++) s += (double)dO[i] * Q(j)[2 * C + i];
                    scratch[(size_t)t * T + j] = (float)s;
                    for (int i = 0; i < hs; i++) DQ(j)[2 * C + i] += P[(size_t)t * T + j] * dO[i];
                }
            }
            causal_softmax_backward(scratch, P, 0, T, T, T, scale);
            for (int t = 0; t < T; t++)
                for (int j = 0; j <= t; j++) {
                    const float ds = scratch[(size_t)t * T + j];
                    for (int i = 0; i < hs; i++) {
                        DQ(t)[i] += ds * Q(j)[C + i];
                        DQ(j)[C + i] += ds * Q(t)[i];
                    }
                }
        }
#undef Q
#undef DQ
}

void moe_model_residual_forward(float *out, const float *a, const float *b, long n)
{
    for (long i = 0; i < n; i++) out[i] = a[i] + b[i];
}

MOE_TARGET_CLONES void moe_model_crossentropy_forward(float *losses, float *probs, const float *logits,
                                    const uint8_t *targets, int N, int V)
{
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        const float mx = row_max(l, V);
        memcpy(p, l, (size_t)V * sizeof *p);
        const double sum = row_exp_sum(p, V, mx);
        const float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) p[i] *= inv;
        /* lse - l[target] rather than -log(p[target]): exact for tiny probabilities */
        losses[n] = (float)((double)mx + log(sum) - l[targets[n]]);
    }
}

void moe_model_crossentropy_backward(float *dlogits, const float *probs, const uint8_t *targets,
                                     float dloss, int N, int V)
{
    for (int n = 0; n < N; n++) {
        float *d = dlogits + (size_t)n * V;
        const float *p = probs + (size_t)n * V;
        for (int i = 0; i < V; i++) d[i] += p[i] * dloss;
        d[targets[n]] -= dloss;
    }
}
