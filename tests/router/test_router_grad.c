/* Router backward against central finite differences of an independent
 * double-precision re-implementation of the loss
 *   L = sum_{t,e} R_{t,e} g_{t,e} + a sum_g L_bal_g + b sum_g L_z_g
 * with the selection (top-k, capacity, expert choice) and the noise draws
 * frozen from the float forward, as docs/routing.md section 7 says: selection is not
 * differentiated. Each term is also checked alone, so a missing term fails. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "router_test_util.h"

enum { E = 4, D = 6, T = 16, G = 2, TG = T / G };

/* What the double loss keeps fixed, taken from the float forward. */
typedef struct {
    const moe_route *r;
    const moe_router_config *cfg;
    double R[T * E];
    double a, b;
} frozen;

/* p (E) = softmax of l; returns logsumexp. */
static double softmax_d(double *p, const double *l)
{
    double mx = l[0], s = 0.0;
    for (int e = 1; e < E; e++) mx = fmax(mx, l[e]);
    for (int e = 0; e < E; e++) s += exp(l[e] - mx);
    for (int e = 0; e < E; e++) p[e] = exp(l[e] - mx) / s;
    return mx + log(s);
}

/* The loss from docs/routing.md sections 2-6 in double. Optionally returns the combine
 * weights (T, E) and per-group L_bal, L_z for comparison with the forward. */
static double loss_d(const frozen *f, const double *x, const double *wg, const double *wn, double *weight,
                     double *lbal, double *lz)
{
    const moe_route *r = f->r;
    const int k = f->cfg->top_k, tc = f->cfg->kind == MOE_ROUTER_TOKEN_CHOICE;
    double L = 0.0;
    for (int g = 0; g < G; g++) {
        double P[E] = {0}, z = 0.0;
        for (int t = g * TG; t < (g + 1) * TG; t++) {
            double l[E], p[E];
            for (int e = 0; e < E; e++) {
                double s = 0.0, pre = 0.0;
                for (int i = 0; i < D; i++) s += wg[e * D + i] * x[t * D + i];
                if (r->noise) {
                    for (int i = 0; i < D; i++) pre += wn[e * D + i] * x[t * D + i];
                    s += r->noise[t * E + e] * log1p(exp(pre)); /* softplus; |pre| is small here */
                }
                l[e] = s;
            }
            const double lse = softmax_d(p, l);
            z += lse * lse;
            double S = 0.0; /* sum of the chosen probabilities, dropped ones included */
            for (int e = 0; e < E; e++) S += r->selected[t * E + e] ? p[e] : 0.0;
            for (int e = 0; e < E; e++) {
                P[e] += p[e];
                double w = 0.0;
                if (r->kept[t * E + e]) w = tc && f->cfg->normalize_topk && k > 1 ? p[e] / S : p[e];
                if (weight) weight[t * E + e] = w;
                L += f->R[t * E + e] * w;
            }
        }
        double lb = 0.0;
        if (tc)
            for (int e = 0; e < E; e++) lb += E * ((double)r->n_selected[g * E + e] / (TG * k)) * (P[e] / TG);
        z /= TG;
        if (lbal) lbal[g] = lb;
        if (lz) lz[g] = z;
        L += f->a * lb + f->b * z;
    }
    return L;
}

typedef struct {
    moe_router_kind kind;
    int k, normalize, noisy;
    double cf;
    int want_drops;
} grad_case;

/* Compare the analytic gradient (float) with central differences (double). */
static void check_grad(const char *what, const float *ga, double *v, int n, const frozen *f, double *x, double *wg,
                       double *wn)
{
    double scale = 0.0, err = 0.0;
    double *fd = malloc((size_t)n * sizeof(double));
    for (int i = 0; i < n; i++) {
        const double h = 1e-5, v0 = v[i];
        v[i] = v0 + h;
        const double lp = loss_d(f, x, wg, wn, NULL, NULL, NULL);
        v[i] = v0 - h;
        const double lm = loss_d(f, x, wg, wn, NULL, NULL, NULL);
        v[i] = v0;
        fd[i] = (lp - lm) / (2 * h);
        scale = fmax(scale, fabs(fd[i]));
    }
    for (int i = 0; i < n; i++) err = fmax(err, fabs(ga[i] - fd[i]));
    if (!(scale > 1e-3) || err > 1e-3 * scale)
        fail_msg("%s: max |analytic - fd| = %.3g, max |fd| = %.3g", what, err, scale);
    free(fd);
}

