/* Byte-level BPE tokenizer with a regex pre-tokenizer (the scheme of GPT-2,
 * cl100k_base and o200k_base), exact to OpenAI's tiktoken on valid UTF-8.
 * docs/tokenizer.md describes the algorithm, the file forms and the rules
 * for bytes that are not UTF-8.
 *
 * A moe_tok holds the ranks (byte string -> id; a lower id merges first),
 * the pattern (PCRE2, UTF + UCP, JIT) and the named special tokens. It is
 * immutable after creation, so one tokenizer may be shared read-only by
 * any number of threads; each thread encodes through its own
 * moe_tok_encoder (match data, JIT stack, piece cache).
 *
 * Ids: the ranks occupy [0, n_ranks); an id in that range may be a hole
 * (no token; p50k_base has one, filled by a special). Specials take ids
 * that are holes or >= n_ranks. vocab_size = largest id + 1.
 *
 * Nothing here is collective and nothing exits: every function returns a
 * moe_status and leaves a detail (moe_error_detail) naming the problem. */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"

enum {
    MOE_TOK_MAX_VOCAB = 1 << 22,      /* ids are < 4M (o200k: 200k) */
    MOE_TOK_MAX_TOKEN_LEN = 65535,    /* bytes in one token */
    MOE_TOK_MAX_SPECIALS = 4096,
    MOE_TOK_MAX_PATTERN = 1 << 16,    /* bytes of pattern text */
};

typedef struct moe_tok moe_tok;
typedef struct moe_tok_encoder moe_tok_encoder;

/* ---- creation and accessors (tok.c) ---- */

/* Builds a tokenizer from the token byte strings concatenated in rank order:
 * token `id` is bytes[offsets[id] .. offsets[id+1]) for id in [0, n);
 * an empty entry is a hole. `pattern` is PCRE2 syntax (NULL: GPT-2's).
 * Specials: names (non-empty, distinct) and ids (distinct, holes or >= n).
 * Fails with MOE_ERR_FORMAT (detail names the id / special) when a byte
 * string occurs twice, a single byte 0x00..0xff has no rank, a token is
 * longer than MOE_TOK_MAX_TOKEN_LEN, offsets decrease, or an id exceeds
 * MOE_TOK_MAX_VOCAB; with MOE_ERR_ARG and PCRE2's message and offset when
 * the pattern does not compile. This is the constructor a checkpoint's
 * /tokenizer group (ranks_bytes, ranks_offsets, pattern, specials) uses. */
moe_status moe_tok_create(moe_tok **out, const uint8_t *bytes, const int64_t *offsets, int64_t n,
                          const char *pattern, int n_specials, const char *const *special_names,
                          const int64_t *special_ids);
void moe_tok_destroy(moe_tok *t);

int64_t moe_tok_vocab_size(const moe_tok *t);  /* largest id + 1 */
int64_t moe_tok_n_ranks(const moe_tok *t);     /* n: rank ids are [0, n) */
int64_t moe_tok_n_holes(const moe_tok *t);     /* ids < vocab_size with no token and no special */
/* Bytes of id (a rank or a special's name) and their length; NULL for a
 * hole or an id outside [0, vocab_size). */
const uint8_t *moe_tok_token(const moe_tok *t, int64_t id, size_t *len);
/* 1 if id is a special token. */
int moe_tok_is_special(const moe_tok *t, int64_t id);
/* The rank of a byte string, -1 if it has none. */
int64_t moe_tok_rank(const moe_tok *t, const uint8_t *s, size_t len);
const char *moe_tok_pattern(const moe_tok *t);
int moe_tok_n_specials(const moe_tok *t);
/* Special i (0 <= i < n_specials) in ascending id order. */
const char *moe_tok_special_name(const moe_tok *t, int i);
int64_t moe_tok_special_id(const moe_tok *t, int i);
/* Id of the special named `name`; MOE_ERR_ARG (detail lists the names) if none. */
moe_status moe_tok_special_find(const moe_tok *t, const char *name, int64_t *id);
/* The concatenated rank bytes and offsets (n + 1 entries) as given to create. */
const uint8_t *moe_tok_rank_bytes(const moe_tok *t);
const int64_t *moe_tok_rank_offsets(const moe_tok *t);
/* FNV-1a 64 over, for each id in [0, n): its length as uint32 little-endian
 * then its bytes; then the pattern's length (uint32 LE) and bytes. Token
 * files store it so that a file encoded by another tokenizer is refused. */
