/* Vocabulary partition: the set layout, hand-worked frequency and k-means
 * cases (ties, unused ids, heavy tokens, the empty-cluster rule, the size
 * cap and the order of its moves), the fast builders against their _ref on
 * random and adversarial inputs (identical assignments), independence of
 * the thread count, bad input, and partition files (round trip, damage). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cblas.h>
#include <hdf5.h>

#include "core/moe.h"
#include "core/rng.h"
#include "vocab/partition.h"

#define assert_detail_has(s)                                                                                   \
    do {                                                                                                       \
        if (!strstr(moe_error_detail(), (s))) fail_msg("detail '%s' lacks '%s'", moe_error_detail(), (s));    \
    } while (0)

static double unif(uint32_t i, uint32_t j, uint32_t id)
{
    return moe_rng_uniform(77, MOE_RNG_BENCH, i, j, id, 0);
}

static float normal(uint32_t i, uint32_t j, uint32_t id)
{
    return (float)moe_rng_normal(77, MOE_RNG_BENCH, i, j, id, 0);
}

/* ---- the partition object ---- */

static void test_part_layout(void **state)
{
    (void)state;
    const int32_t assign[10] = {2, 0, 1, 2, 0, 0, 3, 1, 2, 0};
    moe_vocab_part *p;
    assert_int_equal(moe_vocab_part_create(&p, assign, 10, 4), MOE_OK);
    const int32_t want_off[5] = {0, 4, 6, 9, 10}, want_ids[10] = {1, 4, 5, 9, 2, 7, 0, 3, 8, 6};
    assert_memory_equal(moe_vocab_part_offsets(p), want_off, sizeof want_off);
    assert_memory_equal(moe_vocab_part_ids(p), want_ids, sizeof want_ids);
    for (int r = 0; r < 10; r++) assert_int_equal(moe_vocab_part_rows(p)[want_ids[r]], r);
    assert_int_equal(moe_vocab_part_max_size(p), 4);
    assert_int_equal(moe_vocab_part_topk_size(p, 1), 4);
    assert_int_equal(moe_vocab_part_topk_size(p, 2), 7);
    assert_int_equal(moe_vocab_part_topk_size(p, 4), 10);
    /* rows by id -> expert-major -> by id */
    float byid[10 * 3], em[10 * 3], back[10 * 3];
    for (int i = 0; i < 30; i++) byid[i] = (float)i;
    moe_vocab_rows_gather(em, byid, p, 3);
    for (int r = 0; r < 10; r++) assert_true(em[r * 3 + 1] == byid[want_ids[r] * 3 + 1]);
    moe_vocab_rows_scatter(back, em, p, 3);
    assert_memory_equal(back, byid, sizeof back);
    moe_vocab_part_destroy(p);
}

static void test_part_errors(void **state)
{
    (void)state;
    moe_vocab_part *p = (moe_vocab_part *)1;
    const int32_t a[4] = {0, 1, 1, 0}, bad[4] = {0, 1, 2, 0}, neg[4] = {0, -1, 1, 0}, gap[4] = {0, 2, 2, 0};
    assert_int_equal(moe_vocab_part_create(&p, a, 4, 1), MOE_ERR_ARG);
    assert_null(p);
    assert_detail_has("at least 2");
    assert_int_equal(moe_vocab_part_create(&p, a, 4, 5), MOE_ERR_ARG);
    assert_detail_has("larger than the vocabulary");
    assert_int_equal(moe_vocab_part_create(&p, bad, 4, 2), MOE_ERR_ARG);
    assert_detail_has("token 2 is assigned to expert 2");
    assert_int_equal(moe_vocab_part_create(&p, neg, 4, 2), MOE_ERR_ARG);
    assert_detail_has("token 1");
    assert_int_equal(moe_vocab_part_create(&p, gap, 4, 3), MOE_ERR_ARG);
    assert_detail_has("expert 1 has no token");
}

/* ---- frequency: hand-worked ---- */

