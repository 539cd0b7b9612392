#!/usr/bin/env bash
# Training throughput of two moe binaries on the same model and data, interleaved (A/B).
# bench/all.sh: skip
#   bench/train_ab.sh OLD_MOE NEW_MOE [ROUNDS] [STEPS]
# Trains launch/demo.ini (the byte-level demo model) on the synthetic corpus
# with OLD_MOE, then NEW_MOE, ROUNDS times (default 3), STEPS steps each
# (default 60), on 2 ranks through launch/moe-local (1 OpenBLAS thread per
# rank on 2 cores), no validation, one checkpoint at the end. A run's
# figure is the median of the per-step tokens_per_s of metrics.jsonl (the
# step alone: no validation or checkpoint time) over steps 2..STEPS; each
# binary's figure is the median over its rounds, and the two alternate so
# that a change of machine load hits both. Prints every run, then
#     PERF train_ab.old <tokens/s> ...
#     PERF train_ab.new <tokens/s> ...
#     PERF train_ab.ratio <new/old> ...
# and checks that both binaries logged the same losses (the same model and
# batches: a throughput comparison of different work would mean nothing).
# Not part of bench/all.sh: it compares two builds, e.g. main and a branch.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { echo "usage: bench/train_ab.sh OLD_MOE NEW_MOE [ROUNDS] [STEPS]" >&2; exit 2; }
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-3} steps=${4:-60}
for b in "$old" "$new"; do [[ -x $b ]] || { echo "train_ab: $b is not an executable" >&2; exit 2; }; done
work=$(mktemp -d /tmp/moe-train-ab.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$new" data synth --out "$work/corpus.txt" --bytes 4M > /dev/null
PY=${MOE_PYTHON:-/usr/bin/python3}
echo "bench/train_ab.sh: launch/demo.ini, $steps steps on 2 ranks, $rounds rounds, OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}"
echo "  old $old"
echo "  new $new"
uptime
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    bin=$old
    [[ $side == new ]] && bin=$new
    dir=$work/$side-$r
    MOE_BIN=$bin launch/moe-local 2 train --config launch/demo.ini --data="$work/corpus.txt" --out_dir="$dir" \
      --steps="$steps" --val_every=0 --ckpt_every=0 --log_every=1000 > "$dir.log" 2>&1 \
      || { echo "train_ab: the $side run failed:" >&2; tail -20 "$dir.log" >&2; exit 1; }
    "$PY" - "$dir/metrics.jsonl" "$side" "$r" << 'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_s"] for r in recs[1:]]
print(f"  round {sys.argv[3]} {sys.argv[2]}: median {statistics.median(tps):.0f} tokens/s over steps 2..{len(recs)}")
PY
  done
done
uptime
"$PY" - "$work" "$rounds" << 'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def runs(side):
    return [[json.loads(l) for l in open(f"{work}/{side}-{r}/metrics.jsonl")] for r in range(1, rounds + 1)]
o, n = runs("old"), runs("new")
losses = lambda recs: [(r["step"], r["loss"]) for r in recs]
same = all(losses(a) == losses(b) for a in o for b in n)
med = lambda rs: statistics.median(statistics.median(r["tokens_per_s"] for r in recs[1:]) for recs in rs)
mo, mn = med(o), med(n)
print(f"PERF train_ab.old {mo:.0f} tokens/s training throughput of OLD_MOE (median of {rounds} interleaved runs)")
print(f"PERF train_ab.new {mn:.0f} tokens/s training throughput of NEW_MOE (median of {rounds} interleaved runs)")
print(f"PERF train_ab.ratio {mn / mo:.3f} - NEW / OLD")
print(f"losses of every step identical between the binaries: {'yes' if same else 'NO'}")
sys.exit(0 if same else 1)
PY
