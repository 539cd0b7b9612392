/* moe train: trains the MoE language model expert-parallel.
 *   mpirun -np N moe train --config FILE [--key=value ...]
 * Rank 0 reports progress (redrawn in place on a terminal), writes
 * out_dir/metrics.jsonl (one line per step), the loss / expert-load plot, and
 * checkpoints (every ckpt_every steps and at the end) through parallel HDF5.
 * Every failure ends every rank with a message and a non-zero exit. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "cli/cli.h"
#include "cli/plot.h"
#include "comm/comm.h"
#include "config/config.h"
#include "data/data.h"
#include "train/train.h"

typedef struct {
    moe_train_config cfg;
    moe_comm *comm;
    int rank, W;
    moe_data *ds;
    moe_trainer *tr;
    moe_model *model;
    int n_moe, E, El, e0;
    int64_t *tokens_total, *dropped_total; /* (n_moe, E) since step 0, global */
    int64_t *expert_step_g;                /* (n_moe, E) global view for checkpoints */
    char config_text[16384];
    FILE *metrics;
    int tty;
    int blas_noted; /* metrics line carrying the OpenBLAS kernel set written */
} train_run;

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

/* Validation loss (nats per byte) over val_batches fixed batches. Collective. */
static moe_status validate(train_run *r, uint8_t *in, uint8_t *tg, double *loss)
{
    const moe_train_config *c = &r->cfg;
    const int B = moe_trainer_local_seqs(r->tr);
    int64_t n_total = (int64_t)c->val_batches * c->batch_size;
    if (n_total > moe_data_val_windows(r->ds)) n_total = moe_data_val_windows(r->ds) / c->batch_size * c->batch_size;
    if (n_total < c->batch_size) n_total = c->batch_size;
    double ce = 0;
    int64_t tokens = 0;
    for (int64_t v = 0; v * c->batch_size < n_total; v++) {
        moe_status st = moe_data_val_batch(r->ds, in, tg, v * c->batch_size + (int64_t)r->rank * B, n_total, B);
        st = moe_comm_agree(r->comm, st);
        if (!st) st = moe_model_forward(r->model, in, tg, B, c->seq_len, 0, 0);
        moe_model_stats s;
        moe_status st2 = moe_model_reduce_stats(r->model, &s);
        if (st) return st;
        if (st2) return st2;
        ce += s.ce_sum;
        tokens += s.tokens;
    }
    *loss = tokens ? ce / tokens : NAN;
    return MOE_OK;
}

static void fmt_duration(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0) s = 0;
    int h = (int)(s / 3600), m = (int)(fmod(s, 3600) / 60), sec = (int)fmod(s, 60);
    if (h) snprintf(buf, n, "%dh%02dm", h, m);
    else if (m) snprintf(buf, n, "%dm%02ds", m, sec);
    else snprintf(buf, n, "%ds", sec);
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

static void write_metrics(train_run *r, int64_t step, const moe_train_stats *ts, double val, double tok_s,
                          double balance, double drop_frac, double ckpt_s)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "step", (double)step);
    /* the kernel set OpenBLAS loaded (OPENBLAS_CORETYPE or its own detection), on the first line of each start */
    if (!r->blas_noted++) cJSON_AddStringToObject(j, "blas_coretype", openblas_get_corename());
    cJSON_AddNumberToObject(j, "loss", ts->model.loss);
    cJSON_AddNumberToObject(j, "ce", ts->model.ce);
    cJSON_AddNumberToObject(j, "bpb", ts->model.ce / M_LN2);
    if (isfinite(val)) {
        cJSON_AddNumberToObject(j, "val_loss", val);
        cJSON_AddNumberToObject(j, "val_bpb", val / M_LN2);
    }
    cJSON_AddNumberToObject(j, "load_balance_loss",
                            ts->model.aux_terms ? ts->model.lb_sum / ts->model.aux_terms : 0);
    cJSON_AddNumberToObject(j, "z_loss", ts->model.aux_terms ? ts->model.z_sum / ts->model.aux_terms : 0);
    cJSON_AddNumberToObject(j, "lr", ts->lr);
    cJSON_AddNumberToObject(j, "grad_norm", ts->grad_norm);
    cJSON_AddNumberToObject(j, "tokens_per_s", tok_s);
    cJSON_AddNumberToObject(j, "dropped_frac", drop_frac);
    cJSON_AddNumberToObject(j, "max_over_mean_load", balance);
    cJSON_AddNumberToObject(j, "active_experts", (double)ts->active_experts);
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
    fprintf(r->metrics, "%s\n", s);
    fflush(r->metrics);
    free(s);
    cJSON_Delete(j);
}

/* Fills the checkpoint state from the trainer (global expert steps gathered
 * from the owners' local rows: each rank fills its own columns). */
