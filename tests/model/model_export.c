/* Test-only exporter for tests/model/model_ref.py: builds the small model of
 * a named variant (single process), runs one forward/backward on a random
 * batch of token ids and 5 AdamW steps on it, and writes to an HDF5 file (serial
 * driver): the initial weights in the checkpoint /model layout with the
 * configuration as /model attributes, the batch, and the C results (logits,
 * loss, every gradient under /grad, the 5 step losses, expert step counts,
 * and the expert bias after the steps).
 *
 * Variants: tc, ec, k1 (GPT-2 blocks, the three routers); arch1..arch3
 * (every architecture and router option of docs/training.md between them:
 * see config_for).
 *
 * Variant vx has the vocabulary-expert head (M = 8, one expert no target
 * falls in, so it must stay idle); its rows are written by token id, and
 * it adds the head's input h and dL/dh, the per-position losses, the top-K
 * distributions for K = 1, 2, M (dense, (B, T, V)) and the vocabulary
 * experts' step counts.
 *
 * Variant gpt2 is tc at GPT-2's vocabulary (50257 ids): its batch is a text
 * encoded with the gpt2 tokenizer (given as a file), with <|endoftext|>
 * (50256, the last row of wte) at two places.
 *
 * Usage: model_export OUT.h5 tc|ec|k1|arch1|arch2|arch3|vx | model_export OUT.h5 gpt2 GPT2_TOKENIZER */
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "train/train.h"

#include "testlib.h"

enum { N_STEPS = 5 };

static int fail(const char *what, moe_status s)
{
    fprintf(stderr, "model_export: %s: %s: %s\n", what, moe_status_str(s), moe_error_detail());
    return 1;
}

