/* Token exchange over the expert-parallel group (comm.h, "token exchange").
 *
 * MOE_A2A_P2P moves the payload zero-copy: one message per (peer,
 * local expert) pair, sent from its contiguous block of the send layout and
 * received straight into its (expert, source) slot of the receive layout, so
 * no staging buffer and no permuting copy are needed. Measured against one
 * MPI_Alltoallv into a source-major buffer plus a permuting copy (1.8x
 * slower), MPI_Alltoallw with indexed receive types (1.5x slower) and one
 * MPI_Alltoallv per local expert (same speed but El collectives), it matches
 * a raw MPI_Alltoallv of the same bytes. The same messages, posted a chunk
 * of experts at a time, give the chunked round trip its overlap.
 *
 * MOE_A2A_SHM: every rank copies the rows it sends to other ranks into its
 * segment of an MPI-3 shared window (or builds them there in the first
 * place: the trip buffers pack and compute into the window), a barrier
 * publishes them, and every receiver copies its rows from the senders'
 * segments straight into place.
 *
 * With one rank in the ep group (local) nothing moves: the receive layout
 * IS the send layout and the trip buffers alias accordingly.
 *
 * The token-level trips (moe_a2a_forward/_backward) also own the passes at
 * home: pack, combine, gate gradient and dx accumulation, split over rows
 * or tokens on the fork-join pool (moe_a2a_par_for). */
#include "comm/a2a_internal.h"

#include "core/par.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

static int imin(int a, int b) { return a < b ? a : b; }

const char *const moe_a2a_kind_names[] = {"p2p", "shm", "node", "auto", NULL};

moe_status moe_a2a_kind_parse(moe_a2a_kind *out, const char *name)
{
    if (name && !strcmp(name, MOE_A2A_P2P_OLD_NAME)) name = moe_a2a_kind_names[MOE_A2A_P2P];
    for (int k = 0; name && moe_a2a_kind_names[k]; k++)
        if (!strcmp(name, moe_a2a_kind_names[k])) {
            *out = (moe_a2a_kind)k;
            return MOE_OK;
        }
    return moe_errorf(MOE_ERR_ARG, "unknown exchange kind '%s' (p2p, shm, node or auto; %s = p2p)",
                      name ? name : "(null)", MOE_A2A_P2P_OLD_NAME);
}

/* MPI guarantees tags up to 32767; the exchange uses 2 * El of them. */
#define MOE_A2A_MAX_LOCAL_EXPERTS (32767 / 2)

static moe_status shm_check_node(moe_a2a *a)
{
    MPI_Comm node = MPI_COMM_NULL;
    int n = 0;
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "exchange set-up (MPI_Comm_split_type)",
                   MPI_Comm_split_type(a->comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
    int rc = MPI_Comm_size(node, &n);
    MPI_Comm_free(&node);
    if (rc != MPI_SUCCESS) return moe_comm_mpi_error(rc, "MPI_Comm_size");
    if (n != a->P)
        return moe_errorf(MOE_ERR_ARG, "shm exchange needs the whole ep group (%d ranks) on one node, "
                          "but only %d of them share this rank's node", a->P, n);
    return MOE_OK;
}

moe_status moe_a2a_create(moe_a2a **out, moe_comm *c, int n_local_experts, moe_a2a_kind kind,
                          int chunks)
{
    *out = NULL;
    const int P = moe_comm_ep_size(c), El = n_local_experts;
    moe_status st = MOE_OK;
    if (El < 1 || El > MOE_A2A_MAX_LOCAL_EXPERTS)
        st = moe_errorf(MOE_ERR_ARG, "n_local_experts=%d outside [1, %d]", El, MOE_A2A_MAX_LOCAL_EXPERTS);
    else if ((unsigned)kind > MOE_A2A_AUTO)
        st = moe_errorf(MOE_ERR_ARG, "unknown exchange kind %d", (int)kind);
    else if (chunks < 1)
        st = moe_errorf(MOE_ERR_ARG, "chunks=%d must be >= 1", chunks);
    moe_a2a *a = st ? NULL : calloc(1, sizeof *a);
    if (a) {
        const size_t pe = (size_t)P * El;
        a->c = c;
        a->comm = MPI_COMM_NULL;
        a->win = MPI_WIN_NULL;
        a->kind = kind;
        a->local = P == 1;
        a->P = P;
        a->me = moe_comm_ep_rank(c);
        a->El = El;
        a->chunks = chunks;
        a->send_rows = moe_calloc(pe, sizeof(int));
        a->send_off = moe_calloc(pe, sizeof(int));
        a->recv_counts = moe_calloc(pe, sizeof(int));
        a->recv_off = moe_calloc(pe, sizeof(int));
        a->recv_expert_off = moe_calloc((size_t)El + 1, sizeof(int));
        a->xsend = moe_calloc((size_t)P * (El + A2A_X_EXTRA), sizeof(int));
        a->xrecv = moe_calloc((size_t)P * (El + A2A_X_EXTRA), sizeof(int));
        a->req = moe_calloc(4 * pe, sizeof(MPI_Request));
        a->vcount = moe_calloc(2 * (size_t)P, sizeof(int));
        a->vdispl = moe_calloc(2 * (size_t)P, sizeof(int));
        a->peer_send_off = moe_calloc(pe, sizeof(int));
        a->peer_recv_off = moe_calloc(pe, sizeof(int));
        a->seg = moe_calloc((size_t)P, sizeof(float *));
        a->remote = moe_calloc((size_t)P, sizeof(int));
        a->owed = moe_calloc((size_t)P, sizeof(int));
        a->pending = moe_calloc((size_t)P, sizeof(atomic_uchar));
        a->done_idx = moe_calloc(2 * pe, sizeof(int));
        a->plan_rows = moe_calloc(pe, sizeof(int));
        if (a->remote)
            for (int q = 0; q < P; q++)
                a->remote[q] = moe_comm_node_of(c, moe_comm_ep_world_rank(c, q)) !=
                               moe_comm_node_of(c, moe_comm_rank(c));
        if (!a->send_rows || !a->send_off || !a->recv_counts || !a->recv_off || !a->recv_expert_off ||
            !a->xsend || !a->xrecv || !a->req || !a->vcount || !a->vdispl || !a->peer_send_off ||
            !a->peer_recv_off || !a->seg || !a->remote || !a->owed || !a->pending || !a->done_idx || !a->plan_rows)
            st = moe_errorf(MOE_ERR_NOMEM, "exchange plan for %d ranks x %d local experts", P, El);
    } else if (st == MOE_OK) {
        st = moe_errorf(MOE_ERR_NOMEM, "exchange object");
    }
    /* One rank: no MPI at all (the communicator may have none). */
    if (P > 1) {
        MPI_Comm ep = moe_comm_mpi(c, MOE_SCOPE_EP);
        st = moe_comm_agree_on(c, MOE_SCOPE_EP, ep, st, "ep", 0);
        if (st == MOE_OK) MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_EP, "exchange set-up (MPI_Comm_dup)", MPI_Comm_dup(ep, &a->comm));
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_set_errhandler(a->comm, MPI_ERRORS_RETURN));
        /* An ep group spanning nodes takes the node-aware kind when asked
         * for auto or for shared memory (which one window cannot span);
         * every rank sees the same node table, so decides alike. */
        int spans = 0;
        for (int q = 0; a && q < P; q++) spans |= a->remote[q];
        if (st == MOE_OK) MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_EP, "exchange set-up (MPI_Allreduce)",
                                          MPI_Allreduce(MPI_IN_PLACE, &spans, 1, MPI_INT, MPI_LOR, a->comm));
        if (st == MOE_OK && (kind == MOE_A2A_AUTO || kind == MOE_A2A_SHM) && spans) a->kind = MOE_A2A_NODE;
        else if (st == MOE_OK && kind == MOE_A2A_AUTO) a->kind = MOE_A2A_P2P;
        if (st == MOE_OK && a->kind == MOE_A2A_SHM) st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, shm_check_node(a), "ep", 0);
        if (st == MOE_OK && a->kind == MOE_A2A_NODE) st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, moe_a2a_node_create(a), "ep", 0);
    } else if (a) {
        a->kind = kind == MOE_A2A_AUTO ? MOE_A2A_P2P : kind;
    }
    if (st != MOE_OK) {
        moe_a2a_destroy(a);
        return st;
    }
    *out = a;
    return MOE_OK;
}

