/* Fuzz harness: the INI configuration of `moe train` (src/config) and its
 * validation. Any text either loads, or is refused with a status and a
 * detail naming the origin ("fuzz.ini:LINE: ..."). A text that loads:
 *   - is checked at 1..4 ranks (pass or fail, never crash), and the model
 *     part builds its tensor table when the check passes;
 *   - writes back (moe_train_config_format) to a text that loads over the
 *     defaults and writes back identically (the round trip config.ini and
 *     the checkpoint's `config` attribute rely on). */
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "fuzz.h"
#include "layout/layout.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 16) return 0;
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0'; /* the loader reads C text: an embedded NUL ends it */
    moe_train_config c;
    moe_train_config_default(&c);
    moe_error_clear();
    moe_status st = moe_train_config_load_text(&c, text, "fuzz.ini");
    free(text);
    if (st != MOE_OK) {
        FUZZ_CHECK_REJECT(st, "fuzz.ini");
        FUZZ_CHECK(st == MOE_ERR_ARG || st == MOE_ERR_NOMEM, "unexpected status %d", (int)st);
        return 0;
    }
    for (int w = 1; w <= 4; w++) {
        moe_error_clear();
        st = moe_train_config_check(&c, w);
        FUZZ_CHECK(st == MOE_OK || (st == MOE_ERR_ARG && moe_error_detail()[0]), "check at %d ranks: %d", w, (int)st);
        if (st == MOE_OK && w == 1) {
            /* vocabulary experts: a round-robin partition stands for the real one */
            moe_vocab_part *part = NULL;
            if (c.head == MOE_HEAD_VOCAB_EXPERTS) {
                int32_t *assign = malloc((size_t)c.vocab_size * sizeof *assign);
                FUZZ_CHECK(assign != NULL, "out of memory");
                for (int v = 0; v < c.vocab_size; v++) assign[v] = v % c.vocab_experts;
                st = moe_vocab_part_create(&part, assign, c.vocab_size, c.vocab_experts);
                free(assign);
                FUZZ_CHECK(st == MOE_OK || st == MOE_ERR_NOMEM, "partition of a checked config: %d", (int)st);
            }
            moe_tensor_table *t = NULL;
            if (st == MOE_OK) st = moe_layout_create(&t, &c, part, 0, 1);
            FUZZ_CHECK(st == MOE_OK || st == MOE_ERR_NOMEM, "layout of a checked config: %d", (int)st);
            moe_layout_destroy(t);
            moe_vocab_part_destroy(part);
        }
    }
    const int n = moe_train_config_format(&c, NULL, 0);
    char *a = malloc((size_t)n + 1), *b = malloc((size_t)n + 1);
    FUZZ_CHECK(a && b, "out of memory");
    moe_train_config_format(&c, a, n + 1);
    moe_train_config c2;
    moe_train_config_default(&c2);
    st = moe_train_config_load_text(&c2, a, "written.ini");
    FUZZ_CHECK(st == MOE_OK, "the written configuration does not load:\n%s", a);
    FUZZ_CHECK(moe_train_config_format(&c2, b, n + 1) == n && !strcmp(a, b),
               "the written configuration does not read back the same:\n%s\n---\n%s", a, b);
    free(a);
    free(b);
    return 0;
}
