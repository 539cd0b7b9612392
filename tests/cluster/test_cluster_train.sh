#!/usr/bin/env bash
# test_cluster_train.sh MOE_BIN REPO_ROOT: moerun across the nodes of a
# virtual cluster (launch/vcluster) against the same work on one node.
#
# A 2-node cluster, 2 ranks per node, launched with launch/moe-local
# --hostfile (pre-flight, environment forwarding); the reference is 4 ranks
# of launch/moe-local on this machine alone. OPENBLAS_CORETYPE is pinned to
# the same kernel set for both, so the results must be BITWISE equal (same
# rank count, same kernels, same reduction order):
#   1. moe train, 30 steps, ep 4 (the token all-to-all crosses nodes):
#      metrics.jsonl (timing fields aside) and both checkpoints;
#   2. moe train, 10 steps, ep 2 with a2a = shm (each ep group on one node,
#      the expert-gradient sum over replicas crosses nodes);
#   3. moe eval --json and moe generate --json of the cross-node checkpoint;
#   4. that checkpoint evaluated on 1 rank: loss within 1e-6 nats of the
#      4-rank result (docs/inference.md);
#   5. moe bench a2a across nodes: the exchange verifies its round trip;
#   6. the job reports its placement (ranks per host) at start-up.
# Every run is under a timeout; the EXIT trap tears the cluster down and
# asserts that no namespace or process is left (tests/cluster/lib.sh).
# Exit 77 (skip) only when not root or network namespaces are unavailable.
set -euo pipefail
(( $# == 2 )) || { echo "usage: $0 MOE_BIN REPO_ROOT" >&2; exit 2; }
moe=$(realpath "$1")
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
vc_skip_unless_netns
vc_setup "$(realpath "$2")"
local_launch=$repo/launch/moe-local
export MOE_BIN=$moe OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
# One kernel set for every rank of both runs: the environment's, else the
# one OpenBLAS picks here.
if [[ -z ${OPENBLAS_CORETYPE:-} ]]; then
    OPENBLAS_CORETYPE=$(env -u OPENBLAS_CORETYPE "$moe" --version | sed -n 's/.* \([A-Za-z0-9]*\) MAX_THREADS.*/\1/p')
    [[ -n $OPENBLAS_CORETYPE ]] || fail "cannot tell OpenBLAS's kernel set from '$("$moe" --version)'"
fi
export OPENBLAS_CORETYPE
log "OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE for every rank"

vc_up 2 --slots 2
on_cluster=("$vc" run "$cl" -- "$local_launch" --hostfile "$hostfile" 4)
on_one_node=("$local_launch" 4)

"$moe" data synth --out "$tmp/corpus.txt" --bytes 200000 > /dev/null || fail "moe data synth failed"
head -c 20000 "$tmp/corpus.txt" > "$tmp/eval.txt"
cat > "$tmp/small.ini" << EOF
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
n_experts = 8
top_k = 2
d_ff = 64
moe_every = 1
[train]
batch_size = 8
steps = 30
warmup_steps = 5
log_every = 10
data = $tmp/corpus.txt
[data]
val_every = 15
val_batches = 2
[checkpoint]
ckpt_every = 15
keep_last = 0
EOF

# same_metrics A B: every step's fields equal, timing fields aside.
same_metrics() {
    "$py" - "$1" "$2" << 'EOF' || fail "metrics differ: $1 vs $2"
import json, sys
def load(p):
    out = []
    for line in open(p):
        d = json.loads(line)
        for k in ("tokens_per_s", "time_ms", "checkpoint_s"):
            d.pop(k, None)
        out.append(d)
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
for x, y in zip(a, b):
    if x != y:
        sys.exit("step %s differs:\n %s\n %s" % (x.get("step"), x, y))
print("metrics: %d steps equal" % len(a))
EOF
}
# same_h5 A B: every group and dataset bit for bit (tests/cli/moe_cli.py; the
# root attributes, which name the run directory and the time, aside).
same_h5() {
    "$py" - "$repo/tests/cli" "$1" "$2" << 'EOF' || fail "checkpoints differ: $1 vs $2"
import sys
sys.path.insert(0, sys.argv[1])
import moe_cli
try:
    n = moe_cli.check_h5_bitwise(sys.argv[2], sys.argv[3])
except moe_cli.Failure as e:
    sys.exit(str(e))
print("checkpoint: %d objects bitwise equal" % n)
EOF
}

# ---- 1. training, ep 4: the all-to-all crosses nodes ----
t0=$SECONDS
run_for 240 "$tmp/train-cluster.log" "${on_cluster[@]}" train --config "$tmp/small.ini" --out_dir="$tmp/rc" \
    || fail "moe train on the cluster failed (exit $?)"
log "train 2 nodes x 2 ranks: $(( SECONDS - t0 )) s"
grep -q "moe train: 4 ranks on 2 hosts ($cl-n1: ranks 0-1, $cl-n2: ranks 2-3); OpenBLAS $OPENBLAS_CORETYPE, 1 thread" \
    "$tmp/train-cluster.log" || fail "moe train did not report its placement over the 2 nodes"
grep -q "^done: 30 steps" "$tmp/train-cluster.log" || fail "moe train on the cluster did not finish 30 steps"
t0=$SECONDS
run_for 240 "$tmp/train-local.log" "${on_one_node[@]}" train --config "$tmp/small.ini" --out_dir="$tmp/r1" \
    || fail "moe train on one node failed (exit $?)"
log "train 4 ranks on one node: $(( SECONDS - t0 )) s"
grep -q "ranks on .* hosts" "$tmp/train-local.log" && fail "a one-node job printed a multi-host placement line"
same_metrics "$tmp/rc/metrics.jsonl" "$tmp/r1/metrics.jsonl"
same_h5 "$tmp/rc/ckpt-000015.h5" "$tmp/r1/ckpt-000015.h5"
same_h5 "$tmp/rc/ckpt-000030.h5" "$tmp/r1/ckpt-000030.h5"
log "ep 4: metrics and checkpoints bitwise equal to one node"

# ---- 2. ep 2 with shared memory inside each node ----
run_for 240 "$tmp/shm-cluster.log" "${on_cluster[@]}" train --config "$tmp/small.ini" --out_dir="$tmp/sc" \
    --steps=10 --ep_size=2 --a2a=shm --ckpt_every=0 --val_every=0 \
    || fail "moe train --ep_size=2 --a2a=shm on the cluster failed (exit $?)"
run_for 240 "$tmp/shm-local.log" "${on_one_node[@]}" train --config "$tmp/small.ini" --out_dir="$tmp/s1" \
    --steps=10 --ep_size=2 --a2a=shm --ckpt_every=0 --val_every=0 \
    || fail "moe train --ep_size=2 --a2a=shm on one node failed (exit $?)"
same_metrics "$tmp/sc/metrics.jsonl" "$tmp/s1/metrics.jsonl"
same_h5 "$tmp/sc/ckpt-000010.h5" "$tmp/s1/ckpt-000010.h5"
log "ep 2 + shm per node: bitwise equal to one node"

# ---- 3. eval and generate of the cross-node checkpoint ----
run_for_json 120 "$tmp/eval-cluster.log" "${on_cluster[@]}" eval --ckpt "$tmp/rc" --data "$tmp/eval.txt" --json \
    || fail "moe eval on the cluster failed"
run_for_json 120 "$tmp/eval-local.log" "${on_one_node[@]}" eval --ckpt "$tmp/rc" --data "$tmp/eval.txt" --json \
    || fail "moe eval on one node failed"
run_for_json 120 "$tmp/eval-1.log" "$moe" eval --ckpt "$tmp/rc" --data "$tmp/eval.txt" --json \
    || fail "moe eval on 1 rank failed"
gen=(generate --ckpt "$tmp/rc" --prompt "17+25=" --tokens 60 --temperature 0.8 --top_k 20 --seed 5 --json)
run_for_json 120 "$tmp/gen-cluster.log" "${on_cluster[@]}" "${gen[@]}" || fail "moe generate on the cluster failed"
run_for_json 120 "$tmp/gen-local.log" "${on_one_node[@]}" "${gen[@]}" || fail "moe generate on one node failed"
"$py" - "$tmp" << 'EOF' || fail "eval/generate across nodes differ from one node"
import json, sys
t = sys.argv[1]
def js(name):
    return json.load(open(f"{t}/{name}"))
ec, el, e1 = js("eval-cluster.log"), js("eval-local.log"), js("eval-1.log")
for k in ("loss", "bpb", "tokens", "windows"):
    assert ec[k] == el[k], ("eval", k, ec[k], el[k])
assert ec["tokens"] == e1["tokens"] and ec["windows"] == e1["windows"]
assert abs(ec["loss"] - e1["loss"]) <= 1e-6, ("1 rank vs 2x2", e1["loss"], ec["loss"])
gc, gl = js("gen-cluster.log"), js("gen-local.log")
tc, tl = [s["text"] for s in gc["samples"]], [s["text"] for s in gl["samples"]]
assert tc == tl and len(tc[0]) > 0, (tc, tl)
print("eval: loss %.9f bitwise equal on 2x2 and 4x1, 1 rank differs by %.2e; generate: same %d bytes"
      % (ec["loss"], abs(ec["loss"] - e1["loss"]), len(tc[0].encode())))
EOF
log "eval and generate across nodes bitwise equal to one node; 1-rank eval within 1e-6"

# ---- 5. the token all-to-all across nodes ----
run_for 120 "$tmp/a2a.log" "${on_cluster[@]}" bench a2a --kind p2p --tokens 1024 --iters 5 \
    || fail "moe bench a2a on the cluster failed"
grep -Eq '^p2p .* ok$' "$tmp/a2a.log" || fail "bench a2a across nodes did not verify its round trip"
log "bench a2a across nodes: $(grep -E '^p2p' "$tmp/a2a.log" | awk '{print $2 " ms, " $3 " GB/s"}')"
echo "PASS: 2 nodes x 2 ranks match 4 ranks on one node"
