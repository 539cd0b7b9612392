/* Checkpoints under MPI. `save FILE EP [tok]`: every rank contributes its part
 * (with tok, the file holds tk_tokenizer in /tokenizer)
 * (owners write expert rows, replica 0 only; rank 0 the replicated tensors;
 * the others hold garbage that must not reach the file), then the same
 * world loads it back. `savefail FILE EP`: a checkpoint writer fails
 * mid-file (MOE_FAULT=ckpt_write): every rank reports it, and neither the
 * file nor its temporary is left. `load EP FILE...`: a world of any size loads files
 * saved by another and every rank compares its slice bitwise with the
 * values the saver meant; then a copy with one flipped byte in the last
 * expert's chunk must fail with a checksum error on every rank. Exit status
 * 0 only if every rank agrees that all is well. `vocab-save` / `vocab-load`:
 * the same with the vocabulary-expert head (tk_vocab): its rows go to and
 * come from their token ids, whatever the saving and loading ep sizes; the
 * damaged copy is then hit in the head's weight. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hdf5.h>

#include "ckpt_testlib.h"
#include "comm/comm.h"

static int fails;

#define CHECK(cond, ...)                                            \
    do {                                                            \
        if (!(cond)) {                                              \
            fprintf(stderr, "rank %d: %s:%d: ", rank, __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                           \
            fprintf(stderr, " [%s]\n", moe_error_detail());         \
            fails++;                                                \
        }                                                           \
    } while (0)

static int rank;

static void load_check(moe_comm *c, const char *path)
{
    tk_state t;
    CHECK(tk_state_blank(&t, moe_comm_ep_rank(c), moe_comm_ep_size(c)) == 0, "alloc");
    char *cfg = NULL;
    moe_status st = moe_ckpt_load(path, c, &t.s, &cfg);
    CHECK(st == MOE_OK, "load %s: %s", path, moe_status_str(st));
    if (st == MOE_OK) {
        int64_t bad = tk_state_check(&t);
        CHECK(bad == 0, "%lld values differ after loading %s", (long long)bad, path);
        CHECK(cfg && !strcmp(cfg, tk_config_text), "config text");
    }
    free(cfg);
    tk_state_free(&t);
    /* a file saved with the tokenizer gives every rank the same one back */
    moe_tok *tok = NULL, *want = tk_tokenizer();
    st = moe_ckpt_load_tokenizer(&tok, path, c);
    CHECK(st == MOE_OK, "tokenizer of %s: %s", path, moe_status_str(st));
    CHECK(!tok || moe_tok_equal(tok, want), "tokenizer of %s differs", path);
    if (tok) printf("rank %d: %s: the tokenizer (%lld ids) read back equal\n", rank, path,
                    (long long)moe_tok_vocab_size(tok));
    moe_tok_destroy(tok);
    moe_tok_destroy(want);
}

