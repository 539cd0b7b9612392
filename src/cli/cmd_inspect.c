/* `moe inspect`: describe, verify or diff checkpoints and gradient dumps,
 * and plot expert load (and, for vocabulary experts, each expert's set
 * size and load). One process, no MPI: files are read through the
 * single-process reader of src/ckpt (ckpt_file.h). Text on stdout, or one
 * JSON object with --json. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ckpt/ckpt_file.h"
#include "cli/cli.h"
#include "layout/layout.h"

typedef struct {
    const char *file, *diff, *plot;
    int verify, json;
} inspect_opts;

static void usage(FILE *f)
{
    fprintf(f, "usage: moe inspect FILE|RUN_DIR [--verify] [--diff OTHER] [--json] [--plot OUT.svg|OUT.png]\n"
               "\n"
               "  (default)      format, creation, step, model config, parameter counts, and per MoE layer\n"
               "                 the experts' routed/dropped tokens, load share and weight norms\n"
               "                 (a gradient dump: gradient norms per tensor and the activated masks)\n"
               "  --verify       read every dataset (checksums) and check its shape; exit 0 only if all good\n"
               "  --diff OTHER   per dataset max abs and max rel difference to OTHER\n"
               "  --json         machine-readable output\n"
               "  --plot OUT     heat map of expert load per MoE layer (.svg, or .png through gnuplot); with\n"
               "                 vocabulary experts also OUT's name with .vocab before the extension: each\n"
               "                 vocabulary expert's set size and share of the targets\n"
               "A run directory means the checkpoint its 'latest' file names.\n");
}

/* Reads dataset `path` of f whole (NULL + status if absent or damaged). */
static moe_status read_named(const moe_ckpt_file *f, const char *path, double **buf, int64_t *n)
{
    int i = moe_ckpt_file_find(f, path);
    if (i < 0) {
        *buf = NULL;
        return moe_errorf(MOE_ERR_FORMAT, "dataset '%s' is not expected in this file", path);
    }
    return moe_ckpt_file_read(f, i, buf, n);
}

static double norm2(const double *a, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i] * a[i];
    return sqrt(s);
}

/* ---- description ---- */

typedef struct {
    int64_t total, expert, dense;
    double active; /* per token */
} param_counts;

static param_counts count_params(const moe_ckpt_file *f)
{
    const moe_tensor_table *t = moe_ckpt_file_layout(f);
    const moe_train_config *m = &moe_ckpt_file_info(f)->model;
    param_counts p = {0, 0, 0, 0};
    int64_t vocab = 0;
    for (int i = 0; i < t->n; i++) {
        if (t->t[i].role == MOE_TENSOR_BUFFER) continue; /* the partition: not a parameter */
        p.total += (int64_t)t->t[i].numel;
        if (t->t[i].expert_sharded) p.expert += (int64_t)t->t[i].numel;
        if (t->t[i].experts == MOE_EXPERTS_VOCAB && t->t[i].expert_sharded) vocab += (int64_t)t->t[i].numel;
    }
    p.dense = p.total - p.expert;
    /* Token choice: each token visits top_k of E experts; expert choice:
     * capacity_factor experts per token on average; the vocabulary head's
     * rows: one expert's set per position in training, V/M on average. */
    double share = m->router == MOE_ROUTER_TOKEN_CHOICE ? (double)m->top_k / m->n_experts
                                                        : m->capacity_factor / m->n_experts;
    if (share > 1) share = 1;
    p.active = (double)p.dense + share * (double)(p.expert - vocab) +
               (m->head == MOE_HEAD_VOCAB_EXPERTS ? (double)vocab / m->vocab_experts : 0);
    return p;
}

/* The /model attributes, from the key table (config.h). */
static cJSON *model_json(const moe_train_config *m)
{
    cJSON *o = cJSON_CreateObject();
    moe_model_attr a[MOE_MODEL_ATTRS_MAX];
    const int n = moe_train_config_model_attrs(m, a, MOE_MODEL_ATTRS_MAX);
    for (int i = 0; i < n; i++) {
        if (a[i].type == MOE_ATTR_TEXT) cJSON_AddStringToObject(o, a[i].name, a[i].text);
        else cJSON_AddNumberToObject(o, a[i].name, a[i].type == MOE_ATTR_INT ? (double)a[i].i : a[i].r);
    }
    return o;
}

