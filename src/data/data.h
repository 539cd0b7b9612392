/* Training data: the built-in synthetic multi-domain corpus and the batch
 * loader over a corpus of token ids, read either as bytes (one id per byte,
 * vocabulary 256) or from a token file of `moe data encode` (src/tokenizer/
 * tokfile.h). Nothing here is collective: every rank maps the file itself
 * (so ranks on one node share the page cache) and reads only its own
 * sequences, and every batch is a pure function of (seed, step, global
 * sequence index), so it does not depend on the number of ranks. Reading a
 * window is a copy of seq_len + 1 ids widened to int32.
 *
 * Random counters (Philox, key {seed, MOE_RNG_DATA}; the fourth counter word
 * names the use so the streams never overlap):
 *   training window of global sequence g at step s:
 *       ctr = {g, s & 0xffffffff, s >> 32, MOE_DATA_CTR_TRAIN};
 *       r = (w0 << 32) | w1 (64 bits: w0 is moe_rng_uniform's word),
 *       start = floor(r * n_windows / 2^64), n_windows = train_tokens - seq_len,
 *       so the window [start, start + seq_len] lies in the training part;
 *   synthetic corpus draw i (i = 0, 1, ... in generation order):
 *       u = moe_rng_uniform(seed, MOE_RNG_DATA, i & 0xffffffff, i >> 32, 0, MOE_DATA_CTR_SYNTH).
 * Validation uses no randomness (moe_data_val_batch). */
#ifndef MOE_DATA_H
#define MOE_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"
#include "tokenizer/tokenizer.h"

enum { MOE_DATA_CTR_TRAIN = 0, MOE_DATA_CTR_SYNTH = 1 };

/* ---- synthetic corpus (synth.c) ---- */

/* Domains of the synthetic corpus, ids 0 .. moe_data_n_domains()-1:
 * arith ("17+25=42"), strings ("rev: abc -> cba", "sort: ...", "upper: ..."),
 * english (a small grammar with agreement), records ("{id: 4821, name: ...}"),
 * code (C-like statements), roman ("roman 1994 = MCMXCIV"),
 * dates ("2021-03-04 = march 4, 2021"). */
int moe_data_n_domains(void);
/* Short name of domain i ("arith", ...), NULL if i is out of range. */
const char *moe_data_domain_name(int i);

/* Writes the first n bytes of the corpus of `seed` into text (n), and the
 * domain id of every byte into domain (n) unless domain is NULL. The corpus
 * is a sequence of documents, each whole lines of one domain adding up to
 * 192..640 bytes (so every domain has about the same byte share); every
 * document after the first starts with an empty line. Pure function of
 * seed: the corpus of n bytes is a prefix of the corpus of any m > n bytes
 * (so the last line is usually cut). Buffers are the caller's. Fails only
 * with MOE_ERR_ARG on a NULL text with n > 0. */
moe_status moe_data_synth(uint8_t *text, uint8_t *domain, size_t n, uint32_t seed);

/* ---- loader (data.c) ---- */

/* How a file is read: bytes (id = byte value) or a token file. */
typedef enum { MOE_DATA_AUTO = 0, MOE_DATA_BYTES = 1, MOE_DATA_TOKENS = 2 } moe_data_format;

/* The format a file is read in: AUTO means TOKENS for a name ending in
 * ".tok", BYTES otherwise; the others are returned as they are. */
moe_data_format moe_data_format_of(moe_data_format f, const char *path);

typedef struct {
    const char *path;        /* training file */
    const char *val_path;    /* validation file; NULL or "": the val_frac tail of path */
    double val_frac;         /* in [0, 1); ignored with a val_path */
    int seq_len;             /* windows of seq_len + 1 tokens */
    uint32_t seed;           /* training windows */
    moe_data_format format;  /* of both files (AUTO: by each name) */
    /* Token files must have been encoded with this tokenizer (its hash and
     * vocab_size); it also gives the bytes each id stands for (bits per
     * byte). Required with token files; NULL for bytes. */
    const moe_tok *tok;
} moe_data_config;

typedef struct moe_data moe_data;

/* Opens the data: the training file, and the validation part (the file
 * val_path, else the last floor(val_frac * n) tokens of path, which are
 * removed from the training part; val_frac = 0: no validation data). To
 * evaluate on a whole file, pass it as both path and val_path. Both files
 * must be read the same way (bytes, or token files of one tokenizer).
 * Errors (detail names the file): MOE_ERR_IO if a file is missing or
 * unreadable; MOE_ERR_FORMAT for a damaged token file (tokfile.h: header,
 * size, an id >= its vocab_size); MOE_ERR_MISMATCH for a token file encoded
 * with another tokenizer; MOE_ERR_ARG if a file is empty, if the training or
 * validation part is shorter than seq_len+1 tokens, if the files are of two
 * kinds, for a token file without a tokenizer, a tokenizer with byte data,
 * or bad arguments (seq_len < 1, val_frac outside [0, 1)). Owner: caller
 * (moe_data_destroy). */
