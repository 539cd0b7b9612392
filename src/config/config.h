/* Training configuration: every key of `moe train` (INI file, overridable as
 * --key=value), with defaults. Keys are named like the checkpoint's /model
 * attributes plus the training keys. */
#ifndef MOE_TRAIN_CONFIG_H
#define MOE_TRAIN_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "core/moe.h"

/* The output head: the tied full softmax, or vocabulary experts. */
typedef enum { MOE_HEAD_FULL = 0, MOE_HEAD_VOCAB_EXPERTS = 1 } moe_head_kind;
/* How the vocabulary is partitioned into experts: token-frequency bands of
 * the training data, k-means over a checkpoint's wte, or a partition file. */
typedef enum { MOE_VOCAB_PART_FREQUENCY = 0, MOE_VOCAB_PART_KMEANS = 1, MOE_VOCAB_PART_FILE = 2 } moe_vocab_partition_kind;

typedef struct {
    /* model (checkpoint /model attributes) */
    int vocab_size;          /* token ids are < vocab_size (256 for bytes) */
    int vocab_size_user;     /* -1: not set (the tokenizer's, 256 for bytes), else the value the user set */
    int d_model, n_layers, n_heads, seq_len;
    int n_experts, top_k, d_ff, moe_every;
    moe_router_kind router;
    double capacity_factor;
    int normalize_topk;      /* resolved: 1 by default when top_k > 1, 0 when top_k == 1 */
    int normalize_topk_user; /* -1: not set (follows top_k), else the value the user set */
    double capacity_factor_user; /* NAN: not set by the user (default depends on router) */
    moe_activation activation;
    double ln_eps;
    int router_noise;        /* 0 none, 1 gaussian */
    int group_seqs;          /* sequences per routing group */
    /* architecture options (docs/training.md "Architecture"; checkpoint
     * format_version 2). A derived default is stored as its sentinel
     * (0, or -1 for attn_bias) and read through the moe_cfg_* accessors. */
    int norm;                /* moe_norm_kind: 0 layernorm, 1 rmsnorm */
    int pos;                 /* moe_pos_kind: 0 learned, 1 rope */
    double rope_theta;
    int n_kv_heads;          /* 0: n_heads */
    int head_dim;            /* 0: d_model / n_heads */
    int qk_norm;             /* moe_qk_norm_kind: 0 none, 1 full, 2 head */
    int linear_bias;         /* biases on every linear layer */
    int attn_bias;           /* -1: linear_bias */
    int tie_embeddings;      /* 0: a separate lm_head */
    /* router options (docs/routing.md section 8) */
    int score;               /* moe_score_kind: 0 softmax, 1 sigmoid */
    double route_scale;
    int expert_bias;         /* aux-loss-free balancing bias (a buffer) */
    int n_groups, topk_groups; /* group-limited routing; topk_groups 0: all */
    int aux_loss;            /* moe_aux_kind: 0 switch, 1 seq, 2 none */
    int n_shared;            /* shared experts S */
    int d_ff_shared;         /* 0: d_ff */
    int shared_gate;         /* sigmoid gate on the shared experts' output */
    /* the output head (docs/vocab-experts.md) */
    int head;                /* moe_head_kind: MOE_HEAD_FULL (tied softmax) or MOE_HEAD_VOCAB_EXPERTS */
    int vocab_experts;       /* M: vocabulary experts (head = vocab_experts) */
    int vocab_top_k;         /* K: experts a generation step computes (1 <= K <= M) */
    int vocab_partition;     /* moe_vocab_partition_kind: how the vocabulary is split */
    /* training */
    int batch_size;          /* global sequences per step */
    int steps, warmup_steps, val_every, val_batches;
    double lr, min_lr_frac, weight_decay, grad_clip, beta1, beta2, adam_eps;
    double aux_loss_coef, z_loss_coef;
    double bias_update_rate; /* expert_bias: step of the bias update */
    uint32_t seed;
    int ep_size;             /* 0: world size */
    char data[1024], val_data[1024], out_dir[1024];
    char tokenizer[1024];    /* tokenizer file of token data ("" none) */
    int data_format;         /* moe_data_format: 0 auto (".tok": tokens), 1 bytes, 2 tokens */
    double val_frac;         /* held-out fraction when val_data is empty */
    int log_every;
    /* building the vocabulary partition (not model attributes) */
    char vocab_partition_from[1024]; /* kmeans: a checkpoint whose /model/wte is clustered; file: a partition file */
    int kmeans_iters;        /* Lloyd assignment steps */
    double vocab_balance;    /* kmeans size cap ceil(V/M * balance); 0: none */
    /* exchange */
    int a2a;                 /* moe_a2a_kind */
    int a2a_chunks;
    double comm_timeout;     /* seconds without progress in a blocking phase before the job ends (0: never) */
    char placement[1024];    /* expert placement file ("" contiguous; docs/routing.md "Expert placement") */
    /* checkpoints (issue 5) */
    int ckpt_every, keep_last, dump_grads_every;
    char resume[1024];
} moe_train_config;

