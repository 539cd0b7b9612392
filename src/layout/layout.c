/* The descriptor of every tensor (layout.h) and the table built from it. */
#include "layout/layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Dimensions, resolved against a configuration. */
typedef enum {
    D_V, D_S, D_C, D_E, D_F, D_F1,
    D_QKV,    /* c_attn rows: (n_heads + 2 n_kv_heads) head_dim (3 d_model by default) */
    D_A,      /* attention width n_heads head_dim (c_proj's input) */
    D_QN, D_KN, /* q_norm, k_norm widths: n_heads D and n_kv_heads D (full), D (head) */
    D_SH, D_FS, D_FS1, D_1, /* shared experts S, F_s, F1_s; 1 */
    D_M       /* vocabulary experts */
} dim_code;

/* Where a tensor sits: before the blocks, in every block, in MoE or dense
 * blocks only, after the blocks. */
typedef enum { AT_HEAD, AT_BLOCK, AT_MOE, AT_DENSE, AT_TAIL } place;

typedef struct {
    moe_tensor_kind kind;
    const char *name;         /* under /model; block tensors get "h/<l>/" in front */
    place at;
    int ndim;
    dim_code dims[MOE_TENSOR_MAX_DIMS];
    int sharded;              /* dim 0 split into expert segments over the ep group: 0, or 1 + MOE_EXPERTS_* */
    int decay;
    moe_init_kind init;
    int role;                 /* MOE_TENSOR_PARAM or MOE_TENSOR_BUFFER */
    int (*present)(const moe_train_config *c); /* NULL: always */
} tensor_desc;

static int with_router_noise(const moe_train_config *c) { return c->router_noise != 0; }
static int with_wpe(const moe_train_config *c) { return c->pos == MOE_POS_LEARNED; }
static int with_ln_bias(const moe_train_config *c) { return c->norm == MOE_NORM_LAYERNORM; }
static int with_bias(const moe_train_config *c) { return c->linear_bias; }
static int with_attn_bias(const moe_train_config *c) { return moe_cfg_attn_bias(c); }
static int with_qk_norm(const moe_train_config *c) { return c->qk_norm != MOE_QK_NORM_NONE; }
static int with_lm_head(const moe_train_config *c) { return !c->tie_embeddings; }
static int with_expert_bias(const moe_train_config *c) { return c->expert_bias; }
static int with_shared(const moe_train_config *c) { return c->n_shared > 0; }
static int with_shared_bias(const moe_train_config *c) { return c->n_shared > 0 && c->linear_bias; }
static int with_shared_gate(const moe_train_config *c) { return c->n_shared > 0 && c->shared_gate; }
static int with_vocab_head(const moe_train_config *c) { return c->head == MOE_HEAD_VOCAB_EXPERTS; }

