#!/usr/bin/env bash
# Vocabulary experts against the full softmax head in the whole model (gpt2 vocabulary): training and generation speed, and the quality study.
# The model: d_model 256, 4 layers (2 MoE blocks of 8 experts, top-2),
# seq_len 128, 16 sequences per step, one process (bench/vocab_model.c),
# on English text from this machine encoded with the gpt2 tokenizer
# (bench/vocab_corpus.sh; V = 50257).
#
#   bench/vocab_model.sh          speed: training tokens/s of both heads (M 64) and
#                                 generation tokens/s at batch 1 and 16 (K 2), in one
#                                 interleaved run; then the study's table if it has run
#   bench/vocab_model.sh study    the quality study: the full head and M = 16, 64, 256
#                                 (3 seeds each, 300 steps), validation bits per byte, and per K
#                                 = 1, 2, 4, 8 the coverage, kept router mass and batch-1
#                                 generation tokens/s; writes study.jsonl, the table
#                                 (study.md) and a plot (study.png) in the corpus directory.
#                                 Its generation rates are one run each; bench/vocab_sweep.sh
#                                 then measures speed against the full head per M and K,
#                                 interleaved, for docs/img/vocab_speed_quality.png.
#                                 About 2-3 CPU-hours: run it under nice in the background.
# VOCAB_CORPUS (default build/vocab_corpus) holds the corpus (built when missing).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${VOCAB_MODEL_BENCH:-build/tests/vocab/vocab_model_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set VOCAB_MODEL_BENCH)" >&2; exit 2; }
CORPUS=${VOCAB_CORPUS:-$REPO_DIR/build/vocab_corpus}
MODE=${1:-speed}
STEPS=${STUDY_STEPS:-300}

if [[ $QUICK == 1 ]]; then
  # a tiny corpus: enough to run every path once; the figures mean nothing
  CORPUS=$(mktemp -d)
  trap 'rm -rf "$CORPUS"' EXIT
  head -c 200000 /usr/share/common-licenses/GPL-3 > "$CORPUS/train.txt"
  head -c 30000 /usr/share/common-licenses/Apache-2.0 > "$CORPUS/val.txt"
  "$MOE" tokenizer import --from build-deps/node/node_modules/tiktoken/encoders/gpt2.json --out "$CORPUS/gpt2.json" > /dev/null
  for s in train val; do "$MOE" data encode --tokenizer "$CORPUS/gpt2.json" --data "$CORPUS/$s.txt" --out "$CORPUS/$s.tok" > /dev/null; done
elif [[ ! -f $CORPUS/train.tok ]]; then
  echo "== building the corpus in $CORPUS (bench/vocab_corpus.sh)"
  bench/vocab_corpus.sh "$CORPUS" "$MOE"
fi

