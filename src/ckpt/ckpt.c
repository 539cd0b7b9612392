/* Parallel checkpoint and gradient-dump writer and checkpoint loader
 * (docs/formats.md section 1).
 *
 * Writing: one writer per node (comm_h5.h: the lowest world rank there)
 * opens the temporary file, makes the metadata calls (groups, attributes,
 * dataset creation) and writes each dataset's rows of its node, which the
 * other ranks of the node send it dataset by dataset (expert rows from
 * replica 0, replicated tensors from world rank 0, nothing otherwise),
 * with their row ids; the writer writes them in ascending row order
 * against a file selection of those rows. On one node the writer uses
 * HDF5's POSIX driver; over several, the writers write together through
 * parallel HDF5 (one collective H5Dwrite per dataset; HDF5 >= 1.10.2
 * supports filters on that path). Datasets are chunked with the Fletcher32
 * filter. Chunks of [E, ...] datasets are single expert rows, so each chunk
 * has exactly one writer. Rows with a row map (the vocabulary experts') go
 * to their token ids; a chunk may then hold rows of several nodes, which
 * the collective filtered write path assembles on one writer. Statuses are
 * agreed over the world after every dataset and every group of metadata
 * calls (which writers alone make), so all ranks stop at the same point.
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

#include "ckpt/ckpt_file.h"
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
static moe_status check_table(const moe_tensor_table *t, int E, int M, const moe_comm *c)
{
    if (!t || t->n <= 0 || !t->t) return moe_errorf(MOE_ERR_ARG, "checkpoint: empty tensor table");
    const int P = moe_comm_ep_size(c), p = moe_comm_ep_rank(c);
    int placed = 0; /* a placement may hold replicas: P need not divide E */
    for (int i = 0; i < t->n; i++)
        placed |= t->t[i].expert_sharded && t->t[i].experts == MOE_EXPERTS_FFN && t->t[i].row_ids;
    if (E <= 0 || (!placed && E % P))
        return moe_errorf(MOE_ERR_ARG, "checkpoint: n_experts = %d with ep size %d", E, P);
    if (M % P) return moe_errorf(MOE_ERR_ARG, "checkpoint: vocab_experts = %d with ep size %d", M, P);
    const int64_t r0 = (int64_t)p * (E / P), rows = E / P;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        if (x->ndim < 1 || x->ndim > MOE_TENSOR_MAX_DIMS || !memchr(x->name, 0, sizeof x->name) || !x->name[0])
            return moe_errorf(MOE_ERR_ARG, "checkpoint: tensor %d has a bad name or ndim %d", i, x->ndim);
        for (int k = 0; k < x->ndim; k++)
            if (x->shape[k] <= 0)
                return moe_errorf(MOE_ERR_ARG, "checkpoint: tensor '%s' has dim %d = %lld", x->name, k,
                                  (long long)x->shape[k]);
        if (x->expert_sharded && x->experts == MOE_EXPERTS_VOCAB) {
            /* the rows of experts [p M/P, (p+1) M/P): segments over them, ids inside dim 0 */
            const int Ml = M / P;
            int ok = M > 0 && x->seg_off && x->row_ids && x->seg_off[0] == 0 && x->seg_off[Ml] == x->rows;
            for (int j = 0; ok && j < Ml; j++) ok = x->seg_off[j] < x->seg_off[j + 1];
            for (int64_t r = 0; ok && r < x->rows; r++) ok = x->row_ids[r] >= 0 && x->row_ids[r] < x->shape[0];
            if (!ok)
                return moe_errorf(MOE_ERR_ARG, "checkpoint: vocabulary tensor '%s' has bad segments or row ids for "
                                               "%d experts on ep rank %d of %d", x->name, M, p, P);
        } else if (x->expert_sharded && x->row_ids) {
            /* placed experts: the rank's slots, ascending global experts, each copy flagged */
            int ok = x->shape[0] == E && x->layer >= 0 && x->rows >= 1 && x->rows <= E && !x->seg_off && x->row_primary;
            for (int64_t r = 0; ok && r < x->rows; r++)
                ok = x->row_ids[r] >= 0 && x->row_ids[r] < E && (r == 0 || x->row_ids[r] > x->row_ids[r - 1]);
            if (!ok)
                return moe_errorf(MOE_ERR_ARG, "checkpoint: expert tensor '%s' has bad placed rows for n_experts = %d "
                                               "on ep rank %d of %d", x->name, E, p, P);
        } else if (x->expert_sharded && (x->shape[0] != E || x->row0 != r0 || x->rows != rows || x->layer < 0))
            return moe_errorf(MOE_ERR_ARG,
                              "checkpoint: expert tensor '%s' (dim 0 = %lld, rows [%lld, +%lld), layer %d) "
                              "does not match n_experts = %d and ep rank %d of %d",
                              x->name, (long long)x->shape[0], (long long)x->row0, (long long)x->rows,
                              x->layer, E, p, P);
        if (x->dtype == MOE_TENSOR_I32 && (x->role != MOE_TENSOR_BUFFER || x->expert_sharded))
            return moe_errorf(MOE_ERR_ARG, "checkpoint: integer tensor '%s' must be a replicated buffer", x->name);
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
        h = ckpt_fnv1a(h, &x->experts, sizeof x->experts);
        h = ckpt_fnv1a(h, &x->layer, sizeof x->layer);
        h = ckpt_fnv1a(h, &x->role, sizeof x->role);
        h = ckpt_fnv1a(h, &x->dtype, sizeof x->dtype);
    }
    return h;
}

/* Local checks, agreed; then the table description must be the same on
 * every rank. */
static moe_status check_common(moe_comm *c, const moe_tensor_table *t, int E, const moe_train_config *cfg,
                               moe_status local)
{
    const int M = cfg && cfg->head == MOE_HEAD_VOCAB_EXPERTS ? cfg->vocab_experts : 0;
    if (local == MOE_OK) local = check_table(t, E, M, c);
    if (local == MOE_OK && cfg && cfg->n_experts != E)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint: n_experts = %d but the config says %d", E, cfg->n_experts);
    moe_status st = agree(c, local);
    if (st != MOE_OK) return st;
    uint64_t h = table_hash(t);
    return agree(c, moe_comm_check_same(c, "checkpoint tensor table", &h, sizeof h));
}

/* ---- writing ---- */

/* The state of one file write. Only node writers hold the file (file >=
 * 0); every rank sends its rows of each dataset to its node's writer. */
typedef struct {
    hid_t file, dxpl, lcpl;
    const char *path;          /* for messages */
    moe_comm *c;               /* agreements; the watchdog's phases */
    moe_comm_h5_writers *agg;  /* the node writers */
    void *pack;                /* a rank's rows picked out of memory (mids) */
    size_t pack_cap;
    void *got, *sorted;        /* writer: the node's rows of one dataset, as received and by row id */
    size_t got_cap, sorted_cap;
    int64_t *ids;              /* writer: their row ids, as received */
    size_t ids_cap;
    int64_t *pairs;            /* writer: (row id, received index) scratch */
    size_t pairs_cap;          /* bytes */
} writer;

