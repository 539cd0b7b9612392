/* Splitting a text into parts that are encoded (or counted) independently,
 * by threads of this process and by other processes, with exactly the
 * pieces of one scan over the whole text.
 *
 * The split positions are candidates (moe_tok_split_candidate); each is
 * verified by the part before it: part k starts on a piece boundary (part 0
 * at 0; by induction the others), so its scan is the whole text's scan, and
 * if it lands exactly on the next split that split is a piece boundary too.
 * When it crosses the split instead, the parts it crossed are emptied and
 * part k goes on, from where it ended, to the next split at or after that
 * point; this repeats until every non-empty part ends exactly where the next
 * one starts. The result never depends on the number of parts.
 *
 * Used by training (tok_train.c) and by moe_tok_encode_file (tok_comm.c).
 * No MPI here: an exchange callback gathers every process's part ends. */
#ifndef MOE_TOK_PARTS_H
#define MOE_TOK_PARTS_H

#include "tokenizer/tokenizer.h"

/* Collective over the processes sharing the text: ends has n_parts
 * entries, this process's own [p0, p1) filled in; on return all are.
 * Returns `local` if not OK, else MOE_ERR_REMOTE if another process
 * failed, else MOE_OK. */
typedef struct {
    /* Scans text[start, first boundary >= stop) of `part` with encoder e,
     * appending to the part's results; *end gets the boundary reached.
     * Called from this process's threads, one part per thread at a time. */
    moe_status (*run)(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end);
    /* Drops the results of `part` (it was emptied). */
    void (*reset)(void *ctx, int part);
    void *ctx;
    moe_tok_exchange_fn exchange; /* NULL when one process has all parts */
    void *xctx;
} moe_tok_parts_ops;

/* Split positions for n_parts parts: splits[0] = 0, splits[n_parts] = n,
 * splits[k] the candidate near k * n / n_parts (non-decreasing; equal
 * neighbours make empty parts). A pure function of the text. */
void moe_tok_parts_plan(moe_tok_encoder *e, const uint8_t *text, size_t n, int n_parts, size_t *splits);

/* Runs parts [p0, p1) of n_parts (one thread each) over text with encoders
 * of t (each with the delimiter delim / sep when delim_len > 0), repairing
 * the splits as described above; splits (n_parts + 1) is planned here and
 * holds the final positions on return (every process agrees on them).
 * *n_bad (may be NULL) gets the number of candidates that were not piece
 * boundaries; cpu (may be NULL; p1 - p0 entries) the CPU seconds of the
 * thread that ran each local part (what the part costs, whatever else
 * shares the machine). Collective through ops->exchange when it is set. */
moe_status moe_tok_parts_run(const moe_tok *t, const uint8_t *delim, size_t delim_len, int64_t sep,
                             const uint8_t *text, size_t n, int n_parts, int p0, int p1, const moe_tok_parts_ops *ops,
                             size_t *splits, int *n_bad, double *cpu);

#endif
