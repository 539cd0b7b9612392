/* The node-aware exchange (MOE_A2A_NODE, comm.h): two levels.
 *
 * Inside a node, rows move through an MPI-3 shared window (one segment per
 * rank of the node). Across nodes, each ordered pair of nodes exchanges ONE
 * message per half-trip, sent by a "partner" rank of the sending node and
 * received by a partner of the receiving node: node X's partner for node Y
 * is its rank Y mod |X| (so the pairs spread over a node's ranks), and the
 * same rank handles both directions of a pair.
 *
 * Dispatch: a home rank publishes each token row ONCE per destination node
 * (its "unique rows" for that node), whatever the number of the token's
 * assignments there; a node's partner gathers its node's rows for node Y
 * into one message; the receiving node's ranks copy (fan out) the rows into
 * their receive layouts. The receive layout is exactly that of the other
 * kinds (grouped by local expert, then source rank, then the source's token
 * order), so the experts compute the same bits.
 *
 * Return: the owners publish their result rows; for each token of node Y,
 * node X's partner forms "units": when X holds the token's first m
 * assignments in combine order (ascending global expert), the first unit
 * is their partial sum (0 + g1 r1) + g2 r2 ..., exactly the start of the
 * home's own left fold; every other assignment on X is a unit of its own,
 * g r. The home then folds units and its own node's rows in combine order:
 * the same operations in the same order as the flat kinds, so the same
 * bits, while at top-2 a token sends at most one row to and from a node.
 * The backward trip returns one record per assignment (dx row and dL/dg):
 * the home adds the dx rows after the router's part, in expert order, as
 * the flat kinds do.
 *
 * The layouts are fixed per plan: the count exchange carries each
 * sender's per-node counts, the node's ranks share their counts and receive
 * layouts (one MPI_Allgather over the node), and the routing metadata (per
 * unique row, its assignments on the node: destination and weight) crosses
 * once per node pair like the rows. Every rank then precomputes where each
 * of its receive rows, units and combine terms lives. A trip is three node
 * barriers and the partner messages per half.
 *
 * The per-row and per-token passes of a trip (publishing my rows, the fan
 * out, publishing results, the home's combine and scatter) split rows or
 * tokens over the fork-join pool (moe_a2a_par_for), each row or token done
 * whole by one thread, so the bits do not depend on the thread count. */
#include "comm/a2a_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

enum { TAG_META = 0, TAG_ROWS = 1, TAG_BACK = 2 };
enum { C_UNIQ, C_META, C_UNITS, C_ASG, N_COUNTS }; /* per-node counts of a sender */
enum { HS_LOCAL, HS_UNIT, HS_SKIP };              /* where a home combine term comes from */

struct a2a_node {
    /* topology (create) */
    int N, mynode, li, nn;   /* nodes; my node; my index in it; its size */
    int *node_of;            /* (P) node of each ep rank */
    int *nfirst, *nlist;     /* (N + 1), (P): ep ranks of node n are nlist[nfirst[n] .. nfirst[n + 1]), ascending */
    MPI_Comm comm;           /* my node's ranks of the ep group (rank = li) */
    MPI_Win win;
    size_t cap;              /* words per segment */
    uint32_t **seg;          /* (nn) every node rank's segment, mapped here */
    int n_partner;           /* remote nodes I am the partner for */
    int *partner;            /* (N) remote nodes I am the partner for, ascending */
    MPI_Request *rq;         /* (2 N) */
    int *rq_peer;            /* (2 N) ep rank of each request's peer */

    /* the plan */
    int T, A;
    int *tok_off, *dest;     /* (T + 1), (A) */
    float *w;                /* (A) */
    int *hrow;               /* (A) home row of each assignment (ROWS results) */
    int *uoff, *uniq;        /* (N + 1), (sum): my unique rows per node */
    uint32_t *meta;          /* my metadata, node order */
    int *moff;               /* (N + 1) word offsets of my metadata per node */
    int *cnt;                /* (nn, N, N_COUNTS) every node rank's counts per node */
    int *nrecv_off;          /* (nn, El * P + 1) every node rank's receive layout and total */
    int *xcnt;               /* (P, N_COUNTS) every sender's counts for MY node (count exchange) */
    size_t dbase;            /* word offset of the data region in every segment */
    int *in_base;            /* (N) word offset of the metadata from node X in my segment (partner) */
    /* dispatch: where each receive row comes from */
    int *rb_seg, *rb_row;    /* (R) node rank whose segment holds it, and its row there */
    float *rb_w;             /* (R) its weight */
    float *dg;               /* (R) dL/dg of each receive row (backward) */
    int *rb_cap;
    /* return, as partner: items (out rows) and units per node pair */
    int n_items, n_units;
    int *it_seg, *it_row;    /* (n_items) owner node rank and its receive row */
    float *it_w;             /* (n_items) */
    int *unit_off;           /* (n_units + 1) items of each REDUCE unit */
    int *px_items, *px_units; /* (n_partner + 1) offsets per partnered node, in message order */
    /* the home's combine terms, per assignment */
    int *hs_kind, *hs_seg, *hs_row_red, *hs_row_rows;
    /* message sizes, per partnered node (rows or words), and the send buffer */
    float *sbuf;
    size_t sbuf_cap;
    int64_t local_rows_other; /* own-node unique rows read by another rank (traffic) */
    int64_t local_ret_rows;   /* receive rows whose source is another rank of my node */
    int caps[8];             /* capacities of the growing arrays */
};

/* ---- helpers ---- */

static int partner_on(const a2a_node *n, int x, int y) /* node x's partner (ep rank) for node y */
{
    const int sz = n->nfirst[x + 1] - n->nfirst[x];
    return n->nlist[n->nfirst[x] + y % sz];
}

static int node_index(const a2a_node *n, int p) /* index of ep rank p in its node */
{
    const int x = n->node_of[p];
    for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++)
        if (n->nlist[i] == p) return i - n->nfirst[x];
    return -1;
}

static int *cnt_of(const a2a_node *n, int q, int node) { return n->cnt + ((size_t)q * n->N + node) * N_COUNTS; }

