/* The router: gate logits, softmax, token-choice and expert-choice
 * assignment with capacity, the auxiliary losses, and their backward.
 * Exactly docs/routing.md. Purely local: no communication.
 *
 * Layout: the T local tokens form G routing groups of T/G consecutive
 * tokens; capacity, expert choice and the aux losses are per group.
 * Dense (T, E) arrays are used for the routing decision because E is small
 * (8..64) and it makes the backward a plain elementwise pass. */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H

#include <stdint.h>

#include "core/moe.h"

typedef struct {
    int n_experts;            /* E >= 1 */
    int top_k;                /* token choice: 1 <= k <= E; ignored for expert choice */
    int d_model;              /* d >= 1 */
    moe_router_kind kind;
    double capacity_factor;   /* token choice: <= 0 means dropless; expert choice: c > 0 */
    int normalize_topk;       /* 0/1; forced to 0 when k == 1 */
    int noise;                /* 0: none, 1: gaussian (Shazeer 2017) */
    /* Section 8 options. A zeroed field means the default, so a config
     * that sets none of them routes exactly as sections 1-5. */
    moe_score_kind score;     /* softmax, or sigmoid: s = sigmoid(l) replaces p */
    double route_scale;       /* every combine weight times this; 0 means 1 */
    int expert_bias;          /* 1: token choice selects by s + b (b passed to forward) */
    int n_groups;             /* group-limited routing over n_groups consecutive expert groups; 0, 1: off */
    int topk_groups;          /* groups a token may use; 0: all */
    moe_aux_kind aux;         /* load-balance loss: switch (per group), seq (per sequence), none */
    int group_seqs;           /* sequences per routing group (aux = seq splits a group); 0 means 1 */
} moe_router_config;

/* Validate a config; returns MOE_ERR_ARG with a detail naming the field. */
moe_status moe_router_config_check(const moe_router_config *cfg);

/* Capacity per expert for a group of T tokens (docs/routing.md sections 3 and 4);
 * returns -1 for dropless token choice. */
int64_t moe_router_capacity(const moe_router_config *cfg, int T);

/* Key of the router-noise generator for one layer call (docs/routing.md section 2):
 * the draw for local token t, expert e is
 * moe_rng_normal(seed, MOE_RNG_ROUTER_NOISE, token0 + t, e, layer, step). */
typedef struct {
    uint32_t seed, step, layer;
    int64_t token0;           /* global index of local token 0 */
} moe_noise_key;

/* Everything the forward records for the backward and for inspection.
 * Allocated by moe_route_create for at most T tokens in G groups. */
typedef struct {
    int T, G, E, k;           /* current sizes (T, G set by the last forward; k = 0 for expert choice) */
    int T_max, G_max;
    float *logits;            /* (T, E) gate logits, after noise */
    float *probs;             /* (T, E) the scores s: softmax(logits), or sigmoid(logits) */
    float *sel;               /* (T, E) what token choice ranks: s + b, groups not kept at -inf;
                               * = probs without expert bias and groups */
    float *weight;            /* (T, E) combine weight g of each KEPT assignment, 0 elsewhere */
    uint8_t *selected;        /* (T, E) 1 where selected before capacity drops */
    uint8_t *kept;            /* (T, E) 1 where the assignment was kept */
    int *topk;                /* (T, k) token choice: chosen experts, decreasing prob */
    float *topk_sum;          /* (T) token choice: sum of the k chosen probs (normalize denominator) */
    float *lse;               /* (T) logsumexp of the logits (z-loss) */
    float *noise;             /* (T, E) the N(0,1) draws, or NULL when the last forward had no noise */
    float *noise_pre;         /* (T, E) W_n x before softplus, or NULL without noise */
    int *n_selected;          /* (G, E) selections before drops (f_e numerator; the expert-bias update's load) */
    int *n_kept;              /* (G, E) kept assignments */
    int *n_dropped;           /* (G, E) dropped assignments */
    float *load_balance;      /* (G) L_bal of each group (0 for expert choice) */
    float *z_loss;            /* (G) L_z of each group */
} moe_route;

/* Allocate a route for up to T_max tokens and G_max groups. Owner: caller,
 * release with moe_route_destroy. Fails with MOE_ERR_NOMEM / MOE_ERR_ARG. */
moe_status moe_route_create(moe_route **out, const moe_router_config *cfg, int T_max, int G_max);
void moe_route_destroy(moe_route *r);

/* Forward for T tokens in G equal groups (T % G == 0, T <= T_max; with
 * aux = seq a group splits into group_seqs equal sequences).
 * x (T, d), wg (E, d), wn (E, d) (noise weight, only read when cfg->noise and
 * key != NULL; key == NULL means no noise, as at evaluation), bias (E) the
 * expert bias b (read when cfg->expert_bias; not trained by gradient).
 * Fails with MOE_ERR_ARG on bad sizes and MOE_ERR_NONFINITE if x or the
 * logits hold NaN/Inf; route contents are then unspecified. */
moe_status moe_router_forward(moe_route *r, const float *x, const float *wg, const float *wn, const float *bias,
                              const moe_router_config *cfg, int T, int G, const moe_noise_key *key);

/* Backward. dweight (T, E): dL/dg for each kept assignment (0 elsewhere).
 * lb_scale, z_scale: dL/d(L_bal of each group) and dL/d(L_z of each group)
 * (e.g. aux_loss_coef / G_global). Accumulates into dx (T, d), dwg (E, d)
 * and dwn (E, d; may be NULL without noise). Scratch is internal to r. */
moe_status moe_router_backward(float *dx, float *dwg, float *dwn, const float *dweight,
                               const moe_route *r, const float *x, const float *wg, const float *wn,
                               const moe_router_config *cfg, float lb_scale, float z_scale);

/* Top-k primitive: for each of the n rows of a (n, m) row-major matrix, the
 * indices of its k largest entries in decreasing order, ties toward the
 * lower index. idx is (n, k). 1 <= k <= m. */
void moe_topk_rows(int *idx, const float *a, int n, int m, int k);
void moe_topk_rows_ref(int *idx, const float *a, int n, int m, int k);
/* Same per column: idx is (m, k), for each column the k largest rows. */
void moe_topk_cols(int *idx, const float *a, int n, int m, int k);
void moe_topk_cols_ref(int *idx, const float *a, int n, int m, int k);
/* Same result as moe_topk_cols, in O(n) per column (radix sort) for any k,
 * using work (2n) owned by the caller. moe_topk_cols needs no workspace but
 * costs O(n log k) per column, which dominates routing at large k (expert
 * choice, k = C ~ n/4). */
void moe_topk_cols_ws(int *idx, const float *a, int n, int m, int k, uint64_t *work);

/* Plain reference of the whole routing decision for one group of T tokens,
 * from the scores s (softmax or sigmoid) and the expert bias (E, or NULL):
 * fills weight, selected, kept (T, E) and the (E) counts, applying the
 * bias, group limits, route_scale and normalisation of section 8. Used by
 * tests to hold the fast path to. */
void moe_router_assign_ref(float *weight, uint8_t *selected, uint8_t *kept, int *n_selected,
                           int *n_kept, int *n_dropped, const float *probs, const float *bias,
                           const moe_router_config *cfg, int T);

/* After an optimizer step (routing.md section 8): b_e += rate *
 * sign(n_mean - n_e) for the E counts n (selections before drops summed
 * over every group of the step on all ranks: the same integers on every
 * rank, so b stays identical everywhere). Never fails. */
void moe_router_bias_update(float *bias, const int64_t *n, int E, float rate);

#endif
