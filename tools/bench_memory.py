#!/usr/bin/env python3
"""Memory-export benchmark: ``qcow2snap vmstate memory`` against QEMU's own
route to the same bytes (start ``qemu-system-x86_64`` with ``-loadvm NAME
-S`` and run ``dump-guest-memory FILE`` on its monitor), side by side in one
run.

The image is a real Linux guest with 4 GiB of RAM, built here with
qemu-system-x86_64 under TCG (the kernel of ``fixtures/`` ``linux-guest``,
/boot/vmlinuz-*, and a busybox initramfs).  It holds two savevm snapshots:

``idle``
    taken once the guest's /init has run: mostly zero pages (the kernel and
    its page cache, ~100 MiB of data pages);
``filled``
    taken after /init filled a tmpfs with 1.5 GiB of non-zero data
    (256 MiB from /dev/urandom, copied five times): ~400,000 data pages.

QEMU's dump writes ELF only (no raw form), so both of our formats are
compared with that one route; the ELF outputs are compared byte for byte
once before timing.  Each pair runs alternately (ABBA) after one untimed run
of each; the median of the pairwise ratios (qcow2snap / QEMU, below 1 =
faster) is printed with the median wall times and each tool's peak RSS.

    python tools/bench_memory.py --workdir /var/tmp/bm --rounds 5
    python tools/bench_memory.py --build-only

This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import QCOW2SNAP, timed  # tools/bench.py: the same timing

MiB = 1 << 20
MEMORY_MIB = 4096
READY = "QCOW2SNAP-BENCH-READY"
FILLED = "QCOW2SNAP-BENCH-FILLED"
APPEND = "console=ttyS0 nokaslr panic=-1 quiet"
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=3g tmp /tmp
echo {READY}
sleep 20
dd if=/dev/urandom of=/tmp/r bs=1M count=256
for i in 1 2 3 4 5; do cat /tmp/r > /tmp/c$i; done
echo {FILLED}
exec sleep 1000000
"""


def kernel() -> str:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise SystemExit("no /boot/vmlinuz-*: apt-get install linux-image-amd64")
    return str(kernels[-1])


def vm_args(work: Path, img: Path) -> list[str]:
    """The machine both the build and QEMU's dump start (the same RAM blocks)."""
    return ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-nodefaults", "-display", "none",
            "-m", str(MEMORY_MIB), "-kernel", kernel(), "-initrd", str(work / "initrd.gz"),
            "-append", APPEND, "-drive", f"file={img},format=qcow2,if=ide"]


def build(work: Path) -> Path:
    img = work / "guest-4g.qcow2"
    if img.exists():
        return img
    root = work / "initramfs"
    for sub in ("bin", "dev", "proc", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    subprocess.run("find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1n "
                   "> ../initrd.gz", shell=True, cwd=root, check=True)
    tmp = img.with_suffix(".tmp")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "64M"], check=True)
    serial = work / "serial.log"
    serial.unlink(missing_ok=True)

    def wait(line: str) -> str:
        return (f"i=0; until grep -qa {line} {shlex.quote(str(serial))} 2>/dev/null; do "
                f"i=$((i+1)); [ $i -gt 2400 ] && break; sleep 0.25; done")
    feeder = (f"({wait(READY)}; printf 'savevm idle\\n'; {wait(FILLED)}; "
              f"printf 'savevm filled\\nquit\\n')")
    cmd = " ".join(shlex.quote(a) for a in vm_args(work, tmp))
    subprocess.run(f"{feeder} | timeout 900 {cmd} -serial file:{shlex.quote(str(serial))} "
                   f"-monitor stdio -no-reboot", shell=True, check=True,
                   stdout=subprocess.DEVNULL)
    if FILLED not in serial.read_text(errors="replace"):
        raise SystemExit(f"the guest never filled its memory; see {serial}")
    tmp.rename(img)
    return img


def qemu_dump(work: Path, img: Path, snapshot: str, out: Path) -> list[str]:
    monitor = f"dump-guest-memory {out}\nquit\n"
    cmd = " ".join(shlex.quote(a) for a in vm_args(work, img))
    return ["sh", "-c", f"printf {shlex.quote(monitor)} | {cmd} -loadvm {snapshot} -S -serial null "
            f"-monitor stdio >/dev/null"]


def ours(img: Path, snapshot: str, out: Path, fmt: str) -> list[str]:
    return [*QCOW2SNAP, "vmstate", "memory", snapshot, str(img), "-o", str(out),
            "--format", fmt, "-f"]


def compare(name: str, a: list[str], b: list[str], rounds: int, outputs: list[Path],
            cwd: Path) -> dict[str, float | str]:
    def clean() -> None:
        for p in outputs:
            p.unlink(missing_ok=True)
    a_t: list[float] = []
    b_t: list[float] = []
    ratios: list[float] = []
    a_rss = b_rss = 0
    for cmd in (a, b):
        timed(cmd, cwd)
        clean()
    for i in range(rounds):
        order = [(a, a_t), (b, b_t)] if i % 2 == 0 else [(b, b_t), (a, a_t)]
        for cmd, times in order:
            t, rss = timed(cmd, cwd)
            times.append(t)
            if cmd is a:
                a_rss = max(a_rss, rss)
            else:
                b_rss = max(b_rss, rss)
            clean()
        ratios.append(a_t[-1] / b_t[-1])
    result: dict[str, float | str] = {
        "case": name, "qcow2snap_s": statistics.median(a_t), "qemu_s": statistics.median(b_t),
        "ratio": statistics.median(ratios), "min_ratio": min(a_t) / min(b_t),
        "qcow2snap_rss_mib": a_rss / MiB, "qemu_rss_mib": b_rss / MiB}
    print(f"{name:<34} qcow2snap {result['qcow2snap_s']:7.3f}s  QEMU {result['qemu_s']:7.3f}s"
          f"  ratio {result['ratio']:5.2f} (best-of {result['min_ratio']:5.2f})"
          f"  RSS {result['qcow2snap_rss_mib']:6.1f} vs {result['qemu_rss_mib']:6.1f} MiB",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench-memory"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--snapshots", default="idle,filled")
    parser.add_argument("--formats", default="elf,raw")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    img = build(work)
    if args.build_only:
        return 0
    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"{MEMORY_MIB} MiB guest", flush=True)
    results = []
    theirs_out = work / "qemu.elf"
    for snapshot in args.snapshots.split(","):
        mine = work / "ours.out"
        subprocess.run(ours(img, snapshot, mine, "elf"), check=True, stdout=subprocess.DEVNULL)
        subprocess.run(qemu_dump(work, img, snapshot, theirs_out), check=True)
        if not filecmp.cmp(mine, theirs_out, shallow=False):
            raise SystemExit(f"{snapshot}: our ELF differs from dump-guest-memory's")
        for p in (mine, theirs_out):
            p.unlink()
        for fmt in args.formats.split(","):
            results.append(compare(f"{snapshot}: {fmt} vs dump-guest-memory",
                                   ours(img, snapshot, mine, fmt),
                                   qemu_dump(work, img, snapshot, theirs_out), args.rounds,
                                   [mine, theirs_out], work))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
