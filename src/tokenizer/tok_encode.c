/* Encoding and decoding: the pre-tokenizer scan (UTF-8 segments, document
 * delimiters, PCRE2 matches), the BPE merge of one piece (tiktoken's array
 * loop for short pieces, a heap over a linked list for long ones), a
 * per-encoder cache of piece -> ids, the fast decoder, and the plain
 * references of both. */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

enum {
    CACHE_SIZE = 8192,    /* direct-mapped piece cache entries */
    CACHE_MAX_LEN = 24,   /* pieces cached: up to this many bytes ... */
    CACHE_MAX_IDS = 7,    /* ... giving up to this many ids */
    SMALL_PIECE = 64,     /* longer pieces merge through the heap */
    SCAN_WINDOW = 1 << 16 /* UTF-8 validated ahead of a part's end, doubled on demand */
};

typedef struct {
    uint64_t h;
    uint16_t len;
    uint16_t n_ids;
    uint32_t ids[CACHE_MAX_IDS];
    uint8_t bytes[CACHE_MAX_LEN];
} cache_entry; /* 64 bytes */

struct moe_tok_encoder {
    const moe_tok *t;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit_stack;
    int use_jit;
    cache_entry *cache;
    /* heap merge scratch, grown to the longest piece seen */
    size_t heap_cap;
    uint32_t *nxt, *prv, *rk, *id;
    uint64_t *heap;
    /* document delimiter */
    uint8_t *delim;
    size_t delim_len;
    int64_t sep;
    /* reference encoder: ids sorted by bytes (built on first use) */
    uint32_t *sorted;
    size_t n_sorted;
};

/* ---- UTF-8 ---- */

/* Length of the well-formed UTF-8 sequence at s (n > 0 bytes available),
 * 0 if none starts there (Unicode table 3-7). */
static inline int utf8_seq(const uint8_t *s, size_t n)
{
    const uint8_t c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xc2) return 0;
    if (c < 0xe0) return n >= 2 && (s[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c < 0xf0) {
        if (n < 3 || (s[2] & 0xc0) != 0x80) return 0;
        const uint8_t lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
        return s[1] >= lo && s[1] <= hi ? 3 : 0;
    }
    if (c < 0xf5) {
        if (n < 4 || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80) return 0;
        const uint8_t lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
        return s[1] >= lo && s[1] <= hi ? 4 : 0;
    }
    return 0;
}

/* First position >= i where no well-formed sequence starts, scanning while
 * the position is < lim (sequences may read past lim, up to n). Returns a
 * position >= lim when everything before lim is valid. */
static size_t utf8_valid_until(const uint8_t *s, size_t n, size_t i, size_t lim)
{
    if (lim > n) lim = n;
    while (i < lim) {
        if (i + 8 <= lim) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        int k = utf8_seq(s + i, n - i);
        if (!k) return i;
        i += (size_t)k;
    }
    return i;
}

size_t moe_tok_utf8_valid_prefix(const uint8_t *s, size_t n) { return utf8_valid_until(s, n, 0, n); }

static inline int is_ascii_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* ---- encoder state ---- */

moe_status moe_tok_encoder_create(moe_tok_encoder **out, const moe_tok *t)
{
    *out = NULL;
    moe_tok_encoder *e = calloc(1, sizeof *e);
    if (!e) return moe_errorf(MOE_ERR_NOMEM, "encoder");
    e->t = t;
    e->sep = -1;
    e->md = pcre2_match_data_create_from_pattern(t->re, NULL);
    e->mctx = pcre2_match_context_create(NULL);
    e->jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
    e->cache = moe_calloc(CACHE_SIZE, sizeof(cache_entry));
    if (!e->md || !e->mctx || !e->jit_stack || !e->cache) {
        moe_tok_encoder_destroy(e);
        return moe_errorf(MOE_ERR_NOMEM, "encoder match data");
    }
    pcre2_jit_stack_assign(e->mctx, NULL, e->jit_stack);
    size_t jit_size = 0;
    e->use_jit = pcre2_pattern_info(t->re, PCRE2_INFO_JITSIZE, &jit_size) == 0 && jit_size > 0;
    *out = e;
    return MOE_OK;
}

