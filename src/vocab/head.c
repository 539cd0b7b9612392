/* Vocabulary-expert head, fast path (head.h): router, grouping, expert
 * compute on grouped rows, combine, top-K lists, coverage, and the
 * one-process composition moe_vocab_head.
 *
 * Work is cut into tiles fixed by the data and dealt to the threads of a
 * fork-join region by cost; each tile is one single-threaded cblas_sgemm
 * plus its row or column pass. A tile's result therefore does not depend on
 * which thread computed it or how many there are, and no sum crosses a tile
 * boundary: the expert-gradient tiles are column blocks of W_{S_m} that sum
 * over ALL rows of the expert inside one GEMM. */
#include "vocab/head.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/fastmath.h"
#include "core/par.h"
#include "core/rows.h"
#include "router/router.h"

/* Rows per expert tile, tokens per expert-gradient tile, router rows per
 * router-gradient tile. */
enum { ROW_TILE = 64, COL_TILE = 256, ROUTER_TILE = 16 };
/* Expert tiles of at most this many rows multiply by GEMV (see tile_logits):
 * measured faster than sgemm up to 4 rows for sets of ~800 tokens, d = 256,
 * whose W_S (800 KB) stays in cache from one row to the next; a larger W_S
 * is read from memory once per GEMV, so above GEMV_BYTES only a single row
 * takes the GEMV. */
enum { GEMV_ROWS = 4, GEMV_BYTES = 1 << 20 };
/* Multiply-adds a thread should get before a region pays for its start
 * (thread creation, and reading the weights is memory-bound at decoding
 * sizes anyway): about 0.1 ms of work. */
#define MIN_MACS_PER_THREAD (1L << 22)

size_t moe_vocab_params_numel(int V, int d, int M)
{
    return (size_t)M * d + (size_t)M + (size_t)V * d + (size_t)V;
}

void moe_vocab_params_point(moe_vocab_params *p, float *block, int V, int d, int M)
{
    p->router_w = block;
    p->router_b = p->router_w + (size_t)M * d;
    p->w = p->router_b + M;
    p->b = p->w + (size_t)V * d;
}

/* A region of nt threads in which OpenBLAS always runs single-threaded
 * (moe_par_run leaves OpenBLAS alone when nt = 1), so every GEMM call of a
 * tile takes the same path whatever the thread count. */
static void run_tiles(int nt, void (*fn)(void *ctx, int t, int nt), void *ctx)
{
    if (nt > 1) {
        moe_par_run(nt, fn, ctx);
        return;
    }
    const int blas = openblas_get_num_threads();
    if (blas > 1) openblas_set_num_threads(1);
    fn(ctx, 0, 1);
    if (blas > 1) openblas_set_num_threads(blas);
}

static int threads_for(double macs)
{
    return moe_par_threads_for(macs > 1e18 ? (long)1e18 : (long)macs, MIN_MACS_PER_THREAD);
}

/* The thread that computes a tile: where the middle of its cost falls in
 * [0, total), cut into nt equal shares. */
static inline int tile_owner(double before, double cost, double total, int nt)
{
    const int o = (int)((before + 0.5 * cost) * nt / total);
    return o < 0 ? 0 : o >= nt ? nt - 1 : o;
}

/* ---- row passes ---- */

/* z (n) becomes softmax(z) in place; returns logsumexp(z). */
MOE_TARGET_CLONES static double softmax_row(float *z, int n)
{
    const float mx = moe_row_max(z, n);
    moe_row_exp(z, n, mx);
    const float sum = moe_row_sum(z, n), inv = 1.0f / sum;
    for (int j = 0; j < n; j++) z[j] *= inv;
    return (double)mx + log((double)sum);
}

/* z (n) becomes z - logsumexp(z) in place (log-probabilities). */
MOE_TARGET_CLONES static void logsoftmax_row(float *z, int n)
{
    const float mx = moe_row_max(z, n);
    float s[MOE_LANES] = {0};
    int j = 0;
    for (; j + MOE_LANES <= n; j += MOE_LANES)
        for (int l = 0; l < MOE_LANES; l++) s[l] += moe_fast_expf(z[j + l] - mx);
    for (; j < n; j++) s[0] += moe_fast_expf(z[j] - mx);
    const float lse = (float)((double)mx + log((double)moe_lanes_total(s)));
    for (j = 0; j < n; j++) z[j] -= lse;
}

/* out (rows, n) = bias broadcast, the C operand of a beta = 1 GEMM. */
static void fill_rows(float *out, const float *bias, int rows, int n)
{
    for (int r = 0; r < rows; r++) memcpy(out + (size_t)r * n, bias, (size_t)n * sizeof *out);
}

/* ---- (i) router ---- */

