/* comm: communicator placement (docs/routing.md section 8), the small collectives, and
 * the token exchange (layouts, both kinds, chunked round trips, trip buffers, empty senders
 * and experts, error agreement, overflow; the token-level trips against a one-thread
 * reference at 1-4 threads). Runs at any number of ranks:
 * every rank runs every test; only rank 0 prints the progress, failures are
 * printed by the rank that sees them and make the exit code non-zero.
 * Checks are taken after a test's collectives so that a failing rank does
 * not leave the others waiting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cblas.h>

#include "comm/comm_h5.h"
#include "comm/comm_mpi.h"
#include "core/par.h"

static int W, R; /* world size and rank */
static moe_comm *comm_of_test; /* the communicator of the exchange run_step drives */

/* ---- placement and small collectives ---- */

static void gather_members(MPI_Comm comm, int *members)
{
    MPI_Allgather(&R, 1, MPI_INT, members, 1, MPI_INT, comm);
}

static void test_placement(void **state)
{
    (void)state;
    for (int P = 1; P <= W; P++) {
        if (W % P) continue;
        moe_comm *c = NULL;
        assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, P == W ? 0 : P), MOE_OK);
        const int g = R / P, r = R % P;
        int ep_members[64], rep_members[64], n_ep = 0, n_rep = 0;
        MPI_Comm_size(moe_comm_mpi(c, MOE_SCOPE_EP), &n_ep);
        MPI_Comm_size(moe_comm_mpi(c, MOE_SCOPE_REPLICA), &n_rep);
        gather_members(moe_comm_mpi(c, MOE_SCOPE_EP), ep_members);
        gather_members(moe_comm_mpi(c, MOE_SCOPE_REPLICA), rep_members);
        int64_t ep_sum = R, rep_sum = R;
        assert_int_equal(moe_comm_allreduce_i64(c, MOE_SCOPE_EP, &ep_sum, 1), MOE_OK);
        assert_int_equal(moe_comm_allreduce_i64(c, MOE_SCOPE_REPLICA, &rep_sum, 1), MOE_OK);
        double mx = R;
        assert_int_equal(moe_comm_allmax_f64(c, MOE_SCOPE_EP, &mx, 1), MOE_OK);

        assert_int_equal(moe_comm_rank(c), R);
        assert_int_equal(moe_comm_size(c), W);
        assert_int_equal(moe_comm_ep_size(c), P);
        assert_int_equal(moe_comm_ep_rank(c), r);
        assert_int_equal(moe_comm_replica(c), g);
        assert_int_equal(moe_comm_n_replicas(c), W / P);
        assert_int_equal(n_ep, P);
        assert_int_equal(n_rep, W / P);
        for (int i = 0; i < P; i++) assert_int_equal(ep_members[i], g * P + i);
        for (int i = 0; i < W / P; i++) assert_int_equal(rep_members[i], i * P + r);
        assert_int_equal(ep_sum, (int64_t)g * P * P + (int64_t)P * (P - 1) / 2);
        assert_int_equal(rep_sum, (int64_t)P * (W / P) * (W / P - 1) / 2 + (int64_t)r * (W / P));
        assert_true(mx == g * P + P - 1);
        moe_comm_destroy(c);
    }
    /* Nodes: this machine is one node, unless MOE_NODE_RANKS cuts it into
     * nodes of that many consecutive ranks. */
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    const char *knob = getenv("MOE_NODE_RANKS");
    const int nr = knob && *knob ? atoi(knob) : 0;
    assert_int_equal(moe_comm_n_nodes(c), nr > 0 ? (W + nr - 1) / nr : 1);
    for (int w = 0; w < W; w++) assert_int_equal(moe_comm_node_of(c, w), nr > 0 ? w / nr : 0);
    moe_comm_destroy(c);
    assert_int_equal(moe_comm_n_nodes(moe_comm_self()), 1);
    assert_int_equal(moe_comm_node_of(moe_comm_self(), 0), 0);
    c = (moe_comm *)&W;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, W + 1), MOE_ERR_ARG);
    assert_null(c);
    assert_non_null(strstr(moe_error_detail(), "ep_size"));
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, -1), MOE_ERR_ARG);
}

static void test_collectives(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    float f[3] = {(float)R, 1.0f, 0.5f};
    double d[2] = {(double)R * R, -1.0};
    int64_t big = (int64_t)R << 40;
    char msg[16] = {0}, all[64 * 4];
    if (R == W - 1) strcpy(msg, "from-last");
    const int mine = 1000 + R;
    assert_int_equal(moe_comm_allreduce_f32(c, MOE_SCOPE_WORLD, f, 3), MOE_OK);
    assert_int_equal(moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, d, 2), MOE_OK);
    assert_int_equal(moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, &big, 1), MOE_OK);
    assert_int_equal(moe_comm_bcast(c, msg, sizeof msg, W - 1), MOE_OK);
    assert_int_equal(moe_comm_allgather(c, all, &mine, sizeof mine), MOE_OK);
    assert_int_equal(moe_comm_barrier(c), MOE_OK);
    /* Local argument errors, same on every rank. */
    assert_int_equal(moe_comm_bcast(c, msg, 1, W), MOE_ERR_ARG);
    assert_int_equal(moe_comm_allreduce_f32(c, (moe_comm_scope)7, f, 1), MOE_ERR_ARG);

    assert_true(f[0] == (float)(W * (W - 1) / 2));
    assert_true(f[1] == (float)W && f[2] == 0.5f * W);
    double sq = 0;
    for (int i = 0; i < W; i++) sq += (double)i * i;
    assert_true(d[0] == sq && d[1] == -W);
    assert_int_equal(big, ((int64_t)W * (W - 1) / 2) << 40);
    assert_string_equal(msg, "from-last");
    for (int i = 0; i < W; i++) {
        int v;
        memcpy(&v, all + i * sizeof v, sizeof v);
        assert_int_equal(v, 1000 + i);
    }
    moe_comm_destroy(c);
}

