/* Dense model layers (forward/backward pairs) and their naive references.
 * See ops.h for shapes; backward functions accumulate. */
#include "model/ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "core/fastmath.h"
#include "core/gemm.h"
#include "core/moe.h"
#include "core/par.h"
#include "core/rows.h"

void moe_model_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                               int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *we = wte + (size_t)inp[(size_t)b * T + t] * C;
            if (!wpe) {
                memcpy(o, we, (size_t)C * sizeof *o);
                continue;
            }
            const float *wp = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = we[i] + wp[i];
        }
}

void moe_model_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                                int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *we = dwte + (size_t)inp[(size_t)b * T + t] * C;
            for (int i = 0; i < C; i++) we[i] += d[i];
            if (dwpe)
                for (int i = 0; i < C; i++) dwpe[(size_t)t * C + i] += d[i];
        }
}

void moe_model_encoder_forward_ref(float *out, const int32_t *inp, const float *wte, const float *wpe,
                                   int B, int T, int C, int V)
{
    for (int n = 0; n < B * T; n++)
        for (int i = 0; i < C; i++) {
            float s = 0.0f; /* one-hot row times wte: exactly wte[inp][i] */
            for (int v = 0; v < V; v++) s += (v == inp[n] ? 1.0f : 0.0f) * wte[(size_t)v * C + i];
            out[(size_t)n * C + i] = wpe ? s + wpe[(size_t)(n % T) * C + i] : s;
        }
}

void moe_model_encoder_backward_ref(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                                    int B, int T, int C, int V)
{
    for (int v = 0; v < V; v++)
        for (int n = 0; n < B * T; n++)
            if (inp[n] == v)
                for (int i = 0; i < C; i++) dwte[(size_t)v * C + i] += dout[(size_t)n * C + i];
    for (int t = 0; dwpe && t < T; t++)
        for (int b = 0; b < B; b++)
            for (int i = 0; i < C; i++) dwpe[(size_t)t * C + i] += dout[((size_t)b * T + t) * C + i];
}

/* Elements per thread below which a region does not pay for its start-up. */
enum { PAR_MIN_ELEMS = 1 << 15 };
/* Column shares in blocks of 16 floats: no cache line written by two threads. */
enum { COL_BLOCK = 16 };


/* Rows [n0, n1) of the layernorm forward. */
MOE_TARGET_CLONES static void ln_forward_rows(float *restrict out, float *mean, float *rstd,
                                              const float *restrict inp, const float *weight,
                                              const float *bias, long n0, long n1, int C, float eps)
{
    for (long n = n0; n < n1; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float s[MOE_LANES] = {0}, q[MOE_LANES] = {0};
        int i = 0;
        for (; i + MOE_LANES <= C; i += MOE_LANES)
            for (int l = 0; l < MOE_LANES; l++) s[l] += x[i + l];
        for (; i < C; i++) s[0] += x[i];
        const float m = moe_lanes_total(s) / C;
        /* two passes: no cancellation for rows with a large mean */
        for (i = 0; i + MOE_LANES <= C; i += MOE_LANES)
            for (int l = 0; l < MOE_LANES; l++) q[l] += (x[i + l] - m) * (x[i + l] - m);
        for (; i < C; i++) q[0] += (x[i] - m) * (x[i] - m);
        const float r = 1.0f / sqrtf(moe_lanes_total(q) / C + eps);
        for (i = 0; i < C; i++) o[i] = (x[i] - m) * r * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

/* dx of rows [n0, n1) of the layernorm backward. */
MOE_TARGET_CLONES static void ln_backward_rows(float *restrict dinp, const float *restrict dout,
                                               const float *restrict inp, const float *weight,
                                               const float *mean, const float *rstd, long n0, long n1,
                                               int C)
{
    for (long n = n0; n < n1; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        const float m = mean[n], r = rstd[n];
        /* dx = r * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = w * dy */
        float a[MOE_LANES] = {0}, b[MOE_LANES] = {0};
        int i = 0;
        for (; i + MOE_LANES <= C; i += MOE_LANES)
            for (int l = 0; l < MOE_LANES; l++) {
                const float norm = (x[i + l] - m) * r, dnorm = weight[i + l] * dy[i + l];
                a[l] += dnorm;
                b[l] += dnorm * norm;
            }
        for (; i < C; i++) {
            const float norm = (x[i] - m) * r, dnorm = weight[i] * dy[i];
            a[0] += dnorm;
            b[0] += dnorm * norm;
        }
        const float dnorm_mean = moe_lanes_total(a) / C, dnorm_norm_mean = moe_lanes_total(b) / C;
        for (i = 0; i < C; i++) {
            const float norm = (x[i] - m) * r, dnorm = weight[i] * dy[i];
            dx[i] += r * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
        }
    }
}

/* dweight, dbias of columns [c0, c1), summed over all N rows in row order. */
MOE_TARGET_CLONES static void ln_backward_cols(float *restrict dweight, float *restrict dbias,
                                               const float *restrict dout, const float *restrict inp,
                                               const float *mean, const float *rstd, int N, int C,
                                               int c0, int c1)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        const float m = mean[n], r = rstd[n];
        for (int i = c0; i < c1; i++) {
            dbias[i] += dy[i];
            dweight[i] += (x[i] - m) * r * dy[i];
        }
    }
}

