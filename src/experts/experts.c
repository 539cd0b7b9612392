/* Feed-forward experts, fast path: one single-threaded GEMM per matmul per
 * expert (few-row paths for an expert with few tokens, core/gemm.h) with the
 * experts spread over the threads, or, for an
 * expert too big to share out, one expert at a time with its GEMMs split
 * over the threads (moe_gemm; expert_plan decides). Biases are folded into the GEMM output (C
 * initialised with the bias, beta = 1), the b1 gradient is summed inside the
 * activation backward pass, activations run in branch-free loops that the
 * compiler vectorises. gelu and silu share one polynomial exp: both are
 * x * sigmoid(z), so no tanhf call is needed (see moe_gelu_neg_exp).
 *
 * Bits: every pass of this file computes each output element in one fixed
 * order whatever the number of threads (rows split for elementwise work,
 * columns for the b1 and b2 gradients, each summed over the rows in row
 * order), so an expert's results depend only on what OpenBLAS returns for
 * its GEMMs. */
#include "experts/experts.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/fastmath.h"
#include "core/gemm.h"
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

/* Columns [j0, j1) of one row: a (F) from h (F1). The activation loops are
 * compute-bound at SSE2 width (about 3x slower than the memory traffic
 * allows): MOE_TARGET_CLONES_EW adds AVX2+FMA and AVX-512 clones. */
MOE_TARGET_CLONES_EW static void act_forward_span(float *restrict a, const float *restrict h, int F, int j0, int j1,
                                               moe_activation act)
{
    switch (act) {
    case MOE_ACT_GELU:
        for (int j = j0; j < j1; j++) a[j] = h[j] / (1.0f + moe_gelu_neg_exp(h[j]));
        break;
    case MOE_ACT_RELU:
        for (int j = j0; j < j1; j++) a[j] = h[j] > 0.0f ? h[j] : 0.0f;
        break;
    case MOE_ACT_SWIGLU: /* silu(g) * v, gate g = h[0, F), value v = h[F, 2F) */
        for (int j = j0; j < j1; j++) a[j] = h[j] * h[F + j] / (1.0f + moe_fast_expf(-h[j]));
        break;
    }
}

/* Columns [j0, j1) of one row: dh (F1) from da (F) and h (F1); with db1 != NULL
 * also db1 += dh over those columns (and F + j for swiglu).
 * dh may be h itself (in place): every iteration reads its h entries
 * before it writes the same entries of dh, so no restrict on those two. */
MOE_TARGET_CLONES_EW static void act_backward_span(float *dh, float *restrict db1, const float *restrict da,
                                                const float *h, int F, int j0, int j1, moe_activation act)
{
    switch (act) {
    case MOE_ACT_GELU:
        /* gelu' = s + 2 x s (1 - s) u' with 1 - s = e s and u' = sqrt(2/pi) (1 + 3 c x^2) */
        for (int j = j0; j < j1; j++) {
            const float x = h[j], e = moe_gelu_neg_exp(x), s = 1.0f / (1.0f + e);
            const float du = MOE_SQRT_2_OVER_PI * (1.0f + 3.0f * MOE_GELU_C * x * x);
            dh[j] = da[j] * (s + 2.0f * x * e * s * s * du);
        }
        break;
    case MOE_ACT_RELU:
        for (int j = j0; j < j1; j++) {
            const float g = da[j]; /* an unconditional load keeps the loop vectorisable */
            dh[j] = h[j] > 0.0f ? g : 0.0f;
        }
        break;
    case MOE_ACT_SWIGLU:
        /* d/dg = v silu'(g) = v s (1 + g (1 - s)); d/dv = silu(g) = g s;
         * 1 - s = e s avoids the cancellation of 1 - s for large g */
        for (int j = j0; j < j1; j++) {
            const float g = h[j], v = h[F + j], e = moe_fast_expf(-g), s = 1.0f / (1.0f + e);
            dh[j] = da[j] * v * s * (1.0f + g * e * s);
            dh[F + j] = da[j] * g * s;
        }
        break;
    }
    if (!db1) return;
    for (int j = j0; j < j1; j++) db1[j] += dh[j];
    if (act == MOE_ACT_SWIGLU)
        for (int j = j0; j < j1; j++) db1[F + j] += dh[F + j];
}

