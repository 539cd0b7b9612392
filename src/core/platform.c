/* Per-process platform record (BLAS kernels, threads, version, host) and
 * the start-up check that every rank of a job computes with the same
 * kernels (platform.h). Messages group ranks by value and name their hosts,
 * so a node started with another environment is found at once; and the
 * memory the machine (or its container) offers. */
#include "core/platform.h"

#include "core/gemm.h"

#include <cblas.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

int moe_blas_small_kernels(void)
{
    /* -1 until read; the kernel set is fixed once OpenBLAS has loaded, so
     * concurrent first calls store the same value. */
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *core = openblas_get_corename();
        v = core && (!strcasecmp(core, "skylakex") || !strcasecmp(core, "cooperlake") ||
                     !strcasecmp(core, "sapphirerapids"));
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

static void copy_field(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "?");
}

void moe_platform_get(moe_platform *out)
{
    memset(out, 0, sizeof *out);
    copy_field(out->version, sizeof out->version, MOE_VERSION);
    copy_field(out->blas_core, sizeof out->blas_core, openblas_get_corename());
    copy_field(out->blas_config, sizeof out->blas_config, openblas_get_config());
    /* The config string ends with a space on some builds: trim it. */
    size_t len = strlen(out->blas_config);
    while (len > 0 && out->blas_config[len - 1] == ' ') out->blas_config[--len] = '\0';
    /* Cache sizes set by hand change OpenBLAS's GEMM blocking, hence the bits. */
    static const char *const knobs[] = {"OPENBLAS_L2_SIZE", "OPENBLAS_BLOCK_FACTOR"};
    for (size_t k = 0; k < sizeof knobs / sizeof *knobs; k++) {
        const char *v = getenv(knobs[k]);
        if (v && *v && len < sizeof out->blas_config)
            len += (size_t)snprintf(out->blas_config + len, sizeof out->blas_config - len, "; %s=%s", knobs[k], v);
    }
    out->blas_config[sizeof out->blas_config - 1] = '\0';
    if (gethostname(out->host, sizeof out->host - 1)) copy_field(out->host, sizeof out->host, "?");
    out->host[sizeof out->host - 1] = '\0';
    out->blas_threads = openblas_get_num_threads();
}

