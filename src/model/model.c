/* The GPT-2 style MoE decoder: parameter table and init, activation memory,
 * forward, backward and step statistics (model.h). Dense layers come from
 * ops.c, MoE FFNs from src/layer, activations from src/experts. */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/par.h"
#include "core/rng.h"
#include "layout/layout.h"
#include "model/ops.h"

/* The tensors a forward and backward use: each block's by kind
 * (layout.h), looked up once from the table (-1 when an option leaves a
 * tensor out: its pointer is then NULL). */
enum { G_COUNT = 10 };
static const moe_tensor_kind global_kinds[G_COUNT] = {
    MOE_T_WTE,          MOE_T_WPE,           MOE_T_LNF_W,          MOE_T_LNF_B, MOE_T_VOCAB_ASSIGN,
    MOE_T_VOCAB_ROUTER_W, MOE_T_VOCAB_ROUTER_B, MOE_T_VOCAB_W, MOE_T_VOCAB_B, MOE_T_LM_HEAD};
enum { G_WTE, G_WPE, G_LNFW, G_LNFB, G_VASSIGN, G_VRW, G_VRB, G_VW, G_VB, G_HEAD };

/* Activations of B_max sequences of T_max tokens (N = B_max * T_max rows).
 * Per-block arrays are indexed [l][N][.] with stride N_max rows. */
typedef struct {
    float *encoded;                     /* (N, C) block 0 input */
    float *ln1, *ln1_mean, *ln1_rstd;   /* (L, N, C), (L, N), (L, N); RMSNorm uses rstd only */
    float *qkv;                         /* (L, N, QKV) q, k, v as attention reads them (after q/k norm, RoPE) */
    float *qkv_raw;                     /* (L, N, QKV) c_attn's output before the q/k norm (qk_norm only) */
    float *qk_rstd;                     /* (L, N, QG + KG) the q and k norms' rstd (qk_norm only) */
    float *att;                         /* (L, B, NH, T, T) */
    float *atty;                        /* (L, N, A) attention output before c_proj */
    float *res2;                        /* (L, N, C) residual stream after attention */
    float *ln2, *ln2_mean, *ln2_rstd;   /* (L, N, C), (L, N), (L, N) */
    float *fch, *fch_act;               /* (L_dense, N, F1), (L_dense, N, F) */
    float *res3;                        /* (L, N, C) residual stream after the FFN */
    float *lnf, *lnf_mean, *lnf_rstd;   /* (N, C), (N), (N) */
    float *logits, *probs;              /* (N, V); empty with the vocabulary head */
    float *losses;                      /* (N) */
    /* backward scratch */
    float *dres;                        /* (N, C) gradient of the residual stream */
    float *dln;                         /* (N, C) */
    float *datty;                       /* (N, A) */
    float *dhead;                       /* (N, C) the head's dL/d ln_f(x) */
    float *dqkv, *dqkv_raw;             /* (N, QKV); the second with qk_norm only */
    float *datt;                        /* (att_blocks, T, T) per-thread scratch */
    float *dfch, *dfch_act;             /* (N, F1), (N, F) */
    float *dlogits;                     /* (N, V); empty with the vocabulary head */
} model_acts;

struct moe_model {
    moe_train_config cfg;
    moe_comm *comm;
    int W, rank;                 /* world size and rank */
    int V, C, L, NH, T_max, B_max, F, F1, E, El; /* El: expert slots per ep rank */
    int NKV, HD, A, QKV;         /* kv heads, head size, attention width NH HD, c_attn rows */
    int QG, KG, QW, KW;          /* q/k norm: groups per row and width of each (qk_norm only) */
    float *rope_cos, *rope_sin;  /* (T_max, HD/2) with pos = rope, else NULL */
    moe_tensor_table *table;     /* from the one descriptor (src/layout) */
    moe_placement *placement;    /* the experts' placement (cfg.placement, or contiguous) */
    int gid[G_COUNT];            /* table index of the global tensors */
    int *bid;                    /* (L, MOE_T_COUNT) table index of each block tensor, -1 if absent */
    float *params, *grads;       /* (table->total) */
    int n_moe;
    int *moe_index;              /* (L) index among MoE blocks, -1 for dense */
    int *dense_index;            /* (L) index among dense blocks, -1 for MoE */
    int *moe_blocks;             /* (n_moe) block index of each MoE layer */
    moe_layer **layers;          /* (L) NULL for dense blocks */
    moe_vocab_part *vocab;       /* head = vocab_experts: the partition (own copy), else NULL */
    moe_vocab_ep *vhead;         /* the vocabulary head over the ep group, else NULL */
    int M, vtopk;                /* vocabulary experts; K of the coverage statistic */
    float *act_mem;
    model_acts a;
    int att_blocks;              /* attention backward scratch blocks: the thread count at creation */
    int32_t *inputs, *targets;   /* (B_max, T_max) token ids of the last forward */
    int B, T, train, have_targets, have_forward;
    double part_d[3];            /* this rank's ce_sum, lb_sum, z_sum */
    int64_t *part_i;             /* (2 + 2 n_moe E [+ M + 1]): tokens, aux_terms, kept, dropped
                                    [, vocabulary expert targets, covered positions] */
    int64_t *red_i;              /* the same, reduced */
};

static float *tensor_ptr(const moe_model *m, float *base, int id)
{
    return id < 0 ? NULL : base + m->table->t[id].offset;
}

static float *block_ptr(const moe_model *m, float *base, int l, int slot)
{
    return tensor_ptr(m, base, m->bid[l * MOE_T_COUNT + slot]);
}

/* The MoE layer's views: parameters (base = params) or gradients (base =
 * grads: the expert bias is a buffer with no gradient). */
static moe_layer_params moe_view(const moe_model *m, float *base, int l)
{
    moe_layer_params p = {
        .router_w = block_ptr(m, base, l, MOE_T_ROUTER_W),
        .noise_w = block_ptr(m, base, l, MOE_T_NOISE_W),
        .expert_bias = base == m->params ? block_ptr(m, base, l, MOE_T_EXP_BIAS) : NULL,
        .experts = {block_ptr(m, base, l, MOE_T_EXP_W1), block_ptr(m, base, l, MOE_T_EXP_B1),
                    block_ptr(m, base, l, MOE_T_EXP_W2), block_ptr(m, base, l, MOE_T_EXP_B2)},
        .shared = {block_ptr(m, base, l, MOE_T_SH_W1), block_ptr(m, base, l, MOE_T_SH_B1),
                   block_ptr(m, base, l, MOE_T_SH_W2), block_ptr(m, base, l, MOE_T_SH_B2)},
        .shared_gate = block_ptr(m, base, l, MOE_T_SH_GATE),
    };
    return p;
}

