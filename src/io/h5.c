/* HDF5 error silencing, error messages and scalar attributes, and the one
 * atomic file writer (h5.h). */
#define _GNU_SOURCE /* fallocate */
#include "io/h5.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
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
    if (n == 0 && e->desc) {
        /* A file driver's message carries the system's reason among
         * details ("file write failed: time = ..., errno = 28, error
         * message = 'No space left on device', buf = ..."): keep the
         * what and the reason. */
        const char *why = strstr(e->desc, "error message = '"), *cut = strstr(e->desc, ": time =");
        if (why) {
            why += strlen("error message = '");
            const char *q = strchr(why, '\'');
            snprintf(r->msg, sizeof r->msg, "%.*s: %.*s", cut ? (int)(cut - e->desc) : 64, e->desc,
                     q ? (int)(q - why) : 128, why);
        } else {
            snprintf(r->msg, sizeof r->msg, "%s", e->desc);
        }
    }
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


/* ---- the checksum of the string attributes ---- */

/* Variable-length strings live in global heap collections, the one part of
 * an HDF5 1.10 file without a checksum. Their hash (FNV-1a 64 over object
 * path, attribute name and value of every string attribute, objects and
 * attributes by name) is stored in the root's integer attribute
 * MOE_H5_STRING_CHECKSUM, inside the checksummed root object header. */
typedef struct {
    uint64_t h;
    const char *obj, *file;
    moe_status st;
} strings_ctx;

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static herr_t hash_attr(hid_t loc, const char *name, const H5A_info_t *ai, void *op)
{
    (void)ai;
    strings_ctx *x = op;
    hid_t at = H5Aopen(loc, name, H5P_DEFAULT), t = at < 0 ? H5I_INVALID_HID : H5Aget_type(at);
    const int is_str = t >= 0 && H5Tget_class(t) == H5T_STRING;
    if (t >= 0) H5Tclose(t);
    if (at >= 0) H5Aclose(at);
    if (at < 0) {
        x->st = moe_h5_fail(MOE_ERR_FORMAT, "cannot open attribute", name, x->file);
        return -1;
    }
    if (!is_str) return 0;
    char *v = NULL;
    if ((x->st = moe_h5_attr_get_str(loc, name, &v, x->file)) != MOE_OK) return -1;
    x->h = fnv1a(x->h, x->obj, strlen(x->obj) + 1);
    x->h = fnv1a(x->h, name, strlen(name) + 1);
    x->h = fnv1a(x->h, v, strlen(v) + 1);
    free(v);
    return 0;
}

static herr_t hash_object(hid_t root, const char *name, const H5O_info_t *info, void *op)
{
    strings_ctx *x = op;
    if (info->num_attrs == 0) return 0;
    x->obj = name;
    hid_t o = H5Oopen(root, name, H5P_DEFAULT);
    if (o < 0) {
        x->st = moe_h5_fail(MOE_ERR_FORMAT, "cannot open object", name, x->file);
        return -1;
    }
    herr_t rc = H5Aiterate2(o, H5_INDEX_NAME, H5_ITER_INC, NULL, hash_attr, x);
    H5Oclose(o);
    if (rc < 0 && x->st == MOE_OK) x->st = moe_h5_fail(MOE_ERR_FORMAT, "cannot list the attributes of", name, x->file);
    return rc < 0 ? -1 : 0;
}

static moe_status strings_hash(hid_t file, uint64_t *h, const char *path)
{
    strings_ctx x = {0xcbf29ce484222325ull, "", path, MOE_OK};
    if (H5Ovisit2(file, H5_INDEX_NAME, H5_ITER_INC, hash_object, &x, H5O_INFO_NUM_ATTRS) < 0 && x.st == MOE_OK)
        x.st = moe_h5_fail(MOE_ERR_FORMAT, "cannot list the objects of", NULL, path);
    *h = x.h;
    return x.st;
}

