/* Communication: the only module that talks to MPI (and the only one that
 * includes mpi.h directly; see comm_mpi.h and comm_h5.h for the MPI- and
 * HDF5-typed entry points).
 *
 * A moe_comm is built once from a parent communicator (or, without MPI,
 * for this process alone: moe_comm_create_self) and holds:
 *   world   - a duplicate of the parent (W ranks),
 *   ep      - the expert-parallel group of P consecutive ranks (E % P == 0;
 *             ep rank r owns global experts [r*E/P, (r+1)*E/P),
 *             docs/routing.md section 8),
 *   replica - the W/P ranks holding the same experts (same ep rank), whose
 *             expert gradients are summed.
 * World rank w has ep group w / P, ep rank w % P, replica index w / P.
 *
 * Unless a comment says otherwise every function here is COLLECTIVE over the
 * named scope, returns MOE_ERR_MPI (with detail) if MPI fails, and never
 * aborts or exits: moe_comm_abort is for the application to call.
 *
 * Callers never test for a missing communicator: one process is a moe_comm
 * too (moe_comm_create_self, W = P = 1), on which every collective is local
 * and exact (agreement returns the local status, sums and broadcasts leave
 * the buffer as it is, the exchange hands the packed rows to the experts
 * without a copy). */
#ifndef MOE_COMM_H
#define MOE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"

typedef struct moe_comm moe_comm;

typedef enum { MOE_SCOPE_WORLD = 0, MOE_SCOPE_EP = 1, MOE_SCOPE_REPLICA = 2 } moe_comm_scope;

/* Process setup for applications: MPI_Init_thread (FUNNELED) and
 * MPI_ERRORS_RETURN on world; idempotent. Not collective in the library
 * sense (every process calls it once). */
moe_status moe_comm_init(int *argc, char ***argv);
/* 1 if moe_comm_init ran and MPI was initialised. */
int moe_comm_initialized(void);
void moe_comm_finalize(void);

/* For main() only: a moe_comm over a duplicate of MPI_COMM_WORLD, with
 * expert-parallel size ep_size (0 means W). Collective over world.
 * Fails with MOE_ERR_ARG (same on every rank) if W % ep_size != 0. */
moe_status moe_comm_create_world(moe_comm **out, int ep_size);
/* A one-process communicator (world = ep = replica = this process). Needs
 * no MPI: works whether MPI is initialised or not. Not collective. Fails
 * only with MOE_ERR_NOMEM. */
moe_status moe_comm_create_self(moe_comm **out);
/* A shared one-process communicator (static: never fails, never needs
 * destroying; moe_comm_destroy on it does nothing). Not collective. */
moe_comm *moe_comm_self(void);
void moe_comm_destroy(moe_comm *c); /* collective (frees communicators) */

/* Not collective. */
int moe_comm_rank(const moe_comm *c);      /* world rank */
int moe_comm_size(const moe_comm *c);      /* W */
int moe_comm_ep_rank(const moe_comm *c);   /* rank in the ep group */
int moe_comm_ep_size(const moe_comm *c);   /* P */
int moe_comm_replica(const moe_comm *c);   /* which replica: world rank / P */
int moe_comm_n_replicas(const moe_comm *c);/* W / P */
/* Nodes: ranks that share memory (MPI_COMM_TYPE_SHARED), numbered 0 ..
 * n_nodes-1 in the order of their first world rank. MOE_NODE_RANKS=n in
 * the environment (the same on every rank) cuts each node into nodes of n
 * consecutive ranks, so that one machine stands for several in tests and
 * benchmarks of the node-aware exchange. Not collective. */
int moe_comm_n_nodes(const moe_comm *c);
int moe_comm_node_of(const moe_comm *c, int world_rank);
/* World rank of ep rank p of this rank's ep group. Not collective. */
int moe_comm_ep_world_rank(const moe_comm *c, int ep_rank);

