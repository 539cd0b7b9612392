/* Process setup, communicator construction (world / ep / replica groups,
 * docs/routing.md "Expert placement"; or one process without MPI) and the small collectives every module uses:
 * error agreement, consistency checks, reductions, broadcast, gather. */
#include "comm/comm_mpi.h"
#include "comm/comm_internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Largest element count per MPI call: counts are int. */
#define MOE_COMM_CHUNK ((size_t)1 << 30)

static int moe_comm_we_init;  /* MPI_Init_thread was called by moe_comm_init */
static int moe_comm_init_ran; /* moe_comm_init succeeded */

moe_status moe_comm_mpi_error(int rc, const char *call)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) len = 0;
    msg[len] = '\0';
    return moe_errorf(MOE_ERR_MPI, "%.*s failed: %s (code %d)", (int)strcspn(call, "("), call,
                      len ? msg : "unknown error", rc);
}

moe_status moe_comm_init(int *argc, char ***argv)
{
    int inited = 0, finalized = 0;
    MOE_MPI_TRY(MPI_Finalized(&finalized));
    if (finalized) return moe_errorf(MOE_ERR_MPI, "moe_comm_init: MPI was already finalized");
    MOE_MPI_TRY(MPI_Initialized(&inited));
    if (!inited) {
        int provided = 0;
        MOE_MPI_TRY(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
        moe_comm_we_init = 1;
    }
    /* Failures must come back as codes so that every rank can report them. */
    MOE_MPI_TRY(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    moe_comm_init_ran = 1;
    return MOE_OK;
}

int moe_comm_initialized(void)
{
    int inited = 0, finalized = 0;
    if (!moe_comm_init_ran || MPI_Initialized(&inited) != MPI_SUCCESS ||
        MPI_Finalized(&finalized) != MPI_SUCCESS)
        return 0;
    return inited && !finalized;
}

void moe_comm_finalize(void)
{
    /* MPI initialised by someone else (an embedding application) is theirs to end. */
    if (moe_comm_initialized() && moe_comm_we_init) {
        /* Finalize waits for every rank: a lost node must not hold it forever. */
        moe_wd_begin(NULL, -1, "MPI_Finalize", NULL);
        moe_wd_release_node();
        MPI_Finalize();
        moe_wd_end();
    }
    moe_comm_watchdog_stop();
    moe_comm_init_ran = 0;
}

static moe_status set_errors_return(MPI_Comm comm)
{
    MOE_MPI_TRY(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    return MOE_OK;
}

/* The root cause over comm into out = {priority, rank}: MAXLOC over a
 * priority, where an original error outranks a rank that only relays "error
 * on another rank" (so the message names the root cause), a higher status
 * a lower one; ties go to the lowest rank. Priority 0: nobody failed. */
static int cause_of(const moe_comm *c, int wscope, MPI_Comm comm, moe_status local, int rank, int out[2])
{
    int in[2] = {local == MOE_OK ? 0 : local == MOE_ERR_REMOTE ? 1 : 2 + (int)local, rank};
    moe_wd_begin(c, wscope, "error agreement (MPI_Allreduce)", NULL);
    const int rc = MPI_Allreduce(in, out, 1, MPI_2INT, MPI_MAXLOC, comm);
    moe_wd_end();
    return rc;
}

int moe_comm_cause_rank(moe_comm *c, moe_comm_scope s, moe_status local)
{
    MPI_Comm comm = moe_comm_mpi(c, s);
    if (comm == MPI_COMM_NULL) return local != MOE_OK ? 0 : -1;
    int rank = 0, out[2] = {0, 0};
    if (MPI_Comm_rank(comm, &rank) != MPI_SUCCESS || cause_of(c, (int)s, comm, local, rank, out) != MPI_SUCCESS)
        return -2;
    return out[0] == 0 ? -1 : out[1];
}

moe_status moe_comm_agree_on(const moe_comm *c, int wscope, MPI_Comm comm, moe_status local, const char *scope,
                             int detail)
{
    if (comm == MPI_COMM_NULL) return local;
    int rank = 0, size = 1;
    if (MPI_Comm_rank(comm, &rank) != MPI_SUCCESS || MPI_Comm_size(comm, &size) != MPI_SUCCESS)
        return local ? local : moe_errorf(MOE_ERR_MPI, "MPI_Comm_rank failed");
    int out[2] = {0, 0};
    int rc = cause_of(c, wscope, comm, local, rank, out);
    if (rc != MPI_SUCCESS) return local ? local : moe_comm_mpi_error(rc, "MPI_Allreduce");
    if (!detail) {
        if (local != MOE_OK) return local;
        if (out[0] == 0) return MOE_OK;
        moe_status worst = out[0] == 1 ? MOE_ERR_REMOTE : (moe_status)(out[0] - 2);
        return moe_errorf(MOE_ERR_REMOTE, "%s rank %d failed with '%s'", scope, out[1], moe_status_str(worst));
    }
    if (out[0] == 0) return MOE_OK;
    /* The root cause tells everyone its status and message, so that
     * whichever rank prints, it prints the cause. */
    const int root = out[1];
    struct {
        int32_t status;
        char detail[1000]; /* below the 1024 bytes of the detail buffer, leaving room for the rank */
    } msg;
    memset(&msg, 0, sizeof msg);
    if (rank == root) {
        msg.status = (int32_t)local;
        snprintf(msg.detail, sizeof msg.detail, "%s", moe_error_detail());
    }
    moe_wd_begin(c, wscope, "error agreement (the cause's message, MPI_Bcast)", NULL);
    rc = MPI_Bcast(&msg, (int)sizeof msg, MPI_BYTE, root, comm);
    moe_wd_end();
    if (rc != MPI_SUCCESS) return local ? local : moe_comm_mpi_error(rc, "MPI_Bcast");
    if (size > 1 && root != 0) return moe_errorf((moe_status)msg.status, "rank %d: %s", root, msg.detail);
    return moe_errorf((moe_status)msg.status, "%s", msg.detail);
}

/* Node index of every world rank: ranks that share memory
 * (MPI_COMM_TYPE_SHARED) form a node, numbered in the order of their first
 * world rank. MOE_NODE_RANKS=n (the same on every rank) cuts each node into
 * groups of n consecutive ranks, so that one machine can stand for several
 * nodes in tests and benchmarks of the node-aware exchange. Collective over
 * world. */
static moe_status find_nodes(moe_comm *c)
{
    MPI_Comm node = MPI_COMM_NULL;
    moe_status st = MOE_OK;
    MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "node discovery (MPI_Comm_split_type)",
                    MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node));
    int first = c->rank, nr = 0;
    if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_rank(node, &nr));
    const char *knob = getenv("MOE_NODE_RANKS");
    const long split = knob && *knob ? strtol(knob, NULL, 10) : 0;
    /* The first world rank of my node (or of my group of `split` within it). */
    int key[2] = {c->rank, split > 0 ? nr / (int)split : 0};
    if (st == MOE_OK) {
        MPI_Comm sub = MPI_COMM_NULL;
        MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "node discovery (MPI_Comm_split)",
                        MPI_Comm_split(node, key[1], key[0], &sub));
        if (st == MOE_OK)
            MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "node discovery (MPI_Allreduce)",
                            MPI_Allreduce(&c->rank, &first, 1, MPI_INT, MPI_MIN, sub));
        if (sub != MPI_COMM_NULL) MPI_Comm_free(&sub);
    }
    if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
    c->node_of = st == MOE_OK ? calloc((size_t)c->size, sizeof(int)) : NULL;
    st = moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world,
                           st ? st : c->node_of ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "node table"), "world", 0);
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "node discovery (MPI_Allgather)",
                        MPI_Allgather(&first, 1, MPI_INT, c->node_of, 1, MPI_INT, c->world));
    if (st != MOE_OK) return st;
    /* First world rank of a node -> dense index in order of appearance. */
    int n = 0;
    for (int w = 0; w < c->size; w++) {
        const int f = c->node_of[w];
        c->node_of[w] = f == w ? n++ : c->node_of[f];
    }
    c->n_nodes = n;
    return MOE_OK;
}

