/* Top-k selection for the router: per row (token choice, k of E experts)
 * and per column (expert choice, C of T tokens), plus plain references.
 *
 * Order everywhere: larger value first, equal values by lower index
 * (docs/routing.md). Both fast paths scan indices in increasing order and only
 * let a later entry displace a kept one when it is strictly larger, which
 * gives the lower-index tie rule for free. No allocation: results (and the
 * heap) live in the caller's idx; the radix path uses a caller workspace. */
#include "router/router.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { TOPK_SMALL = 8 }; /* up to this k: a k-slot buffer; above it, a heap */

/* c ? a : b without a branch (compilers turn the ?: on indices into one). */
static inline int select_int(int c, int a, int b) { return b ^ ((a ^ b) & -c); }

/* Small k (the token-choice case, k = 1..8 of E experts): the k best so far,
 * sorted, in a k-slot buffer. A new entry x (always the highest index so
 * far, so it must beat strictly) shifts down every slot it beats; as the
 * slots are sorted, slot s becomes max(v[s], min(x, v[s-1])) and its index
 * follows by two selects. All slots update from the old buffer at once: no
 * data-dependent branches (routing data makes them unpredictable) and a
 * short dependency chain. Inlined with a constant k so the buffer is in
 * registers. */
static inline __attribute__((always_inline)) void topk_small1(int *idx, const float *a, int n, ptrdiff_t stride,
                                                              int k)
{
    float v[TOPK_SMALL];
    int ix[TOPK_SMALL];
    for (int i = 0; i < k; i++) { /* seed with the first k entries, stable insertion */
        const float x = a[i * stride];
        int s = i;
        for (; s > 0 && x > v[s - 1]; s--) {
            v[s] = v[s - 1];
            ix[s] = ix[s - 1];
        }
        v[s] = x;
        ix[s] = i;
    }
    for (int i = k; i < n; i++) {
        const float x = a[i * stride];
        for (int s = k - 1; s > 0; s--) { /* bottom up, so v[s - 1] is still the old value */
            const int beats = x > v[s], beats_up = x > v[s - 1];
            const float down = x < v[s - 1] ? x : v[s - 1];
            v[s] = down > v[s] ? down : v[s];
            ix[s] = select_int(beats, select_int(beats_up, ix[s - 1], i), ix[s]);
        }
        const int beats = x > v[0];
        v[0] = beats ? x : v[0];
        ix[0] = select_int(beats, i, ix[0]);
    }
    for (int s = 0; s < k; s++) idx[s] = ix[s];
}

/* 1 if entry i ranks below entry j (smaller value, or equal and later). */
static inline int topk_worse(const float *a, ptrdiff_t stride, int i, int j)
{
    float x = a[i * stride], y = a[j * stride];
    return x < y || (x == y && i > j);
}

/* Restore the heap property below slot s of a heap of n indices whose root
 * is the WORST kept entry. */
static void topk_sift(int *h, int n, int s, const float *a, ptrdiff_t stride)
{
    for (;;) {
        int c = 2 * s + 1;
        if (c >= n) return;
        if (c + 1 < n && topk_worse(a, stride, h[c + 1], h[c])) c++;
        if (!topk_worse(a, stride, h[c], h[s])) return;
        int t = h[c];
        h[c] = h[s];
        h[s] = t;
        s = c;
    }
}

/* Large k (expert choice: C ~ T/4 of T tokens): a bounded heap of the k best
 * seen so far, rooted at the worst of them, then heap-sorted in place.
 * O(n log k) worst case and O(n + k log k log(n/k)) on typical data, since
 * once the heap is full most entries fail the compare against the root. */
static void topk_heap(int *idx, const float *a, int n, ptrdiff_t stride, int k)
{
    for (int i = 0; i < k; i++) idx[i] = i;
    for (int s = k / 2 - 1; s >= 0; s--) topk_sift(idx, k, s, a, stride);
    for (int i = k; i < n; i++) {
        if (a[i * stride] > a[idx[0] * stride]) { /* ties lose: i is later than every kept index */
            idx[0] = i;
            topk_sift(idx, k, 0, a, stride);
        }
    }
    /* Pop the worst to the back until the front holds the best. */
    for (int end = k - 1; end > 0; end--) {
        int t = idx[0];
        idx[0] = idx[end];
        idx[end] = t;
        topk_sift(idx, end, 0, a, stride);
    }
}

