/* BLAS self-test kernels (blas_check.h): the float64 reference and error
 * bound, the check cases, and the timed GEMM groups at moerun's shapes. */
#include "core/blas_check.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


void moe_blas_sgemm_openblas(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                             const float *B, int ldb, float beta, float *C, int ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
                lda, B, ldb, beta, C, ldc);
}

void moe_blas_sgemv_openblas(int trans, int M, int N, float alpha, const float *A, int lda, const float *x,
                             float beta, float *y)
{
    cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, M, N, alpha, A, lda, x, 1, beta, y, 1);
}

void moe_blas_sgemm_ref(double *ref, double *mag, int ta, int tb, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta, const float *C0, int ldc)
{
    for (int i = 0; i < M; i++) {
        double *r = ref + (size_t)i * N, *m = mag + (size_t)i * N;
        for (int j = 0; j < N; j++) {
            const double c0 = beta != 0.0f ? C0[(size_t)i * ldc + j] : 0.0; /* beta 0: C0 is not read */
            r[j] = (double)beta * c0;
            m[j] = fabs((double)beta * c0);
        }
        for (int k = 0; k < K; k++) {
            const double a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
            const double aa = (double)alpha * a, ab = fabs(aa);
            if (tb)
                for (int j = 0; j < N; j++) {
                    const double b = B[(size_t)j * ldb + k];
                    r[j] += aa * b;
                    m[j] += ab * fabs(b);
                }
            else
                for (int j = 0; j < N; j++) {
                    const double b = B[(size_t)k * ldb + j];
                    r[j] += aa * b;
                    m[j] += ab * fabs(b);
                }
        }
    }
}

double moe_blas_bound_factor(int K)
{
    const double u = 0x1p-24, n = (double)K + 4;
    /* + the float64 reference's own error, K + 2 roundings at 2^-53 */
    return n * u / (1 - n * u) + ((double)K + 2) * 0x1p-53;
}

/* ---- check cases ---- */

/* splitmix64: the check's inputs only need to be varied and repeatable */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static float unif(uint64_t *s) { return (float)((double)(mix(s) >> 11) * 0x1p-53 * 2.0 - 1.0); }
static int irand(uint64_t *s, int lo, int hi) { return lo + (int)(mix(s) % (uint64_t)(hi - lo + 1)); }

typedef struct {
    int gemv;            /* 0: sgemm; 1: sgemv (M, N as stored; tb, K unused) */
    int ta, tb, M, N, K; /* sgemm: C (M, N) = op(A) (M, K) op(B) (K, N) */
    int pa, pb, pc;      /* leading-dimension padding */
    float alpha, beta;
    int scaled;          /* scale A's rows and B's columns over 2^-6..2^6 */
} check_case;

enum { GUARD = 16 };                   /* sentinel floats before and after C / y */
static const uint32_t SENTINEL = 0x7fa5a5a5u; /* a NaN payload no kernel produces */

typedef struct {
    moe_blas_check_result *r;
    moe_blas_sgemm_fn gemm;
    moe_blas_sgemv_fn gemv;
    const moe_blas_check_opts *o;
    uint64_t rng;
} checker;

static void describe(char *buf, size_t n, const check_case *c, int threads)
{
    if (c->gemv)
        snprintf(buf, n, "sgemv %s M=%d N=%d alpha=%g beta=%g lda+%d, %d thread%s", c->ta ? "T" : "N", c->M,
                 c->N, c->alpha, c->beta, c->pa, threads, threads > 1 ? "s" : "");
    else
        snprintf(buf, n, "sgemm %s%s M=%d N=%d K=%d alpha=%g beta=%g ld+%d/%d/%d, %d thread%s", c->ta ? "T" : "N",
                 c->tb ? "T" : "N", c->M, c->N, c->K, c->alpha, c->beta, c->pa, c->pb, c->pc, threads,
                 threads > 1 ? "s" : "");
}

static void fail_case(checker *ck, const check_case *c, int threads, const char *detail)
{
    ck->r->failures++;
    if (ck->r->first_failure[0]) return;
    char what[144];
    describe(what, sizeof what, c, threads);
    snprintf(ck->r->first_failure, sizeof ck->r->first_failure, "%s: %s", what, detail);
}

static int same_bits(const float *p, uint32_t bits)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v == bits;
}

