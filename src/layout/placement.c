/* Expert placement (placement.h): the descriptor, its JSON file and the
 * load-based planner. */
#include "layout/placement.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { PLACEMENT_VERSION = 1, MAX_FILE = 64 << 20 };
static const char FORMAT_NAME[] = "moerun-placement";

struct moe_placement {
    int n_layers, E, P, S;
    int *slots;       /* (n_layers, P, S) global expert of each slot, ascending inside a rank */
    uint8_t *primary; /* (n_layers, P, S) 1: the copy on the lowest rank */
    int *copies;      /* (n_layers, E) */
};

void moe_placement_destroy(moe_placement *p)
{
    if (!p) return;
    free(p->slots);
    free(p->primary);
    free(p->copies);
    free(p);
}

static int cmp_int(const void *a, const void *b)
{
    const int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

moe_status moe_placement_create(moe_placement **out, int n_layers, int n_experts, int ranks, int slots_per_rank,
                                const int *slots, const char *what)
{
    *out = NULL;
    const int L = n_layers, E = n_experts, P = ranks, S = slots_per_rank;
    if (!what) what = "placement";
    if (L < 0 || E < 1 || P < 1 || S < 1 || (int64_t)L * P * S > (1 << 28) || (!slots && L > 0))
        return moe_errorf(MOE_ERR_ARG, "%s: bad sizes (%d layers, %d experts, %d ranks, %d slots per rank)", what, L,
                          E, P, S);
    if ((int64_t)P * S < E)
        return moe_errorf(MOE_ERR_ARG, "%s: %d ranks x %d slots hold fewer than the %d experts", what, P, S, E);
    moe_placement *p = calloc(1, sizeof *p);
    const size_t n = (size_t)(L > 0 ? L : 1) * P * S;
    if (p) {
        p->slots = malloc(n * sizeof *p->slots);
        p->primary = calloc(n, 1);
        p->copies = calloc((size_t)(L > 0 ? L : 1) * E, sizeof *p->copies);
    }
    if (!p || !p->slots || !p->primary || !p->copies) {
        moe_placement_destroy(p);
        return moe_errorf(MOE_ERR_NOMEM, "%s: %zu slots", what, n);
    }
    p->n_layers = L;
    p->E = E;
    p->P = P;
    p->S = S;
    if (L > 0) memcpy(p->slots, slots, (size_t)L * P * S * sizeof *p->slots);
    moe_status st = MOE_OK;
    for (int l = 0; st == MOE_OK && l < L; l++) {
        int *cp = p->copies + (size_t)l * E;
        for (int r = 0; st == MOE_OK && r < P; r++) {
            int *s = p->slots + ((size_t)l * P + r) * S;
            for (int j = 0; st == MOE_OK && j < S; j++)
                if (s[j] < 0 || s[j] >= E)
                    st = moe_errorf(MOE_ERR_ARG, "%s: layer %d, rank %d, slot %d holds expert %d, outside [0, %d)",
                                    what, l, r, j, s[j], E);
            if (st) break;
            qsort(s, (size_t)S, sizeof *s, cmp_int);
            for (int j = 0; j < S; j++) {
                if (j > 0 && s[j] == s[j - 1]) {
                    st = moe_errorf(MOE_ERR_ARG, "%s: layer %d, rank %d holds expert %d twice (the copies of a "
                                                 "replicated expert go to distinct ranks)", what, l, r, s[j]);
                    break;
                }
                p->primary[((size_t)l * P + r) * S + j] = cp[s[j]] == 0;
                cp[s[j]]++;
            }
        }
        for (int e = 0; st == MOE_OK && e < E; e++)
            if (cp[e] == 0) st = moe_errorf(MOE_ERR_ARG, "%s: layer %d holds expert %d nowhere", what, l, e);
    }
    if (st) {
        moe_placement_destroy(p);
        return st;
    }
    *out = p;
    return MOE_OK;
}

moe_status moe_placement_create_contiguous(moe_placement **out, int n_layers, int n_experts, int ranks)
{
    *out = NULL;
    if (ranks < 1 || n_experts < 1 || n_experts % ranks)
        return moe_errorf(MOE_ERR_ARG, "placement: the expert-parallel size %d must divide n_experts = %d", ranks,
                          n_experts);
    const size_t n = (size_t)(n_layers > 0 ? n_layers : 1) * n_experts;
    int *s = malloc(n * sizeof *s);
    if (!s) return moe_errorf(MOE_ERR_NOMEM, "placement: %zu slots", n);
    for (size_t i = 0; i < n; i++) s[i] = (int)(i % (size_t)n_experts);
    moe_status st = moe_placement_create(out, n_layers, n_experts, ranks, n_experts / ranks, s, "placement");
    free(s);
    return st;
}

int moe_placement_n_layers(const moe_placement *p) { return p->n_layers; }
int moe_placement_n_experts(const moe_placement *p) { return p->E; }
int moe_placement_ranks(const moe_placement *p) { return p->P; }
int moe_placement_slots_per_rank(const moe_placement *p) { return p->S; }
int moe_placement_replicas(const moe_placement *p) { return p->P * p->S - p->E; }

const int *moe_placement_slots(const moe_placement *p, int layer, int rank)
{
    return p->slots + ((size_t)layer * p->P + rank) * p->S;
}

int moe_placement_primary(const moe_placement *p, int layer, int rank, int j)
{
    return p->primary[((size_t)layer * p->P + rank) * p->S + j];
}

int moe_placement_copies(const moe_placement *p, int layer, int e) { return p->copies[(size_t)layer * p->E + e]; }

int moe_placement_is_contiguous(const moe_placement *p)
{
    if (p->P * p->S != p->E) return 0;
    for (int l = 0; l < p->n_layers; l++)
        for (int i = 0; i < p->E; i++)
            if (p->slots[(size_t)l * p->E + i] != i) return 0;
    return 1;
}

void moe_placement_rank_loads(const moe_placement *p, int layer, const int64_t *loads, double *out)
{
    for (int r = 0; r < p->P; r++) {
        const int *s = moe_placement_slots(p, layer, r);
        double sum = 0.0;
        for (int j = 0; j < p->S; j++) sum += (double)loads[s[j]] / moe_placement_copies(p, layer, s[j]);
        out[r] = sum;
    }
}

/* ---- the file ---- */

static moe_status read_file(char **out, const char *path)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return moe_errorf(MOE_ERR_IO, "placement file '%s': %s", path, strerror(errno));
    char *buf = malloc(MAX_FILE + 1);
    size_t n = buf ? fread(buf, 1, MAX_FILE + 1, f) : 0;
    const int err = ferror(f);
    fclose(f);
    if (!buf) return moe_errorf(MOE_ERR_NOMEM, "placement file '%s'", path);
    if (err || n > MAX_FILE) {
        free(buf);
        return moe_errorf(err ? MOE_ERR_IO : MOE_ERR_FORMAT, "placement file '%s': %s", path,
                          err ? "read error" : "larger than 64 MiB");
    }
    buf[n] = 0;
    *out = buf;
    return MOE_OK;
}

