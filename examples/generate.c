/* Text from a trained checkpoint through moerun's public API: load the
 * model on every rank of an MPI job (the experts are split over the
 * ranks), then sample bytes after a prompt with the key/value cache
 * (a byte-level model: token ids are bytes).
 *
 *   ./generate CHECKPOINT [PROMPT] [TOKENS] [TEMPERATURE] [SEED]
 *   mpirun -np 2 ./generate runs/a "17+25=" 64 0.8 1
 *
 * CHECKPOINT is a checkpoint file or a run directory (its `latest`). The
 * bytes printed are those of `moe generate --ckpt CHECKPOINT --prompt PROMPT
 * --tokens TOKENS --temperature TEMPERATURE --seed SEED`, on any number of
 * ranks dividing the number of experts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moerun/comm/comm.h>
#include <moerun/infer/infer.h>

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 6) {
        fprintf(stderr, "usage: %s CHECKPOINT [PROMPT] [TOKENS] [TEMPERATURE] [SEED]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1], *prompt = argc > 2 ? argv[2] : "";
    const int tokens = argc > 3 ? atoi(argv[3]) : 64;
    const moe_infer_sampler sampler = {.temperature = argc > 4 ? atof(argv[4]) : 1.0,
                                       .top_k = 0,
                                       .top_p = 1.0,
                                       .seed = argc > 5 ? (uint32_t)strtoul(argv[5], NULL, 10) : 1};

    moe_comm *comm = NULL;
    moe_model *model = NULL;
    moe_infer_decoder *dec = NULL;
    int32_t *ids = NULL, *out = NULL;
    moe_status st = moe_comm_init(&argc, &argv);
    if (!st) st = moe_comm_create_world(&comm, 0);
    if (st) {
        fprintf(stderr, "MPI start-up: %s: %s\n", moe_status_str(st), moe_error_detail());
        return 1;
    }
    /* One sequence: the model holds one sequence per forward and its MoE
     * layers take a decoding step of one token. Collective: a missing or
     * damaged file fails on every rank. */
    st = moe_infer_load(&model, NULL, path, 1, 1, comm);
    if (!st) {
        st = moe_infer_decoder_create(&dec, model, 1);
        /* a byte-level model: every byte of the prompt is its own token id */
        const size_t len = strlen(prompt);
        if (!st && !(ids = calloc(len + 1, sizeof *ids))) st = moe_errorf(MOE_ERR_NOMEM, "prompt ids");
        for (size_t i = 0; !st && i < len; i++) ids[i] = (unsigned char)prompt[i];
        if (!st && tokens > 0 && !(out = calloc((size_t)tokens, sizeof *out)))
            st = moe_errorf(MOE_ERR_NOMEM, "%d output ids", tokens);
        st = moe_comm_agree(comm, st);
        if (!st) {
            const int32_t *p = ids;
            st = moe_infer_generate(out, NULL, dec, comm, &p, &len, 1, tokens, &sampler, NULL);
        }
    }
    const int rank = moe_comm_rank(comm);
    if (st) {
        /* print the failure once, from the rank that holds its cause */
        const int cause = moe_comm_cause_rank(comm, MOE_SCOPE_WORLD, st);
        if (cause < 0 || cause == rank) fprintf(stderr, "generate: %s: %s\n", moe_status_str(st), moe_error_detail());
    } else if (rank == 0) {
        for (int i = 0; i < tokens; i++) putchar(out[i]); /* ids < 256: bytes */
        putchar('\n');
    }
    free(ids);
    free(out);
    moe_infer_decoder_destroy(dec);
    moe_model_destroy(model);
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return st ? 1 : 0;
}