summary() { # the study's table and plot from study.jsonl
  "$PY" - "$CORPUS/study.jsonl" "$CORPUS/study.md" "$CORPUS/study.png" << 'PY'
import collections, json, statistics, subprocess, sys
src, md, png = sys.argv[1:4]
runs = [json.loads(l) for l in open(src) if l.strip()]
by = collections.defaultdict(list)
for r in runs:
    by[r["M"]].append(r)
def ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
full = by.get(0, [])
fb, fs = ms([r["val_bpb"] for r in full]) if full else (float("nan"), 0)
fg = statistics.median([r["gen_b1_tokens_per_s"] for r in full]) if full else float("nan")
ft = statistics.median([r["train_tokens_per_s"] for r in full]) if full else float("nan")
lines = ["| head | M | K | val bits/byte (mean ± sd, %d seeds) | vs full | top-K coverage | kept router mass | "
         "training tokens/s | generation tokens/s, batch 1 |" % max(len(v) for v in by.values()),
         "|---|---|---|---|---|---|---|---|---|"]
lines.append(f"| full | - | - | {fb:.4f} ± {fs:.4f} | - | 1 | 1 | {ft:.0f} | {fg:.0f} |")
pts = [("full", fg, fb)]
for M in sorted(k for k in by if k):
    rs = by[M]
    b, s = ms([r["val_bpb"] for r in rs])
    tr = statistics.median([r["train_tokens_per_s"] for r in rs])
    for K in (1, 2, 4, 8):
        key = f"K{K}"
        if key not in rs[0]:
            continue
        cov = statistics.mean(r[key]["coverage"] for r in rs)
        mass = statistics.mean(r[key]["kept_mass"] for r in rs)
        g = statistics.median(r[key]["gen_b1_tokens_per_s"] for r in rs)
        lines.append(f"| vocab experts | {M} | {K} | {b:.4f} ± {s:.4f} | {100 * (b / fb - 1):+.1f}% | {cov:.3f} | "
                     f"{mass:.3f} | {tr:.0f} | {g:.0f} |")
        pts.append((f"M{M} K{K}", g, b, cov))
open(md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
for M in sorted(k for k in by if k):
    b, _ = ms([r["val_bpb"] for r in by[M]])
    print(f"PERF vocab_model.study_m{M}_bpb_vs_full {100 * (b / fb - 1):.2f} % validation bits/byte of M = {M} "
          f"vocabulary experts relative to the full head (mean of {len(by[M])} seeds, {by[M][0]['steps']} steps)")
g = subprocess.Popen(["gnuplot"], stdin=subprocess.PIPE, text=True)
cmds = [f"set terminal png size 1000,440", f"set output '{png}'", "set multiplot layout 1,2",
        "set logscale x", "set xlabel 'generation tokens/s, batch 1 (log)'", "set ylabel 'validation bits per byte'",
        "set title 'speed and quality (exact loss; K only sets the speed)'", "set key bottom right",
        "$d << EOD"] + [f'"{n}" {x} {y}' for n, x, y, *_ in pts] + ["EOD",
        "plot $d using 2:3:1 with labels offset 0,0.8 font ',8' notitle, $d using 2:3 with points pt 7 notitle",
        "unset logscale x", "set logscale x", "set ylabel 'top-K coverage'", "set yrange [0:1.05]",
        "set title 'coverage: targets the K chosen experts can produce'",
        "$c << EOD"] + [f'"{n}" {x} {c}' for n, x, y, *c in pts if c for c in [c[0]]] + ["EOD",
        "plot $c using 2:3:1 with labels offset 0,0.8 font ',8' notitle, $c using 2:3 with points pt 7 notitle",
        "unset multiplot"]
g.communicate("\n".join(cmds) + "\n")
print(f"plot: {png}")
PY
}

case $MODE in
  speed)
    QF=()
    [[ $QUICK == 1 ]] && QF=(--quick)
    # training at 2 OpenBLAS threads (the cores), generation at 1 as
    # `moe generate` runs a rank; each an interleaved run of both heads
    echo "== training (2 OpenBLAS threads)"
    OPENBLAS_NUM_THREADS=2 "$BIN" speed --data "$CORPUS" --rounds 5 --only train "${QF[@]}"
    echo "== generation (1 OpenBLAS thread)"
    OPENBLAS_NUM_THREADS=1 "$BIN" speed --data "$CORPUS" --rounds 5 --only gen "${QF[@]}"
    if [[ $QUICK != 1 && -s $CORPUS/study.jsonl ]]; then
      echo "== the quality study ($CORPUS/study.jsonl)"
      summary
    fi
    ;;
  study)
    : > "$CORPUS/study.jsonl"
    for seed in 1 2 3; do
      for head in full 16 64 256; do
        echo "== study: head $head, seed $seed, $STEPS steps" >&2
        OPENBLAS_NUM_THREADS=2 nice "$BIN" train --data "$CORPUS" --head "$head" --seed "$seed" --steps "$STEPS" \
          >> "$CORPUS/study.jsonl"
      done
    done
    summary
    ;;
  summary) summary ;;
  *) echo "usage: bench/vocab_model.sh [speed|study|summary]" >&2; exit 2 ;;
esac
