#!/usr/bin/env python3
"""Benchmarks of qcow2snap against qemu-img, side by side in one run.

Every case builds its own image with qemu-img / qemu-io in --workdir (kept
between runs, so the slow set-up happens once), warms the page cache, then
times the two tools alternately (ABBA order), N rounds each, and prints the median wall
time of each, their ratio (qcow2snap / qemu-img; below 1.0 = faster) and
the peak RSS of each child process (from wait4's rusage).

    python tools/bench.py extract     # extraction cases (a)-(d)
    python tools/bench.py qcow2       # qcow2 output (extract -O qcow2 [-c]) vs qemu-img convert
    python tools/bench.py list        # 10,000-snapshot listing
    python tools/bench.py all
    python tools/bench.py build       # only build the images (do it ahead)

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QCOW2SNAP = [sys.executable, "-m", "qcow2snap"]
GiB = 1 << 30
MiB = 1 << 20


def sh(*args: str, cwd: Path | None = None, quiet: bool = True) -> None:
    subprocess.run(list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


TIME = shutil.which("time") or "/usr/bin/time"


def timed(cmd: Sequence[str], cwd: Path | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that command).

    Dirty pages left by the previous run are flushed first (untimed), so no
    run pays for another's writeback.  Peak RSS comes from GNU time: the
    rusage of a child forked straight from this (bigger) Python process
    would include our own RSS, since ru_maxrss survives exec."""
    os.sync()
    rss_file = Path(cwd or ".") / ".bench-rss"
    use_time = os.path.exists(TIME)
    full = [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if use_time else list(cmd)
    start = time.perf_counter()
    proc = subprocess.run(full, cwd=cwd, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    rss = int(rss_file.read_text().split()[-1]) * 1024 if use_time else 0
    return elapsed, rss


def require_qemu(parser: argparse.ArgumentParser) -> None:
    """Stop with a usage error unless qemu-img and qemu-io are installed."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed (apt-get install qemu-utils)")


def prepare_timing() -> str:
    """Compile qcow2snap's bytecode (time it as pip installs it: an
    environment with PYTHONDONTWRITEBYTECODE=1 would make every run
    recompile every module) and describe the machine and the qemu-img."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall
    compileall.compile_dir(str(ROOT / "qcow2snap"), quiet=1)
    version = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, {version}")


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def compare(name: str, ours: Callable[[], Sequence[str]], theirs: Callable[[], Sequence[str]],
            rounds: int, cleanup: Callable[[], None], cwd: Path) -> dict[str, float | str]:
    """Alternate the two commands; return medians, ratio and peak RSS."""
    ours_t: list[float] = []
    theirs_t: list[float] = []
    ours_rss = theirs_rss = 0
    # one untimed run of each first: warms caches and imports
    for cmd in (ours(), theirs()):
        timed(cmd, cwd)
        cleanup()
    for round_index in range(rounds):
        # ABBA order: on this VM, a run's speed alternates with the run
        # before it (a big output's freshly freed page-cache pages are fast to
        # reuse; the next run's are not), so a fixed A/B order hands one
        # tool every slow slot
        pair = [(ours(), ours_t, True), (theirs(), theirs_t, False)]
        for cmd, times, is_ours in pair if round_index % 2 == 0 else pair[::-1]:
            t, rss = timed(cmd, cwd)
            times.append(t)
            if is_ours:
                ours_rss = max(ours_rss, rss)
            else:
                theirs_rss = max(theirs_rss, rss)
            cleanup()
    result: dict[str, float | str] = {
        "case": name,
        "qcow2snap_s": statistics.median(ours_t),
        "other_s": statistics.median(theirs_t),
        "ratio": statistics.median(ours_t) / statistics.median(theirs_t),
        # the median of each round's own ratio (the two runs of a round are
        # back to back, so a drift of the machine's speed cancels out)
        "pair_ratio": statistics.median([a / b for a, b in zip(ours_t, theirs_t, strict=True)]),
        "qcow2snap_min_s": min(ours_t),
        "other_min_s": min(theirs_t),
        "min_ratio": min(ours_t) / min(theirs_t),
        "qcow2snap_rss_mib": ours_rss / MiB,
        "other_rss_mib": theirs_rss / MiB,
    }
    print(f"{name:<44} qcow2snap {result['qcow2snap_s']:7.3f}s  other {result['other_s']:7.3f}s"
          f"  ratio {result['ratio']:5.2f} (paired {result['pair_ratio']:5.2f},"
          f" best-of {result['min_ratio']:5.2f})"
          f"  RSS {result['qcow2snap_rss_mib']:6.1f} MiB"
          f" vs {result['other_rss_mib']:6.1f} MiB", flush=True)
    return result


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def build_uncompressed(work: Path) -> Path:
    """(a) 4 GiB virtual, ~1.5 GiB allocated in 24 scattered 64 MiB writes,
    snapshot 1, then 6 overwrites so the active layer differs."""
    img = work / "a-uncompressed.qcow2"
    if img.exists():
        return img
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "4G")
    script = "\n".join(f"write -P {i + 1} {i * 160}M 64M" for i in range(24)) + "\n"
    subprocess.run(["qemu-io", str(tmp)], input=script.encode(), check=True,
                   stdout=subprocess.DEVNULL)
    sh("qemu-img", "snapshot", "-c", "s1", str(tmp))
    script = "\n".join(f"write -P {i + 100} {i * 640 + 8}M 16M" for i in range(6)) + "\n"
    subprocess.run(["qemu-io", str(tmp)], input=script.encode(), check=True,
                   stdout=subprocess.DEVNULL)
    tmp.rename(img)
    return img