/* The output head: wte (tied) or lm_head. */
static float *head_ptr(const moe_model *m, float *base)
{
    return tensor_ptr(m, base, m->cfg.tie_embeddings ? m->gid[G_WTE] : m->gid[G_HEAD]);
}

/* ln_1, ln_2, ln_f: LayerNorm or RMSNorm (cfg.norm). */
static void norm_forward(const moe_model *m, float *out, float *mean, float *rstd, const float *inp,
                         const float *w, const float *b, int N)
{
    if (m->cfg.norm == MOE_NORM_RMSNORM)
        moe_model_rmsnorm_forward(out, rstd, inp, w, N, 1, m->C, m->C, (float)m->cfg.ln_eps);
    else
        moe_model_layernorm_forward(out, mean, rstd, inp, w, b, N, m->C, (float)m->cfg.ln_eps);
}

static void norm_backward(const moe_model *m, float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, const float *mean, const float *rstd, int N)
{
    if (m->cfg.norm == MOE_NORM_RMSNORM)
        moe_model_rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, 1, m->C, m->C);
    else
        moe_model_layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, m->C);
}

/* The table from the descriptor, and the lookups of the tensors the
 * forward and backward use. */
static moe_status build_table(moe_model *m, int ep_rank, int ep_size)
{
    moe_status st = moe_layout_create_placed(&m->table, &m->cfg, m->vocab, m->placement, ep_rank, ep_size);
    if (st) return st;
    for (int g = 0; g < G_COUNT; g++) m->gid[g] = moe_layout_find(m->table, global_kinds[g], -1);
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < MOE_T_COUNT; k++) m->bid[l * MOE_T_COUNT + k] = moe_layout_find(m->table, (moe_tensor_kind)k, l);
    return MOE_OK;
}

/* The initial parameters; without draw (a model whose parameters are
 * loaded next) only the constant ones (ones, the head's assignment), the
 * drawn ones stay 0: drawing them costs as much as a pass over the file. */
static void init_params(moe_model *m, int draw)
{
    const double std = 0.02, resid_std = 0.02 / sqrt(2.0 * m->L);
    for (int i = 0; i < m->table->n; i++) {
        const moe_tensor *t = &m->table->t[i];
        float *p = m->params + t->offset;
        const int64_t row = moe_tensor_row_numel(t), g0 = t->row0 * row; /* global index of local element 0 */
        for (size_t j = 0; j < t->numel; j++) {
            /* rows with a row map (the vocabulary head) are keyed by their token id */
            const uint64_t g = t->row_ids ? (uint64_t)(t->row_ids[(int64_t)j / row] * row + (int64_t)j % row)
                                          : (uint64_t)g0 + j;
            switch (t->init) {
            case MOE_INIT_ZERO: p[j] = 0.0f; break;
            case MOE_INIT_ONE: p[j] = 1.0f; break;
            case MOE_INIT_ASSIGN: p[j] = (float)moe_vocab_part_assign(m->vocab)[j]; break;
            default:
                if (!draw) break; /* calloc'd: 0 */
                p[j] = (float)((t->init == MOE_INIT_RESID ? resid_std : std) *
                               moe_rng_normal(m->cfg.seed, MOE_RNG_INIT, (uint32_t)g,
                                              (uint32_t)(g >> 32), (uint32_t)i, 0));
            }
        }
    }
}

/* The parts of the activation block in floats, in the order of
 * alloc_acts's pointers, for cfg with B_max local sequences and `threads`
 * attention blocks. In double: moe_model_memory_estimate calls it before
 * any check that the sizes fit in memory (or in size_t). */
enum { N_ACTS = 34 };
static void act_sizes(double n[N_ACTS], const moe_train_config *cfg, int B_max, int threads)
{
    int n_moe = 0;
    for (int l = 0; l < cfg->n_layers; l++) n_moe += moe_layout_block_is_moe(cfg, l);
    /* the vocabulary head forms no (N, V) logits */
    const double N = (double)B_max * cfg->seq_len, C = cfg->d_model, L = cfg->n_layers, T = cfg->seq_len;
    const double V = cfg->head == MOE_HEAD_VOCAB_EXPERTS ? 0 : (double)cfg->vocab_size;
    const double Ld = (double)(cfg->n_layers - n_moe), A = moe_cfg_att_width(cfg), QKV = moe_cfg_qkv_width(cfg);
    const double F = cfg->d_ff, F1 = moe_f1(cfg->d_ff, cfg->activation);
    const double att = (double)B_max * cfg->n_heads * T * T;
    const double qk = cfg->qk_norm != MOE_QK_NORM_NONE; /* the q/k norm's buffers, or none */
    const int per_head = cfg->qk_norm == MOE_QK_NORM_HEAD;
    const double QG = per_head ? cfg->n_heads : 1, KG = per_head ? moe_cfg_kv_heads(cfg) : 1;
    const double rope = cfg->pos == MOE_POS_ROPE ? T * (double)(moe_cfg_head_dim(cfg) / 2) : 0;
    const double sizes[N_ACTS] = {
        N * C,
        L * N * C, L * N, L * N,
        L * N * QKV, qk * L * N * QKV, qk * L * N * (QG + KG),
        L * att, L * N * A, L * N * C,
        L * N * C, L * N, L * N,
        Ld * N * F1, Ld * N * F, L * N * C,
        N * C, N, N,
        N * V, N * V, N,
        N * C, N * C, N * C, N * A, N * QKV,
        qk * N * QKV,
        (double)threads * T * T, N * F1, N * F, N * V,
        rope, rope,
    };
    memcpy(n, sizes, sizeof sizes);
}