static void check_freq(const int64_t *counts, int V, int M, const int32_t *want)
{
    int32_t got[64], ref[64];
    assert_int_equal(moe_vocab_partition_frequency(got, counts, V, M), MOE_OK);
    assert_int_equal(moe_vocab_partition_frequency_ref(ref, counts, V, M), MOE_OK);
    for (int v = 0; v < V; v++) {
        if (got[v] != want[v]) fail_msg("fast: token %d in band %d, want %d", v, got[v], want[v]);
        if (ref[v] != want[v]) fail_msg("ref: token %d in band %d, want %d", v, ref[v], want[v]);
    }
}

static void test_frequency_hand(void **state)
{
    (void)state;
    {
        /* sorted: 4(10) 0(5) 2(3) 3(3) 7(2) 5(1) 1(0) 6(0): ties to the lower id (2 before 3);
         * running 10 15 18 ...; band 0 ends where 3*running >= 24 (id 4), band 1 where
         * 3*running >= 48 (id 2, 54); unused ids 1 and 6 in the last band */
        const int64_t c[8] = {5, 0, 3, 3, 10, 1, 0, 2};
        const int32_t want[8] = {1, 2, 1, 2, 0, 2, 2, 2};
        check_freq(c, 8, 3, want);
    }
    {
        /* reaching exactly j/M closes the band: {0, 1}, {2, 3} */
        const int64_t c[4] = {1, 1, 1, 1};
        const int32_t want[4] = {0, 0, 1, 1};
        check_freq(c, 4, 2, want);
    }
    {
        /* a heavy token reaches 1/3 and 2/3 at once: band 1 still gets the next id */
        const int64_t c[5] = {100, 1, 1, 0, 0};
        const int32_t want[5] = {0, 1, 2, 2, 2};
        check_freq(c, 5, 3, want);
    }
    {
        /* fewer used ids than experts: non-empty bands win, unused ids fill them in id order */
        const int64_t c[6] = {0, 7, 0, 0, 0, 0};
        const int32_t want[6] = {1, 0, 2, 3, 3, 3};
        check_freq(c, 6, 4, want);
    }
    {
        /* M = V: one id per band, in count order */
        const int64_t c[4] = {2, 9, 2, 5};
        const int32_t want[4] = {2, 0, 3, 1};
        check_freq(c, 4, 4, want);
    }
}

static void test_frequency_errors(void **state)
{
    (void)state;
    int32_t a[8];
    const int64_t zero[4] = {0, 0, 0, 0}, neg[4] = {1, 2, -3, 4}, ok[4] = {1, 2, 3, 4};
    const int64_t huge[4] = {INT64_MAX / 2, INT64_MAX / 2, 4, 0};
    for (int ref = 0; ref < 2; ref++) {
        moe_status (*fn)(int32_t *, const int64_t *, int, int) =
            ref ? moe_vocab_partition_frequency_ref : moe_vocab_partition_frequency;
        assert_int_equal(fn(a, zero, 4, 2), MOE_ERR_ARG);
        assert_detail_has("all zero");
        assert_int_equal(fn(a, neg, 4, 2), MOE_ERR_ARG);
        assert_detail_has("token 2 has a negative count");
        assert_int_equal(fn(a, ok, 4, 5), MOE_ERR_ARG);
        assert_detail_has("vocab_experts=5");
        assert_int_equal(fn(a, ok, 4, 1), MOE_ERR_ARG);
        assert_int_equal(fn(a, huge, 4, 2), MOE_ERR_ARG);
        assert_detail_has("overflows");
    }
}

/* ---- frequency: fast vs ref ---- */

