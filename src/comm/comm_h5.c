/* Parallel HDF5 property lists over a moe_comm's world communicator. */
#include "comm/comm_h5.h"

#include <limits.h>
#include <stdlib.h>

#include "comm/comm_internal.h"

hid_t moe_comm_h5_fapl(const moe_comm *c)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    /* One rank: the POSIX driver writes the same file 3x faster than MPI-IO
     * (no collective two-phase machinery for filtered chunks). */
    if (fapl == H5I_INVALID_HID || !c || c->size == 1) return fapl;
    if (H5Pset_fapl_mpio(fapl, c->world, MPI_INFO_NULL) < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

hid_t moe_comm_h5_dxpl(const moe_comm *c)
{
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    if (dxpl == H5I_INVALID_HID || !c || c->size == 1) return dxpl;
    if (H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE) < 0) {
        H5Pclose(dxpl);
        return H5I_INVALID_HID;
    }
    return dxpl;
}

/* ---- node writers ---- */

struct moe_comm_h5_writers {
    int self;         /* one process without MPI communicators: it writes, nothing moves */
    MPI_Comm node;    /* the ranks of this node, writer = node rank 0 (lowest world rank) */
    MPI_Comm writers; /* writers only (MPI_COMM_NULL elsewhere) */
    int node_rank, node_size, n_writers;
    int64_t *counts;  /* (2 node_size) (first, rows) per node rank, on the writer */
    int *rcounts, *displs; /* (node_size) Gatherv counts and displacements in rows */
};

moe_status moe_comm_h5_writers_create(moe_comm_h5_writers **out, moe_comm *c)
{
    *out = NULL;
    moe_comm_h5_writers *w = calloc(1, sizeof *w);
    moe_status st = w ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "node writers: out of memory");
    const int self = !c || c->self || c->size == 1;
    if (self) {
        if (w) *w = (moe_comm_h5_writers){.self = 1, .node = MPI_COMM_NULL, .writers = MPI_COMM_NULL,
                                          .node_size = 1, .n_writers = 1};
        *out = w;
        return st;
    }
    if (w) w->node = w->writers = MPI_COMM_NULL;
    /* Every rank takes part in both splits, even after a local failure. */
    MPI_Comm node = MPI_COMM_NULL, writers = MPI_COMM_NULL;
    MOE_MPI_KEEP(st, MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node));
    int node_rank = 1, node_size = 1;
    if (node != MPI_COMM_NULL) {
        MOE_MPI_KEEP(st, MPI_Comm_rank(node, &node_rank));
        MOE_MPI_KEEP(st, MPI_Comm_size(node, &node_size));
    }
    MOE_MPI_KEEP(st, MPI_Comm_split(c->world, node_rank == 0 ? 0 : MPI_UNDEFINED, c->rank, &writers));
    int n_writers = 0, is_writer = node_rank == 0;
    MOE_MPI_KEEP(st, MPI_Allreduce(&is_writer, &n_writers, 1, MPI_INT, MPI_SUM, c->world));
    if (w) {
        w->node = node, w->writers = writers;
        w->node_rank = node_rank, w->node_size = node_size, w->n_writers = n_writers;
        w->counts = calloc(2 * (size_t)node_size, sizeof *w->counts);
        w->rcounts = calloc((size_t)node_size, sizeof *w->rcounts);
        w->displs = calloc((size_t)node_size, sizeof *w->displs);
        if (st == MOE_OK && (!w->counts || !w->rcounts || !w->displs))
            st = moe_errorf(MOE_ERR_NOMEM, "node writers: out of memory");
    } else {
        if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
        if (writers != MPI_COMM_NULL) MPI_Comm_free(&writers);
    }
    st = moe_comm_agree_on(c->world, st, "node writers:", 1);
    if (st != MOE_OK) {
        moe_comm_h5_writers_destroy(w);
        return st;
    }
    if (node != MPI_COMM_NULL) MPI_Comm_set_errhandler(node, MPI_ERRORS_RETURN);
    if (writers != MPI_COMM_NULL) MPI_Comm_set_errhandler(writers, MPI_ERRORS_RETURN);
    *out = w;
    return MOE_OK;
}

