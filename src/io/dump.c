/* Layer dump writer (docs/formats.md section 2) and a small single-process reader.
 *
 * Every rank opens the file through parallel HDF5 (MPI-IO driver from
 * src/comm), makes the same metadata calls (attributes, dataset creation)
 * and writes its own hyperslab in one collective H5Dwrite per dataset: its
 * token rows, its experts' rows when it is the writing replica, and the
 * replicated tensors from world rank 0 only. Ranks with nothing to write
 * select nothing but still take part, as collective I/O requires.
 *
 * Failures that can differ between ranks (bad views, inconsistent
 * attributes, a row partition with holes or overlaps) are detected before
 * the file is touched and agreed on, so no rank enters a collective HDF5
 * call alone. HDF5's own failures on the collective path (unwritable
 * directory, full disk) are symmetric by nature and agreed after create and
 * after close. HDF5's automatic error printing is switched off while we
 * run (library code never prints); its innermost message goes into the
 * moe_error_detail instead. */
#include "io/dump.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <hdf5.h>

#include "comm/comm_h5.h"
#include "io/h5.h"

enum { DUMP_MAX_DIMS = 3, DUMP_PATH_MAX = MOE_H5_PATH_MAX };
/* Same temporary name on every rank without communication; one writer per path. */
#define DUMP_TMP_SUFFIX ".tmp.moe-dump"

/* ---- view checks (before any collective HDF5 call) ---- */

static int bad_rows(int64_t r0, int64_t n, int64_t total) { return r0 < 0 || n < 0 || r0 > total - n; }

static moe_status check_local(const char *path, const moe_dump_view *v, int rank)
{
    if (strlen(path) > DUMP_PATH_MAX - sizeof DUMP_TMP_SUFFIX)
        return moe_errorf(MOE_ERR_ARG, "dump: path too long: '%s'", path);
    if (v->tokens <= 0 || v->groups <= 0 || v->tokens % v->groups != 0)
        return moe_errorf(MOE_ERR_ARG, "dump: tokens=%lld must be a positive multiple of groups=%lld",
                          (long long)v->tokens, (long long)v->groups);
    if (v->d_model <= 0 || v->d_ff <= 0 || v->n_experts <= 0)
        return moe_errorf(MOE_ERR_ARG, "dump: d_model=%d, d_ff=%d, n_experts=%d must be positive",
                          v->d_model, v->d_ff, v->n_experts);
    /* top_k is recorded but unused by expert choice (router.h). */
    if (v->router == MOE_ROUTER_TOKEN_CHOICE && (v->top_k < 1 || v->top_k > v->n_experts))
        return moe_errorf(MOE_ERR_ARG, "dump: top_k=%d outside [1, n_experts=%d]", v->top_k, v->n_experts);
    if ((unsigned)v->router > MOE_ROUTER_EXPERT_CHOICE || (unsigned)v->activation > MOE_ACT_SWIGLU)
        return moe_errorf(MOE_ERR_ARG, "dump: unknown router (%d) or activation (%d)", (int)v->router,
                          (int)v->activation);
    if (!isfinite(v->capacity_factor) || !isfinite(v->aux_loss_coef) || !isfinite(v->z_loss_coef))
        return moe_errorf(MOE_ERR_ARG, "dump: capacity_factor=%g, aux_loss_coef=%g, z_loss_coef=%g must be finite",
                          v->capacity_factor, v->aux_loss_coef, v->z_loss_coef);
    if (bad_rows(v->t0, v->T_local, v->tokens))
        return moe_errorf(MOE_ERR_ARG, "dump: rank %d token rows [%lld, %lld) outside [0, %lld)", rank,
                          (long long)v->t0, (long long)(v->t0 + v->T_local), (long long)v->tokens);
    if (v->T_local > 0 && (!v->x || !v->y || !v->dy || !v->dx || !v->probs || !v->weight ||
                           !v->selected || !v->kept))
        return moe_errorf(MOE_ERR_ARG, "dump: rank %d has %lld token rows but a NULL token tensor", rank,
                          (long long)v->T_local);
    if (v->write_experts) {
        if (bad_rows(v->e0, v->E_local, v->n_experts))
            return moe_errorf(MOE_ERR_ARG, "dump: rank %d expert rows [%lld, %lld) outside [0, %d)", rank,
                              (long long)v->e0, (long long)(v->e0 + v->E_local), v->n_experts);
        if (v->E_local > 0 && (!v->w1 || !v->b1 || !v->w2 || !v->b2 || !v->gw1 || !v->gb1 || !v->gw2 ||
                               !v->gb2))
            return moe_errorf(MOE_ERR_ARG, "dump: rank %d writes %lld experts but an expert tensor is NULL",
                              rank, (long long)v->E_local);
    }
    if (rank == 0 && (!v->router_w || !v->grad_router_w))
        return moe_errorf(MOE_ERR_ARG, "dump: rank 0 needs router_w and grad_router_w");
    return MOE_OK;
}

