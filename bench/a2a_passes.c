/* The exchange's token passes at 1 and 2 threads (bench/a2a_passes.sh).
 * One rank, identity "experts", so a trip is only its passes at home:
 * pack (forward), combine (forward), gate gradient (backward) and the dx
 * accumulation (moe_a2a_backward_add). Thread counts alternate every
 * iteration and each pass reports its fastest iteration, which another
 * process on the cores can only slow down; the results at both thread
 * counts are also compared bit for bit. Prints a table and
 * `PERF a2a_passes.speedup_2t <ratio> x`. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"

enum { N_PASS = 4 };

static moe_status identity(void *ctx, int j0, int j1, const float *in, float *out)
{
    (void)ctx, (void)j0, (void)j1, (void)in, (void)out; /* in place: the results are the rows */
    return MOE_OK;
}

/* Token t goes to two distinct experts (ascending) with weights 0.6 and 0.4. */
static void make_routing(int *tok_off, int *dest, float *weight, int T, int E)
{
    for (int t = 0; t < T; t++) {
        const int a = rand() % E, b = (a + 1 + rand() % (E - 1)) % E;
        tok_off[t] = 2 * t;
        dest[2 * t] = a < b ? a : b;
        dest[2 * t + 1] = a < b ? b : a;
        weight[2 * t] = 0.6f;
        weight[2 * t + 1] = 0.4f;
    }
    tok_off[T] = 2 * T;
}

int main(int argc, char **argv)
{
    int T = 4096, d = 256, E = 8, iters = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) T = 512, d = 64, iters = 3;
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--d-model") && i + 1 < argc) d = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: a2a_passes_bench [--quick] [--iters N] [--tokens T] [--d-model D]\n");
            return 2;
        }
    }
    if (T < 1 || d < 1 || iters < 1) return 2;
    moe_comm *c = NULL;
    moe_a2a *a = NULL;
    const size_t td = (size_t)T * d;
    int *tok_off = malloc(sizeof(int) * ((size_t)T + 1)), *dest = malloc(sizeof(int) * 2 * (size_t)T);
    float *weight = malloc(sizeof(float) * 2 * (size_t)T), *x = malloc(sizeof(float) * td);
    float *y[2] = {malloc(sizeof(float) * td), malloc(sizeof(float) * td)};
    float *dx[2] = {calloc(td, sizeof(float)), calloc(td, sizeof(float))};
    float *dw[2] = {malloc(sizeof(float) * 2 * (size_t)T), malloc(sizeof(float) * 2 * (size_t)T)};
    if (!tok_off || !dest || !weight || !x || !y[0] || !y[1] || !dx[0] || !dx[1] || !dw[0] || !dw[1]) return 1;
    srand(1);
    make_routing(tok_off, dest, weight, T, E);
    for (size_t i = 0; i < td; i++) x[i] = (float)(rand() % 2001 - 1000) / 512.0f;
    const moe_a2a_routing r = {T, tok_off, dest, weight};
    moe_status st = moe_comm_create_self(&c); /* one rank, no MPI */
    if (!st) st = moe_a2a_create(&a, c, E, MOE_A2A_P2P, 1);
    if (!st) st = moe_a2a_plan(a, &r, MOE_OK, d);
    double best[2][N_PASS];
    for (int k = 0; k < 2 * N_PASS; k++) best[k / N_PASS][k % N_PASS] = 1e30;
    const int saved = openblas_get_num_threads();
    for (int it = 0; it < iters && !st; it++)
        for (int k = 0; k < 2 && !st; k++) {
            const int nt = it % 2 ? 2 - k : 1 + k; /* 1, 2 then 2, 1 */
            openblas_set_num_threads(nt);
            st = moe_a2a_forward(a, y[nt - 1], x, d, identity, NULL, MOE_OK);
            const moe_a2a_times f = moe_a2a_last_times(a);
            if (!st) st = moe_a2a_backward(a, dw[nt - 1], x, d, identity, NULL, MOE_OK);
            const moe_a2a_times b = moe_a2a_last_times(a);
            const double t0 = moe_now();
            if (!st) moe_a2a_backward_add(a, dx[nt - 1], d); /* both accumulate iters times alike */
            const double v[N_PASS] = {f.pack, f.combine, b.pack, moe_now() - t0};
            for (int q = 0; q < N_PASS; q++)
                if (v[q] < best[nt - 1][q]) best[nt - 1][q] = v[q];
        }
    openblas_set_num_threads(saved);
    if (st) {
        fprintf(stderr, "a2a_passes_bench: %s\n", moe_error_detail());
        return 1;
    }
    const int same = !memcmp(y[0], y[1], sizeof(float) * td) && !memcmp(dx[0], dx[1], sizeof(float) * td) &&
                     !memcmp(dw[0], dw[1], sizeof(float) * 2 * (size_t)T);
    const char *name[N_PASS] = {"pack", "combine", "gate_grad", "dx_add"};
    printf("exchange passes, 1 rank: T=%d d=%d E=%d top-2; fastest of %d iterations per thread count (ms)\n", T, d, E,
           iters);
    printf("%-10s %10s %10s %8s\n", "pass", "1 thread", "2 threads", "ratio");
    double s1 = 0, s2 = 0;
    for (int q = 0; q < N_PASS; q++) {
        printf("%-10s %10.3f %10.3f %8.2f\n", name[q], 1e3 * best[0][q], 1e3 * best[1][q], best[0][q] / best[1][q]);
        s1 += best[0][q];
        s2 += best[1][q];
    }
    printf("%-10s %10.3f %10.3f %8.2f\n", "all", 1e3 * s1, 1e3 * s2, s1 / s2);
    printf("results at 1 and 2 threads: %s\n", same ? "bitwise equal" : "DIFFER");
    printf("PERF a2a_passes.speedup_2t %.2f x exchange token passes, 2 threads vs 1, 1 rank, T=%d d=%d\n", s1 / s2, T, d);
    moe_a2a_destroy(a);
    moe_comm_destroy(c);
    for (int i = 0; i < 2; i++) free(y[i]), free(dx[i]), free(dw[i]);
    free(tok_off), free(dest), free(weight), free(x);
    return same ? 0 : 1;
}