static moe_status grow_int(int **p, int *cap, int64_t need)
{
    if (need > INT_MAX / 2) return moe_errorf(MOE_ERR_OVERFLOW, "node exchange: %lld entries", (long long)need);
    if (need <= *cap && *p) return MOE_OK;
    const int c = (int)(need + need / 4 + 16);
    int *q = moe_calloc((size_t)c, sizeof(int));
    if (!q) return moe_errorf(MOE_ERR_NOMEM, "node exchange: %d entries", c);
    moe_free(*p);
    *p = q;
    *cap = c;
    return MOE_OK;
}

/* Node barrier under the watchdog (its peers: my node's other ranks). */
static moe_status node_barrier(moe_a2a *a, const char *what)
{
    a2a_node *n = a->node;
    for (int q = 0; q < a->P; q++) atomic_store_explicit(&a->pending[q], n->node_of[q] == n->mynode && q != a->me, memory_order_relaxed);
    moe_wd_begin(a->c, MOE_SCOPE_EP, what, a->pending);
    const int rc = MPI_Barrier(n->comm);
    moe_wd_end();
    return rc == MPI_SUCCESS ? MOE_OK : moe_comm_mpi_error(rc, "MPI_Barrier");
}

/* Completes the k partner messages in n->rq; the watchdog is told which
 * remote partners are still owed. */
static moe_status wait_msgs(moe_a2a *a, int k, const char *what)
{
    a2a_node *n = a->node;
    memset(a->owed, 0, sizeof(int) * (size_t)a->P);
    int left = 0;
    for (int i = 0; i < k; i++)
        if (n->rq[i] != MPI_REQUEST_NULL) {
            a->owed[n->rq_peer[i]]++;
            left++;
        }
    for (int q = 0; q < a->P; q++) atomic_store_explicit(&a->pending[q], a->owed[q] > 0, memory_order_relaxed);
    moe_wd_begin(a->c, MOE_SCOPE_EP, what, a->pending);
    int rc = MPI_SUCCESS;
    while (left > 0 && rc == MPI_SUCCESS) {
        int done = 0;
        rc = MPI_Waitsome(k, n->rq, &done, a->done_idx, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS || done == MPI_UNDEFINED) break;
        for (int i = 0; i < done; i++) {
            const int q = n->rq_peer[a->done_idx[i]];
            if (--a->owed[q] == 0) atomic_store_explicit(&a->pending[q], 0, memory_order_relaxed);
        }
        left -= done;
        moe_wd_progress();
    }
    moe_wd_end();
    return rc == MPI_SUCCESS ? MOE_OK : moe_comm_mpi_error(rc, "MPI_Waitsome");
}

static moe_status reserve_sbuf(a2a_node *n, size_t floats)
{
    if (floats <= n->sbuf_cap && n->sbuf) return MOE_OK;
    const size_t c = floats + floats / 4 + 64;
    float *p = moe_calloc(c, sizeof(float));
    if (!p) return moe_errorf(MOE_ERR_NOMEM, "node exchange: send buffer of %zu floats", c);
    moe_free(n->sbuf);
    n->sbuf = p;
    n->sbuf_cap = c;
    return MOE_OK;
}

/* ---- create / destroy ---- */

moe_status moe_a2a_node_create(moe_a2a *a)
{
    const int P = a->P;
    a2a_node *n = moe_calloc(1, sizeof *n);
    if (!n) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    a->node = n;
    n->comm = MPI_COMM_NULL;
    n->win = MPI_WIN_NULL;
    n->node_of = moe_calloc((size_t)P, sizeof(int));
    n->nlist = moe_calloc((size_t)P, sizeof(int));
    n->rq = moe_calloc(2 * (size_t)P + 2, sizeof(MPI_Request));
    n->rq_peer = moe_calloc(2 * (size_t)P + 2, sizeof(int));
    if (!n->node_of || !n->nlist || !n->rq || !n->rq_peer) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    /* Node indices in order of their first ep rank. */
    int *first_of = moe_calloc((size_t)moe_comm_n_nodes(a->c) + 1, sizeof(int));
    if (!first_of) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    for (int i = 0; i <= moe_comm_n_nodes(a->c); i++) first_of[i] = -1;
    int N = 0;
    for (int p = 0; p < P; p++) {
        const int g = moe_comm_node_of(a->c, moe_comm_ep_world_rank(a->c, p));
        if (first_of[g] < 0) first_of[g] = N++;
        n->node_of[p] = first_of[g];
    }
    moe_free(first_of);
    n->N = N;
    n->mynode = n->node_of[a->me];
    n->nfirst = moe_calloc((size_t)N + 1, sizeof(int));
    n->partner = moe_calloc((size_t)N, sizeof(int));
    n->in_base = moe_calloc((size_t)N, sizeof(int));
    n->uoff = moe_calloc((size_t)N + 1, sizeof(int));
    n->moff = moe_calloc((size_t)N + 1, sizeof(int));
    n->xcnt = moe_calloc((size_t)P * N_COUNTS, sizeof(int));
    n->px_items = moe_calloc((size_t)N + 1, sizeof(int));
    n->px_units = moe_calloc((size_t)N + 1, sizeof(int));
    if (!n->nfirst || !n->partner || !n->in_base || !n->uoff || !n->moff || !n->xcnt || !n->px_items || !n->px_units)
        return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    for (int p = 0; p < P; p++) n->nfirst[n->node_of[p] + 1]++;
    for (int x = 0; x < N; x++) n->nfirst[x + 1] += n->nfirst[x];
    int *fill = moe_calloc((size_t)N, sizeof(int));
    if (!fill) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    for (int p = 0; p < P; p++) n->nlist[n->nfirst[n->node_of[p]] + fill[n->node_of[p]]++] = p;
    moe_free(fill);
    n->nn = n->nfirst[n->mynode + 1] - n->nfirst[n->mynode];
    n->li = node_index(n, a->me);
    for (int x = 0; x < N; x++)
        if (x != n->mynode && partner_on(n, n->mynode, x) == a->me) n->partner[n->n_partner++] = x;
    n->seg = moe_calloc((size_t)n->nn, sizeof(uint32_t *));
    n->cnt = moe_calloc((size_t)n->nn * N * N_COUNTS, sizeof(int));
    n->nrecv_off = moe_calloc((size_t)n->nn * ((size_t)a->El * P + 1), sizeof(int));
    if (!n->seg || !n->cnt || !n->nrecv_off) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    moe_status st = MOE_OK;
    MOE_MPI_KEEP_WD(st, a->c, MOE_SCOPE_EP, "node exchange set-up (MPI_Comm_split)",
                    MPI_Comm_split(a->comm, n->mynode, a->me, &n->comm));
    if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_set_errhandler(n->comm, MPI_ERRORS_RETURN));
    return st;
}