/* A batch of `count` vectors of n entries: vector c starts at a + c*vstride,
 * its entries are estride apart; its k indices go to idx + c*k. */
typedef struct {
    int *idx;
    const float *a;
    int count, n, k;
    ptrdiff_t vstride, estride;
} topk_batch;

static inline __attribute__((always_inline)) void topk_small(const topk_batch *b, int k)
{
    const topk_batch v = *b; /* locals: stores to idx cannot alias them */
    for (int c = 0; c < v.count; c++) topk_small1(v.idx + (size_t)c * k, v.a + c * v.vstride, v.n, v.estride, k);
}

static void topk_batch_run(const topk_batch *b)
{
    switch (b->k) { /* one constant k per case: the small buffer unrolls into registers */
    case 1: topk_small(b, 1); return;
    case 2: topk_small(b, 2); return;
    case 3: topk_small(b, 3); return;
    case 4: topk_small(b, 4); return;
    case 5: topk_small(b, 5); return;
    case 6: topk_small(b, 6); return;
    case 7: topk_small(b, 7); return;
    case 8: topk_small(b, 8); return;
    default:
        for (int c = 0; c < b->count; c++)
            topk_heap(b->idx + (size_t)c * b->k, b->a + c * b->vstride, b->n, b->estride, b->k);
    }
}

void moe_topk_rows(int *idx, const float *a, int n, int m, int k)
{
    const topk_batch b = {idx, a, n, m, k, m, 1};
    topk_batch_run(&b);
}

void moe_topk_cols(int *idx, const float *a, int n, int m, int k)
{
    const topk_batch b = {idx, a, m, n, k, 1, m};
    topk_batch_run(&b);
}

/* Order-preserving map of a float to an unsigned key (larger float, larger
 * key); -0 and +0, which compare equal, map together. */
static inline uint32_t float_order_key(float x)
{
    x += 0.0f; /* -0 -> +0 */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Each column is sorted whole by a stable LSD radix sort on 64-bit keys
 * (~value key << 32 | row): ascending keys are (value desc, row asc), and
 * since rows start in order only the value half needs passes. O(n) per
 * column with no data-dependent branches; a pass whose byte is the same for
 * every row (typical for the top bytes of probabilities) is skipped. */
void moe_topk_cols_ws(int *idx, const float *a, int n, int m, int k, uint64_t *work)
{
    uint64_t *keys = work, *tmp = work + n;
    for (int j = 0; j < m; j++) {
        uint32_t hist[4][256];
        memset(hist, 0, sizeof hist);
        for (int i = 0; i < n; i++) {
            const uint32_t hi = ~float_order_key(a[(size_t)i * m + j]);
            keys[i] = (uint64_t)hi << 32 | (uint32_t)i;
            for (int b = 0; b < 4; b++) hist[b][(hi >> (8 * b)) & 255]++;
        }
        for (int b = 0; b < 4; b++) {
            const int shift = 32 + 8 * b;
            if (hist[b][(keys[0] >> shift) & 255] == (uint32_t)n) continue;
            uint32_t pos = 0;
            for (int v = 0; v < 256; v++) {
                const uint32_t c = hist[b][v];
                hist[b][v] = pos;
                pos += c;
            }
            for (int i = 0; i < n; i++) tmp[hist[b][(keys[i] >> shift) & 255]++] = keys[i];
            uint64_t *t = keys;
            keys = tmp;
            tmp = t;
        }
        for (int c = 0; c < k; c++) idx[(size_t)j * k + c] = (int)(uint32_t)keys[c];
    }
}

/* Reference: the rank of entry i is the number of entries that beat it
 * under the total order (value desc, index asc); entries of rank < k are
 * written at their rank. O(n^2), obviously correct, no allocation. */
static void topk_rank_ref(int *idx, const float *a, int n, ptrdiff_t stride, int k)
{
    for (int i = 0; i < n; i++) {
        int rank = 0;
        for (int j = 0; j < n; j++) rank += topk_worse(a, stride, i, j);
        if (rank < k) idx[rank] = i;
    }
}

void moe_topk_rows_ref(int *idx, const float *a, int n, int m, int k)
{
    for (int i = 0; i < n; i++) topk_rank_ref(idx + (size_t)i * k, a + (size_t)i * m, m, 1, k);
}

void moe_topk_cols_ref(int *idx, const float *a, int n, int m, int k)
{
    for (int j = 0; j < m; j++) topk_rank_ref(idx + (size_t)j * k, a + j, n, m, k);
}
