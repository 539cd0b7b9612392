#!/usr/bin/env bash
# test_kernel_check.sh MOE_BIN MPIEXEC [MPIEXEC_FLAGS...]: the start-up check
# of BLAS kernel sets on one host (no root, no virtual cluster needed).
# Two ranks started by one mpirun with different OPENBLAS_CORETYPE (MPMD):
# every command that runs under MPI (train, eval, generate, bench layer,
# bench a2a) stops before doing any work, exits non-zero on every rank and
# names both kernel sets with their ranks and host; --allow_mixed_kernels
# runs with a warning; the same kernels on both ranks run silently.
set -euo pipefail
(( $# >= 2 )) || { echo "usage: $0 MOE_BIN MPIEXEC [MPIEXEC_FLAGS...]" >&2; exit 2; }
moe=$(realpath "$1")
shift
mpi=("$@")
fail() { echo "FAIL: $*" >&2; exit 1; }
log() { echo "-- $*"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-kernels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1

# Two kernel sets this CPU runs.
sets=()
for pair in Haswell:avx2 Sandybridge:avx Nehalem:sse4_2 Core2:ssse3; do
    grep -qw "${pair#*:}" /proc/cpuinfo && sets+=("${pair%%:*}")
done
(( ${#sets[@]} >= 2 )) || fail "fewer than two OpenBLAS kernel sets run on this CPU"
k0=${sets[0]} k1=${sets[1]}
host=$(hostname)
log "rank 0: OPENBLAS_CORETYPE=$k0, rank 1: $k1"

"$moe" data synth --out "$tmp/corpus.txt" --bytes 60000 > /dev/null || fail "moe data synth failed"
tiny=(--d_model=16 --n_layers=1 --n_heads=2 --seq_len=16 --n_experts=4 --top_k=2 --d_ff=32
      --batch_size=4 --val_every=0 --data="$tmp/corpus.txt")
"$moe" train "${tiny[@]}" --steps=2 --out_dir="$tmp/ckpt" > /dev/null || fail "moe train (1 rank) failed"

# mixed K0 K1 LOG ARGS...: the moe command ARGS on 2 ranks, rank r with kernel set Kr.
mixed() {
    local a=$1 b=$2 out=$3
    shift 3
    timeout -k 5 60 "${mpi[@]}" -np 1 -x OPENBLAS_CORETYPE="$a" "$moe" "$@" : \
        -np 1 -x OPENBLAS_CORETYPE="$b" "$moe" "$@" > "$out" 2>&1
}
commands=(
    "train:train ${tiny[*]} --steps=2 --out_dir=$tmp/run"
    "eval:eval --ckpt $tmp/ckpt --data $tmp/corpus.txt"
    "generate:generate --ckpt $tmp/ckpt --prompt ab --tokens 4"
    "bench layer:bench layer --tokens 64 --d-model 16 --d-ff 32 --experts 4 --iters 1 --warmup 0"
    "bench a2a:bench a2a --tokens 64 --d-model 16 --experts 4 --iters 1 --warmup 0 --kind p2p"
)
for c in "${commands[@]}"; do
    name=${c%%:*}
    read -r -a args <<< "${c#*:}"
    rc=0
    mixed "$k0" "$k1" "$tmp/mixed.log" "${args[@]}" || rc=$?
    (( rc != 0 && rc != 124 )) || { cat "$tmp/mixed.log"; fail "$name with mixed kernels: exit $rc, want non-zero (not a timeout)"; }
    want="BLAS kernels differ between ranks: '$k0' on rank 0 ($host), '$k1' on rank 1 ($host)"
    grep -q "$name: mismatch: $want" "$tmp/mixed.log" || { cat "$tmp/mixed.log"; fail "$name: no message naming both kernel sets"; }
    mixed "$k0" "$k1" "$tmp/allowed.log" "${args[@]}" --allow_mixed_kernels \
        || { cat "$tmp/allowed.log"; fail "$name --allow_mixed_kernels failed"; }
    grep -q "warning: $want" "$tmp/allowed.log" || { cat "$tmp/allowed.log"; fail "$name --allow_mixed_kernels: no warning"; }
    mixed "$k0" "$k0" "$tmp/same.log" "${args[@]}" || { cat "$tmp/same.log"; fail "$name with the same kernels failed"; }
    grep -q "BLAS kernels\|ranks on" "$tmp/same.log" && { cat "$tmp/same.log"; fail "$name: a one-host job with one kernel set said something"; }
    grep -q "^step\|^p2p\|^moe bench layer: .* ms" "$tmp/mixed.log" && fail "$name: did work before stopping"
    log "$name: stops on mixed kernels, runs with --allow_mixed_kernels (warning) and with one kernel set"
done
# The option takes 0 or 1 only.
rc=0
"$moe" eval --allow_mixed_kernels=yes > "$tmp/bad.log" 2>&1 || rc=$?
(( rc == 2 )) && grep -q "allow_mixed_kernels takes 0 or 1, got 'yes'" "$tmp/bad.log" || fail "bad --allow_mixed_kernels value: exit $rc"
echo "PASS: mixed BLAS kernels stop every MPI command unless allowed"
