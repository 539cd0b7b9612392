/* libFuzzer harness for the safetensors header parser and converters
 * (src/convert/safetensors.c): any input either opens, and then every
 * tensor view stays inside the input and F32/F16/BF16 tensors convert, or
 * fails with MOE_ERR_FORMAT and a detail. Build and run by hand:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc \
 *       fuzz/fuzz_safetensors.c src/convert/safetensors.c src/core/status.c \
 *       -lcjson -lm -o fuzz_st
 *   ./fuzz_st -max_len=4096 -dict=fuzz/safetensors.dict fuzz/corpus/safetensors
 *
 * The seed corpus (fuzz/corpus/safetensors) holds small valid and broken
 * files. tests/convert runs every seed through this harness on each build. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moe_st_file *f = NULL;
    moe_status st = moe_st_file_create_mem(&f, data, size, "fuzz");
    if (st != MOE_OK) {
        /* A rejected input is a format error with a detail, never anything else. */
        if (st != MOE_ERR_FORMAT || !moe_error_detail()[0]) abort();
        return 0;
    }
    float buf[256];
    for (size_t i = 0; i < moe_st_file_count(f); i++) {
        moe_st_view v;
        moe_st_file_get(f, i, &v);
        const uint8_t *p = v.data;
        if (p < data || p + v.nbytes > data + size) abort();
        moe_st_view found;
        if (!moe_st_file_find(f, v.name, &found) || found.data != v.data) abort();
        if (v.numel > 0 && v.numel <= 256) {
            moe_status cs = moe_st_to_f32(buf, &v, (size_t)v.numel);
            int convertible = v.dtype == MOE_ST_F32 || v.dtype == MOE_ST_F16 || v.dtype == MOE_ST_BF16;
            if ((cs == MOE_OK) != convertible) abort();
        }
    }
    for (size_t i = 0; i < moe_st_file_meta_count(f); i++) {
        const char *k, *val;
        moe_st_file_meta_get(f, i, &k, &val);
        if (moe_st_file_meta(f, k) != val) abort();
    }
    moe_st_file_destroy(f);
    return 0;
}
