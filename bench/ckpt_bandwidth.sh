#!/usr/bin/env bash
# Checkpoint write and read bandwidth of the MEDIUM model (d_model 256, 4
# layers, 4 heads, E=8, k=2, d_ff 1024, seq 256) on 1 and 2 ranks, beside dd
# to the same directory in the same session; prints MB/s and the ratios.
#   bench/ckpt_bandwidth.sh [DIR] [ROUNDS]    (build first: launch/build)
# write: one training step with the checkpoint at the end; the time is the
#        trainer's own "checkpoint step 1 written in X s" (collective HDF5
#        write, fsync, rename), against dd of the same size with conv=fsync.
# read:  `moe inspect --verify` (reads and checksums every dataset, one
#        process) and, when the trainer reports it, the `--resume` load on the
#        same ranks, against dd of the checkpoint; the file is dropped from
#        the page cache before every read (dd iflag=nocache), so reads are cold.
# Best of ROUNDS (default 2). MB = 10^6 bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=$(realpath "${MOE_BIN:-build/src/cli/moe}")
DIR=$(realpath -m "${1:-build/ckpt_bench}")
ROUNDS=${2:-2}
MPIRUN=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
export OPENBLAS_NUM_THREADS=1
MODEL=(--d_model=256 --n_layers=4 --n_heads=4 --n_experts=8 --top_k=2 --d_ff=1024 --seq_len=256
       --batch_size=2 --steps=1 --val_every=0 --keep_last=1 --log_every=1)

mkdir -p "$DIR"
"$MOE" data synth --out "$DIR/data.txt" --bytes 1M >/dev/null

now() { date +%s.%N; }
calc() { python3 -c "print(f'{$1:$2}')"; }
best_min() { python3 -c "import sys; print(min(map(float, sys.argv[1:])))" "$@"; }
drop_cache() { dd if="$1" iflag=nocache count=0 status=none; }

# dd write of $1 bytes to DIR, fsync'd: seconds.
dd_write() {
  local t0 t1
  t0=$(now)
  dd if=/dev/zero of="$DIR/ddtest" bs=1M count=$(( ($1 + 1048575) / 1048576 )) conv=fsync status=none
  t1=$(now)
  rm -f "$DIR/ddtest"
  calc "$t1 - $t0" .6f
}

# dd read of file $1 (cold): seconds.
dd_read() {
  local t0 t1
  drop_cache "$1"
  t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$(now)
  calc "$t1 - $t0" .6f
}

printf "%-5s %8s | %10s %10s %7s | %12s %12s %10s %7s\n" ranks "ckpt MB" "write MB/s" "dd MB/s" ratio \
  "verify MB/s" "resume MB/s" "dd MB/s" ratio
for np in 1 2; do
  run="$DIR/np$np"
  w=(); dw=(); v=(); rs=(); dr=()
  for _ in $(seq "$ROUNDS"); do
    rm -rf "$run"
    log=$("${MPIRUN[@]}" -np "$np" "$MOE" train --data="$DIR/data.txt" --out_dir="$run" "${MODEL[@]}")
    w+=("$(sed -n 's/^checkpoint step 1 written in \([0-9.]*\) s.*/\1/p' <<<"$log")")
    ckpt="$run/ckpt-000001.h5"
    bytes=$(stat -c %s "$ckpt")
    dw+=("$(dd_write "$bytes")")
    drop_cache "$ckpt"
    t0=$(now)
    "$MOE" inspect "$ckpt" --verify >/dev/null
    t1=$(now)
    v+=("$(calc "$t1 - $t0" .6f)")
    # The trainer's load, if it reports its time ("resumed from F at step N in X s").
    drop_cache "$ckpt"
    log=$("${MPIRUN[@]}" -np "$np" "$MOE" train --data="$DIR/data.txt" --out_dir="$run" "${MODEL[@]}" \
          --resume="$ckpt")
    r=$(sed -n 's/^resumed from .* in \([0-9.]*\) s.*/\1/p' <<<"$log")
    [ -n "$r" ] && rs+=("$r")
    dr+=("$(dd_read "$ckpt")")
  done
  [ -n "${w[0]}" ] || { echo "no 'checkpoint step 1 written in X s' line from moe train" >&2; exit 1; }
  mb=$(calc "$bytes / 1e6" .1f)
  tw=$(best_min "${w[@]}"); tdw=$(best_min "${dw[@]}"); tv=$(best_min "${v[@]}"); tdr=$(best_min "${dr[@]}")
  resume="-"
  tread=$tv # the read ratio is the trainer's load (--resume) when it reports it, else verify
  if [ ${#rs[@]} -gt 0 ]; then tread=$(best_min "${rs[@]}"); resume=$(calc "$mb / $tread" .0f); fi
  printf "%-5s %8s | %10.0f %10.0f %6.2fx | %12.0f %12s %10.0f %6.2fx\n" "$np" "$mb" \
    "$(calc "$mb / $tw" .3f)" "$(calc "$mb / $tdw" .3f)" "$(calc "$tdw / $tw" .4f)" \
    "$(calc "$mb / $tv" .3f)" "$resume" "$(calc "$mb / $tdr" .3f)" "$(calc "$tdr / $tread" .4f)"
done
echo "(ratio: moe bandwidth / dd bandwidth; read ratio from the --resume load; directory $DIR)"
