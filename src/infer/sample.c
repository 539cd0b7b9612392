/* Sampling the next byte from logits: greedy, or temperature with top-k
 * and nucleus (top-p) cuts, drawn from the counter-based generator so the
 * choice is a pure function of (seed, position, sequence, logits). */
#include "infer/infer.h"

#include <math.h>
#include <stdlib.h>

#include "core/rng.h"

enum { V = 256 };

moe_status moe_infer_sampler_check(const moe_infer_sampler *s)
{
    if (!(s->temperature >= 0) || !isfinite(s->temperature))
        return moe_errorf(MOE_ERR_ARG, "temperature=%g must be a finite number >= 0 (0: greedy)", s->temperature);
    if (s->top_k < 0) return moe_errorf(MOE_ERR_ARG, "top_k=%d must be >= 0 (0: off)", s->top_k);
    if (!(s->top_p > 0 && s->top_p <= 1))
        return moe_errorf(MOE_ERR_ARG, "top_p=%g must be in (0, 1] (1: off)", s->top_p);
    return MOE_OK;
}

typedef struct {
    float logit;
    int id;
} cand;

/* Decreasing logit, lower byte first on ties: a total order, so the result
 * does not depend on the sort algorithm. */
static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

moe_status moe_infer_sample(int *out, const moe_infer_sampler *s, const float *logits, uint32_t position,
                            uint32_t sequence)
{
    if (!moe_all_finite(logits, V)) return moe_errorf(MOE_ERR_NONFINITE, "sample: non-finite logits");
    cand c[V];
    for (int i = 0; i < V; i++) c[i] = (cand){logits[i], i};
    qsort(c, V, sizeof c[0], cand_cmp);
    if (s->temperature == 0) {
        *out = c[0].id;
        return MOE_OK;
    }
    int n = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    double p[V], total = 0;
    for (int i = 0; i < n; i++) total += (p[i] = exp(((double)c[i].logit - c[0].logit) / s->temperature));
    if (s->top_p < 1) {
        /* the smallest prefix holding top_p of the (top-k) probability */
        double cum = 0;
        int keep = 0;
        while (keep < n && cum < s->top_p * total) cum += p[keep++];
        n = keep;
        total = cum;
    }
    const double u = moe_rng_uniform(s->seed, MOE_RNG_SAMPLE, position, sequence, 0, 0) * total;
    double cum = 0;
    for (int i = 0; i < n; i++) {
        cum += p[i];
        if (u < cum) {
            *out = c[i].id;
            return MOE_OK;
        }
    }
    *out = c[n - 1].id; /* u within rounding of the total */
    return MOE_OK;
}
