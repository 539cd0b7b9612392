/* Parts of a text scanned independently with verified split positions
 * (tok_parts.h): planning, the thread fan-out and the repair loop. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/tok_parts.h"

void moe_tok_parts_plan(moe_tok_encoder *e, const uint8_t *text, size_t n, int n_parts, size_t *splits)
{
    splits[0] = 0;
    for (int k = 1; k < n_parts; k++) {
        size_t target = (size_t)((unsigned __int128)n * (unsigned)k / (unsigned)n_parts);
        if (target < splits[k - 1]) target = splits[k - 1];
        splits[k] = target > 0 && target < n ? moe_tok_split_candidate(e, text, n, target) : target;
        if (splits[k] < splits[k - 1]) splits[k] = splits[k - 1];
    }
    splits[n_parts] = n;
}

int moe_tok_parts_count(size_t n, int n_procs, int threads)
{
    const size_t per = (size_t)n_procs * (size_t)threads;
    size_t k = n / (per * ((size_t)256 << 10));
    if (k < 1) k = 1;
    if (k > 16) k = 16;
    return (int)(per * k);
}

typedef struct {
    int part;
    size_t start, stop, end;
    moe_status st;
    double cpu;
} job;

typedef struct {
    const moe_tok_parts_ops *ops;
    job *jobs;
    int nj;
    int next; /* the queue: jobs taken in order */
    pthread_mutex_t lock;
} queue;

typedef struct {
    queue *q;
    moe_tok_encoder *e;
} worker;

static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *work(void *arg)
{
    worker *w = arg;
    queue *q = w->q;
    for (;;) {
        pthread_mutex_lock(&q->lock);
        const int i = q->next < q->nj ? q->next++ : -1;
        pthread_mutex_unlock(&q->lock);
        if (i < 0) break;
        job *j = &q->jobs[i];
        const double c0 = thread_cpu();
        j->st = q->ops->run(q->ops->ctx, j->part, w->e, j->start, j->stop, &j->end);
        j->cpu = thread_cpu() - c0;
    }
    return NULL;
}

/* Runs the queue on nw workers (the first on the caller). */
static void run_queue(worker *w, int nw)
{
    pthread_t th[256];
    int started[256] = {0};
    for (int i = 1; i < nw; i++) started[i] = pthread_create(&th[i], NULL, work, &w[i]) == 0;
    work(&w[0]);
    for (int i = 1; i < nw; i++)
        if (started[i]) pthread_join(th[i], NULL);
    /* a thread that could not start left its share in the queue: the caller took it */
}

moe_status moe_tok_parts_run(const moe_tok *t, const uint8_t *delim, size_t delim_len, int64_t sep,
                             const uint8_t *text, size_t n, int n_parts, int proc, int n_procs, int threads,
                             const moe_tok_parts_ops *ops, size_t *splits, int *n_bad, double *cpu)
{
    if (n_bad) *n_bad = 0;
    if (n_parts < 1 || n_procs < 1 || n_parts % n_procs || proc < 0 || proc >= n_procs || threads < 1 ||
        threads > 256 || (!ops->exchange && n_procs != 1))
        return moe_errorf(MOE_ERR_ARG, "%d parts over %d processes x %d threads", n_parts, n_procs, threads);
    const int nl = n_parts / n_procs;
    for (int i = 0; cpu && i < nl; i++) cpu[i] = 0;
    worker *w = calloc((size_t)threads, sizeof *w);
    job *jobs = calloc((size_t)nl, sizeof *jobs);
    size_t *ends = calloc((size_t)n_parts, sizeof *ends), *packed = calloc((size_t)n_parts, sizeof *packed);
    size_t *mine = calloc((size_t)nl, sizeof *mine);
    size_t *from = calloc((size_t)n_parts, sizeof *from); /* where a part's next run starts */
    uint8_t *pending = calloc((size_t)n_parts, 1);        /* this process's parts still to run */
    queue q = {ops, jobs, 0, 0, PTHREAD_MUTEX_INITIALIZER};
    moe_status st = w && jobs && ends && packed && mine && from && pending ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "parts");
    for (int i = 0; i < threads && !st; i++) {
        w[i].q = &q;
        st = moe_tok_encoder_create(&w[i].e, t);
        if (!st && delim_len) st = moe_tok_encoder_set_delim(w[i].e, delim, delim_len, sep);
    }
    /* every process plans all splits alike (a pure function of the text) */
    if (!st) moe_tok_parts_plan(w[0].e, text, n, n_parts, splits);
    for (int k = 0; !st && k < n_parts; k++) {
        from[k] = splits[k];
        pending[k] = k % n_procs == proc;
    }
    int bad = 0;
    for (int round = 0;; round++) {
        q.nj = q.next = 0;
        for (int k = 0; k < n_parts && !st; k++)
            if (pending[k]) jobs[q.nj++] = (job){k, from[k], splits[k + 1], 0, MOE_OK, 0};
        if (!st) run_queue(w, threads < q.nj ? threads : (q.nj ? q.nj : 1));
        for (int i = 0; i < q.nj; i++) {
            if (!st) st = jobs[i].st;
            ends[jobs[i].part] = jobs[i].end;
            pending[jobs[i].part] = 0;
            if (cpu) cpu[jobs[i].part / n_procs] += jobs[i].cpu;
        }
        /* parts not run this round keep their ends */
        if (ops->exchange) {
            for (int i = 0; i < nl && ends; i++) mine[i] = ends[i * n_procs + proc];
            st = ops->exchange(ops->xctx, mine, packed, nl, st);
            for (int r = 0; !st && r < n_procs; r++)
                for (int i = 0; i < nl; i++) ends[i * n_procs + r] = packed[r * nl + i];
        }
        if (st) break;
        /* repair, left to right, identically on every process */
        int more = 0;
        for (int k = 0; k < n_parts; k++) {
            if (ends[k] == splits[k + 1]) continue;
            int j = k + 1;
            while (j < n_parts && splits[j] < ends[k]) j++;
            bad += j - k - 1;
            /* parts k+1 .. j-1 become empty at splits[j] */
            for (int i = k + 1; i < j; i++) {
                splits[i] = splits[j];
                from[i] = ends[i] = splits[j];
                if (i % n_procs == proc) ops->reset(ops->ctx, i);
            }
            if (ends[k] < splits[j]) { /* go on to the next split */
                from[k] = ends[k];
                if (k % n_procs == proc) pending[k] = 1;
                more = 1;
            }
        }
        if (!more) break;
        if (round > n_parts + 2) {
            st = moe_errorf(MOE_ERR_ARG, "split repair does not converge (%d rounds)", round);
            break;
        }
    }
    if (n_bad) *n_bad = bad;
    for (int i = 0; w && i < threads; i++) moe_tok_encoder_destroy(w[i].e);
    pthread_mutex_destroy(&q.lock);
    free(w);
    free(jobs);
    free(ends);
    free(packed);
    free(mine);
    free(from);
    free(pending);
    return st;
}
