/* Tokenizer creation and accessors: the rank table (open addressing over
 * byte strings), the decode table, specials, the published patterns and
 * the tokenizer hash. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

const char moe_tok_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static const char cl100k_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static const char o200k_pattern[] =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const char *moe_tok_named_pattern(const char *name)
{
    if (!name) return NULL;
    if (!strcmp(name, "gpt2") || !strcmp(name, "r50k_base") || !strcmp(name, "p50k_base") ||
        !strcmp(name, "p50k_edit"))
        return moe_tok_gpt2_pattern;
    if (!strcmp(name, "cl100k_base")) return cl100k_pattern;
    if (!strcmp(name, "o200k_base")) return o200k_pattern;
    return NULL;
}

void moe_tok_regex_engine(char *buf, size_t n)
{
    char ver[64] = "?", uni[64] = "?";
    uint32_t jit = 0;
    pcre2_config(PCRE2_CONFIG_VERSION, ver);
    pcre2_config(PCRE2_CONFIG_UNICODE_VERSION, uni);
    pcre2_config(PCRE2_CONFIG_JIT, &jit);
    snprintf(buf, n, "PCRE2 %s (Unicode %s), JIT %s", ver, uni, jit ? "on" : "off");
}

uint64_t moe_tok_fnv1a64(uint64_t h, const void *data, size_t n)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t fnv_u32(uint64_t h, uint32_t v)
{
    const uint8_t le[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    return moe_tok_fnv1a64(h, le, 4);
}

/* Rewrites the pattern's \s and \S into explicit classes of the Unicode
 * White_Space property. Why: tiktoken's regex engine (Rust) means
 * White_Space by \s, while PCRE2 with UCP means \p{Z}, \h and \v, which adds
 * U+180E (MONGOLIAN VOWEL SEPARATOR); with the rewrite both agree on every
 * code point. Escapes other than \s, \S are copied as they are; \Q..\E
 * literal spans are left alone. Returns a malloc'd string or NULL. */
static char *rewrite_space_classes(const char *p)
{
    static const char ws[] = "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
                             "\\x{202F}\\x{205F}\\x{3000}";
    size_t n = strlen(p), cap = n * (sizeof ws + 4) + 1;
    char *o = malloc(cap), *w = o;
    if (!o) return NULL;
    int in_class = 0, quoted = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (quoted) {
            if (c == '\\' && p[i + 1] == 'E') quoted = 0;
            *w++ = c;
            continue;
        }
        if (c == '\\' && i + 1 < n) {
            char d = p[i + 1];
            if (d == 'Q') {
                quoted = 1;
            } else if (d == 's' || d == 'S') {
                if (in_class && d == 's') {
                    w += sprintf(w, "%s", ws);
                } else if (!in_class) {
                    w += sprintf(w, d == 's' ? "[%s]" : "[^%s]", ws);
                } else { /* \S inside a class: no way to subtract; keep PCRE2's meaning */
                    *w++ = '\\';
                    *w++ = 'S';
                }
                i++;
                continue;
            }
            *w++ = c;
            *w++ = p[++i];
            continue;
        }
        if (!in_class && c == '[') {
            in_class = 1;
            *w++ = c;
            /* a ']' right after '[' or '[^' is literal */
            if (p[i + 1] == '^') *w++ = p[++i];
            if (p[i + 1] == ']') *w++ = p[++i];
            continue;
        }
        if (in_class && c == '[' && p[i + 1] == ':') { /* POSIX class [:alpha:] */
            const char *e = strstr(p + i + 2, ":]");
            if (e) {
                size_t len = (size_t)(e + 2 - (p + i));
                memcpy(w, p + i, len);
                w += len;
                i += len - 1;
                continue;
            }
        }
        if (in_class && c == ']') in_class = 0;
        *w++ = c;
    }
    *w = '\0';
    return o;
}

static moe_status compile_pattern(moe_tok *t, const char *pattern)
{
    size_t plen = strlen(pattern);
    if (plen == 0) return moe_errorf(MOE_ERR_ARG, "the pattern is empty");
    if (plen > MOE_TOK_MAX_PATTERN)
        return moe_errorf(MOE_ERR_ARG, "the pattern has %zu bytes (at most %d)", plen, MOE_TOK_MAX_PATTERN);
    t->pattern = strdup(pattern);
    char *rw = rewrite_space_classes(pattern);
    if (!t->pattern || !rw) {
        free(rw);
        return moe_errorf(MOE_ERR_NOMEM, "pattern copy");
    }
    /* Syntax errors are reported against the pattern as written. */
    int err;
    PCRE2_SIZE off;
    pcre2_code *probe = pcre2_compile((PCRE2_SPTR)pattern, plen, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    if (!probe) {
        free(rw);
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return moe_errorf(MOE_ERR_ARG, "the pattern does not compile: %s at offset %zu of \"%.200s\"", (char *)msg,
                          (size_t)off, pattern);
    }
    pcre2_code_free(probe);
    t->re = pcre2_compile((PCRE2_SPTR)rw, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    free(rw);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return moe_errorf(MOE_ERR_ARG, "the pattern does not compile after \\s rewriting: %s", (char *)msg);
    }
    /* JIT for complete matches and for partial ones (part ends); without JIT
     * support PCRE2 falls back to its interpreter, with the same results. */
    (void)pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE | PCRE2_JIT_PARTIAL_HARD);
    uint32_t lb = 0;
    pcre2_pattern_info(t->re, PCRE2_INFO_MAXLOOKBEHIND, &lb);
    t->max_lookbehind = lb;
    return MOE_OK;
}

