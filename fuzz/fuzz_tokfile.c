/* Fuzz harness: token files (src/tokenizer/tokfile.c), opened through the
 * reader every consumer uses (header, size, ids below vocab_size). Any
 * input either opens or is refused with a detail naming the file. A file
 * that opens holds exactly the ids its header promises: the size matches,
 * every id read back (one by one and in ranges) is below vocab_size, and a
 * range outside the file is refused. */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "tokenizer/tokfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 20) return 0;
    const char *path = fuzz_scratch(data, size, ".tok");
    moe_tok_file *f = NULL;
    moe_error_clear();
    moe_status st = moe_tok_file_open(&f, path, NULL);
    if (st != MOE_OK) {
        FUZZ_CHECK_REJECT(st, path);
        unlink(path);
        return 0;
    }
    const int64_t n = moe_tok_file_n_tokens(f);
    const int bpt = moe_tok_file_bytes_per_token(f);
    const uint32_t V = moe_tok_file_vocab_size(f);
    FUZZ_CHECK(n >= 0 && (bpt == 2 || bpt == 4) && (size_t)(MOE_TOK_FILE_HEADER + n * bpt) == size,
               "header n_tokens %lld x %d bytes for a file of %zu bytes", (long long)n, bpt, size);
    uint32_t buf[64];
    for (int64_t i = 0; i < n; i += 64) {
        const int64_t k = n - i < 64 ? n - i : 64;
        st = moe_tok_file_read(f, buf, i, k);
        FUZZ_CHECK(st == MOE_OK, "read of [%lld, +%lld) in a file of %lld ids", (long long)i, (long long)k,
                   (long long)n);
        for (int64_t j = 0; j < k; j++)
            FUZZ_CHECK(buf[j] < V && buf[j] == moe_tok_file_get(f, i + j), "id %u at %lld (vocab_size %u)", buf[j],
                       (long long)(i + j), V);
    }
    FUZZ_CHECK(moe_tok_file_read(f, buf, n, 1) != MOE_OK, "a read past the end succeeded");
    FUZZ_CHECK(moe_tok_file_read(f, buf, -1, 1) != MOE_OK, "a read before the start succeeded");
    moe_tok_file_close(f);
    unlink(path);
    return 0;
}
