/* The training engine, single process: only activated experts are updated
 * (weights, moments and step counter of an idle expert bitwise unchanged),
 * bitwise determinism, non-finite loss / activations leave everything
 * unchanged, gradient norm and clipping, the learning-rate schedule. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "train/train.h"

#include "testlib.h"

enum { B = 4, T = 16, E = 4 };

static void small_config(moe_train_config *c)
{
    tl_config_small(c, 2, T, E);
    c->moe_every = 2;
    c->batch_size = B;
    c->capacity_factor = 1.0;
    c->router_noise = 1;
    c->warmup_steps = 2;
    c->steps = 10;
}

static void batch(int32_t *in, int32_t *tg, uint32_t step)
{
    for (int i = 0; i < B * T; i++) {
        in[i] = (int32_t)(256.0 * moe_rng_uniform(5, MOE_RNG_DATA, (uint32_t)i, step, 0, 0));
        tg[i] = (int32_t)(256.0 * moe_rng_uniform(5, MOE_RNG_DATA, (uint32_t)i, step, 1, 0));
    }
}

static const moe_tensor *find(moe_trainer *tr, const char *name)
{
    const moe_tensor_table *tab = moe_model_tensors(moe_trainer_model(tr));
    for (int i = 0; i < tab->n; i++)
        if (!strcmp(tab->t[i].name, name)) return &tab->t[i];
    return NULL;
}

static float *param(moe_trainer *tr, const char *name)
{
    return moe_model_params(moe_trainer_model(tr)) + find(tr, name)->offset;
}

typedef struct {
    float *p, *m, *v;
    size_t n;
} snapshot;

static snapshot take(moe_trainer *tr)
{
    snapshot s;
    s.n = moe_model_tensors(moe_trainer_model(tr))->total;
    s.p = malloc(s.n * sizeof(float));
    s.m = malloc(s.n * sizeof(float));
    s.v = malloc(s.n * sizeof(float));
    memcpy(s.p, moe_model_params(moe_trainer_model(tr)), s.n * sizeof(float));
    memcpy(s.m, moe_trainer_adam_m(tr), s.n * sizeof(float));
    memcpy(s.v, moe_trainer_adam_v(tr), s.n * sizeof(float));
    return s;
}

static void release(snapshot *s)
{
    free(s->p);
    free(s->m);
    free(s->v);
}

static const char *const expert_tensors[] = {"h/0/moe/experts/w1", "h/0/moe/experts/b1",
                                             "h/0/moe/experts/w2", "h/0/moe/experts/b2"};

static void test_idle_expert_untouched(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_trainer *tr = NULL;
    assert_int_equal(moe_trainer_create(&tr, &c, NULL, moe_comm_self()), MOE_OK);
    /* Expert 3 never selected: ln_2 bias 1 makes sum(x) = d for every token,
     * so a constant router row -100 gives logit -100 d. */
    float *lb = param(tr, "h/0/ln_2/bias"), *rw = param(tr, "h/0/moe/router/weight");
    for (int i = 0; i < c.d_model; i++) {
        lb[i] = 1.0f;
        rw[3 * c.d_model + i] = -100.0f;
    }
    int32_t in[B * T], tg[B * T];
    batch(in, tg, 0);
    moe_train_stats st;
    assert_int_equal(moe_trainer_step(tr, in, tg, 0, &st), MOE_OK); /* give every moment a value */
    snapshot s0 = take(tr);
    const int steps = 3;
    for (int k = 1; k <= steps; k++) {
        batch(in, tg, (uint32_t)k);
        assert_int_equal(moe_trainer_step(tr, in, tg, k, &st), MOE_OK);
        assert_int_equal(st.model.kept[3], 0);
        assert_true(st.model.kept[0] > 0 && st.model.kept[1] > 0 && st.model.kept[2] > 0);
        assert_int_equal(st.active_experts, 3);
    }
    const int64_t *es = moe_trainer_expert_steps(tr);
    for (int e = 0; e < 3; e++) assert_int_equal(es[e], steps + 1);
    assert_int_equal(es[3], 0);
    assert_int_equal(moe_trainer_updates(tr), steps + 1);
    const float *p = moe_model_params(moe_trainer_model(tr)), *m = moe_trainer_adam_m(tr),
                *v = moe_trainer_adam_v(tr), *g = moe_model_grads(moe_trainer_model(tr));
    for (size_t i = 0; i < sizeof expert_tensors / sizeof expert_tensors[0]; i++) {
        const moe_tensor *t = find(tr, expert_tensors[i]);
        const size_t row = (size_t)moe_tensor_row_numel(t);
        for (int e = 0; e < E; e++) {
            const size_t o = t->offset + e * row;
            const int same = !memcmp(p + o, s0.p + o, row * sizeof(float)) &&
                             !memcmp(m + o, s0.m + o, row * sizeof(float)) &&
                             !memcmp(v + o, s0.v + o, row * sizeof(float));
            if (e == 3) {
                assert_true(same);
                for (size_t j = 0; j < row; j++) assert_true(g[o + j] == 0.0f);
            } else {
                assert_false(!memcmp(p + o, s0.p + o, row * sizeof(float)));
                assert_false(!memcmp(m + o, s0.m + o, row * sizeof(float)));
            }
        }
    }
    /* the idle expert's bias b1 was zero and is still exactly zero (no weight decay drift) */
    const moe_tensor *b1 = find(tr, "h/0/moe/experts/b1");
    assert_true(p[b1->offset + 3 * moe_tensor_row_numel(b1)] == 0.0f);
    release(&s0);
    moe_trainer_destroy(tr);
}

