/* The vocabulary-expert head over the expert-parallel group
 * (docs/vocab-experts.md section 8): the kernels of head.h with the token
 * exchange of src/comm between the grouping and the expert compute, as the
 * MoE layer has it between routing and the FFN experts.
 *
 * Placement: ep rank r owns vocabulary experts [r M/P, (r+1) M/P) and their
 * rows of W_out and c (expert-major, as the layout's segments hold them);
 * the router W_r, b_r is replicated. For a position on its home rank:
 *   (i)   the router runs at home (q, logsumexp);
 *   (ii)  the position's h row goes to the owner of its target's expert
 *         (training, evaluation: one row, with the target id in an extra
 *         column) or of each of its top-K experts (generation: K rows);
 *   (iii) the owner computes on the rows grouped by its local expert: the
 *         loss term -log p_m(y) and, in training, dlogits and the dh row
 *         (the loss is linear in what follows it, so the backward needs
 *         nothing that arrives later: the head costs one round trip per
 *         step); in generation, log p_m over S_m;
 *   (iv)  the results come back in the same trip (out_width = d + 1 in
 *         training: the dh row and the loss; 1 in evaluation; max |S_m| in
 *         generation), and combine at home in position order.
 * The weight gradients of the local experts are formed later, by
 * moe_vocab_ep_backward, from the rows and dlogits the owner kept.
 *
 * Results do not depend on the rank count: an owner's rows of an expert
 * arrive grouped by source rank and in position order inside each, which
 * is the global position order, as on one process. On one rank (P = 1) no
 * row is copied between layouts (the exchange's own one-rank path). */
#ifndef MOE_VOCAB_HEAD_EP_H
#define MOE_VOCAB_HEAD_EP_H

#include <stdint.h>

#include "comm/comm.h"
#include "vocab/head.h"

typedef struct moe_vocab_ep moe_vocab_ep;

/* The head of partition p (borrowed: it must outlive the head; the same on
 * every rank) for width d, over comm's ep group (P must divide M) with the
 * exchange kind and chunks of the model's MoE layers. Collective over the
 * ep group (creates the exchange); every rank returns non-OK if any fails:
 * MOE_ERR_ARG (M % P, d < 1), MOE_ERR_NOMEM. Owner: caller. */
moe_status moe_vocab_ep_create(moe_vocab_ep **out, const moe_vocab_part *p, int d, moe_a2a_kind kind, int chunks,
                               moe_comm *comm);
void moe_vocab_ep_destroy(moe_vocab_ep *v);

int moe_vocab_ep_expert0(const moe_vocab_ep *v);  /* first vocabulary expert owned here: ep rank * M/P */
int moe_vocab_ep_n_local(const moe_vocab_ep *v);  /* M / P */
/* Local rows of W_out (and c): the tokens of the owned experts. */
int64_t moe_vocab_ep_local_rows(const moe_vocab_ep *v);

/* Forward of N >= 1 local positions, h (N, d), targets (N) token ids:
 * loss (N) = -log P(y | h). prm: router_w (M, d), router_b (M), w and b
 * the LOCAL experts' rows (expert-major, from the first token of expert
 * expert0). dloss > 0 makes it a training forward for the objective
 * sum_n dloss * loss[n]: the owners also compute dlogits and the dh rows,
 * and moe_vocab_ep_backward completes the backward; dloss = 0: evaluation.
 * Collective over the ep group (N may differ between ranks). Fails on
 * every ep rank (the cause's status on the rank that found it,
 * MOE_ERR_REMOTE elsewhere) with MOE_ERR_ARG (N < 1, a target outside
 * [0, V), naming the position), MOE_ERR_NONFINITE (router logits not
 * finite, naming the position), MOE_ERR_NOMEM. A non-finite loss from
 * non-finite expert weights is returned as is (the caller's statistics
 * see it). */
moe_status moe_vocab_ep_forward(moe_vocab_ep *v, float *loss, const float *h, const int32_t *targets,
                                const moe_vocab_params *prm, int N, float dloss);

/* Backward of the last training forward (same h, prm): dh (N, d) += dL/dh;
 * grad->router_w, router_b += this rank's positions' router gradients
 * (sum them over the world); grad->w, b (local rows) += the local experts'
 * gradients from the positions of every ep rank (sum them over replicas).
 * The rows of a local expert that no position targeted are not touched.
 * Not collective (the exchange ran in the forward). MOE_ERR_ARG when no
 * successful training forward preceded. */
moe_status moe_vocab_ep_backward(moe_vocab_ep *v, float *dh, moe_vocab_params *grad, const float *h,
                                 const moe_vocab_params *prm);

/* (M) positions of THIS rank that targeted each expert in the last forward
 * (sum over the world: the experts the optimizer updates). */
const int32_t *moe_vocab_ep_counts(const moe_vocab_ep *v);
/* Positions of this rank in the last forward whose target's expert is
 * among the K largest q (ties to the lower index). MOE_ERR_ARG (K not in
 * [1, M], no forward). Not collective. */
moe_status moe_vocab_ep_coverage(const moe_vocab_ep *v, int K, int64_t *covered);
/* hist (M) += the first n positions of the last forward by the rank of
 * their target's expert in q (moe_vocab_rank_hist). MOE_ERR_ARG (n outside
 * [0, N], no forward). Not collective. */
moe_status moe_vocab_ep_rank_hist(const moe_vocab_ep *v, int n, int64_t *hist);
/* mass (M) += the first n positions' router probabilities in decreasing
 * order (moe_vocab_rank_mass). Errors as moe_vocab_ep_rank_hist. */
moe_status moe_vocab_ep_rank_mass(const moe_vocab_ep *v, int n, double *mass);

/* Top-K distributions (generation) for N local positions, as
 * moe_vocab_head_topk: count[n] candidates in increasing token id at
 * ids/logp[n * stride ...], log P_K. Only the K chosen experts compute, on
 * their owners. stride >= moe_vocab_part_topk_size(p, K). Collective over
 * the ep group (every rank passes the same K; N may differ, and be 0 on a
 * rank that only serves its experts). Fails on every
 * ep rank: MOE_ERR_ARG (K, N < 0, stride), MOE_ERR_NONFINITE (router
 * logits, or the log-probabilities of a position), MOE_ERR_NOMEM. */
moe_status moe_vocab_ep_topk(moe_vocab_ep *v, int32_t *ids, float *logp, int32_t *count, int64_t stride,
                             const float *h, const moe_vocab_params *prm, int N, int K);

/* Seconds of the last forward or top-K call on this rank: router and
 * grouping at home, the exchange (dispatch + return), the experts' compute
 * at the owner, combine. */
typedef struct {
    double home, exchange, experts, combine;
} moe_vocab_ep_times;
moe_vocab_ep_times moe_vocab_ep_last_times(const moe_vocab_ep *v);

#endif
