#!/usr/bin/env bash
# Runs every benchmark (bench/*.sh) and writes docs/perf.md: the machine,
# the versions, the OpenBLAS kernel set, and every figure with the command
# that printed it. The README's performance table is copied from
# docs/perf.md by --update-readme, never typed by hand.
#
#   bench/all.sh                      run everything, write docs/perf.md
#   bench/all.sh --only layer_vs_torch,decode    a subset (names without .sh): their
#                                     sections and summary rows replace those in
#                                     docs/perf.md, each marked with its own date;
#                                     the rest of the file is kept
#   bench/all.sh --quick --no-write   smoke test: tiny runs (BENCH_QUICK=1),
#                                     meaningless figures, nothing written
#   bench/all.sh --update-readme      only copy docs/perf.md's summary table
#                                     into README.md (between the perf-table markers)
#   options: --out FILE (default docs/perf.md), --readme FILE (README.md)
#
# The convention a bench/*.sh follows to be run here (bench/README.md):
#   - line 2 is a one-line title comment ("# What it measures.");
#   - it runs with no arguments, sources bench/env.sh, and under
#     BENCH_QUICK=1 finishes in seconds;
#   - it prints its figures as lines
#         PERF <key> <value> <unit> <what it is>
#         PERF_README <key> <value> <unit> <what it is>   (also in the README table)
#     with a unique dotted key (e.g. layer.e8_k2.ratio), unit "-" for none;
#   - exit status 0. Anything else it prints goes to docs/perf.md as is.
# A script that fails or prints no PERF line fails the run (exit 1).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
OUT=$REPO_DIR/docs/perf.md
README=$REPO_DIR/README.md
QUICK=0 WRITE=1 ONLY="" UPDATE_README=0 OUT_SET=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1 ;;
    --no-write) WRITE=0 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --out) OUT=$(realpath -m "${2:?--out needs a file}"); OUT_SET=1; shift ;;
    --readme) README=$(realpath -m "${2:?--readme needs a file}"); shift ;;
    --update-readme) UPDATE_README=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "all.sh: unknown option '$1' (--help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${MOE_PYTHON:-/usr/bin/python3} # env.sh sets the same, later

update_readme() {
  "$PY" - "$OUT" "$README" << 'PY'
import re, sys
perf, readme = sys.argv[1], sys.argv[2]
BEGIN, END = "<!-- perf-table:begin", "<!-- perf-table:end -->"
src = open(perf).read()
m = re.search(r"<!-- summary:begin -->\n(.*?)<!-- summary:end -->", src, re.S)
if not m:
    sys.exit(f"all.sh: {perf} has no summary block (run bench/all.sh first)")
text = open(readme).read()
i, j = text.find(BEGIN), text.find(END)
if i < 0 or j < i:
    sys.exit(f"all.sh: {readme} has no '{BEGIN} ... {END}' block")
i = text.index("\n", i) + 1  # keep the begin marker line
open(readme, "w").write(text[:i] + m.group(1) + text[j:])
print(f"all.sh: copied the summary table of {perf} into {readme}")
PY
}

if (( UPDATE_README )); then update_readme; exit; fi
if (( QUICK )); then
  export BENCH_QUICK=1
  (( OUT_SET )) || WRITE=0 # quick figures mean nothing: never into docs/perf.md by default
fi

