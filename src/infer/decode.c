/* Incremental decoding with a key/value cache (moe_infer_decode): only the
 * new tokens run through the blocks; each attends to its sequence's cached
 * keys and values. Dense layers are the model's kernels (model/ops.h), the
 * MoE FFN is the model's own MoE layer called on the new tokens as one
 * routing group, and the parameters are the model's, found by their
 * checkpoint names. */
#include "infer/infer.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/ops.h"

typedef struct {
    const float *ln1w, *ln1b, *qkvw, *qkvb, *projw, *projb, *ln2w, *ln2b; /* (C), (QKV, C), (C, A) ...;
                                                                            * a bias is NULL when an option leaves it out */
    const float *fcw, *fcb, *fcpw, *fcpb; /* dense FFN: (F1, C), (F1), (C, F), (C); NULL in MoE blocks */
    moe_layer *moe;                       /* the model's MoE layer, NULL in dense blocks */
    moe_layer_params mp;                  /* its parameter views */
} dec_block;

struct moe_infer_decoder {
    moe_model *m;
    int V, C, L, NH, NKV, HD, A, QKV, T, F, F1, S, n_max;
    moe_activation act;
    const float *wte, *wpe, *lnfw, *lnfb, *head; /* (V, C), (T, C) or NULL (RoPE), (C), (C) or NULL, (V, C) */
    dec_block *blk;                       /* (L) */
    int *len;                             /* (S) positions each sequence holds */
    int *add;                             /* (S) scratch: tokens of the current call per sequence */
    int *pos;                             /* (n_max) position of each token of the current call */
    float *kc, *vc;                       /* (L, S, T, KV) cached keys and values, KV = NKV HD */
    float *x;                             /* (n_max, C) residual stream of the new tokens */
    float *ln, *mean, *rstd;              /* (n_max, C), (n_max), (n_max (NH + NKV)) */
    float *qkv;                           /* (n_max, QKV) */
    float *atty;                          /* (n_max, A) */
    float *tmp;                           /* (n_max, C) */
    float *fch, *fch_act;                 /* (n_max, F1), (n_max, F) */
    float *scores;                        /* (T) attention probabilities of one head */
    /* the vocabulary-expert head (NULL with head = full) */
    moe_vocab_ep *vhead;
    moe_vocab_params vp;                  /* its parameters in the model's block */
    float *hsel;                          /* (n_max, C) final hidden states of the tokens whose distribution is wanted */
    int head_gemv;                        /* full head: one GEMV per token for calls of <= 4 tokens */
    double param_bytes, kv_bytes;         /* read by the last call on this rank (moe_infer_decoder_last_bytes) */
};

/* n floats if p is there, else none: the parameter bytes a call reads. */
static double floats_if(const void *p, double n) { return p ? n : 0.0; }

/* Tensor `kind` of block l (-1: global) by the table's lookup, or NULL
 * with an error detail. */
static float *param(moe_model *m, moe_tensor_kind kind, int l)
{
    float *p = moe_model_param(m, kind, l);
    if (!p) moe_errorf(MOE_ERR_ARG, "decoder: the model has no tensor of kind %d in block %d", (int)kind, l);
    return p;
}

