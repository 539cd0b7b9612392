/* libFuzzer harness for config.json of the Hugging Face MoE types
 * (src/convert/hf.c, moe_hf_config_parse): any input either parses into a
 * moerun configuration that passes the key table's checks, and then the
 * config.json export writes for it parses back to the same [model] keys,
 * or fails with MOE_ERR_FORMAT / MOE_ERR_ARG and a detail naming the file.
 * It links the moerun library (config.json maps onto the key table).
 * Build and run by hand after launch/build:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc fuzz/fuzz_hf_config.c \
 *       build/src/libmoerun.a $(pkg-config --libs libcjson inih hdf5-openmpi) \
 *       $(mpicc --showme:link) -lopenblas -lpcre2-8 -lm -o fuzz_hf
 *   ./fuzz_hf -max_len=8192 -dict=fuzz/hf_config.dict fuzz/corpus/hf_config
 *
 * The seed corpus (fuzz/corpus/hf_config) holds the configs of the four
 * types and broken ones; tests/convert replays it through this harness on
 * every build (and under AddressSanitizer in launch/test). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert/hf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moe_train_config a, b;
    moe_hf_type t, t2;
    moe_status st = moe_hf_config_parse(&a, &t, (const char *)data, size, "fuzz/config.json", 1 << 16);
    if (st != MOE_OK) {
        /* refused: a format or argument error whose detail names the file */
        if ((st != MOE_ERR_FORMAT && st != MOE_ERR_ARG) || !strstr(moe_error_detail(), "fuzz/config.json")) abort();
        return 0;
    }
    if (moe_train_config_check_model(&a) != MOE_OK) abort();
    char *json = NULL;
    size_t n = 0;
    if (moe_hf_config_write(&json, &n, &a, t) != MOE_OK) abort();
    if (moe_hf_config_parse(&b, &t2, json, n, "fuzz/exported", 1 << 16) != MOE_OK || t2 != t) abort();
    free(json);
    moe_model_attr x[MOE_MODEL_ATTRS_MAX], y[MOE_MODEL_ATTRS_MAX];
    const int na = moe_train_config_model_attrs(&a, x, MOE_MODEL_ATTRS_MAX);
    moe_train_config_model_attrs(&b, y, MOE_MODEL_ATTRS_MAX);
    for (int i = 0; i < na; i++)
        if (x[i].i != y[i].i || x[i].r != y[i].r || (x[i].type == MOE_ATTR_TEXT && strcmp(x[i].text, y[i].text)))
            abort();
    return 0;
}