scripts=()
for f in "$BENCH_DIR"/*.sh; do
  n=$(basename "$f" .sh)
  [[ $n == all || $n == env ]] && continue
  # a script that is not a performance benchmark says so (bench/soak.sh)
  grep -qx "# bench/all.sh: skip" "$f" && continue
  [[ -n $ONLY && ",$ONLY," != *",$n,"* ]] && continue
  scripts+=("$n")
done
# the kernel-set table first: the others use its choice
[[ " ${scripts[*]} " == *" blas "* ]] && scripts=(blas $(printf '%s\n' "${scripts[@]}" | grep -vx blas))
(( ${#scripts[@]} )) || { echo "all.sh: no benchmark matches '--only $ONLY'" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The benchmarks' environment, resolved once before any timing (the first
# kernel-set pick on a machine runs the selftest); every script inherits it.
explicit=${OPENBLAS_CORETYPE:-}
source "$BENCH_DIR/env.sh"
uptime > "$work/load.before"
failed=()
for n in "${scripts[@]}"; do
  echo "== bench/$n.sh$( (( QUICK )) && echo " (quick)")" >&2
  t0=$SECONDS
  rc=0
  bash "$BENCH_DIR/$n.sh" > "$work/$n.out" 2> "$work/$n.err" || rc=$?
  echo $(( SECONDS - t0 )) > "$work/$n.seconds"
  grep -E '^PERF(_README)? ' "$work/$n.out" >&2 || true
  if (( rc != 0 )); then
    echo "all.sh: bench/$n.sh failed (exit $rc):" >&2
    tail -n 20 "$work/$n.err" >&2
    failed+=("$n")
  elif ! grep -qE '^PERF(_README)? [^ ]+ [^ ]+ [^ ]+' "$work/$n.out"; then
    echo "all.sh: bench/$n.sh printed no 'PERF <key> <value> <unit> <what>' line" >&2
    failed+=("$n")
  fi
done
uptime > "$work/load.after"
(( ${#failed[@]} == 0 )) || { echo "all.sh: failed: ${failed[*]}" >&2; exit 1; }
(( WRITE )) || { echo "all.sh: ${#scripts[@]} benchmarks ran (${scripts[*]}); nothing written" >&2; exit 0; }

# ---- docs/perf.md ----
versions() {
  echo "cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  echo "cores=$(nproc)"
  echo "simd=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n 1 | tr ' ' '\n' \
               | grep -E '^(sse|ssse|avx|fma|amx|f16c)' | sort -u | tr '\n' ' ')"
  echo "mem=$(awk '/MemTotal/ {printf "%.1f GB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -r)"
  for p in libopenblas0-pthread openmpi-bin libhdf5-openmpi-dev python3-torch gcc; do
    echo "pkg_$p=$(dpkg-query -W -f='${Version}' "$p" 2> /dev/null || echo '?')"
  done
  echo "openblas_library=$("$MOE" selftest blas --one auto --no-check --no-time | sed 's/^MOE_BLAS_RESULT //' \
        | "$PY" -c 'import json,sys; j = json.load(sys.stdin)
print(" ".join(w for w in j["config"].split() if w != j["corename"]), "(kernels of these runs:", j["corename"] + ")")')"
  echo "mpirun=$(mpirun --version 2>&1 | head -n 1)"
  echo "gcc=$(gcc --version | head -n 1)"
  echo "python=$("$PY" --version 2>&1)"
  echo "torch=$("$PY" -c 'import torch; c = torch.__config__.show(); import re
b = re.search(r"BLAS_INFO=(\w+)", c); print(torch.__version__, "(BLAS_INFO=" + (b.group(1) if b else "?") + ")")')"
  echo "torch_blas=$(cd "$BENCH_DIR" && "$PY" -c 'import torch_layer; print("%s x %d threads by default" % torch_layer.blas_info())')"
  echo "moe=$("$MOE" --version) $(git -C "$REPO_DIR" rev-parse --short HEAD 2> /dev/null)$(
        git -C "$REPO_DIR" diff --quiet HEAD 2> /dev/null || echo ' (uncommitted changes)')"
}
versions > "$work/versions"
"$PY" - "$work" "$OUT" "$BENCH_DIR" "$QUICK" "${explicit:-}" "$OPENBLAS_CORETYPE" "$ONLY" "${scripts[@]}" << 'PY'
import datetime, os, re, sys
work, out, bench_dir, quick, explicit, core, only = sys.argv[1:8]
names = sys.argv[8:]
ver = dict(l.rstrip("\n").split("=", 1) for l in open(f"{work}/versions"))
env = {k: os.environ.get(k, "") for k in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "MALLOC_MMAP_MAX_",
                                           "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")}
L = []
w = L.append
w("# Performance figures")
w("")
w(f"Written by `bench/all.sh` on {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
  "do not edit by hand (rerun it). The README's table is copied from the summary below by "
  "`bench/all.sh --update-readme`." + (" **Quick mode: the figures mean nothing.**" if quick == "1" else ""))
w("")
w("## Machine and versions")
w("")
w("| what | value |")
w("|---|---|")
rows = [("CPU", ver["cpu_model"]), ("cores", ver["cores"]), ("SIMD flags", ver["simd"]), ("memory", ver["mem"]),
        ("Linux", ver["kernel"]),
        ("OpenBLAS", f"{ver['openblas_library']} (Debian {ver['pkg_libopenblas0-pthread']})"),
        ("Open MPI", f"{ver['mpirun']} (Debian {ver['pkg_openmpi-bin']})"),
        ("HDF5", f"Debian libhdf5-openmpi-dev {ver['pkg_libhdf5-openmpi-dev']}"),
        ("PyTorch", f"{ver['torch']}, Debian python3-torch {ver['pkg_python3-torch']}; its BLAS: {ver['torch_blas']}"),
        ("gcc", ver["gcc"]), ("Python", ver["python"]), ("moe", ver["moe"]),
        ("load average before / after", f"{open(work + '/load.before').read().split('load average:')[-1].strip()} / "
                                         f"{open(work + '/load.after').read().split('load average:')[-1].strip()}")]
for k, v in rows:
    w(f"| {k} | {v} |")
w("")
w("## Environment of every run (both sides of each comparison)")
w("")
how = "set in the environment" if explicit else "`moe selftest blas --pick`: the fastest correct set on this machine"
w(f"- `OPENBLAS_CORETYPE={core}` ({how}). Debian's PyTorch calls the same OpenBLAS "
  "(`libblas.so.3` -> OpenBLAS pthreads), so both sides run the same kernels; each side reports what it loaded.")
for k, v in env.items():
    w(f"- `{k}={v}`")
w("- `OPENBLAS_NUM_THREADS` = `OMP_NUM_THREADS` = the thread count of each run (PyTorch's "
  "`torch.set_num_threads` does not limit OpenBLAS's pool, the variable does). See `bench/env.sh`.")
w("")
perf = []
for n in names:
    for l in open(f"{work}/{n}.out"):
        m = re.match(r"^(PERF|PERF_README) (\S+) (\S+) (\S+) ?(.*)$", l.rstrip("\n"))
        if m:
            perf.append((n,) + m.groups())
w("## Summary")
w("")
w("<!-- summary:begin -->")
w("| what | figure | command |")
w("|---|---|---|")
for n, kind, key, value, unit, what in perf:
    if kind == "PERF_README":
        w(f"| {what} | {value}{'' if unit == '-' else (unit if unit == 'x' else ' ' + unit)} | `bench/{n}.sh` |")
w("<!-- summary:end -->")
w("")
now = datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')
head_end = len(L)
for n in names:
    src = open(f"{bench_dir}/{n}.sh").read().splitlines()
    title = src[1].lstrip("# ").strip() if len(src) > 1 and src[1].startswith("#") else n
    w(f"## {title}")
    w("")
    alone = f"; rerun alone (`--only`) on {now}, {ver['moe']}" if only else ""
    w(f"`bench/{n}.sh` ({open(f'{work}/{n}.seconds').read().strip()} s{alone})")
    w("")
    text = [l.rstrip("\n") for l in open(f"{work}/{n}.out") if not re.match(r"^PERF(_README)? ", l)]
    if text:
        w("```")
        L.extend(text)
        w("```")
        w("")
    w("| key | value | unit | what |")
    w("|---|---|---|---|")
    for s, kind, key, value, unit, what in perf:
        if s == n:
            w(f"| `{key}` | {value} | {unit} | {what}{' (README)' if kind == 'PERF_README' else ''} |")
    w("")
if only and os.path.exists(out):
    # merge: the other benchmarks' sections and summary rows stay as they were
    old = open(out).read().split("\n")
    def bench_of(line):
        m = re.search(r"`bench/([\w-]+)\.sh`", line)
        return m.group(1) if m else None
    b0, b1 = old.index("<!-- summary:begin -->"), old.index("<!-- summary:end -->")
    new_rows = L[L.index("<!-- summary:begin -->") + 3:L.index("<!-- summary:end -->")]
    rows, placed = [], set()
    for r in old[b0 + 3:b1]:
        n = bench_of(r)
        if n in names:
            if n not in placed:
                rows += [x for x in new_rows if bench_of(x) == n]
                placed.add(n)
        else:
            rows.append(r)
    rows += [x for x in new_rows if bench_of(x) not in placed]
    # sections: from one "## " heading to the next, named by their bench line
    def sections(lines):
        out_, cur = [], None
        for line in lines:
            if line.startswith("## "):
                cur = [line]
                out_.append(cur)
            elif cur is not None:
                cur.append(line)
        return [(next((bench_of(x) for x in sec if x.startswith("`bench/")), None), sec) for sec in out_]
    first = next(i for i, line in enumerate(old) if line.startswith("## ") and i > b1)
    fresh = dict(sections(L[head_end:]))
    merged, done = [], set()
    for n, sec in sections(old[first:]):
        if n in fresh:
            merged += fresh[n]
            done.add(n)
        else:
            merged += sec
    for n in names:
        if n not in done:
            merged += fresh[n]
    L = old[:b0 + 3] + rows + old[b1:first] + merged
    while L and L[-1] == "":
        L.pop()
open(out, "w").write("\n".join(L) + "\n")
print(f"all.sh: wrote {out}" + (f" (sections {', '.join(names)} replaced)" if only else ""))
PY
