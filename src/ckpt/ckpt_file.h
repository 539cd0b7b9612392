/* Single-process reading of checkpoints and gradient dumps for tools
 * (`moe inspect`): the attributes, the datasets the format expects from them
 * with their shapes, and whole datasets as doubles. Nothing here is
 * collective and nothing needs MPI to be initialised. */
#ifndef MOE_CKPT_FILE_H
#define MOE_CKPT_FILE_H

#include <stdint.h>

#include "ckpt/ckpt.h"

/* STR: fixed-length strings (the names of /tokenizer/special_names). */
typedef enum { MOE_CKPT_F32 = 0, MOE_CKPT_I64 = 1, MOE_CKPT_U8 = 2, MOE_CKPT_STR = 3, MOE_CKPT_I32 = 4 } moe_ckpt_dtype;

/* The root, /model (or /grad), /train and /optimizer attributes. */
typedef struct {
    char format[32];           /* "moe-checkpoint" or "moe-gradients" */
    int64_t format_version;    /* 1 or 2 (as the file says) */
    int has_tokenizer;         /* 1: a /tokenizer group (moe_ckpt_file_tokenizer) */
    int gradients;             /* 1 for a gradient dump */
    char created_by[128], created_at[64];
    int64_t saved_world_size, saved_ep_size;
    char *config;              /* root `config` text (owned by the file handle) */
    moe_train_config model;    /* only the model fields are set */
    int64_t step, tokens_seen; /* tokens_seen: checkpoints only */
    uint64_t seed;
    moe_ckpt_extra extra[MOE_CKPT_MAX_EXTRA];
    int n_extra;
    int64_t opt_step;
    double lr, beta1, beta2, eps, weight_decay;
} moe_ckpt_info;

/* A dataset the format expects, or one found in the file. */
typedef struct {
    char path[160];            /* absolute, e.g. "/model/h/0/moe/experts/w1" */
    moe_ckpt_dtype dtype;
    int ndim;
    int64_t dims[MOE_TENSOR_MAX_DIMS];
    int expected;              /* 1: the format expects it; 0: found only in the file */
    int present;               /* 1: the file has it */
    int tensor;                /* index in moe_ckpt_file_layout(), or -1 */
} moe_ckpt_dset;

typedef struct moe_ckpt_file moe_ckpt_file;

/* Opens path read-only and reads its attributes. Fails with MOE_ERR_IO
 * (missing, unreadable, truncated, not a regular file), MOE_ERR_FORMAT (not
 * HDF5, unknown format or format_version, a missing or out-of-range
 * attribute: steps, optimizer settings), MOE_ERR_CHECKSUM (damaged string
 * attributes), each naming the file; no dataset is read or allocated for. */
moe_status moe_ckpt_file_open(moe_ckpt_file **out, const char *path);
void moe_ckpt_file_close(moe_ckpt_file *f);

const moe_ckpt_info *moe_ckpt_file_info(const moe_ckpt_file *f);
/* The layout (src/layout) from the file's model attributes (one rank, all experts). */
const moe_tensor_table *moe_ckpt_file_layout(const moe_ckpt_file *f);
/* Expected datasets in the format's order, then any others the file holds. */
int moe_ckpt_file_n_dsets(const moe_ckpt_file *f);
const moe_ckpt_dset *moe_ckpt_file_dset(const moe_ckpt_file *f, int i);
/* Index of the dataset with that absolute path, or -1. */
int moe_ckpt_file_find(const moe_ckpt_file *f, const char *path);

/* Reads dataset i whole, converted to double, into a new buffer (*out,
 * caller frees with moe_free) of *numel elements (a string dataset: its
 * bytes, string size x count). Checks type and shape
 * against the expectation before it allocates (MOE_ERR_FORMAT), and
 * reports a Fletcher32 failure as MOE_ERR_CHECKSUM naming dataset and
 * file; a missing dataset is MOE_ERR_FORMAT. Then the values against the
 * format's rules (weights and moments finite, second moments and counts
 * >= 0, expert steps at most the optimizer step): MOE_ERR_NONFINITE or
 * MOE_ERR_FORMAT naming the element. */
moe_status moe_ckpt_file_read(const moe_ckpt_file *f, int i, double **out, int64_t *numel);

/* The checkpoint's /tokenizer (docs/formats.md): ranks_bytes (uint8),
 * ranks_offsets (int64 [n+1]), attributes pattern and vocab_size,
 * special_names / special_ids when there are specials; shapes are checked
 * before anything is allocated, then the tokenizer is built
 * (moe_tok_create) and its vocab_size compared with the attribute and with
 * /model vocab_size (which may be larger, never smaller). *out = NULL when
 * the file has no /tokenizer. MOE_ERR_FORMAT / MOE_ERR_CHECKSUM naming
 * the file and the dataset. Not collective. */
moe_status moe_ckpt_file_tokenizer(const moe_ckpt_file *f, moe_tok **out);

#endif
