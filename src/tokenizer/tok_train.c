/* BPE training: piece counting (threads over verified parts; counts from
 * several processes merge by summation) and the merge loop (pair counts
 * updated incrementally, a lazy max-heap ordered by count then by the
 * pair's bytes, so the result is a function of the counts alone), with a
 * plain reference that recounts everything after each merge. */
#define _GNU_SOURCE /* qsort_r */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/tok_parts.h"

/* ---- piece counts: open addressing over byte strings ---- */

typedef struct {
    uint64_t h;
    uint64_t off; /* into bytes */
    uint32_t len;
    int64_t count; /* 0: empty slot */
} count_slot;

struct moe_tok_counts {
    count_slot *slots;
    uint64_t mask, used;
    uint8_t *bytes;
    size_t nb, capb;
};

moe_status moe_tok_counts_create(moe_tok_counts **out)
{
    moe_tok_counts *c = calloc(1, sizeof *c);
    if (c) c->slots = calloc(1024, sizeof(count_slot));
    if (!c || !c->slots) {
        free(c);
        return moe_errorf(MOE_ERR_NOMEM, "piece counts");
    }
    c->mask = 1023;
    *out = c;
    return MOE_OK;
}

void moe_tok_counts_destroy(moe_tok_counts *c)
{
    if (!c) return;
    free(c->slots);
    free(c->bytes);
    free(c);
}

int64_t moe_tok_counts_n_pieces(const moe_tok_counts *c) { return (int64_t)c->used; }

static moe_status counts_grow(moe_tok_counts *c)
{
    uint64_t cap = (c->mask + 1) * 2;
    count_slot *s = calloc(cap, sizeof *s);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "piece counts (%llu slots)", (unsigned long long)cap);
    for (uint64_t i = 0; i <= c->mask; i++) {
        if (!c->slots[i].count) continue;
        uint64_t j = c->slots[i].h & (cap - 1);
        while (s[j].count) j = (j + 1) & (cap - 1);
        s[j] = c->slots[i];
    }
    free(c->slots);
    c->slots = s;
    c->mask = cap - 1;
    return MOE_OK;
}

static moe_status counts_add(moe_tok_counts *c, const uint8_t *p, size_t len, int64_t k)
{
    const uint64_t h = moe_tok_hash_bytes(p, len);
    uint64_t i = h & c->mask;
    for (;; i = (i + 1) & c->mask) {
        count_slot *s = &c->slots[i];
        if (!s->count) break;
        if (s->h == h && s->len == len && !memcmp(c->bytes + s->off, p, len)) {
            s->count += k;
            return MOE_OK;
        }
    }
    if (c->nb + len > c->capb) {
        size_t cap = c->capb ? c->capb * 2 : 1 << 16;
        while (cap < c->nb + len) cap *= 2;
        uint8_t *b = realloc(c->bytes, cap);
        if (!b) return moe_errorf(MOE_ERR_NOMEM, "piece bytes");
        c->bytes = b;
        c->capb = cap;
    }
    memcpy(c->bytes + c->nb, p, len);
    c->slots[i] = (count_slot){h, c->nb, (uint32_t)len, k};
    c->nb += len;
    if (++c->used * 2 > c->mask + 1) return counts_grow(c);
    return MOE_OK;
}

static void counts_clear(moe_tok_counts *c)
{
    memset(c->slots, 0, (c->mask + 1) * sizeof *c->slots);
    c->used = 0;
    c->nb = 0;
}

static moe_status count_piece(void *ctx, const uint8_t *p, size_t len, int is_sep)
{
    if (is_sep) return MOE_OK;
    if (len > UINT32_MAX) return moe_errorf(MOE_ERR_OVERFLOW, "a piece of %zu bytes", len);
    return counts_add(ctx, p, len, 1);
}

typedef struct {
    const uint8_t *text;
    size_t n;
    moe_tok_counts **part; /* per local part of this process */
    int n_procs;
} count_ctx;

