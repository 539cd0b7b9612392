/* The batch loader: files mapped read-only (bytes directly, token files
 * through the tokenizer module's validating reader), training windows drawn
 * by a counter-based generator keyed by the global sequence index
 * (data.h), validation windows on a fixed grid, the bytes each token stands
 * for and the unigram baseline. */
#include "data/data.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/rng.h"
#include "tokenizer/tokfile.h"

typedef struct {
    const uint8_t *p; /* (len) mapping of a byte file, NULL if none */
    size_t len;
    moe_tok_file *tf; /* a token file, NULL if none */
} source;

struct moe_data {
    source file[2];       /* training file, separate validation file */
    int bpt;              /* bytes per id in the files: 1 (bytes), 2 or 4 (token files, little-endian) */
    const uint8_t *train; /* (n_train ids of bpt bytes) */
    const uint8_t *val;   /* (n_val ids), NULL without validation data */
    int64_t n_train, n_val;
    int64_t V;            /* ids are < V */
    int32_t *id_bytes;    /* (V) bytes each id stands for */
    int64_t train_bytes, val_bytes;
    int seq_len;
    uint32_t seed;
    double unigram_bpt, unigram_bpb;
};

moe_data_format moe_data_format_of(moe_data_format f, const char *path)
{
    if (f != MOE_DATA_AUTO) return f;
    const size_t n = path ? strlen(path) : 0;
    return n >= 4 && !strcmp(path + n - 4, ".tok") ? MOE_DATA_TOKENS : MOE_DATA_BYTES;
}

static moe_status map_file(source *m, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open data file '%s': %s", path, strerror(errno));
    struct stat sb;
    moe_status st = MOE_OK;
    if (fstat(fd, &sb) != 0)
        st = moe_errorf(MOE_ERR_IO, "cannot stat data file '%s': %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = moe_errorf(MOE_ERR_IO, "data file '%s' is not a regular file", path);
    else if (sb.st_size == 0)
        st = moe_errorf(MOE_ERR_ARG, "data file '%s' is empty", path);
    if (!st) {
        void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED)
            st = moe_errorf(MOE_ERR_IO, "cannot map data file '%s': %s", path, strerror(errno));
        else
            m->p = p, m->len = (size_t)sb.st_size;
    }
    close(fd);
    return st;
}

/* A token file checked against tok: its ids as bpt-byte little-endian words. */
static moe_status open_tokens(source *m, const char *path, const moe_tok *tok)
{
    moe_status st = moe_tok_file_open(&m->tf, path, tok);
    if (st) return st;
    if (moe_tok_file_n_tokens(m->tf) == 0) return moe_errorf(MOE_ERR_ARG, "token file '%s' holds no token", path);
    m->p = moe_tok_file_ids(m->tf);
    m->len = (size_t)moe_tok_file_n_tokens(m->tf);
    return MOE_OK;
}

void moe_data_destroy(moe_data *ds)
{
    if (!ds) return;
    for (int i = 0; i < 2; i++) {
        if (ds->file[i].tf) moe_tok_file_close(ds->file[i].tf);
        else if (ds->file[i].p) munmap((void *)ds->file[i].p, ds->file[i].len);
    }
    moe_free(ds->id_bytes);
    free(ds);
}

