/* Plain references of the vocabulary head (head.h): every kernel's _ref on
 * the same grouped interface, naive loops accumulating in double; and the
 * whole-head references on parameters stored by token id, which know
 * nothing of grouping or the expert-major layout. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vocab/head.h"

static double dot_d(const float *a, const float *b, int d)
{
    double s = 0;
    for (int k = 0; k < d; k++) s += (double)a[k] * b[k];
    return s;
}

/* ---- kernel references (grouped interface) ---- */

void moe_vocab_router_forward_ref(float *logits, float *q, float *lse, const float *h, const float *w,
                                  const float *b, int N, int d, int M)
{
    for (int n = 0; n < N; n++) {
        double mx = -INFINITY, s = 0;
        for (int m = 0; m < M; m++) {
            const double r = dot_d(h + (size_t)n * d, w + (size_t)m * d, d) + b[m];
            logits[(size_t)n * M + m] = (float)r;
            if (r > mx) mx = r;
        }
        for (int m = 0; m < M; m++) s += exp((double)logits[(size_t)n * M + m] - mx);
        for (int m = 0; m < M; m++) q[(size_t)n * M + m] = (float)(exp((double)logits[(size_t)n * M + m] - mx) / s);
        lse[n] = (float)(mx + log(s));
    }
}

void moe_vocab_router_backward_ref(float *dh, float *dw, float *db, float *dlogits, const float *q,
                                   const int32_t *expert, const float *h, const float *w, float dloss, int N,
                                   int d, int M)
{
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++)
            dlogits[(size_t)n * M + m] = (float)(((double)q[(size_t)n * M + m] - (m == expert[n])) * dloss);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < d; k++) {
            double s = 0;
            for (int m = 0; m < M; m++) s += (double)dlogits[(size_t)n * M + m] * w[(size_t)m * d + k];
            dh[(size_t)n * d + k] += (float)s;
        }
    for (int m = 0; m < M; m++) {
        for (int k = 0; k < d; k++) {
            double s = 0;
            for (int n = 0; n < N; n++) s += (double)dlogits[(size_t)n * M + m] * h[(size_t)n * d + k];
            dw[(size_t)m * d + k] += (float)s;
        }
        double s = 0;
        for (int n = 0; n < N; n++) s += dlogits[(size_t)n * M + m];
        db[m] += (float)s;
    }
}

/* Local expert j of [m0, m1): global index, token count, first local row,
 * grouped rows [r0, r1), float offset of its scratch block. */
typedef struct {
    int m, n, wrow, r0, r1;
    int64_t block;
} expert_at;

static expert_at expert_info(const int32_t *offsets, const moe_vocab_part *p, int m0, int j)
{
    const int32_t *poff = moe_vocab_part_offsets(p);
    int64_t block = 0;
    for (int i = 0; i < j; i++) block += (int64_t)(offsets[i + 1] - offsets[i]) * (poff[m0 + i + 1] - poff[m0 + i]);
    const int m = m0 + j;
    return (expert_at){m, poff[m + 1] - poff[m], poff[m] - poff[m0], offsets[j], offsets[j + 1], block};
}

/* z (n) in double for grouped row i of an expert whose rows start at wrow. */
static void logits_d(double *z, const float *x, const float *w, const float *b, int wrow, int n, int d)
{
    for (int c = 0; c < n; c++) z[c] = dot_d(x, w + (size_t)(wrow + c) * d, d) + b[wrow + c];
}

static double lse_d(const double *z, int n)
{
    double mx = -INFINITY, s = 0;
    for (int c = 0; c < n; c++) mx = z[c] > mx ? z[c] : mx;
    for (int c = 0; c < n; c++) s += exp(z[c] - mx);
    return mx + log(s);
}

moe_status moe_vocab_expert_forward_ref(float *loss, float *probs, const float *x, const int32_t *y,
                                        const int32_t *offsets, const float *w, const float *b,
                                        const moe_vocab_part *p, int m0, int m1, int d)
{
    const int32_t *assign = moe_vocab_part_assign(p), *ids = moe_vocab_part_ids(p);
    const int V = moe_vocab_part_vocab(p);
    double *z = malloc((size_t)moe_vocab_part_max_size(p) * sizeof *z);
    if (!z) return moe_errorf(MOE_ERR_NOMEM, "vocabulary expert reference");
    const int32_t *poff = moe_vocab_part_offsets(p);
    for (int j = 0; j < m1 - m0; j++) {
        const expert_at e = expert_info(offsets, p, m0, j);
        for (int i = e.r0; i < e.r1; i++) {
            if (y[i] < 0 || y[i] >= V || assign[y[i]] != e.m) {
                free(z);
                return moe_errorf(MOE_ERR_ARG, "vocabulary expert %d: grouped row %d has target token %d, which "
                                               "is not one of its tokens", e.m, i, (int)y[i]);
            }
            logits_d(z, x + (size_t)i * d, w, b, e.wrow, e.n, d);
            const double lse = lse_d(z, e.n);
            float *pr = probs + e.block + (int64_t)(i - e.r0) * e.n;
            for (int c = 0; c < e.n; c++) {
                pr[c] = (float)exp(z[c] - lse);
                if (ids[poff[e.m] + c] == y[i]) loss[i] = (float)(lse - z[c]);
            }
        }
    }
    free(z);
    return MOE_OK;
}