moe_status moe_h5_check_strings(hid_t file, const char *path)
{
    if (H5Aexists(file, MOE_H5_STRING_CHECKSUM) <= 0) return MOE_OK; /* written before there was one */
    uint64_t want, got;
    moe_status st = moe_h5_attr_get_u64(file, MOE_H5_STRING_CHECKSUM, &want, path);
    if (st == MOE_OK) st = strings_hash(file, &got, path);
    if (st == MOE_OK && got != want)
        st = moe_errorf(MOE_ERR_CHECKSUM, "'%s' is damaged: its string attributes (format, config, ...) do not match "
                                          "their checksum", path);
    return st;
}

/* ---- global heap collections ---- */

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* The collection at offset g (its signature there) of the file fd of
 * `size` bytes, walked as HDF5 reads it: objects of index != 0 (16-byte
 * header, data rounded up to 8) end inside it, and a free-space object
 * (index 0, its size counting its header) holds at least its header and
 * ends inside it; HDF5 steps over free space by its size, so a size of 0
 * would have it read the same 16 bytes for ever. */
static moe_status check_collection(int fd, const char *path, uint64_t g, uint64_t size)
{
    unsigned char h[16];
    if (pread(fd, h, 16, (off_t)g) != 16) return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    const uint64_t n = le64(h + 8);
    if (n < 16 || n > size - g || n > (1ull << 30))
        return moe_errorf(MOE_ERR_CHECKSUM, "'%s' is damaged: the global heap (string attributes) at offset %llu "
                                            "declares %llu bytes", path, (unsigned long long)g, (unsigned long long)n);
    unsigned char *c = malloc(n);
    if (!c) return moe_errorf(MOE_ERR_NOMEM, "global heap of '%s' (%llu bytes)", path, (unsigned long long)n);
    moe_status st = pread(fd, c, n, (off_t)g) == (ssize_t)n ? MOE_OK
                    : moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    uint64_t pos = 16;
    while (st == MOE_OK && pos + 16 <= n) {
        const unsigned idx = (unsigned)c[pos] | (unsigned)c[pos + 1] << 8;
        const uint64_t len = le64(c + pos + 8);
        if (idx == 0) { /* free space: its size counts its header */
            if (len < 16 || len > n - pos) {
                st = MOE_ERR_CHECKSUM;
                break;
            }
            pos += len;
            continue;
        }
        if (len > n - pos - 16 || ((len + 7) & ~7ull) > n - pos - 16) {
            st = MOE_ERR_CHECKSUM;
            break;
        }
        pos += 16 + ((len + 7) & ~7ull);
    }
    free(c);
    if (st == MOE_ERR_CHECKSUM)
        return moe_errorf(MOE_ERR_CHECKSUM, "'%s' is damaged: an object of the global heap (string attributes) at "
                                            "offset %llu runs past its end or is smaller than its header", path,
                          (unsigned long long)(g + pos));
    return st;
}

moe_status moe_h5_check_global_heaps(const char *path)
{
    static const unsigned char sig[8] = {'G', 'C', 'O', 'L', 1, 0, 0, 0};
    enum { BLOCK = 4 << 20 };
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    unsigned char *buf = malloc(BLOCK + sizeof sig);
    moe_status st = fstat(fd, &sb) != 0 ? moe_errorf(MOE_ERR_IO, "cannot stat '%s': %s", path, strerror(errno))
                    : !buf             ? moe_errorf(MOE_ERR_NOMEM, "reading '%s'", path)
                                       : MOE_OK;
    const uint64_t size = st == MOE_OK ? (uint64_t)sb.st_size : 0;
    /* blocks overlap by the signature's length less one, so that no
     * signature is split */
    for (uint64_t off = 0; st == MOE_OK && off < size; off += BLOCK) {
        const size_t want = (size_t)(size - off < BLOCK + sizeof sig - 1 ? size - off : BLOCK + sizeof sig - 1);
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got != (ssize_t)want) {
            st = moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, got < 0 ? strerror(errno) : "short read");
            break;
        }
        for (size_t i = 0; st == MOE_OK && i + sizeof sig <= want; i++) {
            const unsigned char *p = memchr(buf + i, 'G', want - i - sizeof sig + 1);
            if (!p) break;
            i = (size_t)(p - buf);
            if (!memcmp(p, sig, sizeof sig) && i < BLOCK) st = check_collection(fd, path, off + i, size);
        }
    }
    free(buf);
    close(fd);
    return st;
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

