/* Experts: fast path against the naive _ref (every activation, uneven
 * offsets with empty first/middle/last experts, 1-3 threads with an expert
 * too big to share out), the same bits at 1-3 threads when the experts are
 * shared out, both paths against finite differences (double-precision loss
 * for _ref, float for the fast path), untouched gradients of empty experts,
 * accumulation, activation accuracy. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <cblas.h>

#include "core/moe.h"
#include "core/rng.h"
#include "experts/experts.h"

static const moe_activation acts[] = {MOE_ACT_GELU, MOE_ACT_RELU, MOE_ACT_SWIGLU};
enum { N_ACTS = 3 };

typedef void (*forward_fn)(float *, float *, float *, const float *, const int *, const moe_expert_params *,
                           int, int, int, moe_activation);
typedef void (*backward_fn)(float *, moe_expert_params *, float *, float *, const float *, const float *,
                            const float *, const float *, const int *, const moe_expert_params *, int, int,
                            int, moe_activation);

/* One problem: sizes, packed inputs, parameters and forward/backward buffers. */
typedef struct {
    int E, d, F, F1, N;
    moe_activation act;
    int offsets[16];      /* (E+1) */
    moe_expert_params p;  /* parameters */
    moe_expert_params g;  /* gradients */
    float *x, *dy;        /* (N, d) */
    float *y, *dx;        /* (N, d) */
    float *h, *dh;        /* (N, F1) */
    float *a, *da;        /* (N, F) */
} problem;

static size_t n_w1(const problem *P) { return (size_t)P->E * P->F1 * P->d; }
static size_t n_b1(const problem *P) { return (size_t)P->E * P->F1; }
static size_t n_w2(const problem *P) { return (size_t)P->E * P->d * P->F; }
static size_t n_b2(const problem *P) { return (size_t)P->E * P->d; }

static float *fill_normal(size_t n, uint32_t id, float scale)
{
    float *v = moe_calloc(n, sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++) v[i] = scale * (float)moe_rng_normal(11, MOE_RNG_BENCH, (uint32_t)i, 0, id, 0);
    return v;
}

static float *zeros(size_t n)
{
    float *v = moe_calloc(n, sizeof *v);
    assert_non_null(v);
    return v;
}

/* counts (E) rows per expert; seed varies the draws. */
static void problem_init(problem *P, const int *counts, int E, int d, int F, moe_activation act, uint32_t seed)
{
    memset(P, 0, sizeof *P);
    P->E = E, P->d = d, P->F = F, P->F1 = moe_f1(F, act), P->act = act;
    for (int e = 0; e < E; e++) P->offsets[e + 1] = P->offsets[e] + counts[e];
    P->N = P->offsets[E];
    const uint32_t id = seed * 16;
    P->p.w1 = fill_normal(n_w1(P), id + 0, 1.0f / sqrtf((float)d));
    P->p.b1 = fill_normal(n_b1(P), id + 1, 0.3f);
    P->p.w2 = fill_normal(n_w2(P), id + 2, 1.0f / sqrtf((float)F));
    P->p.b2 = fill_normal(n_b2(P), id + 3, 0.3f);
    P->g.w1 = zeros(n_w1(P)), P->g.b1 = zeros(n_b1(P)), P->g.w2 = zeros(n_w2(P)), P->g.b2 = zeros(n_b2(P));
    P->x = fill_normal((size_t)P->N * d, id + 4, 1.0f);
    P->dy = fill_normal((size_t)P->N * d, id + 5, 1.0f);
    P->y = zeros((size_t)P->N * d), P->dx = zeros((size_t)P->N * d);
    P->h = zeros((size_t)P->N * P->F1), P->dh = zeros((size_t)P->N * P->F1);
    P->a = zeros((size_t)P->N * F), P->da = zeros((size_t)P->N * F);
    if (act == MOE_ACT_RELU) {
        /* Keep every pre-activation away from the kink, so finite
         * differences are valid: biases +-2 dominate small weights, and the
         * dead half of the units makes the mask matter. */
        for (size_t i = 0; i < n_w1(P); i++) P->p.w1[i] *= 0.1f;
        for (size_t i = 0; i < n_b1(P); i++) P->p.b1[i] = P->p.b1[i] >= 0.0f ? 2.0f : -2.0f;
    }
}

