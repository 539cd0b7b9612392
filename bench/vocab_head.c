/* Benchmark (not a test): the vocabulary-expert head against the full
 * softmax head, single process, in one interleaved run (rounds alternate
 * the two, medians reported).
 *
 * Training: forward + backward over N positions: loss, dh and every
 * parameter gradient. The full head is the model's own formulation
 * (src/model/ops.h): logits = h W^T (cblas_sgemm), fused softmax
 * cross-entropy, dlogits, matmul backward (dh, dW); timed both over all N
 * rows at once (as moe_model does) and in row chunks (smaller, cache-warm
 * logits), the faster being the baseline. The vocabulary head is
 * moe_vocab_head_forward + _backward (router, grouping, one GEMM per expert
 * tile, combine).
 * Generation: the next-token distribution for a batch of B positions: the
 * full head computes V logits and their softmax; the vocabulary head the
 * router and the K chosen experts' lists (moe_vocab_head_topk).
 *
 * Data: targets drawn from a Zipf(1) law over the V ids (natural text is
 * close to it), the partition by frequency bands of those counts (what
 * `vocab_partition = frequency` builds) or a random balanced one.
 * The model's cross-entropy kernel takes byte targets: the full head's
 * targets are the Zipf ids mod 256 (its cost does not depend on them).
 *
 * Prints a table and `PERF <name> <value> <unit>` lines.
 * Usage: vocab_head [--V n] [--d n] [--M n] [--N n] [--K n] [--rounds n]
 *                   [--partition frequency|random] [--chunk n] [--only train|gen|partition] [--quick] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/moe.h"
#include "core/rng.h"
#include "model/ops.h"
#include "vocab/head.h"

typedef struct {
    int V, d, M, N, K, rounds, chunk, random_part;
    int only; /* 0: all, 1: training, 2: generation, 3: partition */
} opts;

static int die(const char *what, moe_status s)
{
    fprintf(stderr, "vocab_head: %s: %s: %s\n", what, moe_status_str(s), moe_error_detail());
    return 1;
}

