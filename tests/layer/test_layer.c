/* The single-process MoE layer: against a naive per-token reference built
 * from the _ref kernels, finite differences of the whole layer (incl. both
 * aux losses), exact zero gradients for an idle expert, bad input, and the
 * same bits at 1, 2, 3 and 4 threads; each also with the section 8 options
 * (sigmoid scores, route_scale, the expert bias, group limits, shared
 * experts with and without their gate, experts without biases). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cblas.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "layer/layer.h"

typedef struct {
    int T, G, d, F, E, k;
    moe_router_kind kind;
    double cf;
    moe_activation act;
} shape;

/* Section 8 options (zeroed: the defaults). */
typedef struct {
    moe_score_kind score;
    double scale;
    int bias, groups, topk_groups;
    int S, Fs, gate; /* shared experts */
    int nobias;      /* experts without b1, b2 */
} opts;

typedef struct {
    shape s;
    opts o;
    int F1, F1s;
    moe_layer *L;
    float *mem;
    moe_layer_params p, g;
    float *x, *y, *dy, *dx; /* (T, d) */
    size_t n_params;
} fixture;

static moe_router_config router_of(const shape *s, const opts *o)
{
    moe_router_config rc = {.n_experts = s->E, .top_k = s->k, .d_model = s->d, .kind = s->kind,
                            .capacity_factor = s->cf, .normalize_topk = s->k > 1, .score = o->score,
                            .route_scale = o->scale, .expert_bias = o->bias, .n_groups = o->groups,
                            .topk_groups = o->topk_groups};
    return rc;
}

static void fill(float *a, size_t n, uint32_t id, float scale)
{
    for (size_t i = 0; i < n; i++) a[i] = scale * (float)moe_rng_normal(99, MOE_RNG_BENCH, (uint32_t)i, 0, id, 0);
}

static void setup_opts(fixture *f, shape s, opts o)
{
    memset(f, 0, sizeof *f);
    f->s = s;
    f->o = o;
    f->F1 = moe_f1(s.F, s.act);
    f->F1s = moe_f1(o.Fs, s.act);
    moe_layer_config lc = {
        .router = router_of(&s, &o), .d_ff = s.F, .act = s.act, .max_tokens = s.T, .max_groups = s.G, .chunks = 1,
        .n_shared = o.S, .d_ff_shared = o.Fs, .shared_gate = o.gate};
    assert_int_equal(moe_layer_create(&f->L, &lc, moe_comm_self()), MOE_OK);
    const size_t nb = o.nobias ? 0 : 1;
    size_t nr = (size_t)s.E * s.d, n1 = (size_t)s.E * f->F1 * s.d, nb1 = nb * s.E * f->F1;
    size_t n2 = (size_t)s.E * s.d * s.F, nb2 = nb * s.E * s.d, na = (size_t)s.T * s.d;
    size_t s1 = (size_t)o.S * f->F1s * s.d, sb1 = (size_t)o.S * f->F1s, s2 = (size_t)o.S * s.d * o.Fs;
    size_t sb2 = (size_t)o.S * s.d, sg = o.gate ? (size_t)s.d : 0;
    f->n_params = nr + n1 + nb1 + n2 + nb2 + s1 + sb1 + s2 + sb2 + sg;
    f->mem = calloc(2 * f->n_params + 4 * na + (size_t)s.E, sizeof(float));
    float *q = f->mem;
    moe_layer_params *ps[2] = {&f->p, &f->g};
    for (int i = 0; i < 2; i++) {
        ps[i]->router_w = q; q += nr;
        ps[i]->experts.w1 = q; q += n1;
        ps[i]->experts.b1 = nb ? q : NULL; q += nb1;
        ps[i]->experts.w2 = q; q += n2;
        ps[i]->experts.b2 = nb ? q : NULL; q += nb2;
        ps[i]->shared.w1 = q; q += s1;
        ps[i]->shared.b1 = q; q += sb1;
        ps[i]->shared.w2 = q; q += s2;
        ps[i]->shared.b2 = q; q += sb2;
        ps[i]->shared_gate = o.gate ? q : NULL; q += sg;
    }
    f->x = q; q += na;
    f->y = q; q += na;
    f->dy = q; q += na;
    f->dx = q; q += na;
    f->p.expert_bias = o.bias ? q : NULL;
    fill(f->p.router_w, nr, 1, 1.0f / sqrtf((float)s.d));
    fill(f->p.experts.w1, n1, 2, 1.0f / sqrtf((float)s.d));
    if (nb) fill(f->p.experts.b1, nb1, 3, 0.1f);
    fill(f->p.experts.w2, n2, 4, 1.0f / sqrtf((float)s.F));
    if (nb) fill(f->p.experts.b2, nb2, 5, 0.1f);
    fill(f->x, na, 6, 1.0f);
    fill(f->dy, na, 7, 1.0f);
    fill(f->p.shared.w1, s1, 8, 1.0f / sqrtf((float)s.d));
    fill(f->p.shared.b1, sb1, 9, 0.1f);
    fill(f->p.shared.w2, s2, 10, 1.0f / sqrtf((float)(o.Fs > 0 ? o.Fs : 1)));
    fill(f->p.shared.b2, sb2, 11, 0.1f);
    if (o.gate) fill(f->p.shared_gate, sg, 12, 1.0f / sqrtf((float)s.d));
    if (o.bias) fill(f->p.expert_bias, (size_t)s.E, 13, 0.2f);
}

