/* The vocabulary head over the ep group (head_ep.h) against the one-process
 * head (head.h) on the same parameters and positions; every rank also runs
 * that reference, on all positions:
 *   - one process (moe_comm_self): losses, dh, every gradient, the top-K
 *     lists bitwise equal to moe_vocab_head (the same kernels in the same
 *     order), idle experts' gradient rows untouched, the expert backward's
 *     two halves bitwise the combined backward, coverage and rank counts;
 *   - W ranks (ep = W, rank r holding positions [r N/W, (r+1) N/W)): losses
 *     and dh rows of its positions, the router gradient summed over the
 *     ranks, its experts' rows of the W_out / c gradients, the top-K lists
 *     for K = 1, 2, M, all within 1e-5 of the reference;
 *   - failures on one rank (a target outside the vocabulary, NaN in h, a bad
 *     K) stop every rank with the cause's status on the rank that found it.
 * Usage: test_vocab_ep [shm] (under mpiexec at any rank count dividing M =
 * 8; shm: the exchange through the on-node shared window, else p2p with 2
 * chunks). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "vocab/head_ep.h"

#include "check_mpi.h"

enum { V = 300, D = 24, M = 8, N = 96 };

static int fails, rank;
static moe_a2a_kind kind = MOE_A2A_P2P;

static float normal(uint32_t i, uint32_t id) { return (float)moe_rng_normal(7, MOE_RNG_BENCH, i, 0, id, 0); }
static double unif(uint32_t i, uint32_t id) { return moe_rng_uniform(7, MOE_RNG_BENCH, i, 0, id, 0); }

/* max |a - b| / max(max |b|, 1e-30) */
static double rel_err(const float *a, const float *b, size_t n)
{
    double e = 0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return e / m;
}

static int bitwise(const void *a, const void *b, size_t bytes) { return memcmp(a, b, bytes) == 0; }

/* The problem: uneven sets, expert 5 no position targets (idle), random h. */
typedef struct {
    moe_vocab_part *p;
    float *prm_block;  /* router_w, router_b, w, b expert-major (moe_vocab_params) */
    moe_vocab_params prm;
    float h[N * D];
    int32_t tg[N];
} problem;

static void problem_init(problem *P)
{
    int32_t assign[V];
    for (int v = 0; v < V; v++) {
        const double u = unif((uint32_t)v, 1);
        assign[v] = v < M ? v : (int)(M * u * u) % M;
    }
    CHECK(moe_vocab_part_create(&P->p, assign, V, M) == MOE_OK);
    const size_t n = moe_vocab_params_numel(V, D, M);
    P->prm_block = calloc(n, sizeof(float));
    moe_vocab_params_point(&P->prm, P->prm_block, V, D, M);
    for (size_t i = 0; i < n; i++) P->prm_block[i] = 0.3f * normal((uint32_t)i, 2);
    for (int i = 0; i < N * D; i++) P->h[i] = normal((uint32_t)i, 3);
    for (int i = 0; i < N; i++) {
        int v;
        uint32_t k = 0;
        do v = (int)(V * unif((uint32_t)(i * 64 + k++), 4));
        while (assign[v] == 5);
        P->tg[i] = v;
    }
}

/* Gradients or parameters in one block, with the W_out / c rows of experts [m0, m1) only. */
typedef struct {
    float *block;
    moe_vocab_params v;
} grads;

static void grads_init(grads *g, const problem *P, int m0, int m1)
{
    const int32_t *off = moe_vocab_part_offsets(P->p);
    const size_t rows = (size_t)(off[m1] - off[m0]);
    g->block = calloc((size_t)M * D + M + rows * (D + 1), sizeof(float));
    g->v.router_w = g->block;
    g->v.router_b = g->v.router_w + M * D;
    g->v.w = g->v.router_b + M;
    g->v.b = g->v.w + rows * D;
}

/* The local experts' view of the problem's parameters on an ep rank. */
static moe_vocab_params local_view(const problem *P, int m0)
{
    const int32_t *off = moe_vocab_part_offsets(P->p);
    moe_vocab_params v = P->prm;
    v.w = P->prm.w + (size_t)off[m0] * D;
    v.b = P->prm.b + off[m0];
    return v;
}