typedef struct {
    float *logits, *q, *lse, *dh, *dw, *db, *dl;
    const float *h, *w, *b, *qin;
    const int32_t *expert;
    float dloss;
    int N, d, M;
} router_job;

static void router_fwd_run(void *ctx, int t, int nt)
{
    const router_job *j = ctx;
    const int M = j->M, d = j->d, tiles = (j->N + ROW_TILE - 1) / ROW_TILE;
    long t0, t1;
    moe_par_range(tiles, t, nt, &t0, &t1);
    for (long k = t0; k < t1; k++) {
        const int r0 = (int)k * ROW_TILE, rt = j->N - r0 < ROW_TILE ? j->N - r0 : ROW_TILE;
        float *lg = j->logits + (size_t)r0 * M;
        fill_rows(lg, j->b, rt, M);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rt, M, d, 1.0f, j->h + (size_t)r0 * d, d, j->w, d,
                    1.0f, lg, M);
        for (int r = 0; r < rt; r++) {
            float *q = j->q + (size_t)(r0 + r) * M;
            memcpy(q, lg + (size_t)r * M, (size_t)M * sizeof *q);
            j->lse[r0 + r] = (float)softmax_row(q, M);
        }
    }
}

void moe_vocab_router_forward(float *logits, float *q, float *lse, const float *h, const float *w, const float *b,
                              int N, int d, int M)
{
    router_job j = {.logits = logits, .q = q, .lse = lse, .h = h, .w = w, .b = b, .N = N, .d = d, .M = M};
    const int tiles = (N + ROW_TILE - 1) / ROW_TILE, nt = threads_for((double)N * M * d);
    run_tiles(nt < tiles ? nt : tiles, router_fwd_run, &j);
}

/* dlogits rows and dh rows += dlogits w, by row tiles. */
static void router_bwd_rows(void *ctx, int t, int nt)
{
    const router_job *j = ctx;
    const int M = j->M, d = j->d, tiles = (j->N + ROW_TILE - 1) / ROW_TILE;
    long t0, t1;
    moe_par_range(tiles, t, nt, &t0, &t1);
    for (long k = t0; k < t1; k++) {
        const int r0 = (int)k * ROW_TILE, rt = j->N - r0 < ROW_TILE ? j->N - r0 : ROW_TILE;
        for (int r = r0; r < r0 + rt; r++) {
            float *dl = j->dl + (size_t)r * M;
            const float *q = j->qin + (size_t)r * M;
            for (int m = 0; m < M; m++) dl[m] = q[m] * j->dloss;
            dl[j->expert[r]] -= j->dloss;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rt, d, M, 1.0f, j->dl + (size_t)r0 * M, M, j->w, d,
                    1.0f, j->dh + (size_t)r0 * d, d);
    }
}

/* dw rows += dlogits^T h and db by tiles of router rows (each sums over all N rows). */
static void router_bwd_params(void *ctx, int t, int nt)
{
    const router_job *j = ctx;
    const int M = j->M, d = j->d, tiles = (M + ROUTER_TILE - 1) / ROUTER_TILE;
    long t0, t1;
    moe_par_range(tiles, t, nt, &t0, &t1);
    for (long k = t0; k < t1; k++) {
        const int m0 = (int)k * ROUTER_TILE, mt = M - m0 < ROUTER_TILE ? M - m0 : ROUTER_TILE;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, mt, d, j->N, 1.0f, j->dl + m0, M, j->h, d, 1.0f,
                    j->dw + (size_t)m0 * d, d);
        for (int m = m0; m < m0 + mt; m++) {
            double s = 0;
            for (int n = 0; n < j->N; n++) s += j->dl[(size_t)n * M + m];
            j->db[m] += (float)s;
        }
    }
}

void moe_vocab_router_backward(float *dh, float *dw, float *db, float *dlogits, const float *q,
                               const int32_t *expert, const float *h, const float *w, float dloss, int N, int d,
                               int M)
{
    router_job j = {.dh = dh, .dw = dw, .db = db, .dl = dlogits, .qin = q, .expert = expert, .h = h, .w = w,
                    .dloss = dloss, .N = N, .d = d, .M = M};
    const int nt = threads_for((double)N * M * d);
    const int row_tiles = (N + ROW_TILE - 1) / ROW_TILE, m_tiles = (M + ROUTER_TILE - 1) / ROUTER_TILE;
    run_tiles(nt < row_tiles ? nt : row_tiles, router_bwd_rows, &j);
    run_tiles(nt < m_tiles ? nt : m_tiles, router_bwd_params, &j);
}

/* ---- (ii) grouping ---- */

