/* Training configuration: one table describes every key (type, range,
 * section, help); strict value parsing, the INI loader (libinih), the
 * cross-field checks, the INI writer, `moe train --help` and the command
 * line are all driven by it, so a key is added in exactly one place. */
#include "config/config.h"

#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "comm/comm.h"
#include "data/data.h"

typedef enum { T_INT, T_U32, T_REAL, T_STR, T_ENUM } key_type;

/* A numeric key accepts [lo, hi]; lo_open / hi_open make a bound strict.
 * Integer keys with hi == INT_MAX and real keys with hi == HUGE_VAL have no
 * upper bound; a real key with lo == -HUGE_VAL has no lower bound. */
typedef struct {
    const char *name;
    const char *section;       /* header under which format and help list it */
    key_type type;
    size_t off;                /* offset in moe_train_config */
    double lo, hi;
    unsigned char lo_open, hi_open;
    const char *const *names;  /* T_ENUM: value v is names[v], NULL-terminated */
    const char *help;
    /* [model] keys of format_version 2: whether the key applies to a
     * configuration (its /model attribute is then written and compared);
     * NULL for the format 1 keys, which always apply. */
    int (*present)(const moe_train_config *c);
    /* A default that follows other keys: while the field holds `sentinel`
     * its value is follows(c) (config.h's moe_cfg_* accessors). */
    int (*follows)(const moe_train_config *c);
    int sentinel;
} key_desc;

/* Enum keys store the index of the name, which must equal the C enum value. */
static const char *const router_names[] = {"token_choice", "expert_choice", NULL};
static const char *const act_names[] = {"gelu", "relu", "swiglu", NULL};
static const char *const noise_names[] = {"none", "gaussian", NULL};
static const char *const data_format_names[] = {"auto", "bytes", "tokens", NULL}; /* moe_data_format */
static const char *const head_names[] = {"full", "vocab_experts", NULL};
static const char *const vpart_names[] = {"frequency", "kmeans", "file", NULL};
static const char *const norm_names[] = {"layernorm", "rmsnorm", NULL};
static const char *const pos_names[] = {"learned", "rope", NULL};
static const char *const qk_norm_names[] = {"none", "full", "head", NULL};
static const char *const score_names[] = {"softmax", "sigmoid", NULL};
static const char *const aux_names[] = {"switch", "seq", "none", NULL};
#define a2a_names moe_a2a_kind_names /* named where the kinds are defined */
/* Old spellings still accepted (configs and checkpoint config texts written
 * before a rename): {key, old value, the value it means}. */
static const struct {
    const char *key, *old, *now;
} enum_aliases[] = {{"a2a", MOE_A2A_P2P_OLD_NAME, "p2p"}, {"qk_norm", "0", "none"}, {"qk_norm", "1", "full"}};
_Static_assert(MOE_ROUTER_TOKEN_CHOICE == 0 && MOE_ROUTER_EXPERT_CHOICE == 1, "router_names order");
_Static_assert(MOE_ACT_GELU == 0 && MOE_ACT_RELU == 1 && MOE_ACT_SWIGLU == 2, "act_names order");
_Static_assert(MOE_A2A_P2P == 0 && MOE_A2A_SHM == 1 && MOE_A2A_NODE == 2 && MOE_A2A_AUTO == 3, "a2a_names order");
_Static_assert(MOE_DATA_AUTO == 0 && MOE_DATA_BYTES == 1 && MOE_DATA_TOKENS == 2, "data_format_names order");
_Static_assert(MOE_HEAD_FULL == 0 && MOE_HEAD_VOCAB_EXPERTS == 1, "head_names order");
_Static_assert(MOE_VOCAB_PART_FREQUENCY == 0 && MOE_VOCAB_PART_KMEANS == 1 && MOE_VOCAB_PART_FILE == 2,
               "vpart_names order");
_Static_assert(MOE_NORM_RMSNORM == 1 && MOE_POS_ROPE == 1 && MOE_QK_NORM_FULL == 1 && MOE_QK_NORM_HEAD == 2 &&
                   MOE_SCORE_SIGMOID == 1 && MOE_AUX_SEQ == 1 && MOE_AUX_NONE == 2,
               "architecture enum names order");

/* Where the format 2 [model] keys apply. The architecture and router
 * options apply (all of them) as soon as one differs from its default; a
 * file without them means their defaults. */
static int head_not_full(const moe_train_config *c) { return c->head != MOE_HEAD_FULL; }
static int with_vocab_experts(const moe_train_config *c) { return c->head == MOE_HEAD_VOCAB_EXPERTS; }
static int arch_options_used(const moe_train_config *c); /* after the key table */
_Static_assert(sizeof(moe_router_kind) == sizeof(int) && sizeof(moe_activation) == sizeof(int),
               "enum keys are stored through int");

#define OFF(f) offsetof(moe_train_config, f)
#define KI(n, s, lo, hi, h) {#n, s, T_INT, OFF(n), lo, hi, 0, 0, NULL, h, NULL, NULL, 0}
#define KR(n, s, lo, hi, lo_open, hi_open, h) {#n, s, T_REAL, OFF(n), lo, hi, lo_open, hi_open, NULL, h, NULL, NULL, 0}
#define KS(n, s, h) {#n, s, T_STR, OFF(n), 0, 0, 0, 0, NULL, h, NULL, NULL, 0}
#define KE(n, s, names, h) {#n, s, T_ENUM, OFF(n), 0, 0, 0, 0, names, h, NULL, NULL, 0}
/* format 2 [model] keys, with the predicate saying where they apply */
#define KI2W(n, lo, hi, h, when) {#n, "model", T_INT, OFF(n), lo, hi, 0, 0, NULL, h, when, NULL, 0}
#define KE2W(n, names, h, when) {#n, "model", T_ENUM, OFF(n), 0, 0, 0, 0, names, h, when, NULL, 0}
#define NOMAX INT_MAX
/* The architecture and router [model] keys (format_version 2; models.md,
 * routing.md section 8): written to a checkpoint, all of them, only when
 * one of them is not default (arch_options_used). */
