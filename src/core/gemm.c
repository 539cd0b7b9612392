/* The few-row forward GEMM kernel, C (M, N) = A (M, K) B (N, K)^T + beta C
 * for M up to MOE_ROWS_MAX (core/gemm.h), and its plain reference.
 * OpenBLAS 0.3.21 packs all of B into its panel format for any M beyond its
 * small-matrix limit, so at 4-16 rows (the decode step at batch 4-16, an
 * expert with a few tokens) a call costs about what 64 rows would. This
 * kernel streams B once, straight from the weights: 4 rows of B at a time
 * stay in L1 while every 4-row block of A (all of A fits in L1 at decode
 * shapes) multiplies them, 16 zmm accumulators, one lane-wise sum each at
 * the end. Each output is one fixed-order dot product of its row of A and
 * its row of B, so a row's bits do not depend on M or on the other rows. */
#include "core/gemm.h"

#include <stddef.h>

#include "core/par.h"

typedef struct {
    int ta, tb, M, N, K, split_rows;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
} gemm_job;

/* Thread t's block of rows (or columns) of C: one single-threaded sgemm. */
static void gemm_run(void *ctx, int t, int nt)
{
    const gemm_job *j = ctx;
    long i0, i1;
    moe_par_range_aligned(j->split_rows ? j->M : j->N, 16, t, nt, &i0, &i1);
    if (i0 >= i1) return;
    const float *A = j->A, *B = j->B;
    float *C = j->C;
    int M = j->M, N = j->N;
    if (j->split_rows) { /* rows i0..i1 of op(A) */
        A += j->ta ? (size_t)i0 : (size_t)i0 * j->lda;
        C += (size_t)i0 * j->ldc;
        M = (int)(i1 - i0);
    } else { /* columns i0..i1 of op(B) */
        B += j->tb ? (size_t)i0 * j->ldb : (size_t)i0;
        C += i0;
        N = (int)(i1 - i0);
    }
    cblas_sgemm(CblasRowMajor, j->ta ? CblasTrans : CblasNoTrans, j->tb ? CblasTrans : CblasNoTrans, M, N, j->K,
                j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc);
}

void moe_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
              float beta, float *C, int ldc)
{
    const int split_rows = M >= N, blocks = ((split_rows ? M : N) + 15) / 16;
    int nt = moe_par_threads_for((long)M * N * K, MOE_GEMM_MIN_MNK_PER_THREAD);
    nt = nt < blocks ? nt : blocks;
    if (nt <= 1) {
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
                    lda, B, ldb, beta, C, ldc);
        return;
    }
    gemm_job j = {ta, tb, M, N, K, split_rows, alpha, beta, A, B, C, lda, ldb, ldc};
    moe_par_run(nt, gemm_run, &j);
}

void moe_sgemm_nt_rows_ref(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc)
{
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)m * lda + k] * B[(size_t)n * ldb + k];
            float *c = &C[(size_t)m * ldc + n];
            *c = beta == 0.0f ? s : s + beta * *c;
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define MOE_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,fma")))

/* The 4 lane sums of a, b, c, d as one vector (a's sum in lane 0). */
static inline MOE_AVX512 __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d)
{
    const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    /* [a01 a23 b01 b23 | a45 a67 b45 b67], then [a0123 b0123 c0123 d0123 | a4567 ...] */
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* One tile: rows m0..m0+MR-1 of C, columns n0..n0+nr-1 (nr 1-4; the
 * missing columns reuse the last row of B and are not stored). MR is a
 * constant at every call, so the accumulators stay in registers. */
static inline MOE_AVX512 __attribute__((always_inline)) void tile(const int MR, int nr, int K, const float *A,
                                                                  int lda, const float *B, int ldb, float beta,
                                                                  float *C, int ldc)
{
    const float *b[4];
    for (int j = 0; j < 4; j++) b[j] = B + (size_t)(j < nr ? j : nr - 1) * ldb;
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 bv[4];
        for (int j = 0; j < 4; j++) bv[j] = _mm512_loadu_ps(b[j] + k);
        for (int i = 0; i < MR; i++) {
            const __m512 av = _mm512_loadu_ps(A + (size_t)i * lda + k);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
    if (k < K) { /* the last K % 16 terms, masked: no read past a row */
        const __mmask16 km = (__mmask16)((1u << (K - k)) - 1u);
        __m512 bv[4];
        for (int j = 0; j < 4; j++) bv[j] = _mm512_maskz_loadu_ps(km, b[j] + k);
        for (int i = 0; i < MR; i++) {
            const __m512 av = _mm512_maskz_loadu_ps(km, A + (size_t)i * lda + k);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
    const __mmask8 nm = (__mmask8)((1u << nr) - 1u);
    for (int i = 0; i < MR; i++) {
        __m128 r = sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        float *c = C + (size_t)i * ldc;
        if (beta != 0.0f) r = _mm_fmadd_ps(_mm_set1_ps(beta), _mm_maskz_loadu_ps(nm, c), r);
        _mm_mask_storeu_ps(c, nm, r);
    }
}

static MOE_AVX512 void rows_avx512(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                                   float beta, float *C, int ldc)
{
    /* columns outer: each 4 rows of B are read from memory once */
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int nr = N - n0 < 4 ? N - n0 : 4;
        const float *b = B + (size_t)n0 * ldb;
        int m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) tile(4, nr, K, A + (size_t)m0 * lda, lda, b, ldb, beta, C + (size_t)m0 * ldc + n0, ldc);
        const float *a = A + (size_t)m0 * lda;
        float *c = C + (size_t)m0 * ldc + n0;
        switch (M - m0) {
        case 3: tile(3, nr, K, a, lda, b, ldb, beta, c, ldc); break;
        case 2: tile(2, nr, K, a, lda, b, ldb, beta, c, ldc); break;
        case 1: tile(1, nr, K, a, lda, b, ldb, beta, c, ldc); break;
        default: break;
        }
    }
}

int moe_rows_kernel_runs(void)
{
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

void moe_sgemm_nt_rows(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                       int ldc)
{
    if (M <= 0 || N <= 0) return;
    if (moe_rows_kernel_runs()) rows_avx512(M, N, K, A, lda, B, ldb, beta, C, ldc);
    else moe_sgemm_nt_rows_ref(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

#else

int moe_rows_kernel_runs(void)
{
    return 0;
}

void moe_sgemm_nt_rows(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                       int ldc)
{
    moe_sgemm_nt_rows_ref(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

#endif