static void print_info(const moe_ckpt_info *in, const param_counts *p)
{
    const moe_train_config *m = &in->model;
    printf("format      %s (version %lld)\n", in->format, (long long)in->format_version);
    printf("created     %s by %s on %lld ranks (ep %lld)\n", in->created_at, in->created_by,
           (long long)in->saved_world_size, (long long)in->saved_ep_size);
    if (in->gradients) {
        printf("step        %lld\n", (long long)in->step);
    } else {
        printf("step        %lld, tokens seen %lld, seed %llu\n", (long long)in->step, (long long)in->tokens_seen,
               (unsigned long long)in->seed);
        for (int i = 0; i < in->n_extra; i++)
            printf("            %s = %lld\n", in->extra[i].name, (long long)in->extra[i].value);
        printf("optimizer   AdamW step %lld, lr %g, betas (%g, %g), eps %g, weight decay %g\n",
               (long long)in->opt_step, in->lr, in->beta1, in->beta2, in->eps, in->weight_decay);
    }
    printf("model       vocab %d, d_model %d, %d layers, %d heads, seq_len %d, ln_eps %g\n", m->vocab_size,
           m->d_model, m->n_layers, m->n_heads, m->seq_len, m->ln_eps);
    printf("            %d experts (MoE every %d blocks from block 0), d_ff %d, %s, router %s, top_k %d,\n",
           m->n_experts, m->moe_every, m->d_ff, moe_activation_str(m->activation), moe_router_kind_str(m->router),
           m->top_k);
    printf("            capacity_factor %g, normalize_topk %d, router_noise %s, group_seqs %d\n", m->capacity_factor,
           m->normalize_topk, m->router_noise ? "gaussian" : "none", m->group_seqs);
    if (m->head == MOE_HEAD_VOCAB_EXPERTS) {
        moe_model_attr a[MOE_MODEL_ATTRS_MAX];
        const char *part = "?";
        for (int i = 0, n = moe_train_config_model_attrs(m, a, MOE_MODEL_ATTRS_MAX); i < n; i++)
            if (!strcmp(a[i].name, "vocab_partition")) part = a[i].text;
        printf("head        vocabulary experts: %d sets (partition: %s), generation top-%d; untied from wte\n",
               m->vocab_experts, part, m->vocab_top_k);
    } else {
        printf("head        full softmax, tied to wte\n");
    }
    printf("parameters  %lld total (%lld dense, %lld in experts); %.0f active per token\n", (long long)p->total,
           (long long)p->dense, (long long)p->expert, p->active);
}

static cJSON *info_json(const moe_ckpt_info *in, const param_counts *p)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "format", in->format);
    cJSON_AddNumberToObject(o, "format_version", (double)in->format_version);
    cJSON_AddStringToObject(o, "created_by", in->created_by);
    cJSON_AddStringToObject(o, "created_at", in->created_at);
    cJSON_AddNumberToObject(o, "saved_world_size", (double)in->saved_world_size);
    cJSON_AddNumberToObject(o, "saved_ep_size", (double)in->saved_ep_size);
    cJSON_AddNumberToObject(o, "step", (double)in->step);
    if (!in->gradients) {
        cJSON_AddNumberToObject(o, "tokens_seen", (double)in->tokens_seen);
        char seed[24]; /* a string: JSON numbers lose uint64 precision */
        snprintf(seed, sizeof seed, "%llu", (unsigned long long)in->seed);
        cJSON_AddStringToObject(o, "seed", seed);
        cJSON *x = cJSON_AddObjectToObject(o, "train_extra");
        for (int i = 0; i < in->n_extra; i++) cJSON_AddNumberToObject(x, in->extra[i].name, (double)in->extra[i].value);
        cJSON *op = cJSON_AddObjectToObject(o, "optimizer");
        cJSON_AddNumberToObject(op, "step", (double)in->opt_step);
        cJSON_AddNumberToObject(op, "lr", in->lr);
        cJSON_AddNumberToObject(op, "beta1", in->beta1);
        cJSON_AddNumberToObject(op, "beta2", in->beta2);
        cJSON_AddNumberToObject(op, "eps", in->eps);
        cJSON_AddNumberToObject(op, "weight_decay", in->weight_decay);
    }
    cJSON_AddItemToObject(o, "model", model_json(&in->model));
    cJSON *pc = cJSON_AddObjectToObject(o, "parameters");
    cJSON_AddNumberToObject(pc, "total", (double)p->total);
    cJSON_AddNumberToObject(pc, "dense", (double)p->dense);
    cJSON_AddNumberToObject(pc, "expert", (double)p->expert);
    cJSON_AddNumberToObject(pc, "active_per_token", p->active);
    cJSON_AddStringToObject(o, "config", in->config ? in->config : "");
    return o;
}

/* The checkpoint's tokenizer (/tokenizer), or "bytes" for a byte-level
 * model: kind, vocabulary, pattern, specials, hash. */
static moe_status describe_tokenizer(const moe_ckpt_file *f, cJSON *j)
{
    moe_tok *t = NULL;
    moe_status st = moe_ckpt_file_tokenizer(f, &t);
    if (st != MOE_OK) return st;
    cJSON *o = j ? cJSON_AddObjectToObject(j, "tokenizer") : NULL;
    if (!t) {
        if (o) cJSON_AddStringToObject(o, "kind", "bytes");
        else printf("tokenizer   bytes: one token per byte (the file has no /tokenizer)\n");
        return MOE_OK;
    }
    char hash[24];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)moe_tok_hash(t));
    const int k = moe_tok_n_specials(t);
    if (o) {
        cJSON_AddStringToObject(o, "kind", "bpe");
        cJSON_AddNumberToObject(o, "vocab_size", (double)moe_tok_vocab_size(t));
        cJSON_AddNumberToObject(o, "ranks", (double)moe_tok_n_ranks(t));
        cJSON_AddNumberToObject(o, "holes", (double)moe_tok_n_holes(t));
        cJSON_AddStringToObject(o, "pattern", moe_tok_pattern(t));
        cJSON_AddStringToObject(o, "hash", hash);
        cJSON *sp = cJSON_AddArrayToObject(o, "specials");
        for (int i = 0; i < k; i++) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "name", moe_tok_special_name(t, i));
            cJSON_AddNumberToObject(x, "id", (double)moe_tok_special_id(t, i));
            cJSON_AddItemToArray(sp, x);
        }
    } else {
        printf("tokenizer   byte-level BPE, vocab %lld (%lld ranks, %lld holes, %d specials), hash %s\n",
               (long long)moe_tok_vocab_size(t), (long long)moe_tok_n_ranks(t), (long long)moe_tok_n_holes(t), k, hash);
        printf("            pattern %s\n", moe_tok_pattern(t));
        for (int i = 0; i < k; i++)
            printf("            special %lld = %s\n", (long long)moe_tok_special_id(t, i), moe_tok_special_name(t, i));
    }
    moe_tok_destroy(t);
    return MOE_OK;
}

