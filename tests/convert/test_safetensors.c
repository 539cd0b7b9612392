/* Safetensors module, one process: float32 round trips (bit for bit, the
 * header laid out as the Python library writes it), every class of
 * malformed header and data region (each a MOE_ERR_FORMAT naming the file
 * and the tensor or field), F16/BF16 conversion against the _ref kernels
 * over all 65536 inputs and hand-computed values, sharded directories
 * (write, read, every index inconsistency), atomic replacement under an
 * injected I/O error, and the page release after a tensor is read. */
#include <dirent.h>
#include <math.h>
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

#include "convert/safetensors.h"

/* ---- helpers ---- */

/* A file image: 8-byte length, `header` (not padded), `data_len` bytes of
 * data filled with i & 0xff. Caller frees. */
static uint8_t *image(const char *header, size_t data_len, size_t *len)
{
    size_t hn = strlen(header);
    *len = 8 + hn + data_len;
    uint8_t *b = malloc(*len);
    assert_non_null(b);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)hn >> (8 * i));
    memcpy(b + 8, header, hn);
    for (size_t i = 0; i < data_len; i++) b[8 + hn + i] = (uint8_t)i;
    return b;
}

/* Opens header+data from memory and expects status `want` with every
 * `needles` substring (NULL-terminated list) in the detail. */
static void expect_mem(moe_status want, const char *header, size_t data_len, ...)
{
    size_t len;
    uint8_t *b = image(header, data_len, &len);
    moe_st_file *f = NULL;
    moe_error_clear();
    moe_status st = moe_st_file_create_mem(&f, b, len, "bad.safetensors");
    if (st != want) fail_msg("header %s: status %d (%s), want %d", header, st, moe_error_detail(), want);
    if (want != MOE_OK) {
        assert_null(f);
        va_list ap;
        va_start(ap, data_len);
        for (const char *s; (s = va_arg(ap, const char *));)
            if (!strstr(moe_error_detail(), s)) fail_msg("header %s: detail '%s' lacks '%s'", header, moe_error_detail(), s);
        va_end(ap);
        if (!strstr(moe_error_detail(), "bad.safetensors")) fail_msg("detail '%s' does not name the file", moe_error_detail());
    }
    moe_st_file_destroy(f);
    free(b);
}

#define BAD(hdr, dlen, ...) expect_mem(MOE_ERR_FORMAT, hdr, dlen, __VA_ARGS__, (const char *)NULL)
#define GOOD(hdr, dlen) expect_mem(MOE_OK, hdr, dlen, (const char *)NULL)

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

static uint8_t *read_bytes(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, *n, f), *n);
    b[*n] = 0;
    fclose(f);
    return b;
}

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* No temporary file (name containing ".tmp.") left in dir. */
static void assert_no_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    for (struct dirent *e; (e = readdir(d));)
        if (strstr(e->d_name, ".tmp.")) fail_msg("temporary file '%s' left in '%s'", e->d_name, dir);
    closedir(d);
}

static void fill(float *x, size_t n, float base)
{
    for (size_t i = 0; i < n; i++) x[i] = base + (float)i * 0.25f - (float)(i % 7) * 1e-3f;
}

/* ---- round trip ---- */

