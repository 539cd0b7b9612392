/* The MoE layer: route -> pack -> exchange (dispatch, experts, return) ->
 * combine, and its backward.
 *
 * Send layout (on a token's home rank): one row per kept assignment, grouped
 * by exchange destination (ep rank, then its local slot; with the default
 * contiguous placement of docs/routing.md section 8 that is also global
 * expert order; under a placement, section 9, a slot holds any expert and a
 * replicated expert's tokens go to its copies by token index), tokens
 * ascending inside a destination. The combine walks each token's
 * assignments in ascending expert order, so every token sums its expert
 * outputs in that order whatever the number of ranks and the placement:
 * results do not depend on message arrival order.
 *
 * The layer never knows which transport runs (one process, point-to-point,
 * shared memory, chunked): the exchange plan is set once per forward and
 * the exchange owns the row buffers of both round trips (comm.h). */
#include "layer/layer.h"

#include <cblas.h>
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

/* A field added to moe_layer_timing without a line here fails to compile. */
_Static_assert(sizeof(moe_layer_timing) == MOE_LAYER_TIMING_N * sizeof(double), "one table line per timing field");
const moe_layer_timing_field moe_layer_timing_fields[MOE_LAYER_TIMING_N] = {
    {"route", offsetof(moe_layer_timing, route)},
    {"pack", offsetof(moe_layer_timing, pack)},
    {"dispatch", offsetof(moe_layer_timing, dispatch)},
    {"expert_fwd", offsetof(moe_layer_timing, expert_fwd)},
    {"return", offsetof(moe_layer_timing, ret)},
    {"combine", offsetof(moe_layer_timing, combine)},
    {"shared", offsetof(moe_layer_timing, shared)},
    {"bwd_gate_grad", offsetof(moe_layer_timing, bwd_gate_grad)},
    {"bwd_router", offsetof(moe_layer_timing, bwd_router)},
    {"bwd_dispatch", offsetof(moe_layer_timing, bwd_dispatch)},
    {"expert_bwd", offsetof(moe_layer_timing, expert_bwd)},
    {"bwd_return", offsetof(moe_layer_timing, bwd_return)},
    {"bwd_unpack", offsetof(moe_layer_timing, bwd_unpack)},
    {"bwd_shared", offsetof(moe_layer_timing, bwd_shared)},
};

double moe_layer_timing_get(const moe_layer_timing *t, int i)
{
    return *(const double *)((const char *)t + moe_layer_timing_fields[i].offset);
}

struct moe_layer {
    moe_layer_config cfg;
    moe_comm *comm;          /* not owned */
    moe_a2a *a2a;            /* owned: the token exchange over the ep group */
    int E, El, e0, P, d, F, F1;
    moe_route *route;
    int T, G;                /* sizes of the last forward */
    int fwd_ok;              /* 1 when the last forward completed */

    /* where each global expert is: holders[holder_off[e] .. holder_off[e+1])
     * are the exchange destinations (ep rank * El + local slot) of its copies,
     * ascending */
    int *holder_off;         /* (E + 1) */
    int *holders;            /* (P * El) */
    int *local_ids;          /* (El) global expert of each local slot */
    /* experts with copies on several ranks: their gradients are summed over
     * the copies (rep_buf packs one row block per such expert) */
    int n_rep;
    int *rep_expert;         /* (n_rep) global expert */
    int *rep_slot;           /* (n_rep) its local slot here, or -1 */
    float *rep_buf;          /* (n_rep, F1 d + F1 + d F + d) */
    float *rep_prev;         /* (n_rep, ...) their gradients before this backward */

    /* the routing handed to the exchange: per token, its kept assignments in
     * ascending expert order (the combine order) */
    int n_asg;
    int asg_cap;             /* assignments allocated */
    int *tok_off;            /* (T_max + 1) */
    int *asg_dest;           /* (asg_cap) exchange destination */
    int *asg_expert;         /* (asg_cap) global expert */
    float *asg_w;            /* (asg_cap) gate weight */
    float *asg_dw;           /* (asg_cap) dL/dg (backward) */

    /* receive layout (expert owner): the experts' activations */
    int n_recv;
    int recv_cap;
    int64_t recv_bound;      /* most rows this rank can receive in a step (moe_layer_rows_bound), or 0 */
    int64_t recv_most;       /* the worst case even where recv_bound is 0 (recv_rows_most) */
    float *h;                /* (recv_cap, F1) pre-activation */
    float *a;                /* (recv_cap, F) activation */

    float *dweight;          /* (T_max, E) dL/dg */
    int *expert_rows;        /* (El) */

