#!/usr/bin/env bash
# `moe train` against the PyTorch baseline (bench/torch_model.py) on the same
# model, corpus and batch, run ALTERNATELY in one session (the machine is
# shared: alternating rounds see the same background load). Per config and
# round: moe 1 rank x 2 threads, moe 2 ranks x 1 thread (launch/moe-local),
# moe 1 rank x 1 thread, torch 2 threads, and the sgemm rate of this machine
# (a small C program against -lopenblas, 1 and 2 threads). Prints tokens/s
# (median of the steady-state steps of metrics.jsonl: the first SKIP steps
# and the last one, which writes the checkpoint, are left out; best round),
# the moe/torch ratios, the 2-rank scaling, the FLOP bound and the peak
# memory per rank against an accounting of parameters, gradients, AdamW
# state and activations.
#   bench/train_vs_torch.sh [rounds]          (build first: launch/build)
#   env: MOE_BIN (default build/src/cli/moe), STEPS (moe steps per run, 14),
#        SKIP (3), TORCH_STEPS (timed torch steps, 8), CONFIGS ("small medium"),
#        MOE_EVERY (2, the default of moe train)
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=$(realpath "${MOE_BIN:-build/src/cli/moe}")
ROUNDS=${1:-3}
STEPS=${STEPS:-14}
SKIP=${SKIP:-3}
TORCH_STEPS=${TORCH_STEPS:-8}
CONFIGS=${CONFIGS:-small medium}
MOE_EVERY=${MOE_EVERY:-2}
[[ -x $MOE ]] || { echo "no moe binary at $MOE (build first, or set MOE_BIN)" >&2; exit 2; }
(( STEPS > SKIP + 1 )) || { echo "STEPS=$STEPS must exceed SKIP+1=$((SKIP + 1))" >&2; exit 2; }
# OpenBLAS misdetects this machine's CPU and picks slow kernels otherwise.
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Haswell}
# moe's counterpart of PyTorch's OMP_WAIT_POLICY=PASSIVE below: idle OpenBLAS
# workers sleep instead of spinning (launch/moe-local sets the same).
export OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
# Settings that make PyTorch's CPU path ~2x faster here (passive OpenMP
# waiting, no mmap churn in the allocator): the baseline gets its best case.
TORCH_ENV=(OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$MOE" data synth --out "$tmp/corpus.txt" --bytes 4M > /dev/null

# sgemm rate: the six GEMMs of an FFN forward+backward at (R rows, d, F)
# (the model's dominant shapes) and a 1024^3 square GEMM (the machine's
# peak); median of the timed iterations, GFLOP/s.
cat > "$tmp/sgemm.c" << 'EOF'
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static float *buf(size_t n) { float *p = malloc(n * sizeof *p); for (size_t i = 0; i < n; i++) p[i] = (float)(i % 7) * 0.01f; return p; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
static double median(double *t, int n) { qsort(t, n, sizeof *t, cmp); return t[n / 2]; }
int main(int argc, char **argv)
{
    if (argc != 5) return 2;
    const int R = atoi(argv[1]), d = atoi(argv[2]), F = atoi(argv[3]), it = atoi(argv[4]), n = 1024;
    float *X = buf((size_t)R * d), *W1 = buf((size_t)F * d), *H = buf((size_t)R * F), *W2 = buf((size_t)d * F);
    float *Y = buf((size_t)R * d), *dH = buf((size_t)R * F), *dW1 = buf((size_t)F * d), *dW2 = buf((size_t)d * F);
    float *A = buf((size_t)n * n), *B = buf((size_t)n * n), *C = buf((size_t)n * n);
    double t[64], ffn, sq;
    for (int i = -1; i < it; i++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, F, d, 1, X, d, W1, d, 0, H, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, d, F, 1, H, F, W2, F, 0, Y, d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, F, d, 1, Y, d, W2, F, 0, dH, F);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, F, R, 1, Y, d, H, F, 1, dW2, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, d, F, 1, dH, F, W1, d, 0, X, d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F, d, R, 1, dH, F, X, d, 1, dW1, d);
        if (i >= 0) t[i] = now() - t0;
    }
    ffn = 12.0 * R * d * F / median(t, it);
    for (int i = -1; i < it; i++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, A, n, B, n, 0, C, n);
        if (i >= 0) t[i] = now() - t0;
    }
    sq = 2.0 * n * n * n / median(t, it);
    printf("{\"ffn_gflops\": %.2f, \"square_gflops\": %.2f}\n", 1e-9 * ffn, 1e-9 * sq);
    return 0;
}
EOF
cc -O2 -o "$tmp/sgemm" "$tmp/sgemm.c" -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas

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
# json-field helper: jget JSON KEY
jget() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
# steady-state figures of a run: {"tok_s": median, "drop": mean dropped_frac}
steady() {
    python3 - "$1" "$SKIP" << 'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
skip = int(sys.argv[2])
s = rows[skip:-1]  # the last step includes the final checkpoint
print(json.dumps({"tok_s": statistics.median(r["tokens_per_s"] for r in s),
                  "drop": sum(r["dropped_frac"] for r in s) / len(s),
                  "max_rows": max(sum(l["kept"]) for r in rows for l in r["layers"])}))
EOF
}