static moe_status alloc_acts(moe_model *m)
{
    m->att_blocks = moe_par_threads();
    model_acts *a = &m->a;
    float **ptr[N_ACTS] = {
        &a->encoded,
        &a->ln1, &a->ln1_mean, &a->ln1_rstd,
        &a->qkv, &a->qkv_raw, &a->qk_rstd,
        &a->att, &a->atty, &a->res2,
        &a->ln2, &a->ln2_mean, &a->ln2_rstd,
        &a->fch, &a->fch_act, &a->res3,
        &a->lnf, &a->lnf_mean, &a->lnf_rstd,
        &a->logits, &a->probs, &a->losses,
        &a->dres, &a->dln, &a->dhead, &a->datty, &a->dqkv,
        &a->dqkv_raw,
        &a->datt, &a->dfch, &a->dfch_act, &a->dlogits,
        &m->rope_cos, &m->rope_sin,
    };
    double n[N_ACTS], total = 0;
    act_sizes(n, &m->cfg, m->B_max, m->att_blocks);
    for (int i = 0; i < N_ACTS; i++) total += n[i];
    if (total > (double)(SIZE_MAX / sizeof(float) / 2))
        return moe_errorf(MOE_ERR_NOMEM, "model activations: %.3g floats", total);
    m->act_mem = moe_calloc((size_t)total, sizeof(float));
    if (!m->act_mem) return moe_errorf(MOE_ERR_NOMEM, "model activations: %.0f floats", total);
    float *p = m->act_mem;
    for (int i = 0; i < N_ACTS; i++) {
        *ptr[i] = n[i] > 0 ? p : NULL;
        p += (size_t)n[i];
    }
    if (n[N_ACTS - 1] > 0) moe_model_rope_table(m->rope_cos, m->rope_sin, m->T_max, m->HD, m->cfg.rope_theta);
    return MOE_OK;
}

void moe_model_memory_estimate(moe_model_memory *out, const moe_train_config *cfg, int max_local_seqs, int ep_size)
{
    double n[N_ACTS];
    act_sizes(n, cfg, max_local_seqs, moe_par_threads());
    memset(out, 0, sizeof *out);
    for (int i = 0; i < N_ACTS; i++) out->activations += 4 * n[i];
    /* parameters, gradients and the two AdamW moments: four blocks of the table */
    out->state = 16 * moe_layout_local_floats(cfg, ep_size);
    /* the MoE layers keep each expert row's hidden activations for the
     * backward (h and a, F1 + F floats) and exchange the rows (in, out and
     * their gradients: 4 d): every routed copy of a token, top_k per token
     * sent for token choice and capacity_factor for expert choice; the
     * receive side is allocated at once for the most the capacity lets in
     * (moe_layer_rows_bound: capacity_factor times the mean; dropless,
     * the worst case while it is at most MOE_DROPLESS_BOUND_MEANS means);
     * the shared experts per token */
    const double N = (double)max_local_seqs * cfg->seq_len, d = cfg->d_model;
    const double F = cfg->d_ff, F1 = moe_f1(cfg->d_ff, cfg->activation);
    const int ec = cfg->router == MOE_ROUTER_EXPERT_CHOICE;
    const double sent = ec ? fmax(cfg->capacity_factor, 1) : cfg->top_k;
    double received = ec || cfg->capacity_factor <= 0 ? sent : sent * fmax(cfg->capacity_factor, 1);
    if (!ec && cfg->capacity_factor <= 0 && ep_size > 1) {
        const int El = cfg->n_experts / ep_size, per = cfg->top_k < El ? cfg->top_k : El;
        const double worst = (double)ep_size * per / cfg->top_k; /* in means */
        if (worst <= MOE_DROPLESS_BOUND_MEANS) received *= worst;
    }
    const double Fs = moe_cfg_d_ff_shared(cfg), Fs1 = moe_f1(moe_cfg_d_ff_shared(cfg), cfg->activation);
    double per_layer = N * received * (F1 + F + 2 * d) + N * sent * 2 * d + N * cfg->n_shared * (Fs1 + Fs) +
                       (cfg->n_shared ? 3 * N * d : 0);
    int n_moe = 0;
    for (int l = 0; l < cfg->n_layers; l++) n_moe += moe_layout_block_is_moe(cfg, l);
    out->moe_layers = 4 * per_layer * n_moe;
    out->total = out->activations + out->state + out->moe_layers;
}

static moe_status check_config(const moe_train_config *c, int max_local_seqs)
{
    moe_status st = moe_train_config_check_model(c); /* the key table's ranges and rules */
    if (st) return st;
    if (max_local_seqs < c->group_seqs)
        return moe_errorf(MOE_ERR_ARG, "local sequences per step (%d) fewer than group_seqs=%d",
                          max_local_seqs, c->group_seqs);
    return MOE_OK;
}

/* Everything of the model but its MoE layers: sizes, tables, parameter,
 * gradient (not for inference) and activation blocks, initial weights.
 * Purely local. */
