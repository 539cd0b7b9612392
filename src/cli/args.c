/* Helpers every subcommand's option parsing shares: number parsing with
 * range checks, usage errors printed once (by rank 0), and the median the
 * benchmarks report. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

void moe_cli_usage_error(int rank, const char *cmd, const char *fmt, ...)
{
    if (rank > 0) return; /* every rank parses the same arguments: one message is enough */
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "moe %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int moe_cli_parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int moe_cli_parse_double(const char *s, double *out)
{
    char *end;
    const double v = strtod(s, &end);
    if (!*s || *end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double moe_cli_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int moe_cli_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            /* before MPI exists, the launcher's variables tell the rank */
            const char *r = getenv("OMPI_COMM_WORLD_RANK");
            if (!r) r = getenv("PMI_RANK");
            return r && strcmp(r, "0") ? -1 : 1;
        }
    return 0;
}
