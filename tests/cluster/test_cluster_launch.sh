#!/usr/bin/env bash
# test_cluster_launch.sh MOE_BIN REPO_ROOT: launching across the nodes of a
# virtual cluster when something is wrong.
#   1. Kernels: a plain mpirun forwards nothing, so the ranks of node 2 (bare
#      environment) let OpenBLAS pick its kernels while node 1's ranks run
#      the OPENBLAS_CORETYPE of mpirun's environment. moe train stops at
#      start-up on every rank, naming the kernel sets, ranks and hosts;
#      --allow_mixed_kernels runs with a warning; launch/moe-local forwards
#      the variable and runs.
#   2. A node whose link is down at launch: launch/moe-local's pre-flight
#      fails within seconds naming the host and its hostfile line, and
#      starts nothing.
#   3. The same without the pre-flight (MOE_PREFLIGHT=0): mpirun itself
#      stops within seconds (orte_leave_session_attached) naming the node
#      (a plain mpirun waits forever: docs/cluster.md).
# Every run is under a timeout; teardown is asserted (lib.sh).
set -euo pipefail
(( $# == 2 )) || { echo "usage: $0 MOE_BIN REPO_ROOT" >&2; exit 2; }
moe=$(realpath "$1")
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
vc_skip_unless_netns
vc_setup "$(realpath "$2")"
local_launch=$repo/launch/moe-local
export MOE_BIN=$moe OPENBLAS_NUM_THREADS=1

"$moe" data synth --out "$tmp/corpus.txt" --bytes 100000 > /dev/null || fail "moe data synth failed"
tiny=(--d_model=16 --n_layers=1 --n_heads=2 --seq_len=16 --n_experts=4 --top_k=2 --d_ff=32
      --batch_size=4 --steps=3 --val_every=0 --data="$tmp/corpus.txt")

# ---- 1. kernel sets differ between nodes ----
# The kernels OpenBLAS picks with no OPENBLAS_CORETYPE, and another set this
# CPU can run, for node 1.
auto=$(env -u OPENBLAS_CORETYPE "$moe" --version | sed -n 's/.* \([A-Za-z0-9]*\) MAX_THREADS.*/\1/p')
[[ -n $auto ]] || fail "cannot tell OpenBLAS's kernel set from '$("$moe" --version)'"
other=
for pair in Haswell:avx2 Sandybridge:avx Nehalem:sse4_2 Core2:ssse3; do
    if [[ ${pair%%:*} != "$auto" ]] && grep -qw "${pair#*:}" /proc/cpuinfo; then other=${pair%%:*}; break; fi
done
[[ -n $other ]] || fail "no second OpenBLAS kernel set for this CPU (autodetected $auto)"
log "node 1 runs OPENBLAS_CORETYPE=$other, node 2 autodetects $auto"

vc_up 2 --slots 1
t0=$SECONDS
rc=0
OPENBLAS_CORETYPE=$other run_for 60 "$tmp/mixed.log" "$vc" mpirun "$cl" -np 2 \
    "$moe" train "${tiny[@]}" --out_dir="$tmp/mixed" || rc=$?
(( rc != 0 && rc != 124 )) || fail "mixed kernels: moe train exited $rc, want a non-zero exit (not a timeout)"
for r in 0 1; do
    grep -q "^moe\[rank $r\]: train: mismatch: BLAS kernels differ between ranks: '$other' on rank 0 ($cl-n1), '$auto' on rank 1 ($cl-n2)" \
        "$tmp/mixed.log" || fail "rank $r did not name the kernel sets, ranks and hosts"
done
grep -q "^step" "$tmp/mixed.log" && fail "mixed kernels: training started anyway"
log "mixed kernels stop the job on every rank in $(( SECONDS - t0 )) s"

OPENBLAS_CORETYPE=$other run_for 60 "$tmp/allowed.log" "$vc" mpirun "$cl" -np 2 \
    "$moe" train "${tiny[@]}" --out_dir="$tmp/allowed" --allow_mixed_kernels \
    || fail "moe train --allow_mixed_kernels failed"
grep -q "^moe train: warning: BLAS kernels differ between ranks: '$other' on rank 0 ($cl-n1), '$auto' on rank 1 ($cl-n2).*(allowed by --allow_mixed_kernels)" \
    "$tmp/allowed.log" || fail "--allow_mixed_kernels did not warn"
grep -q "^done: 3 steps" "$tmp/allowed.log" || fail "--allow_mixed_kernels did not train"

OPENBLAS_CORETYPE=$other run_for 60 "$tmp/forwarded.log" "$vc" run "$cl" -- \
    "$local_launch" --hostfile "$hostfile" 2 train "${tiny[@]}" --out_dir="$tmp/forwarded" \
    || fail "moe train through launch/moe-local failed"
grep -q "OpenBLAS $other, 1 thread" "$tmp/forwarded.log" || fail "moe-local did not give node 2 OPENBLAS_CORETYPE=$other"
grep -q "warning" "$tmp/forwarded.log" && fail "moe-local: unexpected warning"
log "--allow_mixed_kernels warns and runs; moe-local forwards the kernel set"

# ---- 2. a node's link is down at launch: the pre-flight names it ----
vc_up 3 --slots 1
"$vc" link "$cl" 3 down
t0=$SECONDS
rc=0
run_for 60 "$tmp/preflight.log" "$vc" run "$cl" -- "$local_launch" --hostfile "$hostfile" 3 \
    train "${tiny[@]}" --out_dir="$tmp/pf" || rc=$?
dt=$(( SECONDS - t0 ))
(( rc != 0 && rc != 124 )) || fail "pre-flight: exit $rc, want a non-zero exit (not a timeout)"
(( dt <= 20 )) || fail "pre-flight took ${dt}s to fail, want seconds"
grep -q "^moe-local: host '$cl-n3' ($hostfile line 3) does not answer" "$tmp/preflight.log" \
    || fail "pre-flight did not name host $cl-n3 and its hostfile line"
grep -q "host '$cl-n[12]'" "$tmp/preflight.log" && fail "pre-flight blamed a host that answers"
grep -q "^moe-local: not starting" "$tmp/preflight.log" || fail "pre-flight did not say it starts nothing"
[[ -e $tmp/pf ]] && fail "pre-flight failed, yet moe train ran"
log "pre-flight: $cl-n3 named in ${dt}s: $(grep -o 'does not answer.*' "$tmp/preflight.log")"

# ---- 3. the same without the pre-flight: mpirun's own bound ----
t0=$SECONDS
rc=0
MOE_PREFLIGHT=0 run_for 90 "$tmp/nopreflight.log" "$vc" run "$cl" -- "$local_launch" --hostfile "$hostfile" 3 \
    train "${tiny[@]}" --out_dir="$tmp/npf" || rc=$?
dt=$(( SECONDS - t0 ))
(( rc != 0 && rc != 124 )) || fail "no pre-flight: exit $rc, want mpirun to fail (124: it waited until the timeout)"
(( dt <= 45 )) || fail "no pre-flight: mpirun took ${dt}s to fail"
grep -q "$cl-n3" "$tmp/nopreflight.log" || fail "no pre-flight: mpirun's message does not name $cl-n3"
log "no pre-flight: mpirun stopped by itself in ${dt}s naming $cl-n3"
echo "PASS: mixed kernels stop the job; a node down at launch fails within seconds, named"
