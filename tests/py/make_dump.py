#!/usr/bin/env python3
"""Writes a synthetic layer dump (docs/formats.md section 2) from a float32 PyTorch
forward and backward, so that layer_ref.py and h5_compare.py can be tested
without the C runtime. Deliberately written differently from layer_ref.py
(per-token loops, Python sorting, float32, a per-expert FFN loop) so that
the two do not share a mistake.

Usage: make_dump.py OUT.h5 [--tokens T --groups G --d-model D --d-ff F
       --experts E --top-k K --capacity-factor C --router R --activation A
       --normalize-topk 0|1 --seed S --tie]
--tie makes experts 0 and 1 share one router row, so every token has an
exact probability tie that the lower index must win.
"""
import argparse
import math

import h5py
import numpy as np
import torch


def capacity(k, Tg, cf, E):
    v = k * Tg * cf / E
    return int(round(v)) if abs(v - round(v)) <= 1e-9 else math.ceil(v)


def act_fn(h, act, F):
    if act == "relu":
        return torch.clamp(h, min=0)
    if act == "swiglu":
        return torch.nn.functional.silu(h[:F]) * h[F:]
    return torch.nn.functional.gelu(h, approximate="tanh")


def make(path, tokens=64, groups=2, d_model=8, d_ff=16, experts=4, top_k=2, capacity_factor=1.0,
         router="token_choice", activation="gelu", normalize_topk=None, aux_loss_coef=0.01,
         z_loss_coef=0.001, seed=0, tie=False):
    T, G, d, F, E, k = tokens, groups, d_model, d_ff, experts, top_k
    norm = int(k > 1) if normalize_topk is None else normalize_topk
    Tg = T // G
    F1 = 2 * F if activation == "swiglu" else F
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).float()
    x = rnd(T, d).requires_grad_()
    wg = rnd(E, d, scale=0.5)
    if tie:
        wg[1] = wg[0]
    wg.requires_grad_()
    w1 = rnd(E, F1, d, scale=d ** -0.5).requires_grad_()
    b1 = rnd(E, F1, scale=0.1).requires_grad_()
    w2 = rnd(E, d, F, scale=F ** -0.5).requires_grad_()
    b2 = rnd(E, d, scale=0.1).requires_grad_()
    dy = rnd(T, d)

    logits = x @ wg.t()
    probs = torch.softmax(logits, dim=-1)
    p = probs.detach().tolist()
    selected = np.zeros((T, E), np.uint8)
    kept = np.zeros((T, E), np.uint8)
    weight = [[None] * E for _ in range(T)]
    lb_terms, z_terms = [], []
    for g in range(G):
        toks = range(g * Tg, (g + 1) * Tg)
        if router == "token_choice":
            choice = {t: sorted(range(E), key=lambda e: (-p[t][e], e))[:k] for t in toks}
            C = capacity(k, Tg, capacity_factor, E) if capacity_factor > 0 else Tg * k
            load = [0] * E
            for r in range(k):
                for t in toks:
                    e = choice[t][r]
                    selected[t, e] = 1
                    if load[e] < C:
                        load[e] += 1
                        kept[t, e] = 1
            for t in toks:
                denom = sum(probs[t, e] for e in choice[t]) if norm and k > 1 else 1.0
                for e in choice[t]:
                    if kept[t, e]:
                        weight[t][e] = probs[t, e] / denom
            f = torch.tensor([sum(int(selected[t, e]) for t in toks) / (Tg * k) for e in range(E)])
            lb_terms.append(E * (f * probs[g * Tg:(g + 1) * Tg].mean(0)).sum())
        else:
            C = min(Tg, capacity(1, Tg, capacity_factor, E))
            for e in range(E):
                for t in sorted(toks, key=lambda t: (-p[t][e], t))[:C]:
                    selected[t, e] = kept[t, e] = 1
                    weight[t][e] = probs[t, e]
            lb_terms.append(torch.zeros(()))
        z_terms.append((torch.logsumexp(logits[g * Tg:(g + 1) * Tg], -1) ** 2).mean())

    ys = []
    for t in range(T):
        acc = torch.zeros(d)
        for e in range(E):
            if weight[t][e] is not None:
                h = w1[e] @ x[t] + b1[e]
                acc = acc + weight[t][e] * (w2[e] @ act_fn(h, activation, F) + b2[e])
        ys.append(acc)
    y = torch.stack(ys)
    lb = torch.stack(lb_terms).mean()
    zl = torch.stack(z_terms).mean()
    loss = (y * dy).sum() + aux_loss_coef * lb + z_loss_coef * zl
    loss.backward()
    wt = torch.tensor([[0.0 if w is None else float(w) for w in row] for row in weight])

    np32 = lambda v: v.detach().numpy().astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs.update(dict(format="moe-layer-dump", format_version=np.int64(1), tokens=np.int64(T),
                            groups=np.int64(G), d_model=np.int64(d), d_ff=np.int64(F),
                            n_experts=np.int64(E), top_k=np.int64(k),
                            capacity_factor=float(capacity_factor), router=router,
                            normalize_topk=np.int64(norm), activation=activation,
                            aux_loss_coef=float(aux_loss_coef), z_loss_coef=float(z_loss_coef),
                            seed=np.uint64(seed)))
        for name, v in (("x", x), ("router/weight", wg), ("experts/w1", w1), ("experts/b1", b1),
                        ("experts/w2", w2), ("experts/b2", b2), ("y", y), ("dy", dy),
                        ("grad/x", x.grad), ("grad/router/weight", wg.grad), ("grad/experts/w1", w1.grad),
                        ("grad/experts/b1", b1.grad), ("grad/experts/w2", w2.grad),
                        ("grad/experts/b2", b2.grad), ("routing/probs", probs), ("routing/weight", wt),
                        ("aux/load_balance", lb), ("aux/z_loss", zl)):
            f[name] = np32(v)
        f["routing/selected"] = selected
        f["routing/kept"] = kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    for opt, typ, dflt in (("tokens", int, 64), ("groups", int, 2), ("d-model", int, 8), ("d-ff", int, 16),
                           ("experts", int, 4), ("top-k", int, 2), ("capacity-factor", float, 1.0),
                           ("router", str, "token_choice"), ("activation", str, "gelu"),
                           ("normalize-topk", int, None), ("seed", int, 0)):
        ap.add_argument("--" + opt, type=typ, default=dflt)
    ap.add_argument("--tie", action="store_true")
    a = ap.parse_args()
    make(a.out, a.tokens, a.groups, a.d_model, a.d_ff, a.experts, a.top_k, a.capacity_factor, a.router,
         a.activation, a.normalize_topk, seed=a.seed, tie=a.tie)


if __name__ == "__main__":
    main()
