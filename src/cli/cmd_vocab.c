/* moe vocab partition: builds the partition of the vocabulary into
 * vocabulary experts (docs/vocab-experts.md section 2) exactly as a
 * training run with head = vocab_experts would (moe_train_vocab_partition),
 * writes it as a partition file (usable as vocab_partition = file) and
 * prints each set's size and share of the tokens. One process, no MPI: the
 * partition does not depend on the number of ranks. */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "ckpt/ckpt_file.h"
#include "infer/infer.h"
#include "tokenizer/tokfile.h"
#include "train/run.h"

typedef struct {
    const char *data, *from, *out, *method;
    int experts, iters, json, help;
    double balance;
    long seed;
} vocab_opts;

static void usage(FILE *f)
{
    fprintf(f, "usage: moe vocab partition --experts M [--data F] [--method frequency|kmeans|file] [--from PATH]\n"
               "                          [--kmeans-iters N] [--balance B] [--seed S] [--out P.h5] [--json]\n"
               "\n"
               "Splits the vocabulary into M vocabulary experts as `moe train` does with head = vocab_experts\n"
               "(the same keys: vocab_experts, vocab_partition, vocab_partition_from, kmeans_iters,\n"
               "vocab_balance, seed), writes the partition file P.h5 (vocab_partition = file reads it) and\n"
               "prints each expert's set size and share of the tokens of F.\n"
               "  --experts M        vocabulary experts (2 <= M <= vocab size)\n"
               "  --data F           the training data: a token file (.tok, moe data encode) or bytes; needed\n"
               "                     by frequency, optional otherwise (the shares printed)\n"
               "  --method NAME      frequency (bands of equal token count, default), kmeans (over the wte of\n"
               "                     the checkpoint --from), file (the partition file --from, checked)\n"
               "  --from PATH        kmeans: checkpoint or run directory; file: partition file\n"
               "  --kmeans-iters N   Lloyd steps (default 25)\n"
               "  --balance B        cap each set at ceil(V/M B) tokens (default 2; 0: no cap)\n"
               "  --seed S           the k-means++ seed (default 1234, as moe train)\n"
               "  --out P.h5         write the partition file\n"
               "  --json             print {\"experts\": [{\"size\", \"tokens\", \"share\"}], ...}\n");
}

#define perr(...) moe_cli_usage_error(-1, "vocab partition", __VA_ARGS__)