static void free_window(moe_a2a *a)
{
    if (a->win == MPI_WIN_NULL) return;
    MPI_Win_unlock_all(a->win);
    MPI_Win_free(&a->win);
    a->win_floats = 0;
}

void moe_a2a_destroy(moe_a2a *a)
{
    if (!a) return;
    moe_a2a_node_destroy(a);
    free_window(a);
    if (a->comm != MPI_COMM_NULL) MPI_Comm_free(&a->comm);
    void *arrays[] = {a->send_rows, a->send_off, a->recv_counts, a->recv_off, a->recv_expert_off,
                      a->xsend, a->xrecv, a->req, a->vcount, a->vdispl, a->peer_send_off,
                      a->peer_recv_off, a->seg, a->remote, a->owed, (void *)a->pending, a->done_idx,
                      a->tok_off, a->asg_row, a->asg_w, a->row_tok, a->plan_rows};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) moe_free(arrays[i]);
    for (int i = 0; i < N_BUF; i++) moe_free(a->buf[i]);
    free(a);
}

/* Collective: makes every segment hold at least `need` floats, re-allocating
 * the window on every rank when any rank needs more. */
static moe_status shm_reserve(moe_a2a *a, size_t need, int width)
{
    int grow = need > a->win_floats || a->win == MPI_WIN_NULL, any = 0;
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "shared window size (MPI_Allreduce)",
                   MPI_Allreduce(&grow, &any, 1, MPI_INT, MPI_LOR, a->comm));
    if (!any) return MOE_OK;
    /* Straight to the bound when it holds the plan (one growth per run);
     * else geometrically so that slowly rising loads re-allocate rarely. */
    const int64_t rows = a->bound_rows[0] > a->bound_rows[1] ? a->bound_rows[0] : a->bound_rows[1];
    const size_t bound = (size_t)rows * (size_t)width;
    size_t cap = a->win_floats + a->win_floats / 2;
    if (cap < need) cap = need;
    if (bound >= need && bound > a->win_floats) cap = bound;
    free_window(a);
    /* Non-contiguous segments: each rank's pages are first touched (and so
     * placed, on NUMA nodes) by their owner. */
    MPI_Info info;
    MOE_MPI_TRY(MPI_Info_create(&info));
    moe_status st = MOE_OK;
    MOE_MPI_KEEP(st, MPI_Info_set(info, "alloc_shared_noncontig", "true"));
    float *base = NULL;
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, a->c, MOE_SCOPE_EP, "shared window set-up (MPI_Win_allocate_shared)",
                        MPI_Win_allocate_shared((MPI_Aint)(cap * sizeof(float)), (int)sizeof(float), info, a->comm,
                                                &base, &a->win));
    MPI_Info_free(&info);
    if (st) return st;
    MOE_MPI_TRY(MPI_Win_set_errhandler(a->win, MPI_ERRORS_RETURN));
    MOE_MPI_TRY(MPI_Win_lock_all(MPI_MODE_NOCHECK, a->win));
    a->win_floats = cap;
    for (int q = 0; q < a->P; q++) {
        MPI_Aint size = 0;
        int unit = 0;
        MOE_MPI_TRY(MPI_Win_shared_query(a->win, q, &size, &unit, &a->seg[q]));
    }
    return MOE_OK;
}

/* Rows * width fits the int counts and displacements of MPI. */
static moe_status fits_int(int64_t rows, int width, const char *layout)
{
    if (rows * width > INT_MAX)
        return moe_errorf(MOE_ERR_OVERFLOW, "%s layout of %lld rows x width %d = %lld elements exceeds INT_MAX",
                          layout, (long long)rows, width, (long long)(rows * width));
    return MOE_OK;
}

