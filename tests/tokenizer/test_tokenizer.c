/* Tokenizer unit tests: the fast encoder and decoder against their plain
 * references (random text, long runs that take the heap merge, invalid
 * UTF-8, delimiters), parts split over threads against one encode for the
 * published patterns and a pattern that defeats the split candidates,
 * training against its reference and a hand-worked example, the three
 * file forms round-tripping, token files, the hash, and every malformed
 * input naming its problem. (Exactness to tiktoken: tiktoken_compare.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tokenizer/tok_comm.h"
#include "tokenizer/tok_parts.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokfile.h"

#define assert_ok(x)                                                                                                  \
    do {                                                                                                              \
        moe_status st_ = (x);                                                                                         \
        if (st_ != MOE_OK) fail_msg("%s: %s: %s", #x, moe_status_str(st_), moe_error_detail());                     \
    } while (0)
#define assert_detail_has(s)                                                                                          \
    do {                                                                                                              \
        if (!strstr(moe_error_detail(), (s))) fail_msg("detail \"%s\" lacks \"%s\"", moe_error_detail(), (s));        \
    } while (0)

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Text with words, numbers, punctuation, whitespace runs, UTF-8 of every
 * width, contractions, long runs and (when invalid) bytes that are not UTF-8. */
static size_t gen_text(uint8_t *out, size_t n, int invalid)
{
    static const char *atoms[] = {"the", "The", " cat", " sat", " on", " mat", "'s", "'LL", " don't", "123",
                                  "45678", "3.14", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", "!!", "...",
                                  "é", "日本", "語", "Ωμέγα", "🎉", "👍🏽", " Привет", "\u00a0", "\u3000", "x",
                                  "//", "/*", "{", "}", "ab", "ba", "aab", " 7", "—", "ﬁ"};
    size_t w = 0;
    while (w < n) {
        uint64_t r = rnd() % 100;
        const char *a;
        char run[700];
        if (r < 3) { /* a long run: spaces, letters, digits or newlines */
            static const char fill[] = " a1\n!";
            size_t len = 60 + rnd() % 600;
            memset(run, fill[rnd() % 5], len);
            run[len] = '\0';
            a = run;
        } else if (invalid && r < 6) {
            static const char *bad[] = {"\xff", "\xc3", "\xe2\x82", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\xaf",
                                        "\x80\x80"};
            a = bad[rnd() % 7];
        } else {
            a = atoms[rnd() % (sizeof atoms / sizeof atoms[0])];
        }
        size_t len = strlen(a);
        if (w + len > n) break;
        memcpy(out + w, a, len);
        w += len;
    }
    return w;
}

static const char *patterns[] = {"gpt2", "cl100k_base", "o200k_base"};

/* A tokenizer trained on generated text with the given pattern. */
static moe_tok *trained(const char *pattern_name, int64_t vocab, int threads)
{
    static uint8_t text[400000];
    rng_state = 12345;
    size_t n = gen_text(text, sizeof text, 0);
    const char *specials[] = {"<|endoftext|>", "<|sep|>"};
    moe_tok *t = NULL;
    assert_ok(moe_tok_train(&t, text, n, vocab, moe_tok_named_pattern(pattern_name), 2, specials, threads));
    return t;
}

/* A tokenizer with the 256 bytes and random strings in a random rank order:
 * arbitrary ranks stress the merge order (no training structure). */
static moe_tok *random_vocab(void)
{
    enum { N = 3000 };
    uint8_t *bytes = malloc(N * 8);
    int64_t *off = malloc(sizeof(int64_t) * (N + 1));
    int perm[256];
    for (int i = 0; i < 256; i++) perm[i] = i;
    for (int i = 255; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1)), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    size_t w = 0;
    int id = 0;
    for (; id < 256; id++) {
        off[id] = (int64_t)w;
        bytes[w++] = (uint8_t)perm[id];
    }
    static const char alpha[] = "ab 1\n";
    while (id < N) {
        uint8_t s[8];
        size_t len = 2 + rnd() % 6;
        for (size_t k = 0; k < len; k++) s[k] = (uint8_t)alpha[rnd() % 5];
        int dup = 0;
        for (int j = 256; j < id && !dup; j++)
            dup = off[j + 1] - off[j] == (int64_t)len && !memcmp(bytes + off[j], s, len);
        if (dup) continue;
        off[id] = (int64_t)w;
        memcpy(bytes + w, s, len);
        w += len;
        off[++id] = (int64_t)w;
    }
    off[N] = (int64_t)w;
    moe_tok *t = NULL;
    assert_ok(moe_tok_create(&t, bytes, off, N, "(?s)[ab]+|[^ab]+", 0, NULL, NULL));
    free(bytes);
    free(off);
    return t;
}