void moe_tok_encoder_destroy(moe_tok_encoder *e)
{
    if (!e) return;
    if (e->md) pcre2_match_data_free(e->md);
    if (e->mctx) pcre2_match_context_free(e->mctx);
    if (e->jit_stack) pcre2_jit_stack_free(e->jit_stack);
    moe_free(e->cache);
    free(e->nxt);
    free(e->prv);
    free(e->rk);
    free(e->id);
    free(e->heap);
    free(e->delim);
    free(e->sorted);
    free(e);
}

moe_status moe_tok_encoder_set_delim(moe_tok_encoder *e, const uint8_t *delim, size_t delim_len, int64_t sep)
{
    free(e->delim);
    e->delim = NULL;
    e->delim_len = 0;
    e->sep = -1;
    if (delim_len == 0) return MOE_OK;
    if (sep < 0 || sep >= e->t->vocab || (!moe_tok_is_special(e->t, sep) && (sep >= e->t->n || !moe_tok_tlen(e->t, sep))))
        return moe_errorf(MOE_ERR_ARG, "separator id %lld is not a token of this tokenizer", (long long)sep);
    e->delim = malloc(delim_len);
    if (!e->delim) return moe_errorf(MOE_ERR_NOMEM, "delimiter");
    memcpy(e->delim, delim, delim_len);
    e->delim_len = delim_len;
    e->sep = sep;
    return MOE_OK;
}

size_t moe_tok_encoder_delim(const moe_tok_encoder *e, uint8_t *buf, size_t cap)
{
    if (e->delim_len && e->delim_len <= cap) memcpy(buf, e->delim, e->delim_len);
    return e->delim_len <= cap ? e->delim_len : 0;
}

void moe_tok_ids_free(moe_tok_ids *v)
{
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

static moe_status ids_reserve(moe_tok_ids *v, size_t more)
{
    if (v->n + more <= v->cap) return MOE_OK;
    size_t cap = v->cap ? v->cap : 4096;
    while (cap < v->n + more) cap *= 2;
    uint32_t *p = realloc(v->ids, cap * sizeof(uint32_t));
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "%zu token ids", cap);
    v->ids = p;
    v->cap = cap;
    return MOE_OK;
}

/* ---- BPE of one piece ---- */

/* tiktoken's loop: parts in an array, the lowest pair rank found by a linear
 * scan (leftmost on ties). For pieces of up to SMALL_PIECE bytes. */
static size_t bpe_small(const moe_tok *t, const uint8_t *p, size_t len, uint32_t *out)
{
    uint32_t st[SMALL_PIECE + 1], id[SMALL_PIECE], rk[SMALL_PIECE];
    size_t m = len;
    for (size_t i = 0; i < len; i++) {
        st[i] = (uint32_t)i;
        id[i] = (uint32_t)t->byte_rank[p[i]];
    }
    st[len] = (uint32_t)len;
    for (size_t i = 0; i + 1 < len; i++) rk[i] = (uint32_t)t->pair_rank[p[i] | (p[i + 1] << 8)];
    rk[len - 1] = UINT32_MAX;
    for (;;) {
        uint32_t best = UINT32_MAX;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rk[i] < best) {
                best = rk[i];
                bi = i;
            }
        if (best == UINT32_MAX) break;
        id[bi] = best;
        memmove(st + bi + 1, st + bi + 2, (m - bi - 1) * sizeof *st);
        memmove(id + bi + 1, id + bi + 2, (m - bi - 2) * sizeof *id);
        memmove(rk + bi + 1, rk + bi + 2, (m - bi - 2) * sizeof *rk);
        m--;
        if (bi + 1 < m) {
            const size_t a = st[bi], b = st[bi + 2];
            rk[bi] = (uint32_t)moe_tok_lookup(t, p + a, b - a, moe_tok_hash_bytes(p + a, b - a));
        } else {
            rk[bi] = UINT32_MAX;
        }
        if (bi > 0) {
            const size_t a = st[bi - 1], b = st[bi + 1];
            rk[bi - 1] = (uint32_t)moe_tok_lookup(t, p + a, b - a, moe_tok_hash_bytes(p + a, b - a));
        }
    }
    memcpy(out, id, m * sizeof *id);
    return m;
}

