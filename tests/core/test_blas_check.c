/* The BLAS self-test's checker (core/blas_check.h): its float64 reference
 * against hand-worked products, its bound against a plain float GEMM in
 * another summation order (must pass), and against deliberately broken
 * GEMMs and GEMVs (each must be caught); the timed shape table against the
 * FLOP formulas of the code it stands for. */
#include <cblas.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/blas_check.h"

static double at(const float *X, int ld, int trans, int r, int c) { return trans ? X[(size_t)c * ld + r] : X[(size_t)r * ld + c]; }

/* A plain float GEMM summing K in reverse order: a legitimate implementation
 * whose rounding differs from OpenBLAS's. */
static void sgemm_float_reverse(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                const float *B, int ldb, float beta, float *C, int ldc)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0;
            for (int k = K - 1; k >= 0; k--) s += (float)at(A, lda, ta, i, k) * (float)at(B, ldb, tb, k, j);
            float *c = &C[(size_t)i * ldc + j];
            *c = alpha * s + (beta != 0.0f ? beta * *c : 0.0f);
        }
}

static void sgemv_float(int trans, int M, int N, float alpha, const float *A, int lda, const float *x, float beta,
                        float *y)
{
    const int rows = trans ? N : M, K = trans ? M : N;
    for (int i = 0; i < rows; i++) {
        float s = 0;
        for (int k = 0; k < K; k++) s += (float)at(A, lda, trans, i, k) * x[k];
        y[i] = alpha * s + (beta != 0.0f ? beta * y[i] : 0.0f);
    }
}

/* ---- broken variants: each must fail the check ---- */

static float bf16(float v) /* truncate to bfloat16, as a reduced-precision kernel would */
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u &= 0xffff0000u;
    memcpy(&v, &u, sizeof v);
    return v;
}

static void sgemm_bf16_inputs(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                              const float *B, int ldb, float beta, float *C, int ldc)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0;
            for (int k = 0; k < K; k++) s += bf16((float)at(A, lda, ta, i, k)) * bf16((float)at(B, ldb, tb, k, j));
            float *c = &C[(size_t)i * ldc + j];
            *c = alpha * s + (beta != 0.0f ? beta * *c : 0.0f);
        }
}

static void sgemm_drops_last_k(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K > 17 ? K - 1 : K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void sgemm_ignores_beta(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                               const float *B, int ldb, float beta, float *C, int ldc)
{
    (void)beta;
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, 0.0f, C, ldc);
}

static void sgemm_writes_padding(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                 const float *B, int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (ldc > N && M > 1) C[N] = 0.0f; /* the first padding float of row 0 */
}

static void sgemm_nan(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                      int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (M > 100 && N > 0) C[(size_t)(M - 1) * ldc + N - 1] = NAN;
}

static void sgemm_scribbles_on_a(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                 const float *B, int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (M > 0 && K > 0) ((float *)A)[0] += 1.0f; /* a kernel using its input as scratch */
}

static void sgemm_swaps_nt(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                           const float *B, int ldb, float beta, float *C, int ldc)
{
    /* a transposition mix-up that only shows on square operands */
    if (!ta && tb && N == K) tb = 0;
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* an error of (K + 8) u (|c| + K) in one element of the large products: about
 * four times the bound there (sum |a||b| is about K / 4 for inputs in [-1, 1]) */
static void sgemm_small_bias(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                             const float *B, int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (M > 500 && N > 0 && K > 0) C[0] += (float)(K + 8) * 0x1p-24f * (fabsf(C[0]) + (float)K);
}

static void sgemv_ignores_trans(int trans, int M, int N, float alpha, const float *A, int lda, const float *x,
                                float beta, float *y)
{
    if (trans && M == N) trans = 0;
    moe_blas_sgemv_openblas(trans, M, N, alpha, A, lda, x, beta, y);
}

static moe_blas_check_result check(moe_blas_sgemm_fn gemm, moe_blas_sgemv_fn gemv, int quick)
{
    moe_blas_check_result r;
    memset(&r, 0, sizeof r);
    moe_blas_check_opts o = {.n_threads = 2, .threads = {1, 2}, .quick = quick, .seed = 7};
    assert_int_equal(moe_blas_check(&r, gemm, gemv, &o), MOE_OK);
    return r;
}

static void test_ref_hand_worked(void **state)
{
    (void)state;
    /* A (2x3) = [1 2 3; 4 5 6], B (3x2) = [1 -1; 0 2; -2 1], C0 = [1 1; 1 1];
     * A B = [-5 6; -8 12]; 2 A B - C0 = [-11 11; -17 23]. */
    const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, -1, 0, 2, -2, 1}, C0[4] = {1, 1, 1, 1};
    double ref[4], mag[4];
    moe_blas_sgemm_ref(ref, mag, 0, 0, 2, 2, 3, 2.0f, A, 3, B, 2, -1.0f, C0, 2);
    assert_true(ref[0] == -11 && ref[1] == 11 && ref[2] == -17 && ref[3] == 23);
    /* |A||B| = [7 8; 16 20]: mag = 2 |A||B| + |C0| */
    assert_true(mag[0] == 15 && mag[1] == 17 && mag[2] == 33 && mag[3] == 41);
    /* the same product through the transposed layouts: At (3x2), Bt (2x3) */
    const float At[6] = {1, 4, 2, 5, 3, 6}, Bt[6] = {1, 0, -2, -1, 2, 1};
    double ref2[4], mag2[4];
    moe_blas_sgemm_ref(ref2, mag2, 1, 1, 2, 2, 3, 2.0f, At, 2, Bt, 3, -1.0f, C0, 2);
    assert_memory_equal(ref, ref2, sizeof ref);
    assert_memory_equal(mag, mag2, sizeof mag);
    /* beta 0: C0 is not read (NaN there must not show) */
    const float Cnan[4] = {NAN, NAN, NAN, NAN};
    moe_blas_sgemm_ref(ref2, mag2, 0, 0, 2, 2, 3, 1.0f, A, 3, B, 2, 0.0f, Cnan, 2);
    assert_true(ref2[0] == -5 && ref2[3] == 12 && mag2[0] == 7);
}

