/* Expert placement: which ep rank holds which global expert of each MoE
 * layer, in how many copies (docs/routing.md "Expert placement", file format
 * docs/formats.md section "Placement file").
 *
 * Per MoE layer and ep rank, S slots, each holding one global expert; every
 * rank has the same S = (E + R) / P; every expert is held at least once;
 * a replicated expert's copies are on distinct ranks (R = P S - E extra
 * copies in all). A rank's slots are kept in ascending expert order: slot
 * order does not change any result (the combine runs in expert order), and
 * ascending rows map a rank's expert block onto the global [E, ...]
 * datasets of a checkpoint with one row selection, no permutation.
 *
 * The default is contiguous: S = E/P, rank p holds [p S, (p+1) S), i.e.
 * expert e in exchange destination e. Checkpoints are in global expert
 * order whatever the placement, so any placement loads any file.
 *
 * Not collective: every rank builds the same descriptor from the same file. */
#ifndef MOE_PLACEMENT_H
#define MOE_PLACEMENT_H

#include <stdint.h>

#include "core/moe.h"

typedef struct moe_placement moe_placement;

/* The contiguous placement of E experts over P ranks for n_layers MoE
 * layers. MOE_ERR_ARG (P does not divide E), MOE_ERR_NOMEM. Owner: caller. */
moe_status moe_placement_create_contiguous(moe_placement **out, int n_layers, int n_experts, int ranks);

/* A placement from slot lists: slots (n_layers, ranks, S), any order inside
 * a rank (sorted here). `what` names the source in messages (a file name).
 * Checks every rule above; MOE_ERR_ARG naming the layer, rank and expert. */
moe_status moe_placement_create(moe_placement **out, int n_layers, int n_experts, int ranks, int slots_per_rank,
                                const int *slots, const char *what);

/* Reads a placement file (JSON) and checks it against the model: n_layers
 * MoE layers at blocks `blocks` (n_layers entries; NULL: not checked),
 * n_experts experts, an ep group of `ranks`. A missing or unreadable file
 * is MOE_ERR_IO, bad JSON or a broken rule MOE_ERR_FORMAT, a placement
 * made for another model or ep size MOE_ERR_MISMATCH naming both values. */
moe_status moe_placement_load(moe_placement **out, const char *path, int n_layers, const int *blocks, int n_experts,
                              int ranks);

/* Writes p as a placement file (temporary name, then rename: a reader never
 * sees half a file). blocks: the MoE layers' block indices (n_layers), or
 * NULL. MOE_ERR_IO naming the path. */
moe_status moe_placement_save(const moe_placement *p, const int *blocks, const char *path);

/* The load-based placement (EPLB): per layer, from loads (n_layers, E) of
 * tokens per expert, the R extra copies go one at a time to the expert with
 * the highest load per copy (ties: lower id), then the copies are placed
 * heaviest first (load / copies; ties: lower id) on the least-loaded rank
 * with a free slot that does not hold that expert yet (ties: lower rank);
 * then, while one helps, the swap of two copies between the busiest rank
 * and another that most lowers the larger of the two loads. With R > 0,
 * while it lowers the busiest rank's load, one extra copy moves to one of
 * the hottest other experts and the packing runs again (the EPLB counts
 * are not always the easiest to pack into equal slots). Deterministic.
 * MOE_ERR_ARG when R < 0, when P does not divide E + R, or when
 * R > E (P - 1) (a rank would hold two copies of one expert). */
moe_status moe_placement_plan(moe_placement **out, const int64_t *loads, int n_layers, int n_experts, int ranks,
                              int replicas);

void moe_placement_destroy(moe_placement *p);

int moe_placement_n_layers(const moe_placement *p);
int moe_placement_n_experts(const moe_placement *p);
int moe_placement_ranks(const moe_placement *p);
int moe_placement_slots_per_rank(const moe_placement *p);  /* S */
int moe_placement_replicas(const moe_placement *p);        /* R = P S - E */
/* 1 when every layer is the contiguous default. */
int moe_placement_is_contiguous(const moe_placement *p);
/* The S global experts of ep rank `rank` in MoE layer `layer`, ascending;
 * slot j of that rank is exchange destination rank * S + j. */
const int *moe_placement_slots(const moe_placement *p, int layer, int rank);
/* 1 when slot j of `rank` holds the copy of its expert on the lowest rank:
 * that copy writes the expert's checkpoint rows and counts in the gradient
 * norm (the others are bitwise equal to it). */
int moe_placement_primary(const moe_placement *p, int layer, int rank, int j);
/* Copies of expert e in layer `layer`. */
int moe_placement_copies(const moe_placement *p, int layer, int e);

/* Tokens each rank processes under p from per-expert loads (E) of layer
 * `layer`: a replicated expert's tokens are spread evenly over its copies.
 * out (ranks). */
void moe_placement_rank_loads(const moe_placement *p, int layer, const int64_t *loads, double *out);

#endif
