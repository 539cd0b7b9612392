/* Inference (single process): the key/value-cache decoder against the full
 * forward, the documented routing of a decoding step, greedy generation
 * (with context sliding) against argmax of the full forward, evaluation
 * against the model's own loss, sampling rules and argument errors. */
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

enum { S = 16, V = 256 };

/* A small model with blocks 0 and 2 MoE, block 1 dense. cf: "0" dropless
 * token choice; router "expert_choice" uses its default c = 2. opts: more
 * "key", "value" pairs, NULL-terminated (or NULL). */
static moe_model *make_model_opts(const char *router, const char *cf, const char *act, int max_seqs,
                                  const char *const *opts)
{
    moe_train_config c;
    tl_config_small(&c, 3, S, 4);
    c.moe_every = 2;
    assert_int_equal(moe_train_config_set(&c, "router", router), MOE_OK);
    assert_int_equal(moe_train_config_set(&c, "activation", act), MOE_OK);
    if (cf) assert_int_equal(moe_train_config_set(&c, "capacity_factor", cf), MOE_OK);
    for (int i = 0; opts && opts[i]; i += 2) assert_int_equal(moe_train_config_set(&c, opts[i], opts[i + 1]), MOE_OK);
    moe_model *m = NULL;
    assert_int_equal(moe_model_create(&m, &c, NULL, max_seqs, moe_comm_self()), MOE_OK);
    /* weights far from the 0.02 init, so the logits are O(1) and every layer
     * matters (LayerNorm gains included) */
    const moe_tensor_table *t = moe_model_tensors(m);
    float *p = moe_model_params(m);
    for (size_t i = 0; i < t->total; i++) p[i] = (float)(0.3 * moe_rng_normal(7, MOE_RNG_BENCH, (uint32_t)i, 0, 0, 0));
    return m;
}

static moe_model *make_model(const char *router, const char *cf, const char *act, int max_seqs)
{
    return make_model_opts(router, cf, act, max_seqs, NULL);
}

/* n random ids in [0, V) */
static void random_ids(int32_t *x, int n, uint32_t salt)
{
    for (int i = 0; i < n; i++) x[i] = (int32_t)(V * moe_rng_uniform(3, MOE_RNG_DATA, (uint32_t)i, salt, 0, 0));
}

/* max |a - b| / max(1, |b|) over n entries */
static double rel_err(const float *a, const float *b, int n)
{
    double e = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i]));
        e = d > e ? d : e;
    }
    return e;
}

/* Logits of the last position of the full forward (train = 0) on x (T). */
static const float *full_last(moe_model *m, const int32_t *x, int T)
{
    assert_int_equal(moe_model_forward(m, x, NULL, 1, T, 0, 0), MOE_OK);
    return moe_model_logits(m) + (size_t)(T - 1) * V;
}

/* Dropless token choice: routing does not depend on the group, so every
 * decoded position must equal the full forward of its prefix. Three
 * sequences: uneven prefills, then steps of one token per sequence. */
static const char *const llama_opts[] = {
    "norm", "rmsnorm", "pos", "rope", "rope_theta", "300", "n_heads", "4", "n_kv_heads", "1", "head_dim", "12",
    "qk_norm", "full", "linear_bias", "0", "attn_bias", "1", "tie_embeddings", "0", NULL};
static const char *const deepseek_opts[] = {
    "pos", "rope", "n_heads", "4", "n_kv_heads", "2", "qk_norm", "head", "score", "sigmoid", "route_scale", "2",
    "expert_bias", "1", "n_groups", "2", "topk_groups", "1", "n_shared", "2", "d_ff_shared", "20",
    "shared_gate", "1", NULL};

