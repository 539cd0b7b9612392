/* Dense model layers: the GEMM, RMSNorm, RoPE and (grouped-query) attention
 * kernels against their naive references, and
 * layernorm, RMSNorm, attention and cross-entropy backward against central finite
 * differences of L = sum(out * R) with double accumulation. A dropped term
 * in any backward gives a relative error of order 0.1..1, far above the
 * 2e-3 tolerance; float round-off of the differences stays below ~1e-4. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <cmocka.h>

#include "core/moe.h"
#include "core/par.h"
#include "core/rng.h"
#include "model/ops.h"

static void fill(float *a, size_t n, uint32_t id, float scale)
{
    for (size_t i = 0; i < n; i++)
        a[i] = scale * (float)moe_rng_normal(7, MOE_RNG_BENCH, (uint32_t)i, 0, id, 0);
}

/* ||a - b|| / ||b|| */
static double rel_err(const float *a, const float *b, size_t n)
{
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        s += (double)b[i] * b[i];
    }
    return sqrt(d / (s > 0 ? s : 1e-300));
}

static double dot(const float *a, const float *r, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * r[i];
    return s;
}

/* Central differences of f (a closure computing L at the current inputs) with
 * respect to the n entries of x, into fd. */
typedef double (*loss_fn)(void *ctx);
static void finite_diff(float *fd, float *x, size_t n, float h, loss_fn f, void *ctx)
{
    for (size_t i = 0; i < n; i++) {
        const float x0 = x[i];
        x[i] = x0 + h;
        const double lp = f(ctx);
        x[i] = x0 - h;
        const double lm = f(ctx);
        x[i] = x0;
        fd[i] = (float)((lp - lm) / (2.0 * h));
    }
}

static void test_matmul_matches_ref(void **state)
{
    (void)state;
    enum { N = 37, C = 19, OC = 23 };
    float inp[N * C], w[OC * C], b[OC], dout[N * OC];
    float o1[N * OC], o2[N * OC];
    float di1[N * C] = {0}, di2[N * C] = {0}, dw1[OC * C] = {0}, dw2[OC * C] = {0}, db1[OC] = {0},
          db2[OC] = {0};
    fill(inp, N * C, 1, 1.0f);
    fill(w, OC * C, 2, 0.5f);
    fill(b, OC, 3, 1.0f);
    fill(dout, N * OC, 4, 1.0f);
    moe_model_matmul_forward(o1, inp, w, b, N, C, OC);
    moe_model_matmul_forward_ref(o2, inp, w, b, N, C, OC);
    assert_true(rel_err(o1, o2, N * OC) < 1e-6);
    moe_model_matmul_forward(o1, inp, w, NULL, N, C, OC);
    moe_model_matmul_forward_ref(o2, inp, w, NULL, N, C, OC);
    assert_true(rel_err(o1, o2, N * OC) < 1e-6);
    /* accumulation: run twice, the result is twice one pass */
    for (int rep = 0; rep < 2; rep++) {
        moe_model_matmul_backward(di1, dw1, db1, dout, inp, w, N, C, OC);
        moe_model_matmul_backward_ref(di2, dw2, db2, dout, inp, w, N, C, OC);
    }
    assert_true(rel_err(di1, di2, N * C) < 1e-6);
    assert_true(rel_err(dw1, dw2, OC * C) < 1e-6);
    assert_true(rel_err(db1, db2, OC) < 1e-6);
    float one[N * C] = {0};
    moe_model_matmul_backward_ref(one, dw2, NULL, dout, inp, w, N, C, OC);
    for (int i = 0; i < N * C; i++) one[i] *= 2.0f;
    assert_true(rel_err(di2, one, N * C) < 1e-6);
}

/* ---- layernorm ---- */
enum { LN_N = 5, LN_C = 12 };
typedef struct {
    float x[LN_N * LN_C], w[LN_C], b[LN_C], r[LN_N * LN_C];
} ln_ctx;

static double ln_loss(void *vctx)
{
    ln_ctx *c = vctx;
    float out[LN_N * LN_C], mean[LN_N], rstd[LN_N];
    moe_model_layernorm_forward(out, mean, rstd, c->x, c->w, c->b, LN_N, LN_C, 1e-5f);
    return dot(out, c->r, LN_N * LN_C);
}

