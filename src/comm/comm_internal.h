/* Private to src/comm: the moe_comm layout and the MPI error check shared
 * by comm.c, a2a.c and comm_h5.c. */
#ifndef MOE_COMM_INTERNAL_H
#define MOE_COMM_INTERNAL_H

#include <mpi.h>

#include "comm/comm.h"

struct moe_comm {
    int self;         /* 1: a one-process communicator (moe_comm_create_self): no MPI at all */
    MPI_Comm world;   /* duplicate of the parent: W ranks */
    MPI_Comm ep;      /* P consecutive world ranks */
    MPI_Comm replica; /* the W / P ranks with the same ep rank */
    int rank, size;   /* in world */
    int ep_rank, ep_size;
    int replica_idx, n_replicas;
    int n_nodes;      /* distinct nodes (shared-memory domains) of world */
    int *node_of;     /* (size) node index of every world rank, 0 .. n_nodes-1 in order of first rank;
                       * NULL on a one-process communicator (node 0) */
};

/* Turns a failed MPI return code into MOE_ERR_MPI with a detail naming the
 * call (the text of `call` up to its '(') and MPI's error string. */
moe_status moe_comm_mpi_error(int rc, const char *call);

/* Evaluates an MPI call and returns MOE_ERR_MPI from the enclosing function
 * if it failed. */
#define MOE_MPI_TRY(call)                                                    \
    do {                                                                     \
        int moe_rc_ = (call);                                                \
        if (moe_rc_ != MPI_SUCCESS) return moe_comm_mpi_error(moe_rc_, #call); \
    } while (0)

/* Same, but records the failure in `st` (first one wins) and goes on, for
 * cleanup paths that must still release everything. */
#define MOE_MPI_KEEP(st, call)                                               \
    do {                                                                     \
        int moe_rc_ = (call);                                                \
        if (moe_rc_ != MPI_SUCCESS && (st) == MOE_OK) (st) = moe_comm_mpi_error(moe_rc_, #call); \
    } while (0)

/* Collective over comm (MPI_COMM_NULL: this process alone, returns local):
 * the one implementation of error agreement (comm.h, moe_comm_agree_scope
 * and moe_comm_agree_detail). The root cause is the rank with the highest
 * priority (an original error outranks MOE_ERR_REMOTE; then the higher
 * status; ties go to the lowest rank). Returns `local` if it is not OK;
 * else, if any rank failed, MOE_ERR_REMOTE naming the root cause
 * (detail == 0) or the root cause's own status and detail message
 * (detail == 1); else MOE_OK. */
moe_status moe_comm_agree_on(MPI_Comm comm, moe_status local, const char *scope, int detail);

#endif
