#!/usr/bin/env bash
# Memory errors: Valgrind memcheck over the unit tests and a 2-rank training
# step, with the counts of errors in moerun code and in the libraries.
#   tests/valgrind.sh [BUILD_DIR]            # default build/
#   VG_TESTS=REGEX tests/valgrind.sh          # only the unit tests matching REGEX
#   VG_EXCLUDE=REGEX tests/valgrind.sh        # all but those matching REGEX
#   VG_SKIP_TRAIN=1 / VG_SKIP_UNIT=1          # one half only
#   VG_LOGS=DIR                               # logs there (default BUILD_DIR/valgrind)
#   VG_ORIGINS=1                              # --track-origins=yes (twice as slow)
#   VG_GEN=1                                  # suppression text for each error, in the XML
# Not part of ctest or CI: under memcheck the unit tests take about an hour
# on 2 cores (docs/training.md, "Long runs and memory errors").
#
# Runs every ctest test labelled `unit` whose command is an executable of the
# build tree (the cmocka tests and the fuzz corpus replays), with its own
# environment and working directory, then `moe train` on 2 ranks (demo
# config at tiny size, 2 steps, a checkpoint, a validation) with every rank
# under memcheck. Errors: invalid reads and writes, uses of uninitialised
# values, bad frees, overlapping copies, syscall parameters, and definitely
# lost blocks. Suppressions: Open MPI's own file and tests/valgrind.supp
# (Open MPI, OpenBLAS, HDF5, glibc; a comment per entry says why). An error
# left over is moerun's when the first frame of its stack outside the
# allocator and libc is in moerun code (the build tree), else a library's.
# Prints one line per run and the totals; exit 1 when moerun code has an
# error or a run fails, 0 otherwise. XML logs go to BUILD_DIR/valgrind/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
build=$(cd "${1:-build}" && pwd)
moe=$build/src/cli/moe
[[ -x $moe ]] || { echo "valgrind.sh: no moe binary at $moe (launch/build first)" >&2; exit 2; }
command -v valgrind > /dev/null || { echo "valgrind.sh: valgrind not found (apt-get install valgrind)" >&2; exit 2; }
logs=${VG_LOGS:-$build/valgrind}
rm -rf "$logs"
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)

supp=(--suppressions="$repo/tests/valgrind.supp")
[[ -r /usr/share/openmpi/openmpi-valgrind.supp ]] && supp+=(--suppressions=/usr/share/openmpi/openmpi-valgrind.supp)
vg=(valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite
    --num-callers=40 --fair-sched=yes --error-exitcode=99 ${VG_GEN:+--gen-suppressions=all} ${VG_ORIGINS:+--track-origins=yes} "${supp[@]}")
# Open MPI unloads its components in MPI_Finalize: keep them loaded, so
# that their frames have names (and the suppressions can match them).
export OMPI_MCA_mca_base_component_disable_dlclose=1
# One BLAS thread: memcheck serialises threads anyway. Valgrind has no
# AVX-512: OpenBLAS's Haswell kernels (AVX2) whatever the caller set.
# Tests that set their own thread counts get OpenBLAS workers that sleep at
# once instead of spinning (spinning threads crawl under memcheck, which
# runs one thread at a time).
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_CORETYPE=Haswell OPENBLAS_THREAD_TIMEOUT=4

status=0
# ---- the unit tests ----
if [[ ${VG_SKIP_UNIT:-0} != 1 ]]; then
    ctest --test-dir "$build" -L unit --show-only=json-v1 > "$logs/tests.json"
    /usr/bin/python3 - "$logs/tests.json" "$build" "${VG_TESTS:-}" "${VG_EXCLUDE:-}" > "$logs/unit.list" <<'EOF'
import json, re, sys
tests, build, pick, skip = json.load(open(sys.argv[1]))["tests"], sys.argv[2], sys.argv[3], sys.argv[4]
for t in tests:
    cmd = t.get("command") or []
    if not cmd or not cmd[0].startswith(build + "/") or (pick and not re.search(pick, t["name"])) \
            or (skip and re.search(skip, t["name"])):
        continue  # mpiexec, python and h5dump wrappers: not ours to run under memcheck
    props = {p["name"]: p["value"] for p in t.get("properties", [])}
    env = [e for e in props.get("ENVIRONMENT", [])]
    # name, working directory, environment, command: one field per line, a blank line after
    print(t["name"]); print(props.get("WORKING_DIRECTORY", build))
    print("\x1f".join(env)); print("\x1f".join(cmd)); print()