void moe_vocab_expert_backward_ref(float *dx, float *dw, float *db, float *probs, const float *x,
                                   const int32_t *y, const int32_t *offsets, const float *w,
                                   const moe_vocab_part *p, int m0, int m1, int d, float dloss)
{
    const int32_t *ids = moe_vocab_part_ids(p), *poff = moe_vocab_part_offsets(p);
    for (int j = 0; j < m1 - m0; j++) {
        const expert_at e = expert_info(offsets, p, m0, j);
        if (e.r1 == e.r0) continue; /* no rows: its gradient is not touched */
        float *dz = probs + e.block;
        const int n = e.n;
        for (int i = e.r0; i < e.r1; i++)
            for (int c = 0; c < n; c++) {
                float *z = dz + (int64_t)(i - e.r0) * n + c;
                *z = (float)(((double)*z - (ids[poff[e.m] + c] == y[i])) * dloss);
            }
        for (int c = 0; c < n; c++) { /* the expert's x rows are read here ... */
            for (int k = 0; k < d; k++) {
                double s = 0;
                for (int i = e.r0; i < e.r1; i++) s += (double)dz[(int64_t)(i - e.r0) * n + c] * x[(size_t)i * d + k];
                dw[(size_t)(e.wrow + c) * d + k] += (float)s;
            }
            double s = 0;
            for (int i = e.r0; i < e.r1; i++) s += dz[(int64_t)(i - e.r0) * n + c];
            db[e.wrow + c] += (float)s;
        }
        for (int i = e.r0; i < e.r1; i++) /* ... before its dx rows (which may be x) are written */
            for (int k = 0; k < d; k++) {
                double s = 0;
                for (int c = 0; c < n; c++) s += (double)dz[(int64_t)(i - e.r0) * n + c] * w[(size_t)(e.wrow + c) * d + k];
                dx[(size_t)i * d + k] = (float)s;
            }
    }
}

moe_status moe_vocab_expert_logprobs_ref(float *logp, const float *x, const int32_t *offsets, const float *w,
                                         const float *b, const moe_vocab_part *p, int m0, int m1, int d)
{
    double *z = malloc((size_t)moe_vocab_part_max_size(p) * sizeof *z);
    if (!z) return moe_errorf(MOE_ERR_NOMEM, "vocabulary expert reference");
    for (int j = 0; j < m1 - m0; j++) {
        const expert_at e = expert_info(offsets, p, m0, j);
        for (int i = e.r0; i < e.r1; i++) {
            logits_d(z, x + (size_t)i * d, w, b, e.wrow, e.n, d);
            const double lse = lse_d(z, e.n);
            float *o = logp + e.block + (int64_t)(i - e.r0) * e.n;
            for (int c = 0; c < e.n; c++) o[c] = (float)(z[c] - lse);
        }
    }
    free(z);
    return MOE_OK;
}

/* ---- whole-head references, parameters by token id ---- */

/* Router probabilities q (M) and its logsumexp, in double, for one position. */
static double router_d(double *r, const float *h, const float *rw, const float *rb, int d, int M)
{
    for (int m = 0; m < M; m++) r[m] = dot_d(h, rw + (size_t)m * d, d) + rb[m];
    return lse_d(r, M);
}

/* Logits of every token of expert e (by id: z[v] for assign[v] == e; others
 * untouched); returns their logsumexp. */
static double expert_d(double *z, const float *h, const float *w, const float *b, const int32_t *assign, int e,
                       int d, int V)
{
    double mx = -INFINITY, s = 0;
    for (int v = 0; v < V; v++)
        if (assign[v] == e) {
            z[v] = dot_d(h, w + (size_t)v * d, d) + b[v];
            mx = z[v] > mx ? z[v] : mx;
        }
    for (int v = 0; v < V; v++)
        if (assign[v] == e) s += exp(z[v] - mx);
    return mx + log(s);
}

