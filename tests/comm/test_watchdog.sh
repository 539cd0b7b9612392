#!/usr/bin/env bash
# test_watchdog.sh MOE_BIN MPIEXEC [MPIEXEC_FLAGS...]: the comm_timeout
# watchdog on one host (no root; the multi-node cases are
# tests/cluster/test_cluster_watchdog.sh). `moe train` on 3 ranks with
# comm_timeout = 3 s:
#   - rank 1 stops answering inside the MoE layer (MOE_FAULT=stall, the
#     7th forward): ranks 0 and 2 wait in the token exchange; the job ends
#     within the deadline + 30 s, exit status non-zero, ONE report (the
#     node's first rank) on stderr and in out_dir/watchdog-<host>.txt naming
#     the operation, the step and rank 1 with its host; no process is left;
#   - rank 1 stops before a checkpoint write (MOE_FAULT=ckpt_stall): the
#     others wait in the collective HDF5 write or its agreement, same bounds;
#   - rank 1 is slow but alive (MOE_FAULT=slow, 1.5 s per layer call, each
#     wait below the deadline while the run takes many times the deadline):
#     the run finishes and equals the undisturbed run bitwise (the deadline
#     is per phase, not per job);
#   - --comm_timeout is accepted by every MPI command and checked.
set -euo pipefail
(( $# >= 2 )) || { echo "usage: $0 MOE_BIN MPIEXEC [MPIEXEC_FLAGS...]" >&2; exit 2; }
moe=$(realpath "$1")
shift
mpi=("$@")
fail() { echo "FAIL: $*" >&2; exit 1; }
log() { echo "-- $*"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-watchdog.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OPENBLAS_NUM_THREADS=1
host=$(hostname)
timeout_s=3
limit=$(( timeout_s + 30 ))

"$moe" data synth --out "$tmp/corpus.txt" --bytes 60000 > /dev/null || fail "moe data synth failed"
tiny=(--d_model=16 --n_layers=1 --n_heads=2 --seq_len=16 --n_experts=3 --top_k=2 --d_ff=32
      --batch_size=6 --val_every=0 --log_every=1000 --data="$tmp/corpus.txt")

# The processes of a run, found by its out_dir (unique to the run).
procs() { pgrep -f -- "--out_dir=$1( |\$)" || true; }

# stalled NAME SITE SKIP PATTERN: rank 1 stalls at SITE; the job must end
# in time with one report matching PATTERN.
stalled() {
    local name=$1 site=$2 skip=$3 pattern=$4 out=$tmp/$1
    local t0=$SECONDS rc=0
    MOE_FAULT=$site MOE_FAULT_RANK=1 MOE_FAULT_SKIP=$skip \
        timeout -k 5 $(( limit + 60 )) "${mpi[@]}" -np 3 -x MOE_FAULT -x MOE_FAULT_RANK -x MOE_FAULT_SKIP \
        "$moe" train "${tiny[@]}" --steps=1000 --ckpt_every=5 --out_dir="$out" \
        --comm_timeout=$timeout_s > "$out.log" 2>&1 || rc=$?
    local dt=$(( SECONDS - t0 ))
    (( rc != 0 )) || fail "$name: the job exited 0"
    (( rc != 124 )) || fail "$name: the job was still running after $(( limit + 60 )) s (timeout killed it)"
    (( dt <= limit )) || fail "$name: the job took ${dt}s to end (limit ${limit}s)"
    sleep 1
    [[ -z $(procs "$out") ]] || fail "$name: processes left: $(procs "$out" | tr '\n' ' ')"
    local n
    n=$(grep -c "watchdog:" "$out.log" || true)
    (( n == 1 )) || { cat "$out.log"; fail "$name: $n watchdog reports on stderr (one per node expected)"; }
    grep "watchdog:" "$out.log" | grep -Eq "$pattern" || { cat "$out.log"; fail "$name: the report does not match /$pattern/"; }
    [[ -f $out/watchdog-$host.txt ]] || fail "$name: no $out/watchdog-$host.txt"
    grep -Eq "$pattern" "$out/watchdog-$host.txt" || fail "$name: the report file does not match /$pattern/"
    log "$name: ended in ${dt}s (deadline ${timeout_s}s), exit $rc: $(grep "watchdog:" "$out.log" | cut -c1-200)"
}

stalled exchange stall 6 \
    "watchdog: token exchange, dispatch over the ep group at step 7 .*no data yet from rank 1 on $host"
stalled checkpoint ckpt_stall 1 \
    "watchdog: (parallel HDF5|error agreement).* at step 10 .*(waiting for one of|no data yet from) rank.* on $host"
latest=$(cat "$tmp/checkpoint/latest")
[[ $latest == ckpt-000005.h5 ]] || fail "checkpoint: latest is '$latest', expected the step-5 file"
"$moe" inspect --verify "$tmp/checkpoint/$latest" > /dev/null 2>&1 || fail "checkpoint: $latest does not verify"
log "checkpoint: latest ($latest) intact"

# Slow but alive: every wait is below the deadline; the run takes far longer.
t0=$SECONDS
MOE_FAULT=slow MOE_FAULT_RANK=1 MOE_FAULT_MS=1500 timeout -k 5 200 "${mpi[@]}" -np 3 -x MOE_FAULT -x MOE_FAULT_RANK \
    -x MOE_FAULT_MS "$moe" train "${tiny[@]}" --steps=6 --out_dir="$tmp/slow" --comm_timeout=$timeout_s \
    > "$tmp/slow.log" 2>&1 || { cat "$tmp/slow.log"; fail "slow rank: the run failed"; }
dt=$(( SECONDS - t0 ))
! grep -q "watchdog:" "$tmp/slow.log" || fail "slow rank: a watchdog report"
timeout -k 5 120 "${mpi[@]}" -np 3 "$moe" train "${tiny[@]}" --steps=6 --out_dir="$tmp/fast" \
    > "$tmp/fast.log" 2>&1 || fail "undisturbed run failed"
cmp <(grep -o '"loss":[^,]*' "$tmp/slow/metrics.jsonl") <(grep -o '"loss":[^,]*' "$tmp/fast/metrics.jsonl") \
    || fail "slow rank: losses differ from the undisturbed run"
(( dt >= 2 * timeout_s )) || fail "slow rank: the run took ${dt}s, not longer than the deadline (the hook did not slow it)"
log "slow rank: ${dt}s run (deadline ${timeout_s}s per phase), no report, losses equal the undisturbed run"

# The option of every command, checked.
for bad in -1 abc; do
    rc=0
    "$moe" eval --comm_timeout=$bad --ckpt x --data x > "$tmp/bad.log" 2>&1 || rc=$?
    (( rc == 2 )) || fail "--comm_timeout=$bad: exit $rc, expected 2"
    grep -q "comm_timeout takes seconds" "$tmp/bad.log" || fail "--comm_timeout=$bad: no clear message"
done
grep -q "^comm_timeout = 3" "$tmp/slow/config.ini" || fail "comm_timeout is not recorded in config.ini"
echo "PASS: a stalled rank ends the job within the deadline + 30 s with one report naming it; a slow rank does not"
