/* The global-heap check that runs before HDF5 opens a file
 * (moe_h5_check_global_heaps): a file HDF5 wrote passes; an object that
 * runs past its collection, and a free-space object smaller than its own
 * 16-byte header (HDF5 1.10 steps over free space by its size, so a size
 * of 0 makes it loop for ever), are refused with MOE_ERR_CHECKSUM naming
 * the file, before HDF5 reads the collection. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <hdf5.h>

#include "io/h5.h"

static char path[256];

/* A file with two variable-length string attributes (one global heap
 * collection: two objects, then free space). */
static void write_file(void)
{
    snprintf(path, sizeof path, "/tmp/moe_test_heaps.%ld.h5", (long)getpid());
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    assert_int_equal(moe_h5_attr_put_str(f, "created_by", "moerun test", path), MOE_OK);
    assert_int_equal(moe_h5_attr_put_str(f, "config", "d_model = 8\nn_layers = 1\n", path), MOE_OK);
    H5Fclose(f);
}

static size_t read_all(unsigned char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    assert_true(n < cap);
    return n;
}

static void write_all(const unsigned char *buf, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, n, f), n);
    fclose(f);
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Offset of the first collection, and of its object number k (k = -1:
 * the free-space object). */
static size_t object(const unsigned char *buf, size_t n, int k, size_t *gcol)
{
    const unsigned char *g = NULL;
    for (size_t i = 0; !g && i + 16 <= n; i++)
        if (!memcmp(buf + i, "GCOL\x01\x00\x00\x00", 8)) g = buf + i;
    assert_non_null(g);
    *gcol = (size_t)(g - buf);
    const uint64_t size = le64(g + 8);
    for (size_t pos = 16, i = 0; pos + 16 <= size; i++) {
        const unsigned idx = g[pos] | g[pos + 1] << 8;
        if ((k < 0 && idx == 0) || (k >= 0 && (int)i == k)) return *gcol + pos;
        assert_true(idx != 0);
        pos += 16 + ((le64(g + pos + 8) + 7) & ~7ull);
    }
    fail_msg("no object %d in the collection", k);
    return 0;
}

static void expect_refused(const char *what)
{
    moe_error_clear();
    assert_int_equal(moe_h5_check_global_heaps(path), MOE_ERR_CHECKSUM);
    const char *d = moe_error_detail();
    if (!strstr(d, path) || !strstr(d, what)) fail_msg("detail '%s' should name '%s' and say '%s'", d, path, what);
}

static void test_heaps(void **state)
{
    (void)state;
    static unsigned char orig[1 << 16], buf[1 << 16];
    write_file();
    assert_int_equal(moe_h5_check_global_heaps(path), MOE_OK);
    const size_t n = read_all(orig, sizeof orig);
    size_t gcol;
    const size_t fs = object(orig, n, -1, &gcol), obj0 = object(orig, n, 0, &gcol);
    assert_true(le64(orig + fs + 8) >= 16);

    /* free space of size 0, and of less than its header */
    const uint64_t small[] = {0, 8, 15};
    for (int i = 0; i < 3; i++) {
        memcpy(buf, orig, n);
        put64(buf + fs + 8, small[i]);
        write_all(buf, n);
        expect_refused("smaller than its header");
    }
    /* free space, then an object, both fitting: still fine (HDF5 walks on) */
    memcpy(buf, orig, n);
    const uint64_t free_len = le64(orig + fs + 8);
    if (free_len >= 64) {
        put64(buf + fs + 8, 32);
        buf[fs + 32] = 3, buf[fs + 33] = 0;
        put64(buf + fs + 32 + 8, free_len - 32 - 16);
        write_all(buf, n);
        assert_int_equal(moe_h5_check_global_heaps(path), MOE_OK);
        /* ... and that object running past the collection */
        put64(buf + fs + 32 + 8, free_len);
        write_all(buf, n);
        expect_refused("runs past its end");
    }
    /* an object longer than the collection */
    memcpy(buf, orig, n);
    put64(buf + obj0 + 8, 1ull << 40);
    write_all(buf, n);
    expect_refused("runs past its end");
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_heaps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
