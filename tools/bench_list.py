#!/usr/bin/env python3
"""Listing benchmark: ``qcow2snap list`` / ``list --json`` / ``info`` /
``info --json`` against ``qemu-img snapshot -l`` on images with thousands
of savevm snapshots, side by side in one run.

The images are built from ``fixtures/savevm.qcow2.gz`` (QEMU 7.2, three
savevm snapshots): a new snapshot table holds N copies of its first entry,
with fresh IDs (1..N), names (snap0..) and dates.  Two kinds per N:

``shared``
    every copy keeps the entry's L1 table, so all N share one VM state (the
    image of the bug report);
``own-l1``
    every copy gets its own copy of the L1 table, in a cluster of its own:
    no two snapshots look alike to qcow2snap's listing, which then reads
    every snapshot's stream (the short read of its end, the description
    compared with the one already decoded).  The copies still map the same
    data clusters, so the bytes read come from the page cache.

Each pair of commands runs alternately in ABBA order after one untimed run
of each; the ratio (qcow2snap / qemu-img, below 1 = faster) is taken pair by
pair and its median printed, with the median wall times, the best-of ratio
and each tool's peak RSS (GNU time).

    python tools/bench_list.py                      # N = 4096 and 65536
    python tools/bench_list.py --counts 4096 --rounds 9
    python tools/bench_list.py --workdir /var/tmp/lb --keep

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, ROOT, timed  # tools/bench.py: the same timing

MiB = 1 << 20
SOURCE = ROOT / "fixtures" / "savevm.qcow2.gz"
ENTRY = struct.Struct(">QIHHIIQII")   # a snapshot table entry's first 40 bytes
COMMANDS = {"list": ["list"], "list --json": ["list", "--json"], "info": ["info"],
            "info --json": ["info", "--json"]}


def build(source: Path, dest: Path, count: int, own_l1: bool) -> Path:
    """``source`` with its snapshot table replaced by ``count`` copies of
    entry 0 (the logic of the bug report's reproducer), each with its own
    copy of the L1 table when ``own_l1``.  Written sparse, in place."""
    if dest.exists():
        return dest
    data = source.read_bytes()
    cluster_size = 1 << struct.unpack_from(">I", data, 20)[0]
    table_offset = struct.unpack_from(">Q", data, 64)[0]
    (l1_offset, l1_size, _, _, date_sec, date_nsec, clock, vm_size,
     extra_len) = ENTRY.unpack_from(data, table_offset)
    extra = data[table_offset + 40:table_offset + 40 + extra_len]
    l1_table = data[l1_offset:l1_offset + 8 * l1_size]
    end = -(-len(data) // cluster_size) * cluster_size
    copies_at = end                                  # own_l1: one cluster per copy
    table_at = end + (count * cluster_size if own_l1 else 0)
    table = bytearray()
    for i in range(count):
        ident, name = str(i + 1).encode(), f"snap{i}".encode()
        l1 = copies_at + i * cluster_size if own_l1 else l1_offset
        table += bytes(-len(table) % 8)
        table += ENTRY.pack(l1, l1_size, len(ident), len(name), date_sec + i, date_nsec, clock,
                            vm_size, extra_len) + extra + ident + name
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if own_l1:
            for i in range(count):
                f.seek(copies_at + i * cluster_size)
                f.write(l1_table)
        f.seek(table_at)
        f.write(table)
        f.seek(60)                                   # nb_snapshots, snapshots_offset
        f.write(struct.pack(">IQ", count, table_at))
    tmp.rename(dest)
    return dest


def paired(name: str, ours: Sequence[str], theirs: Sequence[str], rounds: int,
           cwd: Path) -> dict[str, float | str]:
    """ABBA-alternated runs of the two commands; ratios pair by pair."""
    for cmd in (ours, theirs):            # untimed: imports, page cache
        timed(cmd, cwd)
    ours_t: list[float] = []
    theirs_t: list[float] = []
    ours_rss = theirs_rss = 0
    for i in range(rounds):
        order = [(ours, True), (theirs, False)]
        for cmd, is_ours in order if i % 2 == 0 else order[::-1]:
            t, rss = timed(cmd, cwd)
            if is_ours:
                ours_t.append(t)
                ours_rss = max(ours_rss, rss)
            else:
                theirs_t.append(t)
                theirs_rss = max(theirs_rss, rss)
    ratios = [a / b for a, b in zip(ours_t, theirs_t, strict=True)]
    result: dict[str, float | str] = {
        "case": name,
        "qcow2snap_s": statistics.median(ours_t),
        "qemu_img_s": statistics.median(theirs_t),
        "ratio": statistics.median(ratios),
        "best_of_ratio": min(ours_t) / min(theirs_t),
        "qcow2snap_rss_mib": ours_rss / MiB,
        "qemu_img_rss_mib": theirs_rss / MiB,
    }
    print(f"{name:<34} qcow2snap {result['qcow2snap_s']:7.3f}s  qemu-img "
          f"{result['qemu_img_s']:7.3f}s  ratio {result['ratio']:5.2f} (best-of "
          f"{result['best_of_ratio']:5.2f})  RSS {result['qcow2snap_rss_mib']:6.1f} MiB vs "
          f"{result['qemu_img_rss_mib']:5.1f} MiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--kinds", nargs="+", choices=["shared", "own-l1"],
                        default=["shared", "own-l1"])
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--rounds", type=int, default=6, help="timed runs of each tool per case")
    parser.add_argument("--workdir", type=Path,
                        help="where the images are built (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary workdir")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        parser.error("qemu-img is needed (apt-get install qemu-utils)")
    # as bench.py: time qcow2snap with its bytecode compiled, as pip installs it
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall
    compileall.compile_dir(str(ROOT / "qcow2snap"), quiet=1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-list-"))
    work.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {version}; images in {work}", flush=True)
    results = []
    try:
        source = work / "savevm.qcow2"
        if not source.exists():
            with gzip.open(SOURCE) as src, open(source, "wb") as dst:
                shutil.copyfileobj(src, dst)
        for count in args.counts:
            for kind in args.kinds:
                img = build(source, work / f"{kind}-{count}.qcow2", count, kind == "own-l1")
                for label in args.commands:
                    results.append(paired(
                        f"{count} {kind}: {label}", [*QCOW2SNAP, *COMMANDS[label], str(img)],
                        ["qemu-img", "snapshot", "-l", str(img)], args.rounds, work))
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
