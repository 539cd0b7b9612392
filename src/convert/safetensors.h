/* Hugging Face safetensors files and checkpoint directories: a validating,
 * memory-mapped reader (tensors are views into the mapping, converted to
 * float32 on request), a reader for sharded directories
 * (model.safetensors.index.json), and an atomic float32 writer that shards
 * past a size limit. Format and validation rules: docs/convert.md.
 *
 * Nothing here is collective and nothing needs MPI. Every failure returns a
 * moe_status with a detail naming the file and the tensor or field:
 * MOE_ERR_IO (missing, unreadable, unwritable), MOE_ERR_FORMAT (the bytes
 * break the format), MOE_ERR_ARG (bad arguments, a tensor that is absent,
 * or a dtype this module does not convert), MOE_ERR_NOMEM. */
#ifndef MOE_CONVERT_SAFETENSORS_H
#define MOE_CONVERT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/moe.h"

/* Every dtype name of the format, so that any well-formed file opens; only
 * F32, F16 and BF16 convert to float32 (moe_st_to_f32). */
typedef enum {
    MOE_ST_BOOL, MOE_ST_U8, MOE_ST_I8, MOE_ST_I16, MOE_ST_U16, MOE_ST_I32, MOE_ST_U32,
    MOE_ST_I64, MOE_ST_U64, MOE_ST_F16, MOE_ST_BF16, MOE_ST_F32, MOE_ST_F64, MOE_ST_C64,
    MOE_ST_F8_E5M2, MOE_ST_F8_E4M3, MOE_ST_F8_E8M0, MOE_ST_F8_E4M3FNUZ, MOE_ST_F8_E5M2FNUZ,
    MOE_ST_F4, MOE_ST_F6_E2M3, MOE_ST_F6_E3M2,
    MOE_ST_DTYPE_COUNT
} moe_st_dtype;

enum {
    MOE_ST_MAX_RANK = 8,                    /* the format has no limit; real checkpoints use <= 5 */
    MOE_ST_MAX_HEADER = 100000000,          /* bytes; the reference implementation's limit */
};
#define MOE_ST_DEFAULT_SHARD_BYTES 2000000000ULL /* moe_st_write_dir default */

const char *moe_st_dtype_str(moe_st_dtype t); /* "F32", ... */
int moe_st_dtype_bits(moe_st_dtype t);         /* 32, ... (4 and 6 for the sub-byte types) */

/* One tensor of an open file. Valid while the file is open. */
typedef struct {
    const char *name;
    moe_st_dtype dtype;
    int rank;                       /* 0 = scalar */
    int64_t shape[MOE_ST_MAX_RANK];
    int64_t numel;                  /* product of shape (1 for a scalar, 0 if any dim is 0) */
    const void *data;               /* into the mapping, little-endian, row-major; MAY BE UNALIGNED */
    size_t nbytes;
} moe_st_view;

/* ---- one file ---- */

typedef struct moe_st_file moe_st_file;

/* Maps `path` read-only and validates the whole header before returning
 * (docs/convert.md lists every rule). The data is not read: tensors are
 * paged in when converted. Owner: caller (moe_st_file_destroy). */
moe_status moe_st_file_create(moe_st_file **out, const char *path);
/* The same over `len` bytes at `buf`, which the caller keeps alive and
 * unchanged until destroy (no copy). `label` names the buffer in errors. */
moe_status moe_st_file_create_mem(moe_st_file **out, const void *buf, size_t len, const char *label);
void moe_st_file_destroy(moe_st_file *f);

const char *moe_st_file_path(const moe_st_file *f);
/* Tensors in name order (byte-wise strcmp), i < moe_st_file_count. */
size_t moe_st_file_count(const moe_st_file *f);
void moe_st_file_get(const moe_st_file *f, size_t i, moe_st_view *v);
/* 1 and *v filled if the file holds `name`, else 0 (v untouched). */
int moe_st_file_find(const moe_st_file *f, const char *name, moe_st_view *v);
/* The `__metadata__` string map: value of `key` or NULL; entries by index. */
const char *moe_st_file_meta(const moe_st_file *f, const char *key);
size_t moe_st_file_meta_count(const moe_st_file *f);
void moe_st_file_meta_get(const moe_st_file *f, size_t i, const char **key, const char **value);

/* Tensor `name` as float32 into out (n floats, n == numel). MOE_ERR_ARG if
 * the file lacks it, n differs, or its dtype does not convert (F64, I64,
 * ...: "unsupported dtype", naming the tensor). Pages of the file mapping
 * that held the tensor are released afterwards, so loading a model holds
 * the converted copy only, not the file as well. */
moe_status moe_st_file_read_f32(moe_st_file *f, const char *name, float *out, size_t n);

/* ---- conversion kernels ---- */

/* out[i] = float32 value of the i-th element of v (n == v->numel). Exact
 * for F16 and BF16 (every value, subnormals, infinities; NaNs stay NaN with
 * their sign and payload). MOE_ERR_ARG as above. */
