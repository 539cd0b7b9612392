/* HDF5 helpers of the checkpoint module: the /model attributes,
 * format checks and dataset shape checks (see ckpt_h5.h); error handling
 * and typed attributes come from io/h5.h. */
#include "ckpt/ckpt_h5.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- /model attributes ---- */

/* The attributes are the configuration's [model] keys, in the key table's
 * order and types (config.h, moe_train_config_model_attrs): no list here.
 * A format 2 key is written only where it applies; its absence means its
 * default (so format 1 files, and files of models that use none of the
 * additions, read as before). */

moe_status ckpt_model_put(hid_t loc, const moe_train_config *cfg, const char *file)
{
    moe_model_attr a[MOE_MODEL_ATTRS_MAX];
    const int n = moe_train_config_model_attrs(cfg, a, MOE_MODEL_ATTRS_MAX);
    moe_status st = MOE_OK;
    for (int i = 0; st == MOE_OK && i < n; i++) {
        if (!a[i].present) continue;
        if (a[i].type == MOE_ATTR_INT) st = moe_h5_attr_put_i64(loc, a[i].name, a[i].i, file);
        else if (a[i].type == MOE_ATTR_REAL) st = moe_h5_attr_put_f64(loc, a[i].name, a[i].r, file);
        else st = moe_h5_attr_put_str(loc, a[i].name, a[i].text, file);
    }
    return st;
}

moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file)
{
    /* every key starts at its default (a derived default as its sentinel) */
    moe_train_config_default(cfg);
    moe_model_attr a[MOE_MODEL_ATTRS_MAX];
    const int n = moe_train_config_model_attrs(cfg, a, MOE_MODEL_ATTRS_MAX); /* names and types */
    moe_status st = MOE_OK;
    char s[64];
    for (int i = 0; st == MOE_OK && i < n; i++) {
        /* a format 2 key may be absent (a format 1 file, or a key that does
         * not apply): it keeps its default */
        if (a[i].version2 && H5Aexists(loc, a[i].name) <= 0) continue;
        if (a[i].type == MOE_ATTR_INT) {
            st = moe_h5_attr_get_i64(loc, a[i].name, &a[i].i, file);
            if (st == MOE_OK && (a[i].i < 0 || a[i].i > INT32_MAX))
                st = moe_errorf(MOE_ERR_FORMAT, "'%s': /model attribute %s = %lld is out of range", file, a[i].name,
                                (long long)a[i].i);
        } else if (a[i].type == MOE_ATTR_REAL) {
            st = moe_h5_attr_get_f64(loc, a[i].name, &a[i].r, file);
        } else {
            st = moe_h5_attr_get_strbuf(loc, a[i].name, s, sizeof s, file);
            a[i].text = s;
        }
        if (st == MOE_OK && moe_train_config_set_model_attr(cfg, &a[i]) != MOE_OK)
            st = moe_errorf(MOE_ERR_FORMAT, "'%s': unknown /model %s '%s'", file, a[i].name, s);
    }
    return st;
}

moe_status ckpt_model_compare(const moe_train_config *f, const moe_train_config *c, const char *file)
{
    const char *what = "checkpoint '%s' was saved with %s = %s, the configuration has %s";
    moe_model_attr x[MOE_MODEL_ATTRS_MAX], y[MOE_MODEL_ATTRS_MAX];
    const int n = moe_train_config_model_attrs(f, x, MOE_MODEL_ATTRS_MAX);
    moe_train_config_model_attrs(c, y, MOE_MODEL_ATTRS_MAX);
    char a[64], b[64];
    for (int i = 0; i < n; i++) {
        if (!x[i].present && !y[i].present) continue; /* applies to neither model */
        if (x[i].type == MOE_ATTR_INT) {
            if (x[i].i == y[i].i) continue;
            snprintf(a, sizeof a, "%lld", (long long)x[i].i);
            snprintf(b, sizeof b, "%lld", (long long)y[i].i);
        } else if (x[i].type == MOE_ATTR_REAL) {
            if (x[i].r == y[i].r) continue;
            snprintf(a, sizeof a, "%.17g", x[i].r);
            snprintf(b, sizeof b, "%.17g", y[i].r);
        } else {
            if (!strcmp(x[i].text, y[i].text)) continue;
            snprintf(a, sizeof a, "%s", x[i].text);
            snprintf(b, sizeof b, "%s", y[i].text);
        }
        return moe_errorf(MOE_ERR_MISMATCH, what, file, x[i].name, a, b);
    }
    return MOE_OK;
}

int ckpt_format_version(const moe_train_config *cfg) { return moe_train_config_needs_v2(cfg) ? 2 : 1; }

hid_t ckpt_file_type(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 ? H5T_IEEE_F32LE : t == MOE_CKPT_I64 ? H5T_STD_I64LE
         : t == MOE_CKPT_I32 ? H5T_STD_I32LE : H5T_STD_U8LE;
}

hid_t ckpt_mem_type(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 ? H5T_NATIVE_FLOAT : t == MOE_CKPT_I64 ? H5T_NATIVE_INT64
         : t == MOE_CKPT_I32 ? H5T_NATIVE_INT32 : H5T_NATIVE_UINT8;
}

size_t ckpt_dtype_size(moe_ckpt_dtype t)
{
    return t == MOE_CKPT_F32 || t == MOE_CKPT_I32 ? 4 : t == MOE_CKPT_I64 ? 8 : 1;
}

