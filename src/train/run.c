/* The training run (run.h): data, trainer, the step loop with validation,
 * gradient dumps, checkpoints, resume and the metrics file, and the run
 * directory's rules (one run at a time, no silent overwrite, every step
 * once in metrics.jsonl). Moved here from the `moe train` command so that a
 * C test drives the same loop. */
#define _GNU_SOURCE /* F_OFD_SETLK */
#include "train/run.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "core/platform.h"
#include "model/model.h"

struct moe_train_run {
    moe_train_config cfg;      /* vocab_size resolved from the data */
    moe_comm *comm;            /* not owned */
    moe_train_callbacks cb;
    int rank, W;
    moe_data *ds;
    moe_tok *tok;              /* the tokenizer of token data (owned), NULL for bytes */
    int64_t val_pass_bytes;    /* bytes the targets of one validation pass stand for */
    moe_trainer *tr;
    moe_model *model;
    int n_moe, E, El, B;                   /* El: expert slots per ep rank (placement) */
    const int *moe_blocks;                 /* (n_moe) block of each MoE layer (the model's) */
    int64_t *tokens_total, *dropped_total; /* (n_moe, E) since step 0, global */
    int64_t *expert_step_g;                /* (n_moe, E) global view for checkpoints */
    int M, Ml, m0;                         /* vocabulary experts: all, local, first local (M = 0: head = full) */
    int64_t *vocab_tokens_total;           /* (M) targets per vocabulary expert since step 0, global */
    int64_t *vocab_step_g;                 /* (M) global view of the vocabulary experts' steps */
    int32_t *in, *tg;                      /* (B, seq_len) this rank's batch, token ids */
    char *config_text;                     /* the resolved INI text (owned) */
    FILE *metrics;                         /* rank 0 */
    int64_t step, step0, tokens_seen;
    double t_start, last_val, last_val_bpb, ckpt_total, last_ckpt;
    int stopped;
    int blas_noted;                        /* a metrics line has named the BLAS kernel set */
    int lock_fd;                           /* rank 0: out_dir/lock, held for the run's life */
    moe_status pending;                    /* a failed write or hook, reported at the next agreement */
    char pending_msg[768];
    moe_train_stats ts;
};

/* A failure that needs no agreement where it happens (rank 0's metrics
 * line, a printing hook) is kept and joins the next agreement: the next
 * step's first one, or the one after the last step. The first one wins. */
static void defer(moe_train_run *r, moe_status st)
{
    if (st == MOE_OK || r->pending != MOE_OK) return;
    r->pending = st;
    snprintf(r->pending_msg, sizeof r->pending_msg, "%s", moe_error_detail());
}

static moe_status take_pending(moe_train_run *r)
{
    if (r->pending == MOE_OK) return MOE_OK;
    moe_status st = r->pending;
    r->pending = MOE_OK;
    return moe_errorf(st, "%s", r->pending_msg);
}

static int mkdir_p(const char *path)
{
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0775) && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(tmp, 0775) && errno != EEXIST ? -1 : 0;
}

/* Validation loss (nats per token) and bits per byte over val_batches
 * fixed batches. Collective. */
static moe_status validate(moe_train_run *r, int32_t *in, int32_t *tg, double *loss, double *bpb)
{
    const moe_train_config *c = &r->cfg;
    const int B = r->B;
    int64_t n_total = (int64_t)c->val_batches * c->batch_size;
    if (n_total > moe_data_val_windows(r->ds)) n_total = moe_data_val_windows(r->ds) / c->batch_size * c->batch_size;
    if (n_total < c->batch_size) n_total = c->batch_size;
    /* the same windows on every rank: their bytes need no communication,
     * only agreement that every rank could read them */
    if (!r->val_pass_bytes) {
        const int64_t b = moe_data_val_pass_bytes(r->ds, n_total);
        moe_status st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, b < 0 ? MOE_ERR_IO : MOE_OK);
        if (st) return st;
        r->val_pass_bytes = b;
    }
    double ce = 0;
    int64_t tokens = 0;
    for (int64_t v = 0; v * c->batch_size < n_total; v++) {
        moe_status st = moe_data_val_batch(r->ds, in, tg, v * c->batch_size + (int64_t)r->rank * B, n_total, B);
        st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, st);
        if (!st) st = moe_model_forward(r->model, in, tg, B, c->seq_len, 0, 0);
        moe_model_stats s;
        moe_status st2 = moe_model_reduce_stats(r->model, &s);
        if (st) return st;
        if (st2) return st2;
        ce += s.ce_sum;
        tokens += s.tokens;
    }
    *loss = tokens ? ce / tokens : NAN;
    *bpb = r->val_pass_bytes ? ce / (double)r->val_pass_bytes / M_LN2 : NAN;
    return MOE_OK;
}

