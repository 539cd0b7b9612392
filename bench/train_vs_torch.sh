#!/usr/bin/env bash
# Training tokens/s: moe train against the strongest PyTorch formulation (bench/torch_model.py), small and medium model.
# Same model, corpus and batch on both sides, run ALTERNATELY in one session
# (the machine is shared: alternating rounds see the same background load;
# the order is reversed every other round). Per config and round: moe 1 rank
# x 2 threads, moe 2 ranks x 1 thread (launch/moe-local), moe 1 rank x 1
# thread, and PyTorch at 2 threads in its default formulation (the strongest
# of `torch_model.py --study`, see bench/README.md). Before the rounds, the
# sgemm rate of these kernels at the model's FFN shape and their peak
# (`moe selftest blas --one`, 1 and 2 threads). Prints tokens/s (each run:
# the median of the steady-state steps of metrics.jsonl: the first SKIP
# steps and the last one, which writes the checkpoint, are left out;
# figures: the median over rounds), the moe/torch ratios, the 2-rank
# scaling, the FLOP bound and the peak memory per rank against an
# accounting of parameters, gradients, AdamW state and activations (from
# one extra untimed run each of 1 and 2 ranks: sampling memory slows a run).
#   bench/train_vs_torch.sh [rounds]          (default 3; build first: launch/build)
#   env: STEPS (moe steps per run, 30), SKIP (10, both sides), TORCH_STEPS (timed torch
#        steps, 10), CONFIGS ("small medium"), MOE_EVERY (2, the default of
#        moe train); bench/env.sh (kernels and thread settings of both sides)
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROUNDS=${1:-3}
STEPS=${STEPS:-30}
SKIP=${SKIP:-10}
TORCH_STEPS=${TORCH_STEPS:-10}
CONFIGS=${CONFIGS:-small medium}
MOE_EVERY=${MOE_EVERY:-2}
QFLAG=()
if [[ $QUICK == 1 ]]; then ROUNDS=1 STEPS=5 SKIP=1 TORCH_STEPS=2 CONFIGS=tiny QFLAG=(--quick); fi
(( STEPS > SKIP + 1 )) || { echo "STEPS=$STEPS must exceed SKIP+1=$((SKIP + 1))" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$MOE" data synth --out "$tmp/corpus.txt" --bytes 4M > /dev/null

# sgemm rates of these kernels, from the selftest's timed shapes:
# sgemm_rate THREADS SHAPE -> GFLOP/s at SHAPE (e.g. ffn_d128_F512_M2048, the
# model's dense FFN), or for "peak" (or a shape not timed) the best rate of
# any shape at THREADS threads
OPENBLAS_NUM_THREADS=$(nproc) "$MOE" selftest blas --one "$OPENBLAS_CORETYPE" --no-check "${QFLAG[@]}" \
    > "$tmp/sgemm.json" || { echo "train_vs_torch: moe selftest blas --one $OPENBLAS_CORETYPE failed" >&2; exit 1; }
sgemm_rate() {
    "$PY" - "$tmp/sgemm.json" "$1" "$2" << 'EOF'
import json, sys
j = json.loads(open(sys.argv[1]).read().split("MOE_BLAS_RESULT ", 1)[1])
t, shape = int(sys.argv[2]), sys.argv[3]
rows = [r for r in j["times"] if r["threads"] == t] or [r for r in j["times"] if r["threads"] == 1]
hit = [r["gflops"] for r in rows if r["shape"] == shape]
print(hit[0] if hit else max(r["gflops"] for r in rows))
EOF
}

# Runs moe (each rank, under moe-local too) under /usr/bin/time: peak RSS
# (KB) of the whole run in rss.<rank>; VmHWM sampled while metrics.jsonl has
# fewer than STEPS lines (before the final checkpoint) in hwm.<rank>.
cat > "$tmp/rss_wrap" << EOF
#!/bin/sh
r=\${OMPI_COMM_WORLD_RANK:-0}
echo 0 > "$tmp/hwm.\$r"
/usr/bin/time -f %M -o "$tmp/rss.\$r" "$MOE" "\$@" &
pid=\$!
while kill -0 \$pid 2> /dev/null; do
    child=\$(pgrep -P \$pid | head -n 1)
    n=\$(cat "$tmp/run/metrics.jsonl" 2> /dev/null | wc -l)
    if [ -n "\$child" ] && [ "\$n" -lt $STEPS ]; then
        awk '/VmHWM/ {print \$2}' /proc/\$child/status > "$tmp/hwm.\$r.new" 2> /dev/null &&
            [ -s "$tmp/hwm.\$r.new" ] && mv "$tmp/hwm.\$r.new" "$tmp/hwm.\$r"
    fi
    sleep 0.2
done
wait \$pid
EOF
chmod +x "$tmp/rss_wrap"

# rank 0's resident memory before the model (libraries, data), MB, from the
# "memory (rank 0): ..." line moe train prints at the end
base_mb() { sed -n 's/^memory (rank 0): .* = \([0-9]*\) MB before the model.*/\1/p' "$1" | tail -n 1; }
# steady-state figures of a run: {"tok_s": median, "drop": mean dropped_frac}
steady() {
    "$PY" - "$1" "$SKIP" << 'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
skip = int(sys.argv[2])
s = rows[skip:-1]  # the last step includes the final checkpoint
print(json.dumps({"tok_s": statistics.median(r["tokens_per_s"] for r in s),
                  "drop": sum(r["dropped_frac"] for r in s) / len(s),
                  "blas": rows[0].get("blas_coretype", "?")}))
EOF
}

# Model FLOPs per token of forward + backward (every matmul 2mnk, backward
# 2x forward): attention over the full T x T block (what both
# implementations compute), k experts per token times the kept fraction.
flops_per_token() { # d L F E k T moe_every kept_frac
    "$PY" -c "
d, L, F, E, k, T, every, kept = $1, $2, $3, $4, $5, $6, $7, $8
n_moe = (L + every - 1) // every
fwd = L * (2*d*3*d + 2*d*d + 2*2*T*d) + (L - n_moe) * 4*d*F + n_moe * (2*d*E + kept*k*4*d*F) + 2*d*256
print(3 * fwd)"
}

# Bytes a rank needs: params + grads + AdamW m, v (4 x 4 bytes per local
# parameter), the model's activation block (model.c alloc_acts), and per MoE
# layer the kept rows' x, h, act, y (rows = k * local tokens * kept fraction).
accounting() { # d L F E k T B moe_every W kept_frac NH
    "$PY" -c "
d, L, F, E, k, T, B, every, W, kept, NH = $1, $2, $3, $4, $5, $6, $7, $8, $9, ${10}, ${11}
V = 256; n_moe = (L + every - 1) // every; Ld = L - n_moe; Bl = B // W; N = Bl * T
block = 2*d + 3*d*d + 3*d + d*d + d + 2*d
dense = V*d + T*d + L*block + n_moe*E*d + Ld*(2*F*d + F + d) + 2*d
experts = n_moe * (E // W) * (2*F*d + F + d)
params = dense + experts
acts = (N*d + L*N*d*8 + L*N*4 + L*Bl*NH*T*T + Ld*N*2*F + N*d + 2*N + 3*N*V + N
        + 3*N*d + 3*N*d + T*T + 2*N*F)
moe_acts = n_moe * k * N * kept * (2*d + 2*F)
print(4*4*params, 4*acts, 4*moe_acts)"
}

moe_args() { # d L NH E k F T B out
    echo "--data=$tmp/corpus.txt --out_dir=$9 --d_model=$1 --n_layers=$2 --n_heads=$3 --n_experts=$4" \
         "--top_k=$5 --d_ff=$6 --seq_len=$7 --batch_size=$8 --moe_every=$MOE_EVERY --steps=$STEPS" \
         "--val_every=0 --log_every=100000 --keep_last=1"
}

declare -A CFG=(
    [small]="128 4 4 8 2 512 128 16"
    [medium]="256 4 4 8 2 1024 256 8"
    [tiny]="64 2 2 4 2 128 32 4"
)

best() { "$PY" -c "import sys; print(max(float(x) for x in sys.argv[1:]))" "$@"; }

for name in $CONFIGS; do
    read -r d L NH E k F T B <<< "${CFG[$name]}"
    echo "== $name: d_model $d, $L layers, $NH heads, E=$E, top_k $k, d_ff $F, seq $T, batch $B," \
         "moe_every $MOE_EVERY ($((B * T)) tokens/step; moe $STEPS steps, median of steps $((SKIP + 1))..$((STEPS - 1)))"
    printf "%-6s %10s %10s %10s %10s\n" round "moe 1x2" "moe 2x1" "moe 1x1" "torch 2t"
    r12=(); r21=(); r11=(); rt=(); drop=0; tdrop=0; blas=?
    rss1=0; rss2a=0; rss2b=0; hwm1=0; hwm2a=0; hwm2b=0; base1=0; base2=0
    out=$tmp/run
    # run_12/run_21 [mem]: a timed run, or with "mem" an untimed one under
    # rss_wrap for the memory figures. Memory is never sampled during a timed
    # run: the sampler's processes (5 per rank every 0.2 s) preempt the ranks
    # and the pool's threads on 2 cores, which halved the timed figures.
    run_12() {
        rm -rf "$out"
        set_threads 2
        local bin=$MOE
        [[ ${1:-} == mem ]] && bin=$tmp/rss_wrap
        "$bin" train $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
        if [[ ${1:-} == mem ]]; then
            rss1=$(best "$rss1" "$(cat "$tmp/rss.0")"); hwm1=$(best "$hwm1" "$(cat "$tmp/hwm.0")")
            base1=$(base_mb "$tmp/log")
        else
            s=$(steady "$out/metrics.jsonl"); r12+=("$(jget "$s" tok_s)"); drop=$(jget "$s" drop); blas=$(jget "$s" blas)
        fi
    }
    run_21() {
        rm -rf "$out"
        local bin=$MOE
        [[ ${1:-} == mem ]] && bin=$tmp/rss_wrap
        env -u OPENBLAS_NUM_THREADS -u OMP_NUM_THREADS MOE_BIN="$bin" "$REPO_DIR/launch/moe-local" 2 train \
            $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
        if [[ ${1:-} == mem ]]; then
            rss2a=$(best "$rss2a" "$(cat "$tmp/rss.0")"); rss2b=$(best "$rss2b" "$(cat "$tmp/rss.1")")
            hwm2a=$(best "$hwm2a" "$(cat "$tmp/hwm.0")"); hwm2b=$(best "$hwm2b" "$(cat "$tmp/hwm.1")")
            base2=$(base_mb "$tmp/log")
        else
            s=$(steady "$out/metrics.jsonl"); r21+=("$(jget "$s" tok_s)")
        fi
    }
    run_11() {
        rm -rf "$out"
        set_threads 1
        "$MOE" train $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
        s=$(steady "$out/metrics.jsonl"); r11+=("$(jget "$s" tok_s)")
    }
    run_torch() {
        set_threads 2
        t=$("$PY" "$BENCH_DIR/torch_model.py" --d-model $d --layers $L --heads $NH --experts $E --top-k $k --d-ff $F \
            --seq $T --batch $B --moe-every $MOE_EVERY --threads 2 --steps "$TORCH_STEPS" --warmup "$SKIP" \
            --data "$tmp/corpus.txt")
        rt+=("$(jget "$t" tokens_per_s)"); tdrop=$(jget "$t" dropped_frac)
        tform="attention $(jget "$t" attention), MoE $(jget "$t" moe), foreach $(jget "$t" foreach)"
        tblas="$(jget "$t" blas_coretype) x $(jget "$t" blas_threads)"
    }
    for round in $(seq "$ROUNDS"); do
        if (( round % 2 )); then run_12; run_21; run_11; run_torch; else run_torch; run_11; run_21; run_12; fi
        printf "%-6s %10.0f %10.0f %10.0f %10.0f\n" "$round" "${r12[-1]}" "${r21[-1]}" "${r11[-1]}" "${rt[-1]}"
    done
    run_12 mem; run_21 mem
    m12=$(median "${r12[@]}"); m21=$(median "${r21[@]}"); m11=$(median "${r11[@]}"); mt=$(median "${rt[@]}")
    g1=$(sgemm_rate 1 "ffn_d${d}_F${F}_M$((B * T))"); g2=$(sgemm_rate 2 "ffn_d${d}_F${F}_M$((B * T))")
    p1=$(sgemm_rate 1 peak); p2=$(sgemm_rate 2 peak)
    fpt=$(flops_per_token $d $L $F $E $k $T $MOE_EVERY "$(calc "1 - $drop")")
    "$PY" - << EOF
b12, b21, b11, bt = $m12, $m21, $m11, $mt
g1, g2, p1, p2, fpt = $g1, $g2, $p1, $p2, $fpt
name = "$name"
print(f"median of {$ROUNDS} rounds (tokens/s); moe runs OpenBLAS $blas, PyTorch $tblas ($tform):")
print(f"  moe  1 rank  x 2 threads {b12:10.0f}   moe/torch {b12 / bt:5.2f}x")
print(f"  moe  2 ranks x 1 thread  {b21:10.0f}   moe/torch {b21 / bt:5.2f}x")
print(f"  moe  1 rank  x 1 thread  {b11:10.0f}")
print(f"  torch 2 threads          {bt:10.0f}   (dropped {100 * $tdrop:.1f}% vs moe {100 * $drop:.1f}%)")
print(f"  2 ranks x 1 thread / 1 rank x 1 thread (same global batch): {b21 / b11:.2f}x  (target >= 1.8x)")
print(f"FLOP bound: {fpt / 1e6:.2f} MFLOP/token fwd+bwd (kept fraction {1 - $drop:.3f})")
for what, got, rate, peak in (("1 rank  x 1 thread ", b11, g1, p1), ("1 rank  x 2 threads", b12, g2, p2),
                              ("2 ranks x 1 thread ", b21, 2 * g1, 2 * p1)):
    print(f"  {what}: {got * fpt / 1e9:6.1f} GFLOP/s = {100 * got * fpt / 1e9 / rate:5.1f}% of the FFN-shape "
          f"sgemm rate {rate:.1f} (bound {1e9 * rate / fpt:.0f} tok/s), {100 * got * fpt / 1e9 / peak:5.1f}% "
          f"of the peak sgemm rate {peak:.1f} (moe selftest blas)")
print(f"PERF train.{name}.moe_2ranks_tok_s {b21:.0f} tok/s moe train, {name} model, 2 ranks x 1 thread")
print(f"PERF train.{name}.moe_2threads_tok_s {b12:.0f} tok/s moe train, {name} model, 1 rank x 2 threads")
print(f"PERF train.{name}.moe_1thread_tok_s {b11:.0f} tok/s moe train, {name} model, 1 rank x 1 thread")
print(f"PERF train.{name}.torch_tok_s {bt:.0f} tok/s PyTorch ($tform), {name} model, 2 threads")
print(f"PERF_README train.{name}.ratio {b21 / bt:.2f} x training vs PyTorch, {name} model, 2 cores each (moe 2 ranks)")
print(f"PERF train.{name}.ratio_2threads {b12 / bt:.2f} x training vs PyTorch, {name} model, 2 threads each")
print(f"PERF train.{name}.scaling_2ranks {b21 / b11:.2f} x 2 ranks x 1 thread / 1 rank x 1 thread, {name} model")
print(f"PERF train.{name}.ffn_sgemm_fraction_1t {100 * b11 * fpt / 1e9 / g1:.0f} % model FLOP rate at 1 thread / "
      f"sgemm rate at the model's FFN shape, {name} model")
EOF
    read -r state acts moe_acts <<< "$(accounting $d $L $F $E $k $T $B $MOE_EVERY 1 "$(calc "1 - $drop")" $NH)"
    read -r state2 acts2 moe_acts2 <<< "$(accounting $d $L $F $E $k $T $B $MOE_EVERY 2 "$(calc "1 - $drop")" $NH)"
    "$PY" - << EOF
MB = 2**20
for key, what, hwm, rss, st, ac, ma, base in (
        ("1rank", "1 rank (2 threads)", [$hwm1], [$rss1], $state, $acts, $moe_acts, ${base1:-0}),
        ("2ranks", "2 ranks, per rank", [$hwm2a, $hwm2b], [$rss2a, $rss2b], $state2, $acts2, $moe_acts2, ${base2:-0})):
    need = st + ac + ma
    mb = lambda v: " / ".join(f"{r * 1024 / MB:.0f}" for r in v)
    print(f"memory, {what}: accounting {need / MB:.0f} MB = params+grads+AdamW {st / MB:.0f} + model activations "
          f"{ac / MB:.0f} + MoE kept-row activations {ma / MB:.0f}")
    print(f"  peak RSS while training {mb(hwm)} MB: ratio {max(hwm) * 1024 / need:.2f}x (target <= 1.3x); "
          f"whole run incl. final checkpoint {mb(rss)} MB: {max(rss) * 1024 / need:.2f}x")
    print(f"PERF train.$name.memory_{key} {max(hwm) * 1024 / need:.2f} x peak RSS while training / accounting, "
          f"$name model, {what}")
    if base > 0:
        print(f"  without the {base} MB the process holds before the model (MPI, OpenBLAS, HDF5, data): "
              f"{(max(hwm) / 1024 - base) * MB / need:.2f}x while training")
EOF
done
