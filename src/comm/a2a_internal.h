/* Private to src/comm: the exchange object, shared by a2a.c (plans, the
 * point-to-point and shared-memory kinds, the token-level trips) and
 * a2a_node.c (the node-aware kind). */
#ifndef MOE_A2A_INTERNAL_H
#define MOE_A2A_INTERNAL_H

#include "comm/comm_internal.h"
#include "comm/comm_mpi.h"

/* Ints per peer in the count exchange beyond the El counts: the send
 * offset, the status word, and the node kind's four counts of what the
 * sender sends to the receiver's node (a2a_node.c; zeros otherwise). */
enum { A2A_X_OFFSET = 0, A2A_X_STATUS = 1, A2A_X_NODE = 2, A2A_X_EXTRA = 6 };

typedef struct a2a_node a2a_node;

enum { DISPATCH = 0, RETURN = 1 };

/* The private trip buffers: x-like rows in the send and receive layouts,
 * and y-like rows (results) in both. Which of them (or the shm window)
 * plays which role in a trip is decided once, in moe_a2a_buffers_get. */
enum { B_SEND_X, B_SEND_Y, B_RECV_X, B_RECV_Y, N_BUF };

struct moe_a2a {
    moe_comm *c;
    MPI_Comm comm;          /* duplicate of the ep group: the exchange's tags are private */
    moe_a2a_kind kind;
    int local;              /* 1: one rank in the ep group, no MPI */
    int P, me, El, chunks;
    int max_width;          /* of the current plan; 0: no valid plan */
    int send_total, recv_total;
    int *send_rows;         /* (P * El) [p * El + j] rows to local expert j of rank p */
    int *send_off;          /* (P * El) row offset of that block in the send layout */
    int *recv_counts;       /* (El * P) [j * P + s] rows for local expert j from rank s */
    int *recv_off;          /* (El * P) row offset of that block in the receive layout */
    int *recv_expert_off;   /* (El + 1) */
    int *xsend, *xrecv;     /* (P * (El + A2A_X_EXTRA)) count exchange: El counts, send offset, status,
                             * and the node kind's per-node counts */
    MPI_Request *req;       /* (2, El, P, 2): [dir][j][peer][recv, send] */
    int *vcount, *vdispl;   /* (2 * P) MPI_Alltoallv arguments of the raw baseline */
    /* MOE_A2A_SHM only */
    int *peer_send_off;     /* (El * P) [j * P + s] offset in s's send layout of its rows for my j */
    int *peer_recv_off;     /* (P * El) [p * El + j] offset in p's receive layout of my rows for its j */
    MPI_Win win;
    size_t win_floats;      /* capacity of my segment */
    float **seg;            /* (P) every rank's segment, mapped here */
    float *buf[N_BUF];      /* private trip buffers */
    size_t buf_cap[N_BUF];  /* floats allocated */
    int64_t bound_rows[2];  /* moe_a2a_set_row_bounds: most rows sent [0] and received [1]; 0: unknown */
    int *remote;            /* (P) 1: ep rank q is on another node than this rank */
    /* watchdog: which peers a wait still needs (wait_range) */
    int *owed;              /* (P) requests not yet complete per peer */
    atomic_uchar *pending;  /* (P) owed[q] > 0, read by the watchdog thread */
    int *done_idx;          /* (2 El P) MPI_Waitsome indices */
    moe_a2a_times last;     /* of the last moe_a2a_exchange */
    double seconds;
    moe_a2a_traffic traffic; /* payload bytes sent since creation or the last reset */
    /* token-level plan (moe_a2a_plan); send rows = assignments in p2p and shm */
    int tok_plan;           /* 1: the current plan came from moe_a2a_plan */
    int T, A;               /* tokens and assignments of the plan */
    int tok_cap, asg_cap;   /* allocated */
    int *tok_off;           /* (T + 1) */
    int *asg_row;           /* (A) send-layout row of each assignment */
    float *asg_w;           /* (A) its combine weight */
    int *row_tok;           /* (A) token of each send row */
    int *plan_rows;         /* (P * El) rows per destination of the plan */
    a2a_node *node;         /* MOE_A2A_NODE: the node-aware kind's state (a2a_node.c) */
};


/* The combine step y += g * r and the gate-gradient dot product: one
 * definition for every kind and both sides of the node-aware one, so that
 * the bits agree wherever they run. */
static inline void a2a_axpy(float *restrict y, float g, const float *restrict r, int w)
{
    for (int k = 0; k < w; k++) y[k] += g * r[k];
}
static inline float a2a_dot(const float *x, const float *y, int w)
{
    float dot = 0.0f;
    for (int k = 0; k < w; k++) dot += x[k] * y[k];
    return dot;
}

/* The token passes (pack, combine, gate gradient, dx accumulation, and
 * the node kind's publish, fan-out and home combine) split their rows or
 * tokens over the fork-join pool (core/par.h). Every row and every token
 * is done whole by one thread with the same operations in the same order,
 * so the bits do not depend on the thread count. A pass of fewer floats
 * than this per thread stays on fewer threads: a region costs tens of us
 * here (bench/a2a_passes.c: 2 threads lose below about 200K floats a pass
 * and gain 1.1x at 256K, 1.6x at 2M). */
enum { A2A_PAR_MIN_FLOATS = 1 << 17 };

/* One share of a pass: items [i0, i1). */
typedef void (*a2a_range_fn)(const void *ctx, long i0, long i1);

/* a2a.c: runs fn over items [0, n) split into contiguous shares, on as many
 * threads as OpenBLAS uses while each gets A2A_PAR_MIN_FLOATS of the pass's
 * `floats` (and at least one item); on the caller alone otherwise. */
void moe_a2a_par_for(a2a_range_fn fn, const void *ctx, long n, long floats);

/* a2a.c: the count exchange and receive layout of a plan with per-peer
 * node counts (extra: (P, 4) or NULL), shared by every kind. */
moe_status moe_a2a_set_counts_x(moe_a2a *a, const int *send_rows, const int *extra, moe_status local_status,
                                int max_width);
/* a2a.c: grows a private trip buffer; traffic accounting. */
moe_status moe_a2a_reserve_buf(moe_a2a *a, int i, int rows, int width);
void moe_a2a_count_sent(moe_a2a *a, int q, int64_t rows, int w);

/* a2a_node.c: the node-aware kind (MOE_A2A_NODE). create and destroy;
 * plan (collective over the ep group: a routing, or with tok_off NULL the
 * row-level plan of set_counts, one token per send row); the two halves of
 * a trip; the token-level combine. */
moe_status moe_a2a_node_create(moe_a2a *a);
void moe_a2a_node_destroy(moe_a2a *a);
moe_status moe_a2a_node_plan(moe_a2a *a, int T, const int *tok_off, const int *dest, const float *weight,
                             const int *send_rows, moe_status local_status, int max_width);
/* Dispatch: token rows (T, w) -> receive layout rows (R, w). scaled (the
 * backward trip, in place over the forward's results): rows are weight *
 * token row, and the kind keeps dL/dg = token row . old receive row. */
moe_status moe_a2a_node_dispatch(moe_a2a *a, float *recv, const float *tokens, int w, int scaled);
/* Return: result rows (R, w) -> home. reduce: home = y (T, w), the combine
 * of weight * result per token (overwritten); else home = rows (A, w) per
 * assignment at its send-layout row, and with dweight (A) non-NULL the
 * dL/dg kept by the scaled dispatch travels along. */
moe_status moe_a2a_node_return(moe_a2a *a, float *home, const float *out, int w, int reduce, float *dweight);

#endif