static void test_check_same_and_agree(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    double cfg[4] = {1, 2, 3, 4};
    moe_status same = moe_comm_check_same(c, "test config", cfg, sizeof cfg);
    if (R == W - 1) cfg[2] = 3.5;
    moe_status diff = moe_comm_check_same(c, "test config", cfg, sizeof cfg);
    char diff_detail[256];
    snprintf(diff_detail, sizeof diff_detail, "%s", moe_error_detail());
    moe_status len = moe_comm_check_same(c, "test sizes", cfg, R == W - 1 ? 3 * sizeof(double) : sizeof cfg);
    char len_detail[256];
    snprintf(len_detail, sizeof len_detail, "%s", moe_error_detail());
    moe_status ok = moe_comm_agree(c, MOE_OK);
    moe_status ag = moe_comm_agree(c, R == W - 1 ? MOE_ERR_NONFINITE : MOE_OK);
    char ag_detail[256];
    snprintf(ag_detail, sizeof ag_detail, "%s", moe_error_detail());
    /* Agreement carrying the cause: rank W-1 has an I/O error, rank 0 an
     * argument error (lower), the others relay: everybody gets the I/O
     * error with its detail; moe_comm_cause_rank names the same rank. */
    moe_status mine = R == W - 1 ? moe_errorf(MOE_ERR_IO, "disk full on the last rank")
                      : R == 0   ? moe_errorf(MOE_ERR_ARG, "bad argument on rank 0")
                                 : moe_errorf(MOE_ERR_REMOTE, "relayed");
    const int cause = moe_comm_cause_rank(c, MOE_SCOPE_WORLD, mine);
    moe_status det = moe_comm_agree_detail(c, MOE_SCOPE_WORLD, mine);
    char det_detail[256];
    snprintf(det_detail, sizeof det_detail, "%s", moe_error_detail());
    const int none = moe_comm_cause_rank(c, MOE_SCOPE_WORLD, MOE_OK);
    moe_status det_ok = moe_comm_agree_detail(c, MOE_SCOPE_EP, MOE_OK);
    moe_comm_destroy(c);
    assert_int_equal(cause, W - 1);
    assert_int_equal(none, -1);
    assert_int_equal(det_ok, MOE_OK);
    assert_int_equal(det, MOE_ERR_IO);
    assert_non_null(strstr(det_detail, "disk full on the last rank"));
    if (W > 1) {
        char who[32];
        snprintf(who, sizeof who, "rank %d: ", W - 1);
        assert_non_null(strstr(det_detail, who));
    }

    char want[32];
    snprintf(want, sizeof want, "rank %d", W - 1);
    assert_int_equal(same, MOE_OK);
    assert_int_equal(ok, MOE_OK);
    if (W == 1) {
        /* Nobody to differ from. */
        assert_int_equal(diff, MOE_OK);
        assert_int_equal(len, MOE_OK);
        assert_int_equal(ag, MOE_ERR_NONFINITE);
        return;
    }
    assert_int_equal(diff, MOE_ERR_MISMATCH);
    assert_non_null(strstr(diff_detail, "test config"));
    assert_non_null(strstr(diff_detail, want));
    assert_int_equal(len, MOE_ERR_MISMATCH);
    assert_non_null(strstr(len_detail, "test sizes"));
    assert_non_null(strstr(len_detail, want));
    assert_non_null(strstr(len_detail, "24 bytes"));
    if (R == W - 1) {
        assert_int_equal(ag, MOE_ERR_NONFINITE);
    } else {
        assert_int_equal(ag, MOE_ERR_REMOTE);
        assert_non_null(strstr(ag_detail, want));
        assert_non_null(strstr(ag_detail, "non-finite"));
    }
}

