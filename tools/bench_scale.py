#!/usr/bin/env python3
"""Scale benchmark: is the cost of ``info``, ``list``, ``check`` and every
edit independent of the virtual size at a fixed allocation?

Images of 1 GiB, 1 TiB and 64 TiB virtual (64 KiB clusters; their L1 tables
hold 2, 2,048 and 131,072 entries: 16 B, 16 KiB, 1 MiB) get the same
allocation: 16 writes of 256 KiB spread evenly over the disk (16 L2 tables,
4 MiB of data) and two snapshots, all made with qemu-img / qemu-io.  For
each size and command, qcow2snap and qemu-img (where it has the command)
run alternately with the same command on the 1 GiB image (ABBA, after one
untimed run of each): the median of the pairwise ratios size/1 GiB says how
each tool scales (1.0: independent of the virtual size); the ratio
qcow2snap/qemu-img at each size is printed beside it.

Edits are timed as pairs that leave the image as it was: ``create x`` then
``delete x``, ``rename s2 s2b`` then back, ``revert s1`` (idempotent).

    python tools/bench_scale.py --workdir /var/tmp/bs --rounds 5
    python tools/bench_scale.py --sizes 1G 64T --commands check create

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, ROOT  # tools/bench.py: the same interpreter and module

SIZES = {"1G": 1 << 30, "1T": 1 << 40, "64T": 64 << 40}
WRITES = 16
WRITE_BYTES = 256 << 10

#: command name -> (qcow2snap argv tail, qemu-img argv tail or None, undo tails).
#: IMG stands for the image path.
COMMANDS: dict[str, tuple[list[str], list[str] | None, list[list[str]], list[list[str]]]] = {
    "info": (["info", "IMG"], ["info", "IMG"], [], []),
    "list": (["list", "IMG"], ["snapshot", "-l", "IMG"], [], []),
    "list --json": (["list", "--json", "IMG"], ["info", "--output=json", "IMG"], [], []),
    "check": (["check", "IMG"], ["check", "IMG"], [], []),
    "create": (["create", "x", "IMG"], ["snapshot", "-c", "x", "IMG"],
               [[*QCOW2SNAP, "delete", "x", "IMG"]], [["qemu-img", "snapshot", "-d", "x", "IMG"]]),
    "delete": (["delete", "x", "IMG"], ["snapshot", "-d", "x", "IMG"],
               [[*QCOW2SNAP, "create", "x", "IMG"]], [["qemu-img", "snapshot", "-c", "x", "IMG"]]),
    "revert": (["revert", "s1", "IMG"], ["snapshot", "-a", "s1", "IMG"], [], []),
    "rename": (["rename", "s2", "s2b", "IMG"], None,
               [[*QCOW2SNAP, "rename", "s2b", "s2", "IMG"]], []),
}


def build(work: Path, label: str) -> Path:
    img = work / f"scale-{label}.qcow2"
    if img.exists():
        return img
    size = SIZES[label]
    tmp = img.with_suffix(".tmp")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(size)], check=True)
    step = size // WRITES
    ops = []
    for i in range(WRITES):
        ops += ["-c", f"write -P {0x10 + i} {i * step} {WRITE_BYTES}"]
    subprocess.run(["qemu-io", *ops, str(tmp)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(tmp)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x77 0 {WRITE_BYTES}", str(tmp)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "snapshot", "-c", "s2", str(tmp)], check=True)
    tmp.rename(img)
    return img


def _fill(argv: Sequence[str], img: Path) -> list[str]:
    return [str(img) if a == "IMG" else a for a in argv]


def run(cmd: Sequence[str], undo: Sequence[Sequence[str]], img: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(_fill(cmd, img), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(_fill(cmd, img))}\n"
                         f"{proc.stderr.decode(errors='replace')}")
    for u in undo:
        subprocess.run(_fill(u, img), check=True, stdout=subprocess.DEVNULL)
    return elapsed


def scaled(cmd: Sequence[str], undo: Sequence[Sequence[str]], base: Path, img: Path,
           rounds: int) -> tuple[float, float, float, list[float]]:
    """(median ratio img/base, median s on base, median s on img, times on img)."""
    run(cmd, undo, base)
    run(cmd, undo, img)
    tb: list[float] = []
    ti: list[float] = []
    for i in range(rounds):
        order = [(base, tb), (img, ti)] if i % 2 == 0 else [(img, ti), (base, tb)]
        for path, times in order:
            times.append(run(cmd, undo, path))
    ratios = [b / a for a, b in zip(tb, ti, strict=True)]
    return statistics.median(ratios), statistics.median(tb), statistics.median(ti), ti


def in_process(name: str, img: Path) -> float:
    """Seconds of one command through the API in this process (no start-up:
    what grows with the virtual size shows here undiluted)."""
    import qcow2snap
    from qcow2snap.ops.check import check_image
    from qcow2snap.ops.inspection import image_facts, snapshot_facts

    start = time.perf_counter()
    if name == "info":
        with qcow2snap.open(img) as image:
            image_facts(image, str(img))
    elif name == "list":
        with qcow2snap.open(img) as image:
            snapshot_facts(image)
    elif name == "check":
        check_image(img)
    else:
        with qcow2snap.open(img, "r+") as editor:
            if name == "create":
                editor.create_snapshot("x")
            elif name == "delete":
                editor.delete_snapshot("x")
            elif name == "revert":
                editor.revert_to_snapshot("s1")
            else:
                editor.rename_snapshot("s2", "s2b")
    elapsed = time.perf_counter() - start
    undo = {"create": lambda e: e.delete_snapshot("x"), "delete": lambda e: e.create_snapshot("x"),
            "rename": lambda e: e.rename_snapshot("s2b", "s2")}.get(name)
    if undo is not None:
        with qcow2snap.open(img, "r+") as editor:
            undo(editor)
    return elapsed


def main_in_process(args: argparse.Namespace, base: Path, images: dict[str, Path]) -> list[
        dict[str, float | str | None]]:
    results: list[dict[str, float | str | None]] = []
    for name in args.commands:
        if name == "list --json":   # the same facts as list
            continue
        for label, img in images.items():
            if name == "delete":
                for path in (base, img):
                    with __import__("qcow2snap").open(path, "r+") as editor:
                        editor.create_snapshot("x")
            in_process(name, base)
            in_process(name, img)
            tb: list[float] = []
            ti: list[float] = []
            for i in range(args.rounds):
                order = [(base, tb), (img, ti)] if i % 2 == 0 else [(img, ti), (base, tb)]
                for path, times in order:
                    times.append(in_process(name, path))
            ratio = statistics.median([b / a for a, b in zip(tb, ti, strict=True)])
            print(f"{name:<12} {label:>4} in-process: {statistics.median(ti) * 1e3:8.1f} ms "
                  f"({ratio:5.2f}x its 1 GiB {statistics.median(tb) * 1e3:7.1f} ms)", flush=True)
            results.append({"command": name, "size": label, "in_process_vs_1g": ratio,
                            "in_process_1g_s": statistics.median(tb),
                            "in_process_s": statistics.median(ti)})
            if name == "delete":
                for path in (base, img):
                    with __import__("qcow2snap").open(path, "r+") as editor:
                        editor.delete_snapshot("x")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench-scale"))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["1T", "64T"])
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-process", action="store_true",
                        help="time the API calls in this process instead of whole runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall
    compileall.compile_dir(str(ROOT / "qcow2snap"), quiet=1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = build(args.workdir, "1G")
    images = {label: build(args.workdir, label) for label in args.sizes}
    print(f"# {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}; "
          f"ratio = median of paired (size / 1 GiB) times", flush=True)
    if args.in_process:
        rows = main_in_process(args, base, images)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    results = []
    for name in args.commands:
        ours, theirs, ours_undo, theirs_undo = COMMANDS[name]
        for label, img in images.items():
            if name == "delete":   # the snapshot it deletes (its undo makes it again)
                for path in (base, img):
                    run([*QCOW2SNAP, "create", "x", "IMG"], [], path)
            r_ours, b_ours, t_ours, _ = scaled([*QCOW2SNAP, *ours], ours_undo, base, img,
                                               args.rounds)
            row: dict[str, float | str | None] = {
                "command": name, "size": label, "qcow2snap_vs_1g": r_ours,
                "qcow2snap_1g_s": b_ours, "qcow2snap_s": t_ours,
                "qemu_img_vs_1g": None, "qemu_img_1g_s": None, "qemu_img_s": None}
            line = (f"{name:<12} {label:>4}: qcow2snap {t_ours:7.3f}s ({r_ours:5.2f}x its 1 GiB "
                    f"{b_ours:6.3f}s)")
            if theirs is not None:
                r_qi, b_qi, t_qi, _ = scaled(["qemu-img", *theirs], theirs_undo, base, img,
                                             args.rounds)
                row.update(qemu_img_vs_1g=r_qi, qemu_img_1g_s=b_qi, qemu_img_s=t_qi)
                line += (f"  qemu-img {t_qi:7.3f}s ({r_qi:5.2f}x its 1 GiB {b_qi:6.3f}s)"
                         f"  qcow2snap/qemu-img {t_ours / t_qi:5.2f}")
            print(line, flush=True)
            results.append(row)
            if name == "delete":
                for path in (base, img):
                    run([*QCOW2SNAP, "delete", "x", "IMG"], [], path)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