/* Per-expert load and weight norms of one MoE layer. */
typedef struct {
    double *tokens, *dropped, *steps; /* (E) */
    double *w1n, *w2n;                /* (E) Frobenius norms of each expert's w1, w2 */
} layer_stats;

static void layer_stats_free(layer_stats *s)
{
    moe_free(s->tokens);
    moe_free(s->dropped);
    moe_free(s->steps);
    moe_free(s->w1n);
    moe_free(s->w2n);
    memset(s, 0, sizeof *s);
}

static moe_status row_norms(const moe_ckpt_file *f, const char *path, int E, double **out)
{
    double *w;
    int64_t n;
    *out = NULL;
    moe_status st = read_named(f, path, &w, &n);
    if (st != MOE_OK) return st;
    double *r = moe_calloc((size_t)E, sizeof *r);
    if (!r) {
        moe_free(w);
        return moe_errorf(MOE_ERR_NOMEM, "norms of '%s'", path);
    }
    const int64_t row = n / E;
    for (int e = 0; e < E; e++) r[e] = norm2(w + (int64_t)e * row, row);
    moe_free(w);
    *out = r;
    return MOE_OK;
}

static moe_status layer_stats_read(const moe_ckpt_file *f, int L, layer_stats *s)
{
    memset(s, 0, sizeof *s);
    const int E = moe_ckpt_file_info(f)->model.n_experts;
    char p[160];
    int64_t n;
    snprintf(p, sizeof p, "/stats/h/%d/expert_tokens", L);
    moe_status st = read_named(f, p, &s->tokens, &n);
    snprintf(p, sizeof p, "/stats/h/%d/expert_dropped", L);
    if (st == MOE_OK) st = read_named(f, p, &s->dropped, &n);
    snprintf(p, sizeof p, "/optimizer/expert_step/h/%d", L);
    if (st == MOE_OK) st = read_named(f, p, &s->steps, &n);
    /* The expert weights' datasets, named by the layout's table. */
    const moe_tensor_table *t = moe_ckpt_file_layout(f);
    const int w1 = moe_layout_find(t, MOE_T_EXP_W1, L), w2 = moe_layout_find(t, MOE_T_EXP_W2, L);
    if (st == MOE_OK && (w1 < 0 || w2 < 0)) st = moe_errorf(MOE_ERR_FORMAT, "block %d has no expert weights", L);
    if (st == MOE_OK) snprintf(p, sizeof p, "/model/%s", t->t[w1].name);
    if (st == MOE_OK) st = row_norms(f, p, E, &s->w1n);
    if (st == MOE_OK) snprintf(p, sizeof p, "/model/%s", t->t[w2].name);
    if (st == MOE_OK) st = row_norms(f, p, E, &s->w2n);
    if (st != MOE_OK) layer_stats_free(s);
    return st;
}

static moe_status describe_experts(const moe_ckpt_file *f, cJSON *j)
{
    const int E = moe_ckpt_file_info(f)->model.n_experts;
    int layers[MOE_CKPT_MAX_MOE_LAYERS];
    const int n_moe = moe_ckpt_moe_layers(moe_ckpt_file_layout(f), layers);
    cJSON *arr = j ? cJSON_AddArrayToObject(j, "moe_layers") : NULL;
    moe_status st = MOE_OK;
    for (int l = 0; st == MOE_OK && l < n_moe; l++) {
        layer_stats s;
        if ((st = layer_stats_read(f, layers[l], &s)) != MOE_OK) break;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += s.tokens[e];
        cJSON *lj = NULL, *ej = NULL;
        if (j) {
            lj = cJSON_CreateObject();
            cJSON_AddNumberToObject(lj, "layer", layers[l]);
            ej = cJSON_AddArrayToObject(lj, "experts");
            cJSON_AddItemToArray(arr, lj);
        } else {
            printf("\nMoE layer h/%d: %.0f tokens routed since step 0\n", layers[l], sum);
            printf("  %6s %12s %12s %7s %10s %12s %12s\n", "expert", "tokens", "dropped", "share", "updates",
                   "|w1|", "|w2|");
        }
        for (int e = 0; e < E; e++) {
            const double share = sum > 0 ? s.tokens[e] / sum : 0;
            if (j) {
                cJSON *x = cJSON_CreateObject();
                cJSON_AddNumberToObject(x, "expert", e);
                cJSON_AddNumberToObject(x, "tokens", s.tokens[e]);
                cJSON_AddNumberToObject(x, "dropped", s.dropped[e]);
                cJSON_AddNumberToObject(x, "share", share);
                cJSON_AddNumberToObject(x, "updates", s.steps[e]);
                cJSON_AddNumberToObject(x, "w1_norm", s.w1n[e]);
                cJSON_AddNumberToObject(x, "w2_norm", s.w2n[e]);
                cJSON_AddItemToArray(ej, x);
            } else {
                printf("  %6d %12.0f %12.0f %6.1f%% %10.0f %12.5g %12.5g\n", e, s.tokens[e], s.dropped[e],
                       100 * share, s.steps[e], s.w1n[e], s.w2n[e]);
            }
        }
        layer_stats_free(&s);
    }
    return st;
}

