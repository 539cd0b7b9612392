/* `moe bench layer --save`: one MoE layer's forward and backward written as
 * an HDF5 file in the layout of docs/formats.md (layer dump). Written by all
 * ranks together through parallel HDF5; the file holds the global view. */
#ifndef MOE_IO_DUMP_H
#define MOE_IO_DUMP_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "core/moe.h"

typedef struct {
    /* global sizes and attributes */
    int64_t tokens, groups;     /* T, G (global) */
    int d_model, d_ff, n_experts, top_k;
    double capacity_factor;
    moe_router_kind router;
    int normalize_topk;
    moe_activation activation;
    double aux_loss_coef, z_loss_coef;
    uint64_t seed;
    /* this rank's token rows [t0, t0 + T_local) of the (T, .) datasets */
    int64_t t0, T_local;
    const float *x, *y, *dy, *dx;        /* (T_local, d) */
    const float *probs, *weight;         /* (T_local, E) */
    const uint8_t *selected, *kept;      /* (T_local, E) */
    /* this rank's expert rows [e0, e0 + E_local) of the (E, ...) datasets;
     * write_experts = 0 on ranks that must not write them (other replicas) */
    int64_t e0, E_local;
    int write_experts;
    const float *w1, *b1, *w2, *b2;      /* local experts (E_local, ...) */
    const float *gw1, *gb1, *gw2, *gb2;  /* their gradients, reduced */
    /* replicated tensors, written by world rank 0 */
    const float *router_w, *grad_router_w; /* (E, d) */
    double load_balance, z_loss;         /* means over the global groups */
} moe_dump_view;

/* Collective over c's world (moe_comm_self(): one process). Writes path
 * (replacing it) atomically through the one HDF5 writer (io/h5.h: temp name,
 * flush, fsync, rename, directory fsync). Fails with
 * MOE_ERR_IO naming the file. Every rank gets the same status. */
moe_status moe_dump_write(const char *path, moe_comm *c, const moe_dump_view *v);

/* Single-process readers (default HDF5 driver, not collective), for tests
 * and tools: read the whole dataset (e.g. "/grad/x") into out, which holds n
 * elements. MOE_ERR_IO if the file or dataset cannot be opened or read,
 * MOE_ERR_FORMAT if its element count is not n or its type class differs
 * (float for _f32, integer for _u8). */
moe_status moe_dump_read_f32(const char *path, const char *dataset, float *out, size_t n);
moe_status moe_dump_read_u8(const char *path, const char *dataset, uint8_t *out, size_t n);

#endif
