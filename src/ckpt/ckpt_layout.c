/* The spec's parameter layout (checkpoint.md, /model datasets) as a
 * moe_tensor_table, and the MoE layers of any table. Readers use it to know
 * which datasets and shapes a file's attributes imply; it bounds every
 * attribute first so that absurd values never reach an allocation. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"

int moe_ckpt_moe_layers(const moe_tensor_table *t, int *layers)
{
    int n = 0, last = -1;
    /* Increasing distinct values, by repeated "smallest above last". */
    for (;;) {
        int next = -1;
        for (int i = 0; i < t->n; i++) {
            int L = t->t[i].layer;
            if (t->t[i].expert_sharded && L > last && (next < 0 || L < next)) next = L;
        }
        if (next < 0 || n == MOE_CKPT_MAX_MOE_LAYERS) return n;
        if (layers) layers[n] = next;
        n++;
        last = next;
    }
}

/* Upper bounds keep every shape product far inside int64 (and any
 * realistic model inside them). */
static moe_status check_range(const char *name, int v, int lo, int hi)
{
    if (v < lo || v > hi)
        return moe_errorf(MOE_ERR_ARG, "model attribute %s = %d is outside [%d, %d]", name, v, lo, hi);
    return MOE_OK;
}

static moe_status check_cfg(const moe_train_config *c, int ep_rank, int ep_size)
{
    const struct {
        const char *name;
        int v, lo, hi;
    } r[] = {
        {"vocab_size", c->vocab_size, 1, 1 << 24}, {"d_model", c->d_model, 1, 1 << 16},
        {"n_layers", c->n_layers, 1, 1 << 12},     {"n_heads", c->n_heads, 1, 1 << 16},
        {"seq_len", c->seq_len, 1, 1 << 20},       {"n_experts", c->n_experts, 1, 1 << 16},
        {"d_ff", c->d_ff, 1, 1 << 20},             {"moe_every", c->moe_every, 1, 1 << 12},
        {"top_k", c->top_k, 1, c->n_experts},      {"group_seqs", c->group_seqs, 1, 1 << 24},
        {"normalize_topk", c->normalize_topk, 0, 1},
    };
    moe_status st = MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < sizeof r / sizeof r[0]; i++)
        st = check_range(r[i].name, r[i].v, r[i].lo, r[i].hi);
    if (st != MOE_OK) return st;
    if ((unsigned)c->activation > MOE_ACT_SWIGLU || (unsigned)c->router > MOE_ROUTER_EXPERT_CHOICE)
        return moe_errorf(MOE_ERR_ARG, "unknown activation (%d) or router (%d)", (int)c->activation,
                          (int)c->router);
    if (ep_size < 1 || c->n_experts % ep_size != 0 || ep_rank < 0 || ep_rank >= ep_size)
        return moe_errorf(MOE_ERR_ARG, "expert-parallel size %d (rank %d) must divide n_experts = %d", ep_size,
                          ep_rank, c->n_experts);
    return MOE_OK;
}

typedef struct {
    moe_tensor_table *t;
    int cap;
    int64_t r0, rows; /* local expert rows */
} builder;

/* Appends one tensor named by a printf format. */
static moe_status add(builder *b, int layer, int sharded, int decay, int ndim, int64_t d0, int64_t d1, int64_t d2,
                      const char *fmt, ...) __attribute__((format(printf, 9, 10)));

static moe_status add(builder *b, int layer, int sharded, int decay, int ndim, int64_t d0, int64_t d1, int64_t d2,
                      const char *fmt, ...)
{
    if (b->t->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 64;
        moe_tensor *p = realloc(b->t->t, (size_t)cap * sizeof *p);
        if (!p) return moe_errorf(MOE_ERR_NOMEM, "layout: %d tensors", cap);
        b->t->t = p;
        b->cap = cap;
    }
    moe_tensor *x = &b->t->t[b->t->n];
    memset(x, 0, sizeof *x);
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(x->name, sizeof x->name, fmt, ap);
    va_end(ap);
    if (len >= (int)sizeof x->name) return moe_errorf(MOE_ERR_ARG, "layout: tensor name '%s' too long", x->name);
    x->ndim = ndim;
    x->shape[0] = d0;
    x->shape[1] = d1;
    x->shape[2] = d2;
    x->expert_sharded = sharded;
    x->layer = sharded ? layer : -1;
    x->decay = decay;
    x->row0 = sharded ? b->r0 : 0;
    x->rows = sharded ? b->rows : d0;
    x->numel = (size_t)(x->rows * moe_tensor_row_numel(x));
    x->offset = b->t->total;
    b->t->total += x->numel;
    b->t->n++;
    return MOE_OK;
}

