/* Fuzz harness: the training-data loader on byte data (src/data/data.c),
 * as `moe train` opens data / val_data read as bytes. Token files have
 * their own harness (fuzz_tokfile.c: the reader the loader calls).
 * Input: 4 bytes of options, then the data. Byte 0: seq_len = 1 + b0 % 32;
 * byte 1: even: the held-out tail val_frac = (b1 / 2) / 128; odd: a
 * validation file, the last b2 * size / 256 bytes of the data (the rest is
 * the training file); byte 3: the seed.
 * Properties: the data opens or is refused (I/O, argument or format
 * status) with a detail naming a file; data that opens has the parts the
 * options give (sizes, 256 ids of one byte each), every training and
 * validation window is the file's bytes at the offset the loader reports,
 * inside its part, and the token counts and unigram entropy are those of
 * the training bytes. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data/data.h"
#include "fuzz.h"

enum { MAX_DATA = 1 << 16, ROWS = 3 };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4 || size > MAX_DATA) return 0;
    const int seq_len = 1 + data[0] % 32, own_val = data[1] & 1;
    const double val_frac = own_val ? 0 : (data[1] >> 1) / 128.0;
    const uint32_t seed = data[3];
    const uint8_t *bytes = data + 4;
    const size_t n = size - 4, n_val_file = own_val ? (size_t)data[2] * n / 256 : 0, n_train_file = n - n_val_file;

    char train_path[256], val_path[256];
    snprintf(train_path, sizeof train_path, "%s", fuzz_scratch(bytes, n_train_file, ".txt"));
    if (own_val) snprintf(val_path, sizeof val_path, "%s", fuzz_scratch(bytes + n_train_file, n_val_file, ".val.txt"));
    const moe_data_config c = {.path = train_path, .val_path = own_val ? val_path : NULL, .val_frac = val_frac,
                               .seq_len = seq_len, .seed = seed, .format = MOE_DATA_AUTO, .tok = NULL};
    moe_data *ds = NULL;
    moe_error_clear();
    moe_status st = moe_data_open_config(&ds, &c);
    unlink(train_path);
    if (own_val) unlink(val_path);
    if (st != MOE_OK) {
        FUZZ_CHECK(ds == NULL, "a refused data set was returned");
        FUZZ_CHECK(st == MOE_ERR_IO || st == MOE_ERR_ARG || st == MOE_ERR_FORMAT, "status %d", (int)st);
        FUZZ_CHECK(strstr(moe_error_detail(), train_path) || (own_val && strstr(moe_error_detail(), val_path)),
                   "status %d without a detail naming a file", (int)st);
        return 0;
    }
    /* the parts */
    const int64_t n_tail = own_val ? 0 : (int64_t)(val_frac * (double)n_train_file);
    const int64_t n_train = (int64_t)n_train_file - n_tail, n_val = own_val ? (int64_t)n_val_file : n_tail;
    const uint8_t *train = bytes, *val = own_val ? bytes + n_train_file : bytes + n_train;
    FUZZ_CHECK(moe_data_is_tokens(ds) == 0 && moe_data_vocab_size(ds) == 256 && moe_data_seq_len(ds) == seq_len,
               "kind %d, vocab %lld, seq_len %d", moe_data_is_tokens(ds), (long long)moe_data_vocab_size(ds),
               moe_data_seq_len(ds));
    FUZZ_CHECK(moe_data_train_tokens(ds) == n_train && moe_data_val_tokens(ds) == n_val,
               "parts of %lld + %lld tokens, expected %lld + %lld", (long long)moe_data_train_tokens(ds),
               (long long)moe_data_val_tokens(ds), (long long)n_train, (long long)n_val);
    FUZZ_CHECK(n_train > seq_len && (n_val == 0 || n_val > seq_len), "a part shorter than a window was accepted");
    FUZZ_CHECK(moe_data_train_bytes(ds) == n_train && moe_data_val_bytes(ds) == n_val, "bytes of the parts");
    const int32_t *idb = moe_data_id_bytes(ds);
    for (int v = 0; v < 256; v++) FUZZ_CHECK(idb[v] == 1, "id %d stands for %d bytes", v, idb[v]);

    /* training windows: the file's bytes at the reported offset */
    int32_t in[ROWS * 32], tg[ROWS * 32];
    for (int64_t step = 0; step < 3; step++) {
        st = moe_data_batch(ds, in, tg, step, 1, ROWS);
        FUZZ_CHECK(st == MOE_OK, "batch of step %lld", (long long)step);
        for (int r = 0; r < ROWS; r++) {
            const int64_t off = moe_data_train_offset(ds, step, 1 + r);
            FUZZ_CHECK(off >= 0 && off + seq_len + 1 <= n_train, "window at %lld of a part of %lld", (long long)off,
                       (long long)n_train);
            for (int t = 0; t < seq_len; t++)
                FUZZ_CHECK(in[r * seq_len + t] == train[off + t] && tg[r * seq_len + t] == train[off + t + 1],
                           "step %lld row %d token %d", (long long)step, r, t);
        }
        FUZZ_CHECK(moe_data_batch_bytes(ds, step, 1, ROWS) == (int64_t)ROWS * seq_len, "bytes of a batch");
    }
    /* validation windows tile the part with stride seq_len */
    if (n_val) {
        const int64_t W = moe_data_val_windows(ds), total = W < ROWS ? W : ROWS;
        FUZZ_CHECK(W == (n_val - 1) / seq_len, "%lld validation windows in %lld tokens", (long long)W, (long long)n_val);
        st = moe_data_val_batch(ds, in, tg, 0, total, (int)total);
        FUZZ_CHECK(st == MOE_OK, "validation batch");
        for (int64_t g = 0; g < total; g++) {
            const int64_t off = g * W / total * seq_len;
            for (int t = 0; t < seq_len; t++)
                FUZZ_CHECK(in[g * seq_len + t] == val[off + t] && tg[g * seq_len + t] == val[off + t + 1],
                           "validation row %lld token %d", (long long)g, t);
        }
        FUZZ_CHECK(moe_data_val_pass_bytes(ds, total) == total * seq_len, "bytes of a validation pass");
    } else {
        FUZZ_CHECK(moe_data_val_batch(ds, in, tg, 0, 1, 1) != MOE_OK, "a validation batch without validation data");
    }
    /* counts and the unigram baseline of the training bytes */
    int64_t counts[256], want[256] = {0};
    for (int64_t i = 0; i < n_train; i++) want[train[i]]++;
    st = moe_data_train_counts(ds, counts, 256);
    FUZZ_CHECK(st == MOE_OK && !memcmp(counts, want, sizeof want), "training counts");
    const double h = moe_data_bytes_entropy(train, (size_t)n_train), bpb = moe_data_unigram_bpb(ds);
    FUZZ_CHECK(fabs(bpb - h) <= 1e-9 * (1 + h) && fabs(moe_data_unigram_bpt(ds) - h) <= 1e-9 * (1 + h),
               "unigram %.17g bits per byte, %.17g from the bytes", bpb, h);
    moe_data_destroy(ds);
    return 0;
}
