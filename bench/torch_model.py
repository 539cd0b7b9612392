#!/usr/bin/env python3
"""The model and training step of `moe train` in PyTorch, in its strongest
formulation here, the baseline of bench/train_vs_torch.sh.

Same shapes and work per step (docs/training.md, docs/routing.md): token +
position embeddings, pre-norm blocks (LN, causal multi-head attention, LN,
FFN), every moe_every-th block (from block 0) an MoE FFN (router [E, d]
without bias, softmax, token-choice top-k with capacity per routing group of
group_seqs sequences, fill order "choice rank, then token", normalize_topk,
experts F x d with gelu tanh), the others a dense FFN, final LN, head tied
to wte; objective CE + aux_loss_coef * mean L_bal + z_loss_coef * mean L_z;
global-norm clipping and AdamW (decay on matrices only).

Formulation (each choice measured with --study, figures in bench/README.md):
  - fused QKV: one [3d, d] linear, q/k/v as views;
  - attention (--attention): "manual" q k^T, masked_fill, softmax, @ v;
    "baddbmm" the scores in one baddbmm onto an additive -inf mask;
    "sdpa" torch's scaled_dot_product_attention with is_causal
    (F.scaled_dot_product_attention from PyTorch 2.0; PyTorch 1.13 has it as
    the private F._scaled_dot_product_attention, which this uses there);
  - MoE FFN (--moe): a formulation of bench/torch_layer.py (routing and
    experts come from there: loop, split, unbind, bmm, jit);
  - AdamW with foreach (multi-tensor) updates (--foreach; fused AdamW is
    CUDA-only in this PyTorch);
  - no .contiguous() beyond the one reshape attention needs.

Architecture options (docs/training.md "Architecture"), for the
Mixtral-shaped comparison of bench/mixtral_vs_torch.sh: --norm rmsnorm
(x * rsqrt(mean(x^2) + eps) * w), --pos rope (rotate_half, cos/sin tables
built once), --kv-heads (grouped-query attention: with baddbmm the query
heads of a kv head are folded into the row dimension, so k and v are never
repeated; manual and sdpa repeat them), --activation swiglu, --bias 0 (no
biases anywhere but the norms), --tie 0 (a separate lm_head).

Batches are random windows of --data FILE (use the corpus `moe train` reads,
so that routing, hence dropped assignments, is alike), else random bytes.
Prints one JSON line after warmup: {"tokens_per_s", "ms_per_step" (median
over the timed steps), "dropped_frac", "loss", the formulation, threads and
OpenBLAS kernels}; --study prints one line per formulation tried, measured
in alternating rounds after checking they compute the same loss and
gradients.
"""
import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_layer import Experts, blas_info, route, swiglu  # noqa: E402

ATTENTION = ("manual", "baddbmm", "sdpa")
MOE_VARIANTS = ("loop", "split", "unbind", "bmm", "jit")
# clip_grad_norm_ takes foreach from PyTorch 2.0 on
CLIP_FOREACH = "foreach" in inspect.signature(torch.nn.utils.clip_grad_norm_).parameters
# the strongest formulation measured here (bench/README.md)
BEST = {"attention": "baddbmm", "moe": "unbind", "foreach": 1}


