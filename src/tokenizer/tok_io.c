/* Tokenizer files: import and export of the three forms (tiktoken JSON
 * encoders, moerun's own; .tiktoken rank lists; Hugging Face byte-level BPE
 * tokenizer.json), a strict base64 codec, and the HF merge derivation.
 * Every error names the file and the place (line, token, merge). Also the
 * mapping of the text files training and encoding read (moe_tok_text). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/strbuf.h"
#include "tokenizer/tok_internal.h"

enum { MAX_FILE_BYTES = 1 << 30 };

moe_status moe_tok_text_map(moe_tok_text *t, const char *path)
{
    t->data = NULL;
    t->n = 0;
    /* non-blocking: a named pipe is refused below, never waited on */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "%s is not a regular file", path);
    }
    t->n = (size_t)sb.st_size;
    if (t->n) {
        void *p = mmap(NULL, t->n, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return moe_errorf(MOE_ERR_IO, "cannot map %s: %s", path, strerror(errno));
        }
        t->data = p;
    }
    close(fd);
    return MOE_OK;
}

void moe_tok_text_unmap(moe_tok_text *t)
{
    if (t->data) munmap(t->data, t->n);
    t->data = NULL;
    t->n = 0;
}

moe_status moe_tok_form_parse(moe_tok_form *out, const char *name)
{
    static const struct {
        const char *name;
        moe_tok_form form;
    } names[] = {{"auto", MOE_TOK_FORM_AUTO},          {"tiktoken-json", MOE_TOK_FORM_TIKTOKEN_JSON},
                 {"json", MOE_TOK_FORM_TIKTOKEN_JSON}, {"tiktoken", MOE_TOK_FORM_TIKTOKEN},
                 {"hf", MOE_TOK_FORM_HF}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (name && !strcmp(name, names[i].name)) {
            *out = names[i].form;
            return MOE_OK;
        }
    return moe_errorf(MOE_ERR_ARG, "unknown tokenizer form '%s' (expected tiktoken-json, tiktoken, hf or auto)",
                      name ? name : "(null)");
}

const char *moe_tok_form_str(moe_tok_form f)
{
    switch (f) {
    case MOE_TOK_FORM_TIKTOKEN_JSON: return "tiktoken-json";
    case MOE_TOK_FORM_TIKTOKEN: return "tiktoken";
    case MOE_TOK_FORM_HF: return "hf";
    default: return "auto";
    }
}

/* ---- base64 ---- */

static const char b64_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

long moe_tok_base64_decode(uint8_t *out, const char *s, size_t n)
{
    if (n % 4) return -1 - (long)n; /* the length itself is wrong: point past the end */
    size_t w = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4];
        int pad = 0;
        for (int k = 0; k < 4; k++) {
            unsigned char c = (unsigned char)s[i + k];
            if (c == '=' && i + 4 == n && k >= 2) {
                /* '=' only at the end, and '==' or 'x=' only */
                if (k == 2 && s[i + 3] != '=') return -1 - (long)(i + k);
                v[k] = 0;
                pad++;
                continue;
            }
            if (pad) return -1 - (long)(i + k);
            v[k] = b64_val(c);
            if (v[k] < 0) return -1 - (long)(i + k);
        }
        /* unused bits of the last character must be zero (canonical form) */
        if (pad == 2 && (v[1] & 15)) return -1 - (long)(i + 1);
        if (pad == 1 && (v[2] & 3)) return -1 - (long)(i + 2);
        uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        out[w++] = (uint8_t)(x >> 16);
        if (pad < 2) out[w++] = (uint8_t)(x >> 8);
        if (pad < 1) out[w++] = (uint8_t)x;
    }
    return (long)w;
}

size_t moe_tok_base64_encode(char *out, const uint8_t *in, size_t n)
{
    size_t w = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t x = (uint32_t)in[i] << 16;
        if (i + 1 < n) x |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) x |= in[i + 2];
        out[w++] = b64_chars[x >> 18 & 63];
        out[w++] = b64_chars[x >> 12 & 63];
        out[w++] = i + 1 < n ? b64_chars[x >> 6 & 63] : '=';
        out[w++] = i + 2 < n ? b64_chars[x & 63] : '=';
    }
    out[w] = '\0';
    return w;
}

/* ---- ranks gathered from a file, placed by id at the end ---- */

typedef struct {
    int64_t *rank;   /* per entry */
    int64_t *off;    /* per entry: start in bytes */
    int64_t *line;   /* per entry: where (line; for runs also token index) */
    int64_t *tokidx;
    size_t n, cap;
    uint8_t *bytes;
    size_t nb, capb;
    const char *what; /* file name for messages */
} raw_ranks;

static void raw_free(raw_ranks *r)
{
    free(r->rank);
    free(r->off);
    free(r->line);
    free(r->tokidx);
    free(r->bytes);
}

static moe_status raw_add(raw_ranks *r, int64_t rank, const uint8_t *b, size_t len, int64_t line, int64_t tokidx)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 1024;
        int64_t *a = realloc(r->rank, cap * sizeof *a), *o = realloc(r->off, cap * sizeof *o);
        int64_t *l = realloc(r->line, cap * sizeof *l), *t = realloc(r->tokidx, cap * sizeof *t);
        if (a) r->rank = a;
        if (o) r->off = o;
        if (l) r->line = l;
        if (t) r->tokidx = t;
        if (!a || !o || !l || !t) return moe_errorf(MOE_ERR_NOMEM, "%s: rank list", r->what);
        r->cap = cap;
    }
    if (r->nb + len > r->capb) {
        size_t cap = r->capb ? r->capb : 1 << 16;
        while (cap < r->nb + len) cap *= 2;
        uint8_t *p = realloc(r->bytes, cap);
        if (!p) return moe_errorf(MOE_ERR_NOMEM, "%s: token bytes", r->what);
        r->bytes = p;
        r->capb = cap;
    }
    memcpy(r->bytes + r->nb, b, len);
    r->rank[r->n] = rank;
    r->off[r->n] = (int64_t)r->nb;
    r->line[r->n] = line;
    r->tokidx[r->n] = tokidx;
    r->n++;
    r->nb += len;
    return MOE_OK;
}

