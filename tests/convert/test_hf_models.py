#!/usr/bin/python3
"""moerun against the float64 PyTorch references of today's open MoE
architectures (hf_ref.py, written from the Hugging Face modeling code):
for each tiny random model of model_type mixtral, qwen2_moe, qwen3_moe and
olmoe (F32 sharded, F32, BF16, F16 safetensors), `moe convert import`, then
  - logits, the loss and every gradient (by Hugging Face name) within 1e-4
    of the reference (relative to each tensor's largest entry), via
    hf_check (a moerun forward/backward and the export name mapping);
  - 32 greedy tokens with the KV cache identical to the reference's;
  - `moe convert export` gives every tensor back bit for bit (as float32;
    the F16/BF16 inputs as their exact float32 values), with a config.json
    that maps back to the same model, and the exported directory imports
    and exports again to the same files;
  - transformers 5's fused expert names import to the same checkpoint.

Usage: test_hf_models.py --moe MOE --check HF_CHECK --work DIR [--models DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hf_ref  # noqa: E402  (the reference's own safetensors reader and writer)

TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
fails = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        fails.append(what)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if r.returncode != 0:
        print(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def f32_tensors(d):
    """{name: float32 array} of a Hugging Face directory, decoded exactly."""
    single = os.path.join(d, "model.safetensors")
    files = [single] if os.path.exists(single) else sorted(
        os.path.join(d, fn) for fn in set(json.load(open(os.path.join(d, "model.safetensors.index.json")))
                                              ["weight_map"].values()))
    out = {}
    for fn in files:
        with open(fn, "rb") as f:
            entries, _ = hf_ref.st_parse(f.read(), fn)
        for n, (dt, shape, raw) in entries.items():
            out[n] = hf_ref.decode(raw, dt, shape).astype(np.float32)
    return out


def fused_copy(src, dst):
    """src with every block's per-expert tensors fused as transformers 5 keeps
    them: mlp.experts.gate_up_proj [E, 2F, d] (gate rows, then up rows) and
    mlp.experts.down_proj [E, d, F]; Mixtral's block_sparse_moe becomes mlp."""
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    P = {n: t.numpy() for n, t in hf_ref.load_hf_dir(src).items()}
    a = hf_ref.Arch(cfg)
    out = {}
    for n, v in P.items():
        if ".experts." in n:
            continue
        out[n.replace("block_sparse_moe.", "mlp.")] = v
    for l in range(a.L):
        g = [P[a.expert_names(l, j)[0]] for j in range(a.E)]
        u = [P[a.expert_names(l, j)[1]] for j in range(a.E)]
        dn = [P[a.expert_names(l, j)[2]] for j in range(a.E)]
        out[f"model.layers.{l}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([x, y]) for x, y in zip(g, u)])
        out[f"model.layers.{l}.mlp.experts.down_proj"] = np.stack(dn)
    for fn in os.listdir(dst):
        if fn.endswith(".safetensors") or fn.endswith(".index.json"):
            os.remove(os.path.join(dst, fn))
    hf_ref.save_hf_dir(dst, out, "F32")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--check", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--models")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    models = args.models or os.path.join(args.work, "models")
    if not args.models:
        hf_ref.make(models, 7, verbose=False)
    for kind in TYPES:
        src = os.path.join(models, kind)
        w = os.path.join(args.work, kind)
        os.makedirs(w)
        ref = os.path.join(w, "ref.h5")
        hf_ref.ref(src, ref)
        ck = os.path.join(w, "model.h5")
        r = run([args.moe, "convert", "import", "--hf", src, "--out", ck])
        check(r.returncode == 0, f"{kind}: moe convert import")
        if r.returncode:
            continue
        mine = os.path.join(w, "moe.h5")
        r = run([args.check, ck, os.path.join(src, "test_tokens.json"), mine])
        check(r.returncode == 0, f"{kind}: hf_check runs the imported model")
        if r.returncode:
            continue
        with h5py.File(ref, "r") as R, h5py.File(mine, "r") as M:
            check(rel(M["logits"][()], R["logits"][()]) < 1e-4,
                  f"{kind}: logits within 1e-4 (rel err {rel(M['logits'][()], R['logits'][()]):.2e})")
            el = abs(float(M["loss"][()]) - float(R.attrs["loss"])) / abs(float(R.attrs["loss"]))
            check(el < 1e-4, f"{kind}: loss {float(M['loss'][()]):.6f} vs {float(R.attrs['loss']):.6f}")
            gnames = []
            R["grad"].visititems(lambda n, o: gnames.append(n) if isinstance(o, h5py.Dataset) else None)
            mnames = []
            M["grad"].visititems(lambda n, o: mnames.append(n) if isinstance(o, h5py.Dataset) else None)
            check(sorted(gnames) == sorted(mnames), f"{kind}: gradients of the same {len(gnames)} tensors")
            worst, wname = 0.0, ""
            for n in gnames:
                if n in mnames:
                    e = rel(M["grad"][n][()], R["grad"][n][()])
                    if e > worst:
                        worst, wname = e, n
            check(worst < 1e-4, f"{kind}: every gradient within 1e-4 (worst {worst:.2e}: {wname})")
            gi, ri = M["generate/ids"][()].tolist(), R["generate/ids"][()].tolist()
            check(gi == ri, f"{kind}: 32 greedy tokens identical ({gi[:6]}...)")
            check(rel(M["generate/logits"][()], R["generate/logits"][()]) < 1e-4,
                  f"{kind}: generation logits within 1e-4")

        # export: every tensor back bit for bit
        out = os.path.join(w, "export")
        r = run([args.moe, "convert", "export", "--ckpt", ck, "--out", out])
        check(r.returncode == 0, f"{kind}: moe convert export")
        if r.returncode:
            continue
        a, b = f32_tensors(src), f32_tensors(out)
        same = set(a) == set(b) and all(a[n].shape == b[n].shape and a[n].tobytes() == b[n].tobytes() for n in a)
        check(same, f"{kind}: export reproduces all {len(a)} tensors bit for bit")
        ca, cb = json.load(open(os.path.join(src, "config.json"))), json.load(open(os.path.join(out, "config.json")))
        keys = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "num_experts_per_tok", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
                "num_local_experts", "num_experts", "intermediate_size" if kind in ("mixtral", "olmoe")
                else "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size", "head_dim"]
        diff = [k for k in keys if k in ca and ca[k] != cb.get(k)]
        check(not diff, f"{kind}: exported config.json keeps the model's fields {diff if diff else ''}")
        # the exported directory is itself a model of the same computation
        ck2, out2 = os.path.join(w, "model2.h5"), os.path.join(w, "export2")
        r2 = run([args.moe, "convert", "import", "--hf", out, "--out", ck2])
        r3 = run([args.moe, "convert", "export", "--ckpt", ck2, "--out", out2]) if r2.returncode == 0 else r2
        check(r3.returncode == 0 and f32_tensors(out2).keys() == b.keys() and
              all(f32_tensors(out2)[n].tobytes() == b[n].tobytes() for n in b),
              f"{kind}: re-import and re-export of the export are identical")

        # transformers 5's fused experts: the same checkpoint parameters
        fz = os.path.join(w, "fused")
        fused_copy(src, fz)
        ck3, out3 = os.path.join(w, "fused.h5"), os.path.join(w, "export3")
        r = run([args.moe, "convert", "import", "--hf", fz, "--out", ck3])
        r = run([args.moe, "convert", "export", "--ckpt", ck3, "--out", out3]) if r.returncode == 0 else r
        check(r.returncode == 0 and all(f32_tensors(out3)[n].tobytes() == a[n].tobytes() for n in a),
              f"{kind}: fused expert tensors (transformers 5) import to the same model")

    print(f"{len(fails)} failed" if fails else "test_hf_models: all checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
