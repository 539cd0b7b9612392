"""A checkpoint with bytes changed anywhere is refused, or reads the same.

    test_corrupt_ckpt.py MOE WORKDIR MPIEXEC NUMPROC_FLAG [FLAGS...] -- NP COPIES [SEED]

Trains the tiny model on NP ranks (the checkpoint written by NP ranks),
then makes COPIES copies of its final checkpoint, copy i with 4 bytes
changed (XOR with random non-zero bytes) at an offset drawn in the i-th of
COPIES equal slices of the file, so the offsets cover all of it: the
superblock, object headers, B-trees and chunk indices, heaps, data chunks
and unused space. For every copy:
  - `moe inspect --verify COPY` and `moe train --resume=COPY` (one process,
    loading only: --steps equal to the checkpoint's step) both exit
    non-zero with a message naming the copy, or both exit 0;
  - when both exit 0, every group, dataset and attribute of the copy equals
    the original's (the bytes changed were not part of the content);
  - no process dies on a signal and none runs past its timeout.
Prints how many copies were refused, by which kind of message, and how
many read the same.
"""
import collections
import os
import random
import re
import shutil
import sys

from moe_cli import TINY, check, main, h5_items

TIMEOUT = 60


def classify(err):
    for key in ("checksum", "damaged", "not an HDF5 file", "truncated or damaged", "cannot open",
                "cannot read", "attribute", "missing", "shape", "format", "out of range", "non-finite"):
        if key in err:
            return key
    return "other"


def body(cli):
    check(len(cli.args) in (2, 3), "expected NP COPIES [SEED]")
    np_, copies = int(cli.args[0]), int(cli.args[1])
    rng = random.Random(int(cli.args[2]) if len(cli.args) == 3 else 20261201)
    run = cli.path("run")
    model = dict(TINY, steps=3, val_every=0)
    cli.train(np_, run, model=model)
    orig = os.path.join(run, "ckpt-000003.h5")
    size = os.path.getsize(orig)
    ref = h5_items(orig)
    with open(orig, "rb") as f:
        data = f.read()

    refused, same, kinds, example = 0, 0, collections.Counter(), {}
    for i in range(copies):
        lo, hi = i * size // copies, max(i * size // copies + 1, (i + 1) * size // copies - 4)
        off = rng.randrange(lo, hi)
        mask = bytes(rng.randrange(1, 256) for _ in range(4))
        bad = bytearray(data)
        for k in range(4):
            if off + k < size:
                bad[off + k] ^= mask[k]
        path = cli.path(f"copy-{i:03d}.h5")
        with open(path, "wb") as f:
            f.write(bad)
        rc_v, out_v, err_v = cli.inspect(path, "--verify", expect_rc=None, timeout=TIMEOUT)
        out_dir = cli.path(f"resume-{i:03d}")
        rc_r, out_r, err_r = cli.run([cli.moe, "train", f"--data={cli.data}", f"--out_dir={out_dir}",
                                      f"--resume={path}", *[f"--{k}={v}" for k, v in model.items()]],
                                     expect_rc=None, timeout=TIMEOUT)
        what = f"copy {i} (offset {off} of {size}, mask {mask.hex()})"
        for rc, err in ((rc_v, err_v), (rc_r, err_r)):
            check(rc >= 0 and not re.search(r"Segmentation|core dumped|AddressSanitizer|runtime error|Aborted", err),
                  f"{what}: a crash (exit {rc}):\n{err[-3000:]}")
        if rc_v != 0 or rc_r != 0:
            check(rc_v != 0 and rc_r != 0,
                  f"{what}: inspect --verify exit {rc_v}, --resume exit {rc_r}: one refuses what the other accepts\n"
                  f"verify:\n{out_v[-1500:]}{err_v[-1500:]}\nresume:\n{err_r[-1500:]}")
            # verify reports per dataset on stdout, or the open failure on stderr
            text_v = out_v + err_v
            check(os.path.basename(path) in text_v and os.path.basename(path) in err_r,
                  f"{what}: a message does not name the file:\nverify:\n{text_v[-1500:]}\nresume:\n{err_r[-1500:]}")
            refused += 1
            kind = classify(err_r)
            if not kinds[kind]:
                example[kind] = err_r.strip().splitlines()[-1]
            kinds[kind] += 1
        else:
            got = h5_items(path)
            check(sorted(got) == sorted(ref), f"{what}: accepted, but holds other objects")
            for name in ref:
                check(got[name] == ref[name], f"{what}: accepted, but /{name} differs from the original")
            same += 1
        os.unlink(path)
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"{copies} copies of a {size}-byte checkpoint written on {np_} rank(s): {refused} refused "
          f"({', '.join(f'{k}: {v}' for k, v in kinds.most_common())}), {same} read the same as the original")
    for k, line in example.items():
        print(f"  e.g. {k}: {line}")


if __name__ == "__main__":
    sys.exit(main(body))
