/* moe bench a2a: times the token exchange (dispatch + return of one step's
 * plan) against a raw MPI_Alltoallv of exactly the same bytes, measured in
 * the same run and interleaved, for each exchange kind; and the layer's
 * token-level trip (moe_a2a_forward: every token row to its experts, the
 * results back and combined), where the node-aware kind sends a token once
 * per node, with the bytes each rank sent to other ranks and across nodes
 * (the exchange's own counter). Optionally times the chunked pipeline
 * against the unchunked sequence around an emulated expert computation
 * (--compute-us). */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli/cli.h"
#include "comm/comm.h"
#include "core/rng.h"

enum { N_KINDS = 3, N_KINDS_ALL = 7 }; /* p2p, shm, node */

typedef struct {
    int tokens, d, experts, top_k, iters, warmup, chunks, json;
    int kinds;          /* bit k: moe_a2a_kind k (p2p, shm, node) */
    double compute_us;  /* emulated expert time per step, 0: no pipeline timing */
    double skew;        /* expert e drawn with weight (e + 1)^-skew */
    unsigned seed;
} bench_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: moe bench a2a [options]   (run under mpirun; experts are split over all ranks)\n"
            "  --tokens N        tokens per rank (4096)\n"
            "  --d-model N       row width in floats (256)\n"
            "  --experts N       experts, a multiple of the number of ranks (8)\n"
            "  --top-k N         distinct experts per token (2)\n"
            "  --iters N         timed iterations (20)\n"
            "  --warmup N        untimed iterations first (3)\n"
            "  --kind K          p2p, shm, node, both (p2p and shm) or all (all; alltoallv = p2p;\n"
            "                    shm over several nodes runs the node kind)\n"
            "  --chunks N        expert chunks of the pipeline (1)\n"
            "  --compute-us X    emulated expert compute per step: also time the pipeline\n"
            "                    against dispatch + compute + return (0: off)\n"
            "  --skew X          expert popularity (e + 1)^-X (1.0)\n"
            "  --seed N          routing seed (1234)\n"
            "  --json            print one JSON object instead of text\n");
}

