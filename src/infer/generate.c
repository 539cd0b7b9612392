/* Autoregressive generation for a batch of prompts (moe_infer_generate):
 * one prefill pass per prompt, then one decoding step per byte for all
 * sequences together, sliding the context of a sequence whose cache is full.
 * Rank 0 samples; the bytes are broadcast so every rank decodes the same. */
#include "infer/infer.h"

#include <string.h>

enum { V = 256 };

typedef struct {
    moe_infer_decoder *d;
    int n, S, cap;      /* sequences, seq_len, context capacity per sequence */
    uint8_t *ctx;       /* (n, cap) context bytes of each sequence (the model's view) */
    int *ctx_len;       /* (n) */
    float *logits;      /* (max_tokens, V) of the last decode call */
    float *cur;         /* (n, V) logits of each sequence's newest byte */
    int *seq;           /* (max_tokens) sequence of each token of a decode call */
    uint8_t *tok;       /* (max_tokens) tokens of a decode call */
    int64_t prefilled;  /* tokens through prefill passes */
} gen_state;

/* Resets sequence b and runs its last k context bytes through the decoder
 * in one call; the logits of the last one become cur[b]. Collective. */
static moe_status prefill(gen_state *g, int b, int k)
{
    moe_infer_decoder_reset(g->d, b);
    for (int i = 0; i < k; i++) g->seq[i] = b;
    moe_status st = moe_infer_decode(g->d, g->logits, g->ctx + (size_t)b * g->cap + g->ctx_len[b] - k, g->seq, k);
    if (st) return st;
    memcpy(g->cur + (size_t)b * V, g->logits + (size_t)(k - 1) * V, V * sizeof(float));
    g->prefilled += k;
    return MOE_OK;
}

/* Rank 0 draws the next byte of every sequence; every rank receives them
 * (and rank 0's status, so a sampling failure ends every rank together). */
static moe_status sample_step(gen_state *g, uint8_t *next, moe_comm *comm, const moe_infer_sampler *s,
                              const uint32_t *position)
{
    const int rank = moe_comm_rank(comm);
    int32_t msg[1 + 256];
    int32_t *ids = msg + 1;
    msg[0] = MOE_OK;
    for (int b = 0; rank == 0 && b < g->n && msg[0] == MOE_OK; b++) {
        int id = 0;
        msg[0] = (int32_t)moe_infer_sample(&id, s, g->cur + (size_t)b * V, position[b], (uint32_t)b);
        ids[b] = id;
    }
    /* (the batch fits the message: n <= 256 is checked by the caller) */
    moe_status st = moe_comm_bcast(comm, msg, (size_t)(1 + g->n) * sizeof(int32_t), 0);
    if (st) return st;
    if (msg[0] != MOE_OK)
        return rank == 0 ? (moe_status)msg[0] : moe_errorf(MOE_ERR_REMOTE, "rank 0: sampling failed");
    for (int b = 0; b < g->n; b++) next[b] = (uint8_t)ids[b];
    return MOE_OK;
}

static void gen_free(gen_state *g)
{
    moe_free(g->ctx);
    moe_free(g->ctx_len);
    moe_free(g->logits);
    moe_free(g->cur);
    moe_free(g->seq);
    moe_free(g->tok);
}

/* The loop; g is allocated. */
static moe_status run(gen_state *g, uint8_t *out, moe_infer_gen_stats *stats, moe_comm *comm,
                      const uint8_t *const *prompts, const size_t *len, int tokens, const moe_infer_sampler *s)
{
    const int n = g->n, S = g->S, keep = S / 2 > 1 ? S / 2 : 1;
    uint32_t position[256];
    uint8_t next[256];
    double t0 = moe_now();
    for (int b = 0; b < n; b++) {
        uint8_t *c = g->ctx + (size_t)b * g->cap;
        if (len[b] == 0) {
            c[0] = '\n';
            g->ctx_len[b] = 1;
        } else {
            const size_t k = len[b] < (size_t)S ? len[b] : (size_t)S;
            memcpy(c, prompts[b] + len[b] - k, k);
            g->ctx_len[b] = (int)k;
        }
        position[b] = (uint32_t)(len[b] > 0 ? len[b] : 1);
        moe_status st = prefill(g, b, g->ctx_len[b]);
        if (st) return st;
    }
    double t1 = moe_now();
    int64_t decoded = 0, slides = 0;
    for (int t = 0; t < tokens; t++) {
        moe_status st = sample_step(g, next, comm, s, position);
        if (st) return st;
        for (int b = 0; b < n; b++) {
            out[(size_t)b * tokens + t] = next[b];
            g->ctx[(size_t)b * g->cap + g->ctx_len[b]++] = next[b];
            position[b]++;
        }
        if (t == tokens - 1) break; /* the last byte needs no logits */
        /* sequences with room take their new byte in one decoding step ... */
        int m = 0;
        for (int b = 0; b < n; b++)
            if (moe_infer_decoder_length(g->d, b) < S) {
                g->seq[m] = b;
                g->tok[m++] = next[b];
            }
        if (m > 0) {
            if ((st = moe_infer_decode(g->d, g->logits, g->tok, g->seq, m))) return st;
            for (int i = 0; i < m; i++)
                memcpy(g->cur + (size_t)g->seq[i] * V, g->logits + (size_t)i * V, V * sizeof(float));
            decoded += m;
        }
        /* ... the others slide: the same decision on every rank (lengths only) */
        for (int b = 0; b < n; b++) {
            if (moe_infer_decoder_length(g->d, b) < S) continue;
            uint8_t *c = g->ctx + (size_t)b * g->cap;
            memmove(c, c + g->ctx_len[b] - keep, (size_t)keep);
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
    }
    return MOE_OK;
}

moe_status moe_infer_generate(uint8_t *out, moe_infer_gen_stats *stats, moe_infer_decoder *d, moe_comm *comm,
                              const uint8_t *const *prompts, const size_t *len, int n, int tokens,
                              const moe_infer_sampler *s)
{
    if (stats) memset(stats, 0, sizeof *stats);
    const int max_seqs = moe_infer_decoder_max_seqs(d);
    if (n < 1 || n > max_seqs || n > 256)
        return moe_errorf(MOE_ERR_ARG, "generate: %d prompts outside 1..%d", n, max_seqs < 256 ? max_seqs : 256);
    if (tokens < 0) return moe_errorf(MOE_ERR_ARG, "generate: tokens=%d must be >= 0", tokens);
    moe_status st = moe_infer_sampler_check(s);
    if (st || tokens == 0) return st;
    const int S = moe_infer_decoder_seq_len(d), nt = moe_infer_decoder_max_tokens(d);
    /* a context never exceeds S bytes before it slides, plus the byte that triggers it */
    gen_state g = {.d = d, .n = n, .S = S, .cap = S + 1};
    g.ctx = moe_calloc((size_t)n * g.cap, 1);
    g.ctx_len = moe_calloc((size_t)n, sizeof(int));
    g.logits = moe_calloc((size_t)nt * V, sizeof(float));
    g.cur = moe_calloc((size_t)n * V, sizeof(float));
    g.seq = moe_calloc((size_t)nt, sizeof(int));
    g.tok = moe_calloc((size_t)nt, 1);
    st = g.ctx && g.ctx_len && g.logits && g.cur && g.seq && g.tok ? MOE_OK
                                                                   : moe_errorf(MOE_ERR_NOMEM, "generate buffers");
    /* allocation is local: agree before the first collective decode */
    st = moe_comm_agree(comm, st);
    if (!st) st = run(&g, out, stats, comm, prompts, len, tokens, s);
    gen_free(&g);
    return st;
}