moe_status moe_comm_create(moe_comm **out, MPI_Comm parent, int ep_size)
{
    *out = NULL;
    int W = 0, rank = 0;
    MOE_MPI_TRY(MPI_Comm_size(parent, &W));
    MOE_MPI_TRY(MPI_Comm_rank(parent, &rank));
    /* Same inputs on every rank, so the same answer: no agreement needed. */
    if (ep_size == 0) ep_size = W;
    if (ep_size < 0 || W % ep_size != 0)
        return moe_errorf(MOE_ERR_ARG, "ep_size=%d must be positive and divide the world size %d",
                          ep_size, W);

    moe_comm *c = calloc(1, sizeof *c);
    moe_status st = moe_comm_agree_on(NULL, -1, parent, c ? MOE_OK : MOE_ERR_NOMEM, "moe_comm_create:", 0);
    if (st != MOE_OK) {
        free(c);
        return st == MOE_ERR_NOMEM ? moe_errorf(st, "moe_comm_create: no memory for the communicator") : st;
    }
    c->world = c->ep = c->replica = MPI_COMM_NULL;
    c->rank = rank;
    c->size = W;
    c->ep_size = ep_size;
    c->ep_rank = rank % ep_size;
    c->replica_idx = rank / ep_size;
    c->n_replicas = W / ep_size;

    MOE_MPI_KEEP_WD(st, NULL, -1, "communicator set-up (MPI_Comm_dup)", MPI_Comm_dup(parent, &c->world));
    if (st == MOE_OK) st = set_errors_return(c->world);
    /* ep group: P consecutive ranks; replica group: same ep rank. */
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "communicator set-up (MPI_Comm_split)",
                        MPI_Comm_split(c->world, c->replica_idx, rank, &c->ep));
    if (st == MOE_OK) st = set_errors_return(c->ep);
    if (st == MOE_OK)
        MOE_MPI_KEEP_WD(st, c, MOE_SCOPE_WORLD, "communicator set-up (MPI_Comm_split)",
                        MPI_Comm_split(c->world, c->ep_rank, rank, &c->replica));
    if (st == MOE_OK) st = set_errors_return(c->replica);
    if (st == MOE_OK) st = find_nodes(c);
    if (st != MOE_OK) {
        moe_comm_destroy(c);
        return st;
    }
    *out = c;
    return MOE_OK;
}

