/* moe eval: next-byte cross-entropy of a checkpoint on a file.
 *   [mpirun -np N] moe eval --ckpt FILE|RUNDIR --data FILE [--json] [--domains FILE] [--batch N]
 * Experts are sharded over all N ranks (N must divide n_experts); windows
 * are spread over the ranks and the result is the same on any N. With
 * --domains (one domain id per data byte, `moe data synth --domains`) it
 * also reports, per MoE layer, which experts each domain's tokens went to. */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "data/data.h"
#include "infer/infer.h"

typedef struct {
    const char *ckpt, *data, *domains;
    int json, batch, help;
} eval_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: [mpirun -np N] moe eval --ckpt FILE|RUNDIR --data FILE [--json] [--domains FILE] [--batch N]\n"
            "\n"
            "Mean next-byte cross-entropy of a checkpoint over every full window of seq_len bytes of\n"
            "FILE (window i: inputs bytes [i*S, i*S+S), targets shifted by one; each window is its own\n"
            "routing group; no router noise). N ranks shard the experts (N must divide n_experts).\n"
            "  --ckpt FILE|RUNDIR  checkpoint file, or a run directory (its 'latest')\n"
            "  --data FILE         bytes to evaluate on\n"
            "  --json              print {\"loss\", \"bpb\", \"tokens\", ...} instead of text\n"
            "  --domains FILE      one domain id per data byte ('moe data synth --domains'): also print,\n"
            "                      per MoE layer, each domain's share of kept assignments per expert\n"
            "  --batch N           windows per rank per forward (default 8)\n");
}

#define perr(rank, ...) moe_cli_usage_error(rank, "eval", __VA_ARGS__)

static int parse(eval_opts *o, int argc, char **argv, int rank)
{
    static const struct option longs[] = {
        {"ckpt", required_argument, NULL, 'c'}, {"data", required_argument, NULL, 'd'},
        {"domains", required_argument, NULL, 'D'}, {"batch", required_argument, NULL, 'b'},
        {"json", no_argument, NULL, 'j'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    *o = (eval_opts){.batch = 8};
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        switch (ch) {
        case 'c': o->ckpt = optarg; break;
        case 'd': o->data = optarg; break;
        case 'D': o->domains = optarg; break;
        case 'j': o->json = 1; break;
        case 'h': o->help = 1; return 0;
        case 'b': {
            long v;
            if (moe_cli_parse_long(optarg, 1, 65536, &v)) {
                perr(rank, "--batch: expected an integer in 1..65536, got '%s'", optarg);
                return -1;
            }
            o->batch = (int)v;
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

static void print_text(const eval_opts *o, moe_model *m, const moe_infer_eval_result *r, const int64_t *dtok)
{
    printf("eval %s on %s: %lld windows x %d bytes = %lld tokens\n", o->ckpt, o->data, (long long)r->windows,
           (int)(r->tokens / r->windows), (long long)r->tokens);
    printf("loss %.6f nats/byte | %.6f bits/byte\n", r->loss, r->loss / M_LN2);
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
    cJSON_AddNumberToObject(j, "bpb", r->loss / M_LN2);
    cJSON_AddNumberToObject(j, "tokens", (double)r->tokens);
    cJSON_AddNumberToObject(j, "windows", (double)r->windows);
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
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    if (!s) return 1;
    printf("%s\n", s);
    free(s);
    return 0;
}

/* The data and the optional domain file, identical on every rank. */
static moe_status read_inputs(const eval_opts *o, uint8_t **data, size_t *n, uint8_t **dom)
{
    moe_status st = moe_infer_read_file(data, n, o->data);
    if (st || !o->domains) return st;
    size_t nd = 0;
    if ((st = moe_infer_read_file(dom, &nd, o->domains))) return st;
    if (nd != *n)
        return moe_errorf(MOE_ERR_ARG, "--domains '%s' has %zu bytes but --data '%s' has %zu (one id per byte)",
                          o->domains, nd, o->data, *n);
    return MOE_OK;
}

static int run(const eval_opts *o, moe_comm *comm)
{
    const int rank = moe_comm_rank(comm), W = moe_comm_size(comm);
    uint8_t *data = NULL, *dom = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    moe_model *m = NULL;
    moe_infer_eval_result res = {0};
    moe_status st = read_inputs(o, &data, &n, &dom);
    /* a byte-level model: every byte is its own token */
    if (!st && !(ids = moe_calloc(n, sizeof(int32_t)))) st = moe_errorf(MOE_ERR_NOMEM, "token ids of '%s'", o->data);
    for (size_t i = 0; !st && i < n; i++) ids[i] = data[i];
    st = moe_comm_agree(comm, st);
    if (!st) st = moe_infer_load(&m, NULL, o->ckpt, o->batch, 0, comm);
    if (!st) st = moe_infer_eval(&res, m, comm, ids, NULL, dom, n, moe_data_n_domains(), o->batch);
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
            print_text(o, m, &res, dtok);
    }
    moe_infer_eval_result_free(&res);
    moe_model_destroy(m);
    moe_free(ids);
    moe_free(data);
    moe_free(dom);
    return rc;
}

int moe_cmd_eval(int argc, char **argv)
{
    moe_comm *comm = NULL;
    const int start_rc = moe_cli_start("eval", 0, &comm);
    if (start_rc) return start_rc;
    const int rank = moe_comm_rank(comm);
    eval_opts o;
    int rc = parse(&o, argc, argv, rank);
    int ret;
    if (rc || o.help) {
        if (o.help && rank == 0) usage(stdout);
        ret = rc ? 2 : 0;
    } else {
        ret = run(&o, comm);
    }
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return ret;
}