moe_status moe_vocab_target_experts(int32_t *expert, const int32_t *targets, const moe_vocab_part *p, int N)
{
    const int V = moe_vocab_part_vocab(p);
    const int32_t *assign = moe_vocab_part_assign(p);
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0 || targets[n] >= V)
            return moe_errorf(MOE_ERR_ARG, "vocabulary head: the target of position %d is token %d, outside "
                                           "[0, %d)", n, (int)targets[n], V);
        expert[n] = assign[targets[n]];
    }
    return MOE_OK;
}

void moe_vocab_group(int32_t *order, int32_t *offsets, const int32_t *expert, int n, int M)
{
    memset(offsets, 0, (size_t)(M + 1) * sizeof *offsets);
    for (int i = 0; i < n; i++) offsets[expert[i] + 1]++;
    for (int m = 0; m < M; m++) offsets[m + 1] += offsets[m];
    /* offsets[m] serves as the cursor of block m (items ascend), ending at
     * the start of block m + 1; shifting by one restores the starts */
    for (int i = 0; i < n; i++) order[offsets[expert[i]]++] = i;
    for (int m = M; m > 0; m--) offsets[m] = offsets[m - 1];
    offsets[0] = 0;
}

void moe_vocab_pack(float *x, int32_t *y, const float *h, const int32_t *targets, const int32_t *order, int n,
                    int K, int d)
{
    for (int i = 0; i < n; i++) {
        const int pos = order[i] / K;
        memcpy(x + (size_t)i * d, h + (size_t)pos * d, (size_t)d * sizeof *x);
        if (y) y[i] = targets[pos];
    }
}

/* ---- (iii) expert compute ---- */

/* One tile of local expert j (global m): rows [r0, r1) of its grouped rows,
 * or tokens [r0, r1) of S_m (column tiles). */
typedef struct {
    int j, m, n;    /* local index, global index, |S_m| */
    int rows;       /* R: grouped rows of the expert */
    int row0;       /* its first grouped row */
    int wrow;       /* its first local expert-major row */
    int64_t block;  /* float offset of its (R, n) scratch block */
    int r0, r1;
} tile;

typedef struct {
    float *out, *scratch, *dx, *dw, *db;
    const float *x, *w, *b;
    const int32_t *y, *offsets, *poff, *rows_of;
    int m0, m1, d;
    int by_cols;
    float dloss;
    void (*fn)(const void *job, const tile *tl);
} expert_job;

static double expert_macs(const expert_job *e)
{
    double total = 0;
    for (int j = 0; j < e->m1 - e->m0; j++)
        total += (double)(e->offsets[j + 1] - e->offsets[j]) * (e->poff[e->m0 + j + 1] - e->poff[e->m0 + j]);
    return total;
}

/* Deals the tiles (experts in order, tiles in order) to thread t by cost. */
static void expert_walk(void *ctx, int t, int nt)
{
    const expert_job *e = ctx;
    const double total = expert_macs(e);
    double before = 0;
    int64_t block = 0;
    for (int j = 0; j < e->m1 - e->m0; j++) {
        const int m = e->m0 + j, R = e->offsets[j + 1] - e->offsets[j], n = e->poff[m + 1] - e->poff[m];
        const int len = e->by_cols ? n : R, step = e->by_cols ? COL_TILE : ROW_TILE;
        for (int s = 0; R > 0 && s < len; s += step) {
            const int s1 = len - s < step ? len : s + step;
            const double cost = (double)(s1 - s) * (e->by_cols ? R : n);
            if (tile_owner(before, cost, total, nt) == t) {
                const tile tl = {j, m, n, R, e->offsets[j], e->poff[m] - e->poff[e->m0], block, s, s1};
                e->fn(e, &tl);
            }
            before += cost;
        }
        block += (int64_t)R * n;
    }
}

static int expert_tiles(const expert_job *e)
{
    int n = 0;
    for (int j = 0; j < e->m1 - e->m0; j++) {
        const int m = e->m0 + j, R = e->offsets[j + 1] - e->offsets[j], len = e->by_cols ? e->poff[m + 1] - e->poff[m] : R;
        const int step = e->by_cols ? COL_TILE : ROW_TILE;
        if (R > 0) n += (len + step - 1) / step;
    }
    return n;
}

static void expert_run(expert_job *e)
{
    const int tiles = expert_tiles(e), nt = threads_for(expert_macs(e) * e->d);
    if (tiles) run_tiles(nt < tiles ? nt : tiles, expert_walk, e);
}

int64_t moe_vocab_expert_scratch(const int32_t *offsets, const moe_vocab_part *p, int m0, int m1)
{
    const int32_t *poff = moe_vocab_part_offsets(p);
    int64_t s = 0;
    for (int j = 0; j < m1 - m0; j++) s += (int64_t)(offsets[j + 1] - offsets[j]) * (poff[m0 + j + 1] - poff[m0 + j]);
    return s;
}