static void problem_free(problem *P)
{
    float *bufs[] = {P->p.w1, P->p.b1, P->p.w2, P->p.b2, P->g.w1, P->g.b1, P->g.w2, P->g.b2, P->x,
                     P->dy, P->y, P->dx, P->h, P->dh, P->a, P->da};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) moe_free(bufs[i]);
}

static void forward(const problem *P, forward_fn f)
{
    f(P->y, P->h, P->a, P->x, P->offsets, &P->p, P->E, P->d, P->F, P->act);
}

static void backward(problem *P, backward_fn b)
{
    b(P->dx, &P->g, P->dh, P->da, P->dy, P->x, P->h, P->a, P->offsets, &P->p, P->E, P->d, P->F, P->act);
}

/* max |got - want| <= tol * max |want| (tol relative to the array's scale). */
static void assert_close(const float *got, const float *want, size_t n, double tol, const char *what)
{
    double err = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        err = fmax(err, fabs((double)got[i] - want[i]));
        scale = fmax(scale, fabs((double)want[i]));
    }
    if (!(err <= tol * scale)) fail_msg("%s: max error %.3g exceeds %.3g x scale %.3g", what, err, tol, scale);
}

/* ---- fast vs ref ---- */

static void fast_vs_ref(const int *counts, int E, int d, int F, moe_activation act)
{
    problem A, B;
    problem_init(&A, counts, E, d, F, act, 1);
    problem_init(&B, counts, E, d, F, act, 1);
    forward(&A, moe_expert_forward);
    forward(&B, moe_expert_forward_ref);
    const double tol = 1e-5;
    assert_close(A.h, B.h, (size_t)A.N * A.F1, tol, "h");
    assert_close(A.a, B.a, (size_t)A.N * F, tol, "a");
    assert_close(A.y, B.y, (size_t)A.N * d, tol, "y");
    /* Non-zero starting gradients and garbage dx: backward accumulates into
     * the former and overwrites the latter. */
    const float *g0[] = {A.p.w2, A.p.b2, A.p.w1, A.p.b1};
    float *ga[] = {A.g.w2, A.g.b2, A.g.w1, A.g.b1}, *gb[] = {B.g.w2, B.g.b2, B.g.w1, B.g.b1};
    const size_t ng[] = {n_w2(&A), n_b2(&A), n_w1(&A), n_b1(&A)};
    const char *names[] = {"dw2", "db2", "dw1", "db1"};
    for (int t = 0; t < 4; t++) {
        memcpy(ga[t], g0[t], ng[t] * sizeof(float));
        memcpy(gb[t], g0[t], ng[t] * sizeof(float));
    }
    for (int i = 0; i < A.N * d; i++) A.dx[i] = B.dx[i] = NAN;
    backward(&A, moe_expert_backward);
    backward(&B, moe_expert_backward_ref);
    assert_close(A.dx, B.dx, (size_t)A.N * d, tol, "dx");
    for (int t = 0; t < 4; t++) {
        /* compare the increments, so the starting values cannot hide errors */
        float *inc_a = zeros(ng[t]), *inc_b = zeros(ng[t]);
        for (size_t i = 0; i < ng[t]; i++) inc_a[i] = ga[t][i] - g0[t][i], inc_b[i] = gb[t][i] - g0[t][i];
        assert_close(inc_a, inc_b, ng[t], 1e-5, names[t]);
        moe_free(inc_a), moe_free(inc_b);
    }
    problem_free(&A), problem_free(&B);
}

static void test_fast_vs_ref(void **state)
{
    (void)state;
    static const int c1[] = {13};
    static const int c3_first[] = {0, 17, 23};
    static const int c3_mid[] = {9, 0, 21};
    static const int c8[] = {5, 0, 25, 1, 29, 0, 37, 0}; /* empty middle and last */
    for (int i = 0; i < N_ACTS; i++) {
        fast_vs_ref(c1, 1, 8, 16, acts[i]);
        fast_vs_ref(c3_first, 3, 13, 21, acts[i]); /* sizes off the vector width */
        fast_vs_ref(c3_mid, 3, 12, 20, acts[i]);
        fast_vs_ref(c8, 8, 32, 48, acts[i]);
    }
}