typedef enum { MOE_NORM_LAYERNORM = 0, MOE_NORM_RMSNORM = 1 } moe_norm_kind;
typedef enum { MOE_POS_LEARNED = 0, MOE_POS_ROPE = 1 } moe_pos_kind;
typedef enum { MOE_QK_NORM_NONE = 0, MOE_QK_NORM_FULL = 1, MOE_QK_NORM_HEAD = 2 } moe_qk_norm_kind;

/* The resolved values of the keys whose default follows another key. */
static inline int moe_cfg_kv_heads(const moe_train_config *c) { return c->n_kv_heads > 0 ? c->n_kv_heads : c->n_heads; }
static inline int moe_cfg_head_dim(const moe_train_config *c)
{
    return c->head_dim > 0 ? c->head_dim : c->n_heads > 0 ? c->d_model / c->n_heads : 0;
}
static inline int moe_cfg_attn_bias(const moe_train_config *c) { return c->attn_bias >= 0 ? c->attn_bias : c->linear_bias; }
static inline int moe_cfg_d_ff_shared(const moe_train_config *c) { return c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff; }
static inline int moe_cfg_topk_groups(const moe_train_config *c) { return c->topk_groups > 0 ? c->topk_groups : c->n_groups; }
/* Widths of the attention: query heads n_heads*head_dim (c_proj's input),
 * and c_attn's rows, q then k then v: (n_heads + 2 n_kv_heads) head_dim. */
static inline int moe_cfg_att_width(const moe_train_config *c) { return c->n_heads * moe_cfg_head_dim(c); }
static inline int moe_cfg_qkv_width(const moe_train_config *c)
{
    return (c->n_heads + 2 * moe_cfg_kv_heads(c)) * moe_cfg_head_dim(c);
}
/* comm_timeout when nothing sets it (every command: --comm_timeout). */
#define MOE_COMM_TIMEOUT_DEFAULT 300.0

/* Defaults (a small model that trains in minutes on 2 cores). */
void moe_train_config_default(moe_train_config *c);

/* Set one key from text. MOE_ERR_ARG with a detail naming the key and the
 * problem for unknown keys and bad values (out of range, not a number,
 * trailing garbage, unknown name); c is unchanged on error. Setting top_k or
 * normalize_topk re-resolves normalize_topk (top_k == 1 forces 0). */
moe_status moe_train_config_set(moe_train_config *c, const char *key, const char *value);

/* Load an INI file (keys may sit in any section or none) over c.
 * Comments start with '#' or ';' at the start of a line, or ' ;' inline;
 * leading whitespace is ignored (no continuation lines); a key set twice in
 * one file is an error. MOE_ERR_IO if unreadable, MOE_ERR_ARG (detail:
 * "file:line: key: problem") on bad content; keys before the bad line may
 * have been applied. */
moe_status moe_train_config_load(moe_train_config *c, const char *path);

/* The same for INI text held in memory (e.g. a checkpoint's root `config`
 * attribute); `origin` replaces the file name in messages
 * ("origin:line: key: problem"). Same rules and errors as
 * moe_train_config_load (MOE_ERR_NOMEM if no memory stream can be opened). */
moe_status moe_train_config_load_text(moe_train_config *c, const char *text, const char *origin);

/* The model part of moe_train_config_check: the ranges of the [model] keys
 * and their cross-field rules (heads divide d_model, top_k <= n_experts,
 * ...). Serves configurations read from checkpoints too. MOE_ERR_ARG
 * naming the key. Not collective. */
