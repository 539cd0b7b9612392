/* Hugging Face MoE checkpoints <-> moerun models (docs/convert.md): the
 * config.json of model_type mixtral, qwen2_moe, qwen3_moe and olmoe as a
 * moerun configuration and back, and ONE table per model type that maps
 * each Hugging Face tensor name to a moerun tensor kind and a slice of it.
 * Import reads a checkpoint directory (safetensors.h) into a parameter
 * block laid out by src/layout; export lists the block's slices under
 * Hugging Face names for moe_st_write_dir.
 *
 * Nothing here is collective and nothing needs MPI. Errors name the file
 * and the field or tensor: MOE_ERR_FORMAT (config.json is not what the
 * format says: not JSON, a field of the wrong type; a tensor missing, of
 * another shape, or one a model of that config does not have),
 * MOE_ERR_ARG (a field that changes the computation in a way moerun does
 * not model: sliding windows in use, rope scaling, MLA attention, an
 * unknown model_type; a model an export type cannot express),
 * MOE_ERR_NOMEM. */
#ifndef MOE_CONVERT_HF_H
#define MOE_CONVERT_HF_H

#include <stddef.h>

#include "config/config.h"
#include "convert/safetensors.h"
#include "core/tensor.h"

typedef enum { MOE_HF_MIXTRAL, MOE_HF_QWEN2_MOE, MOE_HF_QWEN3_MOE, MOE_HF_OLMOE, MOE_HF_TYPE_COUNT } moe_hf_type;

/* "mixtral", ... and back (MOE_ERR_ARG naming the unknown name). */
const char *moe_hf_type_str(moe_hf_type t);
moe_status moe_hf_type_parse(moe_hf_type *out, const char *name);

/* Default seq_len cap of an import (max_position_embeddings above it is cut). */
enum { MOE_HF_DEFAULT_SEQ_CAP = 4096 };

/* config.json text (n bytes, need not be NUL-terminated; `what` names it in
 * messages) as a moerun configuration: every [model] key is set from the
 * model type and the config (never from moerun's defaults: normalize_topk
 * from norm_topk_prob or the type, tie_embeddings, capacity_factor 0 =
 * dropless, ...), seq_len = min(max_position_embeddings, seq_cap),
 * aux_loss_coef = top_k * router_aux_loss_coef when output_router_logits
 * (docs/convert.md: how the two balance losses relate), z_loss_coef 0.
 * The result passes moe_train_config_check_model. */
moe_status moe_hf_config_parse(moe_train_config *cfg, moe_hf_type *type, const char *json, size_t n,
                               const char *what, int seq_cap);

/* The model type an export of cfg defaults to (q/k norm full: olmoe, per
 * head: qwen3_moe; shared experts or q, k, v biases: qwen2_moe; else
 * mixtral), and whether `type` computes exactly what cfg does
 * (MOE_ERR_ARG naming the option that it cannot express). A capacity
 * factor > 0 is not an error (inference in transformers is dropless):
 * *warn, if not NULL, is set to 1 then. */
moe_status moe_hf_type_for(moe_hf_type *type, const moe_train_config *cfg);
moe_status moe_hf_type_check(moe_hf_type type, const moe_train_config *cfg, int *warn);

/* config.json for cfg as `type` (checked by moe_hf_type_check first):
 * every field the transformers class reads, so that it loads the exported
 * weights and computes what moerun does. *json is malloc'd (caller frees). */
moe_status moe_hf_config_write(char **json, size_t *n, const moe_train_config *cfg, moe_hf_type type);

/* Reads every tensor of the model into params (table: moe_layout_create of
 * cfg at ep size 1) from dir, by the type's table. Accepts the per-expert
 * names of the hub checkpoints and transformers 5's fused expert tensors
 * (mlp.experts.gate_up_proj [E, 2F, d], mlp.experts.down_proj [E, d, F]).
 * Checks every name and shape against the table before reading a byte:
 * a missing tensor, a shape that disagrees and a tensor the model does not
 * have are MOE_ERR_FORMAT naming the tensor (and its shard). F32, F16 and
 * BF16 convert exactly. Buffers (the router's expert bias) are set to 0. */
moe_status moe_hf_read(float *params, const moe_tensor_table *table, const moe_train_config *cfg, moe_hf_type type,
                       moe_st_dir *dir);

/* The tensors of an export of params under the type's per-expert Hugging
 * Face names (views into params: no copy), in model order. *names and
 * *zeros are storage the views point into (caller frees both, after
 * writing): zero q, k, v biases a qwen2_moe export needs when the model
 * has none. */
moe_status moe_hf_export_tensors(moe_st_tensor **out, size_t *n, char **names, float **zeros, const float *params,
                                 const moe_tensor_table *table, const moe_train_config *cfg, moe_hf_type type);

#endif