/* The vocabulary experts: the partition's sets, each expert's targets,
 * updates and row norms. */
typedef struct {
    int M;
    double *size, *tokens, *steps, *wnorm; /* (M) */
} vocab_stats;

static void vocab_stats_free(vocab_stats *v)
{
    moe_free(v->size), moe_free(v->tokens), moe_free(v->steps), moe_free(v->wnorm);
    memset(v, 0, sizeof *v);
}

static moe_status vocab_stats_read(const moe_ckpt_file *f, vocab_stats *v)
{
    const moe_train_config *m = &moe_ckpt_file_info(f)->model;
    memset(v, 0, sizeof *v);
    v->M = m->vocab_experts;
    const int V = m->vocab_size, d = m->d_model;
    double *assign = NULL, *w = NULL;
    int64_t n;
    v->size = moe_calloc((size_t)v->M, sizeof(double));
    v->wnorm = moe_calloc((size_t)v->M, sizeof(double));
    moe_status st = v->size && v->wnorm ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "vocabulary expert statistics");
    if (st == MOE_OK) st = read_named(f, "/model/vocab_head/assign", &assign, &n);
    if (st == MOE_OK) st = read_named(f, "/stats/vocab_head/expert_tokens", &v->tokens, &n);
    if (st == MOE_OK) st = read_named(f, "/optimizer/expert_step/vocab_head", &v->steps, &n);
    if (st == MOE_OK) st = read_named(f, "/model/vocab_head/weight", &w, &n);
    for (int t = 0; st == MOE_OK && t < V; t++) {
        const int e = (int)assign[t];
        if (assign[t] != e || e < 0 || e >= v->M) {
            st = moe_errorf(MOE_ERR_FORMAT, "/model/vocab_head/assign: token %d has expert %g, outside [0, %d)", t,
                            assign[t], v->M);
            break;
        }
        v->size[e]++;
        for (int k = 0; k < d; k++) v->wnorm[e] += w[(size_t)t * d + k] * w[(size_t)t * d + k];
    }
    for (int e = 0; st == MOE_OK && e < v->M; e++) v->wnorm[e] = sqrt(v->wnorm[e]);
    moe_free(assign);
    moe_free(w);
    if (st != MOE_OK) vocab_stats_free(v);
    return st;
}

static moe_status describe_vocab(const moe_ckpt_file *f, cJSON *j)
{
    /* (a gradient dump holds no partition: its activated mask is listed with the others) */
    if (moe_ckpt_file_info(f)->model.head != MOE_HEAD_VOCAB_EXPERTS || moe_ckpt_file_info(f)->gradients) return MOE_OK;
    vocab_stats v;
    moe_status st = vocab_stats_read(f, &v);
    if (st != MOE_OK) return st;
    double sum = 0, smin = INFINITY, smax = 0, lmax = 0;
    for (int e = 0; e < v.M; e++) {
        sum += v.tokens[e];
        smin = fmin(smin, v.size[e]), smax = fmax(smax, v.size[e]);
        lmax = fmax(lmax, v.tokens[e]);
    }
    cJSON *arr = NULL;
    if (j) {
        cJSON *o = cJSON_AddObjectToObject(j, "vocab_experts");
        cJSON_AddNumberToObject(o, "experts", v.M);
        cJSON_AddNumberToObject(o, "targets", sum);
        arr = cJSON_AddArrayToObject(o, "experts_detail");
    } else {
        printf("\nvocabulary experts: %d sets of %.0f..%.0f tokens (mean %.1f); %.0f targets since step 0, max/mean "
               "load %.2f\n", v.M, smin, smax, (double)moe_ckpt_file_info(f)->model.vocab_size / v.M, sum,
               sum > 0 ? lmax / (sum / v.M) : 0);
        printf("  %6s %8s %12s %7s %10s %12s\n", "expert", "tokens", "targets", "share", "updates", "|W_S|");
    }
    for (int e = 0; e < v.M; e++) {
        const double t = v.tokens[e], share = sum > 0 ? t / sum : 0;
        if (j) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "expert", e);
            cJSON_AddNumberToObject(x, "size", v.size[e]);
            cJSON_AddNumberToObject(x, "targets", t);
            cJSON_AddNumberToObject(x, "share", share);
            cJSON_AddNumberToObject(x, "updates", v.steps[e]);
            cJSON_AddNumberToObject(x, "w_norm", v.wnorm[e]);
            cJSON_AddItemToArray(arr, x);
        } else {
            printf("  %6d %8.0f %12.0f %6.1f%% %10.0f %12.5g\n", e, v.size[e], t, 100 * share, v.steps[e], v.wnorm[e]);
        }
    }
    vocab_stats_free(&v);
    return MOE_OK;
}

