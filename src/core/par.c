/* Fork-join regions (par.h) on a persistent pool of sleeping workers.
 * Starting a pthread per region cost 20-110 us here (a training step of the
 * small model opens about 70 regions at 2 threads); waking a worker that
 * sleeps on a condition variable costs a few microseconds, and a sleeping
 * worker takes no core from OpenBLAS's threads (no spinning). The pool
 * serves one region at a time: a region opened while another runs (from
 * another thread) starts threads of its own, as does one whose workers
 * cannot be started. */
#include "core/par.h"

#include <cblas.h>
#include <pthread.h>

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

/* The pool: workers 1..started-1; worker t runs share t of each region. */
static struct {
    pthread_mutex_t lock;    /* guards everything below */
    pthread_cond_t work;     /* a new region (generation changed) */
    pthread_cond_t done;     /* the last worker of a region finished */
    pthread_mutex_t busy;    /* held by the thread whose region the pool runs */
    pthread_once_t once;
    int started;             /* threads running (worker 0 is the caller) */
    unsigned long generation;
    par_job job;             /* the current region (t unused) */
    int pending;             /* workers of the current region not yet finished */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_MUTEX_INITIALIZER, PTHREAD_ONCE_INIT, 1, 0, {0}, 0};

static void *pool_worker(void *arg)
{
    const int t = (int)(long)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.work, &pool.lock);
        seen = pool.generation;
        const par_job j = pool.job;
        if (t >= j.nt) continue; /* not needed in this region */
        pthread_mutex_unlock(&pool.lock);
        j.fn(j.ctx, t, j.nt);
        pthread_mutex_lock(&pool.lock);
        if (--pool.pending == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* A forked child has no workers (and may have copied a held lock): its
 * regions start threads of their own. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 1;
}

/* Starts the workers once; a worker that cannot be started leaves the pool
 * smaller (regions that need more threads start their own). */
static void pool_start(void)
{
    pthread_atfork(NULL, NULL, pool_after_fork);
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int t = 1; t < MOE_PAR_MAX_THREADS; t++) {
        pthread_t tid;
        if (pthread_create(&tid, &attr, pool_worker, (void *)(long)t) != 0) break;
        pthread_mutex_lock(&pool.lock);
        pool.started = t + 1;
        pthread_mutex_unlock(&pool.lock);
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
    pthread_once(&pool.once, pool_start);
    if (pthread_mutex_trylock(&pool.busy) != 0) {
        run_spawned(nt, fn, ctx);
    } else {
        pthread_mutex_lock(&pool.lock);
        const int have = pool.started;
        if (have >= nt) {
            pool.job = (par_job){fn, ctx, 0, nt};
            pool.pending = nt - 1;
            pool.generation++;
            pthread_cond_broadcast(&pool.work);
        }
        pthread_mutex_unlock(&pool.lock);
        if (have >= nt) {
            fn(ctx, 0, nt);
            pthread_mutex_lock(&pool.lock);
            while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        } else {
            run_spawned(nt, fn, ctx);
        }
        pthread_mutex_unlock(&pool.busy);
    }
    openblas_set_num_threads(blas);
}
