#!/usr/bin/env python3
"""Start-up benchmark: ``qcow2snap info`` / ``list`` / ``--version`` of a
small image against a bare interpreter (``python -I -c pass``) and
``qemu-img``, side by side in one run.

The image is ``fixtures/v3-basic.qcow2.gz`` (64 MiB, 3 snapshots), unpacked
into the work directory.  Each command is paired with the bare interpreter
of the same environment: the two run alternately in ABBA order after one
untimed run of each, and the ratio (command / bare interpreter) is taken
pair by pair and its median printed with the median wall times.  Each
command runs twice: as ``python -m qcow2snap`` from the tree (``--tree``:
another checkout, e.g. ``git archive`` of the code before a change, so that
before and after are timed in the same run) and as the installed
``qcow2snap`` console script (always the installed tree; its entry-point
wrapper also imports ``re``).

Bytecode is compiled first (``compileall``, as pip does on install): with
``PYTHONDONTWRITEBYTECODE`` set and no ``__pycache__``, every run would
compile every module.

    python tools/bench_startup.py --rounds 21
    python tools/bench_startup.py --tree /var/tmp/before --rounds 21

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import compileall
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: Sequence[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def paired(cmd: Sequence[str], base: Sequence[str], cwd: Path, rounds: int
           ) -> tuple[float, float, float]:
    """Median ratio cmd/base over ABBA-ordered pairs, and both median times."""
    timed(cmd, cwd)
    timed(base, cwd)
    ratios, ours, theirs = [], [], []
    for i in range(rounds):
        if i % 2 == 0:
            a, b = timed(cmd, cwd), timed(base, cwd)
        else:
            b, a = timed(base, cwd), timed(cmd, cwd)
        ratios.append(a / b)
        ours.append(a)
        theirs.append(b)
    return statistics.median(ratios), statistics.median(ours), statistics.median(theirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose qcow2snap package `python -m` runs "
                             "(default: this one)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench"))
    parser.add_argument("--rounds", type=int, default=21, help="timed pairs per command")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / "v3-basic.qcow2"
    if not image.exists():
        with gzip.open(ROOT / "fixtures" / "v3-basic.qcow2.gz") as src, open(image, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(str(args.tree / "qcow2snap"), quiet=1)
    python = sys.executable
    script = shutil.which("qcow2snap", path=str(Path(python).parent)) or "qcow2snap"
    bare = [python, "-I", "-c", "pass"]
    print(f"Python {sys.version.split()[0]}, tree {args.tree}, {args.rounds} pairs each")
    print(f"{'command':34s} {'ratio':>6s} {'command s':>10s} {'bare s':>8s}")
    for label, tail in (("info", ["info", str(image)]), ("list", ["list", str(image)]),
                        ("--version", ["--version"])):
        for how, cmd in (("python -m qcow2snap", [python, "-m", "qcow2snap", *tail]),
                         ("qcow2snap (script)", [script, *tail])):
            ratio, ours, theirs = paired(cmd, bare, args.tree, args.rounds)
            print(f"{how + ' ' + label:34s} {ratio:6.2f} {ours:10.4f} {theirs:8.4f}", flush=True)
    if shutil.which("qemu-img"):
        ratio, ours, theirs = paired(["qemu-img", "info", str(image)], bare, args.tree,
                                     args.rounds)
        print(f"{'qemu-img info':34s} {ratio:6.2f} {ours:10.4f} {theirs:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
