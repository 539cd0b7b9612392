"""Vocabulary experts end to end: `moe vocab partition`, `moe train`,
`moe eval`, `moe generate` and `moe inspect` with head = vocab_experts.

    test_vocab_cli.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...]

1. `moe vocab partition` (frequency) writes a partition file and prints the
   sets; a 2-rank run trains with it (vocab_partition = file): the
   checkpoint is format_version 2, its /model/vocab_head/assign is the
   file's, the expert statistics add up.
2. `moe eval --json` on 1, 2 and 4 ranks: the same loss (within 1e-6) and
   the same coverage at every K; the loss does not depend on --vocab-top-k,
   the coverage at K = M is 1.
3. `moe generate` on 1, 2 and 4 ranks: the same text for the same seed, for
   K = 2 sampling and K = 1 greedy.
4. `moe inspect`: the head, each expert's set size (the partition's) and
   targets (summing to every training target); --plot draws both pictures.
5. k-means over the checkpoint's wte (`moe vocab partition --method kmeans`)
   gives the partition a run with vocab_partition = kmeans trains with.
6. A gradient dump of a step with 8 targets over 8 experts (so some are
   idle): `moe inspect --verify` passes, no gradient for the partition, and
   the rows of the experts its `activated` mask clears are exactly zero,
   those of the others not (but for a one-token set, whose softmax is 1
   whatever its logit: its gradient is 0 too).
"""
import json
import os
import re
import sys

import h5py
import numpy as np

from moe_cli import TINY, check, main

VOCAB = {"head": "vocab_experts", "vocab_experts": 8}


def eval_json(cli, np_, ckpt, *extra):
    _, out, _ = cli.run(cli.mpi(np_, "eval", "--ckpt", ckpt, "--data", cli.data, "--json", *extra))
    return json.loads(out)


def generate(cli, np_, ckpt, *extra):
    _, out, _ = cli.run(cli.mpi(np_, "generate", "--ckpt", ckpt, "--prompt", "17+25=", "--tokens", "40", *extra))
    return out


