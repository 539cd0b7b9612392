/* comm: the one-process communicator, in a process that never initialises
 * MPI. Every collective is local and exact, and the token exchange hands
 * the packed rows to the experts without a copy (the receive layout is the
 * send layout), so callers need no single-process branch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "comm/comm.h"

static void test_collectives(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create_self(&c), MOE_OK);
    assert_false(moe_comm_initialized());
    assert_int_equal(moe_comm_size(c), 1);
    assert_int_equal(moe_comm_rank(c), 0);
    assert_int_equal(moe_comm_ep_size(c), 1);
    assert_int_equal(moe_comm_ep_rank(c), 0);
    assert_int_equal(moe_comm_n_replicas(c), 1);
    assert_int_equal(moe_comm_replica(c), 0);
    assert_int_equal(moe_comm_barrier(c), MOE_OK);
    assert_int_equal(moe_comm_agree(c, MOE_OK), MOE_OK);
    assert_int_equal(moe_comm_agree(c, MOE_ERR_NONFINITE), MOE_ERR_NONFINITE);
    moe_errorf(MOE_ERR_IO, "the cause");
    assert_int_equal(moe_comm_agree_detail(c, MOE_SCOPE_WORLD, MOE_ERR_IO), MOE_ERR_IO);
    assert_string_equal(moe_error_detail(), "the cause");
    for (int s = 0; s < 3; s++)
        assert_int_equal(moe_comm_agree_scope(c, (moe_comm_scope)s, MOE_ERR_ARG), MOE_ERR_ARG);
    float f[3] = {1.5f, -2.0f, 3.25f};
    double d[2] = {0.1, 7.0};
    int64_t i[2] = {-3, 5};
    assert_int_equal(moe_comm_allreduce_f32(c, MOE_SCOPE_WORLD, f, 3), MOE_OK);
    assert_int_equal(moe_comm_allreduce_f64(c, MOE_SCOPE_REPLICA, d, 2), MOE_OK);
    assert_int_equal(moe_comm_allreduce_i64(c, MOE_SCOPE_EP, i, 2), MOE_OK);
    assert_int_equal(moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, d, 2), MOE_OK);
    assert_true(f[0] == 1.5f && f[1] == -2.0f && f[2] == 3.25f);
    assert_true(d[0] == 0.1 && d[1] == 7.0 && i[0] == -3 && i[1] == 5);
    assert_int_equal(moe_comm_allreduce_f32(c, (moe_comm_scope)7, f, 3), MOE_ERR_ARG);
    char text[] = "same everywhere", out[sizeof text] = {0};
    assert_int_equal(moe_comm_check_same(c, "text", text, sizeof text), MOE_OK);
    assert_int_equal(moe_comm_bcast(c, text, sizeof text, 0), MOE_OK);
    assert_int_equal(moe_comm_bcast(c, text, sizeof text, 1), MOE_ERR_ARG);
    assert_int_equal(moe_comm_allgather(c, out, text, sizeof text), MOE_OK);
    assert_string_equal(out, "same everywhere");
    moe_comm_destroy(c);
    /* The shared instance is the same thing and survives destroy. */
    moe_comm *s = moe_comm_self();
    moe_comm_destroy(s);
    assert_int_equal(moe_comm_size(moe_comm_self()), 1);
    assert_int_equal(moe_comm_agree(moe_comm_self(), MOE_ERR_MPI), MOE_ERR_MPI);
}

enum { EL = 3, WIDTH = 4 };

typedef struct {
    const int *off;
    int calls;
} ctx;

/* out = in + 1, over the rows of experts [j0, j1). */
static moe_status plus_one(void *p, int j0, int j1, const float *in, float *out)
{
    ctx *c = p;
    c->calls++;
    for (int r = c->off[j0]; r < c->off[j1]; r++)
        for (int k = 0; k < WIDTH; k++) out[(size_t)r * WIDTH + k] = in[(size_t)r * WIDTH + k] + 1;
    return MOE_OK;
}