#define P MOE_TENSOR_PARAM
#define B MOE_TENSOR_BUFFER
#define FFN (1 + MOE_EXPERTS_FFN)
#define VOC (1 + MOE_EXPERTS_VOCAB)
/* In table order (part of the format: see layout.h). */
static const tensor_desc descs[] = {
    {MOE_T_WTE, "wte", AT_HEAD, 2, {D_V, D_C}, 0, 1, MOE_INIT_NORMAL, P, NULL},
    {MOE_T_WPE, "wpe", AT_HEAD, 2, {D_S, D_C}, 0, 1, MOE_INIT_NORMAL, P, with_wpe},
    {MOE_T_LN1_W, "ln_1/weight", AT_BLOCK, 1, {D_C}, 0, 0, MOE_INIT_ONE, P, NULL},
    {MOE_T_LN1_B, "ln_1/bias", AT_BLOCK, 1, {D_C}, 0, 0, MOE_INIT_ZERO, P, with_ln_bias},
    {MOE_T_QKV_W, "attn/c_attn/weight", AT_BLOCK, 2, {D_QKV, D_C}, 0, 1, MOE_INIT_NORMAL, P, NULL},
    {MOE_T_QKV_B, "attn/c_attn/bias", AT_BLOCK, 1, {D_QKV}, 0, 0, MOE_INIT_ZERO, P, with_attn_bias},
    {MOE_T_QNORM_W, "attn/q_norm/weight", AT_BLOCK, 1, {D_QN}, 0, 0, MOE_INIT_ONE, P, with_qk_norm},
    {MOE_T_KNORM_W, "attn/k_norm/weight", AT_BLOCK, 1, {D_KN}, 0, 0, MOE_INIT_ONE, P, with_qk_norm},
    {MOE_T_PROJ_W, "attn/c_proj/weight", AT_BLOCK, 2, {D_C, D_A}, 0, 1, MOE_INIT_RESID, P, NULL},
    {MOE_T_PROJ_B, "attn/c_proj/bias", AT_BLOCK, 1, {D_C}, 0, 0, MOE_INIT_ZERO, P, with_bias},
    {MOE_T_LN2_W, "ln_2/weight", AT_BLOCK, 1, {D_C}, 0, 0, MOE_INIT_ONE, P, NULL},
    {MOE_T_LN2_B, "ln_2/bias", AT_BLOCK, 1, {D_C}, 0, 0, MOE_INIT_ZERO, P, with_ln_bias},
    {MOE_T_ROUTER_W, "moe/router/weight", AT_MOE, 2, {D_E, D_C}, 0, 1, MOE_INIT_NORMAL, P, NULL},
    {MOE_T_NOISE_W, "moe/router/noise_weight", AT_MOE, 2, {D_E, D_C}, 0, 1, MOE_INIT_NORMAL, P, with_router_noise},
    {MOE_T_EXP_BIAS, "moe/router/expert_bias", AT_MOE, 1, {D_E}, 0, 0, MOE_INIT_ZERO, B, with_expert_bias},
    {MOE_T_EXP_W1, "moe/experts/w1", AT_MOE, 3, {D_E, D_F1, D_C}, FFN, 1, MOE_INIT_NORMAL, P, NULL},
    {MOE_T_EXP_B1, "moe/experts/b1", AT_MOE, 2, {D_E, D_F1}, FFN, 0, MOE_INIT_ZERO, P, with_bias},
    {MOE_T_EXP_W2, "moe/experts/w2", AT_MOE, 3, {D_E, D_C, D_F}, FFN, 1, MOE_INIT_RESID, P, NULL},
    {MOE_T_EXP_B2, "moe/experts/b2", AT_MOE, 2, {D_E, D_C}, FFN, 0, MOE_INIT_ZERO, P, with_bias},
    /* shared experts: dense (replicated, data-parallel) despite the leading S */
    {MOE_T_SH_W1, "moe/shared/w1", AT_MOE, 3, {D_SH, D_FS1, D_C}, 0, 1, MOE_INIT_NORMAL, P, with_shared},
    {MOE_T_SH_B1, "moe/shared/b1", AT_MOE, 2, {D_SH, D_FS1}, 0, 0, MOE_INIT_ZERO, P, with_shared_bias},
    {MOE_T_SH_W2, "moe/shared/w2", AT_MOE, 3, {D_SH, D_C, D_FS}, 0, 1, MOE_INIT_RESID, P, with_shared},
    {MOE_T_SH_B2, "moe/shared/b2", AT_MOE, 2, {D_SH, D_C}, 0, 0, MOE_INIT_ZERO, P, with_shared_bias},
    {MOE_T_SH_GATE, "moe/shared/gate", AT_MOE, 2, {D_1, D_C}, 0, 1, MOE_INIT_NORMAL, P, with_shared_gate},
    {MOE_T_FC_W, "mlp/c_fc/weight", AT_DENSE, 2, {D_F1, D_C}, 0, 1, MOE_INIT_NORMAL, P, NULL},
    {MOE_T_FC_B, "mlp/c_fc/bias", AT_DENSE, 1, {D_F1}, 0, 0, MOE_INIT_ZERO, P, with_bias},
    {MOE_T_FCPROJ_W, "mlp/c_proj/weight", AT_DENSE, 2, {D_C, D_F}, 0, 1, MOE_INIT_RESID, P, NULL},
    {MOE_T_FCPROJ_B, "mlp/c_proj/bias", AT_DENSE, 1, {D_C}, 0, 0, MOE_INIT_ZERO, P, with_bias},
    {MOE_T_LNF_W, "ln_f/weight", AT_TAIL, 1, {D_C}, 0, 0, MOE_INIT_ONE, P, NULL},
    {MOE_T_LNF_B, "ln_f/bias", AT_TAIL, 1, {D_C}, 0, 0, MOE_INIT_ZERO, P, with_ln_bias},
    {MOE_T_LM_HEAD, "lm_head/weight", AT_TAIL, 2, {D_V, D_C}, 0, 1, MOE_INIT_NORMAL, P, with_lm_head},
    /* vocabulary experts: rows of W_out / c by token id, sharded by expert */
    {MOE_T_VOCAB_ASSIGN, "vocab_head/assign", AT_TAIL, 1, {D_V}, 0, 0, MOE_INIT_ASSIGN, B, with_vocab_head},
    {MOE_T_VOCAB_ROUTER_W, "vocab_head/router/weight", AT_TAIL, 2, {D_M, D_C}, 0, 1, MOE_INIT_NORMAL, P,
     with_vocab_head},
    {MOE_T_VOCAB_ROUTER_B, "vocab_head/router/bias", AT_TAIL, 1, {D_M}, 0, 0, MOE_INIT_ZERO, P, with_vocab_head},
    {MOE_T_VOCAB_W, "vocab_head/weight", AT_TAIL, 2, {D_V, D_C}, VOC, 1, MOE_INIT_NORMAL, P, with_vocab_head},
    {MOE_T_VOCAB_B, "vocab_head/bias", AT_TAIL, 1, {D_V}, VOC, 0, MOE_INIT_ZERO, P, with_vocab_head},
};
#undef B
#undef P
#undef FFN
#undef VOC
#define N_DESCS ((int)(sizeof descs / sizeof descs[0]))

