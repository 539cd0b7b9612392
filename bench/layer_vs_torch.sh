#!/usr/bin/env bash
# moe bench layer against the PyTorch baseline (bench/torch_layer.py), both
# with 2 threads, run alternately in one session; prints tokens/s and the
# ratio for E=8 token choice, E=8 expert choice and E=64 token choice.
#   bench/layer_vs_torch.sh [rounds]      (build first: launch/build)
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE_BIN:-build/src/cli/moe}
# OpenBLAS picks slow generic kernels on some virtual CPUs; both sides use the
# same OpenBLAS, so the comparison stays fair. An explicit setting wins.
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx2 /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
ROUNDS=${1:-3}
# Settings that make PyTorch's CPU path ~2x faster here (passive OpenMP
# waiting, no mmap churn in the allocator): the baseline gets its best case.
TORCH_ENV=(OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456)
cases=(
  "E=8 token choice|--experts 8 --top-k 2"
  "E=8 expert choice|--experts 8 --router expert_choice"
  "E=64 token choice|--experts 64 --top-k 2"
)
printf "%-20s %14s %14s %8s %10s\n" case "moe tok/s" "torch tok/s" ratio "moe/bareGEMM"
for c in "${cases[@]}"; do
  name=${c%%|*}; args=${c#*|}
  best_m=0; best_t=0; eff=0
  for _ in $(seq "$ROUNDS"); do
    m=$(OPENBLAS_NUM_THREADS=2 "$MOE" bench layer $args --threads 2 --iters 10 --json)
    t=$(env "${TORCH_ENV[@]}" /usr/bin/python3 bench/torch_layer.py $args --threads 2 --iters 10)
    mt=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tokens_per_s'])" "$m")
    me=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['gemm_efficiency'])" "$m")
    tt=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tokens_per_s'])" "$t")
    best_m=$(python3 -c "print(max($best_m,$mt))"); best_t=$(python3 -c "print(max($best_t,$tt))")
    eff=$(python3 -c "print(max($eff,$me))")
  done
  printf "%-20s %14.0f %14.0f %7.2fx %9.1f%%\n" "$name" "$best_m" "$best_t" \
    "$(python3 -c "print($best_m/$best_t)")" "$(python3 -c "print(100*$eff)")"
done
