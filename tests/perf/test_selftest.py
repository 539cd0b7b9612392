#!/usr/bin/env python3
"""End-to-end tests of `moe selftest blas` and of the launch scripts' kernel
choice. Each case runs `moe` (or launch/moe-local) with a timeout and checks
its exit status, its table or JSON and its messages.

    test_selftest.py MOE_BIN REPO_DIR WORK_DIR CASE

Cases use kernel sets every x86-64 CPU runs (Prescott: SSE3, Nehalem: SSE4.2)
where the outcome must not depend on the machine; faults come from the
MOE_FAULT hook of the child (blas_wrong|blas_crash|blas_hang:<SET>).
"""
import json
import os
import shutil
import subprocess
import sys
import time

MOE, REPO, WORK, CASE = sys.argv[1:5]
SAFE = "Prescott,Nehalem"


def run(args, env=None, timeout=300, cmd=None):
    e = dict(os.environ)
    e.update(env or {})
    for k in [k for k, v in e.items() if v is None]:
        del e[k]
    t0 = time.monotonic()
    p = subprocess.run(cmd or [MOE] + args, capture_output=True, text=True, env=e, timeout=timeout)
    p.seconds = time.monotonic() - t0
    return p


def fail(msg, p=None):
    if p is not None:
        msg += f"\n--- exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    sys.exit("FAIL: " + msg)


def expect(cond, msg, p=None):
    if not cond:
        fail(msg, p)


def selftest_json(args, env=None, rc=0, timeout=300):
    p = run(["selftest", "blas", "--json"] + args, env, timeout)
    expect(p.returncode == rc, f"exit status {p.returncode}, want {rc}", p)
    try:
        return json.loads(p.stdout), p
    except ValueError:
        fail("stdout is not one JSON object", p)


def entries(cache):
    """The cache's answers (not its lock files)."""
    d = os.path.join(cache, "moerun")
    return sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def by_name(j):
    return {c["coretype"]: c for c in j["candidates"]}


def case_default():
    """The CPU's own candidate list: every set is correct or unavailable here,
    the choice is a correct set, and the timed rows are complete."""
    j, p = selftest_json(["--quick"])
    cands = j["candidates"]
    expect(len(cands) >= 1 and cands[-1]["coretype"] == "Prescott", "Prescott (generic) must close the list", p)
    expect(j["openblas"]["detected"], "no core name from OpenBLAS's own detection", p)
    expect(j["openblas"]["build"].startswith("OpenBLAS "), "no OpenBLAS build string", p)
    correct = [c for c in cands if c["status"] == "correct"]
    expect(correct, "no correct kernel set on this machine", p)
    quick_rows = None
    for c in cands:
        expect(c["status"] in ("correct", "unavailable"), f"{c['coretype']}: {c['status']} {c.get('why')}", p)
        if c["status"] == "unavailable":
            expect(c["corename"].lower() != c["coretype"].lower(), "unavailable but loaded", p)
            continue
        expect(c["corename"].lower() == c["coretype"].lower(), f"{c['coretype']} loaded {c['corename']}", p)
        expect(c["cases"] > 3000 and c["failures"] == 0, f"{c['coretype']}: {c['cases']} cases", p)
        expect(0 < c["worst_ratio"] <= 1, f"{c['coretype']}: worst ratio {c['worst_ratio']}", p)
        rows = sorted(c["gflops"])
        expect(all(v > 0 for v in c["gflops"].values()), f"{c['coretype']}: a rate <= 0", p)
        if quick_rows is None:
            quick_rows = rows
        expect(rows == quick_rows, "candidates timed different rows", p)
        expect(any(r.endswith("/1t") for r in rows), "no 1-thread rows", p)
    best = max(c["geomean"] for c in correct)
    pick = by_name(j)[j["choice"]]
    expect(pick["status"] == "correct" and pick["geomean"] >= 0.95 * best,
           f"choice {j['choice']} ({pick['geomean']}) is not within 5% of the fastest ({best})", p)


def case_unavailable():
    """A name OpenBLAS does not know loads another set: unavailable, not timed."""
    j, p = selftest_json(["--quick", "--candidates", "NoSuchCore,Prescott"])
    c = by_name(j)["NoSuchCore"]
    expect(c["status"] == "unavailable" and "instead" in c["why"] and "gflops" not in c, "NoSuchCore", p)
    expect(j["choice"] == "Prescott", f"choice {j['choice']}", p)


def case_wrong():
    """A set computing wrong results is refused with a warning naming it and
    the first wrong call; the other set is chosen."""
    j, p = selftest_json(["--quick", "--candidates", SAFE], {"MOE_FAULT": "blas_wrong:Nehalem"})
    c = by_name(j)["Nehalem"]
    expect(c["status"] == "wrong" and c["failures"] > 0 and c["worst_ratio"] > 1, "Nehalem not refused", p)
    expect("gflops" not in c, "a wrong set was timed", p)
    expect("warning: kernel set Nehalem is not eligible" in p.stderr and "off the float64 reference" in p.stderr,
           "no warning naming the set and the wrong call", p)
    expect(j["choice"] == "Prescott", f"choice {j['choice']}", p)


