#!/usr/bin/python3
"""Independent PyTorch (float64) reference of the moerun model (docs/formats.md section 1,
docs/routing.md) and its AdamW training step (docs: train.h), checked against the C
implementation.

Runs the C exporter (tests/model/model_export.c) for a variant, reads the
weights, batch and C results it wrote, recomputes everything here from the
specification and checks: logits, loss, every gradient (1e-4 relative to the
tensor's largest entry), the losses of the first 5 AdamW steps (1e-4
relative) and the per-expert update counts.

The architecture options (docs/training.md; models.md and routing.md
section 8) are written here from their definitions: RMSNorm, RoPE
(rotate_half), grouped-query attention with any head size, q/k norms over a
whole projection or per head, optional biases, an untied head, sigmoid
scores, route_scale, the expert bias (selection only; updated after each
step from the loads), group-limited routing, the per-sequence and no
balance loss, and gated shared experts.

Variant vx has the vocabulary-expert head (docs/vocab-experts.md: router
q = softmax(W_r h + b_r), expert m's softmax over its own tokens, the exact
loss -log q_{m*} - log p_{m*}(y), untied from wte), computed here from the
whole W_out with the partition applied as a gather: it also checks the
per-position losses, the head's input h and dL/dh, the top-K distributions
P_K for K = 1, 2, M, the vocabulary experts' update counts, and that the
expert no position targets keeps its weights bit for bit and its moments at
zero through the 5 steps.

Variant gpt2 is tc at GPT-2's vocabulary (50257 ids, a batch of text encoded with
the gpt2 tokenizer given by --tokenizer): the same checks, the logits over 50257
columns and the gradient of every row of the [50257, d] embedding included.

Usage: model_ref.py --exe PATH/model_export --variant tc|ec|k1|arch1|arch2|arch3|vx [--out FILE]
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
              "weight_decay", "grad_clip", "beta1", "beta2", "adam_eps", "rope_theta", "route_scale",
              "bias_update_rate"}
RMSNORM, ROPE, QK_FULL, QK_HEAD, SIGMOID, AUX_SEQ, AUX_NONE = 1, 1, 1, 2, 1, 1, 2


def ceil_tol(x):
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else int(math.ceil(x))


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def norm(x, P, name, cfg):
    if cfg["norm"] == RMSNORM:
        return rmsnorm(x, P[name + "/weight"], cfg["ln_eps"])
    return layernorm(x, P[name + "/weight"], P[name + "/bias"], cfg["ln_eps"])


def rope(x, theta):
    """x (B, heads, T, D): Llama's rotate_half, element i with i + D/2 at
    angle pos * theta^(-2i/D)."""
    T, D = x.shape[-2], x.shape[-1]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * torch.arange(D // 2) / D)
    c, s = torch.cos(ang), torch.sin(ang)
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def lin(x, P, name):
    """x W^T (+ b when the model has that bias)."""
    y = x @ P[name + "/weight"].T
    return y + P[name + "/bias"] if name + "/bias" in P else y


def act(h, kind, d_ff):
    if kind == GELU:
        return F.gelu(h, approximate="tanh")
    if kind == RELU:
        return F.relu(h)
    return F.silu(h[..., :d_ff]) * h[..., d_ff:]


def ffn(x, w1, b1, w2, b2, cfg, F=None):
    h = x @ w1.T + (b1 if b1 is not None else 0)
    return act(h, cfg["activation"], F or cfg["d_ff"]) @ w2.T + (b2 if b2 is not None else 0)


def balance(sel, s, E, k, cfg):
    """Load balance of one routing group: switch (section 5, s in place of p)
    or seq (per sequence, s normalised per token, averaged), or none."""
    if cfg["aux_loss"] == AUX_NONE:
        return torch.zeros(())
    if cfg["aux_loss"] != AUX_SEQ:
        return E * (sel.sum(0) / (sel.shape[0] * k) * s.mean(0)).sum()
    Q = cfg["group_seqs"]
    Ts = sel.shape[0] // Q
    sn = s / s.sum(-1, keepdim=True)
    return torch.stack([E * (sel[q * Ts:(q + 1) * Ts].sum(0) / (Ts * k) * sn[q * Ts:(q + 1) * Ts].mean(0)).sum()
                        for q in range(Q)]).mean()


def ranking(sd, b, cfg):
    """What token choice ranks: s + b, -inf outside each token's kept groups
    (a group's score is the sum of its two largest s + b; the topk_groups
    best kept, ties to the lower index)."""
    v = sd + (b if b is not None else 0)
    G, M = cfg["n_groups"], cfg["topk_groups"]
    if M >= G:
        return v
    gs = v.shape[1] // G
    grouped = v.view(-1, G, gs)
    top = torch.sort(grouped, dim=-1, descending=True).values
    gscore = top[..., 0] + (top[..., 1] if gs > 1 else 0)
    keep = torch.zeros_like(gscore, dtype=torch.bool)
    order = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :M]
    keep[torch.arange(v.shape[0])[:, None], order] = True
    return torch.where(keep[..., None], grouped, torch.tensor(float("-inf"))).view_as(v)


def moe(x, P, l, cfg, stats):
    """x (N, d): routing per group of group_seqs*T tokens (docs/routing.md)."""
    E, k = cfg["n_experts"], cfg["top_k"]
    Tg = cfg["group_seqs"] * cfg["T"]
    pre = f"h/{l}/moe/"
    wg = P[pre + "router/weight"]
    bias = P.get(pre + "router/expert_bias")
    bias = bias.detach() if bias is not None else None
    scale = cfg["route_scale"]
    get = lambda n, e: P[pre + n][e] if pre + n in P else None
    out, lbs, zs = [], [], []
    kept_count = torch.zeros(E, dtype=torch.int64)
    sel_count = torch.zeros(E, dtype=torch.int64)
    for g0 in range(0, x.shape[0], Tg):
        xg = x[g0:g0 + Tg]
        logits = xg @ wg.T
        prob = torch.sigmoid(logits) if cfg["score"] == SIGMOID else torch.softmax(logits, -1)
        zs.append((torch.logsumexp(logits, -1) ** 2).mean())
        pd = prob.detach()
        kept = torch.zeros(Tg, E)
        if cfg["expert_choice"]:
            C = min(Tg, ceil_tol(Tg * cfg["capacity_factor"] / E))
            for e in range(E):
                idx = torch.sort(pd[:, e], descending=True, stable=True).indices[:C]
                kept[idx, e] = 1
            w = prob * kept * scale
            lbs.append(torch.zeros(()))
            sel = kept
        else:
            order = torch.sort(ranking(pd, bias, cfg), dim=1, descending=True, stable=True).indices[:, :k]
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
            w = w * kept * scale
            lbs.append(balance(sel, prob, E, k, cfg))
        kept_count += kept.sum(0).to(torch.int64)
        sel_count += sel.sum(0).to(torch.int64)
        y = torch.zeros_like(xg)
        for e in range(E):
            rows = kept[:, e].nonzero().flatten()
            if len(rows) == 0:
                continue
            fe = ffn(xg[rows], P[pre + "experts/w1"][e], get("experts/b1", e),
                     P[pre + "experts/w2"][e], get("experts/b2", e), cfg)
            y = y.index_add(0, rows, w[rows, e:e + 1] * fe)
        if cfg["n_shared"]:
            sh = sum(ffn(xg, P[pre + "shared/w1"][j], get("shared/b1", j), P[pre + "shared/w2"][j],
                         get("shared/b2", j), cfg, cfg["d_ff_shared"]) for j in range(cfg["n_shared"]))
            if cfg["shared_gate"]:
                sh = sh * torch.sigmoid(xg @ P[pre + "shared/gate"].T)
            y = y + sh
        out.append(y)
    stats["lb"] += lbs
    stats["z"] += zs
    stats["kept"].append(kept_count)
    stats["selected"].append(sel_count)
    return torch.cat(out)


def attention(h, P, l, cfg, B, T):
    """Causal attention with NKV kv heads of head_dim D (q head i reads kv
    head i // (H/NKV)), q/k norms before RoPE."""
    H, NKV, D = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    p = f"h/{l}/attn/"
    qkv = lin(h, P, p + "c_attn")
    q, k, v = qkv.split([H * D, NKV * D, NKV * D], -1)
    if cfg["qk_norm"] == QK_FULL:
        q = rmsnorm(q, P[p + "q_norm/weight"], cfg["ln_eps"])
        k = rmsnorm(k, P[p + "k_norm/weight"], cfg["ln_eps"])
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, NKV, D).transpose(1, 2)
    v = v.view(B, T, NKV, D).transpose(1, 2)
    if cfg["qk_norm"] == QK_HEAD:
        q = rmsnorm(q, P[p + "q_norm/weight"], cfg["ln_eps"])
        k = rmsnorm(k, P[p + "k_norm/weight"], cfg["ln_eps"])
    if cfg["pos"] == ROPE:
        q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    k = torch.repeat_interleave(k, H // NKV, dim=1)
    v = torch.repeat_interleave(v, H // NKV, dim=1)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = torch.softmax(att.masked_fill(~mask, float("-inf")), -1)
    y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    return lin(y, P, p + "c_proj")


def vocab_logp(h, P, assign, M):
    """log P(v | h) for every token v (N, V), and log q (N, M)."""
    lq = torch.log_softmax(h @ P["vocab_head/router/weight"].T + P["vocab_head/router/bias"], -1)
    z = h @ P["vocab_head/weight"].T + P["vocab_head/bias"]
    lse = torch.stack([torch.logsumexp(z[:, assign == m], -1) for m in range(M)], -1)
    return lq[:, assign] + z - lse[:, assign], lq


def topk_dist(h, P, assign, M, K):
    """P_K (N, V): P renormalised over the K experts with the largest q (ties to the lower index)."""
    logp, lq = vocab_logp(h, P, assign, M)
    q = lq.exp()
    sel = torch.sort(q, dim=1, descending=True, stable=True).indices[:, :K]
    keep = torch.zeros_like(q, dtype=torch.bool)
    keep[torch.arange(q.shape[0])[:, None], sel] = True
    denom = (q * keep).sum(-1, keepdim=True)
    return torch.where(keep[:, assign], logp.exp() / denom, torch.zeros_like(logp))


def forward(P, inp, tgt, cfg):
    B, T = inp.shape
    d = cfg["d_model"]
    x = P["wte"][inp] + (P["wpe"][:T] if cfg["pos"] != ROPE else 0)
    stats = {"lb": [], "z": [], "kept": [], "selected": []}
    for l in range(cfg["n_layers"]):
        p = lambda n: P.get(f"h/{l}/{n}")
        x = x + attention(norm(x, P, f"h/{l}/ln_1", cfg), P, l, cfg, B, T)
        h = norm(x, P, f"h/{l}/ln_2", cfg)
        if l % cfg["moe_every"] == 0:
            y = moe(h.reshape(B * T, d), P, l, cfg, stats).view(B, T, d)
        else:
            y = ffn(h, p("mlp/c_fc/weight"), p("mlp/c_fc/bias"), p("mlp/c_proj/weight"),
                    p("mlp/c_proj/bias"), cfg)
        x = x + y
    x = norm(x, P, "ln_f", cfg)
    stats["h"] = x
    if cfg.get("vocab_experts", 0):
        logp, _ = vocab_logp(x.view(B * T, d), P, cfg["assign"], cfg["vocab_experts"])
        stats["losses"] = -logp.gather(1, tgt.reshape(-1, 1)).view(B, T)
        stats["vocab_targets"] = torch.bincount(cfg["assign"][tgt.reshape(-1)], minlength=cfg["vocab_experts"])
        logits, ce = None, stats["losses"].mean()
    else:
        logits = x @ (P["wte"] if cfg["tie_embeddings"] else P["lm_head/weight"]).T
        stats["losses"] = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1),
                                          reduction="none").view(B, T)
        ce = stats["losses"].mean()
    loss = ce
    if stats["lb"]:
        loss = loss + cfg["aux_loss_coef"] * torch.stack(stats["lb"]).mean() \
            + cfg["z_loss_coef"] * torch.stack(stats["z"]).mean()
    return logits, ce, loss, stats