static moe_status count_run(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end)
{
    count_ctx *c = ctx;
    moe_tok_counts *pc = c->part[moe_tok_part_local(part, c->n_procs)];
    *end = start;
    if (!pc) return moe_errorf(MOE_ERR_NOMEM, "piece counts");
    return moe_tok_scan(e, end, c->text, c->n, start, stop, count_piece, pc);
}

static void count_reset(void *ctx, int part)
{
    count_ctx *c = ctx;
    moe_tok_counts *pc = c->part[moe_tok_part_local(part, c->n_procs)];
    if (pc) counts_clear(pc);
}

moe_status moe_tok_counts_merge(moe_tok_counts *c, const uint8_t *data, size_t n)
{
    /* records: uint32 len, int64 count, bytes */
    size_t i = 0;
    moe_status st = MOE_OK;
    while (i < n && !st) {
        uint32_t len;
        int64_t k;
        if (n - i < 12) return moe_errorf(MOE_ERR_FORMAT, "piece counts: truncated record at byte %zu", i);
        memcpy(&len, data + i, 4);
        memcpy(&k, data + i + 4, 8);
        i += 12;
        if (len > n - i || k <= 0) return moe_errorf(MOE_ERR_FORMAT, "piece counts: bad record at byte %zu", i);
        st = counts_add(c, data + i, len, k);
        i += len;
    }
    return st;
}

moe_status moe_tok_counts_serialize(const moe_tok_counts *c, uint8_t **data, size_t *n)
{
    size_t total = c->nb + 12 * (size_t)c->used;
    uint8_t *p = malloc(total ? total : 1);
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "piece counts (%zu bytes)", total);
    size_t w = 0;
    for (uint64_t i = 0; i <= c->mask; i++) {
        const count_slot *s = &c->slots[i];
        if (!s->count) continue;
        memcpy(p + w, &s->len, 4);
        memcpy(p + w + 4, &s->count, 8);
        memcpy(p + w + 12, c->bytes + s->off, s->len);
        w += 12 + s->len;
    }
    *data = p;
    *n = w;
    return MOE_OK;
}

moe_status moe_tok_counts_add_text(moe_tok_counts *c, const moe_tok *t, const uint8_t *text, size_t n, int n_parts,
                                   int proc, int n_procs, int threads, moe_tok_exchange_fn exchange, void *xctx,
                                   int *bad)
{
    const int nl = n_procs > 0 && n_parts % n_procs == 0 ? n_parts / n_procs : 0;
    moe_tok_counts **part = calloc((size_t)(nl ? nl : 1), sizeof *part);
    size_t *splits = malloc(sizeof(size_t) * (size_t)(n_parts + 1));
    if (!part || !splits) { /* tiny allocations: the process cannot go on */
        free(part);
        free(splits);
        return moe_errorf(MOE_ERR_NOMEM, "parts");
    }
    /* a part whose counts cannot be allocated fails in count_run, so that
     * every process still reaches the exchanges */
    for (int i = 0; i < nl; i++)
        if (moe_tok_counts_create(&part[i])) part[i] = NULL;
    count_ctx cc = {text, n, part, n_procs};
    const moe_tok_parts_ops ops = {count_run, count_reset, &cc, exchange, xctx};
    moe_status st =
        moe_tok_parts_run(t, NULL, 0, -1, text, n, n_parts, proc, n_procs, threads, &ops, splits, bad, NULL);
    for (int i = 0; i < nl && !st; i++)
        for (uint64_t j = 0; part[i] && j <= part[i]->mask && !st; j++) { /* sums: the order does not matter */
            const count_slot *s = &part[i]->slots[j];
            if (s->count) st = counts_add(c, part[i]->bytes + s->off, s->len, s->count);
        }
    for (int i = 0; i < nl; i++) moe_tok_counts_destroy(part[i]);
    free(part);
    free(splits);
    return st;
}

/* ---- the merge loop ---- */

typedef struct {
    int64_t count;
    uint32_t a, b;
} heap_entry;

typedef struct {
    uint64_t key;  /* a << 32 | b; 0 with count 0 marks a free slot (pair (0,0) uses key bit 63) */
    int64_t count;
    uint32_t list; /* index of the pair's word list */
    uint32_t used;
} pair_slot;

