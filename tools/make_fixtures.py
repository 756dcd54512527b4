#!/usr/bin/env python3
"""Regenerate the qcow2 test fixtures in ``fixtures/`` with the real QEMU tools.

Every fixture is built from scratch in its own scratch directory by running
``qemu-img`` / ``qemu-io`` (and, for the savevm fixture, ``qemu-system-x86_64``
under TCG) as shell commands whose working directory is that scratch directory,
so backing files and external data files are referenced by *relative* names.
The linux-guest fixture also needs the Debian packages linux-image-amd64,
busybox-static and cpio (its kernel and initramfs; the tests do not).
Guest data is written with deterministic ``qemu-io`` patterns (``write -P``,
``write -z``, ``write -c``, ``discard``), so the guest-visible content of every
image and snapshot is reproducible; only snapshot dates (and, for LUKS, the
random key material; for the savevm fixtures, the guest clock and VM state)
differ between runs.

For each image the script records in ``manifest.json``:

* the exact shell commands that made it (cwd = scratch directory),
* sha256 and size of the decompressed image (and of each companion file),
* ``qemu-img info --output=json`` minus machine-specific keys,
* sha256 of the active layer converted to raw,
* for every snapshot (table order): id, name, its own disk size (parsed from
  the snapshot table extra data), VM state size and sha256 of its guest
  content at its own disk size, obtained either with
  ``qemu-img convert -l snapshot.id=ID`` ("convert-l") or, when the snapshot's
  size differs from the current size, by reverting a scratch copy with
  ``qemu-img snapshot -a ID`` and converting that ("revert-copy").

Images and their companions are stored gzip-compressed (level 9, mtime 0), as
``NAME.qcow2.gz`` and e.g. ``NAME.base.qcow2.gz``.

Usage::

    python tools/make_fixtures.py                 # rebuild everything into fixtures/
    python tools/make_fixtures.py --out /tmp/fx   # somewhere else
    python tools/make_fixtures.py --only v2 luks  # rebuild some, merge manifest

Only the Python 3.11 standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR = "tools/make_fixtures.py"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "fixtures"

# Secret used for the encrypted fixtures, luks and aes (recorded in the manifest as "secret").
LUKS_SECRET = "qcow2snap"

# Keys of `qemu-img info` output that depend on the machine/path and are dropped.
MACHINE_SPECIFIC_INFO_KEYS = (
    "filename",
    "actual-size",
    "backing-filename-full",
    "full-backing-filename",
)

TAG_VOCABULARY = frozenset(
    {
        "v2", "v3", "small-clusters", "large-clusters",
        "refcount-1", "refcount-2", "refcount-4", "refcount-8",
        "refcount-16", "refcount-32", "refcount-64",
        "zlib", "zstd", "extended-l2", "zero-clusters", "backing", "raw-backing",
        "resized-grow", "resized-shrink", "empty", "many-snapshots", "data-file",
        "luks", "aes", "savevm", "vmstate",
    }
)

CMD_TIMEOUT = 300  # seconds, per shell command


class FixtureError(RuntimeError):
    """A command failed or a generated image does not look as intended."""


# --------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------


def sh(cmd: str, cwd: Path, timeout: int = CMD_TIMEOUT) -> str:
    """Run *cmd* through /bin/sh in *cwd*; return stdout, raise on failure."""
    try:
        proc = subprocess.run(
            cmd, check=False, shell=True, cwd=cwd, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise FixtureError(f"timeout after {timeout}s: {cmd}") from exc
    if proc.returncode != 0:
        raise FixtureError(
            f"command failed (rc={proc.returncode}) in {cwd}: {cmd}\n"
            f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
        )
    return proc.stdout


def q(s: str) -> str:
    return shlex.quote(s)


class Builder:
    """Runs and records the shell commands that build one fixture."""

    def __init__(self, workdir: Path, image: str):
        self.cwd = workdir
        self.image = image
        self.commands: list[str] = []
        self.facts: dict = {}  # learnt while building, merged into the "savevm" facts

    def run(self, cmd: str, timeout: int = CMD_TIMEOUT, retry_on: str | None = None,
            retries: int = 5) -> str:
        """Run and record *cmd*.  If it fails with *retry_on* in its error
        output, it is simply run again (recorded once)."""
        self.commands.append(cmd)
        for attempt in range(retries):
            try:
                return sh(cmd, self.cwd, timeout=timeout)
            except FixtureError as exc:
                if retry_on is None or retry_on not in str(exc) or attempt == retries - 1:
                    raise
                print(f"(retrying: {retry_on})", end=" ", flush=True)
        raise AssertionError("unreachable")

    # convenience wrappers -------------------------------------------------
    def create(self, size: str, opts: str = "", image: str | None = None,
               fmt: str = "qcow2", backing: str | None = None,
               backing_fmt: str | None = None) -> None:
        parts = ["qemu-img", "create", "-f", fmt]
        if backing:
            parts += ["-b", q(backing), "-F", backing_fmt or "qcow2"]
        if opts:
            parts += ["-o", q(opts)]
        parts += [q(image or self.image), size]
        self.run(" ".join(parts))

    def io(self, *ops: str, image: str | None = None, fmt: str = "qcow2") -> None:
        """One qemu-io invocation running *ops* in order."""
        parts = ["qemu-io", "-f", fmt]
        for op in ops:
            parts += ["-c", q(op)]
        parts.append(q(image or self.image))
        self.run(" ".join(parts))

    def snap(self, name: str, image: str | None = None) -> None:
        self.run(f"qemu-img snapshot -c {q(name)} {q(image or self.image)}")


# --------------------------------------------------------------------------
# Fixture definitions
# --------------------------------------------------------------------------


@dataclass
class Fixture:
    name: str
    description: str
    tags: list[str]
    build: Callable[[Builder], None]
    companions: list[str] = field(default_factory=list)  # uncompressed names
    expect_snapshots: int = 0
    secret: str | None = None  # LUKS passphrase
    savevm: dict | None = None  # fixture-level savevm facts
    runstates: dict[str, str] | None = None  # snapshot name -> runstate
    # extra sanity check of each snapshot's VM state: (snapshot name, stream) -> None
    check_vmstate: Callable[[str, bytes], None] | None = None

    @property
    def image(self) -> str:
        return f"{self.name}.qcow2"


def _luks_image_opts(image: str) -> str:
    return q(f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0")


LUKS_OBJECT = f"--object secret,id=sec0,data={LUKS_SECRET}"


def build_v2(b: Builder) -> None:
    b.create("32M", "compat=0.10")
    b.io("write -P 0x11 0 192k", "write -P 0x12 0x52340 0x9000", "write -P 0x13 31M 1M")
    b.snap("s1")
    b.io("write -P 0x21 64k 64k", "write -P 0x22 5M 100k")
    b.snap("s2")
    b.io("write -P 0x31 0x7ff0 0x20", "write -z 5M 64k", "write -P 0x32 12M 8k")
    b.snap("s3")
    b.io("write -P 0x41 20M 256k", "write -P 0x42 0 4k")


def build_v3_basic(b: Builder) -> None:
    b.create("64M")
    b.io("write -P 0x11 0 256k", "write -P 0x12 0x123400 0x11000",
         "write -P 0x13 0x3fff000 0x1000")
    b.snap("first")
    b.io("write -P 0x21 0x10000 0x8000", "write -P 0x22 40M 320k")
    b.snap("second")
    b.io("write -P 0x31 0x2fe00 0x400", "write -P 0x32 0x3fff800 0x800",
         "write -P 0x33 8M 64k")
    b.snap("third")
    b.io("write -P 0x41 0 4k", "write -P 0x42 40M 64k", "write -P 0x43 50M 1M")


def build_ambiguous(b: Builder) -> None:
    b.create("16M")
    b.io("write -P 0x11 0 128k")
    b.snap("x")  # id 1
    b.io("write -P 0x21 64k 128k")
    b.snap("1")  # id 2, named like id 1
    b.io("write -P 0x31 1M 64k")
    b.snap("dup")  # id 3
    b.io("write -P 0x41 0x1800 0x1000")
    b.snap("dup")  # id 4, same name as id 3
    b.io("write -P 0x51 8M 256k")


def _spread_ops(seed: int, count: int, disk: int, base_pattern: int) -> list[str]:
    ops = []
    stride = disk // count
    for i in range(count):
        off = i * stride + (i * 37 + seed * 101) % 509
        length = 1500 + (i * 211 + seed * 53) % 3000
        ops.append(f"write -P {hex((base_pattern + i) % 256)} {hex(off)} {hex(length)}")
    return ops


def build_clusters_512(b: Builder) -> None:
    b.create("4M", "cluster_size=512")
    b.io(*_spread_ops(1, 40, 4 << 20, 0x10))
    b.snap("s1")
    b.io(*_spread_ops(2, 25, 4 << 20, 0x40))
    b.snap("s2")
    b.io(*_spread_ops(3, 15, 4 << 20, 0x70), "write -P 0x99 0x3ffe00 0x200")


def build_clusters_2m(b: Builder) -> None:
    b.create("32M", "cluster_size=2M")
    b.io("write -P 0x11 0 3M", "write -P 0x12 0xabc00 0x1000", "write -P 0x13 20M 64k")
    b.snap("s1")
    b.io("write -P 0x21 1M 64k", "write -P 0x22 10M 2M", "write -P 0x23 0x1fff000 0x1000")
    b.snap("s2")
    b.io("write -P 0x31 3M 1k", "write -P 0x32 20M 4k")


def make_build_refcount(bits: int) -> Callable[[Builder], None]:
    def build(b: Builder) -> None:
        b.create("8M", f"refcount_bits={bits}")
        if bits == 1:
            # With 1-bit refcounts nothing can be shared, so a snapshot is only
            # possible while the disk has no L2 tables/data (empty disk).
            b.snap("empty")
            b.io("write -P 0x11 0 192k", "write -P 0x12 0x300100 0x2000")
            return
        b.io("write -P 0x11 0 192k", "write -P 0x12 0x300100 0x2000")
        b.snap("s1")
        b.io("write -P 0x21 64k 4k", "write -P 0x22 5M 128k")
        b.snap("s2")
        b.io("write -P 0x31 0 64k", "write -P 0x32 0x500800 0x800")
    return build


def _compressed(pattern: int, offset: int, clusters: int, cs: int = 65536) -> list[str]:
    """One `write -c` per cluster: a multi-cluster compressed write is split into
    parallel tasks, which makes QEMU's host placement order nondeterministic."""
    return [f"write -c -P {hex(pattern + i)} {hex(offset + i * cs)} {hex(cs)}"
            for i in range(clusters)]


