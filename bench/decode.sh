#!/usr/bin/env bash
# Decoding throughput of `moe generate` (key/value cache) for the medium
# model (d_model 256, 4 layers, 4 heads, E=8 top-2, d_ff 1024, seq_len 256;
# weights from a 1-step training run: speed does not depend on them), at
# batch 1 and batch 16, on 1 and 2 ranks (experts sharded). Decode tokens/s
# counts every sequence's new bytes over the decoding loop (prefill excluded;
# 8-byte prompts + 200 bytes stay inside seq_len, so no context slides).
# One BLAS thread per rank: decoding GEMMs are a few rows, too small to split.
#   bench/decode.sh [rounds]      (build first: launch/build; MOE_BIN overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE_BIN:-build/src/cli/moe}
ROUNDS=${1:-3}
TOKENS=200
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MPI=(mpirun --allow-run-as-root --oversubscribe)

"$MOE" data synth --out "$WORK/corpus.txt" --bytes 1M >/dev/null
OPENBLAS_NUM_THREADS=2 "$MOE" train --d_model=256 --n_layers=4 --n_heads=4 --n_experts=8 --top_k=2 \
  --d_ff=1024 --seq_len=256 --batch_size=2 --steps=1 --val_every=0 --data="$WORK/corpus.txt" \
  --out_dir="$WORK/run" >/dev/null
python3 - "$WORK/prompts16.txt" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        f.write("%02d+17=4" % i + "\n")  # 8-byte prompts, all different
PY

printf "%-6s %-6s %14s %10s\n" ranks batch "decode tok/s" "ms/step"
for np in 1 2; do
  for batch in 1 16; do
    if [ "$batch" = 1 ]; then prompt=(--prompt "07+17=4 "); else prompt=(--prompt_file "$WORK/prompts16.txt"); fi
    best=0
    for _ in $(seq "$ROUNDS"); do
      out=$(OPENBLAS_NUM_THREADS=1 "${MPI[@]}" -np "$np" "$MOE" generate --ckpt "$WORK/run" \
            "${prompt[@]}" --tokens $TOKENS --seed 1 --json 2>/dev/null)
      r=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['decode_tokens_per_s'])" "$out")
      best=$(python3 -c "print(max($best, $r))")
    done
    printf "%-6s %-6s %14.0f %10.3f\n" "$np" "$batch" "$best" "$(python3 -c "print(1000*$batch/$best)")"
  done
done
