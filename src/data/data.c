/* The batch loader: training windows drawn by a counter-based generator
 * keyed by the global sequence index (data.h), validation windows on a
 * fixed grid, the bytes each token stands for and the unigram baseline.
 *
 * Files are read with pread, window by window, never mapped: a file that
 * is truncated or rewritten while a run reads it then gives a short read
 * (a clear error) instead of SIGBUS, and each batch first checks that the
 * file is still the one opened (size, modification time, inode). A token
 * file's header is read and checked by the tokenizer module
 * (moe_tok_file_header_unpack / _check); its ids are then read at the
 * header's offset and each id read is checked against vocab_size. Ranks on
 * one node still share the page cache; a window costs one system call (a
 * microsecond), nothing next to a training step. */
#include "data/data.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/rng.h"
#include "tokenizer/tokfile.h"

typedef struct {
    int fd;           /* -1 if none */
    const char *role; /* how messages name it: "data file", "validation file (val_data)" */
    char path[1024];
    struct stat sb;   /* as opened: a change later is an error */
    int64_t data_off; /* byte offset of id 0: 0 for bytes, the header's size for a token file */
} data_file;

/* A part of a file: ids [off, off + n). */
typedef struct {
    data_file *f;
    int64_t off, n;
} part;

struct moe_data {
    data_file file[2];    /* training file, separate validation file */
    part train, val;      /* val.f NULL without validation data */
    int bpt;              /* bytes per id in the files: 1 (bytes), 2 or 4 (token files, little-endian) */
    int64_t V;            /* ids are < V */
    int32_t *id_bytes;    /* (V) bytes each id stands for */
    int64_t train_bytes, val_bytes;
    int seq_len;
    uint32_t seed;
    double unigram_bpt, unigram_bpb;
    /* ((seq_len + 1) * bpt) scratch for one window: written through a const
     * handle (the loader is used by one thread) */
    uint8_t *window;
};

/* The unigram statistics read every id of a part up to ENTROPY_FULL bytes;
 * above, ENTROPY_CHUNKS chunks spread evenly over it (a terabyte file is
 * not read whole just for a baseline). */
enum { ENTROPY_FULL = 64 << 20, ENTROPY_CHUNKS = 256, READ_CHUNK = 1 << 20 };

moe_data_format moe_data_format_of(moe_data_format f, const char *path)
{
    if (f != MOE_DATA_AUTO) return f;
    const size_t n = path ? strlen(path) : 0;
    return n >= 4 && !strcmp(path + n - 4, ".tok") ? MOE_DATA_TOKENS : MOE_DATA_BYTES;
}

/* Opens path for random reads. Non-blocking open, then fstat: a named pipe,
 * socket or device is refused without waiting for a writer. */
