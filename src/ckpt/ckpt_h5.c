/* HDF5 helpers of the checkpoint module: quiet errors with HDF5's innermost
 * message in the detail, typed scalar attributes, the spec's /model
 * attributes and dataset shape checks (see ckpt_h5.h). */
#include "ckpt/ckpt_h5.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { H5MSG = 384 };

void ckpt_quiet_begin(ckpt_quiet *q)
{
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void ckpt_quiet_end(const ckpt_quiet *q) { H5Eset_auto2(H5E_DEFAULT, q->func, q->data); }

typedef struct {
    char msg[H5MSG];
    int checksum;
} h5_err;

static herr_t walk_error(unsigned n, const H5E_error2_t *e, void *arg)
{
    h5_err *r = arg;
    if (n == 0) snprintf(r->msg, sizeof r->msg, "%s", e->desc ? e->desc : "");
    /* A Fletcher32 mismatch surfaces as "data error detected by fletcher32
     * checksum" (filter pipeline) somewhere on the stack. */
    if (e->desc && (strstr(e->desc, "checksum") || strstr(e->desc, "Fletcher"))) r->checksum = 1;
    return 0;
}

moe_status ckpt_h5_fail(moe_status s, const char *what, const char *name, const char *file)
{
    h5_err r = {{0}, 0};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk_error, &r);
    if (r.checksum) s = MOE_ERR_CHECKSUM;
    return moe_errorf(s, "%s%s '%s' in '%s'%s%s", what, r.checksum ? " (checksum mismatch)" : "", name, file,
                      *r.msg ? ": " : "", r.msg);
}

/* ---- attributes ---- */

static hid_t str_type(void)
{
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t >= 0 && (H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0)) {
        H5Tclose(t);
        t = H5I_INVALID_HID;
    }
    return t;
}

