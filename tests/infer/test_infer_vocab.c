/* Inference with the vocabulary-expert head (single process):
 *   - the decoder's top-K lists at K = M are the exact model: for every
 *     position and every token v, log P_M(v) equals minus the loss the full
 *     (training-path) forward gives target v at that position, and the
 *     lists hold every id once with probabilities summing to 1;
 *   - at K < M the lists are the union of the K chosen experts' sets, and
 *     log P_K - log P_M is the same constant (-log sum of the chosen q) on
 *     all of them;
 *   - greedy generation at K = M picks, at every step, the argmax of the
 *     exact model P(. | prefix) computed by full forwards;
 *   - a call wanting some rows only (a prefill's last) gives them as a call
 *     wanting all; moe_infer_decode refuses this head; evaluation
 *     reports the exact loss whatever K and the coverage at K. */
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
#include "infer/infer.h"

#include "testlib.h"

enum { S = 12, V = 256, M = 8 };

static moe_vocab_part *partition(void)
{
    int32_t assign[V];
    for (int v = 0; v < V; v++) assign[v] = v < M ? v : (int)(M * moe_rng_uniform(2, MOE_RNG_BENCH, (uint32_t)v, 0, 0, 0));
    moe_vocab_part *p = NULL;
    assert_int_equal(moe_vocab_part_create(&p, assign, V, M), MOE_OK);
    return p;
}

static moe_model *make_model(int max_seqs, int K)
{
    moe_train_config c;
    tl_config_small(&c, 2, S, 4);
    c.capacity_factor = 0; /* dropless: routing does not depend on the group */
    c.head = MOE_HEAD_VOCAB_EXPERTS;
    c.vocab_experts = M;
    c.vocab_top_k = K;
    moe_vocab_part *p = partition();
    moe_model *m = NULL;
    assert_int_equal(moe_model_create(&m, &c, p, max_seqs, moe_comm_self()), MOE_OK);
    moe_vocab_part_destroy(p);
    /* weights far from the init, so that q and the experts' softmaxes are far from uniform */
    const moe_tensor_table *t = moe_model_tensors(m);
    float *w = moe_model_params(m);
    for (int i = 0; i < t->n; i++)
        if (t->t[i].dtype == MOE_TENSOR_F32)
            for (size_t j = 0; j < t->t[i].numel; j++)
                w[t->t[i].offset + j] = (float)(0.4 * moe_rng_normal(7, MOE_RNG_BENCH, (uint32_t)j, (uint32_t)i, 0, 0));
    return m;
}

static void random_ids(int32_t *x, int n, uint32_t salt)
{
    for (int i = 0; i < n; i++) x[i] = (int32_t)(V * moe_rng_uniform(3, MOE_RNG_DATA, (uint32_t)i, salt, 0, 0));
}

/* logP (S, V): log P(v | x[0..t]) for every position and token, from the
 * training path: one full forward per target v (every position targets v). */
static void exact_logp(moe_model *m, const int32_t *x, int T, float *logP)
{
    int32_t tg[S];
    for (int v = 0; v < V; v++) {
        for (int t = 0; t < T; t++) tg[t] = v;
        assert_int_equal(moe_model_forward(m, x, tg, 1, T, 0, 0), MOE_OK);
        for (int t = 0; t < T; t++) logP[t * V + v] = -moe_model_losses(m)[t];
    }
}

typedef struct {
    moe_infer_dist d;
} dist_buf;

static void dist_alloc(dist_buf *b, int rows, int64_t stride)
{
    b->d.stride = stride;
    b->d.logp = calloc((size_t)rows * stride, sizeof(float));
    b->d.ids = calloc((size_t)rows * stride, sizeof(int32_t));
    b->d.count = calloc((size_t)rows, sizeof(int32_t));
}

static void dist_free(dist_buf *b) { free(b->d.logp), free(b->d.ids), free(b->d.count); }

