/* moe train: trains the MoE language model expert-parallel.
 *   mpirun -np N moe train --config FILE [--key=value ...]
 * The loop itself (validation, checkpoints, resume, metrics.jsonl) is the
 * training run of src/train (run.h); this command parses the options,
 * turns signals into requests at the next step boundary (SIGTERM, SIGINT,
 * SIGUSR2: checkpoint and stop, exit 0; SIGUSR1: checkpoint and go on) and
 * prints: rank 0 reports progress (redrawn in place on a terminal), the
 * summary and the loss / expert-load plot. Every failure ends every rank
 * with a message and a non-zero exit; so does output that cannot be
 * written. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/plot.h"
#include "comm/comm.h"
#include "config/config.h"
#include "train/run.h"

typedef struct {
    moe_train_config cfg;
    moe_comm *comm;
    int rank, W;
    char config_text[16384];
    int tty;
} train_cmd;

static void fmt_duration(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0) s = 0;
    int h = (int)(s / 3600), m = (int)(fmod(s, 3600) / 60), sec = (int)fmod(s, 60);
    if (h) snprintf(buf, n, "%dh%02dm", h, m);
    else if (m) snprintf(buf, n, "%dm%02ds", m, sec);
    else snprintf(buf, n, "%ds", sec);
}

/* ---- signals: requests at the next step boundary ---- */

/* Set by the handlers, read by the request hook: the last stop signal (0:
 * none) and a pending checkpoint on demand. */
static volatile sig_atomic_t stop_signal, checkpoint_signal;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) {
        checkpoint_signal = 1;
        return;
    }
    /* A second Ctrl-C does not wait for the step boundary. */
    if (sig == SIGINT && stop_signal == SIGINT) {
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
    stop_signal = sig;
}

/* SIGTERM and SIGINT (a scheduler's or a user's stop), SIGUSR2 (the stop
 * launch/moe-local and the Slurm script send through mpirun, which
 * forwards USR1 and USR2 but not TERM or INT) and SIGUSR1 (a checkpoint on
 * demand). SA_RESTART: MPI's and the file system's calls go on. */
static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    const int sigs[] = {SIGTERM, SIGINT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaction(sigs[i], &sa, NULL);
}

static const char *signal_name(int sig)
{
    return sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : sig == SIGUSR2 ? "SIGUSR2" : "a signal to another rank";
}

static int on_request(void *ctx, int64_t step)
{
    (void)ctx, (void)step;
    if (stop_signal) return MOE_TRAIN_STOP;
    if (checkpoint_signal) {
        checkpoint_signal = 0;
        return MOE_TRAIN_CHECKPOINT;
    }
    return MOE_TRAIN_GO_ON;
}

/* Standard output is where the run reports: output that cannot be written
 * (a full disk under a redirected log, ...) ends the run. Rank 0. */
static moe_status stdout_status(void)
{
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return MOE_OK;
    const int err = errno ? errno : EIO;
    clearerr(stdout);
    return moe_errorf(MOE_ERR_IO, "cannot write to standard output: %s", strerror(err));
}

static moe_status on_resume(void *ctx, const char *path, int64_t step, double seconds)
{
    const train_cmd *t = ctx;
    if (t->rank != 0) return MOE_OK;
    printf("resumed from %s at step %lld in %.3f s\n", path, (long long)step, seconds);
    return stdout_status();
}

static moe_status on_checkpoint(void *ctx, int64_t step, const char *path, double seconds, double interval)
{
    const train_cmd *t = ctx;
    (void)path;
    if (t->rank != 0) return MOE_OK;
    /* The pause as a share of the checkpoint interval (training + pause). */
    printf("%scheckpoint step %lld written in %.3f s (training paused %.1f%% of the %.2f s interval)\n",
           t->tty ? "\n" : "", (long long)step, seconds, 100 * seconds / (interval + seconds), interval + seconds);
    return stdout_status();
}