typedef struct {
    /* tokens: bytes of each id */
    uint8_t *tb;
    size_t ntb, captb;
    int64_t *toff; /* (n_tok + 1) */
    int64_t n_tok, cap_tok;
    uint64_t *tslots; /* bytes -> id, to spot a merge that makes an existing token */
    uint64_t tmask;
    /* words */
    int64_t n_words;
    int64_t *wcount;
    int64_t *wstart; /* into sym */
    int32_t *wlen;
    uint32_t *sym;
    /* pairs */
    pair_slot *ps;
    uint64_t pmask, pused;
    /* word lists per pair */
    uint32_t **lists;
    uint32_t *llen, *lcap;
    uint32_t n_lists, cap_lists;
    /* heap */
    heap_entry *heap;
    size_t hn, hcap;
    uint32_t *stamp; /* per word: last merge step that visited it */
} trainer;

static const uint8_t *tok_bytes(const trainer *T, uint32_t id, size_t *len)
{
    *len = (size_t)(T->toff[id + 1] - T->toff[id]);
    return T->tb + T->toff[id];
}

/* Heap order: higher count first; then smaller left bytes, then smaller right bytes. */
static int entry_before(const trainer *T, const heap_entry *x, const heap_entry *y)
{
    if (x->count != y->count) return x->count > y->count;
    size_t la, lb;
    for (int side = 0; side < 2; side++) {
        const uint8_t *pa = tok_bytes(T, side ? x->b : x->a, &la), *pb = tok_bytes(T, side ? y->b : y->a, &lb);
        int c = memcmp(pa, pb, la < lb ? la : lb);
        if (!c) c = (la > lb) - (la < lb);
        if (c) return c < 0;
    }
    return 0;
}

static moe_status heap_push(trainer *T, heap_entry e)
{
    if (T->hn == T->hcap) {
        size_t cap = T->hcap ? T->hcap * 2 : 1024;
        heap_entry *h = realloc(T->heap, cap * sizeof *h);
        if (!h) return moe_errorf(MOE_ERR_NOMEM, "pair heap");
        T->heap = h;
        T->hcap = cap;
    }
    size_t i = T->hn++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!entry_before(T, &e, &T->heap[p])) break;
        T->heap[i] = T->heap[p];
        i = p;
    }
    T->heap[i] = e;
    return MOE_OK;
}

static heap_entry heap_pop(trainer *T)
{
    heap_entry top = T->heap[0], e = T->heap[--T->hn];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= T->hn) break;
        if (c + 1 < T->hn && entry_before(T, &T->heap[c + 1], &T->heap[c])) c++;
        if (!entry_before(T, &T->heap[c], &e)) break;
        T->heap[i] = T->heap[c];
        i = c;
    }
    T->heap[i] = e;
    return top;
}

static uint64_t pair_hash(uint64_t key) { return moe_tok_mix(key ^ 0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull); }

/* The slot of pair (a, b), created when absent (create = 1). NULL: no memory / absent. */
static pair_slot *pair_get(trainer *T, uint32_t a, uint32_t b, int create)
{
    const uint64_t key = (uint64_t)a << 32 | b | (1ull << 63);
    for (uint64_t i = pair_hash(key) & T->pmask;; i = (i + 1) & T->pmask) {
        pair_slot *s = &T->ps[i];
        if (s->key == key) return s;
        if (!s->used) {
            if (!create) return NULL;
            if ((T->pused + 1) * 2 > T->pmask + 1) { /* grow and retry */
                uint64_t cap = (T->pmask + 1) * 2;
                pair_slot *ns = calloc(cap, sizeof *ns);
                if (!ns) return NULL;
                for (uint64_t j = 0; j <= T->pmask; j++) {
                    if (!T->ps[j].used) continue;
                    uint64_t k = pair_hash(T->ps[j].key) & (cap - 1);
                    while (ns[k].used) k = (k + 1) & (cap - 1);
                    ns[k] = T->ps[j];
                }
                free(T->ps);
                T->ps = ns;
                T->pmask = cap - 1;
                return pair_get(T, a, b, 1);
            }
            if (T->n_lists == T->cap_lists) {
                uint32_t cap = T->cap_lists ? T->cap_lists * 2 : 1024;
                uint32_t **l = realloc(T->lists, cap * sizeof *l);
                if (l) T->lists = l;
                uint32_t *ln = realloc(T->llen, cap * sizeof *ln);
                if (ln) T->llen = ln;
                uint32_t *lc = realloc(T->lcap, cap * sizeof *lc);
                if (lc) T->lcap = lc;
                if (!l || !ln || !lc) return NULL;
                T->cap_lists = cap;
            }
            T->lists[T->n_lists] = NULL;
            T->llen[T->n_lists] = T->lcap[T->n_lists] = 0;
            *s = (pair_slot){key, 0, T->n_lists++, 1};
            T->pused++;
            return s;
        }
    }
}