/* 0: run; 1: help printed; 2: usage error. */
static int parse(bench_opts *o, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"tokens", required_argument, 0, 't'},  {"d-model", required_argument, 0, 'd'},
        {"experts", required_argument, 0, 'e'}, {"top-k", required_argument, 0, 'k'},
        {"iters", required_argument, 0, 'i'},   {"warmup", required_argument, 0, 'w'},
        {"kind", required_argument, 0, 'K'},    {"chunks", required_argument, 0, 'c'},
        {"compute-us", required_argument, 0, 'u'}, {"skew", required_argument, 0, 's'},
        {"seed", required_argument, 0, 'S'},    {"json", no_argument, 0, 'j'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0},
    };
    *o = (bench_opts){4096, 256, 8, 2, 20, 3, 1, 0, N_KINDS_ALL, 0.0, 1.0, 1234};
    optind = 1;
    int ch, li = -1;
    while ((ch = getopt_long(argc, argv, "h", longopts, &li)) != -1) {
        const char *name = li >= 0 ? longopts[li].name : "?";
        long v = 0;
        double x = 0;
        if (strchr("tdekiwcS", ch) && moe_cli_parse_long(optarg, 0, 1L << 30, &v)) {
            moe_cli_usage_error(-1, "bench a2a", "bad integer '%s' for --%s", optarg, name);
            return 2;
        }
        if ((ch == 'u' || ch == 's') && (moe_cli_parse_double(optarg, &x) || x < 0)) {
            moe_cli_usage_error(-1, "bench a2a", "bad number '%s' for --%s", optarg, name);
            return 2;
        }
        switch (ch) {
        case 't': o->tokens = (int)v; break;
        case 'd': o->d = (int)v; break;
        case 'e': o->experts = (int)v; break;
        case 'k': o->top_k = (int)v; break;
        case 'i': o->iters = (int)v; break;
        case 'w': o->warmup = (int)v; break;
        case 'c': o->chunks = (int)v; break;
        case 'S': o->seed = (unsigned)v; break;
        case 'u': o->compute_us = x; break;
        case 's': o->skew = x; break;
        case 'j': o->json = 1; break;
        case 'K': {
            moe_a2a_kind kind;
            if (!strcmp(optarg, "both")) o->kinds = 1 << MOE_A2A_P2P | 1 << MOE_A2A_SHM;
            else if (!strcmp(optarg, "all")) o->kinds = N_KINDS_ALL;
            else if (moe_a2a_kind_parse(&kind, optarg) == MOE_OK && kind != MOE_A2A_AUTO) o->kinds = 1 << kind;
            else {
                fprintf(stderr, "moe bench a2a: unknown --kind '%s' (p2p, shm, node, both or all)\n", optarg);
                return 2;
            }
            break;
        }
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "moe bench a2a: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    const char *bad = o->tokens < 1 ? "--tokens must be >= 1" : o->d < 1 ? "--d-model must be >= 1"
                    : o->experts < 1 ? "--experts must be >= 1"
                    : o->top_k < 1 || o->top_k > o->experts ? "--top-k must be in [1, experts]"
                    : o->iters < 1 ? "--iters must be >= 1" : o->chunks < 1 ? "--chunks must be >= 1" : NULL;
    if (bad) {
        fprintf(stderr, "moe bench a2a: %s\n", bad);
        return 2;
    }
    return 0;
}

/* The routing of this rank's tokens: each token picks top_k distinct
 * experts, drawn without replacement with weights (e + 1)^-skew, from
 * Philox counters {global token, 0, draw, 0}, kept in ascending order with
 * combine weight 1 / top_k; send_rows counts the rows per (dest rank,
 * local expert) = per global expert (contiguous placement). */
typedef struct {
    int *tok_off;   /* (tokens + 1) */
    int *dest;      /* (tokens * top_k) */
    float *weight;  /* (tokens * top_k) */
} bench_routing;

static void make_plan(int *send_rows /* (P * El) */, bench_routing *r, const bench_opts *o, int rank)
{
    const int E = o->experts;
    double *w = malloc(sizeof(double) * (size_t)E);
    int *taken = malloc(sizeof(int) * (size_t)E);
    for (int e = 0; e < E; e++) w[e] = 1.0 / pow(e + 1.0, o->skew);
    memset(send_rows, 0, sizeof(int) * (size_t)E);
    int n = 0;
    for (int t = 0; t < o->tokens; t++) {
        const uint64_t g = (uint64_t)rank * (uint64_t)o->tokens + (uint64_t)t;
        memset(taken, 0, sizeof(int) * (size_t)E);
        for (int i = 0; i < o->top_k; i++) {
            double total = 0;
            for (int e = 0; e < E; e++) total += taken[e] ? 0 : w[e];
            double u = total * moe_rng_uniform(o->seed, MOE_RNG_BENCH, (uint32_t)g, (uint32_t)(g >> 32), (uint32_t)i, 0);
            int pick = -1;
            for (int e = 0; e < E; e++) {
                if (taken[e]) continue;
                pick = e;
                if ((u -= w[e]) < 0) break;
            }
            taken[pick] = 1;
            send_rows[pick]++; /* global expert e = p * El + j: the plan's index */
        }
        r->tok_off[t] = n;
        for (int e = 0; e < E; e++)
            if (taken[e]) {
                r->dest[n] = e;
                r->weight[n++] = 1.0f / (float)o->top_k;
            }
    }
    r->tok_off[o->tokens] = n;
    free(w);
    free(taken);
}

typedef struct {
    const moe_a2a *a;
    int d;
    double us_per_row; /* emulated compute */
} fake_experts;

/* The "experts": copy their rows, then spin for the emulated compute time. */
static moe_status fake_compute(void *p, int j0, int j1, const float *in, float *out)
{
    fake_experts *f = p;
    const int *off = moe_a2a_recv_expert_offsets(f->a);
    const size_t r0 = (size_t)off[j0] * f->d, n = (size_t)(off[j1] - off[j0]) * f->d;
    if (out != in) memcpy(out + r0, in + r0, n * sizeof(float));
    const double until = moe_now() + 1e-6 * f->us_per_row * (off[j1] - off[j0]);
    while (moe_now() < until) {
    }
    return MOE_OK;
}

/* Per-iteration times -> slowest rank per iteration -> median. */
static moe_status median_of_slowest(moe_comm *c, double *t, int n, double *out)
{
    moe_status st = moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, t, (size_t)n);
    if (st) return st;
    *out = moe_cli_median(t, n);
    return MOE_OK;
}

