/* Checkpoint module, one process: bitwise round trip, gradient dumps, the
 * run directory (latest, keep_last, resolve), the tensor layout, and the
 * loader's rejection of damaged files (truncated, flipped data bytes,
 * unknown format_version, missing dataset, absurd dims, model mismatch),
 * each with a clear status and no crash or leak; the /tokenizer group
 * (format_version 2) round trip and its damaged forms. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <hdf5.h>

#include "comm/comm.h"
#include "ckpt/ckpt_file.h"
#include "io/h5.h"
#include "layout/layout.h"
#include "ckpt_testlib.h"

static char dir[64], good[128];

static void path_in(char *buf, size_t cap, const char *name) { snprintf(buf, cap, "%s/%s", dir, name); }

static int setup(void **state)
{
    (void)state;
    strcpy(dir, "/tmp/moe_ckpt_XXXXXX");
    if (!mkdtemp(dir)) return -1;
    path_in(good, sizeof good, "good.h5");
    tk_state t;
    if (tk_state_make(&t, 0, 1, 0, 0)) return -1;
    moe_status st = moe_ckpt_save(good, moe_comm_self(), &t.s);
    tk_state_free(&t);
    return st == MOE_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd);
}

static void copy_file(const char *dst, const char *src)
{
    FILE *a = fopen(src, "rb"), *b = fopen(dst, "wb");
    assert_non_null(a);
    assert_non_null(b);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) assert_int_equal(fwrite(buf, 1, n, b), n);
    fclose(a);
    fclose(b);
}

/* Loads path into a blank state; returns the status (detail kept). */
static moe_status load(const char *path, const moe_train_config *cfg_override)
{
    tk_state t;
    assert_int_equal(tk_state_blank(&t, 0, 1), 0);
    if (cfg_override) t.cfg = *cfg_override;
    char *cfg = NULL;
    moe_status st = moe_ckpt_load(path, moe_comm_self(), &t.s, &cfg);
    if (st == MOE_OK) {
        assert_int_equal(tk_state_check(&t), 0);
        assert_string_equal(cfg, tk_config_text);
    } else {
        assert_null(cfg);
    }
    free(cfg);
    tk_state_free(&t);
    return st;
}

static void test_round_trip(void **state)
{
    (void)state;
    assert_int_equal(load(good, NULL), MOE_OK);
    /* Loading without optimizer state or counters reads the params only. */
    tk_state t;
    assert_int_equal(tk_state_blank(&t, 0, 1), 0);
    moe_free(t.s.m), moe_free(t.s.v);
    t.s.m = t.s.v = NULL;
    assert_int_equal(moe_ckpt_load(good, moe_comm_self(), &t.s, NULL), MOE_OK);
    assert_int_equal(tk_state_check(&t), 0);
    tk_state_free(&t);
}

static void test_layout(void **state)
{
    (void)state;
    moe_train_config c;
    tk_config(&c);
    moe_tensor_table *t;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 1, 3), MOE_OK);
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    assert_int_equal(moe_ckpt_moe_layers(t, layers), 2);
    assert_int_equal(layers[0], 0);
    assert_int_equal(layers[1], 2);
    /* Offsets: replicated tensors first, then expert ones, each in table order, no gaps. */
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < t->n; i++) {
            if (t->t[i].expert_sharded != pass) continue;
            assert_int_equal(t->t[i].offset, total);
            total += t->t[i].numel;
        }
        if (pass == 0) assert_int_equal(total, t->dense);
    }
    int found = 0;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        if (!strcmp(x->name, "h/2/moe/experts/w1")) {
            found = 1;
            assert_int_equal(x->ndim, 3);
            assert_int_equal(x->shape[0], 12);
            assert_int_equal(x->shape[1], 16); /* swiglu: 2F */
            assert_int_equal(x->shape[2], 8);
            assert_int_equal(x->row0, 4);
            assert_int_equal(x->rows, 4);
            assert_int_equal(x->layer, 2);
        }
        if (!strcmp(x->name, "h/1/mlp/c_proj/weight")) assert_int_equal(x->shape[1], 8);
    }
    assert_true(found);
    assert_int_equal(total, t->total);
    moe_layout_destroy(t);
    /* An ep size that does not divide E, and absurd dims, are refused. */
    assert_int_equal(moe_layout_create(&t, &c, NULL, 0, 5), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "divide n_experts = 12"));
    c.d_model = 1 << 30;
    assert_int_equal(moe_layout_create(&t, &c, NULL, 0, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "d_model"));
    assert_null(t);
}