/* One dataset: global shape dims, this rank's rows [r0, r0 + nr) from buf
 * (nr = 0: select none), or, with ids, the rows ids[0 .. nr) (ascending)
 * in that order, taken from buf's first nr rows or, with mids, from its
 * rows mids[0 .. nr) (ascending) of mrows; chunks of chunk_rows rows. The buffer holds mtype values
 * (floats for an integer dataset: HDF5 converts). */
typedef struct {
    char name[DSET_NAME];
    moe_ckpt_dtype dtype;
    hid_t str_type;            /* MOE_CKPT_STR: the fixed-length string type */
    hid_t mtype;               /* the memory type when not the dtype's own (0) */
    int ndim;
    hsize_t dims[MOE_TENSOR_MAX_DIMS];
    hsize_t r0, nr, chunk_rows;
    const int64_t *ids;
    const int64_t *mids;
    hsize_t mrows;
    const void *buf;
} wdset;

/* fs selects the rows ids[0 .. n) (ascending) of its [dims] space: one
 * hyperslab per run of consecutive ids. */
static herr_t select_rows(hid_t fs, int ndim, const hsize_t *dims, const int64_t *ids, hsize_t n)
{
    hsize_t start[MOE_TENSOR_MAX_DIMS] = {0}, count[MOE_TENSOR_MAX_DIMS];
    for (int i = 1; i < ndim; i++) count[i] = dims[i];
    herr_t rc = H5Sselect_none(fs);
    for (hsize_t a = 0; rc >= 0 && a < n;) {
        hsize_t b = a + 1;
        while (b < n && ids[b] == ids[b - 1] + 1) b++;
        start[0] = (hsize_t)ids[a];
        count[0] = b - a;
        rc = H5Sselect_hyperslab(fs, H5S_SELECT_OR, start, NULL, count, NULL);
        a = b;
    }
    return rc;
}

static hid_t dset_mem_type(const wdset *d)
{
    return d->dtype == MOE_CKPT_STR ? d->str_type : d->mtype > 0 ? d->mtype : ckpt_mem_type(d->dtype);
}