/* The local half of the plan: validates the counts and lays out the send side. */
static moe_status plan_send(moe_a2a *a, const int *send_rows, int max_width)
{
    const int P = a->P, El = a->El;
    if (!send_rows) return moe_errorf(MOE_ERR_ARG, "send_rows is NULL");
    if (max_width < 1) return moe_errorf(MOE_ERR_ARG, "max_width=%d must be >= 1", max_width);
    int64_t off = 0;
    for (int i = 0; i < P * El; i++) {
        if (send_rows[i] < 0)
            return moe_errorf(MOE_ERR_ARG, "send_rows[%d] (rank %d, local expert %d) = %d is negative", i,
                              i / El, i % El, send_rows[i]);
        off += send_rows[i];
        if (off > INT_MAX) break; /* fits_int reports it */
    }
    moe_status st = fits_int(off, max_width, "send");
    if (st) return st;
    off = 0;
    for (int i = 0; i < P * El; i++) {
        a->send_rows[i] = send_rows[i];
        a->send_off[i] = (int)off;
        off += send_rows[i];
    }
    a->send_total = (int)off;
    return MOE_OK;
}

/* The remote half: counts received in xrecv -> receive layout. */
static moe_status plan_recv(moe_a2a *a, int max_width)
{
    const int P = a->P, El = a->El, X = El + A2A_X_EXTRA;
    for (int s = 0; s < P; s++)
        if (a->xrecv[s * X + El + A2A_X_STATUS] != MOE_OK)
            return moe_errorf(MOE_ERR_REMOTE, "ep rank %d failed with '%s'", s,
                              moe_status_str((moe_status)a->xrecv[s * X + El + A2A_X_STATUS]));
    int64_t off = 0;
    for (int j = 0; j < El; j++)
        for (int s = 0; s < P; s++) off += a->xrecv[s * X + j];
    moe_status st = fits_int(off, max_width, "receive");
    if (st) return st;
    off = 0;
    for (int j = 0; j < El; j++) {
        a->recv_expert_off[j] = (int)off;
        for (int s = 0; s < P; s++) {
            const int n = a->xrecv[s * X + j];
            a->recv_counts[j * P + s] = n;
            a->recv_off[j * P + s] = (int)off;
            off += n;
        }
    }
    a->recv_expert_off[El] = a->recv_total = (int)off;
    /* Where each source keeps my rows: its block base plus the earlier experts' rows. */
    for (int s = 0; s < P; s++)
        for (int j = 0, o = a->xrecv[s * X + El + A2A_X_OFFSET]; j < El; o += a->xrecv[s * X + j], j++)
            a->peer_send_off[j * P + s] = o;
    return MOE_OK;
}

/* Makes trip buffer i hold rows x width floats: the row bound when it
 * holds them (moe_a2a_set_row_bounds), else headroom so that step-to-step
 * fluctuation of the load does not reallocate (small for the receive side,
 * whose buffers are the largest). Contents are not kept. */
moe_status moe_a2a_reserve_buf(moe_a2a *a, int i, int rows, int width)
{
    const size_t need = (size_t)rows * (size_t)width;
    if (need <= a->buf_cap[i] && a->buf[i]) return MOE_OK;
    const int send = i == B_SEND_X || i == B_SEND_Y;
    const int64_t r = rows, bound = a->bound_rows[send ? 0 : 1];
    /* a receive side its layer could not bound (dropless, 3+ ranks): a wide
     * fluctuation, so half again */
    const int64_t slack = a->bound_rows[0] && !a->bound_rows[1] ? r / 2 : r / 8;
    const int64_t cap_rows = bound >= r ? bound : send ? r + r / 4 + 16 : r + slack + 64;
    const size_t cap = (size_t)cap_rows * (size_t)width;
    float *p = moe_calloc(cap, sizeof(float));
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "token exchange: cannot allocate %zu bytes", cap * sizeof(float));
    moe_free(a->buf[i]);
    a->buf[i] = p;
    a->buf_cap[i] = cap;
    return MOE_OK;
}

/* The private buffers the trips of this kind use (moe_a2a_buffers_get). */
static moe_status reserve_trip_buffers(moe_a2a *a, int width)
{
    const int S = a->send_total, R = a->recv_total;
    moe_status st = moe_a2a_reserve_buf(a, B_SEND_X, S, width);
    if (!st) st = moe_a2a_reserve_buf(a, B_RECV_Y, R, width);
    if (a->local) return st;
    if (!st) st = moe_a2a_reserve_buf(a, B_SEND_Y, S, width);
    if (!st) st = moe_a2a_reserve_buf(a, B_RECV_X, R, width);
    return st;
}

moe_status moe_a2a_set_counts(moe_a2a *a, const int *send_rows, moe_status local_status, int max_width)
{
    a->tok_plan = 0;
    if (a->kind == MOE_A2A_NODE && !a->local)
        return moe_a2a_node_plan(a, 0, NULL, NULL, NULL, send_rows, local_status, max_width);
    return moe_a2a_set_counts_x(a, send_rows, NULL, local_status, max_width);
}

moe_status moe_a2a_set_counts_x(moe_a2a *a, const int *send_rows, const int *extra, moe_status local_status,
                                int max_width)
{
    const double t0 = moe_now();
    const int P = a->P, El = a->El, X = El + A2A_X_EXTRA;
    a->max_width = 0;
    moe_status st = local_status != MOE_OK ? local_status : plan_send(a, send_rows, max_width);
    for (int p = 0; p < P; p++) {
        for (int j = 0; j < El; j++) a->xsend[p * X + j] = st ? 0 : a->send_rows[p * El + j];
        a->xsend[p * X + El + A2A_X_OFFSET] = st ? 0 : a->send_off[p * El];
        a->xsend[p * X + El + A2A_X_STATUS] = (int)st;
        for (int k = 0; k < A2A_X_EXTRA - A2A_X_NODE; k++)
            a->xsend[p * X + El + A2A_X_NODE + k] = st || !extra ? 0 : extra[p * (A2A_X_EXTRA - A2A_X_NODE) + k];
    }
    if (a->local) {
        memcpy(a->xrecv, a->xsend, sizeof(int) * (size_t)X);
        if (st == MOE_OK) st = plan_recv(a, max_width);
        if (st == MOE_OK) st = reserve_trip_buffers(a, max_width);
    } else {
        /* The status words travel with the counts: this is the agreement point. */
        MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "exchange counts (MPI_Alltoall)",
                       MPI_Alltoall(a->xsend, X, MPI_INT, a->xrecv, X, MPI_INT, a->comm));
        if (st == MOE_OK) st = plan_recv(a, max_width);
        /* A receive-side overflow is known to its rank only: agree once more. */
        st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, st, "ep", 0);
        if (st == MOE_OK && a->kind == MOE_A2A_SHM) {
            /* Senders learn where their rows sit in each receiver's layout. */
            for (int s = 0; s < P; s++)
                for (int j = 0; j < El; j++) a->xsend[s * El + j] = a->recv_off[j * P + s];
            MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "exchange counts (MPI_Alltoall)",
                           MPI_Alltoall(a->xsend, El, MPI_INT, a->peer_recv_off, El, MPI_INT, a->comm));
            const int64_t rows = a->send_total > a->recv_total ? a->send_total : a->recv_total;
            st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, shm_reserve(a, (size_t)rows * (size_t)max_width, max_width), "ep", 0);
        }
        /* Only now, with every count known to fit, may the buffers grow. */
        if (st == MOE_OK) st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, reserve_trip_buffers(a, max_width), "ep", 0);
    }
    if (st == MOE_OK) {
        a->max_width = max_width;
    } else { /* an empty plan, so that the accessors stay consistent */
        const size_t pe = (size_t)P * El;
        memset(a->send_rows, 0, pe * sizeof(int));
        memset(a->recv_counts, 0, pe * sizeof(int));
        memset(a->recv_expert_off, 0, ((size_t)El + 1) * sizeof(int));
        a->send_total = a->recv_total = 0;
    }
    a->seconds += moe_now() - t0;
    return st;
}