static void test_layernorm_fd(void **state)
{
    (void)state;
    ln_ctx c;
    fill(c.x, LN_N * LN_C, 10, 1.0f);
    for (int i = 0; i < LN_N * LN_C; i++) c.x[i] += 3.0f; /* a non-zero mean must be handled */
    fill(c.w, LN_C, 11, 1.0f);
    fill(c.b, LN_C, 12, 1.0f);
    fill(c.r, LN_N * LN_C, 13, 1.0f);
    float out[LN_N * LN_C], mean[LN_N], rstd[LN_N];
    float dx[LN_N * LN_C] = {0}, dw[LN_C] = {0}, db[LN_C] = {0};
    moe_model_layernorm_forward(out, mean, rstd, c.x, c.w, c.b, LN_N, LN_C, 1e-5f);
    moe_model_layernorm_backward(dx, dw, db, c.r, c.x, c.w, mean, rstd, LN_N, LN_C);
    float fx[LN_N * LN_C], fw[LN_C], fb[LN_C];
    finite_diff(fx, c.x, LN_N * LN_C, 1e-2f, ln_loss, &c);
    finite_diff(fw, c.w, LN_C, 1e-2f, ln_loss, &c);
    finite_diff(fb, c.b, LN_C, 1e-2f, ln_loss, &c);
    assert_true(rel_err(dx, fx, LN_N * LN_C) < 2e-3);
    assert_true(rel_err(dw, fw, LN_C) < 2e-3);
    assert_true(rel_err(db, fb, LN_C) < 2e-3);
}

/* The threaded passes (rows split for outputs, columns for dweight/dbias and
 * bias gradients) give the same bits on 1, 2 and 3 threads, at sizes above
 * the threading threshold and with C not a multiple of the 16-float blocks. */
static void test_threads_bitwise(void **state)
{
    (void)state;
    enum { N = 700, C = 200, V = 256 };
    static float x[N * C], w[C], b[C], dy[N * C], out[2][N * C], mean[2][N], rstd[2][N];
    static float dx[2][N * C], dw[2][C], db[2][C], res[2][N * C];
    static float logits[N * V], probs[2][N * V], losses[2][N], dl[2][N * V];
    static float inp[N * C], wt[V * C], dinp[2][N * C], dwt[2][V * C], dbias[2][V];
    int32_t tg[N];
    fill(x, N * C, 60, 1.0f);
    fill(w, C, 61, 1.0f);
    fill(b, C, 62, 1.0f);
    fill(dy, N * C, 63, 1.0f);
    fill(logits, N * V, 64, 3.0f);
    fill(inp, N * C, 65, 1.0f);
    fill(wt, V * C, 66, 0.1f);
    for (int i = 0; i < N; i++) tg[i] = i * 37 % V;
    const int threads0 = openblas_get_num_threads();
    for (int nt = 1; nt <= 3; nt++) {
        const int k = nt > 1;
        openblas_set_num_threads(nt);
        memset(dx[k], 0, sizeof dx[k]);
        memset(dw[k], 0, sizeof dw[k]);
        memset(db[k], 0, sizeof db[k]);
        memset(dl[k], 0, sizeof dl[k]);
        memset(dinp[k], 0, sizeof dinp[k]);
        memset(dwt[k], 0, sizeof dwt[k]);
        memset(dbias[k], 0, sizeof dbias[k]);
        moe_model_layernorm_forward(out[k], mean[k], rstd[k], x, w, b, N, C, 1e-5f);
        moe_model_layernorm_backward(dx[k], dw[k], db[k], dy, x, w, mean[k], rstd[k], N, C);
        /* RMSNorm into the (otherwise unused here) res/db buffers' twins: rows and columns split alike */
        static float rout[2][N * C], rr[2][N], rdx[2][N * C], rdw[2][C];
        memset(rdx[k], 0, sizeof rdx[k]);
        memset(rdw[k], 0, sizeof rdw[k]);
        moe_model_rmsnorm_forward(rout[k], rr[k], x, w, N, 1, C, C, 1e-5f);
        moe_model_rmsnorm_backward(rdx[k], rdw[k], dy, x, w, rr[k], N, 1, C, C);
        if (k) {
            assert_memory_equal(rout[0], rout[1], sizeof rout[0]);
            assert_memory_equal(rdx[0], rdx[1], sizeof rdx[0]);
            assert_memory_equal(rdw[0], rdw[1], sizeof rdw[0]);
        }
        moe_model_residual_forward(res[k], x, dy, (long)N * C);
        moe_model_crossentropy_forward(losses[k], probs[k], logits, tg, N, V);
        moe_model_crossentropy_backward(dl[k], probs[k], tg, 0.5f, N, V);
        moe_model_matmul_backward(dinp[k], dwt[k], dbias[k], dl[k], inp, wt, N, C, V);
        if (!k) continue;
        assert_memory_equal(out[0], out[1], sizeof out[0]);
        assert_memory_equal(mean[0], mean[1], sizeof mean[0]);
        assert_memory_equal(rstd[0], rstd[1], sizeof rstd[0]);
        assert_memory_equal(dx[0], dx[1], sizeof dx[0]);
        assert_memory_equal(dw[0], dw[1], sizeof dw[0]);
        assert_memory_equal(db[0], db[1], sizeof db[0]);
        assert_memory_equal(res[0], res[1], sizeof res[0]);
        assert_memory_equal(losses[0], losses[1], sizeof losses[0]);
        assert_memory_equal(probs[0], probs[1], sizeof probs[0]);
        assert_memory_equal(dl[0], dl[1], sizeof dl[0]);
        assert_memory_equal(dbias[0], dbias[1], sizeof dbias[0]);
    }
    openblas_set_num_threads(threads0);
    /* and the threaded layernorm backward still matches its definition:
     * dbias = column sums of dy */
    for (int c = 0; c < C; c++) {
        double s = 0;
        for (int n = 0; n < N; n++) s += dy[(size_t)n * C + c];
        assert_true(fabs(s - db[1][c]) < 1e-3 * (1 + fabs(s)));
    }
}

