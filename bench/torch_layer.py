#!/usr/bin/env python3
"""The MoE layer of `moe bench layer` (forward + backward) in PyTorch, in
several formulations, to find the strongest baseline for bench/layer_vs_torch.sh.

Same layer and routing rules as moerun (docs/routing.md): router [E, d]
without bias, softmax, token choice top-k with capacity per routing group
(fill order "choice rank, then token", normalize_topk) or expert choice
(each expert takes its top-C tokens), experts w1 [F, d] b1 w2 [d, F] b2 with
gelu (tanh), outputs weighted by the gate and summed per token.

Formulations of the experts (--variant; routing is shared):
  loop     stacked weights [E, F, d] (moerun's layout), rows gathered by
           index_select, addmm with transposed weights per expert, combined
           with index_add_ (the baseline this file had before)
  split    stacked weights [E, d, F] (x @ w without transposes), rows gathered
           with index_select and cut per expert with torch.split
  unbind   as split, but each expert's weights are leaf tensors of their own:
           autograd then does not build a zero-filled [E, ...] gradient for
           every expert's slice of a stacked weight
  bmm      capacity layout: rows scattered into a padded [E, C, d] buffer
           (C = the largest expert's row count), two torch.baddbmm over all
           experts, gathered back (padding rows cost FLOPs)
  jit      unbind's expert loop as a torch.jit.script function
  compile  torch.compile (PyTorch >= 2.0 only; Debian 12 has 1.13.1, where
           the variant reports itself unavailable)
The figures of each variant on this machine are in bench/README.md (made by
`--study`, which runs every variant in alternation after checking that they
all compute the same outputs and gradients).

Threads: --threads N calls torch.set_num_threads(N); OpenBLAS's own pool
follows OPENBLAS_NUM_THREADS (bench/env.sh sets both). Prints one JSON line:
{"variant", "tokens_per_s" (median iteration), "ms_per_iter", "threads",
"blas_coretype", "blas_threads", "torch"}; --study prints a table and one
JSON line per variant.
"""
import argparse
import ctypes
import json
import math
import statistics
import time

import torch
import torch.nn.functional as Fn

VARIANTS = ("loop", "split", "unbind", "bmm", "jit", "compile")


def blas_info():
    """The OpenBLAS kernel set and thread count this process runs (Debian's
    PyTorch calls the system OpenBLAS through libblas.so.3)."""
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode(), lib.openblas_get_num_threads()
    except OSError:
        return "not OpenBLAS", 0


def route(probs, k, cf, kind, groups, normalize):
    """Routing of T tokens in `groups` equal groups: (expert, token, weight) of
    the kept assignments sorted by expert then token (weight differentiable,
    a function of probs), rows per expert, and the selections per group and
    expert before capacity drops (G, E) for the load-balance loss."""
    T, E = probs.shape
    Tg = T // groups
    with torch.no_grad():
        experts, tokens, selected = [], [], []
        for g in range(groups):
            p = probs[g * Tg:(g + 1) * Tg]
            if kind == "token_choice":
                idx = torch.topk(p, k, dim=1).indices
                flat_e = idx.t().reshape(-1)  # fill order: choice rank outer, token inner
                onehot = Fn.one_hot(flat_e, E)
                selected.append(onehot.sum(0))
                if cf > 0:
                    C = math.ceil(k * Tg * cf / E - 1e-9)
                    pos = (onehot.cumsum(0) - 1).gather(1, flat_e[:, None])[:, 0]
                    keep = (pos < C).reshape(k, Tg).t()
                else:
                    keep = torch.ones_like(idx, dtype=torch.bool)
                tok = torch.arange(Tg).unsqueeze(1).expand(Tg, k)
                experts.append(idx[keep])
                tokens.append(tok[keep] + g * Tg)
            else:
                C = min(Tg, math.ceil(Tg * cf / E - 1e-9))
                idx = torch.topk(p.t(), C, dim=1).indices  # (E, C)
                experts.append(torch.arange(E).unsqueeze(1).expand(E, C).reshape(-1))
                tokens.append(idx.reshape(-1) + g * Tg)
                selected.append(torch.full((E,), C))
        e_idx, t_idx = torch.cat(experts), torch.cat(tokens)
        order = torch.argsort(e_idx * T + t_idx)
        e_idx, t_idx = e_idx[order], t_idx[order]
        counts = torch.bincount(e_idx, minlength=E).tolist()
    gate = probs[t_idx, e_idx]
    if kind == "token_choice" and k > 1 and normalize:
        gate = gate / torch.topk(probs, k, dim=1).values.sum(dim=1)[t_idx]
    return e_idx, t_idx, gate, counts, torch.stack(selected)


