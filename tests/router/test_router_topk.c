/* Router top-k: the fast row and column selections against the rank-count
 * references, on random and heavily tied matrices of many shapes, and the
 * references against hand-written answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "router_test_util.h"

static void test_topk_hand(void **state)
{
    (void)state;
    /* Ties go to the lower index, output is in decreasing order. */
    const float a[2 * 5] = {1, 3, 3, 2, 3,
                            0, -1, 5, 5, -1};
    int idx[5 * 2]; /* large enough for both (2, 4) and (5, 2) */
    const int want_rows[2 * 4] = {1, 2, 4, 3, 2, 3, 0, 1};
    moe_topk_rows_ref(idx, a, 2, 5, 4);
    assert_memory_equal(idx, want_rows, sizeof want_rows);
    moe_topk_rows(idx, a, 2, 5, 4);
    assert_memory_equal(idx, want_rows, sizeof want_rows);
    /* Columns of the same (2, 5) matrix, k = 2: column j compares a[0,j], a[1,j]. */
    const int want_cols[5 * 2] = {0, 1, 0, 1, 1, 0, 1, 0, 0, 1};
    moe_topk_cols_ref(idx, a, 2, 5, 2);
    assert_memory_equal(idx, want_cols, sizeof want_cols);
    moe_topk_cols(idx, a, 2, 5, 2);
    assert_memory_equal(idx, want_cols, sizeof want_cols);
    uint64_t work[4];
    moe_topk_cols_ws(idx, a, 2, 5, 2, work);
    assert_memory_equal(idx, want_cols, sizeof want_cols);
}

/* Values uniform in [-1, 1), or drawn from {0, 0.5, 1} (with -0 beside +0,
 * which compare equal) to force many ties. */
static void fill(float *a, size_t n, int ties, uint64_t *s)
{
    for (size_t i = 0; i < n; i++) {
        a[i] = ties ? 0.5f * (float)(int)(3.0 * tu_uniform(s)) : tu_sym(s);
        if (ties && a[i] == 0.0f && tu_uniform(s) < 0.5) a[i] = -0.0f;
    }
}

/* Every k in 1..8 and near the ends, plus a spread in between. */
static int next_k(int k, int m)
{
    if (k < 10 || k >= m - 2) return k + 1;
    int step = m / 7 > 1 ? m / 7 : 1;
    return k + step < m - 2 ? k + step : m - 2;
}

static void check_rows(int n, int m, int ties, uint64_t *s)
{
    float *a = malloc((size_t)n * m * sizeof(float));
    int *fast = malloc((size_t)n * m * sizeof(int)), *ref = malloc((size_t)n * m * sizeof(int));
    fill(a, (size_t)n * m, ties, s);
    for (int k = 1; k <= m; k = next_k(k, m)) {
        moe_topk_rows(fast, a, n, m, k);
        moe_topk_rows_ref(ref, a, n, m, k);
        if (memcmp(fast, ref, (size_t)n * k * sizeof(int)) != 0)
            fail_msg("topk_rows differs from ref: n=%d m=%d k=%d ties=%d", n, m, k, ties);
    }
    free(a);
    free(fast);
    free(ref);
}

static void check_cols(int n, int m, int ties, uint64_t *s)
{
    float *a = malloc((size_t)n * m * sizeof(float));
    int *fast = malloc((size_t)n * m * sizeof(int)), *ref = malloc((size_t)n * m * sizeof(int));
    uint64_t *work = malloc(2 * (size_t)n * sizeof(uint64_t));
    fill(a, (size_t)n * m, ties, s);
    for (int k = 1; k <= n; k = next_k(k, n)) {
        moe_topk_cols_ref(ref, a, n, m, k);
        moe_topk_cols(fast, a, n, m, k);
        if (memcmp(fast, ref, (size_t)m * k * sizeof(int)) != 0)
            fail_msg("topk_cols differs from ref: n=%d m=%d k=%d ties=%d", n, m, k, ties);
        moe_topk_cols_ws(fast, a, n, m, k, work);
        if (memcmp(fast, ref, (size_t)m * k * sizeof(int)) != 0)
            fail_msg("topk_cols_ws differs from ref: n=%d m=%d k=%d ties=%d", n, m, k, ties);
    }
    free(work);
    free(a);
    free(fast);
    free(ref);
}

static void test_topk_rows_vs_ref(void **state)
{
    (void)state;
    uint64_t s = 1;
    const int shapes[][2] = {{1, 1}, {3, 1}, {5, 2}, {7, 3}, {16, 8}, {9, 9}, {33, 16}, {8, 17},
                             {4, 64}, {3, 257}, {2, 1000}, {1, 2500}};
    for (int ties = 0; ties < 2; ties++)
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) check_rows(shapes[i][0], shapes[i][1], ties, &s);
}

static void test_topk_cols_vs_ref(void **state)
{
    (void)state;
    uint64_t s = 2;
    const int shapes[][2] = {{1, 1}, {1, 4}, {2, 3}, {9, 8}, {17, 2}, {64, 8}, {100, 5},
                             {257, 3}, {1000, 2}, {2500, 1}};
    for (int ties = 0; ties < 2; ties++)
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) check_cols(shapes[i][0], shapes[i][1], ties, &s);
}

/* Sorted and reverse-sorted columns: the heap's worst cases. */
static void test_topk_cols_monotone(void **state)
{
    (void)state;
    const int n = 600, m = 2, k = 150;
    float *a = malloc((size_t)n * m * sizeof(float));
    int *fast = malloc((size_t)m * k * sizeof(int)), *ref = malloc((size_t)m * k * sizeof(int));
    for (int i = 0; i < n; i++) {
        a[i * m] = (float)i;
        a[i * m + 1] = (float)(n - i);
    }
    uint64_t *work = malloc(2 * (size_t)n * sizeof(uint64_t));
    moe_topk_cols_ref(ref, a, n, m, k);
    assert_int_equal(ref[0], n - 1);
    assert_int_equal(ref[k], 0);
    moe_topk_cols(fast, a, n, m, k);
    assert_memory_equal(fast, ref, (size_t)m * k * sizeof(int));
    moe_topk_cols_ws(fast, a, n, m, k, work);
    assert_memory_equal(fast, ref, (size_t)m * k * sizeof(int));
    free(work);
    free(a);
    free(fast);
    free(ref);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topk_hand),
        cmocka_unit_test(test_topk_rows_vs_ref),
        cmocka_unit_test(test_topk_cols_vs_ref),
        cmocka_unit_test(test_topk_cols_monotone),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
