/* The forward GEMM with its few-row paths (core/gemm.h): moe_sgemm_nt
 * against a float64 reference within the rounding bound of a K-term dot
 * product (the selftest's reference and bound, core/blas_check.h), for
 * 1 to MOE_ROWS_MAX + 3 rows (every path), narrow and 1024-wide outputs,
 * K with and without a 16-lane tail, strided operands and beta 0 and 1;
 * moerun's few-row kernel called directly (whatever the kernel set) against
 * its plain reference and float64, with the property it documents (a row's
 * bits do not depend on M or on the other rows) and beta 0 never reading C;
 * the documented path rule; that the kernel-set test names exactly the
 * SkylakeX family; and moe_gemm, split over 1-3 threads by rows or by
 * columns (every transposition, odd sizes, blocks that do not divide,
 * strided operands, alpha and beta as used), against float64. */
#include <cblas.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include "core/blas_check.h"
#include "core/gemm.h"
#include "core/par.h"

static float frand(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

typedef void (*nt_fn)(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                      int ldc);

static void call_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                    int ldc)
{
    moe_sgemm_nt(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

/* One product by f: A (M, K) with lda = K + 3, B (N, K) with ldb = K + 1, C (M, N) with ldc = N + 2. */
static void check_product_with(nt_fn f, int M, int N, int K, float beta)
{
    const int lda = K + 3, ldb = K + 1, ldc = N + 2;
    float *A = malloc(sizeof(float) * (size_t)M * lda), *B = malloc(sizeof(float) * (size_t)N * ldb);
    float *C = malloc(sizeof(float) * (size_t)M * ldc), *C0 = malloc(sizeof(float) * (size_t)M * ldc);
    assert_non_null(A);
    assert_non_null(B);
    assert_non_null(C);
    assert_non_null(C0);
    uint32_t s = (uint32_t)(M * 7919 + N * 31 + K);
    for (int i = 0; i < M * lda; i++) A[i] = frand(&s);
    for (int i = 0; i < N * ldb; i++) B[i] = frand(&s);
    for (int i = 0; i < M * ldc; i++) C0[i] = C[i] = frand(&s);
    f(M, N, K, A, lda, B, ldb, beta, C, ldc);
    double *ref = malloc(sizeof(double) * (size_t)M * N), *mag = malloc(sizeof(double) * (size_t)M * N);
    assert_non_null(ref);
    assert_non_null(mag);
    moe_blas_sgemm_ref(ref, mag, 0, 1, M, N, K, 1.0f, A, lda, B, ldb, beta, C0, ldc);
    const double factor = moe_blas_bound_factor(K);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const double got = C[(size_t)m * ldc + n], want = ref[(size_t)m * N + n];
            const double bound = factor * mag[(size_t)m * N + n];
            if (!(fabs(got - want) <= bound))
                fail_msg("M %d N %d K %d beta %g: C[%d][%d] = %.9g, float64 %.9g, error %.3g > bound %.3g", M, N, K,
                         (double)beta, m, n, got, want, fabs(got - want), bound);
        }
        /* the padding between rows is not written */
        for (int n = N; n < ldc; n++) assert_true(C[(size_t)m * ldc + n] == C0[(size_t)m * ldc + n]);
    }
    free(ref);
    free(mag);
    free(A);
    free(B);
    free(C);
    free(C0);
}

static void check_product(int M, int N, int K, float beta)
{
    check_product_with(call_nt, M, N, K, beta);
}

static void test_against_float64(void **state)
{
    (void)state;
    static const int Ns[] = {1, 8, 384, 1024, 1031};
    static const int Ks[] = {1, 7, 16, 33, 256};
    for (int M = 1; M <= MOE_ROWS_MAX + 3; M++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
                check_product(M, Ns[ni], Ks[ki], 0.0f);
                check_product(M, Ns[ni], Ks[ki], 1.0f);
            }
}

/* The few-row kernel itself, and its plain reference, against float64:
 * every tile shape (row tails 1-3, column tails 1-3), K tails. */
static void test_rows_kernel(void **state)
{
    (void)state;
    static const int Ns[] = {1, 2, 3, 4, 5, 7, 64, 1030};
    static const int Ks[] = {0, 1, 15, 16, 17, 64, 100, 512};
    for (int M = 1; M <= 9; M++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++)
                for (int b = 0; b < 2; b++) {
                    check_product_with(moe_sgemm_nt_rows, M, Ns[ni], Ks[ki], (float)b);
                    check_product_with(moe_sgemm_nt_rows_ref, M, Ns[ni], Ks[ki], (float)b);
                }
    check_product_with(moe_sgemm_nt_rows, 40, 77, 300, 1.0f); /* beyond MOE_ROWS_MAX still right */
}

/* Row m of C is the same bits whether it is computed among M rows or
 * alone, at every position in its 4-row block; beta 0 stores without
 * reading C (a NaN there does not leak). */
