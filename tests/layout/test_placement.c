/* layout/placement: the expert placement descriptor, its file and the
 * load-based planner. Rules (every expert held, same slots per rank, copies
 * on distinct ranks) refused by name; a file for another model or ep size
 * refused naming both values; the file round trip; the planner against a
 * brute-force search of the best max load on small cases, its replica
 * rule, determinism, and its bad inputs; the table under a placement keys
 * rows by global expert. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "layout/layout.h"
#include "layout/placement.h"

static void expect_error(moe_status got, moe_status want, const char *needle)
{
    assert_int_equal(got, want);
    if (!strstr(moe_error_detail(), needle)) fail_msg("detail '%s' lacks '%s'", moe_error_detail(), needle);
}

static void test_contiguous(void **state)
{
    (void)state;
    moe_placement *p = NULL;
    assert_int_equal(moe_placement_create_contiguous(&p, 2, 8, 4), MOE_OK);
    assert_true(moe_placement_is_contiguous(p));
    assert_int_equal(moe_placement_slots_per_rank(p), 2);
    assert_int_equal(moe_placement_replicas(p), 0);
    assert_int_equal(moe_placement_slots(p, 1, 3)[0], 6);
    assert_int_equal(moe_placement_slots(p, 1, 3)[1], 7);
    moe_placement_destroy(p);
    expect_error(moe_placement_create_contiguous(&p, 2, 6, 4), MOE_ERR_ARG, "must divide n_experts = 6");
}

static void test_rules(void **state)
{
    (void)state;
    moe_placement *p = NULL;
    /* one layer, 6 experts over 4 ranks x 2 slots: 0 and 1 twice; slots sorted */
    const int ok[8] = {1, 0, 3, 2, 4, 0, 5, 1};
    assert_int_equal(moe_placement_create(&p, 1, 6, 4, 2, ok, "t"), MOE_OK);
    assert_false(moe_placement_is_contiguous(p));
    assert_int_equal(moe_placement_replicas(p), 2);
    assert_int_equal(moe_placement_slots(p, 0, 0)[0], 0);
    assert_int_equal(moe_placement_slots(p, 0, 2)[0], 0);
    assert_int_equal(moe_placement_copies(p, 0, 0), 2);
    assert_int_equal(moe_placement_copies(p, 0, 4), 1);
    /* the copy on the lowest rank is primary */
    assert_true(moe_placement_primary(p, 0, 0, 0));
    assert_false(moe_placement_primary(p, 0, 2, 0));
    assert_false(moe_placement_primary(p, 0, 3, 0));
    assert_true(moe_placement_primary(p, 0, 3, 1));
    /* rank loads: a replicated expert's tokens split over its copies */
    const int64_t loads[6] = {100, 60, 10, 10, 20, 30};
    double rl[4];
    moe_placement_rank_loads(p, 0, loads, rl);
    assert_true(rl[0] == 80.0 && rl[1] == 20.0 && rl[2] == 70.0 && rl[3] == 60.0);
    moe_placement_destroy(p);

    const int twice[8] = {0, 0, 1, 2, 3, 4, 5, 1};
    expect_error(moe_placement_create(&p, 1, 6, 4, 2, twice, "t"), MOE_ERR_ARG, "rank 0 holds expert 0 twice");
    const int missing[8] = {0, 1, 2, 3, 4, 0, 1, 2};
    expect_error(moe_placement_create(&p, 1, 6, 4, 2, missing, "t"), MOE_ERR_ARG, "holds expert 5 nowhere");
    const int outside[8] = {0, 1, 2, 3, 4, 5, 6, 1};
    expect_error(moe_placement_create(&p, 1, 6, 4, 2, outside, "t"), MOE_ERR_ARG, "expert 6, outside [0, 6)");
    expect_error(moe_placement_create(&p, 1, 9, 4, 2, ok, "t"), MOE_ERR_ARG, "fewer than the 9 experts");
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_file(void **state)
{
    (void)state;
    moe_placement *p = NULL, *q = NULL;
    const int slots[16] = {7, 2, 0, 5, 6, 1, 4, 3, 3, 6, 5, 2, 0, 7, 1, 4};
    const int blocks[2] = {0, 2};
    assert_int_equal(moe_placement_create(&p, 2, 8, 4, 2, slots, "t"), MOE_OK);
    assert_int_equal(moe_placement_save(p, blocks, "p.json"), MOE_OK);
    assert_int_equal(moe_placement_load(&q, "p.json", 2, blocks, 8, 4), MOE_OK);
    for (int l = 0; l < 2; l++)
        for (int r = 0; r < 4; r++)
            assert_memory_equal(moe_placement_slots(p, l, r), moe_placement_slots(q, l, r), 2 * sizeof(int));
    moe_placement_destroy(q);
    /* another model, ep size, layer count or blocks: named */
    expect_error(moe_placement_load(&q, "p.json", 2, blocks, 16, 4), MOE_ERR_MISMATCH, "for 8 experts per MoE layer, the model has 16");
    expect_error(moe_placement_load(&q, "p.json", 2, blocks, 8, 2), MOE_ERR_MISMATCH,
                 "for 4 expert-parallel ranks, this run has 2");
    expect_error(moe_placement_load(&q, "p.json", 3, NULL, 8, 4), MOE_ERR_MISMATCH, "has 2 MoE layers, the model has 3");
    const int other[2] = {1, 3};
    expect_error(moe_placement_load(&q, "p.json", 2, other, 8, 4), MOE_ERR_MISMATCH, "blocks");
    moe_placement_destroy(p);
    /* missing, not JSON, broken rules, uneven ranks */
    expect_error(moe_placement_load(&q, "nonexistent.json", 2, NULL, 8, 4), MOE_ERR_IO, "nonexistent.json");
    write_text("bad.json", "{\"format\": \"moerun-placement\", \"version\": 1, ");
    expect_error(moe_placement_load(&q, "bad.json", 1, NULL, 4, 2), MOE_ERR_FORMAT, "not a JSON object");
    write_text("bad.json", "{\"format\": \"moerun-placement\", \"version\": 1, \"experts\": 4, \"ranks\": 2, "
                           "\"slots\": 2, \"layers\": [[[0, 0], [2, 3]]]}");
    expect_error(moe_placement_load(&q, "bad.json", 1, NULL, 4, 2), MOE_ERR_FORMAT, "holds expert 0 twice");
    write_text("bad.json", "{\"format\": \"moerun-placement\", \"version\": 1, \"experts\": 4, \"ranks\": 2, "
                           "\"slots\": 2, \"layers\": [[[0, 1], [2, 3, 1]]]}");
    expect_error(moe_placement_load(&q, "bad.json", 1, NULL, 4, 2), MOE_ERR_FORMAT, "rank 1 is not a list of 2");
    write_text("bad.json", "{\"format\": \"other\", \"version\": 1}");
    expect_error(moe_placement_load(&q, "bad.json", 1, NULL, 4, 2), MOE_ERR_FORMAT, "\"format\"");
    write_text("bad.json", "{\"format\": \"moerun-placement\", \"version\": 1, \"experts\": 4, \"ranks\": 2, "
                           "\"slots\": 2, \"layers\": [[[0, 1], [2, 3]]]}");
    assert_int_equal(moe_placement_load(&q, "bad.json", 1, NULL, 4, 2), MOE_OK);
    assert_true(moe_placement_is_contiguous(q));
    moe_placement_destroy(q);
}

