#!/usr/bin/env python3
"""`moe eval` and `moe generate` end to end, on 1, 2 and 4 ranks.

  test_infer_cli.py --moe EXE --mpiexec MPIEXEC --dir DIR CASE

CASE:
  setup     synthetic corpus + domains; a token-choice and an expert-choice
            checkpoint trained by `moe train` (the fixture of the others)
  eval      the same loss (within 1e-6), tokens and domain table on 1, 2, 4 ranks;
            the domain table is a distribution per domain
  generate  the same seed gives the same text on 1, 2 and 4 ranks (a batch of
            prompts, sampled and greedy, with context slides); seeds matter
  ec        expert choice: deterministic, and one prompt gives mostly printable text
  errors    bad input exits non-zero with a message naming the problem
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

SMALL = ["--d_model=32", "--n_layers=2", "--n_heads=2", "--seq_len=32", "--n_experts=4", "--top_k=2",
         "--d_ff=64", "--moe_every=1", "--batch_size=8", "--val_every=0"]


def run(args, np=1, check=True):
    cmd = ([A.mpiexec, "--allow-run-as-root", "--oversubscribe", "-np", str(np)] if np else []) + [A.moe] + args
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    if check and p.returncode != 0:
        sys.exit("FAIL: %s\nexit %d\n%s\n%s" % (" ".join(cmd), p.returncode, p.stdout.decode(errors="replace"),
                                                 p.stderr.decode(errors="replace")))
    return p


def path(name):
    return os.path.join(A.dir, name)


def setup():
    shutil.rmtree(A.dir, ignore_errors=True)
    os.makedirs(A.dir)
    run(["data", "synth", "--out", path("corpus.txt"), "--bytes", "300000", "--domains", path("corpus.dom")], np=0)
    # a short evaluation file (and its domains) keeps 4-rank runs quick
    for ext in ("txt", "dom"):
        with open(path("corpus." + ext), "rb") as f, open(path("eval." + ext), "wb") as g:
            g.write(f.read(40000))
    run(["train"] + SMALL + ["--steps=60", "--data=" + path("corpus.txt"), "--out_dir=" + path("tc")], np=0)
    run(["train"] + SMALL + ["--steps=200", "--router=expert_choice", "--data=" + path("corpus.txt"),
                             "--out_dir=" + path("ec")], np=0)
    with open(path("prompts.txt"), "wb") as f:
        f.write(b"17+25=\nroman 1994 = \n\nrev: abc -> \n")


def case_eval():
    results = {}
    for np in (1, 2, 4):
        p = run(["eval", "--ckpt", path("tc"), "--data", path("eval.txt"), "--domains", path("eval.dom"),
                 "--json", "--batch", "3"], np=np)
        results[np] = json.loads(p.stdout)
    base = results[1]
    windows = (40000 - 1) // 32
    assert base["tokens"] == windows * 32, base["tokens"]
    assert 0.5 < base["loss"] < 6, base["loss"]
    assert abs(base["bpb"] - base["loss"] / 0.6931471805599453) < 1e-9
    for np, r in results.items():
        assert r["tokens"] == base["tokens"], (np, r["tokens"])
        assert abs(r["loss"] - base["loss"]) <= 1e-6, (np, r["loss"], base["loss"])
        assert r["domains"]["layers"] and len(r["domains"]["layers"]) == 2
        for lb, la in zip(base["domains"]["layers"], r["domains"]["layers"]):
            assert lb["kept"] == la["kept"], np
    names = base["domains"]["names"]
    assert "arith" in names and len(base["domains"]["tokens"]) == len(names)
    assert sum(base["domains"]["tokens"]) == base["tokens"]
    for layer in base["domains"]["layers"]:
        for d, row in enumerate(layer["share"]):
            if base["domains"]["tokens"][d]:
                assert abs(sum(row) - 1) < 1e-9, row
            assert len(row) == 4
    # text mode prints the same loss and the table
    p = run(["eval", "--ckpt", path("tc"), "--data", path("eval.txt"), "--domains", path("eval.dom")], np=2)
    out = p.stdout.decode()
    assert "%.6f nats/byte" % base["loss"] in out, out
    assert "MoE block 1" in out and "arith" in out, out
    print("eval: loss %.9f on 1, 2, 4 ranks" % base["loss"])


def generate(ckpt, np, *extra):
    p = run(["generate", "--ckpt", path(ckpt), "--json"] + list(extra), np=np)
    return json.loads(p.stdout)


def case_generate():
    for extra in (["--temperature", "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "7"],
                  ["--temperature", "0"]):
        args = ["--prompt_file", path("prompts.txt"), "--tokens", "90"] + extra
        outs = {np: generate("tc", np, *args) for np in (1, 2, 4)}
        texts = [s["text"] for s in outs[1]["samples"]]
        assert len(texts) == 4 and all(len(t.encode()) >= 30 for t in texts), texts
        assert outs[1]["slides"] > 0  # 90 bytes after the prompt pass seq_len = 32
        assert outs[1]["samples"][1]["prompt"] == "roman 1994 = "
        for np in (2, 4):
            assert [s["text"] for s in outs[np]["samples"]] == texts, (np, outs[np], texts)
    other = generate("tc", 1, "--prompt_file", path("prompts.txt"), "--tokens", "90", "--temperature", "0.8",
                     "--top_k", "40", "--top_p", "0.95", "--seed", "8")
    first = generate("tc", 1, "--prompt_file", path("prompts.txt"), "--tokens", "90", "--temperature", "0.8",
                     "--top_k", "40", "--top_p", "0.95", "--seed", "7")
    assert [s["text"] for s in other["samples"]] != [s["text"] for s in first["samples"]]
    # plain text: one separator per prompt of a batch
    p = run(["generate", "--ckpt", path("tc"), "--prompt_file", path("prompts.txt"), "--tokens", "20"], np=2)
    assert p.stdout.count(b"=== [") == 4, p.stdout
    print("generate: identical text on 1, 2, 4 ranks")


def case_ec():
    args = ["--prompt", "17+25=", "--tokens", "150", "--temperature", "0.8", "--seed", "3"]
    a, b = generate("ec", 1, *args), generate("ec", 1, *args)
    assert a["samples"] == b["samples"]
    c = generate("ec", 2, *args)
    assert c["samples"] == a["samples"], (a, c)
    text = run(["generate", "--ckpt", path("ec")] + args, np=0).stdout[:-1]  # raw bytes, minus the final newline
    assert len(text) == 150, len(text)
    printable = sum(1 for ch in text if 32 <= ch < 127 or ch in (9, 10))
    assert printable >= 0.8 * len(text), text
    print("ec: %r" % text[:60])


def expect_fail(args, words, np=0):
    p = run(args, np=np, check=False)
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0, ("expected failure", args, p.stdout)
    for w in words:
        assert w in err, (args, w, err)


def case_errors():
    tc = path("tc")
    g = ["generate", "--ckpt", tc, "--prompt", "hi"]
    expect_fail(g + ["--temperature", "-1"], ["temperature"])
    expect_fail(g + ["--temperature", "abc"], ["temperature"])
    expect_fail(g + ["--top_p", "0"], ["top_p"])
    expect_fail(g + ["--top_p", "1.5"], ["top_p"])
    expect_fail(g + ["--top_k", "-1"], ["top_k"])
    expect_fail(g + ["--tokens", "-1"], ["tokens"])
    expect_fail(g + ["--prompt_file", path("prompts.txt")], ["exactly one"])
    expect_fail(["generate", "--ckpt", path("missing"), "--prompt", "x"], ["missing"])
    with open(path("bad_prompts.txt"), "wb") as f:
        f.write(b"fine\nbad \xff byte\n")
    expect_fail(["generate", "--ckpt", tc, "--prompt_file", path("bad_prompts.txt")], ["line 2", "UTF-8"])
    open(path("empty.txt"), "wb").close()
    expect_fail(["generate", "--ckpt", tc, "--prompt_file", path("empty.txt")], ["no prompt"])
    expect_fail(["generate", "--ckpt", tc, "--prompt", "x"], ["must divide"], np=3)
    with open(os.path.join(tc, "latest")) as f:
        ckpt = os.path.join(tc, f.read().strip())
    with open(ckpt, "rb") as f, open(path("truncated.h5"), "wb") as g2:
        g2.write(f.read(3000))
    expect_fail(["generate", "--ckpt", path("truncated.h5"), "--prompt", "x"], ["truncated.h5"])
    e = ["eval", "--ckpt", tc]
    expect_fail(e, ["--data"])
    with open(path("short.txt"), "wb") as f:
        f.write(b"x" * 32)  # a window needs seq_len + 1 = 33 bytes
    expect_fail(e + ["--data", path("short.txt")], ["seq_len+1"])
    expect_fail(e + ["--data", path("eval.txt"), "--domains", path("prompts.txt")], ["one id per byte"])
    expect_fail(e + ["--data", path("eval.txt"), "--batch", "0"], ["--batch"])
    expect_fail(e + ["--data", path("eval.txt")], ["must divide"], np=3)
    expect_fail(e + ["--data", path("nothing.txt")], ["nothing.txt"], np=2)
    print("errors: all rejected")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("case", choices=["setup", "eval", "generate", "ec", "errors"])
    A = ap.parse_args()
    {"setup": setup, "eval": case_eval, "generate": case_generate, "ec": case_ec, "errors": case_errors}[A.case]()