typedef struct {
    float *out, *mean, *rstd, *dinp, *dweight, *dbias;
    const float *inp, *dout, *weight, *bias, *mean_in, *rstd_in;
    int N, C;
    float eps;
} ln_job;

/* Forward: rows split over threads. Backward: thread t computes dx for its
 * rows and dweight/dbias for its columns (each column summed over every row
 * in row order), so no partial sums and the result does not depend on nt. */
static void ln_run(void *ctx, int t, int nt)
{
    const ln_job *j = ctx;
    long n0, n1, c0, c1;
    moe_par_range(j->N, t, nt, &n0, &n1);
    if (!j->dinp) {
        ln_forward_rows(j->out, j->mean, j->rstd, j->inp, j->weight, j->bias, n0, n1, j->C, j->eps);
        return;
    }
    ln_backward_rows(j->dinp, j->dout, j->inp, j->weight, j->mean_in, j->rstd_in, n0, n1, j->C);
    moe_par_range_aligned(j->C, COL_BLOCK, t, nt, &c0, &c1);
    if (c0 < c1)
        ln_backward_cols(j->dweight, j->dbias, j->dout, j->inp, j->mean_in, j->rstd_in, j->N, j->C,
                         (int)c0, (int)c1);
}

void moe_model_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                 const float *weight, const float *bias, int N, int C, float eps)
{
    ln_job j = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight, .bias = bias,
                .N = N, .C = C, .eps = eps};
    moe_par_run(moe_par_threads_for((long)N * C, PAR_MIN_ELEMS), ln_run, &j);
}

void moe_model_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                  const float *inp, const float *weight, const float *mean,
                                  const float *rstd, int N, int C)
{
    ln_job j = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .dout = dout, .inp = inp,
                .weight = weight, .mean_in = mean, .rstd_in = rstd, .N = N, .C = C};
    moe_par_run(moe_par_threads_for((long)N * C, PAR_MIN_ELEMS), ln_run, &j);
}

/* ---- RMSNorm ---- */

/* Rows [n0, n1) (all their groups) of the RMSNorm forward. */
MOE_TARGET_CLONES static void rms_forward_rows(float *out, float *rstd, const float *inp, const float *weight,
                                               long n0, long n1, int G, int C, long stride, float eps)
{
    for (long n = n0; n < n1; n++)
        for (int g = 0; g < G; g++) {
            const float *x = inp + n * stride + (size_t)g * C;
            float *o = out + n * stride + (size_t)g * C;
            const float r = 1.0f / sqrtf(moe_lanes_dot(x, x, C) / C + eps);
            for (int i = 0; i < C; i++) o[i] = x[i] * r * weight[i];
            rstd[n * G + g] = r;
        }
}

