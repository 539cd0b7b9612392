#!/usr/bin/env bash
# bench/all.sh: skip
# Node-aware token exchange (a2a = node) against the flat one (p2p) across 2 shaped virtual nodes x 2 ranks.
#   bench/a2a_nodes.sh [--quick] [ROUNDS]     (default 3 rounds; root; build first: launch/build)
#   A2A_RATE=100mbit bench/a2a_nodes.sh       (another link rate; A2A_DELAY likewise)
# Brings up a 2-node virtual cluster (launch/vcluster, network namespaces),
# shapes each node's link to 1 Gbit/s with 100 us delay (tc netem; where the
# kernel has no sch_netem, the rate alone with tc tbf, and it says so), and
# runs `moe bench a2a` on 2 nodes x 2 ranks, E = 8, top-2, one process per
# kind, p2p and node ALTERNATING (the order swapped every round), ROUNDS
# rounds. Per kind: the token trip of the layer's forward (every token to
# its experts, results back and combined; the node kind sends a token once
# per remote node) and the bytes that crossed nodes (the exchange's own
# counter, per dispatch + return); medians over the rounds and the ratios.
# Results: one `moe bench a2a --kind all` run compares the kinds' outputs
# bit for bit, and `moe train` runs 10 steps with a2a = p2p and a2a = node on
# the cluster, whose losses must be bitwise equal.
# Open MPI's TCP transport uses one socket per pair of ranks unless
# btl_tcp_links says otherwise: launch/moe-local sets 4 across nodes, and
# OMPI_MCA_btl_tcp_links in the caller's environment wins (the figures say
# which was used).
# Exits 77 without root or network namespaces. The cluster is torn down (by
# PID, `vcluster down`) on every exit path. Not run by bench/all.sh (root).
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=3
bench_args "$@"
RATE=${A2A_RATE:-1gbit} DELAY=${A2A_DELAY:-100us}
ARGS=(--experts 8 --top-k 2 --iters 10 --warmup 2)
STEPS=10
[[ $QUICK == 1 ]] && ROUNDS=1 STEPS=2 ARGS=(--experts 8 --top-k 2 --tokens 256 --iters 2 --warmup 1)

source "$(dirname "$0")/lib/vcluster.sh"
vc_require a2a_nodes.sh
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-a2a-nodes.XXXXXX")
chmod 755 "$tmp"
trap 'vc_down; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

vc_up 2 2 moea2an
vc_shape "$RATE" "$DELAY"
SHAPE=$vc_shape_desc
cl=$vc_cl hostfile=$vc_hostfile
export MOE_BIN=$MOE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
on_cluster=(timeout 600 "$VC" run "$cl" -- "$REPO_DIR/launch/moe-local" --hostfile "$hostfile" 4)

bench() { # bench KIND OUT: one `moe bench a2a` process on the cluster, JSON to OUT
  vc_wait "${on_cluster[@]}" bench a2a --kind "$1" --json "${ARGS[@]}" > "$2" 2> "$2.err" \
    || { echo "a2a_nodes.sh: moe bench a2a --kind $1 failed (exit $?):" >&2; tail -n 20 "$2.err" >&2; exit 1; }
}
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then order=(p2p node); else order=(node p2p); fi
  for k in "${order[@]}"; do bench "$k" "$tmp/$k.$r.json"; done
done
bench all "$tmp/all.json"

# moe train on the cluster, ep 4 (the all-to-all crosses nodes), a2a = p2p and node
"$MOE" data synth --out "$tmp/corpus.txt" --bytes 100000 > /dev/null
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
steps = $STEPS
warmup_steps = 2
log_every = 1
data = $tmp/corpus.txt
[checkpoint]
ckpt_every = 0
EOF
for k in p2p node; do
  vc_wait "${on_cluster[@]}" train --config "$tmp/small.ini" --out_dir="$tmp/train-$k" --a2a="$k" > "$tmp/train-$k.log" 2>&1 \
    || { echo "a2a_nodes.sh: moe train --a2a=$k on the cluster failed (exit $?):" >&2; tail -n 20 "$tmp/train-$k.log" >&2; exit 1; }
done

"$PY" - "$tmp" "$ROUNDS" "$SHAPE" "$cl" << 'PY'
import json, statistics, sys
tmp, rounds, shape, cl = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
med = statistics.median

def one(path, kind):
    j = json.load(open(path))
    (x,) = [x for x in j["results"] if x["kind"] == kind]
    if not x["roundtrip_ok"] or not x["token_y_equal"]:
        sys.exit(f"a2a_nodes: {path}: the {kind} exchange did not return the rows it sent")
    if x["ran_as"] != kind:
        sys.exit(f"a2a_nodes: {path}: --kind {kind} ran as {x['ran_as']}")
    return j, x

runs = {k: [one(f"{tmp}/{k}.{r}.json", k) for r in range(1, rounds + 1)] for k in ("p2p", "node")}
j0 = runs["p2p"][0][0]
if j0["nodes"] != 2 or j0["ranks"] != 4:
    sys.exit(f"a2a_nodes: the bench ran on {j0['ranks']} ranks over {j0['nodes']} nodes, not 4 over 2")
