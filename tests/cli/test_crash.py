"""A rank killed while a checkpoint is being written loses nothing.

    test_crash.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- KILL_RANK

Trains on 2 ranks a model whose checkpoint takes a noticeable time to write
(~28 MB, a checkpoint every step) and watches the run directory. Once a
good checkpoint exists and the next one appears as ckpt-*.h5.tmp, rank
KILL_RANK gets SIGKILL. Then: the job ends by itself (bounded wait), `latest`
names the newest complete checkpoint, every file under a final ckpt name
passes `moe inspect --verify`, and `--resume` from the run directory
continues from it and rewrites the interrupted checkpoint.

The kill may land just after the write finished (the final file then
exists): such an attempt is retried; if no attempt hits a write the test
fails, it never passes without having interrupted one.
"""
import os
import re
import signal
import subprocess
import sys
import time

from moe_cli import Failure, check, main, read_metrics

NP = 2
MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_experts": 8, "d_ff": 512, "moe_every": 1,
         "seq_len": 32, "batch_size": 2, "steps": 200, "val_every": 0}
RUN_ARGS = ["--ckpt_every=1", "--keep_last=2"]
ATTEMPTS = 5
WATCH_S = 40  # for the first checkpoint and then a .tmp
END_S = 30    # for the job to end after the kill
CKPT = re.compile(r"ckpt-(\d+)\.h5$")
TMP = re.compile(r"ckpt-(\d+)\.h5\.tmp$")


def latest_step(run):
    try:
        with open(os.path.join(run, "latest")) as f:
            m = CKPT.match(f.read().strip())
    except FileNotFoundError:
        return None
    return int(m.group(1)) if m else None


def rank_pids(cli, run):
    """world rank -> pid of the `moe` processes training into run."""
    out = subprocess.run(["pgrep", "-f", "--", f"--out_dir={run}( |$)"], capture_output=True, text=True).stdout
    ranks = {}
    for pid in map(int, out.split()):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != cli.moe:
                continue  # mpirun itself, whose command line names the run too
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"OMPI_COMM_WORLD_RANK" in env:
            ranks[int(env[b"OMPI_COMM_WORLD_RANK"])] = pid
    return ranks


def kill_during_write(cli, run, kill_rank):
    """Starts the run, SIGKILLs kill_rank while ckpt N.tmp is being written
    (N > a committed checkpoint), waits for the job to end. Returns N."""
    cmd = cli.mpi(NP, "train", f"--data={cli.data}", f"--out_dir={run}", *RUN_ARGS,
                  *[f"--{k}={v}" for k, v in MODEL.items()])
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cli.work,
                           start_new_session=True)
    try:
        step, deadline = None, time.monotonic() + WATCH_S
        while step is None:
            check(job.poll() is None, f"the run ended (exit {job.returncode}) before a checkpoint could be hit")
            check(time.monotonic() < deadline, f"no checkpoint write seen within {WATCH_S} s")
            good = latest_step(run)
            tmps = [int(m.group(1)) for n in os.listdir(run) if (m := TMP.match(n))] if good else []
            if tmps and max(tmps) > good:
                pid = rank_pids(cli, run).get(kill_rank)
                check(pid is not None, f"cannot find the pid of rank {kill_rank} (pgrep -f --out_dir={run})")
                os.kill(pid, signal.SIGKILL)
                step = max(tmps)
            else:
                time.sleep(0.002)
        try:
            _, err = job.communicate(timeout=END_S)
        except subprocess.TimeoutExpired:
            raise Failure(f"the job did not end within {END_S} s of SIGKILL to rank {kill_rank}")
        check(job.returncode != 0, "the job exited 0 although a rank was killed")
        return step
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def verify(cli, path):
    rc, out, _ = cli.inspect(path, "--verify", expect_rc=None)
    check(rc == 0 and " 0 failed" in out, f"moe inspect --verify {path} (exit {rc}):\n{out[-1500:]}")


def body(cli):
    check(len(cli.args) == 1, "expected KILL_RANK")
    kill_rank = int(cli.args[0])
    for attempt in range(1, ATTEMPTS + 1):
        run = cli.path(f"attempt{attempt}")
        os.makedirs(run)
        step = kill_during_write(cli, run, kill_rank)
        if not os.path.exists(os.path.join(run, f"ckpt-{step:06d}.h5")):
            break
        print(f"attempt {attempt}: the kill landed after checkpoint {step} was complete; retrying")
    else:
        raise Failure(f"in {ATTEMPTS} attempts the kill never interrupted a checkpoint write")
    print(f"attempt {attempt}: rank {kill_rank} killed while ckpt-{step:06d}.h5.tmp was being written")

    finals = sorted(int(m.group(1)) for n in os.listdir(run) if (m := CKPT.match(n)))
    good = latest_step(run)
    check(finals and good == finals[-1] and good < step,
          f"latest names step {good}; complete checkpoints {finals}; interrupted {step}")
    for s in finals:
        verify(cli, os.path.join(run, f"ckpt-{s:06d}.h5"))

    # Resume from the run directory, past the interrupted checkpoint.
    to = step + 1
    _, out, _ = cli.train(NP, run, [f"--resume={run}", *RUN_ARGS], dict(MODEL, steps=to), timeout=END_S)
    check(f"ckpt-{good:06d}.h5 at step {good}" in out, f"resume did not start from ckpt-{good:06d}.h5:\n{out}")
    check(latest_step(run) == to, f"after resuming to {to}, latest names step {latest_step(run)}")
    for s in (step, to):
        verify(cli, os.path.join(run, f"ckpt-{s:06d}.h5"))
    left = [n for n in os.listdir(run) if n.endswith(".tmp")]
    check(not left, f"temporary files left after the resumed run: {left}")
    steps = sorted(read_metrics(os.path.join(run, "metrics.jsonl"), exact=False))
    check(steps == list(range(1, to + 1)), f"metrics.jsonl holds steps {steps}, want 1..{to}")
    print(f"latest = ckpt-{good:06d}.h5 verified; resumed to step {to}; ckpt-{step:06d}.h5 rewritten and verified")


if __name__ == "__main__":
    sys.exit(main(body))