static void check_encode_vs_ref(moe_tok *t, int invalid, size_t n, int rounds)
{
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    uint8_t *text = malloc(n);
    uint32_t *a = malloc(n * 4), *b = malloc(n * 4);
    uint8_t *back = malloc(n + 16), *back2 = malloc(n + 16);
    for (int r = 0; r < rounds; r++) {
        size_t len = gen_text(text, n, invalid), na, nb, nd, nd2;
        assert_ok(moe_tok_encode(e, a, &na, text, len));
        assert_ok(moe_tok_encode_ref(e, b, &nb, text, len));
        assert_int_equal(na, nb);
        for (size_t i = 0; i < na; i++)
            if (a[i] != b[i]) fail_msg("round %d: id %zu of %zu: fast %u, reference %u", r, i, na, a[i], b[i]);
        assert_ok(moe_tok_decode(t, back, n + 16, &nd, a, na));
        assert_ok(moe_tok_decode_ref(t, back2, n + 16, &nd2, a, na));
        assert_int_equal(nd, len);
        assert_int_equal(nd2, len);
        assert_memory_equal(back, text, len);
        assert_memory_equal(back2, text, len);
    }
    free(text);
    free(a);
    free(b);
    free(back);
    free(back2);
    moe_tok_encoder_destroy(e);
}

static void test_encode_matches_ref(void **state)
{
    (void)state;
    for (size_t p = 0; p < 3; p++) {
        moe_tok *t = trained(patterns[p], 700, 1);
        check_encode_vs_ref(t, 0, 20000, 3);
        check_encode_vs_ref(t, 1, 20000, 3);
        moe_tok_destroy(t);
    }
    moe_tok *t = random_vocab();
    check_encode_vs_ref(t, 1, 30000, 4);
    moe_tok_destroy(t);
}

/* Long runs whose merges go through the heap, including runs that are not
 * one token, against the reference. */
static void test_long_pieces(void **state)
{
    (void)state;
    moe_tok *t = trained("gpt2", 900, 1);
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    const char fill[] = {' ', 'a', '1', '!', '\n'};
    uint8_t *text = malloc(300000);
    uint32_t *a = malloc(300000 * 4), *b = malloc(300000 * 4);
    for (int k = 0; k < 5; k++)
        for (size_t len = 63; len < 70000; len = len * 3 + 1) {
            memset(text, fill[k], len);
            text[len] = 'z';
            size_t na, nb;
            assert_ok(moe_tok_encode(e, a, &na, text, len + 1));
            assert_ok(moe_tok_encode_ref(e, b, &nb, text, len + 1));
            assert_int_equal(na, nb);
            assert_memory_equal(a, b, na * 4);
        }
    free(text);
    free(a);
    free(b);
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
}

/* Encoding in parts that start on boundaries the scan reported gives the
 * ids of one encode. */
static moe_status collect(void *ctx, const uint8_t *p, size_t len, int is_sep)
{
    (void)is_sep;
    size_t **w = ctx;
    (void)p;
    *(*w)++ = len;
    return MOE_OK;
}

static void test_encode_part(void **state)
{
    (void)state;
    moe_tok *t = trained("o200k_base", 600, 1);
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    static uint8_t text[60000];
    rng_state = 99;
    size_t n = gen_text(text, sizeof text, 1), end;
    size_t *lens = malloc(sizeof(size_t) * (n + 1)), *w = lens;
    assert_ok(moe_tok_scan(e, &end, text, n, 0, n, collect, &w));
    assert_int_equal(end, n);
    uint32_t *whole = malloc(n * 4);
    size_t nw;
    assert_ok(moe_tok_encode(e, whole, &nw, text, n));
    for (int trial = 0; trial < 20; trial++) {
        moe_tok_ids v = {0};
        size_t pos = 0, k = 0;
        while (pos < n) {
            size_t stop = pos + 1 + rnd() % 5000;
            if (stop > n) stop = n;
            assert_ok(moe_tok_encode_part(e, &v, &end, text, n, pos, stop));
            assert_true(end >= stop);
            /* end is one of the scan's boundaries */
            while (k < (size_t)(w - lens) && pos < end) pos += lens[k++];
            assert_int_equal(pos, end);
        }
        assert_int_equal(v.n, nw);
        assert_memory_equal(v.ids, whole, nw * 4);
        moe_tok_ids_free(&v);
    }
    free(lens);
    free(whole);
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
}

/* A document delimiter: every occurrence becomes the separator id and the
 * text between is encoded apart; the reference agrees; decode gives the
 * special's text back. */
static void test_delimiter(void **state)
{
    (void)state;
    moe_tok *t = trained("cl100k_base", 500, 1);
    int64_t sep;
    assert_ok(moe_tok_special_find(t, "<|endoftext|>", &sep));
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    assert_ok(moe_tok_encoder_set_delim(e, (const uint8_t *)"<|endoftext|>", 13, sep));
    const char *text = "first doc  \n<|endoftext|>second<|endoftext|><|endoftext|> third 123<|endoftext|>";
    const size_t n = strlen(text);
    uint32_t a[256], b[256], d[256];
    size_t na, nb, nd;
    assert_ok(moe_tok_encode(e, a, &na, (const uint8_t *)text, n));
    assert_ok(moe_tok_encode_ref(e, b, &nb, (const uint8_t *)text, n));
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na * 4);
    int seps = 0;
    for (size_t i = 0; i < na; i++) seps += a[i] == (uint32_t)sep;
    assert_int_equal(seps, 4);
    /* documents encode as they would alone */
    moe_tok_encoder *plain;
    assert_ok(moe_tok_encoder_create(&plain, t));
    assert_ok(moe_tok_encode(plain, d, &nd, (const uint8_t *)"first doc  \n", 12));
    assert_memory_equal(a, d, nd * 4);
    assert_int_equal(a[nd], (uint32_t)sep);
    uint8_t back[256];
    size_t nback;
    assert_ok(moe_tok_decode(t, back, sizeof back, &nback, a, na));
    assert_int_equal(nback, n);
    assert_memory_equal(back, text, n);
    moe_tok_encoder_destroy(plain);
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
}

