/* The vocabulary partition a training run uses (run.h,
 * moe_train_vocab_partition): built once on world rank 0 by the configured
 * rule, or read from the checkpoint being resumed, then broadcast, so every
 * rank builds its layout from the same sets. */
#include "train/run.h"

#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "ckpt/ckpt_file.h"

/* The input embedding of a checkpoint as floats (V, d). */
static moe_status read_wte(float **emb, int *d, const char *path, int V)
{
    *emb = NULL;
    char file[2048];
    moe_status st = moe_ckpt_resolve(file, sizeof file, path);
    moe_ckpt_file *f = NULL;
    if (!st) st = moe_ckpt_file_open(&f, file);
    if (st) return st;
    const int i = moe_ckpt_file_find(f, "/model/wte");
    const moe_ckpt_dset *ds = i >= 0 ? moe_ckpt_file_dset(f, i) : NULL;
    double *w = NULL;
    int64_t n = 0;
    if (!ds || !ds->present || ds->ndim != 2)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': no /model/wte to cluster", file);
    else if (ds->dims[0] != V)
        st = moe_errorf(MOE_ERR_ARG, "'%s': its wte has %lld tokens, the model vocab_size=%d (vocab_partition_from)",
                        file, (long long)ds->dims[0], V);
    if (!st) st = moe_ckpt_file_read(f, i, &w, &n);
    if (!st && !(*emb = malloc((size_t)n * sizeof **emb)))
        st = moe_errorf(MOE_ERR_NOMEM, "wte of '%s'", file);
    if (!st) {
        for (int64_t k = 0; k < n; k++) (*emb)[k] = (float)w[k];
        *d = (int)ds->dims[1];
    }
    moe_free(w);
    moe_ckpt_file_close(f);
    return st;
}

/* Rank 0's part: the partition by the configured rule. */
static moe_status build(moe_vocab_part **p, const moe_train_config *c, const int64_t *counts)
{
    const int V = c->vocab_size, M = c->vocab_experts;
    if (c->resume[0]) {
        /* a checkpoint of this model is a partition file */
        char file[2048];
        moe_status st = moe_ckpt_resolve(file, sizeof file, c->resume);
        return st ? st : moe_vocab_part_read(p, file, V, M);
    }
    if (c->vocab_partition == MOE_VOCAB_PART_FILE) return moe_vocab_part_read(p, c->vocab_partition_from, V, M);
    int32_t *assign = malloc((size_t)V * sizeof *assign);
    moe_status st = assign ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "vocabulary partition of %d tokens", V);
    if (!st && c->vocab_partition == MOE_VOCAB_PART_KMEANS) {
        float *emb = NULL;
        int d = 0;
        st = read_wte(&emb, &d, c->vocab_partition_from, V);
        const moe_vocab_kmeans_config kc = {.seed = c->seed, .iters = c->kmeans_iters, .balance = c->vocab_balance};
        if (!st) st = moe_vocab_partition_kmeans(assign, emb, V, d, M, &kc);
        free(emb);
    } else if (!st) {
        st = counts ? moe_vocab_partition_frequency(assign, counts, V, M)
                    : moe_errorf(MOE_ERR_ARG, "vocab_partition = frequency: no token counts");
    }
    if (!st) st = moe_vocab_part_create(p, assign, V, M);
    free(assign);
    return st;
}

moe_status moe_train_vocab_partition(moe_vocab_part **out, const moe_train_config *c, const int64_t *counts,
                                     moe_comm *comm)
{
    *out = NULL;
    const moe_status st = moe_comm_rank(comm) == 0 ? build(out, c, counts) : MOE_OK;
    return moe_vocab_part_share(out, st, comm);
}
