/* Parallel checkpoint and gradient-dump writer and checkpoint loader
 * (docs/formats.md section 1).
 *
 * Writing: every rank opens the temp file through parallel HDF5, makes the
 * same metadata calls (groups, attributes, dataset creation) and takes part
 * in one collective H5Dwrite per dataset, selecting its own rows (expert
 * rows on replica 0, replicated tensors on world rank 0, nothing
 * otherwise). Datasets are chunked with the Fletcher32 filter; HDF5 >= 1.10.2
 * supports filters on the collective write path. Chunks of [E, ...]
 * datasets are single expert rows, so each chunk has exactly one writer.
 *
 * Loading: metadata and data are read independently (no collective HDF5
 * calls besides open/close), so a checksum failure on one rank's rows
 * cannot leave the others waiting; the ranks agree after validation and
 * after reading.
 *
 * Everything that can differ between ranks is checked and agreed on before
 * the file is touched, so no rank enters a collective HDF5 call alone. */
#include "ckpt/ckpt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/ckpt_h5.h"
#include "comm/comm_h5.h"

enum { DSET_NAME = 160, CHUNK_TARGET = 1 << 20 };

/* Agreement carries the cause (moe_comm_agree_detail): every rank returns
 * the failing rank's status and detail, so whichever rank prints, it
 * prints the cause. */
static moe_status agree(moe_comm *c, moe_status s) { return moe_comm_agree_detail(c, MOE_SCOPE_WORLD, s); }

/* ---- table checks ---- */

/* The local rows of every tensor are consistent with the table and with c's
 * expert ownership (docs/routing.md section 8: ep rank r holds [r E/P, (r+1) E/P)), and
 * offsets stay inside the block. Local check. */
static moe_status check_table(const moe_tensor_table *t, int E, const moe_comm *c)
{
    if (!t || t->n <= 0 || !t->t) return moe_errorf(MOE_ERR_ARG, "checkpoint: empty tensor table");
    const int P = moe_comm_ep_size(c), p = moe_comm_ep_rank(c);
    if (E <= 0 || E % P) return moe_errorf(MOE_ERR_ARG, "checkpoint: n_experts = %d with ep size %d", E, P);
    const int64_t r0 = (int64_t)p * (E / P), rows = E / P;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        if (x->ndim < 1 || x->ndim > MOE_TENSOR_MAX_DIMS || !memchr(x->name, 0, sizeof x->name) || !x->name[0])
            return moe_errorf(MOE_ERR_ARG, "checkpoint: tensor %d has a bad name or ndim %d", i, x->ndim);
        for (int k = 0; k < x->ndim; k++)
            if (x->shape[k] <= 0)
                return moe_errorf(MOE_ERR_ARG, "checkpoint: tensor '%s' has dim %d = %lld", x->name, k,
                                  (long long)x->shape[k]);
        if (x->expert_sharded && (x->shape[0] != E || x->row0 != r0 || x->rows != rows || x->layer < 0))
            return moe_errorf(MOE_ERR_ARG,
                              "checkpoint: expert tensor '%s' (dim 0 = %lld, rows [%lld, +%lld), layer %d) "
                              "does not match n_experts = %d and ep rank %d of %d",
                              x->name, (long long)x->shape[0], (long long)x->row0, (long long)x->rows,
                              x->layer, E, p, P);
        if (!x->expert_sharded && (x->row0 != 0 || x->rows != x->shape[0]))
            return moe_errorf(MOE_ERR_ARG, "checkpoint: replicated tensor '%s' holds rows [%lld, +%lld)",
                              x->name, (long long)x->row0, (long long)x->rows);
        if ((int64_t)x->numel != x->rows * moe_tensor_row_numel(x) || x->offset > t->total ||
            x->numel > t->total - x->offset)
            return moe_errorf(MOE_ERR_ARG, "checkpoint: tensor '%s' numel/offset outside the block", x->name);
    }
    if (moe_ckpt_moe_layers(t, NULL) >= MOE_CKPT_MAX_MOE_LAYERS)
        return moe_errorf(MOE_ERR_ARG, "checkpoint: too many MoE layers");
    return MOE_OK;
}

