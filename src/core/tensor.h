/* A table of named parameter tensors laid out in one contiguous block.
 * The same offsets index the parameter, gradient and both AdamW moment
 * blocks, so checkpointing, gradient reduction and the optimizer are written
 * once, generically, over the table. Names are checkpoint paths under
 * /model (docs/formats.md), e.g. "wte", "h/0/moe/experts/w1". */
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
    int layer;            /* block index of an expert tensor (for per-expert step counters), else -1 */
    int decay;            /* 1: AdamW weight decay applies (matrices), 0: biases, norms */
    size_t offset;        /* offset in floats of the local data within the block */
    size_t numel;         /* local element count */
} moe_tensor;

typedef struct {
    moe_tensor *t;        /* (n) */
    int n;
    size_t total;         /* floats in the local block */
} moe_tensor_table;

/* Elements per row of dim 0 (product of shape[1..]). */
static inline int64_t moe_tensor_row_numel(const moe_tensor *t)
{
    int64_t r = 1;
    for (int i = 1; i < t->ndim; i++) r *= t->shape[i];
    return r;
}

#endif
