/* The model (single process): parameter table names, shapes and layout,
 * initialisation, routing groups independent of the batch split, forward
 * modes and argument errors. Numerics against PyTorch: model_ref.py. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "model/model.h"

#include "testlib.h"

static void small_config(moe_train_config *c)
{
    tl_config_small(c, 3, 16, 4);
    c->moe_every = 2; /* blocks 0 and 2 MoE, block 1 dense */
    c->activation = MOE_ACT_SWIGLU;
    c->router_noise = 1;
}

static const moe_tensor *find(const moe_tensor_table *tab, const char *name)
{
    for (int i = 0; i < tab->n; i++)
        if (!strcmp(tab->t[i].name, name)) return &tab->t[i];
    return NULL;
}

static void random_batch(int32_t *x, int n, uint32_t salt)
{
    for (int i = 0; i < n; i++)
        x[i] = (int32_t)(256.0 * moe_rng_uniform(3, MOE_RNG_DATA, (uint32_t)i, salt, 0, 0));
}

static void test_table(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_model *m = NULL;
    assert_int_equal(moe_model_create(&m, &c, NULL, 4, moe_comm_self()), MOE_OK);
    const moe_tensor_table *tab = moe_model_tensors(m);
    const int C = 32, F = 48, F1 = 96, E = 4;
    struct { const char *name; int ndim; int64_t s0, s1, s2; int sharded, decay; } want[] = {
        {"wte", 2, 256, C, 0, 0, 1}, {"wpe", 2, 16, C, 0, 0, 1},
        {"h/0/ln_1/weight", 1, C, 0, 0, 0, 0}, {"h/0/ln_1/bias", 1, C, 0, 0, 0, 0},
        {"h/0/attn/c_attn/weight", 2, 3 * C, C, 0, 0, 1}, {"h/0/attn/c_attn/bias", 1, 3 * C, 0, 0, 0, 0},
        {"h/0/attn/c_proj/weight", 2, C, C, 0, 0, 1}, {"h/0/attn/c_proj/bias", 1, C, 0, 0, 0, 0},
        {"h/0/ln_2/weight", 1, C, 0, 0, 0, 0}, {"h/0/ln_2/bias", 1, C, 0, 0, 0, 0},
        {"h/0/moe/router/weight", 2, E, C, 0, 0, 1}, {"h/0/moe/router/noise_weight", 2, E, C, 0, 0, 1},
        {"h/0/moe/experts/w1", 3, E, F1, C, 1, 1}, {"h/0/moe/experts/b1", 2, E, F1, 0, 1, 0},
        {"h/0/moe/experts/w2", 3, E, C, F, 1, 1}, {"h/0/moe/experts/b2", 2, E, C, 0, 1, 0},
        {"h/1/mlp/c_fc/weight", 2, F1, C, 0, 0, 1}, {"h/1/mlp/c_fc/bias", 1, F1, 0, 0, 0, 0},
        {"h/1/mlp/c_proj/weight", 2, C, F, 0, 0, 1}, {"h/1/mlp/c_proj/bias", 1, C, 0, 0, 0, 0},
        {"h/2/moe/experts/w2", 3, E, C, F, 1, 1},
        {"ln_f/weight", 1, C, 0, 0, 0, 0}, {"ln_f/bias", 1, C, 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const moe_tensor *t = find(tab, want[i].name);
        assert_non_null(t);
        assert_int_equal(t->ndim, want[i].ndim);
        const int64_t s[3] = {want[i].s0, want[i].s1, want[i].s2};
        for (int d = 0; d < t->ndim; d++) assert_int_equal(t->shape[d], s[d]);
        assert_int_equal(t->expert_sharded, want[i].sharded);
        assert_int_equal(t->decay, want[i].decay);
        assert_int_equal(t->rows, t->shape[0]);
        assert_int_equal(t->layer, want[i].sharded ? want[i].name[2] - '0' : -1);
    }
    assert_null(find(tab, "h/1/moe/router/weight"));
    assert_null(find(tab, "h/0/mlp/c_fc/weight"));
    /* 2 + 3 x 8 + 2 x 6 + 1 x 4 + 2 tensors; dense first, contiguous, no gaps */
    assert_int_equal(tab->n, 2 + 24 + 12 + 4 + 2);
    const size_t dense = moe_model_dense_floats(m);
    size_t sum = 0;
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        sum += t->numel;
        if (t->expert_sharded) assert_true(t->offset >= dense && t->offset + t->numel <= tab->total);
        else assert_true(t->offset + t->numel <= dense);
        for (int j = 0; j < i; j++) { /* disjoint */
            const moe_tensor *u = &tab->t[j];
            assert_true(t->offset >= u->offset + u->numel || u->offset >= t->offset + t->numel);
        }
    }
    assert_int_equal(sum, tab->total);
    assert_int_equal(moe_model_n_moe_layers(m), 2);
    assert_non_null(moe_model_layer(m, 0));
    assert_null(moe_model_layer(m, 1));
    assert_int_equal(moe_model_moe_index(m, 2), 1);
    moe_model_destroy(m);
}