#define KI2(n, lo, hi, h) {#n, "model", T_INT, OFF(n), lo, hi, 0, 0, NULL, h, arch_options_used, NULL, 0}
#define KR2(n, lo, hi, lo_open, h) {#n, "model", T_REAL, OFF(n), lo, hi, lo_open, 0, NULL, h, arch_options_used, NULL, 0}
#define KE2(n, names, h) {#n, "model", T_ENUM, OFF(n), 0, 0, 0, 0, names, h, arch_options_used, NULL, 0}
#define KF2(n, lo, hi, fn, sent, h) {#n, "model", T_INT, OFF(n), lo, hi, 0, 0, NULL, h, arch_options_used, fn, sent}

/* Derived defaults (what the moe_cfg_* accessors of config.h return while
 * the field holds its sentinel). */
static int follow_kv_heads(const moe_train_config *c) { return c->n_heads; }
static int follow_head_dim(const moe_train_config *c) { return c->n_heads > 0 ? c->d_model / c->n_heads : 0; }
static int follow_attn_bias(const moe_train_config *c) { return c->linear_bias; }
static int follow_d_ff_shared(const moe_train_config *c) { return c->d_ff; }

static const key_desc keys[] = {
    /* The [model] keys are also the checkpoint's /model attributes. Their
     * upper bounds keep every tensor shape product far inside int64 (and
     * any realistic model inside them), so a file's absurd attributes are
     * refused before anything is allocated. */
    KI(vocab_size, "model", 256, 1 << 24,
       "token ids (default: the tokenizer's vocab_size, 256 for bytes; a value set must be >= it)"),
    KI(d_model, "model", 1, 1 << 16, "model width d"),
    KI(n_layers, "model", 1, 1 << 12, "transformer blocks"),
    KI(n_heads, "model", 1, 1 << 16, "attention heads (must divide d_model)"),
    KI(seq_len, "model", 1, 1 << 20, "context length in tokens (bytes for byte data)"),
    KI(n_experts, "model", 1, 1 << 16, "experts per MoE layer E"),
    KI(top_k, "model", 1, NOMAX, "experts per token for token choice (1 <= top_k <= E)"),
    KI(d_ff, "model", 1, 1 << 20, "hidden width F of each expert and of dense blocks"),
    KI(moe_every, "model", 1, 1 << 12, "every moe_every-th block has an MoE feed-forward (1: all)"),
    KE(router, "model", router_names, "token_choice or expert_choice"),
    KR(capacity_factor, "model", -HUGE_VAL, HUGE_VAL, 0, 0,
       "token choice: C = ceil(k*T*cf/E), <= 0 dropless; expert choice: experts per token, > 0"),
    KI(normalize_topk, "model", 0, 1, "renormalise top-k weights (default 1 if top_k > 1; 0 if top_k == 1)"),
    KE(activation, "model", act_names, "gelu, relu or swiglu"),
    KR(ln_eps, "model", 0, HUGE_VAL, 1, 0, "LayerNorm epsilon"),
    KE(router_noise, "model", noise_names, "none or gaussian (noisy top-k gating, training only)"),
    KI(group_seqs, "model", 1, 1 << 24, "consecutive sequences routed together as one group"),
    KE2(norm, norm_names, "layernorm or rmsnorm (x / rms(x) * weight, no bias; ln_eps is its eps)"),
    KE2(pos, pos_names, "positions: learned (wpe) or rope (rotary on q and k, rotate_half layout)"),
    KR2(rope_theta, 0, HUGE_VAL, 1, "RoPE base theta"),
    KF2(n_kv_heads, 0, 1 << 16, follow_kv_heads, 0, "key/value heads, dividing n_heads (grouped-query attention; 0: n_heads)"),
    KF2(head_dim, 0, 1 << 16, follow_head_dim, 0, "size of one attention head (0: d_model / n_heads)"),
    KE2(qk_norm, qk_norm_names, "RMSNorm of q and k before RoPE: none, full (whole projection, OLMoE), head (per head, Qwen3)"),
    KI2(linear_bias, 0, 1, "biases on every linear layer, experts included"),
    KF2(attn_bias, -1, 1, follow_attn_bias, -1, "biases on q, k, v (-1: linear_bias)"),
    KI2(tie_embeddings, 0, 1, "1: the output head is wte; 0: a separate lm_head"),
    KE2(score, score_names, "router score: softmax or sigmoid"),
    KR2(route_scale, 0, HUGE_VAL, 1, "factor on every combine weight"),
    KI2(expert_bias, 0, 1, "aux-loss-free balancing: a per-expert selection bias updated from the loads"),
    KI2(n_groups, 1, 1 << 16, "expert groups for group-limited routing (1: off)"),
    KI2(topk_groups, 0, 1 << 16, "groups each token may use (0: all n_groups)"),
    KE2(aux_loss, aux_names, "load-balance loss: switch (per group), seq (per sequence) or none"),
    KI2(n_shared, 0, 1 << 10, "shared experts every token passes through (dense)"),
    KF2(d_ff_shared, 0, 1 << 20, follow_d_ff_shared, 0, "hidden width of each shared expert (0: d_ff)"),
    KI2(shared_gate, 0, 1, "1: shared experts' output times sigmoid(w_sg . x)"),
    KE2W(head, head_names, "output head: full (softmax tied to wte) or vocab_experts (partitioned)", head_not_full),
    KI2W(vocab_experts, 2, 1 << 16, "vocabulary experts M (2 <= M <= vocab_size; the ep size divides M)",
         with_vocab_experts),
    KI2W(vocab_top_k, 1, 1 << 16, "vocabulary experts a generation step computes (1 <= K <= M)",
         with_vocab_experts),
    KE2W(vocab_partition, vpart_names, "frequency (training data), kmeans (over vocab_partition_from's wte) or file",
         with_vocab_experts),

    KI(batch_size, "train", 1, NOMAX, "global sequences per step (divisible by the number of ranks)"),
    KI(steps, "train", 1, NOMAX, "optimizer steps"),
    KR(lr, "train", 0, HUGE_VAL, 1, 0, "peak learning rate (AdamW)"),
    KR(min_lr_frac, "train", 0, 1, 0, 0, "final learning rate as a fraction of lr (cosine decay)"),
    KI(warmup_steps, "train", 0, NOMAX, "linear warm-up steps"),
    KR(weight_decay, "train", 0, HUGE_VAL, 0, 0, "AdamW decoupled weight decay"),
    KR(grad_clip, "train", 0, HUGE_VAL, 0, 0, "clip of the global gradient norm (0: off)"),
    KR(beta1, "train", 0, 1, 0, 1, "AdamW beta1"),
    KR(beta2, "train", 0, 1, 0, 1, "AdamW beta2"),
    KR(adam_eps, "train", 0, HUGE_VAL, 1, 0, "AdamW epsilon"),
    KR(aux_loss_coef, "train", 0, HUGE_VAL, 0, 0, "load-balance loss coefficient"),
    KR(z_loss_coef, "train", 0, HUGE_VAL, 0, 0, "router z-loss coefficient"),
    KR(bias_update_rate, "train", 0, HUGE_VAL, 0, 0, "expert_bias: b_e += rate * sign(mean load - load_e) per step"),
    {"seed", "train", T_U32, OFF(seed), 0, 4294967295.0, 0, 0, NULL,
     "seed of every random stream (init, data, router noise)", NULL, NULL, 0},
    KI(ep_size, "train", 0, NOMAX, "expert-parallel group size in ranks (0: all ranks)"),
    KI(log_every, "train", 1, NOMAX, "steps between log lines"),
    KS(out_dir, "train", "output directory (log, checkpoints)"),

    KS(data, "data", "training file: bytes, or a token file of 'moe data encode' (data_format)"),
    KS(val_data, "data", "validation file of the same kind (empty: the last val_frac of data)"),
    KE(data_format, "data", data_format_names, "auto (a name ending in .tok is a token file), bytes or tokens"),
    KS(tokenizer, "data", "the tokenizer token data was encoded with (empty: the resumed checkpoint's)"),
    KR(val_frac, "data", 0, 1, 0, 1, "held-out tail fraction of data when val_data is empty"),
    KI(val_every, "data", 0, NOMAX, "steps between validations (0: never)"),
    KI(val_batches, "data", 1, NOMAX, "batches of batch_size sequences per validation"),

    KS(vocab_partition_from, "vocab", "kmeans: checkpoint whose wte is clustered; file: partition file"),
    KI(kmeans_iters, "vocab", 1, 1 << 20, "k-means (Lloyd) assignment steps"),
    KR(vocab_balance, "vocab", 0, HUGE_VAL, 0, 0, "k-means set size cap ceil(V/M * balance) (0: none, else >= 1)"),

    KE(a2a, "exchange", a2a_names,
       "token exchange: auto (node when the ep group spans nodes, else p2p), p2p (point-to-point), shm "
       "(on-node shared memory) or node (two levels: shared memory in a node, one message per node pair); "
       "alltoallv = p2p"),
    KI(a2a_chunks, "exchange", 1, NOMAX, "expert chunks overlapped with the exchange (p2p)"),
    KR(comm_timeout, "exchange", 0, HUGE_VAL, 0, 0,
       "seconds a blocking exchange, collective or checkpoint I/O phase may make no progress before "
       "the job is ended on every node (0: never; docs/cluster.md)"),
    KS(placement, "exchange",
       "expert placement file of 'moe placement plan' (which ep rank holds which experts, replicas of the "
       "hottest; empty: contiguous blocks). Results do not depend on it"),

    KI(ckpt_every, "checkpoint", 0, NOMAX, "steps between checkpoints (0: only at the end)"),
    KI(keep_last, "checkpoint", 0, NOMAX, "checkpoints kept in out_dir (0: all)"),
    KI(dump_grads_every, "checkpoint", 0, NOMAX, "steps between gradient dumps (0: never)"),
    KS(resume, "checkpoint", "checkpoint to resume from (empty: fresh start)"),
};
#define N_KEYS ((int)(sizeof keys / sizeof keys[0]))

