/* k-means partition, fast path, and the decision arithmetic it shares with
 * the _ref (partition_ref.c): moe_vocab_dist2 and the k-means++ clock.
 *
 * Lloyd's assignment step needs V x M distances: here ||x||^2 + ||c||^2 -
 * 2 x.c with x.c from one cblas_sgemm per block of rows. Those values are
 * not the distances the rule is defined on (moe_vocab_dist2), and their bits
 * depend on the BLAS kernel, so they only SCREEN: with a rigorous bound B on
 * |approx - dist2|, a centre whose lower bound exceeds the best upper bound
 * cannot win; the remaining candidates (usually one) are decided on
 * moe_vocab_dist2. The assignment is therefore the _ref's bit for bit,
 * whatever the kernel or thread count. Rows are independent, so threads take
 * contiguous row shares and nothing depends on their number.
 *
 * This file is compiled with -ffp-contract=off (src/vocab/CMakeLists.txt):
 * moe_vocab_dist2 must not turn into fused multiply-adds in one caller and
 * not in another. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/par.h"
#include "core/rng.h"
#include "vocab/partition_internal.h"

#define LANES 8

__attribute__((noinline)) double moe_vocab_dist2(const float *a, const float *b, int d)
{
    double s[LANES] = {0};
    int k = 0;
    for (; k + LANES <= d; k += LANES)
        for (int l = 0; l < LANES; l++) {
            const double t = (double)a[k + l] - (double)b[k + l];
            s[l] += t * t;
        }
    for (; k < d; k++) {
        const double t = (double)a[k] - (double)b[k];
        s[0] += t * t;
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

double moe_vocab_kmeans_clock(uint32_t seed, int round, int row)
{
    return -log(moe_rng_uniform(seed, MOE_RNG_VOCAB_KMEANS, (uint32_t)row, (uint32_t)round, 0, 0));
}

void moe_vocab_kmeans_config_default(moe_vocab_kmeans_config *c)
{
    c->seed = 1234;
    c->iters = 25;
    c->balance = 2.0;
}

moe_status moe_vocab_kmeans_check(const float *emb, int V, int d, int M, const moe_vocab_kmeans_config *cfg,
                                  int *cap)
{
    moe_status st = moe_vocab_check_sizes(V, M);
    if (st) return st;
    if (d < 1) return moe_errorf(MOE_ERR_ARG, "k-means partition: embedding width %d must be >= 1", d);
    if (cfg->iters < 1) return moe_errorf(MOE_ERR_ARG, "kmeans_iters=%d must be >= 1", cfg->iters);
    if (!(cfg->balance == 0 || (cfg->balance >= 1 && isfinite(cfg->balance))))
        return moe_errorf(MOE_ERR_ARG, "vocab_balance=%g must be 0 (no cap) or a finite number >= 1 "
                                       "(below 1 the capped experts could not hold all %d tokens)",
                          cfg->balance, V);
    for (int v = 0; v < V; v++)
        if (!moe_all_finite(emb + (size_t)v * d, (size_t)d))
            return moe_errorf(MOE_ERR_NONFINITE, "k-means partition: embedding row %d (token %d) has a NaN or "
                                                 "Inf", v, v);
    if (cfg->balance == 0) {
        *cap = V;
    } else {
        const int64_t c = moe_ceil_tol((double)V / M * cfg->balance);
        *cap = c > V ? V : (int)c;
    }
    return MOE_OK;
}

/* ---- the fast path ---- */

enum { BLOCK_ROWS = 2048 };

typedef struct {
    const float *x;      /* (V, d) */
    float *cent;         /* (M, d) */
    int V, d, M;
    uint32_t seed;
    /* seeding */
    double *d2;          /* (V) squared distance to the nearest chosen centre */
    unsigned char *chosen;
    int round, newc;     /* round being drawn, row of the centre added last */
    double best_key[MOE_PAR_MAX_THREADS];
    int best_row[MOE_PAR_MAX_THREADS];
    int fallback;        /* every weight is 0: draw uniformly among rows not chosen */
    /* assignment */
    const float *dots;   /* (rows of the block, M) x.c from sgemm */
    int r0, nr;          /* block rows [r0, r0 + nr) */
    const double *xx, *cc; /* (V), (M) squared norms */
    int32_t *assign;     /* (V) */
    double *own;         /* (V) dist2 to the own centre, or -1 when not computed */
} km_job;