static int write_ds(hid_t f, const char *path, hid_t type, const void *data, int ndim,
                    const int64_t *shape)
{
    hsize_t dims[MOE_TENSOR_MAX_DIMS];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t sp = H5Screate_simple(ndim, dims, NULL);
    hid_t ds = H5Dcreate2(f, path, type, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = ds < 0 ? -1 : H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (ds >= 0) H5Dclose(ds);
    H5Sclose(sp);
    H5Pclose(lcpl);
    if (rc < 0) fprintf(stderr, "model_export: cannot write %s\n", path);
    return rc < 0;
}

static void attr_d(hid_t g, const char *name, double v)
{
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(g, name, H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
    H5Aclose(a);
    H5Sclose(sp);
}

/* Every tensor of the table under prefix ("/model/" or "/grad/"): rows
 * with a row map by their global row id; the integer tensor as int32 (and
 * not at all under /grad/: it has no gradient). */
static int write_table(hid_t f, const char *prefix, const moe_tensor_table *tab, const float *base)
{
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        char path[256];
        snprintf(path, sizeof path, "%s%s", prefix, t->name);
        const float *src = base + t->offset;
        if (t->dtype == MOE_TENSOR_I32) {
            if (!strcmp(prefix, "/grad/")) continue;
            int32_t *v = malloc(t->numel * sizeof *v);
            for (size_t k = 0; k < t->numel; k++) v[k] = (int32_t)src[k];
            const int bad = write_ds(f, path, H5T_NATIVE_INT32, v, t->ndim, t->shape);
            free(v);
            if (bad) return 1;
            continue;
        }
        float *by_id = NULL;
        if (t->row_ids) {
            const size_t row = (size_t)moe_tensor_row_numel(t);
            by_id = calloc((size_t)t->shape[0] * row, sizeof *by_id);
            for (int64_t r = 0; r < t->rows; r++) memcpy(by_id + t->row_ids[r] * row, src + r * row, row * sizeof(float));
            src = by_id;
        }
        const int bad = write_ds(f, path, H5T_NATIVE_FLOAT, src, t->ndim, t->shape);
        free(by_id);
        if (bad) return 1;
    }
    return 0;
}

static void config_for(moe_train_config *c, const char *variant)
{
    tl_config_small(c, 2, 16, 4);
    c->moe_every = 2; /* block 0 MoE, block 1 dense */
    c->batch_size = 4;
    c->aux_loss_coef = 0.1;
    c->z_loss_coef = 0.01;
    c->lr = 1e-3;
    c->warmup_steps = 2;
    c->steps = N_STEPS;
    c->grad_clip = 1.0;
    c->weight_decay = 0.1;
    c->seed = 99;
    if (!strcmp(variant, "ec")) {
        c->router = MOE_ROUTER_EXPERT_CHOICE;
        c->capacity_factor = 2.0;
        c->activation = MOE_ACT_SWIGLU;
        c->group_seqs = 2;
    } else if (!strcmp(variant, "k1")) {
        c->top_k = 1;
        c->normalize_topk = 0;
        c->capacity_factor = 0.0; /* dropless */
        c->activation = MOE_ACT_RELU;
        c->group_seqs = 4;
    } else if (!strcmp(variant, "arch1")) {
        /* Llama-style blocks: RMSNorm, RoPE, GQA with a head size that is
         * not d/H, OLMoE's full-width q/k norm, no biases but on q, k, v,
         * an untied head; a dense block without biases */
        c->norm = MOE_NORM_RMSNORM;
        c->pos = MOE_POS_ROPE;
        c->rope_theta = 500.0;
        c->n_heads = 4;
        c->n_kv_heads = 2;
        c->head_dim = 6;
        c->qk_norm = MOE_QK_NORM_FULL;
        c->linear_bias = 0;
        c->attn_bias = 1;
        c->tie_embeddings = 0;
        c->activation = MOE_ACT_SWIGLU;
        c->capacity_factor = 0.0; /* dropless */
        c->normalize_topk = 0;
    } else if (!strcmp(variant, "arch2")) {
        /* DeepSeek-style routing: sigmoid scores normalised over the top-k,
         * route_scale, an expert bias (updated after every step), experts in
         * 2 groups of which each token keeps 1, the per-sequence balance
         * loss over 2-sequence groups, 2 gated shared experts; Qwen3's
         * per-head q/k norm; capacity 1 drops assignments */
        tl_config_every_option(c);
        c->n_kv_heads = 1;
        c->route_scale = 2.5;
        c->n_shared = 2;
        c->d_ff_shared = 24;
        c->shared_gate = 1;
        c->capacity_factor = 1.0;
        c->normalize_topk = 1;
        c->moe_every = 1;
    } else if (!strcmp(variant, "arch3")) {
        /* LayerNorm with RoPE and multi-query attention, biases everywhere
         * (experts and the shared expert too), an ungated shared expert,
         * softmax with route_scale and no balance loss, gelu */
        c->pos = MOE_POS_ROPE;
        c->n_heads = 4;
        c->n_kv_heads = 1;
        c->route_scale = 0.5;
        c->aux_loss = MOE_AUX_NONE;
        c->n_shared = 1;
        c->activation = MOE_ACT_GELU;
        c->capacity_factor = 1.5;
        c->normalize_topk = 1;
    } else if (!strcmp(variant, "vx")) {
        c->capacity_factor = 1.0;
        c->head = MOE_HEAD_VOCAB_EXPERTS;
        c->vocab_experts = 8;
        c->vocab_top_k = 2;
    } else { /* tc (and gpt2): capacity 1.0 so that assignments are dropped */
        c->capacity_factor = 1.0;
        c->normalize_topk = 1;
        c->activation = MOE_ACT_GELU;
        if (!strcmp(variant, "gpt2")) c->vocab_size = c->vocab_size_user = 50257;
    }
}

/* B*T + 1 ids of a text encoded with the tokenizer at path (gpt2 variant). */
static int text_ids(int32_t *ids, int n, const char *path)
{
    static const char text[] =
        "The mixture of experts routes every token to a few of its feed-forward networks. Each expert "
        "sees only the tokens the router sends it, so the model grows without a matching growth of the "
        "compute per token: 17 + 25 = 42, and the quick brown fox jumps over the lazy dog near the river. "
        "Tokenizers such as GPT-2's byte-level BPE turn any bytes into ids, even \xff or caf\xc3\xa9.";
    moe_tok *t = NULL;
    moe_tok_encoder *e = NULL;
    uint32_t buf[sizeof text];
    size_t k = 0;
    moe_status s = moe_tok_load(&t, path, MOE_TOK_FORM_AUTO, NULL, 0, NULL, NULL);
    if (!s && moe_tok_vocab_size(t) != 50257) s = moe_errorf(MOE_ERR_ARG, "%s is not GPT-2's tokenizer", path);
    if (!s) s = moe_tok_encoder_create(&e, t);
    if (!s) s = moe_tok_encode(e, buf, &k, (const uint8_t *)text, sizeof text - 1);
    if (!s && (int)k < n) s = moe_errorf(MOE_ERR_ARG, "the text has %zu tokens, fewer than %d", k, n);
    for (int i = 0; !s && i < n; i++) ids[i] = (int32_t)buf[i];
    moe_tok_encoder_destroy(e);
    moe_tok_destroy(t);
    return s ? fail("gpt2 tokenizer", s) : 0;
}

static float *find(moe_model *m, const char *name)
{
    const moe_tensor_table *tab = moe_model_tensors(m);
    for (int i = 0; i < tab->n; i++)
        if (!strcmp(tab->t[i].name, name)) return moe_model_params(m) + tab->t[i].offset;
    return NULL;
}

int main(int argc, char **argv)
{
    const int gpt2 = argc >= 3 && !strcmp(argv[2], "gpt2");
    if (argc != 3 + gpt2) {
        fprintf(stderr, "usage: model_export OUT.h5 tc|ec|k1|arch1|arch2|arch3|vx | model_export OUT.h5 gpt2 GPT2_TOKENIZER\n");
        return 2;
    }
    moe_train_config cfg;
    config_for(&cfg, argv[2]);
    const int B = cfg.batch_size, T = cfg.seq_len, C = cfg.d_model, V = cfg.vocab_size;
    int32_t *in = malloc((size_t)B * T * sizeof(int32_t)), *tg = malloc((size_t)B * T * sizeof(int32_t));
    int32_t text[4 * 16 + 1];
    if (gpt2 && (B * T + 1 > (int)(sizeof text / sizeof text[0]) || text_ids(text, B * T + 1, argv[3]))) return 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t <= T; t++) {
            const int32_t v = gpt2 ? text[b * T + t]
                                   : (int32_t)(256.0 * moe_rng_uniform(5, MOE_RNG_DATA, (uint32_t)t, (uint32_t)b, 0, 0));
            if (t < T) in[b * T + t] = v;
            if (t > 0) tg[b * T + t - 1] = v;
        }
    if (gpt2) in[5] = tg[20] = 50256; /* <|endoftext|>: the last row of wte */
    /* The vocabulary experts: the tokens some position targets go round robin
     * to experts 0..M-2, every other token to expert M-1, which therefore no
     * position targets (its rows must stay untouched). */
    moe_vocab_part *part = NULL;
    if (cfg.head == MOE_HEAD_VOCAB_EXPERTS) {
        const int M = cfg.vocab_experts;
        int32_t *assign = malloc((size_t)V * sizeof *assign);
        uint8_t *seen = calloc((size_t)V, 1);
        for (int i = 0; i < B * T; i++) seen[tg[i]] = 1;
        for (int v = 0, k = 0; v < V; v++) assign[v] = seen[v] ? k++ % (M - 1) : M - 1;
        moe_status ps = moe_vocab_part_create(&part, assign, V, M);
        free(assign);
        free(seen);
        if (ps) return fail("partition", ps);
    }
    moe_trainer *tr = NULL;
    moe_status s = moe_trainer_create(&tr, &cfg, part, moe_comm_self());
    moe_vocab_part_destroy(part);
    if (s) return fail("trainer", s);
    moe_model *m = moe_trainer_model(tr);
    const moe_tensor_table *tab = moe_model_tensors(m);
    /* The options' tensors start at values that matter: biases and norm
     * weights off their 0 / 1 init, a bias that changes the selection. */
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        const int k = t->kind;
        if (k == MOE_T_QNORM_W || k == MOE_T_KNORM_W || k == MOE_T_EXP_BIAS || k == MOE_T_SH_B1 || k == MOE_T_SH_B2 ||
            (cfg.norm == MOE_NORM_RMSNORM && (k == MOE_T_LN1_W || k == MOE_T_LN2_W || k == MOE_T_LNF_W)) ||
            (cfg.linear_bias == 0 && k == MOE_T_QKV_B)) {
            float *p = moe_model_params(m) + t->offset;
            const float base = k == MOE_T_EXP_BIAS || k == MOE_T_SH_B1 || k == MOE_T_SH_B2 || k == MOE_T_QKV_B ? 0.0f : 1.0f;
            const float scale = k == MOE_T_EXP_BIAS ? 0.3f : 0.2f;
            for (size_t j = 0; j < t->numel; j++)
                p[j] = base + scale * (float)moe_rng_normal(11, MOE_RNG_BENCH, (uint32_t)j, (uint32_t)i, 0, 0);
        }
    }
    if (!strcmp(argv[2], "tc") || gpt2) {
        /* Idle expert 3 of block 0: ln_2 bias 1 makes sum(x) = C for every
         * token, so a constant router row of -100 gives it logit -100 C. */
        float *lb = find(m, "h/0/ln_2/bias"), *rw = find(m, "h/0/moe/router/weight");
        for (int i = 0; i < C; i++) {
            lb[i] = 1.0f;
            rw[3 * C + i] = -100.0f;
        }
    }

    hid_t f = H5Fcreate(argv[1], H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return fail("create file", MOE_ERR_IO);
    int bad = write_table(f, "/model/", tab, moe_model_params(m));
    hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
    const struct { const char *k; double v; } attrs[] = {
        {"vocab_size", cfg.vocab_size}, {"d_model", C}, {"n_layers", cfg.n_layers},
        {"n_heads", cfg.n_heads}, {"seq_len", T}, {"n_experts", cfg.n_experts},
        {"top_k", cfg.top_k}, {"d_ff", cfg.d_ff}, {"moe_every", cfg.moe_every},
        {"expert_choice", cfg.router == MOE_ROUTER_EXPERT_CHOICE},
        {"capacity_factor", cfg.capacity_factor}, {"normalize_topk", cfg.normalize_topk},
        {"activation", cfg.activation}, {"ln_eps", cfg.ln_eps}, {"group_seqs", cfg.group_seqs},
        {"aux_loss_coef", cfg.aux_loss_coef}, {"z_loss_coef", cfg.z_loss_coef},
        {"lr", cfg.lr}, {"min_lr_frac", cfg.min_lr_frac}, {"warmup_steps", cfg.warmup_steps},
        {"steps", cfg.steps}, {"weight_decay", cfg.weight_decay}, {"grad_clip", cfg.grad_clip},
        {"beta1", cfg.beta1}, {"beta2", cfg.beta2}, {"adam_eps", cfg.adam_eps},
        /* architecture and router options (enums as their index; derived defaults resolved) */
        {"norm", cfg.norm}, {"pos", cfg.pos}, {"rope_theta", cfg.rope_theta},
        {"n_kv_heads", moe_cfg_kv_heads(&cfg)}, {"head_dim", moe_cfg_head_dim(&cfg)}, {"qk_norm", cfg.qk_norm},
        {"linear_bias", cfg.linear_bias}, {"attn_bias", moe_cfg_attn_bias(&cfg)},
        {"tie_embeddings", cfg.tie_embeddings}, {"score", cfg.score}, {"route_scale", cfg.route_scale},
        {"expert_bias", cfg.expert_bias}, {"bias_update_rate", cfg.bias_update_rate},
        {"n_groups", cfg.n_groups}, {"topk_groups", moe_cfg_topk_groups(&cfg)}, {"aux_loss", cfg.aux_loss},
        {"n_shared", cfg.n_shared}, {"d_ff_shared", moe_cfg_d_ff_shared(&cfg)}, {"shared_gate", cfg.shared_gate},
        {"vocab_experts", cfg.head == MOE_HEAD_VOCAB_EXPERTS ? cfg.vocab_experts : 0},
    };
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++) attr_d(g, attrs[i].k, attrs[i].v);
    H5Gclose(g);
    bad |= write_ds(f, "/batch/inputs", H5T_NATIVE_INT32, in, 2, (int64_t[]){B, T});
    bad |= write_ds(f, "/batch/targets", H5T_NATIVE_INT32, tg, 2, (int64_t[]){B, T});

    moe_model_stats ms;
    moe_model_zero_grad(m);
    if ((s = moe_model_forward(m, in, tg, B, T, 1, 0)) || (s = moe_model_backward(m)) ||
        (s = moe_model_reduce_stats(m, &ms)))
        return fail("forward/backward", s);
    if (moe_model_logits(m))
        bad |= write_ds(f, "/out/logits", H5T_NATIVE_FLOAT, moe_model_logits(m), 3, (int64_t[]){B, T, V});
    bad |= write_ds(f, "/out/losses", H5T_NATIVE_FLOAT, moe_model_losses(m), 2, (int64_t[]){B, T});
    bad |= write_ds(f, "/out/h", H5T_NATIVE_FLOAT, moe_model_head_input(m), 3, (int64_t[]){B, T, C});
    bad |= write_ds(f, "/out/dh", H5T_NATIVE_FLOAT, moe_model_head_grad(m), 3, (int64_t[]){B, T, C});
    if (cfg.head == MOE_HEAD_VOCAB_EXPERTS) {
        /* the top-K distributions of the exported weights' h, densely */
        const int M = cfg.vocab_experts, Ks[3] = {1, 2, M}, N = B * T;
        const moe_vocab_part *vp = moe_model_vocab(m);
        const moe_vocab_params prm = moe_model_vocab_view(m, moe_model_params(m));
        const int64_t stride = moe_vocab_part_topk_size(vp, M);
        int32_t *ids = malloc((size_t)N * stride * sizeof *ids), *cnt = malloc((size_t)N * sizeof *cnt);
        float *lp = malloc((size_t)N * stride * sizeof *lp), *dense = malloc((size_t)N * V * sizeof *dense);
        for (int k = 0; k < 3 && !bad; k++) {
            if ((s = moe_vocab_ep_topk(moe_model_vocab_head(m), ids, lp, cnt, stride, moe_model_head_input(m), &prm,
                                       N, Ks[k])))
                return fail("top-K", s);
            moe_vocab_topk_dense(dense, ids, lp, cnt, stride, N, V);
            char path[64];
            snprintf(path, sizeof path, "/out/topk/%d", Ks[k]);
            bad |= write_ds(f, path, H5T_NATIVE_FLOAT, dense, 3, (int64_t[]){B, T, V});
        }
        free(ids), free(cnt), free(lp), free(dense);
    }
    bad |= write_ds(f, "/out/loss", H5T_NATIVE_DOUBLE, &ms.loss, 1, (int64_t[]){1});
    bad |= write_ds(f, "/out/ce", H5T_NATIVE_DOUBLE, &ms.ce, 1, (int64_t[]){1});
    bad |= write_table(f, "/grad/", tab, moe_model_grads(m));

    double losses[N_STEPS];
    for (int step = 0; step < N_STEPS; step++) {
        moe_train_stats st;
        if ((s = moe_trainer_step(tr, in, tg, step, &st))) return fail("step", s);
        losses[step] = st.model.loss;
    }
    bad |= write_ds(f, "/out/step_losses", H5T_NATIVE_DOUBLE, losses, 1, (int64_t[]){N_STEPS});
    bad |= write_ds(f, "/out/expert_steps", H5T_NATIVE_INT64, moe_trainer_expert_steps(tr), 2,
                    (int64_t[]){moe_model_n_moe_layers(m), cfg.n_experts});
    /* the expert bias after the steps (its updates follow the loads) */
    for (int l = 0; cfg.expert_bias && l < cfg.n_layers; l++) {
        const float *b = moe_model_param(m, MOE_T_EXP_BIAS, l);
        char path[64];
        snprintf(path, sizeof path, "/out/expert_bias/%d", l);
        if (b) bad |= write_ds(f, path, H5T_NATIVE_FLOAT, b, 1, (int64_t[]){cfg.n_experts});
    }
    if (cfg.head == MOE_HEAD_VOCAB_EXPERTS) {
        bad |= write_ds(f, "/out/vocab_steps", H5T_NATIVE_INT64, moe_trainer_vocab_steps(tr), 1,
                        (int64_t[]){cfg.vocab_experts});
        /* the weights after the steps: the idle expert's rows must be the initial ones */
        bad |= write_table(f, "/after/", tab, moe_model_params(m));
        bad |= write_table(f, "/after_m/", tab, moe_trainer_adam_m(tr));
    }
    H5Fclose(f);
    free(in);
    free(tg);
    moe_trainer_destroy(tr);
    return bad;
}