/* Immutable after initialisation, so one instance serves every caller. */
static moe_comm the_self = {.self = 1, .world = MPI_COMM_NULL, .ep = MPI_COMM_NULL, .replica = MPI_COMM_NULL,
                            .size = 1, .ep_size = 1, .n_replicas = 1, .n_nodes = 1};

moe_comm *moe_comm_self(void) { return &the_self; }

moe_status moe_comm_create_self(moe_comm **out)
{
    moe_comm *c = calloc(1, sizeof *c);
    *out = c;
    if (!c) return moe_errorf(MOE_ERR_NOMEM, "moe_comm_create_self: no memory for the communicator");
    c->self = 1;
    c->world = c->ep = c->replica = MPI_COMM_NULL;
    c->size = c->ep_size = c->n_replicas = c->n_nodes = 1;
    return MOE_OK;
}

moe_status moe_comm_create_world(moe_comm **out, int ep_size)
{
    return moe_comm_create(out, MPI_COMM_WORLD, ep_size);
}

void moe_comm_destroy(moe_comm *c)
{
    if (!c || c == &the_self) return;
    if (c->self) {
        free(c);
        return;
    }
    MPI_Comm *comms[3] = {&c->replica, &c->ep, &c->world};
    for (int i = 0; i < 3; i++)
        if (*comms[i] != MPI_COMM_NULL) MPI_Comm_free(comms[i]);
    free(c->node_of);
    free(c);
}

MPI_Comm moe_comm_mpi(const moe_comm *c, moe_comm_scope s)
{
    switch (s) {
    case MOE_SCOPE_WORLD: return c->world;
    case MOE_SCOPE_EP: return c->ep;
    case MOE_SCOPE_REPLICA: return c->replica;
    }
    return MPI_COMM_NULL;
}

int moe_comm_rank(const moe_comm *c) { return c->rank; }
int moe_comm_size(const moe_comm *c) { return c->size; }
int moe_comm_ep_rank(const moe_comm *c) { return c->ep_rank; }
int moe_comm_ep_size(const moe_comm *c) { return c->ep_size; }
int moe_comm_replica(const moe_comm *c) { return c->replica_idx; }
int moe_comm_n_replicas(const moe_comm *c) { return c->n_replicas; }
int moe_comm_n_nodes(const moe_comm *c) { return c->n_nodes; }
int moe_comm_node_of(const moe_comm *c, int world_rank)
{
    return c->node_of && world_rank >= 0 && world_rank < c->size ? c->node_of[world_rank] : 0;
}
int moe_comm_ep_world_rank(const moe_comm *c, int ep_rank) { return c->replica_idx * c->ep_size + ep_rank; }

void moe_comm_abort(moe_comm *c, int code)
{
    /* Before a moe_comm exists the only way out is the whole job. */
    if ((c && c->self) || !moe_comm_initialized()) return; /* no MPI job to end: the caller returns */
    MPI_Abort(c ? c->world : MPI_COMM_WORLD, code);
}

