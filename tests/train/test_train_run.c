/* The training run (src/train/run.h) driven from C, on the ranks of
 * mpiexec: 6 steps uninterrupted; then the same run stopped after step 3 by
 * the preemption hook (checkpoint written, every rank stops) and resumed
 * from its run directory to step 6. The resumed run's losses and final
 * parameters and AdamW moments are bitwise those of the uninterrupted run
 * (same rank count: bitwise by construction, batches and noise are pure
 * functions of (seed, step)); metrics.jsonl has one line per step and
 * `latest` names the last checkpoint; whenever `latest` moves, the step's
 * metrics line is already written. Bad input (a missing data file) fails
 * on every rank with the file named. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm.h"
#include "data/data.h"
#include "train/run.h"

#include "check_mpi.h"
#include "testlib.h"

enum { STEPS = 6, STOP_AT = 3 };

static int fails, rank, world;

typedef struct {
    double loss[STEPS + 1]; /* by step */
    int steps_seen, checkpoints, resumed_at;
    int stop_after;         /* request says stop once this many steps are done (0: never) */
    int64_t done;
} record;

static moe_status on_step(void *ctx, const moe_train_progress *p)
{
    record *r = ctx;
    if (p->step >= 1 && p->step <= STEPS) r->loss[p->step] = p->stats->model.loss;
    r->steps_seen++;
    r->done = p->step;
    return MOE_OK;
}