/* One process: the ep head on moe_comm_self is the one-process head, bit for bit. */
static void test_one_process(const problem *P)
{
    moe_vocab_head *hd = NULL;
    moe_vocab_ep *ep = NULL;
    CHECK(moe_vocab_head_create(&hd, P->p, D) == MOE_OK);
    CHECK(moe_vocab_ep_create(&ep, P->p, D, MOE_A2A_P2P, 1, moe_comm_self()) == MOE_OK);
    if (!hd || !ep) return;
    const float dloss = 1.0f / N;
    float loss_a[N], loss_b[N], dh_a[N * D] = {0}, dh_b[N * D] = {0};
    grads ga, gb;
    grads_init(&ga, P, 0, M);
    grads_init(&gb, P, 0, M);
    /* an idle expert's rows must keep exactly what they held */
    const int32_t *off = moe_vocab_part_offsets(P->p);
    for (int r = off[5]; r < off[6]; r++) ga.v.b[r] = gb.v.b[r] = 42.0f;
    CHECK(moe_vocab_head_forward(hd, loss_a, P->h, P->tg, &P->prm, N) == MOE_OK);
    CHECK(moe_vocab_head_backward(hd, dh_a, &ga.v, P->h, &P->prm, dloss) == MOE_OK);
    CHECK(moe_vocab_ep_forward(ep, loss_b, P->h, P->tg, &P->prm, N, dloss) == MOE_OK);
    CHECK(moe_vocab_ep_backward(ep, dh_b, &gb.v, P->h, &P->prm) == MOE_OK);
    CHECK(bitwise(loss_a, loss_b, sizeof loss_a));
    CHECK(bitwise(dh_a, dh_b, sizeof dh_a));
    const size_t n = moe_vocab_params_numel(V, D, M);
    CHECK(bitwise(ga.block, gb.block, n * sizeof(float)));
    CHECK(gb.v.b[off[5]] == 42.0f && moe_vocab_ep_counts(ep)[5] == 0);
    /* a second backward of the same forward is refused */
    CHECK(moe_vocab_ep_backward(ep, dh_b, &gb.v, P->h, &P->prm) == MOE_ERR_ARG);
    /* evaluation (dloss 0): the same losses, and no backward */
    CHECK(moe_vocab_ep_forward(ep, loss_b, P->h, P->tg, &P->prm, N, 0.0f) == MOE_OK);
    CHECK(bitwise(loss_a, loss_b, sizeof loss_a));
    CHECK(moe_vocab_ep_backward(ep, dh_b, &gb.v, P->h, &P->prm) == MOE_ERR_ARG);
    /* coverage and the rank counts agree with the head */
    for (int K = 1; K <= M; K++) {
        int64_t ca = -1, cb = -2, hist[M] = {0}, below = 0;
        CHECK(moe_vocab_head_coverage(hd, K, &ca) == MOE_OK);
        CHECK(moe_vocab_ep_coverage(ep, K, &cb) == MOE_OK);
        CHECK(moe_vocab_ep_rank_hist(ep, N, hist) == MOE_OK);
        for (int k = 0; k < K; k++) below += hist[k];
        CHECK(ca == cb && cb == below);
    }
    CHECK(moe_vocab_ep_coverage(ep, 0, &(int64_t){0}) == MOE_ERR_ARG);
    CHECK(moe_vocab_ep_rank_hist(ep, N + 1, (int64_t[M]){0}) == MOE_ERR_ARG);
    /* top-K lists */
    const int64_t stride = moe_vocab_part_topk_size(P->p, M);
    int32_t *ia = calloc((size_t)N * stride, 4), *ib = calloc((size_t)N * stride, 4), ca[N], cb[N];
    float *la = calloc((size_t)N * stride, 4), *lb = calloc((size_t)N * stride, 4);
    for (int K = 1; K <= M; K++) {
        CHECK(moe_vocab_head_topk(hd, ia, la, ca, stride, P->h, &P->prm, N, K) == MOE_OK);
        CHECK(moe_vocab_ep_topk(ep, ib, lb, cb, stride, P->h, &P->prm, N, K) == MOE_OK);
        CHECK(bitwise(ca, cb, sizeof ca));
        for (int i = 0; i < N; i++) {
            CHECK(bitwise(ia + (size_t)i * stride, ib + (size_t)i * stride, (size_t)ca[i] * 4));
            CHECK(bitwise(la + (size_t)i * stride, lb + (size_t)i * stride, (size_t)ca[i] * 4));
        }
    }
    free(ia), free(ib), free(la), free(lb);
    free(ga.block), free(gb.block);
    moe_vocab_head_destroy(hd);
    moe_vocab_ep_destroy(ep);
}