static void test_missing_and_not_hdf5(void **state)
{
    (void)state;
    char p[160];
    path_in(p, sizeof p, "nope.h5");
    assert_int_equal(load(p, NULL), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "nope.h5"));
    path_in(p, sizeof p, "text.h5");
    FILE *f = fopen(p, "w");
    fputs("not a checkpoint\n", f);
    fclose(f);
    assert_int_equal(load(p, NULL), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "not an HDF5 file"));
}

static void test_truncated(void **state)
{
    (void)state;
    char p[160];
    path_in(p, sizeof p, "trunc.h5");
    copy_file(p, good);
    struct stat sb;
    assert_int_equal(stat(p, &sb), 0);
    assert_int_equal(truncate(p, sb.st_size / 2), 0);
    moe_status st = load(p, NULL);
    assert_true(st == MOE_ERR_FORMAT || st == MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "trunc.h5"));
    moe_ckpt_file *f;
    st = moe_ckpt_file_open(&f, p);
    assert_true(st == MOE_ERR_FORMAT || st == MOE_ERR_IO);
}

/* Flips one byte in the middle of chunk `chunk` of dataset `dset`. */
static void flip_chunk(const char *path, const char *dset, hsize_t chunk)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t ds = H5Dopen2(f, dset, H5P_DEFAULT), sp = H5Dget_space(ds);
    hsize_t off[4], nchunks = 0;
    unsigned mask;
    haddr_t addr = 0;
    hsize_t size = 0;
    assert_true(H5Dget_num_chunks(ds, sp, &nchunks) >= 0);
    assert_true(chunk < nchunks);
    assert_true(H5Dget_chunk_info(ds, sp, chunk, off, &mask, &addr, &size) >= 0);
    H5Sclose(sp);
    H5Dclose(ds);
    H5Fclose(f);
    assert_true(size > 8);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, (long)(addr + size / 2), SEEK_SET), 0);
    int c = fgetc(fp);
    assert_int_equal(fseek(fp, (long)(addr + size / 2), SEEK_SET), 0);
    fputc(c ^ 0x5a, fp);
    fclose(fp);
}

static void test_flipped_bytes(void **state)
{
    (void)state;
    const char *dsets[] = {"/model/h/2/moe/experts/w1", "/model/wte", "/optimizer/v/h/0/moe/experts/b2",
                           "/stats/h/2/expert_tokens"};
    for (int i = 0; i < 4; i++) {
        char p[160];
        path_in(p, sizeof p, "flip.h5");
        copy_file(p, good);
        flip_chunk(p, dsets[i], i == 0 ? 5 : 0);
        assert_int_equal(load(p, NULL), MOE_ERR_CHECKSUM);
        assert_non_null(strstr(moe_error_detail(), dsets[i]));
        assert_non_null(strstr(moe_error_detail(), "flip.h5"));
        /* The tool reader sees it too, and only in that dataset. */
        moe_ckpt_file *f;
        assert_int_equal(moe_ckpt_file_open(&f, p), MOE_OK);
        for (int k = 0; k < moe_ckpt_file_n_dsets(f); k++) {
            double *buf;
            int64_t n;
            moe_status st = moe_ckpt_file_read(f, k, &buf, &n);
            assert_int_equal(st, strcmp(moe_ckpt_file_dset(f, k)->path, dsets[i]) ? MOE_OK : MOE_ERR_CHECKSUM);
            moe_free(buf);
        }
        moe_ckpt_file_close(f);
    }
}

/* Edits a copy of the good file with HDF5 and returns its path. */
typedef void (*edit_fn)(hid_t file);

