/* Test-only exporter for tests/model/model_ref.py: builds the small model of
 * a named variant (single process), runs one forward/backward on a random
 * batch of token ids and 5 AdamW steps on it, and writes to an HDF5 file (serial
 * driver): the initial weights in the checkpoint /model layout with the
 * configuration as /model attributes, the batch, and the C results (logits,
 * loss, every gradient under /grad, the 5 step losses, expert step counts).
 *
 * Variant gpt2 is tc at GPT-2's vocabulary (50257 ids): its batch is a text
 * encoded with the gpt2 tokenizer (given as a file), with <|endoftext|>
 * (50256, the last row of wte) at two places.
 *
 * Usage: model_export OUT.h5 tc|ec|k1 | model_export OUT.h5 gpt2 GPT2_TOKENIZER */
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "train/train.h"

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

/* Every tensor of the table under prefix ("/model/" or "/grad/"). */
static int write_table(hid_t f, const char *prefix, const moe_tensor_table *tab, const float *base)
{
    for (int i = 0; i < tab->n; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s%s", prefix, tab->t[i].name);
        if (write_ds(f, path, H5T_NATIVE_FLOAT, base + tab->t[i].offset, tab->t[i].ndim, tab->t[i].shape))
            return 1;
    }
    return 0;
}

static void config_for(moe_train_config *c, const char *variant)
{
    moe_train_config_default(c);
    c->d_model = 32;
    c->n_layers = 2;
    c->n_heads = 2;
    c->seq_len = 16;
    c->n_experts = 4;
    c->top_k = 2;
    c->d_ff = 48;
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
        fprintf(stderr, "usage: model_export OUT.h5 tc|ec|k1 | model_export OUT.h5 gpt2 GPT2_TOKENIZER\n");
        return 2;
    }
    moe_train_config cfg;
    config_for(&cfg, argv[2]);
    moe_trainer *tr = NULL;
    moe_status s = moe_trainer_create(&tr, &cfg, moe_comm_self());
    if (s) return fail("trainer", s);
    moe_model *m = moe_trainer_model(tr);
    const moe_tensor_table *tab = moe_model_tensors(m);
    const int B = cfg.batch_size, T = cfg.seq_len, C = cfg.d_model;
    if (!strcmp(argv[2], "tc") || gpt2) {
        /* Idle expert 3 of block 0: ln_2 bias 1 makes sum(x) = C for every
         * token, so a constant router row of -100 gives it logit -100 C. */
        float *lb = find(m, "h/0/ln_2/bias"), *rw = find(m, "h/0/moe/router/weight");
        for (int i = 0; i < C; i++) {
            lb[i] = 1.0f;
            rw[3 * C + i] = -100.0f;
        }
    }
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
    bad |= write_ds(f, "/out/logits", H5T_NATIVE_FLOAT, moe_model_logits(m), 3,
                    (int64_t[]){B, T, cfg.vocab_size});
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
    H5Fclose(f);
    free(in);
    free(tg);
    moe_trainer_destroy(tr);
    return bad;
}
