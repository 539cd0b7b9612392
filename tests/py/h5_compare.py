#!/usr/bin/env python3
"""Compare two HDF5 files (e.g. layer dumps written by different rank counts).

Checks: the same set of datasets and groups; the same shape and dtype for
each dataset; integer, boolean and string datasets identical; float
datasets within --rtol, where the error of a tensor is
    max|a - b| / max(max|a|, max|b|, atol)
(relative to the tensor's largest magnitude; atol = 1e-30 by default, a
floor that only matters for all-zero tensors, which must then match
exactly up to atol); NaN/Inf must sit at identical positions; root
attributes (and attributes of every object) equal, floats compared exactly.
Prints every difference and the worst float tensor.

Exit status: 0 equal, 1 different, 2 a file cannot be read.
Usage: h5_compare.py A.h5 B.h5 [--rtol 1e-5] [--atol 1e-30]
"""
import argparse
import sys

import h5py
import numpy as np


def collect(f):
    objs = {}
    f.visititems(lambda name, obj: objs.__setitem__(name, obj))
    objs["/"] = f
    return objs


def norm_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def compare_attrs(name, a, b, problems):
    ka, kb = set(a.attrs), set(b.attrs)
    for k in sorted(ka ^ kb):
        problems.append(f"{name}: attribute {k!r} only in {'A' if k in ka else 'B'}")
    for k in sorted(ka & kb):
        va, vb = norm_attr(a.attrs[k]), norm_attr(b.attrs[k])
        if va != vb:
            problems.append(f"{name}: attribute {k!r} differs: {va!r} vs {vb!r}")


def compare_dataset(name, a, b, rtol, atol, problems):
    """Returns the float error of the dataset (None if not a float dataset)."""
    if a.shape != b.shape:
        problems.append(f"/{name}: shape {a.shape} vs {b.shape}")
        return None
    if a.dtype != b.dtype:
        problems.append(f"/{name}: dtype {a.dtype} vs {b.dtype}")
        return None
    va, vb = a[()], b[()]
    if a.dtype.kind != "f":
        if not np.array_equal(np.asarray(va), np.asarray(vb)):
            diff = np.argwhere(np.asarray(va) != np.asarray(vb))
            where = f" (first at index {tuple(int(i) for i in diff[0])})" if len(diff) else ""
            problems.append(f"/{name}: {a.dtype} values differ: {len(diff)} entries{where}")
        return None
    va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
    fa, fb = np.isfinite(va), np.isfinite(vb)
    if not np.array_equal(fa, fb) or not np.array_equal(va[~fa], vb[~fb], equal_nan=True):
        problems.append(f"/{name}: non-finite values differ")
        return float("inf")
    if va.size == 0:
        return 0.0
    scale = max(float(np.abs(va[fa]).max(initial=0)), float(np.abs(vb[fb]).max(initial=0)), atol)
    err = float(np.abs(va[fa] - vb[fb]).max(initial=0)) / scale
    if err > rtol:
        idx = np.unravel_index(int(np.argmax(np.where(fa, np.abs(va - vb), -1))), va.shape)
        problems.append(f"/{name}: relative error {err:.3e} > {rtol:g} (at {tuple(int(i) for i in idx)}: "
                        f"{va[idx]:.9g} vs {vb[idx]:.9g}, scale {scale:.3e})")
    return err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-30)
    args = ap.parse_args(argv)
    try:
        fa, fb = h5py.File(args.a, "r"), h5py.File(args.b, "r")
    except OSError as e:
        print(f"h5_compare: {e}", file=sys.stderr)
        return 2
    with fa, fb:
        oa, ob = collect(fa), collect(fb)
        problems = []
        for n in sorted(set(oa) ^ set(ob)):
            problems.append(f"/{n}: only in {'A' if n in oa else 'B'}")
        worst, worst_name, n_float = -1.0, None, 0
        for n in sorted(set(oa) & set(ob)):
            a, b = oa[n], ob[n]
            if isinstance(a, h5py.Dataset) != isinstance(b, h5py.Dataset):
                problems.append(f"/{n}: a dataset in one file, a group in the other")
                continue
            compare_attrs("/" if n == "/" else "/" + n, a, b, problems)
            if isinstance(a, h5py.Dataset):
                err = compare_dataset(n, a, b, args.rtol, args.atol, problems)
                if err is not None:
                    n_float += 1
                    if err > worst:
                        worst, worst_name = err, n
    for p in problems:
        print(f"  {p}")
    if worst == 0:
        print(f"h5_compare: all {n_float} float datasets bitwise equal")
    elif worst_name is not None:
        print(f"h5_compare: worst float tensor /{worst_name}: relative error {worst:.3e} "
              f"({n_float} float datasets, rtol {args.rtol:g})")
    print(f"h5_compare: {args.a} vs {args.b}: {'DIFFERENT' if problems else 'EQUAL'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
