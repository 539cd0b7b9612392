/* Benchmark and study (not a test): the whole model with the
 * vocabulary-expert head against the same model with the full softmax head,
 * on real English text encoded with the gpt2 tokenizer (V = 50257,
 * bench/vocab_corpus.sh). The model: d_model 256, 4 layers (MoE FFN in
 * blocks 0 and 2: E = 8 experts, top-2), seq_len 128, 16 sequences per step,
 * one process (the library calls `moe train`, `moe eval` and
 * `moe generate` make: moe_trainer_step, moe_infer_eval,
 * moe_infer_generate).
 *
 *   speed: training tokens/s of both heads (M vocabulary experts) in
 *     alternating rounds of a few steps each (after a warm-up step per
 *     round), and generation tokens/s at batch 1 and at --gen-batch with
 *     K = --K, alternating too; medians, PERF lines.
 *   train: one run of the quality study: train --head (full, or M experts)
 *     with --seed for --steps steps on the training tokens, then the exact
 *     validation loss per token and in bits per byte, the top-K coverage
 *     and kept router mass at K = 1, 2, 4, 8, and the batch-1 generation
 *     tokens/s at each K (the full head: once); one JSON line.
 *
 * Usage:
 *   vocab_model speed --data DIR [--M 64] [--K 2] [--rounds 5] [--steps 3] [--gen-batch 16]
 *                     [--gen-tokens 48] [--only train|gen] [--quick]
 *   vocab_model train --data DIR --head full|M --seed S [--steps 400] [--val-windows 200]
 * DIR holds train.tok, val.tok and gpt2.json (bench/vocab_corpus.sh). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "infer/infer.h"
#include "tokenizer/tokfile.h"
#include "train/train.h"

enum { D = 256, LAYERS = 4, SEQ = 128, BATCH = 16 };

static int die(const char *what, moe_status s)
{
    fprintf(stderr, "vocab_model: %s: %s: %s\n", what, moe_status_str(s), moe_error_detail());
    exit(1);
}

typedef struct {
    int32_t *ids;
    int64_t n;
} tokens;

static tokens load_tokens(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    moe_tok_file *f = NULL;
    moe_status st = moe_tok_file_open(&f, path, NULL);
    if (st) die(path, st);
    tokens t = {.n = moe_tok_file_n_tokens(f)};
    t.ids = malloc((size_t)t.n * sizeof *t.ids);
    for (int64_t i = 0; i < t.n; i++) t.ids[i] = (int32_t)moe_tok_file_get(f, i);
    moe_tok_file_close(f);
    return t;
}

static void config(moe_train_config *c, int M, int steps, uint32_t seed)
{
    moe_train_config_default(c);
    c->vocab_size = 50257;
    c->d_model = D;
    c->n_layers = LAYERS;
    c->n_heads = 4;
    c->seq_len = SEQ;
    c->n_experts = 8;
    c->top_k = 2;
    c->d_ff = 512;
    c->moe_every = 2;
    c->batch_size = BATCH;
    c->steps = steps;
    c->warmup_steps = steps / 10 > 1 ? steps / 10 : 1;
    c->lr = 2e-3;
    c->seed = seed;
    if (M) {
        c->head = MOE_HEAD_VOCAB_EXPERTS;
        c->vocab_experts = M;
        c->vocab_top_k = 2;
    }
}

/* Frequency bands of the training tokens (vocab_partition = frequency). */
static moe_vocab_part *partition(const tokens *tr, int V, int M)
{
    int64_t *counts = calloc((size_t)V, sizeof *counts);
    for (int64_t i = 0; i < tr->n; i++) counts[tr->ids[i]]++;
    int32_t *assign = malloc((size_t)V * sizeof *assign);
    moe_status st = moe_vocab_partition_frequency(assign, counts, V, M);
    if (st) die("partition", st);
    moe_vocab_part *p = NULL;
    if ((st = moe_vocab_part_create(&p, assign, V, M))) die("partition", st);
    free(counts);
    free(assign);
    return p;
}

static moe_trainer *trainer(const moe_train_config *c, const tokens *tr)
{
    moe_vocab_part *p = c->head == MOE_HEAD_VOCAB_EXPERTS ? partition(tr, c->vocab_size, c->vocab_experts) : NULL;
    moe_trainer *t = NULL;
    moe_status st = moe_trainer_create(&t, c, p, moe_comm_self());
    moe_vocab_part_destroy(p);
    if (st) die("trainer", st);
    return t;
}

