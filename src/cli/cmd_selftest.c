/* moe selftest blas: which OpenBLAS kernel set should this machine use?
 *
 * OpenBLAS picks its kernels (OPENBLAS_CORETYPE, else its CPU detection)
 * when the library loads, and some builds misdetect newer CPUs or compute
 * wrong results on them; so the choice rests on evidence. For each kernel
 * set the CPU's flags allow, this command re-runs itself as a child process
 * with OPENBLAS_CORETYPE set (`moe selftest blas --one SET`), which checks
 * that OpenBLAS really loaded that set, holds sgemm/sgemv to a float64
 * reference (core/blas_check.h) and times sgemm at moerun's shapes on 1 and
 * on all cores; the parent prints the table and the fastest correct set.
 * Timing rounds alternate the candidates so that a noisy neighbour hits them
 * alike. --pick answers from a per-machine cache (the launch scripts use it
 * to set OPENBLAS_CORETYPE when it is unset). */
#define _GNU_SOURCE /* dladdr, sched_getaffinity */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/blas_check.h"
#include "core/cpu.h"
#include "core/gemm.h"

enum { MAX_CAND = 12, MAX_ROUNDS = 9, MAX_ROWS = 64 };
static const char RESULT_TAG[] = "MOE_BLAS_RESULT ";
/* Bump when the check or the timed shapes change: cached picks are redone. */
static const char SELFTEST_FORMAT[] = "blas-selftest-2";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe selftest blas [options]\n"
            "\n"
            "Checks OpenBLAS's sgemm and sgemv against a float64 reference under a rounding-error\n"
            "bound and times sgemm at moerun's shapes, for every kernel set (OPENBLAS_CORETYPE)\n"
            "this CPU supports, each in a child process; prints the table and the fastest\n"
            "correct set. Exit status 0 when some set is correct, 1 when none is.\n"
            "\n"
            "  --json              one JSON object on stdout instead of the table\n"
            "  --quick             fewer check cases, shorter timing (a smoke test)\n"
            "  --candidates A,B    kernel sets to try (default: from /proc/cpuinfo flags)\n"
            "  --rounds N          timing rounds, candidates alternating; a rate is the best round\n"
            "                      (default 3, --quick 1)\n"
            "  --timeout S         seconds a child may take before it counts as hung (default 600)\n"
            "  --pick              print only the kernel set to use: OPENBLAS_CORETYPE when it is set\n"
            "                      (an explicit setting wins), else the fastest correct set from the\n"
            "                      per-machine cache ($XDG_CACHE_HOME or ~/.cache, moerun/blas-<key>.json),\n"
            "                      running the selftest (table on stderr) when there is no entry;\n"
            "                      one line on stderr says which and why\n"
            "  --refresh           with --pick: ignore the cached entry\n"
            "  --one SET           (internal) check and time SET in this process (run it with\n"
            "                      OPENBLAS_CORETYPE=SET; 'auto': whatever OpenBLAS loaded) and print\n"
            "                      one MOE_BLAS_RESULT line; --no-check, --no-time skip either part\n");
}

typedef struct {
    int json, quick, rounds, pick, refresh;
    double timeout;
    const char *one;
    char candidates[256];
} opts;

/* ---- the machine ---- */

/* The file the loaded OpenBLAS came from (realpath), or "" if unknown. */
static void blas_library(char *buf, size_t n)
{
    Dl_info info;
    buf[0] = '\0';
    if (dladdr((void *)cblas_sgemm, &info) && info.dli_fname) {
        char *r = realpath(info.dli_fname, NULL);
        snprintf(buf, n, "%s", r ? r : info.dli_fname);
        free(r);
    }
}

/* openblas_get_config() without the name of the kernel set this process
 * loaded ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY MAX_THREADS=64"):
 * the library's build, whatever OPENBLAS_CORETYPE the caller has. */
static void blas_build(char *buf, size_t n)
{
    const char *cfg = openblas_get_config(), *core = openblas_get_corename();
    const size_t k = core ? strlen(core) : 0;
    size_t o = 0;
    buf[0] = '\0';
    for (const char *p = cfg; *p && o + 1 < n;) {
        const size_t w = strcspn(p, " ");
        if (!(k && w == k && !strncasecmp(p, core, k)) && w)
            o += (size_t)snprintf(buf + o, n - o, "%s%.*s", o ? " " : "", (int)w, p);
        p += w + (p[w] == ' ');
    }
}

/* ---- one candidate, in this process (--one) ---- */