uint64_t moe_tok_hash(const moe_tok *t);
/* The generic FNV-1a 64 step, for callers hashing more data the same way. */
uint64_t moe_tok_fnv1a64(uint64_t h, const void *data, size_t n);
/* 1 if the two tokenizers have the same ranks, pattern and specials. */
int moe_tok_equal(const moe_tok *a, const moe_tok *b);

/* "PCRE2 <version> (Unicode <version>), JIT on|off" into buf (n bytes):
 * the Unicode tables decide which characters are letters, numbers, marks. */
void moe_tok_regex_engine(char *buf, size_t n);

/* The published patterns by name ("gpt2", "r50k_base", "p50k_base",
 * "cl100k_base", "o200k_base"); NULL for an unknown name. gpt2, r50k and
 * p50k share one pattern. */
const char *moe_tok_named_pattern(const char *name);

/* ---- encoding and decoding (tok_encode.c) ---- */

/* Per-thread encoding state. Not thread-safe itself; create one per thread. */
moe_status moe_tok_encoder_create(moe_tok_encoder **out, const moe_tok *t);
void moe_tok_encoder_destroy(moe_tok_encoder *e);

/* Document delimiter for this encoder: every occurrence of delim (found
 * left to right, not overlapping) in the text is replaced by the id sep,
 * and the text between occurrences is encoded as separate documents
 * (pieces never span a delimiter). delim_len 0 turns it off (default).
 * sep must be a valid id. The encoder keeps a copy of delim. */
moe_status moe_tok_encoder_set_delim(moe_tok_encoder *e, const uint8_t *delim, size_t delim_len, int64_t sep);
/* The encoder's delimiter: copies up to cap bytes into buf, returns its
 * length (0: none). */
size_t moe_tok_encoder_delim(const moe_tok_encoder *e, uint8_t *buf, size_t cap);

/* Encodes text (n bytes, any bytes) as one document: ids (room for n
 * entries: every id covers at least one byte) gets *n_ids ids. Exact to
 * tiktoken's encode_ordinary on valid UTF-8; a maximal run of invalid
 * bytes is its own piece. Fails (MOE_ERR_ARG) only on PCRE2 match errors
 * (e.g. its JIT stack limit on a pathological pattern). */
moe_status moe_tok_encode(moe_tok_encoder *e, uint32_t *ids, size_t *n_ids, const uint8_t *text, size_t n);

/* The plain reference of moe_tok_encode: the interpreter (no JIT), no
 * cache, tiktoken's quadratic merge loop for every piece, ranks looked up
 * by binary search over a sorted copy. Slow; tests hold the fast encoder
 * to it. Also honours the encoder's delimiter. */
moe_status moe_tok_encode_ref(moe_tok_encoder *e, uint32_t *ids, size_t *n_ids, const uint8_t *text, size_t n);

/* A growable id vector (moe_tok_encode_part appends to it). */
typedef struct {
    uint32_t *ids;
    size_t n, cap;
} moe_tok_ids;
void moe_tok_ids_free(moe_tok_ids *v);

/* Encodes text[start .. ) of the whole text (n bytes) up to the first piece
 * boundary >= stop, appending to v; *end gets that boundary (== stop when a
 * piece ends exactly there; > stop when a piece crosses it). `start` must be
 * a piece boundary of the whole text's encoding (0, or a position an earlier
 * call reported as *end); then the ids equal those moe_tok_encode gives for
 * the same bytes. The text beyond `stop` is read only as far as the pattern
 * needs (PCRE2 partial matching tells when it needs more). */
moe_status moe_tok_encode_part(moe_tok_encoder *e, moe_tok_ids *v, size_t *end, const uint8_t *text, size_t n,
                               size_t start, size_t stop);

/* Piece callback for moe_tok_scan: a piece of the text (len >= 1), or a
 * delimiter occurrence (is_sep = 1). Returning non-OK stops the scan. */
