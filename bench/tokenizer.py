#!/usr/bin/env python3
"""Tokenizer benchmark: moe against OpenAI's tiktoken (the npm package, a
WASM build of the original Rust code, run by node) on the same text.

    bench/tokenizer.py [ROUNDS] [MB]        (default 3 rounds, ~8 MB of text)

Text: licences, man pages (English and other languages), fortunes, Debian
docs, this repository's sources, concatenated up to MB megabytes (valid
UTF-8 lines only). For each published encoder, ROUNDS interleaved rounds
(moe, then tiktoken, each in a fresh process) and the median:

- encode: single thread. moe times moe_tok_encode inside the process, after
  loading the tokenizer and faulting the input in (its piece cache starts
  cold); tiktoken times encode_ordinary inside node after one untimed call
  on the same text (warm WASM), so neither side counts start-up, loading or
  node's compilation;
- decode of the same ids: moe_tok_decode vs tiktoken's decode, timed alike.

Then: o200k_base load time and peak RSS (`moe tokenizer info`), `moe data
encode` on 1 and 2 ranks and on 1 rank x 2 threads (encode phase, MB/s and
speed-up over 1), and `moe tokenizer train` (vocab 8192, gpt2 pattern) MB/s.
Needs build/src/cli/moe and build-deps/node (launch/install-deps)."""
import glob
import gzip
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.path.join(ROOT, "build", "src", "cli", "moe")
TKDIR = os.path.join(ROOT, "build-deps", "node", "node_modules", "tiktoken")
REF = os.path.join(ROOT, "tests", "tokenizer", "tiktoken_ref.cjs")
ENCODERS = ["gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base"]
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
MB = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0


def run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stdout, r.stderr


def corpus(path):
    chunks = []
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(f):
            chunks.append(open(f, "rb").read())
    for d in ["man1", "man3", "man8", "de/man1", "fr/man1", "ja/man1", "ru/man1", "zh_CN/man1", "ko/man1",
              "pl/man1"]:
        for f in sorted(glob.glob(f"/usr/share/man/{d}/*.gz"))[:150]:
            try:
                chunks.append(gzip.open(f).read())
            except OSError:
                pass
    for f in sorted(glob.glob("/usr/share/games/fortunes/*.u8")):
        chunks.append(open(f, "rb").read())
    for f in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz"))[:400]:
        chunks.append(gzip.open(f).read())
    for f in sorted(glob.glob(f"{ROOT}/src/*/*.[ch]") + glob.glob(f"{ROOT}/docs/*.md")):
        chunks.append(open(f, "rb").read())
    text = b"".join(chunks).decode("utf-8", errors="replace")
    text = "\n".join(l for l in text.split("\n") if "\ufffd" not in l)
    data = text.encode()
    limit = int(MB * 1e6)
    while len(data) < limit:
        data += data
    data = data[:limit]
    data = data[:len(data.decode("utf-8", errors="ignore").encode())]
    open(path, "wb").write(data)
    return len(data)


def moe_encode(tok, text, out):
    _, err = run([MOE, "tokenizer", "encode", "--tokenizer", tok, "--in", text, "--out", out, "--format", "u32",
                  "--stats"])
    m = re.search(r"encode (\S+) s, (\S+) MB/s", err)
    return float(m.group(2))


def moe_decode(tok, ids):
    _, err = run([MOE, "tokenizer", "decode", "--tokenizer", tok, "--in", ids, "--format", "u32", "--out", "/dev/null",
                  "--stats"])
    m = re.search(r"decode (\S+) s, (\S+) MB/s", err)
    return float(m.group(2))


def node_bench(enc_json, text):
    env = dict(os.environ, MOE_TIKTOKEN_DIR=TKDIR)
    out, _ = run(["node", REF, "bench", enc_json, text, "2"], env=env)
    last = out.strip().split("\n")[-1].split()  # the second (warm) call
    f = dict(zip(last[0::2], last[1::2]))
    b = float(f["bytes"])
    return b / float(f["encode"]) / 1e6, b / float(f["decode"]) / 1e6


