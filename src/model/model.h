/* The GPT-2 style decoder with MoE feed-forward blocks over token ids
 * (vocab_size: 256 for bytes, a tokenizer's for BPE)
 * (docs/formats.md section 1): wte + wpe, n_layers pre-norm blocks
 * x += attn(ln_1(x)); x += ffn(ln_2(x)), where every moe_every-th block
 * (from block 0) has an MoE FFN (src/layer, expert-parallel over comm's ep
 * group) and the others a dense FFN, then ln_f and the head: logits =
 * ln_f(x) wte^T (head = full), or the vocabulary experts (head =
 * vocab_experts, src/vocab/head_ep.h: expert-parallel like the MoE FFNs,
 * untied from wte; no logits over the whole vocabulary are formed).
 *
 * Parameters and gradients each live in ONE contiguous block described by a
 * moe_tensor_table whose names are the checkpoint's /model paths. All
 * replicated (dense) tensors come first in the block, then all expert-sharded
 * tensors, so the dense gradients are one contiguous range.
 *
 * Data parallelism: world rank r holds global sequences [r*B, (r+1)*B) of
 * every batch (B local sequences, the same B on every rank), so the global
 * token index of its first token is r*B*T. Routing groups are group_seqs
 * consecutive local sequences; no result depends on the number of ranks. */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdint.h>

#include "comm/comm.h"
#include "config/config.h"
#include "core/tensor.h"
#include "layer/layer.h"
#include "layout/layout.h"
#include "vocab/head_ep.h"

typedef struct moe_model moe_model;

/* Statistics of the last forward, reduced over all ranks by
 * moe_model_reduce_stats. Arrays are owned by the model and valid until its
 * next forward. */
typedef struct {
    double ce_sum;          /* sum of the cross-entropy over all global tokens */
    int64_t tokens;         /* global tokens with a target */
    double ce;              /* ce_sum / tokens (nats per token) */
    double lb_sum, z_sum;   /* sums of L_bal and L_z over global groups x MoE layers */
    int64_t aux_terms;      /* global groups x MoE layers: divisor of the aux means */
    double loss;            /* ce + aux_loss_coef * mean L_bal + z_loss_coef * mean L_z */
    int n_moe_layers, n_experts;
    const int *moe_blocks;  /* (n_moe_layers) block index of each MoE layer */
    const int64_t *kept;    /* (n_moe_layers, E) kept assignments per expert, global */
    const int64_t *dropped; /* (n_moe_layers, E) dropped assignments per expert, global */
    /* head = vocab_experts (else 0 / NULL) */
    int vocab_experts;      /* M */
    const int64_t *vocab_tokens; /* (M) positions whose target is each expert's, global */
    int64_t vocab_covered;  /* positions whose target's expert is among the top vocab_top_k of q, global */
} moe_model_stats;

/* Builds the model for at most max_local_seqs sequences of cfg->seq_len per
 * call on this rank, and initialises the parameters (GPT-2: normal(0, 0.02),
 * residual projections (attn/c_proj, mlp/c_proj, experts/w2) scaled by
 * 1/sqrt(2 n_layers), biases 0, LN weights 1), each element drawn with
 * moe_rng_normal(seed, MOE_RNG_INIT, g lo, g hi, tensor id, 0) where g is its
 * GLOBAL element index in the tensor (rows of the vocabulary head by token
 * id) and the tensor id its table index, so the weights do not depend on
 * the number of ranks. Gradients start at 0.
 * vocab: the vocabulary partition when cfg->head = vocab_experts (copied:
 * it need not outlive the call; the same on every rank), else NULL.
 * comm: moe_comm_create_self for one process. Collective over world
 * (agrees on local failures, creates the MoE layers and the vocabulary
 * head's exchange); every rank returns non-OK if any fails. Fails with
 * MOE_ERR_ARG naming the field (bad sizes, E % ep_size, vocab_experts %
 * ep_size, no or a mismatched partition, max_local_seqs % group_seqs),
 * MOE_ERR_NOMEM. Owner: caller (moe_model_destroy). */