int moe_layout_block_is_moe(const moe_train_config *cfg, int l) { return l % cfg->moe_every == 0; }

static int64_t dim_value(dim_code d, const moe_train_config *c)
{
    switch (d) {
    case D_V: return c->vocab_size;
    case D_S: return c->seq_len;
    case D_C: return c->d_model;
    case D_E: return c->n_experts;
    case D_F: return c->d_ff;
    case D_F1: return moe_f1(c->d_ff, c->activation);
    case D_QKV: return moe_cfg_qkv_width(c);
    case D_A: return moe_cfg_att_width(c);
    case D_QN: return c->qk_norm == MOE_QK_NORM_HEAD ? moe_cfg_head_dim(c) : moe_cfg_att_width(c);
    case D_KN:
        return c->qk_norm == MOE_QK_NORM_HEAD ? moe_cfg_head_dim(c) : (int64_t)moe_cfg_kv_heads(c) * moe_cfg_head_dim(c);
    case D_SH: return c->n_shared;
    case D_FS: return moe_cfg_d_ff_shared(c);
    case D_FS1: return moe_f1(moe_cfg_d_ff_shared(c), c->activation);
    case D_1: return 1;
    case D_M: return c->vocab_experts;
    }
    return 0;
}

/* This rank's share of the experts: FFN experts [r0, r0 + rows) (one row
 * each), and the vocabulary experts' rows (seg_off, row_ids). */
typedef struct {
    int64_t r0, rows;
    int64_t vrows;           /* local rows of the vocabulary head */
    const int64_t *vseg;     /* (Ml + 1) */
    const int64_t *vids;     /* (vrows) */
    /* a non-contiguous placement: per MoE layer (in block order) the S
     * global experts of this rank's slots and their primary flags */
    const int64_t *fids;     /* (n_moe, S) or NULL */
    const uint8_t *fprim;    /* (n_moe, S) */
} shard;

/* Appends the tensors of one place (and block l) to t; counts only when t->t
 * is NULL. floats (may be NULL): adds their local elements, in double so
 * that an absurd configuration cannot overflow the sum. */
static moe_status add_place(moe_tensor_table *t, const moe_train_config *c, place at, int l, const shard *sh,
                            double *floats)
{
    for (int i = 0; i < N_DESCS; i++) {
        const tensor_desc *d = &descs[i];
        if (d->at != at || (d->present && !d->present(c))) continue;
        if (floats) {
            double e = d->sharded == 1 + MOE_EXPERTS_FFN     ? (double)sh->rows
                       : d->sharded == 1 + MOE_EXPERTS_VOCAB ? (double)sh->vrows
                                                             : (double)dim_value(d->dims[0], c);
            for (int k = 1; k < d->ndim; k++) e *= (double)dim_value(d->dims[k], c);
            *floats += e;
        }
        if (t->t) {
            moe_tensor *x = &t->t[t->n];
            memset(x, 0, sizeof *x);
            int len = l < 0 ? snprintf(x->name, sizeof x->name, "%s", d->name)
                            : snprintf(x->name, sizeof x->name, "h/%d/%s", l, d->name);
            if (len >= (int)sizeof x->name) return moe_errorf(MOE_ERR_ARG, "layout: tensor name '%s' too long", x->name);
            x->ndim = d->ndim;
            for (int k = 0; k < d->ndim; k++) x->shape[k] = dim_value(d->dims[k], c);
            x->expert_sharded = d->sharded != 0;
            x->experts = d->sharded ? d->sharded - 1 : 0;
            x->row0 = d->sharded == 1 + MOE_EXPERTS_FFN ? sh->r0 : 0;
            x->rows = d->sharded == 1 + MOE_EXPERTS_FFN ? sh->rows
                    : d->sharded == 1 + MOE_EXPERTS_VOCAB ? sh->vrows : x->shape[0];
            if (d->sharded == 1 + MOE_EXPERTS_VOCAB) {
                x->seg_off = sh->vseg;
                x->row_ids = sh->vids;
            }
            if (d->sharded == 1 + MOE_EXPERTS_FFN && sh->fids) {
                int mi = 0; /* MoE layers before block l */
                for (int b = 0; b < l; b++) mi += moe_layout_block_is_moe(c, b);
                x->row_ids = sh->fids + (size_t)mi * sh->rows;
                x->row_primary = sh->fprim + (size_t)mi * sh->rows;
                x->row0 = x->row_ids[0];
            }
            x->block = l;
            x->layer = d->sharded == 1 + MOE_EXPERTS_FFN ? l : -1;
            x->kind = d->kind;
            x->role = d->role;
            x->init = d->init;
            x->decay = d->decay;
            /* the partition is the one integer tensor (int32 in files) */
            x->dtype = d->init == MOE_INIT_ASSIGN ? MOE_TENSOR_I32 : MOE_TENSOR_F32;
            x->numel = (size_t)(x->rows * moe_tensor_row_numel(x));
        }
        t->n++;
    }
    return MOE_OK;
}

