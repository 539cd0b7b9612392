/* Vocabulary head: every kernel against its _ref (router, expert forward,
 * backward and log-probabilities on grouped rows, a sub-range of local
 * experts as an expert-parallel rank holds them), the whole head against
 * the by-token-id references, finite differences (double through the _ref,
 * float through the fast path), exactly untouched gradients of experts no
 * position targets, the top-K distribution (K = M is the exact model, the
 * model sums to 1, -log P(y) is the factorised loss), coverage, bitwise
 * independence of the thread count, bad input. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cblas.h>

#include "core/moe.h"
#include "core/rng.h"
#include "vocab/head.h"

#define assert_detail_has(s)                                                                                   \
    do {                                                                                                       \
        if (!strstr(moe_error_detail(), (s))) fail_msg("detail '%s' lacks '%s'", moe_error_detail(), (s));    \
    } while (0)

static float normal(uint32_t i, uint32_t j, uint32_t id)
{
    return (float)moe_rng_normal(5, MOE_RNG_BENCH, i, j, id, 0);
}

static double unif(uint32_t i, uint32_t j, uint32_t id)
{
    return moe_rng_uniform(5, MOE_RNG_BENCH, i, j, id, 0);
}

/* One problem: a partition, parameters by token id and expert-major, inputs. */
typedef struct {
    int V, d, M, N;
    int32_t *assign;   /* (V) */
    moe_vocab_part *p;
    float *block_id;   /* parameters, rows by token id */
    moe_vocab_params id;
    float *block_em;   /* the same, expert-major */
    moe_vocab_params em;
    float *h;          /* (N, d) */
    int32_t *targets;  /* (N) */
    int idle;          /* an expert no target falls in (-1: none) */
} problem;

static void *xcalloc(size_t n, size_t s)
{
    void *p = moe_calloc(n, s);
    assert_non_null(p);
    return p;
}

/* skew > 0 puts about half the tokens into expert 0 and half the targets on
 * its tokens (tiles of many rows and many tokens). */
static void problem_init(problem *P, int V, int d, int M, int N, int idle, int skew, uint32_t seed)
{
    memset(P, 0, sizeof *P);
    P->V = V, P->d = d, P->M = M, P->N = N, P->idle = idle;
    P->assign = xcalloc((size_t)V, sizeof *P->assign);
    for (int v = 0; v < V; v++) {
        const double u = unif((uint32_t)v, seed, 1);
        P->assign[v] = v < M ? v : skew && u < 0.5 ? 0 : (int)(M * u * u) % M; /* uneven sizes */
    }
    assert_int_equal(moe_vocab_part_create(&P->p, P->assign, V, M), MOE_OK);
    const size_t n = moe_vocab_params_numel(V, d, M);
    P->block_id = xcalloc(n, sizeof(float));
    P->block_em = xcalloc(n, sizeof(float));
    moe_vocab_params_point(&P->id, P->block_id, V, d, M);
    moe_vocab_params_point(&P->em, P->block_em, V, d, M);
    for (int i = 0; i < M * d; i++) P->id.router_w[i] = 0.4f * normal((uint32_t)i, seed, 2);
    for (int i = 0; i < M; i++) P->id.router_b[i] = 0.5f * normal((uint32_t)i, seed, 3);
    for (size_t i = 0; i < (size_t)V * d; i++) P->id.w[i] = 2.0f / sqrtf((float)d) * normal((uint32_t)i, seed, 4);
    for (int i = 0; i < V; i++) P->id.b[i] = 0.5f * normal((uint32_t)i, seed, 5);
    memcpy(P->em.router_w, P->id.router_w, (size_t)M * d * sizeof(float));
    memcpy(P->em.router_b, P->id.router_b, (size_t)M * sizeof(float));
    moe_vocab_rows_gather(P->em.w, P->id.w, P->p, d);
    moe_vocab_rows_gather(P->em.b, P->id.b, P->p, 1);
    P->h = xcalloc((size_t)N * d, sizeof(float));
    for (size_t i = 0; i < (size_t)N * d; i++) P->h[i] = normal((uint32_t)i, seed, 6);
    P->targets = xcalloc((size_t)N, sizeof(int32_t));
    for (int n = 0; n < N; n++) {
        int v;
        uint32_t k = 0;
        do {
            const double u = unif((uint32_t)n, seed * 64 + k++, 7);
            v = skew && u < 0.5 ? moe_vocab_part_ids(P->p)[(int)(2 * u * moe_vocab_part_offsets(P->p)[1])]
                                : (int)(u * V);
        } while (P->assign[v] == idle);
        P->targets[n] = v;
    }
}

static void problem_free(problem *P)
{
    moe_vocab_part_destroy(P->p);
    moe_free(P->assign), moe_free(P->block_id), moe_free(P->block_em), moe_free(P->h), moe_free(P->targets);
}

