/* moe bench layer: times one MoE layer forward+backward (single process or
 * expert-parallel under mpirun), splits the time by phase, measures the same
 * expert GEMMs alone for an efficiency figure, and with --save writes the
 * layer dump (docs/formats.md) that the PyTorch reference recomputes. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "config/config.h"
#include "core/par.h"
#include "core/rng.h"
#include "io/dump.h"
#include "layer/layer.h"

typedef struct {
    int T, d, F, E, k, G, iters, warmup, threads, json, ep_size, normalize, chunks;
    double cf, aux, z;
    moe_router_kind router;
    moe_activation act;
    moe_a2a_kind a2a;
    uint32_t seed;
    const char *save;
    /* The router keys of docs/training.md's table (score, n_groups,
     * topk_groups): read by the config table itself, so names, ranges and
     * messages are those of `moe train`; only these fields are used. */
    moe_train_config rk;
} bench_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: [mpirun -np W] moe bench layer [options]\n"
            "  --tokens T            global tokens (default 4096)\n"
            "  --d-model D           model width (256)\n"
            "  --d-ff F              expert hidden width (1024)\n"
            "  --experts E           number of experts (8)\n"
            "  --top-k K             experts per token, token choice (2)\n"
            "  --capacity-factor C   token choice: capacity factor, <= 0 dropless (1.25);\n"
            "                        expert choice: experts per token c (default 2)\n"
            "  --router R            token_choice | expert_choice\n"
            "  --normalize-topk 0|1  (default 1 when k > 1)\n"
            "  --score S             router score: softmax | sigmoid (key `score`)\n"
            "  --n-groups N          group-limited routing over N expert groups, 1: off (key `n_groups`)\n"
            "  --topk-groups M       groups each token may use, 0: all (key `topk_groups`)\n"
            "  --activation A        gelu | relu | swiglu\n"
            "  --groups G            routing groups of T/G tokens (default: number of ranks)\n"
            "  --ep-size P           expert-parallel size (default: number of ranks)\n"
            "  --a2a KIND            p2p | shm | node | auto (exchange; default p2p; alltoallv = p2p)\n"
            "  --chunks N            overlap the exchange with expert compute in N chunks (1)\n"
            "  --aux-loss-coef A     (0.01)   --z-loss-coef Z  (0.001)\n"
            "  --iters N             timed iterations, >= 1 (10); --warmup N (2)\n"
            "  --seed S              (1234)\n"
            "  --threads N           OpenBLAS threads per rank (default: OPENBLAS_NUM_THREADS)\n"
            "  --json                print one JSON object instead of text\n"
            "  --save FILE.h5        write the layer dump of one forward+backward\n");
}

/* 1 if s is an int (stored in *out), 0 otherwise. */
static int parse_int(const char *s, int *out)
{
    long v;
    if (moe_cli_parse_long(s, -2147483647L, 2147483647L, &v)) return 0;
    *out = (int)v;
    return 1;
}

static int parse_double(const char *s, double *out) { return moe_cli_parse_double(s, out) == 0; }