static moe_status on_step(void *ctx, const moe_train_progress *p)
{
    const train_cmd *t = ctx;
    const moe_train_config *c = &t->cfg;
    if (t->rank != 0) return MOE_OK;
    if (!(t->tty || p->step % c->log_every == 0 || p->step == c->steps || p->step == p->first_step + 1 ||
          isfinite(p->val_loss)))
        return MOE_OK;
    const double rate = p->elapsed_s / (double)(p->step - p->first_step);
    char eta[32], vbuf[48] = "";
    fmt_duration(eta, sizeof eta, rate * (double)(c->steps - p->step));
    if (isfinite(p->last_val_loss))
        snprintf(vbuf, sizeof vbuf, " | val %.4f (%.3f bpb)", p->last_val_loss, p->last_val_bpb);
    printf("%sstep %*lld/%d | loss %.4f%s | %.0f tok/s | ETA %s | drop %.1f%% | load max/mean %.2f%s",
           t->tty ? "\r\033[K" : "", (int)snprintf(NULL, 0, "%d", c->steps), (long long)p->step, c->steps,
           p->stats->model.loss, vbuf, p->tokens_per_s, eta, 100 * p->dropped_frac, p->max_over_mean_load,
           t->tty ? "" : "\n");
    return stdout_status();
}

static int run(train_cmd *t)
{
    const moe_train_config *c = &t->cfg;
    /* what the libraries (MPI, BLAS, HDF5) hold before the run exists: the
     * memory report separates it from the model's */
    const double base_mb = moe_cli_mem_mb("VmRSS");
    const moe_train_callbacks cb = {.ctx = t, .on_resume = on_resume, .on_step = on_step, .on_checkpoint = on_checkpoint,
                                    .request = on_request};
    moe_train_run *r = NULL;
    moe_status st = moe_train_run_create(&r, c, t->config_text, t->comm, &cb);
    if (st) return moe_cli_error(t->rank, "train", st), 1;
    c = moe_train_run_config(r); /* vocab_size resolved from the data */
    moe_model *model = moe_trainer_model(moe_train_run_trainer(r));
    const moe_data *ds = moe_train_run_data(r);
    const int S = c->seq_len;
    const int64_t step0 = moe_train_run_steps_done(r);
    if (t->rank == 0) {
        const moe_tensor_table *tt = moe_model_tensors(model);
        printf("moe train: %d ranks (ep %d), %d layers (%d MoE, E=%d, %s k=%d), d_model %d, vocab %d, "
               "%zu local parameter floats, batch %d x %d tokens, %d steps\n",
               t->W, moe_comm_ep_size(t->comm), c->n_layers, moe_model_n_moe_layers(model), c->n_experts,
               moe_router_kind_str(c->router), c->top_k, c->d_model, c->vocab_size, tt->total, c->batch_size, S,
               c->steps);
        if (moe_data_is_tokens(ds))
            printf("data: %s (%lld training tokens = %lld bytes, %lld validation tokens = %lld bytes; "
                   "unigram baseline %.3f bits/token = %.3f bits/byte)\n",
                   c->data, (long long)moe_data_train_tokens(ds), (long long)moe_data_train_bytes(ds),
                   (long long)moe_data_val_tokens(ds), (long long)moe_data_val_bytes(ds), moe_data_unigram_bpt(ds),
                   moe_data_unigram_bpb(ds));
        else
            printf("data: %s (%lld training bytes, %lld validation bytes; unigram baseline %.3f bits/byte)\n",
                   c->data, (long long)moe_data_train_bytes(ds), (long long)moe_data_val_bytes(ds),
                   moe_data_unigram_bpb(ds));
        fflush(stdout);
    }
    const double t_start = moe_now();
    st = moe_train_run_run(r);
    const int64_t steps = moe_train_run_steps_done(r) - step0;
    if (t->rank == 0 && t->tty) printf("\n");
    if (!st && t->rank == 0 && moe_train_run_stopped(r))
        printf("stopped at step %lld of %d on request (%s) after its checkpoint; continue with --resume=%s\n",
               (long long)moe_train_run_steps_done(r), c->steps, signal_name(stop_signal), c->out_dir);
    if (!st && t->rank == 0) {
        const double wall = moe_now() - t_start, ckpt_total = moe_train_run_checkpoint_seconds(r);
        printf("done: %lld steps in %.1f s (%.0f tokens/s); checkpoints took %.2f s (%.1f%% of the run)\n",
               (long long)steps, wall, (double)steps * c->batch_size * S / wall, ckpt_total, 100 * ckpt_total / wall);
        const double peak_mb = moe_cli_mem_mb("VmHWM");
        moe_model_memory mm; /* what the size check before the run assumed */
        moe_model_memory_estimate(&mm, c, c->batch_size / t->W, moe_comm_ep_size(t->comm));
        if (peak_mb > 0)
            printf("memory (rank 0): peak RSS %.0f MB = %.0f MB before the model (libraries) + %.0f MB "
                   "(data index, parameters, gradients and AdamW state: %.0f MB; estimated before the run: "
                   "%.0f MB)\n",
                   peak_mb, base_mb, peak_mb - base_mb, 4.0 * sizeof(float) * moe_model_tensors(model)->total / (1 << 20),
                   mm.total / (1 << 20));
        const double val = moe_train_run_last_val_loss(r);
        if (isfinite(val))
            printf("validation: %.4f nats/%s = %.3f bits/byte (unigram baseline %.3f bits/byte)\n", val,
                   moe_data_is_tokens(ds) ? "token" : "byte", moe_train_run_last_val_bpb(r), moe_data_unigram_bpb(ds));
    }
    moe_train_run_destroy(r); /* closes metrics.jsonl before the plot reads it */
    c = &t->cfg;              /* (the run's copy is gone) */
    if (!st && t->rank == 0) {
        char out[1200];
        snprintf(out, sizeof out, "%s/metrics.jsonl", c->out_dir);
        if (moe_plot_training(out, c->out_dir) == 0) printf("plot: %s/training.png\n", c->out_dir);
        else printf("plot: not written (is gnuplot installed?)\n");
        st = stdout_status(); /* the summary was lost: say so */
    }
    if (st) {
        moe_cli_error(t->rank, st == MOE_ERR_NONFINITE ? "train: stopped (non-finite loss or gradient)" : "train", st);
        return 1;
    }
    return 0;
}

