/* Fuzz harness: the prompt file of `moe generate --prompt_file`
 * (src/infer/prompt.c), read from a file as the command reads it, then
 * encoded and decoded one id per byte as for a byte-level model
 * (src/infer/text.c). Any input either gives prompts or is refused with a
 * detail naming the file. Prompts that load: 1..MOE_INFER_MAX_PROMPTS of
 * them, each inside the file, valid UTF-8 without '\n', and the prompts
 * joined by '\n' (each followed by the '\r' that was dropped, if any) give
 * the file back, up to one final '\n'; their ids decode to the same bytes.
 * The same bytes up to a NUL as --prompt TEXT: one prompt iff valid UTF-8. */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "infer/infer.h"
#include "tokenizer/tokenizer.h"

/* --prompt TEXT: the input up to its first NUL is one prompt, taken iff it
 * is valid UTF-8 (the refusal names the option). */
static void one_prompt(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text) return;
    memcpy(text, data, size);
    text[size] = '\0';
    const size_t n = strlen(text), valid = moe_tok_utf8_valid_prefix((const uint8_t *)text, n);
    moe_infer_prompts *ps = NULL;
    moe_error_clear();
    moe_status st = moe_infer_prompts_create_text(&ps, text);
    if (valid < n) {
        FUZZ_CHECK(ps == NULL, "invalid UTF-8 taken as a prompt");
        FUZZ_CHECK_REJECT(st, "--prompt");
    } else {
        size_t len;
        FUZZ_CHECK(st == MOE_OK && moe_infer_prompts_count(ps) == 1, "a valid --prompt refused (%d)", (int)st);
        FUZZ_CHECK(moe_infer_prompts_get(ps, 0, &len) == (const uint8_t *)text && len == n, "--prompt not kept");
    }
    moe_infer_prompts_destroy(ps);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 16) return 0;
    one_prompt(data, size);
    const char *path = fuzz_scratch(data, size, ".txt");
    moe_infer_prompts *ps = NULL;
    moe_error_clear();
    moe_status st = moe_infer_prompts_create(&ps, path);
    unlink(path);
    if (st != MOE_OK) {
        FUZZ_CHECK(ps == NULL, "a refused file returned prompts");
        FUZZ_CHECK_REJECT(st, path);
        return 0;
    }
    const int n = moe_infer_prompts_count(ps);
    FUZZ_CHECK(n >= 1 && n <= MOE_INFER_MAX_PROMPTS, "%d prompts", n);
    size_t at = 0; /* where prompt i must start in the file */
    for (int i = 0; i < n; i++) {
        size_t len;
        const uint8_t *p = moe_infer_prompts_get(ps, i, &len);
        FUZZ_CHECK(at + len <= size && !memcmp(p, data + at, len), "prompt %d (%zu bytes) is not the file's line",
                   i, len);
        FUZZ_CHECK(!memchr(p, '\n', len) && moe_tok_utf8_valid_prefix(p, len) == len,
                   "prompt %d holds a newline or invalid UTF-8", i);
        at += len;
        if (at < size && data[at] == '\r' && (at + 1 == size || data[at + 1] == '\n')) at++;
        FUZZ_CHECK(at == size || data[at] == '\n', "prompt %d ends at %zu before a byte %u", i, at, data[at]);
        at += at < size;
        /* byte-level encode and decode give the prompt back */
        int32_t *ids = NULL;
        size_t n_ids = 0, n_back = 0;
        uint8_t *back = NULL;
        st = moe_infer_text_encode(&ids, &n_ids, NULL, p, len);
        FUZZ_CHECK(st == MOE_OK && n_ids == len, "byte-level encode of prompt %d: %d, %zu ids", i, (int)st, n_ids);
        st = moe_infer_text_decode(&back, &n_back, NULL, ids, n_ids);
        FUZZ_CHECK(st == MOE_OK && n_back == len && (len == 0 || !memcmp(back, p, len)),
                   "prompt %d does not decode back", i);
        moe_free(ids);
        moe_free(back);
    }
    FUZZ_CHECK(at == size, "the prompts cover %zu of %zu bytes", at, size);
    moe_infer_prompts_destroy(ps);
    return 0;
}