typedef moe_status (*moe_tok_piece_fn)(void *ctx, const uint8_t *piece, size_t len, int is_sep);
/* The pre-tokenizer alone: the pieces of text[start .. first boundary >= stop),
 * with the rules of moe_tok_encode_part (training counts pieces with it). */
moe_status moe_tok_scan(moe_tok_encoder *e, size_t *end, const uint8_t *text, size_t n, size_t start, size_t stop,
                        moe_tok_piece_fn fn, void *ctx);

/* A split position for cutting text into parts encoded independently,
 * near `target` (0 < target < n): the first position p >= target that
 * follows a '\n', precedes a byte that is not ASCII whitespace, is not
 * inside a delimiter occurrence, and on which the pieces scanned from the
 * start of an earlier line land exactly (the pattern itself checks it);
 * positions after other kinds of boundaries are taken when no line start
 * qualifies within 1 MB. Returns n if none is found. The choice depends on
 * the text only (not on threads or ranks). A candidate is very likely but
 * not certain to be a piece boundary of the whole text: callers verify it
 * by encoding the previous part up to it (moe_tok_encode_part's *end). */
size_t moe_tok_split_candidate(moe_tok_encoder *e, const uint8_t *text, size_t n, size_t target);

/* Decodes ids (n) into out (cap bytes): *n_out bytes. Specials decode to
 * their names. MOE_ERR_ARG naming the position for an id that is a hole or
 * >= vocab_size; MOE_ERR_OVERFLOW if cap is too small. */
moe_status moe_tok_decode(const moe_tok *t, uint8_t *out, size_t cap, size_t *n_out, const uint32_t *ids, size_t n);
/* Bytes moe_tok_decode would write (same errors for bad ids). */
moe_status moe_tok_decoded_len(const moe_tok *t, size_t *len, const uint32_t *ids, size_t n);
/* Plain reference of moe_tok_decode (one memcpy per id). */
moe_status moe_tok_decode_ref(const moe_tok *t, uint8_t *out, size_t cap, size_t *n_out, const uint32_t *ids,
                              size_t n);

/* Length of the longest prefix of s (n bytes) that is valid UTF-8
 * (no overlongs, surrogates or code points above U+10FFFF). */
size_t moe_tok_utf8_valid_prefix(const uint8_t *s, size_t n);

/* ---- file forms (tok_io.c) ---- */

typedef enum {
    MOE_TOK_FORM_AUTO = 0,     /* import: by content */
    MOE_TOK_FORM_TIKTOKEN_JSON,/* {"pat_str", "special_tokens", "bpe_ranks"}: moerun's own form */
    MOE_TOK_FORM_TIKTOKEN,     /* .tiktoken: "base64 rank" lines (no pattern, no specials) */
    MOE_TOK_FORM_HF,           /* Hugging Face tokenizer.json, byte-level BPE */
} moe_tok_form;

/* "tiktoken-json", "tiktoken", "hf", "auto" <-> form; MOE_ERR_ARG on unknown names. */
moe_status moe_tok_form_parse(moe_tok_form *out, const char *name);
const char *moe_tok_form_str(moe_tok_form f);

/* Reads a tokenizer file. `pattern` (may be NULL) overrides the file's
 * pattern and is required for the .tiktoken form, which has none (a name
 * from moe_tok_named_pattern or a regex). Specials given here (n_specials,
 * names, ids) are added to the file's. Errors name the file and the place:
 * MOE_ERR_IO (missing, unreadable), MOE_ERR_FORMAT (bad JSON, bad base64
 * with its position, a rank out of order, duplicate or missing, a missing
 * single byte, a declared size above the limits, an HF merge list that
 * disagrees with the ids), MOE_ERR_ARG (the pattern does not compile:
 * PCRE2's message and offset). */
moe_status moe_tok_load(moe_tok **out, const char *path, moe_tok_form form, const char *pattern, int n_specials,
                        const char *const *special_names, const int64_t *special_ids);
/* The same from a buffer; `what` names it in messages. */
moe_status moe_tok_load_buffer(moe_tok **out, const char *what, const uint8_t *data, size_t n, moe_tok_form form,
                               const char *pattern, int n_specials, const char *const *special_names,
                               const int64_t *special_ids);
/* Writes t in the given form (not AUTO) to path, atomically (temp + rename).
 * The .tiktoken form keeps the ranks only; HF keeps everything (its merges
 * are derived by running BPE on each token with the ranks below its own). */