static void test_decode_matches_forward(void **state)
{
    (void)state;
    /* GPT-2 blocks with two activations, then the architecture options:
     * RoPE positions, the grouped kv cache and the q/k norms must give the
     * full forward's logits at every position */
    const char *acts[] = {"gelu", "swiglu", "swiglu", "relu"};
    const char *const *opts[] = {NULL, NULL, llama_opts, deepseek_opts};
    for (int a = 0; a < 4; a++) {
        moe_model *m = make_model_opts("token_choice", "0", acts[a], 3, opts[a]);
        /* the options are in force: their tensors exist, wpe does not */
        assert_true((moe_model_param(m, MOE_T_LM_HEAD, -1) != NULL) == (a == 2));
        assert_true((moe_model_param(m, MOE_T_SH_GATE, 0) != NULL) == (a == 3));
        assert_true((moe_model_param(m, MOE_T_WPE, -1) == NULL) == (a >= 2));
        moe_infer_decoder *d = NULL;
        assert_int_equal(moe_infer_decoder_create(&d, m, 3), MOE_OK);
        int32_t text[3][S];
        for (int b = 0; b < 3; b++) random_ids(text[b], S, (uint32_t)b);
        float logits[S * V], expect[V];
        const int pre[3] = {5, 1, 9};
        int seq[S];
        double worst = 0;
        for (int b = 0; b < 3; b++) {
            for (int i = 0; i < pre[b]; i++) seq[i] = b;
            assert_int_equal(moe_infer_decode(d, logits, text[b], seq, pre[b]), MOE_OK);
            for (int i = 0; i < pre[b]; i++) {
                memcpy(expect, full_last(m, text[b], i + 1), sizeof expect);
                worst = fmax(worst, rel_err(logits + (size_t)i * V, expect, V));
            }
        }
        for (int step = 0;; step++) {
            int32_t tok[3];
            int n = 0;
            for (int b = 0; b < 3; b++)
                if (moe_infer_decoder_length(d, b) < S) {
                    seq[n] = b;
                    tok[n++] = text[b][moe_infer_decoder_length(d, b)];
                }
            if (!n) break;
            assert_int_equal(moe_infer_decode(d, logits, tok, seq, n), MOE_OK);
            for (int i = 0; i < n; i++) {
                const int len = moe_infer_decoder_length(d, seq[i]);
                memcpy(expect, full_last(m, text[seq[i]], len), sizeof expect);
                worst = fmax(worst, rel_err(logits + (size_t)i * V, expect, V));
            }
        }
        print_message("%s: worst relative logit error %.3g\n", acts[a], worst);
        assert_true(worst < 1e-5);
        for (int b = 0; b < 3; b++) assert_int_equal(moe_infer_decoder_length(d, b), S);
        moe_infer_decoder_destroy(d);
        moe_model_destroy(m);
    }
}

/* The bytes a decoding call reports (moe_infer_decoder_last_bytes), against
 * the parameter table: with expert choice one token goes to every expert,
 * so a call reads every tensor once except wpe (one row) and wte (one row
 * and all of it as the tied head); with top-2 token choice two of the E = 4
 * experts per MoE layer. Keys and values: 2 (K, V) x its position + 1 rows
 * of n_kv_heads x head_dim per layer. */
static void test_decode_bytes(void **state)
{
    (void)state;
    for (int tc = 0; tc < 2; tc++) {
        moe_model *m = make_model(tc ? "token_choice" : "expert_choice", tc ? "0" : NULL, "gelu", 2);
        const moe_tensor_table *t = moe_model_tensors(m);
        double expert_floats = 0, wpe = 0, C = 0;
        for (int i = 0; i < t->n; i++) {
            if (t->t[i].expert_sharded) expert_floats += (double)moe_tensor_row_numel(&t->t[i]);
            if (strstr(t->t[i].name, "wpe")) wpe = (double)t->t[i].shape[0] * t->t[i].shape[1], C = (double)t->t[i].shape[1];
        }
        assert_true(wpe > 0 && expert_floats > 0);
        moe_infer_decoder *d = NULL;
        assert_int_equal(moe_infer_decoder_create(&d, m, 2), MOE_OK);
        int32_t text[4];
        random_ids(text, 4, 9);
        float logits[4 * V];
        int seq[4] = {0, 0, 0, 0};
        assert_int_equal(moe_infer_decode(d, logits, text, seq, 3), MOE_OK); /* prefill 3 */
        assert_int_equal(moe_infer_decode(d, logits, text + 3, seq, 1), MOE_OK); /* position 3 */
        double pb, kb;
        moe_infer_decoder_last_bytes(d, &pb, &kb);
        const double expect = 4.0 * ((double)t->total - wpe + C + C - (tc ? 2.0 * expert_floats : 0.0));
        print_message("%s: %.0f parameter bytes (table %zu floats), %.0f key/value bytes\n",
                      tc ? "token choice" : "expert choice", pb, t->total, kb);
        assert_true(pb == expect);
        assert_true(kb == 4.0 * 2 * C * 4 * 3); /* K and V, positions 0..3, 3 layers (kv width = C here) */
        moe_infer_decoder_destroy(d);
        moe_model_destroy(m);
    }
}

