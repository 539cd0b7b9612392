/* The router options of docs/routing.md section 8: sigmoid scores,
 * route_scale, the expert bias (selection only) and its update rule,
 * group-limited routing, the per-sequence and the absent balance loss.
 * The fast path against moe_router_assign_ref on a grid of options,
 * hand-worked cases for the rules a grid cannot pin down (group scores are
 * sums of two, the bias moves selection but not weights, sign(0) = 0), and
 * the backward against central differences of an independent double
 * re-implementation of the loss with the selection frozen. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "router_test_util.h"

static moe_router_config options(int E, int k, int d, double cf, int normalize, moe_score_kind score,
                                 double scale, int bias, int groups, int topk_groups, moe_aux_kind aux, int seqs)
{
    moe_router_config c = tu_config(MOE_ROUTER_TOKEN_CHOICE, E, k, d, cf, normalize, 0);
    c.score = score;
    c.route_scale = scale;
    c.expert_bias = bias;
    c.n_groups = groups;
    c.topk_groups = topk_groups;
    c.aux = aux;
    c.group_seqs = seqs;
    return c;
}

/* ---- fast path vs the reference on a grid ---- */

static void test_options_vs_ref(void **state)
{
    (void)state;
    enum { D = 5, G = 2, TG = 24, T = G * TG, EMAX = 8 };
    uint64_t s = 5;
    float x[T * D], wg[EMAX * D], b[EMAX], w[TG * EMAX];
    uint8_t sel[TG * EMAX], kept[TG * EMAX];
    int ns[EMAX], nk[EMAX], nd[EMAX], cases = 0, limited = 0, drops = 0;
    const int Es[] = {4, 8};
    for (size_t ie = 0; ie < 2; ie++)
        for (int score = 0; score < 2; score++)
            for (int bias = 0; bias < 2; bias++)
                for (int groups = 1; groups <= 4; groups *= 2)
                    for (int M = 1; M <= groups; M++)
                        for (int k = 1; k <= 3; k++)
                            for (int cap = 0; cap < 2; cap++) {
                                const int E = Es[ie];
                                if (k > M * (E / groups)) continue;
                                const double scale = cap ? 2.5 : 0.0; /* 0 means 1 */
                                const moe_router_config cfg = options(E, k, D, cap ? 0.75 : 0.0, (k + cap) % 2,
                                                                      score, scale, bias, groups, M, MOE_AUX_SWITCH, 1);
                                for (int i = 0; i < T * D; i++) x[i] = 2.0f * tu_sym(&s);
                                for (int i = 0; i < E * D; i++) wg[i] = tu_sym(&s);
                                for (int e = 0; e < E; e++) b[e] = 0.3f * tu_sym(&s);
                                moe_route *r = NULL;
                                assert_int_equal(moe_route_create(&r, &cfg, T, G), MOE_OK);
                                assert_int_equal(moe_router_forward(r, x, wg, NULL, b, &cfg, T, G, NULL), MOE_OK);
                                for (int g = 0; g < G; g++) {
                                    const size_t o = (size_t)g * TG * E;
                                    moe_router_assign_ref(w, sel, kept, ns, nk, nd, r->probs + o, b, &cfg, TG);
                                    assert_memory_equal(r->selected + o, sel, (size_t)TG * E);
                                    assert_memory_equal(r->kept + o, kept, (size_t)TG * E);
                                    for (int i = 0; i < TG * E; i++) assert_float_equal(r->weight[o + i], w[i], 1e-6);
                                    assert_memory_equal(r->n_selected + g * E, ns, E * sizeof(int));
                                    for (int e = 0; e < E; e++) drops += nd[e];
                                }
                                /* sigmoid scores are sigmoid(l), softmax scores sum to 1 */
                                for (int t = 0; t < 3; t++) {
                                    double sum = 0;
                                    for (int e = 0; e < E; e++) sum += r->probs[t * E + e];
                                    if (score == MOE_SCORE_SIGMOID)
                                        assert_float_equal(r->probs[t * E + 1], 1.0 / (1.0 + exp(-r->logits[t * E + 1])), 1e-6);
                                    else
                                        assert_float_equal(sum, 1.0, 1e-5);
                                }
                                /* group limits: every token's experts lie in at most M groups */
                                for (int t = 0; t < T && M < groups; t++) {
                                    int used = 0;
                                    for (int q = 0; q < groups; q++) {
                                        int any = 0;
                                        for (int e = q * (E / groups); e < (q + 1) * (E / groups); e++)
                                            any |= r->selected[t * E + e];
                                        used += any;
                                    }
                                    assert_true(used <= M);
                                    limited++;
                                }
                                moe_route_destroy(r);
                                cases++;
                            }
    assert_true(cases > 100);
    assert_true(limited > 0 && drops > 0);
}

