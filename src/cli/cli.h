/* Subcommands of the `moe` command. Each returns the process exit status
 * (0 success, 1 runtime failure, 2 usage error) and never calls exit, so
 * main() can finalise MPI on every path. */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "core/moe.h"

int moe_cmd_bench_layer(int argc, char **argv);
int moe_cmd_bench_a2a(int argc, char **argv);
int moe_cmd_train(int argc, char **argv);
int moe_cmd_data(int argc, char **argv);
int moe_cmd_inspect(int argc, char **argv);
int moe_cmd_eval(int argc, char **argv);
int moe_cmd_generate(int argc, char **argv);
int moe_cmd_tokenizer(int argc, char **argv);
int moe_cmd_selftest(int argc, char **argv);
int moe_cmd_convert(int argc, char **argv);
int moe_cmd_help(int argc, char **argv);

/* The commands (main.c): the words that name one ("bench layer"), its
 * arguments and a one-line summary for the usage; key_table: its options
 * are the training key table (moe train). The usage, `moe help` and the man
 * pages list exactly these. */
typedef struct {
    const char *words, *args, *summary;
    int key_table;
} moe_cli_command;
extern const moe_cli_command moe_cli_commands[];
extern const int moe_cli_n_commands;
/* The general usage (moe --help). */
void moe_cli_usage(FILE *f);
/* Runs a command line as main does once the global options are taken:
 * argv[0] is the program, argv[1] the command. Returns the exit status. */
int moe_cli_dispatch(int argc, char **argv);
int moe_cmd_vocab(int argc, char **argv);
int moe_cmd_placement(int argc, char **argv);

struct moe_comm;
/* MPI start-up shared by the subcommands: moe_comm_init, then a world
 * communicator with expert-parallel size ep_size (0: all ranks), then
 * moe_cli_check_platform. Returns 0 with *comm set, or prints the problem
 * and returns the exit status (2: ranks differ, 1: otherwise) with MPI
 * finalised. */
int moe_cli_start(const char *what, int ep_size, struct moe_comm **comm);
/* The whole of a command whose options every rank parses once MPI is up
 * (eval, generate): --help before MPI (moe_cli_wants_help), moe_cli_start
 * over all ranks, parse, run, then MPI finalised. parse fills opts and
 * returns 0, 1 for --help (rank 0 prints the usage; exit 0) or -1 after a
 * usage error (exit 2); run returns the exit status. */
typedef struct {
    const char *what; /* the command's words, for start-up messages */
    void (*usage)(FILE *f);
    int (*parse)(void *opts, int argc, char **argv, int rank);
    int (*run)(const void *opts, struct moe_comm *comm);
} moe_cli_world_command;
int moe_cli_run_world(const moe_cli_world_command *cmd, void *opts, int argc, char **argv);

/* Start-up (startup.c). moe_cli_take_global_options removes the options
 * every MPI command accepts from argv (before the command parses it):
 * --allow_mixed_kernels[=0|1], --comm_timeout S. Returns 0, or 2 after
 * printing a usage error.
 * moe_cli_check_platform: collective over world; gathers every rank's
 * platform record (core/platform.h) and returns MOE_ERR_MISMATCH (detail:
 * values, ranks, hosts) on every rank if moerun versions or BLAS kernel
 * sets differ (kernels: unless --allow_mixed_kernels, then rank 0 warns);
 * on a job spanning hosts rank 0 prints one line of placement to stderr;
 * then starts the comm_timeout watchdog with the table's hosts.
 * MOE_ERR_MPI/NOMEM if the gather fails. Same result on every rank. */
int moe_cli_take_global_options(int *argc, char **argv);
moe_status moe_cli_check_platform(struct moe_comm *comm, const char *what);
/* --comm_timeout S (or =S), accepted by every command like
 * --allow_mixed_kernels: seconds a blocking phase may make no progress
 * before the watchdog ends the job (comm.h; default MOE_COMM_TIMEOUT_DEFAULT,
 * 0: never). moe_cli_check_platform starts the watchdog with it. Returns
 * the text given, NULL if the option was not given (`moe train` then
 * applies it over its config, as the key comm_timeout). */
const char *moe_cli_comm_timeout_arg(void);

/* Prints "moe: <what>: <status>: <detail>" to stderr, prefixed by the rank
 * when running under MPI with more than one rank. */
void moe_cli_error(int rank, const char *what, int status);

/* The --json output of a command: j printed as cJSON_Print formats it, and a
 * newline, on stdout; j is deleted. Returns 0, or 1 (nothing printed) when
 * the text could not be made. */
struct cJSON;
int moe_cli_print_json(struct cJSON *j);

/* Option parsing (args.c). A usage error is printed by rank 0 only (rank < 0:
 * always) as "moe <cmd>: <message>". The parsers return 0, or -1 when s is
 * not a whole number in [lo, hi] / not a finite number. */
void moe_cli_usage_error(int rank, const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int moe_cli_parse_long(const char *s, long lo, long hi, long *out);
int moe_cli_parse_double(const char *s, double *out);
/* 1 if argv[1..] asks for --help/-h (print it and exit 0 without starting
 * MPI: help works without mpirun and at build time), -1 if it does but this
 * is not rank 0 of a launch (exit 0 silently), 0 otherwise. */
int moe_cli_wants_help(int argc, char **argv);
/* Median of n values (sorts v in place). */
double moe_cli_median(double *v, int n);

/* This process's resident memory in MB from /proc/self/status: field
 * "VmRSS" (now) or "VmHWM" (peak). -1 where /proc is unavailable. */
double moe_cli_mem_mb(const char *field);

/* Input of a command (cmd_tokenizer.c): a file, memory-mapped, or all of
 * standard input when path is NULL or "-". Returns a moe_status. */
typedef struct {
    unsigned char *data;
    size_t n;
    int mapped;
} moe_cli_input;
int moe_cli_input_read(moe_cli_input *in, const char *path);
void moe_cli_input_free(moe_cli_input *in);

/* --doc-sep NAME / --doc-delim S of `tokenizer encode` and `data encode`:
 * sets the encoder's document delimiter (S with C escapes; default NAME's
 * own text). Returns 0, or the exit status after printing the problem
 * (a usage error: by rank 0 only, as moe_cli_usage_error). */
struct moe_tok;
struct moe_tok_encoder;
int moe_cli_doc_delim(struct moe_tok_encoder *e, const struct moe_tok *t, const char *sep_name, const char *delim_arg,
                      const char *cmd, int rank);

#endif
