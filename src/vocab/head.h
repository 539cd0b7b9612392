/* Vocabulary experts, part 1: the output head's kernels, single process
 * (docs/vocab-experts.md). For final hidden states h (N, d):
 *   router   r = W_r h + b_r (M), q = softmax(r);
 *   expert m z_m = W_{S_m} h + c_{S_m} over its own tokens, p_m = softmax(z_m);
 *   model    P(v | h) = q_{assign[v]} p_{assign[v]}(v);
 *   training loss for target y, m* = assign[y]: -log q_{m*} - log p_{m*}(y),
 *            computed by expert m* alone;
 *   top-K    P_K(v) = P(v | h) / sum_{m in T_K} q_m over the union of the
 *            S_m of the K experts with the largest q (ties to the lower index).
 *
 * The computation is split where part 2 puts the expert-parallel exchange:
 *   (i)   router forward / backward (on the position's rank);
 *   (ii)  grouping: which rows go to which expert (moe_vocab_group), and
 *         packing h rows in that order (the send layout);
 *   (iii) expert compute on rows grouped by (local) expert (the receive
 *         layout): per-row loss terms and dh rows, expert gradients;
 *   (iv)  combine: loss terms and dh rows back to their positions.
 * moe_vocab_head (bottom) composes them for one process.
 *
 * Conventions (llm.c style): outputs, then inputs, then sizes; backward
 * functions ACCUMULATE into parameter gradients and into dh. Expert rows of
 * W_out and c are expert-major (partition.h): the w, b pointers given to
 * expert kernels point at the first row of expert m0, and an expert's rows
 * are one contiguous block, so its logits are one GEMM.
 *
 * Threads: every kernel splits its work into tiles FIXED by the data (64
 * rows of an expert, 256 tokens of an expert, 16 router rows), each computed
 * by one single-threaded GEMM on one thread; the tiles are dealt to the
 * threads of a fork-join region (core/par.h). No sum is split across
 * threads, so every result is bitwise independent of the thread count.
 *
 * Every kernel has a plain _ref (naive loops in double) that tests hold it
 * to; the whole-head references at the bottom work on parameters stored by
 * token id with no grouping at all. */
#ifndef MOE_VOCAB_HEAD_H
#define MOE_VOCAB_HEAD_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"
#include "vocab/partition.h"

/* The head's parameters (or gradients, or AdamW moments): one block. */
typedef struct {
    float *router_w; /* (M, d) */
    float *router_b; /* (M) */
    float *w;        /* (V, d) output rows, expert-major */
    float *b;        /* (V) output biases, expert-major */
} moe_vocab_params;

/* Floats of one block, and the pointers into it (order: router_w, router_b, w, b). */
size_t moe_vocab_params_numel(int V, int d, int M);
void moe_vocab_params_point(moe_vocab_params *p, float *block, int V, int d, int M);

/* ---- (i) router ---- */

/* logits (N, M) = h w^T + b; q (N, M) = softmax(logits); lse (N) = logsumexp(logits).
 * h (N, d), w (M, d), b (M). Never fails. */
void moe_vocab_router_forward(float *logits, float *q, float *lse, const float *h, const float *w, const float *b,
                              int N, int d, int M);
void moe_vocab_router_forward_ref(float *logits, float *q, float *lse, const float *h, const float *w,
                                  const float *b, int N, int d, int M);

/* Backward of sum_n dloss * (-log q[n, expert[n]]):
 * dlogits (N, M) = (q - onehot(expert)) * dloss (written; may be q, which
 * it then overwrites); dh (N, d) += dlogits w; dw (M, d) += dlogits^T h;
 * db (M) += column sums of dlogits. Never fails. */
void moe_vocab_router_backward(float *dh, float *dw, float *db, float *dlogits, const float *q,
                               const int32_t *expert, const float *h, const float *w, float dloss, int N, int d,
                               int M);
