/* Test library shared by the test folders (tests/lib): the model
 * configurations several tests build, so that one of them is written once.
 * Each test sets the keys its scenario is about on top. */
#ifndef MOE_TESTLIB_H
#define MOE_TESTLIB_H

#include "comm/comm.h"
#include "config/config.h"

/* The small decoder of the training, model and inference tests: d_model 32,
 * n_layers blocks of 2 heads over seq_len tokens, n_experts experts of d_ff
 * 48, top-2; every other key its default (an MoE block every second block,
 * from block 0). */
void tl_config_small(moe_train_config *c, int n_layers, int seq_len, int n_experts);

/* The training of the multi-rank equivalence tests (the same global batch
 * on W ranks and on one process: test_train_mpi, test_placement_mpi):
 * tl_config_small with every block MoE, batch_size sequences a step,
 * capacity factor 1 (drops happen), a noisy router, lr 1e-3 after 3 warmup
 * steps, `steps` steps. */
void tl_config_equiv(moe_train_config *c, int seq_len, int n_experts, int batch_size, int steps);

/* Every architecture and router option at once, over a configuration made
 * above: RMSNorm, RoPE, 4 heads, per-head q/k norm, no biases, swiglu,
 * sigmoid scores with an expert bias (updated at rate 0.01), 2 expert groups
 * of which a token keeps 1, the per-sequence balance loss over 2-sequence
 * groups, gated shared experts. The test sets the kv heads, route_scale and
 * the number of shared experts. */
void tl_config_every_option(moe_train_config *c);

/* The tiny decoder of the layout and checkpoint tests: d_model 8, 3 blocks
 * of 2 heads (MoE at 0 and 2: moe_every = 2), seq_len 8, 12 swiglu experts
 * of d_ff 8, top-2, a noisy router; every other key its default. */
void tl_config_tiny(moe_train_config *c);

/* 1 if x (n floats) is bitwise the same on every rank of scope s (a
 * position-weighted sum of the bit patterns, compared by a max over s).
 * Collective over s. */
int tl_same_everywhere(moe_comm *c, moe_comm_scope s, const float *x, size_t n);

#endif