static void free_win(a2a_node *n)
{
    if (n->win == MPI_WIN_NULL) return;
    MPI_Win_unlock_all(n->win);
    MPI_Win_free(&n->win);
    n->cap = 0;
}

void moe_a2a_node_destroy(moe_a2a *a)
{
    a2a_node *n = a->node;
    if (!n) return;
    free_win(n);
    if (n->comm != MPI_COMM_NULL) MPI_Comm_free(&n->comm);
    void *arrays[] = {n->node_of, n->nfirst, n->nlist, n->seg, n->partner, n->rq, n->rq_peer, n->tok_off, n->dest,
                      n->w, n->hrow, n->uoff, n->uniq, n->meta, n->moff, n->cnt, n->nrecv_off, n->xcnt, n->in_base,
                      n->rb_seg, n->rb_row, n->rb_w, n->dg, n->it_seg, n->it_row, n->it_w, n->unit_off,
                      n->px_items, n->px_units, n->hs_kind, n->hs_seg, n->hs_row_red, n->hs_row_rows, n->sbuf};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) moe_free(arrays[i]);
    moe_free(n);
    a->node = NULL;
}

/* Collective over the node: every segment holds at least `need` words
 * (the same need on every rank of the node, so the same decision). */
static moe_status reserve_win(moe_a2a *a, size_t need)
{
    a2a_node *n = a->node;
    if (n->win != MPI_WIN_NULL && need <= n->cap) return MOE_OK;
    size_t cap = n->cap + n->cap / 2;
    if (cap < need) cap = need;
    if (cap < 64) cap = 64;
    free_win(n);
    MPI_Info info;
    MOE_MPI_TRY(MPI_Info_create(&info));
    moe_status st = MOE_OK;
    MOE_MPI_KEEP(st, MPI_Info_set(info, "alloc_shared_noncontig", "true"));
    void *base = NULL;
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, a->c, MOE_SCOPE_EP, "node exchange window (MPI_Win_allocate_shared)",
                        MPI_Win_allocate_shared((MPI_Aint)(cap * 4), 4, info, n->comm, &base, &n->win));
    MPI_Info_free(&info);
    if (st) return st;
    MOE_MPI_TRY(MPI_Win_set_errhandler(n->win, MPI_ERRORS_RETURN));
    MOE_MPI_TRY(MPI_Win_lock_all(MPI_MODE_NOCHECK, n->win));
    n->cap = cap;
    for (int q = 0; q < n->nn; q++) {
        MPI_Aint size = 0;
        int unit = 0;
        MOE_MPI_TRY(MPI_Win_shared_query(n->win, q, &size, &unit, &n->seg[q]));
    }
    return MOE_OK;
}

/* ---- the plan ---- */

/* The token arrays of the plan: the routing, or one token per send row
 * (row-level use: send_rows per destination, weight 1). */
static moe_status plan_tokens_node(moe_a2a *a, int T, const int *tok_off, const int *dest, const float *weight,
                                   const int *send_rows)
{
    a2a_node *n = a->node;
    const int D = a->P * a->El;
    int64_t A = 0;
    if (tok_off) {
        A = tok_off[T];
    } else {
        for (int d = 0; d < D; d++) A += send_rows[d];
        T = (int)A;
    }
    moe_status st = grow_int(&n->tok_off, &n->caps[0], (int64_t)T + 1);
    int c1 = n->caps[1];
    if (!st) st = grow_int(&n->dest, &c1, A);
    if (!st && c1 != n->caps[1]) {
        moe_free(n->w);
        moe_free(n->hrow);
        moe_free(n->hs_kind);
        moe_free(n->hs_seg);
        moe_free(n->hs_row_red);
        moe_free(n->hs_row_rows);
        n->w = moe_calloc((size_t)c1, sizeof(float));
        n->hrow = moe_calloc((size_t)c1, sizeof(int));
        n->hs_kind = moe_calloc((size_t)c1, sizeof(int));
        n->hs_seg = moe_calloc((size_t)c1, sizeof(int));
        n->hs_row_red = moe_calloc((size_t)c1, sizeof(int));
        n->hs_row_rows = moe_calloc((size_t)c1, sizeof(int));
        n->caps[1] = c1;
        if (!n->w || !n->hrow || !n->hs_kind || !n->hs_seg || !n->hs_row_red || !n->hs_row_rows) {
            n->caps[1] = 0;
            st = moe_errorf(MOE_ERR_NOMEM, "node exchange plan: %lld assignments", (long long)A);
        }
    }
    if (st) return st;
    n->T = T;
    n->A = (int)A;
    if (tok_off) {
        memcpy(n->tok_off, tok_off, sizeof(int) * ((size_t)T + 1));
        memcpy(n->dest, dest, sizeof(int) * (size_t)A);
        memcpy(n->w, weight, sizeof(float) * (size_t)A);
        memcpy(n->hrow, a->asg_row, sizeof(int) * (size_t)A);
    } else {
        for (int d = 0, i = 0; d < D; d++)
            for (int r = 0; r < send_rows[d]; r++, i++) {
                n->tok_off[i] = i;
                n->dest[i] = d;
                n->w[i] = 1.0f;
                n->hrow[i] = i;
            }
        n->tok_off[T] = T;
    }
    return MOE_OK;
}