/* dx of rows [n0, n1): dx = r (w dy - xhat mean(w dy xhat)), xhat = x r. */
MOE_TARGET_CLONES static void rms_backward_rows(float *dinp, const float *dout, const float *inp,
                                                const float *weight, const float *rstd, long n0, long n1, int G,
                                                int C, long stride)
{
    for (long n = n0; n < n1; n++)
        for (int g = 0; g < G; g++) {
            const size_t o = (size_t)(n * stride) + (size_t)g * C;
            const float *x = inp + o, *dy = dout + o;
            float *dx = dinp + o;
            const float r = rstd[n * G + g];
            float a[MOE_LANES] = {0};
            int i = 0;
            for (; i + MOE_LANES <= C; i += MOE_LANES)
                for (int l = 0; l < MOE_LANES; l++) a[l] += weight[i + l] * dy[i + l] * x[i + l];
            for (; i < C; i++) a[0] += weight[i] * dy[i] * x[i];
            const float k = r * r * moe_lanes_total(a) / C;
            for (i = 0; i < C; i++) dx[i] += r * (weight[i] * dy[i] - x[i] * k);
        }
}

/* dweight of columns [c0, c1), summed over every (row, group) in order. */
MOE_TARGET_CLONES static void rms_backward_cols(float *dweight, const float *dout, const float *inp,
                                                const float *rstd, int N, int G, int C, long stride, int c0,
                                                int c1)
{
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const size_t o = (size_t)n * stride + (size_t)g * C;
            const float *x = inp + o, *dy = dout + o;
            const float r = rstd[(size_t)n * G + g];
            for (int i = c0; i < c1; i++) dweight[i] += x[i] * r * dy[i];
        }
}

typedef struct {
    float *out, *rstd, *dinp, *dweight;
    const float *inp, *dout, *weight, *rstd_in;
    int N, G, C;
    long stride;
    float eps;
} rms_job;

/* As ln_run: rows for the forward and dx, columns for dweight. */
static void rms_run(void *ctx, int t, int nt)
{
    const rms_job *j = ctx;
    long n0, n1, c0, c1;
    moe_par_range(j->N, t, nt, &n0, &n1);
    if (!j->dinp) {
        rms_forward_rows(j->out, j->rstd, j->inp, j->weight, n0, n1, j->G, j->C, j->stride, j->eps);
        return;
    }
    rms_backward_rows(j->dinp, j->dout, j->inp, j->weight, j->rstd_in, n0, n1, j->G, j->C, j->stride);
    moe_par_range_aligned(j->C, COL_BLOCK, t, nt, &c0, &c1);
    if (c0 < c1)
        rms_backward_cols(j->dweight, j->dout, j->inp, j->rstd_in, j->N, j->G, j->C, j->stride, (int)c0, (int)c1);
}

void moe_model_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int G,
                               int C, long stride, float eps)
{
    rms_job j = {.out = out, .rstd = rstd, .inp = inp, .weight = weight, .N = N, .G = G, .C = C,
                 .stride = stride, .eps = eps};
    moe_par_run(moe_par_threads_for((long)N * G * C, PAR_MIN_ELEMS), rms_run, &j);
}

void moe_model_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                const float *weight, const float *rstd, int N, int G, int C, long stride)
{
    rms_job j = {.dinp = dinp, .dweight = dweight, .dout = dout, .inp = inp, .weight = weight, .rstd_in = rstd,
                 .N = N, .G = G, .C = C, .stride = stride};
    moe_par_run(moe_par_threads_for((long)N * G * C, PAR_MIN_ELEMS), rms_run, &j);
}

