/* The training step (train.h): forward/backward, bucketed gradient
 * reduction, clipping by the global norm, AdamW restricted to activated
 * experts, learning-rate schedule. */
#include "train/train.h"

#include <math.h>
#include <string.h>

#include "core/par.h"

enum { SUMSQ_CHUNK = 1 << 16 }; /* floats per partial sum of the gradient norm */

/* One contiguous run of parameters AdamW updates with one bias-correction step. */
typedef struct {
    size_t offset, n;
    float wd;
    int64_t t;
} adam_seg;

struct moe_trainer {
    moe_train_config cfg;
    moe_comm *comm;
    int W, n_replicas, replica, B;
    moe_model *model;
    float *m, *v;              /* (table.total) AdamW moments */
    int n_moe, El;
    int64_t *expert_steps;     /* (n_moe, El) */
    uint8_t *active;           /* (n_moe, El) activated in the current step */
    int Ml, m0;                /* local vocabulary experts (0 with head = full), the first one's index */
    int64_t *vocab_steps;      /* (Ml) */
    uint8_t *vocab_active;     /* (Ml) some position's target in the current step */
    int64_t updates;
    double *sumsq_part;        /* (ceil(total / SUMSQ_CHUNK)) partial sums of squares */
    adam_seg *segs;            /* (table.n * max(El, 1)) AdamW work list of a step: at most one per tensor or expert row block */
};

moe_status moe_trainer_create(moe_trainer **out, const moe_train_config *cfg, const moe_vocab_part *vocab,
                              moe_comm *comm)
{
    *out = NULL;
    if (!comm) return moe_errorf(MOE_ERR_ARG, "trainer: no communicator (one process: moe_comm_create_self)");
    const int W = moe_comm_size(comm);
    if (cfg->batch_size < 1 || cfg->batch_size % W)
        return moe_errorf(MOE_ERR_ARG, "batch_size=%d must be a positive multiple of the world size %d",
                          cfg->batch_size, W);
    const int B = cfg->batch_size / W;
    if (cfg->group_seqs < 1 || B % cfg->group_seqs)
        return moe_errorf(MOE_ERR_ARG, "local sequences per step %d (batch_size/%d ranks) not a multiple of group_seqs=%d",
                          B, W, cfg->group_seqs);
    moe_trainer *tr = moe_calloc(1, sizeof *tr);
    if (!tr) return moe_errorf(MOE_ERR_NOMEM, "trainer");
    tr->cfg = *cfg;
    tr->comm = comm;
    tr->W = W;
    tr->B = B;
    tr->n_replicas = moe_comm_n_replicas(comm);
    tr->replica = moe_comm_replica(comm);
    moe_status st = moe_model_create(&tr->model, cfg, vocab, B, comm);
    if (!st) {
        const size_t total = moe_model_tensors(tr->model)->total;
        tr->n_moe = moe_model_n_moe_layers(tr->model);
        tr->El = moe_model_n_local_experts(tr->model);
        tr->m = moe_calloc(total, sizeof(float));
        tr->v = moe_calloc(total, sizeof(float));
        tr->expert_steps = moe_calloc((size_t)tr->n_moe * tr->El, sizeof(int64_t));
        tr->active = moe_calloc((size_t)tr->n_moe * tr->El, 1);
        tr->sumsq_part = moe_calloc(total / SUMSQ_CHUNK + 1, sizeof(double));
        const int ntab = moe_model_tensors(tr->model)->n;
        moe_vocab_ep *vh = moe_model_vocab_head(tr->model);
        tr->Ml = vh ? moe_vocab_ep_n_local(vh) : 0;
        tr->m0 = vh ? moe_vocab_ep_expert0(vh) : 0;
        const int segs = tr->El > tr->Ml ? tr->El : tr->Ml;
        tr->segs = moe_calloc((size_t)ntab * (segs > 0 ? segs : 1), sizeof(adam_seg));
        tr->vocab_steps = moe_calloc((size_t)tr->Ml + 1, sizeof(int64_t));
        tr->vocab_active = moe_calloc((size_t)tr->Ml + 1, 1);
        if (!tr->m || !tr->v || !tr->expert_steps || !tr->active || !tr->sumsq_part || !tr->segs ||
            !tr->vocab_steps || !tr->vocab_active)
            st = moe_errorf(MOE_ERR_NOMEM, "optimizer state: 2 x %zu floats", total);
    }
    /* model creation agrees inside the MoE layers; the allocations above are local */
    st = moe_comm_agree(comm, st);
    if (st) {
        moe_trainer_destroy(tr);
        return st;
    }
    *out = tr;
    return MOE_OK;
}