/* Room for a file of about `bytes` in dir (this rank's view: node-local
 * scratch differs between ranks). HDF5's own structures and the chunk
 * checksums add a little: 2% and 1 MB of margin. Not collective. */
static moe_status check_space(const char *dir, const char *path, uint64_t bytes)
{
    struct statvfs sv;
    if (bytes == 0 || statvfs(dir, &sv) != 0) return MOE_OK; /* unknown: the write itself will tell */
    const uint64_t avail = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
    const uint64_t need = bytes + bytes / 50 + (1u << 20);
    if (avail >= need) return MOE_OK;
    return moe_errorf(MOE_ERR_IO, "not enough space for '%s': it needs about %.1f MB, '%s' has %.1f MB free", path,
                      (double)need / (1 << 20), dir, (double)avail / (1 << 20));
}

/* Reserves room for the file being written (this rank's view of it):
 * blocks past its end (FALLOC_FL_KEEP_SIZE), so that a disk filling up
 * while the file is written cannot fail a write half way, where ranks of
 * a parallel write would fail in different places inside HDF5's
 * collective calls and wait for each other for ever. A file system
 * without fallocate gets no reservation (then only the free-space check
 * protects the write). Not collective. */
static moe_status reserve(const char *tmp, uint64_t bytes)
{
    if (bytes == 0) return MOE_OK;
    const uint64_t want = bytes + bytes / 50 + (1u << 20);
    int fd = open(tmp, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open '%s' to reserve its space: %s", tmp, strerror(errno));
    int rc = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)want);
    const int err = errno;
    close(fd);
    if (rc == 0 || err == EOPNOTSUPP || err == ENOSYS || err == EINTR) return MOE_OK;
    return moe_errorf(MOE_ERR_IO, "cannot reserve %.1f MB for '%s': %s", (double)want / (1 << 20), tmp, strerror(err));
}

/* Gives back the reserved blocks the file did not use (those past its end). */
static void trim(const char *tmp)
{
    struct stat sb;
    if (stat(tmp, &sb) == 0 && truncate(tmp, sb.st_size) != 0) {}
}

/* Creates tmp (on every rank, or on the writers of w only), reserves its
 * space, fills it, flushes and closes. Collective over c's world: every
 * HDF5 call a writer makes alone is followed by an agreement, so that all
 * ranks stop at the same point. */