/* Hash of what every rank must agree on: names, global shapes, sharding. */
static uint64_t table_hash(const moe_tensor_table *t)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        h = ckpt_fnv1a(h, x->name, strlen(x->name) + 1);
        h = ckpt_fnv1a(h, &x->ndim, sizeof x->ndim);
        h = ckpt_fnv1a(h, x->shape, sizeof x->shape);
        h = ckpt_fnv1a(h, &x->expert_sharded, sizeof x->expert_sharded);
        h = ckpt_fnv1a(h, &x->layer, sizeof x->layer);
    }
    return h;
}

/* Local checks, agreed; then the table description must be the same on
 * every rank. */
static moe_status check_common(moe_comm *c, const moe_tensor_table *t, int E, const moe_train_config *cfg,
                               moe_status local)
{
    if (local == MOE_OK) local = check_table(t, E, c);
    if (local == MOE_OK && cfg && cfg->n_experts != E)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint: n_experts = %d but the config says %d", E, cfg->n_experts);
    moe_status st = agree(c, local);
    if (st != MOE_OK) return st;
    uint64_t h = table_hash(t);
    return agree(c, moe_comm_check_same(c, "checkpoint tensor table", &h, sizeof h));
}

/* ---- writing ---- */

typedef struct {
    hid_t file, dxpl, lcpl;
    const char *path; /* for messages */
} writer;

/* One dataset: global shape dims, this rank's rows [r0, r0 + nr) from buf
 * (nr = 0: select none), chunks of chunk_rows rows. Collective. */
typedef struct {
    char name[DSET_NAME];
    moe_ckpt_dtype dtype;
    int ndim;
    hsize_t dims[MOE_TENSOR_MAX_DIMS];
    hsize_t r0, nr, chunk_rows;
    const void *buf;
} wdset;

static hid_t file_type(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 ? H5T_IEEE_F32LE : t == MOE_CKPT_I64 ? H5T_STD_I64LE : H5T_STD_U8LE;
}

static hid_t mem_type(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 ? H5T_NATIVE_FLOAT : t == MOE_CKPT_I64 ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT8;
}

static size_t dtype_size(moe_ckpt_dtype t) { return t == MOE_CKPT_F32 ? 4 : t == MOE_CKPT_I64 ? 8 : 1; }

