"""Preemption: a stop or checkpoint request reaches the ranks at different
moments, and every rank acts at the same step boundary.

    test_preempt.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- CASE

CASE (2 ranks, a run of STEPS steps of the tiny model, checkpoints only at
the end unless asked):
  term_launcher  SIGTERM to launch/moe-local (the job as a user or a
                 scheduler sees it), which forwards it through mpirun;
  int_launcher   the same with SIGINT (Ctrl-C);
  term_ranks     SIGTERM straight to the ranks, rank 0 first and rank 1
                 0.3 s later (what srun or scancel deliver);
  term_one_rank  SIGTERM to the last rank only;
  usr1_launcher  SIGUSR1 to launch/moe-local: a checkpoint on demand, and
                 training goes on to the end.
For a stop: the job exits 0 within BOUND_S, every rank printed nothing on
stderr that looks like a failure, `latest` names the checkpoint of the
last step in metrics.jsonl (every step once), it passes `moe inspect
--verify`, and `--resume` continues to STEPS with metrics equal bit for bit
to an uninterrupted run's and the same final checkpoint. For usr1: exit 0,
the extra checkpoint exists at a step in the middle and verifies, and the
whole run equals the uninterrupted one bit for bit (a checkpoint changes
nothing).
"""
import os
import re
import signal
import subprocess
import sys
import time

from moe_cli import STATE_FIELDS, Failure, check, check_h5_bitwise, main, read_metrics
from test_crash import latest_step, rank_pids, verify

NP = 2
# Long enough that the signal lands mid-run on a fast, idle machine (300
# steps took 1.6 s and finished before it once).
STEPS = 2000
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "n_experts": 4, "top_k": 2, "d_ff": 64,
         "batch_size": 4, "steps": STEPS, "warmup_steps": 5, "val_every": 100, "val_batches": 1, "log_every": 1}
AFTER_LINES = 10  # metrics lines before the signal
BOUND_S = 60
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = ("term_launcher", "int_launcher", "term_ranks", "term_one_rank", "usr1_launcher")


def train_args(cli, run, extra=()):
    return ["train", f"--data={cli.data}", f"--out_dir={run}", "--keep_last=0",
            *[f"--{k}={v}" for k, v in MODEL.items()], *extra]


def launch(cli, via_launcher, run, extra=()):
    if via_launcher:
        env = dict(os.environ, MOE_BIN=cli.moe, MOE_BLAS_PICK_ARGS="--quick")
        cmd = [os.path.join(REPO, "launch", "moe-local"), str(NP), *train_args(cli, run, extra)]
    else:
        env = dict(os.environ)
        cmd = cli.mpi(NP, *train_args(cli, run, extra))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.work, env=env,
                            start_new_session=True)


def finish(job, what):
    try:
        out, err = job.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        raise Failure(f"{what}: no exit within {BOUND_S} s\n{err[-2000:]}")
    return job.returncode, out, err