void moe_vocab_router_backward_ref(float *dh, float *dw, float *db, float *dlogits, const float *q,
                                   const int32_t *expert, const float *h, const float *w, float dloss, int N,
                                   int d, int M);

/* ---- (ii) grouping ---- */

/* expert (N) = assign[targets[n]]. MOE_ERR_ARG naming the first position
 * whose target is not a token id in [0, V). */
moe_status moe_vocab_target_experts(int32_t *expert, const int32_t *targets, const moe_vocab_part *p, int N);

/* Stable counting sort of n items by expert (n) in [0, M): order (n) lists
 * the items of expert 0 in increasing item order, then expert 1, ...;
 * offsets (M+1) delimits them (offsets[m+1] - offsets[m] = the rows expert m
 * receives: its "activated" count). Never fails. */
void moe_vocab_group(int32_t *order, int32_t *offsets, const int32_t *expert, int n, int M);

/* Packs rows in group order: items are (position, choice) pairs numbered
 * position * K + choice (K = 1 in training), so row i of x (n, d) is
 * h[order[i] / K]; y (n), if not NULL, gets targets[order[i] / K]. */
void moe_vocab_pack(float *x, int32_t *y, const float *h, const int32_t *targets, const int32_t *order, int n,
                    int K, int d);

/* ---- (iii) expert compute on grouped rows ----
 * Local experts m0..m1-1 (m1 - m0 = El); offsets (El+1) delimit the rows of
 * each: expert m0 + j has rows [offsets[j], offsets[j+1]) of x, y, loss, dx
 * (offsets[0] = 0). w (n_local, d), b (n_local) are the expert-major rows of
 * those experts (row 0 = the first token of S_{m0}). The logits of expert m
 * for its R_m rows are an (R_m, |S_m|) block of the scratch; blocks follow
 * each other in expert order. */

/* Floats of that scratch: sum over local experts of R_m |S_m|. */
int64_t moe_vocab_expert_scratch(const int32_t *offsets, const moe_vocab_part *p, int m0, int m1);

/* loss (R) = -log p_m(y) = logsumexp(z_m) - z_m[y] per row; probs (scratch)
 * = p_m for every row, saved for the backward. Fails with MOE_ERR_ARG if a
 * row's target is not a token of its expert (naming row, token and expert). */
moe_status moe_vocab_expert_forward(float *loss, float *probs, const float *x, const int32_t *y,
                                    const int32_t *offsets, const float *w, const float *b,
                                    const moe_vocab_part *p, int m0, int m1, int d);
moe_status moe_vocab_expert_forward_ref(float *loss, float *probs, const float *x, const int32_t *y,
                                        const int32_t *offsets, const float *w, const float *b,
                                        const moe_vocab_part *p, int m0, int m1, int d);

/* Backward of sum_rows dloss * loss: probs (as forward left it) is
 * overwritten with dlogits = (p - onehot(y)) * dloss; dx (R, d) written (it
 * may be x: every expert's x rows are read before its dx rows are written,
 * and x is then destroyed); dw, db (local rows) += the expert gradients.
 * Rows of experts with no rows are not touched (their gradient stays exactly
 * what it was). Never fails. */
void moe_vocab_expert_backward(float *dx, float *dw, float *db, float *probs, const float *x, const int32_t *y,
                               const int32_t *offsets, const float *w, const moe_vocab_part *p, int m0, int m1,
                               int d, float dloss);
void moe_vocab_expert_backward_ref(float *dx, float *dw, float *db, float *probs, const float *x,
                                   const int32_t *y, const int32_t *offsets, const float *w,
                                   const moe_vocab_part *p, int m0, int m1, int d, float dloss);

/* The same backward in two halves, for the expert-parallel head, where the
 * data half runs in the forward's exchange (its dx rows travel back with
 * the loss) and the weight half later, on the owner alone:
 * _data: probs becomes dlogits (as above), dx (R, d) written (must not be
 * x, which the weight half still needs); _weights: dw, db += from the
 * dlogits _data left and x. Together they give the bits of
 * moe_vocab_expert_backward. Never fail. */
