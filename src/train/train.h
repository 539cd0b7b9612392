/* The training engine: one optimizer step = forward + backward of the model,
 * gradient reduction (dense over WORLD in packed buckets, expert gradients
 * over REPLICA), global-norm clipping, AdamW (bias correction, decoupled
 * weight decay on matrices only) under a warmup + cosine learning rate.
 *
 * Only activated experts are updated: an expert with no kept assignment in
 * the step on any replica keeps its weights and both moments bitwise, and
 * its own step counter (the bias-correction step of that expert) does not
 * advance. Replicated tensors use the trainer's update counter.
 *
 * AdamW m and v are blocks laid out exactly like the model's parameter block
 * (same moe_tensor_table offsets). Same config, seed and world size give
 * bitwise identical results. */
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H

#include <stdint.h>

#include "model/model.h"

/* Dense gradients are all-reduced in buckets of at most this many floats (8 MB). */
enum { MOE_TRAIN_BUCKET_FLOATS = 2 << 20 };

typedef struct {
    moe_model_stats model;   /* losses, aux sums, kept/dropped per expert (global) */
    double grad_norm;        /* L2 norm of the reduced gradient, before clipping */
    double clip_scale;       /* factor applied to the gradient (1 when not clipped) */
    double lr;               /* learning rate used */
    int64_t active_experts;  /* (MoE layer, expert) pairs updated in this step */
    int64_t active_vocab_experts; /* vocabulary experts updated in this step (some position's target) */
    double t_forward, t_backward, t_reduce, t_update; /* seconds on this rank */
} moe_train_stats;

typedef struct moe_trainer moe_trainer;

/* Creates the model (batch_size / W local sequences per step; vocab: the
 * vocabulary partition with head = vocab_experts, else NULL, as
 * moe_model_create) and the optimizer state (zero moments, zero step
 * counters). Collective over world. Fails with MOE_ERR_ARG naming the field
 * (batch_size not divisible by the world size, local sequences not a
 * multiple of group_seqs, any model error), MOE_ERR_NOMEM. Owner: caller. */
moe_status moe_trainer_create(moe_trainer **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                              moe_comm *comm);
void moe_trainer_destroy(moe_trainer *tr);

moe_model *moe_trainer_model(moe_trainer *tr);
int moe_trainer_local_seqs(const moe_trainer *tr);   /* batch_size / W */
/* AdamW moments: (moe_model_tensors()->total) each, same offsets as the params. */
float *moe_trainer_adam_m(moe_trainer *tr);
float *moe_trainer_adam_v(moe_trainer *tr);
/* (n_moe_layers, E_local) updates each LOCAL expert has received (global
 * expert = row0 of the expert tensors + column). Writable for resume. */
int64_t *moe_trainer_expert_steps(moe_trainer *tr);
/* (M / ep size) updates each LOCAL vocabulary expert has received (global
 * expert = moe_vocab_ep_expert0 + index); NULL with head = full. Writable
 * for resume. */
int64_t *moe_trainer_vocab_steps(moe_trainer *tr);
/* Updates applied to the replicated tensors (their bias-correction step). */
int64_t moe_trainer_updates(const moe_trainer *tr);
void moe_trainer_set_updates(moe_trainer *tr, int64_t n); /* for resume */

/* Learning rate at 0-based step: linear warmup lr*(step+1)/warmup_steps, then
 * cosine from lr down to lr*min_lr_frac at step = steps. */
double moe_train_lr(const moe_train_config *cfg, int64_t step);

/* One optimizer step on this rank's batch: inputs, targets (local_seqs,
 * seq_len) token ids in [0, vocab_size), rank r holding global sequences [r*B, (r+1)*B). step names
 * the step for the lr schedule and the router noise. Fills *st (may be NULL).
 * Collective over world. A NaN/Inf loss or gradient returns
 * MOE_ERR_NONFINITE on EVERY rank with no parameter, moment or counter
 * changed; any other failure on one rank returns non-OK on every rank
 * (the failing rank's status, MOE_ERR_REMOTE elsewhere). */
moe_status moe_trainer_step(moe_trainer *tr, const int32_t *inputs, const int32_t *targets,
                            int64_t step, moe_train_stats *st);

#endif
