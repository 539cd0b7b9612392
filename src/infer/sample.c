/* Sampling the next token from logits: greedy, or temperature with top-k
 * and nucleus (top-p) cuts, drawn from the counter-based generator so the
 * choice is a pure function of (seed, position, sequence, logits).
 *
 * Vocabularies reach 2^24 ids, so the fast path never sorts all of them:
 * top-k is a partial selection of k candidates, sorted; without top-k the
 * sorted prefix is built in growing chunks (each a selection from the rest)
 * only as far as the top-p cut or the draw needs. Probabilities are summed
 * as fixed-point integers, so a sum does not depend on the order it is
 * taken in and the fast path picks exactly what the full sort of
 * moe_infer_sample_ref picks. */
#include "infer/infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"

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
    int32_t id;
} cand;

/* Decreasing logit, lower id first on ties: a total order, so the result
 * does not depend on the sort or selection algorithm. */
static inline int before(const cand *x, const cand *y)
{
    return x->logit != y->logit ? x->logit > y->logit : x->id < y->id;
}

static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

/* Fixed-point weights: p = exp((logit - max) / T) in (0, 1] scaled by 2^64
 * and truncated; with at most 2^24 ids every sum stays below 2^88, and the
 * draw's product below 2^121. Probabilities under 2^-64 of the best
 * candidate's weigh 0 and are never drawn. */
typedef unsigned __int128 u128;

static inline u128 weight(float logit, float mx, double temperature)
{
    const double p = exp(((double)logit - mx) / temperature);
    return (u128)ldexp(p, 64);
}

/* The draw over the first n candidates of the order, weights w: the index of
 * the first whose cumulative weight exceeds floor(total * u), u =
 * moe_rng_uniform(seed, MOE_RNG_SAMPLE, position, sequence, 0, 0) =
 * (w0 + 0.5) / 2^32. */
static u128 draw_threshold(const moe_infer_sampler *s, u128 total, uint32_t position, uint32_t sequence)
{
    uint32_t w[4];
    const uint32_t ctr[4] = {position, sequence, 0, 0}, key[2] = {s->seed, MOE_RNG_SAMPLE};
    moe_philox(w, ctr, key);
    return (total * (u128)(2ull * w[0] + 1)) >> 33; /* < total */
}

/* ---- reference: sort everything ---- */

moe_status moe_infer_sample_ref(int32_t *out, const moe_infer_sampler *s, const float *logits, int V,
                                uint32_t position, uint32_t sequence)
{
    if (V < 1) return moe_errorf(MOE_ERR_ARG, "sample: vocabulary of %d ids", V);
    if (!moe_all_finite(logits, (size_t)V)) return moe_errorf(MOE_ERR_NONFINITE, "sample: non-finite logits");
    cand *c = malloc((size_t)V * sizeof *c);
    u128 *w = malloc((size_t)V * sizeof *w);
    if (!c || !w) {
        free(c);
        free(w);
        return moe_errorf(MOE_ERR_NOMEM, "sample: %d candidates", V);
    }
    for (int i = 0; i < V; i++) c[i] = (cand){logits[i], i};
    qsort(c, (size_t)V, sizeof c[0], cand_cmp);
    if (s->temperature == 0) {
        *out = c[0].id;
        free(c);
        free(w);
        return MOE_OK;
    }
    int n = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    u128 total = 0;
    for (int i = 0; i < n; i++) total += (w[i] = weight(c[i].logit, c[0].logit, s->temperature));
    if (s->top_p < 1) {
        /* the shortest prefix holding top_p of the (top-k) weight */
        const double target = s->top_p * (double)total;
        u128 cum = 0;
        int keep = 0;
        while (keep < n && (double)cum < target) cum += w[keep++];
        n = keep;
        total = cum;
    }
    const u128 t = draw_threshold(s, total, position, sequence);
    u128 cum = 0;
    int pick = n - 1;
    for (int i = 0; i < n; i++)
        if ((cum += w[i]) > t) {
            pick = i;
            break;
        }
    *out = c[pick].id;
    free(c);
    free(w);
    return MOE_OK;
}

/* ---- fast path: partial selection ---- */

static inline void swap(cand *a, cand *b)
{
    cand t = *a;
    *a = *b;
    *b = t;
}

/* Rearranges c[lo, hi) so that its k first elements (lo < lo + k <= hi) are
 * the k first of the order, in any order: quickselect with a median-of-3
 * pivot, falling back to a sort of what is left after too many rounds. */