static int cmp_pair(const void *a, const void *b)
{
    const int64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* The writer's part of one dataset: creates it and writes the rows d
 * describes (nr = 0: none). Collective over the writers. */
static moe_status put_dset(const writer *w, const wdset *d)
{
    hsize_t row = 1, chunk[MOE_TENSOR_MAX_DIMS];
    for (int i = 1; i < d->ndim; i++) row *= d->dims[i];
    chunk[0] = d->chunk_rows;
    for (int i = 1; i < d->ndim; i++) chunk[i] = d->dims[i];
    const hid_t ftype = d->dtype == MOE_CKPT_STR ? d->str_type : ckpt_file_type(d->dtype);
    const hid_t mtype = dset_mem_type(d);
    const hsize_t n = d->nr * row;
    /* The memory space has the shape of the file selection (rows x the
     * tensor's other dims): with a flat one HDF5 maps chunks element by
     * element, which made writes 4-8x slower (128 MB: 2.4-3.8 s -> 0.3-1.3 s). */
    hsize_t mdims[MOE_TENSOR_MAX_DIMS] = {n ? (d->mids ? d->mrows : d->nr) : 1};
    for (int i = 1; i < d->ndim; i++) mdims[i] = n ? d->dims[i] : 1;
    hid_t fs = H5Screate_simple(d->ndim, d->dims, NULL), ms = H5Screate_simple(d->ndim, mdims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    herr_t rc = fs < 0 || ms < 0 || dcpl < 0 ? -1 : 0;
    if (rc == 0)
        rc = H5Pset_chunk(dcpl, d->ndim, chunk) < 0 || H5Pset_fletcher32(dcpl) < 0 ||
             H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0 ? -1 : 0;
    hid_t ds = rc < 0 ? H5I_INVALID_HID : H5Dcreate2(w->file, d->name, ftype, fs, w->lcpl, dcpl, H5P_DEFAULT);
    if (ds < 0) rc = -1;
    if (rc == 0 && n == 0) {
        rc = H5Sselect_none(fs) < 0 || H5Sselect_none(ms) < 0 ? -1 : 0;
    } else if (rc == 0 && d->ids) {
        rc = select_rows(fs, d->ndim, d->dims, d->ids, d->nr);
        if (rc >= 0 && d->mids) rc = select_rows(ms, d->ndim, mdims, d->mids, d->nr);
    } else if (rc == 0) {
        hsize_t start[MOE_TENSOR_MAX_DIMS] = {d->r0}, count[MOE_TENSOR_MAX_DIMS] = {d->nr};
        for (int i = 1; i < d->ndim; i++) count[i] = d->dims[i];
        rc = H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    }
    static const int64_t nothing; /* a writer writing nothing still passes a valid pointer */
    if (rc >= 0) rc = H5Dwrite(ds, mtype, ms, fs, w->dxpl, n ? d->buf : (const void *)&nothing);
    /* the message now: the closes below reset HDF5's error stack (and its
     * system reason, e.g. "No space left on device") */
    moe_status st = rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot write dataset", d->name, w->path) : MOE_OK;
    if (ds >= 0) H5Dclose(ds);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return st;
}

/* Grows a moe_calloc'd scratch buffer to `need` bytes (contents not kept). */
static moe_status grow(void **p, size_t *cap, size_t need)
{
    if (need <= *cap) return MOE_OK;
    void *q = moe_calloc(need, 1);
    if (!q) return moe_errorf(MOE_ERR_NOMEM, "checkpoint: %zu bytes of rows", need);
    moe_free(*p);
    *p = q;
    *cap = need;
    return MOE_OK;
}

/* The writer's view of the n rows its node sent (w->got, ids w->ids, in
 * node rank order): the same rows in ascending row id, as put_dset's file
 * selection takes its memory elements in that order. Rows already in order
 * are used where they are. */
static moe_status sort_rows(writer *w, wdset *e, int64_t n, size_t row_bytes)
{
    e->ids = w->ids;
    e->mids = NULL;
    e->nr = (hsize_t)n;
    e->buf = w->got;
    int64_t i = 1;
    while (i < n && w->ids[i] > w->ids[i - 1]) i++;
    if (i >= n) return MOE_OK;
    moe_status st = grow((void **)&w->pairs, &w->pairs_cap, (size_t)n * 2 * sizeof *w->pairs);
    if (st == MOE_OK) st = grow(&w->sorted, &w->sorted_cap, (size_t)n * row_bytes);
    if (st != MOE_OK) return st;
    for (i = 0; i < n; i++) w->pairs[2 * i] = w->ids[i], w->pairs[2 * i + 1] = i;
    qsort(w->pairs, (size_t)n, 2 * sizeof *w->pairs, cmp_pair);
    for (i = 0; i < n; i++) {
        const size_t from = (size_t)w->pairs[2 * i + 1] * row_bytes;
        memcpy((char *)w->sorted + (size_t)i * row_bytes, (const char *)w->got + from, row_bytes);
        w->ids[i] = w->pairs[2 * i];
    }
    e->buf = w->sorted;
    return MOE_OK;
}

/* One dataset, collective over the world: every rank sends its rows to its
 * node's writer, the writers write them. The status is agreed at the end
 * (a write can fail on some ranks only: a disk full under one of them), so
 * all ranks go on to the next dataset or all stop. */
static moe_status write_dset(writer *w, const wdset *d)
{
    hsize_t row = 1;
    for (int i = 1; i < d->ndim; i++) row *= d->dims[i];
    const size_t esize = d->dtype == MOE_CKPT_STR ? H5Tget_size(d->str_type) : ckpt_dtype_size(d->dtype);
    if (row * d->chunk_rows * esize >= (hsize_t)1 << 32)
        return moe_errorf(MOE_ERR_ARG, "checkpoint: a row of '%s' exceeds HDF5's 4 GiB chunk limit", d->name);
    const size_t row_bytes = (size_t)row * H5Tget_size(dset_mem_type(d));
    /* One watchdog phase per dataset (comm_timeout), over the rows' trip
     * to the writer and the write: a huge model's checkpoint is many
     * phases, each bounded by its largest tensor. */
    moe_comm_phase_begin(w->c, MOE_SCOPE_WORLD, "checkpoint write (one dataset: rows to the node writer, HDF5 write)");
    moe_status st = MOE_OK;
    const void *send = d->buf;
    int64_t rows = (int64_t)d->nr;
    if (d->mids && rows > 0) { /* rows picked out of memory: packed to send */
        st = grow(&w->pack, &w->pack_cap, (size_t)rows * row_bytes);
        for (int64_t i = 0; st == MOE_OK && i < rows; i++)
            memcpy((char *)w->pack + (size_t)i * row_bytes, (const char *)d->buf + (size_t)d->mids[i] * row_bytes,
                   row_bytes);
        send = w->pack;
        if (st != MOE_OK) rows = 0; /* still takes part; the agreement below stops all */
    }
    int64_t n = 0;
    int own = 0;
    const moe_status gst = moe_comm_h5_gather_rows(w->agg, &w->got, &w->got_cap, &w->ids, &w->ids_cap, &n, &own, send,
                                                   d->ids, (int64_t)d->r0, rows, row_bytes);
    if (st == MOE_OK) st = gst;
    if (w->file >= 0) {
        /* Test hook: a writer that fails mid-file (MOE_FAULT=ckpt_write, at
         * the first dataset of /optimizer/v). */
        if (st == MOE_OK && !strncmp(d->name, "/optimizer/v/", 13) && moe_fault("ckpt_write", moe_comm_rank(w->c)))
            st = moe_errorf(MOE_ERR_IO, "cannot write dataset '%s' in '%s': injected failure (MOE_FAULT=ckpt_write)",
                            d->name, w->path);
        wdset e = *d;
        if (st == MOE_OK && !own) st = sort_rows(w, &e, n, row_bytes);
        /* put_dset is collective over the writers: a writer whose rows did
         * not arrive still takes part, writing none. */
        if (st != MOE_OK) e.nr = 0;
        const moe_status pst = put_dset(w, &e);
        if (st == MOE_OK) st = pst;
    }
    moe_comm_phase_end();
    return agree(w->c, st);
}

/* Scratch for the tensors with a row map: their local rows sorted by global
 * row id (ids, perm: local row of each) and room for one tensor's rows in
 * that order; and for integer tensors, their values as int32 (parallel HDF5
 * writes filtered datasets collectively, which excludes type conversion).
 * Built before a file is touched, so an allocation failure is agreed on
 * instead of leaving a rank out of a collective write. */
typedef struct {
    int64_t n, cap_floats;
    int64_t *ids, *perm;
    float *rows;
    int32_t *ints;  /* (largest integer tensor) */
    int64_t *pids;  /* (2 x most rows of a placed FFN expert tensor) placed_rows' scratch */
} row_map;

static void row_map_free(row_map *r)
{
    free(r->ids);
    free(r->perm);
    moe_free(r->rows);
    free(r->ints);
    free(r->pids);
    memset(r, 0, sizeof *r);
}

/* The row map of table t (its vocabulary tensors with row_ids share one:
 * the vocabulary experts' weight and bias; placed FFN experts' row ids are
 * ascending and need none). Local: MOE_ERR_NOMEM. */
static moe_status row_map_make(row_map *r, const moe_tensor_table *t)
{
    memset(r, 0, sizeof *r);
    const moe_tensor *first = NULL;
    size_t ints = 0;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        if (x->dtype == MOE_TENSOR_I32 && x->numel > ints) ints = x->numel;
        if (!x->row_ids || x->experts != MOE_EXPERTS_VOCAB) continue;
        if (!first) first = x;
        const int64_t f = (int64_t)x->numel;
        if (f > r->cap_floats) r->cap_floats = f;
    }
    if (ints && !(r->ints = malloc(ints * sizeof *r->ints)))
        return moe_errorf(MOE_ERR_NOMEM, "checkpoint: %zu integers", ints);
    int64_t placed = 0;
    for (int i = 0; i < t->n; i++)
        if (t->t[i].row_ids && t->t[i].experts == MOE_EXPERTS_FFN && t->t[i].rows > placed) placed = t->t[i].rows;
    if (placed && !(r->pids = malloc((size_t)placed * 2 * sizeof *r->pids))) {
        row_map_free(r);
        return moe_errorf(MOE_ERR_NOMEM, "checkpoint: placed expert rows");
    }
    if (!first) return MOE_OK;
    const int64_t n = first->rows;
    int64_t *pairs = malloc((size_t)(n ? n : 1) * 2 * sizeof *pairs);
    r->ids = malloc((size_t)(n ? n : 1) * sizeof *r->ids);
    r->perm = malloc((size_t)(n ? n : 1) * sizeof *r->perm);
    r->rows = moe_calloc((size_t)r->cap_floats, sizeof *r->rows);
    if (!pairs || !r->ids || !r->perm || !r->rows) {
        free(pairs);
        row_map_free(r);
        return moe_errorf(MOE_ERR_NOMEM, "checkpoint: %lld rows of the vocabulary experts", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) pairs[2 * i] = first->row_ids[i], pairs[2 * i + 1] = i;
    qsort(pairs, (size_t)n, 2 * sizeof *pairs, cmp_pair);
    for (int64_t i = 0; i < n; i++) r->ids[i] = pairs[2 * i], r->perm[i] = pairs[2 * i + 1];
    free(pairs);
    r->n = n;
    return MOE_OK;
}

/* Same ids as the map's (all row-mapped tensors of a table share them). */
static int row_map_fits(const row_map *r, const moe_tensor *x)
{
    if (x->rows != r->n || (int64_t)x->numel > r->cap_floats) return 0;
    for (int64_t i = 0; i < r->n; i++)
        if (x->row_ids[r->perm[i]] != r->ids[i]) return 0;
    return 1;
}

/* Does a tensor have a dataset under this prefix? Buffers have no optimizer
 * state and no gradient. */
static int has_dataset(const moe_tensor *x, const char *prefix)
{
    return x->role != MOE_TENSOR_BUFFER || !strcmp(prefix, "/model/");
}

/* The rows a rank writes of placed FFN expert tensor x's layer: the global
 * experts of its primary copies (d->ids) and where they sit in memory
 * (d->mids): the local rows of x, or with global_mem the same global rows
 * of a per-expert [E] array. Nothing when !writes. Uses rm's scratch. */
static void placed_rows(wdset *d, const moe_tensor *x, const row_map *rm, int global_mem, int writes)
{
    int64_t *ids = rm->pids, *mids = rm->pids + x->rows, n = 0;
    for (int64_t r = 0; writes && r < x->rows; r++)
        if (x->row_primary[r]) ids[n] = x->row_ids[r], mids[n] = global_mem ? x->row_ids[r] : r, n++;
    d->ids = ids;
    d->mids = mids;
    d->mrows = global_mem ? (hsize_t)x->shape[0] : (hsize_t)x->rows;
    d->nr = (hsize_t)n;
    d->r0 = 0;
}

/* A table tensor under `prefix` ("/model/", "/optimizer/m/", "/grad/"):
 * expert rows from replica 0's owners, replicated tensors from world rank 0. */
static moe_status write_tensor(writer *w, moe_comm *c, const char *prefix, const moe_tensor *x,
                               const float *block, const row_map *rm)
{
    if (!has_dataset(x, prefix)) return MOE_OK;
    wdset d = {.dtype = x->dtype == MOE_TENSOR_I32 ? MOE_CKPT_I32 : MOE_CKPT_F32, .mtype = H5T_NATIVE_FLOAT,
               .ndim = x->ndim, .buf = block + x->offset};
    if (snprintf(d.name, sizeof d.name, "%s%s", prefix, x->name) >= (int)sizeof d.name)
        return moe_errorf(MOE_ERR_ARG, "checkpoint: dataset name %s%s too long", prefix, x->name);
    for (int i = 0; i < x->ndim; i++) d.dims[i] = (hsize_t)x->shape[i];
    const int writes = x->expert_sharded ? moe_comm_replica(c) == 0 : moe_comm_rank(c) == 0;
    d.r0 = (hsize_t)x->row0;
    d.nr = writes ? (hsize_t)x->rows : 0;
    const hsize_t row_bytes = (hsize_t)moe_tensor_row_numel(x) * 4;
    if (x->expert_sharded && (!x->row_ids || x->experts == MOE_EXPERTS_FFN))
        d.chunk_rows = 1; /* one expert row per chunk: one writer each */
    else
        d.chunk_rows = row_bytes >= CHUNK_TARGET ? 1 : CHUNK_TARGET / row_bytes;
    if (d.chunk_rows > d.dims[0]) d.chunk_rows = d.dims[0];
    if (x->row_ids && x->experts == MOE_EXPERTS_FFN) {
        /* placed experts: the primary copies' rows, ascending global
         * experts, straight from the block (one writer per expert row) */
        placed_rows(&d, x, rm, 0, writes);
        return write_dset(w, &d);
    }
    if (x->row_ids) {
        /* the local rows in id order (checked equal on every rank by the
         * table hash and row_map_fits at save time) */
        const size_t row = (size_t)moe_tensor_row_numel(x);
        for (int64_t i = 0; i < rm->n; i++)
            memcpy(rm->rows + (size_t)i * row, block + x->offset + (size_t)rm->perm[i] * row, row * sizeof(float));
        d.ids = rm->ids;
        d.buf = rm->rows;
    }
    if (x->dtype == MOE_TENSOR_I32) {
        for (size_t i = 0; i < x->numel; i++) rm->ints[i] = (int32_t)block[x->offset + i];
        d.mtype = H5T_NATIVE_INT32;
        d.buf = rm->ints;
    }
    return write_dset(w, &d);
}

/* A per-expert [E] array of a MoE layer: `owned` = written by each expert's
 * owner (replica 0; with the layer's experts placed, `placed` = one of its
 * expert tensors: by each primary copy), one chunk per expert; else whole
 * by world rank 0. */
static moe_status write_per_expert(writer *w, moe_comm *c, const char *name, moe_ckpt_dtype dtype,
                                   const void *row, int E, int owned, const moe_tensor *placed, const row_map *rm)
{
    wdset d = {.dtype = dtype, .ndim = 1, .dims = {(hsize_t)E}};
    snprintf(d.name, sizeof d.name, "%s", name);
    if (owned && placed) { /* the layer's experts are placed: each primary copy writes its expert */
        placed_rows(&d, placed, rm, 1, moe_comm_replica(c) == 0);
        d.chunk_rows = 1;
        d.mtype = ckpt_mem_type(dtype);
        d.buf = row;
        return write_dset(w, &d);
    }
    if (owned) {
        const int P = moe_comm_ep_size(c), p = moe_comm_ep_rank(c);
        d.r0 = (hsize_t)p * (hsize_t)(E / P);
        d.nr = moe_comm_replica(c) == 0 ? (hsize_t)(E / P) : 0;
        d.chunk_rows = 1;
    } else {
        d.nr = moe_comm_rank(c) == 0 ? (hsize_t)E : 0;
        d.chunk_rows = (hsize_t)E;
    }
    d.mtype = ckpt_mem_type(dtype);
    d.buf = (const char *)row + d.r0 * ckpt_dtype_size(dtype);
    return write_dset(w, &d);
}

/* Metadata calls are made by the writers alone (elsewhere a group is
 * H5I_INVALID_HID and the calls on it are skipped); each group of them ends
 * in meta_agree, so that a writer's failure stops every rank at the same
 * point. */
static moe_status make_group(const writer *w, const char *name, hid_t *g)
{
    *g = H5I_INVALID_HID;
    if (w->file < 0) return MOE_OK;
    *g = H5Gcreate2(w->file, name, w->lcpl, H5P_DEFAULT, H5P_DEFAULT);
    return *g < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot create group", name, w->path) : MOE_OK;
}

static moe_status meta_agree(const writer *w, moe_status st) { return agree(w->c, st); }

/* The root attributes every file carries. created_at comes from rank 0 so
 * that all writers write identical metadata. */
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

static moe_status write_root(const writer *w, const char *format, int64_t version, const root_info *r,
                             const char *config)
{
    if (w->file < 0) return MOE_OK;
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
    const uint8_t *vocab_activated;                   /* (M) or NULL */
    int n_experts;
    row_map rm;                                       /* both */
    int64_t step;
    const moe_train_config *cfg;
    const char *config;
} body;

/* A whole 1-D dataset written by world rank 0, in chunks of about 1 MB. */
static moe_status write_whole(writer *w, moe_comm *c, const char *name, moe_ckpt_dtype dtype, hid_t str_type,
                              const void *buf, hsize_t n)
{
    wdset d = {.dtype = dtype, .str_type = str_type, .ndim = 1, .dims = {n}, .buf = buf};
    snprintf(d.name, sizeof d.name, "%s", name);
    d.nr = moe_comm_rank(c) == 0 ? n : 0;
    const size_t esize = dtype == MOE_CKPT_STR ? H5Tget_size(str_type) : ckpt_dtype_size(dtype);
    d.chunk_rows = CHUNK_TARGET / esize < n ? CHUNK_TARGET / esize : n;
    if (d.chunk_rows < 1) d.chunk_rows = 1;
    return write_dset(w, &d);
}

/* /tokenizer (docs/formats.md): the rank byte strings and offsets, the
 * pattern and vocab_size, and the specials when there are any (names as
 * fixed-length NUL-padded strings, so that the dataset can carry a
 * checksum). Collective: rank 0 writes the data. */
static moe_status write_tokenizer(writer *w, moe_comm *c, const moe_tok *t)
{
    hid_t g = H5I_INVALID_HID;
    moe_status st = make_group(w, "/tokenizer", &g);
    if (st == MOE_OK && g >= 0) st = moe_h5_attr_put_str(g, "pattern", moe_tok_pattern(t), w->path);
    if (st == MOE_OK && g >= 0) st = moe_h5_attr_put_i64(g, "vocab_size", moe_tok_vocab_size(t), w->path);
    if (g >= 0) H5Gclose(g);
    st = meta_agree(w, st);
    const int64_t n = moe_tok_n_ranks(t);
    const int64_t *off = moe_tok_rank_offsets(t);
    if (st == MOE_OK)
        st = write_whole(w, c, "/tokenizer/ranks_bytes", MOE_CKPT_U8, 0, moe_tok_rank_bytes(t), (hsize_t)off[n]);
    if (st == MOE_OK) st = write_whole(w, c, "/tokenizer/ranks_offsets", MOE_CKPT_I64, 0, off, (hsize_t)n + 1);
    const int k = moe_tok_n_specials(t);
    if (st != MOE_OK || k == 0) return st;
    size_t width = 1;
    for (int i = 0; i < k; i++) {
        const size_t len = strlen(moe_tok_special_name(t, i)) + 1;
        width = len > width ? len : width;
    }
    int64_t *ids = moe_calloc((size_t)k, sizeof *ids);
    char *names = moe_calloc((size_t)k, width);
    hid_t type = H5Tcopy(H5T_C_S1);
    if (!ids || !names) st = moe_errorf(MOE_ERR_NOMEM, "checkpoint: %d special tokens", k);
    else if (type < 0 || H5Tset_size(type, width) < 0 || H5Tset_strpad(type, H5T_STR_NULLPAD) < 0)
        st = moe_h5_fail(MOE_ERR_IO, "cannot make a string type for", "/tokenizer/special_names", w->path);
    for (int i = 0; st == MOE_OK && i < k; i++) {
        ids[i] = moe_tok_special_id(t, i);
        memcpy(names + (size_t)i * width, moe_tok_special_name(t, i), strlen(moe_tok_special_name(t, i)));
    }
    st = agree(c, st); /* a local allocation or type failure */
    if (st == MOE_OK) st = write_whole(w, c, "/tokenizer/special_ids", MOE_CKPT_I64, 0, ids, (hsize_t)k);
    if (st == MOE_OK) st = write_whole(w, c, "/tokenizer/special_names", MOE_CKPT_STR, type, names, (hsize_t)k);
    if (type >= 0) H5Tclose(type);
    moe_free(ids);
    moe_free(names);
    return st;
}

static moe_status write_ckpt_body(writer *w, moe_comm *c, const moe_ckpt_state *s, const row_map *rm)
{
    hid_t g = H5I_INVALID_HID;
    const moe_tensor_table *t = s->table;
    moe_status st = make_group(w, "/model", &g);
    if (st == MOE_OK && g >= 0) st = ckpt_model_put(g, s->cfg, w->path);
    if (g >= 0) H5Gclose(g);
    st = meta_agree(w, st);
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/model/", &t->t[i], s->params, rm);

    if (st == MOE_OK && (st = make_group(w, "/optimizer", &g)) == MOE_OK && g >= 0) {
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
    st = meta_agree(w, st);
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/optimizer/m/", &t->t[i], s->m, rm);
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/optimizer/v/", &t->t[i], s->v, rm);

    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(t, layers), E = s->n_experts;
    char name[DSET_NAME];
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        const size_t o = (size_t)l * (size_t)E;
        snprintf(name, sizeof name, "/optimizer/expert_step/h/%d", layers[l]);
        const moe_tensor *placed = NULL;
        for (int i = 0; !placed && i < t->n; i++)
            if (t->t[i].expert_sharded && t->t[i].experts == MOE_EXPERTS_FFN && t->t[i].layer == layers[l] &&
                t->t[i].row_ids)
                placed = &t->t[i];
        st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_step + o, E, 1, placed, rm);
        snprintf(name, sizeof name, "/stats/h/%d/expert_tokens", layers[l]);
        if (st == MOE_OK) st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_tokens + o, E, 0, NULL, rm);
        snprintf(name, sizeof name, "/stats/h/%d/expert_dropped", layers[l]);
        if (st == MOE_OK) st = write_per_expert(w, c, name, MOE_CKPT_I64, s->expert_dropped + o, E, 0, NULL, rm);
    }
    if (st == MOE_OK && s->cfg->head == MOE_HEAD_VOCAB_EXPERTS) {
        const int M = s->cfg->vocab_experts;
        st = write_per_expert(w, c, "/optimizer/expert_step/vocab_head", MOE_CKPT_I64, s->vocab_expert_step, M, 1,
                              NULL, rm);
        if (st == MOE_OK)
            st = write_per_expert(w, c, "/stats/vocab_head/expert_tokens", MOE_CKPT_I64, s->vocab_expert_tokens, M, 0,
                                  NULL, rm);
    }

    if (st == MOE_OK && (st = make_group(w, "/train", &g)) == MOE_OK && g >= 0) {
        st = moe_h5_attr_put_i64(g, "step", s->step, w->path);
        if (st == MOE_OK) st = moe_h5_attr_put_i64(g, "tokens_seen", s->tokens_seen, w->path);
        /* The seed is stored unsigned so that no value wraps. */
        if (st == MOE_OK) st = moe_h5_attr_put_u64(g, "seed", s->seed, w->path);
        for (int i = 0; st == MOE_OK && i < s->n_extra; i++)
            st = moe_h5_attr_put_i64(g, s->extra[i].name, s->extra[i].value, w->path);
    }
    if (g >= 0) H5Gclose(g);
    st = meta_agree(w, st);
    if (st == MOE_OK && s->tok) st = write_tokenizer(w, c, s->tok);
    return st;
}

