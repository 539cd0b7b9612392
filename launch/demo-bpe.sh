#!/usr/bin/env bash
# `launch/demo bpe` (after install and build): the demo model trained over a
# 4096-token byte-level BPE of the corpus and over its bytes, the same
# number of steps on 2 ranks each, compared in bits per byte on the held-out
# text (moe eval encodes it with each checkpoint's own tokenizer), with
# samples of both.
#   MOE_DEMO_STEPS=N   steps of both runs (default: launch/demo.ini's 1500)
#   MOE_DEMO_DIR=DIR   output (default runs/demo-bpe)
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=build/src/cli/moe
RUN=${MOE_DEMO_DIR:-runs/demo-bpe}
PY=${MOE_PYTHON:-/usr/bin/python3}
rm -rf "$RUN"
mkdir -p "$RUN"
steps=(${MOE_DEMO_STEPS:+--steps=$MOE_DEMO_STEPS})

echo "== corpus: 4 MB of seven text domains (training) + 200 KB (validation, another seed)"
"$MOE" data synth --out "$RUN/corpus.txt" --bytes 4000000 --seed 1 > /dev/null
"$MOE" data synth --out "$RUN/val.txt" --domains "$RUN/val.domains" --bytes 200000 --seed 7 > /dev/null

echo "== tokenizer: byte-level BPE, 4096 tokens (GPT-2's pattern), trained on the training text"
"$MOE" tokenizer train --data "$RUN/corpus.txt" --vocab-size 4096 --out "$RUN/tok4096.json"
echo "== token files (moe data encode, 2 ranks)"
launch/moe-local 2 data encode --tokenizer "$RUN/tok4096.json" --data "$RUN/corpus.txt" --out "$RUN/corpus.tok"
launch/moe-local 2 data encode --tokenizer "$RUN/tok4096.json" --data "$RUN/val.txt" --out "$RUN/val.tok"

echo
echo "== training over the BPE tokens on 2 ranks (vocab_size from the tokenizer: 4096)"
launch/moe-local 2 train --config launch/demo.ini --data="$RUN/corpus.tok" --val_data="$RUN/val.tok" \
  --tokenizer="$RUN/tok4096.json" --out_dir="$RUN/bpe" "${steps[@]}" | grep -v "^step"
echo
echo "== training over the bytes on 2 ranks (the same model, steps and tokens per step)"
launch/moe-local 2 train --config launch/demo.ini --data="$RUN/corpus.txt" --val_data="$RUN/val.txt" \
  --out_dir="$RUN/bytes" "${steps[@]}" | grep -v "^step"

echo
echo "== held-out text in bits per byte (moe eval --data val.txt: each checkpoint encodes it itself)"
for m in bytes bpe; do
  launch/moe-local 2 eval --ckpt "$RUN/$m" --data "$RUN/val.txt" --json > "$RUN/eval-$m.json"
done
"$PY" - "$RUN" << 'PY'
import json, sys
run = sys.argv[1]
ev = {m: json.load(open(f"{run}/eval-{m}.json")) for m in ("bytes", "bpe")}
met = {m: [json.loads(l) for l in open(f"{run}/{m}/metrics.jsonl")] for m in ("bytes", "bpe")}
def elapsed(recs):  # training time: the steps alone (no validation or checkpoints)
    return sum(2048 / r["tokens_per_s"] for r in recs)  # batch 16 x 128 tokens (launch/demo.ini)
t_bytes = elapsed(met["bytes"])
print(f"{'model':<28} {'bits/byte':>9} {'nats/token':>10} {'bytes/token':>11} {'train time':>10} {'steps':>6}")
for m, name in (("bytes", "byte-level (vocab 256)"), ("bpe", "BPE (vocab 4096)")):
    e = ev[m]
    print(f"{name:<28} {e['bpb']:>9.3f} {e['loss']:>10.3f} {e['bytes'] / e['tokens']:>11.2f} "
          f"{elapsed(met[m]):>9.0f}s {len(met[m]):>6}")
# the BPE run at the same training time: its last validation within the byte run's time
t, best = 0.0, None
for r in met["bpe"]:
    t += 2048 / r["tokens_per_s"]
    if t > t_bytes:
        break
    if "val_bpb" in r:
        best = (r["step"], r["val_bpb"], t)
last_b = [r for r in met["bytes"] if "val_bpb" in r][-1]
if best:
    print(f"same training time ({t_bytes:.0f} s of steps): byte-level {last_b['val_bpb']:.3f} bits/byte at step "
          f"{last_b['step']}; BPE {best[1]:.3f} bits/byte at its step {best[0]} ({best[2]:.0f} s)")
PY

echo
echo "== samples (moe generate, temperature 0.6, the same prompts)"
printf '%s\n' "12+39=" "rev: stone -> " "the old dog " "{id: 7" "roman 1987 = " "2031-05-17 = " > "$RUN/prompts.txt"
for m in bytes bpe; do
  echo "-- $m"
  launch/moe-local 2 generate --ckpt "$RUN/$m" --prompt_file "$RUN/prompts.txt" --tokens $([[ $m == bpe ]] && echo 24 || echo 60) \
    --temperature 0.6 --seed 3
done
echo
echo "plots: $RUN/bpe/training.png $RUN/bytes/training.png    tokenizer: $RUN/tok4096.json"