static moe_status setup(moe_model *m, const moe_train_config *cfg, const moe_vocab_part *vocab,
                        int max_local_seqs, moe_comm *comm, int inference)
{
    const int P = moe_comm_ep_size(comm);
    m->cfg = *cfg;
    m->comm = comm;
    m->W = moe_comm_size(comm);
    m->rank = moe_comm_rank(comm);
    m->V = cfg->vocab_size;
    m->C = cfg->d_model;
    m->L = cfg->n_layers;
    m->NH = cfg->n_heads;
    m->T_max = cfg->seq_len;
    m->B_max = max_local_seqs;
    m->F = cfg->d_ff;
    m->F1 = moe_f1(cfg->d_ff, cfg->activation);
    m->E = cfg->n_experts;
    m->NKV = moe_cfg_kv_heads(cfg);
    m->HD = moe_cfg_head_dim(cfg);
    m->A = moe_cfg_att_width(cfg);
    m->QKV = moe_cfg_qkv_width(cfg);
    /* q/k norm: one group over a whole projection (full) or one per head (head) */
    const int per_head = cfg->qk_norm == MOE_QK_NORM_HEAD;
    m->QG = per_head ? m->NH : 1;
    m->KG = per_head ? m->NKV : 1;
    m->QW = per_head ? m->HD : m->NH * m->HD;
    m->KW = per_head ? m->HD : m->NKV * m->HD;

    m->moe_index = moe_calloc((size_t)m->L, sizeof(int));
    m->dense_index = moe_calloc((size_t)m->L, sizeof(int));
    m->layers = moe_calloc((size_t)m->L, sizeof(moe_layer *));
    m->bid = moe_calloc((size_t)m->L * MOE_T_COUNT, sizeof(int));
    if (!m->moe_index || !m->dense_index || !m->layers || !m->bid)
        return moe_errorf(MOE_ERR_NOMEM, "model tables");
    for (int l = 0; l < m->L; l++) {
        const int is_moe = moe_layout_block_is_moe(cfg, l);
        m->moe_index[l] = is_moe ? m->n_moe : -1;
        m->dense_index[l] = is_moe ? -1 : l - m->n_moe;
        m->n_moe += is_moe;
    }
    m->moe_blocks = moe_calloc((size_t)m->n_moe, sizeof(int));
    m->part_i = moe_calloc(2 + 2 * (size_t)m->n_moe * m->E, sizeof(int64_t));
    m->red_i = moe_calloc(2 + 2 * (size_t)m->n_moe * m->E, sizeof(int64_t));
    m->inputs = moe_calloc((size_t)m->B_max * m->T_max, sizeof(int32_t));
    m->targets = moe_calloc((size_t)m->B_max * m->T_max, sizeof(int32_t));
    if (!m->moe_blocks || !m->part_i || !m->red_i || !m->inputs || !m->targets)
        return moe_errorf(MOE_ERR_NOMEM, "model buffers");
    if (cfg->head == MOE_HEAD_VOCAB_EXPERTS) {
        if (!vocab) return moe_errorf(MOE_ERR_ARG, "model: head = vocab_experts needs the vocabulary partition");
        moe_status st = moe_vocab_part_create(&m->vocab, moe_vocab_part_assign(vocab), moe_vocab_part_vocab(vocab),
                                              moe_vocab_part_experts(vocab));
        if (st) return st;
        m->M = cfg->vocab_experts;
        m->vtopk = cfg->vocab_top_k;
        moe_free(m->part_i);
        moe_free(m->red_i);
        const size_t ni = 2 + 2 * (size_t)m->n_moe * m->E + (size_t)m->M + 1;
        m->part_i = moe_calloc(ni, sizeof(int64_t));
        m->red_i = moe_calloc(ni, sizeof(int64_t));
        if (!m->part_i || !m->red_i) return moe_errorf(MOE_ERR_NOMEM, "model buffers");
    }
    for (int l = 0; l < m->L; l++)
        if (m->moe_index[l] >= 0) m->moe_blocks[m->moe_index[l]] = l;

    /* the placement: the same file on every rank, checked against the model */
    moe_status st = cfg->placement[0]
                        ? moe_placement_load(&m->placement, cfg->placement, m->n_moe, m->moe_blocks, m->E, P)
                        : moe_placement_create_contiguous(&m->placement, m->n_moe, m->E, P);
    if (st) return st;
    m->El = moe_placement_slots_per_rank(m->placement);
    st = build_table(m, moe_comm_ep_rank(comm), P);
    if (st) return st;
    m->params = moe_calloc(m->table->total, sizeof(float));
    m->grads = inference ? NULL : moe_calloc(m->table->total, sizeof(float));
    if (!m->params || (!inference && !m->grads))
        return moe_errorf(MOE_ERR_NOMEM, "model parameters: %d x %zu floats", inference ? 1 : 2, m->table->total);
    init_params(m, !inference);
    return alloc_acts(m);
}

static moe_status create(moe_model **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                         int max_local_seqs, moe_comm *comm, int inference)
{
    *out = NULL;
    /* argument errors are the same on every rank: no agreement needed */
    moe_status st = check_config(cfg, max_local_seqs);
    if (st) return st;
    if (!comm) return moe_errorf(MOE_ERR_ARG, "model: no communicator (one process: moe_comm_create_self)");
    const int P = moe_comm_ep_size(comm);
    if (cfg->n_experts % P && !cfg->placement[0]) /* a placement may hold replicas: E + R slots */
        return moe_errorf(MOE_ERR_ARG, "n_experts=%d not divisible by the expert-parallel size %d",
                          cfg->n_experts, P);
    if (cfg->head == MOE_HEAD_VOCAB_EXPERTS && cfg->vocab_experts % P)
        return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d not divisible by the expert-parallel size %d",
                          cfg->vocab_experts, P);
    moe_model *m = moe_calloc(1, sizeof *m);
    st = m ? setup(m, cfg, vocab, max_local_seqs, comm, inference) : moe_errorf(MOE_ERR_NOMEM, "model");
    /* local failures must reach every rank before the collective layer creation */
    st = moe_comm_agree(comm, st);
    if (st) goto fail;

    moe_layer_config lc = {
        .router = {.n_experts = m->E, .top_k = cfg->top_k, .d_model = m->C, .kind = cfg->router,
                   .capacity_factor = cfg->capacity_factor, .normalize_topk = cfg->normalize_topk,
                   .noise = cfg->router_noise, .score = (moe_score_kind)cfg->score,
                   .route_scale = cfg->route_scale, .expert_bias = cfg->expert_bias,
                   .n_groups = cfg->n_groups, .topk_groups = cfg->topk_groups,
                   .aux = (moe_aux_kind)cfg->aux_loss, .group_seqs = cfg->group_seqs},
        .d_ff = m->F,
        .act = cfg->activation,
        .n_shared = cfg->n_shared,
        .d_ff_shared = moe_cfg_d_ff_shared(cfg),
        .shared_gate = cfg->shared_gate,
        .max_tokens = m->B_max * m->T_max,
        .max_groups = m->B_max / cfg->group_seqs,
        .a2a = (moe_a2a_kind)cfg->a2a,
        .chunks = cfg->a2a_chunks < 1 ? 1 : cfg->a2a_chunks,
    };
    /* every rank creates every MoE layer in the same order (collective), and
     * a failure on one rank is reported by the layer on all of them */
    const int placed = !moe_placement_is_contiguous(m->placement);
    for (int i = 0; i < m->n_moe; i++) {
        lc.slots = placed ? moe_placement_slots(m->placement, i, 0) : NULL; /* (P, S) of layer i */
        lc.n_slots = m->El;
        if ((st = moe_layer_create(&m->layers[m->moe_blocks[i]], &lc, comm))) goto fail;
    }
    if (m->vocab && (st = moe_vocab_ep_create(&m->vhead, m->vocab, m->C, lc.a2a, lc.chunks, comm))) goto fail;
    *out = m;
    return MOE_OK;
fail:
    moe_model_destroy(m);
    return st;
}

