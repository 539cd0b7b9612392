/* Data: the synthetic corpus is a pure function of its seed and every line
 * is a correct instance of its domain (checked by independent parsers);
 * the loader refuses bad files, builds the same batch whatever the split
 * into ranks, shifts targets by one, and keeps validation disjoint; token
 * files (2 and 4 bytes per id) give token windows drawn by the same
 * function of (seed, step), the bytes they stand for and the unigram
 * baseline, and are refused when they do not match their tokenizer. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/rng.h"
#include "data/data.h"
#include "tokenizer/tokfile.h"

#define assert_detail_has(s) assert_non_null(strstr(moe_error_detail(), (s)))

static void write_tmp(char path[64], const void *buf, size_t n)
{
    strcpy(path, "/tmp/moe_test_data_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, n), (ssize_t)n);
    close(fd);
}

static uint8_t *synth(size_t n, uint32_t seed, uint8_t **domain)
{
    uint8_t *t = malloc(n);
    assert_non_null(t);
    if (domain) *domain = malloc(n);
    assert_int_equal(moe_data_synth(t, domain ? *domain : NULL, n, seed), MOE_OK);
    return t;
}

/* A uniform draw in [0, 1) for test data (Philox, bench stream). */
static double moe_rng_uniform_test(int i) { return moe_rng_uniform(77, MOE_RNG_BENCH, (uint32_t)i, 0, 0, 0); }

static void test_synth_deterministic(void **state)
{
    (void)state;
    const size_t n = 100000;
    uint8_t *a = synth(n, 7, NULL), *b = synth(n, 7, NULL), *c = synth(n, 8, NULL), *p = synth(3333, 7, NULL);
    assert_memory_equal(a, b, n);
    assert_memory_not_equal(a, c, n);
    assert_memory_equal(a, p, 3333); /* a shorter corpus is a prefix */
    free(a);
    free(b);
    free(c);
    free(p);
}

static int roman_value(const char *s, int len)
{
    int v = 0;
    for (int i = 0; i < len; i++) {
        const char *sym = "IVXLCDM";
        static const int val[] = {1, 5, 10, 50, 100, 500, 1000};
        const char *a = strchr(sym, s[i]), *b = i + 1 < len ? strchr(sym, s[i + 1]) : NULL;
        if (!a || !s[i]) return -1;
        int x = val[a - sym], y = b ? val[b - sym] : 0;
        v += x < y ? -x : x;
    }
    return v;
}

