/* moe tokenizer: train, import, export, encode, decode and describe
 * byte-level BPE tokenizers (src/tokenizer). Single-process; `moe data
 * encode` is the parallel corpus encoder. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cli/cli.h"
#include "core/moe.h"
#include "comm/comm.h"
#include "tokenizer/tok_comm.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokfile.h"

/* ---- input and output helpers ---- */

void moe_cli_input_free(moe_cli_input *in)
{
    if (in->mapped) moe_tok_text_unmap(&(moe_tok_text){in->data, in->n});
    else free(in->data);
    in->data = NULL;
    in->n = 0;
    in->mapped = 0;
}

int moe_cli_input_read(moe_cli_input *in, const char *path)
{
    memset(in, 0, sizeof *in);
    if (path && strcmp(path, "-")) {
        moe_tok_text t;
        const moe_status st = moe_tok_text_map(&t, path);
        if (st) return st;
        if (t.n) madvise(t.data, t.n, MADV_SEQUENTIAL);
        in->data = t.data;
        in->n = t.n;
        in->mapped = t.n > 0;
        return MOE_OK;
    }
    size_t cap = 1 << 20;
    in->data = malloc(cap);
    if (!in->data) return moe_errorf(MOE_ERR_NOMEM, "stdin buffer");
    for (;;) {
        if (in->n == cap) {
            uint8_t *p = realloc(in->data, cap * 2);
            if (!p) return moe_errorf(MOE_ERR_NOMEM, "stdin buffer of %zu bytes", cap * 2);
            in->data = p;
            cap *= 2;
        }
        size_t k = fread(in->data + in->n, 1, cap - in->n, stdin);
        in->n += k;
        if (k == 0) break;
    }
    if (ferror(stdin)) return moe_errorf(MOE_ERR_IO, "cannot read standard input");
    return MOE_OK;
}

static int write_all(FILE *f, const void *p, size_t n, const char *path)
{
    if (n && fwrite(p, 1, n, f) != n) return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return MOE_OK;
}

static FILE *open_out(const char *path)
{
    if (!path || !strcmp(path, "-")) return stdout;
    return fopen(path, "wb");
}

static int close_out(FILE *f, const char *path)
{
    if (f == stdout) return fflush(f) ? moe_errorf(MOE_ERR_IO, "cannot write standard output") : MOE_OK;
    if (fclose(f)) return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return MOE_OK;
}

/* "NAME" or "NAME=ID" for --special. */
typedef struct {
    int n;
    const char *names[MOE_TOK_MAX_SPECIALS];
    char *owned[MOE_TOK_MAX_SPECIALS];
    int64_t ids[MOE_TOK_MAX_SPECIALS];
} special_args;

static int special_arg(special_args *s, const char *arg, int need_id)
{
    if (s->n >= MOE_TOK_MAX_SPECIALS) return -1;
    const char *eq = strrchr(arg, '=');
    long id = -1;
    if (eq && eq[1] && !moe_cli_parse_long(eq + 1, 0, MOE_TOK_MAX_VOCAB - 1, &id)) {
        s->owned[s->n] = strndup(arg, (size_t)(eq - arg));
        s->names[s->n] = s->owned[s->n];
    } else {
        if (need_id) return -1;
        s->owned[s->n] = NULL;
        s->names[s->n] = arg;
    }
    if (!s->names[s->n] || !*s->names[s->n]) return -1;
    s->ids[s->n++] = id;
    return 0;
}

static void special_free(special_args *s)
{
    for (int i = 0; i < s->n; i++) free(s->owned[i]);
}

/* C-style escapes in --doc-delim: \n \t \r \0 \\ \xHH. */
static int unescape(uint8_t *out, size_t *n, const char *s)
{
    size_t w = 0;
    for (const char *p = s; *p; p++) {
        if (*p != '\\') {
            out[w++] = (uint8_t)*p;
            continue;
        }
        p++;
        switch (*p) {
        case 'n': out[w++] = '\n'; break;
        case 't': out[w++] = '\t'; break;
        case 'r': out[w++] = '\r'; break;
        case '0': out[w++] = 0; break;
        case '\\': out[w++] = '\\'; break;
        case 'x': {
            int v = 0;
            for (int k = 0; k < 2; k++) {
                char c = *++p;
                int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
                if (d < 0) return -1;
                v = v * 16 + d;
            }
            out[w++] = (uint8_t)v;
            break;
        }
        default: return -1;
        }
    }
    *n = w;
    return w ? 0 : -1;
}

