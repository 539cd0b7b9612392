/* BLAS self-test kernels: hold the loaded OpenBLAS kernel set's sgemm and
 * sgemv to a float64 reference under a rounding-error bound, and time sgemm
 * at moerun's own shapes. `moe selftest blas` runs them once per candidate
 * kernel set (OPENBLAS_CORETYPE is read when the library loads, so each
 * candidate is a separate process) and picks the fastest correct set.
 *
 * Error bound. Each element of C = alpha op(A) op(B) + beta C0 computed in
 * float with any summation order and blocking of K satisfies
 *     |C - C_exact| <= gamma(K + 4) * (|alpha| sum_k |a_ik| |b_kj| + |beta| |c0_ij|)
 * with gamma(n) = n u / (1 - n u), u = 2^-24: K - 1 additions and K products
 * (fused or not), one rounding of alpha times each K-block partial, one of
 * beta * c0 and one per addition into C (Higham, Accuracy and Stability of
 * Numerical Algorithms, 3.1 and 3.5). A kernel set that exceeds it anywhere
 * (or writes outside C, or changes A, B or x) computes something else. */
#ifndef MOE_CORE_BLAS_CHECK_H
#define MOE_CORE_BLAS_CHECK_H

#include "core/moe.h"

/* Row-major C (M, N) = alpha op(A) op(B) + beta C; ta/tb: 0 as stored, 1 transposed.
 * The fields follow cblas_sgemm(CblasRowMajor, ...). */
typedef void (*moe_blas_sgemm_fn)(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                  const float *B, int ldb, float beta, float *C, int ldc);
/* Row-major y = alpha op(A) x + beta y with A (M, N), unit strides; op(A) is
 * (M, N) for trans 0 and (N, M) for trans 1 (cblas_sgemv(CblasRowMajor, ...)). */
typedef void (*moe_blas_sgemv_fn)(int trans, int M, int N, float alpha, const float *A, int lda,
                                  const float *x, float beta, float *y);

/* cblas_sgemm / cblas_sgemv of the linked OpenBLAS behind those signatures. */
void moe_blas_sgemm_openblas(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                             const float *B, int ldb, float beta, float *C, int ldc);
void moe_blas_sgemv_openblas(int trans, int M, int N, float alpha, const float *A, int lda, const float *x,
                             float beta, float *y);

/* The float64 reference: ref = alpha op(A) op(B) + beta C0 and
 * mag = |alpha| |op(A)| |op(B)| + |beta| |C0|, both (M, N) with row stride N. */
void moe_blas_sgemm_ref(double *ref, double *mag, int ta, int tb, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta, const float *C0, int ldc);

/* gamma(K + 4) of the bound above (plus the float64 reference's own error). */
double moe_blas_bound_factor(int K);

typedef struct {
    int cases;            /* calls checked */
    int failures;         /* calls with an element past the bound, a NaN, or a write outside C / y */
    double worst_ratio;   /* max over every element of |C - ref| / bound (1 = at the bound);
                           * INFINITY for a NaN, a write outside C or a changed input */
    char first_failure[256]; /* the first failing call: routine, shape, what went wrong */
    char worst_case[160];    /* the call where worst_ratio was reached */
} moe_blas_check_result;

/* How a check runs: every case at each of threads[0..n_threads) BLAS
 * threads (the threaded paths of OpenBLAS split large GEMMs differently);
 * quick leaves out the four largest GEMMs and half the random shapes. */
typedef struct {
    int n_threads;
    int threads[4];
    int quick;
    uint32_t seed;
} moe_blas_check_opts;

/* Runs every check case through gemm and gemv (either may be NULL to skip
 * it) on the calling thread's current BLAS thread count; accumulates into
 * *r (zero it first; cases from several calls, e.g. at 1 and at N threads,
 * add up). The cases: every transposition pair, alpha/beta as moerun uses
 * them (1/0, 1/1, 1/sqrt(hs)/0) and general ones, sizes 1..129 around the
 * kernels' unroll widths (1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64,
 * 65, 127, 129), padded leading dimensions, K = 0, random shapes up to 300
 * and a few large blocked ones. MOE_ERR_NOMEM when buffers cannot be had. */
moe_status moe_blas_check(moe_blas_check_result *r, moe_blas_sgemm_fn gemm, moe_blas_sgemv_fn gemv,
                          const moe_blas_check_opts *o);

/* A timed shape: one group of GEMMs as moerun runs it.
 *   MOE_BLAS_EXPERT  a = rows M, b = d_model, c = d_ff: the six GEMMs of an
 *                    expert FFN forward+backward (experts.c), 12 M d F flops
 *   MOE_BLAS_LINEAR  a = rows N, b = in C, c = out OC: forward (beta 1, bias
 *                    preloaded), input and weight gradients (model/ops.c)
 *   MOE_BLAS_ATTN    a = T, b = head size, c = heads (for the q/k/v strides):
 *                    the causal attention of one (sequence, head) pair in
 *                    32-query row blocks, forward and backward (model/ops.c)
 * threads_all: also time at every core, split as moerun splits its GEMMs
 * (moe_gemm, core/gemm.h; attention runs one BLAS thread per
 * (sequence, head) pair inside moerun's own threads, so it is 1-thread only). */
typedef enum { MOE_BLAS_EXPERT, MOE_BLAS_LINEAR, MOE_BLAS_ATTN } moe_blas_shape_kind;
typedef struct {
    const char *name;
    const char *what;
    moe_blas_shape_kind kind;
    int a, b, c;
    int threads_all;
    int quick; /* part of the --quick subset */
} moe_blas_shape;

/* The table of timed shapes (n entries). */
const moe_blas_shape *moe_blas_shapes(int *n);

/* One GEMM call of a shape. ld* = 0: the natural leading dimension. */
typedef struct {
    int ta, tb, M, N, K, lda, ldb, ldc;
    float alpha, beta;
} moe_blas_gemm_op;

/* The GEMM calls of shape s in run order: writes up to max into ops and
 * returns how many there are (call with max = 0 to count). */
int moe_blas_shape_ops(const moe_blas_shape *s, moe_blas_gemm_op *ops, int max);

/* Floating-point operations of one run of s (2 M N K per call). */
double moe_blas_shape_flops(const moe_blas_shape *s);

/* Times s through gemm at `threads` BLAS threads (openblas_set_num_threads;
 * restored after): one warm-up run, then `samples` samples of at least
 * sample_s seconds each; *gflops = the median sample's rate. */
moe_status moe_blas_time_shape(double *gflops, const moe_blas_shape *s, moe_blas_sgemm_fn gemm, int threads,
                               double sample_s, int samples);

#endif
