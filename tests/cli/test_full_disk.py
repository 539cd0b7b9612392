"""A full disk ends the run cleanly: a message naming the file and the
system's reason on every rank, a non-zero exit within the timeout, no
crash, no hang, no temporary file left, no complete checkpoint lost.

    test_full_disk.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- CASE

Each case mounts a small tmpfs (needs root: exit 77, a skip, without it)
and unmounts it afterwards. CASE:
  ckpt_np1       out_dir on a tmpfs too small for a checkpoint, 1 process;
  ckpt_np2       the same on 2 ranks;
  ckpt_midwrite  1 and 2 ranks with the free-space check and the space
                 reservation switched off (MOE_FAULT=h5_space), so that
                 the disk fills in the middle of the HDF5 write;
  ckpt_one_rank  2 ranks, only rank 1 sees a full disk: it runs in a mount
                 namespace of its own with a tiny tmpfs over out_dir
                 (node-local scratch full on one node);
  metrics        a nearly full out_dir: metrics.jsonl stops growing;
  stdout         1 process whose standard output (the log) is redirected
                 to a nearly full tmpfs.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

from moe_cli import TINY, Failure, check, main, read_metrics

TIMEOUT = 60
SMALL = dict(TINY, steps=4, val_every=0)
# A model whose checkpoint (~16 MB) cannot fit in the tmpfs of ckpt_* cases.
BIG = dict(SMALL, d_model=128, n_heads=4, n_experts=8, d_ff=512)


class Tmpfs:
    def __init__(self, path, size):
        self.path = path
        os.makedirs(path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"SKIP: cannot mount a tmpfs (root needed): {r.stderr.strip()}")
            sys.exit(77)

    def fill(self, leave_bytes):
        """Takes all but about leave_bytes of the file system."""
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        with open(os.path.join(self.path, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - leave_bytes))

    def close(self):
        subprocess.run(["umount", "-l", self.path], capture_output=True)


def expect_failure(cli, cmd, np_, pattern, what, env=None, stdout=None):
    full = dict(os.environ)
    full.update(env or {})
    p = subprocess.Popen(cmd, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.work,
                         env=full, start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise Failure(f"{what}: no exit within {TIMEOUT} s (hang)")
    check(p.returncode != 0, f"{what}: exit 0")
    check(not re.search(r"on signal \d|Segmentation|core dumped|Aborted", err), f"{what}: a process crashed:\n{err[-3000:]}")
    lines = [l for l in err.splitlines() if re.search(pattern, l)]
    ranks = {int(m.group(1)) for l in lines if (m := re.match(r"moe\[rank (\d+)\]", l))}
    check(ranks == set(range(np_)) if np_ > 1 else bool(lines),
          f"{what}: want /{pattern}/ from each of {np_} ranks:\n{err[-3000:]}")
    print(f"{what}: exit {p.returncode}: {lines[0]}")
    return err


def train_cmd(cli, np_, run, model, extra=()):
    args = ["train", f"--data={cli.data}", f"--out_dir={run}", *[f"--{k}={v}" for k, v in model.items()], *extra]
    return cli.mpi(np_, *args) if np_ > 1 else [cli.moe, *args]


def no_tmp(run, what):
    left = [n for n in os.listdir(run) if n.endswith(".tmp")] if os.path.isdir(run) else []
    check(not left, f"{what}: temporary files left: {left}")


def body(cli):
    check(len(cli.args) == 1, "expected CASE")
    case = cli.args[0]
    disk = Tmpfs(cli.path("disk"), "4m")
    try:
        run = os.path.join(disk.path, "run")
        space = r"not enough space for '.*ckpt-000002\.h5': it needs about [\d.]+ MB, '.*run' has [\d.]+ MB free"
        if case in ("ckpt_np1", "ckpt_np2"):
            np_ = 1 if case == "ckpt_np1" else 2
            expect_failure(cli, train_cmd(cli, np_, run, BIG, ["--ckpt_every=2"]), np_, space, case)
            no_tmp(run, case)
        elif case == "ckpt_midwrite":
            # MOE_FAULT=h5_space: no free-space check and no reservation
            # (io/h5.c), so the disk fills in the middle of the HDF5 write.
            # One process: the error, then no crash at exit. (Several ranks
            # rely on the reservation: inside HDF5's collective calls ranks
            # that fail at different places cannot be brought together.)
            expect_failure(cli, train_cmd(cli, 1, run, BIG, ["--ckpt_every=2"]), 1,
                           r"cannot write dataset '.*' in '.*ckpt-000002\.h5\.tmp': file write failed: No space left on device",
                           case, env={"MOE_FAULT": "h5_space"})
            no_tmp(run, case)
        elif case == "ckpt_one_rank":
            # Rank 1 sees a 1 MB tmpfs over out_dir in a mount namespace of
            # its own; rank 0 sees the real directory.
            run = cli.path("run")
            os.makedirs(run)
            args = train_cmd(cli, 1, run, BIG, ["--ckpt_every=2"])
            wrap = f"mount -t tmpfs -o size=1m tmpfs {run} && exec \"$0\" \"$@\""
            cmd = [cli.mpiexec, cli.np_flag, "1", *cli.mpi_flags, *args, ":",
                   cli.np_flag, "1", "unshare", "-m", "--propagation", "private", "sh", "-c", wrap, *args]
            expect_failure(cli, cmd, 2, r"rank 1: (not enough space|cannot reserve)", case)
            no_tmp(run, case)
        elif case == "metrics":
            disk.fill(48 * 1024)
            err = expect_failure(cli, train_cmd(cli, 2, run, SMALL, ["--steps=5000", "--log_every=1000"]), 2,
                                 r"cannot write .*run/metrics\.jsonl \(step \d+\): No space left on device", case)
            del err
            with open(os.path.join(run, "metrics.jsonl")) as f:
                text = f.read()
            check(text.endswith("\n"), "metrics: a line was left cut in the middle")
            steps = read_metrics(os.path.join(run, "metrics.jsonl"), exact=False)
            check(sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) < 5000, "metrics: the run went on")
            print(f"metrics: {len(steps)} whole lines kept")
        elif case == "stdout":
            disk.fill(16 * 1024)
            with open(os.path.join(disk.path, "train.log"), "w") as log:
                expect_failure(cli, train_cmd(cli, 1, cli.path("run"), SMALL, ["--steps=5000", "--log_every=1"]), 1,
                               r"cannot write to standard output: No space left on device", case, stdout=log)
        else:
            raise Failure(f"unknown case {case}")
    finally:
        disk.close()


if __name__ == "__main__":
    sys.exit(main(body))
