/* Deterministic checkpoint contents for the tests (see ckpt_testlib.h). */
#include "ckpt_testlib.h"
#include "layout/layout.h"
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *tk_config_text = "[model]\nd_model = 8\nn_experts = 12\n# a test config\n";
int tk_vocab;

int tk_assign(int v) { return (v * 5 + v / 16) % 12; }

void tk_config(moe_train_config *c)
{
    tl_config_tiny(c);
    c->capacity_factor = 1.25;
    c->vocab_size = c->vocab_size_user = 300;
    if (tk_vocab) {
        c->head = MOE_HEAD_VOCAB_EXPERTS;
        c->vocab_experts = 12;
    }
    if (!tk_arch) return;
    c->norm = MOE_NORM_RMSNORM;
    c->pos = MOE_POS_ROPE;
    c->n_kv_heads = 1;
    c->head_dim = 6;
    c->qk_norm = MOE_QK_NORM_HEAD;
    c->linear_bias = 0;
    c->attn_bias = 1;
    c->tie_embeddings = 0;
    c->score = MOE_SCORE_SIGMOID;
    c->expert_bias = 1;
    c->n_shared = 2;
    c->d_ff_shared = 4;
    c->shared_gate = 1;
}

int tk_arch = 0;

moe_tok *tk_tokenizer(void)
{
    static const char *const more[] = {"ab", "", " the", "\xff\xfe", "abc", "\n\n"};
    uint8_t bytes[512];
    int64_t off[263];
    int64_t n = 0, len = 0;
    for (; n < 256; n++) {
        off[n] = len;
        bytes[len++] = (uint8_t)n;
    }
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++, n++) {
        off[n] = len;
        memcpy(bytes + len, more[i], strlen(more[i]));
        len += (int64_t)strlen(more[i]);
    }
    off[n] = len;
    const char *names[2] = {"<|endoftext|>", "<|pad|>"};
    const int64_t ids[2] = {257, 262};
    moe_tok *t = NULL;
    return moe_tok_create(&t, bytes, off, n, NULL, 2, names, ids) == MOE_OK ? t : NULL;
}

/* Global index of local element e of x (by row id for the vocabulary rows). */
static int64_t global_index(const moe_tensor *x, size_t e)
{
    const int64_t row = moe_tensor_row_numel(x), r = (int64_t)e / row;
    return (x->row_ids ? x->row_ids[r] : x->row0 + r) * row + (int64_t)e % row;
}

/* The vocabulary experts' counters: step 29 + m, targets 20 m + 1 (a step is
 * at most the optimizer's 41, as in any file a run writes: the loader checks). */
static int64_t tk_vcounter(int which, int m) { return which == 0 ? 29 + m : 20 * m + 1; }

static uint32_t fnv32(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

float tk_value(int kind, const char *name, int64_t j)
{
    uint32_t h = (fnv32(name) ^ ((uint32_t)kind * 0x9e3779b9u)) + (uint32_t)j * 40503u;
    const float x = (float)((int32_t)(h % 65536u) - 32768) / 4096.0f;
    return kind == TK_V ? fabsf(x) : x; /* a second moment is >= 0 (the loader checks) */
}

/* Per-layer counters: expert_step = 12 l + e + 7 (distinct, and at most the
 * optimizer step 41 with two MoE layers of 12 experts), tokens 10 e + l,
 * dropped e + 3 l. */
static int64_t tk_counter(int which, int l, int e)
{
    return which == 0 ? 12 * l + e + 7 : which == 1 ? 10 * e + l : e + 3 * l;
}

static int alloc_state(tk_state *t, int ep_rank, int ep_size)
{
    memset(t, 0, sizeof *t);
    tk_config(&t->cfg);
    if (tk_vocab) {
        int32_t assign[300]; /* the model's vocab_size (tk_config) */
        for (int v = 0; v < 300; v++) assign[v] = tk_assign(v);
        if (moe_vocab_part_create(&t->part, assign, 300, 12) != MOE_OK) return -1;
    }
    if (moe_layout_create(&t->table, &t->cfg, t->part, ep_rank, ep_size) != MOE_OK) return -1;
    t->n_moe = moe_ckpt_moe_layers(t->table, NULL);
    const size_t n = t->table->total, ne = (size_t)t->n_moe * (size_t)t->cfg.n_experts;
    moe_ckpt_state *s = &t->s;
    s->table = t->table;
    s->cfg = &t->cfg;
    s->n_experts = t->cfg.n_experts;
    s->params = moe_calloc(n, sizeof(float));
    s->m = moe_calloc(n, sizeof(float));
    s->v = moe_calloc(n, sizeof(float));
    s->expert_step = moe_calloc(ne, sizeof(int64_t));
    s->expert_tokens = moe_calloc(ne, sizeof(int64_t));
    s->expert_dropped = moe_calloc(ne, sizeof(int64_t));
    s->vocab_expert_step = moe_calloc(12, sizeof(int64_t));
    s->vocab_expert_tokens = moe_calloc(12, sizeof(int64_t));
    if (!s->params || !s->m || !s->v || !s->expert_step || !s->expert_tokens || !s->expert_dropped ||
        !s->vocab_expert_step || !s->vocab_expert_tokens)
        return -1;
    /* a model holds its partition from the start (the loader checks the file's against it) */
    for (int i = 0; i < t->table->n; i++)
        if (t->table->t[i].dtype == MOE_TENSOR_I32)
            for (size_t e = 0; e < t->table->t[i].numel; e++) s->params[t->table->t[i].offset + e] = (float)tk_assign((int)e);
    return 0;
}

int tk_state_blank(tk_state *t, int ep_rank, int ep_size) { return alloc_state(t, ep_rank, ep_size); }

int tk_state_make(tk_state *t, int ep_rank, int ep_size, int world_rank, int replica)
{
    if (alloc_state(t, ep_rank, ep_size)) return -1;
    moe_ckpt_state *s = &t->s;
    float *blocks[3] = {s->params, s->m, s->v};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < t->table->n; i++) {
            const moe_tensor *x = &t->table->t[i];
            if (x->dtype == MOE_TENSOR_I32) continue; /* the partition */
            const int garbage = x->expert_sharded ? replica > 0 : world_rank != 0;
            for (size_t e = 0; e < x->numel; e++)
                blocks[k][x->offset + e] = garbage ? -777.0f : tk_value(k, x->name, global_index(x, e));
        }
    const int E = t->cfg.n_experts, El = E / ep_size;
    for (int l = 0; l < t->n_moe; l++)
        for (int e = 0; e < E; e++) {
            const size_t o = (size_t)l * (size_t)E + (size_t)e;
            const int owned = e / El == ep_rank && replica == 0;
            s->expert_step[o] = owned ? tk_counter(0, l, e) : -1;
            s->expert_tokens[o] = tk_counter(1, l, e);
            s->expert_dropped[o] = tk_counter(2, l, e);
        }
    for (int m = 0; m < 12; m++) {
        const int owned = m / (12 / ep_size) == ep_rank && replica == 0;
        s->vocab_expert_step[m] = owned ? tk_vcounter(0, m) : -1;
        s->vocab_expert_tokens[m] = tk_vcounter(1, m);
    }
    s->opt_step = 41;
    s->lr = 3e-3;
    s->beta1 = 0.9;
    s->beta2 = 0.95;
    s->eps = 1e-8;
    s->weight_decay = 0.1;
    s->step = 42;
    s->tokens_seen = 42 * 16 * 8;
    s->seed = 0xfedcba9876543210ull;
    s->n_extra = 2;
    strcpy(s->extra[0].name, "data_cursor");
    s->extra[0].value = 123456789012345ll;
    strcpy(s->extra[1].name, "data_epoch");
    s->extra[1].value = 3;
    s->config_text = tk_config_text;
    return 0;
}

