#!/usr/bin/python3
"""Reads a checkpoint with h5py using only docs/formats.md section 1 (the format):
root, /model, /optimizer, /train and /stats attributes, every dataset the
attributes imply with its shape and dtype, the checksum filter, nothing
else; and compares every value with the formula the C tests wrote
(ckpt_testlib.c: tk_value and the counters). A format_version 2 file with
head = vocab_experts also holds the vocabulary head (section 1, "format 2"):
the partition as int32, its rows by token id, no optimizer state for the
partition, the vocabulary experts' step counters and loads.

With `tok`, the file must hold the /tokenizer group of tokenizer.md section 4
(format_version 2) with the tokenizer ckpt_testlib.c's tk_tokenizer builds;
without, no /tokenizer and format_version 1.

usage: read_spec.py FILE SAVED_WORLD SAVED_EP [tok]"""
import re
import sys

import h5py
import numpy as np


def fnv32(s):
    h = 2166136261
    for b in s.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def tk_values(kind, name, n):
    j = np.arange(n, dtype=np.uint64)
    h = ((fnv32(name) ^ ((kind * 0x9E3779B9) & 0xFFFFFFFF)) + j * 40503) & 0xFFFFFFFF
    x = ((h % 65536).astype(np.int64) - 32768).astype(np.float32) / np.float32(4096)
    return np.abs(x) if kind == 2 else x  # TK_V: a second moment is >= 0


def spec_layout(m):
    """(name, shape) of every /model dataset, from the spec's table."""
    V, d, S, E, F = m["vocab_size"], m["d_model"], m["seq_len"], m["n_experts"], m["d_ff"]
    F1 = 2 * F if m["activation"] == "swiglu" else F
    out = [("wte", (V, d)), ("wpe", (S, d))]
    for L in range(m["n_layers"]):
        h = f"h/{L}/"
        out += [(h + "ln_1/weight", (d,)), (h + "ln_1/bias", (d,)),
                (h + "attn/c_attn/weight", (3 * d, d)), (h + "attn/c_attn/bias", (3 * d,)),
                (h + "attn/c_proj/weight", (d, d)), (h + "attn/c_proj/bias", (d,)),
                (h + "ln_2/weight", (d,)), (h + "ln_2/bias", (d,))]
        if L % m["moe_every"] == 0:
            out.append((h + "moe/router/weight", (E, d)))
            if m["router_noise"] == "gaussian":
                out.append((h + "moe/router/noise_weight", (E, d)))
            out += [(h + "moe/experts/w1", (E, F1, d)), (h + "moe/experts/b1", (E, F1)),
                    (h + "moe/experts/w2", (E, d, F)), (h + "moe/experts/b2", (E, d))]
        else:
            out += [(h + "mlp/c_fc/weight", (F1, d)), (h + "mlp/c_fc/bias", (F1,)),
                    (h + "mlp/c_proj/weight", (d, F)), (h + "mlp/c_proj/bias", (d,))]
    return out + [("ln_f/weight", (d,)), ("ln_f/bias", (d,))]


