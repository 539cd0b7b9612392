/* The vocabulary-expert head over the ep group (head_ep.h): router and
 * grouping at home, one exchange round trip to the experts' owners and
 * back, combine at home; the owners keep their rows and dlogits for the
 * weight gradients. */
#include "vocab/head_ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct moe_vocab_ep {
    const moe_vocab_part *p;
    moe_comm *comm;
    moe_a2a *a2a;
    int d, V, M, P, Ml, m0, max_set;
    /* home: one item per position (training, evaluation) or per (position, choice) (top-K) */
    int cap_items;
    float *logits;       /* (items, M) router logits; dlogits in the backward */
    float *q;            /* (items, M) router probabilities */
    float *lse;          /* (items) router logsumexp */
    int32_t *expert;     /* (items) target expert, or the top-K selection */
    int32_t *order;      /* (items) the send layout: items grouped by expert */
    const float **rowp;  /* (items) top-K: each item's log-probability row */
    int32_t *goff;       /* (M + 1) items per expert, as offsets */
    int32_t *counts;     /* (M) positions per target expert of the last forward */
    int *send_rows;      /* (M) rows to each global expert = (owner, local expert) */
    /* owner: the rows of the local experts in the receive layout */
    int cap_rows;
    int32_t *roff;       /* (Ml + 1) receive-layout rows of each local expert */
    float *x;            /* (rows, d) h rows */
    int32_t *y;          /* (rows) their targets */
    float *rloss;        /* (rows) -log p_m(y) */
    float *dx;           /* (rows, d) dh rows */
    int64_t cap_scratch;
    float *scratch;      /* (sum_j R_j |S_j|) probabilities, dlogits or log-probabilities, expert blocks in order */
    /* the last forward */
    int N, ow;           /* positions; width of the returned rows */
    const float *back;   /* (N, ow) the returned rows in the send layout (the exchange's buffer) */
    float dloss;
    int fwd_ok, train_ok;
    moe_vocab_ep_times times;
};

/* What the owner's compute needs during a trip. */
typedef struct {
    moe_vocab_ep *v;
    const moe_vocab_params *prm;
    int train, ow;
    float dloss;
} trip_ctx;

moe_status moe_vocab_ep_create(moe_vocab_ep **out, const moe_vocab_part *p, int d, moe_a2a_kind kind, int chunks,
                               moe_comm *comm)
{
    *out = NULL;
    const int P = moe_comm_ep_size(comm), M = moe_vocab_part_experts(p);
    moe_status st = MOE_OK;
    if (d < 1) st = moe_errorf(MOE_ERR_ARG, "vocabulary head: d_model=%d must be >= 1", d);
    else if (M % P)
        st = moe_errorf(MOE_ERR_ARG, "vocab_experts=%d is not divisible by the expert-parallel size %d", M, P);
    moe_vocab_ep *v = st ? NULL : moe_calloc(1, sizeof *v);
    if (!st && !v) st = moe_errorf(MOE_ERR_NOMEM, "vocabulary head");
    if (v) {
        v->p = p, v->comm = comm, v->d = d, v->V = moe_vocab_part_vocab(p), v->M = M, v->P = P;
        v->Ml = M / P;
        v->m0 = moe_comm_ep_rank(comm) * v->Ml;
        v->max_set = moe_vocab_part_max_size(p);
        v->goff = moe_calloc((size_t)M + 1, sizeof *v->goff);
        v->counts = moe_calloc((size_t)M, sizeof *v->counts);
        v->send_rows = moe_calloc((size_t)M, sizeof *v->send_rows);
        v->roff = moe_calloc((size_t)v->Ml + 1, sizeof *v->roff);
        if (!v->goff || !v->counts || !v->send_rows || !v->roff) st = moe_errorf(MOE_ERR_NOMEM, "vocabulary head");
    }
    /* Collective: every ep rank creates its exchange, then all agree. */
    moe_a2a *a = NULL;
    moe_status cst = moe_a2a_create(&a, comm, v ? v->Ml : 1, kind, chunks < 1 ? 1 : chunks);
    if (v) v->a2a = a;
    else moe_a2a_destroy(a);
    if (!st) st = cst;
    st = moe_comm_agree_scope(comm, MOE_SCOPE_EP, st);
    if (st) {
        moe_vocab_ep_destroy(v);
        return st;
    }
    *out = v;
    return MOE_OK;
}