static int list_add(trainer *T, uint32_t list, uint32_t w)
{
    if (T->llen[list] && T->lists[list][T->llen[list] - 1] == w) return 0;
    if (T->llen[list] == T->lcap[list]) {
        uint32_t cap = T->lcap[list] ? T->lcap[list] * 2 : 4;
        uint32_t *p = realloc(T->lists[list], cap * sizeof *p);
        if (!p) return -1;
        T->lists[list] = p;
        T->lcap[list] = cap;
    }
    T->lists[list][T->llen[list]++] = w;
    return 0;
}

/* Adds k to the count of (a, b), noting word w; pushes a heap entry when the count grows. */
static moe_status pair_add(trainer *T, uint32_t a, uint32_t b, int64_t k, uint32_t w)
{
    pair_slot *s = pair_get(T, a, b, 1);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "pair table");
    s->count += k;
    if (k > 0) {
        if (list_add(T, s->list, w)) return moe_errorf(MOE_ERR_NOMEM, "pair word lists");
        return heap_push(T, (heap_entry){s->count, a, b});
    }
    return MOE_OK;
}

static int64_t tok_find(const trainer *T, const uint8_t *p, size_t len)
{
    const uint64_t h = moe_tok_hash_bytes(p, len);
    for (uint64_t i = h & T->tmask;; i = (i + 1) & T->tmask) {
        const uint64_t s = T->tslots[i];
        if (!s) return -1;
        const int64_t id = (int64_t)(s - 1);
        if (T->toff[id + 1] - T->toff[id] == (int64_t)len && !memcmp(T->tb + T->toff[id], p, len)) return id;
    }
}

/* Appends the token a + b (b may be NULL with lb = 0); neither may point into T->tb. */
static moe_status tok_add(trainer *T, const uint8_t *a, size_t la, const uint8_t *b, size_t lb)
{
    if (T->ntb + la + lb > T->captb) {
        size_t cap = T->captb * 2 + la + lb;
        uint8_t *p = realloc(T->tb, cap);
        if (!p) return moe_errorf(MOE_ERR_NOMEM, "token bytes");
        T->tb = p;
        T->captb = cap;
    }
    memcpy(T->tb + T->ntb, a, la);
    if (lb) memcpy(T->tb + T->ntb + la, b, lb);
    T->ntb += la + lb;
    const int64_t id = T->n_tok++;
    T->toff[id + 1] = (int64_t)T->ntb;
    const uint64_t h = moe_tok_hash_bytes(T->tb + T->toff[id], la + lb);
    uint64_t i = h & T->tmask;
    while (T->tslots[i]) i = (i + 1) & T->tmask;
    T->tslots[i] = (uint64_t)id + 1;
    return MOE_OK;
}

static void trainer_free(trainer *T)
{
    free(T->tb);
    free(T->toff);
    free(T->tslots);
    free(T->wcount);
    free(T->wstart);
    free(T->wlen);
    free(T->sym);
    free(T->ps);
    for (uint32_t i = 0; i < T->n_lists; i++) free(T->lists[i]);
    free(T->lists);
    free(T->llen);
    free(T->lcap);
    free(T->heap);
    free(T->stamp);
}

