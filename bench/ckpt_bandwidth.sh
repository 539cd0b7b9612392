#!/usr/bin/env bash
# Checkpoint write and read bandwidth of the medium model, 1 and 2 ranks, against dd to the same directory.
# The MEDIUM model (d_model 256, 4 layers, 4 heads, E=8, k=2, d_ff 1024,
# seq 256) on 1 and 2 ranks, beside dd to the same directory in the same
# session; prints MB/s and the ratios.
#   bench/ckpt_bandwidth.sh [DIR] [ROUNDS]    (build first: launch/build)
# write: one training step with the checkpoint at the end; the time is the
#        trainer's own "checkpoint step 1 written in X s" (collective HDF5
#        write, fsync, rename), against dd of the same size with conv=fsync.
# read:  `moe inspect --verify` (reads and checksums every dataset, one
#        process) and, when the trainer reports it, the `--resume` load on the
#        same ranks, against dd of the checkpoint; the file is dropped from
#        the page cache before every read (dd iflag=nocache), so reads are cold.
# Median of ROUNDS (default 3), moe and dd alternating. MB = 10^6 bytes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
DIR=$(realpath -m "${1:-$REPO_DIR/build/ckpt_bench}")
ROUNDS=${2:-3}
set_threads 1
MODEL=(--d_model=256 --n_layers=4 --n_heads=4 --n_experts=8 --top_k=2 --d_ff=1024 --seq_len=256
       --batch_size=2 --steps=1 --val_every=0 --keep_last=1 --log_every=1)
if [[ $QUICK == 1 ]]; then
  ROUNDS=1
  DIR=$(mktemp -d)
  trap 'rm -rf "$DIR"' EXIT
  MODEL=(--d_model=64 --n_layers=2 --n_heads=2 --n_experts=4 --top_k=2 --d_ff=128 --seq_len=32
         --batch_size=2 --steps=1 --val_every=0 --keep_last=1 --log_every=1)
fi

mkdir -p "$DIR"
"$MOE" data synth --out "$DIR/data.txt" --bytes 1M >/dev/null

now() { date +%s.%N; }
fmt() { "$PY" -c "print(f'{$1:$2}')"; }
drop_cache() { dd if="$1" iflag=nocache count=0 status=none; }

# dd write of $1 bytes to DIR, fsync'd: seconds.
dd_write() {
  local t0 t1
  t0=$(now)
  dd if=/dev/zero of="$DIR/ddtest" bs=1M count=$(( ($1 + 1048575) / 1048576 )) conv=fsync status=none
  t1=$(now)
  rm -f "$DIR/ddtest"
  fmt "$t1 - $t0" .6f
}

# dd read of file $1 (cold): seconds.
dd_read() {
  local t0 t1
  drop_cache "$1"
  t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$(now)
  fmt "$t1 - $t0" .6f
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
    v+=("$(fmt "$t1 - $t0" .6f)")
    # The trainer's load, if it reports its time ("resumed from F at step N in X s").
    drop_cache "$ckpt"
    log=$("${MPIRUN[@]}" -np "$np" "$MOE" train --data="$DIR/data.txt" --out_dir="$run" "${MODEL[@]}" \
          --resume="$ckpt")
    r=$(sed -n 's/^resumed from .* in \([0-9.]*\) s.*/\1/p' <<<"$log")
    [ -n "$r" ] && rs+=("$r")
    dr+=("$(dd_read "$ckpt")")
  done
  [ -n "${w[0]}" ] || { echo "no 'checkpoint step 1 written in X s' line from moe train" >&2; exit 1; }
  mb=$(fmt "$bytes / 1e6" .1f)
  tw=$(median "${w[@]}"); tdw=$(median "${dw[@]}"); tv=$(median "${v[@]}"); tdr=$(median "${dr[@]}")
  resume="-"
  tread=$tv # the read ratio is the trainer's load (--resume) when it reports it, else verify
  if [ ${#rs[@]} -gt 0 ]; then tread=$(median "${rs[@]}"); resume=$(fmt "$mb / $tread" .0f); fi
  printf "%-5s %8s | %10.0f %10.0f %6.2fx | %12.0f %12s %10.0f %6.2fx\n" "$np" "$mb" \
    "$(fmt "$mb / $tw" .3f)" "$(fmt "$mb / $tdw" .3f)" "$(fmt "$tdw / $tw" .4f)" \
    "$(fmt "$mb / $tv" .3f)" "$resume" "$(fmt "$mb / $tdr" .3f)" "$(fmt "$tdr / $tread" .4f)"
  echo "PERF ckpt.np$np.write_mb_s $(fmt "$mb / $tw" .0f) MB/s checkpoint write, $np rank(s), $mb MB"
  echo "PERF ckpt.np$np.read_mb_s $(fmt "$mb / $tread" .0f) MB/s checkpoint read (${resume:+--resume load}), $np rank(s)"
  line=PERF; [[ $np == 2 ]] && line=PERF_README
  echo "$line ckpt.np$np.write_vs_dd $(fmt "$tdw / $tw" .2f) x checkpoint write bandwidth / dd conv=fsync, $np rank(s)"
  echo "$line ckpt.np$np.read_vs_dd $(fmt "$tdr / $tread" .2f) x checkpoint read bandwidth (cold) / dd, $np rank(s)"
done
echo "(ratio: moe bandwidth / dd bandwidth; read ratio from the --resume load; median of $ROUNDS; directory $DIR)"