static void test_frequency_vs_ref(void **state)
{
    (void)state;
    enum { V = 3000 };
    int64_t *c = malloc(V * sizeof *c);
    int32_t *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    const int Ms[] = {2, 3, 7, 64, 1000, 2999, 3000};
    for (int kind = 0; kind < 4; kind++) {
        for (int v = 0; v < V; v++) {
            const double u = unif((uint32_t)v, (uint32_t)kind, 1);
            switch (kind) {
            case 0: c[v] = (int64_t)(1e6 / (1 + v)); break;               /* Zipf-like, distinct */
            case 1: c[v] = (int64_t)(5 * u) * (int64_t)(5 * u); break;    /* heavy ties, zeros */
            case 2: c[v] = u < 0.9 ? 0 : (int64_t)(1e9 * u); break;        /* mostly unused */
            default: c[v] = v == 17 ? (int64_t)1 << 40 : (int64_t)(3 * u); /* one dominant token */
            }
        }
        for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++) {
            assert_int_equal(moe_vocab_partition_frequency(a, c, V, Ms[i]), MOE_OK);
            assert_int_equal(moe_vocab_partition_frequency_ref(b, c, V, Ms[i]), MOE_OK);
            if (memcmp(a, b, V * sizeof *a)) fail_msg("kind %d M %d: fast and ref differ", kind, Ms[i]);
            moe_vocab_part *p; /* every band non-empty */
            assert_int_equal(moe_vocab_part_create(&p, a, V, Ms[i]), MOE_OK);
            moe_vocab_part_destroy(p);
        }
    }
    free(c), free(a), free(b);
}

/* ---- k-means: hand-worked ---- */

static void kmeans_both(int32_t *got, const float *x, int V, int d, int M, const moe_vocab_kmeans_config *c)
{
    int32_t *ref = malloc((size_t)V * sizeof *ref);
    assert_int_equal(moe_vocab_partition_kmeans(got, x, V, d, M, c), MOE_OK);
    assert_int_equal(moe_vocab_partition_kmeans_ref(ref, x, V, d, M, c), MOE_OK);
    for (int v = 0; v < V; v++)
        if (got[v] != ref[v]) fail_msg("k-means: row %d in set %d (fast) vs %d (ref)", v, got[v], ref[v]);
    free(ref);
}

static void test_kmeans_blobs(void **state)
{
    (void)state;
    /* three far-apart blobs of 5, 3 and 4 rows in 2-D: one set each, whatever the labels */
    enum { V = 12, M = 3 };
    const float c[3][2] = {{0, 0}, {500, 0}, {0, 900}};
    const int blob[V] = {0, 1, 2, 0, 0, 1, 2, 2, 0, 1, 2, 0};
    float x[V * 2];
    for (int v = 0; v < V; v++)
        for (int k = 0; k < 2; k++) x[v * 2 + k] = c[blob[v]][k] + normal((uint32_t)v, (uint32_t)k, 2);
    moe_vocab_kmeans_config cfg;
    moe_vocab_kmeans_config_default(&cfg);
    for (uint32_t seed = 1; seed <= 5; seed++) {
        cfg.seed = seed;
        int32_t a[V];
        kmeans_both(a, x, V, 2, M, &cfg);
        for (int v = 0; v < V; v++)
            for (int u = 0; u < V; u++) assert_int_equal(a[v] == a[u], blob[v] == blob[u]);
    }
}

static void test_kmeans_empty_cluster(void **state)
{
    (void)state;
    /* rows 0, 1, 3 coincide, row 2 is apart; M = 3. Seeding must reuse the
     * duplicate point (every weight 0: a uniform draw among rows not drawn),
     * the duplicates then tie between two identical centres and all go to
     * the lower index, leaving a set empty; it takes the row farthest from
     * its centre among sets of >= 2 rows: all at distance 0, so the lowest
     * row, 0. Fixed point: {0}, {1, 3}, {2}. */
    const float x[4 * 2] = {0, 0, 0, 0, 10, 0, 0, 0};
    moe_vocab_kmeans_config cfg;
    moe_vocab_kmeans_config_default(&cfg);
    for (uint32_t seed = 1; seed <= 8; seed++) {
        cfg.seed = seed;
        int32_t a[4];
        kmeans_both(a, x, 4, 2, 3, &cfg);
        assert_int_equal(a[1], a[3]);
        assert_int_not_equal(a[0], a[1]);
        assert_int_not_equal(a[0], a[2]);
        assert_int_not_equal(a[1], a[2]);
    }
}

