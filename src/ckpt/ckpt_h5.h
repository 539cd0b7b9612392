/* Internal to src/ckpt: HDF5 helpers shared by the parallel writer/loader
 * (ckpt.c) and the single-process reader (ckpt_file.c): the model
 * attributes, format and dataset shape checks (quiet errors and typed
 * attributes: io/h5.h). Not a public interface. */
#ifndef MOE_CKPT_H5_H
#define MOE_CKPT_H5_H

#include <hdf5.h>

#include "ckpt/ckpt_file.h"
#include "io/h5.h"

#define CKPT_FORMAT "moe-checkpoint"
#define CKPT_FORMAT_GRADS "moe-gradients"

/* The /model attributes (docs/formats.md) of cfg on loc, and back (model
 * fields of *cfg only; the others are the defaults). A file version 1 has
 * only the version 1 keys: put writes the later keys only when
 * ckpt_version(cfg) > 1, get leaves a key it does not find at its default. */
moe_status ckpt_model_put(hid_t loc, const moe_train_config *cfg, const char *file);
moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file);
/* MOE_ERR_MISMATCH naming the first differing attribute and both values. */
moe_status ckpt_model_compare(const moe_train_config *file_cfg, const moe_train_config *cfg, const char *file);

/* The format_version a file of this model is written with. */
int ckpt_version(const moe_train_config *cfg);

/* Root format + format_version: MOE_ERR_FORMAT unless format == want
 * (want NULL: either kind; *grads set) and 1 <= version <=
 * MOE_CKPT_FORMAT_VERSION (*version set, may be NULL). */
moe_status ckpt_check_format(hid_t file, const char *want, int *grads, int64_t *version, const char *path);

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