/* Independent check that a line (without '\n') belongs to domain d. */
static int line_ok(int d, const char *s, int len)
{
    char line[256], w[64], r[64], op[16];
    if (len <= 0 || len >= (int)sizeof line) return 0;
    memcpy(line, s, (size_t)len);
    line[len] = '\0';
    int a, b, x, n = 0;
    char o;
    switch (d) {
    case 0: /* arith */
        if (sscanf(line, "%d%c%d=%d%n", &a, &o, &b, &x, &n) != 4 || n != len) return 0;
        return o == '+' ? a + b == x : o == '-' ? a - b == x : o == '*' ? a * b == x : 0;
    case 1: { /* strings */
        if (sscanf(line, "%15[a-z]: %63[a-z] -> %63[a-zA-Z]%n", op, w, r, &n) != 3 || n != len) return 0;
        int m = (int)strlen(w);
        if ((int)strlen(r) != m) return 0;
        if (!strcmp(op, "rev")) {
            for (int i = 0; i < m; i++)
                if (r[i] != w[m - 1 - i]) return 0;
            return 1;
        }
        if (!strcmp(op, "upper")) {
            for (int i = 0; i < m; i++)
                if (r[i] != w[i] - 'a' + 'A') return 0;
            return 1;
        }
        if (strcmp(op, "sort")) return 0;
        int cw[26] = {0};
        for (int i = 0; i < m; i++) cw[w[i] - 'a']++, cw[r[i] - 'a']--;
        for (int i = 0; i < 26; i++)
            if (cw[i]) return 0;
        for (int i = 1; i < m; i++)
            if (r[i - 1] > r[i]) return 0;
        return 1;
    }
    case 2: { /* english: lower-case words, a final '.', subject-verb agreement */
        static const char *const sing_verbs[] = {" sees ", " likes ", " chases ", " finds ",
                                                 " carries ", " watches ", " wants ", " draws "};
        if (line[len - 1] != '.') return 0;
        for (int i = 0; i < len - 1; i++)
            if (!(line[i] == ' ' || (line[i] >= 'a' && line[i] <= 'z'))) return 0;
        int has_sing = 0;
        for (size_t i = 0; i < sizeof sing_verbs / sizeof sing_verbs[0]; i++) has_sing |= !!strstr(line, sing_verbs[i]);
        if (sscanf(line, "%15s", op) != 1) return 0;
        const char *sing_det = " a an this every one ", *plur_det = " two some many these ";
        snprintf(w, sizeof w, " %s ", op);
        if (strstr(sing_det, w)) return has_sing;
        if (strstr(plur_det, w)) return !has_sing;
        return !strcmp(op, "the");
    }
    case 3: /* records */
        return sscanf(line, "{id: %d, name: %31[a-z], city: %31[a-z], age: %d}%n", &a, w, r, &b, &n) == 4 &&
               n == len && a >= 1000 && a <= 9999 && b >= 18 && b <= 90;
    case 4: /* code: C-like statements */
        return line[len - 1] == ';' && strchr(line, '\n') == NULL;
    case 5: /* roman */
        if (sscanf(line, "roman %d = %63[IVXLCDM]%n", &a, w, &n) != 2 || n != len) return 0;
        return a >= 1 && a <= 3999 && roman_value(w, (int)strlen(w)) == a;
    case 6: { /* dates */
        static const char *const months[] = {"january", "february", "march",     "april",   "may",      "june",
                                             "july",    "august",   "september", "october", "november", "december"};
        int y2, d2;
        if (sscanf(line, "%4d-%2d-%2d = %31[a-z] %d, %d%n", &a, &b, &x, w, &d2, &y2, &n) != 6 || n != len)
            return 0;
        return b >= 1 && b <= 12 && !strcmp(w, months[b - 1]) && d2 == x && y2 == a && x >= 1 && x <= 31;
    }
    }
    return 0;
}

static void test_synth_domains(void **state)
{
    (void)state;
    const int D = moe_data_n_domains();
    assert_true(D >= 5);
    for (int d = 0; d < D; d++) assert_non_null(moe_data_domain_name(d));
    assert_null(moe_data_domain_name(D));
    assert_null(moe_data_domain_name(-1));

    const size_t n = 200000;
    uint8_t *dom, *t = synth(n, 11, &dom);
    size_t count[256] = {0}, lines[256] = {0};
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        count[dom[i]]++;
        if (t[i] != '\n') continue;
        /* Every byte of a line, its '\n' included, carries the line's domain. */
        for (size_t j = start; j <= i; j++)
            if (dom[j] != dom[start]) fail_msg("line at %zu mixes domains", start);
        if (i > start) {
            if (!line_ok(dom[start], (const char *)t + start, (int)(i - start)))
                fail_msg("line at %zu is not a valid %s line: '%.*s'", start, moe_data_domain_name(dom[start]),
                         (int)(i - start), t + start);
            lines[dom[start]]++;
        } else {
            /* An empty line starts a document: the domain may change only there. */
            assert_true(i > 0 && t[i - 1] == '\n');
        }
        start = i + 1;
    }
    for (size_t i = 1; i < n; i++)
        if (dom[i] != dom[i - 1]) assert_true(t[i] == '\n' && t[i - 1] == '\n');
    /* All domains present, none dominant (documents have a byte budget). */
    for (int d = 0; d < D; d++) {
        assert_true(lines[d] > 50);
        assert_true(count[d] > n / D / 2 && count[d] < 2 * n / D);
    }
    for (int d = D; d < 256; d++) assert_int_equal(count[d], 0);
    free(t);
    free(dom);
}

/* ids (n) are the bytes p (n), one id per byte. */
static void assert_ids_bytes(const int32_t *ids, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) assert_int_equal(ids[i], p[i]);
}