static moe_status fails(void *p, int j0, int j1, const float *in, float *out)
{
    (void)p, (void)j0, (void)j1, (void)in, (void)out;
    return moe_errorf(MOE_ERR_NONFINITE, "experts failed");
}

static void test_exchange(void **state)
{
    (void)state;
    for (int kind = 0; kind < 2; kind++) {
        for (int chunks = 1; chunks <= 3; chunks += 2) {
            moe_a2a *a = NULL;
            assert_int_equal(moe_a2a_create(&a, moe_comm_self(), EL, (moe_a2a_kind)kind, chunks), MOE_OK);
            const int rows[EL] = {2, 0, 3};
            assert_int_equal(moe_a2a_set_counts(a, rows, MOE_OK, WIDTH), MOE_OK);
            assert_int_equal(moe_a2a_send_total(a), 5);
            assert_int_equal(moe_a2a_recv_total(a), 5);
            assert_null(moe_a2a_shm_buffer(a)); /* no window on one rank */
            const int *off = moe_a2a_recv_expert_offsets(a);
            assert_true(off[0] == 0 && off[1] == 2 && off[2] == 2 && off[3] == 5);
            moe_a2a_buffers fb, bb;
            assert_int_equal(moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &fb), MOE_OK);
            assert_int_equal(moe_a2a_buffers_get(a, MOE_A2A_BACKWARD, &bb), MOE_OK);
            /* No copy: the experts read the packed rows, the results stay put. */
            assert_ptr_equal(fb.recv, fb.send);
            assert_ptr_equal(fb.back, fb.out);
            assert_ptr_not_equal(fb.out, fb.recv);
            for (int k = 0; k < 5 * WIDTH; k++) fb.send[k] = (float)k;
            ctx cx = {off, 0};
            assert_int_equal(moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH, WIDTH, plus_one, &cx, MOE_OK), MOE_OK);
            assert_int_equal(cx.calls, 1);
            for (int k = 0; k < 5 * WIDTH; k++) assert_true(fb.back[k] == (float)k + 1);
            /* Backward, in place on the forward results. */
            for (int k = 0; k < 5 * WIDTH; k++) bb.send[k] = 2 * fb.back[k];
            assert_int_equal(moe_a2a_exchange(a, MOE_A2A_BACKWARD, WIDTH, WIDTH, plus_one, &cx, MOE_OK), MOE_OK);
            for (int k = 0; k < 5 * WIDTH; k++) assert_true(bb.back[k] == 2 * ((float)k + 1) + 1);
            for (int k = 0; k < 5 * WIDTH; k++) assert_true(fb.recv[k] == (float)k); /* inputs kept */
            /* Failures: the caller's, then the experts'. */
            assert_int_equal(moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH, WIDTH, plus_one, &cx, MOE_ERR_NOMEM),
                             MOE_ERR_NOMEM);
            assert_int_equal(cx.calls, 2);
            assert_int_equal(moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH, WIDTH, fails, NULL, MOE_OK),
                             MOE_ERR_NONFINITE);
            assert_int_equal(moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH + 1, WIDTH, plus_one, &cx, MOE_OK),
                             MOE_ERR_ARG);
            /* The primitives copy between caller buffers. */
            float send[5 * WIDTH], recv[5 * WIDTH], back[5 * WIDTH];
            for (int k = 0; k < 5 * WIDTH; k++) send[k] = (float)(3 * k);
            assert_int_equal(moe_a2a_dispatch(a, recv, send, WIDTH), MOE_OK);
            assert_int_equal(moe_a2a_return(a, back, recv, WIDTH), MOE_OK);
            assert_memory_equal(back, send, sizeof send);
            /* A failed plan voids the buffers. */
            assert_int_equal(moe_a2a_set_counts(a, rows, MOE_ERR_ARG, WIDTH), MOE_ERR_ARG);
            assert_int_equal(moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &fb), MOE_ERR_ARG);
            moe_a2a_destroy(a);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_collectives),
        cmocka_unit_test(test_exchange),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