static void run(const moe_train_config *c, int steps, double *losses, snapshot *end)
{
    moe_trainer *tr = NULL;
    assert_int_equal(moe_trainer_create(&tr, c, NULL, moe_comm_self()), MOE_OK);
    int32_t in[B * T], tg[B * T];
    for (int k = 0; k < steps; k++) {
        moe_train_stats st;
        batch(in, tg, (uint32_t)k);
        assert_int_equal(moe_trainer_step(tr, in, tg, k, &st), MOE_OK);
        losses[k] = st.model.loss;
        assert_true(isfinite(st.model.loss) && st.model.loss > 0);
    }
    *end = take(tr);
    moe_trainer_destroy(tr);
}

static void test_deterministic(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    enum { S = 4 };
    double l1[S], l2[S];
    snapshot a, b;
    run(&c, S, l1, &a);
    run(&c, S, l2, &b);
    assert_memory_equal(l1, l2, sizeof l1);
    assert_memory_equal(a.p, b.p, a.n * sizeof(float));
    assert_memory_equal(a.v, b.v, a.n * sizeof(float));
    /* and the seed matters */
    c.seed++;
    double l3[S];
    snapshot d;
    run(&c, S, l3, &d);
    assert_true(l3[0] != l1[0]);
    release(&a);
    release(&b);
    release(&d);
}

static void expect_nonfinite(moe_trainer *tr, const char *name, size_t index, float value)
{
    int32_t in[B * T], tg[B * T];
    batch(in, tg, 1);
    for (int i = 0; i < B * T; i++) in[i] = 7; /* byte 7 everywhere, so a poisoned wte row is used */
    float *x = param(tr, name);
    const float saved = x[index];
    x[index] = value;
    snapshot s0 = take(tr);
    const int64_t updates = moe_trainer_updates(tr), es0 = moe_trainer_expert_steps(tr)[0];
    moe_train_stats st;
    assert_int_equal(moe_trainer_step(tr, in, tg, 1, &st), MOE_ERR_NONFINITE);
    snapshot s1 = take(tr);
    assert_memory_equal(s0.p, s1.p, s0.n * sizeof(float));
    assert_memory_equal(s0.m, s1.m, s0.n * sizeof(float));
    assert_memory_equal(s0.v, s1.v, s0.n * sizeof(float));
    assert_int_equal(moe_trainer_updates(tr), updates);
    assert_int_equal(moe_trainer_expert_steps(tr)[0], es0);
    x[index] = saved;
    assert_int_equal(moe_trainer_step(tr, in, tg, 1, &st), MOE_OK); /* recovers */
    release(&s0);
    release(&s1);
}

