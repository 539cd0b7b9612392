"""The run directory (out_dir) keeps one run, whole, whatever users do.

    test_run_dir.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP CASE

CASE:
  overwrite    a fresh run into a directory that holds a finished run is
               refused (the message says how to continue it) and the old
               run's files stay byte for byte as they were;
  auto         resume = auto starts fresh in an empty directory, and then
               continues from its latest checkpoint;
  concurrent   a second run in the directory of a running one is refused
               at once (naming the holder), and the first run goes on
               unharmed (then stopped by SIGTERM, as a preempted run);
  other_dir    resuming run A's checkpoint into run B's directory is
               refused;
  older_ckpt   resuming from an older checkpoint of the same directory
               redoes the later steps: metrics.jsonl holds every step once,
               equal bit for bit to the first pass;
  latest_bad   a `latest` holding garbage (escape sequences, invalid
               UTF-8) is refused without echoing it;
  stale_tmp    temporary files left by a run that died while writing are
               removed by the next run in the directory.
Every failure must be a clear message and a non-zero exit on every rank,
within the timeout.
"""
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

from moe_cli import STATE_FIELDS, check, main, read_metrics
from test_crash import rank_pids

CASES = ("overwrite", "auto", "concurrent", "other_dir", "older_ckpt", "latest_bad", "stale_tmp")


def digest(run):
    """name -> sha1 of every file of the run but `lock` (each start notes its pid there)."""
    out = {}
    for n in sorted(os.listdir(run)):
        if n == "lock":
            continue
        with open(os.path.join(run, n), "rb") as f:
            out[n] = hashlib.sha1(f.read()).hexdigest()
    return out


def refused(cli, np_, err, rc, pattern, what):
    check(rc != 0, f"{what}: exit 0")
    lines = [l for l in err.splitlines() if re.search(pattern, l)]
    ranks = {int(m.group(1)) for l in lines if (m := re.match(r"moe\[rank (\d+)\]", l))}
    check(ranks == set(range(np_)) or (np_ == 1 and lines), f"{what}: want /{pattern}/ on every rank:\n{err[-2000:]}")
    print(f"{what}: refused: {lines[0]}")


