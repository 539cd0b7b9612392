/* The MoE layer: route -> pack -> exchange -> experts -> exchange -> combine.
 *
 * Send layout (on a token's home rank): one row per kept assignment, grouped
 * by GLOBAL expert (which is also "destination ep rank, then its local
 * expert", by the placement of routing.md 7), tokens ascending inside an
 * expert. The combine walks that layout in order, so every token sums its
 * expert outputs in ascending expert order whatever the number of ranks:
 * results do not depend on message arrival order.
 *
 * Without a comm the receive layout IS the send layout and the exchange is
 * skipped (pointer aliasing, no copy); with a comm the a2a plan is set once
 * per forward and reused by the four exchanges of the step. */
#include "layer/layer.h"

#include <cblas.h>
#include <string.h>

struct moe_layer {
    moe_layer_config cfg;
    moe_comm *comm;          /* not owned; NULL: single process */
    moe_a2a *a2a;            /* owned; NULL without comm */
    int E, El, e0, P, d, F, F1;
    moe_route *route;
    int T, G;                /* sizes of the last forward */
    int fwd_ok;              /* 1 when the last forward completed */

    /* send layout (home rank) */
    int n_send;
    int send_cap;            /* rows allocated */
    int *send_rows;          /* (P * El) rows per destination (rank, local expert) = per global expert */
    int *send_token;         /* (send_cap) token of each send row */
    float *send_w;           /* (send_cap) combine weight of each send row */
    float *xs;               /* (send_cap, d) x rows, then dx rows in backward */
    float *ys;               /* (send_cap, d) expert outputs back home; dy*w rows in backward */

    /* receive layout (expert owner) */
    int n_recv;
    int recv_cap;
    int *recv_off;           /* (El + 1) local expert offsets (single-process path) */
    float *xr;               /* (recv_cap, d) expert inputs (alias of xs without comm) */
    float *h;                /* (recv_cap, F1) pre-activation */
    float *a;                /* (recv_cap, F) activation */
    float *yr;               /* (recv_cap, d) expert outputs; dx rows in backward */
    float *dyr;              /* dy rows at the owner: yr (comm) or ys (single process) */
    float *yout;             /* expert output rows of the current pass: yr, or the shm window */

    float *dweight;          /* (T_max, E) dL/dg */
    int *expert_rows;        /* (El) */
    moe_layer_timing timing;
    double flops;
};

/* Replaces *p by a zeroed buffer of n elements (contents are not kept:
 * buffers only grow between steps). */
static moe_status grow(void **p, size_t n, size_t size)
{
    void *q = moe_calloc(n, size);
    if (!q) return moe_errorf(MOE_ERR_NOMEM, "MoE layer: cannot allocate %zu bytes", n * size);
    moe_free(*p);
    *p = q;
    return MOE_OK;
}

/* Grows the send-side buffers to hold n rows. */
static moe_status grow_send(moe_layer *L, int n)
{
    if (n <= L->send_cap) return MOE_OK;
    int cap = n + n / 4 + 16;
    moe_status st;
    if ((st = grow((void **)&L->send_token, cap, sizeof(int)))) return st;
    if ((st = grow((void **)&L->send_w, cap, sizeof(float)))) return st;
    if ((st = grow((void **)&L->xs, (size_t)cap * L->d, sizeof(float)))) return st;
    if ((st = grow((void **)&L->ys, (size_t)cap * L->d, sizeof(float)))) return st;
    L->send_cap = cap;
    return MOE_OK;
}

/* Grows the receive-side buffers to hold n rows. */
static moe_status grow_recv(moe_layer *L, int n)
{
    if (n <= L->recv_cap) return MOE_OK;
    /* Headroom so that step-to-step fluctuation of the load does not
     * reallocate; small, because these are the layer's largest buffers. */
    int cap = n + n / 8 + 64;
    size_t c = (size_t)cap;
    moe_status st;
    if (L->comm && (st = grow((void **)&L->xr, c * L->d, sizeof(float)))) return st;
    if ((st = grow((void **)&L->h, c * L->F1, sizeof(float)))) return st;
    if ((st = grow((void **)&L->a, c * L->F, sizeof(float)))) return st;
    if ((st = grow((void **)&L->yr, c * L->d, sizeof(float)))) return st;
    L->recv_cap = cap;
    return MOE_OK;
}

