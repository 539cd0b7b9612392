/* Fork-join regions (par.h): one pthread per extra thread and region. A
 * region costs a few tens of microseconds to start, against passes of
 * 0.1-1 ms, so no persistent pool (and no idle spinning threads that would
 * compete with OpenBLAS's own). */
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

void moe_par_run(int nt, void (*fn)(void *ctx, int t, int nt), void *ctx)
{
    nt = nt < 1 ? 1 : nt > MOE_PAR_MAX_THREADS ? MOE_PAR_MAX_THREADS : nt;
    if (nt == 1) {
        fn(ctx, 0, 1);
        return;
    }
    const int blas = openblas_get_num_threads();
    openblas_set_num_threads(1);
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
    openblas_set_num_threads(blas);
}
