"""Bad input to `moe train` ends every rank with a clear message, non-zero.

    test_bad_input.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP CASE

Runs one bad-input CASE on NP ranks under a timeout (a hang fails) and
checks: the exit status is non-zero, no rank died on a signal, and every
rank printed the message naming the problem (prefixed `moe[rank N]` once
MPI is up; errors found before MPI starts carry no rank, so there the
message must appear NP times).
"""
import os
import re
import sys

import h5py

from moe_cli import check, main

TIMEOUT = 40


def good_checkpoint(cli):
    """A valid checkpoint of the tiny model (2 steps on one rank)."""
    run = cli.path("good")
    cli.train(1, run, ["--steps=2", "--val_every=0"])
    return os.path.join(run, "ckpt-000002.h5")


def copy_of(cli, src, name):
    dst = cli.path(name)
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    return dst


def truncated_ckpt(cli):
    path = copy_of(cli, good_checkpoint(cli), "truncated.h5")
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def flipped_ckpt(cli):
    """One byte of /model/wte's stored data inverted: only the checksum can tell."""
    path = copy_of(cli, good_checkpoint(cli), "flipped.h5")
    with h5py.File(path, "r") as f:
        info = f["/model/wte"].id.get_chunk_info(0)
    with open(path, "r+b") as g:
        g.seek(info.byte_offset + info.size // 2)
        b = g.read(1)
        g.seek(info.byte_offset + info.size // 2)
        g.write(bytes([b[0] ^ 0xFF]))
    return path


def empty_set_partition(cli):
    """A partition file (the checkpoint's paths) in which expert 7 of 8 has no token."""
    path = cli.path("empty_set.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("/model/vocab_head/assign", data=[v % 7 for v in range(256)], dtype="<i4",
                         chunks=(256,), fletcher32=True)
        f["model"].attrs.update(dict(vocab_size=256, vocab_experts=8, vocab_partition="file"))
    return path


VOCAB = ["--head=vocab_experts", "--vocab_experts=8"]


def data_file(cli, name, nbytes):
    path = cli.path(name)
    with open(cli.data, "rb") as f, open(path, "wb") as g:
        g.write(f.read(nbytes))
    return path


# case -> (prepare(cli) -> (extra args, env), regex the message must match)
def unrunnable_coretype():
    """A kernel set this CPU lacks a feature for (every x86-64 CPU lacks one
    of these: AVX-512, AMX / AVX512-FP16 with AVX-512, AMD's FMA4 on Intel)."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if "avx512f" not in flags:
        return "SkylakeX"
    if not {"amx_tile", "avx512_fp16"} & flags:
        return "SapphireRapids"
    return "Bulldozer" if "fma4" not in flags else "Cooperlake"


CASES = {
    "unknown_key": (lambda cli: (["--d_modle=32"], {}), r"unknown key 'd_modle' \(did you mean 'd_model'\?\)"),
    "bad_value": (lambda cli: (["--top_k=two"], {}), r"top_k: expected an integer .*got 'two'"),
    "out_of_range": (lambda cli: (["--lr=-1"], {}), r"lr: expected a number > 0, got '-1'"),
    "missing_data": (lambda cli: ([f"--data={cli.path('nope.txt')}"], {}),
                     r"cannot open data file '.*nope\.txt': No such file"),
    "empty_data": (lambda cli: ([f"--data={data_file(cli, 'empty.txt', 0)}"], {}), r"data file '.*empty\.txt' is empty"),
    "short_data": (lambda cli: ([f"--data={data_file(cli, 'short.txt', 20)}", "--val_frac=0", "--val_every=0"], {}),
                   r"'.*short\.txt' has 20 training bytes, fewer than seq_len\+1 = 33"),
    "batch_indivisible": (lambda cli: ([f"--batch_size={int(cli.args[0]) + 1}", "--n_experts=12"], {}),
                          r"batch_size=\d+ is not divisible by the \d+ ranks"),
    "experts_indivisible": (lambda cli: (["--n_experts=3"], {}), r"n_experts=3 is not divisible by ep_size=\d+"),
    "resume_missing": (lambda cli: ([f"--resume={cli.path('none.h5')}"], {}), r"cannot find checkpoint '.*none\.h5'"),
    "resume_truncated": (lambda cli: ([f"--resume={truncated_ckpt(cli)}"], {}), r"truncated\.h5"),
    "resume_flipped": (lambda cli: ([f"--resume={flipped_ckpt(cli)}"], {}),
                       r"checksum.*'/model/wte' in '.*flipped\.h5'"),
    "resume_other_model": (lambda cli: ([f"--resume={good_checkpoint(cli)}", "--d_model=64"], {}),
                           r"'.*ckpt-000002\.h5' was saved with d_model = 32, the configuration has 64"),
    # The vocabulary-expert head (docs/vocab-experts.md): sizes and partitions.
    "vocab_more_than_V": (lambda cli: (["--head=vocab_experts", "--vocab_experts=300"], {}),
                          r"vocab_experts=300 exceeds vocab_size=256"),
    "vocab_indivisible": (lambda cli: (["--head=vocab_experts", "--vocab_experts=5"], {}),
                          r"vocab_experts=5 is not divisible by ep_size=\d+"),
    "vocab_top_k": (lambda cli: (VOCAB + ["--vocab_top_k=9"], {}), r"vocab_top_k=9 must be in \[1, vocab_experts=8\]"),
    "vocab_empty_set": (lambda cli: (VOCAB + ["--vocab_partition=file",
                                              f"--vocab_partition_from={empty_set_partition(cli)}"], {}),
                        r"'.*empty_set\.h5': vocabulary partition: expert 7 has no token"),
    "vocab_file_missing": (lambda cli: (VOCAB + ["--vocab_partition=file", f"--vocab_partition_from={cli.path('no.h5')}"],
                                        {}), r"cannot read '.*no\.h5'"),
    "vocab_no_source": (lambda cli: (VOCAB + ["--vocab_partition=kmeans"], {}),
                        r"vocab_partition=kmeans needs vocab_partition_from"),
    "vocab_resume_full": (lambda cli: (VOCAB + [f"--resume={good_checkpoint(cli)}"], {}),
                          r"ckpt-000002\.h5' has no dataset /model/vocab_head/assign"),
    # OPENBLAS_CORETYPE forcing kernels this CPU cannot execute (they would
    # die of SIGILL at the first GEMM): refused at start, naming the feature.
    "coretype_unrunnable": (lambda cli: ([], {"OPENBLAS_CORETYPE": unrunnable_coretype()}),
                            r"OPENBLAS_CORETYPE=\w+ selects kernels that need the CPU feature '\w+', which this "
                            r"CPU .* does not have"),
    # A model no machine holds (about 1 PB per rank): refused before any of it
    # is allocated, with the estimate and the machine's memory.
    "too_large": (lambda cli: (["--d_model=65536", "--n_heads=64", "--n_layers=4096"], {}),
                  r"the model needs about [\d.]+ GiB of memory per rank .*, more than the [\d.]+ GiB this machine "
                  r"has"),
    # Divergence: the first update with lr 1e30 overflows the weights.
    "diverged": (lambda cli: (["--lr=1e30", "--warmup_steps=0"], {}), r"non-finite"),
    # A NaN gradient on the last rank only (test hook in src/train/train.c).
    "nan_grad": (lambda cli: ([], {"MOE_FAULT": "nan_grad", "MOE_FAULT_RANK": str(int(cli.args[0]) - 1)}),
                 r"non-finite"),
}


def body(cli):
    check(len(cli.args) == 2 and cli.args[1] in CASES, f"expected NP CASE, CASE one of {sorted(CASES)}")
    np_, case = int(cli.args[0]), cli.args[1]
    prepare, pattern = CASES[case]
    extra, env = prepare(cli)
    rc, out, err = cli.train(np_, cli.path("run"), extra, env=env, timeout=TIMEOUT, expect_rc=None)
    if case == "nan_grad" and rc == 0:
        check(False, "MOE_FAULT=nan_grad had no effect: the fault hook in src/train/train.c is missing")
    check(rc != 0, f"{case}: exit 0; stderr:\n{err}")
    check(not re.search(r"signal|core dumped|Segmentation", err), f"{case}: a rank crashed:\n{err[-3000:]}")
    hits = [line for line in err.splitlines() if re.search(pattern, line)]
    ranked = {int(m.group(1)) for line in hits if (m := re.match(r"moe\[rank (\d+)\]: ", line))}
    unranked = [line for line in hits if line.startswith("moe: ")]
    check(ranked == set(range(np_)) or (not ranked and len(unranked) == np_),
          f"{case}: want /{pattern}/ from each of {np_} ranks, got ranks {sorted(ranked)} "
          f"and {len(unranked)} unranked lines; stderr:\n{err[-3000:]}")
    print(f"{case}: exit {rc}, every rank says: {hits[0]}")


if __name__ == "__main__":
    sys.exit(main(body))