static void ckpt_state(train_run *r, moe_ckpt_state *s, int64_t step, int64_t tokens_seen)
{
    const int64_t *local = moe_trainer_expert_steps(r->tr);
    for (int l = 0; l < r->n_moe; l++)
        for (int j = 0; j < r->El; j++)
            r->expert_step_g[(size_t)l * r->E + r->e0 + j] = local[(size_t)l * r->El + j];
    memset(s, 0, sizeof *s);
    s->table = moe_model_tensors(r->model);
    s->params = moe_model_params(r->model);
    s->m = moe_trainer_adam_m(r->tr);
    s->v = moe_trainer_adam_v(r->tr);
    s->n_experts = r->E;
    s->expert_step = r->expert_step_g;
    s->expert_tokens = r->tokens_total;
    s->expert_dropped = r->dropped_total;
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
}

static moe_status save_checkpoint(train_run *r, int64_t step, int64_t tokens_seen, double *seconds)
{
    char path[1200];
    double t0 = moe_now();
    moe_status st = moe_ckpt_path(path, sizeof path, r->cfg.out_dir, step);
    moe_ckpt_state s;
    ckpt_state(r, &s, step, tokens_seen);
    if (!st) st = moe_ckpt_save(path, r->comm, &s);
    if (!st && r->rank == 0) st = moe_ckpt_commit(r->cfg.out_dir, path, r->cfg.keep_last);
    st = moe_comm_agree(r->comm, st);
    *seconds = moe_now() - t0;
    return st;
}

static moe_status resume(train_run *r, int64_t *step, int64_t *tokens_seen)
{
    char path[1200];
    moe_status st = moe_ckpt_resolve(path, sizeof path, r->cfg.resume);
    st = moe_comm_agree(r->comm, st);
    if (st) return st;
    moe_ckpt_state s;
    ckpt_state(r, &s, 0, 0);
    const double t0 = moe_now();
    st = moe_ckpt_load(path, r->comm, &s, NULL);
    if (st) return st;
    int64_t *local = moe_trainer_expert_steps(r->tr);
    for (int l = 0; l < r->n_moe; l++)
        for (int j = 0; j < r->El; j++)
            local[(size_t)l * r->El + j] = r->expert_step_g[(size_t)l * r->E + r->e0 + j];
    moe_trainer_set_updates(r->tr, s.opt_step);
    *step = s.step;
    *tokens_seen = s.tokens_seen;
    if (r->rank == 0)
        printf("resumed from %s at step %lld in %.3f s\n", path, (long long)s.step, moe_now() - t0);
    return MOE_OK;
}

static moe_status dump_grads(train_run *r, int64_t step, const moe_train_stats *ts)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/grads-%06lld.h5", r->cfg.out_dir, (long long)step);
    size_t n = (size_t)r->n_moe * r->E;
    uint8_t *activated = moe_calloc(n, 1);
    moe_status ast = moe_comm_agree(r->comm, activated ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "gradient dump mask"));
    if (ast) {
        moe_free(activated);
        return ast;
    }
    for (size_t i = 0; i < n; i++) activated[i] = ts->model.kept[i] > 0;
    moe_status st = moe_ckpt_save_grads(path, r->comm, moe_model_tensors(r->model), moe_model_grads(r->model),
                                        activated, r->E, step, &r->cfg, r->config_text);
    moe_free(activated);
    return st;
}