/* Runs one case at every thread count of the options. */
static moe_status run_case(checker *ck, const check_case *c)
{
    /* As a GEMM: sgemv is C (rows, 1) = op(A) x with x as a (K, 1) B. */
    const int ta = c->ta, tb = c->gemv ? 0 : c->tb;
    const int M = c->gemv ? (c->ta ? c->N : c->M) : c->M;
    const int N = c->gemv ? 1 : c->N;
    const int K = c->gemv ? (c->ta ? c->M : c->N) : c->K;
    const int a_rows = c->gemv ? c->M : (ta ? K : M), a_cols = c->gemv ? c->N : (ta ? M : K);
    const int b_rows = tb ? N : K, b_cols = tb ? K : N;
    const int lda = (a_cols > 1 ? a_cols : 1) + c->pa;
    const int ldb = c->gemv ? 1 : (b_cols > 1 ? b_cols : 1) + c->pb;
    const int ldc = c->gemv ? 1 : (N > 1 ? N : 1) + c->pc;
    const size_t na = (size_t)a_rows * lda, nb = (size_t)b_rows * ldb, nc = (size_t)M * ldc;
    float *A = moe_calloc(2 * na + 2 * nb + 2 * (nc + 2 * GUARD) + 1, sizeof(float));
    double *ref = moe_calloc(2 * (size_t)M * N + 1, sizeof(double));
    if (!A || !ref) {
        moe_free(A);
        moe_free(ref);
        return moe_errorf(MOE_ERR_NOMEM, "BLAS check: %zu floats for a %dx%dx%d case", 2 * (na + nb + nc),
                          M, N, K);
    }
    float *A0 = A + na, *B = A0 + na, *B0 = B + nb, *Cbuf = B0 + nb, *C0 = Cbuf + nc + 2 * GUARD;
    float *C = Cbuf + GUARD;
    double *mag = ref + (size_t)M * N;
    for (size_t i = 0; i < na; i++) A[i] = unif(&ck->rng);
    for (size_t i = 0; i < nb; i++) B[i] = unif(&ck->rng);
    if (c->scaled) {
        for (int i = 0; i < a_rows; i++)
            for (int k = 0; k < a_cols; k++) A[(size_t)i * lda + k] *= ldexpf(1.0f, (ta ? k : i) % 13 - 6);
        for (int i = 0; i < b_rows; i++)
            for (int k = 0; k < b_cols; k++) B[(size_t)i * ldb + k] *= ldexpf(1.0f, (tb ? i : k) % 11 - 5);
    }
    memcpy(A0, A, na * sizeof *A);
    memcpy(B0, B, nb * sizeof *B);
    for (size_t i = 0; i < nc + 2 * GUARD; i++) memcpy(&C0[i], &SENTINEL, sizeof SENTINEL);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) C0[GUARD + (size_t)i * ldc + j] = unif(&ck->rng);
    moe_blas_sgemm_ref(ref, mag, ta, tb, M, N, K, c->alpha, A, lda, B, ldb, c->beta, C0 + GUARD, ldc);
    const double factor = moe_blas_bound_factor(K);

    for (int ti = 0; ti < ck->o->n_threads; ti++) {
        const int threads = ck->o->threads[ti];
        openblas_set_num_threads(threads);
        memcpy(Cbuf, C0, (nc + 2 * GUARD) * sizeof *C0);
        if (c->gemv)
            ck->gemv(c->ta, c->M, c->N, c->alpha, A, lda, B, c->beta, C);
        else
            ck->gemm(ta, tb, M, N, K, c->alpha, A, lda, B, ldb, c->beta, C, ldc);
        ck->r->cases++;
        int bad = 0;
        double worst = 0;
        for (int i = 0; i < M && !bad; i++)
            for (int j = 0; j < N; j++) {
                const double v = C[(size_t)i * ldc + j], want = ref[(size_t)i * N + j];
                const double bound = factor * mag[(size_t)i * N + j], err = fabs(v - want);
                const double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0);
                if (ratio > worst || !isfinite(v)) worst = isfinite(v) ? ratio : INFINITY;
                if (!isfinite(v) || !(ratio <= 1)) {
                    char d[100];
                    if (isfinite(v))
                        snprintf(d, sizeof d, "element (%d, %d) off the float64 reference by %.3g x the bound", i,
                                 j, ratio);
                    else
                        snprintf(d, sizeof d, "element (%d, %d) is %g", i, j, v);
                    fail_case(ck, c, threads, d);
                    bad = 1;
                    break;
                }
            }
        for (size_t i = 0; i < nc + 2 * GUARD && !bad; i++) {
            const size_t in = i - GUARD; /* wraps for the leading guard: never inside C */
            const int inside = i >= GUARD && in < nc && (int)(in % (size_t)ldc) < N;
            if (!inside && !same_bits(&Cbuf[i], SENTINEL)) {
                char d[96];
                snprintf(d, sizeof d, "wrote outside C (float %ld from its start, padded block %zu floats)",
                         (long)i - GUARD, nc);
                fail_case(ck, c, threads, d);
                bad = 1;
                worst = INFINITY;
            }
        }
        if (!bad && (memcmp(A, A0, na * sizeof *A) || memcmp(B, B0, nb * sizeof *B))) {
            fail_case(ck, c, threads, "changed an input operand");
            worst = INFINITY;
        }
        if (worst > ck->r->worst_ratio) {
            ck->r->worst_ratio = worst;
            describe(ck->r->worst_case, sizeof ck->r->worst_case, c, threads);
        }
    }
    moe_free(A);
    moe_free(ref);
    return MOE_OK;
}