static void test_roundtrip_file(void **state)
{
    (void)state;
    float a[2 * 3 * 4], b[5], s[1] = {-3.5f};
    fill(a, 24, 1.0f);
    fill(b, 5, -7.0f);
    b[1] = INFINITY;
    b[2] = NAN;
    b[3] = -0.0f;
    b[4] = 0x1p-149f; /* float32 subnormal */
    const moe_st_tensor t[] = {
        {"z.weight", 3, {2, 3, 4}, a},
        {"a.bias", 1, {5}, b},
        {"scalar", 0, {0}, s},
        {"empty", 2, {0, 7}, NULL},
    };
    assert_int_equal(moe_st_write_file("rt.safetensors", t, 4, NULL), MOE_OK);
    assert_no_tmp(".");

    /* Layout: header padded with spaces to a multiple of 8, names sorted,
     * {"format":"pt"} metadata first, data right after the header. */
    size_t len;
    uint8_t *raw = read_bytes("rt.safetensors", &len);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = (hn << 8) | raw[i];
    assert_int_equal(hn % 8, 0);
    assert_int_equal(len, 8 + hn + 4 * (24 + 5 + 1));
    const char *h = (const char *)raw + 8;
    const char *want = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"a.bias\":{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,20]},"
                       "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,7],\"data_offsets\":[20,20]},"
                       "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[20,24]},"
                       "\"z.weight\":{\"dtype\":\"F32\",\"shape\":[2,3,4],\"data_offsets\":[24,120]}}";
    assert_true(strlen(want) <= hn && hn - strlen(want) < 8);
    assert_memory_equal(h, want, strlen(want));
    for (size_t i = strlen(want); i < hn; i++) assert_int_equal(h[i], ' ');
    assert_memory_equal(raw + 8 + hn, b, sizeof b);
    free(raw);

    moe_st_file *f;
    assert_int_equal(moe_st_file_create(&f, "rt.safetensors"), MOE_OK);
    assert_int_equal(moe_st_file_count(f), 4);
    moe_st_view v;
    moe_st_file_get(f, 0, &v);
    assert_string_equal(v.name, "a.bias");
    moe_st_file_get(f, 3, &v);
    assert_string_equal(v.name, "z.weight");
    assert_string_equal(moe_st_file_meta(f, "format"), "pt");
    assert_null(moe_st_file_meta(f, "other"));
    assert_int_equal(moe_st_file_meta_count(f), 1);

    float got[24];
    assert_int_equal(moe_st_file_read_f32(f, "z.weight", got, 24), MOE_OK);
    assert_memory_equal(got, a, sizeof a);
    assert_int_equal(moe_st_file_read_f32(f, "a.bias", got, 5), MOE_OK);
    assert_memory_equal(got, b, sizeof b); /* bits: inf, NaN, -0, subnormal */
    assert_true(moe_st_file_find(f, "scalar", &v));
    assert_int_equal(v.rank, 0);
    assert_int_equal(v.numel, 1);
    assert_int_equal(moe_st_file_read_f32(f, "scalar", got, 1), MOE_OK);
    assert_true(got[0] == -3.5f);
    assert_true(moe_st_file_find(f, "empty", &v));
    assert_int_equal(v.numel, 0);
    assert_int_equal(v.shape[1], 7);
    assert_int_equal(moe_st_file_read_f32(f, "empty", got, 0), MOE_OK);
    /* Reading twice works (the pages released after the first read fault back in). */
    assert_int_equal(moe_st_file_read_f32(f, "z.weight", got, 24), MOE_OK);
    assert_memory_equal(got, a, sizeof a);

    /* Missing tensor, wrong count. */
    assert_int_equal(moe_st_file_read_f32(f, "nope", got, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "nope"));
    assert_int_equal(moe_st_file_read_f32(f, "z.weight", got, 23), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "z.weight"));
    moe_st_file_destroy(f);
}

static void test_write_metadata_and_escapes(void **state)
{
    (void)state;
    float x[2] = {1, 2};
    const char *keys[] = {"zeta", "alpha"}, *vals[] = {"1", "tab\there \"q\""};
    const moe_st_meta meta = {keys, vals, 2};
    const moe_st_tensor t[] = {{"layer.\xc3\xa9\\name", 1, {2}, x}};
    assert_int_equal(moe_st_write_file("meta.safetensors", t, 1, &meta), MOE_OK);
    size_t len;
    uint8_t *raw = read_bytes("meta.safetensors", &len);
    const char *want = "{\"__metadata__\":{\"alpha\":\"tab\\there \\\"q\\\"\",\"zeta\":\"1\"},"
                       "\"layer.\xc3\xa9\\\\name\":{";
    assert_memory_equal(raw + 8, want, strlen(want));
    free(raw);
    moe_st_file *f;
    assert_int_equal(moe_st_file_create(&f, "meta.safetensors"), MOE_OK);
    assert_string_equal(moe_st_file_meta(f, "alpha"), "tab\there \"q\"");
    assert_string_equal(moe_st_file_meta(f, "zeta"), "1");
    const char *k0, *v0;
    moe_st_file_meta_get(f, 1, &k0, &v0);
    assert_string_equal(k0, "zeta");
    assert_string_equal(v0, "1");
    assert_true(moe_st_file_find(f, "layer.\xc3\xa9\\name", NULL));
    moe_st_file_destroy(f);

    /* Bad writer input: duplicate names, negative dims, missing data, reserved name. */
    const moe_st_tensor dup[] = {{"w", 1, {2}, x}, {"w", 1, {2}, x}};
    assert_int_equal(moe_st_write_file("bad.safetensors", dup, 2, NULL), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "given twice"));
    const moe_st_tensor neg[] = {{"w", 1, {-2}, x}};
    assert_int_equal(moe_st_write_file("bad.safetensors", neg, 1, NULL), MOE_ERR_ARG);
    const moe_st_tensor nodata[] = {{"w", 1, {2}, NULL}};
    assert_int_equal(moe_st_write_file("bad.safetensors", nodata, 1, NULL), MOE_ERR_ARG);
    const moe_st_tensor reserved[] = {{"__metadata__", 1, {2}, x}};
    assert_int_equal(moe_st_write_file("bad.safetensors", reserved, 1, NULL), MOE_ERR_ARG);
    const moe_st_tensor badutf[] = {{"w\xff", 1, {2}, x}};
    assert_int_equal(moe_st_write_file("bad.safetensors", badutf, 1, NULL), MOE_ERR_ARG);
    assert_false(exists("bad.safetensors"));
    assert_no_tmp(".");
}