static int cmp_piece(const void *x, const void *y, void *ctx)
{
    const moe_tok_counts *c = ctx;
    const count_slot *a = &c->slots[*(const uint64_t *)x], *b = &c->slots[*(const uint64_t *)y];
    int r = memcmp(c->bytes + a->off, c->bytes + b->off, a->len < b->len ? a->len : b->len);
    return r ? r : (a->len > b->len) - (a->len < b->len);
}

/* Words in byte order (so nothing depends on hash-table order), as symbol
 * arrays of single-byte ids, and the 256 byte tokens. */
static moe_status trainer_init(trainer *T, const moe_tok_counts *c, int64_t max_tok)
{
    memset(T, 0, sizeof *T);
    uint64_t *order = malloc(sizeof(uint64_t) * (c->used ? c->used : 1));
    T->n_words = (int64_t)c->used;
    T->wcount = malloc(sizeof(int64_t) * (size_t)(T->n_words + 1));
    T->wstart = malloc(sizeof(int64_t) * (size_t)(T->n_words + 1));
    T->wlen = malloc(sizeof(int32_t) * (size_t)(T->n_words + 1));
    T->sym = malloc(sizeof(uint32_t) * (c->nb + 1));
    T->stamp = calloc((size_t)(T->n_words + 1), sizeof(uint32_t));
    T->captb = 4096;
    T->tb = malloc(T->captb);
    T->cap_tok = max_tok;
    T->toff = malloc(sizeof(int64_t) * (size_t)(max_tok + 2));
    uint64_t tcap = 1024;
    while (tcap < (uint64_t)max_tok * 2) tcap <<= 1;
    T->tmask = tcap - 1;
    T->tslots = calloc(tcap, sizeof(uint64_t));
    T->pmask = 1023;
    T->ps = calloc(T->pmask + 1, sizeof(pair_slot));
    if (!order || !T->wcount || !T->wstart || !T->wlen || !T->sym || !T->stamp || !T->tb || !T->toff || !T->tslots ||
        !T->ps) {
        free(order);
        return moe_errorf(MOE_ERR_NOMEM, "training state for %lld pieces", (long long)T->n_words);
    }
    size_t k = 0;
    for (uint64_t i = 0; i <= c->mask; i++)
        if (c->slots[i].count) order[k++] = i;
    qsort_r(order, k, sizeof *order, cmp_piece, (void *)c);
    int64_t w = 0;
    for (size_t i = 0; i < k; i++) {
        const count_slot *s = &c->slots[order[i]];
        T->wcount[i] = s->count;
        T->wstart[i] = w;
        T->wlen[i] = (int32_t)s->len;
        for (uint32_t j = 0; j < s->len; j++) T->sym[w + j] = c->bytes[s->off + j];
        w += s->len;
    }
    free(order);
    T->toff[0] = 0;
    moe_status st = MOE_OK;
    for (int b = 0; b < 256 && !st; b++) {
        const uint8_t byte = (uint8_t)b;
        st = tok_add(T, &byte, 1, NULL, 0);
    }
    return st;
}

/* Merges (a, b) -> id in word w (left to right, not overlapping) and
 * updates the pair counts around each merge. */
static moe_status merge_word(trainer *T, uint32_t w, uint32_t a, uint32_t b, uint32_t id)
{
    uint32_t *s = T->sym + T->wstart[w];
    const int64_t k = T->wcount[w];
    int32_t n = T->wlen[w], o = 0;
    moe_status st = MOE_OK;
    for (int32_t i = 0; i < n && !st;) {
        if (i + 1 < n && s[i] == a && s[i + 1] == b) {
            /* neighbours: the last written symbol (o - 1) and s[i + 2] */
            if (o > 0) {
                st = pair_add(T, s[o - 1], a, -k, w);
                if (!st) st = pair_add(T, s[o - 1], id, k, w);
            }
            if (!st && i + 2 < n) {
                st = pair_add(T, b, s[i + 2], -k, w);
                if (!st) st = pair_add(T, id, s[i + 2], k, w);
            }
            if (!st) st = pair_add(T, a, b, -k, w);
            s[o++] = id;
            i += 2;
        } else {
            s[o++] = s[i++];
        }
    }
    T->wlen[w] = o;
    return st;
}