static void test_h5_properties(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    char path[64];
    snprintf(path, sizeof path, "test_comm_h5_np%d.h5", W);
    hid_t fapl = moe_comm_h5_fapl(c), dxpl = moe_comm_h5_dxpl(c);
    assert_true(fapl >= 0 && dxpl >= 0);
    /* Each rank writes its own element of a shared dataset collectively. */
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    hsize_t n = (hsize_t)W, one = 1, at = (hsize_t)R;
    hid_t space = H5Screate_simple(1, &n, NULL), mem = H5Screate_simple(1, &one, NULL);
    hid_t ds = H5Dcreate2(f, "ranks", H5T_NATIVE_INT, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Sselect_hyperslab(space, H5S_SELECT_SET, &at, NULL, &one, NULL);
    herr_t wr = H5Dwrite(ds, H5T_NATIVE_INT, mem, space, dxpl, &R);
    H5Dclose(ds);
    H5Sclose(mem);
    H5Sclose(space);
    H5Fclose(f);
    int back[64] = {0};
    hid_t f2 = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    hid_t ds2 = H5Dopen2(f2, "ranks", H5P_DEFAULT);
    herr_t rd = H5Dread(ds2, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, dxpl, back);
    H5Dclose(ds2);
    H5Fclose(f2);
    H5Pclose(fapl);
    H5Pclose(dxpl);
    MPI_Barrier(MPI_COMM_WORLD);
    if (R == 0) remove(path);
    moe_comm_destroy(c);
    hid_t serial = moe_comm_h5_fapl(NULL);
    assert_true(serial >= 0);
    assert_int_equal(H5Pget_driver(serial), H5FD_SEC2);
    H5Pclose(serial);
    assert_true(f >= 0 && wr >= 0 && rd >= 0);
    for (int i = 0; i < W; i++) assert_int_equal(back[i], i);
}

/* ---- token exchange ---- */

enum { EL = 3, WIDTH = 5, MAX_WIDTH = 7, OUT_WIDTH = 3 };

/* Rows that source s sends to local expert j of ep rank p, per scenario. */
typedef enum { GENERAL, SILENT_RANK0, ALL_REMOTE, EMPTY_EXPERT, LARGE, N_SCENARIOS } scenario;
static const char *scenario_name[] = {"general", "rank 0 sends nothing", "no rows to self",
                                      "expert 0 receives nothing", "large (window growth)"};

static int rows_for(scenario sc, int s, int p, int j, int P)
{
    switch (sc) {
    case GENERAL: return (3 * s + 5 * p + 7 * j + 1) % 5; /* includes zeros */
    case SILENT_RANK0: return s == 0 ? 0 : 1 + (s + 2 * p + j) % 3;
    case ALL_REMOTE: return s == p && P > 1 ? 0 : 2 + (s + p + j) % 3;
    case EMPTY_EXPERT: return j == 0 ? 0 : 1 + (s * p + j) % 4;
    default: return 200 + (s * 31 + p * 17 + j * 13) % 40;
    }
}

/* Content of column col of row r of the block (s -> p, j): a 20-bit
 * integer, exact in float, and 2 v + 1 too. */
static float value(int s, int p, int j, int r, int col)
{
    uint32_t h = (uint32_t)s * 0x9E3779B1u ^ (uint32_t)p * 0x85EBCA77u ^ (uint32_t)j * 0xC2B2AE3Du ^
                 (uint32_t)r * 0x27D4EB2Fu ^ (uint32_t)col * 0x165667B1u;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    return (float)(h & 0xFFFFFu);
}

typedef struct {
    const int *eoff;   /* (EL + 1) */
    int next_j;        /* chunks must arrive in order and cover [0, EL) */
    int in_order;
    int in_w, out_w;   /* row widths of in and out */
} expert_ctx;

/* The "experts": out = 2 x + 1 on the first out_w columns (in place when
 * out == in and the widths agree: each element is read before written). */
static moe_status fake_experts(void *p, int j0, int j1, const float *in, float *out)
{
    expert_ctx *e = p;
    e->in_order &= j0 == e->next_j && j1 > j0;
    e->next_j = j1;
    for (int i = e->eoff[j0]; i < e->eoff[j1]; i++)
        for (int c = 0; c < e->out_w; c++) out[(size_t)i * e->out_w + c] = 2 * in[(size_t)i * e->in_w + c] + 1;
    return MOE_OK;
}

/* One step of one scenario on an existing exchange; returns the receive
 * buffer (caller frees) so that kinds can be compared bitwise. */
static float *run_step(moe_a2a *a, scenario sc, int P, int me)
{
    int send_rows[64 * EL];
    int S = 0, Rt = 0;
    for (int p = 0; p < P; p++)
        for (int j = 0; j < EL; j++) S += send_rows[p * EL + j] = rows_for(sc, me, p, j, P);
    for (int j = 0; j < EL; j++)
        for (int s = 0; s < P; s++) Rt += rows_for(sc, s, me, j, P);
    float *send = malloc(sizeof(float) * ((size_t)S * WIDTH + 1));
    float *recv = calloc((size_t)Rt * WIDTH + 1, sizeof(float));
    float *recv2 = calloc((size_t)Rt * WIDTH + 1, sizeof(float));
    float *out = calloc((size_t)Rt * OUT_WIDTH + 1, sizeof(float));
    float *result = calloc((size_t)S * OUT_WIDTH + 1, sizeof(float));
    float *result2 = calloc((size_t)S * OUT_WIDTH + 1, sizeof(float));
    float *expect = calloc((size_t)Rt * WIDTH + 1, sizeof(float));
    assert_true(send && recv && recv2 && out && result && result2 && expect);
    for (int p = 0, i = 0; p < P; p++)
        for (int j = 0; j < EL; j++)
            for (int r = 0; r < send_rows[p * EL + j]; r++, i++)
                for (int c = 0; c < WIDTH; c++) send[(size_t)i * WIDTH + c] = value(me, p, j, r, c);
    for (int j = 0, i = 0; j < EL; j++)
        for (int s = 0; s < P; s++)
            for (int r = 0; r < rows_for(sc, s, me, j, P); r++, i++)
                for (int c = 0; c < WIDTH; c++) expect[(size_t)i * WIDTH + c] = value(s, me, j, r, c);

    moe_status st_plan = moe_a2a_set_counts(a, send_rows, MOE_OK, MAX_WIDTH);
    moe_a2a_reset_bytes(a);
    moe_status st_disp = moe_a2a_dispatch(a, recv, send, WIDTH);
    expert_ctx e = {moe_a2a_recv_expert_offsets(a), 0, 1, WIDTH, OUT_WIDTH};
    moe_status st_comp = fake_experts(&e, 0, EL, recv, out);
    moe_status st_comb = moe_a2a_return(a, result, out, OUT_WIDTH);
    /* The traffic counter: rows sent to other ranks (dispatch, WIDTH wide)
     * and rows sent back to them (return, OUT_WIDTH wide); across nodes
     * those whose peer is on another node (MOE_NODE_RANKS makes several). */
    const moe_a2a_traffic tr = moe_a2a_bytes(a);
    int64_t want_sent = 0, want_remote = 0;
    for (int q = 0; q < P; q++) {
        if (q == me) continue;
        int64_t b = 0;
        for (int j = 0; j < EL; j++)
            b += (int64_t)rows_for(sc, me, q, j, P) * WIDTH + (int64_t)rows_for(sc, q, me, j, P) * OUT_WIDTH;
        b *= (int64_t)sizeof(float);
        want_sent += b;
        if (moe_comm_node_of(comm_of_test, moe_comm_ep_world_rank(comm_of_test, q)) !=
            moe_comm_node_of(comm_of_test, R))
            want_remote += b;
    }
    /* The round trip on the exchange's own buffers (chunked or not, shm or
     * not): the same bytes. Then the backward trip, in place on the forward
     * results, must leave the forward's receive rows intact. */
    moe_a2a_buffers fb, bb;
    moe_status st_bufs = moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &fb);
    if (st_bufs == MOE_OK) st_bufs = moe_a2a_buffers_get(a, MOE_A2A_BACKWARD, &bb);
    assert_int_equal(st_bufs, MOE_OK);
    memcpy(fb.send, send, sizeof(float) * (size_t)S * WIDTH);
    expert_ctx e2 = {moe_a2a_recv_expert_offsets(a), 0, 1, WIDTH, OUT_WIDTH};
    moe_status st_pipe = moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH, OUT_WIDTH, fake_experts, &e2, MOE_OK);
    memcpy(recv2, fb.recv, sizeof(float) * (size_t)Rt * WIDTH);
    memcpy(result2, fb.back, sizeof(float) * (size_t)S * OUT_WIDTH);
    for (size_t i = 0; i < (size_t)S * OUT_WIDTH; i++) bb.send[i] = fb.back[i]; /* row by row, maybe in place */
    expert_ctx e4 = {moe_a2a_recv_expert_offsets(a), 0, 1, OUT_WIDTH, OUT_WIDTH};
    moe_status st_back = moe_a2a_exchange(a, MOE_A2A_BACKWARD, OUT_WIDTH, OUT_WIDTH, fake_experts, &e4, MOE_OK);
    assert_int_equal(st_back, MOE_OK);
    assert_true(e4.in_order && e4.next_j == EL);
    for (size_t i = 0; i < (size_t)S; i++)
        for (int c = 0; c < OUT_WIDTH; c++)
            if (bb.back[i * OUT_WIDTH + c] != 2 * result2[i * OUT_WIDTH + c] + 1)
                fail_msg("rank %d, %s: backward trip row %zu col %d is wrong", R, scenario_name[sc], i, c);
    if (memcmp(fb.recv, recv2, sizeof(float) * (size_t)Rt * WIDTH))
        fail_msg("rank %d, %s: the backward trip overwrote the forward's receive rows", R, scenario_name[sc]);

    /* Shared-memory kind, rows built in the window: the same bytes again. */
    float *stage = moe_a2a_shm_buffer(a), *recv3 = NULL, *result3 = NULL;
    moe_status st_inpl = MOE_OK;
    if (stage) {
        recv3 = calloc((size_t)Rt * WIDTH + 1, sizeof(float));
        result3 = calloc((size_t)S * OUT_WIDTH + 1, sizeof(float));
        assert_true(recv3 && result3);
        memcpy(stage, send, sizeof(float) * (size_t)S * WIDTH);
        st_inpl = moe_a2a_dispatch(a, recv3, stage, WIDTH);
        memcpy(stage, out, sizeof(float) * (size_t)Rt * OUT_WIDTH);
        if (st_inpl == MOE_OK) st_inpl = moe_a2a_return(a, result3, stage, OUT_WIDTH);
    }

    /* The node-aware kind moves the same rows across nodes (a row-level plan
     * has nothing to merge), in one message per node pair sent by one rank
     * of the node: the totals over the ep group agree, not each rank's. */
    int64_t sums[2] = {tr.sent_remote, want_remote};
    MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_INT64_T, MPI_SUM, moe_comm_mpi(comm_of_test, MOE_SCOPE_EP));
    assert_int_equal(st_plan, MOE_OK);
    if (moe_a2a_kind_of(a) == MOE_A2A_NODE) {
        assert_int_equal(sums[0], sums[1]);
        assert_true(tr.sent >= tr.sent_remote);
    } else {
        assert_int_equal(tr.sent, want_sent);
        assert_int_equal(tr.sent_remote, want_remote);
    }
    assert_int_equal(st_inpl, MOE_OK);
    assert_int_equal(st_disp, MOE_OK);
    assert_int_equal(st_comp, MOE_OK);
    assert_int_equal(st_comb, MOE_OK);
    assert_int_equal(st_pipe, MOE_OK);
    assert_int_equal(moe_a2a_send_total(a), S);
    assert_int_equal(moe_a2a_recv_total(a), Rt);
    const int *eoff = moe_a2a_recv_expert_offsets(a), *rc = moe_a2a_recv_counts(a);
    for (int j = 0, o = 0; j < EL; j++) {
        assert_int_equal(eoff[j], o);
        for (int s = 0; s < P; s++) {
            assert_int_equal(rc[j * P + s], rows_for(sc, s, me, j, P));
            o += rc[j * P + s];
        }
    }
    assert_int_equal(eoff[EL], Rt);
    if (memcmp(recv, expect, sizeof(float) * (size_t)Rt * WIDTH))
        fail_msg("rank %d, %s: receive layout differs from (expert, source, order)", R, scenario_name[sc]);
    for (size_t i = 0; i < (size_t)S; i++)
        for (int c = 0; c < OUT_WIDTH; c++)
            if (result[i * OUT_WIDTH + c] != 2 * send[i * WIDTH + c] + 1)
                fail_msg("rank %d, %s: returned row %zu col %d is wrong", R, scenario_name[sc], i, c);
    assert_true(e2.in_order && e2.next_j == EL);
    assert_memory_equal(recv2, recv, sizeof(float) * (size_t)Rt * WIDTH + 1);
    assert_memory_equal(result2, result, sizeof(float) * (size_t)S * OUT_WIDTH + 1);
    if (stage) {
        assert_memory_equal(recv3, recv, sizeof(float) * (size_t)Rt * WIDTH + 1);
        assert_memory_equal(result3, result, sizeof(float) * (size_t)S * OUT_WIDTH + 1);
    }
    free(recv3);
    free(result3);
    free(send);
    free(recv2);
    free(out);
    free(result);
    free(result2);
    free(expect);
    return recv;
}