static moe_status write_grads_body(writer *w, moe_comm *c, const body *b)
{
    hid_t g = H5I_INVALID_HID;
    moe_status st = w->file >= 0 ? moe_h5_attr_put_i64(w->file, "step", b->step, w->path) : MOE_OK;
    /* The model attributes sit on /grad so that readers can check shapes. */
    if (st == MOE_OK) st = make_group(w, "/grad", &g);
    if (st == MOE_OK && g >= 0) st = ckpt_model_put(g, b->cfg, w->path);
    if (g >= 0) H5Gclose(g);
    st = meta_agree(w, st);
    const moe_tensor_table *t = b->table;
    for (int i = 0; st == MOE_OK && i < t->n; i++) st = write_tensor(w, c, "/grad/", &t->t[i], b->grads, &b->rm);
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(t, layers);
    char name[DSET_NAME];
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        snprintf(name, sizeof name, "/grad/h/%d/moe/experts/activated", layers[l]);
        st = write_per_expert(w, c, name, MOE_CKPT_U8, b->activated + (size_t)l * (size_t)b->n_experts,
                              b->n_experts, 0, NULL, &b->rm);
    }
    if (st == MOE_OK && b->vocab_activated)
        st = write_per_expert(w, c, "/grad/vocab_head/activated", MOE_CKPT_U8, b->vocab_activated,
                              b->cfg->vocab_experts, 0, NULL, &b->rm);
    return st;
}