/* ---- malformed headers ---- */

static void test_malformed(void **state)
{
    (void)state;
    /* Accepted edge cases: no tensors, null metadata, unpadded header,
     * entries in any order, empty and scalar tensors, JSON whitespace
     * padding, every dtype name (structure only). */
    GOOD("{}", 0);
    GOOD("{\"__metadata__\":null}", 0);
    GOOD("{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
         "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 8);
    GOOD("{\"e\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[0,0]},"
         "\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}} \t\n\r", 8);
    GOOD("{\"q\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]},"
         "\"r\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[2,4]}}", 4);

    /* Length word and header text. */
    {
        uint8_t short7[7] = {0};
        moe_st_file *f = NULL;
        assert_int_equal(moe_st_file_create_mem(&f, short7, 7, "bad.safetensors"), MOE_ERR_FORMAT);
        assert_non_null(strstr(moe_error_detail(), "shorter than the 8-byte"));
        size_t len;
        uint8_t *b = image("{}", 0, &len);
        b[0] = 200; /* header length beyond the file */
        assert_int_equal(moe_st_file_create_mem(&f, b, len, "bad.safetensors"), MOE_ERR_FORMAT);
        assert_non_null(strstr(moe_error_detail(), "runs past the end"));
        b[0] = 0; b[3] = 0x10; /* 268 MB: absurd */
        assert_int_equal(moe_st_file_create_mem(&f, b, len, "bad.safetensors"), MOE_ERR_FORMAT);
        assert_non_null(strstr(moe_error_detail(), "limit"));
        memset(b, 0xff, 8); /* 2^64 - 1 */
        assert_int_equal(moe_st_file_create_mem(&f, b, len, "bad.safetensors"), MOE_ERR_FORMAT);
        free(b);
        b = image("{}  ", 0, &len); /* a NUL inside the header's padding */
        b[8 + 2] = '\0';
        assert_int_equal(moe_st_file_create_mem(&f, b, len, "bad.safetensors"), MOE_ERR_FORMAT);
        assert_non_null(strstr(moe_error_detail(), "unexpected byte 0x00"));
        free(b);
    }
    BAD(" {}", 0, "start with '{'");
    BAD("[]", 0, "start with '{'");
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, "not valid JSON");
    BAD("{\"a\":1,}", 0, "not valid JSON");
    BAD("{} x", 0, "after the header's JSON object");
    BAD("{\"\xc3\x28\":{}}", 0, "UTF-8");
    BAD("{\"\xed\xa0\x80\":{}}", 0, "UTF-8"); /* encoded surrogate */
    BAD("{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 4, "NUL");

    /* Entries. */
    BAD("{\"w\":5}", 0, "'w'", "not an object");
    BAD("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "missing field 'dtype'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'w'", "missing field 'shape'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "'w'", "missing field 'data_offsets'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"stride\":[1]}}", 4, "'w'",
        "unknown field 'stride'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "twice");
    BAD("{\"w\":{\"dtype\":\"F48\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "unknown dtype 'F48'");
    BAD("{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'w'", "'dtype'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "'w'", "shape[0]");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1.5],\"data_offsets\":[0,4]}}", 4, "'w'", "shape[1]");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "'w'", "shape[0]");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4, "'w'", "'shape'");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "'w'", "rank 9");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, "'w'",
        "overflows");
    BAD("{\"w\":{\"dtype\":\"F64\",\"shape\":[3037000499,3037000499],\"data_offsets\":[0,4]}}", 4, "'w'",
        "overflows");
    BAD("{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2, "'w'", "whole bytes");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "'w'", "data_offsets");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "'w'", "data_offsets");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "'w'", "data_offsets");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, "'w'", "end before");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "'w'", "hold 4 bytes",
        "take 8");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "'w'", "run past");
    BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e400]}}", 4, "'w'", "data_offsets");

    /* Coverage of the data region. */
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "'b'", "overlap 'a'");
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "'b'", "4 data bytes before it");
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "'a'", "belong to no tensor");
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 6, "cover 4 data bytes", "holds 6");
    BAD("{}", 1, "cover 0 data bytes");
    BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "'a' given twice");

    /* Metadata. */
    BAD("{\"__metadata__\":{\"k\":1}}", 0, "'k'", "not a string");
    BAD("{\"__metadata__\":[]}", 0, "'__metadata__'");
    BAD("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "'k'", "twice");
    BAD("{\"__metadata__\":{},\"__metadata__\":{}}", 0, "'__metadata__' given twice");
}

