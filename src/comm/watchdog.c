/* The comm_timeout watchdog (comm.h, "watchdog"): every blocking phase of
 * src/comm (collectives, exchange trips, window set-up, MPI_Finalize) and
 * the collective HDF5 phases src/ckpt and src/io declare with
 * moe_comm_phase_begin/_end get a deadline. One thread per process watches
 * it; when a phase has made no progress for comm_timeout seconds, the rank
 * says what it waited for and ends the job on every node.
 *
 * Fast path: a phase begin or end is a few relaxed atomic stores and one
 * release store of a sequence number; nothing reads a clock. The thread
 * samples the sequence number every tick and times a phase from the tick
 * it first saw it, so a deadline fires between comm_timeout and
 * comm_timeout + one tick after the phase began.
 *
 * Ending the job follows docs/cluster.md section 4 (measured on Open MPI
 * 4.1 with a node cut off): no MPI call (MPI_Abort would make mpirun and the
 * lost node's daemon wait for each other through TCP retransmission, about
 * 15 minutes); report on stderr AND in a file (a cut-off node's stderr never
 * reaches mpirun); signal the launcher daemon that is this process's parent
 * (orted/prted: SIGTERM, it kills the node's ranks and exits;
 * mpirun/mpiexec: SIGTERM every 0.5 s, the second making it exit;
 * slurmstepd: nothing, srun --kill-on-bad-exit ends the step), until it is
 * gone; then _exit. SIGTERM is ignored first so that this process lives to
 * send the second signal. The first rank of a node to fire reports (a flag in a node-shared
 * MPI window, set up while MPI still works) and, after signalling the
 * daemon, ends its node's other ranks with SIGKILL (their pids are in the
 * same window): a rank stalled in a SIGTERM handler, or on the mpirun
 * node, whose second SIGTERM makes mpirun exit at once, would otherwise
 * stay. A rank that fires after the reporter waits for the report, then
 * signals the daemon too (the reporter may be ended before it is done). */
#define _GNU_SOURCE
#include "comm/comm_internal.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { WD_DEPTH = 8, WD_TICK_MS = 200, WD_REPORT_WAIT_MS = 5000 };
enum { WD_LOCAL = -2 }; /* a phase scope: this process alone (file I/O) */

/* One declared phase; its fields are written by the main thread and read
 * by the watchdog thread, both through atomics. */
typedef struct {
    _Atomic(const char *) what;
    _Atomic(const moe_comm *) comm;
    atomic_int scope;                          /* moe_comm_scope, or -1: world without a communicator */
    _Atomic(const atomic_uchar *) pending;     /* (ep size) ep ranks still owed a message, or NULL */
} wd_phase;

/* What the ranks of a node share: who reports, and every rank's pid, so
 * that the reporter can end its node's ranks even when the launcher
 * daemon does not (one stalled in a SIGTERM handler, a parent mpirun told
 * to exit at once). */
typedef struct {
    int pid;
    long long start;               /* start time (/proc stat field 22): a reused pid is not ours */
    atomic_int waiting;            /* phases open in that rank (its own copy of depth) */
    int world_rank;
} wd_proc;
typedef struct {
    atomic_int flag;               /* 0 nobody fired, 1 reporting, 2 reported */
    int n;                         /* ranks on the node */
    wd_proc proc[];                /* (n) by node rank */
} wd_node;

static struct {
    atomic_int on;                 /* the thread runs */
    atomic_ullong seq;             /* bumped by every phase begin and end */
    atomic_int depth;              /* phases open (nested: an agreement inside a checkpoint write) */
    wd_phase stack[WD_DEPTH];
    atomic_llong step;             /* moe_comm_set_step; LLONG_MIN: none */
    atomic_llong timeout_ms;       /* 0: off */
    char dir[2][1024];             /* report directory, double-buffered */
    atomic_int dir_idx;
    int rank, size;                /* world */
    char (*hosts)[MOE_COMM_HOST_MAX]; /* (size) host of every world rank, or NULL */
    char host[MOE_COMM_HOST_MAX];
    pthread_t thread;
    MPI_Comm node;                 /* this node's ranks (shared memory) */
    MPI_Win win;
    wd_node *shared;               /* in win, owned by the node's first rank; NULL: none */
    int node_rank;                 /* in node */
} wd = {.step = LLONG_MIN, .node = MPI_COMM_NULL, .win = MPI_WIN_NULL};

static const char *const scope_label[] = {"world", "ep group", "replica group"};

void moe_comm_phase_begin(const moe_comm *c, moe_comm_scope s, const char *what)
{
    moe_wd_begin(c, c ? (int)s : WD_LOCAL, what, NULL); /* no communicator: local I/O */
}