/* db (m) += every row of dy (n, m), in row order. */
static void add_rows(float *restrict db, const float *restrict dy, long n, int m)
{
    for (long r = 0; r < n; r++) {
        const float *restrict row = dy + r * m;
        for (int j = 0; j < m; j++) db[j] += row[j];
    }
}

/* ---- threaded activation passes (one expert over all threads, and the
 * dense feed-forward of the model) ----
 * Rows split over the threads, except for a backward that sums db1: then
 * columns (in blocks of 16 floats), so that each thread owns its slice of
 * db1 and sums it over every row in row order: the bits do not depend on
 * the thread count. */
enum { MOE_ACT_MIN_ELEMS = 1 << 17 };

typedef struct {
    float *out, *db1;     /* a or dh; db1 (F1) or NULL */
    const float *in, *h;  /* da (backward); h */
    long n;
    int F;
    moe_activation act;
    int backward;
} act_job;

static void act_rows(const act_job *j, long r0, long r1, int c0, int c1)
{
    const int F = j->F, F1 = moe_f1(F, j->act);
    for (long r = r0; r < r1; r++) {
        if (!j->backward)
            act_forward_span(j->out + r * F, j->h + r * F1, F, c0, c1, j->act);
        else
            act_backward_span(j->out + r * F1, j->db1, j->in + r * F, j->h + r * F1, F, c0, c1, j->act);
    }
}

static void act_region_run(void *ctx, int t, int nt)
{
    const act_job *j = ctx;
    long i0, i1;
    if (!j->db1) {
        moe_par_range(j->n, t, nt, &i0, &i1);
        act_rows(j, i0, i1, 0, j->F);
    } else {
        moe_par_range_aligned(j->F, 16, t, nt, &i0, &i1);
        if (i0 < i1) act_rows(j, 0, j->n, (int)i0, (int)i1);
    }
}

/* Runs job over its rows, in a parallel region when there is enough work. */
static void act_parallel(act_job job)
{
    const long elems = job.n * (long)moe_f1(job.F, job.act);
    int nt = elems < MOE_ACT_MIN_ELEMS ? 1 : moe_par_threads_for(elems, MOE_ACT_MIN_ELEMS / 2);
    if (job.db1 && nt > (job.F + 15) / 16) nt = (job.F + 15) / 16;
    moe_par_run(nt, act_region_run, &job);
}

void moe_act_forward(float *a, const float *h, long n, int F, moe_activation act)
{
    act_parallel((act_job){.out = a, .h = h, .n = n, .F = F, .act = act});
}

void moe_act_backward(float *dh, const float *da, const float *h, long n, int F, moe_activation act)
{
    act_parallel((act_job){.out = dh, .in = da, .h = h, .n = n, .F = F, .act = act, .backward = 1});
}

/* Every row of out (n, m) = bias (m): the C operand of a beta = 1 GEMM. */
static void fill_rows(float *restrict out, const float *restrict bias, int n, int m)
{
    for (int r = 0; r < n; r++) memcpy(out + (size_t)r * m, bias, (size_t)m * sizeof *out);
}

/* ---- one expert ---- */

/* Every argument of a forward or backward call. */
typedef struct {
    float *y, *h, *a;           /* forward outputs */
    float *dx, *dh, *da;        /* backward outputs and scratch */
    moe_expert_params *g;       /* backward: gradients */
    const float *x, *dy;
    const float *hin, *ain;     /* backward: h and a as the forward left them */
    const int *offsets;
    const moe_expert_params *p;
    int d, F;
    moe_activation act;
} expert_args;

/* threaded: the activation pass may open a parallel region (the expert
 * runs alone, its GEMMs on every OpenBLAS thread); else it runs on the
 * calling thread. */
