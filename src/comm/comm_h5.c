/* Parallel HDF5 property lists over a moe_comm's world communicator, and
 * the node writers of a checkpoint (one writer per node, comm_h5.h). */
#include "comm/comm_h5.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

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
    const moe_comm *c; /* the watchdog's phases */
    int self;          /* one process without MPI communicators: it writes, nothing moves */
    MPI_Comm node;     /* the ranks of this node, writer = node rank 0 (lowest world rank) */
    MPI_Comm writers;  /* writers only (MPI_COMM_NULL elsewhere) */
    int node_rank, node_size, n_writers;
    int64_t *head;     /* (3 node_size) (rows, first, has ids) per node rank, on the writer */
    int *rcounts, *displs; /* (node_size) Gatherv counts and displacements in rows */
};

moe_status moe_comm_h5_writers_create(moe_comm_h5_writers **out, moe_comm *c)
{
    *out = NULL;
    moe_comm_h5_writers *w = calloc(1, sizeof *w);
    moe_status st = w ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "node writers: out of memory");
    if (!c || c->self || c->size == 1) {
        if (w) *w = (moe_comm_h5_writers){.c = c, .self = 1, .node = MPI_COMM_NULL, .writers = MPI_COMM_NULL,
                                          .node_size = 1, .n_writers = 1};
        *out = w;
        return st;
    }
    /* The node of each rank: moe_comm_node_of (MOE_NODE_RANKS honoured),
     * or the writers' own test grouping. Every rank takes part in both
     * splits, even after a local failure. */
    const char *k = getenv("MOE_H5_NODE_RANKS");
    const long fake = k && *k ? strtol(k, NULL, 10) : 0;
    const int color = fake > 0 ? c->rank / (int)fake : c->node_of ? c->node_of[c->rank] : 0;
    const int n_writers = fake > 0 ? (c->size + (int)fake - 1) / (int)fake : c->node_of ? c->n_nodes : 1;
    MPI_Comm node = MPI_COMM_NULL, writers = MPI_COMM_NULL;
    MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "checkpoint node writers (MPI_Comm_split)",
                    MPI_Comm_split(c->world, color, c->rank, &node));
    int node_rank = 1, node_size = 1;
    if (node != MPI_COMM_NULL) {
        MOE_MPI_KEEP(st, MPI_Comm_rank(node, &node_rank));
        MOE_MPI_KEEP(st, MPI_Comm_size(node, &node_size));
    }
    MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "checkpoint node writers (MPI_Comm_split)",
                    MPI_Comm_split(c->world, node_rank == 0 ? 0 : MPI_UNDEFINED, c->rank, &writers));
    if (w) {
        *w = (moe_comm_h5_writers){.c = c, .node = node, .writers = writers, .node_rank = node_rank,
                                   .node_size = node_size, .n_writers = n_writers};
        w->head = calloc(3 * (size_t)node_size, sizeof *w->head);
        w->rcounts = calloc((size_t)node_size, sizeof *w->rcounts);
        w->displs = calloc((size_t)node_size, sizeof *w->displs);
        if (st == MOE_OK && (!w->head || !w->rcounts || !w->displs))
            st = moe_errorf(MOE_ERR_NOMEM, "node writers: out of memory");
    } else {
        if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
        if (writers != MPI_COMM_NULL) MPI_Comm_free(&writers);
    }
    if (node != MPI_COMM_NULL) MPI_Comm_set_errhandler(node, MPI_ERRORS_RETURN);
    if (writers != MPI_COMM_NULL) MPI_Comm_set_errhandler(writers, MPI_ERRORS_RETURN);
    st = moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world, st, "world", 1);
    if (st != MOE_OK) {
        moe_comm_h5_writers_destroy(w);
        return st;
    }
    *out = w;
    return MOE_OK;
}

void moe_comm_h5_writers_destroy(moe_comm_h5_writers *w)
{
    if (!w) return;
    if (w->node != MPI_COMM_NULL) MPI_Comm_free(&w->node);
    if (w->writers != MPI_COMM_NULL) MPI_Comm_free(&w->writers);
    free(w->head);
    free(w->rcounts);
    free(w->displs);
    free(w);
}

int moe_comm_h5_is_writer(const moe_comm_h5_writers *w) { return w->self || w->node_rank == 0; }

int moe_comm_h5_n_writers(const moe_comm_h5_writers *w) { return w->n_writers; }

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