/* Rank 0 copies src to dst and flips a byte inside chunk `chunk` of dset. */
static void corrupt_copy(moe_comm *c, const char *dst, const char *src, const char *dset, hsize_t chunk)
{
    if (rank == 0) {
        char cmd[8300];
        snprintf(cmd, sizeof cmd, "cp '%s' '%s'", src, dst);
        CHECK(system(cmd) == 0, "cp");
        hid_t f = H5Fopen(dst, H5F_ACC_RDONLY, H5P_DEFAULT);
        hid_t ds = H5Dopen2(f, dset, H5P_DEFAULT), sp = H5Dget_space(ds);
        hsize_t off[4], size = 0;
        haddr_t addr = 0;
        unsigned mask;
        CHECK(H5Dget_chunk_info(ds, sp, chunk, off, &mask, &addr, &size) >= 0, "chunk info");
        H5Sclose(sp);
        H5Dclose(ds);
        H5Fclose(f);
        FILE *fp = fopen(dst, "r+b");
        CHECK(fp && size > 8, "open copy");
        if (fp) {
            fseek(fp, (long)(addr + size / 2), SEEK_SET);
            int b = fgetc(fp);
            fseek(fp, (long)(addr + size / 2), SEEK_SET);
            fputc(b ^ 0xff, fp);
            fclose(fp);
        }
    }
    moe_comm_barrier(c);
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK) return 1;
    if (argc > 1 && !strncmp(argv[1], "vocab-", 6)) {
        tk_vocab = 1;
        argv[1] += 6;
    }
    moe_comm *c = NULL;
    const int saving = argc >= 2 && !strncmp(argv[1], "save", 4);
    const int ep = argc >= 3 ? atoi(argv[saving ? 3 : 2]) : 0;
    if (argc < 4 || moe_comm_create_world(&c, ep) != MOE_OK) {
        fprintf(stderr, "usage: test_ckpt_mpi save FILE EP [tok] | savefail FILE EP | load EP FILE... (%s)\n",
                moe_error_detail());
        moe_comm_finalize();
        return 2;
    }
    rank = moe_comm_rank(c);
    const int W = moe_comm_size(c), P = moe_comm_ep_size(c);
    if (!strcmp(argv[1], "save")) {
        tk_state t;
        CHECK(tk_state_make(&t, moe_comm_ep_rank(c), P, rank, moe_comm_replica(c)) == 0, "alloc");
        moe_tok *tok = argc > 4 && !strcmp(argv[4], "tok") ? tk_tokenizer() : NULL; /* format_version 2 */
        t.s.tok = tok;
        moe_status st = moe_ckpt_save(argv[2], c, &t.s);
        moe_tok_destroy(tok);
        CHECK(st == MOE_OK, "save %s: %s", argv[2], moe_status_str(st));
        /* A gradient dump beside it: the m block as gradients, expert e of
         * MoE layer l activated iff (e + l) % 3 != 0. */
        uint8_t act[3 * 12];
        for (int i = 0; i < 3 * 12; i++) act[i] = (uint8_t)((i % 12 + i / 12) % 3 != 0);
        char gp[4096];
        snprintf(gp, sizeof gp, "%s.grads.h5", argv[2]);
        st = moe_ckpt_save_grads(gp, c, t.table, t.s.m, act, tk_vocab ? act + 2 * 12 : NULL, 12, 42, &t.cfg,
                                 tk_config_text);
        CHECK(st == MOE_OK, "save %s: %s", gp, moe_status_str(st));
        tk_state_free(&t);
        load_check(c, argv[2]);
    } else if (!strcmp(argv[1], "savefail")) {
        /* MOE_FAULT=ckpt_write (MOE_FAULT_RANK: a writer) fails one writer
         * mid-file: every rank returns its error, and neither the file nor
         * its temporary is left behind. */
        tk_state t;
        CHECK(tk_state_make(&t, moe_comm_ep_rank(c), P, rank, moe_comm_replica(c)) == 0, "alloc");
        moe_status st = moe_ckpt_save(argv[2], c, &t.s);
        CHECK(st == MOE_ERR_IO, "save with a failing writer gave %s", moe_status_str(st));
        CHECK(strstr(moe_error_detail(), "injected failure") != NULL, "detail names the cause");
        tk_state_free(&t);
        moe_comm_barrier(c);
        char tmp[4200];
        snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
        CHECK(access(argv[2], F_OK) != 0 && access(tmp, F_OK) != 0, "file or temporary left behind");
    } else {
        for (int i = 3; i < argc; i++) {
            load_check(c, argv[i]);
            /* The last expert's w1 chunk: only its owners (ep rank P-1) see
             * the damage, yet every rank must report the same failure. */
            char bad[4096];
            snprintf(bad, sizeof bad, "%s.flip%d.h5", argv[i], W);
            const char *dset = tk_vocab ? "/model/vocab_head/weight" : "/model/h/2/moe/experts/w1";
            corrupt_copy(c, bad, argv[i], dset, tk_vocab ? 0 : 11);
            tk_state t;
            CHECK(tk_state_blank(&t, moe_comm_ep_rank(c), P) == 0, "alloc");
            moe_status st = moe_ckpt_load(bad, c, &t.s, NULL);
            CHECK(st == MOE_ERR_CHECKSUM, "corrupted load gave %s", moe_status_str(st));
            CHECK(strstr(moe_error_detail(), dset) != NULL, "detail names the dataset");
            /* (the head's weight is one chunk, which every rank reads) */
            if (P > 1 && !tk_vocab) CHECK(strstr(moe_error_detail(), "rank") != NULL, "detail names the failing rank");
            tk_state_free(&t);
            if (rank == 0) remove(bad);
        }
    }
    int64_t total = fails;
    moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, &total, 1);
    if (rank == 0) printf("%s: %d ranks, ep %d: %lld failures\n", argv[1], W, P, (long long)total);
    moe_comm_destroy(c);
    moe_comm_finalize();
    return total != 0;
}