static void expert_forward_one(const expert_args *s, int e, int threaded)
{
    const int d = s->d, F = s->F, F1 = moe_f1(F, s->act);
    const int r0 = s->offsets[e], n = s->offsets[e + 1] - r0;
    if (n <= 0) return;
    const float *xe = s->x + (size_t)r0 * d;
    float *he = s->h + (size_t)r0 * F1, *ae = s->a + (size_t)r0 * F, *ye = s->y + (size_t)r0 * d;
    const float *w1 = s->p->w1 + (size_t)e * F1 * d, *w2 = s->p->w2 + (size_t)e * d * F;
    /* h = x W1^T + b1 (beta = 0 without biases) */
    if (s->p->b1) fill_rows(he, s->p->b1 + (size_t)e * F1, n, F1);
    moe_sgemm_nt(n, F1, d, xe, d, w1, d, s->p->b1 ? 1.0f : 0.0f, he, F1);
    const act_job aj = {.out = ae, .h = he, .n = n, .F = F, .act = s->act};
    if (threaded) act_parallel(aj);
    else act_rows(&aj, 0, n, 0, F);
    if (s->p->b2) fill_rows(ye, s->p->b2 + (size_t)e * d, n, d); /* y = a W2^T + b2 */
    moe_sgemm_nt(n, d, F, ae, F, w2, F, s->p->b2 ? 1.0f : 0.0f, ye, d);
}

static void expert_backward_one(const expert_args *s, int e, int threaded)
{
    const int d = s->d, F = s->F, F1 = moe_f1(F, s->act);
    const int r0 = s->offsets[e], n = s->offsets[e + 1] - r0;
    if (n <= 0) return;
    const float *dye = s->dy + (size_t)r0 * d, *xe = s->x + (size_t)r0 * d;
    const float *he = s->hin + (size_t)r0 * F1, *ae = s->ain + (size_t)r0 * F;
    float *dhe = s->dh + (size_t)r0 * F1, *dae = s->da + (size_t)r0 * F, *dxe = s->dx + (size_t)r0 * d;
    const float *w1 = s->p->w1 + (size_t)e * F1 * d, *w2 = s->p->w2 + (size_t)e * d * F;
    moe_expert_params *g = s->g;
    float *gw1 = g->w1 + (size_t)e * F1 * d, *gw2 = g->w2 + (size_t)e * d * F;
    float *gb1 = g->b1 ? g->b1 + (size_t)e * F1 : NULL, *gb2 = g->b2 ? g->b2 + (size_t)e * d : NULL;

    /* In place (dx = dy, da = a, dh = h): every buffer is read before the
     * GEMM or pass that overwrites it. */
    moe_gemm(1, 0, d, F, n, 1.0f, dye, d, ae, F, 1.0f, gw2, F);
    if (gb2) add_rows(gb2, dye, n, d);
    moe_gemm(0, 0, n, F, d, 1.0f, dye, d, w2, F, 0.0f, dae, F);
    /* dh = act'(h) * da, with the b1 gradient summed while rows are hot */
    const act_job aj = {.out = dhe, .db1 = gb1, .in = dae, .h = he, .n = n, .F = F, .act = s->act, .backward = 1};
    if (threaded) act_parallel(aj);
    else act_rows(&aj, 0, n, 0, F);
    moe_gemm(1, 0, F1, d, n, 1.0f, dhe, F1, xe, d, 1.0f, gw1, d);
    moe_gemm(0, 0, n, d, F1, 1.0f, dhe, F1, w1, d, 0.0f, dxe, d);
}

/* ---- scheduling the experts over the threads ----
 * With nt threads, an expert either runs whole on one thread (its GEMMs
 * single-threaded: no synchronisation inside, its activation pass on rows
 * the same thread just wrote) or alone over all threads (its GEMMs split
 * over them, moe_gemm). The first is faster as long as the loads balance;
 * an expert holding more than a thread's share of the rows cannot be
 * balanced and goes the second way. The plan is a pure function of the row
 * counts and nt; the results depend on it only through what sgemm returns
 * for a split GEMM's blocks (see the bits note at the top). */

/* Relative speed of one expert's GEMMs split over nt threads against nt
 * experts on one thread each (bench/gemm_split.sh, 2 threads: 0.92 at
 * d 128, F 512, 512 rows; 0.96 at d 256, F 1024, 1024 rows). */
#define MOE_EXPERT_INSIDE_EFF 0.92

typedef struct {
    const expert_args *s;
    const int *order; /* experts to share out, largest first */
    int n;
    atomic_int next;  /* the next entry of order to take */
    int backward;
} expert_pool;