void moe_tok_destroy(moe_tok *t)
{
    if (!t) return;
    free(t->bytes);
    free(t->offsets);
    free(t->slots);
    free(t->pair_rank);
    free(t->dec);
    free(t->pattern);
    if (t->re) pcre2_code_free(t->re);
    for (int i = 0; i < t->n_specials; i++) free(t->special_names[i]);
    free(t->special_names);
    free(t->special_ids);
    free(t->is_special);
    free(t);
}

static moe_status check_offsets(const int64_t *offsets, int64_t n)
{
    if (offsets[0] != 0) return moe_errorf(MOE_ERR_FORMAT, "token offsets must start at 0 (got %lld)", (long long)offsets[0]);
    for (int64_t i = 0; i < n; i++) {
        int64_t len = offsets[i + 1] - offsets[i];
        if (len < 0) return moe_errorf(MOE_ERR_FORMAT, "token offsets decrease at id %lld", (long long)i);
        if (len > MOE_TOK_MAX_TOKEN_LEN)
            return moe_errorf(MOE_ERR_FORMAT, "token %lld has %lld bytes (at most %d)", (long long)i, (long long)len,
                              MOE_TOK_MAX_TOKEN_LEN);
    }
    return MOE_OK;
}

static int cmp_special(const void *a, const void *b, const int64_t *ids)
{
    int ia = *(const int *)a, ib = *(const int *)b;
    return ids[ia] < ids[ib] ? -1 : ids[ia] > ids[ib];
}

static moe_status set_specials(moe_tok *t, int ns, const char *const *names, const int64_t *ids)
{
    if (ns < 0 || ns > MOE_TOK_MAX_SPECIALS)
        return moe_errorf(MOE_ERR_FORMAT, "%d special tokens (at most %d)", ns, MOE_TOK_MAX_SPECIALS);
    int *order = malloc(sizeof(int) * (size_t)(ns ? ns : 1));
    if (!order) return moe_errorf(MOE_ERR_NOMEM, "specials");
    for (int i = 0; i < ns; i++) order[i] = i;
    /* insertion sort by id: specials are few */
    for (int i = 1; i < ns; i++)
        for (int j = i; j > 0 && cmp_special(&order[j - 1], &order[j], ids) > 0; j--) {
            int x = order[j];
            order[j] = order[j - 1];
            order[j - 1] = x;
        }
    moe_status st = MOE_OK;
    t->special_names = calloc((size_t)(ns ? ns : 1), sizeof(char *));
    t->special_ids = calloc((size_t)(ns ? ns : 1), sizeof(int64_t));
    if (!t->special_names || !t->special_ids) st = moe_errorf(MOE_ERR_NOMEM, "specials");
    for (int k = 0; !st && k < ns; k++) {
        int i = order[k];
        const char *name = names[i];
        if (!name || !*name) {
            st = moe_errorf(MOE_ERR_FORMAT, "special token with id %lld has an empty name", (long long)ids[i]);
            break;
        }
        if (ids[i] < 0 || ids[i] >= MOE_TOK_MAX_VOCAB) {
            st = moe_errorf(MOE_ERR_FORMAT, "special token '%s' has id %lld (ids are 0..%d)", name, (long long)ids[i],
                            MOE_TOK_MAX_VOCAB - 1);
            break;
        }
        if (ids[i] < t->n && t->offsets[ids[i] + 1] > t->offsets[ids[i]]) {
            st = moe_errorf(MOE_ERR_FORMAT, "special token '%s' has id %lld, which is already a rank", name,
                            (long long)ids[i]);
            break;
        }
        if (k > 0 && t->special_ids[k - 1] == ids[i]) {
            st = moe_errorf(MOE_ERR_FORMAT, "special tokens '%s' and '%s' have the same id %lld",
                            t->special_names[k - 1], name, (long long)ids[i]);
            break;
        }
        for (int j = 0; j < k; j++)
            if (!strcmp(t->special_names[j], name)) {
                st = moe_errorf(MOE_ERR_FORMAT, "special token '%s' is given twice", name);
                break;
            }
        if (st) break;
        const size_t nlen = strlen(name), valid = moe_tok_utf8_valid_prefix((const uint8_t *)name, nlen);
        if (valid < nlen) { /* names are text: JSON keys, HF contents, command-line words */
            st = moe_errorf(MOE_ERR_FORMAT, "special token with id %lld: its name is not UTF-8 (byte %zu)",
                            (long long)ids[i], valid);
            break;
        }
        if (strlen(name) > MOE_TOK_MAX_TOKEN_LEN) {
            st = moe_errorf(MOE_ERR_FORMAT, "special token name of %zu bytes", strlen(name));
            break;
        }
        t->special_names[k] = strdup(name);
        t->special_ids[k] = ids[i];
        t->n_specials = k + 1;
        if (!t->special_names[k]) st = moe_errorf(MOE_ERR_NOMEM, "specials");
    }
    free(order);
    return st;
}