static void edited(char *p, size_t cap, edit_fn fn)
{
    path_in(p, cap, "edit.h5");
    copy_file(p, good);
    hid_t f = H5Fopen(p, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    fn(f);
    assert_true(H5Fclose(f) >= 0);
}

static void set_i64(hid_t loc, const char *name, int64_t v)
{
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    assert_true(a >= 0);
    assert_true(H5Awrite(a, H5T_NATIVE_INT64, &v) >= 0);
    H5Aclose(a);
}

static void edit_version(hid_t f) { set_i64(f, "format_version", 3); }
static void edit_drop(hid_t f) { assert_true(H5Ldelete(f, "/optimizer/v/wpe", H5P_DEFAULT) >= 0); }
static void edit_huge(hid_t f)
{
    assert_true(H5Ldelete(f, "/model/h/0/moe/experts/w1", H5P_DEFAULT) >= 0);
    hsize_t dims[3] = {(hsize_t)1 << 40, 16, 8}, chunk[3] = {1, 16, 8};
    hid_t sp = H5Screate_simple(3, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 3, chunk);
    hid_t ds = H5Dcreate2(f, "/model/h/0/moe/experts/w1", H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
}
static void edit_d_model(hid_t f)
{
    hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
    set_i64(g, "d_model", (int64_t)1 << 30);
    H5Gclose(g);
}

static void test_bad_files(void **state)
{
    (void)state;
    char p[160];
    edited(p, sizeof p, edit_version);
    assert_int_equal(load(p, NULL), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "format_version 3"));

    edited(p, sizeof p, edit_drop);
    assert_int_equal(load(p, NULL), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "'/optimizer/v/wpe' is missing"));

    edited(p, sizeof p, edit_huge);
    assert_int_equal(load(p, NULL), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "[1099511627776, 16, 8]"));
    moe_ckpt_file *f;
    assert_int_equal(moe_ckpt_file_open(&f, p), MOE_OK);
    int i = moe_ckpt_file_find(f, "/model/h/0/moe/experts/w1");
    assert_true(i >= 0);
    double *buf;
    int64_t n;
    assert_int_equal(moe_ckpt_file_read(f, i, &buf, &n), MOE_ERR_FORMAT);
    assert_null(buf);
    moe_ckpt_file_close(f);

    edited(p, sizeof p, edit_d_model);
    assert_int_equal(load(p, NULL), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "d_model = 1073741824"));
    assert_int_equal(moe_ckpt_file_open(&f, p), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "d_model"));
}

/* 1 if attribute `name` of object `obj` of file `path` exists. */
static int has_attr(const char *path, const char *obj, const char *name)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    const int r = H5Aexists_by_name(f, obj, name, H5P_DEFAULT) > 0;
    H5Fclose(f);
    return r;
}

static int64_t get_version(const char *path)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    int64_t v = -1;
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    assert_true(a >= 0 && H5Aread(a, H5T_NATIVE_INT64, &v) >= 0);
    H5Aclose(a);
    H5Fclose(f);
    return v;
}

/* Removes /model norm, and the string checksum it was part of (a file
 * another tool wrote without one). */
static void drop_norm_attr(hid_t f)
{
    assert_true(H5Adelete_by_name(f, "/model", "norm", H5P_DEFAULT) >= 0);
    assert_true(H5Adelete(f, MOE_H5_STRING_CHECKSUM) >= 0);
}

/* format_version: the defaults write version 1 without the later
 * attributes (so today's files are unchanged); options write version 2
 * with every attribute and their tensors; a missing later attribute means
 * its default (a version 1 file is the defaults). */
