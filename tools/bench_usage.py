#!/usr/bin/env python3
"""``qcow2snap usage`` on an image with 1,000 snapshots, timed.

QEMU has no space-accounting command, so the anchor is ``qemu-img check``
on the same image: the nearest QEMU operation (one pass over every layer's
metadata and the refcounts).  ``usage`` does that pass and more (it runs
qcow2snap's checker, then walks every layer again to attribute each host
cluster), so the ratio says what the attribution costs over a check.

The image (64 MiB, 64 KiB clusters) gets 16 MiB of data, then 100 rounds
of: qemu-io rewrites four 64 KiB pieces at seeded places, and qcow2snap's
API creates 10 snapshots: 1,000 snapshots whose L2 tables are partly
shared, partly copied.  Building takes about 20-40 s.

Commands alternate A B A B after one untimed run of each; the ratio
usage / check is taken pair by pair and its median printed.

    python tools/bench_usage.py                 # 1,000 snapshots, 7 rounds
    python tools/bench_usage.py --snapshots 200 --rounds 5 --keep

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qcow2snap


def build(path: str, snapshots: int, seed: int = 12) -> None:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, "64M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 16M", path], check=True,
                   capture_output=True)
    rng = random.Random(seed)
    made = 0
    while made < snapshots:
        writes = []
        for _ in range(4):
            writes += ["-c", f"write -P {rng.randrange(256)} {rng.randrange(1024) * 65536} 64k"]
        subprocess.run(["qemu-io", "-f", "qcow2", *writes, path], check=True,
                       capture_output=True)
        with qcow2snap.open(path, "r+") as image:
            for _ in range(min(10, snapshots - made)):
                image.create_snapshot(f"snap{made}")
                made += 1


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-usage-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"usage-{args.snapshots}.qcow2")
    try:
        if not os.path.exists(path):
            start = time.perf_counter()
            build(path, args.snapshots)
            print(f"built {path}: {args.snapshots} snapshots, "
                  f"{os.path.getsize(path) >> 20} MiB, {time.perf_counter() - start:.1f} s")
        usage_cmd = [sys.executable, "-m", "qcow2snap", "usage", "--json", path]
        check_cmd = ["qemu-img", "check", path]
        timed(usage_cmd)
        timed(check_cmd)
        ours, theirs, ratios = [], [], []
        for _ in range(args.rounds):
            a = timed(usage_cmd)
            b = timed(check_cmd)
            ours.append(a)
            theirs.append(b)
            ratios.append(a / b)
        print(f"qcow2snap usage --json   median {statistics.median(ours):.3f} s")
        print(f"qemu-img check (anchor)  median {statistics.median(theirs):.3f} s")
        print(f"ratio usage / check      median {statistics.median(ratios):.2f} "
              f"(best {min(ratios):.2f}, worst {max(ratios):.2f}, {args.rounds} pairs)")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