/* z (rows r0..r1 of the tile, n) = x W_S^T + c_S. A GEMM packs W_S, which
 * costs as much as multiplying it by a few rows: a tile of so few rows
 * (decoding) reads W_S once per row instead (GEMV, from cache after the
 * first row). */
static float *tile_logits(const expert_job *e, const tile *tl)
{
    const int d = e->d, rt = tl->r1 - tl->r0;
    float *z = e->scratch + tl->block + (int64_t)tl->r0 * tl->n;
    const float *x = e->x + (size_t)(tl->row0 + tl->r0) * d, *w = e->w + (size_t)tl->wrow * d;
    fill_rows(z, e->b + tl->wrow, rt, tl->n);
    if (rt == 1 || (rt <= GEMV_ROWS && (size_t)tl->n * d * sizeof(float) <= GEMV_BYTES))
        for (int r = 0; r < rt; r++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, tl->n, d, 1.0f, w, d, x + (size_t)r * d, 1, 1.0f,
                        z + (size_t)r * tl->n, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rt, tl->n, d, 1.0f, x, d, w, d, 1.0f, z, tl->n);
    return z;
}

static void fwd_tile(const void *job, const tile *tl)
{
    const expert_job *e = job;
    float *z = tile_logits(e, tl);
    for (int r = tl->r0; r < tl->r1; r++, z += tl->n) {
        const int i = tl->row0 + r, yl = e->rows_of[e->y[i]] - e->poff[tl->m];
        const float zy = z[yl];
        const double lse = softmax_row(z, tl->n);
        e->out[i] = (float)(lse - zy); /* lse - z[y] rather than -log p: exact for tiny p */
    }
}

static void logp_tile(const void *job, const tile *tl)
{
    const expert_job *e = job;
    float *z = tile_logits(e, tl);
    for (int r = tl->r0; r < tl->r1; r++, z += tl->n) logsoftmax_row(z, tl->n);
}

static void dz_tile(const void *job, const tile *tl)
{
    const expert_job *e = job;
    float *z = e->scratch + tl->block + (int64_t)tl->r0 * tl->n;
    for (int r = tl->r0; r < tl->r1; r++, z += tl->n) {
        for (int c = 0; c < tl->n; c++) z[c] *= e->dloss;
        z[e->rows_of[e->y[tl->row0 + r]] - e->poff[tl->m]] -= e->dloss;
    }
}

/* dW_S[r0, r1) += dz[:, r0:r1]^T x, dc likewise: a column tile sums over every row of the expert. */
static void dw_tile(const void *job, const tile *tl)
{
    const expert_job *e = job;
    const int d = e->d, ct = tl->r1 - tl->r0;
    const float *dz = e->scratch + tl->block;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ct, d, tl->rows, 1.0f, dz + tl->r0, tl->n,
                e->x + (size_t)tl->row0 * d, d, 1.0f, e->dw + (size_t)(tl->wrow + tl->r0) * d, d);
    for (int c = tl->r0; c < tl->r1; c++) {
        double s = 0;
        for (int r = 0; r < tl->rows; r++) s += dz[(int64_t)r * tl->n + c];
        e->db[tl->wrow + c] += (float)s;
    }
}

static void dx_tile(const void *job, const tile *tl)
{
    const expert_job *e = job;
    const int d = e->d, rt = tl->r1 - tl->r0;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rt, d, tl->n, 1.0f,
                e->scratch + tl->block + (int64_t)tl->r0 * tl->n, tl->n, e->w + (size_t)tl->wrow * d, d, 0.0f,
                e->dx + (size_t)(tl->row0 + tl->r0) * d, d);
}

static moe_status check_rows(const int32_t *y, const int32_t *offsets, const moe_vocab_part *p, int m0, int m1)
{
    const int V = moe_vocab_part_vocab(p);
    const int32_t *assign = moe_vocab_part_assign(p);
    for (int j = 0; j < m1 - m0; j++)
        for (int i = offsets[j]; i < offsets[j + 1]; i++)
            if (y[i] < 0 || y[i] >= V || assign[y[i]] != m0 + j)
                return moe_errorf(MOE_ERR_ARG, "vocabulary expert %d: grouped row %d has target token %d, which "
                                               "is not one of its tokens", m0 + j, i, (int)y[i]);
    return MOE_OK;
}

static expert_job expert_job_for(const int32_t *offsets, const moe_vocab_part *p, int m0, int m1, int d)
{
    return (expert_job){.offsets = offsets, .poff = moe_vocab_part_offsets(p), .rows_of = moe_vocab_part_rows(p),
                        .m0 = m0, .m1 = m1, .d = d};
}