static void test_format_versions(void **state)
{
    (void)state;
    assert_int_equal(get_version(good), 1);
    assert_false(has_attr(good, "/model", "norm"));
    assert_false(has_attr(good, "/model", "n_kv_heads"));
    assert_true(has_attr(good, "/model", "d_model"));
    char p[160];
    path_in(p, sizeof p, "arch.h5");
    tk_arch = 1;
    tk_state t;
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &t.s), MOE_OK);
    tk_state_free(&t);
    assert_int_equal(get_version(p), 2);
    assert_true(has_attr(p, "/model", "norm") && has_attr(p, "/model", "shared_gate"));
    assert_int_equal(load(p, NULL), MOE_OK); /* bitwise round trip, lm_head, shared experts, the bias */
    moe_ckpt_file *f;
    assert_int_equal(moe_ckpt_file_open(&f, p), MOE_OK);
    assert_int_equal(moe_ckpt_file_info(f)->format_version, 2);
    assert_int_equal(moe_ckpt_file_info(f)->model.n_kv_heads, 1);
    assert_true(moe_ckpt_file_find(f, "/model/lm_head/weight") >= 0);
    assert_true(moe_ckpt_file_find(f, "/model/h/2/moe/router/expert_bias") >= 0);
    assert_true(moe_ckpt_file_find(f, "/model/h/0/moe/shared/gate") >= 0);
    assert_true(moe_ckpt_file_find(f, "/model/wpe") < 0);
    moe_ckpt_file_close(f);
    /* a run without the options refuses it, naming the first option */
    tk_arch = 0;
    assert_int_equal(load(p, NULL), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "norm = rmsnorm"));
    /* a version 2 file without one attribute: that key is its default */
    tk_arch = 1;
    hid_t h = H5Fopen(p, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(h >= 0);
    drop_norm_attr(h);
    assert_true(H5Fclose(h) >= 0);
    assert_int_equal(load(p, NULL), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "norm = layernorm"));
    tk_arch = 0;
    /* the defaults spelt out (n_kv_heads = n_heads, head_dim = d / n_heads)
     * are the defaults: the version 1 file loads */
    moe_train_config c;
    tk_config(&c);
    c.n_kv_heads = c.n_heads;
    c.head_dim = c.d_model / c.n_heads;
    c.attn_bias = 1;
    assert_int_equal(moe_train_config_needs_v2(&c), 0);
    assert_int_equal(load(good, &c), MOE_OK);
}

static void test_model_mismatch(void **state)
{
    (void)state;
    moe_train_config c;
    tk_config(&c);
    c.top_k = 3;
    assert_int_equal(load(good, &c), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "top_k = 2, the configuration has 3"));
    tk_config(&c);
    c.activation = MOE_ACT_GELU;
    assert_int_equal(load(good, &c), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "activation = swiglu"));
}

static void test_grads(void **state)
{
    (void)state;
    tk_state t;
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    const int E = t.cfg.n_experts;
    uint8_t act[2 * 12];
    for (int i = 0; i < 2 * E; i++) act[i] = (uint8_t)(i % 3 != 0);
    char p[160];
    path_in(p, sizeof p, "grads.h5");
    /* grads: reuse the m block (any deterministic values) */
    assert_int_equal(moe_ckpt_save_grads(p, moe_comm_self(), t.table, t.s.m, act, NULL, E, 42, &t.cfg, tk_config_text), MOE_OK);
    moe_ckpt_file *f;
    assert_int_equal(moe_ckpt_file_open(&f, p), MOE_OK);
    const moe_ckpt_info *in = moe_ckpt_file_info(f);
    assert_int_equal(in->gradients, 1);
    assert_int_equal(in->step, 42);
    assert_string_equal(in->config, tk_config_text);
    int i = moe_ckpt_file_find(f, "/grad/h/2/moe/experts/activated");
    double *buf;
    int64_t n;
    assert_int_equal(moe_ckpt_file_read(f, i, &buf, &n), MOE_OK);
    assert_int_equal(n, E);
    for (int e = 0; e < E; e++) assert_true(buf[e] == act[E + e]);
    moe_free(buf);
    i = moe_ckpt_file_find(f, "/grad/h/0/attn/c_attn/weight");
    assert_int_equal(moe_ckpt_file_read(f, i, &buf, &n), MOE_OK);
    assert_int_equal(n, 24 * 8);
    for (int64_t j = 0; j < n; j++) assert_true(buf[j] == tk_value(TK_M, "h/0/attn/c_attn/weight", j));
    moe_free(buf);
    for (int k = 0; k < moe_ckpt_file_n_dsets(f); k++) {
        assert_true(moe_ckpt_file_dset(f, k)->expected);
        assert_true(moe_ckpt_file_dset(f, k)->present);
    }
    moe_ckpt_file_close(f);
    /* A gradient dump is not a checkpoint. */
    assert_int_equal(load(p, NULL), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "moe-gradients"));
    tk_state_free(&t);
}