static int run(train_run *r)
{
    moe_train_config *c = &r->cfg;
    moe_status st = MOE_OK;
    if (r->rank == 0 && mkdir_p(c->out_dir))
        st = moe_errorf(MOE_ERR_IO, "cannot create out_dir '%s': %s", c->out_dir, strerror(errno));
    if (!st) st = moe_data_open(&r->ds, c->data, c->val_data[0] ? c->val_data : NULL, c->val_frac, c->seq_len, c->seed);
    st = moe_comm_agree(r->comm, st);
    if (st) return moe_cli_error(r->rank, "train", st), 1;

    /* what the libraries (MPI, BLAS, HDF5) and the data index hold before
     * the model exists: the memory report separates it from the model's */
    const double base_mb = moe_cli_mem_mb("VmRSS");
    st = moe_trainer_create(&r->tr, c, r->comm);
    if (st) return moe_cli_error(r->rank, "train", st), 1;
    r->model = moe_trainer_model(r->tr);
    r->n_moe = moe_model_n_moe_layers(r->model);
    r->E = c->n_experts;
    r->El = r->E / moe_comm_ep_size(r->comm);
    r->e0 = moe_comm_ep_rank(r->comm) * r->El;
    size_t nE = (size_t)(r->n_moe > 0 ? r->n_moe : 1) * r->E;
    r->tokens_total = moe_calloc(nE, sizeof(int64_t));
    r->dropped_total = moe_calloc(nE, sizeof(int64_t));
    r->expert_step_g = moe_calloc(nE, sizeof(int64_t));
    const int B = moe_trainer_local_seqs(r->tr), S = c->seq_len;
    uint8_t *in = moe_calloc((size_t)B * S, 1), *tg = moe_calloc((size_t)B * S, 1);
    st = moe_comm_agree(r->comm, r->tokens_total && r->dropped_total && r->expert_step_g && in && tg
                                     ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "train buffers"));
    int64_t step = 0, tokens_seen = 0;
    if (!st && c->resume[0]) st = resume(r, &step, &tokens_seen);
    if (st) {
        moe_free(in);
        moe_free(tg);
        return moe_cli_error(r->rank, "train", st), 1;
    }
    if (r->rank == 0) {
        char path[1200];
        snprintf(path, sizeof path, "%s/metrics.jsonl", c->out_dir);
        r->metrics = fopen(path, step > 0 ? "a" : "w");
        snprintf(path, sizeof path, "%s/config.ini", c->out_dir);
        FILE *f = fopen(path, "w");
        if (f) {
            fputs(r->config_text, f);
            fclose(f);
        }
        const moe_tensor_table *t = moe_model_tensors(r->model);
        printf("moe train: %d ranks (ep %d), %d layers (%d MoE, E=%d, %s k=%d), d_model %d, "
               "%zu local parameter floats, batch %d x %d bytes, %d steps\n",
               r->W, moe_comm_ep_size(r->comm), c->n_layers, r->n_moe, r->E, moe_router_kind_str(c->router),
               c->top_k, c->d_model, t->total, c->batch_size, S, c->steps);
        printf("data: %s (%lld training bytes, %lld validation bytes; unigram baseline %.3f bits/byte)\n",
               c->data, (long long)moe_data_train_bytes(r->ds), (long long)moe_data_val_bytes(r->ds),
               moe_data_unigram_bpb(r->ds));
        fflush(stdout);
    }
    st = moe_comm_agree(r->comm, r->rank == 0 && !r->metrics
                                     ? moe_errorf(MOE_ERR_IO, "cannot write %s/metrics.jsonl", c->out_dir)
                                     : MOE_OK);
    const int64_t step0 = step;
    double t_start = moe_now(), last_val = NAN, ckpt_total = 0, last_ckpt = t_start;
    moe_train_stats ts;
    memset(&ts, 0, sizeof ts);
    while (!st && step < c->steps) {
        double t_step = moe_now();
        st = moe_data_batch(r->ds, in, tg, step, r->rank * B, B);
        st = moe_comm_agree(r->comm, st);
        if (!st) st = moe_trainer_step(r->tr, in, tg, step, &ts);
        if (st) break;
        t_step = moe_now() - t_step;
        step++;
        tokens_seen += (int64_t)c->batch_size * S;
        for (size_t i = 0; i < (size_t)r->n_moe * r->E; i++) {
            r->tokens_total[i] += ts.model.kept[i];
            r->dropped_total[i] += ts.model.dropped[i];
        }
        if (c->dump_grads_every > 0 && step % c->dump_grads_every == 0) {
            st = dump_grads(r, step, &ts);
            if (st) break;
        }
        double val = NAN;
        if (moe_data_val_bytes(r->ds) > 0 && c->val_every > 0 && (step % c->val_every == 0 || step == c->steps)) {
            st = validate(r, in, tg, &val);
            if (st) break;
            last_val = val;
        }
        double ckpt_s = 0;
        if ((c->ckpt_every > 0 && step % c->ckpt_every == 0) || step == c->steps) {
            double interval = moe_now() - last_ckpt;
            st = save_checkpoint(r, step, tokens_seen, &ckpt_s);
            if (st) break;
            ckpt_total += ckpt_s;
            last_ckpt = moe_now();
            if (r->rank == 0) {
                /* The pause as a share of the checkpoint interval (training + pause). */
                printf("%scheckpoint step %lld written in %.3f s (training paused %.1f%% of the %.2f s interval)\n",
                       r->tty ? "\n" : "", (long long)step, ckpt_s, 100 * ckpt_s / (interval + ckpt_s), interval + ckpt_s);
            }
        }
        if (r->rank == 0) {
            double now = moe_now();
            double tok_s = (double)c->batch_size * S / t_step; /* the step alone, not validation or checkpoints */
            double balance, drop;
            load_figures(&ts.model, &balance, &drop);
            write_metrics(r, step, &ts, val, tok_s, balance, drop, ckpt_s);
            if (r->tty || step % c->log_every == 0 || step == c->steps || step == step0 + 1 || isfinite(val)) {
                double rate = (now - t_start) / (double)(step - step0);
                char eta[32], vbuf[48] = "";
                fmt_duration(eta, sizeof eta, rate * (double)(c->steps - step));
                if (isfinite(last_val)) snprintf(vbuf, sizeof vbuf, " | val %.4f (%.3f bpb)", last_val, last_val / M_LN2);
                printf("%sstep %*lld/%d | loss %.4f%s | %.0f tok/s | ETA %s | drop %.1f%% | load max/mean %.2f%s",
                       r->tty ? "\r\033[K" : "", (int)snprintf(NULL, 0, "%d", c->steps), (long long)step, c->steps,
                       ts.model.loss, vbuf, tok_s, eta, 100 * drop, balance, r->tty ? "" : "\n");
                fflush(stdout);
            }
        }
    }
    if (r->rank == 0 && r->tty) printf("\n");
    if (!st && r->rank == 0) {
        double wall = moe_now() - t_start;
        printf("done: %lld steps in %.1f s (%.0f tokens/s); checkpoints took %.2f s (%.1f%% of the run)\n",
               (long long)(step - step0), wall, (double)(step - step0) * c->batch_size * S / wall, ckpt_total,
               100 * ckpt_total / wall);
        const double peak_mb = moe_cli_mem_mb("VmHWM");
        if (peak_mb > 0)
            printf("memory (rank 0): peak RSS %.0f MB = %.0f MB before the model (libraries, data) + %.0f MB "
                   "(parameters, gradients and AdamW state: %.0f MB)\n",
                   peak_mb, base_mb, peak_mb - base_mb,
                   4.0 * sizeof(float) * moe_model_tensors(r->model)->total / (1 << 20));
        if (isfinite(last_val))
            printf("validation: %.4f nats/byte = %.3f bits/byte (unigram baseline %.3f bits/byte)\n", last_val,
                   last_val / M_LN2, moe_data_unigram_bpb(r->ds));
        if (r->metrics) fflush(r->metrics);
        char out[1200];
        snprintf(out, sizeof out, "%s/metrics.jsonl", c->out_dir);
        if (moe_plot_training(out, c->out_dir) == 0) printf("plot: %s/training.png\n", c->out_dir);
        else printf("plot: not written (is gnuplot installed?)\n");
    }
    moe_free(in);
    moe_free(tg);
    if (st) {
        moe_cli_error(r->rank, st == MOE_ERR_NONFINITE ? "train: stopped (non-finite loss or gradient)" : "train", st);
        return 1;
    }
    return 0;
}