static moe_status describe_grads(const moe_ckpt_file *f, cJSON *j)
{
    cJSON *gn = j ? cJSON_AddArrayToObject(j, "grad_norms") : NULL, *act = j ? cJSON_AddArrayToObject(j, "activated") : NULL;
    if (!j) printf("\n%-48s %14s\n", "gradient", "norm");
    moe_status st = MOE_OK;
    for (int i = 0; st == MOE_OK && i < moe_ckpt_file_n_dsets(f); i++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(f, i);
        double *buf;
        int64_t n;
        if (!d->expected || (st = moe_ckpt_file_read(f, i, &buf, &n)) != MOE_OK) continue;
        if (d->dtype == MOE_CKPT_U8) {
            if (j) {
                cJSON *x = cJSON_CreateObject();
                cJSON_AddStringToObject(x, "name", d->path);
                cJSON *mask = cJSON_AddArrayToObject(x, "mask");
                for (int64_t e = 0; e < n; e++) cJSON_AddItemToArray(mask, cJSON_CreateNumber(buf[e]));
                cJSON_AddItemToArray(act, x);
            } else {
                printf("%-48s ", d->path);
                for (int64_t e = 0; e < n; e++) putchar(buf[e] != 0 ? '1' : '0');
                putchar('\n');
            }
        } else if (j) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "name", d->path);
            cJSON_AddNumberToObject(x, "norm", norm2(buf, n));
            cJSON_AddItemToArray(gn, x);
        } else {
            printf("%-48s %14.6g\n", d->path, norm2(buf, n));
        }
        moe_free(buf);
    }
    return st;
}

/* ---- verify ---- */

/* Returns the number of failed datasets. */
static int verify(const moe_ckpt_file *f, const char *path, cJSON *j)
{
    int bad = 0;
    cJSON *arr = j ? cJSON_AddArrayToObject(j, "datasets") : NULL;
    for (int i = 0; i < moe_ckpt_file_n_dsets(f); i++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(f, i);
        double *buf = NULL;
        int64_t n;
        moe_error_clear();
        moe_status st = moe_ckpt_file_read(f, i, &buf, &n);
        moe_free(buf);
        bad += st != MOE_OK;
        const char *note = d->expected ? "" : " (not in the format)";
        if (j) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "name", d->path);
            cJSON_AddBoolToObject(x, "ok", st == MOE_OK);
            cJSON_AddBoolToObject(x, "expected", d->expected);
            if (st != MOE_OK) cJSON_AddStringToObject(x, "error", moe_error_detail());
            cJSON_AddItemToArray(arr, x);
        } else if (st == MOE_OK) {
            printf("OK    %s%s\n", d->path, note);
        } else {
            printf("FAIL  %s%s: %s: %s\n", d->path, note, moe_status_str(st), moe_error_detail());
        }
    }
    if (j) {
        cJSON_AddBoolToObject(j, "ok", bad == 0);
        cJSON_AddNumberToObject(j, "failed", bad);
    } else {
        printf("%s: %d datasets, %d failed\n", path, moe_ckpt_file_n_dsets(f), bad);
    }
    return bad;
}

/* ---- diff ---- */

static void diff_only(cJSON *arr, const char *path, const char *where)
{
    if (arr) {
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "name", path);
        cJSON_AddStringToObject(x, "only_in", where);
        cJSON_AddItemToArray(arr, x);
    } else {
        printf("%-48s only in %s\n", path, where);
    }
}

static moe_status diff(const moe_ckpt_file *a, const moe_ckpt_file *b, const char *pa, const char *pb, cJSON *j)
{
    cJSON *arr = j ? cJSON_AddArrayToObject(j, "datasets") : NULL;
    if (!j) printf("%-48s %14s %14s\n", "dataset", "max abs", "max rel");
    moe_status st = MOE_OK;
    for (int i = 0; st == MOE_OK && i < moe_ckpt_file_n_dsets(a); i++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(a, i);
        if (!d->present) continue;
        int k = moe_ckpt_file_find(b, d->path);
        if (k < 0 || !moe_ckpt_file_dset(b, k)->present) {
            diff_only(arr, d->path, pa);
            continue;
        }
        double *x = NULL, *y = NULL;
        int64_t nx = 0, ny = 0;
        st = moe_ckpt_file_read(a, i, &x, &nx);
        if (st == MOE_OK) st = moe_ckpt_file_read(b, k, &y, &ny);
        if (st == MOE_OK && nx != ny)
            st = moe_errorf(MOE_ERR_MISMATCH, "'%s' has %lld elements in '%s' but %lld in '%s'", d->path,
                            (long long)nx, pa, (long long)ny, pb);
        double mabs = 0, mrel = 0;
        for (int64_t e = 0; st == MOE_OK && e < nx; e++) {
            const double ad = fabs(x[e] - y[e]), den = fmax(fabs(x[e]), fabs(y[e]));
            if (ad > mabs || ad != ad) mabs = ad;
            if (den > 0 && ad / den > mrel) mrel = ad / den;
        }
        moe_free(x);
        moe_free(y);
        if (st != MOE_OK) break;
        if (j) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", d->path);
            cJSON_AddNumberToObject(o, "max_abs", mabs);
            cJSON_AddNumberToObject(o, "max_rel", mrel);
            cJSON_AddItemToArray(arr, o);
        } else {
            printf("%-48s %14.6g %14.6g\n", d->path, mabs, mrel);
        }
    }
    for (int k = 0; st == MOE_OK && k < moe_ckpt_file_n_dsets(b); k++) {
        const moe_ckpt_dset *d = moe_ckpt_file_dset(b, k);
        int i = moe_ckpt_file_find(a, d->path);
        if (d->present && (i < 0 || !moe_ckpt_file_dset(a, i)->present)) diff_only(arr, d->path, pb);
    }
    return st;
}