def wait_lines(run, job, n):
    path = os.path.join(run, "metrics.jsonl")
    t0 = time.monotonic()
    while True:
        check(job.poll() is None, f"the run ended (exit {job.returncode}) before {n} steps were seen")
        check(time.monotonic() - t0 < BOUND_S, f"fewer than {n} steps in {BOUND_S} s")
        try:
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def body(cli):
    check(len(cli.args) == 1 and cli.args[0] in CASES, f"expected CASE, one of {CASES}")
    case = cli.args[0]
    via_launcher = case.endswith("_launcher")

    ref = cli.path("reference")
    rc, _, err = finish(launch(cli, via_launcher, ref), "reference run")
    check(rc == 0, f"the reference run failed (exit {rc}):\n{err[-2000:]}")
    ref_metrics = read_metrics(os.path.join(ref, "metrics.jsonl"))
    ref_final = os.path.join(ref, f"ckpt-{STEPS:06d}.h5")

    run = cli.path("run")
    job = launch(cli, via_launcher, run)
    try:
        wait_lines(run, job, AFTER_LINES)
        if via_launcher:
            sig = {"term": signal.SIGTERM, "int": signal.SIGINT, "usr1": signal.SIGUSR1}[case.split("_")[0]]
            os.kill(job.pid, sig)
        else:
            pids = rank_pids(cli, run)
            check(len(pids) == NP, f"cannot find the {NP} ranks' pids: {pids}")
            if case == "term_one_rank":
                os.kill(pids[NP - 1], signal.SIGTERM)
            else:
                os.kill(pids[0], signal.SIGTERM)
                time.sleep(0.05)
                try:
                    os.kill(pids[1], signal.SIGTERM)
                except ProcessLookupError:
                    pass  # the job already stopped at the step rank 0's request named
        t_sig = time.monotonic()
        rc, out, err = finish(job, case)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    check(rc == 0, f"{case}: exit {rc} (want 0)\nstdout:\n{out[-1500:]}\nstderr:\n{err[-2000:]}")
    check(not re.search(r"moe\[rank|error|on signal \d|Killed|core dumped", err), f"{case}: failure on stderr:\n{err[-2000:]}")
    got = read_metrics(os.path.join(run, "metrics.jsonl"))
    last = max(got)
    check(sorted(got) == list(range(1, last + 1)), f"{case}: metrics.jsonl holds steps {sorted(got)}")

    if case == "usr1_launcher":
        check(last == STEPS, f"usr1: the run stopped at step {last} of {STEPS}")
        extra = sorted(int(m.group(1)) for n in os.listdir(run) if (m := re.match(r"ckpt-(\d+)\.h5$", n)))
        check(len(extra) == 2 and AFTER_LINES <= extra[0] < STEPS and extra[1] == STEPS,
              f"usr1: checkpoints {extra}, want one on demand after step {AFTER_LINES} and the final one")
        verify(cli, os.path.join(run, f"ckpt-{extra[0]:06d}.h5"))
        check(f"checkpoint step {extra[0]} written" in out, f"usr1: no report of checkpoint {extra[0]}:\n{out[-1500:]}")
        for s in range(1, STEPS + 1):
            for k in STATE_FIELDS:
                check(got[s].get(k) == ref_metrics[s].get(k), f"usr1: step {s} {k} differs from the reference")
        check_h5_bitwise(os.path.join(run, f"ckpt-{STEPS:06d}.h5"), ref_final)
        print(f"usr1: checkpoint on demand at step {extra[0]}, run finished bitwise equal to the reference")
        return

    check(last < STEPS, f"{case}: the run was not stopped (it reached step {last})")
    check(latest_step(run) == last, f"{case}: latest names step {latest_step(run)}, metrics end at {last}")
    verify(cli, os.path.join(run, f"ckpt-{last:06d}.h5"))
    check(re.search(rf"stopped at step {last} of {STEPS} on request", out), f"{case}: no stop report:\n{out[-1500:]}")
    print(f"{case}: stopped at step {last} in {time.monotonic() - t_sig:.1f} s after the signal, exit 0")

    rc, _, err = finish(launch(cli, via_launcher, run, [f"--resume={run}"]), "resume")
    check(rc == 0, f"{case}: the resume failed (exit {rc}):\n{err[-2000:]}")
    got = read_metrics(os.path.join(run, "metrics.jsonl"))
    check(sorted(got) == list(range(1, STEPS + 1)), f"{case}: after the resume metrics hold steps {sorted(got)}")
    for s in range(1, STEPS + 1):
        for k in STATE_FIELDS:
            check(got[s].get(k) == ref_metrics[s].get(k),
                  f"{case}: step {s} {k}: {got[s].get(k)} after the resume, {ref_metrics[s].get(k)} uninterrupted")
    check_h5_bitwise(os.path.join(run, f"ckpt-{STEPS:06d}.h5"), ref_final)
    print(f"{case}: resumed from step {last} to {STEPS}, bitwise equal to the uninterrupted run")


if __name__ == "__main__":
    sys.exit(main(body))
