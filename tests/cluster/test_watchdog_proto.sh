#!/usr/bin/env bash
# test_watchdog_proto.sh PROTO_BIN REPO_ROOT [term|abort]: the way to end a
# job from a rank's watchdog when a node's link goes down for good
# (watchdog_proto.c; the design input of moerun's comm_timeout).
#
# 2 nodes x 2 ranks under a plain mpirun with Open MPI's default keepalive
# (300 s + 9 x 20 s), so nothing but the watchdog can end the job in time.
# Node 2's link goes down; every rank's collective stalls; after DEADLINE s
# each rank's watchdog fires.
#   term (default, the registered test): every process on both nodes is
#     gone within DEADLINE + 30 s, mpirun exits non-zero, and each node,
#     the cut-off one included, left a watchdog report in a file.
#   abort (a demonstration, not registered): MPI_Abort instead. The ranks
#     exit, but mpirun and the cut-off node's daemon are still there at
#     DEADLINE + 30 s (their abort messages sit unacknowledged on the dead
#     connection; TCP retransmits for ~15 minutes). Exits 0 when that is
#     what it sees, 1 if the job ended in time after all.
set -euo pipefail
(( $# == 2 || $# == 3 )) || { echo "usage: $0 PROTO_BIN REPO_ROOT [term|abort]" >&2; exit 2; }
proto=$(realpath "$1")
mode=${3:-term}
[[ $mode == term || $mode == abort ]] || { echo "mode must be term or abort" >&2; exit 2; }
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
vc_skip_unless_netns
vc_setup "$(realpath "$2")"
deadline=10
bound=$(( deadline + 30 ))

vc_up 2 --slots 2
mkdir -p "$tmp/wd"
# No OMPI_MCA_oob_tcp_keepalive_*: Open MPI's defaults.
"$vc" mpirun "$cl" -np 4 --map-by slot "$proto" "$deadline" "$tmp/wd" "$mode" > "$tmp/job.log" 2>&1 &
job=$!
end=$(( SECONDS + 60 ))
until [[ -e $tmp/wd/started ]]; do
    kill -0 "$job" 2> /dev/null || fail "the job ended before its first collective"
    (( SECONDS < end )) || fail "the job did not start within 60 s"
    sleep 0.2
done
sleep 2
"$vc" link "$cl" 2 down
t0=$SECONDS
log "node 2 cut; watchdogs fire after ${deadline}s; mode $mode"
left() {
    local i p
    for i in 1 2; do
        for p in $(ip netns pids "$cl-n$i"); do echo -n "node $i: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-30); "; done
    done
}
gone=0
while (( SECONDS - t0 <= bound )); do
    if ! kill -0 "$job" 2> /dev/null && [[ -z $(left) ]]; then gone=1; break; fi
    sleep 1
done
dt=$(( SECONDS - t0 ))
files=$(find "$tmp/wd" -name 'watchdog-rank*.txt' | wc -l)
if [[ $mode == abort ]]; then
    (( gone )) && fail "MPI_Abort ended the whole job in ${dt}s (<= ${bound}s): the finding no longer holds"
    log "MPI_Abort: at ${bound}s still alive: $(left)"
    # Make mpirun exit (two signals), then vc_cleanup kills the rest by PID.
    kill "$job" 2> /dev/null; sleep 1; kill "$job" 2> /dev/null || true
    wait "$job" 2> /dev/null || true
    echo "DEMONSTRATED: MPI_Abort leaves mpirun and the cut-off daemon waiting"
    exit 0
fi
(( gone )) || fail "${bound}s after the cut still alive: $(left)"
rc=0
wait "$job" || rc=$?
(( rc != 0 )) || fail "mpirun exited 0"
# The first watchdog to fire on a node gets its daemon to kill the other
# ranks there, so each node has at least one report, node 2's included.
for i in 1 2; do
    cat "$tmp"/wd/watchdog-rank*.txt | grep -q "^watchdog: rank [0-9] on $cl-n$i: allreduce of step [0-9]* not done after" \
        || fail "no rank on node $i recorded what it waited for"
done
log "every process on both nodes gone ${dt}s after the cut (bound ${bound}s), mpirun exit $rc, $files watchdog reports"
echo "PASS: the term recipe ends the job on every node within the deadline + 30 s"