/* The batch of step k: BATCH windows of SEQ + 1 tokens at counter-based starts. */
static void batch(int32_t *in, int32_t *tg, const tokens *tr, uint32_t seed, int64_t k)
{
    for (int s = 0; s < BATCH; s++) {
        const double u = moe_rng_uniform(seed, MOE_RNG_DATA, (uint32_t)s, (uint32_t)k, (uint32_t)(k >> 32), 7);
        const int64_t start = (int64_t)(u * (double)(tr->n - SEQ - 1));
        memcpy(in + (size_t)s * SEQ, tr->ids + start, SEQ * sizeof(int32_t));
        memcpy(tg + (size_t)s * SEQ, tr->ids + start + 1, SEQ * sizeof(int32_t));
    }
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Tokens/s of `steps` training steps (after one untimed step). */
static double train_rate(moe_trainer *t, const tokens *tr, int64_t *k, int steps)
{
    int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
    double secs = 0;
    for (int s = 0; s <= steps; s++, (*k)++) {
        batch(in, tg, tr, 1, *k);
        const double t0 = moe_now();
        moe_status st = moe_trainer_step(t, in, tg, *k % 1000, NULL);
        if (st) die("step", st);
        if (s > 0) secs += moe_now() - t0;
    }
    return (double)steps * BATCH * SEQ / secs;
}

/* Decoding tokens/s of n sequences generating `len` tokens each from prompts of the validation text. */
static double gen_rate(moe_infer_decoder *d, const tokens *val, int n, int len, uint32_t seed)
{
    const int32_t *prompts[256];
    size_t plen[256];
    for (int b = 0; b < n; b++) prompts[b] = val->ids + (size_t)b * 997 % (size_t)(val->n - 32), plen[b] = 16;
    int32_t *out = malloc((size_t)n * len * sizeof *out);
    moe_infer_sampler s = {.temperature = 1.0, .top_k = 0, .top_p = 1.0, .seed = seed};
    moe_infer_gen_stats gs;
    moe_status st = moe_infer_generate(out, &gs, d, moe_comm_self(), prompts, plen, n, len, &s, NULL);
    if (st) die("generate", st);
    free(out);
    return (double)gs.decode_tokens / gs.decode_s;
}

typedef struct {
    const char *data;
    int M, K, rounds, steps, gen_batch, gen_tokens, quick, head_M, val_windows;
    int only; /* 0: both, 1: training, 2: generation */
    uint32_t seed;
} opts;

static void speed(const opts *o, const tokens *tr, const tokens *val)
{
    moe_train_config cf, cv;
    config(&cf, 0, 1000, 1);
    config(&cv, o->M, 1000, 1);
    moe_trainer *tf = trainer(&cf, tr), *tv = trainer(&cv, tr);
    double *rf = calloc((size_t)o->rounds, sizeof(double)), *rv = calloc((size_t)o->rounds, sizeof(double));
    int64_t kf = 0, kv = 0;
    if (o->only != 2) printf("training, %d steps per round, %d rounds alternating (tokens/s):\n", o->steps, o->rounds);
    for (int r = 0; o->only != 2 && r < o->rounds; r++) {
        rf[r] = train_rate(tf, tr, &kf, o->steps);
        rv[r] = train_rate(tv, tr, &kv, o->steps);
        printf("  round %d: full %.0f  vocab experts (M = %d) %.0f  ratio %.2f\n", r, rf[r], o->M, rv[r],
               rv[r] / rf[r]);
        fflush(stdout);
    }
    const double mf = o->only == 2 ? 0 : median(rf, o->rounds), mv = o->only == 2 ? 0 : median(rv, o->rounds);
    /* generation, batch 1 and gen_batch, K experts */
    moe_model *mfm = moe_trainer_model(tf), *mvm = moe_trainer_model(tv);
    moe_status st = moe_model_set_vocab_top_k(mvm, o->K);
    if (st) die("vocab_top_k", st);
    const int bs[2] = {1, o->gen_batch};
    double gf[2], gv[2];
    for (int i = 0; o->only != 1 && i < 2; i++) {
        moe_infer_decoder *df = NULL, *dv = NULL;
        if ((st = moe_infer_decoder_create(&df, mfm, bs[i])) || (st = moe_infer_decoder_create(&dv, mvm, bs[i])))
            die("decoder", st);
        /* the full head both ways (one GEMM, as moe generate; one GEMV per
         * token for small batches): the faster is the baseline */
        double *a = calloc((size_t)o->rounds, sizeof(double)), *a2 = calloc((size_t)o->rounds, sizeof(double));
        double *b = calloc((size_t)o->rounds, sizeof(double));
        for (int r = 0; r < o->rounds; r++) {
            moe_infer_decoder_set_head_gemv(df, 0);
            a[r] = gen_rate(df, val, bs[i], o->gen_tokens, (uint32_t)r + 1);
            b[r] = gen_rate(dv, val, bs[i], o->gen_tokens, (uint32_t)r + 1);
            moe_infer_decoder_set_head_gemv(df, 1);
            a2[r] = gen_rate(df, val, bs[i], o->gen_tokens, (uint32_t)r + 1);
        }
        const double ga = median(a, o->rounds), ga2 = median(a2, o->rounds);
        gf[i] = ga > ga2 ? ga : ga2, gv[i] = median(b, o->rounds);
        printf("generation, batch %d, K = %d: full %.0f tokens/s (GEMM %.0f, GEMV per token %.0f), vocab experts "
               "%.0f tokens/s, ratio %.2f\n", bs[i], o->K, gf[i], ga, ga2, gv[i], gv[i] / gf[i]);
        free(a), free(a2), free(b);
        moe_infer_decoder_destroy(df);
        moe_infer_decoder_destroy(dv);
    }
    if (o->only != 2) {
        printf("PERF vocab_model.train_full %.0f tokens/s training tokens/s, full softmax head (V 50257, d 256, 4 layers, E 8)\n", mf);
        printf("PERF vocab_model.train_vocab %.0f tokens/s training tokens/s, vocabulary experts (M %d)\n", mv, o->M);
        printf("PERF_README vocab_model.train_speedup %.2f x training tokens/s, vocabulary experts (M %d) over the full head (V 50257)\n",
               mv / mf, o->M);
    }
    for (int i = 0; o->only != 1 && i < 2; i++) {
        printf("PERF vocab_model.gen_b%d_full %.0f tokens/s generation tokens/s, full head, batch %d\n", bs[i], gf[i], bs[i]);
        printf("PERF vocab_model.gen_b%d_vocab %.0f tokens/s generation tokens/s, vocabulary experts top-%d, batch %d\n",
               bs[i], gv[i], o->K, bs[i]);
        printf("PERF_README vocab_model.gen_b%d_speedup %.2f x generation tokens/s, top-%d vocabulary experts over the full head, batch %d\n",
               bs[i], gv[i] / gf[i], o->K, bs[i]);
    }
    free(rf), free(rv);
    moe_trainer_destroy(tf);
    moe_trainer_destroy(tv);
}

/* Bytes each id stands for (specials: their text). */
static int32_t *id_bytes(const char *dir, int V)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/gpt2.json", dir);
    moe_tok *t = NULL;
    moe_status st = moe_tok_load(&t, path, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL);
    if (st) die(path, st);
    int32_t *b = calloc((size_t)V, sizeof *b);
    for (int v = 0; v < V && v < moe_tok_vocab_size(t); v++) {
        size_t len = 0;
        if (moe_tok_token(t, v, &len)) b[v] = (int32_t)len;
    }
    moe_tok_destroy(t);
    return b;
}