/* max |a - b| / max(max |b|, floor) */
static double rel_err(const float *a, const float *b, size_t n, double floor)
{
    double e = 0, m = floor;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return e / m;
}

#define assert_close(a, b, n, tol)                                                                             \
    do {                                                                                                       \
        const double e_ = rel_err((a), (b), (n), 1e-30);                                                       \
        if (!(e_ <= (tol))) fail_msg("%s vs %s: relative error %.3g > %.3g", #a, #b, e_, (double)(tol));       \
    } while (0)

/* ---- router ---- */

static void test_router_vs_ref(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 200, 20, 9, 131, -1, 0, 1);
    const int N = P.N, M = P.M, d = P.d;
    float *lg[2], *q[2], *lse[2], *dh[2], *dw[2], *db[2], *dl[2];
    int32_t *e = xcalloc((size_t)N, sizeof *e);
    assert_int_equal(moe_vocab_target_experts(e, P.targets, P.p, N), MOE_OK);
    for (int k = 0; k < 2; k++) {
        lg[k] = xcalloc((size_t)N * M, 4), q[k] = xcalloc((size_t)N * M, 4), lse[k] = xcalloc((size_t)N, 4);
        dh[k] = xcalloc((size_t)N * d, 4), dw[k] = xcalloc((size_t)M * d, 4), db[k] = xcalloc((size_t)M, 4);
        dl[k] = xcalloc((size_t)N * M, 4);
        for (int i = 0; i < N * d; i++) dh[k][i] = 0.5f; /* backward accumulates */
        for (int i = 0; i < M; i++) db[k][i] = -1.0f;
        (k ? moe_vocab_router_forward_ref : moe_vocab_router_forward)(lg[k], q[k], lse[k], P.h, P.em.router_w,
                                                                      P.em.router_b, N, d, M);
        (k ? moe_vocab_router_backward_ref : moe_vocab_router_backward)(dh[k], dw[k], db[k], dl[k], q[k], e, P.h,
                                                                        P.em.router_w, 0.37f, N, d, M);
    }
    assert_close(lg[0], lg[1], (size_t)N * M, 1e-5);
    assert_close(q[0], q[1], (size_t)N * M, 1e-5);
    assert_close(lse[0], lse[1], (size_t)N, 1e-5);
    assert_close(dl[0], dl[1], (size_t)N * M, 1e-5);
    assert_close(dh[0], dh[1], (size_t)N * d, 1e-5);
    assert_close(dw[0], dw[1], (size_t)M * d, 1e-5);
    assert_close(db[0], db[1], (size_t)M, 1e-5);
    /* in place: dlogits over q */
    memset(dh[0], 0, (size_t)N * d * 4), memset(dw[0], 0, (size_t)M * d * 4), memset(db[0], 0, (size_t)M * 4);
    moe_vocab_router_forward(lg[0], q[0], lse[0], P.h, P.em.router_w, P.em.router_b, N, d, M);
    moe_vocab_router_backward(dh[0], dw[0], db[0], q[0], q[0], e, P.h, P.em.router_w, 0.37f, N, d, M);
    assert_close(q[0], dl[1], (size_t)N * M, 1e-5);
    for (int k = 0; k < 2; k++) moe_free(lg[k]), moe_free(q[k]), moe_free(lse[k]), moe_free(dh[k]), moe_free(dw[k]),
        moe_free(db[k]), moe_free(dl[k]);
    moe_free(e);
    problem_free(&P);
}

/* ---- grouping ---- */

static void test_group(void **state)
{
    (void)state;
    const int32_t e[9] = {2, 0, 2, 4, 0, 2, 1, 4, 2};
    int32_t order[9], off[6];
    moe_vocab_group(order, off, e, 9, 5);
    const int32_t want_order[9] = {1, 4, 6, 0, 2, 5, 8, 3, 7}, want_off[6] = {0, 2, 3, 7, 7, 9};
    assert_memory_equal(order, want_order, sizeof order);
    assert_memory_equal(off, want_off, sizeof off);
    /* items of K = 2 choices: row i is h[order[i] / 2] */
    const float h[5 * 2] = {0, 1, 10, 11, 20, 21, 30, 31, 40, 41};
    const int32_t t[5] = {7, 8, 9, 10, 11};
    float x[9 * 2];
    int32_t y[9];
    moe_vocab_pack(x, y, h, t, order, 9, 2, 2);
    for (int i = 0; i < 9; i++) {
        assert_true(x[i * 2] == h[(order[i] / 2) * 2] && x[i * 2 + 1] == h[(order[i] / 2) * 2 + 1]);
        assert_int_equal(y[i], t[order[i] / 2]);
    }
    /* combine_dh adds the rows back in item order */
    float dh[5 * 2] = {0};
    moe_vocab_combine_dh(dh, x, 2, order, 9, 2, 2);
    for (int n = 0; n < 5; n++) {
        int c = 0; /* items n*2, n*2+1 present among the 9 */
        for (int i = 0; i < 9; i++) c += order[i] / 2 == n;
        assert_true(dh[n * 2] == c * h[n * 2]);
    }
}

