/* moerun's threaded GEMM against OpenBLAS's own threading, at every core:
 * the GEMM groups of moerun's shapes (core/blas_check.c: the expert FFN,
 * dense FFN, QKV projection and logits, forward and backward) through
 * cblas_sgemm with OpenBLAS at N threads, and through moe_gemm (core/gemm.h:
 * rows or columns split over moerun's own spinning pool, one
 * single-threaded sgemm per block), and through cblas_sgemm at one thread
 * for the scale. The sides alternate within each round (which goes first
 * rotates); the figure is the median over rounds.
 * Prints a table and `PERF gemm_split.<shape> <ratio> x` lines (moe_gemm's
 * rate over OpenBLAS threading's: above 1, moerun's split is faster).
 *   gemm_split_bench [--rounds R] [--quick]          (bench/gemm_split.sh) */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/blas_check.h"
#include "core/gemm.h"
#include "core/moe.h"
#include "core/par.h"

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int rounds = 5, quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: gemm_split_bench [--rounds R] [--quick]\n");
            return 2;
        }
    }
    if (quick) rounds = 1;
    if (rounds < 1 || rounds > 64) {
        fprintf(stderr, "gemm_split_bench: --rounds must be in [1, 64]\n");
        return 2;
    }
    const int threads = openblas_get_num_threads();
    if (threads < 2) {
        fprintf(stderr, "gemm_split_bench: OpenBLAS runs 1 thread here; set OPENBLAS_NUM_THREADS to the cores\n");
        return 2;
    }
    int n;
    const moe_blas_shape *s = moe_blas_shapes(&n);
    printf("GEMM groups of moerun's shapes, kernels %s, %d threads: GFLOP/s of cblas_sgemm at 1 thread, "
           "cblas_sgemm with OpenBLAS threading, and moe_gemm (moerun's split), median of %d rounds\n",
           openblas_get_corename(), threads, rounds);
    printf("%-26s %10s %10s %10s %8s\n", "shape", "1 thread", "OpenBLAS", "moe_gemm", "ratio");
    const moe_blas_sgemm_fn fn[3] = {moe_blas_sgemm_openblas, moe_blas_sgemm_openblas, moe_gemm};
    const int nt[3] = {1, threads, threads};
    double g[3][64];
    for (int i = 0; i < n; i++) {
        if (!s[i].threads_all || (quick && !s[i].quick)) continue;
        for (int r = 0; r < rounds; r++)
            for (int k = 0; k < 3; k++) {
                const int side = (r + k) % 3;
                if (moe_blas_time_shape(&g[side][r], &s[i], fn[side], nt[side], quick ? 0.002 : 0.02, 1)) {
                    fprintf(stderr, "gemm_split_bench: %s: %s\n", s[i].name, moe_error_detail());
                    return 1;
                }
            }
        double med[3];
        for (int k = 0; k < 3; k++) {
            qsort(g[k], (size_t)rounds, sizeof(double), cmp_double);
            med[k] = g[k][rounds / 2];
        }
        printf("%-26s %10.1f %10.1f %10.1f %7.2fx\n", s[i].name, med[0], med[1], med[2], med[2] / med[1]);
        printf("PERF gemm_split.%s %.2f x moe_gemm rate over OpenBLAS threading's, %d threads (%s)\n", s[i].name,
               med[2] / med[1], threads, s[i].what);
    }
    return 0;
}
