/* What a process computes with: the BLAS kernel set OpenBLAS picked, its
 * thread count, the moerun version and the host. OpenBLAS chooses its
 * kernels per process (CPU detection, or OPENBLAS_CORETYPE), and two kernel
 * sets give different bits for the same GEMM; ranks started on another node
 * with another environment can differ silently. A job therefore gathers
 * every rank's record at start-up (src/cli) and checks them here.
 * moe_platform_memory: how much memory the machine offers (a run's size
 * check). Nothing here is collective or touches MPI. */
#ifndef MOE_CORE_PLATFORM_H
#define MOE_CORE_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"

/* One rank's record. Only fixed-size fields, version first, so ranks of
 * different moerun versions can still read each other's version. */
typedef struct {
    char version[32];     /* MOE_VERSION */
    char blas_core[32];   /* openblas_get_corename(), e.g. "Haswell" */
    char blas_config[160]; /* openblas_get_config() (library version, build options, core)
                            * and the OpenBLAS variables that change GEMM blocking */
    char host[64];        /* gethostname() */
    int32_t blas_threads; /* openblas_get_num_threads() */
} moe_platform;

/* Fills *out for this process (strings truncated to their fields). */
void moe_platform_get(moe_platform *out);

/* Checks the records of n ranks (all[r] = rank r). A different moerun
 * version, or a different BLAS kernel set or OpenBLAS build, returns
 * MOE_ERR_MISMATCH with a detail naming the values, the ranks and the hosts.
 * With allow_mixed_kernels a BLAS difference is accepted: MOE_OK, and the
 * same text as a warning in note. A different thread count is only noted.
 * note (cap bytes, may be NULL) is "" when there is nothing to say. */
moe_status moe_platform_check(const moe_platform *all, int n, int allow_mixed_kernels, char *note,
                              size_t cap);

/* One line about the whole job: ranks per host, kernel set, threads,
 * version, e.g. "4 ranks on 2 hosts (n1: ranks 0-1, n2: ranks 2-3); OpenBLAS Haswell,
 * 1 thread; moe 0.1.0". Per-rank values that differ are shown as a range. */
void moe_platform_summary(char *out, size_t cap, const moe_platform *all, int n);

/* Number of distinct hosts among the n records. */
int moe_platform_n_hosts(const moe_platform *all, int n);

/* The memory this process may use on this machine, in bytes: the physical
 * memory, or the memory limit of the container's cgroup (v2 memory.max, v1
 * memory.limit_in_bytes) when that is smaller (*limited = 1 then); 0 when
 * unknown. */
uint64_t moe_platform_memory(int *limited);

#endif
