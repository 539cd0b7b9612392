/* Inference from a checkpoint, shared by `moe eval` and `moe generate`:
 * loading a model on any number of ranks, next-token evaluation over ids,
 * an incremental decoder with a key/value cache, and sampling.
 *
 * Parallelism: the expert-parallel group is the whole world (ep size = W,
 * which must divide n_experts); experts are sharded, everything else is
 * replicated. Evaluation spreads windows over the ranks; generation runs
 * every sequence on every rank (the routing group of a decoding step must
 * live on one rank, docs/routing.md) and only the expert FFNs are distributed.
 *
 * Routing at inference (docs/routing.md, "autoregressive decoding"):
 *   - no router noise, ever;
 *   - evaluation: every window of seq_len tokens is its own routing group;
 *   - decoding: the tokens passed to ONE moe_infer_decode call form one
 *     routing group at every MoE layer: a prompt (or a re-prefilled context)
 *     is one group, a decoding step is the group of the B newest tokens, one
 *     per sequence. Capacity follows docs/routing.md for that group size T:
 *     token choice C = ceil(k T cf / E) (cf <= 0: dropless), expert choice
 *     C = min(T, ceil(T c / E)). At T = 1 expert choice therefore sends the
 *     single token to every expert (C = 1), weighted by its router probs. */
#ifndef MOE_INFER_H
#define MOE_INFER_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "config/config.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

/* ---- loading (load.c) ---- */

/* Builds a model for at most max_local_seqs sequences of seq_len bytes per
 * forward, whose MoE layers also take calls of up to min_tokens tokens
 * (decoding: the batch size; the model then holds enough sequences), from
 * the checkpoint `path` (a file, or a run directory meaning the file its
 * `latest` names). The configuration is the checkpoint's root `config`
 * text (routing keys as saved) with group_seqs = 1, copied to *cfg (may be
 * NULL). comm (moe_comm_create_self for one process): its ep size must be its world
 * size. Collective over comm's world; every rank returns non-OK if any
 * fails (the cause's detail on the rank that found it, MOE_ERR_REMOTE
 * elsewhere; moe_comm_cause_rank says which). Fails with MOE_ERR_IO /
 * MOE_ERR_FORMAT / MOE_ERR_CHECKSUM / MOE_ERR_MISMATCH for a missing or
 * damaged file, MOE_ERR_ARG when the world size does not divide n_experts or
 * max_local_seqs < 1. Owner: caller (moe_model_destroy). */
moe_status moe_infer_load(moe_model **out, moe_train_config *cfg, const char *path, int max_local_seqs,
                          int min_tokens, moe_comm *comm);
/* The same with the experts placed by the placement file `placement`
 * (docs/routing.md "Expert placement"; NULL or "": contiguous). A placement
 * is a choice of this run, never taken from the checkpoint's saved config;
 * results do not depend on it. */
moe_status moe_infer_load_placed(moe_model **out, moe_train_config *cfg, const char *path, int max_local_seqs,
                                 int min_tokens, const char *placement, moe_comm *comm);

/* Reads a whole file into a new buffer (*data, caller frees with moe_free;
 * never NULL on success, even for an empty file) of *n bytes. Not
 * collective. MOE_ERR_IO naming the file. */
moe_status moe_infer_read_file(uint8_t **data, size_t *n, const char *path);

/* ---- prompts of `moe generate` (prompt.c) ---- */

enum { MOE_INFER_MAX_PROMPTS = 256 };

typedef struct moe_infer_prompts moe_infer_prompts;

/* The prompts of the file at path: one per line ('\n'; a trailing '\r' is
 * dropped, an empty line is an empty prompt, a last line without '\n'
 * counts), each valid UTF-8. Not collective (every rank reads the file
 * itself). MOE_ERR_IO as moe_infer_read_file; MOE_ERR_ARG naming the file
 * (and the line and byte) for invalid UTF-8, more than
 * MOE_INFER_MAX_PROMPTS lines, or an empty file. Owner: caller
 * (moe_infer_prompts_destroy). */
