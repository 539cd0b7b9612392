/* Parallel HDF5 file-access properties for a moe_comm (MPI-IO driver on its
 * world communicator). Kept in comm so that MPI handles never leave it. */
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

#endif
