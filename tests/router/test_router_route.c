/* Router forward: capacity rounding, hand-worked routing plans from
 * docs/routing.md (masks and weights written out here), the fast path
 * against moe_router_assign_ref on random and tied inputs, rank-independent
 * noise keyed by the global token, and rejection of bad input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/rng.h"
#include "router_test_util.h"

#define TC MOE_ROUTER_TOKEN_CHOICE
#define EC MOE_ROUTER_EXPERT_CHOICE

static void test_capacity(void **state)
{
    (void)state;
    moe_router_config c = tu_config(TC, 2, 2, 4, 1.1, 1, 0);
    assert_int_equal(moe_router_capacity(&c, 50), 55); /* docs/routing.md: 2*50*1.1/2 is 55, not 56 */
    c = tu_config(TC, 8, 2, 4, 1.25, 1, 0);
    assert_int_equal(moe_router_capacity(&c, 4096), 1280);
    assert_int_equal(moe_router_capacity(&c, 100), 32); /* 31.25 rounds up */
    c.capacity_factor = 0.0;
    assert_int_equal(moe_router_capacity(&c, 100), -1); /* dropless */
    c.capacity_factor = -1.0;
    assert_int_equal(moe_router_capacity(&c, 100), -1);
    c = tu_config(EC, 3, 0, 4, 4.0, 0, 0);
    assert_int_equal(moe_router_capacity(&c, 3), 3); /* ceil(3*4/3) = 4, clipped to T */
    c = tu_config(EC, 3, 0, 4, 1.0, 0, 0);
    assert_int_equal(moe_router_capacity(&c, 10), 4);
    c = tu_config(EC, 8, 0, 4, 2.0, 0, 0);
    assert_int_equal(moe_router_capacity(&c, 4096), 1024);
}

/* An expected plan for one group of T tokens over E experts. */
typedef struct {
    const uint8_t *selected, *kept; /* (T, E) */
    const float *weight;            /* (T, E) */
    const int *n_selected, *n_kept, *n_dropped; /* (E) */
} plan;

static void check_group(const plan *want, const float *weight, const uint8_t *sel, const uint8_t *kept,
                        const int *ns, const int *nk, const int *nd, int T, int E)
{
    assert_memory_equal(sel, want->selected, (size_t)T * E);
    assert_memory_equal(kept, want->kept, (size_t)T * E);
    for (int i = 0; i < T * E; i++) assert_float_equal(weight[i], want->weight[i], 2e-6);
    assert_memory_equal(ns, want->n_selected, E * sizeof(int));
    assert_memory_equal(nk, want->n_kept, E * sizeof(int));
    assert_memory_equal(nd, want->n_dropped, E * sizeof(int));
}

/* Checks the plan with the reference (from probs directly) and with the real
 * forward on G copies of the group (capacity is per group). */
static moe_route *check_plan(const moe_router_config *cfg, const float *probs, const float *shift, int T, int G,
                             const plan *want)
{
    const int E = cfg->n_experts;
    float w[64];
    uint8_t sel[64], kept[64];
    int ns[8], nk[8], nd[8];
    moe_router_assign_ref(w, sel, kept, ns, nk, nd, probs, NULL, cfg, T);
    check_group(want, w, sel, kept, ns, nk, nd, T, E);

    float *p = malloc((size_t)G * T * E * sizeof(float)), *sh = malloc((size_t)G * T * sizeof(float));
    for (int g = 0; g < G; g++) {
        memcpy(p + (size_t)g * T * E, probs, (size_t)T * E * sizeof(float));
        for (int t = 0; t < T; t++) sh[g * T + t] = shift ? shift[t] : 0.0f;
    }
    moe_route *r = tu_route_probs(cfg, p, sh, G * T, G);
    assert_non_null(r);
    for (int g = 0; g < G; g++) {
        const size_t o = (size_t)g * T * E;
        check_group(want, r->weight + o, r->selected + o, r->kept + o, r->n_selected + g * E, r->n_kept + g * E,
                    r->n_dropped + g * E, T, E);
    }
    free(p);
    free(sh);
    return r;
}

/* E = 3, k = 2, T = 3, C = ceil(2*3*0.5/3) = 1. Token 1 ties experts 0 and 2
 * (0.2): expert 0 wins. First choices (0, 1, 2) all fit; every second choice
 * is dropped. Token-major order would instead give token 0 both of its
 * experts and drop token 1's first choice. */
