#!/usr/bin/env python3
"""Check benchmark: ``qcow2snap check`` against ``qemu-img check`` on the
four kinds of image of issue 16, side by side in one run.

    (a) 32 GiB virtual, ~3 GiB allocated in scattered 64 KiB-1 MiB writes,
        3 snapshots (writes between them);
    (b) 1 TiB virtual, ~8 GiB allocated the same way, 3 snapshots;
    (c) 2 GiB with 512-byte clusters, fully written, 2 snapshots;
    (d) 200 GiB created with ``-o preallocation=metadata``, 2 snapshots.

The images are built with qemu-img / qemu-io in --workdir (kept between
runs: the set-up is slow, once; qemu-io reads one script of ``write -P``
lines from a fixed random seed).  Before timing, both tools must agree on
the image: the same exit status and the same counts (corruptions, leaks,
check errors, allocated / fragmented clusters, image end offset) from
``check --json`` and ``qemu-img check --output=json``.

Timing is whole-process, the two commands alternated in ABBA order after
one untimed run of each, the ratio (qcow2snap / qemu-img; below 1 = faster)
taken pair by pair and its median printed with each tool's peak RSS (GNU
time's %M), as ``bench_list.paired`` does, plus the median ratio of CPU
time (user + system, GNU time's %U %S): on a loaded machine the wall
ratio also measures who waited longer for a processor.  ``--in-process`` also times the check
inside this Python process (open + :class:`~qcow2snap.ops.check.Checker`
run, imports excluded) against qemu-img's whole run, paired the same way:
the figure a Python CLI's start-up cannot spoil.

    python tools/bench_check.py --workdir /var/tmp/bench-check
    python tools/bench_check.py --kinds a d --rounds 9 --in-process
    python tools/bench_check.py --build-only

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
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, ROOT, TIME, prepare_timing, require_qemu, sh, timed

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
#: the counts both tools print in JSON (qemu-img's key names)
AGREE_KEYS = ("check-errors", "corruptions", "leaks", "allocated-clusters",
              "fragmented-clusters", "image-end-offset", "total-clusters")


def qemu_io(img: Path, lines: list[str], *extra: str) -> None:
    """Run qemu-io once with ``lines`` as its command script."""
    subprocess.run(["qemu-io", *extra, str(img)], input=("\n".join(lines) + "\n").encode(),
                   check=True, stdout=subprocess.DEVNULL)


def scattered_writes(rng: random.Random, virtual_bytes: int, total_bytes: int) -> list[str]:
    """``write -P`` lines: 64 KiB-1 MiB writes (64 KiB aligned) at random
    places until ``total_bytes`` were written."""
    lines = []
    written = 0
    while written < total_bytes:
        length = rng.randrange(1, 17) * 64 * KiB
        offset = rng.randrange(0, (virtual_bytes - length) // (64 * KiB)) * 64 * KiB
        lines.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
        written += length
    return lines


def build_scattered(work: Path, name: str, virtual_bytes: int, allocated_bytes: int) -> Path:
    """(a)/(b): half the writes, then a snapshot and a sixth more writes,
    three times, so every snapshot differs from the next."""
    img = work / name
    if img.exists():
        return img
    rng = random.Random(16)
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(virtual_bytes))
    qemu_io(tmp, scattered_writes(rng, virtual_bytes, allocated_bytes // 2))
    for i in range(3):
        sh("qemu-img", "snapshot", "-c", f"s{i + 1}", str(tmp))
        qemu_io(tmp, scattered_writes(rng, virtual_bytes, allocated_bytes // 6))
    tmp.rename(img)
    return img


def build_small_clusters(work: Path) -> Path:
    """(c): 2 GiB of 512-byte clusters, every one written (``qemu-img
    convert`` of a raw file with no zero sector: qemu-io allocating 4 million
    clusters one write at a time takes half an hour); a snapshot; 16 MiB
    rewritten in scattered places; a second snapshot; 16 MiB more."""
    img = work / "c-2g-512.qcow2"
    if img.exists():
        return img
    rng = random.Random(16)
    tmp = img.with_suffix(".tmp")
    raw = work / "c-2g.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", str(raw), "2G")
    qemu_io(raw, [f"write -P {i + 1} {i * 64 * MiB} {64 * MiB}" for i in range(32)],
            "-f", "raw")
    sh("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=512", str(raw), str(tmp))
    raw.unlink()
    for i in range(2):
        sh("qemu-img", "snapshot", "-c", f"s{i + 1}", str(tmp))
        qemu_io(tmp, scattered_writes(rng, 2 * GiB, 16 * MiB))
    tmp.rename(img)
    return img


def build_preallocated(work: Path) -> Path:
    """(d): 200 GiB with preallocated metadata; a snapshot, a few writes, a
    second snapshot."""
    img = work / "d-200g-prealloc.qcow2"
    if img.exists():
        return img
    rng = random.Random(16)
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(tmp),
       "200G")
    for i in range(2):
        sh("qemu-img", "snapshot", "-c", f"s{i + 1}", str(tmp))
        qemu_io(tmp, scattered_writes(rng, 200 * GiB, 64 * MiB))
    tmp.rename(img)
    return img


KINDS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "a": ("(a) 32 GiB, 3 GiB scattered, 3 snapshots",
          lambda w: build_scattered(w, "a-32g.qcow2", 32 * GiB, 3 * GiB)),
    "b": ("(b) 1 TiB, 8 GiB scattered, 3 snapshots",
          lambda w: build_scattered(w, "b-1t.qcow2", 1 << 40, 8 * GiB)),
    "c": ("(c) 2 GiB, 512 B clusters, 2 snapshots", build_small_clusters),
    "d": ("(d) 200 GiB prealloc=metadata, 2 snapshots", build_preallocated),
}


def agree(img: Path) -> dict[str, int]:
    """Both tools' verdicts on ``img``; exits when they differ."""
    ours = subprocess.run([*QCOW2SNAP, "check", "--json", str(img)], capture_output=True,
                          text=True)
    theirs = subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                            capture_output=True, text=True)
    mine = json.loads(ours.stdout)
    qemu = json.loads(theirs.stdout)
    got = {k: mine.get(k, 0) for k in AGREE_KEYS}
    want = {k: qemu.get(k, 0) for k in AGREE_KEYS}
    if ours.returncode != theirs.returncode or got != want:
        raise SystemExit(f"{img}: qcow2snap and qemu-img disagree: exit "
                         f"{ours.returncode} vs {theirs.returncode}, {got} vs {want}")
    return want