void moe_trainer_destroy(moe_trainer *tr)
{
    if (!tr) return;
    moe_model_destroy(tr->model);
    moe_free(tr->m);
    moe_free(tr->v);
    moe_free(tr->expert_steps);
    moe_free(tr->active);
    moe_free(tr->sumsq_part);
    moe_free(tr->segs);
    moe_free(tr->vocab_steps);
    moe_free(tr->vocab_active);
    moe_free(tr);
}

moe_model *moe_trainer_model(moe_trainer *tr) { return tr->model; }
int moe_trainer_local_seqs(const moe_trainer *tr) { return tr->B; }
float *moe_trainer_adam_m(moe_trainer *tr) { return tr->m; }
float *moe_trainer_adam_v(moe_trainer *tr) { return tr->v; }
int64_t *moe_trainer_expert_steps(moe_trainer *tr) { return tr->expert_steps; }
int64_t *moe_trainer_vocab_steps(moe_trainer *tr) { return tr->Ml ? tr->vocab_steps : NULL; }
int64_t moe_trainer_updates(const moe_trainer *tr) { return tr->updates; }
void moe_trainer_set_updates(moe_trainer *tr, int64_t n) { tr->updates = n; }

double moe_train_lr(const moe_train_config *c, int64_t step)
{
    if (step < c->warmup_steps) return c->lr * (double)(step + 1) / c->warmup_steps;
    const double lo = c->lr * c->min_lr_frac;
    const int64_t span = c->steps - c->warmup_steps;
    if (span <= 0) return lo;
    double prog = (double)(step - c->warmup_steps) / (double)span;
    prog = prog > 1.0 ? 1.0 : prog;
    return lo + 0.5 * (c->lr - lo) * (1.0 + cos(M_PI * prog));
}


/* In-place sum of buf (n floats) over a scope, one collective per bucket. */
static moe_status allreduce_buckets(moe_comm *c, moe_comm_scope scope, float *buf, size_t n)
{
    for (size_t off = 0; off < n; off += MOE_TRAIN_BUCKET_FLOATS) {
        const size_t len = n - off < MOE_TRAIN_BUCKET_FLOATS ? n - off : MOE_TRAIN_BUCKET_FLOATS;
        const moe_status s = moe_comm_allreduce_f32(c, scope, buf + off, len);
        if (s) return s;
    }
    return MOE_OK;
}

/* Sum of squares in double over 8 interleaved accumulators: a single
 * running sum is one long dependency chain the compiler may not reorder. */