moe_status moe_infer_prompts_create(moe_infer_prompts **out, const char *path);
/* One prompt, the C string text (not copied: it must outlive the handle).
 * MOE_ERR_ARG "--prompt: invalid UTF-8 at byte N". */
moe_status moe_infer_prompts_create_text(moe_infer_prompts **out, const char *text);
void moe_infer_prompts_destroy(moe_infer_prompts *ps);
int moe_infer_prompts_count(const moe_infer_prompts *ps);
/* Prompt i (0 <= i < count): *len bytes, not NUL-terminated, inside the
 * handle's buffer (or the text given). */
const uint8_t *moe_infer_prompts_get(const moe_infer_prompts *ps, int i, size_t *len);

/* ---- text and token ids (text.c) ---- */

/* Nothing here is collective. A checkpoint's tokenizer comes from
 * moe_ckpt_load_tokenizer; tok NULL means a byte-level model (one id per
 * byte). */

/* Token ids of n bytes of text (any bytes): tok's encode as one document
 * (docs/tokenizer.md: exact to tiktoken on UTF-8, invalid UTF-8 by its own
 * rule), or one id per byte. *ids (moe_free) has *n_ids ids. */
moe_status moe_infer_text_encode(int32_t **ids, size_t *n_ids, const moe_tok *tok, const uint8_t *text, size_t n);
/* The bytes of n ids into a new buffer (*out, moe_free) of *n_out bytes:
 * tok's decode (a special gives its name), or one byte per id. MOE_ERR_ARG
 * naming the position of an id that has no bytes (a hole, an id outside the
 * tokenizer, or above 255 without one). */
moe_status moe_infer_text_decode(uint8_t **out, size_t *n_out, const moe_tok *tok, const int32_t *ids, size_t n);
/* The ids of the token file at path (tokfile.h), checked against tok: its
 * header, size and ids (MOE_ERR_FORMAT), the tokenizer's hash and
 * vocab_size (MOE_ERR_MISMATCH "encoded with another tokenizer"), each
 * naming the file. MOE_ERR_ARG when tok is NULL (a byte-level model).
 * *ids (moe_free) has *n ids. */
moe_status moe_infer_read_tokens(int32_t **ids, size_t *n, const char *path, const moe_tok *tok);

/* ---- evaluation (eval.c) ---- */

typedef struct {
    double loss;         /* mean next-token cross-entropy, nats per token */
    double loss_sum;     /* sum over every target token */
    int64_t tokens;      /* target tokens: windows * seq_len */
    int64_t bytes;       /* bytes the target tokens stand for */
    double bpb;          /* bits per byte: loss_sum / bytes / ln 2 */
    int64_t windows;
    int n_moe, n_domains, n_experts;
    int64_t *domain_kept; /* (n_moe, n_domains, E) kept assignments of the tokens of each domain,
                           * global, MoE layers in block order; NULL without domains */
    /* vocabulary experts (else 0 / NULL): the loss above is the exact loss
     * (the target's expert always computes); coverage is for K = the
     * model's vocab_top_k (moe_model_set_vocab_top_k) */
    int vocab_experts, vocab_top_k;
    double vocab_coverage;    /* share of target tokens whose expert is in the top K of the head router */
    int64_t *vocab_rank_hist; /* (M) target tokens by the rank of their expert in q: coverage at any K */
    int64_t *vocab_tokens;    /* (M) target tokens per expert (each expert's load) */
    double vocab_kept_mass;   /* mean over target tokens of the router mass of the top K experts */
    double *vocab_rank_mass;  /* (M) mean r-th largest router probability: kept mass at any K */
} moe_infer_eval_result;