static void pool_run(void *ctx, int t, int nt)
{
    (void)t, (void)nt;
    expert_pool *pl = ctx;
    /* Dynamic: a thread slowed down (say by another process on its core)
     * takes fewer experts; which thread runs an expert does not change its bits. */
    for (int i; (i = atomic_fetch_add_explicit(&pl->next, 1, memory_order_relaxed)) < pl->n;) {
        if (pl->backward) expert_backward_one(pl->s, pl->order[i], 0);
        else expert_forward_one(pl->s, pl->order[i], 0);
    }
}

static int cmp_u64(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Longest-processing-time makespan of rows[0..n) (descending) on nt threads. */
static double lpt_makespan(const int *order, const int *off, int n, int nt)
{
    double load[MOE_PAR_MAX_THREADS] = {0};
    for (int i = 0; i < n; i++) {
        int best = 0;
        for (int t = 1; t < nt; t++)
            if (load[t] < load[best]) best = t;
        load[best] += off[order[i] + 1] - off[order[i]];
    }
    double m = 0;
    for (int t = 0; t < nt; t++) m = load[t] > m ? load[t] : m;
    return m;
}

/* Runs every non-empty expert of s forward or backward over the threads. */
static void expert_run(const expert_args *s, int E, int backward)
{
    const int nt = moe_par_threads();
    uint64_t *key = nt > 1 && E > 1 ? malloc(sizeof(uint64_t) * (size_t)E) : NULL;
    int *order = key ? malloc(sizeof(int) * (size_t)E) : NULL;
    if (!order) { /* one thread, one expert, or no scratch: one expert at a time */
        free(key);
        for (int e = 0; e < E; e++) backward ? expert_backward_one(s, e, 1) : expert_forward_one(s, e, 1);
        return;
    }
    /* non-empty experts, most rows first, ties in expert order */
    int n = 0;
    for (int e = 0; e < E; e++) {
        const int rows = s->offsets[e + 1] - s->offsets[e];
        if (rows > 0) key[n++] = (uint64_t)(INT32_MAX - rows) << 32 | (uint32_t)e;
    }
    qsort(key, (size_t)n, sizeof *key, cmp_u64);
    for (int i = 0; i < n; i++) order[i] = (int)(key[i] & 0xffffffffu);
    free(key);
    /* The k largest alone over all threads, the rest shared out: the
     * estimated time (in rows) of each k up to 4 nt, the cheapest wins
     * (ties: fewer alone). */
    int big = 0;
    double alone = 0, best = lpt_makespan(order, s->offsets, n, nt);
    for (int k = 1; k <= n && k <= 4 * nt; k++) {
        alone += s->offsets[order[k - 1] + 1] - s->offsets[order[k - 1]];
        const double cost = alone / (nt * MOE_EXPERT_INSIDE_EFF) + lpt_makespan(order + k, s->offsets, n - k, nt);
        if (cost < best) best = cost, big = k;
    }
    for (int i = 0; i < big; i++)
        backward ? expert_backward_one(s, order[i], 1) : expert_forward_one(s, order[i], 1);
    if (n > big) {
        expert_pool pl = {.s = s, .order = order + big, .n = n - big, .backward = backward};
        atomic_init(&pl.next, 0);
        moe_par_run(n - big < nt ? n - big : nt, pool_run, &pl);
    }
    free(order);
}

void moe_expert_forward(float *y, float *h, float *a, const float *x, const int *offsets,
                        const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const expert_args s = {.y = y, .h = h, .a = a, .x = x, .offsets = offsets, .p = p, .d = d, .F = F, .act = act};
    expert_run(&s, E, 0);
}

void moe_expert_backward(float *dx, moe_expert_params *g, float *dh, float *da, const float *dy,
                         const float *x, const float *h, const float *a, const int *offsets,
                         const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const expert_args s = {.dx = dx, .dh = dh, .da = da, .g = g, .x = x, .dy = dy, .hin = h,
                           .ain = a, .offsets = offsets, .p = p, .d = d, .F = F, .act = act};
    expert_run(&s, E, 1);
}

double moe_expert_flops(const int *offsets, int E, int d, int F, moe_activation act)
{
    const double N = (double)offsets[E] - (double)offsets[0];
    const double fwd = 2.0 * N * d * moe_f1(F, act) + 2.0 * N * F * d;
    return 3.0 * fwd; /* backward: two GEMMs per forward GEMM */
}
