/* Start-up checks shared by the commands that run under MPI (train, eval,
 * generate, bench layer, bench a2a): every rank reports its platform record
 * (core/platform.h: BLAS kernel set, BLAS threads, moerun version, host) and
 * a job whose ranks would compute with different kernels or builds stops
 * before doing any work. Also the options every such command accepts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "core/moe.h"
#include "core/platform.h"

static int allow_mixed_kernels;

int moe_cli_take_global_options(int *argc, char **argv)
{
    int out = 0;
    for (int i = 0; i < *argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
        if (!strcmp(a, "--allow_mixed_kernels") || !strcmp(a, "--allow-mixed-kernels")) v = "1";
        else if (!strncmp(a, "--allow_mixed_kernels=", 22) || !strncmp(a, "--allow-mixed-kernels=", 22)) v = a + 22;
        if (!v) {
            argv[out++] = argv[i];
            continue;
        }
        if (strcmp(v, "0") && strcmp(v, "1")) {
            fprintf(stderr, "moe: --allow_mixed_kernels takes 0 or 1, got '%s'\n", v);
            return 2;
        }
        allow_mixed_kernels = v[0] == '1';
    }
    if (out < *argc) argv[out] = NULL;
    *argc = out;
    return 0;
}

moe_status moe_cli_check_platform(moe_comm *comm, const char *what)
{
    const int W = moe_comm_size(comm), rank = moe_comm_rank(comm);
    moe_platform me;
    moe_platform_get(&me);
    moe_platform *all = malloc((size_t)W * sizeof *all);
    /* Agree on the table first: every rank gathers, or every rank returns. */
    moe_status st = moe_comm_agree(comm, all ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "platform table of %d ranks", W));
    if (!st) st = moe_comm_allgather(comm, all, &me, sizeof me);
    if (st) {
        free(all);
        return st;
    }
    char note[1024];
    st = moe_platform_check(all, W, allow_mixed_kernels, note, sizeof note);
    if (!st && rank == 0) {
        /* A job spanning hosts says where its ranks are; one host says nothing. */
        if (moe_platform_n_hosts(all, W) > 1) {
            char line[1024];
            moe_platform_summary(line, sizeof line, all, W);
            fprintf(stderr, "moe %s: %s\n", what, line);
        }
        if (note[0]) fprintf(stderr, "moe %s: %s\n", what, note);
    }
    free(all);
    return st;
}
