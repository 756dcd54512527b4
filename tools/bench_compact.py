#!/usr/bin/env python3
"""Benchmark ``qcow2snap compact`` side by side with ``qemu-img convert -O
qcow2``, in one run, on the same fragmented image with several snapshots.

The image: ``--size`` GiB virtual, half of it written in 1 MiB chunks in a
shuffled order (so host order is not guest order), snapshot ``s1``; a
quarter rewritten (shuffled), ``s2``; another quarter, ``s3``; another,
``s4``; then ``s2`` deleted (its exclusive clusters become free space in the
middle of the file).  ``qemu-img convert`` writes only the active layer;
``qcow2snap compact`` writes every layer (each distinct cluster once).  The
figure of merit the issue asks for is bytes written per second: the output
file's allocated bytes divided by the wall time.

Both run with a warm page cache (the source is read once before).  Both are
timed to the moment their output is durable: ``compact`` fsyncs its output
before the rename (its default), so ``qemu-img convert`` (which does not
flush by default) is timed with an fsync of its output added; the time
without that fsync is shown too.

``--compress zlib`` compares ``compact --compress zlib`` with ``qemu-img
convert -c -O qcow2`` instead; the outputs are then tiny (the benchmark's
data is patterns), so the figure is data compressed per second: each
tool's uncompressed output size (measured once without compression)
divided by its time.

Usage: ``python tools/bench_compact.py [--dir DIR] [--size GIB] [--runs N]
[--compress zlib|zstd]``.
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
from pathlib import Path

MIB = 1 << 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def qemu_io(image: Path, commands: list[str]) -> None:
    # qemu-io takes the commands on stdin: no argv limit for thousands of them
    subprocess.run(["qemu-io", "-f", "qcow2", str(image)], input="\n".join(commands) + "\nq\n",
                   text=True, check=True, stdout=subprocess.DEVNULL)


def build(image: Path, size_gib: int) -> None:
    rng = random.Random(15)
    chunks = size_gib * 1024
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{size_gib}G")
    first = rng.sample(range(chunks), chunks // 2)
    qemu_io(image, [f"write -P {0x10 + i % 200} {c * MIB} 1M" for i, c in enumerate(first)])
    for n in range(1, 5):
        sh("qemu-img", "snapshot", "-c", f"s{n}", str(image))
        again = rng.sample(range(chunks), chunks // 4)
        qemu_io(image, [f"write -P {0x40 + n} {c * MIB} 1M" for c in again])
    sh("qemu-img", "snapshot", "-d", "s2", str(image))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def timed(argv: list[str], output: Path, fsync: bool) -> tuple[float, float]:
    """(seconds to completion, seconds to a durable output)."""
    if output.exists():
        output.unlink()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    done = time.perf_counter()
    if fsync:
        fd = os.open(output, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return done - start, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--size", type=int, default=2, help="virtual size in GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compress", choices=["zlib", "zstd"], default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compact-", dir=args.dir))
    try:
        image = work / "frag.qcow2"
        t0 = time.perf_counter()
        build(image, args.size)
        print(f"built {image} ({os.path.getsize(image) / MIB:.0f} MiB file, "
              f"{args.size} GiB virtual, 3 snapshots) in {time.perf_counter() - t0:.1f} s")
        with open(image, "rb") as f:   # warm the page cache
            while f.read(16 * MIB):
                pass
        convert_out, compact_out = work / "convert.qcow2", work / "compact.qcow2"
        qcow2snap = [sys.executable, "-m", "qcow2snap"]
        conv, conv_nosync, comp = [], [], []
        for _ in range(args.runs):
            extra = ["-c", "-o", f"compression_type={args.compress}"] if args.compress else []
            plain, durable = timed(["qemu-img", "convert", *extra, "-O", "qcow2", str(image),
                                    str(convert_out)], convert_out, fsync=True)
            conv.append(durable)
            conv_nosync.append(plain)
            mine = ["--compress", args.compress] if args.compress else []
            _, durable = timed([*qcow2snap, "compact", str(image), "-o", str(compact_out),
                                "--no-progress", *mine], compact_out, fsync=False)
            comp.append(durable)
        conv_bytes, comp_bytes = allocated(convert_out), allocated(compact_out)
        if args.compress:   # data compressed: what each writes without compression
            packed = os.path.getsize(convert_out), os.path.getsize(compact_out)
            timed(["qemu-img", "convert", "-O", "qcow2", str(image), str(convert_out)],
                  convert_out, fsync=False)
            timed([*qcow2snap, "compact", str(image), "-o", str(compact_out), "--no-progress"],
                  compact_out, fsync=False)
            conv_bytes, comp_bytes = allocated(convert_out), allocated(compact_out)
            print(f"compressed outputs: convert {packed[0] / MIB:.1f} MiB, compact "
                  f"{packed[1] / MIB:.1f} MiB; the rates below are of the data compressed")
        rate_conv = conv_bytes / statistics.median(conv)
        rate_conv_nosync = conv_bytes / statistics.median(conv_nosync)
        rate_comp = comp_bytes / statistics.median(comp)
        print(f"source file: {os.path.getsize(image) / MIB:.0f} MiB "
              f"({allocated(image) / MIB:.0f} MiB allocated)")
        print(f"qemu-img convert -O qcow2 (active layer only): {conv_bytes / MIB:.0f} MiB in "
              f"{statistics.median(conv):.2f} s with fsync = {rate_conv / MIB:.0f} MiB/s "
              f"({statistics.median(conv_nosync):.2f} s, {rate_conv_nosync / MIB:.0f} MiB/s "
              f"without)")
        print(f"qcow2snap compact (every layer): {comp_bytes / MIB:.0f} MiB in "
              f"{statistics.median(comp):.2f} s = {rate_comp / MIB:.0f} MiB/s")
        what = "data compressed" if args.compress else "bytes written"
        print(f"{what} per second, compact / convert: {rate_comp / rate_conv:.2f} "
              f"(against convert without fsync: {rate_comp / rate_conv_nosync:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