/* My unique rows and metadata per node, and my counts per node. */
static moe_status plan_home(moe_a2a *a, int *my_cnt /* (N, N_COUNTS) */)
{
    a2a_node *n = a->node;
    const int N = n->N, El = a->El;
    memset(my_cnt, 0, sizeof(int) * (size_t)N * N_COUNTS);
    int *seen = a->done_idx; /* (>= N) scratch: last token counted per node */
    for (int x = 0; x < N; x++) seen[x] = -1;
    for (int t = 0; t < n->T; t++) {
        const int i0 = n->tok_off[t], i1 = n->tok_off[t + 1];
        if (i0 == i1) continue;
        const int first = n->node_of[n->dest[i0] / El];
        int m = 0; /* leading assignments on the first node */
        while (i0 + m < i1 && n->node_of[n->dest[i0 + m] / El] == first) m++;
        for (int i = i0; i < i1; i++) {
            const int x = n->node_of[n->dest[i] / El];
            int *c = my_cnt + (size_t)x * N_COUNTS;
            if (seen[x] != t) {
                seen[x] = t;
                c[C_UNIQ]++;
                c[C_META] += 2;
                /* a prefix on a remote node is one unit */
                if (x != n->mynode && x == first) c[C_UNITS]++;
            }
            c[C_META] += 2;
            c[C_ASG]++;
            if (x != n->mynode && !(x == first && i < i0 + m)) c[C_UNITS]++;
        }
    }
    int64_t nu = 0, nm = 0;
    for (int x = 0; x < N; x++) {
        n->uoff[x] = (int)nu;
        n->moff[x] = (int)nm;
        nu += my_cnt[x * N_COUNTS + C_UNIQ];
        nm += my_cnt[x * N_COUNTS + C_META];
    }
    n->uoff[N] = (int)nu;
    n->moff[N] = (int)nm;
    moe_status st = grow_int(&n->uniq, &n->caps[2], nu);
    if (!st) st = grow_int((int **)&n->meta, &n->caps[3], nm);
    if (st) return st;
    /* Fill: per node, tokens ascending; metadata per unique row:
     * [na, m] then (dest, weight bits) per assignment there, in combine order. */
    int *ucur = seen, *mcur = seen + N;
    for (int x = 0; x < N; x++) {
        ucur[x] = n->uoff[x];
        mcur[x] = n->moff[x];
    }
    int64_t local_other = 0;
    for (int t = 0; t < n->T; t++) {
        const int i0 = n->tok_off[t], i1 = n->tok_off[t + 1];
        if (i0 == i1) continue;
        const int first = n->node_of[n->dest[i0] / El];
        int m = 0;
        while (i0 + m < i1 && n->node_of[n->dest[i0 + m] / El] == first) m++;
        for (int x = 0; x < N; x++) {
            int na = 0, other = 0;
            for (int i = i0; i < i1; i++)
                if (n->node_of[n->dest[i] / El] == x) {
                    na++;
                    other |= n->dest[i] / El != a->me;
                }
            if (!na) continue;
            n->uniq[ucur[x]++] = t;
            if (x == n->mynode) local_other += other;
            uint32_t *mt = n->meta + mcur[x];
            mt[0] = (uint32_t)na;
            mt[1] = (uint32_t)(x == first && x != n->mynode ? m : 0);
            int k = 2;
            for (int i = i0; i < i1; i++) {
                if (n->node_of[n->dest[i] / El] != x) continue;
                mt[k++] = (uint32_t)n->dest[i];
                memcpy(&mt[k++], &n->w[i], 4);
            }
            mcur[x] += k;
        }
    }
    n->local_rows_other = local_other;
    return MOE_OK;
}

/* Rows of the dispatch data region of node rank q (its unique rows, then
 * what it stages as a partner), and of the return region (its receive rows,
 * then what it stages), and the words of its metadata regions. */
typedef struct {
    int64_t d_rows, r_rows, meta, in;
} seg_need;

static seg_need need_of(const moe_a2a *a, int qi)
{
    const a2a_node *n = a->node;
    const int q = n->nlist[n->nfirst[n->mynode] + qi];
    seg_need s = {0, n->nrecv_off[(size_t)qi * ((size_t)a->El * a->P + 1) + (size_t)a->El * a->P], 0, 0};
    for (int x = 0; x < n->N; x++) {
        s.d_rows += cnt_of(n, qi, x)[C_UNIQ];
        s.meta += cnt_of(n, qi, x)[C_META];
        if (x == n->mynode || partner_on(n, n->mynode, x) != q) continue;
        for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++) {
            const int src = n->nlist[i];
            s.d_rows += n->xcnt[src * N_COUNTS + C_UNIQ];
            s.in += n->xcnt[src * N_COUNTS + C_META];
        }
        for (int i = 0; i < n->nn; i++) s.r_rows += cnt_of(n, i, x)[C_ASG];
    }
    return s;
}

/* Where, in the segment of node rank qi, the rows staged from node x start
 * (dispatch: rows; return: rows), and the metadata from x (words). */
static void stage_bases(const moe_a2a *a, int qi, int x, int64_t *d_row, int64_t *r_row, int64_t *in_word,
                        int reduce)
{
    const a2a_node *n = a->node;
    const int q = n->nlist[n->nfirst[n->mynode] + qi];
    int64_t d = 0, r = n->nrecv_off[(size_t)qi * ((size_t)a->El * a->P + 1) + (size_t)a->El * a->P], w = 0;
    for (int y = 0; y < n->N; y++) {
        d += cnt_of(n, qi, y)[C_UNIQ];
        w += cnt_of(n, qi, y)[C_META];
    }
    for (int y = 0; y < x; y++) {
        if (y == n->mynode || partner_on(n, n->mynode, y) != q) continue;
        for (int i = n->nfirst[y]; i < n->nfirst[y + 1]; i++) {
            d += n->xcnt[n->nlist[i] * N_COUNTS + C_UNIQ];
            w += n->xcnt[n->nlist[i] * N_COUNTS + C_META];
        }
        for (int i = 0; i < n->nn; i++) r += cnt_of(n, i, y)[reduce ? C_UNITS : C_ASG];
    }
    *d_row = d;
    *r_row = r;
    *in_word = w;
}