int moe_cli_doc_delim(moe_tok_encoder *e, const moe_tok *t, const char *sep_name, const char *delim_arg,
                      const char *cmd, int rank)
{
    if (!sep_name) {
        if (delim_arg) moe_cli_usage_error(rank, cmd, "--doc-delim needs --doc-sep NAME");
        return delim_arg ? 2 : 0;
    }
    int64_t sep;
    moe_status st = moe_tok_special_find(t, sep_name, &sep);
    if (st) {
        moe_cli_usage_error(rank, cmd, "--doc-sep: %s", moe_error_detail());
        return 2;
    }
    uint8_t buf[4096];
    size_t n;
    if (delim_arg) {
        if (strlen(delim_arg) >= sizeof buf || unescape(buf, &n, delim_arg)) {
            moe_cli_usage_error(rank, cmd,
                                "--doc-delim: '%s' is not a non-empty string with escapes \\n \\t \\r \\0 \\\\ \\xHH",
                                delim_arg);
            return 2;
        }
    } else { /* default: the special's own text marks document ends in the input */
        n = strlen(sep_name);
        memcpy(buf, sep_name, n);
    }
    st = moe_tok_encoder_set_delim(e, buf, n, sep);
    if (st) {
        moe_cli_error(rank, cmd, st);
        return 1;
    }
    return 0;
}

typedef enum { FMT_TEXT, FMT_U16, FMT_U32, FMT_TOK } id_format;

static int parse_format(const char *s, id_format *f, int allow_tok)
{
    if (!strcmp(s, "text")) *f = FMT_TEXT;
    else if (!strcmp(s, "u16")) *f = FMT_U16;
    else if (!strcmp(s, "u32")) *f = FMT_U32;
    else if (allow_tok && !strcmp(s, "tok")) *f = FMT_TOK;
    else return -1;
    return 0;
}

static int load_tok(moe_tok **t, const char *path, const char *pattern, const char *cmd, double *seconds)
{
    double t0 = moe_now();
    moe_status st = moe_tok_load(t, path, MOE_TOK_FORM_AUTO, pattern, 0, NULL, NULL);
    if (seconds) *seconds = moe_now() - t0;
    if (st) moe_cli_error(-1, cmd, st);
    return st ? 1 : 0;
}

/* ---- subcommands ---- */

static const char *const usage_text =
    "usage: moe tokenizer <subcommand> [options]\n"
    "\n"
    "  train  --data F --vocab-size N [--pattern P] [--special NAME ...] [--threads N] --out T\n"
    "  import --from F [--form auto|tiktoken-json|tiktoken|hf] [--pattern P] [--special NAME=ID ...] --out T\n"
    "  export --tokenizer T --form tiktoken-json|tiktoken|hf --out F\n"
    "  encode --tokenizer T [--in F] [--out F] [--format text|u16|u32] [--doc-sep NAME [--doc-delim S]] [--stats]\n"
    "  decode --tokenizer T [--in F] [--out F] [--format text|u16|u32|tok] [--stats]\n"
    "  info   --tokenizer T [--id N ...]\n"
    "\n"
    "T is moerun's tokenizer file: a tiktoken JSON encoder ({\"pat_str\", \"special_tokens\",\n"
    "\"bpe_ranks\"}); a Hugging Face tokenizer.json is read as well. P is a regex (PCRE2) or\n"
    "one of gpt2, r50k_base, p50k_base, cl100k_base, o200k_base. F '-' (the default for\n"
    "--in and --out) is standard input/output. Ids as text are separated by spaces;\n"
    "u16/u32 are little-endian binary; tok is a token file (moe data encode).\n"
    "--doc-sep NAME replaces every occurrence of the delimiter (--doc-delim, escapes\n"
    "allowed; default: NAME's own text) by that special token; documents between\n"
    "delimiters are encoded separately.\n";

enum {
    O_DATA = 256, O_VOCAB, O_PATTERN, O_SPECIAL, O_OUT, O_FROM, O_FORM, O_TOK, O_IN, O_FORMAT, O_DOCSEP, O_DOCDELIM,
    O_STATS, O_ID, O_THREADS
};