moe_status ckpt_check_format(hid_t file, const char *want, int *grads, int64_t *version, const char *path)
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
    if (ver < MOE_CKPT_FORMAT_VERSION_MIN || ver > MOE_CKPT_FORMAT_VERSION)
        return moe_errorf(MOE_ERR_FORMAT, "'%s' has format_version %lld; this build reads versions %d to %d", path,
                          (long long)ver, MOE_CKPT_FORMAT_VERSION_MIN, MOE_CKPT_FORMAT_VERSION);
    if (grads) *grads = is_grads;
    if (version) *version = ver;
    /* the strings (config, enum names) have a checksum of their own */
    return moe_h5_check_strings(file, path);
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
    return t == MOE_CKPT_F32 ? "float32" : t == MOE_CKPT_I64 ? "int64" : t == MOE_CKPT_I32 ? "int32" : t == MOE_CKPT_U8 ? "uint8" : "a fixed-length string";
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
                    : dtype == MOE_CKPT_U8  ? (cls == H5T_INTEGER && size == 1)
                    : dtype == MOE_CKPT_I32 ? (cls == H5T_INTEGER && size == 4)
                                            : (cls == H5T_STRING && H5Tis_variable_str(t) == 0);
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

/* ---- values ---- */

moe_status ckpt_check_scalars(const moe_ckpt_state *s, const char *path)
{
    const struct {
        const char *name;
        int64_t v, lo, hi;
    } ints[] = {{"/train step", s->step, 0, INT_MAX},
                {"/train tokens_seen", s->tokens_seen, 0, INT64_MAX},
                {"/optimizer step", s->opt_step, 0, s->step}};
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
        if (ints[k].v < ints[k].lo || ints[k].v > ints[k].hi)
            return moe_errorf(MOE_ERR_FORMAT, "'%s': %s = %lld is outside [%lld, %lld]%s", path, ints[k].name,
                              (long long)ints[k].v, (long long)ints[k].lo, (long long)ints[k].hi,
                              k == 2 ? " (no more updates than steps)" : "");
    for (int k = 0; k < s->n_extra; k++)
        if (s->extra[k].value < 0)
            return moe_errorf(MOE_ERR_FORMAT, "'%s': /train %s = %lld is negative", path, s->extra[k].name,
                              (long long)s->extra[k].value);
    const struct {
        const char *name;
        double v, lo, hi;
        int hi_open, lo_open;
    } reals[] = {{"lr", s->lr, 0, HUGE_VAL, 0, 0},     {"weight_decay", s->weight_decay, 0, HUGE_VAL, 0, 0},
                 {"beta1", s->beta1, 0, 1, 1, 0},       {"beta2", s->beta2, 0, 1, 1, 0},
                 {"eps", s->eps, 0, HUGE_VAL, 0, 1}};
    for (size_t k = 0; k < sizeof reals / sizeof reals[0]; k++) {
        const double v = reals[k].v;
        const int ok = isfinite(v) && (reals[k].lo_open ? v > reals[k].lo : v >= reals[k].lo) &&
                       (reals[k].hi_open ? v < reals[k].hi : v <= reals[k].hi);
        if (!ok)
            return moe_errorf(MOE_ERR_FORMAT, "'%s': /optimizer %s = %g is outside %c%g, %g%c", path, reals[k].name, v,
                              reals[k].lo_open ? '(' : '[', reals[k].lo, reals[k].hi, reals[k].hi_open ? ')' : ']');
    }
    return MOE_OK;
}

int ckpt_value_rule(const char *dset, int64_t opt_step, double *lo, double *hi, int *integer)
{
    *integer = 0;
    *lo = -HUGE_VAL;
    *hi = HUGE_VAL;
    if (!strncmp(dset, "/optimizer/expert_step/", 23)) {
        *integer = 1, *lo = 0, *hi = (double)opt_step;
    } else if (!strncmp(dset, "/stats/", 7)) {
        *integer = 1, *lo = 0;
    } else if (!strncmp(dset, "/grad/", 6) && strstr(dset, "/activated")) {
        *integer = 1, *lo = 0, *hi = 1;
    } else if (!strncmp(dset, "/optimizer/v/", 13)) {
        *lo = 0; /* a second moment */
    } else if (strncmp(dset, "/model/", 7) && strncmp(dset, "/optimizer/m/", 13) && strncmp(dset, "/grad/", 6)) {
        return 0;
    }
    return 1;
}

moe_status ckpt_check_values(const char *path, const char *dset, int64_t opt_step, const float *f,
                             const int64_t *i, const double *d, size_t n, int64_t first)
{
    double lo, hi;
    int integer;
    if (!ckpt_value_rule(dset, opt_step, &lo, &hi, &integer)) return MOE_OK;
    for (size_t k = 0; k < n; k++) {
        const double v = f ? (double)f[k] : i ? (double)i[k] : d[k];
        if (!isfinite(v))
            return moe_errorf(MOE_ERR_NONFINITE, "'%s': dataset '%s' holds %g at element %lld (a checkpoint holds "
                                                 "finite values only)", path, dset, v, (long long)(first + (int64_t)k));
        if (v < lo || v > hi || (integer && v != floor(v)))
            return moe_errorf(MOE_ERR_FORMAT, "'%s': dataset '%s' holds %.17g at element %lld, outside [%.17g, %.17g]%s",
                              path, dset, v, (long long)(first + (int64_t)k), lo, hi,
                              !strncmp(dset, "/optimizer/expert_step/", 23) ? " (an expert's updates, at most the "
                                                                             "optimizer's step)" : "");
    }
    return MOE_OK;
}

moe_status ckpt_check_path(const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0 || access(path, R_OK) != 0)
        return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return moe_errorf(MOE_ERR_IO, "'%s' is not a regular file", path);
    return MOE_OK;
}

moe_status ckpt_check_file(const char *path)
{
    const moe_status st = ckpt_check_path(path);
    return st != MOE_OK ? st : moe_h5_check_global_heaps(path);
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
