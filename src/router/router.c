/* The router (docs/routing.md sections 1, 2, 3, 5, 6): gate logits with
 * optional Shazeer noise, softmax, token-choice / expert-choice assignment
 * with capacity per routing group, load-balance and z losses, and the
 * backward into x, W_g and W_n. Purely local, no allocation after create. */
#include "router/router.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "core/gemm.h"
#include "core/par.h"
#include "core/rng.h"

/* The public record plus what only the router needs. pub comes first, so a
 * moe_route * handed out is a pointer to this. */
typedef struct {
    moe_route pub;
    moe_router_kind kind;
    int d;
    float *noise_buf;     /* (T_max, E) noise draws; pub.noise points here only after a noisy forward */
    float *noise_pre_buf; /* (T_max, E) W_n x, likewise */
    int *ec_idx;          /* (E, T_max) expert choice: tokens taken by each expert, best first */
    uint64_t *ec_work;    /* (2 T_max) expert choice: moe_topk_cols_ws workspace */
    float *dl;            /* (T_max, E) backward scratch: dL/dlogits */
    float *dpre;          /* (T_max, E) backward scratch: dL/d(W_n x), with noise */
    float *sel_buf;       /* (T_max, E) s + b with groups masked; pub.sel points here when used */
    int *seq_sel;         /* (E) aux = seq: selections of one sequence */
} moe_route_impl;

/* Option fields as used (a zeroed field means the default). */
static double route_scale(const moe_router_config *c) { return c->route_scale > 0 ? c->route_scale : 1.0; }
static int n_groups(const moe_router_config *c) { return c->n_groups > 1 ? c->n_groups : 1; }
static int topk_groups(const moe_router_config *c)
{
    return c->topk_groups > 0 && c->topk_groups < n_groups(c) ? c->topk_groups : n_groups(c);
}
static int group_seqs(const moe_router_config *c) { return c->group_seqs > 1 ? c->group_seqs : 1; }
/* Token choice ranks s + b or a group-limited score: a buffer of its own. */
static int own_sel(const moe_router_config *c)
{
    return c->kind == MOE_ROUTER_TOKEN_CHOICE && (c->expert_bias || topk_groups(c) < n_groups(c));
}

moe_status moe_router_config_check(const moe_router_config *cfg)
{
    if (!cfg) return moe_errorf(MOE_ERR_ARG, "router: config is NULL");
    if (cfg->n_experts < 1) return moe_errorf(MOE_ERR_ARG, "router: n_experts=%d must be >= 1", cfg->n_experts);
    if (cfg->d_model < 1) return moe_errorf(MOE_ERR_ARG, "router: d_model=%d must be >= 1", cfg->d_model);
    if (!isfinite(cfg->capacity_factor))
        return moe_errorf(MOE_ERR_ARG, "router: capacity_factor=%g is not finite", cfg->capacity_factor);
    if (cfg->normalize_topk != 0 && cfg->normalize_topk != 1)
        return moe_errorf(MOE_ERR_ARG, "router: normalize_topk=%d must be 0 or 1", cfg->normalize_topk);
    if (cfg->noise != 0 && cfg->noise != 1)
        return moe_errorf(MOE_ERR_ARG, "router: noise=%d must be 0 (none) or 1 (gaussian)", cfg->noise);
    if (cfg->score != MOE_SCORE_SOFTMAX && cfg->score != MOE_SCORE_SIGMOID)
        return moe_errorf(MOE_ERR_ARG, "router: unknown score %d", (int)cfg->score);
    if (cfg->aux != MOE_AUX_SWITCH && cfg->aux != MOE_AUX_SEQ && cfg->aux != MOE_AUX_NONE)
        return moe_errorf(MOE_ERR_ARG, "router: unknown aux loss %d", (int)cfg->aux);
    if (!(cfg->route_scale >= 0) || !isfinite(cfg->route_scale))
        return moe_errorf(MOE_ERR_ARG, "router: route_scale=%g must be finite and > 0", cfg->route_scale);
    if (cfg->n_groups < 0 || cfg->topk_groups < 0 || cfg->group_seqs < 0)
        return moe_errorf(MOE_ERR_ARG, "router: n_groups=%d, topk_groups=%d, group_seqs=%d must be >= 0",
                          cfg->n_groups, cfg->topk_groups, cfg->group_seqs);
    /* topk_groups >= n_groups would route as unlimited; a larger value is a
     * mistake (a checkpoint or a bench option), said as such */
    if (cfg->topk_groups > n_groups(cfg))
        return moe_errorf(MOE_ERR_ARG, "router: topk_groups=%d exceeds n_groups=%d", cfg->topk_groups,
                          n_groups(cfg));
    if (cfg->n_experts % n_groups(cfg))
        return moe_errorf(MOE_ERR_ARG, "router: n_groups=%d does not divide n_experts=%d", cfg->n_groups,
                          cfg->n_experts);
    if (cfg->kind == MOE_ROUTER_EXPERT_CHOICE && (cfg->expert_bias || n_groups(cfg) > 1))
        return moe_errorf(MOE_ERR_ARG, "router: expert_bias and n_groups need token choice");

    switch (cfg->kind) {
    case MOE_ROUTER_TOKEN_CHOICE:
        if (cfg->top_k < 1) return moe_errorf(MOE_ERR_ARG, "router: top_k=%d must be >= 1", cfg->top_k);
        if (cfg->top_k > cfg->n_experts)
            return moe_errorf(MOE_ERR_ARG, "router: top_k=%d exceeds n_experts=%d", cfg->top_k, cfg->n_experts);
        if (cfg->top_k > topk_groups(cfg) * (cfg->n_experts / n_groups(cfg)))
            return moe_errorf(MOE_ERR_ARG, "router: top_k=%d exceeds the %d experts of topk_groups=%d groups",
                              cfg->top_k, topk_groups(cfg) * (cfg->n_experts / n_groups(cfg)), topk_groups(cfg));
        return MOE_OK;
    case MOE_ROUTER_EXPERT_CHOICE:
        if (!(cfg->capacity_factor > 0))
            return moe_errorf(MOE_ERR_ARG,
                              "router: capacity_factor=%g must be > 0 for expert_choice "
                              "(it is the average number of experts per token)",
                              cfg->capacity_factor);
        return MOE_OK;
    }
    return moe_errorf(MOE_ERR_ARG, "router: unknown router kind %d", (int)cfg->kind);
}

