/* Hugging Face MoE checkpoints <-> moerun models (hf.h, docs/convert.md):
 * config.json both ways, and the one name table per model type that
 * import and export both walk. */
#include "convert/hf.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layout/layout.h"

static const char *const type_names[MOE_HF_TYPE_COUNT] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"};
static const char *const arch_names[MOE_HF_TYPE_COUNT] = {"MixtralForCausalLM", "Qwen2MoeForCausalLM",
                                                          "Qwen3MoeForCausalLM", "OlmoeForCausalLM"};

const char *moe_hf_type_str(moe_hf_type t) { return (unsigned)t < MOE_HF_TYPE_COUNT ? type_names[t] : "?"; }

moe_status moe_hf_type_parse(moe_hf_type *out, const char *name)
{
    for (int t = 0; t < MOE_HF_TYPE_COUNT; t++)
        if (name && !strcmp(name, type_names[t])) {
            *out = (moe_hf_type)t;
            return MOE_OK;
        }
    return moe_errorf(MOE_ERR_ARG, "unknown model type '%s' (mixtral, qwen2_moe, qwen3_moe or olmoe)",
                      name ? name : "(null)");
}

/* ---------------------------------------------------------------- the table */

/* Which part of a moerun tensor a Hugging Face tensor is. Rows are of the
 * tensor flattened to [rows, last dim] (1-D tensors: single elements). */
typedef enum {
    S_ALL,     /* the whole tensor, same shape */
    S_Q, S_K, S_V,          /* c_attn (weight or bias): q, k, v rows */
    S_GATE, S_UP,           /* w1 of expert {j}: rows [0, F) / [F, 2F) of its 2F, HF shape [F, d] */
    S_DOWN,                 /* w2 of expert {j}: [d, F] */
    S_SH_GATE, S_SH_UP,     /* w1 of the (single) shared expert: [Fs, d] */
    S_SH_DOWN,              /* w2 of the shared expert: [d, Fs] */
} hf_slice;

typedef struct {
    const char *name;       /* {L}: block index, {j}: expert index */
    moe_tensor_kind kind;
    hf_slice slice;
    int layout;             /* 0: always; -1: per-expert layout only; 1: transformers 5's fused
                             * experts only (import: a block that has them uses them) */
} hf_entry;

#define LY "model.layers.{L}."
/* The attention and norms every type shares (the q/k norms, biases and
 * lm_head exist only when the configuration has them: moe_layout_find). */
#define COMMON_BLOCK                                                                                   \
    {LY "input_layernorm.weight", MOE_T_LN1_W, S_ALL, 0},                                              \
    {LY "self_attn.q_proj.weight", MOE_T_QKV_W, S_Q, 0},                                               \
    {LY "self_attn.q_proj.bias", MOE_T_QKV_B, S_Q, 0},                                                 \
    {LY "self_attn.k_proj.weight", MOE_T_QKV_W, S_K, 0},                                               \
    {LY "self_attn.k_proj.bias", MOE_T_QKV_B, S_K, 0},                                                 \
    {LY "self_attn.v_proj.weight", MOE_T_QKV_W, S_V, 0},                                               \
    {LY "self_attn.v_proj.bias", MOE_T_QKV_B, S_V, 0},                                                 \
    {LY "self_attn.o_proj.weight", MOE_T_PROJ_W, S_ALL, 0},                                            \
    {LY "self_attn.q_norm.weight", MOE_T_QNORM_W, S_ALL, 0},                                           \
    {LY "self_attn.k_norm.weight", MOE_T_KNORM_W, S_ALL, 0},                                           \
    {LY "post_attention_layernorm.weight", MOE_T_LN2_W, S_ALL, 0}
#define HEAD {"model.embed_tokens.weight", MOE_T_WTE, S_ALL, 0}
#define TAIL {"model.norm.weight", MOE_T_LNF_W, S_ALL, 0}, {"lm_head.weight", MOE_T_LM_HEAD, S_ALL, 0}
/* transformers 5 keeps the experts fused ([E, 2F, d] gate rows then up
 * rows: moerun's w1 layout; [E, d, F]) under mlp. */
#define FUSED                                                                                          \
    {LY "mlp.experts.gate_up_proj", MOE_T_EXP_W1, S_ALL, 1}, {LY "mlp.experts.down_proj", MOE_T_EXP_W2, S_ALL, 1}

/* Mixtral's hub checkpoints name the MoE block block_sparse_moe (w1 gate,
 * w3 up, w2 down); transformers 5 renames it mlp with fused experts. */
static const hf_entry mixtral_table[] = {
    HEAD, COMMON_BLOCK,
    {LY "block_sparse_moe.gate.weight", MOE_T_ROUTER_W, S_ALL, -1},
    {LY "block_sparse_moe.experts.{j}.w1.weight", MOE_T_EXP_W1, S_GATE, -1},
    {LY "block_sparse_moe.experts.{j}.w3.weight", MOE_T_EXP_W1, S_UP, -1},
    {LY "block_sparse_moe.experts.{j}.w2.weight", MOE_T_EXP_W2, S_DOWN, -1},
    {LY "mlp.gate.weight", MOE_T_ROUTER_W, S_ALL, 1},
    FUSED, TAIL,
};