/* ids[i] = id i of the words at p (n ids of bpt bytes). */
static void get_ids(int32_t *ids, const uint8_t *p, int bpt, int64_t n)
{
    if (bpt == 1)
        for (int64_t i = 0; i < n; i++) ids[i] = p[i];
    else if (bpt == 2)
        for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)((uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8);
    else
        for (int64_t i = 0; i < n; i++)
            ids[i] = (int32_t)((uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 |
                               (uint32_t)p[4 * i + 3] << 24);
}

static inline int32_t id_at(const moe_data *ds, const uint8_t *base, int64_t i)
{
    int32_t id;
    get_ids(&id, base + (size_t)i * ds->bpt, ds->bpt, 1);
    return id;
}

/* Bytes the ids [i0, i0 + n) of base stand for. */
static int64_t span_bytes(const moe_data *ds, const uint8_t *base, int64_t i0, int64_t n)
{
    if (ds->bpt == 1) return n;
    int64_t b = 0;
    for (int64_t i = i0; i < i0 + n; i++) b += ds->id_bytes[id_at(ds, base, i)];
    return b;
}

/* Unigram entropy (bits per token) of the training ids. */
static double ids_entropy(const moe_data *ds)
{
    int64_t *count = moe_calloc((size_t)ds->V, sizeof(int64_t));
    if (!count) return NAN;
    for (int64_t i = 0; i < ds->n_train; i++) count[id_at(ds, ds->train, i)]++;
    double h = 0.0;
    for (int64_t v = 0; v < ds->V; v++)
        if (count[v]) {
            const double q = (double)count[v] / (double)ds->n_train;
            h -= q * log2(q);
        }
    moe_free(count);
    return h;
}

moe_status moe_data_open_config(moe_data **out, const moe_data_config *c)
{
    if (!out || !c || !c->path || !*c->path) return moe_errorf(MOE_ERR_ARG, "moe_data_open: no data file given");
    *out = NULL;
    if (c->seq_len < 1) return moe_errorf(MOE_ERR_ARG, "seq_len=%d < 1", c->seq_len);
    if (!(c->val_frac >= 0 && c->val_frac < 1))
        return moe_errorf(MOE_ERR_ARG, "val_frac=%g is not in [0, 1)", c->val_frac);
    const char *vp = c->val_path && *c->val_path ? c->val_path : NULL;
    const moe_data_format f = moe_data_format_of(c->format, c->path);
    if (vp && moe_data_format_of(c->format, vp) != f)
        return moe_errorf(MOE_ERR_ARG,
                          "data '%s' is read as %s but val_data '%s' as %s: give both as token files of one "
                          "tokenizer (moe data encode) or both as bytes",
                          c->path, f == MOE_DATA_TOKENS ? "tokens" : "bytes", vp,
                          f == MOE_DATA_TOKENS ? "bytes" : "tokens");
    if (f == MOE_DATA_TOKENS && !c->tok)
        return moe_errorf(MOE_ERR_ARG, "data '%s' is a token file: it needs the tokenizer it was encoded with",
                          c->path);
    if (f == MOE_DATA_BYTES && c->tok)
        return moe_errorf(MOE_ERR_ARG,
                          "data '%s' is read as bytes, but a tokenizer is given: encode the text into a token "
                          "file first ('moe data encode --tokenizer T --data %s --out F.tok')",
                          c->path, c->path);
    moe_data *ds = calloc(1, sizeof *ds);
    if (!ds) return moe_errorf(MOE_ERR_NOMEM, "moe_data_open: out of memory");
    ds->seq_len = c->seq_len;
    ds->seed = c->seed;
    const int64_t need = (int64_t)c->seq_len + 1;
    const char *unit = f == MOE_DATA_TOKENS ? "tokens" : "bytes";
    moe_status st = f == MOE_DATA_TOKENS ? open_tokens(&ds->file[0], c->path, c->tok) : map_file(&ds->file[0], c->path);
    if (st) goto fail;
    ds->bpt = f == MOE_DATA_TOKENS ? moe_tok_file_bytes_per_token(ds->file[0].tf) : 1;
    ds->V = f == MOE_DATA_TOKENS ? (int64_t)moe_tok_file_vocab_size(ds->file[0].tf) : 256;
    int64_t n = (int64_t)ds->file[0].len;
    ds->train = ds->file[0].p;
    ds->n_train = n;
    if (vp) {
        st = f == MOE_DATA_TOKENS ? open_tokens(&ds->file[1], vp, c->tok) : map_file(&ds->file[1], vp);
        if (st) goto fail;
        ds->val = ds->file[1].p;
        ds->n_val = (int64_t)ds->file[1].len;
        if (ds->n_val < need) {
            st = moe_errorf(MOE_ERR_ARG, "validation file '%s' has %lld %s, fewer than seq_len+1 = %lld", vp,
                            (long long)ds->n_val, unit, (long long)need);
            goto fail;
        }
    } else if (c->val_frac > 0) {
        ds->n_val = (int64_t)(c->val_frac * (double)n);
        ds->n_train = n - ds->n_val;
        ds->val = ds->train + (size_t)ds->n_train * ds->bpt;
        if (ds->n_val < need) {
            st = moe_errorf(MOE_ERR_ARG,
                            "'%s': the held-out tail (val_frac=%g of %lld %s) has %lld %s, fewer than "
                            "seq_len+1 = %lld (raise val_frac or give val_data)",
                            c->path, c->val_frac, (long long)n, unit, (long long)ds->n_val, unit, (long long)need);
            goto fail;
        }
    }
    if (ds->n_train < need) {
        st = moe_errorf(MOE_ERR_ARG, "data file '%s' has %lld training %s%s, fewer than seq_len+1 = %lld", c->path,
                        (long long)ds->n_train, unit, ds->n_train < n ? " after the held-out tail" : "",
                        (long long)need);
        goto fail;
    }
    if ((st = moe_data_id_bytes_of(&ds->id_bytes, c->tok, ds->V))) goto fail;
    ds->train_bytes = span_bytes(ds, ds->train, 0, ds->n_train);
    ds->val_bytes = ds->val ? span_bytes(ds, ds->val, 0, ds->n_val) : 0;
    if (ds->bpt == 1) {
        ds->unigram_bpt = ds->unigram_bpb = moe_data_bytes_entropy(ds->train, (size_t)ds->n_train);
    } else {
        ds->unigram_bpt = ids_entropy(ds);
        ds->unigram_bpb = ds->train_bytes ? ds->unigram_bpt * (double)ds->n_train / (double)ds->train_bytes : 0.0;
    }
    *out = ds;
    return MOE_OK;
fail:
    moe_data_destroy(ds);
    return st;
}

moe_status moe_data_id_bytes_of(int32_t **out, const moe_tok *tok, int64_t V)
{
    if (!(*out = moe_calloc((size_t)V, sizeof(int32_t))))
        return moe_errorf(MOE_ERR_NOMEM, "bytes per id of a vocabulary of %lld", (long long)V);
    for (int64_t v = 0; v < V; v++) {
        size_t len = 1;
        if (tok && !moe_tok_token(tok, v, &len)) len = 0; /* a hole: never in a valid file */
        (*out)[v] = (int32_t)len;
    }
    return MOE_OK;
}

moe_status moe_data_open(moe_data **out, const char *path, const char *val_path, double val_frac, int seq_len,
                         uint32_t seed)
{
    const moe_data_config c = {.path = path, .val_path = val_path, .val_frac = val_frac, .seq_len = seq_len,
                               .seed = seed, .format = MOE_DATA_BYTES};
    return moe_data_open_config(out, &c);
}

int moe_data_seq_len(const moe_data *ds) { return ds->seq_len; }
int moe_data_is_tokens(const moe_data *ds) { return ds->bpt > 1; }
int64_t moe_data_vocab_size(const moe_data *ds) { return ds->V; }
int64_t moe_data_train_tokens(const moe_data *ds) { return ds->n_train; }
int64_t moe_data_val_tokens(const moe_data *ds) { return ds->n_val; }
int64_t moe_data_train_bytes(const moe_data *ds) { return ds->train_bytes; }
int64_t moe_data_val_bytes(const moe_data *ds) { return ds->val_bytes; }
const int32_t *moe_data_id_bytes(const moe_data *ds) { return ds->id_bytes; }
int64_t moe_data_val_windows(const moe_data *ds) { return ds->val ? (ds->n_val - 1) / ds->seq_len : 0; }
double moe_data_unigram_bpt(const moe_data *ds) { return ds->unigram_bpt; }
double moe_data_unigram_bpb(const moe_data *ds) { return ds->unigram_bpb; }

int64_t moe_data_train_offset(const moe_data *ds, int64_t step, int64_t g)
{
    const uint32_t ctr[4] = {(uint32_t)g, (uint32_t)step, (uint32_t)((uint64_t)step >> 32), MOE_DATA_CTR_TRAIN};
    const uint32_t key[2] = {ds->seed, MOE_RNG_DATA};
    uint32_t w[4];
    moe_philox(w, ctr, key);
    /* 64 random bits scaled to [0, n_windows): unbiased to 2^-64 for any file size. */
    uint64_t r = ((uint64_t)w[0] << 32) | w[1];
    uint64_t n_windows = (uint64_t)(ds->n_train - ds->seq_len);
    return (int64_t)(((unsigned __int128)r * n_windows) >> 64);
}

/* Window ids [0, T) of base from token `start` to inputs and [1, T] to targets. */
static void put_window(const moe_data *ds, int32_t *inputs, int32_t *targets, const uint8_t *base, int64_t start)
{
    const int T = ds->seq_len;
    get_ids(inputs, base + (size_t)start * ds->bpt, ds->bpt, T);
    memcpy(targets, inputs + 1, (size_t)(T - 1) * sizeof(int32_t));
    targets[T - 1] = id_at(ds, base, start + T);
}

moe_status moe_data_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t step, int seq0,
                          int nseq)
{
    if (!ds || step < 0 || seq0 < 0 || nseq < 0 || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_batch: bad arguments (step=%lld, seq0=%d, nseq=%d)",
                          (long long)step, seq0, nseq);
    const int T = ds->seq_len;
    for (int i = 0; i < nseq; i++)
        put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, ds->train,
                   moe_data_train_offset(ds, step, (int64_t)seq0 + i));
    return MOE_OK;
}