/* ---- attention ---- */
enum { AB = 2, AT = 6, AC = 8, ANH = 2 };
typedef struct {
    float qkv[AB * AT * 3 * AC], r[AB * AT * AC];
    int ref;
} att_ctx;

static double att_loss(void *vctx)
{
    att_ctx *c = vctx;
    float out[AB * AT * AC], att[AB * ANH * AT * AT];
    if (c->ref) moe_model_attention_forward_ref(out, att, c->qkv, AB, AT, ANH, ANH, AC / ANH);
    else moe_model_attention_forward(out, att, c->qkv, AB, AT, ANH, ANH, AC / ANH);
    return dot(out, c->r, AB * AT * AC);
}

static void test_attention(void **state)
{
    (void)state;
    att_ctx c = {.ref = 0};
    fill(c.qkv, AB * AT * 3 * AC, 20, 1.0f);
    fill(c.r, AB * AT * AC, 21, 1.0f);
    float o1[AB * AT * AC], o2[AB * AT * AC], a1[AB * ANH * AT * AT], a2[AB * ANH * AT * AT];
    moe_model_attention_forward(o1, a1, c.qkv, AB, AT, ANH, ANH, AC / ANH);
    moe_model_attention_forward_ref(o2, a2, c.qkv, AB, AT, ANH, ANH, AC / ANH);
    assert_true(rel_err(o1, o2, AB * AT * AC) < 1e-5);
    assert_true(rel_err(a1, a2, AB * ANH * AT * AT) < 1e-5);
    /* causal: probabilities above the diagonal are exactly 0, rows sum to 1 */
    for (int r = 0; r < AB * ANH * AT; r++) {
        const int t = r % AT;
        double s = 0;
        for (int j = 0; j < AT; j++) {
            if (j > t) assert_true(a1[r * AT + j] == 0.0f);
            s += a1[r * AT + j];
        }
        assert_true(fabs(s - 1.0) < 1e-5);
    }
    float d1[AB * AT * 3 * AC] = {0}, d2[AB * AT * 3 * AC] = {0}, scratch[MOE_PAR_MAX_THREADS * AT * AT];
    moe_model_attention_backward(d1, scratch, MOE_PAR_MAX_THREADS, c.r, c.qkv, a1, AB, AT, ANH, ANH, AC / ANH);
    moe_model_attention_backward_ref(d2, scratch, c.r, c.qkv, a2, AB, AT, ANH, ANH, AC / ANH);
    assert_true(rel_err(d1, d2, AB * AT * 3 * AC) < 1e-5);
    float fd[AB * AT * 3 * AC];
    finite_diff(fd, c.qkv, AB * AT * 3 * AC, 1e-2f, att_loss, &c);
    assert_true(rel_err(d1, fd, AB * AT * 3 * AC) < 2e-3);
    c.ref = 1;
    finite_diff(fd, c.qkv, AB * AT * 3 * AC, 1e-2f, att_loss, &c);
    assert_true(rel_err(d2, fd, AB * AT * 3 * AC) < 2e-3);
    /* the future does not leak: out at t = 0 ignores k, v of t >= 1 */
    float d0[AB * AT * 3 * AC] = {0}, r0[AB * AT * AC] = {0};
    for (int i = 0; i < AC; i++) r0[i] = 1.0f; /* only (b = 0, t = 0) */
    moe_model_attention_backward(d0, scratch, MOE_PAR_MAX_THREADS, r0, c.qkv, a1, AB, AT, ANH, ANH, AC / ANH);
    for (int t = 1; t < AT; t++)
        for (int i = 0; i < 3 * AC; i++) assert_true(d0[t * 3 * AC + i] == 0.0f);
}

