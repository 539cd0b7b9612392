#!/usr/bin/env bash
# Group-limited routing at 4 ranks: exchange bytes and time per step, unlimited vs topk_groups 2 and 1.
#   bench/group_routing.sh [--quick] [ROUNDS]    (default 3 rounds; build first: launch/build)
# `moe bench layer` forward+backward on 4 ranks of this machine (mpirun
# --oversubscribe: this machine has 2 cores, so 4 ranks share them; one
# OpenBLAS thread per rank), ep size 4, n_groups = 4 (expert group g = the
# experts of rank g), for two layers:
#   e8_k2   E = 8, top-2 (a token reaches at most 2 ranks even unlimited)
#   e64_k8  E = 64, top-8 (DeepSeek-like: a token may reach every rank)
# and two exchanges:
#   p2p     one row per (token, expert) assignment: limiting the groups
#           changes only which rows stay on their own rank
#   node    the node-aware exchange with every rank its own node
#           (MOE_NODE_RANKS=1): one row per (token, destination rank), the
#           exchange that device-limited routing is made for
# Per layer and exchange: unlimited, topk_groups 2 and topk_groups 1, the
# three ALTERNATING in every round (order rotated each round), ROUNDS
# rounds. Per run the bytes each rank sends per step (the exchange's own
# counter: dispatch and return, forward and backward, mean over ranks) and
# the exchange time per step (rank 0: the four exchange phases, median
# iteration); per setting the median over the rounds, and the ratios to
# unlimited. Bytes are exact counts for the seed; times are on 2 shared
# cores, where the exchange is memory copies between processes, so they
# need not follow the bytes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=3
bench_args "$@"
BASE=(--tokens 4096 --d-model 256 --d-ff 256 --iters 10 --warmup 2 --seed 1234)
[[ $QUICK == 1 ]] && ROUNDS=1 BASE=(--tokens 512 --d-model 32 --d-ff 32 --iters 2 --warmup 1 --seed 1234)
LAYERS="e8_k2 e64_k8"
declare -A LAYER=([e8_k2]="--experts 8 --top-k 2" [e64_k8]="--experts 64 --top-k 8")
SETTINGS="all top2 top1"
declare -A SETTING=([all]="" [top2]="--n-groups 4 --topk-groups 2" [top1]="--n-groups 4 --topk-groups 1")
set_threads 1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "bench/group_routing.sh: moe bench layer on 4 ranks (mpirun --oversubscribe on $(getconf _NPROCESSORS_ONLN) cores, 1 OpenBLAS" \
     "thread per rank), ${BASE[*]}, $ROUNDS rounds, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE"
uptime
for r in $(seq "$ROUNDS"); do
  for layer in $LAYERS; do
    for kind in p2p node; do
      # rotate the order of the three settings every round
      order=($SETTINGS)
      for ((i = 0; i < (r - 1) % 3; i++)); do order=("${order[@]:1}" "${order[0]}"); done
      for s in "${order[@]}"; do
        # shellcheck disable=SC2086 # LAYER and SETTING hold several options
        MOE_NODE_RANKS=$([[ $kind == node ]] && echo 1 || echo 0) \
          "${MPIRUN[@]}" -x MOE_NODE_RANKS -x OPENBLAS_NUM_THREADS -x OPENBLAS_CORETYPE -np 4 \
          "$MOE" bench layer "${BASE[@]}" ${LAYER[$layer]} ${SETTING[$s]} --a2a "$kind" --json \
          | "$PY" -c "import json,sys; j=json.load(sys.stdin); j.update(layer='$layer', kind='$kind', setting='$s', round=$r); print(json.dumps(j))" \
          >> "$tmp/runs"
      done
    done
  done
done
uptime
"$PY" - "$tmp/runs" "$ROUNDS" << 'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
desc = {"all": "unlimited", "top2": "n_groups 4, topk_groups 2", "top1": "n_groups 4, topk_groups 1"}
kdesc = {"p2p": "p2p exchange", "node": "node-aware exchange, one node per rank"}
print()
print("| layer | exchange | routing | bytes sent / rank / step | vs unlimited | exchange ms / step (min-max) | vs unlimited | dropped |")
print("|---|---|---|---|---|---|---|---|")
perf = []
for layer in ("e8_k2", "e64_k8"):
    for kind in ("p2p", "node"):
        fig = {}
        for s in ("all", "top2", "top1"):
            rs = [x for x in runs if x["layer"] == layer and x["kind"] == kind and x["setting"] == s]
            if not rs:
                sys.exit(f"group_routing: no run of {layer} {kind} {s}")
            ts = [x["exchange_ms"] for x in rs]
            fig[s] = (med(x["bytes_sent_per_rank"] for x in rs), med(ts),
                      med(x["dropped_frac"] for x in rs), rs[0], min(ts), max(ts))
        for s in ("all", "top2", "top1"):
            b, t, d, j, tmin, tmax = fig[s]
            rb, rt = b / fig["all"][0], t / fig["all"][1]
            name = f"E={j['experts']} top-{j['top_k']}"
            print(f"| {name} | {kind} | {desc[s]} | {b / 1e6:.3f} MB | {rb:.3f} | {t:.1f} ({tmin:.1f}-{tmax:.1f}) | {rt:.3f} | {100 * d:.2f}% |")
            key = f"group_routing.{layer}.{kind}.{s}"
            perf.append(f"PERF {key}.bytes {b / 1e6:.3f} MB bytes sent per rank per step, {name}, {kdesc[kind]}, {desc[s]}")
            perf.append(f"PERF {key}.exchange_ms {t:.3f} ms exchange time per step (rank 0), {name}, {kdesc[kind]}, {desc[s]}")
            if s != "all":
                perf.append(f"PERF {key}.bytes_ratio {rb:.3f} - bytes vs unlimited, {name}, {kdesc[kind]}, {desc[s]}")
                perf.append(f"PERF {key}.time_ratio {rt:.3f} - exchange time vs unlimited, {name}, {kdesc[kind]}, {desc[s]}")
print()
print(f"(medians over {sys.argv[2]} rounds; bytes: dispatch + return, forward + backward, mean over the 4 ranks)")
print("\n".join(perf))
PY