/* A truncated file on disk: the length word promises more than there is. */
static void test_truncated_file(void **state)
{
    (void)state;
    float x[16];
    fill(x, 16, 0.0f);
    const moe_st_tensor t[] = {{"x", 1, {16}, x}};
    assert_int_equal(moe_st_write_file("full.safetensors", t, 1, NULL), MOE_OK);
    size_t len;
    uint8_t *raw = read_bytes("full.safetensors", &len);
    moe_st_file *f = NULL;
    for (size_t cut = 0; cut < len; cut += (cut < 16 ? 1 : 13)) {
        write_bytes("cut.safetensors", raw, cut);
        moe_status st = moe_st_file_create(&f, "cut.safetensors");
        assert_int_equal(st, MOE_ERR_FORMAT);
        assert_null(f);
        assert_non_null(strstr(moe_error_detail(), "cut.safetensors"));
    }
    free(raw);
    assert_int_equal(moe_st_file_create(&f, "missing.safetensors"), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "missing.safetensors"));
    assert_int_equal(moe_st_file_create(&f, "."), MOE_ERR_IO); /* a directory */
}

/* ---- dtypes ---- */

static void test_f16_bf16_exhaustive(void **state)
{
    (void)state;
    uint8_t src[2 * 65536];
    for (unsigned i = 0; i < 65536; i++) {
        src[2 * i] = (uint8_t)i;
        src[2 * i + 1] = (uint8_t)(i >> 8);
    }
    float *a = malloc(65536 * sizeof *a), *r = malloc(65536 * sizeof *r);
    assert_non_null(a);
    assert_non_null(r);
    /* Fast kernel and reference agree bit for bit on every input, NaNs included. */
    moe_st_f16_to_f32(a, src, 65536);
    moe_st_f16_to_f32_ref(r, src, 65536);
    assert_memory_equal(a, r, 65536 * sizeof *a);
    for (unsigned i = 0; i < 65536; i++) {
        unsigned e = (i >> 10) & 0x1f, m = i & 0x3ff;
        assert_true(e == 31 && m ? isnan(a[i]) : !isnan(a[i]));
        assert_true(!!signbit(a[i]) == !!(i & 0x8000));
    }
    moe_st_bf16_to_f32(a, src, 65536);
    moe_st_bf16_to_f32_ref(r, src, 65536);
    assert_memory_equal(a, r, 65536 * sizeof *a);
    /* Unaligned source. */
    moe_st_f16_to_f32(a, src + 1, 100);
    moe_st_f16_to_f32_ref(r, src + 1, 100);
    assert_memory_equal(a, r, 100 * sizeof *a);
    free(a);
    free(r);
}

static float f16(uint16_t h)
{
    uint8_t b[2] = {(uint8_t)h, (uint8_t)(h >> 8)};
    float x;
    moe_st_f16_to_f32(&x, b, 1);
    return x;
}

static float bf16(uint16_t h)
{
    uint8_t b[2] = {(uint8_t)h, (uint8_t)(h >> 8)};
    float x;
    moe_st_bf16_to_f32(&x, b, 1);
    return x;
}

