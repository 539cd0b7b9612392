/* Vocabulary experts, part 1: the partition of the token ids 0..V-1 into M
 * disjoint non-empty sets S_0..S_{M-1}, one per vocabulary expert
 * (docs/vocab-experts.md), and the expert-major row layout built on it.
 *
 * Two builders, each with a plain _ref beside it that gives the identical
 * assignment: by token frequency (equal-count bands) and by k-means over
 * token embeddings (k-means++ seeding from Philox, Lloyd, empty-cluster
 * rule, optional size cap). Both are pure functions of their inputs (and
 * seed): independent of the thread count and of the number of ranks.
 *
 * Layout: "expert-major rows" are the token ids of S_0 ascending, then those
 * of S_1, ... (moe_vocab_part_ids). The head keeps its output rows W_out,
 * c in that order so that each expert's rows are one contiguous block
 * (one GEMM); a rank owning experts [m0, m1) holds rows
 * [offsets[m0], offsets[m1]). Checkpoints and references store rows by token
 * id; moe_vocab_rows_gather / _scatter convert. Purely local, no MPI, but
 * for moe_vocab_part_share. */
#ifndef MOE_VOCAB_PARTITION_H
#define MOE_VOCAB_PARTITION_H

#include <stdint.h>

#include "core/moe.h"

typedef struct moe_vocab_part moe_vocab_part;

/* Builds the sets from assign (V) with entries in [0, M): S_m lists the ids
 * v with assign[v] = m in increasing order. Fails with MOE_ERR_ARG naming
 * the problem: M < 2, M > V, an entry out of range (the first such id), an
 * empty set (the first empty expert). MOE_ERR_NOMEM. Owner: caller. */
moe_status moe_vocab_part_create(moe_vocab_part **out, const int32_t *assign, int V, int M);
void moe_vocab_part_destroy(moe_vocab_part *p);

int moe_vocab_part_vocab(const moe_vocab_part *p);          /* V */
int moe_vocab_part_experts(const moe_vocab_part *p);        /* M */
const int32_t *moe_vocab_part_assign(const moe_vocab_part *p);  /* (V) expert of each token id */
/* (M+1): expert m's rows are [offsets[m], offsets[m+1]); |S_m| = their difference. */
const int32_t *moe_vocab_part_offsets(const moe_vocab_part *p);
const int32_t *moe_vocab_part_ids(const moe_vocab_part *p);     /* (V) token id of each expert-major row */
const int32_t *moe_vocab_part_rows(const moe_vocab_part *p);    /* (V) expert-major row of each token id */
int moe_vocab_part_max_size(const moe_vocab_part *p);           /* max |S_m| */
/* Sum of the k largest |S_m| (1 <= k <= M): the most candidates a top-k
 * distribution can hold per position. */
int64_t moe_vocab_part_topk_size(const moe_vocab_part *p, int k);

/* Row layout conversions for (V, w) float matrices (w = d for W_out, 1 for c):
 * gather: dst[row] = src[ids[row]] (by token id -> expert-major);
 * scatter: dst[ids[row]] = src[row] (expert-major -> by token id). */
void moe_vocab_rows_gather(float *dst, const float *src, const moe_vocab_part *p, int w);
void moe_vocab_rows_scatter(float *dst, const float *src, const moe_vocab_part *p, int w);

/* ---- frequency partition ----
 * Ids sorted by count descending, ties to the lower id; band j (0-based)
 * ends after the first sorted position at which the running count reaches
 * (j+1)/M of the total (exact integer comparison), moved later if needed so
 * that every band holds at least one id; ids with count 0 therefore fall in
 * the last band (except when fewer than M ids have a count: see
 * docs/vocab-experts.md). Fails with MOE_ERR_ARG: M < 2, M > V, a negative
 * count (naming the id), all counts 0, a total that overflows. Writes assign (V). */