static void test_kmeans_cap(void **state)
{
    (void)state;
    moe_vocab_kmeans_config cfg;
    moe_vocab_kmeans_config_default(&cfg);
    {
        /* 1-D: rows 0..7 at 0..7, rows 8, 9 at 100, 101. k-means: {0..7} (centre 3.5)
         * and {8, 9}. Cap ceil(10/2 * 1.0) = 5: evict 3 of the first set, farthest
         * first with ties to the lower row: rows 0 and 7 (12.25), then 1 (6.25, before 6). */
        float x[10] = {0, 1, 2, 3, 4, 5, 6, 7, 100, 101};
        cfg.balance = 1.0;
        int32_t a[10];
        kmeans_both(a, x, 10, 1, 2, &cfg);
        const int A = a[2], B = a[8];
        assert_int_not_equal(A, B);
        const int want_A[10] = {0, 0, 1, 1, 1, 1, 1, 0, 0, 0};
        for (int v = 0; v < 10; v++) assert_int_equal(a[v], want_A[v] ? A : B);
        /* no cap: the plain clusters */
        cfg.balance = 0;
        kmeans_both(a, x, 10, 1, 2, &cfg);
        for (int v = 0; v < 10; v++) assert_int_equal(a[v] == a[0], v < 8);
        /* a loose cap changes nothing: ceil(10/2 * 2) = 10 */
        cfg.balance = 2.0;
        kmeans_both(a, x, 10, 1, 2, &cfg);
        for (int v = 0; v < 10; v++) assert_int_equal(a[v] == a[0], v < 8);
    }
    {
        /* 1-D, three sets {x0..x5 at 0..5}, {1000, 1001}, {3000}; cap ceil(9/3) = 3.
         * Evicted from the first (centre 2.5), farthest first, ties to the lower
         * row: rows 0, 5 (6.25) then 1 (2.25, before row 4). Moved in that order
         * to the nearest set with room: row 0 -> {1000, 1001} (now full), row 5 ->
         * {3000}, row 1 -> {3000}. */
        float x[9] = {0, 1, 2, 3, 4, 5, 1000, 1001, 3000};
        cfg.balance = 1.0;
        int32_t a[9];
        kmeans_both(a, x, 9, 1, 3, &cfg);
        const int A = a[2], B = a[6], C = a[8];
        assert_true(A != B && B != C && A != C);
        const int want[9] = {1, 2, 0, 0, 0, 2, 1, 1, 2}; /* 0: A, 1: B, 2: C */
        const int lab[3] = {A, B, C};
        for (int v = 0; v < 9; v++) assert_int_equal(a[v], lab[want[v]]);
    }
}

static void test_kmeans_errors(void **state)
{
    (void)state;
    float x[6 * 2] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    int32_t a[6];
    moe_vocab_kmeans_config cfg;
    for (int ref = 0; ref < 2; ref++) {
        moe_status (*fn)(int32_t *, const float *, int, int, int, const moe_vocab_kmeans_config *) =
            ref ? moe_vocab_partition_kmeans_ref : moe_vocab_partition_kmeans;
        moe_vocab_kmeans_config_default(&cfg);
        assert_int_equal(fn(a, x, 6, 2, 7, &cfg), MOE_ERR_ARG);
        assert_detail_has("larger than the vocabulary");
        assert_int_equal(fn(a, x, 6, 2, 1, &cfg), MOE_ERR_ARG);
        assert_int_equal(fn(a, x, 6, 0, 2, &cfg), MOE_ERR_ARG);
        cfg.iters = 0;
        assert_int_equal(fn(a, x, 6, 2, 2, &cfg), MOE_ERR_ARG);
        assert_detail_has("kmeans_iters=0");
        moe_vocab_kmeans_config_default(&cfg);
        cfg.balance = 0.5;
        assert_int_equal(fn(a, x, 6, 2, 2, &cfg), MOE_ERR_ARG);
        assert_detail_has("vocab_balance=0.5");
        cfg.balance = NAN;
        assert_int_equal(fn(a, x, 6, 2, 2, &cfg), MOE_ERR_ARG);
        moe_vocab_kmeans_config_default(&cfg);
        x[7] = NAN;
        assert_int_equal(fn(a, x, 6, 2, 2, &cfg), MOE_ERR_NONFINITE);
        assert_detail_has("row 3");
        x[7] = 7;
        /* M = V works: every row its own set */
        assert_int_equal(fn(a, x, 6, 2, 6, &cfg), MOE_OK);
        for (int v = 0; v < 6; v++)
            for (int u = 0; u < v; u++) assert_int_not_equal(a[u], a[v]);
    }
}