static moe_status bind_params(moe_infer_decoder *d)
{
    moe_model *m = d->m;
    d->wte = param(m, MOE_T_WTE, -1);
    d->lnfw = param(m, MOE_T_LNF_W, -1);
    /* present or not by the model's options */
    d->wpe = moe_model_param(m, MOE_T_WPE, -1);
    d->lnfb = moe_model_param(m, MOE_T_LNF_B, -1);
    d->head = moe_model_head(m);
    if (!d->wte || !d->lnfw || !d->head) return MOE_ERR_ARG;
    for (int l = 0; l < d->L; l++) {
        dec_block *b = &d->blk[l];
        const float **req[] = {&b->ln1w, &b->qkvw, &b->projw, &b->ln2w};
        const moe_tensor_kind req_kinds[] = {MOE_T_LN1_W, MOE_T_QKV_W, MOE_T_PROJ_W, MOE_T_LN2_W};
        for (int i = 0; i < 4; i++)
            if (!(*req[i] = param(m, req_kinds[i], l))) return MOE_ERR_ARG;
        b->ln1b = moe_model_param(m, MOE_T_LN1_B, l);
        b->qkvb = moe_model_param(m, MOE_T_QKV_B, l);
        b->projb = moe_model_param(m, MOE_T_PROJ_B, l);
        b->ln2b = moe_model_param(m, MOE_T_LN2_B, l);
        b->moe = moe_model_layer(m, l);
        if (b->moe) {
            b->mp = moe_model_layer_params(m, l);
            b->mp.noise_w = NULL; /* no noise at inference */
            if (!b->mp.router_w || !b->mp.experts.w1 || !b->mp.experts.w2)
                return moe_errorf(MOE_ERR_ARG, "decoder: block %d lacks its MoE parameters", l);
        } else {
            b->fcw = param(m, MOE_T_FC_W, l);
            b->fcb = moe_model_param(m, MOE_T_FC_B, l);
            b->fcpw = param(m, MOE_T_FCPROJ_W, l);
            b->fcpb = moe_model_param(m, MOE_T_FCPROJ_B, l);
            if (!b->fcw || !b->fcpw) return MOE_ERR_ARG;
        }
    }
    return MOE_OK;
}

moe_status moe_infer_decoder_create(moe_infer_decoder **out, moe_model *m, int max_seqs)
{
    *out = NULL;
    if (!m || max_seqs < 1) return moe_errorf(MOE_ERR_ARG, "decoder: NULL model or max_seqs=%d < 1", max_seqs);
    const moe_train_config *c = moe_model_config(m);
    moe_infer_decoder *d = moe_calloc(1, sizeof *d);
    if (!d) return moe_errorf(MOE_ERR_NOMEM, "decoder");
    d->m = m;
    d->V = c->vocab_size;
    d->C = c->d_model;
    d->L = c->n_layers;
    d->NH = c->n_heads;
    d->NKV = moe_cfg_kv_heads(c);
    d->HD = moe_cfg_head_dim(c);
    d->A = moe_cfg_att_width(c);
    d->QKV = moe_cfg_qkv_width(c);
    d->T = c->seq_len;
    d->F = c->d_ff;
    d->F1 = moe_f1(c->d_ff, c->activation);
    d->S = max_seqs;
    d->n_max = max_seqs > d->T ? max_seqs : d->T;
    d->act = c->activation;
    const size_t N = (size_t)d->n_max, C = (size_t)d->C, KV = (size_t)d->NKV * d->HD;
    const size_t cache = (size_t)d->L * d->S * d->T * KV;
    d->blk = moe_calloc((size_t)d->L, sizeof *d->blk);
    d->len = moe_calloc((size_t)d->S, sizeof(int));
    d->add = moe_calloc((size_t)d->S, sizeof(int));
    d->pos = moe_calloc(N, sizeof(int));
    d->kc = moe_calloc(cache, sizeof(float));
    d->vc = moe_calloc(cache, sizeof(float));
    d->x = moe_calloc(N * C, sizeof(float));
    d->ln = moe_calloc(N * C, sizeof(float));
    d->mean = moe_calloc(N, sizeof(float));
    d->rstd = moe_calloc(N * (size_t)(d->NH + d->NKV), sizeof(float));
    d->qkv = moe_calloc(N * d->QKV, sizeof(float));
    d->atty = moe_calloc(N * d->A, sizeof(float));
    d->tmp = moe_calloc(N * C, sizeof(float));
    d->fch = moe_calloc(N * d->F1, sizeof(float));
    d->fch_act = moe_calloc(N * d->F, sizeof(float));
    d->scores = moe_calloc((size_t)d->T, sizeof(float));
    d->vhead = moe_model_vocab_head(m);
    d->vp = moe_model_vocab_view(m, moe_model_params(m));
    if (d->vhead) d->hsel = moe_calloc(N * C, sizeof(float));
    moe_status st = MOE_OK;
    if (!d->blk || !d->len || !d->add || !d->pos || !d->kc || !d->vc || !d->x || !d->ln || !d->mean ||
        !d->rstd || !d->qkv || !d->atty || !d->tmp || !d->fch || !d->fch_act || !d->scores ||
        (d->vhead && !d->hsel))
        st = moe_errorf(MOE_ERR_NOMEM, "decoder: key/value cache of %zu floats x 2 and buffers", cache);
    if (!st) st = bind_params(d);
    if (st) {
        moe_infer_decoder_destroy(d);
        return st;
    }
    *out = d;
    return MOE_OK;
}