static void setup(fixture *f, shape s)
{
    const opts none = {0};
    setup_opts(f, s, none);
}

static void teardown(fixture *f)
{
    moe_layer_destroy(f->L);
    free(f->mem);
}

/* Naive reference: y_t = sum over kept (t, e) of g_te * FFN_e(x_t), one
 * token at a time through the _ref expert kernel; routing decisions from
 * moe_router_assign_ref on the layer's own probabilities. */
static void check_against_ref(fixture *f)
{
    const shape s = f->s;
    assert_int_equal(moe_layer_forward(f->L, f->y, f->x, &f->p, s.T, s.G, NULL), MOE_OK);
    const moe_route *r = moe_layer_route(f->L);
    const moe_router_config rc = router_of(&s, &f->o);
    const opts o = f->o;
    int Tg = s.T / s.G;
    float *w = calloc((size_t)Tg * s.E, sizeof(float));
    uint8_t *sel = calloc((size_t)Tg * s.E, 1), *kept = calloc((size_t)Tg * s.E, 1);
    int cnt[3][64];
    for (int g = 0; g < s.G; g++) {
        moe_router_assign_ref(w, sel, kept, cnt[0], cnt[1], cnt[2], r->probs + (size_t)g * Tg * s.E, f->p.expert_bias,
                              &rc, Tg);
        for (int i = 0; i < Tg * s.E; i++) {
            assert_int_equal(kept[i], r->kept[(size_t)g * Tg * s.E + i]);
            assert_int_equal(sel[i], r->selected[(size_t)g * Tg * s.E + i]);
            assert_float_equal(w[i], r->weight[(size_t)g * Tg * s.E + i], 1e-6);
        }
    }
    const int hw = f->F1 > f->F1s ? f->F1 : f->F1s;
    float *yo = calloc((size_t)s.d, sizeof(float)), *h = calloc((size_t)hw, sizeof(float));
    float *a = calloc((size_t)hw, sizeof(float));
    int off[2] = {0, 1};
    double maxerr = 0, maxabs = 0;
    for (int t = 0; t < s.T; t++) {
        double acc[512] = {0};
        for (int e = 0; e < s.E; e++) {
            if (!r->kept[(size_t)t * s.E + e]) continue;
            moe_expert_params pe = {f->p.experts.w1 + (size_t)e * f->F1 * s.d,
                                    o.nobias ? NULL : f->p.experts.b1 + (size_t)e * f->F1,
                                    f->p.experts.w2 + (size_t)e * s.d * s.F,
                                    o.nobias ? NULL : f->p.experts.b2 + (size_t)e * s.d};
            moe_expert_forward_ref(yo, h, a, f->x + (size_t)t * s.d, off, &pe, 1, s.d, s.F, s.act);
            for (int i = 0; i < s.d; i++) acc[i] += r->weight[(size_t)t * s.E + e] * yo[i];
        }
        /* shared experts: gate_t * sum_j FFN_j(x_t), gate_t = sigmoid(w_sg . x_t) or 1 */
        double gate = 1.0, sh[512] = {0};
        if (o.gate) {
            double z = 0;
            for (int i = 0; i < s.d; i++) z += (double)f->p.shared_gate[i] * f->x[(size_t)t * s.d + i];
            gate = 1.0 / (1.0 + exp(-z));
        }
        for (int j = 0; j < o.S; j++) {
            moe_expert_params pe = {f->p.shared.w1 + (size_t)j * f->F1s * s.d, f->p.shared.b1 + (size_t)j * f->F1s,
                                    f->p.shared.w2 + (size_t)j * s.d * o.Fs, f->p.shared.b2 + (size_t)j * s.d};
            moe_expert_forward_ref(yo, h, a, f->x + (size_t)t * s.d, off, &pe, 1, s.d, o.Fs, s.act);
            for (int i = 0; i < s.d; i++) sh[i] += yo[i];
        }
        for (int i = 0; i < s.d; i++) acc[i] += gate * sh[i];
        for (int i = 0; i < s.d; i++) {
            double err = fabs(acc[i] - f->y[(size_t)t * s.d + i]);
            maxerr = err > maxerr ? err : maxerr;
            maxabs = fabs(acc[i]) > maxabs ? fabs(acc[i]) : maxabs;
        }
    }
    assert_true(maxerr <= 1e-5 * (maxabs + 1e-6) + 1e-6);
    free(w); free(sel); free(kept); free(yo); free(h); free(a);
}