static void select_first(cand *c, int lo, int hi, int k)
{
    const int want = lo + k; /* c[lo, want) must hold the first k */
    int rounds = 0;
    while (hi - lo > 16) {
        if (++rounds > 64) break;
        const int mid = lo + (hi - lo) / 2;
        if (before(&c[mid], &c[lo])) swap(&c[mid], &c[lo]);
        if (before(&c[hi - 1], &c[lo])) swap(&c[hi - 1], &c[lo]);
        if (before(&c[hi - 1], &c[mid])) swap(&c[hi - 1], &c[mid]);
        const cand pivot = c[mid];
        /* Hoare partition on a total order: [lo, j] before-or-equal, [j+1, hi) after-or-equal */
        int i = lo - 1, j = hi;
        for (;;) {
            do i++; while (before(&c[i], &pivot));
            do j--; while (before(&pivot, &c[j]));
            if (i >= j) break;
            swap(&c[i], &c[j]);
        }
        if (want <= j + 1)
            hi = j + 1;
        else
            lo = j + 1;
        if (lo >= want || hi <= want) return; /* the boundary falls between the parts */
    }
    qsort(c + lo, (size_t)(hi - lo), sizeof *c, cand_cmp);
}

/* Makes c[done, want) the next sorted candidates after c[0, done), taken
 * from c[done, V). */
static void extend_sorted(cand *c, int V, int done, int want)
{
    if (want > done && want < V) select_first(c, done, V, want - done);
    qsort(c + done, (size_t)(want - done), sizeof *c, cand_cmp);
}

size_t moe_infer_sample_scratch_bytes(int V) { return V > 0 ? (size_t)V * (sizeof(cand) + sizeof(u128)) : 0; }

moe_status moe_infer_sample(int32_t *out, const moe_infer_sampler *s, const float *logits, int V,
                            uint32_t position, uint32_t sequence, void *scratch)
{
    if (V < 1) return moe_errorf(MOE_ERR_ARG, "sample: vocabulary of %d ids", V);
    if (!moe_all_finite(logits, (size_t)V)) return moe_errorf(MOE_ERR_NONFINITE, "sample: non-finite logits");
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i; /* the lower id on ties */
    if (s->temperature == 0) {
        *out = best;
        return MOE_OK;
    }
    void *own = NULL;
    if (!scratch && !(scratch = own = malloc(moe_infer_sample_scratch_bytes(V))))
        return moe_errorf(MOE_ERR_NOMEM, "sample: %d candidates", V);
    u128 *w = scratch; /* (V) weights of the sorted prefix; 16-byte aligned first */
    cand *c = (cand *)(w + V);
    const float mx = logits[best];
    for (int i = 0; i < V; i++) c[i] = (cand){logits[i], i};
    int n; /* candidates in the cut (top-k), not yet all sorted */
    u128 total = 0;
    if (s->top_k > 0 && s->top_k < V) {
        n = s->top_k;
        extend_sorted(c, V, 0, n);
        for (int i = 0; i < n; i++) total += (w[i] = weight(c[i].logit, mx, s->temperature));
    } else {
        n = V;
        for (int i = 0; i < V; i++) total += weight(logits[i], mx, s->temperature); /* any order: exact */
    }
    /* The sorted prefix c[0, sorted) with weights w, grown in chunks that
     * double, until the cut or the draw is found inside it. */
    int sorted = s->top_k > 0 && s->top_k < V ? n : 0, chunk = 64;
    u128 cum = 0;
    int i = 0;
#define GROW()                                                                                           \
    do {                                                                                                 \
        if (i == sorted) {                                                                               \
            const int want = sorted + chunk < n ? sorted + chunk : n;                                    \
            extend_sorted(c, V, sorted, want);                                                           \
            for (int q = sorted; q < want; q++) w[q] = weight(c[q].logit, mx, s->temperature);           \
            sorted = want;                                                                               \
            chunk *= 2;                                                                                  \
        }                                                                                                \
    } while (0)
    if (s->top_p < 1) {
        const double target = s->top_p * (double)total;
        while (i < n && (double)cum < target) {
            GROW();
            cum += w[i++];
        }
        n = i;
        total = cum;
    }
    const u128 t = draw_threshold(s, total, position, sequence);
    int pick = n - 1;
    cum = 0;
    for (i = 0; i < n;) {
        GROW();
        if ((cum += w[i]) > t) {
            pick = i;
            break;
        }
        i++;
    }
#undef GROW
    *out = c[pick].id;
    free(own);
    return MOE_OK;
}