/* Expert choice: a decoding step of B tokens is one group, so every expert
 * keeps exactly C = min(B, ceil(B c / E)) of them (c = 2, E = 4); a single
 * token goes to every expert, which is also what the full forward does on a
 * one-token sequence. Decoding is deterministic. */
static void test_decode_expert_choice(void **state)
{
    (void)state;
    moe_model *m = make_model("expert_choice", NULL, "gelu", 1);
    moe_infer_decoder *d = NULL;
    assert_int_equal(moe_infer_decoder_create(&d, m, 5), MOE_OK);
    int32_t tok[5];
    random_ids(tok, 5, 11);
    int seq[5] = {0, 1, 2, 3, 4};
    float first[5 * V], again[5 * V];
    for (int B = 1; B <= 5; B++) {
        for (int b = 0; b < 5; b++) moe_infer_decoder_reset(d, b);
        assert_int_equal(moe_infer_decode(d, first, tok, seq, B), MOE_OK);
        const moe_route *r = moe_layer_route(moe_model_layer(m, 0));
        const int C = B < (B * 2 + 3) / 4 ? B : (B * 2 + 3) / 4;
        for (int e = 0; e < 4; e++) {
            int kept = 0;
            for (int t = 0; t < B; t++) kept += r->kept[t * 4 + e];
            assert_int_equal(kept, C);
        }
        for (int b = 0; b < 5; b++) moe_infer_decoder_reset(d, b);
        assert_int_equal(moe_infer_decode(d, again, tok, seq, B), MOE_OK);
        assert_memory_equal(first, again, (size_t)B * V * sizeof(float));
    }
    for (int b = 0; b < 5; b++) moe_infer_decoder_reset(d, b);
    assert_int_equal(moe_infer_decode(d, first, tok, seq, 1), MOE_OK);
    assert_true(rel_err(first, full_last(m, tok, 1), V) < 1e-5);
    moe_infer_decoder_destroy(d);
    moe_model_destroy(m);
}

static void test_decode_errors(void **state)
{
    (void)state;
    moe_model *m = make_model("token_choice", "0", "gelu", 1);
    moe_infer_decoder *d = NULL;
    assert_int_equal(moe_infer_decoder_create(&d, m, 2), MOE_OK);
    int32_t tok[S + 1] = {0};
    int seq[S + 1] = {0};
    float logits[(S + 1) * V];
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 0), MOE_ERR_ARG);
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, S + 1), MOE_ERR_ARG);
    seq[0] = 2;
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "sequence 2"));
    seq[0] = 0;
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, S - 1), MOE_OK);
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 2), MOE_ERR_ARG); /* would pass seq_len */
    assert_non_null(strstr(moe_error_detail(), "seq_len"));
    assert_int_equal(moe_infer_decoder_length(d, 0), S - 1);                 /* unchanged */
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 1), MOE_OK);
    moe_infer_decoder_reset(d, 0);
    tok[1] = V; /* ids outside the vocabulary: refused, nothing changed */
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 2), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "token 1 has id 256"));
    tok[1] = -3;
    assert_int_equal(moe_infer_decode(d, logits, tok, seq, 2), MOE_ERR_ARG);
    assert_int_equal(moe_infer_decoder_length(d, 0), 0);
    assert_int_equal(moe_infer_decoder_create(&(moe_infer_decoder *){NULL}, m, 0), MOE_ERR_ARG);
    moe_infer_decoder_destroy(d);
    moe_model_destroy(m);
}

