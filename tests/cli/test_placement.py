"""Expert placement end to end: `moe placement plan` and `placement = FILE`.

    test_placement.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- plan|errors

plan: run A trains the tiny model (E = 8) on 4 ranks with contiguous
experts and checkpoints at step 6 and at the end. `moe placement plan` on
A's step-6 checkpoint writes a placement with 4 replicas of the hottest
experts for 4 ranks (and one without replicas for 2 ranks); its report
names every MoE layer with the max/mean tokens per rank before and after,
and the same command twice writes the same file. Run B resumes A's
step-6 checkpoint on 4 ranks under the replicated placement: its losses
and gradient norms agree with A's within 1e-5 relative, and its final
checkpoint holds every expert once, in global order, with A's parameters
within 1e-5 and its counters (a near-tie may route one assignment the
other way) within a few assignments. That file evaluates to the same loss on 1 rank,
on 4 ranks contiguous and on 4 ranks placed, and greedy generation gives
the same text on 1 rank and on 4 placed ranks.
errors: a placement made for other ranks or another model, a missing or
broken placement file, and the planner's bad inputs: a message naming
the problem, non-zero exit, on every rank, in bounded time.
"""
import json
import os
import shutil

import h5py
import numpy as np

from moe_cli import TINY, check, main, read_metrics

E = 8
# Dropless (capacity_factor 0): a capacity cut-off is where a difference in
# the last bit of a score (the placement changes the order of float sums)
# can send an assignment the other way and move the weights by more than
# the tolerance; top-k near-ties are far rarer.
MODEL = {"n_experts": E, "moe_every": 1, "capacity_factor": 0, "steps": 12, "batch_size": 8, "val_every": 0, "ckpt_every": 6, "keep_last": 0}
RTOL = 1e-5


def plan(cli, ckpt, out, ranks, replicas, expect_rc=0):
    return cli.run([cli.moe, "placement", "plan", "--ckpt", ckpt, "--ranks", str(ranks), "--replicas",
                    str(replicas)] + (["--out", out] if out else []), expect_rc=expect_rc)


def eval_loss(cli, np_, ckpt, *extra):
    _, out, _ = cli.run(cli.mpi(np_, "eval", "--ckpt", ckpt, "--data", cli.data, "--json", *extra), timeout=120)
    return json.loads(out)["loss"]