/* moe_tok_encode_file (no MPI) over 1..6 threads equals one encode, for the
 * published patterns, text with and without newlines, invalid bytes, a
 * delimiter; and for a pattern whose pieces are pairs of characters, where
 * candidate splits are often wrong and get repaired. */
static void check_file_parts(moe_tok *t, const uint8_t *text, size_t n, const char *delim, int want_repairs)
{
    FILE *f = fopen("parts_in.txt", "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, n, f), n);
    fclose(f);
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    int64_t sep = -1;
    if (delim) {
        assert_ok(moe_tok_special_find(t, "<|sep|>", &sep));
        assert_ok(moe_tok_encoder_set_delim(e, (const uint8_t *)delim, strlen(delim), sep));
    }
    uint32_t *whole = malloc((n + 1) * 4);
    size_t nw;
    assert_ok(moe_tok_encode(e, whole, &nw, text, n));
    int repaired = 0;
    for (int threads = 1; threads <= 6; threads++) {
        moe_tok_encode_stats s;
        assert_ok(moe_tok_encode_file(moe_comm_self(), t, "parts_in.txt", "parts_out.tok", threads, (const uint8_t *)delim,
                                      delim ? strlen(delim) : 0, sep, &s));
        repaired += s.bad_splits;
        moe_tok_file *tf;
        assert_ok(moe_tok_file_open(&tf, "parts_out.tok", t));
        assert_int_equal(moe_tok_file_n_tokens(tf), (int64_t)nw);
        for (size_t i = 0; i < nw; i++)
            if (moe_tok_file_get(tf, (int64_t)i) != whole[i])
                fail_msg("%d threads: id %zu of %zu differs (%u vs %u)", threads, i, nw, moe_tok_file_get(tf, (int64_t)i),
                         whole[i]);
        moe_tok_file_close(tf);
    }
    if (want_repairs) assert_true(repaired > 0);
    free(whole);
    moe_tok_encoder_destroy(e);
}

static void test_parts_equal_whole(void **state)
{
    (void)state;
    static uint8_t text[200000];
    for (size_t p = 0; p < 3; p++) {
        moe_tok *t = trained(patterns[p], 400, 1);
        rng_state = 7 + p;
        size_t n = gen_text(text, sizeof text, 1);
        check_file_parts(t, text, n, NULL, 0);
        check_file_parts(t, text, n, "\n\n", 0);
        /* no newline at all: candidates come from the generic fallback */
        for (size_t i = 0; i < n; i++)
            if (text[i] == '\n') text[i] = ' ';
        check_file_parts(t, text, n, NULL, 0);
        moe_tok_destroy(t);
    }
    /* pieces of two characters: a split is right only at an even offset from
     * the text start, and the candidates are verified from a line start */
    uint8_t bytes[256];
    int64_t off[257];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    off[256] = 256;
    const char *sp[] = {"<|endoftext|>", "<|sep|>"};
    const int64_t ids[] = {256, 257};
    moe_tok *t;
    assert_ok(moe_tok_create(&t, bytes, off, 256, "(?s)..", 2, sp, ids));
    size_t n = 0;
    for (int line = 0; n < 100000; line++) {
        size_t len = 1 + rnd() % 50;
        for (size_t k = 0; k < len; k++) text[n++] = (uint8_t)('a' + rnd() % 26);
        text[n++] = '\n';
    }
    check_file_parts(t, text, n, NULL, 1);
    moe_tok_destroy(t);
}

/* The parts driver with more parts than threads (a queue per process). */
typedef struct {
    const uint8_t *text;
    size_t n;
    moe_tok_ids *ids;
} direct_ctx;

static moe_status direct_run(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end)
{
    direct_ctx *d = ctx;
    return moe_tok_encode_part(e, &d->ids[part], end, d->text, d->n, start, stop);
}

static void direct_reset(void *ctx, int part) { ((direct_ctx *)ctx)->ids[part].n = 0; }

static void test_parts_queue(void **state)
{
    (void)state;
    moe_tok *t = trained("cl100k_base", 500, 1);
    static uint8_t text[300000];
    rng_state = 42;
    const size_t n = gen_text(text, sizeof text, 1);
    moe_tok_encoder *e;
    assert_ok(moe_tok_encoder_create(&e, t));
    uint32_t *whole = malloc(n * 4);
    size_t nw;
    assert_ok(moe_tok_encode(e, whole, &nw, text, n));
    for (int parts = 1; parts <= 23; parts += 11)
        for (int threads = 1; threads <= 4; threads++) {
            moe_tok_ids ids[23] = {{0}};
            direct_ctx d = {text, n, ids};
            const moe_tok_parts_ops ops = {direct_run, direct_reset, &d, NULL, NULL};
            size_t splits[24];
            double cpu[23];
            assert_ok(moe_tok_parts_run(t, NULL, 0, -1, text, n, parts, 0, 1, threads, &ops, splits, NULL, cpu));
            size_t k = 0;
            for (int p = 0; p < parts; p++) {
                assert_true(k + ids[p].n <= nw);
                assert_memory_equal(ids[p].ids, whole + k, ids[p].n * 4);
                k += ids[p].n;
                moe_tok_ids_free(&ids[p]);
            }
            assert_int_equal(k, nw);
            for (int i = 0; i < parts; i++) assert_true(cpu[i] >= 0);
        }
    free(whole);
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
}

/* Training: the incremental merge loop equals the reference; threads give
 * the same tokenizer; a hand-worked case for counts, ties and overlaps. */
static void test_train_matches_ref(void **state)
{
    (void)state;
    for (size_t p = 0; p < 3; p++) {
        moe_tok *base, *a, *b;
        uint8_t bytes[256];
        int64_t off[257];
        for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
        off[256] = 256;
        assert_ok(moe_tok_create(&base, bytes, off, 256, moe_tok_named_pattern(patterns[p]), 0, NULL, NULL));
        static uint8_t text[60000];
        rng_state = 3 + p;
        size_t n = gen_text(text, sizeof text, 1);
        moe_tok_counts *c;
        assert_ok(moe_tok_counts_create(&c));
        assert_ok(moe_tok_counts_add_text(c, base, text, n, 7, 0, 1, 2, NULL, NULL, NULL)); /* 7 parts, 2 threads */
        const char *sp[] = {"<|endoftext|>"};
        assert_ok(moe_tok_train_from_counts(&a, c, 900, moe_tok_pattern(base), 1, sp));
        assert_ok(moe_tok_train_from_counts_ref(&b, c, 900, moe_tok_pattern(base), 1, sp));
        assert_true(moe_tok_equal(a, b));
        /* serialised counts merged twice: every count doubles, so the same merges */
        uint8_t *blob;
        size_t nb;
        moe_tok_counts *c2;
        assert_ok(moe_tok_counts_serialize(c, &blob, &nb));
        assert_ok(moe_tok_counts_create(&c2));
        assert_ok(moe_tok_counts_merge(c2, blob, nb));
        assert_ok(moe_tok_counts_merge(c2, blob, nb));
        moe_tok *d;
        assert_ok(moe_tok_train_from_counts(&d, c2, 900, moe_tok_pattern(base), 1, sp));
        assert_true(moe_tok_equal(a, d));
        free(blob);
        moe_tok_destroy(d);
        moe_tok_counts_destroy(c2);
        moe_tok_destroy(a);
        moe_tok_destroy(b);
        moe_tok_counts_destroy(c);
        moe_tok_destroy(base);
    }
    moe_tok *t1 = trained("cl100k_base", 800, 1), *t3 = trained("cl100k_base", 800, 3);
    assert_true(moe_tok_equal(t1, t3));
    moe_tok_destroy(t1);
    moe_tok_destroy(t3);
}

static void test_train_hand_worked(void **state)
{
    (void)state;
    /* pieces (pattern: runs of non-spaces, runs of spaces):
     * "ab" x2, "cd" x2, "aaaa" x1, " " x4: pairs ab 2, cd 2, aa 3 (overlapping in
     * aaaa). First aa (3); aaaa is then [aa, aa], so (aa, aa) has count 1;
     * then ab and cd tie at 2: ab first (smaller bytes); then (aa, aa) -> aaaa. */
    const char *text = "ab ab cd cd aaaa";
    moe_tok *t;
    assert_ok(moe_tok_train(&t, (const uint8_t *)text, strlen(text), 260, "\\S+|\\s+", 0, NULL, 1));
    assert_int_equal(moe_tok_n_ranks(t), 260);
    const char *want[] = {"aa", "ab", "cd", "aaaa"};
    for (int i = 0; i < 4; i++) {
        size_t len;
        const uint8_t *b = moe_tok_token(t, 256 + i, &len);
        assert_int_equal(len, strlen(want[i]));
        assert_memory_equal(b, want[i], len);
    }
    /* a larger vocabulary than pairs left stops early */
    moe_tok_destroy(t);
    assert_ok(moe_tok_train(&t, (const uint8_t *)text, strlen(text), 300, "\\S+|\\s+", 0, NULL, 1));
    assert_int_equal(moe_tok_n_ranks(t), 260);
    moe_tok_destroy(t);
}

/* import(export(T)) == T for the three forms (the .tiktoken form keeps the
 * ranks: pattern and specials come back from the arguments). */
static void test_forms_round_trip(void **state)
{
    (void)state;
    moe_tok *t = trained("o200k_base", 1500, 1);
    const moe_tok_form forms[] = {MOE_TOK_FORM_TIKTOKEN_JSON, MOE_TOK_FORM_TIKTOKEN, MOE_TOK_FORM_HF};
    for (int f = 0; f < 3; f++) {
        char *data;
        size_t n;
        assert_ok(moe_tok_save_buffer(t, forms[f], &data, &n));
        moe_tok *u;
        const char *names[] = {moe_tok_special_name(t, 0), moe_tok_special_name(t, 1)};
        const int64_t ids[] = {moe_tok_special_id(t, 0), moe_tok_special_id(t, 1)};
        if (forms[f] == MOE_TOK_FORM_TIKTOKEN)
            assert_ok(moe_tok_load_buffer(&u, "x", (const uint8_t *)data, n, MOE_TOK_FORM_AUTO, moe_tok_pattern(t), 2,
                                          names, ids));
        else
            assert_ok(moe_tok_load_buffer(&u, "x", (const uint8_t *)data, n, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL));
        assert_true(moe_tok_equal(t, u));
        assert_int_equal(moe_tok_hash(t), moe_tok_hash(u));
        moe_tok_destroy(u);
        free(data);
    }
    /* through a file, atomically replaced */
    assert_ok(moe_tok_save(t, "rt.json", MOE_TOK_FORM_HF));
    moe_tok *u;
    assert_ok(moe_tok_load(&u, "rt.json", MOE_TOK_FORM_HF, NULL, 0, NULL, NULL));
    assert_true(moe_tok_equal(t, u));
    moe_tok_destroy(u);
    moe_tok_destroy(t);
}

/* The HF form spells bytes in GPT-2's byte-level alphabet. */
static void test_hf_alphabet(void **state)
{
    (void)state;
    uint8_t bytes[260];
    int64_t off[259];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    bytes[256] = ' ';
    bytes[257] = 't';
    off[256] = 256;
    off[257] = 258;
    bytes[258] = '\n';
    bytes[259] = '\n';
    off[258] = 260;
    moe_tok *t;
    assert_ok(moe_tok_create(&t, bytes, off, 258, NULL, 0, NULL, NULL));
    char *data;
    size_t n;
    assert_ok(moe_tok_save_buffer(t, MOE_TOK_FORM_HF, &data, &n));
    assert_non_null(strstr(data, "\"\xc4\xa0t\":256"));       /* " t" is "Ġt" */
    assert_non_null(strstr(data, "\"\xc4\x8a\xc4\x8a\":257")); /* "\n\n" is "ĊĊ" */
    assert_non_null(strstr(data, "\"merges\":[\"\xc4\xa0 t\",\"\xc4\x8a \xc4\x8a\"]"));
    assert_non_null(strstr(data, "\"!\":33"));
    free(data);
    moe_tok_destroy(t);
}

static void test_hash(void **state)
{
    (void)state;
    /* FNV-1a 64 over (uint32 LE length, bytes) per rank, then the pattern, by hand */
    uint8_t bytes[257];
    int64_t off[258];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)(255 - i), off[i] = i;
    bytes[256] = 'q';
    off[256] = 256;
    off[257] = 256; /* id 256 is a hole */
    moe_tok *t;
    assert_ok(moe_tok_create(&t, bytes, off, 257, "\\S+|\\s+", 0, NULL, NULL));
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < 257; i++) {
        const uint8_t rec[5] = {(uint8_t)(i < 256), 0, 0, 0, (uint8_t)(255 - i)};
        for (int k = 0; k < (i < 256 ? 5 : 4); k++) h = (h ^ rec[k]) * 0x100000001b3ull;
    }
    const char *p = "\\S+|\\s+";
    const uint8_t plen[4] = {(uint8_t)strlen(p), 0, 0, 0};
    for (int k = 0; k < 4; k++) h = (h ^ plen[k]) * 0x100000001b3ull;
    for (const char *c = p; *c; c++) h = (h ^ (uint8_t)*c) * 0x100000001b3ull;
    assert_int_equal(moe_tok_hash(t), h);
    assert_int_equal(moe_tok_n_holes(t), 1);
    assert_int_equal(moe_tok_vocab_size(t), 257);
    size_t len;
    assert_null(moe_tok_token(t, 256, &len));
    /* another pattern, another hash */
    moe_tok *u;
    assert_ok(moe_tok_create(&u, bytes, off, 257, "\\S+|\\s", 0, NULL, NULL));
    assert_true(moe_tok_hash(u) != moe_tok_hash(t));
    moe_tok_destroy(u);
    moe_tok_destroy(t);
}

