/* What the fast partition builders and their _ref share on purpose: the
 * argument checks (same messages) and the arithmetic of every k-means
 * decision (the draw; the distance is moe_vocab_dist2 in partition.h).
 * Internal to src/vocab. */
#ifndef MOE_VOCAB_PARTITION_INTERNAL_H
#define MOE_VOCAB_PARTITION_INTERNAL_H

#include <stdint.h>

#include "vocab/partition.h"

/* M < 2 or M > V: MOE_ERR_ARG naming both. */
moe_status moe_vocab_check_sizes(int V, int M);

/* Frequency input: counts >= 0, total > 0 and total * M representable. */
moe_status moe_vocab_check_counts(const int64_t *counts, int V, int M, int64_t *total);

/* k-means input (sizes, config, finite rows); *cap = the size cap
 * (ceil(V/M * balance) with moe_ceil_tol, or V when balance = 0). */
moe_status moe_vocab_kmeans_check(const float *emb, int V, int d, int M, const moe_vocab_kmeans_config *cfg,
                                  int *cap);

/* The k-means++ exponential clock of a row in a seeding round:
 * -ln(u), u = Philox uniform keyed (seed, MOE_RNG_VOCAB_KMEANS) with counter
 * {row, round, 0, 0}. A round picks the row with the smallest clock / weight
 * (weight = squared distance to the nearest centre so far; 1 in round 0),
 * which draws rows with probability proportional to their weight
 * (Efraimidis-Spirakis) from per-row draws only. */
double moe_vocab_kmeans_clock(uint32_t seed, int round, int row);

#endif