static void test_init(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_model *m = NULL;
    assert_int_equal(moe_model_create(&m, &c, NULL, 2, moe_comm_self()), MOE_OK);
    const moe_tensor_table *tab = moe_model_tensors(m);
    const float *p = moe_model_params(m);
    for (int id = 0; id < tab->n; id++) {
        const moe_tensor *t = &tab->t[id];
        const float *x = p + t->offset;
        const char *leaf = strrchr(t->name, '/');
        leaf = leaf ? leaf + 1 : t->name;
        const int is_ln_w = !strcmp(leaf, "weight") && strstr(t->name, "ln_");
        const int is_bias = !strcmp(leaf, "bias") || !strcmp(leaf, "b1") || !strcmp(leaf, "b2");
        const int resid = strstr(t->name, "c_proj/weight") || !strcmp(leaf, "w2");
        double s2 = 0;
        for (size_t j = 0; j < t->numel; j++) {
            if (is_ln_w) assert_true(x[j] == 1.0f);
            else if (is_bias) assert_true(x[j] == 0.0f);
            s2 += (double)x[j] * x[j];
        }
        if (is_ln_w || is_bias) continue;
        /* element j is std * normal(seed, INIT, j, 0, tensor id, 0) */
        const double std = resid ? 0.02 / sqrt(2.0 * c.n_layers) : 0.02;
        for (size_t j = 0; j < t->numel; j += 97)
            assert_true(x[j] == (float)(std * moe_rng_normal(c.seed, MOE_RNG_INIT, (uint32_t)j, 0, (uint32_t)id, 0)));
        const double rms = sqrt(s2 / t->numel);
        assert_true(rms > 0.7 * std && rms < 1.3 * std);
    }
    moe_model_destroy(m);
}

/* An inference model: the same table, the constant parameters set (norm
 * gains 1), the drawn ones 0 (loaded next), no gradients; its forward runs,
 * its backward is refused. */
static void test_inference_model(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_model *m = NULL, *t = NULL;
    assert_int_equal(moe_model_create_inference(&m, &c, NULL, 2, moe_comm_self()), MOE_OK);
    assert_int_equal(moe_model_create(&t, &c, NULL, 2, moe_comm_self()), MOE_OK);
    assert_null(moe_model_grads(m));
    const moe_tensor_table *tab = moe_model_tensors(m);
    assert_int_equal(tab->total, moe_model_tensors(t)->total);
    const float *p = moe_model_params(m), *q = moe_model_params(t);
    for (int id = 0; id < tab->n; id++) {
        const moe_tensor *x = &tab->t[id];
        const int constant = x->init == MOE_INIT_ZERO || x->init == MOE_INIT_ONE;
        for (size_t j = 0; j < x->numel; j++) assert_true(p[x->offset + j] == (constant ? q[x->offset + j] : 0.0f));
    }
    /* the training model's weights, then the same logits */
    memcpy(moe_model_params(m), q, tab->total * sizeof(float));
    int32_t in[2 * 8], tg[2 * 8];
    for (int i = 0; i < 16; i++) {
        in[i] = (int32_t)(i * 37 % 256);
        tg[i] = (int32_t)(i * 11 % 256);
    }
    assert_int_equal(moe_model_forward(m, in, tg, 2, 8, 1, 0), MOE_OK);
    assert_int_equal(moe_model_forward(t, in, tg, 2, 8, 1, 0), MOE_OK);
    assert_memory_equal(moe_model_logits(m), moe_model_logits(t), (size_t)2 * 8 * c.vocab_size * sizeof(float));
    moe_model_zero_grad(m); /* nothing to zero: no crash */
    assert_int_equal(moe_model_backward(m), MOE_ERR_ARG);
    assert_int_equal(moe_model_backward(t), MOE_OK);
    moe_model_destroy(m);
    moe_model_destroy(t);
}

/* Routing groups are per group_seqs sequences, so the logits of a sequence
 * do not depend on the other sequences of the batch (evaluation: no noise). */