static void test_open_errors(void **state)
{
    (void)state;
    moe_data *ds = (moe_data *)(uintptr_t)1;
    assert_int_equal(moe_data_open(&ds, "/nonexistent/corpus.txt", NULL, 0.05, 16, 1), MOE_ERR_IO);
    assert_null(ds);
    assert_detail_has("/nonexistent/corpus.txt");

    char path[64], small[64];
    write_tmp(path, "", 0);
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.05, 16, 1), MOE_ERR_ARG);
    assert_detail_has(path);
    assert_detail_has("empty");
    unlink(path);

    write_tmp(small, "0123456789abcdef", 16); /* 16 bytes < seq_len + 1 = 17 */
    assert_int_equal(moe_data_open(&ds, small, NULL, 0, 16, 1), MOE_ERR_ARG);
    assert_detail_has(small);
    assert_detail_has("seq_len+1 = 17");
    assert_int_equal(moe_data_open(&ds, small, NULL, 0, 15, 1), MOE_OK); /* exactly seq_len + 1 */
    moe_data_destroy(ds);

    uint8_t buf[1000];
    memset(buf, 'x', sizeof buf);
    write_tmp(path, buf, sizeof buf);
    /* Tail of 0.01 * 1000 = 10 bytes is too short for windows of 17. */
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.01, 16, 1), MOE_ERR_ARG);
    assert_detail_has("held-out tail");
    /* A validation file that is too short is named. */
    assert_int_equal(moe_data_open(&ds, path, small, 0.05, 16, 1), MOE_ERR_ARG);
    assert_detail_has(small);
    assert_int_equal(moe_data_open(&ds, path, "/nonexistent/val.txt", 0.05, 16, 1), MOE_ERR_IO);
    assert_detail_has("/nonexistent/val.txt");
    assert_int_equal(moe_data_open(&ds, path, NULL, 1.0, 16, 1), MOE_ERR_ARG);
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.05, 0, 1), MOE_ERR_ARG);
    assert_int_equal(moe_data_open(&ds, "/tmp", NULL, 0.05, 16, 1), MOE_ERR_IO);
    /* Without validation data, asking for it is an error. */
    assert_int_equal(moe_data_open(&ds, path, NULL, 0, 16, 1), MOE_OK);
    assert_int_equal(moe_data_val_bytes(ds), 0);
    int32_t in[16], tg[16];
    assert_int_equal(moe_data_val_batch(ds, in, tg, 0, 1, 1), MOE_ERR_ARG);
    assert_int_equal(moe_data_batch(ds, in, tg, -1, 0, 1), MOE_ERR_ARG);
    moe_data_destroy(ds);
    unlink(path);
    unlink(small);

    assert_int_equal(moe_data_write_file("/nonexistent/dir/out.txt", buf, 10), MOE_ERR_IO);
    assert_detail_has("/nonexistent/dir/out.txt");
}

/* Rows of a rank's slice equal the corresponding rows of the global batch,
 * and each row is a window of the file with targets shifted by one. */
static void test_batches_rank_independent(void **state)
{
    (void)state;
    const size_t n = 50000;
    const int T = 32, B = 12;
    uint8_t *t = synth(n, 3, NULL);
    char path[64];
    write_tmp(path, t, n);
    moe_data *ds;
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.1, T, 99), MOE_OK);
    assert_int_equal(moe_data_train_bytes(ds), 45000);
    assert_int_equal(moe_data_val_bytes(ds), 5000);
    int32_t in[12 * 32], tg[12 * 32], in_r[12 * 32], tg_r[12 * 32], in_prev[12 * 32];
    for (int64_t step = 0; step < 5; step++) {
        assert_int_equal(moe_data_batch(ds, in, tg, step, 0, B), MOE_OK);
        for (int i = 0; i < B; i++) {
            int64_t off = moe_data_train_offset(ds, step, i);
            assert_true(off >= 0 && off + T + 1 <= moe_data_train_bytes(ds));
            assert_ids_bytes(in + i * T, t + off, T);
            assert_ids_bytes(tg + i * T, t + off + 1, T);
            assert_memory_equal(tg + i * T, in + i * T + 1, (T - 1) * sizeof(int32_t));
        }
        const int worlds[] = {1, 2, 3, 4, 6, 12};
        for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
            int W = worlds[w];
            for (int r = 0; r < W; r++) {
                int seq0 = r * B / W, nseq = B / W;
                assert_int_equal(moe_data_batch(ds, in_r, tg_r, step, seq0, nseq), MOE_OK);
                assert_memory_equal(in_r, in + seq0 * T, (size_t)nseq * T * sizeof(int32_t));
                assert_memory_equal(tg_r, tg + seq0 * T, (size_t)nseq * T * sizeof(int32_t));
            }
        }
        if (step) assert_memory_not_equal(in, in_prev, sizeof in);
        memcpy(in_prev, in, sizeof in);
    }
    /* The same seed gives the same batch; another seed another one. */
    moe_data *ds2, *ds3;
    assert_int_equal(moe_data_open(&ds2, path, NULL, 0.1, T, 99), MOE_OK);
    assert_int_equal(moe_data_open(&ds3, path, NULL, 0.1, T, 100), MOE_OK);
    assert_int_equal(moe_data_batch(ds2, in_r, tg_r, 4, 0, B), MOE_OK);
    assert_memory_equal(in_r, in_prev, sizeof in);
    assert_int_equal(moe_data_batch(ds3, in_r, tg_r, 4, 0, B), MOE_OK);
    assert_memory_not_equal(in_r, in_prev, sizeof in);
    moe_data_destroy(ds2);
    moe_data_destroy(ds3);
    moe_data_destroy(ds);
    unlink(path);
    free(t);
}

