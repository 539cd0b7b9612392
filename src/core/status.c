/* Status names, thread-local error detail, name parsing and small helpers. */
#include "core/moe.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char moe_detail[1024];

const char *moe_status_str(moe_status s)
{
    static const char *names[MOE_STATUS_COUNT] = {
        [MOE_OK] = "ok",
        [MOE_ERR_ARG] = "invalid argument",
        [MOE_ERR_NOMEM] = "out of memory",
        [MOE_ERR_NONFINITE] = "non-finite value",
        [MOE_ERR_MPI] = "MPI error",
        [MOE_ERR_REMOTE] = "error on another rank",
        [MOE_ERR_MISMATCH] = "mismatch",
        [MOE_ERR_OVERFLOW] = "count overflow",
        [MOE_ERR_IO] = "I/O error",
        [MOE_ERR_FORMAT] = "bad file format",
        [MOE_ERR_CHECKSUM] = "checksum mismatch",
    };
    if ((int)s < 0 || s >= MOE_STATUS_COUNT) return "unknown status";
    return names[s];
}

moe_status moe_errorf(moe_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(moe_detail, sizeof moe_detail, fmt, ap);
    va_end(ap);
    return s;
}

const char *moe_error_detail(void) { return moe_detail; }
void moe_error_clear(void) { moe_detail[0] = '\0'; }

const char *moe_router_kind_str(moe_router_kind k)
{
    return k == MOE_ROUTER_EXPERT_CHOICE ? "expert_choice" : "token_choice";
}

const char *moe_activation_str(moe_activation a)
{
    switch (a) {
    case MOE_ACT_RELU: return "relu";
    case MOE_ACT_SWIGLU: return "swiglu";
    default: return "gelu";
    }
}

moe_status moe_router_kind_parse(moe_router_kind *out, const char *s)
{
    if (s && (!strcmp(s, "token_choice") || !strcmp(s, "token"))) { *out = MOE_ROUTER_TOKEN_CHOICE; return MOE_OK; }
    if (s && (!strcmp(s, "expert_choice") || !strcmp(s, "expert"))) { *out = MOE_ROUTER_EXPERT_CHOICE; return MOE_OK; }
    return moe_errorf(MOE_ERR_ARG, "unknown router '%s' (expected token_choice or expert_choice)", s ? s : "(null)");
}

moe_status moe_activation_parse(moe_activation *out, const char *s)
{
    if (s && !strcmp(s, "gelu")) { *out = MOE_ACT_GELU; return MOE_OK; }
    if (s && !strcmp(s, "relu")) { *out = MOE_ACT_RELU; return MOE_OK; }
    if (s && !strcmp(s, "swiglu")) { *out = MOE_ACT_SWIGLU; return MOE_OK; }
    return moe_errorf(MOE_ERR_ARG, "unknown activation '%s' (expected gelu, relu or swiglu)", s ? s : "(null)");
}

int64_t moe_ceil_tol(double x)
{
    double r = nearbyint(x);
    if (fabs(x - r) <= 1e-9) return (int64_t)r;
    return (int64_t)ceil(x);
}

int moe_all_finite(const float *a, size_t n)
{
    /* Branch-free accumulate so the compiler can vectorize: x*0 is NaN iff x is not finite. */
    float acc = 0.0f;
    for (size_t i = 0; i < n; i++) acc += a[i] * 0.0f;
    return acc == 0.0f;
}

void *moe_calloc(size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) return NULL;
    size_t bytes = n * size;
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~(size_t)63;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

void moe_free(void *p) { free(p); }

int moe_fault(const char *site, int rank)
{
    static int fired = 0;
    const char *want = getenv("MOE_FAULT");
    if (fired || !want || strcmp(want, site) != 0) return 0;
    const char *r = getenv("MOE_FAULT_RANK");
    if (r && *r && atoi(r) != rank) return 0;
    static long seen = 0;
    const char *skip = getenv("MOE_FAULT_SKIP");
    if (skip && *skip && seen++ < atol(skip)) return 0;
    fired = 1;
    return 1;
}

const char *moe_version(void) { return MOE_VERSION; }

int moe_fault_ms(const char *site, int rank)
{
    const char *want = getenv("MOE_FAULT"), *r = getenv("MOE_FAULT_RANK"), *ms = getenv("MOE_FAULT_MS");
    if (!want || strcmp(want, site) != 0 || (r && *r && atoi(r) != rank) || !ms) return 0;
    return atoi(ms);
}
