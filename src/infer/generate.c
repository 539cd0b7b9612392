/* Autoregressive generation for a batch of prompts (moe_infer_generate):
 * one prefill pass per prompt, then one decoding step per token for all
 * sequences together, sliding the context of a sequence whose cache is full.
 * The decoder gives each step's distributions as candidate lists (all ids
 * for the full head, the top-K lists of the vocabulary experts); the sampler
 * walks a row's candidates as it would the dense vector. Rank 0 samples; the
 * ids are broadcast so every rank decodes the same. */
#include "infer/infer.h"

#include <string.h>

enum { MAX_SEQS = 256 };

typedef struct {
    moe_infer_decoder *d;
    int n, S, V, cap;   /* sequences, seq_len, vocabulary, context capacity per sequence */
    int32_t *ctx;       /* (n, cap) context ids of each sequence (the model's view) */
    int *ctx_len;       /* (n) */
    moe_infer_dist dist; /* (max_tokens rows) of the last decode call */
    moe_infer_dist cur;  /* (n rows) of each sequence's newest token */
    uint8_t *want;      /* (max_tokens) the rows a decode call needs */
    int *seq;           /* (max_tokens) sequence of each token of a decode call */
    int32_t *tok;       /* (max_tokens) tokens of a decode call */
    void *scratch;      /* the sampler's (rank 0) */
    int64_t prefilled;  /* tokens through prefill passes */
} gen_state;

/* cur row b = dist row i. */
static void keep_row(gen_state *g, int b, int i)
{
    const int64_t st = g->dist.stride;
    const int32_t c = g->dist.count[i];
    memcpy(g->cur.logp + (size_t)b * st, g->dist.logp + (size_t)i * st, (size_t)c * sizeof(float));
    if (!g->dist.dense) memcpy(g->cur.ids + (size_t)b * st, g->dist.ids + (size_t)i * st, (size_t)c * sizeof(int32_t));
    g->cur.count[b] = c;
    g->cur.dense = g->dist.dense;
}

/* Resets sequence b and runs its last k context tokens through the decoder
 * in one call; the distribution of the last one becomes cur[b]. Collective. */
static moe_status prefill(gen_state *g, int b, int k)
{
    moe_infer_decoder_reset(g->d, b);
    for (int i = 0; i < k; i++) g->seq[i] = b, g->want[i] = i == k - 1;
    moe_status st = moe_infer_decode_dist(g->d, &g->dist, g->ctx + (size_t)b * g->cap + g->ctx_len[b] - k, g->seq,
                                          k, g->want);
    if (st) return st;
    keep_row(g, b, k - 1);
    g->prefilled += k;
    return MOE_OK;
}

/* Rank 0 draws the next token of every sequence; every rank receives them
 * (and rank 0's status, so a sampling failure ends every rank together). */
static moe_status sample_step(gen_state *g, int32_t *next, moe_comm *comm, const moe_infer_sampler *s,
                              const uint32_t *position)
{
    const int rank = moe_comm_rank(comm);
    int32_t msg[1 + MAX_SEQS];
    int32_t *ids = msg + 1;
    msg[0] = MOE_OK;
    const int64_t stride = g->cur.stride;
    for (int b = 0; rank == 0 && b < g->n && msg[0] == MOE_OK; b++) {
        msg[0] = (int32_t)moe_infer_sample(&ids[b], s, g->cur.logp + (size_t)b * stride, g->cur.count[b],
                                           position[b], (uint32_t)b, g->scratch);
        if (!g->cur.dense) ids[b] = g->cur.ids[(size_t)b * stride + ids[b]]; /* candidate -> token id */
    }
    /* (the batch fits the message: n <= MAX_SEQS is checked by the caller) */
    moe_status st = moe_comm_bcast(comm, msg, (size_t)(1 + g->n) * sizeof(int32_t), 0);
    if (st) return st;
    if (msg[0] != MOE_OK)
        return rank == 0 ? (moe_status)msg[0] : moe_errorf(MOE_ERR_REMOTE, "rank 0: sampling failed");
    memcpy(next, ids, (size_t)g->n * sizeof(int32_t));
    return MOE_OK;
}