void moe_vocab_expert_backward_data(float *dx, float *probs, const int32_t *y, const int32_t *offsets,
                                    const float *w, const moe_vocab_part *p, int m0, int m1, int d, float dloss);
void moe_vocab_expert_backward_weights(float *dw, float *db, const float *dlogits, const float *x,
                                       const int32_t *offsets, const moe_vocab_part *p, int m0, int m1, int d);

/* Generation: logp (scratch) = log p_m = z_m - logsumexp(z_m) for every
 * row of every local expert. Never fails. */
void moe_vocab_expert_logprobs(float *logp, const float *x, const int32_t *offsets, const float *w,
                               const float *b, const moe_vocab_part *p, int m0, int m1, int d);
moe_status moe_vocab_expert_logprobs_ref(float *logp, const float *x, const int32_t *offsets, const float *w,
                                         const float *b, const moe_vocab_part *p, int m0, int m1, int d);

/* ---- (iv) combine ---- */

/* loss (N) = (lse[n] - logits[n, expert[n]]) + row_loss[i], i the grouped
 * row of position n (order as moe_vocab_group made it, K = 1). */
void moe_vocab_combine_loss(float *loss, const float *logits, const float *lse, const int32_t *expert,
                            const float *row_loss, const int32_t *order, int N, int M);

/* dh[order[i] / K] += dx[i] for the n grouped rows (in i order); row i of
 * dx starts at dx + i * ldx (ldx >= d: the exchange returns wider rows). */
void moe_vocab_combine_dh(float *dh, const float *dx, int64_t ldx, const int32_t *order, int n, int K, int d);

/* Top-K selection: sel (N, K) = the K largest q per row, decreasing, ties to
 * the lower index (routing's top-k rule). */
void moe_vocab_topk_select(int32_t *sel, const float *q, int N, int M, int K);

/* Top-K distribution lists: for position n, count[n] candidates at
 * ids[n * stride ...] in increasing token id, logp = log P_K(v) =
 * log q_m - log(sum_{T_K} q) + log p_m(v). logits, lse from the router;
 * sel (N, K); rows (N*K): item n*K+k's log p_m over S_m, m = sel[n*K+k]
 * (as moe_vocab_expert_logprobs computed it, wherever it sits: a block of
 * the grouped scratch, a row the exchange brought back). stride >=
 * moe_vocab_part_topk_size(p, K). Never fails. */
void moe_vocab_topk_combine(int32_t *ids, float *logp, int32_t *count, int64_t stride, const float *logits,
                            const float *lse, const int32_t *sel, const float *const *rows,
                            const moe_vocab_part *p, int N, int K);

/* Dense form of the lists, (N, V): exp(logp) at the candidates, 0 elsewhere. */
void moe_vocab_topk_dense(float *P, const int32_t *ids, const float *logp, const int32_t *count, int64_t stride,
                          int N, int V);

/* Positions whose expert lies in the top-K of q (ties to the lower index). */
int64_t moe_vocab_coverage(const float *q, const int32_t *expert, int N, int M, int K);
/* hist (M) += the positions whose expert has rank r in q (0: the largest;
 * ties to the lower index): the coverage at K is the sum of hist[0 .. K). */
void moe_vocab_rank_hist(int64_t *hist, const float *q, const int32_t *expert, int N, int M);
/* mass (M) += the r-th largest q of each of the N positions: the router
 * mass the top-K experts keep is the sum of mass[0 .. K), over N. */
void moe_vocab_rank_mass(double *mass, const float *q, int N, int M);

/* ---- the head, one process ---- */
typedef struct moe_vocab_head moe_vocab_head;

/* Workspaces grow on demand (with N, K and the expert loads); p is borrowed
 * and must outlive the head. MOE_ERR_ARG (d < 1), MOE_ERR_NOMEM. */