static int argmax(const float *x)
{
    int best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Greedy generation equals the argmax chain of the full forward over the
 * context the documented rules define: the prompt's last S bytes, and a
 * slide to the last S/2 bytes whenever the context would pass S. */
static void test_generate_greedy_slides(void **state)
{
    (void)state;
    moe_model *m = make_model("token_choice", "0", "gelu", 2);
    moe_infer_decoder *d = NULL;
    assert_int_equal(moe_infer_decoder_create(&d, m, 2), MOE_OK);
    int32_t p0[20], p1[3];
    random_ids(p0, 20, 21);
    random_ids(p1, 3, 22);
    const int32_t *prompts[2] = {p0, p1};
    const size_t len[2] = {20, 3};
    enum { N = 40 };
    int32_t out[2 * N];
    moe_infer_sampler greedy = {.temperature = 0, .top_p = 1, .seed = 5};
    moe_infer_gen_stats gs;
    assert_int_equal(moe_infer_generate(out, &gs, d, moe_comm_self(), prompts, len, 2, N, &greedy, NULL), MOE_OK);
    assert_true(gs.slides >= 4);
    assert_int_equal(gs.prefill_tokens, S + 3);
    for (int b = 0; b < 2; b++) {
        int32_t ctx[S + 1];
        int n = len[b] < S ? (int)len[b] : S;
        memcpy(ctx, prompts[b] + len[b] - n, (size_t)n * sizeof(int32_t));
        for (int j = 0; j < N; j++) {
            assert_int_equal(out[b * N + j], argmax(full_last(m, ctx, n)));
            ctx[n++] = out[b * N + j];
            if (n > S) {
                memmove(ctx, ctx + n - S / 2, S / 2 * sizeof(int32_t));
                n = S / 2;
            }
        }
    }
    /* sampling is deterministic in the seed */
    moe_infer_sampler s = {.temperature = 1, .top_k = 40, .top_p = 0.95, .seed = 9};
    int32_t a[2 * N], b2[2 * N];
    assert_int_equal(moe_infer_generate(a, NULL, d, moe_comm_self(), prompts, len, 2, N, &s, NULL), MOE_OK);
    assert_int_equal(moe_infer_generate(b2, NULL, d, moe_comm_self(), prompts, len, 2, N, &s, NULL), MOE_OK);
    assert_memory_equal(a, b2, sizeof a);
    s.seed = 10;
    assert_int_equal(moe_infer_generate(b2, NULL, d, moe_comm_self(), prompts, len, 2, N, &s, NULL), MOE_OK);
    assert_memory_not_equal(a, b2, sizeof a);
    /* argument errors */
    assert_int_equal(moe_infer_generate(a, NULL, d, moe_comm_self(), prompts, len, 3, N, &s, NULL), MOE_ERR_ARG);
    assert_int_equal(moe_infer_generate(a, NULL, d, moe_comm_self(), prompts, len, 2, -1, &s, NULL), MOE_ERR_ARG);
    s.top_p = 0;
    assert_int_equal(moe_infer_generate(a, NULL, d, moe_comm_self(), prompts, len, 2, N, &s, NULL), MOE_ERR_ARG);
    moe_infer_decoder_destroy(d);
    moe_model_destroy(m);
}

/* moe_infer_eval (batches of 3 windows, the last one padded) against the
 * model's own loss on all windows at once; domain counts add up. */
static void test_eval_matches_model(void **state)
{
    (void)state;
    enum { W = 7, NB = W * S + 5 }; /* 7 full windows and a few spare bytes */
    moe_model *m = make_model("token_choice", "0", "gelu", W);
    int32_t data[NB], in[W * S], tg[W * S], nbytes[V];
    uint8_t dom[NB];
    random_ids(data, NB, 31);
    for (int i = 0; i < NB; i++) dom[i] = (uint8_t)(i / 20 % 3);
    for (int w = 0; w < W; w++) {
        memcpy(in + w * S, data + w * S, S * sizeof(int32_t));
        memcpy(tg + w * S, data + w * S + 1, S * sizeof(int32_t));
    }
    assert_int_equal(moe_model_forward(m, in, tg, W, S, 0, 0), MOE_OK);
    moe_model_stats st;
    assert_int_equal(moe_model_reduce_stats(m, &st), MOE_OK);
    moe_infer_eval_result r;
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, NULL, dom, NB, 3, 3), MOE_OK);
    assert_int_equal(r.windows, W);
    assert_int_equal(r.tokens, W * S);
    assert_int_equal(r.bytes, W * S); /* one byte per token */
    print_message("eval %.9f model %.9f\n", r.loss, st.ce);
    assert_true(fabs(r.loss - st.ce) < 1e-6 * st.ce);
    assert_true(r.bpb == r.loss_sum / (double)r.tokens / M_LN2);
    /* dropless top-2: every token has 2 kept assignments in each MoE layer */
    for (int l = 0; l < r.n_moe; l++) {
        int64_t total = 0;
        for (int k = 0; k < 3 * 4; k++) total += r.domain_kept[(size_t)l * 12 + k];
        assert_int_equal(total, 2 * W * S);
    }
    moe_infer_eval_result_free(&r);
    /* bytes per id: the targets' bytes, and the same loss */
    int64_t bytes = 0;
    for (int i = 0; i < V; i++) nbytes[i] = 1 + i % 5;
    for (int i = 1; i <= W * S; i++) bytes += nbytes[data[i]];
    const double loss = r.loss;
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, nbytes, NULL, NB, 3, 3), MOE_OK);
    assert_int_equal(r.bytes, bytes);
    assert_true(r.loss == loss);
    assert_true(fabs(r.bpb - r.loss_sum / (double)bytes / M_LN2) < 1e-12 * r.bpb);
    /* bad inputs */
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, NULL, NULL, S, 3, 3), MOE_ERR_ARG);
    dom[50] = 3;
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, NULL, dom, NB, 3, 3), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "token 50"));
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, NULL, NULL, NB, 3, 0), MOE_ERR_ARG);
    data[70] = V;
    assert_int_equal(moe_infer_eval(&r, m, moe_comm_self(), data, NULL, NULL, NB, 3, 3), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "token 70 has id 256"));
    moe_model_destroy(m);
}

