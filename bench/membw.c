/* Single-thread read bandwidth over a buffer of N bytes read again and
 * again, as a decoding step streams its weights: the rate that bounds
 * generation when it is bound by memory (bench/decode.sh). A buffer that
 * fits a cache level measures that level. Sums the floats in 8 AVX-512
 * (or, without it, scalar) accumulators so the loads are the only work.
 *   membw_bench --bytes N [--seconds S]    prints "membw <bytes> <GB/s>" */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/moe.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
__attribute__((target("avx512f"))) static float sum_avx512(const float *p, size_t n)
{
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 128 <= n; i += 128)
        for (int j = 0; j < 8; j++) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(p + i + 16 * j));
    float s = 0;
    for (; i < n; i++) s += p[i];
    for (int j = 1; j < 8; j++) a[0] = _mm512_add_ps(a[0], a[j]);
    return s + _mm512_reduce_add_ps(a[0]);
}
#endif

static float sum_plain(const float *p, size_t n)
{
    float a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) a[j] += p[i + j];
    for (; i < n; i++) a[0] += p[i];
    float s = 0;
    for (int j = 0; j < 8; j++) s += a[j];
    return s;
}

int main(int argc, char **argv)
{
    double bytes = 0, seconds = 0.5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bytes") && i + 1 < argc) bytes = atof(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: membw_bench --bytes N [--seconds S]\n");
            return 2;
        }
    }
    if (!(bytes >= 4096 && bytes <= 64e9) || !(seconds > 0 && seconds <= 60)) {
        fprintf(stderr, "membw_bench: --bytes must be in [4096, 64e9] and --seconds in (0, 60]\n");
        return 2;
    }
    const size_t n = (size_t)(bytes / sizeof(float));
    float *p = malloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "membw_bench: cannot allocate %.0f bytes\n", bytes);
        return 1;
    }
    for (size_t i = 0; i < n; i++) p[i] = (float)(i & 1023) * 1e-3f;
    int wide = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    wide = __builtin_cpu_supports("avx512f");
#endif
    volatile float sink = 0;
    long reps = 0;
    const double t0 = moe_now();
    double t = t0;
    /* the first pass warms the caches (and pages); timed from the second */
    double tw = 0;
    for (;;) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        sink += wide ? sum_avx512(p, n) : sum_plain(p, n);
#else
        sink += sum_plain(p, n);
#endif
        t = moe_now();
        if (tw == 0) {
            tw = t;
            continue;
        }
        reps++;
        if (t - tw >= seconds) break;
    }
    (void)sink;
    printf("membw %.0f %.2f\n", (double)n * sizeof(float), (double)reps * n * sizeof(float) / (t - tw) / 1e9);
    free(p);
    return 0;
}
