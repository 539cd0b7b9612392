#!/usr/bin/env bash
# Expert placement: load balance of `moe placement plan` on the demo model's recorded loads, and the step time at 4 ranks, contiguous vs planned.
#   bench/placement.sh            (MOE_PLACEMENT_STEPS=N: the training whose loads are planned, default 300)
# 1. Trains launch/demo.ini (the byte-level demo model, E = 8, 2 MoE layers)
#    on 2 ranks for MOE_PLACEMENT_STEPS steps; its checkpoint records the
#    kept assignments per expert (/stats/h/{L}/expert_tokens).
# 2. `moe placement plan` on those loads: 4 ranks with R = 0 and R = 4
#    replicas (4 ranks divide E + R only for R a multiple of 4 at E = 8),
#    2 ranks with R = 0 and R = 2. Per plan, the worst layer's max/mean
#    tokens per rank before (contiguous blocks) and after.
# 3. Step time at 4 ranks (on this 2-core machine: oversubscribed, 2 ranks
#    per core, 1 OpenBLAS thread each): the checkpoint resumed for 40 more
#    steps with contiguous experts, the R = 0 plan and the R = 4 plan,
#    alternating, 3 rounds; a run's figure is its median step time over
#    steps 2..40 of the resumed run (metrics.jsonl tokens_per_s), a
#    placement's the median over rounds. The runs' losses must agree within
#    1e-5 (the same model and batches; only where experts run differs).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
steps=${MOE_PLACEMENT_STEPS:-300} more=40 rounds=3
if [[ $QUICK == 1 ]]; then steps=6 more=4 rounds=1; fi
work=$(mktemp -d /tmp/moe-placement.XXXXXX)
trap 'rm -rf "$work"' EXIT
set_threads 1
"$MOE" data synth --out "$work/corpus.txt" --bytes 4M > /dev/null
echo "bench/placement.sh: launch/demo.ini, $steps steps on 2 ranks, then $more steps at 4 ranks x $rounds rounds," \
  "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}, $(nproc --all) cores"
MOE_BIN=$MOE launch/moe-local 2 train --config launch/demo.ini --data="$work/corpus.txt" --out_dir="$work/demo" \
  --steps="$steps" --val_every=0 --ckpt_every=0 --log_every=1000 > "$work/demo.log" 2>&1 \
  || { echo "placement: the demo training failed:" >&2; tail -20 "$work/demo.log" >&2; exit 1; }
ckpt=$work/demo/ckpt-$(printf %06d "$steps").h5

# plan PRANKS REPLICAS -> prints the report, PERF lines of the worst layer
plan() {
  local p=$1 r=$2 out=$work/p${1}r${2}.json
  echo "\$ moe placement plan --ckpt demo/ckpt-$(printf %06d "$steps").h5 --ranks $p --replicas $r --out p${p}r${r}.json"
  "$MOE" placement plan --ckpt "$ckpt" --ranks "$p" --replicas "$r" --out "$out" | tee "$work/plan.txt"
  "$PY" - "$work/plan.txt" "$p" "$r" << 'PY'
import sys
text, p, r = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
for line in text.splitlines():
    if line.startswith("worst layer max/mean: before"):
        b, a = (float(x.strip(" ,")) for x in line.split("before")[1].split("after"))
        print(f"PERF placement.p{p}_r{r}.before {b:.3f} - worst MoE layer's max/mean tokens per rank, contiguous "
              f"experts over {p} ranks (demo loads)")
        print(f"PERF placement.p{p}_r{r}.after {a:.3f} - the same under moe placement plan --ranks {p} --replicas {r}")
PY
}
plan 4 0
plan 4 4
plan 2 0
plan 2 2

# step time at 4 ranks: contiguous, plan R = 0, plan R = 4, alternating
variants=(contiguous p4r0 p4r4)
for round in $(seq 1 "$rounds"); do
  for v in "${variants[@]}"; do
    opt=()
    [[ $v != contiguous ]] && opt=(--placement="$work/$v.json")
    dir=$work/run-$v-$round
    MOE_BIN=$MOE launch/moe-local 4 train --config launch/demo.ini --data="$work/corpus.txt" --out_dir="$dir" \
      --resume="$ckpt" --steps=$((steps + more)) --val_every=0 --ckpt_every=0 --log_every=1000 "${opt[@]}" \
      > "$dir.log" 2>&1 || { echo "placement: the $v run failed:" >&2; tail -20 "$dir.log" >&2; exit 1; }
  done
done
"$PY" - "$work" "$rounds" "${variants[@]}" << 'PY'
import json, statistics, sys
work, rounds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def recs(v, r):
    return [json.loads(l) for l in open(f"{work}/run-{v}-{r}/metrics.jsonl")]
tokens_per_step = 16 * 128  # launch/demo.ini: batch_size x seq_len
def step_ms(rs):
    return statistics.median(1000.0 * tokens_per_step / x["tokens_per_s"] for x in rs[1:])
med = {}
for v in variants:
    per_round = [step_ms(recs(v, r)) for r in range(1, rounds + 1)]
    med[v] = statistics.median(per_round)
    print(f"  {v:10s} step time per round (ms): " + ", ".join(f"{x:.1f}" for x in per_round))
ref = [x["loss"] for x in recs(variants[0], 1)]
worst = 0.0
for v in variants[1:]:
    for a, b in zip(ref, (x["loss"] for x in recs(v, 1))):
        worst = max(worst, abs(a - b) / abs(a))
print(f"losses of the placements against contiguous: worst relative difference {worst:.1e}")
for v in variants:
    what = "contiguous experts" if v == "contiguous" else f"the plan {v} (ranks {v[1]}, replicas {v[3:]})"
    print(f"PERF placement.step_ms.{v} {med[v]:.1f} ms median training step at 4 ranks oversubscribed on "
          f"2 cores, {what}")
print(f"PERF placement.step_ratio.p4r0 {med['p4r0'] / med['contiguous']:.3f} - step time plan R=0 / contiguous")
print(f"PERF placement.step_ratio.p4r4 {med['p4r4'] / med['contiguous']:.3f} - step time plan R=4 / contiguous")
sys.exit(0 if worst <= 1e-5 else 1)
PY