void moe_infer_decoder_destroy(moe_infer_decoder *d)
{
    if (!d) return;
    void *p[] = {d->blk, d->len, d->add, d->pos, d->kc, d->vc, d->x, d->ln, d->mean, d->rstd,
                 d->qkv, d->atty, d->tmp, d->fch, d->fch_act, d->scores, d->hsel};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) moe_free(p[i]);
    moe_free(d);
}

void moe_infer_decoder_reset(moe_infer_decoder *d, int s)
{
    if (s >= 0 && s < d->S) d->len[s] = 0;
}

int moe_infer_decoder_max_seqs(const moe_infer_decoder *d) { return d->S; }
int moe_infer_decoder_seq_len(const moe_infer_decoder *d) { return d->T; }
int moe_infer_decoder_vocab_size(const moe_infer_decoder *d) { return d->V; }
moe_model *moe_infer_decoder_model(moe_infer_decoder *d) { return d->m; }
int moe_infer_decoder_max_tokens(const moe_infer_decoder *d) { return d->n_max; }

int64_t moe_infer_decoder_dist_stride(const moe_infer_decoder *d)
{
    if (!d->vhead) return d->V;
    return moe_vocab_part_topk_size(moe_model_vocab(d->m), moe_model_vocab_top_k(d->m));
}
int moe_infer_decoder_length(const moe_infer_decoder *d, int s) { return s >= 0 && s < d->S ? d->len[s] : 0; }

/* Cache row of (layer l, sequence s, position t): NKV HD floats. */
static size_t cache_row(const moe_infer_decoder *d, int l, int s, int t)
{
    return (((size_t)l * d->S + s) * d->T + t) * (size_t)d->NKV * d->HD;
}

/* atty (n, A): causal attention of each new token over its sequence's cache
 * positions 0 .. pos (the new keys and values are already stored); query
 * head h reads kv head h / (NH / NKV). */
static void attend(moe_infer_decoder *d, int l, const int *seq, int n)
{
    const int hs = d->HD, KV = d->NKV * hs, grp = d->NH / d->NKV;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int i = 0; i < n; i++) {
        const int p = d->pos[i], len = p + 1;
        const float *K = d->kc + cache_row(d, l, seq[i], 0), *Vc = d->vc + cache_row(d, l, seq[i], 0);
        for (int h = 0; h < d->NH; h++) {
            const float *q = d->qkv + (size_t)i * d->QKV + h * hs;
            const int kvh = h / grp;
            float *a = d->scores;
            cblas_sgemv(CblasRowMajor, CblasNoTrans, len, hs, scale, K + kvh * hs, KV, q, 1, 0.0f, a, 1);
            float mx = a[0];
            for (int j = 1; j < len; j++) mx = a[j] > mx ? a[j] : mx;
            float sum = 0.0f;
            for (int j = 0; j < len; j++) sum += (a[j] = expf(a[j] - mx));
            const float inv = 1.0f / sum;
            for (int j = 0; j < len; j++) a[j] *= inv;
            cblas_sgemv(CblasRowMajor, CblasTrans, len, hs, 1.0f, Vc + kvh * hs, KV, a, 1, 0.0f,
                        d->atty + (size_t)i * d->A + h * hs, 1);
        }
    }
}