moe_status moe_vocab_expert_forward(float *loss, float *probs, const float *x, const int32_t *y,
                                    const int32_t *offsets, const float *w, const float *b,
                                    const moe_vocab_part *p, int m0, int m1, int d)
{
    moe_status st = check_rows(y, offsets, p, m0, m1);
    if (st) return st;
    expert_job e = expert_job_for(offsets, p, m0, m1, d);
    e.out = loss, e.scratch = probs, e.x = x, e.y = y, e.w = w, e.b = b, e.fn = fwd_tile;
    expert_run(&e);
    return MOE_OK;
}

void moe_vocab_expert_backward(float *dx, float *dw, float *db, float *probs, const float *x, const int32_t *y,
                               const int32_t *offsets, const float *w, const moe_vocab_part *p, int m0, int m1,
                               int d, float dloss)
{
    expert_job e = expert_job_for(offsets, p, m0, m1, d);
    e.scratch = probs, e.x = x, e.y = y, e.w = w, e.dx = dx, e.dw = dw, e.db = db, e.dloss = dloss;
    e.fn = dz_tile;
    expert_run(&e);
    e.fn = dw_tile, e.by_cols = 1; /* reads x ... */
    expert_run(&e);
    e.fn = dx_tile, e.by_cols = 0; /* ... before dx (which may be x) is written */
    expert_run(&e);
}

void moe_vocab_expert_backward_data(float *dx, float *probs, const int32_t *y, const int32_t *offsets,
                                    const float *w, const moe_vocab_part *p, int m0, int m1, int d, float dloss)
{
    expert_job e = expert_job_for(offsets, p, m0, m1, d);
    e.scratch = probs, e.y = y, e.w = w, e.dx = dx, e.dloss = dloss;
    e.fn = dz_tile;
    expert_run(&e);
    e.fn = dx_tile;
    expert_run(&e);
}

void moe_vocab_expert_backward_weights(float *dw, float *db, const float *dlogits, const float *x,
                                       const int32_t *offsets, const moe_vocab_part *p, int m0, int m1, int d)
{
    expert_job e = expert_job_for(offsets, p, m0, m1, d);
    e.scratch = (float *)dlogits, e.x = x, e.dw = dw, e.db = db; /* dw_tile only reads the scratch */
    e.fn = dw_tile, e.by_cols = 1;
    expert_run(&e);
}

void moe_vocab_expert_logprobs(float *logp, const float *x, const int32_t *offsets, const float *w,
                               const float *b, const moe_vocab_part *p, int m0, int m1, int d)
{
    expert_job e = expert_job_for(offsets, p, m0, m1, d);
    e.scratch = logp, e.x = x, e.w = w, e.b = b, e.fn = logp_tile;
    expert_run(&e);
}

/* ---- (iv) combine ---- */

void moe_vocab_combine_loss(float *loss, const float *logits, const float *lse, const int32_t *expert,
                            const float *row_loss, const int32_t *order, int N, int M)
{
    for (int i = 0; i < N; i++) {
        const int n = order[i];
        loss[n] = (lse[n] - logits[(size_t)n * M + expert[n]]) + row_loss[i];
    }
}

void moe_vocab_combine_dh(float *dh, const float *dx, int64_t ldx, const int32_t *order, int n, int K, int d)
{
    for (int i = 0; i < n; i++) {
        float *o = dh + (size_t)(order[i] / K) * d;
        const float *r = dx + (size_t)i * ldx;
        for (int k = 0; k < d; k++) o[k] += r[k];
    }
}

void moe_vocab_topk_select(int32_t *sel, const float *q, int N, int M, int K)
{
    moe_topk_rows((int *)sel, q, N, M, K);
}

typedef struct {
    int32_t *ids, *count;
    float *logp;
    int64_t stride;
    const float *logits, *lse;
    const float *const *rows;
    const int32_t *sel, *poff, *pids;
    int N, K, M;
} topk_job;

static void topk_run(void *ctx, int t, int nt)
{
    const topk_job *j = ctx;
    long n0, n1;
    moe_par_range(j->N, t, nt, &n0, &n1);
    for (long n = n0; n < n1; n++) {
        const int32_t *sel = j->sel + n * j->K;
        const float *lg = j->logits + n * j->M;
        double sq = 0;
        for (int k = 0; k < j->K; k++) sq += exp((double)lg[sel[k]] - j->lse[n]);
        const double norm = log(sq);
        int32_t *ids = j->ids + n * j->stride, total = 0;
        float *lp = j->logp + n * j->stride;
        /* the union in id order: each chosen expert's list is ascending and
         * the lists are disjoint, so merge them one by one from the back */
        for (int k = 0; k < j->K; k++) {
            const int m = sel[k], len = j->poff[m + 1] - j->poff[m];
            const int32_t *lid = j->pids + j->poff[m];
            const float *row = j->rows[n * j->K + k];
            const double add = ((double)lg[m] - j->lse[n]) - norm; /* log q_m - log sum_{T_K} q */
            int32_t a = total - 1, b = len - 1, o = total + len - 1;
            for (; b >= 0; o--) {
                if (a >= 0 && ids[a] > lid[b]) {
                    ids[o] = ids[a];
                    lp[o] = lp[a--];
                } else {
                    ids[o] = lid[b];
                    lp[o] = (float)(add + row[b--]);
                }
            }
            total += len;
        }
        j->count[n] = total;
    }
}