    /* shared experts (n_shared > 0): every token, replicated */
    int S, Fs, F1s;
    float *sh_h, *sh_a;      /* (S, T_max, F1s), (S, T_max, Fs) their activations */
    float *sh_out;           /* (T_max, d) sum of the S outputs before the gate */
    float *sh_tmp;           /* (T_max, d) one expert's output; backward: dx rows */
    float *sh_dy;            /* (T_max, d) backward: gate * dy */
    float *sh_gate;          /* (T_max) sigmoid(w_sg . x), or unused without the gate */
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

/* Grows the per-assignment records to n. */
static moe_status grow_asg(moe_layer *L, int n)
{
    if (n <= L->asg_cap) return MOE_OK;
    int cap = n + n / 4 + 16;
    moe_status st;
    if ((st = grow((void **)&L->asg_dest, cap, sizeof(int)))) return st;
    if ((st = grow((void **)&L->asg_expert, cap, sizeof(int)))) return st;
    if ((st = grow((void **)&L->asg_w, cap, sizeof(float)))) return st;
    if ((st = grow((void **)&L->asg_dw, cap, sizeof(float)))) return st;
    L->asg_cap = cap;
    return MOE_OK;
}

/* The most rows one ep rank of P holding El slots can receive in a step.
 * Every rank routes at most max_tokens tokens in at most max_groups
 * groups, and group g gives each expert at most cap(T_g) rows
 * (moe_router_capacity: ceil(k' T_g cf / E), k' = k for token choice, 1 for
 * expert choice), so an expert gets at most cap(T) + G rows from a rank
 * (each group's capacity rounds up on its own); and a token reaches this
 * rank's slots at most min(k, El) times (El for expert choice). The same
 * routing on every rank (a split decoding group) stays inside too. */
static int64_t recv_rows_most(const moe_layer_config *cfg, int P, int El)
{
    const moe_router_config *r = &cfg->router;
    const int ec = r->kind == MOE_ROUTER_EXPERT_CHOICE;
    const int64_t per_token = ec || r->top_k > El ? El : r->top_k;
    int64_t b = (int64_t)P * cfg->max_tokens * per_token;
    const int64_t C = moe_router_capacity(r, cfg->max_tokens);
    if (C >= 0) {
        const int64_t per_expert = C + cfg->max_groups;
        if ((int64_t)P * El * per_expert < b) b = (int64_t)P * El * per_expert;
    }
    return b;
}

int64_t moe_layer_rows_bound(const moe_layer_config *cfg, int P, int El)
{
    const int64_t b = recv_rows_most(cfg, P, El);
    if (moe_router_capacity(&cfg->router, cfg->max_tokens) < 0 && P > 1) {
        /* Dropless: every token could come here, P min(k, El) / k times the
         * mean. Worth holding up to MOE_DROPLESS_BOUND_MEANS means (2 ranks:
         * a dropless load drifts up for tens of steps, and each growth it
         * forced cost a third of a step in page faults); beyond, growth. */
        const int64_t mean = (int64_t)cfg->max_tokens * cfg->router.top_k;
        if (b > MOE_DROPLESS_BOUND_MEANS * mean) return 0;
    }
    return b <= INT32_MAX ? b : 0;
}

/* The most rows this rank sends in one step: one per kept assignment (at
 * most top_k a token; under expert choice, every expert's capacity). */
static int64_t send_rows_bound(const moe_layer_config *cfg)
{
    const moe_router_config *r = &cfg->router;
    const int64_t Tm = cfg->max_tokens;
    if (r->kind != MOE_ROUTER_EXPERT_CHOICE) return Tm * r->top_k <= INT32_MAX ? Tm * r->top_k : 0;
    const int64_t b = (int64_t)r->n_experts * (moe_router_capacity(r, cfg->max_tokens) + cfg->max_groups);
    return b <= INT32_MAX ? b : 0;
}

/* Grows the expert activations to n rows of the receive layout. */
static moe_status grow_recv(moe_layer *L, int n)
{
    if (n <= L->recv_cap) return MOE_OK;
    /* Straight to the bound when it holds n: one growth per run, at the
     * first step, not one each time a step's load beats the last (55-70 ms
     * of page faults each for the medium model here). Without a bound
     * (dropless over 3 or more ranks) half again the load, so that the
     * step-to-step fluctuation of a dropless load (wide: nothing caps it)
     * rarely reallocates, but never past the worst case. */
    int64_t want = L->recv_bound >= n ? L->recv_bound : (int64_t)n + (L->recv_bound ? n / 8 : n / 2) + 64;
    if (want > L->recv_most && L->recv_most >= n) want = L->recv_most; /* headroom beyond the worst case is waste */
    const int cap = want <= INT32_MAX ? (int)want : n;
    size_t c = (size_t)cap;
    moe_status st;
    if ((st = grow((void **)&L->h, c * L->F1, sizeof(float)))) return st;
    if ((st = grow((void **)&L->a, c * L->F, sizeof(float)))) return st;
    L->recv_cap = cap;
    return MOE_OK;
}

/* Floats of one expert's parameters: w1, b1, w2, b2 rows. */
static size_t expert_floats(const moe_layer *L)
{
    return (size_t)L->F1 * L->d + L->F1 + (size_t)L->d * L->F + L->d;
}

/* The holders of every expert from a placement's slots (P, El), and the
 * experts with more than one copy. MOE_ERR_ARG on a broken placement. */
static moe_status place(moe_layer *L, const int *slots, int me)
{
    const int E = L->E, D = L->P * L->El;
    memset(L->holder_off, 0, sizeof(int) * ((size_t)E + 1));
    for (int d = 0; d < D; d++) {
        if (slots[d] < 0 || slots[d] >= E)
            return moe_errorf(MOE_ERR_ARG, "MoE layer: placement slot %d holds expert %d, outside [0, %d)", d,
                              slots[d], E);
        if (d % L->El && slots[d] <= slots[d - 1])
            return moe_errorf(MOE_ERR_ARG, "MoE layer: placement of rank %d not strictly ascending at slot %d",
                              d / L->El, d % L->El);
        L->holder_off[slots[d] + 1]++;
    }
    for (int e = 0; e < E; e++) {
        if (L->holder_off[e + 1] == 0)
            return moe_errorf(MOE_ERR_ARG, "MoE layer: the placement holds expert %d nowhere", e);
        L->n_rep += L->holder_off[e + 1] > 1;
        L->holder_off[e + 1] += L->holder_off[e];
    }
    int *cur = moe_calloc((size_t)E, sizeof(int)); /* next free holder of each expert */
    if (!cur) return moe_errorf(MOE_ERR_NOMEM, "MoE layer: placement");
    for (int e = 0; e < E; e++) cur[e] = L->holder_off[e];
    for (int d = 0; d < D; d++) L->holders[cur[slots[d]]++] = d; /* ascending destinations */
    moe_free(cur);
    if (L->n_rep == 0) return MOE_OK;
    L->rep_expert = moe_calloc((size_t)L->n_rep, sizeof(int));
    L->rep_slot = moe_calloc((size_t)L->n_rep, sizeof(int));
    L->rep_buf = moe_calloc((size_t)L->n_rep * expert_floats(L), sizeof(float));
    L->rep_prev = moe_calloc((size_t)L->n_rep * expert_floats(L), sizeof(float));
    if (!L->rep_expert || !L->rep_slot || !L->rep_buf || !L->rep_prev)
        return moe_errorf(MOE_ERR_NOMEM, "MoE layer: gradients of %d replicated experts", L->n_rep);
    for (int e = 0, k = 0; e < E; e++) {
        if (L->holder_off[e + 1] - L->holder_off[e] < 2) continue;
        L->rep_expert[k] = e;
        L->rep_slot[k] = -1;
        for (int j = 0; j < L->El; j++)
            if (slots[me * L->El + j] == e) L->rep_slot[k] = j;
        k++;
    }
    return MOE_OK;
}

moe_status moe_layer_create(moe_layer **out, const moe_layer_config *cfg, moe_comm *comm)
{
    *out = NULL;
    if (!comm) return moe_errorf(MOE_ERR_ARG, "MoE layer: no communicator (one process: moe_comm_create_self)");
    moe_status st = moe_router_config_check(&cfg->router);
    if (st) return st;
    if (cfg->d_ff < 1) return moe_errorf(MOE_ERR_ARG, "d_ff must be >= 1 (got %d)", cfg->d_ff);
    if (cfg->max_tokens < 1 || cfg->max_groups < 1)
        return moe_errorf(MOE_ERR_ARG, "max_tokens and max_groups must be >= 1 (got %d, %d)",
                          cfg->max_tokens, cfg->max_groups);
    if (cfg->chunks < 0) return moe_errorf(MOE_ERR_ARG, "chunks must be >= 1 (got %d)", cfg->chunks);
    int P = moe_comm_ep_size(comm);
    int E = cfg->router.n_experts;
    if (!cfg->slots && E % P != 0)
        return moe_errorf(MOE_ERR_ARG, "n_experts=%d is not divisible by the expert-parallel size %d", E, P);
    if (cfg->slots && (cfg->n_slots < 1 || (int64_t)cfg->n_slots * P < E || cfg->n_slots > E))
        return moe_errorf(MOE_ERR_ARG, "MoE layer: %d slots per rank for %d experts over %d ranks", cfg->n_slots, E, P);

    moe_layer *L = moe_calloc(1, sizeof *L);
    if (!L) return moe_errorf(MOE_ERR_NOMEM, "MoE layer: out of memory");
    L->cfg = *cfg;
    if (L->cfg.chunks < 1) L->cfg.chunks = 1;
    L->comm = comm;
    L->E = E;
    L->P = P;
    L->El = cfg->slots ? cfg->n_slots : E / P;
    L->cfg.slots = NULL; /* not kept: holders and local_ids are the copy */
    L->d = cfg->router.d_model;
    L->F = cfg->d_ff;
    L->F1 = moe_f1(cfg->d_ff, cfg->act);
    L->S = cfg->n_shared;
    L->Fs = cfg->d_ff_shared;
    L->F1s = moe_f1(cfg->d_ff_shared, cfg->act);
    if (cfg->n_shared < 0 || (cfg->n_shared > 0 && cfg->d_ff_shared < 1))
        st = moe_errorf(MOE_ERR_ARG, "MoE layer: n_shared=%d needs d_ff_shared >= 1 (got %d)", cfg->n_shared,
                        cfg->d_ff_shared);
    if (!st) st = moe_route_create(&L->route, &cfg->router, cfg->max_tokens, cfg->max_groups);
    if (!st) {
        const size_t T = (size_t)cfg->max_tokens, S = (size_t)(L->S > 0 ? L->S : 0), d = (size_t)L->d;
        L->expert_rows = moe_calloc((size_t)L->El, sizeof(int));
        L->dweight = moe_calloc(T * E, sizeof(float));
        L->tok_off = moe_calloc(T + 1, sizeof(int));
        L->holder_off = moe_calloc((size_t)E + 1, sizeof(int));
        L->holders = moe_calloc((size_t)P * L->El, sizeof(int));
        L->local_ids = moe_calloc((size_t)L->El, sizeof(int));
        if (!L->expert_rows || !L->dweight || !L->tok_off || !L->holder_off || !L->holders || !L->local_ids)
            st = moe_errorf(MOE_ERR_NOMEM, "MoE layer: out of memory");
        if (!st && S) {
            L->sh_h = moe_calloc(S * T * L->F1s, sizeof(float));
            L->sh_a = moe_calloc(S * T * L->Fs, sizeof(float));
            L->sh_out = moe_calloc(T * d, sizeof(float));
            L->sh_tmp = moe_calloc(T * d, sizeof(float));
            L->sh_dy = moe_calloc(T * d, sizeof(float));
            L->sh_gate = moe_calloc(T, sizeof(float));
            if (!L->sh_h || !L->sh_a || !L->sh_out || !L->sh_tmp || !L->sh_dy || !L->sh_gate)
                st = moe_errorf(MOE_ERR_NOMEM, "MoE layer: shared experts' activations (%zu floats)",
                                S * T * (size_t)(L->F1s + L->Fs));
        }
    }
    if (!st && !cfg->slots) {
        /* contiguous blocks: expert e is slot e % El of ep rank e / El,
         * i.e. destination e (docs/routing.md section 8) */
        for (int e = 0; e <= E; e++) L->holder_off[e] = e;
        for (int e = 0; e < E; e++) L->holders[e] = e;
    } else if (!st) {
        st = place(L, cfg->slots, moe_comm_ep_rank(comm));
    }
    if (!st) {
        for (int j = 0; j < L->El; j++) L->local_ids[j] = cfg->slots ? cfg->slots[moe_comm_ep_rank(comm) * L->El + j]
                                                                     : moe_comm_ep_rank(comm) * L->El + j;
        L->e0 = L->local_ids[0];
    }
    /* Collective: every ep rank creates its exchange even if a local step failed,
     * then all agree, so no rank is left inside a2a_create. */
    moe_status cst = moe_a2a_create(&L->a2a, comm, L->El, cfg->a2a, L->cfg.chunks);
    if (!st) st = cst;
    if (!st) {
        L->recv_bound = moe_layer_rows_bound(cfg, P, L->El);
        L->recv_most = recv_rows_most(cfg, P, L->El);
        moe_a2a_set_row_bounds(L->a2a, send_rows_bound(cfg), L->recv_bound);
    }
    st = moe_comm_agree(comm, st);
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
    moe_free(L->holder_off);
    moe_free(L->holders);
    moe_free(L->local_ids);
    moe_free(L->rep_expert);
    moe_free(L->rep_slot);
    moe_free(L->rep_buf);
    moe_free(L->rep_prev);
    moe_free(L->tok_off);
    moe_free(L->asg_dest);
    moe_free(L->asg_expert);
    moe_free(L->asg_w);
    moe_free(L->asg_dw);
    moe_free(L->h);
    moe_free(L->a);
    moe_free(L->dweight);
    moe_free(L->expert_rows);
    moe_free(L->sh_h);
    moe_free(L->sh_a);
    moe_free(L->sh_out);
    moe_free(L->sh_tmp);
    moe_free(L->sh_dy);
    moe_free(L->sh_gate);
    moe_free(L);
}

int64_t moe_layer_recv_rows_bound(const moe_layer *L) { return L->recv_bound; }

int moe_layer_expert0(const moe_layer *L) { return L->e0; }
int moe_layer_n_local_experts(const moe_layer *L) { return L->El; }
const int *moe_layer_local_experts(const moe_layer *L) { return L->local_ids; }
const moe_route *moe_layer_route(const moe_layer *L) { return L->route; }
const int *moe_layer_expert_rows(const moe_layer *L) { return L->expert_rows; }
const moe_layer_timing *moe_layer_get_timing(const moe_layer *L) { return &L->timing; }
void moe_layer_reset_timing(moe_layer *L) { memset(&L->timing, 0, sizeof L->timing); }
double moe_layer_expert_flops(const moe_layer *L) { return L->flops; }

double moe_layer_forward_param_bytes(const moe_layer *L, const moe_layer_params *p)
{
    double f = (double)L->E * L->d + (p->noise_w && L->route->noise ? (double)L->E * L->d : 0) +
               (p->expert_bias ? L->E : 0);
    const double expert = (double)L->F1 * L->d + (double)L->d * L->F + (p->experts.b1 ? L->F1 : 0) +
                          (p->experts.b2 ? L->d : 0);
    for (int j = 0; j < L->El; j++)
        if (L->expert_rows[j] > 0) f += expert;
    if (L->S > 0)
        f += L->S * ((double)L->F1s * L->d + (double)L->d * L->Fs + (p->shared.b1 ? L->F1s : 0) +
                     (p->shared.b2 ? L->d : 0)) +
             (p->shared_gate ? L->d : 0);
    return f * sizeof(float);
}
moe_a2a *moe_layer_exchange(moe_layer *L) { return L->a2a; }

/* Parameters of local experts [j0, ...). */
static moe_expert_params expert_view(const moe_expert_params *p, const moe_layer *L, int j0)
{
    moe_expert_params v = {
        .w1 = p->w1 + (size_t)j0 * L->F1 * L->d,
        .b1 = p->b1 ? p->b1 + (size_t)j0 * L->F1 : NULL,
        .w2 = p->w2 + (size_t)j0 * L->d * L->F,
        .b2 = p->b2 ? p->b2 + (size_t)j0 * L->d : NULL,
    };
    return v;
}

/* Parameters of shared expert j. */
static moe_expert_params shared_view(const moe_expert_params *p, const moe_layer *L, int j)
{
    moe_expert_params v = {
        .w1 = p->w1 + (size_t)j * L->F1s * L->d,
        .b1 = p->b1 ? p->b1 + (size_t)j * L->F1s : NULL,
        .w2 = p->w2 + (size_t)j * L->d * L->Fs,
        .b2 = p->b2 ? p->b2 + (size_t)j * L->d : NULL,
    };
    return v;
}

/* y += gate * sum_j FFN^shared_j(x) over the T tokens (routing.md section
 * 8): each shared expert runs as one expert whose rows are all tokens; with
 * own (moe_layer_forward_owned) only the owned rows, compacted into sh_dy
 * (the backward's scratch: no backward follows such a forward). */
static void shared_forward(moe_layer *L, float *y, const float *x, const moe_layer_params *p, const uint8_t *own)
{
    const int d = L->d;
    int T = L->T;
    const float *xs = x;
    if (own) {
        int n = 0;
        for (int t = 0; t < L->T; t++)
            if (own[t]) memcpy(L->sh_dy + (size_t)n++ * d, x + (size_t)t * d, (size_t)d * sizeof(float));
        T = n;
        xs = L->sh_dy;
    }
    if (T == 0) return;
    const int rows[2] = {0, T};
    for (int j = 0; j < L->S; j++) {
        const moe_expert_params v = shared_view(&p->shared, L, j);
        float *o = j == 0 ? L->sh_out : L->sh_tmp;
        moe_expert_forward(o, L->sh_h + (size_t)j * L->cfg.max_tokens * L->F1s,
                           L->sh_a + (size_t)j * L->cfg.max_tokens * L->Fs, xs, rows, &v, 1, d, L->Fs, L->cfg.act);
        if (j > 0)
            for (size_t i = 0; i < (size_t)T * d; i++) L->sh_out[i] += o[i];
    }
    for (int c = 0, t = 0; c < T; c++, t++) {
        while (own && !own[t]) t++; /* compact row c is the c-th owned token */
        const float *o = L->sh_out + (size_t)c * d;
        float *yt = y + (size_t)t * d;
        if (!L->cfg.shared_gate) {
            for (int i = 0; i < d; i++) yt[i] += o[i];
            continue;
        }
        const float *xt = xs + (size_t)c * d;
        float z = 0.0f;
        for (int i = 0; i < d; i++) z += p->shared_gate[i] * xt[i];
        const float gt = 1.0f / (1.0f + expf(-z));
        L->sh_gate[c] = gt;
        for (int i = 0; i < d; i++) yt[i] += gt * o[i];
    }
}

/* The shared experts' backward: dx += their input gradient; their weights'
 * and the gate's gradients accumulate into g. */
static void shared_backward(moe_layer *L, float *dx, moe_layer_params *g, const float *dy, const float *x,
                            const moe_layer_params *p)
{
    const int T = L->T, d = L->d;
    const int rows[2] = {0, T};
    /* gate: y += g_t o_t, g_t = sigmoid(z_t), z_t = w_sg . x_t */
    for (int t = 0; t < T; t++) {
        const float *dyt = dy + (size_t)t * d, *o = L->sh_out + (size_t)t * d;
        float *dst = L->sh_dy + (size_t)t * d;
        if (!L->cfg.shared_gate) {
            memcpy(dst, dyt, (size_t)d * sizeof(float));
            continue;
        }
        const float gt = L->sh_gate[t];
        float dg = 0.0f;
        for (int i = 0; i < d; i++) {
            dg += dyt[i] * o[i];
            dst[i] = gt * dyt[i];
        }
        const float dz = dg * gt * (1.0f - gt);
        const float *xt = x + (size_t)t * d;
        float *dxt = dx + (size_t)t * d;
        for (int i = 0; i < d; i++) {
            g->shared_gate[i] += dz * xt[i];
            dxt[i] += dz * p->shared_gate[i];
        }
    }
    for (int j = 0; j < L->S; j++) {
        const moe_expert_params v = shared_view(&p->shared, L, j);
        moe_expert_params gv = shared_view(&g->shared, L, j);
        float *h = L->sh_h + (size_t)j * L->cfg.max_tokens * L->F1s, *a = L->sh_a + (size_t)j * L->cfg.max_tokens * L->Fs;
        /* in place over the activations (dead after this) */
        moe_expert_backward(L->sh_tmp, &gv, h, a, L->sh_dy, x, h, a, rows, &v, 1, d, L->Fs, L->cfg.act);
        for (size_t i = 0; i < (size_t)T * d; i++) dx[i] += L->sh_tmp[i];
    }
}

/* The routing of the last route: per token, its kept assignments in
 * ascending expert order, each with the exchange destination of the copy
 * of its expert that serves this token (the copy is chosen by the token's
 * index: deterministic, and spreading a replicated expert's tokens evenly). */
static moe_status build_routing(moe_layer *L, const uint8_t *own)
{
    const moe_route *r = L->route;
    const int T = L->T, E = L->E;
    int n = 0;
    for (int g = 0; g < L->G; g++)
        for (int e = 0; e < E; e++) n += r->n_kept[(size_t)g * E + e];
    moe_status st = grow_asg(L, n);
    if (st) return st;
    int i = 0;
    for (int t = 0; t < T; t++) {
        L->tok_off[t] = i;
        const uint8_t *kt = r->kept + (size_t)t * E;
        const float *wt = r->weight + (size_t)t * E;
        if (own && !own[t]) continue; /* another rank of the ep group sends it */
        for (int e = 0; e < E && i < n; e++) {
            if (!kt[e]) continue;
            const int c = L->holder_off[e + 1] - L->holder_off[e];
            L->asg_dest[i] = L->holders[L->holder_off[e] + t % c];
            L->asg_expert[i] = e;
            L->asg_w[i] = wt[e];
            i++;
        }
    }
    L->tok_off[T] = i;
    L->n_asg = i;
    return MOE_OK;
}

typedef struct {
    moe_layer *L;
    const moe_layer_params *p;
    moe_layer_params *g;
    const float *x_rows;     /* backward: the forward's expert inputs (receive layout) */
} compute_ctx;

static moe_status fwd_compute(void *vctx, int j0, int j1, const float *x_rows, float *y_rows)
{
    compute_ctx *c = vctx;
    moe_layer *L = c->L;
    if (j1 <= j0) return MOE_OK;
    moe_expert_params v = expert_view(&c->p->experts, L, j0);
    moe_expert_forward(y_rows, L->h, L->a, x_rows, moe_a2a_recv_expert_offsets(L->a2a) + j0, &v, j1 - j0,
                       L->d, L->F, L->cfg.act);
    return MOE_OK;
}

/* dy rows in, dx rows out (possibly the same buffer: the expert backward
 * works in place). */
static moe_status bwd_compute(void *vctx, int j0, int j1, const float *dy_rows, float *dx_rows)
{
    compute_ctx *c = vctx;
    moe_layer *L = c->L;
    if (j1 <= j0) return MOE_OK;
    moe_expert_params v = expert_view(&c->p->experts, L, j0);
    moe_expert_params gv = expert_view(&c->g->experts, L, j0);
    moe_expert_backward(dx_rows, &gv, L->h, L->a, dy_rows, c->x_rows, L->h, L->a,
                        moe_a2a_recv_expert_offsets(L->a2a) + j0, &v, j1 - j0, L->d, L->F, L->cfg.act);
    return MOE_OK;
}

static double gemm_flops(const moe_layer *L, int rows)
{
    /* forward: x W1^T and a W2^T */
    return 2.0 * rows * L->d * (double)L->F1 + 2.0 * rows * L->F * (double)L->d;
}

static moe_status forward(moe_layer *L, float *y, const float *x, const moe_layer_params *p, int T, int G,
                          const moe_noise_key *noise, const uint8_t *own)
{
    moe_status st = MOE_OK;
    const double t0 = moe_now();
    L->fwd_ok = 0;
    if (T < 1 || G < 1 || T > L->cfg.max_tokens || G > L->cfg.max_groups || T % G != 0)
        st = moe_errorf(MOE_ERR_ARG, "MoE layer: bad sizes T=%d G=%d (T must be a positive multiple "
                        "of G, T <= %d, G <= %d)", T, G, L->cfg.max_tokens, L->cfg.max_groups);
    if (!st) {
        L->T = T;
        L->G = G;
        st = moe_router_forward(L->route, x, p->router_w, p->noise_w, p->expert_bias, &L->cfg.router, T, G, noise);
    }
    const double t1 = moe_now();
    if (!st) st = build_routing(L, own);
    if (!st && moe_fault("layer_alloc", moe_comm_rank(L->comm)))
        st = moe_errorf(MOE_ERR_NOMEM, "MoE layer: injected allocation failure (MOE_FAULT=layer_alloc)");
    const double t2 = moe_now();

    /* The plan's count exchange carries the status: a failure anywhere
     * stops every rank here instead of in a later payload exchange. */
    const moe_a2a_routing routing = {.n_tokens = st ? 0 : T, .tok_off = L->tok_off, .dest = L->asg_dest,
                                     .weight = L->asg_w};
    st = moe_a2a_plan(L->a2a, &routing, st, L->d);
    if (st) return st;
    const double t3 = moe_now();
    L->n_recv = moe_a2a_recv_total(L->a2a);
    /* A failure here rides into the exchange, which agrees over the ep group. */
    const moe_status local = grow_recv(L, L->n_recv);
    /* Test hook: this rank stops answering between the count exchange and
     * the payload (a hung process, or one whose node was cut off); its ep
     * peers wait in the exchange until the comm_timeout watchdog ends the job. */
    if (moe_fault("stall", moe_comm_rank(L->comm)))
        for (;;) pause();
    /* Test hook: a slow but live rank (its peers wait, each time less than
     * comm_timeout). */
    const int slow_ms = moe_fault_ms("slow", moe_comm_rank(L->comm));
    if (slow_ms > 0) usleep((useconds_t)slow_ms * 1000u);
    const int *off = moe_a2a_recv_expert_offsets(L->a2a);
    for (int j = 0; j < L->El; j++) L->expert_rows[j] = off[j + 1] - off[j];
    L->flops = 3.0 * gemm_flops(L, L->n_recv);

    /* Pack, exchange, experts, return and the combine in ascending expert
     * order per token (the exchange's job, whatever its kind). */
    compute_ctx ctx = {L, p, NULL, NULL};
    st = moe_a2a_forward(L->a2a, y, x, L->d, fwd_compute, &ctx, local);
    const moe_a2a_times xt = moe_a2a_last_times(L->a2a);
    if (st) return st;
    /* The shared experts: dense, at home, on every token (not through the exchange). */
    const double t5 = moe_now();
    if (L->S > 0) shared_forward(L, y, x, p, own);
    L->timing.shared += moe_now() - t5;
    L->timing.route += t1 - t0;
    L->timing.pack += (t2 - t1) + xt.pack;
    L->timing.dispatch += (t3 - t2) + xt.dispatch;
    L->timing.expert_fwd += xt.compute;
    L->timing.ret += xt.ret;
    L->timing.combine += xt.combine;
    L->fwd_ok = own == NULL; /* a backward needs every row's routing sent */
    return MOE_OK;
}

moe_status moe_layer_forward(moe_layer *L, float *y, const float *x, const moe_layer_params *p,
                             int T, int G, const moe_noise_key *noise)
{
    return forward(L, y, x, p, T, G, noise, NULL);
}

moe_status moe_layer_forward_owned(moe_layer *L, float *y, const float *x, const moe_layer_params *p, int T,
                                   const uint8_t *own)
{
    return forward(L, y, x, p, T, 1, NULL, own);
}

/* Copies the gradient rows of local slot j to (dir 0) or from (dir 1) buf,
 * in the order w1, b1, w2, b2. */
static void rep_copy(const moe_layer *L, moe_expert_params *g, int j, float *buf, int dir)
{
    const size_t w1 = (size_t)L->F1 * L->d, w2 = (size_t)L->d * L->F;
    struct { float *p; size_t n; } part[4] = {{g->w1 + j * w1, w1}, {g->b1 ? g->b1 + (size_t)j * L->F1 : NULL, L->F1},
                                              {g->w2 + j * w2, w2}, {g->b2 ? g->b2 + (size_t)j * L->d : NULL, L->d}};
    for (int i = 0; i < 4; buf += part[i].n, i++) {
        if (!part[i].p) continue;
        if (dir == 0) memcpy(buf, part[i].p, part[i].n * sizeof(float));
        else memcpy(part[i].p, buf, part[i].n * sizeof(float));
    }
}

/* Before the expert backward: the replicated experts' accumulated gradients
 * move aside (rep_prev) and their rows start from zero, so that the sum
 * over copies adds this backward's contributions only. */
static void rep_stash(moe_layer *L, moe_layer_params *g)
{
    const size_t n = expert_floats(L);
    for (int k = 0; k < L->n_rep; k++) {
        const int j = L->rep_slot[k];
        if (j < 0) continue;
        rep_copy(L, &g->experts, j, L->rep_prev + k * n, 0);
        float *z = L->rep_buf + k * n;
        memset(z, 0, n * sizeof(float));
        rep_copy(L, &g->experts, j, z, 1);
    }
}

/* After it: each replicated expert's contribution summed over its copies
 * (the same bits on each: moe_comm_sum_same_f32), plus what its rows held
 * before (equal on every copy by the same rule). Collective over the ep
 * group. */
static moe_status rep_sum(moe_layer *L, moe_layer_params *g)
{
    const size_t n = expert_floats(L);
    memset(L->rep_buf, 0, (size_t)L->n_rep * n * sizeof(float));
    for (int k = 0; k < L->n_rep; k++)
        if (L->rep_slot[k] >= 0) rep_copy(L, &g->experts, L->rep_slot[k], L->rep_buf + k * n, 0);
    moe_status st = moe_comm_sum_same_f32(L->comm, MOE_SCOPE_EP, L->rep_buf, (size_t)L->n_rep * n);
    if (st) return st;
    for (int k = 0; k < L->n_rep; k++) {
        if (L->rep_slot[k] < 0) continue;
        float *b = L->rep_buf + k * n;
        const float *prev = L->rep_prev + k * n;
        for (size_t i = 0; i < n; i++) b[i] += prev[i];
        rep_copy(L, &g->experts, L->rep_slot[k], b, 1);
    }
    return MOE_OK;
}

moe_status moe_layer_backward(moe_layer *L, float *dx, moe_layer_params *grads, const float *dy,
                              const float *x, const moe_layer_params *p, float lb_scale,
                              float z_scale)
{
    if (!L->fwd_ok) return moe_errorf(MOE_ERR_ARG, "MoE layer: backward without a successful forward");
    const int T = L->T, E = L->E, d = L->d;
    moe_a2a_buffers fb;
    moe_status st = moe_a2a_buffers_get(L->a2a, MOE_A2A_FORWARD, &fb);
    if (st) return st; /* no plan: the same on every rank */
    /* The exchange forms dL/dg of every assignment and the rows g * dy, runs
     * the expert backward on them (which reads the forward's receive rows)
     * and brings the dx rows home. */
    compute_ctx ctx = {L, p, grads, fb.recv};
    if (L->n_rep) rep_stash(L, grads);
    st = moe_a2a_backward(L->a2a, L->asg_dw, dy, d, bwd_compute, &ctx, MOE_OK);
    const moe_a2a_times xt = moe_a2a_last_times(L->a2a);
    if (st) return st;
    const double t0 = moe_now();
    memset(L->dweight, 0, sizeof(float) * (size_t)T * E);
    for (int t = 0; t < T; t++)
        for (int i = L->tok_off[t]; i < L->tok_off[t + 1]; i++) L->dweight[(size_t)t * E + L->asg_expert[i]] = L->asg_dw[i];
    st = moe_router_backward(dx, grads->router_w, grads->noise_w, L->dweight, L->route, x,
                             p->router_w, p->noise_w, &L->cfg.router, lb_scale, z_scale);
    const double t1 = moe_now();
    if (st) return st; /* purely local: a failure here is an argument error on every rank alike */
    /* dx[t] += its experts' rows, in expert order, after the router's part. */
    moe_a2a_backward_add(L->a2a, dx, d);
    const double t2 = moe_now();
    if (L->S > 0) shared_backward(L, dx, grads, dy, x, p); /* dense, at home */
    L->timing.bwd_shared += moe_now() - t2;
    /* every rank of the ep group gets here (the failures above are agreed
     * or the same everywhere), so the copies' sum is entered by all */
    if (L->n_rep && (st = rep_sum(L, grads))) return st;
    L->timing.bwd_gate_grad += xt.pack;
    L->timing.bwd_router += t1 - t0;
    L->timing.bwd_dispatch += xt.dispatch;
    L->timing.expert_bwd += xt.compute;
    L->timing.bwd_return += xt.ret;
    L->timing.bwd_unpack += t2 - t1;
    L->fwd_ok = 0;
    return MOE_OK;
}

moe_status moe_layer_sync_copies(moe_layer *L, moe_layer_params *grads)
{
    if (!L->n_rep) return MOE_OK; /* the same on every rank: the placement is */
    const size_t n = expert_floats(L);
    memset(L->rep_buf, 0, (size_t)L->n_rep * n * sizeof(float));
    const int me = moe_comm_ep_rank(L->comm);
    for (int k = 0; k < L->n_rep; k++) {
        const int e = L->rep_expert[k];
        /* the primary copy (lowest destination = lowest ep rank) contributes, the others add zeros */
        if (L->rep_slot[k] >= 0 && L->holders[L->holder_off[e]] / L->El == me)
            rep_copy(L, &grads->experts, L->rep_slot[k], L->rep_buf + k * n, 0);
    }
    moe_status st = moe_comm_sum_same_f32(L->comm, MOE_SCOPE_EP, L->rep_buf, (size_t)L->n_rep * n);
    if (st) return st;
    for (int k = 0; k < L->n_rep; k++)
        if (L->rep_slot[k] >= 0) rep_copy(L, &grads->experts, L->rep_slot[k], L->rep_buf + k * n, 1);
    return MOE_OK;
}

moe_status moe_layer_reduce_grads(moe_layer *L, moe_layer_params *grads)
{
    size_t Ed = (size_t)L->E * L->d;
    moe_status st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->router_w, Ed);
    if (!st && grads->noise_w) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->noise_w, Ed);
    if (L->S > 0) { /* shared experts are dense: every rank's tokens */
        const size_t S = (size_t)L->S, d = (size_t)L->d;
        if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->shared.w1, S * L->F1s * d);
        if (!st && grads->shared.b1) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->shared.b1, S * L->F1s);
        if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->shared.w2, S * d * L->Fs);
        if (!st && grads->shared.b2) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->shared.b2, S * d);
        if (!st && grads->shared_gate) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_WORLD, grads->shared_gate, d);
    }
    if (st || moe_comm_n_replicas(L->comm) == 1) return st;
    size_t El = (size_t)L->El;
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.w1, El * L->F1 * L->d);
    if (!st && grads->experts.b1) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.b1, El * L->F1);
    if (!st) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.w2, El * L->d * L->F);
    if (!st && grads->experts.b2) st = moe_comm_allreduce_f32(L->comm, MOE_SCOPE_REPLICA, grads->experts.b2, El * L->d);
    if (!st) st = moe_layer_sync_copies(L, grads);
    return st;
}