/* The blocks and ln_f over n new tokens: d->ln holds their final hidden
 * states, their keys and values are cached (the sequences' lengths grow). */
static moe_status run_blocks(moe_infer_decoder *d, const int32_t *tokens, const int *seq, int n)
{
    if (n < 1 || n > d->n_max)
        return moe_errorf(MOE_ERR_ARG, "decode: %d tokens outside 1..%d", n, d->n_max);
    for (int i = 0; i < n; i++) {
        if (seq[i] < 0 || seq[i] >= d->S)
            return moe_errorf(MOE_ERR_ARG, "decode: token %d names sequence %d outside 0..%d", i, seq[i], d->S - 1);
        if (tokens[i] < 0 || tokens[i] >= d->V)
            return moe_errorf(MOE_ERR_ARG, "decode: token %d has id %ld, outside the vocabulary [0, %d)", i,
                              (long)tokens[i], d->V);
    }
    memset(d->add, 0, (size_t)d->S * sizeof(int));
    for (int i = 0; i < n; i++) {
        d->pos[i] = d->len[seq[i]] + d->add[seq[i]]++;
        if (d->pos[i] >= d->T)
            return moe_errorf(MOE_ERR_ARG, "decode: sequence %d would pass seq_len=%d positions (reset it first)",
                              seq[i], d->T);
    }
    const int C = d->C, KV = d->NKV * d->HD, k0 = d->NH * d->HD;
    const long NC = (long)n * C;
    /* what the call streams: each token's embedding rows, every block's
     * weights once, its keys and values up to its position */
    double w = (double)n * C + floats_if(d->wpe, (double)n * C) + C + floats_if(d->lnfb, C), kv = 0;
    for (int i = 0; i < n; i++) kv += 2.0 * KV * (d->pos[i] + 1) * d->L;
    for (int i = 0; i < n; i++)
        moe_model_encoder_forward(d->x + (size_t)i * C, &tokens[i], d->wte,
                                  d->wpe ? d->wpe + (size_t)d->pos[i] * C : NULL, 1, 1, C);
    for (int l = 0; l < d->L; l++) {
        const dec_block *b = &d->blk[l];
        w += floats_if(b->ln1w, C) + floats_if(b->ln1b, C) + (double)d->QKV * C + floats_if(b->qkvb, d->QKV) +
             (double)C * d->A + floats_if(b->projb, C) + floats_if(b->ln2w, C) + floats_if(b->ln2b, C);
        moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, b->ln1w, b->ln1b, n);
        moe_model_matmul_forward(d->qkv, d->ln, b->qkvw, b->qkvb, n, C, d->QKV);
        moe_model_qk_rows(d->m, l, d->qkv, d->rstd, d->pos, n);
        for (int i = 0; i < n; i++) {
            const size_t r = cache_row(d, l, seq[i], d->pos[i]);
            memcpy(d->kc + r, d->qkv + (size_t)i * d->QKV + k0, (size_t)KV * sizeof(float));
            memcpy(d->vc + r, d->qkv + (size_t)i * d->QKV + k0 + KV, (size_t)KV * sizeof(float));
        }
        attend(d, l, seq, n);
        moe_model_matmul_forward(d->tmp, d->atty, b->projw, b->projb, n, d->A, C);
        moe_model_residual_forward(d->x, d->x, d->tmp, NC);
        moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, b->ln2w, b->ln2b, n);
        if (b->moe) {
            /* the n new tokens are one routing group; no noise */
            const moe_status st = moe_layer_forward(b->moe, d->tmp, d->ln, &b->mp, n, 1, NULL);
            if (st) return st;
            w += moe_layer_forward_param_bytes(b->moe, &b->mp) / sizeof(float);
        } else {
            w += (double)d->F1 * C + floats_if(b->fcb, d->F1) + (double)C * d->F + floats_if(b->fcpb, C);
            moe_model_matmul_forward(d->fch, d->ln, b->fcw, b->fcb, n, C, d->F1);
            moe_act_forward(d->fch_act, d->fch, n, d->F, d->act);
            moe_model_matmul_forward(d->tmp, d->fch_act, b->fcpw, b->fcpb, n, d->F, C);
        }
        moe_model_residual_forward(d->x, d->x, d->tmp, NC);
    }
    moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, d->lnfw, d->lnfb, n);
    for (int i = 0; i < n; i++) d->len[seq[i]]++;
    d->param_bytes = w * sizeof(float);
    d->kv_bytes = kv * sizeof(float);
    return MOE_OK;
}

