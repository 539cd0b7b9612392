/* Layer dump, single process (c == NULL): every dataset and attribute reads
 * back exactly, the temp file is renamed away, an existing file is replaced,
 * and bad views, bad paths and bad reads fail with the right status. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include <cmocka.h>
#include <hdf5.h>

#include "dump_fixture.h"

static char dir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/moe_test_dump.XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int64_t attr_i64(hid_t f, const char *name)
{
    int64_t v = -1;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    assert_true(a >= 0);
    assert_true(H5Aread(a, H5T_NATIVE_INT64, &v) >= 0);
    H5Aclose(a);
    return v;
}

static double attr_f64(hid_t f, const char *name)
{
    double v = -1;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    assert_true(a >= 0);
    assert_true(H5Aread(a, H5T_NATIVE_DOUBLE, &v) >= 0);
    H5Aclose(a);
    return v;
}

static void assert_attr_str(hid_t f, const char *name, const char *want)
{
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    assert_true(a >= 0);
    hid_t t = H5Aget_type(a);
    assert_true(H5Tis_variable_str(t) > 0);
    char *s = NULL;
    assert_true(H5Aread(a, t, &s) >= 0);
    assert_string_equal(s, want);
    H5free_memory(s);
    H5Tclose(t);
    H5Aclose(a);
}

static void test_roundtrip(void **state)
{
    (void)state;
    dump_fixture fx;
    fx_init(&fx, 12, 3, 4, 3, 3, 2, MOE_ACT_SWIGLU, MOE_ROUTER_TOKEN_CHOICE);
    char path[300], tmp[320];
    snprintf(path, sizeof path, "%s/a.h5", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp.moe-dump", path);
    FILE *junk = fopen(path, "w"); /* an existing file is replaced */
    assert_non_null(junk);
    fputs("not hdf5", junk);
    fclose(junk);

    moe_dump_view v = fx_view(&fx, 0, 12, 0, 3, 1);
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_OK);
    assert_int_equal(access(tmp, F_OK), -1);
    assert_int_equal(fx_check_file(&fx, path), 0);

    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    assert_attr_str(f, "format", "moe-layer-dump");
    assert_attr_str(f, "router", "token_choice");
    assert_attr_str(f, "activation", "swiglu");
    assert_int_equal(attr_i64(f, "format_version"), 1);
    assert_int_equal(attr_i64(f, "tokens"), 12);
    assert_int_equal(attr_i64(f, "groups"), 3);
    assert_int_equal(attr_i64(f, "d_model"), 4);
    assert_int_equal(attr_i64(f, "d_ff"), 3);
    assert_int_equal(attr_i64(f, "n_experts"), 3);
    assert_int_equal(attr_i64(f, "top_k"), 2);
    assert_int_equal(attr_i64(f, "normalize_topk"), 1);
    assert_true(attr_f64(f, "capacity_factor") == 1.25);
    assert_true(attr_f64(f, "aux_loss_coef") == 0.01);
    assert_true(attr_f64(f, "z_loss_coef") == 0.001);
    uint64_t seed = 0;
    hid_t a = H5Aopen(f, "seed", H5P_DEFAULT);
    assert_true(a >= 0 && H5Aread(a, H5T_NATIVE_UINT64, &seed) >= 0);
    H5Aclose(a);
    assert_true(seed == fx.g.seed);
    /* Shapes follow docs/formats.md: swiglu W1 has 2F rows. */
    hid_t ds = H5Dopen2(f, "/experts/w1", H5P_DEFAULT);
    hid_t sp = H5Dget_space(ds);
    hsize_t dims[3];
    assert_int_equal(H5Sget_simple_extent_dims(sp, dims, NULL), 3);
    assert_true(dims[0] == 3 && dims[1] == 6 && dims[2] == 4);
    H5Sclose(sp);
    H5Dclose(ds);
    ds = H5Dopen2(f, "/aux/z_loss", H5P_DEFAULT);
    sp = H5Dget_space(ds);
    assert_int_equal(H5Sget_simple_extent_ndims(sp), 0);
    H5Sclose(sp);
    H5Dclose(ds);
    H5Fclose(f);
    fx_free(&fx);
}

static void test_bad_view(void **state)
{
    (void)state;
    dump_fixture fx;
    fx_init(&fx, 8, 2, 4, 3, 4, 1, MOE_ACT_GELU, MOE_ROUTER_EXPERT_CHOICE);
    char path[300];
    snprintf(path, sizeof path, "%s/bad.h5", dir);

    moe_dump_view v = fx_view(&fx, 0, 6, 0, 4, 1); /* two token rows missing */
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "token rows"));
    v = fx_view(&fx, 0, 8, 0, 4, 0); /* nobody writes the experts */
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "expert rows"));
    v = fx_view(&fx, 0, 8, 0, 4, 1);
    v.x = NULL;
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    v = fx_view(&fx, 0, 8, 0, 4, 1);
    v.router = MOE_ROUTER_TOKEN_CHOICE;
    v.top_k = 5;
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "top_k=5"));
    v = fx_view(&fx, 0, 8, 0, 4, 1);
    v.capacity_factor = NAN;
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "finite"));
    v = fx_view(&fx, 0, 8, 0, 4, 1);
    v.groups = 3;
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    v = fx_view(&fx, 2, 8, 0, 4, 1);
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_ARG);
    assert_int_equal(access(path, F_OK), -1);
    v = fx_view(&fx, 0, 8, 0, 4, 1); /* expert choice ignores top_k */
    v.top_k = 5;
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_OK);
    fx_free(&fx);
}

static void test_bad_path(void **state)
{
    (void)state;
    dump_fixture fx;
    fx_init(&fx, 4, 1, 2, 2, 2, 2, MOE_ACT_RELU, MOE_ROUTER_TOKEN_CHOICE);
    char path[300];
    snprintf(path, sizeof path, "%s/no/such/dir/a.h5", dir);
    moe_dump_view v = fx_view(&fx, 0, 4, 0, 2, 1);
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "no/such/dir/a.h5.tmp.moe-dump"));
    fx_free(&fx);
}

static void test_reader_errors(void **state)
{
    (void)state;
    dump_fixture fx;
    fx_init(&fx, 4, 1, 2, 2, 2, 1, MOE_ACT_RELU, MOE_ROUTER_TOKEN_CHOICE);
    char path[300];
    snprintf(path, sizeof path, "%s/r.h5", dir);
    moe_dump_view v = fx_view(&fx, 0, 4, 0, 2, 1);
    assert_int_equal(moe_dump_write(path, moe_comm_self(), &v), MOE_OK);
    float buf[16];
    uint8_t u[16];
    assert_int_equal(moe_dump_read_f32(path, "/x", buf, 7), MOE_ERR_FORMAT);
    assert_non_null(strstr(moe_error_detail(), "8 elements"));
    assert_int_equal(moe_dump_read_f32(path, "/nope", buf, 8), MOE_ERR_IO);
    assert_int_equal(moe_dump_read_u8(path, "/x", u, 8), MOE_ERR_FORMAT);
    assert_int_equal(moe_dump_read_f32(path, "/routing/kept", buf, 8), MOE_ERR_FORMAT);
    assert_int_equal(moe_dump_read_f32("/nonexistent/file.h5", "/x", buf, 8), MOE_ERR_IO);
    assert_int_equal(moe_dump_read_f32(path, "/x", buf, 8), MOE_OK);
    assert_memory_equal(buf, fx.f[0], 8 * sizeof(float));
    fx_free(&fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_bad_view),
        cmocka_unit_test(test_bad_path),
        cmocka_unit_test(test_reader_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