/* ---- hand-worked rules ---- */

/* Probabilities rows through the real forward: sigmoid scores from logits
 * log(s / (1 - s)) (d = E, W_g = I). */
static moe_route *route_scores(const moe_router_config *cfg, const float *scores, const float *bias, int T)
{
    const int E = cfg->n_experts;
    float *x = calloc((size_t)T * E, sizeof(float)), *wg = calloc((size_t)E * E, sizeof(float));
    for (int e = 0; e < E; e++) wg[e * E + e] = 1.0f;
    for (int i = 0; i < T * E; i++) x[i] = logf(scores[i] / (1.0f - scores[i]));
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, cfg, T, 1), MOE_OK);
    assert_int_equal(moe_router_forward(r, x, wg, NULL, bias, cfg, T, 1, NULL), MOE_OK);
    free(x);
    free(wg);
    return r;
}

static void test_group_score_is_top_two(void **state)
{
    (void)state;
    /* 4 groups of 2. Group 0 holds the single best expert (0.95), group 1
     * the best pair (0.8 + 0.7 = 1.5 > 0.95 + 0.1): with topk_groups 1 the
     * token goes to group 1 only, and top-2 takes both its experts. */
    const float s[8] = {0.95f, 0.1f, 0.8f, 0.7f, 0.2f, 0.3f, 0.4f, 0.05f};
    moe_router_config cfg = options(8, 2, 8, 0.0, 0, MOE_SCORE_SIGMOID, 0.0, 0, 4, 1, MOE_AUX_SWITCH, 1);
    moe_route *r = route_scores(&cfg, s, NULL, 1);
    const uint8_t want[8] = {0, 0, 1, 1, 0, 0, 0, 0};
    assert_memory_equal(r->selected, want, 8);
    assert_float_equal(r->weight[2], 0.8, 1e-6);
    assert_float_equal(r->weight[3], 0.7, 1e-6);
    moe_route_destroy(r);
    /* topk_groups 2: groups 1 and 0 (1.05), expert 0 then 2 */
    cfg.topk_groups = 2;
    r = route_scores(&cfg, s, NULL, 1);
    const uint8_t want2[8] = {1, 0, 1, 0, 0, 0, 0, 0};
    assert_memory_equal(r->selected, want2, 8);
    assert_int_equal(r->topk[0], 0);
    assert_int_equal(r->topk[1], 2);
    moe_route_destroy(r);
    /* one expert per group: a group's score is its only expert */
    cfg = options(4, 1, 4, 0.0, 0, MOE_SCORE_SIGMOID, 0.0, 0, 4, 2, MOE_AUX_SWITCH, 1);
    const float s1[4] = {0.3f, 0.9f, 0.6f, 0.2f};
    r = route_scores(&cfg, s1, NULL, 1);
    assert_int_equal(r->topk[0], 1);
    moe_route_destroy(r);
    /* ties between groups go to the lower index */
    cfg = options(4, 1, 4, 0.0, 0, MOE_SCORE_SIGMOID, 0.0, 0, 2, 1, MOE_AUX_SWITCH, 1);
    const float s2[4] = {0.5f, 0.25f, 0.25f, 0.5f};
    r = route_scores(&cfg, s2, NULL, 1);
    assert_int_equal(r->topk[0], 0);
    moe_route_destroy(r);
}