double moe_vocab_loss_ref(double *loss, const float *h, const int32_t *targets, const float *rw, const float *rb,
                          const float *w, const float *b, const int32_t *assign, int N, int d, int V, int M)
{
    double *r = malloc((size_t)M * sizeof *r), *z = malloc((size_t)V * sizeof *z), total = 0;
    if (!r || !z) {
        free(r), free(z);
        return NAN;
    }
    for (int n = 0; n < N; n++) {
        const float *hn = h + (size_t)n * d;
        const int y = targets[n], e = assign[y];
        const double lse_r = router_d(r, hn, rw, rb, d, M), lse_e = expert_d(z, hn, w, b, assign, e, d, V);
        const double l = (lse_r - r[e]) + (lse_e - z[y]);
        if (loss) loss[n] = l;
        total += l;
    }
    free(r), free(z);
    return total / N;
}

moe_status moe_vocab_backward_ref(float *dh, float *drw, float *drb, float *dw, float *db, const float *h,
                                  const int32_t *targets, const float *rw, const float *rb, const float *w,
                                  const float *b, const int32_t *assign, int N, int d, int V, int M, double dloss)
{
    double *r = malloc((size_t)M * sizeof *r), *z = malloc((size_t)V * sizeof *z);
    double *g = malloc((size_t)d * sizeof *g);
    if (!r || !z || !g) {
        free(r), free(z), free(g);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head reference");
    }
    for (int n = 0; n < N; n++) {
        const float *hn = h + (size_t)n * d;
        const int y = targets[n], e = assign[y];
        const double lse_r = router_d(r, hn, rw, rb, d, M), lse_e = expert_d(z, hn, w, b, assign, e, d, V);
        for (int k = 0; k < d; k++) g[k] = 0;
        for (int m = 0; m < M; m++) { /* -log q_e: d/dr_m = q_m - [m = e] */
            const double dr = (exp(r[m] - lse_r) - (m == e)) * dloss;
            for (int k = 0; k < d; k++) {
                g[k] += dr * rw[(size_t)m * d + k];
                drw[(size_t)m * d + k] += (float)(dr * hn[k]);
            }
            drb[m] += (float)dr;
        }
        for (int v = 0; v < V; v++) { /* -log p_e(y): d/dz_v = p_v - [v = y], tokens of e only */
            if (assign[v] != e) continue;
            const double dz = (exp(z[v] - lse_e) - (v == y)) * dloss;
            for (int k = 0; k < d; k++) {
                g[k] += dz * w[(size_t)v * d + k];
                dw[(size_t)v * d + k] += (float)(dz * hn[k]);
            }
            db[v] += (float)dz;
        }
        for (int k = 0; k < d; k++) dh[(size_t)n * d + k] += (float)g[k];
    }
    free(r), free(z), free(g);
    return MOE_OK;
}

moe_status moe_vocab_model_ref(double *P, const float *h, const float *rw, const float *rb, const float *w,
                               const float *b, const int32_t *assign, int N, int d, int V, int M)
{
    return moe_vocab_topk_ref(P, h, rw, rb, w, b, assign, N, d, V, M, M);
}

moe_status moe_vocab_topk_ref(double *P, const float *h, const float *rw, const float *rb, const float *w,
                              const float *b, const int32_t *assign, int N, int d, int V, int M, int K)
{
    double *r = malloc((size_t)M * sizeof *r), *z = malloc((size_t)V * sizeof *z);
    unsigned char *chosen = malloc((size_t)M);
    if (!r || !z || !chosen) {
        free(r), free(z), free(chosen);
        return moe_errorf(MOE_ERR_NOMEM, "vocabulary head reference");
    }
    for (int n = 0; n < N; n++) {
        const float *hn = h + (size_t)n * d;
        const double lse_r = router_d(r, hn, rw, rb, d, M);
        /* T_K: K times the largest remaining q, ties to the lower index */
        memset(chosen, 0, (size_t)M);
        double sq = 0;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int m = 0; m < M; m++)
                if (!chosen[m] && (best < 0 || r[m] > r[best])) best = m;
            chosen[best] = 1;
            sq += exp(r[best] - lse_r);
        }
        double *Pn = P + (size_t)n * V;
        for (int v = 0; v < V; v++) Pn[v] = 0;
        for (int e = 0; e < M; e++) {
            if (!chosen[e]) continue;
            const double lse_e = expert_d(z, hn, w, b, assign, e, d, V), qe = exp(r[e] - lse_r);
            for (int v = 0; v < V; v++)
                if (assign[v] == e) Pn[v] = qe * exp(z[v] - lse_e) / sq;
        }
    }
    free(r), free(z), free(chosen);
    return MOE_OK;
}