void moe_vocab_topk_combine(int32_t *ids, float *logp, int32_t *count, int64_t stride, const float *logits,
                            const float *lse, const int32_t *sel, const float *const *rows,
                            const moe_vocab_part *p, int N, int K)
{
    topk_job j = {ids, count, logp, stride, logits, lse, rows, sel, moe_vocab_part_offsets(p),
                  moe_vocab_part_ids(p), N, K, moe_vocab_part_experts(p)};
    const int64_t per = moe_vocab_part_topk_size(p, K);
    moe_par_run(moe_par_threads_for((long)N * per, 1 << 15), topk_run, &j);
}

void moe_vocab_topk_dense(float *P, const int32_t *ids, const float *logp, const int32_t *count, int64_t stride,
                          int N, int V)
{
    memset(P, 0, (size_t)N * V * sizeof *P);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < count[n]; i++) P[(size_t)n * V + ids[n * stride + i]] = expf(logp[n * stride + i]);
}

/* Experts ranked before e in q: larger q, or equal q and a lower index. */
static int rank_of(const float *qn, int e, int M)
{
    int rank = 0;
    for (int m = 0; m < M; m++) rank += qn[m] > qn[e] || (qn[m] == qn[e] && m < e);
    return rank;
}

int64_t moe_vocab_coverage(const float *q, const int32_t *expert, int N, int M, int K)
{
    int64_t covered = 0;
    for (int n = 0; n < N; n++) covered += rank_of(q + (size_t)n * M, expert[n], M) < K;
    return covered;
}

void moe_vocab_rank_hist(int64_t *hist, const float *q, const int32_t *expert, int N, int M)
{
    for (int n = 0; n < N; n++) hist[rank_of(q + (size_t)n * M, expert[n], M)]++;
}

static int cmp_desc(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y;
}

void moe_vocab_rank_mass(double *mass, const float *q, int N, int M)
{
    float *s = malloc((size_t)M * sizeof *s);
    if (!s) return; /* statistics only: nothing added */
    for (int n = 0; n < N; n++) {
        memcpy(s, q + (size_t)n * M, (size_t)M * sizeof *s);
        qsort(s, (size_t)M, sizeof *s, cmp_desc);
        for (int m = 0; m < M; m++) mass[m] += s[m];
    }
    free(s);
}

/* ---- the head, one process ---- */

struct moe_vocab_head {
    const moe_vocab_part *p;
    int d, V, M;
    int N;            /* positions of the last training forward (0: none) */
    int can_backward; /* that forward's saved state is intact */
    int cap_items;    /* rows the buffers below hold */
    int64_t cap_scratch;
    float *logits;    /* (items, M) router logits; dlogits in the backward */
    float *q;         /* (items, M) router probabilities */
    float *lse;       /* (items) router logsumexp */
    int32_t *expert;  /* (items) target expert, or the top-K selection */
    int32_t *order;   /* (items) grouped order */
    const float **rowp; /* (items) log-probability row of each item (top-K) */
    int32_t *y;       /* (items) grouped targets */
    float *row_loss;  /* (items) */
    float *x;         /* (items, d) grouped rows; dx in the backward */
    int32_t *goff;    /* (M+1) grouped rows per expert */
    int32_t *activated; /* (M) rows per expert in the last training forward */
    float *scratch;   /* (cap_scratch) expert probabilities or log-probabilities */
};

moe_status moe_vocab_head_create(moe_vocab_head **out, const moe_vocab_part *p, int d)
{
    *out = NULL;
    if (d < 1) return moe_errorf(MOE_ERR_ARG, "vocabulary head: d_model=%d must be >= 1", d);
    moe_vocab_head *hd = calloc(1, sizeof *hd);
    if (!hd) return moe_errorf(MOE_ERR_NOMEM, "vocabulary head");
    hd->p = p, hd->d = d, hd->V = moe_vocab_part_vocab(p), hd->M = moe_vocab_part_experts(p);
    hd->goff = moe_calloc((size_t)hd->M + 1, sizeof *hd->goff);
    hd->activated = moe_calloc((size_t)hd->M, sizeof *hd->activated);
    if (!hd->goff || !hd->activated) {
        moe_vocab_head_destroy(hd);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head");
    }
    *out = hd;
    return MOE_OK;
}