/* One seeding round over a thread's rows: fold the last centre into d2
 * (round > 0), then the smallest clock / weight of the share. */
static void seed_run(void *ctx, int t, int nt)
{
    km_job *j = ctx;
    long v0, v1;
    moe_par_range(j->V, t, nt, &v0, &v1);
    double bk = INFINITY;
    int br = -1;
    for (long v = v0; v < v1; v++) {
        if (j->round > 0 && !j->fallback) {
            const double e = moe_vocab_dist2(j->x + (size_t)v * j->d, j->x + (size_t)j->newc * j->d, j->d);
            if (e < j->d2[v]) j->d2[v] = e;
        }
        double w;
        if (j->round == 0) w = 1.0;
        else if (j->fallback) w = j->chosen[v] ? 0.0 : 1.0;
        else w = j->d2[v];
        if (!(w > 0)) continue;
        const double key = moe_vocab_kmeans_clock(j->seed, j->round, (int)v) / w;
        if (key < bk) bk = key, br = (int)v; /* strict: the lower row keeps a tie */
    }
    j->best_key[t] = bk;
    j->best_row[t] = br;
}

/* Runs a seeding round; returns the row drawn or -1 when every weight is 0. */
static int seed_round(km_job *j, int nt)
{
    moe_par_run(nt, seed_run, j);
    double bk = INFINITY;
    int br = -1;
    for (int t = 0; t < nt; t++) /* shares ascend, so a tie keeps the lower row */
        if (j->best_row[t] >= 0 && j->best_key[t] < bk) bk = j->best_key[t], br = j->best_row[t];
    return br;
}

/* k-means++ seeding: M rounds, each adding the drawn row as a centre. */
static void seed_centres(km_job *j, int nt)
{
    for (int v = 0; v < j->V; v++) j->d2[v] = INFINITY;
    for (int r = 0; r < j->M; r++) {
        j->round = r;
        j->fallback = 0;
        int v = seed_round(j, nt);
        if (v < 0) { /* every row sits on a centre (fewer than M distinct rows) */
            j->fallback = 1;
            v = seed_round(j, nt);
        }
        j->chosen[v] = 1;
        j->newc = v;
        memcpy(j->cent + (size_t)r * j->d, j->x + (size_t)v * j->d, (size_t)j->d * sizeof *j->cent);
    }
    /* d2 still lacks the last centre: the assignment step does not need it */
}

/* Assignment of a thread's rows of the current block: screen with the sgemm
 * distances, decide on moe_vocab_dist2 among the survivors. */
static void assign_run(void *ctx, int t, int nt)
{
    km_job *j = ctx;
    const int M = j->M, d = j->d;
    /* |approx - dist2| <= 2 gamma_d sqrt(xx cc) (float dot product, any
     * summation order) + O(d 2^-53)(xx + cc) (double norms, the combination
     * and dist2 itself); both terms are taken twice over. */
    const double fl = 4.0 * (d + 1) * 0x1p-24, db = (8.0 * d + 64) * 0x1p-53;
    long i0, i1;
    moe_par_range(j->nr, t, nt, &i0, &i1);
    for (long i = i0; i < i1; i++) {
        const int v = j->r0 + (int)i;
        const float *dot = j->dots + (size_t)i * M, *x = j->x + (size_t)v * d;
        const double xx = j->xx[v];
        double upper = INFINITY;
        int exact = 0; /* an overflowed dot product screens nothing: decide on dist2 alone */
        for (int m = 0; m < M; m++) {
            const double a = xx + j->cc[m] - 2.0 * (double)dot[m];
            const double b = fl * sqrt(xx * j->cc[m]) + db * (xx + j->cc[m]);
            if (!isfinite(a + b)) exact = 1;
            if (a + b < upper) upper = a + b;
        }
        int best = -1, n_cand = 0;
        double best_d = INFINITY;
        for (int m = 0; m < M; m++) {
            const double a = xx + j->cc[m] - 2.0 * (double)dot[m];
            const double b = fl * sqrt(xx * j->cc[m]) + db * (xx + j->cc[m]);
            if (!exact && a - b > upper) continue; /* cannot be the nearest */
            if (n_cand++ == 0) {
                best = m; /* decided on dist2 only if another candidate shows up */
                continue;
            }
            if (n_cand == 2) best_d = moe_vocab_dist2(x, j->cent + (size_t)best * d, d);
            const double e = moe_vocab_dist2(x, j->cent + (size_t)m * d, d);
            if (e < best_d) best_d = e, best = m;
        }
        j->assign[v] = best;
        j->own[v] = n_cand > 1 ? best_d : -1.0;
    }
}