/* Returns 0 on success, 2 on a usage error (message printed), 1 for --help. */
static int parse_opts(bench_opts *o, int argc, char **argv, int rank)
{
    memset(o, 0, sizeof *o);
    moe_train_config_default(&o->rk);
    o->T = 4096; o->d = 256; o->F = 1024; o->E = 8; o->k = 2; o->G = 0; o->iters = 10; o->warmup = 2; o->threads = 0; o->ep_size = 0; o->normalize = -1; o->chunks = 1; o->cf = NAN; o->aux = 0.01; o->z = 0.001; o->router = MOE_ROUTER_TOKEN_CHOICE; o->act = MOE_ACT_GELU; o->a2a = MOE_A2A_P2P; o->seed = 1234;
    static const struct option longopts[] = {
        {"tokens", required_argument, 0, 'T'},      {"d-model", required_argument, 0, 'd'},
        {"d-ff", required_argument, 0, 'F'},        {"experts", required_argument, 0, 'E'},
        {"top-k", required_argument, 0, 'k'},       {"capacity-factor", required_argument, 0, 'c'},
        {"router", required_argument, 0, 'r'},      {"activation", required_argument, 0, 'a'},
        {"groups", required_argument, 0, 'G'},      {"iters", required_argument, 0, 'i'},
        {"warmup", required_argument, 0, 'w'},      {"seed", required_argument, 0, 's'},
        {"threads", required_argument, 0, 't'},     {"json", no_argument, 0, 'j'},
        {"save", required_argument, 0, 'o'},        {"ep-size", required_argument, 0, 'P'},
        {"normalize-topk", required_argument, 0, 'n'}, {"aux-loss-coef", required_argument, 0, 'A'},
        {"z-loss-coef", required_argument, 0, 'Z'}, {"a2a", required_argument, 0, 'x'},
        {"chunks", required_argument, 0, 'C'},      {"help", no_argument, 0, 'h'},
        {"score", required_argument, 0, 'S'},       {"n-groups", required_argument, 0, 'g'},
        {"topk-groups", required_argument, 0, 'K'},
        {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c, seed = 0;
    int li = 0; /* the long option's index: argv[optind - 1] is its value when given apart */
    while ((c = getopt_long(argc, argv, "", longopts, &li)) != -1) {
        int ok = 1;
        switch (c) {
        case 'T': ok = parse_int(optarg, &o->T); break;
        case 'd': ok = parse_int(optarg, &o->d); break;
        case 'F': ok = parse_int(optarg, &o->F); break;
        case 'E': ok = parse_int(optarg, &o->E); break;
        case 'k': ok = parse_int(optarg, &o->k); break;
        case 'G': ok = parse_int(optarg, &o->G); break;
        case 'i':
            /* every figure is a median over the timed iterations: none is no figure */
            ok = parse_int(optarg, &o->iters);
            if (ok && o->iters < 1) {
                if (rank == 0)
                    fprintf(stderr, "moe bench layer: --iters %s: at least 1 timed iteration is needed (the "
                                    "figures are medians over them)\n", optarg);
                return 2;
            }
            break;
        case 'w': ok = parse_int(optarg, &o->warmup) && o->warmup >= 0; break;
        case 't': ok = parse_int(optarg, &o->threads) && o->threads >= 1; break;
        case 'P': ok = parse_int(optarg, &o->ep_size) && o->ep_size >= 1; break;
        case 'n': ok = parse_int(optarg, &o->normalize) && (o->normalize == 0 || o->normalize == 1); break;
        case 'C': ok = parse_int(optarg, &o->chunks) && o->chunks >= 1; break;
        case 's': ok = parse_int(optarg, &seed) && seed >= 0; o->seed = (uint32_t)seed; break;
        case 'c': ok = parse_double(optarg, &o->cf); break;
        case 'A': ok = parse_double(optarg, &o->aux); break;
        case 'Z': ok = parse_double(optarg, &o->z); break;
        case 'j': o->json = 1; break;
        case 'o': o->save = optarg; break;
        case 'r':
            if (moe_router_kind_parse(&o->router, optarg)) {
                if (rank == 0) moe_cli_error(-1, "bench layer: --router", MOE_ERR_ARG);
                return 2;
            }
            break;
        case 'a':
            if (moe_activation_parse(&o->act, optarg)) {
                if (rank == 0) moe_cli_error(-1, "bench layer: --activation", MOE_ERR_ARG);
                return 2;
            }
            break;
        case 'x':
            if (moe_a2a_kind_parse(&o->a2a, optarg) != MOE_OK) ok = 0;
            break;
        case 'S':
        case 'g':
        case 'K': {
            const char *key = c == 'S' ? "score" : c == 'g' ? "n_groups" : "topk_groups";
            moe_status st = moe_train_config_set(&o->rk, key, optarg);
            if (st) {
                char what[64];
                snprintf(what, sizeof what, "bench layer: --%s", longopts[li].name);
                if (rank == 0) moe_cli_error(-1, what, st);
                return 2;
            }
            break;
        }
        case 'h':
            if (rank == 0) usage(stdout);
            return 1;
        default:
            if (rank == 0) {
                fprintf(stderr, "moe bench layer: unknown option '%s'\n", argv[optind - 1]);
                usage(stderr);
            }
            return 2;
        }
        if (!ok) {
            if (rank == 0) fprintf(stderr, "moe bench layer: bad value '%s' for --%s\n", optarg, longopts[li].name);
            return 2;
        }
    }
    if (optind < argc) {
        if (rank == 0) fprintf(stderr, "moe bench layer: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (isnan(o->cf)) o->cf = o->router == MOE_ROUTER_EXPERT_CHOICE ? 2.0 : 1.25;
    return 0;
}

/* The name the config table gives key `name`'s value in c (enum keys). */
static const char *key_text(const moe_train_config *c, const char *name)
{
    moe_model_attr a[MOE_MODEL_ATTRS_MAX];
    const int n = moe_train_config_model_attrs(c, a, MOE_MODEL_ATTRS_MAX);
    for (int i = 0; i < n && i < MOE_MODEL_ATTRS_MAX; i++)
        if (!strcmp(a[i].name, name) && a[i].type == MOE_ATTR_TEXT) return a[i].text;
    return "?";
}

/* Deterministic values keyed by the GLOBAL element index, so every rank
 * count builds the same tensors: dst[i] = scale * N(0,1)[g0 + i]. */
static void fill_normal(float *dst, size_t n, int64_t g0, uint32_t tensor, float scale, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t g = (uint64_t)(g0 + (int64_t)i);
        dst[i] = scale * (float)moe_rng_normal(seed, MOE_RNG_BENCH, (uint32_t)g, (uint32_t)(g >> 32), tensor, 0);
    }
}

typedef struct {
    float *block;             /* one allocation for params and grads */
    moe_layer_params p, g;
    float *x, *dy, *y, *dx;   /* (T_local, d) */
} bench_data;

static moe_status bench_alloc(bench_data *b, const bench_opts *o, int T_local, int El, int e0, int64_t t0)
{
    const int d = o->d, F = o->F, F1 = moe_f1(o->F, o->act), E = o->E;
    size_t n_router = (size_t)E * d;
    size_t n_w1 = (size_t)El * F1 * d, n_b1 = (size_t)El * F1, n_w2 = (size_t)El * d * F, n_b2 = (size_t)El * d;
    size_t n_params = n_router + n_w1 + n_b1 + n_w2 + n_b2;
    size_t n_act = (size_t)T_local * d;
    b->block = moe_calloc(2 * n_params + 4 * n_act, sizeof(float));
    if (!b->block) return moe_errorf(MOE_ERR_NOMEM, "bench layer: cannot allocate parameters");
    float *q = b->block;
    moe_layer_params *ps[2] = {&b->p, &b->g};
    for (int i = 0; i < 2; i++) {
        ps[i]->router_w = q; q += n_router;
        ps[i]->noise_w = NULL;
        ps[i]->experts.w1 = q; q += n_w1;
        ps[i]->experts.b1 = q; q += n_b1;
        ps[i]->experts.w2 = q; q += n_w2;
        ps[i]->experts.b2 = q; q += n_b2;
    }
    b->x = q; q += n_act;
    b->dy = q; q += n_act;
    b->y = q; q += n_act;
    b->dx = q;
    /* Tensor ids 1..7; expert tensors offset by the first local expert. */
    fill_normal(b->p.router_w, n_router, 0, 1, 1.0f / sqrtf((float)d), o->seed);
    fill_normal(b->p.experts.w1, n_w1, (int64_t)e0 * F1 * d, 2, 1.0f / sqrtf((float)d), o->seed);
    fill_normal(b->p.experts.b1, n_b1, (int64_t)e0 * F1, 3, 0.1f, o->seed);
    fill_normal(b->p.experts.w2, n_w2, (int64_t)e0 * d * F, 4, 1.0f / sqrtf((float)F), o->seed);
    fill_normal(b->p.experts.b2, n_b2, (int64_t)e0 * d, 5, 0.1f, o->seed);
    fill_normal(b->x, n_act, t0 * d, 6, 1.0f, o->seed);
    fill_normal(b->dy, n_act, t0 * d, 7, 1.0f, o->seed);
    return MOE_OK;
}

static void zero_grads(bench_data *b, size_t n_params)
{
    memset(b->g.router_w, 0, n_params * sizeof(float));
}

/* The bare expert GEMMs: the bound the layer is measured against. */
typedef struct {
    const bench_opts *o;
    const int *rows;      /* (El) */
    const size_t *r0;     /* (El) first row of each expert */
    int El;
    float *x, *h, *a, *y, *w, *gw;
    int next;             /* shared: the next expert to take (atomic) */
} bare_job;

/* The six GEMMs of expert j's forward+backward (beta as in the layer's
 * weight-gradient accumulation), on the calling thread's OpenBLAS threads. */
static void bare_expert(const bare_job *b, int j)
{
    const int d = b->o->d, F = b->o->F, F1 = moe_f1(b->o->F, b->o->act), n = b->rows[j];
    if (n == 0) return;
    const size_t per = (size_t)F1 * d + (size_t)d * F, r0 = b->r0[j];
    float *w1 = b->w + j * per, *w2 = w1 + (size_t)F1 * d, *gw1 = b->gw + j * per, *gw2 = gw1 + (size_t)F1 * d;
    float *xe = b->x + r0 * d, *he = b->h + r0 * F1, *ae = b->a + r0 * F1, *ye = b->y + r0 * d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F1, d, 1.0f, xe, d, w1, d, 0.0f, he, F1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, F, 1.0f, ae, F, w2, F, 0.0f, ye, d);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, F, n, 1.0f, ye, d, ae, F, 1.0f, gw2, F);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, F, d, 1.0f, ye, d, w2, F, 0.0f, ae, F);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F1, d, n, 1.0f, he, F1, xe, d, 1.0f, gw1, d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, F1, 1.0f, he, F1, w1, d, 0.0f, xe, d);
}