static void free_items(moe_vocab_head *hd)
{
    moe_free(hd->logits), moe_free(hd->q), moe_free(hd->lse), moe_free(hd->expert), moe_free(hd->order);
    moe_free(hd->y), moe_free(hd->row_loss), moe_free(hd->x), moe_free(hd->rowp);
    hd->rowp = NULL;
    hd->logits = hd->q = hd->lse = hd->row_loss = hd->x = NULL;
    hd->expert = hd->order = hd->y = NULL;
    hd->cap_items = 0;
}

void moe_vocab_head_destroy(moe_vocab_head *hd)
{
    if (!hd) return;
    free_items(hd);
    moe_free(hd->goff);
    moe_free(hd->activated);
    moe_free(hd->scratch);
    free(hd);
}

/* Grows the per-item buffers to n items (the state of the last forward is lost). */
static moe_status grow_items(moe_vocab_head *hd, int64_t n)
{
    if (n <= hd->cap_items) return MOE_OK;
    if (n > INT32_MAX) return moe_errorf(MOE_ERR_OVERFLOW, "vocabulary head: %lld rows", (long long)n);
    free_items(hd);
    const size_t M = (size_t)hd->M, d = (size_t)hd->d, k = (size_t)n;
    hd->logits = moe_calloc(k * M, sizeof(float));
    hd->q = moe_calloc(k * M, sizeof(float));
    hd->lse = moe_calloc(k, sizeof(float));
    hd->row_loss = moe_calloc(k, sizeof(float));
    hd->x = moe_calloc(k * d, sizeof(float));
    hd->expert = moe_calloc(k, sizeof(int32_t));
    hd->order = moe_calloc(k, sizeof(int32_t));
    hd->y = moe_calloc(k, sizeof(int32_t));
    hd->rowp = moe_calloc(k, sizeof(float *));
    if (!hd->logits || !hd->q || !hd->lse || !hd->row_loss || !hd->x || !hd->expert || !hd->order ||
        !hd->y || !hd->rowp) {
        free_items(hd);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head buffers for %lld rows", (long long)n);
    }
    hd->cap_items = (int)n;
    return MOE_OK;
}

static moe_status grow_scratch(moe_vocab_head *hd, int64_t n)
{
    if (n <= hd->cap_scratch) return MOE_OK;
    moe_free(hd->scratch);
    hd->cap_scratch = 0;
    /* 1/8 headroom: the expert loads change from batch to batch */
    const int64_t want = n + n / 8;
    if (!(hd->scratch = moe_calloc((size_t)want, sizeof(float))))
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head: %lld floats of expert logits", (long long)want);
    hd->cap_scratch = want;
    return MOE_OK;
}

/* Router logits must be finite: a NaN or Inf in h or in the router weights shows up here. */
static moe_status check_router(const moe_vocab_head *hd, int N)
{
    for (int n = 0; n < N; n++)
        if (!moe_all_finite(hd->logits + (size_t)n * hd->M, (size_t)hd->M))
            return moe_errorf(MOE_ERR_NONFINITE, "vocabulary head: router logits of position %d are not finite "
                                                 "(NaN or Inf in h or the router weights)", n);
    return MOE_OK;
}

moe_status moe_vocab_head_forward(moe_vocab_head *hd, float *loss, const float *h, const int32_t *targets,
                                  const moe_vocab_params *prm, int N)
{
    const int M = hd->M, d = hd->d;
    hd->N = 0, hd->can_backward = 0;
    memset(hd->activated, 0, (size_t)M * sizeof *hd->activated);
    if (N < 1) return moe_errorf(MOE_ERR_ARG, "vocabulary head: %d positions", N);
    moe_status st = grow_items(hd, N);
    if (!st) st = moe_vocab_target_experts(hd->expert, targets, hd->p, N);
    if (st) return st;
    moe_vocab_router_forward(hd->logits, hd->q, hd->lse, h, prm->router_w, prm->router_b, N, d, M);
    if ((st = check_router(hd, N))) return st;
    moe_vocab_group(hd->order, hd->goff, hd->expert, N, M);
    moe_vocab_pack(hd->x, hd->y, h, targets, hd->order, N, 1, d);
    if ((st = grow_scratch(hd, moe_vocab_expert_scratch(hd->goff, hd->p, 0, M)))) return st;
    st = moe_vocab_expert_forward(hd->row_loss, hd->scratch, hd->x, hd->y, hd->goff, prm->w, prm->b, hd->p, 0, M, d);
    if (st) return st;
    moe_vocab_combine_loss(loss, hd->logits, hd->lse, hd->expert, hd->row_loss, hd->order, N, M);
    for (int n = 0; n < N; n++)
        if (!isfinite(loss[n]))
            return moe_errorf(MOE_ERR_NONFINITE, "vocabulary head: the loss of position %d (target %d) is not "
                                                 "finite (NaN or Inf in the expert weights?)", n, (int)targets[n]);
    for (int m = 0; m < M; m++) hd->activated[m] = hd->goff[m + 1] - hd->goff[m];
    hd->N = N, hd->can_backward = 1;
    return MOE_OK;
}

