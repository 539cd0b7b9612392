/* The partition object (sets S_m in CSR form and the expert-major row
 * layout), its checks shared with the builders, and the fast frequency
 * partition (sort by count, cut into equal-count bands). */
#include "vocab/partition.h"

#include <stdlib.h>
#include <string.h>

#include "vocab/partition_internal.h"

struct moe_vocab_part {
    int V, M, max_size;
    int32_t *assign;  /* (V) */
    int32_t *offsets; /* (M+1) */
    int32_t *ids;     /* (V) token id of each expert-major row */
    int32_t *rows;    /* (V) expert-major row of each token id */
    int32_t *sorted;  /* (M) set sizes, descending (for topk_size) */
};

moe_status moe_vocab_check_sizes(int V, int M)
{
    if (M < 2) return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d: at least 2 vocabulary experts are needed", M);
    if (M > V)
        return moe_errorf(MOE_ERR_ARG, "vocab_experts=%d is larger than the vocabulary (%d tokens): "
                                       "every expert needs at least one token", M, V);
    return MOE_OK;
}

static int desc_int(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}

moe_status moe_vocab_part_create(moe_vocab_part **out, const int32_t *assign, int V, int M)
{
    *out = NULL;
    moe_status st = moe_vocab_check_sizes(V, M);
    if (st) return st;
    for (int v = 0; v < V; v++)
        if (assign[v] < 0 || assign[v] >= M)
            return moe_errorf(MOE_ERR_ARG, "vocabulary partition: token %d is assigned to expert %d, "
                                           "outside [0, %d)", v, (int)assign[v], M);
    moe_vocab_part *p = calloc(1, sizeof *p);
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "vocabulary partition");
    p->V = V, p->M = M;
    p->assign = moe_calloc((size_t)V, sizeof *p->assign);
    p->offsets = moe_calloc((size_t)M + 1, sizeof *p->offsets);
    p->ids = moe_calloc((size_t)V, sizeof *p->ids);
    p->rows = moe_calloc((size_t)V, sizeof *p->rows);
    p->sorted = moe_calloc((size_t)M, sizeof *p->sorted);
    if (!p->assign || !p->offsets || !p->ids || !p->rows || !p->sorted) {
        moe_vocab_part_destroy(p);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary partition of %d tokens", V);
    }
    memcpy(p->assign, assign, (size_t)V * sizeof *assign);
    for (int v = 0; v < V; v++) p->offsets[assign[v] + 1]++;
    for (int m = 0; m < M; m++) {
        const int n = p->offsets[m + 1];
        if (n == 0) {
            moe_vocab_part_destroy(p);
            return moe_errorf(MOE_ERR_ARG, "vocabulary partition: expert %d has no token (every set must be "
                                           "non-empty)", m);
        }
        p->sorted[m] = n;
        if (n > p->max_size) p->max_size = n;
        p->offsets[m + 1] += p->offsets[m];
    }
    qsort(p->sorted, (size_t)M, sizeof *p->sorted, desc_int);
    /* counting sort by expert; ids ascend within a set because v does */
    int32_t *fill = malloc((size_t)M * sizeof *fill);
    if (!fill) {
        moe_vocab_part_destroy(p);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary partition");
    }
    memcpy(fill, p->offsets, (size_t)M * sizeof *fill);
    for (int v = 0; v < V; v++) {
        const int32_t r = fill[assign[v]]++;
        p->ids[r] = v;
        p->rows[v] = r;
    }
    free(fill);
    *out = p;
    return MOE_OK;
}

void moe_vocab_part_destroy(moe_vocab_part *p)
{
    if (!p) return;
    moe_free(p->assign);
    moe_free(p->offsets);
    moe_free(p->ids);
    moe_free(p->rows);
    moe_free(p->sorted);
    free(p);
}

int moe_vocab_part_vocab(const moe_vocab_part *p) { return p->V; }
int moe_vocab_part_experts(const moe_vocab_part *p) { return p->M; }
const int32_t *moe_vocab_part_assign(const moe_vocab_part *p) { return p->assign; }
const int32_t *moe_vocab_part_offsets(const moe_vocab_part *p) { return p->offsets; }
const int32_t *moe_vocab_part_ids(const moe_vocab_part *p) { return p->ids; }
const int32_t *moe_vocab_part_rows(const moe_vocab_part *p) { return p->rows; }
int moe_vocab_part_max_size(const moe_vocab_part *p) { return p->max_size; }

int64_t moe_vocab_part_topk_size(const moe_vocab_part *p, int k)
{
    int64_t s = 0;
    for (int i = 0; i < k && i < p->M; i++) s += p->sorted[i];
    return s;
}

void moe_vocab_rows_gather(float *dst, const float *src, const moe_vocab_part *p, int w)
{
    for (int r = 0; r < p->V; r++) memcpy(dst + (size_t)r * w, src + (size_t)p->ids[r] * w, (size_t)w * sizeof *dst);
}

void moe_vocab_rows_scatter(float *dst, const float *src, const moe_vocab_part *p, int w)
{
    for (int r = 0; r < p->V; r++) memcpy(dst + (size_t)p->ids[r] * w, src + (size_t)r * w, (size_t)w * sizeof *dst);
}

/* ---- frequency partition ---- */

moe_status moe_vocab_check_counts(const int64_t *counts, int V, int M, int64_t *total)
{
    moe_status st = moe_vocab_check_sizes(V, M);
    if (st) return st;
    int64_t t = 0;
    for (int v = 0; v < V; v++) {
        if (counts[v] < 0)
            return moe_errorf(MOE_ERR_ARG, "token counts: token %d has a negative count (%lld)", v,
                              (long long)counts[v]);
        /* the band test compares running * M with j * total in 128 bits; only the total must fit */
        if (counts[v] > INT64_MAX - t)
            return moe_errorf(MOE_ERR_ARG, "token counts: the total overflows 64 bits at token %d", v);
        t += counts[v];
    }
    if (t == 0)
        return moe_errorf(MOE_ERR_ARG, "token counts are all zero: the frequency partition needs the counts "
                                       "of a non-empty training token file");
    *total = t;
    return MOE_OK;
}

typedef struct {
    int64_t count;
    int32_t id;
} freq_item;

/* count descending, then id ascending: a total order */
static int freq_cmp(const void *a, const void *b)
{
    const freq_item *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

moe_status moe_vocab_partition_frequency(int32_t *assign, const int64_t *counts, int V, int M)
{
    int64_t total;
    moe_status st = moe_vocab_check_counts(counts, V, M, &total);
    if (st) return st;
    freq_item *it = malloc((size_t)V * sizeof *it);
    if (!it) return moe_errorf(MOE_ERR_NOMEM, "frequency partition of %d tokens", V);
    for (int v = 0; v < V; v++) it[v] = (freq_item){counts[v], v};
    qsort(it, (size_t)V, sizeof *it, freq_cmp);
    /* b = end of band j-1 (ids in bands < j); i scans sorted positions with run = counts of [0, i) */
    int b = 0, i = 0;
    __int128 run = 0;
    for (int j = 1; j <= M; j++) {
        int end = V;
        if (j < M) {
            /* first position whose running count (inclusive) reaches j/M of the total */
            while (i < V && run * M < (__int128)j * total) run += it[i++].count;
            end = i;
            if (end < b + 1) end = b + 1;             /* every band non-empty */
            if (end > V - (M - j)) end = V - (M - j); /* room for the bands after it */
        }
        for (int k = b; k < end; k++) assign[it[k].id] = j - 1;
        b = end;
    }
    free(it);
    return MOE_OK;
}
