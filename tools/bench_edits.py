#!/usr/bin/env python3
"""Edits on big images: create / delete / revert / rename against
``qemu-img snapshot -c/-d/-a`` (rename has no qemu-img counterpart: it is
compared with ``-c``), side by side in one run.

Images, built with qemu-img / qemu-io in --workdir and kept between runs:

(a) 32 GiB virtual, ~3 GiB allocated in scattered 64 KiB-1 MiB writes, a
    snapshot after each of the first three quarters of the writes;
(b) 1 TiB virtual, ``--big-gib`` (default 8) GiB allocated the same way, 3
    snapshots;
(c) 2 GiB with 512-byte clusters, fully written, 2 snapshots (4 million
    clusters, 65,536 L2 tables, 16,384 refcount blocks);
(e) ``--huge-tib`` (default 4) TiB with preallocated metadata (every L2
    entry allocated, sparse on disk: ~512 MiB of L2 tables for 4 TiB), 2
    snapshots: the memory bound of edits (issue 16).

What is measured:

1. ``inproc``: the API call in this process, ``qcow2snap.open(path, "r+")``
   through the edit to ``close()``, against qemu-img's whole run of the same
   operation; pairs alternate (ABBA), the median of the pair ratios is
   printed.  The file system has no reflinks and copying (b) per run costs
   more than the edit, so every timed run starts from the same state by an
   untimed undo with qemu-img: create NEW is undone by ``-d NEW``; a delete
   deletes a snapshot ``-c`` made just before it; a revert to q1 runs after
   an untimed ``-c undo`` and is undone by ``-a undo`` + ``-d undo`` (so the
   timed revert sees 4 snapshots); rename is undone by renaming back
   (untimed, through the API).
2. ``cli``: the same with ``python -m qcow2snap`` (whole process) against
   qemu-img, same pairing and undo.
3. ``rss``: peak RSS (GNU time's %M) of each CLI edit on (c) (with
   ``all``; any image with ``--images``), next to qemu-img's; after each
   of our edits ``qemu-img check`` must be clean, and ``qemu-img snapshot
   -l`` (dates masked) is compared with the list qemu-img's own edit leaves.
4. ``cpu``: CPU seconds (user + system, GNU time) and peak RSS of each CLI
   edit against qemu-img's, ABBA pairs, the median of the CPU ratios.
5. ``batch``: ``qcow2snap create NAME IMG1 ... IMG100`` against a shell loop
   of ``qemu-img snapshot -c NAME`` over the same 100 small images (each
   side undone by a loop of ``-d``, untimed).

    python tools/bench_edits.py build               # only build (slow, once)
    python tools/bench_edits.py all --rounds 7
    python tools/bench_edits.py inproc --images a c
    python tools/bench_edits.py profile --images c --op create   # cProfile, top 25

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, ROOT, sh, timed, warm  # tools/bench.py: the same timing

sys.path.insert(0, str(ROOT))
MiB = 1 << 20
OPS = ("create", "delete", "revert", "revert-other", "rename")
#: revert: to q1; revert-other: to q2.  A revert skips the tables the
#: snapshot shares with the active layer (docs/performance.md), and which
#: snapshot shares them depends on the image's history (the (a) these
#: numbers came from had the active layer at q1 after an interrupted run),
#: so both are measured
QEMU_ARGS = {"create": ["-c", "new"], "delete": ["-d", "victim"], "revert": ["-a", "q1"],
             "revert-other": ["-a", "q2"], "rename": ["-c", "new"]}
CLI_ARGS = {"create": ["create", "new"], "delete": ["delete", "victim"],
            "revert": ["revert", "q1"], "revert-other": ["revert", "q2"],
            "rename": ["rename", "q2", "renamed"]}


# ---------------------------------------------------------------------------
# images

def _scattered(img: Path, virtual_gib: int, allocated_gib: float, seed: int) -> Path:
    """``virtual_gib`` GiB image, ``allocated_gib`` written in random 64 KiB
    - 1 MiB writes at random 64 KiB-aligned places, a snapshot (q1..q3)
    after each of the first three quarters."""
    if img.exists():
        return img
    rng = random.Random(seed)
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), f"{virtual_gib}G")
    slots = (virtual_gib << 30) >> 16
    writes: list[str] = []
    total = 0
    while total < allocated_gib * (1 << 30):
        length = rng.randint(1, 16) << 16
        start = rng.randrange(slots - 16) << 16
        writes.append(f"write -P {len(writes) % 250 + 1} {start} {length}")
        total += length
    quarter = -(-len(writes) // 4)
    for q in range(4):
        script = "\n".join(writes[q * quarter:(q + 1) * quarter]) + "\n"
        subprocess.run(["qemu-io", str(tmp)], input=script.encode(), check=True,
                       stdout=subprocess.DEVNULL)
        if q < 3:
            sh("qemu-img", "snapshot", "-c", f"q{q + 1}", str(tmp))
    tmp.rename(img)
    return img


def build_a(work: Path, big_gib: float = 8) -> Path:
    return _scattered(work / "a-32g.qcow2", 32, 3, 1)


def build_b(work: Path, big_gib: float = 8) -> Path:
    return _scattered(work / f"b-1t-{big_gib:g}g.qcow2", 1024, big_gib, 2)


def build_c(work: Path, big_gib: float = 8) -> Path:
    """2 GiB, 512-byte clusters, every cluster written; snapshot q1, 256 MiB
    rewritten, snapshot q2, 64 MiB rewritten (the active layer differs)."""
    img = work / "c-2g-512.qcow2"
    if img.exists():
        return img
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(tmp), "2G")
    script = "".join(f"write -P {i + 1} {i * 256}M 256M\n" for i in range(8))
    subprocess.run(["qemu-io", str(tmp)], input=script.encode(), check=True,
                   stdout=subprocess.DEVNULL)
    sh("qemu-img", "snapshot", "-c", "q1", str(tmp))
    sh("qemu-io", "-c", "write -P 90 512M 256M", str(tmp))
    sh("qemu-img", "snapshot", "-c", "q2", str(tmp))
    sh("qemu-io", "-c", "write -P 91 1536M 64M", str(tmp))
    tmp.rename(img)
    return img


def build_e(work: Path, big_gib: float = 8) -> Path:
    """``HUGE_TIB`` TiB, ``preallocation=metadata`` (every guest cluster has
    a host cluster, the file is sparse), snapshots q1 and q2."""
    img = work / f"e-{HUGE_TIB:g}t-prealloc.qcow2"
    if img.exists():
        return img
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(tmp),
       f"{HUGE_TIB:g}T")
    sh("qemu-img", "snapshot", "-c", "q1", str(tmp))
    sh("qemu-img", "snapshot", "-c", "q2", str(tmp))
    tmp.rename(img)
    return img


#: virtual size of image (e), TiB (``--huge-tib``)
HUGE_TIB = 4.0

BUILDERS: dict[str, Callable[..., Path]] = {"a": build_a, "b": build_b, "c": build_c,
                                            "e": build_e}


def build_small(work: Path, count: int = 100) -> list[Path]:
    """``count`` small images (64 MiB virtual, 1 MiB written, one snapshot)."""
    out = []
    seed = work / "small-seed.qcow2"
    if not seed.exists():
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(seed), "64M")
        sh("qemu-io", "-c", "write -P 7 0 1M", str(seed))
        sh("qemu-img", "snapshot", "-c", "base", str(seed))
    for i in range(count):
        img = work / f"small-{i:03d}.qcow2"
        if not img.exists():
            sh("cp", str(seed), str(img))
        out.append(img)
    return out


# ---------------------------------------------------------------------------
# undo around each timed run (untimed)

def qemu_snapshot(img: Path, *args: str) -> None:
    sh("qemu-img", "snapshot", *args, str(img))


def prepare(op: str, img: Path) -> None:
    if op == "delete":
        qemu_snapshot(img, "-c", "victim")
    elif op in ("revert", "revert-other"):
        qemu_snapshot(img, "-c", "undo")


def undo(op: str, img: Path, ours: bool) -> None:
    if op == "create" or (op == "rename" and not ours):
        qemu_snapshot(img, "-d", "new")
    elif op in ("revert", "revert-other"):
        qemu_snapshot(img, "-a", "undo")
        qemu_snapshot(img, "-d", "undo")
    elif op == "rename":
        import qcow2snap
        with qcow2snap.open(img, "r+") as image:
            image.rename_snapshot("renamed", "q2")


def api_edit(op: str, img: Path) -> None:
    import qcow2snap
    with qcow2snap.open(img, "r+") as image:
        if op == "create":
            image.create_snapshot("new")
        elif op == "delete":
            image.delete_snapshot("victim")
        elif op == "revert":
            image.revert_to_snapshot("q1")
        elif op == "revert-other":
            image.revert_to_snapshot("q2")
        else:
            image.rename_snapshot("q2", "renamed")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_timed(cmd: Sequence[str], cwd: Path) -> tuple[float, int, float]:
    """(wall s, peak RSS, CPU s: user + system of the whole run, GNU time's
    own ~1 ms included)."""
    before = _children_cpu()
    wall, rss = timed(cmd, cwd)
    return wall, rss, _children_cpu() - before


def _api_timed(op: str, img: Path) -> tuple[float, int, float]:
    os.sync()
    cpu = time.process_time()
    start = time.perf_counter()
    api_edit(op, img)
    return time.perf_counter() - start, 0, time.process_time() - cpu


def paired_op(label: str, op: str, img: Path, rounds: int,
              ours: Callable[[], tuple[float, int, float]],
              work: Path) -> dict[str, float | str]:
    """ABBA pairs of (ours, qemu-img) on ``img``, each run prepared and undone
    untimed; the median of pair ratios, of wall and of CPU time (user +
    system: the in-process API's own, qemu-img's whole run's), which the
    machine's load disturbs less."""
    theirs_cmd = ["qemu-img", "snapshot", *QEMU_ARGS[op], str(img)]
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    ours_cpu: list[float] = []
    theirs_cpu: list[float] = []
    ours_t: list[float] = []
    theirs_t: list[float] = []
    ours_rss = theirs_rss = 0
    for round_index in range(rounds + 1):   # round 0 is the untimed warm-up
        pair: list[bool] = [True, False] if round_index % 2 == 0 else [False, True]
        got: dict[bool, float] = {}
        cpu: dict[bool, float] = {}
        for is_ours in pair:
            prepare(op, img)
            t, rss, cpu[is_ours] = ours() if is_ours else _run_timed(theirs_cmd, work)
            undo(op, img, is_ours)
            got[is_ours] = t
            if is_ours:
                ours_rss = max(ours_rss, rss)
            else:
                theirs_rss = max(theirs_rss, rss)
        if round_index:
            ours_t.append(got[True])
            theirs_t.append(got[False])
            ratios.append(got[True] / got[False])
            ours_cpu.append(cpu[True])
            theirs_cpu.append(cpu[False])
            cpu_ratios.append(cpu[True] / max(cpu[False], 1e-3))
    result: dict[str, float | str] = {
        "case": label, "qcow2snap_s": statistics.median(ours_t),
        "qemu_s": statistics.median(theirs_t), "ratio": statistics.median(ratios),
        "qcow2snap_rss_mib": ours_rss / MiB, "qemu_rss_mib": theirs_rss / MiB,
        "qcow2snap_cpu_s": statistics.median(ours_cpu), "qemu_cpu_s": statistics.median(theirs_cpu),
        "cpu_ratio": statistics.median(cpu_ratios)}
    rss = (f"  RSS {ours_rss / MiB:6.1f} vs {theirs_rss / MiB:6.1f} MiB" if ours_rss else "")
    print(f"{label:<34} qcow2snap {result['qcow2snap_s']:7.3f}s  qemu-img "
          f"{result['qemu_s']:7.3f}s  ratio {result['ratio']:5.2f} "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]{rss}", flush=True)
    print(f"{'':<34} CPU: qcow2snap {result['qcow2snap_cpu_s']:7.3f}s  qemu-img "
          f"{result['qemu_cpu_s']:7.3f}s  ratio {result['cpu_ratio']:5.2f} "
          f"[{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}]", flush=True)
    return result


def snapshot_listing(img: Path) -> str:
    """``qemu-img snapshot -l``, creation dates masked."""
    import re
    out = subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True,
                         text=True, check=True).stdout
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", out)