/* ---- expert kernels on grouped rows ---- */

typedef struct {
    int32_t *expert, *order, *offsets, *y;
    float *x;
    int R;
} grouped;

/* Rows of the positions whose target lies in experts [m0, m1), grouped by
 * local expert, like the receive layout of an expert-parallel rank. */
static void group_range(grouped *g, const problem *P, int m0, int m1)
{
    const int N = P->N, M = P->M, d = P->d;
    g->expert = xcalloc((size_t)N, sizeof(int32_t));
    g->order = xcalloc((size_t)N, sizeof(int32_t));
    int32_t *all = xcalloc((size_t)M + 1, sizeof(int32_t));
    assert_int_equal(moe_vocab_target_experts(g->expert, P->targets, P->p, N), MOE_OK);
    moe_vocab_group(g->order, all, g->expert, N, M);
    g->offsets = xcalloc((size_t)(m1 - m0) + 1, sizeof(int32_t));
    for (int j = 0; j <= m1 - m0; j++) g->offsets[j] = all[m0 + j] - all[m0];
    g->R = g->offsets[m1 - m0];
    g->x = xcalloc((size_t)g->R * d + 1, sizeof(float));
    g->y = xcalloc((size_t)g->R + 1, sizeof(int32_t));
    moe_vocab_pack(g->x, g->y, P->h, P->targets, g->order + all[m0], g->R, 1, d);
    moe_free(all);
}

static void grouped_free(grouped *g)
{
    moe_free(g->expert), moe_free(g->order), moe_free(g->offsets), moe_free(g->y), moe_free(g->x);
}

static void check_experts(const problem *P, int m0, int m1)
{
    const int d = P->d;
    grouped g;
    group_range(&g, P, m0, m1);
    const int R = g.R, row0 = moe_vocab_part_offsets(P->p)[m0];
    const int nloc = moe_vocab_part_offsets(P->p)[m1] - row0;
    const int64_t S = moe_vocab_expert_scratch(g.offsets, P->p, m0, m1);
    const float *w = P->em.w + (size_t)row0 * d, *b = P->em.b + row0;
    float *loss[2], *pr[2], *dx[2], *dw[2], *db[2], *lp[2];
    for (int k = 0; k < 2; k++) {
        loss[k] = xcalloc((size_t)R + 1, 4), pr[k] = xcalloc((size_t)S + 1, 4), lp[k] = xcalloc((size_t)S + 1, 4);
        dx[k] = xcalloc((size_t)R * d + 1, 4), dw[k] = xcalloc((size_t)nloc * d, 4), db[k] = xcalloc((size_t)nloc, 4);
        for (int i = 0; i < nloc; i++) db[k][i] = 0.125f;
        memcpy(dx[k], g.x, (size_t)R * d * 4);
        assert_int_equal((k ? moe_vocab_expert_forward_ref : moe_vocab_expert_forward)(
                             loss[k], pr[k], g.x, g.y, g.offsets, w, b, P->p, m0, m1, d),
                         MOE_OK);
        /* dx over x (in place) in both */
        (k ? moe_vocab_expert_backward_ref : moe_vocab_expert_backward)(dx[k], dw[k], db[k], pr[k], dx[k], g.y,
                                                                        g.offsets, w, P->p, m0, m1, d, 0.5f);
        if (k) assert_int_equal(moe_vocab_expert_logprobs_ref(lp[k], g.x, g.offsets, w, b, P->p, m0, m1, d), MOE_OK);
        else moe_vocab_expert_logprobs(lp[k], g.x, g.offsets, w, b, P->p, m0, m1, d);
    }
    assert_close(loss[0], loss[1], (size_t)R, 1e-5);
    assert_close(pr[0], pr[1], (size_t)S, 1e-5); /* now dlogits */
    assert_close(lp[0], lp[1], (size_t)S, 1e-5);
    assert_close(dx[0], dx[1], (size_t)R * d, 1e-5);
    assert_close(dw[0], dw[1], (size_t)nloc * d, 1e-5);
    assert_close(db[0], db[1], (size_t)nloc, 1e-5);
    /* experts without rows: their gradient rows are exactly as they were */
    const int32_t *poff = moe_vocab_part_offsets(P->p);
    for (int j = 0; j < m1 - m0; j++) {
        if (g.offsets[j + 1] > g.offsets[j]) continue;
        for (int r = poff[m0 + j] - row0; r < poff[m0 + j + 1] - row0; r++) {
            assert_true(db[0][r] == 0.125f);
            for (int k = 0; k < d; k++) assert_true(dw[0][(size_t)r * d + k] == 0.0f);
        }
    }
    for (int k = 0; k < 2; k++)
        moe_free(loss[k]), moe_free(pr[k]), moe_free(dx[k]), moe_free(dw[k]), moe_free(db[k]), moe_free(lp[k]);
    grouped_free(&g);
}