/* An integer member of o (a JSON number with no fraction). */
static moe_status get_int(const cJSON *o, const char *key, int *v, const char *path)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(x) || x->valuedouble != (double)(int)x->valuedouble)
        return moe_errorf(MOE_ERR_FORMAT, "placement file '%s': \"%s\" is missing or not an integer", path, key);
    *v = (int)x->valuedouble;
    return MOE_OK;
}

moe_status moe_placement_load(moe_placement **out, const char *path, int n_layers, const int *blocks, int n_experts,
                              int ranks)
{
    *out = NULL;
    char *text = NULL;
    moe_status st = read_file(&text, path);
    if (st) return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return moe_errorf(MOE_ERR_FORMAT, "placement file '%s': not a JSON object", path);
    }
    int version = 0, E = 0, P = 0, S = 0;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, FORMAT_NAME))
        st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': \"format\" is not \"%s\"", path, FORMAT_NAME);
    if (!st) st = get_int(root, "version", &version, path);
    if (!st && version != PLACEMENT_VERSION)
        st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': version %d (this moerun reads version %d)", path,
                        version, PLACEMENT_VERSION);
    if (!st) st = get_int(root, "experts", &E, path);
    if (!st) st = get_int(root, "ranks", &P, path);
    if (!st) st = get_int(root, "slots", &S, path);
    if (!st && E != n_experts)
        st = moe_errorf(MOE_ERR_MISMATCH, "placement file '%s' is for %d experts per MoE layer, the model has %d",
                        path, E, n_experts);
    if (!st && P != ranks)
        st = moe_errorf(MOE_ERR_MISMATCH, "placement file '%s' is for %d expert-parallel ranks, this run has %d "
                                          "(make one with 'moe placement plan --ranks %d')", path, P, ranks, ranks);
    if (!st && (S < 1 || S > n_experts || (int64_t)P * S < E))
        st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': %d slots per rank for %d experts over %d ranks", path,
                        S, E, P);
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(root, "layers");
    if (!st && !cJSON_IsArray(layers))
        st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': \"layers\" is missing or not a list", path);
    if (!st && cJSON_GetArraySize(layers) != n_layers)
        st = moe_errorf(MOE_ERR_MISMATCH, "placement file '%s' has %d MoE layers, the model has %d", path,
                        cJSON_GetArraySize(layers), n_layers);
    const cJSON *bl = cJSON_GetObjectItemCaseSensitive(root, "blocks");
    if (!st && bl && blocks) {
        int ok = cJSON_IsArray(bl) && cJSON_GetArraySize(bl) == n_layers;
        for (int l = 0; ok && l < n_layers; l++) {
            const cJSON *b = cJSON_GetArrayItem(bl, l);
            ok = cJSON_IsNumber(b) && b->valuedouble == blocks[l];
        }
        if (!ok)
            st = moe_errorf(MOE_ERR_MISMATCH, "placement file '%s': \"blocks\" are not the model's MoE blocks", path);
    }
    int *slots = NULL;
    if (!st && !(slots = malloc((size_t)(n_layers > 0 ? n_layers : 1) * P * S * sizeof *slots)))
        st = moe_errorf(MOE_ERR_NOMEM, "placement file '%s'", path);
    for (int l = 0; !st && l < n_layers; l++) {
        const cJSON *lr = cJSON_GetArrayItem(layers, l);
        if (!cJSON_IsArray(lr) || cJSON_GetArraySize(lr) != P) {
            st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': layer %d is not a list of %d rank lists", path, l, P);
            break;
        }
        for (int r = 0; !st && r < P; r++) {
            const cJSON *rl = cJSON_GetArrayItem(lr, r);
            if (!cJSON_IsArray(rl) || cJSON_GetArraySize(rl) != S) {
                st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': layer %d, rank %d is not a list of %d experts "
                                                "(every rank holds the same number of slots)", path, l, r, S);
                break;
            }
            for (int j = 0; j < S; j++) {
                const cJSON *x = cJSON_GetArrayItem(rl, j);
                if (!cJSON_IsNumber(x) || x->valuedouble != (double)(int)x->valuedouble) {
                    st = moe_errorf(MOE_ERR_FORMAT, "placement file '%s': layer %d, rank %d, slot %d is not an "
                                                    "expert number", path, l, r, j);
                    break;
                }
                slots[((size_t)l * P + r) * S + j] = (int)x->valuedouble;
            }
        }
    }
    cJSON_Delete(root);
    if (!st) {
        char what[1100];
        snprintf(what, sizeof what, "placement file '%s'", path);
        st = moe_placement_create(out, n_layers, n_experts, ranks, S, slots, what);
        if (st == MOE_ERR_ARG) st = MOE_ERR_FORMAT; /* the detail names the rule */
    }
    free(slots);
    return st;
}