int64_t moe_data_batch_bytes(const moe_data *ds, int64_t step, int seq0, int nseq)
{
    int64_t b = 0;
    for (int i = 0; i < nseq; i++)
        b += span_bytes(ds, ds->train, moe_data_train_offset(ds, step, (int64_t)seq0 + i) + 1, ds->seq_len);
    return b;
}

/* Start of the window of sequence g of a validation pass of n_total. */
static int64_t val_start(const moe_data *ds, int64_t g, int64_t n_total)
{
    const uint64_t n_windows = (uint64_t)moe_data_val_windows(ds);
    return (int64_t)(((unsigned __int128)(uint64_t)g * n_windows) / (uint64_t)n_total) * ds->seq_len;
}

moe_status moe_data_val_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t seq0,
                              int64_t n_total, int nseq)
{
    if (!ds) return moe_errorf(MOE_ERR_ARG, "moe_data_val_batch: NULL data set");
    if (!ds->val) return moe_errorf(MOE_ERR_ARG, "no validation data (set val_data or val_frac > 0)");
    if (seq0 < 0 || nseq < 0 || n_total < 1 || seq0 + nseq > n_total || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_val_batch: sequences [%lld, %lld) are not inside a pass of %lld",
                          (long long)seq0, (long long)(seq0 + nseq), (long long)n_total);
    const int T = ds->seq_len;
    for (int i = 0; i < nseq; i++)
        put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, ds->val, val_start(ds, seq0 + i, n_total));
    return MOE_OK;
}