/* The scalar attributes, packed without padding so that ranks can compare
 * them byte for byte (parallel HDF5 requires identical metadata calls). */
typedef struct {
    int64_t tokens, groups, d_model, d_ff, n_experts, top_k, router, normalize_topk, activation;
    double capacity_factor, aux_loss_coef, z_loss_coef;
    uint64_t seed;
} dump_attrs;

static void pack_attrs(dump_attrs *a, const moe_dump_view *v)
{
    memset(a, 0, sizeof *a);
    a->tokens = v->tokens;
    a->groups = v->groups;
    a->d_model = v->d_model;
    a->d_ff = v->d_ff;
    a->n_experts = v->n_experts;
    a->top_k = v->top_k;
    a->router = v->router;
    a->normalize_topk = v->normalize_topk;
    a->activation = v->activation;
    a->capacity_factor = v->capacity_factor;
    a->aux_loss_coef = v->aux_loss_coef;
    a->z_loss_coef = v->z_loss_coef;
    a->seed = v->seed;
}

/* ranges (W, 4): t0, T_local, e0, E_written of every rank. The token
 * ranges must tile [0, T) and the written expert ranges [0, E) exactly:
 * a hole would leave zeros in the file, an overlap two writers. Same
 * input on every rank, so the same verdict everywhere. */
static moe_status check_tiling(const int64_t *ranges, int W, int64_t T, int64_t E)
{
    for (int part = 0; part < 2; part++) {
        const char *what = part ? "expert" : "token";
        int64_t total = part ? E : T, sum = 0;
        for (int i = 0; i < W; i++) {
            const int64_t *a = ranges + 4 * i + 2 * part;
            sum += a[1];
            for (int j = 0; j < i; j++) {
                const int64_t *b = ranges + 4 * j + 2 * part;
                if (a[1] > 0 && b[1] > 0 && a[0] < b[0] + b[1] && b[0] < a[0] + a[1])
                    return moe_errorf(MOE_ERR_ARG, "dump: %s rows of ranks %d and %d overlap", what, j, i);
            }
        }
        if (sum != total)
            return moe_errorf(MOE_ERR_ARG, "dump: the ranks write %lld %s rows, expected %lld", (long long)sum,
                              what, (long long)total);
    }
    return MOE_OK;
}

/* Everything that can differ between ranks, agreed on before the file exists. */
static moe_status check_view(moe_comm *c, const char *path, const moe_dump_view *v, int rank, int W)
{
    moe_status st = check_local(path, v, rank);
    st = moe_comm_agree(c, st);
    if (st != MOE_OK) return st;
    if ((st = moe_comm_check_same(c, "layer dump path", path, strlen(path) + 1)) != MOE_OK) return st;
    dump_attrs a;
    pack_attrs(&a, v);
    if ((st = moe_comm_check_same(c, "layer dump attributes", &a, sizeof a)) != MOE_OK) return st;
    int64_t mine[4] = {v->t0, v->T_local, v->e0, v->write_experts ? v->E_local : 0};
    int64_t *all = moe_calloc((size_t)W * 4, sizeof *all);
    st = all ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "dump: %d rank ranges", W);
    st = moe_comm_agree(c, st);
    if (st != MOE_OK) {
        moe_free(all);
        return st;
    }
    st = moe_comm_allgather(c, all, mine, sizeof mine);
    if (st == MOE_OK) st = check_tiling(all, W, v->tokens, v->n_experts);
    moe_free(all);
    return st;
}

/* ---- writing ---- */

typedef struct {
    hid_t file, dxpl, lcpl;
    const char *path; /* for messages */
} dump_file;