static void where(char *buf, size_t n, const raw_ranks *r, size_t i)
{
    if (r->tokidx[i] >= 0)
        snprintf(buf, n, "line %lld, token %lld", (long long)r->line[i], (long long)r->tokidx[i] + 1);
    else
        snprintf(buf, n, "line %lld", (long long)r->line[i]);
}

/* Places the gathered entries by rank and builds the tokenizer. */
static moe_status raw_build(moe_tok **out, raw_ranks *r, const char *pattern, int ns, const char *const *names,
                            const int64_t *ids)
{
    int64_t n = 0;
    for (size_t i = 0; i < r->n; i++)
        if (r->rank[i] + 1 > n) n = r->rank[i] + 1;
    int64_t *slot = malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(n + 1));
    uint8_t *bytes = malloc(r->nb + 1);
    moe_status st = MOE_OK;
    if (!slot || !offsets || !bytes) st = moe_errorf(MOE_ERR_NOMEM, "%s: %lld ranks", r->what, (long long)n);
    for (int64_t i = 0; !st && i < n; i++) slot[i] = -1;
    for (size_t i = 0; !st && i < r->n; i++) {
        if (slot[r->rank[i]] >= 0) {
            char a[64], b[64];
            where(a, sizeof a, r, (size_t)slot[r->rank[i]]);
            where(b, sizeof b, r, i);
            st = moe_errorf(MOE_ERR_FORMAT, "%s: rank %lld is given twice (%s and %s)", r->what,
                            (long long)r->rank[i], a, b);
        }
        slot[r->rank[i]] = (int64_t)i;
    }
    if (!st) {
        int64_t w = 0;
        offsets[0] = 0;
        for (int64_t id = 0; id < n; id++) {
            if (slot[id] >= 0) {
                size_t i = (size_t)slot[id];
                size_t len = (size_t)((i + 1 < r->n ? r->off[i + 1] : (int64_t)r->nb) - r->off[i]);
                memcpy(bytes + w, r->bytes + r->off[i], len);
                w += (int64_t)len;
            }
            offsets[id + 1] = w;
        }
        st = moe_tok_create(out, bytes, offsets, n, pattern, ns, names, ids);
        if (st) {
            /* prefix the file name to the detail */
            char d[1024];
            snprintf(d, sizeof d, "%s", moe_error_detail());
            moe_errorf(st, "%s: %s", r->what, d);
        }
    }
    free(slot);
    free(offsets);
    free(bytes);
    return st;
}

/* Parses a decimal rank in [0, MOE_TOK_MAX_VOCAB). */
static int parse_rank(const char *s, size_t n, int64_t *out)
{
    if (n == 0 || n > 18) return -1;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

static moe_status decode_token(raw_ranks *r, const char *s, size_t len, int64_t rank, int64_t line, int64_t tokidx,
                               uint8_t *scratch)
{
    char at[64];
    if (len == 0) {
        snprintf(at, sizeof at, tokidx >= 0 ? "line %lld, token %lld" : "line %lld", (long long)line,
                 (long long)tokidx + 1);
        return moe_errorf(MOE_ERR_FORMAT, "%s: %s: empty token", r->what, at);
    }
    if (len > 4 * ((MOE_TOK_MAX_TOKEN_LEN + 2) / 3))
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld: token of %zu base64 characters (at most %d bytes)", r->what,
                          (long long)line, len, MOE_TOK_MAX_TOKEN_LEN);
    long k = moe_tok_base64_decode(scratch, s, len);
    if (k < 0) {
        if (tokidx >= 0)
            return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld, token %lld (rank %lld): bad base64 \"%.*s\" at character %ld",
                              r->what, (long long)line, (long long)tokidx + 1, (long long)rank, (int)(len > 40 ? 40 : len),
                              s, -k);
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld: bad base64 \"%.*s\" at character %ld", r->what,
                          (long long)line, (int)(len > 40 ? 40 : len), s, -k);
    }
    if (k > MOE_TOK_MAX_TOKEN_LEN)
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld: token of %ld bytes (at most %d)", r->what, (long long)line, k,
                          MOE_TOK_MAX_TOKEN_LEN);
    return raw_add(r, rank, scratch, (size_t)k, line, tokidx);
}

/* One line of a rank list (p, len: without its line end), numbered from 1;
 * scratch holds a decoded token. */
typedef moe_status (*line_fn)(raw_ranks *r, const char *p, size_t len, int64_t line, uint8_t *scratch);

/* Calls fn on every line of s[0, n), with one base64 scratch for them all.
 * An empty line is an error ("<what> line N is empty", what: "bpe_ranks
 * line" or "line"), but for the last one (a final newline); crlf: a '\r'
 * before the '\n' is taken off first. Stops at the first error. */
static moe_status for_each_line(raw_ranks *r, const char *s, size_t n, const char *what, int crlf, line_fn fn)
{
    uint8_t *scratch = malloc(MOE_TOK_MAX_TOKEN_LEN + 4);
    if (!scratch) return moe_errorf(MOE_ERR_NOMEM, "base64 scratch");
    moe_status st = MOE_OK;
    int64_t line = 0;
    for (size_t i = 0; i < n && !st;) {
        line++;
        const char *nl = memchr(s + i, '\n', n - i);
        size_t e = nl ? (size_t)(nl - s) : n;
        const char *p = s + i;
        size_t len = e - i;
        if (crlf && len && p[len - 1] == '\r') len--;
        i = e + 1;
        if (len == 0) {
            if (e < n) st = moe_errorf(MOE_ERR_FORMAT, "%s: %s %lld is empty", r->what, what, (long long)line);
            continue;
        }
        st = fn(r, p, len, line, scratch);
    }
    free(scratch);
    return st;
}