typedef struct {
    double t, t_raw, t_pipe, t_seq; /* seconds, median of the slowest rank */
    double t_inplace;               /* shm: rows built in the window (moe_a2a_shm_buffer) */
    int verified;                   /* return(dispatch(x)) == x on every rank */
    /* bytes sent to other ranks per dispatch+return (moe_a2a_bytes): mean
     * over ranks, and the part that crossed nodes (mean and largest rank) */
    double sent_mean, remote_mean, remote_max;
} kind_result;

/* Buffers of one run: send / back (S, d), recv / out (R, d). */
typedef struct { float *send, *back, *recv, *out; } bufs;

static moe_status time_kind(kind_result *res, moe_comm *c, const bench_opts *o, moe_a2a_kind kind,
                            const int *send_rows)
{
    const int P = moe_comm_size(c), El = o->experts / P, d = o->d, n = o->warmup + o->iters;
    moe_a2a *a = NULL;
    bufs b = {0};
    double *t = calloc(5 * (size_t)o->iters, sizeof(double));
    moe_status st = moe_comm_agree(c, t ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "timing arrays"));
    if (st == MOE_OK) st = moe_a2a_create(&a, c, El, kind, o->chunks);
    if (st == MOE_OK) st = moe_a2a_set_counts(a, send_rows, MOE_OK, d);
    if (st == MOE_OK) {
        const size_t S = (size_t)moe_a2a_send_total(a), R = (size_t)moe_a2a_recv_total(a);
        b = (bufs){moe_calloc(S * d, 4), moe_calloc(S * d, 4), moe_calloc(R * d, 4), moe_calloc(R * d, 4)};
        st = b.send && b.back && b.recv && b.out ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "exchange buffers");
        for (size_t i = 0; st == MOE_OK && i < S * d; i++) b.send[i] = (float)(i % 8191) - 4095.5f;
        st = moe_comm_agree(c, st);
    }
    double *tk = t, *traw = t + o->iters, *tpipe = t + 2 * o->iters, *tseq = t + 3 * o->iters;
    double *tin = t + 4 * o->iters;
    const size_t S = a ? (size_t)moe_a2a_send_total(a) * d : 0, R = a ? (size_t)moe_a2a_recv_total(a) * d : 0;
    float *stage = a ? moe_a2a_shm_buffer(a) : NULL;
    const int pipe = o->compute_us > 0;
    fake_experts fx = {a, d, 0};
    moe_a2a_buffers trip = {0};
    if (st == MOE_OK && pipe) st = moe_a2a_buffers_get(a, MOE_A2A_FORWARD, &trip);
    if (st == MOE_OK && pipe) fx.us_per_row = o->compute_us / (moe_a2a_recv_total(a) > 0 ? moe_a2a_recv_total(a) : 1);
    for (int it = 0; it < n && st == MOE_OK; it++) {
        const int k = it - o->warmup;
        double t0;
        /* Alternate which one goes first so that neither always runs on a warm cache. */
        for (int turn = 0; turn < 2 && st == MOE_OK; turn++) {
            if ((st = moe_comm_barrier(c))) break;
            t0 = moe_now();
            if ((turn + it) % 2 == 0) {
                st = moe_a2a_dispatch(a, b.recv, b.send, d);
                if (st == MOE_OK) st = moe_a2a_return(a, b.back, b.recv, d);
                if (k >= 0) tk[k] = moe_now() - t0;
            } else {
                st = moe_a2a_bench_raw_alltoallv(a, b.out, b.send, b.back, d);
                if (k >= 0) traw[k] = moe_now() - t0;
            }
        }
        if (stage && st == MOE_OK) {
            /* Rows packed (and expert outputs written) straight into the
             * window, as a caller using moe_a2a_shm_buffer would: those
             * copies are the caller's own work, so they stay untimed. */
            memcpy(stage, b.send, S * sizeof(float));
            if ((st = moe_comm_barrier(c))) break;
            t0 = moe_now();
            st = moe_a2a_dispatch(a, b.recv, stage, d);
            double t1 = moe_now() - t0;
            memcpy(stage, b.recv, R * sizeof(float));
            if (st == MOE_OK) st = moe_comm_barrier(c);
            t0 = moe_now();
            if (st == MOE_OK) st = moe_a2a_return(a, b.back, stage, d);
            if (k >= 0) tin[k] = t1 + moe_now() - t0;
        }
        if (!pipe || st) continue;
        /* The layer's round trip (chunked when --chunks > 1) on the
         * exchange's own buffers; packing them is the caller's work, untimed. */
        memcpy(trip.send, b.send, S * sizeof(float));
        if ((st = moe_comm_barrier(c))) break;
        t0 = moe_now();
        st = moe_a2a_exchange(a, MOE_A2A_FORWARD, d, d, fake_compute, &fx, MOE_OK);
        if (k >= 0) tpipe[k] = moe_now() - t0;
        /* The same round trip unchunked, on the same buffers. */
        memcpy(trip.send, b.send, S * sizeof(float));
        if (st == MOE_OK) st = moe_comm_barrier(c);
        t0 = moe_now();
        if (st == MOE_OK) st = moe_a2a_dispatch(a, (float *)trip.recv, trip.send, d);
        if (st == MOE_OK) st = fake_compute(&fx, 0, El, trip.recv, trip.out);
        if (st == MOE_OK) st = moe_a2a_return(a, (float *)trip.back, trip.out, d);
        if (k >= 0) tseq[k] = moe_now() - t0;
    }
    if (st == MOE_OK) {
        /* What was timed must also be right: return(dispatch(x)) == x; and
         * its traffic is the exchange's own count of one dispatch+return. */
        moe_a2a_reset_bytes(a);
        st = moe_a2a_dispatch(a, b.recv, b.send, d);
        if (st == MOE_OK) st = moe_a2a_return(a, b.back, b.recv, d);
        const moe_a2a_traffic tr = moe_a2a_bytes(a);
        int64_t bad = st == MOE_OK && memcmp(b.back, b.send, S * sizeof(float)) != 0;
        if (st == MOE_OK) st = moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, &bad, 1);
        res->verified = bad == 0;
        double sum[2] = {(double)tr.sent, (double)tr.sent_remote}, mx = (double)tr.sent_remote;
        if (st == MOE_OK) st = moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, sum, 2);
        if (st == MOE_OK) st = moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, &mx, 1);
        res->sent_mean = sum[0] / P;
        res->remote_mean = sum[1] / P;
        res->remote_max = mx;
    }
    if (st == MOE_OK) st = median_of_slowest(c, tk, o->iters, &res->t);
    if (st == MOE_OK) st = median_of_slowest(c, traw, o->iters, &res->t_raw);
    if (st == MOE_OK && stage) st = median_of_slowest(c, tin, o->iters, &res->t_inplace);
    if (st == MOE_OK && pipe) st = median_of_slowest(c, tpipe, o->iters, &res->t_pipe);
    if (st == MOE_OK && pipe) st = median_of_slowest(c, tseq, o->iters, &res->t_seq);
    moe_free(b.send);
    moe_free(b.back);
    moe_free(b.recv);
    moe_free(b.out);
    moe_a2a_destroy(a);
    free(t);
    return st;
}

