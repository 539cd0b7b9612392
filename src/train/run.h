/* A training run: the loop around moe_trainer_step that `moe train` and C
 * tests drive alike. It owns the data, the trainer, the step loop with
 * validation, gradient dumps, checkpoint cadence (every ckpt_every steps and
 * at the end, atomically, keep_last), resume, per-expert token counters,
 * out_dir/metrics.jsonl (rank 0, one JSON line per step) and
 * out_dir/config.ini. Printing is the caller's: it receives the figures of
 * each step, checkpoint and resume through callbacks.
 *
 * Everything here is collective over the communicator's world; every
 * failure is returned on every rank (never exit), with the cause's detail. */
#ifndef MOE_TRAIN_RUN_H
#define MOE_TRAIN_RUN_H

#include <stdint.h>

#include "comm/comm.h"
#include "config/config.h"
#include "data/data.h"
#include "train/train.h"
#include "vocab/partition.h"

typedef struct moe_train_run moe_train_run;

/* What one finished step reports (the same on every rank, except times). */
typedef struct {
    int64_t step;              /* steps done, including this one */
    int64_t first_step;        /* step the run started from (resume) */
    const moe_train_stats *stats;
    double bpb;                /* the batch's cross-entropy in bits per byte (per token for bytes) */
    double val_loss;           /* nats per token, NAN when not validated at this step */
    double val_bpb;            /* the same validation in bits per byte, NAN when not validated */
    double last_val_loss;      /* the latest validation, NAN if none yet */
    double last_val_bpb;
    double tokens_per_s;       /* of the step alone (not validation or checkpoints) */
    double max_over_mean_load; /* worst max/mean expert load over the MoE layers */
    double dropped_frac;       /* dropped / (kept + dropped) assignments */
    double checkpoint_s;       /* seconds writing the step's checkpoint file, 0 if none */
    double elapsed_s;          /* since moe_train_run_create returned */
} moe_train_progress;

/* What a rank asks for at a step boundary (the request hook): the ranks'
 * answers are combined (the largest wins), so every rank acts at the same
 * step even when a signal reached them at different moments. */
typedef enum {
    MOE_TRAIN_GO_ON = 0,     /* nothing */
    MOE_TRAIN_CHECKPOINT = 1,/* write a checkpoint of this step, then go on (on demand) */
    MOE_TRAIN_STOP = 2,      /* write a checkpoint of this step, then stop (preemption) */
} moe_train_request;

/* Hooks, each optional (NULL). Called on every rank, in step order. The
 * printing hooks return MOE_OK, or a failure (e.g. standard output cannot
 * be written) that ends the run on every rank with that cause, at the next
 * step boundary at the latest. */
typedef struct {
    void *ctx;
    moe_status (*on_resume)(void *ctx, const char *path, int64_t step, double seconds);
    moe_status (*on_step)(void *ctx, const moe_train_progress *p);
    /* interval_s: training time since the previous checkpoint (or start) */
    moe_status (*on_checkpoint)(void *ctx, int64_t step, const char *path, double seconds, double interval_s);
    /* Asked after step `step` (steps done), before its checkpoint: a
     * moe_train_request. The largest answer over the ranks applies. */
    int (*request)(void *ctx, int64_t step);
} moe_train_callbacks;