static void test_base64(void **state)
{
    (void)state;
    uint8_t in[64], out[64];
    char enc[100];
    for (size_t n = 0; n < 40; n++) {
        for (size_t i = 0; i < n; i++) in[i] = (uint8_t)rnd();
        size_t k = moe_tok_base64_encode(enc, in, n);
        assert_int_equal(k, 4 * ((n + 2) / 3));
        assert_int_equal(moe_tok_base64_decode(out, enc, k), (long)n);
        assert_memory_equal(out, in, n);
    }
    assert_int_equal(moe_tok_base64_decode(out, "aGk=", 4), 2);
    assert_memory_equal(out, "hi", 2);
    assert_int_equal(moe_tok_base64_decode(out, "aG!=", 4), -1 - 2);  /* bad character at 2 */
    assert_int_equal(moe_tok_base64_decode(out, "aGk", 3), -1 - 3);   /* length */
    assert_int_equal(moe_tok_base64_decode(out, "a=k=", 4), -1 - 1);  /* '=' inside */
    assert_int_equal(moe_tok_base64_decode(out, "aGl=", 4), -1 - 2);  /* non-zero unused bits */
    assert_int_equal(moe_tok_base64_decode(out, "aR==", 4), -1 - 1);
    assert_int_equal(moe_tok_base64_decode(out, "aGk=aGk=", 8), -1 - 3); /* padding before the end */
    assert_int_equal(moe_tok_base64_decode(out, "a b=", 4), -1 - 1);
}