moe_status moe_comm_barrier(moe_comm *c)
{
    if (c->self) return MOE_OK;
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "barrier", MPI_Barrier(c->world));
    return MOE_OK;
}

moe_status moe_comm_agree(moe_comm *c, moe_status local)
{
    return moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world, local, "world", 0);
}

static const char *const scope_names[] = {"world", "ep", "replica"};

moe_status moe_comm_agree_scope(moe_comm *c, moe_comm_scope s, moe_status local)
{
    return moe_comm_agree_on(c, (int)s, moe_comm_mpi(c, s), local, scope_names[s], 0);
}

moe_status moe_comm_agree_detail(moe_comm *c, moe_comm_scope s, moe_status local)
{
    return moe_comm_agree_on(c, (int)s, moe_comm_mpi(c, s), local, scope_names[s], 1);
}

/* FNV-1a, 64 bit: enough to tell configurations apart. */
static uint64_t fnv1a(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

moe_status moe_comm_check_same(moe_comm *c, const char *what, const void *bytes, size_t n)
{
    /* Rank 0's (hash, length) against everybody's; then the first differing
     * rank, found by a MIN reduction, tells its own pair to all. */
    if (c->self) return MOE_OK;
    uint64_t mine[2] = {fnv1a(bytes, n), (uint64_t)n}, ref[2] = {mine[0], mine[1]};
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "consistency check (MPI_Bcast)", MPI_Bcast(ref, 2, MPI_UINT64_T, 0, c->world));
    int differs = ref[0] != mine[0] || ref[1] != mine[1];
    int cand = differs ? c->rank : c->size, first = c->size;
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "consistency check (MPI_Allreduce)",
                   MPI_Allreduce(&cand, &first, 1, MPI_INT, MPI_MIN, c->world));
    if (first == c->size) return MOE_OK;
    uint64_t theirs[2] = {mine[0], mine[1]};
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "consistency check (MPI_Bcast)",
                   MPI_Bcast(theirs, 2, MPI_UINT64_T, first, c->world));
    if (theirs[1] != ref[1])
        return moe_errorf(MOE_ERR_MISMATCH, "%s differs between ranks: rank %d has %llu bytes, rank 0 has %llu",
                          what, first, (unsigned long long)theirs[1], (unsigned long long)ref[1]);
    return moe_errorf(MOE_ERR_MISMATCH, "%s differs between ranks: rank %d's %llu bytes differ from rank 0's",
                      what, first, (unsigned long long)ref[1]);
}

/* In-place reduction of n elements of `type` (esize bytes) over a scope, in
 * chunks whose counts fit in int. */
static moe_status reduce(moe_comm *c, moe_comm_scope s, void *buf, size_t n, MPI_Datatype type,
                         size_t esize, MPI_Op op)
{
    if ((unsigned)s > MOE_SCOPE_REPLICA) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    if (c->self) return MOE_OK; /* the sum over one process */
    MPI_Comm comm = moe_comm_mpi(c, s);
    if (comm == MPI_COMM_NULL) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    for (char *p = buf; n > 0;) {
        size_t m = n < MOE_COMM_CHUNK ? n : MOE_COMM_CHUNK;
        MOE_MPI_TRY_WD(c, (int)s, "reduction (MPI_Allreduce)", MPI_Allreduce(MPI_IN_PLACE, p, (int)m, type, op, comm));
        p += m * esize;
        n -= m;
    }
    return MOE_OK;
}

moe_status moe_comm_allreduce_f32(moe_comm *c, moe_comm_scope s, float *buf, size_t n)
{
    return reduce(c, s, buf, n, MPI_FLOAT, sizeof *buf, MPI_SUM);
}

moe_status moe_comm_sum_same_f32(moe_comm *c, moe_comm_scope s, float *buf, size_t n)
{
    if ((unsigned)s > MOE_SCOPE_REPLICA) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    if (c->self) return MOE_OK;
    MPI_Comm comm = moe_comm_mpi(c, s);
    if (comm == MPI_COMM_NULL) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    int me = 0;
    MPI_Comm_rank(comm, &me);
    for (float *p = buf; n > 0;) {
        size_t m = n < MOE_COMM_CHUNK ? n : MOE_COMM_CHUNK;
        /* one sum, formed on the scope's rank 0, then copied to all: MPI
         * does not promise that an allreduce leaves the same bits everywhere */
        MOE_MPI_TRY_WD(c, (int)s, "reduction (MPI_Reduce)",
                       MPI_Reduce(me == 0 ? MPI_IN_PLACE : p, me == 0 ? p : NULL, (int)m, MPI_FLOAT, MPI_SUM, 0, comm));
        MOE_MPI_TRY_WD(c, (int)s, "broadcast (MPI_Bcast)", MPI_Bcast(p, (int)m, MPI_FLOAT, 0, comm));
        p += m;
        n -= m;
    }
    return MOE_OK;
}