static const int EDGE[] = {1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129};
enum { N_EDGE = sizeof EDGE / sizeof EDGE[0] };
/* alpha/beta as moerun calls sgemm (1/0, 1/1, the attention scale 1/sqrt(hs)
 * with 0) and a general pair */
static const float AB[][2] = {{1, 0}, {1, 1}, {0.17677669f, 0}, {0.125f, 0}, {-0.7f, 0.3f}};
enum { N_AB = sizeof AB / sizeof AB[0] };
static const int PAD[] = {0, 1, 7};

moe_status moe_blas_check(moe_blas_check_result *r, moe_blas_sgemm_fn gemm, moe_blas_sgemv_fn gemv,
                          const moe_blas_check_opts *o)
{
    checker ck = {.r = r, .gemm = gemm, .gemv = gemv, .o = o, .rng = 0x5eed0000ULL + o->seed};
    if (o->n_threads < 1 || o->n_threads > 4)
        return moe_errorf(MOE_ERR_ARG, "BLAS check: 1 to 4 thread counts, got %d", o->n_threads);
    const int saved = openblas_get_num_threads();
    moe_status st = MOE_OK;
    if (gemm) {
        /* every transposition pair over the edge sizes, K varying with (M, N) */
        for (int t = 0; t < 4 && !st; t++)
            for (int i = 0; i < N_EDGE && !st; i++)
                for (int j = 0; j < N_EDGE && !st; j++) {
                    const float *ab = AB[(i + j + t) % N_AB];
                    check_case c = {.ta = t >> 1, .tb = t & 1, .M = EDGE[i], .N = EDGE[j],
                                    .K = EDGE[(5 * i + 3 * j + 7 * t) % N_EDGE], .pa = PAD[(i + 2 * j) % 3],
                                    .pb = PAD[(2 * i + j + t) % 3], .pc = PAD[(i + j + t) % 3],
                                    .alpha = ab[0], .beta = ab[1]};
                    st = run_case(&ck, &c);
                }
        /* K = 0 (C = beta C) and empty C (nothing written) */
        for (int t = 0; t < 4 && !st; t++) {
            check_case c = {.ta = t >> 1, .tb = t & 1, .M = 7, .N = 5, .K = 0, .pc = 3, .alpha = 1, .beta = 0.5f};
            st = run_case(&ck, &c);
            check_case e = {.ta = t >> 1, .tb = t & 1, .M = t & 1 ? 0 : 9, .N = t & 1 ? 9 : 0, .K = 8,
                            .alpha = 1, .beta = 1};
            if (!st) st = run_case(&ck, &e);
        }
        /* random shapes, half with operands spanning 2^-11..2^12 */
        for (int n = 0; n < (o->quick ? 24 : 48) && !st; n++) {
            check_case c = {.ta = irand(&ck.rng, 0, 1), .tb = irand(&ck.rng, 0, 1), .M = irand(&ck.rng, 1, 300),
                            .N = irand(&ck.rng, 1, 300), .K = irand(&ck.rng, 1, 300), .pa = irand(&ck.rng, 0, 9),
                            .pb = irand(&ck.rng, 0, 9), .pc = irand(&ck.rng, 0, 9), .scaled = n & 1};
            const int k = irand(&ck.rng, 0, N_AB);
            c.alpha = k < N_AB ? AB[k][0] : 2 * unif(&ck.rng);
            c.beta = k < N_AB ? AB[k][1] : unif(&ck.rng);
            st = run_case(&ck, &c);
        }
        /* large: several K blocks and M/N panels of the blocked kernels, and
         * big enough for OpenBLAS to split them over threads */
        static const check_case LARGE[] = {
            {.ta = 0, .tb = 0, .M = 600, .N = 520, .K = 700, .pc = 3, .alpha = 1, .beta = 1},
            {.ta = 0, .tb = 1, .M = 1030, .N = 257, .K = 513, .pa = 5, .alpha = 1, .beta = 0},
            {.ta = 1, .tb = 0, .M = 257, .N = 1030, .K = 1100, .pb = 2, .alpha = 1, .beta = 1},
            {.ta = 1, .tb = 1, .M = 512, .N = 512, .K = 512, .alpha = -0.7f, .beta = 0.3f, .scaled = 1},
        };
        for (size_t n = 0; n < sizeof LARGE / sizeof LARGE[0] && !o->quick && !st; n++) st = run_case(&ck, &LARGE[n]);
    }
    if (gemv) {
        for (int t = 0; t < 2 && !st; t++)
            for (int i = 0; i < N_EDGE && !st; i++)
                for (int j = 0; j < N_EDGE && !st; j++) {
                    const float *ab = AB[(i + j + t) % N_AB];
                    check_case c = {.gemv = 1, .ta = t, .M = EDGE[i], .N = EDGE[j], .pa = PAD[(i + 2 * j + t) % 3],
                                    .alpha = ab[0], .beta = ab[1]};
                    st = run_case(&ck, &c);
                }
        static const check_case GV[] = {
            {.gemv = 1, .ta = 0, .M = 1000, .N = 700, .pa = 3, .alpha = 1, .beta = 0},
            {.gemv = 1, .ta = 1, .M = 1000, .N = 700, .pa = 1, .alpha = 0.125f, .beta = 1, .scaled = 1},
            {.gemv = 1, .ta = 0, .M = 256, .N = 64, .pa = 704, .alpha = 0.125f, .beta = 0}, /* decode: K rows */
            {.gemv = 1, .ta = 1, .M = 256, .N = 64, .pa = 704, .alpha = 1, .beta = 0},      /* decode: V rows */
        };
        for (size_t n = 0; n < sizeof GV / sizeof GV[0] && !st; n++) st = run_case(&ck, &GV[n]);
    }
    openblas_set_num_threads(saved);
    return st;
}