static void run_case(const grad_case *c, double r_scale, double a, double b, uint64_t seed)
{
    const moe_router_config cfg = tu_config(c->kind, E, c->k, D, c->cf, c->normalize, c->noisy);
    uint64_t s = seed;
    float xf[T * D], wgf[E * D], wnf[E * D], dx[T * D] = {0}, dwg[E * D] = {0}, dwn[E * D] = {0}, dweight[T * E];
    double x[T * D], wg[E * D], wn[E * D];
    for (int i = 0; i < T * D; i++) x[i] = xf[i] = tu_sym(&s);
    for (int i = 0; i < E * D; i++) wg[i] = wgf[i] = 1.5f * tu_sym(&s), wn[i] = wnf[i] = tu_sym(&s);
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, &cfg, T, G), MOE_OK);
    const moe_noise_key key = {.seed = 9, .step = 1, .layer = 2, .token0 = 77};
    assert_int_equal(moe_router_forward(r, xf, wgf, wnf, NULL, &cfg, T, G, c->noisy ? &key : NULL), MOE_OK);
    assert_true((r->noise != NULL) == (c->noisy != 0));
    int drops = 0;
    for (int i = 0; i < G * E; i++) drops += r->n_dropped[i];
    if (c->want_drops) assert_true(drops > 0);

    frozen f = {.r = r, .cfg = &cfg, .a = a, .b = b};
    for (int i = 0; i < T * E; i++) {
        f.R[i] = r_scale * tu_sym(&s);
        dweight[i] = r->kept[i] ? (float)f.R[i] : 0.0f; /* dL/dg of kept assignments */
    }
    /* The re-implementation reproduces the forward. */
    double w[T * E], lb[G], lz[G];
    loss_d(&f, x, wg, wn, w, lb, lz);
    for (int i = 0; i < T * E; i++) assert_float_equal(r->weight[i], w[i], 1e-5);
    for (int g = 0; g < G; g++) {
        assert_float_equal(r->load_balance[g], lb[g], 1e-5);
        assert_float_equal(r->z_loss[g], lz[g], 1e-5);
    }

    assert_int_equal(moe_router_backward(dx, dwg, c->noisy ? dwn : NULL, dweight, r, xf, wgf, wnf, &cfg, (float)a,
                                         (float)b),
                     MOE_OK);
    check_grad("dx", dx, x, T * D, &f, x, wg, wn);
    check_grad("dwg", dwg, wg, E * D, &f, x, wg, wn);
    if (c->noisy) check_grad("dwn", dwn, wn, E * D, &f, x, wg, wn);
    moe_route_destroy(r);
}

/* Every case with each term alone (so dropping one fails) and all together. */
static void run_all_terms(const grad_case *c, uint64_t seed)
{
    run_case(c, 1.0, 0.0, 0.0, seed);
    if (c->kind == MOE_ROUTER_TOKEN_CHOICE) run_case(c, 0.0, 3.0, 0.0, seed);
    run_case(c, 0.0, 0.0, 0.5, seed);
    run_case(c, 1.0, 3.0, 0.5, seed);
}

static void test_grad_token_choice(void **state)
{
    (void)state;
    const grad_case cases[] = {
        {MOE_ROUTER_TOKEN_CHOICE, 1, 1, 0, 0.75, 1}, /* k = 1: normalize_topk ignored */
        {MOE_ROUTER_TOKEN_CHOICE, 2, 1, 0, 0.75, 1}, /* dropped entries still in the denominator */
        {MOE_ROUTER_TOKEN_CHOICE, 2, 0, 0, 1.0, 0},
        {MOE_ROUTER_TOKEN_CHOICE, 2, 1, 0, 0.0, 0},  /* dropless */
        {MOE_ROUTER_TOKEN_CHOICE, 3, 1, 0, 0.6, 1},
        {MOE_ROUTER_TOKEN_CHOICE, 3, 0, 0, 0.6, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_all_terms(&cases[i], 100 + i);
}

static void test_grad_token_choice_noise(void **state)
{
    (void)state;
    const grad_case cases[] = {
        {MOE_ROUTER_TOKEN_CHOICE, 1, 0, 1, 1.0, 0},
        {MOE_ROUTER_TOKEN_CHOICE, 2, 1, 1, 0.75, 1},
        {MOE_ROUTER_TOKEN_CHOICE, 3, 1, 1, 0.0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_all_terms(&cases[i], 200 + i);
}

static void test_grad_expert_choice(void **state)
{
    (void)state;
    const grad_case cases[] = {
        {MOE_ROUTER_EXPERT_CHOICE, 0, 0, 0, 2.0, 0},
        {MOE_ROUTER_EXPERT_CHOICE, 0, 0, 0, 1.0, 0},
        {MOE_ROUTER_EXPERT_CHOICE, 0, 0, 1, 1.5, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_all_terms(&cases[i], 300 + i);
}

/* The backward accumulates: a second call adds the same amount again. */
static void test_grad_accumulates(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(MOE_ROUTER_TOKEN_CHOICE, E, 2, D, 1.0, 1, 0);
    uint64_t s = 17;
    float x[T * D], wg[E * D], dx1[T * D] = {0}, dwg1[E * D] = {0}, dx2[T * D], dwg2[E * D], dweight[T * E];
    for (int i = 0; i < T * D; i++) x[i] = tu_sym(&s), dx2[i] = 1.0f;
    for (int i = 0; i < E * D; i++) wg[i] = tu_sym(&s), dwg2[i] = -2.0f;
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, &cfg, T, G), MOE_OK);
    assert_int_equal(moe_router_forward(r, x, wg, NULL, NULL, &cfg, T, G, NULL), MOE_OK);
    for (int i = 0; i < T * E; i++) dweight[i] = r->kept[i] ? tu_sym(&s) : 0.0f;
    assert_int_equal(moe_router_backward(dx1, dwg1, NULL, dweight, r, x, wg, NULL, &cfg, 0.1f, 0.1f), MOE_OK);
    assert_int_equal(moe_router_backward(dx2, dwg2, NULL, dweight, r, x, wg, NULL, &cfg, 0.1f, 0.1f), MOE_OK);
    for (int i = 0; i < T * D; i++) assert_float_equal(dx2[i], 1.0f + dx1[i], 1e-6);
    for (int i = 0; i < E * D; i++) assert_float_equal(dwg2[i], -2.0f + dwg1[i], 1e-6);
    moe_route_destroy(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_token_choice),
        cmocka_unit_test(test_grad_token_choice_noise),
        cmocka_unit_test(test_grad_expert_choice),
        cmocka_unit_test(test_grad_accumulates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