typedef struct {
    const body *b;
    const root_info *r;
    moe_comm *c;
    moe_comm_h5_writers *agg;
} fill_ctx;

/* Fills the temporary file (moe_h5_write_atomic with node writers): runs on
 * every rank, which sends its rows to its node's writer dataset by
 * dataset; the writers make the metadata calls and write. Failures are
 * agreed after every dataset and every group of metadata calls. */
static moe_status fill(void *vctx, hid_t file, hid_t dxpl, hid_t lcpl, const char *tmp)
{
    const fill_ctx *x = vctx;
    const body *b = x->b;
    writer w = {.file = file, .dxpl = dxpl, .lcpl = lcpl, .path = tmp, .c = x->c, .agg = x->agg};
    const char *config = b->st ? b->st->config_text : b->config;
    /* format 2 only when the file holds one of its additions: a /tokenizer
     * group, or a format 2 /model attribute */
    const int64_t version = b->st && b->st->tok ? 2 : ckpt_format_version(b->st ? b->st->cfg : b->cfg);
    moe_status st = meta_agree(&w, write_root(&w, b->st ? CKPT_FORMAT : CKPT_FORMAT_GRADS, version, x->r, config));
    if (st == MOE_OK) st = b->st ? write_ckpt_body(&w, x->c, b->st, &b->rm) : write_grads_body(&w, x->c, b);
    moe_free(w.pack);
    moe_free(w.got);
    moe_free(w.sorted);
    moe_free(w.ids);
    moe_free(w.pairs);
    return st;
}

