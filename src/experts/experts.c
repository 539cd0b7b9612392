/* Feed-forward experts, fast path: one cblas_sgemm per matmul per expert,
 * biases folded into the GEMM output (C initialised with the bias, beta = 1),
 * the b1 gradient summed inside the activation backward pass, activations in
 * branch-free loops that the compiler vectorises. gelu and silu share one
 * polynomial exp: both are x * sigmoid(z), so no tanhf call is needed (see
 * moe_gelu_neg_exp). */
#include "experts/experts.h"

#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/fastmath.h"
#include "core/par.h"

#define MOE_SQRT_2_OVER_PI 0.79788456080286535588f
#define MOE_GELU_C 0.044715f

/* gelu(x) = 0.5 x (1 + tanh(u)) = x * s with s = sigmoid(2u) = 1 / (1 + e),
 * e = exp(-2u), u = sqrt(2/pi) (x + 0.044715 x^3). The sigmoid form has no
 * cancellation for negative x, unlike 1 + tanh(u). */
static inline float moe_gelu_neg_exp(float x)
{
    return moe_fast_expf(-2.0f * MOE_SQRT_2_OVER_PI * x * (1.0f + MOE_GELU_C * x * x));
}

/* The activation loops are compute-bound at SSE2 width (about 3x slower
 * than the memory traffic allows): MOE_TARGET_CLONES adds an AVX2+FMA clone. */
MOE_TARGET_CLONES static void act_forward_row(float *restrict a, const float *restrict h, int F, moe_activation act)
{
    switch (act) {
    case MOE_ACT_GELU:
        for (int j = 0; j < F; j++) a[j] = h[j] / (1.0f + moe_gelu_neg_exp(h[j]));
        break;
    case MOE_ACT_RELU:
        for (int j = 0; j < F; j++) a[j] = h[j] > 0.0f ? h[j] : 0.0f;
        break;
    case MOE_ACT_SWIGLU: /* silu(g) * v, gate g = h[0, F), value v = h[F, 2F) */
        for (int j = 0; j < F; j++) a[j] = h[j] * h[F + j] / (1.0f + moe_fast_expf(-h[j]));
        break;
    }
}

/* dh (F1) from da (F) and h (F1) for one row. */
/* dh may be h itself (in place): every iteration reads its h entries
 * before it writes the same entries of dh, so no restrict on those two. */
MOE_TARGET_CLONES static void act_backward_row(float *dh, const float *restrict da, const float *h, int F,
                             moe_activation act)
{
    switch (act) {
    case MOE_ACT_GELU:
        /* gelu' = s + 2 x s (1 - s) u' with 1 - s = e s and u' = sqrt(2/pi) (1 + 3 c x^2) */
        for (int j = 0; j < F; j++) {
            const float x = h[j], e = moe_gelu_neg_exp(x), s = 1.0f / (1.0f + e);
            const float du = MOE_SQRT_2_OVER_PI * (1.0f + 3.0f * MOE_GELU_C * x * x);
            dh[j] = da[j] * (s + 2.0f * x * e * s * s * du);
        }
        break;
    case MOE_ACT_RELU:
        for (int j = 0; j < F; j++) {
            const float g = da[j]; /* an unconditional load keeps the loop vectorisable */
            dh[j] = h[j] > 0.0f ? g : 0.0f;
        }
        break;
    case MOE_ACT_SWIGLU:
        /* d/dg = v silu'(g) = v s (1 + g (1 - s)); d/dv = silu(g) = g s;
         * 1 - s = e s avoids the cancellation of 1 - s for large g */
        for (int j = 0; j < F; j++) {
            const float g = h[j], v = h[F + j], e = moe_fast_expf(-g), s = 1.0f / (1.0f + e);
            dh[j] = da[j] * v * s * (1.0f + g * e * s);
            dh[F + j] = da[j] * g * s;
        }
        break;
    }
}

/* ---- row-parallel activation passes ----
 * The GEMMs run on OpenBLAS's threads; the elementwise passes between them
 * would otherwise run on one core while the others idle. They are split in
 * contiguous row ranges over as many threads as OpenBLAS uses (a fixed
 * split, so results depend only on the thread count; the b1 column sums are
 * added per thread, then across threads in thread order). */
enum { MOE_ACT_MIN_ELEMS = 1 << 17 };

typedef struct {
    float *out, *db1;           /* a or dh (n, F or F1); this thread's db1 partial (F1) or NULL */
    const float *in, *h;        /* h (forward) / da and h (backward) */
    long r0, r1;
    int F;
    moe_activation act;
    int backward;
} act_job;

static void act_job_run(act_job *j)
{
    const int F1 = moe_f1(j->F, j->act);
    for (long r = j->r0; r < j->r1; r++) {
        if (!j->backward) {
            act_forward_row(j->out + r * j->F, j->h + r * F1, j->F, j->act);
            continue;
        }
        float *row = j->out + r * F1;
        act_backward_row(row, j->in + r * j->F, j->h + r * F1, j->F, j->act);
        if (j->db1)
            for (int c = 0; c < F1; c++) j->db1[c] += row[c];
    }
}

typedef struct {
    act_job job;
    float *partial; /* (nt - 1, F1) db1 partials of threads 1.. */
    long n;
} act_region;

