/* The growing text buffer (core/strbuf.h): appends across many doublings
 * keep every byte and the terminating NUL, embedded NULs pass through put,
 * and once `bad` is set (an allocation failure, or the caller's) appends do
 * nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/strbuf.h"

static void test_appends(void **state)
{
    (void)state;
    moe_strbuf b = {0};
    moe_strbuf_puts(&b, "");
    assert_int_equal(b.n, 0);
    assert_string_equal(b.p, "");
    /* 10000 lines of "line N\n": past several doublings of the first 4096 bytes */
    char want[100000];
    size_t n = 0;
    for (int i = 0; i < 10000; i++) {
        char line[32];
        const int k = snprintf(line, sizeof line, "line %d\n", i);
        memcpy(want + n, line, (size_t)k);
        n += (size_t)k;
        moe_strbuf_puts(&b, line);
    }
    assert_false(b.bad);
    assert_int_equal(b.n, n);
    assert_true(b.cap > b.n);
    assert_memory_equal(b.p, want, n);
    assert_int_equal(b.p[b.n], '\0');
    moe_strbuf_put(&b, "a\0b", 3); /* bytes, not a string */
    assert_int_equal(b.n, n + 3);
    assert_memory_equal(b.p + n, "a\0b", 3);
    free(b.p);
}

static void test_bad_stops_appends(void **state)
{
    (void)state;
    moe_strbuf b = {0};
    moe_strbuf_puts(&b, "kept");
    b.bad = 1;
    moe_strbuf_puts(&b, " dropped");
    assert_int_equal(b.n, 4);
    assert_string_equal(b.p, "kept");
    free(b.p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_appends),
        cmocka_unit_test(test_bad_stops_appends),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