/* Worst max/mean expert load over the MoE layers, and dropped share. */
static void load_figures(const moe_model_stats *s, double *balance, double *drop_frac)
{
    double worst = 0, kept = 0, dropped = 0;
    for (int l = 0; l < s->n_moe_layers; l++) {
        double mx = 0, sum = 0;
        for (int e = 0; e < s->n_experts; e++) {
            double k = (double)s->kept[(size_t)l * s->n_experts + e];
            sum += k;
            mx = k > mx ? k : mx;
            dropped += (double)s->dropped[(size_t)l * s->n_experts + e];
        }
        kept += sum;
        if (sum > 0) {
            double b = mx / (sum / s->n_experts);
            worst = b > worst ? b : worst;
        }
    }
    *balance = worst;
    *drop_frac = kept + dropped > 0 ? dropped / (kept + dropped) : 0;
}

/* Appends the step's line to metrics.jsonl (rank 0). durable: fsync it as
 * well, for a checkpoint step, whose line must outlive a crash as the
 * checkpoint does. A failed write or fsync cuts the file back to before the
 * line and ends the run with the error. */
static moe_status write_metrics(moe_train_run *r, const moe_train_progress *p, int durable)
{
    const moe_train_stats *ts = p->stats;
    const double val = p->val_loss, ckpt_s = p->checkpoint_s;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "step", (double)p->step);
    if (!r->blas_noted++) {
        /* the kernel set OpenBLAS loaded (OPENBLAS_CORETYPE or its own
         * detection), on the first line of each start */
        moe_platform pf;
        moe_platform_get(&pf);
        cJSON_AddStringToObject(j, "blas_coretype", pf.blas_core);
    }
    cJSON_AddNumberToObject(j, "loss", ts->model.loss);
    cJSON_AddNumberToObject(j, "ce", ts->model.ce);
    cJSON_AddNumberToObject(j, "bpb", p->bpb);
    if (isfinite(val)) {
        cJSON_AddNumberToObject(j, "val_loss", val);
        cJSON_AddNumberToObject(j, "val_bpb", p->val_bpb);
    }
    cJSON_AddNumberToObject(j, "load_balance_loss",
                            ts->model.aux_terms ? ts->model.lb_sum / ts->model.aux_terms : 0);
    cJSON_AddNumberToObject(j, "z_loss", ts->model.aux_terms ? ts->model.z_sum / ts->model.aux_terms : 0);
    cJSON_AddNumberToObject(j, "lr", ts->lr);
    cJSON_AddNumberToObject(j, "grad_norm", ts->grad_norm);
    cJSON_AddNumberToObject(j, "tokens_per_s", p->tokens_per_s);
    cJSON_AddNumberToObject(j, "dropped_frac", p->dropped_frac);
    cJSON_AddNumberToObject(j, "max_over_mean_load", p->max_over_mean_load);
    cJSON_AddNumberToObject(j, "active_experts", (double)ts->active_experts);
    if (ts->model.vocab_experts) {
        /* the vocabulary experts: share of positions whose target's expert is
         * in the top vocab_top_k of the head router, and the worst load */
        const moe_model_stats *ms = &ts->model;
        double mx = 0, sum = 0;
        for (int m = 0; m < ms->vocab_experts; m++) {
            sum += (double)ms->vocab_tokens[m];
            mx = (double)ms->vocab_tokens[m] > mx ? (double)ms->vocab_tokens[m] : mx;
        }
        cJSON_AddNumberToObject(j, "vocab_coverage", ms->tokens ? (double)ms->vocab_covered / (double)ms->tokens : 0);
        cJSON_AddNumberToObject(j, "vocab_max_over_mean_load", sum > 0 ? mx / (sum / ms->vocab_experts) : 0);
        cJSON_AddNumberToObject(j, "active_vocab_experts", (double)ts->active_vocab_experts);
    }
    if (ckpt_s > 0) cJSON_AddNumberToObject(j, "checkpoint_s", ckpt_s);
    /* where rank 0's step time went (the reduction includes waiting for the
     * slowest rank) */
    cJSON *tm = cJSON_AddObjectToObject(j, "time_ms");
    cJSON_AddNumberToObject(tm, "forward", 1e3 * ts->t_forward);
    cJSON_AddNumberToObject(tm, "backward", 1e3 * ts->t_backward);
    cJSON_AddNumberToObject(tm, "reduce", 1e3 * ts->t_reduce);
    cJSON_AddNumberToObject(tm, "update", 1e3 * ts->t_update);
    cJSON *layers = cJSON_AddArrayToObject(j, "layers");
    for (int l = 0; l < ts->model.n_moe_layers; l++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "block", ts->model.moe_blocks[l]);
        cJSON *k = cJSON_AddArrayToObject(o, "kept"), *d = cJSON_AddArrayToObject(o, "dropped");
        for (int e = 0; e < ts->model.n_experts; e++) {
            cJSON_AddItemToArray(k, cJSON_CreateNumber((double)ts->model.kept[(size_t)l * ts->model.n_experts + e]));
            cJSON_AddItemToArray(d, cJSON_CreateNumber((double)ts->model.dropped[(size_t)l * ts->model.n_experts + e]));
        }
        cJSON_AddItemToArray(layers, o);
    }
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "metrics line of step %lld", (long long)p->step);
    /* Every line reaches the file or the run stops: a full disk must not
     * let a run go on for hours writing nothing. */
    const long before = ftell(r->metrics);
    errno = 0;
    int ok = fprintf(r->metrics, "%s\n", s) >= 0;
    ok = fflush(r->metrics) == 0 && ok;
    if (ok && durable) ok = fsync(fileno(r->metrics)) == 0;
    const int err = errno ? errno : EIO;
    free(s);
    if (!ok) {
        /* no line cut in the middle: the file stays valid JSON lines */
        clearerr(r->metrics);
        if (before >= 0 && ftruncate(fileno(r->metrics), before) != 0) {}
        return moe_errorf(MOE_ERR_IO, "cannot write %s/metrics.jsonl (step %lld): %s", r->cfg.out_dir,
                          (long long)p->step, strerror(err));
    }
    return MOE_OK;
}