/* ---- k-means: fast vs ref, adversarial data ---- */

/* kind 0: Gaussian mixture; 1: integer lattice (exact distance ties);
 * 2: large common offset (the sgemm screen is loose); 3: few distinct rows
 * (duplicates, empty clusters); 4: mixed scales (wide dynamic range). */
static float *make_data(int kind, int V, int d)
{
    float *x = malloc((size_t)V * d * sizeof *x);
    const int G = 9;
    for (int v = 0; v < V; v++)
        for (int k = 0; k < d; k++) {
            const float z = normal((uint32_t)v, (uint32_t)k, 10 + (uint32_t)kind);
            const int g = v % G;
            float val;
            switch (kind) {
            case 0: val = 3.0f * normal((uint32_t)g, (uint32_t)k, 99) + z; break;
            case 1: val = (float)(int)(3.0 * unif((uint32_t)v, (uint32_t)k, 5)); break;
            case 2: val = 1000.0f + 0.01f * (3.0f * normal((uint32_t)g, (uint32_t)k, 99) + z); break;
            case 3: val = (float)((v * 7) % 5) + (float)k; break;
            default: val = z * (v % 3 == 0 ? 1e-3f : v % 3 == 1 ? 1.0f : 1e3f);
            }
            x[(size_t)v * d + k] = val;
        }
    return x;
}

static void test_kmeans_vs_ref(void **state)
{
    (void)state;
    const struct {
        int V, d, M;
    } shapes[] = {{600, 19, 2}, {900, 24, 16}, {700, 8, 40}, {130, 11, 130}};
    const double balances[] = {0, 1.0, 1.3, 2.0};
    moe_vocab_kmeans_config cfg;
    moe_vocab_kmeans_config_default(&cfg);
    cfg.iters = 12;
    for (int kind = 0; kind < 5; kind++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            const int V = shapes[s].V, d = shapes[s].d, M = shapes[s].M;
            float *x = make_data(kind, V, d);
            int32_t *a = malloc((size_t)V * sizeof *a);
            for (size_t b = 0; b < 4; b++) {
                cfg.balance = balances[b];
                cfg.seed = (uint32_t)(100 + kind * 10 + (int)s);
                kmeans_both(a, x, V, d, M, &cfg);
                moe_vocab_part *p;
                assert_int_equal(moe_vocab_part_create(&p, a, V, M), MOE_OK);
                if (cfg.balance > 0) {
                    const int cap = (int)ceil((double)V / M * cfg.balance - 1e-9);
                    for (int m = 0; m < M; m++)
                        assert_true(moe_vocab_part_offsets(p)[m + 1] - moe_vocab_part_offsets(p)[m] <= cap);
                }
                moe_vocab_part_destroy(p);
            }
            free(x), free(a);
        }
}

/* The same bits at 1, 2 and 3 threads (and, in CI, under every OpenBLAS kernel set). */
static void test_kmeans_threads(void **state)
{
    (void)state;
    enum { V = 5000, d = 32, M = 64 };
    float *x = make_data(0, V, d);
    int32_t *a[3];
    moe_vocab_kmeans_config cfg;
    moe_vocab_kmeans_config_default(&cfg);
    cfg.iters = 8;
    const int threads0 = openblas_get_num_threads();
    for (int t = 0; t < 3; t++) {
        openblas_set_num_threads(t + 1);
        a[t] = malloc(V * sizeof *a[t]);
        assert_int_equal(moe_vocab_partition_kmeans(a[t], x, V, d, M, &cfg), MOE_OK);
    }
    openblas_set_num_threads(threads0);
    assert_memory_equal(a[0], a[1], V * sizeof *a[0]);
    assert_memory_equal(a[0], a[2], V * sizeof *a[0]);
    for (int t = 0; t < 3; t++) free(a[t]);
    free(x);
}