static void free_items(moe_vocab_ep *v)
{
    moe_free(v->logits), moe_free(v->q), moe_free(v->lse), moe_free(v->expert), moe_free(v->order);
    moe_free(v->rowp);
    v->logits = v->q = v->lse = NULL;
    v->expert = v->order = NULL;
    v->rowp = NULL;
    v->cap_items = 0;
}

static void free_rows(moe_vocab_ep *v)
{
    moe_free(v->x), moe_free(v->y), moe_free(v->rloss), moe_free(v->dx);
    v->x = v->rloss = v->dx = NULL;
    v->y = NULL;
    v->cap_rows = 0;
}

void moe_vocab_ep_destroy(moe_vocab_ep *v)
{
    if (!v) return;
    moe_a2a_destroy(v->a2a);
    free_items(v);
    free_rows(v);
    moe_free(v->scratch);
    moe_free(v->goff), moe_free(v->counts), moe_free(v->send_rows), moe_free(v->roff);
    moe_free(v);
}

int moe_vocab_ep_expert0(const moe_vocab_ep *v) { return v->m0; }
int moe_vocab_ep_n_local(const moe_vocab_ep *v) { return v->Ml; }
int64_t moe_vocab_ep_local_rows(const moe_vocab_ep *v)
{
    const int32_t *poff = moe_vocab_part_offsets(v->p);
    return poff[v->m0 + v->Ml] - poff[v->m0];
}
const int32_t *moe_vocab_ep_counts(const moe_vocab_ep *v) { return v->counts; }
moe_vocab_ep_times moe_vocab_ep_last_times(const moe_vocab_ep *v) { return v->times; }

/* Grows the home buffers to n items (the state of the last forward is lost). */
static moe_status grow_items(moe_vocab_ep *v, int64_t n)
{
    if (n <= v->cap_items) return MOE_OK;
    if (n > INT32_MAX / 2) return moe_errorf(MOE_ERR_OVERFLOW, "vocabulary head: %lld rows", (long long)n);
    free_items(v);
    const size_t k = (size_t)(n + n / 8), M = (size_t)v->M;
    v->logits = moe_calloc(k * M, sizeof(float));
    v->q = moe_calloc(k * M, sizeof(float));
    v->lse = moe_calloc(k, sizeof(float));
    v->expert = moe_calloc(k, sizeof(int32_t));
    v->order = moe_calloc(k, sizeof(int32_t));
    v->rowp = moe_calloc(k, sizeof(float *));
    if (!v->logits || !v->q || !v->lse || !v->expert || !v->order || !v->rowp) {
        free_items(v);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head buffers for %lld positions", (long long)n);
    }
    v->cap_items = (int)k;
    return MOE_OK;
}

/* Grows the owner's buffers for the current plan: rows (with x, y, dh rows
 * when `rows_too`) and the expert scratch. */
static moe_status grow_owner(moe_vocab_ep *v, int rows_too)
{
    const int *off = moe_a2a_recv_expert_offsets(v->a2a);
    for (int j = 0; j <= v->Ml; j++) v->roff[j] = off[j];
    const int rows = off[v->Ml];
    if (rows_too && rows > v->cap_rows) {
        free_rows(v);
        const size_t k = (size_t)rows + rows / 8 + 16, d = (size_t)v->d;
        v->x = moe_calloc(k * d, sizeof(float));
        v->dx = moe_calloc(k * d, sizeof(float));
        v->y = moe_calloc(k, sizeof(int32_t));
        v->rloss = moe_calloc(k, sizeof(float));
        if (!v->x || !v->dx || !v->y || !v->rloss) {
            free_rows(v);
            return moe_errorf(MOE_ERR_NOMEM, "vocabulary head: %d rows at the experts' owner", rows);
        }
        v->cap_rows = (int)k;
    }
    const int64_t need = moe_vocab_expert_scratch(v->roff, v->p, v->m0, v->m0 + v->Ml);
    if (need > v->cap_scratch) {
        moe_free(v->scratch);
        v->cap_scratch = 0;
        const int64_t want = need + need / 8 + 64; /* expert loads change from step to step */
        if (!(v->scratch = moe_calloc((size_t)want, sizeof(float))))
            return moe_errorf(MOE_ERR_NOMEM, "vocabulary head: %lld floats of expert logits", (long long)want);
        v->cap_scratch = want;
    }
    return MOE_OK;
}