static void test_rows_kernel_row_independent(void **state)
{
    (void)state;
    const int M = 11, N = 37, K = 83;
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * N * K);
    float *C = malloc(sizeof(float) * M * N), *row = malloc(sizeof(float) * N);
    assert_non_null(A);
    assert_non_null(B);
    assert_non_null(C);
    assert_non_null(row);
    uint32_t s = 12345;
    for (int i = 0; i < M * K; i++) A[i] = frand(&s);
    for (int i = 0; i < N * K; i++) B[i] = frand(&s);
    for (int i = 0; i < M * N; i++) C[i] = NAN;
    moe_sgemm_nt_rows(M, N, K, A, K, B, K, 0.0f, C, N);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) row[n] = NAN;
        moe_sgemm_nt_rows(1, N, K, A + (size_t)m * K, K, B, K, 0.0f, row, N);
        for (int n = 0; n < N; n++) {
            assert_false(isnan(C[(size_t)m * N + n]));
            if (memcmp(&row[n], &C[(size_t)m * N + n], sizeof(float)))
                fail_msg("row %d column %d: %.9g among %d rows, %.9g alone", m, n, (double)C[(size_t)m * N + n], M,
                         (double)row[n]);
        }
    }
    free(A);
    free(B);
    free(C);
    free(row);
}

static void test_path_rule(void **state)
{
    (void)state;
    const int small = moe_blas_small_kernels(), own = small && moe_rows_kernel_runs();
    static const int Ns[] = {1, 8, 255, 256, 511, 512, 1023, 1024, 1025, 4096};
    for (int M = 1; M <= MOE_ROWS_MAX + 8; M++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++) {
            const int N = Ns[ni];
            const moe_nt_path p = moe_nt_path_for(M, N);
            if (own && M <= MOE_ROWS_MAX)
                assert_int_equal(p, M >= 4 || (M >= 2 && N >= 1024) ? MOE_NT_ROWS_KERNEL : MOE_NT_SGEMM);
            else if (M > MOE_GEMV_MAX_ROWS) assert_int_equal(p, MOE_NT_SGEMM);
            else if (!small) assert_int_equal(p, MOE_NT_SGEMV_ROWS);
            else assert_int_equal(p, M >= 2 && N >= 1024 ? MOE_NT_SGEMV_ROWS : MOE_NT_SGEMM);
        }
    /* the AVX-512 kernel sets only run where the few-row kernel does (cli/main.c refuses others) */
    if (small) assert_true(moe_rows_kernel_runs());
}

static void test_kernel_set(void **state)
{
    (void)state;
    const char *core = openblas_get_corename();
    assert_non_null(core);
    const int family = !strcasecmp(core, "SkylakeX") || !strcasecmp(core, "Cooperlake") ||
                       !strcasecmp(core, "SapphireRapids");
    assert_int_equal(moe_blas_small_kernels(), family);
    assert_int_equal(moe_blas_small_kernels(), family); /* the cached answer */
}

/* moe_gemm at 1, 2 and 3 threads: each element within the float64 bound,
 * C's padding untouched. Sizes large enough to split (M*N*K per thread
 * above MOE_GEMM_MIN_MNK_PER_THREAD), by rows (M >= N) and by columns, with
 * 16-wide blocks that do not divide M or N and shares smaller than a block. */
static void test_split(void **state)
{
    (void)state;
    static const int shapes[][3] = {
        {2048, 384, 128}, {384, 128, 2048}, {129, 1031, 257}, {1031, 129, 257}, {40, 600, 600}, {600, 17, 900},
        {33, 33, 4096},
    };
    static const float ab[][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.5f, -1.0f}};
    const int saved = openblas_get_num_threads();
    for (int nt = 1; nt <= 3; nt++) {
        openblas_set_num_threads(nt);
        assert_int_equal(moe_par_threads(), nt);
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int tr = 0; tr < 4; tr++) {
                const int M = shapes[si][0], N = shapes[si][1], K = shapes[si][2], ta = tr & 1, tb = tr >> 1;
                const float alpha = ab[(si + tr) % 3][0], beta = ab[(si + tr) % 3][1];
                const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                const size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
                float *A = malloc(sizeof(float) * na), *B = malloc(sizeof(float) * nb);
                float *C = malloc(sizeof(float) * nc), *C0 = malloc(sizeof(float) * nc);
                double *ref = malloc(sizeof(double) * (size_t)M * N), *mag = malloc(sizeof(double) * (size_t)M * N);
                assert_true(A && B && C && C0 && ref && mag);
                uint32_t s = (uint32_t)(M * 31 + N * 7 + K + tr);
                for (size_t i = 0; i < na; i++) A[i] = frand(&s);
                for (size_t i = 0; i < nb; i++) B[i] = frand(&s);
                for (size_t i = 0; i < nc; i++) C0[i] = C[i] = frand(&s);
                moe_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
                moe_blas_sgemm_ref(ref, mag, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc);
                const double factor = moe_blas_bound_factor(K);
                for (int m = 0; m < M; m++) {
                    for (int n = 0; n < N; n++) {
                        const double got = C[(size_t)m * ldc + n], want = ref[(size_t)m * N + n];
                        if (!(fabs(got - want) <= factor * mag[(size_t)m * N + n]))
                            fail_msg("threads %d ta %d tb %d M %d N %d K %d: C[%d][%d] = %.9g, float64 %.9g", nt, ta,
                                     tb, M, N, K, m, n, got, want);
                    }
                    for (int n = N; n < ldc; n++) assert_true(C[(size_t)m * ldc + n] == C0[(size_t)m * ldc + n]);
                }
                free(A), free(B), free(C), free(C0), free(ref), free(mag);
            }
    }
    openblas_set_num_threads(saved);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_float64),
        cmocka_unit_test(test_rows_kernel),
        cmocka_unit_test(test_rows_kernel_row_independent),
        cmocka_unit_test(test_path_rule),
        cmocka_unit_test(test_kernel_set),
        cmocka_unit_test(test_split),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
