/* Shared by the checkpoint tests: a small model config with 2 MoE layers,
 * and a checkpoint state whose every value is a pure function of (what,
 * tensor name, GLOBAL element index), so that any rank layout can compute
 * what a file must hold, and so can read_spec.py (the same formula). */
#ifndef MOE_TEST_CKPT_LIB_H
#define MOE_TEST_CKPT_LIB_H

#include <stdint.h>

#include "ckpt/ckpt.h"
#include "vocab/partition.h"

enum { TK_PARAM = 0, TK_M = 1, TK_V = 2, TK_GRAD = 3 };

/* d=8, 3 blocks (MoE at 0 and 2: moe_every = 2), E = 12, swiglu, noisy
 * router, vocab_size 300 (room for tk_tokenizer's 263 ids). With tk_arch =
 * 1 also architecture and router options whose tensors change the layout
 * (format_version 2): RMSNorm, RoPE, 2 heads of 6 over 1 kv head, q/k
 * norms, no biases but q, k, v, an untied head, the expert bias, 2 gated
 * shared experts. */
void tk_config(moe_train_config *cfg);
extern int tk_arch;

/* A small tokenizer for /tokenizer round trips (read_spec.py knows it too):
 * ids 0..255 the bytes; 256 "ab", 257 a hole, 258 " the", 259 "\xff\xfe",
 * 260 "abc", 261 "\n\n"; specials <|endoftext|> = 257 (the hole) and
 * <|pad|> = 262; GPT-2's pattern. vocab_size 263. NULL on failure. */
moe_tok *tk_tokenizer(void);
/* Nonzero: the model also has the vocabulary-expert head (head =
 * vocab_experts, M = 12 experts over V = 300 tokens, token v in expert
 * tk_assign(v): every expert's ids are scattered), so files are format 2
 * and the head's rows are scattered to their token ids. Set before the
 * other calls. */
extern int tk_vocab;
int tk_assign(int v);

/* Value of element j (global, row-major) of tensor `name` of kind k. An
 * integer / 4096, exact in float32; its absolute value for TK_V (a second
 * moment is >= 0, as the loader checks). */
float tk_value(int kind, const char *name, int64_t j);

/* A state over table for this rank (ep rank p of P; replica index r): owned
 * rows and replicated tensors hold tk_value; rows/tensors this rank must not
 * write (replica r > 0 for experts, world rank != 0 for replicated ones)
 * hold garbage, which the file must not contain. Frees with tk_state_free. */
typedef struct {
    moe_ckpt_state s;
    moe_tensor_table *table;
    moe_train_config cfg;
    int n_moe;
    moe_vocab_part *part; /* tk_vocab: the partition */
} tk_state;

int tk_state_make(tk_state *t, int ep_rank, int ep_size, int world_rank, int replica);
/* Zeroed buffers for loading into. */
int tk_state_blank(tk_state *t, int ep_rank, int ep_size);
void tk_state_free(tk_state *t);

/* Number of elements of t (this rank's slice) that differ from tk_value, and
 * of the counters / attributes that differ from what tk_state_make wrote. */
int64_t tk_state_check(const tk_state *t);

/* The config text tk_state_make stores. */
extern const char *tk_config_text;

#endif