_Static_assert(sizeof(((moe_train_config *)0)->data) == 1024 && sizeof(((moe_train_config *)0)->val_data) == 1024 &&
                   sizeof(((moe_train_config *)0)->out_dir) == 1024 && sizeof(((moe_train_config *)0)->resume) == 1024 &&
                   sizeof(((moe_train_config *)0)->tokenizer) == 1024 &&
                   sizeof(((moe_train_config *)0)->vocab_partition_from) == 1024 &&
                   sizeof(((moe_train_config *)0)->placement) == 1024,
               "T_STR keys are char[1024]");
#define STR_CAP 1024

void moe_train_config_default(moe_train_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 256;
    c->vocab_size_user = -1;
    c->d_model = 128;
    c->n_layers = 4;
    c->n_heads = 4;
    c->seq_len = 128;
    c->n_experts = 8;
    c->top_k = 2;
    c->d_ff = 512;
    c->moe_every = 2;
    c->router = MOE_ROUTER_TOKEN_CHOICE;
    c->capacity_factor = 1.25;
    c->normalize_topk = 1;
    c->normalize_topk_user = -1;
    c->capacity_factor_user = NAN;
    c->activation = MOE_ACT_GELU;
    c->ln_eps = 1e-5;
    c->router_noise = 0;
    c->group_seqs = 1;
    c->norm = MOE_NORM_LAYERNORM;
    c->pos = MOE_POS_LEARNED;
    c->rope_theta = 10000.0;
    c->n_kv_heads = 0;
    c->head_dim = 0;
    c->qk_norm = MOE_QK_NORM_NONE;
    c->linear_bias = 1;
    c->attn_bias = -1;
    c->tie_embeddings = 1;
    c->score = MOE_SCORE_SOFTMAX;
    c->route_scale = 1.0;
    c->expert_bias = 0;
    c->n_groups = 1;
    c->topk_groups = 0;
    c->aux_loss = MOE_AUX_SWITCH;
    c->n_shared = 0;
    c->d_ff_shared = 0;
    c->shared_gate = 0;
    c->head = MOE_HEAD_FULL;
    c->vocab_experts = 64;
    c->vocab_top_k = 2;
    c->vocab_partition = MOE_VOCAB_PART_FREQUENCY;
    c->kmeans_iters = 25;
    c->vocab_balance = 2.0;

    c->batch_size = 16;
    c->steps = 600;
    c->lr = 3e-3;
    c->min_lr_frac = 0.1;
    c->warmup_steps = 50;
    c->weight_decay = 0.1;
    c->grad_clip = 1.0;
    c->beta1 = 0.9;
    c->beta2 = 0.95;
    c->adam_eps = 1e-8;
    c->aux_loss_coef = 0.01;
    c->z_loss_coef = 0.001;
    c->bias_update_rate = 1e-3;
    c->seed = 1234;
    c->ep_size = 0;
    c->log_every = 10;
    strcpy(c->out_dir, "runs/default");

    c->val_frac = 0.05;
    c->val_every = 100;
    c->val_batches = 8;

    c->a2a = MOE_A2A_AUTO;
    c->a2a_chunks = 1;
    c->comm_timeout = MOE_COMM_TIMEOUT_DEFAULT;

    c->ckpt_every = 0;
    c->keep_last = 2;
    c->dump_grads_every = 0;
}

