#!/usr/bin/env bash
# Expert load balancing: the expert bias against the switch aux loss and against neither (table and plot).
#   bench/expert_bias.sh [--quick] [--seeds "1 2 3"] [--plot FILE.png]
# Trains the same small model three ways on 2 ranks (launch/moe-local, one
# OpenBLAS thread per rank on 2 cores), every run under `nice`:
#   aux      aux_loss = switch, aux_loss_coef 0.01 (the default)
#   bias     expert_bias = 1, aux_loss = none
#   neither  aux_loss = none
# Model: launch/demo.ini with d_model 64, 2 layers (one MoE block: E = 8,
# top-2, capacity factor 1.25, routing groups of 4 sequences), seq_len 64,
# batch 16, 400 steps, no validation, on `moe data synth` text; one run per
# setting and seed (default seeds 1, 2 and 3). From each run's metrics.jsonl
# (one record per step): the mean over steps 201-400 of max_over_mean_load
# and dropped_frac, and the mean ce over the last 50 steps; each figure is
# the mean over the seeds. Prints the table and
#     PERF expert_bias.<setting>.max_over_mean <value> - ...
#     PERF expert_bias.<setting>.dropped <value> % ...
#     PERF expert_bias.<setting>.ce <value> nats/byte ...
# and writes the plot (max/mean load per step of each setting, seed mean,
# smoothed over 10 steps) with gnuplot to docs/img/expert_bias_load.png
# (--plot elsewhere). --quick (or BENCH_QUICK=1): 20 steps, one seed, no
# plot written unless --plot is given; the figures mean nothing then.
set -euo pipefail
source "$(dirname "$0")/env.sh"
SEEDS="1 2 3" PLOT=$REPO_DIR/docs/img/expert_bias_load.png PLOT_SET=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1 ;;
    --seeds) SEEDS=${2:?--seeds needs a list}; shift ;;
    --plot) PLOT=$(realpath -m "${2:?--plot needs a file}"); PLOT_SET=1; shift ;;
    *) echo "expert_bias.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
STEPS=400
if [[ $QUICK == 1 ]]; then
  STEPS=20 SEEDS=1
  [[ $PLOT_SET == 1 ]] || PLOT=""
fi
command -v gnuplot > /dev/null || { echo "expert_bias.sh: gnuplot is missing (launch/install-deps installs it)" >&2; exit 2; }
work=$(mktemp -d /tmp/moe-expert-bias.XXXXXX)
trap 'rm -rf "$work"' EXIT
nice "$MOE" data synth --out "$work/corpus.txt" --bytes 4M > /dev/null

declare -A SETTING=(
  [aux]="--aux_loss=switch"
  [bias]="--expert_bias=1 --aux_loss=none"
  [neither]="--aux_loss=none"
)
NAMES="aux bias neither"
echo "bench/expert_bias.sh: launch/demo.ini at d_model 64, 2 layers, seq_len 64, batch 16, $STEPS steps, 2 ranks" \
     "(2 cores, one OpenBLAS thread per rank), seeds: $SEEDS, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE"
for seed in $SEEDS; do
  for name in $NAMES; do
    dir=$work/$name-$seed
    # shellcheck disable=SC2086 # SETTING holds several options
    MOE_BIN=$MOE nice "$REPO_DIR/launch/moe-local" 2 train --config "$REPO_DIR/launch/demo.ini" \
      --data="$work/corpus.txt" --out_dir="$dir" --d_model=64 --n_layers=2 --seq_len=64 \
      --steps="$STEPS" --seed="$seed" --val_every=0 --ckpt_every=0 --log_every=100000 ${SETTING[$name]} \
      > "$work/$name-$seed.log" 2>&1 \
      || { echo "expert_bias.sh: the $name run (seed $seed) failed:" >&2; tail -20 "$work/$name-$seed.log" >&2; exit 1; }
    echo "  trained $name, seed $seed"
  done
