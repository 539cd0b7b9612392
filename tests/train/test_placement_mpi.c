/* Expert placement (docs/routing.md "Expert placement") over W ranks
 * against a single-process run of the same global batch, for STEPS steps:
 *   permute   E = 8 over the ep group, each MoE layer with its own permuted
 *             placement (experts not in contiguous blocks), against one
 *             process AND against the same ranks with contiguous blocks;
 *   replicas  E = 6 with R = 2 extra copies (4 ranks: 2 experts per rank;
 *             two experts of each layer on two ranks each);
 *   replicas_dp  the same over an ep group of 2 (4 experts per rank), two
 *             data-parallel replicas of it: the copies' gradients are also
 *             summed over the replicas and must stay bitwise equal.
 * Checks: initial weights bitwise those of one process (rows keyed by global
 * expert), losses and gradient norms within 1e-5 relative, the same
 * per-expert update counts, final parameters close to one process; with
 * replicas every copy of an expert bitwise equal to its primary copy in
 * weights and both AdamW moments. Expert 0 of block 0 (replicated in the
 * replica modes) is kept idle by a fixed selection bias: every copy keeps
 * its weights bitwise, zero moments and expert_step 0. Then a checkpoint written under the
 * placement loads on one process (and, permute, on the contiguous ranks)
 * into exactly the primary copies' values.
 * Usage: test_placement_mpi permute|replicas|replicas_dp (world size 4). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "comm/comm.h"
#include "core/rng.h"
#include "layout/placement.h"
#include "train/train.h"

#include "check_mpi.h"
#include "testlib.h"

enum { GB = 8, T = 16, STEPS = 8 };

static int fails, rank;

static void config(moe_train_config *c, int E)
{
    tl_config_equiv(c, T, E, GB, STEPS); /* both blocks MoE */
    /* a selection bias that never moves: -1e4 on expert 0 of block 0 keeps
     * it idle everywhere (main), so its copies must stay bitwise as they were */
    c->expert_bias = 1;
    c->bias_update_rate = 0;
}

enum { IDLE = 0 }; /* the idle expert of block 0 */

static void make_idle(moe_trainer *tr)
{
    if (tr) moe_model_param(moe_trainer_model(tr), MOE_T_EXP_BIAS, 0)[IDLE] = -1e4f;
}

static void global_batch(int32_t *in, int32_t *tg, int k)
{
    for (int s = 0; s < GB; s++)
        for (int t = 0; t <= T; t++) {
            const int32_t v = (int32_t)(256.0 * moe_rng_uniform(9, MOE_RNG_DATA, (uint32_t)t, (uint32_t)s, (uint32_t)k, 0));
            if (t < T) in[s * T + t] = v;
            if (t > 0) tg[s * T + t - 1] = v;
        }
}

/* Global expert of local row r of expert tensor t. */
static int64_t global_row(const moe_tensor *t, int64_t r) { return t->row_ids ? t->row_ids[r] : t->row0 + r; }

/* The reference (one process) offset of tensor t's global row g. */
static size_t ref_off(const moe_tensor_table *ref, const moe_tensor *t, int64_t g)
{
    for (int i = 0; i < ref->n; i++)
        if (!strcmp(ref->t[i].name, t->name)) return ref->t[i].offset + (size_t)(g * moe_tensor_row_numel(t));
    return (size_t)-1;
}

/* Every FFN expert tensor of `block` as a whole [E, ...] array on every
 * rank, from its primary copies (a sum with one non-zero term per element:
 * exact). Then every non-primary copy must equal it bitwise. Returns the
 * gathered arrays' maximum relative distance to ref_block's rows. */
static double gather_check(moe_comm *c, const moe_tensor_table *tab, const float *block, const moe_tensor_table *rtab,
                           const float *ref_block, const char *what)
{
    double d2 = 0, r2 = 0;
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        if (!t->expert_sharded) continue;
        const size_t row = (size_t)moe_tensor_row_numel(t), E = (size_t)t->shape[0];
        float *all = calloc(E * row, sizeof *all);
        for (int64_t r = 0; r < t->rows; r++)
            if (!t->row_primary || t->row_primary[r])
                memcpy(all + global_row(t, r) * row, block + t->offset + r * row, row * sizeof(float));
        CHECK(moe_comm_allreduce_f32(c, MOE_SCOPE_EP, all, E * row) == MOE_OK);
        for (int64_t r = 0; r < t->rows; r++)
            if (t->row_primary && !t->row_primary[r] &&
                memcmp(all + global_row(t, r) * row, block + t->offset + r * row, row * sizeof(float))) {
                fprintf(stderr, "rank %d: %s: the copy of expert %lld in %s differs from its primary copy\n", rank,
                        what, (long long)global_row(t, r), t->name);
                fails++;
            }
        const float *q = ref_block + ref_off(rtab, t, 0);
        for (size_t j = 0; j < E * row; j++) {
            d2 += ((double)all[j] - q[j]) * ((double)all[j] - q[j]);
            r2 += (double)q[j] * q[j];
        }
        free(all);
    }
    return r2 > 0 ? sqrt(d2 / r2) : sqrt(d2);
}