/* Next-token cross-entropy of m over ids (n tokens, the same on every
 * rank): window i has inputs ids[i*S .. i*S+S) and targets shifted by one,
 * for i = 0 .. floor((n-1)/S)-1 (S = seq_len; every full window). Each
 * window is its own routing group, no noise. Window g goes to forward
 * j = g / (W*batch), rank (g % (W*batch)) / batch; the last forward is
 * padded with empty windows that contribute nothing, so every rank runs the
 * same number of forwards. Per-window loss sums are gathered and added in
 * window order in double on every rank, so the result does not depend on W
 * beyond the floating-point identity of the forward itself.
 * id_bytes (vocab_size entries: the bytes each id stands for) or NULL (one
 * byte per token) gives res->bytes, the sum over the target tokens, and
 * res->bpb = loss_sum / bytes / ln 2: the same scale for byte-level and
 * BPE models.
 * domains (n, one per token, each < n_domains) or NULL: counts, per MoE
 * layer, the kept expert assignments of every input token by its domain.
 * batch <= the model's max_local_seqs. Collective over comm's world.
 * MOE_ERR_ARG for fewer than S+1 tokens, an id outside the vocabulary or a
 * bad domain id (naming its position) or batch < 1; forward failures reach
 * every rank; MOE_ERR_NONFINITE, on every rank, when the loss is not
 * finite. res's arrays are owned by the caller (moe_infer_eval_result_free). */
moe_status moe_infer_eval(moe_infer_eval_result *res, moe_model *m, moe_comm *comm, const int32_t *ids,
                          const int32_t *id_bytes, const uint8_t *domains, size_t n, int n_domains, int batch);
void moe_infer_eval_result_free(moe_infer_eval_result *res);

/* ---- incremental decoding with a key/value cache (decode.c) ---- */

typedef struct moe_infer_decoder moe_infer_decoder;

/* A decoder over m's parameters (borrowed: m must outlive it) for up to
 * max_seqs sequences of at most seq_len positions each, all empty. The
 * model's MoE layers must take max(max_seqs, seq_len) tokens per call
 * (moe_infer_load with min_tokens >= max_seqs). Not collective. MOE_ERR_ARG (max_seqs < 1), MOE_ERR_NOMEM. Owner: caller. */
moe_status moe_infer_decoder_create(moe_infer_decoder **out, moe_model *m, int max_seqs);
void moe_infer_decoder_destroy(moe_infer_decoder *d);

/* Splits the sequences over the ep group, for callers whose ranks all make
 * the same calls (generation: the same tokens, sequences and want on every
 * rank). Sequence s then lives on ep rank floor(s P / max_seqs): only there
 * does it run through the dense layers and keep its keys and values. Each
 * MoE layer still routes the whole call as one group, on every rank, as
 * one process would, and each token goes to its experts once, from where it
 * lives; the outputs are gathered, so every rank still gets every row.
 * Without it every rank runs every sequence and sends its own copy of each
 * token to the experts. Before the first token; with one ep rank nothing
 * changes. Not collective (agree on the result): MOE_ERR_ARG (a sequence
 * already holds tokens), MOE_ERR_NOMEM. */
moe_status moe_infer_decoder_set_split(moe_infer_decoder *d);

int moe_infer_decoder_max_seqs(const moe_infer_decoder *d);
int moe_infer_decoder_seq_len(const moe_infer_decoder *d);
int moe_infer_decoder_vocab_size(const moe_infer_decoder *d);
moe_model *moe_infer_decoder_model(moe_infer_decoder *d);
/* The largest n one moe_infer_decode call takes: max(max_seqs, seq_len). */
int moe_infer_decoder_max_tokens(const moe_infer_decoder *d);

/* Empties sequence s (its next token goes to position 0). Not collective. */
void moe_infer_decoder_reset(moe_infer_decoder *d, int s);
/* Positions sequence s holds in its cache. */
int moe_infer_decoder_length(const moe_infer_decoder *d, int s);

/* Appends n tokens (ids in [0, vocab_size)): token i goes to sequence seq[i]
 * at that sequence's next position (tokens of one sequence in call order),
 * and writes the logits of every new token: logits (n, vocab_size). Each token attends to its
 * sequence's cache up to and including itself; only the new tokens run
 * through the blocks, and the n tokens form ONE routing group at every MoE
 * layer (see the header comment). 1 <= n <= max(max_seqs, seq_len).
 * Collective over the ep group: every rank must make calls with the same n
 * (the tokens themselves may differ, unless the decoder is split). MOE_ERR_ARG (bad n, sequence or
 * id, a sequence would pass seq_len positions; nothing is changed) is
 * returned before any collective call: a caller whose ranks pass different
 * ids checks them itself. The MoE layer's failures reach every rank of the
 * ep group. */
