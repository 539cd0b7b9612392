/* HDF5 error silencing, error messages and scalar attributes (h5.h). */
#include "io/h5.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm_h5.h"

enum { H5MSG = 384 }; /* room for HDF5's innermost error message */

void moe_h5_quiet_begin(moe_h5_quiet *q)
{
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void moe_h5_quiet_end(const moe_h5_quiet *q) { H5Eset_auto2(H5E_DEFAULT, q->func, q->data); }

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

moe_status moe_h5_fail(moe_status s, const char *what, const char *name, const char *file)
{
    h5_err r = {{0}, 0};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk_error, &r);
    if (r.checksum) s = MOE_ERR_CHECKSUM;
    const char *cs = r.checksum ? " (checksum mismatch)" : "", *sep = *r.msg ? ": " : "";
    if (!name) return moe_errorf(s, "%s%s '%s'%s%s", what, cs, file, sep, r.msg);
    return moe_errorf(s, "%s%s '%s' in '%s'%s%s", what, cs, name, file, sep, r.msg);
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
    return rc < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot write attribute", name, file) : MOE_OK;
}

moe_status moe_h5_attr_put_i64(hid_t loc, const char *name, int64_t v, const char *file)
{
    return attr_put(loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, file);
}

moe_status moe_h5_attr_put_u64(hid_t loc, const char *name, uint64_t v, const char *file)
{
    return attr_put(loc, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &v, file);
}

moe_status moe_h5_attr_put_f64(hid_t loc, const char *name, double v, const char *file)
{
    return attr_put(loc, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, file);
}

moe_status moe_h5_attr_put_str(hid_t loc, const char *name, const char *s, const char *file)
{
    hid_t t = str_type();
    if (t < 0) return moe_h5_fail(MOE_ERR_IO, "cannot make a string type for", name, file);
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
    if (at < 0) return moe_h5_fail(MOE_ERR_FORMAT, "cannot open attribute", name, file);
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
    if (H5Aread(at, mtype, v) < 0) st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
    H5Aclose(at);
    return st;
}

moe_status moe_h5_attr_get_i64(hid_t loc, const char *name, int64_t *v, const char *file)
{
    return attr_get(loc, name, H5T_INTEGER, H5T_NATIVE_INT64, v, file);
}

moe_status moe_h5_attr_get_u64(hid_t loc, const char *name, uint64_t *v, const char *file)
{
    return attr_get(loc, name, H5T_INTEGER, H5T_NATIVE_UINT64, v, file);
}

moe_status moe_h5_attr_get_f64(hid_t loc, const char *name, double *v, const char *file)
{
    return attr_get(loc, name, H5T_FLOAT, H5T_NATIVE_DOUBLE, v, file);
}

moe_status moe_h5_attr_get_str(hid_t loc, const char *name, char **s, const char *file)
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
            st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
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
            st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
        }
    } else {
        st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read attribute", name, file);
    }
    if (st == MOE_OK && !*s) st = moe_errorf(MOE_ERR_NOMEM, "attribute '%s' of '%s'", name, file);
    if (mt >= 0) H5Tclose(mt);
    if (ft >= 0) H5Tclose(ft);
    H5Aclose(at);
    return st;
}

moe_status moe_h5_attr_get_strbuf(hid_t loc, const char *name, char *buf, size_t cap, const char *file)
{
    char *s;
    moe_status st = moe_h5_attr_get_str(loc, name, &s, file);
    if (st != MOE_OK) return st;
    snprintf(buf, cap, "%s", s);
    free(s);
    return MOE_OK;
}


/* ---- the atomic writer ---- */