/* Large enough that the activation passes are split over threads
 * (rows x F1 >= 2^17 per expert), at 1, 2 and 3 BLAS threads. */
static void test_fast_vs_ref_threaded(void **state)
{
    (void)state;
    static const int big[] = {700, 0, 513};
    const int saved = openblas_get_num_threads();
    for (int nt = 1; nt <= 3; nt++) {
        openblas_set_num_threads(nt);
        for (int i = 0; i < N_ACTS; i++) fast_vs_ref(big, 3, 16, 256, acts[i]);
    }
    openblas_set_num_threads(saved);
}

/* Balanced experts are shared out over the threads, each expert's GEMMs on
 * one thread and its passes (activation, b1 and b2 gradients) on the same
 * thread: every output is bitwise the same at 1, 2 and 3 threads. 12 equal
 * experts split evenly over 2 and 3 threads, so none runs alone. */
static void test_threads_bitwise(void **state)
{
    (void)state;
    int counts[12];
    for (int e = 0; e < 12; e++) counts[e] = 256;
    const int saved = openblas_get_num_threads();
    for (int i = 0; i < N_ACTS; i++) {
        problem A[3];
        for (int nt = 1; nt <= 3; nt++) {
            problem *P = &A[nt - 1];
            problem_init(P, counts, 12, 128, 512, acts[i], 3);
            openblas_set_num_threads(nt);
            forward(P, moe_expert_forward);
            backward(P, moe_expert_backward);
        }
        openblas_set_num_threads(saved);
        for (int k = 1; k < 3; k++) {
            const problem *P = &A[0], *Q = &A[k];
            assert_memory_equal(P->y, Q->y, sizeof(float) * (size_t)P->N * P->d);
            assert_memory_equal(P->h, Q->h, sizeof(float) * (size_t)P->N * P->F1);
            assert_memory_equal(P->a, Q->a, sizeof(float) * (size_t)P->N * P->F);
            assert_memory_equal(P->dx, Q->dx, sizeof(float) * (size_t)P->N * P->d);
            assert_memory_equal(P->g.w1, Q->g.w1, sizeof(float) * n_w1(P));
            assert_memory_equal(P->g.b1, Q->g.b1, sizeof(float) * n_b1(P));
            assert_memory_equal(P->g.w2, Q->g.w2, sizeof(float) * n_w2(P));
            assert_memory_equal(P->g.b2, Q->g.b2, sizeof(float) * n_b2(P));
        }
        for (int k = 0; k < 3; k++) problem_free(&A[k]);
    }
}

/* In place (dx over dy, dh over h, da over a: what the MoE layer does to
 * save memory) gives bitwise the result of separate buffers. */
static void in_place_case(const int *counts, int E, int d, int F, moe_activation act)
{
    problem A, B;
    problem_init(&A, counts, E, d, F, act, 2);
    problem_init(&B, counts, E, d, F, act, 2);
    forward(&A, moe_expert_forward);
    forward(&B, moe_expert_forward);
    backward(&A, moe_expert_backward);
    moe_expert_backward(B.dy, &B.g, B.h, B.a, B.dy, B.x, B.h, B.a, B.offsets, &B.p, B.E, B.d, B.F, B.act);
    assert_memory_equal(A.dx, B.dy, sizeof(float) * (size_t)A.N * d);
    assert_memory_equal(A.g.w1, B.g.w1, sizeof(float) * n_w1(&A));
    assert_memory_equal(A.g.b1, B.g.b1, sizeof(float) * n_b1(&A));
    assert_memory_equal(A.g.w2, B.g.w2, sizeof(float) * n_w2(&A));
    assert_memory_equal(A.g.b2, B.g.b2, sizeof(float) * n_b2(&A));
    problem_free(&A), problem_free(&B);
}

static void test_in_place(void **state)
{
    (void)state;
    static const int c8[] = {5, 0, 25, 1, 29, 0, 37, 0};
    static const int big[] = {700, 0, 513};
    const int saved = openblas_get_num_threads();
    for (int i = 0; i < N_ACTS; i++) {
        in_place_case(c8, 8, 32, 48, acts[i]);
        openblas_set_num_threads(2);
        in_place_case(big, 3, 16, 256, acts[i]);
        openblas_set_num_threads(saved);
    }
}