#define MLP_EXPERTS                                                                                    \
    {LY "mlp.gate.weight", MOE_T_ROUTER_W, S_ALL, 0},                                                  \
    {LY "mlp.experts.{j}.gate_proj.weight", MOE_T_EXP_W1, S_GATE, -1},                                 \
    {LY "mlp.experts.{j}.up_proj.weight", MOE_T_EXP_W1, S_UP, -1},                                     \
    {LY "mlp.experts.{j}.down_proj.weight", MOE_T_EXP_W2, S_DOWN, -1}

static const hf_entry qwen2_table[] = {
    HEAD, COMMON_BLOCK, MLP_EXPERTS,
    {LY "mlp.shared_expert.gate_proj.weight", MOE_T_SH_W1, S_SH_GATE, 0},
    {LY "mlp.shared_expert.up_proj.weight", MOE_T_SH_W1, S_SH_UP, 0},
    {LY "mlp.shared_expert.down_proj.weight", MOE_T_SH_W2, S_SH_DOWN, 0},
    {LY "mlp.shared_expert_gate.weight", MOE_T_SH_GATE, S_ALL, 0},
    FUSED, TAIL,
};

static const hf_entry plain_table[] = {HEAD, COMMON_BLOCK, MLP_EXPERTS, FUSED, TAIL}; /* qwen3_moe, olmoe */

static const hf_entry *table_of(moe_hf_type t, size_t *n)
{
    switch (t) {
    case MOE_HF_MIXTRAL: *n = sizeof mixtral_table / sizeof mixtral_table[0]; return mixtral_table;
    case MOE_HF_QWEN2_MOE: *n = sizeof qwen2_table / sizeof qwen2_table[0]; return qwen2_table;
    default: *n = sizeof plain_table / sizeof plain_table[0]; return plain_table;
    }
}

/* The Hugging Face name of entry e for block l, expert j. */
static void entry_name(char *buf, size_t cap, const char *pattern, int l, int j)
{
    size_t o = 0;
    for (const char *p = pattern; *p && o + 1 < cap; p++) {
        if (!strncmp(p, "{L}", 3) || !strncmp(p, "{j}", 3)) {
            o += (size_t)snprintf(buf + o, cap - o, "%d", p[1] == 'L' ? l : j);
            p += 2;
            continue;
        }
        buf[o++] = *p;
    }
    buf[o < cap ? o : cap - 1] = '\0';
}

static int per_expert(const hf_entry *e) { return strstr(e->name, "{j}") != NULL; }
static int per_block(const hf_entry *e) { return strstr(e->name, "{L}") != NULL; }

/* Where entry e (block l, expert j) sits in tensor t: element offset and
 * the Hugging Face shape. */
typedef struct {
    size_t off;
    int rank;
    int64_t shape[4];
} geom;

static geom slice_geom(const hf_entry *e, const moe_tensor *t, const moe_train_config *c, int j)
{
    geom g = {0, 0, {0}};
    const int64_t d = c->d_model, F = c->d_ff, Fs = moe_cfg_d_ff_shared(c), D = moe_cfg_head_dim(c);
    const int64_t q = (int64_t)c->n_heads * D, kv = (int64_t)moe_cfg_kv_heads(c) * D;
    const int64_t cols = t->ndim > 1 ? t->shape[t->ndim - 1] : 1;
    int64_t r0 = 0, nr = 0, nc = 0; /* rows of the flattened tensor; nc: HF columns (0: 1-D) */
    switch (e->slice) {
    case S_ALL:
        g.rank = t->ndim;
        for (int i = 0; i < t->ndim; i++) g.shape[i] = t->shape[i];
        return g;
    case S_Q: r0 = 0, nr = q, nc = t->ndim > 1 ? cols : 0; break;
    case S_K: r0 = q, nr = kv, nc = t->ndim > 1 ? cols : 0; break;
    case S_V: r0 = q + kv, nr = kv, nc = t->ndim > 1 ? cols : 0; break;
    case S_GATE: r0 = (int64_t)j * 2 * F, nr = F, nc = d; break;
    case S_UP: r0 = (int64_t)j * 2 * F + F, nr = F, nc = d; break;
    case S_DOWN: r0 = (int64_t)j * d, nr = d, nc = F; break;
    case S_SH_GATE: r0 = 0, nr = Fs, nc = d; break;
    case S_SH_UP: r0 = Fs, nr = Fs, nc = d; break;
    case S_SH_DOWN: r0 = 0, nr = d, nc = Fs; break;
    }
    g.off = (size_t)(r0 * (nc ? nc : 1));
    g.rank = nc ? 2 : 1;
    g.shape[0] = nr;
    g.shape[1] = nc;
    return g;
}

static int64_t geom_numel(const geom *g)
{
    int64_t n = 1;
    for (int i = 0; i < g->rank; i++) n *= g->shape[i];
    return n;
}

static void shape_text(char *buf, size_t cap, int rank, const int64_t *s)
{
    size_t o = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < rank && o < cap; i++) o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? ", " : "", (long long)s[i]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* One slice of the model as a Hugging Face tensor. */
typedef struct {
    char name[192];
    int tensor; /* table index */
    geom g;
} hf_item;

/* Every Hugging Face tensor of the model in model order: the embedding,
 * each block's entries (experts in order), then the tail. fused: block ->
 * 1 when the directory holds that block's fused experts (import); NULL:
 * the per-expert names (export). */
