"""Agreement with QEMU on images where qcow2snap used to differ from it.

Each image is built the way QEMU's iotests build theirs: a good image made
here by qemu-img / qemu-io (or a stored fixture), then bytes patched.  The
result is compared with what the live qemu-img says about the same file:
the guest bytes of ``qemu-img convert -O raw``, the exact text of its
refusal, ``qemu-img info`` / ``check`` / ``snapshot``.

* a compressed cluster whose extended-L2 subcluster bitmap is not zero
  (iotest 271): QEMU ignores the bitmap when reading; only check objects;
* an L2 entry with a host offset that is not cluster aligned, or that does
  not match the guest offset in an image with an external data file, for
  every subcluster type that has a host offset (NORMAL, ZERO_ALLOC,
  UNALLOCATED_ALLOC);
* a virtual size that is not a multiple of 512 (QEMU rounds it down);
* snapshot table entries in an image with an external data file (QEMU
  lists none);
* QEMU's wording: unknown incompatible features, the feature-name table as
  QEMU reads it, and C's ``%#x`` ("0" for zero).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import fixture_path

import qcow2snap
from qcow2snap import describe
from qcow2snap import format as fmt
from qcow2snap.cli import cli
from qcow2snap.errors import (
    CorruptImageError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from qcow2snap.ops.check import check_image
from qcow2snap.ops.repair import repair_image
from qcow2snap.reader import ExtentKind

MiB = 1 << 20

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def qemu(tool: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def make_image(qemu_img: str, qemu_io: str, path: Path, size: str, options: str,
               *writes: str) -> Path:
    """``qemu-img create`` then one ``qemu-io`` run of ``writes``."""
    qemu(qemu_img, "create", "-f", "qcow2", "-o", options, path.name, size, cwd=path.parent)
    if writes:
        args = [a for w in writes for a in ("-c", w)]
        qemu(qemu_io, "-f", "qcow2", *args, path.name, cwd=path.parent)
    return path


def patch(path: Path, *changes: tuple[int, str, int]) -> None:
    """Write ``struct`` values at byte offsets of the file."""
    data = bytearray(path.read_bytes())
    for offset, fmt_, value in changes:
        struct.pack_into(fmt_, data, offset, value)
    path.write_bytes(bytes(data))


def u64_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def l2_slot(path: Path, index: int) -> int:
    """Byte offset of the active layer's L2 entry ``index`` (L1 entry 0)."""
    l1 = u64_at(path, 40)
    l2 = u64_at(path, l1) & fmt.L1E_OFFSET_MASK
    assert l2, "no L2 table"
    extended = u64_at(path, 72) & fmt.QCOW2_INCOMPAT_EXTL2
    return l2 + index * (16 if extended else 8)


def qemu_raw(qemu_img: str, path: Path, *args: str) -> bytes:
    out = path.with_name(path.name + ".raw")
    qemu(qemu_img, "convert", *args, "-O", "raw", path.name, out.name, cwd=path.parent)
    return out.read_bytes()


def qemu_corruption(qemu_img: str, path: Path) -> str:
    """The corruption message ``qemu-img convert`` fails with."""
    result = qemu(qemu_img, "convert", "-O", "raw", path.name, path.name + ".raw",
                  cwd=path.parent, check=False)
    assert result.returncode != 0, "qemu-img read the image"
    found = re.search(r"(?:Image is corrupt|Marking image as corrupt): (.*?); further",
                      result.stderr)
    assert found, result.stderr
    return found.group(1)


def read_all(path: Path, snapshot: str | None = None) -> bytes:
    with qcow2snap.open(path) as image, image.open_disk(snapshot) as disk:
        return disk.readall()


def create_snapshot(path: Path, name: str) -> None:
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot(name)