void moe_comm_phase_end(void) { moe_wd_end(); }

void moe_wd_begin(const moe_comm *c, int scope, const char *what, const atomic_uchar *pending)
{
    if (!atomic_load_explicit(&wd.on, memory_order_relaxed)) return;
    const int d = atomic_load_explicit(&wd.depth, memory_order_relaxed);
    if (d < WD_DEPTH) {
        wd_phase *p = &wd.stack[d];
        atomic_store_explicit(&p->what, what, memory_order_relaxed);
        atomic_store_explicit(&p->comm, c, memory_order_relaxed);
        atomic_store_explicit(&p->scope, scope, memory_order_relaxed);
        atomic_store_explicit(&p->pending, pending, memory_order_relaxed);
    }
    atomic_store_explicit(&wd.depth, d + 1, memory_order_relaxed);
    wd_node *sh = wd.shared;
    if (sh) atomic_store_explicit(&sh->proc[wd.node_rank].waiting, d + 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&wd.seq, 1, memory_order_release);
}

void moe_wd_end(void)
{
    if (!atomic_load_explicit(&wd.on, memory_order_relaxed)) return;
    const int d = atomic_load_explicit(&wd.depth, memory_order_relaxed);
    atomic_store_explicit(&wd.depth, d > 0 ? d - 1 : 0, memory_order_relaxed);
    wd_node *sh = wd.shared;
    if (sh) atomic_store_explicit(&sh->proc[wd.node_rank].waiting, d > 0 ? d - 1 : 0, memory_order_relaxed);
    /* The end of an inner phase is progress: the outer one's clock restarts. */
    atomic_fetch_add_explicit(&wd.seq, 1, memory_order_release);
}

void moe_wd_progress(void)
{
    if (atomic_load_explicit(&wd.on, memory_order_relaxed)) atomic_fetch_add_explicit(&wd.seq, 1, memory_order_release);
}

int moe_wd_on(void)
{
    return atomic_load_explicit(&wd.on, memory_order_relaxed) &&
           atomic_load_explicit(&wd.timeout_ms, memory_order_relaxed) > 0;
}

void moe_comm_set_step(int64_t step) { atomic_store_explicit(&wd.step, (long long)step, memory_order_relaxed); }

void moe_comm_watchdog_set_timeout(double seconds)
{
    atomic_store_explicit(&wd.timeout_ms, seconds > 0 ? (long long)(seconds * 1e3 + 0.5) : 0, memory_order_relaxed);
}

double moe_comm_watchdog_timeout(void) { return atomic_load(&wd.timeout_ms) / 1e3; }

void moe_comm_watchdog_set_dir(const char *dir)
{
    const int next = !atomic_load(&wd.dir_idx);
    snprintf(wd.dir[next], sizeof wd.dir[next], "%s", dir ? dir : "");
    atomic_store(&wd.dir_idx, next);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) && errno == EINTR) {
    }
}

/* ---- the report ---- */

typedef struct {
    char *buf;
    size_t cap, n;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...)
{
    if (t->n + 1 >= t->cap) return;
    va_list ap;
    va_start(ap, fmt);
    const int k = vsnprintf(t->buf + t->n, t->cap - t->n, fmt, ap);
    va_end(ap);
    if (k > 0) t->n = t->n + (size_t)k < t->cap ? t->n + (size_t)k : t->cap - 1;
}

static const char *host_of(int w) { return wd.hosts && w >= 0 && w < wd.size ? wd.hosts[w] : "?"; }

/* "ranks 2-3 on n2, rank 5 on n3" for the world ranks with member[w] set,
 * grouped by host in rank order. */
static void put_peers(text *t, const unsigned char *member, int n)
{
    int first = 1;
    unsigned char *done = calloc((size_t)n, 1);
    for (int w = 0; w < n && done; w++) {
        if (!member[w] || done[w]) continue;
        const char *h = host_of(w);
        int cnt = 0;
        for (int v = w; v < n; v++) cnt += member[v] && !done[v] && !strcmp(host_of(v), h);
        put(t, "%s%s ", first ? "" : "; ", cnt == 1 ? "rank" : "ranks");
        first = 0;
        /* runs of consecutive ranks on this host */
        int sep = 0;
        for (int v = w; v < n; v++) {
            if (!member[v] || done[v] || strcmp(host_of(v), h)) continue;
            int e = v;
            while (e + 1 < n && member[e + 1] && !done[e + 1] && !strcmp(host_of(e + 1), h)) e++;
            put(t, sep ? ",%d" : "%d", v);
            if (e > v) put(t, "-%d", e);
            for (int u = v; u <= e; u++) done[u] = 1;
            sep = 1;
            v = e;
        }
        put(t, " on %s%s", h, wd.hosts && !strcmp(h, wd.host) ? " (this node)" : "");
    }
    free(done);
}