def make_build_compressed(ctype: str) -> Callable[[Builder], None]:
    def build(b: Builder) -> None:
        b.create("16M", f"compression_type={ctype}")
        b.io(*_compressed(0xc1, 0, 4), "write -P 0x11 256k 64k",
             *_compressed(0xd1, 1 << 20, 2), "write -P 0x12 0x1a0000 0x3000")
        b.snap("s1")
        # partial overwrite of a compressed cluster shared with s1 (COW to normal),
        # new compressed clusters, and untouched compressed clusters stay shared
        b.io("write -P 0x21 0x10800 0x800", *_compressed(0xe1, 4 << 20, 3),
             "write -P 0x22 0x100000 0x10000")
        b.snap("s2")
        # QEMU only compresses into unallocated clusters (else EIO), so new places
        b.io(*_compressed(0xf1, 12 << 20, 1), "write -P 0x31 4M 4k",
             *_compressed(0xf5, 8 << 20, 1))
    return build


def build_extended_l2(b: Builder) -> None:
    b.create("16M", "extended_l2=on,cluster_size=64k")
    b.io("write -P 0x81 0x3000 0x1000",        # subcluster aligned, 2 subclusters
         "write -P 0x82 0x10a00 0x1300",       # unaligned inside subclusters
         "write -P 0x83 0x40000 0x20000",      # two full clusters
         "write -z 0x42000 0x800",             # one zero subcluster in allocated cluster
         "write -z -u 0x50000 0x4000",         # zero subclusters, unmap requested
         "write -z 0x80000 0x2000")            # zero subclusters in unallocated cluster
    b.snap("s1")
    b.io("write -P 0x91 0x3800 0x800",         # another subcluster of a shared cluster
         "write -P 0x92 0x42400 0x100",        # inside the zeroed subcluster
         "discard 0x50000 0x10000",            # whole-cluster discard of shared cluster
         "write -P 0x93 0x90600 0x200")
    b.snap("s2")
    b.io("write -z 0x3000 0x800", "write -P 0xa1 0x10000 0x800",
         "write -P 0xa2 0x7ff800 0x1800")


def build_zero_clusters(b: Builder) -> None:
    b.create("16M")
    b.io("write -P 0x11 0 1M",
         "write -z 64k 64k",                   # allocated -> zero flag, keeps offset
         "write -z -u 128k 128k",              # allocated -> zero flag, unmapped
         "discard 320k 64k",                   # discard of allocated cluster
         "write -z 2M 64k",                    # zero on unallocated cluster
         "write -z 0x90000 0x1000",            # partial-cluster zero write
         "write -P 0x12 3M 128k")
    b.snap("s1")
    b.io("write -P 0x21 64k 128k",             # overwrite zero clusters
         "write -z -u 0 64k",                  # zero a cluster shared with s1
         "discard 512k 128k",                  # discard clusters shared with s1
         "write -z 3M 64k",
         "write -P 0x22 0x2f000 0x2000")
    b.snap("s2")
    b.io("write -z 256k 64k", "write -P 0x31 0x90800 0x200", "discard 3M 128k",
         "write -P 0x32 10M 64k")


