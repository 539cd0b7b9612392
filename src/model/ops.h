/* The dense building blocks of the GPT-2 style model (llm.c train_gpt2.c
 * style): token+position encoder, layernorm, matmul (cblas_sgemm), causal
 * multi-head attention, residual add, fused softmax cross-entropy. Each is a
 * `_forward` / `_backward` pair; a backward ACCUMULATES into every gradient
 * it is given (inputs and parameters alike). The matmul, attention, token
 * encoder and cross-entropy have a naive `_ref` beside them that tests hold
 * them to.
 *
 * Layout: N = B*T rows, row-major; linear weights are [out, in] (nn.Linear).
 * Token ids are int32_t (vocabularies up to 2^24).
 * None of these fail: sizes are the caller's contract. */
#ifndef MOE_MODEL_OPS_H
#define MOE_MODEL_OPS_H

#include <stdint.h>

/* out (B, T, C) = wte[inp] + wpe[t]. inp (B, T) token ids, each in [0, V) (the
 * caller's contract: moe_model_forward checks them), wte (V, C), wpe (>= T, C)
 * or NULL (rotary positions: out = wte[inp]). */
void moe_model_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                               int B, int T, int C);
/* dwte (V, C), dwpe (T, C) += scattered dout (B, T, C); dwpe may be NULL. */
void moe_model_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                                int B, int T, int C);
/* The plain references: wte[inp] as a one-hot (V) row times wte, and dwte
 * row by row over the vocabulary (V rows x N positions). */
void moe_model_encoder_forward_ref(float *out, const int32_t *inp, const float *wte, const float *wpe,
                                   int B, int T, int C, int V);
void moe_model_encoder_backward_ref(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                                    int B, int T, int C, int V);

/* out (N, C) = (inp - mean) * rstd * weight + bias; saves mean, rstd (N). */
void moe_model_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                 const float *weight, const float *bias, int N, int C, float eps);
/* dinp (N, C), dweight, dbias (C) += from dout (N, C). */
void moe_model_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                  const float *inp, const float *weight, const float *mean,
                                  const float *rstd, int N, int C);

/* RMSNorm over groups of C values: row n holds G groups of C at
 * inp + n*stride + g*C (the model's norms: G = 1, stride = C; q/k norms act
 * inside the c_attn rows: stride = their width, G = 1 over a whole
 * projection or G = heads of C = head_dim). out (same layout) =
 * x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps) saved (N, G);
 * weight (C) is shared by the groups. */
void moe_model_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int G,
                               int C, long stride, float eps);
void moe_model_rmsnorm_forward_ref(float *out, float *rstd, const float *inp, const float *weight, int N,
                                   int G, int C, long stride, float eps);
/* dinp (same layout) += and dweight (C) += from dout (same layout). */
void moe_model_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                const float *weight, const float *rstd, int N, int G, int C, long stride);
void moe_model_rmsnorm_backward_ref(float *dinp, float *dweight, const float *dout, const float *inp,
                                    const float *weight, const float *rstd, int N, int G, int C, long stride);

/* Rotary positions (Llama's rotate_half layout): in a head of D values,
 * element i < D/2 pairs with i + D/2 and both turn by the angle
 * pos * theta^(-2i/D). cos_t, sin_t (T, D/2) from moe_model_rope_table
 * (angles in double). */
void moe_model_rope_table(float *cos_t, float *sin_t, int T, int D, double theta);
/* In place on nh heads of D at x + n*stride (q and k are adjacent in a
 * c_attn row, so one call turns both): row n is at position pos[n], or
 * n % T when pos is NULL. The backward turns a gradient back (the
 * transposed rotation). */
void moe_model_rope_forward(float *x, const float *cos_t, const float *sin_t, const int *pos, int N, int T,
                            int nh, int D, long stride);
void moe_model_rope_backward(float *dx, const float *cos_t, const float *sin_t, const int *pos, int N, int T,
                             int nh, int D, long stride);
/* The forward with the angle computed from theta for each element. */
void moe_model_rope_forward_ref(float *x, const int *pos, int N, int T, int nh, int D, long stride,
                                double theta);

/* out (N, OC) = inp (N, C) weight^T + bias; weight (OC, C), bias (OC) or NULL. */
void moe_model_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                              int N, int C, int OC);
void moe_model_matmul_forward_ref(float *out, const float *inp, const float *weight,
                                  const float *bias, int N, int C, int OC);
/* dinp (N, C) += dout weight; dweight (OC, C) += dout^T inp; dbias (OC) += column
 * sums of dout (dbias may be NULL). dout (N, OC). */
void moe_model_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                               const float *inp, const float *weight, int N, int C, int OC);
void moe_model_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                                   const float *inp, const float *weight, int N, int C, int OC);

/* Causal self-attention with grouped-query heads: NH query heads and NKV
 * key/value heads (NKV divides NH; query head h reads kv head
 * h / (NH/NKV)) of HD values, scale 1/sqrt(HD). inp (B, T, QKV) holds q
 * (NH HD), k (NKV HD), v (NKV HD) per row, QKV = (NH + 2 NKV) HD;
 * out (B, T, NH HD); att (B, NH, T, T) the softmax probabilities, saved for
 * the backward (0 above the diagonal). GPT-2: NKV = NH, HD = C/NH. */
void moe_model_attention_forward(float *out, float *att, const float *inp, int B, int T, int NH, int NKV,
                                 int HD);
void moe_model_attention_forward_ref(float *out, float *att, const float *inp, int B, int T, int NH, int NKV,
                                     int HD);
/* dinp (B, T, QKV) += from dout (B, T, NH HD). scratch (scratch_blocks, T, T)
 * is overwritten: one (T, T) block per thread, so at most scratch_blocks
 * threads run (the _ref uses one block). Threads take (sequence, kv head)
 * pairs and walk that kv head's query heads in order, so dk and dv do not
 * depend on the thread count. */
void moe_model_attention_backward(float *dinp, float *scratch, int scratch_blocks, const float *dout,
                                  const float *inp, const float *att, int B, int T, int NH, int NKV, int HD);
void moe_model_attention_backward_ref(float *dinp, float *scratch, const float *dout, const float *inp,
                                      const float *att, int B, int T, int NH, int NKV, int HD);

/* out (n) = a + b (out may alias a or b). Its backward is the identity into
 * both inputs: the model keeps one residual-stream gradient buffer that
 * both branches accumulate into, so no residual_backward is needed. */
void moe_model_residual_forward(float *out, const float *a, const float *b, long n);

/* Fused softmax cross-entropy over V classes: probs (N, V) = softmax(logits),
 * losses (N) = logsumexp(logits) - logits[target]. targets (N) ids in [0, V). */
void moe_model_crossentropy_forward(float *losses, float *probs, const float *logits,
                                    const int32_t *targets, int N, int V);
/* dlogits (N, V) += (probs - onehot(target)) * dloss, the same dL/dloss for
 * every row (the mean over tokens: 1 / tokens). */
void moe_model_crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                                     float dloss, int N, int V);
/* The plain references, in double with libm's exp and log. */
void moe_model_crossentropy_forward_ref(float *losses, float *probs, const float *logits,
                                        const int32_t *targets, int N, int V);
void moe_model_crossentropy_backward_ref(float *dlogits, const float *probs, const int32_t *targets,
                                         float dloss, int N, int V);

#endif