/* Router logits must be finite: a NaN or Inf in h or the router weights shows up here. */
static moe_status check_router(const moe_vocab_ep *v, int N)
{
    for (int n = 0; n < N; n++)
        if (!moe_all_finite(v->logits + (size_t)n * v->M, (size_t)v->M))
            return moe_errorf(MOE_ERR_NONFINITE, "vocabulary head: router logits of position %d are not finite "
                                                 "(NaN or Inf in h or the router weights)", n);
    return MOE_OK;
}

/* Float offset of local expert j's block in the scratch (blocks in expert order). */
static int64_t scratch_of(const moe_vocab_ep *v, int j)
{
    return moe_vocab_expert_scratch(v->roff, v->p, v->m0, v->m0 + j);
}

/* The local experts' rows of W_out (or c) from expert m on. */
static int64_t wrow_of(const moe_vocab_ep *v, int m)
{
    const int32_t *poff = moe_vocab_part_offsets(v->p);
    return poff[m] - poff[v->m0];
}

/* Training / evaluation at the owner, experts [j0, j1): rows of width d + 1
 * (h, then the target id's bits) in; rows of width ow out: the dh row (in
 * training) and the loss term last. */
static moe_status fwd_compute(void *vctx, int j0, int j1, const float *in, float *out)
{
    const trip_ctx *c = vctx;
    moe_vocab_ep *v = c->v;
    const int d = v->d, w = d + 1, ow = c->ow, m0 = v->m0 + j0, m1 = v->m0 + j1;
    if (j1 <= j0) return MOE_OK;
    for (int i = v->roff[j0]; i < v->roff[j1]; i++) {
        memcpy(v->x + (size_t)i * d, in + (size_t)i * w, (size_t)d * sizeof(float));
        memcpy(&v->y[i], in + (size_t)i * w + d, sizeof(int32_t));
    }
    float *probs = v->scratch + scratch_of(v, j0);
    const float *wl = c->prm->w + (size_t)wrow_of(v, m0) * d, *bl = c->prm->b + wrow_of(v, m0);
    moe_status st = moe_vocab_expert_forward(v->rloss, probs, v->x, v->y, v->roff + j0, wl, bl, v->p, m0, m1, d);
    if (st) return st;
    if (c->train) moe_vocab_expert_backward_data(v->dx, probs, v->y, v->roff + j0, wl, v->p, m0, m1, d, c->dloss);
    for (int i = v->roff[j0]; i < v->roff[j1]; i++) {
        float *o = out + (size_t)i * ow;
        if (c->train) memcpy(o, v->dx + (size_t)i * d, (size_t)d * sizeof(float));
        o[ow - 1] = v->rloss[i];
    }
    return MOE_OK;
}

/* Generation at the owner, experts [j0, j1): h rows (width d) in, log p_m
 * over S_m out (the first |S_m| floats of each row of width ow). */
static moe_status topk_compute(void *vctx, int j0, int j1, const float *in, float *out)
{
    const trip_ctx *c = vctx;
    moe_vocab_ep *v = c->v;
    const int d = v->d, ow = c->ow, m0 = v->m0 + j0, m1 = v->m0 + j1;
    if (j1 <= j0) return MOE_OK;
    const int32_t *poff = moe_vocab_part_offsets(v->p);
    float *lp = v->scratch + scratch_of(v, j0);
    moe_vocab_expert_logprobs(lp, in, v->roff + j0, c->prm->w + (size_t)wrow_of(v, m0) * d, c->prm->b + wrow_of(v, m0),
                              v->p, m0, m1, d);
    for (int j = j0; j < j1; j++) {
        const int n = poff[v->m0 + j + 1] - poff[v->m0 + j];
        for (int i = v->roff[j]; i < v->roff[j + 1]; i++, lp += n) {
            if (!moe_all_finite(lp, (size_t)n))
                return moe_errorf(MOE_ERR_NONFINITE, "vocabulary expert %d: log-probabilities are not finite (NaN "
                                                     "or Inf in its weights or in h)", v->m0 + j);
            memcpy(out + (size_t)i * ow, lp, (size_t)n * sizeof(float));
        }
    }
    return MOE_OK;
}

