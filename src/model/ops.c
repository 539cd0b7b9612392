/* Dense model layers (forward/backward pairs) and their naive references.
 * See ops.h for shapes; backward functions accumulate. */
#include "model/ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

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

void moe_model_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                 const float *weight, const float *bias, int N, int C, float eps)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        float v = 0.0f; /* two passes: no cancellation for rows with a large mean */
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= C;
        const float s = 1.0f / sqrtf(v + eps);
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

void moe_model_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                  const float *inp, const float *weight, const float *mean,
                                  const float *rstd, int N, int C)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        const float m = mean[n], s = rstd[n];
        /* dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = w * dy */
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int i = 0; i < C; i++) {
            const float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        for (int i = 0; i < C; i++) {
            const float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
            dbias[i] += dy[i];
            dweight[i] += norm * dy[i];
            dx[i] += s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
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

/* Causal softmax of the scaled scores of row t in place: entries j <= t become
 * probabilities, entries j > t become 0. */
static void causal_softmax_row(float *row, int t, int T)
{
    float mx = row[0];
    for (int j = 1; j <= t; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j <= t; j++) {
        row[j] = expf(row[j] - mx);
        sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j <= t; j++) row[j] *= inv;
    for (int j = t + 1; j < T; j++) row[j] = 0.0f;
}

/* In place on a (T, T) block holding dP = dL/dP: dS = P * (dP - sum_j P dP) * scale,
 * the softmax backward folded with the score scale. Zero above the diagonal. */
static void causal_softmax_backward(float *d, const float *P, int T, float scale)
{
    for (int t = 0; t < T; t++) {
        float *dr = d + (size_t)t * T;
        const float *pr = P + (size_t)t * T;
        float dot = 0.0f;
        for (int j = 0; j <= t; j++) dot += pr[j] * dr[j];
        for (int j = 0; j <= t; j++) dr[j] = pr[j] * (dr[j] - dot) * scale;
        for (int j = t + 1; j < T; j++) dr[j] = 0.0f;
    }
}

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
            /* S = scale q k^T over the whole (T, T) block: the GEMM is cheaper than
             * skipping the masked half element by element. */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, C3, k, C3, 0.0f,
                        P, T);
            for (int t = 0; t < T; t++) causal_softmax_row(P + (size_t)t * T, t, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, P, T, v, C3, 0.0f,
                        o, C);
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
            /* dP = dout v^T; dv += P^T dout */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dO, C, v, C3, 0.0f,
                        scratch, T);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, P, T, dO, C, 1.0f,
                        dv, C3);
            causal_softmax_backward(scratch, P, T, scale); /* scratch = dS */
            /* dq += dS k; dk += dS^T q */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, scratch, T, k, C3,
                        1.0f, dq, C3);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, scratch, T, q, C3,
                        1.0f, dk, C3);
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
            causal_softmax_backward(scratch, P, T, scale);
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

void moe_model_crossentropy_forward(float *losses, float *probs, const float *logits,
                                    const uint8_t *targets, int N, int V)
{
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        float mx = l[0];
        for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
        double sum = 0.0;
        for (int i = 0; i < V; i++) {
            p[i] = expf(l[i] - mx);
            sum += p[i];
        }
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
