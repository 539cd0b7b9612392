/* Test fixture shared by the single-process and MPI dump tests: a global
 * synthetic layer (every tensor filled by a distinct formula) and views of
 * any rank's share of it, plus a check that a written file holds exactly
 * the global tensors. */
#ifndef MOE_TEST_DUMP_FIXTURE_H
#define MOE_TEST_DUMP_FIXTURE_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/dump.h"

enum { FX_NF = 16 };

typedef struct {
    moe_dump_view g;  /* global sizes, attributes */
    float *f[FX_NF];  /* global float tensors, in the order of fx_names */
    uint8_t *sel, *kept;
} dump_fixture;

/* Float datasets and the tensor each holds: token (T, .), expert (E, .), router (E, d). */
static const char *const fx_names[FX_NF] = {
    "/x", "/y", "/dy", "/grad/x", "/routing/probs", "/routing/weight",
    "/experts/w1", "/experts/b1", "/experts/w2", "/experts/b2",
    "/grad/experts/w1", "/grad/experts/b1", "/grad/experts/w2", "/grad/experts/b2",
    "/router/weight", "/grad/router/weight"};

/* Elements per row of dim 0 of float tensor i. */
static inline size_t fx_row(const moe_dump_view *v, int i)
{
    size_t d = (size_t)v->d_model, F = (size_t)v->d_ff, E = (size_t)v->n_experts;
    size_t F1 = (size_t)moe_f1(v->d_ff, v->activation);
    static const int kind[FX_NF] = {0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 2, 3, 4, 5, 0, 0};
    size_t rows[6] = {d, E, F1 * d, F1, d * F, d};
    return rows[kind[i]];
}

static inline size_t fx_rows(const moe_dump_view *v, int i)
{
    return (size_t)(i < 6 ? v->tokens : v->n_experts);
}

static inline void fx_init(dump_fixture *fx, int64_t T, int64_t G, int d, int F, int E, int k,
                           moe_activation act, moe_router_kind router)
{
    memset(fx, 0, sizeof *fx);
    moe_dump_view *v = &fx->g;
    v->tokens = T;
    v->groups = G;
    v->d_model = d;
    v->d_ff = F;
    v->n_experts = E;
    v->top_k = k;
    v->capacity_factor = 1.25;
    v->router = router;
    v->normalize_topk = k > 1;
    v->activation = act;
    v->aux_loss_coef = 0.01;
    v->z_loss_coef = 0.001;
    v->seed = 0xfedcba9876543210ull; /* above INT64_MAX: must survive unchanged */
    v->load_balance = 1.0625;
    v->z_loss = 2.5;
    for (int i = 0; i < FX_NF; i++) {
        size_t n = fx_rows(v, i) * fx_row(v, i);
        fx->f[i] = malloc(n * sizeof(float));
        for (size_t j = 0; j < n; j++) fx->f[i][j] = (float)sin(0.37 * (double)j + 1.7 * i) * (float)(i + 1);
    }
    fx->sel = malloc((size_t)(T * E));
    fx->kept = malloc((size_t)(T * E));
    for (int64_t j = 0; j < T * E; j++) {
        fx->sel[j] = (uint8_t)(j % 3 == 0);
        fx->kept[j] = (uint8_t)(j % 6 == 0);
    }
}

static inline void fx_free(dump_fixture *fx)
{
    for (int i = 0; i < FX_NF; i++) free(fx->f[i]);
    free(fx->sel);
    free(fx->kept);
}

/* The view of token rows [t0, t0+nt) and expert rows [e0, e0+ne). */
static inline moe_dump_view fx_view(const dump_fixture *fx, int64_t t0, int64_t nt, int64_t e0, int64_t ne,
                                    int write_experts)
{
    moe_dump_view v = fx->g;
    const float *p[FX_NF];
    for (int i = 0; i < FX_NF; i++) p[i] = fx->f[i] + (size_t)(i < 6 ? t0 : e0) * fx_row(&v, i);
    v.t0 = t0;
    v.T_local = nt;
    v.x = p[0], v.y = p[1], v.dy = p[2], v.dx = p[3], v.probs = p[4], v.weight = p[5];
    v.selected = fx->sel + t0 * v.n_experts;
    v.kept = fx->kept + t0 * v.n_experts;
    v.e0 = e0;
    v.E_local = ne;
    v.write_experts = write_experts;
    v.w1 = p[6], v.b1 = p[7], v.w2 = p[8], v.b2 = p[9];
    v.gw1 = p[10], v.gb1 = p[11], v.gw2 = p[12], v.gb2 = p[13];
    v.router_w = p[14];
    v.grad_router_w = p[15];
    return v;
}

/* Number of datasets of the file that differ from the fixture (0: exact),
 * reporting each on stderr. */
static inline int fx_check_file(const dump_fixture *fx, const char *path)
{
    int bad = 0;
    const moe_dump_view *v = &fx->g;
    for (int i = 0; i < FX_NF; i++) {
        size_t n = fx_rows(v, i) * fx_row(v, i);
        float *got = malloc(n * sizeof(float));
        moe_status st = moe_dump_read_f32(path, fx_names[i], got, n);
        if (st != MOE_OK || memcmp(got, fx->f[i], n * sizeof(float)) != 0) {
            fprintf(stderr, "dataset %s differs (%s%s%s)\n", fx_names[i], moe_status_str(st),
                    st != MOE_OK ? ": " : "", st != MOE_OK ? moe_error_detail() : "");
            bad++;
        }
        free(got);
    }
    size_t ne = (size_t)(v->tokens * v->n_experts);
    uint8_t *u = malloc(ne);
    const char *un[2] = {"/routing/selected", "/routing/kept"};
    const uint8_t *uw[2] = {fx->sel, fx->kept};
    for (int i = 0; i < 2; i++) {
        moe_status st = moe_dump_read_u8(path, un[i], u, ne);
        if (st != MOE_OK || memcmp(u, uw[i], ne) != 0) {
            fprintf(stderr, "dataset %s differs\n", un[i]);
            bad++;
        }
    }
    free(u);
    float s[2];
    if (moe_dump_read_f32(path, "/aux/load_balance", &s[0], 1) != MOE_OK ||
        moe_dump_read_f32(path, "/aux/z_loss", &s[1], 1) != MOE_OK || s[0] != (float)v->load_balance ||
        s[1] != (float)v->z_loss) {
        fprintf(stderr, "aux scalars differ\n");
        bad++;
    }
    return bad;
}

#endif
