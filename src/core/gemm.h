/* The one GEMM form of the forward passes, C = A B^T (+ beta C), with a
 * row-by-row sgemv path for few rows: the decode step of generation runs
 * every linear layer and every expert on one to a few tokens. */
#ifndef MOE_CORE_GEMM_H
#define MOE_CORE_GEMM_H

#include <cblas.h>

/* Up to this many rows, one sgemv per row, unless the kernels multiply
 * small products directly (moe_blas_small_kernels). OpenBLAS 0.3.21
 * (Debian 12) packs the whole of B for any M in its Haswell, Zen and older
 * kernels, so at M = 1 sgemm costs 5-7x a sgemv that streams B once
 * (1024 x 256: 110 vs 20 us; 256 x 512: 38 vs 6 us, Haswell kernels, one
 * thread); the two cross near M = 4. The SkylakeX family instead has
 * small-matrix sgemm kernels that skip the packing: there sgemm beat the
 * sgemv rows at every decode shape for M = 1 (0.57-0.86x their time) and
 * for M = 2, 3 except at N = 1024 (2.0-2.4x slower there).
 * bench/gemm_rows.sh prints both paths and the one taken at the decode
 * step's shapes. */
#define MOE_GEMV_MAX_ROWS 3

/* 1 where the loaded OpenBLAS kernel set has the small-matrix sgemm
 * kernels (SkylakeX, Cooperlake, SapphireRapids), else 0; read once. */
int moe_blas_small_kernels(void);

/* 1 if moe_sgemm_nt computes (M, N) outputs as one sgemv per row. */
static inline int moe_gemv_rows(int M, int N)
{
    if (M > MOE_GEMV_MAX_ROWS) return 0;
    return moe_blas_small_kernels() ? M >= 2 && N >= 1024 : 1;
}

/* Row-major C (M, N) = A (M, K) B (N, K)^T + beta C, leading dimensions lda,
 * ldb, ldc. Each row of C is what sgemv or sgemm returns for it: which one
 * depends on M, N and the kernel set, so a row's bits may depend on M
 * (OpenBLAS promises no more for sgemm alone). */
static inline void moe_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta,
                                float *C, int ldc)
{
    if (moe_gemv_rows(M, N)) {
        for (int m = 0; m < M; m++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, N, K, 1.0f, B, ldb, A + (size_t)m * lda, 1, beta,
                        C + (size_t)m * ldc, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

#endif
