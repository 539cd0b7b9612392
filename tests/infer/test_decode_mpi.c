/* The decoder split over the ep group (moe_infer_decoder_set_split) against
 * one process: every rank makes the same calls on a model sharded over W
 * ranks and on the same model in one process (moe_comm_self()), and every
 * row of every call must agree within 2e-4 relative (the same routing
 * groups, so the same capacity drops; the weights are 8x the init's, so
 * logits are large and GEMMs over other row counts round differently: the
 * unsplit decoder on 2 ranks differs from one process by up to 3e-5 here),
 * and be bitwise the same on every rank (the unsplit decoder's are not). The calls cover
 * the prompt pass of one sequence (only its last row wanted), batched steps
 * in sequence order, a step in reverse order (the gathered rows are
 * reordered), a step of fewer sequences than ranks (a rank with no row
 * still takes part in every MoE exchange), and a call of several tokens of
 * several sequences. With `arch` every architecture option is on (RoPE,
 * GQA, RMSNorm, SwiGLU, gated shared experts, group-limited sigmoid
 * routing); with `vocab` the head is the vocabulary-expert head (candidate
 * lists: the same ids, log-probabilities within 2e-4; each rank's rows go
 * through it from where they live, a rank with none still serving its
 * experts; out of rank order every rank runs every row, so the rows are
 * not checked for the same bits across ranks). The split refuses a
 * decoder that already holds tokens.
 * Usage: test_decode_mpi [EP_SIZE [arch | vocab]] (EP_SIZE 0: world size). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "infer/infer.h"
#include "train/train.h"

#include "check_mpi.h"
#include "testlib.h"

enum { T = 16, S = 5, MAXC = 256 };

static int fails, rank;

typedef struct {
    moe_infer_dist d;
    float logp[T * MAXC];
    int32_t ids[T * MAXC];
    int32_t count[T];
} dist_buf;

static void dist_init(dist_buf *b, int64_t stride)
{
    b->d = (moe_infer_dist){.logp = b->logp, .ids = b->ids, .count = b->count, .stride = stride};
}

/* One call on both decoders; the wanted rows must agree. */
static void call(moe_comm *c, moe_infer_decoder *a, moe_infer_decoder *r, dist_buf *x, dist_buf *y,
                 const int32_t *tok, const int *seq, int n, const uint8_t *want, const char *what)
{
    CHECK(moe_infer_decode_dist(a, &x->d, tok, seq, n, want) == MOE_OK);
    CHECK(moe_infer_decode_dist(r, &y->d, tok, seq, n, want) == MOE_OK);
    double worst = 0;
    for (int i = 0; i < n; i++) {
        if (want && !want[i]) continue;
        CHECK(x->count[i] == y->count[i]);
        const size_t o = (size_t)i * (size_t)x->d.stride;
        for (int j = 0; j < x->count[i] && j < y->count[i]; j++) {
            if (!x->d.dense) CHECK(x->ids[o + j] == y->ids[o + j]);
            const double e = fabs((double)x->logp[o + j] - y->logp[o + j]) / fmax(1.0, fabs(y->logp[o + j]));
            worst = fmax(worst, e);
        }
        /* (out of rank order the vocabulary-expert head runs every row on
         * every rank, whose expert GEMMs group rows differently: not bitwise) */
        if (x->d.dense) CHECK(tl_same_everywhere(c, MOE_SCOPE_WORLD, x->logp + o, (size_t)x->count[i]));
    }
    CHECK(worst <= 2e-4);
    if (rank == 0) printf("%-34s n=%2d  worst relative difference %.2e\n", what, n, worst);
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK) return 2;
    moe_comm *c = NULL;
    const int ep = argc > 1 ? atoi(argv[1]) : 0;
    if (moe_comm_create_world(&c, ep) != MOE_OK) return 2;
    rank = moe_comm_rank(c);
    const int arch = argc > 2 && !strcmp(argv[2], "arch"), vocab = argc > 2 && !strcmp(argv[2], "vocab");
    moe_train_config cfg;
    tl_config_equiv(&cfg, T, 4, 8, 1); /* both blocks MoE, capacity 1: drops happen */
    cfg.ep_size = ep;
    if (arch) {
        tl_config_every_option(&cfg);
        cfg.n_kv_heads = 2;
        cfg.tie_embeddings = 0;
        cfg.n_shared = 1;
        cfg.group_seqs = 1; /* a decoding call is one routing group */
    }
    moe_vocab_part *part = NULL;
    if (vocab) {
        cfg.head = MOE_HEAD_VOCAB_EXPERTS;
        cfg.vocab_experts = 8;
        int32_t assign[256];
        for (int v = 0; v < 256; v++) assign[v] = v % 8;
        CHECK(moe_vocab_part_create(&part, assign, 256, 8) == MOE_OK);
    }
    moe_trainer *tr = NULL, *ref = NULL;
    CHECK(moe_trainer_create(&tr, &cfg, part, c) == MOE_OK);
    CHECK(moe_trainer_create(&ref, &cfg, part, moe_comm_self()) == MOE_OK);
    if (fails) return 1;
    moe_model *m = moe_trainer_model(tr), *mr = moe_trainer_model(ref);
    /* larger weights than the init's, so that the logits and the routing
     * depend on every layer; the same on every rank and in the reference,
     * row by row of each tensor (experts: by global row) */
    for (moe_model *mm = m; mm; mm = mm == m ? mr : NULL) {
        float *p = moe_model_params(mm);
        for (size_t i = 0; i < moe_model_tensors(mm)->total; i++) p[i] *= 8.0f;
    }
    if (vocab) {
        CHECK(moe_model_set_vocab_top_k(m, 2) == MOE_OK);
        CHECK(moe_model_set_vocab_top_k(mr, 2) == MOE_OK);
    }
    moe_infer_decoder *a = NULL, *r = NULL;
    CHECK(moe_infer_decoder_create(&a, m, S) == MOE_OK);
    CHECK(moe_infer_decoder_create(&r, mr, S) == MOE_OK);
    if (fails) return 1;
    /* a decoder that holds tokens refuses the split */
    {
        moe_infer_decoder *late = NULL;
        CHECK(moe_infer_decoder_create(&late, m, S) == MOE_OK);
        if (fails) return 1;
        static dist_buf tmp;
        dist_init(&tmp, moe_infer_decoder_dist_stride(late));
        const int32_t t0 = 1;
        const int s0 = 0;
        CHECK(moe_infer_decode_dist(late, &tmp.d, &t0, &s0, 1, NULL) == MOE_OK);
        CHECK(moe_infer_decoder_set_split(late) == (moe_comm_ep_size(c) == 1 ? MOE_OK : MOE_ERR_ARG));
        moe_infer_decoder_destroy(late);
    }
    CHECK(moe_infer_decoder_set_split(a) == MOE_OK);
    const int64_t stride = moe_infer_decoder_dist_stride(a);
    CHECK(stride <= MAXC && stride == moe_infer_decoder_dist_stride(r));
    if (fails) return 1;
    static dist_buf x, y;
    dist_init(&x, stride);
    dist_init(&y, stride);

    int32_t tok[T];
    int seq[T];
    uint8_t want[T];
    /* the prompt pass of each sequence (4 tokens; its last row wanted) */
    for (int s = 0; s < S; s++) {
        for (int i = 0; i < 4; i++) {
            tok[i] = (int32_t)(200.0 * moe_rng_uniform(5, MOE_RNG_DATA, (uint32_t)i, (uint32_t)s, 0, 0));
            seq[i] = s;
            want[i] = i == 3;
        }
        call(c, a, r, &x, &y, tok, seq, 4, want, "prompt pass of one sequence");
    }
    /* steps over every sequence, in order and reversed */
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < S; i++) {
            seq[i] = k == 2 ? S - 1 - i : i;
            tok[i] = (int32_t)(200.0 * moe_rng_uniform(6, MOE_RNG_DATA, (uint32_t)i, (uint32_t)k, 0, 0));
        }
        call(c, a, r, &x, &y, tok, seq, S, NULL, k == 2 ? "step, sequences reversed" : "step, sequences in order");
    }
    /* one sequence only: every other rank has no row */
    seq[0] = 1;
    tok[0] = 17;
    call(c, a, r, &x, &y, tok, seq, 1, NULL, "step of one sequence");
    /* several tokens of several sequences, interleaved */
    const int mix[6] = {3, 0, 3, 4, 0, 2};
    for (int i = 0; i < 6; i++) {
        seq[i] = mix[i];
        tok[i] = (int32_t)(40 + 7 * i);
    }
    call(c, a, r, &x, &y, tok, seq, 6, NULL, "several tokens, interleaved");
    for (int s = 0; s < S; s++) CHECK(moe_infer_decoder_length(a, s) == moe_infer_decoder_length(r, s));

    moe_infer_decoder_destroy(a);
    moe_infer_decoder_destroy(r);
    moe_trainer_destroy(tr);
    moe_trainer_destroy(ref);
    moe_vocab_part_destroy(part);
    const int all = moe_comm_agree(c, fails ? MOE_ERR_ARG : MOE_OK) != MOE_OK;
    if (rank == 0) printf("%s\n", all ? "FAILED" : "passed");
    moe_comm_destroy(c);
    moe_comm_finalize();
    return all;
}