static const struct option long_opts[] = {
    {"data", required_argument, NULL, O_DATA},       {"vocab-size", required_argument, NULL, O_VOCAB},
    {"pattern", required_argument, NULL, O_PATTERN}, {"special", required_argument, NULL, O_SPECIAL},
    {"out", required_argument, NULL, O_OUT},         {"from", required_argument, NULL, O_FROM},
    {"form", required_argument, NULL, O_FORM},       {"tokenizer", required_argument, NULL, O_TOK},
    {"in", required_argument, NULL, O_IN},           {"format", required_argument, NULL, O_FORMAT},
    {"doc-sep", required_argument, NULL, O_DOCSEP},  {"doc-delim", required_argument, NULL, O_DOCDELIM},
    {"stats", no_argument, NULL, O_STATS},           {"id", required_argument, NULL, O_ID},
    {"threads", required_argument, NULL, O_THREADS}, {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0}};

typedef struct {
    const char *data, *pattern, *out, *from, *tok, *in, *doc_sep, *doc_delim;
    long vocab, threads;
    moe_tok_form form;
    int form_set;
    id_format format;
    int stats;
    special_args sp;
    long ids[64];
    int n_ids;
} opts_t;

/* 1 if `word` is one of the space-separated words of `list`. */
static int has_word(const char *list, const char *word)
{
    const size_t n = strlen(word);
    for (const char *p = list; (p = strstr(p, word)); p += n)
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
    return 0;
}

/* Parses the options of subcommand `sub`; returns -1 to go on, else an exit status. */
static int parse(opts_t *o, int argc, char **argv, const char *cmd, const char *allowed)
{
    memset(o, 0, sizeof *o);
    o->threads = 1;
    optind = 1;
    for (int c; (c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1;) {
        if (c == 'h') {
            fputs(usage_text, stdout);
            return 0;
        }
        if (c == '?') return 2;
        const struct option *lo = NULL;
        for (const struct option *p = long_opts; p->name; p++)
            if (p->val == c) lo = p;
        if (!lo || !has_word(allowed, lo->name)) {
            moe_cli_usage_error(-1, cmd, "option --%s does not apply here", lo ? lo->name : "?");
            return 2;
        }
        switch (c) {
        case O_DATA: o->data = optarg; break;
        case O_PATTERN: o->pattern = optarg; break;
        case O_OUT: o->out = optarg; break;
        case O_FROM: o->from = optarg; break;
        case O_TOK: o->tok = optarg; break;
        case O_IN: o->in = optarg; break;
        case O_DOCSEP: o->doc_sep = optarg; break;
        case O_DOCDELIM: o->doc_delim = optarg; break;
        case O_STATS: o->stats = 1; break;
        case O_VOCAB:
            if (moe_cli_parse_long(optarg, 256, MOE_TOK_MAX_VOCAB, &o->vocab)) {
                moe_cli_usage_error(-1, cmd, "--vocab-size: expected an integer in [256, %d], got '%s'", MOE_TOK_MAX_VOCAB,
                                    optarg);
                return 2;
            }
            break;
        case O_THREADS:
            if (moe_cli_parse_long(optarg, 1, 256, &o->threads)) {
                moe_cli_usage_error(-1, cmd, "--threads: expected an integer in [1, 256], got '%s'", optarg);
                return 2;
            }
            break;
        case O_SPECIAL:
            if (special_arg(&o->sp, optarg, !strcmp(cmd, "tokenizer import"))) {
                moe_cli_usage_error(-1, cmd, "--special: expected %s, got '%s'",
                                    !strcmp(cmd, "tokenizer import") ? "NAME=ID" : "NAME", optarg);
                return 2;
            }
            break;
        case O_FORM:
            if (moe_tok_form_parse(&o->form, optarg)) {
                moe_cli_usage_error(-1, cmd, "--form: %s", moe_error_detail());
                return 2;
            }
            o->form_set = 1;
            break;
        case O_FORMAT:
            if (parse_format(optarg, &o->format, !strcmp(cmd, "tokenizer decode"))) {
                moe_cli_usage_error(-1, cmd, "--format: unknown format '%s'", optarg);
                return 2;
            }
            break;
        case O_ID:
            if (o->n_ids >= 64 || moe_cli_parse_long(optarg, 0, MOE_TOK_MAX_VOCAB - 1, &o->ids[o->n_ids])) {
                moe_cli_usage_error(-1, cmd, "--id: expected an id, got '%s'", optarg);
                return 2;
            }
            o->n_ids++;
            break;
        }
    }
    if (optind < argc) {
        moe_cli_usage_error(-1, cmd, "unexpected argument '%s'", argv[optind]);
        return 2;
    }
    return -1;
}

static int need(const char *v, const char *opt, const char *cmd)
{
    if (v) return 0;
    moe_cli_usage_error(-1, cmd, "%s is required (moe tokenizer --help)", opt);
    return 2;
}

static void print_summary(const moe_tok *t, FILE *f)
{
    fprintf(f, "vocab_size %lld, ranks %lld, holes %lld, specials %d, hash %016llx\n",
            (long long)moe_tok_vocab_size(t), (long long)moe_tok_n_ranks(t), (long long)moe_tok_n_holes(t),
            moe_tok_n_specials(t), (unsigned long long)moe_tok_hash(t));
}

static int cmd_import(int argc, char **argv)
{
    const char *cmd = "tokenizer import";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "from form pattern special out");
    if (r < 0 && (r = need(o.from, "--from F", cmd)) == 0 && (r = need(o.out, "--out T", cmd)) == 0) {
        moe_tok *t = NULL;
        moe_status st = moe_tok_load(&t, o.from, o.form, o.pattern, o.sp.n, o.sp.names, o.sp.ids);
        if (!st) st = moe_tok_save(t, o.out, MOE_TOK_FORM_TIKTOKEN_JSON);
        if (st) {
            moe_cli_error(-1, cmd, st);
            r = 1;
        } else {
            printf("imported %s -> %s: ", o.from, o.out);
            print_summary(t, stdout);
            r = 0;
        }
        moe_tok_destroy(t);
    }
    special_free(&o.sp);
    return r < 0 ? 0 : r;
}