/* Experts shared out over the threads, each on one OpenBLAS thread. */
static void bare_shared_run(void *ctx, int t, int nt)
{
    (void)t, (void)nt;
    bare_job *b = ctx;
    for (int j; (j = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED)) < b->El;) bare_expert(b, j);
}

/* The same expert GEMMs as one forward+backward, alone (no routing,
 * packing, activation, bias or exchange), on the same row counts, with
 * distinct weights per expert as in the layer, in the two ways of
 * threading them: every expert over all OpenBLAS threads in turn, and the
 * experts shared out over the threads, one OpenBLAS thread each. The
 * faster is the bound the layer is measured against. Returns the median
 * seconds of `iters` runs of the faster way (each run times both,
 * alternating which goes first). */
static double bare_gemm_seconds(const bench_opts *o, const int *rows, int El, int iters)
{
    const int d = o->d, F = o->F, F1 = moe_f1(o->F, o->act);
    size_t N = 0;
    size_t *r0 = moe_calloc((size_t)El, sizeof *r0);
    for (int j = 0; r0 && j < El; j++) r0[j] = N, N += (size_t)rows[j];
    const size_t wn = (size_t)El * ((size_t)F1 * d + (size_t)d * F);
    float *buf = moe_calloc((N ? N : 1) * (2 * (size_t)d + 2 * (size_t)F1) + 2 * wn, sizeof(float));
    if (!buf || !r0 || iters < 1) {
        moe_free(buf);
        moe_free(r0);
        return NAN;
    }
    bare_job b = {o, rows, r0, El, buf, NULL, NULL, NULL, NULL, NULL, 0};
    b.h = b.x + N * d, b.a = b.h + N * F1, b.y = b.a + N * F1, b.w = b.y + N * d, b.gw = b.w + wn;
    double t[2][64];
    if (iters > 64) iters = 64;
    for (int it = 0; it < iters + 1; it++) {
        for (int q = 0; q < 2; q++) {
            const int shared = (it + q) % 2;
            double t0 = moe_now();
            if (shared) {
                b.next = 0;
                moe_par_run(moe_par_threads() < El ? moe_par_threads() : El, bare_shared_run, &b);
            } else {
                for (int j = 0; j < El; j++) bare_expert(&b, j);
            }
            if (it > 0) t[shared][it - 1] = moe_now() - t0; /* the first run warms up */
        }
    }
    moe_free(buf);
    moe_free(r0);
    const double inside = moe_cli_median(t[0], iters), shared = moe_cli_median(t[1], iters);
    return inside < shared ? inside : shared;
}

