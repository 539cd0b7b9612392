/* A table of named tensors laid out in one contiguous block. The same
 * offsets index the parameter, gradient and both AdamW moment blocks, so
 * checkpointing, gradient reduction and the optimizer are written once,
 * generically, over the table. Names are checkpoint paths under /model
 * (docs/formats.md), e.g. "wte", "h/0/moe/experts/w1". The table of a model
 * is built in one place, from one descriptor of every tensor
 * (src/layout/layout.h). */
#ifndef MOE_TENSOR_H
#define MOE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

enum { MOE_TENSOR_MAX_DIMS = 4, MOE_TENSOR_NAME_MAX = 96 };

typedef struct {
    char name[MOE_TENSOR_NAME_MAX]; /* path under /model */
    int ndim;
    int64_t shape[MOE_TENSOR_MAX_DIMS]; /* GLOBAL shape (dim 0 = E for expert tensors) */
    int expert_sharded;   /* 1: dim 0 is the global expert index and this rank holds
                             rows [row0, row0 + rows); 0: replicated, whole tensor here */
    int64_t row0, rows;   /* local rows of dim 0 (row0 = 0, rows = shape[0] if replicated) */
    /* Expert segments of dim 0 (expert_sharded only). Local expert j owns
     * local rows [seg_off[j], seg_off[j+1]); seg_off NULL: one row per
     * expert (the FFN experts). row_ids NULL: local row i is global row
     * row0 + i; else its global row id (rows of a vocabulary expert are not
     * contiguous in id order). The optimizer's "only activated experts are
     * updated" rule and the checkpoint work per segment through these. */
    const int64_t *seg_off;  /* (local experts + 1) or NULL; owned by the table's builder */
    const int64_t *row_ids;  /* (rows) or NULL */
    /* FFN experts under a non-contiguous placement (layout/placement.h):
     * row_ids holds the global expert of each local row, ascending, and
     * row_primary[i] is 1 when local row i is its expert's copy on the
     * lowest ep rank (the one a checkpoint writes and the gradient norm
     * counts; other copies are bitwise equal to it). NULL: every row. */
    const uint8_t *row_primary;
    int experts;          /* expert_sharded: whose experts dim 0 holds: MOE_EXPERTS_FFN (MoE layer `layer`)
                             or MOE_EXPERTS_VOCAB (the vocabulary head) */
    int layer;            /* block index of an FFN expert tensor (per-expert step counters), else -1 */
    int block;            /* block index of any block tensor, -1 outside the blocks */
    int kind;             /* which tensor (moe_tensor_kind, layout.h) */
    int role;             /* MOE_TENSOR_PARAM, or MOE_TENSOR_BUFFER: checkpointed, no gradient/optimizer state */
    int init;             /* moe_init_kind (layout.h) */
    int decay;            /* 1: AdamW weight decay applies (matrices), 0: biases, norms */
    int dtype;            /* how the file stores it: MOE_TENSOR_F32, or MOE_TENSOR_I32 (integers held in
                             the float block as exact values, |x| < 2^24: the vocabulary partition) */
    size_t offset;        /* offset in floats of the local data within the block */
    size_t numel;         /* local element count */
} moe_tensor;

enum { MOE_TENSOR_PARAM = 0, MOE_TENSOR_BUFFER = 1 };
enum { MOE_TENSOR_F32 = 0, MOE_TENSOR_I32 = 1 };
enum { MOE_EXPERTS_FFN = 0, MOE_EXPERTS_VOCAB = 1 };

typedef struct {
    moe_tensor *t;        /* (n) */
    int n;
    size_t dense;         /* floats of the leading replicated range: expert tensors occupy [dense, total) */
    size_t total;         /* floats in the local block */
    void *owned;          /* the builder's storage behind seg_off / row_ids */
    void *owned_placed;   /* ... and behind the FFN experts' row_ids / row_primary */
} moe_tensor_table;

/* Elements per row of dim 0 (product of shape[1..]). */
static inline int64_t moe_tensor_row_numel(const moe_tensor *t)
{
    int64_t r = 1;
    for (int i = 1; i < t->ndim; i++) r *= t->shape[i];
    return r;
}

/* Local rows [*r0, *r0 + *n) of local expert j of an expert-sharded tensor. */
static inline void moe_tensor_segment(const moe_tensor *t, int j, int64_t *r0, int64_t *n)
{
    *r0 = t->seg_off ? t->seg_off[j] : j;
    *n = t->seg_off ? t->seg_off[j + 1] - t->seg_off[j] : 1;
}

#endif
