/* Parallel HDF5 file-access properties for a moe_comm (MPI-IO driver on its
 * world communicator), and the node writers of an aggregated write (one
 * process per node writes, the others send it their rows). Kept in comm so
 * that MPI handles never leave it. */
#ifndef MOE_COMM_H5_H
#define MOE_COMM_H5_H

#include <hdf5.h>

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
 * bytes on one node (measured: 2 ranks of one node wrote a 128 MB
 * checkpoint at 195 MB/s, one rank through the POSIX driver at 892 MB/s):
 * collective filtered writes exchange chunk ownership and metadata for
 * every dataset. So a file is written by one writer per node, the lowest
 * world rank there; the other ranks of the node send it their rows, dataset
 * by dataset (memory on the writer: the node's rows of one dataset). With
 * one node the writer uses the POSIX driver; with several, the writers
 * write together through MPI-IO over a communicator of their own. */
typedef struct moe_comm_h5_writers moe_comm_h5_writers;

/* Collective over c's world (c may be moe_comm_self: this process writes
 * alone). MOE_ERR_MPI / MOE_ERR_NOMEM, the same on every rank. Owner:
 * caller; moe_comm_h5_writers_destroy is collective too. */
moe_status moe_comm_h5_writers_create(moe_comm_h5_writers **out, moe_comm *c);
void moe_comm_h5_writers_destroy(moe_comm_h5_writers *w);

/* Not collective: 1 if this rank writes (world rank 0 always does). */
int moe_comm_h5_is_writer(const moe_comm_h5_writers *w);
/* Not collective, writers only: file-access and transfer property lists
 * for the writers (POSIX driver and default transfer when there is one
 * writer; MPI-IO over the writers, collective transfer, otherwise). Caller
 * closes them. H5I_INVALID_HID on failure. */
hid_t moe_comm_h5_writers_fapl(const moe_comm_h5_writers *w);
hid_t moe_comm_h5_writers_dxpl(const moe_comm_h5_writers *w);

/* One block of rows received by a writer: rows [first, first + rows) of a
 * dataset, at row offset `at` of the gathered buffer. */
typedef struct {
    int64_t first, rows, at;
} moe_comm_h5_block;

/* Collective over the ranks of this rank's node: each passes its block of
 * `rows` rows of row_bytes bytes (rows = 0: none; `first` is its first row
 * in the dataset), and the node's writer receives them all, in ascending
 * `first`, into *buf (grown as needed, *cap bytes; caller frees with
 * moe_free), with blocks[0 .. *n_blocks) describing them (blocks: room for
 * the node's rank count, at most moe_comm_size(c)). On the writer a block
 * of its own is not copied when it is the only one: *buf is then left as
 * it was and *own = 1 (read the rows from the caller's send). On other
 * ranks *n_blocks = 0. MOE_ERR_OVERFLOW if the node's rows or a row's
 * bytes exceed int, MOE_ERR_NOMEM, MOE_ERR_MPI. A failure is local: the
 * caller agrees. */
moe_status moe_comm_h5_gather_rows(moe_comm_h5_writers *w, const void *send, int64_t first, int64_t rows,
                                   size_t row_bytes, void **buf, size_t *cap, moe_comm_h5_block *blocks,
                                   int *n_blocks, int *own);

#endif
