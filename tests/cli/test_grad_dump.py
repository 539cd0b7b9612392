"""`moe train --dump_grads_every=5` end to end.

    test_grad_dump.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP [NP...]

Trains a model whose steps carry fewer routed tokens than experts (top_k 1,
8 tokens per step, 12 experts per MoE layer), so every MoE layer has idle
experts by construction. For each rank count: grads-000005.h5 passes
`moe inspect --verify`, holds a gradient for every parameter of the
checkpoint, its `activated` mask equals the experts that metrics.jsonl says
kept tokens at step 5, rows of idle experts are exactly zero and rows of
active ones are not. Across rank counts the masks are equal and the
gradients agree (same global batch, different reduction order).
"""
import os
import sys

import h5py
import numpy as np

from moe_cli import check, main, read_metrics

MODEL = {"n_experts": 12, "top_k": 1, "moe_every": 1, "batch_size": 2, "seq_len": 4, "steps": 5}
EXPERT_TENSORS = ("w1", "b1", "w2", "b2")
RTOL = 1e-4  # of each tensor's largest entry


def load_dump(path):
    with h5py.File(path, "r") as f:
        check(f.attrs["format"] in (b"moe-gradients", "moe-gradients"), f"{path}: format {f.attrs['format']!r}")
        check(int(f.attrs["step"]) == 5, f"{path}: step {f.attrs['step']}")
        out = {}
        f["grad"].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out


def check_one(cli, np_):
    run = cli.path(f"np{np_}")
    cli.train(np_, run, ["--dump_grads_every=5", "--val_every=0", "--normalize_topk=0"], MODEL)
    dump = os.path.join(run, "grads-000005.h5")
    check(os.path.exists(dump), f"{dump} was not written")
    rc, out, _ = cli.inspect(dump, "--verify", expect_rc=None)
    check(rc == 0 and " 0 failed" in out, f"moe inspect --verify {dump} (exit {rc}):\n{out[-1500:]}")
    g = load_dump(dump)

    # One gradient per parameter of the checkpoint, with its shape.
    with h5py.File(os.path.join(run, "ckpt-000005.h5"), "r") as f:
        params = {}
        f["model"].visititems(lambda n, o: params.__setitem__(n, o.shape) if isinstance(o, h5py.Dataset) else None)
    grads = {n: a.shape for n, a in g.items() if not n.endswith("activated")}
    check(grads == params, f"gradient datasets differ from the parameters: {sorted(set(grads) ^ set(params))}")

    kept = read_metrics(os.path.join(run, "metrics.jsonl"), exact=False)[5]["layers"]
    E = MODEL["n_experts"]
    for rec in kept:
        L = rec["block"]
        mask = g[f"h/{L}/moe/experts/activated"]
        check(mask.shape == (E,) and mask.dtype == np.uint8, f"block {L}: activated {mask.dtype}{mask.shape}")
        want = (np.asarray(rec["kept"]) > 0).astype(np.uint8)
        check(np.array_equal(mask, want), f"block {L}: activated {mask} but metrics kept {rec['kept']}")
        check(0 < mask.sum() < E, f"block {L}: {mask.sum()} of {E} experts active; the test needs idle ones")
        for t in EXPERT_TENSORS:
            rows = g[f"h/{L}/moe/experts/{t}"].reshape(E, -1)
            nz = np.any(rows != 0, axis=1)
            check(np.array_equal(nz, mask.astype(bool)),
                  f"block {L} {t}: non-zero rows {nz.astype(int)} but activated {mask}")
    idle = [int(E - g[f"h/{r['block']}/moe/experts/activated"].sum()) for r in kept]
    print(f"np {np_}: {len(grads)} gradients; idle experts per MoE block {idle}, their rows zero")
    return g


def body(cli):
    check(cli.args, "expected NP [NP...]")
    dumps = [(int(w), check_one(cli, int(w))) for w in cli.args]
    w0, g0 = dumps[0]
    for w, g in dumps[1:]:
        for n, a in g0.items():
            if n.endswith("activated"):
                check(np.array_equal(a, g[n]), f"{n}: mask on {w} ranks differs from {w0} ranks")
                continue
            scale = max(float(np.abs(a).max()), 1e-30)
            err = float(np.abs(a - g[n]).max()) / scale
            check(err <= RTOL, f"{n}: gradient on {w} ranks differs from {w0} ranks by {err:.2e} of its max")
        print(f"np {w0} and np {w}: masks equal, gradients agree within {RTOL:g}")


if __name__ == "__main__":
    sys.exit(main(body))