/* Builds where every receive row, every unit and every combine term is. */
static moe_status plan_indices(moe_a2a *a)
{
    a2a_node *n = a->node;
    const int P = a->P, El = a->El, N = n->N, R = a->recv_total, me_li = n->li;
    const size_t RO = (size_t)El * P + 1;
    moe_status st = grow_int(&n->rb_seg, &n->caps[4], R);
    int c5 = n->caps[5];
    if (!st) st = grow_int(&n->rb_row, &c5, R);
    if (!st && c5 != n->caps[5]) {
        moe_free(n->rb_w);
        moe_free(n->dg);
        n->rb_w = moe_calloc((size_t)c5, sizeof(float));
        n->dg = moe_calloc((size_t)c5, sizeof(float));
        n->caps[5] = c5;
        if (!n->rb_w || !n->dg) {
            n->caps[5] = 0;
            st = moe_errorf(MOE_ERR_NOMEM, "node exchange: %d receive rows", R);
        }
    }
    if (st) return st;
    /* 1. Receive rows: walk every source's metadata for my node. */
    int *ord = a->plan_rows; /* (P * El) scratch: rows placed per (source block), reset per source */
    int64_t placed = 0;
    for (int s = 0; s < P; s++) {
        const int xs = n->node_of[s];
        const uint32_t *mt;
        int seg, row0;
        int64_t words = n->xcnt[s * N_COUNTS + C_META];
        if (xs == n->mynode) {
            seg = node_index(n, s); /* its own metadata, at word 0 of its segment */
            int64_t mw = 0, ur = 0;
            for (int y = 0; y < n->mynode; y++) {
                mw += cnt_of(n, seg, y)[C_META];
                ur += cnt_of(n, seg, y)[C_UNIQ];
            }
            mt = n->seg[seg] + mw;
            row0 = (int)ur;
        } else {
            const int pr = partner_on(n, n->mynode, xs);
            seg = node_index(n, pr);
            int64_t d_row, r_row, in_word;
            stage_bases(a, seg, xs, &d_row, &r_row, &in_word, 1);
            /* sources of node xs before s, in their message */
            for (int i = n->nfirst[xs]; n->nlist[i] != s; i++) {
                d_row += n->xcnt[n->nlist[i] * N_COUNTS + C_UNIQ];
                in_word += n->xcnt[n->nlist[i] * N_COUNTS + C_META];
            }
            mt = n->seg[seg] + in_word;
            row0 = (int)d_row;
        }
        for (int j = 0; j < El; j++) ord[j] = 0;
        for (int64_t k = 0, u = 0; k < words; u++) {
            const int na = (int)mt[k];
            k += 2;
            for (int e = 0; e < na; e++, k += 2) {
                const int d = (int)mt[k];
                if (d / El != a->me) continue;
                const int j = d % El;
                const int r = a->recv_off[j * P + s] + ord[j]++;
                if (r >= R || ord[j] > a->recv_counts[j * P + s])
                    return moe_errorf(MOE_ERR_ARG, "node exchange: routing metadata from ep rank %d disagrees with its counts", s);
                n->rb_seg[r] = seg;
                n->rb_row[r] = row0 + (int)u;
                memcpy(&n->rb_w[r], &mt[k + 1], 4);
                placed++;
            }
        }
    }
    if (placed != R) return moe_errorf(MOE_ERR_ARG, "node exchange: %lld of %d receive rows located", (long long)placed, R);

    /* 2. As partner: the items and units of every token of a partnered node. */
    int64_t n_items = 0, n_units = 0;
    for (int pi = 0; pi < n->n_partner; pi++)
        for (int i = n->nfirst[n->partner[pi]]; i < n->nfirst[n->partner[pi] + 1]; i++) {
            n_items += n->xcnt[n->nlist[i] * N_COUNTS + C_ASG];
            n_units += n->xcnt[n->nlist[i] * N_COUNTS + C_UNITS];
        }
    st = grow_int(&n->it_seg, &n->caps[6], n_items);
    int c7 = n->caps[7];
    if (!st) st = grow_int(&n->it_row, &c7, n_items);
    if (!st && c7 != n->caps[7]) {
        moe_free(n->it_w);
        n->it_w = moe_calloc((size_t)c7, sizeof(float));
        n->caps[7] = n->it_w ? c7 : 0;
        if (!n->it_w) st = moe_errorf(MOE_ERR_NOMEM, "node exchange: %lld items", (long long)n_items);
    }
    moe_free(n->unit_off);
    n->unit_off = st ? NULL : moe_calloc((size_t)n_units + 1, sizeof(int));
    if (!st && !n->unit_off) st = moe_errorf(MOE_ERR_NOMEM, "node exchange: %lld units", (long long)n_units);
    if (st) return st;
    int64_t it = 0, un = 0;
    for (int pi = 0; pi < n->n_partner; pi++) {
        const int x = n->partner[pi];
        n->px_items[pi] = (int)it;
        n->px_units[pi] = (int)un;
        int64_t d_row, r_row, in_word;
        stage_bases(a, me_li, x, &d_row, &r_row, &in_word, 1);
        const uint32_t *mt = n->seg[me_li] + in_word;
        int64_t k = 0;
        for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++) {
            const int s = n->nlist[i];
            const int64_t words = n->xcnt[s * N_COUNTS + C_META];
            memset(ord, 0, sizeof(int) * (size_t)P * El);
            for (int64_t end = k + words; k < end;) {
                const int na = (int)mt[k], m = (int)mt[k + 1];
                k += 2;
                for (int e = 0; e < na; e++, k += 2) {
                    const int d = (int)mt[k], q = d / El, j = d % El, qi = node_index(n, q);
                    n->it_seg[it] = qi;
                    n->it_row[it] = n->nrecv_off[(size_t)qi * RO + (size_t)j * P + s] + ord[d]++;
                    memcpy(&n->it_w[it], &mt[k + 1], 4);
                    /* the prefix's first item opens its unit; the others of the prefix join it */
                    if (!(m > 0 && e > 0 && e < m)) n->unit_off[un++] = (int)it;
                    it++;
                }
            }
        }
    }
    n->unit_off[un] = (int)it;
    n->px_items[n->n_partner] = (int)it;
    n->px_units[n->n_partner] = (int)un;
    n->n_items = (int)it;
    n->n_units = (int)un;

    /* 3. The home's terms: my own node's rows in their owners' segments,
     * other nodes' units in their partners' staging areas. */
    int64_t *ubase = (int64_t *)moe_calloc((size_t)N * 2, sizeof(int64_t)); /* per node: my first unit, my first record */
    if (!ubase) return moe_errorf(MOE_ERR_NOMEM, "node exchange");
    for (int x = 0; x < N; x++) {
        if (x == n->mynode) continue;
        const int pr = partner_on(n, n->mynode, x), pi = node_index(n, pr);
        int64_t d_row, r_red, r_rows, in_word;
        stage_bases(a, pi, x, &d_row, &r_red, &in_word, 1);
        stage_bases(a, pi, x, &d_row, &r_rows, &in_word, 0);
        for (int i = 0; i < me_li; i++) {
            r_red += cnt_of(n, i, x)[C_UNITS];
            r_rows += cnt_of(n, i, x)[C_ASG];
        }
        ubase[2 * x] = r_red;
        ubase[2 * x + 1] = r_rows;
    }
    memset(ord, 0, sizeof(int) * (size_t)P * El);
    int64_t local_ret = 0;
    for (int t = 0; t < n->T; t++) {
        const int i0 = n->tok_off[t], i1 = n->tok_off[t + 1];
        if (i0 == i1) continue;
        const int first = n->node_of[n->dest[i0] / El];
        int m = 0;
        while (i0 + m < i1 && n->node_of[n->dest[i0 + m] / El] == first) m++;
        for (int i = i0; i < i1; i++) {
            const int d = n->dest[i], q = d / El, j = d % El, x = n->node_of[q];
            if (x == n->mynode) {
                const int qi = node_index(n, q);
                n->hs_kind[i] = HS_LOCAL;
                n->hs_seg[i] = qi;
                n->hs_row_red[i] = n->hs_row_rows[i] = n->nrecv_off[(size_t)qi * RO + (size_t)j * P + a->me] + ord[d]++;
                local_ret += q != a->me;
                continue;
            }
            n->hs_seg[i] = node_index(n, partner_on(n, n->mynode, x));
            n->hs_row_rows[i] = (int)ubase[2 * x + 1]++;
            if (x == first && m > 1 && i > i0 && i < i0 + m) {
                n->hs_kind[i] = HS_SKIP; /* inside the prefix's partial sum */
                n->hs_row_red[i] = -1;
            } else {
                n->hs_kind[i] = HS_UNIT;
                n->hs_row_red[i] = (int)ubase[2 * x]++;
            }
        }
    }
    moe_free(ubase);
    n->local_ret_rows = local_ret;
    return MOE_OK;
}

