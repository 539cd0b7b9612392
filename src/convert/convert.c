/* `moe convert` import and export (convert.h): the checkpoint side of a
 * conversion around hf.c's config and name tables. */
#include "convert/convert.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/ckpt.h"
#include "ckpt/ckpt_file.h"
#include "comm/comm.h"
#include "layout/layout.h"

/* dir/name into a new string (NULL: out of memory). */
static char *join(const char *dir, const char *name)
{
    const size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

moe_status moe_convert_import(const char *hf_dir, const char *ckpt, const moe_convert_import_opts *opts,
                              moe_convert_report *report)
{
    if (!hf_dir || !ckpt) return moe_errorf(MOE_ERR_ARG, "convert import: NULL directory or checkpoint path");
    const int cap = opts && opts->seq_cap > 0 ? opts->seq_cap : MOE_HF_DEFAULT_SEQ_CAP;
    moe_convert_report r;
    memset(&r, 0, sizeof r);
    char *cfg_path = join(hf_dir, "config.json"), *text = NULL, *cfg_text = NULL;
    moe_st_dir *dir = NULL;
    moe_tensor_table *tab = NULL;
    float *params = NULL, *zeros = NULL;
    int64_t *counters = NULL;
    moe_status st = cfg_path ? moe_st_read_text(cfg_path, &text, 1u << 24) : moe_errorf(MOE_ERR_NOMEM, "import");
    if (!st) st = moe_hf_config_parse(&r.cfg, &r.type, text, strlen(text), cfg_path, cap);
    if (!st) st = moe_st_dir_create(&dir, hf_dir);
    if (!st) st = moe_layout_create(&tab, &r.cfg, NULL, 0, 1);
    if (!st) {
        params = moe_calloc(tab->total, sizeof(float));
        zeros = moe_calloc(tab->total, sizeof(float)); /* AdamW m and v of a model that has not trained */
        const int n_moe = moe_ckpt_moe_layers(tab, NULL);
        counters = moe_calloc((size_t)n_moe * r.cfg.n_experts, sizeof(int64_t));
        if (!params || !zeros || !counters)
            st = moe_errorf(MOE_ERR_NOMEM, "import: 3 x %zu floats of parameters and optimizer state", tab->total);
    }
    if (!st && (st = moe_hf_read(params, tab, &r.cfg, r.type, dir))) {
        char why[1024];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        if (!strstr(why, hf_dir)) moe_errorf(st, "'%s': %s", hf_dir, why); /* name the directory once */
    }
    if (!st) {
        const int len = moe_train_config_format(&r.cfg, NULL, 0);
        cfg_text = malloc((size_t)len + 1);
        if (!cfg_text) st = moe_errorf(MOE_ERR_NOMEM, "import: config text");
        else moe_train_config_format(&r.cfg, cfg_text, len + 1);
    }
    if (!st) {
        moe_ckpt_state s = {.table = tab, .params = params, .m = zeros, .v = zeros, .n_experts = r.cfg.n_experts,
                            .expert_step = counters, .expert_tokens = counters, .expert_dropped = counters,
                            .lr = r.cfg.lr, .beta1 = r.cfg.beta1, .beta2 = r.cfg.beta2, .eps = r.cfg.adam_eps,
                            .weight_decay = r.cfg.weight_decay, .seed = r.cfg.seed, .config_text = cfg_text,
                            .cfg = &r.cfg};
        st = moe_ckpt_save(ckpt, moe_comm_self(), &s);
    }
    if (!st) {
        r.seq_len = r.cfg.seq_len;
        r.n_tensors = (int64_t)moe_st_dir_count(dir);
        for (int i = 0; i < tab->n; i++) r.n_params += tab->t[i].role == MOE_TENSOR_PARAM ? (int64_t)tab->t[i].numel : 0;
        r.bytes = r.n_params * 4;
        if (report) *report = r;
    }
    free(cfg_path);
    free(text);
    free(cfg_text);
    moe_st_dir_destroy(dir);
    moe_layout_destroy(tab);
    moe_free(params);
    moe_free(zeros);
    moe_free(counters);
    return st;
}

moe_status moe_convert_export(const char *ckpt, const char *out_dir, int type, uint64_t shard_bytes,
                              moe_convert_report *report)
{
    if (!ckpt || !out_dir) return moe_errorf(MOE_ERR_ARG, "convert export: NULL checkpoint or directory");
    moe_convert_report r;
    memset(&r, 0, sizeof r);
    char file[2048];
    moe_status st = moe_ckpt_resolve(file, sizeof file, ckpt);
    if (st) return st;
    /* the model from the file's /model attributes, then its parameters */
    moe_ckpt_file *f = NULL;
    if ((st = moe_ckpt_file_open(&f, file))) return st;
    if (moe_ckpt_file_info(f)->gradients) {
        moe_ckpt_file_close(f);
        return moe_errorf(MOE_ERR_FORMAT, "'%s' is a gradient dump, not a checkpoint", file);
    }
    r.cfg = moe_ckpt_file_info(f)->model;
    moe_ckpt_file_close(f);
    if (type >= 0) {
        r.type = (moe_hf_type)type;
        st = moe_hf_type_check(r.type, &r.cfg, &r.dropless_warning);
    } else {
        st = moe_hf_type_for(&r.type, &r.cfg);
        if (!st) moe_hf_type_check(r.type, &r.cfg, &r.dropless_warning);
    }
    if (st) {
        char why[512];
        snprintf(why, sizeof why, "%s", moe_error_detail());
        return moe_errorf(st, "'%s': %s", file, why);
    }
    moe_tensor_table *tab = NULL;
    float *params = NULL, *zeros = NULL;
    moe_st_tensor *ts = NULL;
    char *names = NULL, *json = NULL, *path = NULL;
    size_t nt = 0, nj = 0;
    if ((st = moe_layout_create(&tab, &r.cfg, NULL, 0, 1))) return st;
    params = moe_calloc(tab->total, sizeof(float));
    if (!params) st = moe_errorf(MOE_ERR_NOMEM, "export: %zu floats", tab->total);
    if (!st) {
        moe_ckpt_state s = {.table = tab, .params = params, .n_experts = r.cfg.n_experts, .cfg = &r.cfg};
        st = moe_ckpt_load(file, moe_comm_self(), &s, NULL);
    }
    if (!st) st = moe_hf_export_tensors(&ts, &nt, &names, &zeros, params, tab, &r.cfg, r.type);
    if (!st && mkdir(out_dir, 0755) != 0 && errno != EEXIST)
        st = moe_errorf(MOE_ERR_IO, "cannot create directory '%s': %s", out_dir, strerror(errno));
    /* weights first, config.json last: a directory with a config.json is complete */
    if (!st) st = moe_st_write_dir(out_dir, ts, nt, shard_bytes, NULL);
    if (!st) st = moe_hf_config_write(&json, &nj, &r.cfg, r.type);
    if (!st && !(path = join(out_dir, "config.json"))) st = moe_errorf(MOE_ERR_NOMEM, "export");
    if (!st) st = moe_st_write_bytes(path, json, nj);
    if (!st) {
        r.seq_len = r.cfg.seq_len;
        r.n_tensors = (int64_t)nt;
        for (size_t i = 0; i < nt; i++) {
            int64_t e = 1;
            for (int k = 0; k < ts[i].rank; k++) e *= ts[i].shape[k];
            r.n_params += e;
        }
        r.bytes = r.n_params * 4;
        if (report) *report = r;
    }
    (void)exists;
    free(path);
    free(json);
    free(ts);
    free(names);
    free(zeros);
    moe_free(params);
    moe_layout_destroy(tab);
    return st;
}