# Model FLOPs per token of forward + backward (every matmul 2mnk, backward
# 2x forward): attention over the full T x T block (what both
# implementations compute), k experts per token times the kept fraction.
flops_per_token() { # d L F E k T moe_every kept_frac
    python3 -c "
d, L, F, E, k, T, every, kept = $1, $2, $3, $4, $5, $6, $7, $8
n_moe = (L + every - 1) // every
fwd = L * (2*d*3*d + 2*d*d + 2*2*T*d) + (L - n_moe) * 4*d*F + n_moe * (2*d*E + kept*k*4*d*F) + 2*d*256
print(3 * fwd)"
}

# Bytes a rank needs: params + grads + AdamW m, v (4 x 4 bytes per local
# parameter), the model's activation block (model.c alloc_acts), and per MoE
# layer the kept rows' x, h, act, y (rows = k * local tokens * kept fraction).
accounting() { # d L F E k T B moe_every W kept_frac NH
    python3 -c "
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
)

best() { python3 -c "import sys; print(max(float(x) for x in sys.argv[1:]))" "$@"; }

for name in $CONFIGS; do
    read -r d L NH E k F T B <<< "${CFG[$name]}"
    echo "== $name: d_model $d, $L layers, $NH heads, E=$E, top_k $k, d_ff $F, seq $T, batch $B," \
         "moe_every $MOE_EVERY ($((B * T)) tokens/step; moe $STEPS steps, median of steps $((SKIP + 1))..$((STEPS - 1)))"
    printf "%-6s %10s %10s %10s %10s %8s %8s %9s %9s\n" round "moe 1x2" "moe 2x1" "moe 1x1" "torch 2t" \
        "sgemm1t" "sgemm2t" "peak1t" "peak2t"
    r12=(); r21=(); r11=(); rt=(); g1=(); g2=(); p1=(); p2=(); drop=0; tdrop=0
    rss1=0; rss2a=0; rss2b=0; hwm1=0; hwm2a=0; hwm2b=0; base1=0; base2=0
    for round in $(seq "$ROUNDS"); do
        out=$tmp/run
        rm -rf "$out"
        OPENBLAS_NUM_THREADS=2 "$tmp/rss_wrap" train $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 \
            || { cat "$tmp/log" >&2; exit 1; }
        s=$(steady "$out/metrics.jsonl"); r12+=("$(jget "$s" tok_s)"); drop=$(jget "$s" drop)
        max_rows=$(jget "$s" max_rows)
        rss1=$(best "$rss1" "$(cat "$tmp/rss.0")"); hwm1=$(best "$hwm1" "$(cat "$tmp/hwm.0")")
        base1=$(base_mb "$tmp/log")
        rm -rf "$out"
        env -u OPENBLAS_NUM_THREADS -u OMP_NUM_THREADS MOE_BIN="$tmp/rss_wrap" launch/moe-local 2 train \
            $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
        s=$(steady "$out/metrics.jsonl"); r21+=("$(jget "$s" tok_s)")
        rss2a=$(best "$rss2a" "$(cat "$tmp/rss.0")"); rss2b=$(best "$rss2b" "$(cat "$tmp/rss.1")")
        hwm2a=$(best "$hwm2a" "$(cat "$tmp/hwm.0")"); hwm2b=$(best "$hwm2b" "$(cat "$tmp/hwm.1")")
        base2=$(base_mb "$tmp/log")
        rm -rf "$out"
        OPENBLAS_NUM_THREADS=1 "$MOE" train $(moe_args $d $L $NH $E $k $F $T $B "$out") > "$tmp/log" 2>&1 \
            || { cat "$tmp/log" >&2; exit 1; }
        s=$(steady "$out/metrics.jsonl"); r11+=("$(jget "$s" tok_s)")
        t=$(env "${TORCH_ENV[@]}" /usr/bin/python3 bench/torch_model.py --d-model $d --layers $L --heads $NH \
            --experts $E --top-k $k --d-ff $F --seq $T --batch $B --moe-every $MOE_EVERY --threads 2 \
            --steps "$TORCH_STEPS" --warmup "$SKIP" --data "$tmp/corpus.txt")
        rt+=("$(jget "$t" tokens_per_s)"); tdrop=$(jget "$t" dropped_frac)
        gs1=$(OPENBLAS_NUM_THREADS=1 "$tmp/sgemm" $((B * T)) $d $F 5)
        gs2=$(OPENBLAS_NUM_THREADS=2 "$tmp/sgemm" $((B * T)) $d $F 5)
        g1+=("$(jget "$gs1" ffn_gflops)"); g2+=("$(jget "$gs2" ffn_gflops)")
        p1+=("$(jget "$gs1" square_gflops)"); p2+=("$(jget "$gs2" square_gflops)")
        printf "%-6s %10.0f %10.0f %10.0f %10.0f %8.1f %8.1f %9.1f %9.1f\n" "$round" "${r12[-1]}" "${r21[-1]}" \
            "${r11[-1]}" "${rt[-1]}" "${g1[-1]}" "${g2[-1]}" "${p1[-1]}" "${p2[-1]}"
    done
    b12=$(best "${r12[@]}"); b21=$(best "${r21[@]}"); b11=$(best "${r11[@]}"); bt=$(best "${rt[@]}")
    bg1=$(best "${g1[@]}"); bg2=$(best "${g2[@]}"); bp1=$(best "${p1[@]}"); bp2=$(best "${p2[@]}")
    fpt=$(flops_per_token $d $L $F $E $k $T $MOE_EVERY "$(python3 -c "print(1 - $drop)")")
    python3 - << EOF