/* T >= 1 and a checked config. Absurd factors saturate at INT32_MAX rather
 * than overflow the conversion (any C >= T means no drops anyway). */
int64_t moe_router_capacity(const moe_router_config *cfg, int T)
{
    const double E = cfg->n_experts;
    double x;
    if (cfg->kind == MOE_ROUTER_EXPERT_CHOICE) {
        x = (double)T * cfg->capacity_factor / E;
    } else {
        if (cfg->capacity_factor <= 0) return -1;
        x = (double)cfg->top_k * (double)T * cfg->capacity_factor / E;
    }
    int64_t c = x >= (double)INT32_MAX ? INT32_MAX : moe_ceil_tol(x);
    if (cfg->kind == MOE_ROUTER_EXPERT_CHOICE && c > T) c = T;
    return c;
}

void moe_route_destroy(moe_route *r)
{
    if (!r) return;
    moe_route_impl *m = (moe_route_impl *)r;
    moe_free(r->logits);
    moe_free(r->probs);
    moe_free(r->weight);
    moe_free(r->selected);
    moe_free(r->kept);
    moe_free(r->topk);
    moe_free(r->topk_sum);
    moe_free(r->lse);
    moe_free(r->n_selected);
    moe_free(r->n_kept);
    moe_free(r->n_dropped);
    moe_free(r->load_balance);
    moe_free(r->z_loss);
    moe_free(m->noise_buf);
    moe_free(m->noise_pre_buf);
    moe_free(m->ec_idx);
    moe_free(m->ec_work);
    moe_free(m->dl);
    moe_free(m->dpre);
    moe_free(m->sel_buf);
    moe_free(m->seq_sel);
    moe_free(m);
}

moe_status moe_route_create(moe_route **out, const moe_router_config *cfg, int T_max, int G_max)
{
    if (!out) return moe_errorf(MOE_ERR_ARG, "router: out is NULL");
    *out = NULL;
    moe_status st = moe_router_config_check(cfg);
    if (st != MOE_OK) return st;
    if (T_max < 1) return moe_errorf(MOE_ERR_ARG, "router: T_max=%d must be >= 1", T_max);
    if (G_max < 1) return moe_errorf(MOE_ERR_ARG, "router: G_max=%d must be >= 1", G_max);
    moe_route_impl *m = moe_calloc(1, sizeof *m);
    if (!m) return moe_errorf(MOE_ERR_NOMEM, "router: cannot allocate the route");
    moe_route *r = &m->pub;
    const size_t E = (size_t)cfg->n_experts, T = (size_t)T_max, G = (size_t)G_max;
    const int k = cfg->kind == MOE_ROUTER_TOKEN_CHOICE ? cfg->top_k : 0;
    r->E = cfg->n_experts;
    r->k = k;
    r->T_max = T_max;
    r->G_max = G_max;
    m->kind = cfg->kind;
    m->d = cfg->d_model;
    r->logits = moe_calloc(T * E, sizeof(float));
    r->probs = moe_calloc(T * E, sizeof(float));
    r->weight = moe_calloc(T * E, sizeof(float));
    r->selected = moe_calloc(T * E, sizeof(uint8_t));
    r->kept = moe_calloc(T * E, sizeof(uint8_t));
    r->topk = moe_calloc(T * (size_t)k, sizeof(int));
    r->topk_sum = moe_calloc(T, sizeof(float));
    r->lse = moe_calloc(T, sizeof(float));
    r->n_selected = moe_calloc(G * E, sizeof(int));
    r->n_kept = moe_calloc(G * E, sizeof(int));
    r->n_dropped = moe_calloc(G * E, sizeof(int));
    r->load_balance = moe_calloc(G, sizeof(float));
    r->z_loss = moe_calloc(G, sizeof(float));
    const int ec = cfg->kind == MOE_ROUTER_EXPERT_CHOICE;
    m->ec_idx = moe_calloc(ec ? E * T : 0, sizeof(int));
    m->ec_work = moe_calloc(ec ? 2 * T : 0, sizeof(uint64_t));
    m->dl = moe_calloc(T * E, sizeof(float));
    m->sel_buf = moe_calloc(own_sel(cfg) ? T * E : 0, sizeof(float));
    m->seq_sel = moe_calloc(E, sizeof(int));
    r->sel = own_sel(cfg) ? m->sel_buf : r->probs;
    int ok = r->logits && r->probs && r->weight && r->selected && r->kept && r->topk && r->topk_sum &&
             r->lse && r->n_selected && r->n_kept && r->n_dropped && r->load_balance && r->z_loss &&
             m->ec_idx && m->ec_work && m->dl && m->sel_buf && m->seq_sel;
    if (cfg->noise) {
        m->noise_buf = moe_calloc(T * E, sizeof(float));
        m->noise_pre_buf = moe_calloc(T * E, sizeof(float));
        m->dpre = moe_calloc(T * E, sizeof(float));
        ok = ok && m->noise_buf && m->noise_pre_buf && m->dpre;
    }
    if (!ok) {
        moe_route_destroy(r);
        return moe_errorf(MOE_ERR_NOMEM, "router: cannot allocate a route for T_max=%d, E=%d", T_max, r->E);
    }
    *out = r;
    return MOE_OK;
}

