#!/usr/bin/env bash
# test_cluster_watchdog.sh MOE_BIN REPO_ROOT lost|flap: moerun's comm_timeout
# watchdog on a virtual cluster (2 nodes x 2 ranks, launch/moe-local
# --hostfile), docs/cluster.md section 4.
#
# lost: node 2's link goes down for good mid-run, with comm_timeout = 10 s
#   (Open MPI's own keepalive, 20 s + 4 x 5 s as moe-local sets it, would
#   take 35-41 s):
#   - every process of the job on both nodes is gone within comm_timeout +
#     30 s of the cut, and the launcher exits non-zero;
#   - node 1's report (stderr through mpirun, and run/watchdog-<host>.txt on
#     the shared file system) names what it waited for, the step, and the
#     ranks of node 2 with node 2's host name; node 2's report file is there
#     too (its stderr is lost with its link);
#   - `latest` names a checkpoint that verifies, and the run resumes from it
#     on node 1 alone with 2 ranks (fewer ranks, same results by design).
# flap: node 2's link goes down for 5 s mid-run, with comm_timeout = 20 s:
#   no report, the run finishes, and its losses and final checkpoint are
#   bitwise those of an undisturbed run.
# Teardown is asserted (lib.sh). Exit 77 (skip) only without root/netns.
set -euo pipefail
(( $# == 3 )) || { echo "usage: $0 MOE_BIN REPO_ROOT lost|flap" >&2; exit 2; }
moe=$(realpath "$1")
mode=$3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
vc_skip_unless_netns
vc_setup "$(realpath "$2")"
export MOE_BIN=$moe OPENBLAS_NUM_THREADS=1

"$moe" data synth --out "$tmp/corpus.txt" --bytes 100000 > /dev/null || fail "moe data synth failed"
tiny=(--d_model=16 --n_layers=1 --n_heads=2 --seq_len=16 --n_experts=4 --top_k=2 --d_ff=32
      --batch_size=4 --val_every=0 --log_every=1000 --data="$tmp/corpus.txt")
vc_up 2 --slots 2
launch=("$vc" run "$cl" -- "$repo/launch/moe-local" --hostfile "$hostfile" 4)

# wait_for_ckpt STEP JOB: until `latest` names STEP or later (bounded).
wait_for_ckpt() {
    local want=$(printf 'ckpt-%06d.h5' "$1") end=$(( SECONDS + 150 )) l
    while :; do
        l=$(cat "$tmp/run/latest" 2> /dev/null || true)
        [[ -n $l && ! $l < $want ]] && return 0
        kill -0 "$2" 2> /dev/null || fail "moe train ended before its step-$1 checkpoint"
        (( SECONDS < end )) || fail "no step-$1 checkpoint after 150 s"
        sleep 0.3
    done
}
nodes_empty() { [[ -z $(ip netns pids "$cl-n1") && -z $(ip netns pids "$cl-n2") ]]; }

if [[ $mode == lost ]]; then
    timeout_s=10
    limit=$(( timeout_s + 30 ))
    "${launch[@]}" train "${tiny[@]}" --steps=1000000 --ckpt_every=20 --keep_last=3 --out_dir="$tmp/run" \
        --comm_timeout=$timeout_s > "$tmp/train.log" 2>&1 &
    job=$!
    wait_for_ckpt 60 "$job"
    log "training across 2 nodes, comm_timeout ${timeout_s}s; latest = $(cat "$tmp/run/latest"); cutting node 2's link"
    "$vc" link "$cl" 2 down
    t0=$SECONDS
    until ! kill -0 "$job" 2> /dev/null && nodes_empty; do
        if (( SECONDS - t0 > limit )); then
            left=$(for i in 1 2; do for p in $(ip netns pids "$cl-n$i"); do echo "node $i: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-40)"; done; done)
            fail "${limit}s after the cut the job is still there: ${left:-launcher only}"
        fi
        sleep 0.5
    done
    dt=$(( SECONDS - t0 ))
    rc=0
    wait "$job" || rc=$?
    (( rc != 0 )) || fail "the launcher exited 0 after losing a node"
    n1=$tmp/run/watchdog-$cl-n1.txt n2=$tmp/run/watchdog-$cl-n2.txt
    [[ -f $n1 ]] || { cat "$tmp/train.log"; fail "no report from node 1 ($n1)"; }
    grep -q "watchdog: .* at step [0-9]* has made no progress for .*(comm_timeout $timeout_s s)" "$n1" \
        || fail "node 1's report lacks the operation, step or deadline: $(cat "$n1")"
    # Node 2's ranks (those it still waits for) and host, nobody on node 1.
    names_n2="(no data yet from|waiting for one of) (rank [23]|ranks 2-3) on $cl-n2(\\.| \\(the other ranks of this node wait too\\))"
    grep -Eq "$names_n2" "$n1" || fail "node 1's report does not name node 2's ranks and host: $(cat "$n1")"
    grep -Eq "$names_n2" "$tmp/train.log" || fail "node 1's report did not reach the launcher's stderr"
    [[ -f $n2 ]] || fail "no report from node 2 ($n2) in the shared run directory"
    grep -q "on $cl-n1" "$n2" || fail "node 2's report does not name node 1: $(cat "$n2")"
    (( $(grep -c "watchdog:" "$tmp/train.log") == 1 )) || fail "more than one report per reachable node on stderr"
    log "every process on both nodes gone ${dt}s after the cut (limit ${limit}s), exit $rc"
    log "node 1: $(cut -c1-240 "$n1")"
    log "node 2: $(cut -c1-240 "$n2")"

    latest=$(cat "$tmp/run/latest")
    "$moe" inspect --verify "$tmp/run/$latest" > "$tmp/verify.txt" 2>&1 || fail "latest checkpoint $latest does not verify"
    step=$((10#$(sed -n "s/^ckpt-\([0-9]*\)\.h5$/\1/p" <<< "$latest")))
    target=$(( step + 20 ))
    # Node 2 is still cut off: resume on node 1 alone, 2 ranks instead of 4.
    run_for 240 "$tmp/resume.log" "$vc" run "$cl" -- "$repo/launch/moe-local" 2 train "${tiny[@]}" \
        --steps="$target" --ckpt_every=20 --keep_last=3 --out_dir="$tmp/run" --resume="$tmp/run" \
        || { cat "$tmp/resume.log"; fail "resume on node 1 with 2 ranks failed"; }
    grep -q "^resumed from $tmp/run/$latest at step $step" "$tmp/resume.log" || fail "did not resume from $latest"
    [[ $(cat "$tmp/run/latest") == "$(printf 'ckpt-%06d.h5' "$target")" ]] || fail "resume did not reach step $target"
    log "resumed from $latest on node 1 alone (2 ranks) to step $target"
    echo "PASS: a node lost for good ends the job in ${dt}s (comm_timeout ${timeout_s}s) with reports naming it; resume on the rest"
elif [[ $mode == flap ]]; then
    timeout_s=20
    steps=400
    common=(train "${tiny[@]}" --steps=$steps --ckpt_every=0 --comm_timeout=$timeout_s)
    "${launch[@]}" "${common[@]}" --out_dir="$tmp/run" > "$tmp/train.log" 2>&1 &
    job=$!
    end=$(( SECONDS + 120 ))
    until [[ $(wc -l < "$tmp/run/metrics.jsonl" 2> /dev/null || echo 0) -ge 100 ]]; do
        kill -0 "$job" 2> /dev/null || fail "moe train ended before step 100"
        (( SECONDS < end )) || fail "no step 100 after 120 s"
        sleep 0.2
    done
    "$vc" link "$cl" 2 down
    sleep 5
    "$vc" link "$cl" 2 up
    log "node 2's link was down 5 s around step $(wc -l < "$tmp/run/metrics.jsonl")"
    rc=0
    timeout 300 tail --pid="$job" -f /dev/null || true
    wait "$job" || rc=$?
    (( rc == 0 )) || { tail -20 "$tmp/train.log"; fail "the run failed after a 5 s outage (exit $rc)"; }
    ! grep -q "watchdog:" "$tmp/train.log" || fail "the watchdog fired on a 5 s outage (comm_timeout ${timeout_s}s)"
    grep -q "^done: $steps steps" "$tmp/train.log" || fail "the run did not finish its $steps steps"
    run_for 300 "$tmp/ref.log" "${launch[@]}" "${common[@]}" --out_dir="$tmp/ref" || fail "the undisturbed run failed"
    cmp <(grep -o '"loss":[^,]*' "$tmp/run/metrics.jsonl") <(grep -o '"loss":[^,]*' "$tmp/ref/metrics.jsonl") \
        || fail "losses differ from the undisturbed run"
    "$py" - "$repo/tests/cli" "$tmp/run/ckpt-$(printf %06d $steps).h5" "$tmp/ref/ckpt-$(printf %06d $steps).h5" << 'EOF' \
        || fail "final checkpoints differ"
import sys
sys.path.insert(0, sys.argv[1])
import moe_cli
print("checkpoint: %d objects bitwise equal" % moe_cli.check_h5_bitwise(sys.argv[2], sys.argv[3]))
EOF
    echo "PASS: a 5 s outage (comm_timeout ${timeout_s}s) does not end the run; losses and checkpoint bitwise equal"
else
    fail "mode must be lost or flap"
fi
