/* Single-process checkpoint / gradient-dump reader for tools (ckpt_file.h):
 * attributes first, then the list of datasets the format expects from them
 * (with shapes), merged with what the file actually holds. Data is read
 * only on request, one dataset at a time, after its shape is checked. */
#include "ckpt/ckpt_file.h"
#include "layout/layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt/ckpt_h5.h"

/* Largest dataset a tool reads whole (elements, as doubles: 16 GiB). */
#define MAX_READ_ELEMS ((int64_t)1 << 31)

struct moe_ckpt_file {
    hid_t file;
    char *path;
    moe_ckpt_info info;
    moe_tensor_table *layout;
    moe_ckpt_dset *d; /* (n) */
    int n, cap;
};

static moe_status add_dset(moe_ckpt_file *f, const char *path, moe_ckpt_dtype t, int ndim, const int64_t *dims,
                           int expected, int tensor)
{
    if (f->n == f->cap) {
        int cap = f->cap ? 2 * f->cap : 128;
        moe_ckpt_dset *p = realloc(f->d, (size_t)cap * sizeof *p);
        if (!p) return moe_errorf(MOE_ERR_NOMEM, "dataset list of '%s'", f->path);
        f->d = p;
        f->cap = cap;
    }
    moe_ckpt_dset *x = &f->d[f->n];
    memset(x, 0, sizeof *x);
    if (snprintf(x->path, sizeof x->path, "%s", path) >= (int)sizeof x->path)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset name too long: '%s'", f->path, path);
    x->dtype = t;
    x->ndim = ndim;
    memcpy(x->dims, dims, (size_t)ndim * sizeof *dims);
    x->expected = expected;
    x->tensor = tensor;
    f->n++;
    return MOE_OK;
}

/* The datasets of /tokenizer (docs/formats.md). */
static const struct {
    const char *path;
    moe_ckpt_dtype dtype;
    int required;
} tok_dsets[] = {{"/tokenizer/ranks_bytes", MOE_CKPT_U8, 1},
                 {"/tokenizer/ranks_offsets", MOE_CKPT_I64, 1},
                 {"/tokenizer/special_ids", MOE_CKPT_I64, 0},
                 {"/tokenizer/special_names", MOE_CKPT_STR, 0}};
enum { N_TOK_DSETS = 4, TOK_BYTES = 0, TOK_OFFSETS = 1, TOK_SPECIAL_IDS = 2, TOK_SPECIAL_NAMES = 3 };