static void test_bound_factor(void **state)
{
    (void)state;
    /* gamma(K + 4) with u = 2^-24, a little over (K + 4) u */
    for (int K = 0; K < 5000; K += 97) {
        const double f = moe_blas_bound_factor(K), g = (K + 4) * 0x1p-24;
        assert_true(f >= g && f < 1.001 * g + (K + 2) * 0x1p-52);
    }
}

static void test_openblas_passes(void **state)
{
    (void)state;
    moe_blas_check_result r = check(moe_blas_sgemm_openblas, moe_blas_sgemv_openblas, 0);
    if (r.failures) print_error("%s: %s\n", openblas_get_corename(), r.first_failure);
    assert_int_equal(r.failures, 0);
    assert_true(r.cases > 3000);
    assert_true(r.worst_ratio > 0 && r.worst_ratio <= 1);
}

static void test_other_float_order_passes(void **state)
{
    (void)state;
    moe_blas_check_result r = check(sgemm_float_reverse, sgemv_float, 1);
    if (r.failures) print_error("%s\n", r.first_failure);
    assert_int_equal(r.failures, 0);
    /* a naive float sum really does round differently, but stays inside */
    assert_true(r.worst_ratio > 0.01 && r.worst_ratio <= 1);
}

/* quick: without the largest GEMMs, which only sgemm_small_bias needs */
static void expect_caught(moe_blas_sgemm_fn gemm, moe_blas_sgemv_fn gemv, const char *what, int quick)
{
    moe_blas_check_result r = check(gemm, gemv, quick);
    assert_true(r.failures > 0);
    assert_non_null(strstr(r.first_failure, what));
}

static void test_broken_kernels_caught(void **state)
{
    (void)state;
    expect_caught(sgemm_bf16_inputs, NULL, "the bound", 1);
    expect_caught(sgemm_drops_last_k, NULL, "the bound", 1);
    expect_caught(sgemm_ignores_beta, NULL, "the bound", 1);
    expect_caught(sgemm_writes_padding, NULL, "wrote outside C", 1);
    expect_caught(sgemm_nan, NULL, "is nan", 1);
    expect_caught(sgemm_scribbles_on_a, NULL, "changed an input", 1);
    expect_caught(sgemm_swaps_nt, NULL, "sgemm NT", 1);
    expect_caught(sgemm_small_bias, NULL, "the bound", 0);
    expect_caught(NULL, sgemv_ignores_trans, "sgemv T", 1);
}

/* The timed groups do the work of the code they stand for. */
static void test_shape_table(void **state)
{
    (void)state;
    int n;
    const moe_blas_shape *s = moe_blas_shapes(&n);
    assert_true(n >= 10);
    int kinds[3] = {0, 0, 0}, quick = 0;
    for (int i = 0; i < n; i++) {
        kinds[s[i].kind]++;
        quick += s[i].quick;
        const double f = moe_blas_shape_flops(&s[i]);
        if (s[i].kind == MOE_BLAS_EXPERT) /* experts.c's moe_expert_flops: 3 x forward (gelu) */
            assert_true(f == 3.0 * 4.0 * s[i].a * s[i].b * s[i].c);
        else if (s[i].kind == MOE_BLAS_LINEAR) /* forward + two gradients */
            assert_true(f == 3.0 * 2.0 * s[i].a * s[i].b * s[i].c);
        else { /* causal blocks of 32 rows: key counts 32, 64, ..., T per block, 6 GEMMs each */
            const int T = s[i].a, hs = s[i].b;
            double keys = 0;
            for (int r1 = 32; r1 <= T; r1 += 32) keys += r1;
            assert_true(f == 6.0 * 2.0 * 32 * hs * keys);
            assert_false(s[i].threads_all);
        }
    }
    assert_true(kinds[MOE_BLAS_EXPERT] && kinds[MOE_BLAS_LINEAR] && kinds[MOE_BLAS_ATTN] && quick > 0);
}

static void test_time_shape(void **state)
{
    (void)state;
    int n;
    const moe_blas_shape *s = moe_blas_shapes(&n);
    double g = 0;
    assert_int_equal(moe_blas_time_shape(&g, &s[0], moe_blas_sgemm_openblas, 1, 0.001, 1), MOE_OK);
    assert_true(isfinite(g) && g > 0);
    assert_int_equal(moe_blas_time_shape(&g, &s[0], moe_blas_sgemm_openblas, 1, 0.001, 0), MOE_ERR_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ref_hand_worked),   cmocka_unit_test(test_bound_factor),
        cmocka_unit_test(test_openblas_passes),   cmocka_unit_test(test_other_float_order_passes),
        cmocka_unit_test(test_broken_kernels_caught), cmocka_unit_test(test_shape_table),
        cmocka_unit_test(test_time_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
