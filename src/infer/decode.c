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
    /* the sequence split (moe_infer_decoder_set_split): sequence s lives on
     * ep rank s P / S, the ranks [s_lo, s_lo + s_n) here */
    moe_comm *comm;
    int split, P, me, s_lo, s_n;
    int slots;                            /* sequences the cache holds: S, or s_n with the split */
    int nl;                               /* rows of the current call that live here */
    int before;                           /* rows of the current call on lower ep ranks */
    int *lseq;                            /* (n_max) sequence of each local row */
    int *loc;                             /* (n_max) call index of each local row */
    int *gpos;                            /* (n_max) row of each call token in the gathered (rank-major) order */
    int in_order;                         /* 1 when that order is the call's own */
    int64_t *gbytes;                      /* (P) bytes of each rank in a gather */
    int *rows_of;                         /* (P) local rows of each rank */
    int *gnext;                           /* (P) scratch: the next gathered row of each rank */
    uint8_t *own;                         /* (n_max) 1 for the call tokens that live here */
    float *full_x, *full_y;               /* (n_max, C) an MoE layer's whole group: inputs, outputs */
    float *gath;                          /* (n_max, C) gathered rows in rank-major order */
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
    d->slots = max_seqs;
    d->comm = moe_model_comm(m);
    d->P = 1;
    d->s_n = max_seqs;
    d->n_max = max_seqs > d->T ? max_seqs : d->T;
    d->act = c->activation;
    const size_t N = (size_t)d->n_max, C = (size_t)d->C, KV = (size_t)d->NKV * d->HD;
    const size_t cache = (size_t)d->L * d->S * d->T * KV;
    d->blk = moe_calloc((size_t)d->L, sizeof *d->blk);
    d->len = moe_calloc((size_t)d->S, sizeof(int));
    d->add = moe_calloc((size_t)d->S, sizeof(int));
    d->pos = moe_calloc(N, sizeof(int));
    d->loc = moe_calloc(N, sizeof(int));
    d->lseq = moe_calloc(N, sizeof(int));
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
    if (!d->blk || !d->len || !d->add || !d->pos || !d->loc || !d->lseq || !d->kc || !d->vc || !d->x || !d->ln ||
        !d->mean || !d->rstd || !d->qkv || !d->atty || !d->tmp || !d->fch || !d->fch_act || !d->scores ||
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
    void *p[] = {d->blk, d->len, d->add, d->pos, d->loc, d->lseq, d->kc, d->vc, d->x, d->ln, d->mean, d->rstd,
                 d->qkv, d->atty, d->tmp, d->fch, d->fch_act, d->scores, d->hsel, d->gpos, d->gbytes,
                 d->rows_of, d->gnext, d->own, d->full_x, d->full_y, d->gath};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) moe_free(p[i]);
    moe_free(d);
}

void moe_infer_decoder_reset(moe_infer_decoder *d, int s)
{
    if (s >= 0 && s < d->S) d->len[s] = 0;
}