static const key_desc *find_key(const char *name)
{
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(keys[i].name, name)) return &keys[i];
    return NULL;
}

/* Edit distance, for "did you mean" on a mistyped key (keys are short). */
static int edit_distance(const char *a, const char *b)
{
    int la = (int)strlen(a), lb = (int)strlen(b), row[64];
    if (la >= 64 || lb >= 64) return INT_MAX;
    for (int j = 0; j <= lb; j++) row[j] = j;
    for (int i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = i;
        for (int j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static moe_status unknown_key(const char *name)
{
    const key_desc *best = NULL;
    int best_d = 3; /* suggest only close matches */
    for (int i = 0; i < N_KEYS; i++) {
        int d = edit_distance(name, keys[i].name);
        if (d < best_d) best_d = d, best = &keys[i];
    }
    if (best) return moe_errorf(MOE_ERR_ARG, "unknown key '%s' (did you mean '%s'?)", name, best->name);
    return moe_errorf(MOE_ERR_ARG, "unknown key '%s' (see 'moe train --help')", name);
}

static void real_text(char *buf, size_t cap, double x)
{
    /* Shortest text that reads back as the same double. */
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) return;
    }
}

/* What a key accepts, e.g. "an integer >= 1" or "a number in [0, 1)". */
static void expectation(char *buf, size_t cap, const key_desc *k)
{
    if (k->type == T_ENUM) {
        size_t len = 0;
        for (int i = 0; k->names[i]; i++) {
            const char *sep = !i ? "" : k->names[i + 1] ? ", " : " or ";
            len += (size_t)snprintf(buf + len, len < cap ? cap - len : 0, "%s%s", sep, k->names[i]);
            if (len >= cap) return;
        }
        return;
    }
    if (k->type == T_STR) {
        snprintf(buf, cap, "a path without ';', control characters or surrounding spaces, under %d bytes", STR_CAP);
        return;
    }
    const char *what = k->type == T_REAL ? "a number" : "an integer";
    int has_lo = k->lo > -HUGE_VAL;
    int has_hi = k->type == T_REAL ? k->hi < HUGE_VAL : !(k->type == T_INT && k->hi == INT_MAX);
    if (has_lo && has_hi && k->lo == k->hi)
        snprintf(buf, cap, "%.10g", k->lo);
    else if (has_lo && has_hi)
        snprintf(buf, cap, "%s in %c%.10g, %.10g%c", what, k->lo_open ? '(' : '[', k->lo, k->hi,
                 k->hi_open ? ')' : ']');
    else if (has_lo)
        snprintf(buf, cap, "%s %s %.10g", what, k->lo_open ? ">" : ">=", k->lo);
    else
        snprintf(buf, cap, "a finite number");
}

static moe_status bad_value(const key_desc *k, const char *got)
{
    char want[256];
    expectation(want, sizeof want, k);
    return moe_errorf(MOE_ERR_ARG, "%s: expected %s, got '%s'", k->name, want, got);
}

static int in_range(const key_desc *k, double x)
{
    if (k->lo_open ? !(x > k->lo) : !(x >= k->lo)) return 0;
    if (k->hi_open ? !(x < k->hi) : !(x <= k->hi)) return 0;
    return 1;
}

/* A path survives the INI round trip (inih strips surrounding spaces and
 * cuts a value at " ;") and fits its buffer. */
static int path_ok(const char *s)
{
    size_t n = strlen(s);
    if (n >= STR_CAP || strchr(s, ';')) return 0;
    if (n && (s[0] == ' ' || s[0] == '\t' || s[n - 1] == ' ' || s[n - 1] == '\t')) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return 0;
    return 1;
}

static int enum_count(const key_desc *k)
{
    int n = 0;
    while (k->names[n]) n++;
    return n;
}

/* Parses text into the field of key k; writes only on success. */
static moe_status parse_into(const key_desc *k, const char *v, void *field)
{
    switch (k->type) {
    case T_INT:
    case T_U32: {
        /* strtoll skips leading spaces and accepts '+': both are refused. */
        if (!(v[0] == '-' || (v[0] >= '0' && v[0] <= '9'))) return bad_value(k, v);
        char *end;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (*end || errno == ERANGE || !in_range(k, (double)x)) return bad_value(k, v);
        if (k->type == T_INT)
            *(int *)field = (int)x;
        else
            *(uint32_t *)field = (uint32_t)x;
        return MOE_OK;
    }
    case T_REAL: {
        if (!(v[0] == '-' || v[0] == '.' || (v[0] >= '0' && v[0] <= '9'))) return bad_value(k, v);
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        if (*end || !isfinite(x) || !in_range(k, x)) return bad_value(k, v);
        *(double *)field = x;
        return MOE_OK;
    }
    case T_STR:
        if (!path_ok(v)) return bad_value(k, v);
        strcpy((char *)field, v);
        return MOE_OK;
    case T_ENUM:
        for (size_t a = 0; a < sizeof enum_aliases / sizeof enum_aliases[0]; a++)
            if (!strcmp(k->name, enum_aliases[a].key) && !strcmp(v, enum_aliases[a].old)) v = enum_aliases[a].now;
        for (int i = 0; k->names[i]; i++)
            if (!strcmp(v, k->names[i])) {
                *(int *)field = i;
                return MOE_OK;
            }
        return bad_value(k, v);
    }
    return bad_value(k, v);
}

/* An integer key's value, a derived default resolved. */
static int int_value(const key_desc *k, const moe_train_config *c)
{
    const int v = *(const int *)((const char *)c + k->off);
    return k->follows && v == k->sentinel ? k->follows(c) : v;
}

/* The value of key k in c as text (how format writes it). */
static void value_text(char *buf, size_t cap, const key_desc *k, const moe_train_config *c)
{
    const void *field = (const char *)c + k->off;
    switch (k->type) {
    case T_INT: snprintf(buf, cap, "%d", int_value(k, c)); break;
    case T_U32: snprintf(buf, cap, "%u", (unsigned)*(const uint32_t *)field); break;
    case T_REAL: real_text(buf, cap, *(const double *)field); break;
    case T_STR: snprintf(buf, cap, "%.*s", STR_CAP - 1, (const char *)field); break;
    case T_ENUM: {
        int v = *(const int *)field;
        if (v >= 0 && v < enum_count(k))
            snprintf(buf, cap, "%s", k->names[v]);
        else
            snprintf(buf, cap, "%d", v);
        break;
    }
    }
}

/* The default of key k as --help and the man page show it (d: the default
 * configuration): a default that follows another key as its sentinel. */
static void default_text(char *buf, size_t cap, const key_desc *k, const moe_train_config *d)
{
    if (k->follows) snprintf(buf, cap, "%d", k->sentinel);
    else value_text(buf, cap, k, d);
}

/* Range check of a key as stored (for configurations built in code). */
static moe_status check_key(const key_desc *k, const moe_train_config *c)
{
    const void *field = (const char *)c + k->off;
    int ok = 1;
    switch (k->type) {
    case T_INT: ok = in_range(k, *(const int *)field); break;
    case T_U32: ok = 1; break;
    case T_REAL: ok = isfinite(*(const double *)field) && in_range(k, *(const double *)field); break;
    case T_STR: ok = memchr(field, '\0', STR_CAP) && path_ok(field); break;
    case T_ENUM: ok = *(const int *)field >= 0 && *(const int *)field < enum_count(k); break;
    }
    if (ok) return MOE_OK;
    char got[STR_CAP + 16];
    if (k->type == T_STR)
        snprintf(got, sizeof got, "%.*s", STR_CAP - 1, (const char *)field);
    else
        value_text(got, sizeof got, k, c);
    return bad_value(k, got);
}

/* Defaults that depend on other keys: normalize_topk (1 for k > 1, always 0
 * for k = 1) and capacity_factor (1.25 for token choice, c = 2 experts per
 * token for expert choice, as docs/routing.md says). */
static void resolve_defaults(moe_train_config *c)
{
    if (c->vocab_size_user >= 0) c->vocab_size = c->vocab_size_user;
    c->normalize_topk = c->top_k == 1 ? 0 : c->normalize_topk_user < 0 ? 1 : c->normalize_topk_user;
    if (isnan(c->capacity_factor_user))
        c->capacity_factor = c->router == MOE_ROUTER_EXPERT_CHOICE ? 2.0 : 1.25;
    else
        c->capacity_factor = c->capacity_factor_user;
}

moe_status moe_train_config_set(moe_train_config *c, const char *key, const char *value)
{
    if (!c || !key || !value) return moe_errorf(MOE_ERR_ARG, "moe_train_config_set: NULL argument");
    const key_desc *k = find_key(key);
    if (!k) return unknown_key(key);
    if (k->off == OFF(normalize_topk)) {
        moe_status st = parse_into(k, value, &c->normalize_topk_user);
        if (st) return st;
    } else if (k->off == OFF(vocab_size)) {
        moe_status st = parse_into(k, value, &c->vocab_size_user);
        if (st) return st;
    } else if (k->off == OFF(capacity_factor)) {
        moe_status st = parse_into(k, value, &c->capacity_factor_user);
        if (st) return st;
    } else {
        moe_status st = parse_into(k, value, (char *)c + k->off);
        if (st) return st;
    }
    resolve_defaults(c);
    return MOE_OK;
}

/* ---- INI loading ---- */

typedef struct {
    moe_train_config *c;
    const char *path;
    FILE *f;
    int line;             /* lines read so far: the line the handler is looking at */
    int set_line[N_KEYS]; /* line that set each key, 0 if none */
    moe_status st;        /* first problem, reported with its line */
    char msg[1280];
} load_ctx;

static int load_fail(load_ctx *x, moe_status st)
{
    if (!x->st) {
        x->st = st;
        snprintf(x->msg, sizeof x->msg, "%s:%d: %s", x->path, x->line, moe_error_detail());
    }
    return 0;
}

/* fgets for inih that counts lines (so errors carry the line number), refuses
 * lines longer than inih's buffer instead of splitting them, and drops
 * leading whitespace so an indented line is an ordinary line rather than a
 * continuation of the previous value. */
static char *load_reader(char *str, int num, void *stream)
{
    load_ctx *x = stream;
    if (!fgets(str, num, x->f)) return NULL;
    x->line++;
    size_t n = strlen(str);
    if (n && str[n - 1] != '\n' && !feof(x->f)) {
        load_fail(x, moe_errorf(MOE_ERR_ARG, "line longer than %d characters", num - 2));
        int ch;
        while ((ch = fgetc(x->f)) != EOF && ch != '\n') {}
    }
    size_t lead = strspn(str, " \t");
    if (lead) memmove(str, str + lead, n - lead + 1);
    return str;
}

static int load_handler(void *user, const char *section, const char *name, const char *value)
{
    (void)section; /* keys may sit in any section */
    load_ctx *x = user;
    if (x->st) return 0; /* report the first problem only */
    const key_desc *k = find_key(name);
    if (k && x->set_line[k - keys])
        return load_fail(x, moe_errorf(MOE_ERR_ARG, "%s: set twice (first on line %d)", name,
                                       x->set_line[k - keys]));
    moe_status st = moe_train_config_set(x->c, name, value);
    if (st) return load_fail(x, st);
    x->set_line[k - keys] = x->line;
    return 1;
}

/* Parses the open stream x->f (closed here); errors name x->path. */
static moe_status load_stream(load_ctx *x)
{
    const char *path = x->path;
    int rc = ini_parse_stream(load_reader, x, load_handler, x);
    int read_error = ferror(x->f);
    fclose(x->f);
    if (x->st) return moe_errorf(x->st, "%s", x->msg);
    if (read_error) return moe_errorf(MOE_ERR_IO, "cannot read config '%s'", path);
    if (rc > 0)
        return moe_errorf(MOE_ERR_ARG, "%s:%d: syntax error (expected 'key = value' or '[section]')", path, rc);
    if (rc < 0) return moe_errorf(MOE_ERR_NOMEM, "parsing config '%s': out of memory", path);
    return MOE_OK;
}

moe_status moe_train_config_load(moe_train_config *c, const char *path)
{
    if (!c || !path) return moe_errorf(MOE_ERR_ARG, "moe_train_config_load: NULL argument");
    load_ctx x = {.c = c, .path = path};
    /* non-blocking open, then fstat: a named pipe or a directory is refused
     * at once instead of waited on */
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open config '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "config '%s' is not a regular file", path);
    }
    x.f = fdopen(fd, "r");
    if (!x.f) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "cannot open config '%s': %s", path, strerror(errno));
    }
    return load_stream(&x);
}

