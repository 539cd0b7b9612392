/* Token files: the ids of an encoded corpus, memory-mapped by readers.
 *
 * Layout (little-endian): a 64-byte header
 *     0  magic "MOETOK01" (8 bytes)
 *     8  uint32 version (1)
 *    12  uint32 bytes_per_token (2 when vocab_size <= 65536, else 4)
 *    16  uint64 n_tokens
 *    24  uint32 vocab_size
 *    28  uint32 flags (0; no flag is defined yet)
 *    32  uint64 tokenizer hash (moe_tok_hash: ranks and pattern)
 *    40  zero padding to 64
 * then n_tokens ids of bytes_per_token bytes each, nothing after.
 *
 * Nothing here is collective; moe_tok_encode_file (tok_comm.c) writes a
 * token file from many ranks and threads. */
#ifndef MOE_TOKFILE_H
#define MOE_TOKFILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"
#include "tokenizer/tokenizer.h"

enum { MOE_TOK_FILE_HEADER = 64, MOE_TOK_FILE_VERSION = 1 };

typedef struct {
    uint32_t version, bytes_per_token, vocab_size, flags;
    uint64_t n_tokens, tokenizer_hash;
} moe_tok_file_header;

/* The header of a file of n_tokens ids made by tokenizer t. */
moe_tok_file_header moe_tok_file_header_for(const moe_tok *t, uint64_t n_tokens);
void moe_tok_file_header_pack(uint8_t out[MOE_TOK_FILE_HEADER], const moe_tok_file_header *h);
/* Checks magic, version, bytes_per_token against vocab_size, flags and
 * padding; MOE_ERR_FORMAT naming `path` otherwise. */
moe_status moe_tok_file_header_unpack(moe_tok_file_header *h, const uint8_t in[MOE_TOK_FILE_HEADER],
                                      const char *path);

/* A header read from a file of file_size bytes: the size is exactly
 * 64 + n_tokens * bytes_per_token (MOE_ERR_FORMAT "truncated" or "trailing
 * bytes"), and when t is not NULL, vocab_size and the tokenizer hash match
 * t (MOE_ERR_MISMATCH). Ids are not looked at. For readers that do not map
 * the file (src/data reads windows with pread). */
moe_status moe_tok_file_header_check(const moe_tok_file_header *h, uint64_t file_size, const moe_tok *t,
                                     const char *path);

typedef struct moe_tok_file moe_tok_file;

/* Opens and validates a token file (mmap, read-only): header, file size
 * (64 + n_tokens * bytes_per_token exactly: MOE_ERR_FORMAT "truncated" or
 * "trailing bytes"), every id < vocab_size (the first bad position is
 * named), and, when t is not NULL, vocab_size and the tokenizer hash
 * against t (MOE_ERR_MISMATCH). MOE_ERR_IO if missing or unreadable.
 * Owner: caller (moe_tok_file_close). */
moe_status moe_tok_file_open(moe_tok_file **out, const char *path, const moe_tok *t);
void moe_tok_file_close(moe_tok_file *f);

int64_t moe_tok_file_n_tokens(const moe_tok_file *f);
uint32_t moe_tok_file_vocab_size(const moe_tok_file *f);
int moe_tok_file_bytes_per_token(const moe_tok_file *f);
uint64_t moe_tok_file_hash(const moe_tok_file *f);
/* The ids as stored (n_tokens entries of bytes_per_token bytes). */
const void *moe_tok_file_ids(const moe_tok_file *f);
/* Id i (0 <= i < n_tokens; not checked). */
uint32_t moe_tok_file_get(const moe_tok_file *f, int64_t i);
/* Copies ids [start, start + n) as uint32 into out; MOE_ERR_ARG if the range
 * is outside the file. */
moe_status moe_tok_file_read(const moe_tok_file *f, uint32_t *out, int64_t start, int64_t n);

/* Writes a whole token file from one process (temp name + rename). Ids must
 * be < vocab_size of t (MOE_ERR_ARG naming the first that is not). */
moe_status moe_tok_file_write(const char *path, const moe_tok *t, const uint32_t *ids, size_t n);

#endif
