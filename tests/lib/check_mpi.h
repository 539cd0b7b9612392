/* The check of the MPI tests (tests/lib): a failed condition is counted and
 * reported with the rank, the place and the library's error detail, and the
 * test goes on, so that every rank reaches the same collectives. Where
 * CHECK is used, `fails` (the count) and `rank` must be in scope, and
 * core/moe.h included (moe_error_detail). */
#ifndef MOE_TEST_CHECK_MPI_H
#define MOE_TEST_CHECK_MPI_H

#include <stdio.h>

#define CHECK(cond)                                                                               \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed: %s\n", rank, __FILE__, __LINE__,   \
                    #cond, moe_error_detail());                                                   \
            fails++;                                                                              \
        }                                                                                         \
    } while (0)

#endif