moe_status moe_infer_decoder_set_split(moe_infer_decoder *d)
{
    const int P = moe_comm_ep_size(d->comm), me = moe_comm_ep_rank(d->comm);
    if (P == 1 || d->split) return MOE_OK;
    for (int s = 0; s < d->S; s++)
        if (d->len[s]) return moe_errorf(MOE_ERR_ARG, "decoder: the split must come before the first token");
    /* rank r: the sequences s with s P / S = r, i.e. [ceil(r S / P), ceil((r + 1) S / P)) */
    const int lo = (int)(((int64_t)me * d->S + P - 1) / P), hi = (int)(((int64_t)(me + 1) * d->S + P - 1) / P);
    const size_t N = (size_t)d->n_max, C = (size_t)d->C, KV = (size_t)d->NKV * d->HD;
    const size_t cache = (size_t)d->L * (size_t)(hi > lo ? hi - lo : 1) * d->T * KV;
    float *kc = moe_calloc(cache, sizeof(float)), *vc = moe_calloc(cache, sizeof(float));
    d->gpos = moe_calloc(N, sizeof(int));
    d->gbytes = moe_calloc((size_t)P, sizeof(int64_t));
    d->rows_of = moe_calloc((size_t)P, sizeof(int));
    d->gnext = moe_calloc((size_t)P, sizeof(int));
    d->own = moe_calloc(N, 1);
    d->full_x = moe_calloc(N * C, sizeof(float));
    d->full_y = moe_calloc(N * C, sizeof(float));
    d->gath = moe_calloc(N * C, sizeof(float));
    if (!kc || !vc || !d->gpos || !d->gbytes || !d->rows_of || !d->gnext || !d->own || !d->full_x || !d->full_y ||
        !d->gath) {
        moe_free(kc);
        moe_free(vc);
        return moe_errorf(MOE_ERR_NOMEM, "decoder: split buffers");
    }
    moe_free(d->kc);
    moe_free(d->vc);
    d->kc = kc;
    d->vc = vc;
    d->split = 1;
    d->P = P;
    d->me = me;
    d->s_lo = lo;
    d->s_n = hi - lo;
    d->slots = hi - lo;
    return MOE_OK;
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
    return (((size_t)l * d->slots + (s - d->s_lo)) * d->T + t) * (size_t)d->NKV * d->HD;
}

/* The ep rank where sequence s lives (0 without the split). */
static int owner(const moe_infer_decoder *d, int s) { return (int)((int64_t)s * d->P / d->S); }

/* The call's layout under the split: loc (this rank's rows), own, and the
 * row of each token in the rank-major order a gather delivers. */
static void split_layout(moe_infer_decoder *d, const int *seq, int n)
{
    int nl = 0;
    for (int r = 0; r < d->P; r++) d->rows_of[r] = 0;
    for (int i = 0; i < n; i++) d->rows_of[owner(d, seq[i])]++;
    for (int r = 0, o = 0; r < d->P; r++) {
        d->gnext[r] = o;
        o += d->rows_of[r];
    }
    d->before = d->gnext[d->me];
    d->in_order = 1;
    for (int i = 0; i < n; i++) {
        const int r = owner(d, seq[i]);
        const int g = d->gnext[r]++;
        d->gpos[i] = g;
        d->in_order &= g == i;
        d->own[i] = r == d->me;
        if (r == d->me) d->loc[nl++] = i;
    }
    d->nl = nl;
}

/* Every rank's rows_of[r] rows of row_bytes, in rank order at buf, to every
 * ep rank; this rank's are already in place. Collective over the ep group. */
static moe_status gather_in_place(moe_infer_decoder *d, void *buf, size_t row_bytes)
{
    for (int r = 0; r < d->P; r++) d->gbytes[r] = (int64_t)d->rows_of[r] * (int64_t)row_bytes;
    return moe_comm_allgatherv(d->comm, MOE_SCOPE_EP, buf, NULL, d->gbytes);
}

/* The whole call's rows of width w in call order into dst (n, w) on every
 * ep rank, from each rank's local rows: this rank's nl rows at src, or
 * already at their place in dst (src NULL, calls in rank order only).
 * Collective over the ep group. */
