/* The batch loader: files mapped read-only, training windows drawn by a
 * counter-based generator keyed by the global sequence index (data.h),
 * validation windows on a fixed grid, and the unigram baseline. */
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

typedef struct {
    const uint8_t *p; /* (len) mapping, NULL if none */
    size_t len;
} mapping;

struct moe_data {
    mapping file[2];      /* training file, separate validation file */
    const uint8_t *train; /* (n_train) */
    const uint8_t *val;   /* (n_val), NULL without validation data */
    int64_t n_train, n_val;
    int seq_len;
    uint32_t seed;
    double unigram_bpb;
};

static moe_status map_file(mapping *m, const char *path)
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
            *m = (mapping){p, (size_t)sb.st_size};
    }
    close(fd);
    return st;
}

void moe_data_destroy(moe_data *ds)
{
    if (!ds) return;
    for (int i = 0; i < 2; i++)
        if (ds->file[i].p) munmap((void *)ds->file[i].p, ds->file[i].len);
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
    ds->seq_len = seq_len;
    ds->seed = seed;
    const int64_t need = (int64_t)seq_len + 1;
    moe_status st = map_file(&ds->file[0], path);
    if (st) goto fail;
    int64_t n = (int64_t)ds->file[0].len;
    ds->train = ds->file[0].p;
    ds->n_train = n;
    if (val_path && *val_path) {
        st = map_file(&ds->file[1], val_path);
        if (st) goto fail;
        ds->val = ds->file[1].p;
        ds->n_val = (int64_t)ds->file[1].len;
        if (ds->n_val < need) {
            st = moe_errorf(MOE_ERR_ARG, "validation file '%s' has %lld bytes, fewer than seq_len+1 = %lld", val_path,
                            (long long)ds->n_val, (long long)need);
            goto fail;
        }
    } else if (val_frac > 0) {
        ds->n_val = (int64_t)(val_frac * (double)n);
        ds->n_train = n - ds->n_val;
        ds->val = ds->train + ds->n_train;
        if (ds->n_val < need) {
            st = moe_errorf(MOE_ERR_ARG,
                            "'%s': the held-out tail (val_frac=%g of %lld bytes) has %lld bytes, fewer than "
                            "seq_len+1 = %lld (raise val_frac or give val_data)",
                            path, val_frac, (long long)n, (long long)ds->n_val, (long long)need);
            goto fail;
        }
    }
    if (ds->n_train < need) {
        st = moe_errorf(MOE_ERR_ARG, "data file '%s' has %lld training bytes%s, fewer than seq_len+1 = %lld", path,
                        (long long)ds->n_train, ds->n_train < n ? " after the held-out tail" : "",
                        (long long)need);
        goto fail;
    }
    ds->unigram_bpb = moe_data_bytes_entropy(ds->train, (size_t)ds->n_train);
    *out = ds;
    return MOE_OK;
fail:
    moe_data_destroy(ds);
    return st;
}

int moe_data_seq_len(const moe_data *ds) { return ds->seq_len; }
int64_t moe_data_train_bytes(const moe_data *ds) { return ds->n_train; }
int64_t moe_data_val_bytes(const moe_data *ds) { return ds->n_val; }
int64_t moe_data_val_windows(const moe_data *ds) { return ds->val ? (ds->n_val - 1) / ds->seq_len : 0; }
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

/* Window bytes [0, T) as ids to inputs and [1, T] to targets. */
static void put_window(int32_t *inputs, int32_t *targets, const uint8_t *w, int T)
{
    for (int i = 0; i < T; i++) {
        inputs[i] = w[i];
        targets[i] = w[i + 1];
    }
}

moe_status moe_data_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t step, int seq0,
                          int nseq)
{
    if (!ds || step < 0 || seq0 < 0 || nseq < 0 || (nseq > 0 && (!inputs || !targets)))
        return moe_errorf(MOE_ERR_ARG, "moe_data_batch: bad arguments (step=%lld, seq0=%d, nseq=%d)",
                          (long long)step, seq0, nseq);
    const int T = ds->seq_len;
    for (int i = 0; i < nseq; i++) {
        int64_t start = moe_data_train_offset(ds, step, (int64_t)seq0 + i);
        put_window(inputs + (size_t)i * T, targets + (size_t)i * T, ds->train + start, T);
    }
    return MOE_OK;
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
    const uint64_t n_windows = (uint64_t)moe_data_val_windows(ds);
    for (int i = 0; i < nseq; i++) {
        uint64_t w = (uint64_t)(((unsigned __int128)(uint64_t)(seq0 + i) * n_windows) / (uint64_t)n_total);
        put_window(inputs + (size_t)i * T, targets + (size_t)i * T, ds->val + w * (uint64_t)T, T);
    }
    return MOE_OK;
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
