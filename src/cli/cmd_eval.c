/* moe eval: next-token cross-entropy of a checkpoint on a file, per token
 * and in bits per byte.
 *   [mpirun -np N] moe eval --ckpt FILE|RUNDIR --data FILE [--json] [--domains FILE] [--batch N]
 * A text file is encoded with the checkpoint's tokenizer (one id per byte
 * for a byte-level model); a token file (.tok) must come from that
 * tokenizer. Experts are sharded over all N ranks (N must divide
 * n_experts); windows are spread over the ranks and the result is the same
 * on any N. With --domains (one domain id per data byte, `moe data synth
 * --domains`) it also reports, per MoE layer, which experts each domain's
 * tokens went to (a token belongs to the domain of its first byte).
 * A model with vocabulary experts also reports the top-K coverage (K =
 * vocab_top_k, or --vocab-top-k to try another without retraining). */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "cli/cli.h"
#include "data/data.h"
#include "infer/infer.h"

typedef struct {
    const char *ckpt, *data, *domains, *placement;
    int json, batch;
    int vocab_top_k; /* 0: the checkpoint's */
} eval_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: [mpirun -np N] moe eval --ckpt FILE|RUNDIR --data FILE [--json] [--domains FILE] [--batch N]\n"
            "                              [--placement FILE]\n"
            "\n"
            "Mean next-token cross-entropy of a checkpoint over every full window of seq_len tokens of\n"
            "FILE (window i: inputs tokens [i*S, i*S+S), targets shifted by one; each window is its own\n"
            "routing group; no router noise), in nats per token and in bits per byte (the token losses\n"
            "over the bytes the targets stand for: byte-level and BPE models on one scale). N ranks\n"
            "shard the experts (N must divide n_experts).\n"
            "  --ckpt FILE|RUNDIR  checkpoint file, or a run directory (its 'latest')\n"
            "  --data FILE         text (any bytes), encoded with the checkpoint's tokenizer (one token per\n"
            "                      byte for a byte-level model), or a token file (.tok) of that tokenizer\n"
            "  --json              print {\"loss\", \"bpb\", \"tokens\", \"bytes\", ...} instead of text\n"
            "  --domains FILE      one domain id per data byte ('moe data synth --domains'): also print,\n"
            "                      per MoE layer, each domain's share of kept assignments per expert (a\n"
            "                      token counts for the domain of its first byte)\n"
            "  --batch N           windows per rank per forward (default 8)\n"
            "  --placement FILE    expert placement of 'moe placement plan' for N ranks (default:\n"
            "                      contiguous blocks; with replicas N need only divide E + R); the\n"
            "                      result does not depend on it\n"

            "  --vocab-top-k K     vocabulary experts: the K of the coverage (default: the checkpoint's\n"
            "                      vocab_top_k); the loss is exact whatever K\n");
}

#define perr(rank, ...) moe_cli_usage_error(rank, "eval", __VA_ARGS__)