def build_backing_chain(b: Builder) -> None:
    base = "backing-chain.base.qcow2"
    b.create("16M", image=base)
    b.io("write -P 0xb1 0 2M", "write -P 0xb2 4M 1M", "write -P 0xb3 15M 1M", image=base)
    b.create("16M", backing=base, backing_fmt="qcow2")
    b.io("write -P 0x11 0x1000 0x1000",        # partial overwrite: COW from backing
         "write -P 0x12 4M 64k", "write -z 64k 64k", "write -P 0x13 8M 64k")
    b.snap("s1")
    b.io("write -P 0x21 0x4000 0x200", "write -z 15M 64k",
         "write -P 0x22 0x40f000 0x2000", "discard 4M 64k")
    b.snap("s2")
    b.io("write -P 0x31 1M 4k", "write -P 0x32 0xff0000 0x10000")


def build_raw_backing(b: Builder) -> None:
    base = "raw-backing.base.raw"
    b.create("16M", image=base, fmt="raw")
    b.io("write -P 0xb1 0 1M", "write -P 0xb2 0x500000 0x3000", "write -P 0xb3 0xf00000 1M",
         image=base, fmt="raw")
    b.create("16M", backing=base, backing_fmt="raw")
    b.io("write -P 0x11 0x2000 0x800", "write -P 0x12 0x500800 0x1000", "write -z 0xf00000 64k")
    b.snap("s1")
    b.io("write -P 0x21 0x2200 0x200", "write -P 0x22 6M 64k")
    b.snap("s2")
    b.io("write -P 0x31 0 4k", "write -P 0x32 0xf10000 0x800")


def build_resized_grow(b: Builder) -> None:
    b.create("32M")
    b.io("write -P 0x11 0 128k", "write -P 0x12 0x1ff0000 0x10000")
    b.snap("at-32M")
    b.run(f"qemu-img resize {q(b.image)} 80M")
    b.io("write -P 0x21 0x2000000 128k", "write -P 0x22 0x4ff0000 0x10000",
         "write -P 0x23 0x1000 0x1000")
    b.snap("at-80M")
    b.io("write -P 0x31 40M 64k", "write -P 0x32 0 4k")


def build_resized_shrink(b: Builder) -> None:
    b.create("64M")
    b.io("write -P 0x11 0 128k", "write -P 0x12 30M 1M", "write -P 0x13 0x3ff0000 0x10000",
         "write -P 0x14 0x17ff000 0x2000")      # straddles the later 24M end
    b.snap("at-64M")
    b.run(f"qemu-img resize --shrink {q(b.image)} 24M")
    b.io("write -P 0x21 0x17f0000 0x10000", "write -P 0x22 0x8000 0x1000")
    b.snap("at-24M")
    b.io("write -P 0x31 1M 64k")


def build_empty_snapshot(b: Builder) -> None:
    b.create("8M")
    b.snap("empty")
    b.io("write -P 0x11 0 128k", "write -P 0x12 0x7f0000 0x10000")
    b.snap("data")
    b.io("write -P 0x21 0x10000 4k")


MANY_SNAPSHOTS = 300


def build_many_snapshots(b: Builder) -> None:
    b.create("1M")
    b.io("write -P 0xee 0 1M")
    b.run(
        f"for i in $(seq 1 {MANY_SNAPSHOTS}); do "
        f"qemu-img snapshot -c \"snap-$(printf %03d $i)\" {q(b.image)} || exit 1; "
        "if [ $((i % 10)) -eq 0 ]; then "
        "qemu-io -f qcow2 -c \"write -P $((i / 10)) $((i / 10 * 4096)) 4096\" "
        f"{q(b.image)} >/dev/null || exit 1; fi; done",
        timeout=900,
    )


def build_data_file(b: Builder) -> None:
    b.create("8M", "data_file=data-file.data,data_file_raw=on")
    b.io("write -P 0x11 0 128k", "write -P 0x12 0x301000 0x3000", "write -z 64k 4k",
         "write -P 0x13 0x7ff000 0x1000")


def build_luks(b: Builder) -> None:
    img = _luks_image_opts(b.image)
    b.run(f"qemu-img create {LUKS_OBJECT} -f qcow2 -o "
          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
          f"encrypt.cipher-alg=aes-128,cluster_size=4k {q(b.image)} 8M",
          # QEMU's PBKDF2 benchmark sometimes measures 0 ms of CPU time for the
          # first round and gives up; that is harmless, so just run it again.
          retry_on="Unable to get accurate CPU usage")

    io, snap = _encrypted_writers(b, img)

    io("write -P 0x11 0 8k", "write -P 0x12 1M 4k")
    snap("s1")
    io("write -P 0x21 0x800 0x1000", "write -P 0x22 5M 4k")
    snap("s2")
    io("write -P 0x31 1M 2k")


def _encrypted_writers(b: Builder, img: str) -> tuple[Callable[..., None],
                                                      Callable[[str], None]]:
    """``io(*qemu_io_commands)`` and ``snap(name)`` on an encrypted image
    (``--image-opts`` with the fixtures' secret)."""
    def io(*ops: str) -> None:
        b.run(f"qemu-io {LUKS_OBJECT} --image-opts "
              + " ".join(f"-c {q(op)}" for op in ops) + f" {img}")

    def snap(name: str) -> None:
        b.run(f"qemu-img snapshot {LUKS_OBJECT} --image-opts -c {q(name)} {img}")
    return io, snap


def build_aes(b: Builder) -> None:
    """Legacy qcow2 AES encryption (AES-128-CBC, plain64 IVs from the *guest*
    sector number): qemu-img 7.2 still creates and writes it; only system
    emulators refuse it."""
    img = _luks_image_opts(b.image)
    b.run(f"qemu-img create {LUKS_OBJECT} -f qcow2 -o "
          f"encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=4k {q(b.image)} 2M")

    io, snap = _encrypted_writers(b, img)

    io("write -P 0x11 0 8k", "write -P 0x12 1M 4k")
    snap("s1")
    io("write -P 0x21 0x800 0x1000", "write -P 0x22 0x1ff000 4k", "write -z 1M 4k")
    snap("s2")
    io("write -P 0x31 1M 2k", "write -P 0x32 0x10200 0x400")


