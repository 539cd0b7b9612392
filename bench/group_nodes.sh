#!/usr/bin/env bash
# bench/all.sh: skip
# Group-limited routing across 4 shaped virtual nodes x 1 rank: exchange bytes and time per step, unlimited vs topk_groups 2 and 1.
#   bench/group_nodes.sh [--quick] [ROUNDS]     (default 3 rounds; root; build first: launch/build)
# Brings up a 4-node virtual cluster (launch/vcluster, network namespaces,
# one slot per node) and runs `moe bench layer` forward+backward on 4 ranks,
# one per node: ep size 4, n_groups 4 (expert group g = the experts of rank
# g = node g), `--a2a auto` (which must resolve to `node`: one row per
# (token, destination node), one sum back per node), for two layers:
#   e8_k2   E = 8, top-2 (a token reaches at most 2 ranks even unlimited)
#   e64_k8  E = 64, top-8 (DeepSeek-like: a token may reach every rank)
# at two link speeds: each node's outgoing link shaped to 100 Mbit/s and to
# 1 Gbit/s (tc netem with 100 us delay; where the kernel has no sch_netem,
# tc tbf with the rate alone, and it says so). Per round, per speed, per
# layer: unlimited, topk_groups 2 and topk_groups 1 ALTERNATING (order
# rotated every round); ROUNDS rounds. Per run the bytes each rank sends per
# step and the part that crosses nodes (the exchange's own counters:
# dispatch and return, forward and backward, mean over ranks), the exchange
# time per step (rank 0: the four exchange phases, median iteration) and the
# whole step (slowest rank); per setting the median over the rounds and the
# ratios to unlimited. Every rank runs under `nice` with one OpenBLAS thread.
# Exits 77 without root or network namespaces. The cluster is torn down (by
# PID, `vcluster down`) on every exit path and the script checks that no
# namespace or process of it is left. Not run by bench/all.sh (root).
set -euo pipefail
source "$(dirname "$0")/env.sh"
source "$(dirname "$0")/lib/vcluster.sh"
ROUNDS=3
bench_args "$@"
RATES="100mbit 1gbit"
DELAY=100us
BASE=(--tokens 2048 --d-model 256 --d-ff 256 --iters 5 --warmup 1 --seed 1234)
[[ $QUICK == 1 ]] && ROUNDS=1 RATES=1gbit BASE=(--tokens 256 --d-model 32 --d-ff 32 --iters 2 --warmup 1 --seed 1234)
LAYERS="e8_k2 e64_k8"
declare -A LAYER=([e8_k2]="--experts 8 --top-k 2" [e64_k8]="--experts 64 --top-k 8")
SETTINGS="all top2 top1"
declare -A SETTING=([all]="" [top2]="--n-groups 4 --topk-groups 2" [top1]="--n-groups 4 --topk-groups 1")