static int exists(const char *p);

/* /tokenizer: written only with a tokenizer (then format_version 2), read
 * back equal by the tool reader and by the collective loader; a file
 * without one (format 1) reads as a byte-level model. */
static void save_with_tokenizer(char *p, size_t cap)
{
    path_in(p, cap, "tok.h5");
    tk_state t;
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    moe_tok *tok = tk_tokenizer();
    assert_non_null(tok);
    t.s.tok = tok;
    assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &t.s), MOE_OK);
    moe_tok_destroy(tok);
    tk_state_free(&t);
}

static void test_tokenizer_round_trip(void **state)
{
    (void)state;
    char p[160];
    save_with_tokenizer(p, sizeof p);
    moe_tok *want = tk_tokenizer(), *got = NULL;
    moe_ckpt_file *f;
    assert_int_equal(moe_ckpt_file_open(&f, p), MOE_OK);
    assert_int_equal(moe_ckpt_file_info(f)->format_version, 2);
    assert_true(moe_ckpt_file_info(f)->has_tokenizer);
    assert_int_equal(moe_ckpt_file_tokenizer(f, &got), MOE_OK);
    assert_non_null(got);
    assert_true(moe_tok_equal(got, want));
    assert_int_equal(moe_tok_hash(got), moe_tok_hash(want));
    moe_tok_destroy(got);
    /* every dataset (the string one too) is expected and reads back */
    for (int k = 0; k < moe_ckpt_file_n_dsets(f); k++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(f, k);
        assert_true(d->expected && d->present);
        double *buf;
        int64_t n;
        assert_int_equal(moe_ckpt_file_read(f, k, &buf, &n), MOE_OK);
        if (!strcmp(d->path, "/tokenizer/special_names"))
            assert_true(n == 2 * 14 && buf[0] == '<' && buf[13] == 0 && buf[14] == '<'); /* fixed width 14 */
        moe_free(buf);
    }
    moe_ckpt_file_close(f);
    assert_int_equal(moe_ckpt_load_tokenizer(&got, p, moe_comm_self()), MOE_OK);
    assert_non_null(got);
    assert_true(moe_tok_equal(got, want));
    moe_tok_destroy(got);
    assert_int_equal(load(p, NULL), MOE_OK); /* the model part is unchanged */
    /* the file without one */
    assert_int_equal(moe_ckpt_file_open(&f, good), MOE_OK);
    assert_int_equal(moe_ckpt_file_info(f)->format_version, 1);
    assert_false(moe_ckpt_file_info(f)->has_tokenizer);
    got = want;
    assert_int_equal(moe_ckpt_file_tokenizer(f, &got), MOE_OK);
    assert_null(got);
    moe_ckpt_file_close(f);
    got = want;
    assert_int_equal(moe_ckpt_load_tokenizer(&got, good, moe_comm_self()), MOE_OK);
    assert_null(got);
    moe_tok_destroy(want);
}

/* Edits of the file with a tokenizer: each is refused with a message
 * naming the file and the problem, before anything large is allocated. */