/* Training bytes 'a'..'z', held-out tail 'A'..'Z': training windows never
 * touch the tail but reach both ends of the training part; validation
 * windows read only the tail, on a fixed grid. */
static void test_train_val_disjoint(void **state)
{
    (void)state;
    enum { N = 10000, NVAL = 500, T = 16 };
    static uint8_t buf[N];
    for (int i = 0; i < N; i++) buf[i] = (uint8_t)(i < N - NVAL ? 'a' + i % 26 : 'A' + i % 26);
    char path[64];
    write_tmp(path, buf, N);
    moe_data *ds;
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.05, T, 5), MOE_OK);
    assert_int_equal(moe_data_val_bytes(ds), NVAL);
    int32_t in[64 * T], tg[64 * T];
    int64_t lo = N, hi = -1;
    double mean = 0;
    const int steps = 400;
    for (int s = 0; s < steps; s++) {
        assert_int_equal(moe_data_batch(ds, in, tg, s, 0, 64), MOE_OK);
        for (int i = 0; i < 64 * T; i++) assert_true(in[i] >= 'a' && tg[i] >= 'a');
        for (int i = 0; i < 64; i++) {
            int64_t off = moe_data_train_offset(ds, s, i);
            lo = off < lo ? off : lo;
            hi = off > hi ? off : hi;
            mean += (double)off / (steps * 64);
        }
    }
    const int64_t n_windows = N - NVAL - T;
    assert_true(lo >= 0 && lo < n_windows / 100);
    assert_true(hi < n_windows && hi > n_windows - n_windows / 100);
    assert_true(mean > 0.48 * n_windows && mean < 0.52 * n_windows);

    /* Validation: (500 - 1) / 16 = 31 windows on a stride-16 grid. */
    assert_int_equal(moe_data_val_windows(ds), 31);
    for (int64_t total = 1; total <= 40; total += 13) {
        for (int64_t g = 0; g < total; g++) {
            assert_int_equal(moe_data_val_batch(ds, in, tg, g, total, 1), MOE_OK);
            int64_t w = g * 31 / total;
            assert_ids_bytes(in, buf + (N - NVAL) + w * T, T);
            assert_ids_bytes(tg, buf + (N - NVAL) + w * T + 1, T);
        }
    }
    /* A pass split over ranks equals the pass in one piece. */
    int32_t in1[31 * T], tg1[31 * T], in31[31 * T], tg31[31 * T];
    assert_int_equal(moe_data_val_batch(ds, in31, tg31, 0, 31, 31), MOE_OK);
    assert_int_equal(moe_data_val_batch(ds, in1, tg1, 10, 31, 21), MOE_OK);
    assert_memory_equal(in1, in31 + 10 * T, 21 * T * sizeof(int32_t));
    assert_int_equal(moe_data_val_batch(ds, in1, tg1, 30, 31, 2), MOE_ERR_ARG);
    moe_data_destroy(ds);

    /* A separate validation file is used as a whole; training keeps every byte. */
    char vpath[64];
    write_tmp(vpath, buf + N - NVAL, NVAL);
    assert_int_equal(moe_data_open(&ds, path, vpath, 0.05, T, 5), MOE_OK);
    assert_int_equal(moe_data_train_bytes(ds), N);
    assert_int_equal(moe_data_val_batch(ds, in, tg, 0, 1, 1), MOE_OK);
    assert_ids_bytes(in, buf + N - NVAL, T);
    moe_data_destroy(ds);
    unlink(vpath);
    unlink(path);
}