static void test_forward_matches_reference(void **state)
{
    (void)state;
    shape shapes[] = {
        {64, 2, 16, 24, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_GELU},   /* drops */
        {64, 4, 16, 24, 4, 1, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_RELU},   /* Switch */
        {48, 1, 8, 16, 3, 3, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_SWIGLU},  /* k = E, dropless */
        {32, 2, 8, 16, 1, 1, MOE_ROUTER_TOKEN_CHOICE, 1.25, MOE_ACT_GELU},   /* E = 1 */
        {64, 2, 16, 24, 8, 2, MOE_ROUTER_EXPERT_CHOICE, 2.0, MOE_ACT_GELU},
        {16, 2, 8, 8, 4, 2, MOE_ROUTER_EXPERT_CHOICE, 16.0, MOE_ACT_SWIGLU}, /* C clipped to T */
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        fixture f;
        setup(&f, shapes[i]);
        check_against_ref(&f);
        teardown(&f);
    }
    const struct {
        shape s;
        opts o;
    } with_opts[] = {
        /* sigmoid, scale, bias, 2 of 4 groups, 2 gated shared experts, no expert biases */
        {{64, 2, 16, 24, 8, 2, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_SWIGLU}, {MOE_SCORE_SIGMOID, 2.5, 1, 4, 2, 2, 20, 1, 1}},
        /* softmax, one ungated shared expert, expert bias alone */
        {{64, 4, 16, 24, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_GELU}, {MOE_SCORE_SOFTMAX, 0.5, 1, 0, 0, 1, 24, 0, 0}},
        /* expert choice with sigmoid scores and a gated shared expert */
        {{64, 2, 16, 24, 8, 2, MOE_ROUTER_EXPERT_CHOICE, 2.0, MOE_ACT_RELU}, {MOE_SCORE_SIGMOID, 0.0, 0, 0, 0, 1, 16, 1, 0}},
    };
    for (size_t i = 0; i < sizeof with_opts / sizeof with_opts[0]; i++) {
        fixture f;
        setup_opts(&f, with_opts[i].s, with_opts[i].o);
        check_against_ref(&f);
        teardown(&f);
    }
}