/* ---- plot ---- */

/* share[l * E + e]: fraction of layer l's kept tokens that went to expert e. */
static moe_status load_shares(const moe_ckpt_file *f, double **out, int *n_moe, int *layers)
{
    const int E = moe_ckpt_file_info(f)->model.n_experts;
    *n_moe = moe_ckpt_moe_layers(moe_ckpt_file_layout(f), layers);
    if (moe_ckpt_file_info(f)->gradients)
        return moe_errorf(MOE_ERR_ARG, "a gradient dump holds no expert load statistics");
    double *s = moe_calloc((size_t)*n_moe * (size_t)E, sizeof *s);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "load shares");
    moe_status st = MOE_OK;
    for (int l = 0; st == MOE_OK && l < *n_moe; l++) {
        char p[160];
        double *t;
        int64_t n;
        snprintf(p, sizeof p, "/stats/h/%d/expert_tokens", layers[l]);
        if ((st = read_named(f, p, &t, &n)) != MOE_OK) break;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += t[e];
        for (int e = 0; e < E; e++) s[l * E + e] = sum > 0 ? t[e] / sum : 0;
        moe_free(t);
    }
    if (st != MOE_OK) {
        moe_free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}

/* Text content with XML's special characters escaped. */
static void svg_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        default: fputc(*s, f);
        }
    }
}

static moe_status plot_svg(const char *out, const double *s, int n_moe, const int *layers, int E, const char *title)
{
    FILE *f = fopen(out, "w");
    if (!f) return moe_errorf(MOE_ERR_IO, "cannot write '%s'", out);
    const int cw = E <= 16 ? 48 : E <= 64 ? 16 : 6, ch = 32, x0 = 80, y0 = 60;
    const int W = x0 + E * cw + 40, H = y0 + n_moe * ch + 50;
    double mx = 0;
    for (int i = 0; i < n_moe * E; i++) mx = fmax(mx, s[i]);
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
               "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%d\" y=\"20\" font-size=\"14\">expert load share per MoE layer: ", x0);
    svg_text(f, title);
    fprintf(f, " (darker = more tokens; uniform = %.1f%%)</text>\n", 100.0 / E);
    for (int e = 0; e < E; e++)
        if (cw >= 16 || e % 8 == 0)
            fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%d</text>\n", x0 + e * cw + cw / 2, y0 - 6, e);
    for (int l = 0; l < n_moe; l++) {
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">h/%d</text>\n", x0 - 8, y0 + l * ch + ch / 2 + 4,
                layers[l]);
        for (int e = 0; e < E; e++) {
            const double v = mx > 0 ? s[l * E + e] / mx : 0;
            const int r = (int)(255 - 220 * v), g = (int)(255 - 160 * v), b = 255 - (int)(60 * v);
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"rgb(%d,%d,%d)\" stroke=\"#ccc\">"
                       "<title>h/%d expert %d: %.2f%%</title></rect>\n",
                    x0 + e * cw, y0 + l * ch, cw, ch, r, g, b, layers[l], e, 100 * s[l * E + e]);
            if (cw >= 48)
                fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"%s\">%.1f</text>\n",
                        x0 + e * cw + cw / 2, y0 + l * ch + ch / 2 + 4, v > 0.6 ? "white" : "black",
                        100 * s[l * E + e]);
        }
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\">expert (cells: %% of the layer's kept tokens)</text>\n</svg>\n", x0,
            y0 + n_moe * ch + 24);
    return fclose(f) == 0 ? MOE_OK : moe_errorf(MOE_ERR_IO, "cannot write '%s'", out);
}

static moe_status plot_png(const char *out, const double *s, int n_moe, const int *layers, int E, const char *title)
{
    FILE *g = popen("gnuplot 2>/dev/null", "w");
    if (!g) return moe_errorf(MOE_ERR_IO, "cannot run gnuplot (write .svg instead)");
    const int w = 240 + 24 * E;
    fprintf(g, "set terminal png size %d,%d\nset output '%s'\n", w < 640 ? 640 : w, 160 + 40 * n_moe, out);
    fprintf(g, "set title 'expert load share (%%) per MoE layer: %s' noenhanced\n", title);
    fprintf(g, "set xlabel 'expert'\nset ylabel 'MoE layer'\nset palette defined (0 'white', 1 '#2060c0')\n");
    fprintf(g, "set xrange [-0.5:%d.5]\nset yrange [-0.5:%d.5] reverse\nset ytics (", E - 1, n_moe - 1);
    for (int l = 0; l < n_moe; l++) fprintf(g, "%s'h/%d' %d", l ? ", " : "", layers[l], l);
    fprintf(g, ")\n$d << EOD\n");
    for (int l = 0; l < n_moe; l++)
        for (int e = 0; e < E; e++) fprintf(g, "%d %d %g\n", e, l, 100 * s[l * E + e]);
    fprintf(g, "EOD\nplot $d using 1:2:3 with image notitle\n");
    int rc = pclose(g);
    return rc == 0 ? MOE_OK : moe_errorf(MOE_ERR_IO, "gnuplot failed writing '%s' (status %d)", out, rc);
}