static moe_status write_dset(const writer *w, const wdset *d)
{
    hsize_t row = 1, chunk[MOE_TENSOR_MAX_DIMS];
    for (int i = 1; i < d->ndim; i++) row *= d->dims[i];
    chunk[0] = d->chunk_rows;
    for (int i = 1; i < d->ndim; i++) chunk[i] = d->dims[i];
    if (row * d->chunk_rows * dtype_size(d->dtype) >= (hsize_t)1 << 32)
        return moe_errorf(MOE_ERR_ARG, "checkpoint: a row of '%s' exceeds HDF5's 4 GiB chunk limit", d->name);
    const hsize_t n = d->nr * row;
    /* The memory space has the shape of the file selection (rows x the
     * tensor's other dims): with a flat one HDF5 maps chunks element by
     * element, which made writes 4-8x slower (128 MB: 2.4-3.8 s -> 0.3-1.3 s). */
    hsize_t mdims[MOE_TENSOR_MAX_DIMS] = {n ? d->nr : 1};
    for (int i = 1; i < d->ndim; i++) mdims[i] = n ? d->dims[i] : 1;
    hid_t fs = H5Screate_simple(d->ndim, d->dims, NULL), ms = H5Screate_simple(d->ndim, mdims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    herr_t rc = fs < 0 || ms < 0 || dcpl < 0 ? -1 : 0;
    if (rc == 0)
        rc = H5Pset_chunk(dcpl, d->ndim, chunk) < 0 || H5Pset_fletcher32(dcpl) < 0 ||
             H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0 ? -1 : 0;
    hid_t ds = rc < 0 ? H5I_INVALID_HID
                      : H5Dcreate2(w->file, d->name, file_type(d->dtype), fs, w->lcpl, dcpl, H5P_DEFAULT);
    if (ds < 0) rc = -1;
    if (rc == 0 && n == 0) {
        rc = H5Sselect_none(fs) < 0 || H5Sselect_none(ms) < 0 ? -1 : 0;
    } else if (rc == 0) {
        hsize_t start[MOE_TENSOR_MAX_DIMS] = {d->r0}, count[MOE_TENSOR_MAX_DIMS] = {d->nr};
        for (int i = 1; i < d->ndim; i++) count[i] = d->dims[i];
        rc = H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    }
    static const int64_t nothing; /* a rank writing nothing still passes a valid pointer */
    if (rc >= 0) rc = H5Dwrite(ds, mem_type(d->dtype), ms, fs, w->dxpl, n ? d->buf : (const void *)&nothing);
    if (ds >= 0) H5Dclose(ds);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot write dataset", d->name, w->path) : MOE_OK;
}

/* A table tensor under `prefix` ("/model/", "/optimizer/m/", "/grad/"):
 * expert rows from replica 0's owners, replicated tensors from world rank 0. */
static moe_status write_tensor(const writer *w, moe_comm *c, const char *prefix, const moe_tensor *x,
                               const float *block)
{
    wdset d = {.dtype = MOE_CKPT_F32, .ndim = x->ndim, .buf = block + x->offset};
    if (snprintf(d.name, sizeof d.name, "%s%s", prefix, x->name) >= (int)sizeof d.name)
        return moe_errorf(MOE_ERR_ARG, "checkpoint: dataset name %s%s too long", prefix, x->name);
    for (int i = 0; i < x->ndim; i++) d.dims[i] = (hsize_t)x->shape[i];
    const int writes = x->expert_sharded ? moe_comm_replica(c) == 0 : moe_comm_rank(c) == 0;
    d.r0 = (hsize_t)x->row0;
    d.nr = writes ? (hsize_t)x->rows : 0;
    const hsize_t row_bytes = (hsize_t)moe_tensor_row_numel(x) * 4;
    if (x->expert_sharded)
        d.chunk_rows = 1;
    else
        d.chunk_rows = row_bytes >= CHUNK_TARGET ? 1 : CHUNK_TARGET / row_bytes;
    if (d.chunk_rows > d.dims[0]) d.chunk_rows = d.dims[0];
    return write_dset(w, &d);
}

/* A per-expert [E] array of a MoE layer: `owned` = written by each expert's
 * owner (replica 0), one chunk per expert; else whole by world rank 0. */
static moe_status write_per_expert(const writer *w, moe_comm *c, const char *name, moe_ckpt_dtype dtype,
                                   const void *row, int E, int owned)
{
    wdset d = {.dtype = dtype, .ndim = 1, .dims = {(hsize_t)E}};
    snprintf(d.name, sizeof d.name, "%s", name);
    if (owned) {
        const int P = moe_comm_ep_size(c), p = moe_comm_ep_rank(c);
        d.r0 = (hsize_t)p * (hsize_t)(E / P);
        d.nr = moe_comm_replica(c) == 0 ? (hsize_t)(E / P) : 0;
        d.chunk_rows = 1;
    } else {
        d.nr = moe_comm_rank(c) == 0 ? (hsize_t)E : 0;
        d.chunk_rows = (hsize_t)E;
    }
    d.buf = (const char *)row + d.r0 * dtype_size(dtype);
    return write_dset(w, &d);
}

static moe_status make_group(const writer *w, const char *name, hid_t *g)
{
    *g = H5Gcreate2(w->file, name, w->lcpl, H5P_DEFAULT, H5P_DEFAULT);
    return *g < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot create group", name, w->path) : MOE_OK;
}

/* The root attributes every file carries. created_at comes from rank 0 so
 * that all ranks write identical metadata. */
typedef struct {
    char created_at[32];
    int64_t world, ep;
} root_info;

static moe_status root_info_make(root_info *r, moe_comm *c)
{
    memset(r, 0, sizeof *r);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(r->created_at, sizeof r->created_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    r->world = moe_comm_size(c);
    r->ep = moe_comm_ep_size(c);
    return moe_comm_bcast(c, r, sizeof *r, 0);
}

static moe_status write_root(const writer *w, const char *format, const root_info *r, const char *config,
                             int version)
{
    moe_status st = moe_h5_attr_put_str(w->file, "format", format, w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_i64(w->file, "format_version", version, w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_str(w->file, "created_by", "moerun " MOE_VERSION, w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_str(w->file, "created_at", r->created_at, w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_str(w->file, "config", config ? config : "", w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_i64(w->file, "saved_world_size", r->world, w->path);
    if (st == MOE_OK) st = moe_h5_attr_put_i64(w->file, "saved_ep_size", r->ep, w->path);
    return st;
}

/* What the body of a file is: a checkpoint or a gradient dump. */
typedef struct {
    const moe_ckpt_state *st;                         /* checkpoint, or NULL */
    const moe_tensor_table *table;                    /* gradient dump: */
    const float *grads;
    const uint8_t *activated;                         /* (n_moe, E) */
    int n_experts;
    int64_t step;
    const moe_train_config *cfg;
    const char *config;
} body;

static moe_status write_ckpt_body(const writer *w, moe_comm *c, const moe_ckpt_state *s)
{
    hid_t g = H5I_INVALID_HID;
    const moe_tensor_table *t = s->table;
    moe_status st = make_group(w, "/model", &g);
    if (st == MOE_OK) st = ckpt_model_put(g, s->cfg, w->path);
    if (g >= 0) H5Gclose(g);
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/model/", &t->t[i], s->params);

    if (st == MOE_OK && (st = make_group(w, "/optimizer", &g)) == MOE_OK) {
        const struct {
            const char *name;
            double v;
        } a[] = {{"lr", s->lr}, {"beta1", s->beta1}, {"beta2", s->beta2}, {"eps", s->eps},
                 {"weight_decay", s->weight_decay}};
        st = moe_h5_attr_put_i64(g, "step", s->opt_step, w->path);
        for (size_t i = 0; st == MOE_OK && i < sizeof a / sizeof a[0]; i++)
            st = moe_h5_attr_put_f64(g, a[i].name, a[i].v, w->path);
    }
    if (g >= 0) H5Gclose(g);
    g = H5I_INVALID_HID;
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/optimizer/m/", &t->t[i], s->m);
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/optimizer/v/", &t->t[i], s->v);

    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(t, layers), E = s->n_experts;
    char name[DSET_NAME];
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        const size_t o = (size_t)l * (size_t)E;
        snprintf(name, sizeof name, "/optimizer/expert_step/h/%d", layers[l]);
        st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_step + o, E, 1);
        snprintf(name, sizeof name, "/stats/h/%d/expert_tokens", layers[l]);
        if (st == MOE_OK) st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_tokens + o, E, 0);
        snprintf(name, sizeof name, "/stats/h/%d/expert_dropped", layers[l]);
        if (st == MOE_OK) st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_dropped + o, E, 0);
    }

    if (st == MOE_OK && (st = make_group(w, "/train", &g)) == MOE_OK) {
        st = moe_h5_attr_put_i64(g, "step", s->step, w->path);
        if (st == MOE_OK) st = moe_h5_attr_put_i64(g, "tokens_seen", s->tokens_seen, w->path);
        /* The seed is stored unsigned so that no value wraps. */
        if (st == MOE_OK) st = moe_h5_attr_put_u64(g, "seed", s->seed, w->path);
        for (int i = 0; st == MOE_OK && i < s->n_extra; i++)
            st = moe_h5_attr_put_i64(g, s->extra[i].name, s->extra[i].value, w->path);
    }
    if (g >= 0) H5Gclose(g);
    return st;
}

static moe_status write_grads_body(const writer *w, moe_comm *c, const body *b)
{
    hid_t g = H5I_INVALID_HID;
    moe_status st = moe_h5_attr_put_i64(w->file, "step", b->step, w->path);
    /* The model attributes sit on /grad so that readers can check shapes. */
    if (st == MOE_OK) st = make_group(w, "/grad", &g);
    if (st == MOE_OK) st = ckpt_model_put(g, b->cfg, w->path);
    if (g >= 0) H5Gclose(g);
    const moe_tensor_table *t = b->table;
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/grad/", &t->t[i], b->grads);
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(t, layers);
    char name[DSET_NAME];
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        snprintf(name, sizeof name, "/grad/h/%d/moe/experts/activated", layers[l]);
        st = write_per_expert(w, c, name, MOE_CKPT_U8, b->activated + (size_t)l * (size_t)b->n_experts,
                              b->n_experts, 0);
    }
    return st;
}

typedef struct {
    const body *b;
    const root_info *r;
    moe_comm *c;
} fill_ctx;

/* Fills the open temporary file (moe_h5_write_atomic). Every HDF5 failure
 * on this path is symmetric (same call on every rank) or agreed after each
 * dataset group. */
static moe_status fill(void *vctx, hid_t file, hid_t dxpl, hid_t lcpl, const char *tmp)
{
    const fill_ctx *x = vctx;
    const body *b = x->b;
    writer w = {file, dxpl, lcpl, tmp};
    const char *config = b->st ? b->st->config_text : b->config;
    moe_status st = write_root(&w, b->st ? CKPT_FORMAT : CKPT_FORMAT_GRADS, x->r, config,
                               ckpt_version(b->st ? b->st->cfg : b->cfg));
    if (st == MOE_OK) st = b->st ? write_ckpt_body(&w, x->c, b->st) : write_grads_body(&w, x->c, b);
    return st;
}

/* Writes path atomically (path.tmp, the one HDF5 writer of io/h5.h).
 * Collective; the caller has already agreed on its argument checks. */
static moe_status save_atomic(const char *path, moe_comm *c, const body *b)
{
    root_info r;
    moe_status st = root_info_make(&r, c);
    if (st != MOE_OK) return st;
    fill_ctx x = {b, &r, c};
    return moe_h5_write_atomic(path, ".tmp", c, fill, &x);
}

moe_status moe_ckpt_save(const char *path, moe_comm *c, const moe_ckpt_state *s)
{
    moe_status local = MOE_OK;
    if (!path || !*path || !s || !s->table || !s->params || !s->m || !s->v || !s->cfg || !s->expert_step ||
        !s->expert_tokens || !s->expert_dropped)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint save: NULL path, state, table, buffer or config");
    else if (s->n_extra < 0 || s->n_extra > MOE_CKPT_MAX_EXTRA)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint save: n_extra = %d", s->n_extra);
    for (int i = 0; local == MOE_OK && i < s->n_extra; i++) {
        const char *n = s->extra[i].name;
        if (!memchr(n, 0, MOE_CKPT_EXTRA_NAME) || !n[0] || !strcmp(n, "step") || !strcmp(n, "tokens_seen") ||
            !strcmp(n, "seed"))
            local = moe_errorf(MOE_ERR_ARG, "checkpoint save: bad /train attribute name #%d", i);
    }
    moe_status st = check_common(c, local == MOE_OK ? s->table : NULL, local == MOE_OK ? s->n_experts : 0,
                                 local == MOE_OK ? s->cfg : NULL, local);
    if (st != MOE_OK) return st;
    /* The scalar attributes and config text become metadata every rank
     * writes: they must be identical (parallel HDF5 requires it). */
    uint64_t h = 0xcbf29ce484222325ull;
    const int64_t ints[] = {s->opt_step, s->step, s->tokens_seen, (int64_t)s->seed, s->n_extra};
    const double dbls[] = {s->lr, s->beta1, s->beta2, s->eps, s->weight_decay};
    h = ckpt_fnv1a(h, ints, sizeof ints);
    h = ckpt_fnv1a(h, dbls, sizeof dbls);
    h = ckpt_fnv1a(h, s->extra, sizeof s->extra[0] * (size_t)s->n_extra);
    if (s->config_text) h = ckpt_fnv1a(h, s->config_text, strlen(s->config_text));
    if ((st = agree(c, moe_comm_check_same(c, "checkpoint attributes", &h, sizeof h))) != MOE_OK)
        return st;
    body b = {.st = s};
    return save_atomic(path, c, &b);
}

moe_status moe_ckpt_save_grads(const char *path, moe_comm *c, const moe_tensor_table *table, const float *grads,
                               const uint8_t *activated, int n_experts, int64_t step,
                               const moe_train_config *cfg, const char *config_text)
{
    moe_status local = MOE_OK;
    if (!path || !*path || !table || !grads || !activated || !cfg)
        local = moe_errorf(MOE_ERR_ARG, "gradient dump: NULL path, table, gradients, mask or config");
    moe_status st = check_common(c, local == MOE_OK ? table : NULL, n_experts, cfg, local);
    if (st != MOE_OK) return st;
    uint64_t h = ckpt_fnv1a(0xcbf29ce484222325ull, &step, sizeof step);
    if (config_text) h = ckpt_fnv1a(h, config_text, strlen(config_text));
    if ((st = agree(c, moe_comm_check_same(c, "gradient dump attributes", &h, sizeof h))) != MOE_OK)
        return st;
    body b = {.table = table, .grads = grads, .activated = activated, .n_experts = n_experts,
              .step = step, .cfg = cfg, .config = config_text};
    return save_atomic(path, c, &b);
}

/* ---- loading ---- */

/* Validation of everything but the data: format, model attributes, every
 * dataset and its shape. No allocation depends on the file. */
static moe_status validate(hid_t f, const char *path, const moe_ckpt_state *s, const int *layers, int n_moe)
{
    moe_status st = ckpt_check_format(f, CKPT_FORMAT, NULL, NULL, path);
    if (st != MOE_OK) return st;
    hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
    if (g < 0) return moe_errorf(MOE_ERR_FORMAT, "'%s': group /model is missing", path);
    moe_train_config fc;
    st = ckpt_model_get(g, &fc, path);
    H5Gclose(g);
    if (st == MOE_OK) st = ckpt_model_compare(&fc, s->cfg, path);
    const moe_tensor_table *t = s->table;
    const char *prefixes[] = {"/model/", "/optimizer/m/", "/optimizer/v/"};
    const int n_prefix = s->m && s->v ? 3 : 1;
    char name[DSET_NAME];
    for (int p = 0; p < n_prefix; p++)
        for (int i = 0; st == MOE_OK && i < t->n; i++) {
            hid_t ds;
            snprintf(name, sizeof name, "%s%s", prefixes[p], t->t[i].name);
            st = ckpt_dset_open(f, name, MOE_CKPT_F32, t->t[i].ndim, t->t[i].shape, &ds, path);
            if (st == MOE_OK) H5Dclose(ds);
        }
    const int64_t E = s->n_experts;
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        const char *fmts[] = {"/optimizer/expert_step/h/%d", "/stats/h/%d/expert_tokens",
                              "/stats/h/%d/expert_dropped"};
        const void *bufs[] = {s->expert_step, s->expert_tokens, s->expert_dropped};
        for (int k = 0; st == MOE_OK && k < 3; k++) {
            if (!bufs[k]) continue;
            hid_t ds;
            snprintf(name, sizeof name, fmts[k], layers[l]);
            st = ckpt_dset_open(f, name, MOE_CKPT_I64, 1, &E, &ds, path);
            if (st == MOE_OK) H5Dclose(ds);
        }
    }
    return st;
}

/* Rows [r0, r0 + nr) of dataset `name` into buf (independent read). */
static moe_status read_rows(hid_t f, const char *name, hid_t mtype, int ndim, const int64_t *shape, int64_t r0,
                            int64_t nr, void *buf, const char *path)
{
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    hid_t fs = ds < 0 ? H5I_INVALID_HID : H5Dget_space(ds);
    hsize_t start[MOE_TENSOR_MAX_DIMS] = {(hsize_t)r0}, count[MOE_TENSOR_MAX_DIMS] = {(hsize_t)nr}, n = (hsize_t)nr;
    for (int i = 1; i < ndim; i++) n *= (count[i] = (hsize_t)shape[i]);
    /* Same shape as the file selection: HDF5's fast path (see write_dset). */
    hid_t ms = H5Screate_simple(ndim, count, NULL);
    herr_t rc = ds < 0 || fs < 0 || ms < 0 ? -1 : H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    if (rc >= 0) rc = H5Dread(ds, mtype, ms, fs, H5P_DEFAULT, buf);
    moe_status st = rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot read dataset", name, path) : MOE_OK;
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    if (ds >= 0) H5Dclose(ds);
    return st;
}

static moe_status read_all(hid_t f, const char *path, moe_ckpt_state *s, const int *layers, int n_moe)
{
    const moe_tensor_table *t = s->table;
    const char *prefixes[] = {"/model/", "/optimizer/m/", "/optimizer/v/"};
    float *blocks[] = {s->params, s->m, s->v};
    const int n_prefix = s->m && s->v ? 3 : 1;
    char name[DSET_NAME];
    moe_status st = MOE_OK;
    for (int p = 0; p < n_prefix; p++)
        for (int i = 0; st == MOE_OK && i < t->n; i++) {
            const moe_tensor *x = &t->t[i];
            snprintf(name, sizeof name, "%s%s", prefixes[p], x->name);
            st = read_rows(f, name, H5T_NATIVE_FLOAT, x->ndim, x->shape, x->row0, x->rows, blocks[p] + x->offset,
                           path);
        }
    const int64_t E = s->n_experts;
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        const char *fmts[] = {"/optimizer/expert_step/h/%d", "/stats/h/%d/expert_tokens",
                              "/stats/h/%d/expert_dropped"};
        int64_t *bufs[] = {s->expert_step, s->expert_tokens, s->expert_dropped};
        for (int k = 0; st == MOE_OK && k < 3; k++) {
            if (!bufs[k]) continue;
            snprintf(name, sizeof name, fmts[k], layers[l]);
            st = read_rows(f, name, H5T_NATIVE_INT64, 1, &E, 0, E, bufs[k] + (size_t)l * (size_t)E, path);
        }
    }
    return st;
}

