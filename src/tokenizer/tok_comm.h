/* The tokenizer over MPI ranks: training and corpus encoding split over
 * ranks (the communicator's world) and threads. MPI only through src/comm.
 * With c == NULL both run in this process alone (no MPI needed). */
#ifndef MOE_TOK_COMM_H
#define MOE_TOK_COMM_H

#include "comm/comm.h"
#include "tokenizer/tokenizer.h"

typedef struct {
    size_t bytes;        /* corpus bytes */
    int64_t pieces;      /* distinct pieces */
    double count_seconds;/* piece counting (this rank's parts and the exchanges) */
    double merge_seconds;/* gathering counts and the merge loop */
    int bad_splits;      /* split candidates that were not piece boundaries */
} moe_tok_train_stats;

/* Trains on the file `path` (see moe_tok_train): pieces counted over
 * parts spread over the W ranks and their threads (tok_parts.h), the
 * counts of every rank summed on every rank, then the merge loop, which
 * every rank runs on the same counts, so *out is the same everywhere and
 * the same for any W and threads. Collective over the world of c; errors
 * (missing file, bad pattern, no memory on any rank) come back on every
 * rank (MOE_ERR_REMOTE on the others, naming the rank). */
moe_status moe_tok_train_comm(moe_tok **out, moe_comm *c, const char *path, int64_t vocab_size, const char *pattern,
                              int n_specials, const char *const *special_names, int threads,
                              moe_tok_train_stats *stats);

typedef struct {
    size_t bytes;          /* input bytes */
    uint64_t tokens;       /* ids written */
    double encode_seconds; /* mapping, split planning, encoding, repairs */
    double write_seconds;  /* pwrite, fsync, rename */
    int bad_splits;
    int parts;
    double cpu_sum;       /* CPU seconds of all parts (all ranks) */
    double split_bound;   /* cpu_sum over the longest a rank needs on its threads (its parts' CPU
                           * over its threads, or its largest part): the speed-up the split allows
                           * on free cores, whatever else runs on this machine */
} moe_tok_encode_stats;

/* Encodes the file in_path with t into the token file out_path (tokfile.h):
 * parts over the W ranks and their threads as in training, so the ids are those of one
 * moe_tok_encode of the whole file. With delim_len > 0 every occurrence of
 * delim becomes the id sep (documents are encoded separately). Rank 0
 * creates out_path.tmp at its final size, every rank pwrites its parts'
 * ids at the exclusive prefix sum of the token counts before them, then
 * syncs; rank 0 writes the header and renames the file into place (an
 * existing out_path is replaced only by a complete file). Collective over
 * the world of c; any rank's failure (unreadable input, unwritable output)
 * returns non-OK on every rank and leaves no temporary file. */
moe_status moe_tok_encode_file(moe_comm *c, const moe_tok *t, const char *in_path, const char *out_path,
                               int threads, const uint8_t *delim, size_t delim_len, int64_t sep,
                               moe_tok_encode_stats *stats);

#endif
