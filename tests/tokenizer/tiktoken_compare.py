#!/usr/bin/env python3
"""Holds `moe tokenizer encode` to OpenAI's tiktoken (the npm package, run
with node) on varied real text and generated edge cases, for one encoder.

    tiktoken_compare.py MOE TIKTOKEN_DIR ENCODER WORKDIR

Imports tiktoken's own encoder file (TIKTOKEN_DIR/encoders/ENCODER.json)
with `moe tokenizer import`, encodes every corpus with both, and compares
the ids; also checks that `moe tokenizer decode` gives the bytes back, and
that invalid UTF-8 follows moerun's rule (each maximal invalid run is its
own piece; the valid text around it encodes as its own subject). Exits 1
naming the corpus and the first differing id on any difference."""
import glob
import gzip
import os
import random
import shutil
import subprocess
import sys
import unicodedata

MOE, TKDIR, ENC, WORK = sys.argv[1:5]
HERE = os.path.dirname(os.path.abspath(__file__))
os.makedirs(WORK, exist_ok=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        sys.stderr.write(f"FAILED ({r.returncode}): {' '.join(cmd)}\n{r.stderr.decode(errors='replace')}\n")
        sys.exit(1)
    return r.stdout


def real_text():
    """Text found on a Debian system: licences, man pages (several languages),
    fortunes, documentation, this repository's source."""
    out = {}
    lic = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(f))
    out["licences"] = lic
    man = []
    for lang in ["man1", "ja/man1", "ru/man1", "zh_CN/man1", "ko/man1", "de/man1", "fr/man1", "pl/man1", "uk/man1"]:
        for f in sorted(glob.glob(f"/usr/share/man/{lang}/*.gz"))[:40]:
            try:
                man.append(gzip.open(f).read())
            except OSError:
                pass
    out["man pages"] = b"".join(man)
    out["fortunes"] = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/games/fortunes/*"))
                               if os.path.isfile(f) and not f.endswith(".dat"))[:3 << 20]
    docs = []
    for f in sorted(glob.glob("/usr/share/doc/*/README*") + glob.glob("/usr/share/doc/*/changelog.Debian.gz"))[:300]:
        try:
            docs.append(gzip.open(f).read() if f.endswith(".gz") else open(f, "rb").read())
        except OSError:
            pass
    out["docs"] = b"".join(docs)[:3 << 20]
    src = []
    root = os.path.dirname(os.path.dirname(HERE))
    for f in sorted(glob.glob(f"{root}/src/*/*.[ch]") + glob.glob(f"{root}/docs/*.md") + glob.glob(f"{root}/tests/*/*.py")):
        src.append(open(f, "rb").read())
    out["source"] = b"".join(src)
    # keep valid UTF-8 only (man pages in legacy encodings are dropped by line)
    for k, v in out.items():
        out[k] = "\n".join(l for l in v.decode("utf-8", errors="replace").split("\n") if "\ufffd" not in l).encode()
    return out