/* The forward's and backward's cfg must describe the route's shape. */
static moe_status route_matches(const moe_route_impl *m, const moe_router_config *cfg)
{
    moe_status st = moe_router_config_check(cfg);
    if (st != MOE_OK) return st;
    if (cfg->kind != m->kind)
        return moe_errorf(MOE_ERR_ARG, "router: kind %s differs from the route's %s",
                          moe_router_kind_str(cfg->kind), moe_router_kind_str(m->kind));
    if (cfg->n_experts != m->pub.E || cfg->d_model != m->d)
        return moe_errorf(MOE_ERR_ARG, "router: n_experts=%d, d_model=%d differ from the route's %d, %d",
                          cfg->n_experts, cfg->d_model, m->pub.E, m->d);
    if (cfg->kind == MOE_ROUTER_TOKEN_CHOICE && cfg->top_k != m->pub.k)
        return moe_errorf(MOE_ERR_ARG, "router: top_k=%d differs from the route's %d", cfg->top_k, m->pub.k);
    if (own_sel(cfg) != (m->pub.sel != m->pub.probs))
        return moe_errorf(MOE_ERR_ARG, "router: expert_bias / group limits differ from the route's");
    return MOE_OK;
}

/* Finite check on the bit pattern (exponent all ones): an integer OR
 * reduction vectorizes, unlike moe_all_finite's float-add chain, and this
 * runs on every forward. */
static int router_all_finite(const float *a, size_t n)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, a + i, sizeof u);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

static inline float softplusf(float z) { return z > 0 ? z + log1pf(expf(-z)) : log1pf(expf(z)); }
static inline float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

/* Selections of each expert by the tokens [t0, t0 + n) into m->seq_sel. */
static void count_selected(moe_route_impl *m, int t0, int n)
{
    const moe_route *r = &m->pub;
    memset(m->seq_sel, 0, (size_t)r->E * sizeof(int));
    for (int t = t0; t < t0 + n; t++)
        for (int e = 0; e < r->E; e++) m->seq_sel[e] += r->selected[(size_t)t * r->E + e];
}

/* s of token t normalised to sum 1 (softmax scores already do). */
static inline float seq_share(const moe_route *r, const moe_router_config *cfg, int t, int e, float inv_sum)
{
    return cfg->score == MOE_SCORE_SOFTMAX ? r->probs[(size_t)t * r->E + e] : r->probs[(size_t)t * r->E + e] * inv_sum;
}

static inline float score_inv_sum(const moe_route *r, int t)
{
    float s = 0.0f;
    for (int e = 0; e < r->E; e++) s += r->probs[(size_t)t * r->E + e];
    return 1.0f / s;
}

/* aux = seq (routing.md section 8): the switch formula per sequence of the
 * group, P_e from s normalised to sum 1 per token, averaged over sequences. */
static float seq_balance(moe_route_impl *m, const moe_router_config *cfg, int t0, int Tg)
{
    const moe_route *r = &m->pub;
    const int E = r->E, k = r->k, Q = group_seqs(cfg), Ts = Tg / Q;
    double total = 0.0;
    for (int q = 0; q < Q; q++) {
        const int s0 = t0 + q * Ts;
        count_selected(m, s0, Ts);
        double acc = 0.0;
        for (int t = s0; t < s0 + Ts; t++) {
            const float inv = cfg->score == MOE_SCORE_SOFTMAX ? 1.0f : score_inv_sum(r, t);
            float row = 0.0f;
            for (int e = 0; e < E; e++) row += (float)m->seq_sel[e] * seq_share(r, cfg, t, e, inv);
            acc += row;
        }
        total += acc * E / ((double)Ts * Ts * k);
    }
    return (float)(total / Q);
}

/* Token choice for one group of Tg tokens starting at t0 (docs/routing.md section 3):
 * choice rank outer, token inner, so all first choices are served first. */