def body_plan(cli):
    a = cli.path("a")
    cli.train(4, a, [], MODEL, timeout=120)
    step6 = os.path.join(a, "ckpt-000006.h5")
    p4 = cli.path("p4r4.json")
    _, out, _ = plan(cli, step6, p4, 4, 4)
    print(out)
    rows = [l for l in out.splitlines() if l.split()[:1] and l.split()[0].isdigit()]
    check(len(rows) == 2, f"expected one report line per MoE layer (2):\n{out}")
    for r in rows:
        mean, before, rb, after, ra = (float(x) for x in r.split()[2:7])
        check(before >= mean and after >= mean and rb >= 1 and ra >= 1, f"max below the mean: {r}")
    check("before" in out and "after" in out, out)
    with open(p4) as f:
        pl = json.load(f)
    check(pl["ranks"] == 4 and pl["experts"] == E and pl["slots"] == 3 and len(pl["layers"]) == 2, f"{pl}")
    for layer in pl["layers"]:
        held = [e for rank in layer for e in rank]
        check(sorted(set(held)) == list(range(E)) and len(held) == E + 4, f"layer {layer}")
        check(all(len(set(rank)) == len(rank) == 3 for rank in layer), f"a rank holds an expert twice: {layer}")
    # deterministic
    plan(cli, step6, cli.path("again.json"), 4, 4)
    check(open(p4).read() == open(cli.path("again.json")).read(), "the same plan twice differs")
    plan(cli, step6, cli.path("p2.json"), 2, 0)

    # B: resume A's step 6 on 4 ranks under the replicated placement
    b = cli.path("b")
    _, out, _ = cli.train(4, b, [f"--resume={step6}", f"--placement={p4}"], MODEL, timeout=120)
    ra, rb = read_metrics(os.path.join(a, "metrics.jsonl"), False), read_metrics(os.path.join(b, "metrics.jsonl"), False)
    worst = 0.0
    for s in range(7, MODEL["steps"] + 1):
        for k in ("loss", "grad_norm"):
            rel = abs(ra[s][k] - rb[s][k]) / abs(ra[s][k])
            worst = max(worst, rel)
            check(rel <= RTOL, f"step {s}: {k} {rb[s][k]!r} placed vs {ra[s][k]!r} contiguous (rel {rel:.2e})")
        check(ra[s]["active_experts"] == rb[s]["active_experts"], f"step {s}: active experts differ")
    final = f"ckpt-{MODEL['steps']:06d}.h5"
    fa, fb = os.path.join(a, final), os.path.join(b, final)
    with h5py.File(fa, "r") as x, h5py.File(fb, "r") as y:
        # Counters: the placement changes only the order of float sums, but
        # a capacity decision on a near-tie may then fall the other way (one
        # drop moving between experts was seen in a Debug build): a handful
        # of assignments, never a systematic difference.
        for blk in (0, 1):
            for n in (f"optimizer/expert_step/h/{blk}", f"stats/h/{blk}/expert_tokens", f"stats/h/{blk}/expert_dropped"):
                if n in x:
                    a, b = x[n][()], y[n][()]
                    moved = int(np.abs(a - b).sum())
                    check(moved <= 4 + a.sum() // 200, f"/{n} differs by {moved}: {a} vs {b}")
        dp = 0.0
        def cmp(name, obj):
            nonlocal dp
            if isinstance(obj, h5py.Dataset):
                d = float(np.abs(x["model"][name][()] - obj[()]).max())
                check(d <= RTOL, f"/model/{name} differs by {d:.2e}")
                dp = max(dp, d)
        y["model"].visititems(cmp)
    print(f"resume under the placement: steps 7..12 within {worst:.1e} relative, parameters within {dp:.1e}")
    _, out, _ = cli.inspect(fb, "--verify")

    # the placed run's file: 1 rank, 4 contiguous, 4 placed
    l1 = eval_loss(cli, 1, fb)
    l4 = eval_loss(cli, 4, fb)
    l4p = eval_loss(cli, 4, fb, "--placement", p4)
    for name, v in (("4 ranks", l4), ("4 ranks placed", l4p)):
        check(abs(v - l1) <= RTOL * abs(l1), f"eval on {name}: {v!r} vs 1 rank {l1!r}")
    print(f"eval of the placed run's checkpoint: 1 rank {l1:.7f}, 4 ranks {l4:.7f}, 4 placed {l4p:.7f}")
    gen = ["generate", "--ckpt", fb, "--prompt", "the ", "--tokens", "24", "--temperature", "0"]
    _, g1, _ = cli.run(cli.mpi(1, *gen), timeout=120)
    _, g4, _ = cli.run(cli.mpi(4, *gen, "--placement", p4), timeout=120)
    check(g1 == g4, f"greedy text differs: 1 rank {g1!r}, 4 placed {g4!r}")


def fails_with(cli, cmd, needle, np_=None):
    rc, out, err = cli.run(cmd, expect_rc="fail", timeout=60)
    check(needle in err, f"no '{needle}' in the error of {' '.join(cmd)}:\n{err[-2000:]}")
    if np_:  # every rank names the problem (moe train prints it on each)
        check(err.count(needle) == np_, f"{np_} ranks, '{needle}' {err.count(needle)} times:\n{err[-2000:]}")
    return rc


def body_errors(cli):
    a = cli.path("a")
    cli.train(2, a, [], dict(MODEL, steps=2, ckpt_every=0), timeout=120)
    ck = os.path.join(a, "ckpt-000002.h5")
    p2 = cli.path("p2.json")
    plan(cli, ck, p2, 2, 0)
    base = ["train", f"--data={cli.data}"] + [f"--{k}={v}" for k, v in {**TINY, **MODEL, "steps": 2}.items()]
    # a placement for 2 ranks on 4
    fails_with(cli, cli.mpi(4, *base, f"--out_dir={cli.path('x1')}", f"--placement={p2}"),
               "is for 2 expert-parallel ranks, this run has 4", 4)
    # for another model (n_experts = 4)
    fails_with(cli, cli.mpi(2, *base, "--n_experts=4", f"--out_dir={cli.path('x2')}", f"--placement={p2}"),
               "is for 8 experts per MoE layer, the model has 4", 2)
    # missing, broken
    fails_with(cli, cli.mpi(2, *base, f"--out_dir={cli.path('x3')}", "--placement=nowhere.json"), "nowhere.json", 2)
    with open(cli.path("broken.json"), "w") as f:
        f.write('{"format": "moerun-placement", "version": 1, "experts": 8, "ranks": 2, "slots": 4, '
                '"layers": [[[0, 1, 2, 3], [4, 5, 6, 6]], [[0, 1, 2, 3], [4, 5, 6, 7]]]}')
    fails_with(cli, cli.mpi(2, *base, f"--out_dir={cli.path('x4')}", "--placement=broken.json"),
               "layer 0, rank 1 holds expert 6 twice", 2)
    fails_with(cli, cli.mpi(2, "eval", "--ckpt", ck, "--data", cli.data, "--placement", "broken.json"),
               "holds expert 6 twice")
    # the planner
    rc = fails_with(cli, [cli.moe, "placement", "plan", "--ckpt", ck, "--ranks", "4", "--replicas", "2"],
                    "4 ranks do not divide 8 experts + 2 replicas")
    check(rc == 2, f"exit {rc}")
    fails_with(cli, [cli.moe, "placement", "plan", "--ckpt", ck, "--ranks", "4", "--replicas", "-4"], "must be >= 0")
    fails_with(cli, [cli.moe, "placement", "plan", "--ckpt", ck, "--ranks", "2", "--replicas", "10"],
               "two copies of one expert")
    fails_with(cli, [cli.moe, "placement", "plan", "--ckpt", cli.path("none.h5")], "none.h5")
    fails_with(cli, [cli.moe, "placement", "plan", "--ranks", "2"], "--ckpt is required")
    # a file without the load statistics
    nostats = cli.path("nostats.h5")
    shutil.copy(ck, nostats)
    with h5py.File(nostats, "r+") as f:
        del f["stats"]
    fails_with(cli, [cli.moe, "placement", "plan", "--ckpt", nostats, "--ranks", "2"], "/stats/h/0/expert_tokens")


def body(cli):
    check(cli.args and cli.args[0] in ("plan", "errors"), "expected plan|errors")
    (body_plan if cli.args[0] == "plan" else body_errors)(cli)


if __name__ == "__main__":
    raise SystemExit(main(body))