/* The expert backward in its two halves gives the combined backward's bits. */
static void test_split_backward(const problem *P)
{
    int32_t expert[N], order[N], goff[M + 1], y[N];
    CHECK(moe_vocab_target_experts(expert, P->tg, P->p, N) == MOE_OK);
    moe_vocab_group(order, goff, expert, N, M);
    float *x = calloc((size_t)N * D, 4), *x2 = calloc((size_t)N * D, 4), *dx = calloc((size_t)N * D, 4);
    moe_vocab_pack(x, y, P->h, P->tg, order, N, 1, D);
    memcpy(x2, x, (size_t)N * D * 4);
    const int64_t ns = moe_vocab_expert_scratch(goff, P->p, 0, M);
    float *pa = calloc((size_t)ns, 4), *pb = calloc((size_t)ns, 4), la[N], lb[N];
    grads ga, gb;
    grads_init(&ga, P, 0, M);
    grads_init(&gb, P, 0, M);
    CHECK(moe_vocab_expert_forward(la, pa, x, y, goff, P->prm.w, P->prm.b, P->p, 0, M, D) == MOE_OK);
    CHECK(moe_vocab_expert_forward(lb, pb, x2, y, goff, P->prm.w, P->prm.b, P->p, 0, M, D) == MOE_OK);
    moe_vocab_expert_backward(x, ga.v.w, ga.v.b, pa, x, y, goff, P->prm.w, P->p, 0, M, D, 0.25f);
    moe_vocab_expert_backward_data(dx, pb, y, goff, P->prm.w, P->p, 0, M, D, 0.25f);
    moe_vocab_expert_backward_weights(gb.v.w, gb.v.b, pb, x2, goff, P->p, 0, M, D);
    CHECK(bitwise(pa, pb, (size_t)ns * 4));
    CHECK(bitwise(x, dx, (size_t)N * D * 4));
    CHECK(bitwise(ga.block, gb.block, moe_vocab_params_numel(V, D, M) * 4));
    free(x), free(x2), free(dx), free(pa), free(pb), free(ga.block), free(gb.block);
}