static const float plan_a_probs[9] = {0.5f, 0.3f, 0.2f,
                                      0.2f, 0.6f, 0.2f,
                                      0.1f, 0.2f, 0.7f};

static void test_plan_fill_order(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(TC, 3, 2, 3, 0.5, 1, 0);
    assert_int_equal(moe_router_capacity(&cfg, 3), 1);
    const uint8_t sel[9] = {1, 1, 0, 1, 1, 0, 0, 1, 1};
    const uint8_t kept[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    const float w[9] = {0.5f / 0.8f, 0, 0, 0, 0.6f / 0.8f, 0, 0, 0, 0.7f / 0.9f}; /* not renormalized */
    const int ns[3] = {2, 3, 1}, nk[3] = {1, 1, 1}, nd[3] = {1, 2, 0};
    const plan want = {sel, kept, w, ns, nk, nd};
    const float shift[3] = {1.0f, -2.0f, 0.5f};
    moe_route *r = check_plan(&cfg, plan_a_probs, shift, 3, 2, &want);
    const int topk[6] = {0, 1, 1, 0, 2, 1};
    assert_memory_equal(r->topk, topk, sizeof topk);
    assert_memory_equal(r->topk + 6, topk, sizeof topk);
    assert_float_equal(r->topk_sum[1], 0.8f, 1e-6);
    /* L_bal = 3 * sum_e (n_sel/6) * P_e with P = (0.8, 1.1, 1.1)/3: exactly 1.
     * L_z = mean of shift^2 = (1 + 4 + 0.25)/3. */
    for (int g = 0; g < 2; g++) {
        assert_float_equal(r->load_balance[g], 1.0f, 1e-6);
        assert_float_equal(r->z_loss[g], 1.75f, 1e-5);
        assert_float_equal(r->lse[3 * g + 1], -2.0f, 1e-6);
    }
    moe_route_destroy(r);
}

static void test_plan_dropless(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(TC, 3, 2, 3, 0.0, 1, 0);
    const uint8_t sel[9] = {1, 1, 0, 1, 1, 0, 0, 1, 1};
    const float w[9] = {0.625f, 0.375f, 0, 0.25f, 0.75f, 0, 0, 0.2f / 0.9f, 0.7f / 0.9f};
    const int ns[3] = {2, 3, 1}, nd[3] = {0, 0, 0};
    const plan want = {sel, sel, w, ns, ns, nd};
    moe_route_destroy(check_plan(&cfg, plan_a_probs, NULL, 3, 1, &want));
}

/* k = 1: g = p even with normalize_topk = 1. T = 4, C = ceil(4*0.75/3) = 1:
 * token 3's only choice (expert 0) is dropped. */
static void test_plan_k1(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(TC, 3, 1, 3, 0.75, 1, 0);
    const float probs[12] = {0.5f, 0.3f, 0.2f, 0.2f, 0.6f, 0.2f, 0.1f, 0.2f, 0.7f, 0.6f, 0.3f, 0.1f};
    const uint8_t sel[12] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0};
    const uint8_t kept[12] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0};
    const float w[12] = {0.5f, 0, 0, 0, 0.6f, 0, 0, 0, 0.7f, 0, 0, 0};
    const int ns[3] = {2, 1, 1}, nk[3] = {1, 1, 1}, nd[3] = {1, 0, 0};
    const plan want = {sel, kept, w, ns, nk, nd};
    moe_route_destroy(check_plan(&cfg, probs, NULL, 4, 2, &want));
}

/* k = E = 3: every expert chosen, g = p / 1. C = ceil(3*3*0.5/3) = 2.
 * Rank 1 fills one slot each; rank 2: token 0 -> e1 kept, token 1 -> e0
 * (tie with e2) kept, token 2 -> e1 dropped; rank 3: token 0 -> e2 kept,
 * token 1 -> e2 dropped, token 2 -> e0 dropped. */
