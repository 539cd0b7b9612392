/* The training engine over W ranks against a single-process run of the same
 * global batch (every rank runs that reference too, on moe_comm_self()): initial
 * weights bitwise equal to the reference rows, then for 10 steps losses and
 * gradient norms within 1e-4 relative, identical per-expert update counts,
 * final parameters close to the reference, dense parameters bitwise equal on
 * every rank and expert replicas bitwise equal to each other. Router noise
 * is on (keyed by global token), capacity drops happen. A non-finite value
 * on one rank gives MOE_ERR_NONFINITE on all of them with nothing applied.
 * With `arch` every architecture and router option is on (RMSNorm, RoPE,
 * GQA, per-head q/k norm, no biases, untied head, sigmoid scores, expert
 * bias, group-limited routing, the per-sequence balance loss over 2
 * sequences, gated shared experts): the same checks, and the expert bias
 * after the steps is bitwise the single-process one (integer loads).
 * With `vocab` the model has the vocabulary-expert head (M = 8 experts
 * sharded over the ep group, one of them idle): losses within 1e-5, the
 * same expert loads and per-expert update counts, the idle expert's rows
 * bitwise unchanged.
 * Usage: test_train_mpi [EP_SIZE [layer-nan | arch | vocab]] (EP_SIZE 0 or absent: world size). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "core/rng.h"
#include "train/train.h"

#include "check_mpi.h"
#include "testlib.h"

enum { GB = 8, T = 16, STEPS = 10 };

static int fails, rank;

static int vocab; /* the vocabulary-expert head */

static void config(moe_train_config *c, int ep)
{
    tl_config_equiv(c, T, 4, GB, STEPS); /* both blocks MoE */
    c->ep_size = ep;
    if (vocab) {
        c->head = MOE_HEAD_VOCAB_EXPERTS;
        c->vocab_experts = 8;
    }
}

/* Round robin over experts 0..6 of the ids 0..199; the rest (no data ever
 * targets them: global_batch draws ids below 200) to expert 7, which stays
 * idle. */
static moe_vocab_part *partition(void)
{
    int32_t assign[256];
    for (int v = 0; v < 256; v++) assign[v] = v < 200 ? v % 7 : 7;
    moe_vocab_part *p = NULL;
    CHECK(moe_vocab_part_create(&p, assign, 256, 8) == MOE_OK);
    return p;
}

static void config_arch(moe_train_config *c)
{
    tl_config_every_option(c);
    c->n_kv_heads = 2;
    c->tie_embeddings = 0;
    c->route_scale = 2.0;
    c->n_shared = 1;
}

/* Sequence s of step k (T + 1 bytes: inputs then shifted targets). */
static void global_batch(int32_t *in, int32_t *tg, int k)
{
    for (int s = 0; s < GB; s++)
        for (int t = 0; t <= T; t++) {
            const int32_t v = (int32_t)((vocab ? 200.0 : 256.0) *
                                        moe_rng_uniform(9, MOE_RNG_DATA, (uint32_t)t, (uint32_t)s, (uint32_t)k, 0));
            if (t < T) in[s * T + t] = v;
            if (t > 0) tg[s * T + t - 1] = v;
        }
}

/* Offset in the reference (all experts local) of local row r of t: by row
 * id for the vocabulary experts' rows. */
static size_t ref_row(const moe_tensor_table *ref, const moe_tensor *t, int64_t r)
{
    for (int i = 0; i < ref->n; i++) {
        const moe_tensor *x = &ref->t[i];
        if (strcmp(x->name, t->name)) continue;
        int64_t rr = t->row0 + r;
        if (t->row_ids)
            for (rr = 0; rr < x->rows && x->row_ids[rr] != t->row_ids[r];) rr++;
        return x->offset + (size_t)(rr * moe_tensor_row_numel(t));
    }
    return (size_t)-1;
}

