#!/usr/bin/env bash
# The vocabulary-expert output head against the full softmax head
# (bench/vocab_head.c): training forward+backward at V 50257, d 256, M 64,
# N 2048, and next-token distributions (top-2) at batch 1 and 16, in one
# interleaved run per setting; k-means partition time. Prints a table and
# `PERF <name> <value> <unit>` lines.
#   bench/vocab_head.sh [rounds] [extra vocab_head_bench options, e.g. --partition random]
#   (build first: launch/build; VOCAB_BENCH overrides the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VOCAB_BENCH:-build/tests/vocab/vocab_head_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set VOCAB_BENCH)" >&2; exit 2; }
ROUNDS=${1:-7}
shift || true
# OpenBLAS misdetects this machine's CPU and picks slow kernels otherwise;
# idle OpenBLAS workers sleep instead of spinning between the timed passes.
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Haswell}
export OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
echo "== 2 OpenBLAS threads (training; both heads) =="
OPENBLAS_NUM_THREADS=2 "$BIN" --rounds "$ROUNDS" "$@"
# decoding runs one BLAS thread per rank (bench/decode.sh): the same here
echo
echo "== 1 OpenBLAS thread (generation, as moe generate runs it) =="
OPENBLAS_NUM_THREADS=1 "$BIN" --rounds "$ROUNDS" --only gen "$@" | sed 's/^PERF vocab_head_gen_/PERF vocab_head_gen1t_/'