def check_clean(img: Path) -> None:
    proc = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{img} is not clean after the runs:\n{proc.stdout}{proc.stderr}")


# ---------------------------------------------------------------------------
# suites

def _paired_suite(kind: str, work: Path, images: Sequence[str], ops: Sequence[str],
                  rounds: int, big_gib: float) -> list[dict[str, float | str]]:
    """``kind`` "API" (in this process) or "CLI" against qemu-img, every
    image and operation; each image is checked clean afterwards."""
    results = []
    for key in images:
        img = BUILDERS[key](work, big_gib)
        warm(img)
        for op in ops:
            cmd = [*QCOW2SNAP, *CLI_ARGS[op], str(img)]
            ours: Callable[[], tuple[float, int, float]] = (
                (lambda op=op, img=img: _api_timed(op, img)) if kind == "API"
                else (lambda cmd=cmd: _run_timed(cmd, work)))
            results.append(paired_op(f"({key}) {kind} {op}", op, img, rounds, ours, work))
        check_clean(img)
    return results


def suite_inproc(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
                 big_gib: float) -> list[dict[str, float | str]]:
    import qcow2snap  # noqa: F401  - imported once, as a long-lived program would
    return _paired_suite("API", work, images, ops, rounds, big_gib)


def suite_cli(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
              big_gib: float) -> list[dict[str, float | str]]:
    return _paired_suite("CLI", work, images, ops, rounds, big_gib)