/* 0, 1 for --help, -1 after a usage error (moe_cli_world_command). */
static int parse(void *opts, int argc, char **argv, int rank)
{
    eval_opts *o = opts;
    static const struct option longs[] = {
        {"ckpt", required_argument, NULL, 'c'}, {"data", required_argument, NULL, 'd'},
        {"domains", required_argument, NULL, 'D'}, {"batch", required_argument, NULL, 'b'},
        {"json", no_argument, NULL, 'j'}, {"vocab-top-k", required_argument, NULL, 'k'},
        {"placement", required_argument, NULL, 'L'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    *o = (eval_opts){.batch = 8};
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        switch (ch) {
        case 'c': o->ckpt = optarg; break;
        case 'd': o->data = optarg; break;
        case 'D': o->domains = optarg; break;
        case 'L': o->placement = optarg; break;
        case 'j': o->json = 1; break;
        case 'h': return 1;
        case 'b': {
            long v;
            if (moe_cli_parse_long(optarg, 1, 65536, &v)) {
                perr(rank, "--batch: expected an integer in 1..65536, got '%s'", optarg);
                return -1;
            }
            o->batch = (int)v;
            break;
        }
        case 'k': {
            long v;
            if (moe_cli_parse_long(optarg, 1, 1 << 16, &v)) {
                perr(rank, "--vocab-top-k: expected an integer in 1..65536, got '%s'", optarg);
                return -1;
            }
            o->vocab_top_k = (int)v;
            break;
        }
        default:
            perr(rank, "unknown option or missing value: '%s' (see 'moe eval --help')", argv[optind - 1]);
            return -1;
        }
    }
    if (optind < argc) {
        perr(rank, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    if (!o->ckpt || !o->data) {
        perr(rank, "--ckpt and --data are required (see 'moe eval --help')");
        return -1;
    }
    return 0;
}

/* Share of domain d's kept assignments that expert e received. */
static double share(const int64_t *kd, int E, int e)
{
    int64_t total = 0;
    for (int j = 0; j < E; j++) total += kd[j];
    return total ? (double)kd[e] / (double)total : 0.0;
}

static void print_text(const eval_opts *o, moe_model *m, const moe_infer_eval_result *r, const int64_t *dtok,
                       const moe_tok *tok)
{
    if (!tok) { /* a byte-level model: tokens are bytes */
        printf("eval %s on %s: %lld windows x %d bytes = %lld tokens\n", o->ckpt, o->data, (long long)r->windows,
               (int)(r->tokens / r->windows), (long long)r->tokens);
        printf("loss %.6f nats/byte | %.6f bits/byte\n", r->loss, r->bpb);
    } else {
        printf("eval %s on %s: %lld windows x %d tokens = %lld tokens (%lld bytes, %.3f bytes/token)\n", o->ckpt,
               o->data, (long long)r->windows, (int)(r->tokens / r->windows), (long long)r->tokens,
               (long long)r->bytes, (double)r->bytes / (double)r->tokens);
        printf("loss %.6f nats/token | %.6f bits/byte\n", r->loss, r->bpb);
    }
    if (r->vocab_experts) {
        /* coverage at every power of two up to M, and at the K asked for */
        printf("vocabulary experts: M = %d, top-%d coverage %.4f (targets whose expert is among the K the router "
               "ranks first)\ncoverage at K:", r->vocab_experts, r->vocab_top_k, r->vocab_coverage);
        int64_t c = 0;
        for (int k = 1; k <= r->vocab_experts; k++) {
            c += r->vocab_rank_hist[k - 1];
            if ((k & (k - 1)) == 0 || k == r->vocab_experts)
                printf(" %d: %.4f", k, (double)c / (double)r->tokens);
        }
        printf("\n");
    }
    if (!r->domain_kept) return;
    const int E = r->n_experts, L = moe_model_config(m)->n_layers;
    for (int l = 0; l < L; l++) {
        const int i = moe_model_moe_index(m, l);
        if (i < 0) continue;
        printf("\nMoE block %d: share of each domain's kept expert assignments (rows sum to 1)\n%-10s %9s", l,
               "domain", "tokens");
        for (int e = 0; e < E; e++) {
            char h[16];
            snprintf(h, sizeof h, "e%d", e);
            printf(" %8s", h);
        }
        printf("\n");
        for (int d = 0; d < r->n_domains; d++) {
            const int64_t *kd = r->domain_kept + ((size_t)i * r->n_domains + d) * E;
            printf("%-10s %9lld", moe_data_domain_name(d), (long long)dtok[d]);
            for (int e = 0; e < E; e++) printf(" %8.3f", share(kd, E, e));
            printf("\n");
        }
    }
}

static int print_json(moe_model *m, const moe_infer_eval_result *r, const int64_t *dtok)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "loss", r->loss);
    cJSON_AddNumberToObject(j, "bpb", r->bpb);
    cJSON_AddNumberToObject(j, "tokens", (double)r->tokens);
    cJSON_AddNumberToObject(j, "bytes", (double)r->bytes);
    cJSON_AddNumberToObject(j, "windows", (double)r->windows);
    if (r->vocab_experts) {
        cJSON *v = cJSON_AddObjectToObject(j, "vocab_experts");
        cJSON_AddNumberToObject(v, "experts", r->vocab_experts);
        cJSON_AddNumberToObject(v, "top_k", r->vocab_top_k);
        cJSON_AddNumberToObject(v, "coverage", r->vocab_coverage);
        cJSON *cov = cJSON_AddArrayToObject(v, "coverage_at_k"), *load = cJSON_AddArrayToObject(v, "targets");
        int64_t c = 0;
        for (int k = 0; k < r->vocab_experts; k++) {
            c += r->vocab_rank_hist[k];
            cJSON_AddItemToArray(cov, cJSON_CreateNumber((double)c / (double)r->tokens));
            cJSON_AddItemToArray(load, cJSON_CreateNumber((double)r->vocab_tokens[k]));
        }
    }
    if (r->domain_kept) {
        const int E = r->n_experts, L = moe_model_config(m)->n_layers;
        cJSON *dom = cJSON_AddObjectToObject(j, "domains");
        cJSON *names = cJSON_AddArrayToObject(dom, "names"), *tok = cJSON_AddArrayToObject(dom, "tokens");
        for (int d = 0; d < r->n_domains; d++) {
            cJSON_AddItemToArray(names, cJSON_CreateString(moe_data_domain_name(d)));
            cJSON_AddItemToArray(tok, cJSON_CreateNumber((double)dtok[d]));
        }
        cJSON *layers = cJSON_AddArrayToObject(dom, "layers");
        for (int l = 0; l < L; l++) {
            const int i = moe_model_moe_index(m, l);
            if (i < 0) continue;
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "block", l);
            cJSON *kept = cJSON_AddArrayToObject(o, "kept"), *sh = cJSON_AddArrayToObject(o, "share");
            for (int d = 0; d < r->n_domains; d++) {
                const int64_t *kd = r->domain_kept + ((size_t)i * r->n_domains + d) * E;
                cJSON *kr = cJSON_CreateArray(), *sr = cJSON_CreateArray();
                for (int e = 0; e < E; e++) {
                    cJSON_AddItemToArray(kr, cJSON_CreateNumber((double)kd[e]));
                    cJSON_AddItemToArray(sr, cJSON_CreateNumber(share(kd, E, e)));
                }
                cJSON_AddItemToArray(kept, kr);
                cJSON_AddItemToArray(sh, sr);
            }
            cJSON_AddItemToArray(layers, o);
        }
    }
    return moe_cli_print_json(j);
}