static void tok_edited(char *p, size_t cap, edit_fn fn)
{
    char src[160];
    save_with_tokenizer(src, sizeof src);
    path_in(p, cap, "tokedit.h5");
    copy_file(p, src);
    hid_t f = H5Fopen(p, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    fn(f);
    assert_true(H5Fclose(f) >= 0);
}

static void edit_tok_vocab(hid_t f)
{
    hid_t g = H5Gopen2(f, "/tokenizer", H5P_DEFAULT);
    set_i64(g, "vocab_size", 300);
    H5Gclose(g);
}
static void edit_tok_drop_offsets(hid_t f) { assert_true(H5Ldelete(f, "/tokenizer/ranks_offsets", H5P_DEFAULT) >= 0); }
static void edit_tok_drop_names(hid_t f) { assert_true(H5Ldelete(f, "/tokenizer/special_names", H5P_DEFAULT) >= 0); }
static void edit_tok_huge(hid_t f)
{
    assert_true(H5Ldelete(f, "/tokenizer/ranks_offsets", H5P_DEFAULT) >= 0);
    hsize_t dims[1] = {(hsize_t)1 << 40}, chunk[1] = {1024};
    hid_t sp = H5Screate_simple(1, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, chunk);
    H5Pset_fletcher32(dcpl);
    hid_t ds = H5Dcreate2(f, "/tokenizer/ranks_offsets", H5T_STD_I64LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(ds >= 0);
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(sp);
}
/* offsets that no longer end at the size of ranks_bytes (rewritten through
 * HDF5, so the checksum is right) */
static void edit_tok_offsets(hid_t f)
{
    hid_t ds = H5Dopen2(f, "/tokenizer/ranks_offsets", H5P_DEFAULT);
    int64_t off[263];
    assert_true(H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off) >= 0);
    off[262] += 5;
    assert_true(H5Dwrite(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off) >= 0);
    H5Dclose(ds);
}
/* token 261 ("\n\n", bytes 267..268) becomes a second "ab" (rewritten
 * through HDF5, so the checksum is right) */
static void edit_tok_duplicate(hid_t f)
{
    hid_t ds = H5Dopen2(f, "/tokenizer/ranks_bytes", H5P_DEFAULT);
    uint8_t b[269];
    assert_true(H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, b) >= 0);
    assert_true(b[267] == '\n' && b[268] == '\n');
    memcpy(b + 267, "ab", 2);
    assert_true(H5Dwrite(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, b) >= 0);
    H5Dclose(ds);
}
/* The string checksum covers the attribute, so it refuses the file first
 * (MOE_ERR_CHECKSUM); without a checksum (a file written before there was
 * one) the reader names the missing attribute. */
static void edit_tok_no_pattern_sealed(hid_t f)
{
    hid_t g = H5Gopen2(f, "/tokenizer", H5P_DEFAULT);
    assert_true(H5Adelete(g, "pattern") >= 0);
    H5Gclose(g);
}
static void edit_tok_no_pattern(hid_t f)
{
    edit_tok_no_pattern_sealed(f);
    assert_true(H5Adelete(f, MOE_H5_STRING_CHECKSUM) >= 0);
}
static void edit_model_vocab(hid_t f)
{
    hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
    set_i64(g, "vocab_size", 260);
    H5Gclose(g);
}

static void test_tokenizer_damaged(void **state)
{
    (void)state;
    char p[160];
    moe_tok *t = NULL;
    const struct {
        edit_fn fn;
        moe_status st;
        const char *detail;
    } cases[] = {
        {edit_tok_vocab, MOE_ERR_FORMAT, "vocab_size says 300"},
        {edit_tok_drop_offsets, MOE_ERR_FORMAT, "dataset '/tokenizer/ranks_offsets' is missing"},
        {edit_tok_drop_names, MOE_ERR_FORMAT, "special_names and special_ids must come together"},
        {edit_tok_huge, MOE_ERR_FORMAT, "ranks_offsets has 1099511627776 entries"},
        {edit_tok_offsets, MOE_ERR_FORMAT, "runs from 0 to 274, not 0 to 269"},
        {edit_tok_duplicate, MOE_ERR_FORMAT, "/tokenizer: "},
        {edit_tok_no_pattern, MOE_ERR_FORMAT, "'pattern' is missing"},
        {edit_tok_no_pattern_sealed, MOE_ERR_CHECKSUM, "do not match their checksum"},
        {edit_model_vocab, MOE_ERR_FORMAT, "263 ids, more than the model's vocab_size 260"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tok_edited(p, sizeof p, cases[i].fn);
        moe_error_clear();
        moe_status st = moe_ckpt_load_tokenizer(&t, p, moe_comm_self());
        if (st != cases[i].st || !strstr(moe_error_detail(), cases[i].detail) || !strstr(moe_error_detail(), "tokedit.h5"))
            fail_msg("case %zu: %s: %s", i, moe_status_str(st), moe_error_detail());
        print_message("%s\n", moe_error_detail());
        assert_null(t);
    }
    /* a flipped byte in the rank bytes or the names: a checksum error naming the dataset */
    const char *dsets[] = {"/tokenizer/ranks_bytes", "/tokenizer/special_names", "/tokenizer/ranks_offsets"};
    for (int i = 0; i < 3; i++) {
        char src[160];
        save_with_tokenizer(src, sizeof src);
        path_in(p, sizeof p, "tokflip.h5");
        copy_file(p, src);
        flip_chunk(p, dsets[i], 0);
        assert_int_equal(moe_ckpt_load_tokenizer(&t, p, moe_comm_self()), MOE_ERR_CHECKSUM);
        assert_non_null(strstr(moe_error_detail(), dsets[i]));
        assert_null(t);
    }
    /* a model smaller than its tokenizer is not written */
    tk_state s;
    assert_int_equal(tk_state_make(&s, 0, 1, 0, 0), 0);
    moe_tok *tok = tk_tokenizer();
    s.s.tok = tok;
    s.cfg.vocab_size = 262;
    path_in(p, sizeof p, "small.h5");
    assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &s.s), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "263 ids, more than the model's vocab_size 262"));
    assert_false(exists(p));
    tk_state_free(&s);
    moe_tok_destroy(tok);
}

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

