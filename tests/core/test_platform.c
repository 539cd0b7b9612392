/* Platform records (core/platform.h): this process's record matches what
 * OpenBLAS reports, and the start-up check stops on a different version or
 * kernel set, naming values, ranks and hosts, allows mixed kernels only when
 * asked, notes thread differences, and bounds its messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <cmocka.h>

#include "core/moe.h"
#include "core/platform.h"

static void fill(moe_platform *p, const char *host, const char *core, int threads)
{
    memset(p, 0, sizeof *p);
    snprintf(p->version, sizeof p->version, "0.1.0");
    snprintf(p->blas_core, sizeof p->blas_core, "%s", core);
    snprintf(p->blas_config, sizeof p->blas_config, "OpenBLAS 0.3.21 DYNAMIC_ARCH %s", core);
    snprintf(p->host, sizeof p->host, "%s", host);
    p->blas_threads = threads;
}

static void test_get_matches_openblas(void **state)
{
    (void)state;
    moe_platform p;
    moe_platform_get(&p);
    assert_string_equal(p.version, MOE_VERSION);
    assert_string_equal(p.blas_core, openblas_get_corename());
    assert_int_equal(p.blas_threads, openblas_get_num_threads());
    assert_non_null(strstr(p.blas_config, openblas_get_corename()));
    assert_true(p.host[0] != '\0');
    /* A job of copies of this process passes silently. */
    moe_platform all[3] = {p, p, p};
    char note[256] = "x";
    assert_int_equal(moe_platform_check(all, 3, 0, note, sizeof note), MOE_OK);
    assert_string_equal(note, "");
}

static void test_kernel_mismatch_names_ranks_and_hosts(void **state)
{
    (void)state;
    moe_platform all[4];
    fill(&all[0], "node1", "Haswell", 1);
    fill(&all[1], "node1", "Haswell", 1);
    fill(&all[2], "node2", "SkylakeX", 1);
    fill(&all[3], "node2", "SkylakeX", 1);
    char note[512];
    moe_error_clear();
    assert_int_equal(moe_platform_check(all, 4, 0, note, sizeof note), MOE_ERR_MISMATCH);
    const char *d = moe_error_detail();
    assert_non_null(strstr(d, "BLAS kernels differ"));
    assert_non_null(strstr(d, "'Haswell' on ranks 0-1 (node1)"));
    assert_non_null(strstr(d, "'SkylakeX' on ranks 2-3 (node2)"));
    assert_non_null(strstr(d, "OPENBLAS_CORETYPE"));
    assert_non_null(strstr(d, "--allow_mixed_kernels"));
    assert_string_equal(note, "");

    /* Allowed: OK, and the same facts as a warning. */
    moe_error_clear();
    assert_int_equal(moe_platform_check(all, 4, 1, note, sizeof note), MOE_OK);
    assert_non_null(strstr(note, "warning: BLAS kernels differ"));
    assert_non_null(strstr(note, "'SkylakeX' on ranks 2-3 (node2)"));
    assert_non_null(strstr(note, "allowed by --allow_mixed_kernels"));
}

static void test_build_mismatch_same_core(void **state)
{
    (void)state;
    moe_platform all[2];
    fill(&all[0], "a", "Haswell", 1);
    fill(&all[1], "b", "Haswell", 1);
    snprintf(all[1].blas_config, sizeof all[1].blas_config, "OpenBLAS 0.3.26 DYNAMIC_ARCH Haswell");
    assert_int_equal(moe_platform_check(all, 2, 0, NULL, 0), MOE_ERR_MISMATCH);
    assert_non_null(strstr(moe_error_detail(), "OpenBLAS builds differ"));
    assert_non_null(strstr(moe_error_detail(), "'OpenBLAS 0.3.26 DYNAMIC_ARCH Haswell' on rank 1 (b)"));
}

static void test_version_mismatch_not_allowable(void **state)
{
    (void)state;
    moe_platform all[3];
    fill(&all[0], "a", "Haswell", 1);
    fill(&all[1], "b", "Haswell", 1);
    fill(&all[2], "c", "SkylakeX", 1);
    snprintf(all[1].version, sizeof all[1].version, "0.2.0");
    char note[256];
    /* Versions are checked first and --allow_mixed_kernels does not cover them. */
    assert_int_equal(moe_platform_check(all, 3, 1, note, sizeof note), MOE_ERR_MISMATCH);
    const char *d = moe_error_detail();
    assert_non_null(strstr(d, "moerun versions differ"));
    assert_non_null(strstr(d, "'0.1.0' on ranks 0,2 (a, c)"));
    assert_non_null(strstr(d, "'0.2.0' on rank 1 (b)"));
}

static void test_threads_noted_not_fatal(void **state)
{
    (void)state;
    moe_platform all[3];
    fill(&all[0], "a", "Haswell", 2);
    fill(&all[1], "a", "Haswell", 2);
    fill(&all[2], "b", "Haswell", 4);
    char note[256];
    assert_int_equal(moe_platform_check(all, 3, 0, note, sizeof note), MOE_OK);
    assert_non_null(strstr(note, "BLAS threads differ"));
    assert_non_null(strstr(note, "4 on rank 2 (b)"));
    char line[256];
    moe_platform_summary(line, sizeof line, all, 3);
    assert_string_equal(line, "3 ranks on 2 hosts (a: ranks 0-1, b: rank 2); OpenBLAS Haswell, 2-4 threads; moe 0.1.0");
    assert_int_equal(moe_platform_n_hosts(all, 3), 2);
}

static void test_many_ranks_bounded(void **state)
{
    (void)state;
    /* 4096 ranks on 512 hosts, every other host on another kernel set:
     * messages stay within their buffers and stay readable. */
    const int n = 4096;
    moe_platform *all = malloc((size_t)n * sizeof *all);
    assert_non_null(all);
    for (int r = 0; r < n; r++) {
        char host[32];
        snprintf(host, sizeof host, "node%04d", r / 8);
        fill(&all[r], host, (r / 8) % 2 ? "SkylakeX" : "Haswell", 1);
    }
    char note[64];
    assert_int_equal(moe_platform_check(all, n, 1, note, sizeof note), MOE_OK);
    assert_true(strlen(note) < sizeof note);
    assert_int_equal(moe_platform_check(all, n, 0, NULL, 0), MOE_ERR_MISMATCH);
    const char *d = moe_error_detail();
    assert_true(strlen(d) < 1024);
    assert_non_null(strstr(d, "'Haswell' on ranks 0-7,16-23,"));
    assert_non_null(strstr(d, ",...")); /* ranges cut after 8 */
    assert_non_null(strstr(d, "node0000, node0002, node0004 +"));
    char line[128];
    moe_platform_summary(line, sizeof line, all, n);
    assert_true(strlen(line) < sizeof line);
    assert_int_equal(strncmp(line, "4096 ranks on 512 hosts (node0000: ranks 0-7", 44), 0);
    free(all);
    assert_int_equal(moe_platform_check(NULL, 0, 0, NULL, 0), MOE_ERR_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_matches_openblas),
        cmocka_unit_test(test_kernel_mismatch_names_ranks_and_hosts),
        cmocka_unit_test(test_build_mismatch_same_core),
        cmocka_unit_test(test_version_mismatch_not_allowable),
        cmocka_unit_test(test_threads_noted_not_fatal),
        cmocka_unit_test(test_many_ranks_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