/* Bytes of data a file holds: every tensor of the table under each
 * prefix (global shapes), and the per-expert arrays. */
static uint64_t data_bytes(const moe_tensor_table *t, int n_prefix, int E, int per_layer_arrays, size_t elem)
{
    uint64_t n = 0;
    for (int i = 0; i < t->n; i++) {
        uint64_t e = 1;
        for (int k = 0; k < t->t[i].ndim; k++) e *= (uint64_t)t->t[i].shape[k];
        n += e * 4 * (uint64_t)n_prefix;
    }
    return n + (uint64_t)moe_ckpt_moe_layers(t, NULL) * (uint64_t)E * (uint64_t)per_layer_arrays * elem;
}

/* Writes path atomically (path.tmp, the one HDF5 writer of io/h5.h),
 * through one writer per node. Collective; the caller has already agreed
 * on its argument checks. */
static moe_status save_atomic(const char *path, moe_comm *c, body *b, const moe_tensor_table *t)
{
    root_info r;
    moe_status st = row_map_make(&b->rm, t);
    for (int i = 0; st == MOE_OK && i < t->n; i++)
        if (t->t[i].row_ids && t->t[i].experts == MOE_EXPERTS_VOCAB && !row_map_fits(&b->rm, &t->t[i]))
            st = moe_errorf(MOE_ERR_ARG, "checkpoint: tensor '%s' has other row ids than its table's first "
                                         "row-mapped tensor", t->t[i].name);
    st = agree(c, st);
    if (st == MOE_OK) st = root_info_make(&r, c);
    moe_comm_h5_writers *agg = NULL;
    if (st == MOE_OK) st = moe_comm_h5_writers_create(&agg, c);
    if (st == MOE_OK) {
        fill_ctx x = {b, &r, c, agg};
        uint64_t bytes = b->st ? data_bytes(b->st->table, 3, b->st->n_experts, 3, 8)
                               : data_bytes(b->table, 1, b->n_experts, 1, 1);
        if (b->st && b->st->tok) { /* /tokenizer: rank bytes and offsets */
            const int64_t n = moe_tok_n_ranks(b->st->tok);
            bytes += (uint64_t)moe_tok_rank_offsets(b->st->tok)[n] + 8 * (uint64_t)(n + 1);
        }
        st = moe_h5_write_atomic(path, ".tmp", c, agg, bytes, fill, &x);
    }
    moe_comm_h5_writers_destroy(agg);
    row_map_free(&b->rm);
    return st;
}

moe_status moe_ckpt_save(const char *path, moe_comm *c, const moe_ckpt_state *s)
{
    moe_status local = MOE_OK;
    if (!path || !*path || !s || !s->table || !s->params || !s->m || !s->v || !s->cfg || !s->expert_step ||
        !s->expert_tokens || !s->expert_dropped ||
        (s->cfg->head == MOE_HEAD_VOCAB_EXPERTS && (!s->vocab_expert_step || !s->vocab_expert_tokens)))
        local = moe_errorf(MOE_ERR_ARG, "checkpoint save: NULL path, state, table, buffer or config");
    else if (s->n_extra < 0 || s->n_extra > MOE_CKPT_MAX_EXTRA)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint save: n_extra = %d", s->n_extra);
    if (local == MOE_OK && s->tok && moe_tok_vocab_size(s->tok) > s->cfg->vocab_size)
        local = moe_errorf(MOE_ERR_ARG, "checkpoint save: the tokenizer has %lld ids, more than the model's vocab_size %d",
                           (long long)moe_tok_vocab_size(s->tok), s->cfg->vocab_size);
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
    if (s->tok) {
        const uint64_t th = moe_tok_hash(s->tok);
        h = ckpt_fnv1a(h, &th, sizeof th);
        for (int i = 0; i < moe_tok_n_specials(s->tok); i++) {
            const int64_t id = moe_tok_special_id(s->tok, i);
            h = ckpt_fnv1a(h, &id, sizeof id);
            h = ckpt_fnv1a(h, moe_tok_special_name(s->tok, i), strlen(moe_tok_special_name(s->tok, i)) + 1);
        }
    }
    if ((st = agree(c, moe_comm_check_same(c, "checkpoint attributes", &h, sizeof h))) != MOE_OK)
        return st;
    body b = {.st = s};
    /* Test hook: this rank stops answering before the parallel write; the
     * others wait in it until the comm_timeout watchdog ends the job. */
    if (moe_fault("ckpt_stall", moe_comm_rank(c)))
        for (;;) pause();
    return save_atomic(path, c, &b, s->table);
}