/* ---- partition files ---- */

static void test_file_round_trip(void **state)
{
    (void)state;
    const int32_t assign[7] = {1, 0, 2, 2, 0, 1, 1};
    moe_vocab_part *p, *q;
    assert_int_equal(moe_vocab_part_create(&p, assign, 7, 3), MOE_OK);
    assert_int_equal(moe_vocab_part_write(p, "part.h5", "kmeans"), MOE_OK);
    assert_int_equal(moe_vocab_part_read(&q, "part.h5", 0, 0), MOE_OK);
    assert_int_equal(moe_vocab_part_experts(q), 3);
    assert_memory_equal(moe_vocab_part_assign(q), assign, sizeof assign);
    moe_vocab_part_destroy(q);
    assert_int_equal(moe_vocab_part_read(&q, "part.h5", 7, 3), MOE_OK);
    moe_vocab_part_destroy(q);
    /* what the file says must match what the caller expects */
    assert_int_equal(moe_vocab_part_read(&q, "part.h5", 8, 0), MOE_ERR_ARG);
    assert_detail_has("covers 7 tokens but the vocabulary has 8");
    assert_int_equal(moe_vocab_part_read(&q, "part.h5", 0, 4), MOE_ERR_ARG);
    assert_detail_has("into 3 experts, but vocab_experts=4");
    moe_vocab_part_destroy(p);
}

/* Writes a file with /model/vocab_head/assign as given (type, length) and vocab_experts M (< 0: none). */
static void write_raw(const char *path, hid_t type, const void *data, int n, int64_t M);

