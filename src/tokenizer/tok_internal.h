/* Internals shared by the tokenizer's files: the tokenizer struct, the
 * byte-string hash and the rank table lookup (inline: the encoder's hot
 * path). Not part of the public API. */
#ifndef MOE_TOK_INTERNAL_H
#define MOE_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

/* Decode table entry: tokens of up to 15 bytes inline (len in the last
 * byte), so decoding copies 16 bytes per id; len 0: long, special or hole. */
typedef struct {
    uint8_t b[15];
    uint8_t len;
} moe_tok_dec16;

struct moe_tok {
    int64_t n;                /* rank ids [0, n) */
    int64_t vocab;            /* largest id + 1 */
    int64_t n_holes;
    uint8_t *bytes;           /* (offsets[n]) token bytes in rank order */
    int64_t *offsets;         /* (n + 1) */
    uint64_t *slots;          /* (mask + 1) open addressing: (hash >> 32) << 32 | (id + 1); 0 = empty */
    uint64_t mask;
    int32_t byte_rank[256];   /* rank of each single byte */
    int32_t *pair_rank;       /* (65536) rank of each 2-byte string, -1 if none */
    moe_tok_dec16 *dec;       /* (vocab) */
    int max_len;              /* longest token */
    char *pattern;
    pcre2_code *re;
    uint32_t max_lookbehind;  /* characters the pattern may inspect before a match start */
    int n_specials;
    char **special_names;     /* ascending id order */
    int64_t *special_ids;
    int8_t *is_special;       /* (vocab) */
    uint64_t hash;            /* moe_tok_hash */
};

/* Byte-string hash (wyhash-style mixing; small keys read with overlapping
 * loads so that nothing beyond s[n-1] is touched). */
static inline uint64_t moe_tok_mix(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}
static inline uint64_t moe_tok_r8(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static inline uint64_t moe_tok_r4(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint64_t moe_tok_hash_bytes(const uint8_t *s, size_t n)
{
    const uint64_t k0 = 0xa0761d6478bd642full, k1 = 0xe7037ed1a0b428dbull, k2 = 0x8ebc6af09c88c6e3ull;
    uint64_t a, b, seed = k0 ^ (uint64_t)n;
    if (n <= 16) {
        if (n >= 4) {
            a = (moe_tok_r4(s) << 32) | moe_tok_r4(s + ((n >> 3) << 2));
            b = (moe_tok_r4(s + n - 4) << 32) | moe_tok_r4(s + n - 4 - ((n >> 3) << 2));
        } else if (n > 0) {
            a = ((uint64_t)s[0] << 16) | ((uint64_t)s[n >> 1] << 8) | s[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        const uint8_t *p = s;
        while (i > 16) {
            seed = moe_tok_mix(moe_tok_r8(p) ^ k1, moe_tok_r8(p + 8) ^ seed);
            p += 16;
            i -= 16;
        }
        a = moe_tok_r8(p + i - 16);
        b = moe_tok_r8(p + i - 8);
    }
    return moe_tok_mix(k1 ^ (uint64_t)n, moe_tok_mix(a ^ k1, b ^ seed) ^ k2);
}

static inline int64_t moe_tok_tlen(const moe_tok *t, int64_t id) { return t->offsets[id + 1] - t->offsets[id]; }

/* Rank of s (n bytes, hash h = moe_tok_hash_bytes(s, n)), -1 if none. */
static inline int64_t moe_tok_lookup(const moe_tok *t, const uint8_t *s, size_t n, uint64_t h)
{
    const uint64_t tag = h >> 32;
    for (uint64_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const uint64_t sl = t->slots[i];
        if (!sl) return -1;
        if ((sl >> 32) == tag) {
            const int64_t id = (int64_t)(uint32_t)sl - 1;
            const int64_t o = t->offsets[id];
            if (t->offsets[id + 1] - o == (int64_t)n && !memcmp(t->bytes + o, s, n)) return id;
        }
    }
}

/* The pattern GPT-2 (and r50k, p50k) use; the default for training. */
extern const char moe_tok_gpt2_pattern[];

#endif