done

"$PY" - "$work" "$STEPS" "$PLOT" "$SEEDS" << 'PY'
import json, os, statistics, subprocess, sys
work, steps, png, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
names = ["aux", "bias", "neither"]
label = {"aux": "switch aux loss (aux_loss_coef 0.01)", "bias": "expert_bias = 1, aux_loss = none",
         "neither": "neither (aux_loss = none)"}
def load(name, seed):
    recs = [json.loads(l) for l in open(f"{work}/{name}-{seed}/metrics.jsonl")]
    recs = [r for r in recs if "step" in r and "max_over_mean_load" in r]
    by_step = {r["step"]: r for r in recs}  # a step logged twice keeps its last record
    return [by_step[s] for s in sorted(by_step)]
runs = {n: [load(n, s) for s in seeds] for n in names}
half = steps // 2
tail = min(50, steps)
fig = {}
for n in names:
    per = []
    for recs in runs[n]:
        late = [r for r in recs if r["step"] > half]
        per.append((statistics.mean(r["max_over_mean_load"] for r in late),
                    statistics.mean(r["dropped_frac"] for r in late),
                    statistics.mean(r["ce"] for r in recs[-tail:])))
    fig[n] = [statistics.mean(p[i] for p in per) for i in range(3)]
    fig[n].append(per)
print()
print(f"| balancing | max/mean expert load | dropped | CE (nats/byte) | max/mean load per seed |")
print(f"|---|---|---|---|---|")
for n in names:
    m, d, c, per = fig[n]
    seeds_txt = " / ".join(f"{p[0]:.3f}" for p in per)
    print(f"| {label[n]} | {m:.3f} | {100 * d:.1f}% | {c:.3f} | {seeds_txt} |")
print()
print(f"(mean over steps {half + 1}-{steps} of max_over_mean_load and dropped_frac, mean ce over the last {tail} "
      f"steps; each the mean of seeds {', '.join(seeds)})")
for n in names:
    m, d, c, _ = fig[n]
    print(f"PERF expert_bias.{n}.max_over_mean {m:.3f} - max/mean expert load, {label[n]}")
    print(f"PERF expert_bias.{n}.dropped {100 * d:.1f} % dropped assignments, {label[n]}")
    print(f"PERF expert_bias.{n}.ce {c:.3f} nats/byte training CE, {label[n]}")
if not png:
    sys.exit(0)
# Per step: the seed mean, then a trailing 10-step mean (one step's load is noisy).
data = os.path.join(work, "load.dat")
with open(data, "w") as f:
    nsteps = min(len(recs) for n in names for recs in runs[n])
    for i in range(nsteps):
        row = [runs[names[0]][0][i]["step"]]
        for n in names:
            vals = []
            for j in range(max(0, i - 9), i + 1):
                vals.append(statistics.mean(recs[j]["max_over_mean_load"] for recs in runs[n]))
            row.append(statistics.mean(vals))
        f.write(" ".join(f"{v:.6g}" for v in row) + "\n")
os.makedirs(os.path.dirname(png), exist_ok=True)
cmds = ["set terminal png noenhanced size 900,480", f"set output '{png}'",
        'set title "max/mean expert load per step: E = 8, top-2, capacity factor 1.25, 2 ranks\\n'
        f'(mean of seeds {" ".join(seeds)}, trailing 10-step mean)"',
        "set xlabel 'step'", "set ylabel 'max / mean expert load'", "set key below", "set grid",
        "set yrange [1:*]",
        f"plot '{data}' using 1:2 with lines lw 2 title '{label['aux']}', "
        f"'' using 1:3 with lines lw 2 title '{label['bias']}', "
        f"'' using 1:4 with lines lw 2 title '{label['neither']}'"]
subprocess.run(["gnuplot"], input="\n".join(cmds) + "\n", text=True, check=True)
print(f"wrote {png}")
PY
