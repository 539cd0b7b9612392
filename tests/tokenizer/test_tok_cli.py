#!/usr/bin/env python3
"""End-to-end tests of `moe tokenizer` and `moe data encode`.

    test_tok_cli.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- CASE

CASE:
  commands      train, import/export in three forms, encode/decode through
                files and pipes in every id format, info, document separators
  encode_ranks  `moe data encode` on 1-2 ranks x 1-3 threads gives exactly the
                ids of `moe tokenizer encode` (one thread), for the five
                published patterns and several corpora, with and without
                document separators
  train_ranks   `moe tokenizer train` writes the same file on 1-2 ranks x 1-2 threads
  bad_input     malformed tokenizers, token files, ids and options: a message
                naming the problem on every rank, non-zero exit, no hang
Every launch has a timeout (a hang fails)."""
import glob
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

TIMEOUT = 120


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Cli:
    def __init__(self, argv):
        i = argv.index("--")
        argv, self.args = argv[:i], argv[i + 1:]
        self.moe = os.path.realpath(argv[0])
        self.work = os.path.abspath(argv[1])
        self.mpiexec, self.np_flag, self.mpi_flags = argv[2], argv[3], argv[4:]
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        # a session directory of our own: concurrent mpiexec launches (ctest -j,
        # other suites) race creating the shared one under /tmp
        self.ompi_tmp = tempfile.mkdtemp(prefix="moe_tok_ompi_")

    def path(self, *p):
        return os.path.join(self.work, *p)

    def run(self, cmd, expect="ok", stdin=None, timeout=TIMEOUT):
        env = dict(os.environ, OMPI_MCA_orte_tmpdir_base=self.ompi_tmp)
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=self.work, start_new_session=True, env=env)
        try:
            out, err = p.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise Failure(f"no exit within {timeout} s (hang?): {' '.join(cmd)}")
        err_t = err.decode(errors="replace")
        if expect == "ok" and p.returncode != 0:
            raise Failure(f"exit {p.returncode}: {' '.join(cmd)}\n{err_t[-3000:]}")
        if expect == "fail":
            check(p.returncode > 0, f"expected a failure (exit > 0, not a signal), got {p.returncode}: "
                                    f"{' '.join(cmd)}\n{out[-500:]!r}")
        return out, err_t

    def moe_(self, *args, **kw):
        return self.run([self.moe, *args], **kw)

    def mpi(self, np_, *args, **kw):
        return self.run([self.mpiexec, self.np_flag, str(np_), *self.mpi_flags, self.moe, *args], **kw)


def corpora(cli):
    """Licences, man pages, fortunes (as installed), a generated text without
    newlines, and one with invalid UTF-8, CRLF and long runs."""
    out = {}
    lic = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(f))
    out["licences"] = lic[:600000]
    fort = b"".join(open(f, "rb").read() for f in sorted(glob.glob("/usr/share/games/fortunes/*.u8")))
    out["fortunes"] = fort[:600000]
    rng = random.Random(5)
    words = ["alpha", "beta", "Gamma", "δέλτα", "日本語", "123", "4.5", "don't", "x's", "!!", "--", "🎉"]
    out["one line"] = " ".join(rng.choice(words) for _ in range(60000)).encode()
    parts = []
    for _ in range(20000):
        r = rng.random()
        parts.append(rng.choice([b"word ", b"\r\n", b"  ", b"\xff", b"\xc3(", b"\n\n", b"x" * 200, b" " * 90,
                                 "é".encode(), b"1234567", b"\t"]) if r < 0.5 else rng.choice(words).encode() + b" ")
    out["invalid utf-8"] = b"".join(parts)
    for k, v in out.items():
        check(len(v) > 50000, f"corpus {k} has only {len(v)} bytes")
    paths = {}
    for i, (k, v) in enumerate(sorted(out.items())):
        p = cli.path(f"corpus{i}.txt")
        open(p, "wb").write(v)
        paths[k] = p
    return paths


def train(cli, pattern, out, vocab=800, extra=()):
    data = cli.path("train.txt")
    if not os.path.exists(data):
        with open(data, "wb") as f:
            for p in sorted(glob.glob(cli.path("corpus*.txt"))):
                f.write(open(p, "rb").read())
    cli.moe_("tokenizer", "train", "--data", data, "--vocab-size", str(vocab), "--pattern", pattern,
             "--special", "<|endoftext|>", "--special", "<|sep|>", "--out", out, *extra)
    return out


def u32(b):
    return list(struct.unpack(f"<{len(b) // 4}I", b))