static void test_topk_is_exact_model(void **state)
{
    (void)state;
    moe_model *m = make_model(1, M);
    int32_t x[S];
    random_ids(x, S, 1);
    float *logP = malloc((size_t)S * V * sizeof *logP);
    exact_logp(m, x, S, logP);
    moe_infer_decoder *dec = NULL;
    assert_int_equal(moe_infer_decoder_create(&dec, m, 1), MOE_OK);
    assert_int_equal(moe_infer_decoder_dist_stride(dec), V);
    dist_buf b;
    dist_alloc(&b, S, V);
    int seq[S] = {0};
    assert_int_equal(moe_infer_decode_dist(dec, &b.d, x, seq, S, NULL), MOE_OK);
    assert_false(b.d.dense);
    double worst = 0;
    for (int t = 0; t < S; t++) {
        assert_int_equal(b.d.count[t], V);
        double sum = 0;
        for (int i = 0; i < V; i++) {
            assert_int_equal(b.d.ids[t * V + i], i); /* every id once, in order */
            const float lp = b.d.logp[t * V + i];
            worst = fmax(worst, fabs(lp - logP[t * V + i]) / fmax(1.0, fabs(logP[t * V + i])));
            sum += exp(lp);
        }
        assert_true(fabs(sum - 1) < 1e-5);
    }
    print_message("K = M: worst relative difference to the exact model %.3g\n", worst);
    assert_true(worst < 2e-5);
    /* K < M: the union of the chosen experts' sets, P_M renormalised */
    for (int K = 1; K < M; K++) {
        assert_int_equal(moe_model_set_vocab_top_k(m, K), MOE_OK);
        moe_infer_decoder_reset(dec, 0);
        dist_buf k;
        dist_alloc(&k, S, moe_infer_decoder_dist_stride(dec));
        assert_int_equal(moe_infer_decode_dist(dec, &k.d, x, seq, S, NULL), MOE_OK);
        const int32_t *assign = moe_vocab_part_assign(moe_model_vocab(m));
        for (int t = 0; t < S; t++) {
            uint8_t chosen[M] = {0};
            double shift = NAN;
            for (int i = 0; i < k.d.count[t]; i++) {
                const int v = k.d.ids[t * k.d.stride + i];
                assert_true(i == 0 || v > k.d.ids[t * k.d.stride + i - 1]);
                chosen[assign[v]] = 1;
                const double s = k.d.logp[t * k.d.stride + i] - logP[t * V + v];
                if (isnan(shift)) shift = s;
                assert_true(fabs(s - shift) < 2e-5 && shift >= -1e-6); /* -log sum_{T_K} q >= 0 */
            }
            int n_chosen = 0, n_tokens = 0;
            for (int e = 0; e < M; e++) n_chosen += chosen[e];
            for (int v = 0; v < V; v++) n_tokens += chosen[assign[v]];
            assert_int_equal(n_chosen, K);
            assert_int_equal(n_tokens, k.d.count[t]); /* every token of the chosen sets */
        }
        dist_free(&k);
    }
    /* some rows wanted: the same rows as when all are */
    assert_int_equal(moe_model_set_vocab_top_k(m, 2), MOE_OK);
    moe_infer_decoder_reset(dec, 0);
    dist_buf all, w;
    dist_alloc(&all, S, moe_infer_decoder_dist_stride(dec));
    dist_alloc(&w, S, moe_infer_decoder_dist_stride(dec));
    assert_int_equal(moe_infer_decode_dist(dec, &all.d, x, seq, S, NULL), MOE_OK);
    moe_infer_decoder_reset(dec, 0);
    uint8_t want[S] = {0};
    want[3] = want[7] = want[S - 1] = 1;
    assert_int_equal(moe_infer_decode_dist(dec, &w.d, x, seq, S, want), MOE_OK);
    for (int t = 0; t < S; t++) {
        if (!want[t]) continue;
        assert_int_equal(w.d.count[t], all.d.count[t]);
        const size_t o = (size_t)t * w.d.stride;
        assert_memory_equal(w.d.ids + o, all.d.ids + o, (size_t)all.d.count[t] * sizeof(int32_t));
        for (int i = 0; i < all.d.count[t]; i++) assert_true(fabsf(w.d.logp[o + i] - all.d.logp[o + i]) < 1e-5f);
    }
    dist_free(&all);
    /* the head forms no logits */
    float logits[V];
    moe_infer_decoder_reset(dec, 0);
    assert_int_equal(moe_infer_decode(dec, logits, x, seq, 1), MOE_ERR_ARG);
    assert_int_equal(moe_model_set_vocab_top_k(m, M + 1), MOE_ERR_ARG);
    assert_int_equal(moe_model_set_vocab_top_k(m, 0), MOE_ERR_ARG);
    dist_free(&w);
    dist_free(&b);
    free(logP);
    moe_infer_decoder_destroy(dec);
    moe_model_destroy(m);
}

