/* Training configuration: every key of `moe train` (INI file, overridable as
 * --key=value), with defaults. Keys are named like the checkpoint's /model
 * attributes plus the training keys. */
#ifndef MOE_TRAIN_CONFIG_H
#define MOE_TRAIN_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "core/moe.h"

typedef struct {
    /* model (checkpoint /model attributes) */
    int vocab_size;          /* 256, bytes (fixed) */
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
    /* training */
    int batch_size;          /* global sequences per step */
    int steps, warmup_steps, val_every, val_batches;
    double lr, min_lr_frac, weight_decay, grad_clip, beta1, beta2, adam_eps;
    double aux_loss_coef, z_loss_coef;
    double bias_update_rate; /* expert_bias: step of the bias update */
    uint32_t seed;
    int ep_size;             /* 0: world size */
    char data[1024], val_data[1024], out_dir[1024];
    double val_frac;         /* held-out fraction when val_data is empty */
    int log_every;
    /* exchange */
    int a2a;                 /* moe_a2a_kind */
    int a2a_chunks;
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
    int since;         /* checkpoint format_version that introduced the key (1, 2) */
    int is_default;    /* 1 when the value is the key's default for this configuration */
} moe_model_attr;
enum { MOE_MODEL_ATTRS_MAX = 64 };
/* Fills out[0 .. min(count, cap)) in key-table order; returns the count.
 * Never fails. */
int moe_train_config_model_attrs(const moe_train_config *c, moe_model_attr *out, int cap);
/* The checkpoint format_version a model needs: 2 when any key introduced
 * by format 2 differs from its default, else 1 (a format 1 file means the
 * defaults of every later key). Never fails. */
int moe_train_config_model_version(const moe_train_config *c);
/* Sets one [model] key from a typed value (a->type must be the key's;
 * names as moe_train_config_set reads them). No range check:
 * moe_train_config_check_model does that. MOE_ERR_ARG naming the key. */
moe_status moe_train_config_set_model_attr(moe_train_config *c, const moe_model_attr *a);

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