def main():
    if not os.path.exists(MOE) or not os.path.isdir(TKDIR):
        sys.exit("build moe (launch/build) and install the tiktoken package (launch/install-deps) first")
    work = tempfile.mkdtemp(prefix="moe_tok_bench_")
    text = os.path.join(work, "text.txt")
    n = corpus(text)
    print(f"text: {n / 1e6:.2f} MB of licences, man pages (8 languages), fortunes, Debian changelogs, sources")
    print(f"{ROUNDS} interleaved rounds per encoder, median; single thread; times inside each process "
          "(moe: after load, piece cache cold; tiktoken: warm, second call)\n")
    print(f"{'encoder':<12} {'moe enc MB/s':>13} {'tiktoken':>9} {'ratio':>6}   {'moe dec MB/s':>13} {'tiktoken':>9} "
          f"{'ratio':>6}")
    for enc in ENCODERS:
        src = os.path.join(TKDIR, "encoders", f"{enc}.json")
        tok = os.path.join(work, f"{enc}.json")
        run([MOE, "tokenizer", "import", "--from", src, "--out", tok])
        ids = os.path.join(work, f"{enc}.u32")
        me, md, ne, nd = [], [], [], []
        for _ in range(ROUNDS):
            me.append(moe_encode(tok, text, ids))
            md.append(moe_decode(tok, ids))
            e, d = node_bench(src, text)
            ne.append(e)
            nd.append(d)
        me, md, ne, nd = (statistics.median(x) for x in (me, md, ne, nd))
        print(f"{enc:<12} {me:13.2f} {ne:9.2f} {me / ne:5.2f}x   {md:13.1f} {nd:9.1f} {md / nd:5.2f}x")

    tok = os.path.join(work, "o200k_base.json")
    loads, rss = [], []
    for _ in range(ROUNDS):
        out, _ = run([MOE, "tokenizer", "info", "--tokenizer", tok])
        m = re.search(r"loaded in (\S+) s, peak RSS (\S+) MB", out)
        loads.append(float(m.group(1)))
        rss.append(float(m.group(2)))
    print(f"\no200k_base load: {statistics.median(loads):.3f} s, peak RSS of the whole process "
          f"{statistics.median(rss):.1f} MB (median of {ROUNDS})")

    mpi = ["mpiexec", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    tok = os.path.join(work, "cl100k_base.json")
    print(f"\nmoe data encode (cl100k_base, {n / 1e6:.1f} MB; encode phase incl. split planning and checks; "
          f"{max(ROUNDS, 5)} interleaved rounds, median). 'work split': CPU seconds of all parts over the longest "
          "a rank needs for its share, the speed-up the split allows on free cores, whatever else runs here:")
    runs = {"1 rank x 1 thread": ([MOE], "1"), "1 rank x 2 threads": ([MOE], "2"),
            "2 ranks x 1 thread": (mpi + ["-np", "2", MOE], "1")}
    vals = {k: [] for k in runs}
    split = {k: [] for k in runs}
    for _ in range(max(ROUNDS, 5)):
        for label, (cmd, th) in runs.items():
            out, _ = run(cmd + ["data", "encode", "--tokenizer", tok, "--data", text, "--out",
                                os.path.join(work, "c.tok"), "--threads", th])
            vals[label].append(float(re.search(r"encode \S+ s \((\S+) MB/s\)", out).group(1)))
            split[label].append(float(re.search(r"work split (\S+)x", out).group(1)))
    base = statistics.median(vals["1 rank x 1 thread"])
    for label in runs:
        v = statistics.median(vals[label])
        print(f"  {label:<20} {v:7.2f} MB/s  {v / base:.2f}x   work split {statistics.median(split[label]):.2f}x")
    load = open("/proc/loadavg").read().split()[0]
    print(f"  (load average {load} on {os.cpu_count()} cores at the end: other jobs share this machine)")

    train_in = os.path.join(work, "train.txt")
    with open(text, "rb") as f, open(train_in, "wb") as g:
        g.write(f.read(int(min(n, 4e6))))
    vals = []
    for _ in range(ROUNDS):
        out, _ = run([MOE, "tokenizer", "train", "--data", train_in, "--vocab-size", "8192", "--out",
                      os.path.join(work, "trained.json")])
        vals.append(re.search(r"time (\S+) s \(piece counting (\S+) s, (\S+) MB/s; merges (\S+) s\); (\S+) MB/s",
                              out).groups())
    mid = sorted(vals, key=lambda v: float(v[0]))[len(vals) // 2]
    print(f"\nmoe tokenizer train (gpt2 pattern, vocab 8192, {min(n, 4e6) / 1e6:.1f} MB, 1 thread): "
          f"{mid[0]} s = {mid[4]} MB/s (piece counting {mid[2]} MB/s, merge loop {mid[3]} s)")


main()