moe_status moe_train_config_load_text(moe_train_config *c, const char *text, const char *origin)
{
    if (!c || !text || !origin) return moe_errorf(MOE_ERR_ARG, "moe_train_config_load_text: NULL argument");
    load_ctx x = {.c = c, .path = origin};
    /* a read-only memory stream, so text goes through the file loader's
     * exact rules (line numbers, leading whitespace, duplicate keys) */
    x.f = fmemopen((void *)text, strlen(text), "r");
    if (!x.f) return moe_errorf(MOE_ERR_NOMEM, "config text of '%s': cannot open a memory stream", origin);
    return load_stream(&x);
}

/* ---- cross-field checks ---- */

static int is_model_key(const key_desc *k) { return !strcmp(k->section, "model"); }

/* 1 when key k of c holds its default: the default configuration's value,
 * or for a derived default the value it follows in c. */
static int is_default(const key_desc *k, const moe_train_config *c)
{
    moe_train_config d;
    moe_train_config_default(&d);
    const void *f = (const char *)c + k->off, *g = (const char *)&d + k->off;
    switch (k->type) {
    case T_INT: return k->follows ? int_value(k, c) == k->follows(c) : *(const int *)f == *(const int *)g;
    case T_U32: return *(const uint32_t *)f == *(const uint32_t *)g;
    case T_REAL: return *(const double *)f == *(const double *)g;
    case T_STR: return !strcmp(f, g);
    case T_ENUM: return *(const int *)f == *(const int *)g;
    }
    return 0;
}