/* ---- timed shapes ---- */

static const moe_blas_shape SHAPES[] = {
    {"expert_d128_F512_M128", "expert FFN fwd+bwd, small model (E=8 k=2, 512 tokens)", MOE_BLAS_EXPERT, 128, 128, 512, 1, 1},
    {"expert_d128_F512_M512", "expert FFN fwd+bwd, small model (E=8 k=2, 2048 tokens)", MOE_BLAS_EXPERT, 512, 128, 512, 1, 0},
    {"expert_d256_F1024_M16", "expert FFN fwd+bwd, decoding batch 16", MOE_BLAS_EXPERT, 16, 256, 1024, 1, 1},
    {"expert_d256_F1024_M1024", "expert FFN fwd+bwd, moe bench layer default (T 4096, E=8 k=2)", MOE_BLAS_EXPERT, 1024, 256, 1024, 1, 1},
    {"expert_d512_F1024_M512", "expert FFN fwd+bwd, d 512", MOE_BLAS_EXPERT, 512, 512, 1024, 1, 0},
    {"ffn_d128_F512_M2048", "dense FFN fwd+bwd, small model (16 x 128 tokens)", MOE_BLAS_EXPERT, 2048, 128, 512, 1, 0},
    {"ffn_d256_F1024_M2048", "dense FFN fwd+bwd, medium model (8 x 256 tokens)", MOE_BLAS_EXPERT, 2048, 256, 1024, 1, 0},
    {"ffn_d128_F512_M4096", "dense FFN fwd+bwd, 4096 rows", MOE_BLAS_EXPERT, 4096, 128, 512, 1, 0},
    {"qkv_d128_N2048", "QKV projection fwd+bwd, small model", MOE_BLAS_LINEAR, 2048, 128, 384, 1, 0},
    {"qkv_d256_N2048", "QKV projection fwd+bwd, medium model", MOE_BLAS_LINEAR, 2048, 256, 768, 1, 1},
    {"attn_T128_hs32", "causal attention fwd+bwd, one head, small model", MOE_BLAS_ATTN, 128, 32, 4, 0, 1},
    {"attn_T256_hs64", "causal attention fwd+bwd, one head, medium model", MOE_BLAS_ATTN, 256, 64, 4, 0, 0},
    {"logits_d128_N2048", "tied logits fwd+bwd (V 256), small model", MOE_BLAS_LINEAR, 2048, 128, 256, 1, 0},
    {"logits_d256_N2048", "tied logits fwd+bwd (V 256), medium model", MOE_BLAS_LINEAR, 2048, 256, 256, 1, 1},
};