static void test_experts_vs_ref(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 260, 20, 8, 97, 3, 0, 2);
    check_experts(&P, 0, 8); /* all experts, expert 3 without rows */
    check_experts(&P, 2, 6); /* a rank's share: experts 2..5 */
    check_experts(&P, 3, 4); /* one expert, no rows at all */
    problem_free(&P);
    /* a few rows per expert (decoding): the GEMV path of small tiles */
    problem_init(&P, 260, 20, 8, 11, -1, 0, 13);
    check_experts(&P, 0, 8);
    problem_free(&P);
    /* many rows and many tokens per expert: several tiles each way */
    problem_init(&P, 3000, 40, 6, 600, -1, 1, 3);
    assert_true(moe_vocab_part_max_size(P.p) > 1000);
    check_experts(&P, 0, 6);
    problem_free(&P);
}

static void test_expert_bad_row(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 100, 8, 4, 20, -1, 0, 4);
    grouped g;
    group_range(&g, &P, 1, 3);
    assert_true(g.R >= 2);
    g.y[1] = moe_vocab_part_ids(P.p)[0]; /* a token of expert 0 in expert 1's rows */
    float *loss = xcalloc((size_t)g.R, 4), *pr = xcalloc((size_t)moe_vocab_expert_scratch(g.offsets, P.p, 1, 3), 4);
    const int row0 = moe_vocab_part_offsets(P.p)[1];
    for (int k = 0; k < 2; k++) {
        assert_int_equal((k ? moe_vocab_expert_forward_ref : moe_vocab_expert_forward)(
                             loss, pr, g.x, g.y, g.offsets, P.em.w + (size_t)row0 * 8, P.em.b + row0, P.p, 1, 3, 8),
                         MOE_ERR_ARG);
        assert_detail_has("grouped row 1");
    }
    moe_free(loss), moe_free(pr);
    grouped_free(&g);
    problem_free(&P);
}

/* ---- the whole head against the by-id references ---- */

typedef struct {
    float *block;
    moe_vocab_params g;
} grads;

static void grads_init(grads *G, const problem *P, float fill)
{
    const size_t n = moe_vocab_params_numel(P->V, P->d, P->M);
    G->block = xcalloc(n, sizeof(float));
    for (size_t i = 0; i < n; i++) G->block[i] = fill;
    moe_vocab_params_point(&G->g, G->block, P->V, P->d, P->M);
}

