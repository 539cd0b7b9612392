#!/usr/bin/env python3
"""KV-cache decoding of the `moe train` model in PyTorch, the baseline of
bench/decode.sh for `moe generate`.

Same model (docs/training.md; weights random: speed does not depend on
them) and the same decoding loop as moe generate (docs/inference.md): each
prompt is prefilled on its own, then every step feeds the newest byte of all
B sequences through the blocks in one call (one routing group of B tokens,
token choice with capacity ceil(k B cf / E)) against a preallocated
key/value cache, and samples the next byte of each at temperature 1; the
last byte is sampled without being fed back. Decode tokens/s counts the fed
bytes (B x (tokens - 1)) over the decoding loop, sampling included, prefill
excluded, as moe generate's decode_tokens_per_s does.

Architecture options (as bench/torch_model.py, for bench/mixtral_vs_torch.sh):
--norm rmsnorm, --pos rope (the new positions' rows of cos/sin tables built
once), --kv-heads (the cache holds the kv heads only; the query heads of a
kv head read it as one batched matmul), --activation swiglu, --bias 0,
--tie 0.

Formulation: torch.inference_mode (no autograd), fused QKV linear, the
cache as one [layers, B, heads, seq, head size] tensor per K and V written
in place, attention of the one new query as two batched matmuls over the
filled part, the MoE FFN in the --moe formulation of bench/torch_layer.py
(default loop, the fastest in the study of bench/README.md; --study times every
one, alternating). Prints one JSON line:
{"decode_tokens_per_s", "ms_per_step", "batch", "threads", "blas_coretype", ...},
with --study one per formulation.
"""
import argparse
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
from torch_model import rms_norm, rope, rope_tables  # noqa: E402


VARIANTS = ("loop", "split", "unbind", "bmm", "jit")