moe_status moe_model_create(moe_model **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                            int max_local_seqs, moe_comm *comm)
{
    return create(out, cfg, vocab, max_local_seqs, comm, 0);
}

moe_status moe_model_create_inference(moe_model **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                                      int max_local_seqs, moe_comm *comm)
{
    return create(out, cfg, vocab, max_local_seqs, comm, 1);
}

void moe_model_destroy(moe_model *m)
{
    if (!m) return;
    if (m->layers)
        for (int l = 0; l < m->L; l++) moe_layer_destroy(m->layers[l]);
    moe_free(m->layers);
    moe_vocab_ep_destroy(m->vhead);
    moe_vocab_part_destroy(m->vocab);
    moe_free(m->moe_index);
    moe_free(m->dense_index);
    moe_free(m->moe_blocks);
    moe_free(m->bid);
    moe_layout_destroy(m->table);
    moe_placement_destroy(m->placement);
    moe_free(m->params);
    moe_free(m->grads);
    moe_free(m->act_mem);
    moe_free(m->part_i);
    moe_free(m->red_i);
    moe_free(m->inputs);
    moe_free(m->targets);
    moe_free(m);
}

const moe_tensor_table *moe_model_tensors(const moe_model *m) { return m->table; }
float *moe_model_params(moe_model *m) { return m->params; }
float *moe_model_grads(moe_model *m) { return m->grads; }
float *moe_model_param(moe_model *m, moe_tensor_kind kind, int block)
{
    if ((unsigned)kind >= MOE_T_COUNT || block < -1 || block >= m->L) return NULL;
    if (block < 0) {
        for (int g = 0; g < G_COUNT; g++)
            if (global_kinds[g] == kind) return tensor_ptr(m, m->params, m->gid[g]);
        return NULL;
    }
    return block_ptr(m, m->params, block, kind);
}

size_t moe_model_dense_floats(const moe_model *m) { return m->table->dense; }
moe_layer *moe_model_layer(moe_model *m, int l) { return l >= 0 && l < m->L ? m->layers[l] : NULL; }
int moe_model_moe_index(const moe_model *m, int l) { return l >= 0 && l < m->L ? m->moe_index[l] : -1; }
int moe_model_n_moe_layers(const moe_model *m) { return m->n_moe; }
const moe_placement *moe_model_placement(const moe_model *m) { return m->placement; }
const int *moe_model_moe_blocks(const moe_model *m) { return m->moe_blocks; }
int moe_model_n_local_experts(const moe_model *m) { return m->El; }
const moe_train_config *moe_model_config(const moe_model *m) { return &m->cfg; }
const float *moe_model_logits(const moe_model *m) { return m->vocab ? NULL : m->a.logits; }
const float *moe_model_losses(const moe_model *m) { return m->a.losses; }
const float *moe_model_head_input(const moe_model *m) { return m->a.lnf; }
const float *moe_model_head_grad(const moe_model *m) { return m->a.dhead; }
const moe_vocab_part *moe_model_vocab(const moe_model *m) { return m->vocab; }
moe_vocab_ep *moe_model_vocab_head(moe_model *m) { return m->vhead; }
int moe_model_vocab_top_k(const moe_model *m) { return m->vtopk; }

moe_status moe_model_set_vocab_top_k(moe_model *m, int K)
{
    if (!m->vocab) return moe_errorf(MOE_ERR_ARG, "vocab_top_k: the model has no vocabulary experts (head = full)");
    if (K < 1 || K > m->M)
        return moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, vocab_experts=%d]", K, m->M);
    m->vtopk = K;
    return MOE_OK;
}

moe_vocab_params moe_model_vocab_view(const moe_model *m, float *block)
{
    moe_vocab_params v = {NULL, NULL, NULL, NULL};
    if (!m->vocab) return v;
    v.router_w = tensor_ptr(m, block, m->gid[G_VRW]);
    v.router_b = tensor_ptr(m, block, m->gid[G_VRB]);
    v.w = tensor_ptr(m, block, m->gid[G_VW]);
    v.b = tensor_ptr(m, block, m->gid[G_VB]);
    return v;
}

void moe_model_zero_grad(moe_model *m)
{
    if (m->grads) memset(m->grads, 0, m->table->total * sizeof(float));
}

/* Per-block activation pointers for the current B, T (stride: N_max rows). */
typedef struct {
    float *in;                        /* (N, C) block input */
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *qkv_raw, *qk_rstd, *att, *atty, *res2;
    float *ln2, *ln2_mean, *ln2_rstd, *fch, *fch_act, *res3;
} block_acts;

static block_acts block_view(const moe_model *m, int l)
{
    const model_acts *a = &m->a;
    const size_t Nm = (size_t)m->B_max * m->T_max, C = m->C, A = m->A, QKV = m->QKV;
    const size_t att = (size_t)m->B_max * m->NH * m->T_max * m->T_max;
    const int di = m->dense_index[l];
    block_acts b = {
        .in = l == 0 ? a->encoded : a->res3 + (size_t)(l - 1) * Nm * C,
        .ln1 = a->ln1 + l * Nm * C, .ln1_mean = a->ln1_mean + l * Nm, .ln1_rstd = a->ln1_rstd + l * Nm,
        .qkv = a->qkv + l * Nm * QKV,
        .qkv_raw = a->qkv_raw ? a->qkv_raw + l * Nm * QKV : NULL,
        .qk_rstd = a->qk_rstd ? a->qk_rstd + l * Nm * (size_t)(m->QG + m->KG) : NULL,
        .att = a->att + l * att, .atty = a->atty + l * Nm * A,
        .res2 = a->res2 + l * Nm * C,
        .ln2 = a->ln2 + l * Nm * C, .ln2_mean = a->ln2_mean + l * Nm, .ln2_rstd = a->ln2_rstd + l * Nm,
        .fch = di < 0 ? NULL : a->fch + di * Nm * m->F1,
        .fch_act = di < 0 ? NULL : a->fch_act + di * Nm * m->F,
        .res3 = a->res3 + l * Nm * C,
    };
    return b;
}

/* Adds this rank's routing statistics of the last forward of MoE layer i. */
static void add_route_stats(moe_model *m, int i, int G)
{
    const moe_route *r = moe_layer_route(m->layers[m->moe_blocks[i]]);
    const int E = m->E;
    int64_t *kept = m->part_i + 2 + (size_t)i * E, *dropped = kept + (size_t)m->n_moe * E;
    for (int g = 0; g < G; g++) {
        m->part_d[1] += r->load_balance[g];
        m->part_d[2] += r->z_loss[g];
        for (int e = 0; e < E; e++) {
            kept[e] += r->n_kept[(size_t)g * E + e];
            dropped[e] += r->n_dropped[(size_t)g * E + e];
        }
    }
}

