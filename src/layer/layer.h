/* The MoE layer: route -> pack -> exchange (dispatch, experts, return) ->
 * combine, forward and backward, over the expert-parallel group of a
 * moe_comm (one process: moe_comm_self(); the exchange then moves nothing).
 * The T local tokens form G routing groups; a single process holding all
 * groups computes the same numbers as any number of ranks holding them in
 * order.
 *
 * Parameters are not owned by the layer: callers pass views into their own
 * contiguous parameter and gradient blocks. */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "comm/comm.h"
#include "experts/experts.h"
#include "router/router.h"

typedef struct {
    moe_router_config router;  /* n_experts, top_k, d_model, kind, capacity, normalize, noise, section 8 options */
    int d_ff;                  /* F */
    moe_activation act;
    int n_shared;              /* S shared experts every token passes through (0: none) */
    int d_ff_shared;           /* their hidden width F_s */
    int shared_gate;           /* 1: their output times sigmoid(w_sg . x) */
    int max_tokens;            /* largest local T forward will be called with */
    int max_groups;            /* largest local G */
    moe_a2a_kind a2a;          /* exchange transport over more than one rank */
    int chunks;                /* >= 1: expert chunks overlapped with the exchange */
    /* The expert placement (docs/routing.md "Expert placement"): slot j of
     * ep rank p (exchange destination p * n_slots + j) holds global expert
     * slots[p * n_slots + j]; every expert at least once, a replicated one
     * on distinct ranks, ascending inside a rank. NULL: contiguous (n_slots
     * = E/P, expert e in destination e). Not owned; copied at creation. */
    const int *slots;          /* (P, n_slots) or NULL */
    int n_slots;               /* slots per ep rank with slots, else ignored */
} moe_layer_config;

typedef struct {
    float *router_w;           /* (E, d) */
    float *noise_w;            /* (E, d), or NULL without router noise */
    float *expert_bias;        /* (E) the router's selection bias (a buffer: no gradient), or NULL */
    moe_expert_params experts; /* local experts only: (E_local, F1, d) ... */
    moe_expert_params shared;  /* the S shared experts (S, F1_s, d) ..., replicated */
    float *shared_gate;        /* (1, d) w_sg, or NULL without the gate */
} moe_layer_params;

/* Time split of forward+backward since the last reset (seconds, this
 * rank). "dispatch"/"return" are the exchange there and back, "combine" the
 * weighted sum at home. With chunks > 1 the overlapped exchange counts as
 * expert time. */
typedef struct {
    double route, pack, dispatch, expert_fwd, ret, combine, shared;
    double bwd_gate_grad, bwd_router, bwd_dispatch, expert_bwd, bwd_return, bwd_unpack, bwd_shared;
} moe_layer_timing;

/* Every phase of moe_layer_timing by name, in order: printers and JSON
 * writers walk this table instead of the struct's memory. */
enum { MOE_LAYER_TIMING_N = 14 };
typedef struct {
    const char *name;
    size_t offset;
} moe_layer_timing_field;
extern const moe_layer_timing_field moe_layer_timing_fields[MOE_LAYER_TIMING_N];
double moe_layer_timing_get(const moe_layer_timing *t, int i);

typedef struct moe_layer moe_layer;

/* Collective over comm's world (creates the exchange).
 * Validates the config (MOE_ERR_ARG naming the field). Owner: caller. */
moe_status moe_layer_create(moe_layer **out, const moe_layer_config *cfg, moe_comm *comm);
void moe_layer_destroy(moe_layer *L);

int moe_layer_n_local_experts(const moe_layer *L); /* slots per rank: E / P when contiguous */
/* The global expert of local slot 0 (contiguous: the first of this rank's
 * block [e0, e0 + E/P)). */
int moe_layer_expert0(const moe_layer *L);
/* (n_local_experts) the global expert of each local slot, ascending. */
const int *moe_layer_local_experts(const moe_layer *L);
/* The most rows this rank's experts can receive in one forward, from the
 * routing's capacity, max_tokens and max_groups (moe_layer_rows_bound). The
 * receive buffers are allocated for it at the first forward, so a run's
 * load fluctuations never reallocate them; a load beyond it would still
 * work. Not collective. */
int64_t moe_layer_recv_rows_bound(const moe_layer *L);
/* A dropless layer holds buffers for the worst case when that is at most
 * this many times the mean load (max_tokens * top_k rows); 2 covers 2 ranks. */