static const char *kind_name(int k) { return moe_a2a_kind_names[k]; }

typedef struct {
    double t;                        /* median token trip of the slowest rank */
    double sent_mean, remote_mean, remote_max;
    int equal;                       /* y bitwise that of the first kind, on every rank */
    moe_a2a_kind used;               /* the kind the exchange chose (shm over nodes: node) */
} trip_result;

/* The layer's forward trip per kind, interleaved: tokens (d wide) to their
 * experts, the emulated experts, the results back and combined. */
static moe_status time_token_trips(trip_result *res, moe_comm *c, const bench_opts *o, const bench_routing *br)
{
    const int P = moe_comm_size(c), El = o->experts / P, d = o->d, T = o->tokens, n = o->warmup + o->iters;
    moe_a2a *a[N_KINDS] = {NULL};
    float *x = moe_calloc((size_t)T * d, sizeof(float)), *y[N_KINDS] = {NULL};
    double *t = calloc((size_t)N_KINDS * (o->iters > 0 ? o->iters : 1), sizeof(double));
    fake_experts fx[N_KINDS];
    moe_status st = moe_comm_agree(c, x && t ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "token trip buffers"));
    for (int i = 0; st == MOE_OK && i < T * d; i++) x[i] = (float)((i * 37) % 8191) / 4096.0f - 1.0f;
    const moe_a2a_routing r = {T, br->tok_off, br->dest, br->weight};
    for (int k = 0; k < N_KINDS && st == MOE_OK; k++) {
        if (!(o->kinds & 1 << k)) continue;
        y[k] = moe_calloc((size_t)T * d, sizeof(float));
        st = moe_comm_agree(c, y[k] ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "token trip output"));
        if (st == MOE_OK) st = moe_a2a_create(&a[k], c, El, (moe_a2a_kind)k, o->chunks);
        if (st == MOE_OK) st = moe_a2a_plan(a[k], &r, MOE_OK, d);
        if (st == MOE_OK) {
            const int R = moe_a2a_recv_total(a[k]);
            fx[k] = (fake_experts){a[k], d, o->compute_us > 0 ? o->compute_us / (R > 0 ? R : 1) : 0};
            res[k].used = moe_a2a_kind_of(a[k]);
        }
    }
    for (int it = 0; it < n && st == MOE_OK; it++)
        for (int kk = 0; kk < N_KINDS && st == MOE_OK; kk++) {
            const int k = (kk + it) % N_KINDS; /* rotate who goes first */
            if (!a[k]) continue;
            if ((st = moe_comm_barrier(c))) break;
            const double t0 = moe_now();
            st = moe_a2a_forward(a[k], y[k], x, d, fake_compute, &fx[k], MOE_OK);
            if (it >= o->warmup) t[(size_t)k * o->iters + (it - o->warmup)] = moe_now() - t0;
        }
    int first = -1;
    for (int k = 0; k < N_KINDS && st == MOE_OK; k++) {
        if (!a[k]) continue;
        /* One more trip, counted: the bytes of one forward. */
        moe_a2a_reset_bytes(a[k]);
        st = moe_a2a_forward(a[k], y[k], x, d, fake_compute, &fx[k], MOE_OK);
        const moe_a2a_traffic tr = moe_a2a_bytes(a[k]);
        if (first < 0) first = k;
        int64_t diff = st == MOE_OK && memcmp(y[k], y[first], sizeof(float) * (size_t)T * d) != 0;
        double sum[2] = {(double)tr.sent, (double)tr.sent_remote}, mx = (double)tr.sent_remote;
        if (st == MOE_OK) st = moe_comm_allreduce_i64(c, MOE_SCOPE_WORLD, &diff, 1);
        if (st == MOE_OK) st = moe_comm_allreduce_f64(c, MOE_SCOPE_WORLD, sum, 2);
        if (st == MOE_OK) st = moe_comm_allmax_f64(c, MOE_SCOPE_WORLD, &mx, 1);
        if (st == MOE_OK && o->iters > 0) st = median_of_slowest(c, t + (size_t)k * o->iters, o->iters, &res[k].t);
        res[k].equal = diff == 0;
        res[k].sent_mean = sum[0] / P;
        res[k].remote_mean = sum[1] / P;
        res[k].remote_max = mx;
    }
    for (int k = 0; k < N_KINDS; k++) {
        moe_a2a_destroy(a[k]);
        moe_free(y[k]);
    }
    moe_free(x);
    free(t);
    return st;
}