static int cmd_export(int argc, char **argv)
{
    const char *cmd = "tokenizer export";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "tokenizer form out");
    if (r < 0 && (r = need(o.tok, "--tokenizer T", cmd)) == 0 && (r = need(o.out, "--out F", cmd)) == 0) {
        if (!o.form_set || o.form == MOE_TOK_FORM_AUTO) {
            moe_cli_usage_error(-1, cmd, "--form tiktoken-json|tiktoken|hf is required");
            return 2;
        }
        moe_tok *t = NULL;
        r = load_tok(&t, o.tok, NULL, cmd, NULL);
        if (!r) {
            moe_status st = moe_tok_save(t, o.out, o.form);
            if (st) {
                moe_cli_error(-1, cmd, st);
                r = 1;
            } else {
                printf("exported %s -> %s (%s)\n", o.tok, o.out, moe_tok_form_str(o.form));
            }
        }
        moe_tok_destroy(t);
    }
    return r < 0 ? 0 : r;
}

static int cmd_info(int argc, char **argv)
{
    const char *cmd = "tokenizer info";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "tokenizer id");
    if (r >= 0 || (r = need(o.tok, "--tokenizer T", cmd))) return r;
    moe_tok *t = NULL;
    double secs;
    if ((r = load_tok(&t, o.tok, NULL, cmd, &secs))) return r;
    if (o.n_ids == 0) {
        printf("tokenizer %s (loaded in %.3f s, peak RSS %.1f MB)\n", o.tok, secs, moe_cli_mem_mb("VmHWM"));
        print_summary(t, stdout);
        printf("pattern: %s\n", moe_tok_pattern(t));
        char engine[160];
        moe_tok_regex_engine(engine, sizeof engine);
        printf("regex engine: %s\n", engine);
        for (int i = 0; i < moe_tok_n_specials(t); i++)
            printf("special %lld: %s\n", (long long)moe_tok_special_id(t, i), moe_tok_special_name(t, i));
        size_t longest = 0;
        int64_t lid = 0;
        for (int64_t id = 0; id < moe_tok_n_ranks(t); id++) {
            size_t l;
            if (moe_tok_token(t, id, &l) && l > longest) longest = l, lid = id;
        }
        printf("longest token: id %lld, %zu bytes\n", (long long)lid, longest);
    }
    for (int i = 0; i < o.n_ids; i++) {
        size_t l;
        const uint8_t *b = moe_tok_token(t, o.ids[i], &l);
        printf("%ld: ", o.ids[i]);
        if (!b) printf("(no token)\n");
        else {
            putchar('"');
            for (size_t k = 0; k < l; k++) {
                if (b[k] >= 0x20 && b[k] < 0x7f && b[k] != '"' && b[k] != '\\') putchar(b[k]);
                else printf("\\x%02x", b[k]);
            }
            printf("\"%s\n", moe_tok_is_special(t, o.ids[i]) ? " (special)" : "");
        }
    }
    moe_tok_destroy(t);
    return 0;
}

