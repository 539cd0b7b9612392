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
    double checkpoint_s;       /* seconds of the checkpoint written after it, 0 if none */
    double elapsed_s;          /* since moe_train_run_create returned */
} moe_train_progress;

/* Hooks, each optional (NULL). Called on every rank, in step order. */
typedef struct {
    void *ctx;
    void (*on_resume)(void *ctx, const char *path, int64_t step, double seconds);
    void (*on_step)(void *ctx, const moe_train_progress *p);
    /* interval_s: training time since the previous checkpoint (or start) */
    void (*on_checkpoint)(void *ctx, int64_t step, const char *path, double seconds, double interval_s);
    /* Preemption, asked after step `step` (steps done) before its
     * checkpoint: nonzero on ANY rank makes every rank write a checkpoint of
     * that step and stop (moe_train_run_stopped). */
    int (*should_stop)(void *ctx, int64_t step);
} moe_train_callbacks;

/* Checks nothing the config checker has not (call moe_train_config_check
 * first); loads the tokenizer of token data (cfg->tokenizer, and the one
 * stored in the checkpoint cfg->resume, which must be equal when both are
 * there), opens the data (cfg->data, cfg->val_data or the val_frac tail;
 * bytes or token files by cfg->data_format, token files checked against the
 * tokenizer), resolves vocab_size from the data (moe_train_config_resolve_vocab),
 * creates out_dir on rank 0, builds the trainer, resumes from cfg->resume
 * if set (on_resume), opens metrics.jsonl (append when resuming) and
 * writes config.ini with config_text (the resolved INI text, as stored in
 * checkpoints; NULL, or a vocab_size resolved here: formatted from the
 * resolved configuration). Checkpoints hold the tokenizer (/tokenizer).
 * cb may be NULL. Fails with the cause on every rank (MOE_ERR_IO naming a
 * file, MOE_ERR_ARG / MOE_ERR_MISMATCH naming the key or file, ...). */
moe_status moe_train_run_create(moe_train_run **out, const moe_train_config *cfg, const char *config_text,
                                moe_comm *comm, const moe_train_callbacks *cb);
void moe_train_run_destroy(moe_train_run *r);

/* One optimizer step, then (as the config says) the gradient dump, the
 * validation, the checkpoint and the metrics line; on_step last. MOE_ERR_ARG
 * once cfg->steps are done. A NaN loss or gradient returns
 * MOE_ERR_NONFINITE on every rank with nothing applied. */
moe_status moe_train_run_step(moe_train_run *r);
/* Steps until cfg->steps are done or should_stop asks to stop. */
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
int moe_train_run_stopped(const moe_train_run *r); /* 1 after a should_stop */
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
