/* The one descriptor of every tensor of the model: name (its /model path),
 * shape, which dimension is sharded over experts, dense or expert, parameter
 * or buffer, weight decay and init kind, and under which options it exists.
 * From it moe_layout_create builds the moe_tensor_table that the model
 * (allocation, init, views), the trainer (reduction, AdamW), checkpoints
 * (datasets and shapes), the decoder and `moe inspect` all use; a new
 * tensor or architecture option is added here, once.
 *
 * Order: the global tensors before the blocks (wte, wpe), then every block
 * l = 0 .. n_layers-1 (its common tensors, then those of an MoE or of a
 * dense feed-forward), then the global tensors after them (ln_f). The table
 * index is part of each tensor's init random key, so the order is part of
 * the format. Offsets: every replicated tensor first (in table order), then
 * every expert-sharded one, so the dense gradients are one range.
 *
 * Architecture options (docs/training.md) are predicates on lines: no
 * biases when linear_bias = 0 (attn_bias for q, k, v), no wpe with RoPE,
 * norms without bias for RMSNorm, q_norm/k_norm with qk_norm, lm_head when
 * untied, shared experts (dense even with an expert-like leading dim:
 * sharded = 0), the router's expert_bias as a MOE_TENSOR_BUFFER. A tensor
 * absent under the defaults does not move the others, so the defaults keep
 * every table index (and initial weight) of format 1.
 *
 * The vocabulary-expert head (head = vocab_experts, after ln_f) is the
 * first user of the general pieces: its partition vocab_head/assign is a
 * checkpointed int32 buffer (no gradient, no optimizer state), and its
 * output rows vocab_head/weight [V, d] and bias [V] are sharded by
 * vocabulary expert: rank r of the ep group holds the rows of experts
 * [r M/P, (r+1) M/P) in expert-major order, one segment per expert
 * (seg_off), each local row's token id in row_ids. */
#ifndef MOE_LAYOUT_H
#define MOE_LAYOUT_H

#include "config/config.h"
#include "core/tensor.h"
#include "layout/placement.h"
#include "vocab/partition.h"

typedef enum {
    MOE_T_WTE, MOE_T_WPE, MOE_T_LNF_W, MOE_T_LNF_B,
    /* every block */
    MOE_T_LN1_W, MOE_T_LN1_B, MOE_T_QKV_W, MOE_T_QKV_B, MOE_T_PROJ_W, MOE_T_PROJ_B, MOE_T_LN2_W, MOE_T_LN2_B,
    /* a dense feed-forward block */
    MOE_T_FC_W, MOE_T_FC_B, MOE_T_FCPROJ_W, MOE_T_FCPROJ_B,
    /* an MoE block */
    MOE_T_ROUTER_W, MOE_T_NOISE_W, MOE_T_EXP_W1, MOE_T_EXP_B1, MOE_T_EXP_W2, MOE_T_EXP_B2,
    /* architecture options: q/k norms (every block), untied head (global),
     * router bias and shared experts (MoE blocks) */
    MOE_T_QNORM_W, MOE_T_KNORM_W, MOE_T_LM_HEAD, MOE_T_EXP_BIAS,
    MOE_T_SH_W1, MOE_T_SH_B1, MOE_T_SH_W2, MOE_T_SH_B2, MOE_T_SH_GATE,
    /* the vocabulary-expert head (global, after ln_f) */
    MOE_T_VOCAB_ASSIGN, MOE_T_VOCAB_ROUTER_W, MOE_T_VOCAB_ROUTER_B, MOE_T_VOCAB_W, MOE_T_VOCAB_B,
    MOE_T_COUNT
} moe_tensor_kind;

/* How a parameter starts (GPT-2): normal(0, 0.02), the same scaled by
 * 1/sqrt(2 n_layers) for residual projections, zeros, ones; the partition's
 * assign (vocab_head/assign). */
typedef enum { MOE_INIT_NORMAL, MOE_INIT_RESID, MOE_INIT_ZERO, MOE_INIT_ONE, MOE_INIT_ASSIGN } moe_init_kind;

/* 1 if block l has an MoE feed-forward (every moe_every-th from block 0). */
int moe_layout_block_is_moe(const moe_train_config *cfg, int l);

/* The table of cfg's model for ep rank ep_rank of ep_size (which must
 * divide n_experts, and vocab_experts with head = vocab_experts): names,
 * global shapes, local rows, kinds, offsets. vocab: the vocabulary
 * partition (head = vocab_experts: required, with cfg's vocab_size and
 * vocab_experts; its layout is copied, so it need not outlive the table;
 * head = full: ignored, may be NULL). Checks the model keys first
 * (moe_train_config_check_model), so that a file's absurd attributes never
 * reach an allocation. MOE_ERR_ARG naming the key, MOE_ERR_NOMEM. Not
 * collective. */
moe_status moe_layout_create(moe_tensor_table **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                             int ep_rank, int ep_size);
/* The same with the FFN experts placed by `placement` (its MoE layers in
 * block order, its ranks = ep_size; NULL or contiguous: exactly
 * moe_layout_create). Under a non-contiguous placement an expert tensor
 * holds S rows (the rank's slots), row_ids their global experts and
 * row_primary which copies are primary; init and checkpoints key rows by
 * their global expert, so values do not depend on the placement. */
moe_status moe_layout_create_placed(moe_tensor_table **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                                    const moe_placement *placement, int ep_rank, int ep_size);
void moe_layout_destroy(moe_tensor_table *t);

/* The floats of the largest local parameter block of cfg's model on an ep
 * group of ep_size, from the descriptor alone (no table, no partition, no
 * allocation): what moe_layout_create's total would be, with the
 * vocabulary head's rows taken as an even share. In double, so that any
 * configuration the key table admits gives a finite count. cfg must have
 * passed moe_train_config_check_model. Not collective. */
double moe_layout_local_floats(const moe_train_config *cfg, int ep_size);

/* Table index of tensor `kind` of block `layer` (-1 for global tensors),
 * or -1 when the model has no such tensor. Not collective. */
int moe_layout_find(const moe_tensor_table *t, moe_tensor_kind kind, int layer);

#endif