static int fail(int rank, const char *what, moe_status st)
{
    moe_cli_error(rank, what, st);
    return 1;
}

static int run(moe_comm *comm, const bench_opts *o)
{
    const int W = moe_comm_size(comm), rank = moe_comm_rank(comm);
    const int P = moe_comm_ep_size(comm);
    const int G = o->G;
    moe_status st = MOE_OK;
    if (o->T < 1 || o->d < 1 || o->F < 1 || o->E < 1)
        st = moe_errorf(MOE_ERR_ARG, "--tokens, --d-model, --d-ff and --experts must be >= 1 "
                        "(got %d, %d, %d, %d)", o->T, o->d, o->F, o->E);
    else if (G < 1 || G % W != 0)
        st = moe_errorf(MOE_ERR_ARG, "--groups %d must be a positive multiple of the %d ranks", G, W);
    else if (o->T % G != 0)
        st = moe_errorf(MOE_ERR_ARG, "--tokens %d is not divisible by --groups %d", o->T, G);
    else if (o->E % P != 0)
        st = moe_errorf(MOE_ERR_ARG, "--experts %d is not divisible by the expert-parallel size %d", o->E, P);
    else if (o->save && (o->rk.score != MOE_SCORE_SOFTMAX || o->rk.n_groups > 1))
        /* the layer dump records the router of sections 1-5 only; its
         * reference would recompute a different routing */
        st = moe_errorf(MOE_ERR_ARG, "--save writes a layer dump of the softmax router without expert groups; "
                        "it cannot record --score sigmoid or --n-groups > 1");
    if (st) return fail(rank, "bench layer", st);
    /* Every rank must run the same experiment; name the option that differs. */
    const struct { const char *name; const void *v; size_t n; } same[] = {
        {"--tokens", &o->T, sizeof o->T},          {"--d-model", &o->d, sizeof o->d},
        {"--d-ff", &o->F, sizeof o->F},            {"--experts", &o->E, sizeof o->E},
        {"--top-k", &o->k, sizeof o->k},           {"--groups", &o->G, sizeof o->G},
        {"--capacity-factor", &o->cf, sizeof o->cf}, {"--router", &o->router, sizeof o->router},
        {"--activation", &o->act, sizeof o->act},  {"--normalize-topk", &o->normalize, sizeof o->normalize},
        {"--seed", &o->seed, sizeof o->seed},      {"--iters", &o->iters, sizeof o->iters},
        {"--warmup", &o->warmup, sizeof o->warmup}, {"--aux-loss-coef", &o->aux, sizeof o->aux},
        {"--z-loss-coef", &o->z, sizeof o->z},     {"--a2a", &o->a2a, sizeof o->a2a},
        {"--chunks", &o->chunks, sizeof o->chunks}, {"--score", &o->rk.score, sizeof o->rk.score},
        {"--n-groups", &o->rk.n_groups, sizeof o->rk.n_groups},
        {"--topk-groups", &o->rk.topk_groups, sizeof o->rk.topk_groups}, {"--save (given or not)", &(int){o->save != NULL}, sizeof(int)},
    };
    for (size_t i = 0; i < sizeof same / sizeof same[0] && !st; i++)
        st = moe_comm_check_same(comm, same[i].name, same[i].v, same[i].n);
    if (st) return fail(rank, "bench layer", st);

    const int G_local = G / W, T_local = o->T / W;
    const int64_t t0 = (int64_t)rank * T_local;
    moe_layer_config lc = {
        .router = {.n_experts = o->E, .top_k = o->k, .d_model = o->d, .kind = o->router,
                   .capacity_factor = o->cf,
                   .normalize_topk = o->normalize >= 0 ? o->normalize : (o->k > 1),
                   .noise = 0, .score = (moe_score_kind)o->rk.score, .n_groups = o->rk.n_groups,
                   .topk_groups = o->rk.topk_groups},
        .d_ff = o->F, .act = o->act, .max_tokens = T_local, .max_groups = G_local,
        .a2a = o->a2a, .chunks = o->chunks};
    moe_layer *L = NULL;
    st = moe_layer_create(&L, &lc, comm);
    if (st) return fail(rank, "bench layer", st);
    const int El = moe_layer_n_local_experts(L), e0 = moe_layer_expert0(L);
    bench_data b;
    st = moe_comm_agree(comm, bench_alloc(&b, o, T_local, El, e0, t0));
    if (st) {
        moe_layer_destroy(L);
        return fail(rank, "bench layer", st);
    }
    const int F1 = moe_f1(o->F, o->act);
    const size_t n_params = (size_t)o->E * o->d + (size_t)El * (F1 * o->d + F1 + o->d * o->F + o->d);
    const float lb_scale = (float)(o->aux / G), z_scale = (float)(o->z / G);

    /* One forward+backward; the timed loop and --save use the same call. */
#define STEP()                                                                                    \
    do {                                                                                          \
        st = moe_layer_forward(L, b.y, b.x, &b.p, T_local, G_local, NULL);                        \
        if (!st) {                                                                                \
            memset(b.dx, 0, sizeof(float) * (size_t)T_local * o->d);                              \
            st = moe_layer_backward(L, b.dx, &b.g, b.dy, b.x, &b.p, lb_scale, z_scale);           \
        }                                                                                         \
    } while (0)

    /* Each timed iteration starts together on every rank; the figure is the
     * median iteration (robust to a noisy neighbour on a shared machine). */
    double *iter_s = moe_calloc((size_t)(o->iters > 0 ? o->iters : 1), sizeof(double));
    st = moe_comm_agree(comm, iter_s ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "bench layer: timing buffer"));
    for (int it = 0; it < o->warmup + o->iters && !st; it++) {
        if (it == o->warmup) {
            moe_layer_reset_timing(L);
            moe_a2a_reset_bytes(moe_layer_exchange(L));
        }
        double t_it = 0;
        if (it >= o->warmup) {
            st = moe_comm_barrier(comm);
            t_it = moe_now();
        }
        if (!st) STEP();
        if (it >= o->warmup) iter_s[it - o->warmup] = moe_now() - t_it;
        /* The layer agrees on errors within its ep group; with replicas the
         * other groups must hear of it before the next world barrier. */
        st = moe_comm_agree(comm, st);
    }
    double elapsed = o->iters > 0 && iter_s ? moe_cli_median(iter_s, o->iters) : 0;
    moe_free(iter_s);
    if (st) {
        moe_layer_destroy(L);
        moe_free(b.block);
        return fail(rank, "bench layer", st);
    }
    const moe_layer_timing tm = *moe_layer_get_timing(L);
    double flops = moe_layer_expert_flops(L);
    double gemm_s = bare_gemm_seconds(o, moe_layer_expert_rows(L), El, o->iters > 0 ? 5 : 0);
    /* Aggregates: slowest rank's time, summed drops and flops, exchange
     * bytes sent per rank (the exchange's counter: mean and largest rank). */
    const moe_a2a_traffic tr = moe_a2a_bytes(moe_layer_exchange(L));
    double agg_max[3] = {elapsed, 0, (double)tr.sent}, agg_sum[6] = {flops, 0, 0, 0, (double)tr.sent, (double)tr.sent_remote};
    const moe_route *r = moe_layer_route(L);
    for (int i = 0; i < G_local * o->E; i++) {
        agg_sum[1] += r->n_dropped[i];
        agg_sum[2] += r->n_selected[i];
        agg_sum[3] += r->n_kept[i];
    }
    st = moe_comm_allmax_f64(comm, MOE_SCOPE_WORLD, agg_max, 3);
    if (!st) st = moe_comm_allreduce_f64(comm, MOE_SCOPE_WORLD, agg_sum, 6);
    if (st) {
        moe_layer_destroy(L);
        moe_free(b.block);
        return fail(rank, "bench layer", st);
    }
    int iters = o->iters > 0 ? o->iters : 1;
    double per_iter = agg_max[0]; /* median iteration of the slowest rank */
    double tokens_s = o->iters > 0 ? o->T / per_iter : 0;
    double expert_s = (tm.expert_fwd + tm.expert_bwd) / iters;
    double comm_s = (tm.dispatch + tm.ret + tm.bwd_dispatch + tm.bwd_return) / iters;
    /* exchange bytes per rank and iteration (forward and backward trips) */
    const double sent_mean = agg_sum[4] / W / iters, remote_mean = agg_sum[5] / W / iters,
                 sent_max = agg_max[2] / iters;

    if (rank == 0 && o->iters > 0) {
        if (o->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON_AddNumberToObject(j, "ranks", W);
            cJSON_AddNumberToObject(j, "ep_size", P);
            cJSON_AddNumberToObject(j, "tokens", o->T);
            cJSON_AddNumberToObject(j, "d_model", o->d);
            cJSON_AddNumberToObject(j, "d_ff", o->F);
            cJSON_AddNumberToObject(j, "experts", o->E);
            cJSON_AddNumberToObject(j, "top_k", o->k);
            cJSON_AddNumberToObject(j, "capacity_factor", o->cf);
            cJSON_AddStringToObject(j, "router", moe_router_kind_str(o->router));
            cJSON_AddStringToObject(j, "activation", moe_activation_str(o->act));
            cJSON_AddNumberToObject(j, "groups", G);
            cJSON_AddStringToObject(j, "score", key_text(&o->rk, "score"));
            cJSON_AddNumberToObject(j, "n_groups", o->rk.n_groups);
            cJSON_AddNumberToObject(j, "topk_groups", moe_cfg_topk_groups(&o->rk));
            cJSON_AddNumberToObject(j, "iters", o->iters);
            cJSON_AddNumberToObject(j, "tokens_per_s", tokens_s);
            cJSON_AddNumberToObject(j, "ms_per_iter", 1e3 * per_iter);
            cJSON_AddNumberToObject(j, "expert_gemm_gflops", flops / expert_s / 1e9);
            cJSON_AddNumberToObject(j, "bare_gemm_ms", 1e3 * gemm_s);
            cJSON_AddNumberToObject(j, "gemm_efficiency", gemm_s / per_iter);
            cJSON_AddNumberToObject(j, "exchange_ms", 1e3 * comm_s);
            cJSON_AddNumberToObject(j, "nodes", moe_comm_n_nodes(comm));
            cJSON_AddStringToObject(j, "a2a", moe_a2a_kind_names[moe_a2a_kind_of(moe_layer_exchange(L))]); /* the kind that ran (auto resolved) */
            cJSON_AddNumberToObject(j, "bytes_sent_per_rank", sent_mean);
            cJSON_AddNumberToObject(j, "bytes_sent_max_rank", sent_max);
            cJSON_AddNumberToObject(j, "bytes_cross_node_per_rank", remote_mean);
            cJSON_AddNumberToObject(j, "dropped_frac", agg_sum[2] > 0 ? agg_sum[1] / agg_sum[2] : 0);
            cJSON *split = cJSON_AddObjectToObject(j, "split_ms");
            for (int i = 0; i < MOE_LAYER_TIMING_N; i++)
                cJSON_AddNumberToObject(split, moe_layer_timing_fields[i].name, 1e3 * moe_layer_timing_get(&tm, i) / iters);
            char *s = cJSON_PrintUnformatted(j);
            printf("%s\n", s);
            free(s);
            cJSON_Delete(j);
        } else {
            printf("moe bench layer: T=%d d=%d F=%d E=%d k=%d cf=%g %s %s groups=%d ranks=%d ep=%d "
                   "BLAS threads/rank=%d\n",
                   o->T, o->d, o->F, o->E, o->k, o->cf, moe_router_kind_str(o->router),
                   moe_activation_str(o->act), G, W, P, openblas_get_num_threads());
            printf("  router: score=%s n_groups=%d topk_groups=%d\n", key_text(&o->rk, "score"), o->rk.n_groups,
                   moe_cfg_topk_groups(&o->rk));
            printf("  forward+backward: %.3f ms/iter (median of %d), %.0f tokens/s\n", 1e3 * per_iter, o->iters, tokens_s);
            printf("  dropped assignments: %.2f%% of %.0f selected; kept %.0f\n",
                   agg_sum[2] > 0 ? 100 * agg_sum[1] / agg_sum[2] : 0, agg_sum[2], agg_sum[3]);
            printf("  expert GEMMs (rank 0): %.3f ms/iter, %.1f GFLOP/s\n", 1e3 * expert_s,
                   flops / expert_s / 1e9);
            printf("  same GEMMs alone:      %.3f ms/iter -> layer runs at %.1f%% of bare GEMM speed\n",
                   1e3 * gemm_s, 100 * gemm_s / per_iter);
            if (W > 1) {
                printf("  exchange (rank 0):     %.3f ms/iter\n", 1e3 * comm_s);
                printf("  exchange bytes sent to other ranks: %.3f MB/iter per rank (largest rank %.3f); "
                       "across nodes %.3f MB/iter per rank (%d node%s)\n", sent_mean / 1e6, sent_max / 1e6,
                       remote_mean / 1e6, moe_comm_n_nodes(comm), moe_comm_n_nodes(comm) == 1 ? "" : "s");
            }
            printf("  time split (rank 0, ms/iter):\n");
            for (int i = 0; i < MOE_LAYER_TIMING_N; i++)
                printf("    %-18s %8.3f\n", moe_layer_timing_fields[i].name, 1e3 * moe_layer_timing_get(&tm, i) / iters);
        }
        fflush(stdout);
    }

    if (o->save) {
        zero_grads(&b, n_params);
        STEP();
        st = moe_comm_agree(comm, st);
        if (!st) st = moe_layer_reduce_grads(L, &b.g);
        double aux[2] = {0, 0};
        for (int g = 0; g < G_local; g++) {
            aux[0] += r->load_balance[g];
            aux[1] += r->z_loss[g];
        }
        if (!st) st = moe_comm_allreduce_f64(comm, MOE_SCOPE_WORLD, aux, 2);
        if (!st) {
            moe_dump_view v = {
                .tokens = o->T, .groups = G, .d_model = o->d, .d_ff = o->F, .n_experts = o->E,
                .top_k = o->k, .capacity_factor = o->cf, .router = o->router,
                .normalize_topk = lc.router.normalize_topk && o->k > 1, .activation = o->act,
                .aux_loss_coef = o->aux, .z_loss_coef = o->z, .seed = o->seed,
                .t0 = t0, .T_local = T_local, .x = b.x, .y = b.y, .dy = b.dy, .dx = b.dx,
                .probs = r->probs, .weight = r->weight, .selected = r->selected, .kept = r->kept,
                .e0 = e0, .E_local = El, .write_experts = moe_comm_replica(comm) == 0,
                .w1 = b.p.experts.w1, .b1 = b.p.experts.b1, .w2 = b.p.experts.w2, .b2 = b.p.experts.b2,
                .gw1 = b.g.experts.w1, .gb1 = b.g.experts.b1, .gw2 = b.g.experts.w2, .gb2 = b.g.experts.b2,
                .router_w = b.p.router_w, .grad_router_w = b.g.router_w,
                .load_balance = aux[0] / G, .z_loss = aux[1] / G};
            st = moe_dump_write(o->save, comm, &v);
        }
        if (!st && rank == 0 && !o->json) printf("  wrote %s\n", o->save);
    }