static moe_status write_attrs(const dump_file *f, const moe_dump_view *v)
{
    const struct {
        const char *name;
        int64_t v;
    } ints[] = {{"format_version", 1},        {"tokens", v->tokens},     {"groups", v->groups},
                {"d_model", v->d_model},      {"d_ff", v->d_ff},         {"n_experts", v->n_experts},
                {"top_k", v->top_k},          {"normalize_topk", v->normalize_topk != 0}};
    const struct {
        const char *name;
        double v;
    } dbls[] = {{"capacity_factor", v->capacity_factor},
                {"aux_loss_coef", v->aux_loss_coef},
                {"z_loss_coef", v->z_loss_coef}};
    moe_status st = moe_h5_attr_put_str(f->file, "format", "moe-layer-dump", f->path);
    if (st == MOE_OK) st = moe_h5_attr_put_str(f->file, "router", moe_router_kind_str(v->router), f->path);
    if (st == MOE_OK) st = moe_h5_attr_put_str(f->file, "activation", moe_activation_str(v->activation), f->path);
    for (size_t i = 0; st == MOE_OK && i < sizeof ints / sizeof ints[0]; i++)
        st = moe_h5_attr_put_i64(f->file, ints[i].name, ints[i].v, f->path);
    for (size_t i = 0; st == MOE_OK && i < sizeof dbls / sizeof dbls[0]; i++)
        st = moe_h5_attr_put_f64(f->file, dbls[i].name, dbls[i].v, f->path);
    /* The seed is a uint64 in the CLI; stored unsigned so no value wraps. */
    if (st == MOE_OK) st = moe_h5_attr_put_u64(f->file, "seed", v->seed, f->path);
    return st;
}

/* One dataset: global shape dims[0..ndim) (ndim 0: scalar), this rank's
 * rows [r0, r0 + nr) of dim 0 (of the scalar when ndim = 0) from buf,
 * packed row-major. Collective: every rank calls it, nr = 0 selects none. */
typedef struct {
    const char *name;
    int ndim;
    hsize_t dims[DUMP_MAX_DIMS];
    hsize_t r0, nr;
    const void *buf;
    int u8; /* 1: uint8 data, 0: float32 */
} dump_dset;

static moe_status write_dset(const dump_file *f, const dump_dset *d)
{
    hsize_t row = 1;
    for (int i = 1; i < d->ndim; i++) row *= d->dims[i];
    hsize_t n = d->nr * row;
    hid_t ftype = d->u8 ? H5T_STD_U8LE : H5T_IEEE_F32LE;
    hid_t mtype = d->u8 ? H5T_NATIVE_UINT8 : H5T_NATIVE_FLOAT;
    hid_t fs = d->ndim ? H5Screate_simple(d->ndim, d->dims, NULL) : H5Screate(H5S_SCALAR);
    hsize_t mn = n ? n : 1;
    hid_t ms = H5Screate_simple(1, &mn, NULL);
    hid_t ds = fs < 0 ? H5I_INVALID_HID : H5Dcreate2(f->file, d->name, ftype, fs, f->lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = (fs < 0 || ms < 0 || ds < 0) ? -1 : 0;
    if (rc == 0 && n == 0) {
        rc = H5Sselect_none(fs) < 0 || H5Sselect_none(ms) < 0 ? -1 : 0;
    } else if (rc == 0 && d->ndim > 0) {
        hsize_t start[DUMP_MAX_DIMS] = {d->r0}, count[DUMP_MAX_DIMS] = {d->nr};
        for (int i = 1; i < d->ndim; i++) count[i] = d->dims[i];
        rc = H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    }
    /* A rank that writes nothing still passes a valid pointer. */
    static const float nothing;
    if (rc >= 0) rc = H5Dwrite(ds, mtype, ms, fs, f->dxpl, n ? d->buf : (const void *)&nothing);
    if (ds >= 0) H5Dclose(ds);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot write dataset", d->name, f->path) : MOE_OK;
}

static moe_status write_dsets(const dump_file *f, const moe_dump_view *v, int rank)
{
    const hsize_t T = (hsize_t)v->tokens, E = (hsize_t)v->n_experts, d = (hsize_t)v->d_model,
                  F = (hsize_t)v->d_ff, F1 = (hsize_t)moe_f1(v->d_ff, v->activation);
    const hsize_t t0 = (hsize_t)v->t0, nt = (hsize_t)v->T_local;
    const hsize_t e0 = (hsize_t)v->e0, ne = v->write_experts ? (hsize_t)v->E_local : 0;
    const hsize_t nr = rank == 0 ? E : 0, ns = rank == 0 ? 1 : 0;
    /* The format stores the scalars as float32. */
    const float lb = (float)v->load_balance, zl = (float)v->z_loss;
    const dump_dset sets[] = {
        {"/x", 2, {T, d}, t0, nt, v->x, 0},
        {"/router/weight", 2, {E, d}, 0, nr, v->router_w, 0},
        {"/experts/w1", 3, {E, F1, d}, e0, ne, v->w1, 0},
        {"/experts/b1", 2, {E, F1}, e0, ne, v->b1, 0},
        {"/experts/w2", 3, {E, d, F}, e0, ne, v->w2, 0},
        {"/experts/b2", 2, {E, d}, e0, ne, v->b2, 0},
        {"/y", 2, {T, d}, t0, nt, v->y, 0},
        {"/dy", 2, {T, d}, t0, nt, v->dy, 0},
        {"/grad/x", 2, {T, d}, t0, nt, v->dx, 0},
        {"/grad/router/weight", 2, {E, d}, 0, nr, v->grad_router_w, 0},
        {"/grad/experts/w1", 3, {E, F1, d}, e0, ne, v->gw1, 0},
        {"/grad/experts/b1", 2, {E, F1}, e0, ne, v->gb1, 0},
        {"/grad/experts/w2", 3, {E, d, F}, e0, ne, v->gw2, 0},
        {"/grad/experts/b2", 2, {E, d}, e0, ne, v->gb2, 0},
        {"/routing/probs", 2, {T, E}, t0, nt, v->probs, 0},
        {"/routing/weight", 2, {T, E}, t0, nt, v->weight, 0},
        {"/routing/selected", 2, {T, E}, t0, nt, v->selected, 1},
        {"/routing/kept", 2, {T, E}, t0, nt, v->kept, 1},
        {"/aux/load_balance", 0, {0}, 0, ns, &lb, 0},
        {"/aux/z_loss", 0, {0}, 0, ns, &zl, 0},
    };
    moe_status st = MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < sizeof sets / sizeof sets[0]; i++) st = write_dset(f, &sets[i]);
    return st;
}