/* Sequences longer than the kernel's row block (32 queries), at lengths that
 * are and are not a multiple of it: the blocked GEMMs must cover every
 * (query, key <= query) pair exactly once, like the naive reference. */
static void test_attention_long(void **state)
{
    (void)state;
    enum { B = 2, C = 16, NH = 2, TMAX = 97 };
    static float qkv[B * TMAX * 3 * C], r[B * TMAX * C], o1[B * TMAX * C], o2[B * TMAX * C];
    static float a1[B * NH * TMAX * TMAX], a2[B * NH * TMAX * TMAX], scratch[MOE_PAR_MAX_THREADS * TMAX * TMAX];
    static float d1[B * TMAX * 3 * C], d2[B * TMAX * 3 * C];
    const int lengths[] = {31, 32, 33, 64, 97};
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        const int T = lengths[li];
        fill(qkv, (size_t)B * T * 3 * C, 40 + li, 1.0f);
        fill(r, (size_t)B * T * C, 50 + li, 1.0f);
        /* stale values where the kernel must write zeros */
        for (size_t i = 0; i < sizeof a1 / sizeof a1[0]; i++) a1[i] = 7.0f;
        moe_model_attention_forward(o1, a1, qkv, B, T, NH, NH, C / NH);
        moe_model_attention_forward_ref(o2, a2, qkv, B, T, NH, NH, C / NH);
        assert_true(rel_err(o1, o2, (size_t)B * T * C) < 1e-5);
        assert_true(rel_err(a1, a2, (size_t)B * NH * T * T) < 1e-5);
        for (int row = 0; row < B * NH * T; row++)
            for (int j = row % T + 1; j < T; j++) assert_true(a1[(size_t)row * T + j] == 0.0f);
        memset(d1, 0, sizeof d1);
        memset(d2, 0, sizeof d2);
        moe_model_attention_backward(d1, scratch, MOE_PAR_MAX_THREADS, r, qkv, a1, B, T, NH, NH, C / NH);
        moe_model_attention_backward_ref(d2, scratch, r, qkv, a2, B, T, NH, NH, C / NH);
        assert_true(rel_err(d1, d2, (size_t)B * T * 3 * C) < 1e-5);
        /* the (sequence, head) pairs split over 1, 2 and 3 threads: bitwise the same */
        const int threads0 = openblas_get_num_threads();
        for (int nt = 1; nt <= 3; nt++) {
            openblas_set_num_threads(nt);
            memset(d2, 0, sizeof d2);
            moe_model_attention_forward(o2, a2, qkv, B, T, NH, NH, C / NH);
            moe_model_attention_backward(d2, scratch, MOE_PAR_MAX_THREADS, r, qkv, a2, B, T, NH, NH, C / NH);
            assert_memory_equal(o1, o2, (size_t)B * T * C * sizeof(float));
            assert_memory_equal(d1, d2, (size_t)B * T * 3 * C * sizeof(float));
        }
        openblas_set_num_threads(threads0);
    }
}

/* ---- RMSNorm (the model's norms, and the q/k norms inside c_attn rows) ---- */
enum { RN = 5, RG = 3, RC = 12, RSTRIDE = 2 * RG * RC + 7 };
typedef struct {
    float x[RN * RSTRIDE], w[RC], r[RN * RSTRIDE];
    int G, ref;
} rms_ctx;