static void test_head_vs_ref(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 300, 24, 7, 150, 3, 0, 6);
    const int N = P.N, d = P.d, V = P.V, M = P.M;
    moe_vocab_head *hd;
    assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
    float *loss = xcalloc((size_t)N, 4), *dh = xcalloc((size_t)N * d, 4), *dh_ref = xcalloc((size_t)N * d, 4);
    double *loss_ref = xcalloc((size_t)N, 8);
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
    const double mean = moe_vocab_loss_ref(loss_ref, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b,
                                           P.assign, N, d, V, M);
    double sum = 0, err = 0;
    for (int n = 0; n < N; n++) sum += loss[n], err = fmax(err, fabs(loss[n] - loss_ref[n]) / loss_ref[n]);
    assert_true(err < 2e-6);
    assert_true(fabs(sum / N - mean) < 1e-5 * mean);
    /* activated = rows per expert = targets per expert; the idle expert has none */
    const int32_t *act = moe_vocab_head_activated(hd);
    for (int m = 0; m < M; m++) {
        int c = 0;
        for (int n = 0; n < N; n++) c += P.assign[P.targets[n]] == m;
        assert_int_equal(act[m], c);
    }
    assert_int_equal(act[3], 0);
    /* backward with pre-filled gradients: they accumulate, the idle expert's rows stay bit for bit */
    grads G, R, Gid;
    grads_init(&G, &P, 0.25f);
    grads_init(&R, &P, 0.0f);
    grads_init(&Gid, &P, 0.0f);
    const float dloss = 1.0f / N;
    assert_int_equal(moe_vocab_head_backward(hd, dh, &G.g, P.h, &P.em, dloss), MOE_OK);
    assert_int_equal(moe_vocab_backward_ref(dh_ref, R.g.router_w, R.g.router_b, R.g.w, R.g.b, P.h, P.targets,
                                            P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d, V, M,
                                            dloss),
                     MOE_OK);
    const size_t total = moe_vocab_params_numel(V, d, M);
    for (size_t i = 0; i < total; i++) G.block[i] -= 0.25f; /* the accumulated part (exactly 0 where untouched) */
    memcpy(Gid.g.router_w, G.g.router_w, (size_t)(M * d + M) * 4);
    moe_vocab_rows_scatter(Gid.g.w, G.g.w, P.p, d);
    moe_vocab_rows_scatter(Gid.g.b, G.g.b, P.p, 1);
    assert_close(dh, dh_ref, (size_t)N * d, 2e-5);
    assert_close(Gid.g.router_w, R.g.router_w, (size_t)M * d, 2e-5);
    assert_close(Gid.g.router_b, R.g.router_b, (size_t)M, 2e-5);
    assert_close(Gid.g.w, R.g.w, (size_t)V * d, 2e-5);
    assert_close(Gid.g.b, R.g.b, (size_t)V, 2e-5);
    /* the idle expert: exactly the pre-filled value (so 0 after the subtraction) */
    for (int v = 0; v < V; v++) {
        if (P.assign[v] != 3) continue;
        assert_true(Gid.g.b[v] == 0.0f && R.g.b[v] == 0.0f);
        for (int k = 0; k < d; k++) assert_true(Gid.g.w[(size_t)v * d + k] == 0.0f);
    }
    /* zero-filled: the idle expert's gradient is exactly zero, bitwise */
    grads Z;
    grads_init(&Z, &P, 0.0f);
    memset(dh, 0, (size_t)N * d * 4);
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
    assert_int_equal(moe_vocab_head_backward(hd, dh, &Z.g, P.h, &P.em, dloss), MOE_OK);
    const int32_t *poff = moe_vocab_part_offsets(P.p);
    for (int r = poff[3]; r < poff[4]; r++) {
        assert_true(Z.g.b[r] == 0.0f);
        for (int k = 0; k < d; k++) assert_true(Z.g.w[(size_t)r * d + k] == 0.0f);
    }
    /* and a second backward without a forward is refused */
    assert_int_equal(moe_vocab_head_backward(hd, dh, &Z.g, P.h, &P.em, dloss), MOE_ERR_ARG);
    moe_free(G.block), moe_free(R.block), moe_free(Gid.block), moe_free(Z.block);
    moe_free(loss), moe_free(dh), moe_free(dh_ref), moe_free(loss_ref);
    moe_vocab_head_destroy(hd);
    problem_free(&P);
}

/* ---- finite differences ---- */

/* Entries to probe in a tensor of n elements. */
enum { PROBES = 12 };
static size_t probe(size_t n, int i, uint32_t id) { return (size_t)(unif((uint32_t)i, id, 40) * (double)n); }

/* Gradient of the mean loss through the double-precision _ref against
 * central differences of moe_vocab_loss_ref (the step is the exact float
 * difference of the perturbed value). */
static void test_fd_ref(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 120, 10, 5, 40, 2, 0, 7);
    const int N = P.N, d = P.d, V = P.V, M = P.M;
    grads R;
    grads_init(&R, &P, 0.0f);
    float *dh = xcalloc((size_t)N * d, 4);
    assert_int_equal(moe_vocab_backward_ref(dh, R.g.router_w, R.g.router_b, R.g.w, R.g.b, P.h, P.targets,
                                            P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d, V, M,
                                            1.0 / N),
                     MOE_OK);
    struct {
        float *x, *g;
        size_t n;
        const char *name;
    } t[] = {{P.h, dh, (size_t)N * d, "h"},
             {P.id.router_w, R.g.router_w, (size_t)M * d, "router_w"},
             {P.id.router_b, R.g.router_b, (size_t)M, "router_b"},
             {P.id.w, R.g.w, (size_t)V * d, "w"},
             {P.id.b, R.g.b, (size_t)V, "b"}};
    for (size_t k = 0; k < 5; k++) {
        double gmax = 0;
        for (size_t i = 0; i < t[k].n; i++) gmax = fmax(gmax, fabs(t[k].g[i]));
        for (int i = 0; i < PROBES; i++) {
            const size_t e = probe(t[k].n, i, (uint32_t)k);
            const float x0 = t[k].x[e];
            const float xp = x0 + 1e-3f, xm = x0 - 1e-3f;
            t[k].x[e] = xp;
            const double lp = moe_vocab_loss_ref(NULL, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b,
                                                 P.assign, N, d, V, M);
            t[k].x[e] = xm;
            const double lm = moe_vocab_loss_ref(NULL, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b,
                                                 P.assign, N, d, V, M);
            t[k].x[e] = x0;
            const double fd = (lp - lm) / ((double)xp - xm), g = t[k].g[e];
            if (!(fabs(fd - g) <= 1e-5 * gmax + 1e-4 * fabs(g)))
                fail_msg("%s[%zu]: analytic %.9g, finite difference %.9g", t[k].name, e, g, fd);
        }
    }
    /* a weight of the idle expert does not move the loss at all */
    for (int v = 0; v < V; v++)
        if (P.assign[v] == 2) {
            const double l0 = moe_vocab_loss_ref(NULL, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b,
                                                 P.assign, N, d, V, M);
            P.id.w[(size_t)v * d] += 1.0f;
            const double l1 = moe_vocab_loss_ref(NULL, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b,
                                                 P.assign, N, d, V, M);
            P.id.w[(size_t)v * d] -= 1.0f;
            assert_true(l0 == l1 && R.g.w[(size_t)v * d] == 0.0f);
            break;
        }
    moe_free(R.block), moe_free(dh);
    problem_free(&P);
}