moe_status ckpt_read_scalars(hid_t f, const char *path, moe_ckpt_state *s, char **config)
{
    moe_status st = MOE_OK;
    hid_t g = H5Gopen2(f, "/train", H5P_DEFAULT);
    if (g < 0) return moe_errorf(MOE_ERR_FORMAT, "'%s': group /train is missing", path);
    st = moe_h5_attr_get_i64(g, "step", &s->step, path);
    if (st == MOE_OK) st = moe_h5_attr_get_i64(g, "tokens_seen", &s->tokens_seen, path);
    if (st == MOE_OK) st = moe_h5_attr_get_u64(g, "seed", &s->seed, path);
    /* The extra resume integers: every other attribute of /train. */
    s->n_extra = 0;
    H5O_info_t oi;
    if (st == MOE_OK && H5Oget_info2(g, &oi, H5O_INFO_NUM_ATTRS) < 0)
        st = moe_h5_fail(MOE_ERR_FORMAT, "cannot query group", "/train", path);
    for (hsize_t i = 0; st == MOE_OK && i < oi.num_attrs; i++) {
        char an[MOE_CKPT_EXTRA_NAME];
        ssize_t len = H5Aget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, an, sizeof an, H5P_DEFAULT);
        if (len < 0 || len >= (ssize_t)sizeof an) {
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': /train attribute #%llu has a bad name", path,
                            (unsigned long long)i);
            break;
        }
        if (!strcmp(an, "step") || !strcmp(an, "tokens_seen") || !strcmp(an, "seed")) continue;
        if (s->n_extra == MOE_CKPT_MAX_EXTRA) {
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': more than %d extra /train attributes", path,
                            MOE_CKPT_MAX_EXTRA);
            break;
        }
        moe_ckpt_extra *e = &s->extra[s->n_extra];
        snprintf(e->name, sizeof e->name, "%s", an);
        if ((st = moe_h5_attr_get_i64(g, an, &e->value, path)) == MOE_OK) s->n_extra++;
    }
    H5Gclose(g);
    if (st != MOE_OK) return st;
    if ((g = H5Gopen2(f, "/optimizer", H5P_DEFAULT)) < 0)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': group /optimizer is missing", path);
    st = moe_h5_attr_get_i64(g, "step", &s->opt_step, path);
    const struct {
        const char *name;
        double *v;
    } a[] = {{"lr", &s->lr}, {"beta1", &s->beta1}, {"beta2", &s->beta2}, {"eps", &s->eps},
             {"weight_decay", &s->weight_decay}};
    for (size_t i = 0; st == MOE_OK && i < sizeof a / sizeof a[0]; i++) st = moe_h5_attr_get_f64(g, a[i].name, a[i].v, path);
    H5Gclose(g);
    if (st == MOE_OK && config) st = moe_h5_attr_get_str(f, "config", config, path);
    return st;
}

