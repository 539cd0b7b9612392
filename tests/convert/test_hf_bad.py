#!/usr/bin/python3
"""`moe convert` on malformed Hugging Face directories: each case is a copy
of a valid tiny model (hf_ref.py make) with one thing broken; the import
must exit non-zero with a message naming the problem (the tensor, the
field, the file), leave no checkpoint behind, and not crash. Also the
export side: a gradient dump, a model no Hugging Face type computes, a bad
--model-type, a missing checkpoint.

Usage: test_hf_bad.py --moe MOE --work DIR [--models DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hf_ref  # noqa: E402

fails = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        fails.append(what)


def entries(path):
    with open(path, "rb") as f:
        e, _ = hf_ref.st_parse(f.read(), path)
    return e


def rewrite(path, ents):
    hf_ref.write_atomic(path, hf_ref.st_bytes(ents, {"format": "pt"}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--models")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    models = a.models or os.path.join(a.work, "models")
    if not a.models:
        hf_ref.make(models, 7, kinds=["qwen2_moe", "mixtral", "qwen2_moe_step2"], verbose=False)
    src = os.path.join(models, "qwen2_moe")  # one file, F32
    single = "model.safetensors"

    def case(name, edit, *want, rc=1):
        d = os.path.join(a.work, name)
        shutil.copytree(src, d)
        edit(d)
        out = os.path.join(a.work, name + ".h5")
        r = subprocess.run([a.moe, "convert", "import", "--hf", d, "--out", out], capture_output=True, text=True,
                           timeout=120)
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        ok = r.returncode == rc and all(w in r.stderr for w in want) and not os.path.exists(out)
        check(ok, f"{name}: exit {r.returncode}, '{msg}'")

    def edit_tensors(fn):
        def e(d):
            p = os.path.join(d, single)
            ents = entries(p)
            fn(ents)
            rewrite(p, ents)
        return e

    def drop(n):
        return edit_tensors(lambda e: e.pop(n))

    q = "model.layers.1.self_attn.q_proj.weight"
    case("missing_tensor", drop(q), q, "missing")
    case("missing_expert", drop("model.layers.0.mlp.experts.7.down_proj.weight"),
         "model.layers.0.mlp.experts.7.down_proj.weight", "missing")
    case("missing_shared_gate", drop("model.layers.0.mlp.shared_expert_gate.weight"), "shared_expert_gate", "missing")

    def extra(e):
        e["model.layers.0.mlp.experts.8.up_proj.weight"] = ("F32", (48, 64), np.zeros((48, 64), "<f4").tobytes())
    case("unexpected_tensor", edit_tensors(extra), "model.layers.0.mlp.experts.8.up_proj.weight", "not part of")

    def lm_head(e):  # tie_word_embeddings is true: an lm_head has no place
        e["lm_head.weight"] = ("F32", (300, 64), np.zeros((300, 64), "<f4").tobytes())
    case("untied_head_in_tied_model", edit_tensors(lm_head), "lm_head.weight", "not part of")

    k = "model.layers.0.self_attn.k_proj.weight"

    def reshape(e):
        dt, shape, raw = e[k]
        e[k] = (dt, (shape[1], shape[0]), raw)  # same bytes, transposed shape
    case("wrong_shape", edit_tensors(reshape), k, "[64, 32]", "[32, 64]")

    def wrong_rows(e):
        e[q] = ("F32", (32, 64), np.zeros((32, 64), "<f4").tobytes())
    case("wrong_rows", edit_tensors(wrong_rows), q, "[32, 64]", "[64, 64]")

    def f64(e):
        dt, shape, raw = e[q]
        e[q] = ("F64", shape, np.frombuffer(raw, "<f4").astype("<f8").tobytes())
    case("f64_dtype", edit_tensors(f64), q, "F64")

    def i64(e):
        e["model.norm.weight"] = ("I64", (64,), np.ones(64, "<i8").tobytes())
    case("int_dtype", edit_tensors(i64), "model.norm.weight", "I64")

    def truncate(d):
        p = os.path.join(d, single)
        blob = open(p, "rb").read()
        open(p, "wb").write(blob[:len(blob) // 2])
    case("truncated_file", truncate, single)

    def huge_header(d):
        p = os.path.join(d, single)
        blob = bytearray(open(p, "rb").read())
        blob[0:8] = (len(blob) * 4).to_bytes(8, "little")
        open(p, "wb").write(bytes(blob))
    case("header_past_end", huge_header, single)

    def overlap(d):
        p = os.path.join(d, single)
        blob = open(p, "rb").read()
        n = int.from_bytes(blob[:8], "little")
        h = json.loads(blob[8:8 + n])
        names = [k for k in h if k != "__metadata__"]
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        open(p, "wb").write(len(hb).to_bytes(8, "little") + hb + blob[8 + n:])
    case("overlapping_offsets", overlap, single)

    def no_config(d):
        os.remove(os.path.join(d, "config.json"))
    case("no_config", no_config, "config.json")

    def config_edit(fn):
        def e(d):
            p = os.path.join(d, "config.json")
            c = json.load(open(p))
            fn(c)
            json.dump(c, open(p, "w"))
        return e

    case("unknown_model_type", config_edit(lambda c: c.update(model_type="gpt_oss")), "model_type", "gpt_oss")
    case("sliding_window_used", config_edit(lambda c: c.update(use_sliding_window=True)), "use_sliding_window")
    case("rope_scaling", config_edit(lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0})), "rope_scaling")
    case("hidden_size_text", config_edit(lambda c: c.update(hidden_size="64")), "hidden_size")
    case("config_disagrees_with_tensors", config_edit(lambda c: c.update(moe_intermediate_size=40)),
         "has shape", "config.json implies")

    def not_json(d):
        open(os.path.join(d, "config.json"), "w").write("{\"model_type\": \"qwen2_moe\",")
    case("config_not_json", not_json, "config.json", "JSON")

    # sharded: the index names a shard that is not there
    ms = os.path.join(models, "mixtral")
    d = os.path.join(a.work, "missing_shard")
    shutil.copytree(ms, d)
    shards = sorted(fn for fn in os.listdir(d) if fn.startswith("model-"))
    os.remove(os.path.join(d, shards[-1]))
    out = d + ".h5"
    r = subprocess.run([a.moe, "convert", "import", "--hf", d, "--out", out], capture_output=True, text=True)
    check(r.returncode == 1 and shards[-1] in r.stderr and not os.path.exists(out),
          f"missing_shard: exit {r.returncode}, names {shards[-1]}")

    # decoder_sparse_step 2 (layer 1 MoE only): refused naming the field
    r = subprocess.run([a.moe, "convert", "import", "--hf", os.path.join(models, "qwen2_moe_step2"), "--out",
                        os.path.join(a.work, "step2.h5")], capture_output=True, text=True)
    check(r.returncode == 1 and "decoder_sparse_step" in r.stderr, "qwen2_moe_step2: refused naming decoder_sparse_step")

    # a failed import over an existing checkpoint leaves it as it was
    good = os.path.join(a.work, "good.h5")
    r = subprocess.run([a.moe, "convert", "import", "--hf", src, "--out", good], capture_output=True, text=True)
    check(r.returncode == 0, "a valid import")
    before = open(good, "rb").read()
    bad = os.path.join(a.work, "missing_tensor")
    r = subprocess.run([a.moe, "convert", "import", "--hf", bad, "--out", good], capture_output=True, text=True)
    check(r.returncode == 1 and open(good, "rb").read() == before, "a failed import keeps the old checkpoint")

    # export side
    def export(*args, rc=1):
        return subprocess.run([a.moe, "convert", "export", *args], capture_output=True, text=True)
    r = export("--ckpt", os.path.join(a.work, "nothing.h5"), "--out", os.path.join(a.work, "x"))
    check(r.returncode == 1 and "nothing.h5" in r.stderr, "export of a missing checkpoint names it")
    r = export("--ckpt", good, "--out", os.path.join(a.work, "x"), "--model-type", "olmoe")
    check(r.returncode == 1 and "olmoe" in r.stderr and "qk_norm" in r.stderr,
          "export as a type that cannot express the model names the option")
    r = export("--ckpt", good, "--out", os.path.join(a.work, "x"), "--model-type", "llama")
    check(r.returncode == 2 and "llama" in r.stderr, "an unknown --model-type is a usage error")
    run = os.path.join(a.work, "gpt2run")
    subprocess.run([a.moe, "data", "synth", "--out", os.path.join(a.work, "d.txt"), "--bytes", "64K"], check=True,
                   capture_output=True)
    subprocess.run([a.moe, "train", "--data", os.path.join(a.work, "d.txt"), "--out_dir", run, "--steps", "2",
                    "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--seq_len", "16", "--n_experts", "2",
                    "--d_ff", "32", "--batch_size", "2", "--val_every", "0", "--warmup_steps", "1"],
                   check=True, capture_output=True)
    r = export("--ckpt", run, "--out", os.path.join(a.work, "x"))
    check(r.returncode == 1 and "cannot express" in r.stderr and "layernorm" in r.stderr,
          "a GPT-2 style checkpoint is refused naming what no type computes")
    for bad_args in (["export", "--ckpt", good], ["import", "--out", "x"], ["frobnicate"], ["import", "--hf", src,
                                                                                               "--out", "x", "--seq-len", "0"]):
        r = subprocess.run([a.moe, "convert", *bad_args], capture_output=True, text=True)
        check(r.returncode == 2, f"usage error: moe convert {' '.join(bad_args)[:40]}")

    print(f"{len(fails)} failed" if fails else "test_hf_bad: all checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