moe_status moe_infer_decode(moe_infer_decoder *d, float *logits, const int32_t *tokens, const int *seq, int n);

/* The next-token distributions of a decoding step as candidate lists,
 * which a sampler walks as it would a dense vector without its zeros:
 * row i holds count[i] candidates; the full head gives all V ids in order
 * (dense = 1: candidate j is id j, logp its logit), the vocabulary-expert
 * head the top-K lists (dense = 0: ids in increasing order, logp = log P_K,
 * docs/vocab-experts.md). Buffers are the caller's: logp and ids (rows,
 * stride), count (rows), stride from moe_infer_decoder_dist_stride. */
typedef struct {
    float *logp;
    int32_t *ids;
    int32_t *count;
    int64_t stride;
    int dense;        /* set by the decoder */
} moe_infer_dist;

/* The full head's logits for a call of at most 4 tokens by one GEMV per
 * token instead of one GEMM (on = 1): faster at batch 1 (a GEMM packs all
 * of wte first), but other bits, so it is off by default and `moe
 * generate` keeps the GEMM; bench/vocab_model.c times both as the full
 * head's baseline. Not collective. */
void moe_infer_decoder_set_head_gemv(moe_infer_decoder *d, int on);

/* Bytes the last decode call read on this rank: *param_bytes of parameters
 * (each new token's embedding rows, every block's weights once, the MoE
 * layers' router and the local experts that got rows, the full head; the
 * vocabulary-expert head is not counted) and *kv_bytes of cached keys and
 * values (each new token's sequence up to its position, every layer).
 * What a decoding step must stream from memory, for a bandwidth bound
 * (bench/decode.sh). Not collective. */
void moe_infer_decoder_last_bytes(const moe_infer_decoder *d, double *param_bytes, double *kv_bytes);

/* Candidates per row the decoder's head needs: vocab_size for the full
 * head, the K largest sets together for vocabulary experts (K = the model's
 * vocab_top_k, moe_model_set_vocab_top_k). Not collective. */
int64_t moe_infer_decoder_dist_stride(const moe_infer_decoder *d);

/* As moe_infer_decode, but the distribution of token i goes to row i of
 * out, for the tokens with want[i] != 0 (want NULL: all); the other rows'
 * contents are unspecified afterwards. The full head computes every row
 * (stride must be vocab_size); the vocabulary head computes only the
 * wanted ones (its K experts each, on their owners). Collective over the ep group (every rank
 * calls with the same n and want). Errors as moe_infer_decode, plus
 * MOE_ERR_ARG for a short stride; the head's failures reach every ep rank.
 * With the vocabulary head, moe_infer_decode itself refuses (MOE_ERR_ARG):
 * that head forms no logits over the vocabulary. */
moe_status moe_infer_decode_dist(moe_infer_decoder *d, moe_infer_dist *out, const int32_t *tokens, const int *seq,
                                 int n, const uint8_t *want);

/* ---- sampling (sample.c) ---- */

typedef struct {
    double temperature; /* 0: greedy (argmax, lowest id on ties); > 0 divides the logits */
    int top_k;          /* keep the top_k most likely tokens; 0: all */
    double top_p;       /* keep the smallest most-likely set with probability >= top_p; 1: all */
    uint32_t seed;
} moe_infer_sampler;

/* MOE_ERR_ARG naming the field: temperature < 0 or not finite, top_k < 0,
 * top_p outside (0, 1]. */
moe_status moe_infer_sampler_check(const moe_infer_sampler *s);