def sdpa_fn():
    if hasattr(Fn, "scaled_dot_product_attention"):
        return lambda q, k, v: Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: Fn._scaled_dot_product_attention(q, k, v, None, 0.0, False, True)[0]


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(T, hs, theta):
    """cos, sin (T, hs/2) of the angles pos * theta^(-2i/hs)."""
    inv = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x, c, s):
    """rotate_half on the last dim of x (..., T, hs) with tables c, s (T, hs/2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Model:
    """Parameters in the checkpoint layout (experts in the --moe layout)."""

    def __init__(self, a, seed):
        g = torch.Generator().manual_seed(seed)
        d, F, E, V = a.d_model, a.d_ff, a.experts, 256
        F1 = 2 * F if a.activation == "swiglu" else F
        hs = d // a.heads
        kv = a.kv_heads or a.heads
        std, rstd = 0.02, 0.02 / math.sqrt(2 * a.layers)
        normal = lambda shape, s: (torch.randn(*shape, generator=g) * s).requires_grad_()
        zeros = lambda *shape: torch.zeros(*shape, requires_grad=True) if a.bias else None
        ones = lambda *shape: torch.ones(*shape, requires_grad=True)
        lnb = lambda *shape: torch.zeros(*shape, requires_grad=True) if a.norm == "layernorm" else None
        self.a = a
        self.wte = normal((V, d), std)
        self.wpe = normal((a.seq, d), std) if a.pos == "learned" else None
        self.head = normal((V, d), std) if not a.tie else None
        self.blocks = []
        decay, no_decay = [p for p in (self.wte, self.wpe, self.head) if p is not None], []
        for l in range(a.layers):
            b = {"ln1w": ones(d), "ln1b": lnb(d), "qkvw": normal(((a.heads + 2 * kv) * hs, d), std),
                 "qkvb": zeros((a.heads + 2 * kv) * hs), "projw": normal((d, d), rstd), "projb": zeros(d),
                 "ln2w": ones(d), "ln2b": lnb(d)}
            decay += [b["qkvw"], b["projw"]]
            no_decay += [b[n] for n in ("ln1w", "ln1b", "qkvb", "projb", "ln2w", "ln2b")]
            if l % a.moe_every == 0:
                b["rw"] = normal((E, d), std)
                b1, b2 = (torch.zeros(E, F1), torch.zeros(E, d)) if a.bias else (None, None)
                b["experts"] = Experts(a.moe, normal((E, F1, d), std), b1, normal((E, d, F), rstd), b2, a.activation)
                decay += [b["rw"]] + b["experts"].weights()
                no_decay += b["experts"].biases()
            else:
                b.update({"fcw": normal((F1, d), std), "fcb": zeros(F1), "fcpw": normal((d, F), rstd), "fcpb": zeros(d)})
                decay += [b["fcw"], b["fcpw"]]
                no_decay += [b["fcb"], b["fcpb"]]
            self.blocks.append(b)
        self.lnfw, self.lnfb = ones(d), lnb(d)
        no_decay += [self.lnfw, self.lnfb]
        self.decay, self.no_decay = decay, [p for p in no_decay if p is not None]
        self.n_moe = sum(1 for l in range(a.layers) if l % a.moe_every == 0)
        self.kept = self.assigned = 0  # kept / total top-k assignments (dropped fraction)
        T = a.seq
        self.mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        self.mask_add = torch.zeros(T, T).masked_fill(self.mask, float("-inf"))
        self.sdpa = sdpa_fn()
        self.cos, self.sin = rope_tables(T, hs, a.rope_theta) if a.pos == "rope" else (None, None)
        grp = a.heads // kv
        # grouped-query attention under baddbmm: the grp query heads of a kv head are stacked as rows
        self.mask_grp = self.mask_add.repeat(grp, 1) if grp > 1 else self.mask_add

    def norm(self, x, w, b):
        d = x.shape[-1]
        if self.a.norm == "rmsnorm":
            return rms_norm(x, w, self.a.ln_eps)
        return Fn.layer_norm(x, (d,), w, b, self.a.ln_eps)

    def act(self, h):
        return swiglu(h) if self.a.activation == "swiglu" else Fn.gelu(h, approximate="tanh")

    def attention(self, x, b):
        B, T, d = x.shape
        nh = self.a.heads
        kv = self.a.kv_heads or nh
        hs = d // nh
        grp = nh // kv
        qkv = Fn.linear(x, b["qkvw"], b["qkvb"])
        q = qkv[..., :nh * hs].view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = qkv[..., nh * hs:(nh + kv) * hs].view(B, T, kv, hs).transpose(1, 2)
        v = qkv[..., (nh + kv) * hs:].view(B, T, kv, hs).transpose(1, 2)
        if self.cos is not None:
            q, k = rope(q, self.cos[:T], self.sin[:T]), rope(k, self.cos[:T], self.sin[:T])
        if self.a.attention == "baddbmm":
            mask = self.mask_grp if T == self.a.seq else self.mask_add[:T, :T].repeat(grp, 1)
            s = torch.baddbmm(mask, q.reshape(B * kv, grp * T, hs), k.reshape(B * kv, T, hs).transpose(1, 2),
                              alpha=1.0 / math.sqrt(hs))
            y = (torch.softmax(s, dim=-1) @ v.reshape(B * kv, T, hs)).view(B, nh, T, hs)
        else:
            if grp > 1:
                k, v = k.repeat_interleave(grp, dim=1), v.repeat_interleave(grp, dim=1)
            if self.a.attention == "sdpa":
                y = self.sdpa(q, k, v)
            else:
                s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
                s = s.masked_fill(self.mask[:T, :T], float("-inf"))
                y = torch.softmax(s, dim=-1) @ v
        return Fn.linear(y.transpose(1, 2).reshape(B, T, d), b["projw"], b["projb"])

    def moe(self, x, b, G):
        """x (N, d) in G routing groups; returns y (N, d), L_bal (G), L_z (G)."""
        a = self.a
        N, d = x.shape
        E, k = a.experts, a.top_k
        Tg = N // G
        logits = x @ b["rw"].t()  # (N, E)
        probs = torch.softmax(logits, dim=1)
        e_idx, t_idx, gate, counts, selected = route(probs, k, a.capacity_factor, "token_choice", G, a.normalize_topk)
        self.kept += len(e_idx)
        self.assigned += k * N
        y = b["experts"].forward(x, e_idx, t_idx, gate, counts)
        f = selected.to(probs.dtype) / (Tg * k)
        lb = E * (f * probs.view(G, Tg, E).mean(1)).sum(1)
        z = (torch.logsumexp(logits, dim=1) ** 2).view(G, Tg).mean(1)
        return y, lb, z

    def loss(self, inp, tgt):
        a = self.a
        B, T = inp.shape
        d = a.d_model
        G = B // a.group_seqs
        x = self.wte[inp] + self.wpe[:T] if self.wpe is not None else self.wte[inp]
        lb_sum, z_sum = 0.0, 0.0
        for b in self.blocks:
            x = x + self.attention(self.norm(x, b["ln1w"], b["ln1b"]), b)
            h = self.norm(x, b["ln2w"], b["ln2b"]).view(B * T, d)
            if "rw" in b:
                y, lb, z = self.moe(h, b, G)
                lb_sum, z_sum = lb_sum + lb.sum(), z_sum + z.sum()
            else:
                y = Fn.linear(self.act(Fn.linear(h, b["fcw"], b["fcb"])), b["fcpw"], b["fcpb"])
            x = x + y.view(B, T, d)
        x = self.norm(x, self.lnfw, self.lnfb)
        logits = x.view(B * T, d) @ (self.wte if self.head is None else self.head).t()
        loss = Fn.cross_entropy(logits, tgt.reshape(-1))
        if self.n_moe:
            terms = G * self.n_moe
            loss = loss + a.aux_loss_coef * lb_sum / terms + a.z_loss_coef * z_sum / terms
        return loss

    def grads(self):
        """Every gradient in a formulation-independent order and layout."""
        out = []
        for p in [self.wte, self.wpe, self.head, self.lnfw, self.lnfb]:
            if p is not None:
                out.append(p.grad)
        for b in self.blocks:
            for n, p in b.items():
                if n == "experts":
                    out += list(p.grads().values())
                elif p is not None:
                    out.append(p.grad)
        return out


def batches(a):
    """Every step's (input, target) bytes, fixed by the seed."""
    g = torch.Generator().manual_seed(a.seed + 1)
    corpus = None
    if a.data:
        with open(a.data, "rb") as f:
            corpus = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        if corpus.numel() <= a.seq + 1:
            raise SystemExit(f"torch_model.py: --data {a.data}: fewer than seq + 2 = {a.seq + 2} bytes")
    out = []
    for _ in range(a.warmup + a.steps):
        if corpus is None:
            data = torch.randint(0, 256, (a.batch, a.seq + 1), generator=g)
        else:
            start = torch.randint(0, corpus.numel() - a.seq - 1, (a.batch, 1), generator=g)
            data = corpus[start + torch.arange(a.seq + 1)]
        out.append((data[:, :-1], data[:, 1:]))
    return out