/* L = sum(y * dy) + a * sum_g Lbal_g + b * sum_g Lz_g, in double. */
static double loss(fixture *f, double a, double b, const uint8_t *kept_ref, int *flipped)
{
    const shape s = f->s;
    assert_int_equal(moe_layer_forward(f->L, f->y, f->x, &f->p, s.T, s.G, NULL), MOE_OK);
    const moe_route *r = moe_layer_route(f->L);
    if (kept_ref && (memcmp(kept_ref, r->kept, (size_t)s.T * s.E) || memcmp(kept_ref + s.T * s.E, r->selected, (size_t)s.T * s.E)))
        *flipped = 1;
    double L = 0;
    for (size_t i = 0; i < (size_t)s.T * s.d; i++) L += (double)f->y[i] * f->dy[i];
    for (int g = 0; g < s.G; g++) L += a * r->load_balance[g] + b * r->z_loss[g];
    return L;
}

/* Central differences on a sample of entries of one tensor. */
static void fd_tensor(fixture *f, float *param, const float *grad, size_t n, double a, double b, const char *name)
{
    const shape s = f->s;
    uint8_t *masks = malloc((size_t)2 * s.T * s.E);
    (void)loss(f, a, b, NULL, NULL);
    memcpy(masks, moe_layer_route(f->L)->kept, (size_t)s.T * s.E);
    memcpy(masks + s.T * s.E, moe_layer_route(f->L)->selected, (size_t)s.T * s.E);
    double gmax = 0;
    for (size_t i = 0; i < n; i++) gmax = fabs(grad[i]) > gmax ? fabs(grad[i]) : gmax;
    int checked = 0;
    size_t stride = n > 40 ? n / 40 : 1;
    for (size_t i = 0; i < n; i += stride) {
        float keep = param[i];
        float eps = 1e-2f * (fabsf(keep) > 0.1f ? fabsf(keep) : 0.1f);
        int flipped = 0;
        param[i] = keep + eps;
        double lp = loss(f, a, b, masks, &flipped);
        param[i] = keep - eps;
        double lm = loss(f, a, b, masks, &flipped);
        param[i] = keep;
        if (flipped) continue; /* selection is not differentiable */
        double num = (lp - lm) / (2.0 * eps);
        if (fabs(num - grad[i]) > 2e-2 * gmax + 1e-4)
            fail_msg("%s[%zu]: finite difference %.6g vs backward %.6g (max |grad| %.3g)", name, i, num, grad[i], gmax);
        checked++;
    }
    assert_true(checked >= 5);
    free(masks);
}