moe_status moe_placement_save(const moe_placement *p, const int *blocks, const char *path)
{
    cJSON *root = cJSON_CreateObject(), *layers = cJSON_CreateArray();
    int ok = root && layers;
    if (ok) {
        cJSON_AddStringToObject(root, "format", FORMAT_NAME);
        cJSON_AddNumberToObject(root, "version", PLACEMENT_VERSION);
        cJSON_AddNumberToObject(root, "experts", p->E);
        cJSON_AddNumberToObject(root, "ranks", p->P);
        cJSON_AddNumberToObject(root, "slots", p->S);
        if (blocks) ok = cJSON_AddItemToObject(root, "blocks", cJSON_CreateIntArray(blocks, p->n_layers));
        ok = ok && cJSON_AddItemToObject(root, "layers", layers);
        if (!ok) cJSON_Delete(layers);
        layers = ok ? layers : NULL;
    }
    for (int l = 0; ok && l < p->n_layers; l++) {
        cJSON *lr = cJSON_CreateArray();
        ok = lr && cJSON_AddItemToArray(layers, lr);
        for (int r = 0; ok && r < p->P; r++)
            ok = cJSON_AddItemToArray(lr, cJSON_CreateIntArray(moe_placement_slots(p, l, r), p->S));
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!text) return moe_errorf(MOE_ERR_NOMEM, "placement file '%s'", path);
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp) {
        free(text);
        return moe_errorf(MOE_ERR_ARG, "placement file '%s': path too long", path);
    }
    FILE *f = fopen(tmp, "wb");
    int err = f ? 0 : errno;
    if (f) {
        if (fputs(text, f) < 0 || fputc('\n', f) < 0) err = errno ? errno : EIO;
        if (fflush(f) != 0 && !err) err = errno;
        if (fsync(fileno(f)) != 0 && !err) err = errno;
        if (fclose(f) != 0 && !err) err = errno;
        if (!err && rename(tmp, path) != 0) err = errno;
        if (err) unlink(tmp);
    }
    free(text);
    if (err) return moe_errorf(MOE_ERR_IO, "cannot write placement file '%s': %s", path, strerror(err));
    return MOE_OK;
}