static void test_f16_bf16_values(void **state)
{
    (void)state;
    /* Hand-computed binary16 values. */
    assert_true(f16(0x3c00) == 1.0f);
    assert_true(f16(0xc000) == -2.0f);
    assert_true(f16(0x3555) == 0x1.554p-2f); /* 0.333251953125 */
    assert_true(f16(0x7bff) == 65504.0f);    /* largest finite */
    assert_true(f16(0x0400) == 0x1p-14f);    /* smallest normal */
    assert_true(f16(0x0001) == 0x1p-24f);    /* smallest subnormal */
    assert_true(f16(0x03ff) == 1023 * 0x1p-24f);
    assert_true(f16(0x8001) == -0x1p-24f);
    assert_true(f16(0x0000) == 0.0f && !signbit(f16(0x0000)));
    assert_true(f16(0x8000) == 0.0f && signbit(f16(0x8000)));
    assert_true(isinf(f16(0x7c00)) && f16(0x7c00) > 0);
    assert_true(isinf(f16(0xfc00)) && f16(0xfc00) < 0);
    assert_true(isnan(f16(0x7e00)) && isnan(f16(0x7c01)) && isnan(f16(0xfe00)));
    /* Hand-computed bfloat16 values (the upper half of a float32). */
    assert_true(bf16(0x3f80) == 1.0f);
    assert_true(bf16(0x4049) == 3.140625f);
    assert_true(bf16(0xc2f7) == -123.5f);
    assert_true(bf16(0x7f7f) == 0x1.fep127f);
    assert_true(bf16(0x0080) == 0x1p-126f);
    assert_true(bf16(0x0001) == 0x1p-133f); /* subnormal */
    assert_true(signbit(bf16(0x8000)) && bf16(0x8000) == 0.0f);
    assert_true(isinf(bf16(0x7f80)) && isinf(bf16(0xff80)) && bf16(0xff80) < 0);
    assert_true(isnan(bf16(0x7fc0)) && isnan(bf16(0x7f81)));
}

static void test_dtype_conversion_in_file(void **state)
{
    (void)state;
    /* F16 [1, -2, 2^-24, inf], BF16 [1, 3.140625], I64 and F64 scalars. */
    const char *hdr = "{\"h\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[8,12]},"
                      "\"i\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[12,20]},"
                      "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[20,28]}}";
    size_t len;
    uint8_t *img = image(hdr, 28, &len);
    uint8_t *data = img + 8 + strlen(hdr);
    const uint16_t hv[] = {0x3c00, 0xc000, 0x0001, 0x7c00}, bv[] = {0x3f80, 0x4049};
    for (int i = 0; i < 4; i++) { data[2 * i] = (uint8_t)hv[i]; data[2 * i + 1] = (uint8_t)(hv[i] >> 8); }
    for (int i = 0; i < 2; i++) { data[8 + 2 * i] = (uint8_t)bv[i]; data[9 + 2 * i] = (uint8_t)(bv[i] >> 8); }
    /* The header is not padded, so the data is not aligned: views may be unaligned. */
    moe_st_file *f;
    assert_int_equal(moe_st_file_create_mem(&f, img, len, "dt.safetensors"), MOE_OK);
    float out[4];
    assert_int_equal(moe_st_file_read_f32(f, "h", out, 4), MOE_OK);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0x1p-24f && isinf(out[3]));
    assert_int_equal(moe_st_file_read_f32(f, "b", out, 2), MOE_OK);
    assert_true(out[0] == 1.0f && out[1] == 3.140625f);
    assert_int_equal(moe_st_file_read_f32(f, "i", out, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "unsupported dtype I64"));
    assert_non_null(strstr(moe_error_detail(), "'i'"));
    assert_non_null(strstr(moe_error_detail(), "dt.safetensors"));
    assert_int_equal(moe_st_file_read_f32(f, "d", out, 1), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "unsupported dtype F64"));
    moe_st_file_destroy(f);
    free(img);
}

/* ---- directories ---- */

#define NT 6
static float dir_data[NT][40];

static void dir_tensors(moe_st_tensor *t)
{
    /* Sizes in bytes: 160, 64, 160, 16, 96, 160; names not in sorted order. */
    static const char *names[NT] = {"model.layers.1.w", "model.embed", "model.layers.0.w", "model.norm",
                                    "lm_head.weight", "model.layers.0.big"};
    static const int numel[NT] = {40, 16, 40, 4, 24, 40};
    for (int i = 0; i < NT; i++) {
        fill(dir_data[i], 40, (float)i * 10);
        t[i] = (moe_st_tensor){names[i], 1, {numel[i]}, dir_data[i]};
    }
}