/* A kernel that is wrong past some size, as a faulty kernel set would be
 * (MOE_FAULT=blas_wrong:<SET>): tests use it to show a wrong set is refused. */
static void sgemm_faulty(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                         int ldb, float beta, float *C, int ldc)
{
    moe_blas_sgemm_openblas(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (K >= 32 && M > 0 && N > 0) C[0] += 1e-3f * (fabsf(C[0]) + 1.0f);
}

static int fault(const char *what, const char *set)
{
    char site[96];
    snprintf(site, sizeof site, "blas_%s:%s", what, set);
    return moe_fault(site, 0);
}

static int run_one(const opts *o, int check, int timed)
{
    moe_cpu cpu;
    moe_cpu_read(&cpu);
    moe_cpu_free(&cpu);
    const char *want = o->one, *got = openblas_get_corename();
    const int available = !strcmp(want, "auto") || !strcasecmp(want, got ? got : "");
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "requested", want);
    cJSON_AddStringToObject(j, "corename", got ? got : "");
    cJSON_AddStringToObject(j, "config", openblas_get_config());
    cJSON_AddBoolToObject(j, "available", available);
    moe_status st = MOE_OK;
    if (available && fault("crash", want)) raise(SIGILL); /* as a kernel with instructions the CPU lacks */
    if (available && fault("hang", want))
        for (;;) pause();
    moe_blas_sgemm_fn gemm = available && fault("wrong", want) ? sgemm_faulty : moe_blas_sgemm_openblas;
    if (available && check) {
        moe_blas_check_result r;
        memset(&r, 0, sizeof r);
        moe_blas_check_opts co = {.n_threads = 1, .threads = {1}, .quick = o->quick, .seed = 1};
        if (cpu.cpus > 1) co.threads[co.n_threads++] = cpu.cpus;
        st = moe_blas_check(&r, gemm, moe_blas_sgemv_openblas, &co);
        cJSON *c = cJSON_AddObjectToObject(j, "check");
        cJSON_AddNumberToObject(c, "cases", r.cases);
        cJSON_AddNumberToObject(c, "failures", r.failures);
        if (isfinite(r.worst_ratio)) cJSON_AddNumberToObject(c, "worst_ratio", r.worst_ratio);
        else cJSON_AddStringToObject(c, "worst_ratio", "inf"); /* JSON has no infinity */
        cJSON_AddStringToObject(c, "worst_case", r.worst_case);
        cJSON_AddStringToObject(c, "first_failure", r.first_failure);
    }
    if (available && timed && !st) {
        int n;
        const moe_blas_shape *s = moe_blas_shapes(&n);
        cJSON *t = cJSON_AddArrayToObject(j, "times");
        for (int i = 0; i < n && !st; i++) {
            if (o->quick && !s[i].quick) continue;
            for (int all = 0; all < 2 && !st; all++) {
                if (all && (!s[i].threads_all || cpu.cpus < 2)) continue;
                const int threads = all ? cpu.cpus : 1;
                double g;
                /* at every core, as moerun threads its GEMMs: split over its
                 * own threads, one single-threaded sgemm per block (moe_gemm) */
                moe_blas_sgemm_fn timed = all && gemm == moe_blas_sgemm_openblas ? moe_gemm : gemm;
                st = moe_blas_time_shape(&g, &s[i], timed, threads, o->quick ? 0.002 : 0.02, o->quick ? 1 : 3);
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "shape", s[i].name);
                cJSON_AddNumberToObject(e, "threads", threads);
                cJSON_AddNumberToObject(e, "gflops", g);
                cJSON_AddItemToArray(t, e);
            }
        }
    }
    if (st) cJSON_AddStringToObject(j, "error", moe_error_detail());
    char *s = cJSON_PrintUnformatted(j);
    printf("%s%s\n", RESULT_TAG, s);
    fflush(stdout);
    free(s);
    cJSON_Delete(j);
    return st ? 1 : 0;
}

/* ---- the parent: children, table, choice ---- */

typedef enum { C_PENDING, C_OK, C_WRONG, C_UNAVAILABLE, C_CRASHED, C_HUNG, C_FAILED } cand_status;
static const char *const STATUS_NAME[] = {"pending", "correct", "WRONG", "unavailable", "crashed", "hung", "failed"};

typedef struct {
    char name[32];
    cand_status status;
    char corename[32];
    char why[320];  /* the first failure, the signal, the error */
    int cases, failures;
    double worst_ratio;
    char worst_case[160];
    double gflops[MAX_ROWS][MAX_ROUNDS]; /* per timed row and round */
    int n_rounds;
    double geomean;
} candidate;

