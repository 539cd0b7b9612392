/* moe placement plan: a load-based expert placement (EPLB) from the
 * per-expert loads a checkpoint records (/stats/h/{L}/expert_tokens).
 *   moe placement plan --ckpt FILE|RUNDIR [--ranks P] [--replicas R] [--out FILE]
 * One process, no MPI (the single-process checkpoint reader). Prints, per
 * MoE layer, the most and the mean tokens per rank under the contiguous
 * placement and under the plan; writes the plan with --out (the file
 * `placement = FILE` of train, eval and generate takes). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt_file.h"
#include "cli/cli.h"
#include "layout/placement.h"

typedef struct {
    const char *ckpt, *out;
    long ranks, replicas; /* ranks 0: the checkpoint's ep size */
} plan_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe placement plan --ckpt FILE|RUNDIR [--ranks P] [--replicas R] [--out FILE]\n"
            "\n"
            "Plans which expert-parallel rank holds which experts of every MoE layer from the tokens each\n"
            "expert was assigned during training (the checkpoint's /stats/h/{L}/expert_tokens), as\n"
            "DeepSeek's EPLB does: the R extra copies go one at a time to the expert with the most tokens\n"
            "per copy, then copies are placed heaviest first on the least-loaded rank that has a free slot\n"
            "and no copy of that expert yet, then improving swaps (and, with replicas, moves of a copy to\n"
            "another hot expert while that helps). Every rank holds (E + R) / P experts. Prints per MoE layer the\n"
            "most and the mean tokens per rank, contiguous blocks (before) and planned (after; a\n"
            "replicated expert's tokens split evenly over its copies). Deterministic.\n"
            "  --ckpt FILE|RUNDIR  checkpoint file, or a run directory (its 'latest')\n"
            "  --ranks P           expert-parallel ranks of the run that will use it (default: the\n"
            "                      checkpoint's saved ep size)\n"
            "  --replicas R        extra copies of the hottest experts, >= 0 (default 0); P must divide\n"
            "                      E + R, and R <= E (P - 1)\n"
            "  --out FILE          write the placement there (JSON, docs/formats.md); without it nothing\n"
            "                      is written\n"
            "Use it with 'moe train|eval|generate --placement FILE' (key placement): results do not depend\n"
            "on the placement, only where experts run.\n");
}

#define perr(...) moe_cli_usage_error(-1, "placement plan", __VA_ARGS__)

/* 0 ok, 1 --help, -1 usage error (printed). */
static int parse(plan_opts *o, int argc, char **argv)
{
    static const struct option longs[] = {{"ckpt", required_argument, NULL, 'c'},
                                          {"ranks", required_argument, NULL, 'p'},
                                          {"replicas", required_argument, NULL, 'r'},
                                          {"out", required_argument, NULL, 'o'},
                                          {"help", no_argument, NULL, 'h'},
                                          {NULL, 0, NULL, 0}};
    *o = (plan_opts){0};
    opterr = 0;
    optind = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longs, NULL)) != -1;) {
        switch (ch) {
        case 'c': o->ckpt = optarg; break;
        case 'o': o->out = optarg; break;
        case 'p':
            if (moe_cli_parse_long(optarg, 1, 1 << 20, &o->ranks))
                return perr("--ranks: expected an integer in 1..1048576, got '%s'", optarg), -1;
            break;
        case 'r':
            if (moe_cli_parse_long(optarg, -(1L << 30), 1L << 30, &o->replicas))
                return perr("--replicas: expected an integer, got '%s'", optarg), -1;
            if (o->replicas < 0) return perr("--replicas %ld: must be >= 0", o->replicas), -1;
            break;
        case 'h': return 1;
        default:
            return perr("unknown option or missing value: '%s' (see 'moe placement plan --help')", argv[optind - 1]),
                   -1;
        }
    }
    if (optind < argc) return perr("unexpected argument '%s'", argv[optind]), -1;
    if (!o->ckpt) return perr("--ckpt is required (see 'moe placement plan --help')"), -1;
    return 0;
}

/* The loads (n_moe, E) of every MoE layer of file f, and the layers' blocks. */
static moe_status read_loads(const moe_ckpt_file *f, const char *path, int64_t **loads, int *blocks, int *n_moe)
{
    const moe_ckpt_info *in = moe_ckpt_file_info(f);
    const int E = in->model.n_experts;
    if (in->gradients)
        return moe_errorf(MOE_ERR_ARG, "'%s' is a gradient dump, not a checkpoint: it records no expert loads", path);
    *n_moe = moe_ckpt_moe_layers(moe_ckpt_file_layout(f), blocks);
    if (*n_moe == 0) return moe_errorf(MOE_ERR_ARG, "'%s': the model has no MoE layer", path);
    *loads = calloc((size_t)*n_moe * E, sizeof **loads);
    if (!*loads) return moe_errorf(MOE_ERR_NOMEM, "loads of %d layers", *n_moe);
    int64_t total = 0;
    for (int l = 0; l < *n_moe; l++) {
        char name[96];
        snprintf(name, sizeof name, "/stats/h/%d/expert_tokens", blocks[l]);
        const int i = moe_ckpt_file_find(f, name);
        if (i < 0 || !moe_ckpt_file_dset(f, i)->present)
            return moe_errorf(MOE_ERR_FORMAT, "'%s' has no %s (the per-expert loads 'moe train' records)", path, name);
        double *v = NULL;
        int64_t n = 0;
        moe_status st = moe_ckpt_file_read(f, i, &v, &n);
        if (st == MOE_OK && n != E)
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': %s has %lld entries, n_experts = %d", path, name, (long long)n, E);
        for (int64_t e = 0; st == MOE_OK && e < n; e++) total += (*loads)[(size_t)l * E + e] = (int64_t)v[e];
        moe_free(v);
        if (st) return st;
    }
    if (total == 0)
        return moe_errorf(MOE_ERR_ARG, "'%s' records no expert loads (every /stats/h/{L}/expert_tokens is 0: "
                                       "train at least one step first)", path);
    return MOE_OK;
}