moe_status moe_layer_create(moe_layer **out, const moe_layer_config *cfg, moe_comm *comm)
{
    *out = NULL;
    moe_status st = moe_router_config_check(&cfg->router);
    if (st) return st;
    if (cfg->d_ff < 1) return moe_errorf(MOE_ERR_ARG, "d_ff must be >= 1 (got %d)", cfg->d_ff);
    if (cfg->max_tokens < 1 || cfg->max_groups < 1)
        return moe_errorf(MOE_ERR_ARG, "max_tokens and max_groups must be >= 1 (got %d, %d)",
                          cfg->max_tokens, cfg->max_groups);
    if (cfg->chunks < 0) return moe_errorf(MOE_ERR_ARG, "chunks must be >= 1 (got %d)", cfg->chunks);
    int P = comm ? moe_comm_ep_size(comm) : 1;
    int E = cfg->router.n_experts;
    if (E % P != 0)
        return moe_errorf(MOE_ERR_ARG, "n_experts=%d is not divisible by the expert-parallel size %d", E, P);

    moe_layer *L = moe_calloc(1, sizeof *L);
    if (!L) return moe_errorf(MOE_ERR_NOMEM, "MoE layer: out of memory");
    L->cfg = *cfg;
    if (L->cfg.chunks < 1) L->cfg.chunks = 1;
    L->comm = comm;
    L->E = E;
    L->P = P;
    L->El = E / P;
    L->e0 = comm ? moe_comm_ep_rank(comm) * L->El : 0;
    L->d = cfg->router.d_model;
    L->F = cfg->d_ff;
    L->F1 = moe_f1(cfg->d_ff, cfg->act);
    st = moe_route_create(&L->route, &cfg->router, cfg->max_tokens, cfg->max_groups);
    if (!st) {
        L->send_rows = moe_calloc((size_t)E, sizeof(int));
        L->recv_off = moe_calloc((size_t)L->El + 1, sizeof(int));
        L->expert_rows = moe_calloc((size_t)L->El, sizeof(int));
        L->dweight = moe_calloc((size_t)cfg->max_tokens * E, sizeof(float));
        if (!L->send_rows || !L->recv_off || !L->expert_rows || !L->dweight)
            st = moe_errorf(MOE_ERR_NOMEM, "MoE layer: out of memory");
    }
    /* Collective: every ep rank creates its exchange even if a local step failed,
     * then all agree, so no rank is left inside a2a_create. */
    if (comm) {
        moe_status cst = moe_a2a_create(&L->a2a, comm, L->El, cfg->a2a, L->cfg.chunks);
        if (!st) st = cst;
        st = moe_comm_agree(comm, st);
    }
    if (st) {
        moe_layer_destroy(L);
        return st;
    }
    *out = L;
    return MOE_OK;
}

void moe_layer_destroy(moe_layer *L)
{
    if (!L) return;
    moe_a2a_destroy(L->a2a);
    moe_route_destroy(L->route);
    moe_free(L->send_rows);
    moe_free(L->send_token);
    moe_free(L->send_w);
    moe_free(L->xs);
    moe_free(L->ys);
    moe_free(L->recv_off);
    if (L->comm) moe_free(L->xr);
    moe_free(L->h);
    moe_free(L->a);
    moe_free(L->yr);
    moe_free(L->dweight);
    moe_free(L->expert_rows);
    moe_free(L);
}

int moe_layer_expert0(const moe_layer *L) { return L->e0; }
int moe_layer_n_local_experts(const moe_layer *L) { return L->El; }
const moe_route *moe_layer_route(const moe_layer *L) { return L->route; }
const int *moe_layer_expert_rows(const moe_layer *L) { return L->expert_rows; }
const moe_layer_timing *moe_layer_get_timing(const moe_layer *L) { return &L->timing; }
void moe_layer_reset_timing(moe_layer *L) { memset(&L->timing, 0, sizeof L->timing); }
double moe_layer_expert_flops(const moe_layer *L) { return L->flops; }

/* Parameters of local experts [j0, ...). */
static moe_expert_params expert_view(const moe_expert_params *p, const moe_layer *L, int j0)
{
    moe_expert_params v = {
        .w1 = p->w1 + (size_t)j0 * L->F1 * L->d,
        .b1 = p->b1 + (size_t)j0 * L->F1,
        .w2 = p->w2 + (size_t)j0 * L->d * L->F,
        .b2 = p->b2 + (size_t)j0 * L->d,
    };
    return v;
}

