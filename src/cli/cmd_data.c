/* moe data synth: writes the built-in multi-domain corpus (and optionally the
 * domain id of every byte) and reports its size, domain shares and unigram
 * entropy. moe data encode: encodes a corpus into a token file over ranks
 * and threads (src/tokenizer). */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "core/moe.h"
#include "data/data.h"
#include "tokenizer/tok_comm.h"
#include "tokenizer/tokenizer.h"

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

/* path with its directory made absolute (symbolic links resolved), into
 * buf; 0 when the directory does not resolve. */
static int canonical(char *buf, size_t cap, const char *path)
{
    char d[PATH_MAX], b[PATH_MAX], dir[PATH_MAX];
    snprintf(d, sizeof d, "%s", path);
    snprintf(b, sizeof b, "%s", path);
    if (!realpath(dirname(d), dir)) return 0;
    return snprintf(buf, cap, "%s/%s", dir, basename(b)) < (int)cap;
}

/* a and b name one file: the same file on disk (hard links too), or the same
 * place once the directory is resolved (neither exists yet). */
static int same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (!strcmp(a, b)) return 1;
    if (!stat(a, &sa) && !stat(b, &sb)) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    char ca[PATH_MAX], cb[PATH_MAX];
    return canonical(ca, sizeof ca, a) && canonical(cb, sizeof cb, b) && !strcmp(ca, cb);
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
    /* the domain ids would overwrite the corpus just written */
    if (dom_path && same_file(out, dom_path)) {
        fprintf(stderr, "moe data synth: --out '%s' and --domains '%s' are the same file\n", out, dom_path);
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

static const char encode_usage[] =
    "usage: moe data encode --tokenizer T --data F --out F.tok [--threads N] [--doc-sep NAME [--doc-delim S]]\n"
    "\n"
    "Encodes the corpus F with tokenizer T into the token file F.tok (docs/tokenizer.md):\n"
    "the corpus is split into parts over ranks and threads at verified piece boundaries, so the\n"
    "ids are those of a single-threaded encode. Run under mpirun (launch/moe-local N data\n"
    "encode ...) to use several ranks; every rank maps F.\n"
    "  --threads N      threads per rank (default 1)\n"
    "  --doc-sep NAME   insert the special token NAME between documents: every occurrence of\n"
    "                   the delimiter becomes that token, and documents are encoded apart\n"
    "  --doc-delim S    the delimiter in F, with escapes \\n \\t \\r \\0 \\\\ \\xHH\n"
    "                   (default: NAME's own text, e.g. <|endoftext|> lines between documents;\n"
    "                   use --doc-delim '\\n\\n' for blank-line separated documents)\n";

static int cmd_encode(int argc, char **argv)
{
    static const struct option opts[] = {
        {"tokenizer", required_argument, NULL, 't'}, {"data", required_argument, NULL, 'd'},
        {"out", required_argument, NULL, 'o'},       {"threads", required_argument, NULL, 'j'},
        {"doc-sep", required_argument, NULL, 's'},   {"doc-delim", required_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},            {NULL, 0, NULL, 0}};
    const char *tok_path = NULL, *data = NULL, *out = NULL, *sep = NULL, *delim = NULL;
    long threads = 1;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 't': tok_path = optarg; break;
        case 'd': data = optarg; break;
        case 'o': out = optarg; break;
        case 's': sep = optarg; break;
        case 'D': delim = optarg; break;
        case 'j':
            if (moe_cli_parse_long(optarg, 1, 256, &threads)) {
                fprintf(stderr, "moe data encode: --threads: expected an integer in [1, 256], got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'h': fputs(encode_usage, stdout); return 0;
        default: fputs(encode_usage, stderr); return 2;
        }
    }
    if (optind < argc || !tok_path || !data || !out) {
        if (optind < argc) fprintf(stderr, "moe data encode: unexpected argument '%s'\n", argv[optind]);
        else fprintf(stderr, "moe data encode: --tokenizer, --data and --out are required\n");
        fputs(encode_usage, stderr);
        return 2;
    }
    moe_comm *comm = NULL;
    if (moe_cli_start("data encode", 0, &comm)) return 1;
    const int rank = moe_comm_rank(comm), W = moe_comm_size(comm);
    moe_tok *t = NULL;
    moe_tok_encoder *e = NULL;
    int r = 0;
    /* every rank reads the tokenizer; a failure anywhere stops all */
    moe_status st = moe_tok_load(&t, tok_path, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL);
    if (!st) st = moe_tok_encoder_create(&e, t);
    st = moe_comm_agree(comm, st);
    if (st) {
        moe_cli_error(W > 1 ? rank : -1, "data encode", st);
        r = 1;
    } else if ((r = moe_cli_doc_delim(e, t, sep, delim, "data encode", W > 1 ? rank : -1)) == 0) {
        /* the delimiter lives in the encoder; the file encoder takes it as bytes */
        const uint8_t *dbytes = NULL;
        size_t dlen = 0;
        int64_t sep_id = -1;
        uint8_t dbuf[4096];
        if (sep) {
            moe_tok_special_find(t, sep, &sep_id);
            dlen = moe_tok_encoder_delim(e, dbuf, sizeof dbuf);
            dbytes = dbuf;
        }
        moe_tok_encode_stats es = {0};
        st = moe_tok_encode_file(comm, t, data, out, (int)threads, dbytes, dlen, sep_id, &es);
        if (st) {
            moe_cli_error(W > 1 ? rank : -1, "data encode", st);
            r = 1;
        } else if (rank == 0) {
            printf("wrote %s: %llu tokens (%d bytes each) from %zu bytes of %s, %.3f bytes/token\n", out,
                   (unsigned long long)es.tokens, moe_tok_vocab_size(t) <= 65536 ? 2 : 4, es.bytes, data,
                   es.tokens ? (double)es.bytes / (double)es.tokens : 0.0);
            printf("%d rank(s) x %ld thread(s): encode %.3f s (%.2f MB/s), write %.3f s; %d split candidate(s) "
                   "repaired\n",
                   W, threads, es.encode_seconds, es.encode_seconds > 0 ? (double)es.bytes / es.encode_seconds / 1e6 : 0.0,
                   es.write_seconds, es.bad_splits);
            /* what the split allows on free cores, whatever else runs here */
            printf("parts: %d, CPU %.3f s in all: work split %.2fx\n", es.parts, es.cpu_sum, es.split_bound);
        }
    }
    /* a usage problem is the same on every rank: nobody is left waiting */
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return r;
}

int moe_cmd_data(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: moe data synth --out FILE [--bytes N] [--seed S] [--domains FILE]\n"
                   "       moe data encode --tokenizer T --data F --out F.tok [--threads N] [--doc-sep NAME]\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "synth")) return cmd_synth(argc - 1, argv + 1);
    if (!strcmp(argv[1], "encode")) return cmd_encode(argc - 1, argv + 1);
    fprintf(stderr, "moe data: unknown subcommand '%s' (expected 'synth' or 'encode')\n", argv[1]);
    return 2;
}