static void max_mean(const double *v, int n, double *mx, double *mean)
{
    *mx = 0.0;
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        s += v[i];
        if (v[i] > *mx) *mx = v[i];
    }
    *mean = s / n;
}

static int run(const plan_opts *o)
{
    char file[4096];
    moe_ckpt_file *f = NULL;
    moe_placement *plan = NULL, *before = NULL;
    int64_t *loads = NULL;
    int blocks[MOE_CKPT_MAX_MOE_LAYERS], n_moe = 0;
    moe_status st = moe_ckpt_resolve(file, sizeof file, o->ckpt);
    if (st == MOE_OK) st = moe_ckpt_file_open(&f, file);
    if (st == MOE_OK) st = read_loads(f, file, &loads, blocks, &n_moe);
    const int E = st == MOE_OK ? moe_ckpt_file_info(f)->model.n_experts : 0;
    const int P = st == MOE_OK ? (o->ranks ? (int)o->ranks : (int)moe_ckpt_file_info(f)->saved_ep_size) : 0;
    if (st == MOE_OK) st = moe_placement_plan(&plan, loads, n_moe, E, P, (int)o->replicas);
    if (st == MOE_OK && E % P == 0) st = moe_placement_create_contiguous(&before, n_moe, E, P);
    double *rl = st == MOE_OK ? malloc((size_t)P * sizeof *rl) : NULL;
    if (st == MOE_OK && !rl) st = moe_errorf(MOE_ERR_NOMEM, "loads of %d ranks", P);
    if (st == MOE_OK) {
        printf("placement plan of %s: %d experts over %d ranks, %d replicas (%d experts per rank)\n", file, E, P,
               (int)o->replicas, moe_placement_slots_per_rank(plan));
        printf("tokens per rank (kept assignments since step 0); max/mean = 1 is perfect balance\n");
        printf("%-6s %-6s %14s %14s %9s %14s %9s\n", "layer", "block", "mean", "before max", "max/mean",
               "after max", "max/mean");
        double worst_b = 0.0, worst_a = 0.0;
        for (int l = 0; l < n_moe; l++) {
            double mb = 0.0, ma, mean;
            if (before) {
                moe_placement_rank_loads(before, l, loads + (size_t)l * E, rl);
                max_mean(rl, P, &mb, &mean);
            }
            moe_placement_rank_loads(plan, l, loads + (size_t)l * E, rl);
            max_mean(rl, P, &ma, &mean);
            const double rb = mean > 0 ? mb / mean : 0.0, ra = mean > 0 ? ma / mean : 0.0;
            if (rb > worst_b) worst_b = rb;
            if (ra > worst_a) worst_a = ra;
            if (before)
                printf("%-6d %-6d %14.1f %14.1f %9.3f %14.1f %9.3f\n", l, blocks[l], mean, mb, rb, ma, ra);
            else
                printf("%-6d %-6d %14.1f %14s %9s %14.1f %9.3f\n", l, blocks[l], mean, "-", "-", ma, ra);
        }
        if (before)
            printf("worst layer max/mean: before %.3f, after %.3f\n", worst_b, worst_a);
        else
            printf("worst layer max/mean after %.3f (no contiguous placement: %d ranks do not divide %d experts)\n",
                   worst_a, P, E);
    }
    if (st == MOE_OK && o->out) {
        st = moe_placement_save(plan, blocks, o->out);
        if (st == MOE_OK) printf("wrote %s (use: --placement %s)\n", o->out, o->out);
    } else if (st == MOE_OK) {
        printf("(no --out: nothing written)\n");
    }
    free(rl);
    free(loads);
    moe_placement_destroy(plan);
    moe_placement_destroy(before);
    moe_ckpt_file_close(f);
    if (st != MOE_OK) {
        moe_cli_error(-1, "placement plan", st);
        return st == MOE_ERR_ARG ? 2 : 1;
    }
    return 0;
}

int moe_cmd_placement(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "plan")) {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
            usage(stdout);
            return 0;
        }
        fprintf(stderr, "moe placement: expected 'plan' (see 'moe placement plan --help')\n");
        return 2;
    }
    plan_opts o;
    const int p = parse(&o, argc - 1, argv + 1);
    if (p == 1) {
        usage(stdout);
        return 0;
    }
    if (p < 0) return 2;
    return run(&o);
}