/* The datasets the format expects, from the layout. */
static moe_status expect_all(moe_ckpt_file *f)
{
    const moe_tensor_table *t = f->layout;
    const char *ck[] = {"/model/", "/optimizer/m/", "/optimizer/v/"}, *gr[] = {"/grad/"};
    const char **pre = f->info.gradients ? gr : ck;
    const int n_pre = f->info.gradients ? 1 : 3;
    char p[sizeof f->d->path];
    moe_status st = MOE_OK;
    for (int k = 0; k < n_pre; k++)
        for (int i = 0; st == MOE_OK && i < t->n; i++) {
            const moe_tensor *x = &t->t[i];
            if (x->role == MOE_TENSOR_BUFFER && k + f->info.gradients > 0) continue; /* no moments, no gradient */
            snprintf(p, sizeof p, "%s%s", pre[k], x->name);
            st = add_dset(f, p, x->dtype == MOE_TENSOR_I32 ? MOE_CKPT_I32 : MOE_CKPT_F32, x->ndim, x->shape, 1, i);
        }
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(t, layers);
    const int64_t E = f->info.model.n_experts;
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        if (f->info.gradients) {
            snprintf(p, sizeof p, "/grad/h/%d/moe/experts/activated", layers[l]);
            st = add_dset(f, p, MOE_CKPT_U8, 1, &E, 1, -1);
            continue;
        }
        const char *fmts[] = {"/optimizer/expert_step/h/%d", "/stats/h/%d/expert_tokens",
                              "/stats/h/%d/expert_dropped"};
        for (int k = 0; st == MOE_OK && k < 3; k++) {
            snprintf(p, sizeof p, fmts[k], layers[l]);
            st = add_dset(f, p, MOE_CKPT_I64, 1, &E, 1, -1);
        }
    }
    /* /tokenizer: its sizes are its own (the datasets' extents); the
     * specials only when there are any */
    for (int k = 0; st == MOE_OK && f->info.has_tokenizer && k < N_TOK_DSETS; k++) {
        int64_t dim = 0;
        const int there = H5Lexists(f->file, tok_dsets[k].path, H5P_DEFAULT) > 0;
        if (there) {
            hid_t ds = H5Dopen2(f->file, tok_dsets[k].path, H5P_DEFAULT);
            hid_t sp = ds < 0 ? H5I_INVALID_HID : H5Dget_space(ds);
            hsize_t d[H5S_MAX_RANK];
            const int nd = sp < 0 ? -1 : H5Sget_simple_extent_dims(sp, d, NULL);
            dim = nd == 1 && d[0] <= (hsize_t)INT64_MAX ? (int64_t)d[0] : -1;
            if (sp >= 0) H5Sclose(sp);
            if (ds >= 0) H5Dclose(ds);
            if (dim < 0)
                st = moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is not one-dimensional", f->path, tok_dsets[k].path);
        }
        if (st == MOE_OK && (there || tok_dsets[k].required))
            st = add_dset(f, tok_dsets[k].path, tok_dsets[k].dtype, 1, &dim, 1, -1);
    }
    if (st == MOE_OK && f->info.model.head == MOE_HEAD_VOCAB_EXPERTS) {
        const int64_t M = f->info.model.vocab_experts;
        if (f->info.gradients) {
            st = add_dset(f, "/grad/vocab_head/activated", MOE_CKPT_U8, 1, &M, 1, -1);
        } else {
            st = add_dset(f, "/optimizer/expert_step/vocab_head", MOE_CKPT_I64, 1, &M, 1, -1);
            if (st == MOE_OK) st = add_dset(f, "/stats/vocab_head/expert_tokens", MOE_CKPT_I64, 1, &M, 1, -1);
        }
    }
    return st;
}

typedef struct {
    moe_ckpt_file *f;
    moe_status st;
} visit_ctx;

/* Marks expected datasets present and appends the others with their own
 * type and shape. */
static herr_t visit(hid_t obj, const char *name, const H5O_info_t *info, void *arg)
{
    visit_ctx *v = arg;
    if (info->type != H5O_TYPE_DATASET) return 0;
    char p[sizeof v->f->d->path];
    snprintf(p, sizeof p, "/%s", name);
    int i = moe_ckpt_file_find(v->f, p);
    if (i >= 0) {
        v->f->d[i].present = 1;
        return 0;
    }
    hid_t ds = H5Dopen2(obj, name, H5P_DEFAULT);
    hid_t t = ds < 0 ? H5I_INVALID_HID : H5Dget_type(ds), sp = ds < 0 ? H5I_INVALID_HID : H5Dget_space(ds);
    hsize_t dims[H5S_MAX_RANK];
    int nd = sp < 0 ? -1 : H5Sget_simple_extent_dims(sp, dims, NULL);
    const size_t tsize = t >= 0 ? H5Tget_size(t) : 0;
    moe_ckpt_dtype dt = t >= 0 && H5Tget_class(t) == H5T_INTEGER
                            ? (tsize == 1 ? MOE_CKPT_U8 : tsize == 4 ? MOE_CKPT_I32 : MOE_CKPT_I64)
                      : t >= 0 && H5Tget_class(t) == H5T_STRING ? MOE_CKPT_STR
                                                                : MOE_CKPT_F32;
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    if (ds >= 0) H5Dclose(ds);
    if (nd < 0 || nd > MOE_TENSOR_MAX_DIMS) {
        v->st = moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' cannot be described (rank %d)", v->f->path, p, nd);
        return -1;
    }
    int64_t d64[MOE_TENSOR_MAX_DIMS];
    for (int k = 0; k < nd; k++) d64[k] = dims[k] > (hsize_t)INT64_MAX ? INT64_MAX : (int64_t)dims[k];
    v->st = add_dset(v->f, p, dt, nd, d64, 0, -1);
    if (v->st == MOE_OK) v->f->d[v->f->n - 1].present = 1;
    return v->st == MOE_OK ? 0 : -1;
}