static void assign_token_choice(moe_route_impl *m, const moe_router_config *cfg, int t0, int Tg, int g)
{
    moe_route *r = &m->pub;
    const int E = r->E, k = r->k;
    const int64_t C = moe_router_capacity(cfg, Tg);
    const int normalize = cfg->normalize_topk && k > 1;
    const float scale = (float)route_scale(cfg);
    int *ns = r->n_selected + (size_t)g * E, *nk = r->n_kept + (size_t)g * E, *nd = r->n_dropped + (size_t)g * E;
    for (int t = t0; t < t0 + Tg; t++) {
        float s = 0.0f;
        for (int c = 0; c < k; c++) s += r->probs[(size_t)t * E + r->topk[(size_t)t * k + c]];
        r->topk_sum[t] = s;
    }
    for (int c = 0; c < k; c++) {
        for (int t = t0; t < t0 + Tg; t++) {
            const int e = r->topk[(size_t)t * k + c];
            const size_t te = (size_t)t * E + e;
            r->selected[te] = 1;
            ns[e]++;
            if (C < 0 || nk[e] < C) {
                r->kept[te] = 1;
                r->weight[te] = normalize ? r->probs[te] / r->topk_sum[t] : r->probs[te];
                if (scale != 1.0f) r->weight[te] *= scale;
                nk[e]++;
            } else {
                nd[e]++;
            }
        }
    }
    if (cfg->aux == MOE_AUX_NONE) {
        r->load_balance[g] = 0.0f;
        return;
    }
    if (cfg->aux == MOE_AUX_SEQ) {
        r->load_balance[g] = seq_balance(m, cfg, t0, Tg);
        return;
    }
    /* L_bal = E sum_e f_e P_e = E / (Tg^2 k) * sum_t sum_e n_sel[e] p[t,e]. */
    double acc = 0.0;
    for (int t = t0; t < t0 + Tg; t++) {
        float row = 0.0f; /* per-token partial sum: keeps the double chain T long, not T*E */
        for (int e = 0; e < E; e++) row += (float)ns[e] * r->probs[(size_t)t * E + e];
        acc += row;
    }
    r->load_balance[g] = (float)(acc * E / ((double)Tg * Tg * k));
}

/* Expert choice for one group (docs/routing.md section 4): each expert takes its top-C
 * tokens of the group's (Tg, E) probability block. */
static void assign_expert_choice(moe_route_impl *m, const moe_router_config *cfg, int t0, int Tg, int g)
{
    moe_route *r = &m->pub;
    const float scale = (float)route_scale(cfg);
    const int E = r->E;
    const int C = (int)moe_router_capacity(cfg, Tg);
    int *ns = r->n_selected + (size_t)g * E, *nk = r->n_kept + (size_t)g * E;
    if (C > 0) moe_topk_cols_ws(m->ec_idx, r->probs + (size_t)t0 * E, Tg, E, C, m->ec_work);
    for (int e = 0; e < E; e++) {
        for (int c = 0; c < C; c++) {
            const size_t te = (size_t)(t0 + m->ec_idx[(size_t)e * C + c]) * E + e;
            r->selected[te] = r->kept[te] = 1;
            r->weight[te] = r->probs[te];
            if (scale != 1.0f) r->weight[te] *= scale;
        }
        ns[e] = nk[e] = C;
    }
    r->load_balance[g] = 0.0f;
}

/* The ranking of token choice with an expert bias or group limits, into
 * r->sel: s + b, and -inf for the experts of groups a token does not keep
 * (a group's score: the sum of its two largest s + b, its largest when it
 * has one expert; the topk_groups best groups kept, ties to the lower
 * index). */
static void selection_scores(moe_route *r, const float *bias, const moe_router_config *cfg, int T)
{
    const int E = r->E, NG = n_groups(cfg), M = topk_groups(cfg), gs = E / NG;
    float gscore[NG];
    uint8_t keep[NG];
    for (int t = 0; t < T; t++) {
        float *v = r->sel + (size_t)t * E;
        const float *p = r->probs + (size_t)t * E;
        for (int e = 0; e < E; e++) v[e] = cfg->expert_bias ? p[e] + bias[e] : p[e];
        if (M >= NG) continue;
        for (int q = 0; q < NG; q++) {
            float a = -INFINITY, b = -INFINITY; /* the two largest of the group */
            for (int e = q * gs; e < (q + 1) * gs; e++) {
                if (v[e] > a) b = a, a = v[e];
                else if (v[e] > b) b = v[e];
            }
            gscore[q] = gs > 1 ? a + b : a;
            keep[q] = 0;
        }
        for (int c = 0; c < M; c++) {
            int best = -1;
            for (int q = 0; q < NG; q++)
                if (!keep[q] && (best < 0 || gscore[q] > gscore[best])) best = q;
            keep[best] = 1;
        }
        for (int q = 0; q < NG; q++)
            if (!keep[q])
                for (int e = q * gs; e < (q + 1) * gs; e++) v[e] = -INFINITY;
    }
}