moe_status moe_ckpt_save_grads(const char *path, moe_comm *c, const moe_tensor_table *table, const float *grads,
                               const uint8_t *activated, const uint8_t *vocab_activated, int n_experts,
                               int64_t step, const moe_train_config *cfg, const char *config_text)
{
    moe_status local = MOE_OK;
    if (!path || !*path || !table || !grads || !activated || !cfg ||
        (cfg->head == MOE_HEAD_VOCAB_EXPERTS && !vocab_activated))
        local = moe_errorf(MOE_ERR_ARG, "gradient dump: NULL path, table, gradients, mask or config");
    moe_status st = check_common(c, local == MOE_OK ? table : NULL, n_experts, cfg, local);
    if (st != MOE_OK) return st;
    uint64_t h = ckpt_fnv1a(0xcbf29ce484222325ull, &step, sizeof step);
    if (config_text) h = ckpt_fnv1a(h, config_text, strlen(config_text));
    if ((st = agree(c, moe_comm_check_same(c, "gradient dump attributes", &h, sizeof h))) != MOE_OK)
        return st;
    body b = {.table = table, .grads = grads, .activated = activated, .n_experts = n_experts,
              .vocab_activated = cfg->head == MOE_HEAD_VOCAB_EXPERTS ? vocab_activated : NULL,
              .step = step, .cfg = cfg, .config = config_text};
    return save_atomic(path, c, &b, table);
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
            const moe_tensor *x = &t->t[i];
            if (!has_dataset(x, prefixes[p])) continue;
            snprintf(name, sizeof name, "%s%s", prefixes[p], x->name);
            st = ckpt_dset_open(f, name, x->dtype == MOE_TENSOR_I32 ? MOE_CKPT_I32 : MOE_CKPT_F32, x->ndim, x->shape,
                                &ds, path);
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
    const int64_t M = s->cfg->vocab_experts;
    const char *vnames[] = {"/optimizer/expert_step/vocab_head", "/stats/vocab_head/expert_tokens"};
    const void *vbufs[] = {s->vocab_expert_step, s->vocab_expert_tokens};
    for (int k = 0; st == MOE_OK && s->cfg->head == MOE_HEAD_VOCAB_EXPERTS && k < 2; k++) {
        if (!vbufs[k]) continue;
        hid_t ds;
        st = ckpt_dset_open(f, vnames[k], MOE_CKPT_I64, 1, &M, &ds, path);
        if (st == MOE_OK) H5Dclose(ds);
    }
    return st;
}

/* Rows [r0, r0 + nr) of dataset `name` into buf, or with ids the rows
 * ids[0 .. nr) (ascending) in that order (independent read). */
static moe_status read_rows(hid_t f, const char *name, hid_t mtype, int ndim, const int64_t *shape, int64_t r0,
                            int64_t nr, const int64_t *ids, void *buf, const char *path)
{
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    hid_t fs = ds < 0 ? H5I_INVALID_HID : H5Dget_space(ds);
    hsize_t start[MOE_TENSOR_MAX_DIMS] = {(hsize_t)r0}, count[MOE_TENSOR_MAX_DIMS] = {(hsize_t)nr}, n = (hsize_t)nr;
    for (int i = 1; i < ndim; i++) n *= (count[i] = (hsize_t)shape[i]);
    /* Same shape as the file selection: HDF5's fast path (see write_dset). */
    hid_t ms = H5Screate_simple(ndim, count, NULL);
    herr_t rc = ds < 0 || fs < 0 || ms < 0 ? -1 : 0;
    if (rc >= 0 && ids) {
        hsize_t dims[MOE_TENSOR_MAX_DIMS];
        for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
        rc = nr ? select_rows(fs, ndim, dims, ids, (hsize_t)nr) : -1;
    } else if (rc >= 0) {
        rc = H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    }
    /* An independent read, but a hung file system must not hold the job
     * forever: one watchdog phase per dataset. */
    moe_comm_phase_begin(NULL, MOE_SCOPE_WORLD, "HDF5 checkpoint read (one dataset)");
    if (rc >= 0) rc = H5Dread(ds, mtype, ms, fs, H5P_DEFAULT, buf);
    moe_comm_phase_end();
    moe_status st = rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot read dataset", name, path) : MOE_OK;
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    if (ds >= 0) H5Dclose(ds);
    return st;
}

/* An integer buffer holds the model's structure (the vocabulary
 * partition): the model was built from it, so the file's must be the same. */
static moe_status check_same_ints(const float *file, const float *model, const moe_tensor *x, const char *path)
{
    for (size_t i = 0; i < x->numel; i++)
        if (file[i] != model[i])
            return moe_errorf(MOE_ERR_MISMATCH, "'%s': /model/%s differs from the model's at element %zu (file %.0f, "
                                                "model %.0f): the model was built from another vocabulary partition",
                              path, x->name, i, file[i], model[i]);
    return MOE_OK;
}

/* One table tensor under `prefix` into its place in block, its values
 * checked against the format's rules (ckpt_check_values) with the element
 * numbers of the whole dataset. */
static moe_status read_tensor(hid_t f, const char *path, const char *prefix, const moe_tensor *x, float *block,
                              row_map *rm, int64_t opt_step)
{
    char name[DSET_NAME];
    snprintf(name, sizeof name, "%s%s", prefix, x->name);
    float *dst = block + x->offset;
    const size_t row = (size_t)moe_tensor_row_numel(x);
    if (x->row_ids && x->experts == MOE_EXPERTS_FFN) {
        /* placed experts: the rank's slots are ascending global rows */
        moe_status st = read_rows(f, name, H5T_NATIVE_FLOAT, x->ndim, x->shape, 0, x->rows, x->row_ids, dst, path);
        for (int64_t i = 0; st == MOE_OK && i < x->rows; i++)
            st = ckpt_check_values(path, name, opt_step, dst + (size_t)i * row, NULL, NULL, row,
                                   x->row_ids[i] * (int64_t)row);
        return st;
    }
    if (x->row_ids) {
        if (rm->n == 0) return MOE_OK;
        /* rows in id order, then each to its local (expert-major) place */
        moe_status st = read_rows(f, name, H5T_NATIVE_FLOAT, x->ndim, x->shape, 0, rm->n, rm->ids, rm->rows, path);
        for (int64_t i = 0; st == MOE_OK && i < rm->n; i++) {
            st = ckpt_check_values(path, name, opt_step, rm->rows + (size_t)i * row, NULL, NULL, row,
                                   rm->ids[i] * (int64_t)row);
            if (st == MOE_OK) memcpy(dst + (size_t)rm->perm[i] * row, rm->rows + (size_t)i * row, row * sizeof(float));
        }
        return st;
    }
    if (x->dtype == MOE_TENSOR_I32) {
        /* the model's structure: compared with the model's, not ranged */
        float *tmp = moe_calloc(x->numel, sizeof *tmp);
        if (!tmp) return moe_errorf(MOE_ERR_NOMEM, "checkpoint: reading %s", name);
        moe_status st = read_rows(f, name, H5T_NATIVE_FLOAT, x->ndim, x->shape, x->row0, x->rows, NULL, tmp, path);
        if (st == MOE_OK) st = check_same_ints(tmp, dst, x, path);
        moe_free(tmp);
        return st;
    }
    moe_status st = read_rows(f, name, H5T_NATIVE_FLOAT, x->ndim, x->shape, x->row0, x->rows, NULL, dst, path);
    if (st == MOE_OK) st = ckpt_check_values(path, name, opt_step, dst, NULL, NULL, x->numel, x->row0 * (int64_t)row);
    return st;
}

/* The n counters of dataset `name` into buf, checked (ckpt_check_values).
 * A caller that does not want them (evaluation: buf NULL) still has them
 * checked when the file holds them: a file no run writes is refused by
 * every command alike, not by --resume only. */