/* Ends every process of the job (MPI_Abort on world). Not collective:
 * the way out when one rank fails where others may be blocked. Returns
 * (and does nothing) without MPI: the caller then exits itself. */
void moe_comm_abort(moe_comm *c, int code);

moe_status moe_comm_barrier(moe_comm *c);

/* Collective over world: checks that `bytes` (n bytes, e.g. a config struct
 * serialised) is identical on every rank. On a difference every rank gets
 * MOE_ERR_MISMATCH with a detail naming `what` and the first rank differing
 * from rank 0. n itself may differ between ranks (also a mismatch). */
moe_status moe_comm_check_same(moe_comm *c, const char *what, const void *bytes, size_t n);

/* Collective over world: error agreement. Returns `local` if it is not OK;
 * else MOE_ERR_REMOTE (detail names the failing rank) if any rank passed a
 * non-OK status; else MOE_OK. */
moe_status moe_comm_agree(moe_comm *c, moe_status local);
/* The same over one scope only (e.g. the ep group inside an MoE layer,
 * where other ep groups may be at a different point). Collective over s. */
moe_status moe_comm_agree_scope(moe_comm *c, moe_comm_scope s, moe_status local);
/* Agreement that carries the cause: if any rank of s failed, EVERY rank
 * (the failing ones included) returns the root cause's status and detail
 * ("rank R: <detail>" when R != 0), so whichever rank prints, it prints the
 * cause. The root cause is the rank with an original error (not
 * MOE_ERR_REMOTE), the highest status, the lowest rank, in that order; a
 * NaN found on one rank is therefore MOE_ERR_NONFINITE on all. Collective
 * over s. */
moe_status moe_comm_agree_detail(moe_comm *c, moe_comm_scope s, moe_status local);

/* Collective over s: the rank (in s) of the root cause by the rule of
 * moe_comm_agree_detail, -1 if no rank failed, -2 if MPI failed. For
 * printing a shared failure once, from the rank that holds its cause. */
int moe_comm_cause_rank(moe_comm *c, moe_comm_scope s, moe_status local);

/* In-place sums over a scope (n may exceed INT_MAX: done in chunks). */
moe_status moe_comm_allreduce_f32(moe_comm *c, moe_comm_scope s, float *buf, size_t n);
moe_status moe_comm_allreduce_f64(moe_comm *c, moe_comm_scope s, double *buf, size_t n);
/* In-place sum over a scope that leaves the same bits on every rank of it
 * (reduced on the scope's rank 0, then broadcast): for copies of one
 * tensor that must stay bitwise equal. Collective over s; MOE_ERR_MPI. */
moe_status moe_comm_sum_same_f32(moe_comm *c, moe_comm_scope s, float *buf, size_t n);
moe_status moe_comm_allreduce_i64(moe_comm *c, moe_comm_scope s, int64_t *buf, size_t n);
/* In-place max over a scope. */
moe_status moe_comm_allmax_f64(moe_comm *c, moe_comm_scope s, double *buf, size_t n);
/* Broadcast n bytes from world rank root. */
moe_status moe_comm_bcast(moe_comm *c, void *buf, size_t n, int root);
/* Gather n bytes from every world rank into out (W * n bytes) on every rank. */
moe_status moe_comm_allgather(moe_comm *c, void *out, const void *in, size_t n);
/* Gather bytes[r] bytes from rank r of scope s (in) into out on every rank
 * of s, in rank order (out holds the sum of bytes). bytes is the same on
 * every rank of s. Collective over s; MOE_ERR_OVERFLOW past INT_MAX bytes
 * in all (checked alike everywhere), MOE_ERR_MPI. in NULL: this rank's
 * part is already in place in out (after the parts of the lower ranks). */
moe_status moe_comm_allgatherv(moe_comm *c, moe_comm_scope s, void *out, const void *in, const int64_t *bytes);