typedef struct {
    const moe_dump_view *v;
    int rank;
} fill_ctx;

/* Fills the open temporary file (moe_h5_write_atomic). Collective. */
static moe_status fill(void *vctx, hid_t file, hid_t dxpl, hid_t lcpl, const char *tmp)
{
    const fill_ctx *x = vctx;
    dump_file f = {file, dxpl, lcpl, tmp};
    moe_status st = write_attrs(&f, x->v);
    if (st == MOE_OK) st = write_dsets(&f, x->v, x->rank);
    return st;
}

moe_status moe_dump_write(const char *path, moe_comm *c, const moe_dump_view *v)
{
    if (!path || !*path || !v) return moe_errorf(MOE_ERR_ARG, "dump: NULL path or view");
    const int rank = moe_comm_rank(c), W = moe_comm_size(c);
    moe_status st = check_view(c, path, v, rank, W);
    if (st != MOE_OK) return st;
    /* The one atomic HDF5 writer: temporary name, flush, fsync, rename,
     * directory fsync. */
    fill_ctx x = {v, rank};
    return moe_h5_write_atomic(path, DUMP_TMP_SUFFIX, c, NULL, 0, fill, &x);
}

/* ---- reader ---- */

static moe_status read_dset(const char *path, const char *dataset, hid_t mtype, H5T_class_t cls, void *out,
                            size_t n)
{
    H5E_auto2_t efunc;
    void *edata;
    H5Eget_auto2(H5E_DEFAULT, &efunc, &edata);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    moe_status st = MOE_OK;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = f < 0 ? H5I_INVALID_HID : H5Dopen2(f, dataset, H5P_DEFAULT);
    hid_t sp = ds < 0 ? H5I_INVALID_HID : H5Dget_space(ds);
    hid_t ty = ds < 0 ? H5I_INVALID_HID : H5Dget_type(ds);
    if (f < 0) {
        st = moe_h5_fail(MOE_ERR_IO, "cannot open", NULL, path);
    } else if (ds < 0 || sp < 0 || ty < 0) {
        st = moe_h5_fail(MOE_ERR_IO, "cannot open dataset", dataset, path);
    } else {
        hssize_t got = H5Sget_simple_extent_npoints(sp);
        if (H5Tget_class(ty) != cls)
            st = moe_errorf(MOE_ERR_FORMAT, "dataset '%s' in '%s' has the wrong type class", dataset, path);
        else if (got < 0 || (size_t)got != n)
            st = moe_errorf(MOE_ERR_FORMAT, "dataset '%s' in '%s' has %lld elements, expected %zu", dataset, path,
                            (long long)got, n);
        else if (H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
            st = moe_h5_fail(MOE_ERR_IO, "cannot read dataset", dataset, path);
    }
    if (ty >= 0) H5Tclose(ty);
    if (sp >= 0) H5Sclose(sp);
    if (ds >= 0) H5Dclose(ds);
    if (f >= 0) H5Fclose(f);
    H5Eset_auto2(H5E_DEFAULT, efunc, edata);
    return st;
}

moe_status moe_dump_read_f32(const char *path, const char *dataset, float *out, size_t n)
{
    return read_dset(path, dataset, H5T_NATIVE_FLOAT, H5T_FLOAT, out, n);
}

moe_status moe_dump_read_u8(const char *path, const char *dataset, uint8_t *out, size_t n)
{
    return read_dset(path, dataset, H5T_NATIVE_UINT8, H5T_INTEGER, out, n);
}
