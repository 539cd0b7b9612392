#!/usr/bin/env bash
# run_slurm_test.sh: end-to-end test of launch/slurm/moe-train.sbatch on a
# private Slurm cluster (munged, slurmctld and slurmd started here, all
# state in a temp dir, on ports of their own).
#
#   run_slurm_test.sh MOE_BIN REPO_ROOT [NODES]
#
# NODES = 1 (default): one node on this machine. NODES >= 2: a virtual
# cluster (launch/vcluster, tests/cluster/lib.sh) with one slurmd per node
# namespace under its own NodeName, slurmctld on node 1 (where the client
# commands run, as on a login node) and one munged; the jobs ask for
# -N NODES with one rank per node, so the all-to-all crosses nodes, and
# each job must report its placement over all the nodes. Needs root and
# network namespaces (exit 77, a skip, without them).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge if missing
# (needs root and apt). Job 1 trains a tiny model on 2 ranks with the launcher
# the script picks (srun --mpi=pmix here) and checks the job state, the log
# and the checkpoints. Job 2 resubmits into the same run directory with more
# steps through the mpirun launcher, gets the time-limit signal while running
# and must requeue itself, then resume from job 1's latest checkpoint and go on. Every wait is bounded (one deadline for the
# whole test), and the daemons, jobs and temp dir are always cleaned up.
# Fails, never skips, when Slurm cannot be installed or started.
# MOE_SLURM_TEST_KEEP=1 keeps the temp dir (logs, run directory) for a look.
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }
log() { echo "-- $*"; }

