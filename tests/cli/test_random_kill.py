"""A rank SIGKILLed at a random moment of training loses nothing.

    test_random_kill.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP TRIALS [SEED]

First an uninterrupted reference run on NP ranks (checkpoint every CKPT_EVERY
steps). Then TRIALS times: the same run from scratch, and at a random moment
(uniform over the reference run's duration, so it falls into the forward,
the exchange, the all-reduce, the optimizer or a checkpoint write alike) one
random rank gets SIGKILL. Each trial requires:
  - every process of the job is gone within END_S seconds, and the launcher
    names the lost rank in its message;
  - `latest` names a complete checkpoint, and every file under a final
    checkpoint name passes `moe inspect --verify`;
  - `--resume` from the run directory continues to the last step, and the
    metrics of every step after the checkpoint equal the reference run's
    exactly (the JSON text, i.e. the bits), with no step repeated in
    metrics.jsonl, and the final checkpoint equals the reference's bit for
    bit.
A kill that lands before the first checkpoint still has to end the job
cleanly; the resume then starts from scratch.
"""
import os
import random
import signal
import subprocess
import sys
import time

from moe_cli import STATE_FIELDS, Failure, check, check_h5_bitwise, main, read_metrics
from test_crash import latest_step, rank_pids, verify

MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_experts": 4, "d_ff": 128, "moe_every": 1,
         "seq_len": 32, "batch_size": 4, "steps": 40, "val_every": 10, "val_batches": 1}
CKPT_EVERY = 5
END_S = 30


def train_cmd(cli, np_, run, extra=()):
    return cli.mpi(np_, "train", f"--data={cli.data}", f"--out_dir={run}", f"--ckpt_every={CKPT_EVERY}",
                   "--keep_last=3", *[f"--{k}={v}" for k, v in MODEL.items()], *extra)


def job_processes(cli, run):
    """pids of `moe` processes still training into run."""
    out = subprocess.run(["pgrep", "-f", "--", f"--out_dir={run}( |$)"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_at_random(cli, np_, run, rng, duration):
    """Starts the run, SIGKILLs a random rank after a random delay, waits
    for the whole job to end. Returns (rank, delay) or None when the run
    ended before the kill."""
    job = subprocess.Popen(train_cmd(cli, np_, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=cli.work, start_new_session=True)
    try:
        delay, rank = rng.uniform(0.05, duration), rng.randrange(np_)
        t0 = time.monotonic()
        pid = None
        while time.monotonic() - t0 < delay or pid is None:
            if job.poll() is not None:
                return None
            pids = rank_pids(cli, run)
            pid = pids.get(rank) if len(pids) == np_ else None
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            out, _ = job.communicate(timeout=END_S)
        except subprocess.TimeoutExpired:
            if rank_pids(cli, run):  # a zombie has no exe: it counts as gone
                raise Failure(f"the job did not end within {END_S} s of SIGKILL to rank {rank} at {delay:.2f} s")
            # Every rank is gone and mpirun is not: Open MPI 4.1's finalize
            # hang after a rank died while starting (docs/cluster.md), not
            # moerun's. launch/moe-local kills such an mpirun; so does this.
            print(f"trial: every rank gone {END_S} s after SIGKILL to rank {rank} at {delay:.2f} s, mpirun still "
                  "there (Open MPI's finalize hang); killed it as launch/moe-local does")
            os.killpg(job.pid, signal.SIGKILL)
            out, _ = job.communicate()
        # mpirun exits once it has killed the rest; the ranks must be gone too.
        while job_processes(cli, run) and time.monotonic() - t_kill < END_S:
            time.sleep(0.1)
        left = job_processes(cli, run)
        check(not left, f"processes {left} still run {END_S} s after rank {rank} was killed")
        check(job.returncode != 0, f"the job exited 0 although rank {rank} was killed at {delay:.2f} s")
        check(f"rank {rank}" in out, f"the job's output does not name the lost rank {rank}:\n{out[-1500:]}")
        return rank, delay
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def body(cli):
    check(len(cli.args) in (2, 3), "expected NP TRIALS [SEED]")
    np_, trials = int(cli.args[0]), int(cli.args[1])
    rng = random.Random(int(cli.args[2]) if len(cli.args) == 3 else 20261130)
    last = MODEL["steps"]

    ref = cli.path("reference")
    t0 = time.monotonic()
    cli.run(train_cmd(cli, np_, ref), timeout=120)
    duration = time.monotonic() - t0
    ref_metrics = read_metrics(os.path.join(ref, "metrics.jsonl"))
    ref_final = os.path.join(ref, f"ckpt-{last:06d}.h5")
    print(f"reference run: {last} steps on {np_} ranks in {duration:.1f} s")

    for trial in range(1, trials + 1):
        run = cli.path(f"trial{trial}")
        os.makedirs(run)
        hit = kill_at_random(cli, np_, run, rng, duration)
        if hit is None:
            print(f"trial {trial}: the run finished before the kill; not counted")
            continue
        rank, delay = hit
        good = latest_step(run)
        finals = sorted(int(n[5:11]) for n in os.listdir(run) if n.startswith("ckpt-") and n.endswith(".h5"))
        # The checkpoint file takes its final name just before `latest` moves
        # to it (after the step's metrics line): a kill in between leaves
        # one complete checkpoint newer than `latest`, which the resume
        # writes again.
        allowed = finals[-2:] if len(finals) >= 2 else finals + [None]
        check(good in allowed, f"trial {trial}: latest names step {good}, complete checkpoints are {finals}")
        for s in finals:
            verify(cli, os.path.join(run, f"ckpt-{s:06d}.h5"))
        # resume = auto: from the directory's latest checkpoint, or from
        # scratch in the same directory when the kill came before the first
        cli.run(train_cmd(cli, np_, run, ["--resume=auto"]), timeout=120)
        got = read_metrics(os.path.join(run, "metrics.jsonl"))
        check(sorted(got) == list(range(1, last + 1)),
              f"trial {trial}: metrics.jsonl holds steps {sorted(got)}, want 1..{last} once each")
        for s in range((good or 0) + 1, last + 1):
            for k in STATE_FIELDS:
                check(got[s].get(k) == ref_metrics[s].get(k),
                      f"trial {trial}: step {s} {k}: {got[s].get(k)} after the resume, {ref_metrics[s].get(k)} uninterrupted")
        check_h5_bitwise(os.path.join(run, f"ckpt-{last:06d}.h5"), ref_final)
        print(f"trial {trial}: rank {rank} killed at {delay:.2f} s; latest = step {good}; "
              f"resumed to {last} bitwise equal to the reference")


if __name__ == "__main__":
    sys.exit(main(body))