static moe_status list_items(hf_item **out, size_t *n_out, const moe_tensor_table *tab, const moe_train_config *c,
                             moe_hf_type type, const unsigned char *fused)
{
    size_t ne;
    const hf_entry *es = table_of(type, &ne);
    size_t cap = 64, n = 0;
    hf_item *it = malloc(cap * sizeof *it);
    if (!it) return moe_errorf(MOE_ERR_NOMEM, "tensor list");
    for (int part = 0; part < 3; part++) /* head, blocks, tail */
        for (int l = part == 1 ? 0 : -1; l < (part == 1 ? c->n_layers : 0); l++)
            for (size_t k = 0; k < ne; k++) {
                const hf_entry *e = &es[k];
                const int where = per_block(e) ? 1 : e->kind == MOE_T_WTE ? 0 : 2;
                if (where != part) continue;
                const int ti = moe_layout_find(tab, e->kind, per_block(e) ? l : -1);
                if (ti < 0) continue; /* the configuration has no such tensor */
                const int use_fused = fused && l >= 0 && fused[l];
                if ((e->layout < 0 && use_fused) || (e->layout > 0 && !use_fused)) continue;
                const int nj = per_expert(e) ? c->n_experts : 1;
                for (int j = 0; j < nj; j++) {
                    if (n == cap) {
                        hf_item *p = realloc(it, 2 * cap * sizeof *it);
                        if (!p) {
                            free(it);
                            return moe_errorf(MOE_ERR_NOMEM, "tensor list");
                        }
                        it = p, cap *= 2;
                    }
                    entry_name(it[n].name, sizeof it[n].name, e->name, l, j);
                    it[n].tensor = ti;
                    it[n].g = slice_geom(e, &tab->t[ti], c, j);
                    n++;
                }
            }
    /* every parameter element is covered exactly once (buffers are not part of the format) */
    size_t covered = 0, params = 0;
    for (size_t i = 0; i < n; i++) covered += (size_t)geom_numel(&it[i].g);
    for (int i = 0; i < tab->n; i++)
        if (tab->t[i].role == MOE_TENSOR_PARAM) params += tab->t[i].numel;
    if (covered != params) {
        free(it);
        return moe_errorf(MOE_ERR_ARG, "a %s model cannot hold this configuration (%zu of %zu parameters have a name)",
                          moe_hf_type_str(type), covered, params);
    }
    *out = it;
    *n_out = n;
    return MOE_OK;
}

/* ---------------------------------------------------------------- config.json */

typedef struct {
    const cJSON *root;
    const char *what;
} js;

static const cJSON *field(const js *j, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j->root, name);
    return f && !cJSON_IsNull(f) ? f : NULL;
}

/* An integer field: *out = its value, or def when absent (required: error). */
static moe_status get_int(const js *j, const char *name, int64_t def, int required, int64_t lo, int64_t hi,
                          int64_t *out)
{
    const cJSON *f = field(j, name);
    if (!f) {
        if (required) return moe_errorf(MOE_ERR_FORMAT, "%s: field '%s' is missing", j->what, name);
        *out = def;
        return MOE_OK;
    }
    const double v = f->valuedouble;
    if (!cJSON_IsNumber(f) || v != floor(v) || fabs(v) > 9007199254740992.0)
        return moe_errorf(MOE_ERR_FORMAT, "%s: field '%s' must be an integer", j->what, name);
    if (v < (double)lo || v > (double)hi)
        return moe_errorf(MOE_ERR_ARG, "%s: %s = %.0f is outside [%lld, %lld]", j->what, name, v, (long long)lo,
                          (long long)hi);
    *out = (int64_t)v;
    return MOE_OK;
}