/* Fills the checkpoint state from the trainer (global expert steps gathered
 * from the owners' local rows: each rank fills its own columns). */
static void ckpt_state(moe_train_run *r, moe_ckpt_state *s, int64_t step, int64_t tokens_seen)
{
    const int64_t *local = moe_trainer_expert_steps(r->tr), *vlocal = moe_trainer_vocab_steps(r->tr);
    for (int l = 0; l < r->n_moe; l++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(r->model, r->moe_blocks[l]));
        for (int j = 0; j < r->El; j++) /* copies of one expert hold the same count */
            r->expert_step_g[(size_t)l * r->E + ids[j]] = local[(size_t)l * r->El + j];
    }
    for (int j = 0; j < r->Ml; j++) r->vocab_step_g[r->m0 + j] = vlocal[j];
    memset(s, 0, sizeof *s);
    s->table = moe_model_tensors(r->model);
    s->params = moe_model_params(r->model);
    s->m = moe_trainer_adam_m(r->tr);
    s->v = moe_trainer_adam_v(r->tr);
    s->n_experts = r->E;
    s->expert_step = r->expert_step_g;
    s->expert_tokens = r->tokens_total;
    s->expert_dropped = r->dropped_total;
    s->vocab_expert_step = r->vocab_step_g;
    s->vocab_expert_tokens = r->vocab_tokens_total;
    s->opt_step = moe_trainer_updates(r->tr);
    s->lr = moe_train_lr(&r->cfg, step > 0 ? step - 1 : 0);
    s->beta1 = r->cfg.beta1;
    s->beta2 = r->cfg.beta2;
    s->eps = r->cfg.adam_eps;
    s->weight_decay = r->cfg.weight_decay;
    s->step = step;
    s->tokens_seen = tokens_seen;
    s->seed = r->cfg.seed;
    /* Batches and router noise are pure functions of (seed, step): the step
     * is the whole data cursor, and no generator carries state. */
    snprintf(s->extra[0].name, sizeof s->extra[0].name, "data_cursor");
    s->extra[0].value = step;
    s->n_extra = 1;
    s->config_text = r->config_text;
    s->cfg = &r->cfg;
    s->tok = r->tok;
}

static moe_status dump_grads(moe_train_run *r, int64_t step, const moe_train_stats *ts)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/grads-%06lld.h5", r->cfg.out_dir, (long long)step);
    size_t n = (size_t)r->n_moe * r->E;
    uint8_t *activated = moe_calloc(n + (size_t)r->M, 1);
    moe_status ast = moe_comm_agree(r->comm, activated ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "gradient dump mask"));
    if (ast) {
        moe_free(activated);
        return ast;
    }
    for (size_t i = 0; i < n; i++) activated[i] = ts->model.kept[i] > 0;
    for (int m = 0; m < r->M; m++) activated[n + m] = ts->model.vocab_tokens[m] > 0;
    moe_status st = moe_ckpt_save_grads(path, r->comm, moe_model_tensors(r->model), moe_model_grads(r->model),
                                        activated, r->M ? activated + n : NULL, r->E, step, &r->cfg,
                                        r->config_text);
    moe_free(activated);
    return st;
}

/* Writes out_dir/ckpt-<step>.h5, then rank 0 writes the step's metrics line
 * and only then points `latest` at the file. In the other order a kill
 * between the two would resume after this step with its line never
 * written; in this one it resumes from the previous checkpoint and does the
 * step again. Collective; p->checkpoint_s is the write's time. */
static moe_status save_checkpoint(moe_train_run *r, moe_train_progress *p)
{
    char path[1200];
    const double t0 = moe_now(), interval = t0 - r->last_ckpt;
    moe_status st = moe_ckpt_path(path, sizeof path, r->cfg.out_dir, r->step);
    moe_ckpt_state s;
    ckpt_state(r, &s, r->step, r->tokens_seen);
    if (!st) st = moe_ckpt_save(path, r->comm, &s); /* agreed: every rank has the same status */
    if (st) return st;
    p->checkpoint_s = moe_now() - t0;
    p->elapsed_s = moe_now() - r->t_start; /* the step's time now includes the write */
    if (r->metrics) st = write_metrics(r, p, 1);
    if (!st && r->rank == 0) st = moe_ckpt_commit(r->cfg.out_dir, path, r->cfg.keep_last);
    st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, st);
    const double seconds = moe_now() - t0;
    if (st) return st;
    r->ckpt_total += seconds;
    r->last_ckpt = moe_now();
    if (r->cb.on_checkpoint) defer(r, r->cb.on_checkpoint(r->cb.ctx, r->step, path, seconds, interval));
    return MOE_OK;
}