/* The same through the fast float head: summed loss (dloss = 1), step 1e-2. */
static void test_fd_fast(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 120, 10, 5, 8, -1, 0, 8);
    const int N = P.N, d = P.d, V = P.V, M = P.M;
    moe_vocab_head *hd;
    assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
    float *loss = xcalloc((size_t)N, 4), *dh = xcalloc((size_t)N * d, 4);
    grads G;
    grads_init(&G, &P, 0.0f);
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
    assert_int_equal(moe_vocab_head_backward(hd, dh, &G.g, P.h, &P.em, 1.0f), MOE_OK);
    struct {
        float *x, *g;
        size_t n;
        const char *name;
    } t[] = {{P.h, dh, (size_t)N * d, "h"},
             {P.em.router_w, G.g.router_w, (size_t)M * d, "router_w"},
             {P.em.router_b, G.g.router_b, (size_t)M, "router_b"},
             {P.em.w, G.g.w, (size_t)V * d, "w"},
             {P.em.b, G.g.b, (size_t)V, "b"}};
    for (size_t k = 0; k < 5; k++) {
        double gmax = 0;
        for (size_t i = 0; i < t[k].n; i++) gmax = fmax(gmax, fabs(t[k].g[i]));
        for (int i = 0; i < PROBES; i++) {
            /* probe where the gradient is non-zero half the time (w, b are mostly idle rows) */
            size_t e = probe(t[k].n, i, 10 + (uint32_t)k);
            if (i % 2)
                for (size_t s = 0; s < t[k].n && t[k].g[e] == 0.0f; s++) e = (e + 1) % t[k].n;
            const float x0 = t[k].x[e], xp = x0 + 1e-2f, xm = x0 - 1e-2f;
            double l[2];
            for (int s = 0; s < 2; s++) {
                t[k].x[e] = s ? xm : xp;
                assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
                l[s] = 0;
                for (int n = 0; n < N; n++) l[s] += loss[n];
            }
            t[k].x[e] = x0;
            const double fd = (l[0] - l[1]) / ((double)xp - xm), g = t[k].g[e];
            if (!(fabs(fd - g) <= 2e-3 * gmax + 1e-2 * fabs(g)))
                fail_msg("%s[%zu]: analytic %.7g, finite difference %.7g", t[k].name, e, g, fd);
        }
    }
    moe_free(G.block), moe_free(loss), moe_free(dh);
    moe_vocab_head_destroy(hd);
    problem_free(&P);
}

/* ---- top-K distributions ---- */

typedef struct {
    int32_t *ids, *count;
    float *logp, *dense;
    int64_t stride;
} lists;

static void topk_lists(lists *L, moe_vocab_head *hd, const problem *P, int K)
{
    L->stride = moe_vocab_part_topk_size(P->p, K);
    L->ids = xcalloc((size_t)(P->N * L->stride), 4);
    L->logp = xcalloc((size_t)(P->N * L->stride), 4);
    L->count = xcalloc((size_t)P->N, 4);
    L->dense = xcalloc((size_t)P->N * P->V, 4);
    assert_int_equal(moe_vocab_head_topk(hd, L->ids, L->logp, L->count, L->stride, P->h, &P->em, P->N, K), MOE_OK);
    moe_vocab_topk_dense(L->dense, L->ids, L->logp, L->count, L->stride, P->N, P->V);
}

static void lists_free(lists *L) { moe_free(L->ids), moe_free(L->logp), moe_free(L->count), moe_free(L->dense); }

