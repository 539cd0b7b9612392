/* moe generate: sample text from a checkpoint with a key/value cache.
 *   [mpirun -np N] moe generate --ckpt FILE|RUNDIR (--prompt TEXT | --prompt_file FILE) [--tokens N]
 *                  [--temperature T] [--top_k K] [--top_p P] [--seed S] [--json]
 * Prompts are encoded with the checkpoint's tokenizer (one token per byte
 * for a byte-level model) and the tokens decoded back to bytes; one prompt
 * streams its bytes as they come. All prompts are decoded together as one
 * batch; every rank runs every sequence and the N ranks share the experts
 * (N must divide n_experts). The same seed gives the same text on any N.
 * Rules: src/infer/infer.h. */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "cli/cli.h"
#include "infer/infer.h"
#include "tokenizer/tokenizer.h"

enum { MAX_PROMPTS = MOE_INFER_MAX_PROMPTS };

typedef struct {
    const char *ckpt, *prompt, *prompt_file, *placement;
    int tokens, json;
    int vocab_top_k; /* 0: the checkpoint's */
    moe_infer_sampler s;
} gen_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: [mpirun -np N] moe generate --ckpt FILE|RUNDIR (--prompt TEXT | --prompt_file FILE)\n"
            "                                   [--tokens N] [--temperature T] [--top_k K] [--top_p P]\n"
            "                                   [--seed S] [--json] [--placement FILE]\n"
            "\n"
            "Samples tokens after each prompt with a key/value cache and prints their bytes. Prompts\n"
            "are encoded with the checkpoint's tokenizer (one token per byte for a byte-level model).\n"
            "N ranks share the experts (N must divide n_experts); every rank decodes every prompt, and\n"
            "the same seed gives the same text on any N. One prompt's text is written as it comes.\n"
            "  --ckpt FILE|RUNDIR  checkpoint file, or a run directory (its 'latest')\n"
            "  --prompt TEXT       one prompt (UTF-8; empty: start a new document, i.e. after \"\\n\")\n"
            "  --prompt_file FILE  one prompt per line (UTF-8; a trailing \\r is dropped), decoded as ONE\n"
            "                      batch of at most %d sequences\n"
            "  --tokens N          tokens to generate per prompt (bytes for a byte-level model; default 200)\n"
            "  --temperature T     >= 0; 0 = greedy (default 1.0)\n"
            "  --top_k K           keep the K most likely tokens; 0 = off (default 0)\n"
            "  --top_p P           nucleus sampling, P in (0, 1]; 1 = off (default 1.0)\n"
            "  --seed S            0..4294967295 (default 1)\n"
            "  --json              print {\"samples\": [{\"prompt\", \"text\"}], ...} (invalid UTF-8 shown as U+FFFD)\n"
            "  --placement FILE    expert placement of 'moe placement plan' for N ranks (default: contiguous\n"
            "                      blocks); the text does not depend on it\n"
            "  --vocab-top-k K     vocabulary experts: compute the K experts the head router ranks first\n"
            "                      and sample from their tokens (default: the checkpoint's vocab_top_k;\n"
            "                      K = vocab_experts is the exact model)\n"
            "\n"
            "Context: seq_len tokens. A longer prompt keeps its last seq_len tokens; a full context slides\n"
            "to its last seq_len/2 tokens (re-read in one pass). Routing: each prompt is one routing group;\n"
            "each decoding step routes the newest token of every prompt together as one group (for expert\n"
            "choice, C = min(B, ceil(B c / E)) with B prompts; at B = 1 every expert takes the token).\n",
            MAX_PROMPTS);
}

#define perr(rank, ...) moe_cli_usage_error(rank, "generate", __VA_ARGS__)