static moe_status get_real(const js *j, const char *name, double def, double *out)
{
    const cJSON *f = field(j, name);
    if (!f) {
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return moe_errorf(MOE_ERR_FORMAT, "%s: field '%s' must be a number", j->what, name);
    *out = f->valuedouble;
    return MOE_OK;
}

static moe_status get_bool(const js *j, const char *name, int def, int *out)
{
    const cJSON *f = field(j, name);
    if (!f) {
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsBool(f)) return moe_errorf(MOE_ERR_FORMAT, "%s: field '%s' must be true or false", j->what, name);
    *out = cJSON_IsTrue(f);
    return MOE_OK;
}

/* A field that changes the computation in a way moerun does not model. */
static moe_status unsupported(const js *j, const char *name, const char *why)
{
    return moe_errorf(MOE_ERR_ARG, "%s: field '%s' is not supported: %s", j->what, name, why);
}

/* RoPE: rope_theta (transformers 4) or rope_parameters (transformers 5);
 * anything but the default rotary embedding is refused. */
static moe_status rope_of(const js *j, double def, double *theta)
{
    moe_status st = get_real(j, "rope_theta", def, theta);
    if (st) return st;
    const cJSON *rs = field(j, "rope_scaling");
    if (rs) return unsupported(j, "rope_scaling", "only the default rotary embedding is modelled");
    const cJSON *rp = field(j, "rope_parameters");
    if (rp) {
        if (!cJSON_IsObject(rp)) return moe_errorf(MOE_ERR_FORMAT, "%s: field 'rope_parameters' must be an object", j->what);
        for (const cJSON *c = rp->child; c; c = c->next) {
            if (!strcmp(c->string, "rope_type")) {
                if (!cJSON_IsString(c) || strcmp(c->valuestring, "default"))
                    return unsupported(j, "rope_parameters.rope_type", "only 'default' is modelled");
            } else if (!strcmp(c->string, "rope_theta")) {
                if (!cJSON_IsNumber(c) || !(c->valuedouble > 0))
                    return moe_errorf(MOE_ERR_FORMAT, "%s: field 'rope_parameters.rope_theta' must be a positive number",
                                      j->what);
                *theta = c->valuedouble;
            } else if (!strcmp(c->string, "partial_rotary_factor")) {
                if (!cJSON_IsNumber(c) || c->valuedouble != 1.0)
                    return unsupported(j, "rope_parameters.partial_rotary_factor", "rotary embedding over part of a head");
            } else {
                char name[160];
                snprintf(name, sizeof name, "rope_parameters.%s", c->string);
                return unsupported(j, name, "only the default rotary embedding is modelled");
            }
        }
    }
    double prf = 1.0;
    if ((st = get_real(j, "partial_rotary_factor", 1.0, &prf))) return st;
    if (prf != 1.0) return unsupported(j, "partial_rotary_factor", "rotary embedding over part of a head");
    if (!(*theta > 0)) return moe_errorf(MOE_ERR_ARG, "%s: rope_theta = %g must be > 0", j->what, *theta);
    return MOE_OK;
}

/* Sets moerun key `key` from text (the key table's own checks apply). */
static moe_status setk(moe_train_config *c, const js *j, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static moe_status setk(moe_train_config *c, const js *j, const char *key, const char *fmt, ...)
{
    char v[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v, sizeof v, fmt, ap);
    va_end(ap);
    moe_status st = moe_train_config_set(c, key, v);
    if (st) {
        char why[512];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        return moe_errorf(st, "%s: the model does not fit moerun: %s", j->what, why);
    }
    return MOE_OK;
}

/* Every key of a JSON object once (Python's json keeps the last of two; an
 * importer that took another would read another model). */
static moe_status no_duplicates(const js *j)
{
    for (const cJSON *a = j->root->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
            if (!strcmp(a->string, b->string))
                return moe_errorf(MOE_ERR_FORMAT, "%s: field '%s' appears twice", j->what, a->string);
    return MOE_OK;
}

static moe_status parse_root(moe_train_config *cfg, moe_hf_type *type, const js *j, int seq_cap)
{
    moe_status st = no_duplicates(j);
    if (st) return st;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j->root, "model_type");
    if (!mt) return moe_errorf(MOE_ERR_FORMAT, "%s: field 'model_type' is missing", j->what);
    if (!cJSON_IsString(mt)) return moe_errorf(MOE_ERR_FORMAT, "%s: field 'model_type' must be a string", j->what);
    int t = -1;
    for (int i = 0; i < MOE_HF_TYPE_COUNT; i++)
        if (!strcmp(mt->valuestring, type_names[i])) t = i;
    if (t < 0) {
        const int mla = !strncmp(mt->valuestring, "deepseek", 8);
        return moe_errorf(MOE_ERR_ARG, "%s: model_type '%.64s' is not supported%s (mixtral, qwen2_moe, qwen3_moe, olmoe)",
                          j->what, mt->valuestring, mla ? " (MLA attention)" : "");
    }
    *type = (moe_hf_type)t;
    const moe_hf_type T = *type;
    /* MLA (DeepSeek-V2/V3) attention under another model_type is not a silent approximation either */
    const char *mla_fields[] = {"kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"};
    for (size_t i = 0; i < 3; i++)
        if (field(j, mla_fields[i])) return unsupported(j, mla_fields[i], "MLA attention");

    int64_t d, L, H, Hkv, V, maxpos, k, E, F, hd = 0;
    const int64_t BIG = INT32_MAX;
    if ((st = get_int(j, "hidden_size", 0, 1, 1, BIG, &d))) return st;
    if ((st = get_int(j, "num_hidden_layers", 0, 1, 1, BIG, &L))) return st;
    if ((st = get_int(j, "num_attention_heads", 0, 1, 1, BIG, &H))) return st;
    if ((st = get_int(j, "num_key_value_heads", H, 0, 1, BIG, &Hkv))) return st;
    if ((st = get_int(j, "vocab_size", 0, 1, 1, BIG, &V))) return st;
    const int64_t maxpos_def = T == MOE_HF_MIXTRAL ? 4096 * 32 : T == MOE_HF_OLMOE ? 4096 : 32768;
    if ((st = get_int(j, "max_position_embeddings", maxpos_def, 0, 1, BIG, &maxpos))) return st;
    if ((st = get_int(j, "num_experts_per_tok", 2, 0, 1, BIG, &k))) return st;
    const char *e_field = T == MOE_HF_MIXTRAL ? "num_local_experts" : "num_experts";
    if ((st = get_int(j, e_field, 0, 1, 0, BIG, &E))) return st;
    if (E == 0) return unsupported(j, e_field, "0 experts is a dense model");
    const char *f_field = T == MOE_HF_MIXTRAL || T == MOE_HF_OLMOE ? "intermediate_size" : "moe_intermediate_size";
    if ((st = get_int(j, f_field, 0, 1, 1, BIG, &F))) return st;
    if (T != MOE_HF_OLMOE && (st = get_int(j, "head_dim", 0, 0, 1, BIG, &hd))) return st; /* OLMoE ignores it */
    if (!hd && d % H)
        return moe_errorf(MOE_ERR_ARG, "%s: num_attention_heads = %lld does not divide hidden_size = %lld", j->what,
                          (long long)H, (long long)d);
    const cJSON *act = field(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return unsupported(j, "hidden_act", "the experts are SwiGLU (silu)");
    double eps, theta = 0.0, aux_coef;
    if ((st = get_real(j, "rms_norm_eps", T == MOE_HF_MIXTRAL || T == MOE_HF_OLMOE ? 1e-5 : 1e-6, &eps))) return st;
    if ((st = rope_of(j, T == MOE_HF_MIXTRAL ? 1e6 : 10000.0, &theta))) return st;
    const double aux_def = T == MOE_HF_MIXTRAL ? 0.001 : T == MOE_HF_OLMOE ? 0.01 : 0.001;
    if ((st = get_real(j, "router_aux_loss_coef", aux_def, &aux_coef))) return st;
    int tie, norm_topk = 1, router_logits, attn_bias = 0, flag;
    if ((st = get_bool(j, "tie_word_embeddings", 0, &tie))) return st;
    if ((st = get_bool(j, "output_router_logits", 0, &router_logits))) return st;

    int64_t S = 0, Fs = 0;
    switch (T) {
    case MOE_HF_MIXTRAL: {
        if (field(j, "sliding_window")) return unsupported(j, "sliding_window", "sliding-window attention");
        double jitter;
        if ((st = get_real(j, "router_jitter_noise", 0.0, &jitter))) return st;
        if (jitter != 0.0) return unsupported(j, "router_jitter_noise", "multiplicative router noise in training");
        norm_topk = 1; /* Mixtral always divides by the top-k sum */
        break;
    }
    case MOE_HF_QWEN2_MOE:
    case MOE_HF_QWEN3_MOE: {
        int64_t step;
        if ((st = get_int(j, "decoder_sparse_step", 1, 0, 0, BIG, &step))) return st;
        if (step != 1)
            return unsupported(j, "decoder_sparse_step", "moerun's MoE layers are every moe_every-th from block 0; "
                                                         "only decoder_sparse_step = 1 (every layer) maps");
        const cJSON *mlp_only = field(j, "mlp_only_layers");
        if (mlp_only && (!cJSON_IsArray(mlp_only) || cJSON_GetArraySize(mlp_only) > 0))
            return unsupported(j, "mlp_only_layers", "dense layers between MoE layers (only an empty list maps)");
        if ((st = get_bool(j, "use_sliding_window", 0, &flag))) return st;
        if (flag) return unsupported(j, "use_sliding_window", "sliding-window attention");
        if ((st = get_bool(j, "norm_topk_prob", 0, &norm_topk))) return st;
        if (T == MOE_HF_QWEN2_MOE) {
            if ((st = get_bool(j, "qkv_bias", 1, &attn_bias))) return st;
            if ((st = get_int(j, "shared_expert_intermediate_size", 0, 1, 0, BIG, &Fs))) return st;
            if (Fs == 0) return unsupported(j, "shared_expert_intermediate_size", "a shared expert of width 0");
            S = 1;
        } else {
            if ((st = get_bool(j, "attention_bias", 0, &flag))) return st;
            if (flag) return unsupported(j, "attention_bias", "a bias on o_proj (moerun's attn_bias is q, k, v only)");
        }
        break;
    }
    case MOE_HF_OLMOE: {
        if ((st = get_bool(j, "norm_topk_prob", 0, &norm_topk))) return st;
        if ((st = get_bool(j, "attention_bias", 0, &flag))) return st;
        if (flag) return unsupported(j, "attention_bias", "a bias on o_proj (moerun's attn_bias is q, k, v only)");
        if (field(j, "clip_qkv")) return unsupported(j, "clip_qkv", "clamping q, k, v");
        break;
    }
    default: break;
    }
    if (k > E)
        return moe_errorf(MOE_ERR_ARG, "%s: num_experts_per_tok = %lld exceeds %s = %lld", j->what, (long long)k,
                          e_field, (long long)E);
    if (norm_topk && k == 1 && T == MOE_HF_MIXTRAL)
        return unsupported(j, "num_experts_per_tok", "Mixtral with one expert per token weighs it by 1 "
                                                     "(moerun's top_k = 1 weighs it by its probability)");
    if (k == 1) norm_topk = 0; /* p / p = 1 only matters for Mixtral, refused above */

    moe_train_config_default(cfg);
    const int64_t seq = maxpos < seq_cap ? maxpos : seq_cap;
    const struct {
        const char *key;
        long long v;
    } ints[] = {
        {"vocab_size", V}, {"d_model", d}, {"n_layers", L}, {"n_heads", H}, {"n_kv_heads", Hkv},
        {"head_dim", hd ? hd : d / H}, {"seq_len", seq}, {"n_experts", E}, {"top_k", k}, {"d_ff", F},
        {"moe_every", 1}, {"normalize_topk", norm_topk}, {"group_seqs", 1}, {"linear_bias", 0},
        {"attn_bias", attn_bias}, {"tie_embeddings", tie}, {"expert_bias", 0}, {"n_groups", 1},
        {"n_shared", S}, {"d_ff_shared", S ? Fs : 0}, {"shared_gate", S ? 1 : 0},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if ((st = setk(cfg, j, ints[i].key, "%lld", ints[i].v))) return st;
    const struct {
        const char *key, *v;
    } names[] = {
        {"router", "token_choice"}, {"activation", "swiglu"}, {"norm", "rmsnorm"}, {"pos", "rope"},
        {"qk_norm", T == MOE_HF_QWEN3_MOE ? "head" : T == MOE_HF_OLMOE ? "full" : "none"},
        {"router_noise", "none"}, {"score", "softmax"}, {"aux_loss", "switch"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((st = setk(cfg, j, names[i].key, "%s", names[i].v))) return st;
    if ((st = setk(cfg, j, "capacity_factor", "0"))) return st; /* dropless */
    if ((st = setk(cfg, j, "ln_eps", "%.17g", eps))) return st;
    if ((st = setk(cfg, j, "rope_theta", "%.17g", theta))) return st;
    if ((st = setk(cfg, j, "route_scale", "1"))) return st;
    /* transformers' balance loss is k times routing.md's for one layer (docs/convert.md) */
    if ((st = setk(cfg, j, "aux_loss_coef", "%.17g", router_logits ? (double)k * aux_coef : 0.0))) return st;
    if ((st = setk(cfg, j, "z_loss_coef", "0"))) return st;
    st = moe_train_config_check_model(cfg);
    if (st) {
        char why[512];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        return moe_errorf(st, "%s: the model does not fit moerun: %s", j->what, why);
    }
    return MOE_OK;
}

moe_status moe_hf_config_parse(moe_train_config *cfg, moe_hf_type *type, const char *json, size_t n,
                               const char *what, int seq_cap)
{
    if (!cfg || !type || (!json && n) || !what) return moe_errorf(MOE_ERR_ARG, "moe_hf_config_parse: NULL argument");
    if (seq_cap < 1) return moe_errorf(MOE_ERR_ARG, "seq_len cap %d must be >= 1", seq_cap);
    if (n > (1u << 24)) return moe_errorf(MOE_ERR_FORMAT, "%s: larger than 16 MB", what);
    /* cJSON wants NUL-terminated text; an embedded NUL is not JSON */
    if (n && memchr(json, '\0', n)) return moe_errorf(MOE_ERR_FORMAT, "%s: not JSON text (a NUL byte)", what);
    char *text = malloc(n + 1);
    if (!text) return moe_errorf(MOE_ERR_NOMEM, "%s", what);
    if (n) memcpy(text, json, n);
    text[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    moe_status st;
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        st = moe_errorf(MOE_ERR_FORMAT, "%s: not valid JSON (near byte %ld)", what, at ? (long)(at - text) : -1L);
    } else if (!cJSON_IsObject(root)) {
        st = moe_errorf(MOE_ERR_FORMAT, "%s: not a JSON object", what);
    } else {
        const js j = {root, what};
        st = parse_root(cfg, type, &j, seq_cap);
    }
    cJSON_Delete(root);
    free(text);
    return st;
}

/* ---------------------------------------------------------------- export */

/* An option of cfg the type cannot express: MOE_ERR_ARG naming it. */
static moe_status cannot(moe_hf_type t, const char *option, const char *why)
{
    return moe_errorf(MOE_ERR_ARG, "a %s model cannot express %s (%s)", moe_hf_type_str(t), option, why);
}

moe_status moe_hf_type_check(moe_hf_type t, const moe_train_config *c, int *warn)
{
    if (warn) *warn = 0;
    if ((unsigned)t >= MOE_HF_TYPE_COUNT) return moe_errorf(MOE_ERR_ARG, "unknown model type %d", (int)t);
    if (c->norm != MOE_NORM_RMSNORM) return cannot(t, "norm = layernorm", "RMSNorm only");
    if (c->pos != MOE_POS_ROPE) return cannot(t, "pos = learned", "rotary positions only");
    if (c->activation != MOE_ACT_SWIGLU) return cannot(t, "this activation", "SwiGLU experts only");
    if (c->moe_every != 1) return cannot(t, "moe_every > 1", "every layer is MoE");
    if (c->router != MOE_ROUTER_TOKEN_CHOICE) return cannot(t, "router = expert_choice", "token choice only");
    if (c->linear_bias) return cannot(t, "linear_bias = 1", "no biases on o_proj and the experts");
    if (c->score != MOE_SCORE_SOFTMAX) return cannot(t, "score = sigmoid", "softmax routing");
    if (c->route_scale != 1.0) return cannot(t, "route_scale", "weights are not scaled");
    if (c->expert_bias) return cannot(t, "expert_bias = 1", "no selection bias");
    if (moe_cfg_topk_groups(c) < c->n_groups) return cannot(t, "n_groups / topk_groups", "no group limits");
    const int qk = c->qk_norm, sh = c->n_shared > 0, ab = moe_cfg_attn_bias(c);
    switch (t) {
    case MOE_HF_MIXTRAL:
        if (qk) return cannot(t, "qk_norm", "no q/k norm");
        if (sh) return cannot(t, "n_shared > 0", "no shared expert");
        if (ab) return cannot(t, "attn_bias = 1", "no q, k, v biases");
        if (!c->normalize_topk) return cannot(t, "normalize_topk = 0", "top-k weights always sum to 1");
        break;
    case MOE_HF_QWEN2_MOE:
        if (qk) return cannot(t, "qk_norm", "no q/k norm");
        if (c->n_shared != 1 || !c->shared_gate)
            return cannot(t, "these shared experts", "exactly one shared expert with its sigmoid gate");
        break;
    case MOE_HF_QWEN3_MOE:
        if (qk != MOE_QK_NORM_HEAD) return cannot(t, "this qk_norm", "a per-head q/k norm");
        if (sh) return cannot(t, "n_shared > 0", "no shared expert");
        if (ab) return cannot(t, "attn_bias = 1", "attention_bias covers o_proj too");
        break;
    case MOE_HF_OLMOE:
        if (qk != MOE_QK_NORM_FULL) return cannot(t, "this qk_norm", "a q/k norm over the whole projection");
        if (sh) return cannot(t, "n_shared > 0", "no shared expert");
        if (ab) return cannot(t, "attn_bias = 1", "attention_bias covers o_proj too");
        if (moe_cfg_head_dim(c) * c->n_heads != c->d_model)
            return cannot(t, "head_dim != d_model / n_heads", "OLMoE ignores head_dim");
        break;
    default: break;
    }
    if (warn) *warn = c->capacity_factor > 0;
    return MOE_OK;
}

moe_status moe_hf_type_for(moe_hf_type *type, const moe_train_config *c)
{
    *type = c->qk_norm == MOE_QK_NORM_FULL   ? MOE_HF_OLMOE
            : c->qk_norm == MOE_QK_NORM_HEAD ? MOE_HF_QWEN3_MOE
            : c->n_shared > 0 || moe_cfg_attn_bias(c) ? MOE_HF_QWEN2_MOE
                                                      : MOE_HF_MIXTRAL;
    return moe_hf_type_check(*type, c, NULL);
}

moe_status moe_hf_config_write(char **json, size_t *n, const moe_train_config *c, moe_hf_type t)
{
    *json = NULL;
    *n = 0;
    moe_status st = moe_hf_type_check(t, c, NULL);
    if (st) return st;
    cJSON *o = cJSON_CreateObject();
    if (!o) return moe_errorf(MOE_ERR_NOMEM, "config.json");
    const char *arch[1] = {arch_names[t]};
    cJSON_AddItemToObject(o, "architectures", cJSON_CreateStringArray(arch, 1));
    cJSON_AddStringToObject(o, "model_type", type_names[t]);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(o, "num_key_value_heads", moe_cfg_kv_heads(c));
    if (t != MOE_HF_OLMOE) cJSON_AddNumberToObject(o, "head_dim", moe_cfg_head_dim(c));
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->seq_len);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->ln_eps);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddNullToObject(o, "rope_scaling");
    cJSON *rp = cJSON_AddObjectToObject(o, "rope_parameters");
    if (rp) {
        cJSON_AddStringToObject(rp, "rope_type", "default");
        cJSON_AddNumberToObject(rp, "rope_theta", c->rope_theta);
    }
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddNumberToObject(o, "num_experts_per_tok", c->top_k);
    cJSON_AddBoolToObject(o, "output_router_logits", 0);
    cJSON_AddNumberToObject(o, "router_aux_loss_coef", c->aux_loss_coef / c->top_k);
    cJSON_AddNumberToObject(o, "attention_dropout", 0.0);
    cJSON_AddNumberToObject(o, "initializer_range", 0.02);
    cJSON_AddBoolToObject(o, "use_cache", 1);
    cJSON_AddStringToObject(o, "torch_dtype", "float32");
    switch (t) {
    case MOE_HF_MIXTRAL:
        cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
        cJSON_AddNumberToObject(o, "num_local_experts", c->n_experts);
        cJSON_AddNullToObject(o, "sliding_window");
        cJSON_AddNumberToObject(o, "router_jitter_noise", 0.0);
        break;
    case MOE_HF_QWEN2_MOE:
    case MOE_HF_QWEN3_MOE:
        cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
        cJSON_AddNumberToObject(o, "moe_intermediate_size", c->d_ff);
        cJSON_AddNumberToObject(o, "num_experts", c->n_experts);
        cJSON_AddBoolToObject(o, "norm_topk_prob", c->normalize_topk);
        cJSON_AddNumberToObject(o, "decoder_sparse_step", 1);
        cJSON_AddItemToObject(o, "mlp_only_layers", cJSON_CreateArray());
        cJSON_AddBoolToObject(o, "use_sliding_window", 0);
        cJSON_AddNullToObject(o, "sliding_window");
        cJSON_AddNumberToObject(o, "max_window_layers", c->n_layers);
        if (t == MOE_HF_QWEN2_MOE) {
            cJSON_AddNumberToObject(o, "shared_expert_intermediate_size", moe_cfg_d_ff_shared(c));
            cJSON_AddBoolToObject(o, "qkv_bias", 1); /* transformers 4 always has them: zeros when moerun has none */
        } else {
            cJSON_AddBoolToObject(o, "attention_bias", 0);
        }
        break;
    case MOE_HF_OLMOE:
        cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
        cJSON_AddNumberToObject(o, "num_experts", c->n_experts);
        cJSON_AddBoolToObject(o, "norm_topk_prob", c->normalize_topk);
        cJSON_AddBoolToObject(o, "attention_bias", 0);
        cJSON_AddNullToObject(o, "clip_qkv");
        break;
    default: break;
    }
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text) return moe_errorf(MOE_ERR_NOMEM, "config.json");
    const size_t len = strlen(text);
    char *out = malloc(len + 2);
    if (!out) {
        cJSON_free(text);
        return moe_errorf(MOE_ERR_NOMEM, "config.json");
    }
    memcpy(out, text, len);
    out[len] = '\n';
    out[len + 1] = '\0';
    cJSON_free(text);
    *json = out;
    *n = len + 1;
    return MOE_OK;
}

moe_status moe_hf_export_tensors(moe_st_tensor **out, size_t *n_out, char **names, float **zeros, const float *params,
                                 const moe_tensor_table *tab, const moe_train_config *c, moe_hf_type t)
{
    *out = NULL;
    *n_out = 0;
    *names = NULL;
    *zeros = NULL;
    moe_status st = moe_hf_type_check(t, c, NULL);
    if (st) return st;
    hf_item *it = NULL;
    size_t n = 0;
    if ((st = list_items(&it, &n, tab, c, t, NULL))) return st;
    /* qwen2_moe without q, k, v biases: transformers 4 has them anyway, zeros compute the same */
    const int zero_bias = t == MOE_HF_QWEN2_MOE && !moe_cfg_attn_bias(c);
    const size_t nz = zero_bias ? 3 * (size_t)c->n_layers : 0;
    const int64_t D = moe_cfg_head_dim(c), q = (int64_t)c->n_heads * D, kv = (int64_t)moe_cfg_kv_heads(c) * D;
    moe_st_tensor *ts = calloc(n + nz, sizeof *ts);
    char *nm = calloc(n + nz, sizeof it[0].name);
    float *z = zero_bias ? calloc((size_t)(q > kv ? q : kv), sizeof(float)) : NULL;
    if (!ts || !nm || (zero_bias && !z)) {
        free(ts), free(nm), free(z), free(it);
        return moe_errorf(MOE_ERR_NOMEM, "export tensor list");
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        char *name = nm + m * sizeof it[0].name;
        strcpy(name, it[i].name);
        ts[m].name = name;
        ts[m].rank = it[i].g.rank;
        for (int r = 0; r < it[i].g.rank; r++) ts[m].shape[r] = it[i].g.shape[r];
        ts[m].data = params + tab->t[it[i].tensor].offset + it[i].g.off;
        m++;
        /* the zero biases follow their weights */
        const char *proj = strstr(it[i].name, "_proj.weight");
        if (zero_bias && proj && strstr(it[i].name, "self_attn.") && proj[-1] != 'o') {
            name = nm + m * sizeof it[0].name;
            snprintf(name, sizeof it[0].name, "%.*s_proj.bias", (int)(proj - it[i].name), it[i].name);
            ts[m].name = name;
            ts[m].rank = 1;
            ts[m].shape[0] = proj[-1] == 'q' ? q : kv;
            ts[m].data = z;
            m++;
        }
    }
    free(it);
    *out = ts;
    *n_out = m;
    *names = nm;
    *zeros = z;
    return MOE_OK;
}

/* ---------------------------------------------------------------- import */

moe_status moe_hf_read(float *params, const moe_tensor_table *tab, const moe_train_config *c, moe_hf_type t,
                       moe_st_dir *dir)
{
    moe_status st = moe_st_dir_check(dir); /* every shard against the index, before any data */
    if (st) return st;
    /* which blocks hold transformers 5's fused experts */
    unsigned char *fused = calloc((size_t)c->n_layers, 1);
    if (!fused) return moe_errorf(MOE_ERR_NOMEM, "import");
    char name[192];
    for (int l = 0; l < c->n_layers; l++) {
        entry_name(name, sizeof name, LY "mlp.experts.gate_up_proj", l, 0);
        fused[l] = (unsigned char)moe_st_dir_has(dir, name);
    }
    hf_item *it = NULL;
    size_t n = 0;
    if ((st = list_items(&it, &n, tab, c, t, fused))) {
        free(fused);
        return st;
    }
    free(fused);
    const size_t nd = moe_st_dir_count(dir);
    unsigned char *used = calloc(nd ? nd : 1, 1);
    if (!used) {
        free(it);
        return moe_errorf(MOE_ERR_NOMEM, "import");
    }
    /* names and shapes first: nothing is read until the whole map agrees */
    moe_st_view v;
    for (size_t i = 0; st == MOE_OK && i < n; i++) {
        if (!moe_st_dir_has(dir, it[i].name)) {
            st = moe_errorf(MOE_ERR_FORMAT, "tensor '%s' is missing (a %s model of this config.json has it)",
                            it[i].name, moe_hf_type_str(t));
            break;
        }
        if ((st = moe_st_dir_find(dir, it[i].name, &v))) break;
        int same = v.rank == it[i].g.rank;
        for (int r = 0; same && r < v.rank; r++) same = v.shape[r] == it[i].g.shape[r];
        if (!same) {
            char a[160], b[160];
            shape_text(a, sizeof a, v.rank, v.shape);
            shape_text(b, sizeof b, it[i].g.rank, it[i].g.shape);
            st = moe_errorf(MOE_ERR_FORMAT, "tensor '%s' has shape %s, config.json implies %s", it[i].name, a, b);
            break;
        }
        size_t lo = 0, hi = nd; /* the directory's names are sorted (strcmp) */
        while (lo < hi) {
            const size_t mid = lo + (hi - lo) / 2;
            if (strcmp(moe_st_dir_name(dir, mid), it[i].name) < 0) lo = mid + 1;
            else hi = mid;
        }
        if (lo < nd && !strcmp(moe_st_dir_name(dir, lo), it[i].name)) used[lo] = 1;
    }
    for (size_t k = 0; st == MOE_OK && k < nd; k++)
        if (!used[k])
            st = moe_errorf(MOE_ERR_FORMAT, "tensor '%s' is not part of a %s model of this config.json",
                            moe_st_dir_name(dir, k), moe_hf_type_str(t));
    free(used);
    for (size_t i = 0; st == MOE_OK && i < n; i++)
        st = moe_st_dir_read_f32(dir, it[i].name, params + tab->t[it[i].tensor].offset + it[i].g.off,
                                 (size_t)geom_numel(&it[i].g));
    for (int i = 0; st == MOE_OK && i < tab->n; i++)
        if (tab->t[i].role == MOE_TENSOR_BUFFER) memset(params + tab->t[i].offset, 0, tab->t[i].numel * sizeof(float));
    free(it);
    return st;
}