static void fd_case_opts(shape s, opts o, double a, double b, int with_y)
{
    fixture f;
    setup_opts(&f, s, o);
    if (!with_y) memset(f.dy, 0, sizeof(float) * (size_t)s.T * s.d);
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, s.T, s.G, NULL), MOE_OK);
    assert_int_equal(moe_layer_backward(f.L, f.dx, &f.g, f.dy, f.x, &f.p, (float)a, (float)b), MOE_OK);
    float *gx = malloc(sizeof(float) * (size_t)s.T * s.d);
    memcpy(gx, f.dx, sizeof(float) * (size_t)s.T * s.d);
    fd_tensor(&f, f.x, gx, (size_t)s.T * s.d, a, b, "x");
    fd_tensor(&f, f.p.router_w, f.g.router_w, (size_t)s.E * s.d, a, b, "router_w");
    if (with_y) {
        fd_tensor(&f, f.p.experts.w1, f.g.experts.w1, (size_t)s.E * f.F1 * s.d, a, b, "w1");
        if (!o.nobias) fd_tensor(&f, f.p.experts.b1, f.g.experts.b1, (size_t)s.E * f.F1, a, b, "b1");
        fd_tensor(&f, f.p.experts.w2, f.g.experts.w2, (size_t)s.E * s.d * s.F, a, b, "w2");
        if (!o.nobias) fd_tensor(&f, f.p.experts.b2, f.g.experts.b2, (size_t)s.E * s.d, a, b, "b2");
    }
    if (with_y && o.S) {
        fd_tensor(&f, f.p.shared.w1, f.g.shared.w1, (size_t)o.S * f.F1s * s.d, a, b, "shared w1");
        fd_tensor(&f, f.p.shared.b1, f.g.shared.b1, (size_t)o.S * f.F1s, a, b, "shared b1");
        fd_tensor(&f, f.p.shared.w2, f.g.shared.w2, (size_t)o.S * s.d * o.Fs, a, b, "shared w2");
        fd_tensor(&f, f.p.shared.b2, f.g.shared.b2, (size_t)o.S * s.d, a, b, "shared b2");
        if (o.gate) fd_tensor(&f, f.p.shared_gate, f.g.shared_gate, (size_t)s.d, a, b, "shared gate");
    }
    free(gx);
    teardown(&f);
}

static void fd_case(shape s, double a, double b, int with_y)
{
    const opts none = {0};
    fd_case_opts(s, none, a, b, with_y);
}

static void test_finite_differences(void **state)
{
    (void)state;
    shape tc = {32, 2, 8, 12, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_GELU};
    shape ec = {32, 2, 8, 12, 4, 2, MOE_ROUTER_EXPERT_CHOICE, 2.0, MOE_ACT_SWIGLU};
    fd_case(tc, 0.0, 0.0, 1);  /* outputs only */
    fd_case(tc, 5.0, 0.0, 0);  /* load-balance loss alone */
    fd_case(tc, 0.0, 5.0, 0);  /* z-loss alone */
    fd_case(tc, 0.5, 0.5, 1);
    fd_case(ec, 0.0, 5.0, 0);
    fd_case(ec, 0.5, 0.5, 1);
    /* section 8 options: sigmoid, scale, bias, groups, gated shared experts, no expert biases */
    shape s8 = {32, 2, 8, 12, 8, 2, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_SWIGLU};
    const opts o8 = {MOE_SCORE_SIGMOID, 2.0, 1, 4, 2, 2, 10, 1, 1};
    fd_case_opts(s8, o8, 0.0, 0.0, 1);
    fd_case_opts(s8, o8, 5.0, 0.0, 0);
    fd_case_opts(s8, o8, 0.5, 0.5, 1);
    shape s1 = {32, 2, 8, 12, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_GELU};
    const opts ungated = {MOE_SCORE_SOFTMAX, 0.0, 0, 0, 0, 1, 12, 0, 0};
    fd_case_opts(s1, ungated, 0.5, 0.5, 1);
}