static moe_status open_file(data_file *f, const char *path, const char *role)
{
    f->role = role;
    snprintf(f->path, sizeof f->path, "%s", path);
    f->fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (f->fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open %s '%s': %s", role, path, strerror(errno));
    if (fstat(f->fd, &f->sb) != 0)
        return moe_errorf(MOE_ERR_IO, "cannot stat %s '%s': %s", role, path, strerror(errno));
    if (!S_ISREG(f->sb.st_mode))
        return moe_errorf(MOE_ERR_IO, "%s '%s' is not a regular file (a pipe, socket or device cannot be read at "
                                      "random positions)", role, path);
    if (f->sb.st_size == 0) return moe_errorf(MOE_ERR_ARG, "%s '%s' is empty", role, path);
    return MOE_OK;
}

/* The file is still the one opened: same inode, size and modification
 * time. One fstat per file and batch. */
static moe_status check_unchanged(const data_file *f)
{
    struct stat now;
    if (fstat(f->fd, &now) != 0) return moe_errorf(MOE_ERR_IO, "cannot stat %s '%s': %s", f->role, f->path, strerror(errno));
    if (now.st_size != f->sb.st_size || now.st_mtim.tv_sec != f->sb.st_mtim.tv_sec ||
        now.st_mtim.tv_nsec != f->sb.st_mtim.tv_nsec || now.st_ino != f->sb.st_ino)
        return moe_errorf(MOE_ERR_IO,
                          "%s '%s' changed while the run reads it (%lld bytes when opened, %lld now): a run's data "
                          "must stay as it was (copy it elsewhere before replacing it)",
                          f->role, f->path, (long long)f->sb.st_size, (long long)now.st_size);
    return MOE_OK;
}

/* n bytes at byte offset off of file f into buf. */
static moe_status pread_all(const data_file *f, uint8_t *buf, int64_t off, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(f->fd, buf + got, n - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) {
            /* A file cut after the last check ends early: report it as the
             * change it is, the same message whichever check sees it first. */
            moe_status st = check_unchanged(f);
            if (st != MOE_OK) return st;
        }
        if (r <= 0)
            return moe_errorf(MOE_ERR_IO, "cannot read %zu bytes at offset %lld of %s '%s': %s", n, (long long)off,
                              f->role, f->path, r < 0 ? strerror(errno) : "the file is shorter than when it was opened");
        got += (size_t)r;
    }
    return MOE_OK;
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

/* n ids from id `start` of part p as stored (n * bpt bytes) into buf. */
static moe_status read_words(const moe_data *ds, const part *p, uint8_t *buf, int64_t start, int64_t n)
{
    return pread_all(p->f, buf, p->f->data_off + (p->off + start) * ds->bpt, (size_t)(n * ds->bpt));
}

/* ids, read from id `start` of part p, are below V: an id >= V (a token
 * file damaged after encoding) is an error naming its position. */
static moe_status check_ids(const moe_data *ds, const part *p, const int32_t *ids, int64_t start, int64_t n)
{
    if (ds->bpt > 1)
        for (int64_t i = 0; i < n; i++)
            if ((uint32_t)ids[i] >= (uint64_t)ds->V)
                return moe_errorf(MOE_ERR_FORMAT, "%s %s: token %lld has id %u, not below vocab_size %lld",
                                  p->f->role, p->f->path, (long long)(p->off + start + i), (unsigned)ids[i],
                                  (long long)ds->V);
    return MOE_OK;
}

/* Ids [start, start + n) of part p as int32 into ids, through buf (n * bpt
 * bytes), checked. */
static moe_status read_ids(const moe_data *ds, const part *p, int32_t *ids, uint8_t *buf, int64_t start, int64_t n)
{
    moe_status st = read_words(ds, p, buf, start, n);
    if (st) return st;
    get_ids(ids, buf, ds->bpt, n);
    return check_ids(ds, p, ids, start, n);
}

/* Bytes the ids [start, start + n) of part p stand for, into *out. */
static moe_status span_bytes(const moe_data *ds, const part *p, int64_t start, int64_t n, int64_t *out)
{
    if (ds->bpt == 1) {
        *out = n;
        return MOE_OK;
    }
    int32_t ids[256];
    int64_t b = 0;
    for (int64_t o = 0; o < n; o += 256) {
        const int64_t k = n - o < 256 ? n - o : 256;
        moe_status st = read_ids(ds, p, ids, ds->window, start + o, k);
        if (st) return st;
        for (int64_t i = 0; i < k; i++) b += ds->id_bytes[ids[i]];
    }
    *out = b;
    return MOE_OK;
}

/* Unigram entropy (bits per token, if h) and the bytes of part p: every id
 * up to ENTROPY_FULL bytes of ids; above, from ENTROPY_CHUNKS chunks spread
 * evenly over the part (the bytes then an estimate: the sample's bytes per
 * token times the part's tokens; exact for byte data). */
static moe_status part_stats(const moe_data *ds, const part *p, double *h, int64_t *bytes)
{
    if (!h && ds->bpt == 1) { /* bytes stand for themselves: nothing to read */
        *bytes = p->n;
        return MOE_OK;
    }
    const int64_t full = ENTROPY_FULL / ds->bpt;
    const int64_t chunk = p->n <= full ? p->n : full / ENTROPY_CHUNKS;
    const int64_t n_chunks = p->n <= full ? 1 : ENTROPY_CHUNKS;
    const int64_t step = READ_CHUNK / 4; /* ids per read */
    uint64_t *count = h ? calloc((size_t)ds->V, sizeof *count) : NULL;
    uint8_t *buf = malloc((size_t)step * (size_t)ds->bpt);
    int32_t *ids = malloc((size_t)step * sizeof *ids);
    moe_status st = MOE_OK;
    if ((h && !count) || !buf || !ids) st = moe_errorf(MOE_ERR_NOMEM, "unigram statistics of '%s'", p->f->path);
    uint64_t total = 0;
    int64_t sample_bytes = 0;
    for (int64_t c = 0; !st && c < n_chunks; c++) {
        const int64_t start =
            n_chunks == 1 ? 0 : (int64_t)(((unsigned __int128)c * (uint64_t)(p->n - chunk)) / (uint64_t)(n_chunks - 1));
        for (int64_t o = 0; !st && o < chunk; o += step) {
            const int64_t k = chunk - o < step ? chunk - o : step;
            if ((st = read_ids(ds, p, ids, buf, start + o, k))) break;
            for (int64_t i = 0; i < k; i++) {
                if (count) count[ids[i]]++;
                sample_bytes += ds->id_bytes[ids[i]];
            }
            total += (uint64_t)k;
        }
    }
    if (!st && h) {
        double e = 0.0;
        for (int64_t v = 0; v < ds->V && total; v++)
            if (count[v]) {
                const double q = (double)count[v] / (double)total;
                e -= q * log2(q);
            }
        *h = e;
    }
    if (!st)
        *bytes = n_chunks == 1 || ds->bpt == 1 ? (n_chunks == 1 ? sample_bytes : p->n)
                                               : (int64_t)((double)sample_bytes / (double)total * (double)p->n);
    free(count);
    free(buf);
    free(ids);
    return st;
}

/* Opens one file as bytes or, with tok, as a token file checked against
 * tok (header through the tokenizer module). Sets *n to its number of ids,
 * *bpt and *V. */
static moe_status open_source(data_file *f, const char *path, const char *role, const moe_tok *tok, int64_t *n,
                              int *bpt, int64_t *V)
{
    moe_status st = open_file(f, path, role);
    if (st) return st;
    const uint64_t size = (uint64_t)f->sb.st_size;
    if (!tok) {
        f->data_off = 0;
        *n = (int64_t)size, *bpt = 1, *V = 256;
        return MOE_OK;
    }
    uint8_t raw[MOE_TOK_FILE_HEADER];
    moe_tok_file_header h = {.bytes_per_token = 1};
    if (size >= MOE_TOK_FILE_HEADER) {
        if ((st = pread_all(f, raw, 0, sizeof raw))) return st;
        if ((st = moe_tok_file_header_unpack(&h, raw, path))) return st;
    }
    if ((st = moe_tok_file_header_check(&h, size, tok, path))) return st; /* size, then tokenizer */
    if (h.n_tokens == 0) return moe_errorf(MOE_ERR_ARG, "token file '%s' holds no token", path);
    f->data_off = MOE_TOK_FILE_HEADER;
    *n = (int64_t)h.n_tokens, *bpt = (int)h.bytes_per_token, *V = (int64_t)h.vocab_size;
    return MOE_OK;
}

void moe_data_destroy(moe_data *ds)
{
    if (!ds) return;
    for (int i = 0; i < 2; i++)
        if (ds->file[i].fd >= 0) close(ds->file[i].fd);
    moe_free(ds->id_bytes);
    free(ds->window);
    free(ds);
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
    ds->file[0].fd = ds->file[1].fd = -1;
    ds->seq_len = c->seq_len;
    ds->seed = c->seed;
    const int64_t need = (int64_t)c->seq_len + 1;
    const char *unit = f == MOE_DATA_TOKENS ? "tokens" : "bytes";
    const moe_tok *tok = f == MOE_DATA_TOKENS ? c->tok : NULL;
    int64_t n = 0;
    moe_status st = open_source(&ds->file[0], c->path, "data file", tok, &n, &ds->bpt, &ds->V);
    if (st) goto fail;
    ds->train = (part){&ds->file[0], 0, n};
    if (vp) {
        int64_t n_val = 0, V_val = 0;
        int bpt_val = 0;
        st = open_source(&ds->file[1], vp, "validation file (val_data)", tok, &n_val, &bpt_val, &V_val);
        if (st) goto fail;
        ds->val = (part){&ds->file[1], 0, n_val};
        if (n_val < need) {
            st = moe_errorf(MOE_ERR_ARG, "validation file (val_data) '%s' has %lld %s, fewer than seq_len+1 = %lld",
                            vp, (long long)n_val, unit, (long long)need);
            goto fail;
        }
    } else if (c->val_frac > 0) {
        const int64_t n_val = (int64_t)(c->val_frac * (double)n);
        ds->train.n = n - n_val;
        ds->val = (part){&ds->file[0], ds->train.n, n_val};
        if (n_val < need) {
            st = moe_errorf(MOE_ERR_ARG,
                            "'%s': the held-out tail (val_frac=%g of %lld %s) has %lld %s, fewer than "
                            "seq_len+1 = %lld (raise val_frac, or give val_data, or set val_every = 0)",
                            c->path, c->val_frac, (long long)n, unit, (long long)n_val, unit, (long long)need);
            goto fail;
        }
    }
    if (ds->train.n < need) {
        st = moe_errorf(MOE_ERR_ARG, "data file '%s' has %lld training %s%s, fewer than seq_len+1 = %lld", c->path,
                        (long long)ds->train.n, unit, ds->train.n < n ? " after the held-out tail" : "",
                        (long long)need);
        goto fail;
    }
    /* span_bytes reads up to 256 ids through the window: room for both */
    const int64_t win = (need > 256 ? need : 256) * ds->bpt;
    if (!(ds->window = malloc((size_t)win))) {
        st = moe_errorf(MOE_ERR_NOMEM, "moe_data_open: window of %lld bytes", (long long)win);
        goto fail;
    }
    if ((st = moe_data_id_bytes_of(&ds->id_bytes, tok, ds->V))) goto fail;
    if ((st = part_stats(ds, &ds->train, &ds->unigram_bpt, &ds->train_bytes))) goto fail;
    if (ds->val.f && (st = part_stats(ds, &ds->val, NULL, &ds->val_bytes))) goto fail;
    ds->unigram_bpb = ds->bpt == 1 ? ds->unigram_bpt
                      : ds->train_bytes ? ds->unigram_bpt * (double)ds->train.n / (double)ds->train_bytes
                                        : 0.0;
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
int64_t moe_data_train_tokens(const moe_data *ds) { return ds->train.n; }
int64_t moe_data_val_tokens(const moe_data *ds) { return ds->val.f ? ds->val.n : 0; }
int64_t moe_data_train_bytes(const moe_data *ds) { return ds->train_bytes; }
int64_t moe_data_val_bytes(const moe_data *ds) { return ds->val.f ? ds->val_bytes : 0; }
const int32_t *moe_data_id_bytes(const moe_data *ds) { return ds->id_bytes; }
int64_t moe_data_val_windows(const moe_data *ds) { return ds->val.f ? (ds->val.n - 1) / ds->seq_len : 0; }
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
    uint64_t n_windows = (uint64_t)(ds->train.n - ds->seq_len);
    return (int64_t)(((unsigned __int128)r * n_windows) >> 64);
}

/* The window of T + 1 ids from id `start` of part p (one read): ids
 * [0, T) to inputs and [1, T] to targets. */
static moe_status put_window(const moe_data *ds, int32_t *inputs, int32_t *targets, const part *p, int64_t start)
{
    const int T = ds->seq_len;
    moe_status st = read_words(ds, p, ds->window, start, (int64_t)T + 1);
    if (st) return st;
    get_ids(inputs, ds->window, ds->bpt, T);
    get_ids(targets + T - 1, ds->window + (size_t)T * ds->bpt, ds->bpt, 1);
    if ((st = check_ids(ds, p, inputs, start, T)) || (st = check_ids(ds, p, targets + T - 1, start + T, 1))) return st;
    memcpy(targets, inputs + 1, (size_t)(T - 1) * sizeof(int32_t));
    return MOE_OK;
}

moe_status moe_data_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t step, int seq0,
                          int nseq)
{
    if (!ds || step < 0 || seq0 < 0 || nseq < 0 || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_batch: bad arguments (step=%lld, seq0=%d, nseq=%d)",
                          (long long)step, seq0, nseq);
    const int T = ds->seq_len;
    moe_status st = nseq > 0 ? check_unchanged(ds->train.f) : MOE_OK;
    for (int i = 0; !st && i < nseq; i++)
        st = put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, &ds->train,
                        moe_data_train_offset(ds, step, (int64_t)seq0 + i));
    return st;
}

