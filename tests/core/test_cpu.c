/* CPU features and kernel sets (core/cpu.h): whole-word flag matching, the
 * sets each feature list allows (newest first, Prescott always), a forced
 * set the CPU cannot run named with its first missing feature, names
 * compared without case, unknown names left unchecked, and this machine's
 * own reading. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/cpu.h"

static const char *AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c";
static const char *AVX512 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl";

static void expect_sets(const char *flags, const char *const *want, int n_want)
{
    moe_cpu c;
    moe_cpu_from(&c, "test CPU", flags, 2);
    const char *got[8];
    const int n = moe_cpu_kernel_sets(&c, got);
    assert_int_equal(n, n_want);
    for (int i = 0; i < n; i++) assert_string_equal(got[i], want[i]);
    moe_cpu_free(&c);
}

static void test_sets_by_features(void **state)
{
    (void)state;
    expect_sets("", (const char *[]){"Prescott"}, 1);
    expect_sets("sse sse2 avx", (const char *[]){"Sandybridge", "Prescott"}, 2);
    expect_sets(AVX2, (const char *[]){"Haswell", "Zen", "Sandybridge", "Prescott"}, 4);
    expect_sets(AVX512, (const char *[]){"SkylakeX", "Haswell", "Zen", "Sandybridge", "Prescott"}, 5);
    char buf[512];
    snprintf(buf, sizeof buf, "%s avx512_bf16", AVX512);
    expect_sets(buf, (const char *[]){"Cooperlake", "SkylakeX", "Haswell", "Zen", "Sandybridge", "Prescott"}, 6);
    snprintf(buf, sizeof buf, "%s avx512_bf16 amx_tile", AVX512);
    expect_sets(buf, (const char *[]){"SapphireRapids", "Cooperlake", "SkylakeX", "Haswell", "Zen", "Sandybridge",
                                      "Prescott"}, 7);
    /* AVX-512 without one of its five base parts is no SkylakeX. */
    expect_sets("avx avx2 fma avx512f avx512dq avx512cd avx512vl", (const char *[]){"Haswell", "Zen", "Sandybridge",
                                                                                   "Prescott"}, 4);
}

static void test_whole_words(void **state)
{
    (void)state;
    moe_cpu c;
    /* "avx2" and "avx512f" contain "avx"; "fma4" contains "fma". */
    moe_cpu_from(&c, NULL, "avx2 avx512f fma4", 1);
    assert_false(moe_cpu_has(&c, "avx"));
    assert_false(moe_cpu_has(&c, "fma"));
    assert_true(moe_cpu_has(&c, "avx2"));
    assert_true(moe_cpu_has(&c, "fma4"));
    assert_false(moe_cpu_has(&c, ""));
    assert_string_equal(c.model, "unknown CPU");
    moe_cpu_free(&c);
}

static void test_forced_set(void **state)
{
    (void)state;
    moe_cpu c;
    moe_cpu_from(&c, "AMD EPYC", AVX2, 2);
    const char *missing = NULL;
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "SkylakeX", &missing), 0);
    assert_string_equal(missing, "avx512f");
    missing = NULL;
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "skylakex", &missing), 0); /* OpenBLAS ignores case */
    assert_string_equal(missing, "avx512f");
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "Bulldozer", &missing), 0);
    assert_string_equal(missing, "fma4");
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "HASWELL", NULL), 1);
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "prescott", NULL), 1);
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "Katmai", NULL), -1);
    moe_cpu_free(&c);
    moe_cpu_from(&c, NULL, AVX512, 2);
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "SapphireRapids", &missing), 0);
    assert_string_equal(missing, "amx_tile");
    assert_int_equal(moe_cpu_runs_kernel_set(&c, "Cooperlake", &missing), 0);
    assert_string_equal(missing, "avx512_bf16");
    moe_cpu_free(&c);
}

static void test_this_machine(void **state)
{
    (void)state;
    moe_cpu c;
    moe_cpu_read(&c);
    assert_true(c.cpus >= 1);
    assert_non_null(c.flags);
    const char *sets[8];
    const int n = moe_cpu_kernel_sets(&c, sets);
    assert_true(n >= 1 && n <= 7);
    assert_string_equal(sets[n - 1], "Prescott");
    for (int i = 0; i < n; i++) assert_int_equal(moe_cpu_runs_kernel_set(&c, sets[i], NULL), 1);
    moe_cpu_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sets_by_features),
        cmocka_unit_test(test_whole_words),
        cmocka_unit_test(test_forced_set),
        cmocka_unit_test(test_this_machine),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