def read_tok(path):
    d = open(path, "rb").read()
    check(d[:8] == b"MOETOK01", f"{path}: magic {d[:8]!r}")
    version, bpt, n, vocab, flags, h = struct.unpack("<IIQIIQ", d[8:40])
    check(version == 1 and flags == 0 and d[40:64] == bytes(24), f"{path}: header {d[:64]!r}")
    check(len(d) == 64 + n * bpt, f"{path}: {len(d)} bytes for {n} tokens of {bpt}")
    fmt = "<%d%s" % (n, "H" if bpt == 2 else "I")
    return list(struct.unpack(fmt, d[64:])), vocab, h


def case_commands(cli):
    paths = corpora(cli)
    tok = train(cli, "cl100k_base", cli.path("t.json"), vocab=1200)
    out, _ = cli.moe_("tokenizer", "info", "--tokenizer", tok)
    check(b"vocab_size 1200, ranks 1198" in out, f"info: {out[:300]!r}")
    text = open(paths["licences"], "rb").read()
    # text ids through pipes, binary ids through files, all the same ids
    ids_text, _ = cli.moe_("tokenizer", "encode", "--tokenizer", tok, stdin=text)
    ids = [int(x) for x in ids_text.split()]
    cli.moe_("tokenizer", "encode", "--tokenizer", tok, "--in", paths["licences"], "--out", cli.path("a.u32"),
             "--format", "u32")
    cli.moe_("tokenizer", "encode", "--tokenizer", tok, "--in", paths["licences"], "--out", cli.path("a.u16"),
             "--format", "u16")
    check(u32(open(cli.path("a.u32"), "rb").read()) == ids, "u32 ids differ from text ids")
    d16 = open(cli.path("a.u16"), "rb").read()
    check(list(struct.unpack(f"<{len(d16) // 2}H", d16)) == ids, "u16 ids differ from text ids")
    for fmt, src in (("text", None), ("u32", cli.path("a.u32")), ("u16", cli.path("a.u16"))):
        if src:
            back, _ = cli.moe_("tokenizer", "decode", "--tokenizer", tok, "--in", src, "--format", fmt)
        else:
            back, _ = cli.moe_("tokenizer", "decode", "--tokenizer", tok, stdin=ids_text)
        check(back == text, f"decode --format {fmt} does not give the text back")
    # three forms, back again: same hash and the same ids
    _, _ = cli.moe_("tokenizer", "export", "--tokenizer", tok, "--form", "hf", "--out", cli.path("t.hf.json"))
    _, _ = cli.moe_("tokenizer", "export", "--tokenizer", tok, "--form", "tiktoken", "--out", cli.path("t.tiktoken"))
    _, _ = cli.moe_("tokenizer", "export", "--tokenizer", tok, "--form", "tiktoken-json", "--out", cli.path("t2.json"))
    info = cli.moe_("tokenizer", "info", "--tokenizer", tok)[0].split(b"\n")[1]
    cli.moe_("tokenizer", "import", "--from", cli.path("t.hf.json"), "--out", cli.path("from_hf.json"))
    cli.moe_("tokenizer", "import", "--from", cli.path("t.tiktoken"), "--pattern", "cl100k_base",
             "--special", "<|endoftext|>=1198", "--special", "<|sep|>=1199", "--out", cli.path("from_tt.json"))
    for f in ("from_hf.json", "from_tt.json", "t2.json", "t.hf.json"):
        got = cli.moe_("tokenizer", "info", "--tokenizer", cli.path(f))[0].split(b"\n")[1]
        check(got == info, f"{f}: {got!r} != {info!r}")
        e, _ = cli.moe_("tokenizer", "encode", "--tokenizer", cli.path(f), stdin=text)
        check(e == ids_text, f"{f} encodes differently")
    # document separators: <|endoftext|> lines (the default delimiter) and blank lines
    docs = [b"first document\nwith two lines", b"second \xff doc", b"", b"fourth 1234"]
    joined = b"<|endoftext|>".join(docs)
    open(cli.path("docs.txt"), "wb").write(joined)
    cli.moe_("data", "encode", "--tokenizer", tok, "--data", cli.path("docs.txt"), "--out", cli.path("docs.tok"),
             "--doc-sep", "<|endoftext|>")
    dids, vocab, _ = read_tok(cli.path("docs.tok"))
    check(vocab == 1200 and dids.count(1198) == 3, f"separators: {dids}")
    want = []
    for i, d in enumerate(docs):
        if i:
            want.append(1198)
        want += [int(x) for x in cli.moe_("tokenizer", "encode", "--tokenizer", tok, stdin=d)[0].split()]
    check(dids == want, f"documents are not encoded apart: {dids} vs {want}")
    back, _ = cli.moe_("tokenizer", "decode", "--tokenizer", tok, "--in", cli.path("docs.tok"), "--format", "tok")
    check(back == joined, "decode of a token file with separators")
    open(cli.path("blank.txt"), "wb").write(b"a b\n\nc d\n\n\n\ne")
    cli.moe_("data", "encode", "--tokenizer", tok, "--data", cli.path("blank.txt"), "--out", cli.path("blank.tok"),
             "--doc-sep", "<|sep|>", "--doc-delim", "\\n\\n")
    bids, _, _ = read_tok(cli.path("blank.tok"))
    check(bids.count(1199) == 3, f"blank-line delimiters: {bids}")
    # an empty corpus: a header and no ids
    open(cli.path("empty.txt"), "wb").close()
    cli.mpi(2, "data", "encode", "--tokenizer", tok, "--data", cli.path("empty.txt"), "--out", cli.path("empty.tok"))
    eids, _, _ = read_tok(cli.path("empty.tok"))
    check(eids == [], f"empty corpus: {eids}")
    _, err = cli.moe_("tokenizer", "encode", "--tokenizer", tok, "--in", paths["fortunes"], "--out", "/dev/null",
                      "--stats")
    check("MB/s" in err and "peak RSS" in err, f"--stats: {err}")
    print("ok commands: train, info, three forms, encode/decode (text, u16, u32, tok), separators")