static void check_dir_contents(const char *dir, const moe_st_tensor *t)
{
    moe_st_dir *d;
    assert_int_equal(moe_st_dir_create(&d, dir), MOE_OK);
    assert_int_equal(moe_st_dir_count(d), NT);
    assert_string_equal(moe_st_dir_name(d, 0), "lm_head.weight"); /* name order */
    assert_int_equal(moe_st_dir_check(d), MOE_OK);
    for (int i = 0; i < NT; i++) {
        float got[40];
        assert_true(moe_st_dir_has(d, t[i].name));
        assert_int_equal(moe_st_dir_read_f32(d, t[i].name, got, (size_t)t[i].shape[0]), MOE_OK);
        assert_memory_equal(got, t[i].data, (size_t)t[i].shape[0] * 4);
    }
    assert_false(moe_st_dir_has(d, "absent"));
    moe_st_view v;
    assert_int_equal(moe_st_dir_find(d, "absent", &v), MOE_ERR_ARG);
    assert_non_null(strstr(moe_error_detail(), "absent"));
    moe_st_dir_destroy(d);
}

static void test_dir_single_and_sharded(void **state)
{
    (void)state;
    moe_st_tensor t[NT];
    dir_tensors(t);
    assert_int_equal(mkdir("one", 0755), 0);
    assert_int_equal(moe_st_write_dir("one", t, NT, 0, NULL), MOE_OK);
    assert_true(exists("one/model.safetensors"));
    assert_false(exists("one/model.safetensors.index.json"));
    check_dir_contents("one", t);

    /* Limit 200 bytes, in the given order (sizes 160, 64, 160, 16, 96, 160):
     * [160] closes on 64 -> shard 1; [64] closes on 160 -> shard 2;
     * [160, 16] closes on 96 -> shard 3; [96] closes on 160 -> shard 4; [160] -> shard 5. */
    assert_int_equal(mkdir("five", 0755), 0);
    assert_int_equal(moe_st_write_dir("five", t, NT, 200, NULL), MOE_OK);
    check_dir_contents("five", t);
    assert_no_tmp("five");
    size_t len;
    char *ix = (char *)read_bytes("five/model.safetensors.index.json", &len);
    const char *want = "{\n  \"metadata\": {\n    \"total_size\": 656\n  },\n  \"weight_map\": {\n"
                       "    \"lm_head.weight\": \"model-00004-of-00005.safetensors\",\n"
                       "    \"model.embed\": \"model-00002-of-00005.safetensors\",\n"
                       "    \"model.layers.0.big\": \"model-00005-of-00005.safetensors\",\n"
                       "    \"model.layers.0.w\": \"model-00003-of-00005.safetensors\",\n"
                       "    \"model.layers.1.w\": \"model-00001-of-00005.safetensors\",\n"
                       "    \"model.norm\": \"model-00003-of-00005.safetensors\"\n  }\n}\n";
    assert_string_equal(ix, want);
    free(ix);

    /* A tensor above the limit gets a shard of its own, closed before the
     * open shard: limit 100 -> [160]=1, [64] open, [160]=2, [64] closes on 16? no: 64+16 <= 100. */
    assert_int_equal(mkdir("big", 0755), 0);
    assert_int_equal(moe_st_write_dir("big", t, NT, 100, NULL), MOE_OK);
    check_dir_contents("big", t);
    ix = (char *)read_bytes("big/model.safetensors.index.json", &len);
    /* 160 -> s1; 64 open(A); 160 -> s2; 16 -> A (80); 96 tips A -> A=s3, open B(96); 160 -> s4; end B=s5. */
    assert_non_null(strstr(ix, "\"model.layers.1.w\": \"model-00001-of-00005"));
    assert_non_null(strstr(ix, "\"model.layers.0.w\": \"model-00002-of-00005"));
    assert_non_null(strstr(ix, "\"model.embed\": \"model-00003-of-00005"));
    assert_non_null(strstr(ix, "\"model.norm\": \"model-00003-of-00005"));
    assert_non_null(strstr(ix, "\"model.layers.0.big\": \"model-00004-of-00005"));
    assert_non_null(strstr(ix, "\"lm_head.weight\": \"model-00005-of-00005"));
    free(ix);

    /* Rewriting a sharded directory as one file removes the old index, and
     * back: the old single file is removed once the index is in place. */
    assert_int_equal(moe_st_write_dir("five", t, NT, 0, NULL), MOE_OK);
    assert_false(exists("five/model.safetensors.index.json"));
    check_dir_contents("five", t);
    assert_int_equal(moe_st_write_dir("one", t, NT, 200, NULL), MOE_OK);
    assert_false(exists("one/model.safetensors"));
    check_dir_contents("one", t);

    assert_int_equal(moe_st_write_dir("no_such_dir", t, NT, 0, NULL), MOE_ERR_IO);
    moe_st_dir *d;
    assert_int_equal(mkdir("empty", 0755), 0);
    assert_int_equal(moe_st_dir_create(&d, "empty"), MOE_ERR_IO);
    assert_non_null(strstr(moe_error_detail(), "neither"));
}

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s)); }