def _compressible_raw(work: Path) -> Path:
    """1 GiB of compressible, non-repeating data (text-like lines)."""
    raw = work / "compressible.raw"
    if raw.exists():
        return raw
    tmp = raw.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        line = 0
        written = 0
        while written < GiB:
            chunk = "".join(f"{line + i:012d} the quick brown fox "
                            f"{((line + i) * 2654435761) % 1000003:07d} "
                            f"jumps over the lazy dog\n" for i in range(20000)).encode()
            chunk = chunk[:GiB - written]
            f.write(chunk)
            written += len(chunk)
            line += 20000
    tmp.rename(raw)
    return raw


def build_compressed(work: Path, ctype: str) -> Path:
    """(b)/(c) ~1 GiB compressible data, compressed clusters, one snapshot."""
    img = work / f"b-compressed-{ctype}.qcow2"
    if img.exists():
        return img
    raw = _compressible_raw(work)
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
       str(raw), str(tmp))
    sh("qemu-img", "snapshot", "-c", "s1", str(tmp))
    sh("qemu-io", "-c", "write -P 7 0 16M", str(tmp))
    tmp.rename(img)
    return img


def build_many_snapshots(work: Path, count: int = 10000) -> Path:
    """An image whose snapshot table has ``count`` entries.

    QEMU made the image and its first snapshot; the other entries are copies
    of that entry with fresh IDs and names, written as one table (making
    10,000 snapshots one qemu-img call at a time takes tens of minutes).
    Listing reads only the table, so this measures exactly the listing cost.
    """
    img = work / f"many-{count}.qcow2"
    if img.exists():
        return img
    sys.path.insert(0, str(ROOT))
    import qcow2snap
    from qcow2snap import format as fmt
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "1G")
    sh("qemu-io", "-c", "write -P 1 0 1M", str(tmp))
    sh("qemu-img", "snapshot", "-c", "seed", str(tmp))
    with qcow2snap.open(tmp) as image:
        seed = image.snapshots[0]
        cs = image.cluster_size
        end = image.file_size
    table = bytearray()
    for i in range(count):
        entry = seed.to_bytes()
        header_len = fmt.QCOW_SNAPSHOT_HEADER_SIZE + seed.extra_data_size
        id_ = str(i + 1).encode()
        name = f"snapshot-{i + 1:05d}".encode()
        head = bytearray(entry[:header_len])
        head[12:14] = len(id_).to_bytes(2, "big")
        head[14:16] = len(name).to_bytes(2, "big")
        table += bytes(fmt.align_up(len(table), 8) - len(table))
        table += head + id_ + name
    offset = fmt.align_up(end, cs)
    with open(tmp, "r+b") as f:
        f.seek(offset)
        f.write(table)
        f.seek(fmt.HEADER_OFFSET_NB_SNAPSHOTS)
        f.write(count.to_bytes(4, "big") + offset.to_bytes(8, "big"))
    tmp.rename(img)
    return img