/* " (ran as node)" when the exchange chose another kind (shm over nodes), else "". */
static const char *ran_as(const trip_result *tr, int k)
{
    static char buf[32];
    if ((int)tr[k].used == k) return "";
    snprintf(buf, sizeof buf, " (ran as %s)", moe_a2a_kind_names[tr[k].used]);
    return buf;
}

static void report_text(const bench_opts *o, int W, int nodes, double bytes, const kind_result *res,
                        const trip_result *tr)
{
    printf("moe bench a2a: %d ranks, %d node%s, %d tokens/rank, d=%d, E=%d, top-k=%d, skew %.2f; median of %d "
           "iters (slowest rank)\n", W, nodes, nodes == 1 ? "" : "s", o->tokens, o->d, o->experts, o->top_k,
           o->skew, o->iters);
    printf("row round trip (dispatch + return of one row per assignment) against a raw MPI_Alltoallv of the same "
           "bytes:\n");
    printf("bytes moved per rank per dispatch+return (mean over ranks, rows kept on the rank included): %.2f MB\n",
           bytes / 1e6);
    printf("%-10s %10s %8s %14s %10s %16s %s\n", "kind", "time ms", "GB/s", "raw a2av ms", "raw GB/s",
           "raw/kind ratio", "roundtrip");
    for (int k = 0; k < N_KINDS; k++) {
        if (!(o->kinds & 1 << k)) continue;
        const kind_result *r = &res[k];
        printf("%-10s %10.3f %8.2f %14.3f %10.2f %16.3f %s%s\n", kind_name(k), 1e3 * r->t, bytes / r->t / 1e9,
               1e3 * r->t_raw, bytes / r->t_raw / 1e9, r->t_raw / r->t, r->verified ? "ok" : "WRONG", ran_as(tr, k));
        printf("%-10s bytes sent to other ranks per dispatch+return: %.3f MB/rank; across nodes %.3f MB/rank "
               "(largest rank %.3f MB)\n", "", r->sent_mean / 1e6, r->remote_mean / 1e6, r->remote_max / 1e6);
        if (k == MOE_A2A_SHM && r->t_inplace > 0)
            printf("%-10s %10.3f %8.2f %14s %10s %16.3f (rows built in the window)\n", "shm-inplace",
                   1e3 * r->t_inplace, bytes / r->t_inplace / 1e9, "", "", r->t_raw / r->t_inplace);
        if (o->compute_us > 0)
            printf("%-10s round trip (chunks=%d%s, compute %.0f us): %.3f ms; unchunked dispatch+compute+return: "
                   "%.3f ms; speed-up %.3fx\n", "", o->chunks, k != MOE_A2A_P2P ? ", runs unchunked" : "",
                   o->compute_us, 1e3 * r->t_pipe, 1e3 * r->t_seq, r->t_seq / r->t_pipe);
    }
    printf("token trip (the layer's forward: each token to its experts, results back, combined per token), "
           "kinds interleaved:\n");
    printf("%-10s %10s %18s %20s %18s %s\n", "kind", "time ms", "sent MB/rank", "cross-node MB/rank",
           "largest rank MB", "y vs first kind");
    for (int k = 0; k < N_KINDS; k++) {
        if (!(o->kinds & 1 << k)) continue;
        const trip_result *t = &tr[k];
        printf("%-10s %10.3f %18.3f %20.3f %18.3f %s%s\n", kind_name(k), 1e3 * t->t, t->sent_mean / 1e6,
               t->remote_mean / 1e6, t->remote_max / 1e6, t->equal ? "bitwise equal" : "DIFFERS", ran_as(tr, k));
    }
}