/* Router, then the items grouped by expert into send_rows / order / goff. */
static moe_status route(moe_vocab_ep *v, const float *h, const moe_vocab_params *prm, int N, int items)
{
    moe_vocab_router_forward(v->logits, v->q, v->lse, h, prm->router_w, prm->router_b, N, v->d, v->M);
    moe_status st = check_router(v, N);
    if (st) return st;
    moe_vocab_group(v->order, v->goff, v->expert, items, v->M);
    for (int m = 0; m < v->M; m++) v->send_rows[m] = v->goff[m + 1] - v->goff[m];
    return MOE_OK;
}

moe_status moe_vocab_ep_forward(moe_vocab_ep *v, float *loss, const float *h, const int32_t *targets,
                                const moe_vocab_params *prm, int N, float dloss)
{
    const double t0 = moe_now();
    const int M = v->M, d = v->d, train = dloss > 0, ow = train ? d + 1 : 1;
    v->fwd_ok = v->train_ok = 0;
    memset(v->counts, 0, (size_t)M * sizeof *v->counts);
    moe_status st = N < 1 ? moe_errorf(MOE_ERR_ARG, "vocabulary head: %d positions", N) : grow_items(v, N);
    if (!st) st = moe_vocab_target_experts(v->expert, targets, v->p, N);
    if (!st) st = route(v, h, prm, N, N);
    if (st) memset(v->send_rows, 0, (size_t)M * sizeof *v->send_rows);
    /* a failure so far rides on the count exchange: every ep rank stops here */
    if ((st = moe_a2a_set_counts(v->a2a, v->send_rows, st, d + 1))) return st;
    const moe_status local = grow_owner(v, 1);
    moe_a2a_buffers b;
    if ((st = moe_a2a_buffers_get(v->a2a, MOE_A2A_FORWARD, &b))) return st;
    for (int i = 0; i < N; i++) {
        float *row = b.send + (size_t)i * (d + 1);
        memcpy(row, h + (size_t)v->order[i] * d, (size_t)d * sizeof(float));
        memcpy(row + d, &targets[v->order[i]], sizeof(int32_t)); /* the id's bits: exact for any id */
    }
    const double t1 = moe_now();
    trip_ctx c = {v, prm, train, ow, dloss};
    st = moe_a2a_exchange(v->a2a, MOE_A2A_FORWARD, d + 1, ow, fwd_compute, &c, local);
    const moe_a2a_times xt = moe_a2a_last_times(v->a2a);
    if (st) return st;
    const double t2 = moe_now();
    for (int i = 0; i < N; i++) {
        const int n = v->order[i];
        loss[n] = (v->lse[n] - v->logits[(size_t)n * M + v->expert[n]]) + b.back[(size_t)i * ow + ow - 1];
    }
    for (int m = 0; m < M; m++) v->counts[m] = v->send_rows[m];
    v->N = N, v->ow = ow, v->back = b.back, v->dloss = dloss;
    v->fwd_ok = 1, v->train_ok = train;
    v->times = (moe_vocab_ep_times){t1 - t0, xt.dispatch + xt.ret, xt.compute, moe_now() - t2};
    return MOE_OK;
}

moe_status moe_vocab_ep_backward(moe_vocab_ep *v, float *dh, moe_vocab_params *grad, const float *h,
                                 const moe_vocab_params *prm)
{
    if (!v->train_ok)
        return moe_errorf(MOE_ERR_ARG, "vocabulary head: backward without a successful training forward");
    v->train_ok = 0;
    const int d = v->d;
    /* owner: the local experts' gradients from the rows and dlogits kept in the forward */
    moe_vocab_expert_backward_weights(grad->w, grad->b, v->scratch, v->x, v->roff, v->p, v->m0, v->m0 + v->Ml, d);
    /* home: the router, then the dh rows the owners sent back */
    moe_vocab_router_backward(dh, grad->router_w, grad->router_b, v->logits, v->q, v->expert, h, prm->router_w,
                              v->dloss, v->N, d, v->M);
    moe_vocab_combine_dh(dh, v->back, v->ow, v->order, v->N, 1, d);
    return MOE_OK;
}

