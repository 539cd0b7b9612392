/* Test-only exporter for tests/vocab/vocab_ref.py: builds a small
 * vocabulary-expert head (frequency partition of uneven counts, one expert
 * that no target of step 0 falls in), runs the fast head (moe_vocab_head)
 * and writes to an HDF5 file (serial driver):
 *   /inputs   h, targets, assign, router_w, router_b, weight, bias (rows by
 *             token id, the checkpoint layout) and the AdamW settings;
 *   /out      per-position loss, dh, /out/grad/<param> (rows by token id),
 *             activated (M), top-K lists for K = 1, 2, M (ids, logp, count)
 *             and their coverage;
 *   /train/step{s} for 3 AdamW steps with different targets (each step
 *             leaves other experts idle): targets, loss, the parameters and
 *             both moments after the step (rows by token id), expert_step.
 * The AdamW step is written here with the formula of src/train/train.c
 * (bias-corrected moments, decoupled weight decay on matrices), applied to
 * the router always and to an expert's rows only when it received rows.
 *
 * Usage: vocab_export OUT.h5 */
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "vocab/head.h"

enum { V = 240, D = 16, M = 6, N = 40, STEPS = 3 };
static const double LR = 1e-2, B1 = 0.9, B2 = 0.95, EPS = 1e-8, WD = 0.1;
/* the expert no target of each step falls in (-1: none) */
static const int IDLE[STEPS][2] = {{4, -1}, {1, 4}, {0, -1}};

static int bad;

static int fail(const char *what, moe_status s)
{
    fprintf(stderr, "vocab_export: %s: %s: %s\n", what, moe_status_str(s), moe_error_detail());
    return 1;
}

