/* layout: the one descriptor of every tensor. Lookups by kind (what the
 * model, decoder and inspect use instead of names), init kinds, a tensor
 * that exists only under an option, and the [model] keys as typed /model
 * attributes, set back into a configuration; the descriptor's count of a
 * rank's floats against the tables. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "layout/layout.h"

#include "testlib.h"

static void config(moe_train_config *c) { tl_config_tiny(c); }

static void test_descriptor(void **state)
{
    (void)state;
    moe_train_config c;
    config(&c);
    moe_tensor_table *t = NULL;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 1, 3), MOE_OK);
    /* Lookups by kind: the decoder, inspect and the model use these, not names. */
    const int w1 = moe_layout_find(t, MOE_T_EXP_W1, 2);
    assert_true(w1 >= 0);
    assert_string_equal(t->t[w1].name, "h/2/moe/experts/w1");
    assert_int_equal(t->t[w1].init, MOE_INIT_NORMAL);
    assert_int_equal(t->t[moe_layout_find(t, MOE_T_EXP_W2, 0)].init, MOE_INIT_RESID);
    assert_int_equal(t->t[moe_layout_find(t, MOE_T_LNF_W, -1)].init, MOE_INIT_ONE);
    assert_int_equal(moe_layout_find(t, MOE_T_EXP_W1, 1), -1); /* block 1 is dense */
    assert_int_equal(moe_layout_find(t, MOE_T_FC_W, 0), -1);
    assert_string_equal(t->t[moe_layout_find(t, MOE_T_FC_W, 1)].name, "h/1/mlp/c_fc/weight");
    const int had_noise = moe_layout_find(t, MOE_T_NOISE_W, 0) >= 0;
    assert_int_equal(had_noise, c.router_noise != 0);
    for (int i = 0; i < t->n; i++) {
        assert_int_equal(t->t[i].role, MOE_TENSOR_PARAM);
        assert_int_equal(moe_layout_find(t, (moe_tensor_kind)t->t[i].kind, t->t[i].block), i);
    }
    moe_layout_destroy(t);
    /* A tensor present only under an option: the router noise weight. */
    c.router_noise = !c.router_noise;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 1, 3), MOE_OK);
    assert_int_equal(moe_layout_find(t, MOE_T_NOISE_W, 0) >= 0, !had_noise);
    moe_layout_destroy(t);
    c.router_noise = !c.router_noise;
    /* The /model attributes are the [model] keys, typed, and set back. */
    moe_model_attr at[MOE_MODEL_ATTRS_MAX];
    const int na = moe_train_config_model_attrs(&c, at, MOE_MODEL_ATTRS_MAX);
    assert_int_equal(na, 38);
    moe_train_config back;
    memset(&back, 0, sizeof back);
    for (int i = 0; i < na; i++) assert_int_equal(moe_train_config_set_model_attr(&back, &at[i]), MOE_OK);
    moe_model_attr at2[MOE_MODEL_ATTRS_MAX];
    assert_int_equal(moe_train_config_model_attrs(&back, at2, MOE_MODEL_ATTRS_MAX), na);
    for (int i = 0; i < na; i++) {
        assert_string_equal(at[i].name, at2[i].name);
        assert_true(at[i].i == at2[i].i && at[i].r == at2[i].r);
        if (at[i].type == MOE_ATTR_TEXT) assert_string_equal(at[i].text, at2[i].text);
    }
    moe_model_attr bad = {.name = "lr", .type = MOE_ATTR_REAL, .r = 1};
    assert_int_equal(moe_train_config_set_model_attr(&back, &bad), MOE_ERR_ARG); /* not a model key */
}

/* Out-of-range model keys and an ep size that does not divide E are refused
 * before anything is allocated, naming the key. */
static void test_refused(void **state)
{
    (void)state;
    moe_train_config c;
    config(&c);
    moe_tensor_table *t = NULL;
    c.n_layers = 1 << 13;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 0, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "n_layers"));
    config(&c);
    c.n_heads = 3;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 0, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "n_heads"));
    config(&c);
    assert_int_equal(moe_layout_create(&t, &c, NULL, 3, 3), MOE_ERR_ARG);
    assert_null(t);
}

/* moe_layout_local_floats (the memory check before a run) counts from the
 * descriptor what every rank's table holds, under each option that adds
 * or resizes tensors, for every ep size; and stays finite for the largest
 * sizes the key table admits. */
static void test_local_floats(void **state)
{
    (void)state;
    moe_train_config c;
    for (int variant = 0; variant < 7; variant++) {
        config(&c);
        switch (variant) {
        case 1: c.pos = MOE_POS_ROPE, c.n_kv_heads = 1; break;
        case 2: c.qk_norm = MOE_QK_NORM_HEAD, c.norm = MOE_NORM_RMSNORM; break;
        case 3: c.n_shared = 2, c.shared_gate = 1, c.d_ff_shared = 5; break;
        case 4: c.tie_embeddings = 0, c.linear_bias = 0, c.expert_bias = 1; break;
        case 5: c.head = MOE_HEAD_VOCAB_EXPERTS, c.vocab_experts = 12, c.vocab_top_k = 2; break;
        case 6: c.activation = MOE_ACT_GELU, c.moe_every = 1, c.router_noise = 0; break;
        }
        /* an even partition: 256 ids, expert of id v is v % 12 (22 or 21 ids each) */
        int32_t assign[256];
        for (int v = 0; v < 256; v++) assign[v] = v % 12;
        moe_vocab_part *part = NULL;
        if (c.head == MOE_HEAD_VOCAB_EXPERTS) assert_int_equal(moe_vocab_part_create(&part, assign, 256, 12), MOE_OK);
        const int sizes[] = {1, 2, 3, 4, 6, 12};
        for (int k = 0; k < 6; k++) {
            size_t most = 0;
            for (int r = 0; r < sizes[k]; r++) {
                moe_tensor_table *t = NULL;
                assert_int_equal(moe_layout_create(&t, &c, part, r, sizes[k]), MOE_OK);
                if (t->total > most) most = t->total;
                moe_layout_destroy(t);
            }
            const double est = moe_layout_local_floats(&c, sizes[k]);
            if (c.head == MOE_HEAD_VOCAB_EXPERTS) /* an even share of the rows: at most one expert's rows apart */
                assert_true(fabs(est - (double)most) <= 22.0 * c.d_model + 22);
            else
                assert_true(est == (double)most);
        }
        moe_vocab_part_destroy(part);
    }
    config(&c);
    c.d_model = 1 << 16, c.n_heads = 1 << 6, c.n_layers = 1 << 12, c.d_ff = 1 << 20, c.n_experts = 1 << 10;
    c.vocab_size = 1 << 24;
    assert_int_equal(moe_train_config_check_model(&c), MOE_OK);
    const double big = moe_layout_local_floats(&c, 1);
    assert_true(isfinite(big) && big > 1e17);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptor),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_local_floats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