/* A line of bpe_ranks in a tiktoken JSON encoder: a run "! <first> <b64>
 * <b64> ...". */
static moe_status parse_run(raw_ranks *r, const char *p, size_t len, int64_t line, uint8_t *scratch)
{
    if (len < 2 || p[0] != '!' || p[1] != ' ')
        return moe_errorf(MOE_ERR_FORMAT, "%s: bpe_ranks line %lld does not start with \"! <first rank> \"", r->what,
                          (long long)line);
    size_t j = 2;
    size_t k = j;
    while (k < len && p[k] != ' ') k++;
    int64_t first;
    if (parse_rank(p + j, k - j, &first) || first >= MOE_TOK_MAX_VOCAB)
        return moe_errorf(MOE_ERR_FORMAT, "%s: bpe_ranks line %lld: first rank \"%.*s\" is not a number below %d",
                          r->what, (long long)line, (int)(k - j > 24 ? 24 : k - j), p + j, MOE_TOK_MAX_VOCAB);
    moe_status st = MOE_OK;
    int64_t tok = 0;
    for (j = k + 1; j <= len && !st; j = k + 1) {
        k = j;
        while (k < len && p[k] != ' ') k++;
        if (first + tok >= MOE_TOK_MAX_VOCAB)
            return moe_errorf(MOE_ERR_FORMAT, "%s: bpe_ranks line %lld: rank %lld is above the limit %d", r->what,
                              (long long)line, (long long)(first + tok), MOE_TOK_MAX_VOCAB - 1);
        st = decode_token(r, p + j, k - j, first + tok, line, tok, scratch);
        tok++;
        if (k >= len) break;
    }
    return st;
}

/* A line of a .tiktoken file: "<base64> <rank>". */
static moe_status parse_tiktoken_line(raw_ranks *r, const char *p, size_t len, int64_t line, uint8_t *scratch)
{
    const char *sp = memchr(p, ' ', len);
    if (!sp)
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld has no rank (expected \"<base64 token> <rank>\")", r->what,
                          (long long)line);
    size_t tl = (size_t)(sp - p);
    int64_t rank;
    if (parse_rank(sp + 1, len - tl - 1, &rank))
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld: rank \"%.*s\" is not a number", r->what, (long long)line,
                          (int)(len - tl - 1 > 24 ? 24 : len - tl - 1), sp + 1);
    if (rank >= MOE_TOK_MAX_VOCAB)
        return moe_errorf(MOE_ERR_FORMAT, "%s: line %lld: rank %lld is above the limit %d", r->what, (long long)line,
                          (long long)rank, MOE_TOK_MAX_VOCAB - 1);
    return decode_token(r, p, tl, rank, line, -1, scratch);
}

/* bpe_ranks of a tiktoken JSON encoder: runs, one per line; or, as tiktoken
 * also accepts, .tiktoken lines. */
static moe_status parse_runs(raw_ranks *r, const char *s, size_t n)
{
    return for_each_line(r, s, n, "bpe_ranks line", 0, parse_run);
}

/* .tiktoken: "<base64> <rank>" per line. */
static moe_status parse_tiktoken(raw_ranks *r, const char *s, size_t n)
{
    return for_each_line(r, s, n, "line", 1, parse_tiktoken_line);
}

/* ---- specials given on top of a file's ---- */

typedef struct {
    int n, cap;
    char **names;
    int64_t *ids;
} spec_list;

static moe_status spec_add(spec_list *l, const char *name, int64_t id)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 16;
        char **a = realloc(l->names, sizeof(char *) * (size_t)cap);
        if (a) l->names = a;
        int64_t *b = realloc(l->ids, sizeof(int64_t) * (size_t)cap);
        if (b) l->ids = b;
        if (!a || !b) return moe_errorf(MOE_ERR_NOMEM, "specials");
        l->cap = cap;
    }
    l->names[l->n] = strdup(name);
    if (!l->names[l->n]) return moe_errorf(MOE_ERR_NOMEM, "specials");
    l->ids[l->n++] = id;
    return MOE_OK;
}

static void spec_free(spec_list *l)
{
    for (int i = 0; i < l->n; i++) free(l->names[i]);
    free(l->names);
    free(l->ids);
}

static moe_status spec_extra(spec_list *l, int ns, const char *const *names, const int64_t *ids)
{
    moe_status st = MOE_OK;
    for (int i = 0; i < ns && !st; i++) st = spec_add(l, names[i], ids[i]);
    return st;
}

/* Position of a cJSON parse error as "line L, column C". */
static void json_error_place(char *buf, size_t n, const char *text, size_t len)
{
    const char *e = cJSON_GetErrorPtr();
    if (!e || e < text || e > text + len) {
        snprintf(buf, n, "unknown place");
        return;
    }
    long line = 1, col = 1;
    for (const char *p = text; p < e; p++) {
        if (*p == '\n') line++, col = 1;
        else col++;
    }
    snprintf(buf, n, "line %ld, column %ld", line, col);
}

static int json_int(const cJSON *x, int64_t *out)
{
    if (!cJSON_IsNumber(x)) return -1;
    double d = x->valuedouble;
    if (!(d >= 0 && d < (double)MOE_TOK_MAX_VOCAB) || d != (double)(int64_t)d) return -1;
    *out = (int64_t)d;
    return 0;
}

