#!/usr/bin/env python3
"""Independent PyTorch (float64) reference for a MoE layer dump.

Reads a `moe bench layer --save` file (docs/formats.md section 2, numbers defined
by docs/routing.md) with h5py and recomputes everything from /x, the weights,
/dy and the root attributes alone:

  logits, probs -> routing decision (token choice top-k, lower index wins
  ties, normalize_topk, per-group capacity with docs/routing.md's rounding rule and
  fill order; or expert choice) -> y -> aux losses (mean over groups) ->
  gradients of  sum(y*dy) + aux_loss_coef*load_balance + z_loss_coef*z_loss
  by torch.autograd with respect to x, the router weight and w1 b1 w2 b2.

The routing is recomputed in float64, never copied from the file; the
file's masks must then be identical. Because the file was produced in
float32, a near-tie (two competing probabilities within --tie-tol of each
other, relative to the larger one) could legitimately make float32 and
float64 choose differently. Near-ties are always listed; if the masks differ
in a group that contains one the verdict is AMBIGUOUS (exit 3), never a
silent pass. A mismatch in a group without near-ties is a FAIL (exit 1).

Error metric (floats): for each tensor, err = max|file - ref| / max(max|ref|,
floor) with floor = 1e-30; expert gradients (dim 0 = expert) are judged per
expert slice with floor = 1e-3 * max|ref| of the whole tensor, so that a
small expert is not hidden behind a large one and a slice tiny compared with
the tensor is judged on an absolute scale. Scalars use |file - ref| /
max(|ref|, 1e-12). Pass if err <= --tol (default 1e-4). Experts that
received no kept assignment must have EXACTLY zero gradients in the file
(docs/routing.md section 7).

Exit status: 0 pass, 1 mismatch, 2 unreadable or malformed file, 3 ambiguous
routing (near-tie).
Usage: layer_ref.py FILE.h5 [--tol 1e-4] [--tie-tol 1e-6]
"""
import argparse
import math
import sys

import h5py
import numpy as np
import torch

torch.set_default_dtype(torch.float64)

EXIT_OK, EXIT_MISMATCH, EXIT_FORMAT, EXIT_AMBIGUOUS = 0, 1, 2, 3


class FormatError(Exception):
    pass


def ceil_tol(v):
    """docs/routing.md section 3: ceil, where a value within 1e-9 of an integer is that integer."""
    r = round(v)
    return int(r) if abs(v - r) <= 1e-9 else int(math.ceil(v))


def attr_str(a):
    return a.decode() if isinstance(a, bytes) else str(a)


