#!/usr/bin/env bash
# Safetensors load: moerun's reader against numpy from an mmap (F32 and BF16, float32 out).
# Safetensors load speed: moerun's reader (mmap, validate, convert every
# tensor to float32 into a new buffer, release the file pages) against numpy
# doing the same from an mmap (np.frombuffer + astype / the BF16 shift), in
# one interleaved run, warm page cache, for an F32 and a BF16 file of 64 M
# elements in 64 tensors. Prints MB/s of float32 output, best of ROUNDS.
#   bench/st_read.sh [DIR] [ROUNDS]     (build first: launch/build)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_DIR"
TOOL=$(realpath "${ST_TOOL:-build/tests/convert/st_tool}")
DIR=$(realpath -m "${1:-build/st_bench}")
ROUNDS=${2:-3}
ROWS=1024
[[ $QUICK == 1 ]] && ROUNDS=1 ROWS=16 DIR=$DIR-quick
mkdir -p "$DIR"
/usr/bin/python3 - "$DIR" "$ROWS" <<'PY'
import os, sys
import numpy as np
sys.path.insert(0, "tests/convert")
import hf_ref
d, rows = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for dt in ("F32", "BF16"):
    p = os.path.join(d, f"{dt}.safetensors")
    if not os.path.exists(p):
        ent = {f"t{i:02d}": (dt, (rows, 1024), hf_ref.encode(rng.standard_normal((rows, 1024)), dt)) for i in range(64)}
        hf_ref.write_atomic(p, hf_ref.st_bytes(ent, {"format": "pt"}))
PY
numpy_read() {
  /usr/bin/python3 - "$1" <<'PY'
import json, mmap, struct, sys, time
import numpy as np
t0 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
(n,) = struct.unpack("<Q", m[:8])
h = json.loads(m[8:8 + n])
h.pop("__metadata__", None)
data = memoryview(m)[8 + n:]
total = 0
for name, e in h.items():
    b, end = e["data_offsets"]
    if e["dtype"] == "F32":
        a = np.frombuffer(data[b:end], dtype="<f4").astype(np.float32)
    else:
        a = (np.frombuffer(data[b:end], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    total += a.nbytes
    del a
t = time.perf_counter() - t0
print(f"{len(h)} tensors, {total / 1e6:.1f} MB float32 in {t:.3f} s: {total / 1e6 / t:.0f} MB/s")
PY
}
for dt in F32 BF16; do
  f="$DIR/$dt.safetensors"
  cat "$f" > /dev/null   # warm the page cache
  best_c=0; best_np=0
  for r in $(seq "$ROUNDS"); do
    c=$("$TOOL" read "$f" | sed 's/.*: \([0-9]*\) MB\/s/\1/')
    p=$(numpy_read "$f" | sed 's/.*: \([0-9]*\) MB\/s/\1/')
    [ "$c" -gt "$best_c" ] && best_c=$c
    [ "$p" -gt "$best_np" ] && best_np=$p
  done
  echo "$dt: moerun $best_c MB/s, numpy $best_np MB/s (float32 out, best of $ROUNDS)"
  perf "st_read.${dt,,}.mb_s" "$best_c" MB/s "safetensors $dt load to float32, 64 tensors of $ROWS x 1024, warm cache (numpy from an mmap: $best_np MB/s)"
  perf "st_read.${dt,,}.vs_numpy" "$(awk -v a="$best_c" -v b="$best_np" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" x "moerun / numpy, safetensors $dt load to float32"
done