static moe_status load_tiktoken_json(moe_tok **out, const char *what, const cJSON *root, const char *pattern,
                                     int ns, const char *const *names, const int64_t *ids)
{
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(root, "pat_str");
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(root, "special_tokens");
    const cJSON *br = cJSON_GetObjectItemCaseSensitive(root, "bpe_ranks");
    const cJSON *nv = cJSON_GetObjectItemCaseSensitive(root, "explicit_n_vocab");
    if (!cJSON_IsString(br)) return moe_errorf(MOE_ERR_FORMAT, "%s: \"bpe_ranks\" is missing or not a string", what);
    if (!pattern && !cJSON_IsString(pat))
        return moe_errorf(MOE_ERR_FORMAT, "%s: \"pat_str\" is missing or not a string", what);
    if (sp && !cJSON_IsObject(sp) && !cJSON_IsNull(sp))
        return moe_errorf(MOE_ERR_FORMAT, "%s: \"special_tokens\" is not an object", what);
    spec_list sl = {0};
    moe_status st = MOE_OK;
    const cJSON *it;
    if (sp)
        cJSON_ArrayForEach(it, sp)
        {
            int64_t id;
            if (json_int(it, &id)) {
                st = moe_errorf(MOE_ERR_FORMAT, "%s: special token \"%s\": id is not an integer in [0, %d)", what,
                                it->string, MOE_TOK_MAX_VOCAB);
                break;
            }
            if ((st = spec_add(&sl, it->string, id))) break;
        }
    if (!st) st = spec_extra(&sl, ns, names, ids);
    raw_ranks r = {.what = what};
    const char *s = br->valuestring;
    const size_t len = strlen(s);
    if (!st) st = len && s[0] == '!' ? parse_runs(&r, s, len) : parse_tiktoken(&r, s, len);
    if (!st) st = raw_build(out, &r, pattern ? pattern : pat->valuestring, sl.n, (const char *const *)sl.names, sl.ids);
    if (!st && nv) {
        int64_t want;
        int64_t have = (int64_t)r.n + sl.n;
        if (json_int(nv, &want) || want != have || want != moe_tok_vocab_size(*out)) {
            st = moe_errorf(MOE_ERR_FORMAT,
                            "%s: explicit_n_vocab %s does not match %lld ranks + %d specials (largest id %lld)", what,
                            cJSON_IsNumber(nv) ? "" : "(not a number)", (long long)r.n, sl.n,
                            (long long)moe_tok_vocab_size(*out) - 1);
            moe_tok_destroy(*out);
            *out = NULL;
        }
    }
    raw_free(&r);
    spec_free(&sl);
    return st;
}

/* ---- Hugging Face byte-level alphabet ---- */

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the others
 * to U+0100 upward in byte order. */
static void byte_alphabet(uint32_t b2u[256], int16_t u2b[512])
{
    int n = 0;
    for (int i = 0; i < 512; i++) u2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        b2u[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

/* A byte-level token string (UTF-8) -> bytes; -1 if a character is outside the alphabet. */
static long hf_to_bytes(uint8_t *out, const char *s, const int16_t u2b[512])
{
    long w = 0;
    const uint8_t *p = (const uint8_t *)s;
    while (*p) {
        uint32_t c;
        if (p[0] < 0x80) c = *p++;
        else if ((p[0] & 0xe0) == 0xc0 && (p[1] & 0xc0) == 0x80) {
            c = (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f);
            p += 2;
        } else return -1;
        if (c >= 512 || u2b[c] < 0) return -1;
        out[w++] = (uint8_t)u2b[c];
        if (w > MOE_TOK_MAX_TOKEN_LEN) return -1;
    }
    return w;
}

/* bytes -> byte-level string (NUL-terminated; out has room for 2 * n + 1). */
static void hf_from_bytes(char *out, const uint8_t *b, size_t n, const uint32_t b2u[256])
{
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = b2u[b[i]];
        if (c < 0x80) out[w++] = (char)c;
        else {
            out[w++] = (char)(0xc0 | c >> 6);
            out[w++] = (char)(0x80 | (c & 0x3f));
        }
    }
    out[w] = '\0';
}

/* BPE of s with only the ranks below max_rank (tiktoken's loop): the part
 * boundaries into bounds (k + 1 entries), returns k. The HF merge of a token
 * is its two parts under the ranks below its own. */
static size_t bpe_below(const moe_tok *t, const uint8_t *s, size_t len, int64_t max_rank, size_t *bounds)
{
    size_t m = len; /* parts */
    for (size_t i = 0; i <= len; i++) bounds[i] = i;
    for (;;) {
        int64_t best = INT64_MAX;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++) {
            int64_t r = moe_tok_rank(t, s + bounds[i], bounds[i + 2] - bounds[i]);
            if (r >= 0 && r < max_rank && r < best) best = r, bi = i;
        }
        if (best == INT64_MAX) break;
        memmove(bounds + bi + 1, bounds + bi + 2, (m - bi - 1) * sizeof *bounds);
        m--;
    }
    return m;
}