/* L = sum(out * r) over the groups only (the rest of each row is not the norm's) */
static double rms_loss(void *vctx)
{
    rms_ctx *c = vctx;
    float out[RN * RSTRIDE] = {0}, rstd[RN * RG];
    if (c->ref) moe_model_rmsnorm_forward_ref(out, rstd, c->x, c->w, RN, c->G, RC, RSTRIDE, 1e-5f);
    else moe_model_rmsnorm_forward(out, rstd, c->x, c->w, RN, c->G, RC, RSTRIDE, 1e-5f);
    return dot(out, c->r, RN * RSTRIDE);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    for (int G = 1; G <= RG; G += RG - 1) { /* one group per row, and RG heads of RC */
        rms_ctx c = {.G = G};
        fill(c.x, RN * RSTRIDE, 70, 1.0f);
        for (int i = 0; i < RN * RSTRIDE; i++) c.x[i] += 2.0f; /* RMSNorm does not subtract a mean */
        fill(c.w, RC, 71, 1.0f);
        fill(c.r, RN * RSTRIDE, 72, 1.0f);
        float o1[RN * RSTRIDE] = {0}, o2[RN * RSTRIDE] = {0}, r1[RN * RG], r2[RN * RG];
        moe_model_rmsnorm_forward(o1, r1, c.x, c.w, RN, G, RC, RSTRIDE, 1e-5f);
        moe_model_rmsnorm_forward_ref(o2, r2, c.x, c.w, RN, G, RC, RSTRIDE, 1e-5f);
        assert_true(rel_err(o1, o2, RN * RSTRIDE) < 1e-6);
        assert_true(rel_err(r1, r2, (size_t)RN * G) < 1e-6);
        /* the definition: row 2, group G-1 = x / rms(x) * w */
        const float *x = c.x + 2 * RSTRIDE + (G - 1) * RC;
        double ss = 0;
        for (int i = 0; i < RC; i++) ss += (double)x[i] * x[i];
        for (int i = 0; i < RC; i++)
            assert_true(fabs(o1[2 * RSTRIDE + (G - 1) * RC + i] - x[i] / sqrt(ss / RC + 1e-5) * c.w[i]) < 1e-5);
        /* outside the groups nothing is written */
        for (int n = 0; n < RN; n++)
            for (int i = G * RC; i < RSTRIDE; i++) assert_true(o1[n * RSTRIDE + i] == 0.0f);
        float dx1[RN * RSTRIDE] = {0}, dx2[RN * RSTRIDE] = {0}, dw1[RC] = {0}, dw2[RC] = {0};
        moe_model_rmsnorm_backward(dx1, dw1, c.r, c.x, c.w, r1, RN, G, RC, RSTRIDE);
        moe_model_rmsnorm_backward_ref(dx2, dw2, c.r, c.x, c.w, r2, RN, G, RC, RSTRIDE);
        assert_true(rel_err(dx1, dx2, RN * RSTRIDE) < 1e-5);
        assert_true(rel_err(dw1, dw2, RC) < 1e-5);
        float fx[RN * RSTRIDE], fw[RC];
        for (int ref = 0; ref < 2; ref++) {
            c.ref = ref;
            finite_diff(fx, c.x, RN * RSTRIDE, 1e-2f, rms_loss, &c);
            finite_diff(fw, c.w, RC, 1e-2f, rms_loss, &c);
            assert_true(rel_err(ref ? dx2 : dx1, fx, RN * RSTRIDE) < 2e-3);
            assert_true(rel_err(ref ? dw2 : dw1, fw, RC) < 2e-3);
        }
    }
}