def main():
    path, world, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with_tok = len(sys.argv) > 4 and sys.argv[4] == "tok"
    errors = []

    def check(cond, what):
        if not cond:
            errors.append(what)

    with h5py.File(path, "r") as f:
        a = f.attrs
        check(a["format"] == "moe-checkpoint", f"format {a['format']!r}")
        version = int(a["format_version"])
        check(version in (1, 2), "format_version")
        check(isinstance(a["created_by"], str) and a["created_by"], "created_by")
        check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["created_at"]) is not None, "created_at ISO 8601 UTC")
        check("n_experts = 12" in a["config"], "config text")
        check(int(a["saved_world_size"]) == world and int(a["saved_ep_size"]) == ep, "saved sizes")

        ma = f["model"].attrs
        ints = ["vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_experts", "top_k", "d_ff",
                "moe_every", "normalize_topk", "group_seqs"]
        m = {k: int(ma[k]) for k in ints}
        for k in ["router", "activation", "router_noise"]:
            m[k] = ma[k]
        m["capacity_factor"], m["ln_eps"] = float(ma["capacity_factor"]), float(ma["ln_eps"])
        check(m["router"] in ("token_choice", "expert_choice"), "router")
        check(m["activation"] in ("gelu", "relu", "swiglu"), "activation")
        check(m["router_noise"] in ("none", "gaussian"), "router_noise")
        check(m["capacity_factor"] == 1.25 and m["ln_eps"] == 1e-5, "float model attributes")
        E = m["n_experts"]
        # format 2 attributes: absent means the default (head = full)
        head = ma.get("head", "full")
        check(head in ("full", "vocab_experts"), "head")
        check(version == (2 if head != "full" or with_tok else 1), f"format_version {version} with head = {head}")
        if head == "vocab_experts":
            M, K = int(ma["vocab_experts"]), int(ma["vocab_top_k"])
            check(2 <= M <= m["vocab_size"] and 1 <= K <= M, "vocab_experts, vocab_top_k")
            check(ma["vocab_partition"] in ("frequency", "kmeans", "file"), "vocab_partition")

        expected = {}
        for kind, prefix in enumerate(["model/", "optimizer/m/", "optimizer/v/"]):
            for name, shape in spec_layout(m):
                expected[prefix + name] = (shape, np.float32, kind, name)
        if head == "vocab_experts":
            V, d = m["vocab_size"], m["d_model"]
            expected["model/vocab_head/assign"] = ((V,), np.int32, None, ("assign",))
            for kind, prefix in enumerate(["model/", "optimizer/m/", "optimizer/v/"]):
                for name, shape in [("vocab_head/router/weight", (M, d)), ("vocab_head/router/bias", (M,)),
                                    ("vocab_head/weight", (V, d)), ("vocab_head/bias", (V,))]:
                    expected[prefix + name] = (shape, np.float32, kind, name)
            expected["optimizer/expert_step/vocab_head"] = ((M,), np.int64, None, ("vstep",))
            expected["stats/vocab_head/expert_tokens"] = ((M,), np.int64, None, ("vtokens",))
        moe_layers = [L for L in range(m["n_layers"]) if L % m["moe_every"] == 0]
        for li, L in enumerate(moe_layers):
            expected[f"optimizer/expert_step/h/{L}"] = ((E,), np.int64, None, (0, li))
            expected[f"stats/h/{L}/expert_tokens"] = ((E,), np.int64, None, (1, li))
            expected[f"stats/h/{L}/expert_dropped"] = ((E,), np.int64, None, (2, li))

        check(("tokenizer" in f) == with_tok, "/tokenizer present" if with_tok else "no /tokenizer")
        if with_tok and "tokenizer" in f:
            # tk_tokenizer: the 256 bytes, "ab", a hole, " the", b"\xff\xfe", "abc", "\n\n"; specials in the hole and after
            tokens = [bytes([b]) for b in range(256)] + [b"ab", b"", b" the", b"\xff\xfe", b"abc", b"\n\n"]
            t = f["tokenizer"]
            rb, ro = t["ranks_bytes"], t["ranks_offsets"]
            check(rb.dtype == np.uint8 and ro.dtype == np.dtype("<i8"), "ranks dtypes")
            check(rb.fletcher32 and ro.fletcher32, "ranks checksums")
            off = ro[...]
            check(off.shape == (len(tokens) + 1,) and off[0] == 0 and off[-1] == rb.shape[0], "ranks_offsets")
            data = rb[...].tobytes()
            check([data[off[i]:off[i + 1]] for i in range(len(off) - 1)] == tokens, "ranks_bytes tokens")
            pat = t.attrs["pattern"]
            check("?\\p{L}+" in (pat.decode() if isinstance(pat, bytes) else pat), "pattern (GPT-2's)")
            check(int(t.attrs["vocab_size"]) == 263, "tokenizer vocab_size")
            names = [n.decode() if isinstance(n, bytes) else n for n in t["special_names"][...]]
            check(names == ["<|endoftext|>", "<|pad|>"], f"special_names {names}")
            check(t["special_ids"][...].tolist() == [257, 262] and t["special_ids"].fletcher32, "special_ids")
            check(t["special_names"].fletcher32, "special_names checksum")
            for n in ["ranks_bytes", "ranks_offsets", "special_names", "special_ids"]:
                expected["tokenizer/" + n] = None

        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
        check(sorted(found) == sorted(expected), f"dataset names differ: extra {set(found) - set(expected)}, "
                                                  f"missing {set(expected) - set(found)}")
        e = np.arange(E)
        for name, spec in expected.items():
            if name not in f or spec is None:
                continue
            shape, dtype, kind, key = spec
            ds = f[name]
            check(ds.shape == shape, f"{name} shape {ds.shape} != {shape}")
            check(ds.dtype == np.dtype(dtype).newbyteorder("<"), f"{name} dtype {ds.dtype}")
            check(ds.fletcher32, f"{name} has no Fletcher32 checksum")
            if len(shape) > 1 and shape[0] == E and "/experts/" in name:
                check(ds.chunks[0] == 1, f"{name} chunks {ds.chunks}: one expert row per chunk")
            data = ds[...]
            if kind is not None:
                want = tk_values(kind, key, int(np.prod(shape))).reshape(shape)
                check(np.array_equal(data.view(np.uint32), want.view(np.uint32)), f"{name} values")
            elif len(key) == 1:  # the vocabulary head's integers (ckpt_testlib.c)
                v, mm = np.arange(shape[0]), np.arange(shape[0])
                want = {"assign": (v * 5 + v // 16) % 12, "vstep": 29 + mm, "vtokens": 20 * mm + 1}[key[0]]
                check(np.array_equal(data, want), f"{name} values {data} != {want}")
            else:
                which, li = key
                want = [12 * li + e + 7, 10 * e + li, e + 3 * li][which]
                check(np.array_equal(data, want), f"{name} values {data} != {want}")

        oa, ta = f["optimizer"].attrs, f["train"].attrs
        check(int(oa["step"]) == 41 and float(oa["lr"]) == 3e-3 and float(oa["beta1"]) == 0.9 and
              float(oa["beta2"]) == 0.95 and float(oa["eps"]) == 1e-8 and float(oa["weight_decay"]) == 0.1,
              "optimizer attributes")
        check(int(ta["step"]) == 42 and int(ta["tokens_seen"]) == 42 * 16 * 8 and
              int(ta["seed"]) == 0xFEDCBA9876543210, "train attributes")
        check(int(ta["data_cursor"]) == 123456789012345 and int(ta["data_epoch"]) == 3, "resume attributes")

    for e in errors:
        print("FAIL:", e)
    print(f"{path}: {len(expected)} datasets checked, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