/* The world ranks a phase waits for: the ep ranks still owed a message
 * (exchange), else every other rank of its scope. */
static void phase_members(unsigned char *member, const moe_comm *c, int scope, const atomic_uchar *pending)
{
    memset(member, 0, (size_t)wd.size);
    if (!c || c->self) {
        for (int w = 0; w < wd.size; w++) member[w] = w != wd.rank;
        return;
    }
    for (int w = 0; w < c->size && w < wd.size; w++) {
        const int in = scope == MOE_SCOPE_EP ? w / c->ep_size == c->replica_idx
                     : scope == MOE_SCOPE_REPLICA ? w % c->ep_size == c->ep_rank : 1;
        int owed = 1;
        if (pending && scope == MOE_SCOPE_EP && in)
            owed = atomic_load_explicit(&pending[w % c->ep_size], memory_order_relaxed) != 0;
        member[w] = in && owed && w != c->rank;
    }
}

/* For a collective: the ranks of this node that are blocked in a phase
 * too cannot be what it waits for, so they leave the suspects (unless
 * nobody would be left). Returns how many were taken out. */
static int drop_waiting_neighbours(unsigned char *member)
{
    const wd_node *sh = wd.shared;
    if (!sh) return 0;
    int left = 0, out = 0;
    for (int w = 0; w < wd.size; w++) left += member[w];
    for (int i = 0; i < sh->n; i++) {
        const int w = sh->proc[i].world_rank;
        if (w >= 0 && w < wd.size && member[w] && atomic_load(&sh->proc[i].waiting) > 0) out++;
    }
    if (out == 0 || out == left) return 0;
    for (int i = 0; i < sh->n; i++) {
        const int w = sh->proc[i].world_rank;
        if (w >= 0 && w < wd.size && atomic_load(&sh->proc[i].waiting) > 0) member[w] = 0;
    }
    return out;
}

/* The command name of process pid ("orted", "mpirun", ...). */
static void comm_of(pid_t pid, char *out, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(out, (int)n, f)) out[0] = '\0';
        fclose(f);
    }
    out[strcspn(out, "\n")] = '\0';
}

typedef enum { LAUNCHER_NONE, LAUNCHER_DAEMON, LAUNCHER_MPIRUN } launcher;

/* What the parent process is (its command name into name). */
static launcher launcher_of(pid_t pp, char *name, size_t n)
{
    comm_of(pp, name, n);
    if (!strcmp(name, "orted") || !strcmp(name, "prted")) return LAUNCHER_DAEMON;
    if (!strcmp(name, "mpirun") || !strcmp(name, "mpiexec") || !strcmp(name, "orterun") || !strcmp(name, "prterun"))
        return LAUNCHER_MPIRUN;
    return LAUNCHER_NONE; /* slurmstepd (srun --kill-on-bad-exit), or no launcher */
}

static void compose(text *t, const wd_phase *p, double waited)
{
    const char *what = atomic_load_explicit(&p->what, memory_order_relaxed);
    const moe_comm *c = atomic_load_explicit(&p->comm, memory_order_relaxed);
    const int scope = atomic_load_explicit(&p->scope, memory_order_relaxed);
    const atomic_uchar *pending = atomic_load_explicit(&p->pending, memory_order_relaxed);
    const long long step = atomic_load_explicit(&wd.step, memory_order_relaxed);
    put(t, "moe[rank %d on %s]: watchdog: %s", wd.rank, wd.host, what ? what : "a blocking phase");
    if (scope >= 0 && scope <= MOE_SCOPE_REPLICA) put(t, " over the %s", scope_label[scope]);
    if (step != LLONG_MIN) put(t, " at step %lld", step);
    put(t, " has made no progress for %.0f s (comm_timeout %.0f s); ", waited,
        atomic_load(&wd.timeout_ms) / 1e3);
    unsigned char *member = scope == WD_LOCAL ? NULL : calloc((size_t)wd.size, 1);
    if (scope == WD_LOCAL) put(t, "this rank waits for its file system, not for another rank");
    if (member) {
        phase_members(member, c, scope, pending);
        const int waiting_here = pending ? 0 : drop_waiting_neighbours(member);
        int any = 0;
        for (int w = 0; w < wd.size; w++) any |= member[w];
        if (!any) {
            put(t, "no peer is missing (a local stall?)");
        } else {
            put(t, pending ? "no data yet from " : "waiting for one of ");
            put_peers(t, member, wd.size);
            if (waiting_here) put(t, " (the other ranks of this node wait too)");
        }
        free(member);
    }
    char parent[64];
    const pid_t pp = getppid();
    const launcher l = launcher_of(pp, parent, sizeof parent);
    put(t, ". Ending the job on every node: %s%s (pid %d), exit status %d.",
        l == LAUNCHER_DAEMON ? "SIGTERM to the launcher daemon " : l == LAUNCHER_MPIRUN ? "SIGTERM to " : "no signal to parent ",
        parent, (int)pp, MOE_COMM_WATCHDOG_EXIT);
}