/* ---- the router's GEMMs ----
 * They have E columns (or K = E): too few to split well over threads, and
 * a GEMM threaded inside OpenBLAS may round differently at another thread
 * count. So each runs on one OpenBLAS thread, and the backward's
 * independent ones side by side in two lanes: the route and the router
 * gradients do not depend on the thread count. */
typedef struct {
    CBLAS_TRANSPOSE ta, tb;
    int m, n, k;
    const float *a, *b;
    float beta, *c;
} router_gemm; /* row-major C (m x n) = op(A) op(B) + beta C, leading dims from the shapes */

typedef struct {
    router_gemm g[2][2]; /* lane, then order within the lane */
    int n[2];
} gemm_lanes;

static void lanes_run(void *ctx, int t, int nt)
{
    const gemm_lanes *L = ctx;
    for (int l = t; l < 2; l += nt)
        for (int i = 0; i < L->n[l]; i++) {
            const router_gemm *g = &L->g[l][i];
            const int lda = g->ta == CblasNoTrans ? g->k : g->m, ldb = g->tb == CblasNoTrans ? g->n : g->k;
            if (g->ta == CblasNoTrans && g->tb == CblasTrans) /* the forward's logits */
                moe_sgemm_nt(g->m, g->n, g->k, g->a, lda, g->b, ldb, g->beta, g->c, g->n);
            else
                cblas_sgemm(CblasRowMajor, g->ta, g->tb, g->m, g->n, g->k, 1.0f, g->a, lda, g->b, ldb, g->beta,
                            g->c, g->n);
        }
}

static void run_lanes(gemm_lanes *L)
{
    if (L->n[1] > 0 && moe_par_threads() > 1) {
        moe_par_run(2, lanes_run, L); /* one OpenBLAS thread inside a region */
        return;
    }
    const int blas = openblas_get_num_threads();
    openblas_set_num_threads(1);
    lanes_run(L, 0, 1);
    openblas_set_num_threads(blas);
}

/* Rows of (T, E) per thread below which a router pass stays on one thread. */
enum { ROUTER_PAR_MIN = 1 << 14 };

/* The scores pass of one forward. */
typedef struct {
    moe_route *r;
    int sigmoid; /* sigmoid scores instead of softmax */
    int topk;    /* token choice ranking the scores themselves: top k here */
} scores_job;

/* Stable softmax (or sigmoid scores) and logsumexp of tokens [t0, t1) (the
 * z-loss is on the logits whatever the score), and their top k when the
 * ranking is the scores' own. With an expert bias or group limits the
 * ranking is s + b with groups masked: the forward ranks it after this
 * pass (selection_scores). */
static void softmax_rows(const scores_job *j, long t0, long t1)
{
    moe_route *r = j->r;
    const int E = r->E;
    for (long t = t0; t < t1; t++) {
        const float *l = r->logits + (size_t)t * E;
        float *p = r->probs + (size_t)t * E;
        float mx = l[0];
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        float s = 0.0f;
        for (int e = 0; e < E; e++) s += (p[e] = expf(l[e] - mx));
        if (j->sigmoid) {
            for (int e = 0; e < E; e++) p[e] = sigmoidf(l[e]);
        } else {
            const float inv = 1.0f / s;
            for (int e = 0; e < E; e++) p[e] *= inv;
        }
        r->lse[t] = mx + logf(s);
    }
    if (j->topk && t1 > t0)
        moe_topk_rows(r->topk + (size_t)t0 * r->k, r->probs + (size_t)t0 * E, (int)(t1 - t0), E, r->k);
}

static void softmax_run(void *ctx, int t, int nt)
{
    const scores_job *j = ctx;
    long t0, t1;
    moe_par_range(j->r->T, t, nt, &t0, &t1);
    softmax_rows(j, t0, t1);
}