float *moe_a2a_shm_buffer(moe_a2a *a)
{
    return a->kind == MOE_A2A_SHM && !a->local && a->max_width > 0 ? a->seg[a->me] : NULL;
}

int moe_a2a_send_total(const moe_a2a *a) { return a->send_total; }
moe_a2a_kind moe_a2a_kind_of(const moe_a2a *a) { return a->kind; }

void moe_a2a_set_row_bounds(moe_a2a *a, int64_t send_rows, int64_t recv_rows)
{
    a->bound_rows[0] = send_rows > 0 ? send_rows : 0;
    a->bound_rows[1] = recv_rows > 0 ? recv_rows : 0;
}
int moe_a2a_recv_total(const moe_a2a *a) { return a->recv_total; }
const int *moe_a2a_recv_expert_offsets(const moe_a2a *a) { return a->recv_expert_off; }
const int *moe_a2a_recv_counts(const moe_a2a *a) { return a->recv_counts; }
double moe_a2a_seconds(const moe_a2a *a) { return a->seconds; }
void moe_a2a_reset_seconds(moe_a2a *a) { a->seconds = 0; }
moe_a2a_traffic moe_a2a_bytes(const moe_a2a *a) { return a->traffic; }
void moe_a2a_reset_bytes(moe_a2a *a) { memset(&a->traffic, 0, sizeof a->traffic); }

/* n rows of w floats sent to ep rank q (not this rank). */
void moe_a2a_count_sent(moe_a2a *a, int q, int64_t n, int w)
{
    const int64_t b = (int64_t)n * w * (int64_t)sizeof(float);
    a->traffic.sent += b;
    if (a->remote[q]) a->traffic.sent_remote += b;
}

static moe_status check_call(const moe_a2a *a, int width, const char *what)
{
    if (a->max_width == 0)
        return moe_errorf(MOE_ERR_ARG, "%s without a valid plan (moe_a2a_set_counts failed or was not called)", what);
    if (width < 1 || width > a->max_width)
        return moe_errorf(MOE_ERR_ARG, "%s width=%d outside [1, max_width=%d]", what, width, a->max_width);
    return MOE_OK;
}

/* One (local expert j, peer q) block in direction dir: the rows move from
 * (src at *src_off, src_n rows) and arrive at (dst at *dst_off, dst_n rows).
 * Dispatch sends q's expert j from the send layout and receives my expert j
 * from q into the receive layout; return is the mirror image. */
typedef struct { int dst_off, dst_n, src_off, src_n; } block;

static block block_of(const moe_a2a *a, int dir, int j, int q)
{
    const int s = q * a->El + j, r = j * a->P + q;
    if (dir == DISPATCH) return (block){a->recv_off[r], a->recv_counts[r], a->send_off[s], a->send_rows[s]};
    return (block){a->send_off[s], a->send_rows[s], a->recv_off[r], a->recv_counts[r]};
}

static void copy_rows(float *dst, int dst_row, const float *src, int src_row, int n, int w)
{
    if (n > 0) memcpy(dst + (size_t)dst_row * w, src + (size_t)src_row * w, (size_t)n * w * sizeof(float));
}

/* Posts the messages of local experts [j0, j1) and copies this rank's own
 * rows; completion is wait_range's job. */
static moe_status post_range(moe_a2a *a, int dir, int j0, int j1, float *dst, const float *src, int w)
{
    const int P = a->P;
    MPI_Request *rq = a->req + (size_t)dir * 2 * a->El * P;
    for (int j = j0; j < j1; j++) {
        const int tag = dir * a->El + j;
        for (int q = 0; q < P; q++) {
            MPI_Request *r = rq + 2 * ((size_t)j * P + q);
            r[0] = r[1] = MPI_REQUEST_NULL;
            const block b = block_of(a, dir, j, q);
            if (q == a->me) continue;
            if (b.dst_n)
                MOE_MPI_TRY(MPI_Irecv(dst + (size_t)b.dst_off * w, b.dst_n * w, MPI_FLOAT, q, tag, a->comm, &r[0]));
            if (b.src_n) {
                MOE_MPI_TRY(MPI_Isend(src + (size_t)b.src_off * w, b.src_n * w, MPI_FLOAT, q, tag, a->comm, &r[1]));
                moe_a2a_count_sent(a, q, b.src_n, w);
            }
        }
    }
    /* After posting, so that peers can already pull the rows sent to them. */
    for (int j = j0; j < j1; j++) {
        const block b = block_of(a, dir, j, a->me);
        copy_rows(dst, b.dst_off, src, b.src_off, b.dst_n, w);
    }
    return MOE_OK;
}

/* Completes the messages of local experts [j0, j1). Under the watchdog,
 * MPI_Waitsome keeps the set of peers still owed a message current, so
 * that an expired deadline names them. */