/* The ids to evaluate, identical on every rank: a token file's, or the
 * text's (tok's encode, or one per byte), and the domain of each id (that
 * of its first byte; *dom NULL without --domains). */
static moe_status read_inputs(const eval_opts *o, const moe_tok *tok, int vocab, int32_t **ids, size_t *n,
                              uint8_t **dom)
{
    uint8_t *text = NULL, *bdom = NULL;
    size_t nt = 0, nd = 0;
    moe_status st = MOE_OK;
    if (moe_data_format_of(MOE_DATA_AUTO, o->data) == MOE_DATA_TOKENS) {
        st = moe_infer_read_tokens(ids, n, o->data, tok);
    } else {
        st = moe_infer_read_file(&text, &nt, o->data);
        if (!st) st = moe_infer_text_encode(ids, n, tok, text, nt);
    }
    for (size_t i = 0; !st && i < *n; i++) /* a tokenizer smaller than the model is fine, a larger one is not */
        if ((*ids)[i] >= vocab)
            st = moe_errorf(MOE_ERR_ARG, "'%s': token %zu has id %ld, outside the model's vocab_size %d", o->data, i,
                            (long)(*ids)[i], vocab);
    if (!st && o->domains) st = moe_infer_read_file(&bdom, &nd, o->domains);
    if (!st && o->domains) {
        int32_t *len = NULL; /* bytes of each id: token i starts at the sum of the lengths before it */
        st = moe_data_id_bytes_of(&len, tok, vocab);
        uint64_t total = 0;
        for (size_t i = 0; !st && i < *n; i++) total += (uint64_t)len[(*ids)[i]];
        if (!st && total != nd)
            st = moe_errorf(MOE_ERR_ARG, "--domains '%s' has %zu bytes but --data '%s' stands for %llu (one id per byte)",
                            o->domains, nd, o->data, (unsigned long long)total);
        if (!st && !(*dom = moe_calloc(*n, 1))) st = moe_errorf(MOE_ERR_NOMEM, "domains of %zu tokens", *n);
        for (size_t i = 0, at = 0; !st && i < *n; at += (size_t)len[(*ids)[i]], i++) (*dom)[i] = bdom[at];
        moe_free(len);
    }
    moe_free(text);
    moe_free(bdom);
    return st;
}

static int run(const void *opts, moe_comm *comm)
{
    const eval_opts *o = opts;
    const int rank = moe_comm_rank(comm), W = moe_comm_size(comm);
    uint8_t *dom = NULL;
    int32_t *ids = NULL, *id_bytes = NULL;
    size_t n = 0;
    moe_model *m = NULL;
    moe_tok *tok = NULL;
    moe_infer_eval_result res = {0};
    moe_status st = moe_infer_load_placed(&m, NULL, o->ckpt, o->batch, 0, o->placement, comm);
    if (!st) st = moe_ckpt_load_tokenizer(&tok, o->ckpt, comm);
    /* the same option on every rank: no agreement needed */
    if (!st && o->vocab_top_k) st = moe_model_set_vocab_top_k(m, o->vocab_top_k);
    if (!st) {
        const int vocab = moe_model_config(m)->vocab_size;
        st = read_inputs(o, tok, vocab, &ids, &n, &dom);
        if (!st && tok) st = moe_data_id_bytes_of(&id_bytes, tok, vocab);
        st = moe_comm_agree(comm, st);
    }
    if (!st) st = moe_infer_eval(&res, m, comm, ids, id_bytes, dom, n, moe_data_n_domains(), o->batch);
    int rc = 0;
    if (st) {
        const int who = moe_comm_cause_rank(comm, MOE_SCOPE_WORLD, st);
        if (who < 0 || who == rank) moe_cli_error(W > 1 ? rank : -1, "eval", st);
        rc = 1;
    } else if (rank == 0) {
        int64_t dtok[256] = {0};
        for (size_t i = 0; dom && i < (size_t)res.tokens; i++) dtok[dom[i]]++;
        if (o->json)
            rc = print_json(m, &res, dtok);
        else
            print_text(o, m, &res, dtok, tok);
    }
    moe_infer_eval_result_free(&res);
    moe_model_destroy(m);
    moe_tok_destroy(tok);
    moe_free(ids);
    moe_free(id_bytes);
    moe_free(dom);
    return rc;
}

int moe_cmd_eval(int argc, char **argv)
{
    static const moe_cli_world_command cmd = {"eval", usage, parse, run};
    eval_opts o;
    return moe_cli_run_world(&cmd, &o, argc, argv);
}