static double sum_sq_serial(const float *a, size_t n)
{
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)a[i + j] * a[i + j];
    for (; i < n; i++) acc[0] += (double)a[i] * a[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Fixed chunks (SUMSQ_CHUNK) whose partial sums are added in chunk order:
 * the norm does not depend on how many threads computed the chunks (dense
 * gradients are identical on every rank, and so must be their norm,
 * whatever each rank's thread count). */
typedef struct {
    const float *a;
    size_t n;
    double *part; /* (chunks) */
} sumsq_job;

static void sum_sq_run(void *ctx, int t, int nt)
{
    const sumsq_job *j = ctx;
    const long chunks = (long)((j->n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK);
    long c0, c1;
    moe_par_range(chunks, t, nt, &c0, &c1);
    for (long c = c0; c < c1; c++) {
        const size_t i0 = (size_t)c * SUMSQ_CHUNK, len = j->n - i0 < SUMSQ_CHUNK ? j->n - i0 : SUMSQ_CHUNK;
        j->part[c] = sum_sq_serial(j->a + i0, len);
    }
}

/* part: scratch of at least ceil(n / SUMSQ_CHUNK) doubles. */
static double sum_sq(const float *a, size_t n, double *part)
{
    const long chunks = (long)((n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK);
    sumsq_job j = {a, n, part};
    moe_par_run(moe_par_threads_for(chunks, 2), sum_sq_run, &j);
    double s = 0.0;
    for (long c = 0; c < chunks; c++) s += part[c];
    return s;
}

/* Dense gradients over WORLD; expert gradients (already summed over the ep
 * group by the layer) over the replicas of each expert. */
static moe_status reduce_grads(moe_trainer *tr)
{
    moe_model *m = tr->model;
    const size_t dense = moe_model_dense_floats(m), total = moe_model_tensors(m)->total;
    float *g = moe_model_grads(m);
    moe_status s = MOE_OK;
    s = allreduce_buckets(tr->comm, MOE_SCOPE_WORLD, g, dense);
    if (!s && tr->n_replicas > 1)
        s = allreduce_buckets(tr->comm, MOE_SCOPE_REPLICA, g + dense, total - dense);
    /* a placement's copies of one expert: equal bits again after the
     * replica sums (each ep rank reduced over its own communicator) */
    for (int i = 0; !s && tr->n_replicas > 1 && i < tr->n_moe; i++) {
        const int l = moe_model_moe_blocks(m)[i];
        moe_layer_params gv = moe_model_layer_grads(m, l);
        s = moe_layer_sync_copies(moe_model_layer(m, l), &gv);
    }
    return s;
}

/* Sum of squares of the expert rows whose copy is primary (a placement with
 * replicated experts: the other copies hold the same gradient). */
static double sum_sq_primary(moe_trainer *tr, const float *g)
{
    const moe_tensor_table *t = moe_model_tensors(tr->model);
    double s = 0.0;
    for (int i = 0; i < t->n; i++) {
        const moe_tensor *x = &t->t[i];
        if (!x->expert_sharded || x->role == MOE_TENSOR_BUFFER) continue;
        const size_t row = (size_t)moe_tensor_row_numel(x);
        for (int64_t r = 0; r < x->rows; r++)
            if (!x->row_primary || x->row_primary[r]) s += sum_sq(g + x->offset + (size_t)r * row, row, tr->sumsq_part);
    }
    return s;
}

/* 1 when some local expert row is a non-primary copy. */
static int has_copies(const moe_tensor_table *t)
{
    for (int i = 0; i < t->n; i++)
        for (int64_t r = 0; t->t[i].row_primary && r < t->t[i].rows; r++)
            if (!t->t[i].row_primary[r]) return 1;
    return 0;
}

/* Squared L2 norm of the whole reduced gradient with every parameter counted
 * once: the dense part is identical on all ranks (counted locally), each
 * expert is counted by its replica-0 holder only, and of an expert with
 * several copies in the ep group (a placement's replicas) by its primary
 * copy only. The sum over WORLD gives every rank the same value, so all
 * ranks take the same clip / skip decision. */
static moe_status grad_norm_sq(moe_trainer *tr, double *out)
{
    moe_model *m = tr->model;
    const size_t dense = moe_model_dense_floats(m), total = moe_model_tensors(m)->total;
    const float *g = moe_model_grads(m);
    double experts = tr->replica != 0                             ? 0.0
                     : has_copies(moe_model_tensors(m))           ? sum_sq_primary(tr, g)
                                                                  : sum_sq(g + dense, total - dense, tr->sumsq_part);
    const moe_status s = moe_comm_allreduce_f64(tr->comm, MOE_SCOPE_WORLD, &experts, 1);
    if (s) return s;
    *out = sum_sq(g, dense, tr->sumsq_part) + experts;
    return MOE_OK;
}

typedef struct {
    float lr, b1, b2, eps, gscale;
} adam_hyper;

/* AdamW over n elements at bias-correction step t (>= 1). */
MOE_TARGET_CLONES static void adamw(float *restrict p, float *restrict m, float *restrict v,
                                    const float *restrict g, size_t n, const adam_hyper *h, float wd,
                                    int64_t t)
{
    const float ib1 = (float)(1.0 / (1.0 - pow(h->b1, (double)t)));
    const float ib2 = (float)(1.0 / (1.0 - pow(h->b2, (double)t)));
    const float b1 = h->b1, b2 = h->b2, gs = h->gscale, lr = h->lr, eps = h->eps;
    for (size_t i = 0; i < n; i++) {
        const float gi = g[i] * gs;
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * ib1 / (sqrtf(vi * ib2) + eps) + wd * p[i]);
    }
}

/* Marks the local experts (slots) that received a kept assignment anywhere
 * (kept counts are global per expert, so every copy of a replicated expert
 * gets the same flag) and returns how many (layer, expert) pairs are active
 * globally. */
static int64_t mark_active(moe_trainer *tr, const moe_model_stats *ms)
{
    const int E = ms->n_experts;
    int64_t n = 0;
    for (int i = 0; i < tr->n_moe; i++) {
        const int *ids = moe_layer_local_experts(moe_model_layer(tr->model, ms->moe_blocks[i]));
        for (int e = 0; e < E; e++) n += ms->kept[(size_t)i * E + e] > 0;
        for (int j = 0; j < tr->El; j++) tr->active[(size_t)i * tr->El + j] = ms->kept[(size_t)i * E + ids[j]] > 0;
    }
    return n;
}

/* The same for the vocabulary experts: targeted by some position anywhere. */
static int64_t mark_vocab_active(moe_trainer *tr, const moe_model_stats *ms)
{
    int64_t n = 0;
    for (int m = 0; m < ms->vocab_experts; m++) n += ms->vocab_tokens[m] > 0;
    for (int j = 0; j < tr->Ml; j++) tr->vocab_active[j] = ms->vocab_tokens[tr->m0 + j] > 0;
    return n;
}

typedef struct {
    moe_trainer *tr;
    const adam_hyper *h;
    int n;
} adam_job;

/* Every segment is split over the threads (elementwise: the result does not
 * depend on the thread count); segments too small to split go whole to one
 * thread, round robin. */
static void adam_run(void *ctx, int t, int nt)
{
    const adam_job *j = ctx;
    moe_trainer *tr = j->tr;
    float *p = moe_model_params(tr->model), *g = moe_model_grads(tr->model);
    for (int i = 0; i < j->n; i++) {
        const adam_seg *sg = &tr->segs[i];
        long e0 = 0, e1 = (long)sg->n;
        if (sg->n >= 4096) moe_par_range((long)sg->n, t, nt, &e0, &e1);
        else if (i % nt != t) continue;
        const size_t o = sg->offset + (size_t)e0;
        adamw(p + o, tr->m + o, tr->v + o, g + o, (size_t)(e1 - e0), j->h, sg->wd, sg->t);
    }
}

static void update(moe_trainer *tr, const adam_hyper *h)
{
    moe_model *m = tr->model;
    const moe_tensor_table *tab = moe_model_tensors(m);
    const float wd = (float)tr->cfg.weight_decay;
    int n = 0;
    size_t work = 0;
    for (int i = 0; i < tab->n; i++) {
        const moe_tensor *t = &tab->t[i];
        const size_t o = t->offset;
        if (t->role == MOE_TENSOR_BUFFER) continue; /* checkpointed state, not trained */
        if (!t->expert_sharded) {
            tr->segs[n++] = (adam_seg){o, t->numel, t->decay ? wd : 0.0f, tr->updates + 1};
            work += t->numel;
            continue;
        }
        /* the experts of an MoE layer, or the vocabulary experts */
        const int vocab = t->experts == MOE_EXPERTS_VOCAB, nl = vocab ? tr->Ml : tr->El;
        const uint8_t *active = vocab ? tr->vocab_active : tr->active + (size_t)moe_model_moe_index(m, t->layer) * tr->El;
        const int64_t *steps = vocab ? tr->vocab_steps : tr->expert_steps + (size_t)moe_model_moe_index(m, t->layer) * tr->El;
        const size_t row = (size_t)moe_tensor_row_numel(t);
        for (int j = 0; j < nl; j++) {
            if (!active[j]) continue; /* an idle expert keeps weights and moments bit for bit */
            int64_t r0, nr; /* the expert's segment of dim 0 */
            moe_tensor_segment(t, j, &r0, &nr);
            tr->segs[n++] = (adam_seg){o + (size_t)r0 * row, (size_t)nr * row, t->decay ? wd : 0.0f, steps[j] + 1};
            work += (size_t)nr * row;
        }
    }
    adam_job job = {tr, h, n};
    moe_par_run(moe_par_threads_for((long)work, 1 << 16), adam_run, &job);
    for (size_t k = 0; k < (size_t)tr->n_moe * tr->El; k++) tr->expert_steps[k] += tr->active[k];
    for (int j = 0; j < tr->Ml; j++) tr->vocab_steps[j] += tr->vocab_active[j];
    tr->updates++;
}

/* expert_bias (routing.md section 8): after the optimizer step, each MoE
 * layer's bias moves by the step's selections before drops, counted over
 * every group on every rank (the reduced kept + dropped counts: the same
 * integers on every rank, so the bias is the same on any rank count). */
static void update_expert_bias(moe_trainer *tr, const moe_model_stats *ms)
{
    const int E = ms->n_experts;
    int64_t n[E];
    for (int i = 0; i < ms->n_moe_layers; i++) {
        float *b = moe_model_param(tr->model, MOE_T_EXP_BIAS, ms->moe_blocks[i]);
        for (int e = 0; e < E; e++) n[e] = ms->kept[(size_t)i * E + e] + ms->dropped[(size_t)i * E + e];
        moe_router_bias_update(b, n, E, (float)tr->cfg.bias_update_rate);
    }
}

moe_status moe_trainer_step(moe_trainer *tr, const int32_t *inputs, const int32_t *targets,
                            int64_t step, moe_train_stats *st)
{
    moe_train_stats local;
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    moe_model *m = tr->model;
    double t0 = moe_now();
    moe_model_zero_grad(m);
    moe_status s = moe_model_forward(m, inputs, targets, tr->B, tr->cfg.seq_len, 1, (uint32_t)step);
    st->t_forward = moe_now() - t0;
    t0 = moe_now();
    if (!s) s = moe_model_backward(m);
    /* Test hook: a NaN gradient on one rank must stop every rank cleanly
     * (the world reduction spreads it, the norm check below catches it). */
    if (!s && moe_fault("nan_grad", moe_comm_rank(tr->comm))) moe_model_grads(m)[0] = NAN;
    st->t_backward = moe_now() - t0;
    /* So that a rank whose ep group failed cannot leave the others waiting
     * in a world reduction; the cause (a NaN: MOE_ERR_NONFINITE) reaches
     * every rank. */
    if ((s = moe_comm_agree_detail(tr->comm, MOE_SCOPE_WORLD, s))) return s;

    t0 = moe_now();
    double norm_sq = 0.0;
    s = moe_model_reduce_stats(m, &st->model);
    if (!s) s = reduce_grads(tr);
    if (!s) s = grad_norm_sq(tr, &norm_sq);
    st->t_reduce = moe_now() - t0;
    if (s) return s;
    st->grad_norm = sqrt(norm_sq);
    /* loss and norm are identical on every rank: the same decision everywhere */
    if (!isfinite(st->model.loss) || !isfinite(st->grad_norm))
        return moe_errorf(MOE_ERR_NONFINITE, "step %lld: loss %g, gradient norm %g (step not applied)",
                          (long long)step, st->model.loss, st->grad_norm);

    t0 = moe_now();
    st->clip_scale = tr->cfg.grad_clip > 0 && st->grad_norm > tr->cfg.grad_clip
                         ? tr->cfg.grad_clip / st->grad_norm : 1.0;
    st->lr = moe_train_lr(&tr->cfg, step);
    const adam_hyper h = {(float)st->lr, (float)tr->cfg.beta1, (float)tr->cfg.beta2,
                          (float)tr->cfg.adam_eps, (float)st->clip_scale};
    st->active_experts = tr->n_moe ? mark_active(tr, &st->model) : 0;
    st->active_vocab_experts = tr->Ml ? mark_vocab_active(tr, &st->model) : 0;
    update(tr, &h);
    if (tr->cfg.expert_bias && tr->n_moe) update_expert_bias(tr, &st->model);
    st->t_update = moe_now() - t0;
    return MOE_OK;
}
