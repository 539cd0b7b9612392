#!/usr/bin/env bash
# One fuzzing sitting of one harness with AFL++:
#   fuzz/run.sh HARNESS MINUTES        (HARNESS: config ckpt prompt data tokenizer tokfile safetensors ...)
# Builds the instrumented fuzzers into build-fuzz/ (CC=afl-clang-fast,
# -DMOE_FUZZ=ON, AddressSanitizer + UBSan) unless present, then runs ONE
# afl-fuzz (nice 19, no CPU binding: the machine is shared) for MINUTES
# minutes (-V) on fuzz_HARNESS, starting from fuzz/corpus/HARNESS/ with the
# dictionary fuzz/HARNESS.dict when there is one. Afterwards:
#   - appends a line to fuzz/CAMPAIGNS.md: date, minutes, executions,
#     paths (corpus entries), edges covered, crashes and hangs found;
#   - minimises queue + old corpus with afl-cmin into fuzz/corpus/HARNESS/
#     (files named regress-* are kept as they are: inputs that once crashed
#     or hung, replayed by tests/fuzz);
#   - copies any crash or hang into build-fuzz/afl/HARNESS/<date>/found/ and
#     exits 1, so that it gets fixed and kept as regress-*.
# Environment: MOE_FUZZ_TIMEOUT_MS (per-input timeout, default per harness),
# MOE_FUZZ_BUILD (build directory, default build-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 && $2 =~ ^[0-9]+$ && $2 -ge 1 ]] || { echo "usage: fuzz/run.sh HARNESS MINUTES" >&2; exit 2; }
h=$1 minutes=$2
[[ -f fuzz/fuzz_$h.c ]] || { echo "fuzz/run.sh: no harness fuzz/fuzz_$h.c" >&2; exit 2; }
command -v afl-fuzz > /dev/null || { echo "fuzz/run.sh: afl-fuzz missing (apt-get install afl++)" >&2; exit 2; }
build=${MOE_FUZZ_BUILD:-build-fuzz}

export AFL_LLVM_ALLOWLIST=$PWD/fuzz/instrument.txt
if [[ ! -f $build/CMakeCache.txt ]]; then
  CC=afl-clang-fast cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_FUZZ=ON -DMOE_BUILD_TESTS=OFF \
    -DMOE_ASAN=ON -DMOE_UBSAN=ON > /dev/null
fi
nice -n 19 cmake --build "$build" --target "fuzz_$h" -j2 > "$build/build-$h.log" 2>&1 ||
  { tail -30 "$build/build-$h.log" >&2; exit 2; }
bin=$build/fuzz/fuzz_$h

case $h in
  ckpt) tmo=${MOE_FUZZ_TIMEOUT_MS:-2000} ;;
  tokenizer) tmo=${MOE_FUZZ_TIMEOUT_MS:-2000} ;;
  *) tmo=${MOE_FUZZ_TIMEOUT_MS:-1000} ;;
esac
corpus=fuzz/corpus/$h
[[ -d $corpus && -n $(ls -A "$corpus") ]] || { echo "fuzz/run.sh: empty seed corpus $corpus" >&2; exit 2; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$build/afl/$h/$stamp
mkdir -p "$out"
dict=()
[[ -f fuzz/$h.dict ]] && dict=(-x "fuzz/$h.dict")

# AFL++ under ASan: no memory limit (ASan reserves terabytes of address
# space); the sanitizers abort so that AFL++ sees a crash.
export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export ASAN_OPTIONS=abort_on_error=1:symbolize=0:detect_leaks=0:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1
echo "fuzz/run.sh: $h for $minutes min, output $out"
nice -n 19 afl-fuzz -i "$corpus" -o "$out" "${dict[@]}" -m none -t "$tmo" -V $((minutes * 60)) -- "$bin" \
  > "$out/afl.log" 2>&1 || { echo "fuzz/run.sh: afl-fuzz failed:" >&2; tail -30 "$out/afl.log" >&2; exit 2; }

stats=$out/default/fuzzer_stats
get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
execs=$(get execs_done) paths=$(get corpus_count) crashes=$(get saved_crashes) hangs=$(get saved_hangs)
edges=$(get edges_found) total_edges=$(get total_edges) run_s=$(get run_time)
[[ -n $crashes ]] || crashes=$(get unique_crashes)
[[ -n $hangs ]] || hangs=$(get unique_hangs)
[[ -n $paths ]] || paths=$(get paths_total)
[[ -n $run_s ]] || run_s=$((minutes * 60))

# The minimised corpus: the queue and the old corpus, regress-* kept aside.
keep=$out/keep
mkdir -p "$keep" "$out/all"
cp "$out"/default/queue/id:* "$out/all/" 2> /dev/null || true
for f in "$corpus"/*; do
  case $(basename "$f") in regress-*) cp "$f" "$keep/" ;; *) cp "$f" "$out/all/old-$(basename "$f")" ;; esac
done
if AFL_SKIP_BIN_CHECK=1 nice -n 19 afl-cmin -i "$out/all" -o "$out/cmin" -m none -t $((tmo * 5)) -- "$bin" \
     > "$out/cmin.log" 2>&1 && [[ -n $(ls -A "$out/cmin") ]]; then
  rm -f "$corpus"/*
  i=0
  for f in "$out"/cmin/*; do
    cp "$f" "$corpus/$(printf 'c%05d' $i)-$(sha1sum "$f" | cut -c1-12)"
    i=$((i + 1))
  done
  cp "$keep"/* "$corpus/" 2> /dev/null || true
else
  echo "fuzz/run.sh: afl-cmin failed, corpus left as it was:" >&2
  tail -5 "$out/cmin.log" >&2
fi
n_corpus=$(ls "$corpus" | wc -l)

log=fuzz/CAMPAIGNS.md
line="| $stamp | $h | $((run_s / 60)) | $execs | $paths | ${edges:-?}/${total_edges:-?} | $crashes | $hangs | $n_corpus |"
# the row goes after the table's last row (the findings follow the table)
last=$(grep -n '^| [0-9]\{8\}T' "$log" | tail -1 | cut -d: -f1)
if [[ -n $last ]]; then sed -i "${last}a\\$line" "$log"; else echo "$line" >> "$log"; fi
echo "fuzz/run.sh: $h: $execs executions in $run_s s, $paths paths, edges ${edges:-?}/${total_edges:-?}," \
     "$crashes crashes, $hangs hangs; corpus now $n_corpus files"

found=0
for kind in crashes hangs; do
  for f in "$out"/default/$kind/id:*; do
    [[ -e $f ]] || continue
    mkdir -p "$out/found"
    cp "$f" "$out/found/$kind-$(basename "$f" | cut -d, -f1 | tr -d ':')"
    found=1
  done
done
if ((found)); then
  echo "fuzz/run.sh: inputs that crashed or hung are in $out/found/ (fix, then keep as $corpus/regress-*)" >&2
  exit 1
fi
