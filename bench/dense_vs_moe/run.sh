#!/usr/bin/env bash
# Dense vs MoE at equal ACTIVE parameters and equal steps on real text (the
# Debian fortunes). Both models: d_model 128, 4 layers, 4 heads, seq 128,
# batch 16, same seed, schedule and data order.
#   moe:   every block MoE (moe_every 1), E=8 experts of d_ff 512, top-2
#          (capacity factor 1.25): 2 x 512 hidden units active per token
#   dense: n_experts 1, top_k 1, d_ff 1024: every token through one
#          1024-wide FFN (the single expert's gate is exactly 1)
# Writes out_dir/{moe,dense}/metrics.jsonl, out_dir/val.tsv and the
# validation-curve plot (gnuplot).
#   bench/dense_vs_moe/run.sh [steps]     (default 300; build first)
#   env: MOE_BIN (default build/src/cli/moe), OUT (default runs/dense_vs_moe),
#        PNG (default docs/img/dense_vs_moe.png), THREADS (2)
set -euo pipefail
cd "$(dirname "$0")/../.."
MOE=${MOE_BIN:-build/src/cli/moe}
STEPS=${1:-300}
OUT=${OUT:-runs/dense_vs_moe}
PNG=${PNG:-docs/img/dense_vs_moe.png}
THREADS=${THREADS:-2}
[[ -x $MOE ]] || { echo "no moe binary at $MOE (build first, or set MOE_BIN)" >&2; exit 2; }
command -v gnuplot > /dev/null || { echo "gnuplot not found" >&2; exit 2; }
# the kernel set the launch scripts use (moe selftest blas; an explicit setting wins)
OPENBLAS_CORETYPE=$("$MOE" selftest blas --pick) || exit 1
export OPENBLAS_CORETYPE
mkdir -p "$OUT" "$(dirname "$PNG")"

# Corpus: every fortune file (not the .dat indexes nor the .u8 copies);
# every 20th fortune (records end with a '%' line) is held out for validation,
# so that validation covers every file rather than the last one.
python3 - "$OUT" << 'EOF'
import glob, os, sys
out = sys.argv[1]
files = sorted(f for f in glob.glob("/usr/share/games/fortunes/*")
               if os.path.isfile(f) and not f.endswith((".dat", ".u8")))
if not files:
    sys.exit("no fortune files in /usr/share/games/fortunes (apt-get install fortunes)")
recs = [r for f in files for r in open(f, "rb").read().split(b"\n%\n") if r.strip()]
train = b"".join(r + b"\n%\n" for i, r in enumerate(recs) if i % 20)
val = b"".join(r + b"\n%\n" for i, r in enumerate(recs) if i % 20 == 0)
open(f"{out}/train.txt", "wb").write(train)
open(f"{out}/val.txt", "wb").write(val)
print(f"fortunes: {len(files)} files, {len(recs)} fortunes, {len(train)} training bytes, {len(val)} validation bytes")
EOF

common=(--data="$OUT/train.txt" --val_data="$OUT/val.txt" --d_model=128 --n_layers=4 --n_heads=4
        --seq_len=128 --batch_size=16 --steps="$STEPS" --warmup_steps=30 --val_every=25 --val_batches=16
        --log_every=50 --keep_last=1 --seed=1234)
run() { # name args...
    local name=$1
    shift
    rm -rf "${OUT:?}/$name"
    echo "== $name"
    OPENBLAS_NUM_THREADS=$THREADS "$MOE" train "${common[@]}" --out_dir="$OUT/$name" "$@" | grep -E "^(moe train|done|validation)"
}
run moe --moe_every=1 --n_experts=8 --top_k=2 --d_ff=512
run dense --moe_every=1 --n_experts=1 --top_k=1 --normalize_topk=0 --d_ff=1024

python3 - "$OUT" << 'EOF'
import json, sys
out = sys.argv[1]
val = {}
for name in ("moe", "dense"):
    for l in open(f"{out}/{name}/metrics.jsonl"):
        r = json.loads(l)
        if "val_bpb" in r:
            val.setdefault(r["step"], {})[name] = r["val_bpb"]
with open(f"{out}/val.tsv", "w") as f:
    f.write("# step\tmoe_val_bpb\tdense_val_bpb\n")
    for s in sorted(val):
        f.write(f"{s}\t{val[s].get('moe', 'NaN')}\t{val[s].get('dense', 'NaN')}\n")
last = max(val)
m, d = val[last]["moe"], val[last]["dense"]
print(f"validation bits/byte at step {last}: moe {m:.4f}, dense {d:.4f} (moe - dense = {m - d:+.4f})")
EOF

gnuplot << EOF
set terminal pngcairo size 800,480 font ',10'
set output '$PNG'
set title 'Dense vs MoE at equal active parameters (fortunes, d_model 128, 4 layers)'
set xlabel 'step'
set ylabel 'validation bits/byte'
set grid
set key top right
set datafile missing 'NaN'
plot '$OUT/val.tsv' using 1:2 with linespoints lw 2 title 'MoE: 8 experts x d\_ff 512, top-2', \
     '' using 1:3 with linespoints lw 2 title 'dense: d\_ff 1024'
EOF
echo "plot: $PNG"
