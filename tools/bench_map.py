#!/usr/bin/env python3
"""Mapping benchmark: ``qcow2snap map - IMAGE --json`` against
``qemu-img map --output=json IMAGE`` on the active layer of a heavily
fragmented image, side by side in one run.

The image (64 KiB clusters) is written by qemu-io one 4 KiB write per
cluster in a shuffled order (fixed seed), every other cluster, so that the
host clusters are allocated in write order: guest-contiguous clusters are
host-scattered and the mapping has one extent per written cluster (checked:
both tools must print the same entries).

Each pair runs alternately (ABAB...) after one untimed run of each; the
ratio (qcow2snap / qemu-img, below 1 = faster) is taken pair by pair and
its median printed with the median wall times.

    python tools/bench_map.py                       # 1 GiB, 8192 extents
    python tools/bench_map.py --size-mib 4096 --rounds 9

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

CLUSTER = 64 * 1024


def build(path: str, size_mib: int, seed: int) -> int:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{size_mib}M"], check=True)
    clusters = list(range(0, size_mib * 1024 * 1024 // CLUSTER, 2))
    random.Random(seed).shuffle(clusters)
    for i in range(0, len(clusters), 2000):
        args = []
        for c in clusters[i:i + 2000]:
            args += ["-c", f"write -q -P {c % 251} {c * CLUSTER} 4k"]
        subprocess.run(["qemu-io", "-f", "qcow2", *args, path], check=True,
                       stdout=subprocess.DEVNULL)
    return len(clusters)


def timed(argv: list[str]) -> tuple[float, bytes]:
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True).stdout
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "fragmented.qcow2")
        written = build(image, args.size_mib, args.seed)
        ours_cmd = [sys.executable, "-m", "qcow2snap", "map", "-", image, "--json"]
        qemu_cmd = ["qemu-img", "map", "--output=json", image]
        _, ours_out = timed(ours_cmd)
        _, qemu_out = timed(qemu_cmd)
        entries = json.loads(qemu_out)
        assert json.loads(ours_out)["map"] == entries, "the maps differ"
        ours_t, qemu_t, ratios = [], [], []
        for _ in range(args.rounds):
            a, _ = timed(ours_cmd)
            b, _ = timed(qemu_cmd)
            ours_t.append(a)
            qemu_t.append(b)
            ratios.append(a / b)
    print(f"image: {args.size_mib} MiB, {written} clusters written in shuffled order, "
          f"{len(entries)} map entries")
    print(f"qcow2snap map - IMAGE --json      median {statistics.median(ours_t) * 1000:8.1f} ms")
    print(f"qemu-img map --output=json IMAGE  median {statistics.median(qemu_t) * 1000:8.1f} ms")
    print(f"ratio qcow2snap/qemu-img: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.rounds} pairs)")


if __name__ == "__main__":
    main()
