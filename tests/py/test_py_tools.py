#!/usr/bin/env python3
"""Self-test of layer_ref.py and h5_compare.py on synthetic dumps from
make_dump.py (no C runtime involved): correct dumps of every routing
variant pass, and each kind of corruption is caught with the right exit
status. Usage: test_py_tools.py WORKDIR
"""
import contextlib
import io
import os
import shutil
import sys

import h5py
import numpy as np

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h5_compare  # noqa: E402
import layer_ref  # noqa: E402
import make_dump  # noqa: E402

failures = []


def run(tool, args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = tool.main(args)
    return rc, out.getvalue()


def expect(what, tool, args, want):
    rc, out = run(tool, args)
    print(f"{'ok  ' if rc == want else 'FAIL'} {what}: exit {rc} (want {want})")
    if rc != want:
        print(out)
        failures.append(what)
    return out


def mutate(src, dst, fn):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def main():
    work = sys.argv[1]
    os.makedirs(work, exist_ok=True)
    p = lambda n: os.path.join(work, n)
    configs = {
        "k1_drops": dict(top_k=1, capacity_factor=1.0),
        "k2_drops": dict(top_k=2, capacity_factor=1.0),
        "dropless": dict(top_k=2, capacity_factor=0.0),
        "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
        "swiglu": dict(activation="swiglu", capacity_factor=1.25),
        "relu_nonorm": dict(activation="relu", normalize_topk=0),
        "E1": dict(experts=1, top_k=1, capacity_factor=0.5),
        "kE": dict(experts=3, top_k=3, capacity_factor=1.0),
        "tie": dict(top_k=1, capacity_factor=0.5, tie=True),
    }
    for name, cfg in configs.items():
        make_dump.make(p(name + ".h5"), tokens=48, groups=3, d_model=6, d_ff=8, seed=7, **cfg)
        expect(f"layer_ref accepts {name}", layer_ref, [p(name + ".h5")], 0)

    base = p("k2_drops.h5")
    with h5py.File(base, "r") as f:
        kept = f["routing/kept"][()]
        gw1 = f["grad/experts/w1"][()]
    t, e = map(int, np.argwhere(kept == 1)[0])

    def drop_one(f):
        f["routing/kept"][t, e] = 0
        f["routing/weight"][t, e] = 0.0
    expect("layer_ref: one kept bit flipped", layer_ref, [mutate(base, p("m1.h5"), drop_one)], 1)

    small = int(np.argmin(np.abs(gw1).reshape(gw1.shape[0], -1).max(axis=1)))
    def nudge(f, rel):
        g = f["grad/experts/w1"][()]
        i = np.unravel_index(np.argmax(np.abs(g[small])), g[small].shape)
        g[small][i] += rel * np.abs(g[small]).max()
        f["grad/experts/w1"][...] = g
    expect("layer_ref: smallest expert's grad w1 off by 1e-3", layer_ref,
           [mutate(base, p("m2.h5"), lambda f: nudge(f, 1e-3))], 1)
    expect("layer_ref: same grad off by 1e-6 passes", layer_ref,
           [mutate(base, p("m3.h5"), lambda f: nudge(f, 1e-6))], 0)

    def scale_y(f):
        f["y"][...] = f["y"][()] * np.float32(1.001)
    expect("layer_ref: y scaled by 1.001", layer_ref, [mutate(base, p("m4.h5"), scale_y)], 1)

    def aux(f):
        f["aux/z_loss"][()] = f["aux/z_loss"][()] * np.float32(1.01)
    expect("layer_ref: z_loss off by 1%", layer_ref, [mutate(base, p("m5.h5"), aux)], 1)

    def act(f):
        f.attrs["activation"] = "relu"
    expect("layer_ref: activation attribute changed", layer_ref, [mutate(base, p("m6.h5"), act)], 1)

    def cap(f):
        f.attrs["capacity_factor"] = 2.0
    expect("layer_ref: capacity attribute changed", layer_ref, [mutate(base, p("m7.h5"), cap)], 1)

    def norm(f):
        f.attrs["normalize_topk"] = np.int64(0)
    expect("layer_ref: normalize_topk changed", layer_ref, [mutate(base, p("m8.h5"), norm)], 1)

    tie = p("tie.h5")
    def idle_grad(f):  # expert 1 always loses its tie with expert 0: idle
        f["grad/experts/b2"][1, 0] = np.float32(1e-30)
    out = expect("layer_ref: idle expert with a nonzero gradient", layer_ref,
                 [mutate(tie, p("m9.h5"), idle_grad)], 1)
    if "exactly zero" not in out:
        failures.append("idle-expert message")
    with h5py.File(tie, "r") as f:
        tt = int(np.nonzero(f["routing/selected"][:, 0])[0][0])  # a token where 0 won its tie with 1
    def swap_tie(f):  # that token: the higher index wins the exact tie instead
        for n in ("routing/selected", "routing/kept", "routing/weight"):
            v = f[n][()]
            v[tt, 0], v[tt, 1] = v[tt, 1], v[tt, 0]
            f[n][...] = v
    expect("layer_ref: exact tie resolved toward the higher index", layer_ref,
           [mutate(tie, p("m10.h5"), swap_tie)], 3)
    expect("layer_ref: missing dataset", layer_ref, [mutate(base, p("m11.h5"), lambda f: f.__delitem__("y"))], 2)

    # h5_compare
    expect("h5_compare: identical copy", h5_compare, [base, mutate(base, p("c0.h5"), lambda f: None)], 0)
    def rel(f, r):
        v = f["grad/x"][()]
        v[3, 2] += r * np.abs(v).max()
        f["grad/x"][...] = v
    expect("h5_compare: 1e-6 relative passes rtol 1e-5", h5_compare,
           [base, mutate(base, p("c1.h5"), lambda f: rel(f, 1e-6))], 0)
    expect("h5_compare: 1e-4 relative fails rtol 1e-5", h5_compare,
           [base, mutate(base, p("c2.h5"), lambda f: rel(f, 1e-4))], 1)
    def flip(f):
        f["routing/selected"][0, 0] ^= 1
    expect("h5_compare: uint8 flip", h5_compare, [base, mutate(base, p("c3.h5"), flip)], 1)
    def seed(f):
        f.attrs["seed"] = np.uint64(8)
    expect("h5_compare: root attribute", h5_compare, [base, mutate(base, p("c4.h5"), seed)], 1)
    def extra(f):
        f["extra"] = np.zeros(2, np.float32)
    expect("h5_compare: extra dataset", h5_compare, [base, mutate(base, p("c5.h5"), extra)], 1)
    def reshape(f):
        v = f["aux/z_loss"][()]
        del f["aux/z_loss"]
        f["aux/z_loss"] = np.array([v], np.float32)
    expect("h5_compare: shape", h5_compare, [base, mutate(base, p("c6.h5"), reshape)], 1)
    def nan(f):
        f["y"][1, 1] = np.nan
    nan_a = mutate(base, p("c7.h5"), nan)
    expect("h5_compare: NaN in one file", h5_compare, [base, nan_a], 1)
    expect("h5_compare: NaN at the same place", h5_compare, [nan_a, mutate(base, p("c8.h5"), nan)], 0)
    expect("h5_compare: missing file", h5_compare, [base, p("nonexistent.h5")], 2)

    print(f"test_py_tools: {len(failures)} failure(s)" + (f": {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
