#include <stdint.h>
#include <string.h>
/* The model configurations several tests share (see testlib.h). */
#include "testlib.h"

void tl_config_small(moe_train_config *c, int n_layers, int seq_len, int n_experts)
{
    moe_train_config_default(c);
    c->d_model = 32;
    c->n_layers = n_layers;
    c->n_heads = 2;
    c->seq_len = seq_len;
    c->n_experts = n_experts;
    c->top_k = 2;
    c->d_ff = 48;
}

void tl_config_equiv(moe_train_config *c, int seq_len, int n_experts, int batch_size, int steps)
{
    tl_config_small(c, 2, seq_len, n_experts);
    c->moe_every = 1;
    c->batch_size = batch_size;
    c->capacity_factor = 1.0;
    c->router_noise = 1;
    c->lr = 1e-3;
    c->warmup_steps = 3;
    c->steps = steps;
}

void tl_config_every_option(moe_train_config *c)
{
    c->norm = MOE_NORM_RMSNORM;
    c->pos = MOE_POS_ROPE;
    c->n_heads = 4;
    c->qk_norm = MOE_QK_NORM_HEAD;
    c->linear_bias = 0;
    c->activation = MOE_ACT_SWIGLU;
    c->score = MOE_SCORE_SIGMOID;
    c->expert_bias = 1;
    c->bias_update_rate = 0.01;
    c->n_groups = 2;
    c->topk_groups = 1;
    c->aux_loss = MOE_AUX_SEQ;
    c->group_seqs = 2;
    c->shared_gate = 1;
}

void tl_config_tiny(moe_train_config *c)
{
    moe_train_config_default(c);
    c->d_model = 8;
    c->n_layers = 3;
    c->n_heads = 2;
    c->seq_len = 8;
    c->n_experts = 12;
    c->top_k = 2;
    c->d_ff = 8;
    c->moe_every = 2;
    c->activation = MOE_ACT_SWIGLU;
    c->router_noise = 1;
}

int tl_same_everywhere(moe_comm *c, moe_comm_scope s, const float *x, size_t n)
{
    double h[2] = {0, 0};
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &x[i], 4);
        h[0] += (double)b * (double)(i % 13 + 1);
    }
    h[1] = -h[0];
    const double mine = h[0];
    if (moe_comm_allmax_f64(c, s, h, 2)) return 0;
    return h[0] == mine && -h[1] == mine;
}