void tk_state_free(tk_state *t)
{
    moe_ckpt_state *s = &t->s;
    moe_free(s->params);
    moe_free(s->m);
    moe_free(s->v);
    moe_free(s->expert_step);
    moe_free(s->expert_tokens);
    moe_free(s->expert_dropped);
    moe_free(s->vocab_expert_step);
    moe_free(s->vocab_expert_tokens);
    moe_layout_destroy(t->table);
    moe_vocab_part_destroy(t->part);
    memset(t, 0, sizeof *t);
}

int64_t tk_state_check(const tk_state *t)
{
    const moe_ckpt_state *s = &t->s;
    int64_t bad = 0;
    const float *blocks[3] = {s->params, s->m, s->v};
    for (int k = 0; k < 3; k++) {
        if (!blocks[k]) continue;
        for (int i = 0; i < t->table->n; i++) {
            const moe_tensor *x = &t->table->t[i];
            if (x->dtype == MOE_TENSOR_I32) {
                for (size_t e = 0; k == 0 && e < x->numel; e++) bad += blocks[k][x->offset + e] != tk_assign((int)e);
                continue;
            }
            if (k > 0 && x->role == MOE_TENSOR_BUFFER) continue; /* buffers have no optimizer state */
            for (size_t e = 0; e < x->numel; e++) {
                float want = tk_value(k, x->name, global_index(x, e)), got = blocks[k][x->offset + e];
                bad += memcmp(&want, &got, sizeof want) != 0;
            }
        }
    }
    const int E = t->cfg.n_experts;
    for (int l = 0; l < t->n_moe; l++)
        for (int e = 0; e < E; e++) {
            const size_t o = (size_t)l * (size_t)E + (size_t)e;
            if (s->expert_step) bad += s->expert_step[o] != tk_counter(0, l, e);
            if (s->expert_tokens) bad += s->expert_tokens[o] != tk_counter(1, l, e);
            if (s->expert_dropped) bad += s->expert_dropped[o] != tk_counter(2, l, e);
        }
    for (int m = 0; tk_vocab && m < 12; m++) {
        if (s->vocab_expert_step) bad += s->vocab_expert_step[m] != tk_vcounter(0, m);
        if (s->vocab_expert_tokens) bad += s->vocab_expert_tokens[m] != tk_vcounter(1, m);
    }
    bad += s->opt_step != 41 || s->lr != 3e-3 || s->beta1 != 0.9 || s->beta2 != 0.95 || s->eps != 1e-8 ||
           s->weight_decay != 0.1;
    bad += s->step != 42 || s->tokens_seen != 42 * 16 * 8 || s->seed != 0xfedcba9876543210ull;
    bad += s->n_extra != 2 || strcmp(s->extra[0].name, "data_cursor") || s->extra[0].value != 123456789012345ll ||
           strcmp(s->extra[1].name, "data_epoch") || s->extra[1].value != 3;
    return bad;
}