/* The tokenizer from the trained tokens and the specials after them. */
static moe_status trainer_result(moe_tok **out, const trainer *T, const char *pattern, int ns, const char *const *names)
{
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(ns ? ns : 1));
    if (!ids) return moe_errorf(MOE_ERR_NOMEM, "specials");
    for (int i = 0; i < ns; i++) ids[i] = T->n_tok + i;
    moe_status st = moe_tok_create(out, T->tb, T->toff, T->n_tok, pattern, ns, names, ids);
    free(ids);
    return st;
}

static moe_status check_train_args(int64_t vocab_size, int ns)
{
    if (ns < 0 || vocab_size - ns < 256 || vocab_size > MOE_TOK_MAX_VOCAB)
        return moe_errorf(MOE_ERR_ARG, "vocab_size %lld with %d specials: need 256 + specials <= vocab_size <= %d",
                          (long long)vocab_size, ns, MOE_TOK_MAX_VOCAB);
    return MOE_OK;
}

moe_status moe_tok_train_from_counts(moe_tok **out, const moe_tok_counts *c, int64_t vocab_size, const char *pattern,
                                     int ns, const char *const *names)
{
    *out = NULL;
    moe_status st = check_train_args(vocab_size, ns);
    if (st) return st;
    const int64_t target = vocab_size - ns;
    trainer T;
    st = trainer_init(&T, c, target);
    for (int64_t w = 0; w < T.n_words && !st; w++) {
        const uint32_t *s = T.sym + T.wstart[w];
        for (int32_t i = 0; i + 1 < T.wlen[w] && !st; i++) st = pair_add(&T, s[i], s[i + 1], T.wcount[w], (uint32_t)w);
    }
    uint32_t step = 0;
    while (!st && T.n_tok < target && T.hn) {
        const heap_entry e = heap_pop(&T);
        pair_slot *ps = pair_get(&T, e.a, e.b, 0);
        if (!ps || ps->count <= 0) continue;
        if (ps->count != e.count) { /* stale: the count went down since */
            st = heap_push(&T, (heap_entry){ps->count, e.a, e.b});
            continue;
        }
        size_t la, lb;
        const uint8_t *ba = tok_bytes(&T, e.a, &la), *bb = tok_bytes(&T, e.b, &lb);
        uint8_t tmp[2 * MOE_TOK_MAX_TOKEN_LEN];
        if (la + lb > MOE_TOK_MAX_TOKEN_LEN) {
            ps->count = 0; /* too long to be a token: never merge it */
            continue;
        }
        memcpy(tmp, ba, la);
        memcpy(tmp + la, bb, lb);
        int64_t id = tok_find(&T, tmp, la + lb);
        if (id < 0) { /* from tmp: tok_add may move the token bytes */
            id = T.n_tok;
            st = tok_add(&T, tmp, la + lb, NULL, 0);
        }
        step++;
        /* the list may grow while we merge (new pairs), but not this pair's */
        const uint32_t list = ps->list, nl = T.llen[list];
        for (uint32_t i = 0; i < nl && !st; i++) {
            const uint32_t w = T.lists[list][i];
            if (T.stamp[w] == step) continue;
            T.stamp[w] = step;
            st = merge_word(&T, w, e.a, e.b, (uint32_t)id);
        }
        T.llen[list] = 0;
    }
    if (!st) st = trainer_result(out, &T, pattern, ns, names);
    trainer_free(&T);
    return st;
}

/* ---- reference: recount every pair after each merge ---- */

