#!/usr/bin/env bash
# Soak test: does a long training run leak memory or file descriptors?
# bench/all.sh: skip
#   bench/soak.sh MINUTES [OUT_DIR]
# Trains the demo model on 2 ranks for MINUTES minutes with a checkpoint
# every 50 steps and a validation every 100, runs `moe generate` from the
# latest checkpoint every 200 steps, and samples every rank's resident set
# (VmRSS) and open file descriptors every SAMPLE_S seconds (10; 2 for runs
# under 5 minutes), between checkpoint writes (a write holds two descriptors
# for a moment; sample() below). SOAK_CADENCE=a,b,c replaces 50,100,200 (the 1-minute CI
# variant uses 10,20,40 so that every path runs several times). After a
# warm-up (the first fifth of the run, and at least until the first
# checkpoint, validation and generation have all run), it requires:
#   - each rank's RSS grows by at most 2 MB (last sample against the first
#     sample after warm-up, and the fitted slope over the rest of the run);
#   - each rank's descriptor count stays constant.
# Writes OUT_DIR/soak.tsv (time, rank, rss_kb, fds), soak.png (gnuplot) and
# prints the figures. Exit 0 when both hold, 1 otherwise, 2 on a usage or
# run error. The training is stopped with SIGTERM (a checkpoint at the next
# step boundary, then exit 0; docs/training.md) once the time is up.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bench/soak.sh MINUTES [OUT_DIR]" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage
minutes=$1
out=${2:-runs/soak}
moe=${MOE_BIN:-build/src/cli/moe}
[[ -x $moe ]] || { echo "soak: no moe binary at $moe (launch/build first)" >&2; exit 2; }
secs=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
(( secs >= 30 )) || { echo "soak: MINUTES must be at least 0.5" >&2; exit 2; }
sample_s=${SOAK_SAMPLE_S:-$(( secs >= 300 ? 10 : 2 ))}
IFS=, read -r ckpt_every val_every gen_every <<< "${SOAK_CADENCE:-50,100,200}"
for v in "$ckpt_every" "$val_every" "$gen_every"; do [[ $v =~ ^[1-9][0-9]*$ ]] || usage; done

rm -rf "$out"
mkdir -p "$out"
"$moe" data synth --out "$out/corpus.txt" --bytes 2000000 --seed 1 > /dev/null
"$moe" data synth --out "$out/val.txt" --bytes 100000 --seed 7 > /dev/null
printf '%s\n' "12+39=" "the old dog " > "$out/prompts.txt"

# Enough steps never to finish on its own: the run is stopped by SIGTERM.
launch/moe-local 2 train --config launch/demo.ini --data="$out/corpus.txt" --val_data="$out/val.txt" \
    --out_dir="$out/run" --steps=100000000 --ckpt_every="$ckpt_every" --val_every="$val_every" --keep_last=2 \
    --log_every=1000000 > "$out/train.log" 2>&1 &
job=$!
cleanup() { kill -KILL -- "$job" 2> /dev/null || true; pkill -KILL -f -- "--out_dir=$out/run( |$)" 2> /dev/null || true; }
trap cleanup EXIT

rank_pid() { # world rank -> pid of the training process
    local p
    for p in $(pgrep -f -- "--out_dir=$out/run( |\$)" || true); do
        [[ $(readlink "/proc/$p/exe" 2> /dev/null) == "$(readlink -f "$moe")" ]] || continue
        if tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
            echo "$p"
            return
        fi
    done
}

# sample PID -> "rss_kb fds", read between checkpoint writes. A checkpoint
# in flight holds descriptors for up to ~0.5 s on a loaded machine: the file
# being written (run/ckpt-*.h5.tmp), run/latest.tmp while it is fsynced, the
# run directory (fsynced after the rename, listed to prune old checkpoints)
# and the POSIX semaphore of MPI-IO (/dev/shm/sem.*). A sample that sees any
# of them is read again 0.1 s later, up to 5 s; a leaked one keeps showing,
# so it is then counted as it is. One that opens just after the look still
# slips through, which is why the verdict below asks whether the count
# stays up, not whether it ever moved.
sample() {
    local p=$1 i rss fds targets
    for i in $(seq 50); do
        targets=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 -printf '%l\n' 2> /dev/null) || return 1
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2> /dev/null) || return 1
        [[ -n $rss ]] || return 1
        fds=$(grep -c '' <<< "$targets")
        grep -qE '\.tmp$|^/dev/shm/sem\.' <<< "$targets" || grep -qxF "$(realpath "$out/run")" <<< "$targets" || break
        sleep 0.1
    done
    echo "$rss $fds"
}

