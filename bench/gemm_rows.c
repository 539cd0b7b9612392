/* Few-row GEMMs of the decode step: cblas_sgemm against moe_sgemm_nt
 * (core/gemm.h: one sgemv per row up to MOE_GEMV_MAX_ROWS rows), at the
 * forward shapes of a generation step, M = 1..8 rows. Both sides alternate
 * within each round; the figure is the median over rounds. Prints a table
 * and `PERF gemm_rows.<shape>_m<M> <ratio> x` lines (sgemm time / moerun
 * time: above 1, moerun's choice is faster).
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

/* Seconds per call of one side: enough calls for about 5 ms. */
static double time_side(int ours, int M, const shape *s, const float *A, const float *B, float *C)
{
    int reps = 1;
    for (;;) {
        const double t0 = moe_now();
        for (int r = 0; r < reps; r++) {
            if (ours)
                moe_sgemm_nt(M, s->N, s->K, A, s->K, B, s->K, 0.0f, C, s->N);
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
    const int max_m = 8, n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    float *A = malloc(sizeof(float) * max_m * 1024), *B = malloc(sizeof(float) * 1024 * 1024),
          *C = malloc(sizeof(float) * max_m * 1024);
    if (!A || !B || !C) {
        fprintf(stderr, "gemm_rows_bench: out of memory\n");
        return 1;
    }
    for (int i = 0; i < max_m * 1024; i++) A[i] = (float)(((long)i * 7919) % 201 - 100) / 100.0f;
    for (int i = 0; i < 1024 * 1024; i++) B[i] = (float)(((long)i * 104729) % 401 - 200) / 400.0f;
    printf("C (M, N) = A (M, K) B^T, one thread: microseconds per call, cblas_sgemm vs moe_sgemm_nt "
           "(sgemv rows up to M = %d), median of %d rounds\n",
           MOE_GEMV_MAX_ROWS, rounds);
    printf("%-20s %3s %10s %10s %8s\n", "shape (K x N)", "M", "sgemm", "moerun", "ratio");
    double *t[2];
    t[0] = malloc(sizeof(double) * rounds);
    t[1] = malloc(sizeof(double) * rounds);
    for (int si = 0; si < n_shapes; si++)
        for (int M = 1; M <= max_m; M++) {
            if (quick && M > 2) break;
            for (int r = 0; r < rounds; r++)
                for (int k = 0; k < 2; k++) { /* alternate which side runs first */
                    const int ours = (r + k) % 2;
                    t[ours][r] = time_side(ours, M, &shapes[si], A, B, C);
                }
            qsort(t[0], rounds, sizeof(double), cmp_double);
            qsort(t[1], rounds, sizeof(double), cmp_double);
            const double a = t[0][rounds / 2], b = t[1][rounds / 2];
            printf("%-20s %3d %10.2f %10.2f %7.2fx\n", shapes[si].name, M, a * 1e6, b * 1e6, a / b);
            printf("PERF gemm_rows.%s_m%d %.2f x cblas_sgemm time over moe_sgemm_nt time, %d rows, one thread\n",
                   shapes[si].name, M, a / b, M);
        }
    free(t[0]);
    free(t[1]);
    free(A);
    free(B);
    free(C);
    return 0;
}