moe_status moe_a2a_node_plan(moe_a2a *a, int T, const int *tok_off, const int *dest, const float *weight,
                             const int *send_rows, moe_status local_status, int max_width)
{
    a2a_node *n = a->node;
    const int P = a->P, El = a->El, N = n->N;
    int *my = moe_calloc((size_t)N * N_COUNTS, sizeof(int));
    int *extra = moe_calloc((size_t)P * (A2A_X_EXTRA - A2A_X_NODE), sizeof(int));
    moe_status st = local_status;
    if (st == MOE_OK && (!my || !extra)) st = moe_errorf(MOE_ERR_NOMEM, "node exchange plan");
    if (st == MOE_OK && (!send_rows || max_width < 1)) st = moe_errorf(MOE_ERR_ARG, "node exchange plan: no counts");
    if (st == MOE_OK) st = plan_tokens_node(a, T, tok_off, dest, weight, send_rows);
    if (st == MOE_OK) st = plan_home(a, my);
    if (st == MOE_OK)
        for (int p = 0; p < P; p++) memcpy(extra + (size_t)p * N_COUNTS, my + (size_t)n->node_of[p] * N_COUNTS, sizeof(int) * N_COUNTS);
    /* The count exchange (agreement point) with every sender's counts for my node. */
    st = moe_a2a_set_counts_x(a, send_rows, extra, st, max_width);
    moe_free(extra);
    if (st) {
        moe_free(my);
        a->max_width = 0;
        return st;
    }
    const int X = El + A2A_X_EXTRA;
    for (int s = 0; s < P; s++)
        for (int k = 0; k < N_COUNTS; k++) n->xcnt[s * N_COUNTS + k] = a->xrecv[s * X + El + A2A_X_NODE + k];
    /* The node's ranks learn each other's counts and receive layouts. */
    const size_t RO = (size_t)El * P + 1, per = (size_t)N * N_COUNTS + RO;
    int *mine = moe_calloc(per, sizeof(int)), *all = moe_calloc(per * (size_t)n->nn, sizeof(int));
    if (!mine || !all) st = moe_errorf(MOE_ERR_NOMEM, "node exchange plan");
    if (st == MOE_OK) {
        memcpy(mine, my, sizeof(int) * (size_t)N * N_COUNTS);
        memcpy(mine + (size_t)N * N_COUNTS, a->recv_off, sizeof(int) * (RO - 1));
        mine[per - 1] = a->recv_total;
    }
    moe_free(my);
    st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, st, "ep", 0);
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, a->c, MOE_SCOPE_EP, "node exchange plan (MPI_Allgather over the node)",
                        MPI_Allgather(mine, (int)per, MPI_INT, all, (int)per, MPI_INT, n->comm));
    if (st == MOE_OK)
        for (int q = 0; q < n->nn; q++) {
            memcpy(cnt_of(n, q, 0), all + q * per, sizeof(int) * (size_t)N * N_COUNTS);
            memcpy(n->nrecv_off + q * RO, all + q * per + (size_t)N * N_COUNTS, sizeof(int) * RO);
        }
    moe_free(mine);
    moe_free(all);
    /* Segment sizes: the same numbers on every rank of the node. */
    int64_t dbase = 0, data = 0, sb = 0;
    for (int q = 0; st == MOE_OK && q < n->nn; q++) {
        const seg_need s = need_of(a, q);
        if (s.meta + s.in > dbase) dbase = s.meta + s.in;
        const int64_t dw = s.d_rows * max_width, rw = s.r_rows * (max_width + 1);
        if (dw > data) data = dw;
        if (rw > data) data = rw;
    }
    n->dbase = (size_t)dbase;
    /* my send buffer: the largest of the three messages sets */
    for (int pi = 0; st == MOE_OK && pi < n->n_partner; pi++) {
        const int x = n->partner[pi];
        int64_t d = 0, m = 0, r = 0;
        for (int q = 0; q < n->nn; q++) {
            d += cnt_of(n, q, x)[C_UNIQ];
            m += cnt_of(n, q, x)[C_META];
        }
        for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++) r += n->xcnt[n->nlist[i] * N_COUNTS + C_ASG];
        sb += d * max_width > m ? d * max_width : m;
        sb += r * (max_width + 1);
    }
    if (st == MOE_OK && (dbase + data > (int64_t)INT_MAX * 4 || sb > (int64_t)INT_MAX))
        st = moe_errorf(MOE_ERR_OVERFLOW, "node exchange: a segment of %lld words", (long long)(dbase + data));
    if (st == MOE_OK) st = reserve_sbuf(n, (size_t)sb);
    st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, st, "ep", 0);
    if (st == MOE_OK) st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, reserve_win(a, (size_t)(dbase + data)), "ep", 0);
    /* Publish my metadata; partners carry it across, one message per node pair. */
    if (st == MOE_OK) {
        memcpy(n->seg[n->li], n->meta, sizeof(uint32_t) * (size_t)n->moff[N]);
        st = node_barrier(a, "node exchange plan (metadata published)");
    }
    int k = 0;
    float *sp = n->sbuf;
    for (int pi = 0; st == MOE_OK && pi < n->n_partner; pi++) {
        const int x = n->partner[pi], peer = partner_on(n, x, n->mynode);
        int64_t d_row, r_row, in_word, words = 0;
        stage_bases(a, n->li, x, &d_row, &r_row, &in_word, 1);
        for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++) words += n->xcnt[n->nlist[i] * N_COUNTS + C_META];
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Irecv(n->seg[n->li] + in_word, (int)words, MPI_UINT32_T, peer, TAG_META, a->comm, &n->rq[k++]));
        /* my node's metadata for x, ranks ascending */
        int64_t len = 0;
        for (int q = 0; q < n->nn; q++) {
            int64_t off = 0;
            for (int y = 0; y < x; y++) off += cnt_of(n, q, y)[C_META];
            const int64_t mw = cnt_of(n, q, x)[C_META];
            memcpy((uint32_t *)sp + len, n->seg[q] + off, sizeof(uint32_t) * (size_t)mw);
            len += mw;
        }
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Isend(sp, (int)len, MPI_UINT32_T, peer, TAG_META, a->comm, &n->rq[k++]));
        sp += len;
    }
    if (k) {
        const moe_status w = wait_msgs(a, k, "node exchange plan (routing metadata across nodes)");
        if (st == MOE_OK) st = w;
    }
    st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, st, "ep", 0);
    if (st == MOE_OK) st = node_barrier(a, "node exchange plan (metadata received)");
    if (st == MOE_OK) st = moe_comm_agree_on(a->c, MOE_SCOPE_EP, a->comm, plan_indices(a), "ep", 0);
    if (st) a->max_width = 0;
    return st;
}