def decays(name, t):
    return t.dim() >= 2 and not name.endswith(("/b1", "/b2"))


BUFFERS = ("router/expert_bias",)  # checkpointed, not trained by gradient


def is_buffer(name):
    return name.endswith(BUFFERS)


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
    P = {n: t.detach().clone().requires_grad_(not is_buffer(n)) for n, t in P.items()}
    m = {n: torch.zeros_like(t) for n, t in P.items()}
    v = {n: torch.zeros_like(t) for n, t in P.items()}
    moe_blocks = [l for l in range(cfg["n_layers"]) if l % cfg["moe_every"] == 0]
    E, M = cfg["n_experts"], cfg.get("vocab_experts", 0)
    esteps = {l: torch.zeros(E, dtype=torch.int64) for l in moe_blocks}
    vsteps = torch.zeros(M, dtype=torch.int64)
    b1, b2, eps, wd = cfg["beta1"], cfg["beta2"], cfg["adam_eps"], cfg["weight_decay"]
    losses = []
    for step in range(n_steps):
        for t in P.values():
            t.grad = None
        _, _, loss, stats = forward(P, inp, tgt, cfg)
        loss.backward()
        losses.append(loss.item())
        gnorm = math.sqrt(sum(float((t.grad ** 2).sum()) for n, t in P.items() if not is_buffer(n)))
        scale = cfg["grad_clip"] / gnorm if cfg["grad_clip"] > 0 and gnorm > cfg["grad_clip"] else 1.0
        lr = lr_at(cfg, step)
        active = {l: stats["kept"][i] > 0 for i, l in enumerate(moe_blocks)}
        vactive = stats["vocab_targets"] > 0 if M else None
        with torch.no_grad():
            for n, p in P.items():
                if is_buffer(n):
                    # expert bias: b_e += rate * sign(mean load - load_e), loads = selections before drops
                    li = moe_blocks.index(int(n.split("/")[1]))
                    cnt = stats["selected"][li].to(torch.float64)
                    p += cfg["bias_update_rate"] * torch.sign(cnt.mean() - cnt)
                    continue
                g = p.grad * scale
                upd = torch.ones(p.shape[0], dtype=torch.bool)
                t = torch.full((p.shape[0],), step + 1, dtype=torch.float64)
                if "/moe/experts/" in n:
                    l = int(n.split("/")[1])
                    upd = active[l]
                    t = (esteps[l] + 1).to(torch.float64)
                elif n in ("vocab_head/weight", "vocab_head/bias"):
                    # rows by token id: each row is its expert's
                    upd = vactive[cfg["assign"]]
                    t = (vsteps + 1).to(torch.float64)[cfg["assign"]]
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
            if M:
                vsteps += vactive.to(torch.int64)
    return losses, torch.stack([esteps[l] for l in moe_blocks]), vsteps, P


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
        M = cfg.get("vocab_experts", 0)
        if M:  # the partition is an integer buffer, not a parameter
            names.remove("vocab_head/assign")
            cfg["assign"] = torch.tensor(f["model/vocab_head/assign"][()], dtype=torch.int64)
        P = {n: torch.tensor(f["model"][n][()], dtype=torch.float64, requires_grad=not is_buffer(n)) for n in names}
        inp = torch.tensor(f["batch/inputs"][()], dtype=torch.int64)
        tgt = torch.tensor(f["batch/targets"][()], dtype=torch.int64)
        if a.variant == "gpt2":
            V = cfg["vocab_size"]
            if V != 50257 or int(inp.max()) != V - 1 or int(tgt.max()) != V - 1 or len(set(inp.flatten().tolist())) < 30:
                failures.append(f"gpt2 batch: vocab {V}, ids up to {int(inp.max())}: not GPT-2 text with <|endoftext|>")
        logits, ce, loss, stats = forward(P, inp, tgt, cfg)
        stats["h"].retain_grad()
        loss.backward()
        if logits is not None:
            check("logits", rel(f["out/logits"][()], logits.detach().numpy()))
        check("losses", rel(f["out/losses"][()], stats["losses"].detach().numpy()))
        check("h", rel(f["out/h"][()], stats["h"].detach().numpy()))
        check("dh", rel(f["out/dh"][()], stats["h"].grad.numpy()))
        if M:
            B, T = inp.shape
            h = stats["h"].detach().view(B * T, -1)
            for K in (1, 2, M):
                ref = topk_dist(h, P, cfg["assign"], M, K).view(B, T, -1).detach().numpy()
                check(f"top-{K} distribution", rel(f[f"out/topk/{K}"][()], ref))
        check("ce", rel(f["out/ce"][()], [ce.item()]))
        check("loss", rel(f["out/loss"][()], [loss.item()]))
        grads = []
        f["grad"].visititems(lambda n, o: grads.append(n) if isinstance(o, h5py.Dataset) else None)
        if sorted(grads) != sorted(names):
            failures.append(f"gradient names {sorted(set(grads) ^ set(names))} differ from the weights")
        for n in names:
            if is_buffer(n):  # no gradient: C's must be exactly zero
                if np.any(f["grad"][n][()] != 0):
                    failures.append(f"grad {n}: a buffer has a non-zero gradient")
                continue
            ref = P[n].grad.numpy()
            if not np.any(ref):  # an idle expert's gradient must be exactly zero in C too
                if np.any(f["grad"][n][()] != 0):
                    failures.append(f"grad {n}: reference is zero, C is not")
                continue
            check(f"grad {n}", rel(f["grad"][n][()], ref))
        losses, esteps, vsteps, Pn = train({n: t.detach() for n, t in P.items()}, inp, tgt, cfg,
                                           len(f["out/step_losses"]))
        check("step losses", rel(f["out/step_losses"][()], losses))
        if "out/expert_bias" in f:
            for l, ds in f["out/expert_bias"].items():
                check(f"expert_bias {l}", rel(ds[()], Pn[f"h/{l}/moe/router/expert_bias"].detach().numpy()), 1e-6)
        if not np.array_equal(f["out/expert_steps"][()], esteps.numpy()):
            failures.append(f"expert steps C {f['out/expert_steps'][()].tolist()} != ref {esteps.tolist()}")
        if M:
            if not np.array_equal(f["out/vocab_steps"][()], vsteps.numpy()):
                failures.append(f"vocabulary expert steps C {f['out/vocab_steps'][()].tolist()} != "
                                f"ref {vsteps.tolist()}")
            # the expert no position targets: weights bit for bit, moments zero
            idle = (cfg["assign"] == M - 1).numpy()
            if vsteps[M - 1] != 0:
                failures.append(f"vocabulary expert {M - 1} should be idle, took {int(vsteps[M - 1])} steps")
            for n in ("vocab_head/weight", "vocab_head/bias"):
                if not np.array_equal(f["after"][n][()][idle], f["model"][n][()][idle]):
                    failures.append(f"{n}: rows of the idle vocabulary expert changed")
                if np.any(f["after_m"][n][()][idle] != 0):
                    failures.append(f"{n}: moments of the idle vocabulary expert are not zero")
        print(f"variant {a.variant}: loss C {f['out/loss'][0]:.6f} ref {loss.item():.6f}; "
              f"step losses C {np.round(f['out/step_losses'][()], 6).tolist()}; expert steps {esteps.tolist()}"
              + (f"; vocabulary expert steps {vsteps.tolist()}" if M else ""))
        print("largest relative errors:", {k: f"{v:.2g}" for k, v in worst.items()})
    for msg in failures:
        print("FAIL", msg)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