static moe_status resume(moe_train_run *r, const char *path)
{
    moe_status st;
    moe_ckpt_state s;
    ckpt_state(r, &s, 0, 0);
    const double t0 = moe_now();
    st = moe_ckpt_load(path, r->comm, &s, NULL);
    if (st) return st;
    int64_t *local = moe_trainer_expert_steps(r->tr), *vlocal = moe_trainer_vocab_steps(r->tr);
    for (int l = 0; l < r->n_moe; l++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(r->model, r->moe_blocks[l]));
        for (int j = 0; j < r->El; j++) local[(size_t)l * r->El + j] = r->expert_step_g[(size_t)l * r->E + ids[j]];
    }
    for (int j = 0; j < r->Ml; j++) vlocal[j] = r->vocab_step_g[r->m0 + j];
    moe_trainer_set_updates(r->tr, s.opt_step);
    r->step = s.step;
    r->tokens_seen = s.tokens_seen;
    if (r->cb.on_resume) defer(r, r->cb.on_resume(r->cb.ctx, path, s.step, moe_now() - t0));
    return MOE_OK;
}

/* ---- the run directory ---- */

/* Rank 0 takes out_dir/lock: an open-file-description lock, which the
 * kernel drops when the process ends however it ends (a crashed run never
 * leaves the directory locked; nothing is deleted). The file holds the
 * holder's pid, host and start time for the message of the run that finds
 * it taken. */
static moe_status lock_out_dir(moe_train_run *r)
{
    char path[1200], text[512];
    snprintf(path, sizeof path, "%s/lock", r->cfg.out_dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot create the lock file '%s': %s", path, strerror(errno));
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
        const int err = errno;
        ssize_t n = pread(fd, text, sizeof text - 1, 0);
        close(fd);
        text[n > 0 ? n : 0] = '\0';
        for (char *c = text; *c; c++) /* the holder's own line; nothing unprintable is echoed */
            if (*c == '\n' || (unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f) *c = *c == '\n' ? '\0' : '?';
        if (err == EAGAIN || err == EACCES)
            return moe_errorf(MOE_ERR_ARG,
                              "out_dir '%s' is in use by another run (%s, lock file '%s'); two runs in one "
                              "directory would overwrite each other's checkpoints and metrics",
                              r->cfg.out_dir, text[0] ? text : "holder unknown", path);
        return moe_errorf(MOE_ERR_IO, "cannot lock '%s': %s", path, strerror(err));
    }
    char host[256] = "?", when[32] = "";
    gethostname(host, sizeof host - 1);
    const time_t now = time(NULL);
    struct tm tm;
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    const int len = snprintf(text, sizeof text, "pid %ld on %s since %s\n", (long)getpid(), host, when);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, text, (size_t)len, 0) != len) {
        const int err = errno ? errno : EIO;
        close(fd);
        return moe_errorf(MOE_ERR_IO, "cannot write the lock file '%s': %s", path, strerror(err));
    }
    r->lock_fd = fd;
    /* Under the lock no other run writes here: temporary files are the
     * leftovers of a run that died while writing (ckpt-*.h5.tmp,
     * grads-*.h5.tmp, latest.tmp, metrics.jsonl.tmp), and they go. */
    DIR *d = opendir(r->cfg.out_dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        const char *n = e->d_name, *dot = strrchr(n, '.');
        if (!dot || strcmp(dot, ".tmp")) continue;
        if (strncmp(n, "ckpt-", 5) && strncmp(n, "grads-", 6) && strcmp(n, "latest.tmp") && strcmp(n, "metrics.jsonl.tmp"))
            continue;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", r->cfg.out_dir, n) >= sizeof path) continue;
        if (remove(path) != 0 && errno != ENOENT) {
            const int err = errno;
            closedir(d);
            return moe_errorf(MOE_ERR_IO, "cannot remove the leftover '%s': %s", path, strerror(err));
        }
    }
    if (d) closedir(d);
    return MOE_OK;
}

/* Step of a checkpoint file name "ckpt-<digits>.h5", -1 otherwise. */
static int64_t ckpt_name_step(const char *name)
{
    if (strncmp(name, "ckpt-", 5)) return -1;
    char *end;
    errno = 0;
    long long v = strtoll(name + 5, &end, 10);
    return end != name + 5 && name[5] >= '0' && name[5] <= '9' && !strcmp(end, ".h5") && !errno ? v : -1;
}

/* What of a run `dir` holds (`latest`, checkpoint files, metrics lines),
 * described into what; 0 if nothing. */