/* Writes the placement file (rank 0), seen by every rank after a barrier. */
static void write_placement(moe_comm *c, const char *path, int E, int P, int S, const int *slots)
{
    moe_placement *p = NULL;
    CHECK(moe_placement_create(&p, 2, E, P, S, slots, "test") == MOE_OK);
    if (rank == 0) CHECK(moe_placement_save(p, NULL, path) == MOE_OK);
    moe_placement_destroy(p);
    CHECK(moe_comm_barrier(c) == MOE_OK);
}

/* A checkpoint of trainer tr at its current step (global expert steps
 * from its local slots). */
static moe_status save(moe_trainer *tr, const moe_train_config *cfg, const char *path, moe_comm *c)
{
    moe_model *m = moe_trainer_model(tr);
    const int n_moe = moe_model_n_moe_layers(m), E = cfg->n_experts, El = moe_model_n_local_experts(m);
    int64_t *steps = calloc((size_t)n_moe * E * 3, sizeof *steps);
    for (int l = 0; l < n_moe; l++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(m, moe_model_moe_blocks(m)[l]));
        for (int j = 0; j < El; j++) steps[l * E + ids[j]] = moe_trainer_expert_steps(tr)[l * El + j];
    }
    moe_ckpt_state s = {.table = moe_model_tensors(m), .params = moe_model_params(m), .m = moe_trainer_adam_m(tr),
                        .v = moe_trainer_adam_v(tr), .n_experts = E, .expert_step = steps,
                        .expert_tokens = steps + n_moe * E, .expert_dropped = steps + 2 * n_moe * E,
                        .opt_step = moe_trainer_updates(tr), .lr = cfg->lr, .beta1 = cfg->beta1, .beta2 = cfg->beta2,
                        .eps = cfg->adam_eps, .weight_decay = cfg->weight_decay, .step = STEPS, .seed = cfg->seed,
                        .config_text = "", .cfg = cfg};
    moe_status st = moe_ckpt_save(path, c, &s);
    free(steps);
    return st;
}

/* Loads path into trainer tr (weights, moments, expert steps) and checks
 * every local row bitwise against the saving trainer's gathered arrays. */
static void load_check(moe_trainer *tr, const moe_train_config *cfg, const char *path, moe_comm *c,
                       moe_trainer *saved, moe_comm *sc)
{
    moe_model *m = moe_trainer_model(tr);
    const int n_moe = moe_model_n_moe_layers(m), E = cfg->n_experts;
    int64_t *steps = calloc((size_t)n_moe * E, sizeof *steps);
    moe_ckpt_state s = {.table = moe_model_tensors(m), .params = moe_model_params(m), .m = moe_trainer_adam_m(tr),
                        .v = moe_trainer_adam_v(tr), .n_experts = E, .expert_step = steps, .cfg = cfg};
    CHECK(moe_ckpt_load(path, c, &s, NULL) == MOE_OK);
    /* the saving trainer's primary copies, gathered over its ep group */
    const moe_tensor_table *st = moe_model_tensors(moe_trainer_model(saved)), *lt = moe_model_tensors(m);
    const float *blocks[3] = {moe_model_params(moe_trainer_model(saved)), moe_trainer_adam_m(saved),
                              moe_trainer_adam_v(saved)};
    const float *mine[3] = {moe_model_params(m), moe_trainer_adam_m(tr), moe_trainer_adam_v(tr)};
    for (int b = 0; b < 3; b++)
        for (int i = 0; i < st->n; i++) {
            const moe_tensor *t = &st->t[i], *x = &lt->t[i];
            const size_t row = (size_t)moe_tensor_row_numel(t);
            if (!t->expert_sharded) {
                CHECK(!memcmp(blocks[b] + t->offset, mine[b] + x->offset, t->numel * sizeof(float)));
                continue;
            }
            const size_t n = (size_t)t->shape[0] * row;
            float *all = calloc(n, sizeof *all);
            for (int64_t r = 0; r < t->rows; r++)
                if (!t->row_primary || t->row_primary[r])
                    memcpy(all + global_row(t, r) * row, blocks[b] + t->offset + r * row, row * sizeof(float));
            CHECK(moe_comm_allreduce_f32(sc, MOE_SCOPE_EP, all, n) == MOE_OK);
            for (int64_t r = 0; r < x->rows; r++)
                CHECK(!memcmp(all + global_row(x, r) * row, mine[b] + x->offset + r * row, row * sizeof(float)));
            free(all);
        }
    /* expert steps: the file's global array, filled on every rank */
    moe_model *sm = moe_trainer_model(saved);
    const int El = moe_model_n_local_experts(sm);
    for (int l = 0; l < n_moe; l++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(sm, moe_model_moe_blocks(sm)[l]));
        for (int j = 0; j < El; j++) CHECK(steps[l * E + ids[j]] == moe_trainer_expert_steps(saved)[l * El + j]);
    }
    free(steps);
}

