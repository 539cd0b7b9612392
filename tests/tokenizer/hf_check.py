#!/usr/bin/env python3
"""Holds `moe tokenizer export --form hf` to the Hugging Face algorithm.

    hf_check.py MOE TIKTOKEN_DIR WORKDIR

For tokenizers trained by moe (three patterns) and for gpt2 and cl100k_base
(imported from the tiktoken package), exports tokenizer.json and encodes
real text with an independent implementation of what HF `tokenizers` does
with that file: the Split pre-tokenizer (matches and the text between them
as pieces, Python's `regex` module), the byte-level alphabet, then per piece
the vocab entry when the whole piece is one (ignore_merges) or else the
merge list applied lowest merge index first, leftmost on ties. The ids
must equal `moe tokenizer encode` (tiktoken's rank algorithm); importing
the exported file must give the same tokenizer back."""
import glob
import json
import os
import subprocess
import sys

import regex

MOE, TKDIR, WORK = sys.argv[1:4]
os.makedirs(WORK, exist_ok=True)


def run(cmd, data=None):
    r = subprocess.run(cmd, input=data, capture_output=True)
    if r.returncode:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{r.stderr.decode(errors='replace')}")
    return r.stdout


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class HFReference:
    def __init__(self, path):
        tj = json.load(open(path, encoding="utf-8"))
        m = tj["model"]
        assert m["type"] == "BPE" and tj["normalizer"] is None
        self.vocab = m["vocab"]
        self.ignore_merges = m.get("ignore_merges", False)
        self.rank = {}
        for i, mg in enumerate(m["merges"]):
            a, b = mg.split(" ") if isinstance(mg, str) else mg
            self.rank[(a, b)] = i
        pre = tj["pre_tokenizer"]
        split = pre["pretokenizers"][0] if pre["type"] == "Sequence" else pre
        assert split["type"] == "Split" and split["behavior"] == "Isolated" and not split["invert"]
        self.re = regex.compile(split["pattern"]["Regex"])
        self.b2u = bytes_to_unicode()
        self.cache = {}

    def pieces(self, text):
        pos = 0
        for mt in self.re.finditer(text):
            if mt.start() > pos:
                yield text[pos:mt.start()]
            yield mt.group()
            pos = mt.end()
        if pos < len(text):
            yield text[pos:]

    def bpe(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        syms = list(word)
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                r = self.rank.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return [self.vocab[s] for s in syms]

    def encode(self, text):
        ids = []
        for p in self.pieces(text):
            w = "".join(self.b2u[b] for b in p.encode("utf-8"))
            if w not in self.cache:
                self.cache[w] = self.bpe(w)
            ids += self.cache[w]
        return ids


def texts():
    lic = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(f))
    fort = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/games/fortunes/*.u8")))[:600000]
    extra = ("Hello world!  It's 2024: numbers 1234567, café, naïve, 日本語のテキスト, Привет мир, "
             "emoji 🎉👍🏽, tabs\t\tand\n\n\nnewlines   trailing   \n").encode() * 50
    out = []
    for t in (lic, fort, extra):
        s = t.decode("utf-8", errors="replace")
        # keep lines without replacement characters or ASCII separators, whose
        # \s differs between Python's regex and tiktoken's
        out.append("\n".join(l for l in s.split("\n") if "\ufffd" not in l and not any(0x1c <= ord(c) <= 0x1f for c in l)))
    return out


def main():
    toks = []
    corpus = os.path.join(WORK, "train.txt")
    open(corpus, "w", encoding="utf-8").write("\n".join(texts()))
    for pat in ("gpt2", "cl100k_base", "o200k_base"):
        t = os.path.join(WORK, f"trained_{pat}.json")
        run([MOE, "tokenizer", "train", "--data", corpus, "--vocab-size", "3000", "--pattern", pat,
             "--special", "<|endoftext|>", "--out", t])
        toks.append((f"trained {pat}", t))
    for enc in ("gpt2", "cl100k_base"):
        src = os.path.join(TKDIR, "encoders", f"{enc}.json")
        if not os.path.exists(src):
            sys.exit(f"FAILED: {src} is missing: install the npm package tiktoken (launch/install-deps)")
        t = os.path.join(WORK, f"{enc}.json")
        run([MOE, "tokenizer", "import", "--from", src, "--out", t])
        toks.append((enc, t))
    failed = 0
    for name, t in toks:
        hf = t + ".hf.json"
        run([MOE, "tokenizer", "export", "--tokenizer", t, "--form", "hf", "--out", hf])
        ref = HFReference(hf)
        n = 0
        for text in texts():
            want = ref.encode(text)
            got = [int(x) for x in run([MOE, "tokenizer", "encode", "--tokenizer", t], text.encode()).split()]
            n += len(got)
            if got != want:
                j = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
                print(f"MISMATCH {name}: HF reference and moe differ at id {j}: {want[j:j + 8]} vs {got[j:j + 8]}")
                failed += 1
                break
        back = os.path.join(WORK, "back.json")
        run([MOE, "tokenizer", "import", "--from", hf, "--out", back])
        i1 = run([MOE, "tokenizer", "info", "--tokenizer", t]).split(b"\n")[1]
        i2 = run([MOE, "tokenizer", "info", "--tokenizer", back]).split(b"\n")[1]
        if i1 != i2:
            print(f"MISMATCH {name}: import(export) gives {i2!r}, not {i1!r}")
            failed += 1
        else:
            print(f"ok {name}: {n} ids of the HF merge-list algorithm on the exported tokenizer.json; round trip")
    print(f"{len(toks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


main()