vc_require group_nodes.sh
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-group-nodes.XXXXXX")
chmod 755 "$tmp"
cleanup() {
  local rc=$?
  vc_down || rc=1
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

vc_up 4 1 moegn
export MOE_BIN=$MOE
set_threads 1
on_cluster=(timeout 600 nice -n 10 "$VC" run "$vc_cl" -- "$REPO_DIR/launch/moe-local" --hostfile "$vc_hostfile" 4)

echo "bench/group_nodes.sh: moe bench layer on a virtual cluster of 4 nodes x 1 rank ($vc_cl), ${BASE[*]}, --a2a auto," \
     "$ROUNDS round(s), OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE, 1 OpenBLAS thread per rank, $(getconf _NPROCESSORS_ONLN) cores"
uptime
for r in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    vc_shape "$rate" "$DELAY"
    for layer in $LAYERS; do
      # rotate the order of the three settings every round
      read -ra order <<< "$SETTINGS"
      for ((i = 0; i < (r - 1) % 3; i++)); do order=("${order[@]:1}" "${order[0]}"); done
      for s in "${order[@]}"; do
        # shellcheck disable=SC2086 # LAYER and SETTING hold several options
        vc_wait "${on_cluster[@]}" bench layer "${BASE[@]}" ${LAYER[$layer]} ${SETTING[$s]} --a2a auto --json \
          > "$tmp/one.json" 2> "$tmp/one.err" \
          || { echo "group_nodes.sh: moe bench layer ($rate, $layer, $s) failed (exit $?):" >&2; tail -n 20 "$tmp/one.err" >&2; exit 1; }
        "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); j.update(rate='$rate', shape=sys.argv[2], layer='$layer', setting='$s', round=$r); print(json.dumps(j))" \
          "$tmp/one.json" "$vc_shape_desc" >> "$tmp/runs"
      done
    done
  done
done
uptime

"$PY" - "$tmp/runs" "$ROUNDS" "$RATES" << 'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rounds, rates = int(sys.argv[2]), sys.argv[3].split()
med = statistics.median
for x in runs:
    if x["ranks"] != 4 or x["nodes"] != 4 or x["ep_size"] != 4 or x["a2a"] != "node":
        sys.exit(f"group_nodes: a run had {x['ranks']} ranks on {x['nodes']} nodes, ep {x['ep_size']}, exchange "
                 f"{x['a2a']}; wanted 4 ranks on 4 nodes, ep 4, a2a auto -> node")
desc = {"all": "unlimited", "top2": "`topk_groups` 2", "top1": "`topk_groups` 1"}
pdesc = {"all": "unlimited", "top2": "n_groups 4, topk_groups 2", "top1": "n_groups 4, topk_groups 1"}
for rate in rates:
    print(f"link {rate}: {runs[[x['rate'] for x in runs].index(rate)]['shape']}")
print()
print("| link | layer | routing | sent MB / rank / step | cross-node MB | vs unlimited | exchange ms / step (min-max) | vs unlimited | step ms | dropped |")
print("|---|---|---|---|---|---|---|---|---|---|")
perf, verdict = [], []
for rate in rates:
    for layer in ("e8_k2", "e64_k8"):
        fig = {}
        for s in ("all", "top2", "top1"):
            rs = [x for x in runs if x["rate"] == rate and x["layer"] == layer and x["setting"] == s]
            if len(rs) != rounds:
                sys.exit(f"group_nodes: {len(rs)} runs of {rate} {layer} {s}, wanted {rounds}")
            ts = [x["exchange_ms"] for x in rs]
            fig[s] = dict(b=med(x["bytes_sent_per_rank"] for x in rs), c=med(x["bytes_cross_node_per_rank"] for x in rs),
                          t=med(ts), tmin=min(ts), tmax=max(ts), step=med(x["ms_per_iter"] for x in rs),
                          d=med(x["dropped_frac"] for x in rs), j=rs[0])
        u = fig["all"]
        for s in ("all", "top2", "top1"):
            f = fig[s]
            rb, rt = f["b"] / u["b"], f["t"] / u["t"]
            name = f"E={f['j']['experts']} top-{f['j']['top_k']}"
            print(f"| {rate} | {name} | {desc[s]} | {f['b'] / 1e6:.3f} | {f['c'] / 1e6:.3f} | {rb:.3f} | "
                  f"{f['t']:.1f} ({f['tmin']:.1f}-{f['tmax']:.1f}) | {rt:.3f} | {f['step']:.1f} | {100 * f['d']:.2f}% |")
            key = f"group_nodes.{rate}.{layer}.{s}"
            what = f"{name}, 4 nodes x 1 rank, link {rate}, {pdesc[s]}"
            perf.append(f"PERF {key}.bytes {f['b'] / 1e6:.3f} MB bytes sent per rank per step, {what}")
            perf.append(f"PERF {key}.cross_mb {f['c'] / 1e6:.3f} MB cross-node bytes per rank per step, {what}")
            perf.append(f"PERF {key}.exchange_ms {f['t']:.3f} ms exchange time per step (rank 0), {what}")
            perf.append(f"PERF {key}.step_ms {f['step']:.3f} ms forward+backward step (slowest rank), {what}")
            if s != "all":
                perf.append(f"PERF {key}.bytes_ratio {rb:.3f} - bytes vs unlimited, {what}")
                perf.append(f"PERF {key}.time_ratio {rt:.3f} - exchange time vs unlimited, {what}")
                # "drops" only when every round of the setting beat every round of unlimited
                clear = f["tmax"] < u["tmin"]
                verdict.append(f"{rate} {name} {desc[s]}: bytes x{rb:.2f}, exchange time x{rt:.2f} -> time "
                               + ("drops (every round below every unlimited round)" if clear and rt < 1 else
                                  "drops in the median, but the rounds overlap unlimited's" if rt < 1 else
                                  "does NOT drop"))
print()
print(f"(medians over {rounds} round(s); bytes: dispatch + return, forward + backward, mean over the 4 ranks; "
      "with one rank per node every byte sent crosses nodes)")
print("\n".join(verdict))
print("\n".join(perf))
PY
