#!/usr/bin/env python3
"""Smoke test of the benchmark driver: `bench/all.sh --quick` runs every
bench/*.sh in its tiny mode (so the scripts cannot rot), writes a perf.md
into the scratch directory (never docs/perf.md), and --update-readme copies
its summary table into a copy of the README between the markers. Asserts
that each script ran and printed well-formed figures, not their values.

    test_bench.py MOE_BIN REPO_DIR WORK_DIR
"""
import glob
import os
import re
import shutil
import subprocess
import sys

MOE, REPO, WORK = sys.argv[1:4]
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
env = dict(os.environ, MOE_BIN=MOE, XDG_CACHE_HOME=os.path.join(WORK, "cache"), MOE_BLAS_PICK_ARGS="--quick")
allsh = os.path.join(REPO, "bench", "all.sh")


def run(args, timeout=900):
    return subprocess.run(["bash", allsh] + args, capture_output=True, text=True, env=env, cwd=WORK, timeout=timeout)


def fail(msg, p=None):
    if p is not None:
        msg += f"\n--- exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-8000:]}"
    sys.exit("FAIL: " + msg)


def skipped(f):
    """A script that is not a performance benchmark says so (bench/soak.sh)."""
    with open(f) as fh:
        return "# bench/all.sh: skip\n" in fh.read()


scripts = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "bench", "*.sh"))
                 if os.path.basename(f) not in ("all.sh", "env.sh") and not skipped(f))
perf_md = os.path.join(WORK, "perf.md")
p = run(["--quick", "--out", perf_md])
if p.returncode != 0:
    fail("bench/all.sh --quick failed", p)
text = open(perf_md).read()
if "Quick mode: the figures mean nothing" not in text:
    fail("perf.md does not say it holds quick figures")
for n in scripts:
    # every script's section names its command and holds at least one figure row
    sec = re.search(rf"`bench/{n}\.sh` \(\d+ s\)\n(.*?)(?=\n## |\Z)", text, re.S)
    if not sec:
        fail(f"no section for bench/{n}.sh in perf.md")
    rows = re.findall(r"^\| `([\w.]+)` \| (\S+) \| (\S+) \| (.+) \|$", sec.group(1), re.M)
    if not rows:
        fail(f"bench/{n}.sh printed no PERF figure")
    for key, value, unit, what in rows:
        if not re.match(r"^[a-z0-9_]+(\.[A-Za-z0-9_]+)+$", key):
            fail(f"bench/{n}.sh: key '{key}' is not dotted lower case")
for field in ("| CPU |", "| OpenBLAS |", "| Open MPI |", "| HDF5 |", "| PyTorch |", "| gcc |", "OPENBLAS_CORETYPE="):
    if field not in text:
        fail(f"perf.md lacks {field}")
summary = re.search(r"<!-- summary:begin -->\n(.*?)<!-- summary:end -->", text, re.S)
if not summary or summary.group(1).count("\n") < 4:
    fail("perf.md has no summary table")

# --update-readme: the marked block of a README copy becomes the summary
readme = os.path.join(WORK, "README.md")
shutil.copy(os.path.join(REPO, "README.md"), readme)
p = run(["--update-readme", "--out", perf_md, "--readme", readme])
if p.returncode != 0:
    fail("--update-readme failed", p)
new = open(readme).read()
block = re.search(r"<!-- perf-table:begin[^\n]*\n(.*?)<!-- perf-table:end -->", new, re.S)
if not block or block.group(1) != summary.group(1):
    fail("the README block is not the summary table of perf.md")
orig = open(os.path.join(REPO, "README.md")).read()
strip = lambda t: re.sub(r"<!-- perf-table:begin.*?<!-- perf-table:end -->", "", t, flags=re.S)
if strip(new) != strip(orig):
    fail("--update-readme changed the README outside the marked block")

# usage errors
p = run(["--only", "no_such_bench", "--no-write"])
if p.returncode != 2 or "no benchmark matches" not in p.stderr:
    fail("--only with no match", p)
p = run(["--bogus"])
if p.returncode != 2 or "unknown option" not in p.stderr:
    fail("unknown option", p)
print(f"PASS: {len(scripts)} benchmarks ran in quick mode: {' '.join(scripts)}")