b12, b21, b11, bt = $b12, $b21, $b11, $bt
g1, g2, p1, p2, fpt = $bg1, $bg2, $bp1, $bp2, $fpt
print(f"best of {$ROUNDS} rounds (tokens/s):")
print(f"  moe  1 rank  x 2 threads {b12:10.0f}   moe/torch {b12 / bt:5.2f}x")
print(f"  moe  2 ranks x 1 thread  {b21:10.0f}   moe/torch {b21 / bt:5.2f}x")
print(f"  moe  1 rank  x 1 thread  {b11:10.0f}")
print(f"  torch 2 threads          {bt:10.0f}   (dropped {100 * $tdrop:.1f}% vs moe {100 * $drop:.1f}%)")
print(f"  2 ranks x 1 thread / 1 rank x 1 thread (same global batch): {b21 / b11:.2f}x  (target >= 1.7x)")
print(f"FLOP bound: {fpt / 1e6:.2f} MFLOP/token fwd+bwd (kept fraction {1 - $drop:.3f})")
for what, got, rate, peak in (("1 rank  x 1 thread ", b11, g1, p1), ("1 rank  x 2 threads", b12, g2, p2),
                              ("2 ranks x 1 thread ", b21, 2 * g1, 2 * p1)):
    print(f"  {what}: {got * fpt / 1e9:6.1f} GFLOP/s = {100 * got * fpt / 1e9 / rate:5.1f}% of the FFN-shape "
          f"sgemm rate {rate:.1f} (bound {1e9 * rate / fpt:.0f} tok/s), {100 * got * fpt / 1e9 / peak:5.1f}% "
          f"of the 1024^3 sgemm peak {peak:.1f}")
EOF
    read -r state acts moe_acts <<< "$(accounting $d $L $F $E $k $T $B $MOE_EVERY 1 "$(python3 -c "print(1 - $drop)")" $NH)"
    read -r state2 acts2 moe_acts2 <<< "$(accounting $d $L $F $E $k $T $B $MOE_EVERY 2 "$(python3 -c "print(1 - $drop)")" $NH)"
    python3 - << EOF
MB = 2**20
for what, hwm, rss, st, ac, ma, base in (("1 rank (2 threads)", [$hwm1], [$rss1], $state, $acts, $moe_acts, ${base1:-0}),
                                         ("2 ranks, per rank", [$hwm2a, $hwm2b], [$rss2a, $rss2b], $state2, $acts2,
                                          $moe_acts2, ${base2:-0})):
    need = st + ac + ma
    mb = lambda v: " / ".join(f"{r * 1024 / MB:.0f}" for r in v)
    print(f"memory, {what}: accounting {need / MB:.0f} MB = params+grads+AdamW {st / MB:.0f} + model activations "
          f"{ac / MB:.0f} + MoE kept-row activations {ma / MB:.0f}")
    print(f"  peak RSS while training {mb(hwm)} MB: ratio {max(hwm) * 1024 / need:.2f}x (target <= 1.3x); "
          f"whole run incl. final checkpoint {mb(rss)} MB: {max(rss) * 1024 / need:.2f}x")
    if base > 0:
        print(f"  without the {base} MB the process holds before the model (MPI, OpenBLAS, HDF5, data): "
              f"{(max(hwm) / 1024 - base) * MB / need:.2f}x while training")
EOF
done