/* Checks nothing the config checker has not (call moe_train_config_check
 * first). Rank 0 creates out_dir and takes its lock (out_dir/lock: one run
 * per directory at a time; the lock dies with the process). A fresh run
 * (cfg->resume empty) refuses an out_dir that already holds a run (a
 * `latest`, a checkpoint or metrics lines): MOE_ERR_ARG saying how to
 * continue it. cfg->resume is a checkpoint, a run directory (its `latest`),
 * or "auto": resume from out_dir when it holds a checkpoint, else start
 * fresh in it. Then loads the tokenizer of token data (cfg->tokenizer, and
 * the one stored in the checkpoint resumed, which must be equal when both
 * are there), opens the data (cfg->data; cfg->val_data or the val_frac
 * tail only when validation is on, val_every > 0; bytes or token files by
 * cfg->data_format, token files checked against the tokenizer), resolves
 * vocab_size from the data (moe_train_config_resolve_vocab), builds the
 * trainer, resumes (on_resume), opens metrics.jsonl (on a resume: its
 * lines after the checkpoint's step, and a line cut by a crash, are
 * dropped first, so every step appears once) and writes config.ini with
 * config_text (the resolved INI text, as stored in checkpoints; NULL, or a
 * vocab_size resolved here: formatted from the resolved configuration).
 * Checkpoints hold the tokenizer (/tokenizer). cb may be NULL. Fails with
 * the cause on every rank (MOE_ERR_IO naming a file and the system's
 * reason, MOE_ERR_ARG / MOE_ERR_MISMATCH naming the key or file, ...). */
moe_status moe_train_run_create(moe_train_run **out, const moe_train_config *cfg, const char *config_text,
                                moe_comm *comm, const moe_train_callbacks *cb);
void moe_train_run_destroy(moe_train_run *r);

/* One optimizer step, then (as the config says) the gradient dump, the
 * validation, the checkpoint and the metrics line; on_step last. MOE_ERR_ARG
 * once cfg->steps are done. A NaN loss or gradient returns
 * MOE_ERR_NONFINITE on every rank with nothing applied. A line of
 * metrics.jsonl that cannot be written (full disk, ...), or a failing hook,
 * fails the run on every rank: at the next step's start, and at once after
 * the last step or a stop. */
moe_status moe_train_run_step(moe_train_run *r);
/* Steps until cfg->steps are done or a request stops the run. */
moe_status moe_train_run_run(moe_train_run *r);

/* The vocabulary partition a run with head = vocab_experts trains with
 * (docs/vocab-experts.md section 2): the resume checkpoint's when
 * cfg->resume is set (a checkpoint is a partition file), else by
 * cfg->vocab_partition: frequency bands of counts (vocab_size entries: the
 * training tokens of each id, moe_data_train_counts; needed on world rank 0
 * for frequency only, else may be NULL), k-means over the wte of the
 * checkpoint vocab_partition_from (kmeans_iters, vocab_balance, seed), or
 * the partition file vocab_partition_from. World rank 0 builds it and
 * broadcasts it, so it is the same on every rank and does not depend on
 * their number. Collective over world; every rank returns the cause's
 * status and detail (MOE_ERR_IO / MOE_ERR_FORMAT / MOE_ERR_CHECKSUM naming
 * a file, MOE_ERR_ARG for sizes that do not match, an empty set, all-zero
 * counts). Used by the training run and `moe vocab partition`. Owner:
 * caller. */
moe_status moe_train_vocab_partition(moe_vocab_part **out, const moe_train_config *cfg, const int64_t *counts,
                                     moe_comm *comm);

/* Accessors: not collective. */
int64_t moe_train_run_steps_done(const moe_train_run *r);
int moe_train_run_stopped(const moe_train_run *r); /* 1 after a MOE_TRAIN_STOP request */
double moe_train_run_checkpoint_seconds(const moe_train_run *r); /* total so far */
double moe_train_run_last_val_loss(const moe_train_run *r);      /* nats per token, NAN if none yet */
double moe_train_run_last_val_bpb(const moe_train_run *r);       /* bits per byte, NAN if none yet */
moe_trainer *moe_train_run_trainer(moe_train_run *r);
const moe_data *moe_train_run_data(const moe_train_run *r);
/* The configuration with vocab_size resolved, and its INI text (what
 * config.ini and the checkpoints hold). */
const moe_train_config *moe_train_run_config(const moe_train_run *r);
const char *moe_train_run_config_text(const moe_train_run *r);
const moe_tok *moe_train_run_tokenizer(const moe_train_run *r); /* NULL for bytes */

#endif