static void write_report(const char *msg)
{
    /* One write: several nodes' reports may share a terminal or log. */
    char line[4200];
    int n = snprintf(line, sizeof line, "%s\n", msg);
    if (n > 0 && write(STDERR_FILENO, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1)) < 0) {
    }
    const char *dir = wd.dir[atomic_load(&wd.dir_idx)];
    char path[1200];
    snprintf(path, sizeof path, "%s%swatchdog-%s.txt", dir, *dir ? "/" : "", wd.host);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%s\n", msg);
        fflush(f);
        fsync(fileno(f));
        fclose(f);
    }
}

/* Start time of process pid in clock ticks since boot, -1 if it is gone. */
static long long start_time(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* Fields after the command name (which may hold spaces): state is 3rd, starttime 22nd. */
    const char *p = strrchr(buf, ')');
    long long v = -1;
    for (int field = 2; p && *p; p++)
        if (*p == ' ' && ++field == 22) {
            v = strtoll(p + 1, NULL, 10);
            break;
        }
    return v;
}

/* docs/cluster.md section 4: signal the launcher daemon; the reporter then
 * ends whatever is left of its node's ranks (after the daemon's signals:
 * a daemon that sees a rank die starts killing the others, this one
 * included, and the second signal to mpirun must still go out). */
static void end_job(int reporter)
{
    char parent[64];
    const pid_t pp = getppid();
    const launcher l = launcher_of(pp, parent, sizeof parent);
    /* Until the daemon is gone (this process is re-parented), at most 10 s:
     * mpirun exits on a SIGTERM that comes within 5 s of the one before
     * (the first starts an orderly abort that waits for every daemon), and
     * a signal merged with a pending one, or a sender killed between the
     * two, must not leave it running. */
    for (int ms = 0; l != LAUNCHER_NONE && getppid() == pp && ms < 10000; ms += 500) {
        kill(pp, SIGTERM);
        sleep_ms(500);
    }
    if (reporter && wd.shared)
        for (int i = 0; i < wd.shared->n; i++) {
            const wd_proc *q = &wd.shared->proc[i];
            if (i != wd.node_rank && q->pid > 0 && start_time(q->pid) == q->start) kill((pid_t)q->pid, SIGKILL);
        }
    _exit(MOE_COMM_WATCHDOG_EXIT);
}

static void fire(const wd_phase *p, double waited)
{
    signal(SIGTERM, SIG_IGN); /* our daemon may be told to end us before we signal it */
    wd_node *sh = wd.shared;
    int expect = 0;
    const int reporter = !sh || atomic_compare_exchange_strong(&sh->flag, &expect, 1);
    if (reporter) {
        char buf[4096];
        text t = {buf, sizeof buf, 0};
        buf[0] = '\0';
        compose(&t, p, waited);
        write_report(buf);
        if (sh) atomic_store(&sh->flag, 2);
    } else {
        /* Let the node's reporter finish its report before anyone signals
         * the daemon (which may end the reporter); then signal it too, in
         * case the reporter dies before it is done. */
        for (int ms = 0; ms < WD_REPORT_WAIT_MS && atomic_load(&sh->flag) != 2; ms += 50) sleep_ms(50);
    }
    end_job(reporter);
}

static void *watch(void *arg)
{
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the main thread's */
    unsigned long long seen = atomic_load(&wd.seq);
    double since = now_s();
    while (atomic_load(&wd.on)) {
        sleep_ms(WD_TICK_MS);
        const unsigned long long s = atomic_load_explicit(&wd.seq, memory_order_acquire);
        const double t = now_s();
        if (s != seen) {
            seen = s;
            since = t;
            continue;
        }
        const long long to = atomic_load(&wd.timeout_ms);
        const int d = atomic_load_explicit(&wd.depth, memory_order_relaxed);
        if (d <= 0 || to <= 0 || (t - since) * 1e3 < (double)to) continue;
        wd_phase p;
        const wd_phase *top = &wd.stack[d <= WD_DEPTH ? d - 1 : WD_DEPTH - 1];
        atomic_init(&p.what, atomic_load(&top->what));
        atomic_init(&p.comm, atomic_load(&top->comm));
        atomic_init(&p.scope, atomic_load(&top->scope));
        atomic_init(&p.pending, atomic_load(&top->pending));
        /* Still the same phase (no begin or end since the tick above)? */
        if (atomic_load_explicit(&wd.seq, memory_order_acquire) != seen) continue;
        fire(&p, t - since);
    }
    return NULL;
}