moe_status moe_ckpt_layout_create(moe_tensor_table **out, const moe_train_config *c, int ep_rank, int ep_size)
{
    *out = NULL;
    moe_status st = check_cfg(c, ep_rank, ep_size);
    if (st != MOE_OK) return st;
    moe_tensor_table *t = calloc(1, sizeof *t);
    if (!t) return moe_errorf(MOE_ERR_NOMEM, "layout table");
    const int64_t V = c->vocab_size, d = c->d_model, S = c->seq_len, E = c->n_experts, F = c->d_ff,
                  F1 = moe_f1(c->d_ff, c->activation);
    builder b = {t, 0, ep_rank * (E / ep_size), E / ep_size};
    /* Each line: layer, expert-sharded, weight decay, ndim, shape, name. */
#define ADD(...) \
    if (st == MOE_OK) st = add(&b, __VA_ARGS__)
    ADD(-1, 0, 1, 2, V, d, 0, "wte");
    ADD(-1, 0, 1, 2, S, d, 0, "wpe");
    for (int L = 0; L < c->n_layers && st == MOE_OK; L++) {
        ADD(L, 0, 0, 1, d, 0, 0, "h/%d/ln_1/weight", L);
        ADD(L, 0, 0, 1, d, 0, 0, "h/%d/ln_1/bias", L);
        ADD(L, 0, 1, 2, 3 * d, d, 0, "h/%d/attn/c_attn/weight", L);
        ADD(L, 0, 0, 1, 3 * d, 0, 0, "h/%d/attn/c_attn/bias", L);
        ADD(L, 0, 1, 2, d, d, 0, "h/%d/attn/c_proj/weight", L);
        ADD(L, 0, 0, 1, d, 0, 0, "h/%d/attn/c_proj/bias", L);
        ADD(L, 0, 0, 1, d, 0, 0, "h/%d/ln_2/weight", L);
        ADD(L, 0, 0, 1, d, 0, 0, "h/%d/ln_2/bias", L);
        if (L % c->moe_every == 0) {
            ADD(L, 0, 1, 2, E, d, 0, "h/%d/moe/router/weight", L);
            if (c->router_noise) {
                ADD(L, 0, 1, 2, E, d, 0, "h/%d/moe/router/noise_weight", L);
            }
            ADD(L, 1, 1, 3, E, F1, d, "h/%d/moe/experts/w1", L);
            ADD(L, 1, 0, 2, E, F1, 0, "h/%d/moe/experts/b1", L);
            ADD(L, 1, 1, 3, E, d, F, "h/%d/moe/experts/w2", L);
            ADD(L, 1, 0, 2, E, d, 0, "h/%d/moe/experts/b2", L);
        } else {
            ADD(L, 0, 1, 2, F1, d, 0, "h/%d/mlp/c_fc/weight", L);
            ADD(L, 0, 0, 1, F1, 0, 0, "h/%d/mlp/c_fc/bias", L);
            ADD(L, 0, 1, 2, d, F, 0, "h/%d/mlp/c_proj/weight", L);
            ADD(L, 0, 0, 1, d, 0, 0, "h/%d/mlp/c_proj/bias", L);
        }
    }
    ADD(-1, 0, 0, 1, d, 0, 0, "ln_f/weight");
    ADD(-1, 0, 0, 1, d, 0, 0, "ln_f/bias");
#undef ADD
    if (st != MOE_OK) {
        moe_ckpt_layout_destroy(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

void moe_ckpt_layout_destroy(moe_tensor_table *t)
{
    if (!t) return;
    free(t->t);
    free(t);
}
