/* Layer dump over W ranks through parallel HDF5: each rank writes its token
 * rows, replica 0 of each expert shard writes the experts, rank 0 the
 * router; the file must equal the global tensors exactly. Also: a bad view
 * on one rank, a hole and an overlap in the row partition, a seed or a path
 * differing between ranks give a non-OK status on EVERY rank (nobody hangs)
 * and leave no file behind.
 * Usage: test_dump_mpi DIR [EP_SIZE] (EP_SIZE 0 or absent: W). */
#include <unistd.h>

#include "comm/comm.h"
#include "dump_fixture.h"

#include "check_mpi.h"

static int fails;

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK || argc < 2) return 2;
    moe_comm *c = NULL;
    if (moe_comm_create_world(&c, argc > 2 ? atoi(argv[2]) : 0) != MOE_OK) return 2;
    const int rank = moe_comm_rank(c), W = moe_comm_size(c), P = moe_comm_ep_size(c);

    const int64_t T = 24, G = 12;
    const int E = 12;
    dump_fixture fx;
    fx_init(&fx, T, G, 5, 3, E, 2, MOE_ACT_GELU, MOE_ROUTER_TOKEN_CHOICE);
    const int64_t nt = T / W, t0 = rank * nt, ne = E / P, e0 = moe_comm_ep_rank(c) * ne;
    const int writes = moe_comm_replica(c) == 0;

    char path[512];
    snprintf(path, sizeof path, "%s/dump_mpi_w%d_p%d.h5", argv[1], W, P);
    if (rank == 0) remove(path);

    /* NULL tensor on the last rank only. */
    moe_dump_view v = fx_view(&fx, t0, nt, e0, ne, writes);
    if (rank == W - 1) v.dy = NULL;
    moe_status st = moe_dump_write(path, c, &v);
    CHECK(st == (rank == W - 1 ? MOE_ERR_ARG : (W > 1 ? MOE_ERR_REMOTE : MOE_ERR_ARG)));

    /* A hole: the last rank drops its last token row. */
    v = fx_view(&fx, t0, rank == W - 1 ? nt - 1 : nt, e0, ne, writes);
    CHECK(moe_dump_write(path, c, &v) == MOE_ERR_ARG);
    CHECK(strstr(moe_error_detail(), "token rows") != NULL);

    /* An overlap: every replica writes the experts. */
    if (W > P) {
        v = fx_view(&fx, t0, nt, e0, ne, 1);
        CHECK(moe_dump_write(path, c, &v) == MOE_ERR_ARG);
        CHECK(strstr(moe_error_detail(), "overlap") != NULL);
    }
    /* Metadata must be identical on every rank: a different seed or path. */
    if (W > 1) {
        v = fx_view(&fx, t0, nt, e0, ne, writes);
        if (rank == 1) v.seed++;
        CHECK(moe_dump_write(path, c, &v) == MOE_ERR_MISMATCH);
        v.seed = fx.g.seed;
        char other[sizeof path + 8];
        snprintf(other, sizeof other, "%s%s", path, rank == 1 ? ".1" : "");
        CHECK(moe_dump_write(other, c, &v) == MOE_ERR_MISMATCH);
    }
    moe_comm_barrier(c);
    CHECK(access(path, F_OK) == -1);

    v = fx_view(&fx, t0, nt, e0, ne, writes);
    CHECK(moe_dump_write(path, c, &v) == MOE_OK);
    if (rank == 0) CHECK(fx_check_file(&fx, path) == 0);
    moe_comm_barrier(c);
    if (rank == 0) remove(path);

    int64_t total = fails;
    moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, &total, 1);
    if (rank == 0) printf("test_dump_mpi W=%d P=%d: %s\n", W, P, total ? "FAILED" : "ok");
    fx_free(&fx);
    moe_comm_destroy(c);
    moe_comm_finalize();
    return total ? 1 : 0;
}