static const char *hf_pattern(const cJSON *pre, const char *what, moe_status *st)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(pre, "type");
    const char *ty = cJSON_IsString(type) ? type->valuestring : "";
    if (!strcmp(ty, "ByteLevel")) {
        const cJSON *aps = cJSON_GetObjectItemCaseSensitive(pre, "add_prefix_space");
        const cJSON *ur = cJSON_GetObjectItemCaseSensitive(pre, "use_regex");
        if (cJSON_IsTrue(aps)) {
            *st = moe_errorf(MOE_ERR_FORMAT, "%s: pre_tokenizer ByteLevel with add_prefix_space true is not supported",
                             what);
            return NULL;
        }
        if (cJSON_IsFalse(ur)) return ""; /* no split of its own */
        return moe_tok_gpt2_pattern;
    }
    if (!strcmp(ty, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(pre, "pattern");
        const cJSON *re = pat ? cJSON_GetObjectItemCaseSensitive(pat, "Regex") : NULL;
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(pre, "behavior");
        const cJSON *inv = cJSON_GetObjectItemCaseSensitive(pre, "invert");
        const char *b = cJSON_IsString(beh) ? beh->valuestring : "";
        int ok = (!strcmp(b, "Isolated") && !cJSON_IsTrue(inv)) || (!strcmp(b, "Removed") && cJSON_IsTrue(inv));
        if (!cJSON_IsString(re) || !ok) {
            *st = moe_errorf(MOE_ERR_FORMAT,
                             "%s: pre_tokenizer Split must have a {\"Regex\": ...} pattern with behavior Isolated "
                             "(or Removed and invert true)",
                             what);
            return NULL;
        }
        return re->valuestring;
    }
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        const cJSON *it;
        const char *found = NULL;
        cJSON_ArrayForEach(it, list)
        {
            const char *p = hf_pattern(it, what, st);
            if (*st) return NULL;
            if (p && *p) {
                if (found) {
                    *st = moe_errorf(MOE_ERR_FORMAT, "%s: pre_tokenizer Sequence splits twice (two patterns)", what);
                    return NULL;
                }
                found = p;
            }
        }
        if (!found) *st = moe_errorf(MOE_ERR_FORMAT, "%s: pre_tokenizer Sequence has no regex split", what);
        return found;
    }
    *st = moe_errorf(MOE_ERR_FORMAT, "%s: pre_tokenizer type \"%s\" is not supported (ByteLevel, Split, Sequence)",
                     what, ty);
    return NULL;
}

static moe_status load_hf(moe_tok **out, const char *what, const cJSON *root, const char *pattern, int ns,
                          const char *const *names, const int64_t *ids)
{
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *mtype = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(model) || (mtype && !(cJSON_IsString(mtype) && !strcmp(mtype->valuestring, "BPE"))))
        return moe_errorf(MOE_ERR_FORMAT, "%s: model is not a BPE model", what);
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return moe_errorf(MOE_ERR_FORMAT, "%s: model.vocab (object) or model.merges (array) is missing", what);
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (norm && !cJSON_IsNull(norm))
        return moe_errorf(MOE_ERR_FORMAT, "%s: a normalizer is not supported (byte-level BPE has none)", what);
    const cJSON *bf = cJSON_GetObjectItemCaseSensitive(model, "byte_fallback");
    const cJSON *csp = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *ews = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if (cJSON_IsTrue(bf) || (cJSON_IsString(csp) && *csp->valuestring) || (cJSON_IsString(ews) && *ews->valuestring))
        return moe_errorf(MOE_ERR_FORMAT,
                          "%s: byte_fallback, continuing_subword_prefix and end_of_word_suffix are not supported", what);
    moe_status st = MOE_OK;
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const char *pat = pattern;
    if (!pat) {
        if (!pre || cJSON_IsNull(pre))
            return moe_errorf(MOE_ERR_FORMAT, "%s: no pre_tokenizer (give the pattern with --pattern)", what);
        pat = hf_pattern(pre, what, &st);
        if (st) return st;
        if (!pat || !*pat) return moe_errorf(MOE_ERR_FORMAT, "%s: the pre_tokenizer has no regex split", what);
    }

    uint32_t b2u[256];
    int16_t u2b[512];
    byte_alphabet(b2u, u2b);
    spec_list sl = {0};
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    const cJSON *it;
    cJSON_ArrayForEach(it, added)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(it, "special");
        int64_t v;
        if (json_int(id, &v) || !cJSON_IsString(content)) {
            st = moe_errorf(MOE_ERR_FORMAT, "%s: an added token has no integer id or no content", what);
            break;
        }
        if (!cJSON_IsTrue(special)) {
            /* a normal added token must be a vocabulary token with the same id */
            const cJSON *vv = cJSON_GetObjectItemCaseSensitive(vocab, content->valuestring);
            int64_t vid;
            if (!vv || json_int(vv, &vid) || vid != v) {
                st = moe_errorf(MOE_ERR_FORMAT, "%s: added token \"%s\" (id %lld) is not special and not in the vocab",
                                what, content->valuestring, (long long)v);
                break;
            }
            continue;
        }
        if ((st = spec_add(&sl, content->valuestring, v))) break;
    }
    if (!st) st = spec_extra(&sl, ns, names, ids);
    raw_ranks r = {.what = what};
    uint8_t *buf = malloc(MOE_TOK_MAX_TOKEN_LEN + 8);
    if (!buf && !st) st = moe_errorf(MOE_ERR_NOMEM, "token scratch");
    int64_t index = 0;
    cJSON_ArrayForEach(it, vocab)
    {
        if (st) break;
        index++;
        int64_t v;
        if (json_int(it, &v)) {
            st = moe_errorf(MOE_ERR_FORMAT, "%s: vocab entry %lld (\"%.40s\"): id is not an integer in [0, %d)", what,
                            (long long)index, it->string, MOE_TOK_MAX_VOCAB);
            break;
        }
        int is_special = 0;
        for (int i = 0; i < sl.n; i++)
            if (sl.ids[i] == v) is_special = 1;
        if (is_special) continue;
        long k = hf_to_bytes(buf, it->string, u2b);
        if (k <= 0) {
            st = moe_errorf(MOE_ERR_FORMAT, "%s: vocab token \"%.40s\" (id %lld) is not in the byte-level alphabet",
                            what, it->string, (long long)v);
            break;
        }
        st = raw_add(&r, v, buf, (size_t)k, index, -1);
    }
    if (!st) st = raw_build(out, &r, pat, sl.n, (const char *const *)sl.names, sl.ids);
    raw_free(&r);
    spec_free(&sl);
    if (st) {
        free(buf);
        return st;
    }
    /* The merge list must be the one the ranks imply: each merge makes a new
     * token, in increasing id order, and is the split BPE gives that token
     * with the ranks below its own. Only then does tiktoken's algorithm
     * (ranks = ids) give the ids of HF's merge-list algorithm. */
    const moe_tok *t = *out;
    size_t *bounds = malloc(sizeof(size_t) * (MOE_TOK_MAX_TOKEN_LEN + 2));
    uint8_t *b2 = malloc(MOE_TOK_MAX_TOKEN_LEN + 8);
    if (!bounds || !b2) st = moe_errorf(MOE_ERR_NOMEM, "merge check");
    int64_t prev = -1, k = 0, multi = 0;
    uint8_t *made = calloc((size_t)t->n, 1); /* ids some merge makes */
    if (!made && !st) st = moe_errorf(MOE_ERR_NOMEM, "merge check");
    cJSON_ArrayForEach(it, merges)
    {
        if (st) break;
        k++;
        const char *l = NULL, *rr = NULL;
        if (cJSON_IsString(it)) {
            /* "left right": split in place at the one space (the alphabet has none) */
            char *s = it->valuestring, *sp = strchr(s, ' ');
            if (sp && !strchr(sp + 1, ' ')) {
                *sp = '\0';
                l = s;
                rr = sp + 1;
            }
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            l = cJSON_GetArrayItem(it, 0)->valuestring;
            rr = cJSON_GetArrayItem(it, 1)->valuestring;
        }
        long la = l ? hf_to_bytes(buf, l, u2b) : -1;
        long lb = rr ? hf_to_bytes(b2, rr, u2b) : -1;
        if (la <= 0 || lb <= 0 || la + lb > MOE_TOK_MAX_TOKEN_LEN) {
            st = moe_errorf(MOE_ERR_FORMAT, "%s: merge %lld is not two byte-level tokens", what, (long long)k);
            break;
        }
        memcpy(buf + la, b2, (size_t)lb);
        int64_t ra = moe_tok_rank(t, buf, (size_t)la), rb = moe_tok_rank(t, b2, (size_t)lb);
        int64_t rm = moe_tok_rank(t, buf, (size_t)(la + lb));
        if (ra < 0 || rb < 0 || rm < 0) {
            st = moe_errorf(MOE_ERR_FORMAT, "%s: merge %lld (\"%s\" + \"%s\"): %s is not in the vocab", what,
                            (long long)k, l, rr, ra < 0 ? "the left part" : rb < 0 ? "the right part" : "the result");
            break;
        }
        if (rm <= prev) {
            st = moe_errorf(MOE_ERR_FORMAT,
                            "%s: merge %lld (\"%s\" + \"%s\") makes id %lld after a merge that made id %lld: merge "
                            "order disagrees with the ids, so ranks = ids would not reproduce this tokenizer",
                            what, (long long)k, l, rr, (long long)rm, (long long)prev);
            break;
        }
        size_t nb = bpe_below(t, buf, (size_t)(la + lb), rm, bounds);
        if (nb != 2 || bounds[1] != (size_t)la) {
            st = moe_errorf(MOE_ERR_FORMAT,
                            "%s: merge %lld (\"%s\" + \"%s\" -> id %lld) is not the split the lower ranks give that "
                            "token, so ranks = ids would not reproduce this tokenizer",
                            what, (long long)k, l, rr, (long long)rm);
            break;
        }
        prev = rm;
        made[rm] = 1;
    }
    if (!st) {
        for (int64_t id = 0; id < t->n; id++) multi += moe_tok_tlen(t, id) >= 2;
        if (multi != k) {
            /* name the first token no merge makes */
            for (int64_t id = 0; id < t->n && !st; id++)
                if (moe_tok_tlen(t, id) >= 2 && !made[id])
                    st = moe_errorf(MOE_ERR_FORMAT, "%s: token id %lld is made by no merge (%lld merges for %lld tokens "
                                    "of two or more bytes)", what, (long long)id, (long long)k, (long long)multi);
            if (!st)
                st = moe_errorf(MOE_ERR_FORMAT, "%s: %lld merges for %lld tokens of two or more bytes", what,
                                (long long)k, (long long)multi);
        }
    }
    free(made);
    free(bounds);
    free(b2);
    free(buf);
    if (st) {
        moe_tok_destroy(*out);
        *out = NULL;
    }
    return st;
}