static void test_idle_expert_has_zero_gradient(void **state)
{
    (void)state;
    shape s = {64, 2, 8, 12, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_GELU};
    fixture f;
    setup(&f, s);
    /* Expert 3 scores far below the others for every token. */
    for (size_t i = 0; i < (size_t)s.T * s.d; i++) f.x[i] = fabsf(f.x[i]) + 0.5f;
    for (int i = 0; i < s.d; i++) f.p.router_w[3 * s.d + i] = -3.0f;
    const float sentinel = 1234.5f;
    float *gexp = f.g.experts.w1;
    size_t n_exp = f.n_params - (size_t)s.E * s.d;
    for (size_t i = 0; i < n_exp; i++) gexp[i] = sentinel;
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, s.T, s.G, NULL), MOE_OK);
    assert_int_equal(moe_layer_expert_rows(f.L)[3], 0);
    assert_int_equal(moe_layer_backward(f.L, f.dx, &f.g, f.dy, f.x, &f.p, 0.01f, 0.001f), MOE_OK);
    /* Untouched bit for bit: the backward adds nothing, not even +0. */
    const float *w1 = f.g.experts.w1 + (size_t)3 * f.F1 * s.d, *w2 = f.g.experts.w2 + (size_t)3 * s.d * s.F;
    for (int i = 0; i < f.F1 * s.d; i++) assert_memory_equal(&w1[i], &sentinel, sizeof(float));
    for (int i = 0; i < s.d * s.F; i++) assert_memory_equal(&w2[i], &sentinel, sizeof(float));
    for (int i = 0; i < f.F1; i++) assert_memory_equal(&f.g.experts.b1[3 * f.F1 + i], &sentinel, sizeof(float));
    for (int i = 0; i < s.d; i++) assert_memory_equal(&f.g.experts.b2[3 * s.d + i], &sentinel, sizeof(float));
    /* ... while active experts did receive gradient. */
    assert_true(f.g.experts.w1[0] != sentinel);
    teardown(&f);
}

static void test_bad_input(void **state)
{
    (void)state;
    moe_layer *L = NULL;
    moe_layer_config base = {
        .router = {.n_experts = 4, .top_k = 2, .d_model = 8, .kind = MOE_ROUTER_TOKEN_CHOICE,
                   .capacity_factor = 1.0, .normalize_topk = 1},
        .d_ff = 8, .act = MOE_ACT_GELU, .max_tokens = 16, .max_groups = 2, .chunks = 1};
    moe_layer_config c = base;
    c.router.top_k = 5;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);
    assert_true(strlen(moe_error_detail()) > 0);
    assert_null(L);
    c = base; c.router.top_k = 0;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);
    c = base; c.router.n_experts = 0;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);
    c = base; c.router.d_model = 0;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);
    c = base; c.d_ff = -3;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);
    c = base; c.router.kind = MOE_ROUTER_EXPERT_CHOICE; c.router.capacity_factor = 0;
    assert_int_equal(moe_layer_create(&L, &c, moe_comm_self()), MOE_ERR_ARG);

    shape s = {16, 2, 8, 8, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_GELU};
    fixture f;
    setup(&f, s);
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 15, 2, NULL), MOE_ERR_ARG); /* T % G */
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 0, 1, NULL), MOE_ERR_ARG);
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 32, 2, NULL), MOE_ERR_ARG); /* > max */
    assert_int_equal(moe_layer_backward(f.L, f.dx, &f.g, f.dy, f.x, &f.p, 0, 0), MOE_ERR_ARG);
    f.x[5] = NAN;
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 16, 2, NULL), MOE_ERR_NONFINITE);
    f.x[5] = INFINITY;
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 16, 2, NULL), MOE_ERR_NONFINITE);
    f.x[5] = 0.5f;
    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, 16, 2, NULL), MOE_OK);
    teardown(&f);
}

/* Forward and backward give the same bits at 1, 2, 3 and 4 threads: the
 * passes at home (the exchange's pack, combine, gate gradient and dx
 * accumulation; router softmax and backward) split rows or tokens over the
 * threads and each token sums in a fixed order, and expert choice gives
 * every expert the same rows, so the 12 experts are shared out evenly (6,
 * 4 or 3 per thread, each on one thread; none runs alone: with 8, 3 threads
 * would run some alone, on OpenBLAS threads). Sizes above the threading
 * thresholds of every pass (8208 rows of 64 floats: 4 shares of the
 * exchange's 128K floats). test_token_trips_threads (tests/comm) holds
 * the exchange's passes to a one-thread reference at every kind. */