# A 64 KiB BIOS for the savevm fixture: at the reset vector it jumps to F000:E000,
# fills 0x10000..0x1FFFF with the 16-bit word 0xA55A, then increments the dword
# at 0x500 forever.  It gives a deterministic, recognisable RAM image and a tiny
# VM state (SeaBIOS would add ~200 KiB of compressed ROM/RAM per snapshot).
BIOS_CODE_HEX = ("fa31c08ed0bc0070b800108ec031ffb85aa5b90080fcf3ab"
                 "31c08ed866ff060005ebf9")
BIOS_NAME = "savevm.bios.bin"
SAVEVM_MONITOR = [
    "savevm pre",
    'qemu-io ide0-hd0 "write -P 0x31 0x20000 4k"',
    "cont",
    "#sleep 1",
    "savevm run",
    'qemu-io ide0-hd0 "write -P 0x32 0x21000 4k"',
    "stop",
    "savevm paused",
    'qemu-io ide0-hd0 "write -P 0x33 0x22000 4k"',
    "quit",
]


def _monitor_feeder(lines: list[str]) -> str:
    """Shell snippet printing HMP commands; '#sleep N' lines become pauses."""
    chunks: list[str] = []
    cur: list[str] = []
    for line in lines:
        if line.startswith("#sleep"):
            chunks.append("printf " + q("".join(c + "\\n" for c in cur)))
            chunks.append(f"sleep {line.split()[1]}")
            cur = []
        else:
            cur.append(line)
    if cur:
        chunks.append("printf " + q("".join(c + "\\n" for c in cur)))
    return "(" + "; ".join(chunks) + ")"


def _run_qemu_system(b: Builder, monitor: list[str], bios: str | None) -> str:
    bios_opt = f" -bios {bios}" if bios else ""
    return b.run(
        f"{_monitor_feeder(monitor)} | timeout 120 qemu-system-x86_64 -machine pc,accel=tcg "
        f"-nodefaults -display none -m 16{bios_opt} "
        f"-drive file={q(b.image)},format=qcow2,if=ide -monitor stdio -S",
        timeout=180,
    )


def build_savevm(b: Builder) -> None:
    b.run(
        "python3 -c " + q(
            f'b = bytearray(65536); c = bytes.fromhex("{BIOS_CODE_HEX}"); '
            'b[0xE000:0xE000 + len(c)] = c; b[0xFFF0:0xFFF5] = bytes.fromhex("ea00e000f0"); '
            f'open("{BIOS_NAME}", "wb").write(b)'
        )
    )
    b.create("16M")
    b.io("write -P 0x11 0 1M", "write -P 0x12 0x800000 0x3000")
    # Drive the HMP monitor on stdin; -S starts the VM in "prelaunch".
    _run_qemu_system(b, SAVEVM_MONITOR, BIOS_NAME)
    b.io("write -P 0x21 0x10000 4k")


def check_loop_bios_ram(snap_name: str, stream: bytes) -> None:
    """The loop BIOS fills guest RAM 0x10000..0x1FFFF once it runs."""
    page = bytes.fromhex("5aa5") * 2048
    if (page in stream) != (snap_name != "pre"):
        raise FixtureError(f"savevm: unexpected RAM fill state in snapshot {snap_name!r}")


SEABIOS_MONITOR = [
    "cont",
    "#sleep 1",
    "savevm run",
    "quit",
]


def build_savevm_seabios(b: Builder) -> None:
    b.create("16M")
    b.io("write -P 0x11 0 1M", "write -P 0x12 0x800000 0x3000")
    _run_qemu_system(b, SEABIOS_MONITOR, None)
    b.io("write -P 0x21 0x10000 4k")


# A 512-byte boot sector (SeaBIOS boots it from the IDE disk) that fills
# 0x20000..0x2FFFF with the word 0xC35A, enables the PIIX4 PM I/O space at
# 0xB000 (PMBA 0x40, PMREGMISC 0x80 bit 0, as SeaBIOS does), then writes
# SLP_EN (bit 13) | SLP_TYP=1 (bits 10-12; QEMU's _S3 value) to PM1a_CNT
# (0xB004): QEMU's acpi_pm1_cnt_write puts the guest into S3.
S3_BOOT_HEX = ("fa" "b80020" "8ec0" "31ff" "b85ac3" "b90080" "fc" "f3ab"
               "baf80c" "66b8400b0080" "66ef" "bafc0c" "66b801b00000" "66ef"
               "baf80c" "66b8800b0080" "66ef" "bafc0c" "b001" "ee"
               "ba04b0" "b80024" "ef" "f4" "ebfd")
S3_BOOT_NAME = "s3boot.bin"
SUSPENDED_MONITOR = [
    "savevm pre",
    "dump-guest-memory savevm-suspended.pre.elf",
    'qemu-io ide0-hd0 "write -P 0x31 0x20000 4k"',
    "cont",
    "#sleep 5",
    "info status",
    "savevm susp",
    "dump-guest-memory savevm-suspended.susp.elf",
    "info status",
    "quit",
]


def build_savevm_suspended(b: Builder) -> None:
    b.run(
        "python3 -c " + q(
            f'b = bytearray(512); c = bytes.fromhex("{S3_BOOT_HEX}"); b[:len(c)] = c; '
            f'b[510:] = b"\\x55\\xaa"; open("{S3_BOOT_NAME}", "wb").write(b)'
        )
    )
    b.create("16M")
    b.io(f"write -s {S3_BOOT_NAME} 0 512", "write -P 0x12 0x800000 0x3000")
    out = _run_qemu_system(b, SUSPENDED_MONITOR, None).replace("\x1b", "")
    if out.count("VM status: paused (suspended)") != 2:
        raise FixtureError("savevm-suspended: the guest did not reach S3 "
                           "(info status never said 'paused (suspended)')")
    b.io("write -P 0x21 0x10000 4k")


def check_s3_boot_ram(snap_name: str, stream: bytes) -> None:
    """The boot sector fills guest RAM 0x20000..0x2FFFF before suspending."""
    page = bytes.fromhex("5ac3") * 2048
    if (page in stream) != (snap_name == "susp"):
        raise FixtureError(f"savevm-suspended: unexpected RAM fill in snapshot {snap_name!r}")


