/* A growing text buffer, for the writers that build a file's text before
 * writing it (safetensors headers and indexes, tokenizer files). An
 * allocation failure is recorded in `bad` and later appends do nothing, so
 * a writer appends freely and checks once at the end. */
#ifndef MOE_CORE_STRBUF_H
#define MOE_CORE_STRBUF_H

#include <stddef.h>

/* Start from {0}; p is NUL-terminated once anything was appended; the
 * caller frees p. A caller may set bad itself (a text it could not make). */
typedef struct {
    char *p;
    size_t n, cap;
    int bad;
} moe_strbuf;

/* Appends n bytes of s. */
void moe_strbuf_put(moe_strbuf *b, const char *s, size_t n);
/* Appends the string s. */
void moe_strbuf_puts(moe_strbuf *b, const char *s);

#endif
