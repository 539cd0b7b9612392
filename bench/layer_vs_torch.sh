#!/usr/bin/env bash
# MoE layer forward+backward: moe bench layer against the strongest PyTorch formulation.
# For E=8 top-2, E=64 top-2 (token choice) and E=8 expert choice at the
# default shape of `moe bench layer` (4096 tokens, d_model 256, d_ff 1024),
# each round runs moe bench layer and every formulation of
# bench/torch_layer.py (--study: loop, split, unbind, bmm, jit; checked
# against each other first), alternating which side goes first. Figures:
# median over rounds of each side's median iteration; "strongest" is the
# formulation with the best median in this run. Also: the layer's expert
# GEMM rate against the same GEMMs alone (moe bench layer: the faster of
# OpenBLAS threading each GEMM and the experts shared out over the threads,
# one OpenBLAS thread each) and against the
# peak sgemm rate of `moe selftest blas` at the same thread count.
#   bench/layer_vs_torch.sh [ROUNDS]    (default 3; build first: launch/build)
#   env: THREADS (2), bench/env.sh (kernels, thread settings of both sides)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=${1:-3}
THREADS=${THREADS:-2}
ITERS=10
SHAPE=() QFLAG=()
if [[ $QUICK == 1 ]]; then ROUNDS=1 ITERS=2 SHAPE=(--tokens 512 --d-model 64 --d-ff 128) QFLAG=(--quick); fi
set_threads "$THREADS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cases=(
  "e8_k2|E=8 top-2 token choice|--experts 8 --top-k 2"
  "e64_k2|E=64 top-2 token choice|--experts 64 --top-k 2"
  "e8_ec|E=8 expert choice|--experts 8 --router expert_choice"
)
# the peak sgemm rate of these kernels at THREADS threads (the selftest's timed shapes)
OPENBLAS_NUM_THREADS=$(nproc) "$MOE" selftest blas --one "$OPENBLAS_CORETYPE" --no-check "${QFLAG[@]}" > "$tmp/sgemm" || { echo "layer_vs_torch: moe selftest blas --one $OPENBLAS_CORETYPE failed" >&2; exit 1; }
peak=$("$PY" - "$tmp/sgemm" "$THREADS" << 'EOF'
import json, sys
j = json.loads(open(sys.argv[1]).read().split("MOE_BLAS_RESULT ", 1)[1])
print(max(t["gflops"] for t in j["times"] if t["threads"] == int(sys.argv[2])) if any(
    t["threads"] == int(sys.argv[2]) for t in j["times"]) else max(t["gflops"] for t in j["times"]))
EOF
)
echo "kernels $OPENBLAS_CORETYPE, $THREADS threads per side; peak sgemm (moe selftest blas) $(calc "round($peak)") GFLOP/s"
for c in "${cases[@]}"; do
  IFS='|' read -r key name args <<< "$c"
  : > "$tmp/moe.$key"
  : > "$tmp/torch.$key"
  for r in $(seq "$ROUNDS"); do
    run_moe() { "$MOE" bench layer $args "${SHAPE[@]}" --threads "$THREADS" --iters $ITERS --json >> "$tmp/moe.$key"; }
    run_torch() { "$PY" "$BENCH_DIR/torch_layer.py" --study --rounds 1 $args "${SHAPE[@]}" --threads "$THREADS" \
                      --iters $ITERS | grep '^{' >> "$tmp/torch.$key"; }
    if (( r % 2 )); then run_moe; run_torch; else run_torch; run_moe; fi
  done
  "$PY" - "$tmp/moe.$key" "$tmp/torch.$key" "$key" "$name" "$peak" "$ROUNDS" << 'EOF'
import json, statistics, sys
moe_f, torch_f, key, name, peak, rounds = sys.argv[1:7]
med = statistics.median
moe = [json.loads(l) for l in open(moe_f)]
by_variant = {}
for l in open(torch_f):
    j = json.loads(l)
    if "tokens_per_s" in j:
        by_variant.setdefault(j["variant"], []).append(j["tokens_per_s"])
m = med(r["tokens_per_s"] for r in moe)
tv = {v: med(x) for v, x in by_variant.items()}
best = max(tv, key=tv.get)
eff = med(r["gemm_efficiency"] for r in moe)
# the layer's expert FLOPs over its whole iteration, against the peak sgemm rate
rate = med(r["expert_gemm_gflops"] * (r["split_ms"]["expert_fwd"] + r["split_ms"]["expert_bwd"]) / r["ms_per_iter"]
           for r in moe)
print(f"== {name}: moe {m:.0f} tok/s; PyTorch " + ", ".join(f"{v} {t:.0f}" for v, t in sorted(tv.items(), key=lambda kv: -kv[1]))
      + f" tok/s (median of {rounds} rounds)")
print(f"   moe / strongest PyTorch ({best}): {m / tv[best]:.2f}x; layer at {100 * eff:.0f}% of its expert GEMMs alone; "
      f"{rate:.0f} GFLOP/s of expert GEMM work = {100 * rate / float(peak):.0f}% of peak sgemm")
print(f"PERF layer.{key}.moe_tok_s {m:.0f} tok/s moe bench layer, {name}")
print(f"PERF layer.{key}.torch_tok_s {tv[best]:.0f} tok/s strongest PyTorch formulation ({best}), {name}")
for v, t in sorted(tv.items()):
    print(f"PERF layer.{key}.torch_{v}_tok_s {t:.0f} tok/s PyTorch formulation {v}, {name}")
print(f"PERF_README layer.{key}.ratio {m / tv[best]:.2f} x MoE layer fwd+bwd vs strongest PyTorch ({best}), {name}")
print(f"PERF layer.{key}.gemm_efficiency {100 * eff:.0f} % layer time of the same expert GEMMs alone / layer time, {name}")
print(f"PERF layer.{key}.peak_fraction {100 * rate / float(peak):.0f} % expert GEMM FLOPs per layer second / peak sgemm, {name}")
EOF
done