static void test_unigram(void **state)
{
    (void)state;
    enum { N = 4000 };
    static uint8_t buf[N];
    /* Training part: 4 equally frequent bytes (2 bits); the tail is other bytes. */
    for (int i = 0; i < N; i++) buf[i] = (uint8_t)(i < N / 2 ? "abcd"[i % 4] : 'A' + i % 20);
    char path[64];
    write_tmp(path, buf, N);
    moe_data *ds;
    assert_int_equal(moe_data_open(&ds, path, NULL, 0.5, 8, 1), MOE_OK);
    assert_true(fabs(moe_data_unigram_bpb(ds) - 2.0) < 1e-12);
    moe_data_destroy(ds);
    unlink(path);
    /* p = (1/2, 1/4, 1/4): 1.5 bits. */
    assert_true(fabs(moe_data_bytes_entropy((const uint8_t *)"aabcaabc", 8) - 1.5) < 1e-12);
    assert_true(moe_data_bytes_entropy((const uint8_t *)"zzzz", 4) == 0.0);
}

/* A tokenizer trained on text, its ids of text, and a token file of them. */
static moe_tok *train_tok(const uint8_t *text, size_t n, int64_t vocab)
{
    moe_tok *t = NULL;
    assert_int_equal(moe_tok_train(&t, text, n, vocab, NULL, 0, NULL, 1), MOE_OK);
    return t;
}

static uint32_t *encode(const moe_tok *t, const uint8_t *text, size_t n, size_t *n_ids)
{
    moe_tok_encoder *e = NULL;
    uint32_t *ids = malloc(n * sizeof *ids);
    assert_int_equal(moe_tok_encoder_create(&e, t), MOE_OK);
    assert_int_equal(moe_tok_encode(e, ids, n_ids, text, n), MOE_OK);
    moe_tok_encoder_destroy(e);
    return ids;
}

