/* Parallel HDF5 file-access properties for a moe_comm (MPI-IO driver on its
 * world communicator), and the node writers of an aggregated write (one
 * process per node writes, the others send it their rows). Kept in comm so
 * that MPI handles never leave it. */
#ifndef MOE_COMM_H5_H
#define MOE_COMM_H5_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"

/* A new file-access property list using MPI-IO over c's world communicator
 * (or the default POSIX driver when c == NULL or the world has one rank). Caller closes it with
 * H5Pclose. Returns H5I_INVALID_HID on failure. Not collective. */
hid_t moe_comm_h5_fapl(const moe_comm *c);
/* A transfer property list: collective MPI-IO when c has more than one
 * rank, else default.
 * Caller closes it. */
hid_t moe_comm_h5_dxpl(const moe_comm *c);

/* ---- node writers ----
 * Writing one file from every rank through MPI-IO costs far more than the
 * bytes: collective filtered writes exchange chunk ownership and metadata
 * among all ranks for every dataset (docs/checkpoint.md: 2 ranks of one
 * node wrote at about 0.1x of dd). So a file is written by one writer per
 * node (moe_comm_node_of; the lowest world rank there); the other ranks of
 * the node send it their rows, dataset by dataset (memory on the writer:
 * the node's rows of one dataset). With one node the writer uses HDF5's
 * POSIX driver; with several, the writers write together through MPI-IO
 * over a communicator of their own. Test hook: MOE_H5_NODE_RANKS=k in the
 * environment (the same on every rank) groups every k consecutive world
 * ranks as one node for the writers alone (MOE_NODE_RANKS, which also
 * moves the exchange, works too). */
typedef struct moe_comm_h5_writers moe_comm_h5_writers;

/* Collective over c's world (c may be a one-process moe_comm: it writes
 * alone). MOE_ERR_MPI / MOE_ERR_NOMEM, the same on every rank. Owner:
 * caller; moe_comm_h5_writers_destroy is collective too. */
moe_status moe_comm_h5_writers_create(moe_comm_h5_writers **out, moe_comm *c);
void moe_comm_h5_writers_destroy(moe_comm_h5_writers *w);

/* Not collective: 1 if this rank writes (world rank 0 always does). */
int moe_comm_h5_is_writer(const moe_comm_h5_writers *w);
/* Not collective: the number of writers (nodes). */
int moe_comm_h5_n_writers(const moe_comm_h5_writers *w);
/* Not collective, writers only: file-access and transfer property lists
 * for the writers (POSIX driver and default transfer when there is one
 * writer; MPI-IO over the writers and collective transfer otherwise).
 * Caller closes them. H5I_INVALID_HID on failure. */
hid_t moe_comm_h5_writers_fapl(const moe_comm_h5_writers *w);
hid_t moe_comm_h5_writers_dxpl(const moe_comm_h5_writers *w);

/* Collective over the ranks of this rank's node (a watchdog phase): each
 * passes `rows` rows of row_bytes bytes at send and their dataset row ids
 * (send_ids, or first .. first + rows - 1 when send_ids is NULL). The
 * node's writer receives them all, in node rank order: *n rows into *buf
 * and their ids into *ids (both grown as needed, *buf_cap bytes and
 * *ids_cap ids; the caller frees them with moe_free). When the writer's own
 * rows are the node's only ones nothing moves: *own = 1, *n = rows, and the
 * caller takes its own send and ids. Other ranks: *n = 0, *own = 0.
 * MOE_ERR_OVERFLOW when the node's rows or a row's bytes exceed an MPI
 * count, MOE_ERR_NOMEM, MOE_ERR_MPI. A failure on the writer is local (the
 * others return MOE_OK): the caller agrees. */
moe_status moe_comm_h5_gather_rows(moe_comm_h5_writers *w, void **buf, size_t *buf_cap, int64_t **ids,
                                   size_t *ids_cap, int64_t *n, int *own, const void *send, const int64_t *send_ids,
                                   int64_t first, int64_t rows, size_t row_bytes);

#endif