static void *alloc(size_t n)
{
    void *p = moe_calloc(n, 1);
    if (!p) {
        fprintf(stderr, "vocab_head: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_d);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* Zipf(1) draws over [0, V) by inverting the cumulative weights. */
static void zipf(int32_t *out, int n, const double *cdf, int V, uint32_t stream)
{
    for (int i = 0; i < n; i++) {
        const double u = moe_rng_uniform(3, MOE_RNG_BENCH, (uint32_t)i, stream, 9, 0) * cdf[V - 1];
        int lo = 0, hi = V - 1;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (cdf[mid] < u) lo = mid + 1;
            else hi = mid;
        }
        out[i] = lo;
    }
}

static void fill(float *x, size_t n, float scale, uint32_t id)
{
    for (size_t i = 0; i < n; i++)
        x[i] = scale * (float)moe_rng_normal(3, MOE_RNG_BENCH, (uint32_t)i, (uint32_t)(i >> 32), id, 0);
}

/* ---- the full head (model kernels) ---- */
typedef struct {
    int V, d, N, chunk;
    const float *h, *w;
    float *dh, *dw, *logits, *probs, *losses;
    const int32_t *tg;
} full_head;

/* Rows [0, N) in chunks of c rows: logits, probs, losses, dlogits (over the
 * logits buffer, dead once probs exist), dh, dW. */
static void full_train(full_head *f, int c)
{
    const int V = f->V, d = f->d;
    for (int r0 = 0; r0 < f->N; r0 += c) {
        const int n = f->N - r0 < c ? f->N - r0 : c;
        moe_model_matmul_forward(f->logits, f->h + (size_t)r0 * d, f->w, NULL, n, d, V);
        moe_model_crossentropy_forward(f->losses + r0, f->probs, f->logits, f->tg + r0, n, V);
        memset(f->logits, 0, (size_t)n * V * sizeof(float));
        moe_model_crossentropy_backward(f->logits, f->probs, f->tg + r0, 1.0f / f->N, n, V);
        moe_model_matmul_backward(f->dh + (size_t)r0 * d, f->dw, NULL, f->logits, f->h + (size_t)r0 * d, f->w, n, d,
                                  V);
    }
}

/* logits of B rows (one sgemm, or one sgemv per row: no packing of W for
 * a single row), then their softmax. */
static void full_generate(full_head *f, const float *h, int B, int gemv)
{
    if (!gemv) moe_model_matmul_forward(f->logits, h, f->w, NULL, B, f->d, f->V);
    else
        for (int b = 0; b < B; b++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, f->V, f->d, 1.0f, f->w, f->d, h + (size_t)b * f->d, 1, 0.0f,
                        f->logits + (size_t)b * f->V, 1);
    moe_model_crossentropy_forward(f->losses, f->probs, f->logits, f->tg, B, f->V); /* softmax */
}

int main(int argc, char **argv)
{
    opts o = {50257, 256, 64, 2048, 2, 7, 256, 0, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick")) { /* tiny shapes; the other options keep their values */
            o.V = 5000, o.d = 64, o.M = 16, o.N = 256, o.rounds = 2, o.chunk = 64;
            continue;
        }
        if (!v) goto usage;
        if (!strcmp(a, "--V")) o.V = atoi(v);
        else if (!strcmp(a, "--d")) o.d = atoi(v);
        else if (!strcmp(a, "--M")) o.M = atoi(v);
        else if (!strcmp(a, "--N")) o.N = atoi(v);
        else if (!strcmp(a, "--K")) o.K = atoi(v);
        else if (!strcmp(a, "--rounds")) o.rounds = atoi(v);
        else if (!strcmp(a, "--chunk")) o.chunk = atoi(v);
        else if (!strcmp(a, "--only") && (!strcmp(v, "train") || !strcmp(v, "gen") || !strcmp(v, "partition")))
            o.only = !strcmp(v, "train") ? 1 : !strcmp(v, "gen") ? 2 : 3;
        else if (!strcmp(a, "--partition") && (!strcmp(v, "random") || !strcmp(v, "frequency")))
            o.random_part = !strcmp(v, "random");
        else goto usage;
        i++;
    }
    if (o.V < 2 || o.d < 1 || o.M < 2 || o.M > o.V || o.N < 16 || o.K < 1 || o.K > o.M || o.rounds < 1 ||
        o.chunk < 1)
        goto usage;
    const int V = o.V, d = o.d, M = o.M, N = o.N;

    /* targets, counts, partition */
    double *cdf = alloc((size_t)V * sizeof *cdf);
    for (int v = 0; v < V; v++) cdf[v] = (v ? cdf[v - 1] : 0) + 1.0 / (v + 1);
    int32_t *tg = alloc((size_t)N * sizeof *tg), *assign = alloc((size_t)V * sizeof *assign);
    int32_t *sample = alloc((size_t)1000000 * sizeof *sample);
    int64_t *counts = alloc((size_t)V * sizeof *counts);
    zipf(tg, N, cdf, V, 1);
    zipf(sample, 1000000, cdf, V, 2); /* a "training token file" for the counts */
    for (int i = 0; i < 1000000; i++) counts[sample[i]]++;
    moe_status s;
    if (o.random_part) {
        for (int v = 0; v < V; v++) assign[v] = v % M; /* then shuffle ids: balanced sets, scattered ids */
        for (int v = V - 1; v > 0; v--) {
            const int u = (int)(moe_rng_uniform(3, MOE_RNG_BENCH, (uint32_t)v, 0, 8, 0) * (v + 1));
            const int32_t t = assign[v];
            assign[v] = assign[u], assign[u] = t;
        }
    } else if ((s = moe_vocab_partition_frequency(assign, counts, V, M))) {
        return die("frequency partition", s);
    }
    moe_vocab_part *p;
    if ((s = moe_vocab_part_create(&p, assign, V, M))) return die("partition", s);
    const int32_t *poff = moe_vocab_part_offsets(p);
    double mean_s = 0;
    for (int n = 0; n < N; n++) mean_s += poff[assign[tg[n]] + 1] - poff[assign[tg[n]]];
    mean_s /= N;

    /* parameters and buffers */
    const size_t np = moe_vocab_params_numel(V, d, M);
    float *pb = alloc(np * sizeof(float)), *gb = alloc(np * sizeof(float));
    moe_vocab_params prm, grad;
    moe_vocab_params_point(&prm, pb, V, d, M);
    moe_vocab_params_point(&grad, gb, V, d, M);
    fill(pb, np, 0.05f, 1);
    float *h = alloc((size_t)N * d * sizeof(float)), *dh = alloc((size_t)N * d * sizeof(float));
    float *loss = alloc((size_t)N * sizeof(float));
    fill(h, (size_t)N * d, 1.0f, 2);
    moe_vocab_head *hd;
    if ((s = moe_vocab_head_create(&hd, p, d))) return die("head", s);
    const int Bmax = 16;
    const int64_t stride = moe_vocab_part_topk_size(p, o.K);
    int32_t *ids = alloc((size_t)(Bmax * stride) * sizeof *ids), *cnt = alloc(Bmax * sizeof *cnt);
    float *lp = alloc((size_t)(Bmax * stride) * sizeof *lp);

    full_head f = {V, d, N, o.chunk, h, prm.w, dh, grad.w, NULL, NULL, loss, NULL};
    const int rows_max = N > o.chunk ? N : o.chunk;
    f.logits = alloc((size_t)rows_max * V * sizeof(float));
    f.probs = alloc((size_t)rows_max * V * sizeof(float));
    f.tg = tg;

    printf("vocabulary-expert head vs full softmax head: V %d, d %d, M %d, N %d, K %d, partition %s, "
           "OpenBLAS threads %d, %d rounds (medians)\n",
           V, d, M, N, o.K, o.random_part ? "random" : "frequency", openblas_get_num_threads(), o.rounds);
    printf("mean |S_m*| over the targets %.0f (V/M = %.0f): multiply-adds per position (M + |S_m*|) d = %.3g vs "
           "V d = %.3g (%.1fx fewer)\n",
           mean_s, (double)V / M, (M + mean_s) * d, (double)V * d, V / (M + mean_s));

    if (o.only == 0 || o.only == 3) {
        /* ---- building the partition (once per run: not a hot path, timed for scale) ---- */
        int32_t *a2 = alloc((size_t)V * sizeof *a2);
        float *emb = alloc((size_t)V * d * sizeof *emb);
        fill(emb, (size_t)V * d, 1.0f, 5);
        moe_vocab_kmeans_config kc;
        moe_vocab_kmeans_config_default(&kc);
        double t0 = moe_now();
        if ((s = moe_vocab_partition_frequency(a2, counts, V, M))) return die("frequency partition", s);
        const double tf = moe_now() - t0;
        t0 = moe_now();
        if ((s = moe_vocab_partition_kmeans(a2, emb, V, d, M, &kc))) return die("k-means partition", s);
        const double tk = moe_now() - t0;
        printf("\npartition of %d ids into %d sets: frequency %.1f ms; k-means over (%d, %d) Gaussian embeddings, "
               "%d iterations, cap %.1f: %.2f s\n", V, M, 1e3 * tf, V, d, kc.iters, kc.balance, tk);
        printf("PERF vocab.partition_kmeans_s %.3f s k-means partition of V x d embeddings into M sets\n", tk);
        moe_free(a2), moe_free(emb);
    }

    if (o.only == 0 || o.only == 1) {
        /* ---- training, interleaved ---- */
        double *t_all = alloc(o.rounds * sizeof(double)), *t_chunk = alloc(o.rounds * sizeof(double));
        double *t_voc = alloc(o.rounds * sizeof(double));
        for (int r = -1; r < o.rounds; r++) { /* round -1 warms up */
            double t0 = moe_now();
            full_train(&f, N);
            const double a = moe_now() - t0;
            t0 = moe_now();
            full_train(&f, o.chunk);
            const double b = moe_now() - t0;
            t0 = moe_now();
            if ((s = moe_vocab_head_forward(hd, loss, h, tg, &prm, N))) return die("vocab forward", s);
            if ((s = moe_vocab_head_backward(hd, dh, &grad, h, &prm, 1.0f / N))) return die("vocab backward", s);
            const double c = moe_now() - t0;
            if (r >= 0) t_all[r] = a, t_chunk[r] = b, t_voc[r] = c;
        }
        const double ta = median(t_all, o.rounds), tc = median(t_chunk, o.rounds), tv = median(t_voc, o.rounds);
        const double tfull = ta < tc ? ta : tc;
        /* median() sorts: [0] is the fastest round (least disturbed by other load) */
        const double bfull = t_all[0] < t_chunk[0] ? t_all[0] : t_chunk[0];
        printf("\ntraining (forward + backward, %d positions)   median ms   tokens/s  (best round)\n", N);
        printf("  full head, all rows at once (as moe_model)  %9.2f %10.0f  (%.0f)\n", 1e3 * ta, N / ta, N / t_all[0]);
        printf("  full head, chunks of %4d rows              %9.2f %10.0f  (%.0f)\n", o.chunk, 1e3 * tc, N / tc,
               N / t_chunk[0]);
        printf("  vocabulary experts                          %9.2f %10.0f  (%.0f)   %.1fx the faster full head "
               "(best rounds: %.1fx)\n",
               1e3 * tv, N / tv, N / t_voc[0], tfull / tv, bfull / t_voc[0]);
        printf("PERF vocab.train_full %.0f tokens/s full softmax head forward+backward\n", N / tfull);
        printf("PERF vocab.train_experts %.0f tokens/s vocabulary-expert head forward+backward\n", N / tv);
        printf("PERF vocab.train_speedup %.2f x vocabulary-expert head / full head, training\n", tfull / tv);
        moe_free(t_all), moe_free(t_chunk), moe_free(t_voc);
    }

    if (o.only == 0 || o.only == 2) {
        /* ---- generation, interleaved; a new batch of rows each time (new experts chosen, as in decoding) ---- */
        const int batches[2] = {1, 16};
        printf("\ngeneration (next-token distribution)          median tokens/s  (best round)\n");
        for (int bi = 0; bi < 2; bi++) {
            const int B = batches[bi], reps = o.V > 20000 ? (B == 1 ? 40 : 8) : 20;
            double *tf = alloc(o.rounds * sizeof(double)), *tg1 = alloc(o.rounds * sizeof(double));
            double *tvk = alloc(o.rounds * sizeof(double));
            for (int r = -1; r < o.rounds; r++) {
                double t0 = moe_now();
                for (int k = 0; k < reps; k++) full_generate(&f, h + (size_t)((k * B) % (N - B)) * d, B, 0);
                const double a = (moe_now() - t0) / reps;
                t0 = moe_now();
                for (int k = 0; k < reps; k++) full_generate(&f, h + (size_t)((k * B) % (N - B)) * d, B, 1);
                const double b = (moe_now() - t0) / reps;
                t0 = moe_now();
                for (int k = 0; k < reps; k++)
                    if ((s = moe_vocab_head_topk(hd, ids, lp, cnt, stride, h + (size_t)((k * B) % (N - B)) * d,
                                                 &prm, B, o.K)))
                        return die("vocab top-k", s);
                const double c = (moe_now() - t0) / reps;
                if (r >= 0) tf[r] = a, tg1[r] = b, tvk[r] = c;
            }
            const double sf = B / median(tf, o.rounds), sv = B / median(tg1, o.rounds);
            const double se = B / median(tvk, o.rounds), best = sf > sv ? sf : sv;
            const double bf = B / (tf[0] < tg1[0] ? tf[0] : tg1[0]), be = B / tvk[0]; /* best rounds */
            printf("  batch %2d: full head, sgemm (as moe_model)  %10.0f  (%.0f)\n", B, sf, B / tf[0]);
            printf("  batch %2d: full head, sgemv per row         %10.0f  (%.0f)\n", B, sv, B / tg1[0]);
            printf("  batch %2d: top-%d vocabulary experts         %10.0f  (%.0f)   %.1fx the faster full head "
                   "(best rounds: %.1fx)\n", B, o.K, se, be, se / best, be / bf);
            printf("PERF vocab.gen_b%d_full %.0f tokens/s full head next-token distributions, batch %d\n", B, best, B);
            printf("PERF vocab.gen_b%d_experts %.0f tokens/s vocabulary experts top-2 distributions, batch %d\n", B, se, B);
            printf("PERF vocab.gen_b%d_speedup %.2f x vocabulary experts / full head, generation batch %d\n", B, se / best, B);
            moe_free(tf), moe_free(tg1), moe_free(tvk);
        }
    }
    moe_vocab_head_destroy(hd);
    moe_vocab_part_destroy(p);
    moe_free(cdf), moe_free(tg), moe_free(assign), moe_free(sample), moe_free(counts), moe_free(pb), moe_free(gb);
    moe_free(h), moe_free(dh), moe_free(loss), moe_free(ids), moe_free(cnt), moe_free(lp);
    moe_free(f.logits), moe_free(f.probs);
    return 0;
usage:
    fprintf(stderr, "usage: vocab_head [--V n] [--d n] [--M n] [--N n >= 16] [--K n] [--rounds n] "
                    "[--partition frequency|random] [--chunk n] [--only train|gen|partition] [--quick]\n");
    return 2;
}
