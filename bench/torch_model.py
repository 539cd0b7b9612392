#!/usr/bin/env python3
"""A fair PyTorch implementation of the model and training step of `moe train`
(checkpoint.md, routing.md), used as the baseline of bench/train_vs_torch.sh.

Same shapes and the same work per step: token + position embeddings, pre-norm
blocks (LN, causal multi-head attention, LN, FFN), every moe_every-th block
(from block 0) an MoE FFN (router [E, d] without bias, softmax, token-choice
top-k with capacity per routing group of group_seqs sequences, fill order
"choice rank, then token", normalize_topk, experts w1 [E, F, d] b1 w2 [E, d, F]
b2, gelu tanh), the others a dense FFN, final LN, head tied to wte; objective
CE + aux_loss_coef * mean L_bal + z_loss_coef * mean L_z; global-norm
clipping and AdamW (decay on matrices only). The MoE FFN is sorted dispatch:
index_select of the kept rows, one addmm pair per expert, index_add_ back.

Batches are random windows of --data FILE (use the corpus `moe train` reads,
so that routing, hence dropped assignments, is alike), else random bytes. Prints one
JSON line after warmup: {"tokens_per_s": ..., "ms_per_step": ...} (median
over the timed steps) plus the mean dropped fraction.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as Fn


def normal(shape, std):
    return (torch.randn(*shape) * std).requires_grad_()


def zeros(*shape):
    return torch.zeros(*shape, requires_grad=True)


def ones(*shape):
    return torch.ones(*shape, requires_grad=True)


class Model:
    """Parameters in the checkpoint layout; decay / no-decay lists for AdamW."""

    def __init__(self, a):
        d, F, E, V = a.d_model, a.d_ff, a.experts, 256
        std, rstd = 0.02, 0.02 / math.sqrt(2 * a.layers)
        self.a = a
        self.wte = normal((V, d), std)
        self.wpe = normal((a.seq, d), std)
        self.blocks = []
        for l in range(a.layers):
            b = {
                "ln1w": ones(d), "ln1b": zeros(d),
                "qkvw": normal((3 * d, d), std), "qkvb": zeros(3 * d),
                "projw": normal((d, d), rstd), "projb": zeros(d),
                "ln2w": ones(d), "ln2b": zeros(d),
            }
            if l % a.moe_every == 0:
                b.update({"rw": normal((E, d), std),
                          "w1": normal((E, F, d), std), "b1": zeros(E, F),
                          "w2": normal((E, d, F), rstd), "b2": zeros(E, d)})
            else:
                b.update({"fcw": normal((F, d), std), "fcb": zeros(F),
                          "fcpw": normal((d, F), rstd), "fcpb": zeros(d)})
            self.blocks.append(b)
        self.lnfw, self.lnfb = ones(d), zeros(d)
        params = [self.wte, self.wpe, self.lnfw, self.lnfb] + [p for b in self.blocks for p in b.values()]
        self.decay = [p for p in params if p.dim() >= 2]
        self.no_decay = [p for p in params if p.dim() < 2]
        self.n_moe = sum(1 for l in range(a.layers) if l % a.moe_every == 0)
        self.kept = self.assigned = 0  # kept / total top-k assignments (dropped fraction)

    def attention(self, x, b):
        B, T, d = x.shape
        nh = self.a.heads
        hs = d // nh
        qkv = Fn.linear(x, b["qkvw"], b["qkvb"]).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                  # (B, nh, T, hs)
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        s = s.masked_fill(self.mask[:T, :T], float("-inf"))
        y = torch.softmax(s, dim=-1) @ v                  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, d)
        return Fn.linear(y, b["projw"], b["projb"])

    def moe(self, x, b, G):
        """x (N, d) in G routing groups; returns y (N, d), L_bal (G), L_z (G)."""
        a = self.a
        N, d = x.shape
        E, k = a.experts, a.top_k
        Tg = N // G
        logits = x @ b["rw"].t()                            # (N, E)
        probs = torch.softmax(logits, dim=1)
        with torch.no_grad():
            topi = torch.topk(probs.detach().view(G, Tg, E), k, dim=2).indices  # (G, Tg, k)
            flat = topi.transpose(1, 2).reshape(G, k * Tg)  # choice rank outer, token inner
            onehot = Fn.one_hot(flat, E)                    # (G, k Tg, E)
            selected = onehot.sum(1)                        # (G, E) before drops
            if a.capacity_factor > 0:
                C = math.ceil(k * Tg * a.capacity_factor / E - 1e-9)
                pos = onehot.cumsum(1).gather(2, flat.unsqueeze(2)).squeeze(2) - 1
                keep = pos < C
            else:
                keep = torch.ones_like(flat, dtype=torch.bool)
            tok = (torch.arange(Tg).view(1, 1, Tg) + Tg * torch.arange(G).view(G, 1, 1)).expand(G, k, Tg)
            e_idx, t_idx = flat[keep], tok.reshape(G, k * Tg)[keep]
            order = torch.argsort(e_idx * N + t_idx)        # by expert, tokens ascending
            e_idx, t_idx = e_idx[order], t_idx[order]
            counts = torch.bincount(e_idx, minlength=E).tolist()
            self.kept += len(e_idx)
            self.assigned += k * N
        gate = probs[t_idx, e_idx]
        if k > 1 and a.normalize_topk:
            gate = gate / probs.gather(1, topi.view(N, k)).sum(1)[t_idx]
        xs = x.index_select(0, t_idx)
        outs, s0 = [], 0
        for e in range(E):
            n = counts[e]
            if n:
                h = Fn.gelu(torch.addmm(b["b1"][e], xs[s0:s0 + n], b["w1"][e].t()), approximate="tanh")
                outs.append(torch.addmm(b["b2"][e], h, b["w2"][e].t()))
            s0 += n
        ys = torch.cat(outs) * gate.unsqueeze(1)
        y = torch.zeros(N, d).index_add_(0, t_idx, ys)
        f = selected.to(probs.dtype) / (Tg * k)
        lb = E * (f * probs.view(G, Tg, E).mean(1)).sum(1)
        z = (torch.logsumexp(logits, dim=1) ** 2).view(G, Tg).mean(1)
        return y, lb, z

    def loss(self, inp, tgt):
        a = self.a
        B, T = inp.shape
        d = a.d_model
        G = B // a.group_seqs
        x = self.wte[inp] + self.wpe[:T]
        lb_sum, z_sum = 0.0, 0.0
        for b in self.blocks:
            x = x + self.attention(Fn.layer_norm(x, (d,), b["ln1w"], b["ln1b"], a.ln_eps), b)
            h = Fn.layer_norm(x, (d,), b["ln2w"], b["ln2b"], a.ln_eps).view(B * T, d)
            if "rw" in b:
                y, lb, z = self.moe(h, b, G)
                lb_sum, z_sum = lb_sum + lb.sum(), z_sum + z.sum()
            else:
                y = Fn.linear(Fn.gelu(Fn.linear(h, b["fcw"], b["fcb"]), approximate="tanh"), b["fcpw"], b["fcpb"])
            x = x + y.view(B, T, d)
        x = Fn.layer_norm(x, (d,), self.lnfw, self.lnfb, a.ln_eps)
        logits = x.view(B * T, d) @ self.wte.t()
        loss = Fn.cross_entropy(logits, tgt.reshape(-1))
        if self.n_moe:
            terms = G * self.n_moe
            loss = loss + a.aux_loss_coef * lb_sum / terms + a.z_loss_coef * z_sum / terms
        return loss


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
    a = ap.parse_args()
    if a.batch % a.group_seqs or a.d_model % a.heads or not 1 <= a.top_k <= a.experts:
        ap.error("need batch % group_seqs == 0, d_model % heads == 0, 1 <= top_k <= experts")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    m = Model(a)
    m.mask = torch.triu(torch.ones(a.seq, a.seq, dtype=torch.bool), diagonal=1)
    opt = torch.optim.AdamW([{"params": m.decay, "weight_decay": 0.1},
                             {"params": m.no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    params = m.decay + m.no_decay
    corpus = None
    if a.data:
        with open(a.data, "rb") as f:
            corpus = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        if corpus.numel() <= a.seq + 1:
            ap.error(f"--data {a.data}: fewer than seq + 2 = {a.seq + 2} bytes")
    times = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            m.kept = m.assigned = 0
        if corpus is None:
            data = torch.randint(0, 256, (a.batch, a.seq + 1))
        else:
            start = torch.randint(0, corpus.numel() - a.seq - 1, (a.batch, 1))
            data = corpus[start + torch.arange(a.seq + 1)]
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (i + 1) / max(1, a.warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss = m.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    print(json.dumps({"tokens_per_s": a.batch * a.seq / dt, "ms_per_step": 1e3 * dt,
                      "dropped_frac": 1 - m.kept / m.assigned if m.assigned else 0.0,
                      "loss": float(loss)}))


if __name__ == "__main__":
    main()