def load(path):
    with h5py.File(path, "r") as f:
        at = dict(f.attrs)
        if attr_str(at.get("format", "")) != "moe-layer-dump":
            raise FormatError(f"format attribute is {at.get('format')!r}, not 'moe-layer-dump'")
        if int(at.get("format_version", -1)) != 1:
            raise FormatError(f"format_version {at.get('format_version')} (expected 1)")
        cfg = dict(
            T=int(at["tokens"]), G=int(at["groups"]), d=int(at["d_model"]), F=int(at["d_ff"]),
            E=int(at["n_experts"]), k=int(at["top_k"]), cf=float(at["capacity_factor"]),
            router=attr_str(at["router"]), normalize=int(at["normalize_topk"]),
            act=attr_str(at["activation"]), aux_coef=float(at["aux_loss_coef"]),
            z_coef=float(at["z_loss_coef"]))
        data = {}
        for name in ("x", "dy", "y", "router/weight", "experts/w1", "experts/b1", "experts/w2",
                     "experts/b2", "grad/x", "grad/router/weight", "grad/experts/w1",
                     "grad/experts/b1", "grad/experts/w2", "grad/experts/b2", "routing/probs",
                     "routing/weight", "routing/selected", "routing/kept", "aux/load_balance",
                     "aux/z_loss"):
            if name not in f:
                raise FormatError(f"dataset /{name} missing")
            data[name] = f[name][()]
    T, G, d, F, E, k = (cfg[n] for n in ("T", "G", "d", "F", "E", "k"))
    if cfg["router"] not in ("token_choice", "expert_choice"):
        raise FormatError(f"unknown router {cfg['router']!r}")
    if cfg["act"] not in ("gelu", "relu", "swiglu"):
        raise FormatError(f"unknown activation {cfg['act']!r}")
    if T <= 0 or G <= 0 or T % G:
        raise FormatError(f"tokens={T} is not a positive multiple of groups={G}")
    if cfg["router"] == "token_choice" and not 1 <= k <= E:
        raise FormatError(f"top_k={k} outside [1, n_experts={E}]")
    if cfg["router"] == "expert_choice" and cfg["cf"] <= 0:
        raise FormatError(f"expert choice needs capacity_factor > 0 (got {cfg['cf']})")
    F1 = 2 * F if cfg["act"] == "swiglu" else F
    shapes = {"x": (T, d), "dy": (T, d), "y": (T, d), "grad/x": (T, d), "router/weight": (E, d),
              "grad/router/weight": (E, d), "experts/w1": (E, F1, d), "experts/b1": (E, F1),
              "experts/w2": (E, d, F), "experts/b2": (E, d), "routing/probs": (T, E),
              "routing/weight": (T, E), "routing/selected": (T, E), "routing/kept": (T, E),
              "aux/load_balance": (), "aux/z_loss": ()}
    for n in ("experts/w1", "experts/b1", "experts/w2", "experts/b2"):
        shapes["grad/" + n] = shapes[n]
    for name, shp in shapes.items():
        if data[name].shape != shp:
            raise FormatError(f"/{name} has shape {data[name].shape}, expected {shp}")
    for name in ("routing/selected", "routing/kept"):
        if data[name].dtype != np.uint8:
            raise FormatError(f"/{name} is {data[name].dtype}, expected uint8")
    return cfg, data


def capacity(cfg, Tg):
    if cfg["router"] == "expert_choice":
        return min(Tg, ceil_tol(Tg * cfg["cf"] / cfg["E"]))
    if cfg["cf"] <= 0:
        return None  # dropless
    return ceil_tol(cfg["k"] * Tg * cfg["cf"] / cfg["E"])


def near(a, b, tol):
    return np.abs(a - b) <= tol * np.maximum(np.abs(a), np.abs(b))


def route(cfg, p, tie_tol):
    """Routing decision of docs/routing.md sections 3-4 on float64 probs p (T, E), per group.
    Returns selected, kept (T, E) bool, topk (T, k) or None, and the groups
    containing near-ties (dict group -> description)."""
    T, G, E, k = cfg["T"], cfg["G"], cfg["E"], cfg["k"]
    Tg = T // G
    C = capacity(cfg, Tg)
    sel = np.zeros((T, E), bool)
    kept = np.zeros((T, E), bool)
    ties = {}
    if cfg["router"] == "token_choice":
        # Stable sort of -p: equal probabilities keep ascending expert order.
        order = np.argsort(-p, axis=1, kind="stable")
        sp = np.take_along_axis(p, order, axis=1)
        topk = order[:, :k]
        rows = np.arange(T)[:, None]
        sel[rows, topk] = True
        # Sorted pairs whose order matters: the k/k+1 boundary always; inside
        # the top k only when capacity can drop (fill order is by choice rank).
        pairs = ([k - 1] if k < E else []) + (list(range(k - 1)) if C is not None else [])
        for i in pairs:
            for t in np.nonzero(near(sp[:, i], sp[:, i + 1], tie_tol))[0]:
                ties.setdefault(int(t) // Tg, []).append(
                    f"token {t}: sorted probs #{i} and #{i + 1} = {sp[t, i]:.9g}, {sp[t, i + 1]:.9g}")
        for g in range(G):
            cnt = np.zeros(E, np.int64)
            for r in range(k):  # all first choices before any second choice
                for t in range(g * Tg, (g + 1) * Tg):
                    e = topk[t, r]
                    if C is None or cnt[e] < C:
                        kept[t, e] = True
                        cnt[e] += 1
        return sel, kept, topk, ties
    for g in range(G):
        pg = p[g * Tg:(g + 1) * Tg]
        order = np.argsort(-pg, axis=0, kind="stable")  # ties: lower token index first
        for e in range(E):
            toks = order[:C, e] + g * Tg
            sel[toks, e] = True
            if C < Tg:
                a, b = pg[order[C - 1, e], e], pg[order[C, e], e]
                if near(a, b, tie_tol):
                    ties.setdefault(g, []).append(
                        f"expert {e}: ranks #{C - 1} and #{C} = {a:.9g}, {b:.9g}")
    kept[:] = sel
    return sel, kept, None, ties