def scripts_text(rng):
    """Non-Latin scripts, emoji (with joiners, modifiers, flags), marks."""
    ranges = [(0x0400, 0x04FF), (0x0370, 0x03FF), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
              (0x0E00, 0x0E7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x0300, 0x036F), (0x2000, 0x206F), (0xFF00, 0xFFEF), (0x10A0, 0x10FF), (0x1200, 0x137F)]
    out = []
    for _ in range(20000):
        lo, hi = rng.choice(ranges)
        word = "".join(c for c in (chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))) if assigned(ord(c)))
        out.append(word)
        out.append(rng.choice([" ", " ", "  ", "\n", ", ", ". ", "\u200d", "\u00a0", "'s ", "\t", " 123 "]))
    emoji = ["👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "😀", "1️⃣", "🧑🏿‍🚀"]
    out += [rng.choice(emoji) + rng.choice([" ", "", "\n"]) for _ in range(3000)]
    return "".join(out).encode("utf-8", errors="surrogatepass")


def edge_cases(rng):
    """Whitespace runs, numbers, contractions, case, long runs (the heap
    merge), mixed punctuation."""
    parts = []
    atoms = [" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u00a0", "\u3000", "\u180e", "\u2028",
             "'s", "'S", "'ll", "'LL", "'ve", "'re", "'d", "'m", "'t", "ſ", "\u212a",
             "123", "4567", "89012345", "3.14159", "1,000,000", "٣٤٥", "Ⅻ", "½",
             "Hello", "hello", "HELLO", "hElLo", "don't", "I'M", "it's", "CamelCaseWord",
             "!!!", "...", "?!", "--", "//", "/*", "*/", "{}", "()", "<|endoftext|>", "@#$%^&*",
             "é", "e\u0301", "ﬁ", "ß", "İ", "ǅ", "Σς", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001F600", "\x00", "\x1b[0m", "\x7f", "\u200b", "\ufeff"]
    for _ in range(40000):
        parts.append(rng.choice(atoms))
    s = "".join(parts)
    runs = [" " * 5000, "\n" * 3000, "a" * 4000, "1" * 4000, "!" * 3000, " \t" * 1500, "ab" * 2500,
            "\u00e9" * 2000, "🎉" * 1000, " " * 700 + "x", "\n \n" * 900]
    return (s + "".join(runs)).encode()


def assigned(cp):
    """Assigned in Unicode 14.0, the version of Debian 12's PCRE2 (10.42) and
    of this Python: characters added later (CJK extension H, Kaktovik
    numerals, ...) are letters or numbers to tiktoken's newer tables but
    unassigned to PCRE2's (docs/spec-notes.md)."""
    return unicodedata.category(chr(cp)) != "Cn"


def all_code_points():
    """Every Unicode scalar value assigned in Unicode 14, in short runs
    between separators, so that each character's classes (letter, number,
    mark, space) are tested."""
    out = []
    for cp in range(0x20, 0x110000):
        if 0xD800 <= cp <= 0xDFFF or not assigned(cp):
            continue
        c = chr(cp)
        out.append(c)
        out.append(c + c + " " if cp % 3 == 0 else (" " if cp % 3 == 1 else "x" + c + "1 "))
        if cp % 64 == 0:
            out.append("\n")
    return "".join(out).encode()


def random_bytes_valid(rng, n):
    """Random valid UTF-8 of mixed widths."""
    cps = []
    for _ in range(n):
        k = rng.random()
        cp = rng.randint(0x20, 0x7E) if k < 0.6 else rng.randint(0x80, 0x7FF) if k < 0.75 else \
            rng.randint(0x800, 0xFFFF) if k < 0.9 else rng.randint(0x10000, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF or not assigned(cp):
            cp = 0x41
        cps.append(chr(cp))
    return "".join(cps).encode()


def main():
    if not os.path.isfile(os.path.join(TKDIR, "encoders", f"{ENC}.json")):
        print(f"FAILED: the npm package tiktoken is not installed at {TKDIR} (launch/install-deps installs it)")
        sys.exit(1)
    if not shutil.which("node"):
        print("FAILED: node is not installed (launch/install-deps installs it)")
        sys.exit(1)
    rng = random.Random(1234)
    corpora = real_text()
    corpora["scripts and emoji"] = scripts_text(rng)
    corpora["edge cases"] = edge_cases(rng)
    corpora["random UTF-8"] = random_bytes_valid(rng, 200000)
    # the filter of assigned characters is Python's Unicode version: it must
    # be the one PCRE2's tables have
    tok0 = os.path.join(WORK, "probe.json")
    run([MOE, "tokenizer", "import", "--from", os.path.join(TKDIR, "encoders", "gpt2.json"), "--out", tok0])
    info = run([MOE, "tokenizer", "info", "--tokenizer", tok0]).decode()
    uni = info.split("(Unicode ")[1].split(")")[0]
    if uni != unicodedata.unidata_version:
        print(f"FAILED: PCRE2 has Unicode {uni}, this Python {unicodedata.unidata_version}: the character filter "
              "would be wrong")
        sys.exit(1)
    if ENC in ("cl100k_base", "o200k_base", "gpt2"):
        corpora["all code points"] = all_code_points()
    total = sum(len(v) for v in corpora.values())
    if corpora["licences"] == b"" or total < (2 << 20):
        sys.stderr.write(f"too little text to compare ({total} bytes): are common-licenses and man pages there?\n")
        sys.exit(1)

    tok = os.path.join(WORK, f"{ENC}.json")
    run([MOE, "tokenizer", "import", "--from", os.path.join(TKDIR, "encoders", f"{ENC}.json"), "--out", tok])
    names = sorted(corpora)
    ref_args = []
    for i, k in enumerate(names):
        p = os.path.join(WORK, f"c{i}.txt")
        open(p, "wb").write(corpora[k])
        ref_args += [p, p + ".ref"]
    env = dict(os.environ, MOE_TIKTOKEN_DIR=TKDIR)
    run(["node", os.path.join(HERE, "tiktoken_ref.cjs"), "encode", os.path.join(TKDIR, "encoders", f"{ENC}.json")]
        + ref_args, env=env)
    bad = 0
    for i, k in enumerate(names):
        p = os.path.join(WORK, f"c{i}.txt")
        run([MOE, "tokenizer", "encode", "--tokenizer", tok, "--in", p, "--out", p + ".moe", "--format", "u32"])
        ref, got = open(p + ".ref", "rb").read(), open(p + ".moe", "rb").read()
        n = len(ref) // 4
        if ref != got:
            bad += 1
            j = next((j for j in range(0, min(len(ref), len(got)), 4) if ref[j:j + 4] != got[j:j + 4]), min(len(ref), len(got)))
            r = [int.from_bytes(ref[x:x + 4], "little") for x in range(max(0, j - 12), min(len(ref), j + 20), 4)]
            g = [int.from_bytes(got[x:x + 4], "little") for x in range(max(0, j - 12), min(len(got), j + 20), 4)]
            print(f"MISMATCH {ENC} on {k}: first difference at id {j // 4} of {n} (moe has {len(got) // 4})\n"
                  f"  tiktoken: {r}\n  moe:      {g}")
            continue
        back = run([MOE, "tokenizer", "decode", "--tokenizer", tok, "--in", p + ".moe", "--format", "u32"])
        if back != corpora[k]:
            bad += 1
            print(f"ROUND TRIP {ENC} on {k}: decode gives {len(back)} bytes, not the {len(corpora[k])} encoded")
            continue
        print(f"ok {ENC} {k}: {len(corpora[k])} bytes, {n} ids equal to tiktoken's, decode round trip exact")

    # invalid UTF-8: the valid segments encode as their own subjects (tiktoken
    # on each), every maximal invalid run is one piece (moe's encode of it
    # alone, the same tokenizer's BPE of those bytes), and bytes round-trip
    segs = [b"Hello wor", b"\xff", b"ld  and  ", b"\xc3", b"(\xe2\x82 more", b"\xed\xa0\x80", b"\n\n  x ",
            b"\xf4\x90\x80\x80", b"\xc0\xaf", b"end", b"\x80\x80\x80", b"  "]
    data = b"".join(segs)
    p = os.path.join(WORK, "invalid.bin")
    open(p, "wb").write(data)
    got = run([MOE, "tokenizer", "encode", "--tokenizer", tok, "--in", p, "--format", "text"]).split()
    # expected: maximal valid / invalid runs, with Python's strict decoder
    # deciding where a well-formed sequence starts
    def seq_len(i):
        for k in range(1, 5):
            try:
                if len(data[i:i + k].decode("utf-8")) == 1:
                    return k
            except UnicodeDecodeError:
                pass
        return 0
    pieces, i = [], 0
    while i < len(data):
        valid, j = seq_len(i) > 0, i
        while j < len(data) and (seq_len(j) > 0) == valid:
            j += seq_len(j) if valid else 1
        pieces.append((valid, data[i:j]))
        i = j
    want = []
    for valid, b in pieces:
        q = os.path.join(WORK, "seg.bin")
        open(q, "wb").write(b)
        if valid:
            run(["node", os.path.join(HERE, "tiktoken_ref.cjs"), "encode", os.path.join(TKDIR, "encoders", f"{ENC}.json"),
                 q, q + ".ref"], env=env)
            r = open(q + ".ref", "rb").read()
            want += [int.from_bytes(r[x:x + 4], "little") for x in range(0, len(r), 4)]
        else:
            want += [int(x) for x in run([MOE, "tokenizer", "encode", "--tokenizer", tok, "--in", q]).split()]
    got = [int(x) for x in got]
    if got != want:
        bad += 1
        print(f"INVALID UTF-8 {ENC}: ids {got}\n  expected {want}\n  pieces {pieces}")
    else:
        back = run([MOE, "tokenizer", "decode", "--tokenizer", tok], input=" ".join(map(str, got)).encode())
        if back != data:
            bad += 1
            print(f"INVALID UTF-8 {ENC}: decode does not give the bytes back")
        else:
            print(f"ok {ENC} invalid UTF-8: {len(pieces)} segments, ids as specified, bytes round-trip")
    print(f"{len(names) + 1 - bad} passed, {bad} failed")
    sys.exit(1 if bad else 0)


main()
