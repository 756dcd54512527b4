#!/usr/bin/env python3
"""Benchmark ``qcow2snap diff`` side by side with QEMU, in one run.

1. Metadata diff of two snapshots of a 1 TiB virtual disk with a few GiB
   allocated (written with qemu-io in big chunks, snapshot, part rewritten,
   snapshot).  QEMU has no snapshot diff; the anchor is ``qemu-img map
   --output=json`` of the image (QEMU walking one layer's metadata).
2. ``diff --content`` of two snapshots of a 4 GiB disk against
   ``qemu-img compare`` of the two disks extracted to raw beforehand (the
   extraction is not timed).  qemu-img compare stops at the first
   difference, so this pair favours it;
3. the same where the second snapshot only rewrote 256 MiB with the same
   bytes: the disks are equal, so qemu-img compare reads both whole, and
   ``--content`` reads only the rewritten ranges (and reports nothing).

Pairs are timed with the workplace tool ``farm-bench`` (A/B alternated,
median ratios).  Usage: ``python tools/bench_diff.py [--dir DIR] [--runs N]``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    sh(*argv, str(image))


def build_big(image: Path) -> None:
    """1 TiB virtual: 3 GiB in 24 chunks of 128 MiB spread over the disk,
    snapshot, 512 MiB of it rewritten, snapshot."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1T")
    stride = (1 << 40) // 24
    offsets = [(i * stride) // MIB * MIB for i in range(24)]
    qemu_io(image, *(f"write -P {0x10 + i} {off} 128M" for i, off in enumerate(offsets)))
    sh("qemu-img", "snapshot", "-c", "before", str(image))
    qemu_io(image, *(f"write -P 0xee {off} 128M" for off in offsets[::6]))
    sh("qemu-img", "snapshot", "-c", "after", str(image))


def build_small(image: Path, raw_a: Path, raw_b: Path) -> None:
    """4 GiB virtual: 1 GiB written, snapshot; 256 MiB rewritten (half with
    the same bytes), 64 MiB zeroed, snapshot; both extracted to raw."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4G")
    qemu_io(image, *(f"write -P {0x20 + i} {i * 512 * MIB} 128M" for i in range(8)))
    sh("qemu-img", "snapshot", "-c", "before", str(image))
    qemu_io(image, "write -P 0x20 0 128M", f"write -P 0x77 {512 * MIB} 128M",
            f"write -z {1024 * MIB} 64M")
    sh("qemu-img", "snapshot", "-c", "after", str(image))
    for name, raw in (("before", raw_a), ("after", raw_b)):
        sh("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(image),
           str(raw))


def build_equal(image: Path, raw_a: Path, raw_b: Path) -> None:
    """4 GiB virtual: 1 GiB written, snapshot; 256 MiB rewritten with the
    same bytes, snapshot; both extracted to raw (equal files)."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4G")
    qemu_io(image, *(f"write -P {0x20 + i} {i * 512 * MIB} 128M" for i in range(8)))
    sh("qemu-img", "snapshot", "-c", "before", str(image))
    qemu_io(image, "write -P 0x20 0 128M", f"write -P 0x22 {1024 * MIB} 128M")
    sh("qemu-img", "snapshot", "-c", "after", str(image))
    for name, raw in (("before", raw_a), ("after", raw_b)):
        sh("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(image),
           str(raw))


def bench(label: str, a: list[str], b: list[str], runs: int) -> None:
    print(f"## {label}\nA: {' '.join(a)}\nB: {' '.join(b)}", flush=True)
    subprocess.run(["farm-bench", "-n", str(runs), "--timeout", "900",
                    "--vs", shlex.join(b), "--", *a], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--content-only", action="store_true",
                        help="skip the 1 TiB metadata case")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_diff."))
    work.mkdir(parents=True, exist_ok=True)
    qcow2snap = [sys.executable, "-m", "qcow2snap"]
    try:
        if not args.content_only:
            big = work / "big.qcow2"
            build_big(big)
            bench("metadata diff, 1 TiB virtual, 3 GiB allocated, 512 MiB rewritten",
                  [*qcow2snap, "diff", "--no-progress", "before", "after", str(big)],
                  ["qemu-img", "map", "--output=json", str(big)], args.runs)
            big.unlink()
        small, raw_a, raw_b = work / "small.qcow2", work / "before.raw", work / "after.raw"
        build_small(small, raw_a, raw_b)
        bench("content diff, 4 GiB virtual, 1 GiB allocated, 256 MiB rewritten",
              [*qcow2snap, "diff", "--no-progress", "--content", "before", "after",
               str(small)],
              ["sh", "-c", f"qemu-img compare -q -f raw -F raw {raw_a} {raw_b}; :"],
              args.runs)
        for path in (small, raw_a, raw_b):
            path.unlink()
        build_equal(small, raw_a, raw_b)
        bench("content diff, equal disks: 256 MiB rewritten with the same bytes",
              [*qcow2snap, "diff", "--no-progress", "--content", "before", "after",
               str(small)],
              ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw_a), str(raw_b)],
              args.runs)
    finally:
        if not args.dir:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