def activation(h, act, F):
    if act == "relu":
        return torch.relu(h)
    if act == "swiglu":
        a, b = h[..., :F], h[..., F:]
        return a * torch.sigmoid(a) * b
    c = math.sqrt(2.0 / math.pi)  # GPT-2 tanh approximation
    return 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * h ** 3)))


def reference(cfg, data, tie_tol):
    T, G, E, k, F = cfg["T"], cfg["G"], cfg["E"], cfg["k"], cfg["F"]
    Tg = T // G
    t = lambda n: torch.tensor(np.asarray(data[n], np.float64))
    leaves = {n: t(n).requires_grad_(True) for n in
              ("x", "router/weight", "experts/w1", "experts/b1", "experts/w2", "experts/b2")}
    x, wg = leaves["x"], leaves["router/weight"]
    logits = x @ wg.T
    probs = torch.softmax(logits, dim=1)
    sel, kept, topk, ties = route(cfg, probs.detach().numpy(), tie_tol)
    kept_t = torch.from_numpy(kept)
    if cfg["router"] == "token_choice":
        g = probs
        if cfg["normalize"] and k > 1:  # always off for k = 1 (docs/routing.md section 3)
            denom = torch.gather(probs, 1, torch.from_numpy(topk)).sum(dim=1, keepdim=True)
            g = probs / denom
    else:
        g = probs
    weight = torch.where(kept_t, g, torch.zeros_like(g))
    h = torch.einsum("td,efd->tef", x, leaves["experts/w1"]) + leaves["experts/b1"]
    a = activation(h, cfg["act"], F)
    out = torch.einsum("tef,edf->ted", a, leaves["experts/w2"]) + leaves["experts/b2"]
    y = torch.einsum("te,ted->td", weight, out)

    pg = probs.view(G, Tg, E)
    if cfg["router"] == "token_choice":
        f = torch.from_numpy(sel.reshape(G, Tg, E).sum(axis=1) / (Tg * k))  # no gradient
        lb = (E * (f * pg.mean(dim=1)).sum(dim=1)).mean()
    else:
        lb = torch.zeros(())
    zl = (torch.logsumexp(logits, dim=1).view(G, Tg) ** 2).mean(dim=1).mean()
    loss = (y * t("dy")).sum() + cfg["aux_coef"] * lb + cfg["z_coef"] * zl
    loss.backward()
    ref = {"routing/probs": probs.detach(), "routing/weight": weight.detach(), "y": y.detach(),
           "aux/load_balance": lb.detach(), "aux/z_loss": zl.detach()}
    for n, v in leaves.items():
        ref["grad/" + n] = v.grad
    return ref, sel, kept, ties


