/* Dense model layers: the GEMM kernels against their naive references, and
 * layernorm, attention and cross-entropy backward against central finite
 * differences of L = sum(out * R) with double accumulation. A dropped term
 * in any backward gives a relative error of order 0.1..1, far above the
 * 2e-3 tolerance; float round-off of the differences stays below ~1e-4. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
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
    uint8_t tg[N];
    fill(x, N * C, 60, 1.0f);
    fill(w, C, 61, 1.0f);
    fill(b, C, 62, 1.0f);
    fill(dy, N * C, 63, 1.0f);
    fill(logits, N * V, 64, 3.0f);
    fill(inp, N * C, 65, 1.0f);
    fill(wt, V * C, 66, 0.1f);
    for (int i = 0; i < N; i++) tg[i] = (uint8_t)(i * 37);
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

/* ---- cross-entropy ---- */
enum { CN = 4, CV = 11 };
typedef struct {
    float logits[CN * CV];
    uint8_t targets[CN];
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
    const uint8_t inp[B * T] = {5, 255, 5, 0, 1, 2};
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_matches_ref),
        cmocka_unit_test(test_layernorm_fd),
        cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_long),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_encoder),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
