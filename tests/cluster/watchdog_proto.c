/* watchdog_proto: a prototype of the way a moerun rank must end a job when a
 * blocking exchange passes its deadline (the comm_timeout watchdog), for
 * Open MPI 4.1 launched by mpirun (docs/cluster.md, "Ending a job when a
 * node is lost").
 *
 *   watchdog_proto DEADLINE_S DIR MODE
 *
 * Every rank loops on a small MPI_Allreduce (the stand-in for a training
 * step). A watchdog thread checks the time since the last completed
 * collective; past DEADLINE_S it writes what it waited for to stderr AND to
 * DIR/watchdog-rank<R>.txt (a rank on a cut-off node has no working stderr:
 * its output travels to mpirun over the lost link), then ends the job:
 *   term   the recipe: SIGTERM to the local Open MPI daemon (orted: it kills
 *          its ranks and exits), or twice to mpirun when that is the parent
 *          (the first starts an orderly abort that waits for every daemon,
 *          the second makes mpirun exit), then _exit;
 *   abort  MPI_Abort(MPI_COMM_WORLD): the caller exits, but mpirun and the
 *          cut-off node's daemon wait for each other until TCP gives up.
 * DIR/started is written by rank 0 after the first collective.
 * MPI_THREAD_FUNNELED like moerun: the watchdog thread makes no MPI call in
 * term mode; in abort mode it calls MPI_Abort, which Open MPI allows from
 * any thread. */
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double deadline_s;
static const char *dir, *mode;
static int rank;
static char host[256];
static _Atomic long step;        /* collectives completed */
static _Atomic double last_done; /* time of the last completion */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The command name of process pid ("orted", "mpirun", ...) into out. */
static void comm_of(pid_t pid, char *out, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    FILE *f = fopen(path, "r");
    out[0] = '\0';
    if (f) {
        if (!fgets(out, (int)n, f)) out[0] = '\0';
        fclose(f);
    }
    out[strcspn(out, "\n")] = '\0';
}

static void report(const char *what)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/watchdog-rank%d.txt", dir, rank);
    FILE *f = fopen(path, "w");
    fprintf(stderr, "%s\n", what);
    if (f) {
        fprintf(f, "%s\n", what);
        fclose(f);
    }
}

static void *watchdog(void *arg)
{
    (void)arg;
    for (;;) {
        usleep(100000);
        const double waited = now() - last_done;
        if (waited < deadline_s) continue;
        char parent[64], msg[1024];
        const pid_t pp = getppid();
        comm_of(pp, parent, sizeof parent);
        snprintf(msg, sizeof msg,
                 "watchdog: rank %d on %s: allreduce of step %ld not done after %.1f s; ending the job (%s, parent %s)",
                 rank, host, (long)step + 1, waited, mode, parent);
        report(msg);
        if (!strcmp(mode, "abort")) MPI_Abort(MPI_COMM_WORLD, 3);
        /* mpirun answers SIGTERM by killing its local ranks: survive long
         * enough to send the second signal (SIGKILL still ends us). */
        signal(SIGTERM, SIG_IGN);
        if (!strcmp(parent, "orted")) {
            kill(pp, SIGTERM);
        } else if (!strcmp(parent, "mpirun") || !strcmp(parent, "orterun")) {
            kill(pp, SIGTERM);
            usleep(500000); /* two separate signals, not one merged pending one */
            kill(pp, SIGTERM);
        }
        _exit(3);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[3], "term") && strcmp(argv[3], "abort"))) {
        fprintf(stderr, "usage: watchdog_proto DEADLINE_S DIR term|abort\n");
        return 2;
    }
    deadline_s = atof(argv[1]);
    dir = argv[2];
    mode = argv[3];
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    gethostname(host, sizeof host - 1);
    last_done = now();
    pthread_t t;
    if (pthread_create(&t, NULL, watchdog, NULL)) MPI_Abort(MPI_COMM_WORLD, 2);
    for (;;) {
        double x = 1;
        MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        last_done = now();
        if (++step == 1 && rank == 0) {
            char path[4096];
            snprintf(path, sizeof path, "%s/started", dir);
            FILE *f = fopen(path, "w");
            if (f) fclose(f);
        }
        usleep(10000);
    }
}
