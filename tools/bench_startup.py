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

Yardsticks, paired with the bare interpreter the same way: ``python -c
pass`` (``site`` imported, as the console script has it: an editable
install's ``.pth`` finder loads there), ``python -c "import click"``, and a
minimal click program (a group with ``--version`` and one ``list`` command
taking ``click.Path`` arguments): the least any command line on click can
start in.  Each row gives the median of the wall-clock ratios and of the
CPU-time ratios (user + system of the child), pair by pair.

    python tools/bench_startup.py --rounds 21
    python tools/bench_startup.py --tree /var/tmp/before --rounds 21
    VENV/bin/python tools/bench_startup.py --installed   # a regular install

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import compileall
import gzip
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


#: the least a click command line does: a group with --version and one command
MINIMAL_CLICK = """\
import sys, click
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0", prog_name="x")
@click.option("--debug", is_flag=True)
def cli(debug): pass
@cli.command(name="list")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def list_(images, as_json): click.echo(images[0])
cli.main(args=sys.argv[1:], prog_name="x")
"""


def timed(cmd: Sequence[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def paired(cmd: Sequence[str], base: Sequence[str], cwd: Path, rounds: int
           ) -> tuple[float, float, float, float]:
    """Median ratios cmd/base (wall, CPU) over ABBA-ordered pairs, and both
    median wall times."""
    timed(cmd, cwd)
    timed(base, cwd)
    ratios, cpu_ratios, ours, theirs = [], [], [], []
    for i in range(rounds):
        if i % 2 == 0:
            a, b = timed(cmd, cwd), timed(base, cwd)
        else:
            b, a = timed(base, cwd), timed(cmd, cwd)
        ratios.append(a[0] / b[0])
        if b[1] > 0:
            cpu_ratios.append(a[1] / b[1])
        ours.append(a[0])
        theirs.append(b[0])
    return (statistics.median(ratios), statistics.median(cpu_ratios or [float("nan")]),
            statistics.median(ours), statistics.median(theirs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose qcow2snap package `python -m` runs "
                             "(default: this one)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench"))
    parser.add_argument("--rounds", type=int, default=21, help="timed pairs per command")
    parser.add_argument("--installed", action="store_true",
                        help="`python -m` runs the package installed with this interpreter "
                             "(from the work directory), not a tree's")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / "v3-basic.qcow2"
    if not image.exists():
        with gzip.open(ROOT / "fixtures" / "v3-basic.qcow2.gz") as src, open(image, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    cwd = args.workdir if args.installed else args.tree
    if not args.installed:
        compileall.compile_dir(str(args.tree / "qcow2snap"), quiet=1)
    python = sys.executable
    script = shutil.which("qcow2snap", path=str(Path(python).parent)) or "qcow2snap"
    bare = [python, "-I", "-c", "pass"]
    where = "installed" if args.installed else f"tree {args.tree}"
    print(f"Python {sys.version.split()[0]} ({python}), {where}, {args.rounds} pairs each")
    print(f"{'command':34s} {'ratio':>6s} {'cpu':>6s} {'command s':>10s} {'bare s':>8s}")

    def row(label: str, cmd: Sequence[str]) -> None:
        ratio, cpu_ratio, ours, theirs = paired(cmd, bare, cwd, args.rounds)
        print(f"{label:34s} {ratio:6.2f} {cpu_ratio:6.2f} {ours:10.4f} {theirs:8.4f}",
              flush=True)

    row("python -c pass", [python, "-c", "pass"])
    row("python -c 'import click'", [python, "-c", "import click"])
    row("minimal click program: list", [python, "-c", MINIMAL_CLICK, "list", str(image)])
    for label, tail in (("info", ["info", str(image)]), ("list", ["list", str(image)]),
                        ("--version", ["--version"])):
        row(f"python -m qcow2snap {label}", [python, "-m", "qcow2snap", *tail])
        row(f"qcow2snap (script) {label}", [script, *tail])
    if shutil.which("qemu-img"):
        row("qemu-img info", ["qemu-img", "info", str(image)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