def suite_rss(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
              big_gib: float) -> list[dict[str, float | str]]:
    """Peak RSS of each CLI edit (one run each; RSS does not need pairs)."""
    results: list[dict[str, float | str]] = []
    for key in images:
        img = BUILDERS[key](work, big_gib)
        for op in ops:
            prepare(op, img)
            _, ours, _ = _run_timed([*QCOW2SNAP, *CLI_ARGS[op], str(img)], work)
            check_clean(img)
            ours_list = snapshot_listing(img)
            undo(op, img, True)
            prepare(op, img)
            _, theirs, _ = _run_timed(["qemu-img", "snapshot", *QEMU_ARGS[op], str(img)], work)
            theirs_list = snapshot_listing(img)
            undo(op, img, False)
            same = "" if op == "rename" else (
                "  same snapshot -l" if ours_list == theirs_list else "  snapshot -l DIFFERS")
            print(f"({key}) peak RSS {op:<8} qcow2snap {ours / MiB:6.1f} MiB  qemu-img "
                  f"{theirs / MiB:6.1f} MiB  check clean{same}", flush=True)
            if same.endswith("DIFFERS"):
                print(ours_list, theirs_list, sep="\n", flush=True)
            results.append({"case": f"({key}) rss {op}", "qcow2snap_rss_mib": ours / MiB,
                            "qemu_rss_mib": theirs / MiB})
        check_clean(img)
    return results