static void gen_free(gen_state *g)
{
    moe_free(g->ctx);
    moe_free(g->ctx_len);
    moe_free(g->dist.logp), moe_free(g->dist.ids), moe_free(g->dist.count);
    moe_free(g->cur.logp), moe_free(g->cur.ids), moe_free(g->cur.count);
    moe_free(g->want);
    moe_free(g->seq);
    moe_free(g->tok);
    moe_free(g->scratch);
}

/* The loop; g is allocated. */
static moe_status run(gen_state *g, int32_t *out, moe_infer_gen_stats *stats, moe_comm *comm,
                      const int32_t *const *prompts, const size_t *len, int tokens, const moe_infer_sampler *s,
                      const moe_infer_gen_hooks *hooks)
{
    const int n = g->n, S = g->S, keep = S / 2 > 1 ? S / 2 : 1;
    uint32_t position[MAX_SEQS];
    int32_t next[MAX_SEQS];
    double t0 = moe_now();
    for (int b = 0; b < n; b++) {
        int32_t *c = g->ctx + (size_t)b * g->cap;
        if (len[b] == 0) {
            c[0] = hooks ? hooks->empty_prompt : '\n';
            g->ctx_len[b] = 1;
        } else {
            const size_t k = len[b] < (size_t)S ? len[b] : (size_t)S;
            memcpy(c, prompts[b] + len[b] - k, k * sizeof(int32_t));
            g->ctx_len[b] = (int)k;
        }
        position[b] = (uint32_t)(len[b] > 0 ? len[b] : 1);
        moe_status st = prefill(g, b, g->ctx_len[b]);
        if (st) return st;
    }
    double t1 = moe_now();
    int64_t decoded = 0, slides = 0, steps = 0;
    double param_bytes = 0, kv_bytes = 0;
    for (int t = 0; t < tokens; t++) {
        moe_status st = sample_step(g, next, comm, s, position);
        if (st) return st;
        for (int b = 0; b < n; b++) {
            out[(size_t)b * tokens + t] = next[b];
            g->ctx[(size_t)b * g->cap + g->ctx_len[b]++] = next[b];
            position[b]++;
        }
        if (hooks && hooks->on_step) hooks->on_step(hooks->ctx, t, next, n);
        if (t == tokens - 1) break; /* the last token needs no logits */
        /* sequences with room take their new token in one decoding step ... */
        int m = 0;
        for (int b = 0; b < n; b++)
            if (moe_infer_decoder_length(g->d, b) < S) {
                g->seq[m] = b;
                g->tok[m++] = next[b];
            }
        if (m > 0) {
            if ((st = moe_infer_decode_dist(g->d, &g->dist, g->tok, g->seq, m, NULL))) return st;
            for (int i = 0; i < m; i++) keep_row(g, g->seq[i], i);
            decoded += m;
            double pb, kb;
            moe_infer_decoder_last_bytes(g->d, &pb, &kb);
            param_bytes += pb;
            kv_bytes += kb;
            steps++;
        }
        /* ... the others slide: the same decision on every rank (lengths only) */
        for (int b = 0; b < n; b++) {
            if (moe_infer_decoder_length(g->d, b) < S) continue;
            int32_t *c = g->ctx + (size_t)b * g->cap;
            memmove(c, c + g->ctx_len[b] - keep, (size_t)keep * sizeof(int32_t));
            g->ctx_len[b] = keep;
            if ((st = prefill(g, b, keep))) return st;
            slides++;
        }
    }
    if (stats) {
        stats->prefill_tokens = g->prefilled - slides * keep;
        stats->decode_tokens = decoded;
        stats->slides = slides;
        stats->prefill_s = t1 - t0;
        stats->decode_s = moe_now() - t1;
        stats->decode_steps = steps;
        stats->decode_param_bytes = param_bytes;
        stats->decode_kv_bytes = kv_bytes;
    }
    return MOE_OK;
}