def rel_err(got, ref, per_expert):
    got = np.asarray(got, np.float64)
    ref = ref.numpy()
    diff = np.abs(got - ref)
    if ref.ndim == 0:
        return float(diff / max(abs(float(ref)), 1e-12)), float(abs(ref)), float(diff), ""
    scale = float(np.abs(ref).max())
    if not per_expert:
        return float(diff.max() / max(scale, 1e-30)), scale, float(diff.max()), ""
    worst, where = 0.0, ""
    for e in range(ref.shape[0]):
        s = max(float(np.abs(ref[e]).max()), 1e-3 * scale, 1e-30)
        err = float(diff[e].max()) / s
        if err > worst or not where:
            worst, where = err, f"expert {e}"
    return worst, scale, float(diff.max()), where


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--tie-tol", type=float, default=1e-6)
    args = ap.parse_args(argv)
    try:
        cfg, data = load(args.file)
    except (OSError, KeyError, FormatError) as e:
        print(f"layer_ref: {args.file}: {e}", file=sys.stderr)
        return EXIT_FORMAT
    ref, sel, kept, ties = reference(cfg, data, args.tie_tol)
    T, G = cfg["T"], cfg["G"]
    Tg = T // G
    print(f"layer_ref: {args.file}: T={T} G={G} d={cfg['d']} F={cfg['F']} E={cfg['E']} k={cfg['k']} "
          f"router={cfg['router']} cf={cfg['cf']:g} act={cfg['act']} normalize={cfg['normalize']} "
          f"capacity/group={capacity(cfg, Tg)}")
    for g, items in sorted(ties.items()):
        print(f"  note: near-tie(s) in group {g} (tie-tol {args.tie_tol:g}): " + "; ".join(items[:4])
              + (" ..." if len(items) > 4 else ""))

    status = EXIT_OK
    for name, mine in (("routing/selected", sel), ("routing/kept", kept)):
        got = data[name]
        if not np.isin(got, (0, 1)).all():
            print(f"  FAIL /{name}: values other than 0/1")
            status = EXIT_MISMATCH
            continue
        bad = np.argwhere(got.astype(bool) != mine)
        if len(bad) == 0:
            print(f"  /{name}: identical ({int(mine.sum())} ones)")
            continue
        groups = sorted({int(t) // Tg for t, _ in bad})
        untied = [g for g in groups if g not in ties]
        t0, e0 = bad[0]
        detail = (f"{len(bad)} entries differ in groups {groups[:8]}; first (token {t0}, expert {e0}): "
                  f"file {got[t0, e0]}, reference {int(mine[t0, e0])}, prob {ref['routing/probs'][t0, e0]:.9g}")
        if untied:
            print(f"  FAIL /{name}: {detail}")
            status = EXIT_MISMATCH
        else:
            print(f"  AMBIGUOUS /{name}: {detail}; every differing group has a near-tie, so float32 vs "
                  f"float64 may legitimately disagree: use another seed")
            if status == EXIT_OK:
                status = EXIT_AMBIGUOUS
    if status != EXIT_OK:
        print(f"layer_ref: {'AMBIGUOUS' if status == EXIT_AMBIGUOUS else 'FAIL'} (routing differs; numbers "
              f"not compared)")
        return status

    print(f"  {'tensor':<22} {'max|ref|':>11} {'max|diff|':>11} {'err':>10}  worst")
    for name in ("routing/probs", "routing/weight", "y", "aux/load_balance", "aux/z_loss", "grad/x",
                 "grad/router/weight", "grad/experts/w1", "grad/experts/b1", "grad/experts/w2",
                 "grad/experts/b2"):
        got = data[name]
        if not np.isfinite(got).all():
            print(f"  FAIL /{name}: non-finite values")
            status = EXIT_MISMATCH
            continue
        err, scale, dmax, where = rel_err(got, ref[name], name.startswith("grad/experts/"))
        ok = err <= args.tol
        if not ok:
            status = EXIT_MISMATCH
        print(f"  {'/' + name:<22} {scale:11.4e} {dmax:11.4e} {err:10.2e}  {where}{'' if ok else '  <-- FAIL'}")

    # docs/routing.md section 7: an expert with no kept assignment has an exactly zero gradient.
    idle = np.nonzero(kept.sum(axis=0) == 0)[0]
    for e in idle:
        for n in ("grad/experts/w1", "grad/experts/b1", "grad/experts/w2", "grad/experts/b2"):
            if np.any(data[n][e] != 0):
                print(f"  FAIL /{n}: expert {e} received no tokens but its gradient is not exactly zero")
                status = EXIT_MISMATCH
    if len(idle):
        print(f"  idle experts (no kept assignment): {[int(e) for e in idle]}")
    print(f"layer_ref: {'PASS' if status == EXIT_OK else 'FAIL'} (tol {args.tol:g})")
    return status


if __name__ == "__main__":
    sys.exit(main())