def _cpu_timed(cmd: Sequence[str], work: Path) -> tuple[float, int]:
    """(user + system CPU seconds, peak RSS bytes) of one run, by GNU time."""
    os.sync()
    out = work / ".bench-cpu"
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(out), *cmd],
                          cwd=work, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    user, system, rss = out.read_text().split()[-3:]
    return float(user) + float(system), int(rss) * 1024


def suite_cpu(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
              big_gib: float) -> list[dict[str, float | str]]:
    """CPU seconds (user + system) and peak RSS of each CLI edit against
    qemu-img's, ABBA pairs, each run prepared and undone untimed; the
    median of the pair ratios of CPU seconds."""
    results: list[dict[str, float | str]] = []
    for key in images:
        img = BUILDERS[key](work, big_gib)
        for op in ops:
            commands = {True: [*QCOW2SNAP, *CLI_ARGS[op], str(img)],
                        False: ["qemu-img", "snapshot", *QEMU_ARGS[op], str(img)]}
            ratios: list[float] = []
            got: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
            for round_index in range(rounds):
                pair = [True, False] if round_index % 2 == 0 else [False, True]
                cpu: dict[bool, float] = {}
                for is_ours in pair:
                    prepare(op, img)
                    cpu[is_ours], rss = _cpu_timed(commands[is_ours], work)
                    undo(op, img, is_ours)
                    got[is_ours].append((cpu[is_ours], rss))
                ratios.append(cpu[True] / max(cpu[False], 1e-3))
            ours_cpu = statistics.median(c for c, _ in got[True])
            theirs_cpu = statistics.median(c for c, _ in got[False])
            ours_rss = max(r for _, r in got[True]) / MiB
            theirs_rss = max(r for _, r in got[False]) / MiB
            print(f"({key}) CPU {op:<8} qcow2snap {ours_cpu:8.2f}s  qemu-img {theirs_cpu:8.2f}s  "
                  f"ratio {statistics.median(ratios):5.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                  f"  peak RSS {ours_rss:6.1f} vs {theirs_rss:6.1f} MiB", flush=True)
            results.append({"case": f"({key}) cpu {op}", "ratio": statistics.median(ratios),
                            "qcow2snap_rss_mib": ours_rss, "qemu_rss_mib": theirs_rss})
        check_clean(img)
    return results


def suite_batch(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
                big_gib: float) -> list[dict[str, float | str]]:
    smalls = build_small(work / "small")
    names = " ".join(shlex.quote(str(p)) for p in smalls)
    ours = ["sh", "-c", f"exec {' '.join(shlex.quote(a) for a in QCOW2SNAP)} create new {names}"]
    theirs = ["sh", "-c", f"for i in {names}; do qemu-img snapshot -c new $i || exit 1; done"]
    ratios: list[float] = []
    for round_index in range(rounds + 1):
        pair = [(True, ours), (False, theirs)]
        got: dict[bool, float] = {}
        for is_ours, cmd in pair if round_index % 2 == 0 else pair[::-1]:
            got[is_ours] = _run_timed(cmd, work)[0]
            sh("sh", "-c", f"for i in {names}; do qemu-img snapshot -d new $i; done")
        if round_index:
            ratios.append(got[True] / got[False])
            print(f"  batch round {round_index}: qcow2snap {got[True]:.3f}s  loop "
                  f"{got[False]:.3f}s", flush=True)
    print(f"batch create over 100 images vs a qemu-img loop: median ratio "
          f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]", flush=True)
    return [{"case": "batch create x100", "ratio": statistics.median(ratios)}]


def suite_profile(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
                  big_gib: float) -> list[dict[str, float | str]]:
    import cProfile
    import pstats

    import qcow2snap  # noqa: F401
    for key in images:
        img = BUILDERS[key](work, big_gib)
        for op in ops:
            prepare(op, img)
            profiler = cProfile.Profile()
            profiler.enable()
            api_edit(op, img)
            profiler.disable()
            undo(op, img, True)
            print(f"=== ({key}) {op}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return []


def suite_build(work: Path, images: Sequence[str], ops: Sequence[str], rounds: int,
                big_gib: float) -> list[dict[str, float | str]]:
    for key in images:
        print(f"built {BUILDERS[key](work, big_gib)}", flush=True)
    build_small(work / "small")
    return []


SUITES = {"inproc": suite_inproc, "cli": suite_cli, "rss": suite_rss, "cpu": suite_cpu,
          "batch": suite_batch,
          "profile": suite_profile, "build": suite_build}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench-edits"))
    parser.add_argument("--images", nargs="+", default=["a", "b", "c"], choices=list(BUILDERS))
    parser.add_argument("--op", nargs="+", default=list(OPS), choices=OPS, dest="ops")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big-gib", type=float, default=8,
                        help="GiB allocated in image (b) (default %(default)s)")
    parser.add_argument("--huge-tib", type=float, default=4.0,
                        help="virtual TiB of image (e) (default %(default)s)")
    args = parser.parse_args(argv)
    global HUGE_TIB
    HUGE_TIB = args.huge_tib
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "small").mkdir(exist_ok=True)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    suites = ["inproc", "cli", "rss", "batch"] if args.suite == "all" else [args.suite]
    for name in suites:
        images = ["c"] if name == "rss" and args.suite == "all" else args.images
        SUITES[name](args.workdir, images, args.ops, args.rounds, args.big_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
