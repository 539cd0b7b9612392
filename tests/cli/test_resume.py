"""`moe train --resume` end to end.

    test_resume.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- SAVE_NP RESUME_NPS [key=value...]

Run A trains on SAVE_NP ranks with a checkpoint at step 10. For every W in
RESUME_NPS (comma separated) run B resumes from A's step-10 checkpoint on W
ranks (ep_size = W) and trains to the same last step. Batches and router
noise are pure functions of (seed, step), so:
  - W == SAVE_NP: B's per-step metrics after step 10 equal A's exactly (the
    JSON text), its metrics file continues A's (appended, no repeated step)
    and its final checkpoint equals A's bit for bit;
  - W != SAVE_NP: only the reduction order differs, so the losses agree
    within 1e-5 relative, the final checkpoints' integer state (step,
    per-expert update counts, load statistics) is equal and the parameters
    agree within 1e-5.
"""
import json
import os
import shutil
import sys

import h5py
import numpy as np

from moe_cli import STATE_FIELDS, check, check_h5_bitwise, main, read_metrics

SAVE_AT = 10
RTOL = 1e-5
# An update moves a weight by at most ~lr (3e-3); resuming without the
# AdamW moments or with the wrong step shifts weights by ~1e-4 and more,
# the reduction order by ~1e-7.
PARAM_ATOL = 1e-5


def check_final_close(a, b):
    """Final checkpoints of runs on different rank counts: the integer
    state (step, tokens, per-expert update counts and load statistics) is
    equal, the parameters within PARAM_ATOL. Returns the largest parameter
    difference."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for g in ("train", "optimizer"):
            check(dict(fa[g].attrs) == dict(fb[g].attrs), f"/{g} attributes differ: {dict(fa[g].attrs)} vs {dict(fb[g].attrs)}")
        ints = [f"optimizer/expert_step/{n}" for n in collect(fa["optimizer/expert_step"])]
        ints += [f"stats/{n}" for n in collect(fa["stats"])]
        check(ints, f"{a} holds no expert counters")
        for n in ints:
            check(np.array_equal(fa[n][()], fb[n][()]), f"/{n} differs: {fa[n][()]} vs {fb[n][()]}")
        worst = 0.0
        for n in collect(fa["model"]):
            d = float(np.abs(fa["model"][n][()] - fb["model"][n][()]).max())
            check(d <= PARAM_ATOL, f"/model/{n} differs by {d:.2e} (> {PARAM_ATOL:g})")
            worst = max(worst, d)
    return worst


def collect(group):
    """Paths of the datasets under group, relative to it."""
    names = []
    group.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def body(cli):
    check(len(cli.args) >= 2, "expected SAVE_NP RESUME_NPS [key=value...]")
    save_np, resume_nps = int(cli.args[0]), [int(w) for w in cli.args[1].split(",")]
    model = dict(kv.split("=", 1) for kv in cli.args[2:])
    steps = int(model.get("steps", 20))
    a = cli.path(f"a_np{save_np}")
    cli.train(save_np, a, [f"--ckpt_every={SAVE_AT}", "--keep_last=0"], model)
    ref = read_metrics(os.path.join(a, "metrics.jsonl"), exact=True)
    check(sorted(ref) == list(range(1, steps + 1)), f"run A logged steps {sorted(ref)}")
    saved = os.path.join(a, f"ckpt-{SAVE_AT:06d}.h5")

    for w in resume_nps:
        b = cli.path(f"b_np{save_np}_to_np{w}")
        os.makedirs(b)
        exact = w == save_np
        if exact:
            # Resume from a run directory, as after a crash: the checkpoint,
            # `latest` and the metrics of the steps before it.
            shutil.copy(saved, b)
            with open(os.path.join(b, "latest"), "w") as f:
                f.write(os.path.basename(saved) + "\n")
            with open(os.path.join(a, "metrics.jsonl")) as src, open(os.path.join(b, "metrics.jsonl"), "w") as dst:
                dst.writelines(line for line in src if json.loads(line)["step"] <= SAVE_AT)
            src_arg = b
        else:
            src_arg = saved
        _, out, _ = cli.train(w, b, [f"--resume={src_arg}", f"--ep_size={w}"], model)
        check(f"at step {SAVE_AT}" in out, f"W={w}: no 'resumed ... at step {SAVE_AT}' line in:\n{out}")
        got = read_metrics(os.path.join(b, "metrics.jsonl"), exact=exact)
        want_steps = range(1 if exact else SAVE_AT + 1, steps + 1)
        check(sorted(got) == list(want_steps), f"W={w}: metrics hold steps {sorted(got)}, want {list(want_steps)}")
        if exact:
            for s in range(SAVE_AT + 1, steps + 1):
                for k in STATE_FIELDS:
                    check(got[s].get(k) == ref[s].get(k),
                          f"W={w} step {s}: {k} = {got[s].get(k)} after resume, {ref[s].get(k)} uninterrupted")
            final = f"ckpt-{steps:06d}.h5"
            n = check_h5_bitwise(os.path.join(a, final), os.path.join(b, final))
            _, js, _ = cli.inspect(os.path.join(a, final), "--diff", os.path.join(b, final), "--json")
            diffs = json.loads(js)["diff"]["datasets"]
            check(diffs and all(d.get("max_abs") == 0 for d in diffs),
                  f"moe inspect --diff reports differences: {[d for d in diffs if d.get('max_abs') != 0][:3]}")
            print(f"np {save_np} -> {w}: steps {SAVE_AT + 1}..{steps} identical, {final} bitwise equal ({n} objects)")
        else:
            worst = 0.0
            for s in range(SAVE_AT + 1, steps + 1):
                for k in ("loss", "ce", "val_loss", "grad_norm"):
                    if k not in ref[s] and k not in got[s]:
                        continue
                    x, y = float(ref[s][k]), got[s][k]
                    rel = abs(x - y) / max(abs(x), 1e-30)
                    worst = max(worst, rel)
                    check(rel <= RTOL, f"np {save_np} -> {w} step {s}: {k} {y!r} vs {x!r} uninterrupted (rel {rel:.2e})")
            final = f"ckpt-{steps:06d}.h5"
            dp = check_final_close(os.path.join(a, final), os.path.join(b, final))
            print(f"np {save_np} -> {w}: steps {SAVE_AT + 1}..{steps} agree, worst rel diff {worst:.2e}; "
                  f"{final}: counters equal, params within {dp:.1e}")


if __name__ == "__main__":
    sys.exit(main(body))
