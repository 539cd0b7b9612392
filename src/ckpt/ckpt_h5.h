/* Internal to src/ckpt: HDF5 helpers shared by the parallel writer/loader
 * (ckpt.c) and the single-process reader (ckpt_file.c): quiet error
 * handling with HDF5's message in the detail, typed attributes, the model
 * attributes, dataset shape checks. Not a public interface. */
#ifndef MOE_CKPT_H5_H
#define MOE_CKPT_H5_H

#include <hdf5.h>

#include "ckpt/ckpt_file.h"

#define CKPT_FORMAT "moe-checkpoint"
#define CKPT_FORMAT_GRADS "moe-gradients"

/* HDF5 prints its error stack by default; library code must not print. */
typedef struct {
    H5E_auto2_t func;
    void *data;
} ckpt_quiet;
void ckpt_quiet_begin(ckpt_quiet *q);
void ckpt_quiet_end(const ckpt_quiet *q);

/* Records "<what> '<name>' in '<file>': <innermost HDF5 message>" and returns
 * MOE_ERR_CHECKSUM if HDF5 reported a checksum failure, else s. */
moe_status ckpt_h5_fail(moe_status s, const char *what, const char *name, const char *file);

/* Scalar attributes on loc. Strings are variable-length UTF-8. */
moe_status ckpt_attr_put_i64(hid_t loc, const char *name, int64_t v, const char *file);
moe_status ckpt_attr_put_u64(hid_t loc, const char *name, uint64_t v, const char *file);
moe_status ckpt_attr_put_f64(hid_t loc, const char *name, double v, const char *file);
moe_status ckpt_attr_put_str(hid_t loc, const char *name, const char *s, const char *file);
/* Missing or mistyped attributes are MOE_ERR_FORMAT naming them. */
moe_status ckpt_attr_get_i64(hid_t loc, const char *name, int64_t *v, const char *file);
moe_status ckpt_attr_get_u64(hid_t loc, const char *name, uint64_t *v, const char *file);
moe_status ckpt_attr_get_f64(hid_t loc, const char *name, double *v, const char *file);
/* *s is malloc'd (caller frees). */
moe_status ckpt_attr_get_str(hid_t loc, const char *name, char **s, const char *file);
/* Into a fixed buffer, truncated. */
moe_status ckpt_attr_get_strbuf(hid_t loc, const char *name, char *buf, size_t cap, const char *file);

/* The spec's /model attributes of cfg on loc, and back (model fields of
 * *cfg only; the others are zeroed). */
moe_status ckpt_model_put(hid_t loc, const moe_train_config *cfg, const char *file);
moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file);
/* MOE_ERR_MISMATCH naming the first differing attribute and both values. */
moe_status ckpt_model_compare(const moe_train_config *file_cfg, const moe_train_config *cfg, const char *file);

/* Root format + format_version: MOE_ERR_FORMAT unless format == want
 * (want NULL: either kind; *grads set) and version == 1. */
moe_status ckpt_check_format(hid_t file, const char *want, int *grads, const char *path);

/* Opens the dataset `dset` and checks class/size (dtype) and shape.
 * MOE_ERR_FORMAT naming dataset, file, expected and found shapes. On
 * success *out is the open dataset (caller closes). */
moe_status ckpt_dset_open(hid_t file, const char *dset, moe_ckpt_dtype dtype, int ndim, const int64_t *dims,
                          hid_t *out, const char *path);

/* The /train and /optimizer attributes of a checkpoint into s (scalars and
 * extras), and (if config != NULL) the root config text, malloc'd. */
moe_status ckpt_read_scalars(hid_t file, const char *path, moe_ckpt_state *s, char **config);

/* 64-bit FNV-1a, for comparing descriptions across ranks. */
uint64_t ckpt_fnv1a(uint64_t h, const void *p, size_t n);

#endif