printf 'time_s\trank\trss_kb\tfds\tstep\tgenerations\n' > "$out/soak.tsv"
t0=$(date +%s)
next_gen=$gen_every
generations=0
while :; do
    now=$(( $(date +%s) - t0 ))
    (( now < secs )) || break
    kill -0 "$job" 2> /dev/null || { echo "soak: training ended early:" >&2; tail -20 "$out/train.log" >&2; exit 2; }
    step=0
    [[ -f $out/run/metrics.jsonl ]] && step=$(wc -l < "$out/run/metrics.jsonl")
    for r in 0 1; do
        p=$(rank_pid "$r")
        [[ -n $p ]] || continue
        read -r rss fds < <(sample "$p") || continue
        printf '%d\t%d\t%d\t%d\t%d\t%d\n' "$now" "$r" "$rss" "$fds" "$step" "$generations" >> "$out/soak.tsv"
    done
    if (( step >= next_gen )) && [[ -e $out/run/latest ]]; then
        # From the newest checkpoint, while training goes on.
        "$moe" generate --ckpt "$out/run" --prompt_file "$out/prompts.txt" --tokens 32 --seed 3 \
            >> "$out/generate.log" 2>&1 || { echo "soak: moe generate failed:" >&2; tail -5 "$out/generate.log" >&2; exit 1; }
        generations=$(( generations + 1 ))
        next_gen=$(( step + gen_every ))
    fi
    sleep "$sample_s"
done

# Preemption path: SIGTERM checkpoints at the next step boundary and exits 0.
kill -TERM "$job"
rc=0
wait "$job" || rc=$?
trap - EXIT
steps=$(wc -l < "$out/run/metrics.jsonl")
echo "soak: $steps steps in $secs s, $generations generate runs; training exited $rc after SIGTERM"

if command -v gnuplot > /dev/null; then
    gnuplot <<EOF || echo "soak: plot not written"
set terminal pngcairo size 1000,600
set output '$out/soak.png'
set multiplot layout 2,1 title 'moe train soak, 2 ranks: resident set and open descriptors'
set xlabel 'seconds'; set ylabel 'RSS (MB)'; set key right bottom; set offsets 0, 0, 1, 1
# One stream per rank (rows alternate between the ranks: a 1/0 filter
# would leave every line segment undefined).
rank(r) = sprintf("< awk -F'\\t' 'NR > 1 && \$2 == %d' '$out/soak.tsv'", r)
plot for [r=0:1] rank(r) using 1:(\$3/1024) with lines lw 2 title sprintf('rank %d', r)
set ylabel 'open fds'; set yrange [0:*]
plot for [r=0:1] rank(r) using 1:4 with lines lw 2 title sprintf('rank %d', r)
unset multiplot
EOF
fi

/usr/bin/python3 - "$out/soak.tsv" "$secs" "$rc" <<'EOF'
import sys
import numpy as np
path, secs, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = np.loadtxt(path, skiprows=1, ndmin=2)
# Warm-up: a fifth of the run, and until every periodic path (checkpoint,
# validation, generation) has run once, so that their buffers exist.
gen = rows[rows[:, 5] >= 1]
warm = max(secs / 5, gen[0, 0] + 1 if len(gen) else secs)
ok = rc == 0
if rc != 0:
    print(f"soak: FAIL training exited {rc} after SIGTERM (want 0: checkpoint and exit)")
for r in (0, 1):
    x = rows[(rows[:, 1] == r) & (rows[:, 0] >= warm)]
    if len(x) < 3:
        print(f"soak: FAIL rank {r}: only {len(x)} samples after the warm-up")
        ok = False
        continue
    t, rss, fds = x[:, 0], x[:, 2] / 1024, x[:, 3]
    growth = rss[-1] - rss[0]
    slope = np.polyfit(t, rss, 1)[0] * (t[-1] - t[0])  # MB over the measured span
    # A leak keeps the count up: the fewest open in the last third of the
    # samples is compared with the fewest in the first third. A descriptor
    # that was open only at the moment of one sample does not move either.
    third = max(1, len(fds) // 3)
    base, late = int(fds[:third].min()), int(fds[-third:].min())
    good = growth <= 2.0 and slope <= 2.0 and late <= base
    ok &= bool(good)
    print(f"soak: rank {r}: RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB (growth {growth:+.2f} MB, fitted {slope:+.2f} MB "
          f"over {t[-1] - t[0]:.0f} s), peak {rss.max():.1f} MB; fds {base} -> {late} (range {int(fds.min())}..{int(fds.max())}) "
          f"({len(x)} samples after {warm:.0f} s warm-up) {'ok' if good else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
