#!/usr/bin/env bash
# Token all-to-all: moe's exchange (point-to-point plan, shared-memory window) against raw MPI_Alltoallv, 2 ranks.
# `moe bench a2a` on 2 ranks of this machine (launch/moe-local), defaults:
# 4096 tokens per rank, d_model 256, E=8 top-2, skewed expert popularity;
# it checks the round trip and times its own exchange and a raw
# MPI_Alltoallv of the same bytes in the same run. Median over ROUNDS runs.
#   bench/a2a.sh [ROUNDS]      (default 3; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=${1:-3}
ARGS=()
[[ $QUICK == 1 ]] && ROUNDS=1 ARGS=(--tokens 256 --iters 3 --warmup 1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for _ in $(seq "$ROUNDS"); do
  env -u OPENBLAS_NUM_THREADS -u OMP_NUM_THREADS "$REPO_DIR/launch/moe-local" 2 bench a2a --kind both --json "${ARGS[@]}" \
    | "$PY" -c "import json,sys; print(json.dumps(json.load(sys.stdin)))" >> "$tmp/runs"
done
"$PY" - "$tmp/runs" "$ROUNDS" << 'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
r0 = runs[0]
print(f"moe bench a2a: {r0['ranks']} ranks, {r0['tokens']} tokens/rank, d_model {r0['d_model']}, E={r0['experts']} "
      f"top-{r0['top_k']}, {r0['bytes_per_rank'] / 1e6:.1f} MB per rank each way; median of {sys.argv[2]} runs")
for kind in ("p2p", "shm"):
    rs = [x for r in runs for x in r["results"] if x["kind"] == kind]
    if not all(x["roundtrip_ok"] for x in rs):
        sys.exit(f"a2a: the {kind} round trip did not return the rows it sent")
    gb, raw, ratio = (med(x[k] for x in rs) for k in ("gbps", "raw_alltoallv_gbps", "ratio_raw_over_kind"))
    print(f"  {kind:9s}: {gb:6.2f} GB/s, raw MPI_Alltoallv {raw:6.2f} GB/s: raw time / moe time {ratio:.2f}x")
    print(f"PERF a2a.{kind}.gbps {gb:.2f} GB/s moe exchange ({kind}), 2 ranks")
    line = "PERF_README" if kind == "shm" else "PERF"
    print(f"{line} a2a.{kind}.vs_raw {ratio:.2f} x raw MPI_Alltoallv time / moe exchange time ({kind}), 2 ranks")
PY