static void test_sampler(void **state)
{
    (void)state;
    float logits[V];
    for (int i = 0; i < V; i++) logits[i] = -30.0f;
    /* p = 0.4, 0.3, 0.2, 0.1 on bytes 7, 3, 200, 9 (the rest ~1e-13) */
    const int ids[4] = {7, 3, 200, 9};
    const double p[4] = {0.4, 0.3, 0.2, 0.1};
    for (int i = 0; i < 4; i++) logits[ids[i]] = (float)log(p[i]);
    int32_t id = -1;
    moe_infer_sampler s = {.temperature = 0, .top_p = 1, .seed = 1};
    assert_int_equal(moe_infer_sample(&id, &s, logits, V, 0, 0, NULL), MOE_OK);
    assert_int_equal(id, 7);
    /* frequencies over positions follow the (cut) distribution */
    struct { int top_k; double top_p; double want[4]; } cases[] = {
        {0, 1.0, {0.4, 0.3, 0.2, 0.1}},
        {2, 1.0, {4.0 / 7, 3.0 / 7, 0, 0}},
        {0, 0.5, {4.0 / 7, 3.0 / 7, 0, 0}},   /* 0.4 < 0.5 <= 0.7 */
        {0, 0.75, {4.0 / 9, 3.0 / 9, 2.0 / 9, 0}},
        {1, 1.0, {1, 0, 0, 0}},
    };
    enum { DRAWS = 20000 };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        s = (moe_infer_sampler){.temperature = 1, .top_k = cases[c].top_k, .top_p = cases[c].top_p, .seed = 42};
        int count[4] = {0}, other = 0;
        for (int j = 0; j < DRAWS; j++) {
            assert_int_equal(moe_infer_sample(&id, &s, logits, V, (uint32_t)j, 3, NULL), MOE_OK);
            int k = 0;
            while (k < 4 && ids[k] != id) k++;
            if (k == 4) other++;
            else count[k]++;
        }
        assert_int_equal(other, 0);
        for (int k = 0; k < 4; k++) assert_true(fabs((double)count[k] / DRAWS - cases[c].want[k]) < 0.015);
    }
    /* temperature 2 flattens: p ~ sqrt(p) */
    s = (moe_infer_sampler){.temperature = 2, .top_k = 4, .top_p = 1, .seed = 3};
    double z = 0;
    for (int k = 0; k < 4; k++) z += sqrt(p[k]);
    int first = 0;
    for (int j = 0; j < DRAWS; j++) {
        assert_int_equal(moe_infer_sample(&id, &s, logits, V, (uint32_t)j, 0, NULL), MOE_OK);
        first += id == 7;
    }
    assert_true(fabs((double)first / DRAWS - sqrt(0.4) / z) < 0.015);
    /* ties: lower id first, for greedy */
    for (int i = 0; i < V; i++) logits[i] = 0;
    logits[100] = logits[50] = 1;
    s = (moe_infer_sampler){.temperature = 0, .top_p = 1};
    assert_int_equal(moe_infer_sample(&id, &s, logits, V, 0, 0, NULL), MOE_OK);
    assert_int_equal(id, 50);
    /* errors */
    const moe_infer_sampler bad[] = {{.temperature = -1, .top_p = 1}, {.temperature = NAN, .top_p = 1},
                                     {.temperature = 1, .top_p = 0}, {.temperature = 1, .top_p = 1.5},
                                     {.temperature = 1, .top_k = -1, .top_p = 1}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) assert_int_equal(moe_infer_sampler_check(&bad[i]), MOE_ERR_ARG);
    logits[3] = NAN;
    assert_int_equal(moe_infer_sample(&id, &s, logits, V, 0, 0, NULL), MOE_ERR_NONFINITE);
}

