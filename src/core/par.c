/* Fork-join regions (par.h) on a persistent pool of workers.
 * Starting a pthread per region cost 20-110 us here; a training step of the
 * small model opens about 70 elementwise regions and, since moerun splits
 * its GEMMs over this pool (moe_gemm, core/gemm.h), about 40 more. Between
 * regions a worker spins for up to MOE_PAR_SPIN_NS before it sleeps on a
 * condition variable, and the caller spins as long for the last worker of
 * a region: a region that follows within that time costs a cache-line
 * handoff (well under a microsecond) instead of a futex wake-up and a
 * context switch (several microseconds each, and 660 of them a step with
 * OpenBLAS threading the GEMMs). The spin is bounded so that a pool left
 * idle (I/O, an exchange, the end of a run) sleeps and takes no core.
 * The pool serves one region at a time: a region opened while another runs
 * (from another thread) starts threads of its own, as does one whose
 * workers cannot be started. */
#include "core/par.h"

#include <cblas.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "core/moe.h"

typedef struct {
    void (*fn)(void *ctx, int t, int nt);
    void *ctx;
    int t, nt;
} par_job;

static void *par_thread(void *arg)
{
    par_job *j = arg;
    j->fn(j->ctx, j->t, j->nt);
    return NULL;
}

/* The pool: workers 1..started-1; worker t runs share t of each region.
 * A region is published by one release store of `word` (its generation and
 * nt); fn and ctx are written before it and read after it, and only by the
 * workers the region needs, which the caller waits for before it publishes
 * the next one. */
static struct {
    pthread_mutex_t lock;    /* guards sleepers, waiting and the sleeping side of word */
    pthread_cond_t work;     /* word changed (for sleeping workers) */
    pthread_cond_t done;     /* pending reached 0 (for a sleeping caller) */
    pthread_mutex_t busy;    /* held by the thread whose region the pool runs */
    pthread_once_t once;
    int started;             /* threads running (worker 0 is the caller); the busy holder's */
    _Atomic uint64_t word;   /* generation << 8 | nt of the current region */
    void (*fn)(void *ctx, int t, int nt);
    void *ctx;
    atomic_int pending;      /* workers of the current region not yet finished */
    int sleepers;            /* workers asleep on `work` */
    int waiting;             /* the caller is asleep on `done` */
    uint64_t born[MOE_PAR_MAX_THREADS]; /* word when worker t was started */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_MUTEX_INITIALIZER, PTHREAD_ONCE_INIT, 1, 0, NULL, NULL, 0, 0, 0, {0}};

/* Whether a spin that started at t0 (moe_now) has run its course; checked
 * every 64th turn, so the clock is read about once a microsecond. */
static int spin_over(int i, double t0) { return i % 64 == 0 && (moe_now() - t0) * 1e9 > MOE_PAR_SPIN_NS; }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spins up to MOE_PAR_SPIN_NS (if `spin`) for the region after `seen`, then
 * sleeps. */
static uint64_t wait_region(uint64_t seen, int spin)
{
    uint64_t w;
    const double t0 = moe_now();
    for (int i = 1; spin && !spin_over(i, t0); i++) {
        if ((w = atomic_load_explicit(&pool.word, memory_order_acquire)) != seen) return w;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.lock);
    pool.sleepers++;
    while ((w = atomic_load_explicit(&pool.word, memory_order_acquire)) == seen)
        pthread_cond_wait(&pool.work, &pool.lock);
    pool.sleepers--;
    pthread_mutex_unlock(&pool.lock);
    return w;
}