static void norms_run(void *ctx, int t, int nt)
{
    km_job *j = ctx;
    long v0, v1;
    moe_par_range(j->V, t, nt, &v0, &v1);
    double *xx = (double *)j->xx;
    for (long v = v0; v < v1; v++) {
        const float *x = j->x + (size_t)v * j->d;
        double s = 0;
        for (int k = 0; k < j->d; k++) s += (double)x[k] * x[k];
        xx[v] = s;
    }
}

/* dist2 of every row to its own centre where the assignment did not compute it. */
static void own_run(void *ctx, int t, int nt)
{
    km_job *j = ctx;
    long v0, v1;
    moe_par_range(j->V, t, nt, &v0, &v1);
    for (long v = v0; v < v1; v++)
        if (j->own[v] < 0)
            j->own[v] = moe_vocab_dist2(j->x + (size_t)v * j->d, j->cent + (size_t)j->assign[v] * j->d, j->d);
}

/* Centres = member means: per (centre, coordinate) a double sum over the
 * members in increasing row order, divided by the count, rounded to float. */
static void update_centres(float *cent, double *acc, const float *x, const int32_t *assign, const int *size,
                           int V, int d, int M)
{
    memset(acc, 0, (size_t)M * d * sizeof *acc);
    for (int v = 0; v < V; v++) {
        double *a = acc + (size_t)assign[v] * d;
        const float *xv = x + (size_t)v * d;
        for (int k = 0; k < d; k++) a[k] += (double)xv[k];
    }
    for (int m = 0; m < M; m++)
        for (int k = 0; k < d; k++) cent[(size_t)m * d + k] = (float)(acc[(size_t)m * d + k] / size[m]);
}

typedef struct {
    double dist;
    int32_t row;
} far_item;

