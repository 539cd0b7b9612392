/* Feed-forward experts on tokens packed contiguously per expert:
 * FFN_e(x) = W2_e act(W1_e x + b1_e) + b2_e, weights [out, in] (PyTorch
 * nn.Linear layout), GEMMs through cblas_sgemm. A naive _ref beside each. */
#ifndef MOE_EXPERTS_H
#define MOE_EXPERTS_H

#include "core/moe.h"

/* Parameters (or gradients) of E experts, each pointer one contiguous block.
 * b1 and b2 are both NULL for experts without biases (linear_bias = 0). */
typedef struct {
    float *w1; /* (E, F1, d)  F1 = 2F for swiglu (gate rows then value rows), else F */
    float *b1; /* (E, F1) or NULL */
    float *w2; /* (E, d, F) */
    float *b2; /* (E, d) or NULL */
} moe_expert_params;

/* Rows of expert e are [offsets[e], offsets[e+1]) of every packed (N, .) array;
 * offsets has E+1 entries, offsets[0] = 0, N = offsets[E]. Experts with no
 * rows are skipped (no GEMM call with a zero dimension). */

/* Forward: writes y (N, d), h (N, F1) pre-activation, a (N, F) activation.
 * x (N, d). Never fails (sizes are the caller's contract). */
void moe_expert_forward(float *y, float *h, float *a, const float *x, const int *offsets,
                        const moe_expert_params *p, int E, int d, int F, moe_activation act);
void moe_expert_forward_ref(float *y, float *h, float *a, const float *x, const int *offsets,
                            const moe_expert_params *p, int E, int d, int F, moe_activation act);

/* Backward: writes dx (N, d) (overwritten), accumulates into g, uses dh
 * (N, F1) and da (N, F) as scratch. dy (N, d); x, h, a as saved by forward.
 * An expert with no rows gets no gradient contribution (stays exactly as it was).
 * In-place use is allowed and saves memory: dx may be dy, dh may be h and da
 * may be a (each is dead once its replacement is written, expert by
 * expert); h and a are then destroyed. */
void moe_expert_backward(float *dx, moe_expert_params *g, float *dh, float *da, const float *dy,
                         const float *x, const float *h, const float *a, const int *offsets,
                         const moe_expert_params *p, int E, int d, int F, moe_activation act);
void moe_expert_backward_ref(float *dx, moe_expert_params *g, float *dh, float *da, const float *dy,
                             const float *x, const float *h, const float *a, const int *offsets,
                             const moe_expert_params *p, int E, int d, int F, moe_activation act);

/* Elementwise activation and its backward over n rows (shared with the dense
 * feed-forward of the model). act_forward: a (n, F) from h (n, F1).
 * act_backward: dh (n, F1) from da (n, F) and h (overwritten: dh is a
 * scratch of the caller, not a parameter gradient). The _ref pair evaluates
 * in double with the textbook formulas. */
void moe_act_forward(float *a, const float *h, long n, int F, moe_activation act);
void moe_act_backward(float *dh, const float *da, const float *h, long n, int F, moe_activation act);
void moe_act_forward_ref(float *a, const float *h, long n, int F, moe_activation act);
void moe_act_backward_ref(float *dh, const float *da, const float *h, long n, int F, moe_activation act);

/* GEMM floating-point operations of one forward + backward over the rows in
 * offsets (E+1): forward 2 N d F1 + 2 N F d, backward twice that. For
 * reporting GFLOP/s; activations and biases are not counted. */
double moe_expert_flops(const int *offsets, int E, int d, int F, moe_activation act);

#endif