static void test_plan_k_equals_e(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(TC, 3, 3, 3, 0.5, 1, 0);
    const uint8_t sel[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    const uint8_t kept[9] = {1, 1, 1, 1, 1, 0, 0, 0, 1};
    const float w[9] = {0.5f, 0.3f, 0.2f, 0.2f, 0.6f, 0, 0, 0, 0.7f};
    const int ns[3] = {3, 3, 3}, nk[3] = {2, 2, 2}, nd[3] = {1, 1, 1};
    const plan want = {sel, kept, w, ns, nk, nd};
    moe_route_destroy(check_plan(&cfg, plan_a_probs, NULL, 3, 1, &want));
}

/* E = 1: p = 1 for every token; C = ceil(4*0.5) = 2 keeps the first two. */
static void test_plan_single_expert(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(TC, 1, 1, 1, 0.5, 1, 0);
    const float probs[4] = {1, 1, 1, 1}, shift[4] = {1, 2, 3, 4};
    const uint8_t sel[4] = {1, 1, 1, 1}, kept[4] = {1, 1, 0, 0};
    const float w[4] = {1, 1, 0, 0};
    const int ns[1] = {4}, nk[1] = {2}, nd[1] = {2};
    const plan want = {sel, kept, w, ns, nk, nd};
    moe_route *r = check_plan(&cfg, probs, shift, 4, 1, &want);
    assert_float_equal(r->load_balance[0], 1.0f, 1e-6);
    assert_float_equal(r->z_loss[0], 7.5f, 1e-5); /* (1 + 4 + 9 + 16) / 4 */
    moe_route_destroy(r);
}

/* Expert choice, c = 4: C = min(3, 4) = 3, every expert takes every token. */
static void test_plan_ec_clipped(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(EC, 3, 0, 3, 4.0, 0, 0);
    const uint8_t all[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    const int ns[3] = {3, 3, 3}, nd[3] = {0, 0, 0};
    const plan want = {all, all, plan_a_probs, ns, ns, nd};
    moe_route *r = check_plan(&cfg, plan_a_probs, NULL, 3, 2, &want);
    assert_float_equal(r->load_balance[0], 0.0f, 0.0);
    moe_route_destroy(r);
}

/* Expert choice, c = 1, C = 1: experts 0 and 1 both take token 0, expert 2
 * takes token 2, token 1 is taken by nobody. */
static void test_plan_ec_unchosen_token(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(EC, 3, 0, 3, 1.0, 0, 0);
    const float probs[9] = {0.5f, 0.45f, 0.05f, 0.4f, 0.4f, 0.2f, 0.1f, 0.2f, 0.7f};
    const uint8_t kept[9] = {1, 1, 0, 0, 0, 0, 0, 0, 1};
    const float w[9] = {0.5f, 0.45f, 0, 0, 0, 0, 0, 0, 0.7f};
    const int ns[3] = {1, 1, 1}, nd[3] = {0, 0, 0};
    const plan want = {kept, kept, w, ns, ns, nd};
    moe_route_destroy(check_plan(&cfg, probs, NULL, 3, 1, &want));
}

/* Expert choice ties: tokens 0, 2, 3 are identical; C = 2. Expert 0 takes
 * token 1 (0.7) then token 0 (lowest of the tied); expert 1 takes 0 and 2. */
static void test_plan_ec_ties(void **state)
{
    (void)state;
    const moe_router_config cfg = tu_config(EC, 2, 0, 2, 1.0, 0, 0);
    const float probs[8] = {0.5f, 0.5f, 0.7f, 0.3f, 0.5f, 0.5f, 0.5f, 0.5f};
    const uint8_t kept[8] = {1, 1, 1, 0, 0, 1, 0, 0};
    const float w[8] = {0.5f, 0.5f, 0.7f, 0, 0, 0.5f, 0, 0};
    const int ns[2] = {2, 2}, nd[2] = {0, 0};
    const plan want = {kept, kept, w, ns, ns, nd};
    moe_route_destroy(check_plan(&cfg, probs, NULL, 4, 3, &want));
}

/* Random inputs; with ties = 1 two experts share a gate row and tokens come
 * from a pool of three, so probabilities tie both across experts and
 * across tokens. */
static void random_inputs(float *x, float *wg, int T, int E, int d, int ties, uint64_t *s)
{
    for (int i = 0; i < E * d; i++) wg[i] = tu_sym(s);
    for (int i = 0; i < T * d; i++) x[i] = 2.0f * tu_sym(s);
    if (!ties) return;
    if (E > 1) memcpy(wg + d, wg, (size_t)d * sizeof(float));
    for (int t = 3; t < T; t++) memcpy(x + (size_t)t * d, x + (size_t)(t % 3) * d, (size_t)d * sizeof(float));
}

static void test_fast_vs_ref(void **state)
{
    (void)state;
    uint64_t s = 11;
    const int d = 5, G = 3;
    const int Es[] = {1, 2, 3, 8, 16};
    const int Tgs[] = {1, 7, 40};
    const int ks[] = {1, 2, 3, 5, 8, 16};
    const double cfs[] = {0.0, 0.3, 1.0, 1.25, 2.5};
    float *x = malloc((size_t)G * 40 * d * sizeof(float)), *wg = malloc((size_t)16 * d * sizeof(float));
    float *w = malloc((size_t)40 * 16 * sizeof(float));
    uint8_t *sel = malloc(40 * 16), *kept = malloc(40 * 16);
    int *topk_ref = malloc((size_t)G * 40 * 16 * sizeof(int));
    int ns[16], nk[16], nd[16], n_cases = 0, n_drops = 0;
    for (int kind = 0; kind < 2; kind++)
        for (size_t ie = 0; ie < sizeof Es / sizeof Es[0]; ie++)
            for (size_t ik = 0; ik < (kind == EC ? 1 : sizeof ks / sizeof ks[0]) && ks[ik] <= Es[ie]; ik++)
                for (size_t ic = 0; ic < sizeof cfs / sizeof cfs[0]; ic++)
                    for (size_t it = 0; it < sizeof Tgs / sizeof Tgs[0]; it++)
                        for (int ties = 0; ties < 2; ties++) {
                            const int E = Es[ie], k = ks[ik], Tg = Tgs[it], T = G * Tg;
                            const double cf = kind == EC && cfs[ic] <= 0 ? 0.5 : cfs[ic];
                            const moe_router_config cfg = tu_config(kind, E, k, d, cf, (int)(ic + ties) % 2, 0);
                            moe_route *r = NULL;
                            assert_int_equal(moe_route_create(&r, &cfg, T, G), MOE_OK);
                            random_inputs(x, wg, T, E, d, ties, &s);
                            assert_int_equal(moe_router_forward(r, x, wg, NULL, NULL, &cfg, T, G, NULL), MOE_OK);
                            if (kind == TC) {
                                moe_topk_rows_ref(topk_ref, r->probs, T, E, k);
                                assert_memory_equal(r->topk, topk_ref, (size_t)T * k * sizeof(int));
                            }
                            for (int g = 0; g < G; g++) {
                                const size_t o = (size_t)g * Tg * E;
                                moe_router_assign_ref(w, sel, kept, ns, nk, nd, r->probs + o, NULL, &cfg, Tg);
                                const plan want = {sel, kept, w, ns, nk, nd};
                                check_group(&want, r->weight + o, r->selected + o, r->kept + o,
                                            r->n_selected + g * E, r->n_kept + g * E, r->n_dropped + g * E, Tg, E);
                                /* L_bal from the reference counts, in double. */
                                double lb = 0.0;
                                if (kind == TC)
                                    for (int e = 0; e < E; e++) {
                                        double P = 0.0;
                                        for (int t = 0; t < Tg; t++) P += r->probs[o + (size_t)t * E + e];
                                        lb += E * ((double)ns[e] / (Tg * k)) * (P / Tg);
                                    }
                                assert_float_equal(r->load_balance[g], lb, 1e-5);
                                for (int e = 0; e < E; e++) n_drops += nd[e];
                            }
                            moe_route_destroy(r);
                            n_cases++;
                        }
    assert_true(n_cases > 300);
    assert_true(n_drops > 0); /* the capacity path was exercised */
    free(x);
    free(wg);
    free(w);
    free(sel);
    free(kept);
    free(topk_ref);
}

/* Noise depends on the global token, not on how tokens are split into
 * calls (or ranks): one call over [0, T) equals two calls over halves. */
static void test_noise_keyed_by_global_token(void **state)
{
    (void)state;
    const int E = 8, d = 16, T = 64;
    const moe_router_config cfg = tu_config(TC, E, 2, d, 1.25, 1, 1);
    uint64_t s = 5;
    float *x = malloc((size_t)T * d * sizeof(float)), *wg = malloc((size_t)E * d * sizeof(float));
    float *wn = malloc((size_t)E * d * sizeof(float));
    for (int i = 0; i < T * d; i++) x[i] = tu_sym(&s);
    for (int i = 0; i < E * d; i++) wg[i] = tu_sym(&s), wn[i] = tu_sym(&s);
    moe_route *whole = NULL, *half = NULL, *clean = NULL;
    assert_int_equal(moe_route_create(&whole, &cfg, T, 1), MOE_OK);
    assert_int_equal(moe_route_create(&half, &cfg, T / 2, 1), MOE_OK);
    assert_int_equal(moe_route_create(&clean, &cfg, T, 1), MOE_OK);
    const moe_noise_key key = {.seed = 42, .step = 7, .layer = 3, .token0 = 1000};
    assert_int_equal(moe_router_forward(whole, x, wg, wn, NULL, &cfg, T, 1, &key), MOE_OK);
    assert_non_null(whole->noise);
    assert_int_equal(moe_router_forward(clean, x, wg, wn, NULL, &cfg, T, 1, NULL), MOE_OK);
    assert_null(clean->noise); /* key == NULL: evaluation, no noise */
    for (int h = 0; h < 2; h++) {
        moe_noise_key kh = key;
        kh.token0 = key.token0 + h * T / 2;
        assert_int_equal(moe_router_forward(half, x + (size_t)h * T / 2 * d, wg, wn, NULL, &cfg, T / 2, 1, &kh), MOE_OK);
        const size_t o = (size_t)h * T / 2 * E, n = (size_t)T / 2 * E * sizeof(float);
        /* The draws are Philox values keyed by the global token: the same
         * bits. The logits come from cblas_sgemm, whose bits for a row may
         * depend on how many rows it multiplies (OpenBLAS's Haswell kernels
         * do), so they are held to a tolerance instead. */
        assert_memory_equal(half->noise, whole->noise + o, n);
        for (size_t i = 0; i < (size_t)T / 2 * E; i++)
            assert_float_equal(half->logits[i], whole->logits[o + i], 1e-5f * (1.0f + fabsf(whole->logits[o + i])));
    }
    /* The draw is the documented one, and it moves the logits by n softplus(W_n x). */
    int moved = 0;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            const size_t i = (size_t)t * E + e;
            const float n = (float)moe_rng_normal(42, MOE_RNG_ROUTER_NOISE, (uint32_t)(1000 + t), (uint32_t)e, 3, 7);
            assert_true(whole->noise[i] == n);
            const float pre = whole->noise_pre[i], sp = pre > 0 ? pre + log1pf(expf(-pre)) : log1pf(expf(pre));
            assert_float_equal(whole->logits[i], clean->logits[i] + n * sp, 1e-5);
            moved += whole->logits[i] != clean->logits[i];
        }
    assert_true(moved > T * E / 2);
    moe_route_destroy(whole);
    moe_route_destroy(half);
    moe_route_destroy(clean);
    free(x);
    free(wg);
    free(wn);
}

/* status is MOE_ERR_ARG (or want) with a detail that names `field`. */
#define assert_fails(call, want, field)                                         \
    do {                                                                        \
        moe_error_clear();                                                      \
        assert_int_equal((call), (want));                                       \
        if (!strstr(moe_error_detail(), (field)))                               \
            fail_msg("detail '%s' does not name '%s'", moe_error_detail(), (field)); \
    } while (0)

static void test_bad_config(void **state)
{
    (void)state;
    const moe_router_config ok = tu_config(TC, 4, 2, 8, 1.0, 1, 0);
    assert_int_equal(moe_router_config_check(&ok), MOE_OK);
    moe_router_config c = ok;
    c.top_k = 5;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "top_k=5 exceeds n_experts=4");
    c = ok, c.top_k = 0;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "top_k");
    c = ok, c.n_experts = 0;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "n_experts");
    c = ok, c.d_model = 0;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "d_model");
    c = ok, c.kind = (moe_router_kind)7;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "kind");
    c = ok, c.normalize_topk = 2;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "normalize_topk");
    c = ok, c.noise = -1;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "noise");
    c = ok, c.capacity_factor = NAN;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "capacity_factor");
    c = ok, c.kind = MOE_ROUTER_EXPERT_CHOICE, c.capacity_factor = 0.0;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "capacity_factor");
    c.capacity_factor = -2.0;
    assert_fails(moe_router_config_check(&c), MOE_ERR_ARG, "capacity_factor");
    c.top_k = 99; /* ignored by expert choice */
    c.capacity_factor = 2.0;
    assert_int_equal(moe_router_config_check(&c), MOE_OK);
    c = ok, c.top_k = 0;
    moe_route *r = (moe_route *)&r; /* must be reset to NULL on failure */
    assert_fails(moe_route_create(&r, &c, 8, 1), MOE_ERR_ARG, "top_k");
    assert_null(r);
    assert_fails(moe_route_create(&r, &ok, 0, 1), MOE_ERR_ARG, "T_max");
    assert_fails(moe_route_create(&r, &ok, 8, -1), MOE_ERR_ARG, "G_max");
    assert_fails(moe_router_config_check(NULL), MOE_ERR_ARG, "NULL");
}