static moe_status plot(const moe_ckpt_file *f, const char *path, const char *out)
{
    double *s = NULL;
    int n_moe, layers[MOE_CKPT_MAX_MOE_LAYERS];
    moe_status st = load_shares(f, &s, &n_moe, layers);
    if (st != MOE_OK) return st;
    const int E = moe_ckpt_file_info(f)->model.n_experts;
    const size_t len = strlen(out);
    const char *slash = strrchr(path, '/'), *title = slash ? slash + 1 : path;
    if (len > 4 && !strcmp(out + len - 4, ".png"))
        st = plot_png(out, s, n_moe, layers, E, title);
    else
        st = plot_svg(out, s, n_moe, layers, E, title);
    moe_free(s);
    return st;
}

/* The vocabulary experts' picture: set size (bars, left axis) and share of
 * the targets (points, right axis) of each expert. */
static moe_status plot_vocab_png(const char *out, const vocab_stats *v, const char *title)
{
    FILE *g = popen("gnuplot 2>/dev/null", "w");
    if (!g) return moe_errorf(MOE_ERR_IO, "cannot run gnuplot (write .svg instead)");
    double sum = 0;
    for (int e = 0; e < v->M; e++) sum += v->tokens[e];
    fprintf(g, "set terminal png size %d,420\nset output '%s'\n", v->M > 64 ? 1200 : 900, out);
    fprintf(g, "set title 'vocabulary experts: set size and share of the targets: %s' noenhanced\n", title);
    fprintf(g, "set xlabel 'vocabulary expert'\nset ylabel 'tokens in the set'\nset y2label 'share of targets (%%)'\n"
               "set ytics nomirror\nset y2tics\nset logscale y\nset yrange [0.5:*]\nset y2range [0:*]\nset xrange [-0.5:%d.5]\nset key top center\n"
               "set style fill solid 0.5\nset boxwidth 0.8\n$d << EOD\n", v->M - 1);
    for (int e = 0; e < v->M; e++) fprintf(g, "%d %g %g\n", e, v->size[e], sum > 0 ? 100 * v->tokens[e] / sum : 0);
    fprintf(g, "EOD\nplot $d using 1:2 with boxes lc rgb '#2060c0' title 'set size', "
               "$d using 1:3 axes x1y2 with points pt 7 lc rgb '#c03020' title 'share of targets'\n");
    int rc = pclose(g);
    return rc == 0 ? MOE_OK : moe_errorf(MOE_ERR_IO, "gnuplot failed writing '%s' (status %d)", out, rc);
}

static moe_status plot_vocab_svg(const char *out, const vocab_stats *v, const char *title)
{
    FILE *f = fopen(out, "w");
    if (!f) return moe_errorf(MOE_ERR_IO, "cannot write '%s'", out);
    const int bw = v->M <= 32 ? 20 : v->M <= 128 ? 6 : 3, x0 = 70, y0 = 40, h = 200;
    const int W = x0 + v->M * bw + 60, H = y0 + 2 * h + 80;
    double smax = 1, sum = 0, lmax = 0;
    for (int e = 0; e < v->M; e++) smax = fmax(smax, v->size[e]), sum += v->tokens[e];
    for (int e = 0; e < v->M; e++) lmax = fmax(lmax, sum > 0 ? v->tokens[e] / sum : 0);
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
               "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%d\" y=\"20\" font-size=\"14\">vocabulary experts: ", x0);
    svg_text(f, title);
    fprintf(f, "</text>\n<text x=\"%d\" y=\"%d\">set size (tokens, log scale; largest %.0f)</text>\n", x0, y0 + 12,
            smax);
    fprintf(f, "<text x=\"%d\" y=\"%d\">share of the targets (largest %.2f%%)</text>\n", x0, y0 + h + 40,
            100 * lmax);
    for (int e = 0; e < v->M; e++) {
        const double a = log1p(v->size[e]) / log1p(smax), b = lmax > 0 ? v->tokens[e] / sum / lmax : 0;
        fprintf(f, "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"#2060c0\"><title>expert %d: %.0f "
                   "tokens</title></rect>\n", x0 + e * bw, y0 + 20 + (h - 20) * (1 - a), bw - 1, (h - 20) * a, e, v->size[e]);
        fprintf(f, "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"#c03020\"><title>expert %d: %.2f%% "
                   "of the targets</title></rect>\n", x0 + e * bw, y0 + h + 50 + (h - 20) * (1 - b), bw - 1, (h - 20) * b,
                e, sum > 0 ? 100 * v->tokens[e] / sum : 0);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\">vocabulary expert 0 .. %d</text>\n</svg>\n", x0, H - 10, v->M - 1);
    return fclose(f) == 0 ? MOE_OK : moe_errorf(MOE_ERR_IO, "cannot write '%s'", out);
}