/* Every tensor of the model in table order (counting pass when t->t is NULL). */
static moe_status add_all(moe_tensor_table *t, const moe_train_config *c, const shard *sh, double *floats)
{
    moe_status st = add_place(t, c, AT_HEAD, -1, sh, floats);
    for (int l = 0; st == MOE_OK && l < c->n_layers; l++) {
        st = add_place(t, c, AT_BLOCK, l, sh, floats);
        if (st == MOE_OK) st = add_place(t, c, moe_layout_block_is_moe(c, l) ? AT_MOE : AT_DENSE, l, sh, floats);
    }
    if (st == MOE_OK) st = add_place(t, c, AT_TAIL, -1, sh, floats);
    return st;
}

double moe_layout_local_floats(const moe_train_config *c, int ep_size)
{
    if (ep_size < 1) ep_size = 1;
    /* the vocabulary rows of a rank: an even share (the partition decides) */
    shard sh = {.rows = (c->n_experts + ep_size - 1) / ep_size,
                .vrows = c->head == MOE_HEAD_VOCAB_EXPERTS ? (c->vocab_size + ep_size - 1) / ep_size : 0};
    moe_tensor_table t = {0}; /* counting pass: t.t stays NULL */
    double floats = 0;
    add_all(&t, c, &sh, &floats);
    return floats;
}

/* The vocabulary experts of ep rank p: their segments and token ids, in
 * storage the table owns. */
static moe_status vocab_shard(moe_tensor_table *t, shard *sh, const moe_train_config *c, const moe_vocab_part *v,
                              int p, int P)
{
    if (!v)
        return moe_errorf(MOE_ERR_ARG, "layout: head = vocab_experts needs the vocabulary partition");
    if (moe_vocab_part_vocab(v) != c->vocab_size || moe_vocab_part_experts(v) != c->vocab_experts)
        return moe_errorf(MOE_ERR_ARG, "layout: the vocabulary partition has %d tokens in %d experts, the model "
                                       "vocab_size = %d and vocab_experts = %d",
                          moe_vocab_part_vocab(v), moe_vocab_part_experts(v), c->vocab_size, c->vocab_experts);
    if (c->vocab_experts % P)
        return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d is not divisible by the expert-parallel size %d",
                          c->vocab_experts, P);
    const int Ml = c->vocab_experts / P, m0 = p * Ml;
    const int32_t *off = moe_vocab_part_offsets(v), *ids = moe_vocab_part_ids(v);
    const int64_t first = off[m0], n = off[m0 + Ml] - first;
    int64_t *mem = malloc(((size_t)Ml + 1 + (size_t)n) * sizeof *mem);
    if (!mem) return moe_errorf(MOE_ERR_NOMEM, "layout: vocabulary rows");
    for (int j = 0; j <= Ml; j++) mem[j] = off[m0 + j] - first;
    for (int64_t i = 0; i < n; i++) mem[Ml + 1 + i] = ids[first + i];
    t->owned = mem;
    sh->vrows = n;
    sh->vseg = mem;
    sh->vids = mem + Ml + 1;
    return MOE_OK;
}

/* This rank's slots of every MoE layer under placement pl, in storage the
 * table owns. */