/* ---- rotary positions ---- */
static void test_rope(void **state)
{
    (void)state;
    enum { N = 10, T = 5, NH = 3, D = 8, STRIDE = NH * D + 4, HALF = D / 2 };
    const double theta = 500.0;
    float cs[T * HALF], sn[T * HALF], x[N * STRIDE], y1[N * STRIDE], y2[N * STRIDE];
    moe_model_rope_table(cs, sn, T, D, theta);
    fill(x, N * STRIDE, 80, 1.0f);
    memcpy(y1, x, sizeof x);
    memcpy(y2, x, sizeof x);
    moe_model_rope_forward(y1, cs, sn, NULL, N, T, NH, D, STRIDE);
    moe_model_rope_forward_ref(y2, NULL, N, T, NH, D, STRIDE, theta);
    assert_true(rel_err(y1, y2, N * STRIDE) < 1e-6);
    /* definition: row 7 (position 2), head 1, element 3 pairs with 3 + D/2 */
    const double ang = 2 * pow(theta, -2.0 * 3 / D);
    const float *a = x + 7 * STRIDE + D;
    assert_true(fabs(y1[7 * STRIDE + D + 3] - (a[3] * cos(ang) - a[3 + HALF] * sin(ang))) < 1e-5);
    assert_true(fabs(y1[7 * STRIDE + D + 3 + HALF] - (a[3 + HALF] * cos(ang) + a[3] * sin(ang))) < 1e-5);
    /* position 0 is the identity; the tail of each row is untouched */
    assert_memory_equal(y1, x, sizeof(float) * NH * D);
    for (int n = 0; n < N; n++) assert_memory_equal(y1 + n * STRIDE + NH * D, x + n * STRIDE + NH * D, 4 * sizeof(float));
    /* explicit positions equal the implicit n % T ones */
    int pos[N];
    for (int n = 0; n < N; n++) pos[n] = n % T;
    memcpy(y2, x, sizeof x);
    moe_model_rope_forward(y2, cs, sn, pos, N, T, NH, D, STRIDE);
    assert_memory_equal(y1, y2, sizeof y1);
    /* a rotation: q.k depends on the relative position only */
    float q[2 * D], k[2 * D];
    fill(q, D, 81, 1.0f);
    fill(k, D, 82, 1.0f);
    double dots[3];
    const int pq[3][2] = {{3, 1}, {4, 2}, {2, 0}};
    for (int i = 0; i < 3; i++) {
        float qq[D], kk[D];
        memcpy(qq, q, sizeof qq);
        memcpy(kk, k, sizeof kk);
        moe_model_rope_forward(qq, cs, sn, &pq[i][0], 1, T, 1, D, D);
        moe_model_rope_forward(kk, cs, sn, &pq[i][1], 1, T, 1, D, D);
        dots[i] = dot(qq, kk, D);
    }
    assert_true(fabs(dots[0] - dots[1]) < 1e-5 && fabs(dots[0] - dots[2]) < 1e-5);
    /* the backward is the transpose: <R x, g> = <x, R^T g> */
    float g[N * STRIDE], gb[N * STRIDE];
    fill(g, N * STRIDE, 83, 1.0f);
    memcpy(gb, g, sizeof g);
    moe_model_rope_backward(gb, cs, sn, NULL, N, T, NH, D, STRIDE);
    assert_true(fabs(dot(y1, g, N * STRIDE) - dot(x, gb, N * STRIDE)) < 1e-4);
}

/* ---- grouped-query attention ---- */
enum { GB = 2, GT = 6, GNH = 4, GNKV = 2, GHD = 3, GQKV = (GNH + 2 * GNKV) * GHD, GA = GNH * GHD };
typedef struct {
    float qkv[GB * GT * GQKV], r[GB * GT * GA];
    int nkv, ref;
} gqa_ctx;

static double gqa_loss(void *vctx)
{
    gqa_ctx *c = vctx;
    float out[GB * GT * GA], att[GB * GNH * GT * GT];
    if (c->ref) moe_model_attention_forward_ref(out, att, c->qkv, GB, GT, GNH, c->nkv, GHD);
    else moe_model_attention_forward(out, att, c->qkv, GB, GT, GNH, c->nkv, GHD);
    return dot(out, c->r, GB * GT * GA);
}