static moe_status wait_range(moe_a2a *a, int dir, int j0, int j1)
{
    MPI_Request *rq = a->req + (size_t)dir * 2 * a->El * a->P + 2 * (size_t)j0 * a->P;
    const int n = 2 * (j1 - j0) * a->P, P = a->P;
    if (!moe_wd_on()) {
        MOE_MPI_TRY(MPI_Waitall(n, rq, MPI_STATUSES_IGNORE));
        return MOE_OK;
    }
    memset(a->owed, 0, sizeof(int) * (size_t)P);
    int left = 0;
    for (int i = 0; i < n; i++)
        if (rq[i] != MPI_REQUEST_NULL) {
            a->owed[(i / 2) % P]++;
            left++;
        }
    for (int q = 0; q < P; q++) atomic_store_explicit(&a->pending[q], a->owed[q] > 0, memory_order_relaxed);
    moe_wd_begin(a->c, MOE_SCOPE_EP, dir == DISPATCH ? "token exchange, dispatch" : "token exchange, return",
                 a->pending);
    int rc = MPI_SUCCESS;
    while (left > 0 && rc == MPI_SUCCESS) {
        int done = 0;
        rc = MPI_Waitsome(n, rq, &done, a->done_idx, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS || done == MPI_UNDEFINED) break;
        for (int k = 0; k < done; k++) {
            const int q = (a->done_idx[k] / 2) % P;
            if (--a->owed[q] == 0) atomic_store_explicit(&a->pending[q], 0, memory_order_relaxed);
        }
        left -= done;
        moe_wd_progress();
    }
    moe_wd_end();
    if (rc != MPI_SUCCESS) return moe_comm_mpi_error(rc, "MPI_Waitsome");
    return MOE_OK;
}

/* Shared-memory exchange in direction dir: remote rows via the window,
 * own rows directly. */
static moe_status shm_exchange(moe_a2a *a, int dir, float *dst, const float *src, int w)
{
    const int P = a->P, El = a->El, me = a->me;
    float *mine = a->seg[me];
    /* Publish: rows for other ranks go to my segment at their source-layout
     * offsets, unless the caller built them there (moe_a2a_shm_buffer). */
    for (int j = 0; j < El; j++)
        for (int q = 0; q < P; q++) {
            const block b = block_of(a, dir, j, q);
            if (q == me) {
                copy_rows(dst, b.dst_off, src, b.src_off, b.dst_n, w);
                continue;
            }
            if (src != mine) copy_rows(mine, b.src_off, src, b.src_off, b.src_n, w);
            moe_a2a_count_sent(a, q, b.src_n, w); /* published for q, who copies them */
        }
    MOE_MPI_TRY(MPI_Win_sync(a->win));
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, dir == DISPATCH ? "token exchange, dispatch (shared-memory barrier)"
                                                       : "token exchange, return (shared-memory barrier)",
                   MPI_Barrier(a->comm));
    MOE_MPI_TRY(MPI_Win_sync(a->win));
    /* Collect: my rows from every other rank's segment, straight into place. */
    for (int q = 0; q < P; q++) {
        if (q == me) continue;
        for (int j = 0; j < El; j++) {
            const block b = block_of(a, dir, j, q);
            const int at = dir == DISPATCH ? a->peer_send_off[j * P + q] : a->peer_recv_off[q * El + j];
            copy_rows(dst, b.dst_off, a->seg[q], at, b.dst_n, w);
        }
    }
    /* Nobody refills its segment before every reader is done with it. */
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "token exchange (shared-memory barrier)", MPI_Barrier(a->comm));
    return MOE_OK;
}

/* One direction of the plan on the given buffers, whatever the transport. */
static moe_status transfer(moe_a2a *a, int dir, float *dst, const float *src, int w)
{
    if (a->local) { /* one rank: the two layouts are the same */
        if (dst != src) copy_rows(dst, 0, src, 0, a->send_total, w);
        return MOE_OK;
    }
    if (a->kind == MOE_A2A_SHM) return shm_exchange(a, dir, dst, src, w);
    if (a->kind == MOE_A2A_NODE)
        return dir == DISPATCH ? moe_a2a_node_dispatch(a, dst, src, w, 0) : moe_a2a_node_return(a, dst, src, w, 0, NULL);
    moe_status st = post_range(a, dir, 0, a->El, dst, src, w);
    if (st == MOE_OK) st = wait_range(a, dir, 0, a->El);
    return st;
}

static moe_status exchange(moe_a2a *a, int dir, float *dst, const float *src, int w)
{
    moe_status st = check_call(a, w, dir == DISPATCH ? "moe_a2a_dispatch" : "moe_a2a_return");
    if (st) return st;
    const double t0 = moe_now();
    st = transfer(a, dir, dst, src, w);
    a->seconds += moe_now() - t0;
    return st;
}

moe_status moe_a2a_dispatch(moe_a2a *a, float *recv, const float *send, int width)
{
    return exchange(a, DISPATCH, recv, send, width);
}

moe_status moe_a2a_return(moe_a2a *a, float *send, const float *recv, int width)
{
    return exchange(a, RETURN, send, recv, width);
}

moe_status moe_a2a_buffers_get(moe_a2a *a, moe_a2a_trip trip, moe_a2a_buffers *b)
{
    memset(b, 0, sizeof *b);
    if (a->max_width == 0)
        return moe_errorf(MOE_ERR_ARG, "exchange buffers without a valid plan (moe_a2a_set_counts failed or was not called)");
    float **B = a->buf;
    float *shm = moe_a2a_shm_buffer(a);
    const int fwd = trip == MOE_A2A_FORWARD;
    if (a->local) {
        /* The receive layout is the send layout: x rows are read where they
         * were packed, results stay where the experts wrote them, and the
         * backward works in place on the forward results. */
        *b = fwd ? (moe_a2a_buffers){B[B_SEND_X], B[B_SEND_X], B[B_RECV_Y], B[B_RECV_Y]}
                 : (moe_a2a_buffers){B[B_RECV_Y], B[B_RECV_Y], B[B_RECV_Y], B[B_RECV_Y]};
    } else if (shm) {
        /* Rows are packed and computed straight into the window: one copy
         * per row (the receiver's). */
        *b = fwd ? (moe_a2a_buffers){shm, B[B_RECV_X], shm, B[B_SEND_Y]}
                 : (moe_a2a_buffers){shm, B[B_RECV_Y], shm, B[B_SEND_X]};
    } else {
        /* The backward sends where the forward results came home (in place),
         * and its experts write over their own inputs. */
        *b = fwd ? (moe_a2a_buffers){B[B_SEND_X], B[B_RECV_X], B[B_RECV_Y], B[B_SEND_Y]}
                 : (moe_a2a_buffers){B[B_SEND_Y], B[B_RECV_Y], B[B_RECV_Y], B[B_SEND_X]};
    }
    return MOE_OK;
}