static void test_topk(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 400, 16, 8, 60, -1, 0, 9);
    const int N = P.N, d = P.d, V = P.V, M = P.M;
    moe_vocab_head *hd;
    assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
    double *exact = xcalloc((size_t)N * V, 8), *ref = xcalloc((size_t)N * V, 8), *loss = xcalloc((size_t)N, 8);
    assert_int_equal(moe_vocab_model_ref(exact, P.h, P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d,
                                         V, M),
                     MOE_OK);
    moe_vocab_loss_ref(loss, P.h, P.targets, P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d, V, M);
    for (int n = 0; n < N; n++) {
        double s = 0;
        for (int v = 0; v < V; v++) s += exact[(size_t)n * V + v];
        assert_true(fabs(s - 1) < 1e-12);                                           /* the model sums to 1 */
        assert_true(fabs(-log(exact[(size_t)n * V + P.targets[n]]) - loss[n]) < 1e-12 * (1 + loss[n])); /* = factorised loss */
    }
    for (int K = 1; K <= M; K++) {
        lists L;
        topk_lists(&L, hd, &P, K);
        assert_int_equal(moe_vocab_topk_ref(ref, P.h, P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d,
                                            V, M, K),
                         MOE_OK);
        double err = 0;
        for (int n = 0; n < N; n++) {
            int support = 0;
            double s = 0;
            for (int v = 0; v < V; v++) {
                const double r = K == M ? exact[(size_t)n * V + v] : ref[(size_t)n * V + v];
                err = fmax(err, fabs(L.dense[(size_t)n * V + v] - r));
                support += r > 0;
                s += L.dense[(size_t)n * V + v];
            }
            assert_int_equal(L.count[n], support); /* exactly the chosen experts' tokens */
            assert_true(fabs(s - 1) < 1e-5);
            for (int i = 1; i < L.count[n]; i++) assert_true(L.ids[n * L.stride + i - 1] < L.ids[n * L.stride + i]);
        }
        if (!(err < 2e-6)) fail_msg("K = %d: largest |P_K fast - P_K ref| = %.3g", K, err);
        lists_free(&L);
    }
    moe_free(exact), moe_free(ref), moe_free(loss);
    moe_vocab_head_destroy(hd);
    problem_free(&P);
}

static void test_coverage(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 400, 16, 8, 90, -1, 0, 10);
    const int N = P.N, d = P.d, V = P.V, M = P.M;
    moe_vocab_head *hd;
    assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
    float *loss = xcalloc((size_t)N, 4);
    double *ref = xcalloc((size_t)N * V, 8);
    int64_t prev = -1;
    for (int K = 1; K <= M; K++) {
        assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
        int64_t cov;
        assert_int_equal(moe_vocab_head_coverage(hd, K, &cov), MOE_OK);
        assert_int_equal(moe_vocab_topk_ref(ref, P.h, P.id.router_w, P.id.router_b, P.id.w, P.id.b, P.assign, N, d,
                                            V, M, K),
                         MOE_OK);
        int64_t want = 0;
        for (int n = 0; n < N; n++) want += ref[(size_t)n * V + P.targets[n]] > 0;
        assert_int_equal(cov, want);
        assert_true(cov >= prev);
        prev = cov;
    }
    assert_int_equal(prev, N);
    /* ties to the lower index, by hand: q = (.25, .25, .5): expert 1 is third */
    const float q[3] = {0.25f, 0.25f, 0.5f};
    const int32_t e0 = 0, e1 = 1;
    assert_int_equal(moe_vocab_coverage(q, &e0, 1, 3, 2), 1);
    assert_int_equal(moe_vocab_coverage(q, &e1, 1, 3, 2), 0);
    int64_t cov;
    assert_int_equal(moe_vocab_head_coverage(hd, 0, &cov), MOE_ERR_ARG);
    assert_int_equal(moe_vocab_head_coverage(hd, M + 1, &cov), MOE_ERR_ARG);
    moe_free(loss), moe_free(ref);
    moe_vocab_head_destroy(hd);
    problem_free(&P);
}

/* ---- threads: the same bits at 1, 2 and 3 threads ---- */