def gelu(h):
    return Fn.gelu(h, approximate="tanh")


def swiglu(h):
    """silu(gate) * up over the rows [gate | up] of w1 (moerun's swiglu layout)."""
    F = h.shape[-1] // 2
    return Fn.silu(h[..., :F]) * h[..., F:]


def lin(x, w, b):
    """x @ w (+ b when the experts have biases)."""
    return torch.addmm(b, x, w) if b is not None else torch.mm(x, w)


@torch.jit.script
def experts_jit(xs: torch.Tensor, counts: list[int], w1: list[torch.Tensor], b1: list[torch.Tensor],
                w2: list[torch.Tensor], b2: list[torch.Tensor]) -> torch.Tensor:
    outs = []
    chunks = torch.split(xs, counts)
    for e in range(len(counts)):
        if counts[e] > 0:
            h = torch.nn.functional.gelu(torch.addmm(b1[e], chunks[e], w1[e]), approximate="tanh")
            outs.append(torch.addmm(b2[e], h, w2[e]))
    return torch.cat(outs)


@torch.jit.script
def experts_jit_swiglu(xs: torch.Tensor, counts: list[int], w1: list[torch.Tensor],
                       w2: list[torch.Tensor]) -> torch.Tensor:
    outs = []
    chunks = torch.split(xs, counts)
    for e in range(len(counts)):
        if counts[e] > 0:
            h = torch.mm(chunks[e], w1[e])
            F = h.shape[1] // 2
            outs.append(torch.mm(torch.nn.functional.silu(h[:, :F]) * h[:, F:], w2[e]))
    return torch.cat(outs)