/* Chunked round trip (P2P, nc > 1 chunks): while chunk c computes, chunk
 * c+1's dispatch and chunk c's return are in flight, posted as the same
 * per-block messages, so the result is bitwise that of the plain sequence. */
static moe_status chunked_trip(moe_a2a *a, int nc, const moe_a2a_buffers *b, int w, int ow,
                               moe_a2a_compute_fn compute, void *ctx, moe_status cst, double *t_compute)
{
    const int El = a->El;
    float *recv = (float *)b->recv, *back = (float *)b->back;
    /* Chunk c holds local experts [c * El / nc, (c + 1) * El / nc). */
    moe_status st = post_range(a, DISPATCH, 0, El / nc, recv, b->send, w);
    for (int c = 0; c < nc && st == MOE_OK; c++) {
        const int j0 = c * El / nc, j1 = (c + 1) * El / nc;
        if (c + 1 < nc) st = post_range(a, DISPATCH, j1, (c + 2) * El / nc, recv, b->send, w);
        if (st == MOE_OK) st = wait_range(a, DISPATCH, j0, j1);
        /* After a compute failure the exchange still runs to the end so that
         * no rank waits for messages that never come; the results are void. */
        if (st == MOE_OK && cst == MOE_OK) {
            const double tc = moe_now();
            cst = compute(ctx, j0, j1, b->recv, b->out);
            *t_compute += moe_now() - tc;
        }
        if (st == MOE_OK) st = post_range(a, RETURN, j0, j1, back, b->out, ow);
    }
    if (st == MOE_OK) st = wait_range(a, RETURN, 0, El);
    return cst ? cst : st;
}

moe_status moe_a2a_exchange(moe_a2a *a, moe_a2a_trip trip, int width, int out_width,
                            moe_a2a_compute_fn compute, void *ctx, moe_status local)
{
    moe_a2a_buffers b;
    moe_status st = check_call(a, width, "moe_a2a_exchange");
    if (st == MOE_OK) st = check_call(a, out_width, "moe_a2a_exchange (out)");
    if (st == MOE_OK) st = moe_a2a_buffers_get(a, trip, &b);
    if (st) return st; /* the same on every rank: no plan, or a bad width */
    const int El = a->El, nc = imin(a->chunks, El);
    const double t0 = moe_now();
    double t1 = t0, t2 = t0;
    if (a->local) {
        /* back IS out: nothing to move either way. */
        st = local ? local : compute(ctx, 0, El, b.recv, b.out);
        t2 = moe_now();
        a->last = (moe_a2a_times){0, t2 - t0, 0, 0, 0};
        return st;
    }
    if (a->kind == MOE_A2A_P2P && nc > 1) {
        double tc = 0;
        st = chunked_trip(a, nc, &b, width, out_width, compute, ctx, local, &tc);
        t1 = t2 = moe_now();
        a->seconds += t2 - t0 - tc;
    } else {
        /* Nothing to overlap with: the plain sequence. */
        st = transfer(a, DISPATCH, (float *)b.recv, b.send, width);
        t1 = moe_now();
        moe_status cst = local ? local : st ? st : compute(ctx, 0, El, b.recv, b.out);
        t2 = moe_now();
        /* The return runs on every rank even after a failure: its peers are already in it. */
        st = transfer(a, RETURN, (float *)b.back, b.out, out_width);
        st = cst ? cst : st;
        a->seconds += (t1 - t0) + (moe_now() - t2);
    }
    st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, st, "ep", 0);
    const double t3 = moe_now();
    a->last = (moe_a2a_times){t1 - t0, t2 - t1, t3 - t2, 0, 0};
    return st;
}

moe_a2a_times moe_a2a_last_times(const moe_a2a *a) { return a->last; }

moe_status moe_a2a_bench_raw_alltoallv(moe_a2a *a, float *recv, const float *send, float *back, int width)
{
    moe_status st = check_call(a, width, "moe_a2a_bench_raw_alltoallv");
    if (st) return st;
    if (a->local) { /* one rank: the two copies */
        copy_rows(recv, 0, send, 0, a->send_total, width);
        copy_rows(back, 0, recv, 0, a->send_total, width);
        return MOE_OK;
    }
    const int P = a->P, El = a->El;
    int *scount = a->vcount, *sdispl = a->vdispl, *rcount = scount + P, *rdispl = sdispl + P;
    for (int q = 0, roff = 0; q < P; q++) {
        int n = 0, m = 0;
        for (int j = 0; j < El; j++) {
            n += a->send_rows[q * El + j];
            m += a->recv_counts[j * P + q];
        }
        scount[q] = n * width;
        sdispl[q] = a->send_off[q * El] * width;
        rcount[q] = m * width;
        rdispl[q] = roff * width;
        roff += m;
    }
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "raw MPI_Alltoallv",
                   MPI_Alltoallv(send, scount, sdispl, MPI_FLOAT, recv, rcount, rdispl, MPI_FLOAT, a->comm));
    MOE_MPI_TRY_WD(a->c, MOE_SCOPE_EP, "raw MPI_Alltoallv",
                   MPI_Alltoallv(recv, rcount, rdispl, MPI_FLOAT, back, scount, sdispl, MPI_FLOAT, a->comm));
    return MOE_OK;
}

/* ---- token-level plan and trips ---- */

/* Grows an int or float array to n elements (contents not kept). */
static moe_status grow_array(void **p, int *cap, int n, size_t size)
{
    if (n <= *cap && *p) return MOE_OK;
    const int c = n + n / 4 + 16;
    void *q = moe_calloc((size_t)c, size);
    if (!q) return moe_errorf(MOE_ERR_NOMEM, "token exchange plan: %d entries", c);
    moe_free(*p);
    *p = q;
    *cap = c;
    return MOE_OK;
}

