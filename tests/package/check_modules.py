#!/usr/bin/env python3
"""Holds src/ to its module graph (build/moerun-modules.txt, written by
cmake/moerunModules.cmake from the moe_add_module calls):

- every folder of src/ with C files is a declared module;
- every `#include "x/y.h"` of src/<m>/ names m itself or a module in m's
  DEPS, and every DEPS entry is included somewhere in m (DEPS are exactly
  the modules m uses; the build's include paths allow what DEPS reach);
- headers of src/ are included as "module/file.h" (relative to src/);
- no module includes a header named *_internal.h of another module;
- a module includes an external library's header (mpi.h, hdf5.h, cblas.h,
  ...) exactly when it lists that library in LIBS;
- docs/design.md's dependency table lists the same DEPS and LIBS.

usage: check_modules.py GRAPH SRC_DIR DESIGN_MD
Prints every violation with file and line; exit 1 if any."""
import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def read_graph(path):
    modules, external = {}, {}
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w or w[0].startswith("#"):
                continue
            if w[0] == "external":
                external[w[1]] = w[2]
            elif w[0] == "module":
                fields = dict(x.split("=", 1) for x in w[3:])
                modules[w[1]] = {
                    "dir": w[2],
                    "deps": set(filter(None, fields["deps"].split(","))),
                    "libs": set(filter(None, fields["libs"].split(","))),
                }
    return modules, external


def design_table(path):
    """Rows of the table whose header starts with | module | DEPS |."""
    rows, inside = {}, False
    with open(path) as f:
        for n, line in enumerate(f, 1):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not inside:
                inside = len(cells) >= 3 and cells[0] == "module" and cells[1].startswith("DEPS")
                continue
            if not line.startswith("|"):
                break
            if set(cells[0]) <= set("-: "):
                continue
            names = lambda c: set(re.findall(r"`([^`]+)`", c))
            rows[cells[0].strip("`")] = (names(cells[1]), names(cells[2]), n)
    return rows


def main():
    graph, src, design = sys.argv[1:4]
    modules, external = read_graph(graph)
    problems = []
    root = os.path.dirname(os.path.abspath(src))

    for d in sorted(os.listdir(src)):
        p = os.path.join(src, d)
        if os.path.isdir(p) and any(f.endswith((".c", ".h")) for f in os.listdir(p)) and d not in modules:
            problems.append(f"src/{d}: C files but no moe_add_module in src/{d}/CMakeLists.txt")

    for m, info in sorted(modules.items()):
        mdir = os.path.join(root, info["dir"])
        used, libs_used = set(), set()
        for name in sorted(os.listdir(mdir)):
            if not name.endswith((".c", ".h")):
                continue
            rel = f"{info['dir']}/{name}"
            with open(os.path.join(mdir, name), errors="replace") as f:
                for n, line in enumerate(f, 1):
                    hit = INCLUDE.match(line)
                    if not hit:
                        continue
                    kind, path = hit.groups()
                    where = f"{rel}:{n}"
                    if kind == "<":
                        if path in external:
                            libs_used.add(external[path])
                            if external[path] not in info["libs"]:
                                problems.append(f"{where}: includes <{path}> but LIBS of module {m} lacks "
                                                f"{external[path]}")
                        continue
                    if "/" not in path:
                        # a generated header (build tree) has no module; a file of src/ does
                        if os.path.exists(os.path.join(mdir, path)):
                            problems.append(f'{where}: #include "{path}": spell it "{m}/{path}" '
                                            f"(relative to src/)")
                        continue
                    target = path.split("/", 1)[0]
                    if target != m:
                        used.add(target)
                    if target not in modules:
                        problems.append(f'{where}: #include "{path}": no module {target}')
                    elif target != m and target not in info["deps"]:
                        problems.append(f'{where}: #include "{path}": module {m} may not use {target} '
                                        f"(DEPS: {' '.join(sorted(info['deps'])) or 'none'}); add it to DEPS "
                                        f"if that keeps the graph acyclic, or move the code")
                    if target != m and path.endswith("_internal.h"):
                        problems.append(f'{where}: #include "{path}": another module\'s internal header')
        for d in sorted(info["deps"] - used):
            problems.append(f"{info['dir']}/CMakeLists.txt: DEPS of {m} names {d}, which no file of {m} includes")
        for lib in sorted(info["libs"] - libs_used):
            if lib in external.values():
                problems.append(f"{info['dir']}/CMakeLists.txt: LIBS of {m} names {lib}, whose header no file "
                                f"of {m} includes")

    rows = design_table(design)
    if not rows:
        problems.append(f"{design}: no table with the header '| module | DEPS ... | LIBS ... |'")
    for m, info in sorted(modules.items()):
        if m not in rows:
            problems.append(f"{design}: the dependency table has no row for module {m}")
            continue
        deps, libs, n = rows[m]
        if deps != info["deps"]:
            problems.append(f"{design}:{n}: {m} DEPS {sorted(deps)}, CMake says {sorted(info['deps'])}")
        if libs != info["libs"]:
            problems.append(f"{design}:{n}: {m} LIBS {sorted(libs)}, CMake says {sorted(info['libs'])}")
    for m in sorted(set(rows) - set(modules)):
        problems.append(f"{design}:{rows[m][2]}: the dependency table lists {m}, which is not a module")

    for p in problems:
        print(p)
    print(f"{len(modules)} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