/* Grows *p to hold `need` bytes (contents not kept). */
static moe_status grow(void **p, size_t *cap, size_t need)
{
    if (need <= *cap) return MOE_OK;
    void *q = moe_calloc(need, 1);
    if (!q) return moe_errorf(MOE_ERR_NOMEM, "node writers: %zu bytes for a dataset's rows", need);
    moe_free(*p);
    *p = q;
    *cap = need;
    return MOE_OK;
}

static const char gather_what[] = "checkpoint rows to the node's writer";

moe_status moe_comm_h5_gather_rows(moe_comm_h5_writers *w, void **buf, size_t *buf_cap, int64_t **ids,
                                   size_t *ids_cap, int64_t *n, int *own, const void *send, const int64_t *send_ids,
                                   int64_t first, int64_t rows, size_t row_bytes)
{
    *n = 0;
    *own = 0;
    if (w->node_size == 1) { /* alone on the node: the caller's rows as they are */
        *n = rows;
        *own = 1;
        return MOE_OK;
    }
    const moe_comm *c = w->c;
    const int writer = w->node_rank == 0;
    const int64_t mine[3] = {rows, first, send_ids != NULL};
    moe_status st = MOE_OK;
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, gather_what,
                   MPI_Gather(mine, 3, MPI_INT64_T, w->head, 3, MPI_INT64_T, 0, w->node));
    /* The writer lays out the blocks in node rank order and says whether
     * they move (a failure here must not leave the others in the Gatherv):
     * plan[0] data, plan[1] ids from some rank. */
    int plan[2] = {0, 0};
    if (writer) {
        int64_t total = 0, others = 0;
        for (int r = 0; r < w->node_size; r++) {
            const int64_t nr = w->head[3 * r] > 0 ? w->head[3 * r] : 0;
            w->displs[r] = (int)(total < INT_MAX ? total : 0);
            w->rcounts[r] = (int)(nr < INT_MAX ? nr : 0);
            total += nr;
            if (r > 0) others += nr;
            if (nr && w->head[3 * r + 2]) plan[1] = 1;
        }
        if (total > INT_MAX || row_bytes > INT_MAX)
            st = moe_errorf(MOE_ERR_OVERFLOW, "node writers: %lld rows of %zu bytes exceed an MPI count",
                            (long long)total, row_bytes);
        if (st == MOE_OK && others == 0) { /* the writer's own rows alone: nothing to move */
            *own = 1;
            *n = rows;
        } else if (st == MOE_OK) {
            st = grow(buf, buf_cap, (size_t)total * row_bytes);
            if (st == MOE_OK && (size_t)total > *ids_cap) {
                void *p = *ids;
                size_t cap = *ids_cap * sizeof **ids;
                st = grow(&p, &cap, (size_t)total * sizeof **ids);
                *ids = p;
                *ids_cap = cap / sizeof **ids;
            }
            plan[0] = st == MOE_OK;
        }
        if (!plan[0]) plan[1] = 0;
    }
    MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, gather_what, MPI_Bcast(plan, 2, MPI_INT, 0, w->node));
    if (!plan[0] || st != MOE_OK) return st;
    if (plan[1]) { /* the ids of the ranks that have a list (the others' the writer makes) */
        const int with_ids = send_ids != NULL;
        if (writer)
            for (int r = 0; r < w->node_size; r++) w->rcounts[r] = w->head[3 * r + 2] ? (int)w->head[3 * r] : 0;
        MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, gather_what,
                        MPI_Gatherv(with_ids ? send_ids : NULL, with_ids ? (int)rows : 0, MPI_INT64_T,
                                    writer ? *ids : NULL, w->rcounts, w->displs, MPI_INT64_T, 0, w->node));
        if (writer)
            for (int r = 0; r < w->node_size; r++) w->rcounts[r] = (int)w->head[3 * r];
    }
    if (writer)
        for (int r = 0; r < w->node_size; r++)
            if (!w->head[3 * r + 2])
                for (int64_t i = 0; i < w->head[3 * r]; i++) (*ids)[w->displs[r] + i] = w->head[3 * r + 1] + i;
    MPI_Datatype row = MPI_DATATYPE_NULL;
    MOE_MPI_KEEP(st, MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &row));
    if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Type_commit(&row));
    /* Every rank of the node enters the Gatherv (a failed type on one rank
     * is an MPI error that stops the write anyway). */
    MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, gather_what,
                    MPI_Gatherv(rows ? send : NULL, (int)rows, row, writer ? *buf : NULL, w->rcounts, w->displs, row,
                                0, w->node));
    if (row != MPI_DATATYPE_NULL) MPI_Type_free(&row);
    if (writer && st == MOE_OK)
        for (int r = 0; r < w->node_size; r++) *n += w->head[3 * r];
    return st;
}