static void test_attention_gqa(void **state)
{
    (void)state;
    for (int nkv = 1; nkv <= GNKV; nkv++) { /* multi-query, and 2 query heads per kv head */
        const int qkv = (GNH + 2 * nkv) * GHD;
        gqa_ctx c = {.nkv = nkv};
        fill(c.qkv, GB * GT * qkv, 90 + nkv, 1.0f);
        fill(c.r, GB * GT * GA, 92, 1.0f);
        float o1[GB * GT * GA], o2[GB * GT * GA], a1[GB * GNH * GT * GT], a2[GB * GNH * GT * GT];
        moe_model_attention_forward(o1, a1, c.qkv, GB, GT, GNH, nkv, GHD);
        moe_model_attention_forward_ref(o2, a2, c.qkv, GB, GT, GNH, nkv, GHD);
        assert_true(rel_err(o1, o2, GB * GT * GA) < 1e-5);
        /* the same as multi-head attention over k, v repeated for each query head */
        static float full[GB * GT * 3 * GA], o3[GB * GT * GA], a3[GB * GNH * GT * GT];
        for (int n = 0; n < GB * GT; n++)
            for (int h = 0; h < GNH; h++)
                for (int i = 0; i < GHD; i++) {
                    const float *row = c.qkv + (size_t)n * qkv;
                    const int kvh = h / (GNH / nkv);
                    full[(size_t)n * 3 * GA + h * GHD + i] = row[h * GHD + i];
                    full[(size_t)n * 3 * GA + GA + h * GHD + i] = row[GA + kvh * GHD + i];
                    full[(size_t)n * 3 * GA + 2 * GA + h * GHD + i] = row[GA + nkv * GHD + kvh * GHD + i];
                }
        moe_model_attention_forward(o3, a3, full, GB, GT, GNH, GNH, GHD);
        assert_true(rel_err(o1, o3, GB * GT * GA) < 1e-6);
        float d1[GB * GT * GQKV] = {0}, d2[GB * GT * GQKV] = {0}, scratch[MOE_PAR_MAX_THREADS * GT * GT];
        moe_model_attention_backward(d1, scratch, MOE_PAR_MAX_THREADS, c.r, c.qkv, a1, GB, GT, GNH, nkv, GHD);
        moe_model_attention_backward_ref(d2, scratch, c.r, c.qkv, a2, GB, GT, GNH, nkv, GHD);
        assert_true(rel_err(d1, d2, GB * GT * qkv) < 1e-5);
        float fd[GB * GT * GQKV];
        for (int ref = 0; ref < 2; ref++) {
            c.ref = ref;
            finite_diff(fd, c.qkv, GB * GT * qkv, 1e-2f, gqa_loss, &c);
            assert_true(rel_err(ref ? d2 : d1, fd, GB * GT * qkv) < 2e-3);
        }
        /* kv-head pairs over 1, 2 and 3 threads: the same bits */
        const int threads0 = openblas_get_num_threads();
        for (int nt = 1; nt <= 3; nt++) {
            openblas_set_num_threads(nt);
            float d3[GB * GT * GQKV] = {0};
            moe_model_attention_backward(d3, scratch, MOE_PAR_MAX_THREADS, c.r, c.qkv, a1, GB, GT, GNH, nkv, GHD);
            assert_memory_equal(d1, d3, sizeof(float) * GB * GT * qkv);
        }
        openblas_set_num_threads(threads0);
    }
}

/* ---- cross-entropy ---- */
enum { CN = 4, CV = 11 };
typedef struct {
    float logits[CN * CV];
    int32_t targets[CN];
} ce_ctx;

static double ce_loss(void *vctx)
{
    ce_ctx *c = vctx;
    float losses[CN], probs[CN * CV];
    moe_model_crossentropy_forward(losses, probs, c->logits, c->targets, CN, CV);
    double s = 0;
    for (int i = 0; i < CN; i++) s += losses[i];
    return s;
}

static void test_crossentropy(void **state)
{
    (void)state;
    ce_ctx c = {.targets = {0, 3, 10, 3}};
    fill(c.logits, CN * CV, 30, 2.0f);
    float losses[CN], probs[CN * CV], dl[CN * CV] = {0}, fd[CN * CV];
    moe_model_crossentropy_forward(losses, probs, c.logits, c.targets, CN, CV);
    for (int n = 0; n < CN; n++) { /* against -log softmax in double */
        double mx = -1e30, s = 0;
        for (int i = 0; i < CV; i++) mx = fmax(mx, c.logits[n * CV + i]);
        for (int i = 0; i < CV; i++) s += exp(c.logits[n * CV + i] - mx);
        const double ref = mx + log(s) - c.logits[n * CV + c.targets[n]];
        assert_true(fabs(losses[n] - ref) < 1e-5 * fabs(ref) + 1e-6);
    }
    moe_model_crossentropy_backward(dl, probs, c.targets, 1.0f, CN, CV);
    finite_diff(fd, c.logits, CN * CV, 1e-2f, ce_loss, &c);
    assert_true(rel_err(dl, fd, CN * CV) < 2e-3);
    /* large logits stay finite */
    for (int i = 0; i < CV; i++) c.logits[i] = 1000.0f + i;
    moe_model_crossentropy_forward(losses, probs, c.logits, c.targets, CN, CV);
    const double ref0 = 10.0 + log((1.0 - exp(-11.0)) / (1.0 - exp(-1.0))); /* target 0 */
    assert_true(isfinite(losses[0]) && fabs(losses[0] - ref0) < 1e-3);
}