moe_status moe_infer_decode(moe_infer_decoder *d, float *logits, const int32_t *tokens, const int *seq, int n)
{
    if (d->vhead)
        return moe_errorf(MOE_ERR_ARG, "decode: the vocabulary-expert head gives candidate lists "
                                       "(moe_infer_decode_dist), not logits over the vocabulary");
    moe_status st = run_blocks(d, tokens, seq, n);
    if (st) return st;
    /* the full head: wte (tied) or lm_head */
    d->param_bytes += (double)d->V * d->C * sizeof(float);
    if (d->head_gemv && n <= 4) /* reads the head once per token, without packing it */
        for (int i = 0; i < n; i++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, d->V, d->C, 1.0f, d->head, d->C, d->ln + (size_t)i * d->C, 1,
                        0.0f, logits + (size_t)i * d->V, 1);
    else
        moe_model_matmul_forward(logits, d->ln, d->head, NULL, n, d->C, d->V);
    return MOE_OK;
}

void moe_infer_decoder_set_head_gemv(moe_infer_decoder *d, int on) { d->head_gemv = on; }

void moe_infer_decoder_last_bytes(const moe_infer_decoder *d, double *param_bytes, double *kv_bytes)
{
    *param_bytes = d->param_bytes;
    *kv_bytes = d->kv_bytes;
}

moe_status moe_infer_decode_dist(moe_infer_decoder *d, moe_infer_dist *out, const int32_t *tokens, const int *seq,
                                 int n, const uint8_t *want)
{
    const int64_t need = moe_infer_decoder_dist_stride(d);
    if (d->vhead ? out->stride < need : out->stride != need)
        return moe_errorf(MOE_ERR_ARG, "decode: distribution rows of %lld candidates, the head needs %s%lld",
                          (long long)out->stride, d->vhead ? "at least " : "", (long long)need);
    if (!d->vhead) {
        /* the full head: every row, as moe_infer_decode */
        moe_status st = moe_infer_decode(d, out->logp, tokens, seq, n);
        if (st) return st;
        out->dense = 1;
        for (int i = 0; i < n; i++) out->count[i] = d->V;
        return MOE_OK;
    }
    moe_status st = run_blocks(d, tokens, seq, n);
    if (st) return st;
    /* only the wanted rows go through the head (a prompt needs its last) */
    const int C = d->C;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!want || want[i]) memcpy(d->hsel + (size_t)k++ * C, d->ln + (size_t)i * C, (size_t)C * sizeof(float));
    out->dense = 0;
    st = moe_vocab_ep_topk(d->vhead, out->ids, out->logp, out->count, out->stride, d->hsel, &d->vp, k,
                           moe_model_vocab_top_k(d->m));
    if (st) return st;
    /* wanted row j of k sits at row j; move it to its token's row (from the
     * last: a row only moves down) */
    for (int i = n - 1; i >= 0 && k > 0; i--) {
        if (want && !want[i]) continue;
        if (--k == i) break;
        memcpy(out->logp + (size_t)i * out->stride, out->logp + (size_t)k * out->stride,
               (size_t)out->count[k] * sizeof(float));
        memcpy(out->ids + (size_t)i * out->stride, out->ids + (size_t)k * out->stride,
               (size_t)out->count[k] * sizeof(int32_t));
        out->count[i] = out->count[k];
    }
    return MOE_OK;
}