/* W ranks against the one-process head. */
static void test_ranks(const problem *P, moe_comm *c)
{
    const int W = moe_comm_size(c), r = moe_comm_rank(c);
    const int n0 = r * N / W, n1 = (r + 1) * N / W, n = n1 - n0;
    const float dloss = 1.0f / N;
    /* the reference on all positions */
    moe_vocab_head *hd = NULL;
    CHECK(moe_vocab_head_create(&hd, P->p, D) == MOE_OK);
    float ref_loss[N], ref_dh[N * D] = {0};
    grads ref;
    grads_init(&ref, P, 0, M);
    CHECK(moe_vocab_head_forward(hd, ref_loss, P->h, P->tg, &P->prm, N) == MOE_OK);
    CHECK(moe_vocab_head_backward(hd, ref_dh, &ref.v, P->h, &P->prm, dloss) == MOE_OK);
    /* this rank's share */
    moe_vocab_ep *ep = NULL;
    CHECK(moe_vocab_ep_create(&ep, P->p, D, kind, kind == MOE_A2A_P2P ? 2 : 1, c) == MOE_OK);
    if (!ep) return;
    const int Ml = moe_vocab_ep_n_local(ep), m0 = moe_vocab_ep_expert0(ep);
    CHECK(Ml == M / W && m0 == r * Ml && moe_vocab_ep_local_rows(ep) ==
          moe_vocab_part_offsets(P->p)[m0 + Ml] - moe_vocab_part_offsets(P->p)[m0]);
    const moe_vocab_params prm = local_view(P, m0);
    grads g;
    grads_init(&g, P, m0, m0 + Ml);
    float loss[N], dh[N * D] = {0};
    CHECK(moe_vocab_ep_forward(ep, loss, P->h + (size_t)n0 * D, P->tg + n0, &prm, n, dloss) == MOE_OK);
    CHECK(moe_vocab_ep_backward(ep, dh, &g.v, P->h + (size_t)n0 * D, &prm) == MOE_OK);
    CHECK(rel_err(loss, ref_loss + n0, (size_t)n) < 1e-5);
    CHECK(rel_err(dh, ref_dh + (size_t)n0 * D, (size_t)n * D) < 1e-5);
    CHECK(moe_comm_allreduce_f32(c, MOE_SCOPE_WORLD, g.v.router_w, (size_t)M * D + M) == MOE_OK);
    CHECK(rel_err(g.v.router_w, ref.v.router_w, (size_t)M * D) < 1e-5);
    CHECK(rel_err(g.v.router_b, ref.v.router_b, M) < 1e-5);
    const int32_t *off = moe_vocab_part_offsets(P->p);
    const size_t rows = (size_t)(off[m0 + Ml] - off[m0]);
    CHECK(rel_err(g.v.w, ref.v.w + (size_t)off[m0] * D, rows * D) < 1e-5);
    CHECK(rel_err(g.v.b, ref.v.b + off[m0], rows) < 1e-5);
    /* targets per expert summed over the ranks are the reference's */
    int64_t counts[M];
    for (int m = 0; m < M; m++) counts[m] = moe_vocab_ep_counts(ep)[m];
    CHECK(moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, counts, M) == MOE_OK);
    for (int m = 0; m < M; m++) CHECK(counts[m] == moe_vocab_head_activated(hd)[m]);
    /* top-K lists */
    const int64_t stride = moe_vocab_part_topk_size(P->p, M);
    int32_t *ia = calloc((size_t)N * stride, 4), *ib = calloc((size_t)N * stride, 4), ca[N], cb[N];
    float *la = calloc((size_t)N * stride, 4), *lb = calloc((size_t)N * stride, 4);
    const int Ks[] = {1, 2, M};
    for (int k = 0; k < 3; k++) {
        CHECK(moe_vocab_head_topk(hd, ia, la, ca, stride, P->h, &P->prm, N, Ks[k]) == MOE_OK);
        CHECK(moe_vocab_ep_topk(ep, ib, lb, cb, stride, P->h + (size_t)n0 * D, &prm, n, Ks[k]) == MOE_OK);
        for (int i = 0; i < n; i++) {
            const size_t a = (size_t)(n0 + i) * stride, b = (size_t)i * stride;
            CHECK(ca[n0 + i] == cb[i] && bitwise(ia + a, ib + b, (size_t)cb[i] * 4));
            CHECK(rel_err(lb + b, la + a, (size_t)cb[i]) < 1e-5);
        }
    }
    /* a target outside the vocabulary on the last rank stops every rank */
    int32_t bad[N];
    memcpy(bad, P->tg + n0, (size_t)n * sizeof *bad);
    if (r == W - 1) bad[n - 1] = V;
    moe_status st = moe_vocab_ep_forward(ep, loss, P->h + (size_t)n0 * D, bad, &prm, n, dloss);
    CHECK(st == (r == W - 1 ? MOE_ERR_ARG : W > 1 ? MOE_ERR_REMOTE : MOE_ERR_ARG));
    CHECK(moe_vocab_ep_backward(ep, dh, &g.v, P->h + (size_t)n0 * D, &prm) == MOE_ERR_ARG);
    /* NaN in h on rank 0 */
    float *h = malloc((size_t)n * D * 4);
    memcpy(h, P->h + (size_t)n0 * D, (size_t)n * D * 4);
    if (r == 0) h[3] = NAN;
    st = moe_vocab_ep_forward(ep, loss, h, P->tg + n0, &prm, n, dloss);
    CHECK(st == (r == 0 ? MOE_ERR_NONFINITE : MOE_ERR_REMOTE));
    st = moe_vocab_ep_topk(ep, ib, lb, cb, stride, h, &prm, n, 2);
    CHECK(st == (r == 0 ? MOE_ERR_NONFINITE : MOE_ERR_REMOTE));
    /* K outside [1, M] on every rank: each finds it */
    CHECK(moe_vocab_ep_topk(ep, ib, lb, cb, stride, P->h + (size_t)n0 * D, &prm, n, M + 1) == MOE_ERR_ARG);
    /* and the head works again afterwards */
    CHECK(moe_vocab_ep_forward(ep, loss, P->h + (size_t)n0 * D, P->tg + n0, &prm, n, 0.0f) == MOE_OK);
    CHECK(rel_err(loss, ref_loss + n0, (size_t)n) < 1e-5);
    free(h), free(ia), free(ib), free(la), free(lb), free(ref.block), free(g.block);
    moe_vocab_head_destroy(hd);
    moe_vocab_ep_destroy(ep);
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv)) return 1;
    moe_comm *c = NULL;
    if (moe_comm_create_world(&c, 0)) return 1;
    rank = moe_comm_rank(c);
    if (argc > 1 && !strcmp(argv[1], "shm")) kind = MOE_A2A_SHM;
    problem P;
    problem_init(&P);
    if (moe_comm_size(c) == 1) {
        test_one_process(&P);
        test_split_backward(&P);
    }
    test_ranks(&P, c);
    moe_vocab_part_destroy(P.p);
    free(P.prm_block);
    double f = fails;
    moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, &f, 1);
    if (rank == 0) printf("%s: %d ranks, %s\n", argv[0], moe_comm_size(c), f ? "FAILED" : "ok");
    moe_comm_destroy(c);
    moe_comm_finalize();
    return f ? 1 : 0;
}