static moe_status gather_rows(moe_infer_decoder *d, float *dst, const float *src, int n, size_t w)
{
    const int before = d->before;
    /* out of order: through gath, which holds n_max rows of d_model (the
     * only width gathered out of order: nothing to allocate mid-call,
     * where a failure on one rank would leave the others in the gather) */
    float *g = d->in_order ? dst : d->gath;
    float *mine = g + (size_t)before * w;
    if (src && src != mine) memmove(mine, src, (size_t)d->nl * w * sizeof(float));
    moe_status st = gather_in_place(d, g, w * sizeof(float));
    if (st || d->in_order) return st;
    for (int i = 0; i < n; i++) memcpy(dst + (size_t)i * w, g + (size_t)d->gpos[i] * w, w * sizeof(float));
    return MOE_OK;
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

/* The blocks and ln_f over n new tokens: d->ln holds the final hidden
 * states of the d->nl rows that live here (all n without the split; row j
 * is call token loc[j] with it), their keys and values are cached, and
 * every sequence's length grows on every rank. */
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
    /* the rows that live here, compacted (loc[j] >= j: in place) */
    if (d->split) {
        split_layout(d, seq, n);
    } else {
        d->nl = n;
        for (int i = 0; i < n; i++) d->loc[i] = i;
    }
    const int nl = d->nl;
    for (int j = 0; j < nl; j++) {
        d->pos[j] = d->pos[d->loc[j]];
        d->lseq[j] = seq[d->loc[j]];
    }
    const int C = d->C, KV = d->NKV * d->HD, k0 = d->NH * d->HD;
    const long NC = (long)nl * C;
    /* what the call streams here: each local token's embedding rows, every
     * block's weights once, its keys and values up to its position */
    double w = nl ? (double)nl * C + floats_if(d->wpe, (double)nl * C) + C + floats_if(d->lnfb, C) : 0, kv = 0;
    for (int j = 0; j < nl; j++) kv += 2.0 * KV * (d->pos[j] + 1) * d->L;
    for (int j = 0; j < nl; j++)
        moe_model_encoder_forward(d->x + (size_t)j * C, &tokens[d->loc[j]], d->wte,
                                  d->wpe ? d->wpe + (size_t)d->pos[j] * C : NULL, 1, 1, C);
    for (int l = 0; l < d->L; l++) {
        const dec_block *b = &d->blk[l];
        if (nl > 0) {
            w += floats_if(b->ln1w, C) + floats_if(b->ln1b, C) + (double)d->QKV * C + floats_if(b->qkvb, d->QKV) +
                 (double)C * d->A + floats_if(b->projb, C) + floats_if(b->ln2w, C) + floats_if(b->ln2b, C);
            moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, b->ln1w, b->ln1b, nl);
            moe_model_matmul_forward(d->qkv, d->ln, b->qkvw, b->qkvb, nl, C, d->QKV);
            moe_model_qk_rows(d->m, l, d->qkv, d->rstd, d->pos, nl);
            for (int j = 0; j < nl; j++) {
                const size_t r = cache_row(d, l, d->lseq[j], d->pos[j]);
                memcpy(d->kc + r, d->qkv + (size_t)j * d->QKV + k0, (size_t)KV * sizeof(float));
                memcpy(d->vc + r, d->qkv + (size_t)j * d->QKV + k0 + KV, (size_t)KV * sizeof(float));
            }
            attend(d, l, d->lseq, nl);
            moe_model_matmul_forward(d->tmp, d->atty, b->projw, b->projb, nl, d->A, C);
            moe_model_residual_forward(d->x, d->x, d->tmp, NC);
            moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, b->ln2w, b->ln2b, nl);
        }
        if (b->moe) {
            /* the n new tokens are one routing group; no noise */
            moe_status st;
            if (d->split) {
                /* every rank routes the whole group; each token goes to its
                 * experts once, from the rank where it lives */
                st = gather_rows(d, d->full_x, d->ln, n, (size_t)C);
                if (!st) st = moe_layer_forward_owned(b->moe, d->full_y, d->full_x, &b->mp, n, d->own);
                for (int j = 0; !st && j < nl; j++)
                    memcpy(d->tmp + (size_t)j * C, d->full_y + (size_t)d->loc[j] * C, (size_t)C * sizeof(float));
            } else {
                st = moe_layer_forward(b->moe, d->tmp, d->ln, &b->mp, n, 1, NULL);
            }
            if (st) return st;
            w += moe_layer_forward_param_bytes(b->moe, &b->mp) / sizeof(float);
        } else if (nl > 0) {
            w += (double)d->F1 * C + floats_if(b->fcb, d->F1) + (double)C * d->F + floats_if(b->fcpb, C);
            moe_model_matmul_forward(d->fch, d->ln, b->fcw, b->fcb, nl, C, d->F1);
            moe_act_forward(d->fch_act, d->fch, nl, d->F, d->act);
            moe_model_matmul_forward(d->tmp, d->fch_act, b->fcpw, b->fcpb, nl, d->F, C);
        }
        if (nl > 0) moe_model_residual_forward(d->x, d->x, d->tmp, NC);
    }
    if (nl > 0) moe_model_norm_rows(d->m, d->ln, d->mean, d->rstd, d->x, d->lnfw, d->lnfb, nl);
    for (int i = 0; i < n; i++) d->len[seq[i]]++;
    d->param_bytes = w * sizeof(float);
    d->kv_bytes = kv * sizeof(float);
    return MOE_OK;
}