#define MOE_DROPLESS_BOUND_MEANS 2
/* The bound of moe_layer_recv_rows_bound for an ep rank of P holding El
 * slots under cfg, or 0 when there is no useful one (dropless token choice
 * whose worst case passes MOE_DROPLESS_BOUND_MEANS means: 3 or more ranks
 * with El >= k). Pure. */
int64_t moe_layer_rows_bound(const moe_layer_config *cfg, int P, int El);

/* Forward for T local tokens in G local groups: y (T, d) overwritten, x (T, d).
 * y is the routed combine plus the shared experts' output (times their gate). 
 * Collective over the ep group. Fails on bad sizes (MOE_ERR_ARG), NaN/Inf in
 * x (MOE_ERR_NONFINITE), allocation (MOE_ERR_NOMEM); with a comm every rank
 * of the ep group then returns non-OK too (MOE_ERR_REMOTE), nobody hangs. */
moe_status moe_layer_forward(moe_layer *L, float *y, const float *x, const moe_layer_params *p,
                             int T, int G, const moe_noise_key *noise);

/* Forward of one routing group of T tokens that every rank of the ep group
 * holds alike (decoding: the dense part runs where a sequence lives, the
 * group is all sequences' new tokens). Every rank routes all T tokens, as
 * one process would, but sends only the rows it owns (own[t] = 1); each
 * token must be owned by exactly one rank of the group. y (T, d): the
 * owned rows get the output, the others are overwritten with unspecified
 * values. Each token goes through its experts once, not once per rank.
 * No noise; the forward cannot be followed by a backward. Collective over
 * the ep group; fails as moe_layer_forward. */
moe_status moe_layer_forward_owned(moe_layer *L, float *y, const float *x, const moe_layer_params *p, int T,
                                   const uint8_t *own);

/* Backward of the last forward. dy (T, d). Accumulates into dx (T, d) and
 * into grads (router_w, noise_w, local experts, shared experts and their
 * gate; grads->expert_bias is not used). lb_scale / z_scale: dL/d of
 * each group's load-balance / z loss. Expert gradients are summed over the ep
 * group (they arrive at the owner; an expert with copies on several ranks
 * gets the sum over its copies on every copy, the same bits on each, so
 * that the copies stay equal) but NOT over replicas, and router
 * gradients are this rank's contribution only: reducing them is the
 * caller's job (moe_layer_reduce_grads or a bucketed allreduce).
 * Collective over the ep group. */
moe_status moe_layer_backward(moe_layer *L, float *dx, moe_layer_params *grads, const float *dy,
                              const float *x, const moe_layer_params *p, float lb_scale,
                              float z_scale);

/* After expert gradients were summed over replicas (world > ep size): the
 * copies of a replicated expert inside the ep group take its primary copy's
 * bits (different ep ranks reduce over different replica communicators,
 * and MPI does not promise equal bits from equal inputs there). No-op
 * without replicated experts. Collective over the ep group; MOE_ERR_MPI. */
moe_status moe_layer_sync_copies(moe_layer *L, moe_layer_params *grads);

/* Convenience for benchmarks and tests: sums router and shared-expert
 * grads over world and expert grads over replicas. Collective over world. */
moe_status moe_layer_reduce_grads(moe_layer *L, moe_layer_params *grads);

/* The routing record of the last forward (local tokens). */
const moe_route *moe_layer_route(const moe_layer *L);
/* (E_local) kept rows each local expert processed in the last forward,
 * summed over the ep group (not over replicas). */
const int *moe_layer_expert_rows(const moe_layer *L);
const moe_layer_timing *moe_layer_get_timing(const moe_layer *L);
void moe_layer_reset_timing(moe_layer *L);
/* Bytes of parameters the last forward read on this rank: the router's
 * weights (and selection bias), every local expert that got rows, the
 * shared experts and their gate. A decoding step must stream these from
 * memory (bench/decode.sh's bandwidth bound). Not collective. */
double moe_layer_forward_param_bytes(const moe_layer *L, const moe_layer_params *p);
/* Expert GEMM floating-point operations of the last forward+backward on this rank. */
double moe_layer_expert_flops(const moe_layer *L);
/* The layer's token exchange, for its counters (moe_a2a_bytes,
 * moe_a2a_seconds). Owned by the layer. */
moe_a2a *moe_layer_exchange(moe_layer *L);

#endif