typedef struct {
    char shape[48];
    int threads;
} row;

/* Runs `moe selftest blas --one SET ...` with OPENBLAS_CORETYPE=SET (unset
 * for "auto") and returns its result object (NULL on failure, with *status
 * and why set). */
static cJSON *run_child(const char *set, int check, int timed, const opts *o, int cpus, cand_status *status,
                        char *why, size_t why_n)
{
    int fd[2];
    if (pipe(fd)) {
        *status = C_FAILED;
        snprintf(why, why_n, "pipe: %s", strerror(errno));
        return NULL;
    }
    fflush(stdout);
    fflush(stderr);
    const pid_t pid = fork();
    if (pid < 0) {
        *status = C_FAILED;
        snprintf(why, why_n, "fork: %s", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        return NULL;
    }
    if (pid == 0) {
        dup2(fd[1], STDOUT_FILENO);
        close(fd[0]);
        close(fd[1]);
        if (!strcmp(set, "auto")) unsetenv("OPENBLAS_CORETYPE");
        else setenv("OPENBLAS_CORETYPE", set, 1);
        char threads[16];
        snprintf(threads, sizeof threads, "%d", cpus); /* the pool must hold every core */
        setenv("OPENBLAS_NUM_THREADS", threads, 1);
        char *args[10];
        int a = 0;
        args[a++] = "moe";
        args[a++] = "selftest";
        args[a++] = "blas";
        args[a++] = "--one";
        args[a++] = (char *)set;
        if (o->quick) args[a++] = "--quick";
        if (!check) args[a++] = "--no-check";
        if (!timed) args[a++] = "--no-time";
        args[a] = NULL;
        execv("/proc/self/exe", args);
        fprintf(stderr, "moe selftest blas: cannot re-run /proc/self/exe: %s\n", strerror(errno));
        _exit(127); /* a forked child that failed to exec leaves at once */
    }
    close(fd[1]);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    const double deadline = moe_now() + o->timeout;
    int hung = 0;
    while (buf) {
        const double left = deadline - moe_now();
        if (left <= 0) {
            hung = 1;
            break;
        }
        struct pollfd p = {.fd = fd[0], .events = POLLIN};
        const int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) continue;
        if (len + 4096 > cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) break;
            buf = nb;
        }
        const ssize_t got = read(fd[0], buf + len, cap - len - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        len += (size_t)got;
    }
    close(fd[0]);
    /* End of output is not the end of the child (it may hang on its way
     * out): wait for it until the same deadline, then kill it. */
    int ws = 0;
    while (!hung) {
        const pid_t w = waitpid(pid, &ws, WNOHANG);
        if (w == pid || (w < 0 && errno != EINTR)) break;
        if (moe_now() > deadline) hung = 1;
        else usleep(10000);
    }
    if (hung) {
        kill(pid, SIGKILL);
        while (waitpid(pid, &ws, 0) < 0 && errno == EINTR) {}
    }
    cJSON *res = NULL;
    if (buf) {
        buf[len] = '\0';
        const char *tag = strstr(buf, RESULT_TAG);
        if (tag) res = cJSON_Parse(tag + strlen(RESULT_TAG));
    }
    free(buf);
    if (hung) {
        *status = C_HUNG;
        snprintf(why, why_n, "no answer within %.0f s (killed)", o->timeout);
    } else if (WIFSIGNALED(ws)) {
        *status = C_CRASHED;
        snprintf(why, why_n, "killed by signal %d (%s)", WTERMSIG(ws), strsignal(WTERMSIG(ws)));
    } else if (!res || (WIFEXITED(ws) && WEXITSTATUS(ws) != 0)) {
        const cJSON *e = res ? cJSON_GetObjectItem(res, "error") : NULL;
        *status = C_FAILED;
        snprintf(why, why_n, "exit status %d%s%s", WIFEXITED(ws) ? WEXITSTATUS(ws) : -1,
                 cJSON_IsString(e) ? ": " : (res ? "" : ", no result line"), cJSON_IsString(e) ? e->valuestring : "");
    } else {
        return res;
    }
    cJSON_Delete(res);
    return NULL;
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

static const char *str(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* Takes a child's answer into c: its status, check figures and the rates of
 * this round, adding timed rows (shape, threads) as they first appear. */
static void absorb(candidate *c, const cJSON *res, row *rows, int *n_rows, int round)
{
    snprintf(c->corename, sizeof c->corename, "%s", str(res, "corename"));
    if (!cJSON_IsTrue(cJSON_GetObjectItem(res, "available"))) {
        c->status = C_UNAVAILABLE;
        snprintf(c->why, sizeof c->why, "OpenBLAS loaded %s instead", str(res, "corename"));
        return;
    }
    const cJSON *chk = cJSON_GetObjectItem(res, "check");
    if (chk) {
        c->cases = (int)num(chk, "cases");
        c->failures = (int)num(chk, "failures");
        c->worst_ratio = num(chk, "worst_ratio");
        if (isnan(c->worst_ratio)) c->worst_ratio = INFINITY; /* "inf" */
        snprintf(c->worst_case, sizeof c->worst_case, "%s", str(chk, "worst_case"));
        if (c->failures > 0) {
            c->status = C_WRONG;
            snprintf(c->why, sizeof c->why, "%d of %d calls wrong; first: %s", c->failures, c->cases,
                     str(chk, "first_failure"));
            return;
        }
        c->status = C_OK;
    }
    const cJSON *t;
    cJSON_ArrayForEach(t, cJSON_GetObjectItem(res, "times"))
    {
        const char *shape = str(t, "shape");
        const int threads = (int)num(t, "threads");
        int r = 0;
        while (r < *n_rows && !(rows[r].threads == threads && !strcmp(rows[r].shape, shape))) r++;
        if (r == *n_rows) {
            if (r == MAX_ROWS) continue;
            snprintf(rows[r].shape, sizeof rows[r].shape, "%s", shape);
            rows[r].threads = threads;
            (*n_rows)++;
        }
        c->gflops[r][round] = num(t, "gflops");
    }
    c->n_rounds = round + 1;
}

/* The best round of one row (NAN if never measured): a busy machine only
 * ever slows a run down, so the fastest round is the closest to what the
 * kernels do; each round is already the median of its samples. */
static double row_rate(const candidate *c, int r)
{
    double best = NAN;
    for (int k = 0; k < c->n_rounds; k++)
        if (c->gflops[r][k] > 0 && !(c->gflops[r][k] <= best)) best = c->gflops[r][k];
    return best;
}

/* Kernel sets by the CPU features they need, fewest first; unknown names last. */
static int feature_rank(const char *name)
{
    static const char *const ORDER[] = {"Prescott", "Nehalem", "Sandybridge", "Haswell", "Zen",
                                        "SkylakeX", "Cooperlake", "SapphireRapids"};
    for (int i = 0; i < (int)(sizeof ORDER / sizeof ORDER[0]); i++)
        if (!strcasecmp(name, ORDER[i])) return i;
    return 100;
}

/* The fastest correct set by geometric mean, except that a set within
 * TIE of the fastest wins if it needs fewer CPU features: Cooperlake's sgemm
 * is SkylakeX's (it adds bf16 kernels only), so the two differ by noise,
 * and the more general set is the better-trodden path. -1: none correct. */
static const double TIE = 0.05;
static int choose(const candidate *c, int n)
{
    int best = -1;
    for (int k = 0; k < n; k++)
        if (c[k].status == C_OK && c[k].geomean > 0 && (best < 0 || c[k].geomean > c[best].geomean)) best = k;
    int pick = best;
    for (int k = 0; k < n && best >= 0; k++)
        if (c[k].status == C_OK && c[k].geomean >= (1 - TIE) * c[best].geomean &&
            feature_rank(c[k].name) < feature_rank(c[pick].name))
            pick = k;
    return pick;
}

typedef struct {
    moe_cpu cpu;
    char build[256]; /* blas_build() */
    char library[512];
    char detected[32];
    candidate cand[MAX_CAND];
    int n_cand;
    row rows[MAX_ROWS];
    int n_rows;
    int choice; /* index into cand, -1: none correct */
    int rounds;
} selftest;

static int parse_candidates(const char *list, const char **out, char *store, size_t store_n)
{
    snprintf(store, store_n, "%s", list);
    int n = 0;
    for (char *save = NULL, *t = strtok_r(store, ",", &save); t && n < MAX_CAND; t = strtok_r(NULL, ",", &save))
        if (*t) out[n++] = t;
    return n;
}

/* Runs the whole selftest into *s; progress on stderr unless quiet. */
static void run_all(selftest *s, const opts *o, int quiet)
{
    memset(s, 0, sizeof *s);
    moe_cpu_read(&s->cpu);
    blas_build(s->build, sizeof s->build);
    blas_library(s->library, sizeof s->library);
    const char *names[MAX_CAND];
    char store[256];
    s->n_cand = o->candidates[0] ? parse_candidates(o->candidates, names, store, sizeof store)
                                 : moe_cpu_kernel_sets(&s->cpu, names);
    for (int i = 0; i < s->n_cand; i++) snprintf(s->cand[i].name, sizeof s->cand[i].name, "%s", names[i]);
    s->rounds = o->rounds;
    s->choice = -1;

    /* What OpenBLAS picks by itself (no check, no timing). */
    cand_status st;
    char why[320];
    cJSON *det = run_child("auto", 0, 0, o, s->cpu.cpus, &st, why, sizeof why);
    snprintf(s->detected, sizeof s->detected, "%s", det ? str(det, "corename") : "?");
    cJSON_Delete(det);

    for (int round = 0; round < s->rounds; round++) {
        for (int k = 0; k < s->n_cand; k++) {
            /* alternate the order every round: ABC, CBA, ABC, ... */
            candidate *c = &s->cand[round % 2 ? s->n_cand - 1 - k : k];
            if (round > 0 && c->status != C_OK) continue;
            if (!quiet)
                fprintf(stderr, "moe selftest blas: %s %s, round %d of %d\n", c->name,
                        round == 0 ? "check + timing" : "timing", round + 1, s->rounds);
            cJSON *res = run_child(c->name, round == 0, 1, o, s->cpu.cpus, &c->status, c->why, sizeof c->why);
            if (res) absorb(c, res, s->rows, &s->n_rows, round);
            cJSON_Delete(res);
            if (c->status == C_WRONG || c->status == C_CRASHED || c->status == C_HUNG || c->status == C_FAILED)
                fprintf(stderr, "moe selftest blas: warning: kernel set %s is not eligible (%s): %s\n", c->name,
                        STATUS_NAME[c->status], c->why);
        }
    }
    for (int k = 0; k < s->n_cand; k++) {
        candidate *c = &s->cand[k];
        c->geomean = NAN;
        if (c->status != C_OK) continue;
        double lsum = 0;
        int n = 0;
        for (int r = 0; r < s->n_rows; r++) {
            const double g = row_rate(c, r);
            if (g > 0) lsum += log(g), n++;
        }
        if (n) c->geomean = exp(lsum / n);
    }
    s->choice = choose(s->cand, s->n_cand);
}

/* The cache key: what the answer depends on. */
static void cache_key(char *buf, size_t n, const selftest *s, const opts *o)
{
    struct stat sb;
    long long size = 0, mtime = 0;
    if (s->library[0] && !stat(s->library, &sb)) size = (long long)sb.st_size, mtime = (long long)sb.st_mtime;
    snprintf(buf, n, "%s%s | candidates %s | moe %s | %s | %s | %s %lld bytes mtime %lld | %d cpus | %s",
             SELFTEST_FORMAT, o->quick ? " quick" : "", o->candidates[0] ? o->candidates : "cpu", MOE_VERSION,
             s->cpu.model, s->build, s->library, size, mtime, s->cpu.cpus, s->cpu.flags);
}

static cJSON *to_json(const selftest *s, const char *key)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "moe_version", MOE_VERSION);
    cJSON *cpu = cJSON_AddObjectToObject(j, "cpu");
    cJSON_AddStringToObject(cpu, "model", s->cpu.model);
    cJSON_AddNumberToObject(cpu, "cpus", s->cpu.cpus);
    cJSON_AddStringToObject(cpu, "flags", s->cpu.flags);
    cJSON *ob = cJSON_AddObjectToObject(j, "openblas");
    cJSON_AddStringToObject(ob, "build", s->build);
    cJSON_AddStringToObject(ob, "library", s->library);
    cJSON_AddStringToObject(ob, "detected", s->detected);
    cJSON_AddNumberToObject(j, "rounds", s->rounds);
    cJSON *shapes = cJSON_AddArrayToObject(j, "shapes");
    int ns;
    const moe_blas_shape *sh = moe_blas_shapes(&ns);
    for (int i = 0; i < ns; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "name", sh[i].name);
        cJSON_AddStringToObject(e, "what", sh[i].what);
        cJSON_AddNumberToObject(e, "gflop", moe_blas_shape_flops(&sh[i]) / 1e9);
        cJSON_AddItemToArray(shapes, e);
    }
    cJSON *cands = cJSON_AddArrayToObject(j, "candidates");
    for (int k = 0; k < s->n_cand; k++) {
        const candidate *c = &s->cand[k];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "coretype", c->name);
        cJSON_AddStringToObject(e, "status", c->status == C_OK ? "correct" : c->status == C_WRONG ? "wrong"
                                                                                                  : STATUS_NAME[c->status]);
        cJSON_AddStringToObject(e, "corename", c->corename);
        if (c->why[0]) cJSON_AddStringToObject(e, "why", c->why);
        if (c->cases) {
            cJSON_AddNumberToObject(e, "cases", c->cases);
            cJSON_AddNumberToObject(e, "failures", c->failures);
            if (isfinite(c->worst_ratio)) cJSON_AddNumberToObject(e, "worst_ratio", c->worst_ratio);
            else cJSON_AddStringToObject(e, "worst_ratio", "inf");
            cJSON_AddStringToObject(e, "worst_case", c->worst_case);
        }
        if (c->status == C_OK) {
            cJSON *g = cJSON_AddObjectToObject(e, "gflops");
            for (int r = 0; r < s->n_rows; r++) {
                char name[64];
                snprintf(name, sizeof name, "%s/%dt", s->rows[r].shape, s->rows[r].threads);
                const double v = row_rate(c, r);
                if (isfinite(v)) cJSON_AddNumberToObject(g, name, v);
            }
            cJSON_AddNumberToObject(e, "geomean", isfinite(c->geomean) ? c->geomean : 0);
            double peak = 0;
            for (int r = 0; r < s->n_rows; r++) {
                const double v = row_rate(c, r);
                if (v > peak) peak = v;
            }
            cJSON_AddNumberToObject(e, "peak_gflops", peak);
        }
        cJSON_AddItemToArray(cands, e);
    }
    if (s->choice >= 0) cJSON_AddStringToObject(j, "choice", s->cand[s->choice].name);
    else cJSON_AddNullToObject(j, "choice");
    if (key) cJSON_AddStringToObject(j, "key", key);
    return j;
}

