"""The gates and guarantees around editing, checked against real QEMU.

* locks: a running QEMU (``qemu-io``) keeps qcow2snap out, and qcow2snap
  holding an image keeps QEMU writers out;
* dirty / corrupt images are refused for every edit, before any write;
* what qcow2snap does not understand survives: unknown autoclear bits are
  cleared (known ones kept), unknown header fields and extensions and
  unknown snapshot extra data are kept byte for byte (QEMU does the same:
  each test runs qemu-img on a twin copy as the reference);
* limits and naming: external data file, 65536 snapshots, existing names,
  overwrite, QEMU's ID arithmetic (``strtoul`` + 1, reuse after delete);
* ``edit_images`` changes all disks or none;
* ``dry_run`` writes nothing; deleting returns space to the file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import sha256_file
from helpers import assert_qemu_clean

import qcow2snap
from qcow2snap import (
    ImageInUseError,
    ImageNeedsRepairError,
    Qcow2Error,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from qcow2snap.locks import probe_locks
from qcow2snap.model import serialize_snapshot_table
from qcow2snap.ops.edit import Operation, edit_images
from qcow2snap.ops.transaction import CommitResult

pytestmark = pytest.mark.qemu

CLUSTER = 65536

#: header bytes an edit may change: size, l1_size, l1_table_offset,
#: refcount_table_offset/clusters, nb_snapshots, snapshots_offset, autoclear
MUTABLE_HEADER_RANGES = [(24, 32), (36, 72), (88, 96)]


# --------------------------------------------------------------------------
# helpers


def messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings' texts, without ResourceWarnings (another test's
    leftovers, collected by the garbage collector at any moment)."""
    return [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]