# A real Linux guest: the Debian kernel (package linux-image-amd64) with a
# busybox initramfs whose /init composes the marker at run time (the whole
# string is in no file: it only exists in guest RAM once /init ran), writes it
# to a tmpfs file, prints the kernel's /proc/version and a ready line on the
# serial console and sleeps.  make_fixtures waits for the ready line, then
# savevm.  init_on_free=1 zeroes freed pages (the unpacked initrd, boot-time
# memory), which the VM state stores as zero pages; 88 MiB is the smallest RAM
# this kernel boots in (80 MiB: "System is deadlocked on memory").
LINUX_MARKER = "QCOW2SNAP-LINUX-MARKER-5e1f0c7a"
LINUX_READY = "QCOW2SNAP-GUEST-READY"
LINUX_MEMORY_MIB = 88
LINUX_APPEND = "console=ttyS0 init_on_free=1 nokaslr panic=-1 quiet"
LINUX_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t tmpfs tmp /tmp
printf '%s-%s\\n' {LINUX_MARKER.rsplit("-", 1)[0]} {LINUX_MARKER.rsplit("-", 1)[1]} > /tmp/marker
echo "PROC-VERSION: $(cat /proc/version)"
echo {LINUX_READY}
exec sleep 1000000
"""
LINUX_MONITOR = ["savevm linux", "quit"]


def _linux_kernel() -> tuple[str, str, str]:
    """(path of the newest /boot/vmlinuz-*, its Debian package, package version)."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise FixtureError("linux-guest: no /boot/vmlinuz-*; apt-get install linux-image-amd64")
    kernel = str(kernels[-1])
    pkg = sh(f"dpkg-query -S {q(kernel)}", Path.cwd()).split(":")[0].strip()
    version = sh(f"dpkg-query -W -f '${{Version}}' {q(pkg)}", Path.cwd()).strip()
    return kernel, pkg, version


def build_linux_guest(b: Builder) -> None:
    kernel, pkg, version = _linux_kernel()
    busybox = shutil.which("busybox") or "/bin/busybox"
    busybox_version = sh("dpkg-query -W -f '${Version}' busybox-static", Path.cwd()).strip()
    b.run("mkdir -p initramfs/bin initramfs/proc initramfs/tmp")
    b.run(f"cp {q(busybox)} initramfs/bin/busybox")
    b.run(f"printf %s {q(LINUX_INIT)} > initramfs/init && chmod 755 initramfs/init")
    b.run("cd initramfs && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 "
          "| gzip -9n > ../initrd.gz")
    b.create("4M")
    b.io("write -P 0x11 0 64k")
    wait_ready = (f"i=0; until grep -qa {LINUX_READY} serial.log 2>/dev/null; do "
                  "i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.25; done; "
                  + "printf " + q("".join(c + "\n" for c in LINUX_MONITOR)))
    t0 = time.monotonic()
    b.run(
        f"({wait_ready}) | timeout 400 qemu-system-x86_64 -machine pc,accel=tcg "
        f"-nodefaults -display none -m {LINUX_MEMORY_MIB} -kernel {q(kernel)} "
        f"-initrd initrd.gz -append {q(LINUX_APPEND)} -serial file:serial.log "
        f"-drive file={q(b.image)},format=qcow2,if=ide -monitor stdio -no-reboot",
        timeout=450,
    )
    serial = (b.cwd / "serial.log").read_text(errors="replace")
    if LINUX_READY not in serial:
        raise FixtureError(f"linux-guest: no ready line on the serial console:\n{serial[-2000:]}")
    banner = serial.split("PROC-VERSION: ", 1)[1].split("\n", 1)[0].rstrip("\r")
    b.io("write -P 0x21 0 4k")
    b.facts.update({
        "kernel": {"file": kernel, "package": pkg, "version": version},
        "busybox": {"file": busybox, "package": "busybox-static", "version": busybox_version},
        "banner": banner,
        "boot_and_save_seconds": round(time.monotonic() - t0, 1),
    })
    if not banner.startswith("Linux version "):
        raise FixtureError(f"linux-guest: unexpected /proc/version {banner!r}")


def check_linux_guest_ram(snap_name: str, stream: bytes) -> None:
    """The marker /init wrote and the kernel banner are in the saved RAM."""
    for needle in (LINUX_MARKER.encode(), b"Linux version "):
        if needle not in stream:
            raise FixtureError(f"linux-guest: {needle!r} not in the VM state of {snap_name!r}")


def build_lazy_refcounts(b: Builder) -> None:
    b.create("16M", "lazy_refcounts=on")
    b.io("write -P 0x11 0 256k", "write -P 0x12 0x500400 0x1400")
    b.snap("s1")
    b.io("write -P 0x21 64k 64k", "write -P 0x22 9M 4k")