def revert_snapshot(path: Path, name: str) -> None:
    with qcow2snap.open(path, "r+") as image:
        image.revert_to_snapshot(name)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def qemu_check_json(qemu_img: str, path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = qemu(qemu_img, "check", "--output=json", *args, path.name, cwd=path.parent,
                  check=False)
    return result.returncode, json.loads(result.stdout), result.stderr


CHECK_KEYS = ("image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
              "compressed-clusters", "check-errors", "leaks", "corruptions")


def assert_check_agrees(qemu_img: str, path: Path) -> Any:
    """qcow2snap's check finds what ``qemu-img check`` finds: the same
    counts, exit status and ERROR lines."""
    report = check_image(path)
    rc, theirs, stderr = qemu_check_json(qemu_img, path)
    ours = describe.check_json(report)
    assert report.exit_code == rc
    for key in CHECK_KEYS:
        assert ours.get(key, 0) == theirs.get(key, 0), key
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    assert [f.message for f in report.findings if f.message.startswith("ERROR")] == errors
    return report


# ---------------------------------------------------------------------------
# 15. compressed clusters with a non-zero subcluster bitmap (iotest 271)
# ---------------------------------------------------------------------------

@pytest.fixture
def compressed_extl2(qemu_img: str, qemu_io: str, tmp_path: Path) -> Path:
    """An extended-L2 image with compressed clusters at L2 index 0 and 2
    and a partly written normal cluster at index 1 (iotest 271's way)."""
    return make_image(qemu_img, qemu_io, tmp_path / "c.qcow2", "1M",
                      "extended_l2=on,cluster_size=64k",
                      "write -c -P 0x33 0 64k", "write -P 0x44 64k 4k",
                      "write -c -P 0x55 128k 64k")


@pytest.mark.qemu
@pytest.mark.parametrize("bitmap", [
    0x00000001,                 # one allocation bit
    0x0000000100000000,         # one zero bit
    0xFFFFFFFF00000000,         # all "reads as zeros"
    0xFFFFFFFFFFFFFFFF,         # everything, even alloc and zero together
], ids=["alloc", "zero", "all-zero", "all"])
def test_compressed_cluster_bitmap_is_ignored_when_reading(
        bitmap: int, compressed_extl2: Path, qemu_img: str) -> None:
    path = compressed_extl2
    patch(path, (l2_slot(path, 0) + 8, ">Q", bitmap), (l2_slot(path, 2) + 8, ">Q", bitmap))
    theirs = qemu_raw(qemu_img, path)
    assert theirs[:64 << 10] == b"\x33" * (64 << 10)   # the oracle read the data
    assert read_all(path) == theirs
    with qcow2snap.open(path) as image:
        kinds = [e.kind for e in image.extents(length=192 << 10)]
    assert kinds[0] is ExtentKind.COMPRESSED and kinds[-1] is ExtentKind.COMPRESSED


@pytest.mark.qemu
def test_compressed_cluster_bitmap_check_agrees_and_repair_keeps_it(
        compressed_extl2: Path, qemu_img: str) -> None:
    """qemu-img check calls the bitmap an error and does not count the
    cluster (its host cluster is then "leaked"): so does qcow2snap's check.
    QEMU's -r leaks frees that cluster, whose data QEMU still reads; our
    repair keeps it."""
    path = compressed_extl2
    patch(path, (l2_slot(path, 0) + 8, ">Q", 1))
    before = qemu_raw(qemu_img, path)
    report = assert_check_agrees(qemu_img, path)
    assert (report.corruptions, report.leaks) == (1, 1)
    assert report.findings[0].message == (
        f"ERROR compressed cluster 0 with non-zero subcluster allocation bitmap, "
        f"entry={u64_at(path, l2_slot(path, 0)):#x}")
    result = repair_image(path, "leaks")
    assert any("kept 1 leaked cluster(s) holding compressed clusters" in c
               for c in result.changes)
    assert (result.corruptions, result.leaks) == (1, 1)
    assert qemu_raw(qemu_img, path) == before
    assert read_all(path) == before