/* The local part of a token-level plan: checks the routing and lays out
 * the send rows (one per assignment, grouped by destination, tokens
 * ascending inside a destination). */
static moe_status plan_tokens(moe_a2a *a, const moe_a2a_routing *r)
{
    const int D = a->P * a->El;
    if (!r || r->n_tokens < 0 || !r->tok_off || (r->tok_off[r->n_tokens] > 0 && (!r->dest || !r->weight)))
        return moe_errorf(MOE_ERR_ARG, "token exchange: NULL or negative routing");
    const int T = r->n_tokens, A = r->tok_off[T];
    if (r->tok_off[0] != 0) return moe_errorf(MOE_ERR_ARG, "token exchange: tok_off[0] = %d, not 0", r->tok_off[0]);
    for (int t = 0; t < T; t++)
        if (r->tok_off[t + 1] < r->tok_off[t])
            return moe_errorf(MOE_ERR_ARG, "token exchange: tok_off decreases at token %d", t);
    for (int i = 0; i < A; i++)
        if (r->dest[i] < 0 || r->dest[i] >= D)
            return moe_errorf(MOE_ERR_ARG, "token exchange: assignment %d goes to %d, outside [0, %d)", i, r->dest[i], D);
    int tcap = a->tok_cap;
    moe_status st = grow_array((void **)&a->tok_off, &tcap, T + 1, sizeof(int));
    a->tok_cap = tcap;
    int acap = a->asg_cap;
    if (!st) st = grow_array((void **)&a->asg_row, &acap, A, sizeof(int));
    if (!st && acap != a->asg_cap) { /* the same capacity for the three per-assignment arrays */
        moe_free(a->asg_w);
        moe_free(a->row_tok);
        a->asg_w = moe_calloc((size_t)acap, sizeof(float));
        a->row_tok = moe_calloc((size_t)acap, sizeof(int));
        a->asg_cap = acap;
        if (!a->asg_w || !a->row_tok) {
            a->asg_cap = 0;
            st = moe_errorf(MOE_ERR_NOMEM, "token exchange plan: %d assignments", A);
        }
    }
    if (st) return st;
    memcpy(a->tok_off, r->tok_off, sizeof(int) * (size_t)(T + 1));
    memset(a->plan_rows, 0, sizeof(int) * (size_t)D);
    for (int i = 0; i < A; i++) a->plan_rows[r->dest[i]]++;
    /* cursor per destination: tokens land in ascending order inside each */
    int *cursor = a->done_idx; /* (2 El P) scratch, free between trips */
    for (int d = 0, o = 0; d < D; o += a->plan_rows[d], d++) cursor[d] = o;
    for (int t = 0; t < T; t++)
        for (int i = r->tok_off[t]; i < r->tok_off[t + 1]; i++) {
            const int row = cursor[r->dest[i]]++;
            a->asg_row[i] = row;
            a->asg_w[i] = r->weight[i];
            a->row_tok[row] = t;
        }
    a->T = T;
    a->A = A;
    return MOE_OK;
}

moe_status moe_a2a_plan(moe_a2a *a, const moe_a2a_routing *r, moe_status local_status, int max_width)
{
    moe_status st = local_status != MOE_OK ? local_status : plan_tokens(a, r);
    if (st) {
        memset(a->plan_rows, 0, sizeof(int) * (size_t)a->P * a->El);
        a->T = a->A = 0;
    }
    a->tok_plan = 0;
    if (a->kind == MOE_A2A_NODE && !a->local)
        st = moe_a2a_node_plan(a, a->T, st ? NULL : r->tok_off, st ? NULL : r->dest, st ? NULL : r->weight,
                               a->plan_rows, st, max_width);
    else
        st = moe_a2a_set_counts_x(a, a->plan_rows, NULL, st, max_width);
    a->tok_plan = st == MOE_OK;
    return st;
}

/* ---- the passes at home, over the pool ---- */

typedef struct {
    a2a_range_fn fn;
    const void *ctx;
    long n;
} par_for_job;

static void par_for_run(void *ctx, int t, int nt)
{
    const par_for_job *j = ctx;
    long i0, i1;
    moe_par_range(j->n, t, nt, &i0, &i1);
    if (i0 < i1) j->fn(j->ctx, i0, i1);
}

void moe_a2a_par_for(a2a_range_fn fn, const void *ctx, long n, long floats)
{
    if (n <= 0) return;
    int nt = moe_par_threads_for(floats, A2A_PAR_MIN_FLOATS);
    if (nt > n) nt = (int)n;
    if (nt <= 1) {
        fn(ctx, 0, n); /* no region: OpenBLAS keeps its threads */
        return;
    }
    const par_for_job j = {fn, ctx, n};
    moe_par_run(nt, par_for_run, (void *)&j);
}

/* What a pass reads and writes (the token plan comes from a). */
typedef struct {
    const moe_a2a *a;
    float *out;        /* pack: send rows; combine: y; gate: backward send rows; add: dx */
    const float *in;   /* pack: x; combine: result rows; gate: dy; add: backward result rows */
    const float *rows; /* gate: the forward's result rows (may be out: each row is read first) */
    float *dweight;    /* gate: dL/dg per assignment */
    int w;
} tok_pass;

/* Send rows [r0, r1): each a copy of its token's row. */
static void pass_pack(const void *ctx, long r0, long r1)
{
    const tok_pass *p = ctx;
    const size_t w = (size_t)p->w;
    for (long row = r0; row < r1; row++)
        memcpy(p->out + (size_t)row * w, p->in + (size_t)p->a->row_tok[row] * w, sizeof(float) * w);
}

/* Tokens [t0, t1): y[t] = sum in combine order of weight * result, from 0
 * (the order is the bits: the same on any number of ranks, with any kind,
 * at any thread count). */