static moe_status heap_reserve(moe_tok_encoder *e, size_t len)
{
    if (len <= e->heap_cap) return MOE_OK;
    size_t cap = e->heap_cap ? e->heap_cap : 1024;
    while (cap < len) cap *= 2;
    free(e->nxt);
    free(e->prv);
    free(e->rk);
    free(e->id);
    free(e->heap);
    e->nxt = malloc(cap * sizeof(uint32_t));
    e->prv = malloc(cap * sizeof(uint32_t));
    e->rk = malloc(cap * sizeof(uint32_t));
    e->id = malloc(cap * sizeof(uint32_t));
    e->heap = malloc(cap * 3 * sizeof(uint64_t)); /* len pushes + 2 per merge */
    if (!e->nxt || !e->prv || !e->rk || !e->id || !e->heap) {
        e->heap_cap = 0;
        return moe_errorf(MOE_ERR_NOMEM, "merge scratch for a piece of %zu bytes", len);
    }
    e->heap_cap = cap;
    return MOE_OK;
}

static inline void heap_push(uint64_t *h, size_t *n, uint64_t v)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static inline uint64_t heap_pop(uint64_t *h, size_t *n)
{
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (v <= h[c]) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

/* The same merges for long pieces in O(n log n): parts form a linked list
 * over their start positions; a min-heap holds (rank << 32 | start) for the
 * pair starting at each part, so the lowest rank, then the leftmost start,
 * merges first, exactly as in tiktoken's loop. Entries made stale by a merge
 * are skipped when popped (their part is gone or its pair rank changed). */
static moe_status bpe_long(moe_tok_encoder *e, const uint8_t *p, size_t len, moe_tok_ids *v)
{
    const moe_tok *t = e->t;
    moe_status st = heap_reserve(e, len + 1);
    if (st) return st;
    uint32_t *nxt = e->nxt, *prv = e->prv, *rk = e->rk, *id = e->id;
    uint64_t *heap = e->heap;
    size_t hn = 0;
    for (size_t i = 0; i < len; i++) {
        nxt[i] = (uint32_t)(i + 1);
        prv[i] = (uint32_t)i - 1; /* UINT32_MAX for the first */
        id[i] = (uint32_t)t->byte_rank[p[i]];
        rk[i] = i + 1 < len ? (uint32_t)t->pair_rank[p[i] | (p[i + 1] << 8)] : UINT32_MAX;
        if (rk[i] != UINT32_MAX) heap_push(heap, &hn, (uint64_t)rk[i] << 32 | i);
    }
    while (hn) {
        const uint64_t top = heap_pop(heap, &hn);
        const uint32_t r = (uint32_t)(top >> 32), s = (uint32_t)top;
        if (rk[s] != r) continue; /* stale (dead parts have rk = UINT32_MAX - 1) */
        const uint32_t q = nxt[s];
        id[s] = r;
        nxt[s] = nxt[q];
        rk[q] = UINT32_MAX - 1;
        if (nxt[q] < len) prv[nxt[q]] = s;
        const uint32_t e1 = nxt[s];
        if (e1 < len) {
            const uint32_t e2 = nxt[e1];
            rk[s] = (uint32_t)moe_tok_lookup(t, p + s, e2 - s, moe_tok_hash_bytes(p + s, e2 - s));
            if (rk[s] != UINT32_MAX) heap_push(heap, &hn, (uint64_t)rk[s] << 32 | s);
        } else {
            rk[s] = UINT32_MAX;
        }
        if (prv[s] != UINT32_MAX) {
            const uint32_t a = prv[s];
            rk[a] = (uint32_t)moe_tok_lookup(t, p + a, e1 - a, moe_tok_hash_bytes(p + a, e1 - a));
            if (rk[a] != UINT32_MAX) heap_push(heap, &hn, (uint64_t)rk[a] << 32 | a);
        }
    }
    st = ids_reserve(v, len);
    if (st) return st;
    for (uint32_t s = 0; s < len; s = nxt[s]) v->ids[v->n++] = id[s];
    return MOE_OK;
}

/* Ids of one piece appended to v (v has room for len more ids). */
static inline moe_status encode_piece(moe_tok_encoder *e, const uint8_t *p, size_t len, moe_tok_ids *v)
{
    const moe_tok *t = e->t;
    if (len == 1) {
        v->ids[v->n++] = (uint32_t)t->byte_rank[p[0]];
        return MOE_OK;
    }
    const uint64_t h = moe_tok_hash_bytes(p, len);
    const int64_t whole = moe_tok_lookup(t, p, len, h);
    if (whole >= 0) {
        v->ids[v->n++] = (uint32_t)whole;
        return MOE_OK;
    }
    if (len > SMALL_PIECE) return bpe_long(e, p, len, v);
    cache_entry *c = NULL;
    if (len <= CACHE_MAX_LEN) {
        c = &e->cache[(h ^ (h >> 29)) & (CACHE_SIZE - 1)];
        if (c->h == h && c->len == len && !memcmp(c->bytes, p, len)) {
            memcpy(v->ids + v->n, c->ids, c->n_ids * sizeof(uint32_t));
            v->n += c->n_ids;
            return MOE_OK;
        }
    }
    const size_t k = bpe_small(t, p, len, v->ids + v->n);
    if (c && k <= CACHE_MAX_IDS) {
        c->h = h;
        c->len = (uint16_t)len;
        c->n_ids = (uint16_t)k;
        memcpy(c->ids, v->ids + v->n, k * sizeof(uint32_t));
        memcpy(c->bytes, p, len);
    }
    v->n += k;
    return MOE_OK;
}

/* ---- the scan ---- */

typedef struct {
    moe_tok_encoder *e;
    const uint8_t *text;
    size_t n;
    /* delimiter search state: the next occurrence at or after `from` is at
     * dpos; dpos == SIZE_MAX: none starts before `searched` */
    size_t from, searched, dpos;
} scan_state;

/* Makes sure the next delimiter occurrence starting before `lim` is known. */
static void find_delim(scan_state *s, size_t lim)
{
    const moe_tok_encoder *e = s->e;
    if (!e->delim_len || s->dpos != SIZE_MAX || s->searched >= lim) return;
    if (lim > s->n) lim = s->n;
    size_t a = s->searched, b = lim + e->delim_len - 1;
    if (b > s->n) b = s->n;
    if (b > a && b - a >= e->delim_len) {
        const uint8_t *f = memmem(s->text + a, b - a, e->delim, e->delim_len);
        if (f) {
            s->dpos = (size_t)(f - s->text);
            return;
        }
    }
    s->searched = lim;
}

static void delim_consumed(scan_state *s, size_t pos)
{
    s->from = s->searched = pos;
    s->dpos = SIZE_MAX;
}

/* Where the subject of a scan starting at `start` begins: `start` itself
 * unless the pattern looks behind; then up to max_lookbehind characters
 * back, stopping at an invalid byte, the text start or a delimiter. */
static size_t subject_start(const moe_tok_encoder *e, const uint8_t *text, size_t start)
{
    const uint32_t lb = e->t->max_lookbehind;
    if (!lb || start == 0) return start;
    size_t a = start > 4 * (size_t)lb + 4 ? start - 4 * (size_t)lb - 4 : 0;
    /* step forward to a character boundary from which everything up to start is valid */
    for (;;) {
        size_t v = utf8_valid_until(text, start, a, start);
        if (v >= start) break;
        a = v + 1;
    }
    size_t chars = 0;
    for (size_t i = a; i < start; i += (size_t)utf8_seq(text + i, start - i)) chars++;
    while (chars > lb) {
        a += (size_t)utf8_seq(text + a, start - a);
        chars--;
    }
    if (e->delim_len) { /* not into the previous document */
        for (size_t i = a; i < start; i++)
            if (i + e->delim_len <= start && !memcmp(text + i, e->delim, e->delim_len)) a = i + e->delim_len;
    }
    return a;
}

static int do_match(moe_tok_encoder *e, const uint8_t *subj, size_t len, size_t off, uint32_t opts)
{
    if (e->use_jit) return pcre2_jit_match(e->t->re, subj, len, off, opts, e->md, e->mctx);
    return pcre2_match(e->t->re, subj, len, off, opts | PCRE2_NO_UTF_CHECK, e->md, e->mctx);
}

static moe_status match_error(int rc, size_t at)
{
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return moe_errorf(MOE_ERR_ARG, "pattern match failed at byte %zu: %s", at, (char *)msg);
}

/* Calls fn for every piece from `start` (a piece boundary) to the first
 * piece boundary >= stop, which it stores in *end. See moe_tok_encode_part. */
static inline moe_status scan(moe_tok_encoder *e, size_t *end, const uint8_t *text, size_t n, size_t start,
                              size_t stop, moe_tok_piece_fn fn, void *ctx)
{
    scan_state s = {e, text, n, start, start, SIZE_MAX};
    size_t pos = start, seg = subject_start(e, text, start);
    size_t win = stop + SCAN_WINDOW;
    if (win < stop || win > n) win = n;
    const uint32_t notempty = PCRE2_NOTEMPTY;
    moe_status st = MOE_OK;
    while (pos < stop && !st) {
        if (e->delim_len) {
            find_delim(&s, pos + 1);
            if (s.dpos == pos) {
                st = fn(ctx, text + pos, e->delim_len, 1);
                pos += e->delim_len;
                seg = pos;
                delim_consumed(&s, pos);
                continue;
            }
        }
        if (!utf8_seq(text + pos, n - pos)) { /* a maximal run of invalid bytes */
            size_t r = pos + 1;
            while (r < n && !utf8_seq(text + r, n - r)) r++;
            find_delim(&s, r);
            if (s.dpos < r) r = s.dpos;
            st = fn(ctx, text + pos, r - pos, 0);
            pos = seg = r;
            continue;
        }
        /* a valid segment [pos, v): ends at an invalid byte, a delimiter or
         * the text end (real), or at the validation window (provisional) */
        size_t v = utf8_valid_until(text, n, pos, win);
        int real = v < win || v >= n;
        if (v > n) v = n;
        find_delim(&s, v);
        if (s.dpos < v) v = s.dpos, real = 1;
        const uint32_t opts = notempty | (real ? 0 : PCRE2_PARTIAL_HARD);
        int partial = 0;
        while (pos < v && pos < stop && !st) {
            int rc = do_match(e, text + seg, v - seg, pos - seg, opts);
            if (rc >= 0) {
                const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
                const size_t ms = seg + ov[0], me = seg + ov[1];
                if (ms > pos) st = fn(ctx, text + pos, ms - pos, 0); /* text between matches */
                if (!st) st = fn(ctx, text + ms, me - ms, 0);
                pos = me;
            } else if (rc == PCRE2_ERROR_NOMATCH && real) {
                st = fn(ctx, text + pos, v - pos, 0);
                pos = v;
            } else if (rc == PCRE2_ERROR_NOMATCH || rc == PCRE2_ERROR_PARTIAL) {
                partial = 1; /* more text could change the match: widen the window */
                break;
            } else {
                st = match_error(rc, pos);
            }
        }
        if (partial) {
            size_t grow = win - pos > SCAN_WINDOW ? win - pos : SCAN_WINDOW;
            win = win + grow < win || win + grow > n ? n : win + grow;
            continue;
        }
        if (pos == v && real) seg = v;
    }
    *end = pos;
    return st;
}

moe_status moe_tok_scan(moe_tok_encoder *e, size_t *end, const uint8_t *text, size_t n, size_t start, size_t stop,
                        moe_tok_piece_fn fn, void *ctx)
{
    if (start > n || stop > n || start > stop)
        return moe_errorf(MOE_ERR_ARG, "scan range [%zu, %zu) outside the text (%zu bytes)", start, stop, n);
    return scan(e, end, text, n, start, stop, fn, ctx);
}

typedef struct {
    moe_tok_encoder *e;
    moe_tok_ids *v;
} encode_ctx;

static moe_status encode_cb(void *ctx, const uint8_t *p, size_t len, int is_sep)
{
    encode_ctx *c = ctx;
    moe_status st = ids_reserve(c->v, len);
    if (st) return st;
    if (is_sep) {
        c->v->ids[c->v->n++] = (uint32_t)c->e->sep;
        return MOE_OK;
    }
    return encode_piece(c->e, p, len, c->v);
}

moe_status moe_tok_encode_part(moe_tok_encoder *e, moe_tok_ids *v, size_t *end, const uint8_t *text, size_t n,
                               size_t start, size_t stop)
{
    if (start > n || stop > n || start > stop)
        return moe_errorf(MOE_ERR_ARG, "encode range [%zu, %zu) outside the text (%zu bytes)", start, stop, n);
    encode_ctx c = {e, v};
    return scan(e, end, text, n, start, stop, encode_cb, &c);
}

/* Writes into the caller's buffer: no growth happens as ids <= bytes. */
static moe_status encode_fixed_cb(void *ctx, const uint8_t *p, size_t len, int is_sep)
{
    encode_ctx *c = ctx;
    if (is_sep) {
        c->v->ids[c->v->n++] = (uint32_t)c->e->sep;
        return MOE_OK;
    }
    return encode_piece(c->e, p, len, c->v);
}

moe_status moe_tok_encode(moe_tok_encoder *e, uint32_t *ids, size_t *n_ids, const uint8_t *text, size_t n)
{
    moe_tok_ids v = {ids, 0, n};
    encode_ctx c = {e, &v};
    size_t end;
    moe_status st = scan(e, &end, text, n, 0, n, encode_fixed_cb, &c);
    *n_ids = v.n;
    return st;
}

/* ---- split candidates ---- */

static moe_status count_cb(void *ctx, const uint8_t *p, size_t len, int is_sep)
{
    (void)p, (void)len, (void)is_sep;
    ++*(size_t *)ctx;
    return MOE_OK;
}

/* 1 if a delimiter occurrence covers both p - 1 and p. */
static int inside_delim(const moe_tok_encoder *e, const uint8_t *text, size_t n, size_t p)
{
    const size_t d = e->delim_len;
    if (d < 2) return 0;
    size_t a = p >= d - 1 ? p - (d - 1) : 0;
    for (size_t i = a; i < p; i++)
        if (i + d <= n && i + d > p && !memcmp(text + i, e->delim, d)) return 1;
    return 0;
}

/* 1 if the pieces scanned from q land exactly on p. */
static int lands_on(moe_tok_encoder *e, const uint8_t *text, size_t n, size_t q, size_t p)
{
    size_t end, count = 0;
    return scan(e, &end, text, n, q, p, count_cb, &count) == MOE_OK && end == p;
}

size_t moe_tok_split_candidate(moe_tok_encoder *e, const uint8_t *text, size_t n, size_t target)
{
    if (target == 0 || target >= n) return n;
    const size_t horizon = target + ((size_t)1 << 20) < n ? target + ((size_t)1 << 20) : n;
    /* line starts: after '\n', before a non-space byte, verified from the
     * start of the previous line */
    for (size_t i = target > 0 ? target - 1 : 0; i < horizon;) {
        const uint8_t *nl = memchr(text + i, '\n', horizon - i);
        if (!nl) break;
        size_t p = (size_t)(nl - text) + 1;
        i = p;
        if (p < target || p >= n || is_ascii_space(text[p]) || inside_delim(e, text, n, p)) continue;
        size_t q = p - 1;
        while (q > 0 && text[q - 1] != '\n' && p - q < 65536) q--;
        if (q > 0 && p - q < 65536) { /* one more line back */
            q--;
            while (q > 0 && text[q - 1] != '\n' && p - q < 65536) q--;
        }
        if (lands_on(e, text, n, q, p)) return p;
    }
    /* no line start: the first boundary >= target of a scan from 4 KB before */
    size_t q = target > 4096 ? target - 4096 : 0;
    while (q > 0 && q < target && (text[q] & 0xc0) == 0x80) q++;
    size_t end;
    for (size_t guard = 0; guard < 64 && q < n; guard++) {
        size_t count = 0;
        if (scan(e, &end, text, n, q, target, count_cb, &count) != MOE_OK) return n;
        if (end >= n) return n;
        if (!inside_delim(e, text, n, end)) return end;
        q = end;
        target = end + 1;
    }
    return n;
}

/* ---- decoding ---- */

static moe_status bad_id(const moe_tok *t, size_t i, uint32_t id)
{
    if ((int64_t)id >= t->vocab)
        return moe_errorf(MOE_ERR_ARG, "id %u at position %zu is outside the vocabulary (size %lld)", id, i,
                          (long long)t->vocab);
    return moe_errorf(MOE_ERR_ARG, "id %u at position %zu has no token", id, i);
}

moe_status moe_tok_decoded_len(const moe_tok *t, size_t *len, const uint32_t *ids, size_t n)
{
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        if (!moe_tok_token(t, ids[i], &l)) return bad_id(t, i, ids[i]);
        w += l;
    }
    *len = w;
    return MOE_OK;
}

