/* Next-token evaluation of a model over token ids (moe_infer_eval):
 * consecutive windows spread over the ranks in padded batches, per-window
 * loss sums added in window order, the bytes the targets stand for (bits
 * per byte), and the domain x expert routing counts. */
#include "infer/infer.h"

#include <math.h>
#include <string.h>

#include "model/ops.h"

typedef struct {
    int B, S, V, W, rank, n_moe, E;
    int32_t *in, *tg;  /* (B, S) this rank's windows of the current forward */
    float *losses;     /* (B*S) */
    float *probs;      /* (S, V): one window at a time */
    double *wsum;      /* (B) loss sum of each local window, 0 for padding */
    double *all;       /* (W*B) every rank's wsum, in window order */
} eval_ws;

static void eval_ws_free(eval_ws *w)
{
    moe_free(w->in);
    moe_free(w->tg);
    moe_free(w->losses);
    moe_free(w->probs);
    moe_free(w->wsum);
    moe_free(w->all);
}

static moe_status eval_ws_alloc(eval_ws *w)
{
    const size_t N = (size_t)w->B * w->S;
    w->in = moe_calloc(N, sizeof(int32_t));
    w->tg = moe_calloc(N, sizeof(int32_t));
    w->losses = moe_calloc(N, sizeof(float));
    w->probs = moe_calloc((size_t)w->S * w->V, sizeof(float));
    w->wsum = moe_calloc((size_t)w->B, sizeof(double));
    w->all = moe_calloc((size_t)w->W * w->B, sizeof(double));
    if (!w->in || !w->tg || !w->losses || !w->probs || !w->wsum || !w->all)
        return moe_errorf(MOE_ERR_NOMEM, "eval buffers for %d windows of %d tokens", w->B, w->S);
    return MOE_OK;
}

/* Adds the kept assignments of this rank's nv valid windows, by the domain of
 * each input token (window g0 + b starts at token (g0 + b) * S). */
static void count_domains(int64_t *kept, moe_model *m, const eval_ws *w, const uint8_t *domains, int64_t g0,
                          int nv, int n_domains)
{
    const int L = moe_model_config(m)->n_layers, E = w->E;
    for (int l = 0; l < L; l++) {
        const int i = moe_model_moe_index(m, l);
        if (i < 0) continue;
        const moe_route *r = moe_layer_route(moe_model_layer(m, l));
        int64_t *k = kept + (size_t)i * n_domains * E;
        for (int b = 0; b < nv; b++) {
            const uint8_t *dom = domains + (size_t)(g0 + b) * w->S;
            for (int t = 0; t < w->S; t++) {
                const uint8_t *row = r->kept + ((size_t)b * w->S + t) * E;
                int64_t *kd = k + (size_t)dom[t] * E;
                for (int e = 0; e < E; e++) kd[e] += row[e];
            }
        }
    }
}