/* ---- watchdog: every blocking phase has a deadline (comm_timeout) ----
 *
 * Every blocking MPI call of src/comm (collectives, exchange trips, window
 * set-up, MPI_Finalize) and every phase a caller declares with
 * moe_comm_phase_begin/_end (the collective HDF5 I/O of checkpoints) is a
 * phase with a deadline. One thread per process watches it: when a phase
 * has made no progress for comm_timeout seconds (the deadline is per phase
 * and restarts with each call, each message that arrives and each inner
 * phase that ends), the first rank of each node to notice writes what it
 * waited for (operation, step, the peer ranks and their hosts) to stderr
 * and to <dir>/watchdog-<host>.txt, signals the launcher daemon that is its
 * parent so that every process of the job on every node ends (orted,
 * prted: SIGTERM; mpirun, mpiexec: SIGTERM twice; srun: nothing), and
 * exits with MOE_COMM_WATCHDOG_EXIT. It never calls MPI (docs/cluster.md
 * section 4). A begin or end costs a few atomic stores. */
enum { MOE_COMM_HOST_MAX = 64, MOE_COMM_WATCHDOG_EXIT = 124 };

/* Collective over c's world (a node-shared flag elects each node's
 * reporter): starts the watchdog thread, or only sets the timeout when it
 * runs. timeout_s <= 0: no deadline (the thread idles). hosts: (W) host of
 * every world rank (the start-up platform table), or NULL (ranks only).
 * Fails with MOE_ERR_MPI / MOE_ERR_NOMEM on every rank. */
moe_status moe_comm_watchdog_start(moe_comm *c, double timeout_s, const char (*hosts)[MOE_COMM_HOST_MAX]);
/* Stops the thread (moe_comm_finalize does it). Not collective. */
void moe_comm_watchdog_stop(void);
int moe_comm_watchdog_running(void);
/* Not collective: the deadline (seconds, <= 0: none), the directory of the
 * report file ("" or NULL: the working directory), the step named in the
 * report (moe_train_run sets it). */
void moe_comm_watchdog_set_timeout(double seconds);
double moe_comm_watchdog_timeout(void);
void moe_comm_watchdog_set_dir(const char *dir);
void moe_comm_set_step(int64_t step);
/* A blocking phase outside src/comm that waits for the ranks of scope s
 * of c (the collective HDF5 calls of a checkpoint save or load), or, with
 * c NULL, for this process's own I/O: what is a string for the report,
 * valid until the phase ends. Phases nest; the end of an inner one
 * restarts the clock of the outer one. Not collective; main thread only. */
void moe_comm_phase_begin(const moe_comm *c, moe_comm_scope s, const char *what);
void moe_comm_phase_end(void);

/* ---- token exchange (all-to-all over the ep group) ----
 *
 * Send layout (on the token's home rank): rows grouped by destination ep
 * rank, then by that rank's local expert, then in the sender's order
 * (ascending token index). Receive layout (on the expert owner): rows
 * grouped by local expert, then by source ep rank, then in the source's
 * order. The plan (counts, displacements, buffers) is built by
 * moe_a2a_set_counts once per routing decision and reused by both round
 * trips of a step (forward: dispatch x, experts, return y; backward:
 * dispatch dy, experts, return dx). Buffers grow when needed and are kept
 * across steps.
 *
 * Callers see one sequence whatever the transport: set_counts; pack rows
 * into the trip's `send` buffer; moe_a2a_exchange (dispatch, compute on the
 * receive layout, return); read the results from the trip's `back` buffer.
 * Which buffers alias which (the shared-memory window, a private buffer,
 * or, on one rank, the send rows themselves) is the exchange's business. */
typedef enum {
    MOE_A2A_P2P = 0, /* counts by MPI_Alltoall, then a zero-copy point-to-point
                      * payload: one message per (peer, local expert) block,
                      * received straight into the receive layout (config
                      * value "p2p"; "alltoallv" is an old alias) */
    MOE_A2A_SHM = 1, /* MPI-3 shared-memory window, on-node only (an ep group
                      * spanning nodes gets MOE_A2A_NODE) */
    MOE_A2A_NODE = 2, /* node-aware, two levels: shared memory inside a node,
                       * one message per node pair across nodes, each token's
                       * row crosses to a node once and its results come back
                       * summed per node where the combine order allows */
    MOE_A2A_AUTO = 3, /* NODE when the ep group spans nodes, else P2P */
} moe_a2a_kind;

