#!/usr/bin/env bash
# The exchange's token passes (pack, combine, gate gradient, dx accumulation)
# at 1 and 2 threads, one rank (bench/a2a_passes.c): thread counts alternate
# every iteration, each pass's fastest iteration counts (robust to other
# processes on the cores). Prints a table and `PERF a2a_passes.speedup_2t <ratio> x`.
#   bench/a2a_passes.sh [ITERS]     (default 200; build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${A2A_PASSES_BENCH:-build/tests/comm/a2a_passes_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set A2A_PASSES_BENCH)" >&2; exit 2; }
ARGS=(--iters "${1:-200}")
[[ $QUICK == 1 ]] && ARGS=(--quick)
echo "kernels $OPENBLAS_CORETYPE; $(uptime)"
"$BIN" "${ARGS[@]}"