static int holds_run(const char *dir, char *what, size_t cap)
{
    char p[1200];
    struct stat sb;
    int n_ckpt = 0, latest, metrics;
    snprintf(p, sizeof p, "%s/latest", dir);
    latest = stat(p, &sb) == 0;
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    metrics = stat(p, &sb) == 0 && sb.st_size > 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));) n_ckpt += ckpt_name_step(e->d_name) >= 0;
    if (d) closedir(d);
    snprintf(what, cap, "%s%s%d checkpoint file%s%s", latest ? "a 'latest' file, " : "", "", n_ckpt,
             n_ckpt == 1 ? "" : "s", metrics ? ", metrics.jsonl" : "");
    return latest || n_ckpt > 0 || metrics;
}

/* The checkpoint to resume from (into path, "" for a fresh start), after
 * the run directory's rules; rank 0 decides, every rank gets the answer.
 * Collective. */
static moe_status resume_source(moe_train_run *r, char *path, size_t cap)
{
    const moe_train_config *c = &r->cfg;
    moe_status st = MOE_OK;
    path[0] = '\0';
    if (r->rank == 0) {
        char what[256], latest[1200];
        struct stat sb;
        snprintf(latest, sizeof latest, "%s/latest", c->out_dir);
        const char *arg = !strcmp(c->resume, "auto") ? (stat(latest, &sb) == 0 ? c->out_dir : "") : c->resume;
        if (arg[0]) st = moe_ckpt_resolve(path, cap, arg);
        if (!st && holds_run(c->out_dir, what, sizeof what)) {
            /* Resuming this directory's own run is the one way to write over it. */
            char a[PATH_MAX], b[PATH_MAX], dir[1200];
            const char *slash = strrchr(path, '/');
            snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
            const int same = path[0] && realpath(dir, a) && realpath(c->out_dir, b) && !strcmp(a, b);
            if (!path[0] && strcmp(c->resume, "auto"))
                st = moe_errorf(MOE_ERR_ARG,
                                "out_dir '%s' already holds a run (%s): continue it with --resume=%s (or "
                                "resume = auto), or give another out_dir, or delete that one",
                                c->out_dir, what, c->out_dir);
            else if (path[0] && !same)
                st = moe_errorf(MOE_ERR_ARG,
                                "out_dir '%s' already holds another run (%s); resuming '%s' into it would "
                                "overwrite that run: give another out_dir",
                                c->out_dir, what, path);
        }
    }
    st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, st);
    if (!st) st = moe_comm_bcast(r->comm, path, cap, 0);
    return st;
}

/* metrics.jsonl on a resume at `step`: its lines up to that step stay,
 * later ones (the interrupted run's work since its last checkpoint, which
 * the resumed run does again) and a line cut by a crash go, so every step
 * appears once. Rewritten through a temporary file only when a line goes. */
static int metrics_line_kept(const char *line, ssize_t n, int64_t step)
{
    char *end;
    long long s = -1;
    if (n > 8 && !strncmp(line, "{\"step\":", 8)) s = strtoll(line + 8, &end, 10);
    return line[n - 1] == '\n' && s >= 1 && s <= step;
}

static moe_status trim_metrics(const char *path, int64_t step)
{
    FILE *f = fopen(path, "r");
    if (!f) return errno == ENOENT ? MOE_OK : moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    char *line = NULL, tmp[1300];
    size_t cap = 0;
    ssize_t n;
    int drop = 0;
    while (!drop && (n = getline(&line, &cap, f)) > 0) drop = !metrics_line_kept(line, n, step);
    moe_status st = ferror(f) ? moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno)) : MOE_OK;
    FILE *g = NULL;
    if (!st && drop) {
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        if (!(g = fopen(tmp, "w"))) st = moe_errorf(MOE_ERR_IO, "cannot create '%s': %s", tmp, strerror(errno));
    }
    if (g) {
        rewind(f);
        errno = 0;
        while ((n = getline(&line, &cap, f)) > 0)
            if (metrics_line_kept(line, n, step)) fputs(line, g);
        int ok = !ferror(f) && fflush(g) == 0 && !ferror(g) && fsync(fileno(g)) == 0;
        const int err = errno ? errno : EIO;
        ok = fclose(g) == 0 && ok;
        if (!ok || rename(tmp, path) != 0) {
            st = moe_errorf(MOE_ERR_IO, "cannot rewrite '%s': %s", path, strerror(ok ? errno : err));
            remove(tmp);
        }
    }
    free(line);
    fclose(f);
    return st;
}

/* Rank 0's files of the run: metrics.jsonl (trimmed and appended to on a
 * resume) and config.ini. */