/* 0, 1 for --help, -1 after a usage error (moe_cli_world_command). */
static int parse(void *opts, int argc, char **argv, int rank)
{
    gen_opts *o = opts;
    static const struct option longs[] = {
        {"ckpt", required_argument, NULL, 'c'},        {"prompt", required_argument, NULL, 'p'},
        {"prompt_file", required_argument, NULL, 'f'}, {"tokens", required_argument, NULL, 'n'},
        {"temperature", required_argument, NULL, 't'}, {"top_k", required_argument, NULL, 'k'},
        {"top_p", required_argument, NULL, 'P'},       {"seed", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},              {"help", no_argument, NULL, 'h'},
        {"vocab-top-k", required_argument, NULL, 'V'}, {"vocab_top_k", required_argument, NULL, 'V'},
        {"placement", required_argument, NULL, 'L'},   {NULL, 0, NULL, 0}};
    *o = (gen_opts){.tokens = 200, .s = {.temperature = 1.0, .top_k = 0, .top_p = 1.0, .seed = 1}};
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        long v = 0;
        switch (ch) {
        case 'c': o->ckpt = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'f': o->prompt_file = optarg; break;
        case 'L': o->placement = optarg; break;
        case 'j': o->json = 1; break;
        case 'h': return 1;
        case 'n':
            if (moe_cli_parse_long(optarg, -2147483647L, 2147483647L, &v))
                return perr(rank, "--tokens: expected an integer, got '%s'", optarg), -1;
            o->tokens = (int)v;
            break;
        case 'k':
            if (moe_cli_parse_long(optarg, -2147483647L, 2147483647L, &v))
                return perr(rank, "--top_k: expected an integer, got '%s'", optarg), -1;
            o->s.top_k = (int)v;
            break;
        case 'V':
            if (moe_cli_parse_long(optarg, 1, 1 << 16, &v))
                return perr(rank, "--vocab-top-k: expected an integer in 1..65536, got '%s'", optarg), -1;
            o->vocab_top_k = (int)v;
            break;
        case 's':
            if (moe_cli_parse_long(optarg, 0, 4294967295L, &v))
                return perr(rank, "--seed: expected an integer in 0..4294967295, got '%s'", optarg), -1;
            o->s.seed = (uint32_t)v;
            break;
        case 't':
        case 'P': {
            double x;
            if (moe_cli_parse_double(optarg, &x))
                return perr(rank, "--%s: expected a number, got '%s'", ch == 't' ? "temperature" : "top_p", optarg), -1;
            *(ch == 't' ? &o->s.temperature : &o->s.top_p) = x;
            break;
        }
        default: return perr(rank, "unknown option or missing value: '%s' (see 'moe generate --help')", argv[optind - 1]), -1;
        }
    }
    if (optind < argc) return perr(rank, "unexpected argument '%s'", argv[optind]), -1;
    if (!o->ckpt) return perr(rank, "--ckpt is required (see 'moe generate --help')"), -1;
    if (!o->prompt == !o->prompt_file) return perr(rank, "give exactly one of --prompt TEXT and --prompt_file FILE"), -1;
    if (o->tokens < 0) return perr(rank, "--tokens=%d must be >= 0", o->tokens), -1;
    moe_status st = moe_infer_sampler_check(&o->s);
    if (st) return perr(rank, "--%s", moe_error_detail()), -1;
    return 0;
}

/* A JSON string of n bytes: invalid UTF-8 bytes (and NUL, which would end
 * the C string) become U+FFFD. */