const moe_blas_shape *moe_blas_shapes(int *n)
{
    *n = (int)(sizeof SHAPES / sizeof SHAPES[0]);
    return SHAPES;
}

static void put(moe_blas_gemm_op *ops, int max, int *n, moe_blas_gemm_op op)
{
    if (*n < max) ops[*n] = op;
    (*n)++;
}

int moe_blas_shape_ops(const moe_blas_shape *s, moe_blas_gemm_op *ops, int max)
{
    int n = 0;
    if (s->kind == MOE_BLAS_EXPERT) { /* experts.c: forward, then backward */
        const int M = s->a, d = s->b, F = s->c;
        put(ops, max, &n, (moe_blas_gemm_op){0, 1, M, F, d, 0, 0, 0, 1, 1}); /* h = x W1^T + b1 */
        put(ops, max, &n, (moe_blas_gemm_op){0, 1, M, d, F, 0, 0, 0, 1, 1}); /* y = a W2^T + b2 */
        put(ops, max, &n, (moe_blas_gemm_op){1, 0, d, F, M, 0, 0, 0, 1, 1}); /* gW2 += dy^T a */
        put(ops, max, &n, (moe_blas_gemm_op){0, 0, M, F, d, 0, 0, 0, 1, 0}); /* da = dy W2 */
        put(ops, max, &n, (moe_blas_gemm_op){1, 0, F, d, M, 0, 0, 0, 1, 1}); /* gW1 += dh^T x */
        put(ops, max, &n, (moe_blas_gemm_op){0, 0, M, d, F, 0, 0, 0, 1, 0}); /* dx = dh W1 */
    } else if (s->kind == MOE_BLAS_LINEAR) { /* model/ops.c matmul */
        const int N = s->a, C = s->b, OC = s->c;
        put(ops, max, &n, (moe_blas_gemm_op){0, 1, N, OC, C, 0, 0, 0, 1, 1});
        put(ops, max, &n, (moe_blas_gemm_op){0, 0, N, C, OC, 0, 0, 0, 1, 1});
        put(ops, max, &n, (moe_blas_gemm_op){1, 0, OC, C, N, 0, 0, 0, 1, 1});
    } else { /* model/ops.c attention of one (sequence, head) pair, 32-row blocks */
        const int T = s->a, hs = s->b, C = hs * s->c, C3 = 3 * C;
        const float scale = 1.0f / sqrtf((float)hs);
        for (int r0 = 0; r0 < T; r0 += 32) {
            const int r1 = r0 + 32 < T ? r0 + 32 : T, m = r1 - r0;
            put(ops, max, &n, (moe_blas_gemm_op){0, 1, m, r1, hs, C3, C3, T, scale, 0}); /* S = q k^T */
            put(ops, max, &n, (moe_blas_gemm_op){0, 0, m, hs, r1, T, C3, C, 1, 0});      /* o = P v */
        }
        for (int r0 = 0; r0 < T; r0 += 32) {
            const int r1 = r0 + 32 < T ? r0 + 32 : T, m = r1 - r0;
            put(ops, max, &n, (moe_blas_gemm_op){0, 1, m, r1, hs, C, C3, T, 1, 0});  /* dP = dO v^T */
            put(ops, max, &n, (moe_blas_gemm_op){1, 0, r1, hs, m, T, C, C3, 1, 1});  /* dv += P^T dO */
            put(ops, max, &n, (moe_blas_gemm_op){0, 0, m, hs, r1, T, C3, C3, 1, 1}); /* dq += dS k */
            put(ops, max, &n, (moe_blas_gemm_op){1, 0, r1, hs, m, T, C3, C3, 1, 1}); /* dk += dS^T q */
        }
    }
    return n;
}