/* ---- malformed tokenizer files ---- */

static char *ranks_json(const char *extra_runs, const char *pattern, const char *specials)
{
    /* the 256 bytes as one run, then extra_runs */
    static char buf[1 << 16];
    size_t w = (size_t)sprintf(buf, "{\"pat_str\": \"%s\", \"special_tokens\": {%s}, \"bpe_ranks\": \"! 0", pattern,
                               specials);
    for (int b = 0; b < 256; b++) {
        uint8_t x = (uint8_t)b;
        buf[w++] = ' ';
        w += moe_tok_base64_encode(buf + w, &x, 1);
    }
    w += (size_t)sprintf(buf + w, "%s\"}", extra_runs);
    return buf;
}

static moe_status load_json(const char *s)
{
    moe_tok *t = NULL;
    moe_status st = moe_tok_load_buffer(&t, "bad.json", (const uint8_t *)s, strlen(s), MOE_TOK_FORM_AUTO, NULL, 0, NULL,
                                        NULL);
    moe_tok_destroy(t);
    return st;
}

static void test_bad_tokenizer_files(void **state)
{
    (void)state;
    assert_ok(load_json(ranks_json("\\n! 256 YWI= Y2Q=", "\\\\S+", "\"<|e|>\": 258")));
    assert_int_equal(load_json(ranks_json("\\n! 256 YWI= Y2!=", "\\\\S+", "")), MOE_ERR_FORMAT);
    assert_detail_has("bad.json: line 2, token 2 (rank 257): bad base64");
    assert_detail_has("at character 3");
    assert_int_equal(load_json(ranks_json("\\n! 255 YWI=", "\\\\S+", "")), MOE_ERR_FORMAT);
    assert_detail_has("rank 255 is given twice (line 1, token 256 and line 2, token 1)");
    assert_int_equal(load_json(ranks_json("\\n! 256 YWI= YWI=", "\\\\S+", "")), MOE_ERR_FORMAT);
    assert_detail_has("ranks 256 and 257 have the same bytes");
    assert_int_equal(load_json(ranks_json("\\n! 99999999999 YWI=", "\\\\S+", "")), MOE_ERR_FORMAT);
    assert_detail_has("first rank");
    assert_int_equal(load_json(ranks_json("\\n! 4194303 YWI= Y2Q=", "\\\\S+", "")), MOE_ERR_FORMAT);
    assert_detail_has("above the limit");
    assert_int_equal(load_json(ranks_json("", "(\\\\S+", "")), MOE_ERR_ARG);
    assert_detail_has("the pattern does not compile: missing closing parenthesis at offset 4");
    assert_int_equal(load_json(ranks_json("", "\\\\S+", "\"<|e|>\": 12")), MOE_ERR_FORMAT);
    assert_detail_has("special token '<|e|>' has id 12, which is already a rank");
    assert_int_equal(load_json(ranks_json("", "\\\\S+", "\"<|e|>\": -3")), MOE_ERR_FORMAT);
    assert_int_equal(load_json(ranks_json("", "\\\\S+", "\"<|\xc3|>\": 300")), MOE_ERR_FORMAT);
    assert_detail_has("special token with id 300: its name is not UTF-8 (byte 2)");
    assert_int_equal(load_json("{\"pat_str\": \"x\", \"bpe_ranks\": \"! 0 AA==\"}"), MOE_ERR_FORMAT);
    assert_detail_has("the single byte 0x01 has no rank");
    assert_int_equal(load_json("{\"pat_str\": \"x\", \"bpe_ranks\": 3"), MOE_ERR_FORMAT);
    assert_detail_has("not valid JSON (at line 1, column");
    assert_int_equal(load_json("{\"pat_str\": \"x\"}"), MOE_ERR_FORMAT);
    /* explicit_n_vocab must agree */
    char *j = ranks_json("", "\\\\S+", "");
    char with[1 << 16];
    snprintf(with, sizeof with, "{\"explicit_n_vocab\": 300, %.60000s", j + 1);
    assert_int_equal(load_json(with), MOE_ERR_FORMAT);
    assert_detail_has("explicit_n_vocab");
    /* .tiktoken lines */
    char tk[8192];
    size_t w = 0;
    for (int b = 0; b < 256; b++) {
        uint8_t x = (uint8_t)b;
        w += moe_tok_base64_encode(tk + w, &x, 1);
        w += (size_t)sprintf(tk + w, " %d\n", b);
    }
    moe_tok *t;
    assert_ok(moe_tok_load_buffer(&t, "a.tiktoken", (const uint8_t *)tk, w, MOE_TOK_FORM_AUTO, "gpt2", 0, NULL, NULL));
    moe_tok_destroy(t);
    assert_int_equal(moe_tok_load_buffer(&t, "a.tiktoken", (const uint8_t *)tk, w, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL),
                     MOE_ERR_ARG);
    assert_detail_has("has no pattern");
    memcpy(tk + w, "YWI=\n", 5);
    assert_int_equal(moe_tok_load_buffer(&t, "a.tiktoken", (const uint8_t *)tk, w + 5, MOE_TOK_FORM_AUTO, "gpt2", 0, NULL,
                                         NULL),
                     MOE_ERR_FORMAT);
    assert_detail_has("a.tiktoken: line 257 has no rank");
    memcpy(tk + w, "YWI= 1e9\n", 9);
    assert_int_equal(moe_tok_load_buffer(&t, "a.tiktoken", (const uint8_t *)tk, w + 9, MOE_TOK_FORM_AUTO, "gpt2", 0, NULL,
                                         NULL),
                     MOE_ERR_FORMAT);
    assert_detail_has("line 257: rank \"1e9\" is not a number");
    /* a missing file */
    assert_int_equal(moe_tok_load(&t, "no/such/file.json", MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL), MOE_ERR_IO);
    assert_detail_has("no/such/file.json");
}