static int cmd_encode(int argc, char **argv)
{
    const char *cmd = "tokenizer encode";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "tokenizer in out format doc-sep doc-delim stats");
    if (r >= 0 || (r = need(o.tok, "--tokenizer T", cmd))) return r;
    moe_tok *t = NULL;
    moe_tok_encoder *e = NULL;
    moe_cli_input in = {0};
    moe_tok_ids v = {0};
    double load_s = 0;
    if ((r = load_tok(&t, o.tok, NULL, cmd, &load_s))) return r;
    moe_status st = moe_tok_encoder_create(&e, t);
    if (!st && (r = moe_cli_doc_delim(e, t, o.doc_sep, o.doc_delim, cmd, -1))) goto done;
    if (!st) st = moe_cli_input_read(&in, o.in);
    if (!st && o.format == FMT_U16 && moe_tok_vocab_size(t) > 65536)
        st = moe_errorf(MOE_ERR_ARG, "--format u16 needs a vocabulary of at most 65536 ids (this one has %lld)",
                        (long long)moe_tok_vocab_size(t));
    if (!st && o.stats) { /* --stats times the encode alone: fault the input in first */
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < in.n; i += 4096) sink ^= in.data[i];
        (void)sink;
    }
    const char *out_name = o.out && strcmp(o.out, "-") ? o.out : "standard output";
    FILE *f = NULL;
    if (!st && !(f = open_out(o.out))) st = moe_errorf(MOE_ERR_IO, "cannot write %s: %s", out_name, strerror(errno));
    /* in chunks that end on piece boundaries (moe_tok_encode_part), so that
     * memory stays bounded and the ids are those of one encode */
    const size_t chunk = (size_t)16 << 20;
    size_t pos = 0, n_ids = 0;
    double enc_s = 0;
    char buf[1 << 16];
    size_t w = 0;
    while (!st && pos < in.n) {
        size_t end = pos;
        const double t0 = moe_now();
        st = moe_tok_encode_part(e, &v, &end, in.data, in.n, pos, pos + chunk < in.n ? pos + chunk : in.n);
        enc_s += moe_now() - t0;
        for (size_t i = 0; !st && i < v.n; i++) {
            if (o.format == FMT_TEXT) {
                w += (size_t)snprintf(buf + w, sizeof buf - w, n_ids + i ? " %u" : "%u", v.ids[i]);
            } else {
                const uint32_t x = v.ids[i];
                buf[w++] = (char)x;
                buf[w++] = (char)(x >> 8);
                if (o.format == FMT_U32) {
                    buf[w++] = (char)(x >> 16);
                    buf[w++] = (char)(x >> 24);
                }
            }
            if (w > sizeof buf - 16) {
                st = write_all(f, buf, w, out_name);
                w = 0;
            }
        }
        n_ids += v.n;
        v.n = 0;
        pos = end;
    }
    if (!st && o.format == FMT_TEXT) buf[w++] = '\n';
    if (!st) st = write_all(f, buf, w, out_name);
    if (f) {
        moe_status c = close_out(f, o.out);
        if (!st) st = c;
    }
    if (!st && o.stats)
        fprintf(stderr, "encode: %zu bytes -> %zu ids, load %.4f s, encode %.4f s, %.2f MB/s, peak RSS %.1f MB\n",
                in.n, n_ids, load_s, enc_s, enc_s > 0 ? (double)in.n / enc_s / 1e6 : 0.0, moe_cli_mem_mb("VmHWM"));
    if (st) {
        moe_cli_error(-1, cmd, st);
        r = 1;
    }