/* q, k, v of block l from ln_1's output (c_attn, then the q/k norm and
 * RoPE when configured), and the attention output atty. */
static void attn_forward(moe_model *m, const block_acts *b, int l, int B, int T)
{
    const int N = B * T, C = m->C, QKV = m->QKV, qk0 = m->NH * m->HD, v0 = (m->NH + m->NKV) * m->HD;
    const size_t Nm = (size_t)m->B_max * m->T_max;
    const float eps = (float)m->cfg.ln_eps;
#define PW(slot) block_ptr(m, m->params, l, slot)
    float *raw = b->qkv_raw ? b->qkv_raw : b->qkv;
    moe_model_matmul_forward(raw, b->ln1, PW(MOE_T_QKV_W), PW(MOE_T_QKV_B), N, C, QKV);
    if (b->qkv_raw) {
        moe_model_rmsnorm_forward(b->qkv, b->qk_rstd, raw, PW(MOE_T_QNORM_W), N, m->QG, m->QW, QKV, eps);
        moe_model_rmsnorm_forward(b->qkv + qk0, b->qk_rstd + Nm * m->QG, raw + qk0, PW(MOE_T_KNORM_W), N, m->KG,
                                  m->KW, QKV, eps);
        for (int n = 0; n < N; n++)
            memcpy(b->qkv + (size_t)n * QKV + v0, raw + (size_t)n * QKV + v0, (size_t)(QKV - v0) * sizeof(float));
    }
    if (m->rope_cos)
        moe_model_rope_forward(b->qkv, m->rope_cos, m->rope_sin, NULL, N, T, m->NH + m->NKV, m->HD, QKV);
    moe_model_attention_forward(b->atty, b->att, b->qkv, B, T, m->NH, m->NKV, m->HD);
#undef PW
}

/* Backward of attn_forward from datty: accumulates c_attn's (and the q/k
 * norms') gradients and leaves dL/d(ln_1 output) in a->dln. */
static void attn_backward(moe_model *m, const block_acts *b, int l, int B, int T)
{
    model_acts *a = &m->a;
    const int N = B * T, C = m->C, QKV = m->QKV, qk0 = m->NH * m->HD, v0 = (m->NH + m->NKV) * m->HD;
    const size_t Nm = (size_t)m->B_max * m->T_max;
#define PW(slot) block_ptr(m, m->params, l, slot)
#define GW(slot) block_ptr(m, m->grads, l, slot)
    memset(a->dqkv, 0, (size_t)N * QKV * sizeof(float));
    moe_model_attention_backward(a->dqkv, a->datt, m->att_blocks, a->datty, b->qkv, b->att, B, T, m->NH, m->NKV,
                                 m->HD);
    if (m->rope_cos)
        moe_model_rope_backward(a->dqkv, m->rope_cos, m->rope_sin, NULL, N, T, m->NH + m->NKV, m->HD, QKV);
    const float *dsrc = a->dqkv;
    if (b->qkv_raw) {
        float *draw = a->dqkv_raw;
        memset(draw, 0, (size_t)N * QKV * sizeof(float));
        moe_model_rmsnorm_backward(draw, GW(MOE_T_QNORM_W), a->dqkv, b->qkv_raw, PW(MOE_T_QNORM_W), b->qk_rstd, N,
                                   m->QG, m->QW, QKV);
        moe_model_rmsnorm_backward(draw + qk0, GW(MOE_T_KNORM_W), a->dqkv + qk0, b->qkv_raw + qk0,
                                   PW(MOE_T_KNORM_W), b->qk_rstd + Nm * m->QG, N, m->KG, m->KW, QKV);
        for (int n = 0; n < N; n++)
            memcpy(draw + (size_t)n * QKV + v0, a->dqkv + (size_t)n * QKV + v0, (size_t)(QKV - v0) * sizeof(float));
        dsrc = draw;
    }
    memset(a->dln, 0, (size_t)N * C * sizeof(float));
    moe_model_matmul_backward(a->dln, GW(MOE_T_QKV_W), GW(MOE_T_QKV_B), dsrc, b->ln1, PW(MOE_T_QKV_W), N, C, QKV);
#undef PW
#undef GW
}

/* Integers of the partial statistics (part_i). */
static size_t stats_ints(const moe_model *m)
{
    return 2 + 2 * (size_t)m->n_moe * m->E + (m->vocab ? (size_t)m->M + 1 : 0);
}

/* The vocabulary head over ln_f(x): per-position losses, this rank's
 * expert target counts and coverage. In training the objective is the mean
 * over all global tokens, so each position's loss has weight 1 / (W N). */
static moe_status head_forward(moe_model *m, const int32_t *targets, int N, int train)
{
    model_acts *a = &m->a;
    const moe_vocab_params vp = moe_model_vocab_view(m, m->params);
    const float dloss = train ? (float)(1.0 / ((double)m->W * N)) : 0.0f;
    moe_status st = moe_vocab_ep_forward(m->vhead, a->losses, a->lnf, targets, &vp, N, dloss);
    if (st) return st;
    int64_t *vc = m->part_i + 2 + 2 * (size_t)m->n_moe * m->E, covered = 0;
    const int32_t *counts = moe_vocab_ep_counts(m->vhead);
    for (int e = 0; e < m->M; e++) vc[e] = counts[e];
    if ((st = moe_vocab_ep_coverage(m->vhead, m->vtopk, &covered))) return st;
    vc[m->M] = covered;
    return MOE_OK;
}

/* Every id of ids (n) is in [0, V); else MOE_ERR_ARG naming the first that is not. */
static moe_status check_ids(const int32_t *ids, int n, int V, const char *what)
{
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return moe_errorf(MOE_ERR_ARG, "forward: %s id %ld at position %d is outside the vocabulary [0, %d)",
                              what, (long)ids[i], i, V);
    return MOE_OK;
}