EOF
    while IFS= read -r name && IFS= read -r wd && IFS= read -r envs && IFS= read -r cmds && IFS= read -r _; do
        IFS=$'\x1f' read -r -a env_a <<< "$envs"
        IFS=$'\x1f' read -r -a cmd_a <<< "$cmds"
        rc=0
        (cd "$wd" && env ${env_a[@]+"${env_a[@]}"} "${vg[@]}" --xml=yes --xml-file="$logs/unit.$name.%p.xml" \
            "${cmd_a[@]}" > "$logs/unit.$name.out" 2>&1) || rc=$?
        echo "valgrind.sh: unit $name exited $rc"
        (( rc == 0 || rc == 99 )) || status=1
    done < "$logs/unit.list"
fi

# ---- a 2-rank training run ----
if [[ ${VG_SKIP_TRAIN:-0} != 1 ]]; then
    work=$logs/train
    mkdir -p "$work"
    "$moe" data synth --out "$work/corpus.txt" --bytes 200000 --seed 1 > /dev/null
    "$moe" data synth --out "$work/val.txt" --bytes 20000 --seed 7 > /dev/null
    flags=(-np 2 --oversubscribe)
    [[ $(id -u) -eq 0 ]] && flags+=(--allow-run-as-root)
    rc=0
    mpirun "${flags[@]}" -x OMPI_MCA_mca_base_component_disable_dlclose -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS -x OPENBLAS_CORETYPE -x OPENBLAS_THREAD_TIMEOUT \
        "${vg[@]}" --xml=yes --xml-file="$logs/train.rank%q{OMPI_COMM_WORLD_RANK}.xml" \
        "$moe" train --config launch/demo.ini --data="$work/corpus.txt" --val_data="$work/val.txt" \
        --out_dir="$work/run" --d_model=32 --n_layers=2 --n_heads=2 --seq_len=32 --d_ff=64 --batch_size=8 \
        --steps=2 --warmup_steps=1 --val_every=2 --val_batches=1 --ckpt_every=2 --log_every=1 \
        > "$logs/train.out" 2>&1 || rc=$?
    echo "valgrind.sh: 2-rank moe train exited $rc"
    (( rc == 0 || rc == 99 )) || { status=1; tail -5 "$logs/train.out" >&2; }
fi

# ---- the counts ----
/usr/bin/python3 - "$logs" "$build" "$repo" <<'EOF' || status=1
import glob, os, sys
import xml.etree.ElementTree as ET
logs, build, repo = sys.argv[1:4]
# Frames that only say where memory came from or was copied: look past them.
SKIP = ("vgpreload_", "/libc.so", "/ld-linux")
def ours(err):
    for fr in err.find("stack").findall("frame"):
        obj = fr.findtext("obj") or ""
        if any(s in obj for s in SKIP):
            continue
        path = os.path.join(fr.findtext("dir") or "", fr.findtext("file") or "")
        return obj.startswith(build + "/") or path.startswith(repo + "/src")
    return False
total = {"moerun": 0, "library": 0, "suppressed": 0}
for f in sorted(glob.glob(os.path.join(logs, "*.xml"))):
    try:
        root = ET.parse(f).getroot()
    except ET.ParseError:
        continue  # a process that exec'd or never got going (Open MPI's helpers)
    errs = root.findall("error")
    mine = [e for e in errs if ours(e)]
    supp = sum(int(p.findtext("count")) for p in root.iter("pair"))
    total["moerun"] += len(mine)
    total["library"] += len(errs) - len(mine)
    total["suppressed"] += supp
    name = os.path.basename(f)[:-4]
    if errs or mine:
        print(f"valgrind: {name}: {len(mine)} errors in moerun code, {len(errs) - len(mine)} in libraries ({supp} suppressed)")
        for e in errs:
            fr = [x.findtext("fn") or x.findtext("obj") or "?" for x in e.find("stack").findall("frame")][:6]
            print(f"    {'MOERUN ' if e in mine else 'library'} {e.findtext('kind')}: {' < '.join(fr)}")
n = len(glob.glob(os.path.join(logs, "*.xml")))
print(f"valgrind: {n} processes: {total['moerun']} errors in moerun code, {total['library']} in libraries "
      f"not suppressed, {total['suppressed']} suppressed")
sys.exit(1 if total["moerun"] else 0)
EOF
exit "$status"