static moe_status open_outputs(moe_train_run *r)
{
    if (r->rank != 0) return MOE_OK;
    char path[1200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", r->cfg.out_dir);
    moe_status st = r->step > 0 ? trim_metrics(path, r->step) : MOE_OK;
    if (st) return st;
    r->metrics = fopen(path, r->step > 0 ? "a" : "w");
    if (!r->metrics) return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    snprintf(path, sizeof path, "%s/config.ini", r->cfg.out_dir);
    return moe_data_write_file(path, r->config_text, strlen(r->config_text));
}

/* The tokenizer of the run: the `tokenizer` file, and the one stored in the
 * checkpoint being resumed (from: resolved by resume_source, "" for a
 * fresh run), which must be the same when both exist; NULL for byte data.
 * Collective. */
static moe_status load_tokenizer(moe_train_run *r, moe_data_format f, const char *from, char *what, size_t cap)
{
    const moe_train_config *c = &r->cfg;
    moe_status st = MOE_OK;
    if (c->tokenizer[0]) {
        st = moe_tok_load(&r->tok, c->tokenizer, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL);
        snprintf(what, cap, "tokenizer '%s'", c->tokenizer);
    }
    if ((st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, st))) return st;
    if (from[0]) {
        moe_tok *saved = NULL;
        if ((st = moe_ckpt_load_tokenizer(&saved, from, r->comm))) return st;
        if (saved && f == MOE_DATA_BYTES)
            st = moe_errorf(MOE_ERR_MISMATCH,
                            "checkpoint '%s' holds a model over a tokenizer's ids, but data '%s' is read as bytes "
                            "(give its token file, from 'moe data encode')", from, c->data);
        else if (saved && r->tok && !moe_tok_equal(saved, r->tok))
            st = moe_errorf(MOE_ERR_MISMATCH, "tokenizer '%s' differs from the one stored in checkpoint '%s'",
                            c->tokenizer, from);
        if (!st && saved && !r->tok) {
            r->tok = saved;
            saved = NULL;
            snprintf(what, cap, "the tokenizer of checkpoint '%s'", from);
        }
        moe_tok_destroy(saved);
        if (st) return st;
    }
    if (f == MOE_DATA_TOKENS && !r->tok)
        return moe_errorf(MOE_ERR_ARG,
                          "data '%s' is a token file: set tokenizer = FILE (the tokenizer it was encoded with), or "
                          "resume a checkpoint that stores it", c->data);
    if (f == MOE_DATA_BYTES && r->tok)
        return moe_errorf(MOE_ERR_ARG,
                          "tokenizer '%s' is set but data '%s' is read as bytes (data_format = %s): encode it first "
                          "('moe data encode --tokenizer %s --data %s --out FILE.tok')",
                          c->tokenizer, c->data, c->data_format == MOE_DATA_BYTES ? "bytes" : "auto, not ending in .tok",
                          c->tokenizer, c->data);
    if (f == MOE_DATA_BYTES) snprintf(what, cap, "the byte data '%s'", c->data);
    return MOE_OK;
}

/* Refuses a model this node cannot hold, before anything of it is
 * allocated: the estimate of moe_model_memory_estimate for this rank's
 * sequences, times the job's ranks on this node, against the machine's
 * memory (an absurd size would otherwise fail deep in an allocation, or
 * be killed by the kernel when the pages are touched). Not collective. */
static moe_status check_memory(const moe_train_config *c, moe_comm *comm)
{
    const int W = moe_comm_size(comm), me = moe_comm_node_of(comm, moe_comm_rank(comm));
    int on_node = 0;
    for (int r = 0; r < W; r++) on_node += moe_comm_node_of(comm, r) == me;
    moe_model_memory mm;
    moe_model_memory_estimate(&mm, c, c->batch_size / W, moe_comm_ep_size(comm));
    int limited = 0;
    const uint64_t have = moe_platform_memory(&limited);
    const double gib = (double)(1ull << 30), need = mm.total * on_node;
    if (have == 0 || need <= (double)have) return MOE_OK;
    return moe_errorf(MOE_ERR_ARG,
                      "the model needs about %.1f GiB of memory per rank (parameters, gradients and AdamW state "
                      "%.1f GiB, activations of %d sequences of seq_len=%d %.1f GiB, MoE layers %.1f GiB), %.1f GiB "
                      "for the %d ranks on this node, more than the %.1f GiB this machine has%s: make d_model, "
                      "n_layers, d_ff, n_experts, vocab_size, seq_len or batch_size smaller, or run on more nodes",
                      mm.total / gib, mm.state / gib, c->batch_size / W, c->seq_len, mm.activations / gib,
                      mm.moe_layers / gib, need / gib, on_node, (double)have / gib,
                      limited ? " (its container's memory limit)" : "");
}

