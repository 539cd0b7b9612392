/* Test-only: runs an imported Hugging Face model in moerun and writes what
 * tests/convert/test_hf_models.py compares with the float64 PyTorch
 * reference (hf_ref.py ref): for the token batch of test_tokens.json (read
 * as a plain JSON file here with cJSON),
 *   /logits         (B, T, V) of a forward over all T tokens (no targets);
 *   /loss           the mean next-token cross-entropy over B x (T-1);
 *   /grad/<HF name> its gradient, under the Hugging Face names (the export
 *                   mapping applied to the gradient block, which shares
 *                   the parameters' offsets);
 *   /generate/ids, /generate/logits  32 greedy steps after the prompt with
 *                   the KV-cache decoder (prompt prefilled as one group).
 * Usage: hf_check CKPT TEST_TOKENS.JSON OUT.h5 */
#include <cjson/cJSON.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "convert/hf.h"
#include "infer/infer.h"

static int fail(const char *what, moe_status s)
{
    fprintf(stderr, "hf_check: %s: %s: %s\n", what, moe_status_str(s), moe_error_detail());
    return 1;
}

static int write_ds(hid_t f, const char *path, hid_t type, const void *data, int rank, const int64_t *shape)
{
    hsize_t dims[8];
    for (int i = 0; i < rank; i++) dims[i] = (hsize_t)shape[i];
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t sp = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
    hid_t ds = H5Dcreate2(f, path, type, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = ds < 0 ? -1 : H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (ds >= 0) H5Dclose(ds);
    H5Sclose(sp);
    H5Pclose(lcpl);
    if (rc < 0) fprintf(stderr, "hf_check: cannot write %s\n", path);
    return rc < 0;
}

/* The ids of a JSON array (of arrays) into out, row by row; returns the count. */
static int ids_of(const cJSON *a, int32_t *out, int cap)
{
    int n = 0;
    for (const cJSON *c = a ? a->child : NULL; c; c = c->next) {
        if (cJSON_IsArray(c)) n += ids_of(c, out + n, cap - n);
        else if (cJSON_IsNumber(c) && n < cap) out[n++] = (int32_t)c->valuedouble;
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: hf_check CKPT TEST_TOKENS.JSON OUT.h5\n");
        return 2;
    }
    char *text = NULL;
    moe_status st = moe_st_read_text(argv[2], &text, 1 << 20);
    if (st) return fail("tokens", st);
    cJSON *j = cJSON_Parse(text);
    free(text);
    const cJSON *rows = cJSON_GetObjectItem(j, "input_ids"), *prompt = cJSON_GetObjectItem(j, "prompt_ids");
    const int B = cJSON_GetArraySize(rows), T = cJSON_GetArraySize(rows->child);
    const int n_new = (int)cJSON_GetObjectItem(j, "max_new_tokens")->valuedouble;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)B * T), pr[256];
    const int np = ids_of(prompt, pr, 256);
    if (ids_of(rows, ids, B * T) != B * T) return fail("tokens: ragged input_ids", MOE_ERR_FORMAT);
    cJSON_Delete(j);

    moe_train_config cfg;
    moe_model *m = NULL;
    if ((st = moe_infer_load(&m, &cfg, argv[1], B, 1, moe_comm_self()))) return fail("load", st);
    /* the loaded model has no gradients (inference): the same weights into
     * a training model, whose table is the same for the same config */
    {
        moe_model *mt = NULL;
        if ((st = moe_model_create(&mt, &cfg, NULL, B, moe_comm_self()))) return fail("training model", st);
        memcpy(moe_model_params(mt), moe_model_params(m), moe_model_tensors(m)->total * sizeof(float));
        moe_model_destroy(m);
        m = mt;
    }
    const int V = cfg.vocab_size;
    moe_hf_type type;
    if ((st = moe_hf_type_for(&type, &cfg))) return fail("model type", st);
    hid_t f = H5Fcreate(argv[3], H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return fail("create output", MOE_ERR_IO);
    int bad = 0;

    /* logits over all T tokens */
    if ((st = moe_model_forward(m, ids, NULL, B, T, 0, 0))) return fail("forward", st);
    bad |= write_ds(f, "/logits", H5T_NATIVE_FLOAT, moe_model_logits(m), 3, (int64_t[]){B, T, V});

    /* loss and gradients: inputs ids[:, :-1], targets ids[:, 1:] */
    int32_t *in = malloc(sizeof(int32_t) * (size_t)B * (T - 1)), *tg = malloc(sizeof(int32_t) * (size_t)B * (T - 1));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T - 1; t++) {
            in[b * (T - 1) + t] = ids[b * T + t];
            tg[b * (T - 1) + t] = ids[b * T + t + 1];
        }
    moe_model_stats ms;
    moe_model_zero_grad(m);
    if ((st = moe_model_forward(m, in, tg, B, T - 1, 1, 0)) || (st = moe_model_backward(m)) ||
        (st = moe_model_reduce_stats(m, &ms)))
        return fail("forward/backward", st);
    bad |= write_ds(f, "/loss", H5T_NATIVE_DOUBLE, &ms.loss, 0, NULL);
    moe_st_tensor *ts = NULL;
    size_t nt = 0;
    char *names = NULL;
    float *zeros = NULL;
    if ((st = moe_hf_export_tensors(&ts, &nt, &names, &zeros, moe_model_grads(m), moe_model_tensors(m), &cfg, type)))
        return fail("gradient names", st);
    for (size_t i = 0; i < nt; i++) {
        char path[256];
        snprintf(path, sizeof path, "/grad/%s", ts[i].name);
        bad |= write_ds(f, path, H5T_NATIVE_FLOAT, ts[i].data, ts[i].rank, ts[i].shape);
    }
    free(ts), free(names), free(zeros);

    /* greedy generation with the KV cache */
    moe_infer_decoder *d = NULL;
    if ((st = moe_infer_decoder_create(&d, m, 1))) return fail("decoder", st);
    float *lg = malloc(sizeof(float) * (size_t)V * (np > 1 ? np : 1)), *gen_logits = malloc(sizeof(float) * (size_t)V * n_new);
    int64_t *gen = malloc(sizeof(int64_t) * (size_t)n_new);
    int seq[256] = {0};
    if ((st = moe_infer_decode(d, lg, pr, seq, np))) return fail("prefill", st);
    const float *last = lg + (size_t)(np - 1) * V;
    for (int s = 0; s < n_new; s++) {
        int best = 0;
        for (int v = 1; v < V; v++) best = last[v] > last[best] ? v : best;
        gen[s] = best;
        memcpy(gen_logits + (size_t)s * V, last, sizeof(float) * (size_t)V);
        if (s + 1 == n_new) break;
        const int32_t tok = best;
        if ((st = moe_infer_decode(d, lg, &tok, seq, 1))) return fail("decode", st);
        last = lg;
    }
    bad |= write_ds(f, "/generate/ids", H5T_NATIVE_INT64, gen, 1, (int64_t[]){n_new});
    bad |= write_ds(f, "/generate/logits", H5T_NATIVE_FLOAT, gen_logits, 2, (int64_t[]){n_new, V});
    H5Fclose(f);
    moe_infer_decoder_destroy(d);
    moe_model_destroy(m);
    free(ids), free(in), free(tg), free(lg), free(gen_logits), free(gen);
    return bad;
}
