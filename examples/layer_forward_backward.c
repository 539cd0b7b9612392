/* One MoE layer through moerun's public API: forward, a loss, backward and
 * the gradient reduction, on every rank of an MPI job.
 *
 *   mpirun -np 2 ./layer_forward_backward
 *
 * E = 8 experts (top-2 token choice) are split over the ranks; each rank
 * routes its own tokens, and the layer's exchange carries every kept
 * (token, expert) pair to the rank holding the expert and the result back.
 * Inputs and weights are drawn from Philox keyed by GLOBAL indices, so any
 * rank count dividing E, T and G builds the same layer and batch and prints
 * the same figures, up to the order of floating-point sums. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moerun/comm/comm.h>
#include <moerun/core/rng.h>
#include <moerun/layer/layer.h>
#include <moerun/version.h>

enum { E = 8, K = 2, D = 64, F = 128, T = 512, G = 8 }; /* T tokens in G routing groups, globally */

/* x[i] = scale * N(0,1) drawn at global element index first + i */
static void fill(float *x, size_t n, size_t first, uint32_t tensor, float scale)
{
    for (size_t i = 0; i < n; i++) {
        const uint64_t g = first + i;
        x[i] = scale * (float)moe_rng_normal(7, MOE_RNG_BENCH, (uint32_t)g, (uint32_t)(g >> 32), tensor, 0);
    }
}

static double sumsq(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

/* Every failure below is the same on every rank (the layer agrees on
 * errors within its expert-parallel group), so every rank leaves together. */
#define TRY(call)                                                                                          \
    do {                                                                                                   \
        st = (call);                                                                                       \
        if (st) {                                                                                          \
            fprintf(stderr, "rank %d: %s: %s: %s\n", rank, #call, moe_status_str(st), moe_error_detail()); \
            goto out;                                                                                      \
        }                                                                                                  \
    } while (0)

int main(int argc, char **argv)
{
    moe_comm *comm = NULL;
    moe_layer *L = NULL;
    float *mem = NULL;
    int rank = 0;
    moe_status st = moe_comm_init(&argc, &argv);
    if (!st) st = moe_comm_create_world(&comm, 0); /* expert-parallel over every rank */
    if (st) {
        fprintf(stderr, "MPI start-up: %s: %s\n", moe_status_str(st), moe_error_detail());
        return 1;
    }
    rank = moe_comm_rank(comm);
    const int W = moe_comm_size(comm);
    if (rank == 0 && strcmp(moe_version(), MOERUN_VERSION))
        fprintf(stderr, "note: headers of moerun %s, library %s\n", MOERUN_VERSION, moe_version());
    if (E % W || T % W || G % W) {
        if (rank == 0) fprintf(stderr, "run on a number of ranks dividing %d\n", E);
        moe_comm_destroy(comm);
        moe_comm_finalize();
        return 2;
    }
    const int Tl = T / W, Gl = G / W; /* this rank's tokens and routing groups */

    const moe_layer_config cfg = {
        .router = {.n_experts = E, .top_k = K, .d_model = D, .kind = MOE_ROUTER_TOKEN_CHOICE,
                   .capacity_factor = 1.25, .normalize_topk = 1, .noise = 0},
        .d_ff = F, .act = MOE_ACT_GELU, .max_tokens = Tl, .max_groups = Gl, .a2a = MOE_A2A_P2P, .chunks = 1};
    TRY(moe_layer_create(&L, &cfg, comm));
    const int El = moe_layer_n_local_experts(L), e0 = moe_layer_expert0(L);

    /* Parameters and gradients: the router (E, D) and this rank's El experts. */
    const size_t n_router = (size_t)E * D, n_w1 = (size_t)El * F * D, n_b1 = (size_t)El * F,
                 n_w2 = (size_t)El * D * F, n_b2 = (size_t)El * D, n_par = n_router + n_w1 + n_b1 + n_w2 + n_b2,
                 n_act = (size_t)Tl * D;
    mem = calloc(2 * n_par + 4 * n_act, sizeof(float));
    TRY(moe_comm_agree(comm, mem ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "%zu floats", 2 * n_par + 4 * n_act)));
    moe_layer_params p, g;
    float *q = mem;
    moe_layer_params *views[2] = {&p, &g};
    for (int i = 0; i < 2; i++) {
        views[i]->router_w = q, q += n_router;
        views[i]->noise_w = NULL;
        views[i]->experts.w1 = q, q += n_w1;
        views[i]->experts.b1 = q, q += n_b1;
        views[i]->experts.w2 = q, q += n_w2;
        views[i]->experts.b2 = q, q += n_b2;
    }
    float *x = q, *y = x + n_act, *dy = y + n_act, *dx = dy + n_act;
    fill(p.router_w, n_router, 0, 1, 1.0f / sqrtf(D));
    fill(p.experts.w1, n_w1, (size_t)e0 * F * D, 2, 1.0f / sqrtf(D));
    fill(p.experts.b1, n_b1, (size_t)e0 * F, 3, 0.1f);
    fill(p.experts.w2, n_w2, (size_t)e0 * D * F, 4, 1.0f / sqrtf(F));
    fill(p.experts.b2, n_b2, (size_t)e0 * D, 5, 0.1f);
    fill(x, n_act, (size_t)rank * n_act, 6, 1.0f);

    /* loss = 0.5 sum(y^2) / T over every token, so dL/dy = y / T */
    TRY(moe_layer_forward(L, y, x, &p, Tl, Gl, NULL));
    double sums[4] = {0.5 * sumsq(y, n_act) / T};
    for (size_t i = 0; i < n_act; i++) dy[i] = y[i] / T;
    TRY(moe_layer_backward(L, dx, &g, dy, x, &p, 0.01f / G, 0.001f / G)); /* aux and z loss coefficients / G */
    TRY(moe_layer_reduce_grads(L, &g)); /* router gradient summed over the ranks */

    /* Norms over the whole layer: dx and the experts are split over the
     * ranks; the reduced router gradient is the same everywhere. */
    sums[1] = sumsq(dx, n_act);
    sums[2] = sumsq(g.experts.w1, n_w1 + n_b1 + n_w2 + n_b2); /* w1, b1, w2, b2 are contiguous above */
    TRY(moe_comm_allreduce_f64(comm, MOE_SCOPE_WORLD, sums, 3));
    sums[3] = sumsq(g.router_w, n_router);
    int64_t kept = 0;
    for (int j = 0; j < El; j++) kept += moe_layer_expert_rows(L)[j];
    TRY(moe_comm_allreduce_i64(comm, MOE_SCOPE_WORLD, &kept, 1));
    if (rank == 0)
        printf("layer: %d ranks, %d experts, %d tokens, %lld of %d assignments kept\n"
               "loss %.9g |dx| %.9g |d experts| %.9g |d router| %.9g\n",
               W, E, T, (long long)kept, K * T, sums[0], sqrt(sums[1]), sqrt(sums[2]), sqrt(sums[3]));
out:
    moe_layer_destroy(L);
    free(mem);
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return st ? 1 : 0;
}