static moe_status attr_put(hid_t loc, const char *name, hid_t ftype, hid_t mtype, const void *v, const char *file)
{
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t at = sp < 0 ? H5I_INVALID_HID : H5Acreate2(loc, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = at < 0 ? -1 : H5Awrite(at, mtype, v);
    if (at >= 0) H5Aclose(at);
    if (sp >= 0) H5Sclose(sp);
    return rc < 0 ? ckpt_h5_fail(MOE_ERR_IO, "cannot write attribute", name, file) : MOE_OK;
}

moe_status ckpt_attr_put_i64(hid_t loc, const char *name, int64_t v, const char *file)
{
    return attr_put(loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, file);
}

moe_status ckpt_attr_put_u64(hid_t loc, const char *name, uint64_t v, const char *file)
{
    return attr_put(loc, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &v, file);
}

moe_status ckpt_attr_put_f64(hid_t loc, const char *name, double v, const char *file)
{
    return attr_put(loc, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, file);
}

moe_status ckpt_attr_put_str(hid_t loc, const char *name, const char *s, const char *file)
{
    hid_t t = str_type();
    if (t < 0) return ckpt_h5_fail(MOE_ERR_IO, "cannot make a string type for", name, file);
    moe_status st = attr_put(loc, name, t, t, &s, file);
    H5Tclose(t);
    return st;
}

/* Opens a scalar attribute of the given class, or fails naming it. */
static moe_status attr_open(hid_t loc, const char *name, H5T_class_t cls, hid_t *out, const char *file)
{
    htri_t ex = H5Aexists(loc, name);
    if (ex <= 0) return moe_errorf(MOE_ERR_FORMAT, "'%s': attribute '%s' is missing", file, name);
    hid_t at = H5Aopen(loc, name, H5P_DEFAULT);
    if (at < 0) return ckpt_h5_fail(MOE_ERR_FORMAT, "cannot open attribute", name, file);
    hid_t t = H5Aget_type(at), sp = H5Aget_space(at);
    int ok = t >= 0 && sp >= 0 && H5Tget_class(t) == cls && H5Sget_simple_extent_npoints(sp) == 1;
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    if (!ok) {
        H5Aclose(at);
        return moe_errorf(MOE_ERR_FORMAT, "'%s': attribute '%s' is not a scalar %s", file, name,
                          cls == H5T_STRING ? "string" : cls == H5T_FLOAT ? "float" : "integer");
    }
    *out = at;
    return MOE_OK;
}

static moe_status attr_get(hid_t loc, const char *name, H5T_class_t cls, hid_t mtype, void *v, const char *file)
{
    hid_t at = H5I_INVALID_HID;
    moe_status st = attr_open(loc, name, cls, &at, file);
    if (st != MOE_OK) return st;
    if (H5Aread(at, mtype, v) < 0) st = ckpt_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
    H5Aclose(at);
    return st;
}

moe_status ckpt_attr_get_i64(hid_t loc, const char *name, int64_t *v, const char *file)
{
    return attr_get(loc, name, H5T_INTEGER, H5T_NATIVE_INT64, v, file);
}

moe_status ckpt_attr_get_u64(hid_t loc, const char *name, uint64_t *v, const char *file)
{
    return attr_get(loc, name, H5T_INTEGER, H5T_NATIVE_UINT64, v, file);
}

moe_status ckpt_attr_get_f64(hid_t loc, const char *name, double *v, const char *file)
{
    return attr_get(loc, name, H5T_FLOAT, H5T_NATIVE_DOUBLE, v, file);
}

moe_status ckpt_attr_get_str(hid_t loc, const char *name, char **s, const char *file)
{
    hid_t at = H5I_INVALID_HID;
    *s = NULL;
    moe_status st = attr_open(loc, name, H5T_STRING, &at, file);
    if (st != MOE_OK) return st;
    hid_t ft = H5Aget_type(at), mt = H5I_INVALID_HID;
    htri_t vl = ft < 0 ? -1 : H5Tis_variable_str(ft);
    if (vl > 0) {
        char *p = NULL;
        mt = str_type();
        if (mt < 0 || H5Aread(at, mt, &p) < 0) {
            st = ckpt_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
        } else {
            *s = strdup(p ? p : "");
            hid_t sp = H5Screate(H5S_SCALAR);
            H5Dvlen_reclaim(mt, sp, H5P_DEFAULT, &p);
            H5Sclose(sp);
        }
    } else if (vl == 0) {
        /* Fixed-length strings (other writers, e.g. h5py with bytes). */
        size_t n = H5Tget_size(ft);
        mt = H5Tcopy(ft);
        *s = calloc(n + 1, 1);
        if (mt < 0 || !*s || H5Aread(at, mt, *s) < 0) {
            free(*s);
            *s = NULL;
            st = ckpt_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
        }
    } else {
        st = ckpt_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
    }
    if (st == MOE_OK && !*s) st = moe_errorf(MOE_ERR_NOMEM, "attribute '%s' of '%s'", name, file);
    if (mt >= 0) H5Tclose(mt);
    if (ft >= 0) H5Tclose(ft);
    H5Aclose(at);
    return st;
}

moe_status ckpt_attr_get_strbuf(hid_t loc, const char *name, char *buf, size_t cap, const char *file)
{
    char *s;
    moe_status st = ckpt_attr_get_str(loc, name, &s, file);
    if (st != MOE_OK) return st;
    snprintf(buf, cap, "%s", s);
    free(s);
    return MOE_OK;
}

/* ---- /model attributes ---- */

static const struct {
    const char *name;
    size_t off;
} model_ints[] = {
    {"vocab_size", offsetof(moe_train_config, vocab_size)},
    {"d_model", offsetof(moe_train_config, d_model)},
    {"n_layers", offsetof(moe_train_config, n_layers)},
    {"n_heads", offsetof(moe_train_config, n_heads)},
    {"seq_len", offsetof(moe_train_config, seq_len)},
    {"n_experts", offsetof(moe_train_config, n_experts)},
    {"top_k", offsetof(moe_train_config, top_k)},
    {"d_ff", offsetof(moe_train_config, d_ff)},
    {"moe_every", offsetof(moe_train_config, moe_every)},
    {"normalize_topk", offsetof(moe_train_config, normalize_topk)},
    {"group_seqs", offsetof(moe_train_config, group_seqs)},
};

static const struct {
    const char *name;
    size_t off;
} model_dbls[] = {
    {"capacity_factor", offsetof(moe_train_config, capacity_factor)},
    {"ln_eps", offsetof(moe_train_config, ln_eps)},
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define FIELD(cfg, off, type) (*(type *)((char *)(cfg) + (off)))

static const char *noise_str(int noise) { return noise ? "gaussian" : "none"; }

moe_status ckpt_model_put(hid_t loc, const moe_train_config *cfg, const char *file)
{
    moe_status st = MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_ints); i++)
        st = ckpt_attr_put_i64(loc, model_ints[i].name, FIELD(cfg, model_ints[i].off, const int), file);
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_dbls); i++)
        st = ckpt_attr_put_f64(loc, model_dbls[i].name, FIELD(cfg, model_dbls[i].off, const double), file);
    if (st == MOE_OK) st = ckpt_attr_put_str(loc, "router", moe_router_kind_str(cfg->router), file);
    if (st == MOE_OK) st = ckpt_attr_put_str(loc, "activation", moe_activation_str(cfg->activation), file);
    if (st == MOE_OK) st = ckpt_attr_put_str(loc, "router_noise", noise_str(cfg->router_noise), file);
    return st;
}

moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file)
{
    memset(cfg, 0, sizeof *cfg);
    moe_status st = MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_ints); i++) {
        int64_t v;
        st = ckpt_attr_get_i64(loc, model_ints[i].name, &v, file);
        if (st == MOE_OK && (v < 0 || v > INT32_MAX))
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': /model attribute %s = %lld is out of range", file,
                            model_ints[i].name, (long long)v);
        if (st == MOE_OK) FIELD(cfg, model_ints[i].off, int) = (int)v;
    }
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_dbls); i++)
        st = ckpt_attr_get_f64(loc, model_dbls[i].name, &FIELD(cfg, model_dbls[i].off, double), file);
    char s[64];
    if (st == MOE_OK) st = ckpt_attr_get_strbuf(loc, "router", s, sizeof s, file);
    if (st == MOE_OK && moe_router_kind_parse(&cfg->router, s) != MOE_OK)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model router '%s'", file, s);
    if (st == MOE_OK) st = ckpt_attr_get_strbuf(loc, "activation", s, sizeof s, file);
    if (st == MOE_OK && moe_activation_parse(&cfg->activation, s) != MOE_OK)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model activation '%s'", file, s);
    if (st == MOE_OK) st = ckpt_attr_get_strbuf(loc, "router_noise", s, sizeof s, file);
    if (st == MOE_OK) {
        if (!strcmp(s, "none") || !strcmp(s, "gaussian"))
            cfg->router_noise = !strcmp(s, "gaussian");
        else
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model router_noise '%s'", file, s);
    }
    return st;
}

moe_status ckpt_model_compare(const moe_train_config *f, const moe_train_config *c, const char *file)
{
    const char *what = "checkpoint '%s' was saved with %s = %s, the configuration has %s";
    char a[64], b[64];
    for (size_t i = 0; i < NELEM(model_ints); i++) {
        int x = FIELD(f, model_ints[i].off, const int), y = FIELD(c, model_ints[i].off, const int);
        if (x == y) continue;
        snprintf(a, sizeof a, "%d", x);
        snprintf(b, sizeof b, "%d", y);
        return moe_errorf(MOE_ERR_MISMATCH, what, file, model_ints[i].name, a, b);
    }
    for (size_t i = 0; i < NELEM(model_dbls); i++) {
        double x = FIELD(f, model_dbls[i].off, const double), y = FIELD(c, model_dbls[i].off, const double);
        if (x == y) continue;
        snprintf(a, sizeof a, "%.17g", x);
        snprintf(b, sizeof b, "%.17g", y);
        return moe_errorf(MOE_ERR_MISMATCH, what, file, model_dbls[i].name, a, b);
    }
    if (f->router != c->router)
        return moe_errorf(MOE_ERR_MISMATCH, what, file, "router", moe_router_kind_str(f->router),
                          moe_router_kind_str(c->router));
    if (f->activation != c->activation)
        return moe_errorf(MOE_ERR_MISMATCH, what, file, "activation", moe_activation_str(f->activation),
                          moe_activation_str(c->activation));
    if ((f->router_noise != 0) != (c->router_noise != 0))
        return moe_errorf(MOE_ERR_MISMATCH, what, file, "router_noise", noise_str(f->router_noise),
                          noise_str(c->router_noise));
    return MOE_OK;
}

