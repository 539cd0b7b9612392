"""launch/moe-local bounds an mpirun that does not exit after its job.

    test_launcher_exit.py MOE

Open MPI 4.1's mpirun can hang for good in its own finalize after a rank
died while starting (docs/cluster.md). moe-local gives an mpirun whose
processes have all ended MOE_MPIRUN_EXIT_S seconds, then kills it. A fake
`mpirun` first on PATH plays each case (the real hang cannot be caused on
demand):
  - hang: one process, then mpirun stays without any: killed after the
    grace, the line says so, the exit status is non-zero;
  - slow: a process that outlives the grace: not killed, exit 0;
  - normal: exits after its process: exit 0 at once, no line.
"""
import os
import subprocess
import sys
import tempfile
import time

MOE_LOCAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "moe-local")
GRACE = 2

FAKES = {
    # the process ends; mpirun then never exits (and has no process left)
    "hang": "sleep 0.5 & wait $!\nexec sleep 600\n",
    # the one process runs for 2 graces, then mpirun exits 0
    "slow": f"sleep {2 * GRACE} & wait $!\nexit 0\n",
    "normal": "sleep 0.5 & wait $!\nexit 0\n",
}


def run(case, moe):
    with tempfile.TemporaryDirectory() as d:
        fake = os.path.join(d, "mpirun")
        with open(fake, "w") as f:
            f.write("#!/usr/bin/env bash\n" + FAKES[case])
        os.chmod(fake, 0o755)
        env = dict(os.environ, PATH=d + os.pathsep + os.environ["PATH"], MOE_BIN=moe, MOE_MPIRUN_EXIT_S=str(GRACE))
        t0 = time.monotonic()
        p = subprocess.run([MOE_LOCAL, "1", "help"], env=env, capture_output=True, text=True, timeout=60)
        return p.returncode, time.monotonic() - t0, p.stderr


def main():
    moe = os.path.realpath(sys.argv[1])
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    rc, s, err = run("hang", moe)
    print(f"hang: rc {rc}, {s:.1f} s, stderr: {err.strip()}")
    check(rc != 0, "hang: moe-local exited 0 although it killed mpirun")
    check(GRACE <= s < GRACE + 10, f"hang: ended after {s:.1f} s, want about {GRACE} s after the process ended")
    check("still running" in err and "killed it" in err, "hang: no line saying mpirun was killed")
    rc, s, err = run("slow", moe)
    print(f"slow: rc {rc}, {s:.1f} s")
    check(rc == 0 and "killed" not in err, f"slow: rc {rc}, stderr {err!r}: a live process must not be cut short")
    check(s >= 2 * GRACE, f"slow: ended after {s:.1f} s, before its process did")
    rc, s, err = run("normal", moe)
    print(f"normal: rc {rc}, {s:.1f} s")
    check(rc == 0 and "killed" not in err, f"normal: rc {rc}, stderr {err!r}")
    check(s < GRACE + 2, f"normal: took {s:.1f} s")
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
