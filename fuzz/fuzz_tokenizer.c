/* Fuzz harness: tokenizer files (src/tokenizer/tok_io.c) in every form. The
 * first byte picks the form (auto, tiktoken-json, .tiktoken with GPT-2's
 * pattern, Hugging Face tokenizer.json); the rest is the file. Any input
 * either loads or is refused with a detail naming the file. A tokenizer
 * that loads:
 *   - encodes a fixed text (every byte value, ASCII words, UTF-8 and
 *     invalid UTF-8) into ids below its vocabulary, and decodes them back
 *     to exactly that text (byte-level BPE loses nothing; every single
 *     byte has a rank, or the load fails);
 *   - writes itself in moerun's own form and reads back equal. */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "tokenizer/tokenizer.h"

static const char sample_text[] = "Hello, world! 17+25=42 rev: abc -> cba\n\n  indented\tx\r\n"
                                   "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 bad \xff\xfe\xc3 end";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 1 << 20) return 0;
    static const moe_tok_form forms[] = {MOE_TOK_FORM_AUTO, MOE_TOK_FORM_TIKTOKEN_JSON, MOE_TOK_FORM_TIKTOKEN,
                                         MOE_TOK_FORM_HF};
    const moe_tok_form form = forms[data[0] % 4];
    moe_tok *t = NULL;
    moe_error_clear();
    moe_status st = moe_tok_load_buffer(&t, "fuzz.tok", data + 1, size - 1, form,
                                        form == MOE_TOK_FORM_TIKTOKEN ? "gpt2" : NULL, 0, NULL, NULL);
    if (st != MOE_OK) {
        FUZZ_CHECK_REJECT(st, "fuzz.tok");
        return 0;
    }
    /* the text: every byte value once, then the sample */
    uint8_t text[256 + sizeof sample_text];
    for (int i = 0; i < 256; i++) text[i] = (uint8_t)i;
    memcpy(text + 256, sample_text, sizeof sample_text - 1);
    const size_t n = 256 + sizeof sample_text - 1;
    uint32_t ids[sizeof text];
    uint8_t back[sizeof text];
    size_t n_ids = 0, n_back = 0;
    moe_tok_encoder *e = NULL;
    st = moe_tok_encoder_create(&e, t);
    FUZZ_CHECK(st == MOE_OK || st == MOE_ERR_NOMEM, "encoder of a loaded tokenizer: %d", (int)st);
    if (st == MOE_OK) st = moe_tok_encode(e, ids, &n_ids, text, n);
    /* a pattern from the file may hit PCRE2's match limits: an error, not a crash */
    if (st == MOE_OK) {
        FUZZ_CHECK(n_ids <= n, "%zu ids for %zu bytes", n_ids, n);
        for (size_t i = 0; i < n_ids; i++)
            FUZZ_CHECK(ids[i] < (uint64_t)moe_tok_vocab_size(t) && !moe_tok_is_special(t, ids[i]),
                       "id %u at %zu (vocabulary %lld)", ids[i], i, (long long)moe_tok_vocab_size(t));
        st = moe_tok_decode(t, back, sizeof back, &n_back, ids, n_ids);
        FUZZ_CHECK(st == MOE_OK && n_back == n && !memcmp(back, text, n), "decode(encode(text)) != text");
    } else {
        FUZZ_CHECK(moe_error_detail()[0], "encode failed without a detail");
    }
    moe_tok_encoder_destroy(e);
    char *saved = NULL;
    size_t n_saved = 0;
    st = moe_tok_save_buffer(t, MOE_TOK_FORM_TIKTOKEN_JSON, &saved, &n_saved);
    FUZZ_CHECK(st == MOE_OK || st == MOE_ERR_NOMEM, "save of a loaded tokenizer: %d", (int)st);
    if (st == MOE_OK) {
        moe_tok *t2 = NULL;
        st = moe_tok_load_buffer(&t2, "saved.json", (const uint8_t *)saved, n_saved, MOE_TOK_FORM_TIKTOKEN_JSON,
                                 NULL, 0, NULL, NULL);
        FUZZ_CHECK(st == MOE_OK, "the saved tokenizer does not load");
        FUZZ_CHECK(moe_tok_equal(t, t2), "the saved tokenizer reads back different");
        moe_tok_destroy(t2);
    }
    free(saved);
    moe_tok_destroy(t);
    return 0;
}