static void test_bad_forward_backward(void **state)
{
    (void)state;
    const int E = 4, d = 8, T = 8;
    const moe_router_config cfg = tu_config(TC, E, 2, d, 1.0, 1, 1);
    float x[T * d], wg[E * d], wn[E * d], dx[T * d], dwg[E * d], dweight[T * E];
    uint64_t s = 3;
    for (int i = 0; i < T * d; i++) x[i] = tu_sym(&s);
    for (int i = 0; i < E * d; i++) wg[i] = tu_sym(&s), wn[i] = tu_sym(&s);
    memset(dx, 0, sizeof dx);
    memset(dwg, 0, sizeof dwg);
    memset(dweight, 0, sizeof dweight);
    moe_route *r = NULL;
    assert_int_equal(moe_route_create(&r, &cfg, T, 2), MOE_OK);
    assert_fails(moe_router_backward(dx, dwg, NULL, dweight, r, x, wg, wn, &cfg, 0, 0), MOE_ERR_ARG, "before");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, 0, 1, NULL), MOE_ERR_ARG, "T=0");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, -4, 1, NULL), MOE_ERR_ARG, "T=-4");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, T, 0, NULL), MOE_ERR_ARG, "G=0");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, 6, 4, NULL), MOE_ERR_ARG, "G=4");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, 16, 1, NULL), MOE_ERR_ARG, "T_max");
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, 6, 3, NULL), MOE_ERR_ARG, "G_max");
    moe_router_config other = cfg;
    other.n_experts = 8;
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &other, T, 1, NULL), MOE_ERR_ARG, "n_experts");
    other = cfg, other.top_k = 3;
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &other, T, 1, NULL), MOE_ERR_ARG, "top_k");
    const moe_noise_key key = {1, 2, 3, 0};
    assert_fails(moe_router_forward(r, x, wg, NULL, NULL, &cfg, T, 1, &key), MOE_ERR_ARG, "W_n");
    assert_fails(moe_router_forward(r, NULL, wg, wn, NULL, &cfg, T, 1, NULL), MOE_ERR_ARG, "x");

    x[13] = NAN;
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, T, 1, NULL), MOE_ERR_NONFINITE, "x");
    x[13] = -INFINITY;
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, T, 1, NULL), MOE_ERR_NONFINITE, "x");
    x[13] = 1e30f; /* finite x whose logits overflow */
    wg[13 % d] = 1e30f;
    assert_fails(moe_router_forward(r, x, wg, wn, NULL, &cfg, T, 1, NULL), MOE_ERR_NONFINITE, "logits");
    x[13] = 0.5f;
    wg[13 % d] = 0.5f;

    /* A noisy forward needs W_n and dwn in the backward. */
    assert_int_equal(moe_router_forward(r, x, wg, wn, NULL, &cfg, T, 2, &key), MOE_OK);
    assert_fails(moe_router_backward(dx, dwg, NULL, dweight, r, x, wg, wn, &cfg, 0, 0), MOE_ERR_ARG, "dwn");
    /* A route created without noise cannot run a noisy forward. */
    moe_router_config quiet = cfg;
    quiet.noise = 0;
    moe_route *q = NULL;
    assert_int_equal(moe_route_create(&q, &quiet, T, 1), MOE_OK);
    assert_fails(moe_router_forward(q, x, wg, wn, NULL, &cfg, T, 1, &key), MOE_ERR_ARG, "noise");
    moe_route_destroy(q);
    moe_route_destroy(r);
    moe_route_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_plan_fill_order),
        cmocka_unit_test(test_plan_dropless),
        cmocka_unit_test(test_plan_k1),
        cmocka_unit_test(test_plan_k_equals_e),
        cmocka_unit_test(test_plan_single_expert),
        cmocka_unit_test(test_plan_ec_clipped),
        cmocka_unit_test(test_plan_ec_unchosen_token),
        cmocka_unit_test(test_plan_ec_ties),
        cmocka_unit_test(test_fast_vs_ref),
        cmocka_unit_test(test_noise_keyed_by_global_token),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_bad_forward_backward),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
