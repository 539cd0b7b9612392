#!/usr/bin/env python3
"""ctest driver for `moe bench layer --save`.

  dump_check.py ref   --moe M --out DIR --name N -- BENCH_ARGS...
      writes DIR/N.h5 with one process and checks it against the PyTorch
      reference (tests/py/layer_ref.py).
  dump_check.py ranks --moe M --out DIR --name N --np W --mpiexec X
                      [--numproc-flag -n] [--mpiexec-flag F ...] -- BENCH_ARGS...
      writes DIR/N_wW.h5 with `mpiexec -n W` and DIR/N_1.h5 with one process
      (same arguments but --ep-size, so the same --groups and seed) and requires the two
      files to be equal (tests/py/h5_compare.py, rtol 1e-5).
Exit status: 0 pass, non-zero otherwise (the failing step is printed).
"""
import argparse
import os
import subprocess
import sys

import numpy as np

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "py"))


def run(cmd, env):
    print("+ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if r.returncode != 0:
        print(r.stdout)
        print(f"dump_check: command failed with exit status {r.returncode}")
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("ref", "ranks"))
    ap.add_argument("--moe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--np", type=int, default=1)
    ap.add_argument("--mpiexec")
    ap.add_argument("--numproc-flag", default="-n")
    ap.add_argument("--mpiexec-flag", action="append", default=[])
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    os.makedirs(a.out, exist_ok=True)
    # Two cores are shared by every test: one BLAS thread per process.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    base = [a.moe, "bench", "layer", "--iters", "1", "--warmup", "0", "--json"] + bench
    if a.mode == "ref":
        import layer_ref
        path = os.path.join(a.out, a.name + ".h5")
        run(base + ["--save", path], env)
        return layer_ref.main([path])
    import h5_compare
    many = os.path.join(a.out, f"{a.name}_w{a.np}.h5")
    one = os.path.join(a.out, f"{a.name}_1.h5")
    run([a.mpiexec, a.numproc_flag, str(a.np)] + a.mpiexec_flag + base + ["--save", many], env)
    # One process holds every expert: --ep-size does not apply to it.
    single = [x for i, x in enumerate(base) if x != "--ep-size" and (i == 0 or base[i - 1] != "--ep-size")]
    run(single + ["--save", one], env)
    # The two runs multiply different row counts, and OpenBLAS does not
    # promise the same bits for a row at another M (its Haswell kernels
    # differ in the last ulp). Float results are compared to a tolerance;
    # the routing masks are compared exactly, which is sound only when no
    # routing decision of the data sits within rounding of a tie: check
    # that precondition, so that a near-tie in the test data is reported as
    # such and not as a disagreement between rank counts.
    import layer_ref
    cfg, data = layer_ref.load(one)
    _, _, _, ties = layer_ref.route(cfg, np.asarray(data["routing/probs"], np.float64), 1e-4)
    if ties:
        g, items = next(iter(ties.items()))
        print(f"dump_check: the test data has routing decisions within 1e-4 of a tie (group {g}: {items[0]}); "
              "choose another --seed")
        return 1
    return h5_compare.main([many, one, "--rtol", "1e-5"])


if __name__ == "__main__":
    sys.exit(main())
