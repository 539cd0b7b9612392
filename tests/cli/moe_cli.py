"""Shared helpers for the end-to-end tests of the `moe` command (tests/cli).

Every driver is called by ctest as
    DRIVER MOE WORKDIR MPIEXEC NUMPROC_FLAG [MPIEXEC_FLAGS...] [-- DRIVER_ARGS...]
so that it can launch `moe` on any number of ranks the way CMake found MPI.
Every launch is bounded by a timeout that kills the whole process group, so
a hang is a test failure, never a stuck test.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np

# The tiny model of the CLI tests (a few ms per step).
TINY = {
    "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "n_experts": 4, "top_k": 2,
    "d_ff": 64, "batch_size": 4, "steps": 20, "warmup_steps": 5, "val_every": 10,
    "val_batches": 2, "log_every": 100,
}

# The synthetic corpus every test trains on (a pure function of its seed).
DATA_BYTES = "128K"


class Failure(Exception):
    """A failed expectation, reported as one line by main()."""


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Cli:
    """Launches `moe` directly or under mpiexec, in a scratch work directory."""

    def __init__(self, argv):
        if "--" in argv:
            i = argv.index("--")
            argv, self.args = argv[:i], argv[i + 1:]
        else:
            self.args = []
        if len(argv) < 4:
            raise SystemExit("usage: DRIVER MOE WORKDIR MPIEXEC NUMPROC_FLAG [MPIEXEC_FLAGS...] [-- ARGS...]")
        self.moe = os.path.realpath(argv[0])
        self.work = os.path.abspath(argv[1])
        self.mpiexec, self.np_flag, self.mpi_flags = argv[2], argv[3], argv[4:]
        # A fresh scratch directory per test: leftovers of a previous run
        # (a stale `latest`, an appended metrics file) must not leak in.
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.data = self.path("data.txt")
        self.run([self.moe, "data", "synth", "--out", self.data, "--bytes", DATA_BYTES])

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def mpi(self, np_, *args):
        return [self.mpiexec, self.np_flag, str(np_), *self.mpi_flags, self.moe, *args]

    def run(self, cmd, timeout=50, env=None, expect_rc=0):
        """Runs cmd, returns (rc, stdout, stderr). expect_rc: 0 (must
        succeed), "fail" (must fail) or None (any)."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        # errors="replace": generated text need not be UTF-8
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                             cwd=self.work, env=full_env, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise Failure(f"no exit within {timeout} s (hang?): {' '.join(cmd)}\n{err[-2000:]}")
        if expect_rc == 0 and p.returncode != 0:
            raise Failure(f"exit {p.returncode}: {' '.join(cmd)}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}")
        if expect_rc == "fail" and p.returncode == 0:
            raise Failure(f"expected a failure, got exit 0: {' '.join(cmd)}\nstdout:\n{out[-2000:]}")
        return p.returncode, out, err

    def train(self, np_, out_dir, extra=(), model=None, **kw):
        """`moe train` on np_ ranks of the tiny model (overrides in model)."""
        keys = dict(TINY)
        keys.update(model or {})
        args = ["train", f"--data={self.data}", f"--out_dir={out_dir}"]
        args += [f"--{k}={v}" for k, v in keys.items()] + list(extra)
        return self.run(self.mpi(np_, *args), **kw)

    def inspect(self, *args, **kw):
        return self.run([self.moe, "inspect", *args], **kw)


def read_metrics(path, exact=True):
    """Step -> metrics record of metrics.jsonl. exact: numbers stay the
    text cJSON printed (the same double always prints the same text), so
    comparing them is comparing the bits. Fails on a repeated step."""
    recs = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line, parse_float=str if exact else float)
            step = int(r["step"])
            check(step not in recs, f"{path}: step {step} appears twice")
            recs[step] = r
    return recs


# Fields of a metrics record that are functions of the model state only
# (throughput and checkpoint time are not).
STATE_FIELDS = ("loss", "ce", "bpb", "val_loss", "load_balance_loss", "z_loss", "lr", "grad_norm",
                "dropped_frac", "max_over_mean_load", "active_experts", "layers", "vocab_coverage",
                "vocab_max_over_mean_load", "active_vocab_experts")


def h5_items(path):
    """name -> (attributes dict, raw bytes or None) for every group and
    dataset except the root (whose created_at / saved_* differ by design)."""
    items = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()}
            data = obj[()].tobytes() if isinstance(obj, h5py.Dataset) else None
            items[name] = (attrs, data)
        f.visititems(visit)
    return items


def check_h5_bitwise(a, b):
    """Every group and dataset of checkpoint a equals b bit for bit."""
    ia, ib = h5_items(a), h5_items(b)
    check(sorted(ia) == sorted(ib), f"{a} and {b} hold different objects: {sorted(set(ia) ^ set(ib))}")
    for name in ia:
        check(ia[name][0] == ib[name][0], f"attributes of /{name} differ between {a} and {b}")
        check(ia[name][1] == ib[name][1], f"dataset /{name} differs between {a} and {b}")
    return len(ia)


def main(body):
    """Runs body(cli) and turns a Failure into exit 1 with its message."""
    try:
        body(Cli(sys.argv[1:]))
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print("PASS")
    return 0