moe_status moe_vocab_head_backward(moe_vocab_head *hd, float *dh, moe_vocab_params *grad, const float *h,
                                   const moe_vocab_params *prm, float dloss)
{
    if (!hd->can_backward)
        return moe_errorf(MOE_ERR_ARG, "vocabulary head: backward without a successful forward before it");
    const int N = hd->N, M = hd->M, d = hd->d;
    hd->can_backward = 0; /* the grouped rows become dh rows in place */
    moe_vocab_expert_backward(hd->x, grad->w, grad->b, hd->scratch, hd->x, hd->y, hd->goff, prm->w, hd->p, 0, M, d,
                              dloss);
    moe_vocab_router_backward(dh, grad->router_w, grad->router_b, hd->logits, hd->q, hd->expert, h, prm->router_w,
                              dloss, N, d, M);
    moe_vocab_combine_dh(dh, hd->x, d, hd->order, N, 1, d);
    return MOE_OK;
}

const int32_t *moe_vocab_head_activated(const moe_vocab_head *hd) { return hd->activated; }

const float *moe_vocab_head_router_probs(const moe_vocab_head *hd) { return hd->q; }

moe_status moe_vocab_head_coverage(const moe_vocab_head *hd, int K, int64_t *covered)
{
    if (!hd->N) return moe_errorf(MOE_ERR_ARG, "vocabulary head: coverage without a successful forward before it");
    if (K < 1 || K > hd->M)
        return moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, %d] (the vocabulary experts)", K, hd->M);
    *covered = moe_vocab_coverage(hd->q, hd->expert, hd->N, hd->M, K);
    return MOE_OK;
}

moe_status moe_vocab_head_topk(moe_vocab_head *hd, int32_t *ids, float *logp, int32_t *count, int64_t stride,
                               const float *h, const moe_vocab_params *prm, int N, int K)
{
    const int M = hd->M, d = hd->d;
    hd->N = 0, hd->can_backward = 0; /* the buffers are reused: the last forward is gone */
    if (K < 1 || K > M)
        return moe_errorf(MOE_ERR_ARG, "vocab_top_k=%d must be in [1, %d] (the vocabulary experts)", K, M);
    if (N < 1) return moe_errorf(MOE_ERR_ARG, "vocabulary head: %d positions", N);
    const int64_t need = moe_vocab_part_topk_size(hd->p, K);
    if (stride < need)
        return moe_errorf(MOE_ERR_ARG, "vocabulary head: a top-%d list needs room for %lld candidates per "
                                       "position, the stride is %lld", K, (long long)need, (long long)stride);
    const int64_t items = (int64_t)N * K;
    moe_status st = grow_items(hd, items);
    if (st) return st;
    moe_vocab_router_forward(hd->logits, hd->q, hd->lse, h, prm->router_w, prm->router_b, N, d, M);
    if ((st = check_router(hd, N))) return st;
    moe_vocab_topk_select(hd->expert, hd->q, N, M, K);
    moe_vocab_group(hd->order, hd->goff, hd->expert, (int)items, M);
    moe_vocab_pack(hd->x, NULL, h, NULL, hd->order, (int)items, K, d);
    if ((st = grow_scratch(hd, moe_vocab_expert_scratch(hd->goff, hd->p, 0, M)))) return st;
    moe_vocab_expert_logprobs(hd->scratch, hd->x, hd->goff, prm->w, prm->b, hd->p, 0, M, d);
    /* item i's row: expert m's block of the scratch, then its place among the expert's rows */
    const int32_t *poff = moe_vocab_part_offsets(hd->p);
    int64_t block = 0;
    for (int m = 0; m < M; m++) {
        const int len = poff[m + 1] - poff[m];
        for (int r = hd->goff[m]; r < hd->goff[m + 1]; r++)
            hd->rowp[hd->order[r]] = hd->scratch + block + (int64_t)(r - hd->goff[m]) * len;
        block += (int64_t)(hd->goff[m + 1] - hd->goff[m]) * len;
    }
    moe_vocab_topk_combine(ids, logp, count, stride, hd->logits, hd->lse, hd->expert, hd->rowp, hd->p, N, K);
    for (int n = 0; n < N; n++)
        if (!moe_all_finite(logp + (size_t)n * stride, (size_t)count[n]))
            return moe_errorf(MOE_ERR_NONFINITE, "vocabulary head: top-%d log-probabilities of position %d are not "
                                                 "finite (NaN or Inf in the expert weights?)", K, n);
    return MOE_OK;
}