PATTERNS = ["gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base"]


def case_encode_ranks(cli):
    paths = corpora(cli)
    n_checked = 0
    for pat in PATTERNS:
        tok = train(cli, pat, cli.path(f"{pat}.json"), vocab=600)
        for name, data in sorted(paths.items()):
            for sep in (None, "<|sep|>"):
                enc = ["--tokenizer", tok]
                if sep:
                    enc += ["--doc-sep", sep, "--doc-delim", "\\n\\n"]
                # the reference: one process, one thread, the whole file at once
                cli.moe_("tokenizer", "encode", *enc, "--in", data, "--out", cli.path("ref.u32"), "--format", "u32")
                ref = u32(open(cli.path("ref.u32"), "rb").read())
                for np_, th in ((1, 1), (1, 3), (2, 1), (2, 2)):
                    out = cli.path(f"enc_{np_}_{th}.tok")
                    cli.mpi(np_, "data", "encode", *enc, "--data", data, "--out", out, "--threads", str(th))
                    got, vocab, _ = read_tok(out)
                    check(vocab == 600, f"vocab_size {vocab}")
                    if got != ref:
                        j = next((i for i in range(min(len(got), len(ref))) if got[i] != ref[i]), min(len(got), len(ref)))
                        raise Failure(f"{pat}, {name}, sep {sep}, {np_} ranks x {th} threads: {len(got)} ids vs "
                                      f"{len(ref)}, first difference at {j}")
                    n_checked += 1
                    check(not glob.glob(out + ".tmp*"), f"temporary file left beside {out}")
        print(f"ok {pat}: {len(paths)} corpora x 2 separator settings x 4 rank/thread splits equal one encode")
    print(f"ok encode_ranks: {n_checked} token files equal to the single-threaded ids")


def case_train_ranks(cli):
    paths = corpora(cli)
    data = cli.path("all.txt")
    with open(data, "wb") as f:
        for p in sorted(paths.values()):
            f.write(open(p, "rb").read())
    files = []
    for np_, th in ((1, 1), (1, 2), (2, 1), (2, 2)):
        out = cli.path(f"t_{np_}_{th}.json")
        cli.mpi(np_, "tokenizer", "train", "--data", data, "--vocab-size", "2000", "--pattern", "o200k_base",
                "--special", "<|endoftext|>", "--threads", str(th), "--out", out)
        files.append(open(out, "rb").read())
    check(all(f == files[0] for f in files), "training output differs between rank/thread counts")
    print("ok train_ranks: the same tokenizer file on 1-2 ranks x 1-2 threads")


def expect_fail(cli, np_, args, *needles, stdin=None, per_rank=True):
    """Runs args on np_ ranks (np_ = 0: without mpiexec); checks the failure
    and that each needle appears in stderr; under MPI every rank reports
    (per_rank; usage errors are printed once, by rank 0)."""
    if np_:
        _, err = cli.mpi(np_, *args, expect="fail", stdin=stdin)
    else:
        _, err = cli.moe_(*args, expect="fail", stdin=stdin)
    for n in needles:
        check(n in err, f"{' '.join(args)}: stderr lacks {n!r}:\n{err[-2000:]}")
    if np_ > 1 and per_rank:
        for r in range(np_):
            check(f"moe[rank {r}]" in err, f"{' '.join(args)}: rank {r} printed nothing:\n{err[-2000:]}")
    return err