moe_status moe_comm_allreduce_f64(moe_comm *c, moe_comm_scope s, double *buf, size_t n)
{
    return reduce(c, s, buf, n, MPI_DOUBLE, sizeof *buf, MPI_SUM);
}

moe_status moe_comm_allreduce_i64(moe_comm *c, moe_comm_scope s, int64_t *buf, size_t n)
{
    return reduce(c, s, buf, n, MPI_INT64_T, sizeof *buf, MPI_SUM);
}

moe_status moe_comm_allmax_f64(moe_comm *c, moe_comm_scope s, double *buf, size_t n)
{
    return reduce(c, s, buf, n, MPI_DOUBLE, sizeof *buf, MPI_MAX);
}

moe_status moe_comm_bcast(moe_comm *c, void *buf, size_t n, int root)
{
    if (root < 0 || root >= c->size)
        return moe_errorf(MOE_ERR_ARG, "bcast root %d outside [0, %d)", root, c->size);
    if (c->self) return MOE_OK;
    for (char *p = buf; n > 0;) {
        size_t m = n < MOE_COMM_CHUNK ? n : MOE_COMM_CHUNK;
        MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "broadcast (MPI_Bcast)", MPI_Bcast(p, (int)m, MPI_BYTE, root, c->world));
        p += m;
        n -= m;
    }
    return MOE_OK;
}

moe_status moe_comm_allgatherv(moe_comm *c, moe_comm_scope s, void *out, const void *in, const int64_t *bytes)
{
    if ((unsigned)s > MOE_SCOPE_REPLICA) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    if (c->self) {
        if (bytes[0] && in) memmove(out, in, (size_t)bytes[0]);
        return MOE_OK;
    }
    MPI_Comm comm = moe_comm_mpi(c, s);
    if (comm == MPI_COMM_NULL) return moe_errorf(MOE_ERR_ARG, "unknown communicator scope %d", (int)s);
    int n = 0, me = 0;
    MPI_Comm_size(comm, &n);
    MPI_Comm_rank(comm, &me);
    int stack_counts[16], stack_displs[16];
    int *counts = n <= 16 ? stack_counts : malloc(2 * (size_t)n * sizeof(int));
    if (!counts) return moe_errorf(MOE_ERR_NOMEM, "allgatherv: %d counts", n);
    int *displs = n <= 16 ? stack_displs : counts + n;
    /* bytes is the same everywhere, so every rank fails here alike */
    int64_t total = 0;
    for (int r = 0; r < n; r++) {
        counts[r] = (int)bytes[r];
        displs[r] = (int)total;
        total += bytes[r];
        if (bytes[r] < 0 || total > INT_MAX) {
            if (counts != stack_counts) free(counts);
            return moe_errorf(MOE_ERR_OVERFLOW, "allgatherv of %lld bytes exceeds INT_MAX", (long long)total);
        }
    }
    moe_status st = MOE_OK;
    MOE_MPI_KEEP_WD(st, c, (int)s, "gather (MPI_Allgatherv)",
                    MPI_Allgatherv(in ? in : MPI_IN_PLACE, counts[me], MPI_BYTE, out, counts, displs, MPI_BYTE,
                                   comm));
    if (counts != stack_counts) free(counts);
    return st;
}

moe_status moe_comm_allgather(moe_comm *c, void *out, const void *in, size_t n)
{
    /* n is the same on every rank, so every rank takes this branch alike. */
    if (n > INT_MAX) return moe_errorf(MOE_ERR_OVERFLOW, "allgather of %zu bytes per rank exceeds INT_MAX", n);
    if (c->self) {
        if (n) memmove(out, in, n);
        return MOE_OK;
    }
    MOE_MPI_TRY_WD(c, MOE_SCOPE_WORLD, "gather (MPI_Allgather)",
                   MPI_Allgather(in, (int)n, MPI_BYTE, out, (int)n, MPI_BYTE, c->world));
    return MOE_OK;
}
