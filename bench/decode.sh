#!/usr/bin/env bash
# Generation: moe generate (KV cache) against a PyTorch KV-cache decode loop, batch 1 and 16.
# The medium model (d_model 256, 4 layers, 4 heads, E=8 top-2, d_ff 1024,
# seq_len 256; moe's weights from a 1-step training run, PyTorch's random:
# speed does not depend on them), 8-byte prompts + 200 bytes (no context
# slides). Decode tokens/s counts every sequence's fed bytes over the
# decoding loop (prefill excluded), on both sides (bench/torch_decode.py).
# Per round, alternating the order: moe 1 rank x 1 thread, moe 2 ranks x 1
# thread (experts sharded), PyTorch at 1 and at 2 threads, every MoE
# formulation of bench/torch_layer.py (--study); median over rounds; the
# strongest PyTorch formulation per thread count is the comparison.
# The memory bound: a decoding step of moe (1 rank) reads B bytes of
# parameters and cached keys/values (`moe generate --json`, counted by the
# decoder); bench/membw.c reads a buffer of B bytes again and again on one
# thread at R bytes/s; so no step can take less than B / R, and tokens/s is
# at most batch x R / B. The fraction of that bound moe reaches is printed.
#   bench/decode.sh [ROUNDS]      (default 3; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=${1:-3}
TOKENS=200
MODEL=(--d_model=256 --n_layers=4 --n_heads=4 --n_experts=8 --top_k=2 --d_ff=1024 --seq_len=256)
TMODEL=(--d-model 256 --layers 4 --heads 4 --experts 8 --top-k 2 --d-ff 1024 --seq 256)
if [[ $QUICK == 1 ]]; then
  ROUNDS=1 TOKENS=20
  MODEL=(--d_model=64 --n_layers=2 --n_heads=2 --n_experts=4 --top_k=2 --d_ff=128 --seq_len=64)
  TMODEL=(--d-model 64 --layers 2 --heads 2 --experts 4 --top-k 2 --d-ff 128 --seq 64)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$MOE" data synth --out "$tmp/corpus.txt" --bytes 1M > /dev/null
set_threads 2
"$MOE" train "${MODEL[@]}" --batch_size=2 --steps=1 --val_every=0 --data="$tmp/corpus.txt" --out_dir="$tmp/run" > /dev/null
"$PY" - "$tmp/prompts16.txt" << 'EOF'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        f.write("%02d+17=4" % i + "\n")  # 8-byte prompts, all different
EOF

moe_gen() { # ranks batch -> appends decode tok/s to $tmp/moe.<ranks>.<batch>
  local prompt
  if [[ $2 == 1 ]]; then prompt=(--prompt "07+17=4 "); else prompt=(--prompt_file "$tmp/prompts16.txt"); fi
  set_threads 1
  "${MPIRUN[@]}" $(bind_flags "$1" 1) -np "$1" -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS -x OPENBLAS_CORETYPE -x OPENBLAS_THREAD_TIMEOUT \
      "$MOE" generate --ckpt "$tmp/run" "${prompt[@]}" --tokens $TOKENS --seed 1 --json 2> /dev/null > "$tmp/gen.json"
  "$PY" -c "import json,sys; print(json.load(sys.stdin)['decode_tokens_per_s'])" < "$tmp/gen.json" >> "$tmp/moe.$1.$2"
  # bytes per step of one rank (the same every round: a fixed seed)
  if [[ $1 == 1 ]]; then
    "$PY" -c "import json,sys; j = json.load(sys.stdin)
print(j['decode_param_bytes_per_step'] + j['decode_kv_bytes_per_step'], j['decode_param_bytes_per_step'])" \
      < "$tmp/gen.json" > "$tmp/bytes.$2"
  fi
}
torch_gen() { # threads batch -> appends one JSON line per formulation to $tmp/torch.<threads>.<batch>
  set_threads "$1"
  "$PY" "$BENCH_DIR/torch_decode.py" "${TMODEL[@]}" --batch "$2" --tokens $TOKENS --threads "$1" --study \
      >> "$tmp/torch.$1.$2"
}

for r in $(seq "$ROUNDS"); do
  for batch in 1 16; do
    if (( r % 2 )); then
      moe_gen 1 $batch; moe_gen 2 $batch; torch_gen 1 $batch; torch_gen 2 $batch
    else
      torch_gen 2 $batch; torch_gen 1 $batch; moe_gen 2 $batch; moe_gen 1 $batch
    fi
  done
done

