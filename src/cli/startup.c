/* Start-up checks shared by the commands that run under MPI (train, eval,
 * generate, bench layer, bench a2a): every rank reports its platform record
 * (core/platform.h: BLAS kernel set, BLAS threads, moerun version, host) and
 * a job whose ranks would compute with different kernels or builds stops
 * before doing any work; then the comm_timeout watchdog starts, with the
 * record's hosts for its reports. Also the options every such command
 * accepts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "config/config.h"
#include "core/moe.h"
#include "core/platform.h"

static int allow_mixed_kernels;
static const char *comm_timeout_arg; /* --comm_timeout as given, NULL: not given */
static double comm_timeout = MOE_COMM_TIMEOUT_DEFAULT;

_Static_assert(sizeof(((moe_platform *)0)->host) == MOE_COMM_HOST_MAX, "platform hosts feed the watchdog");

const char *moe_cli_comm_timeout_arg(void) { return comm_timeout_arg; }

int moe_cli_take_global_options(int *argc, char **argv)
{
    int out = 0;
    for (int i = 0; i < *argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
        const char *t = NULL; /* --comm_timeout's value */
        if (!strcmp(a, "--comm_timeout") || !strcmp(a, "--comm-timeout")) {
            if (i + 1 >= *argc) {
                fprintf(stderr, "moe: --comm_timeout needs a value (seconds)\n");
                return 2;
            }
            t = argv[++i];
        } else if (!strncmp(a, "--comm_timeout=", 15) || !strncmp(a, "--comm-timeout=", 15)) {
            t = a + 15;
        }
        if (t) {
            double x = 0;
            if (moe_cli_parse_double(t, &x) || x < 0) {
                fprintf(stderr, "moe: --comm_timeout takes seconds >= 0 (0: no deadline), got '%s'\n", t);
                return 2;
            }
            comm_timeout = x;
            comm_timeout_arg = t;
            continue;
        }
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
    /* The watchdog keeps the hosts of the table for its reports. */
    char(*hosts)[MOE_COMM_HOST_MAX] = st ? NULL : malloc((size_t)W * sizeof *hosts);
    if (!st) st = moe_comm_agree(comm, hosts ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "host table of %d ranks", W));
    for (int r = 0; !st && r < W; r++) memcpy(hosts[r], all[r].host, MOE_COMM_HOST_MAX);
    if (!st) st = moe_comm_watchdog_start(comm, comm_timeout, (const char(*)[MOE_COMM_HOST_MAX])hosts);
    free(hosts);
    free(all);
    return st;
}
