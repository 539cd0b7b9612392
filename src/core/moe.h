/* Core definitions shared by every module: the status enum, error detail,
 * the enums that name routers and activations, and small helpers.
 * Library code never exits: it returns a moe_status and leaves a
 * human-readable detail in a thread-local buffer (moe_error_detail). */
#ifndef MOE_CORE_H
#define MOE_CORE_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MOE_OK = 0,
    MOE_ERR_ARG,       /* invalid argument or configuration */
    MOE_ERR_NOMEM,     /* allocation failed */
    MOE_ERR_NONFINITE, /* NaN or Inf in an input, a loss or a gradient */
    MOE_ERR_MPI,       /* an MPI call failed */
    MOE_ERR_REMOTE,    /* another rank reported an error */
    MOE_ERR_MISMATCH,  /* configuration or shapes differ (between ranks, or file vs config) */
    MOE_ERR_OVERFLOW,  /* a count does not fit the type an API needs */
    MOE_ERR_IO,        /* file missing, unreadable, unwritable */
    MOE_ERR_FORMAT,    /* file content is not what the format says */
    MOE_ERR_CHECKSUM,  /* stored checksum does not match the data */
    MOE_STATUS_COUNT
} moe_status;

/* The version of the moerun library in use, e.g. "0.1.0" (an application
 * may compare it with MOERUN_VERSION of <moerun/version.h>, the headers it
 * was compiled with). */
const char *moe_version(void);

/* Short fixed name of a status ("invalid argument", ...). */
const char *moe_status_str(moe_status s);

/* Records a formatted detail message for the calling thread and returns s,
 * so that library code can write `return moe_errorf(MOE_ERR_ARG, "...")`. */
moe_status moe_errorf(moe_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The last detail recorded on this thread ("" if none). */
const char *moe_error_detail(void);
void moe_error_clear(void);

typedef enum { MOE_ROUTER_TOKEN_CHOICE = 0, MOE_ROUTER_EXPERT_CHOICE = 1 } moe_router_kind;
/* Router score (docs/routing.md section 8) and load-balance loss form. */
typedef enum { MOE_SCORE_SOFTMAX = 0, MOE_SCORE_SIGMOID = 1 } moe_score_kind;
typedef enum { MOE_AUX_SWITCH = 0, MOE_AUX_SEQ = 1, MOE_AUX_NONE = 2 } moe_aux_kind;
typedef enum { MOE_ACT_GELU = 0, MOE_ACT_RELU = 1, MOE_ACT_SWIGLU = 2 } moe_activation;

const char *moe_router_kind_str(moe_router_kind k);   /* "token_choice" ... */
const char *moe_activation_str(moe_activation a);     /* "gelu" ... */
/* Parse names; return MOE_ERR_ARG (with detail) for unknown names. */
moe_status moe_router_kind_parse(moe_router_kind *out, const char *s);
moe_status moe_activation_parse(moe_activation *out, const char *s);

/* Rows of W1 per expert: 2F for swiglu (gate then value), F otherwise. */
static inline int moe_f1(int d_ff, moe_activation a) { return a == MOE_ACT_SWIGLU ? 2 * d_ff : d_ff; }

/* ceil(x) where x within 1e-9 of an integer counts as that integer
 * (docs/routing.md: capacity rounding). */
int64_t moe_ceil_tol(double x);

/* 1 if every entry of a is finite. */
int moe_all_finite(const float *a, size_t n);

/* Monotonic wall-clock seconds. */
double moe_now(void);

/* Allocation helpers: 64-byte aligned, zeroed; NULL on failure (and on
 * n == 0 they return a valid unique pointer so callers need no special case). */
void *moe_calloc(size_t n, size_t size);
void moe_free(void *p);

/* Loops that are compute-bound at SSE2 width (exp, sqrt, division) get an
 * AVX2+FMA clone as well, picked at load time (ifunc) on x86-64 with
 * GCC/Clang. The clones differ by FMA rounding (an ulp), never by summation
 * order, so every rank of a machine agrees.
 * MOE_TARGET_CLONES_EW, for purely elementwise loops (every output element
 * one expression of its inputs, no reduction across elements), adds an
 * AVX-512 clone: per element it computes exactly what the AVX2 clone does
 * (checked bitwise through the experts' results), and it halves the gelu
 * passes on cores with 512-bit units (2.9 vs 4.9 ms for 8M elements here).
 * Loops with lane-wise reductions must not get it: GCC 12 widens an 8-lane
 * accumulation into 16 lanes and adds the halves, which changes the sums.
 * Fuzzing builds (MOE_FUZZ) go without: AFL++'s compiler passes fail on
 * target_clones functions. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MOE_NO_TARGET_CLONES)
#define MOE_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MOE_TARGET_CLONES_EW __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_TARGET_CLONES
#define MOE_TARGET_CLONES_EW
#endif

/* A test hook for fault injection: when the environment variable
 * MOE_FAULT names `site` (e.g. "layer_alloc") and MOE_FAULT_RANK is unset or
 * equals `rank`, returns 1 once per process: at the first such call, or
 * after MOE_FAULT_SKIP (n) of them. Used by tests to prove that an error on
 * one rank ends the job cleanly. */
int moe_fault(const char *site, int rank);
/* The same site test, at EVERY call: MOE_FAULT_MS (milliseconds, 0 if
 * unset) when MOE_FAULT names `site` and MOE_FAULT_RANK is unset or equals
 * `rank`, else 0. For a rank that is slow but alive. */
int moe_fault_ms(const char *site, int rank);

#endif