moe_status moe_tok_train_from_counts_ref(moe_tok **out, const moe_tok_counts *c, int64_t vocab_size,
                                         const char *pattern, int ns, const char *const *names)
{
    *out = NULL;
    moe_status st = check_train_args(vocab_size, ns);
    if (st) return st;
    const int64_t target = vocab_size - ns;
    trainer T;
    st = trainer_init(&T, c, target);
    while (!st && T.n_tok < target) {
        /* count all pairs from scratch in a fresh table */
        free(T.ps);
        for (uint32_t i = 0; i < T.n_lists; i++) free(T.lists[i]);
        T.n_lists = 0;
        T.pmask = 1023;
        T.pused = 0;
        T.ps = calloc(T.pmask + 1, sizeof(pair_slot));
        if (!T.ps) {
            st = moe_errorf(MOE_ERR_NOMEM, "pairs");
            break;
        }
        for (int64_t w = 0; w < T.n_words && !st; w++) {
            const uint32_t *s = T.sym + T.wstart[w];
            for (int32_t i = 0; i + 1 < T.wlen[w] && !st; i++) {
                pair_slot *p = pair_get(&T, s[i], s[i + 1], 1);
                if (!p) st = moe_errorf(MOE_ERR_NOMEM, "pairs");
                else p->count += T.wcount[w];
            }
        }
        /* the best pair by a linear scan */
        heap_entry best = {0, 0, 0};
        for (uint64_t i = 0; i <= T.pmask && !st; i++) {
            const pair_slot *p = &T.ps[i];
            if (!p->used || p->count <= 0) continue;
            heap_entry e = {p->count, (uint32_t)(p->key >> 32 & 0x7fffffff), (uint32_t)p->key};
            size_t la, lb;
            tok_bytes(&T, e.a, &la);
            tok_bytes(&T, e.b, &lb);
            if (la + lb > MOE_TOK_MAX_TOKEN_LEN) continue;
            if (best.count == 0 || entry_before(&T, &e, &best)) best = e;
        }
        if (st || best.count == 0) break;
        size_t la, lb;
        const uint8_t *ba = tok_bytes(&T, best.a, &la), *bb = tok_bytes(&T, best.b, &lb);
        uint8_t tmp[2 * MOE_TOK_MAX_TOKEN_LEN];
        memcpy(tmp, ba, la);
        memcpy(tmp + la, bb, lb);
        int64_t id = tok_find(&T, tmp, la + lb);
        if (id < 0) {
            id = T.n_tok;
            st = tok_add(&T, tmp, la + lb, NULL, 0);
        }
        for (int64_t w = 0; w < T.n_words && !st; w++) { /* plain left-to-right replacement */
            uint32_t *s = T.sym + T.wstart[w];
            int32_t o = 0;
            for (int32_t i = 0; i < T.wlen[w];) {
                if (i + 1 < T.wlen[w] && s[i] == best.a && s[i + 1] == best.b) s[o++] = (uint32_t)id, i += 2;
                else s[o++] = s[i++];
            }
            T.wlen[w] = o;
        }
    }
    if (!st) st = trainer_result(out, &T, pattern, ns, names);
    trainer_free(&T);
    return st;
}

moe_status moe_tok_train(moe_tok **out, const uint8_t *text, size_t n, int64_t vocab_size, const char *pattern,
                         int ns, const char *const *names, int threads)
{
    *out = NULL;
    moe_status st = check_train_args(vocab_size, ns);
    if (st) return st;
    if (threads < 1) threads = 1;
    /* a tokenizer of the 256 bytes carries the pattern for counting */
    uint8_t bytes[256];
    int64_t off[257];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    off[256] = 256;
    moe_tok *base = NULL;
    moe_tok_counts *c = NULL;
    st = moe_tok_create(&base, bytes, off, 256, pattern, 0, NULL, NULL);
    if (!st) st = moe_tok_counts_create(&c);
    if (!st)
        st = moe_tok_counts_add_text(c, base, text, n, moe_tok_parts_count(n, 1, threads), 0, 1, threads, NULL, NULL,
                                     NULL);
    if (!st) st = moe_tok_train_from_counts(out, c, vocab_size, moe_tok_pattern(base), ns, names);
    moe_tok_counts_destroy(c);
    moe_tok_destroy(base);
    return st;
}