/* ---- finite differences ---- */

/* Double-precision loss L = sum R * y with its own forward, independent of
 * both implementations. Parameters and x as double copies. */
typedef struct {
    double *w1, *b1, *w2, *b2, *x;
} dparams;

static double act_d(double u, double v, moe_activation act)
{
    switch (act) {
    case MOE_ACT_GELU: return 0.5 * u * (1.0 + tanh(sqrt(2.0 / M_PI) * (u + 0.044715 * u * u * u)));
    case MOE_ACT_RELU: return u > 0.0 ? u : 0.0;
    case MOE_ACT_SWIGLU: return u / (1.0 + exp(-u)) * v;
    }
    return 0.0;
}

static double loss_double(const problem *P, const dparams *q, const float *R)
{
    const int d = P->d, F = P->F, F1 = P->F1;
    double L = 0.0, hrow[64];
    assert_true(F1 <= 64);
    for (int e = 0; e < P->E; e++)
        for (int r = P->offsets[e]; r < P->offsets[e + 1]; r++) {
            for (int f = 0; f < F1; f++) {
                hrow[f] = q->b1[e * F1 + f];
                for (int k = 0; k < d; k++) hrow[f] += q->x[r * d + k] * q->w1[((size_t)e * F1 + f) * d + k];
            }
            for (int j = 0; j < d; j++) {
                double y = q->b2[e * d + j];
                for (int f = 0; f < F; f++)
                    y += act_d(hrow[f], P->act == MOE_ACT_SWIGLU ? hrow[F + f] : 0.0, P->act) *
                         q->w2[((size_t)e * d + j) * F + f];
                L += R[r * d + j] * y;
            }
        }
    return L;
}

/* L = sum R * y evaluated by a float forward (accumulated in double). */
static double loss_float(const problem *P, forward_fn f)
{
    forward(P, f);
    double L = 0.0;
    for (int i = 0; i < P->N * P->d; i++) L += (double)P->dy[i] * P->y[i];
    return L;
}

static double *to_double(const float *v, size_t n)
{
    double *o = moe_calloc(n, sizeof *o);
    assert_non_null(o);
    for (size_t i = 0; i < n; i++) o[i] = v[i];
    return o;
}

/* Checks the gradients left by `b` (run here from zero, with R = dy)
 * against central differences of L = sum R * y over every entry of x, w1, b1,
 * w2, b2. in_double: L from loss_double on double copies (eps 1e-6, error
 * ~1e-9); else L from the fast float forward (the step is the representable
 * difference actually applied). */
static void check_fd(problem *P, backward_fn b, int in_double, double eps, double tol)
{
    forward(P, in_double ? moe_expert_forward_ref : moe_expert_forward);
    if (P->act == MOE_ACT_RELU) { /* every unit far enough from the kink for the step */
        double min_abs = INFINITY;
        for (int i = 0; i < P->N * P->F; i++) min_abs = fmin(min_abs, fabs(P->h[i]));
        assert_true(min_abs > 0.1);
    }
    backward(P, b);
    float *vals[] = {P->x, P->p.w1, P->p.b1, P->p.w2, P->p.b2};
    const float *grads[] = {P->dx, P->g.w1, P->g.b1, P->g.w2, P->g.b2};
    const size_t n[] = {(size_t)P->N * P->d, n_w1(P), n_b1(P), n_w2(P), n_b2(P)};
    const char *names[] = {"dx", "dw1", "db1", "dw2", "db2"};
    dparams q = {to_double(P->p.w1, n[1]), to_double(P->p.b1, n[2]), to_double(P->p.w2, n[3]),
                 to_double(P->p.b2, n[4]), to_double(P->x, n[0])};
    double *dvals[] = {q.x, q.w1, q.b1, q.w2, q.b2};
    for (int t = 0; t < 5; t++) {
        float *fd = zeros(n[t]);
        for (size_t i = 0; i < n[t]; i++) {
            if (in_double) {
                const double v = dvals[t][i];
                dvals[t][i] = v + eps;
                const double lp = loss_double(P, &q, P->dy);
                dvals[t][i] = v - eps;
                const double lm = loss_double(P, &q, P->dy);
                dvals[t][i] = v;
                fd[i] = (float)((lp - lm) / (2.0 * eps));
            } else {
                const float v = vals[t][i], vp = (float)(v + eps), vm = (float)(v - eps);
                vals[t][i] = vp;
                const double lp = loss_float(P, moe_expert_forward);
                vals[t][i] = vm;
                const double lm = loss_float(P, moe_expert_forward);
                vals[t][i] = v;
                fd[i] = (float)((lp - lm) / ((double)vp - vm));
            }
        }
        assert_close(grads[t], fd, n[t], tol, names[t]);
        moe_free(fd);
    }
    for (int t = 0; t < 5; t++) moe_free(dvals[t]);
}