double moe_blas_shape_flops(const moe_blas_shape *s)
{
    const int n = moe_blas_shape_ops(s, NULL, 0);
    moe_blas_gemm_op *ops = malloc((size_t)n * sizeof *ops);
    if (!ops) return NAN;
    moe_blas_shape_ops(s, ops, n);
    double f = 0;
    for (int i = 0; i < n; i++) f += 2.0 * ops[i].M * ops[i].N * ops[i].K;
    free(ops);
    return f;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Leading dimension of an op's operand: its own, else the natural one. */
static int ld_of(int ld, int cols) { return ld > 0 ? ld : cols; }

moe_status moe_blas_time_shape(double *gflops, const moe_blas_shape *s, moe_blas_sgemm_fn gemm, int threads,
                               double sample_s, int samples)
{
    *gflops = NAN;
    const int n = moe_blas_shape_ops(s, NULL, 0);
    if (samples < 1 || samples > 64) return moe_errorf(MOE_ERR_ARG, "BLAS timing: 1 to 64 samples, got %d", samples);
    moe_blas_gemm_op *ops = malloc((size_t)n * sizeof *ops);
    if (!ops) return moe_errorf(MOE_ERR_NOMEM, "BLAS timing: %d ops", n);
    moe_blas_shape_ops(s, ops, n);
    /* One A, B and C buffer each, as large as the largest operand. */
    size_t na = 1, nb = 1, nc = 1;
    for (int i = 0; i < n; i++) {
        moe_blas_gemm_op *p = &ops[i];
        p->lda = ld_of(p->lda, p->ta ? p->M : p->K);
        p->ldb = ld_of(p->ldb, p->tb ? p->K : p->N);
        p->ldc = ld_of(p->ldc, p->N);
        const size_t a = (size_t)(p->ta ? p->K : p->M) * p->lda, b = (size_t)(p->tb ? p->N : p->K) * p->ldb;
        const size_t c = (size_t)p->M * p->ldc;
        na = a > na ? a : na;
        nb = b > nb ? b : nb;
        nc = c > nc ? c : nc;
    }
    float *A = moe_calloc(na + nb + nc, sizeof(float));
    if (!A) {
        free(ops);
        return moe_errorf(MOE_ERR_NOMEM, "BLAS timing: %zu floats for %s", na + nb + nc, s->name);
    }
    float *B = A + na, *C = B + nb;
    uint64_t rng = 42;
    for (size_t i = 0; i < na + nb + nc; i++) A[i] = 0.1f * unif(&rng); /* small: beta 1 sums stay finite */
    const int saved = openblas_get_num_threads();
    openblas_set_num_threads(threads);
#define RUN_ONCE()                                                                                                    \
    for (int i = 0; i < n; i++)                                                                                       \
    gemm(ops[i].ta, ops[i].tb, ops[i].M, ops[i].N, ops[i].K, ops[i].alpha, A, ops[i].lda, B, ops[i].ldb, ops[i].beta, \
         C, ops[i].ldc)
    RUN_ONCE(); /* warm-up: page faults, OpenBLAS buffers and threads */
    const double t1 = moe_now();
    RUN_ONCE();
    const double once = moe_now() - t1;
    const int reps = once >= sample_s ? 1 : (int)ceil(sample_s / (once > 1e-7 ? once : 1e-7));
    double t[64];
    for (int k = 0; k < samples; k++) {
        const double a = moe_now();
        for (int r = 0; r < reps; r++) RUN_ONCE();
        t[k] = (moe_now() - a) / reps;
    }
#undef RUN_ONCE
    openblas_set_num_threads(saved);
    double flops = 0;
    for (int i = 0; i < n; i++) flops += 2.0 * ops[i].M * ops[i].N * ops[i].K;
    *gflops = flops / median(t, samples) / 1e9;
    moe_free(A);
    free(ops);
    return MOE_OK;
}