moe_status moe_infer_eval(moe_infer_eval_result *res, moe_model *m, moe_comm *comm, const int32_t *ids,
                          const int32_t *id_bytes, const uint8_t *domains, size_t n, int n_domains, int batch)
{
    memset(res, 0, sizeof *res);
    const moe_train_config *cfg = moe_model_config(m);
    eval_ws w = {.B = batch, .S = cfg->seq_len, .V = cfg->vocab_size, .W = moe_comm_size(comm),
                 .rank = moe_comm_rank(comm), .n_moe = moe_model_n_moe_layers(m),
                 .E = cfg->n_experts};
    /* argument checks see the same data on every rank: no agreement needed */
    if (batch < 1) return moe_errorf(MOE_ERR_ARG, "eval: batch=%d must be >= 1", batch);
    if (n < (size_t)w.S + 1)
        return moe_errorf(MOE_ERR_ARG, "the data has %zu tokens; evaluation needs at least seq_len+1 = %d", n,
                          w.S + 1);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= w.V)
            return moe_errorf(MOE_ERR_ARG, "token %zu has id %ld, outside the model's vocabulary [0, %d)", i,
                              (long)ids[i], w.V);
    if (domains) {
        if (n_domains < 1 || n_domains > 256)
            return moe_errorf(MOE_ERR_ARG, "eval: n_domains=%d outside 1..256", n_domains);
        for (size_t i = 0; i < n; i++)
            if (domains[i] >= n_domains)
                return moe_errorf(MOE_ERR_ARG, "domain id %d at token %zu (expected 0..%d)", domains[i], i,
                                  n_domains - 1);
    }
    const int64_t windows = (int64_t)((n - 1) / (size_t)w.S);
    const int64_t per_fwd = (int64_t)w.W * w.B;
    const int64_t n_fwd = (windows + per_fwd - 1) / per_fwd;
    res->windows = windows;
    res->tokens = windows * w.S;
    for (int64_t i = 1; i <= res->tokens; i++) res->bytes += id_bytes ? id_bytes[ids[i]] : 1;
    res->n_moe = w.n_moe;
    res->n_experts = w.E;
    res->n_domains = domains ? n_domains : 0;

    moe_vocab_ep *vh = moe_model_vocab_head(m);
    if (vh) {
        w.V = 0; /* no logits to hold */
        res->vocab_experts = cfg->vocab_experts;
        res->vocab_top_k = moe_model_vocab_top_k(m);
    }
    moe_status st = eval_ws_alloc(&w);
    const size_t nk = (size_t)w.n_moe * n_domains * w.E;
    if (!st && domains && !(res->domain_kept = moe_calloc(nk, sizeof(int64_t))))
        st = moe_errorf(MOE_ERR_NOMEM, "eval: domain counts");
    if (!st && vh && (!(res->vocab_rank_hist = moe_calloc((size_t)res->vocab_experts, sizeof(int64_t))) ||
                      !(res->vocab_tokens = moe_calloc((size_t)res->vocab_experts, sizeof(int64_t))) ||
                      !(res->vocab_rank_mass = moe_calloc((size_t)res->vocab_experts, sizeof(double)))))
        st = moe_errorf(MOE_ERR_NOMEM, "eval: vocabulary expert counts");
    st = moe_comm_agree(comm, st);
    double sum = 0.0;
    for (int64_t j = 0; !st && j < n_fwd; j++) {
        const int64_t g0 = j * per_fwd + (int64_t)w.rank * w.B; /* first window of this rank */
        int nv = (int)(windows - g0 < 0 ? 0 : windows - g0 < w.B ? windows - g0 : w.B);
        memset(w.in, 0, (size_t)w.B * w.S * sizeof(int32_t));
        memset(w.tg, 0, (size_t)w.B * w.S * sizeof(int32_t));
        for (int b = 0; b < nv; b++) {
            memcpy(w.in + (size_t)b * w.S, ids + (size_t)(g0 + b) * w.S, (size_t)w.S * sizeof(int32_t));
            memcpy(w.tg + (size_t)b * w.S, ids + (size_t)(g0 + b) * w.S + 1, (size_t)w.S * sizeof(int32_t));
        }
        if (vh) {
            /* the vocabulary head forms no logits: its per-position losses
             * (exact, whatever K), of which the padding's are left out below */
            if ((st = moe_model_forward(m, w.in, w.tg, w.B, w.S, 0, 0))) break;
            memcpy(w.losses, moe_model_losses(m), (size_t)nv * w.S * sizeof(float));
            for (int i = 0; i < nv * w.S; i++) res->vocab_tokens[moe_vocab_part_assign(moe_model_vocab(m))[w.tg[i]]]++;
            if ((st = moe_vocab_ep_rank_hist(vh, nv * w.S, res->vocab_rank_hist))) break;
            if ((st = moe_vocab_ep_rank_mass(vh, nv * w.S, res->vocab_rank_mass))) break;
        } else {
            /* the model's own loss would include the padding: compute it here */
            if ((st = moe_model_forward(m, w.in, NULL, w.B, w.S, 0, 0))) break;
            const float *logits = moe_model_logits(m);
            for (int b = 0; b < nv; b++) /* one window at a time: probs hold S rows of V */
                moe_model_crossentropy_forward(w.losses + (size_t)b * w.S, w.probs, logits + (size_t)b * w.S * w.V,
                                               w.tg + (size_t)b * w.S, w.S, w.V);
        }
        for (int b = 0; b < w.B; b++) {
            double s = 0.0;
            for (int t = 0; b < nv && t < w.S; t++) s += w.losses[(size_t)b * w.S + t];
            w.wsum[b] = s;
        }
        if (domains) count_domains(res->domain_kept, m, &w, domains, g0, nv, n_domains);
        if ((st = moe_comm_allgather(comm, w.all, w.wsum, (size_t)w.B * sizeof(double)))) break;
        /* window order, whatever the number of ranks */
        for (int64_t g = j * per_fwd; g < windows && g < (j + 1) * per_fwd; g++) sum += w.all[g - j * per_fwd];
    }
    /* a forward failure is already known to the whole ep group (= world) */
    if (!st && domains)
        st = moe_comm_allreduce_i64(comm, MOE_SCOPE_WORLD, res->domain_kept, nk);
    if (!st && vh) st = moe_comm_allreduce_i64(comm, MOE_SCOPE_WORLD, res->vocab_rank_hist, (size_t)res->vocab_experts);
    if (!st && vh) st = moe_comm_allreduce_i64(comm, MOE_SCOPE_WORLD, res->vocab_tokens, (size_t)res->vocab_experts);
    if (!st && vh) st = moe_comm_allreduce_f64(comm, MOE_SCOPE_WORLD, res->vocab_rank_mass, (size_t)res->vocab_experts);
    /* the sum is the same on every rank: so is this decision */
    if (!st && !isfinite(sum))
        st = moe_errorf(MOE_ERR_NONFINITE, "eval: the loss over %lld tokens is not finite (%g): the forward "
                                           "overflows with these weights (the loader refuses NaN and Inf)",
                        (long long)res->tokens, sum);
    eval_ws_free(&w);
    if (st) {
        moe_infer_eval_result_free(res);
        return st;
    }
    res->loss_sum = sum;
    res->loss = sum / (double)res->tokens;
    res->bpb = res->bytes ? sum / (double)res->bytes / M_LN2 : 0.0;
    if (vh) {
        int64_t covered = 0;
        for (int k = 0; k < res->vocab_top_k; k++) covered += res->vocab_rank_hist[k];
        res->vocab_coverage = (double)covered / (double)res->tokens;
        for (int k = 0; k < res->vocab_experts; k++) res->vocab_rank_mass[k] /= (double)res->tokens;
        for (int k = 0; k < res->vocab_top_k; k++) res->vocab_kept_mass += res->vocab_rank_mass[k];
    }
    return MOE_OK;
}

void moe_infer_eval_result_free(moe_infer_eval_result *res)
{
    moe_free(res->domain_kept);
    moe_free(res->vocab_rank_hist);
    moe_free(res->vocab_tokens);
    moe_free(res->vocab_rank_mass);
    res->domain_kept = res->vocab_rank_hist = res->vocab_tokens = NULL;
    res->vocab_rank_mass = NULL;
}
