#!/usr/bin/python3
"""Cross-checks of the C safetensors module with an independent Python
implementation (struct + json + numpy, laid out as the safetensors Python
library writes; Debian 12 packages no safetensors library):

1. Python writes F16 (all 65536 bit patterns), BF16 (all 65536), F32
   specials, a scalar and an empty tensor; C reads them as float32 and
   writes them back (st_tool copy). The C file must be byte-identical to the
   file the Python library would write for the same float32 tensors, and
   every value must equal the float32 conversion computed here with integer
   operations (numpy's float16 cast agrees on every non-NaN input; NaNs keep
   sign and payload).
2. The same for the tiny Hugging Face models of hf_ref.py (F32 sharded,
   BF16, F16, tied): C reads each directory and writes it as float32
   shards; the shards and the index must be byte-identical to what Python
   writes with huggingface_hub's split, and the values equal.
3. Files broken by Python are rejected by C with a message naming the file.

Usage: st_cross.py --tool PATH/st_tool --work DIR
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_ref  # noqa: E402  (the independent reader/writer and the tiny models)


def f16_bits_to_f32_bits(h):
    """IEEE half -> single by integer operations (the definition)."""
    h = h.astype(np.uint32)
    sign, e, m = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    out = np.where(e == 31, sign | 0x7F800000 | (m << 13), sign | ((e + 112) << 23) | (m << 13))
    sub = (e == 0)
    # Subnormal (and zero): m * 2^-24 exactly, as float32 bits.
    subv = (m[sub].astype(np.float64) * 2.0 ** -24).astype(np.float32).view(np.uint32) | sign[sub]
    out[sub] = subv
    return out.astype(np.uint32)


def run(tool, *args, expect_ok=True):
    p = subprocess.run([tool, *args], capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"st_tool {' '.join(args)} failed: {p.stderr}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    fails = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            fails.append(what)

    # ---- 1. dtypes
    allbits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    f32_special = np.array([0x00000000, 0x80000000, 0x00000001, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                            0x7FC00001, 0xFFA00000, 0x3F800000], dtype=np.uint32)
    entries = {
        "f16_all": ("F16", (65536,), allbits.astype("<u2").tobytes()),
        "bf16_all": ("BF16", (256, 256), allbits.astype("<u2").tobytes()),
        "f32_special": ("F32", (3, 3), f32_special.astype("<u4").tobytes()),
        "scalar": ("F32", (), struct.pack("<f", -1.25)),
        "empty": ("F16", (0, 4), b""),
    }
    src = os.path.join(w, "dtypes.safetensors")
    hf_ref.write_atomic(src, hf_ref.st_bytes(entries, {"format": "pt", "note": "cross"}))
    # The same tensors in an unpadded header, listed out of offset order.
    blob = hf_ref.st_bytes(entries, None, pad=False)
    unp = os.path.join(w, "unpadded.safetensors")
    hf_ref.write_atomic(unp, blob)

    want_bits = {
        "f16_all": f16_bits_to_f32_bits(allbits),
        "bf16_all": allbits.astype(np.uint32) << 16,
        "f32_special": f32_special,
        "scalar": np.array([struct.unpack("<I", struct.pack("<f", -1.25))[0]], dtype=np.uint32),
        "empty": np.zeros(0, dtype=np.uint32),
    }
    # The integer definition agrees with numpy's float16 cast wherever the
    # result is a number (numpy promises nothing about NaN payloads).
    np_f32 = allbits.view(np.float16).astype(np.float32)
    num = ~np.isnan(np_f32)
    check(np.array_equal(np_f32.view(np.uint32)[num], want_bits["f16_all"][num]),
          "F16 -> F32 by integer operations = numpy's float16 cast on all 63490 non-NaN inputs")
    shapes = {n: e[1] for n, e in entries.items()}
    expect = {n: ("F32", shapes[n], want_bits[n].astype("<u4").tobytes()) for n in entries}

    for name, path in (("padded", src), ("unpadded", unp)):
        out = os.path.join(w, f"out_{name}")
        os.makedirs(out)
        run(args.tool, "copy", path, out, "0")
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            got = f.read()
        ref_blob = hf_ref.st_bytes(expect, {"format": "pt"})
        check(got == ref_blob, f"{name}: C file byte-identical to the Python library layout "
              f"({len(got)} bytes, header padded to 8, names sorted)")
        parsed, meta = hf_ref.st_parse(got, out)
        for n in entries:
            bits = np.frombuffer(parsed[n][2], dtype="<u4")
            if not np.array_equal(bits, want_bits[n]):
                bad = np.nonzero(bits != want_bits[n])[0][:5]
                check(False, f"{name}: {n} values (first differences at {bad.tolist()})")
        check(meta == {"format": "pt"}, f"{name}: metadata {{'format': 'pt'}}")

    # ---- 2. the tiny Hugging Face models
    models = os.path.join(w, "models")
    hf_ref.make(models, 11, verbose=False)
    for kind in hf_ref.KINDS:
        d = os.path.join(models, kind)
        out = os.path.join(w, f"copy_{kind}")
        os.makedirs(out)
        limit = 300_000
        run(args.tool, "copy", d, out, str(limit))
        orig = hf_ref.load_hf_dir(d)
        copy = hf_ref.load_hf_dir(out)
        same = set(orig) == set(copy) and all(np.array_equal(orig[n].numpy(), copy[n].numpy()) for n in orig)
        check(same, f"{kind}: C float32 copy holds every tensor with the same values")
        # Python writes the same float32 tensors, in the same (name) order.
        pyd = os.path.join(w, f"py_{kind}")
        os.makedirs(pyd)
        hf_ref.save_hf_dir(pyd, {n: orig[n].numpy() for n in sorted(orig)}, "F32", limit)
        files = sorted(os.listdir(pyd))
        check(files == sorted(os.listdir(out)), f"{kind}: same files ({len(files)})")
        differ = []
        for fn in files:
            with open(os.path.join(pyd, fn), "rb") as a, open(os.path.join(out, fn), "rb") as b:
                if a.read() != b.read():
                    differ.append(fn)
        check(not differ, f"{kind}: shards and index byte-identical to huggingface_hub's split + the Python "
              f"layout{' (differ: ' + ', '.join(differ) + ')' if differ else ''}")

    # ---- 3. broken files are rejected, naming the file
    bad = {
        "overlap.safetensors": hf_ref.st_bytes({"a": ("F32", (2,), bytes(8))}, None)[:-8] + bytes(8),
        "truncated.safetensors": open(src, "rb").read()[:-3],
        "dupkey.safetensors": None,
        "i64.safetensors": hf_ref.st_bytes({"i": ("I64", (2,), bytes(16))}, None),
    }
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    bad["dupkey.safetensors"] = struct.pack("<Q", len(h)) + h + bytes(8)
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    bad["overlap.safetensors"] = struct.pack("<Q", len(hdr)) + hdr + bytes(8)
    for fn, b in bad.items():
        p = os.path.join(w, fn)
        with open(p, "wb") as f:
            f.write(b)
        if fn == "i64.safetensors":  # a well-formed file: opens, but does not convert
            check(run(args.tool, "check", p).returncode == 0, f"{fn}: a well-formed I64 file opens")
            r = run(args.tool, "copy", p, w, "0", expect_ok=False)
            check(r.returncode == 1 and "unsupported dtype I64" in r.stderr and fn in r.stderr,
                  f"{fn}: conversion refused ({r.stderr.strip()})")
            continue
        r = run(args.tool, "check", p, expect_ok=False)
        check(r.returncode == 1 and fn in r.stderr and "bad file format" in r.stderr,
              f"{fn}: rejected ({r.stderr.strip()})")

    print(f"{len(fails)} failed" if fails else "st_cross: all checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