moe_status moe_model_create(moe_model **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                            int max_local_seqs, moe_comm *comm);
/* As moe_model_create, for a model whose parameters are loaded next
 * (evaluation, generation): no gradient block (half the parameter memory;
 * moe_model_grads returns NULL, moe_model_backward fails with
 * MOE_ERR_ARG), and the drawn initial weights are left at 0 (only the
 * constant ones are set), which saves a pass of the random generator over
 * every parameter. Collective as moe_model_create, same failures. */
moe_status moe_model_create_inference(moe_model **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                                      int max_local_seqs, moe_comm *comm);
void moe_model_destroy(moe_model *m);

/* What moe_model_create and a trainer (AdamW) would allocate on the
 * largest rank, in bytes, from the configuration alone: nothing is
 * allocated, so a run can refuse sizes the machine cannot hold before it
 * tries (src/train/run.c). state: parameters, gradients and both moments
 * (moe_layout_local_floats); activations: the model's activation block for
 * max_local_seqs sequences (the same size table the model allocates);
 * moe_layers: the MoE layers' per-row buffers at an even load (an uneven
 * load needs more). An estimate from below: small tables are left out.
 * cfg must have passed moe_train_config_check_model. Not collective. */
typedef struct {
    double state, activations, moe_layers, total;
} moe_model_memory;
void moe_model_memory_estimate(moe_model_memory *out, const moe_train_config *cfg, int max_local_seqs, int ep_size);

/* The parameter table (names, shapes, local offsets) and the two blocks
 * (table->total floats each). Owned by the model. */
const moe_tensor_table *moe_model_tensors(const moe_model *m);
float *moe_model_params(moe_model *m);
float *moe_model_grads(moe_model *m);
/* Floats of the leading dense (replicated) range of the blocks; expert
 * tensors occupy [dense_floats, total). */
size_t moe_model_dense_floats(const moe_model *m);
/* The parameters of tensor `kind` (layout.h) of block `block` (-1 for the
 * global tensors), or NULL when the model has none. Not collective. */
float *moe_model_param(moe_model *m, moe_tensor_kind kind, int block);
/* The MoE layer of block l, or NULL for a dense block. */
moe_layer *moe_model_layer(moe_model *m, int l);
/* Index of block l among the MoE blocks (0 .. n_moe_layers-1), -1 if dense. */
int moe_model_moe_index(const moe_model *m, int l);
int moe_model_n_moe_layers(const moe_model *m);
/* (n_moe_layers) block index of each MoE layer. Owned by the model. */
const int *moe_model_moe_blocks(const moe_model *m);
/* The experts' placement (cfg.placement, or contiguous blocks). Owned by the model. */
const moe_placement *moe_model_placement(const moe_model *m);
/* Expert slots per ep rank of every MoE layer: E/P, or (E + R)/P with R replicas. */
int moe_model_n_local_experts(const moe_model *m);
const moe_train_config *moe_model_config(const moe_model *m);

/* Sets every gradient to 0. Not collective. */
void moe_model_zero_grad(moe_model *m);

/* Forward over B local sequences of T <= seq_len tokens. inputs (B, T) token
 * ids; targets (B, T) ids or NULL (no loss: generation; the vocabulary head
 * then computes nothing); every id must be in [0, vocab_size) (MOE_ERR_ARG
 * naming the first that is not). train = 1 keeps what the backward needs
 * and draws router noise (if configured) keyed by step; train = 0 is pure
 * evaluation (no noise, no backward allowed). With the vocabulary head, a
 * training forward also runs the head's backward share at the experts'
 * owners (head_ep.h: one exchange round trip).
 * B % group_seqs == 0, B <= max_local_seqs. Computes this rank's partial
 * stats (see moe_model_reduce_stats). Collective over the ep group (MoE
 * layers). Fails with MOE_ERR_ARG on bad sizes; MoE layer failures
 * (MOE_ERR_NONFINITE, MOE_ERR_NOMEM, MOE_ERR_REMOTE) reach every rank of
 * the ep group. */
