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
from conftest import fixture_path
from helpers import invoke, qemu_img_check

import qcow2snap
from qcow2snap import describe
from qcow2snap import format as fmt
from qcow2snap.errors import (
    CorruptImageError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from qcow2snap.ops import inspection
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


CHECK_KEYS = ("image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
              "compressed-clusters", "check-errors", "leaks", "corruptions")


def assert_check_agrees(qemu_img: str, path: Path) -> Any:
    """qcow2snap's check finds what ``qemu-img check`` finds: the same
    counts, exit status and ERROR lines."""
    report = check_image(path)
    theirs = qemu_img_check(qemu_img, path.name, cwd=path.parent)
    ours = describe.check_json(report)
    assert report.exit_code == theirs.returncode
    for key in CHECK_KEYS:
        assert ours.get(key, 0) == theirs.report.get(key, 0), key
    assert [f.message for f in report.findings if f.message.startswith("ERROR")] == \
        theirs.error_lines
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
    assert (result.final.corruptions, result.final.leaks) == (1, 1)
    assert qemu_raw(qemu_img, path) == before
    assert read_all(path) == before


# ---------------------------------------------------------------------------
# 16. host offsets QEMU refuses, for every subcluster type that has one
# ---------------------------------------------------------------------------

def _extl2(qemu_img: str, qemu_io: str, tmp_path: Path) -> Path:
    return make_image(qemu_img, qemu_io, tmp_path / "x.qcow2", "1M",
                      "extended_l2=on,cluster_size=64k", "write -P 0x11 0 64k",
                      "write -P 0x22 256k 2k")


def _standard(qemu_img: str, qemu_io: str, tmp_path: Path) -> Path:
    return make_image(qemu_img, qemu_io, tmp_path / "s.qcow2", "1M", "cluster_size=64k",
                      "write -P 0x11 0 64k", "write -P 0x22 256k 64k")


def _data_file(extended: bool) -> Any:
    def make(qemu_img: str, qemu_io: str, tmp_path: Path) -> Path:
        ext = ",extended_l2=on" if extended else ""
        return make_image(qemu_img, qemu_io, tmp_path / "d.qcow2", "1M",
                          f"data_file=d.data,cluster_size=64k{ext}",
                          "write -P 0x11 0 128k", "write -P 0x22 256k 64k")
    return make


COPIED = fmt.QCOW_OFLAG_COPIED
ALL_ZERO = fmt.QCOW_L2_BITMAP_ALL_ZEROES

#: (id, image maker, L2 index, entry, bitmap (extended L2), QEMU's message
#: with the L2 table's offset as {l2})
HOST_OFFSET_CASES = [
    # extended L2: a host offset makes every subcluster NORMAL, ZERO_ALLOC or
    # UNALLOCATED_ALLOC, and each of them has its offset checked
    ("extl2-unallocated-alloc", _extl2, 2, 0x50200, 0,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0x2)"),
    ("extl2-zero-alloc", _extl2, 2, 0x50200, ALL_ZERO,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0x2)"),
    ("extl2-zero-alloc-index-0", _extl2, 0, 0x50200 | COPIED, ALL_ZERO,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0)"),
    ("extl2-normal-index-0", _extl2, 0, 0x50200 | COPIED, 1,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0)"),
    # standard L2: the zero flag with an offset is ZERO_ALLOC
    ("standard-zero-alloc", _standard, 2, 0x50201, 0,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0x2)"),
    ("standard-normal-index-0", _standard, 0, 0x50200 | COPIED, 0,
     "Cluster allocation offset 0x50200 unaligned (L2 offset: {l2:#x}, L2 index: 0)"),
    # external data file: the host offset must be the guest offset
    ("data-file-zero-alloc", _data_file(False), 1, 0x50001 | COPIED, 0,
     "External data file host cluster offset 0x50000 does not match guest cluster offset: "
     "0x10000, L2 index: 0x1)"),
    ("data-file-host-0", _data_file(False), 3, COPIED, 0,
     "External data file host cluster offset 0 does not match guest cluster offset: "
     "0x30000, L2 index: 0x3)"),
    ("data-file-guest-0", _data_file(False), 0, 0x10000 | COPIED, 0,
     "External data file host cluster offset 0x10000 does not match guest cluster offset: "
     "0, L2 index: 0)"),
    ("data-file-extl2-unallocated-alloc", _data_file(True), 2, 0x50000 | COPIED, 0,
     "External data file host cluster offset 0x50000 does not match guest cluster offset: "
     "0x20000, L2 index: 0x2)"),
    ("data-file-extl2-zero-alloc", _data_file(True), 2, 0x50000 | COPIED, ALL_ZERO,
     "External data file host cluster offset 0x50000 does not match guest cluster offset: "
     "0x20000, L2 index: 0x2)"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("maker,index,entry,bitmap,message",
                         [pytest.param(*c[1:], id=c[0]) for c in HOST_OFFSET_CASES])
def test_host_offset_refused_like_qemu(maker: Any, index: int, entry: int, bitmap: int,
                                       message: str, qemu_img: str, qemu_io: str,
                                       tmp_path: Path) -> None:
    path = maker(qemu_img, qemu_io, tmp_path)
    slot = l2_slot(path, index)
    changes = [(slot, ">Q", entry)]
    if u64_at(path, 72) & fmt.QCOW2_INCOMPAT_EXTL2:
        changes.append((slot + 8, ">Q", bitmap))
    patch(path, *changes)
    message = message.format(l2=u64_at(path, u64_at(path, 40)) & fmt.L1E_OFFSET_MASK)
    assert qemu_corruption(qemu_img, path) == message
    with pytest.raises(CorruptImageError) as info:
        read_all(path)
    assert str(info.value) == message
    assert info.value.structure == "L2 table"


@pytest.mark.qemu
def test_l2_table_offset_message_prints_index_0_like_qemu(qemu_img: str, qemu_io: str,
                                                          tmp_path: Path) -> None:
    path = _standard(qemu_img, qemu_io, tmp_path)
    l1 = u64_at(path, 40)
    patch(path, (l1, ">Q", u64_at(path, l1) + 0x200))
    message = qemu_corruption(qemu_img, path)
    assert message.endswith("(L1 index: 0)")
    with pytest.raises(CorruptImageError) as info:
        read_all(path)
    assert str(info.value) == f"{message} in active layer"


def test_c_hex() -> None:
    assert [fmt.c_hex(v) for v in (0, 1, 0x1F, 1 << 40)] == ["0", "0x1", "0x1f",
                                                            "0x10000000000"]


# ---------------------------------------------------------------------------
# 17. a virtual size that is not a multiple of 512
# ---------------------------------------------------------------------------

def _odd_size_copy(fixture_dir: Path, tmp_path: Path, name: str) -> tuple[Path, int]:
    """A copy of fixture ``name`` whose header size is 212 bytes short of
    its own: QEMU opens it as 512 bytes short."""
    path = tmp_path / f"{name}.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, name), path)
    path.chmod(0o644)
    stored = u64_at(path, 24) - 212
    patch(path, (24, ">Q", stored))
    return path, stored


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["v3-basic", "v2"])
def test_unaligned_size_is_rounded_down_like_qemu(name: str, fixture_dir: Path,
                                                  tmp_path: Path, qemu_img: str) -> None:
    path, stored = _odd_size_copy(fixture_dir, tmp_path, name)
    rounded = stored - 300
    theirs = json.loads(qemu(qemu_img, "info", "--output=json", path.name,
                             cwd=tmp_path).stdout)
    assert theirs["virtual-size"] == rounded
    with qcow2snap.open(path) as image:
        assert image.header.size == stored      # the stored field is kept ...
        assert image.header.to_bytes() == path.read_bytes()[:image.header.header_length]
        assert image.size == image.layer().size == rounded   # ... QEMU's size is used
        assert describe.image_info_json(inspection.image_facts(image))["virtual-size"] == rounded
    data = qemu_raw(qemu_img, path)
    assert len(data) == rounded
    assert read_all(path) == data
    text = qemu(qemu_img, "info", path.name, cwd=tmp_path).stdout
    ours = invoke("info", str(path)).stdout
    virtual = [line for line in text.splitlines() if line.startswith("virtual size:")]
    assert virtual and virtual[0] in ours.splitlines()
    out = tmp_path / "ours.raw"
    assert invoke("extract", "-", str(path), "-o", str(out)).exit_code == 0
    assert out.read_bytes() == data


@pytest.mark.qemu
def test_unaligned_size_check_counts_qemus_clusters(fixture_dir: Path, tmp_path: Path,
                                                    qemu_img: str) -> None:
    """A size 300 bytes into a new cluster: QEMU counts the clusters of the
    rounded size."""
    path = tmp_path / "v3.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "v3-basic"), path)
    path.chmod(0o644)
    patch(path, (24, ">Q", u64_at(path, 24) + 300))
    report = assert_check_agrees(qemu_img, path)
    assert report.total_clusters == 1024


@pytest.mark.qemu
def test_unaligned_size_edits_like_qemu(fixture_dir: Path, tmp_path: Path,
                                        qemu_img: str) -> None:
    """A new snapshot records the rounded size, as QEMU's does; reverting
    to it does not resize, so the stored size field is kept."""
    ours, stored = _odd_size_copy(fixture_dir, tmp_path, "v3-basic")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    qemu(qemu_img, "snapshot", "-c", "odd", theirs.name, cwd=tmp_path)
    create_snapshot(ours, "odd")
    for path in (ours, theirs):
        with qcow2snap.open(path) as image:
            assert image.find_snapshot("odd").disk_size_field == stored - 300
    qemu(qemu_img, "snapshot", "-a", "odd", theirs.name, cwd=tmp_path)
    revert_snapshot(ours, "odd")
    assert u64_at(ours, 24) == u64_at(theirs, 24) == stored
    assert read_all(ours) == qemu_raw(qemu_img, theirs)


@pytest.mark.qemu
def test_snapshot_disk_size_not_a_multiple_of_512(fixture_dir: Path, tmp_path: Path,
                                                  qemu_img: str) -> None:
    """QEMU cannot revert to it ("The new size must be a multiple of 512"),
    nor can qcow2snap; its disk reads as whole sectors."""
    path = tmp_path / "v3.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "v3-basic"), path)
    path.chmod(0o644)
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot("second")
        offset = sn.entry_offset + 48
        whole = read_all(path, "second")
    patch(path, (offset, ">Q", 48 * MiB + 300))
    copy = tmp_path / "theirs.qcow2"
    shutil.copyfile(path, copy)
    result = qemu(qemu_img, "snapshot", "-a", "second", copy.name, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "The new size must be a multiple of 512" in result.stderr
    with qcow2snap.open(path) as image:
        assert image.layer("second").size == 48 * MiB
    assert read_all(path, "second") == whole[:48 * MiB]
    with pytest.raises(UnsupportedImageError, match="is not a multiple of 512"):
        revert_snapshot(path, "second")


def test_v2_snapshot_without_disk_size_has_the_rounded_size(fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    """An entry whose extra data does not hold disk_size gets QEMU's
    bs->total_sectors * 512 (the last entry of the table is shortened to
    8 bytes of extra data in place)."""
    path, stored = _odd_size_copy(fixture_dir, tmp_path, "v2")
    with qcow2snap.open(path) as image:
        sn = image.snapshots[-1]
    data = bytearray(path.read_bytes())
    start = sn.entry_offset
    entry = bytes(data[start:start + sn.entry_length])
    extra = 8
    shorter = (entry[:36] + struct.pack(">I", extra) + entry[40:40 + extra]
               + entry[40 + sn.extra_data_size:])
    data[start:start + len(entry)] = shorter.ljust(len(entry), b"\0")
    path.write_bytes(bytes(data))
    with qcow2snap.open(path) as image:
        last = image.snapshots[-1]
        assert (last.disk_size_field, last.disk_size) == (None, stored - 300)
        assert image.layer(last).size == stored - 300


# ---------------------------------------------------------------------------
# 18. snapshot table entries in an image with an external data file
# ---------------------------------------------------------------------------

@pytest.fixture
def data_file_with_snapshots(qemu_img: str, qemu_io: str, tmp_path: Path) -> Path:
    """An image with an external data file and two snapshot table entries:
    the snapshots are taken by qemu-img while the data-file bit is cleared
    (nothing is allocated yet, so they are sound), then the bit is set back
    and data is written."""
    path = make_image(qemu_img, qemu_io, tmp_path / "df.qcow2", "4M", "data_file=df.data")
    incompatible = u64_at(path, 72)
    patch(path, (72, ">Q", incompatible & ~fmt.QCOW2_INCOMPAT_DATA_FILE))
    qemu(qemu_img, "snapshot", "-c", "s1", path.name, cwd=tmp_path)
    qemu(qemu_img, "snapshot", "-c", "s2", path.name, cwd=tmp_path)
    patch(path, (72, ">Q", incompatible))
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 128k", path.name, cwd=tmp_path)
    return path


IGNORED_LINE = ("2 snapshot table entries are present and ignored: QEMU does not support "
                "internal snapshots with an external data file")


@pytest.mark.qemu
def test_data_file_snapshots_are_not_listed(data_file_with_snapshots: Path,
                                            qemu_img: str) -> None:
    path = data_file_with_snapshots
    cwd = path.parent
    listed = qemu(qemu_img, "snapshot", "-l", path.name, cwd=cwd)
    assert listed.stdout == ""
    theirs = json.loads(qemu(qemu_img, "info", "--output=json", path.name, cwd=cwd).stdout)
    assert "snapshots" not in theirs
    with qcow2snap.open(path) as image:
        assert image.snapshots == ()
        assert [(s.id, s.name) for s in image.ignored_snapshots] == [("1", "s1"), ("2", "s2")]
        info = describe.image_info_json(inspection.image_facts(image, path.name))
    assert "snapshots" not in info
    assert info["ignored-snapshots"] == [{"id": "1", "name": "s1"}, {"id": "2", "name": "s2"}]
    assert info["nb-snapshots"] == 2
    result = invoke("list", str(path))
    assert (result.exit_code, result.stdout) == (0, "")
    result = invoke("list", "--json", str(path))
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])
    text = invoke("info", str(path)).stdout
    assert "Snapshot list:" not in text
    assert IGNORED_LINE in text.splitlines()
    assert "Snapshot list:" not in qemu(qemu_img, "info", path.name, cwd=cwd).stdout


@pytest.mark.qemu
def test_data_file_snapshots_cannot_be_read_or_reverted(data_file_with_snapshots: Path,
                                                        qemu_img: str) -> None:
    path = data_file_with_snapshots
    result = qemu(qemu_img, "snapshot", "-a", "s1", path.name, cwd=path.parent, check=False)
    assert result.returncode != 0 and "Operation not supported" in result.stderr
    message = (f"{path}: no snapshot with ID or name 's1' (2 snapshot table entries are "
               f"ignored: QEMU does not support internal snapshots with an external data file)")
    with qcow2snap.open(path) as image:
        with pytest.raises(SnapshotNotFoundError) as info:
            image.open_disk("s1")
        assert str(info.value) == message
    extracted = invoke("extract", "s1", str(path), "-o", str(path.parent / "s1.raw"))
    assert extracted.exit_code == SnapshotNotFoundError.exit_code
    assert read_all(path) == qemu_raw(qemu_img, path)


@pytest.mark.qemu
def test_data_file_snapshots_are_reported_by_check(data_file_with_snapshots: Path,
                                                   qemu_img: str) -> None:
    report = assert_check_agrees(qemu_img, data_file_with_snapshots)
    assert [f.message for f in report.findings] == ["ERROR 2 snapshots in image with data file"]


def test_data_file_fixture_with_a_written_snapshot_table(fixture_dir: Path,
                                                         tmp_path: Path) -> None:
    """The stored data-file fixture with a snapshot table written by hand
    (one disk-only entry without an L1 table, in a cluster appended at the
    end of the file)."""
    path = tmp_path / "data-file.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "data-file"), path)
    shutil.copyfile(fixture_path(fixture_dir, "data-file").with_name("data-file.data"),
                    tmp_path / "data-file.data")
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    table = (len(data) + 0xFFFF) & ~0xFFFF
    entry = struct.pack(">QIHHIIQII", 0, 0, 1, 4, 1, 0, 0, 0, 24) + struct.pack(
        ">QQQ", 0, 8 * MiB, 0) + b"1" + b"lost"
    data += bytes(table - len(data)) + entry
    struct.pack_into(">IQ", data, 60, 1, table)
    path.write_bytes(bytes(data))
    with qcow2snap.open(path) as image:
        assert image.snapshots == ()
        assert [s.name for s in image.ignored_snapshots] == ["lost"]
        with pytest.raises(SnapshotNotFoundError, match="1 snapshot table entries are ignored"):
            image.layer("lost")
    assert check_image(path).findings[0].message == "ERROR 1 snapshots in image with data file"


# ---------------------------------------------------------------------------
# QEMU's wording: unknown incompatible features and the feature-name table
# ---------------------------------------------------------------------------

def _feature(type_: int, bit: int, name: bytes) -> bytes:
    return bytes([type_, bit]) + name.ljust(46, b"\0")


def _with_feature_table(fixture_dir: Path, tmp_path: Path, table: bytes,
                        incompatible: int = 0, compatible: int = 0) -> Path:
    """v3-basic with its feature-name table (its only extension) replaced."""
    path = tmp_path / "features.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "v3-basic"), path)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    start = struct.unpack_from(">I", data, 100)[0]
    assert struct.unpack_from(">I", data, start)[0] == fmt.QCOW2_EXT_MAGIC_FEATURE_TABLE
    data[start:start + 8 + 2048] = bytes(8 + 2048)
    struct.pack_into(">II", data, start, fmt.QCOW2_EXT_MAGIC_FEATURE_TABLE, len(table))
    data[start + 8:start + 8 + len(table)] = table
    struct.pack_into(">QQ", data, 72, incompatible, compatible)
    path.write_bytes(bytes(data))
    return path


def _qemus_table(fixture_dir: Path) -> bytes:
    data = fixture_path(fixture_dir, "v3-basic").read_bytes()
    start = struct.unpack_from(">I", data, 100)[0]
    length = struct.unpack_from(">I", data, start + 4)[0]
    return data[start + 8:start + 8 + length]


#: (id, table (QEMU's own follows where marked), incompatible bits, QEMU's message)
FEATURE_CASES = [
    ("unnamed-bits", None, (1 << 21) | (1 << 40),
     "Unknown incompatible feature: 10000200000"),
    ("table-order", [_feature(0, 21, b"second"), _feature(0, 20, b"first"), "qemu"],
     (1 << 20) | (1 << 21) | (1 << 40),
     "second, first, Unknown incompatible feature: 10000000000"),
    ("stops-at-unnamed-entry",
     [_feature(0, 20, b"a"), _feature(0, 21, b""), _feature(0, 22, b"c")],
     (1 << 20) | (1 << 21) | (1 << 22), "a, Unknown incompatible feature: 600000"),
    ("only-incompatible-entries", [_feature(1, 21, b"compatible"), _feature(0, 21, b"it"),
                                   "qemu"], 1 << 21, "it"),
    ("first-match-wins", [_feature(0, 21, b"one"), _feature(0, 21, b"two")], 1 << 21, "one"),
    ("name-of-46-bytes", [_feature(0, 21, b"N" * 46), "qemu"], 1 << 21, "N" * 46),
    ("bit-modulo-64", [_feature(0, 85, b"eighty-five"), "qemu"], 1 << 21, "eighty-five"),
    ("short-last-entry", ["qemu", _feature(0, 21, b"short")[:20]], 1 << 21, "short"),
    ("short-last-entry-of-3-bytes", ["qemu", bytes([0, 21]) + b"y"], 1 << 21, "y"),
    ("short-last-entry-without-name", ["qemu", bytes([0, 21])], 1 << 21,
     "Unknown incompatible feature: 200000"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("parts,bits,message",
                         [pytest.param(*c[1:], id=c[0]) for c in FEATURE_CASES])
def test_unsupported_features_message_is_qemus(parts: list[Any] | None, bits: int,
                                               message: str, fixture_dir: Path,
                                               tmp_path: Path, qemu_img: str) -> None:
    qemus = _qemus_table(fixture_dir)
    table = qemus if parts is None else b"".join(
        qemus if p == "qemu" else p for p in parts)
    path = _with_feature_table(fixture_dir, tmp_path, table, incompatible=bits)
    full = f"Unsupported qcow2 feature(s): {message}"
    result = qemu(qemu_img, "info", path.name, cwd=tmp_path, check=False)
    assert result.stderr.strip() == f"qemu-img: Could not open '{path.name}': {full}"
    with pytest.raises(UnsupportedImageError) as info:
        qcow2snap.open(path)
    assert str(info.value) == full


def test_short_last_feature_entry_names_a_feature_in_info(fixture_dir: Path,
                                                          tmp_path: Path) -> None:
    """A last entry shorter than 48 bytes names its bit (zero-padded)."""
    table = _feature(0, 0, b"dirty bit") + _feature(1, 0, b"lazy, as named here")[:10]
    path = _with_feature_table(fixture_dir, tmp_path, table, compatible=1)
    with qcow2snap.open(path) as image:
        assert [(f.type, f.bit, f.name) for f in image.feature_names] == [
            (0, 0, "dirty bit"), (1, 0, "lazy, as")]
        assert image.describe_features(fmt.QCOW2_FEAT_TYPE_COMPATIBLE, 1) == ["lazy, as"]
        info = describe.image_info_json(inspection.image_facts(image))
        assert info["features"]["compatible"] == ["lazy, as"]
        # the extension itself is kept byte for byte
        assert image.extension(fmt.QCOW2_EXT_MAGIC_FEATURE_TABLE).data == table