moe_status moe_tok_load_buffer(moe_tok **out, const char *what, const uint8_t *data, size_t n, moe_tok_form form,
                               const char *pattern, int ns, const char *const *names, const int64_t *ids)
{
    *out = NULL;
    if (pattern) {
        const char *named = moe_tok_named_pattern(pattern);
        if (named) pattern = named;
    }
    size_t i = 0;
    while (i < n && (data[i] == ' ' || data[i] == '\n' || data[i] == '\t' || data[i] == '\r')) i++;
    if (form == MOE_TOK_FORM_AUTO) form = i < n && data[i] == '{' ? MOE_TOK_FORM_TIKTOKEN_JSON : MOE_TOK_FORM_TIKTOKEN;
    if (form == MOE_TOK_FORM_TIKTOKEN) {
        if (!pattern)
            return moe_errorf(MOE_ERR_ARG, "%s: a .tiktoken file has no pattern: give one (--pattern NAME or REGEX)",
                              what);
        raw_ranks r = {.what = what};
        moe_status st = parse_tiktoken(&r, (const char *)data, n);
        if (!st) st = raw_build(out, &r, pattern, ns, names, ids);
        raw_free(&r);
        return st;
    }
    cJSON *root = cJSON_ParseWithLength((const char *)data, n);
    if (!root) {
        char place[64];
        json_error_place(place, sizeof place, (const char *)data, n);
        return moe_errorf(MOE_ERR_FORMAT, "%s: not valid JSON (at %s)", what, place);
    }
    moe_status st;
    if (!cJSON_IsObject(root)) st = moe_errorf(MOE_ERR_FORMAT, "%s: the JSON is not an object", what);
    else if (cJSON_GetObjectItemCaseSensitive(root, "bpe_ranks") && form != MOE_TOK_FORM_HF)
        st = load_tiktoken_json(out, what, root, pattern, ns, names, ids);
    else if (cJSON_GetObjectItemCaseSensitive(root, "model"))
        st = load_hf(out, what, root, pattern, ns, names, ids);
    else
        st = moe_errorf(MOE_ERR_FORMAT, "%s: JSON with neither \"bpe_ranks\" (tiktoken) nor \"model\" (Hugging Face)",
                        what);
    cJSON_Delete(root);
    return st;
}