moe_status moe_train_config_check_model(const moe_train_config *c)
{
    for (int i = 0; i < N_KEYS; i++) {
        moe_status st = is_model_key(&keys[i]) ? check_key(&keys[i], c) : MOE_OK;
        if (st) return st;
    }
    if (c->head_dim <= 0 && c->d_model % c->n_heads)
        return moe_errorf(MOE_ERR_ARG, "n_heads=%d does not divide d_model=%d (or set head_dim)", c->n_heads, c->d_model);
    const int kv = moe_cfg_kv_heads(c), hd = moe_cfg_head_dim(c);
    if (c->n_heads % kv)
        return moe_errorf(MOE_ERR_ARG, "n_kv_heads=%d does not divide n_heads=%d", kv, c->n_heads);
    if ((int64_t)(c->n_heads + 2 * kv) * hd > (1 << 20))
        return moe_errorf(MOE_ERR_ARG, "attention too wide: (n_heads + 2 n_kv_heads) * head_dim = %lld > %d",
                          (long long)(c->n_heads + 2 * kv) * hd, 1 << 20);
    if (c->pos == MOE_POS_ROPE && hd % 2)
        return moe_errorf(MOE_ERR_ARG, "head_dim=%d must be even with pos = rope", hd);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->expert_bias)
        return moe_errorf(MOE_ERR_ARG, "expert_bias=1 needs router = token_choice (an expert's pick ignores a per-expert bias)");
    if (c->n_experts % c->n_groups)
        return moe_errorf(MOE_ERR_ARG, "n_groups=%d does not divide n_experts=%d", c->n_groups, c->n_experts);
    if (c->topk_groups > c->n_groups)
        return moe_errorf(MOE_ERR_ARG, "topk_groups=%d exceeds n_groups=%d", c->topk_groups, c->n_groups);
    if (c->n_groups > 1 && c->router == MOE_ROUTER_EXPERT_CHOICE)
        return moe_errorf(MOE_ERR_ARG, "n_groups=%d (group-limited routing) needs router = token_choice", c->n_groups);
    if (c->n_groups > 1 && c->router == MOE_ROUTER_TOKEN_CHOICE && c->top_k > moe_cfg_topk_groups(c) * (c->n_experts / c->n_groups))
        return moe_errorf(MOE_ERR_ARG, "top_k=%d exceeds the %d experts of topk_groups=%d groups of %d",
                          c->top_k, moe_cfg_topk_groups(c) * (c->n_experts / c->n_groups), moe_cfg_topk_groups(c),
                          c->n_experts / c->n_groups);
    if (c->shared_gate && c->n_shared == 0)
        return moe_errorf(MOE_ERR_ARG, "shared_gate=1 needs n_shared > 0");
    if (c->router == MOE_ROUTER_TOKEN_CHOICE && c->top_k > c->n_experts)
        return moe_errorf(MOE_ERR_ARG, "top_k=%d exceeds n_experts=%d", c->top_k, c->n_experts);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && !(c->capacity_factor > 0))
        return moe_errorf(MOE_ERR_ARG, "capacity_factor=%g must be > 0 with router = expert_choice",
                          c->capacity_factor);
    if (c->normalize_topk && c->top_k == 1)
        return moe_errorf(MOE_ERR_ARG, "normalize_topk=1 with top_k=1 (must be 0)");
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && c->vocab_experts > c->vocab_size)
        return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d exceeds vocab_size=%d (every expert needs a token)",
                          c->vocab_experts, c->vocab_size);
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && !c->tie_embeddings)
        return moe_errorf(MOE_ERR_ARG, "tie_embeddings=0 (an lm_head) does not go with head=vocab_experts, whose "
                          "vocabulary experts are the output head");
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && c->vocab_top_k > c->vocab_experts)
        return moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, vocab_experts=%d]", c->vocab_top_k,
                          c->vocab_experts);
    return MOE_OK;
}

