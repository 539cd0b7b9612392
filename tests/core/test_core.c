/* Core: Philox known answers, normal draws, capacity rounding, status names. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/moe.h"
#include "core/rng.h"

static void test_philox_known_answers(void **state)
{
    (void)state;
    /* Random123 kat_vectors: philox4x32_10. */
    uint32_t o[4];
    uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
    moe_philox(o, c0, k0);
    assert_int_equal(o[0], 0x6627e8d5u);
    assert_int_equal(o[1], 0xe169c58du);
    assert_int_equal(o[2], 0xbc57ac4cu);
    assert_int_equal(o[3], 0x9b00dbd8u);
    uint32_t c1[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k1[2] = {0xffffffffu, 0xffffffffu};
    moe_philox(o, c1, k1);
    assert_int_equal(o[0], 0x408f276du);
    assert_int_equal(o[1], 0x41c83b0eu);
    assert_int_equal(o[2], 0xa20bc7c6u);
    assert_int_equal(o[3], 0x6d5451fdu);
    uint32_t c2[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, k2[2] = {0xa4093822u, 0x299f31d0u};
    moe_philox(o, c2, k2);
    assert_int_equal(o[0], 0xd16cfe09u);
    assert_int_equal(o[1], 0x94fdccebu);
    assert_int_equal(o[2], 0x5001e420u);
    assert_int_equal(o[3], 0x24126ea1u);
}

static void test_normal_moments(void **state)
{
    (void)state;
    double s = 0, s2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        double z = moe_rng_normal(7, MOE_RNG_ROUTER_NOISE, (uint32_t)i, 3, 1, 0);
        s += z;
        s2 += z * z;
    }
    assert_true(fabs(s / n) < 0.01);
    assert_true(fabs(s2 / n - 1.0) < 0.01);
    /* A pure function of its key and counter. */
    assert_true(moe_rng_normal(1, 2, 3, 4, 5, 6) == moe_rng_normal(1, 2, 3, 4, 5, 6));
    assert_true(moe_rng_normal(1, 2, 3, 4, 5, 6) != moe_rng_normal(1, 2, 3, 4, 5, 7));
}

static void test_ceil_tol(void **state)
{
    (void)state;
    assert_int_equal(moe_ceil_tol(2.0 * 50 * 1.1 / 2), 55); /* docs/routing.md's example */
    assert_int_equal(moe_ceil_tol(2.0 * 4096 * 1.25 / 8), 1280);
    assert_int_equal(moe_ceil_tol(10.2), 11);
    assert_int_equal(moe_ceil_tol(3.0), 3);
}

static void test_status_names(void **state)
{
    (void)state;
    for (int s = 0; s < MOE_STATUS_COUNT; s++) assert_non_null(moe_status_str((moe_status)s));
    assert_string_equal(moe_status_str(MOE_ERR_ARG), "invalid argument");
    assert_int_equal(moe_errorf(MOE_ERR_IO, "file %s", "x.h5"), MOE_ERR_IO);
    assert_string_equal(moe_error_detail(), "file x.h5");
    moe_router_kind k;
    moe_activation a;
    assert_int_equal(moe_router_kind_parse(&k, "bogus"), MOE_ERR_ARG);
    assert_int_equal(moe_activation_parse(&a, "swiglu"), MOE_OK);
    assert_int_equal(a, MOE_ACT_SWIGLU);
    float v[3] = {1, 2, 3};
    assert_true(moe_all_finite(v, 3));
    v[1] = NAN;
    assert_false(moe_all_finite(v, 3));
    v[1] = INFINITY;
    assert_false(moe_all_finite(v, 3));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_philox_known_answers),
        cmocka_unit_test(test_normal_moments),
        cmocka_unit_test(test_ceil_tol),
        cmocka_unit_test(test_status_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