/* Every scenario, in sequence on one exchange per (kind, chunks) so that
 * plans shrink and grow, at P = W and (when W is even) P = W / 2. */
static void test_exchange_layouts(void **state)
{
    (void)state;
    const int chunk_counts[] = {1, 2, 3, 5};
    for (int half = 0; half < 2; half++) {
        const int P = half ? W / 2 : W;
        if (half && (W % 2 || P < 1)) continue;
        moe_comm *c = NULL;
        assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, P), MOE_OK);
        const int me = moe_comm_ep_rank(c);
        comm_of_test = c;
        for (int ci = 0; ci < 4; ci++) {
            moe_a2a *a[3] = {NULL, NULL, NULL};
            assert_int_equal(moe_a2a_create(&a[0], c, EL, MOE_A2A_P2P, chunk_counts[ci]), MOE_OK);
            assert_int_equal(moe_a2a_create(&a[1], c, EL, MOE_A2A_SHM, chunk_counts[ci]), MOE_OK);
            assert_int_equal(moe_a2a_create(&a[2], c, EL, MOE_A2A_NODE, chunk_counts[ci]), MOE_OK);
            assert_null(moe_a2a_shm_buffer(a[1])); /* no plan yet */
            const scenario order[] = {GENERAL, LARGE, SILENT_RANK0, ALL_REMOTE, EMPTY_EXPERT, GENERAL};
            for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
                float *r0 = run_step(a[0], order[k], P, me);
                assert_null(moe_a2a_shm_buffer(a[0]));
                for (int x = 1; x < 3; x++) {
                    /* The shared-memory and node-aware paths are bitwise the default one. */
                    float *r1 = run_step(a[x], order[k], P, me);
                    assert_memory_equal(r0, r1, sizeof(float) * (size_t)moe_a2a_recv_total(a[0]) * WIDTH + 1);
                    free(r1);
                }
                free(r0);
            }
            assert_true(moe_a2a_seconds(a[0]) > 0);
            moe_a2a_reset_seconds(a[0]);
            assert_true(moe_a2a_seconds(a[0]) == 0);
            for (int x = 0; x < 3; x++) moe_a2a_destroy(a[x]);
        }
        moe_comm_destroy(c);
    }
}