static void test_expert_bias_selects_not_weights(void **state)
{
    (void)state;
    /* without the bias expert 0 and 1 win; a bias of +0.5 on expert 3 makes
     * it the first choice, its weight stays its score; route_scale 2 and
     * normalisation over the chosen scores (not score + bias) */
    const float s[4] = {0.9f, 0.8f, 0.3f, 0.35f}, b[4] = {0.0f, 0.0f, 0.0f, 0.5f};
    moe_router_config cfg = options(4, 2, 4, 0.0, 1, MOE_SCORE_SIGMOID, 2.0, 1, 1, 0, MOE_AUX_SWITCH, 1);
    moe_route *r = route_scores(&cfg, s, b, 1);
    assert_int_equal(r->topk[0], 0);
    assert_int_equal(r->topk[1], 3); /* 0.85 > 0.8 */
    assert_float_equal(r->weight[0], 2.0 * 0.9 / (0.9 + 0.35), 1e-6);
    assert_float_equal(r->weight[3], 2.0 * 0.35 / (0.9 + 0.35), 1e-6);
    assert_true(r->weight[1] == 0.0f);
    assert_int_equal(r->n_selected[3], 1);
    moe_route_destroy(r);
    /* forward without a bias while the option is on: an argument error */
    moe_route *q = NULL;
    float x[4] = {0}, wg[16] = {0};
    assert_int_equal(moe_route_create(&q, &cfg, 1, 1), MOE_OK);
    assert_int_equal(moe_router_forward(q, x, wg, NULL, NULL, &cfg, 1, 1, NULL), MOE_ERR_ARG);
    moe_route_destroy(q);
}

static void test_bias_update_rule(void **state)
{
    (void)state;
    /* mean load 5: under-loaded experts go up, over-loaded down, at the
     * mean (sign 0) they stay bitwise */
    const int64_t n[4] = {2, 5, 9, 4};
    float b[4] = {0.25f, -0.125f, 0.5f, 0.0f};
    moe_router_bias_update(b, n, 4, 0.01f);
    assert_true(b[0] == 0.25f + 0.01f);
    assert_true(b[1] == -0.125f);
    assert_true(b[2] == 0.5f - 0.01f);
    assert_true(b[3] == 0.0f + 0.01f);
    /* a mean that is not an integer: compared exactly in integers */
    const int64_t m[3] = {1, 1, 2}; /* mean 4/3 */
    float c[3] = {0, 0, 0};
    moe_router_bias_update(c, m, 3, 1.0f);
    assert_true(c[0] == 1.0f && c[1] == 1.0f && c[2] == -1.0f);
}

static void test_bad_options(void **state)
{
    (void)state;
    moe_router_config c = options(6, 2, 4, 0.0, 1, MOE_SCORE_SOFTMAX, 0.0, 0, 4, 0, MOE_AUX_SWITCH, 1);
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, &c, 4, 1), MOE_ERR_ARG); /* 4 groups of 6 experts */
    assert_non_null(strstr(moe_error_detail(), "n_groups=4"));
    c = options(8, 3, 4, 0.0, 1, MOE_SCORE_SOFTMAX, 0.0, 0, 4, 1, MOE_AUX_SWITCH, 1);
    assert_int_equal(moe_route_create(&r, &c, 4, 1), MOE_ERR_ARG); /* k = 3 > 1 group of 2 */
    assert_non_null(strstr(moe_error_detail(), "top_k=3"));
    c = options(8, 2, 4, 0.0, 1, MOE_SCORE_SOFTMAX, 0.0, 0, 2, 3, MOE_AUX_SWITCH, 1);
    assert_int_equal(moe_route_create(&r, &c, 4, 1), MOE_ERR_ARG); /* 3 of 2 groups */
    assert_non_null(strstr(moe_error_detail(), "topk_groups=3 exceeds n_groups=2"));
    c = tu_config(MOE_ROUTER_EXPERT_CHOICE, 4, 1, 4, 2.0, 0, 0);
    c.expert_bias = 1;
    assert_int_equal(moe_route_create(&r, &c, 4, 1), MOE_ERR_ARG);
    c = options(4, 2, 4, 0.0, 1, MOE_SCORE_SOFTMAX, -1.0, 0, 1, 0, MOE_AUX_SWITCH, 1);
    assert_int_equal(moe_route_create(&r, &c, 4, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "route_scale"));
    /* aux = seq: a group must split into whole sequences */
    c = options(4, 2, 4, 0.0, 1, MOE_SCORE_SOFTMAX, 0.0, 0, 1, 0, MOE_AUX_SEQ, 3);
    assert_int_equal(moe_route_create(&r, &c, 8, 1), MOE_OK);
    float x[32] = {0}, wg[16] = {0};
    assert_int_equal(moe_router_forward(r, x, wg, NULL, NULL, &c, 8, 1, NULL), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "group_seqs=3"));
    moe_route_destroy(r);
}