moe_status moe_st_to_f32(float *out, const moe_st_view *v, size_t n);
/* Elementwise kernels (src: n little-endian 16-bit values, any alignment). */
void moe_st_f16_to_f32(float *out, const void *src, size_t n);
void moe_st_bf16_to_f32(float *out, const void *src, size_t n);
/* Naive references: value arithmetic (ldexp) instead of bit manipulation. */
void moe_st_f16_to_f32_ref(float *out, const void *src, size_t n);
void moe_st_bf16_to_f32_ref(float *out, const void *src, size_t n);

/* ---- a Hugging Face checkpoint directory ---- */

typedef struct moe_st_dir moe_st_dir;

/* Opens `dir` as transformers does: `model.safetensors` if present, else
 * `model.safetensors.index.json` (`{"metadata": {...}, "weight_map":
 * {tensor: shard file}}`). The index is validated whole here (shard names
 * are plain file names); shards are opened lazily, the first time one of
 * their tensors is asked for. Opening a shard checks it against the index:
 * every tensor the index maps to it is there, and it holds no tensor the
 * index maps elsewhere ("present in two shards") or not at all. Not
 * thread-safe (lookups may open shards). Owner: caller. */
moe_status moe_st_dir_create(moe_st_dir **out, const char *dir);
void moe_st_dir_destroy(moe_st_dir *d);

/* Tensor names in name order. */
size_t moe_st_dir_count(const moe_st_dir *d);
const char *moe_st_dir_name(const moe_st_dir *d, size_t i);
/* 1 if the directory lists `name` (no shard is opened). */
int moe_st_dir_has(const moe_st_dir *d, const char *name);
/* View of `name`, opening its shard if needed. MOE_ERR_ARG if no tensor has
 * that name; IO/FORMAT errors of the shard name the shard and the index. */
moe_status moe_st_dir_find(moe_st_dir *d, const char *name, moe_st_view *v);
/* moe_st_file_read_f32 of the shard holding `name`. */
moe_status moe_st_dir_read_f32(moe_st_dir *d, const char *name, float *out, size_t n);
/* Opens every shard now, so that every index inconsistency (including a
 * tensor present in two shards) is reported before any data is used. */
moe_status moe_st_dir_check(moe_st_dir *d);

/* ---- small text files of a checkpoint directory (config.json, ...) ---- */

/* Reads the file at `path` (at most `limit` bytes, UTF-8, no NUL) into a
 * malloc'd NUL-terminated *text (caller frees). MOE_ERR_IO (missing,
 * unreadable), MOE_ERR_FORMAT (too large, not UTF-8 text). */
moe_status moe_st_read_text(const char *path, char **text, size_t limit);
/* Writes n bytes to `path` atomically (path.tmp.<pid>, fsync, rename,
 * fsync of the directory), as the safetensors writer does. MOE_ERR_IO. */
moe_status moe_st_write_bytes(const char *path, const void *data, size_t n);

/* ---- writing (float32) ---- */

/* A tensor to write: name, shape and row-major float32 data (NULL allowed
 * when the shape has a zero dimension). The caller's memory is read as is:
 * no copy is made. */
typedef struct {
    const char *name;
    int rank;
    int64_t shape[MOE_ST_MAX_RANK];
    const float *data;
} moe_st_tensor;

/* `__metadata__` entries to write; NULL/0 writes {"format": "pt"}, which
 * transformers requires to load a file. */
typedef struct {
    const char *const *keys;
    const char *const *values;
    size_t n;
} moe_st_meta;

/* Writes one safetensors file as the Python library lays it out (header
 * keys sorted by name, header padded with spaces to a multiple of 8 bytes
 * so the data is 8-byte aligned) at `path`, atomically: `path`.tmp.<pid>,
 * fsync, rename, fsync of the directory. On failure the temporary file is
 * removed and an existing `path` is untouched. Duplicate or empty names,
 * bad shapes and names the header cannot hold are MOE_ERR_ARG. */
moe_status moe_st_write_file(const char *path, const moe_st_tensor *t, size_t n, const moe_st_meta *meta);

/* Writes a checkpoint directory (which must exist): `model.safetensors`
 * when the tensor data fits in max_shard_bytes (0: MOE_ST_DEFAULT_SHARD_BYTES),
 * else shards `model-0000i-of-0000N.safetensors` split greedily in the
 * given order as huggingface_hub does (a tensor larger than the limit gets a
 * shard of its own), then `model.safetensors.index.json` (sorted keys,
 * metadata.total_size = the tensor bytes). Every file is written
 * atomically and the index last, so a reader never finds an index naming a
 * missing shard. The entry point of the other layout (`model.safetensors`
 * or the index), if present, is removed last so that the directory cannot
 * be read as the old checkpoint; old shards are left in place. */
moe_status moe_st_write_dir(const char *dir, const moe_st_tensor *t, size_t n, uint64_t max_shard_bytes,
                            const moe_st_meta *meta);

#endif