def body(cli):
    check(len(cli.args) == 2 and cli.args[1] in CASES, f"expected NP CASE, CASE one of {CASES}")
    np_, case = int(cli.args[0]), cli.args[1]
    run = cli.path("run")

    if case == "overwrite":
        cli.train(np_, run, ["--steps=3"])
        before = digest(run)
        rc, _, err = cli.train(np_, run, ["--steps=3"], expect_rc=None)
        refused(cli, np_, err, rc, rf"out_dir '.*run' already holds a run .*--resume=", case)
        after = digest(run)
        check(before == after, f"overwrite: files changed: {sorted(k for k in after if before.get(k) != after[k])}")

    elif case == "auto":
        _, out, _ = cli.train(np_, run, ["--steps=3", "--resume=auto"])
        check("resumed" not in out, f"auto: an empty directory resumed:\n{out}")
        _, out, _ = cli.train(np_, run, ["--steps=5", "--resume=auto"])
        check(re.search(r"resumed from .*ckpt-000003\.h5 at step 3", out), f"auto: no resume from step 3:\n{out}")
        got = sorted(read_metrics(os.path.join(run, "metrics.jsonl")))
        check(got == [1, 2, 3, 4, 5], f"auto: metrics steps {got}")
        print("auto: fresh start, then resumed from step 3 to 5")

    elif case == "concurrent":
        first = subprocess.Popen(cli.mpi(np_, "train", f"--data={cli.data}", f"--out_dir={run}", "--steps=1000000",
                                         *[f"--{k}={v}" for k, v in {"d_model": 32, "n_layers": 2, "n_heads": 2,
                                                                       "seq_len": 32, "n_experts": 4, "d_ff": 64,
                                                                       "batch_size": 4, "val_every": 0}.items()]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.work,
                                 start_new_session=True)
        try:
            t0 = time.monotonic()
            metrics = os.path.join(run, "metrics.jsonl")
            while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
                check(first.poll() is None and time.monotonic() - t0 < 60, "the first run did not start")
                time.sleep(0.02)
            rc, _, err = cli.train(np_, run, ["--resume=auto"], expect_rc=None, timeout=40)
            refused(cli, np_, err, rc, rf"out_dir '.*run' is in use by another run \(pid \d+ on ", case)
            check(first.poll() is None, "the first run ended while the second one was refused")
            # A step count no machine finishes in time: the first run is
            # stopped by preemption (SIGTERM to its ranks), which it must
            # survive as it would without the second run.
            pids = rank_pids(cli, run)
            check(len(pids) == np_, f"cannot find the first run's {np_} ranks: {pids}")
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
            out, err = first.communicate(timeout=120)
            check(first.returncode == 0, f"the first run failed after the second was refused:\n{err[-2000:]}")
            stop = re.search(r"stopped at step (\d+) of 1000000 on request", out)
            check(stop, f"the first run did not stop on SIGTERM as a preempted run:\n{out[-1500:]}")
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
        last = int(stop.group(1))
        got = sorted(read_metrics(os.path.join(run, "metrics.jsonl")))
        check(got == list(range(1, last + 1)), f"concurrent: the first run's metrics are not 1..{last}")
        check(os.path.exists(os.path.join(run, f"ckpt-{last:06d}.h5")), f"concurrent: no checkpoint of step {last}")
        print(f"concurrent: the first run went on, stopped at step {last} with its checkpoint")

    elif case == "other_dir":
        a, b = cli.path("a"), cli.path("b")
        cli.train(np_, a, ["--steps=2"])
        cli.train(np_, b, ["--steps=2"])
        before = digest(b)
        rc, _, err = cli.train(np_, b, [f"--resume={a}", "--steps=4"], expect_rc=None)
        refused(cli, np_, err, rc, rf"out_dir '.*b' already holds another run .*resuming '.*a/ckpt-000002\.h5'", case)
        check(digest(b) == before, "other_dir: run b changed")

    elif case == "older_ckpt":
        cli.train(np_, run, ["--steps=20", "--ckpt_every=5", "--keep_last=0"])
        first = read_metrics(os.path.join(run, "metrics.jsonl"))
        cli.train(np_, run, [f"--resume={run}/ckpt-000010.h5", "--steps=20", "--ckpt_every=5", "--keep_last=0"])
        again = read_metrics(os.path.join(run, "metrics.jsonl"))
        check(sorted(again) == list(range(1, 21)), f"older_ckpt: steps {sorted(again)}")
        for s in range(1, 21):
            for k in STATE_FIELDS:
                check(again[s].get(k) == first[s].get(k), f"older_ckpt: step {s} {k} differs")
        print("older_ckpt: steps 11..20 redone, every step once, bitwise equal")

    elif case == "latest_bad":
        cli.train(np_, run, ["--steps=2"])
        with open(os.path.join(run, "latest"), "wb") as f:
            f.write(b"\x1b[2J\x1b]0;pwned\x07\xff\xfeckpt-000002.h5\n")
        rc, out, err = cli.train(np_, run, [f"--resume={run}", "--steps=3"], expect_rc=None)
        refused(cli, np_, err, rc, r"'.*run/latest' is damaged: it should hold one line naming a checkpoint", case)
        check("\x1b" not in err + out and "\ufffd" not in err + out and "pwned" not in err + out,
              "latest_bad: the file's bytes were echoed")
        rc, out, _ = cli.inspect(run, expect_rc=None)
        check(rc != 0 and "\x1b" not in out, "latest_bad: moe inspect accepted or echoed it")

    elif case == "stale_tmp":
        cli.train(np_, run, ["--steps=2"])
        for n in ("ckpt-000004.h5.tmp", "grads-000004.h5.tmp", "latest.tmp", "metrics.jsonl.tmp"):
            with open(os.path.join(run, n), "wb") as f:
                f.write(b"partial")
        keep = os.path.join(run, "notes.tmp")  # not moerun's: stays
        with open(keep, "w") as f:
            f.write("mine")
        cli.train(np_, run, [f"--resume={run}", "--steps=3"])
        left = sorted(n for n in os.listdir(run) if n.endswith(".tmp"))
        check(left == ["notes.tmp"], f"stale_tmp: temporary files left: {left}")
        print("stale_tmp: the dead run's temporary files are gone, the user's file stays")


if __name__ == "__main__":
    sys.exit(main(body))