def build_edit_image(work: Path) -> Path:
    """32 GiB virtual disk, ~3 GiB allocated in 3072 scattered 1 MiB writes,
    with a snapshot after every quarter of the writes (4 snapshots)."""
    img = work / "e-32g.qcow2"
    if img.exists():
        return img
    import random
    rng = random.Random(42)
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "32G")
    slots = rng.sample(range(32 * 1024), 3072)  # 1 MiB slots
    for quarter in range(4):
        part = slots[quarter * 768:(quarter + 1) * 768]
        script = "\n".join(f"write -P {(i % 250) + 1} {slot}M 1M"
                           for i, slot in enumerate(part)) + "\n"
        subprocess.run(["qemu-io", str(tmp)], input=script.encode(), check=True,
                       stdout=subprocess.DEVNULL)
        sh("qemu-img", "snapshot", "-c", f"q{quarter + 1}", str(tmp))
    tmp.rename(img)
    return img


def _text_chunks(work: Path, count: int = 8) -> list[Path]:
    """``count`` files of 1 MiB compressible, non-repeating text (for
    ``qemu-io write -s``)."""
    files = []
    for k in range(count):
        path = work / f"text-{k}.bin"
        if not path.exists():
            lines = "".join(f"{k:02d}{i:010d} the quick brown fox {(i * 2654435761) % 1000003:07d}"
                            f" jumps over the lazy dog\n" for i in range(16000)).encode()
            path.write_bytes(lines[:MiB].ljust(MiB, b"."))
        files.append(path)
    return files


def build_scattered(work: Path, compressible: bool = False) -> Path:
    """32 GiB virtual, ~3 GiB allocated in scattered writes of 64 KiB to
    1 MiB (64 KiB aligned), a snapshot after each GiB (3 snapshots), then
    256 MiB more so the active layer differs.  ``compressible``: the writes
    carry text (``qemu-io write -s``) instead of one-byte patterns."""
    img = work / ("s-32g-text.qcow2" if compressible else "s-32g.qcow2")
    if img.exists():
        return img
    import random
    rng = random.Random(16)
    texts = _text_chunks(work) if compressible else []
    tmp = img.with_suffix(".tmp")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "32G")
    slots = (32 * GiB) >> 16
    for phase, budget in enumerate((GiB, GiB, GiB, 256 * MiB)):
        lines: list[str] = []
        done = 0
        while done < budget:
            length = rng.randint(1, 16) << 16
            offset = rng.randrange(slots - 16) << 16
            fill = f"-s {texts[len(lines) % len(texts)]}" if texts else f"-P {len(lines) % 250 + 1}"
            lines.append(f"write {fill} {offset} {length}")
            done += length
        subprocess.run(["qemu-io", str(tmp)], input=("\n".join(lines) + "\n").encode(),
                       check=True, stdout=subprocess.DEVNULL)
        if phase < 3:
            sh("qemu-img", "snapshot", "-c", f"s{phase + 1}", str(tmp))
    tmp.rename(img)
    return img


# ---------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------

def suite_extract(work: Path, rounds: int) -> list[dict[str, float | str]]:
    out = work / "out.raw"

    def cleanup() -> None:
        if out.exists():
            out.unlink()

    results = []
    cases = [
        ("(a) 4 GiB virtual, 1.5 GiB uncompressed", build_uncompressed(work)),
        ("(b) 1 GiB compressible, zlib", build_compressed(work, "zlib")),
        ("(c) 1 GiB compressible, zstd", build_compressed(work, "zstd")),
    ]
    for name, img in cases:
        warm(img)
        results.append(compare(
            name,
            lambda img=img: [*QCOW2SNAP, "extract", "--no-progress", "1", str(img), "-o", str(out)],
            lambda img=img: ["qemu-img", "convert", "-l", "snapshot.id=1", "-O", "raw",
                             str(img), str(out)],
            rounds, cleanup, work))
    img = cases[0][1]
    copy = work / "copy.qcow2"

    def cleanup_copy() -> None:
        cleanup()
        if copy.exists():
            copy.unlink()

    # the data-path choice: copy_file_range (default) against pwrite from the
    # mapping (the copier's fallback, forced by hiding os.copy_file_range)
    pwrite_only = [sys.executable, "-c",
                   "import os, sys; del os.copy_file_range; from qcow2snap.cli import main; "
                   "main(sys.argv[1:])"]
    results.append(compare(
        "(a) data path: copy_file_range vs pwrite",
        lambda: [*QCOW2SNAP, "extract", "--no-progress", "1", str(img), "-o", str(out)],
        lambda: [*pwrite_only, "extract", "--no-progress", "1", str(img), "-o", str(out)],
        rounds, cleanup, work))
    results.append(compare(
        "(d) floor: (a) vs cp --sparse=always of its file",
        lambda: [*QCOW2SNAP, "extract", "--no-progress", "1", str(img), "-o", str(out)],
        lambda: ["cp", "--sparse=always", str(img), str(copy)],
        rounds, cleanup_copy, work))
    return results


