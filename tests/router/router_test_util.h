/* Helpers shared by the router tests: a small deterministic generator and
 * routing of explicit probabilities through the real forward. */
#ifndef MOE_ROUTER_TEST_UTIL_H
#define MOE_ROUTER_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "router/router.h"

/* splitmix64: uniform in [0, 1). */
static inline double tu_uniform(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform in [-1, 1). */
static inline float tu_sym(uint64_t *s) { return (float)(2.0 * tu_uniform(s) - 1.0); }

static inline moe_router_config tu_config(moe_router_kind kind, int E, int k, int d, double cf, int normalize,
                                          int noise)
{
    moe_router_config c = {.n_experts = E, .top_k = k, .d_model = d, .kind = kind,
                           .capacity_factor = cf, .normalize_topk = normalize, .noise = noise};
    return c;
}

/* Route T tokens whose probabilities are the rows of probs (T, E): with
 * d = E and W_g = I, x_t = log p_t + shift_t gives softmax(l_t) = p_t and
 * logsumexp(l_t) = shift_t (shift may be NULL). Returns the route or NULL. */
static inline moe_route *tu_route_probs(const moe_router_config *cfg, const float *probs, const float *shift,
                                        int T, int G)
{
    const int E = cfg->n_experts;
    float *x = calloc((size_t)T * E, sizeof(float)), *wg = calloc((size_t)E * E, sizeof(float));
    moe_route *r = NULL;
    for (int e = 0; e < E; e++) wg[e * E + e] = 1.0f;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) x[t * E + e] = logf(probs[t * E + e]) + (shift ? shift[t] : 0.0f);
    if (moe_route_create(&r, cfg, T, G) != MOE_OK ||
        moe_router_forward(r, x, wg, NULL, NULL, cfg, T, G, NULL) != MOE_OK) {
        moe_route_destroy(r);
        r = NULL;
    }
    free(x);
    free(wg);
    return r;
}

#endif