static void test_nonfinite(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    moe_trainer *tr = NULL;
    assert_int_equal(moe_trainer_create(&tr, &c, NULL, moe_comm_self()), MOE_OK);
    int32_t in[B * T], tg[B * T];
    batch(in, tg, 0);
    assert_int_equal(moe_trainer_step(tr, in, tg, 0, NULL), MOE_OK);
    expect_nonfinite(tr, "wte", 7 * 32, NAN);         /* row of byte 7: caught at the MoE layer's input */
    expect_nonfinite(tr, "ln_f/weight", 0, INFINITY); /* caught in the loss */
    moe_trainer_destroy(tr);
}

static void test_norm_and_clip(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    c.grad_clip = 1e-3;
    moe_trainer *tr = NULL;
    assert_int_equal(moe_trainer_create(&tr, &c, NULL, moe_comm_self()), MOE_OK);
    int32_t in[B * T], tg[B * T];
    batch(in, tg, 0);
    moe_train_stats st;
    assert_int_equal(moe_trainer_step(tr, in, tg, 0, &st), MOE_OK);
    const float *g = moe_model_grads(moe_trainer_model(tr));
    double s = 0;
    for (size_t i = 0; i < moe_model_tensors(moe_trainer_model(tr))->total; i++) s += (double)g[i] * g[i];
    assert_true(fabs(st.grad_norm - sqrt(s)) <= 1e-9 * sqrt(s));
    assert_true(st.grad_norm > c.grad_clip);
    assert_true(fabs(st.clip_scale - c.grad_clip / st.grad_norm) < 1e-12);
    /* the first moment holds (1 - beta1) * clipped gradient */
    const float *m = moe_trainer_adam_m(tr);
    for (size_t i = 0; i < 1000; i++)
        assert_true(fabsf(m[i] - (float)((1 - c.beta1) * g[i] * st.clip_scale)) <= 1e-6f * fabsf(m[i]) + 1e-12f);
    moe_trainer_destroy(tr);
}

static void test_lr_schedule(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    c.lr = 1.0;
    c.min_lr_frac = 0.1;
    c.warmup_steps = 10;
    c.steps = 110;
    assert_true(fabs(moe_train_lr(&c, 0) - 0.1) < 1e-12);
    assert_true(fabs(moe_train_lr(&c, 9) - 1.0) < 1e-12);
    assert_true(fabs(moe_train_lr(&c, 10) - 1.0) < 1e-12);
    assert_true(fabs(moe_train_lr(&c, 60) - 0.55) < 1e-12);
    assert_true(fabs(moe_train_lr(&c, 110) - 0.1) < 1e-12);
    assert_true(fabs(moe_train_lr(&c, 500) - 0.1) < 1e-12);
    for (int s = 11; s < 110; s++) assert_true(moe_train_lr(&c, s) < moe_train_lr(&c, s - 1));
}

static void test_create_errors(void **state)
{
    (void)state;
    moe_train_config c;
    small_config(&c);
    c.group_seqs = 3; /* 4 local sequences */
    moe_trainer *tr = NULL;
    assert_int_equal(moe_trainer_create(&tr, &c, NULL, moe_comm_self()), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "group_seqs"));
    assert_null(tr);
    small_config(&c);
    c.batch_size = 0;
    assert_int_equal(moe_trainer_create(&tr, &c, NULL, moe_comm_self()), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "batch_size"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idle_expert_untouched),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_norm_and_clip),
        cmocka_unit_test(test_lr_schedule),
        cmocka_unit_test(test_create_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
