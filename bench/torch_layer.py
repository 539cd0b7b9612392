#!/usr/bin/env python3
"""A fair PyTorch implementation of the same MoE layer (forward+backward),
used as the baseline of bench/layer_vs_torch.sh.

Sorted dispatch: route, sort assignments by expert, index_select the token
rows, one matmul pair per expert, index_add_ the weighted outputs back.
Same routing rules as moerun (token choice with capacity, or expert choice).
Prints one JSON line: {"tokens_per_s": ..., "ms_per_iter": ...}.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as Fn


def route(probs, k, cf, kind, groups):
    """Returns (expert, token, weight) of kept assignments, per the routing spec."""
    T, E = probs.shape
    Tg = T // groups
    experts, tokens, weights = [], [], []
    for g in range(groups):
        p = probs[g * Tg:(g + 1) * Tg]
        if kind == "token_choice":
            w, idx = torch.topk(p, k, dim=1)
            if k > 1:
                w = w / w.sum(dim=1, keepdim=True)
            if cf > 0:
                C = math.ceil(k * Tg * cf / E - 1e-9)
                # fill order: choice rank outer, token inner -> position in expert queue
                flat_e = idx.t().reshape(-1)               # (k*Tg) rank-major
                onehot = Fn.one_hot(flat_e, E)
                pos = (onehot.cumsum(0) - 1).gather(1, flat_e[:, None])[:, 0]
                keep = (pos < C).reshape(k, Tg).t()
            else:
                keep = torch.ones_like(idx, dtype=torch.bool)
            tok = torch.arange(Tg).unsqueeze(1).expand(Tg, k)
            experts.append(idx[keep]); tokens.append(tok[keep] + g * Tg); weights.append(w[keep])
        else:
            C = min(Tg, math.ceil(Tg * cf / E - 1e-9))
            w, idx = torch.topk(p.t(), C, dim=1)         # (E, C)
            experts.append(torch.arange(E).unsqueeze(1).expand(E, C).reshape(-1))
            tokens.append(idx.reshape(-1) + g * Tg); weights.append(w.reshape(-1))
    return torch.cat(experts), torch.cat(tokens), torch.cat(weights)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--router", default="token_choice")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    cf = a.capacity_factor if a.capacity_factor is not None else (2.0 if a.router == "expert_choice" else 1.25)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T, d, F, E = a.tokens, a.d_model, a.d_ff, a.experts
    x = torch.randn(T, d, requires_grad=True)
    dy = torch.randn(T, d)
    wg = (torch.randn(E, d) / math.sqrt(d)).requires_grad_()
    w1 = (torch.randn(E, F, d) / math.sqrt(d)).requires_grad_()
    b1 = (0.1 * torch.randn(E, F)).requires_grad_()
    w2 = (torch.randn(E, d, F) / math.sqrt(F)).requires_grad_()
    b2 = (0.1 * torch.randn(E, d)).requires_grad_()

    def step():
        logits = x @ wg.t()
        probs = torch.softmax(logits, dim=1)
        with torch.no_grad():
            e_idx, t_idx, _ = route(probs.detach(), a.top_k, cf, a.router, a.groups)
            order = torch.argsort(e_idx, stable=True)
            e_idx, t_idx = e_idx[order], t_idx[order]
            counts = torch.bincount(e_idx, minlength=E).tolist()
        if a.router == "token_choice" and a.top_k > 1:
            top = torch.topk(probs, a.top_k, dim=1).values.sum(dim=1)
            gate = probs[t_idx, e_idx] / top[t_idx]
        else:
            gate = probs[t_idx, e_idx]
        xs = x.index_select(0, t_idx)
        outs, start = [], 0
        for e in range(E):
            n = counts[e]
            if n:
                h = Fn.gelu(torch.addmm(b1[e], xs[start:start + n], w1[e].t()), approximate="tanh")
                outs.append(torch.addmm(b2[e], h, w2[e].t()))
            start += n
        ys = torch.cat(outs) * gate[:, None]
        y = torch.zeros(T, d).index_add_(0, t_idx, ys)
        y.backward(dy)
        for t in (x, wg, w1, b1, w2, b2):
            t.grad = None

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    dt = (time.perf_counter() - t0) / a.iters
    print(json.dumps({"tokens_per_s": T / dt, "ms_per_iter": 1e3 * dt}))


if __name__ == "__main__":
    main()
