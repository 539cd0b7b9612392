/* `moe`: the command-line entry point; dispatches to subcommands. Also what
 * the commands share around their work: start-up (moe_cli_start), the frame
 * of a command parsed on every rank (moe_cli_run_world), error and --json
 * output. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "core/cpu.h"
#include "core/moe.h"
#include "core/platform.h"
#include "moe_git.h" /* MOE_GIT_DESCRIBE, written at build time (cmake/moeGitDescribe.cmake) */

void moe_cli_error(int rank, const char *what, int status)
{
    const char *detail = moe_error_detail();
    if (rank >= 0)
        fprintf(stderr, "moe[rank %d]: %s: %s%s%s\n", rank, what, moe_status_str((moe_status)status),
                *detail ? ": " : "", detail);
    else
        fprintf(stderr, "moe: %s: %s%s%s\n", what, moe_status_str((moe_status)status),
                *detail ? ": " : "", detail);
}

int moe_cli_print_json(cJSON *j)
{
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    if (!s) return 1;
    printf("%s\n", s);
    free(s);
    return 0;
}

double moe_cli_mem_mb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    double mb = -1;
    const size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') {
            mb = strtod(line + n + 1, NULL) / 1024.0; /* the kernel reports kB */
            break;
        }
    fclose(f);
    return mb;
}

int moe_cli_start(const char *what, int ep_size, moe_comm **comm)
{
    *comm = NULL;
    moe_status st = moe_comm_init(NULL, NULL);
    if (!st) st = moe_comm_create_world(comm, ep_size);
    if (!st) st = moe_cli_check_platform(*comm, what);
    if (!st) return 0;
    /* A platform mismatch is the same on every rank: rank 0 says it. */
    if (st != MOE_ERR_MISMATCH || moe_comm_rank(*comm) == 0) moe_cli_error(-1, what, st);
    moe_comm_destroy(*comm);
    *comm = NULL;
    moe_comm_finalize();
    return st == MOE_ERR_MISMATCH ? 2 : 1;
}

int moe_cli_run_world(const moe_cli_world_command *cmd, void *opts, int argc, char **argv)
{
    const int help = moe_cli_wants_help(argc, argv);
    if (help) {
        if (help > 0) cmd->usage(stdout);
        return 0;
    }
    moe_comm *comm = NULL;
    const int start_rc = moe_cli_start(cmd->what, 0, &comm);
    if (start_rc) return start_rc;
    const int rank = moe_comm_rank(comm);
    /* --help reaches parse only abbreviated (getopt takes --he): the check above missed it */
    const int prc = cmd->parse(opts, argc, argv, rank);
    int ret;
    if (prc) {
        if (prc > 0 && rank == 0) cmd->usage(stdout);
        ret = prc > 0 ? 0 : 2;
    } else {
        ret = cmd->run(opts, comm);
    }
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return ret;
}

/* Every command: the words that name it, its arguments and a summary. The
 * general usage and the man pages (moe help, cmd_help.c) are made from this
 * table; main() below dispatches the same words. */
const moe_cli_command moe_cli_commands[] = {
    {"train", "--config FILE", "train an MoE language model (run under mpirun for expert parallelism)", 1},
    {"eval", "--ckpt F --data F", "next-byte loss of a checkpoint on a file", 0},
    {"generate", "--ckpt F ...", "sample text from a checkpoint", 0},
    {"inspect", "FILE", "describe, verify or diff checkpoints and dumps", 0},
    {"data synth", "--out FILE", "write the built-in multi-domain corpus", 0},
    {"data encode", "...", "encode a corpus into a token file (ranks and threads)", 0},
    {"tokenizer", "<sub> ...", "train, import, export, encode, decode, info (BPE tokenizers)", 0},
    {"convert", "import|export ...", "Hugging Face MoE checkpoints (mixtral, qwen2/3_moe, olmoe) <-> moerun", 0},
    {"vocab partition", "...", "split the vocabulary into vocabulary experts (head = vocab_experts)", 0},
    {"placement plan", "--ckpt F ...", "place experts on ranks by their recorded load, with replicas (EPLB)", 0},
    {"bench layer", "", "time one MoE layer forward+backward (--save writes a dump)", 0},
    {"bench a2a", "", "time the token all-to-all against raw MPI_Alltoallv", 0},
    {"selftest blas", "", "check and time OpenBLAS's kernel sets; pick the fastest correct one", 0},
    {"help", "[--man] [COMMAND]", "this text, a command's help, or man pages (roff)", 0},
};
const int moe_cli_n_commands = (int)(sizeof moe_cli_commands / sizeof moe_cli_commands[0]);

