/* CPU features and the OpenBLAS kernel sets they allow (cpu.h). */
#define _GNU_SOURCE
#include "core/cpu.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

void moe_cpu_from(moe_cpu *out, const char *model, const char *flags, int cpus)
{
    snprintf(out->model, sizeof out->model, "%s", model && *model ? model : "unknown CPU");
    out->flags = strdup(flags ? flags : "");
    out->cpus = cpus > 0 ? cpus : 1;
}

void moe_cpu_read(moe_cpu *out)
{
    char model[128] = "", *flags = NULL, *line = NULL;
    size_t cap = 0;
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && getline(&line, &cap, f) > 0) {
        char *colon = strchr(line, ':');
        if (!colon) continue;
        char *v = colon + 1 + (colon[1] == ' ');
        v[strcspn(v, "\n")] = '\0';
        if (!*model && !strncmp(line, "model name", 10)) snprintf(model, sizeof model, "%s", v);
        else if (!flags && !strncmp(line, "flags", 5)) flags = strdup(v);
        if (*model && flags) break;
    }
    free(line);
    if (f) fclose(f);
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    moe_cpu_from(out, model, flags, cpus);
    free(flags);
}

void moe_cpu_free(moe_cpu *c)
{
    free(c->flags);
    c->flags = NULL;
}

int moe_cpu_has(const moe_cpu *c, const char *flag)
{
    const size_t n = strlen(flag);
    if (!c->flags || !n) return 0;
    for (const char *p = c->flags; (p = strstr(p, flag)); p += n)
        if ((p == c->flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
    return 0;
}

/* The features each set's kernels execute (OpenBLAS 0.3.21's kernel/x86_64
 * KERNEL.* files): every listed flag is required, except that a set with
 * `any` needs at least one of those as well. Sets not listed are older
 * than SSE3-only hardware or not x86-64; they are not checked. */
static const struct {
    const char *name;
    const char *all[6];
    const char *any[2];
} SETS[] = {
    {"SapphireRapids", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", NULL}, {"amx_tile", "avx512_fp16"}},
    {"Cooperlake", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16"}, {NULL, NULL}},
    {"SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", NULL}, {NULL, NULL}},
    {"Haswell", {"avx2", "fma", NULL}, {NULL, NULL}},
    {"Zen", {"avx2", "fma", NULL}, {NULL, NULL}},
    {"Bulldozer", {"avx", "fma4", NULL}, {NULL, NULL}}, /* AMD's FMA4 */
    {"Sandybridge", {"avx", NULL}, {NULL, NULL}},
    {"Nehalem", {"sse4_2", NULL}, {NULL, NULL}},
    {"Prescott", {NULL}, {NULL, NULL}},
};
enum { N_SETS = sizeof SETS / sizeof SETS[0] };

int moe_cpu_runs_kernel_set(const moe_cpu *c, const char *name, const char **missing)
{
    for (int s = 0; s < N_SETS; s++) {
        if (strcasecmp(name, SETS[s].name)) continue;
        for (int k = 0; k < 6 && SETS[s].all[k]; k++)
            if (!moe_cpu_has(c, SETS[s].all[k])) {
                if (missing) *missing = SETS[s].all[k];
                return 0;
            }
        if (SETS[s].any[0] && !moe_cpu_has(c, SETS[s].any[0]) && !(SETS[s].any[1] && moe_cpu_has(c, SETS[s].any[1]))) {
            if (missing) *missing = SETS[s].any[0];
            return 0;
        }
        return 1;
    }
    return -1;
}

int moe_cpu_kernel_sets(const moe_cpu *c, const char **out)
{
    /* The ones worth timing: each newer family's best, then the floors.
     * (Bulldozer and Nehalem are slower than a listed set wherever they run.) */
    static const char *const TRY[] = {"SapphireRapids", "Cooperlake", "SkylakeX", "Haswell", "Zen", "Sandybridge",
                                      "Prescott"};
    int n = 0;
    for (size_t i = 0; i < sizeof TRY / sizeof TRY[0]; i++)
        if (moe_cpu_runs_kernel_set(c, TRY[i], NULL) == 1) out[n++] = TRY[i];
    return n;
}
