/* Plain references of the two partition builders: the rules of
 * docs/vocab-experts.md written as directly as possible (O(V^2) ranking,
 * every distance recomputed, one row at a time), so that tests can hold the
 * fast builders to them. They share with the fast path only the argument
 * checks and the arithmetic of each decision (moe_vocab_dist2, the clock). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vocab/partition_internal.h"

moe_status moe_vocab_partition_frequency_ref(int32_t *assign, const int64_t *counts, int V, int M)
{
    int64_t total;
    moe_status st = moe_vocab_check_counts(counts, V, M, &total);
    if (st) return st;
    int32_t *sorted = malloc((size_t)V * sizeof *sorted);
    if (!sorted) return moe_errorf(MOE_ERR_NOMEM, "frequency partition of %d tokens", V);
    /* position of v = ids before it (a larger count, or the same count and a lower id) */
    for (int v = 0; v < V; v++) {
        int pos = 0;
        for (int u = 0; u < V; u++) pos += counts[u] > counts[v] || (counts[u] == counts[v] && u < v);
        sorted[pos] = v;
    }
    int prev_end = 0;
    for (int j = 1; j <= M; j++) {
        int end = V;
        if (j < M) {
            /* 1 + the first position at which the running count reaches j/M of the total */
            __int128 run = 0;
            end = 0;
            for (int i = 0; i < V; i++) {
                run += counts[sorted[i]];
                if (run * M >= (__int128)j * total) {
                    end = i + 1;
                    break;
                }
            }
            if (end < prev_end + 1) end = prev_end + 1;
            if (end > V - (M - j)) end = V - (M - j);
        }
        for (int i = prev_end; i < end; i++) assign[sorted[i]] = j - 1;
        prev_end = end;
    }
    free(sorted);
    return MOE_OK;
}

/* Nearest centre by dist2 among those with room (size < cap; cap = V + 1
 * means all), ties to the lower index. */
static int nearest(const float *x, const float *cent, const int *size, int d, int M, int cap)
{
    int best = -1;
    double best_d = 0;
    for (int m = 0; m < M; m++) {
        if (size[m] >= cap) continue;
        const double e = moe_vocab_dist2(x, cent + (size_t)m * d, d);
        if (best < 0 || e < best_d) best = m, best_d = e;
    }
    return best;
}

moe_status moe_vocab_partition_kmeans_ref(int32_t *assign, const float *emb, int V, int d, int M,
                                          const moe_vocab_kmeans_config *cfg)
{
    int cap;
    moe_status st = moe_vocab_kmeans_check(emb, V, d, M, cfg, &cap);
    if (st) return st;
    float *cent = calloc((size_t)M * d, sizeof *cent);
    int *centre_row = calloc((size_t)M, sizeof *centre_row), *size = calloc((size_t)M, sizeof *size);
    unsigned char *evicted = calloc((size_t)V, 1);
    int32_t *order = calloc((size_t)V, sizeof *order);
    if (!cent || !centre_row || !size || !evicted || !order) {
        st = moe_errorf(MOE_ERR_NOMEM, "k-means partition (ref)");
        goto done;
    }
#define X(v) (emb + (size_t)(v) * d)
#define C(m) (cent + (size_t)(m) * d)
    /* k-means++: round r draws the row with the smallest clock / weight,
     * weight = squared distance to the nearest of the r centres drawn so far */
    for (int r = 0; r < M; r++) {
        int best = -1;
        double best_key = 0;
        for (int v = 0; v < V; v++) {
            double w = 1.0;
            if (r > 0) {
                w = INFINITY;
                for (int s = 0; s < r; s++) {
                    const double e = moe_vocab_dist2(X(v), C(s), d);
                    if (e < w) w = e;
                }
            }
            if (!(w > 0)) continue;
            const double key = moe_vocab_kmeans_clock(cfg->seed, r, v) / w;
            if (best < 0 || key < best_key) best = v, best_key = key;
        }
        if (best < 0) /* every row sits on a centre: uniformly among the rows not drawn yet */
            for (int v = 0; v < V; v++) {
                int drawn = 0;
                for (int s = 0; s < r; s++) drawn |= centre_row[s] == v;
                if (drawn) continue;
                const double key = moe_vocab_kmeans_clock(cfg->seed, r, v);
                if (best < 0 || key < best_key) best = v, best_key = key;
            }
        centre_row[r] = best;
        memcpy(C(r), X(best), (size_t)d * sizeof *cent);
    }
    const int no_cap = V + 1;
    for (int it = 1; it <= cfg->iters; it++) {
        if (it > 1) /* centres = member means (double sums in row order) */
            for (int m = 0; m < M; m++)
                for (int k = 0; k < d; k++) {
                    double s = 0;
                    int n = 0;
                    for (int v = 0; v < V; v++)
                        if (assign[v] == m) s += (double)X(v)[k], n++;
                    C(m)[k] = (float)(s / n);
                }
        for (int m = 0; m < M; m++) size[m] = 0;
        for (int v = 0; v < V; v++) size[assign[v] = nearest(X(v), cent, size, d, M, no_cap)]++;
        for (int m = 0; m < M; m++) {
            if (size[m]) continue;
            int far = -1;
            double far_d = 0;
            for (int v = 0; v < V; v++) {
                if (size[assign[v]] < 2) continue;
                const double e = moe_vocab_dist2(X(v), C(assign[v]), d);
                if (far < 0 || e > far_d) far = v, far_d = e;
            }
            size[assign[far]]--;
            assign[far] = m;
            size[m] = 1;
            memcpy(C(m), X(far), (size_t)d * sizeof *cent);
        }
    }
    if (cap < V) {
        /* evict: clusters in index order, each down to the cap, farthest first */
        int n = 0;
        for (int m = 0; m < M; m++)
            while (size[m] > cap) {
                int far = -1;
                double far_d = 0;
                for (int v = 0; v < V; v++) {
                    if (assign[v] != m || evicted[v]) continue;
                    const double e = moe_vocab_dist2(X(v), C(m), d);
                    if (far < 0 || e > far_d) far = v, far_d = e;
                }
                evicted[far] = 1;
                order[n++] = far;
                size[m]--;
            }
        for (int i = 0; i < n; i++) {
            const int m = nearest(X(order[i]), cent, size, d, M, cap);
            assign[order[i]] = m;
            size[m]++;
        }
    }
#undef X
#undef C
done:
    free(cent), free(centre_row), free(size), free(evicted), free(order);
    return st;
}