/* ---- the token-level trips (the layer's use) ---- */

enum { TT = 37, TW = 6, TK = 3 };

/* What the test "experts" need: the receive layout's expert offsets and the row width. */
typedef struct {
    const int *off;
    int w;
} trip_ctx;

/* Forward "experts": out = 2 in + 1; backward: out = 3 in - 1 (in place). */
static moe_status expert_fwd(void *ctx, int j0, int j1, const float *in, float *out)
{
    const trip_ctx *c = ctx;
    for (long i = (long)c->off[j0] * c->w; i < (long)c->off[j1] * c->w; i++) out[i] = 2 * in[i] + 1;
    return MOE_OK;
}
static moe_status expert_bwd(void *ctx, int j0, int j1, const float *in, float *out)
{
    const trip_ctx *c = ctx;
    for (long i = (long)c->off[j0] * c->w; i < (long)c->off[j1] * c->w; i++) out[i] = 3 * in[i] - 1;
    return MOE_OK;
}

static uint32_t mix(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    return h ^ (h >> 16);
}

/* T tokens of width w for this rank (seed sd): token t has 0..TK
 * assignments to distinct destinations, in ascending destination order;
 * weights and rows from a hash. tok_off (T + 1), dest and weight (T * TK),
 * x and dy (T, w). Returns the number of assignments. */