moe_status moe_tok_save(const moe_tok *t, const char *path, moe_tok_form form);
/* The same into a malloc'd buffer (*data, *n; the caller frees). */
moe_status moe_tok_save_buffer(const moe_tok *t, moe_tok_form form, char **data, size_t *n);

/* A text file mapped read-only: what training and encoding read. A
 * regular file only (a named pipe or device is refused, never waited on);
 * an empty file is data NULL, n 0. MOE_ERR_IO naming the file. */
typedef struct {
    uint8_t *data;
    size_t n;
} moe_tok_text;
moe_status moe_tok_text_map(moe_tok_text *t, const char *path);
void moe_tok_text_unmap(moe_tok_text *t);

/* Strict base64 (RFC 4648, '=' padding required to a multiple of 4, no
 * whitespace): decodes s (n chars) into out (room for 3 * n / 4 bytes).
 * Returns -1 - (position of the first bad character) on error. */
long moe_tok_base64_decode(uint8_t *out, const char *s, size_t n);
/* Encodes n bytes into out (room for 4 * ((n + 2) / 3) + 1), NUL-terminated; returns the length. */
size_t moe_tok_base64_encode(char *out, const uint8_t *in, size_t n);

/* ---- training (tok_train.c) ---- */

/* Byte-level BPE training on text (n bytes) with a pattern (NULL: GPT-2's):
 * ranks 0..255 are the single bytes; then, until vocab_size - n_specials
 * ranks exist or no adjacent pair is left, the adjacent pair (within
 * pieces, weighted by piece counts) with the highest count, ties to the
 * lexicographically smallest (left bytes, right bytes), becomes the next
 * rank and is merged everywhere (a pair whose bytes are already a token
 * merges into it without a new rank). Specials take the ids after the
 * ranks. Pieces are counted over `threads` parts at verified piece
 * boundaries, so the result is the same for any number of threads. */
moe_status moe_tok_train(moe_tok **out, const uint8_t *text, size_t n, int64_t vocab_size, const char *pattern,
                         int n_specials, const char *const *special_names, int threads);

/* The two halves of training, for callers that count on several processes. */
typedef struct moe_tok_counts moe_tok_counts;
moe_status moe_tok_counts_create(moe_tok_counts **out);
void moe_tok_counts_destroy(moe_tok_counts *c);
int64_t moe_tok_counts_n_pieces(const moe_tok_counts *c); /* distinct pieces */
/* Counts the pieces of text into c with the pattern of t, split into
 * n_parts parts (moe_tok_parts_count; a multiple of n_procs) of which this
 * process (proc of n_procs) counts its share on `threads` threads at
 * verified piece boundaries (tok_parts.h). exchange (NULL with one
 * process) gathers every process's part ends: see moe_tok_exchange_fn.
 * *bad (may be NULL) gets the number of split candidates that were not
 * piece boundaries. Collective through exchange. */
typedef moe_status (*moe_tok_exchange_fn)(void *xctx, const size_t *mine, size_t *all, int n_local,
                                          moe_status local);
moe_status moe_tok_counts_add_text(moe_tok_counts *c, const moe_tok *t, const uint8_t *text, size_t n, int n_parts,
                                   int proc, int n_procs, int threads, moe_tok_exchange_fn exchange, void *xctx,
                                   int *bad);
/* Serialise counts (records: uint32 length, int64 count, bytes; malloc'd)
 * and add serialised counts into c (sums: the order does not matter). */
moe_status moe_tok_counts_serialize(const moe_tok_counts *c, uint8_t **data, size_t *n);
moe_status moe_tok_counts_merge(moe_tok_counts *c, const uint8_t *data, size_t n);
/* The merge loop over counted pieces. */
moe_status moe_tok_train_from_counts(moe_tok **out, const moe_tok_counts *c, int64_t vocab_size, const char *pattern,
                                     int n_specials, const char *const *special_names);
/* Plain reference of the merge loop: recounts every pair after each merge. */
moe_status moe_tok_train_from_counts_ref(moe_tok **out, const moe_tok_counts *c, int64_t vocab_size,
                                         const char *pattern, int n_specials, const char *const *special_names);

#endif