int moe_train_config_model_attrs(const moe_train_config *c, moe_model_attr *out, int cap)
{
    int n = 0;
    for (int i = 0; i < N_KEYS; i++) {
        const key_desc *k = &keys[i];
        if (!is_model_key(k)) continue;
        if (n < cap) {
            moe_model_attr *a = &out[n];
            memset(a, 0, sizeof *a);
            a->name = k->name;
            const void *field = (const char *)c + k->off;
            if (k->type == T_REAL) {
                a->type = MOE_ATTR_REAL;
                a->r = *(const double *)field;
            } else if (k->type == T_ENUM) {
                const int v = *(const int *)field;
                a->type = MOE_ATTR_TEXT;
                a->text = v >= 0 && v < enum_count(k) ? k->names[v] : "?";
            } else {
                a->type = MOE_ATTR_INT;
                a->i = k->type == T_U32 ? (int64_t)*(const uint32_t *)field : (int64_t)int_value(k, c);
            }
            a->version2 = k->present != NULL;
            a->present = k->present ? k->present(c) : 1;
        }
        n++;
    }
    return n;
}

static int arch_options_used(const moe_train_config *c)
{
    for (int i = 0; i < N_KEYS; i++)
        if (keys[i].present == arch_options_used && !is_default(&keys[i], c)) return 1;
    return 0;
}

int moe_train_config_needs_v2(const moe_train_config *c)
{
    for (int i = 0; i < N_KEYS; i++)
        if (is_model_key(&keys[i]) && keys[i].present && keys[i].present(c)) return 1;
    return 0;
}

moe_status moe_train_config_set_model_attr(moe_train_config *c, const moe_model_attr *a)
{
    const key_desc *k = find_key(a->name);
    if (!k || !is_model_key(k)) return moe_errorf(MOE_ERR_ARG, "'%s' is not a model key", a->name);
    void *field = (char *)c + k->off;
    switch (a->type) {
    case MOE_ATTR_INT:
        if (k->type != T_INT) break;
        if (a->i < INT_MIN || a->i > INT_MAX)
            return moe_errorf(MOE_ERR_ARG, "%s = %lld is out of range", k->name, (long long)a->i);
        *(int *)field = (int)a->i;
        return MOE_OK;
    case MOE_ATTR_REAL:
        if (k->type != T_REAL) break;
        *(double *)field = a->r;
        return MOE_OK;
    case MOE_ATTR_TEXT:
        if (k->type != T_ENUM) break;
        return parse_into(k, a->text, field);
    }
    return moe_errorf(MOE_ERR_ARG, "%s: wrong type of value", k->name);
}

moe_status moe_train_config_resolve_vocab(moe_train_config *c, int64_t data_vocab, const char *what)
{
    if (c->vocab_size_user < 0) {
        if (data_vocab < 256 || data_vocab > (1 << 24))
            return moe_errorf(MOE_ERR_ARG, "%s has %lld ids, outside vocab_size's range [256, %d]", what,
                              (long long)data_vocab, 1 << 24);
        c->vocab_size = (int)data_vocab;
        return MOE_OK;
    }
    if (c->vocab_size < data_vocab)
        return moe_errorf(MOE_ERR_ARG, "vocab_size=%d is smaller than the %lld ids of %s (leave vocab_size unset "
                                       "to take it, or set at least %lld)",
                          c->vocab_size, (long long)data_vocab, what, (long long)data_vocab);
    return MOE_OK;
}