MEMBW=${MEMBW_BENCH:-$REPO_DIR/build/tests/model/membw_bench}
[[ -x $MEMBW ]] || { echo "no bandwidth benchmark at $MEMBW (build first, or set MEMBW_BENCH)" >&2; exit 2; }
for batch in 1 16; do
  read -r bytes _ < "$tmp/bytes.$batch"
  for r in $(seq "$ROUNDS"); do "$MEMBW" --bytes "$bytes" --seconds 0.3 | awk '{print $3}' >> "$tmp/bw.$batch"; done
done

echo "kernels $OPENBLAS_CORETYPE; decode tokens/s, median of $ROUNDS rounds"
printf "%-6s %12s %12s %22s %22s %8s %8s\n" batch "moe 1x1" "moe 2x1" "torch 1 thread" "torch 2 threads" "1 core" "2 cores"
for batch in 1 16; do
  "$PY" - "$tmp" "$batch" << 'EOF'
import json, statistics, sys
tmp, b = sys.argv[1], sys.argv[2]
med = statistics.median
moe = {n: med(float(x) for x in open(f"{tmp}/moe.{n}.{b}")) for n in (1, 2)}
best = {}
for t in (1, 2):
    by = {}
    for l in open(f"{tmp}/torch.{t}.{b}"):
        j = json.loads(l)
        by.setdefault(j["moe"], []).append(j["decode_tokens_per_s"])
    v = max(by, key=lambda k: med(by[k]))
    best[t] = (med(by[v]), v)
r1, r2 = moe[1] / best[1][0], moe[2] / best[2][0]
print(f"{b:<6} {moe[1]:12.0f} {moe[2]:12.0f} {best[1][0]:12.0f} ({best[1][1]:>6}) {best[2][0]:12.0f} ({best[2][1]:>6}) "
      f"{r1:7.2f}x {r2:7.2f}x")
print(f"PERF decode.b{b}.moe_tok_s {moe[1]:.0f} tok/s moe generate, batch {b}, 1 rank x 1 thread")
print(f"PERF decode.b{b}.moe_2ranks_tok_s {moe[2]:.0f} tok/s moe generate, batch {b}, 2 ranks x 1 thread")
print(f"PERF decode.b{b}.torch_tok_s {best[1][0]:.0f} tok/s PyTorch KV-cache decode ({best[1][1]}), batch {b}, 1 thread")
print(f"PERF decode.b{b}.torch_2threads_tok_s {best[2][0]:.0f} tok/s PyTorch KV-cache decode ({best[2][1]}), batch {b}, 2 threads")
print(f"PERF_README decode.b{b}.ratio {r1:.2f} x generation vs PyTorch, batch {b}, 1 core each "
      f"(moe {moe[1]:.0f} tok/s)")
print(f"PERF decode.b{b}.ratio_2cores {r2:.2f} x generation vs PyTorch, batch {b}, 2 cores each "
      f"(moe 2 ranks, PyTorch 2 threads)")
EOF
done

echo "memory bound (moe 1 rank x 1 thread): a step reads its parameters and cached keys/values; one thread reads a"
echo "buffer of that size at the rate below (bench/membw.c), so tokens/s <= batch x rate / bytes"
for batch in 1 16; do
  "$PY" - "$tmp" "$batch" << 'EOF'
import statistics, sys
tmp, b = sys.argv[1], int(sys.argv[2])
total, params = (float(x) for x in open(f"{tmp}/bytes.{b}").read().split())
bw = statistics.median(float(x) for x in open(f"{tmp}/bw.{b}")) * 1e9
moe = statistics.median(float(x) for x in open(f"{tmp}/moe.1.{b}"))
bound = b * bw / total
print(f"  batch {b:2d}: {total / 1e6:6.1f} MB per step ({params / 1e6:.1f} MB parameters, {(total - params) / 1e6:.1f} MB "
      f"keys/values), read at {bw / 1e9:5.1f} GB/s: bound {bound:7.0f} tok/s; moe {moe:6.0f} tok/s = "
      f"{100 * moe / bound:3.0f}% of it")
print(f"PERF decode.b{b}.bytes_per_step {total / 1e6:.1f} MB parameters and cached keys/values one decoding step reads, batch {b}")
print(f"PERF decode.b{b}.read_gb_s {bw / 1e9:.1f} GB/s one-thread read rate over a buffer of that size (bench/membw.c)")
print(f"PERF decode.b{b}.bound_fraction {100 * moe / bound:.0f} % moe decode tokens/s / memory bound, batch {b}, 1 rank x 1 thread")
EOF
done
