#!/usr/bin/env python3
"""Benchmark ``qcow2snap hash`` of one snapshot against QEMU's way of
getting the same digest: ``qemu-img convert -l snapshot.name=bench -O raw``
into a file on tmpfs (/dev/shm), then ``sha256sum`` of that file.

The image (made once, kept in --dir): 4 GiB virtual, 1 GiB of random data
written by qemu-io in 16 runs of 64 MiB spread over the disk, plus 64 MiB of
compressible data written as compressed clusters (``write -c``), then the
snapshot ``bench``.  Both commands run in an ABBA loop (A B B A per round)
in this one run; each round gives the ratio of the sums of its A and B
times, and the median ratio is reported.  The digests are checked equal.

    python tools/bench_hash.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
VIRTUAL = 4096 * MiB


def make_image(directory: Path) -> Path:
    image = directory / "bench-hash.qcow2"
    if image.exists():
        return image
    directory.mkdir(parents=True, exist_ok=True)
    rand = directory / "random.src"
    rand.write_bytes(os.urandom(64 * MiB))
    packable = directory / "packable.src"   # compresses about 4:1
    packable.write_bytes(os.urandom(16 << 10) + bytes(48 << 10))
    tmp = directory / "bench-hash.tmp.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(VIRTUAL)],
                   check=True)
    step = VIRTUAL // 16
    cmds = []
    for i in range(16):
        cmds += ["-c", f"write -q -s {rand} {i * step} {64 * MiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(tmp)], check=True)
    cmds = []
    base = 64 * MiB + 8 * MiB   # inside the gaps between the random runs
    for i in range(1024):
        cmds += ["-c", f"write -q -c -s {packable} {base + (i // 64) * step + (i % 64) * 65536}"
                       f" 65536"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(tmp)], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "bench", str(tmp)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x11 0 {16 * MiB}", str(tmp)],
                   check=True)
    rand.unlink()
    packable.unlink()
    tmp.rename(image)
    return image


def run_ours(qcow2snap: str, image: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([qcow2snap, "hash", str(image), "--by-name", "bench", "--json"],
                         check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - t0
    import json
    return elapsed, json.loads(out)["layers"][0]["disk-digest"]


def run_qemu(image: Path, scratch: Path) -> tuple[float, str]:
    raw = scratch / "bench-hash.raw"
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-l", "snapshot.name=bench", "-O", "raw",
                    str(image), str(raw)], check=True)
    out = subprocess.run(["sha256sum", str(raw)], check=True, capture_output=True,
                         text=True).stdout
    elapsed = time.perf_counter() - t0
    raw.unlink()
    return elapsed, out.split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/qcow2snap-bench-hash"))
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--qcow2snap", default=shutil.which("qcow2snap")
                        or str(Path(sys.executable).with_name("qcow2snap")))
    args = parser.parse_args()
    image = make_image(args.dir)
    info = subprocess.run(["qemu-img", "info", str(image)], check=True, capture_output=True,
                          text=True).stdout
    print(info.strip())
    # warm-up: the image into the page cache, both paths once
    _, ours = run_ours(args.qcow2snap, image)
    _, theirs = run_qemu(image, args.scratch)
    if ours != theirs:
        sys.exit(f"digests differ: qcow2snap {ours}, qemu-img+sha256sum {theirs}")
    ratios, a_times, b_times = [], [], []
    for r in range(args.rounds):
        a1, _ = run_ours(args.qcow2snap, image)
        b1, _ = run_qemu(image, args.scratch)
        b2, _ = run_qemu(image, args.scratch)
        a2, _ = run_ours(args.qcow2snap, image)
        a_times += [a1, a2]
        b_times += [b1, b2]
        ratios.append((a1 + a2) / (b1 + b2))
        print(f"round {r + 1}: qcow2snap hash {a1:.3f} {a2:.3f} s  "
              f"qemu-img convert + sha256sum {b1:.3f} {b2:.3f} s  ratio {ratios[-1]:.3f}")
    print(f"digest {ours} (equal)")
    print(f"median: qcow2snap hash {statistics.median(a_times):.3f} s, "
          f"qemu-img convert + sha256sum {statistics.median(b_times):.3f} s, "
          f"median ratio A/B {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