/* The kinds' names, index = kind, NULL-terminated: "p2p", "shm", "node",
 * "auto". The old name of p2p, "alltoallv", is still read everywhere a kind
 * is named (configs, checkpoint config texts, bench options). */
extern const char *const moe_a2a_kind_names[];
#define MOE_A2A_P2P_OLD_NAME "alltoallv"
/* A kind from its name (or the old name). MOE_ERR_ARG naming the choices. Not collective. */
moe_status moe_a2a_kind_parse(moe_a2a_kind *out, const char *name);

/* The two round trips of a step, whose buffers are arranged so that:
 *  - the FORWARD trip's `recv` rows stay valid until the BACKWARD trip has
 *    run (the expert backward needs its inputs);
 *  - the BACKWARD trip's `send` may be the FORWARD trip's `back`: the caller
 *    reads row i of the forward results before writing row i of backward
 *    send rows (in place, row by row);
 *  - the BACKWARD trip's `out` may be its `recv`: compute must work in place;
 *  - the FORWARD trip's `out` is never its `recv`. */
typedef enum { MOE_A2A_FORWARD = 0, MOE_A2A_BACKWARD = 1 } moe_a2a_trip;

/* A trip's buffers, valid from a successful set_counts to the next one;
 * each has room for its layout's rows x the plan's max_width floats. */
typedef struct {
    float *send;       /* (send_total, width) the caller packs rows here (send layout) */
    const float *recv; /* (recv_total, width) the same rows at the expert owner (receive layout) */
    float *out;        /* (recv_total, out_width) compute writes its result rows here */
    const float *back; /* (send_total, out_width) the results back home (send layout) */
} moe_a2a_buffers;

typedef struct moe_a2a moe_a2a;

/* Collective over the ep group. n_local_experts = E / P. chunks >= 1:
 * number of expert chunks moe_a2a_exchange overlaps with the point-to-point
 * payload. MOE_A2A_AUTO and MOE_A2A_SHM become MOE_A2A_NODE when the ep
 * group spans nodes (moe_comm_node_of); AUTO is P2P otherwise. With one
 * rank in the ep group no MPI is used whatever the kind. */
moe_status moe_a2a_create(moe_a2a **out, moe_comm *c, int n_local_experts, moe_a2a_kind kind,
                          int chunks);
void moe_a2a_destroy(moe_a2a *a);
/* The kind in use (never AUTO). Not collective. */
moe_a2a_kind moe_a2a_kind_of(const moe_a2a *a);
/* Not collective. The most rows a plan of this rank can send and receive
 * (0: not known), e.g. from the routing's capacity: the trip buffers and
 * the shared window then grow once, straight to them, instead of each time
 * a step's load exceeds the last one (a growth mid-run costs a fresh
 * allocation's page faults: 55-70 ms for the medium model's expert
 * activations here). A plan beyond them still works, growing as without.
 * A send bound with recv_rows 0 says the receive side has none (dropless
 * routing over 3 or more ranks): its buffers then grow with more headroom. */
void moe_a2a_set_row_bounds(moe_a2a *a, int64_t send_rows, int64_t recv_rows);

/* Collective over the ep group. send_rows (P * El): rows this rank sends to
 * local expert j of ep rank p at [p * El + j]. local_status carries this
 * rank's state into the count exchange: if any rank passes non-OK, every
 * rank returns non-OK (its own status, or MOE_ERR_REMOTE) and nobody is
 * left waiting in a later exchange. Fails with MOE_ERR_OVERFLOW if any count
 * or displacement (in elements of the widest exchange) would not fit in int,
 * before anything of that size is allocated; then grows the trip buffers
 * (MOE_ERR_NOMEM, agreed). */