moe_status moe_train_config_check(const moe_train_config *c, int world)
{
    if (!c) return moe_errorf(MOE_ERR_ARG, "moe_train_config_check: NULL config");
    if (world < 1) return moe_errorf(MOE_ERR_ARG, "world size %d < 1", world);
    for (int i = 0; i < N_KEYS; i++) {
        moe_status st = check_key(&keys[i], c);
        if (st) return st;
    }
    moe_status st = moe_train_config_check_model(c);
    if (st) return st;
    if (c->batch_size % world)
        return moe_errorf(MOE_ERR_ARG, "batch_size=%d is not divisible by the %d ranks", c->batch_size, world);
    if ((c->batch_size / world) % c->group_seqs)
        return moe_errorf(MOE_ERR_ARG,
                          "group_seqs=%d does not divide the %d sequences per rank (batch_size=%d over %d ranks)",
                          c->group_seqs, c->batch_size / world, c->batch_size, world);
    int ep = c->ep_size ? c->ep_size : world;
    if (ep > world || world % ep)
        return moe_errorf(MOE_ERR_ARG, "ep_size=%d does not divide the %d ranks", c->ep_size, world);
    if (c->n_experts % ep && !c->placement[0]) /* a placement's replicas: ep divides E + R (checked on load) */
        return moe_errorf(MOE_ERR_ARG, "n_experts=%d is not divisible by ep_size=%d%s", c->n_experts, ep,
                          c->ep_size ? "" : " (ep_size = 0: all ranks)");
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && c->vocab_experts % ep)
        return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d is not divisible by ep_size=%d%s", c->vocab_experts, ep,
                          c->ep_size ? "" : " (ep_size = 0: all ranks)");
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && c->vocab_partition != MOE_VOCAB_PART_FREQUENCY &&
        !c->vocab_partition_from[0] && !c->resume[0])
        return moe_errorf(MOE_ERR_ARG, "vocab_partition=%s needs vocab_partition_from (%s)",
                          vpart_names[c->vocab_partition],
                          c->vocab_partition == MOE_VOCAB_PART_KMEANS ? "a checkpoint whose wte is clustered"
                                                                       : "a partition file");
    if (c->vocab_balance > 0 && c->vocab_balance < 1)
        return moe_errorf(MOE_ERR_ARG, "vocab_balance=%g must be 0 (no cap) or >= 1 (the capped sets must hold "
                                       "the vocabulary)", c->vocab_balance);
    if (!c->data[0])
        return moe_errorf(MOE_ERR_ARG, "data: no training file set (e.g. 'moe data synth --out FILE', then data = FILE)");
    if (!c->out_dir[0]) return moe_errorf(MOE_ERR_ARG, "out_dir: empty");
    if (c->val_every > 0 && !c->val_data[0] && c->val_frac <= 0)
        return moe_errorf(MOE_ERR_ARG, "val_every=%d needs validation data: set val_data, or val_frac > 0, or val_every = 0",
                          c->val_every);
    return MOE_OK;
}

/* ---- writing ---- */

static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(*len < cap ? buf + *len : NULL, *len < cap ? cap - *len : 0, fmt, ap);
    va_end(ap);
    if (n > 0) *len += (size_t)n;
}

int moe_train_config_format(const moe_train_config *c, char *buf, int cap)
{
    size_t len = 0, ucap = cap > 0 && buf ? (size_t)cap : 0;
    const char *section = NULL;
    char v[STR_CAP + 16];
    for (int i = 0; i < N_KEYS; i++) {
        if (keys[i].section != section) {
            section = keys[i].section;
            appendf(buf, ucap, &len, "%s[%s]\n", len ? "\n" : "", section);
        }
        value_text(v, sizeof v, &keys[i], c);
        appendf(buf, ucap, &len, "%s = %s\n", keys[i].name, v);
    }
    return len > INT_MAX ? INT_MAX : (int)len;
}

void moe_train_config_help(FILE *f)
{
    moe_train_config d;
    moe_train_config_default(&d);
    fprintf(f,
            "usage: mpirun -np N moe train [--config FILE] [--key=value | --key value ...]\n"
            "\n"
            "Keys are read from the INI file (in any section or none), then overridden by\n"
            "--key=value options in order.\n"
            "Key, default, meaning:\n");
    const char *section = NULL;
    char v[STR_CAP + 16];
    for (int i = 0; i < N_KEYS; i++) {
        if (keys[i].section != section) {
            section = keys[i].section;
            fprintf(f, "\n[%s]\n", section);
        }
        default_text(v, sizeof v, &keys[i], &d);
        fprintf(f, "  %-17s %-13s %s\n", keys[i].name, v[0] ? v : "\"\"", keys[i].help);
    }
}

int moe_train_config_n_keys(void) { return N_KEYS; }

moe_status moe_train_config_key_doc_get(int i, moe_train_config_key_doc *out)
{
    if (i < 0 || i >= N_KEYS) return moe_errorf(MOE_ERR_ARG, "key index %d outside [0, %d)", i, N_KEYS);
    moe_train_config d;
    moe_train_config_default(&d);
    out->name = keys[i].name;
    out->section = keys[i].section;
    out->help = keys[i].help;
    default_text(out->default_text, sizeof out->default_text, &keys[i], &d);
    expectation(out->accepts, sizeof out->accepts, &keys[i]);
    return MOE_OK;
}

/* ---- command line ---- */

moe_status moe_train_config_parse_args(moe_train_config *c, int argc, char **argv, int *help)
{
    *help = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            *help = 1;
            return MOE_OK;
        }
    /* Pass 0 loads the --config files, pass 1 applies the overrides: both
     * walk the options the same way so `--key value` pairs stay aligned. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 1; i < argc; i++) {
            const char *a = argv[i];
            if (strncmp(a, "--", 2) || !a[2])
                return moe_errorf(MOE_ERR_ARG, "unexpected argument '%s' (expected --config FILE or --key=value)", a);
            const char *eq = strchr(a + 2, '=');
            size_t klen = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
            char key[64];
            if (klen >= sizeof key) return moe_errorf(MOE_ERR_ARG, "unknown option '%s'", a);
            for (size_t j = 0; j < klen; j++) key[j] = a[2 + j] == '-' ? '_' : a[2 + j];
            key[klen] = '\0';
            const char *val;
            if (eq) {
                val = eq + 1;
            } else {
                if (i + 1 >= argc || !strncmp(argv[i + 1], "--", 2))
                    return moe_errorf(MOE_ERR_ARG, "option --%s needs a value", key);
                val = argv[++i];
            }
            int is_config = !strcmp(key, "config");
            moe_status st = MOE_OK;
            if (pass == 0 && is_config) {
                st = moe_train_config_load(c, val);
                if (st) return st;
            } else if (pass == 1 && !is_config) {
                st = moe_train_config_set(c, key, val);
                if (st) {
                    char detail[1024];
                    snprintf(detail, sizeof detail, "%s", moe_error_detail());
                    return moe_errorf(st, "command line: %s", detail);
                }
            }
        }
    }
    return MOE_OK;
}
