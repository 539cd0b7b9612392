/* Fork-join parallel regions: the elementwise passes, and the GEMMs split
 * over the same threads (moe_gemm, core/gemm.h). Without regions, layernorm,
 * softmax, the attention blocks and AdamW would run on one core while the
 * others idle.
 * A region uses as many threads as OpenBLAS does (capped), so a rank
 * started with OPENBLAS_NUM_THREADS=1 stays single-threaded. Callers split
 * work so that results do not depend on the thread count (fixed chunks or
 * disjoint outputs), except where a function's comment says otherwise. */
#ifndef MOE_CORE_PAR_H
#define MOE_CORE_PAR_H

enum { MOE_PAR_MAX_THREADS = 8 };

/* How long an idle pool worker, or a caller waiting for its workers, spins
 * before it sleeps (par.c). Long enough to bridge the serial work between
 * the regions of a training step, short enough that an idle pool sleeps. */
#define MOE_PAR_SPIN_NS 100000L

/* Threads a region would use now: min(openblas_get_num_threads(), MOE_PAR_MAX_THREADS), >= 1. */
int moe_par_threads(void);

/* Threads for `work` units of which each thread should get at least
 * `min_per_thread`: between 1 and moe_par_threads(). */
int moe_par_threads_for(long work, long min_per_thread);

/* Runs fn(ctx, t, nt) for t = 0..nt-1, thread 0 on the caller, and returns
 * when all are done. nt is clamped to [1, MOE_PAR_MAX_THREADS]. If a thread
 * cannot be started its share runs on the caller afterwards, so a region
 * never fails. While it runs, OpenBLAS is set to one thread (GEMMs called
 * inside run on the calling thread) and restored after. Not reentrant:
 * fn must not open another region. */
void moe_par_run(int nt, void (*fn)(void *ctx, int t, int nt), void *ctx);

/* [*i0, *i1): thread t's contiguous share of n items split over nt threads. */
static inline void moe_par_range(long n, int t, int nt, long *i0, long *i1)
{
    *i0 = n * t / nt;
    *i1 = n * (t + 1) / nt;
}

/* The same over n items in blocks of `align` (the last block may be short):
 * shares of float arrays with align = 16 never split a 64-byte cache line
 * between two threads. An empty share has *i0 >= *i1. */
static inline void moe_par_range_aligned(long n, long align, int t, int nt, long *i0, long *i1)
{
    moe_par_range((n + align - 1) / align, t, nt, i0, i1);
    *i0 *= align;
    *i1 = *i1 * align < n ? *i1 * align : n;
}

#endif