static moe_status placed_shard(moe_tensor_table *t, shard *sh, const moe_train_config *c, const moe_placement *pl,
                               int p, int P)
{
    int n_moe = 0;
    for (int l = 0; l < c->n_layers; l++) n_moe += moe_layout_block_is_moe(c, l);
    if (moe_placement_n_layers(pl) != n_moe || moe_placement_n_experts(pl) != c->n_experts ||
        moe_placement_ranks(pl) != P)
        return moe_errorf(MOE_ERR_MISMATCH, "layout: the placement is for %d MoE layers of %d experts over %d ranks, "
                                            "the model has %d MoE layers of %d experts over %d ranks",
                          moe_placement_n_layers(pl), moe_placement_n_experts(pl), moe_placement_ranks(pl), n_moe,
                          c->n_experts, P);
    const int S = moe_placement_slots_per_rank(pl);
    const size_t n = (size_t)(n_moe > 0 ? n_moe : 1) * S;
    int64_t *ids = malloc(n * sizeof *ids + n);
    if (!ids) return moe_errorf(MOE_ERR_NOMEM, "layout: expert rows");
    uint8_t *prim = (uint8_t *)(ids + n);
    for (int l = 0; l < n_moe; l++) {
        const int *s = moe_placement_slots(pl, l, p);
        for (int j = 0; j < S; j++) {
            ids[(size_t)l * S + j] = s[j];
            prim[(size_t)l * S + j] = (uint8_t)moe_placement_primary(pl, l, p, j);
        }
    }
    t->owned_placed = ids;
    sh->rows = S;
    sh->r0 = 0;
    sh->fids = ids;
    sh->fprim = prim;
    return MOE_OK;
}

moe_status moe_layout_create(moe_tensor_table **out, const moe_train_config *c, const moe_vocab_part *vocab,
                             int ep_rank, int ep_size)
{
    return moe_layout_create_placed(out, c, vocab, NULL, ep_rank, ep_size);
}

moe_status moe_layout_create_placed(moe_tensor_table **out, const moe_train_config *c, const moe_vocab_part *vocab,
                                    const moe_placement *placement, int ep_rank, int ep_size)
{
    *out = NULL;
    moe_status st = moe_train_config_check_model(c);
    if (st != MOE_OK) return st;
    if (placement && (moe_placement_ranks(placement) != ep_size || moe_placement_n_experts(placement) != c->n_experts))
        return moe_errorf(MOE_ERR_MISMATCH, "layout: the placement is for %d experts over %d ranks, the model has %d "
                                            "experts over %d ranks", moe_placement_n_experts(placement),
                          moe_placement_ranks(placement), c->n_experts, ep_size);
    const int placed = placement && !moe_placement_is_contiguous(placement);
    if (ep_size < 1 || (!placed && c->n_experts % ep_size != 0) || ep_rank < 0 || ep_rank >= ep_size)
        return moe_errorf(MOE_ERR_ARG, "expert-parallel size %d (rank %d) must divide n_experts = %d", ep_size,
                          ep_rank, c->n_experts);
    shard sh = {.rows = c->n_experts / ep_size};
    sh.r0 = ep_rank * sh.rows;
    moe_tensor_table *t = calloc(1, sizeof *t);
    if (!t) return moe_errorf(MOE_ERR_NOMEM, "layout table");
    if (placed && (st = placed_shard(t, &sh, c, placement, ep_rank, ep_size))) {
        moe_layout_destroy(t);
        return st;
    }
    if (c->head == MOE_HEAD_VOCAB_EXPERTS && (st = vocab_shard(t, &sh, c, vocab, ep_rank, ep_size))) {
        moe_layout_destroy(t);
        return st;
    }
    add_all(t, c, &sh, NULL); /* count */
    const int n = t->n;
    t->n = 0;
    t->t = calloc((size_t)n, sizeof *t->t);
    st = t->t ? add_all(t, c, &sh, NULL) : moe_errorf(MOE_ERR_NOMEM, "layout: %d tensors", n);
    if (st != MOE_OK) {
        moe_layout_destroy(t);
        return st;
    }
    /* Offsets: every replicated tensor first, then every expert tensor. */
    size_t off = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < t->n; i++) {
            moe_tensor *x = &t->t[i];
            if (x->expert_sharded != pass) continue;
            x->offset = off;
            off += x->numel;
        }
        if (pass == 0) t->dense = off;
    }
    t->total = off;
    *out = t;
    return MOE_OK;
}

void moe_layout_destroy(moe_tensor_table *t)
{
    if (!t) return;
    free(t->t);
    free(t->owned);
    free(t->owned_placed);
    free(t);
}

int moe_layout_find(const moe_tensor_table *t, moe_tensor_kind kind, int layer)
{
    for (int i = 0; i < t->n; i++)
        if (t->t[i].kind == (int)kind && t->t[i].block == layer) return i;
    return -1;
}
