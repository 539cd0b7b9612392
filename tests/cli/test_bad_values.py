"""A checkpoint whose checksums pass but whose values no run writes is refused
by every command that reads it.

    test_bad_values.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP

Trains the tiny model for 3 steps on NP ranks, then writes copies of its
final checkpoint edited with h5py (which recomputes the Fletcher32
checksums, so only the value rules of docs/formats.md can tell):
  - nan_weight: /model/wte[0, 1] = NaN;
  - neg_expert_step: /optimizer/expert_step/h/{L}[1] = -4;
  - expert_step_above: /optimizer/expert_step/h/{L}[2] = /optimizer step + 5;
  - neg_train_step: the /train attribute step = -3.
  - overflow (eval only): /model/ln_f/weight = 3e38, finite, so every
    reader accepts the file, but the logits overflow: `moe eval` must exit
    non-zero on every rank saying the loss is not finite (not print
    "loss nan" and exit 0), while `moe inspect --verify` accepts it.
Each of the first four copies must be refused, within a timeout, with a non-zero exit and a
message naming the dataset or attribute and the bad value, by
`moe inspect --verify` (one process) and by `moe train --resume`,
`moe eval` and `moe generate` on NP ranks, where every rank exits non-zero (each rank's
status is recorded by a shell wrapper; mpiexec is told not to end the
others when one fails, so its own status is then not the ranks'). The unedited checkpoint passes all four, so a
refusal is the edit's doing.
"""
import os
import re
import shutil
import sys

import h5py
import numpy as np

from moe_cli import TINY, check, main

TIMEOUT = 60


def edit(path, case):
    """Applies CASE to the checkpoint at path; returns the regex the message must match."""
    with h5py.File(path, "r+") as f:
        opt_step = int(f["optimizer"].attrs["step"])
        layer = sorted(f["optimizer/expert_step/h"].keys(), key=int)[0]
        steps = f"optimizer/expert_step/h/{layer}"
        if case == "nan_weight":
            f["model/wte"][0, 1] = np.float32("nan")
            return r"'/model/wte' holds -?nan at element 1\b"
        if case == "neg_expert_step":
            f[steps][1] = -4
            return rf"'/{steps}' holds -4 at element 1\b"
        if case == "expert_step_above":
            f[steps][2] = opt_step + 5
            return rf"'/{steps}' holds {opt_step + 5} at element 2, outside \[0, {opt_step}\]"
        if case == "neg_train_step":
            f["train"].attrs["step"] = np.int64(-3)
            return r"/train step = -3 is outside"
        if case == "overflow":
            f["model/ln_f/weight"][...] = np.float32(3e38)
            return r"eval: the loss over \d+ tokens is not finite"
    raise AssertionError(case)


CASES = ("nan_weight", "neg_expert_step", "expert_step_above", "neg_train_step")


# Each rank's exit status on stderr, as "exit[RANK]=STATUS".
WRAP = 'moe="$1"; shift; "$moe" "$@"; rc=$?; echo "exit[$OMPI_COMM_WORLD_RANK]=$rc" >&2; exit $rc'
# mpiexec must not kill the other ranks when one exits non-zero: each must exit by itself.
ENV = {"OMPI_MCA_orte_abort_on_non_zero_status": "0"}


def mpi_wrapped(cli, np_, *args):
    return [cli.mpiexec, cli.np_flag, str(np_), *cli.mpi_flags, "sh", "-c", WRAP, "sh", cli.moe, *args]


def commands(cli, np_, ckpt, tag):
    """name -> (argv, ranks) of the four readers of a checkpoint."""
    model = dict(TINY, steps=5, val_every=0)
    return {
        "inspect --verify": ([cli.moe, "inspect", "--verify", ckpt], 1),
        "train --resume": (mpi_wrapped(cli, np_, "train", f"--data={cli.data}",
                                       f"--out_dir={cli.path('resume-' + tag)}", f"--resume={ckpt}",
                                       *[f"--{k}={v}" for k, v in model.items()]), np_),
        "eval": (mpi_wrapped(cli, np_, "eval", "--ckpt", ckpt, "--data", cli.data), np_),
        "generate": (mpi_wrapped(cli, np_, "generate", "--ckpt", ckpt, "--prompt", "17+25=", "--tokens", "4"), np_),
    }


def body(cli):
    check(len(cli.args) == 1, "expected NP")
    np_ = int(cli.args[0])
    run = cli.path("run")
    cli.train(np_, run, model=dict(TINY, steps=3, val_every=0))
    good = os.path.join(run, "ckpt-000003.h5")
    for name, (argv, ranks) in commands(cli, np_, good, "good").items():
        _, _, err = cli.run(argv, timeout=TIMEOUT, env=ENV)
        codes = re.findall(r"^exit\[\d+\]=(\d+)$", err, re.M)
        check(ranks == 1 or codes == ["0"] * ranks, f"unedited checkpoint: moe {name}: rank exits {codes}:\n"
                                                    f"{err[-2000:]}")
    for case in CASES:
        path = cli.path(f"{case}.h5")
        shutil.copyfile(good, path)
        pattern = edit(path, case)
        for name, (argv, ranks) in commands(cli, np_, path, case).items():
            what = f"{case}: moe {name}"
            rc, out, err = cli.run(argv, timeout=TIMEOUT, env=ENV, expect_rc=None)
            text = out + err
            # with the wrapper, mpiexec's own status says nothing (it may be 0): each rank's counts
            check(ranks > 1 or rc != 0, f"{what}: exit 0\n{text[-2000:]}")
            check(not re.search(r"Segmentation|core dumped|AddressSanitizer|runtime error|Aborted|signal", err),
                  f"{what}: a crash (exit {rc}):\n{err[-3000:]}")
            check(re.search(pattern, text) and os.path.basename(path) in text,
                  f"{what}: no message matching /{pattern}/ naming {os.path.basename(path)}:\n{text[-2000:]}")
            if ranks > 1:
                codes = {int(r): int(c) for r, c in re.findall(r"^exit\[(\d+)\]=(\d+)$", err, re.M)}
                check(sorted(codes) == list(range(ranks)) and all(codes.values()),
                      f"{what}: exit status by rank {codes} (want every one of {ranks} non-zero):\n{err[-2000:]}")
            line = next(l for l in text.splitlines() if re.search(pattern, l))
            print(f"{what}: exit {codes if ranks > 1 else rc}: {line.strip()}")

    # finite weights whose forward overflows: eval fails, verify accepts
    path = cli.path("overflow.h5")
    shutil.copyfile(good, path)
    pattern = edit(path, "overflow")
    cmds = commands(cli, np_, path, "overflow")
    cli.run(cmds["inspect --verify"][0], timeout=TIMEOUT)
    _, out, err = cli.run(cmds["eval"][0], timeout=TIMEOUT, env=ENV, expect_rc=None)
    codes = {int(r): int(c) for r, c in re.findall(r"^exit\[(\d+)\]=(\d+)$", err, re.M)}
    check(sorted(codes) == list(range(np_)) and all(codes.values()) and re.search(pattern, err)
          and not re.search(r"^loss ", out, re.M),
          f"overflow: moe eval: exit status by rank {codes}, want all non-zero and /{pattern}/:\n{out[-500:]}{err[-2000:]}")
    print(f"overflow: moe eval: exit {codes}: {next(l for l in err.splitlines() if re.search(pattern, l))}")


if __name__ == "__main__":
    sys.exit(main(body))