static void print_table(FILE *f, const selftest *s)
{
    fprintf(f, "moe selftest blas: %s, %d cores; %s\n", s->cpu.model, s->cpu.cpus, s->build);
    fprintf(f, "  library %s; OpenBLAS's own pick here: %s\n\n", s->library[0] ? s->library : "?", s->detected);
    fprintf(f, "%-16s %-12s %10s %7s  %s\n", "kernel set", "status", "err/bound", "calls", "note");
    for (int k = 0; k < s->n_cand; k++) {
        const candidate *c = &s->cand[k];
        char ratio[32] = "-";
        if (c->cases) snprintf(ratio, sizeof ratio, isfinite(c->worst_ratio) ? "%.3g" : "inf", c->worst_ratio);
        fprintf(f, "%-16s %-12s %10s %7d  %s\n", c->name, STATUS_NAME[c->status], ratio, c->cases,
                c->status == C_OK ? (c->worst_case[0] ? c->worst_case : "") : c->why);
    }
    if (s->choice < 0) {
        fprintf(f, "\nchoice: none: no kernel set computed correct results\n");
        return;
    }
    fprintf(f, "\nsgemm GFLOP/s (best of %d alternating round%s, each the median of its samples; rows: moerun's shapes, "
               "threads)\n", s->rounds,
            s->rounds > 1 ? "s" : "");
    fprintf(f, "%-26s %3s", "shape", "thr");
    for (int k = 0; k < s->n_cand; k++)
        if (s->cand[k].status == C_OK) fprintf(f, " %12s", s->cand[k].name);
    fputc('\n', f);
    for (int r = 0; r < s->n_rows; r++) {
        fprintf(f, "%-26s %3d", s->rows[r].shape, s->rows[r].threads);
        for (int k = 0; k < s->n_cand; k++)
            if (s->cand[k].status == C_OK) fprintf(f, " %12.1f", row_rate(&s->cand[k], r));
        fputc('\n', f);
    }
    fprintf(f, "%-30s", "geometric mean");
    for (int k = 0; k < s->n_cand; k++)
        if (s->cand[k].status == C_OK) fprintf(f, " %12.1f", s->cand[k].geomean);
    fputc('\n', f);
    fprintf(f, "\nchoice: OPENBLAS_CORETYPE=%s (fastest correct kernel set by geometric mean; within %.0f%%, "
               "the one needing fewer CPU features)\n", s->cand[s->choice].name, 100 * TIE);
}