static int make_trip(int *tok_off, int *dest, float *weight, float *x, float *dy, int T, int w, int sd)
{
    const int D = W * EL;
    int n = 0;
    for (int t = 0; t < T; t++) {
        tok_off[t] = n;
        const int k = (int)(mix(0x1234u + (uint32_t)(R * 1000 + t) * 7u + (uint32_t)sd) % (TK + 1));
        int taken[64 * EL] = {0};
        for (int i = 0; i < k && i < D; i++) {
            int d = (int)(mix((uint32_t)(R * 7919 + t * 31 + i * 5 + sd)) % (uint32_t)D);
            while (taken[d]) d = (d + 1) % D;
            taken[d] = 1;
        }
        for (int d = 0; d < D; d++)
            if (taken[d]) {
                dest[n] = d;
                weight[n++] = (float)(mix((uint32_t)(d * 13 + t + R * 101 + sd)) % 1000) / 997.0f;
            }
    }
    tok_off[T] = n;
    for (long i = 0; i < (long)T * w; i++) {
        x[i] = (float)((int)(mix((uint32_t)(i + 17 * R + sd)) % 2001) - 1000) / 128.0f;
        dy[i] = (float)((int)(mix((uint32_t)(3 * i + 5 * R + sd)) % 2001) - 1000) / 256.0f;
    }
    return n;
}

/* The reference: the same operations in combine order, one token after
 * another on one thread. yref, dxref (T, w); dwref (assignments). */
static void trip_ref(float *yref, float *dxref, float *dwref, const int *tok_off, const float *weight,
                     const float *x, const float *dy, int T, int w)
{
    memset(yref, 0, sizeof(float) * (size_t)T * w);
    memset(dxref, 0, sizeof(float) * (size_t)T * w);
    for (int t = 0; t < T; t++)
        for (int i = tok_off[t]; i < tok_off[t + 1]; i++) {
            const float *xt = x + (size_t)t * w, *dyt = dy + (size_t)t * w;
            float *yt = yref + (size_t)t * w, *dxt = dxref + (size_t)t * w;
            float dot = 0.0f;
            for (int q = 0; q < w; q++) {
                const float res = 2 * xt[q] + 1;
                yt[q] += weight[i] * res;
                dot += dyt[q] * res;
            }
            dwref[i] = dot;
            for (int q = 0; q < w; q++) dxt[q] += 3 * (weight[i] * dyt[q]) - 1;
        }
}

/* Forward and backward trips of one kind: y, dw and dx (zeroed here). */
static moe_status run_trips(float *y, float *dw, float *dx, moe_a2a_traffic *traffic, moe_a2a_kind *used, moe_comm *c,
                            int kind, const int *tok_off, const int *dest, const float *weight, const float *x,
                            const float *dy, int T, int w)
{
    moe_a2a *a = NULL;
    assert_int_equal(moe_a2a_create(&a, c, EL, (moe_a2a_kind)kind, 2), MOE_OK);
    const moe_a2a_routing r = {T, tok_off, dest, weight};
    memset(dx, 0, sizeof(float) * (size_t)T * w);
    moe_a2a_reset_bytes(a);
    moe_status st = moe_a2a_plan(a, &r, MOE_OK, 2 * w);
    const trip_ctx ctx = {moe_a2a_recv_expert_offsets(a), w};
    if (st == MOE_OK) st = moe_a2a_forward(a, y, x, w, expert_fwd, (void *)&ctx, MOE_OK);
    if (st == MOE_OK) st = moe_a2a_backward(a, dw, dy, w, expert_bwd, (void *)&ctx, MOE_OK);
    if (st == MOE_OK) moe_a2a_backward_add(a, dx, w);
    *traffic = moe_a2a_bytes(a);
    *used = moe_a2a_kind_of(a);
    moe_a2a_destroy(a);
    return st;
}

/* Every kind, with tokens bound for several experts of one node: the
 * forward's y, the backward's dL/dg and dx equal a reference computed here
 * with the same operations in combine order, bit for bit; the node-aware
 * kind moves fewer bytes across nodes than p2p. */