/* Receive-layout expert offsets: from the plan, or the send layout itself. */
static const int *recv_offsets(const moe_layer *L)
{
    return L->a2a ? moe_a2a_recv_expert_offsets(L->a2a) : L->recv_off;
}

/* Rows per destination (= per global expert) and room for them. */
static moe_status count_rows(moe_layer *L)
{
    const moe_route *r = L->route;
    const int E = L->E;
    memset(L->send_rows, 0, sizeof(int) * (size_t)E);
    for (int g = 0; g < L->G; g++)
        for (int e = 0; e < E; e++) L->send_rows[e] += r->n_kept[(size_t)g * E + e];
    int n = 0;
    for (int e = 0; e < E; e++) n += L->send_rows[e];
    moe_status st = grow_send(L, n);
    if (st) return st;
    L->n_send = n;
    return MOE_OK;
}

/* Pack: one send row per kept assignment into dst (send layout), grouped by
 * expert, tokens ascending; records each row's token and weight. */
static void pack(moe_layer *L, float *dst, const float *x)
{
    const moe_route *r = L->route;
    const int T = L->T, E = L->E, d = L->d;
    /* Cursor per expert, then one pass over the (T, E) mask: tokens land
     * in ascending order inside each expert. */
    int cursor[E];
    int acc = 0;
    for (int e = 0; e < E; e++) {
        cursor[e] = acc;
        acc += L->send_rows[e];
    }
    for (int t = 0; t < T; t++) {
        const uint8_t *kt = r->kept + (size_t)t * E;
        const float *wt = r->weight + (size_t)t * E;
        for (int e = 0; e < E; e++) {
            if (!kt[e]) continue;
            int row = cursor[e]++;
            L->send_token[row] = t;
            L->send_w[row] = wt[e];
            memcpy(dst + (size_t)row * d, x + (size_t)t * d, sizeof(float) * (size_t)d);
        }
    }
}

/* The combine runs on every ep rank even after a local failure (its peers
 * are already in it), then the ep group agrees, as the pipeline does. */
static moe_status combine_agreed(moe_layer *L, float *send, const float *recv, moe_status st)
{
    moe_status cs = moe_a2a_combine(L->a2a, send, recv, L->d);
    return moe_comm_agree_scope(L->comm, MOE_SCOPE_EP, st ? st : cs);
}

typedef struct {
    moe_layer *L;
    const moe_layer_params *p;
    moe_layer_params *g;
} compute_ctx;

static moe_status fwd_compute(void *vctx, int j0, int j1)
{
    compute_ctx *c = vctx;
    moe_layer *L = c->L;
    if (j1 <= j0) return MOE_OK;
    moe_expert_params v = expert_view(&c->p->experts, L, j0);
    moe_expert_forward(L->yout, L->h, L->a, L->xr, recv_offsets(L) + j0, &v, j1 - j0, L->d, L->F,
                       L->cfg.act);
    return MOE_OK;
}

static moe_status bwd_compute(void *vctx, int j0, int j1)
{
    compute_ctx *c = vctx;
    moe_layer *L = c->L;
    if (j1 <= j0) return MOE_OK;
    moe_expert_params v = expert_view(&c->p->experts, L, j0);
    moe_expert_params gv = expert_view(&c->g->experts, L, j0);
    moe_expert_backward(L->yout, &gv, L->h, L->a, L->dyr, L->xr, L->h, L->a, recv_offsets(L) + j0,
                        &v, j1 - j0, L->d, L->F, L->cfg.act);
    return MOE_OK;
}

/* Expert outputs in the send layout: combined back home, or (single
 * process) the expert output buffer itself. */
static const float *home_y_rows(const moe_layer *L) { return L->comm ? L->ys : L->yout; }

static double gemm_flops(const moe_layer *L, int rows)
{
    /* forward: x W1^T and a W2^T */
    return 2.0 * rows * L->d * (double)L->F1 + 2.0 * rows * L->F * (double)L->d;
}

