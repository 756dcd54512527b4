#!/usr/bin/env python3
"""Reading a snapshot through ``qcow2snap mount`` against ``qcow2snap extract``.

The image is tools/bench.py's case (a): 4 GiB virtual, ~1.5 GiB allocated
in 24 scattered 64 MiB runs, snapshot ``s1`` (built once in --workdir).
It is mounted once (``--background``); then, alternately (ABBA, as
tools/bench.py does):

* mount: a sequential read of ``1-s1/disk.raw``, all 4 GiB, with 1 MiB
  ``read()`` calls, into nothing (the mounted file's page cache is dropped
  first, so every byte comes through FUSE), once with the default mount
  and once with ``mount --direct-io``;
* extract: ``qcow2snap extract s1 IMAGE -o OUT`` (sparse raw output).

The issue's target: the read takes at most 2x the extraction.

    python tools/bench_mount.py [--rounds 3] [--workdir DIR]

This is a benchmark, not a test: nothing here runs in CI.  Needs qemu-img,
qemu-io, fusermount3 and qcow2snap[mount].
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # tools/bench.py: the image and the ABBA harness

READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
buf = bytearray(1 << 20)   # one buffer, as dd uses (a fresh 1 MiB each read costs page faults)
n = 0
while True:
    got = os.readv(fd, [buf])
    if not got:
        break
    n += got
assert n == os.fstat(fd).st_size, n
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2snap-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = bench.build_uncompressed(args.workdir)
    mnt = args.workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    out = args.workdir / "bench-mount-extract.raw"
    for options in ([], ["--direct-io"]):
        subprocess.run([*bench.QCOW2SNAP, "mount", "--background", *options, str(image),
                        str(mnt)], check=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mnt):
                if time.monotonic() > deadline:
                    raise SystemExit("the mount did not appear")
                time.sleep(0.05)
            disk = mnt / "1-s1" / "disk.raw"

            def cleanup() -> None:
                out.unlink(missing_ok=True)

            label = " ".join(["mount", *options])
            result = bench.compare(
                f"4 GiB snapshot: {label} read (1 MiB) / extract",
                lambda: [sys.executable, "-c", READER, str(disk)],  # noqa: B023
                lambda: [*bench.QCOW2SNAP, "extract", "s1", str(image), "-o", str(out),
                         "--no-progress"],
                args.rounds, cleanup, args.workdir)
            print(f"{label} read: median {result['qcow2snap_s']:.3f}s, "
                  f"best {result['qcow2snap_min_s']:.3f}s; extract: median "
                  f"{result['other_s']:.3f}s, best {result['other_min_s']:.3f}s")
            print(f"target: read <= 2x extract: median ratio {result['ratio']:.2f}, "
                  f"best-of {result['min_ratio']:.2f}", flush=True)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            while os.path.ismount(mnt):
                time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