def case_bad_input(cli):
    tok = train(cli, "gpt2", cli.path("t.json"), vocab=400) if corpora(cli) else None
    data = cli.path("corpus0.txt")
    good = open(tok).read()
    # malformed tokenizers, read by every rank of data encode
    bad_b64 = good.replace("bpe_ranks\":\"! 0 ", "bpe_ranks\":\"! 0 Q!== ", 1)
    open(cli.path("b64.json"), "w").write(bad_b64)
    bad_pat = good.replace('"pat_str":"', '"pat_str":"(?<', 1)
    open(cli.path("pat.json"), "w").write(bad_pat)
    expect_fail(cli, 2, ["data", "encode", "--tokenizer", cli.path("b64.json"), "--data", data, "--out", "x.tok"],
                "b64.json: line 1, token 1 (rank 0): bad base64 \"Q!==\" at character 2")
    expect_fail(cli, 2, ["data", "encode", "--tokenizer", cli.path("pat.json"), "--data", data, "--out", "x.tok"],
                "the pattern does not compile", "at offset")
    expect_fail(cli, 2, ["data", "encode", "--tokenizer", cli.path("none.json"), "--data", data, "--out", "x.tok"],
                "cannot open tokenizer", "none.json")
    expect_fail(cli, 2, ["data", "encode", "--tokenizer", tok, "--data", cli.path("nodata.txt"), "--out", "x.tok"],
                "cannot open", "nodata.txt")
    expect_fail(cli, 2, ["data", "encode", "--tokenizer", tok, "--data", data, "--out", cli.path("no/dir/x.tok")],
                "no/dir/x.tok.tmp")
    check(not os.path.exists(cli.path("x.tok")), "a failed encode left an output file")
    expect_fail(cli, 2, ["tokenizer", "train", "--data", cli.path("nodata.txt"), "--vocab-size", "300", "--out",
                         cli.path("tt.json")], "cannot open", "nodata.txt")
    expect_fail(cli, 2, ["tokenizer", "train", "--data", data, "--vocab-size", "300", "--pattern", "a(b",
                         "--out", cli.path("tt.json")], "the pattern does not compile: missing closing parenthesis")
    check(not os.path.exists(cli.path("tt.json")), "a failed training left an output file")
    err = expect_fail(cli, 2, ["data", "encode", "--tokenizer", tok, "--data", data, "--out", "x.tok",
                               "--doc-sep", "<|nope|>"], "no special token '<|nope|>'", per_rank=False)
    check(err.count("no special token") == 1, f"a usage error is printed once:\n{err}")
    # malformed tokenizer files at import
    lines = good.split("bpe_ranks\":\"")[1]
    ranks = lines.split("\"")[0].split("\\n")[0].split(" ")
    check(ranks[0] == "!" and ranks[1] == "0", f"unexpected bpe_ranks head {ranks[:3]}")
    tt = "\n".join(f"{b} {i}" for i, b in enumerate(ranks[2:258])) + "\n"
    open(cli.path("ok.tiktoken"), "w").write(tt)
    cli.moe_("tokenizer", "import", "--from", cli.path("ok.tiktoken"), "--pattern", "gpt2", "--out", cli.path("o.json"))
    cases = {
        "dup.tiktoken": (tt + f"{ranks[2]} 300\n", "ranks 0 and 300 have the same bytes"),
        "duprank.tiktoken": (tt + "YWI= 5\n", "rank 5 is given twice (line 6 and line 257)"),
        "missing.tiktoken": ("".join(l + "\n" for l in tt.split("\n") if l and not l.endswith(" 65")),
                             "the single byte 0x41 has no rank"),
        "huge.tiktoken": (tt + "YWI= 99999999\n", "line 257: rank 99999999 is above the limit"),
        "norank.tiktoken": (tt + "YWI=\n", "line 257 has no rank"),
        "b64.tiktoken": (tt + "YW*= 256\n", "line 257: bad base64 \"YW*=\" at character 3"),
    }
    for f, (content, needle) in cases.items():
        open(cli.path(f), "w").write(content)
        expect_fail(cli, 0, ["tokenizer", "import", "--from", cli.path(f), "--pattern", "gpt2", "--out", "y.json"],
                    f, needle)
    expect_fail(cli, 0, ["tokenizer", "import", "--from", cli.path("ok.tiktoken"), "--out", "y.json"],
                "has no pattern")
    expect_fail(cli, 0, ["tokenizer", "import", "--from", cli.path("ok.tiktoken"), "--pattern", "[a-", "--out",
                         "y.json"], "the pattern does not compile: missing terminating ] for character class at offset 3")
    open(cli.path("badjson.json"), "w").write('{"pat_str": "x", "bpe_ranks": "! 0 AA==",}')
    expect_fail(cli, 0, ["tokenizer", "info", "--tokenizer", cli.path("badjson.json")], "badjson.json: not valid JSON")
    # text where text is required: the pattern must be UTF-8
    open(cli.path("utf.json"), "wb").write(good.replace('"pat_str":"', '"pat_str":"\xff', 1).encode("latin-1"))
    expect_fail(cli, 0, ["tokenizer", "info", "--tokenizer", cli.path("utf.json")],
                "utf.json: the pattern does not compile: UTF-8 error", "at offset 0")
    # token files: truncated, wrong magic, version, ids out of range, another tokenizer
    cli.moe_("data", "encode", "--tokenizer", tok, "--data", data, "--out", cli.path("good.tok"))
    tok2 = train(cli, "o200k_base", cli.path("t2.json"), vocab=400)
    raw = open(cli.path("good.tok"), "rb").read()

    def bad_tok(name, b, *needles):
        open(cli.path(name), "wb").write(b)
        expect_fail(cli, 0, ["tokenizer", "decode", "--tokenizer", tok, "--in", cli.path(name), "--format", "tok"],
                    name, *needles)
    bad_tok("trunc.tok", raw[:-3], "truncated: the header says")
    bad_tok("short.tok", raw[:20], "truncated: 20 bytes")
    bad_tok("magic.tok", b"MOETOK02" + raw[8:], "not a token file")
    bad_tok("version.tok", raw[:8] + struct.pack("<I", 7) + raw[12:], "version 7")
    bad_tok("range.tok", raw[:64 + 20] + struct.pack("<H", 65000) + raw[66 + 20:], "token 10 has id 65000")
    expect_fail(cli, 0, ["tokenizer", "decode", "--tokenizer", tok2, "--in", cli.path("good.tok"), "--format", "tok"],
                "good.tok was encoded with another tokenizer")
    # ids given to decode
    expect_fail(cli, 0, ["tokenizer", "decode", "--tokenizer", tok], "standard input: byte 3: expected an id",
                stdin=b"12 x3 4")
    expect_fail(cli, 0, ["tokenizer", "decode", "--tokenizer", tok], "id 400 at position 1 is outside the vocabulary",
                stdin=b"12 400")
    open(cli.path("odd.u32"), "wb").write(b"\x01\x00\x00")
    expect_fail(cli, 0, ["tokenizer", "decode", "--tokenizer", tok, "--in", cli.path("odd.u32"), "--format", "u32"],
                "odd.u32: 3 bytes is not a whole number of 4-byte ids")
    # options
    expect_fail(cli, 0, ["tokenizer", "train", "--data", data, "--vocab-size", "100", "--out", "z.json"],
                "--vocab-size: expected an integer in [256")
    expect_fail(cli, 0, ["tokenizer", "encode"], "--tokenizer T is required")
    expect_fail(cli, 0, ["tokenizer", "export", "--tokenizer", tok, "--form", "xml", "--out", "q"],
                "unknown tokenizer form 'xml'")
    expect_fail(cli, 0, ["tokenizer", "frobnicate"], "unknown subcommand")
    expect_fail(cli, 0, ["tokenizer", "encode", "--tokenizer", tok, "--form", "hf"],
                "option --form does not apply here")
    big = "\n".join(f"{b} {i}" for i, b in enumerate(ranks[2:258])) + "\n"
    open(cli.path("big.tiktoken"), "w").write(big)
    cli.moe_("tokenizer", "import", "--from", cli.path("big.tiktoken"), "--pattern", "gpt2", "--special",
             "<|far|>=70000", "--out", cli.path("big.json"))
    expect_fail(cli, 0, ["tokenizer", "encode", "--tokenizer", cli.path("big.json"), "--format", "u16"],
                "--format u16 needs a vocabulary of at most 65536 ids", stdin=b"hi")
    print("ok bad_input: every malformed input named, non-zero exit, every rank")


def main():
    cli = Cli(sys.argv[1:])
    case = cli.args[0]
    try:
        {"commands": case_commands, "encode_ranks": case_encode_ranks, "train_ranks": case_train_ranks,
         "bad_input": case_bad_input}[case](cli)
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(cli.ompi_tmp, ignore_errors=True)
    print("PASS")
    return 0


sys.exit(main())