moe_status moe_vocab_partition_frequency(int32_t *assign, const int64_t *counts, int V, int M);
/* Same result by O(V^2) ranking, for tests. */
moe_status moe_vocab_partition_frequency_ref(int32_t *assign, const int64_t *counts, int V, int M);

/* ---- k-means partition ---- */
typedef struct {
    uint32_t seed;  /* run seed: the k-means++ draws (Philox stream MOE_RNG_VOCAB_KMEANS) */
    int iters;      /* Lloyd assignment steps, >= 1 (default 25) */
    double balance; /* cap |S_m| at ceil(V/M * balance); 0 = no cap, else >= 1 (default 2.0) */
} moe_vocab_kmeans_config;

void moe_vocab_kmeans_config_default(moe_vocab_kmeans_config *c);

/* Clusters the rows of emb (V, d) (e.g. the input embedding wte) into M
 * sets by squared Euclidean distance; the full rule (seeding, ties, empty
 * clusters, the cap and the order of its moves) is in docs/vocab-experts.md.
 * Every decision compares distances computed by moe_vocab_dist2 (exact
 * arithmetic the function fixes); the fast path screens candidates with
 * cblas_sgemm and a rigorous error bound, then decides on moe_vocab_dist2,
 * so it gives the same assignment as the _ref bit for bit. Fails with
 * MOE_ERR_ARG (M < 2, M > V, d < 1, iters < 1, balance not 0 and < 1),
 * MOE_ERR_NONFINITE (naming the first non-finite row), MOE_ERR_NOMEM.
 * Writes assign (V). */
moe_status moe_vocab_partition_kmeans(int32_t *assign, const float *emb, int V, int d, int M,
                                      const moe_vocab_kmeans_config *cfg);
/* Same result with every distance computed by moe_vocab_dist2 and naive
 * loops everywhere (O(iters V M d)), for tests. */
moe_status moe_vocab_partition_kmeans_ref(int32_t *assign, const float *emb, int V, int d, int M,
                                          const moe_vocab_kmeans_config *cfg);

/* The distance every k-means decision uses: sum_k (a_k - b_k)^2 with each
 * difference and square in double, summed in 8 lanes (k mod 8) combined in a
 * fixed order. Compiled without floating-point contraction, so its bits are
 * the same wherever it is called from. */
double moe_vocab_dist2(const float *a, const float *b, int d);

/* ---- partition files ----
 * An HDF5 file holding /model/vocab_head/assign (V) int32 (Fletcher32) and
 * the /model attributes vocab_size, vocab_experts and vocab_partition (the
 * method name): the same paths as a checkpoint, so a checkpoint of a
 * vocab_experts model is a valid partition file too. */
moe_status moe_vocab_part_write(const moe_vocab_part *p, const char *path, const char *method);
/* Reads and validates a partition file. V, M > 0: the file must have that
 * many ids / experts (MOE_ERR_ARG naming both); 0: take the file's.
 * MOE_ERR_IO (missing or unreadable), MOE_ERR_FORMAT (not HDF5, no assign
 * dataset, wrong type or rank, vocab_experts missing), MOE_ERR_CHECKSUM,
 * MOE_ERR_ARG (content: an expert out of range or an empty set, as
 * moe_vocab_part_create, with the file named). Owner: caller. */
moe_status moe_vocab_part_read(moe_vocab_part **out, const char *path, int V, int M);

/* ---- over the ranks (partition_comm.c) ---- */
struct moe_comm;
/* World rank 0's partition on every rank: on rank 0, *p is the partition
 * (built by the caller with status st; untouched), on the others it becomes
 * a copy. st (each rank's status so far) is agreed first. Collective over
 * comm's world; every rank returns the cause's status and detail, and then
 * *p is NULL everywhere (rank 0's is destroyed). */
moe_status moe_vocab_part_share(moe_vocab_part **p, moe_status st, struct moe_comm *comm);

#endif