void moe_model_rmsnorm_forward_ref(float *out, float *rstd, const float *inp, const float *weight, int N,
                                   int G, int C, long stride, float eps)
{
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const float *x = inp + (size_t)n * stride + (size_t)g * C;
            double ss = 0.0;
            for (int i = 0; i < C; i++) ss += (double)x[i] * x[i];
            const double r = 1.0 / sqrt(ss / C + eps);
            for (int i = 0; i < C; i++) out[(size_t)n * stride + (size_t)g * C + i] = (float)(x[i] * r * weight[i]);
            rstd[(size_t)n * G + g] = (float)r;
        }
}

void moe_model_rmsnorm_backward_ref(float *dinp, float *dweight, const float *dout, const float *inp,
                                    const float *weight, const float *rstd, int N, int G, int C, long stride)
{
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const size_t o = (size_t)n * stride + (size_t)g * C;
            const double r = rstd[(size_t)n * G + g];
            double a = 0.0;
            for (int i = 0; i < C; i++) a += (double)weight[i] * dout[o + i] * inp[o + i];
            for (int i = 0; i < C; i++) {
                dinp[o + i] += (float)(r * (weight[i] * (double)dout[o + i] - inp[o + i] * r * r * a / C));
                dweight[i] += (float)(inp[o + i] * r * dout[o + i]);
            }
        }
}

/* ---- rotary positions ---- */

void moe_model_rope_table(float *cos_t, float *sin_t, int T, int D, double theta)
{
    const int half = D / 2;
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            const double a = p * pow(theta, -2.0 * i / D);
            cos_t[(size_t)p * half + i] = (float)cos(a);
            sin_t[(size_t)p * half + i] = (float)sin(a);
        }
}

typedef struct {
    float *x;
    const float *cos_t, *sin_t;
    const int *pos;
    int N, T, nh, D;
    long stride;
    float sgn; /* +1 turns by the angle (forward), -1 back (backward) */
} rope_job;

MOE_TARGET_CLONES static void rope_rows(const rope_job *j, long n0, long n1)
{
    const int half = j->D / 2;
    for (long n = n0; n < n1; n++) {
        const int p = j->pos ? j->pos[n] : (int)(n % j->T);
        const float *c = j->cos_t + (size_t)p * half, *sn = j->sin_t + (size_t)p * half;
        for (int h = 0; h < j->nh; h++) {
            float *x = j->x + n * j->stride + (size_t)h * j->D;
            for (int i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half], s = j->sgn * sn[i];
                x[i] = a * c[i] - b * s;
                x[i + half] = b * c[i] + a * s;
            }
        }
    }
}

static void rope_run(void *ctx, int t, int nt)
{
    const rope_job *j = ctx;
    long n0, n1;
    moe_par_range(j->N, t, nt, &n0, &n1);
    rope_rows(j, n0, n1);
}

static void rope_apply(float *x, const float *cos_t, const float *sin_t, const int *pos, int N, int T, int nh,
                       int D, long stride, float sgn)
{
    rope_job j = {x, cos_t, sin_t, pos, N, T, nh, D, stride, sgn};
    moe_par_run(moe_par_threads_for((long)N * nh * D, PAR_MIN_ELEMS), rope_run, &j);
}

void moe_model_rope_forward(float *x, const float *cos_t, const float *sin_t, const int *pos, int N, int T,
                            int nh, int D, long stride)
{
    rope_apply(x, cos_t, sin_t, pos, N, T, nh, D, stride, 1.0f);
}

void moe_model_rope_backward(float *dx, const float *cos_t, const float *sin_t, const int *pos, int N, int T,
                             int nh, int D, long stride)
{
    rope_apply(dx, cos_t, sin_t, pos, N, T, nh, D, stride, -1.0f);
}

