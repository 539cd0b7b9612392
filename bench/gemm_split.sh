#!/usr/bin/env bash
# Threaded GEMMs: moerun's split over its own pool (moe_gemm, core/gemm.h) against OpenBLAS's own threading.
# At the GEMM groups of moerun's shapes (the ones `moe selftest blas` times at every
# core), every side alternating in each round (bench/gemm_split.c); justifies
# moerun threading its GEMMs itself. Prints a table and `PERF gemm_split.<shape> <ratio> x`.
#   bench/gemm_split.sh [ROUNDS]     (default 5; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${GEMM_SPLIT_BENCH:-build/tests/core/gemm_split_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set GEMM_SPLIT_BENCH)" >&2; exit 2; }
ARGS=(--rounds "${1:-5}")
[[ $QUICK == 1 ]] && ARGS=(--quick)
OPENBLAS_NUM_THREADS=$(nproc) "$BIN" "${ARGS[@]}"
