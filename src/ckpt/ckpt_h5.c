/* HDF5 helpers of the checkpoint module: the spec's /model attributes,
 * format checks and dataset shape checks (see ckpt_h5.h); error handling
 * and typed attributes come from io/h5.h. */
#include "ckpt/ckpt_h5.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
        st = moe_h5_attr_put_i64(loc, model_ints[i].name, FIELD(cfg, model_ints[i].off, const int), file);
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_dbls); i++)
        st = moe_h5_attr_put_f64(loc, model_dbls[i].name, FIELD(cfg, model_dbls[i].off, const double), file);
    if (st == MOE_OK) st = moe_h5_attr_put_str(loc, "router", moe_router_kind_str(cfg->router), file);
    if (st == MOE_OK) st = moe_h5_attr_put_str(loc, "activation", moe_activation_str(cfg->activation), file);
    if (st == MOE_OK) st = moe_h5_attr_put_str(loc, "router_noise", noise_str(cfg->router_noise), file);
    return st;
}

moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file)
{
    memset(cfg, 0, sizeof *cfg);
    moe_status st = MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_ints); i++) {
        int64_t v;
        st = moe_h5_attr_get_i64(loc, model_ints[i].name, &v, file);
        if (st == MOE_OK && (v < 0 || v > INT32_MAX))
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': /model attribute %s = %lld is out of range", file,
                            model_ints[i].name, (long long)v);
        if (st == MOE_OK) FIELD(cfg, model_ints[i].off, int) = (int)v;
    }
    for (size_t i = 0; st == MOE_OK && i < NELEM(model_dbls); i++)
        st = moe_h5_attr_get_f64(loc, model_dbls[i].name, &FIELD(cfg, model_dbls[i].off, double), file);
    char s[64];
    if (st == MOE_OK) st = moe_h5_attr_get_strbuf(loc, "router", s, sizeof s, file);
    if (st == MOE_OK && moe_router_kind_parse(&cfg->router, s) != MOE_OK)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model router '%s'", file, s);
    if (st == MOE_OK) st = moe_h5_attr_get_strbuf(loc, "activation", s, sizeof s, file);
    if (st == MOE_OK && moe_activation_parse(&cfg->activation, s) != MOE_OK)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model activation '%s'", file, s);
    if (st == MOE_OK) st = moe_h5_attr_get_strbuf(loc, "router_noise", s, sizeof s, file);
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
    moe_status st = moe_h5_attr_get_strbuf(file, "format", fmt, sizeof fmt, path);
    if (st != MOE_OK) return st;
    int is_ckpt = !strcmp(fmt, CKPT_FORMAT), is_grads = !strcmp(fmt, CKPT_FORMAT_GRADS);
    if ((want && strcmp(fmt, want)) || (!is_ckpt && !is_grads))
        return moe_errorf(MOE_ERR_FORMAT, "'%s' has format '%s', expected '%s'", path, fmt,
                          want ? want : CKPT_FORMAT "' or '" CKPT_FORMAT_GRADS);
    if ((st = moe_h5_attr_get_i64(file, "format_version", &ver, path)) != MOE_OK) return st;
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
    if (ds < 0) return moe_h5_fail(MOE_ERR_FORMAT, "cannot open dataset", dset, path);
    hid_t t = H5Dget_type(ds), sp = H5Dget_space(ds);
    moe_status st = MOE_OK;
    int fnd = sp < 0 ? -1 : H5Sget_simple_extent_ndims(sp);
    hsize_t got[H5S_MAX_RANK];
    int64_t got64[H5S_MAX_RANK];
    if (t < 0 || fnd < 0 || H5Sget_simple_extent_dims(sp, got, NULL) < 0) {
        st = moe_h5_fail(MOE_ERR_FORMAT, "cannot query dataset", dset, path);
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