static moe_status read_counters(hid_t f, const char *path, const char *name, int64_t n, int64_t *buf,
                                int64_t opt_step)
{
    int64_t *tmp = NULL;
    if (!buf) {
        if (H5Lexists(f, name, H5P_DEFAULT) <= 0) return MOE_OK;
        if (!(buf = tmp = moe_calloc((size_t)n, sizeof *tmp)))
            return moe_errorf(MOE_ERR_NOMEM, "checkpoint: reading %s", name);
    }
    moe_status st = read_rows(f, name, H5T_NATIVE_INT64, 1, &n, 0, n, NULL, buf, path);
    if (st == MOE_OK) st = ckpt_check_values(path, name, opt_step, NULL, buf, NULL, (size_t)n, 0);
    moe_free(tmp);
    return st;
}

static moe_status read_all(hid_t f, const char *path, moe_ckpt_state *s, const int *layers, int n_moe)
{
    const moe_tensor_table *t = s->table;
    const char *prefixes[] = {"/model/", "/optimizer/m/", "/optimizer/v/"};
    float *blocks[] = {s->params, s->m, s->v};
    const int n_prefix = s->m && s->v ? 3 : 1;
    char name[DSET_NAME];
    row_map rm;
    moe_status st = row_map_make(&rm, t);
    for (int p = 0; p < n_prefix; p++)
        for (int i = 0; st == MOE_OK && i < t->n; i++) {
            const moe_tensor *x = &t->t[i];
            if (!has_dataset(x, prefixes[p])) continue;
            if (x->row_ids && x->experts == MOE_EXPERTS_VOCAB && !row_map_fits(&rm, x))
                st = moe_errorf(MOE_ERR_ARG, "checkpoint: tensor '%s' has other row ids than its table's first "
                                             "row-mapped tensor", x->name);
            else
                st = read_tensor(f, path, prefixes[p], x, blocks[p], &rm, s->opt_step);
        }
    row_map_free(&rm);
    const int64_t E = s->n_experts;
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        const char *fmts[] = {"/optimizer/expert_step/h/%d", "/stats/h/%d/expert_tokens",
                              "/stats/h/%d/expert_dropped"};
        int64_t *bufs[] = {s->expert_step, s->expert_tokens, s->expert_dropped};
        for (int k = 0; st == MOE_OK && k < 3; k++) {
            snprintf(name, sizeof name, fmts[k], layers[l]);
            st = read_counters(f, path, name, E, bufs[k] ? bufs[k] + (size_t)l * (size_t)E : NULL, s->opt_step);
        }
    }
    const int64_t M = s->cfg->vocab_experts;
    const char *vnames[] = {"/optimizer/expert_step/vocab_head", "/stats/vocab_head/expert_tokens"};
    int64_t *vbufs[] = {s->vocab_expert_step, s->vocab_expert_tokens};
    for (int k = 0; st == MOE_OK && s->cfg->head == MOE_HEAD_VOCAB_EXPERTS && k < 2; k++)
        st = read_counters(f, path, vnames[k], M, vbufs[k], s->opt_step);
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
    moe_status st = ckpt_check_path(path);
    if (st != MOE_OK) return st;
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
    /* Every rank can read the path; one rank reads the whole file for the
     * global heap check (the same file for all, agreed just below). */
    moe_status pre = ckpt_check_path(path);
    if (pre == MOE_OK && moe_comm_rank(c) == 0) pre = moe_h5_check_global_heaps(path);
    if (pre == MOE_OK && fapl < 0) pre = open_fail(path);
    st = agree(c, pre);
    if (st == MOE_OK) st = agree(c, moe_comm_check_same(c, "checkpoint path", path, strlen(path)));
    if (st == MOE_OK) {
        moe_comm_phase_begin(c, MOE_SCOPE_WORLD, "parallel HDF5 checkpoint open");
        f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
        moe_comm_phase_end();
        st = f < 0 ? open_fail(path) : MOE_OK;
    }
    if (fapl >= 0) H5Pclose(fapl);
    st = agree(c, st);
    if (st == MOE_OK) {
        st = agree(c, validate(f, path, s, layers, n_moe));
        char *cfg_text = NULL;
        if (st == MOE_OK) st = ckpt_read_scalars(f, path, s, config_text ? &cfg_text : NULL);
        if (st == MOE_OK) st = ckpt_check_scalars(s, path);
        if (st == MOE_OK) st = read_all(f, path, s, layers, n_moe);
        st = agree(c, st);
        if (st == MOE_OK && config_text)
            *config_text = cfg_text;
        else
            free(cfg_text);
    }
    moe_comm_phase_begin(c, MOE_SCOPE_WORLD, "parallel HDF5 checkpoint close");
    if (f >= 0 && H5Fclose(f) < 0 && st == MOE_OK) st = moe_h5_fail(MOE_ERR_IO, "cannot close", NULL, path);
    moe_comm_phase_end();
    moe_h5_quiet_end(&q);
    st = agree(c, st);
    if (st != MOE_OK && config_text) {
        free(*config_text);
        *config_text = NULL;
    }
    return st;
}

/* ---- the tokenizer ---- */

moe_status moe_ckpt_load_tokenizer(moe_tok **out, const char *path, moe_comm *c)
{
    *out = NULL;
    /* Rank 0 reads and checks it, then sends it in moerun's own file form
     * (exact round trip: docs/tokenizer.md section 3). */
    char *buf = NULL;
    uint64_t len = 0; /* 0: no tokenizer */
    moe_status st = MOE_OK;
    if (moe_comm_rank(c) == 0) {
        char file[MOE_H5_PATH_MAX];
        moe_ckpt_file *f = NULL;
        moe_tok *t = NULL;
        st = moe_ckpt_resolve(file, sizeof file, path);
        if (st == MOE_OK) st = moe_ckpt_file_open(&f, file);
        if (st == MOE_OK) st = moe_ckpt_file_tokenizer(f, &t);
        size_t n = 0;
        if (st == MOE_OK && t) st = moe_tok_save_buffer(t, MOE_TOK_FORM_TIKTOKEN_JSON, &buf, &n);
        len = n;
        moe_tok_destroy(t);
        moe_ckpt_file_close(f);
    }
    st = agree(c, st);
    if (st == MOE_OK) st = moe_comm_bcast(c, &len, sizeof len, 0);
    if (st == MOE_OK && len && moe_comm_rank(c) != 0)
        st = (buf = malloc(len)) ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "tokenizer of '%s': %llu bytes", path,
                                                       (unsigned long long)len);
    st = agree(c, st);
    if (st == MOE_OK && len) st = moe_comm_bcast(c, buf, len, 0);
    if (st == MOE_OK && len) st = moe_tok_load_buffer(out, path, (const uint8_t *)buf, len, MOE_TOK_FORM_TIKTOKEN_JSON,
                                                      NULL, 0, NULL, NULL);
    free(buf);
    st = agree(c, st);
    if (st != MOE_OK) {
        moe_tok_destroy(*out);
        *out = NULL;
    }
    return st;
}