done:
    moe_tok_ids_free(&v);
    moe_cli_input_free(&in);
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
    return r;
}

/* Ids from text: whitespace-separated decimal numbers. */
static moe_status parse_text_ids(uint32_t **out, size_t *n, const uint8_t *s, size_t len, const char *what)
{
    size_t cap = len / 2 + 1, k = 0;
    uint32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return moe_errorf(MOE_ERR_NOMEM, "ids");
    size_t i = 0;
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
        if (i == len) break;
        uint64_t v = 0;
        size_t j = i;
        while (j < len && s[j] >= '0' && s[j] <= '9' && v <= UINT32_MAX) v = v * 10 + (s[j++] - '0');
        if (j == i || v > UINT32_MAX || (j < len && !(s[j] == ' ' || s[j] == '\n' || s[j] == '\t' || s[j] == '\r'))) {
            free(ids);
            return moe_errorf(MOE_ERR_FORMAT, "%s: byte %zu: expected an id (a decimal number)", what, i);
        }
        ids[k++] = (uint32_t)v;
        i = j;
    }
    *out = ids;
    *n = k;
    return MOE_OK;
}

static int cmd_decode(int argc, char **argv)
{
    const char *cmd = "tokenizer decode";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "tokenizer in out format stats");
    if (r >= 0 || (r = need(o.tok, "--tokenizer T", cmd))) return r;
    moe_tok *t = NULL;
    moe_cli_input in = {0};
    moe_tok_file *tf = NULL;
    uint32_t *ids = NULL;
    uint8_t *text = NULL;
    size_t n_ids = 0, n_text = 0;
    double load_s;
    if ((r = load_tok(&t, o.tok, NULL, cmd, &load_s))) return r;
    const char *what = o.in && strcmp(o.in, "-") ? o.in : "standard input";
    moe_status st = MOE_OK;
    if (o.format == FMT_TOK) {
        if (!o.in || !strcmp(o.in, "-")) st = moe_errorf(MOE_ERR_ARG, "--format tok needs --in FILE");
        if (!st) st = moe_tok_file_open(&tf, o.in, t);
        if (!st) {
            n_ids = (size_t)moe_tok_file_n_tokens(tf);
            ids = malloc(sizeof(uint32_t) * (n_ids ? n_ids : 1));
            if (!ids) st = moe_errorf(MOE_ERR_NOMEM, "%zu ids", n_ids);
            else st = moe_tok_file_read(tf, ids, 0, (int64_t)n_ids);
        }
    } else {
        st = moe_cli_input_read(&in, o.in);
        if (!st && o.format == FMT_TEXT) st = parse_text_ids(&ids, &n_ids, in.data, in.n, what);
        else if (!st) {
            size_t w = o.format == FMT_U16 ? 2 : 4;
            if (in.n % w)
                st = moe_errorf(MOE_ERR_FORMAT, "%s: %zu bytes is not a whole number of %zu-byte ids", what, in.n, w);
            n_ids = in.n / w;
            if (!st && !(ids = malloc(sizeof(uint32_t) * (n_ids ? n_ids : 1)))) st = moe_errorf(MOE_ERR_NOMEM, "ids");
            for (size_t i = 0; !st && i < n_ids; i++) {
                if (w == 2) ids[i] = (uint32_t)in.data[2 * i] | (uint32_t)in.data[2 * i + 1] << 8;
                else memcpy(&ids[i], in.data + 4 * i, 4);
            }
        }
    }
    double t0 = moe_now(), dec_s = 0;
    if (!st) st = moe_tok_decoded_len(t, &n_text, ids, n_ids);
    if (!st && !(text = malloc(n_text + 16))) st = moe_errorf(MOE_ERR_NOMEM, "%zu bytes", n_text);
    /* --stats times the decode alone: the output pages are faulted in first
     * (as a warm process reuses its memory) */
    if (!st && o.stats) memset(text, 0, n_text + 16);
    t0 = moe_now();
    if (!st) st = moe_tok_decode(t, text, n_text + 16, &n_text, ids, n_ids);
    dec_s = moe_now() - t0;
    if (st && st != MOE_ERR_NOMEM && o.format != FMT_TOK) {
        char d[1024];
        snprintf(d, sizeof d, "%s", moe_error_detail());
        moe_errorf(st, "%s: %s", what, d);
    }
    if (!st) {
        FILE *f = open_out(o.out);
        if (!f) st = moe_errorf(MOE_ERR_IO, "cannot write %s: %s", o.out, strerror(errno));
        else {
            st = write_all(f, text, n_text, o.out ? o.out : "stdout");
            moe_status c = close_out(f, o.out);
            if (!st) st = c;
        }
    }
    if (!st && o.stats)
        fprintf(stderr, "decode: %zu ids -> %zu bytes, load %.4f s, decode %.4f s, %.2f MB/s\n", n_ids, n_text, load_s,
                dec_s, dec_s > 0 ? (double)n_text / dec_s / 1e6 : 0.0);
    if (st) {
        moe_cli_error(-1, cmd, st);
        r = 1;
    }
    free(ids);
    free(text);
    moe_tok_file_close(tf);
    moe_cli_input_free(&in);
    moe_tok_destroy(t);
    return r;
}

