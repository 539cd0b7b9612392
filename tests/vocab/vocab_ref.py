#!/usr/bin/python3
"""Independent PyTorch (float64) reference of the vocabulary-expert head
(docs/vocab-experts.md), checked against the C implementation.

Runs the C exporter (tests/vocab/vocab_export.c), reads the inputs and the C
results it wrote (rows by token id, as checkpoints store them), recomputes
everything here from the definitions with no knowledge of moerun's layout or
grouping, and checks:
  - per-position loss -log q_{m*} - log p_{m*}(y), equal to -log P(y | h) of
    the exact model, which sums to 1 over the vocabulary;
  - dh and every parameter gradient of the mean loss (autograd); rows of an
    expert that no position targets are exactly zero in C;
  - the top-K lists for K = 1, 2, M: exactly the tokens of the K experts with
    the largest q (ties to the lower index), in increasing id, with P_K;
    K = M is the exact model; coverage;
  - 3 AdamW steps (bias correction, decoupled weight decay on matrices) with
    different targets per step: the parameters after each step, the
    per-expert step counts, and bitwise-unchanged weights and moments of
    the experts idle in a step.
Tolerance: 1e-4 relative to the largest entry of each tensor (the largest
errors seen are printed).
Usage: vocab_ref.py --exe PATH/vocab_export [--out FILE]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

torch.set_default_dtype(torch.float64)
PARAMS = ("router_w", "router_b", "weight", "bias")


def head_loss(P, h, targets, assign):
    """Per-position loss of the factorised head, from the definitions."""
    q_logits = h @ P["router_w"].T + P["router_b"]
    log_q = torch.log_softmax(q_logits, -1)
    out = []
    for n in range(h.shape[0]):
        y = int(targets[n])
        e = int(assign[y])
        S = (assign == e).nonzero().flatten()  # ascending ids
        z = h[n] @ P["weight"][S].T + P["bias"][S]
        iy = int((S == y).nonzero()[0, 0])
        out.append(-log_q[n, e] - torch.log_softmax(z, -1)[iy])
    return torch.stack(out)


def exact_model(P, h, assign):
    """P(v | h) = q_{assign v} p_{assign v}(v), dense (N, V)."""
    q = torch.softmax(h @ P["router_w"].T + P["router_b"], -1)
    V = assign.shape[0]
    out = torch.zeros(h.shape[0], V)
    for e in range(q.shape[1]):
        S = (assign == e).nonzero().flatten()
        p = torch.softmax(h @ P["weight"][S].T + P["bias"][S], -1)
        out[:, S] = q[:, e:e + 1] * p
    return out, q


def topk_model(P, h, assign, K):
    full, q = exact_model(P, h, assign)
    # the K largest q, ties to the lower index: a stable descending sort
    order = torch.sort(q, dim=1, descending=True, stable=True).indices[:, :K]
    chosen = torch.zeros_like(q, dtype=torch.bool)
    chosen[torch.arange(q.shape[0])[:, None], order] = True
    mask = chosen[:, assign]  # (N, V): token v's expert is chosen
    denom = (q * chosen).sum(-1, keepdim=True)
    return torch.where(mask, full / denom, torch.zeros_like(full)), chosen


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    out = a.out or os.path.join(tempfile.mkdtemp(prefix="moe_vocab_ref_"), "vocab.h5")
    subprocess.run([a.exe, out], check=True)
    failures, worst = [], {}

    def check(what, err, tol=1e-4):
        key = what.split()[0]
        worst[key] = max(worst.get(key, 0.0), err)
        if not err <= tol:
            failures.append(f"{what}: relative error {err:.3g} > {tol}")

    with h5py.File(out, "r") as f:
        I = f["inputs"]
        h = torch.tensor(I["h"][()], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(I["targets"][()], dtype=torch.int64)
        assign = torch.tensor(I["assign"][()], dtype=torch.int64)
        P0 = {k: torch.tensor(I[k][()], dtype=torch.float64) for k in PARAMS}
        P = {k: t.clone().requires_grad_(True) for k, t in P0.items()}
        N, V, M = h.shape[0], assign.shape[0], P0["router_b"].shape[0]
        lr, b1, b2, eps, wd = (float(x) for x in I["adamw"][()])

        # loss and gradients
        loss = head_loss(P, h, targets, assign)
        loss.mean().backward()
        check("loss", rel(f["out/loss"][()], loss.detach().numpy()))
        check("dh", rel(f["out/dh"][()], h.grad.numpy()))
        for k in PARAMS:
            check(f"grad {k}", rel(f["out/grad"][k][()], P[k].grad.numpy()))
        # rows of experts no position targets: zero in C, bit for bit
        hit = torch.zeros(M, dtype=torch.bool)
        hit[assign[targets]] = True
        idle_rows = ~hit[assign]
        if not idle_rows.any():
            failures.append("the exported problem has no idle expert")
        for k in ("weight", "bias"):
            if np.any(f["out/grad"][k][()][idle_rows.numpy()] != 0):
                failures.append(f"grad {k}: rows of idle experts are not exactly zero")
        counts = torch.bincount(assign[targets], minlength=M).numpy()
        if not np.array_equal(f["out/activated"][()], counts):
            failures.append(f"activated {f['out/activated'][()].tolist()} != {counts.tolist()}")

        with torch.no_grad():
            full, q = exact_model(P0, h.detach(), assign)
            if float((full.sum(-1) - 1).abs().max()) > 1e-12:
                failures.append("the exact model does not sum to 1")
            nll = -torch.log(full[torch.arange(N), targets])
            check("model", rel(nll.numpy(), loss.detach().numpy()), 1e-12)  # -log P(y|h) = factorised loss
            for K in (1, 2, M):
                g = f[f"out/topk/{K}"]
                ref, chosen = topk_model(P0, h.detach(), assign, K)
                ids, logp, cnt = g["ids"][()], g["logp"][()], g["count"][()]
                dense = np.zeros((N, V))
                for n in range(N):
                    row = ids[n, :cnt[n]]
                    want = (ref[n] > 0).nonzero().flatten().numpy()
                    if not np.array_equal(row, want):
                        failures.append(f"top-{K} position {n}: candidates differ from the chosen experts' tokens")
                        break
                    dense[n, row] = np.exp(logp[n, :cnt[n]].astype(np.float64))
                check(f"topk{K}", rel(dense, ref.numpy()))
                if K == M:
                    check("topkM=model", rel(dense, full.numpy()))
                covered = int(chosen[torch.arange(N), assign[targets]].sum())
                if int(g["coverage"][0]) != covered:
                    failures.append(f"coverage K={K}: C {int(g['coverage'][0])} ref {covered}")

        # AdamW: the router every step, an expert only when it received rows
        Pt = {k: t.clone() for k, t in P0.items()}
        mom = {k: torch.zeros_like(t) for k, t in P0.items()}
        vel = {k: torch.zeros_like(t) for k, t in P0.items()}
        esteps = torch.zeros(M, dtype=torch.int64)
        prev = {w: {k: f["inputs"][k][()] if w == "params" else np.zeros_like(f["inputs"][k][()]) for k in PARAMS}
                for w in ("params", "m", "v")}
        s = 0
        while f"train/step{s}" in f:
            g = f[f"train/step{s}"]
            tg = torch.tensor(g["targets"][()], dtype=torch.int64)
            Pg = {k: t.clone().requires_grad_(True) for k, t in Pt.items()}
            l = head_loss(Pg, h.detach(), tg, assign).mean()
            l.backward()
            check(f"step_loss {s}", abs(float(g["loss"][0]) - l.item()) / l.item())
            active = torch.bincount(assign[tg], minlength=M) > 0
            with torch.no_grad():
                for k in PARAMS:
                    if k.startswith("router"):
                        upd = torch.ones(Pt[k].shape[0], dtype=torch.bool)
                        t = torch.full((Pt[k].shape[0],), float(s + 1))
                    else:  # rows by token id: their expert's flag and step
                        upd = active[assign]
                        t = (esteps[assign] + 1).to(torch.float64)
                    shape = (-1,) + (1,) * (Pt[k].dim() - 1)
                    upd, t = upd.view(shape), t.view(shape)
                    gk = Pg[k].grad
                    mn = b1 * mom[k] + (1 - b1) * gk
                    vn = b2 * vel[k] + (1 - b2) * gk * gk
                    decay = wd * Pt[k] if k in ("router_w", "weight") else 0.0
                    pn = Pt[k] - lr * (mn / (1 - b1 ** t) / ((vn / (1 - b2 ** t)).sqrt() + eps) + decay)
                    Pt[k] = torch.where(upd, pn, Pt[k])
                    mom[k] = torch.where(upd, mn, mom[k])
                    vel[k] = torch.where(upd, vn, vel[k])
                esteps += active.to(torch.int64)
            if not np.array_equal(g["expert_step"][()], esteps.numpy()):
                failures.append(f"step {s}: expert_step C {g['expert_step'][()].tolist()} ref {esteps.tolist()}")
            idle = (~active[assign]).numpy()
            for k in PARAMS:
                check(f"adamw_params {s} {k}", rel(g["params"][k][()], Pt[k].numpy()))
                for w in ("params", "m", "v"):
                    now = g[w][k][()]
                    if k in ("weight", "bias") and not np.array_equal(now[idle], prev[w][k][idle]):
                        failures.append(f"step {s}: {w} {k} of idle experts changed")
                    prev[w][k] = now
            if not idle.any():
                failures.append(f"step {s} has no idle expert")
            s += 1
        if s != 3:
            failures.append(f"{s} AdamW steps in the file, expected 3")

    print(f"vocab head: N {N}, V {V}, M {M}; mean loss C {np.mean(f_loss(out)):.6f} ref {loss.mean().item():.6f}; "
          f"expert steps {esteps.tolist()}")
    print("largest relative errors:", {k: f"{v:.2g}" for k, v in worst.items()})
    for msg in failures:
        print("FAIL", msg)
    return 1 if failures else 0


def f_loss(path):
    with h5py.File(path, "r") as f:
        return f["out/loss"][()]


if __name__ == "__main__":
    sys.exit(main())
