/* The growing text buffer of the file writers (see strbuf.h). */
#include "core/strbuf.h"

#include <stdlib.h>
#include <string.h>

void moe_strbuf_put(moe_strbuf *b, const char *s, size_t n)
{
    if (b->bad) return;
    if (b->n + n + 1 > b->cap) {
        /* doubling: appends cost amortised O(1) for texts of any size */
        size_t cap = b->cap ? b->cap : 4096;
        while (b->n + n + 1 > cap) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->bad = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

void moe_strbuf_puts(moe_strbuf *b, const char *s) { moe_strbuf_put(b, s, strlen(s)); }