/* ---- the backward against finite differences ---- */

enum { GE = 8, GD = 6, GT = 16, GG = 2, GTG = GT / GG };

typedef struct {
    const moe_route *r;
    const moe_router_config *cfg;
    double R[GT * GE];
    double a, b;
} frozen;

/* The loss of routing.md sections 2-6 and 8 in double: L = sum R g +
 * a sum_g L_bal_g + b sum_g L_z_g, selection frozen. */
static double loss_d(const frozen *f, const double *x, const double *wg, double *weight, double *lbal)
{
    const moe_route *r = f->r;
    const moe_router_config *c = f->cfg;
    const int k = c->top_k, Q = c->aux == MOE_AUX_SEQ ? c->group_seqs : 1, Ts = GTG / Q;
    const double scale = c->route_scale > 0 ? c->route_scale : 1.0;
    double L = 0.0;
    for (int g = 0; g < GG; g++) {
        double lb = 0.0, z = 0.0;
        for (int q = 0; q < Q; q++) {
            double P[GE] = {0};
            int cnt[GE] = {0};
            for (int t = g * GTG + q * Ts; t < g * GTG + (q + 1) * Ts; t++) {
                double l[GE], p[GE], mx = -1e300, se = 0.0, S = 0.0, sum = 0.0;
                for (int e = 0; e < GE; e++) {
                    l[e] = 0.0;
                    for (int i = 0; i < GD; i++) l[e] += wg[e * GD + i] * x[t * GD + i];
                    mx = fmax(mx, l[e]);
                }
                for (int e = 0; e < GE; e++) se += exp(l[e] - mx);
                const double lse = mx + log(se);
                for (int e = 0; e < GE; e++) {
                    p[e] = c->score == MOE_SCORE_SIGMOID ? 1.0 / (1.0 + exp(-l[e])) : exp(l[e] - lse);
                    S += r->selected[t * GE + e] ? p[e] : 0.0;
                    sum += p[e];
                    cnt[e] += r->selected[t * GE + e];
                }
                z += lse * lse;
                for (int e = 0; e < GE; e++) {
                    /* switch: P from s; seq: from s normalised per token */
                    P[e] += c->aux == MOE_AUX_SEQ ? p[e] / sum : p[e];
                    double w = 0.0;
                    if (r->kept[t * GE + e]) w = (c->normalize_topk && k > 1 ? p[e] / S : p[e]) * scale;
                    if (weight) weight[t * GE + e] = w;
                    L += f->R[t * GE + e] * w;
                }
            }
            if (c->aux != MOE_AUX_NONE)
                for (int e = 0; e < GE; e++) lb += GE * ((double)cnt[e] / (Ts * k)) * (P[e] / Ts) / Q;
        }
        if (lbal) lbal[g] = lb;
        L += f->a * lb + f->b * z / GTG;
    }
    return L;
}

static void check_grad(const char *what, const float *ga, double *v, int n, const frozen *f, double *x, double *wg)
{
    double scale = 0.0, err = 0.0;
    for (int i = 0; i < n; i++) {
        const double h = 1e-5, v0 = v[i];
        v[i] = v0 + h;
        const double lp = loss_d(f, x, wg, NULL, NULL);
        v[i] = v0 - h;
        const double lm = loss_d(f, x, wg, NULL, NULL);
        v[i] = v0;
        const double fd = (lp - lm) / (2 * h);
        scale = fmax(scale, fabs(fd));
        err = fmax(err, fabs(ga[i] - fd));
    }
    if (!(scale > 1e-3) || err > 1e-3 * scale)
        fail_msg("%s: max |analytic - fd| = %.3g, max |fd| = %.3g", what, err, scale);
}

