#!/usr/bin/env python3
"""libmoerun.so exports the moe_* API and nothing else, the same moe_*
symbols libmoerun.a defines, under the soname the package declares.

usage: check_exports.py LIBMOERUN_SO LIBMOERUN_A SONAME"""
import subprocess
import sys


def symbols(args):
    out = subprocess.run(["nm", *args], check=True, capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        w = line.split()
        if len(w) == 3 and w[1] in "TDRBVWGSi":
            names.add(w[2].split("@")[0])
    return names


def main():
    so, ar, soname = sys.argv[1:4]
    problems = []
    dyn = symbols(["-D", "--defined-only", so])
    static = symbols(["-g", "--defined-only", ar])
    for s in sorted(x for x in dyn if not x.startswith("moe_")):
        problems.append(f"{so} exports {s}, which is not moe_*")
    api = {s for s in static if s.startswith("moe_")}
    for s in sorted(api - dyn):
        problems.append(f"{ar} defines {s}, which {so} does not export")
    for s in sorted(dyn - static):
        problems.append(f"{so} exports {s}, which {ar} does not define")
    dynamic = subprocess.run(["readelf", "-d", so], check=True, capture_output=True, text=True).stdout
    if f"Library soname: [{soname}]" not in dynamic:
        problems.append(f"{so}: soname is not {soname}")
    hidden = sorted(s for s in static if not s.startswith("moe_"))
    for p in problems:
        print(p)
    print(f"{len(dyn)} symbols exported, all moe_*; soname {soname}")
    if hidden:  # visible in the archive, local in the shared library
        print(f"note: {ar} also defines {len(hidden)} non-moe_ global(s): {' '.join(hidden)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