/* Bounded appending: keeps the text NUL-terminated however long it gets. */
typedef struct {
    char *s;
    size_t cap, len;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...)
{
    if (!t->s || t->cap == 0 || t->len + 1 >= t->cap) return;
    va_list ap;
    va_start(ap, fmt);
    const int k = vsnprintf(t->s + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    if (k > 0) t->len = t->len + (size_t)k < t->cap ? t->len + (size_t)k : t->cap - 1;
}

static const char *field(const moe_platform *p, size_t off) { return (const char *)p + off; }

/* Ranks whose field (at off) equals v, as ranges "0-1,4" (at most 8). */
static void put_ranks(text *t, const moe_platform *all, int n, size_t off, const char *v)
{
    int count = 0, shown = 0;
    for (int r = 0; r < n; r++)
        if (!strcmp(field(&all[r], off), v)) count++;
    put(t, count == 1 ? "rank " : "ranks ");
    for (int r = 0; r < n;) {
        if (strcmp(field(&all[r], off), v)) { r++; continue; }
        int e = r;
        while (e + 1 < n && !strcmp(field(&all[e + 1], off), v)) e++;
        if (shown == 8) { put(t, ",..."); break; }
        put(t, shown ? "," : "");
        if (e > r) put(t, "%d-%d", r, e);
        else put(t, "%d", r);
        shown++;
        r = e + 1;
    }
}

/* Distinct hosts of the ranks whose field equals v (at most 3, then "+k"). */
static void put_hosts(text *t, const moe_platform *all, int n, size_t off, const char *v)
{
    int shown = 0, more = 0;
    for (int r = 0; r < n; r++) {
        if (strcmp(field(&all[r], off), v)) continue;
        int seen = 0;
        for (int q = 0; q < r && !seen; q++)
            seen = !strcmp(field(&all[q], off), v) && !strcmp(all[q].host, all[r].host);
        if (seen) continue;
        if (shown < 3) put(t, "%s%s", shown++ ? ", " : "", all[r].host);
        else more++;
    }
    if (more) put(t, " +%d more", more);
}

/* "'a' on ranks 0-1 (host1), 'b' on rank 2 (host2)": every distinct value
 * of the field, in order of first appearance (at most 4). */
static void put_groups(text *t, const moe_platform *all, int n, size_t off)
{
    int groups = 0;
    for (int r = 0; r < n; r++) {
        int first = 1;
        for (int q = 0; q < r && first; q++) first = strcmp(field(&all[q], off), field(&all[r], off)) != 0;
        if (!first) continue;
        if (groups == 4) { put(t, ", and more"); break; }
        put(t, "%s'%s' on ", groups++ ? ", " : "", field(&all[r], off));
        put_ranks(t, all, n, off, field(&all[r], off));
        put(t, " (");
        put_hosts(t, all, n, off, field(&all[r], off));
        put(t, ")");
    }
}

static int all_same(const moe_platform *all, int n, size_t off)
{
    for (int r = 1; r < n; r++)
        if (strcmp(field(&all[r], off), field(&all[0], off))) return 0;
    return 1;
}

moe_status moe_platform_check(const moe_platform *all, int n, int allow_mixed_kernels, char *note,
                              size_t cap)
{
    text t = {note, cap, 0};
    if (note && cap) note[0] = '\0';
    if (!all || n < 1) return moe_errorf(MOE_ERR_ARG, "platform check of %d ranks", n);
    char msg[1024];
    text m = {msg, sizeof msg, 0};
    msg[0] = '\0';
    if (!all_same(all, n, offsetof(moe_platform, version))) {
        put(&m, "moerun versions differ between ranks: ");
        put_groups(&m, all, n, offsetof(moe_platform, version));
        put(&m, "; run the same build on every node");
        return moe_errorf(MOE_ERR_MISMATCH, "%s", msg);
    }
    /* Same core name but another OpenBLAS build still means other kernels. */
    const size_t off = !all_same(all, n, offsetof(moe_platform, blas_core)) ? offsetof(moe_platform, blas_core)
                       : !all_same(all, n, offsetof(moe_platform, blas_config))
                           ? offsetof(moe_platform, blas_config)
                           : 0;
    if (off) {
        put(&m, "%s differ between ranks: ", off == offsetof(moe_platform, blas_core) ? "BLAS kernels" : "OpenBLAS builds");
        put_groups(&m, all, n, off);
        put(&m, "; the same GEMM gives other bits on other kernels, so ranks would drift apart");
        if (!allow_mixed_kernels) {
            put(&m, ". Give every rank the same OPENBLAS_* variables (e.g. mpirun -x OPENBLAS_CORETYPE=%s; "
                    "launch/moe-local exports them all) or pass --allow_mixed_kernels to accept the difference",
                all[0].blas_core);
            return moe_errorf(MOE_ERR_MISMATCH, "%s", msg);
        }
        put(&t, "warning: %s (allowed by --allow_mixed_kernels)", msg);
    }
    int threads_differ = 0;
    for (int r = 1; r < n; r++) threads_differ |= all[r].blas_threads != all[0].blas_threads;
    if (threads_differ) {
        int lo = all[0].blas_threads, hi = lo, rlo = 0, rhi = 0;
        for (int r = 1; r < n; r++) {
            if (all[r].blas_threads < lo) lo = all[r].blas_threads, rlo = r;
            if (all[r].blas_threads > hi) hi = all[r].blas_threads, rhi = r;
        }
        put(&t, "%snote: BLAS threads differ between ranks (%d on rank %d (%s), %d on rank %d (%s))",
            t.len ? "\n" : "", lo, rlo, all[rlo].host, hi, rhi, all[rhi].host);
    }
    return MOE_OK;
}

int moe_platform_n_hosts(const moe_platform *all, int n)
{
    int hosts = 0;
    for (int r = 0; r < n; r++) {
        int seen = 0;
        for (int q = 0; q < r && !seen; q++) seen = !strcmp(all[q].host, all[r].host);
        hosts += !seen;
    }
    return hosts;
}

void moe_platform_summary(char *out, size_t cap, const moe_platform *all, int n)
{
    text t = {out, cap, 0};
    if (out && cap) out[0] = '\0';
    if (!all || n < 1) return;
    const int hosts = moe_platform_n_hosts(all, n);
    put(&t, "%d rank%s on %d host%s (", n, n == 1 ? "" : "s", hosts, hosts == 1 ? "" : "s");
    int shown = 0;
    for (int r = 0; r < n; r++) {
        int seen = 0;
        for (int q = 0; q < r && !seen; q++) seen = !strcmp(all[q].host, all[r].host);
        if (seen) continue;
        if (shown == 8) { put(&t, ", ..."); break; }
        put(&t, "%s%s: ", shown++ ? ", " : "", all[r].host);
        put_ranks(&t, all, n, offsetof(moe_platform, host), all[r].host);
    }
    int lo = all[0].blas_threads, hi = lo;
    for (int r = 1; r < n; r++) {
        lo = all[r].blas_threads < lo ? all[r].blas_threads : lo;
        hi = all[r].blas_threads > hi ? all[r].blas_threads : hi;
    }
    put(&t, "); OpenBLAS %s%s, ", all[0].blas_core,
        all_same(all, n, offsetof(moe_platform, blas_core)) ? "" : " (mixed)");
    if (lo == hi) put(&t, "%d thread%s", lo, lo == 1 ? "" : "s");
    else put(&t, "%d-%d threads", lo, hi);
    put(&t, "; moe %s", all[0].version);
}

/* A byte count from the first line of a cgroup file ("max": none). */
static uint64_t cgroup_bytes(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[64] = "";
    const int ok = fgets(line, sizeof line, f) != NULL;
    fclose(f);
    char *end;
    const unsigned long long v = ok ? strtoull(line, &end, 10) : 0;
    return ok && end != line ? (uint64_t)v : 0;
}

uint64_t moe_platform_memory(int *limited)
{
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t mem = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    *limited = 0;
    /* the container's own cgroup (v2, then v1); "unlimited" in v1 is a huge number */
    const char *files[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (int i = 0; i < 2; i++) {
        const uint64_t lim = cgroup_bytes(files[i]);
        if (lim > 0 && (mem == 0 || lim < mem)) {
            mem = lim;
            *limited = 1;
        }
    }
    return mem;
}