def suite_qcow2(work: Path, rounds: int) -> list[dict[str, float | str]]:
    """qcow2 output: ``extract -O qcow2 [-c]`` against ``qemu-img convert -O
    qcow2 [-c] -l snapshot.name=...`` on the scattered 32 GiB images, both
    writing their output in ``work`` (the same file system as the source)."""
    out = work / "out.qcow2"

    def cleanup() -> None:
        if out.exists():
            out.unlink()

    plain, text = build_scattered(work), build_scattered(work, compressible=True)
    cases = [
        ("qcow2 out: 32 GiB, 3 GiB scattered, snapshot s3", plain, "s3", []),
        ("qcow2 out: the same, active layer", plain, None, []),
        ("qcow2 out -c: 32 GiB, 3 GiB of text, snapshot s3", text, "s3", ["-c"]),
    ]
    results = []
    for name, img, layer, flags in cases:
        warm(img)
        ours = [*QCOW2SNAP, "extract", "--no-progress", "-O", "qcow2", *flags, layer or "-",
                str(img), "-o", str(out)]
        theirs = ["qemu-img", "convert", "-O", "qcow2", *flags,
                  *(["-l", f"snapshot.name={layer}"] if layer else []), str(img), str(out)]
        results.append(compare(name, lambda ours=ours: ours, lambda theirs=theirs: theirs,
                               rounds, cleanup, work))
    return results


def suite_list(work: Path, rounds: int) -> list[dict[str, float | str]]:
    img = build_many_snapshots(work)
    warm(img)
    return [
        compare("list, 10,000 snapshots (text)",
                lambda: [*QCOW2SNAP, "list", str(img)],
                lambda: ["qemu-img", "snapshot", "-l", str(img)],
                rounds, lambda: None, work),
        compare("list --json, 10,000 snapshots vs qemu-img info --output=json",
                lambda: [*QCOW2SNAP, "list", "--json", str(img)],
                lambda: ["qemu-img", "info", "--output=json", str(img)],
                rounds, lambda: None, work),
    ]


def suite_edit(work: Path, rounds: int) -> list[dict[str, float | str]]:
    """create / delete / revert on a fresh copy of the 32 GiB image each run
    (the copy is made before the timer starts)."""
    img = build_edit_image(work)
    copy = work / "edit-copy.qcow2"

    def fresh() -> None:
        if copy.exists():
            copy.unlink()
        sh("cp", "--sparse=always", str(img), str(copy))
        warm(copy)

    cases = [
        ("create a snapshot (32 GiB, 3 GiB allocated, 4 snapshots)",
         [*QCOW2SNAP, "create", "new", str(copy)],
         ["qemu-img", "snapshot", "-c", "new", str(copy)]),
        ("delete snapshot q2",
         [*QCOW2SNAP, "delete", "q2", str(copy)], ["qemu-img", "snapshot", "-d", "q2", str(copy)]),
        ("revert to snapshot q1",
         [*QCOW2SNAP, "revert", "q1", str(copy)], ["qemu-img", "snapshot", "-a", "q1", str(copy)]),
    ]
    results = [compare("start-up floor: --version of each tool",
                       lambda: [*QCOW2SNAP, "--version"], lambda: ["qemu-img", "--version"],
                       rounds, lambda: None, work)]
    for name, ours, theirs in cases:
        fresh()
        results.append(compare(name, lambda ours=ours: ours, lambda theirs=theirs: theirs,
                               rounds, fresh, work))
    if copy.exists():
        copy.unlink()
    return results


def suite_build(work: Path, rounds: int) -> list[dict[str, float | str]]:
    """Only build every suite's images (slow, once), timing nothing: run it
    ahead, then time on a quiet machine."""
    for build in (build_uncompressed, build_scattered, lambda w: build_scattered(w, True),
                  lambda w: build_compressed(w, "zlib"),
                  lambda w: build_compressed(w, "zstd"), build_many_snapshots,
                  build_edit_image):
        print(f"built {build(work)}", flush=True)
    return []


SUITES = {"extract": suite_extract, "qcow2": suite_qcow2, "list": suite_list,
          "edit": suite_edit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "all", "build"])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench"),
                        help="where images are built and kept (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per tool")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    require_qemu(parser)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(prepare_timing(), flush=True)
    results = []
    if args.suite == "build":
        suite_build(args.workdir, args.rounds)
    for name in SUITES if args.suite == "all" else [] if args.suite == "build" else [args.suite]:
        results += SUITES[name](args.workdir, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