static void *pool_worker(void *arg)
{
    const int t = (int)(long)arg;
    uint64_t seen = pool.born[t]; /* the word when it was started: every later region is new to it */
    int needed = 0;
    for (;;) {
        /* a worker the last region did not need sleeps at once: regions
         * of fewer threads keep the others off the cores */
        seen = wait_region(seen, needed);
        const int nt = (int)(seen & 0xff);
        needed = t < nt;
        if (!needed) continue;
        pool.fn(pool.ctx, t, nt);
        if (atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool.lock);
            if (pool.waiting) pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

/* A forked child has no workers (and may have copied a held lock): its
 * first region starts new ones. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 1;
    pool.sleepers = pool.waiting = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Starts workers until the pool has nt threads (the caller counts as one).
 * A worker that cannot be started leaves the pool smaller: regions that
 * need more threads start their own. Called with pool.busy held. */
static void pool_grow(int nt)
{
    pthread_once(&pool.once, pool_init);
    if (pool.started >= nt) return;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int t = pool.started; t < nt; t++) {
        pthread_t tid;
        pool.born[t] = atomic_load_explicit(&pool.word, memory_order_relaxed);
        if (pthread_create(&tid, &attr, pool_worker, (void *)(long)t) != 0) break;
        pool.started = t + 1;
    }
    pthread_attr_destroy(&attr);
}

int moe_par_threads(void)
{
    const int nt = openblas_get_num_threads();
    return nt < 1 ? 1 : nt > MOE_PAR_MAX_THREADS ? MOE_PAR_MAX_THREADS : nt;
}

int moe_par_threads_for(long work, long min_per_thread)
{
    int nt = moe_par_threads();
    if (min_per_thread < 1) min_per_thread = 1;
    while (nt > 1 && work / nt < min_per_thread) nt--;
    return nt;
}

/* A region on threads of its own (the pool is busy or too small). */
static void run_spawned(int nt, void (*fn)(void *ctx, int t, int nt), void *ctx)
{
    par_job jobs[MOE_PAR_MAX_THREADS];
    pthread_t tid[MOE_PAR_MAX_THREADS];
    int started[MOE_PAR_MAX_THREADS] = {0};
    for (int t = 0; t < nt; t++) jobs[t] = (par_job){fn, ctx, t, nt};
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&tid[t], NULL, par_thread, &jobs[t]) == 0;
    fn(ctx, 0, nt);
    for (int t = 1; t < nt; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn(ctx, t, nt);
    }
}

void moe_par_run(int nt, void (*fn)(void *ctx, int t, int nt), void *ctx)
{
    nt = nt < 1 ? 1 : nt > MOE_PAR_MAX_THREADS ? MOE_PAR_MAX_THREADS : nt;
    if (nt == 1) {
        fn(ctx, 0, 1);
        return;
    }
    const int blas = openblas_get_num_threads();
    openblas_set_num_threads(1);
    if (pthread_mutex_trylock(&pool.busy) != 0) {
        run_spawned(nt, fn, ctx);
    } else {
        pool_grow(nt);
        const int have = pool.started;
        if (have >= nt) {
            pool.fn = fn;
            pool.ctx = ctx;
            atomic_store_explicit(&pool.pending, nt - 1, memory_order_relaxed);
            const uint64_t gen = (atomic_load_explicit(&pool.word, memory_order_relaxed) >> 8) + 1;
            pthread_mutex_lock(&pool.lock);
            atomic_store_explicit(&pool.word, gen << 8 | (uint64_t)nt, memory_order_release);
            if (pool.sleepers > 0) pthread_cond_broadcast(&pool.work);
            pthread_mutex_unlock(&pool.lock);
            fn(ctx, 0, nt);
            const double t0 = moe_now();
            for (int i = 1; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0 && !spin_over(i, t0); i++)
                cpu_relax();
            if (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) {
                pthread_mutex_lock(&pool.lock);
                pool.waiting = 1;
                while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0)
                    pthread_cond_wait(&pool.done, &pool.lock);
                pool.waiting = 0;
                pthread_mutex_unlock(&pool.lock);
            }
        } else {
            run_spawned(nt, fn, ctx);
        }
        pthread_mutex_unlock(&pool.busy);
    }
    openblas_set_num_threads(blas);
}