int main(int argc, char **argv)
{
    if (moe_comm_init(&argc, &argv) != MOE_OK) return 2;
    moe_comm *c = NULL;
    const int dp = argc > 1 && !strcmp(argv[1], "replicas_dp");
    if (moe_comm_create_world(&c, dp ? 2 : 0) != MOE_OK) return 2;
    rank = moe_comm_rank(c);
    const int W = moe_comm_size(c), Bl = GB / W, P = moe_comm_ep_size(c);
    const int replicas = dp || (argc > 1 && !strcmp(argv[1], "replicas"));
    if (W != 4 || argc < 2 || (!replicas && strcmp(argv[1], "permute"))) {
        if (rank == 0) fprintf(stderr, "usage: mpirun -np 4 test_placement_mpi permute|replicas|replicas_dp\n");
        moe_comm_destroy(c);
        moe_comm_finalize();
        return 2;
    }
    const int E = replicas ? 6 : 8, S = dp ? 4 : 2;
    /* (layer, rank, slot): any order inside a rank (the descriptor sorts) */
    static const int permuted[2 * 4 * 2] = {7, 2, 0, 5, 6, 1, 4, 3, /* layer 0 */
                                            3, 6, 5, 2, 0, 7, 1, 4}; /* layer 1 */
    static const int replicated[2 * 4 * 2] = {0, 1, 2, 3, 4, 0, 5, 1,  /* layer 0: 0 and 1 twice */
                                              0, 2, 1, 3, 2, 4, 3, 5}; /* layer 1: 2 and 3 twice */
    static const int replicated_dp[2 * 2 * 4] = {0, 1, 2, 3, 0, 1, 4, 5,  /* layer 0: 0 and 1 twice */
                                                 0, 2, 3, 4, 1, 2, 4, 5}; /* layer 1: 2 and 4 twice */
    moe_train_config cfg, cfg_placed;
    config(&cfg, E);
    cfg.ep_size = P;
    cfg_placed = cfg;
    write_placement(c, "placement.json", E, P, S, dp ? replicated_dp : replicas ? replicated : permuted);
    snprintf(cfg_placed.placement, sizeof cfg_placed.placement, "placement.json");

    moe_trainer *tr = NULL, *ref = NULL, *con = NULL;
    CHECK(moe_trainer_create(&tr, &cfg_placed, NULL, c) == MOE_OK);
    CHECK(moe_trainer_create(&ref, &cfg, NULL, moe_comm_self()) == MOE_OK);
    if (!replicas) CHECK(moe_trainer_create(&con, &cfg, NULL, c) == MOE_OK);
    if (fails) return 1;
    make_idle(tr), make_idle(ref), make_idle(con);
    moe_model *m = moe_trainer_model(tr), *mr = moe_trainer_model(ref);
    const moe_tensor_table *tab = moe_model_tensors(m), *rtab = moe_model_tensors(mr);
    CHECK(moe_model_n_local_experts(m) == S);
    float *init = malloc(tab->total * sizeof(float));
    memcpy(init, moe_model_params(m), tab->total * sizeof(float));

    /* initial weights: bitwise one process's rows, whatever rank holds them */
    CHECK(gather_check(c, tab, moe_model_params(m), rtab, moe_model_params(mr), "init") == 0.0);

    int32_t in[GB * T], tg[GB * T];
    for (int k = 0; k < STEPS; k++) {
        global_batch(in, tg, k);
        moe_train_stats s, sr, sc;
        CHECK(moe_trainer_step(tr, in + rank * Bl * T, tg + rank * Bl * T, k, &s) == MOE_OK);
        CHECK(moe_trainer_step(ref, in, tg, k, &sr) == MOE_OK);
        CHECK(fabs(s.model.loss - sr.model.loss) <= 1e-5 * fabs(sr.model.loss));
        CHECK(fabs(s.grad_norm - sr.grad_norm) <= 1e-5 * sr.grad_norm);
        CHECK(s.active_experts == sr.active_experts);
        for (int j = 0; j < s.model.n_moe_layers * s.model.n_experts; j++)
            CHECK(s.model.kept[j] == sr.model.kept[j] && s.model.dropped[j] == sr.model.dropped[j]);
        if (con) {
            CHECK(moe_trainer_step(con, in + rank * Bl * T, tg + rank * Bl * T, k, &sc) == MOE_OK);
            CHECK(fabs(s.model.loss - sc.model.loss) <= 1e-5 * fabs(sc.model.loss));
        }
        if (rank == 0)
            printf("step %d: loss %.7f (1 process %.7f%s) norm %.6f (%.6f)\n", k, s.model.loss, sr.model.loss,
                   con ? ", contiguous ranks" : "", s.grad_norm, sr.grad_norm);
        if (rank == 0 && con) printf("        contiguous %d ranks: loss %.7f\n", W, sc.model.loss);
    }

    /* final state: copies bitwise equal, close to one process */
    const double dist = gather_check(c, tab, moe_model_params(m), rtab, moe_model_params(mr), "weights");
    gather_check(c, tab, moe_trainer_adam_m(tr), rtab, moe_trainer_adam_m(ref), "adam m");
    gather_check(c, tab, moe_trainer_adam_v(tr), rtab, moe_trainer_adam_v(ref), "adam v");
    if (rank == 0) printf("expert weights vs one process: relative distance %.3g\n", dist);
    CHECK(dist < 1e-4);
    const int El = moe_model_n_local_experts(m);
    for (int i = 0; i < moe_model_n_moe_layers(m); i++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(m, moe_model_moe_blocks(m)[i]));
        for (int j = 0; j < El; j++)
            CHECK(moe_trainer_expert_steps(tr)[i * El + j] == moe_trainer_expert_steps(ref)[i * E + ids[j]]);
    }

    /* the idle expert: every copy as it started, no moments, no update */
    int idle_rows = 0;
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        if (!t->expert_sharded || t->layer != 0) continue;
        const size_t row = (size_t)moe_tensor_row_numel(t);
        for (int64_t r = 0; r < t->rows; r++) {
            if (global_row(t, r) != IDLE) continue;
            const size_t o = t->offset + (size_t)r * row;
            CHECK(!memcmp(moe_model_params(m) + o, init + o, row * sizeof(float)));
            for (size_t j = 0; j < row; j++) CHECK(moe_trainer_adam_m(tr)[o + j] == 0 && moe_trainer_adam_v(tr)[o + j] == 0);
            idle_rows++;
        }
    }
    const int *ids0 = moe_layer_local_experts(moe_model_layer(m, moe_model_moe_blocks(m)[0]));
    for (int j = 0; j < El; j++)
        if (ids0[j] == IDLE) CHECK(moe_trainer_expert_steps(tr)[j] == 0);
    CHECK(moe_trainer_expert_steps(ref)[IDLE] == 0 && moe_trainer_expert_steps(ref)[IDLE + 1] == STEPS);
    double holders = idle_rows > 0; /* ranks of the ep group holding a copy of it */
    CHECK(moe_comm_allreduce_f64(c, MOE_SCOPE_EP, &holders, 1) == MOE_OK);
    CHECK(holders == (replicas ? 2 : 1));

    /* a checkpoint under the placement: on one process, and on the contiguous ranks */
    CHECK(save(tr, &cfg_placed, "placed.h5", c) == MOE_OK);
    moe_trainer *one = NULL;
    CHECK(moe_trainer_create(&one, &cfg, NULL, moe_comm_self()) == MOE_OK);
    if (one) load_check(one, &cfg, "placed.h5", moe_comm_self(), tr, c);
    if (con) load_check(con, &cfg, "placed.h5", c, tr, c);
    /* and back: the one-process reference's checkpoint loads under the placement */
    if (rank == 0) CHECK(save(ref, &cfg, "ref.h5", moe_comm_self()) == MOE_OK);
    CHECK(moe_comm_barrier(c) == MOE_OK);
    moe_trainer *back = NULL;
    CHECK(moe_trainer_create(&back, &cfg_placed, NULL, c) == MOE_OK);
    if (back) load_check(back, &cfg_placed, "ref.h5", c, ref, moe_comm_self());

    free(init);
    moe_trainer_destroy(back);
    moe_trainer_destroy(one);
    moe_trainer_destroy(con);
    moe_trainer_destroy(ref);
    moe_trainer_destroy(tr);
    moe_comm_destroy(c);
    moe_comm_finalize();
    if (fails) fprintf(stderr, "rank %d: %d check(s) failed\n", rank, fails);
    return fails ? 1 : 0;
}