/* The layout of the file's model on one rank. A tool reads whole datasets
 * by global shape, which do not depend on how the vocabulary is split: a
 * round-robin placeholder partition stands in for the file's (which may be
 * the damaged dataset the tool is looking at). */
static moe_status tool_layout(moe_ckpt_file *f)
{
    const moe_train_config *c = &f->info.model;
    if (c->head != MOE_HEAD_VOCAB_EXPERTS) return moe_layout_create(&f->layout, c, NULL, 0, 1);
    moe_status st = moe_train_config_check_model(c); /* sizes before allocating by them */
    if (st != MOE_OK) return st;
    int32_t *assign = malloc((size_t)c->vocab_size * sizeof *assign);
    if (!assign) return moe_errorf(MOE_ERR_NOMEM, "placeholder partition of %d tokens", c->vocab_size);
    for (int v = 0; v < c->vocab_size; v++) assign[v] = v % c->vocab_experts;
    moe_vocab_part *part = NULL;
    st = moe_vocab_part_create(&part, assign, c->vocab_size, c->vocab_experts);
    free(assign);
    if (st == MOE_OK) st = moe_layout_create(&f->layout, c, part, 0, 1);
    moe_vocab_part_destroy(part);
    return st;
}

static moe_status read_info(moe_ckpt_file *f)
{
    moe_ckpt_info *in = &f->info;
    const char *p = f->path;
    moe_status st = ckpt_check_format(f->file, NULL, &in->gradients, &in->format_version, p);
    if (st == MOE_OK) snprintf(in->format, sizeof in->format, "%s", in->gradients ? CKPT_FORMAT_GRADS : CKPT_FORMAT);
    in->has_tokenizer = !in->gradients && H5Lexists(f->file, "/tokenizer", H5P_DEFAULT) > 0;
    if (st == MOE_OK) st = moe_h5_attr_get_strbuf(f->file, "created_by", in->created_by, sizeof in->created_by, p);
    if (st == MOE_OK) st = moe_h5_attr_get_strbuf(f->file, "created_at", in->created_at, sizeof in->created_at, p);
    if (st == MOE_OK) st = moe_h5_attr_get_i64(f->file, "saved_world_size", &in->saved_world_size, p);
    if (st == MOE_OK) st = moe_h5_attr_get_i64(f->file, "saved_ep_size", &in->saved_ep_size, p);
    if (st != MOE_OK) return st;
    const char *mg = in->gradients ? "/grad" : "/model";
    hid_t g = H5Gopen2(f->file, mg, H5P_DEFAULT);
    if (g < 0) return moe_errorf(MOE_ERR_FORMAT, "'%s': group %s is missing", p, mg);
    st = ckpt_model_get(g, &in->model, p);
    H5Gclose(g);
    if (st != MOE_OK) return st;
    if ((st = tool_layout(f)) != MOE_OK) {
        char why[512]; /* the detail buffer cannot be its own argument */
        snprintf(why, sizeof why, "%s", moe_error_detail());
        return moe_errorf(st == MOE_ERR_NOMEM ? st : MOE_ERR_FORMAT, "'%s': %s", p, why);
    }
    if (in->gradients) {
        st = moe_h5_attr_get_i64(f->file, "step", &in->step, p);
        if (st == MOE_OK) st = moe_h5_attr_get_str(f->file, "config", &in->config, p);
        return st;
    }
    moe_ckpt_state s;
    memset(&s, 0, sizeof s);
    st = ckpt_read_scalars(f->file, p, &s, &in->config);
    if (st == MOE_OK) st = ckpt_check_scalars(&s, p);
    in->step = s.step;
    in->tokens_seen = s.tokens_seen;
    in->seed = s.seed;
    memcpy(in->extra, s.extra, sizeof s.extra);
    in->n_extra = s.n_extra;
    in->opt_step = s.opt_step;
    in->lr = s.lr;
    in->beta1 = s.beta1;
    in->beta2 = s.beta2;
    in->eps = s.eps;
    in->weight_decay = s.weight_decay;
    return st;
}