/* Expects moe_st_dir_create to succeed and then find(name) (or check when
 * name is NULL) to fail with `want`, the detail holding each needle. */
static void expect_dir(const char *dir, const char *name, moe_status want, const char *n1, const char *n2)
{
    moe_st_dir *d;
    moe_status st = moe_st_dir_create(&d, dir);
    if (st == MOE_OK) {
        moe_st_view v;
        st = name ? moe_st_dir_find(d, name, &v) : moe_st_dir_check(d);
        moe_st_dir_destroy(d);
    }
    if (st != want) fail_msg("%s: status %d (%s), want %d", dir, st, moe_error_detail(), want);
    if (n1 && !strstr(moe_error_detail(), n1)) fail_msg("%s: detail '%s' lacks '%s'", dir, moe_error_detail(), n1);
    if (n2 && !strstr(moe_error_detail(), n2)) fail_msg("%s: detail '%s' lacks '%s'", dir, moe_error_detail(), n2);
}

static void test_dir_index_errors(void **state)
{
    (void)state;
    float x[4] = {1, 2, 3, 4};
    const moe_st_tensor a[] = {{"a", 1, {4}, x}, {"b", 1, {4}, x}}, c[] = {{"c", 1, {4}, x}};
    assert_int_equal(mkdir("ix", 0755), 0);
    assert_int_equal(moe_st_write_file("ix/s1.safetensors", a, 2, NULL), MOE_OK);
    assert_int_equal(moe_st_write_file("ix/s2.safetensors", c, 1, NULL), MOE_OK);
    const char *good = "{\"metadata\":{},\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\","
                       "\"c\":\"s2.safetensors\"}}";
    write_text("ix/model.safetensors.index.json", good);
    expect_dir("ix", NULL, MOE_OK, NULL, NULL);

    /* Shards open lazily: a bad shard is reported when first used. */
    write_text("ix/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\",\"c\":\"s3.safetensors\"}}");
    expect_dir("ix", "a", MOE_OK, NULL, NULL);
    expect_dir("ix", "c", MOE_ERR_IO, "s3.safetensors", "model.safetensors.index.json");

    /* A name mapped to a file that lacks it. */
    write_text("ix/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\",\"c\":\"s1.safetensors\"}}");
    expect_dir("ix", "a", MOE_ERR_FORMAT, "'c'", "lacks it");
    /* A tensor present in two shards (s2 also holds "b"). */
    const moe_st_tensor bc[] = {{"b", 1, {4}, x}, {"c", 1, {4}, x}};
    assert_int_equal(moe_st_write_file("ix/s2.safetensors", bc, 2, NULL), MOE_OK);
    write_text("ix/model.safetensors.index.json", good);
    expect_dir("ix", "a", MOE_OK, NULL, NULL); /* s2 not opened yet */
    expect_dir("ix", "c", MOE_ERR_FORMAT, "'b'", "two shards");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "'b'", "two shards");
    /* A shard tensor the index does not list. */
    write_text("ix/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"s1.safetensors\",\"c\":\"s2.safetensors\"}}");
    expect_dir("ix", "a", MOE_ERR_FORMAT, "'b'", "does not list");
    assert_int_equal(moe_st_write_file("ix/s2.safetensors", c, 1, NULL), MOE_OK);

    /* The index itself. */
    write_text("ix/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"../s1.safetensors\"}}");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "'a'", "not a file name");
    write_text("ix/model.safetensors.index.json", "{\"weight_map\":{\"a\":1}}");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "'a'", NULL);
    write_text("ix/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"a\":\"s1.safetensors\"}}");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "'a' listed twice", NULL);
    write_text("ix/model.safetensors.index.json", "{\"metadata\":{}}");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "weight_map", NULL);
    write_text("ix/model.safetensors.index.json", "{\"weight_map\":{");
    expect_dir("ix", NULL, MOE_ERR_FORMAT, "index", NULL);

    /* A corrupt shard names the shard and the index. */
    write_text("ix/model.safetensors.index.json", good);
    write_text("ix/s2.safetensors", "garbage!");
    expect_dir("ix", "c", MOE_ERR_FORMAT, "s2.safetensors", "index");
}