moe_status ckpt_check_format(hid_t file, const char *want, int *grads, const char *path)
{
    char fmt[64];
    int64_t ver;
    moe_status st = ckpt_attr_get_strbuf(file, "format", fmt, sizeof fmt, path);
    if (st != MOE_OK) return st;
    int is_ckpt = !strcmp(fmt, CKPT_FORMAT), is_grads = !strcmp(fmt, CKPT_FORMAT_GRADS);
    if ((want && strcmp(fmt, want)) || (!is_ckpt && !is_grads))
        return moe_errorf(MOE_ERR_FORMAT, "'%s' has format '%s', expected '%s'", path, fmt,
                          want ? want : CKPT_FORMAT "' or '" CKPT_FORMAT_GRADS);
    if ((st = ckpt_attr_get_i64(file, "format_version", &ver, path)) != MOE_OK) return st;
    if (ver != MOE_CKPT_FORMAT_VERSION)
        return moe_errorf(MOE_ERR_FORMAT, "'%s' has format_version %lld; this build reads version %d", path,
                          (long long)ver, MOE_CKPT_FORMAT_VERSION);
    if (grads) *grads = is_grads;
    return MOE_OK;
}

/* ---- datasets ---- */

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *dims)
{
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)dims[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

static const char *dtype_str(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 ? "float32" : t == MOE_CKPT_I64 ? "int64" : "uint8";
}

moe_status ckpt_dset_open(hid_t file, const char *dset, moe_ckpt_dtype dtype, int ndim, const int64_t *dims,
                          hid_t *out, const char *path)
{
    *out = H5I_INVALID_HID;
    /* H5Lexists fails (rather than returning 0) when an intermediate group
     * is missing; both mean "not there". */
    if (H5Lexists(file, dset, H5P_DEFAULT) <= 0)
        return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is missing", path, dset);
    hid_t ds = H5Dopen2(file, dset, H5P_DEFAULT);
    if (ds < 0) return ckpt_h5_fail(MOE_ERR_FORMAT, "cannot open dataset", dset, path);
    hid_t t = H5Dget_type(ds), sp = H5Dget_space(ds);
    moe_status st = MOE_OK;
    int fnd = sp < 0 ? -1 : H5Sget_simple_extent_ndims(sp);
    hsize_t got[H5S_MAX_RANK];
    int64_t got64[H5S_MAX_RANK];
    if (t < 0 || fnd < 0 || H5Sget_simple_extent_dims(sp, got, NULL) < 0) {
        st = ckpt_h5_fail(MOE_ERR_FORMAT, "cannot query dataset", dset, path);
    } else {
        H5T_class_t cls = H5Tget_class(t);
        size_t size = H5Tget_size(t);
        int type_ok = dtype == MOE_CKPT_F32 ? (cls == H5T_FLOAT && size == 4)
                    : dtype == MOE_CKPT_I64 ? (cls == H5T_INTEGER && size == 8)
                                            : (cls == H5T_INTEGER && size == 1);
        int same = fnd == ndim;
        for (int i = 0; i < fnd; i++) {
            got64[i] = got[i] > (hsize_t)INT64_MAX ? INT64_MAX : (int64_t)got[i];
            if (i < ndim && got64[i] != dims[i]) same = 0;
        }
        if (!type_ok) {
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' is not %s", path, dset, dtype_str(dtype));
        } else if (!same) {
            char e[160], g[160];
            shape_str(e, sizeof e, ndim, dims);
            shape_str(g, sizeof g, fnd, got64);
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' has shape %s, the attributes imply %s", path,
                            dset, g, e);
        }
    }
    /* The format promises a verified checksum on every dataset: a dataset
     * without one (e.g. re-saved by another tool) is refused, not trusted. */
    if (st == MOE_OK) {
        hid_t dcpl = H5Dget_create_plist(ds);
        unsigned flags = 0;
        size_t nv = 0;
        if (dcpl < 0 || H5Pget_filter_by_id2(dcpl, H5Z_FILTER_FLETCHER32, &flags, &nv, NULL, 0, NULL, NULL) < 0)
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' carries no Fletcher32 checksum", path, dset);
        if (dcpl >= 0) H5Pclose(dcpl);
    }
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    if (st == MOE_OK)
        *out = ds;
    else
        H5Dclose(ds);
    return st;
}

uint64_t ckpt_fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