/* HF files whose merge list disagrees with the ids are refused, naming the merge. */
static void test_bad_hf(void **state)
{
    (void)state;
    uint8_t bytes[262];
    int64_t off[260];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    memcpy(bytes + 256, "ababab", 6); /* 256 "ab", 257 "abab" */
    off[256] = 256;
    off[257] = 258;
    off[258] = 262;
    moe_tok *t;
    assert_ok(moe_tok_create(&t, bytes, off, 258, NULL, 0, NULL, NULL));
    char *data;
    size_t n;
    assert_ok(moe_tok_save_buffer(t, MOE_TOK_FORM_HF, &data, &n));
    moe_tok *u;
    assert_ok(moe_tok_load_buffer(&u, "ok.json", (const uint8_t *)data, n, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL));
    assert_true(moe_tok_equal(t, u));
    moe_tok_destroy(u);
    /* merges swapped: "ab ab" before "a b" */
    char *m = strstr(data, "\"merges\":[");
    assert_non_null(m);
    char swapped[4096];
    snprintf(swapped, sizeof swapped, "%.*s\"merges\":[\"ab ab\",\"a b\"]}}", (int)(m - data), data);
    assert_int_equal(moe_tok_load_buffer(&u, "swap.json", (const uint8_t *)swapped, strlen(swapped), MOE_TOK_FORM_AUTO,
                                         NULL, 0, NULL, NULL),
                     MOE_ERR_FORMAT);
    assert_detail_has("swap.json: merge 2 (\"a\" + \"b\") makes id 256 after a merge that made id 257");
    snprintf(swapped, sizeof swapped, "%.*s\"merges\":[\"a b\"]}}", (int)(m - data), data);
    assert_int_equal(moe_tok_load_buffer(&u, "few.json", (const uint8_t *)swapped, strlen(swapped), MOE_TOK_FORM_AUTO,
                                         NULL, 0, NULL, NULL),
                     MOE_ERR_FORMAT);
    assert_detail_has("token id 257 is made by no merge");
    snprintf(swapped, sizeof swapped, "%.*s\"merges\":[\"a b\",\"a bab\"]}}", (int)(m - data), data);
    assert_int_equal(moe_tok_load_buffer(&u, "odd.json", (const uint8_t *)swapped, strlen(swapped), MOE_TOK_FORM_AUTO,
                                         NULL, 0, NULL, NULL),
                     MOE_ERR_FORMAT);
    assert_detail_has("odd.json: merge 2");
    free(data);
    moe_tok_destroy(t);
}