/* ---- the passes of a trip, over ranges of rows or tokens ---- */

typedef struct {
    const moe_a2a *a;
    float *dst;        /* my segment's rows; the receive layout; home */
    const float *src;  /* token rows; expert results */
    float *dweight;    /* scatter: dL/dg per assignment, or NULL */
    int w, rw;         /* row width; published row width (w + 1 with dL/dg) */
} node_pass;

/* Unique rows [u0, u1) into my segment. */
static void pass_publish_rows(const void *ctx, long u0, long u1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const size_t w = (size_t)p->w;
    for (long u = u0; u < u1; u++) memcpy(p->dst + (size_t)u * w, p->src + (size_t)n->uniq[u] * w, sizeof(float) * w);
}

/* Receive rows [r0, r1) from the staged segments. */
static void pass_fan_out(const void *ctx, long r0, long r1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const int w = p->w;
    for (long r = r0; r < r1; r++) {
        const float *src = (const float *)(n->seg[n->rb_seg[r]] + n->dbase) + (size_t)n->rb_row[r] * w;
        memcpy(p->dst + (size_t)r * w, src, sizeof(float) * (size_t)w);
    }
}

/* The backward's fan out: dL/dg against the forward's result row, then
 * g * dy over it (in place). */
static void pass_fan_out_scaled(const void *ctx, long r0, long r1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const int w = p->w;
    for (long r = r0; r < r1; r++) {
        const float *src = (const float *)(n->seg[n->rb_seg[r]] + n->dbase) + (size_t)n->rb_row[r] * w;
        float *dst = p->dst + (size_t)r * w;
        n->dg[r] = a2a_dot(src, dst, w);
        const float g = n->rb_w[r];
        for (int c = 0; c < w; c++) dst[c] = g * src[c];
    }
}

/* Result rows [r0, r1) into my segment (with their dL/dg). */
static void pass_publish_results(const void *ctx, long r0, long r1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const int w = p->w, rw = p->rw;
    for (long r = r0; r < r1; r++) {
        memcpy(p->dst + (size_t)r * rw, p->src + (size_t)r * w, sizeof(float) * (size_t)w);
        if (rw > w) p->dst[(size_t)r * rw + w] = n->dg[r];
    }
}

/* Tokens [t0, t1) at home: my node's rows and other nodes' units, in
 * combine order, from 0. */
static void pass_home_combine(const void *ctx, long t0, long t1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const int w = p->w, rw = p->rw;
    for (long t = t0; t < t1; t++) {
        float *yt = p->dst + (size_t)t * w;
        memset(yt, 0, sizeof(float) * (size_t)w);
        for (int i = n->tok_off[t]; i < n->tok_off[t + 1]; i++) {
            const float *src = (const float *)(n->seg[n->hs_seg[i]] + n->dbase) + (size_t)n->hs_row_red[i] * rw;
            if (n->hs_kind[i] == HS_LOCAL) a2a_axpy(yt, n->w[i], src, w);
            else if (n->hs_kind[i] == HS_UNIT)
                for (int c = 0; c < w; c++) yt[c] += src[c];
        }
    }
}

/* Assignments [i0, i1) at home: each record to its send-layout row. */
static void pass_home_scatter(const void *ctx, long i0, long i1)
{
    const node_pass *p = ctx;
    const a2a_node *n = p->a->node;
    const int w = p->w, rw = p->rw;
    for (long i = i0; i < i1; i++) {
        const float *src = (const float *)(n->seg[n->hs_seg[i]] + n->dbase) + (size_t)n->hs_row_rows[i] * rw;
        memcpy(p->dst + (size_t)n->hrow[i] * w, src, sizeof(float) * (size_t)w);
        if (p->dweight) p->dweight[i] = src[w];
    }
}

/* ---- the two halves of a trip ---- */