moe_status moe_router_forward(moe_route *r, const float *x, const float *wg, const float *wn, const float *bias,
                              const moe_router_config *cfg, int T, int G, const moe_noise_key *key)
{
    if (!r || !x || !wg) return moe_errorf(MOE_ERR_ARG, "router: forward needs a route, x and W_g");
    moe_route_impl *m = (moe_route_impl *)r;
    moe_status st = route_matches(m, cfg);
    if (st != MOE_OK) return st;
    if (T < 1) return moe_errorf(MOE_ERR_ARG, "router: T=%d tokens must be >= 1", T);
    if (G < 1) return moe_errorf(MOE_ERR_ARG, "router: G=%d groups must be >= 1", G);
    if (T % G != 0) return moe_errorf(MOE_ERR_ARG, "router: T=%d tokens do not split into G=%d equal groups", T, G);
    if (T > r->T_max) return moe_errorf(MOE_ERR_ARG, "router: T=%d exceeds the route's T_max=%d", T, r->T_max);
    if (G > r->G_max) return moe_errorf(MOE_ERR_ARG, "router: G=%d exceeds the route's G_max=%d", G, r->G_max);
    const int noisy = cfg->noise && key != NULL;
    if (noisy && !m->noise_buf)
        return moe_errorf(MOE_ERR_ARG, "router: noise requested but the route was created without noise");
    if (noisy && !wn) return moe_errorf(MOE_ERR_ARG, "router: noise requested but W_n is NULL");
    if (cfg->expert_bias && !bias) return moe_errorf(MOE_ERR_ARG, "router: expert_bias set but no bias given");
    if (cfg->aux == MOE_AUX_SEQ && (T / G) % group_seqs(cfg))
        return moe_errorf(MOE_ERR_ARG, "router: a group of %d tokens does not split into group_seqs=%d sequences",
                          T / G, group_seqs(cfg));
    const int E = r->E, d = m->d, Tg = T / G;
    const size_t TE = (size_t)T * E;
    r->T = T;
    r->G = G;

    /* l = x W_g^T for all T tokens at once (and W_n x beside it). */
    r->noise = noisy ? m->noise_buf : NULL;
    r->noise_pre = noisy ? m->noise_pre_buf : NULL;
    gemm_lanes lanes = {.n = {1, noisy}};
    lanes.g[0][0] = (router_gemm){CblasNoTrans, CblasTrans, T, E, d, x, wg, 0.0f, r->logits};
    lanes.g[1][0] = (router_gemm){CblasNoTrans, CblasTrans, T, E, d, x, wn, 0.0f, r->noise_pre};
    run_lanes(&lanes);
    if (noisy) {
        for (int t = 0; t < T; t++) {
            const uint32_t tok = (uint32_t)(key->token0 + t); /* global token: rank-count independent */
            for (int e = 0; e < E; e++) {
                const size_t i = (size_t)t * E + e;
                r->noise[i] = (float)moe_rng_normal(key->seed, MOE_RNG_ROUTER_NOISE, tok, (uint32_t)e, key->layer,
                                                    key->step);
                r->logits[i] += r->noise[i] * softplusf(r->noise_pre[i]);
            }
        }
    }
    /* A NaN or Inf anywhere in x_t reaches l_t (NaN propagates; Inf times any
     * weight, zero included, is Inf or NaN), so the (T, E) logits cover x at
     * 1/d of the cost of scanning it; x is scanned only to name the culprit. */
    if (!router_all_finite(r->logits, TE)) {
        if (!moe_all_finite(x, (size_t)T * d))
            return moe_errorf(MOE_ERR_NONFINITE, "router: the input x (%d x %d) holds NaN or Inf", T, d);
        return moe_errorf(MOE_ERR_NONFINITE, "router: the gate logits hold NaN or Inf (weights too large?)");
    }

    /* Scores, logsumexp and (token choice ranking the scores) top k per
     * token, tokens split over the threads. */
    const scores_job sj = {r, cfg->score == MOE_SCORE_SIGMOID, m->kind == MOE_ROUTER_TOKEN_CHOICE && r->sel == r->probs};
    moe_par_run(moe_par_threads_for(TE, ROUTER_PAR_MIN), softmax_run, (void *)&sj);

    memset(r->weight, 0, TE * sizeof(float));
    memset(r->selected, 0, TE);
    memset(r->kept, 0, TE);
    memset(r->n_selected, 0, (size_t)G * E * sizeof(int));
    memset(r->n_kept, 0, (size_t)G * E * sizeof(int));
    memset(r->n_dropped, 0, (size_t)G * E * sizeof(int));
    if (m->kind == MOE_ROUTER_TOKEN_CHOICE && r->sel != r->probs) {
        /* the plain path: rank s + b with groups masked (one thread) */
        selection_scores(r, bias, cfg, T);
        moe_topk_rows(r->topk, r->sel, T, E, r->k);
    }
    for (int g = 0; g < G; g++) {
        if (m->kind == MOE_ROUTER_TOKEN_CHOICE)
            assign_token_choice(m, cfg, g * Tg, Tg, g);
        else
            assign_expert_choice(m, cfg, g * Tg, Tg, g);
        double z = 0.0;
        for (int t = g * Tg; t < (g + 1) * Tg; t++) z += (double)r->lse[t] * r->lse[t];
        r->z_loss[g] = (float)(z / Tg);
    }
    return MOE_OK;
}

/* dL/dlogits of tokens [t0, t1) into m->dl (backward). */
typedef struct {
    const moe_route_impl *m;
    const moe_router_config *cfg;
    const float *dweight;
    int normalize;
    float lb_scale, zc;
} dlogits_job;