moe_status moe_data_open_config(moe_data **out, const moe_data_config *c);
/* The same for a file read as bytes (format BYTES, no tokenizer). */
moe_status moe_data_open(moe_data **out, const char *path, const char *val_path, double val_frac, int seq_len,
                         uint32_t seed);
void moe_data_destroy(moe_data *ds);

int moe_data_seq_len(const moe_data *ds);
int moe_data_is_tokens(const moe_data *ds); /* 1: token files, 0: bytes */
/* Ids are < this: 256 for bytes, the token file's vocab_size otherwise. */
int64_t moe_data_vocab_size(const moe_data *ds);
int64_t moe_data_train_tokens(const moe_data *ds);
int64_t moe_data_val_tokens(const moe_data *ds);   /* 0: no validation data */
/* The bytes the training / validation tokens stand for (= tokens for byte
 * data): the sum of the lengths of their ids' byte strings (moe_tok_token;
 * a special counts the length of its name, which is what decoding gives). */
int64_t moe_data_train_bytes(const moe_data *ds);
int64_t moe_data_val_bytes(const moe_data *ds);
/* (vocab_size) bytes each id stands for, as above; all 1 for bytes. */
const int32_t *moe_data_id_bytes(const moe_data *ds);
/* The same table for ids [0, V) of tok (a special: the length of its name;
 * a hole or an id >= tok's vocab_size: 0), or all 1 when tok is NULL
 * (bytes), into a new buffer (*out, moe_free). MOE_ERR_NOMEM. */
moe_status moe_data_id_bytes_of(int32_t **out, const moe_tok *tok, int64_t V);
/* Number of validation windows: they tile the validation part with stride
 * seq_len (window w = tokens [w*seq_len, w*seq_len + seq_len]). */
int64_t moe_data_val_windows(const moe_data *ds);

/* Start, in the training part, of the window of global sequence g at step s
 * (the counter in the header comment). */
int64_t moe_data_train_offset(const moe_data *ds, int64_t step, int64_t g);

/* Training batch rows for global sequences [seq0, seq0 + nseq) of `step`:
 * inputs (nseq, seq_len) = window tokens 0..seq_len-1, targets (nseq,
 * seq_len) = window tokens 1..seq_len, as ids. Rank r of W with a global
 * batch of B sequences passes seq0 = r*B/W, nseq = B/W, and gets exactly
 * those rows of the batch one process would build. MOE_ERR_ARG on negative
 * step / seq0 / nseq. */
moe_status moe_data_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t step, int seq0,
                          int nseq);
/* The bytes the targets of those rows stand for (no copy: a pure function
 * of the same windows), e.g. of a whole global batch for bits per byte. */
int64_t moe_data_batch_bytes(const moe_data *ds, int64_t step, int seq0, int nseq);

/* Validation rows for sequences [seq0, seq0 + nseq) of a validation pass of
 * n_total sequences (e.g. val_batches * batch_size; batch v, rank r:
 * seq0 = v*B + r*B/W). Sequence g reads window floor(g * n_windows / n_total):
 * evenly spread over the validation part, all distinct when n_total <=
 * n_windows, and a pass with n_total = n_windows reads every window once.
 * Deterministic, independent of the seed. MOE_ERR_ARG without validation data
 * or when [seq0, seq0 + nseq) is not inside [0, n_total). */
moe_status moe_data_val_batch(const moe_data *ds, int32_t *inputs, int32_t *targets, int64_t seq0,
                              int64_t n_total, int nseq);
/* The bytes the targets of a whole validation pass of n_total sequences
 * stand for (0 without validation data). */
int64_t moe_data_val_pass_bytes(const moe_data *ds, int64_t n_total);

/* counts (V) = occurrences of every token id in the training part (the
 * input of the frequency partition of the vocabulary experts). MOE_ERR_ARG
 * when a token is not below V (naming its offset). */
moe_status moe_data_train_counts(const moe_data *ds, int64_t *counts, int V);

/* Unigram entropy of the training part: the loss of the best model that
 * ignores context, the baseline for what a model learned. In bits per
 * token, and in bits per byte (the token bits over the bytes they stand
 * for; the same for byte data). */
double moe_data_unigram_bpt(const moe_data *ds);
double moe_data_unigram_bpb(const moe_data *ds);

/* Unigram entropy of n bytes in bits per byte (0 for n == 0). */
double moe_data_bytes_entropy(const uint8_t *p, size_t n);

/* Writes n bytes to path (created or truncated). MOE_ERR_IO naming the path. */
moe_status moe_data_write_file(const char *path, const void *buf, size_t n);

#endif