/* Greedy generation with K = M is the argmax of the exact model. */
static void test_greedy_is_exact_argmax(void **state)
{
    (void)state;
    moe_model *m = make_model(1, M);
    moe_infer_decoder *dec = NULL;
    assert_int_equal(moe_infer_decoder_create(&dec, m, 1), MOE_OK);
    int32_t prompt[4], out[6];
    random_ids(prompt, 4, 9);
    const int32_t *pp[1] = {prompt};
    const size_t len[1] = {4};
    const moe_infer_sampler s = {.temperature = 0, .top_k = 0, .top_p = 1, .seed = 1};
    assert_int_equal(moe_infer_generate(out, NULL, dec, moe_comm_self(), pp, len, 1, 6, &s, NULL), MOE_OK);
    int32_t x[S];
    memcpy(x, prompt, sizeof prompt);
    memcpy(x + 4, out, sizeof out);
    float *logP = malloc((size_t)S * V * sizeof *logP);
    exact_logp(m, x, 4 + 6, logP);
    for (int j = 0; j < 6; j++) {
        const float *row = logP + (size_t)(3 + j) * V; /* the distribution after x[0 .. 3 + j] */
        int best = 0;
        for (int v = 1; v < V; v++) best = row[v] > row[best] ? v : best;
        /* a near tie could go either way in float: then the two must be within rounding */
        assert_true(out[j] == best || fabs(row[out[j]] - row[best]) < 1e-5);
    }
    free(logP);
    moe_infer_decoder_destroy(dec);
    moe_model_destroy(m);
}

/* Evaluation: the exact loss whatever K, the coverage at K, the loads. */
static void test_eval(void **state)
{
    (void)state;
    moe_model *m = make_model(2, 2);
    enum { N = 5 * S + 1 };
    int32_t ids[N];
    random_ids(ids, N, 4);
    moe_infer_eval_result r2, r8;
    assert_int_equal(moe_infer_eval(&r2, m, moe_comm_self(), ids, NULL, NULL, N, 0, 2), MOE_OK);
    assert_int_equal(moe_model_set_vocab_top_k(m, M), MOE_OK);
    assert_int_equal(moe_infer_eval(&r8, m, moe_comm_self(), ids, NULL, NULL, N, 0, 2), MOE_OK);
    assert_true(r2.loss == r8.loss && r2.vocab_experts == M && r2.vocab_top_k == 2 && r8.vocab_top_k == M);
    assert_true(r8.vocab_coverage == 1.0 && r2.vocab_coverage < 1.0 && r2.vocab_coverage > 0);
    assert_true(fabs(r8.vocab_kept_mass - 1) < 1e-6 && r2.vocab_kept_mass < 1);
    int64_t targets = 0, covered = 0;
    for (int e = 0; e < M; e++) targets += r2.vocab_tokens[e];
    for (int k = 0; k < 2; k++) covered += r2.vocab_rank_hist[k];
    assert_int_equal(targets, r2.tokens);
    assert_true(fabs((double)covered / r2.tokens - r2.vocab_coverage) < 1e-12);
    /* the same loss as the training path's, window by window */
    double sum = 0;
    for (int w = 0; w < 5; w++) {
        assert_int_equal(moe_model_forward(m, ids + w * S, ids + w * S + 1, 1, S, 0, 0), MOE_OK);
        for (int t = 0; t < S; t++) sum += moe_model_losses(m)[t];
    }
    assert_true(fabs(sum / (5 * S) - r2.loss) < 1e-6 * r2.loss);
    moe_infer_eval_result_free(&r2);
    moe_infer_eval_result_free(&r8);
    moe_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topk_is_exact_model),
        cmocka_unit_test(test_greedy_is_exact_argmax),
        cmocka_unit_test(test_eval),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
