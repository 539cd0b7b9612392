"""Input files that are not what a command expects, or that change under a
running job: a clear message naming the file on every rank, a non-zero exit
within the timeout, no crash (no SIGBUS), no hang.

    test_hostile_files.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- CASE

CASE:
  fifo_data, fifo_val, fifo_config, fifo_resume   `moe train` (2 ranks) given
                a named pipe as data, val_data, --config or --resume;
  fifo_prompt, fifo_eval, fifo_tokenizer          `moe generate
                --prompt_file`, `moe eval --data`, `moe tokenizer info` given
                a named pipe (nobody ever writes to it: opening it for
                reading would wait for ever);
  truncate_mid_run   the training data file is truncated while 2 ranks
                read it (a mapped file would end in SIGBUS);
  rewrite_mid_run    the training data file is replaced by other bytes of
                the same size while 2 ranks read it;
  truncate_tok_mid_run   the same as truncate_mid_run with a token file
                (`moe data encode`) as the training data;
  sparse_1tb    a 1 TB sparse data file: the run starts at once (no
                terabyte read for statistics), trains, and its memory stays
                small.
In the mid-run cases the checkpoint written before the change still
verifies.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from moe_cli import TINY, check, main
from test_crash import verify
from test_tokens import encode, tokenizer

TIMEOUT = 60
CASES = ("fifo_data", "fifo_val", "fifo_config", "fifo_resume", "fifo_prompt", "fifo_eval", "fifo_tokenizer",
         "truncate_mid_run", "rewrite_mid_run", "truncate_tok_mid_run", "sparse_1tb")


def every_rank(err, pattern, np_, what):
    lines = [l for l in err.splitlines() if re.search(pattern, l)]
    ranks = {int(m.group(1)) for l in lines if (m := re.match(r"moe\[rank (\d+)\]", l))}
    check(ranks == set(range(np_)) or (np_ == 1 and lines) or len(lines) >= np_,
          f"{what}: want /{pattern}/ from each of {np_} ranks:\n{err[-3000:]}")
    check(not re.search(r"on signal \d|Bus error|SIGBUS|Segmentation|core dumped", err), f"{what}: a crash:\n{err[-3000:]}")
    print(f"{what}: {lines[0]}")


def tiny_args(cli, run, data=None):
    return ["train", f"--data={data or cli.data}", f"--out_dir={run}", *[f"--{k}={v}" for k, v in TINY.items()]]


def body(cli):
    check(len(cli.args) == 1 and cli.args[0] in CASES, f"expected CASE, one of {CASES}")
    case = cli.args[0]
    fifo = cli.path("pipe")
    os.mkfifo(fifo)
    run = cli.path("run")
    not_regular = r"'?.*pipe'? is not a regular file"

    if case in ("fifo_data", "fifo_val", "fifo_config", "fifo_resume"):
        extra = {"fifo_data": [f"--data={fifo}"], "fifo_val": [f"--val_data={fifo}"],
                 "fifo_config": ["--config", fifo], "fifo_resume": [f"--resume={fifo}"]}[case]
        rc, _, err = cli.run(cli.mpi(2, *tiny_args(cli, run), *extra), timeout=TIMEOUT, expect_rc="fail")
        every_rank(err, not_regular, 2, case)
        if case == "fifo_val":
            check(re.search(r"validation file \(val_data\) '.*pipe'", err), f"{case}: the message does not say val_data")

    elif case in ("fifo_prompt", "fifo_eval", "fifo_tokenizer"):
        cli.train(1, run, ["--steps=2", "--val_every=0"])
        cmd = {"fifo_prompt": cli.mpi(2, "generate", "--ckpt", run, "--prompt_file", fifo, "--tokens", "4"),
               "fifo_eval": cli.mpi(2, "eval", "--ckpt", run, "--data", fifo),
               "fifo_tokenizer": [cli.moe, "tokenizer", "info", "--tokenizer", fifo]}[case]
        rc, _, err = cli.run(cmd, timeout=TIMEOUT, expect_rc="fail")
        every_rank(err, not_regular, 1, case)

    elif case in ("truncate_mid_run", "rewrite_mid_run", "truncate_tok_mid_run"):
        extra = []
        if case == "truncate_tok_mid_run":
            tok = tokenizer(cli)
            data = encode(cli, tok, cli.path("mine.tok"))
            extra = [f"--tokenizer={tok}"]
        else:
            data = cli.path("mine.txt")
            with open(cli.data, "rb") as f, open(data, "wb") as g:
                g.write(f.read())
        size = os.path.getsize(data)
        args = tiny_args(cli, run, data) + extra + ["--steps=100000", "--ckpt_every=20", "--val_every=0",
                                                    "--log_every=1"]
        job = subprocess.Popen(cli.mpi(2, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=cli.work, start_new_session=True)
        try:
            t0 = time.monotonic()
            while not os.path.exists(os.path.join(run, "ckpt-000040.h5")):
                check(job.poll() is None and time.monotonic() - t0 < TIMEOUT, "no checkpoint 40 in time")
                time.sleep(0.02)
            if case != "rewrite_mid_run":
                os.truncate(data, 1000)
            else:
                tmp = data + ".new"
                with open(tmp, "wb") as g:
                    g.write(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
                shutil.copyfile(tmp, data)  # as cp does: truncate, then write, same inode
            try:
                out, err = job.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                check(False, f"{case}: no exit within {TIMEOUT} s after the data changed")
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
        check(job.returncode != 0, f"{case}: exit 0")
        every_rank(err, r"data file '.*mine\.(txt|tok)' changed while the run reads it", 2, case)
        verify(cli, os.path.join(run, "ckpt-000040.h5"))

    elif case == "sparse_1tb":
        data = cli.path("sparse.bin")
        with open(data, "wb") as f:
            f.truncate(1 << 40)
        t0 = time.monotonic()
        _, out, _ = cli.run(cli.mpi(2, *tiny_args(cli, run, data), "--steps=3", "--val_every=0"), timeout=TIMEOUT)
        took = time.monotonic() - t0
        m = re.search(r"peak RSS (\d+) MB", out)
        check(m and int(m.group(1)) < 500, f"sparse_1tb: peak RSS {m.group(1) if m else '?'} MB:\n{out}")
        check(re.search(r"1099511627776 training bytes", out), f"sparse_1tb: the size is not reported:\n{out}")
        os.unlink(data)
        print(f"sparse_1tb: 3 steps on a 1 TB file in {took:.1f} s, peak RSS {m.group(1)} MB")


if __name__ == "__main__":
    sys.exit(main(body))