moe_status moe_tok_create(moe_tok **out, const uint8_t *bytes, const int64_t *offsets, int64_t n, const char *pattern,
                          int n_specials, const char *const *special_names, const int64_t *special_ids)
{
    *out = NULL;
    if (n < 1 || !offsets || (!bytes && offsets[n] > 0))
        return moe_errorf(MOE_ERR_FORMAT, "a tokenizer needs ranks for the 256 single bytes (got %lld ranks)",
                          (long long)n);
    if (n > MOE_TOK_MAX_VOCAB)
        return moe_errorf(MOE_ERR_FORMAT, "%lld ranks (at most %d)", (long long)n, MOE_TOK_MAX_VOCAB);
    moe_status st = check_offsets(offsets, n);
    if (st) return st;
    if (offsets[n] >= ((int64_t)1 << 32))
        return moe_errorf(MOE_ERR_FORMAT, "token bytes total %lld (at most 4 GiB)", (long long)offsets[n]);
    if (n_specials > 0 && (!special_names || !special_ids))
        return moe_errorf(MOE_ERR_ARG, "specials without names or ids");

    moe_tok *t = calloc(1, sizeof *t);
    if (!t) return moe_errorf(MOE_ERR_NOMEM, "tokenizer");
    t->n = n;
    t->bytes = malloc((size_t)offsets[n] + 1);
    t->offsets = malloc(sizeof(int64_t) * (size_t)(n + 1));
    uint64_t cap = 1024;
    while (cap < (uint64_t)n * 2) cap <<= 1;
    t->mask = cap - 1;
    t->slots = calloc(cap, sizeof(uint64_t));
    t->pair_rank = malloc(sizeof(int32_t) * 65536);
    if (!t->bytes || !t->offsets || !t->slots || !t->pair_rank) {
        moe_tok_destroy(t);
        return moe_errorf(MOE_ERR_NOMEM, "tokenizer of %lld ranks", (long long)n);
    }
    if (offsets[n]) memcpy(t->bytes, bytes, (size_t)offsets[n]);
    memcpy(t->offsets, offsets, sizeof(int64_t) * (size_t)(n + 1));

    /* rank table */
    for (int i = 0; i < 256; i++) t->byte_rank[i] = -1;
    for (int i = 0; i < 65536; i++) t->pair_rank[i] = -1;
    for (int64_t id = 0; id < n && !st; id++) {
        size_t len = (size_t)(offsets[id + 1] - offsets[id]);
        if (len == 0) {
            t->n_holes++;
            continue;
        }
        const uint8_t *s = t->bytes + offsets[id];
        uint64_t h = moe_tok_hash_bytes(s, len);
        int64_t dup = moe_tok_lookup(t, s, len, h);
        if (dup >= 0) {
            st = moe_errorf(MOE_ERR_FORMAT, "ranks %lld and %lld have the same bytes (%zu bytes)", (long long)dup,
                            (long long)id, len);
            break;
        }
        uint64_t i = h & t->mask;
        while (t->slots[i]) i = (i + 1) & t->mask;
        t->slots[i] = ((h >> 32) << 32) | (uint64_t)(id + 1);
        if (len == 1) t->byte_rank[s[0]] = (int32_t)id;
        if (len == 2) t->pair_rank[s[0] | (s[1] << 8)] = (int32_t)id;
        if ((int)len > t->max_len) t->max_len = (int)len;
    }
    for (int b = 0; b < 256 && !st; b++)
        if (t->byte_rank[b] < 0) st = moe_errorf(MOE_ERR_FORMAT, "the single byte 0x%02x has no rank", b);
    if (!st) st = set_specials(t, n_specials, special_names, special_ids);
    if (!st) {
        t->vocab = n;
        for (int i = 0; i < t->n_specials; i++)
            if (t->special_ids[i] + 1 > t->vocab) t->vocab = t->special_ids[i] + 1;
        /* every special fills a hole of the ranks or an id >= n */
        t->n_holes += t->vocab - n - t->n_specials;
        t->dec = calloc((size_t)t->vocab, sizeof(moe_tok_dec16));
        t->is_special = calloc((size_t)t->vocab, 1);
        if (!t->dec || !t->is_special) st = moe_errorf(MOE_ERR_NOMEM, "decode table");
    }
    if (!st) {
        for (int64_t id = 0; id < n; id++) {
            int64_t len = offsets[id + 1] - offsets[id];
            if (len >= 1 && len <= 15) {
                memcpy(t->dec[id].b, t->bytes + offsets[id], (size_t)len);
                t->dec[id].len = (uint8_t)len;
            }
        }
        for (int i = 0; i < t->n_specials; i++) t->is_special[t->special_ids[i]] = 1;
        st = compile_pattern(t, pattern ? pattern : moe_tok_gpt2_pattern);
    }
    if (st) {
        moe_tok_destroy(t);
        return st;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (int64_t id = 0; id < n; id++) {
        h = fnv_u32(h, (uint32_t)(offsets[id + 1] - offsets[id]));
        h = moe_tok_fnv1a64(h, t->bytes + offsets[id], (size_t)(offsets[id + 1] - offsets[id]));
    }
    h = fnv_u32(h, (uint32_t)strlen(t->pattern));
    t->hash = moe_tok_fnv1a64(h, t->pattern, strlen(t->pattern));
    *out = t;
    return MOE_OK;
}

int64_t moe_tok_vocab_size(const moe_tok *t) { return t->vocab; }
int64_t moe_tok_n_ranks(const moe_tok *t) { return t->n; }
int64_t moe_tok_n_holes(const moe_tok *t) { return t->n_holes; }
const char *moe_tok_pattern(const moe_tok *t) { return t->pattern; }
int moe_tok_n_specials(const moe_tok *t) { return t->n_specials; }
const char *moe_tok_special_name(const moe_tok *t, int i)
{
    return i >= 0 && i < t->n_specials ? t->special_names[i] : NULL;
}
int64_t moe_tok_special_id(const moe_tok *t, int i) { return i >= 0 && i < t->n_specials ? t->special_ids[i] : -1; }
const uint8_t *moe_tok_rank_bytes(const moe_tok *t) { return t->bytes; }
const int64_t *moe_tok_rank_offsets(const moe_tok *t) { return t->offsets; }
uint64_t moe_tok_hash(const moe_tok *t) { return t->hash; }

int moe_tok_is_special(const moe_tok *t, int64_t id) { return id >= 0 && id < t->vocab && t->is_special[id]; }

const uint8_t *moe_tok_token(const moe_tok *t, int64_t id, size_t *len)
{
    *len = 0;
    if (id < 0 || id >= t->vocab) return NULL;
    if (t->is_special[id]) {
        for (int i = 0; i < t->n_specials; i++)
            if (t->special_ids[i] == id) {
                *len = strlen(t->special_names[i]);
                return (const uint8_t *)t->special_names[i];
            }
    }
    if (id >= t->n || moe_tok_tlen(t, id) == 0) return NULL;
    *len = (size_t)moe_tok_tlen(t, id);
    return t->bytes + t->offsets[id];
}

int64_t moe_tok_rank(const moe_tok *t, const uint8_t *s, size_t len)
{
    if (len == 0) return -1;
    return moe_tok_lookup(t, s, len, moe_tok_hash_bytes(s, len));
}

moe_status moe_tok_special_find(const moe_tok *t, const char *name, int64_t *id)
{
    for (int i = 0; i < t->n_specials; i++)
        if (!strcmp(t->special_names[i], name)) {
            *id = t->special_ids[i];
            return MOE_OK;
        }
    char list[512] = "";
    size_t w = 0;
    for (int i = 0; i < t->n_specials && w + 2 < sizeof list; i++)
        w += (size_t)snprintf(list + w, sizeof list - w, "%s%s", i ? ", " : "", t->special_names[i]);
    return moe_errorf(MOE_ERR_ARG, "the tokenizer has no special token '%s' (it has: %s)", name,
                      t->n_specials ? list : "none");
}

int moe_tok_equal(const moe_tok *a, const moe_tok *b)
{
    if (a->n != b->n || a->vocab != b->vocab || a->n_specials != b->n_specials) return 0;
    if (strcmp(a->pattern, b->pattern)) return 0;
    if (memcmp(a->offsets, b->offsets, sizeof(int64_t) * (size_t)(a->n + 1))) return 0;
    if (memcmp(a->bytes, b->bytes, (size_t)a->offsets[a->n])) return 0;
    for (int i = 0; i < a->n_specials; i++)
        if (a->special_ids[i] != b->special_ids[i] || strcmp(a->special_names[i], b->special_names[i])) return 0;
    return 1;
}