int moe_cmd_train(int argc, char **argv)
{
    train_run r;
    memset(&r, 0, sizeof r);
    moe_train_config_default(&r.cfg);
    int help = 0;
    moe_status st = moe_train_config_parse_args(&r.cfg, argc, argv, &help);
    if (!st && help) {
        moe_train_config_help(stdout);
        return 0;
    }
    if (moe_comm_init(&argc, &argv)) {
        moe_cli_error(-1, "train: MPI initialisation", MOE_ERR_MPI);
        return 1;
    }
    int rc = 2;
    /* A command-line error is reported once the world exists, so that each
     * rank's message carries its rank (ep_size 0: any world size works). */
    const moe_status parse_st = st;
    st = moe_comm_create_world(&r.comm, parse_st ? 0 : r.cfg.ep_size);
    if (st) {
        moe_cli_error(-1, "train", st);
        moe_comm_finalize();
        return 2;
    }
    r.rank = moe_comm_rank(r.comm);
    r.W = moe_comm_size(r.comm);
    st = parse_st ? parse_st : moe_train_config_check(&r.cfg, r.W);
    if (!st) {
        moe_train_config_format(&r.cfg, r.config_text, sizeof r.config_text);
        /* Every rank must train the same model on the same data. */
        st = moe_comm_check_same(r.comm, "training configuration", r.config_text, strlen(r.config_text));
    }
    if (st) {
        moe_cli_error(r.rank, "train", st);
    } else {
        /* Open MPI gives ranks a pseudo-terminal even when mpirun's own output
         * is a pipe, so under mpirun redraw only when the launcher says its
         * output is a terminal (launch/moe-local sets MOE_TTY=1). */
        const char *tty_env = getenv("MOE_TTY");
        int under_mpirun = getenv("OMPI_COMM_WORLD_SIZE") != NULL;
        r.tty = r.rank == 0 && isatty(STDOUT_FILENO) && (tty_env ? atoi(tty_env) == 1 : !under_mpirun);
        rc = run(&r);
    }
    if (r.metrics) fclose(r.metrics);
    moe_trainer_destroy(r.tr);
    moe_data_destroy(r.ds);
    moe_free(r.tokens_total);
    moe_free(r.dropped_total);
    moe_free(r.expert_step_g);
    moe_comm_destroy(r.comm);
    moe_comm_finalize();
    return rc;
}