def train(a, data):
    """Median step seconds, dropped fraction and last loss of one run."""
    m = Model(a, a.seed)
    opt = torch.optim.AdamW([{"params": m.decay, "weight_decay": 0.1}, {"params": m.no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, foreach=bool(a.foreach))
    params = m.decay + m.no_decay
    times = []
    for i, (inp, tgt) in enumerate(data):
        if i == a.warmup:
            m.kept = m.assigned = 0
        t0 = time.perf_counter()
        for grp in opt.param_groups:
            grp["lr"] = a.lr * min(1.0, (i + 1) / max(1, a.warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss = m.loss(inp, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, **({"foreach": bool(a.foreach)} if CLIP_FOREACH else {}))
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), (1 - m.kept / m.assigned if m.assigned else 0.0), float(loss)


def check(a, variants):
    """One step's loss and gradients of every formulation against the first's."""
    data = batches(a)[:1]
    ref = None
    for v in variants:
        b = argparse.Namespace(**{**vars(a), **v})
        m = Model(b, a.seed)
        loss = m.loss(*data[0])
        loss.backward()
        got = [loss.detach()] + m.grads()
        if ref is None:
            ref = got
            continue
        for i, (x, y) in enumerate(zip(got, ref)):
            err = (x - y).abs().max().item() / (y.abs().max().item() + 1e-30)
            if not err < 1e-3:
                raise SystemExit(f"torch_model.py: formulation {v} differs from {variants[0]} in tensor {i} "
                                 f"(relative {err:.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--moe-every", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--normalize-topk", type=int, default=1)
    ap.add_argument("--group-seqs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ln-eps", type=float, default=1e-5)
    ap.add_argument("--aux-loss-coef", type=float, default=0.01)
    ap.add_argument("--z-loss-coef", type=float, default=0.001)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=50, help="linear lr warmup, as moe train")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="text file to sample windows from (default: random bytes)")
    ap.add_argument("--attention", default=BEST["attention"], choices=ATTENTION)
    ap.add_argument("--moe", default=BEST["moe"], choices=MOE_VARIANTS)
    ap.add_argument("--foreach", type=int, default=BEST["foreach"], choices=(0, 1))
    ap.add_argument("--norm", default="layernorm", choices=("layernorm", "rmsnorm"))
    ap.add_argument("--pos", default="learned", choices=("learned", "rope"))
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention (0: --heads)")
    ap.add_argument("--activation", default="gelu", choices=("gelu", "swiglu"))
    ap.add_argument("--bias", type=int, default=1, choices=(0, 1), help="0: no biases but the norms'")
    ap.add_argument("--tie", type=int, default=1, choices=(0, 1), help="0: a separate lm_head")
    ap.add_argument("--study", action="store_true", help="check and time the formulations, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="--study: rounds")
    a = ap.parse_args()
    if a.batch % a.group_seqs or a.d_model % a.heads or not 1 <= a.top_k <= a.experts:
        ap.error("need batch % group_seqs == 0, d_model % heads == 0, 1 <= top_k <= experts")
    if a.heads % (a.kv_heads or a.heads):
        ap.error("--kv-heads must divide --heads")
    torch.set_num_threads(a.threads)
    core, blas_threads = blas_info()
    info = {"threads": a.threads, "blas_coretype": core, "blas_threads": blas_threads, "torch": torch.__version__}
    if not a.study:
        dt, drop, loss = train(a, batches(a))
        print(json.dumps(dict(tokens_per_s=a.batch * a.seq / dt, ms_per_step=1e3 * dt, dropped_frac=drop, loss=loss,
                              attention=a.attention, moe=a.moe, foreach=a.foreach, **info)))
        return
    # The strongest choices, then one change at a time.
    forms = [dict(BEST)]
    forms += [dict(BEST, attention=x) for x in ATTENTION if x != BEST["attention"]]
    forms += [dict(BEST, moe=x) for x in MOE_VARIANTS if x != BEST["moe"]]
    forms += [dict(BEST, foreach=1 - BEST["foreach"])]
    check(a, forms)
    data = batches(a)
    times = [[] for _ in forms]
    for r in range(a.rounds):
        for i in (range(len(forms)) if r % 2 == 0 else reversed(range(len(forms)))):
            times[i].append(train(argparse.Namespace(**{**vars(a), **forms[i]}), data)[0])
    print(f"# d_model {a.d_model}, {a.layers} layers, E={a.experts} k={a.top_k}, d_ff {a.d_ff}, seq {a.seq}, "
          f"batch {a.batch}; {a.threads} threads, OpenBLAS {core} x {blas_threads}, torch {torch.__version__}; "
          f"median of {a.rounds} rounds, each the median of {a.steps} steps; formulations checked against the first")
    for f, t in zip(forms, times):
        dt = statistics.median(t)
        print(json.dumps(dict(f, tokens_per_s=a.batch * a.seq / dt, ms_per_step=1e3 * dt,
                              rounds_ms=[round(1e3 * x, 1) for x in t], **info)))


if __name__ == "__main__":
    main()