int64_t moe_data_batch_bytes(const moe_data *ds, int64_t step, int seq0, int nseq)
{
    int64_t b = 0;
    for (int i = 0; i < nseq; i++) {
        int64_t w = 0;
        if (span_bytes(ds, &ds->train, moe_data_train_offset(ds, step, (int64_t)seq0 + i) + 1, ds->seq_len, &w))
            return -1;
        b += w;
    }
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
    if (!ds->val.f) return moe_errorf(MOE_ERR_ARG, "no validation data (set val_data or val_frac > 0)");
    if (seq0 < 0 || nseq < 0 || n_total < 1 || seq0 + nseq > n_total || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_val_batch: sequences [%lld, %lld) are not inside a pass of %lld",
                          (long long)seq0, (long long)(seq0 + nseq), (long long)n_total);
    const int T = ds->seq_len;
    moe_status st = nseq > 0 ? check_unchanged(ds->val.f) : MOE_OK;
    for (int i = 0; !st && i < nseq; i++)
        st = put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, &ds->val,
                        val_start(ds, seq0 + i, n_total));
    return st;
}

int64_t moe_data_val_pass_bytes(const moe_data *ds, int64_t n_total)
{
    if (!ds->val.f || n_total < 1) return 0;
    int64_t b = 0;
    for (int64_t g = 0; g < n_total; g++) {
        int64_t w = 0;
        if (span_bytes(ds, &ds->val, val_start(ds, g, n_total) + 1, ds->seq_len, &w)) return -1;
        b += w;
    }
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
    enum { CHUNK = 1 << 16 };
    int32_t *ids = malloc(CHUNK * sizeof *ids);
    uint8_t *buf = malloc((size_t)CHUNK * (size_t)ds->bpt);
    moe_status st = ids && buf ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "token counts of the training data");
    for (int64_t i0 = 0; st == MOE_OK && i0 < ds->train.n; i0 += CHUNK) {
        const int64_t n = ds->train.n - i0 < CHUNK ? ds->train.n - i0 : CHUNK;
        st = read_ids(ds, &ds->train, ids, buf, i0, n);
        for (int64_t i = 0; st == MOE_OK && i < n; i++) {
            if (ids[i] < 0 || ids[i] >= V)
                st = moe_errorf(MOE_ERR_ARG, "training data: token %d at %lld is outside the vocabulary of %d", ids[i],
                                (long long)(i0 + i), V);
            else
                counts[ids[i]]++;
        }
    }
    free(ids);
    free(buf);
    return st;
}