/* ---- the planner ---- */

/* Copies (ranks) of each expert of one layer: R extra copies, one at a time
 * to the highest load per copy. */
static void plan_copies(int *copies, const int64_t *w, int E, int P, int R)
{
    for (int e = 0; e < E; e++) copies[e] = 1;
    for (int k = 0; k < R; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (copies[e] >= P) continue;
            /* w[e] / copies[e] > w[best] / copies[best], exactly */
            if (best < 0 || (double)w[e] * copies[best] > (double)w[best] * copies[e]) best = e;
        }
        copies[best]++; /* R <= E (P - 1): some expert has fewer than P copies */
    }
}

/* Places every copy of one layer: items (expert, copy) in order, each on the
 * best rank with a free slot not yet holding that expert. by_load: the
 * least-loaded rank (ties: more free slots, lower rank); else the rank with
 * the most free slots (ties: less load, lower rank), which always succeeds
 * (the copies of an expert never outnumber the ranks, every rank has the
 * same slots: the Gale-Ryser condition holds). Returns 0 when stuck. */
static int place_layer(int *slots, const int *order, const int *copies, const int64_t *w, int E, int P, int S,
                       int by_load, double *load, int *used, uint8_t *has)
{
    for (int r = 0; r < P; r++) load[r] = 0.0, used[r] = 0;
    memset(has, 0, (size_t)P * E);
    for (int i = 0; i < E; i++) {
        const int e = order[i];
        const double share = (double)w[e] / copies[e];
        for (int c = 0; c < copies[e]; c++) {
            int best = -1;
            for (int r = 0; r < P; r++) {
                if (used[r] == S || has[(size_t)r * E + e]) continue;
                if (best < 0) { best = r; continue; }
                const int fewer = load[r] < load[best], same = load[r] == load[best];
                const int freer = S - used[r] > S - used[best], same_free = used[r] == used[best];
                if (by_load ? (fewer || (same && freer)) : (freer || (same_free && fewer))) best = r;
            }
            if (best < 0) return 0;
            slots[(size_t)best * S + used[best]++] = e;
            has[(size_t)best * E + e] = 1;
            load[best] += share;
        }
    }
    return 1;
}