/* farthest first, then the lower row */
static int far_cmp(const void *a, const void *b)
{
    const far_item *x = a, *y = b;
    if (x->dist != y->dist) return x->dist > y->dist ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

/* The size cap: evict the farthest (size - cap) members of every over-full
 * cluster (clusters in index order, farthest first, ties to the lower row),
 * then move the evicted rows in that order, each to the nearest centre
 * (dist2, ties to the lower index) whose cluster is below the cap. */
static moe_status balance(int32_t *assign, const double *own, const float *x, const float *cent, int *size,
                          int V, int d, int M, int cap)
{
    int n_evict = 0;
    for (int m = 0; m < M; m++)
        if (size[m] > cap) n_evict += size[m] - cap;
    if (n_evict == 0) return MOE_OK;
    far_item *it = malloc((size_t)V * sizeof *it);
    int32_t *evicted = malloc((size_t)n_evict * sizeof *evicted), *start = calloc((size_t)M + 1, sizeof *start);
    if (!it || !evicted || !start) {
        free(it), free(evicted), free(start);
        return moe_errorf(MOE_ERR_NOMEM, "k-means size cap");
    }
    /* members of every cluster, contiguous by cluster, by row */
    for (int v = 0; v < V; v++) start[assign[v] + 1]++;
    for (int m = 0; m < M; m++) start[m + 1] += start[m];
    int *fill = size; /* reused as a cursor, restored below */
    for (int m = 0; m < M; m++) fill[m] = start[m];
    for (int v = 0; v < V; v++) it[fill[assign[v]]++] = (far_item){own[v], v};
    int n = 0;
    for (int m = 0; m < M; m++) {
        size[m] = start[m + 1] - start[m];
        if (size[m] <= cap) continue;
        qsort(it + start[m], (size_t)size[m], sizeof *it, far_cmp);
        for (int i = 0; i < size[m] - cap; i++) evicted[n++] = it[start[m] + i].row;
        size[m] = cap;
    }
    for (int i = 0; i < n_evict; i++) {
        const int v = evicted[i];
        int best = -1;
        double best_d = INFINITY;
        for (int m = 0; m < M; m++) {
            if (size[m] >= cap) continue;
            const double e = moe_vocab_dist2(x + (size_t)v * d, cent + (size_t)m * d, d);
            if (best < 0 || e < best_d) best_d = e, best = m;
        }
        assign[v] = best; /* M * cap >= V, so some cluster has room */
        size[best]++;
    }
    free(it), free(evicted), free(start);
    return MOE_OK;
}

moe_status moe_vocab_partition_kmeans(int32_t *assign, const float *emb, int V, int d, int M,
                                      const moe_vocab_kmeans_config *cfg)
{
    int cap;
    moe_status st = moe_vocab_kmeans_check(emb, V, d, M, cfg, &cap);
    if (st) return st;
    km_job j = {.x = emb, .V = V, .d = d, .M = M, .seed = cfg->seed};
    j.cent = moe_calloc((size_t)M * d, sizeof *j.cent);
    j.d2 = moe_calloc((size_t)V, sizeof *j.d2);
    j.chosen = moe_calloc((size_t)V, 1);
    double *xx = moe_calloc((size_t)V, sizeof *xx), *cc = moe_calloc((size_t)M, sizeof *cc);
    double *acc = moe_calloc((size_t)M * d, sizeof *acc);
    float *dots = moe_calloc((size_t)BLOCK_ROWS * M, sizeof *dots);
    int32_t *prev = moe_calloc((size_t)V, sizeof *prev);
    int *size = moe_calloc((size_t)M, sizeof *size);
    j.own = j.d2; /* the seeding distances are dead once the centres are drawn */
    if (!j.cent || !j.d2 || !j.chosen || !xx || !cc || !acc || !dots || !prev || !size) {
        st = moe_errorf(MOE_ERR_NOMEM, "k-means partition of %d x %d embeddings into %d sets", V, d, M);
        goto done;
    }
    j.assign = assign;
    j.xx = xx, j.cc = cc;
    const int nt = moe_par_threads_for((long)V * d, 1 << 14);
    seed_centres(&j, nt);
    moe_par_run(nt, norms_run, &j);
    for (int it = 1; it <= cfg->iters; it++) {
        if (it > 1) {
            memcpy(prev, assign, (size_t)V * sizeof *prev);
            update_centres(j.cent, acc, emb, assign, size, V, d, M);
        }
        for (int m = 0; m < M; m++) {
            double s = 0;
            for (int k = 0; k < d; k++) s += (double)j.cent[(size_t)m * d + k] * j.cent[(size_t)m * d + k];
            cc[m] = s;
        }
        for (j.r0 = 0; j.r0 < V; j.r0 += BLOCK_ROWS) {
            j.nr = V - j.r0 < BLOCK_ROWS ? V - j.r0 : BLOCK_ROWS;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j.nr, M, d, 1.0f, emb + (size_t)j.r0 * d, d,
                        j.cent, d, 0.0f, dots, M);
            j.dots = dots;
            moe_par_run(moe_par_threads_for((long)j.nr * M, 1 << 12), assign_run, &j);
        }
        memset(size, 0, (size_t)M * sizeof *size);
        for (int v = 0; v < V; v++) size[assign[v]]++;
        /* empty clusters, in index order: each takes the row farthest from
         * its centre among clusters of two or more rows, and that row becomes
         * its centre */
        int own_done = 0;
        for (int m = 0; m < M; m++) {
            if (size[m]) continue;
            if (!own_done) moe_par_run(nt, own_run, &j), own_done = 1;
            int far = -1;
            for (int v = 0; v < V; v++)
                if (size[assign[v]] >= 2 && (far < 0 || j.own[v] > j.own[far])) far = v;
            size[assign[far]]--;
            assign[far] = m;
            size[m] = 1;
            j.own[far] = 0.0;
            memcpy(j.cent + (size_t)m * d, emb + (size_t)far * d, (size_t)d * sizeof *j.cent);
        }
        /* a repeated assignment is a fixed point: further steps change nothing */
        if (it > 1 && memcmp(prev, assign, (size_t)V * sizeof *prev) == 0) break;
    }
    if (cap < V) {
        moe_par_run(nt, own_run, &j);
        st = balance(assign, j.own, emb, j.cent, size, V, d, M, cap);
    }
done:
    moe_free(j.cent), moe_free(j.d2), moe_free(j.chosen), moe_free(xx), moe_free(cc), moe_free(acc);
    moe_free(dots), moe_free(prev), moe_free(size);
    return st;
}
