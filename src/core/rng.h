/* Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
 * A draw is a pure function of (key, counter): no state, no order
 * dependence, so a value keyed by a *global* index is the same whatever the
 * number of ranks and whichever rank computes it.
 *
 * Keys: key[0] = the run seed (low 32 bits), key[1] = a stream id naming the
 * use (below). Counters: four 32-bit words chosen by each use and documented
 * where it is used (docs/routing.md, docs/training.md). */
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stdint.h>

enum {
    MOE_RNG_ROUTER_NOISE = 1, /* ctr = {global token, expert, layer, step} */
    MOE_RNG_INIT = 2,         /* ctr = {element lo, element hi, tensor id, 0} (src/model/model.c) */
    MOE_RNG_DATA = 3,         /* training windows and the corpus: see src/data/data.h */
    MOE_RNG_BENCH = 4,        /* ctr = {element lo, element hi, tensor id, 0} */
    MOE_RNG_SAMPLE = 5,       /* ctr = {position, sequence, 0, 0} */
    MOE_RNG_VOCAB_KMEANS = 6, /* ctr = {row, seeding round, 0, 0}: k-means++ (src/vocab/partition.c) */
};

/* out = Philox4x32-10(ctr, key). */
void moe_philox(uint32_t out[4], const uint32_t ctr[4], const uint32_t key[2]);

/* Uniform in (0, 1), from the first word of the Philox block. */
double moe_rng_uniform(uint32_t seed, uint32_t stream, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3);

/* Standard normal by Box-Muller from the first two words:
 * u1 = (w0 + 0.5) / 2^32, u2 = (w1 + 0.5) / 2^32, z = sqrt(-2 ln u1) cos(2 pi u2). */
double moe_rng_normal(uint32_t seed, uint32_t stream, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3);

#endif