moe_status moe_model_forward(moe_model *m, const int32_t *inputs, const int32_t *targets, int B,
                             int T, int train, uint32_t step)
{
    m->have_forward = 0;
    if (B < 1 || B > m->B_max || T < 1 || T > m->T_max)
        return moe_errorf(MOE_ERR_ARG, "forward: B=%d T=%d outside 1..%d, 1..%d", B, T, m->B_max, m->T_max);
    if (B % m->cfg.group_seqs)
        return moe_errorf(MOE_ERR_ARG, "forward: B=%d not a multiple of group_seqs=%d", B,
                          m->cfg.group_seqs);
    const int N = B * T, C = m->C, G = B / m->cfg.group_seqs;
    model_acts *a = &m->a;
    moe_status cs = check_ids(inputs, N, m->V, "input");
    if (!cs && targets) cs = check_ids(targets, N, m->V, "target");
    /* ids differ between ranks: a bad one must stop the whole ep group
     * before its first exchange */
    if (m->n_moe) cs = moe_comm_agree_detail(m->comm, MOE_SCOPE_EP, cs);
    if (cs) return cs;
    memcpy(m->inputs, inputs, (size_t)N * sizeof(int32_t));
    if (targets) memcpy(m->targets, targets, (size_t)N * sizeof(int32_t));
    memset(m->part_d, 0, sizeof m->part_d);
    memset(m->part_i, 0, stats_ints(m) * sizeof(int64_t));

    moe_model_encoder_forward(a->encoded, inputs, tensor_ptr(m, m->params, m->gid[G_WTE]),
                              tensor_ptr(m, m->params, m->gid[G_WPE]), B, T, C);
    for (int l = 0; l < m->L; l++) {
        const block_acts b = block_view(m, l);
#define PW(slot) block_ptr(m, m->params, l, slot)
        norm_forward(m, b.ln1, b.ln1_mean, b.ln1_rstd, b.in, PW(MOE_T_LN1_W), PW(MOE_T_LN1_B), N);
        attn_forward(m, &b, l, B, T);
        moe_model_matmul_forward(b.res2, b.atty, PW(MOE_T_PROJ_W), PW(MOE_T_PROJ_B), N, m->A, C);
        moe_model_residual_forward(b.res2, b.res2, b.in, (long)N * C);
        norm_forward(m, b.ln2, b.ln2_mean, b.ln2_rstd, b.res2, PW(MOE_T_LN2_W), PW(MOE_T_LN2_B), N);
        if (m->layers[l]) {
            const moe_layer_params p = moe_view(m, m->params, l);
            const moe_noise_key key = {.seed = m->cfg.seed, .step = step, .layer = (uint32_t)l,
                                       .token0 = (int64_t)m->rank * N};
            const moe_status st = moe_layer_forward(m->layers[l], b.res3, b.ln2, &p, N, G,
                                                    train && m->cfg.router_noise ? &key : NULL);
            if (st) return st;
            add_route_stats(m, m->moe_index[l], G);
        } else {
            moe_model_matmul_forward(b.fch, b.ln2, PW(MOE_T_FC_W), PW(MOE_T_FC_B), N, C, m->F1);
            moe_act_forward(b.fch_act, b.fch, N, m->F, m->cfg.activation);
            moe_model_matmul_forward(b.res3, b.fch_act, PW(MOE_T_FCPROJ_W), PW(MOE_T_FCPROJ_B), N, m->F, C);
        }
        moe_model_residual_forward(b.res3, b.res3, b.res2, (long)N * C);
#undef PW
    }
    const float *x = block_view(m, m->L - 1).res3;
    norm_forward(m, a->lnf, a->lnf_mean, a->lnf_rstd, x, tensor_ptr(m, m->params, m->gid[G_LNFW]),
                 tensor_ptr(m, m->params, m->gid[G_LNFB]), N);
    if (m->vocab) {
        if (targets) {
            moe_status st = head_forward(m, targets, N, train);
            if (st) return st;
        }
    } else {
        moe_model_matmul_forward(a->logits, a->lnf, head_ptr(m, m->params), NULL, N, C, m->V);
        if (targets) moe_model_crossentropy_forward(a->losses, a->probs, a->logits, targets, N, m->V);
    }
    if (targets) {
        double s = 0.0;
        for (int i = 0; i < N; i++) s += a->losses[i];
        m->part_d[0] = s;
        m->part_i[0] = N;
    }
    m->part_i[1] = (int64_t)G * m->n_moe;
    m->B = B;
    m->T = T;
    m->train = train;
    m->have_targets = targets != NULL;
    m->have_forward = 1;
    return MOE_OK;
}