def timed_cpu(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS in bytes of
    ``cmd`` (GNU time), after a sync so no run pays another's writeback."""
    os.sync()
    out = cwd / ".bench-check-time"
    start = time.perf_counter()
    proc = subprocess.run([TIME, "-f", "%M %U %S", "-o", str(out), *cmd], cwd=cwd,
                          stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    rss, user, system = out.read_text().split()[-3:]
    return wall, float(user) + float(system), int(rss) * 1024


def paired_cpu(name: str, ours: list[str], theirs: list[str], rounds: int,
               cwd: Path) -> dict[str, float | str]:
    """ABBA-alternated runs; wall and CPU ratios pair by pair, medians."""
    for cmd in (ours, theirs):            # untimed: imports, page cache
        timed_cpu(cmd, cwd)
    runs: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    for i in range(rounds):
        for is_ours in (True, False) if i % 2 == 0 else (False, True):
            runs[is_ours].append(timed_cpu(ours if is_ours else theirs, cwd))
    rss = {"qcow2snap_rss_mib": max(r[2] for r in runs[True]) / MiB,
           "qemu_img_rss_mib": max(r[2] for r in runs[False]) / MiB}
    return summary(name, [r[:2] for r in runs[True]], [r[:2] for r in runs[False]], rss)


def summary(name: str, a: list[tuple[float, float]], b: list[tuple[float, float]],
            extra: dict[str, float]) -> dict[str, float | str]:
    """Medians of wall and CPU time of each side, pairwise median ratios;
    printed on one line."""
    result: dict[str, float | str] = {
        "case": name,
        "qcow2snap_s": statistics.median(r[0] for r in a),
        "qemu_img_s": statistics.median(r[0] for r in b),
        "ratio": statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True)),
        "qcow2snap_cpu_s": statistics.median(r[1] for r in a),
        "qemu_img_cpu_s": statistics.median(r[1] for r in b),
        "cpu_ratio": statistics.median(x[1] / max(y[1], 0.005)
                                       for x, y in zip(a, b, strict=True)),
        **extra}
    memory = (f" | RSS {extra['qcow2snap_rss_mib']:6.1f} vs {extra['qemu_img_rss_mib']:5.1f} MiB"
              if extra else "  (in-process: open + check, no start-up)")
    print(f"{name:<44} wall {result['qcow2snap_s']:7.3f}s vs {result['qemu_img_s']:7.3f}s "
          f"ratio {result['ratio']:5.2f} | cpu {result['qcow2snap_cpu_s']:6.3f}s vs "
          f"{result['qemu_img_cpu_s']:6.3f}s ratio {result['cpu_ratio']:5.2f}{memory}",
          flush=True)
    return result


def in_process(name: str, img: Path, rounds: int, cwd: Path) -> dict[str, float | str]:
    """The check run inside this process (open, Checker.run, close) against
    qemu-img's whole run, alternated and paired as :func:`paired`."""
    sys.path.insert(0, str(ROOT))
    from qcow2snap.ops.check import check_image

    def ours() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        check_image(img)
        return time.perf_counter() - start, time.process_time() - cpu

    theirs = ["qemu-img", "check", str(img)]
    ours()
    timed(theirs, cwd)
    a: list[tuple[float, float]] = []
    b: list[tuple[float, float]] = []
    for i in range(rounds):
        order = [True, False] if i % 2 == 0 else [False, True]
        for is_ours in order:
            if is_ours:
                os.sync()
                a.append(ours())
            else:
                b.append(timed_cpu(theirs, cwd)[:2])
    return summary(name, a, b, {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench-check"),
                        help="where the images are built and kept (default: %(default)s)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--rounds", type=int, default=7, help="timed runs of each tool per case")
    parser.add_argument("--in-process", action="store_true",
                        help="also time the check inside this process against qemu-img")
    parser.add_argument("--build-only", action="store_true", help="only build the images")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    require_qemu(parser)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{prepare_timing()}; images in {args.workdir}", flush=True)
    results = []
    for kind in args.kinds:
        name, build = KINDS[kind]
        img = build(args.workdir)
        if args.build_only:
            print(f"built {img} ({img.stat().st_blocks * 512 / GiB:.1f} GiB allocated)",
                  flush=True)
            continue
        counts = agree(img)   # also warms the page cache (a 200 GiB sparse file
        # is not read whole)
        print(f"{name}: both tools agree: {counts}", flush=True)
        results.append(paired_cpu(name, [*QCOW2SNAP, "check", str(img)],
                                  ["qemu-img", "check", str(img)], args.rounds, args.workdir))
        if args.in_process:
            results.append(in_process(f"{name} (in-process)", img, args.rounds, args.workdir))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