/* The full head's logits of rows hidden states: out (rows, V) from h (rows, C). */
static void head_rows(moe_infer_decoder *d, float *out, const float *h, int rows)
{
    if (d->head_gemv && rows <= 4) /* reads the head once per token, without packing it */
        for (int i = 0; i < rows; i++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, d->V, d->C, 1.0f, d->head, d->C, h + (size_t)i * d->C, 1,
                        0.0f, out + (size_t)i * d->V, 1);
    else if (rows > 0)
        moe_model_matmul_forward(out, h, d->head, NULL, rows, d->C, d->V);
}

moe_status moe_infer_decode(moe_infer_decoder *d, float *logits, const int32_t *tokens, const int *seq, int n)
{
    if (d->vhead)
        return moe_errorf(MOE_ERR_ARG, "decode: the vocabulary-expert head gives candidate lists "
                                       "(moe_infer_decode_dist), not logits over the vocabulary");
    moe_status st = run_blocks(d, tokens, seq, n);
    if (st) return st;
    /* the full head: wte (tied) or lm_head */
    if (d->nl > 0) d->param_bytes += (double)d->V * d->C * sizeof(float);
    if (!d->split) {
        head_rows(d, logits, d->ln, n);
        return MOE_OK;
    }
    if (d->in_order) {
        /* each rank's logits land at their rows; one gather completes them */
        head_rows(d, logits + (size_t)d->before * d->V, d->ln, d->nl);
        return gather_rows(d, logits, NULL, n, (size_t)d->V);
    }
    /* tokens out of rank order (not what generation passes): gather the
     * hidden states instead, every rank computes every row's logits */
    st = gather_rows(d, d->full_x, d->ln, n, (size_t)d->C);
    if (!st) head_rows(d, logits, d->full_x, n);
    return st;
}

void moe_infer_decoder_set_head_gemv(moe_infer_decoder *d, int on) { d->head_gemv = on; }

void moe_infer_decoder_last_bytes(const moe_infer_decoder *d, double *param_bytes, double *kv_bytes)
{
    *param_bytes = d->param_bytes;
    *kv_bytes = d->kv_bytes;
}

/* The split's layout of the call's wanted rows (want NULL: all) in
 * rows_of and before: 1 if the ranks' wanted rows, in rank order, are the
 * wanted rows in call order (a gather then gives them in order), else 0;
 * *k: how many are wanted. */
static int wanted_layout(moe_infer_decoder *d, const int *seq, int n, const uint8_t *want, int *k)
{
    for (int r = 0; r < d->P; r++) d->rows_of[r] = 0;
    for (int i = 0; i < n; i++)
        if (!want || want[i]) d->rows_of[owner(d, seq[i])]++;
    for (int r = 0, o = 0; r < d->P; r++) {
        d->gnext[r] = o;
        o += d->rows_of[r];
    }
    d->before = d->gnext[d->me];
    int c = 0, in_order = 1;
    for (int i = 0; i < n; i++)
        if (!want || want[i]) in_order &= d->gnext[owner(d, seq[i])]++ == c++;
    *k = c;
    return in_order;
}

/* Wanted row j of k sits at row j; moves it to its token's row (from the
 * last: a row only moves down). */