static void test_batch_split(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.capacity_factor = 2.0;
    c.group_seqs = 2;
    moe_model *m = NULL;
    assert_int_equal(moe_model_create(&m, &c, NULL, 4, moe_comm_self()), MOE_OK);
    enum { B = 4, T = 16, V = 256 };
    int32_t in[B * T], tg[B * T];
    random_batch(in, B * T, 1);
    random_batch(tg, B * T, 2);
    static float all[B * T * V];
    assert_int_equal(moe_model_forward(m, in, tg, B, T, 0, 0), MOE_OK);
    memcpy(all, moe_model_logits(m), sizeof all);
    moe_model_stats st;
    assert_int_equal(moe_model_reduce_stats(m, &st), MOE_OK);
    assert_int_equal(st.tokens, B * T);
    assert_int_equal(st.aux_terms, 2 * 2); /* 2 groups x 2 MoE layers */
    /* expert choice: C = min(32, ceil(32 * 2 / 4)) = 16 tokens per expert per group */
    for (int i = 0; i < 2; i++)
        for (int e = 0; e < 4; e++) {
            assert_int_equal(st.kept[i * 4 + e], 2 * 16);
            assert_int_equal(st.dropped[i * 4 + e], 0);
        }
    const double ce_all = st.ce_sum;
    double ce_parts = 0;
    for (int half = 0; half < 2; half++) {
        assert_int_equal(moe_model_forward(m, in + half * 2 * T, tg + half * 2 * T, 2, T, 0, 0), MOE_OK);
        const float *l = moe_model_logits(m);
        for (int i = 0; i < 2 * T * V; i++) assert_true(fabsf(l[i] - all[half * 2 * T * V + i]) < 1e-4f);
        assert_int_equal(moe_model_reduce_stats(m, &st), MOE_OK);
        ce_parts += st.ce_sum;
    }
    assert_true(fabs(ce_parts - ce_all) < 1e-3);
    /* generation: no targets, shorter sequences */
    assert_int_equal(moe_model_forward(m, in, NULL, 2, 5, 0, 0), MOE_OK);
    assert_int_equal(moe_model_reduce_stats(m, &st), MOE_OK);
    assert_int_equal(st.tokens, 0);
    moe_model_destroy(m);
}

static void test_errors(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_model *m = NULL;
    c.n_heads = 5;
    assert_int_equal(moe_model_create(&m, &c, NULL, 2, moe_comm_self()), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "n_heads"));
    assert_null(m);
    small_config(&c);
    c.top_k = 9;
    assert_int_equal(moe_model_create(&m, &c, NULL, 2, moe_comm_self()), MOE_ERR_ARG);
    small_config(&c);
    c.group_seqs = 3;
    assert_int_equal(moe_model_create(&m, &c, NULL, 2, moe_comm_self()), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "group_seqs"));
    small_config(&c);
    c.group_seqs = 2;
    assert_int_equal(moe_model_create(&m, &c, NULL, 4, moe_comm_self()), MOE_OK);
    int32_t in[4 * 16] = {0};
    assert_int_equal(moe_model_forward(m, in, in, 3, 16, 1, 0), MOE_ERR_ARG); /* B % group_seqs */
    assert_int_equal(moe_model_forward(m, in, in, 6, 16, 1, 0), MOE_ERR_ARG); /* B > max */
    assert_int_equal(moe_model_forward(m, in, in, 2, 17, 1, 0), MOE_ERR_ARG); /* T > seq_len */
    assert_int_equal(moe_model_backward(m), MOE_ERR_ARG);                      /* no forward */
    assert_int_equal(moe_model_forward(m, in, in, 2, 16, 0, 0), MOE_OK);
    assert_int_equal(moe_model_backward(m), MOE_ERR_ARG);                      /* eval forward */
    assert_int_equal(moe_model_forward(m, in, NULL, 2, 16, 1, 0), MOE_OK);
    assert_int_equal(moe_model_backward(m), MOE_ERR_ARG);                      /* no targets */
    assert_int_equal(moe_model_forward(m, in, in, 2, 16, 1, 0), MOE_OK);
    assert_int_equal(moe_model_backward(m), MOE_OK);
    /* ids outside [0, vocab_size), input or target, are refused by position */
    in[17] = 256;
    assert_int_equal(moe_model_forward(m, in, NULL, 2, 16, 0, 0), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "input id 256 at position 17"));
    in[17] = 0;
    int32_t tg[4 * 16] = {0};
    tg[31] = -1;
    assert_int_equal(moe_model_forward(m, in, tg, 2, 16, 1, 0), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "target id -1 at position 31"));
    assert_int_equal(moe_model_backward(m), MOE_ERR_ARG); /* the failed forward left nothing */
    moe_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_init),
        cmocka_unit_test(test_inference_model),
        cmocka_unit_test(test_batch_split),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