moe_status moe_train_config_check_model(const moe_train_config *c);

/* The [model] keys are the checkpoint's /model attributes: each as a typed
 * value (integers as int64, reals as double, enum keys by name). */
typedef struct {
    const char *name;  /* the key */
    enum { MOE_ATTR_INT, MOE_ATTR_REAL, MOE_ATTR_TEXT } type;
    int64_t i;         /* resolved (a derived default is written as its value) */
    double r;
    const char *text;  /* static storage */
    /* Keys added by format_version 2 exist in a file only where they apply
     * (e.g. vocab_experts only with head = vocab_experts): version2 = 1 for
     * such a key, and present says whether it applies to this
     * configuration. A file without the attribute means the key's default.
     * Format 1 keys have version2 = 0 and present = 1. */
    int version2, present;
} moe_model_attr;
enum { MOE_MODEL_ATTRS_MAX = 64 };
/* Fills out[0 .. min(count, cap)) in key-table order; returns the count.
 * Never fails. */
int moe_train_config_model_attrs(const moe_train_config *c, moe_model_attr *out, int cap);
/* 1 if some format-2 attribute applies to c (a checkpoint of c is then
 * written as format_version 2): an architecture or router option differs
 * from its default (a format 1 file means the defaults of them all), or
 * the head is vocab_experts. Never fails. */
int moe_train_config_needs_v2(const moe_train_config *c);
/* Sets one [model] key from a typed value (a->type must be the key's;
 * names as moe_train_config_set reads them). No range check:
 * moe_train_config_check_model does that. MOE_ERR_ARG naming the key. */
moe_status moe_train_config_set_model_attr(moe_train_config *c, const moe_model_attr *a);

/* The vocabulary of a run whose data has `data_vocab` ids (256 for bytes,
 * the tokenizer's vocab_size for token files; `what` names where it comes
 * from): c->vocab_size becomes data_vocab when the user did not set it; a
 * value the user set must be >= data_vocab (MOE_ERR_ARG naming both). */
moe_status moe_train_config_resolve_vocab(moe_train_config *c, int64_t data_vocab, const char *what);

/* Validation of every key's range and of the cross-field rules (heads divide
 * d_model, top_k <= n_experts, ...) given the world size (batch divisible by
 * ranks, E by ep_size, ...). MOE_ERR_ARG with a detail naming the key(s). */
moe_status moe_train_config_check(const moe_train_config *c, int world_size);

/* Writes the resolved configuration as INI text (for checkpoints and logs):
 * one "key = value" line for every key, under [section] headers, such that
 * loading it over the defaults gives the same configuration. Returns the
 * length of the full text (snprintf semantics: a result >= cap means buf
 * holds a truncated, terminated prefix). */
int moe_train_config_format(const moe_train_config *c, char *buf, int cap);

/* Prints every key with its default and a one-line description
 * (`moe train --help`). */
void moe_train_config_help(FILE *f);

/* The key table for documentation (the man page of `moe train`): key i,
 * 0 <= i < moe_train_config_n_keys(), in table order. Not collective;
 * MOE_ERR_ARG for i out of range. */
typedef struct {
    const char *name, *section, *help; /* static storage */
    char default_text[1024];           /* as --help prints it ("" for an empty path); fits any path key */
    char accepts[256];                 /* "an integer >= 1", "gelu, relu or swiglu", ... */
} moe_train_config_key_doc;
int moe_train_config_n_keys(void);
moe_status moe_train_config_key_doc_get(int i, moe_train_config_key_doc *out);

/* Command line of `moe train` over c (call moe_train_config_default first):
 * argv[0] is the command name and is skipped; every `--config FILE` (or
 * `--config=FILE`) is loaded first, in order, then every `--key=value` or
 * `--key value` is applied in order ('-' in a key reads as '_', so
 * --warmup-steps works). `--help`/`-h` anywhere sets *help = 1 and returns
 * MOE_OK with c untouched. Errors: MOE_ERR_IO for an unreadable config,
 * MOE_ERR_ARG naming the option for an unknown key, a missing or bad value
 * or a stray argument. Does not call moe_train_config_check. */
moe_status moe_train_config_parse_args(moe_train_config *c, int argc, char **argv, int *help);

#endif