moe_status moe_model_forward(moe_model *m, const int32_t *inputs, const int32_t *targets, int B,
                             int T, int train, uint32_t step);

/* Backward of the last (train, with targets) forward; ACCUMULATES into the
 * gradient block the gradient of the global objective
 *   mean CE over all global tokens + aux_loss_coef * mean L_bal
 *   + z_loss_coef * mean L_z   (means over global groups x MoE layers),
 * i.e. this rank's share of it: reducing over ranks is the caller's job
 * (dense grads over WORLD, expert grads over REPLICA; src/train does it).
 * Collective over the ep group. MOE_ERR_ARG if the last forward was not a
 * training forward with targets. */
moe_status moe_model_backward(moe_model *m);

/* Reduces the last forward's partial stats over all ranks into *st.
 * Collective over world. If the last forward failed
 * (or none ran) on any rank, every rank returns non-OK (MOE_ERR_ARG there,
 * MOE_ERR_REMOTE elsewhere), so evaluation loops cannot hang. */
moe_status moe_model_reduce_stats(moe_model *m, moe_model_stats *st);

/* Logits of the last forward: (B, T, vocab_size), this rank's sequences;
 * NULL with the vocabulary head (it forms none). */
const float *moe_model_logits(const moe_model *m);
/* Per-position loss -log P(target) of the last forward with targets: (B, T),
 * this rank's sequences. */
const float *moe_model_losses(const moe_model *m);
/* The head's input h = ln_f(x) of the last forward, and dL/dh of the last
 * backward: (B, T, d_model), this rank's sequences. */
const float *moe_model_head_input(const moe_model *m);
const float *moe_model_head_grad(const moe_model *m);

/* ---- the vocabulary-expert head (head = vocab_experts; NULL / no-ops otherwise) ---- */
/* The model's partition (its own copy). */
const moe_vocab_part *moe_model_vocab(const moe_model *m);
/* The head over the ep group (for decoders: moe_vocab_ep_topk). */
moe_vocab_ep *moe_model_vocab_head(moe_model *m);
/* The head's tensors in a block laid out like the parameters (params,
 * grads, moments): router weight and bias, and this rank's rows of W_out
 * and c (expert-major). All NULL with head = full. */
moe_vocab_params moe_model_vocab_view(const moe_model *m, float *block);
/* The K the statistics' coverage (and a decoder) use, normally
 * vocab_top_k: for trying another K without retraining. MOE_ERR_ARG
 * outside [1, M] or with head = full. Not collective. */
moe_status moe_model_set_vocab_top_k(moe_model *m, int K);
int moe_model_vocab_top_k(const moe_model *m);

/* ---- pieces of a block for the KV-cache decoder (src/infer/decode.c),
 * so that it computes exactly what the forward does. Not collective. ---- */

/* The MoE layer parameter views of block l (NULL pointers where an option
 * leaves a tensor out). */
moe_layer_params moe_model_layer_params(moe_model *m, int l);
/* The same views into the gradient block (no expert_bias: a buffer). */
moe_layer_params moe_model_layer_grads(moe_model *m, int l);
/* The output head (V, d): wte when tied, else lm_head. */
const float *moe_model_head(moe_model *m);
/* The communicator the model was created over (borrowed). */
moe_comm *moe_model_comm(const moe_model *m);
/* ln_1 / ln_2 / ln_f as configured (LayerNorm or RMSNorm) over n rows of
 * d: out (n, d); mean, rstd (n) scratch; b may be NULL for RMSNorm. */
void moe_model_norm_rows(const moe_model *m, float *out, float *mean, float *rstd, const float *inp,
                         const float *w, const float *b, int n);
/* In place on n rows of c_attn's output (n, qkv width) of block l: the
 * q/k norm (qk_norm), then RoPE at positions pos[i] (< seq_len) when
 * pos = rope. rstd: scratch of n (n_heads + n_kv_heads) floats. */
void moe_model_qk_rows(moe_model *m, int l, float *qkv, float *rstd, const int *pos, int n);

#endif