FIXTURES: list[Fixture] = [
    Fixture("v2", "Version 2 (compat=0.10) image, 64 KiB clusters, three disk-only snapshots.",
            ["v2", "refcount-16"], build_v2, expect_snapshots=3),
    Fixture("v3-basic", "Version 3 image, 64 KiB clusters, 64 MiB, three disk-only snapshots "
            "with distinct data.", ["v3", "refcount-16"], build_v3_basic, expect_snapshots=3),
    Fixture("ambiguous", "Snapshot ids and names that collide: id 1 is named 'x', id 2 is "
            "named '1', ids 3 and 4 are both named 'dup'.", ["v3", "refcount-16"],
            build_ambiguous, expect_snapshots=4),
    Fixture("clusters-512", "512-byte clusters on a 4 MiB disk with scattered unaligned writes "
            "(multi-cluster L1, many L2 tables and refcount blocks), two snapshots.",
            ["v3", "small-clusters", "refcount-16"], build_clusters_512, expect_snapshots=2),
    Fixture("clusters-2m", "2 MiB clusters on a 32 MiB disk, two snapshots.",
            ["v3", "large-clusters", "refcount-16"], build_clusters_2m, expect_snapshots=2),
    Fixture("refcount-1", "1-bit refcounts: a snapshot of the empty disk, then data "
            "(nothing can be shared with 1-bit refcounts).",
            ["v3", "refcount-1", "empty"], make_build_refcount(1), expect_snapshots=1),
    *[
        Fixture(f"refcount-{n}", f"{n}-bit refcounts, 8 MiB disk, two snapshots.",
                ["v3", f"refcount-{n}"], make_build_refcount(n), expect_snapshots=2)
        for n in (2, 4, 8, 32, 64)
    ],
    Fixture("compressed-zlib", "zlib (deflate) compressed clusters mixed with normal ones, "
            "compressed clusters shared between snapshots and the active layer, two snapshots.",
            ["v3", "zlib", "refcount-16"], make_build_compressed("zlib"), expect_snapshots=2),
    Fixture("compressed-zstd", "zstd compressed clusters (compression_type=zstd) mixed with "
            "normal ones, shared between snapshots and the active layer, two snapshots.",
            ["v3", "zstd", "refcount-16"], make_build_compressed("zstd"), expect_snapshots=2),
    Fixture("extended-l2", "Extended L2 entries (64 KiB clusters, 2 KiB subclusters) with "
            "partial subcluster writes, zeroed subclusters and discards, two snapshots.",
            ["v3", "extended-l2", "zero-clusters", "refcount-16"], build_extended_l2,
            expect_snapshots=2),
    Fixture("zero-clusters", "Zero clusters (write -z with and without unmap) and discarded "
            "clusters, including ones shared with snapshots, two snapshots.",
            ["v3", "zero-clusters", "refcount-16"], build_zero_clusters, expect_snapshots=2),
    Fixture("backing-chain", "qcow2 overlay with snapshots over a qcow2 backing file "
            "(relative name), with partial overwrites, zero clusters and discards.",
            ["v3", "backing", "zero-clusters", "refcount-16"], build_backing_chain,
            companions=["backing-chain.base.qcow2"], expect_snapshots=2),
    Fixture("raw-backing", "qcow2 overlay with snapshots over a raw backing file "
            "(relative name) with partial overwrites.",
            ["v3", "backing", "raw-backing", "refcount-16"], build_raw_backing,
            companions=["raw-backing.base.raw"], expect_snapshots=2),
    Fixture("resized-grow", "Snapshot taken at 32 MiB, disk grown to 80 MiB and written "
            "beyond 32 MiB, second snapshot at 80 MiB.",
            ["v3", "resized-grow", "refcount-16"], build_resized_grow, expect_snapshots=2),
    Fixture("resized-shrink", "Snapshot taken at 64 MiB with data above 24 MiB, disk shrunk "
            "to 24 MiB, second snapshot at 24 MiB.",
            ["v3", "resized-shrink", "refcount-16"], build_resized_shrink, expect_snapshots=2),
    Fixture("empty-snapshot", "Snapshot of a disk with no data at all, then data and a "
            "second snapshot.", ["v3", "empty", "refcount-16"], build_empty_snapshot,
            expect_snapshots=2),
    Fixture("many-snapshots", f"{MANY_SNAPSHOTS} snapshots of a 1 MiB disk with a 4 KiB "
            "write after every 10th snapshot.", ["v3", "many-snapshots", "refcount-16"],
            build_many_snapshots, expect_snapshots=MANY_SNAPSHOTS),
    Fixture("data-file", "External raw data file (data_file_raw=on, relative name); "
            "internal snapshots are impossible with a data file.",
            ["v3", "data-file", "refcount-16"], build_data_file,
            companions=["data-file.data"]),
    Fixture("luks", "LUKS-encrypted qcow2 (aes-128-xts, 4 KiB clusters, secret in the "
            "manifest) with two snapshots.", ["v3", "luks", "small-clusters", "refcount-16"],
            build_luks, expect_snapshots=2, secret=LUKS_SECRET),
    Fixture("aes", "Legacy AES-encrypted qcow2 (encrypt.format=aes: AES-128-CBC, IVs from "
            "the guest sector, 4 KiB clusters, secret in the manifest) with two snapshots.",
            ["v3", "aes", "small-clusters", "refcount-16"], build_aes, expect_snapshots=2,
            secret=LUKS_SECRET),
    Fixture("savevm", "Three HMP savevm snapshots with VM state from qemu-system-x86_64 "
            "(pc, TCG, 16 MiB RAM, tiny loop BIOS): in prelaunch, running and paused state.",
            ["v3", "savevm", "vmstate", "refcount-16"], build_savevm, expect_snapshots=3,
            companions=[BIOS_NAME],
            savevm={
                "runstate": "paused",
                "machine": "pc",
                "accel": "tcg",
                "memory_mib": 16,
                "bios": BIOS_NAME + ".gz",
                "monitor": SAVEVM_MONITOR,
                # RAM written by the loop BIOS once running (absent in "pre"):
                "ram_fill": {"address": 0x10000, "length": 0x10000, "bytes_hex": "5aa5"},
                "ram_counter": {"address": 0x500, "width": 4},
            },
            runstates={"pre": "prelaunch", "run": "running", "paused": "paused"},
            check_vmstate=check_loop_bios_ram),
    Fixture("savevm-seabios", "One HMP savevm snapshot with VM state from qemu-system-x86_64 "
            "(pc, TCG, 16 MiB RAM, default SeaBIOS firmware, no boot device) taken while "
            "running.", ["v3", "savevm", "vmstate", "refcount-16"], build_savevm_seabios,
            expect_snapshots=1,
            savevm={
                "runstate": "running",
                "machine": "pc",
                "accel": "tcg",
                "memory_mib": 16,
                "bios": None,
                "monitor": SEABIOS_MONITOR,
            },
            runstates={"run": "running"}),
    Fixture("savevm-suspended", "Two HMP savevm snapshots with VM state from "
            "qemu-system-x86_64 (pc, TCG, 16 MiB RAM, SeaBIOS booting a 512-byte boot sector "
            "that puts the guest into ACPI S3): 'pre' in prelaunch state and 'susp' while "
            "suspended; each with QEMU's own dump-guest-memory (ELF) of the VM right after "
            "its savevm as companion (the memory-export oracle).",
            ["v3", "savevm", "vmstate", "refcount-16"], build_savevm_suspended,
            expect_snapshots=2,
            companions=["savevm-suspended.pre.elf", "savevm-suspended.susp.elf"],
            savevm={
                "runstate": "suspended",
                "machine": "pc",
                "accel": "tcg",
                "memory_mib": 16,
                "bios": None,
                "boot_sector_hex": S3_BOOT_HEX,
                "monitor": SUSPENDED_MONITOR,
                "ram_fill": {"address": 0x20000, "length": 0x10000, "bytes_hex": "5ac3"},
                "oracles": {
                    "pre": {
                        "file": "savevm-suspended.pre.elf.gz",
                        "how": "HMP 'dump-guest-memory savevm-suspended.pre.elf' (ELF, paging "
                               "off, no filter) right after 'savevm pre', VM still in "
                               "prelaunch",
                    },
                    "susp": {
                        "file": "savevm-suspended.susp.elf.gz",
                        "how": "HMP 'dump-guest-memory savevm-suspended.susp.elf' (ELF, paging "
                               "off, no filter) right after 'savevm susp', VM still "
                               "suspended (info status: paused (suspended))",
                    },
                },
            },
            runstates={"pre": "prelaunch", "susp": "suspended"},
            check_vmstate=check_s3_boot_ram),
    Fixture("linux-guest", "One HMP savevm snapshot of a real Linux guest: qemu-system-x86_64 "
            f"(pc, TCG, {LINUX_MEMORY_MIB} MiB RAM) booting the Debian kernel with a busybox "
            "initramfs whose /init wrote a marker string to a tmpfs file and sleeps; taken "
            "while running.  The memory exports' Volatility 3 oracle (banners).",
            ["v3", "savevm", "vmstate", "refcount-16"], build_linux_guest,
            expect_snapshots=1,
            savevm={
                "runstate": "running",
                "machine": "pc",
                "accel": "tcg",
                "memory_mib": LINUX_MEMORY_MIB,
                "bios": None,
                "append": LINUX_APPEND,
                "init": LINUX_INIT,
                "marker": LINUX_MARKER,
                "ready_line": LINUX_READY,
                "monitor": LINUX_MONITOR,
            },
            runstates={"linux": "running"},
            check_vmstate=check_linux_guest_ram),
    Fixture("lazy-refcounts", "lazy_refcounts=on image that was closed cleanly (dirty bit "
            "clear), one snapshot.", ["v3", "refcount-16"], build_lazy_refcounts,
            expect_snapshots=1),
]