moe_status moe_layer_forward(moe_layer *L, float *y, const float *x, const moe_layer_params *p,
                             int T, int G, const moe_noise_key *noise)
{
    moe_status st = MOE_OK;
    double t0 = moe_now();
    L->fwd_ok = 0;
    if (T < 1 || G < 1 || T > L->cfg.max_tokens || G > L->cfg.max_groups || T % G != 0)
        st = moe_errorf(MOE_ERR_ARG, "MoE layer: bad sizes T=%d G=%d (T must be a positive multiple "
                        "of G, T <= %d, G <= %d)", T, G, L->cfg.max_tokens, L->cfg.max_groups);
    if (!st) {
        L->T = T;
        L->G = G;
        st = moe_router_forward(L->route, x, p->router_w, p->noise_w, &L->cfg.router, T, G, noise);
    }
    double t1 = moe_now();
    if (!st) st = count_rows(L);
    if (!st && moe_fault("layer_alloc", L->comm ? moe_comm_rank(L->comm) : 0))
        st = moe_errorf(MOE_ERR_NOMEM, "MoE layer: injected allocation failure (MOE_FAULT=layer_alloc)");
    if (st) {
        L->n_send = 0;
        memset(L->send_rows, 0, sizeof(int) * (size_t)L->E);
    }
    double t2 = moe_now();

    /* Exchange counts: the status rides along, so a failure anywhere stops
     * every rank here instead of in a later payload exchange. */
    if (L->comm) {
        st = moe_a2a_set_counts(L->a2a, L->send_rows, st, L->d);
        if (st) return st;
        L->n_recv = moe_a2a_recv_total(L->a2a);
        /* Over the ep group only: other ep groups (replicas) run their own
         * exchange and may already have stopped on an error of their own. */
        st = moe_comm_agree_scope(L->comm, MOE_SCOPE_EP, grow_recv(L, L->n_recv));
        if (st) return st;
        L->dyr = L->yr; /* dy rows arrive where the expert outputs were (dead by then);
                         * the expert backward writes dx over them in place */
    } else {
        if (st) return st;
        L->n_recv = L->n_send;
        L->recv_off[0] = 0;
        for (int j = 0; j < L->El; j++) L->recv_off[j + 1] = L->recv_off[j] + L->send_rows[j];
        L->xr = L->xs;  /* the receive layout is the send layout */
        L->dyr = L->ys; /* backward writes the dy * g rows there */
        st = grow_recv(L, L->n_recv);
        if (st) return st;
    }
    /* With the shared-memory exchange, rows are packed (and expert outputs
     * written) straight into this rank's window segment: one copy per row. */
    float *shm = L->a2a ? moe_a2a_shm_buffer(L->a2a) : NULL;
    float *xsend = shm ? shm : L->xs;
    double tp = moe_now();
    pack(L, xsend, x);
    double tp_end = moe_now();
    L->yout = shm ? shm : L->yr;
    const int *off = recv_offsets(L);
    for (int j = 0; j < L->El; j++) L->expert_rows[j] = off[j + 1] - off[j];
    L->flops = 3.0 * gemm_flops(L, L->n_recv);

    compute_ctx ctx = {L, p, NULL};
    double t3 = moe_now(), t4, t5;
    if (L->comm && L->cfg.chunks > 1) {
        st = moe_a2a_pipeline(L->a2a, L->xr, xsend, L->d, L->yout, L->ys, L->d, fwd_compute, &ctx);
        t4 = t5 = moe_now();
    } else {
        if (L->comm) st = moe_a2a_dispatch(L->a2a, L->xr, xsend, L->d);
        t3 = moe_now();
        if (!st) st = fwd_compute(&ctx, 0, L->El);
        t4 = moe_now();
        if (L->comm) st = combine_agreed(L, L->ys, L->yout, st);
        t5 = moe_now();
    }
    if (st) return st;

    /* Combine at home: expert order per token is fixed by the send layout. */
    const int d = L->d;
    const float *home_y = home_y_rows(L);
    memset(y, 0, sizeof(float) * (size_t)T * d);
    for (int row = 0; row < L->n_send; row++) {
        float w = L->send_w[row];
        float *yt = y + (size_t)L->send_token[row] * d;
        const float *src = home_y + (size_t)row * d;
        for (int i = 0; i < d; i++) yt[i] += w * src[i];
    }
    double t6 = moe_now();
    L->timing.route += t1 - t0;
    L->timing.pack += (t2 - t1) + (tp_end - tp);
    L->timing.dispatch += (t3 - t2) - (tp_end - tp);
    L->timing.expert_fwd += t4 - t3;
    L->timing.combine_comm += t5 - t4;
    L->timing.combine += t6 - t5;
    L->fwd_ok = 1;
    return MOE_OK;
}