/* OUT with ".vocab" before its extension. */
static moe_status plot_vocab(const moe_ckpt_file *f, const char *path, const char *out, int say)
{
    if (moe_ckpt_file_info(f)->gradients) return MOE_OK;
    char name[4096];
    const char *dot = strrchr(out, '.'), *slash = strrchr(out, '/');
    if (!dot || (slash && dot < slash)) dot = out + strlen(out);
    if (snprintf(name, sizeof name, "%.*s.vocab%s", (int)(dot - out), out, dot) >= (int)sizeof name)
        return moe_errorf(MOE_ERR_ARG, "--plot: name too long");
    vocab_stats v;
    moe_status st = vocab_stats_read(f, &v);
    if (st != MOE_OK) return st;
    const char *ps = strrchr(path, '/'), *title = ps ? ps + 1 : path;
    const size_t len = strlen(name);
    st = len > 4 && !strcmp(name + len - 4, ".png") ? plot_vocab_png(name, &v, title) : plot_vocab_svg(name, &v, title);
    vocab_stats_free(&v);
    if (st == MOE_OK && say) printf("plot: %s and %s\n", out, name);
    return st;
}

/* ---- command ---- */

static int parse(int argc, char **argv, inspect_opts *o)
{
    static const struct option longs[] = {{"verify", no_argument, 0, 'v'}, {"diff", required_argument, 0, 'd'},
                                          {"json", no_argument, 0, 'j'},   {"plot", required_argument, 0, 'p'},
                                          {"help", no_argument, 0, 'h'},   {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    optind = 1;
    opterr = 0;
    /* GNU getopt permutes: options may come before or after the file. */
    for (int ch; (ch = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        switch (ch) {
        case 'v': o->verify = 1; break;
        case 'd': o->diff = optarg; break;
        case 'j': o->json = 1; break;
        case 'p': o->plot = optarg; break;
        case 'h': usage(stdout); return 0;
        default:
            fprintf(stderr, "moe inspect: unknown option or missing value in '%s'\n", argv[optind - 1]);
            usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "moe inspect: expected exactly one FILE\n");
        usage(stderr);
        return 2;
    }
    o->file = argv[optind];
    return -1;
}

static moe_status open_resolved(moe_ckpt_file **f, const char *arg, char *path, size_t cap)
{
    moe_status st = moe_ckpt_resolve(path, cap, arg);
    return st == MOE_OK ? moe_ckpt_file_open(f, path) : st;
}

int moe_cmd_inspect(int argc, char **argv)
{
    inspect_opts o;
    int rc = parse(argc, argv, &o);
    if (rc >= 0) return rc;
    char path[4096], other[4096];
    moe_ckpt_file *f = NULL, *g = NULL;
    moe_status st = open_resolved(&f, o.file, path, sizeof path);
    if (st == MOE_OK && o.diff) st = open_resolved(&g, o.diff, other, sizeof other);
    /* their datasets have different meanings (/model vs /grad): no pair to compare */
    if (st == MOE_OK && g && moe_ckpt_file_info(f)->gradients != moe_ckpt_file_info(g)->gradients) {
        const int fg = moe_ckpt_file_info(f)->gradients;
        st = moe_errorf(MOE_ERR_ARG, "--diff: cannot compare a checkpoint with a gradient dump ('%s' is a %s, '%s' a %s)",
                        path, fg ? "gradient dump" : "checkpoint", other, fg ? "checkpoint" : "gradient dump");
    }
    if (st != MOE_OK) {
        moe_cli_error(-1, "inspect", st);
        moe_ckpt_file_close(f);
        moe_ckpt_file_close(g);
        return 1;
    }
    cJSON *j = o.json ? cJSON_CreateObject() : NULL;
    if (j) cJSON_AddStringToObject(j, "file", path);
    int failed = 0;
    if (o.verify) failed = verify(f, path, j ? cJSON_AddObjectToObject(j, "verify") : NULL) > 0;
    if (o.diff) {
        if (j) cJSON_AddStringToObject(j, "other", other);
        st = diff(f, g, path, other, j ? cJSON_AddObjectToObject(j, "diff") : NULL);
    }
    if (st == MOE_OK && !o.verify && !o.diff) {
        const moe_ckpt_info *in = moe_ckpt_file_info(f);
        const param_counts p = count_params(f);
        if (j)
            cJSON_AddItemToObject(j, "info", info_json(in, &p));
        else
            print_info(in, &p);
        cJSON *jd = j ? cJSON_GetObjectItem(j, "info") : NULL;
        if (!in->gradients) st = describe_tokenizer(f, jd);
        if (st == MOE_OK) st = in->gradients ? describe_grads(f, jd) : describe_experts(f, jd);
        if (st == MOE_OK) st = describe_vocab(f, jd);
    }
    if (st == MOE_OK && o.plot) st = plot(f, path, o.plot);
    if (st == MOE_OK && o.plot && moe_ckpt_file_info(f)->model.head == MOE_HEAD_VOCAB_EXPERTS)
        st = plot_vocab(f, path, o.plot, !j);
    if (st != MOE_OK) moe_cli_error(-1, "inspect", st);
    if (j) {
        cJSON_AddBoolToObject(j, "ok", st == MOE_OK && !failed);
        moe_cli_print_json(j);
    }
    moe_ckpt_file_close(g);
    moe_ckpt_file_close(f);
    return st != MOE_OK || failed ? 1 : 0;
}