/* Next token from logits (V ids). Candidates are ordered by decreasing logit
 * (lower id first on ties). temperature 0: the first one. Otherwise keep
 * the first top_k; weight each w = floor(2^64 exp((logit - max) /
 * temperature)) (exp in double; the sums of these integers are exact, so
 * they do not depend on the order they are taken in); keep the shortest
 * prefix whose weight sum, as a double, is >= top_p times the total's;
 * then with u = moe_rng_uniform(seed, MOE_RNG_SAMPLE, position, sequence,
 * 0, 0) pick the first candidate whose cumulative weight exceeds u times
 * the kept total. A pure function of its arguments (same seed, same text
 * on any number of ranks). The cost is O(V) plus the sort of the
 * candidates actually reached (top_k of them, or the prefix the cut or the
 * draw needs), never a sort of all V. scratch: moe_infer_sample_scratch_bytes(V)
 * bytes, 16-byte aligned (NULL: allocated per call). Not collective.
 * Non-finite logits: MOE_ERR_NONFINITE; V < 1: MOE_ERR_ARG. */
moe_status moe_infer_sample(int32_t *out, const moe_infer_sampler *s, const float *logits, int V,
                            uint32_t position, uint32_t sequence, void *scratch);
size_t moe_infer_sample_scratch_bytes(int V);
/* The plain reference: sorts all V candidates. Same result as moe_infer_sample. */
moe_status moe_infer_sample_ref(int32_t *out, const moe_infer_sampler *s, const float *logits, int V,
                                uint32_t position, uint32_t sequence);

/* ---- generation (generate.c) ---- */

typedef struct {
    int64_t prefill_tokens, decode_tokens; /* tokens through the blocks: prompts, decoding steps */
    int64_t slides;                        /* context re-prefills (see moe_infer_generate) */
    double prefill_s, decode_s;            /* wall time of the prompt pass and of the decoding loop */
    int64_t decode_steps;                  /* decoding calls (one per step with a sequence that has room) */
    double decode_param_bytes, decode_kv_bytes; /* summed over them on this rank (moe_infer_decoder_last_bytes) */
} moe_infer_gen_stats;

/* Optional inputs of moe_infer_generate. */
typedef struct {
    int32_t empty_prompt;   /* the id an empty prompt stands for: the document
                             * separator '\n' (10 for bytes; a tokenizer's id of "\n") */
    /* Called on every rank after each sampled step t (0-based) with the
     * step's ids, one per sequence (n), before the next decoding step: for
     * streaming output. NULL: none. */
    void (*on_step)(void *ctx, int t, const int32_t *ids, int n);
    void *ctx;
} moe_infer_gen_hooks;

/* Samples `tokens` token ids after each of the n prompts (prompt i: len[i]
 * ids, each < vocab_size) into out (n, tokens), decoding all n sequences
 * together in d (max_seqs >= n; its sequences are reset first).
 * Rules (S = seq_len):
 *   - an empty prompt stands for the one token hooks->empty_prompt (10,
 *     the byte '\n', when hooks is NULL); a prompt longer than S keeps its
 *     last S tokens as context;
 *   - each prompt is prefilled in one pass (one routing group per prompt);
 *     then every step feeds the n newest tokens as ONE routing group;
 *   - a sequence whose cache is full (S positions) slides: its cache is
 *     reset and the last max(1, S/2) tokens of its context (the new token
 *     included) are prefilled again in one pass (their own group);
 *   - token j (0-based) after prompt i is drawn with position = (prompt
 *     length in tokens, at least 1) + j and sequence = i (moe_infer_sample).
 * World rank 0 samples and broadcasts each step's ids, so every rank
 * holds the same sequences and out is the same everywhere. Collective over
 * comm's world; every rank runs all n sequences and
 * only the experts are distributed. Errors (MOE_ERR_ARG for n outside
 * 1..max_seqs, tokens < 0 or a prompt id outside the vocabulary, the
 * sampler's and the layers') reach every rank. stats and hooks may be NULL. */
moe_status moe_infer_generate(int32_t *out, moe_infer_gen_stats *stats, moe_infer_decoder *d, moe_comm *comm,
                              const int32_t *const *prompts, const size_t *len, int n, int tokens,
                              const moe_infer_sampler *s, const moe_infer_gen_hooks *hooks);

#endif
