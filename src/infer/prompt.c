/* The prompts of `moe generate` (infer.h, "prompts"): --prompt TEXT, or a
 * prompt file of one prompt per line, split and checked (UTF-8, at most
 * MOE_INFER_MAX_PROMPTS lines) before any checkpoint is read. Kept out of
 * the command so that the fuzz harness (fuzz/fuzz_prompt.c) runs exactly
 * the reader users get. */
#include "infer/infer.h"

#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

struct moe_infer_prompts {
    uint8_t *buf; /* the file's bytes (NULL for one --prompt text) */
    const uint8_t *p[MOE_INFER_MAX_PROMPTS];
    size_t len[MOE_INFER_MAX_PROMPTS];
    int n;
};

moe_status moe_infer_prompts_create_text(moe_infer_prompts **out, const char *text)
{
    *out = NULL;
    if (!text) return moe_errorf(MOE_ERR_ARG, "--prompt: no text");
    const size_t n = strlen(text), bad = moe_tok_utf8_valid_prefix((const uint8_t *)text, n);
    if (bad < n) return moe_errorf(MOE_ERR_ARG, "--prompt: invalid UTF-8 at byte %zu (prompts must be UTF-8 text)", bad);
    moe_infer_prompts *ps = calloc(1, sizeof *ps);
    if (!ps) return moe_errorf(MOE_ERR_NOMEM, "--prompt");
    ps->p[0] = (const uint8_t *)text;
    ps->len[0] = n;
    ps->n = 1;
    *out = ps;
    return MOE_OK;
}

moe_status moe_infer_prompts_create(moe_infer_prompts **out, const char *path)
{
    *out = NULL;
    moe_infer_prompts *ps = calloc(1, sizeof *ps);
    if (!ps) return moe_errorf(MOE_ERR_NOMEM, "prompts of '%s'", path);
    size_t n = 0;
    moe_status st = moe_infer_read_file(&ps->buf, &n, path);
    size_t i = 0;
    for (int line = 1; st == MOE_OK && i < n; line++) {
        const uint8_t *s = ps->buf + i, *nl = memchr(s, '\n', n - i);
        size_t len = nl ? (size_t)(nl - s) : n - i;
        i += len + (nl != NULL);
        if (len && s[len - 1] == '\r') len--; /* CRLF files */
        const size_t bad = moe_tok_utf8_valid_prefix(s, len);
        if (bad < len)
            st = moe_errorf(MOE_ERR_ARG, "'%s' line %d: invalid UTF-8 at byte %zu (prompts must be UTF-8 text)", path,
                            line, bad + 1);
        else if (ps->n == MOE_INFER_MAX_PROMPTS)
            st = moe_errorf(MOE_ERR_ARG, "'%s': more than %d prompts (lines)", path, MOE_INFER_MAX_PROMPTS);
        else {
            ps->p[ps->n] = s;
            ps->len[ps->n++] = len;
        }
    }
    if (st == MOE_OK && ps->n == 0) st = moe_errorf(MOE_ERR_ARG, "'%s' holds no prompt (empty file)", path);
    if (st != MOE_OK) {
        moe_infer_prompts_destroy(ps);
        return st;
    }
    *out = ps;
    return MOE_OK;
}

void moe_infer_prompts_destroy(moe_infer_prompts *ps)
{
    if (!ps) return;
    moe_free(ps->buf);
    free(ps);
}

int moe_infer_prompts_count(const moe_infer_prompts *ps) { return ps->n; }

const uint8_t *moe_infer_prompts_get(const moe_infer_prompts *ps, int i, size_t *len)
{
    *len = ps->len[i];
    return ps->p[i];
}