static void place_wanted(moe_infer_dist *out, int n, const uint8_t *want, int k)
{
    for (int i = n - 1; i >= 0 && k > 0; i--) {
        if (want && !want[i]) continue;
        if (--k == i) break;
        memcpy(out->logp + (size_t)i * out->stride, out->logp + (size_t)k * out->stride,
               (size_t)out->count[k] * sizeof(float));
        memcpy(out->ids + (size_t)i * out->stride, out->ids + (size_t)k * out->stride,
               (size_t)out->count[k] * sizeof(int32_t));
        out->count[i] = out->count[k];
    }
}

moe_status moe_infer_decode_dist(moe_infer_decoder *d, moe_infer_dist *out, const int32_t *tokens, const int *seq,
                                 int n, const uint8_t *want)
{
    const int64_t need = moe_infer_decoder_dist_stride(d);
    if (d->vhead ? out->stride < need : out->stride != need)
        return moe_errorf(MOE_ERR_ARG, "decode: distribution rows of %lld candidates, the head needs %s%lld",
                          (long long)out->stride, d->vhead ? "at least " : "", (long long)need);
    int some = 0; /* 1 when only some rows are wanted (a prompt: its last) */
    for (int i = 0; want && i < n; i++) some |= !want[i];
    if (!d->vhead && d->split && some) {
        /* the split's prompt pass: the hidden states of the (few) wanted
         * rows to every rank, each computes their logits; a gather of every
         * row's logits would move n V floats */
        moe_status st = run_blocks(d, tokens, seq, n);
        if (!st) st = gather_rows(d, d->full_x, d->ln, n, (size_t)d->C);
        if (st) return st;
        d->param_bytes += (double)d->V * d->C * sizeof(float);
        for (int i = 0; i < n; i++)
            if (want[i]) head_rows(d, out->logp + (size_t)i * d->V, d->full_x + (size_t)i * d->C, 1);
        out->dense = 1;
        for (int i = 0; i < n; i++) out->count[i] = d->V;
        return MOE_OK;
    }
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
    const int K = moe_model_vocab_top_k(d->m);
    int k = 0;
    if (d->split && wanted_layout(d, seq, n, want, &k)) {
        /* each rank's wanted rows go through the head from where they live;
         * their lists land at their rows of the wanted order, then one
         * gather per array completes them on every rank */
        int c = 0;
        for (int j = 0; j < d->nl; j++)
            if (!want || want[d->loc[j]])
                memcpy(d->hsel + (size_t)c++ * d->C, d->ln + (size_t)j * d->C, (size_t)d->C * sizeof(float));
        const size_t o = (size_t)d->before * (size_t)out->stride;
        st = moe_vocab_ep_topk(d->vhead, out->ids + o, out->logp + o, out->count + d->before, out->stride, d->hsel,
                               &d->vp, c, K);
        if (!st) st = gather_in_place(d, out->logp, (size_t)out->stride * sizeof(float));
        if (!st) st = gather_in_place(d, out->ids, (size_t)out->stride * sizeof(int32_t));
        if (!st) st = gather_in_place(d, out->count, sizeof(int32_t));
        if (st) return st;
        out->dense = 0;
        place_wanted(out, n, want, k);
        return MOE_OK;
    }
    /* otherwise the head runs on every rank's copy of every row (its
     * experts are sharded over the ep group) */
    const float *h = d->ln;
    if (d->split) {
        if ((st = gather_rows(d, d->full_x, d->ln, n, (size_t)d->C))) return st;
        h = d->full_x;
    }
    /* only the wanted rows go through the head (a prompt needs its last) */
    const int C = d->C;
    k = 0;
    for (int i = 0; i < n; i++)
        if (!want || want[i]) memcpy(d->hsel + (size_t)k++ * C, h + (size_t)i * C, (size_t)C * sizeof(float));
    out->dense = 0;
    st = moe_vocab_ep_topk(d->vhead, out->ids, out->logp, out->count, out->stride, d->hsel, &d->vp, k, K);
    if (st) return st;
    place_wanted(out, n, want, k);
    return MOE_OK;
}