void moe_cli_usage(FILE *f)
{
    fprintf(f, "usage: moe <command> [options]\n\ncommands:\n");
    for (int i = 0; i < moe_cli_n_commands; i++) {
        char head[64];
        const moe_cli_command *c = &moe_cli_commands[i];
        snprintf(head, sizeof head, "%s%s%s", c->words, *c->args ? " " : "", c->args);
        fprintf(f, "  %-22s  %s\n", head, c->summary);
    }
    fprintf(f,
            "\n"
            "Run 'moe <command> --help' for the options of a command.\n"
            "\n"
            "Under MPI every rank reports its BLAS kernel set (OpenBLAS core), BLAS threads,\n"
            "moe version and host at start; a job whose ranks differ in kernels or version\n"
            "stops. --allow_mixed_kernels (any MPI command) accepts mixed kernels with a warning.\n"
            "--comm_timeout S (any MPI command; default 300, 0: never): a rank that waits S seconds\n"
            "without progress in a collective, exchange or checkpoint write says for what and whom,\n"
            "and ends the job on every node (docs/cluster.md).\n"
            "moe --version prints this process's version (and the git commit it was built from)\n"
            "and BLAS kernels.\n");
}

/* OPENBLAS_CORETYPE forces OpenBLAS's kernels even where the CPU cannot run
 * them, and the first GEMM then dies of SIGILL with no word of why. A set
 * the CPU lacks features for is refused here, before any command starts
 * (every rank of a job says it). Returns 0 to go on, 2 to stop. */
static int check_coretype(void)
{
    const char *want = getenv("OPENBLAS_CORETYPE");
    if (!want || !*want) return 0;
    moe_cpu c;
    moe_cpu_read(&c);
    const char *missing = NULL;
    int rc = 0;
    if (moe_cpu_runs_kernel_set(&c, want, &missing) == 0) {
        const char *sets[8];
        const int n = moe_cpu_kernel_sets(&c, sets);
        char list[160] = "";
        for (int i = 0; i < n; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", sets[i]);
        fprintf(stderr,
                "moe: OPENBLAS_CORETYPE=%s selects kernels that need the CPU feature '%s', which this CPU (%s) "
                "does not have: they would stop the process with an illegal instruction. Unset the variable "
                "(launch/ then picks the fastest correct set: moe selftest blas --pick) or set one this CPU "
                "runs: %s\n",
                want, missing, c.model, list);
        rc = 2;
    }
    moe_cpu_free(&c);
    return rc;
}

int moe_cli_dispatch(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        moe_cli_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        moe_platform p;
        moe_platform_get(&p);
        printf("moe %s%s%s%s (%s, %d BLAS thread%s)\n", p.version, *MOE_GIT_DESCRIBE ? " (git " : "",
               MOE_GIT_DESCRIBE, *MOE_GIT_DESCRIBE ? ")" : "", p.blas_config, p.blas_threads,
               p.blas_threads == 1 ? "" : "s");
        return 0;
    }
    const char *cmd = argv[1];
    /* selftest tries kernel sets itself (a crash there marks a set unusable). */
    if (strcmp(cmd, "selftest") && strcmp(cmd, "help")) {
        const int rc = check_coretype();
        if (rc) return rc;
    }
    if (!strcmp(cmd, "bench")) {
        if (argc < 3) {
            fprintf(stderr, "moe bench: expected 'layer' or 'a2a'\n");
            return 2;
        }
        if (!strcmp(argv[2], "layer")) return moe_cmd_bench_layer(argc - 2, argv + 2);
        if (!strcmp(argv[2], "a2a")) return moe_cmd_bench_a2a(argc - 2, argv + 2);
        fprintf(stderr, "moe bench: unknown benchmark '%s' (expected 'layer' or 'a2a')\n", argv[2]);
        return 2;
    }
    if (!strcmp(cmd, "train")) return moe_cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "data")) return moe_cmd_data(argc - 1, argv + 1);
    if (!strcmp(cmd, "inspect")) return moe_cmd_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return moe_cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return moe_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenizer")) return moe_cmd_tokenizer(argc - 1, argv + 1);
    if (!strcmp(cmd, "convert")) return moe_cmd_convert(argc - 1, argv + 1);
    if (!strcmp(cmd, "selftest")) return moe_cmd_selftest(argc - 1, argv + 1);
    if (!strcmp(cmd, "help")) return moe_cmd_help(argc - 1, argv + 1);
    if (!strcmp(cmd, "vocab")) return moe_cmd_vocab(argc - 1, argv + 1);
    if (!strcmp(cmd, "placement")) return moe_cmd_placement(argc - 1, argv + 1);
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    moe_cli_usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    if (moe_cli_take_global_options(&argc, argv)) return 2;
    return moe_cli_dispatch(argc, argv);
}
