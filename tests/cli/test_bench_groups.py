"""Group-limited routing in `moe bench layer`: fewer exchange bytes, clear errors.

    test_bench_groups.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...]

At 4 ranks (ep size 4), E = 16, top-4, n_groups = 4 (one expert group per
rank): with the node-aware exchange and every rank its own node
(MOE_NODE_RANKS=1), a token's row goes once to each other rank holding one
of its experts, so limiting the ranks a token may reach (topk_groups 2,
then 1) must cut the bytes each rank sends, well beyond the change in
dropped assignments. The bytes are the exchange's own counter and, for a
fixed seed, a count of rows, not a timing. The report must name the group
settings. Bad combinations end every rank with the router's or the config
table's message naming the key.
"""
import json

from moe_cli import check, main

SMALL = ["--tokens", "512", "--d-model", "32", "--d-ff", "64", "--experts", "16", "--top-k", "4",
         "--iters", "2", "--warmup", "1", "--seed", "7"]
NODE_PER_RANK = {"MOE_NODE_RANKS": "1"}


def bench(cli, np_, *args, env=None):
    _, out, _ = cli.run(cli.mpi(np_, "bench", "layer", *SMALL, *args, "--json"), timeout=120, env=env)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    check(len(lines) == 1, f"bench layer {' '.join(args)}: expected one JSON line, got:\n{out}")
    return json.loads(lines[0])


def body(cli):
    runs = {}
    for name, args in (("all", []), ("top2", ["--n-groups", "4", "--topk-groups", "2"]),
                       ("top1", ["--n-groups", "4", "--topk-groups", "1"])):
        j = runs[name] = bench(cli, 4, "--a2a", "node", *args, env=NODE_PER_RANK)
        check(j["ranks"] == 4 and j["nodes"] == 4, f"{name}: expected 4 ranks as 4 nodes, got {j}")
        check(j["a2a"] == "node", f"{name}: the report says the exchange ran as {j['a2a']}, expected node")
        want = (1, 1) if name == "all" else (4, int(name[-1]))
        check((j["n_groups"], j["topk_groups"]) == want,
              f"{name}: the report says n_groups={j['n_groups']} topk_groups={j['topk_groups']}, expected {want}")
        check(j["score"] == "softmax", f"{name}: score {j['score']}")
        print(f"{name}: {j['bytes_sent_per_rank']:.0f} bytes/rank/iter, dropped {100 * j['dropped_frac']:.1f}%")
    b = {k: v["bytes_sent_per_rank"] for k, v in runs.items()}
    # Without a limit a top-4 token reaches about 2 other ranks, with 2 groups
    # at most 2 ranks (1.5 others on average), with 1 group 0.75 others.
    check(b["top2"] < 0.9 * b["all"], f"topk_groups 2 sends {b['top2']:.0f} bytes/rank, unlimited {b['all']:.0f}")
    check(b["top1"] < 0.8 * b["top2"], f"topk_groups 1 sends {b['top1']:.0f} bytes/rank, topk_groups 2 {b['top2']:.0f}")
    for name in runs:
        kept = 1 - runs[name]["dropped_frac"]
        check(kept > 0.9, f"{name}: {100 * (1 - kept):.1f}% dropped: the byte figures would measure drops")

    # The sigmoid score goes through (its name in the report); `--a2a auto`
    # on one node reports the kind it resolved to (p2p).
    j = bench(cli, 2, "--score", "sigmoid", "--n-groups", "4", "--topk-groups", "2", "--a2a", "auto")
    check(j["score"] == "sigmoid" and j["n_groups"] == 4, f"--score sigmoid: report {j}")
    check(j["a2a"] == "p2p", f"--a2a auto on one node: the report says {j['a2a']}, expected p2p")

    # Bad values and combinations: a message naming the problem, non-zero exit on every rank.
    bad = [
        (["--n-groups", "4", "--topk-groups", "5"], "topk_groups=5 exceeds n_groups=4"),
        (["--n-groups", "3"], "n_groups=3 does not divide n_experts=16"),
        (["--n-groups", "4", "--topk-groups", "1", "--top-k", "5"], "top_k=5 exceeds the 4 experts of topk_groups=1"),
        (["--n-groups", "4", "--router", "expert_choice"], "n_groups need token choice"),
        (["--n-groups", "0"], "n_groups"),
        (["--topk-groups", "-1"], "topk_groups"),
        (["--score", "tanh"], "softmax or sigmoid"),
        (["--n-groups", "4", "--save", cli.path("dump.h5")], "cannot record --score sigmoid or --n-groups"),
    ]
    for args, msg in bad:
        rc, out, err = cli.run(cli.mpi(2, "bench", "layer", *SMALL, *args), timeout=60, expect_rc="fail")
        check(msg in err, f"bench layer {' '.join(args)}: stderr lacks '{msg}':\n{err[-1500:]}")
        print(f"refused: {' '.join(args)}: {msg}")


if __name__ == "__main__":
    raise SystemExit(main(body))