static void dlogits_rows(const dlogits_job *j, long t0, long t1)
{
    const moe_route_impl *m = j->m;
    moe_route_impl *scratch = (moe_route_impl *)m; /* seq_sel only: aux = seq runs on one thread */
    const moe_router_config *cfg = j->cfg;
    const moe_route *r = &m->pub;
    const int E = r->E, k = r->k, Tg = r->T / r->G, normalize = j->normalize;
    const int tc = m->kind == MOE_ROUTER_TOKEN_CHOICE, sigmoid = cfg->score == MOE_SCORE_SIGMOID;
    const int seq = tc && cfg->aux == MOE_AUX_SEQ, Q = seq ? group_seqs(cfg) : 1, Ts = Tg / Q;
    const float sc = (float)route_scale(cfg);
    const float *dweight = j->dweight;
    float *dl = m->dl;
    for (long t = t0; t < t1; t++) {
        const int g = (int)(t / Tg);
        /* d L_bal / d p[t,e] = E f_e / Tg with f_e = n_sel[e] / (Tg k) held fixed
         * (aux = seq: per sequence of Ts tokens, L averaged over the Q sequences). */
        const int *ns = NULL;
        float lbc = 0.0f;
        if (tc && cfg->aux == MOE_AUX_SWITCH) {
            ns = r->n_selected + (size_t)g * E;
            lbc = j->lb_scale * (float)E / ((float)Tg * Tg * k);
        } else if (seq) {
            const long in_seq = (t - (long)g * Tg) % Ts;
            if (t == t0 || in_seq == 0) count_selected(scratch, (int)(t - in_seq), Ts);
            ns = scratch->seq_sel;
            lbc = j->lb_scale * (float)E / ((float)Q * Ts * Ts * k);
        }
        const size_t row = (size_t)t * E;
        const float *p = r->probs + row, *dw = dweight + row;
        const uint8_t *kept = r->kept + row;
        float *dp = dl + row; /* holds dL/ds, then becomes dL/dl in place */
        for (int e = 0; e < E; e++) dp[e] = ns ? lbc * (float)ns[e] : 0.0f;
        if (seq && sigmoid) {
            /* aux = seq takes s / sum(s): dL/ds_j = (g_j - sum_e g_e s_e / S) / S */
            const float inv = score_inv_sum(r, (int)t);
            float a = 0.0f;
            for (int e = 0; e < E; e++) a += dp[e] * p[e] * inv;
            for (int e = 0; e < E; e++) dp[e] = (dp[e] - a) * inv;
        }
        if (m->kind == MOE_ROUTER_EXPERT_CHOICE) {
            for (int e = 0; e < E; e++) dp[e] += kept[e] ? dw[e] * sc : 0.0f;
        } else if (!normalize) {
            for (int c = 0; c < k; c++) {
                const int e = r->topk[(size_t)t * k + c];
                dp[e] += kept[e] ? dw[e] * sc : 0.0f;
            }
        } else {
            /* g_e = p_e / S over the k chosen (dropped ones included in S):
             * dL/dp_j = dg_j / S - sum_e dg_e p_e / S^2 for every chosen j. */
            const float inv_s = 1.0f / r->topk_sum[t];
            float a = 0.0f;
            for (int c = 0; c < k; c++) {
                const int e = r->topk[(size_t)t * k + c];
                a += kept[e] ? dw[e] * sc * p[e] : 0.0f;
            }
            a *= inv_s * inv_s;
            for (int c = 0; c < k; c++) {
                const int e = r->topk[(size_t)t * k + c];
                dp[e] += (kept[e] ? dw[e] * sc * inv_s : 0.0f) - a;
            }
        }
        const float zt = j->zc * r->lse[t];
        if (sigmoid) {
            /* ds/dl = s (1 - s); the z-loss term 2 lse softmax(l) */
            const float *l = r->logits + row;
            for (int e = 0; e < E; e++) dp[e] = dp[e] * p[e] * (1.0f - p[e]) + zt * expf(l[e] - r->lse[t]);
            continue;
        }
        /* Softmax Jacobian, then the z-loss term d(lse^2)/dl = 2 lse p. */
        float dot = 0.0f;
        for (int e = 0; e < E; e++) dot += p[e] * dp[e];
        for (int e = 0; e < E; e++) dp[e] = p[e] * (dp[e] - dot + zt);
    }
}

static void dlogits_run(void *ctx, int t, int nt)
{
    const dlogits_job *j = ctx;
    long t0, t1;
    moe_par_range(j->m->pub.T, t, nt, &t0, &t1);
    dlogits_rows(j, t0, t1);
}

moe_status moe_router_backward(float *dx, float *dwg, float *dwn, const float *dweight,
                               const moe_route *r, const float *x, const float *wg, const float *wn,
                               const moe_router_config *cfg, float lb_scale, float z_scale)
{
    if (!r || !dx || !dwg || !dweight || !x || !wg)
        return moe_errorf(MOE_ERR_ARG, "router: backward needs the route, dx, dwg, dweight, x and W_g");
    const moe_route_impl *m = (const moe_route_impl *)r;
    moe_status st = route_matches(m, cfg);
    if (st != MOE_OK) return st;
    if (r->T < 1) return moe_errorf(MOE_ERR_ARG, "router: backward called before any forward");
    if (r->noise && (!dwn || !wn))
        return moe_errorf(MOE_ERR_ARG, "router: the forward used noise, so backward needs W_n and dwn");
    const int E = r->E, k = r->k, d = m->d, T = r->T, G = r->G, Tg = T / G;
    const int normalize = m->kind == MOE_ROUTER_TOKEN_CHOICE && cfg->normalize_topk && k > 1;
    const float zc = 2.0f * z_scale / (float)Tg;
    float *dl = m->dl;

    /* aux = seq counts per sequence in one scratch: one thread */
    const dlogits_job job = {m, cfg, dweight, normalize, lb_scale, zc};
    const int nt = cfg->aux == MOE_AUX_SEQ ? 1 : moe_par_threads_for((long)T * E, ROUTER_PAR_MIN);
    moe_par_run(nt, dlogits_run, (void *)&job);
    if (r->noise) {
        /* l += n softplus(pre): dL/dpre = dL/dl * n * sigmoid(pre). */
        const size_t TE = (size_t)T * E;
        for (size_t i = 0; i < TE; i++) m->dpre[i] = dl[i] * r->noise[i] * sigmoidf(r->noise_pre[i]);
    }
    /* Lane 0: the weight gradients; lane 1: dx, W_g's term before W_n's. */
    gemm_lanes lanes = {.n = {r->noise ? 2 : 1, r->noise ? 2 : 1}};
    lanes.g[0][0] = (router_gemm){CblasTrans, CblasNoTrans, E, d, T, dl, x, 1.0f, dwg};
    lanes.g[0][1] = (router_gemm){CblasTrans, CblasNoTrans, E, d, T, m->dpre, x, 1.0f, dwn};
    lanes.g[1][0] = (router_gemm){CblasNoTrans, CblasNoTrans, T, d, E, dl, wg, 1.0f, dx};
    lanes.g[1][1] = (router_gemm){CblasNoTrans, CblasNoTrans, T, d, E, m->dpre, wn, 1.0f, dx};
    run_lanes(&lanes);
    return MOE_OK;
}