static void tok_path(char path[64], const moe_tok *t, const uint32_t *ids, size_t n)
{
    strcpy(path, "/tmp/moe_test_data_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    unlink(path);
    strcat(path, ".tok");
    assert_int_equal(moe_tok_file_write(path, t, ids, n), MOE_OK);
}

/* Windows of a token file are windows of its ids; the draw is the byte
 * loader's function of (seed, step, g) over the token count; batches do not
 * depend on the rank split; bytes and the unigram baseline are the ids'. */
static void test_token_windows(void **state)
{
    (void)state;
    const size_t nb = 120000;
    const int T = 24, B = 8;
    uint8_t *text = synth(nb, 11, NULL);
    moe_tok *tok = train_tok(text, nb, 700);
    size_t n = 0;
    uint32_t *ids = encode(tok, text, nb, &n);
    assert_true(n > 30000 && n < nb);
    char path[64];
    tok_path(path, tok, ids, n);
    moe_data *ds = NULL;
    const moe_data_config dc = {.path = path, .val_frac = 0.1, .seq_len = T, .seed = 5, .tok = tok};
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_OK); /* AUTO: the name ends in .tok */
    assert_true(moe_data_is_tokens(ds));
    assert_int_equal(moe_data_vocab_size(ds), 700);
    const int64_t nv = (int64_t)(0.1 * (double)n), ntr = (int64_t)n - nv;
    assert_int_equal(moe_data_train_tokens(ds), ntr);
    assert_int_equal(moe_data_val_tokens(ds), nv);
    /* bytes: the lengths of the ids' byte strings, which decode to the text */
    int64_t bytes_tr = 0;
    for (int64_t i = 0; i < ntr; i++) {
        size_t len;
        assert_non_null(moe_tok_token(tok, ids[i], &len));
        bytes_tr += (int64_t)len;
        assert_int_equal(moe_data_id_bytes(ds)[ids[i]], (int32_t)len);
    }
    assert_int_equal(moe_data_train_bytes(ds), bytes_tr);
    assert_int_equal(moe_data_train_bytes(ds) + moe_data_val_bytes(ds), (int64_t)nb);
    /* the unigram baseline, recomputed here */
    double *cnt = calloc(700, sizeof *cnt), h = 0;
    for (int64_t i = 0; i < ntr; i++) cnt[ids[i]] += 1;
    for (int v = 0; v < 700; v++)
        if (cnt[v] > 0) h -= cnt[v] / (double)ntr * log2(cnt[v] / (double)ntr);
    assert_true(fabs(moe_data_unigram_bpt(ds) - h) < 1e-9);
    assert_true(fabs(moe_data_unigram_bpb(ds) - h * (double)ntr / (double)bytes_tr) < 1e-9);
    free(cnt);
    /* the draw of a byte file with the same count of training units */
    uint8_t *same = calloc((size_t)ntr + (size_t)nv, 1);
    char bpath[64];
    write_tmp(bpath, same, (size_t)ntr + (size_t)nv);
    moe_data *bd = NULL;
    assert_int_equal(moe_data_open(&bd, bpath, NULL, 0.1, T, 5), MOE_OK);
    assert_int_equal(moe_data_train_tokens(bd), ntr);
    int32_t in[8 * 24], tg[8 * 24], in_r[8 * 24], tg_r[8 * 24];
    for (int64_t step = 0; step < 4; step++) {
        assert_int_equal(moe_data_batch(ds, in, tg, step, 0, B), MOE_OK);
        int64_t want_bytes = 0;
        for (int i = 0; i < B; i++) {
            const int64_t off = moe_data_train_offset(ds, step, i);
            assert_int_equal(off, moe_data_train_offset(bd, step, i));
            for (int t = 0; t < T; t++) {
                assert_int_equal(in[i * T + t], (int32_t)ids[off + t]);
                assert_int_equal(tg[i * T + t], (int32_t)ids[off + t + 1]);
                want_bytes += moe_data_id_bytes(ds)[ids[off + t + 1]];
            }
        }
        assert_int_equal(moe_data_batch_bytes(ds, step, 0, B), want_bytes);
        for (int W = 1; W <= 8; W *= 2)
            for (int r = 0; r < W; r++) {
                assert_int_equal(moe_data_batch(ds, in_r, tg_r, step, r * B / W, B / W), MOE_OK);
                assert_memory_equal(in_r, in + r * B / W * T, (size_t)(B / W) * T * sizeof(int32_t));
                assert_memory_equal(tg_r, tg + r * B / W * T, (size_t)(B / W) * T * sizeof(int32_t));
            }
    }
    /* validation windows of the tail and the bytes of a pass */
    const int64_t nw = moe_data_val_windows(ds), total = 5;
    assert_int_equal(nw, (nv - 1) / T);
    int64_t pass_bytes = 0;
    for (int64_t g = 0; g < total; g++) {
        assert_int_equal(moe_data_val_batch(ds, in, tg, g, total, 1), MOE_OK);
        const int64_t w = g * nw / total;
        for (int t = 0; t < T; t++) {
            assert_int_equal(in[t], (int32_t)ids[ntr + w * T + t]);
            assert_int_equal(tg[t], (int32_t)ids[ntr + w * T + t + 1]);
            pass_bytes += moe_data_id_bytes(ds)[tg[t]];
        }
    }
    assert_int_equal(moe_data_val_pass_bytes(ds, total), pass_bytes);
    moe_data_destroy(bd);
    moe_data_destroy(ds);
    unlink(bpath);
    unlink(path);
    free(same);
    free(ids);
    moe_tok_destroy(tok);
    free(text);
}

