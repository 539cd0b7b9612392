#!/usr/bin/env python3
"""The man pages say what --help says: `moe help --man-dir` writes moe.1
and one page per command that `moe --help` lists; groff renders each
without a warning; every option a command's --help names (--xyz) is in its
page, every key of `moe train --help` is in moe-train.1 with its default;
and the pages the build installs (BUILT_DIR) are these.

usage: check_man.py MOE OUT_DIR BUILT_DIR"""
import filecmp
import os
import re
import shutil
import subprocess
import sys


def run(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)}: exit {r.returncode}: {r.stderr}")
    return r.stdout


def commands(moe):
    """The words of every command in the 'commands:' list of moe --help."""
    text = run(moe, "--help")
    block = text.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    words = []
    for line in block.splitlines():
        head = re.split(r"\s{2,}", line.strip())[0].split()
        w = []
        for t in head:
            if not re.fullmatch(r"[a-z0-9]+", t):
                break
            w.append(t)
        words.append(w)
    return words


def main():
    moe, out, built = sys.argv[1:4]
    problems = []
    n_opts = n_keys = 0
    shutil.rmtree(out, ignore_errors=True)
    run(moe, "help", "--man-dir", out)
    cmds = commands(moe)
    pages = {"moe.1": []} | {"moe-" + "-".join(w) + ".1": w for w in cmds}
    found = set(os.listdir(out))
    for p in sorted(set(pages) - found):
        problems.append(f"no page {p} for a command that moe --help lists")
    for p in sorted(found - set(pages)):
        problems.append(f"page {p} for no command of moe --help")
    for page, w in sorted(pages.items()):
        path = os.path.join(out, page)
        if not os.path.exists(path):
            continue
        r = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8", path], capture_output=True, text=True)
        if r.returncode or r.stderr.strip():
            problems.append(f"{page}: groff: {r.stderr.strip() or 'exit %d' % r.returncode}")
        roff = open(path).read()
        help_text = run(moe, *w, "--help")
        for opt in sorted(set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", help_text))):
            n_opts += 1
            if "\\-\\-" + opt.replace("-", "\\-") not in roff:
                problems.append(f"{page}: --{opt} of 'moe {' '.join(w)} --help' is missing")
        if w == ["train"]:
            for key, default in re.findall(r"^  ([a-z_0-9]+)\s+(\S+)\s", help_text, re.M):
                n_keys += 1
                shown = default.replace("-", "\\-")  # "" (an empty path) is shown as is
                if f"\\fB{key}\\fR (default \\fI{shown}\\fR)" not in roff:
                    problems.append(f"{page}: key {key} (default {default}) is missing")
    if os.path.isdir(built):
        same = filecmp.dircmp(out, built)
        for p in same.left_only + same.right_only + same.diff_files:
            problems.append(f"{built}/{p}: not what moe help --man-dir writes now (stale build step?)")
    else:
        problems.append(f"{built}: the build wrote no man pages")
    for p in problems:
        print(p)
    print(f"{len(pages)} pages, {n_opts} options and {n_keys} training keys checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
