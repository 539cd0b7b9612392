# Sourced by every bench/*.sh: one environment for moerun and PyTorch, so a
# comparison differs only in the code being compared.
#
#   MOE        the moe binary ($MOE_BIN, default build/src/cli/moe), absolute
#   PY         the Python that has Debian's python3-torch (/usr/bin/python3)
#   QUICK      1 under `bench/all.sh --quick` (BENCH_QUICK=1): tiny runs that
#              only prove the script works; its figures mean nothing
#   perf LINE  prints a figure for bench/all.sh: perf KEY VALUE UNIT WHAT...
#   perf_readme ... the same, and the figure also goes to the README table
#
# Both sides get:
#   OPENBLAS_CORETYPE   the same OpenBLAS kernels (Debian's PyTorch calls the
#                       system OpenBLAS through libblas.so.3, so one variable
#                       sets both): `moe selftest blas --pick`, i.e. the
#                       variable if set, else the fastest correct set here
#   OPENBLAS_THREAD_TIMEOUT=4  idle OpenBLAS workers sleep at once rather than
#                       spin between GEMMs (moerun's and PyTorch's own threads
#                       then get the cores)
#   OMP_WAIT_POLICY=PASSIVE    the same for OpenMP workers (PyTorch's elementwise ops)
#   MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_: glibc keeps
#                       freed memory instead of unmapping it (PyTorch's CPU
#                       allocator otherwise pays page faults every step)
# Thread counts are per run: set_threads N exports OPENBLAS_NUM_THREADS and
# OMP_NUM_THREADS (PyTorch's torch.set_num_threads does not limit OpenBLAS's
# own pool, so the variables do it for both).
# An explicit setting of any of these in the caller's environment wins.
#   bench_args "$@"   the common arguments: --quick (QUICK=1) and a round
#              count (ROUNDS, which the script sets to its default first)

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
MOE=$(realpath -m "${MOE_BIN:-$REPO_DIR/build/src/cli/moe}")
PY=${MOE_PYTHON:-/usr/bin/python3}
QUICK=${BENCH_QUICK:-0}
[[ -x $MOE ]] || { echo "bench: no moe binary at $MOE (build first: launch/build, or set MOE_BIN)" >&2; exit 2; }
OPENBLAS_CORETYPE=$("$MOE" selftest blas --pick ${MOE_BLAS_PICK_ARGS:-}) || exit 1
export OPENBLAS_CORETYPE
export OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184}
export MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-268435456}
MPIRUN=(mpirun --oversubscribe)
[[ $(id -u) -eq 0 ]] && MPIRUN+=(--allow-run-as-root)

set_threads() { export OPENBLAS_NUM_THREADS=$1 OMP_NUM_THREADS=$1; }
# bind_flags RANKS THREADS: mpirun's placement for RANKS ranks of THREADS
# threads each, as launch/moe-local chooses it: THREADS cores of its own per
# rank where they fit, else no binding. (Open MPI's default binds each of up
# to 2 ranks to ONE core, so 1 rank x 2 threads ran its threads on one core.)
bind_flags() {
  if (( $1 * $2 <= $(nproc) )); then echo "--map-by slot:PE=$2 --bind-to core"; else echo "--bind-to none"; fi
}

perf() { echo "PERF $*"; }
perf_readme() { echo "PERF_README $*"; }

# jget JSON KEY: one field of a JSON object
jget() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
# median X...: the median of the numbers
median() { "$PY" -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
# calc EXPR: a Python expression's value
calc() { "$PY" -c "print($1)"; }

bench_args() {
  local a
  for a in "$@"; do
    case $a in
      --quick) QUICK=1 ;;
      [0-9]*) ROUNDS=$a ;;
      *) echo "$(basename "$0"): unknown argument '$a' (--quick, ROUNDS)" >&2; exit 2 ;;
    esac
  done
}