moe_status moe_a2a_node_dispatch(moe_a2a *a, float *recv, const float *tokens, int w, int scaled)
{
    a2a_node *n = a->node;
    const int N = n->N;
    moe_status st = node_barrier(a, "node exchange, dispatch (segments free)");
    /* My unique rows, node by node. */
    float *mine = (float *)(n->seg[n->li] + n->dbase);
    const long nu = n->uoff[N]; /* uoff[0] = 0 */
    if (st == MOE_OK)
        moe_a2a_par_for(pass_publish_rows, &(node_pass){a, mine, tokens, NULL, w, w}, nu, nu * w);
    if (st == MOE_OK) st = node_barrier(a, "node exchange, dispatch (rows published)");
    /* Partners: one message per node pair each way. */
    int k = 0;
    float *sp = n->sbuf;
    for (int pi = 0; st == MOE_OK && pi < n->n_partner; pi++) {
        const int x = n->partner[pi], peer = partner_on(n, x, n->mynode);
        int64_t d_row, r_row, in_word, rows = 0;
        stage_bases(a, n->li, x, &d_row, &r_row, &in_word, 1);
        for (int i = n->nfirst[x]; i < n->nfirst[x + 1]; i++) rows += n->xcnt[n->nlist[i] * N_COUNTS + C_UNIQ];
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Irecv(mine + d_row * w, (int)(rows * w), MPI_FLOAT, peer, TAG_ROWS, a->comm, &n->rq[k++]));
        int64_t len = 0;
        for (int q = 0; q < n->nn; q++) {
            int64_t off = 0;
            for (int y = 0; y < x; y++) off += cnt_of(n, q, y)[C_UNIQ];
            const int64_t nr = cnt_of(n, q, x)[C_UNIQ];
            memcpy(sp + len * w, (float *)(n->seg[q] + n->dbase) + off * w, sizeof(float) * (size_t)(nr * w));
            len += nr;
        }
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Isend(sp, (int)(len * w), MPI_FLOAT, peer, TAG_ROWS, a->comm, &n->rq[k++]));
        moe_a2a_count_sent(a, peer, len, w);
        sp += len * w;
    }
    if (k) {
        const moe_status ws = wait_msgs(a, k, "node exchange, dispatch (rows across nodes)");
        if (st == MOE_OK) st = ws;
    }
    if (st == MOE_OK) st = node_barrier(a, "node exchange, dispatch (rows staged)");
    if (st) return st;
    if (n->local_rows_other) a->traffic.sent += n->local_rows_other * w * (int64_t)sizeof(float);
    /* Fan out into the receive layout (backward: g * dy, and dL/dg against
     * the forward's result row, in place). */
    const long R = a->recv_total;
    moe_a2a_par_for(scaled ? pass_fan_out_scaled : pass_fan_out, &(node_pass){a, recv, NULL, NULL, w, w}, R, R * w);
    return MOE_OK;
}

moe_status moe_a2a_node_return(moe_a2a *a, float *home, const float *out, int w, int reduce, float *dweight)
{
    a2a_node *n = a->node;
    const int with_dg = dweight != NULL, rw = w + with_dg, R = a->recv_total;
    moe_status st = node_barrier(a, "node exchange, return (segments free)");
    float *mine = (float *)(n->seg[n->li] + n->dbase);
    if (st == MOE_OK)
        moe_a2a_par_for(pass_publish_results, &(node_pass){a, mine, out, NULL, w, rw}, R, (long)R * rw);
    if (st == MOE_OK) st = node_barrier(a, "node exchange, return (results published)");
    /* Partners: the units (or records) of node x's tokens, one message. */
    int k = 0;
    float *sp = n->sbuf;
    for (int pi = 0; st == MOE_OK && pi < n->n_partner; pi++) {
        const int x = n->partner[pi], peer = partner_on(n, x, n->mynode);
        int64_t d_row, r_row, in_word, rows = 0;
        stage_bases(a, n->li, x, &d_row, &r_row, &in_word, reduce);
        for (int q = 0; q < n->nn; q++) rows += cnt_of(n, q, x)[reduce ? C_UNITS : C_ASG];
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Irecv(mine + r_row * rw, (int)(rows * rw), MPI_FLOAT, peer, TAG_BACK, a->comm, &n->rq[k++]));
        int64_t len;
        if (reduce) {
            len = n->px_units[pi + 1] - n->px_units[pi];
            for (int u = n->px_units[pi]; u < n->px_units[pi + 1]; u++) {
                float *y = sp + (size_t)(u - n->px_units[pi]) * rw;
                memset(y, 0, sizeof(float) * (size_t)rw);
                for (int i = n->unit_off[u]; i < n->unit_off[u + 1]; i++)
                    a2a_axpy(y, n->it_w[i], (const float *)(n->seg[n->it_seg[i]] + n->dbase) + (size_t)n->it_row[i] * rw, w);
            }
        } else {
            len = n->px_items[pi + 1] - n->px_items[pi];
            for (int i = n->px_items[pi]; i < n->px_items[pi + 1]; i++)
                memcpy(sp + (size_t)(i - n->px_items[pi]) * rw,
                       (const float *)(n->seg[n->it_seg[i]] + n->dbase) + (size_t)n->it_row[i] * rw,
                       sizeof(float) * (size_t)rw);
        }
        n->rq_peer[k] = peer;
        MOE_MPI_KEEP(st, MPI_Isend(sp, (int)(len * rw), MPI_FLOAT, peer, TAG_BACK, a->comm, &n->rq[k++]));
        moe_a2a_count_sent(a, peer, len, rw);
        sp += len * rw;
    }
    if (k) {
        const moe_status ws = wait_msgs(a, k, "node exchange, return (results across nodes)");
        if (st == MOE_OK) st = ws;
    }
    if (st == MOE_OK) st = node_barrier(a, "node exchange, return (results staged)");
    if (st) return st;
    if (n->local_ret_rows) a->traffic.sent += n->local_ret_rows * rw * (int64_t)sizeof(float);
    /* The home: my own node's rows and other nodes' units, in combine order. */
    const node_pass hp = {a, home, NULL, dweight, w, rw};
    if (reduce) moe_a2a_par_for(pass_home_combine, &hp, n->T, (long)n->A * w);
    else moe_a2a_par_for(pass_home_scatter, &hp, n->A, (long)n->A * w);
    return MOE_OK;
}