static void grad_case(const moe_router_config *cfg, double rs, double a, double b, uint64_t seed)
{
    uint64_t s = seed;
    float xf[GT * GD], wgf[GE * GD], bias[GE], dx[GT * GD] = {0}, dwg[GE * GD] = {0}, dweight[GT * GE];
    double x[GT * GD], wg[GE * GD];
    for (int i = 0; i < GT * GD; i++) x[i] = xf[i] = tu_sym(&s);
    for (int i = 0; i < GE * GD; i++) wg[i] = wgf[i] = 1.5f * tu_sym(&s);
    for (int e = 0; e < GE; e++) bias[e] = 0.2f * tu_sym(&s);
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, cfg, GT, GG), MOE_OK);
    assert_int_equal(moe_router_forward(r, xf, wgf, NULL, bias, cfg, GT, GG, NULL), MOE_OK);
    frozen f = {.r = r, .cfg = cfg, .a = a, .b = b};
    for (int i = 0; i < GT * GE; i++) {
        f.R[i] = rs * tu_sym(&s);
        dweight[i] = r->kept[i] ? (float)f.R[i] : 0.0f;
    }
    double w[GT * GE], lb[GG];
    loss_d(&f, x, wg, w, lb);
    for (int i = 0; i < GT * GE; i++) assert_float_equal(r->weight[i], w[i], 1e-5);
    for (int g = 0; g < GG; g++) assert_float_equal(r->load_balance[g], lb[g], 1e-5);
    assert_int_equal(moe_router_backward(dx, dwg, NULL, dweight, r, xf, wgf, NULL, cfg, (float)a, (float)b), MOE_OK);
    check_grad("dx", dx, x, GT * GD, &f, x, wg);
    check_grad("dwg", dwg, wg, GE * GD, &f, x, wg);
    moe_route_destroy(r);
}

static void test_options_grad(void **state)
{
    (void)state;
    const moe_router_config cases[] = {
        /* sigmoid, normalised, scaled, with capacity drops */
        options(GE, 2, GD, 0.75, 1, MOE_SCORE_SIGMOID, 2.5, 0, 1, 0, MOE_AUX_SWITCH, 1),
        /* sigmoid, not normalised, k = 1 */
        options(GE, 1, GD, 0.0, 0, MOE_SCORE_SIGMOID, 0.0, 0, 1, 0, MOE_AUX_SWITCH, 1),
        /* the expert bias and group limits move the frozen selection only */
        options(GE, 2, GD, 0.0, 1, MOE_SCORE_SIGMOID, 1.5, 1, 4, 2, MOE_AUX_SWITCH, 1),
        options(GE, 3, GD, 0.0, 1, MOE_SCORE_SOFTMAX, 0.5, 1, 2, 1, MOE_AUX_SWITCH, 1),
        /* the per-sequence balance loss, both scores, 2 sequences per group */
        options(GE, 2, GD, 0.0, 1, MOE_SCORE_SIGMOID, 0.0, 0, 1, 0, MOE_AUX_SEQ, 2),
        options(GE, 2, GD, 0.0, 0, MOE_SCORE_SOFTMAX, 0.0, 0, 1, 0, MOE_AUX_SEQ, 2),
        /* no balance loss: its coefficient must not matter */
        options(GE, 2, GD, 0.0, 1, MOE_SCORE_SOFTMAX, 0.0, 0, 1, 0, MOE_AUX_NONE, 1),
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        grad_case(&cases[i], 1.0, 0.0, 0.0, 400 + i);
        if (cases[i].aux != MOE_AUX_NONE) grad_case(&cases[i], 0.0, 3.0, 0.0, 400 + i);
        grad_case(&cases[i], 0.0, 0.0, 0.5, 400 + i);
        grad_case(&cases[i], 1.0, 3.0, 0.5, 400 + i);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_options_vs_ref),
        cmocka_unit_test(test_group_score_is_top_two),
        cmocka_unit_test(test_expert_bias_selects_not_weights),
        cmocka_unit_test(test_bias_update_rule),
        cmocka_unit_test(test_bad_options),
        cmocka_unit_test(test_options_grad),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