static void act_region_run(void *ctx, int t, int nt)
{
    const act_region *r = ctx;
    act_job j = r->job;
    moe_par_range(r->n, t, nt, &j.r0, &j.r1);
    if (j.db1 && t > 0) j.db1 = r->partial + (size_t)(t - 1) * moe_f1(j.F, j.act);
    act_job_run(&j);
}

/* Runs job over rows [0, n) in a parallel region (core/par.h). With
 * job.db1 != NULL each thread sums into its own partial, added into job.db1
 * in thread order. Runs on the caller alone if the partials cannot be
 * allocated. */
static void act_parallel(act_job job, long n)
{
    const int F1 = moe_f1(job.F, job.act);
    int nt = moe_par_threads_for(n * (long)F1, MOE_ACT_MIN_ELEMS / 2);
    if (n * (long)F1 < MOE_ACT_MIN_ELEMS) nt = 1;
    act_region r = {job, NULL, n};
    if (nt > 1 && job.db1 && !(r.partial = calloc((size_t)(nt - 1) * F1, sizeof(float)))) nt = 1;
    moe_par_run(nt, act_region_run, &r);
    if (job.db1)
        for (int t = 1; t < nt; t++)
            for (int c = 0; c < F1; c++) job.db1[c] += r.partial[(size_t)(t - 1) * F1 + c];
    free(r.partial);
}

void moe_act_forward(float *a, const float *h, long n, int F, moe_activation act)
{
    act_parallel((act_job){.out = a, .h = h, .F = F, .act = act}, n);
}

void moe_act_backward(float *dh, const float *da, const float *h, long n, int F, moe_activation act)
{
    act_parallel((act_job){.out = dh, .in = da, .h = h, .F = F, .act = act, .backward = 1}, n);
}

/* Every row of out (n, m) = bias (m): the C operand of a beta = 1 GEMM. */
static void fill_rows(float *restrict out, const float *restrict bias, int n, int m)
{
    for (int r = 0; r < n; r++) memcpy(out + (size_t)r * m, bias, (size_t)m * sizeof *out);
}

void moe_expert_forward(float *y, float *h, float *a, const float *x, const int *offsets,
                        const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n <= 0) continue;
        const float *xe = x + (size_t)r0 * d;
        float *he = h + (size_t)r0 * F1, *ae = a + (size_t)r0 * F, *ye = y + (size_t)r0 * d;
        const float *w1 = p->w1 + (size_t)e * F1 * d, *w2 = p->w2 + (size_t)e * d * F;
        /* h = x W1^T + b1 (beta = 0 without biases) */
        if (p->b1) fill_rows(he, p->b1 + (size_t)e * F1, n, F1);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F1, d, 1.0f, xe, d, w1, d, p->b1 ? 1.0f : 0.0f, he, F1);
        moe_act_forward(ae, he, n, F, act);
        if (p->b2) fill_rows(ye, p->b2 + (size_t)e * d, n, d); /* y = a W2^T + b2 */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, F, 1.0f, ae, F, w2, F, p->b2 ? 1.0f : 0.0f, ye, d);
    }
}

void moe_expert_backward(float *dx, moe_expert_params *g, float *dh, float *da, const float *dy,
                         const float *x, const float *h, const float *a, const int *offsets,
                         const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n <= 0) continue;
        const float *dye = dy + (size_t)r0 * d, *xe = x + (size_t)r0 * d;
        const float *he = h + (size_t)r0 * F1, *ae = a + (size_t)r0 * F;
        float *dhe = dh + (size_t)r0 * F1, *dae = da + (size_t)r0 * F, *dxe = dx + (size_t)r0 * d;
        const float *w1 = p->w1 + (size_t)e * F1 * d, *w2 = p->w2 + (size_t)e * d * F;
        float *gw1 = g->w1 + (size_t)e * F1 * d, *gw2 = g->w2 + (size_t)e * d * F;
        float *gb1 = g->b1 ? g->b1 + (size_t)e * F1 : NULL, *gb2 = g->b2 ? g->b2 + (size_t)e * d : NULL;

        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, F, n, 1.0f, dye, d, ae, F, 1.0f, gw2, F);
        for (int r = 0; gb2 && r < n; r++) {
            const float *restrict row = dye + (size_t)r * d;
            for (int j = 0; j < d; j++) gb2[j] += row[j];
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, F, d, 1.0f, dye, d, w2, F, 0.0f, dae, F);
        /* dh = act'(h) * da, with the b1 gradient summed while rows are hot */
        act_parallel((act_job){.out = dhe, .db1 = gb1, .in = dae, .h = he, .F = F, .act = act, .backward = 1}, n);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F1, d, n, 1.0f, dhe, F1, xe, d, 1.0f, gw1, d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, F1, 1.0f, dhe, F1, w1, d, 0.0f, dxe, d);
    }
}

double moe_expert_flops(const int *offsets, int E, int d, int F, moe_activation act)
{
    const double N = (double)offsets[E] - (double)offsets[0];
    const double fwd = 2.0 * N * d * moe_f1(F, act) + 2.0 * N * F * d;
    return 3.0 * fwd; /* backward: two GEMMs per forward GEMM */
}
