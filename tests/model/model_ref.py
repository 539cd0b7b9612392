#!/usr/bin/python3
"""Independent PyTorch (float64) reference of the moerun model (docs/formats.md section 1,
docs/routing.md) and its AdamW training step (docs: train.h), checked against the C
implementation.

Runs the C exporter (tests/model/model_export.c) for a variant, reads the
weights, batch and C results it wrote, recomputes everything here from the
specification and checks: logits, loss, every gradient (1e-4 relative to the
tensor's largest entry), the losses of the first 5 AdamW steps (1e-4
relative) and the per-expert update counts.

Variant gpt2 is tc at GPT-2's vocabulary (50257 ids, a batch of text encoded with
the gpt2 tokenizer given by --tokenizer): the same checks, the logits over 50257
columns and the gradient of every row of the [50257, d] embedding included.

Usage: model_ref.py --exe PATH/model_export --variant tc|ec|k1 [--out FILE]
       model_ref.py --exe PATH/model_export --variant gpt2 --tokenizer gpt2.json [--out FILE]
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
GELU, RELU, SWIGLU = 0, 1, 2
FLOAT_KEYS = {"capacity_factor", "ln_eps", "aux_loss_coef", "z_loss_coef", "lr", "min_lr_frac",
              "weight_decay", "grad_clip", "beta1", "beta2", "adam_eps"}


def ceil_tol(x):
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else int(math.ceil(x))


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def act(h, kind, d_ff):
    if kind == GELU:
        return F.gelu(h, approximate="tanh")
    if kind == RELU:
        return F.relu(h)
    return F.silu(h[..., :d_ff]) * h[..., d_ff:]


def ffn(x, w1, b1, w2, b2, cfg):
    return act(x @ w1.T + b1, cfg["activation"], cfg["d_ff"]) @ w2.T + b2


def moe(x, P, l, cfg, stats):
    """x (N, d): routing per group of group_seqs*T tokens (docs/routing.md)."""
    E, k = cfg["n_experts"], cfg["top_k"]
    Tg = cfg["group_seqs"] * cfg["T"]
    pre = f"h/{l}/moe/"
    wg = P[pre + "router/weight"]
    out, lbs, zs = [], [], []
    kept_count = torch.zeros(E, dtype=torch.int64)
    for g0 in range(0, x.shape[0], Tg):
        xg = x[g0:g0 + Tg]
        logits = xg @ wg.T
        prob = torch.softmax(logits, -1)
        zs.append((torch.logsumexp(logits, -1) ** 2).mean())
        pd = prob.detach()
        kept = torch.zeros(Tg, E)
        if cfg["expert_choice"]:
            C = min(Tg, ceil_tol(Tg * cfg["capacity_factor"] / E))
            for e in range(E):
                idx = torch.sort(pd[:, e], descending=True, stable=True).indices[:C]
                kept[idx, e] = 1
            w = prob * kept
            lbs.append(torch.zeros(()))
        else:
            order = torch.sort(pd, dim=1, descending=True, stable=True).indices[:, :k]
            sel = torch.zeros(Tg, E)
            sel[torch.arange(Tg)[:, None], order] = 1
            cf = cfg["capacity_factor"]
            cap = ceil_tol(k * Tg * cf / E) if cf > 0 else Tg * k
            cnt = [0] * E
            for r in range(k):
                for t in range(Tg):
                    e = int(order[t, r])
                    if cnt[e] < cap:
                        kept[t, e] = 1
                        cnt[e] += 1
            w = prob * sel
            if cfg["normalize_topk"] and k > 1:
                w = w / w.sum(-1, keepdim=True)
            w = w * kept
            f = sel.sum(0) / (Tg * k)
            lbs.append(E * (f * prob.mean(0)).sum())
        kept_count += kept.sum(0).to(torch.int64)
        y = torch.zeros_like(xg)
        for e in range(E):
            rows = kept[:, e].nonzero().flatten()
            if len(rows) == 0:
                continue
            fe = ffn(xg[rows], P[pre + "experts/w1"][e], P[pre + "experts/b1"][e],
                     P[pre + "experts/w2"][e], P[pre + "experts/b2"][e], cfg)
            y = y.index_add(0, rows, w[rows, e:e + 1] * fe)
        out.append(y)
    stats["lb"] += lbs
    stats["z"] += zs
    stats["kept"].append(kept_count)
    return torch.cat(out)


def forward(P, inp, tgt, cfg):
    B, T = inp.shape
    d, NH = cfg["d_model"], cfg["n_heads"]
    hs = d // NH
    eps = cfg["ln_eps"]
    x = P["wte"][inp] + P["wpe"][:T]
    stats = {"lb": [], "z": [], "kept": []}
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(cfg["n_layers"]):
        p = lambda n: P[f"h/{l}/{n}"]
        h = layernorm(x, p("ln_1/weight"), p("ln_1/bias"), eps)
        q, k, v = (h @ p("attn/c_attn/weight").T + p("attn/c_attn/bias")).split(d, -1)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), -1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + y @ p("attn/c_proj/weight").T + p("attn/c_proj/bias")
        h = layernorm(x, p("ln_2/weight"), p("ln_2/bias"), eps)
        if l % cfg["moe_every"] == 0:
            y = moe(h.reshape(B * T, d), P, l, cfg, stats).view(B, T, d)
        else:
            y = ffn(h, p("mlp/c_fc/weight"), p("mlp/c_fc/bias"), p("mlp/c_proj/weight"),
                    p("mlp/c_proj/bias"), cfg)
        x = x + y
    x = layernorm(x, P["ln_f/weight"], P["ln_f/bias"], eps)
    logits = x @ P["wte"].T
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))
    loss = ce
    if stats["lb"]:
        loss = loss + cfg["aux_loss_coef"] * torch.stack(stats["lb"]).mean() \
            + cfg["z_loss_coef"] * torch.stack(stats["z"]).mean()
    return logits, ce, loss, stats


def decays(name, t):
    return t.dim() >= 2 and not name.endswith(("experts/b1", "experts/b2"))


def lr_at(cfg, step):
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    lo = cfg["lr"] * cfg["min_lr_frac"]
    span = cfg["steps"] - cfg["warmup_steps"]
    prog = min(1.0, (step - cfg["warmup_steps"]) / span) if span > 0 else 1.0
    return lo + 0.5 * (cfg["lr"] - lo) * (1 + math.cos(math.pi * prog))


def train(P, inp, tgt, cfg, n_steps):
    """AdamW with global-norm clipping; an expert with no kept assignment is
    not touched and its own step counter does not advance."""
    P = {n: t.detach().clone().requires_grad_(True) for n, t in P.items()}
    m = {n: torch.zeros_like(t) for n, t in P.items()}
    v = {n: torch.zeros_like(t) for n, t in P.items()}
    moe_blocks = [l for l in range(cfg["n_layers"]) if l % cfg["moe_every"] == 0]
    E = cfg["n_experts"]
    esteps = {l: torch.zeros(E, dtype=torch.int64) for l in moe_blocks}
    b1, b2, eps, wd = cfg["beta1"], cfg["beta2"], cfg["adam_eps"], cfg["weight_decay"]
    losses = []
    for step in range(n_steps):
        for t in P.values():
            t.grad = None
        _, _, loss, stats = forward(P, inp, tgt, cfg)
        loss.backward()
        losses.append(loss.item())
        norm = math.sqrt(sum(float((t.grad ** 2).sum()) for t in P.values()))
        scale = cfg["grad_clip"] / norm if cfg["grad_clip"] > 0 and norm > cfg["grad_clip"] else 1.0
        lr = lr_at(cfg, step)
        active = {l: stats["kept"][i] > 0 for i, l in enumerate(moe_blocks)}
        with torch.no_grad():
            for n, p in P.items():
                g = p.grad * scale
                upd = torch.ones(p.shape[0], dtype=torch.bool)
                t = torch.full((p.shape[0],), step + 1, dtype=torch.float64)
                if "/moe/experts/" in n:
                    l = int(n.split("/")[1])
                    upd = active[l]
                    t = (esteps[l] + 1).to(torch.float64)
                shape = (-1,) + (1,) * (p.dim() - 1)
                upd, t = upd.view(shape), t.view(shape)
                mn = b1 * m[n] + (1 - b1) * g
                vn = b2 * v[n] + (1 - b2) * g * g
                mhat, vhat = mn / (1 - b1 ** t), vn / (1 - b2 ** t)
                pn = p - lr * (mhat / (vhat.sqrt() + eps) + (wd * p if decays(n, p) else 0))
                p.copy_(torch.where(upd, pn, p))
                m[n].copy_(torch.where(upd, mn, m[n]))
                v[n].copy_(torch.where(upd, vn, v[n]))
            for l in moe_blocks:
                esteps[l] += active[l].to(torch.int64)
    return losses, torch.stack([esteps[l] for l in moe_blocks])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--out")
    ap.add_argument("--tokenizer", help="the gpt2 tokenizer file (variant gpt2)")
    a = ap.parse_args()
    out = a.out or os.path.join(tempfile.mkdtemp(prefix="moe_model_ref_"), f"{a.variant}.h5")
    if a.variant == "gpt2" and not (a.tokenizer and os.path.isfile(a.tokenizer)):
        print(f"FAIL the gpt2 tokenizer file {a.tokenizer!r} is missing (launch/install-deps installs the npm tiktoken)")
        return 1
    subprocess.run([a.exe, out, a.variant] + ([a.tokenizer] if a.variant == "gpt2" else []), check=True)
    failures = []
    worst = {}

    def check(what, err, tol=1e-4):
        key = what.split()[0]
        worst[key] = max(worst.get(key, 0.0), err)
        if not err <= tol:
            failures.append(f"{what}: relative error {err:.3g} > {tol}")

    with h5py.File(out, "r") as f:
        cfg = {k: float(v) if k in FLOAT_KEYS else int(v) for k, v in f["model"].attrs.items()}
        cfg["T"] = cfg["seq_len"]
        names = []
        f["model"].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        P = {n: torch.tensor(f["model"][n][()], dtype=torch.float64, requires_grad=True) for n in names}
        inp = torch.tensor(f["batch/inputs"][()], dtype=torch.int64)
        tgt = torch.tensor(f["batch/targets"][()], dtype=torch.int64)
        if a.variant == "gpt2":
            V = cfg["vocab_size"]
            if V != 50257 or int(inp.max()) != V - 1 or int(tgt.max()) != V - 1 or len(set(inp.flatten().tolist())) < 30:
                failures.append(f"gpt2 batch: vocab {V}, ids up to {int(inp.max())}: not GPT-2 text with <|endoftext|>")
        logits, ce, loss, stats = forward(P, inp, tgt, cfg)
        loss.backward()
        check("logits", rel(f["out/logits"][()], logits.detach().numpy()))
        check("ce", rel(f["out/ce"][()], [ce.item()]))
        check("loss", rel(f["out/loss"][()], [loss.item()]))
        grads = []
        f["grad"].visititems(lambda n, o: grads.append(n) if isinstance(o, h5py.Dataset) else None)
        if sorted(grads) != sorted(names):
            failures.append(f"gradient names {sorted(set(grads) ^ set(names))} differ from the weights")
        for n in names:
            ref = P[n].grad.numpy()
            if not np.any(ref):  # an idle expert's gradient must be exactly zero in C too
                if np.any(f["grad"][n][()] != 0):
                    failures.append(f"grad {n}: reference is zero, C is not")
                continue
            check(f"grad {n}", rel(f["grad"][n][()], ref))
        losses, esteps = train({n: t.detach() for n, t in P.items()}, inp, tgt, cfg,
                               len(f["out/step_losses"]))
        check("step losses", rel(f["out/step_losses"][()], losses))
        if not np.array_equal(f["out/expert_steps"][()], esteps.numpy()):
            failures.append(f"expert steps C {f['out/expert_steps'][()].tolist()} != ref {esteps.tolist()}")
        print(f"variant {a.variant}: loss C {f['out/loss'][0]:.6f} ref {loss.item():.6f}; "
              f"step losses C {np.round(f['out/step_losses'][()], 6).tolist()}; expert steps {esteps.tolist()}")
        print("largest relative errors:", {k: f"{v:.2g}" for k, v in worst.items()})
    for msg in failures:
        print("FAIL", msg)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