moe_status moe_tok_load(moe_tok **out, const char *path, moe_tok_form form, const char *pattern, int ns,
                        const char *const *names, const int64_t *ids)
{
    *out = NULL;
    /* non-blocking open: a named pipe is refused below, never waited on */
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "rb");
    if (!f) {
        const int err = errno;
        if (fd >= 0) close(fd);
        return moe_errorf(MOE_ERR_IO, "cannot open tokenizer %s: %s", path, strerror(err));
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return moe_errorf(MOE_ERR_IO, "tokenizer %s is not a regular file", path);
    }
    if (sb.st_size > MAX_FILE_BYTES) {
        fclose(f);
        return moe_errorf(MOE_ERR_FORMAT, "tokenizer %s has %lld bytes (at most %d)", path, (long long)sb.st_size,
                          MAX_FILE_BYTES);
    }
    size_t n = (size_t)sb.st_size;
    uint8_t *buf = malloc(n + 1);
    if (!buf) {
        fclose(f);
        return moe_errorf(MOE_ERR_NOMEM, "tokenizer %s (%zu bytes)", path, n);
    }
    size_t got = fread(buf, 1, n, f);
    int bad = ferror(f);
    fclose(f);
    if (got != n || bad) {
        free(buf);
        return moe_errorf(MOE_ERR_IO, "cannot read tokenizer %s", path);
    }
    buf[n] = 0;
    moe_status st = moe_tok_load_buffer(out, path, buf, n, form, pattern, ns, names, ids);
    free(buf);
    return st;
}

/* ---- export ---- */

/* bpe_ranks runs: a new "! <first>" line after every hole. */
static void put_runs(moe_strbuf *b, const moe_tok *t)
{
    char *enc = malloc(4 * ((MOE_TOK_MAX_TOKEN_LEN + 2) / 3) + 2);
    if (!enc) {
        b->bad = 1;
        return;
    }
    int open = 0;
    for (int64_t id = 0; id < t->n; id++) {
        size_t len = (size_t)moe_tok_tlen(t, id);
        if (!len) {
            open = 0;
            continue;
        }
        if (!open) {
            char head[48];
            snprintf(head, sizeof head, "%s! %lld", b->n ? "\n" : "", (long long)id);
            moe_strbuf_puts(b, head);
            open = 1;
        }
        size_t k = moe_tok_base64_encode(enc + 1, t->bytes + t->offsets[id], len);
        enc[0] = ' ';
        moe_strbuf_put(b, enc, k + 1);
    }
    free(enc);
}

static moe_status save_tiktoken_json(const moe_tok *t, char **data, size_t *n)
{
    moe_strbuf runs = {0};
    put_runs(&runs, t);
    cJSON *root = cJSON_CreateObject();
    cJSON *sp = cJSON_CreateObject();
    moe_status st = MOE_OK;
    if (runs.bad || !root || !sp) st = moe_errorf(MOE_ERR_NOMEM, "tokenizer JSON");
    if (!st) {
        if (t->n_holes == 0) cJSON_AddNumberToObject(root, "explicit_n_vocab", (double)t->vocab);
        cJSON_AddStringToObject(root, "pat_str", t->pattern);
        for (int i = 0; i < t->n_specials; i++) cJSON_AddNumberToObject(sp, t->special_names[i], (double)t->special_ids[i]);
        cJSON_AddItemToObject(root, "special_tokens", sp);
        sp = NULL;
        cJSON_AddStringToObject(root, "bpe_ranks", runs.p ? runs.p : "");
        char *s = cJSON_PrintUnformatted(root);
        if (!s) st = moe_errorf(MOE_ERR_NOMEM, "tokenizer JSON");
        else {
            size_t len = strlen(s);
            *data = realloc(s, len + 2);
            if (!*data) {
                free(s);
                st = moe_errorf(MOE_ERR_NOMEM, "tokenizer JSON");
            } else {
                (*data)[len] = '\n';
                (*data)[len + 1] = '\0';
                *n = len + 1;
            }
        }
    }
    cJSON_Delete(sp);
    cJSON_Delete(root);
    free(runs.p);
    return st;
}

static moe_status save_tiktoken(const moe_tok *t, char **data, size_t *n)
{
    moe_strbuf b = {0};
    char *enc = malloc(4 * ((MOE_TOK_MAX_TOKEN_LEN + 2) / 3) + 32);
    if (!enc) return moe_errorf(MOE_ERR_NOMEM, ".tiktoken text");
    for (int64_t id = 0; id < t->n; id++) {
        size_t len = (size_t)moe_tok_tlen(t, id);
        if (!len) continue;
        size_t k = moe_tok_base64_encode(enc, t->bytes + t->offsets[id], len);
        k += (size_t)sprintf(enc + k, " %lld\n", (long long)id);
        moe_strbuf_put(&b, enc, k);
    }
    free(enc);
    if (b.bad) {
        free(b.p);
        return moe_errorf(MOE_ERR_NOMEM, ".tiktoken text");
    }
    *data = b.p ? b.p : strdup("");
    *n = b.n;
    return *data ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, ".tiktoken text");
}

static cJSON *bytelevel(int add_prefix_space, int trim_offsets, int use_regex)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", "ByteLevel");
    cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(o, "trim_offsets", trim_offsets);
    cJSON_AddBoolToObject(o, "use_regex", use_regex);
    return o;
}