static cJSON *json_bytes(const uint8_t *p, size_t n)
{
    char *s = malloc(3 * n + 1);
    if (!s) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        const size_t v = moe_tok_utf8_valid_prefix(p + i, n - i);
        for (size_t k = 0; k < v; k++) {
            if (p[i + k]) {
                s[o++] = (char)p[i + k];
            } else {
                memcpy(s + o, "\xef\xbf\xbd", 3);
                o += 3;
            }
        }
        i += v;
        if (i < n) { /* one invalid byte */
            memcpy(s + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    s[o] = '\0';
    cJSON *j = cJSON_CreateString(s);
    free(s);
    return j;
}

/* Each prompt's generated text: out (n, tokens) ids decoded. */
typedef struct {
    uint8_t *text[MAX_PROMPTS];
    size_t len[MAX_PROMPTS];
} gen_text;

static void gen_text_free(gen_text *g)
{
    for (int b = 0; b < MAX_PROMPTS; b++) moe_free(g->text[b]);
}

static int print_json(const moe_infer_prompts *ps, const gen_text *gt, const moe_infer_gen_stats *gs)
{
    cJSON *j = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(j, "samples");
    for (int b = 0; b < moe_infer_prompts_count(ps); b++) {
        cJSON *o = cJSON_CreateObject();
        size_t len;
        const uint8_t *p = moe_infer_prompts_get(ps, b, &len);
        cJSON_AddItemToObject(o, "prompt", json_bytes(p, len));
        cJSON_AddItemToObject(o, "text", json_bytes(gt->text[b], gt->len[b]));
        cJSON_AddItemToArray(arr, o);
    }
    cJSON_AddNumberToObject(j, "prefill_tokens", (double)gs->prefill_tokens);
    cJSON_AddNumberToObject(j, "decode_tokens", (double)gs->decode_tokens);
    cJSON_AddNumberToObject(j, "slides", (double)gs->slides);
    cJSON_AddNumberToObject(j, "decode_tokens_per_s", gs->decode_s > 0 ? (double)gs->decode_tokens / gs->decode_s : 0);
    /* rank 0's memory traffic per decoding step (moe_infer_decoder_last_bytes) */
    const double steps = gs->decode_steps > 0 ? (double)gs->decode_steps : 1.0;
    cJSON_AddNumberToObject(j, "decode_steps", (double)gs->decode_steps);
    cJSON_AddNumberToObject(j, "decode_param_bytes_per_step", gs->decode_param_bytes / steps);
    cJSON_AddNumberToObject(j, "decode_kv_bytes_per_step", gs->decode_kv_bytes / steps);
    return moe_cli_print_json(j);
}

static void print_text(const moe_infer_prompts *ps, const gen_text *gt)
{
    const int n = moe_infer_prompts_count(ps);
    for (int b = 0; b < n; b++) {
        size_t len;
        const uint8_t *p = moe_infer_prompts_get(ps, b, &len);
        if (n > 1) printf("%s=== [%d/%d] %.*s\n", b ? "\n" : "", b + 1, n, (int)len, (const char *)p);
        fwrite(gt->text[b], 1, gt->len[b], stdout);
        printf("\n");
    }
}

/* Streaming (one prompt, text output): rank 0 writes each token's bytes as
 * it is sampled; a character split over two tokens arrives in two writes,
 * which is fine for a byte stream. */
typedef struct {
    const moe_tok *tok;
    int rank, failed;
} stream_ctx;

static void stream_step(void *vctx, int t, const int32_t *ids, int n)
{
    stream_ctx *x = vctx;
    (void)t;
    if (x->rank != 0 || x->failed || n != 1) return;
    uint8_t *bytes = NULL;
    size_t len = 0;
    if (moe_infer_text_decode(&bytes, &len, x->tok, ids, 1)) {
        x->failed = 1; /* the whole text is decoded again at the end: that reports it */
        return;
    }
    fwrite(bytes, 1, len, stdout);
    fflush(stdout);
    moe_free(bytes);
}

static int run(const void *opts, moe_comm *comm)
{
    const gen_opts *o = opts;
    const int rank = moe_comm_rank(comm), W = moe_comm_size(comm);
    moe_infer_prompts *ps = NULL;
    moe_model *m = NULL;
    moe_tok *tok = NULL;
    moe_infer_decoder *d = NULL;
    int32_t *ids[MAX_PROMPTS] = {NULL}, *out = NULL;
    gen_text gt = {{NULL}, {0}};
    moe_infer_gen_stats gs = {0};
    moe_status st = moe_comm_agree(comm, o->prompt_file ? moe_infer_prompts_create(&ps, o->prompt_file)
                                                        : moe_infer_prompts_create_text(&ps, o->prompt));
    const int n_prompts = st ? 0 : moe_infer_prompts_count(ps);
    if (!st) st = moe_infer_load_placed(&m, NULL, o->ckpt, 1, n_prompts, o->placement, comm);
    if (!st) st = moe_ckpt_load_tokenizer(&tok, o->ckpt, comm);
    size_t n_ids[MAX_PROMPTS] = {0};
    int32_t newline = '\n'; /* an empty prompt starts a new document: after "\n" */
    /* the same option on every rank: no agreement needed */
    if (!st && o->vocab_top_k) st = moe_model_set_vocab_top_k(m, o->vocab_top_k);
    if (!st) {
        for (int b = 0; !st && b < n_prompts; b++) {
            size_t len;
            const uint8_t *p = moe_infer_prompts_get(ps, b, &len);
            st = moe_infer_text_encode(&ids[b], &n_ids[b], tok, p, len);
        }
        if (!st && tok) newline = (int32_t)moe_tok_rank(tok, (const uint8_t *)"\n", 1); /* every byte has a rank */
        if (!st) st = moe_infer_decoder_create(&d, m, n_prompts);
        /* every rank decodes the same tokens: split the sequences over the ep group */
        if (!st) st = moe_infer_decoder_set_split(d);
        if (!st && !(out = moe_calloc((size_t)n_prompts * o->tokens, sizeof(int32_t))))
            st = moe_errorf(MOE_ERR_NOMEM, "output");
        st = moe_comm_agree(comm, st);
    }
    const int stream = !o->json && n_prompts == 1;
    stream_ctx sx = {.tok = tok, .rank = rank};
    const moe_infer_gen_hooks hooks = {.empty_prompt = newline, .on_step = stream ? stream_step : NULL, .ctx = &sx};
    if (!st) st = moe_infer_generate(out, &gs, d, comm, (const int32_t *const *)ids, n_ids, n_prompts, o->tokens, &o->s,
                                     &hooks);
    for (int b = 0; !st && b < n_prompts; b++)
        st = moe_infer_text_decode(&gt.text[b], &gt.len[b], tok, out + (size_t)b * o->tokens, (size_t)o->tokens);
    int rc = 0;
    if (st) {
        if (stream && rank == 0) printf("\n");
        const int who = moe_comm_cause_rank(comm, MOE_SCOPE_WORLD, st);
        if (who < 0 || who == rank) moe_cli_error(W > 1 ? rank : -1, "generate", st);
        rc = 1;
    } else if (rank == 0) {
        if (o->json) rc = print_json(ps, &gt, &gs);
        else if (stream) printf("\n");
        else print_text(ps, &gt);
        fflush(stdout); /* the text, then the figures */
        fprintf(stderr, "moe generate: %d ranks, %d prompts: prefill %lld tokens in %.3f s; decode %lld tokens in %.3f s "
                        "(%.1f tokens/s, %lld context slides)\n",
                W, n_prompts, (long long)gs.prefill_tokens, gs.prefill_s, (long long)gs.decode_tokens, gs.decode_s,
                gs.decode_s > 0 ? (double)gs.decode_tokens / gs.decode_s : 0.0, (long long)gs.slides);
    }
    gen_text_free(&gt);
    moe_free(out);
    for (int b = 0; b < MAX_PROMPTS; b++) moe_free(ids[b]);
    moe_infer_decoder_destroy(d);
    moe_model_destroy(m);
    moe_tok_destroy(tok);
    moe_infer_prompts_destroy(ps);
    return rc;
}

int moe_cmd_generate(int argc, char **argv)
{
    static const moe_cli_world_command cmd = {"generate", usage, parse, run};
    gen_opts o;
    return moe_cli_run_world(&cmd, &o, argc, argv);
}
