/* HDF5 helpers shared by the checkpoint (src/ckpt) and the layer dump
 * (dump.c): the one atomic file writer, quiet error handling with HDF5's
 * innermost message in the error detail, and typed scalar attributes that
 * fail naming the attribute and the file. Internal to the library. */
#ifndef MOE_IO_H5_H
#define MOE_IO_H5_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "comm/comm_h5.h"
#include "core/moe.h"

enum { MOE_H5_PATH_MAX = 4096 };

/* Fills an open file: file, transfer (dxpl) and link-creation (lcpl,
 * intermediate groups) property lists; tmp is the file's name for messages.
 * Runs on every rank (collective HDF5 metadata calls). With node writers
 * (moe_h5_write_atomic's w) it runs on every rank too, but only writers
 * hold the file: elsewhere file, dxpl and lcpl are H5I_INVALID_HID and fill
 * only sends its rows to its node's writer. */
typedef moe_status (*moe_h5_write_fn)(void *ctx, hid_t file, hid_t dxpl, hid_t lcpl, const char *tmp);

/* The atomic write of every HDF5 file moerun produces, collective over c's
 * world: every rank checks that the directory it sees has room for about
 * `bytes` (the data; 0: unknown, no check), then every rank (w == NULL),
 * or only the node writers of w (comm_h5.h), creates path + tmp_suffix
 * through (parallel) HDF5, fill writes it, HDF5 flushes
 * and closes it; then world rank 0 fsyncs the file, renames it to path and
 * fsyncs the directory, so a crash leaves either the old file or the new
 * one, never a partial one under path. A failure removes the temporary
 * file. Files are written in the HDF5 1.10 format (superblock version 3,
 * version 2 object headers, checksummed B-trees and chunk indices: every
 * piece of metadata carries a checksum HDF5 verifies on read), and the
 * variable-length strings of the attributes, which HDF5 keeps in
 * unchecksummed global heaps, get a checksum of their own (the root
 * attribute MOE_H5_STRING_CHECKSUM; moe_h5_check_strings). MOE_ERR_ARG when path + tmp_suffix does not fit
 * MOE_H5_PATH_MAX (before anything is created); MOE_ERR_IO naming the file
 * and the system's reason (a full disk: the space needed and free, before
 * anything is written). Every rank returns the same status and detail (the
 * cause's). */
moe_status moe_h5_write_atomic(const char *path, const char *tmp_suffix, moe_comm *c, moe_comm_h5_writers *w,
                               uint64_t bytes, moe_h5_write_fn fill, void *ctx);

/* HDF5 prints its error stack by default; library code must not print. */
typedef struct {
    H5E_auto2_t func;
    void *data;
} moe_h5_quiet;
void moe_h5_quiet_begin(moe_h5_quiet *q);
void moe_h5_quiet_end(const moe_h5_quiet *q);

/* Records "<what> '<name>' in '<file>': <innermost HDF5 message>" (name NULL:
 * "<what> '<file>': ...") and returns MOE_ERR_CHECKSUM if HDF5 reported a
 * checksum failure, else s. */
moe_status moe_h5_fail(moe_status s, const char *what, const char *name, const char *file);

/* The root attribute holding the hash of every string attribute of a file
 * moe_h5_write_atomic wrote (uint64, FNV-1a 64 over object path, attribute
 * name and value, objects and attributes in name order). */
#define MOE_H5_STRING_CHECKSUM "string_checksum"
/* Recomputes the hash of an open file's string attributes and compares it
 * with MOE_H5_STRING_CHECKSUM: MOE_ERR_CHECKSUM naming the file when they
 * differ; MOE_OK for a file without one (written before it existed). */
moe_status moe_h5_check_strings(hid_t file, const char *path);

/* The global heap collections of the file at path (where HDF5 keeps the
 * variable-length strings of attributes; the 1.10 format gives them no
 * checksum, and HDF5 copies a damaged object's length without checking it,
 * which crashes the reader): every collection's objects must lie inside
 * it. Reads the whole file once (in 4 MB blocks) before HDF5 opens it.
 * MOE_ERR_CHECKSUM naming the file and offset, MOE_ERR_IO. Not collective;
 * the string checksum then covers the strings' contents. */
moe_status moe_h5_check_global_heaps(const char *path);

/* Scalar attributes on loc. Strings are variable-length UTF-8 (readers take
 * fixed-length ones as well, as other writers make them). */
moe_status moe_h5_attr_put_i64(hid_t loc, const char *name, int64_t v, const char *file);
moe_status moe_h5_attr_put_u64(hid_t loc, const char *name, uint64_t v, const char *file);
moe_status moe_h5_attr_put_f64(hid_t loc, const char *name, double v, const char *file);
moe_status moe_h5_attr_put_str(hid_t loc, const char *name, const char *s, const char *file);
/* Missing or mistyped attributes are MOE_ERR_FORMAT naming them. */
moe_status moe_h5_attr_get_i64(hid_t loc, const char *name, int64_t *v, const char *file);
moe_status moe_h5_attr_get_u64(hid_t loc, const char *name, uint64_t *v, const char *file);
moe_status moe_h5_attr_get_f64(hid_t loc, const char *name, double *v, const char *file);
/* *s is malloc'd (caller frees). */
moe_status moe_h5_attr_get_str(hid_t loc, const char *name, char **s, const char *file);
/* Into a fixed buffer, truncated. */
moe_status moe_h5_attr_get_strbuf(hid_t loc, const char *name, char *buf, size_t cap, const char *file);

#endif
