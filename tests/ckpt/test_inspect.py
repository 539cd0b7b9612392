#!/usr/bin/python3
"""`moe inspect` on files written by test_ckpt_mpi: describe (text and
JSON, parameter counts and per-expert numbers recomputed here with numpy),
--verify on a good and a corrupted copy (exit codes), --diff, --plot (SVG
parses), gradient dumps, run directories, usage errors.

usage: test_inspect.py MOE CKPT GRADS WORKDIR"""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import h5py
import numpy as np

moe, ckpt, grads, work = sys.argv[1:5]
os.makedirs(work, exist_ok=True)
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)
        print("FAIL:", what)


def run(*args):
    p = subprocess.run([moe, "inspect", *args], capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def flip(path, dset, chunk):
    """One byte in the middle of a chunk's stored data."""
    with h5py.File(path, "r") as f:
        info = f[dset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fp:
        fp.seek(info.byte_offset + info.size // 2)
        b = fp.read(1)
        fp.seek(info.byte_offset + info.size // 2)
        fp.write(bytes([b[0] ^ 0x40]))


# --- describe ---
rc, out, err = run(ckpt)
check(rc == 0 and "moe-checkpoint" in out and "MoE layer h/2" in out, f"describe: rc {rc} {err}")
rc, out, err = run(ckpt, "--json")
check(rc == 0, f"describe --json rc {rc} {err}")
j = json.loads(out)
info = j["info"]
with h5py.File(ckpt, "r") as f:
    total = expert = 0
    f["model"].visititems(lambda n, o: None)
    for name, o in f["model"].items():
        pass
    sizes = {}
    f["model"].visititems(lambda n, o: sizes.__setitem__(n, o.size) if isinstance(o, h5py.Dataset) else None)
    total = sum(sizes.values())
    expert = sum(v for n, v in sizes.items() if "/experts/" in n)
    m = f["model"].attrs
    E, k = int(m["n_experts"]), int(m["top_k"])
    tokens = f["stats/h/2/expert_tokens"][...]
    w1 = f["model/h/2/moe/experts/w1"][...].astype(np.float64)
check(info["parameters"]["total"] == total, f"total params {info['parameters']['total']} != {total}")
check(info["parameters"]["expert"] == expert, "expert params")
active = total - expert + expert * k / E
check(abs(info["parameters"]["active_per_token"] - active) < 1e-6, f"active {info['parameters']} != {active}")
check(f"{total} total" in run(ckpt)[1], "text shows the total")
layer = [l for l in info["moe_layers"] if l["layer"] == 2][0]
for e in range(E):
    x = layer["experts"][e]
    check(x["tokens"] == tokens[e] and abs(x["share"] - tokens[e] / tokens.sum()) < 1e-12, f"expert {e} load")
    check(abs(x["w1_norm"] - np.linalg.norm(w1[e])) < 1e-9 * np.linalg.norm(w1[e]), f"expert {e} w1 norm")
check(info["seed"] == str(0xFEDCBA9876543210) and info["train_extra"]["data_epoch"] == 3, "train attributes")
check(info["model"]["activation"] == "swiglu" and info["config"].startswith("[model]"), "model / config")

# --- verify: good, corrupted ---
rc, out, err = run(ckpt, "--verify")
check(rc == 0 and "0 failed" in out and "FAIL" not in out, f"verify good: rc {rc}")
bad = os.path.join(work, "bad.h5")
shutil.copy(ckpt, bad)
flip(bad, "/model/h/0/moe/experts/w2", 3)
rc, out, err = run(bad, "--verify")
fail_lines = [l for l in out.splitlines() if l.startswith("FAIL")]
check(rc == 1 and len(fail_lines) == 1 and "/model/h/0/moe/experts/w2" in fail_lines[0]
      and "checksum" in fail_lines[0], f"verify corrupted: rc {rc} {fail_lines}")
rc, out, err = run(bad, "--verify", "--json")
j = json.loads(out)
failed = [d for d in j["verify"]["datasets"] if not d["ok"]]
check(rc == 1 and not j["ok"] and [d["name"] for d in failed] == ["/model/h/0/moe/experts/w2"], "verify --json")

# --- diff ---
other = os.path.join(work, "other.h5")
shutil.copy(ckpt, other)
with h5py.File(other, "r+") as f:
    w = f["model/wte"]
    v = w[3, 5]
    w[3, 5] = v + 0.5
    del f["optimizer/v/wpe"]
rc, out, err = run(ckpt, "--diff", other, "--json")
check(rc == 0, f"diff rc {rc} {err}")
d = {x["name"]: x for x in json.loads(out)["diff"]["datasets"]}
check(abs(d["/model/wte"]["max_abs"] - 0.5) < 1e-6, f"diff wte {d['/model/wte']}")
check(abs(d["/model/wte"]["max_rel"] - 0.5 / max(abs(v), abs(v + 0.5))) < 1e-6, "diff wte rel")
check(d["/model/wpe"]["max_abs"] == 0 and d["/optimizer/v/wpe"]["only_in"] == ckpt, "diff others / only-in")
rc, out, err = run(ckpt, "--diff", other)
check(rc == 0 and "only in" in out, "diff text")

# --- plot ---
svg = os.path.join(work, "load.svg")
rc, out, err = run(ckpt, "--plot", svg)
check(rc == 0, f"plot rc {rc} {err}")
root = ET.parse(svg).getroot()
cells = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
check(len(cells) == 2 * E, f"{len(cells)} heat-map cells")

# --- gradient dump ---
rc, out, err = run(grads, "--json")
check(rc == 0, f"grads rc {rc} {err}")
gj = json.loads(out)["info"]
with h5py.File(grads, "r") as f:
    want = np.linalg.norm(f["grad/wte"][...].astype(np.float64))
    mask = f["grad/h/2/moe/experts/activated"][...]
norms = {x["name"]: x["norm"] for x in gj["grad_norms"]}
check(abs(norms["/grad/wte"] - want) < 1e-9 * want, "grad norm")
acts = {x["name"]: x["mask"] for x in gj["activated"]}
check(acts["/grad/h/2/moe/experts/activated"] == mask.tolist()
      and mask.tolist() == [int((e + 1) % 3 != 0) for e in range(E)], "activated mask")
check(run(grads, "--verify")[0] == 0, "verify grads")
check(run(grads, "--plot", svg)[0] == 1, "no load plot for a gradient dump")
# a checkpoint against a gradient dump, either way round: refused, naming both
for a, b in ((ckpt, grads), (grads, ckpt)):
    rc, out, err = run(a, "--diff", b)
    check(rc == 1 and "cannot compare a checkpoint with a gradient dump" in err and a in err and b in err
          and not out, f"diff {a} against {b}: rc {rc}, stdout {out[:300]!r}, stderr {err[-500:]!r}")

# --- run directory, usage ---
run_dir = os.path.join(work, "run")
os.makedirs(run_dir, exist_ok=True)
shutil.copy(ckpt, os.path.join(run_dir, "ckpt-000042.h5"))
with open(os.path.join(run_dir, "latest"), "w") as fp:
    fp.write("ckpt-000042.h5\n")
check(run(run_dir, "--verify")[0] == 0, "run directory")
check(run()[0] == 2, "no file: usage")
check(run(ckpt, "--bogus")[0] == 2, "unknown option: usage")
rc, out, err = run(os.path.join(work, "missing.h5"))
check(rc == 1 and "missing.h5" in err, f"missing file: rc {rc} {err}")

print(f"{len(fails)} failures")
sys.exit(1 if fails else 0)