static const int fd_counts[] = {4, 0, 5};

static void test_fd_ref_double(void **state)
{
    (void)state;
    for (int i = 0; i < N_ACTS; i++) {
        problem P;
        problem_init(&P, fd_counts, 3, 5, 4, acts[i], 2);
        check_fd(&P, moe_expert_backward_ref, 1, 1e-6, 1e-5);
        problem_free(&P);
    }
}

static void test_fd_fast_float(void **state)
{
    (void)state;
    for (int i = 0; i < N_ACTS; i++) {
        problem P;
        problem_init(&P, fd_counts, 3, 5, 4, acts[i], 3);
        check_fd(&P, moe_expert_backward, 0, 1e-2, 2e-3);
        problem_free(&P);
    }
}

/* ---- empty experts, accumulation ---- */

/* A pattern that any write would disturb, -0.0 included (-0 + 0 = +0). */
static void fill_sentinel(float *v, size_t n)
{
    for (size_t i = 0; i < n; i++) v[i] = i % 3 == 0 ? -0.0f : 0.25f * (float)i - 7.0f;
}

static void test_empty_expert_untouched(void **state)
{
    (void)state;
    static const int counts[] = {0, 7, 0, 6, 0}; /* empty first, middle, last */
    const backward_fn bwd[] = {moe_expert_backward, moe_expert_backward_ref};
    const forward_fn fwd[] = {moe_expert_forward, moe_expert_forward_ref};
    for (int i = 0; i < N_ACTS; i++)
        for (int path = 0; path < 2; path++) {
            problem P;
            problem_init(&P, counts, 5, 6, 10, acts[i], 4);
            forward(&P, fwd[path]);
            float *g[] = {P.g.w1, P.g.b1, P.g.w2, P.g.b2};
            const size_t per[] = {(size_t)P.F1 * P.d, (size_t)P.F1, (size_t)P.d * P.F, (size_t)P.d};
            for (int t = 0; t < 4; t++) fill_sentinel(g[t], per[t] * P.E);
            backward(&P, bwd[path]);
            float *ref = zeros(per[0] * P.E);
            for (int t = 0; t < 4; t++) {
                fill_sentinel(ref, per[t] * P.E);
                for (int e = 0; e < P.E; e++) {
                    const int same = memcmp(g[t] + e * per[t], ref + e * per[t], per[t] * sizeof(float)) == 0;
                    if (same != (counts[e] == 0))
                        fail_msg("%s path %d tensor %d expert %d: %s", moe_activation_str(acts[i]), path, t, e,
                                 same ? "gradient of an active expert unchanged" : "empty expert's gradient changed");
                }
            }
            moe_free(ref);
            problem_free(&P);
        }
}