void moe_model_rope_forward_ref(float *x, const int *pos, int N, int T, int nh, int D, long stride,
                                double theta)
{
    for (int n = 0; n < N; n++) {
        const int p = pos ? pos[n] : n % T;
        for (int h = 0; h < nh; h++) {
            float *v = x + (size_t)n * stride + (size_t)h * D;
            for (int i = 0; i < D / 2; i++) {
                const double ang = p * pow(theta, -2.0 * i / D), a = v[i], b = v[i + D / 2];
                v[i] = (float)(a * cos(ang) - b * sin(ang));
                v[i + D / 2] = (float)(b * cos(ang) + a * sin(ang));
            }
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

typedef struct {
    float *acc;
    const float *a;
    int n, m;
} colsum_job;

/* Thread t sums its share of the columns over every row in row order. */
static void colsum_run(void *ctx, int t, int nt)
{
    const colsum_job *j = ctx;
    long c0, c1;
    moe_par_range_aligned(j->m, COL_BLOCK, t, nt, &c0, &c1);
    for (int r = 0; r < j->n; r++) {
        const float *row = j->a + (size_t)r * j->m;
        for (long c = c0; c < c1; c++) j->acc[c] += row[c];
    }
}

/* Adds the column sums of a (n, m) into acc (m); independent of the thread count. */
static void add_colsums(float *acc, const float *a, int n, int m)
{
    colsum_job j = {acc, a, n, m};
    const int nt = moe_par_threads_for((long)n * m, PAR_MIN_ELEMS), blocks = (m + COL_BLOCK - 1) / COL_BLOCK;
    moe_par_run(nt < blocks ? nt : blocks, colsum_run, &j);
}

void moe_model_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                              int N, int C, int OC)
{
    fill_rows(out, bias, N, OC);
    moe_sgemm_nt(N, OC, C, inp, C, weight, C, 1.0f, out, OC);
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
    moe_gemm(0, 0, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    moe_gemm(1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
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

/* x[j] = exp(x[j] - mx) for j < n; returns their sum (lanes, fixed order). */
static inline float row_exp_sum(float *x, int n, float mx)
{
    moe_row_exp(x, n, mx);
    return moe_row_sum(x, n);
}

/* Causal softmax of the scaled scores of row t in place: entries j <= t become
 * probabilities, entries j > t become 0. */
MOE_TARGET_CLONES static void causal_softmax_row(float *row, int t, int T)
{
    const float mx = moe_row_max(row, t + 1);
    const float inv = 1.0f / row_exp_sum(row, t + 1, mx);
    for (int j = 0; j <= t; j++) row[j] *= inv;
    for (int j = t + 1; j < T; j++) row[j] = 0.0f;
}

/* In place on rows [t0, t0 + n) of a (T, T) block holding dP = dL/dP in
 * columns [0, cols): dS = P * (dP - sum_j P dP) * scale, the softmax backward
 * folded with the score scale; zero above the diagonal. P and d point at row t0. */
MOE_TARGET_CLONES static void causal_softmax_backward(float *d, const float *P, int t0, int n, int cols,
                                                      int T, float scale)
{
    for (int i = 0; i < n; i++) {
        const int t = t0 + i;
        float *dr = d + (size_t)i * T;
        const float *pr = P + (size_t)i * T;
        const float dot = moe_lanes_dot(pr, dr, t + 1);
        for (int j = 0; j <= t; j++) dr[j] = pr[j] * (dr[j] - dot) * scale;
        for (int j = t + 1; j < cols; j++) dr[j] = 0.0f;
    }
}

/* Causal attention works on row blocks of ATT_ROWS queries: block [r0, r1)
 * only needs keys [0, r1), so the GEMMs skip the masked upper-right blocks
 * (5/8 of the full T x T work at T = 4 blocks, 1/2 as T grows). */
enum { ATT_ROWS = 32 };

typedef struct {
    float *out, *att, *dinp, *scratch;
    const float *inp, *dout, *att_in;
    int B, T, NH, NKV, HD;
} att_job;

/* Row widths and head offsets of the c_attn layout (see ops.h). */
static inline int att_qkv(const att_job *j) { return (j->NH + 2 * j->NKV) * j->HD; }
static inline int att_k0(const att_job *j, int h) { return (j->NH + h / (j->NH / j->NKV)) * j->HD; }
static inline int att_v0(const att_job *j, int h) { return (j->NH + j->NKV + h / (j->NH / j->NKV)) * j->HD; }

/* Attention forward of one (sequence, query head) pair. */
static void att_forward_pair(const att_job *j, int b, int h)
{
    const int T = j->T, hs = j->HD, C3 = att_qkv(j), CO = j->NH * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    const float *row = j->inp + (size_t)b * T * C3;
    const float *q = row + h * hs, *k = row + att_k0(j, h), *v = row + att_v0(j, h);
    float *P = j->att + ((size_t)b * j->NH + h) * T * T;
    float *o = j->out + (size_t)b * T * CO + h * hs;
    for (int r0 = 0; r0 < T; r0 += ATT_ROWS) {
        const int r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T, n = r1 - r0;
        float *Pb = P + (size_t)r0 * T;
        /* S = scale q k^T on rows [r0, r1), keys [0, r1) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, hs, scale, q + (size_t)r0 * C3, C3,
                    k, C3, 0.0f, Pb, T);
        for (int t = r0; t < r1; t++) causal_softmax_row(P + (size_t)t * T, t, T);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, r1, 1.0f, Pb, T, v, C3, 0.0f,
                    o + (size_t)r0 * CO, CO);
    }
}

/* Attention backward of one (sequence, query head) pair; dS is a (T, T) scratch. */
static void att_backward_pair(const att_job *j, int b, int h, float *dS)
{
    const int T = j->T, hs = j->HD, C3 = att_qkv(j), CO = j->NH * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    const size_t base = (size_t)b * T * C3;
    const float *q = j->inp + base + h * hs, *k = j->inp + base + att_k0(j, h), *v = j->inp + base + att_v0(j, h);
    float *dq = j->dinp + base + h * hs, *dk = j->dinp + base + att_k0(j, h), *dv = j->dinp + base + att_v0(j, h);
    const float *P = j->att_in + ((size_t)b * j->NH + h) * T * T;
    const float *dO = j->dout + (size_t)b * T * CO + h * hs;
    for (int r0 = 0; r0 < T; r0 += ATT_ROWS) {
        const int r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T, n = r1 - r0;
        const float *Pb = P + (size_t)r0 * T, *dOb = dO + (size_t)r0 * CO;
        float *dSb = dS + (size_t)r0 * T;
        /* dP = dout v^T; dv += P^T dout (rows [r0, r1), keys [0, r1)) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r1, hs, 1.0f, dOb, CO, v, C3, 0.0f, dSb, T);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, n, 1.0f, Pb, T, dOb, CO, 1.0f, dv, C3);
        causal_softmax_backward(dSb, Pb, r0, n, r1, T, scale);
        /* dq += dS k; dk += dS^T q */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, r1, 1.0f, dSb, T, k, C3, 1.0f,
                    dq + (size_t)r0 * C3, C3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, n, 1.0f, dSb, T, q + (size_t)r0 * C3,
                    C3, 1.0f, dk, C3);
    }
}

/* Forward: thread t of nt takes a contiguous share of the B * NH (sequence,
 * query head) pairs, which write disjoint outputs. Backward: shares of the
 * B * NKV (sequence, kv head) pairs, each running its query heads in
 * order, so the dk, dv sums over a group of query heads have one order.
 * Neither result depends on nt. */
static void att_run(void *ctx, int t, int nt)
{
    const att_job *j = ctx;
    long p0, p1;
    if (j->dinp) {
        const int grp = j->NH / j->NKV;
        moe_par_range((long)j->B * j->NKV, t, nt, &p0, &p1);
        for (long p = p0; p < p1; p++)
            for (int g = 0; g < grp; g++)
                att_backward_pair(j, (int)(p / j->NKV), (int)(p % j->NKV) * grp + g,
                                  j->scratch + (size_t)t * j->T * j->T);
        return;
    }
    moe_par_range((long)j->B * j->NH, t, nt, &p0, &p1);
    for (long p = p0; p < p1; p++) att_forward_pair(j, (int)(p / j->NH), (int)(p % j->NH));
}

void moe_model_attention_forward(float *out, float *att, const float *inp, int B, int T, int NH, int NKV,
                                 int HD)
{
    att_job j = {.out = out, .att = att, .inp = inp, .B = B, .T = T, .NH = NH, .NKV = NKV, .HD = HD};
    moe_par_run(moe_par_threads_for((long)B * NH, 1), att_run, &j);
}

void moe_model_attention_forward_ref(float *out, float *att, const float *inp, int B, int T, int NH, int NKV,
                                     int HD)
{
    const att_job j = {.B = B, .T = T, .NH = NH, .NKV = NKV, .HD = HD};
    const int hs = HD, C3 = att_qkv(&j), CO = NH * HD;
    const double scale = 1.0 / sqrt((double)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = inp + ((size_t)b * T + t) * C3 + h * hs;
                float *P = att + (((size_t)b * NH + h) * T + t) * T;
                for (int s = 0; s < T; s++) {
                    const float *k = inp + ((size_t)b * T + s) * C3 + att_k0(&j, h);
                    double acc = 0.0;
                    for (int i = 0; i < hs; i++) acc += (double)q[i] * k[i];
                    P[s] = (float)(acc * scale);
                }
                causal_softmax_row(P, t, T);
                float *o = out + ((size_t)b * T + t) * CO + h * hs;
                for (int i = 0; i < hs; i++) {
                    double acc = 0.0;
                    for (int s = 0; s <= t; s++) acc += (double)P[s] * inp[((size_t)b * T + s) * C3 + att_v0(&j, h) + i];
                    o[i] = (float)acc;
                }
            }
}

void moe_model_attention_backward(float *dinp, float *scratch, int scratch_blocks, const float *dout,
                                  const float *inp, const float *att, int B, int T, int NH, int NKV, int HD)
{
    att_job j = {.dinp = dinp, .scratch = scratch, .dout = dout, .inp = inp, .att_in = att,
                 .B = B, .T = T, .NH = NH, .NKV = NKV, .HD = HD};
    int nt = moe_par_threads_for((long)B * NKV, 1);
    nt = nt < scratch_blocks ? nt : scratch_blocks < 1 ? 1 : scratch_blocks;
    moe_par_run(nt, att_run, &j);
}

void moe_model_attention_backward_ref(float *dinp, float *scratch, const float *dout, const float *inp,
                                      const float *att, int B, int T, int NH, int NKV, int HD)
{
    const att_job j = {.B = B, .T = T, .NH = NH, .NKV = NKV, .HD = HD};
    const int hs = HD, C3 = att_qkv(&j), CO = NH * HD;
    const float scale = 1.0f / sqrtf((float)hs);
#define ROW(t) ((size_t)b * T + (t)) * C3
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const int k0 = att_k0(&j, h), v0 = att_v0(&j, h), q0 = h * hs;
            const float *P = att + ((size_t)b * NH + h) * T * T;
            for (int t = 0; t < T; t++) {
                const float *dO = dout + ((size_t)b * T + t) * CO + h * hs;
                for (int s = 0; s < T; s++) {
                    double acc = 0.0;
                    for (int i = 0; i < hs; i++) acc += (double)dO[i] * inp[ROW(s) + v0 + i];
                    scratch[(size_t)t * T + s] = (float)acc;
                    for (int i = 0; i < hs; i++) dinp[ROW(s) + v0 + i] += P[(size_t)t * T + s] * dO[i];
                }
            }
            causal_softmax_backward(scratch, P, 0, T, T, T, scale);
            for (int t = 0; t < T; t++)
                for (int s = 0; s <= t; s++) {
                    const float ds = scratch[(size_t)t * T + s];
                    for (int i = 0; i < hs; i++) {
                        dinp[ROW(t) + q0 + i] += ds * inp[ROW(s) + k0 + i];
                        dinp[ROW(s) + k0 + i] += ds * inp[ROW(t) + q0 + i];
                    }
                }
        }
#undef ROW
}

/* Arguments of the row-independent passes below; each thread takes a
 * contiguous share of the n rows (elements, for the residual add). */
typedef struct {
    float *out, *probs, *losses;
    const float *a, *b, *logits, *probs_in;
    const int32_t *targets;
    long n;
    int V;
    float dloss;
} rows_job;

static void residual_run(void *ctx, int t, int nt)
{
    const rows_job *j = ctx;
    long i0, i1;
    moe_par_range(j->n, t, nt, &i0, &i1);
    for (long i = i0; i < i1; i++) j->out[i] = j->a[i] + j->b[i];
}

MOE_TARGET_CLONES static void ce_forward_run(void *ctx, int t, int nt)
{
    const rows_job *j = ctx;
    const int V = j->V;
    long n0, n1;
    moe_par_range(j->n, t, nt, &n0, &n1);
    for (long n = n0; n < n1; n++) {
        const float *l = j->logits + (size_t)n * V;
        float *p = j->probs + (size_t)n * V;
        const float mx = moe_row_max(l, V);
        memcpy(p, l, (size_t)V * sizeof *p);
        const double sum = row_exp_sum(p, V, mx);
        const float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) p[i] *= inv;
        /* lse - l[target] rather than -log(p[target]): exact for tiny probabilities */
        j->losses[n] = (float)((double)mx + log(sum) - l[j->targets[n]]);
    }
}

static void ce_backward_run(void *ctx, int t, int nt)
{
    const rows_job *j = ctx;
    const int V = j->V;
    long n0, n1;
    moe_par_range(j->n, t, nt, &n0, &n1);
    for (long n = n0; n < n1; n++) {
        float *d = j->out + (size_t)n * V;
        const float *p = j->probs_in + (size_t)n * V;
        for (int i = 0; i < V; i++) d[i] += p[i] * j->dloss;
        d[j->targets[n]] -= j->dloss;
    }
}

void moe_model_residual_forward(float *out, const float *a, const float *b, long n)
{
    rows_job j = {.out = out, .a = a, .b = b, .n = n};
    moe_par_run(moe_par_threads_for(n, PAR_MIN_ELEMS), residual_run, &j);
}

void moe_model_crossentropy_forward(float *losses, float *probs, const float *logits,
                                    const int32_t *targets, int N, int V)
{
    rows_job j = {.losses = losses, .probs = probs, .logits = logits, .targets = targets, .n = N, .V = V};
    moe_par_run(moe_par_threads_for((long)N * V, PAR_MIN_ELEMS), ce_forward_run, &j);
}

void moe_model_crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                                     float dloss, int N, int V)
{
    rows_job j = {.out = dlogits, .probs_in = probs, .targets = targets, .n = N, .V = V, .dloss = dloss};
    moe_par_run(moe_par_threads_for((long)N * V, PAR_MIN_ELEMS), ce_backward_run, &j);
}

void moe_model_crossentropy_forward_ref(float *losses, float *probs, const float *logits,
                                        const int32_t *targets, int N, int V)
{
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        double mx = l[0], sum = 0.0;
        for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
        for (int i = 0; i < V; i++) sum += exp((double)l[i] - mx);
        for (int i = 0; i < V; i++) probs[(size_t)n * V + i] = (float)(exp((double)l[i] - mx) / sum);
        losses[n] = (float)(mx + log(sum) - l[targets[n]]);
    }
}

void moe_model_crossentropy_backward_ref(float *dlogits, const float *probs, const int32_t *targets,
                                         float dloss, int N, int V)
{
    for (int n = 0; n < N; n++)
        for (int i = 0; i < V; i++)
            dlogits[(size_t)n * V + i] += (probs[(size_t)n * V + i] - (i == targets[n] ? 1.0f : 0.0f)) * dloss;
}
