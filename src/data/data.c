/* The batch loader: training windows drawn by a counter-based generator
 * keyed by the global sequence index (data.h), validation windows on a
 * fixed grid, and the unigram baseline.
 *
 * Files are read with pread, window by window, not mapped: a file that is
 * truncated or rewritten while a run reads it then gives a short read (a
 * clear error) instead of SIGBUS, and each batch first checks that the
 * file is still the one opened (size, modification time, inode). Ranks on
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

typedef struct {
    int fd;           /* -1 if none */
    const char *role; /* how messages name it: "data file", "validation file (val_data)" */
    char path[1024];
    struct stat sb;   /* as opened: a change later is an error */
} data_file;

/* A part of a file: bytes [off, off + n). */
typedef struct {
    data_file *f;
    int64_t off, n;
} part;

struct moe_data {
    data_file file[2];    /* training file, separate validation file */
    part train, val;      /* val.f NULL without validation data */
    int seq_len;
    uint32_t seed;
    double unigram_bpb;
    uint8_t *window;      /* (seq_len + 1) scratch */
};

enum { ENTROPY_FULL = 64 << 20, ENTROPY_CHUNKS = 256 };

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

/* n bytes at offset off of part p into buf. */
static moe_status read_at(const part *p, uint8_t *buf, int64_t off, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(p->f->fd, buf + got, n - got, (off_t)(p->off + off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return moe_errorf(MOE_ERR_IO, "cannot read %zu bytes at offset %lld of %s '%s': %s", n,
                              (long long)(p->off + off), p->f->role, p->f->path,
                              r < 0 ? strerror(errno) : "the file is shorter than when it was opened");
        got += (size_t)r;
    }
    return MOE_OK;
}

/* Unigram entropy of part p: every byte up to ENTROPY_FULL bytes; above,
 * an estimate from ENTROPY_CHUNKS chunks spread evenly over the part (a
 * terabyte file is not read whole just for a baseline). */
static moe_status part_entropy(const part *p, double *out)
{
    uint64_t count[256] = {0};
    const int64_t chunk = p->n <= ENTROPY_FULL ? p->n : ENTROPY_FULL / ENTROPY_CHUNKS;
    const int64_t n_chunks = p->n <= ENTROPY_FULL ? 1 : ENTROPY_CHUNKS;
    uint8_t *buf = malloc((size_t)(chunk < (1 << 20) ? chunk : (1 << 20)));
    if (!buf) return moe_errorf(MOE_ERR_NOMEM, "unigram statistics of '%s'", p->f->path);
    moe_status st = MOE_OK;
    uint64_t total = 0;
    for (int64_t c = 0; !st && c < n_chunks; c++) {
        const int64_t start = n_chunks == 1 ? 0 : (int64_t)(((unsigned __int128)c * (uint64_t)(p->n - chunk)) / (uint64_t)(n_chunks - 1));
        for (int64_t o = 0; !st && o < chunk; o += 1 << 20) {
            const size_t k = (size_t)(chunk - o < (1 << 20) ? chunk - o : (1 << 20));
            st = read_at(p, buf, start + o, k);
            for (size_t i = 0; !st && i < k; i++) count[buf[i]]++;
            total += k;
        }
    }
    free(buf);
    double h = 0.0;
    for (int b = 0; b < 256 && total; b++)
        if (count[b]) {
            const double q = (double)count[b] / (double)total;
            h -= q * log2(q);
        }
    *out = h;
    return st;
}

void moe_data_destroy(moe_data *ds)
{
    if (!ds) return;
    for (int i = 0; i < 2; i++)
        if (ds->file[i].fd >= 0) close(ds->file[i].fd);
    free(ds->window);
    free(ds);
}

moe_status moe_data_open(moe_data **out, const char *path, const char *val_path, double val_frac, int seq_len,
                         uint32_t seed)
{
    if (!out || !path || !*path) return moe_errorf(MOE_ERR_ARG, "moe_data_open: no data file given");
    *out = NULL;
    if (seq_len < 1) return moe_errorf(MOE_ERR_ARG, "seq_len=%d < 1", seq_len);
    if (!(val_frac >= 0 && val_frac < 1)) return moe_errorf(MOE_ERR_ARG, "val_frac=%g is not in [0, 1)", val_frac);
    moe_data *ds = calloc(1, sizeof *ds);
    if (!ds) return moe_errorf(MOE_ERR_NOMEM, "moe_data_open: out of memory");
    ds->file[0].fd = ds->file[1].fd = -1;
    ds->seq_len = seq_len;
    ds->seed = seed;
    const int64_t need = (int64_t)seq_len + 1;
    moe_status st = open_file(&ds->file[0], path, "data file");
    if (st) goto fail;
    int64_t n = (int64_t)ds->file[0].sb.st_size;
    ds->train = (part){&ds->file[0], 0, n};
    if (val_path && *val_path) {
        st = open_file(&ds->file[1], val_path, "validation file (val_data)");
        if (st) goto fail;
        ds->val = (part){&ds->file[1], 0, (int64_t)ds->file[1].sb.st_size};
        if (ds->val.n < need) {
            st = moe_errorf(MOE_ERR_ARG, "validation file (val_data) '%s' has %lld bytes, fewer than seq_len+1 = %lld",
                            val_path, (long long)ds->val.n, (long long)need);
            goto fail;
        }
    } else if (val_frac > 0) {
        const int64_t n_val = (int64_t)(val_frac * (double)n);
        ds->train.n = n - n_val;
        ds->val = (part){&ds->file[0], ds->train.n, n_val};
        if (n_val < need) {
            st = moe_errorf(MOE_ERR_ARG,
                            "'%s': the held-out tail (val_frac=%g of %lld bytes) has %lld bytes, fewer than "
                            "seq_len+1 = %lld (raise val_frac, or give val_data, or set val_every = 0)",
                            path, val_frac, (long long)n, (long long)n_val, (long long)need);
            goto fail;
        }
    }
    if (ds->train.n < need) {
        st = moe_errorf(MOE_ERR_ARG, "data file '%s' has %lld training bytes%s, fewer than seq_len+1 = %lld", path,
                        (long long)ds->train.n, ds->train.n < n ? " after the held-out tail" : "",
                        (long long)need);
        goto fail;
    }
    if (!(ds->window = malloc((size_t)need))) {
        st = moe_errorf(MOE_ERR_NOMEM, "moe_data_open: window of %lld bytes", (long long)need);
        goto fail;
    }
    if ((st = part_entropy(&ds->train, &ds->unigram_bpb))) goto fail;
    *out = ds;
    return MOE_OK;
fail:
    moe_data_destroy(ds);
    return st;
}

int moe_data_seq_len(const moe_data *ds) { return ds->seq_len; }
int64_t moe_data_train_bytes(const moe_data *ds) { return ds->train.n; }
int64_t moe_data_val_bytes(const moe_data *ds) { return ds->val.f ? ds->val.n : 0; }
int64_t moe_data_val_windows(const moe_data *ds) { return ds->val.f ? (ds->val.n - 1) / ds->seq_len : 0; }
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

/* The window of T + 1 bytes at offset off of part p: bytes [0, T) as ids
 * to inputs and [1, T] to targets. */
static moe_status put_window(moe_data *ds, int32_t *inputs, int32_t *targets, const part *p, int64_t off)
{
    const int T = ds->seq_len;
    moe_status st = read_at(p, ds->window, off, (size_t)T + 1);
    if (st) return st;
    for (int i = 0; i < T; i++) {
        inputs[i] = ds->window[i];
        targets[i] = ds->window[i + 1];
    }
    return MOE_OK;
}

moe_status moe_data_batch(moe_data *ds, int32_t *inputs, int32_t *targets, int64_t step, int seq0, int nseq)
{
    if (!ds || step < 0 || seq0 < 0 || nseq < 0 || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_batch: bad arguments (step=%lld, seq0=%d, nseq=%d)",
                          (long long)step, seq0, nseq);
    const int T = ds->seq_len;
    moe_status st = nseq > 0 ? check_unchanged(ds->train.f) : MOE_OK;
    for (int i = 0; !st && i < nseq; i++) {
        int64_t start = moe_data_train_offset(ds, step, (int64_t)seq0 + i);
        st = put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, &ds->train, start);
    }
    return st;
}

moe_status moe_data_val_batch(moe_data *ds, int32_t *inputs, int32_t *targets, int64_t seq0, int64_t n_total,
                              int nseq)
{
    if (!ds) return moe_errorf(MOE_ERR_ARG, "moe_data_val_batch: NULL data set");
    if (!ds->val.f) return moe_errorf(MOE_ERR_ARG, "no validation data (set val_data or val_frac > 0)");
    if (seq0 < 0 || nseq < 0 || n_total < 1 || seq0 + nseq > n_total || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_val_batch: sequences [%lld, %lld) are not inside a pass of %lld",
                          (long long)seq0, (long long)(seq0 + nseq), (long long)n_total);
    const int T = ds->seq_len;
    const uint64_t n_windows = (uint64_t)moe_data_val_windows(ds);
    moe_status st = nseq > 0 ? check_unchanged(ds->val.f) : MOE_OK;
    for (int i = 0; !st && i < nseq; i++) {
        uint64_t w = (uint64_t)(((unsigned __int128)(uint64_t)(seq0 + i) * n_windows) / (uint64_t)n_total);
        st = put_window(ds, inputs + (size_t)i * T, targets + (size_t)i * T, &ds->val, (int64_t)(w * (uint64_t)T));
    }
    return st;
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