moe_status moe_tok_decode(const moe_tok *t, uint8_t *out, size_t cap, size_t *n_out, const uint32_t *ids, size_t n)
{
    const moe_tok_dec16 *dec = t->dec;
    const uint32_t vocab = (uint32_t)t->vocab;
    size_t w = 0;
    *n_out = 0;
    for (size_t i = 0; i < n; i++) {
        const uint32_t id = ids[i];
        if (id < vocab && dec[id].len && w + 16 <= cap) {
            memcpy(out + w, &dec[id], 16);
            w += dec[id].len;
            continue;
        }
        size_t l;
        const uint8_t *b = moe_tok_token(t, id, &l);
        if (!b) return bad_id(t, i, id);
        if (l > cap - w)
            return moe_errorf(MOE_ERR_OVERFLOW, "decoded text exceeds the %zu-byte buffer at id %zu", cap, i);
        memcpy(out + w, b, l);
        w += l;
    }
    *n_out = w;
    return MOE_OK;
}

moe_status moe_tok_decode_ref(const moe_tok *t, uint8_t *out, size_t cap, size_t *n_out, const uint32_t *ids,
                              size_t n)
{
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        const uint8_t *b = moe_tok_token(t, ids[i], &l);
        if (!b) return bad_id(t, i, ids[i]);
        if (l > cap - w) return moe_errorf(MOE_ERR_OVERFLOW, "decoded text exceeds %zu bytes", cap);
        memcpy(out + w, b, l);
        w += l;
    }
    *n_out = w;
    return MOE_OK;
}

