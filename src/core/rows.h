/* Row reductions and the softmax's exp, shared by the attention and
 * cross-entropy softmaxes and the norms (model/ops.c) and the vocabulary
 * head (vocab/head.c). Sums run in MOE_LANES lanes added in a fixed order:
 * the compiler vectorises them (it may not reorder a single running float
 * sum), and a result depends on nothing but the row, so the bits do not
 * depend on how rows are split over threads. Inline, so that each caller's
 * target clone (MOE_TARGET_CLONES) vectorises them at its own width. */
#ifndef MOE_CORE_ROWS_H
#define MOE_CORE_ROWS_H

#define MOE_LANES 8

static inline float moe_lanes_total(const float *s)
{
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* sum_j a[j] b[j] over j < n, in lanes. */
static inline float moe_lanes_dot(const float *a, const float *b, int n)
{
    float s[MOE_LANES] = {0};
    int j = 0;
    for (; j + MOE_LANES <= n; j += MOE_LANES)
        for (int l = 0; l < MOE_LANES; l++) s[l] += a[j + l] * b[j + l];
    for (; j < n; j++) s[0] += a[j] * b[j];
    return moe_lanes_total(s);
}

/* sum_j x[j] over j < n, in lanes. */
static inline float moe_row_sum(const float *x, int n)
{
    float s[MOE_LANES] = {0};
    int j = 0;
    for (; j + MOE_LANES <= n; j += MOE_LANES)
        for (int l = 0; l < MOE_LANES; l++) s[l] += x[j + l];
    for (; j < n; j++) s[0] += x[j];
    return moe_lanes_total(s);
}

/* Largest of x[0..n) (n >= 1), over lanes so that the loop vectorises (a
 * float max reduction is not reassociated by the compiler on its own). */
static inline float moe_row_max(const float *x, int n)
{
    float m[MOE_LANES];
    for (int l = 0; l < MOE_LANES; l++) m[l] = x[0];
    int j = 0;
    for (; j + MOE_LANES <= n; j += MOE_LANES)
        for (int l = 0; l < MOE_LANES; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (; j < n; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
    for (int l = 1; l < MOE_LANES; l++) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

/* x[j] = exp(x[j] - mx) for j < n (moe_fast_expf). Elementwise, so it has
 * the AVX-512 clone (MOE_TARGET_CLONES_EW): the exp is most of a softmax,
 * and the sum is a separate pass (moe_row_sum). */
void moe_row_exp(float *x, int n, float mx);

#endif