/* Rank of entry i among n strided entries under (value desc, index asc). */
static int rank_of(const float *a, ptrdiff_t stride, int n, int i)
{
    int rank = 0;
    for (int j = 0; j < n; j++) {
        const float x = a[i * stride], y = a[j * stride];
        rank += y > x || (y == x && j < i);
    }
    return rank;
}

/* Reference (one group): a literal transcription of docs/routing.md sections 3, 4 and 8,
 * ranks recomputed from scratch for every assignment. */
void moe_router_assign_ref(float *weight, uint8_t *selected, uint8_t *kept, int *n_selected,
                           int *n_kept, int *n_dropped, const float *probs, const float *bias,
                           const moe_router_config *cfg, int T)
{
    const int E = cfg->n_experts;
    const int64_t C = moe_router_capacity(cfg, T);
    const double scale = cfg->route_scale > 0 ? cfg->route_scale : 1.0;
    for (size_t i = 0; i < (size_t)T * E; i++) weight[i] = 0.0f, selected[i] = kept[i] = 0;
    for (int e = 0; e < E; e++) n_selected[e] = n_kept[e] = n_dropped[e] = 0;
    if (cfg->kind == MOE_ROUTER_EXPERT_CHOICE) {
        for (int e = 0; e < E; e++)
            for (int t = 0; t < T; t++)
                if (rank_of(probs + e, E, T, t) < C) {
                    selected[t * E + e] = kept[t * E + e] = 1;
                    weight[t * E + e] = (float)(probs[t * E + e] * scale);
                    n_selected[e]++;
                    n_kept[e]++;
                }
        return;
    }
    const int k = cfg->top_k, NG = cfg->n_groups > 1 ? cfg->n_groups : 1, gs = E / NG;
    const int M = cfg->topk_groups > 0 && cfg->topk_groups < NG ? cfg->topk_groups : NG;
    /* sel (T, E): s + b, -inf outside the kept groups */
    float sel[(size_t)T * E], gscore[NG], two[2];
    for (int t = 0; t < T; t++) {
        float *v = sel + (size_t)t * E;
        for (int e = 0; e < E; e++) v[e] = probs[(size_t)t * E + e] + (cfg->expert_bias && bias ? bias[e] : 0.0f);
        for (int q = 0; q < NG; q++) {
            /* a group's score: the sum of its two largest entries (its largest with one expert) */
            int n = 0;
            for (int e = 0; e < gs; e++)
                if (rank_of(v + q * gs, 1, gs, e) < 2) two[n++] = v[q * gs + e];
            gscore[q] = n == 2 ? two[0] + two[1] : two[0];
        }
        for (int q = 0; q < NG; q++)
            if (rank_of(gscore, 1, NG, q) >= M)
                for (int e = q * gs; e < (q + 1) * gs; e++) v[e] = -INFINITY;
    }
    for (int r = 0; r < k; r++) {
        for (int t = 0; t < T; t++) {
            const float *p = probs + (size_t)t * E, *v = sel + (size_t)t * E;
            for (int e = 0; e < E; e++) {
                if (rank_of(v, 1, E, e) != r) continue;
                double s = 0.0;
                for (int j = 0; j < E; j++) s += rank_of(v, 1, E, j) < k ? p[j] : 0.0;
                selected[t * E + e] = 1;
                n_selected[e]++;
                if (C < 0 || n_kept[e] < C) {
                    kept[t * E + e] = 1;
                    weight[t * E + e] = (float)((cfg->normalize_topk && k > 1 ? p[e] / s : p[e]) * scale);
                    n_kept[e]++;
                } else {
                    n_dropped[e]++;
                }
            }
        }
    }
}

void moe_router_bias_update(float *bias, const int64_t *n, int E, float rate)
{
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += n[e];
    /* sign(n_mean - n_e) = sign(total - E n_e), in integers */
    for (int e = 0; e < E; e++) {
        const int64_t diff = total - (int64_t)E * n[e];
        bias[e] += diff > 0 ? rate : diff < 0 ? -rate : 0.0f;
    }
}
