/* The one GEMM form of the forward passes, C = A B^T (+ beta C), with two
 * few-row paths (row-by-row sgemv, and moerun's own AVX-512 kernel in
 * core/gemm.c): the decode step of generation runs every linear layer and
 * every expert on one to a few tokens. */
#ifndef MOE_CORE_GEMM_H
#define MOE_CORE_GEMM_H

#include <cblas.h>

/* C (M, N) = alpha op(A) op(B) + beta C, row-major: cblas_sgemm's
 * arguments, with ta and tb 1 for a transposed operand. Outside a parallel
 * region, with more than one thread (core/par.h) and at least
 * MOE_GEMM_MIN_MNK_PER_THREAD of M*N*K per thread, the rows of C (if
 * M >= N, else its columns) are split over the threads in blocks of 16,
 * each block one single-threaded cblas_sgemm; otherwise one cblas_sgemm.
 * At moerun's shapes on 2 cores OpenBLAS 0.3.21's own threading reaches
 * 1.1-1.7x the rate of one thread, this split 1.5-1.95x, faster at every
 * shape (1.06-1.44x; bench/gemm_split.sh): OpenBLAS's workers sleep after
 * every call and synchronise inside it, the pool's workers spin between
 * regions and each block runs alone. A block's bits are what sgemm
 * returns for that block, so they may depend on the thread count (as with
 * OpenBLAS's threading). Not collective; cannot fail. */
void moe_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
              float beta, float *C, int ldc);

/* No split below this M*N*K per thread: OpenBLAS 0.3.21's own cut (it
 * threads a GEMM only above M*N*K = 2^18), per thread at 2 threads. */
#define MOE_GEMM_MIN_MNK_PER_THREAD (1L << 17)

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

/* Up to this many rows, on the AVX-512 kernel sets (moe_blas_small_kernels,
 * which only run where the CPU has AVX-512), moerun's own few-row kernel
 * (core/gemm.c) instead of either BLAS path: it reads B once where
 * OpenBLAS 0.3.21's sgemm packs all of it (4-32 rows: 1.4-9x faster where
 * sgemm packs, within 12% where its small-matrix kernels still apply, e.g.
 * 4 rows of 256 x 256 or an 8-output router; bench/gemm_rows.sh). Tied to the kernel set rather than to the CPU alone
 * so that every rank of a job, whose kernel sets start-up checks to agree
 * (core/platform.h), takes the same path. */
#define MOE_ROWS_MAX 32

/* 1 where this CPU runs moe_sgemm_nt_rows' AVX-512 code (else it runs the
 * reference loop); read once. */
int moe_rows_kernel_runs(void);

/* C (M, N) = A (M, K) B (N, K)^T + beta C, row-major, one thread: AVX-512
 * where the CPU has it, else moe_sgemm_nt_rows_ref. Each element is one
 * dot product over k in a fixed order (16 lanes, then a fixed tree), so a
 * row of C does not depend on M or on the other rows. beta 0 never reads
 * C. Meant for few rows: it does not block for caches over M. */
void moe_sgemm_nt_rows(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                       int ldc);
/* The same, plain loops (the test's reference for the fast kernel). */
void moe_sgemm_nt_rows_ref(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta,
                           float *C, int ldc);

/* Which path moe_sgemm_nt takes for (M, N). */
typedef enum { MOE_NT_SGEMM, MOE_NT_SGEMV_ROWS, MOE_NT_ROWS_KERNEL } moe_nt_path;

static inline moe_nt_path moe_nt_path_for(int M, int N)
{
    if (moe_blas_small_kernels() && moe_rows_kernel_runs() && M <= MOE_ROWS_MAX) {
        /* 1-3 rows of a narrow B: OpenBLAS's small-matrix kernels are as
         * fast or a little faster (bench/gemm_rows.sh) */
        return M >= 4 || (M >= 2 && N >= 1024) ? MOE_NT_ROWS_KERNEL : MOE_NT_SGEMM;
    }
    return moe_gemv_rows(M, N) ? MOE_NT_SGEMV_ROWS : MOE_NT_SGEMM;
}

/* Row-major C (M, N) = A (M, K) B (N, K)^T + beta C, leading dimensions lda,
 * ldb, ldc. Each row of C is what sgemv, sgemm or moe_sgemm_nt_rows returns
 * for it: which one depends on M, N and the kernel set, so a row's bits may
 * depend on M (OpenBLAS promises no more for sgemm alone). */
static inline void moe_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta,
                                float *C, int ldc)
{
    switch (moe_nt_path_for(M, N)) {
    case MOE_NT_ROWS_KERNEL: moe_sgemm_nt_rows(M, N, K, A, lda, B, ldb, beta, C, ldc); return;
    case MOE_NT_SGEMV_ROWS:
        for (int m = 0; m < M; m++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, N, K, 1.0f, B, ldb, A + (size_t)m * lda, 1, beta,
                        C + (size_t)m * ldc, 1);
        return;
    case MOE_NT_SGEMM: break;
    }
    moe_gemm(0, 1, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

#endif
