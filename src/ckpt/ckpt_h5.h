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
 * fields of *cfg only; the others are the defaults). put writes a format 2
 * key only where it applies (moe_model_attr.present); get leaves a format 2
 * key it does not find at its default (a format 1 file: all of them). */
moe_status ckpt_model_put(hid_t loc, const moe_train_config *cfg, const char *file);
moe_status ckpt_model_get(hid_t loc, moe_train_config *cfg, const char *file);
/* MOE_ERR_MISMATCH naming the first differing attribute and both values. */
moe_status ckpt_model_compare(const moe_train_config *file_cfg, const moe_train_config *cfg, const char *file);

/* Root format + format_version: MOE_ERR_FORMAT unless format == want
 * (want NULL: either kind; *grads set) and the version is one this build
 * reads (MOE_CKPT_FORMAT_VERSION_MIN .. MOE_CKPT_FORMAT_VERSION; *version
 * set when not NULL); then the string attributes against their checksum
 * (MOE_ERR_CHECKSUM, io/h5.h). */
moe_status ckpt_check_format(hid_t file, const char *want, int *grads, int64_t *version, const char *path);

/* The format_version a file of cfg's model is written with: 2 when it uses
 * an addition of format 2 (a format 2 /model attribute applies), else 1.
 * (A /tokenizer group makes a checkpoint format 2 as well: ckpt.c.) */
int ckpt_format_version(const moe_train_config *cfg);

/* HDF5 file and memory types of a dataset type; its size in bytes (not for
 * MOE_CKPT_STR, whose type is the file's or the writer's own). */
hid_t ckpt_file_type(moe_ckpt_dtype t);
hid_t ckpt_mem_type(moe_ckpt_dtype t);
size_t ckpt_dtype_size(moe_ckpt_dtype t);

/* Opens the dataset `dset` and checks class/size (dtype) and shape.
 * MOE_ERR_FORMAT naming dataset, file, expected and found shapes. On
 * success *out is the open dataset (caller closes). */
moe_status ckpt_dset_open(hid_t file, const char *dset, moe_ckpt_dtype dtype, int ndim, const int64_t *dims,
                          hid_t *out, const char *path);

/* The /train and /optimizer attributes of a checkpoint into s (scalars and
 * extras), and (if config != NULL) the root config text, malloc'd. */
moe_status ckpt_read_scalars(hid_t file, const char *path, moe_ckpt_state *s, char **config);

/* ---- the values a file may hold (docs/formats.md, "Integrity checks") ----
 * A file whose checksums pass can still hold what no run writes (another
 * tool wrote it, or a run diverged before the NaN check existed): each
 * rule below refuses it at load, with the dataset or attribute and the
 * first bad value named, instead of a failure later whose message misleads. */

/* The scalars of a checkpoint: /train step in [0, INT_MAX], tokens_seen and
 * the extra /train integers >= 0, /optimizer step in [0, /train step], lr and
 * weight_decay finite and >= 0, beta1 and beta2 in [0, 1), eps finite > 0.
 * MOE_ERR_FORMAT naming the attribute, its value and the range. */
moe_status ckpt_check_scalars(const moe_ckpt_state *s, const char *path);

/* The range of dataset `dset` (an absolute path: /model/..., /optimizer/m/...,
 * /optimizer/v/..., /optimizer/expert_step/..., /stats/..., /grad/...):
 * [*lo, *hi], finite; *integer when it holds counts. opt_step bounds the
 * per-expert steps. 0 for a dataset without a rule. */
int ckpt_value_rule(const char *dset, int64_t opt_step, double *lo, double *hi, int *integer);
/* Checks n values (float, int64 or double: exactly one non-NULL) of dataset
 * dset against its rule: MOE_ERR_NONFINITE for NaN or Inf, MOE_ERR_FORMAT
 * for a value out of range, naming the file, the dataset, the element and
 * the value. first: the index of element 0 in the whole dataset. */
moe_status ckpt_check_values(const char *path, const char *dset, int64_t opt_step, const float *f,
                             const int64_t *i, const double *d, size_t n, int64_t first);

/* The file is there, readable and a regular file (HDF5 would wait for ever
 * on a named pipe): MOE_ERR_IO naming it and the reason otherwise; and its
 * global heaps are whole (moe_h5_check_global_heaps: MOE_ERR_CHECKSUM). */
moe_status ckpt_check_file(const char *path);
/* The first part of ckpt_check_file alone (no read of the file). */
moe_status ckpt_check_path(const char *path);

/* 64-bit FNV-1a, for comparing descriptions across ranks. */
uint64_t ckpt_fnv1a(uint64_t h, const void *p, size_t n);

#endif