/* Under mpirun the piece counting is split over ranks x threads; rank 0
 * writes the file. */
static int cmd_train(int argc, char **argv)
{
    const char *cmd = "tokenizer train";
    opts_t o;
    int r = parse(&o, argc, argv, cmd, "data vocab-size pattern special threads out");
    if (r < 0 && (r = need(o.data, "--data F", cmd)) == 0 && (r = need(o.out, "--out T", cmd)) == 0 &&
        (r = need(o.vocab ? "" : NULL, "--vocab-size N", cmd)) == 0) {
        const char *pattern = o.pattern && moe_tok_named_pattern(o.pattern) ? moe_tok_named_pattern(o.pattern) : o.pattern;
        moe_comm *comm = NULL;
        if (moe_cli_start(cmd, 0, &comm)) {
            special_free(&o.sp);
            return 1;
        }
        const int rank = moe_comm_rank(comm), W = moe_comm_size(comm);
        moe_tok *t = NULL;
        moe_tok_train_stats ts = {0};
        double t0 = moe_now();
        moe_status st = moe_tok_train_comm(&t, comm, o.data, o.vocab, pattern, o.sp.n, o.sp.names, (int)o.threads, &ts);
        const double secs = moe_now() - t0;
        if (!st && rank == 0) st = moe_tok_save(t, o.out, MOE_TOK_FORM_TIKTOKEN_JSON);
        st = moe_comm_agree(comm, st);
        if (st) {
            moe_cli_error(W > 1 ? rank : -1, cmd, st);
            r = 1;
        } else {
            if (rank == 0) {
                printf("trained %s on %s (%zu bytes, %lld distinct pieces) on %d rank(s) x %ld thread(s): ", o.out,
                       o.data, ts.bytes, (long long)ts.pieces, W, o.threads);
                print_summary(t, stdout);
                printf("time %.3f s (piece counting %.3f s, %.1f MB/s; merges %.3f s); %.2f MB/s overall\n", secs,
                       ts.count_seconds, ts.count_seconds > 0 ? (double)ts.bytes / ts.count_seconds / 1e6 : 0.0,
                       ts.merge_seconds, secs > 0 ? (double)ts.bytes / secs / 1e6 : 0.0);
                if (moe_tok_vocab_size(t) < o.vocab)
                    printf("note: no pair was left to merge: %lld ids, not the %ld asked for\n",
                           (long long)moe_tok_vocab_size(t), o.vocab);
            }
            r = 0;
        }
        moe_tok_destroy(t);
        moe_comm_destroy(comm);
        moe_comm_finalize();
    }
    special_free(&o.sp);
    return r < 0 ? 0 : r;
}

int moe_cmd_tokenizer(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    if (!strcmp(sub, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(sub, "import")) return cmd_import(argc - 1, argv + 1);
    if (!strcmp(sub, "export")) return cmd_export(argc - 1, argv + 1);
    if (!strcmp(sub, "encode")) return cmd_encode(argc - 1, argv + 1);
    if (!strcmp(sub, "decode")) return cmd_decode(argc - 1, argv + 1);
    if (!strcmp(sub, "info")) return cmd_info(argc - 1, argv + 1);
    fprintf(stderr, "moe tokenizer: unknown subcommand '%s' (train, import, export, encode, decode, info)\n", sub);
    return 2;
}