static void test_file_errors(void **state)
{
    (void)state;
    moe_vocab_part *q = (moe_vocab_part *)1;
    assert_int_equal(moe_vocab_part_read(&q, "no_such_file.h5", 0, 0), MOE_ERR_IO);
    assert_null(q);
    assert_detail_has("no_such_file.h5");
    FILE *f = fopen("text.h5", "w");
    fputs("not hdf5\n", f);
    fclose(f);
    assert_int_equal(moe_vocab_part_read(&q, "text.h5", 0, 0), MOE_ERR_FORMAT);
    assert_detail_has("not an HDF5 file");
    const int32_t ok[5] = {0, 1, 1, 0, 2}, out[5] = {0, 1, 3, 0, 2}, hole[5] = {0, 2, 2, 0, 2};
    write_raw("noexp.h5", H5T_NATIVE_INT32, ok, 5, -1);
    assert_int_equal(moe_vocab_part_read(&q, "noexp.h5", 0, 0), MOE_ERR_FORMAT);
    assert_detail_has("vocab_experts");
    write_raw("range.h5", H5T_NATIVE_INT32, out, 5, 3);
    assert_int_equal(moe_vocab_part_read(&q, "range.h5", 0, 0), MOE_ERR_ARG);
    assert_detail_has("range.h5");
    assert_detail_has("token 2 is assigned to expert 3");
    write_raw("hole.h5", H5T_NATIVE_INT32, hole, 5, 3);
    assert_int_equal(moe_vocab_part_read(&q, "hole.h5", 0, 0), MOE_ERR_ARG);
    assert_detail_has("expert 1 has no token");
    write_raw("m1.h5", H5T_NATIVE_INT32, ok, 5, 1);
    assert_int_equal(moe_vocab_part_read(&q, "m1.h5", 0, 0), MOE_ERR_ARG);
    assert_detail_has("vocab_experts=1");
    const float fl[5] = {0, 1, 1, 0, 2};
    write_raw("float.h5", H5T_NATIVE_FLOAT, fl, 5, 3);
    assert_int_equal(moe_vocab_part_read(&q, "float.h5", 0, 0), MOE_ERR_FORMAT);
    assert_detail_has("integers");
    /* an int64 file is fine (h5py writes int64 by default) */
    const int64_t wide[5] = {0, 1, 1, 0, 2};
    write_raw("wide.h5", H5T_NATIVE_INT64, wide, 5, 3);
    assert_int_equal(moe_vocab_part_read(&q, "wide.h5", 0, 0), MOE_OK);
    moe_vocab_part_destroy(q);
    /* a checkpoint without a vocabulary head */
    hid_t h = H5Fcreate("plain.h5", H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Gclose(H5Gcreate2(h, "/model", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    H5Fclose(h);
    assert_int_equal(moe_vocab_part_read(&q, "plain.h5", 0, 0), MOE_ERR_FORMAT);
    assert_detail_has("/model/vocab_head/assign");
}

/* A flipped byte in the assign data fails its Fletcher32 checksum; a truncated file fails to open. */
static void test_file_damage(void **state)
{
    (void)state;
    enum { V = 4000 };
    int32_t *assign = malloc(V * sizeof *assign);
    for (int v = 0; v < V; v++) assign[v] = v % 5;
    moe_vocab_part *p, *q;
    assert_int_equal(moe_vocab_part_create(&p, assign, V, 5), MOE_OK);
    assert_int_equal(moe_vocab_part_write(p, "damage.h5", "frequency"), MOE_OK);
    FILE *f = fopen("damage.h5", "rb");
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    unsigned char *buf = malloc((size_t)size);
    fseek(f, 0, SEEK_SET);
    assert_int_equal(fread(buf, 1, (size_t)size, f), size);
    fclose(f);
    /* the data is the long run of small integers 0 1 2 3 4 0 1 ...: flip one in its middle */
    long at = -1;
    for (long i = 0; i + 20 < size && at < 0; i += 4)
        if (buf[i] == 0 && buf[i + 4] == 1 && buf[i + 8] == 2 && buf[i + 12] == 3 && buf[i + 16] == 4) at = i + 4000;
    assert_true(at > 0 && at < size);
    buf[at] ^= 0x40;
    f = fopen("flipped.h5", "wb");
    fwrite(buf, 1, (size_t)size, f);
    fclose(f);
    assert_int_equal(moe_vocab_part_read(&q, "flipped.h5", 0, 0), MOE_ERR_CHECKSUM);
    assert_detail_has("flipped.h5");
    f = fopen("short.h5", "wb");
    fwrite(buf, 1, (size_t)size / 3, f);
    fclose(f);
    const moe_status s = moe_vocab_part_read(&q, "short.h5", 0, 0);
    assert_true(s == MOE_ERR_FORMAT || s == MOE_ERR_CHECKSUM);
    assert_detail_has("short.h5");
    free(buf), free(assign);
    moe_vocab_part_destroy(p);
}

static void write_raw(const char *path, hid_t type, const void *data, int n, int64_t M)
{
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hsize_t dims[1] = {(hsize_t)n};
    hid_t sp = H5Screate_simple(1, dims, NULL);
    hid_t ds = H5Dcreate2(f, "/model/vocab_head/assign", type, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    H5Dclose(ds);
    H5Sclose(sp);
    H5Pclose(lcpl);
    if (M >= 0) {
        hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT), as = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(g, "vocab_experts", H5T_NATIVE_INT64, as, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT64, &M);
        H5Aclose(a), H5Sclose(as), H5Gclose(g);
    }
    H5Fclose(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_part_layout),       cmocka_unit_test(test_part_errors),
        cmocka_unit_test(test_frequency_hand),    cmocka_unit_test(test_frequency_errors),
        cmocka_unit_test(test_frequency_vs_ref),  cmocka_unit_test(test_kmeans_blobs),
        cmocka_unit_test(test_kmeans_empty_cluster), cmocka_unit_test(test_kmeans_cap),
        cmocka_unit_test(test_kmeans_errors),     cmocka_unit_test(test_kmeans_vs_ref),
        cmocka_unit_test(test_kmeans_threads),    cmocka_unit_test(test_file_round_trip),
        cmocka_unit_test(test_file_errors),       cmocka_unit_test(test_file_damage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