/* FNV-1a 64: names the cache file after the key. */
static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

static int cache_path(char *buf, size_t n, const char *key)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char dir[768];
    if (xdg && *xdg) snprintf(dir, sizeof dir, "%s/moerun", xdg);
    else if (home && *home) snprintf(dir, sizeof dir, "%s/.cache/moerun", home);
    else return -1;
    /* mkdir -p of the two levels that may be missing */
    char parent[768];
    snprintf(parent, sizeof parent, "%s", dir);
    *strrchr(parent, '/') = '\0';
    if (mkdir(parent, 0755) && errno != EEXIST) return -1;
    if (mkdir(dir, 0755) && errno != EEXIST) return -1;
    snprintf(buf, n, "%s/blas-%016llx.json", dir, (unsigned long long)fnv1a(key));
    return 0;
}

/* The cached choice for key, or NULL. */
static char *cache_read(const char *path, const char *key)
{
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char *text = NULL;
    size_t cap = 0;
    const ssize_t n = getdelim(&text, &cap, '\0', f);
    fclose(f);
    char *choice = NULL;
    cJSON *j = n > 0 ? cJSON_Parse(text) : NULL;
    if (j && !strcmp(str(j, "key"), key) && *str(j, "choice")) choice = strdup(str(j, "choice"));
    cJSON_Delete(j);
    free(text);
    return choice;
}