moe_status moe_infer_generate(int32_t *out, moe_infer_gen_stats *stats, moe_infer_decoder *d, moe_comm *comm,
                              const int32_t *const *prompts, const size_t *len, int n, int tokens,
                              const moe_infer_sampler *s, const moe_infer_gen_hooks *hooks)
{
    if (stats) memset(stats, 0, sizeof *stats);
    const int max_seqs = moe_infer_decoder_max_seqs(d), V = moe_infer_decoder_vocab_size(d);
    if (n < 1 || n > max_seqs || n > MAX_SEQS)
        return moe_errorf(MOE_ERR_ARG, "generate: %d prompts outside 1..%d", n,
                          max_seqs < MAX_SEQS ? max_seqs : MAX_SEQS);
    if (tokens < 0) return moe_errorf(MOE_ERR_ARG, "generate: tokens=%d must be >= 0", tokens);
    for (int b = 0; b < n; b++)
        for (size_t i = 0; i < len[b]; i++)
            if (prompts[b][i] < 0 || prompts[b][i] >= V)
                return moe_errorf(MOE_ERR_ARG, "generate: prompt %d has id %ld at token %zu, outside the vocabulary "
                                               "[0, %d)", b, (long)prompts[b][i], i, V);
    if (hooks && (hooks->empty_prompt < 0 || hooks->empty_prompt >= V))
        return moe_errorf(MOE_ERR_ARG, "generate: the empty-prompt id %ld is outside the vocabulary [0, %d)",
                          (long)hooks->empty_prompt, V);
    moe_status st = moe_infer_sampler_check(s);
    if (st || tokens == 0) return st;
    const int S = moe_infer_decoder_seq_len(d), nt = moe_infer_decoder_max_tokens(d);
    /* a context never exceeds S tokens before it slides, plus the token that triggers it */
    gen_state g = {.d = d, .n = n, .S = S, .V = V, .cap = S + 1};
    const int64_t stride = moe_infer_decoder_dist_stride(d);
    const int dense = stride == V && !moe_model_vocab(moe_infer_decoder_model(d));
    g.ctx = moe_calloc((size_t)n * g.cap, sizeof(int32_t));
    g.ctx_len = moe_calloc((size_t)n, sizeof(int));
    g.dist = (moe_infer_dist){moe_calloc((size_t)nt * stride, sizeof(float)),
                              dense ? NULL : moe_calloc((size_t)nt * stride, sizeof(int32_t)),
                              moe_calloc((size_t)nt, sizeof(int32_t)), stride, dense};
    g.cur = (moe_infer_dist){moe_calloc((size_t)n * stride, sizeof(float)),
                             dense ? NULL : moe_calloc((size_t)n * stride, sizeof(int32_t)),
                             moe_calloc((size_t)n, sizeof(int32_t)), stride, dense};
    g.want = moe_calloc((size_t)nt, 1);
    g.seq = moe_calloc((size_t)nt, sizeof(int));
    g.tok = moe_calloc((size_t)nt, sizeof(int32_t));
    if (moe_comm_rank(comm) == 0) g.scratch = moe_calloc(moe_infer_sample_scratch_bytes((int)stride), 1);
    st = g.ctx && g.ctx_len && g.dist.logp && (dense || g.dist.ids) && g.dist.count && g.cur.logp &&
                 (dense || g.cur.ids) && g.cur.count && g.want && g.seq && g.tok &&
                 (g.scratch || moe_comm_rank(comm) != 0)
             ? MOE_OK
             : moe_errorf(MOE_ERR_NOMEM, "generate buffers");
    /* allocation is local: agree before the first collective decode */
    st = moe_comm_agree(comm, st);
    if (!st) st = run(&g, out, stats, comm, prompts, len, tokens, s, hooks);
    gen_free(&g);
    return st;
}