/* fsync a file or directory so that a rename survives a crash. */
static moe_status sync_path(const char *p, int dir)
{
    int fd = open(p, dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open '%s' to sync it: %s", p, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    return rc ? moe_errorf(MOE_ERR_IO, "cannot sync '%s': %s", p, strerror(errno)) : MOE_OK;
}

static void dir_of(char *buf, size_t cap, const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(buf, cap, ".");
    else if (slash == path)
        snprintf(buf, cap, "/");
    else
        snprintf(buf, cap, "%.*s", (int)(slash - path), path);
}

/* Creates tmp, fills it, flushes and closes. Collective. */
static moe_status write_tmp_phase(const char *tmp, moe_comm *c, moe_h5_write_fn fill, void *ctx)
{
    hid_t fapl = moe_comm_h5_fapl(c), file = H5I_INVALID_HID;
    if (fapl >= 0) file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    moe_status st = file < 0 ? moe_h5_fail(MOE_ERR_IO, "cannot create", NULL, tmp) : MOE_OK;
    if (fapl >= 0) H5Pclose(fapl);
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st != MOE_OK) {
        if (file >= 0) H5Fclose(file);
        return st;
    }
    hid_t dxpl = moe_comm_h5_dxpl(c), lcpl = H5Pcreate(H5P_LINK_CREATE);
    if (dxpl < 0 || lcpl < 0 || H5Pset_create_intermediate_group(lcpl, 1) < 0)
        st = moe_h5_fail(MOE_ERR_IO, "cannot make property lists for", NULL, tmp);
    if (st == MOE_OK) st = fill(ctx, file, dxpl, lcpl, tmp);
    if (st == MOE_OK && H5Fflush(file, H5F_SCOPE_GLOBAL) < 0) st = moe_h5_fail(MOE_ERR_IO, "cannot flush", NULL, tmp);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (dxpl >= 0) H5Pclose(dxpl);
    if (H5Fclose(file) < 0 && st == MOE_OK) st = moe_h5_fail(MOE_ERR_IO, "cannot close", NULL, tmp);
    return st;
}

/* write_tmp_phase as one watchdog phase (comm_timeout), whose clock
 * restarts with every dataset the fill writes (their own phases) and every
 * agreement. */
static moe_status write_tmp(const char *tmp, moe_comm *c, moe_h5_write_fn fill, void *ctx)
{
    static char what[MOE_H5_PATH_MAX + 64]; /* read by the watchdog while the phase is open */
    snprintf(what, sizeof what, "parallel HDF5 write of '%s'", tmp);
    moe_comm_phase_begin(c, MOE_SCOPE_WORLD, what);
    const moe_status st = write_tmp_phase(tmp, c, fill, ctx);
    moe_comm_phase_end();
    return st;
}

moe_status moe_h5_write_atomic(const char *path, const char *tmp_suffix, moe_comm *c, moe_h5_write_fn fill,
                               void *ctx)
{
    char tmp[MOE_H5_PATH_MAX], dir[MOE_H5_PATH_MAX];
    moe_status st = MOE_OK;
    if (!path || !*path || !tmp_suffix || !*tmp_suffix)
        st = moe_errorf(MOE_ERR_ARG, "HDF5 write: empty path or temporary suffix");
    else if (snprintf(tmp, sizeof tmp, "%s%s", path, tmp_suffix) >= (int)sizeof tmp)
        st = moe_errorf(MOE_ERR_ARG, "path too long (with its temporary suffix '%s', over %d bytes): '%.64s...'",
                        tmp_suffix, MOE_H5_PATH_MAX - 1, path);
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st != MOE_OK) return st;

    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    st = write_tmp(tmp, c, fill, ctx);
    moe_h5_quiet_end(&q);

    /* Every rank has closed before rank 0 renames (agreement synchronises). */
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (moe_comm_rank(c) == 0) {
        if (st == MOE_OK) st = sync_path(tmp, 0);
        if (st == MOE_OK && rename(tmp, path) != 0)
            st = moe_errorf(MOE_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
        if (st == MOE_OK) {
            dir_of(dir, sizeof dir, path);
            st = sync_path(dir, 1);
        }
        if (st != MOE_OK) remove(tmp);
    }
    return moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
}
