/* The forward GEMM with its few-row path (core/gemm.h): moe_sgemm_nt
 * against a float64 reference within the rounding bound of a K-term dot
 * product (the selftest's reference and bound, core/blas_check.h), for
 * 1-6 rows (both paths), narrow and 1024-wide outputs, odd K, strided
 * operands and beta 0 and 1; the documented path rule (never sgemv above
 * MOE_GEMV_MAX_ROWS; up to it always, or on the SkylakeX family only for
 * 2-3 rows of 1024 or more outputs); and that the kernel-set test names
 * exactly the SkylakeX family. */
#include <cblas.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <strings.h>

#include <cmocka.h>

#include "core/blas_check.h"
#include "core/gemm.h"

static float frand(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* One product: A (M, K) with lda = K + 3, B (N, K) with ldb = K + 1, C (M, N) with ldc = N + 2. */
static void check_product(int M, int N, int K, float beta)
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
    moe_sgemm_nt(M, N, K, A, lda, B, ldb, beta, C, ldc);
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

static void test_against_float64(void **state)
{
    (void)state;
    static const int Ns[] = {1, 8, 384, 1024, 1031};
    static const int Ks[] = {1, 7, 256};
    for (int M = 1; M <= MOE_GEMV_MAX_ROWS + 3; M++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
                check_product(M, Ns[ni], Ks[ki], 0.0f);
                check_product(M, Ns[ni], Ks[ki], 1.0f);
            }
}

static void test_path_rule(void **state)
{
    (void)state;
    const int small = moe_blas_small_kernels();
    static const int Ns[] = {1, 8, 255, 256, 511, 512, 1023, 1024, 1025, 4096};
    for (int M = 1; M <= 16; M++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++) {
            const int N = Ns[ni], rows = moe_gemv_rows(M, N);
            if (M > MOE_GEMV_MAX_ROWS) assert_false(rows);
            else if (!small) assert_true(rows);
            else assert_int_equal(rows, M >= 2 && N >= 1024);
        }
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_float64),
        cmocka_unit_test(test_path_rule),
        cmocka_unit_test(test_kernel_set),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