static void write_ds(hid_t f, const char *path, hid_t type, const void *data, int ndim, const int64_t *shape)
{
    hsize_t dims[2];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t sp = H5Screate_simple(ndim, dims, NULL);
    hid_t ds = H5Dcreate2(f, path, type, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    if (ds < 0 || H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
        fprintf(stderr, "vocab_export: cannot write %s\n", path);
        bad = 1;
    }
    if (ds >= 0) H5Dclose(ds);
    H5Sclose(sp);
    H5Pclose(lcpl);
}

static void write_f(hid_t f, const char *path, const float *x, int64_t rows, int64_t cols)
{
    const int64_t shape[2] = {rows, cols};
    write_ds(f, path, H5T_NATIVE_FLOAT, x, cols ? 2 : 1, shape);
}

/* A parameter-shaped block under prefix, with the output rows by token id. */
static void write_params(hid_t f, const char *prefix, const float *block, const moe_vocab_part *p)
{
    moe_vocab_params x;
    moe_vocab_params_point(&x, (float *)block, V, D, M);
    float *byid = malloc((size_t)V * D * sizeof *byid);
    char path[128];
    snprintf(path, sizeof path, "%s/router_w", prefix);
    write_f(f, path, x.router_w, M, D);
    snprintf(path, sizeof path, "%s/router_b", prefix);
    write_f(f, path, x.router_b, M, 0);
    moe_vocab_rows_scatter(byid, x.w, p, D);
    snprintf(path, sizeof path, "%s/weight", prefix);
    write_f(f, path, byid, V, D);
    moe_vocab_rows_scatter(byid, x.b, p, 1);
    snprintf(path, sizeof path, "%s/bias", prefix);
    write_f(f, path, byid, V, 0);
    free(byid);
}

/* Targets of a step: position n takes a random token of expert (n + step)
 * mod M, the next expert when that one is idle in the step, so that every
 * other expert gets rows. */
static void draw_targets(int32_t *t, const moe_vocab_part *p, int step)
{
    const int32_t *off = moe_vocab_part_offsets(p), *ids = moe_vocab_part_ids(p);
    for (int n = 0; n < N; n++) {
        int e = (n + step) % M;
        while (e == IDLE[step][0] || e == IDLE[step][1]) e = (e + 1) % M;
        const double u = moe_rng_uniform(21, MOE_RNG_BENCH, (uint32_t)n, (uint32_t)step, 1, 0);
        t[n] = ids[off[e] + (int)(u * (off[e + 1] - off[e]))];
    }
}

/* AdamW over n elements at bias-correction step t (src/train/train.c). */
static void adamw(float *p, float *m, float *v, const float *g, size_t n, float wd, int64_t t)
{
    const float ib1 = (float)(1.0 / (1.0 - pow(B1, (double)t))), ib2 = (float)(1.0 / (1.0 - pow(B2, (double)t)));
    const float b1 = (float)B1, b2 = (float)B2, lr = (float)LR, eps = (float)EPS;
    for (size_t i = 0; i < n; i++) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * ib1 / (sqrtf(vi * ib2) + eps) + wd * p[i]);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vocab_export OUT.h5\n");
        return 2;
    }
    /* partition: frequency bands of Zipf-like counts (uneven set sizes) */
    int64_t counts[V];
    int32_t assign[V];
    for (int v = 0; v < V; v++) counts[v] = (int64_t)(1000.0 / (1 + (v * 7) % V)) + (v % 3);
    moe_status s = moe_vocab_partition_frequency(assign, counts, V, M);
    moe_vocab_part *p = NULL;
    if (s || (s = moe_vocab_part_create(&p, assign, V, M))) return fail("partition", s);
    const size_t np = moe_vocab_params_numel(V, D, M);
    float *pb = calloc(np, sizeof *pb), *gb = calloc(np, sizeof *gb), *mb = calloc(np, sizeof *mb);
    float *vb = calloc(np, sizeof *vb), *h = malloc((size_t)N * D * sizeof *h), *dh = calloc((size_t)N * D, 4);
    float *loss = malloc(N * sizeof *loss);
    int32_t targets[N];
    moe_vocab_params prm, grad, mom, vel;
    moe_vocab_params_point(&prm, pb, V, D, M);
    moe_vocab_params_point(&grad, gb, V, D, M);
    moe_vocab_params_point(&mom, mb, V, D, M);
    moe_vocab_params_point(&vel, vb, V, D, M);
    for (size_t i = 0; i < np; i++) pb[i] = 0.5f * (float)moe_rng_normal(21, MOE_RNG_BENCH, (uint32_t)i, 0, 2, 0);
    for (int i = 0; i < N * D; i++) h[i] = (float)moe_rng_normal(21, MOE_RNG_BENCH, (uint32_t)i, 0, 3, 0);
    /* the initial parameters are drawn in expert-major order; the file holds them by id */
    draw_targets(targets, p, 0);
    moe_vocab_head *hd;
    if ((s = moe_vocab_head_create(&hd, p, D))) return fail("head", s);

    hid_t f = H5Fcreate(argv[1], H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return fail("create file", MOE_ERR_IO);
    write_f(f, "/inputs/h", h, N, D);
    write_ds(f, "/inputs/targets", H5T_NATIVE_INT32, targets, 1, (int64_t[]){N});
    write_ds(f, "/inputs/assign", H5T_NATIVE_INT32, assign, 1, (int64_t[]){V});
    write_params(f, "/inputs", pb, p);
    const double hyper[5] = {LR, B1, B2, EPS, WD};
    write_ds(f, "/inputs/adamw", H5T_NATIVE_DOUBLE, hyper, 1, (int64_t[]){5});

    /* forward + backward of the mean loss */
    if ((s = moe_vocab_head_forward(hd, loss, h, targets, &prm, N)) ||
        (s = moe_vocab_head_backward(hd, dh, &grad, h, &prm, 1.0f / N)))
        return fail("forward/backward", s);
    write_f(f, "/out/loss", loss, N, 0);
    write_f(f, "/out/dh", dh, N, D);
    write_params(f, "/out/grad", gb, p);
    write_ds(f, "/out/activated", H5T_NATIVE_INT32, moe_vocab_head_activated(hd), 1, (int64_t[]){M});
    if ((s = moe_vocab_head_forward(hd, loss, h, targets, &prm, N))) return fail("forward", s);
    const int Ks[3] = {1, 2, M};
    int64_t cov[3];
    for (int i = 0; i < 3; i++)
        if ((s = moe_vocab_head_coverage(hd, Ks[i], &cov[i]))) return fail("coverage", s);
    for (int i = 0; i < 3; i++) {
        const int64_t stride = moe_vocab_part_topk_size(p, Ks[i]);
        int32_t *ids = calloc((size_t)(N * stride), 4), cnt[N];
        float *lp = calloc((size_t)(N * stride), 4);
        if ((s = moe_vocab_head_topk(hd, ids, lp, cnt, stride, h, &prm, N, Ks[i]))) return fail("top-k", s);
        char path[64];
        snprintf(path, sizeof path, "/out/topk/%d/ids", Ks[i]);
        write_ds(f, path, H5T_NATIVE_INT32, ids, 2, (int64_t[]){N, stride});
        snprintf(path, sizeof path, "/out/topk/%d/logp", Ks[i]);
        write_f(f, path, lp, N, stride);
        snprintf(path, sizeof path, "/out/topk/%d/count", Ks[i]);
        write_ds(f, path, H5T_NATIVE_INT32, cnt, 1, (int64_t[]){N});
        snprintf(path, sizeof path, "/out/topk/%d/coverage", Ks[i]);
        write_ds(f, path, H5T_NATIVE_INT64, &cov[i], 1, (int64_t[]){1});
        free(ids), free(lp);
    }

    /* AdamW steps: only experts with rows are updated, each at its own step count */
    int64_t expert_step[M] = {0};
    const int32_t *poff = moe_vocab_part_offsets(p);
    for (int step = 0; step < STEPS; step++) {
        draw_targets(targets, p, step);
        memset(gb, 0, np * sizeof *gb);
        memset(dh, 0, (size_t)N * D * sizeof *dh);
        if ((s = moe_vocab_head_forward(hd, loss, h, targets, &prm, N)) ||
            (s = moe_vocab_head_backward(hd, dh, &grad, h, &prm, 1.0f / N)))
            return fail("step", s);
        double mean = 0;
        for (int n = 0; n < N; n++) mean += loss[n];
        mean /= N;
        adamw(prm.router_w, mom.router_w, vel.router_w, grad.router_w, (size_t)M * D, (float)WD, step + 1);
        adamw(prm.router_b, mom.router_b, vel.router_b, grad.router_b, M, 0.0f, step + 1);
        const int32_t *act = moe_vocab_head_activated(hd);
        for (int m = 0; m < M; m++) {
            if (!act[m]) continue; /* an idle expert keeps weights and moments bit for bit */
            const size_t r0 = (size_t)poff[m], n = (size_t)(poff[m + 1] - poff[m]);
            adamw(prm.w + r0 * D, mom.w + r0 * D, vel.w + r0 * D, grad.w + r0 * D, n * D, (float)WD, expert_step[m] + 1);
            adamw(prm.b + r0, mom.b + r0, vel.b + r0, grad.b + r0, n, 0.0f, expert_step[m] + 1);
            expert_step[m]++;
        }
        char path[64];
        snprintf(path, sizeof path, "/train/step%d/targets", step);
        write_ds(f, path, H5T_NATIVE_INT32, targets, 1, (int64_t[]){N});
        snprintf(path, sizeof path, "/train/step%d/loss", step);
        write_ds(f, path, H5T_NATIVE_DOUBLE, &mean, 1, (int64_t[]){1});
        snprintf(path, sizeof path, "/train/step%d/expert_step", step);
        write_ds(f, path, H5T_NATIVE_INT64, expert_step, 1, (int64_t[]){M});
        const char *what[3] = {"params", "m", "v"};
        const float *blocks[3] = {pb, mb, vb};
        for (int k = 0; k < 3; k++) {
            snprintf(path, sizeof path, "/train/step%d/%s", step, what[k]);
            write_params(f, path, blocks[k], p);
        }
    }
    H5Fclose(f);
    moe_vocab_head_destroy(hd);
    moe_vocab_part_destroy(p);
    free(pb), free(gb), free(mb), free(vb), free(h), free(dh), free(loss);
    return bad;
}