(( $# == 2 || $# == 3 )) || { echo "usage: $0 MOE_BIN REPO_ROOT [NODES]" >&2; exit 2; }
moe=$(realpath "$1")
repo=$(realpath "$2")
nodes=${3:-1}
[[ $nodes =~ ^[1-9]$ ]] || { echo "NODES must be 1..9, got '$nodes'" >&2; exit 2; }
if (( nodes > 1 )); then
    # shellcheck source=../cluster/lib.sh
    source "$repo/tests/cluster/lib.sh"  # vc_skip_unless_netns, vc_up, vc_assert_gone
    vc_skip_unless_netns
    vc=$repo/launch/vcluster
fi
sbatch_script=$repo/launch/slurm/moe-train.sbatch
[[ -x $moe ]] || fail "no moe binary at '$1'"
[[ -r $sbatch_script ]] || fail "no $sbatch_script"

deadline=$(( SECONDS + 380 )) # under the ctest TIMEOUT, so cleanup always runs
# until_ok LIMIT_S WHAT CMD...: retry CMD every 0.5 s until it succeeds,
# for at most LIMIT_S seconds and never past the deadline.
until_ok() {
    local limit=$1 what=$2
    shift 2
    local end=$(( SECONDS + limit ))
    (( end < deadline )) || end=$deadline
    until "$@" > /dev/null 2>&1; do
        (( SECONDS < end )) || fail "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# ---- temp dir and cleanup ----
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-slurm.XXXXXX")
chmod 755 "$tmp"
pids=()  # daemons started here, killed in reverse order
job_ids=()
cl=""    # the virtual cluster (NODES > 1)
# ctl CMD...: a Slurm client command where slurmctld is reachable (node 1).
ctl() { if [[ -n $cl ]]; then "$vc" run "$cl" -- "$@"; else "$@"; fi; }
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if (( ${#job_ids[@]} )); then
        ctl scancel "${job_ids[@]}" 2> /dev/null
        local end=$(( SECONDS + 20 ))  # let slurmd end the job steps first
        while (( SECONDS < end )) && [[ -n $(ctl squeue -h -o %i 2> /dev/null) ]]; do sleep 0.5; done
    fi
    local i p
    for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do
        p=${pids[i]}
        kill "$p" 2> /dev/null || continue
        for _ in $(seq 20); do kill -0 "$p" 2> /dev/null || break; sleep 0.25; done
        kill -9 "$p" 2> /dev/null
        wait "$p" 2> /dev/null
    done
    if [[ -n $cl ]]; then
        # slurmstepd and anything else left in the nodes: killed by PID.
        "$vc" down "$cl" || rc=1
        if vc_assert_gone; then log "teardown: no namespace, hosts file or process left"; else rc=1; fi
    fi
    if (( rc != 0 )); then
        for f in "$tmp"/apt.log "$tmp"/job-*.out "$tmp"/slurmctld.log "$tmp"/slurmd*.log "$tmp"/munged.log; do
            [[ -f $f ]] && { echo "==== tail of $f"; tail -n 30 "$f"; }
        done
    fi
    if [[ ${MOE_SLURM_TEST_KEEP:-0} == 1 ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- packages ----
need=(slurmctld slurmd sbatch srun sinfo squeue scontrol scancel munged mungekey munge unmunge)
missing() { local c; for c in "${need[@]}"; do command -v "$c" > /dev/null || return 0; done; return 1; }
if missing; then
    [[ $(id -u) -eq 0 ]] || fail "Slurm/munge not installed and not root: cannot apt-get install them"
    pkgs=(slurmctld slurmd slurm-client munge)
    apt_install() {
        DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
            > "$tmp/apt.log" 2>&1
    }
    log "installing ${pkgs[*]}"
    if ! apt_install; then
        log "install failed, running apt-get update first"
        timeout 90 apt-get update -q > /dev/null 2>&1 || true
        apt_install || fail "apt-get install ${pkgs[*]} failed: $(tail -3 "$tmp/apt.log")"
    fi
    ! missing || fail "Slurm/munge commands still missing after install (need: ${need[*]})"
fi

# ---- private cluster ----
# munged on a private socket and key, so a system munge (if any) is untouched.
mkdir -m 700 "$tmp/munge"
sock=$tmp/munge/munge.sock
mungekey --create --keyfile="$tmp/munge/munge.key" || fail "mungekey could not create a key"
munged --foreground --force --socket="$sock" --key-file="$tmp/munge/munge.key" \
    --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/munged.seed" \
    --log-file="$tmp/munged.log" < /dev/null > /dev/null 2>&1 &
pids+=($!)
munge_ok() { munge --socket="$sock" -n | unmunge --socket="$sock"; }
until_ok 15 "munged to answer" munge_ok

# Two free TCP ports above 20000 for slurmctld and slurmd.
free_port() {
    local p
    for _ in $(seq 50); do
        p=$(( 20000 + RANDOM % 20000 ))
        ss -Hltn "sport = :$p" 2> /dev/null | grep -q . || { echo "$p"; return; }
    done
    fail "no free TCP port found"
}
ctld_port=$(free_port)
slurmd_port=$(free_port)
(( slurmd_port != ctld_port )) || slurmd_port=$(( ctld_port + 1 ))

cpus=$(nproc)
(( cpus >= 2 )) || cpus=2 # 2 ranks must fit even on 1 core (config_overrides trusts this)
if (( nodes == 1 )); then
    node=$(hostname -s)
    node_lines="NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN"
    part_nodes=$node
    ctld_addr=127.0.0.1
else
    vc_up "$nodes" --slots "$cpus"
    node_lines=
    part_nodes=
    for (( i = 1; i <= nodes; i++ )); do
        addr=$("$vc" run "$cl" --node "$i" -- getent hosts "$cl-n$i" | awk '{print $1}')
        node_lines+="NodeName=$cl-n$i NodeAddr=$addr CPUs=$cpus RealMemory=1000 State=UNKNOWN"$'\n'
        part_nodes+=${part_nodes:+,}$cl-n$i
        (( i == 1 )) && ctld_addr=$addr
    done
    node=$cl-n1
fi
export SLURM_CONF=$tmp/slurm.conf
cat > "$SLURM_CONF" << EOF
ClusterName=moetest
SlurmctldHost=$node($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$tmp/ctld
SlurmdSpoolDir=$tmp/slurmd/%n
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd-%n.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MessageTimeout=10
KillWait=5
MinJobAge=600
MailProg=/bin/true
TmpFS=$tmp/tmpfs
$node_lines
PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
mkdir -p "$tmp/ctld" "$tmp/tmpfs"
for n in ${part_nodes//,/ }; do mkdir -p "$tmp/slurmd/$n"; done

log "starting slurmctld and slurmd (nodes $part_nodes, ports $ctld_port/$slurmd_port)"
# On node 1 of a virtual cluster, the daemons run in that node's namespace
# (`vcluster run` execs, so the PID is the daemon's).
if (( nodes == 1 )); then
    slurmctld -D -i -f "$SLURM_CONF" < /dev/null > "$tmp/slurmctld.stdout" 2>&1 &
else
    "$vc" run "$cl" -- slurmctld -D -i -f "$SLURM_CONF" < /dev/null > "$tmp/slurmctld.stdout" 2>&1 &
fi
pids+=($!)
until_ok 30 "slurmctld to answer" ctl scontrol ping
for n in ${part_nodes//,/ }; do
    if (( nodes == 1 )); then
        slurmd -D -f "$SLURM_CONF" -N "$n" < /dev/null > "$tmp/slurmd-$n.stdout" 2>&1 &
    else
        # TmpFS is node-local on a real cluster (PMIx puts its per-step
        # directory there): each slurmd sees its own directory at that path.
        mkdir -p "$tmp/tmpfs-$n"
        "$vc" run "$cl" --node "${n##*-n}" -- sh -c 'mount --bind "$0" "$1" && exec slurmd -D -f "$2" -N "$3"' \
            "$tmp/tmpfs-$n" "$tmp/tmpfs" "$SLURM_CONF" "$n" < /dev/null > "$tmp/slurmd-$n.stdout" 2>&1 &
    fi
    pids+=($!)
done
nodes_idle() { [[ $(ctl sinfo -h -t idle -o %D) == "$nodes" ]]; }
until_ok 60 "$nodes node(s) to be idle in sinfo" nodes_idle

# ---- the payload: a tiny model on a synthetic corpus ----
"$moe" data synth --out "$tmp/corpus.txt" --bytes 200000 > /dev/null || fail "moe data synth failed"
cat > "$tmp/tiny.ini" << EOF
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
n_experts = 4
top_k = 2
d_ff = 64
[train]
batch_size = 4
steps = 20
data = $tmp/corpus.txt
[checkpoint]
ckpt_every = 10
EOF
run=$tmp/run

# submit SBATCH_ARGS...: submits a job, sets $job to its id and records it for cleanup.
submit() {
    job=$(ctl sbatch --parsable --chdir="$tmp" --output="$tmp/job-%j.out" --time=5 "$@") \
        || fail "sbatch refused the job"
    job=${job%%;*}
    job_ids+=("$job")
}
# wait_job ID LIMIT_S: waits for the job to end; fails unless it COMPLETED with 0:0.
wait_job() {
    local id=$1 limit=$2 info state
    local end=$(( SECONDS + limit ))
    (( end < deadline )) || end=$deadline
    while :; do
        info=$(ctl scontrol -o show job "$id" 2> /dev/null) || info=
        state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<< "$info")
        case $state in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break ;;
        esac
        (( SECONDS < end )) || fail "job $id not finished after ${limit}s (state '${state:-unknown}')"
        sleep 0.5
    done
    [[ $state == COMPLETED && $info == *" ExitCode=0:0 "* ]] \
        || fail "job $id ended $state, $(grep -o 'ExitCode=[0-9:]*' <<< "$info")"
    log "job $id COMPLETED"
}
# MOE_BLAS_PICK_ARGS: when OPENBLAS_CORETYPE is unset the script runs the
# BLAS selftest on first use; the quick one keeps the job short.
env_export=ALL,MOE_BIN=$moe,MOE_BLAS_PICK_ARGS=--quick,OMPI_ALLOW_RUN_AS_ROOT=1,OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,OMPI_MCA_rmaps_base_oversubscribe=1
latest_is() { [[ $(cat "$run/latest" 2> /dev/null) == "$1" ]]; }
verify() { "$moe" inspect --verify "$1" > /dev/null || fail "moe inspect --verify $1 failed"; }
# metrics_steps_are N: metrics.jsonl holds steps 1..N, each once, in order.
metrics_steps_are() {
    local got
    got=$(sed -n 's/^{"step":\([0-9]*\),.*/\1/p' "$run/metrics.jsonl" | tr '\n' ' ')
    [[ $got == "$(seq -s ' ' 1 "$1") " ]] || fail "metrics.jsonl steps are '$got', want 1..$1 once each"
}

# One node: 2 ranks; NODES nodes: one rank on each (the all-to-all crosses nodes).
if (( nodes == 1 )); then shape=(-N 1 -n 2); ranks=2; else shape=(-N "$nodes" --ntasks-per-node=1); ranks=$nodes; fi
# placed_on_all OUT: a job spanning nodes reports rank r on node r+1
# ("moe train: 2 ranks on 2 hosts (X-n1: rank 0, X-n2: rank 1); ...").
placed_on_all() {
    (( nodes > 1 )) || return 0
    local want="moe train: $ranks ranks on $nodes hosts (" i
    for (( i = 1; i <= nodes; i++ )); do
        (( i > 1 )) && want+=", "
        want+="$cl-n$i: rank $(( i - 1 ))"
    done
    grep -qF "$want); OpenBLAS" "$1" || fail "$1: no placement over the $nodes nodes (want '$want); ...')"
}

# ---- job 1: fresh run, launcher picked by the script ----
t0=$SECONDS
submit "${shape[@]}" --export="$env_export" "$sbatch_script" "$tmp/tiny.ini" "$run"
job1=$job
wait_job "$job1" 150
out1=$tmp/job-$job1.out
placed_on_all "$out1"
grep -q "^== $ranks ranks x 1 threads, launcher srun" "$out1" \
    || fail "job 1 did not pick srun (does 'srun --mpi=list' offer pmix?)"
grep -q '^== .*, OpenBLAS kernels [A-Za-z]' "$out1" || fail "job 1 log does not name the OpenBLAS kernel set"
grep -q -- '--resume=' "$out1" && fail "job 1 resumed, but its run directory was new"
grep -q '^== moe train exited with 0' "$out1" || fail "job 1 log lacks a clean exit of moe train"
latest_is ckpt-000020.h5 || fail "after job 1 latest is '$(cat "$run/latest" 2> /dev/null)', want ckpt-000020.h5"
verify "$run/ckpt-000010.h5"
verify "$run/ckpt-000020.h5"
grep -q '^done: 20 steps' "$out1" || fail "job 1 log lacks moe train's 'done: 20 steps'"
metrics_steps_are 20
sum1=$(md5sum < "$run/ckpt-000020.h5")
log "job 1: 20 steps on $ranks ranks ($nodes node(s)) via srun --mpi=pmix, $(( SECONDS - t0 ))s"

# ---- job 2: resubmit into the same run directory with more steps, via mpirun ----
# Its first start stands in for a run reaching the time limit: the ranks hold
# until the test sends the batch shell the time-limit signal (USR1); the
# script must requeue the job, and the restart must resume and finish.
cat > "$tmp/hold-moe" << EOF
#!/bin/sh
# only the training run holds (the script's kernel-set pick runs before it)
[ "\$1" = selftest ] && exec "$moe" "\$@"
if [ "\${SLURM_RESTART_COUNT:-0}" = 0 ]; then touch "$tmp/held"; exec sleep 300; fi
exec "$moe" "\$@"
EOF
chmod +x "$tmp/hold-moe"
t0=$SECONDS
submit "${shape[@]}" --export="$env_export,MOE_BIN=$tmp/hold-moe,MOE_LAUNCHER=mpirun" \
    "$sbatch_script" "$tmp/tiny.ini" "$run" --steps=30
job2=$job
until_ok 60 "job 2 to start" test -e "$tmp/held"
ctl scancel --batch --signal=USR1 "$job2" || fail "could not signal job 2"
wait_job "$job2" 200
out2=$tmp/job-$job2.out
grep -q '^== time limit near: requeueing job' "$out2" || fail "job 2 did not requeue itself on USR1"
grep -q "^== moe-train job $job2 (restart 1)" "$out2" || fail "job 2 did not restart after the requeue"
grep -q "^== $ranks ranks x 1 threads, launcher mpirun" "$out2" || fail "job 2 did not use the mpirun launcher"
placed_on_all "$out2"
grep -q -- "--resume=$run --steps=30" "$out2" || fail "job 2 did not pass --resume=$run"
grep -q "^resumed from $run/ckpt-000020.h5 at step 20" "$out2" || fail "moe train did not resume from step 20"
grep -q '^done: 10 steps' "$out2" || fail "job 2 log lacks moe train's 'done: 10 steps'"
metrics_steps_are 30
latest_is ckpt-000030.h5 || fail "after job 2 latest is '$(cat "$run/latest" 2> /dev/null)', want ckpt-000030.h5"
verify "$run/ckpt-000030.h5"
verify "$run"
# A fresh start would have rewritten step 20's checkpoint.
[[ $(md5sum < "$run/ckpt-000020.h5") == "$sum1" ]] || fail "job 2 rewrote ckpt-000020.h5: it did not resume"
log "job 2: requeued on USR1, resumed from ckpt-000020.h5 to ckpt-000030.h5, $(( SECONDS - t0 ))s"
echo "PASS: Slurm run on $nodes node(s), checkpoint, requeue and resume"
