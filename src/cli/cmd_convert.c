/* moe convert: Hugging Face checkpoint directories <-> moerun checkpoints.
 *   moe convert import --hf DIR --out CKPT [--seq-len N] [--no-tokenizer]
 *   moe convert export --ckpt CKPT --out DIR [--model-type T] [--shard-bytes N]
 * One process (no MPI). Option parsing and printing only: the work is
 * src/convert (docs/convert.md). */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "convert/convert.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe convert import --hf DIR --out CKPT [--seq-len N] [--no-tokenizer]\n"
            "       moe convert export --ckpt CKPT|RUNDIR --out DIR [--model-type T] [--shard-bytes N]\n"
            "\n"
            "import: a Hugging Face directory (config.json, model.safetensors or shards with\n"
            "  model.safetensors.index.json, optional tokenizer.json) of model_type mixtral, qwen2_moe,\n"
            "  qwen3_moe or olmoe into a moerun checkpoint at step 0 (F32, F16 and BF16 read).\n"
            "  --seq-len N      context length: min(max_position_embeddings, N) (default %d)\n"
            "  --no-tokenizer   do not carry tokenizer.json over\n"
            "export: a checkpoint into config.json + F32 safetensors (+ tokenizer.json) that\n"
            "  transformers loads; per-expert tensor names as on the hub.\n"
            "  --model-type T   mixtral, qwen2_moe, qwen3_moe or olmoe (default: the type whose\n"
            "                   computation the model's options are)\n"
            "  --shard-bytes N  shard past N bytes (default 2000000000, as huggingface_hub)\n"
            "Import then export gives every tensor back bit for bit. Unsupported fields (sliding\n"
            "windows in use, rope scaling, MLA, ...) and malformed input are errors naming them.\n",
            MOE_HF_DEFAULT_SEQ_CAP);
}

#define perr(...) moe_cli_usage_error(-1, "convert", __VA_ARGS__)

/* The end of a subcommand's option parsing: no argument left over, and both
 * paths given (need: what to say if not). Returns 0, or the exit status 2. */
static int check_args(int argc, char **argv, const char *in, const char *out, const char *need)
{
    if (optind < argc) {
        perr("unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!in || !out) {
        perr("%s (see 'moe convert --help')", need);
        return 2;
    }
    return 0;
}

/* What a subcommand did (st: its status): the error, or the report.
 * Returns the exit status. */
static int report(const char *what, moe_status st, const char *from, const char *to, const moe_convert_report *r)
{
    if (st) {
        char cmd[32];
        snprintf(cmd, sizeof cmd, "convert %s", what);
        moe_cli_error(-1, cmd, st);
        return 1;
    }
    const moe_train_config *c = &r->cfg;
    printf("moe convert %s: %s -> %s\n", what, from, to);
    printf("  %s: %lld tensors, %lld parameters (%.1f MB as float32)\n", moe_hf_type_str(r->type),
           (long long)r->n_tensors, (long long)r->n_params, r->bytes / 1e6);
    printf("  d_model %d, %d layers, %d heads (%d kv, head_dim %d), %d experts top-%d (d_ff %d)%s%s, vocab %d, "
           "seq_len %d\n",
           c->d_model, c->n_layers, c->n_heads, moe_cfg_kv_heads(c), moe_cfg_head_dim(c), c->n_experts, c->top_k,
           c->d_ff, c->n_shared ? ", shared expert" : "", c->qk_norm ? ", q/k norm" : "", c->vocab_size, c->seq_len);
    if (r->tokenizer) printf("  tokenizer carried over\n");
    if (r->dropless_warning)
        printf("  note: the model was trained with capacity_factor %g; transformers routes dropless\n",
               c->capacity_factor);
    return 0;
}

static int cmd_import(int argc, char **argv)
{
    static const struct option longs[] = {{"hf", required_argument, NULL, 'i'},
                                          {"out", required_argument, NULL, 'o'},
                                          {"seq-len", required_argument, NULL, 's'},
                                          {"seq_len", required_argument, NULL, 's'},
                                          {"no-tokenizer", no_argument, NULL, 'n'},
                                          {"help", no_argument, NULL, 'h'},
                                          {NULL, 0, NULL, 0}};
    const char *in = NULL, *out = NULL;
    moe_convert_import_opts o = {0};
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        switch (ch) {
        case 'i': in = optarg; break;
        case 'o': out = optarg; break;
        case 'n': o.no_tokenizer = 1; break;
        case 'h': usage(stdout); return 0;
        case 's': {
            long v;
            if (moe_cli_parse_long(optarg, 1, 1 << 20, &v)) {
                perr("--seq-len: expected an integer in 1..%d, got '%s'", 1 << 20, optarg);
                return 2;
            }
            o.seq_cap = (int)v;
            break;
        }
        default: perr("unknown option or missing value: '%s' (see 'moe convert --help')", argv[optind - 1]); return 2;
        }
    }
    const int rc = check_args(argc, argv, in, out, "import needs --hf DIR and --out CKPT");
    if (rc) return rc;
    moe_convert_report r;
    return report("import", moe_convert_import(in, out, &o, &r), in, out, &r);
}

static int cmd_export(int argc, char **argv)
{
    static const struct option longs[] = {{"ckpt", required_argument, NULL, 'c'},
                                          {"out", required_argument, NULL, 'o'},
                                          {"model-type", required_argument, NULL, 't'},
                                          {"model_type", required_argument, NULL, 't'},
                                          {"shard-bytes", required_argument, NULL, 'b'},
                                          {"help", no_argument, NULL, 'h'},
                                          {NULL, 0, NULL, 0}};
    const char *in = NULL, *out = NULL;
    int type = -1;
    long long shard = 0;
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        switch (ch) {
        case 'c': in = optarg; break;
        case 'o': out = optarg; break;
        case 'h': usage(stdout); return 0;
        case 't': {
            moe_hf_type t;
            if (moe_hf_type_parse(&t, optarg)) {
                perr("--model-type: %s", moe_error_detail());
                return 2;
            }
            type = (int)t;
            break;
        }
        case 'b': {
            long v;
            if (moe_cli_parse_long(optarg, 1, 0x7fffffffL, &v)) {
                perr("--shard-bytes: expected an integer in 1..2147483647, got '%s'", optarg);
                return 2;
            }
            shard = v;
            break;
        }
        default: perr("unknown option or missing value: '%s' (see 'moe convert --help')", argv[optind - 1]); return 2;
        }
    }
    const int rc = check_args(argc, argv, in, out, "export needs --ckpt CKPT and --out DIR");
    if (rc) return rc;
    moe_convert_report r;
    return report("export", moe_convert_export(in, out, type, (uint64_t)shard, &r), in, out, &r);
}

int moe_cmd_convert(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "import")) return cmd_import(argc - 1, argv + 1);
    if (!strcmp(argv[1], "export")) return cmd_export(argc - 1, argv + 1);
    perr("unknown subcommand '%s' (expected import or export)", argv[1]);
    return 2;
}