class Experts:
    """E expert FFNs in a formulation's layout (see the module docstring)."""

    def __init__(self, variant, w1, b1, w2, b2, act="gelu"):
        """From moerun-layout tensors w1 [E, F1, d], b1 [E, F1], w2 [E, d, F], b2 [E, d]
        (act "swiglu": F1 = 2F, gate rows then up rows; b1, b2 None: no biases)."""
        self.variant = variant
        self.act = swiglu if act == "swiglu" else gelu
        self.swiglu = act == "swiglu"
        E = w1.shape[0]
        if b1 is None:
            b1 = b2 = None
        leaf = lambda t: None if t is None else t.detach().clone().contiguous().requires_grad_()
        if variant == "loop":
            self.w1, self.b1, self.w2, self.b2 = leaf(w1), leaf(b1), leaf(w2), leaf(b2)
        elif variant in ("split", "bmm"):
            self.w1, self.w2 = leaf(w1.transpose(1, 2)), leaf(w2.transpose(1, 2))  # [E, d, F], [E, F, d]
            self.b1, self.b2 = leaf(b1), leaf(b2)
        elif variant in ("unbind", "jit"):
            self.w1 = [leaf(w1[e].t()) for e in range(E)]  # (d, F) each
            self.w2 = [leaf(w2[e].t()) for e in range(E)]  # (F, d) each
            self.b1 = [leaf(b1[e]) for e in range(E)] if b1 is not None else [None] * E
            self.b2 = [leaf(b2[e]) for e in range(E)] if b2 is not None else [None] * E
        else:
            raise ValueError(f"unknown expert formulation {variant}")

    @staticmethod
    def _flat(*ps):
        return [q for p in ps for q in (p if isinstance(p, list) else [p]) if q is not None]

    def weights(self):
        return self._flat(self.w1, self.w2)

    def biases(self):
        return self._flat(self.b1, self.b2)

    def grads(self):
        """Gradients in moerun's layout: w1 [E, F, d], b1, w2 [E, d, F], b2."""
        def st(p):
            if isinstance(p, list):
                return torch.stack([q.grad for q in p]) if p[0] is not None else None
            return p.grad if p is not None else None
        w1, w2 = st(self.w1), st(self.w2)
        if self.variant != "loop":
            w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
        out = {"w1": w1, "w2": w2}
        if st(self.b1) is not None:
            out.update(b1=st(self.b1), b2=st(self.b2))
        return out

    def forward(self, x, e_idx, t_idx, gate, counts):
        """y (T, d) = sum over kept assignments of gate * expert(x[token])."""
        T, d = x.shape
        E = len(counts)
        v = self.variant
        if v == "bmm":
            C = max(counts)
            starts = [0]
            for n in counts[:-1]:
                starts.append(starts[-1] + n)
            pos = torch.arange(len(e_idx)) - torch.tensor(starts)[e_idx]  # row within its expert
            slot = e_idx * C + pos
            xe = torch.zeros(E * C, d).index_copy(0, slot, x.index_select(0, t_idx)).view(E, C, d)
            bmm = lambda b, a, w: torch.baddbmm(b.unsqueeze(1), a, w) if b is not None else torch.bmm(a, w)
            h = self.act(bmm(self.b1, xe, self.w1))
            ys = bmm(self.b2, h, self.w2).view(E * C, d).index_select(0, slot)
        else:
            xs = x.index_select(0, t_idx)
            if v == "jit":
                ys = (experts_jit_swiglu(xs, counts, self.w1, self.w2) if self.swiglu and self.b1[0] is None
                      else experts_jit(xs, counts, self.w1, self.b1, self.w2, self.b2))
            elif v == "loop":
                outs, s0 = [], 0
                b1 = self.b1 if self.b1 is not None else [None] * E
                b2 = self.b2 if self.b2 is not None else [None] * E
                for e in range(E):
                    n = counts[e]
                    if n:
                        h = self.act(lin(xs[s0:s0 + n], self.w1[e].t(), b1[e]))
                        outs.append(lin(h, self.w2[e].t(), b2[e]))
                    s0 += n
                ys = torch.cat(outs)
            else:  # split, unbind
                outs = []
                b1 = self.b1 if self.b1 is not None else [None] * E
                b2 = self.b2 if self.b2 is not None else [None] * E
                for e, xc in enumerate(xs.split(counts)):
                    if counts[e]:
                        h = self.act(lin(xc, self.w1[e], b1[e]))
                        outs.append(lin(h, self.w2[e], b2[e]))
                ys = torch.cat(outs)
        return torch.zeros(T, d).index_add_(0, t_idx, ys * gate.unsqueeze(1))


class Layer:
    """The MoE layer of `moe bench layer`: router [E, d] and experts."""

    def __init__(self, variant, canon):
        self.wg = canon["wg"].detach().clone().requires_grad_()
        self.experts = Experts(variant, canon["w1"], canon["b1"], canon["w2"], canon["b2"])

    def params(self):
        return [self.wg] + self.experts.weights() + self.experts.biases()

    def canon_grads(self):
        return dict(self.experts.grads(), wg=self.wg.grad)

    def forward(self, x, a):
        probs = torch.softmax(x @ self.wg.t(), dim=1)
        e_idx, t_idx, gate, counts, _ = route(probs, a.top_k, a.cf, a.router, a.groups, a.normalize_topk)
        return self.experts.forward(x, e_idx, t_idx, gate, counts)