def qemu(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def snapshot_list(qemu_img: str, path: Path) -> list[tuple[str, str]]:
    info = json.loads(qemu(qemu_img, "info", "--output=json", path.name, cwd=path.parent).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def twin(path: Path, name: str) -> Path:
    """A copy beside ``path`` (same directory, so relative companions work)."""
    other = path.parent / name
    shutil.copyfile(path, other)
    return other


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_length(data: bytes) -> int:
    return struct.unpack_from(">I", data, 100)[0]


def extensions_end(data: bytes) -> int:
    """Offset just past the end-of-extensions marker in cluster 0."""
    offset = header_length(data)
    while True:
        ext_type, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if ext_type == 0:
            return offset
        offset += (length + 7) & ~7


def assert_header_preserved(before: bytes, after: bytes) -> None:
    """Cluster 0 is unchanged except for the fields an edit may update."""
    assert len(after) >= len(before[:CLUSTER])
    for i in range(CLUSTER):
        if before[i] != after[i] and not any(lo <= i < hi for lo, hi in MUTABLE_HEADER_RANGES):
            raise AssertionError(f"cluster 0 byte {i} changed: {before[i]:#x} -> {after[i]:#x}")


def rewrite_snapshot_table(path: Path, mutate: Any) -> None:
    """Rebuild the snapshot table in place with qcow2snap's serializer after
    ``mutate(records)`` (a list of :class:`~qcow2snap.Snapshot` whose items
    it replaces); it must still fit in the clusters of the old one (so
    refcounts stay right)."""
    with qcow2snap.open(path) as image:
        records = list(image.snapshots)
        offset = image.header.snapshots_offset
        room = -(-image.snapshot_table.size // image.cluster_size) * image.cluster_size
    mutate(records)
    table = serialize_snapshot_table(records)
    assert len(table) <= room, "the rebuilt table does not fit in place"
    patch(path, offset, table + bytes(room - len(table)))
    patch(path, 60, struct.pack(">I", len(records)))


def entry_bytes(where: Path | Any, snapshot_id: str) -> bytes:
    """The stored entry of a snapshot (without padding), from a path or an
    open image."""
    if isinstance(where, Path):
        with qcow2snap.open(where) as image:
            return entry_bytes(image, snapshot_id)
    sn = where.find_snapshot(snapshot_id, by="id")
    length = 40 + sn.extra_data_size + len(sn.id_bytes) + len(sn.name_bytes)
    return where.pread(sn.entry_offset, length)


def state(path: Path) -> tuple[str, int]:
    st = path.stat()
    return sha256_file(path), st.st_mtime_ns


def age(path: Path) -> None:
    """An old mtime, so that any write would show."""
    os.utime(path, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9))


# --------------------------------------------------------------------------
# locks


def _wait_for_locks(path: Path, holder: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while not probe_locks(fd).in_use:
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.02)
    finally:
        os.close(fd)


def _stop(holder: subprocess.Popen[Any]) -> None:
    if holder.poll() is None:
        holder.kill()
    holder.wait(timeout=30)


#: the lock bytes qemu-io (QEMU 7.2) holds, as qcow2snap describes them
QEMU_IO_LOCKS = {False: "holds consistent read, write, resize; does not share write, resize",
                 True: "holds consistent read; does not share write, resize"}


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_running_qemu_keeps_qcow2snap_out(read_only: bool, fixture_copy: Any, qemu_io: str,
                                          qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    before = sha256_file(path)
    flags = ["-r"] if read_only else []
    holder = subprocess.Popen([qemu_io, "-f", "qcow2", *flags, "-c", "sleep 5000", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_locks(path, holder)
        # QEMU's holder is named as such (a qcow2snap editor is named with
        # its PID instead: tests/test_concurrent_edits.py)
        locks = QEMU_IO_LOCKS[read_only]
        with pytest.raises(ImageInUseError) as info:
            qcow2snap.open(path, "r+")
        assert str(info.value) == (
            f"{path} is in use by a running QEMU process ({locks}); shut the VM down (or close "
            f"the qemu-img/qemu-io holding it) before editing")
        # reading beside it: a writer is worth a warning, a reader is not
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qcow2snap.open(path).close()
        assert messages(caught) == ([] if read_only else [
            f"{path}: a running QEMU process holds this image open for writing ({locks}); what "
            f"is read may be inconsistent"])
        # also through edit_images, and QEMU agrees that the image is taken
        with pytest.raises(ImageInUseError):
            edit_images([path], "create", name="blocked")
        proc = qemu(qemu_img, "snapshot", "-c", "blocked", path.name, cwd=path.parent,
                    check=False)
        assert proc.returncode != 0 and "lock" in proc.stderr
        assert holder.poll() is None, "the holder must still be running for this test to mean much"
    finally:
        _stop(holder)
    assert sha256_file(path) == before
    # once the holder is gone, editing works
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("after")
    assert_qemu_clean(qemu_img, path)


def test_qcow2snap_keeps_qemu_writers_out(fixture_copy: Any, qemu_io: str, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path, "r+") as image:
        before = sha256_file(path)
        proc = qemu(qemu_io, "-f", "qcow2", "-c", "write 0 512", str(path), cwd=path.parent,
                    check=False)
        assert proc.returncode != 0
        assert "Failed to get" in proc.stderr and "lock" in proc.stderr, proc.stderr
        snap = qemu(qemu_img, "snapshot", "-c", "x", path.name, cwd=path.parent, check=False)
        assert snap.returncode != 0 and "Failed to get" in snap.stderr, snap.stderr
        assert sha256_file(path) == before
        # the handle is still usable after QEMU was turned away
        image.create_snapshot("mine")
    # closed: QEMU writes again
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x5 0 512", str(path), cwd=path.parent)
    assert_qemu_clean(qemu_img, path)
    assert [n for _, n in snapshot_list(qemu_img, path)][-1] == "mine"


# --------------------------------------------------------------------------
# dirty and corrupt images


EDITS = {
    "create": lambda im, dry: im.create_snapshot("new", dry_run=dry),
    "create-overwrite": lambda im, dry: im.create_snapshot(im.snapshots[0].name, overwrite=True,
                                                           dry_run=dry),
    "delete": lambda im, dry: im.delete_snapshot(im.snapshots[0], dry_run=dry),
    "revert": lambda im, dry: im.revert_to_snapshot(im.snapshots[0], dry_run=dry),
    "rename": lambda im, dry: im.rename_snapshot(im.snapshots[0], "renamed", dry_run=dry),
}


@pytest.mark.parametrize("bit,what", [(0, "dirty"), (1, "corrupt")])
@pytest.mark.parametrize("name", ["v3-basic", "lazy-refcounts"])
def test_dirty_or_corrupt_image_is_never_edited(bit: int, what: str, name: str,
                                                fixture_copy: Any) -> None:
    path = fixture_copy(name)
    data = bytearray(path.read_bytes())
    data[79] |= 1 << bit
    path.write_bytes(bytes(data))
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        assert getattr(image, what)
        for label, edit in EDITS.items():
            for dry in (True, False):
                with pytest.raises(ImageNeedsRepairError) as info:
                    edit(image, dry)
                message = str(info.value)
                assert what in message and "check" in message and "repair" in message, (
                    label, message)
    with pytest.raises(ImageNeedsRepairError):
        edit_images([path], "create", name="x")
    assert state(path) == before


# --------------------------------------------------------------------------
# what qcow2snap does not understand


def test_unknown_autoclear_bit_cleared_known_kept(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    # a persistent bitmap: known autoclear bit 0 and a bitmaps extension
    qemu(qemu_img, "bitmap", "--add", path.name, "bm0", cwd=path.parent)
    data = bytearray(path.read_bytes())
    assert struct.unpack_from(">Q", data, 88)[0] == 1
    struct.pack_into(">Q", data, 88, 1 | 1 << 5 | 1 << 40)
    path.write_bytes(bytes(data))
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "s", reference.name, cwd=path.parent)
    before = path.read_bytes()
    with qcow2snap.open(path, "r+") as image:
        _, result = image.create_snapshot("s")
        assert result.header_changes["autoclear_features"] == (1 | 1 << 5 | 1 << 40, 1)
    after = path.read_bytes()
    assert struct.unpack_from(">Q", after, 88)[0] == 1
    # QEMU clears the same bits when it writes
    assert struct.unpack_from(">Q", reference.read_bytes(), 88)[0] == 1
    assert_header_preserved(before, after)
    assert_qemu_clean(qemu_img, path)
    info = json.loads(qemu(qemu_img, "info", "--output=json", path.name, cwd=path.parent).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["bm0"]


def test_unknown_incompatible_bit_refused(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    data = bytearray(path.read_bytes())
    data[79] |= 1 << 7          # incompatible bit 7: nobody knows it
    path.write_bytes(bytes(data))
    age(path)
    before = state(path)
    proc = qemu(qemu_img, "snapshot", "-c", "x", twin(path, "q.qcow2").name, cwd=path.parent,
                check=False)
    assert proc.returncode != 0     # QEMU cannot open it at all
    with pytest.raises(UnsupportedImageError), qcow2snap.open(path, "r+") as image:
        image.create_snapshot("x")
    assert state(path) == before


def test_unknown_compatible_bit_kept(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    data = bytearray(path.read_bytes())
    data[87] |= 1 << 6          # compatible bit 6: may be ignored, must be kept
    path.write_bytes(bytes(data))
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "x", reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("x")
    assert path.read_bytes()[80:88] == reference.read_bytes()[80:88] == bytes(data[80:88])
    assert_qemu_clean(qemu_img, path)


def _with_unknown_extension(data: bytes) -> bytes:
    """Cluster 0 with an unknown 13-byte extension before the end marker."""
    end = extensions_end(data)
    marker = end - 8
    ext = struct.pack(">II", 0x51534E50, 13) + bytes(range(0xA0, 0xAD)) + b"\0\0\0"
    out = data[:marker] + ext + data[marker:]
    return out[:CLUSTER] + data[CLUSTER:]


def _with_header_tail(data: bytes) -> bytes:
    """header_length 120: 8 unknown bytes after the 112-byte v3 header."""
    hl = header_length(data)
    assert hl == 112
    end = extensions_end(data)
    tail = bytes.fromhex("c0ffee0123456789")
    head = bytearray(data[:hl])
    struct.pack_into(">I", head, 100, hl + 8)
    out = bytes(head) + tail + data[hl:end]
    return out + bytes(CLUSTER - len(out)) + data[CLUSTER:]


@pytest.mark.parametrize("variant", ["extension", "header-tail", "both"])
def test_unknown_header_bytes_survive(variant: str, fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    data = path.read_bytes()
    if variant in ("header-tail", "both"):
        data = _with_header_tail(data)
    if variant in ("extension", "both"):
        data = _with_unknown_extension(data)
    path.write_bytes(data)
    assert_qemu_clean(qemu_img, path)          # QEMU accepts the image as patched
    with qcow2snap.open(path) as image:
        assert image.header.header_length == (120 if variant != "extension" else 112)
        assert len(image.unknown_extensions) == (0 if variant == "header-tail" else 1)
    known = data[:CLUSTER]
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "n", reference.name, cwd=path.parent)
    qemu(qemu_img, "snapshot", "-d", "first", reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("n")
        image.delete_snapshot(image.find_snapshot("first", by="name"))
        image.revert_to_snapshot(image.find_snapshot("second", by="name"))
        image.rename_snapshot(image.find_snapshot("third", by="name"), "3rd")
    after = path.read_bytes()
    assert_header_preserved(known, after)
    end = extensions_end(after)
    assert after[100:104] == known[100:104]
    assert after[104:end] == known[104:end]
    # QEMU keeps them too (the reference for "survive")
    ref = reference.read_bytes()
    assert ref[104:extensions_end(ref)] == known[104:end]
    assert_qemu_clean(qemu_img, path)


UNKNOWN_EXTRA = bytes.fromhex("deadbeef01020304")


@pytest.mark.parametrize("name", ["v3-basic", "v2"])
def test_unknown_snapshot_extra_data_survives(name: str, fixture_copy: Any,
                                              qemu_img: str) -> None:
    path = fixture_copy(name)

    def add_extra(records: list[Any]) -> None:
        records[1] = dataclasses.replace(records[1], unknown_extra=UNKNOWN_EXTRA,
                                         extra_data_size=24 + len(UNKNOWN_EXTRA))

    rewrite_snapshot_table(path, add_extra)
    assert_qemu_clean(qemu_img, path)
    with qcow2snap.open(path) as image:
        sn = image.snapshots[1]
        assert sn.extra_data_size == 32 and sn.unknown_extra == UNKNOWN_EXTRA
        target, first, last = sn.id, image.snapshots[0], image.snapshots[2]
        first_id, first_name, last_id = first.id, first.name, last.id
    original = entry_bytes(path, target)
    assert original[36:40] == struct.pack(">I", 32)
    assert original[64:72] == UNKNOWN_EXTRA

    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "new", reference.name, cwd=path.parent)
    qemu(qemu_img, "snapshot", "-d", first_name, reference.name, cwd=path.parent)
    qemu(qemu_img, "snapshot", "-a", last_id, reference.name, cwd=path.parent)
    # QEMU (>= 4.2) keeps unknown extra data verbatim: the reference
    assert entry_bytes(reference, target)[8:] == original[8:]

    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("new")
        assert entry_bytes(image, target)[8:] == original[8:]
        image.delete_snapshot(image.find_snapshot(first_id, by="id"))
        assert entry_bytes(image, target)[8:] == original[8:]
        image.rename_snapshot(image.find_snapshot(last_id, by="id"), "other-renamed")
        assert entry_bytes(image, target)[8:] == original[8:]
        image.revert_to_snapshot(image.find_snapshot(last_id, by="id"))
        assert entry_bytes(image, target)[8:] == original[8:]
        # renaming the entry itself keeps its extra data too
        image.rename_snapshot(image.find_snapshot(target, by="id"), "mine")
    assert_qemu_clean(qemu_img, path)
    renamed = entry_bytes(path, target)
    # l1_size, id length, dates, clock, VM-state size, extra size and all 32
    # bytes of extra data are kept; then the ID, then the new name
    assert renamed[8:14] == original[8:14] and renamed[16:72] == original[16:72]
    assert renamed[72:72 + len(target)] == target.encode()
    assert renamed[72 + len(target):] == b"mine"
    assert snapshot_list(qemu_img, path) == [(target, "mine"), (last_id, "other-renamed"),
                                            (snapshot_list(qemu_img, reference)[-1][0], "new")]


def test_short_extra_data_entries_rewritten_like_qemu(fixture_copy: Any,
                                                       qemu_img: str) -> None:
    """Entries written by old QEMU (0 or 16 bytes of extra data, v2) come
    out of a table rewrite exactly as QEMU rewrites them: 24 bytes, the
    disk size they implied (the current one), icount -1."""
    path = fixture_copy("v2")

    def old_entry(r: Any, extra_size: int) -> bytes:
        icount = 0xFFFFFFFFFFFFFFFF if r.icount_field is None else r.icount_field
        extra = struct.pack(">QQQ", r.vm_state_size, r.disk_size, icount)[:extra_size]
        return struct.pack(">QIHHIIQII", r.l1_table_offset, r.l1_size, len(r.id_bytes),
                           len(r.name_bytes), r.date_sec, r.date_nsec, r.vm_clock_nsec,
                           r.vm_state_size, extra_size) + extra + r.id_bytes + r.name_bytes

    with qcow2snap.open(path) as image:
        records = list(image.snapshots)
        offset = image.header.snapshots_offset
    table = b""
    for record, extra_size in zip(records, [0, 16, 24], strict=True):
        table += bytes(-len(table) % 8) + old_entry(record, extra_size)
    patch(path, offset, table + bytes(CLUSTER - len(table)))
    assert_qemu_clean(qemu_img, path)
    with qcow2snap.open(path) as image:
        assert [s.extra_data_size for s in image.snapshots] == [0, 16, 24]
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "new", reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("new")
    for sid in ("1", "2", "3"):
        ours, theirs = entry_bytes(path, sid), entry_bytes(reference, sid)
        assert ours[8:] == theirs[8:], (sid, ours.hex(), theirs.hex())
        assert ours[36:40] == struct.pack(">I", 24)
    # the new entries agree too, but for the date
    ours, theirs = entry_bytes(path, "4"), entry_bytes(reference, "4")
    assert ours[8:16] + ours[24:] == theirs[8:16] + theirs[24:]
    assert_qemu_clean(qemu_img, path)


def test_v2_revert_to_another_disk_size_refused_like_qemu(fixture_copy: Any,
                                                         qemu_img: str) -> None:
    path = fixture_copy("v2")

    def smaller(records: list[Any]) -> None:
        records[0] = dataclasses.replace(records[0], disk_size=16 << 20,
                                         disk_size_field=16 << 20)

    rewrite_snapshot_table(path, smaller)
    reference = twin(path, "qemu.qcow2")
    proc = qemu(qemu_img, "snapshot", "-a", "1", reference.name, cwd=path.parent, check=False)
    assert proc.returncode != 0 and "Can't resize a v2 image which has snapshots" in proc.stderr
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        for dry in (True, False):
            with pytest.raises(UnsupportedImageError, match="v2"):
                image.revert_to_snapshot(image.find_snapshot("1", by="id"), dry_run=dry)
        # the others (same size) are fine
        image.revert_to_snapshot(image.find_snapshot("2", by="id"), dry_run=True)
    assert state(path) == before


# --------------------------------------------------------------------------
# limits, names and IDs


def test_external_data_file_refused(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("data-file")
    data_file = path.parent / "data-file.data"
    age(path)
    before = (state(path), sha256_file(data_file))
    proc = qemu(qemu_img, "snapshot", "-c", "x", twin(path, "q.qcow2").name, cwd=path.parent,
                check=False)
    assert proc.returncode != 0          # QEMU refuses too
    with qcow2snap.open(path, "r+") as image:
        for dry in (True, False):
            with pytest.raises(UnsupportedImageError, match="data file"):
                image.create_snapshot("x", dry_run=dry)
    with pytest.raises(UnsupportedImageError):
        edit_images([path], "create", name="x")
    assert (state(path), sha256_file(data_file)) == before


def test_snapshot_count_limit(fixture_copy: Any) -> None:
    """65536 entries (all sharing one snapshot's L1, so refcounts are off):
    create must refuse before writing anything.  (qemu-img refuses too, with
    "File too large"; it takes seconds to say so, so it is not run here.)"""
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path) as image:
        first = image.snapshots[0]
        file_size = image.file_size
    # what serialize_snapshot_table writes, built quickly: 24 bytes of extra
    # data, id "N", name "sN", each entry 8-byte aligned
    entries = []
    for i in range(65536):
        sid, name = str(i + 1).encode(), f"s{i}".encode()
        entry = struct.pack(">QIHHIIQIIQQQ", first.l1_table_offset, first.l1_size, len(sid),
                            len(name), first.date_sec, first.date_nsec, 0, 0, 24, 0,
                            first.disk_size, 0) + sid + name
        entries.append(entry + bytes(-len(entry) % 8))
    table = b"".join(entries)
    offset = -(-file_size // CLUSTER) * CLUSTER
    patch(path, offset, table)
    patch(path, 60, struct.pack(">IQ", 65536, offset))
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        assert len(image.snapshots) == 65536
        assert image.snapshots[-1].name == "s65535"
        for dry in (True, False):
            with pytest.raises(UnsupportedImageError, match="65536"):
                image.create_snapshot("one-more", dry_run=dry)
    assert state(path) == before


def test_existing_name_needs_overwrite(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("ambiguous")
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        for name in ("dup", "x", "1"):
            with pytest.raises(SnapshotExistsError, match="overwrite"):
                image.create_snapshot(name)
    with pytest.raises(SnapshotExistsError):
        edit_images([path], "create", name="dup")
    assert state(path) == before

    # overwrite = HMP savevm: delete the first of that name, then create;
    # the new ID is computed after the delete (max numeric ID + 1)
    reference = twin(path, "qemu.qcow2")
    for name in ("dup", "dup", "1"):
        qemu(qemu_img, "snapshot", "-d", name, reference.name, cwd=path.parent)
        qemu(qemu_img, "snapshot", "-c", name, reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        new_id, _ = image.create_snapshot("dup", overwrite=True)
        assert new_id == "5"    # ID 3 (first "dup") went, IDs 1, 2, 4 left
        assert [(s.id, s.name) for s in image.snapshots] == [
            ("1", "x"), ("2", "1"), ("4", "dup"), ("5", "dup")]
        new_id, _ = image.create_snapshot("dup", overwrite=True)
        assert new_id == "6"
        new_id, _ = image.create_snapshot("1", overwrite=True)   # the name, not ID 1
        assert new_id == "7"
    assert snapshot_list(qemu_img, path) == snapshot_list(qemu_img, reference) == [
        ("1", "x"), ("5", "dup"), ("6", "dup"), ("7", "1")]
    assert_qemu_clean(qemu_img, path)


def test_overwrite_of_the_highest_id_reuses_it(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-d", "third", reference.name, cwd=path.parent)
    qemu(qemu_img, "snapshot", "-c", "third", reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        new_id, _ = image.create_snapshot("third", overwrite=True)
    assert new_id == "3"
    assert snapshot_list(qemu_img, path) == snapshot_list(qemu_img, reference)


def test_ids_are_reused_after_deleting_the_highest(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    reference = twin(path, "qemu.qcow2")
    for args in (["-d", "third"], ["-c", "again"], ["-d", "second"], ["-c", "more"]):
        qemu(qemu_img, "snapshot", *args, reference.name, cwd=path.parent)
    with qcow2snap.open(path, "r+") as image:
        image.delete_snapshot(image.find_snapshot("3", by="id"))
        assert image.create_snapshot("again")[0] == "3"
        image.delete_snapshot(image.find_snapshot("2", by="id"))   # not the highest
        assert image.create_snapshot("more")[0] == "4"
    assert snapshot_list(qemu_img, path) == snapshot_list(qemu_img, reference) == [
        ("1", "first"), ("3", "again"), ("4", "more")]
    assert_qemu_clean(qemu_img, path)


@pytest.mark.parametrize("ids,expected", [
    ([b"7x", b"abc", b" 12"], "13"),                      # numeric prefixes, blanks, 0
    ([b"1", b"-3", b"2"], "18446744073709551614"),         # strtoul negates
    ([b"18446744073709551615", b"1", b"2"], "0"),          # wraps
    ([b"99999999999999999999999", b"1", b"2"], "0"),       # saturates, then wraps
    ([b"+4", b"\t9z", b"0009"], "10"),
])
def test_new_id_is_computed_like_qemu(ids: list[bytes], expected: str, fixture_copy: Any,
                                      qemu_img: str) -> None:
    path = fixture_copy("v3-basic")

    def set_ids(records: list[Any]) -> None:
        records[:] = [dataclasses.replace(record, id_bytes=new)
                      for record, new in zip(records, ids, strict=True)]

    rewrite_snapshot_table(path, set_ids)
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-c", "n", reference.name, cwd=path.parent)
    qemu_id = snapshot_list(qemu_img, reference)[-1][0]
    with qcow2snap.open(path, "r+") as image:
        new_id, _ = image.create_snapshot("n")
    assert new_id == qemu_id == expected
    assert snapshot_list(qemu_img, path) == snapshot_list(qemu_img, reference)
    assert_qemu_clean(qemu_img, path)


# --------------------------------------------------------------------------
# several disks


def _three(fixture_copy: Any) -> list[Path]:
    path = fixture_copy("v3-basic")
    return [path, twin(path, "disk2.qcow2"), twin(path, "disk3.qcow2")]


def _states(paths: list[Path]) -> list[tuple[str, int]]:
    for p in paths:
        if p.exists():
            age(p)
    return [state(p) if p.exists() else ("missing", 0) for p in paths]


def test_edit_images_all_or_nothing_on_a_missing_disk(fixture_copy: Any) -> None:
    paths = _three(fixture_copy)
    paths[1].unlink()
    before = _states(paths)
    with pytest.raises(OSError):
        edit_images(paths, "create", name="vm-snap")
    assert _states(paths) == before


def test_edit_images_all_or_nothing_on_a_name_clash(fixture_copy: Any) -> None:
    paths = _three(fixture_copy)
    with qcow2snap.open(paths[2], "r+") as image:
        image.create_snapshot("vm-snap")
    before = _states(paths)
    with pytest.raises(SnapshotExistsError):
        edit_images(paths, "create", name="vm-snap")
    assert _states(paths) == before


def test_edit_images_all_or_nothing_on_a_missing_snapshot(fixture_copy: Any) -> None:
    paths = _three(fixture_copy)
    with qcow2snap.open(paths[1], "r+") as image:
        image.delete_snapshot(image.find_snapshot("second", by="name"))
    before = _states(paths)
    operations: tuple[Operation, ...] = ("delete", "revert", "rename")
    for operation in operations:
        with pytest.raises(SnapshotNotFoundError):
            edit_images(paths, operation, snapshot="second", by="name", name="renamed")
    assert _states(paths) == before


def test_edit_images_all_or_nothing_on_a_dirty_disk(fixture_copy: Any) -> None:
    paths = _three(fixture_copy)
    data = bytearray(paths[0].read_bytes())
    data[79] |= 1
    paths[0].write_bytes(bytes(data))
    before = _states(paths)
    with pytest.raises(ImageNeedsRepairError):
        edit_images(paths, "create", name="vm-snap")
    assert _states(paths) == before


def test_edit_images_all_or_nothing_on_a_busy_disk(fixture_copy: Any, qemu_io: str) -> None:
    paths = _three(fixture_copy)
    before = _states(paths)
    holder = subprocess.Popen([qemu_io, "-f", "qcow2", "-c", "sleep 5000", str(paths[2])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_locks(paths[2], holder)
        with pytest.raises(ImageInUseError):
            edit_images(paths, "create", name="vm-snap")
    finally:
        _stop(holder)
    assert _states(paths) == before


def test_edit_images_same_disk_twice_is_not_edited_twice(fixture_copy: Any) -> None:
    """The second handle sees the first one's locks: refused, nothing done.
    (The message blames "a running QEMU process", which is misleading here.)"""
    paths = _three(fixture_copy)
    before = _states(paths)
    with pytest.raises(Qcow2Error):
        edit_images([paths[0], paths[1], paths[0]], "create", name="vm-snap")
    assert _states(paths) == before


def test_edit_images_changes_every_disk(fixture_copy: Any, qemu_img: str) -> None:
    paths = _three(fixture_copy)
    before = _states(paths)
    dry = edit_images(paths, "create", name="vm-snap", dry_run=True)
    assert all(r.ok and r.commit is not None and r.commit.dry_run for r in dry)
    assert _states(paths) == before
    results = edit_images(paths, "create", name="vm-snap")
    assert [r.ok for r in results] == [True, True, True]
    assert [r.snapshot_id for r in results] == ["4", "4", "4"]
    after = [state(p) for p in paths]
    assert all(a[0] != b[0] for a, b in zip(after, before, strict=True))
    for p in paths:
        assert_qemu_clean(qemu_img, p)
        assert snapshot_list(qemu_img, p)[-1] == ("4", "vm-snap")
    for operation, kwargs in (("revert", {"snapshot": "first"}),
                              ("rename", {"snapshot": "vm-snap", "name": "renamed"}),
                              ("delete", {"snapshot": "second"})):
        results = edit_images(paths, operation, by="name", **kwargs)  # type: ignore[arg-type]
        assert all(r.ok for r in results), results
        for p in paths:
            assert_qemu_clean(qemu_img, p)
    assert {tuple(snapshot_list(qemu_img, p)) for p in paths} == {
        (("1", "first"), ("3", "third"), ("4", "renamed"))}


# --------------------------------------------------------------------------
# dry runs and space


@pytest.mark.parametrize("operation", list(EDITS))
def test_dry_run_writes_nothing(operation: str, fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        listing = [(s.id, s.name) for s in image.snapshots]
        predicted = EDITS[operation](image, True)
        if isinstance(predicted, tuple):
            predicted = predicted[1]
        assert isinstance(predicted, CommitResult) and predicted.dry_run
        assert predicted.clusters_allocated and predicted.bytes_allocated > 0
        if operation in ("delete", "revert", "create-overwrite"):
            assert predicted.clusters_freed and predicted.bytes_freed > 0
        assert [(s.id, s.name) for s in image.snapshots] == listing
        assert state(path) == before
        # and the same handle then does exactly what was predicted
        done = EDITS[operation](image, False)
        if isinstance(done, tuple):
            done = done[1]
    assert not done.dry_run
    assert {k: v for k, v in vars(done).items() if k != "dry_run"} == {
        k: v for k, v in vars(predicted).items() if k != "dry_run"}
    assert path.stat().st_size == done.file_size_after
    assert_qemu_clean(qemu_img, path)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_delete_returns_space_by_punching_holes(fixture_copy: Any, qemu_img: str,
                                                qemu_io: str) -> None:
    path = fixture_copy("v3-basic")
    cwd = path.parent
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x61 16M 4M", path.name, cwd=cwd)
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("big")
    # the active layer moves away: the 4 MiB now belong to "big" alone
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x62 16M 4M", "-c", "write -P 0x63 60M 64k",
         path.name, cwd=cwd)
    size, blocks = path.stat().st_size, _allocated(path)
    with qcow2snap.open(path, "r+") as image:
        result = image.delete_snapshot(image.find_snapshot("big", by="name"))
    assert result.bytes_freed >= 4 << 20
    # shadow copies of metadata may land at the end: the length can grow a little
    assert path.stat().st_size == result.file_size_after <= size + 8 * CLUSTER
    assert blocks - _allocated(path) >= 4 << 20, (blocks, _allocated(path))
    assert_qemu_clean(qemu_img, path)


def test_delete_returns_space_by_truncating(fixture_copy: Any, qemu_img: str,
                                            qemu_io: str) -> None:
    path = fixture_copy("v3-basic")
    cwd = path.parent
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("pre")
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x61 16M 4M", path.name, cwd=cwd)
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot("big")
        # the data at the end of the file now belongs to "big" alone
        image.revert_to_snapshot(image.find_snapshot("pre", by="name"))
    size, blocks = path.stat().st_size, _allocated(path)
    with qcow2snap.open(path, "r+") as image:
        result = image.delete_snapshot(image.find_snapshot("big", by="name"))
    assert result.bytes_freed >= 4 << 20
    assert result.file_size_after < size
    assert path.stat().st_size == result.file_size_after
    assert size - path.stat().st_size >= 4 << 20
    assert blocks - _allocated(path) >= 4 << 20
    assert_qemu_clean(qemu_img, path)


def test_qemu_and_qcow2snap_free_the_same_space(fixture_copy: Any, qemu_img: str,
                                                qemu_io: str) -> None:
    """Both punch out what a delete frees: allocated blocks end up close."""
    path = fixture_copy("v3-basic")
    cwd = path.parent
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x61 16M 4M", path.name, cwd=cwd)
    qemu(qemu_img, "snapshot", "-c", "big", path.name, cwd=cwd)
    qemu(qemu_io, "-f", "qcow2", "-c", "write -P 0x62 16M 4M", path.name, cwd=cwd)
    reference = twin(path, "qemu.qcow2")
    qemu(qemu_img, "snapshot", "-d", "big", reference.name, cwd=cwd)
    with qcow2snap.open(path, "r+") as image:
        image.delete_snapshot(image.find_snapshot("big", by="name"))
    ours, theirs = _allocated(path), _allocated(reference)
    assert ours <= theirs + 16 * CLUSTER, (ours, theirs)
    assert_qemu_clean(qemu_img, path)


def test_revert_of_a_missing_snapshot_changes_nothing(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    age(path)
    before = state(path)
    with qcow2snap.open(path, "r+") as image:
        for call in (lambda: image.revert_to_snapshot("nope"),
                     lambda: image.delete_snapshot("nope"),
                     lambda: image.rename_snapshot("nope", "x")):
            with pytest.raises(SnapshotNotFoundError):
                call()
    assert state(path) == before


def _small_cluster_image(path: Path, qemu_img: str, qemu_io: str, size: str,
                         written: str) -> Path:
    """A qcow2 image of 512-byte clusters (many refcount blocks), its first
    ``written`` bytes written, then snapshot s1 taken, by qemu-img/qemu-io."""
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                    str(path), size], check=True)
    subprocess.run([qemu_io, "-c", f"write -P 1 0 {written}", str(path)], check=True,
                   capture_output=True)
    subprocess.run([qemu_img, "snapshot", "-c", "s1", str(path)], check=True)
    return path


def test_refcount_block_copies_do_not_cascade(tmp_path: Path, qemu_img: str,
                                              qemu_io: str) -> None:
    """A rename changes the snapshot table and the few refcount blocks that
    cover its old and new clusters; their copies go inside their own
    blocks' ranges, so no other block changes.  Placed first-fit, each copy
    changed the block covering it, whose copy changed another: after a few
    edits of a 512-byte-cluster image (512 refcount blocks) a rename rewrote
    ~260 of them (218-267 clusters allocated instead of ~10)."""
    path = _small_cluster_image(tmp_path / "blocks.qcow2", qemu_img, qemu_io, "64M", "32M")
    subprocess.run([qemu_io, "-c", "write -P 2 0 8M", str(path)], check=True,
                   capture_output=True)
    name = "s1"
    renames: list[int] = []
    for i in range(9):
        with qcow2snap.open(path, "r+") as image:
            image.create_snapshot(f"x{i}")
        if i % 3 == 2:
            with qcow2snap.open(path, "r+") as image:
                image.delete_snapshot(f"x{i - 1}")
        with qcow2snap.open(path, "r+") as image:
            result = image.rename_snapshot(name, f"s1-{i}")
        name = f"s1-{i}"
        assert isinstance(result, CommitResult)
        renames.append(len(result.clusters_allocated))
    # the snapshot table, the refcount table (8 clusters here) and a block or two
    assert max(renames) <= 16, renames
    assert_qemu_clean(qemu_img, path)


def test_refcount_block_copies_are_placed_without_a_scan_to_the_end(
        tmp_path: Path, qemu_img: str, qemu_io: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placing a refcount block's copy inside its own range looks at that
    range only.  The search went on to the first free cluster of the file:
    a create on a fully written 512-byte-cluster image, which changes every
    block, read blocks quadratically (7.6 s of CPU for 1,024 blocks of a
    512 MiB image, against qemu-img's 1.0 s)."""
    from qcow2snap import refcount
    path = _small_cluster_image(tmp_path / "full.qcow2", qemu_img, qemu_io, "32M", "32M")
    looked_at: list[int] = []
    block = refcount.RefcountReader.block

    def counted(self: refcount.RefcountReader, table_index: int) -> object:
        looked_at.append(table_index)
        return block(self, table_index)

    monkeypatch.setattr(refcount.RefcountReader, "block", counted)
    with qcow2snap.open(path, "r+") as image:
        blocks = sum(1 for _ in refcount.RefcountReader(image).blocks_in_use())
        looked_at.clear()
        image.create_snapshot("s2")
    assert blocks > 250
    # about 8 lookups a block (its own, the delta's, the writes'); the scan
    # to the end made that grow with the number of blocks (54 here, 39
    # with 131 blocks, ~1,500 with 1,024)
    assert len(looked_at) < 12 * blocks, (len(looked_at), blocks)
    assert_qemu_clean(qemu_img, path)