moe_status moe_a2a_set_counts(moe_a2a *a, const int *send_rows, moe_status local_status,
                              int max_width);

int moe_a2a_send_total(const moe_a2a *a);           /* rows in the send layout */
int moe_a2a_recv_total(const moe_a2a *a);           /* rows in the receive layout */
/* (El + 1) row offsets of each local expert in the receive layout. */
const int *moe_a2a_recv_expert_offsets(const moe_a2a *a);
/* (El * P) rows received for local expert j from ep rank s at [j * P + s]. */
const int *moe_a2a_recv_counts(const moe_a2a *a);

/* The buffers of one trip of the current plan. Not collective. MOE_ERR_ARG
 * without a valid plan. */
moe_status moe_a2a_buffers_get(moe_a2a *a, moe_a2a_trip trip, moe_a2a_buffers *b);

/* compute(ctx, j0, j1, in, out): the experts [j0, j1) on their rows of the
 * receive layout: reads in (width wide), writes out (out_width wide); the
 * rows of expert j are [off[j], off[j+1]) of moe_a2a_recv_expert_offsets. */
typedef moe_status (*moe_a2a_compute_fn)(void *ctx, int j0, int j1, const float *in, float *out);

/* One round trip, collective over the ep group: the trip's send rows go to
 * their owners (recv), compute runs, its out rows come back (back).
 * Unchunked, chunked (P2P with chunks > 1: while chunk c computes, chunk
 * c+1's dispatch and chunk c's return are in flight; bitwise the same
 * result) and shared-memory sequences are all inside. local carries a
 * failure of the caller since set_counts: that rank skips compute but takes
 * part in every message. If anything fails on any rank every rank returns
 * non-OK (its own status, or MOE_ERR_REMOTE naming the cause) and nobody
 * hangs; the back rows are then void. width, out_width <= max_width. */
moe_status moe_a2a_exchange(moe_a2a *a, moe_a2a_trip trip, int width, int out_width,
                            moe_a2a_compute_fn compute, void *ctx, moe_status local);

/* Seconds of the last moe_a2a_exchange (or token-level trip) on this rank:
 * dispatch, compute and return; pack and combine are the home-side work of
 * a token-level trip (0 otherwise). When chunks overlap, the whole
 * overlapped time counts as compute. Not collective. */
typedef struct {
    double dispatch, compute, ret;
    double pack, combine;
} moe_a2a_times;
moe_a2a_times moe_a2a_last_times(const moe_a2a *a);

/* ---- token-level use (the MoE layer) ----
 *
 * The caller states a routing decision instead of packing rows: T local
 * tokens, each with its assignments in COMBINE order (the order in which
 * the token's results are summed, ascending global expert), each naming
 * its destination (ep rank p, local slot j: p * El + j) and its combine
 * weight. The exchange lays out the rows (one per assignment in p2p and
 * shm: the send layout above; one per (token, destination node) in the
 * node-aware kind), moves them, and combines the results per token in
 * combine order. The receive layout, and so the compute, is the same
 * whatever the kind, and so are the results, bit for bit. The passes at
 * home (packing, the combine, the gate gradient, adding dx) split rows or
 * tokens over the fork-join pool (core/par.h: as many threads as OpenBLAS
 * uses) from the calling thread, each token whole on one thread, so the
 * results are also the same bits at any thread count; compute is called
 * from the calling thread, outside any region. */
typedef struct {
    int n_tokens;          /* T >= 0 */
    const int *tok_off;    /* (T + 1) token t's assignments are [tok_off[t], tok_off[t + 1]), tok_off[0] = 0 */
    const int *dest;       /* (A) p * El + j */
    const float *weight;   /* (A) combine weight */
} moe_a2a_routing;

/* Collective over the ep group: the plan of a routing (as set_counts; a
 * bad routing is MOE_ERR_ARG on this rank and MOE_ERR_REMOTE elsewhere).
 * The arrays are copied. */
