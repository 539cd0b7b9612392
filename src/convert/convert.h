/* `moe convert`: a Hugging Face checkpoint directory into a moerun
 * checkpoint and back (docs/convert.md). Import reads config.json, the
 * safetensors files (memory-mapped, one tensor converted at a time) and an
 * optional tokenizer.json, and writes a checkpoint at step 0 with zero
 * optimizer state; export reads a checkpoint and writes config.json, the
 * safetensors files (F32, sharded as huggingface_hub does) and
 * tokenizer.json when the checkpoint has a tokenizer. Import then export
 * gives every tensor back bit for bit (F16/BF16 inputs: their exact
 * float32 values).
 *
 * One process, no MPI: the checkpoint is written and read through
 * moe_comm_self(). Errors name the file and the field or tensor (hf.h,
 * safetensors.h, ckpt.h). */
#ifndef MOE_CONVERT_H
#define MOE_CONVERT_H

#include <stdint.h>

#include "convert/hf.h"

typedef struct {
    int seq_cap;       /* seq_len = min(max_position_embeddings, seq_cap); 0: MOE_HF_DEFAULT_SEQ_CAP */
    int no_tokenizer;  /* 1: ignore tokenizer.json */
} moe_convert_import_opts;

typedef struct {
    moe_hf_type type;
    int64_t n_tensors, n_params, bytes; /* Hugging Face tensors, parameters, bytes read or written */
    int seq_len, max_positions;         /* seq_len chosen, the model's max_position_embeddings */
    int tokenizer;                      /* 1: a tokenizer was carried over */
    int dropless_warning;               /* export: the model has capacity_factor > 0, transformers is dropless */
    moe_train_config cfg;               /* the model */
} moe_convert_report;

/* hf_dir -> checkpoint file ckpt (written atomically). report may be NULL. */
moe_status moe_convert_import(const char *hf_dir, const char *ckpt, const moe_convert_import_opts *opts,
                              moe_convert_report *report);

/* checkpoint (file or run directory) -> out_dir (created if missing) as
 * model type `type` (< 0: moe_hf_type_for). shard_bytes 0: the default
 * (MOE_ST_DEFAULT_SHARD_BYTES). report may be NULL. */
moe_status moe_convert_export(const char *ckpt, const char *out_dir, int type, uint64_t shard_bytes,
                              moe_convert_report *report);

#endif