moe_status moe_ckpt_file_open(moe_ckpt_file **out, const char *path)
{
    *out = NULL;
    if (!path || !*path) return moe_errorf(MOE_ERR_ARG, "no file name");
    moe_status cst = ckpt_check_file(path);
    if (cst != MOE_OK) return cst;
    moe_ckpt_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return moe_errorf(MOE_ERR_NOMEM, "opening '%s'", path);
    }
    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    moe_status st = MOE_OK;
    f->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f->file < 0) {
        st = H5Fis_hdf5(path) == 0
                 ? moe_errorf(MOE_ERR_FORMAT, "'%s' is not an HDF5 file", path)
                 : moe_h5_fail(MOE_ERR_FORMAT, "cannot open (truncated or damaged?)", NULL, path);
    }
    if (st == MOE_OK) st = read_info(f);
    if (st == MOE_OK) st = expect_all(f);
    if (st == MOE_OK) {
        visit_ctx v = {f, MOE_OK};
        if (H5Ovisit2(f->file, H5_INDEX_NAME, H5_ITER_INC, visit, &v, H5O_INFO_BASIC) < 0)
            st = v.st != MOE_OK ? v.st : moe_h5_fail(MOE_ERR_FORMAT, "cannot list the objects of", NULL, path);
    }
    moe_h5_quiet_end(&q);
    if (st != MOE_OK) {
        moe_ckpt_file_close(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

void moe_ckpt_file_close(moe_ckpt_file *f)
{
    if (!f) return;
    if (f->file > 0) {
        moe_h5_quiet q;
        moe_h5_quiet_begin(&q);
        H5Fclose(f->file);
        moe_h5_quiet_end(&q);
    }
    moe_layout_destroy(f->layout);
    free(f->info.config);
    free(f->d);
    free(f->path);
    free(f);
}

const moe_ckpt_info *moe_ckpt_file_info(const moe_ckpt_file *f) { return &f->info; }
const moe_tensor_table *moe_ckpt_file_layout(const moe_ckpt_file *f) { return f->layout; }
int moe_ckpt_file_n_dsets(const moe_ckpt_file *f) { return f->n; }
const moe_ckpt_dset *moe_ckpt_file_dset(const moe_ckpt_file *f, int i) { return &f->d[i]; }

int moe_ckpt_file_find(const moe_ckpt_file *f, const char *path)
{
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->d[i].path, path)) return i;
    return -1;
}

/* The element count of dataset d, or MAX_READ_ELEMS + 1 when larger. */
static int64_t dset_elems(const moe_ckpt_dset *d)
{
    int64_t n = 1;
    for (int k = 0; k < d->ndim && n <= MAX_READ_ELEMS; k++)
        n = d->dims[k] > 0 && n > MAX_READ_ELEMS / d->dims[k] ? MAX_READ_ELEMS + 1 : n * d->dims[k];
    return n;
}

/* Reads dataset d whole in memory type mtype (elements of esize bytes)
 * into a new buffer, after its type and shape are checked. */