int64_t moe_data_val_pass_bytes(const moe_data *ds, int64_t n_total)
{
    if (!ds->val || n_total < 1) return 0;
    int64_t b = 0;
    for (int64_t g = 0; g < n_total; g++) b += span_bytes(ds, ds->val, val_start(ds, g, n_total) + 1, ds->seq_len);
    return b;
}

double moe_data_bytes_entropy(const uint8_t *p, size_t n)
{
    if (!n) return 0.0;
    uint64_t count[256] = {0};
    for (size_t i = 0; i < n; i++) count[p[i]]++;
    double h = 0.0;
    for (int b = 0; b < 256; b++)
        if (count[b]) {
            double q = (double)count[b] / (double)n;
            h -= q * log2(q);
        }
    return h;
}

moe_status moe_data_write_file(const char *path, const void *buf, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return moe_errorf(MOE_ERR_IO, "cannot create '%s': %s", path, strerror(errno));
    size_t w = fwrite(buf, 1, n, f);
    int err = w != n ? errno : 0;
    if (fclose(f) != 0 && !err) err = errno ? errno : EIO;
    if (w != n || err) return moe_errorf(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(err ? err : EIO));
    return MOE_OK;
}

moe_status moe_data_train_counts(const moe_data *ds, int64_t *counts, int V)
{
    memset(counts, 0, (size_t)V * sizeof *counts);
    for (int64_t i = 0; i < ds->n_train; i++) {
        const int32_t id = id_at(ds, ds->train, i);
        if (id < 0 || id >= V)
            return moe_errorf(MOE_ERR_ARG, "training data: token %d at %lld is outside the vocabulary of %d", id,
                              (long long)i, V);
        counts[id]++;
    }
    return MOE_OK;
}