/* A clear message for a file HDF5 cannot open. */
static moe_status open_fail(const char *path)
{
    if (access(path, R_OK) != 0) return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    htri_t h5 = H5Fis_hdf5(path);
    if (h5 == 0) return moe_errorf(MOE_ERR_FORMAT, "'%s' is not an HDF5 file", path);
    return moe_h5_fail(MOE_ERR_FORMAT, "cannot open (truncated or damaged?)", NULL, path);
}

moe_status moe_ckpt_load(const char *path, moe_comm *c, moe_ckpt_state *s, char **config_text)
{
    if (config_text) *config_text = NULL;
    moe_status local = MOE_OK;
    if (!path || !*path || !s || !s->table || !s->params || !s->cfg || (!s->m) != (!s->v))
        local = moe_errorf(MOE_ERR_ARG, "checkpoint load: NULL path, state, table, params or config "
                                        "(m and v are both given or both NULL)");
    moe_status st = check_common(c, local == MOE_OK ? s->table : NULL, local == MOE_OK ? s->n_experts : 0,
                                 local == MOE_OK ? s->cfg : NULL, local);
    if (st != MOE_OK) return st;
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(s->table, layers);

    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    hid_t fapl = moe_comm_h5_fapl(c);
    /* Test the path first: HDF5's own message for a missing file is obscure. */
    hid_t f = H5I_INVALID_HID;
    /* Opening is collective (MPI-IO): every rank must see the same readable
     * file before any rank enters H5Fopen. */
    st = agree(c, access(path, R_OK) == 0 && fapl >= 0 ? MOE_OK : open_fail(path));
    if (st == MOE_OK) st = agree(c, moe_comm_check_same(c, "checkpoint path", path, strlen(path)));
    if (st == MOE_OK) {
        f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
        st = f < 0 ? open_fail(path) : MOE_OK;
    }
    if (fapl >= 0) H5Pclose(fapl);
    st = agree(c, st);
    if (st == MOE_OK) {
        st = agree(c, validate(f, path, s, layers, n_moe));
        char *cfg_text = NULL;
        if (st == MOE_OK) st = ckpt_read_scalars(f, path, s, config_text ? &cfg_text : NULL);
        if (st == MOE_OK) st = read_all(f, path, s, layers, n_moe);
        st = agree(c, st);
        if (st == MOE_OK && config_text)
            *config_text = cfg_text;
        else
            free(cfg_text);
    }
    if (f >= 0 && H5Fclose(f) < 0 && st == MOE_OK) st = moe_h5_fail(MOE_ERR_IO, "cannot close", NULL, path);
    moe_h5_quiet_end(&q);
    st = agree(c, st);
    if (st != MOE_OK && config_text) {
        free(*config_text);
        *config_text = NULL;
    }
    return st;
}
