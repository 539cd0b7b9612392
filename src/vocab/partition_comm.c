/* The partition shared over the ranks (partition.h, moe_vocab_part_share):
 * the only part of the partition code that uses src/comm. */
#include <stdlib.h>

#include "comm/comm.h"
#include "vocab/partition.h"

moe_status moe_vocab_part_share(moe_vocab_part **p, moe_status st, moe_comm *comm)
{
    const int rank = moe_comm_rank(comm);
    if (rank != 0) *p = NULL;
    if ((st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st))) {
        if (rank == 0) moe_vocab_part_destroy(*p), *p = NULL;
        return st;
    }
    int32_t size[2] = {0, 0};
    if (rank == 0) size[0] = moe_vocab_part_vocab(*p), size[1] = moe_vocab_part_experts(*p);
    if ((st = moe_comm_bcast(comm, size, sizeof size, 0))) return st;
    int32_t *assign = rank == 0 ? (int32_t *)moe_vocab_part_assign(*p) : malloc((size_t)size[0] * sizeof *assign);
    st = assign ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "vocabulary partition of %d tokens", size[0]);
    if (!(st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st)))
        st = moe_comm_bcast(comm, assign, (size_t)size[0] * sizeof *assign, 0);
    if (!st && rank != 0) st = moe_vocab_part_create(p, assign, size[0], size[1]);
    if (rank != 0) free(assign);
    st = moe_comm_agree_detail(comm, MOE_SCOPE_WORLD, st);
    if (st) moe_vocab_part_destroy(*p), *p = NULL;
    return st;
}