static int report_json(const bench_opts *o, int W, int nodes, double bytes, const kind_result *res,
                       const trip_result *tr)
{
    cJSON *root = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddNumberToObject(root, "ranks", W);
    cJSON_AddNumberToObject(root, "nodes", nodes);
    cJSON_AddNumberToObject(root, "tokens", o->tokens);
    cJSON_AddNumberToObject(root, "d_model", o->d);
    cJSON_AddNumberToObject(root, "experts", o->experts);
    cJSON_AddNumberToObject(root, "top_k", o->top_k);
    cJSON_AddNumberToObject(root, "skew", o->skew);
    cJSON_AddNumberToObject(root, "iters", o->iters);
    cJSON_AddNumberToObject(root, "chunks", o->chunks);
    cJSON_AddNumberToObject(root, "compute_us", o->compute_us);
    cJSON_AddNumberToObject(root, "bytes_per_rank", bytes);
    for (int k = 0; k < N_KINDS; k++) {
        if (!(o->kinds & 1 << k)) continue;
        const kind_result *r = &res[k];
        const trip_result *t = &tr[k];
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "kind", kind_name(k));
        cJSON_AddStringToObject(j, "ran_as", moe_a2a_kind_names[t->used]);
        cJSON_AddNumberToObject(j, "seconds", r->t);
        cJSON_AddNumberToObject(j, "gbps", bytes / r->t / 1e9);
        cJSON_AddNumberToObject(j, "raw_alltoallv_seconds", r->t_raw);
        cJSON_AddNumberToObject(j, "raw_alltoallv_gbps", bytes / r->t_raw / 1e9);
        cJSON_AddNumberToObject(j, "ratio_raw_over_kind", r->t_raw / r->t);
        cJSON_AddBoolToObject(j, "roundtrip_ok", r->verified);
        cJSON_AddNumberToObject(j, "bytes_sent_per_rank", r->sent_mean);
        cJSON_AddNumberToObject(j, "bytes_cross_node_per_rank", r->remote_mean);
        cJSON_AddNumberToObject(j, "bytes_cross_node_max_rank", r->remote_max);
        if (k == MOE_A2A_SHM && r->t_inplace > 0) cJSON_AddNumberToObject(j, "inplace_seconds", r->t_inplace);
        if (o->compute_us > 0) {
            cJSON_AddNumberToObject(j, "pipeline_seconds", r->t_pipe);
            cJSON_AddNumberToObject(j, "unchunked_seconds", r->t_seq);
        }
        cJSON_AddNumberToObject(j, "token_trip_seconds", t->t);
        cJSON_AddNumberToObject(j, "token_bytes_sent_per_rank", t->sent_mean);
        cJSON_AddNumberToObject(j, "token_bytes_cross_node_per_rank", t->remote_mean);
        cJSON_AddNumberToObject(j, "token_bytes_cross_node_max_rank", t->remote_max);
        cJSON_AddBoolToObject(j, "token_y_equal", t->equal);
        cJSON_AddItemToArray(arr, j);
    }
    cJSON_AddItemToObject(root, "results", arr);
    return moe_cli_print_json(root);
}

