#!/usr/bin/env bash
# Few-row GEMMs of the decode step: cblas_sgemm against moerun's few-row paths (core/gemm.h), one thread.
# At the forward shapes of a generation step and M = 1..128 rows, every side
# alternating in each round (bench/gemm_rows.c); the crossovers justify
# MOE_GEMV_MAX_ROWS and MOE_ROWS_MAX. Prints a table and `PERF gemm_rows.<shape>_m<M> <ratio> x`.
#   bench/gemm_rows.sh [ROUNDS]     (default 7; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${GEMM_ROWS_BENCH:-build/tests/model/gemm_rows_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set GEMM_ROWS_BENCH)" >&2; exit 2; }
ARGS=(--rounds "${1:-7}")
[[ $QUICK == 1 ]] && ARGS=(--quick)
OPENBLAS_NUM_THREADS=1 "$BIN" "${ARGS[@]}"