moe_status moe_vocab_ep_coverage(const moe_vocab_ep *v, int K, int64_t *covered)
{
    if (!v->fwd_ok) return moe_errorf(MOE_ERR_ARG, "vocabulary head: coverage without a successful forward before it");
    if (K < 1 || K > v->M)
        return moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, %d] (the vocabulary experts)", K, v->M);
    *covered = moe_vocab_coverage(v->q, v->expert, v->N, v->M, K);
    return MOE_OK;
}

moe_status moe_vocab_ep_rank_hist(const moe_vocab_ep *v, int n, int64_t *hist)
{
    if (!v->fwd_ok || n < 0 || n > v->N)
        return moe_errorf(MOE_ERR_ARG, "vocabulary head: target ranks of %d positions, the last forward has %d", n,
                          v->fwd_ok ? v->N : 0);
    moe_vocab_rank_hist(hist, v->q, v->expert, n, v->M);
    return MOE_OK;
}

moe_status moe_vocab_ep_rank_mass(const moe_vocab_ep *v, int n, double *mass)
{
    if (!v->fwd_ok || n < 0 || n > v->N)
        return moe_errorf(MOE_ERR_ARG, "vocabulary head: router mass of %d positions, the last forward has %d", n,
                          v->fwd_ok ? v->N : 0);
    moe_vocab_rank_mass(mass, v->q, n, v->M);
    return MOE_OK;
}

moe_status moe_vocab_ep_topk(moe_vocab_ep *v, int32_t *ids, float *logp, int32_t *count, int64_t stride,
                             const float *h, const moe_vocab_params *prm, int N, int K)
{
    const double t0 = moe_now();
    const int M = v->M, d = v->d;
    v->fwd_ok = v->train_ok = 0;
    memset(v->counts, 0, (size_t)M * sizeof *v->counts);
    moe_status st = MOE_OK;
    if (K < 1 || K > M)
        st = moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, %d] (the vocabulary experts)", K, M);
    else if (N < 0)
        st = moe_errorf(MOE_ERR_ARG, "vocabulary head: %d positions", N);
    else if (stride < moe_vocab_part_topk_size(v->p, K))
        st = moe_errorf(MOE_ERR_ARG, "vocabulary head: a top-%d list needs room for %lld candidates per position, "
                                     "the stride is %lld", K, (long long)moe_vocab_part_topk_size(v->p, K),
                        (long long)stride);
    const int64_t items = st ? 0 : (int64_t)N * K;
    if (!st) st = grow_items(v, items);
    if (!st && N > 0) {
        moe_vocab_router_forward(v->logits, v->q, v->lse, h, prm->router_w, prm->router_b, N, d, M);
        st = check_router(v, N);
    }
    if (!st && N == 0) {
        memset(v->send_rows, 0, (size_t)M * sizeof *v->send_rows); /* no position here: still in the exchange */
    } else if (!st) {
        moe_vocab_topk_select(v->expert, v->q, N, M, K);
        moe_vocab_group(v->order, v->goff, v->expert, (int)items, M);
        for (int m = 0; m < M; m++) v->send_rows[m] = v->goff[m + 1] - v->goff[m];
    } else {
        memset(v->send_rows, 0, (size_t)M * sizeof *v->send_rows);
    }
    const int ow = v->max_set;
    if ((st = moe_a2a_set_counts(v->a2a, v->send_rows, st, d > ow ? d : ow))) return st;
    const moe_status local = grow_owner(v, 0);
    moe_a2a_buffers b;
    if ((st = moe_a2a_buffers_get(v->a2a, MOE_A2A_FORWARD, &b))) return st;
    moe_vocab_pack(b.send, NULL, h, NULL, v->order, (int)items, K, d);
    const double t1 = moe_now();
    trip_ctx c = {v, prm, 0, ow, 0};
    st = moe_a2a_exchange(v->a2a, MOE_A2A_FORWARD, d, ow, topk_compute, &c, local);
    const moe_a2a_times xt = moe_a2a_last_times(v->a2a);
    if (st) return st;
    const double t2 = moe_now();
    for (int64_t i = 0; i < items; i++) v->rowp[v->order[i]] = b.back + (size_t)i * ow;
    moe_vocab_topk_combine(ids, logp, count, stride, v->logits, v->lse, v->expert, v->rowp, v->p, N, K);
    v->times = (moe_vocab_ep_times){t1 - t0, xt.dispatch + xt.ret, xt.compute, moe_now() - t2};
    return MOE_OK;
}