moe_status moe_a2a_plan(moe_a2a *a, const moe_a2a_routing *r, moe_status local_status, int max_width);
/* Rows each local expert receives: moe_a2a_recv_expert_offsets as for set_counts. */

/* Forward trip of the plan, collective over the ep group: every token's
 * row x[t] (width wide) reaches the experts of its assignments, compute
 * runs (on the receive layout, width -> width), and y[t] = the sum, in
 * combine order, of weight * result over the token's assignments (0 for a
 * token with none). x and y are (T, width); y is overwritten. Failure as
 * moe_a2a_exchange (y is then void). */
moe_status moe_a2a_forward(moe_a2a *a, float *y, const float *x, int width, moe_a2a_compute_fn compute,
                           void *ctx, moe_status local);
/* Backward trip of the last forward, collective over the ep group:
 * dweight[a] = dy[t] . (the forward's result row of assignment a), the
 * rows weight * dy[t] reach the experts, compute runs (the expert
 * backward, in place: its out may be its in; the forward's receive rows are
 * intact), and the results come back; moe_a2a_backward_add then adds them
 * to dx[t] in combine order. dy, dx (T, width); dweight (A). */
moe_status moe_a2a_backward(moe_a2a *a, float *dweight, const float *dy, int width, moe_a2a_compute_fn compute,
                            void *ctx, moe_status local);
/* Not collective: dx[t] += the backward results of t's assignments, in
 * combine order. Only after a successful moe_a2a_backward. */
void moe_a2a_backward_add(moe_a2a *a, float *dx, int width);

/* ---- primitives on caller buffers (benchmarks and tests of the transport) ---- */

/* Collective over the ep group. send (send_total, width) -> recv
 * (recv_total, width). width <= max_width of set_counts. */
moe_status moe_a2a_dispatch(moe_a2a *a, float *recv, const float *send, int width);
/* Collective over the ep group: the reverse, recv layout -> send layout. */
moe_status moe_a2a_return(moe_a2a *a, float *send, const float *recv, int width);

/* MOE_A2A_SHM on more than one rank only (NULL otherwise, or before a
 * successful set_counts): this rank's segment of the shared window, room
 * for max(send_total, recv_total) rows of max_width floats, valid until the
 * next set_counts. A dispatch whose `send` (send layout) or a return whose
 * `recv` (receive layout) IS this buffer skips the copy into the window:
 * the exchange packs and computes straight into it. Not collective. */
float *moe_a2a_shm_buffer(moe_a2a *a);

/* Benchmark baseline, collective over the ep group: one MPI_Alltoallv of
 * the plan's per-peer rows (send layout -> recv, grouped by source rank, not
 * by expert) and one back (recv -> back): exactly the bytes of a dispatch
 * plus a return. recv (recv_total, width), back (send_total, width). */
moe_status moe_a2a_bench_raw_alltoallv(moe_a2a *a, float *recv, const float *send, float *back, int width);

/* Seconds spent inside exchange calls (not compute) since the last reset (this rank). */
double moe_a2a_seconds(const moe_a2a *a);
void moe_a2a_reset_seconds(moe_a2a *a);

/* Payload bytes this rank sent to OTHER ranks in the trips (dispatch,
 * return, exchange; not the count exchange or the raw baseline) since
 * creation or the last reset, and of those the bytes that crossed to
 * another node (moe_comm_node_of). With the shared-memory kind a row
 * published for another rank counts as sent by its publisher. The one
 * counter every report of exchange traffic uses (bench a2a, bench layer).
 * Not collective. */
typedef struct {
    int64_t sent;        /* to other ranks */
    int64_t sent_remote; /* of which to ranks on other nodes */
} moe_a2a_traffic;
moe_a2a_traffic moe_a2a_bytes(const moe_a2a *a);
void moe_a2a_reset_bytes(moe_a2a *a);

#endif
