#!/usr/bin/env bash
# Vocabulary-expert output head against the full softmax head (V 50257, d 256, M 64).
# The vocabulary-expert output head against the full softmax head
# (bench/vocab_head.c): training forward+backward at V 50257, d 256, M 64,
# N 2048, and next-token distributions (top-2) at batch 1 and 16, in one
# interleaved run per setting; k-means partition time. Prints a table and
# `PERF <name> <value> <unit>` lines.
#   bench/vocab_head.sh [rounds] [extra vocab_head_bench options, e.g. --partition random]
#   (build first: launch/build; VOCAB_BENCH overrides the binary)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
BIN=${VOCAB_BENCH:-build/tests/vocab/vocab_head_bench}
[[ -x $BIN ]] || { echo "no benchmark binary at $BIN (build first, or set VOCAB_BENCH)" >&2; exit 2; }
ROUNDS=${1:-7}
shift || true
# the kernel set and OPENBLAS_THREAD_TIMEOUT come from bench/env.sh
[[ $QUICK == 1 ]] && set -- --quick "$@" && ROUNDS=1
echo "== 2 OpenBLAS threads (training; both heads) =="
OPENBLAS_NUM_THREADS=2 "$BIN" --rounds "$ROUNDS" "$@"
# decoding runs one BLAS thread per rank (bench/decode.sh): the same here
echo
echo "== 1 OpenBLAS thread (generation, as moe generate runs it) =="
OPENBLAS_NUM_THREADS=1 "$BIN" --rounds "$ROUNDS" --only gen "$@" | sed 's/^PERF vocab\.gen_/PERF vocab.gen1t_/; s/, batch \([0-9]*\)$/, batch \1, 1 thread/'