static void pass_combine(const void *ctx, long t0, long t1)
{
    const tok_pass *p = ctx;
    const moe_a2a *a = p->a;
    const int w = p->w;
    for (long t = t0; t < t1; t++) {
        float *yt = p->out + (size_t)t * w;
        memset(yt, 0, sizeof(float) * (size_t)w);
        for (int i = a->tok_off[t]; i < a->tok_off[t + 1]; i++)
            a2a_axpy(yt, a->asg_w[i], p->in + (size_t)a->asg_row[i] * w, w);
    }
}

/* Tokens [t0, t1): dL/dg of each assignment against its forward result,
 * and its send row g * dy (in place over that result: read, then written). */
static void pass_gate(const void *ctx, long t0, long t1)
{
    const tok_pass *p = ctx;
    const moe_a2a *a = p->a;
    const int w = p->w;
    for (long t = t0; t < t1; t++) {
        const float *dyt = p->in + (size_t)t * w;
        for (int i = a->tok_off[t]; i < a->tok_off[t + 1]; i++) {
            const size_t row = (size_t)a->asg_row[i];
            const float g = a->asg_w[i];
            p->dweight[i] = a2a_dot(dyt, p->rows + row * w, w);
            float *dyrow = p->out + row * w;
            for (int k = 0; k < w; k++) dyrow[k] = g * dyt[k];
        }
    }
}

/* Tokens [t0, t1): dx[t] += the returned rows of t, in combine order. */
static void pass_add(const void *ctx, long t0, long t1)
{
    const tok_pass *p = ctx;
    const moe_a2a *a = p->a;
    const int w = p->w;
    for (long t = t0; t < t1; t++) {
        float *dxt = p->out + (size_t)t * w;
        for (int i = a->tok_off[t]; i < a->tok_off[t + 1]; i++) {
            const float *src = p->in + (size_t)a->asg_row[i] * w;
            for (int k = 0; k < w; k++) dxt[k] += src[k];
        }
    }
}

static moe_status check_tokens(const moe_a2a *a, int width, const char *what)
{
    if (!a->tok_plan)
        return moe_errorf(MOE_ERR_ARG, "%s without a token-level plan (moe_a2a_plan failed or was not called)", what);
    return check_call(a, width, what);
}

moe_status moe_a2a_forward(moe_a2a *a, float *y, const float *x, int width, moe_a2a_compute_fn compute, void *ctx,
                           moe_status local)
{
    moe_a2a_buffers b;
    moe_status st = check_tokens(a, width, "moe_a2a_forward");
    if (st == MOE_OK) st = moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &b);
    if (st) return st; /* the same on every rank: no plan, or a bad width */
    const int w = width;
    if (a->kind == MOE_A2A_NODE && !a->local) {
        /* The node-aware kind moves token rows and combines on the way back. */
        const double t0 = moe_now();
        st = moe_a2a_node_dispatch(a, (float *)b.recv, x, w, 0);
        const double t1 = moe_now();
        moe_status cst = local ? local : st ? st : compute(ctx, 0, a->El, b.recv, b.out);
        const double t2 = moe_now();
        const moe_status rst = moe_a2a_node_return(a, y, b.out, w, 1, NULL);
        st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, cst ? cst : st ? st : rst, "ep", 0);
        const double t3 = moe_now();
        a->last = (moe_a2a_times){t1 - t0, t2 - t1, t3 - t2, 0, 0};
        a->seconds += (t1 - t0) + (t3 - t2);
        return st;
    }
    const double t0 = moe_now();
    const long floats = (long)a->A * w;
    moe_a2a_par_for(pass_pack, &(tok_pass){a, b.send, x, NULL, NULL, w}, a->A, floats);
    const double t1 = moe_now();
    st = moe_a2a_exchange(a, MOE_A2A_FORWARD, width, width, compute, ctx, local);
    const double t2 = moe_now();
    if (st == MOE_OK) moe_a2a_par_for(pass_combine, &(tok_pass){a, y, b.back, NULL, NULL, w}, a->T, floats);
    a->last.pack = t1 - t0;
    a->last.combine = moe_now() - t2;
    return st;
}

moe_status moe_a2a_backward(moe_a2a *a, float *dweight, const float *dy, int width, moe_a2a_compute_fn compute,
                            void *ctx, moe_status local)
{
    moe_a2a_buffers fb, bb;
    moe_status st = check_tokens(a, width, "moe_a2a_backward");
    if (st == MOE_OK) st = moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &fb);
    if (st == MOE_OK) st = moe_a2a_buffers_get(a, MOE_A2A_BACKWARD, &bb);
    if (st) return st;
    const int w = width;
    if (a->kind == MOE_A2A_NODE && !a->local) {
        /* dy rows travel once per node; the owner forms g * dy and dL/dg
         * against the forward's results it kept (bb.recv, in place). */
        const double t0 = moe_now();
        st = moe_a2a_node_dispatch(a, (float *)bb.recv, dy, w, 1);
        const double t1 = moe_now();
        moe_status cst = local ? local : st ? st : compute(ctx, 0, a->El, bb.recv, bb.out);
        const double t2 = moe_now();
        const moe_status rst = moe_a2a_node_return(a, (float *)bb.back, bb.out, w, 0, dweight);
        st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, cst ? cst : st ? st : rst, "ep", 0);
        const double t3 = moe_now();
        a->last = (moe_a2a_times){t1 - t0, t2 - t1, t3 - t2, 0, 0};
        a->seconds += (t1 - t0) + (t3 - t2);
        return st;
    }
    const double t0 = moe_now();
    /* dL/dg of each assignment, and the rows g * dy for the experts: bb.send
     * may be fb.back (in place: each row is read before it is written). */
    moe_a2a_par_for(pass_gate, &(tok_pass){a, bb.send, dy, fb.back, dweight, w}, a->T, (long)a->A * w);
    const double t1 = moe_now();
    st = moe_a2a_exchange(a, MOE_A2A_BACKWARD, width, width, compute, ctx, local);
    a->last.pack = t1 - t0;
    a->last.combine = 0;
    return st;
}

void moe_a2a_backward_add(moe_a2a *a, float *dx, int width)
{
    moe_a2a_buffers bb;
    if (!a->tok_plan || moe_a2a_buffers_get(a, MOE_A2A_BACKWARD, &bb)) return;
    moe_a2a_par_for(pass_add, &(tok_pass){a, dx, bb.back, NULL, NULL, width}, a->T, (long)a->A * width);
}