/* ---- reference encoder ---- */

static int cmp_token(const void *a, const void *b, void *ctx)
{
    const moe_tok *t = ctx;
    const int64_t ia = *(const uint32_t *)a, ib = *(const uint32_t *)b;
    const size_t la = (size_t)moe_tok_tlen(t, ia), lb = (size_t)moe_tok_tlen(t, ib);
    int c = memcmp(t->bytes + t->offsets[ia], t->bytes + t->offsets[ib], la < lb ? la : lb);
    return c ? c : (la > lb) - (la < lb);
}

/* Rank by binary search over the sorted tokens (independent of the hash table). */
static int64_t ref_rank(const moe_tok_encoder *e, const uint8_t *s, size_t len)
{
    const moe_tok *t = e->t;
    size_t lo = 0, hi = e->n_sorted;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const int64_t id = e->sorted[mid];
        const size_t l = (size_t)moe_tok_tlen(t, id);
        int c = memcmp(t->bytes + t->offsets[id], s, l < len ? l : len);
        if (!c) c = (l > len) - (l < len);
        if (!c) return id;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

static moe_status ref_piece(moe_tok_encoder *e, const uint8_t *p, size_t len, uint32_t *out, size_t *k)
{
    /* tiktoken's _byte_pair_merge, as written there */
    int64_t whole = ref_rank(e, p, len);
    if (whole >= 0) {
        out[(*k)++] = (uint32_t)whole;
        return MOE_OK;
    }
    size_t *st = malloc((len + 1) * sizeof *st);
    int64_t *rk = malloc((len + 1) * sizeof *rk);
    if (!st || !rk) {
        free(st);
        free(rk);
        return moe_errorf(MOE_ERR_NOMEM, "reference merge");
    }
    size_t m = len + 1; /* parts incl. the end sentinel */
    for (size_t i = 0; i <= len; i++) st[i] = i, rk[i] = INT64_MAX;
    for (size_t i = 0; i + 2 < m; i++) {
        int64_t r = ref_rank(e, p + st[i], st[i + 2] - st[i]);
        rk[i] = r < 0 ? INT64_MAX : r;
    }
    for (;;) {
        int64_t best = INT64_MAX;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rk[i] < best) best = rk[i], bi = i;
        if (best == INT64_MAX) break;
        for (size_t j = bi + 1; j + 1 < m; j++) st[j] = st[j + 1], rk[j] = rk[j + 1];
        m--;
        if (bi + 2 < m) {
            int64_t r = ref_rank(e, p + st[bi], st[bi + 2] - st[bi]);
            rk[bi] = r < 0 ? INT64_MAX : r;
        } else {
            rk[bi] = INT64_MAX;
        }
        if (bi > 0) {
            int64_t r = ref_rank(e, p + st[bi - 1], st[bi + 1] - st[bi - 1]);
            rk[bi - 1] = r < 0 ? INT64_MAX : r;
        }
    }
    for (size_t i = 0; i + 1 < m; i++) out[(*k)++] = (uint32_t)ref_rank(e, p + st[i], st[i + 1] - st[i]);
    free(st);
    free(rk);
    return MOE_OK;
}