static void test_threads_bitwise(void **state)
{
    (void)state;
    shape s = {4096, 2, 64, 96, 12, 2, MOE_ROUTER_EXPERT_CHOICE, 2.0, MOE_ACT_GELU};
    const int threads[] = {1, 2, 3, 4}, saved = openblas_get_num_threads();
    fixture f[4];
    for (int i = 0; i < 4; i++) {
        setup(&f[i], s);
        openblas_set_num_threads(threads[i]);
        assert_int_equal(moe_layer_forward(f[i].L, f[i].y, f[i].x, &f[i].p, s.T, s.G, NULL), MOE_OK);
        assert_int_equal(moe_layer_backward(f[i].L, f[i].dx, &f[i].g, f[i].dy, f[i].x, &f[i].p, 0.01f, 0.001f), MOE_OK);
    }
    openblas_set_num_threads(saved);
    for (int i = 1; i < 4; i++) {
        assert_memory_equal(f[0].y, f[i].y, sizeof(float) * (size_t)s.T * s.d);
        assert_memory_equal(f[0].dx, f[i].dx, sizeof(float) * (size_t)s.T * s.d);
        /* the gradient block: router, then every expert tensor */
        assert_memory_equal(f[0].g.router_w, f[i].g.router_w, sizeof(float) * f[0].n_params);
    }
    for (int i = 0; i < 4; i++) teardown(&f[i]);
}

/* The timing table names every field once, at its own offset, and the
 * values read through it are the struct's (bench layer prints through it). */
static void test_timing_table(void **state)
{
    (void)state;
    moe_layer_timing t;
    double *v = (double *)&t;
    for (int i = 0; i < MOE_LAYER_TIMING_N; i++) v[i] = 0;
    int seen[MOE_LAYER_TIMING_N] = {0};
    for (int i = 0; i < MOE_LAYER_TIMING_N; i++) {
        const size_t off = moe_layer_timing_fields[i].offset;
        assert_true(off % sizeof(double) == 0 && off < sizeof t);
        seen[off / sizeof(double)]++;
        for (int j = 0; j < i; j++) assert_string_not_equal(moe_layer_timing_fields[i].name, moe_layer_timing_fields[j].name);
    }
    for (int i = 0; i < MOE_LAYER_TIMING_N; i++) assert_int_equal(seen[i], 1);
    t.ret = 1.5;
    t.combine = 2.5;
    t.bwd_return = 3.5;
    double ret = -1, comb = -1, bret = -1;
    for (int i = 0; i < MOE_LAYER_TIMING_N; i++) {
        const char *n = moe_layer_timing_fields[i].name;
        if (!strcmp(n, "return")) ret = moe_layer_timing_get(&t, i);
        if (!strcmp(n, "combine")) comb = moe_layer_timing_get(&t, i);
        if (!strcmp(n, "bwd_return")) bret = moe_layer_timing_get(&t, i);
    }
    assert_true(ret == 1.5 && comb == 2.5 && bret == 3.5);
}

/* The receive buffers' bound (moe_layer_recv_rows_bound): no forward
 * receives more rows than it, at any T <= max_tokens and G <= max_groups,
 * even when one expert is every token's first choice; and it is near the
 * most the capacity lets in (so sizing the buffers for it costs little). */
