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

typedef struct {
    const moe_tok_parts_ops *ops;
    moe_tok_encoder *e;
    int part;
    size_t start, stop, end;
    moe_status st;
    double cpu;
} job;

static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *run_job(void *arg)
{
    job *j = arg;
    const double c0 = thread_cpu();
    j->st = j->ops->run(j->ops->ctx, j->part, j->e, j->start, j->stop, &j->end);
    j->cpu = thread_cpu() - c0;
    return NULL;
}

/* Runs the jobs, one thread each (the first on the caller). */
static void run_jobs(job *jobs, int nj)
{
    pthread_t *th = malloc(sizeof(pthread_t) * (size_t)(nj ? nj : 1));
    int *started = calloc((size_t)(nj ? nj : 1), sizeof(int));
    for (int i = 1; i < nj && th && started; i++) started[i] = pthread_create(&th[i], NULL, run_job, &jobs[i]) == 0;
    if (nj) run_job(&jobs[0]);
    for (int i = 1; i < nj; i++) {
        if (th && started && started[i]) pthread_join(th[i], NULL);
        else run_job(&jobs[i]); /* no thread: run it here */
    }
    free(th);
    free(started);
}

moe_status moe_tok_parts_run(const moe_tok *t, const uint8_t *delim, size_t delim_len, int64_t sep,
                             const uint8_t *text, size_t n, int n_parts, int p0, int p1, const moe_tok_parts_ops *ops,
                             size_t *splits, int *n_bad, double *cpu)
{
    if (n_bad) *n_bad = 0;
    for (int i = 0; cpu && i < p1 - p0; i++) cpu[i] = 0;
    if (n_parts < 1 || p0 < 0 || p1 > n_parts || p0 > p1 || (!ops->exchange && (p0 != 0 || p1 != n_parts)))
        return moe_errorf(MOE_ERR_ARG, "parts [%d, %d) of %d", p0, p1, n_parts);
    const int nl = p1 - p0;
    moe_tok_encoder **enc = calloc((size_t)(nl ? nl : 1), sizeof *enc);
    job *jobs = calloc((size_t)(nl ? nl : 1), sizeof *jobs);
    size_t *ends = calloc((size_t)n_parts, sizeof *ends);
    size_t *from = calloc((size_t)n_parts, sizeof *from); /* where a part's next run starts */
    moe_status st = enc && jobs && ends && from ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "parts");
    for (int i = 0; i < nl && !st; i++) {
        st = moe_tok_encoder_create(&enc[i], t);
        if (!st && delim_len) st = moe_tok_encoder_set_delim(enc[i], delim, delim_len, sep);
    }
    moe_tok_encoder *planner = NULL;
    if (!st && nl == 0) {
        st = moe_tok_encoder_create(&planner, t);
        if (!st && delim_len) st = moe_tok_encoder_set_delim(planner, delim, delim_len, sep);
    }
    /* every process plans all splits alike (a pure function of the text) */
    if (!st) moe_tok_parts_plan(nl ? enc[0] : planner, text, n, n_parts, splits);
    for (int k = 0; k < n_parts && splits; k++) from[k] = splits[k];
    int bad = 0;
    /* pending: this process's parts that still have to run from from[k] */
    uint8_t *pending = calloc((size_t)n_parts, 1);
    if (!pending && !st) st = moe_errorf(MOE_ERR_NOMEM, "parts");
    for (int k = p0; k < p1 && !st; k++) pending[k] = 1;
    for (int round = 0;; round++) {
        int nj = 0;
        for (int k = p0; k < p1 && !st; k++)
            if (pending[k]) jobs[nj++] = (job){ops, enc[k - p0], k, from[k], splits[k + 1], 0, MOE_OK, 0};
        if (!st) run_jobs(jobs, nj);
        for (int i = 0; i < nj; i++) {
            if (!st) st = jobs[i].st;
            ends[jobs[i].part] = jobs[i].end;
            pending[jobs[i].part] = 0;
            if (cpu) cpu[jobs[i].part - p0] += jobs[i].cpu;
        }
        /* parts not run this round keep their ends */
        if (ops->exchange) st = ops->exchange(ops->xctx, ends, n_parts, p0, p1, st);
        if (st) break;
        /* repair, left to right, identically on every process */
        int more = 0;
        for (int k = 0; k < n_parts; k++) {
            if (ends[k] == splits[k + 1]) continue;
            bad++;
            int j = k + 1;
            while (j < n_parts && splits[j] < ends[k]) j++;
            /* parts k+1 .. j-1 become empty at splits[j] */
            for (int i = k + 1; i < j; i++) {
                splits[i] = splits[j];
                from[i] = ends[i] = splits[j];
                if (i >= p0 && i < p1) ops->reset(ops->ctx, i);
            }
            if (ends[k] < splits[j]) { /* go on to the next split */
                from[k] = ends[k];
                if (k >= p0 && k < p1) pending[k] = 1;
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
    for (int i = 0; i < nl && enc; i++) moe_tok_encoder_destroy(enc[i]);
    moe_tok_encoder_destroy(planner);
    free(enc);
    free(jobs);
    free(ends);
    free(from);
    free(pending);
    return st;
}