static void study_run(const opts *o, const tokens *tr, const tokens *val)
{
    moe_train_config c;
    config(&c, o->head_M, o->steps, o->seed);
    moe_trainer *t = trainer(&c, tr);
    int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
    double train_s = 0, loss = 0;
    for (int64_t k = 0; k < o->steps; k++) {
        batch(in, tg, tr, o->seed, k);
        moe_train_stats st;
        const double t0 = moe_now();
        moe_status s = moe_trainer_step(t, in, tg, k, &st);
        if (s) die("step", s);
        train_s += moe_now() - t0;
        loss = st.model.ce;
        if (k % 50 == 0) fprintf(stderr, "vocab_model: %s M=%d seed %u step %lld loss %.4f\n",
                                 o->head_M ? "vocab" : "full", o->head_M, o->seed, (long long)k, loss);
    }
    moe_model *m = moe_trainer_model(t);
    const int64_t nv = (int64_t)o->val_windows * SEQ + 1 < val->n ? (int64_t)o->val_windows * SEQ + 1 : val->n;
    int32_t *bytes = id_bytes(o->data, c.vocab_size);
    printf("{\"head\": \"%s\", \"M\": %d, \"seed\": %u, \"steps\": %d, \"train_loss\": %.6f, \"train_tokens_per_s\": %.1f",
           o->head_M ? "vocab_experts" : "full", o->head_M, o->seed, o->steps, loss,
           (double)o->steps * BATCH * SEQ / train_s);
    const int Ks[4] = {1, 2, 4, 8};
    for (int i = 0; i < (o->head_M ? 4 : 1); i++) {
        if (o->head_M && Ks[i] > o->head_M) break;
        moe_status s = o->head_M ? moe_model_set_vocab_top_k(m, Ks[i]) : MOE_OK;
        moe_infer_eval_result r;
        if (!s) s = moe_infer_eval(&r, m, moe_comm_self(), val->ids, bytes, NULL, (size_t)nv, 0, BATCH);
        if (s) die("eval", s);
        if (i == 0) printf(", \"val_loss\": %.6f, \"val_bpb\": %.6f, \"val_tokens\": %lld", r.loss, r.bpb, (long long)r.tokens);
        moe_infer_decoder *d = NULL;
        if ((s = moe_infer_decoder_create(&d, m, 1))) die("decoder", s);
        const double g = gen_rate(d, val, 1, 48, 1);
        moe_infer_decoder_destroy(d);
        if (o->head_M)
            printf(", \"K%d\": {\"coverage\": %.6f, \"kept_mass\": %.6f, \"gen_b1_tokens_per_s\": %.1f}", Ks[i],
                   r.vocab_coverage, r.vocab_kept_mass, g);
        else
            printf(", \"gen_b1_tokens_per_s\": %.1f", g);
        moe_infer_eval_result_free(&r);
    }
    printf("}\n");
    free(bytes);
    moe_trainer_destroy(t);
}