/* The best possible max rank load over every assignment of the copies
 * (small cases), each copy carrying load / copies. */
static double best_max(const int64_t *w, const int *copies, int E, int P, int S, int *slot_used, int *has, double *load,
                       int e, int c)
{
    if (e == E) {
        double m = 0;
        for (int r = 0; r < P; r++) m = load[r] > m ? load[r] : m;
        return m;
    }
    if (c == copies[e]) return best_max(w, copies, E, P, S, slot_used, has, load, e + 1, 0);
    double best = 1e300;
    for (int r = 0; r < P; r++) {
        if (slot_used[r] == S || has[r * E + e]) continue;
        slot_used[r]++, has[r * E + e] = 1, load[r] += (double)w[e] / copies[e];
        const double m = best_max(w, copies, E, P, S, slot_used, has, load, e, c + 1);
        slot_used[r]--, has[r * E + e] = 0, load[r] -= (double)w[e] / copies[e];
        if (m < best) best = m;
    }
    return best;
}

static void test_plan(void **state)
{
    (void)state;
    /* two layers of 8 experts, a skewed one and a uniform one; 4 ranks */
    const int64_t loads[16] = {900, 80, 70, 300, 60, 50, 40, 500, 10, 10, 10, 10, 10, 10, 10, 10};
    moe_placement *p = NULL, *q = NULL;
    assert_int_equal(moe_placement_plan(&p, loads, 2, 8, 4, 0), MOE_OK);
    assert_int_equal(moe_placement_slots_per_rank(p), 2);
    /* deterministic */
    assert_int_equal(moe_placement_plan(&q, loads, 2, 8, 4, 0), MOE_OK);
    for (int l = 0; l < 2; l++)
        for (int r = 0; r < 4; r++) assert_memory_equal(moe_placement_slots(p, l, r), moe_placement_slots(q, l, r), 8);
    moe_placement_destroy(q);
    double rl[4], mx = 0;
    moe_placement_rank_loads(p, 0, loads, rl);
    for (int r = 0; r < 4; r++) mx = rl[r] > mx ? rl[r] : mx;
    /* greedy: the hottest expert alone decides the max here (900 + the lightest, 40) */
    assert_true(mx == 940.0);
    moe_placement_destroy(p);

    /* R = 4: the hottest expert gets copies (EPLB: to the highest load per
     * copy), every expert at most P copies, E + R in all */
    assert_int_equal(moe_placement_plan(&p, loads, 2, 8, 4, 4), MOE_OK);
    assert_int_equal(moe_placement_slots_per_rank(p), 3);
    assert_true(moe_placement_copies(p, 0, 0) >= 2);
    for (int l = 0; l < 2; l++) {
        int n = 0;
        for (int e = 0; e < 8; e++) {
            assert_in_range(moe_placement_copies(p, l, e), 1, 4);
            n += moe_placement_copies(p, l, e);
        }
        assert_int_equal(n, 12);
    }
    moe_placement_destroy(p);

    /* against the best over every copy count and every packing (E = 6,
     * P = 3, R = 3: 9 copies in 3 x 3 slots) */
    const int64_t w6[6] = {600, 50, 40, 300, 30, 20};
    assert_int_equal(moe_placement_plan(&p, w6, 1, 6, 3, 3), MOE_OK);
    double best = 1e300;
    int copies[6];
    for (int a = 0; a < 6; a++)
        for (int b = a; b < 6; b++)
            for (int c3 = b; c3 < 6; c3++) {
                for (int e = 0; e < 6; e++) copies[e] = 1 + (e == a) + (e == b) + (e == c3);
                int ok = 1, used[3] = {0}, has[18] = {0};
                double load[3] = {0};
                for (int e = 0; e < 6; e++) ok &= copies[e] <= 3;
                if (!ok) continue;
                const double m = best_max(w6, copies, 6, 3, 3, used, has, load, 0, 0);
                if (m < best) best = m;
            }
    moe_placement_rank_loads(p, 0, w6, rl);
    mx = 0;
    for (int r = 0; r < 3; r++) mx = rl[r] > mx ? rl[r] : mx;
    print_message("plan E=6 P=3 R=3: max rank load %.1f, best possible %.1f\n", mx, best);
    assert_true(mx >= best - 1e-9 && mx <= 1.25 * best);
    moe_placement_destroy(p);

    /* bad inputs, named */
    expect_error(moe_placement_plan(&p, loads, 2, 8, 4, -1), MOE_ERR_ARG, "must be >= 0");
    expect_error(moe_placement_plan(&p, loads, 2, 8, 4, 2), MOE_ERR_ARG, "4 ranks do not divide 8 experts + 2");
    expect_error(moe_placement_plan(&p, loads, 2, 8, 4, 28), MOE_ERR_ARG, "two copies of one expert");
    /* R = E (P - 1): every expert on every rank */
    assert_int_equal(moe_placement_plan(&p, loads, 2, 8, 4, 24), MOE_OK);
    for (int e = 0; e < 8; e++) assert_int_equal(moe_placement_copies(p, 0, e), 4);
    moe_placement_destroy(p);
}

