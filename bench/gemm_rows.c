/* Few-row GEMMs of the decode step: cblas_sgemm against moe_sgemm_nt
 * (core/gemm.h: moerun's own few-row kernel up to MOE_ROWS_MAX rows on the
 * AVX-512 kernel sets; else one sgemv per row up to MOE_GEMV_MAX_ROWS rows,
 * unless the kernel set has small-matrix sgemm kernels), at the forward
 * shapes of a generation step, M = 1..128 rows; also the sgemv rows alone
 * (up to 8 rows) and the few-row kernel alone (where the CPU runs it), so
 * the table shows every path and the one taken. The sides alternate within
 * each round; the figure is the median over rounds.
 * Prints a table and `PERF gemm_rows.<shape>_m<M> <ratio> x` lines (sgemm
 * time / moerun time: above 1, moerun's choice is faster).
 *   gemm_rows_bench [--rounds R] [--quick]          (bench/gemm_rows.sh) */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/gemm.h"
#include "core/moe.h"

typedef struct {
    const char *name;
    int N, K; /* C (M, N) = A (M, K) B (N, K)^T */
} shape;

/* d_model 256, d_ff 512, 4 query / 2 key-value heads of 64, SwiGLU (the
 * Mixtral-shaped model of bench/mixtral_vs_torch.sh), and the default GELU
 * model's d_ff 1024 */
static const shape shapes[] = {
    {"qkv_256x384", 384, 256},       {"attn_out_256x256", 256, 256}, {"swiglu_w1_256x1024", 1024, 256},
    {"expert_w2_512x256", 256, 512}, {"gelu_w2_1024x256", 256, 1024}, {"router_256x8", 8, 256},
};

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Seconds per call of one side (0 sgemm, 1 moe_sgemm_nt, 2 sgemv rows,
 * 3 the few-row kernel):
 * enough calls for about 5 ms. */
static double time_side(int side, int M, const shape *s, const float *A, const float *B, float *C)
{
    int reps = 1;
    for (;;) {
        const double t0 = moe_now();
        for (int r = 0; r < reps; r++) {
            if (side == 1)
                moe_sgemm_nt(M, s->N, s->K, A, s->K, B, s->K, 0.0f, C, s->N);
            else if (side == 3)
                moe_sgemm_nt_rows(M, s->N, s->K, A, s->K, B, s->K, 0.0f, C, s->N);
            else if (side == 2)
                for (int m = 0; m < M; m++)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, s->N, s->K, 1.0f, B, s->K, A + (size_t)m * s->K, 1,
                                0.0f, C + (size_t)m * s->N, 1);
            else
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, s->N, s->K, 1.0f, A, s->K, B, s->K, 0.0f, C,
                            s->N);
        }
        const double dt = moe_now() - t0;
        if (dt > 0.005 || reps > (1 << 20)) return dt / reps;
        reps *= 4;
    }
}

int main(int argc, char **argv)
{
    int rounds = 7, quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: gemm_rows_bench [--rounds R] [--quick]\n");
            return 2;
        }
    }
    if (quick) rounds = 1;
    if (rounds < 1 || rounds > 99) {
        fprintf(stderr, "gemm_rows_bench: --rounds must be in [1, 99]\n");
        return 2;
    }
    static const int Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64, 128};
    const int max_m = 128, n_ms = (int)(sizeof Ms / sizeof Ms[0]), n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    const int have_rows = moe_rows_kernel_runs();
    float *A = malloc(sizeof(float) * max_m * 1024), *B = malloc(sizeof(float) * 1024 * 1024),
          *C = malloc(sizeof(float) * max_m * 1024);
    if (!A || !B || !C) {
        fprintf(stderr, "gemm_rows_bench: out of memory\n");
        return 1;
    }
    for (int i = 0; i < max_m * 1024; i++) A[i] = (float)(((long)i * 7919) % 201 - 100) / 100.0f;
    for (int i = 0; i < 1024 * 1024; i++) B[i] = (float)(((long)i * 104729) % 401 - 200) / 400.0f;
    printf("C (M, N) = A (M, K) B^T, one thread, kernels %s (small-matrix sgemm kernels: %s; few-row kernel: %s): "
           "microseconds per call, cblas_sgemm, sgemv rows, the few-row kernel and moe_sgemm_nt (the path it "
           "takes), median of %d rounds\n",
           openblas_get_corename(), moe_blas_small_kernels() ? "yes" : "no",
           have_rows ? "AVX-512" : "not on this CPU", rounds);
    printf("%-20s %3s %10s %10s %10s %10s %-6s %8s\n", "shape (K x N)", "M", "sgemm", "sgemv", "rows", "moerun",
           "path", "ratio");
    static const char *const path_name[] = {"sgemm", "sgemv", "rows"};
    double *t[4];
    for (int i = 0; i < 4; i++) t[i] = malloc(sizeof(double) * rounds);
    for (int si = 0; si < n_shapes; si++)
        for (int mi = 0; mi < n_ms; mi++) {
            const int M = Ms[mi];
            if (quick && M > 4) break;
            int sides[4], n_sides = 0;
            sides[n_sides++] = 0;
            sides[n_sides++] = 1;
            if (M <= 8) sides[n_sides++] = 2;
            if (have_rows) sides[n_sides++] = 3;
            for (int r = 0; r < rounds; r++)
                for (int k = 0; k < n_sides; k++) { /* rotate which side runs first */
                    const int side = sides[(r + k) % n_sides];
                    t[side][r] = time_side(side, M, &shapes[si], A, B, C);
                }
            char col[4][16];
            for (int k = 0; k < 4; k++) snprintf(col[k], sizeof col[k], "-");
            for (int k = 0; k < n_sides; k++) {
                qsort(t[sides[k]], rounds, sizeof(double), cmp_double);
                snprintf(col[sides[k]], sizeof col[sides[k]], "%.2f", t[sides[k]][rounds / 2] * 1e6);
            }
            const double a = t[0][rounds / 2], b = t[1][rounds / 2];
            printf("%-20s %3d %10s %10s %10s %10s %-6s %7.2fx\n", shapes[si].name, M, col[0], col[2], col[3], col[1],
                   path_name[moe_nt_path_for(M, shapes[si].N)], a / b);
            printf("PERF gemm_rows.%s_m%d %.2f x cblas_sgemm time over moe_sgemm_nt time, %d rows, one thread\n",
                   shapes[si].name, M, a / b, M);
        }
    free(t[0]);
    free(t[1]);
    free(t[2]);
    free(t[3]);
    free(A);
    free(B);
    free(C);
    return 0;
}