#undef STEP
    moe_layer_destroy(L);
    moe_free(b.block);
    if (st) return fail(rank, "bench layer", st);
    return 0;
}

int moe_cmd_bench_layer(int argc, char **argv)
{
    const int help = moe_cli_wants_help(argc, argv);
    if (help) {
        if (help > 0) usage(stdout);
        return 0;
    }
    moe_status st = moe_comm_init(&argc, &argv);
    if (st) {
        moe_cli_error(-1, "bench layer: MPI initialisation", st);
        return 1;
    }
    bench_opts o;
    moe_comm *comm = NULL;
    int rc = 0;
    /* Options are parsed before the communicator exists so --help works alone;
     * ep size comes from them. */
    int prc = parse_opts(&o, argc, argv, 0);
    if (prc) {
        moe_comm_finalize();
        return prc == 1 ? 0 : 2;
    }
    if (o.threads > 0) openblas_set_num_threads(o.threads);
    st = moe_comm_create_world(&comm, o.ep_size);
    if (st) {
        moe_cli_error(-1, "bench layer", st);
        moe_comm_finalize();
        return 1;
    }
    if (o.G == 0) o.G = moe_comm_size(comm);
    st = moe_cli_check_platform(comm, "bench layer");
    if (st) moe_cli_error(moe_comm_rank(comm), "bench layer", st);
    rc = st ? 2 : run(comm, &o);
    moe_comm_destroy(comm);
    moe_comm_finalize();
    return rc;
}
