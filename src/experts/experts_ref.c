/* Feed-forward experts, reference path: naive loops with double
 * accumulation and the textbook tanh form of gelu, obviously correct and
 * independent of the fast path (no BLAS, no shared helpers). Tests hold the
 * fast path to these. */
#include "experts/experts.h"

#include <math.h>

static double act_ref(double x, double v, moe_activation act)
{
    const double c = 0.7978845608028654; /* sqrt(2/pi) */
    switch (act) {
    case MOE_ACT_GELU: return 0.5 * x * (1.0 + tanh(c * (x + 0.044715 * x * x * x)));
    case MOE_ACT_RELU: return x > 0.0 ? x : 0.0;
    case MOE_ACT_SWIGLU: return x / (1.0 + exp(-x)) * v;
    }
    return 0.0;
}

/* d act / d x (for swiglu: d/d gate; the value derivative is silu(gate)). */
static double act_grad_ref(double x, double v, moe_activation act)
{
    const double c = 0.7978845608028654;
    switch (act) {
    case MOE_ACT_GELU: {
        const double t = tanh(c * (x + 0.044715 * x * x * x));
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
    }
    case MOE_ACT_RELU: return x > 0.0 ? 1.0 : 0.0;
    case MOE_ACT_SWIGLU: {
        const double s = 1.0 / (1.0 + exp(-x));
        return v * (s + x * s * (1.0 - s));
    }
    }
    return 0.0;
}

void moe_act_forward_ref(float *a, const float *h, long n, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (long r = 0; r < n; r++)
        for (int j = 0; j < F; j++) {
            const float *hr = h + r * F1;
            a[r * F + j] = (float)act_ref(hr[j], act == MOE_ACT_SWIGLU ? hr[F + j] : 0.0, act);
        }
}

void moe_act_backward_ref(float *dh, const float *da, const float *h, long n, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (long r = 0; r < n; r++)
        for (int j = 0; j < F; j++) {
            const float *hr = h + r * F1;
            const double g = da[r * F + j];
            if (act == MOE_ACT_SWIGLU) {
                dh[r * F1 + j] = (float)(g * act_grad_ref(hr[j], hr[F + j], act));
                dh[r * F1 + F + j] = (float)(g * act_ref(hr[j], 1.0, act));
            } else {
                dh[r * F1 + j] = (float)(g * act_grad_ref(hr[j], 0.0, act));
            }
        }
}

void moe_expert_forward_ref(float *y, float *h, float *a, const float *x, const int *offsets,
                            const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (int e = 0; e < E; e++) {
        const float *w1 = p->w1 + (size_t)e * F1 * d, *b1 = p->b1 ? p->b1 + (size_t)e * F1 : NULL;
        const float *w2 = p->w2 + (size_t)e * d * F, *b2 = p->b2 ? p->b2 + (size_t)e * d : NULL;
        for (int r = offsets[e]; r < offsets[e + 1]; r++) {
            for (int f = 0; f < F1; f++) {
                double s = b1 ? b1[f] : 0.0;
                for (int k = 0; k < d; k++) s += (double)x[(size_t)r * d + k] * w1[(size_t)f * d + k];
                h[(size_t)r * F1 + f] = (float)s;
            }
            moe_act_forward_ref(a + (size_t)r * F, h + (size_t)r * F1, 1, F, act);
            for (int j = 0; j < d; j++) {
                double s = b2 ? b2[j] : 0.0;
                for (int f = 0; f < F; f++) s += (double)a[(size_t)r * F + f] * w2[(size_t)j * F + f];
                y[(size_t)r * d + j] = (float)s;
            }
        }
    }
}

void moe_expert_backward_ref(float *dx, moe_expert_params *g, float *dh, float *da, const float *dy,
                             const float *x, const float *h, const float *a, const int *offsets,
                             const moe_expert_params *p, int E, int d, int F, moe_activation act)
{
    const int F1 = moe_f1(F, act);
    for (int e = 0; e < E; e++) {
        const int r0 = offsets[e], r1 = offsets[e + 1];
        if (r1 <= r0) continue;
        const float *w1 = p->w1 + (size_t)e * F1 * d, *w2 = p->w2 + (size_t)e * d * F;
        float *gw1 = g->w1 + (size_t)e * F1 * d, *gb1 = g->b1 ? g->b1 + (size_t)e * F1 : NULL;
        float *gw2 = g->w2 + (size_t)e * d * F, *gb2 = g->b2 ? g->b2 + (size_t)e * d : NULL;
        /* da = dy W2, dh = act'(h) * da */
        for (int r = r0; r < r1; r++) {
            for (int f = 0; f < F; f++) {
                double s = 0.0;
                for (int j = 0; j < d; j++) s += (double)dy[(size_t)r * d + j] * w2[(size_t)j * F + f];
                da[(size_t)r * F + f] = (float)s;
            }
            moe_act_backward_ref(dh + (size_t)r * F1, da + (size_t)r * F, h + (size_t)r * F1, 1, F, act);
        }
        /* dW2 += dy^T a, db2 += colsum(dy) */
        for (int j = 0; j < d; j++) {
            double sb = 0.0;
            for (int r = r0; r < r1; r++) sb += dy[(size_t)r * d + j];
            if (gb2) gb2[j] += (float)sb;
            for (int f = 0; f < F; f++) {
                double s = 0.0;
                for (int r = r0; r < r1; r++) s += (double)dy[(size_t)r * d + j] * a[(size_t)r * F + f];
                gw2[(size_t)j * F + f] += (float)s;
            }
        }
        /* dW1 += dh^T x, db1 += colsum(dh) */
        for (int f = 0; f < F1; f++) {
            double sb = 0.0;
            for (int r = r0; r < r1; r++) sb += dh[(size_t)r * F1 + f];
            if (gb1) gb1[f] += (float)sb;
            for (int k = 0; k < d; k++) {
                double s = 0.0;
                for (int r = r0; r < r1; r++) s += (double)dh[(size_t)r * F1 + f] * x[(size_t)r * d + k];
                gw1[(size_t)f * d + k] += (float)s;
            }
        }
        /* dx = dh W1 */
        for (int r = r0; r < r1; r++)
            for (int k = 0; k < d; k++) {
                double s = 0.0;
                for (int f = 0; f < F1; f++) s += (double)dh[(size_t)r * F1 + f] * w1[(size_t)f * d + k];
                dx[(size_t)r * d + k] = (float)s;
            }
    }
}