def case_all_wrong():
    """No correct set: non-zero exit, a message, choice null."""
    j, p = selftest_json(["--quick", "--candidates", "Prescott"], {"MOE_FAULT": "blas_wrong:Prescott"}, rc=1)
    expect(j["choice"] is None, "a choice without a correct set", p)
    p = run(["selftest", "blas", "--quick", "--candidates", "Prescott"], {"MOE_FAULT": "blas_wrong:Prescott"})
    expect(p.returncode == 1 and "no kernel set computed correct results" in p.stdout, "table run", p)


def case_crash():
    """A child killed by a signal (as by an illegal instruction) is refused."""
    j, p = selftest_json(["--quick", "--candidates", SAFE], {"MOE_FAULT": "blas_crash:Nehalem"})
    c = by_name(j)["Nehalem"]
    expect(c["status"] == "crashed" and "signal 4" in c["why"], "Nehalem not reported crashed", p)
    expect(j["choice"] == "Prescott", f"choice {j['choice']}", p)


def case_hang():
    """A child that never answers is killed at --timeout, within bounded time."""
    j, p = selftest_json(["--quick", "--candidates", SAFE, "--timeout", "15"], {"MOE_FAULT": "blas_hang:Nehalem"},
                         timeout=120)
    c = by_name(j)["Nehalem"]
    expect(c["status"] == "hung" and "killed" in c["why"], "Nehalem not reported hung", p)
    expect(j["choice"] == "Prescott", f"choice {j['choice']}", p)
    expect(p.seconds < 100, f"took {p.seconds:.0f} s", p)