/* ---- token files ---- */

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

static void test_token_files(void **state)
{
    (void)state;
    moe_tok *t = trained("gpt2", 600, 1), *other = trained("cl100k_base", 600, 1);
    uint32_t ids[1000];
    for (int i = 0; i < 1000; i++) ids[i] = (uint32_t)(rnd() % 600);
    assert_ok(moe_tok_file_write("a.tok", t, ids, 1000));
    moe_tok_file *f;
    assert_ok(moe_tok_file_open(&f, "a.tok", t));
    assert_int_equal(moe_tok_file_n_tokens(f), 1000);
    assert_int_equal(moe_tok_file_bytes_per_token(f), 2);
    assert_int_equal(moe_tok_file_vocab_size(f), 600);
    uint32_t back[1000];
    assert_ok(moe_tok_file_read(f, back, 0, 1000));
    assert_memory_equal(back, ids, sizeof ids);
    assert_int_equal(moe_tok_file_read(f, back, 990, 11), MOE_ERR_ARG);
    moe_tok_file_close(f);
    /* another tokenizer's hash */
    assert_int_equal(moe_tok_file_open(&f, "a.tok", other), MOE_ERR_MISMATCH);
    assert_detail_has("a.tok was encoded with another tokenizer");
    assert_ok(moe_tok_file_open(&f, "a.tok", NULL));
    moe_tok_file_close(f);

    FILE *in = fopen("a.tok", "rb");
    static uint8_t buf[64 + 2000 + 16];
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    assert_int_equal(n, 2064);
    static uint8_t bad[sizeof buf];
    struct {
        size_t len;
        int at;
        uint8_t val;
        moe_status st;
        const char *msg;
    } cases[] = {
        {30, -1, 0, MOE_ERR_FORMAT, "truncated: 30 bytes"},
        {2063, -1, 0, MOE_ERR_FORMAT, "truncated: the header says 1000 tokens"},
        {2066, -1, 0, MOE_ERR_FORMAT, "2 trailing bytes"},
        {2064, 0, 'X', MOE_ERR_FORMAT, "not a token file"},
        {2064, 8, 2, MOE_ERR_FORMAT, "version 2"},
        {2064, 12, 4, MOE_ERR_FORMAT, "bytes_per_token 4 for vocab_size 600"},
        {2064, 28, 1, MOE_ERR_FORMAT, "unknown flags"},
        {2064, 50, 1, MOE_ERR_FORMAT, "padding byte 50"},
        {2064, 64 + 2 * 777 + 1, 0x80, MOE_ERR_FORMAT, "token 777 has id"},
        {2064, 32, 0x55, MOE_ERR_MISMATCH, "another tokenizer"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memcpy(bad, buf, sizeof buf);
        if (cases[i].at >= 0) bad[cases[i].at] = cases[i].val;
        write_bytes("bad.tok", bad, cases[i].len);
        assert_int_equal(moe_tok_file_open(&f, "bad.tok", t), cases[i].st);
        assert_detail_has(cases[i].msg);
        assert_detail_has("bad.tok");
    }
    assert_int_equal(moe_tok_file_open(&f, "missing.tok", t), MOE_ERR_IO);
    assert_detail_has("missing.tok");
    ids[5] = 600;
    assert_int_equal(moe_tok_file_write("b.tok", t, ids, 1000), MOE_ERR_ARG);
    assert_detail_has("position 5");
    moe_tok_destroy(t);
    moe_tok_destroy(other);
}

static void test_decode_errors(void **state)
{
    (void)state;
    uint8_t bytes[256];
    int64_t off[258];
    for (int i = 0; i < 256; i++) bytes[i] = (uint8_t)i, off[i] = i;
    off[256] = off[257] = 256; /* id 256: a hole */
    const char *sp[] = {"<|x|>"};
    const int64_t sid[] = {300};
    moe_tok *t;
    assert_ok(moe_tok_create(&t, bytes, off, 257, NULL, 1, sp, sid));
    assert_int_equal(moe_tok_vocab_size(t), 301);
    assert_int_equal(moe_tok_n_holes(t), 44);
    uint8_t out[64];
    size_t n;
    uint32_t ids[] = {65, 300, 66};
    assert_ok(moe_tok_decode(t, out, sizeof out, &n, ids, 3));
    assert_int_equal(n, 7);
    assert_memory_equal(out, "A<|x|>B", 7);
    ids[1] = 256;
    assert_int_equal(moe_tok_decode(t, out, sizeof out, &n, ids, 3), MOE_ERR_ARG);
    assert_detail_has("id 256 at position 1 has no token");
    ids[1] = 301;
    assert_int_equal(moe_tok_decode(t, out, sizeof out, &n, ids, 3), MOE_ERR_ARG);
    assert_detail_has("outside the vocabulary");
    ids[1] = 66;
    assert_int_equal(moe_tok_decode(t, out, 2, &n, ids, 3), MOE_ERR_OVERFLOW);
    int64_t id;
    assert_int_equal(moe_tok_special_find(t, "<|y|>", &id), MOE_ERR_ARG);
    assert_detail_has("it has: <|x|>");
    moe_tok_destroy(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_matches_ref), cmocka_unit_test(test_long_pieces),
        cmocka_unit_test(test_encode_part),        cmocka_unit_test(test_delimiter),
        cmocka_unit_test(test_parts_equal_whole),  cmocka_unit_test(test_parts_queue),
        cmocka_unit_test(test_train_matches_ref),
        cmocka_unit_test(test_train_hand_worked),  cmocka_unit_test(test_forms_round_trip),
        cmocka_unit_test(test_hf_alphabet),        cmocka_unit_test(test_hash),
        cmocka_unit_test(test_base64),             cmocka_unit_test(test_bad_tokenizer_files),
        cmocka_unit_test(test_bad_hf),             cmocka_unit_test(test_token_files),
        cmocka_unit_test(test_decode_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