static void test_token_trips(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    int tok_off[TT + 1], dest[TT * TK];
    float weight[TT * TK], x[TT * TW], dy[TT * TW];
    for (int sd = 0; sd < 3; sd++) {
        const int n = make_trip(tok_off, dest, weight, x, dy, TT, TW, sd);
        float yref[TT * TW], dxref[TT * TW], dwref[TT * TK];
        trip_ref(yref, dxref, dwref, tok_off, weight, x, dy, TT, TW);
        int64_t remote[2] = {0, 0};
        for (int kind = 0; kind < 4; kind++) {
            float y[TT * TW], dx[TT * TW], dw[TT * TK];
            moe_a2a_traffic tr;
            moe_a2a_kind used;
            assert_int_equal(run_trips(y, dw, dx, &tr, &used, c, kind, tok_off, dest, weight, x, dy, TT, TW), MOE_OK);
            if (memcmp(y, yref, sizeof y)) fail_msg("rank %d, kind %d, seed %d: forward y differs", R, kind, sd);
            if (memcmp(dw, dwref, sizeof(float) * (size_t)n)) fail_msg("rank %d, kind %d: dL/dg differs", R, kind);
            if (memcmp(dx, dxref, sizeof dx)) fail_msg("rank %d, kind %d: dx differs", R, kind);
            if (kind == MOE_A2A_P2P || kind == MOE_A2A_NODE) remote[kind == MOE_A2A_NODE] += tr.sent_remote;
            assert_true(used != MOE_A2A_AUTO);
        }
        MPI_Allreduce(MPI_IN_PLACE, remote, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
        assert_true(remote[1] <= remote[0]);
        if (moe_comm_n_nodes(c) > 1) assert_true(remote[1] < remote[0]);
    }
    moe_comm_destroy(c);
}

/* The passes at home (pack, combine, gate gradient, dx accumulation, and
 * the node kind's publish, fan out, home combine and scatter) split over
 * 1, 2, 3 and 4 threads: every kind still gives the one-thread reference's
 * bits. Large enough that every pass splits over 4 threads (about 3K
 * assignments of 256 floats per rank); each token's sums start from 0 and
 * run in combine order, so a pass that summed in another order (per thread
 * partials, expert-major) would fail here. */
enum { PT = 2048, PW = 256, PASS_MIN_FLOATS = 1 << 17 /* A2A_PAR_MIN_FLOATS in comm/a2a_internal.h */ };

static void test_token_trips_threads(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    const size_t tw = (size_t)PT * PW, ta = (size_t)PT * TK;
    int *tok_off = malloc(sizeof(int) * (PT + 1)), *dest = malloc(sizeof(int) * ta);
    float *weight = malloc(sizeof(float) * ta), *dwref = malloc(sizeof(float) * ta), *dw = malloc(sizeof(float) * ta);
    float *x = malloc(sizeof(float) * tw), *dy = malloc(sizeof(float) * tw), *yref = malloc(sizeof(float) * tw),
          *dxref = malloc(sizeof(float) * tw), *y = malloc(sizeof(float) * tw), *dx = malloc(sizeof(float) * tw);
    assert_true(tok_off && dest && weight && dwref && dw && x && dy && yref && dxref && y && dx);
    const int n = make_trip(tok_off, dest, weight, x, dy, PT, PW, 7);
    trip_ref(yref, dxref, dwref, tok_off, weight, x, dy, PT, PW);
    /* Every rank runs every trip; the first difference is reported after them. */
    char bad[160] = "";
    const int threads[] = {1, 2, 3, 4}, saved = openblas_get_num_threads();
    int max_got = 1;
    for (int ti = 0; ti < 4; ti++) {
        openblas_set_num_threads(threads[ti]);
        const int got = moe_par_threads(); /* OpenBLAS may cap below 4 */
        max_got = got > max_got ? got : max_got;
        for (int kind = 0; kind < 4; kind++) {
            moe_a2a_traffic tr;
            moe_a2a_kind used;
            memset(y, 0xff, sizeof(float) * tw); /* NaN: every token row must be written */
            const moe_status st = run_trips(y, dw, dx, &tr, &used, c, kind, tok_off, dest, weight, x, dy, PT, PW);
            const char *what = st != MOE_OK ? "a trip failed"
                               : memcmp(y, yref, sizeof(float) * tw) ? "forward y differs"
                               : memcmp(dw, dwref, sizeof(float) * (size_t)n) ? "dL/dg differs"
                               : memcmp(dx, dxref, sizeof(float) * tw) ? "dx differs" : NULL;
            if (what && !bad[0]) snprintf(bad, sizeof bad, "rank %d, kind %d, %d threads: %s", R, kind, got, what);
        }
    }
    openblas_set_num_threads(saved);
    free(tok_off), free(dest), free(weight), free(dwref), free(dw);
    free(x), free(dy), free(yref), free(dxref), free(y), free(dx);
    moe_comm_destroy(c);
    if (bad[0]) fail_msg("%s", bad);
    assert_true((long)n * PW >= 4L * PASS_MIN_FLOATS);
    assert_true(max_got >= 3); /* the split really ran uneven (3) and wider */
}

static moe_status failing_experts(void *ctx, int j0, int j1, const float *in, float *out)
{
    (void)ctx;
    (void)j1;
    (void)in;
    (void)out;
    return R == W - 1 && j0 == 0 ? moe_errorf(MOE_ERR_NONFINITE, "test experts fail") : MOE_OK;
}

/* Never called: the rank that passes a local failure skips compute, and
 * the others must not run on rows that were never sent either. */
static moe_status fake_experts_unused(void *ctx, int j0, int j1, const float *in, float *out)
{
    (void)ctx, (void)j0, (void)j1, (void)in, (void)out;
    return MOE_OK;
}

/* An error on one rank enters the count exchange: every rank fails, the
 * plan is void (exchanges refuse to run), and the next step works again. */
static void test_exchange_errors(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    char want[32];
    snprintf(want, sizeof want, "rank %d", W - 1);
    for (int kind = 0; kind < 3; kind++) {
        moe_a2a *a = NULL;
        assert_int_equal(moe_a2a_create(&a, c, EL, (moe_a2a_kind)kind, 2), MOE_OK);
        int rows[64 * EL];
        for (int i = 0; i < W * EL; i++) rows[i] = 1;
        float buf[64 * EL * MAX_WIDTH];
        moe_status st = moe_a2a_set_counts(a, rows, R == W - 1 ? MOE_ERR_NONFINITE : MOE_OK, MAX_WIDTH);
        char detail[256];
        snprintf(detail, sizeof detail, "%s", moe_error_detail());
        moe_status st_disp = moe_a2a_dispatch(a, buf, buf, WIDTH);
        if (R == 0) rows[W * EL - 1] = -2;
        moe_status st_neg = moe_a2a_set_counts(a, rows, MOE_OK, MAX_WIDTH);
        rows[W * EL - 1] = 1;
        moe_status st_ok = moe_a2a_set_counts(a, rows, MOE_OK, MAX_WIDTH);
        moe_status st_wide = moe_a2a_dispatch(a, buf, buf, MAX_WIDTH + 1);
        /* The experts fail on the last rank: the round trip completes everywhere. */
        moe_status st_pipe = moe_a2a_exchange(a, MOE_A2A_FORWARD, WIDTH, WIDTH, failing_experts, NULL, MOE_OK);
        char pipe_detail[256];
        snprintf(pipe_detail, sizeof pipe_detail, "%s", moe_error_detail());
        /* A failure of the caller before the trip (local) rides along the same way. */
        moe_status st_local = moe_a2a_exchange(a, MOE_A2A_BACKWARD, WIDTH, WIDTH, fake_experts_unused, NULL,
                                               R == W - 1 ? MOE_ERR_NOMEM : MOE_OK);
        moe_a2a_destroy(a);

        assert_int_equal(st, R == W - 1 ? MOE_ERR_NONFINITE : MOE_ERR_REMOTE);
        if (R != W - 1) assert_non_null(strstr(detail, want));
        assert_int_equal(st_disp, MOE_ERR_ARG);
        assert_int_equal(st_neg, R == 0 ? MOE_ERR_ARG : MOE_ERR_REMOTE);
        assert_int_equal(st_ok, MOE_OK);
        assert_int_equal(st_wide, MOE_ERR_ARG);
        assert_int_equal(st_pipe, R == W - 1 ? MOE_ERR_NONFINITE : MOE_ERR_REMOTE);
        if (R != W - 1) assert_non_null(strstr(pipe_detail, want));
        assert_int_equal(st_local, R == W - 1 ? MOE_ERR_NOMEM : MOE_ERR_REMOTE);
    }
    moe_a2a *bad = NULL;
    assert_int_equal(moe_a2a_create(&bad, c, 0, MOE_A2A_P2P, 1), MOE_ERR_ARG);
    assert_null(bad);
    assert_int_equal(moe_a2a_create(&bad, c, EL, MOE_A2A_P2P, 0), MOE_ERR_ARG);
    /* One rank with a bad argument: the others fail too instead of waiting. */
    moe_status st = moe_a2a_create(&bad, c, R == 0 ? -1 : EL, MOE_A2A_P2P, 1);
    assert_int_equal(st, R == 0 ? MOE_ERR_ARG : MOE_ERR_REMOTE);
    assert_null(bad);
    moe_comm_destroy(c);
}

/* Counts whose elements (rows x max_width) exceed INT_MAX fail before any
 * buffer of that size exists. */
static void test_exchange_overflow(void **state)
{
    (void)state;
    moe_comm *c = NULL;
    assert_int_equal(moe_comm_create(&c, MPI_COMM_WORLD, 0), MOE_OK);
    const int width = 1 << 12, limit = 0x7fffffff / width; /* rows that still fit */
    for (int kind = 0; kind < 3; kind++) {
        moe_a2a *a = NULL;
        assert_int_equal(moe_a2a_create(&a, c, EL, (moe_a2a_kind)kind, 1), MOE_OK);
        int rows[64 * EL] = {0};
        /* Every rank's send layout overflows. */
        for (int p = 0; p < W; p++) rows[p * EL] = limit / W + 1;
        moe_status all = moe_a2a_set_counts(a, rows, MOE_OK, width);
        char detail[256];
        snprintf(detail, sizeof detail, "%s", moe_error_detail());
        /* Only rank 0's receive layout overflows: each sends it just over 1/W of the limit. */
        memset(rows, 0, sizeof rows);
        rows[0] = limit / W + 1;
        moe_status one = moe_a2a_set_counts(a, rows, MOE_OK, width);
        moe_a2a_destroy(a);

        assert_int_equal(all, MOE_ERR_OVERFLOW);
        assert_non_null(strstr(detail, "INT_MAX"));
        if (R == 0 || W == 1) assert_int_equal(one, MOE_ERR_OVERFLOW);
        else assert_int_equal(one, MOE_ERR_REMOTE);
    }
    moe_comm_destroy(c);
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK) {
        fprintf(stderr, "test_comm: %s\n", moe_error_detail());
        return 1;
    }
    MPI_Comm_size(MPI_COMM_WORLD, &W);
    MPI_Comm_rank(MPI_COMM_WORLD, &R);
    if (W > 64) {
        fprintf(stderr, "test_comm: written for at most 64 ranks\n");
        moe_comm_finalize();
        return 1;
    }
    if (R != 0 && !freopen("/dev/null", "w", stdout)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_placement),
        cmocka_unit_test(test_collectives),
        cmocka_unit_test(test_check_same_and_agree),
        cmocka_unit_test(test_h5_properties),
        cmocka_unit_test(test_exchange_layouts),
        cmocka_unit_test(test_token_trips),
        cmocka_unit_test(test_token_trips_threads),
        cmocka_unit_test(test_exchange_errors),
        cmocka_unit_test(test_exchange_overflow),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL), any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    moe_comm_finalize();
    return any ? 1 : 0;
}
