/* Fork-join regions (core/par.h) on the persistent pool: every share runs
 * exactly once on its own thread, OpenBLAS is on one thread inside and
 * restored after, back-to-back regions of different sizes, a region opened
 * inside a region or from a second thread while the pool is busy (they start
 * threads of their own), and regions in a forked child (no pool there). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <cblas.h>

#include "core/par.h"

typedef struct {
    int runs[MOE_PAR_MAX_THREADS]; /* times share t ran */
    pthread_t who[MOE_PAR_MAX_THREADS];
    int blas[MOE_PAR_MAX_THREADS]; /* OpenBLAS threads seen by share t */
    int nt_seen;
    int nested;                    /* open a region inside share 0 */
    int nested_ok;
} region;

static void share(void *ctx, int t, int nt)
{
    region *r = ctx;
    __atomic_add_fetch(&r->runs[t], 1, __ATOMIC_RELAXED);
    r->who[t] = pthread_self();
    r->blas[t] = openblas_get_num_threads();
    r->nt_seen = nt;
    if (r->nested && t == 0) {
        region in = {0};
        moe_par_run(2, share, &in);
        r->nested_ok = in.runs[0] == 1 && in.runs[1] == 1 && !pthread_equal(in.who[0], in.who[1]);
    }
}

/* Each share once, on distinct threads, share 0 on the caller; OpenBLAS at
 * one thread inside unless blas_any (regions opened concurrently: the
 * OpenBLAS thread count is process-wide, another region's restore may show). */
static void check_region_blas(const region *r, int nt, int blas_any)
{
    assert_int_equal(r->nt_seen, nt);
    for (int t = 0; t < MOE_PAR_MAX_THREADS; t++) assert_int_equal(r->runs[t], t < nt);
    assert_true(pthread_equal(r->who[0], pthread_self()));
    for (int t = 0; t < nt; t++) {
        if (!blas_any) assert_int_equal(r->blas[t], 1);
        for (int u = 0; u < t; u++) assert_false(pthread_equal(r->who[t], r->who[u]));
    }
}

static void check_region(const region *r, int nt) { check_region_blas(r, nt, 0); }

static void test_regions(void **state)
{
    (void)state;
    const int saved = openblas_get_num_threads();
    openblas_set_num_threads(4);
    for (int round = 0; round < 200; round++) {
        const int nt = 2 + round % (MOE_PAR_MAX_THREADS - 1);
        region r = {0};
        moe_par_run(nt, share, &r);
        check_region(&r, nt);
        assert_int_equal(openblas_get_num_threads(), 4);
    }
    region one = {0};
    moe_par_run(1, share, &one); /* one thread: the caller, OpenBLAS untouched */
    assert_int_equal(one.runs[0], 1);
    assert_int_equal(one.blas[0], 4);
    openblas_set_num_threads(saved);
}

static void test_nested(void **state)
{
    (void)state;
    region r = {.nested = 1};
    moe_par_run(3, share, &r);
    check_region(&r, 3);
    assert_true(r.nested_ok);
}

static void *second_caller(void *arg)
{
    region *rs = arg;
    for (int i = 0; i < 100; i++) {
        memset(&rs[i], 0, sizeof rs[i]);
        moe_par_run(2, share, &rs[i]);
    }
    return NULL;
}

/* Two threads opening regions at the same time: each region still runs
 * each of its shares once. */
static void test_concurrent(void **state)
{
    (void)state;
    static region a[100], b[100];
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, second_caller, b), 0);
    for (int i = 0; i < 100; i++) {
        memset(&a[i], 0, sizeof a[i]);
        moe_par_run(3, share, &a[i]);
        check_region_blas(&a[i], 3, 1);
    }
    pthread_join(th, NULL);
    for (int i = 0; i < 100; i++)
        for (int t = 0; t < MOE_PAR_MAX_THREADS; t++) assert_int_equal(b[i].runs[t], t < 2);
}

/* A share that outlasts the spin (the caller then sleeps until the worker
 * wakes it), gaps between regions that outlast it (the workers sleep and
 * are woken), and regions of fewer threads between larger ones (the
 * workers not needed sleep at once): every share still runs once, and what
 * a worker wrote is seen by the caller after the region. */
typedef struct {
    int slow_t; /* this share sleeps past the spin */
    long sum[MOE_PAR_MAX_THREADS];
    int runs[MOE_PAR_MAX_THREADS];
} timed_region;

static void pause_ns(long ns)
{
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    nanosleep(&ts, NULL);
}

static void timed_share(void *ctx, int t, int nt)
{
    (void)nt;
    timed_region *r = ctx;
    if (t == r->slow_t) pause_ns(2 * MOE_PAR_SPIN_NS);
    long s = 0;
    for (int i = 0; i <= 1000 * (t + 1); i++) s += i;
    r->sum[t] = s; /* plain store: published by the end of the region */
    r->runs[t]++;
}

static void test_spin_and_sleep(void **state)
{
    (void)state;
    const int saved = openblas_get_num_threads();
    openblas_set_num_threads(4);
    for (int round = 0; round < 120; round++) {
        const int nt = 1 + (round * 7) % 4;
        timed_region r = {.slow_t = round % 3 == 0 ? round % nt : -1};
        moe_par_run(nt, timed_share, &r);
        for (int t = 0; t < MOE_PAR_MAX_THREADS; t++) {
            assert_int_equal(r.runs[t], t < nt);
            if (t < nt) assert_int_equal(r.sum[t], 1000L * (t + 1) * (1000L * (t + 1) + 1) / 2);
        }
        if (round % 4 == 1) pause_ns(3 * MOE_PAR_SPIN_NS); /* the workers fall asleep */
    }
    openblas_set_num_threads(saved);
}

/* A forked child has no pool workers: its regions must still complete. */
static void test_fork(void **state)
{
    (void)state;
    region r = {0};
    moe_par_run(2, share, &r); /* the pool exists in the parent */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        region c = {0};
        alarm(20); /* a hang ends the child with a signal */
        moe_par_run(2, share, &c);
        _exit(c.runs[0] == 1 && c.runs[1] == 1 ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_regions),
        cmocka_unit_test(test_nested),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_spin_and_sleep),
        cmocka_unit_test(test_fork),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
