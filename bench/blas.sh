#!/usr/bin/env bash
# OpenBLAS kernel sets: correctness against float64 and sgemm GFLOP/s at moerun's shapes (moe selftest blas).
# A fresh `moe selftest blas` (not the cached pick): every kernel set the CPU
# supports, each in its own process, checked against a float64 reference
# under a rounding-error bound, then timed at moerun's GEMM shapes on 1 and
# on all cores in ROUNDS alternating rounds (best round). The choice is the
# fastest correct set (within 5%, the one needing fewer CPU features).
#   bench/blas.sh [ROUNDS]      (default 3; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=${1:-3}
ARGS=(--rounds "$ROUNDS")
[[ $QUICK == 1 ]] && ARGS=(--quick --rounds 1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
"$MOE" selftest blas "${ARGS[@]}" --json > "$tmp/selftest.json" || rc=$?
"$PY" - "$tmp/selftest.json" "$OPENBLAS_CORETYPE" << 'PY'
import json, sys
j = json.load(open(sys.argv[1]))
used = sys.argv[2]
print(f"{j['cpu']['model']}, {j['cpu']['cpus']} cores; {j['openblas']['build']}; OpenBLAS's own pick: "
      f"{j['openblas']['detected']}")
ok = [c for c in j["candidates"] if c["status"] == "correct"]
rows = sorted({r for c in ok for r in c["gflops"]}, key=lambda r: ([s["name"] for s in j["shapes"]].index(r.split("/")[0]), r))
print(f"{'shape/threads':28s}" + "".join(f"{c['coretype']:>12s}" for c in ok))
for r in rows:
    print(f"{r:28s}" + "".join(f"{c['gflops'].get(r, float('nan')):12.1f}" for c in ok))
print(f"{'geometric mean':28s}" + "".join(f"{c['geomean']:12.1f}" for c in ok))
for c in j["candidates"]:
    extra = f", worst error {c['worst_ratio']:.3g} of the bound over {c['cases']} calls" if "cases" in c else ""
    print(f"  {c['coretype']:15s} {c['status']}{extra}{': ' + c['why'] if 'why' in c else ''}")
print(f"choice: {j['choice']}; these benchmarks run OPENBLAS_CORETYPE={used}")
print(f"PERF blas.choice {j['choice']} - fastest correct OpenBLAS kernel set (moe selftest blas)")
print(f"PERF blas.detected {j['openblas']['detected']} - the kernel set OpenBLAS detects by itself")
for c in j["candidates"]:
    if c["status"] == "correct":
        print(f"PERF blas.{c['coretype']}.geomean {c['geomean']:.1f} GFLOP/s sgemm geometric mean over moerun's shapes")
    else:
        print(f"PERF blas.{c['coretype']}.status {c['status']} - {c.get('why', '')}")
pick = next((c for c in ok if c["coretype"] == j["choice"]), None)
if pick:
    for t in sorted({int(r.split("/")[1][:-1]) for r in pick["gflops"]}):
        peak = max(v for r, v in pick["gflops"].items() if r.endswith(f"/{t}t"))
        print(f"PERF blas.peak_{t}t {peak:.0f} GFLOP/s peak sgemm at moerun's shapes, {j['choice']}, {t} thread(s)")
    r, v = max(pick["gflops"].items(), key=lambda kv: kv[1])
    print(f"PERF_README blas.peak {v:.0f} GFLOP/s peak sgemm ({j['choice']}, the selftest's pick; {r})")
    for other in ok:
        if other is not pick:
            print(f"PERF blas.vs_{other['coretype']} {pick['geomean'] / other['geomean']:.2f} x "
                  f"{j['choice']} / {other['coretype']} sgemm geometric mean")
PY
exit $rc