moe_status moe_train_run_create(moe_train_run **out, const moe_train_config *cfg, const char *config_text,
                                moe_comm *comm, const moe_train_callbacks *cb)
{
    *out = NULL;
    moe_train_run *r = calloc(1, sizeof *r);
    moe_status st = r ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "training run");
    if (r) {
        r->lock_fd = -1;
        r->cfg = *cfg;
        r->comm = comm;
        if (cb) r->cb = *cb;
        r->rank = moe_comm_rank(comm);
        r->W = moe_comm_size(comm);
        r->last_val = r->last_val_bpb = NAN;
    }
    st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
    const moe_train_config *c = st ? cfg : &r->cfg;
    const moe_data_format fmt = moe_data_format_of((moe_data_format)c->data_format, c->data);
    if (!st && r->rank == 0 && mkdir_p(c->out_dir))
        st = moe_errorf(MOE_ERR_IO, "cannot create out_dir '%s': %s", c->out_dir, strerror(errno));
    if (!st && r->rank == 0) st = lock_out_dir(r);
    st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
    char from[1200] = "", what[1200] = "";
    if (!st) st = resume_source(r, from, sizeof from);
    if (!st) st = load_tokenizer(r, fmt, from, what, sizeof what);
    /* Validation data only when validation is on: otherwise nothing of it
     * is demanded, and no tail of the training file is held out. */
    const int val_on = c->val_every > 0;
    if (!st) {
        const moe_data_config dc = {.path = c->data, .val_path = val_on ? c->val_data : NULL,
                                    .val_frac = val_on ? c->val_frac : 0, .seq_len = c->seq_len, .seed = c->seed,
                                    .format = fmt, .tok = r->tok};
        st = moe_data_open_config(&r->ds, &dc);
    }
    /* the model's vocabulary: the data's unless set (then at least the data's) */
    if (!st) st = moe_train_config_resolve_vocab(&r->cfg, moe_data_vocab_size(r->ds), what);
    if (!st) st = check_memory(&r->cfg, comm);
    if (!st) {
        if (config_text && r->cfg.vocab_size == cfg->vocab_size) {
            r->config_text = strdup(config_text);
        } else { /* the text checkpoints store holds the resolved vocab_size */
            const int n = moe_train_config_format(&r->cfg, NULL, 0);
            if ((r->config_text = malloc((size_t)n + 1))) moe_train_config_format(&r->cfg, r->config_text, n + 1);
        }
        if (!r->config_text) st = moe_errorf(MOE_ERR_NOMEM, "configuration text");
    }
    st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
    moe_vocab_part *vocab = NULL;
    if (!st && c->head == MOE_HEAD_VOCAB_EXPERTS) {
        /* the frequency bands need the training tokens' counts (on rank 0) */
        int64_t *counts = NULL;
        if (r->rank == 0 && !c->resume[0] && c->vocab_partition == MOE_VOCAB_PART_FREQUENCY) {
            counts = malloc((size_t)c->vocab_size * sizeof *counts);
            st = counts ? moe_data_train_counts(r->ds, counts, c->vocab_size)
                        : moe_errorf(MOE_ERR_NOMEM, "token counts of %d ids", c->vocab_size);
        }
        st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
        if (!st) st = moe_train_vocab_partition(&vocab, c, counts, comm);
        free(counts);
    }
    if (!st) st = moe_trainer_create(&r->tr, c, vocab, comm);
    moe_vocab_part_destroy(vocab); /* the model keeps its own copy */
    if (!st) {
        r->model = moe_trainer_model(r->tr);
        r->n_moe = moe_model_n_moe_layers(r->model);
        r->E = c->n_experts;
        r->El = moe_model_n_local_experts(r->model);
        r->moe_blocks = moe_model_moe_blocks(r->model);
        r->B = moe_trainer_local_seqs(r->tr);
        const size_t nE = (size_t)(r->n_moe > 0 ? r->n_moe : 1) * r->E;
        r->tokens_total = moe_calloc(nE, sizeof(int64_t));
        r->dropped_total = moe_calloc(nE, sizeof(int64_t));
        r->expert_step_g = moe_calloc(nE, sizeof(int64_t));
        r->in = moe_calloc((size_t)r->B * c->seq_len, sizeof(int32_t));
        r->tg = moe_calloc((size_t)r->B * c->seq_len, sizeof(int32_t));
        moe_vocab_ep *vh = moe_model_vocab_head(r->model);
        r->M = vh ? c->vocab_experts : 0;
        r->Ml = vh ? moe_vocab_ep_n_local(vh) : 0;
        r->m0 = vh ? moe_vocab_ep_expert0(vh) : 0;
        r->vocab_tokens_total = moe_calloc((size_t)r->M + 1, sizeof(int64_t));
        r->vocab_step_g = moe_calloc((size_t)r->M + 1, sizeof(int64_t));
        st = r->tokens_total && r->dropped_total && r->expert_step_g && r->in && r->tg && r->vocab_tokens_total &&
                     r->vocab_step_g
                 ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "train buffers");
        st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
    }
    if (!st && from[0]) st = resume(r, from);
    if (!st) st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, open_outputs(r));
    if (st) {
        moe_train_run_destroy(r);
        return st;
    }
    r->step0 = r->step;
    r->t_start = r->last_ckpt = moe_now();
    *out = r;
    return MOE_OK;
}

void moe_train_run_destroy(moe_train_run *r)
{
    if (!r) return;
    if (r->metrics) fclose(r->metrics);
    if (r->lock_fd >= 0) close(r->lock_fd); /* releases out_dir/lock */
    moe_trainer_destroy(r->tr);
    moe_data_destroy(r->ds);
    moe_tok_destroy(r->tok);
    moe_free(r->tokens_total);
    moe_free(r->dropped_total);
    moe_free(r->expert_step_g);
    moe_free(r->vocab_tokens_total);
    moe_free(r->vocab_step_g);
    moe_free(r->in);
    moe_free(r->tg);
    free(r->config_text);
    free(r);
}