static int parse(vocab_opts *o, int argc, char **argv)
{
    static const struct option longs[] = {
        {"data", required_argument, NULL, 'd'},     {"experts", required_argument, NULL, 'M'},
        {"method", required_argument, NULL, 'm'},   {"from", required_argument, NULL, 'f'},
        {"kmeans-iters", required_argument, NULL, 'i'}, {"balance", required_argument, NULL, 'b'},
        {"seed", required_argument, NULL, 's'},     {"out", required_argument, NULL, 'o'},
        {"json", no_argument, NULL, 'j'},           {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    moe_train_config d;
    moe_train_config_default(&d);
    *o = (vocab_opts){.method = "frequency", .iters = d.kmeans_iters, .balance = d.vocab_balance, .seed = d.seed};
    opterr = 0;
    optind = 1;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        long v;
        switch (ch) {
        case 'd': o->data = optarg; break;
        case 'm': o->method = optarg; break;
        case 'f': o->from = optarg; break;
        case 'o': o->out = optarg; break;
        case 'j': o->json = 1; break;
        case 'h': o->help = 1; return 0;
        case 'M':
            if (moe_cli_parse_long(optarg, 2, 1 << 16, &v)) return perr("--experts: expected an integer in 2..65536, got '%s'", optarg), -1;
            o->experts = (int)v;
            break;
        case 'i':
            if (moe_cli_parse_long(optarg, 1, 1 << 20, &v)) return perr("--kmeans-iters: expected an integer >= 1, got '%s'", optarg), -1;
            o->iters = (int)v;
            break;
        case 's':
            if (moe_cli_parse_long(optarg, 0, 4294967295L, &o->seed)) return perr("--seed: expected an integer in 0..4294967295, got '%s'", optarg), -1;
            break;
        case 'b':
            if (moe_cli_parse_double(optarg, &o->balance) || o->balance < 0)
                return perr("--balance: expected a number >= 0, got '%s'", optarg), -1;
            break;
        default: return perr("unknown option or missing value: '%s' (see 'moe vocab partition --help')", argv[optind - 1]), -1;
        }
    }
    if (optind < argc) return perr("unexpected argument '%s'", argv[optind]), -1;
    if (!o->experts) return perr("--experts M is required"), -1;
    return 0;
}

/* The token counts of F (.tok: its ids; else its bytes) and its vocabulary. */
static moe_status count_tokens(const char *path, int64_t **counts, int *V)
{
    const size_t n = strlen(path);
    if (n > 4 && !strcmp(path + n - 4, ".tok")) {
        moe_tok_file *f = NULL;
        moe_status st = moe_tok_file_open(&f, path, NULL);
        if (st) return st;
        *V = (int)moe_tok_file_vocab_size(f);
        if (!(*counts = calloc((size_t)*V, sizeof **counts))) st = moe_errorf(MOE_ERR_NOMEM, "token counts");
        for (int64_t i = 0; !st && i < moe_tok_file_n_tokens(f); i++) (*counts)[moe_tok_file_get(f, i)]++;
        moe_tok_file_close(f);
        return st;
    }
    uint8_t *data = NULL;
    size_t len = 0;
    moe_status st = moe_infer_read_file(&data, &len, path);
    *V = 256;
    if (!st && !(*counts = calloc(256, sizeof **counts))) st = moe_errorf(MOE_ERR_NOMEM, "token counts");
    for (size_t i = 0; !st && i < len; i++) (*counts)[data[i]]++;
    moe_free(data);
    return st;
}

/* The vocabulary size a method without --data works on: the file's. */
static moe_status vocab_of(const vocab_opts *o, int *V)
{
    if (!strcmp(o->method, "file")) {
        moe_vocab_part *p = NULL;
        moe_status st = moe_vocab_part_read(&p, o->from, 0, o->experts);
        if (!st) *V = moe_vocab_part_vocab(p);
        moe_vocab_part_destroy(p);
        return st;
    }
    /* kmeans: the rows of the checkpoint's wte */
    char file[4096];
    moe_ckpt_file *f = NULL;
    moe_status st = moe_ckpt_resolve(file, sizeof file, o->from);
    if (!st) st = moe_ckpt_file_open(&f, file);
    if (!st) *V = moe_ckpt_file_info(f)->model.vocab_size;
    moe_ckpt_file_close(f);
    return st;
}

static void print(const vocab_opts *o, const moe_vocab_part *p, const int64_t *counts)
{
    const int M = moe_vocab_part_experts(p), V = moe_vocab_part_vocab(p);
    const int32_t *off = moe_vocab_part_offsets(p), *assign = moe_vocab_part_assign(p);
    double *tok = calloc((size_t)M, sizeof *tok), total = 0, cost = 0, lmax = 0;
    for (int v = 0; counts && v < V; v++) tok[assign[v]] += (double)counts[v], total += (double)counts[v];
    int smin = V, smax = 0;
    for (int m = 0; m < M; m++) {
        const int size = off[m + 1] - off[m];
        smin = size < smin ? size : smin, smax = size > smax ? size : smax;
        if (total > 0) cost += tok[m] / total * size, lmax = fmax(lmax, tok[m] / total);
    }
    if (o->json) {
        cJSON *j = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(j, "experts");
        cJSON_AddNumberToObject(j, "vocab_size", V);
        cJSON_AddStringToObject(j, "method", o->method);
        if (total > 0) cJSON_AddNumberToObject(j, "mean_target_set_size", cost);
        for (int m = 0; m < M; m++) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "size", off[m + 1] - off[m]);
            if (counts) cJSON_AddNumberToObject(x, "tokens", tok[m]), cJSON_AddNumberToObject(x, "share", total > 0 ? tok[m] / total : 0);
            cJSON_AddItemToArray(arr, x);
        }
        moe_cli_print_json(j);
    } else {
        printf("vocabulary partition (%s): %d tokens into %d experts, sets of %d..%d tokens (mean %.1f)\n", o->method, V, M,
               smin, smax, (double)V / M);
        if (total > 0)
            printf("tokens of %s: %.0f; largest expert share %.2f%% (uniform %.2f%%); a training position computes "
                   "%.1f logits on average (full head: %d)\n", o->data, total, 100 * lmax, 100.0 / M, cost + M, V);
        printf("%6s %8s%s\n", "expert", "size", counts ? "       tokens   share" : "");
        for (int m = 0; m < M; m++) {
            printf("%6d %8d", m, off[m + 1] - off[m]);
            if (counts) printf(" %12.0f %6.2f%%", tok[m], total > 0 ? 100 * tok[m] / total : 0);
            printf("\n");
        }
    }
    free(tok);
}

static int run(const vocab_opts *o)
{
    moe_train_config c;
    moe_train_config_default(&c);
    c.head = MOE_HEAD_VOCAB_EXPERTS;
    c.vocab_experts = o->experts;
    c.kmeans_iters = o->iters;
    c.vocab_balance = o->balance;
    c.seed = (uint32_t)o->seed;
    int64_t *counts = NULL;
    int V = 0;
    moe_status st = moe_train_config_set(&c, "vocab_partition", o->method);
    if (!st && !strcmp(o->method, "frequency") && !o->data)
        st = moe_errorf(MOE_ERR_ARG, "--method frequency needs --data (the tokens to count)");
    if (!st && strcmp(o->method, "frequency") && !o->from)
        st = moe_errorf(MOE_ERR_ARG, "--method %s needs --from (%s)", o->method,
                        strcmp(o->method, "kmeans") ? "a partition file" : "a checkpoint whose wte is clustered");
    if (!st && o->from) st = moe_train_config_set(&c, "vocab_partition_from", o->from);
    if (!st && o->data) st = count_tokens(o->data, &counts, &V);
    if (!st && !o->data) st = vocab_of(o, &V);
    if (!st) {
        c.vocab_size = V;
        st = moe_train_config_check_model(&c); /* M <= V, among others */
    }
    moe_vocab_part *p = NULL;
    if (!st) st = moe_train_vocab_partition(&p, &c, counts, moe_comm_self());
    if (!st && o->out) st = moe_vocab_part_write(p, o->out, o->method);
    if (!st) print(o, p, counts);
    if (!st && o->out && !o->json) printf("wrote %s\n", o->out);
    if (st) moe_cli_error(-1, "vocab partition", st);
    moe_vocab_part_destroy(p);
    free(counts);
    return st ? 1 : 0;
}

int moe_cmd_vocab(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "partition")) {
        fprintf(stderr, "usage: moe vocab partition ... (see 'moe vocab partition --help')\n");
        return 2;
    }
    vocab_opts o;
    const int rc = parse(&o, argc - 1, argv + 1);
    if (rc || o.help) {
        if (o.help) usage(stdout);
        return rc ? 2 : 0;
    }
    return run(&o);
}