int moe_cmd_bench_a2a(int argc, char **argv)
{
    bench_opts o;
    int rc = parse(&o, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    moe_comm *c = NULL;
    int rank = -1, W = 1;
    moe_status st = moe_comm_init(&argc, &argv);
    if (st == MOE_OK) st = moe_comm_create_world(&c, 0);
    if (st == MOE_OK) {
        W = moe_comm_size(c);
        if (W > 1) rank = moe_comm_rank(c);
        st = moe_cli_check_platform(c, "bench a2a");
        if (st == MOE_OK && o.experts % W)
            st = moe_errorf(MOE_ERR_ARG, "--experts %d is not a multiple of the %d ranks", o.experts, W);
    }
    int *send_rows = st ? NULL : calloc((size_t)o.experts, sizeof(int));
    bench_routing br = {NULL, NULL, NULL};
    if (st == MOE_OK) {
        br.tok_off = calloc((size_t)o.tokens + 1, sizeof(int));
        br.dest = calloc((size_t)o.tokens * o.top_k + 1, sizeof(int));
        br.weight = calloc((size_t)o.tokens * o.top_k + 1, sizeof(float));
    }
    if (st == MOE_OK)
        st = moe_comm_agree(c, send_rows && br.tok_off && br.dest && br.weight ? MOE_OK : moe_errorf(MOE_ERR_NOMEM, "plan"));
    double bytes = 0;
    if (st == MOE_OK) {
        make_plan(send_rows, &br, &o, moe_comm_rank(c));
        /* Each rank sends its S rows in dispatch and its R received rows back in return; sum(S) = sum(R). */
        bytes = 2.0 * o.tokens * o.top_k * o.d * sizeof(float);
    }
    kind_result res[N_KINDS] = {{0}};
    trip_result tr[N_KINDS] = {{0}};
    for (int k = 0; k < N_KINDS && st == MOE_OK; k++)
        if (o.kinds & 1 << k) st = time_kind(&res[k], c, &o, (moe_a2a_kind)k, send_rows);
    if (st == MOE_OK) st = time_token_trips(tr, c, &o, &br);
    if (st == MOE_OK && moe_comm_rank(c) == 0) {
        if (o.json) rc = report_json(&o, W, moe_comm_n_nodes(c), bytes, res, tr);
        else report_text(&o, W, moe_comm_n_nodes(c), bytes, res, tr);
    }
    if (st != MOE_OK) {
        moe_cli_error(rank, "bench a2a", st);
        rc = 1;
    }
    for (int k = 0; k < N_KINDS && st == MOE_OK; k++)
        if (o.kinds & 1 << k && (!res[k].verified || !tr[k].equal)) rc = 1;
    free(send_rows);
    free(br.tok_off);
    free(br.dest);
    free(br.weight);
    moe_comm_destroy(c);
    moe_comm_finalize();
    return rc;
}