static void test_threads_bitwise(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 6000, 64, 12, 700, 5, 1, 11);
    const int N = P.N, d = P.d, V = P.V, M = P.M, K = 3;
    const int64_t stride = moe_vocab_part_topk_size(P.p, K);
    const size_t np = moe_vocab_params_numel(V, d, M);
    float *loss[3], *dh[3], *gb[3], *logp[3];
    int32_t *ids[3], *cnt[3];
    const int threads0 = openblas_get_num_threads();
    for (int t = 0; t < 3; t++) {
        openblas_set_num_threads(t + 1);
        moe_vocab_head *hd;
        assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
        loss[t] = xcalloc((size_t)N, 4), dh[t] = xcalloc((size_t)N * d, 4), gb[t] = xcalloc(np, 4);
        logp[t] = xcalloc((size_t)(N * stride), 4), ids[t] = xcalloc((size_t)(N * stride), 4);
        cnt[t] = xcalloc((size_t)N, 4);
        moe_vocab_params g;
        moe_vocab_params_point(&g, gb[t], V, d, M);
        assert_int_equal(moe_vocab_head_forward(hd, loss[t], P.h, P.targets, &P.em, N), MOE_OK);
        assert_int_equal(moe_vocab_head_backward(hd, dh[t], &g, P.h, &P.em, 1.0f / N), MOE_OK);
        assert_int_equal(moe_vocab_head_topk(hd, ids[t], logp[t], cnt[t], stride, P.h, &P.em, N, K), MOE_OK);
        moe_vocab_head_destroy(hd);
    }
    openblas_set_num_threads(threads0);
    for (int t = 1; t < 3; t++) {
        assert_memory_equal(loss[0], loss[t], (size_t)N * 4);
        assert_memory_equal(dh[0], dh[t], (size_t)N * d * 4);
        assert_memory_equal(gb[0], gb[t], np * 4);
        assert_memory_equal(cnt[0], cnt[t], (size_t)N * 4);
        assert_memory_equal(ids[0], ids[t], (size_t)(N * stride) * 4);
        assert_memory_equal(logp[0], logp[t], (size_t)(N * stride) * 4);
    }
    for (int t = 0; t < 3; t++)
        moe_free(loss[t]), moe_free(dh[t]), moe_free(gb[t]), moe_free(logp[t]), moe_free(ids[t]), moe_free(cnt[t]);
    problem_free(&P);
}

/* ---- bad input ---- */

static void test_errors(void **state)
{
    (void)state;
    problem P;
    problem_init(&P, 100, 8, 4, 10, -1, 0, 12);
    const int N = P.N, d = P.d, M = P.M;
    moe_vocab_head *hd;
    assert_int_equal(moe_vocab_head_create(&hd, P.p, 0), MOE_ERR_ARG);
    assert_int_equal(moe_vocab_head_create(&hd, P.p, d), MOE_OK);
    float loss[10], dh[10 * 8] = {0};
    int64_t cov;
    assert_int_equal(moe_vocab_head_coverage(hd, 1, &cov), MOE_ERR_ARG); /* no forward yet */
    grads G;
    grads_init(&G, &P, 0.0f);
    assert_int_equal(moe_vocab_head_backward(hd, dh, &G.g, P.h, &P.em, 1.0f), MOE_ERR_ARG);
    assert_detail_has("without a successful forward");
    P.targets[4] = 100;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_ERR_ARG);
    assert_detail_has("position 4 is token 100");
    P.targets[4] = -1;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_ERR_ARG);
    P.targets[4] = 3;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, 0), MOE_ERR_ARG);
    P.h[3 * d + 2] = NAN;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_ERR_NONFINITE);
    assert_detail_has("position 3");
    assert_int_equal(moe_vocab_head_backward(hd, dh, &G.g, P.h, &P.em, 1.0f), MOE_ERR_ARG); /* failed forward */
    P.h[3 * d + 2] = 0.5f;
    /* a NaN in the target's expert rows makes that position's loss non-finite */
    const int r = moe_vocab_part_rows(P.p)[P.targets[6]];
    const float keep = P.em.w[(size_t)r * d];
    P.em.w[(size_t)r * d] = INFINITY;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_ERR_NONFINITE);
    P.em.w[(size_t)r * d] = keep;
    assert_int_equal(moe_vocab_head_forward(hd, loss, P.h, P.targets, &P.em, N), MOE_OK);
    /* top-K arguments */
    const int64_t st = moe_vocab_part_topk_size(P.p, 2);
    int32_t *ids = xcalloc((size_t)(N * st), 4), cnt[10];
    float *lp = xcalloc((size_t)(N * st), 4);
    assert_int_equal(moe_vocab_head_topk(hd, ids, lp, cnt, st, P.h, &P.em, N, 0), MOE_ERR_ARG);
    assert_detail_has("vocab_top_k=0");
    assert_int_equal(moe_vocab_head_topk(hd, ids, lp, cnt, st, P.h, &P.em, N, M + 1), MOE_ERR_ARG);
    assert_int_equal(moe_vocab_head_topk(hd, ids, lp, cnt, st - 1, P.h, &P.em, N, 2), MOE_ERR_ARG);
    assert_detail_has("stride");
    assert_int_equal(moe_vocab_head_topk(hd, ids, lp, cnt, st, P.h, &P.em, N, 2), MOE_OK);
    moe_free(ids), moe_free(lp), moe_free(G.block);
    moe_vocab_head_destroy(hd);
    problem_free(&P);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_router_vs_ref), cmocka_unit_test(test_group),
        cmocka_unit_test(test_experts_vs_ref), cmocka_unit_test(test_expert_bad_row),
        cmocka_unit_test(test_head_vs_ref),   cmocka_unit_test(test_fd_ref),
        cmocka_unit_test(test_fd_fast),       cmocka_unit_test(test_topk),
        cmocka_unit_test(test_coverage),      cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
