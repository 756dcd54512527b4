#!/usr/bin/env python3
"""Edits with many snapshots: ``qcow2snap create``/``delete`` against
``qemu-img snapshot -c``/``-d`` on images holding 1,000 and 10,000
snapshots, side by side in one run.

The images come from ``bench.build_many_snapshots`` (QEMU's first snapshot,
copied with fresh IDs and names into one table), then ``qemu-img check -r
all`` gives every shared cluster the refcount its references need, so both
tools edit a consistent image.  Every run starts from a fresh copy of it,
made inside the timed command on both sides (``cp --reflink=auto``), so
the copy's cost is paired.  Pairs run in ABBA order after one untimed run
of each (``bench_list.paired``); the median ratio qcow2snap / qemu-img is
printed.

    python tools/bench_many_edits.py                 # N = 1000 and 10000
    python tools/bench_many_edits.py --counts 10000 --rounds 9

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, build_many_snapshots
from bench_list import paired


def consistent_image(work: Path, count: int) -> Path:
    img = build_many_snapshots(work, count)
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(img)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        parser.error("qemu-img is needed (apt-get install qemu-utils)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-many-edits-"))
    work.mkdir(parents=True, exist_ok=True)
    ours_cli = " ".join(shlex.quote(a) for a in QCOW2SNAP)
    try:
        for count in args.counts:
            img = shlex.quote(str(consistent_image(work, count)))
            copy = f"cp --reflink=auto {img} w.qcow2 && exec"
            for label, ours, theirs in (
                    ("create", "create y w.qcow2", "snapshot -c y w.qcow2"),
                    ("delete", "delete snapshot-00005 w.qcow2",
                     "snapshot -d snapshot-00005 w.qcow2")):
                paired(f"{count} snapshots: {label}",
                       ["sh", "-c", f"{copy} {ours_cli} {ours}"],
                       ["sh", "-c", f"{copy} qemu-img {theirs}"], args.rounds, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