/* A vocabulary above 65536: 4 bytes per id in the file. */
static void test_token_windows_wide(void **state)
{
    (void)state;
    enum { NR = 70000, N = 5000, T = 16 };
    uint8_t *bytes = malloc(256 + 3 * (NR - 256));
    int64_t *off = malloc((NR + 1) * sizeof *off), len = 0;
    for (int64_t i = 0; i < NR; i++) {
        off[i] = len;
        if (i < 256) bytes[len++] = (uint8_t)i;
        else { /* distinct 3-byte strings */
            const int64_t k = i - 256;
            bytes[len++] = (uint8_t)(k & 255), bytes[len++] = (uint8_t)((k >> 8) & 255), bytes[len++] = (uint8_t)(k >> 16);
        }
    }
    off[NR] = len;
    moe_tok *tok = NULL;
    assert_int_equal(moe_tok_create(&tok, bytes, off, NR, NULL, 0, NULL, NULL), MOE_OK);
    uint32_t *ids = malloc(N * sizeof *ids);
    for (int i = 0; i < N; i++) ids[i] = (uint32_t)(NR * moe_rng_uniform_test(i));
    char path[64];
    tok_path(path, tok, ids, N);
    moe_data *ds = NULL;
    const moe_data_config dc = {.path = path, .val_path = path, .seq_len = T, .seed = 1, .tok = tok};
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_OK);
    assert_int_equal(moe_data_vocab_size(ds), NR);
    int32_t in[4 * T], tg[4 * T];
    assert_int_equal(moe_data_batch(ds, in, tg, 3, 0, 4), MOE_OK);
    for (int i = 0; i < 4; i++) {
        const int64_t o = moe_data_train_offset(ds, 3, i);
        for (int t = 0; t < T; t++) assert_int_equal(in[i * T + t], (int32_t)ids[o + t]);
    }
    assert_int_equal(moe_data_val_batch(ds, in, tg, 0, 1, 1), MOE_OK); /* the whole file as validation */
    for (int t = 0; t < T; t++) assert_int_equal(tg[t], (int32_t)ids[t + 1]);
    moe_data_destroy(ds);
    unlink(path);
    free(ids);
    free(off);
    free(bytes);
    moe_tok_destroy(tok);
}

/* Token data that does not fit: each refused naming the file. */
static void test_token_errors(void **state)
{
    (void)state;
    const size_t nb = 30000;
    uint8_t *text = synth(nb, 12, NULL);
    moe_tok *tok = train_tok(text, nb, 400), *other = train_tok(text, nb, 420);
    size_t n = 0;
    uint32_t *ids = encode(tok, text, nb, &n);
    char path[64], txt[64];
    tok_path(path, tok, ids, n);
    write_tmp(txt, text, nb);
    moe_data *ds = (moe_data *)(uintptr_t)1;
    moe_data_config dc = {.path = path, .val_frac = 0.05, .seq_len = 16, .seed = 1};
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_ARG); /* no tokenizer */
    assert_null(ds);
    assert_detail_has(path);
    assert_detail_has("tokenizer");
    dc.tok = other; /* encoded with another tokenizer */
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_MISMATCH);
    assert_detail_has(path);
    dc.tok = tok;
    dc.path = txt; /* bytes with a tokenizer */
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_ARG);
    assert_detail_has("moe data encode");
    dc.format = MOE_DATA_TOKENS; /* a text file read as tokens */
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_FORMAT);
    assert_detail_has(txt);
    dc.format = MOE_DATA_AUTO;
    dc.path = path;
    dc.val_path = txt; /* two kinds */
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_ARG);
    assert_detail_has("val_data");
    dc.val_path = NULL;
    dc.seq_len = (int)n; /* too short for a window */
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_ARG);
    assert_detail_has("held-out tail (val_frac=0.05 of");
    dc.val_frac = 0;
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_ARG);
    assert_detail_has("training tokens");
    dc.seq_len = 16;
    /* an id out of range: the reader names its position */
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    fseek(f, 64 + 2 * 100, SEEK_SET);
    const uint8_t big[2] = {0xff, 0xff};
    fwrite(big, 1, 2, f);
    fclose(f);
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_FORMAT);
    assert_detail_has("token 100");
    /* truncated */
    assert_int_equal(truncate(path, 64 + 2 * (off_t)n - 1), 0);
    assert_int_equal(moe_data_open_config(&ds, &dc), MOE_ERR_FORMAT);
    assert_detail_has("truncated");
    unlink(path);
    unlink(txt);
    free(ids);
    moe_tok_destroy(tok);
    moe_tok_destroy(other);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synth_deterministic),
        cmocka_unit_test(test_synth_domains),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_batches_rank_independent),
        cmocka_unit_test(test_train_val_disjoint),
        cmocka_unit_test(test_unigram),
        cmocka_unit_test(test_token_windows),
        cmocka_unit_test(test_token_windows_wide),
        cmocka_unit_test(test_token_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
