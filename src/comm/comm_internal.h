/* Private to src/comm: the moe_comm layout and the MPI error check shared
 * by comm.c, a2a.c and comm_h5.c. */
#ifndef MOE_COMM_INTERNAL_H
#define MOE_COMM_INTERNAL_H

#include <mpi.h>
#include <stdatomic.h>

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
 * (detail == 1); else MOE_OK. c and wscope say to the watchdog whom it
 * waits for (comm is c's communicator of scope wscope, or a duplicate of
 * it; c NULL: world). */
moe_status moe_comm_agree_on(const moe_comm *c, int wscope, MPI_Comm comm, moe_status local, const char *scope,
                             int detail);

/* ---- watchdog phases (watchdog.c) ----
 * moe_wd_begin opens a blocking phase (what: a static string; scope: a
 * moe_comm_scope of c, or -1 for the whole world; pending: (ep size) flags
 * of the ep ranks still owed a message, kept current by the caller, or
 * NULL); moe_wd_end closes the innermost one; moe_wd_progress says that the
 * open phase moved (a message arrived). A few atomic stores each, nothing
 * when the watchdog is off. Main thread only. */
void moe_wd_begin(const moe_comm *c, int scope, const char *what, const atomic_uchar *pending);
void moe_wd_end(void);
void moe_wd_progress(void);
/* 1 when the watchdog runs (the exchange then tracks which peers it waits for). */
int moe_wd_on(void);
/* Frees the node-shared report flag (collective over the node; before MPI_Finalize). */
void moe_wd_release_node(void);

/* A blocking MPI call under the watchdog: phase `what` over scope s of c.
 * Returns MOE_ERR_MPI from the enclosing function if it failed. */
#define MOE_MPI_TRY_WD(c, s, what, call)                                     \
    do {                                                                     \
        moe_wd_begin((c), (s), (what), NULL);                                \
        int moe_rc_ = (call);                                                \
        moe_wd_end();                                                        \
        if (moe_rc_ != MPI_SUCCESS) return moe_comm_mpi_error(moe_rc_, #call); \
    } while (0)
/* The same recording the failure in st (first one wins). */
#define MOE_MPI_KEEP_WD(st, c, s, what, call)                                \
    do {                                                                     \
        moe_wd_begin((c), (s), (what), NULL);                                \
        int moe_rc_ = (call);                                                \
        moe_wd_end();                                                        \
        if (moe_rc_ != MPI_SUCCESS && (st) == MOE_OK) (st) = moe_comm_mpi_error(moe_rc_, #call); \
    } while (0)

#endif