static void test_run_dir(void **state)
{
    (void)state;
    char run[128], p[256], r[256];
    path_in(run, sizeof run, "run");
    assert_int_equal(mkdir(run, 0755), 0);
    assert_int_equal(moe_ckpt_resolve(r, sizeof r, run), MOE_ERR_IO); /* no latest yet */
    tk_state t;
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    for (int step = 100; step <= 500; step += 100) {
        assert_int_equal(moe_ckpt_path(p, sizeof p, run, step), MOE_OK);
        assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &t.s), MOE_OK);
        assert_false(exists(strcat(strcpy(r, p), ".tmp")));
        assert_int_equal(moe_ckpt_commit(run, p, 2), MOE_OK);
        assert_int_equal(moe_ckpt_resolve(r, sizeof r, run), MOE_OK);
        assert_string_equal(r, p);
    }
    for (int step = 100; step <= 500; step += 100) {
        moe_ckpt_path(p, sizeof p, run, step);
        assert_int_equal(exists(p), step >= 400);
    }
    /* A newer stray file must not push out the file latest names. */
    moe_ckpt_path(p, sizeof p, run, 900);
    copy_file(p, good);
    moe_ckpt_path(p, sizeof p, run, 500);
    assert_int_equal(moe_ckpt_commit(run, p, 1), MOE_OK);
    assert_true(exists(p));
    moe_ckpt_path(r, sizeof r, run, 400);
    assert_false(exists(r));
    assert_int_equal(moe_ckpt_resolve(r, sizeof r, run), MOE_OK);
    assert_string_equal(r, p);
    /* resolve of a file is the file; latest naming a deleted file is an error */
    assert_int_equal(moe_ckpt_resolve(r, sizeof r, p), MOE_OK);
    assert_string_equal(r, p);
    remove(p);
    assert_int_equal(moe_ckpt_resolve(r, sizeof r, run), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "ckpt-000500.h5"));
    tk_state_free(&t);
}

static void test_bad_state(void **state)
{
    (void)state;
    tk_state t;
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    char p[160];
    path_in(p, sizeof p, "bad.h5");
    t.table->t[3].rows = 5; /* a replicated tensor that lost rows */
    assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &t.s), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), t.table->t[3].name));
    assert_false(exists(p));
    tk_state_free(&t);
    path_in(p, sizeof p, "no/such/dir/x.h5");
    assert_int_equal(tk_state_make(&t, 0, 1, 0, 0), 0);
    assert_int_equal(moe_ckpt_save(p, moe_comm_self(), &t.s), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "x.h5.tmp"));
    tk_state_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),  cmocka_unit_test(test_layout),
        cmocka_unit_test(test_missing_and_not_hdf5), cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_flipped_bytes), cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_model_mismatch), cmocka_unit_test(test_grads),
        cmocka_unit_test(test_run_dir),     cmocka_unit_test(test_bad_state),
        cmocka_unit_test(test_format_versions),
        cmocka_unit_test(test_tokenizer_round_trip), cmocka_unit_test(test_tokenizer_damaged),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