moe_status moe_model_backward(moe_model *m)
{
    if (!m->grads) return moe_errorf(MOE_ERR_ARG, "backward of an inference model (it has no gradients)");
    if (!m->have_forward || !m->train || !m->have_targets)
        return moe_errorf(MOE_ERR_ARG, "backward needs a preceding training forward with targets");
    const int B = m->B, T = m->T, N = B * T, C = m->C, V = m->V, F = m->F, F1 = m->F1;
    model_acts *a = &m->a;
    /* objective = mean CE over all W*N global tokens + coef * mean over the
     * W*G global groups and n_moe layers of each aux loss */
    const double global_tokens = (double)m->W * N;
    const double aux_terms = (double)m->W * (B / m->cfg.group_seqs) * (m->n_moe ? m->n_moe : 1);
    const float lb_scale = (float)(m->cfg.aux_loss_coef / aux_terms);
    const float z_scale = (float)(m->cfg.z_loss_coef / aux_terms);

    memset(a->dhead, 0, (size_t)N * C * sizeof(float));
    if (m->vocab) {
        /* the owners' share ran in the forward's exchange: this is local */
        const moe_vocab_params vp = moe_model_vocab_view(m, m->params);
        moe_vocab_params vg = moe_model_vocab_view(m, m->grads);
        moe_status st = moe_vocab_ep_backward(m->vhead, a->dhead, &vg, a->lnf, &vp);
        if (st) return st;
    } else {
        memset(a->dlogits, 0, (size_t)N * V * sizeof(float));
        moe_model_crossentropy_backward(a->dlogits, a->probs, m->targets, (float)(1.0 / global_tokens), N, V);
        moe_model_matmul_backward(a->dhead, head_ptr(m, m->grads), NULL, a->dlogits, a->lnf, head_ptr(m, m->params),
                                  N, C, V);
    }
    memset(a->dres, 0, (size_t)N * C * sizeof(float));
    norm_backward(m, a->dres, tensor_ptr(m, m->grads, m->gid[G_LNFW]), tensor_ptr(m, m->grads, m->gid[G_LNFB]),
                  a->dhead, block_view(m, m->L - 1).res3, tensor_ptr(m, m->params, m->gid[G_LNFW]), a->lnf_mean,
                  a->lnf_rstd, N);
    /* a->dres now holds dL/d(residual stream) after block l; the residual
     * branches accumulate into it in place */
    for (int l = m->L - 1; l >= 0; l--) {
        const block_acts b = block_view(m, l);
#define PW(slot) block_ptr(m, m->params, l, slot)
#define GW(slot) block_ptr(m, m->grads, l, slot)
        memset(a->dln, 0, (size_t)N * C * sizeof(float));
        if (m->layers[l]) {
            const moe_layer_params p = moe_view(m, m->params, l);
            moe_layer_params g = moe_view(m, m->grads, l);
            const moe_status st = moe_layer_backward(m->layers[l], a->dln, &g, a->dres, b.ln2, &p,
                                                     lb_scale, z_scale);
            if (st) return st;
        } else {
            memset(a->dfch_act, 0, (size_t)N * F * sizeof(float));
            moe_model_matmul_backward(a->dfch_act, GW(MOE_T_FCPROJ_W), GW(MOE_T_FCPROJ_B), a->dres, b.fch_act,
                                      PW(MOE_T_FCPROJ_W), N, F, C);
            moe_act_backward(a->dfch, a->dfch_act, b.fch, N, F, m->cfg.activation);
            moe_model_matmul_backward(a->dln, GW(MOE_T_FC_W), GW(MOE_T_FC_B), a->dfch, b.ln2, PW(MOE_T_FC_W), N, C, F1);
        }
        norm_backward(m, a->dres, GW(MOE_T_LN2_W), GW(MOE_T_LN2_B), a->dln, b.res2, PW(MOE_T_LN2_W), b.ln2_mean,
                      b.ln2_rstd, N);
        memset(a->datty, 0, (size_t)N * m->A * sizeof(float));
        moe_model_matmul_backward(a->datty, GW(MOE_T_PROJ_W), GW(MOE_T_PROJ_B), a->dres, b.atty, PW(MOE_T_PROJ_W), N,
                                  m->A, C);
        attn_backward(m, &b, l, B, T);
        norm_backward(m, a->dres, GW(MOE_T_LN1_W), GW(MOE_T_LN1_B), a->dln, b.in, PW(MOE_T_LN1_W), b.ln1_mean,
                      b.ln1_rstd, N);
#undef PW
#undef GW
    }
    moe_model_encoder_backward(tensor_ptr(m, m->grads, m->gid[G_WTE]),
                               tensor_ptr(m, m->grads, m->gid[G_WPE]), a->dres, m->inputs, B, T, C);
    return MOE_OK;
}

moe_layer_params moe_model_layer_params(moe_model *m, int l) { return moe_view(m, m->params, l); }
moe_layer_params moe_model_layer_grads(moe_model *m, int l) { return moe_view(m, m->grads, l); }
const float *moe_model_head(moe_model *m) { return head_ptr(m, m->params); }

void moe_model_norm_rows(const moe_model *m, float *out, float *mean, float *rstd, const float *inp,
                         const float *w, const float *b, int n)
{
    norm_forward(m, out, mean, rstd, inp, w, b, n);
}

void moe_model_qk_rows(moe_model *m, int l, float *qkv, float *rstd, const int *pos, int n)
{
    const int QKV = m->QKV, qk0 = m->NH * m->HD;
    if (m->cfg.qk_norm != MOE_QK_NORM_NONE) { /* in place: each group is read whole before it is written */
        const float eps = (float)m->cfg.ln_eps;
        moe_model_rmsnorm_forward(qkv, rstd, qkv, block_ptr(m, m->params, l, MOE_T_QNORM_W), n, m->QG, m->QW, QKV, eps);
        moe_model_rmsnorm_forward(qkv + qk0, rstd + (size_t)n * m->QG, qkv + qk0,
                                  block_ptr(m, m->params, l, MOE_T_KNORM_W), n, m->KG, m->KW, QKV, eps);
    }
    if (m->rope_cos) moe_model_rope_forward(qkv, m->rope_cos, m->rope_sin, pos, n, m->T_max, m->NH + m->NKV, m->HD, QKV);
}

moe_status moe_model_reduce_stats(moe_model *m, moe_model_stats *st)
{
    const size_t ni = stats_ints(m);
    moe_status s = m->have_forward ? MOE_OK : moe_errorf(MOE_ERR_ARG, "reduce_stats: the last forward failed or none ran");
    /* a forward may have failed in another ep group only: agree first */
    s = moe_comm_agree(m->comm, s);
    if (s) return s;
    double d[3];
    memcpy(d, m->part_d, sizeof d);
    memcpy(m->red_i, m->part_i, ni * sizeof(int64_t));
    s = moe_comm_allreduce_f64(m->comm, MOE_SCOPE_WORLD, d, 3);
    if (!s) s = moe_comm_allreduce_i64(m->comm, MOE_SCOPE_WORLD, m->red_i, ni);
    if (s) return s;
    memset(st, 0, sizeof *st);
    st->ce_sum = d[0];
    st->lb_sum = d[1];
    st->z_sum = d[2];
    st->tokens = m->red_i[0];
    st->aux_terms = m->red_i[1];
    st->ce = st->tokens ? st->ce_sum / (double)st->tokens : 0.0;
    st->loss = st->ce;
    if (st->aux_terms)
        st->loss += (m->cfg.aux_loss_coef * st->lb_sum + m->cfg.z_loss_coef * st->z_sum) /
                    (double)st->aux_terms;
    st->n_moe_layers = m->n_moe;
    st->n_experts = m->E;
    st->moe_blocks = m->moe_blocks;
    st->kept = m->red_i + 2;
    st->dropped = m->red_i + 2 + (size_t)m->n_moe * m->E;
    if (m->vocab) {
        st->vocab_experts = m->M;
        st->vocab_tokens = m->red_i + 2 + 2 * (size_t)m->n_moe * m->E;
        st->vocab_covered = st->vocab_tokens[m->M];
    }
    return MOE_OK;
}

moe_comm *moe_model_comm(const moe_model *m) { return m->comm; }