/* After the greedy pass: swaps of two copies between the busiest rank and
 * another, the one that lowers the pair's larger load the most, while one
 * does (the rank-load vector falls lexicographically at each swap, so this
 * ends; capped for safety). Slot order inside a rank does not matter here:
 * moe_placement_create sorts. */
static void refine(int *slots, const int *copies, const int64_t *w, int E, int P, int S, double *load, uint8_t *has)
{
    for (int it = 0; it < 64 * E; it++) {
        int a = 0;
        for (int r = 1; r < P; r++)
            if (load[r] > load[a]) a = r;
        double best = load[a];
        int bi = -1, bb = -1, bj = -1;
        for (int i = 0; i < S; i++) {
            const int x = slots[(size_t)a * S + i];
            const double sx = (double)w[x] / copies[x];
            for (int b = 0; b < P; b++) {
                if (b == a || has[(size_t)b * E + x]) continue;
                for (int j = 0; j < S; j++) {
                    const int y = slots[(size_t)b * S + j];
                    if (has[(size_t)a * E + y]) continue;
                    const double sy = (double)w[y] / copies[y];
                    const double la = load[a] - sx + sy, lb = load[b] - sy + sx, m = la > lb ? la : lb;
                    if (m < best) best = m, bi = i, bb = b, bj = j;
                }
            }
        }
        if (bi < 0) return;
        const int x = slots[(size_t)a * S + bi], y = slots[(size_t)bb * S + bj];
        const double sx = (double)w[x] / copies[x], sy = (double)w[y] / copies[y];
        slots[(size_t)a * S + bi] = y;
        slots[(size_t)bb * S + bj] = x;
        has[(size_t)a * E + x] = 0, has[(size_t)a * E + y] = 1;
        has[(size_t)bb * E + y] = 0, has[(size_t)bb * E + x] = 1;
        load[a] += sy - sx;
        load[bb] += sx - sy;
    }
}

/* An expert and its load per copy, for the heaviest-first order. */
typedef struct {
    double share;
    int e;
} heavy;

/* Heaviest load per copy first, ties: lower id. */
static int cmp_heavy(const void *a, const void *b)
{
    const heavy *x = a, *y = b;
    if (x->share != y->share) return x->share > y->share ? -1 : 1;
    return (x->e > y->e) - (x->e < y->e);
}

/* Scratch of the planner (one layer at a time). */
typedef struct {
    int E, P, S;
    int *order, *used, *cand;
    heavy *hv;
    double *load;
    uint8_t *has;
} planner;

/* Packs one layer's copies into slots (P, S): heaviest first, improving
 * swaps. Returns the busiest rank's load, or -1 when no packing was found. */
static double pack(planner *pl, int *slots, const int *copies, const int64_t *w)
{
    const int E = pl->E, P = pl->P, S = pl->S;
    for (int e = 0; e < E; e++) pl->hv[e] = (heavy){(double)w[e] / copies[e], e};
    qsort(pl->hv, (size_t)E, sizeof *pl->hv, cmp_heavy);
    for (int e = 0; e < E; e++) pl->order[e] = pl->hv[e].e;
    if (!place_layer(slots, pl->order, copies, w, E, P, S, 1, pl->load, pl->used, pl->has) &&
        !place_layer(slots, pl->order, copies, w, E, P, S, 0, pl->load, pl->used, pl->has))
        return -1.0;
    refine(slots, copies, w, E, P, S, pl->load, pl->has);
    double m = 0.0;
    for (int r = 0; r < P; r++) m = pl->load[r] > m ? pl->load[r] : m;
    return m;
}

/* With replicas: the EPLB copy counts are a start, not always the best to
 * pack (each rank holds exactly S copies). Moves one extra copy from an
 * expert to one of the hottest others while the packed busiest rank gets
 * lighter; deterministic (first best move in id order), bounded. */
