/* moe data synth: writes the built-in multi-domain corpus (and optionally the
 * domain id of every byte) and reports its size, domain shares and unigram
 * entropy. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/moe.h"
#include "data/data.h"

static void synth_usage(FILE *f)
{
    fprintf(f,
            "usage: moe data synth --out FILE [--bytes N] [--seed S] [--domains FILE]\n"
            "\n"
            "Writes the deterministic multi-domain training corpus (a pure function of the seed).\n"
            "  --out FILE      corpus file to write\n"
            "  --bytes N       corpus size; suffix K, M or G for 2^10, 2^20, 2^30 (default 4M)\n"
            "  --seed S        corpus seed, 0..4294967295 (default 1)\n"
            "  --domains FILE  also write one byte per corpus byte: its domain id (0..%d)\n",
            moe_data_n_domains() - 1);
}

/* "4M" -> 4194304; 0 on malformed input, zero or overflow. */
static size_t parse_bytes(const char *s)
{
    if (!(s[0] >= '0' && s[0] <= '9')) return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    unsigned shift = 0;
    if (*end == 'K' || *end == 'k') shift = 10, end++;
    else if (*end == 'M' || *end == 'm') shift = 20, end++;
    else if (*end == 'G' || *end == 'g') shift = 30, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || errno == ERANGE || v == 0 || v > (SIZE_MAX >> shift)) return 0;
    return (size_t)v << shift;
}

static int cmd_synth(int argc, char **argv)
{
    static const struct option opts[] = {
        {"out", required_argument, NULL, 'o'},  {"bytes", required_argument, NULL, 'b'},
        {"seed", required_argument, NULL, 's'}, {"domains", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},       {NULL, 0, NULL, 0}};
    const char *out = NULL, *dom_path = NULL;
    size_t n = (size_t)4 << 20;
    uint32_t seed = 1;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'd': dom_path = optarg; break;
        case 'b':
            if (!(n = parse_bytes(optarg))) {
                fprintf(stderr, "moe data synth: --bytes: expected a positive size like 4M, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 's': {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (!(optarg[0] >= '0' && optarg[0] <= '9') || *end || errno == ERANGE || v > 0xffffffffull) {
                fprintf(stderr, "moe data synth: --seed: expected an integer in [0, 4294967295], got '%s'\n", optarg);
                return 2;
            }
            seed = (uint32_t)v;
            break;
        }
        case 'h': synth_usage(stdout); return 0;
        default: synth_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "moe data synth: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!out) {
        fprintf(stderr, "moe data synth: --out FILE is required\n");
        synth_usage(stderr);
        return 2;
    }

    uint8_t *text = malloc(n), *dom = malloc(n);
    if (!text || !dom) {
        free(text);
        free(dom);
        moe_cli_error(-1, "data synth", moe_errorf(MOE_ERR_NOMEM, "cannot allocate 2 x %zu bytes", n));
        return 1;
    }
    moe_status st = moe_data_synth(text, dom, n, seed);
    if (!st) st = moe_data_write_file(out, text, n);
    if (!st && dom_path) st = moe_data_write_file(dom_path, dom, n);
    if (!st) {
        size_t count[256] = {0};
        for (size_t i = 0; i < n; i++) count[dom[i]]++;
        printf("wrote %zu bytes to %s (seed %u)%s%s\n", n, out, (unsigned)seed, dom_path ? ", domain ids to " : "",
               dom_path ? dom_path : "");
        for (int d = 0; d < moe_data_n_domains(); d++)
            printf("  domain %d %-8s %5.1f%%\n", d, moe_data_domain_name(d), 100.0 * (double)count[d] / (double)n);
        printf("unigram entropy: %.4f bits/byte\n", moe_data_bytes_entropy(text, n));
    }
    free(text);
    free(dom);
    if (st) {
        moe_cli_error(-1, "data synth", st);
        return 1;
    }
    return 0;
}

int moe_cmd_data(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: moe data synth --out FILE [--bytes N] [--seed S] [--domains FILE]\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "synth")) return cmd_synth(argc - 1, argv + 1);
    fprintf(stderr, "moe data: unknown subcommand '%s' (expected 'synth')\n", argv[1]);
    return 2;
}