static void test_recv_rows_bound(void **state)
{
    (void)state;
    const shape shapes[] = {
        {96, 4, 8, 12, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 1.25, MOE_ACT_GELU},
        {96, 3, 8, 12, 8, 1, MOE_ROUTER_TOKEN_CHOICE, 1.0, MOE_ACT_GELU},
        {96, 2, 8, 12, 6, 2, MOE_ROUTER_TOKEN_CHOICE, 2.0, MOE_ACT_SWIGLU},
        {96, 4, 8, 12, 4, 1, MOE_ROUTER_EXPERT_CHOICE, 1.0, MOE_ACT_GELU},
        {96, 2, 8, 12, 8, 1, MOE_ROUTER_EXPERT_CHOICE, 2.0, MOE_ACT_GELU},
        {96, 1, 8, 12, 4, 2, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_GELU}, /* dropless */
    };
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const shape s = shapes[c];
        fixture f;
        setup(&f, s);
        const int64_t bound = moe_layer_recv_rows_bound(f.L);
        const int ec = s.kind == MOE_ROUTER_EXPERT_CHOICE;
        /* one process: every kept assignment lands here */
        const double kk = ec ? 1.0 : s.k, most = s.cf > 0 ? kk * s.T * s.cf + (double)s.E * s.G : kk * s.T;
        assert_true(bound > 0);
        assert_true((double)bound <= most + s.E);
        if (s.cf <= 0) assert_int_equal(bound, (int64_t)s.T * s.k);
        for (int skew = 0; skew < 2; skew++) {
            /* skew: expert 1 is every token's first choice */
            if (skew)
                for (int i = 0; i < s.d; i++) f.p.router_w[1 * s.d + i] = 2.0f;
            for (size_t i = 0; skew && i < (size_t)s.T * s.d; i++) f.x[i] = fabsf(f.x[i]) + 0.25f;
            for (int T = s.T; T >= s.G; T -= s.T / 2) {
                for (int G = 1; G <= s.G; G++) {
                    if (T % G) continue;
                    assert_int_equal(moe_layer_forward(f.L, f.y, f.x, &f.p, T, G, NULL), MOE_OK);
                    int64_t rows = 0;
                    for (int j = 0; j < moe_layer_n_local_experts(f.L); j++) rows += moe_layer_expert_rows(f.L)[j];
                    assert_true(rows <= bound);
                    if (skew && s.cf > 0 && !ec) assert_true(rows < (int64_t)T * s.k); /* the capacity dropped rows */
                }
            }
        }
        teardown(&f);
    }
}

/* The bound for P ep ranks of El slots each (moe_layer_rows_bound): the
 * worst case of the routing, for dropless token choice only while it is at
 * most MOE_DROPLESS_BOUND_MEANS mean loads (2 ranks), else none. The worst
 * case is reachable: every rank's every token picks its k experts among
 * this rank's El slots (or all El of them when k > El). */
static void test_rows_bound_ranks(void **state)
{
    (void)state;
    const opts none = {0};
    const int T = 64, G = 2, E = 8;
    for (int k = 1; k <= 4; k++) {
        const shape s = {T, G, 8, 12, E, k, MOE_ROUTER_TOKEN_CHOICE, 0.0, MOE_ACT_SWIGLU};
        moe_layer_config lc = {.router = router_of(&s, &none), .d_ff = s.F, .act = s.act, .max_tokens = T,
                               .max_groups = G, .chunks = 1};
        for (int P = 1; P <= 8; P *= 2) {
            const int El = E / P, per = k < El ? k : El;
            const int64_t worst = (int64_t)P * T * per, mean = (int64_t)T * k;
            const int64_t want = P == 1 || worst <= MOE_DROPLESS_BOUND_MEANS * mean ? worst : 0;
            assert_int_equal(moe_layer_rows_bound(&lc, P, El), want);
        }
        assert_int_equal(moe_layer_rows_bound(&lc, 2, 4), 2 * T * (k < 4 ? k : 4)); /* 2 ranks: always held */
        /* with a capacity the bound is the capacity's whatever P */
        lc.router.capacity_factor = 1.0;
        for (int P = 1; P <= 8; P *= 2) {
            const int El = E / P, per = k < El ? k : El;
            const int64_t cap = moe_router_capacity(&lc.router, T) + G;
            const int64_t b = (int64_t)P * T * per < (int64_t)P * El * cap ? (int64_t)P * T * per : (int64_t)P * El * cap;
            assert_int_equal(moe_layer_rows_bound(&lc, P, El), b);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_matches_reference),
        cmocka_unit_test(test_finite_differences),
        cmocka_unit_test(test_idle_expert_has_zero_gradient),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_timing_table),
        cmocka_unit_test(test_recv_rows_bound),
        cmocka_unit_test(test_rows_bound_ranks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