int moe_cmd_train(int argc, char **argv)
{
    train_cmd r;
    memset(&r, 0, sizeof r);
    moe_train_config_default(&r.cfg);
    int help = 0;
    moe_status st = moe_train_config_parse_args(&r.cfg, argc, argv, &help);
    /* --comm_timeout (taken by every command) is the key comm_timeout here,
     * over the config file. */
    if (!st && moe_cli_comm_timeout_arg()) st = moe_train_config_set(&r.cfg, "comm_timeout", moe_cli_comm_timeout_arg());
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
    const moe_status platform_st = moe_cli_check_platform(r.comm, "train"); /* every rank, before any branch */
    st = parse_st ? parse_st : platform_st ? platform_st : moe_train_config_check(&r.cfg, r.W);
    if (!st) {
        moe_train_config_format(&r.cfg, r.config_text, sizeof r.config_text);
        /* Every rank must train the same model on the same data. */
        st = moe_comm_check_same(r.comm, "training configuration", r.config_text, strlen(r.config_text));
    }
    if (st) {
        moe_cli_error(r.rank, "train", st);
    } else {
        /* The run's deadline, and its report next to the checkpoints. */
        moe_comm_watchdog_set_timeout(r.cfg.comm_timeout);
        moe_comm_watchdog_set_dir(r.cfg.out_dir);
        /* Open MPI gives ranks a pseudo-terminal even when mpirun's own output
         * is a pipe, so under mpirun redraw only when the launcher says its
         * output is a terminal (launch/moe-local sets MOE_TTY=1). */
        const char *tty_env = getenv("MOE_TTY");
        int under_mpirun = getenv("OMPI_COMM_WORLD_SIZE") != NULL;
        r.tty = r.rank == 0 && isatty(STDOUT_FILENO) && (tty_env ? atoi(tty_env) == 1 : !under_mpirun);
        install_signals();
        rc = run(&r);
    }
    moe_comm_destroy(r.comm);
    moe_comm_finalize();
    return rc;
}