static moe_status save_hf(const moe_tok *t, char **data, size_t *n)
{
    uint32_t b2u[256];
    int16_t u2b[512];
    byte_alphabet(b2u, u2b);
    moe_status st = MOE_OK;
    cJSON *root = cJSON_CreateObject();
    char *s1 = malloc(2 * MOE_TOK_MAX_TOKEN_LEN + 2), *s2 = malloc(2 * MOE_TOK_MAX_TOKEN_LEN + 2);
    size_t *bounds = malloc(sizeof(size_t) * (MOE_TOK_MAX_TOKEN_LEN + 2));
    if (!root || !s1 || !s2 || !bounds) st = moe_errorf(MOE_ERR_NOMEM, "tokenizer.json");
    if (!st) {
        cJSON_AddStringToObject(root, "version", "1.0");
        cJSON_AddNullToObject(root, "truncation");
        cJSON_AddNullToObject(root, "padding");
        cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
        for (int i = 0; i < t->n_specials; i++) {
            cJSON *a = cJSON_CreateObject();
            cJSON_AddNumberToObject(a, "id", (double)t->special_ids[i]);
            cJSON_AddStringToObject(a, "content", t->special_names[i]);
            cJSON_AddBoolToObject(a, "single_word", 0);
            cJSON_AddBoolToObject(a, "lstrip", 0);
            cJSON_AddBoolToObject(a, "rstrip", 0);
            cJSON_AddBoolToObject(a, "normalized", 0);
            cJSON_AddBoolToObject(a, "special", 1);
            cJSON_AddItemToArray(added, a);
        }
        cJSON_AddNullToObject(root, "normalizer");
        /* the pattern splits (keeping any text between matches as its own
         * piece, as moerun does), then bytes map to the byte-level alphabet */
        cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
        cJSON_AddStringToObject(pre, "type", "Sequence");
        cJSON *list = cJSON_AddArrayToObject(pre, "pretokenizers");
        cJSON *split = cJSON_CreateObject();
        cJSON_AddStringToObject(split, "type", "Split");
        cJSON *pat = cJSON_AddObjectToObject(split, "pattern");
        cJSON_AddStringToObject(pat, "Regex", t->pattern);
        cJSON_AddStringToObject(split, "behavior", "Isolated");
        cJSON_AddBoolToObject(split, "invert", 0);
        cJSON_AddItemToArray(list, split);
        cJSON_AddItemToArray(list, bytelevel(0, 1, 0));
        cJSON_AddItemToObject(root, "post_processor", bytelevel(1, 0, 1));
        cJSON_AddItemToObject(root, "decoder", bytelevel(1, 1, 1));
        cJSON *model = cJSON_AddObjectToObject(root, "model");
        cJSON_AddStringToObject(model, "type", "BPE");
        cJSON_AddNullToObject(model, "dropout");
        cJSON_AddNullToObject(model, "unk_token");
        cJSON_AddNullToObject(model, "continuing_subword_prefix");
        cJSON_AddNullToObject(model, "end_of_word_suffix");
        cJSON_AddBoolToObject(model, "fuse_unk", 0);
        cJSON_AddBoolToObject(model, "byte_fallback", 0);
        /* a piece that is a token is that token, as in tiktoken */
        cJSON_AddBoolToObject(model, "ignore_merges", 1);
        cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
        cJSON *merges = cJSON_AddArrayToObject(model, "merges");
        for (int64_t id = 0; id < t->n && !st; id++) {
            size_t len = (size_t)moe_tok_tlen(t, id);
            if (!len) continue;
            const uint8_t *b = t->bytes + t->offsets[id];
            hf_from_bytes(s1, b, len, b2u);
            cJSON_AddNumberToObject(vocab, s1, (double)id);
            if (len < 2) continue;
            size_t k = bpe_below(t, b, len, id, bounds);
            if (k != 2) {
                st = moe_errorf(MOE_ERR_FORMAT,
                                "token %lld (%zu bytes) is not a merge of two lower ranks, so it has no HF merge", (long long)id,
                                len);
                break;
            }
            hf_from_bytes(s1, b, bounds[1], b2u);
            size_t w = strlen(s1);
            s1[w] = ' ';
            hf_from_bytes(s1 + w + 1, b + bounds[1], len - bounds[1], b2u);
            cJSON_AddItemToArray(merges, cJSON_CreateString(s1));
        }
    }
    if (!st) {
        char *s = cJSON_PrintUnformatted(root);
        if (!s) st = moe_errorf(MOE_ERR_NOMEM, "tokenizer.json");
        else {
            *data = s;
            *n = strlen(s);
        }
    }
    cJSON_Delete(root);
    free(s1);
    free(s2);
    free(bounds);
    return st;
}

moe_status moe_tok_save_buffer(const moe_tok *t, moe_tok_form form, char **data, size_t *n)
{
    *data = NULL;
    *n = 0;
    switch (form) {
    case MOE_TOK_FORM_TIKTOKEN_JSON: return save_tiktoken_json(t, data, n);
    case MOE_TOK_FORM_TIKTOKEN: return save_tiktoken(t, data, n);
    case MOE_TOK_FORM_HF: return save_hf(t, data, n);
    default: return moe_errorf(MOE_ERR_ARG, "choose a form to save (tiktoken-json, tiktoken or hf)");
    }
}

moe_status moe_tok_save(const moe_tok *t, const char *path, moe_tok_form form)
{
    char *data;
    size_t n;
    moe_status st = moe_tok_save_buffer(t, form, &data, &n);
    if (st) return st;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        free(data);
        return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    }
    size_t w = fwrite(data, 1, n, f);
    int bad = w != n || fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    free(data);
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return moe_errorf(MOE_ERR_IO, "cannot write %s: %s", path, strerror(e));
    }
    return MOE_OK;
}