moe_status moe_train_run_step(moe_train_run *r)
{
    const moe_train_config *c = &r->cfg;
    if (r->step >= c->steps) return moe_errorf(MOE_ERR_ARG, "training run: all %d steps are done", c->steps);
    const int S = c->seq_len;
    moe_comm_set_step(r->step + 1); /* named by a watchdog report: the step being computed */
    double t_step = moe_now();
    moe_status st = moe_data_batch(r->ds, r->in, r->tg, r->step, r->rank * r->B, r->B);
    /* bits per byte of the global batch: its windows are known on every rank */
    const int64_t batch_bytes = st ? 0 : moe_data_batch_bytes(r->ds, r->step, 0, c->batch_size);
    if (batch_bytes < 0) st = MOE_ERR_IO; /* the read's detail is recorded */
    if (!st) st = take_pending(r); /* the previous step's failed write, if any */
    st = moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, st);
    if (!st) st = moe_trainer_step(r->tr, r->in, r->tg, r->step, &r->ts);
    if (st) return st;
    t_step = moe_now() - t_step;
    r->step++;
    r->tokens_seen += (int64_t)c->batch_size * S;
    const moe_train_stats *ts = &r->ts;
    for (size_t i = 0; i < (size_t)r->n_moe * r->E; i++) {
        r->tokens_total[i] += ts->model.kept[i];
        r->dropped_total[i] += ts->model.dropped[i];
    }
    for (int m = 0; m < r->M; m++) r->vocab_tokens_total[m] += ts->model.vocab_tokens[m];
    if (c->dump_grads_every > 0 && r->step % c->dump_grads_every == 0 && (st = dump_grads(r, r->step, ts)))
        return st;
    moe_train_progress p = {.step = r->step, .first_step = r->step0, .stats = ts, .val_loss = NAN, .val_bpb = NAN,
                            .bpb = batch_bytes ? ts->model.ce_sum / (double)batch_bytes / M_LN2 : NAN};
    if (moe_data_val_tokens(r->ds) > 0 && c->val_every > 0 && (r->step % c->val_every == 0 || r->step == c->steps)) {
        if ((st = validate(r, r->in, r->tg, &p.val_loss, &p.val_bpb))) return st;
        r->last_val = p.val_loss;
        r->last_val_bpb = p.val_bpb;
    }
    /* Requests (preemption, a checkpoint on demand): asked on every rank,
     * hook or not, so that ranks whose hooks differ still run the same
     * collectives; the largest answer applies everywhere, at this step. */
    double req = r->cb.request ? (double)r->cb.request(r->cb.ctx, r->step) : 0.0;
    if ((st = moe_comm_allmax_f64(r->comm, MOE_SCOPE_WORLD, &req, 1))) return st;
    r->stopped = req >= MOE_TRAIN_STOP;
    p.last_val_loss = r->last_val;
    p.last_val_bpb = r->last_val_bpb;
    p.tokens_per_s = (double)c->batch_size * S / t_step; /* the step alone */
    load_figures(&ts->model, &p.max_over_mean_load, &p.dropped_frac);
    if ((c->ckpt_every > 0 && r->step % c->ckpt_every == 0) || r->step == c->steps || req >= MOE_TRAIN_CHECKPOINT) {
        if ((st = save_checkpoint(r, &p))) return st; /* writes the metrics line; sets elapsed_s */
    } else {
        p.elapsed_s = moe_now() - r->t_start;
        if (r->metrics) defer(r, write_metrics(r, &p, 0));
    }
    if (r->cb.on_step) defer(r, r->cb.on_step(r->cb.ctx, &p));
    /* No next step to carry a failure: agree now. */
    if (r->step == c->steps || r->stopped) return moe_comm_agree_detail(r->comm, MOE_SCOPE_WORLD, take_pending(r));
    return MOE_OK;
}

moe_status moe_train_run_run(moe_train_run *r)
{
    moe_status st = MOE_OK;
    while (!st && !r->stopped && r->step < r->cfg.steps) st = moe_train_run_step(r);
    return st;
}

int64_t moe_train_run_steps_done(const moe_train_run *r) { return r->step; }
int moe_train_run_stopped(const moe_train_run *r) { return r->stopped; }
double moe_train_run_checkpoint_seconds(const moe_train_run *r) { return r->ckpt_total; }
double moe_train_run_last_val_loss(const moe_train_run *r) { return r->last_val; }
double moe_train_run_last_val_bpb(const moe_train_run *r) { return r->last_val_bpb; }
moe_trainer *moe_train_run_trainer(moe_train_run *r) { return r->tr; }
const moe_train_config *moe_train_run_config(const moe_train_run *r) { return &r->cfg; }
const char *moe_train_run_config_text(const moe_train_run *r) { return r->config_text; }
const moe_tok *moe_train_run_tokenizer(const moe_train_run *r) { return r->tok; }
const moe_data *moe_train_run_data(const moe_train_run *r) { return r->ds; }