fig = {}
for k, rs in runs.items():
    xs = [x for _, x in rs]
    fig[k] = dict(trip=med(x["token_trip_seconds"] for x in xs),
                  trips=[x["token_trip_seconds"] for x in xs],
                  cross=med(x["token_bytes_cross_node_per_rank"] for x in xs),
                  cross_max=med(x["token_bytes_cross_node_max_rank"] for x in xs),
                  sent=med(x["token_bytes_sent_per_rank"] for x in xs),
                  row=med(x["seconds"] for x in xs))
p, n = fig["p2p"], fig["node"]
speedup, bytes_ratio = p["trip"] / n["trip"], p["cross"] / n["cross"]

# bitwise: the kinds' outputs in one process, and the training losses
ja = json.load(open(f"{tmp}/all.json"))
y_equal = all(x["token_y_equal"] and x["roundtrip_ok"] for x in ja["results"])
def losses(k):
    out = []
    for line in open(f"{tmp}/train-{k}/metrics.jsonl"):
        d = json.loads(line)
        for t in ("tokens_per_s", "time_ms", "checkpoint_s"):
            d.pop(t, None)
        out.append(d)
    return out
lp, ln = losses("p2p"), losses("node")
train_equal = len(lp) > 0 and lp == ln
steps = [d for d in lp if "loss" in d]

import os
links = os.environ.get("OMPI_MCA_btl_tcp_links", "4 (launch/moe-local's default across nodes)")
print(f"moe bench a2a on a virtual cluster: 2 nodes x 2 ranks ({cl}), each node's link shaped by {shape}; "
      f"TCP sockets per peer pair (OMPI_MCA_btl_tcp_links): {links}")
print(f"{j0['tokens']} tokens/rank, d_model {j0['d_model']}, E={j0['experts']} top-{j0['top_k']}, skew {j0['skew']}, "
      f"{j0['iters']} timed iters per process (median of the slowest rank); one process per kind, p2p and node "
      f"alternating, {rounds} round(s), medians")
print("token trip (the layer's forward: dispatch, experts, return, combine); bytes per dispatch + return:")
print(f"{'kind':6s} {'trip ms':>9s} {'per round ms':>26s} {'sent MB/rank':>13s} {'cross-node MB/rank':>19s} {'largest rank':>13s}")
for k in ("p2p", "node"):
    f = fig[k]
    print(f"{k:6s} {1e3 * f['trip']:9.1f} {' '.join(f'{1e3 * t:.1f}' for t in f['trips']):>26s} {f['sent'] / 1e6:13.3f} "
          f"{f['cross'] / 1e6:19.3f} {f['cross_max'] / 1e6:13.3f}")
print(f"two-level vs flat: {speedup:.2f}x faster (target 1.3x: {'met' if speedup >= 1.3 else 'NOT met'}), "
      f"{bytes_ratio:.2f}x fewer bytes across nodes ({p['cross'] / 1e6:.2f} -> {n['cross'] / 1e6:.2f} MB/rank)")
print(f"row round trip (one row per assignment, no dedup): p2p {1e3 * p['row']:.1f} ms, node {1e3 * n['row']:.1f} ms")
print(f"bitwise: `bench a2a --kind all` outputs of p2p, shm (ran as node) and node: {'equal' if y_equal else 'DIFFER'}; "
      f"`moe train` {len(steps)} steps a2a=p2p vs a2a=node: metrics {'bitwise equal' if train_equal else 'DIFFER'}"
      f" (final loss {steps[-1]['loss'] if steps else '?'})")
print(f"PERF a2a_nodes.p2p.trip_ms {1e3 * p['trip']:.1f} ms flat exchange (p2p) token trip, 2 nodes x 2 ranks, E=8 k=2, shaped link")
print(f"PERF a2a_nodes.node.trip_ms {1e3 * n['trip']:.1f} ms two-level exchange (node) token trip, 2 nodes x 2 ranks, E=8 k=2, shaped link")
print(f"PERF a2a_nodes.speedup {speedup:.2f} x p2p trip time / node trip time (target 1.3)")
print(f"PERF a2a_nodes.p2p.cross_mb {p['cross'] / 1e6:.3f} MB cross-node bytes per rank per dispatch+return, p2p")
print(f"PERF a2a_nodes.node.cross_mb {n['cross'] / 1e6:.3f} MB cross-node bytes per rank per dispatch+return, node")
print(f"PERF a2a_nodes.bytes_ratio {bytes_ratio:.2f} x p2p cross-node bytes / node cross-node bytes")
if not y_equal or not train_equal:
    for a, b in zip(lp, ln):
        if a != b:
            print("first differing step:\n p2p ", a, "\n node", b, file=sys.stderr)
            break
    sys.exit("a2a_nodes: the node exchange's results differ from the flat exchange's")
PY