def case_pick_cache():
    """--pick runs the selftest once, caches the answer under the machine's
    key, answers from the cache after, and --refresh or a damaged entry
    make it run again."""
    cache = os.path.join(WORK, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    env = {"XDG_CACHE_HOME": cache, "OPENBLAS_CORETYPE": None}
    args = ["selftest", "blas", "--pick", "--quick", "--candidates", SAFE]
    p = run(args, env)
    expect(p.returncode == 0 and p.stdout.strip() in ("Prescott", "Nehalem"), "first pick", p)
    expect("choosing the OpenBLAS kernel set" in p.stderr and "geometric mean" in p.stderr, "no table", p)
    first = p.stdout.strip()
    files = entries(cache)
    expect(len(files) == 1 and files[0].startswith("blas-"), f"cache {files}", p)
    path = os.path.join(cache, "moerun", files[0])
    entry = json.load(open(path))
    expect(entry["choice"] == first and entry["cpu"]["model"] in entry["key"], "cache entry", p)
    # Answered from the cache: a child would now crash, and it must not run.
    p = run(args, dict(env, MOE_FAULT="blas_crash:" + first))
    expect(p.returncode == 0 and p.stdout.strip() == first and "choosing" not in p.stderr
           and f"OpenBLAS kernels {first} (fastest correct on this machine; cached in {path})" in p.stderr,
           "cached pick", p)
    # --refresh runs again (and now refuses the crashing set).
    p = run(args + ["--refresh"], dict(env, MOE_FAULT="blas_crash:" + first))
    other = {"Prescott": "Nehalem", "Nehalem": "Prescott"}[first]
    expect(p.returncode == 0 and p.stdout.strip() == other and "choosing" in p.stderr, "refresh", p)
    # A damaged entry is ignored and rewritten.
    open(path, "w").write("{not json")
    p = run(args, env)
    expect(p.returncode == 0 and "choosing" in p.stderr and json.load(open(path))["choice"] == p.stdout.strip(),
           "damaged entry", p)
    # Another candidate list is another key.
    p = run(["selftest", "blas", "--pick", "--quick", "--candidates", "Prescott"], env)
    expect(p.returncode == 0 and p.stdout.strip() == "Prescott" and len(entries(cache)) == 2,
           "candidate list not in the key", p)
    # No correct set: no answer, exit 1, nothing cached.
    p = run(["selftest", "blas", "--pick", "--quick", "--candidates", "Nehalem"], dict(env, MOE_FAULT="blas_wrong:Nehalem"))
    expect(p.returncode == 1 and p.stdout == "" and "no OpenBLAS kernel set computed correct results" in p.stderr
           and "set OPENBLAS_CORETYPE to override" in p.stderr, "pick without a correct set", p)
    expect(len(entries(cache)) == 2, "a failed pick was cached", p)
    # An explicit OPENBLAS_CORETYPE wins without a selftest; a name OpenBLAS
    # does not load is warned about.
    p = run(args, dict(env, OPENBLAS_CORETYPE="Prescott", MOE_FAULT="blas_crash:Prescott"))
    expect(p.returncode == 0 and p.stdout.strip() == "Prescott" and "set in the environment" in p.stderr
           and "warning" not in p.stderr, "explicit setting", p)
    p = run(args, dict(env, OPENBLAS_CORETYPE="NoSuchCore"))
    expect(p.returncode == 0 and p.stdout.strip() == "NoSuchCore" and "warning: OPENBLAS_CORETYPE=NoSuchCore" in p.stderr,
           "explicit unknown name", p)


def case_pick_concurrent():
    """Two launchers picking at once on a machine without an answer: one runs
    the selftest, the other waits for it and answers the same."""
    cache = os.path.join(WORK, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    e = dict(os.environ, XDG_CACHE_HOME=cache)
    e.pop("OPENBLAS_CORETYPE", None)
    cmd = [MOE, "selftest", "blas", "--pick", "--quick", "--candidates", SAFE]
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    expect(all(p.returncode == 0 for p in ps), f"exit statuses {[p.returncode for p in ps]}: {outs}")
    expect(outs[0][0] == outs[1][0] and outs[0][0].strip() in SAFE.split(","), f"answers {outs}")
    expect(sum("choosing the OpenBLAS kernel set" in err for _, err in outs) == 1, f"the selftest ran twice: {outs}")
    expect(len(entries(cache)) == 1, "cache entries")


def case_usage():
    for args, what in ((["--rounds", "0"], "--rounds"), (["--bogus"], "unknown option"),
                       (["--candidates", "a b"], "--candidates"), (["--timeout", "-1"], "--timeout"),
                       (["extra"], "unexpected argument")):
        p = run(["selftest", "blas"] + args)
        expect(p.returncode == 2 and what in p.stderr, f"usage error for {args}", p)
    p = run(["selftest", "gpu"])
    expect(p.returncode == 2 and "unknown selftest 'gpu'" in p.stderr, "unknown selftest", p)
    p = run(["selftest", "blas", "--help"])
    expect(p.returncode == 0 and "--pick" in p.stdout, "help", p)


def moe_local(env, *args):
    """launch/moe-local 1 selftest blas --one auto: reports the kernel set the
    launched process really loaded."""
    cmd = [os.path.join(REPO, "launch", "moe-local"), "1", "selftest", "blas", "--one", "auto", "--no-check",
           "--no-time"]
    e = dict(env, MOE_BIN=MOE)
    p = run([], e, cmd=cmd + list(args))
    expect(p.returncode == 0 and "MOE_BLAS_RESULT " in p.stdout, "moe-local run", p)
    return json.loads(p.stdout.split("MOE_BLAS_RESULT ", 1)[1])["corename"], p


def case_launch():
    """moe-local sets OPENBLAS_CORETYPE from the pick only when it is unset,
    says so on stderr, and an explicit setting always wins."""
    cache = os.path.join(WORK, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    env = {"XDG_CACHE_HOME": cache, "OPENBLAS_CORETYPE": None, "MOE_BLAS_PICK_ARGS": "--quick --candidates " + SAFE}
    core, p = moe_local(env)
    pick = run(["selftest", "blas", "--pick", "--quick", "--candidates", SAFE], env)
    expect(pick.returncode == 0 and "cached in" in pick.stderr and "choosing" not in pick.stderr,
           "the pick is not cached after moe-local", pick)
    expect(core == pick.stdout.strip(), f"ranks loaded {core}, the pick is {pick.stdout.strip()}", p)
    expect(f"OpenBLAS kernels {core} (fastest correct on this machine" in p.stderr, "no log line naming the set", p)
    core, p = moe_local(dict(env, OPENBLAS_CORETYPE="Prescott"))
    expect(core == "Prescott" and "set in the environment" in p.stderr, "explicit OPENBLAS_CORETYPE lost", p)
    # No correct set: moe-local refuses to start, naming the problem.
    p = run([], dict(env, MOE_BIN=MOE, MOE_FAULT="blas_wrong:Prescott", MOE_BLAS_PICK_ARGS="--quick --candidates Prescott"),
            cmd=[os.path.join(REPO, "launch", "moe-local"), "1", "selftest", "blas", "--one", "auto"])
    expect(p.returncode != 0 and "no OpenBLAS kernel set computed correct results" in p.stderr
           and "MOE_BLAS_RESULT" not in p.stdout, "moe-local ran without a kernel set", p)


CASES = {n[5:]: f for n, f in globals().items() if n.startswith("case_")}
if CASE not in CASES:
    sys.exit(f"unknown case {CASE}; cases: {' '.join(CASES)}")
os.makedirs(WORK, exist_ok=True)
CASES[CASE]()
print(f"PASS: {CASE}")