static moe_status read_whole(const moe_ckpt_file *f, const moe_ckpt_dset *d, hid_t mtype, size_t esize, void **out,
                             int64_t *n_out)
{
    *out = NULL;
    if (!d->present) return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is missing", f->path, d->path);
    const int64_t n = dset_elems(d);
    if (n > MAX_READ_ELEMS)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is too large to read whole", f->path, d->path);
    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    hid_t ds;
    moe_status st = ckpt_dset_open(f->file, d->path, d->dtype, d->ndim, d->dims, &ds, f->path);
    void *buf = NULL;
    if (st == MOE_OK) {
        hid_t t = mtype;
        if (d->dtype == MOE_CKPT_STR) { /* the file's own fixed size */
            hid_t ft = H5Dget_type(ds);
            t = ft < 0 ? H5I_INVALID_HID : H5Tcopy(ft);
            if (ft >= 0) H5Tclose(ft);
            esize = t < 0 ? 0 : H5Tget_size(t);
        }
        if (t < 0 || !esize || (size_t)n > SIZE_MAX / esize)
            st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read the type of dataset", d->path, f->path);
        else if (!(buf = moe_calloc((size_t)n, esize)))
            st = moe_errorf(MOE_ERR_NOMEM, "dataset '%s' (%lld elements)", d->path, (long long)n);
        else if (H5Dread(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
            st = moe_h5_fail(MOE_ERR_IO, "cannot read dataset", d->path, f->path);
        if (d->dtype == MOE_CKPT_STR && t >= 0) H5Tclose(t);
        H5Dclose(ds);
    }
    moe_h5_quiet_end(&q);
    /* the values the format allows (NaN weights, negative counts, ...) */
    if (st == MOE_OK) st = ckpt_check_values(f->path, d->path, f->info.opt_step, NULL, NULL, buf, (size_t)n, 0);
    if (st != MOE_OK) {
        moe_free(buf);
        return st;
    }
    *out = buf;
    *n_out = d->dtype == MOE_CKPT_STR ? n * (int64_t)esize : n;
    return MOE_OK;
}

moe_status moe_ckpt_file_read(const moe_ckpt_file *f, int i, double **out, int64_t *numel)
{
    *out = NULL;
    *numel = 0;
    if (i < 0 || i >= f->n) return moe_errorf(MOE_ERR_ARG, "dataset index %d out of range", i);
    const moe_ckpt_dset *d = &f->d[i];
    if (d->dtype != MOE_CKPT_STR) {
        void *buf;
        moe_status st = read_whole(f, d, H5T_NATIVE_DOUBLE, sizeof(double), &buf, numel);
        *out = buf;
        return st;
    }
    /* a string dataset: its bytes as numbers */
    void *raw;
    int64_t n;
    moe_status st = read_whole(f, d, H5I_INVALID_HID, 0, &raw, &n);
    if (st != MOE_OK) return st;
    double *buf = moe_calloc((size_t)n, sizeof *buf);
    if (!buf) {
        moe_free(raw);
        return moe_errorf(MOE_ERR_NOMEM, "dataset '%s' (%lld bytes)", d->path, (long long)n);
    }
    for (int64_t k = 0; k < n; k++) buf[k] = ((const unsigned char *)raw)[k];
    moe_free(raw);
    *out = buf;
    *numel = n;
    return MOE_OK;
}

/* ---- /tokenizer ---- */

/* A tokenizer failure of f: "'<file>': /tokenizer: <what>". */
static moe_status tok_fail(const moe_ckpt_file *f, moe_status st, const char *what)
{
    char why[512]; /* the detail buffer cannot be its own argument */
    snprintf(why, sizeof why, "%s", what);
    return moe_errorf(st, "'%s': /tokenizer: %s", f->path, why);
}

moe_status moe_ckpt_file_tokenizer(const moe_ckpt_file *f, moe_tok **out)
{
    *out = NULL;
    if (!f->info.has_tokenizer) return MOE_OK;
    const moe_ckpt_dset *d[N_TOK_DSETS];
    for (int k = 0; k < N_TOK_DSETS; k++) {
        const int i = moe_ckpt_file_find(f, tok_dsets[k].path);
        d[k] = i >= 0 ? &f->d[i] : NULL;
    }
    for (int k = 0; k < N_TOK_DSETS; k++)
        if (d[k] && !d[k]->present)
            return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is missing", f->path, tok_dsets[k].path);
    /* sizes first: nothing is allocated for a file that claims absurd ones */
    const int64_t n1 = d[TOK_OFFSETS] ? d[TOK_OFFSETS]->dims[0] : 0, nb = d[TOK_BYTES] ? d[TOK_BYTES]->dims[0] : 0;
    const int64_t k = d[TOK_SPECIAL_IDS] ? d[TOK_SPECIAL_IDS]->dims[0] : 0;
    if (n1 < 257 || n1 > (int64_t)MOE_TOK_MAX_VOCAB + 1)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer/ranks_offsets has %lld entries (expected n + 1 with 256 <= n <= %d)",
                          f->path, (long long)n1, MOE_TOK_MAX_VOCAB);
    if (nb < 256 || nb > (n1 - 1) * (int64_t)MOE_TOK_MAX_TOKEN_LEN || nb > MAX_READ_ELEMS)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer/ranks_bytes has %lld bytes for %lld tokens", f->path,
                          (long long)nb, (long long)(n1 - 1));
    if (!d[TOK_SPECIAL_IDS] != !d[TOK_SPECIAL_NAMES] || k > MOE_TOK_MAX_SPECIALS ||
        (d[TOK_SPECIAL_NAMES] && d[TOK_SPECIAL_NAMES]->dims[0] != k))
        return moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer: special_names and special_ids must come together, with "
                                          "the same length (at most %d)", f->path, MOE_TOK_MAX_SPECIALS);
    hid_t g = H5Gopen2(f->file, "/tokenizer", H5P_DEFAULT);
    if (g < 0) return moe_errorf(MOE_ERR_FORMAT, "'%s': group /tokenizer cannot be opened", f->path);
    char *pattern = NULL;
    int64_t vocab = 0;
    moe_status st = moe_h5_attr_get_str(g, "pattern", &pattern, f->path);
    if (st == MOE_OK) st = moe_h5_attr_get_i64(g, "vocab_size", &vocab, f->path);
    H5Gclose(g);
    void *bytes = NULL, *offsets = NULL, *ids = NULL, *names = NULL;
    int64_t n = 0, nn = 0;
    if (st == MOE_OK) st = read_whole(f, d[TOK_BYTES], H5T_NATIVE_UINT8, 1, &bytes, &n);
    if (st == MOE_OK) st = read_whole(f, d[TOK_OFFSETS], H5T_NATIVE_INT64, 8, &offsets, &n);
    if (st == MOE_OK && k) st = read_whole(f, d[TOK_SPECIAL_IDS], H5T_NATIVE_INT64, 8, &ids, &n);
    if (st == MOE_OK && k) st = read_whole(f, d[TOK_SPECIAL_NAMES], H5I_INVALID_HID, 0, &names, &nn);
    const int64_t *off = offsets;
    if (st == MOE_OK && (off[0] != 0 || off[n1 - 1] != nb))
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer/ranks_offsets runs from %lld to %lld, not 0 to %lld "
                                        "(the size of ranks_bytes)", f->path, (long long)off[0],
                        (long long)off[n1 - 1], (long long)nb);
    /* the names: fixed-length, NUL-padded */
    char **name = k ? moe_calloc((size_t)k, sizeof *name) : NULL;
    const size_t width = k ? (size_t)(nn / k) : 0;
    char *copy = k ? moe_calloc((size_t)k, width + 1) : NULL;
    if (st == MOE_OK && k && (!name || !copy)) st = moe_errorf(MOE_ERR_NOMEM, "special tokens of '%s'", f->path);
    for (int64_t i = 0; st == MOE_OK && i < k; i++) {
        name[i] = copy + (size_t)i * (width + 1);
        memcpy(name[i], (const char *)names + (size_t)i * width, width);
    }
    if (st == MOE_OK) {
        st = moe_tok_create(out, bytes, off, n1 - 1, pattern, (int)k, (const char *const *)name, ids);
        if (st != MOE_OK) st = tok_fail(f, MOE_ERR_FORMAT, moe_error_detail());
    }
    if (st == MOE_OK && moe_tok_vocab_size(*out) != vocab)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer has %lld ids but its attribute vocab_size says %lld", f->path,
                        (long long)moe_tok_vocab_size(*out), (long long)vocab);
    if (st == MOE_OK && moe_tok_vocab_size(*out) > f->info.model.vocab_size)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': /tokenizer has %lld ids, more than the model's vocab_size %d", f->path,
                        (long long)moe_tok_vocab_size(*out), f->info.model.vocab_size);
    if (st != MOE_OK) {
        moe_tok_destroy(*out);
        *out = NULL;
    }
    free(pattern);
    moe_free(bytes);
    moe_free(offsets);
    moe_free(ids);
    moe_free(names);
    moe_free(name);
    moe_free(copy);
    return st;
}