class Decoder:
    def __init__(self, a):
        g = torch.Generator().manual_seed(a.seed)
        d, F, E, V, S = a.d_model, a.d_ff, a.experts, 256, a.seq
        F1 = 2 * F if a.activation == "swiglu" else F
        hs = d // a.heads
        kv = a.kv_heads or a.heads
        rn = lambda *shape: torch.randn(*shape, generator=g) * 0.02
        zb = lambda *shape: torch.zeros(*shape) if a.bias else None
        lnb = lambda *shape: torch.zeros(*shape) if a.norm == "layernorm" else None
        self.a = a
        self.wte = rn(V, d)
        self.wpe = rn(S, d) if a.pos == "learned" else None
        self.head = rn(V, d) if not a.tie else self.wte
        self.blocks = []
        for l in range(a.layers):
            b = {"ln1w": torch.ones(d), "ln1b": lnb(d), "qkvw": rn((a.heads + 2 * kv) * hs, d),
                 "qkvb": zb((a.heads + 2 * kv) * hs), "projw": rn(d, d), "projb": zb(d), "ln2w": torch.ones(d),
                 "ln2b": lnb(d)}
            if l % a.moe_every == 0:
                b["rw"] = rn(E, d)
                b["experts"] = Experts(a.moe, rn(E, F1, d), zb(E, F1), rn(E, d, F), zb(E, d), a.activation)
            else:
                b.update({"fcw": rn(F1, d), "fcb": zb(F1), "fcpw": rn(d, F), "fcpb": zb(d)})
            self.blocks.append(b)
        self.lnfw, self.lnfb = torch.ones(d), lnb(d)
        self.K = torch.zeros(a.layers, a.batch, kv, S, hs)
        self.V = torch.zeros(a.layers, a.batch, kv, S, hs)
        self.cos, self.sin = rope_tables(S, hs, a.rope_theta) if a.pos == "rope" else (None, None)

    def norm(self, x, w, b):
        if self.a.norm == "rmsnorm":
            return rms_norm(x, w, self.a.ln_eps)
        return Fn.layer_norm(x, (x.shape[-1],), w, b, self.a.ln_eps)

    def ffn(self, h, b):
        a = self.a
        act = swiglu if a.activation == "swiglu" else (lambda t: Fn.gelu(t, approximate="tanh"))
        if "rw" not in b:
            return Fn.linear(act(Fn.linear(h, b["fcw"], b["fcb"])), b["fcpw"], b["fcpb"])
        probs = torch.softmax(h @ b["rw"].t(), dim=1)
        e_idx, t_idx, gate, counts, _ = route(probs, a.top_k, a.capacity_factor, "token_choice", 1, a.normalize_topk)
        return b["experts"].forward(h, e_idx, t_idx, gate, counts)

    def forward(self, tok, seqs, p0):
        """tok (n, t): t new bytes of the sequences `seqs` (a slice of the batch:
        cache views, not copies) at positions p0..p0+t-1, one routing group;
        returns the last position's logits (n, V)."""
        a = self.a
        n, t = tok.shape
        d, nh = a.d_model, a.heads
        kv = a.kv_heads or nh
        hs, grp = d // nh, nh // kv
        x = (self.wte[tok] + self.wpe[p0:p0 + t] if self.wpe is not None else self.wte[tok]).view(n * t, d)
        for l, b in enumerate(self.blocks):
            h = self.norm(x, b["ln1w"], b["ln1b"])
            qkv = Fn.linear(h, b["qkvw"], b["qkvb"])
            q = qkv[:, :nh * hs].view(n, t, nh, hs).transpose(1, 2)  # (n, nh, t, hs)
            k = qkv[:, nh * hs:(nh + kv) * hs].view(n, t, kv, hs).transpose(1, 2)
            v = qkv[:, (nh + kv) * hs:].view(n, t, kv, hs).transpose(1, 2)
            if self.cos is not None:
                c, s_ = self.cos[p0:p0 + t], self.sin[p0:p0 + t]
                q, k = rope(q, c, s_), rope(k, c, s_)
            self.K[l, seqs, :, p0:p0 + t] = k
            self.V[l, seqs, :, p0:p0 + t] = v
            K, V = self.K[l, seqs, :, :p0 + t], self.V[l, seqs, :, :p0 + t]  # (n, kv, p0 + t, hs)
            # the grp query heads of a kv head as rows of one matmul: (n, kv, grp t, hs)
            s = (q.reshape(n, kv, grp * t, hs) @ K.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            if t > 1:
                s = s.masked_fill(torch.ones(t, p0 + t, dtype=torch.bool).triu(p0 + 1).repeat(grp, 1), float("-inf"))
            y = (torch.softmax(s, dim=-1) @ V).view(n, nh, t, hs).transpose(1, 2).reshape(n * t, d)
            x = x + Fn.linear(y, b["projw"], b["projb"])
            x = x + self.ffn(self.norm(x, b["ln2w"], b["ln2b"]), b)
        x = self.norm(x.view(n, t, d)[:, -1], self.lnfw, self.lnfb)
        return x @ self.head.t()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--moe-every", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--normalize-topk", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ln-eps", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe", default="loop", choices=VARIANTS)
    ap.add_argument("--norm", default="layernorm", choices=("layernorm", "rmsnorm"))
    ap.add_argument("--pos", default="learned", choices=("learned", "rope"))
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention (0: --heads)")
    ap.add_argument("--activation", default="gelu", choices=("gelu", "swiglu"))
    ap.add_argument("--bias", type=int, default=1, choices=(0, 1))
    ap.add_argument("--tie", type=int, default=1, choices=(0, 1))
    ap.add_argument("--study", action="store_true", help="every --moe formulation, alternating rounds")
    ap.add_argument("--rounds", type=int, default=1, help="--study: rounds")
    a = ap.parse_args()
    if a.prompt_len + a.tokens > a.seq:
        ap.error("prompt-len + tokens must fit seq (no context sliding here)")
    torch.set_num_threads(a.threads)
    core, blas_threads = blas_info()
    info = {"batch": a.batch, "threads": a.threads, "blas_coretype": core, "blas_threads": blas_threads,
            "torch": torch.__version__}
    if not a.study:
        tok_s, step_ms = decode(a)
        print(json.dumps(dict(decode_tokens_per_s=tok_s, ms_per_step=step_ms, moe=a.moe, **info)))
        return
    got = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            got[v].append(decode(argparse.Namespace(**dict(vars(a), moe=v)))[0])
    for v in VARIANTS:
        print(json.dumps(dict(moe=v, decode_tokens_per_s=statistics.median(got[v]), rounds=got[v], **info)))


def decode(a):
    """Decode tokens/s and median step ms of one generation run."""
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.inference_mode():
        m = Decoder(a)
        prompts = torch.randint(0, 256, (a.batch, a.prompt_len), generator=g)
        logits = torch.cat([m.forward(prompts[i:i + 1], slice(i, i + 1), 0) for i in range(a.batch)])
        pos = a.prompt_len
        seqs = slice(None)
        steps = []
        t0 = time.perf_counter()
        for t in range(a.tokens):
            s0 = time.perf_counter()
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)  # (B, 1)
            if t == a.tokens - 1:
                break  # the last byte needs no logits
            logits = m.forward(nxt, seqs, pos)
            pos += 1
            steps.append(time.perf_counter() - s0)
        dt = time.perf_counter() - t0
    return a.batch * (a.tokens - 1) / dt, 1e3 * statistics.median(steps)

if __name__ == "__main__":
    main()