def body(cli):
    # 1. partition file, then training with it
    part = cli.path("part.h5")
    _, out, _ = cli.run([cli.moe, "vocab", "partition", "--experts", "8", "--data", cli.data, "--out", part])
    check("vocabulary partition (frequency): 256 tokens into 8 experts" in out, f"partition printout:\n{out}")
    with h5py.File(part, "r") as f:
        assign = f["/model/vocab_head/assign"][()]
    sizes = np.bincount(assign, minlength=8)
    check(len(assign) == 256 and sizes.min() >= 1, f"partition file sizes {sizes}")
    run = cli.path("run")
    model = dict(VOCAB, vocab_partition="file", vocab_partition_from=part)
    cli.train(2, run, ["--val_every=10"], model)
    ckpt = os.path.join(run, f"ckpt-{TINY['steps']:06d}.h5")
    with h5py.File(ckpt, "r") as f:
        check(int(f.attrs["format_version"]) == 2, "format_version of a vocab_experts checkpoint")
        m = f["model"].attrs
        check(m["head"] == "vocab_experts" and int(m["vocab_experts"]) == 8 and m["vocab_partition"] == "file",
              f"/model attributes {dict(m)}")
        check(np.array_equal(f["/model/vocab_head/assign"][()], assign), "the checkpoint's partition is the file's")
        targets = f["/stats/vocab_head/expert_tokens"][()]
        steps = f["/optimizer/expert_step/vocab_head"][()]
    n_targets = TINY["steps"] * TINY["batch_size"] * TINY["seq_len"]
    check(targets.sum() == n_targets, f"expert_tokens sum {targets.sum()}, want {n_targets}")
    check(np.all((steps > 0) == (targets > 0)) and steps.max() <= TINY["steps"], f"expert steps {steps}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    check(0 < last["vocab_coverage"] <= 1 and last["vocab_max_over_mean_load"] >= 1, f"metrics: {last}")

    # 2. eval on 1, 2, 4 ranks
    ev = {np_: eval_json(cli, np_, run) for np_ in (1, 2, 4)}
    for np_ in (2, 4):
        d = abs(ev[np_]["loss"] - ev[1]["loss"])
        check(d <= 1e-6 * ev[1]["loss"], f"eval loss on {np_} ranks {ev[np_]['loss']} vs 1 rank {ev[1]['loss']}")
        check(ev[np_]["vocab_experts"]["coverage_at_k"] == ev[1]["vocab_experts"]["coverage_at_k"],
              f"coverage on {np_} ranks differs: {ev[np_]['vocab_experts']} vs {ev[1]['vocab_experts']}")
    v = ev[1]["vocab_experts"]
    check(v["top_k"] == 2 and abs(v["coverage"] - v["coverage_at_k"][1]) < 1e-12, f"coverage at K = 2: {v}")
    check(abs(v["coverage_at_k"][-1] - 1) < 1e-12 and sum(v["targets"]) == ev[1]["tokens"], f"coverage, loads: {v}")
    k8 = eval_json(cli, 2, run, "--vocab-top-k", "8")
    check(k8["loss"] == ev[2]["loss"] and k8["vocab_experts"]["coverage"] == 1.0, f"--vocab-top-k 8: {k8}")
    _, _, err = cli.run(cli.mpi(2, "eval", "--ckpt", run, "--data", cli.data, "--vocab-top-k", "9"), expect_rc="fail")
    check(len(re.findall(r"vocab_top_k=9 must be in \[1, vocab_experts=8\]", err)) >= 1, f"--vocab-top-k 9:\n{err}")

    # 3. generate on 1, 2, 4 ranks
    for extra in ([], ["--vocab-top-k", "1", "--temperature", "0"]):
        texts = {np_: generate(cli, np_, run, "--seed", "5", *extra) for np_ in (1, 2, 4)}
        check(texts[1] == texts[2] == texts[4] and len(texts[1]) >= 40,
              f"generate {extra}: texts differ between rank counts: {texts}")

    # 4. inspect
    _, out, _ = cli.inspect(ckpt, "--json")
    info = json.loads(out)["info"]
    ve = info["vocab_experts"]["experts_detail"]
    check([e["size"] for e in ve] == sizes.tolist(), f"inspect sizes {[e['size'] for e in ve]} vs {sizes}")
    check([e["targets"] for e in ve] == targets.tolist(), "inspect targets")
    _, out, _ = cli.inspect(ckpt, "--plot", cli.path("load.svg"))
    check("vocabulary experts: 8 sets" in out and os.path.getsize(cli.path("load.vocab.svg")) > 0,
          f"inspect text / plot:\n{out}")

    # 5. k-means over the checkpoint's wte, as a run would build it
    km = cli.path("km.h5")
    cli.run([cli.moe, "vocab", "partition", "--experts", "8", "--method", "kmeans", "--from", run,
             "--kmeans-iters", "5", "--out", km])
    run2 = cli.path("run_km")
    cli.train(2, run2, ["--steps=2", "--val_every=0"],
              dict(VOCAB, vocab_partition="kmeans", vocab_partition_from=run, kmeans_iters=5))
    with h5py.File(km, "r") as f, h5py.File(os.path.join(run2, "ckpt-000002.h5"), "r") as g:
        check(np.array_equal(f["/model/vocab_head/assign"][()], g["/model/vocab_head/assign"][()]),
              "moe vocab partition --method kmeans and the run's kmeans partition differ")
    # 6. a gradient dump with idle vocabulary experts
    run3 = cli.path("run_dump")
    cli.train(2, run3, ["--steps=3", "--val_every=0", "--dump_grads_every=3", "--batch_size=2", "--seq_len=4"],
              dict(VOCAB, vocab_partition="file", vocab_partition_from=part))
    dump = os.path.join(run3, "grads-000003.h5")
    rc, out, _ = cli.inspect(dump, "--verify", expect_rc=None)
    check(rc == 0 and " 0 failed" in out, f"moe inspect --verify {dump}:\n{out[-1500:]}")
    with h5py.File(dump, "r") as f:
        check("vocab_head/assign" not in f["grad"], "a gradient for the partition")
        act = f["grad/vocab_head/activated"][()]
        gw, gb = f["grad/vocab_head/weight"][()], f["grad/vocab_head/bias"][()]
    check(0 < act.sum() < 8, f"activated {act}: want some idle experts")
    for e in range(8):
        rows = assign == e
        zero = not np.any(gw[rows]) and not np.any(gb[rows])
        check(zero == (act[e] == 0 or rows.sum() == 1),
              f"expert {e} ({rows.sum()} tokens): activated {act[e]}, gradient rows zero: {zero}")
    print(f"eval loss {ev[1]['loss']:.6f} on 1/2/4 ranks, coverage {v['coverage_at_k']}; generate identical; "
          f"dump activated {act.tolist()}")


if __name__ == "__main__":
    sys.exit(main(body))
