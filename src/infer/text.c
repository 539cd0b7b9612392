/* Text and token ids for inference (infer.h, "text and token ids"): a
 * checkpoint's tokenizer encodes and decodes, a byte-level model reads one
 * id per byte, and token files are checked against the tokenizer. */
#include "infer/infer.h"

#include <string.h>

#include "tokenizer/tokfile.h"

moe_status moe_infer_text_encode(int32_t **ids, size_t *n_ids, const moe_tok *tok, const uint8_t *text, size_t n)
{
    *n_ids = 0;
    /* every id covers at least one byte: n ids are enough */
    if (!(*ids = moe_calloc(n, sizeof(int32_t)))) return moe_errorf(MOE_ERR_NOMEM, "token ids of %zu bytes", n);
    if (!tok) {
        for (size_t i = 0; i < n; i++) (*ids)[i] = text[i];
        *n_ids = n;
        return MOE_OK;
    }
    moe_tok_encoder *e = NULL;
    /* int32 and uint32 share their representation for ids < 2^31 */
    moe_status st = moe_tok_encoder_create(&e, tok);
    if (!st) st = moe_tok_encode(e, (uint32_t *)*ids, n_ids, text, n);
    moe_tok_encoder_destroy(e);
    if (st) {
        moe_free(*ids);
        *ids = NULL;
        *n_ids = 0;
    }
    return st;
}

moe_status moe_infer_text_decode(uint8_t **out, size_t *n_out, const moe_tok *tok, const int32_t *ids, size_t n)
{
    *out = NULL;
    *n_out = 0;
    if (!tok) {
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] > 255)
                return moe_errorf(MOE_ERR_ARG, "id %ld at position %zu is not a byte (the model has no tokenizer)",
                                  (long)ids[i], i);
        if (!(*out = moe_calloc(n, 1))) return moe_errorf(MOE_ERR_NOMEM, "text of %zu ids", n);
        for (size_t i = 0; i < n; i++) (*out)[i] = (uint8_t)ids[i];
        *n_out = n;
        return MOE_OK;
    }
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0) return moe_errorf(MOE_ERR_ARG, "id %ld at position %zu is negative", (long)ids[i], i);
    moe_status st = moe_tok_decoded_len(tok, &len, (const uint32_t *)ids, n);
    if (st) return st;
    if (!(*out = moe_calloc(len, 1))) return moe_errorf(MOE_ERR_NOMEM, "text of %zu ids (%zu bytes)", n, len);
    st = moe_tok_decode(tok, *out, len, n_out, (const uint32_t *)ids, n);
    if (st) {
        moe_free(*out);
        *out = NULL;
        *n_out = 0;
    }
    return st;
}

moe_status moe_infer_read_tokens(int32_t **ids, size_t *n, const char *path, const moe_tok *tok)
{
    *ids = NULL;
    *n = 0;
    if (!tok)
        return moe_errorf(MOE_ERR_ARG,
                          "'%s' is a token file, but the checkpoint is byte-level (it stores no tokenizer): "
                          "evaluate the text itself", path);
    moe_tok_file *f = NULL;
    moe_status st = moe_tok_file_open(&f, path, tok); /* header, size, ids, hash and vocab_size */
    if (st) return st;
    const int64_t k = moe_tok_file_n_tokens(f);
    if (!(*ids = moe_calloc((size_t)k, sizeof(int32_t))))
        st = moe_errorf(MOE_ERR_NOMEM, "'%s': %lld token ids", path, (long long)k);
    if (!st) st = moe_tok_file_read(f, (uint32_t *)*ids, 0, k);
    moe_tok_file_close(f);
    if (st) {
        moe_free(*ids);
        *ids = NULL;
        return st;
    }
    *n = (size_t)k;
    return MOE_OK;
}