/* ---- atomic replacement ---- */

static void test_atomic_write_failure(void **state)
{
    (void)state;
    float x[64], y[64];
    fill(x, 64, 1.0f);
    fill(y, 64, 2.0f);
    const moe_st_tensor tx[] = {{"w", 1, {64}, x}}, ty[] = {{"w", 1, {64}, y}};
    assert_int_equal(moe_st_write_file("keep.safetensors", tx, 1, NULL), MOE_OK);
    size_t n0, n1;
    uint8_t *before = read_bytes("keep.safetensors", &n0);
    /* An I/O error right after the header: the old file stays, no temp is left. */
    setenv("MOE_FAULT", "st_write", 1);
    assert_int_equal(moe_st_write_file("keep.safetensors", ty, 1, NULL), MOE_ERR_IO);
    unsetenv("MOE_FAULT");
    assert_non_null(strstr(moe_error_detail(), "keep.safetensors"));
    uint8_t *after = read_bytes("keep.safetensors", &n1);
    assert_int_equal(n0, n1);
    assert_memory_equal(before, after, n0);
    assert_no_tmp(".");
    free(before);
    free(after);
    /* Without the fault the replacement goes through. */
    assert_int_equal(moe_st_write_file("keep.safetensors", ty, 1, NULL), MOE_OK);
    moe_st_file *f;
    float got[64];
    assert_int_equal(moe_st_file_create(&f, "keep.safetensors"), MOE_OK);
    assert_int_equal(moe_st_file_read_f32(f, "w", got, 64), MOE_OK);
    assert_memory_equal(got, y, sizeof y);
    moe_st_file_destroy(f);
}

/* ---- memory: the file is not held twice ---- */

static long rss_file_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "RssFile: %ld kB", &kb) == 1) break;
    fclose(f);
    return kb;
}

static void test_pages_released(void **state)
{
    (void)state;
    if (rss_file_kb() < 0) skip();
    const size_t n = 8u << 20; /* 32 MB of float32 */
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(i % 1000);
    const moe_st_tensor t[] = {{"big", 1, {(int64_t)n}, x}};
    assert_int_equal(moe_st_write_file("big.safetensors", t, 1, NULL), MOE_OK);
    long r0 = rss_file_kb();
    moe_st_file *f;
    assert_int_equal(moe_st_file_create(&f, "big.safetensors"), MOE_OK);
    long r1 = rss_file_kb(); /* opening maps, but reads only the header */
    memset(x, 0, n * sizeof *x);
    assert_int_equal(moe_st_file_read_f32(f, "big", x, n), MOE_OK);
    long r2 = rss_file_kb(); /* the pages of the tensor were released after the copy */
    for (size_t i = 0; i < n; i += 4099) assert_true(x[i] == (float)(i % 1000));
    print_message("RssFile kB: before open %ld, after open %ld, after reading 32 MB %ld\n", r0, r1, r2);
    assert_true(r1 - r0 < 4096);
    assert_true(r2 - r0 < 4096);
    moe_st_file_destroy(f);
    free(x);
}

int main(void)
{
    /* A fresh scratch directory inside the test's working directory. */
    char scratch[] = "st_XXXXXX";
    if (!mkdtemp(scratch) || chdir(scratch) != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_file),
        cmocka_unit_test(test_write_metadata_and_escapes),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_truncated_file),
        cmocka_unit_test(test_f16_bf16_exhaustive),
        cmocka_unit_test(test_f16_bf16_values),
        cmocka_unit_test(test_dtype_conversion_in_file),
        cmocka_unit_test(test_dir_single_and_sharded),
        cmocka_unit_test(test_dir_index_errors),
        cmocka_unit_test(test_atomic_write_failure),
        cmocka_unit_test(test_pages_released),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    if (chdir("..") == 0 && !failed) {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch);
        if (system(cmd) != 0) return 1;
    }
    return failed;
}
