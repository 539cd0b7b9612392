/* Fuzz harness: the single-process checkpoint and gradient-dump reader
 * (src/ckpt/ckpt_file.c), the path of `moe inspect` and of `moe inspect
 * --verify`: the input is a whole HDF5 file. moe_ckpt_file_open runs the
 * same checks the loaders do before HDF5 sees the file (regular file, the
 * global heaps whole: moe_h5_check_global_heaps), then the attributes, the
 * layout they give and the datasets the format expects; then every dataset
 * is read (type and shape checked before any allocation, Fletcher32, the
 * value rules) and the /tokenizer is built. No MPI.
 * Properties: any input opens or is refused with a detail naming the file;
 * an opened file's attributes are in range (format, format_version 1 or 2,
 * step >= 0); every dataset either reads (the element count its shape
 * gives, finite values) or fails with a detail naming the file or the
 * dataset; a tokenizer that builds has at least the 256 bytes.
 * Inputs over 256 KB are skipped (the seeds are a few tens of KB), and so
 * are reads of datasets over 2^20 elements: a small file may declare a
 * large dataset HDF5 fills with its fill value, and reading that whole is
 * the reader's documented behaviour (up to its own limit), not a finding. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt_file.h"
#include "fuzz.h"
#include "tokenizer/tokenizer.h"

enum { MAX_INPUT = 256 << 10, MAX_READ = 1 << 20 };

/* The detail of a refused read names the file or the dataset. */
static int names(const char *path, const char *dset)
{
    const char *d = moe_error_detail();
    return strstr(d, path) != NULL || strstr(d, dset) != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > MAX_INPUT) return 0;
    const char *path = fuzz_scratch(data, size, ".h5");
    moe_ckpt_file *f = NULL;
    moe_error_clear();
    moe_status st = moe_ckpt_file_open(&f, path);
    if (st != MOE_OK) {
        FUZZ_CHECK_REJECT(st, path);
        unlink(path);
        return 0;
    }
    const moe_ckpt_info *in = moe_ckpt_file_info(f);
    FUZZ_CHECK(in->format_version == 1 || in->format_version == 2, "format_version %lld", (long long)in->format_version);
    FUZZ_CHECK(!strcmp(in->format, in->gradients ? "moe-gradients" : "moe-checkpoint"), "format '%s'", in->format);
    FUZZ_CHECK(in->step >= 0 && moe_ckpt_file_layout(f) != NULL, "step %lld", (long long)in->step);
    FUZZ_CHECK(!in->gradients || !in->has_tokenizer, "a gradient dump with a tokenizer");

    for (int i = 0; i < moe_ckpt_file_n_dsets(f); i++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(f, i);
        FUZZ_CHECK(d->expected || d->present, "dataset '%s' neither expected nor present", d->path);
        FUZZ_CHECK(d->ndim >= 0 && d->ndim <= MOE_TENSOR_MAX_DIMS, "dataset '%s' of %d dims", d->path, d->ndim);
        int64_t want = 1;
        int big = 0;
        for (int k = 0; k < d->ndim; k++) {
            FUZZ_CHECK(d->dims[k] >= 0, "dataset '%s' dim %d is %lld", d->path, k, (long long)d->dims[k]);
            if (d->dims[k] > 0 && want > MAX_READ / d->dims[k]) big = 1;
            else want *= d->dims[k];
        }
        if (big || !d->present) continue;
        /* (only for datasets the file has: a model of 4096 layers expects
         * 10^5 of them, and a search is linear) */
        FUZZ_CHECK(moe_ckpt_file_find(f, d->path) >= 0, "dataset '%s' not found by its own path", d->path);
        double *buf = NULL;
        int64_t n = -1;
        moe_error_clear();
        st = moe_ckpt_file_read(f, i, &buf, &n);
        if (st != MOE_OK) {
            FUZZ_CHECK(buf == NULL && names(path, d->path), "read of '%s' failed (%d) without naming it", d->path,
                       (int)st);
            continue;
        }
        /* a string dataset reads as its bytes: a multiple of the count */
        FUZZ_CHECK(d->dtype == MOE_CKPT_STR ? (want == 0 ? n == 0 : n >= want && n % want == 0) : n == want,
                   "dataset '%s' read %lld elements, its shape gives %lld", d->path, (long long)n, (long long)want);
        if (d->expected)
            for (int64_t k = 0; k < n; k++)
                FUZZ_CHECK(isfinite(buf[k]), "dataset '%s' element %lld is %g after the value checks", d->path,
                           (long long)k, buf[k]);
        moe_free(buf);
    }

    moe_tok *tok = NULL;
    moe_error_clear();
    st = moe_ckpt_file_tokenizer(f, &tok);
    if (st != MOE_OK) {
        FUZZ_CHECK(tok == NULL, "a failed tokenizer read returned one");
        FUZZ_CHECK_REJECT(st, path);
    } else {
        FUZZ_CHECK(!tok == !in->has_tokenizer, "tokenizer %p for has_tokenizer %d", (void *)tok, in->has_tokenizer);
        if (tok) FUZZ_CHECK(moe_tok_vocab_size(tok) >= 256, "vocab_size %lld", (long long)moe_tok_vocab_size(tok));
        moe_tok_destroy(tok);
    }
    moe_ckpt_file_close(f);
    unlink(path);
    return 0;
}
