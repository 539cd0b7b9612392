/* What this CPU can run: its model and feature flags (/proc/cpuinfo), and
 * which of OpenBLAS's DYNAMIC_ARCH kernel sets use instructions it lacks.
 * OPENBLAS_CORETYPE forces a set even where the CPU cannot execute it; the
 * first GEMM then dies of SIGILL, so `moe` checks the variable against this
 * table at start (cli/main.c) and `moe selftest blas` tries only the sets
 * listed here as runnable. Not collective; no MPI. */
#ifndef MOE_CORE_CPU_H
#define MOE_CORE_CPU_H

typedef struct {
    char model[128]; /* "model name", or "unknown CPU" */
    char *flags;     /* the first "flags" line, space-separated (malloc'd; "" if none) */
    int cpus;        /* cores this process may run on (affinity), >= 1 */
} moe_cpu;

/* Reads /proc/cpuinfo and the affinity mask; never fails (an unreadable
 * file gives no flags). Free with moe_cpu_free. */
void moe_cpu_read(moe_cpu *out);
/* The same from given text (tests): model and flags are copied. */
void moe_cpu_from(moe_cpu *out, const char *model, const char *flags, int cpus);
void moe_cpu_free(moe_cpu *c);

/* 1 if `flag` is one of the CPU's flags (a whole word). */
int moe_cpu_has(const moe_cpu *c, const char *flag);

/* Kernel sets worth trying here, newest first, into out (room for 8);
 * Prescott (SSE3) runs anywhere and is always last. Returns the count. */
int moe_cpu_kernel_sets(const moe_cpu *c, const char **out);

/* Whether the set `name` (compared without case, as OpenBLAS does) runs
 * here: 1 yes, 0 no (*missing then names the first missing feature),
 * -1 a name this table does not know (not checked). */
int moe_cpu_runs_kernel_set(const moe_cpu *c, const char *name, const char **missing);

#endif