static moe_status write_tmp_phase(const char *tmp, moe_comm *c, moe_comm_h5_writers *w, uint64_t bytes,
                                  moe_h5_write_fn fill, void *ctx)
{
    const int writes = !w || moe_comm_h5_is_writer(w);
    hid_t fapl = H5I_INVALID_HID, file = H5I_INVALID_HID;
    moe_status st = MOE_OK;
    if (writes) {
        fapl = w ? moe_comm_h5_writers_fapl(w) : moe_comm_h5_fapl(c);
        /* The 1.10 format: checksums on all metadata (see h5.h). Readers of
         * HDF5 1.10 and later (h5py, h5dump, PyTorch's h5py) read it. */
        if (fapl >= 0 && H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110) < 0) {
            H5Pclose(fapl);
            fapl = H5I_INVALID_HID;
        }
        if (fapl >= 0) file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
        if (file < 0) st = moe_h5_fail(MOE_ERR_IO, "cannot create", NULL, tmp);
        if (fapl >= 0) H5Pclose(fapl);
    }
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st == MOE_OK) st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, writes ? reserve(tmp, bytes) : MOE_OK);
    if (st != MOE_OK) {
        if (file >= 0) H5Fclose(file);
        return st;
    }
    hid_t dxpl = H5I_INVALID_HID, lcpl = H5I_INVALID_HID;
    if (writes) {
        dxpl = w ? moe_comm_h5_writers_dxpl(w) : moe_comm_h5_dxpl(c);
        lcpl = H5Pcreate(H5P_LINK_CREATE);
        if (dxpl < 0 || lcpl < 0 || H5Pset_create_intermediate_group(lcpl, 1) < 0)
            st = moe_h5_fail(MOE_ERR_IO, "cannot make property lists for", NULL, tmp);
    }
    /* With node writers every rank enters fill (it sends its rows) or none
     * does. */
    if (w) st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st == MOE_OK) st = fill(ctx, file, dxpl, lcpl, tmp);
    /* Flush and close are collective among the ranks that hold the file:
     * each makes them, on the agreed status. So is the checksum attribute:
     * every writer computes the same hash from the same metadata. */
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    uint64_t h;
    if (st == MOE_OK && writes) st = strings_hash(file, &h, tmp);
    if (st == MOE_OK && writes) st = moe_h5_attr_put_u64(file, MOE_H5_STRING_CHECKSUM, h, tmp);
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st == MOE_OK && writes && H5Fflush(file, H5F_SCOPE_GLOBAL) < 0)
        st = moe_h5_fail(MOE_ERR_IO, "cannot flush", NULL, tmp);
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (dxpl >= 0) H5Pclose(dxpl);
    if (!writes) return st;
    /* A file whose metadata cannot be flushed (a full disk) cannot be
     * closed either, and HDF5 then crashes when it tries again at exit.
     * The temporary file is lost anyway: emptying it frees its space, so
     * that the close can write what it must. */
    if (st != MOE_OK && truncate(tmp, 0) != 0) {}
    if (H5Fclose(file) < 0 && st == MOE_OK) st = moe_h5_fail(MOE_ERR_IO, "cannot close", NULL, tmp);
    if (st == MOE_OK) trim(tmp);
    return st;
}

/* write_tmp_phase as one watchdog phase (comm_timeout), whose clock
 * restarts with every dataset the fill writes (their own phases) and every
 * agreement. */
static moe_status write_tmp(const char *tmp, moe_comm *c, moe_comm_h5_writers *w, uint64_t bytes,
                            moe_h5_write_fn fill, void *ctx)
{
    static char what[MOE_H5_PATH_MAX + 64]; /* read by the watchdog while the phase is open */
    snprintf(what, sizeof what, "parallel HDF5 write of '%s'", tmp);
    moe_comm_phase_begin(c, MOE_SCOPE_WORLD, what);
    const moe_status st = write_tmp_phase(tmp, c, w, bytes, fill, ctx);
    moe_comm_phase_end();
    return st;
}

moe_status moe_h5_write_atomic(const char *path, const char *tmp_suffix, moe_comm *c, moe_comm_h5_writers *w,
                               uint64_t bytes, moe_h5_write_fn fill, void *ctx)
{
    char tmp[MOE_H5_PATH_MAX], dir[MOE_H5_PATH_MAX];
    moe_status st = MOE_OK;
    if (!path || !*path || !tmp_suffix || !*tmp_suffix)
        st = moe_errorf(MOE_ERR_ARG, "HDF5 write: empty path or temporary suffix");
    else if (snprintf(tmp, sizeof tmp, "%s%s", path, tmp_suffix) >= (int)sizeof tmp)
        st = moe_errorf(MOE_ERR_ARG, "path too long (with its temporary suffix '%s', over %d bytes): '%.64s...'",
                        tmp_suffix, MOE_H5_PATH_MAX - 1, path);
    /* A test hook (MOE_FAULT=h5_space): neither check nor reserve the
     * space, so that a full disk fails the write half way. */
    if (moe_fault("h5_space", moe_comm_rank(c))) bytes = 0;
    if (st == MOE_OK) {
        dir_of(dir, sizeof dir, path);
        st = check_space(dir, path, bytes);
    }
    st = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, st);
    if (st != MOE_OK) return st;

    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    st = write_tmp(tmp, c, w, bytes, fill, ctx);
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