/* The fast sampler (partial selection, a sorted prefix grown in chunks)
 * picks exactly what the full sort of moe_infer_sample_ref picks: peaked,
 * flat and tied logits, vocabularies from 1 to 200k, every kind of cut. */
static void test_sampler_matches_ref(void **state)
{
    (void)state;
    const int sizes[] = {1, 2, 7, 256, 1000, 4096, 50257, 200019};
    enum { MAXV = 200019 };
    float *logits = malloc(sizeof(float) * MAXV);
    void *scratch = malloc(moe_infer_sample_scratch_bytes(MAXV));
    const struct { double temp; int top_k; double top_p; } cuts[] = {
        {0, 0, 1},    {1, 0, 1},     {1, 40, 1},  {0.7, 0, 0.9}, {1, 0, 0.999}, {1.3, 100, 0.5},
        {1, 1, 1},    {2, 5000, 1},  {1, 0, 1e-9}, {0.5, 3, 0.95},
    };
    int checked = 0;
    for (size_t a = 0; a < sizeof sizes / sizeof sizes[0]; a++) {
        const int n = sizes[a];
        for (int shape = 0; shape < 3; shape++) {
            for (int i = 0; i < n; i++) {
                const double u = moe_rng_uniform(17, MOE_RNG_BENCH, (uint32_t)i, (uint32_t)shape, (uint32_t)n, 0);
                /* 0: peaked (a few large logits), 1: flat, 2: only 8 distinct values (ties) */
                logits[i] = shape == 0 ? (float)(12.0 * pow(u, 30.0) + 0.1 * u)
                          : shape == 1 ? (float)(0.01 * u)
                                       : (float)(int)(8.0 * u);
            }
            for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++)
                for (uint32_t pos = 0; pos < (n > 5000 ? 3u : 12u); pos++) {
                    const moe_infer_sampler s = {.temperature = cuts[c].temp, .top_k = cuts[c].top_k,
                                                 .top_p = cuts[c].top_p, .seed = 11};
                    int32_t fast = -1, ref = -2;
                    assert_int_equal(moe_infer_sample(&fast, &s, logits, n, pos, 1, scratch), MOE_OK);
                    assert_int_equal(moe_infer_sample_ref(&ref, &s, logits, n, pos, 1), MOE_OK);
                    assert_int_equal(fast, ref);
                    assert_true(fast >= 0 && fast < n);
                    checked++;
                }
        }
    }
    print_message("%d draws equal to the reference\n", checked);
    int32_t id;
    const moe_infer_sampler s = {.temperature = 1, .top_p = 1};
    assert_int_equal(moe_infer_sample(&id, &s, logits, 0, 0, 0, scratch), MOE_ERR_ARG);
    free(logits);
    free(scratch);
}

static void test_config_text(void **state)
{
    (void)state;
    moe_train_config a, b;
    moe_train_config_default(&a);
    assert_int_equal(moe_train_config_set(&a, "router", "expert_choice"), MOE_OK);
    assert_int_equal(moe_train_config_set(&a, "d_model", "48"), MOE_OK);
    char text[16384];
    assert_true(moe_train_config_format(&a, text, sizeof text) < (int)sizeof text);
    moe_train_config_default(&b);
    assert_int_equal(moe_train_config_load_text(&b, text, "ckpt:config"), MOE_OK);
    char again[16384];
    moe_train_config_format(&b, again, sizeof again);
    assert_string_equal(text, again);
    assert_int_equal(b.capacity_factor, 2.0);
    moe_train_config_default(&b);
    assert_int_equal(moe_train_config_load_text(&b, "[model]\nd_model = 64\nbogus = 1\n", "x.h5:config"), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "x.h5:config:3"));
    assert_int_equal(b.d_model, 64);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_matches_forward), cmocka_unit_test(test_decode_expert_choice),
        cmocka_unit_test(test_decode_bytes),
        cmocka_unit_test(test_decode_errors),          cmocka_unit_test(test_generate_greedy_slides),
        cmocka_unit_test(test_eval_matches_model),     cmocka_unit_test(test_sampler),
        cmocka_unit_test(test_sampler_matches_ref),    cmocka_unit_test(test_config_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
