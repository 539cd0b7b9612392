/* Checkpoints and gradient dumps (docs/formats.md, format_version 1 and 2:
 * a file is written as 2 only when it holds one of format 2's additions: a
 * /tokenizer group or a format 2 /model attribute (a non-default
 * architecture or router option, or the vocabulary-expert head). Both are
 * read; a format 1 file means the defaults of every later key).
 *
 * One checkpoint is one HDF5 file written by all ranks together through
 * parallel HDF5. Everything here is generic over a moe_tensor_table: each
 * table entry `name` becomes /model/<name>, and for parameters (not
 * buffers) /optimizer/m/<name> and /optimizer/v/<name>, with the tensor's
 * GLOBAL shape; expert-sharded tensors are written by their owners
 * (replica 0 only), replicated ones by world rank 0. Rows of a tensor with
 * a row map (the vocabulary experts' rows, table row_ids) are scattered to
 * their global row ids in one collective write, and read back the same
 * way, so a file loads on any ep size. An integer tensor (dtype
 * MOE_TENSOR_I32) is stored as int32. Every dataset is chunked (one chunk
 * per expert row for [E, ...] datasets) and carries HDF5's Fletcher32
 * checksum, which HDF5 verifies on every read. A file is format_version 2
 * when its model uses a format 2 addition (ckpt_format_version), else 1.
 *
 * The MoE layers of a table are the distinct `layer` values of its
 * FFN expert tensors, in increasing order; per-layer arrays below are
 * indexed by that ordinal (0 .. n_moe-1), not by block index.
 *
 * Every call takes a moe_comm (moe_comm_create_self for one process). */
#ifndef MOE_CKPT_H
#define MOE_CKPT_H

#include <stdint.h>

#include "comm/comm.h"
#include "config/config.h"
#include "core/moe.h"
#include "core/tensor.h"
#include "tokenizer/tokenizer.h"

enum {
    MOE_CKPT_FORMAT_VERSION = 2,     /* the newest version written and read */
    MOE_CKPT_FORMAT_VERSION_MIN = 1, /* the oldest read (a format 1 file means the format 2 defaults) */
    MOE_CKPT_MAX_EXTRA = 8,      /* resume integers beyond step/tokens_seen/seed */
    MOE_CKPT_EXTRA_NAME = 32,
    MOE_CKPT_MAX_MOE_LAYERS = 4096,
};

/* A named int64 stored as a /train attribute: whatever a run needs to resume
 * bit-exactly (data cursor, epoch, ...). The trainer documents the names. */
typedef struct {
    char name[MOE_CKPT_EXTRA_NAME];
    int64_t value;
} moe_ckpt_extra;

/* Everything a checkpoint holds. Pointers are borrowed, never freed here. */
typedef struct {
    const moe_tensor_table *table;
    float *params;             /* (table->total) */
    float *m, *v;              /* (table->total) AdamW moments; NULL on load: skip them */
    int n_experts;             /* E, dim 0 of every expert tensor */
    /* Per MoE layer (ordinal, see above), global expert index. expert_step
     * is authoritative only for the experts this rank owns (the file takes
     * each row from its owner: under a placement, from the expert's
     * primary copy, see the table's row_primary; load fills every row). The stats are global
     * and identical on all ranks (rank 0's copy is written). NULL on load: skip. */
    int64_t *expert_step;      /* (n_moe, E) */
    int64_t *expert_tokens;    /* (n_moe, E) kept assignments since step 0 */
    int64_t *expert_dropped;   /* (n_moe, E) dropped assignments since step 0 */
    /* The vocabulary experts (cfg->head = vocab_experts; M = cfg->vocab_experts),
     * global expert index, as above: vocab_expert_step authoritative for the
     * owned experts. NULL on load: skip. */
    int64_t *vocab_expert_step;   /* (M) /optimizer/expert_step/vocab_head */
    int64_t *vocab_expert_tokens; /* (M) /stats/vocab_head/expert_tokens: targets per expert since step 0 */
    /* /optimizer attributes */
    int64_t opt_step;
    double lr, beta1, beta2, eps, weight_decay;
    /* /train attributes */
    int64_t step, tokens_seen;
    uint64_t seed;
    moe_ckpt_extra extra[MOE_CKPT_MAX_EXTRA];
    int n_extra;
    /* root `config` (save: the resolved config text; load: see moe_ckpt_load) */
    const char *config_text;
    /* the model: written as /model attributes; on load the file must match it */
    const moe_train_config *cfg;
    /* save: the tokenizer of the model's ids, written as /tokenizer (the
     * file is then format_version 2); NULL for a byte-level model. Not read
     * by moe_ckpt_load (moe_ckpt_load_tokenizer reads it). */
    const moe_tok *tok;
} moe_ckpt_state;