moe_status moe_comm_watchdog_start(moe_comm *c, double timeout_s, const char (*hosts)[MOE_COMM_HOST_MAX])
{
    if (atomic_load(&wd.on)) {
        moe_comm_watchdog_set_timeout(timeout_s);
        return MOE_OK;
    }
    moe_comm_watchdog_set_timeout(timeout_s);
    wd.rank = moe_comm_rank(c);
    wd.size = moe_comm_size(c);
    if (gethostname(wd.host, sizeof wd.host - 1)) snprintf(wd.host, sizeof wd.host, "?");
    moe_status st = MOE_OK;
    free(wd.hosts);
    wd.hosts = NULL;
    if (hosts) {
        wd.hosts = calloc((size_t)wd.size, sizeof *wd.hosts);
        if (!wd.hosts) st = moe_errorf(MOE_ERR_NOMEM, "watchdog host table");
        else
            for (int w = 0; w < wd.size; w++) snprintf(wd.hosts[w], sizeof wd.hosts[w], "%s", hosts[w]);
        if (wd.hosts) snprintf(wd.host, sizeof wd.host, "%s", wd.hosts[wd.rank]);
    }
    /* The node's shared record (wd_node) in a window of the node's ranks. */
    if (!c->self) {
        st = moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world, st, "world", 0);
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank,
                                                               MPI_INFO_NULL, &wd.node));
        int nr = 0, nn = 1;
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_rank(wd.node, &nr));
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Comm_size(wd.node, &nn));
        void *base = NULL;
        const MPI_Aint bytes = (MPI_Aint)(sizeof(wd_node) + (size_t)nn * sizeof(wd_proc));
        if (st == MOE_OK)
            MOE_MPI_KEEP(st, MPI_Win_allocate_shared(nr == 0 ? bytes : 0, 1, MPI_INFO_NULL, wd.node, &base, &wd.win));
        MPI_Aint size = 0;
        int unit = 0;
        wd_node *sh = NULL;
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Win_shared_query(wd.win, 0, &size, &unit, &sh));
        if (st == MOE_OK && nr == 0) {
            atomic_init(&sh->flag, 0);
            sh->n = nn;
        }
        if (st == MOE_OK) {
            sh->proc[nr].pid = (int)getpid();
            sh->proc[nr].start = start_time((int)getpid());
            sh->proc[nr].world_rank = c->rank;
            atomic_init(&sh->proc[nr].waiting, 0);
        }
        if (st == MOE_OK) MOE_MPI_KEEP(st, MPI_Barrier(wd.node));
        if (st == MOE_OK) {
            wd.shared = sh;
            wd.node_rank = nr;
        }
        st = moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world, st, "world", 0);
    }
    if (st == MOE_OK) {
        atomic_store(&wd.on, 1);
        if (pthread_create(&wd.thread, NULL, watch, NULL)) {
            atomic_store(&wd.on, 0);
            st = moe_errorf(MOE_ERR_NOMEM, "cannot start the watchdog thread");
        }
        if (!c->self) st = moe_comm_agree_on(c, MOE_SCOPE_WORLD, c->world, st, "world", 0);
    }
    if (st != MOE_OK) moe_comm_watchdog_stop();
    return st;
}

int moe_comm_watchdog_running(void) { return atomic_load(&wd.on); }

void moe_wd_release_node(void)
{
    wd.shared = NULL; /* a rank that fires from now on reports for itself */
    int fin = 1;
    MPI_Finalized(&fin);
    if (!fin) {
        if (wd.win != MPI_WIN_NULL) MPI_Win_free(&wd.win);
        if (wd.node != MPI_COMM_NULL) MPI_Comm_free(&wd.node);
    }
    wd.win = MPI_WIN_NULL;
    wd.node = MPI_COMM_NULL;
}

void moe_comm_watchdog_stop(void)
{
    if (atomic_exchange(&wd.on, 0)) pthread_join(wd.thread, NULL);
    moe_wd_release_node();
    atomic_store(&wd.depth, 0);
    free(wd.hosts);
    wd.hosts = NULL;
}