int main(int argc, char **argv)
{
    opts o = {.M = 64, .K = 2, .rounds = 5, .steps = 3, .gen_batch = 16, .gen_tokens = 48, .head_M = -1,
              .val_windows = 200, .seed = 1};
    if (argc < 2) goto usage;
    const char *mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick")) {
            o.quick = 1;
            continue;
        }
        if (!v) goto usage;
        i++;
        if (!strcmp(a, "--data")) o.data = v;
        else if (!strcmp(a, "--M")) o.M = atoi(v);
        else if (!strcmp(a, "--K")) o.K = atoi(v);
        else if (!strcmp(a, "--rounds")) o.rounds = atoi(v);
        else if (!strcmp(a, "--steps")) o.steps = atoi(v);
        else if (!strcmp(a, "--gen-batch")) o.gen_batch = atoi(v);
        else if (!strcmp(a, "--gen-tokens")) o.gen_tokens = atoi(v);
        else if (!strcmp(a, "--head")) o.head_M = strcmp(v, "full") ? atoi(v) : 0;
        else if (!strcmp(a, "--seed")) o.seed = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--val-windows")) o.val_windows = atoi(v);
        else if (!strcmp(a, "--only")) o.only = !strcmp(v, "train") ? 1 : !strcmp(v, "gen") ? 2 : -1;
        else goto usage;
    }
    if (!o.data || o.only < 0) goto usage;
    if (o.quick) o.rounds = 1, o.steps = 1, o.gen_tokens = 8;
    tokens tr = load_tokens(o.data, "train.tok"), val = load_tokens(o.data, "val.tok");
    if (!strcmp(mode, "speed")) {
        speed(&o, &tr, &val);
    } else if (!strcmp(mode, "train") && o.head_M >= 0) {
        study_run(&o, &tr, &val);
    } else {
        goto usage;
    }
    free(tr.ids);
    free(val.ids);
    return 0;
usage:
    fprintf(stderr, "usage: vocab_model speed --data DIR [--M 64] [--K 2] [--rounds 5] [--steps 3] [--gen-batch 16] "
                    "[--gen-tokens 48] [--quick]\n       vocab_model train --data DIR --head full|M --seed S "
                    "[--steps 400] [--val-windows 200]\n");
    return 2;
}