/* 1 if the local tensor t of block a equals (bitwise) the reference's rows. */
static int same_as_ref(const moe_tensor_table *ref, const moe_tensor *t, const float *a, const float *b)
{
    const size_t row = (size_t)moe_tensor_row_numel(t);
    for (int64_t r = 0; r < t->rows; r++)
        if (memcmp(a + t->offset + (size_t)r * row, b + ref_row(ref, t, r), row * sizeof(float))) return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK) return 2;
    moe_comm *c = NULL;
    if (moe_comm_create_world(&c, argc > 1 ? atoi(argv[1]) : 0) != MOE_OK) return 2;
    rank = moe_comm_rank(c);
    vocab = argc > 2 && !strcmp(argv[2], "vocab");
    const int W = moe_comm_size(c), Bl = GB / W;
    moe_train_config cfg;
    config(&cfg, argc > 1 ? atoi(argv[1]) : 0);
    const int arch = argc > 2 && !strcmp(argv[2], "arch");
    if (arch) config_arch(&cfg);
    moe_vocab_part *part = vocab ? partition() : NULL;

    moe_trainer *tr = NULL, *ref = NULL;
    CHECK(moe_trainer_create(&tr, &cfg, part, c) == MOE_OK);
    CHECK(moe_trainer_create(&ref, &cfg, part, moe_comm_self()) == MOE_OK);
    if (fails) return 1;
    moe_model *m = moe_trainer_model(tr), *mr = moe_trainer_model(ref);
    const moe_tensor_table *tab = moe_model_tensors(m), *rtab = moe_model_tensors(mr);
    float *init = malloc(tab->total * sizeof(float));
    memcpy(init, moe_model_params(m), tab->total * sizeof(float));

    /* the initial weights do not depend on the number of ranks */
    for (int i = 0; i < tab->n; i++) CHECK(same_as_ref(rtab, &tab->t[i], moe_model_params(m), moe_model_params(mr)));

    int32_t in[GB * T], tg[GB * T];
    float bias_moved = 0; /* largest |b_e| seen after any step */
    for (int k = 0; k < STEPS; k++) {
        global_batch(in, tg, k);
        moe_train_stats s, sr;
        CHECK(moe_trainer_step(tr, in + rank * Bl * T, tg + rank * Bl * T, k, &s) == MOE_OK);
        CHECK(moe_trainer_step(ref, in, tg, k, &sr) == MOE_OK);
        CHECK(fabs(s.model.loss - sr.model.loss) <= (vocab ? 1e-5 : 1e-4) * fabs(sr.model.loss));
        CHECK(s.active_vocab_experts == sr.active_vocab_experts && s.model.vocab_covered == sr.model.vocab_covered);
        for (int j = 0; j < s.model.vocab_experts; j++) CHECK(s.model.vocab_tokens[j] == sr.model.vocab_tokens[j]);
        CHECK(fabs(s.grad_norm - sr.grad_norm) <= 1e-4 * sr.grad_norm);
        CHECK(s.model.tokens == GB * T && s.active_experts == sr.active_experts);
        for (int j = 0; j < s.model.n_moe_layers * s.model.n_experts; j++)
            CHECK(s.model.kept[j] == sr.model.kept[j] && s.model.dropped[j] == sr.model.dropped[j]);
        if (rank == 0)
            printf("step %d: loss %.6f (1 process %.6f) norm %.5f dropped %lld\n", k, s.model.loss,
                   sr.model.loss, s.grad_norm, (long long)s.model.dropped[0]);
        for (int l = 0; arch && l < cfg.n_layers; l++) {
            const float *b = moe_model_param(m, MOE_T_EXP_BIAS, l);
            for (int e = 0; e < cfg.n_experts; e++) bias_moved = fmaxf(bias_moved, fabsf(b[e]));
        }
    }

    /* a NaN reaching the MoE layer on the last rank only, then an Inf loss
     * there: MOE_ERR_NONFINITE on every rank, nothing changed, nobody hangs */
    const size_t total = tab->total;
    float *snap = malloc(total * sizeof(float));
    memcpy(snap, moe_model_params(m), total * sizeof(float));
    /* With replicas (W > P) the NaN case is run only on request (layer-nan):
     * moe_layer_forward agrees over WORLD after its ep-group count exchange,
     * which the failing ep group skips (see the report to the lead). */
    const int layer_nan = W == moe_comm_ep_size(c) || (argc > 2 && !strcmp(argv[2], "layer-nan"));
    const char *poison[2] = {"wte", vocab ? "vocab_head/router/weight" : "ln_f/weight"};
    for (int k = !layer_nan; k < 2; k++) {
        global_batch(in, tg, 0);
        in[rank * Bl * T] = 0; /* wte row 0 is used on every rank */
        float *x = NULL;
        for (int i = 0; i < tab->n; i++)
            if (!strcmp(tab->t[i].name, poison[k])) x = moe_model_params(m) + tab->t[i].offset;
        const float saved = x[0];
        if (rank == W - 1) x[0] = k == 0 ? NAN : INFINITY;
        CHECK(moe_trainer_step(tr, in + rank * Bl * T, tg + rank * Bl * T, STEPS, NULL) == MOE_ERR_NONFINITE);
        x[0] = saved;
        CHECK(!memcmp(snap, moe_model_params(m), total * sizeof(float)));
    }
    free(snap);

    /* final state: close to the reference, replicas and dense copies identical */
    const size_t dense = moe_model_dense_floats(m);
    CHECK(tl_same_everywhere(c, MOE_SCOPE_WORLD, moe_model_params(m), dense));
    CHECK(tl_same_everywhere(c, MOE_SCOPE_REPLICA, moe_model_params(m) + dense, tab->total - dense));
    CHECK(tl_same_everywhere(c, MOE_SCOPE_REPLICA, moe_trainer_adam_v(tr) + dense, tab->total - dense));
    double d2 = 0, r2 = 0;
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        const size_t row = (size_t)moe_tensor_row_numel(t);
        for (int64_t r = 0; r < t->rows; r++) {
            const float *p = moe_model_params(m) + t->offset + (size_t)r * row, *q = moe_model_params(mr) + ref_row(rtab, t, r);
            for (size_t j = 0; j < row; j++) {
                d2 += ((double)p[j] - q[j]) * ((double)p[j] - q[j]);
                r2 += (double)q[j] * q[j];
            }
        }
    }
    CHECK(sqrt(d2 / r2) < 1e-4);
    if (vocab) {
        /* the vocabulary experts: update counts as one process, the idle one's rows untouched */
        moe_vocab_ep *vh = moe_model_vocab_head(m);
        const int Ml = moe_vocab_ep_n_local(vh), m0 = moe_vocab_ep_expert0(vh);
        for (int j = 0; j < Ml; j++) CHECK(moe_trainer_vocab_steps(tr)[j] == moe_trainer_vocab_steps(ref)[m0 + j]);
        CHECK(moe_trainer_vocab_steps(ref)[7] == 0 && moe_trainer_vocab_steps(ref)[0] == STEPS);
        for (int i = 0; i < tab->n; i++) {
            const moe_tensor *t = &tab->t[i];
            if (!t->row_ids) continue;
            const size_t row = (size_t)moe_tensor_row_numel(t);
            for (int64_t r = 0; r < t->rows; r++) {
                if (moe_vocab_part_assign(part)[t->row_ids[r]] != 7) continue;
                const size_t o = t->offset + (size_t)r * row;
                CHECK(!memcmp(moe_model_params(m) + o, init + o, row * sizeof(float)));
                for (size_t j = 0; j < row; j++) CHECK(moe_trainer_adam_m(tr)[o + j] == 0 && moe_trainer_adam_v(tr)[o + j] == 0);
            }
        }
    }
    const int El = moe_layer_n_local_experts(moe_model_layer(m, 0)), e0 = moe_layer_expert0(moe_model_layer(m, 0));
    for (int i = 0; i < moe_model_n_moe_layers(m); i++)
        for (int j = 0; j < El; j++)
            CHECK(moe_trainer_expert_steps(tr)[i * El + j] == moe_trainer_expert_steps(ref)[i * cfg.n_experts + e0 + j]);
    CHECK(moe_trainer_updates(tr) == STEPS);
    for (int l = 0; arch && l < cfg.n_layers; l++) {
        /* the bias moved, by the same integer loads as one process: bitwise equal */
        const float *b = moe_model_param(m, MOE_T_EXP_BIAS, l), *br = moe_model_param(mr, MOE_T_EXP_BIAS, l);
        CHECK(b && br && !memcmp(b, br, (size_t)cfg.n_experts * sizeof(float)));
        if (rank == 0) printf("expert_bias h/%d: %g %g %g %g\n", l, b[0], b[1], b[2], b[3]);
    }
    CHECK(!arch || bias_moved > 0);

    free(init);
    moe_vocab_part_destroy(part);
    moe_trainer_destroy(ref);
    moe_trainer_destroy(tr);
    moe_comm_destroy(c);
    moe_comm_finalize();
    if (fails) fprintf(stderr, "rank %d: %d check(s) failed\n", rank, fails);
    return fails ? 1 : 0;
}