void moe_comm_h5_writers_destroy(moe_comm_h5_writers *w)
{
    if (!w) return;
    if (w->node != MPI_COMM_NULL) MPI_Comm_free(&w->node);
    if (w->writers != MPI_COMM_NULL) MPI_Comm_free(&w->writers);
    free(w->counts);
    free(w->rcounts);
    free(w->displs);
    free(w);
}

int moe_comm_h5_is_writer(const moe_comm_h5_writers *w) { return w->self || w->node_rank == 0; }

hid_t moe_comm_h5_writers_fapl(const moe_comm_h5_writers *w)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl == H5I_INVALID_HID || w->n_writers == 1) return fapl;
    if (H5Pset_fapl_mpio(fapl, w->writers, MPI_INFO_NULL) < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

hid_t moe_comm_h5_writers_dxpl(const moe_comm_h5_writers *w)
{
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    if (dxpl == H5I_INVALID_HID || w->n_writers == 1) return dxpl;
    if (H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE) < 0) {
        H5Pclose(dxpl);
        return H5I_INVALID_HID;
    }
    return dxpl;
}

moe_status moe_comm_h5_gather_rows(moe_comm_h5_writers *w, const void *send, int64_t first, int64_t rows,
                                   size_t row_bytes, void **buf, size_t *cap, moe_comm_h5_block *blocks,
                                   int *n_blocks, int *own)
{
    *n_blocks = 0;
    *own = 0;
    if (w->node_size == 1) { /* alone on the node: the caller's rows as they are */
        if (rows > 0) {
            blocks[0] = (moe_comm_h5_block){first, rows, 0};
            *n_blocks = 1;
            *own = 1;
        }
        return MOE_OK;
    }
    const int writer = w->node_rank == 0;
    const int64_t mine[2] = {first, rows};
    MOE_MPI_TRY(MPI_Gather(mine, 2, MPI_INT64_T, w->counts, 2, MPI_INT64_T, 0, w->node));
    /* The writer lays the blocks out in ascending first row, then says
     * whether it can receive them (a failure must not leave the others in
     * the Gatherv). */
    moe_status st = MOE_OK;
    int go = 1, n = 0;
    if (writer) {
        int64_t total = 0;
        int only = -1;
        for (int r = 0; r < w->node_size; r++) {
            w->rcounts[r] = w->displs[r] = 0;
            if (w->counts[2 * r + 1] <= 0) continue;
            only = n == 0 ? r : -1;
            int i = n++; /* insertion by first row (a handful of ranks per node) */
            for (; i > 0 && blocks[i - 1].first > w->counts[2 * r]; i--) blocks[i] = blocks[i - 1];
            blocks[i] = (moe_comm_h5_block){w->counts[2 * r], w->counts[2 * r + 1], r};
            total += w->counts[2 * r + 1];
        }
        if (total > INT_MAX || row_bytes > INT_MAX)
            st = moe_errorf(MOE_ERR_OVERFLOW, "node writers: %lld rows of %zu bytes exceed an MPI count",
                            (long long)total, row_bytes);
        *own = only == 0; /* the writer's own rows alone: nothing to move */
        int64_t at = 0;
        for (int i = 0; i < n; i++) { /* blocks[i].at held the node rank until here */
            const int r = (int)blocks[i].at;
            w->rcounts[r] = (int)blocks[i].rows;
            w->displs[r] = (int)at;
            blocks[i].at = at;
            at += blocks[i].rows;
        }
        const size_t need = (size_t)total * row_bytes;
        if (st == MOE_OK && !*own && need > *cap) {
            void *q = moe_calloc(need, 1);
            if (!q) st = moe_errorf(MOE_ERR_NOMEM, "node writers: %zu bytes for a dataset's rows", need);
            else {
                moe_free(*buf);
                *buf = q;
                *cap = need;
            }
        }
        go = st == MOE_OK && !*own;
    }
    MOE_MPI_KEEP(st, MPI_Bcast(&go, 1, MPI_INT, 0, w->node));
    if (go && st == MOE_OK) {
        MPI_Datatype row;
        MOE_MPI_TRY(MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &row));
        MOE_MPI_KEEP(st, MPI_Type_commit(&row));
        if (st == MOE_OK)
            MOE_MPI_KEEP(st, MPI_Gatherv(send, (int)rows, row, writer ? *buf : NULL, w->rcounts, w->displs, row, 0,
                                         w->node));
        MPI_Type_free(&row);
    }
    if (writer) *n_blocks = st == MOE_OK ? n : 0;
    return st;
}
