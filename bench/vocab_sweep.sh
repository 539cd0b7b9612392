#!/usr/bin/env bash
# bench/all.sh: skip
# Vocabulary experts: generation speed against the full head for every M and K of the quality study, and the speed-quality plot.
# For M = 16, 64, 256 and K = 1, 2, 4, 8: `vocab_model_bench speed --only gen`
# (the model of bench/vocab_model.sh, V 50257, one OpenBLAS thread), each
# an interleaved run of the full head and the vocabulary-expert head (3
# rounds, medians), batch 1 and 16. The speed axis is the ratio to the full
# head measured in the same run, so that load on the machine cancels out;
# the quality axis is the study's validation bits per byte (`bench/vocab_model.sh
# study` first). Writes sweep.jsonl and sweep.md in the corpus directory and
# the plot docs/img/vocab_speed_quality.png. About 15 minutes; not run by all.sh.
#   bench/vocab_sweep.sh      (VOCAB_CORPUS as for bench/vocab_model.sh)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${VOCAB_MODEL_BENCH:-build/tests/vocab/vocab_model_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set VOCAB_MODEL_BENCH)" >&2; exit 2; }
CORPUS=${VOCAB_CORPUS:-$REPO_DIR/build/vocab_corpus}
[[ -s $CORPUS/study.jsonl ]] || { echo "no $CORPUS/study.jsonl: run bench/vocab_model.sh study first" >&2; exit 2; }
: > "$CORPUS/sweep.jsonl"
for M in 16 64 256; do
  for K in 1 2 4 8; do
    echo "== M $M, K $K" >&2
    OPENBLAS_NUM_THREADS=1 "$BIN" speed --data "$CORPUS" --only gen --M "$M" --K "$K" --rounds 3 --gen-batch 16 \
      | "$PY" -c "
import json, re, sys
out = {'M': $M, 'K': $K}
for l in sys.stdin:
    m = re.match(r'generation, batch (\d+), K = \d+: full ([\d.]+) tokens/s .*vocab experts ([\d.]+) tokens/s, ratio ([\d.]+)', l)
    if m:
        out['b' + m[1]] = {'full': float(m[2]), 'vocab': float(m[3]), 'ratio': float(m[4])}
assert 'b1' in out and 'b16' in out, 'no generation figures in the benchmark output'
print(json.dumps(out))" >> "$CORPUS/sweep.jsonl"
  done
done
"$PY" - "$CORPUS/study.jsonl" "$CORPUS/sweep.jsonl" "$CORPUS/sweep.md" "$REPO_DIR/docs/img/vocab_speed_quality.png" << 'PY'
import collections, json, statistics, subprocess, sys
study, sweep, md, png = sys.argv[1:5]
runs = [json.loads(l) for l in open(study) if l.strip()]
by = collections.defaultdict(list)
for r in runs:
    by[r["M"]].append(r)
bpb = {M: statistics.mean(r["val_bpb"] for r in rs) for M, rs in by.items()}
sd = {M: (statistics.stdev(r["val_bpb"] for r in rs) if len(rs) > 1 else 0.0) for M, rs in by.items()}
sw = [json.loads(l) for l in open(sweep) if l.strip()]
lines = ["| M | K | val bits/byte (%d seeds) | vs full | top-K coverage | generation vs full head, batch 1 | batch 16 |"
         % len(by[0]), "|---|---|---|---|---|---|---|",
         f"| full | - | {bpb[0]:.4f} ± {sd[0]:.4f} | - | 1 | 1.00x | 1.00x |"]
pts = []
for s in sw:
    M, K = s["M"], s["K"]
    cov = statistics.mean(r[f"K{K}"]["coverage"] for r in by[M])
    lines.append(f"| {M} | {K} | {bpb[M]:.4f} ± {sd[M]:.4f} | {100 * (bpb[M] / bpb[0] - 1):+.1f}% | {cov:.3f} | "
                 f"{s['b1']['ratio']:.1f}x | {s['b16']['ratio']:.1f}x |")
    pts.append((f"M{M} K{K}", s["b1"]["ratio"], bpb[M], cov))
    print(f"PERF vocab_sweep.m{M}_k{K}_gen_b1_speedup {s['b1']['ratio']:.2f} x generation tokens/s over the full head, "
          f"batch 1, M {M}, K {K} (one interleaved run)")
open(md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
cmds = ["set terminal png size 1000,440", f"set output '{png}'", "set multiplot layout 1,2", "set logscale x",
        "set xlabel 'generation speed over the full head, batch 1 (log)'", "set ylabel 'validation bits per byte'",
        "set title 'speed and quality (exact loss: K changes only the speed)'", "set xrange [0.7:*]",
        "$d << EOD", f'"full" 1 {bpb[0]}'] + [f'"{n}" {x} {y}' for n, x, y, _ in pts] + ["EOD",
        "plot $d using 2:3:1 with labels offset 0,0.8 font ',8' notitle, $d using 2:3 with points pt 7 notitle",
        "set ylabel 'top-K coverage'", "set yrange [0:1.05]",
        "set title 'coverage: targets the K chosen experts can produce'",
        "$c << EOD"] + [f'"{n}" {x} {c}' for n, x, _, c in pts] + ["EOD",
        "plot $c using 2:3:1 with labels offset 0,0.8 font ',8' notitle, $c using 2:3 with points pt 7 notitle",
        "unset multiplot"]
subprocess.run(["gnuplot"], input="\n".join(cmds) + "\n", text=True, check=True)
print(f"plot: {png}")
PY