static int cache_write(const char *path, const cJSON *j)
{
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    char *s = cJSON_Print(j);
    const int ok = s && fputs(s, f) >= 0 && fputc('\n', f) != EOF;
    free(s);
    if (fclose(f) || !ok || rename(tmp, path)) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* --pick: prints the kernel set moerun processes should load here and logs
 * one line on stderr saying why. An explicit OPENBLAS_CORETYPE wins (sites
 * set it on purpose); else the cached choice for this machine's key; else
 * the selftest runs now (its table on stderr) and its choice is cached.
 * Returns 1 with a message when no kernel set is correct. */
static int pick(selftest *s, const opts *o)
{
    const char *env = getenv("OPENBLAS_CORETYPE");
    if (env && *env) {
        const char *got = openblas_get_corename();
        if (got && strcasecmp(env, got))
            fprintf(stderr, "moe selftest blas: warning: OPENBLAS_CORETYPE=%s, but OpenBLAS loads %s "
                            "(a name this OpenBLAS does not know, or a set this CPU cannot run)\n", env, got);
        fprintf(stderr, "moe selftest blas: OpenBLAS kernels %s (OPENBLAS_CORETYPE set in the environment)\n",
                got ? got : env);
        printf("%s\n", env);
        return 0;
    }
    /* The key needs the machine only, not the selftest's results. */
    moe_cpu_read(&s->cpu);
    blas_build(s->build, sizeof s->build);
    blas_library(s->library, sizeof s->library);
    char key[4096], path[1024];
    cache_key(key, sizeof key, s, o);
    moe_cpu_free(&s->cpu);
    const int have_path = cache_path(path, sizeof path, key) == 0;
    char *choice = have_path && !o->refresh ? cache_read(path, key) : NULL;
    /* One selftest per machine at a time: a second launcher waits for the
     * first one's answer instead of timing against it. */
    int lock = -1;
    if (!choice && have_path) {
        char lpath[1100];
        snprintf(lpath, sizeof lpath, "%s.lock", path);
        lock = open(lpath, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (lock >= 0 && flock(lock, LOCK_EX | LOCK_NB)) {
            fprintf(stderr, "moe selftest blas: waiting for the selftest another process runs (%s)\n", lpath);
            while (flock(lock, LOCK_EX) && errno == EINTR) {}
            if (!o->refresh) choice = cache_read(path, key);
        }
    }
    const int cached = choice != NULL;
    if (!choice) {
        fprintf(stderr, "moe selftest blas: choosing the OpenBLAS kernel set for this machine (once; cached in %s)\n",
                have_path ? path : "nowhere: neither XDG_CACHE_HOME nor HOME is set");
        run_all(s, o, 0);
        print_table(stderr, s);
        if (s->choice >= 0) {
            choice = strdup(s->cand[s->choice].name);
            cJSON *j = to_json(s, key);
            if (have_path && cache_write(path, j))
                fprintf(stderr, "moe selftest blas: warning: cannot write the cache %s: %s\n", path, strerror(errno));
            cJSON_Delete(j);
        }
        moe_cpu_free(&s->cpu);
    }
    if (lock >= 0) close(lock); /* releases the lock */
    if (!choice) {
        fprintf(stderr, "moe selftest blas: no OpenBLAS kernel set computed correct results on this machine "
                        "(table above); set OPENBLAS_CORETYPE to override\n");
        return 1;
    }
    fprintf(stderr, "moe selftest blas: OpenBLAS kernels %s (fastest correct on this machine%s%s)\n", choice,
            cached ? "; cached in " : "", cached ? path : "");
    printf("%s\n", choice);
    free(choice);
    return 0;
}

static int parse_opts(opts *o, int argc, char **argv, int *check, int *timed)
{
    memset(o, 0, sizeof *o);
    o->rounds = -1;
    o->timeout = 600;
    *check = *timed = 1;
    static const struct option longs[] = {
        {"json", no_argument, NULL, 'j'},          {"quick", no_argument, NULL, 'q'},
        {"candidates", required_argument, NULL, 'c'}, {"rounds", required_argument, NULL, 'r'},
        {"timeout", required_argument, NULL, 't'}, {"pick", no_argument, NULL, 'p'},
        {"refresh", no_argument, NULL, 'R'},       {"one", required_argument, NULL, 'o'},
        {"no-check", no_argument, NULL, 'C'},      {"no-time", no_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0}};
    optind = 1;
    opterr = 0;
    for (int ch; (ch = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        long v;
        double d;
        switch (ch) {
        case 'j': o->json = 1; break;
        case 'q': o->quick = 1; break;
        case 'p': o->pick = 1; break;
        case 'R': o->refresh = 1; break;
        case 'C': *check = 0; break;
        case 'T': *timed = 0; break;
        case 'o': o->one = optarg; break;
        case 'c':
            if (!*optarg || strlen(optarg) >= sizeof o->candidates || strspn(optarg, "abcdefghijklmnopqrstuvwxyz"
                                                                                 "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,_") != strlen(optarg)) {
                moe_cli_usage_error(-1, "selftest blas", "--candidates: expected names like SkylakeX,Haswell, got '%s'", optarg);
                return 2;
            }
            snprintf(o->candidates, sizeof o->candidates, "%s", optarg);
            break;
        case 'r':
            if (moe_cli_parse_long(optarg, 1, MAX_ROUNDS, &v)) {
                moe_cli_usage_error(-1, "selftest blas", "--rounds: expected 1..%d, got '%s'", MAX_ROUNDS, optarg);
                return 2;
            }
            o->rounds = (int)v;
            break;
        case 't':
            if (moe_cli_parse_double(optarg, &d) || d <= 0) {
                moe_cli_usage_error(-1, "selftest blas", "--timeout: expected seconds > 0, got '%s'", optarg);
                return 2;
            }
            o->timeout = d;
            break;
        case 'h': usage(stdout); return 1;
        default:
            moe_cli_usage_error(-1, "selftest blas", "unknown option '%s'", argv[optind - 1]);
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        moe_cli_usage_error(-1, "selftest blas", "unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (o->rounds < 0) o->rounds = o->quick ? 1 : 3;
    return 0;
}

static int cmd_blas(int argc, char **argv)
{
    opts o;
    int check, timed;
    const int prc = parse_opts(&o, argc, argv, &check, &timed);
    if (prc) return prc == 1 ? 0 : 2;
    if (o.one) return run_one(&o, check, timed);

    selftest *s = calloc(1, sizeof *s);
    if (!s) {
        fprintf(stderr, "moe selftest blas: out of memory\n");
        return 1;
    }
    int rc;
    if (o.pick) {
        rc = pick(s, &o);
    } else {
        run_all(s, &o, o.json);
        if (o.json) {
            char key[4096];
            cache_key(key, sizeof key, s, &o);
            cJSON *j = to_json(s, key);
            char *t = cJSON_PrintUnformatted(j);
            printf("%s\n", t);
            free(t);
            cJSON_Delete(j);
        } else {
            print_table(stdout, s);
        }
        rc = s->choice >= 0 ? 0 : 1;
        moe_cpu_free(&s->cpu);
    }
    free(s);
    return rc;
}

int moe_cmd_selftest(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc < 2 ? stderr : stdout, "usage: moe selftest blas [options]   (moe selftest blas --help)\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "blas")) return cmd_blas(argc - 1, argv + 1);
    fprintf(stderr, "moe selftest: unknown selftest '%s' (expected 'blas')\n", argv[1]);
    return 2;
}
