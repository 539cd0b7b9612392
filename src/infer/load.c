/* Loading a checkpoint for inference on any number of ranks: world rank 0
 * reads the root `config` text (the configuration the run used) and, for
 * vocabulary experts, the partition; every rank parses the text, builds the
 * model with one sequence per routing group, and the parameters are read
 * collectively (each rank its own expert rows). */
#include "infer/infer.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "ckpt/ckpt_file.h"

moe_status moe_infer_read_file(uint8_t **data, size_t *n, const char *path)
{
    *data = NULL;
    *n = 0;
    /* non-blocking open, then fstat: a named pipe is refused at once
     * instead of waited on */
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return moe_errorf(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "'%s' is not a regular file (a named pipe or a device cannot be read here)",
                          path);
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return moe_errorf(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    }
    const long size = (long)sb.st_size;
    uint8_t *buf = moe_calloc((size_t)size, 1);
    if (!buf) {
        fclose(f);
        return moe_errorf(MOE_ERR_NOMEM, "reading '%s': %ld bytes", path, size);
    }
    size_t got = fread(buf, 1, (size_t)size, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != (size_t)size) {
        moe_free(buf);
        return moe_errorf(MOE_ERR_IO, "cannot read '%s' (%zu of %ld bytes)", path, got, size);
    }
    *data = buf;
    *n = got;
    return MOE_OK;
}

/* Rank 0's root `config` text of the checkpoint at path (*text malloc'd). */
static moe_status read_config_text(char **text, const char *path)
{
    *text = NULL;
    moe_ckpt_file *f = NULL;
    moe_status st = moe_ckpt_file_open(&f, path);
    if (st) return st;
    const moe_ckpt_info *info = moe_ckpt_file_info(f);
    if (info->gradients)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s' is a gradient dump, not a checkpoint", path);
    else if (!info->config || !info->config[0])
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': the root 'config' attribute is empty", path);
    else if (!(*text = strdup(info->config)))
        st = moe_errorf(MOE_ERR_NOMEM, "config text of '%s'", path);
    moe_ckpt_file_close(f);
    return st;
}

/* The config text of rank 0 on every rank (text malloc'd; NULL on failure). */
static moe_status share_config_text(char **text, const char *path, moe_comm *comm)
{
    const int rank = moe_comm_rank(comm);
    moe_status st = rank == 0 ? read_config_text(text, path) : MOE_OK;
    if ((st = moe_comm_agree(comm, st))) {
        free(*text);
        *text = NULL;
        return st;
    }
    uint64_t len = rank == 0 ? strlen(*text) : 0;
    if ((st = moe_comm_bcast(comm, &len, sizeof len, 0))) return st;
    if (rank != 0) {
        *text = calloc(len + 1, 1);
        st = *text ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "config text: %llu bytes", (unsigned long long)len);
    }
    if ((st = moe_comm_agree(comm, st)) == MOE_OK) st = moe_comm_bcast(comm, *text, len, 0);
    if (st) {
        free(*text);
        *text = NULL;
    }
    return st;
}

moe_status moe_infer_load(moe_model **out, moe_train_config *cfg_out, const char *path, int max_local_seqs,
                          int min_tokens, moe_comm *comm)
{
    return moe_infer_load_placed(out, cfg_out, path, max_local_seqs, min_tokens, NULL, comm);
}

moe_status moe_infer_load_placed(moe_model **out, moe_train_config *cfg_out, const char *path, int max_local_seqs,
                                 int min_tokens, const char *placement, moe_comm *comm)
{
    *out = NULL;
    if (!path || max_local_seqs < 1)
        return moe_errorf(MOE_ERR_ARG, "infer load: NULL path or max_local_seqs=%d < 1", max_local_seqs);
    const int W = moe_comm_size(comm);
    if (moe_comm_ep_size(comm) != W)
        return moe_errorf(MOE_ERR_ARG, "infer load: ep size %d must equal the world size %d",
                          moe_comm_ep_size(comm), W);
    char file[2048];
    moe_status st = moe_ckpt_resolve(file, sizeof file, path);
    st = moe_comm_agree(comm, st);
    if (st) return st;

    char *text = NULL;
    if ((st = share_config_text(&text, file, comm))) return st;
    /* the saved text over the defaults gives the run's configuration; the
     * parse is identical on every rank, so no agreement is needed */
    moe_train_config saved;
    moe_train_config_default(&saved);
    char origin[2100];
    snprintf(origin, sizeof origin, "%s:config", file);
    st = moe_train_config_load_text(&saved, text, origin);
    free(text);
    if (st) return st;
    /* the training run's placement file is not this run's (another rank
     * count, perhaps gone): only the caller's */
    saved.placement[0] = 0;
    if (placement && strlen(placement) >= sizeof saved.placement)
        return moe_errorf(MOE_ERR_ARG, "placement file name longer than %zu bytes", sizeof saved.placement - 1);
    if (placement) snprintf(saved.placement, sizeof saved.placement, "%s", placement);
    if (saved.n_experts % W && !saved.placement[0])
        return moe_errorf(MOE_ERR_ARG,
                          "'%s' has n_experts=%d per MoE layer: the number of ranks (%d) must divide it "
                          "(experts are sharded over all ranks)",
                          file, saved.n_experts, W);
    moe_train_config cfg = saved;
    cfg.group_seqs = 1; /* evaluation and decoding: one sequence per routing group */
    /* the MoE layers are sized for max_local_seqs * seq_len tokens per call */
    const int64_t need = ((int64_t)min_tokens + cfg.seq_len - 1) / cfg.seq_len;
    const int seqs = need > max_local_seqs ? (int)need : max_local_seqs;
    /* the vocabulary experts' partition is in the checkpoint (it is a partition file) */
    moe_vocab_part *vocab = NULL;
    if (cfg.head == MOE_HEAD_VOCAB_EXPERTS) {
        st = moe_comm_rank(comm) == 0 ? moe_vocab_part_read(&vocab, file, cfg.vocab_size, cfg.vocab_experts) : MOE_OK;
        if ((st = moe_vocab_part_share(&vocab, st, comm))) return st;
    }
    moe_model *m = NULL;
    st = moe_model_create_inference(&m, &cfg, vocab, seqs, comm);
    moe_vocab_part_destroy(vocab); /* the model keeps its own copy */
    if (st) return st;
    /* the file's /model attributes must equal the saved config (group_seqs included) */
    moe_ckpt_state s = {.table = moe_model_tensors(m), .params = moe_model_params(m),
                        .n_experts = cfg.n_experts, .cfg = &saved};
    if ((st = moe_ckpt_load(file, comm, &s, NULL))) {
        moe_model_destroy(m);
        return st;
    }
    if (cfg_out) *cfg_out = cfg;
    *out = m;
    return MOE_OK;
}