/* The last line of path, or "" */
static void last_line(const char *path, char *buf, size_t cap)
{
    buf[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[8192];
    while (fgets(line, sizeof line, f)) snprintf(buf, cap, "%s", line);
    fclose(f);
}

/* Called once `latest` names the new checkpoint. By then the step's
 * metrics line must be in metrics.jsonl: a kill at this moment resumes
 * after the step and never writes its line again. */
static moe_status on_checkpoint(void *ctx, int64_t step, const char *path, double s, double interval)
{
    (void)s, (void)interval;
    record *r = ctx;
    r->checkpoints++;
    if (rank == 0) {
        char dir[1024], file[1100], line[8192], want[64];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        CHECK(slash != NULL);
        if (!slash) return MOE_OK;
        *slash = '\0';
        snprintf(file, sizeof file, "%s/latest", dir);
        last_line(file, line, sizeof line);
        CHECK(strstr(line, slash + 1) != NULL);
        snprintf(file, sizeof file, "%s/metrics.jsonl", dir);
        last_line(file, line, sizeof line);
        snprintf(want, sizeof want, "{\"step\":%lld,", (long long)step);
        CHECK(strncmp(line, want, strlen(want)) == 0);
    }
    return MOE_OK;
}

static moe_status on_resume(void *ctx, const char *path, int64_t step, double seconds)
{
    (void)path, (void)seconds;
    ((record *)ctx)->resumed_at = (int)step;
    return MOE_OK;
}

/* Asked on every rank; only the last rank says stop: all must stop. */
static int request(void *ctx, int64_t step)
{
    record *r = ctx;
    return r->stop_after > 0 && step >= r->stop_after && rank == world - 1 ? MOE_TRAIN_STOP : MOE_TRAIN_GO_ON;
}

static void config(moe_train_config *c, const char *out_dir)
{
    tl_config_small(c, 2, 32, 4);
    c->batch_size = 4;
    c->steps = STEPS;
    c->warmup_steps = 2;
    c->router_noise = 1;
    c->val_every = 2;
    c->val_batches = 2;
    c->ckpt_every = 0;
    c->log_every = 1;
    snprintf(c->data, sizeof c->data, "corpus.txt");
    snprintf(c->out_dir, sizeof c->out_dir, "%s", out_dir);
}

/* Runs cfg to its end (or the hook's stop); the run's state is copied out. */
static moe_status train(const moe_train_config *cfg, moe_comm *comm, record *rec, float **params, float **m,
                        float **v, size_t *n)
{
    const moe_train_callbacks cb = {rec, on_resume, on_step, on_checkpoint, request};
    moe_train_run *r = NULL;
    moe_status st = moe_train_run_create(&r, cfg, NULL, comm, &cb);
    if (st) return st;
    st = moe_train_run_run(r);
    moe_trainer *tr = moe_train_run_trainer(r);
    moe_model *model = moe_trainer_model(tr);
    *n = moe_model_tensors(model)->total;
    *params = malloc(*n * sizeof(float));
    *m = malloc(*n * sizeof(float));
    *v = malloc(*n * sizeof(float));
    memcpy(*params, moe_model_params(model), *n * sizeof(float));
    memcpy(*m, moe_trainer_adam_m(tr), *n * sizeof(float));
    memcpy(*v, moe_trainer_adam_v(tr), *n * sizeof(float));
    rec->stop_after = moe_train_run_stopped(r) ? -1 : rec->stop_after; /* -1: it did stop */
    moe_train_run_destroy(r);
    return st;
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv)) return 1;
    moe_comm *comm = NULL;
    if (moe_comm_create_world(&comm, 0)) return 1;
    rank = moe_comm_rank(comm);
    world = moe_comm_size(comm);
    if (rank == 0) {
        /* a fresh start: a run directory left by an earlier pass of this
         * test would be refused as holding a run */
        CHECK(system("rm -rf run_whole run_parts run_bad") == 0);
        const size_t n = 200000;
        uint8_t *text = malloc(n);
        CHECK(text && moe_data_synth(text, NULL, n, 5) == MOE_OK);
        CHECK(moe_data_write_file("corpus.txt", text, n) == MOE_OK);
        free(text);
    }
    moe_comm_barrier(comm);

    moe_train_config a, b;
    config(&a, "run_whole");
    config(&b, "run_parts");
    record ra, rb, rc;
    memset(&ra, 0, sizeof ra), memset(&rb, 0, sizeof rb), memset(&rc, 0, sizeof rc);
    float *pa, *ma, *va, *pb, *mb, *vb, *pc, *mc, *vc;
    size_t na, nb, nc;
    CHECK(train(&a, comm, &ra, &pa, &ma, &va, &na) == MOE_OK);
    rb.stop_after = STOP_AT;
    CHECK(train(&b, comm, &rb, &pb, &mb, &vb, &nb) == MOE_OK);
    CHECK(rb.stop_after == -1 && rb.done == STOP_AT && rb.checkpoints == 1);
    snprintf(b.resume, sizeof b.resume, "run_parts");
    CHECK(train(&b, comm, &rc, &pc, &mc, &vc, &nc) == MOE_OK);
    CHECK(rc.resumed_at == STOP_AT && rc.done == STEPS && rc.steps_seen == STEPS - STOP_AT);
    CHECK(ra.checkpoints == 1 && rc.checkpoints == 1); /* at the end only (ckpt_every = 0) */
    CHECK(na == nc);
    for (int s = 1; s <= STEPS; s++) {
        const double resumed = s <= STOP_AT ? rb.loss[s] : rc.loss[s];
        CHECK(isfinite(ra.loss[s]) && memcmp(&ra.loss[s], &resumed, sizeof resumed) == 0);
    }
    CHECK(ra.loss[STEPS] < ra.loss[1]); /* it learns */
    if (na == nc) {
        CHECK(memcmp(pa, pc, na * sizeof(float)) == 0);
        CHECK(memcmp(ma, mc, na * sizeof(float)) == 0);
        CHECK(memcmp(va, vc, na * sizeof(float)) == 0);
        CHECK(memcmp(pa, pb, na * sizeof(float)) != 0); /* the stopped run was really behind */
    }
    if (rank == 0) {
        CHECK(count_lines("run_whole/metrics.jsonl") == STEPS);
        CHECK(count_lines("run_parts/metrics.jsonl") == STEPS);
        char latest[64] = {0};
        FILE *f = fopen("run_parts/latest", "r");
        CHECK(f && fgets(latest, sizeof latest, f));
        if (f) fclose(f);
        CHECK(strstr(latest, "ckpt-000006.h5") != NULL);
        CHECK(access("run_parts/config.ini", R_OK) == 0);
    }

    /* A missing data file: every rank fails, naming it. */
    moe_train_config bad;
    config(&bad, "run_bad");
    snprintf(bad.data, sizeof bad.data, "no_such_corpus.txt");
    moe_train_run *r = NULL;
    moe_status st = moe_train_run_create(&r, &bad, NULL, comm, NULL);
    CHECK(st != MOE_OK && r == NULL && strstr(moe_error_detail(), "no_such_corpus.txt") != NULL);
    /* Past the end: an argument error, nothing run. */
    config(&bad, "run_whole");
    snprintf(bad.resume, sizeof bad.resume, "run_whole");
    st = moe_train_run_create(&r, &bad, NULL, comm, NULL);
    CHECK(st == MOE_OK && moe_train_run_steps_done(r) == STEPS);
    if (r) {
        CHECK(moe_train_run_step(r) == MOE_ERR_ARG);
        CHECK(moe_train_run_run(r) == MOE_OK);
        moe_train_run_destroy(r);
    }

    free(pa), free(ma), free(va), free(pb), free(mb), free(vb), free(pc), free(mc), free(vc);
    int64_t any = fails;
    moe_comm_allreduce_i64(comm, MOE_SCOPE_WORLD, &any, 1);
    if (rank == 0) printf("test_train_run: %s (%d ranks)\n", any ? "FAILED" : "passed", moe_comm_size(comm));
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return any ? 1 : 0;
}