static void test_backward_accumulates(void **state)
{
    (void)state;
    static const int counts[] = {6, 0, 9};
    const backward_fn bwd[] = {moe_expert_backward, moe_expert_backward_ref};
    const forward_fn fwd[] = {moe_expert_forward, moe_expert_forward_ref};
    for (int i = 0; i < N_ACTS; i++)
        for (int path = 0; path < 2; path++) {
            problem P;
            problem_init(&P, counts, 3, 7, 9, acts[i], 5);
            forward(&P, fwd[path]);
            float *g[] = {P.g.w1, P.g.b1, P.g.w2, P.g.b2};
            const size_t n[] = {n_w1(&P), n_b1(&P), n_w2(&P), n_b2(&P)};
            float *g0[4], *g1[4];
            for (int t = 0; t < 4; t++) {
                g0[t] = fill_normal(n[t], 100 + t, 1.0f);
                memcpy(g[t], g0[t], n[t] * sizeof(float));
            }
            backward(&P, bwd[path]);
            float *dx1 = zeros((size_t)P.N * P.d);
            memcpy(dx1, P.dx, (size_t)P.N * P.d * sizeof(float));
            for (int t = 0; t < 4; t++) {
                g1[t] = zeros(n[t]);
                memcpy(g1[t], g[t], n[t] * sizeof(float));
            }
            backward(&P, bwd[path]);
            /* dx is overwritten, not accumulated */
            assert_memory_equal(dx1, P.dx, (size_t)P.N * P.d * sizeof(float));
            for (int t = 0; t < 4; t++) {
                float *twice = zeros(n[t]), *once2 = zeros(n[t]);
                for (size_t j = 0; j < n[t]; j++) {
                    twice[j] = g[t][j] - g0[t][j];
                    once2[j] = 2.0f * (g1[t][j] - g0[t][j]);
                }
                assert_close(twice, once2, n[t], 1e-5, "accumulated gradient");
                moe_free(twice), moe_free(once2), moe_free(g0[t]), moe_free(g1[t]);
            }
            moe_free(dx1);
            problem_free(&P);
        }
}

/* ---- activations and flops ---- */

/* Fast activations against the double reference over a dense sweep of
 * [-12, 12]: |fast - ref| <= 1e-6 max(1, |ref|) for every element. */
static void test_activation_accuracy(void **state)
{
    (void)state;
    const long n = 7;
    const int F = 1001; /* odd: exercises the vector remainder */
    for (int i = 0; i < N_ACTS; i++) {
        const moe_activation act = acts[i];
        const int F1 = moe_f1(F, act);
        float *h = fill_normal((size_t)n * F1, 200, 1.0f), *da = fill_normal((size_t)n * F, 201, 1.0f);
        for (long r = 0; r < n; r++)
            for (int j = 0; j < F; j++) h[r * F1 + j] = -12.0f + 24.0f * (float)(r * F + j) / (float)(n * F - 1);
        float *a = zeros((size_t)n * F), *ar = zeros((size_t)n * F);
        float *dh = zeros((size_t)n * F1), *dhr = zeros((size_t)n * F1);
        moe_act_forward(a, h, n, F, act);
        moe_act_forward_ref(ar, h, n, F, act);
        moe_act_backward(dh, da, h, n, F, act);
        moe_act_backward_ref(dhr, da, h, n, F, act);
        for (long j = 0; j < n * F; j++)
            if (!(fabsf(a[j] - ar[j]) <= 1e-6f * fmaxf(1.0f, fabsf(ar[j]))))
                fail_msg("%s forward at h=%g: %.9g vs %.9g", moe_activation_str(act), h[j], a[j], ar[j]);
        for (long j = 0; j < n * F1; j++)
            if (!(fabsf(dh[j] - dhr[j]) <= 1e-6f * fmaxf(1.0f, fabsf(dhr[j]))))
                fail_msg("%s backward at %ld: %.9g vs %.9g", moe_activation_str(act), j, dh[j], dhr[j]);
        moe_free(h), moe_free(da), moe_free(a), moe_free(ar), moe_free(dh), moe_free(dhr);
    }
}

static void test_flops(void **state)
{
    (void)state;
    const int offsets[] = {0, 3, 3, 10}; /* N = 10 */
    /* forward 2 N d F1 + 2 N F d, backward twice that */
    assert_true(moe_expert_flops(offsets, 3, 4, 5, MOE_ACT_GELU) == 3.0 * (2 * 10 * 4 * 5 + 2 * 10 * 5 * 4));
    assert_true(moe_expert_flops(offsets, 3, 4, 5, MOE_ACT_SWIGLU) == 3.0 * (2 * 10 * 4 * 10 + 2 * 10 * 5 * 4));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fast_vs_ref),
        cmocka_unit_test(test_fast_vs_ref_threaded),
        cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_in_place),
        cmocka_unit_test(test_fd_ref_double),
        cmocka_unit_test(test_fd_fast_float),
        cmocka_unit_test(test_empty_expert_untouched),
        cmocka_unit_test(test_backward_accumulates),
        cmocka_unit_test(test_activation_accuracy),
        cmocka_unit_test(test_flops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