static void test_encoder(void **state)
{
    (void)state;
    enum { B = 2, T = 3, C = 4, V = 256 };
    static float wte[V * C], wpe[T * C], dwte[V * C], dwpe[T * C];
    fill(wte, V * C, 40, 1.0f);
    fill(wpe, T * C, 41, 1.0f);
    const int32_t inp[B * T] = {5, 255, 5, 0, 1, 2};
    float out[B * T * C], dout[B * T * C];
    moe_model_encoder_forward(out, inp, wte, wpe, B, T, C);
    for (int i = 0; i < B * T; i++)
        for (int c = 0; c < C; c++)
            assert_true(out[i * C + c] == wte[inp[i] * C + c] + wpe[(i % T) * C + c]);
    for (int i = 0; i < B * T * C; i++) dout[i] = 1.0f;
    moe_model_encoder_backward(dwte, dwpe, dout, inp, B, T, C);
    assert_true(dwte[5 * C] == 2.0f && dwte[255 * C] == 1.0f && dwte[7 * C] == 0.0f);
    assert_true(dwpe[0] == 2.0f && dwpe[2 * C + 3] == 2.0f);
}

/* The token encoder and the cross-entropy against their _refs at a GPT-2
 * sized vocabulary, with ids at both ends of it and repeated ids (the
 * scatter-add of the backward). */
static void test_vocab_kernels_match_ref(void **state)
{
    (void)state;
    enum { B = 3, T = 5, C = 6, V = 50257, N = B * T };
    float *wte = malloc(sizeof(float) * V * C), *wpe = malloc(sizeof(float) * T * C);
    float *dwte[2] = {calloc((size_t)V * C, sizeof(float)), calloc((size_t)V * C, sizeof(float))};
    float *logits = malloc(sizeof(float) * N * V), *probs[2] = {malloc(sizeof(float) * N * V), malloc(sizeof(float) * N * V)};
    float *dl[2] = {calloc((size_t)N * V, sizeof(float)), calloc((size_t)N * V, sizeof(float))};
    float out[2][N * C], dout[N * C], dwpe[2][T * C] = {{0}}, losses[2][N];
    int32_t ids[N] = {0, V - 1, 17, 50256, 0, 3, 17, 40000, 65 % V, 1, 2, V - 1, 12345, 7, 17};
    fill(wte, V * C, 70, 1.0f);
    fill(wpe, T * C, 71, 1.0f);
    fill(dout, N * C, 72, 1.0f);
    fill(logits, N * V, 73, 4.0f);
    moe_model_encoder_forward(out[0], ids, wte, wpe, B, T, C);
    moe_model_encoder_forward_ref(out[1], ids, wte, wpe, B, T, C, V);
    assert_memory_equal(out[0], out[1], sizeof out[0]); /* the same additions */
    moe_model_encoder_backward(dwte[0], dwpe[0], dout, ids, B, T, C);
    moe_model_encoder_backward_ref(dwte[1], dwpe[1], dout, ids, B, T, C, V);
    assert_memory_equal(dwte[0], dwte[1], sizeof(float) * V * C); /* same order per element */
    assert_memory_equal(dwpe[0], dwpe[1], sizeof dwpe[0]);
    assert_true(dwte[0][17 * C] == dout[2 * C] + dout[6 * C] + dout[14 * C]);
    moe_model_crossentropy_forward(losses[0], probs[0], logits, ids, N, V);
    moe_model_crossentropy_forward_ref(losses[1], probs[1], logits, ids, N, V);
    for (int n = 0; n < N; n++) assert_true(fabsf(losses[0][n] - losses[1][n]) <= 1e-5f * fabsf(losses[1][n]));
    assert_true(rel_err(probs[0], probs[1], N * V) < 1e-5);
    moe_model_crossentropy_backward(dl[0], probs[0], ids, 0.25f, N, V);
    moe_model_crossentropy_backward_ref(dl[1], probs[0], ids, 0.25f, N, V);
    assert_true(rel_err(dl[0], dl[1], N * V) < 1e-6);
    for (int k = 0; k < 2; k++) {
        free(dwte[k]);
        free(probs[k]);
        free(dl[k]);
    }
    free(wte);
    free(wpe);
    free(logits);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_matches_ref),
        cmocka_unit_test(test_layernorm_fd),
        cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_long),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention_gqa),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_encoder),
        cmocka_unit_test(test_vocab_kernels_match_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
