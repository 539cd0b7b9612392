/* MPI-typed entry points of the comm module, for code that already holds an
 * MPI communicator (tests, embedding applications). Includes mpi.h. */
#ifndef MOE_COMM_MPI_H
#define MOE_COMM_MPI_H

#include <mpi.h>

#include "comm/comm.h"

/* Collective over parent: builds world (a duplicate of parent), ep and
 * replica communicators. ep_size 0 means the size of parent. The caller
 * keeps ownership of parent. */
moe_status moe_comm_create(moe_comm **out, MPI_Comm parent, int ep_size);

/* The communicators (owned by c; do not free). */
MPI_Comm moe_comm_mpi(const moe_comm *c, moe_comm_scope s);

#endif
