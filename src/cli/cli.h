/* Subcommands of the `moe` command. Each returns the process exit status
 * (0 success, 1 runtime failure, 2 usage error) and never calls exit, so
 * main() can finalise MPI on every path. */
#ifndef MOE_CLI_H
#define MOE_CLI_H

int moe_cmd_bench_layer(int argc, char **argv);
int moe_cmd_bench_a2a(int argc, char **argv);
int moe_cmd_train(int argc, char **argv);
int moe_cmd_data(int argc, char **argv);
int moe_cmd_inspect(int argc, char **argv);
int moe_cmd_eval(int argc, char **argv);
int moe_cmd_generate(int argc, char **argv);
int moe_cmd_selftest(int argc, char **argv);

struct moe_comm;
/* MPI start-up shared by the subcommands: moe_comm_init, then a world
 * communicator with expert-parallel size ep_size (0: all ranks). Returns 0
 * with *comm set, or prints the problem and returns 1 with MPI finalised. */
int moe_cli_start(const char *what, int ep_size, struct moe_comm **comm);

/* Prints "moe: <what>: <status>: <detail>" to stderr, prefixed by the rank
 * when running under MPI with more than one rank. */
void moe_cli_error(int rank, const char *what, int status);

/* Option parsing (args.c). A usage error is printed by rank 0 only (rank < 0:
 * always) as "moe <cmd>: <message>". The parsers return 0, or -1 when s is
 * not a whole number in [lo, hi] / not a finite number. */
void moe_cli_usage_error(int rank, const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int moe_cli_parse_long(const char *s, long lo, long hi, long *out);
int moe_cli_parse_double(const char *s, double *out);
/* Median of n values (sorts v in place). */
double moe_cli_median(double *v, int n);

/* This process's resident memory in MB from /proc/self/status: field
 * "VmRSS" (now) or "VmHWM" (peak). -1 where /proc is unavailable. */
double moe_cli_mem_mb(const char *field);

#endif