/* ---- tables ---- */

/* Number of MoE layers of a table and (if layers != NULL) their block
 * indices in increasing order (layers has room for MOE_CKPT_MAX_MOE_LAYERS).
 * Not collective. */
int moe_ckpt_moe_layers(const moe_tensor_table *t, int *layers);

/* The table of a model configuration: moe_layout_create (src/layout). */

/* ---- checkpoints ---- */

/* Collective over c's world. Writes `path` atomically: every rank writes
 * its part of `path`.tmp (collective, filtered writes), rank 0 fsyncs and
 * renames it into place. Before touching the file the ranks check that
 * their tables, attributes and config text agree (MOE_ERR_MISMATCH).
 * Fails with MOE_ERR_IO naming the file. Every rank returns the same
 * status and detail. */
moe_status moe_ckpt_save(const char *path, moe_comm *c, const moe_ckpt_state *st);

/* Collective over c's world; the world and ep sizes may differ from the
 * saving run's (E % ep_size == 0). st->table/params/cfg must be set; m/v,
 * expert_step and the stats are filled when non-NULL. Validates before it
 * reads or allocates: the file opens (MOE_ERR_IO / MOE_ERR_FORMAT naming
 * it), format and format_version, every /model attribute equals st->cfg
 * (MOE_ERR_MISMATCH naming the attribute and both values), every dataset
 * exists with the shape the table implies (MOE_ERR_FORMAT). A Fletcher32
 * failure gives MOE_ERR_CHECKSUM naming dataset and file. Each rank reads
 * only its own expert rows. On success the scalar attributes are filled and
 * *config_text (if non-NULL) receives a malloc'd copy of the root config
 * (caller frees). On failure the buffers' contents are unspecified. Every
 * rank returns the same status and detail. */
moe_status moe_ckpt_load(const char *path, moe_comm *c, moe_ckpt_state *st, char **config_text);

/* The tokenizer stored in the checkpoint at path (a file or a run
 * directory) into *out (caller destroys), or *out = NULL when the file has
 * no /tokenizer (a byte-level model: format 1, or 2 without one). World
 * rank 0 reads and checks it (moe_ckpt_file_tokenizer) and every rank gets
 * the same tokenizer. Collective over c's world; every rank returns the
 * same status and detail (MOE_ERR_IO / MOE_ERR_FORMAT / MOE_ERR_CHECKSUM
 * naming the file and the dataset). */
moe_status moe_ckpt_load_tokenizer(moe_tok **out, const char *path, moe_comm *c);

/* ---- gradient dumps ("moe-gradients") ---- */

/* Collective over c's world, atomic like moe_ckpt_save. grads (table->total)
 * are this rank's reduced gradients (expert rows of inactive experts must be
 * zero, as the backward pass leaves them); activated (n_moe, E) the global
 * mask, identical on all ranks; vocab_activated (M) the same for the
 * vocabulary experts (/grad/vocab_head/activated; NULL without them).
 * Buffers have no gradient and are not written. */
moe_status moe_ckpt_save_grads(const char *path, moe_comm *c, const moe_tensor_table *table,
                               const float *grads, const uint8_t *activated, const uint8_t *vocab_activated,
                               int n_experts, int64_t step, const moe_train_config *cfg, const char *config_text);

/* ---- run directories ---- */

/* out_dir/ckpt-<step, 6+ digits>.h5 into buf (cap bytes). MOE_ERR_ARG if it
 * does not fit. Not collective. */
moe_status moe_ckpt_path(char *buf, size_t cap, const char *out_dir, int64_t step);

/* Not collective (call on world rank 0 after a successful moe_ckpt_save).
 * Points out_dir/latest at the file name of ckpt_path (temp + rename), then
 * deletes the oldest ckpt-*.h5 of out_dir beyond keep_last (keep_last <= 0:
 * keep all), never the one `latest` names. */
moe_status moe_ckpt_commit(const char *out_dir, const char *ckpt_path, int keep_last);

/* Not collective. `path` is a checkpoint file, or a run directory meaning
 * the file its `latest` names. Writes the file path into buf. MOE_ERR_IO
 * naming the path when neither exists. */
moe_status moe_ckpt_resolve(char *buf, size_t cap, const char *path);

#endif