# --------------------------------------------------------------------------
# Inspecting images
# --------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SnapEntry:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    vm_state_size: int
    disk_size: int


def parse_header(data: bytes) -> dict:
    if data[:4] != b"QFI\xfb":
        raise FixtureError("not a qcow2 image")
    version, = struct.unpack_from(">I", data, 4)
    cluster_bits, = struct.unpack_from(">I", data, 20)
    size, = struct.unpack_from(">Q", data, 24)
    nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", data, 60)
    incompat = struct.unpack_from(">Q", data, 72)[0] if version >= 3 else 0
    return {
        "version": version, "cluster_bits": cluster_bits, "size": size,
        "nb_snapshots": nb_snapshots, "snapshots_offset": snapshots_offset,
        "extended_l2": bool(incompat & (1 << 4)),
    }


def parse_snapshot_table(path: Path) -> list[SnapEntry]:
    """Read the snapshot table directly from the image file.

    The layout is docs/interop/qcow2.txt, "Snapshots", in QEMU's sources.
    """
    data = path.read_bytes()
    hdr = parse_header(data)
    out = []
    off = hdr["snapshots_offset"]
    for _ in range(hdr["nb_snapshots"]):
        off = (off + 7) & ~7
        (l1_off, l1_size, id_len, name_len, _ds, _dns, _clk, vm32,
         extra_len) = struct.unpack_from(">QIHHIIQII", data, off)
        extra = data[off + 40: off + 40 + extra_len]
        vm_state = vm32
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        disk_size = hdr["size"]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        p = off + 40 + extra_len
        sid = data[p: p + id_len].decode()
        name = data[p + id_len: p + id_len + name_len].decode()
        out.append(SnapEntry(l1_off, l1_size, sid, name, vm_state, disk_size))
        off = p + id_len + name_len
    return out


def read_snapshot_vmstate(path: Path, snap: SnapEntry) -> bytes:
    """Read a snapshot's VM state (QEMU's qcow2_vm_state_offset).

    Only standard, uncompressed clusters are followed (what savevm writes).
    """
    data = path.read_bytes()
    hdr = parse_header(data)
    if hdr["extended_l2"]:
        raise FixtureError("vmstate reader does not handle extended L2")
    cs = 1 << hdr["cluster_bits"]
    l2_entries = cs // 8
    span = cs * l2_entries
    start = math.ceil(snap.disk_size / span) * span
    buf = bytearray()
    pos = start
    end = start + snap.vm_state_size
    while pos < end:
        l1_idx, rest = divmod(pos, span)
        l2_idx, in_cl = divmod(rest, cs)
        n = min(cs - in_cl, end - pos)
        chunk = bytes(n)
        if l1_idx < snap.l1_size:
            l1e, = struct.unpack_from(">Q", data, snap.l1_table_offset + 8 * l1_idx)
            l2_off = l1e & 0x00FFFFFFFFFFFE00
            if l2_off:
                l2e, = struct.unpack_from(">Q", data, l2_off + 8 * l2_idx)
                if l2e & (1 << 62):
                    raise FixtureError("compressed vmstate cluster not supported here")
                host = l2e & 0x00FFFFFFFFFFFE00
                if host and not (l2e & 1):
                    chunk = data[host + in_cl: host + in_cl + n].ljust(n, b"\0")
        buf += chunk
        pos += n
    return bytes(buf)


def vmstate_runstate(stream: bytes) -> str:
    """Runstate stored in the 'globalstate' section (QEMU's migration/global_state.c)."""
    if stream[:4] != b"QEVM":
        raise FixtureError("VM state does not start with QEVM magic")
    i = stream.find(b"\x0bglobalstate")
    if i < 0:
        raise FixtureError("no globalstate section in VM state")
    p = i + 1 + len("globalstate") + 8  # name, instance_id, version_id
    size, = struct.unpack_from(">I", stream, p)
    return stream[p + 4: p + 4 + min(size, 100)].split(b"\0")[0].decode()


def clean_info(obj):
    if isinstance(obj, dict):
        return {k: clean_info(v) for k, v in obj.items()
                if k not in MACHINE_SPECIFIC_INFO_KEYS}
    if isinstance(obj, list):
        return [clean_info(v) for v in obj]
    return obj


def image_arg(fx: Fixture, image: str) -> tuple[str, str]:
    """(global options, image argument) for qemu-img commands opening *image*."""
    if fx.secret:
        return f"{LUKS_OBJECT} --image-opts", _luks_image_opts(image)
    return "-f qcow2", q(image)


def raw_sha256(fx: Fixture, cwd: Path, extra: str = "") -> str:
    opts, img = image_arg(fx, fx.image)
    out = cwd / "_out.raw"
    try:
        sh(f"qemu-img convert {opts} {extra} -O raw {img} _out.raw", cwd)
        return sha256_file(out)
    finally:
        out.unlink(missing_ok=True)