/* The table under a placement: rows keyed by global expert, primary flags. */
static void test_table(void **state)
{
    (void)state;
    moe_train_config c;
    moe_train_config_default(&c);
    c.d_model = 8, c.n_layers = 2, c.n_heads = 2, c.seq_len = 8, c.n_experts = 6, c.d_ff = 8, c.moe_every = 1;
    const int slots[16] = {0, 1, 2, 3, 0, 4, 1, 5, 0, 2, 1, 3, 2, 4, 3, 5};
    moe_placement *p = NULL;
    assert_int_equal(moe_placement_create(&p, 2, 6, 4, 2, slots, "t"), MOE_OK);
    moe_tensor_table *t = NULL;
    assert_int_equal(moe_layout_create_placed(&t, &c, NULL, p, 2, 4), MOE_OK);
    const moe_tensor *w1 = &t->t[moe_layout_find(t, MOE_T_EXP_W1, 0)], *b2 = &t->t[moe_layout_find(t, MOE_T_EXP_B2, 1)];
    assert_int_equal(w1->rows, 2);
    assert_int_equal(w1->shape[0], 6);
    assert_true(w1->row_ids[0] == 0 && w1->row_ids[1] == 4 && !w1->row_primary[0] && w1->row_primary[1]);
    assert_true(b2->row_ids[0] == 2 && b2->row_ids[1] == 4 && !b2->row_primary[0] && b2->row_primary[1]);
    moe_layout_destroy(t);
    /* the contiguous placement is the plain table */
    moe_placement_destroy(p);
    c.n_experts = 8;
    assert_int_equal(moe_placement_create_contiguous(&p, 2, 8, 4), MOE_OK);
    assert_int_equal(moe_layout_create_placed(&t, &c, NULL, p, 1, 4), MOE_OK);
    w1 = &t->t[moe_layout_find(t, MOE_T_EXP_W1, 1)];
    assert_true(!w1->row_ids && !w1->row_primary && w1->row0 == 2 && w1->rows == 2);
    moe_layout_destroy(t);
    /* a placement for another ep size */
    expect_error(moe_layout_create_placed(&t, &c, NULL, p, 1, 2), MOE_ERR_MISMATCH, "over 4 ranks");
    moe_placement_destroy(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_contiguous), cmocka_unit_test(test_rules), cmocka_unit_test(test_file),
        cmocka_unit_test(test_plan),       cmocka_unit_test(test_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