moe_status moe_layer_backward(moe_layer *L, float *dx, moe_layer_params *grads, const float *dy,
                              const float *x, const moe_layer_params *p, float lb_scale,
                              float z_scale)
{
    if (!L->fwd_ok) return moe_errorf(MOE_ERR_ARG, "MoE layer: backward without a successful forward");
    const int T = L->T, E = L->E, d = L->d;
    double t0 = moe_now();
    /* dL/dg of each kept assignment, and the rows dy * g for the experts. */
    memset(L->dweight, 0, sizeof(float) * (size_t)T * E);
    const float *home_y = home_y_rows(L);
    float *shm = L->a2a ? moe_a2a_shm_buffer(L->a2a) : NULL;
    float *dysend = shm ? shm : L->ys;
    int cursor[E];
    int acc = 0;
    for (int e = 0; e < E; e++) {
        cursor[e] = acc;
        acc += L->send_rows[e];
    }
    /* Walk the expert outputs in send order; dysend receives each row's
     * dy * g (in place when it holds the outputs: each row is read before
     * it is written). */
    for (int e = 0; e < E; e++) {
        for (int row = cursor[e]; row < cursor[e] + L->send_rows[e]; row++) {
            int t = L->send_token[row];
            const float *dyt = dy + (size_t)t * d;
            const float *yrow = home_y + (size_t)row * d;
            float *dyrow = dysend + (size_t)row * d;
            float dot = 0.0f, w = L->send_w[row];
            for (int i = 0; i < d; i++) {
                dot += dyt[i] * yrow[i];
                dyrow[i] = w * dyt[i];
            }
            L->dweight[(size_t)t * E + e] = dot;
        }
    }
    double t1 = moe_now();
    moe_status st = moe_router_backward(dx, grads->router_w, grads->noise_w, L->dweight, L->route, x,
                                        p->router_w, p->noise_w, &L->cfg.router, lb_scale, z_scale);
    double t2 = moe_now();
    if (st) return st; /* purely local: a failure here is an argument error on every rank alike */

    L->yout = shm ? shm : L->yr; /* dx rows of the experts */
    compute_ctx ctx = {L, p, grads};
    double t3, t4, t5;
    if (L->comm && L->cfg.chunks > 1) {
        st = moe_a2a_pipeline(L->a2a, L->dyr, dysend, d, L->yout, L->xs, d, bwd_compute, &ctx);
        t3 = t4 = t5 = moe_now();
    } else {
        if (L->comm) st = moe_a2a_dispatch(L->a2a, L->dyr, dysend, d);
        t3 = moe_now();
        if (!st) st = bwd_compute(&ctx, 0, L->El);
        t4 = moe_now();
        if (L->comm) st = combine_agreed(L, L->xs, L->yout, st);
        t5 = moe_now();
    }
    if (st) return st;
    /* Unpack: dx[t] += rows of t, in expert order. */
    const float *home_dx = L->comm ? L->xs : L->yout;
    for (int row = 0; row < L->n_send; row++) {
        float *dxt = dx + (size_t)L->send_token[row] * d;
        const float *src = home_dx + (size_t)row * d;
        for (int i = 0; i < d; i++) dxt[i] += src[i];
    }
    double t6 = moe_now();
    L->timing.bwd_combine_grad += t1 - t0;
    L->timing.bwd_router += t2 - t1;
    L->timing.bwd_dispatch += t3 - t2;
    L->timing.expert_bwd += t4 - t3;
    L->timing.bwd_combine_comm += t5 - t4;
    L->timing.bwd_unpack += t6 - t5;
    L->fwd_ok = 0;
    return MOE_OK;
}

moe_status moe_layer_reduce_grads(moe_layer *L, moe_layer_params *grads)
{
    if (!L->comm) return MOE_OK;
    size_t Ed = (size_t)L->E * L->d;
    moe_status st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->router_w, Ed);
    if (!st && grads->noise_w) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->noise_w, Ed);
    if (st || moe_comm_n_replicas(L->comm) == 1) return st;
    size_t El = (size_t)L->El;
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.w1, El * L->F1 * L->d);
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.b1, El * L->F1);
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.w2, El * L->d * L->F);
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.b2, El * L->d);
    return st;
}