def describe(fx: Fixture, build_dir: Path, scratch: Path) -> dict:
    """Collect the manifest facts for a freshly built fixture."""
    img = build_dir / fx.image
    info = json.loads(sh(f"qemu-img info --output=json {q(fx.image)}", build_dir))
    if info.get("dirty-flag"):
        raise FixtureError(f"{fx.name}: image left dirty")
    vsize = info["virtual-size"]
    table = parse_snapshot_table(img)
    if len(table) != fx.expect_snapshots:
        raise FixtureError(f"{fx.name}: {len(table)} snapshots, expected {fx.expect_snapshots}")
    info_snaps = info.get("snapshots", [])
    if [(s["id"], s["name"], s["vm-state-size"]) for s in info_snaps] != [
            (s.id, s.name, s.vm_state_size) for s in table]:
        raise FixtureError(f"{fx.name}: snapshot table parse disagrees with qemu-img info")

    active = {"sha256": raw_sha256(fx, build_dir), "size": vsize}
    snaps = []
    for s in table:
        entry: dict = {"id": s.id, "name": s.name, "disk_size": s.disk_size,
                       "vm_state_size": s.vm_state_size}
        if s.disk_size == vsize:
            entry["sha256"] = raw_sha256(fx, build_dir, f"-l {q('snapshot.id=' + s.id)}")
            entry["how"] = "convert-l"
        else:
            d = scratch / f"{fx.name}-revert-{s.id}"
            d.mkdir(parents=True)
            for f in [fx.image, *fx.companions]:
                shutil.copy2(build_dir / f, d / f)
            opts, imgarg = image_arg(fx, fx.image)
            if not fx.secret:
                opts = ""  # `qemu-img snapshot` has no -f option
            sh(f"qemu-img snapshot {opts} -a {q(s.id)} {imgarg}", d)
            entry["sha256"] = raw_sha256(fx, d)
            entry["how"] = "revert-copy"
            shutil.rmtree(d)
        if fx.runstates is not None:
            expected = fx.runstates[s.name]
            stream = read_snapshot_vmstate(img, s)
            got = vmstate_runstate(stream)
            if got != expected:
                raise FixtureError(f"{fx.name}: snapshot {s.name} runstate {got!r}, "
                                   f"expected {expected!r}")
            entry["runstate"] = got
            if fx.check_vmstate is not None:
                fx.check_vmstate(s.name, stream)
        snaps.append(entry)

    # every snapshot must differ from the active layer and from each other
    # (many-snapshots only writes after every 10th snapshot)
    if fx.name != "many-snapshots":
        hashes = [s["sha256"] for s in snaps] + [active["sha256"]]
        if len(set(hashes)) != len(hashes):
            raise FixtureError(f"{fx.name}: some snapshots have identical content")
    return {"info": clean_info(info), "active": active, "snapshots": snaps}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def gzip_file(src: Path, dst: Path) -> None:
    with (
        open(src, "rb") as fin,
        open(dst, "wb") as raw,
        gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        shutil.copyfileobj(fin, gz, 1 << 20)


def build_fixture(fx: Fixture, root: Path, out: Path) -> dict:
    for t in fx.tags:
        if t not in TAG_VOCABULARY:
            raise FixtureError(f"{fx.name}: unknown tag {t}")
    build_dir = root / fx.name
    build_dir.mkdir(parents=True)
    b = Builder(build_dir, fx.image)
    fx.build(b)
    facts = describe(fx, build_dir, root / "_scratch")

    img = build_dir / fx.image
    entry: dict = {
        "name": fx.name,
        "file": fx.image + ".gz",
        "description": fx.description,
        "companions": [c + ".gz" for c in fx.companions],
        "commands": b.commands,
        "sha256": sha256_file(img),
        "size": img.stat().st_size,
        "companion_sha256": {c + ".gz": sha256_file(build_dir / c) for c in fx.companions},
        "companion_size": {c + ".gz": (build_dir / c).stat().st_size for c in fx.companions},
        "tags": fx.tags,
        **facts,
    }
    if fx.secret is not None:
        entry["secret"] = fx.secret
    if fx.savevm is not None:
        entry["savevm"] = {**fx.savevm, **b.facts}
    for f in [fx.image, *fx.companions]:
        gzip_file(build_dir / f, out / (f + ".gz"))
    if b.facts:
        entry["savevm"]["gz_size"] = (out / (fx.image + ".gz")).stat().st_size
    shutil.rmtree(build_dir)
    return entry


def dumps_manifest(obj, indent: int = 0) -> str:
    """JSON with 2-space indentation, but objects holding only scalars (e.g. one
    snapshot) and short scalar lists (tags) are written on a single line."""
    pad, inner = " " * indent, " " * (indent + 2)

    def scalar(v) -> bool:
        return not isinstance(v, (dict, list))

    if isinstance(obj, dict):
        if not obj:
            return "{}"
        if all(scalar(v) for v in obj.values()):
            return json.dumps(obj)
        items = [f"{inner}{json.dumps(k)}: {dumps_manifest(v, indent + 2)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if not obj:
            return "[]"
        one_line = json.dumps(obj)
        if all(scalar(v) for v in obj) and len(one_line) <= 100:
            return one_line
        items = [inner + dumps_manifest(v, indent + 2) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def qemu_version() -> str:
    return sh("qemu-img --version", Path.cwd()).splitlines()[0].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Regenerate the qcow2 test fixtures and fixtures/manifest.json "
                    "using the installed qemu-img, qemu-io and qemu-system-x86_64.",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: %(default)s)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="rebuild only these fixtures and merge them into an existing "
                         "manifest in --out")
    ap.add_argument("--list", action="store_true", help="list fixture names and exit")
    ap.add_argument("--keep-build", action="store_true",
                    help="keep the scratch build directory (path is printed)")
    args = ap.parse_args(argv)

    if args.list:
        for fx in FIXTURES:
            print(f"{fx.name:16} {fx.description}")
        return 0

    names = [fx.name for fx in FIXTURES]
    selected = FIXTURES
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"unknown fixture(s): {', '.join(unknown)}; known: {', '.join(names)}")
        selected = [fx for fx in FIXTURES if fx.name in args.only]

    for tool in ("qemu-img", "qemu-io", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    previous: dict[str, dict] = {}
    if args.only and manifest_path.exists():
        previous = {e["name"]: e for e in json.loads(manifest_path.read_text())["fixtures"]}

    root = Path(tempfile.mkdtemp(prefix="qcow2snap-fixtures-"))
    t_all = time.monotonic()
    try:
        for fx in selected:
            t0 = time.monotonic()
            print(f"building {fx.name} ...", end=" ", flush=True)
            previous[fx.name] = build_fixture(fx, root, out)
            print(f"{time.monotonic() - t0:.1f}s "
                  f"({(out / (fx.image + '.gz')).stat().st_size // 1024} KiB gz)", flush=True)
    finally:
        if args.keep_build:
            print(f"build directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    entries = [previous[n] for n in names if n in previous]
    manifest = {
        "generator": GENERATOR,
        "qemu_version": qemu_version(),
        "fixtures": entries,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    text = dumps_manifest(manifest) + "\n"
    if json.loads(text) != manifest:
        raise FixtureError("manifest formatting round-trip failed")
    tmp.write_text(text)
    tmp.replace(manifest_path)

    if not args.only:
        # drop stale fixture files from earlier runs
        keep = {"manifest.json", "README.md"}
        for e in entries:
            keep.add(e["file"])
            keep.update(e["companions"])
        for p in sorted(out.glob("*.gz")):
            if p.name not in keep:
                print(f"removing stale {p.name}")
                p.unlink()

    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"done: {len(selected)} fixture(s) in {time.monotonic() - t_all:.1f}s, "
          f"{out} holds {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
