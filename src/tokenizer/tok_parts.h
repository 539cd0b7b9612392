/* Splitting a text into parts that are encoded (or counted) independently,
 * by threads of this process and by other processes, with exactly the
 * pieces of one scan over the whole text.
 *
 * Parts are spread over processes (interleaved) and, within a process, over
 * threads through a queue. The split positions are candidates (moe_tok_split_candidate); each is
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

/* Part k belongs to process k % n_procs (interleaved, so that every process
 * gets some of every region of the text; content differs in cost per
 * byte), as its local part k / n_procs; each process runs its parts on
 * `threads` threads that take them from a queue. */
static inline int moe_tok_part_local(int k, int n_procs) { return k / n_procs; }

/* The exchange (moe_tok_exchange_fn, tokenizer.h) is collective over the
 * processes sharing the text: mine holds the ends of this process's n_local
 * parts in local order; all (n_local * n_procs) gets every process's,
 * process by process. It returns `local` if not OK, else MOE_ERR_REMOTE if
 * another process failed, else MOE_OK. */

typedef struct {
    /* Scans text[start, first boundary >= stop) of `part` with encoder e,
     * appending to the part's results; *end gets the boundary reached.
     * Called from this process's threads, one part per thread at a time. */
    moe_status (*run)(void *ctx, int part, moe_tok_encoder *e, size_t start, size_t stop, size_t *end);
    /* Drops the results of `part` (it was emptied). */
    void (*reset)(void *ctx, int part);
    void *ctx;
    moe_tok_exchange_fn exchange; /* NULL with one process */
    void *xctx;
} moe_tok_parts_ops;

/* Split positions for n_parts parts: splits[0] = 0, splits[n_parts] = n,
 * splits[k] the candidate near k * n / n_parts (non-decreasing; equal
 * neighbours make empty parts). A pure function of the text. */
void moe_tok_parts_plan(moe_tok_encoder *e, const uint8_t *text, size_t n, int n_parts, size_t *splits);

/* How many parts for n bytes over n_procs x threads: a multiple of n_procs,
 * up to 16 per thread while parts stay above 256 KB (small parts balance
 * text of different cost; each costs a candidate check of a few lines). */
int moe_tok_parts_count(size_t n, int n_procs, int threads);

/* Runs this process's parts (proc of n_procs; n_parts a multiple of
 * n_procs) on `threads` threads with encoders of t (each with the delimiter
 * delim / sep when delim_len > 0), repairing the splits as described above;
 * splits (n_parts + 1) is planned here and holds the final positions on
 * return (every process agrees on them). *n_bad (may be NULL) gets the
 * number of candidates that were not piece boundaries; cpu (may be NULL;
 * one entry per local part) the CPU seconds each local part took (what the
 * work costs, whatever else shares the machine). Collective through
 * ops->exchange when it is set. */
moe_status moe_tok_parts_run(const moe_tok *t, const uint8_t *delim, size_t delim_len, int64_t sep,
                             const uint8_t *text, size_t n, int n_parts, int proc, int n_procs, int threads,
                             const moe_tok_parts_ops *ops, size_t *splits, int *n_bad, double *cpu);

#endif