def canonical(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, d, F = a.experts, a.d_model, a.d_ff
    return {"wg": torch.randn(E, d, generator=g) / math.sqrt(d),
            "w1": torch.randn(E, F, d, generator=g) / math.sqrt(d), "b1": 0.1 * torch.randn(E, F, generator=g),
            "w2": torch.randn(E, d, F, generator=g) / math.sqrt(F), "b2": 0.1 * torch.randn(E, d, generator=g)}


def unavailable(variant):
    """Why a variant cannot run here, or None."""
    if variant == "compile" and not hasattr(torch, "compile"):
        return f"torch.compile needs PyTorch >= 2.0 (this is {torch.__version__})"
    return None


def bench(variant, a, canon, x0, dy):
    """Median seconds of a.iters forward+backward iterations."""
    L = Layer(variant, canon)
    x = x0.clone().requires_grad_()
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        L.forward(x, a).backward(dy)
        x.grad = None
        for p in L.params():
            p.grad = None
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(a, canon, x0, dy, variants):
    """Every variant's y, dx and parameter gradients against `loop`'s."""
    res = {}
    for v in variants:
        L = Layer(v, canon)
        x = x0.clone().requires_grad_()
        y = L.forward(x, a)
        y.backward(dy)
        res[v] = dict(L.canon_grads(), y=y.detach(), x=x.grad)
    ref = res["loop"]
    for v in variants:
        for k, t in res[v].items():
            err = (t - ref[k]).abs().max().item() / (ref[k].abs().max().item() + 1e-30)
            if not err < 1e-4:
                raise SystemExit(f"torch_layer.py: variant {v} differs from loop in {k} (relative {err:.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="unbind", choices=VARIANTS)
    ap.add_argument("--study", action="store_true", help="check and time every variant, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="--study: rounds of all variants")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--router", default="token_choice", choices=("token_choice", "expert_choice"))
    ap.add_argument("--normalize-topk", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.cf = a.capacity_factor if a.capacity_factor is not None else (2.0 if a.router == "expert_choice" else 1.25)
    torch.set_num_threads(a.threads)
    canon = canonical(a)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(a.tokens, a.d_model, generator=g)
    dy = torch.randn(a.tokens, a.d_model, generator=g)
    core, blas_threads = blas_info()
    info = {"threads": a.threads, "blas_coretype": core, "blas_threads": blas_threads, "torch": torch.__version__}

    if not a.study:
        why = unavailable(a.variant)
        if why:
            raise SystemExit(f"torch_layer.py: variant {a.variant} unavailable: {why}")
        dt = bench(a.variant, a, canon, x0, dy)
        print(json.dumps(dict(variant=a.variant, tokens_per_s=a.tokens / dt, ms_per_iter=1e3 * dt, **info)))
        return
    runnable = [v for v in VARIANTS if not unavailable(v)]
    check(a, canon, x0, dy, runnable)
    times = {v: [] for v in runnable}
    for r in range(a.rounds):
        for v in (runnable if r % 2 == 0 else runnable[::-1]):
            times[v].append(bench(v, a, canon, x0, dy))
    print(f"# {a.router} E={a.experts} k={a.top_k} T={a.tokens} d={a.d_model} F={a.d_ff}, {a.threads} threads, "
          f"OpenBLAS {core} x {blas_threads}, torch {torch.__version__}; median of {a.rounds} rounds, "
          f"each the median of {a.iters} iterations; all variants checked against loop")
    for v in VARIANTS:
        why = unavailable(v)
        if why:
            print(json.dumps(dict(variant=v, unavailable=why)))
            continue
        dt = statistics.median(times[v])
        print(json.dumps(dict(variant=v, tokens_per_s=a.tokens / dt, ms_per_iter=1e3 * dt,
                              rounds_ms=[round(1e3 * t, 2) for t in times[v]], **info)))


if __name__ == "__main__":
    main()