moe_status moe_vocab_head_create(moe_vocab_head **out, const moe_vocab_part *p, int d);
void moe_vocab_head_destroy(moe_vocab_head *hd);

/* Training / evaluation forward: loss (N) = -log P(y_n | h_n) per position,
 * by the factorised form. Keeps what backward and coverage need. Fails with
 * MOE_ERR_ARG (N < 1, a target out of range, naming the position),
 * MOE_ERR_NOMEM, MOE_ERR_NONFINITE (a non-finite loss, naming the first
 * position). */
moe_status moe_vocab_head_forward(moe_vocab_head *hd, float *loss, const float *h, const int32_t *targets,
                                  const moe_vocab_params *prm, int N);
/* Backward of the last forward, dL/dloss[n] = dloss for every n: dh (N, d)
 * and every gradient of grad accumulate; the rows of an expert that no
 * position targets are not touched. MOE_ERR_ARG when no forward preceded. */
moe_status moe_vocab_head_backward(moe_vocab_head *hd, float *dh, moe_vocab_params *grad, const float *h,
                                   const moe_vocab_params *prm, float dloss);
/* (M) rows each expert received in the last forward: the optimizer updates
 * expert m (its rows of w and b) only when this is > 0. */
const int32_t *moe_vocab_head_activated(const moe_vocab_head *hd);
/* (N, M) router probabilities of the last forward. */
const float *moe_vocab_head_router_probs(const moe_vocab_head *hd);
/* Coverage of the last forward: positions whose target expert is among the
 * top K of q. MOE_ERR_ARG when K is not in [1, M] or no forward preceded. */
moe_status moe_vocab_head_coverage(const moe_vocab_head *hd, int K, int64_t *covered);

/* Top-K distributions (generation) for N positions, as moe_vocab_topk_combine
 * describes: only the K chosen experts compute logits. stride >=
 * moe_vocab_part_topk_size(p, K). MOE_ERR_ARG (K not in [1, M], N < 1, stride
 * too small), MOE_ERR_NOMEM, MOE_ERR_NONFINITE (non-finite router logits). */
moe_status moe_vocab_head_topk(moe_vocab_head *hd, int32_t *ids, float *logp, int32_t *count, int64_t stride,
                               const float *h, const moe_vocab_params *prm, int N, int K);

/* ---- whole-head references, parameters BY TOKEN ID ----
 * rw (M, d), rb (M), w (V, d), b (V) with rows in token-id order; assign
 * (V). Naive loops in double, no grouping: an independent formulation.
 * They fail only with MOE_ERR_NOMEM (the loss: NaN). */

/* Per-position loss (N, may be NULL) -log q_{m*} - log p_{m*}(y); returns their mean. */
double moe_vocab_loss_ref(double *loss, const float *h, const int32_t *targets, const float *rw, const float *rb,
                          const float *w, const float *b, const int32_t *assign, int N, int d, int V, int M);
/* Gradients of sum_n dloss * loss[n]: dh (N, d), drw, drb, dw, db accumulate. */
moe_status moe_vocab_backward_ref(float *dh, float *drw, float *drb, float *dw, float *db, const float *h,
                                  const int32_t *targets, const float *rw, const float *rb, const float *w,
                                  const float *b, const int32_t *assign, int N, int d, int V, int M, double dloss);
/* The exact model P (N, V) = q_{assign[v]} p_{assign[v]}(v). */
moe_status moe_vocab_model_ref(double *P, const float *h, const float *rw, const float *rb, const float *w,
                               const float *b, const int32_t *assign, int N, int d, int V, int M);
/* Dense top-K distribution P_K (N, V), top K by q computed in double. */
moe_status moe_vocab_topk_ref(double *P, const float *h, const float *rw, const float *rb, const float *w,
                              const float *b, const int32_t *assign, int N, int d, int V, int M, int K);

#endif