static double improve_copies(planner *pl, int *slots, int *try_slots, int *copies, const int64_t *w, int R,
                             double cur)
{
    const int E = pl->E, P = pl->P, nc = 2 * R + 4 < E ? 2 * R + 4 : E;
    for (int it = 0; R > 0 && cur > 0 && it < 2 * R + 8; it++) {
        /* candidates to gain a copy: the highest loads per copy */
        for (int e = 0; e < E; e++) pl->hv[e] = (heavy){(double)w[e] / copies[e], e};
        qsort(pl->hv, (size_t)E, sizeof *pl->hv, cmp_heavy);
        for (int i = 0; i < nc; i++) pl->cand[i] = pl->hv[i].e;
        double best = cur;
        int ba = -1, bb = -1;
        for (int a = 0; a < E; a++) {
            if (copies[a] < 2) continue;
            for (int i = 0; i < nc; i++) {
                const int b = pl->cand[i];
                if (b == a || copies[b] >= P) continue;
                copies[a]--, copies[b]++;
                const double m = pack(pl, try_slots, copies, w);
                copies[a]++, copies[b]--;
                if (m >= 0 && m < best) best = m, ba = a, bb = b;
            }
        }
        if (ba < 0) break;
        copies[ba]--, copies[bb]++;
        cur = pack(pl, slots, copies, w);
    }
    return cur;
}

moe_status moe_placement_plan(moe_placement **out, const int64_t *loads, int n_layers, int n_experts, int ranks,
                              int replicas)
{
    *out = NULL;
    const int E = n_experts, P = ranks, R = replicas;
    if (E < 1 || P < 1 || n_layers < 0) return moe_errorf(MOE_ERR_ARG, "placement plan: %d experts, %d ranks", E, P);
    if (R < 0) return moe_errorf(MOE_ERR_ARG, "placement plan: --replicas %d must be >= 0", R);
    if ((int64_t)R > (int64_t)E * (P - 1))
        return moe_errorf(MOE_ERR_ARG, "placement plan: %d replicas of %d experts over %d ranks: some rank would hold "
                                       "two copies of one expert (at most %lld)", R, E, P, (long long)E * (P - 1));
    if ((E + R) % P)
        return moe_errorf(MOE_ERR_ARG, "placement plan: %d ranks do not divide %d experts + %d replicas (every rank "
                                       "holds the same number of slots)", P, E, R);
    for (int64_t i = 0; i < (int64_t)n_layers * E; i++)
        if (loads[i] < 0) return moe_errorf(MOE_ERR_ARG, "placement plan: negative load %lld", (long long)loads[i]);
    const int S = (E + R) / P;
    const size_t nl = (size_t)(n_layers > 0 ? n_layers : 1);
    planner pl = {.E = E, .P = P, .S = S};
    int *slots = malloc(nl * P * S * sizeof *slots), *copies = malloc((size_t)E * sizeof *copies);
    int *try_slots = malloc((size_t)P * S * sizeof *try_slots);
    pl.order = malloc((size_t)E * sizeof *pl.order);
    pl.cand = malloc((size_t)E * sizeof *pl.cand);
    pl.used = malloc((size_t)P * sizeof *pl.used);
    pl.hv = malloc((size_t)E * sizeof *pl.hv);
    pl.load = malloc((size_t)P * sizeof *pl.load);
    pl.has = malloc((size_t)P * E);
    moe_status st = slots && copies && try_slots && pl.order && pl.cand && pl.hv && pl.used && pl.load && pl.has
                        ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "placement plan");
    for (int l = 0; !st && l < n_layers; l++) {
        const int64_t *w = loads + (size_t)l * E;
        int *s = slots + (size_t)l * P * S;
        plan_copies(copies, w, E, P, R);
        const double m = pack(&pl, s, copies, w);
        if (m < 0)
            st = moe_errorf(MOE_ERR_ARG, "placement plan: layer %d: no placement of its copies found", l);
        else
            improve_copies(&pl, s, try_slots, copies, w, R, m);
    }
    if (!st) st = moe_placement_create(out, n_layers, E, P, S, slots, "placement plan");
    free(slots);
    free(copies);
    free(try_slots);
    free(pl.order);
    free(pl.cand);
    free(pl.hv);
    free(pl.used);
    free(pl.load);
    free(pl.has);
    return st;
}
