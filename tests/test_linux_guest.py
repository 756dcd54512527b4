"""The memory exports of a real Linux guest, opened by Volatility 3.

The ``linux-guest`` fixture is a savevm snapshot of qemu-system-x86_64 running
the Debian kernel with a busybox initramfs (tools/make_fixtures.py).  Its
``vmstate memory`` exports as raw, ELF core and LiME are given to Volatility
3's ``banners.Banners`` plugin (its command line, as an analyst runs it):
each must show the kernel's banner, which the guest itself printed from
/proc/version on its serial console while the fixture was made (recorded in
the manifest).  The marker string the guest's /init composed at run time and
wrote to a tmpfs file must be in each export, at the same guest-physical
address.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path
from helpers import invoke, missing

from qcow2snap.ops.memory import LIME_HEADER_SIZE

NAME = "linux-guest"
ENTRY = FIXTURES_BY_NAME[NAME]
SNAPSHOT = ENTRY["snapshots"][0]["name"]
FACTS = ENTRY["savevm"]
FORMATS = ("raw", "elf", "lime")

# Volatility's command line, run with this interpreter
VOL = ("import sys; from volatility3.cli import main; sys.argv[0] = 'vol'; main()")


@pytest.fixture(scope="module")
def exports(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The snapshot's guest memory as raw, ELF and LiME, by the CLI."""
    base = tmp_path_factory.mktemp("linux-guest")
    out = {}
    for fmt in FORMATS:
        out[fmt] = base / f"{SNAPSHOT}.{fmt}"
        result = invoke("vmstate", "memory", SNAPSHOT, fixture_path(fixture_dir, NAME),
                        "-o", out[fmt], "--format", fmt, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["size"] == out[fmt].stat().st_size
    return out


@pytest.fixture(scope="module")
def banners(exports: dict[str, Path]) -> dict[str, list[tuple[int, str]]]:
    """(offset, banner) of every banner ``vol -f EXPORT banners.Banners``
    finds, per format; the three runs go side by side."""
    try:
        import volatility3  # noqa: F401
    except ImportError as exc:
        missing("volatility3", f"it is not importable ({exc}); install the test extra")
    cache = exports["raw"].parent / "vol-cache"
    cache.mkdir(exist_ok=True)
    procs = {
        fmt: subprocess.Popen(
            [sys.executable, "-c", VOL, "-q", "--offline", "--cache-path", os.fspath(cache),
             "-r", "json", "-f", os.fspath(path), "banners.Banners"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for fmt, path in exports.items()
    }
    found = {}
    try:
        for fmt, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-2000:]
            # a version line comes before the JSON rows
            rows: list[dict[str, Any]] = json.loads(stdout[stdout.index("\n[") + 1:])
            found[fmt] = [(row["Offset"], row["Banner"]) for row in rows]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return found


@pytest.mark.parametrize("fmt", FORMATS)
def test_volatility_finds_the_kernel_banner(banners: dict[str, list[tuple[int, str]]],
                                            fmt: str) -> None:
    banner = FACTS["banner"]
    assert banner.startswith("Linux version ") and "#" in banner
    found = banners[fmt]
    assert banner in [text for _, text in found], found
    # every banner Volatility sees is this kernel's (in .rodata, in the
    # /proc/version buffer, ...) and sits at the same guest-physical address
    # whatever the container
    assert all(text.startswith(banner.split(" #")[0]) for _, text in found), found
    assert found == banners["raw"]


def _physical(path: Path, fmt: str, offset: int) -> int:
    """Guest-physical address of the byte at file ``offset`` of an export."""
    if fmt == "raw":
        return offset
    with open(path, "rb") as f:
        if fmt == "elf":
            head = f.read(64)
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phnum, = struct.unpack_from("<H", head, 0x38)
            f.seek(phoff)
            table = f.read(56 * phnum)
            for i in range(phnum):
                p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", table, 56 * i)
                if p_type == 1 and p_offset <= offset < p_offset + p_filesz:
                    return p_paddr + offset - p_offset
        else:
            at = 0
            while True:
                f.seek(at)
                header = f.read(LIME_HEADER_SIZE)
                assert len(header) == LIME_HEADER_SIZE
                _, _, s_addr, e_addr, _ = struct.unpack("<IIQQQ", header)
                data = at + LIME_HEADER_SIZE
                if data <= offset <= data + e_addr - s_addr:
                    return s_addr + offset - data
                at = data + e_addr - s_addr + 1
    raise AssertionError(f"offset {offset:#x} of {path} is in no range")


def test_marker_in_every_export(exports: dict[str, Path]) -> None:
    marker = FACTS["marker"].encode()
    # /init printed it in two halves: the whole string only exists in guest
    # RAM, written there by the running guest
    assert marker not in FACTS["init"].encode()
    where = {}
    for fmt, path in exports.items():
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            hits = []
            at = m.find(marker)
            while at >= 0:
                hits.append(_physical(path, fmt, at))
                at = m.find(marker, at + 1)
        where[fmt] = hits
    assert where["raw"], "the marker is not in the raw export"
    assert where["elf"] == where["lime"] == where["raw"]