/* One subject (a valid segment of one document): successive matches from
 * the interpreter, text between matches as its own piece. */
static moe_status ref_segment(moe_tok_encoder *e, const uint8_t *s, size_t len, uint32_t *out, size_t *k)
{
    moe_status st = MOE_OK;
    size_t pos = 0;
    while (pos < len && !st) {
        int rc = pcre2_match(e->t->re, s, len, pos, PCRE2_NOTEMPTY | PCRE2_NO_JIT, e->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) {
            st = ref_piece(e, s + pos, len - pos, out, k);
            pos = len;
        } else if (rc < 0) {
            st = match_error(rc, pos);
        } else {
            const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
            if (ov[0] > pos) st = ref_piece(e, s + pos, ov[0] - pos, out, k);
            if (!st) st = ref_piece(e, s + ov[0], ov[1] - ov[0], out, k);
            pos = ov[1];
        }
    }
    return st;
}

static moe_status ref_document(moe_tok_encoder *e, const uint8_t *s, size_t len, uint32_t *out, size_t *k)
{
    moe_status st = MOE_OK;
    size_t i = 0;
    while (i < len && !st) {
        size_t v = i;
        while (v < len && utf8_seq(s + v, len - v)) v += (size_t)utf8_seq(s + v, len - v);
        if (v > i) {
            st = ref_segment(e, s + i, v - i, out, k);
            i = v;
            continue;
        }
        while (v < len && !utf8_seq(s + v, len - v)) v++;
        st = ref_piece(e, s + i, v - i, out, k);
        i = v;
    }
    return st;
}

moe_status moe_tok_encode_ref(moe_tok_encoder *e, uint32_t *ids, size_t *n_ids, const uint8_t *text, size_t n)
{
    const moe_tok *t = e->t;
    *n_ids = 0;
    if (!e->sorted) {
        e->sorted = malloc(sizeof(uint32_t) * (size_t)t->n);
        if (!e->sorted) return moe_errorf(MOE_ERR_NOMEM, "reference index");
        size_t m = 0;
        for (int64_t i = 0; i < t->n; i++)
            if (moe_tok_tlen(t, i)) e->sorted[m++] = (uint32_t)i;
        qsort_r(e->sorted, m, sizeof(uint32_t), cmp_token, (void *)t);
        e->n_sorted = m;
    }
    size_t k = 0, i = 0;
    moe_status st = MOE_OK;
    while (i <= n && !st) {
        const uint8_t *d = e->delim_len ? memmem(text + i, n - i, e->delim, e->delim_len) : NULL;
        const size_t j = d ? (size_t)(d - text) : n;
        st = ref_document(e, text + i, j - i, ids, &k);
        if (!d) break;
        ids[k++] = (uint32_t)e->sep;
        i = j + e->delim_len;
    }
    *n_ids = k;
    return st;
}
