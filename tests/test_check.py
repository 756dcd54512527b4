"""``qcow2snap check`` and ``--repair``: detection, exit codes, repair and
salvage, against ``qemu-img check`` as the oracle.

The corruption corpus is made here by patching copies of good fixtures
(never stored): the reference's iotest 261 and 080 cases, refcounts too
high and too low, wrong COPIED flags, names that run past the table,
``nb_snapshots`` larger than the table, damaged refcount structures.

For each case: the finding kinds and the exit status (equal to
``qemu-img check``'s where QEMU can open the image); then ``--repair all``
leaves an image ``qemu-img check`` finds clean, in which every snapshot
whose own metadata was intact survives under its ID and name with its disk
(and VM state) byte-identical to before the damage; and qcow2snap keeps at
least the intact snapshots ``qemu-img check -r all`` keeps on a copy of the
same input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, fixture_path, place_companion
from helpers import assert_qemu_clean, invoke, qemu_img_check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import format as fmt
from qcow2snap.errors import CheckFailedError, ImageInUseError
from qcow2snap.ops.check import check_image
from qcow2snap.ops.check_or_repair import check_or_repair
from qcow2snap.ops.check_report import CheckReport, RepairReport
from qcow2snap.ops.repair import repair_image
from qcow2snap.ops.salvage import salvage_snapshot_table_at

pytestmark = pytest.mark.qemu

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def content_hashes(path: Path) -> dict[tuple[str, str], str]:
    """(id, name) -> sha256 of the snapshot's disk (+ VM state); the active
    layer under ("", "<active>")."""
    out: dict[tuple[str, str], str] = {}
    with qcow2snap.open(path) as image:
        layers: list[Any] = [None, *image.snapshots]
        for sn in layers:
            h = hashlib.sha256()
            try:
                with image.open_disk(sn) as disk:
                    for chunk in iter(lambda: disk.read(1 << 20), b""):
                        h.update(chunk)
                if sn is not None and sn.has_vm_state:
                    with image.open_vm_state(sn) as vm:
                        h.update(vm.read())
            except qcow2snap.Qcow2Error:
                h.update(b"unreadable")
            key = ("", "<active>") if sn is None else (sn.id, sn.name)
            out[key] = h.hexdigest()
    return out


def file_state(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


@dataclass
class Geo:
    """Where things are in the good image (read before the damage)."""

    cluster_size: int
    header: Any
    snapshots: list[Any]
    active_l1: list[int]
    refcount_table_offset: int
    refblock_offsets: list[int]
    refcounts: list[int]
    l2_entries: dict[int, list[int]] = field(default_factory=dict)

    def snapshot_entry(self, index: int) -> int:
        return int(self.snapshots[index].entry_offset)

    def refcount_offset(self, cluster: int) -> int:
        """Byte offset of a 16-bit refcount (refcount_order 4, block 0)."""
        assert self.header.refcount_order == 4
        return self.refblock_offsets[0] + 2 * cluster

    def active_l2(self) -> int:
        return next(e & fmt.L1E_OFFSET_MASK for e in self.active_l1 if e & fmt.L1E_OFFSET_MASK)

    def data_entry(self, refcount: int) -> tuple[int, int]:
        """(byte offset, value) of an active L2 entry whose data cluster has
        the given refcount."""
        def wanted(e: int) -> bool:
            host = e & fmt.L2E_OFFSET_MASK
            return bool(host) and not e & fmt.QCOW_OFLAG_COMPRESSED and \
                self.refcounts[host // self.cluster_size] == refcount
        return self.find_entry(wanted)

    def find_entry(self, pred: Callable[[int], bool]) -> tuple[int, int]:
        """(byte offset, value) of the first active L2 entry matching ``pred``."""
        l2 = self.active_l2()
        step = 2 if self.header.incompatible_features & fmt.QCOW2_INCOMPAT_EXTL2 else 1
        entries = self.l2_entries[l2]
        for j in range(0, len(entries), step):
            if pred(entries[j]):
                return l2 + 8 * j, entries[j]
        raise AssertionError("no such L2 entry")


def geometry(path: Path) -> Geo:
    from qcow2snap.refcount import RefcountReader
    with qcow2snap.open(path) as image:
        rc = RefcountReader(image)
        file_clusters = -(-image.file_size // image.cluster_size)
        geo = Geo(image.cluster_size, image.header, list(image.snapshots),
                  list(image.read_l1(image.layer())), image.header.refcount_table_offset,
                  [o for _, o in rc.blocks_in_use()],
                  [rc.get(c) for c in range(file_clusters)])
        for e in geo.active_l1:
            l2 = e & fmt.L1E_OFFSET_MASK
            if l2:
                geo.l2_entries[l2] = list(image.read_l2(l2))
    return geo


Patch = Callable[[bytearray, Geo], None]


def put(fmt_: str, off: Callable[[Geo], int] | int, value: Callable[[Geo], int] | int) -> Patch:
    def apply(b: bytearray, g: Geo) -> None:
        o = off(g) if callable(off) else off
        v = value(g) if callable(value) else value
        struct.pack_into(fmt_, b, o, v)
    return apply


def seq(*patches: Patch) -> Patch:
    def apply(b: bytearray, g: Geo) -> None:
        for p in patches:
            p(b, g)
    return apply


def sn_field(index: int, rel: int, fmt_: str, value: int | Callable[[Geo], int]) -> Patch:
    return put(fmt_, lambda g: g.snapshot_entry(index) + rel, value)


def refcount_delta(pick: Callable[[Geo], int], delta: int) -> Patch:
    """Change the 16-bit refcount of cluster ``pick(g)`` by ``delta``."""
    def apply(b: bytearray, g: Geo) -> None:
        c = pick(g)
        off = g.refcount_offset(c)
        struct.pack_into(">H", b, off, struct.unpack_from(">H", b, off)[0] + delta)
    return apply


def data_cluster(refcount: int) -> Callable[[Geo], int]:
    return lambda g: (g.data_entry(refcount)[1] & fmt.L2E_OFFSET_MASK) // g.cluster_size


def flip_copied_data(b: bytearray, g: Geo) -> None:
    off, value = g.data_entry(1)
    struct.pack_into(">Q", b, off, value ^ fmt.QCOW_OFLAG_COPIED)


def clear_copied_l1(b: bytearray, g: Geo) -> None:
    off = g.header.l1_table_offset
    struct.pack_into(">Q", b, off, g.active_l1[0] & ~fmt.QCOW_OFLAG_COPIED)


def patch_entry(pred: Callable[[int], bool], change: Callable[[int, Geo], int]) -> Patch:
    def apply(b: bytearray, g: Geo) -> None:
        off, value = g.find_entry(pred)
        struct.pack_into(">Q", b, off, change(value, g))
    return apply


def is_compressed(e: int) -> bool:
    return bool(e & fmt.QCOW_OFLAG_COMPRESSED)


def is_prealloc_zero(e: int) -> bool:
    return bool(e & 1) and bool(e & fmt.L2E_OFFSET_MASK) and not e & fmt.QCOW_OFLAG_COMPRESSED


def is_data(e: int) -> bool:
    return bool(e & fmt.L2E_OFFSET_MASK) and not e & (fmt.QCOW_OFLAG_COMPRESSED | 1)


def free_cluster_past_end(g: Geo) -> int:
    return len(g.refcounts)


def extend_file(clusters: int) -> Patch:
    def apply(b: bytearray, g: Geo) -> None:
        b.extend(bytes(clusters * g.cluster_size))
    return apply


def v2_as_v3(b: bytearray, g: Geo) -> None:
    """iotest 261 #3: a v2 image whose version is poked to 3 without
    fixing its table (entries with < 16 bytes of extra data)."""
    struct.pack_into(">I", b, 4, 3)
    struct.pack_into(">I", b, 96, 4)       # refcount_order
    struct.pack_into(">I", b, 100, 104)    # header_length
    b[72:96] = bytes(24)


def rewrite_extra(extras: dict[int, int]) -> Patch:
    """Rewrite the table in place with entry i's extra data cut to
    ``extras[i]`` bytes, as iotest 261 #1 does (valid for v2)."""
    def apply(b: bytearray, g: Geo) -> None:
        out = bytearray()
        for sn in g.snapshots:
            raw = sn.to_bytes()
            keep = extras.get(sn.index, sn.extra_data_size)
            entry = bytearray(raw[:40] + raw[40:40 + keep] + raw[40 + sn.extra_data_size:])
            struct.pack_into(">I", entry, 36, keep)
            out += bytes(fmt.align_up(len(out), 8) - len(out)) + entry
        start = g.header.snapshots_offset
        old_length = sum(40 + s.extra_data_size + len(s.id_bytes) + len(s.name_bytes) + 8
                         for s in g.snapshots)
        b[start:start + old_length] = bytes(out) + bytes(old_length - len(out))
    return apply


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    fixture: str
    patch: Patch
    exit_code: int                 # qcow2snap check
    kinds: set[str]                # finding kinds that must be reported
    qemu_exit: int | None = None   # qemu-img check's exit (None: not compared)
    dropped: set[str] = field(default_factory=set)   # names --repair all drops
    damaged: set[str] = field(default_factory=set)   # names whose own metadata is hit
    leaks_exit: int | None = None  # check exit after --repair leaks (None: not run)
    qemu_opens: bool = True        # qemu-img check -r all can run on it
    new_id: set[str] = field(default_factory=set)    # names that get a new ID
    repaired_exit: int = 0         # check exit after --repair all (not 0: unrepairable)


CASES = [
    # refcounts
    Case("leak-data", "v3-basic", refcount_delta(data_cluster(2), +1), 3, {"leak"},
         qemu_exit=3, leaks_exit=0),
    Case("leak-free-cluster", "v3-basic",
         seq(extend_file(1), refcount_delta(free_cluster_past_end, +1)), 3, {"leak"},
         qemu_exit=3, leaks_exit=0),
    Case("refcount-too-low", "v3-basic", refcount_delta(data_cluster(2), -1), 2,
         {"refcount-too-low", "copied"}, qemu_exit=2, leaks_exit=2),
    Case("refcount-zero", "v3-basic", refcount_delta(data_cluster(1), -1), 2,
         {"refcount-too-low", "copied"}, qemu_exit=2, leaks_exit=2),
    Case("refcount-too-low-v2", "v2", refcount_delta(data_cluster(2), -1), 2,
         {"refcount-too-low"}, qemu_exit=2),
    # COPIED flags
    Case("copied-data-cleared", "v3-basic", flip_copied_data, 2, {"copied"}, qemu_exit=2,
         leaks_exit=0),
    Case("copied-l1-cleared", "v3-basic", clear_copied_l1, 2, {"copied"}, qemu_exit=2,
         leaks_exit=0),
    Case("leak-extended-l2", "extended-l2", refcount_delta(data_cluster(2), +3), 3, {"leak"},
         qemu_exit=3, leaks_exit=0),
    Case("leak-savevm", "savevm", refcount_delta(data_cluster(4), +1), 3, {"leak"},
         qemu_exit=3, leaks_exit=0),
    Case("compressed-copied", "compressed-zlib",
         patch_entry(is_compressed, lambda e, g: e | fmt.QCOW_OFLAG_COPIED), 2,
         {"copied-compressed"}, qemu_exit=2),
    Case("prealloc-misaligned", "zero-clusters",
         patch_entry(is_prealloc_zero, lambda e, g: e + 0x200), 2, {"misaligned"},
         qemu_exit=2),
    Case("data-past-eof", "v3-basic",
         patch_entry(is_data, lambda e, g: (e & ~fmt.L2E_OFFSET_MASK) | (1 << 40)), 2,
         {"past-eof"}, qemu_exit=2, repaired_exit=2),
    Case("l1-entry-reserved-bits", "v3-basic",
         put(">Q", lambda g: g.header.l1_table_offset, lambda g: g.active_l1[0] | 0x100), 2,
         {"reserved-bits"}, qemu_exit=2, repaired_exit=2),
    # refcount structures
    Case("reftable-reserved-bits", "v3-basic",
         put(">Q", lambda g: g.refcount_table_offset,
             lambda g: g.refblock_offsets[0] | 0x100), 2,
         {"reserved-bits", "refcount-too-low"}, qemu_exit=2, leaks_exit=1),
    Case("refblock-refcount-0", "v3-basic",
         refcount_delta(lambda g: g.refblock_offsets[0] // g.cluster_size, -1), 2,
         {"refcount-too-low"}, qemu_exit=2, leaks_exit=2),
    Case("dirty-bit", "v3-basic", put(">Q", 72, 1), 0, {"dirty-bit"}, qemu_exit=0,
         leaks_exit=0),
    # iotest 080: snapshot L1 pointer and size
    Case("080-snapshot-l1-misaligned", "v3-basic",
         sn_field(1, 0, ">Q", lambda g: g.snapshots[1].l1_table_offset + 0x200), 2,
         {"snapshot-l1", "snapshot-l1-located"}, qemu_exit=2, damaged={"second"},
         leaks_exit=2),
    Case("080-snapshot-l1-size-huge", "v3-basic", sn_field(1, 8, ">I", 0x10000000), 2,
         {"snapshot-l1", "snapshot-l1-located"}, qemu_exit=2, damaged={"second"},
         leaks_exit=2),
    Case("savevm-l1-misaligned", "savevm",
         sn_field(1, 0, ">Q", lambda g: g.snapshots[1].l1_table_offset + 0x1000), 2,
         {"snapshot-l1", "snapshot-l1-located"}, qemu_exit=2, damaged={"run"}),
    Case("savevm-l1-size-huge", "savevm", sn_field(2, 8, ">I", 0x7FFFFFFF), 2,
         {"snapshot-l1", "snapshot-l1-located"}, qemu_exit=2, damaged={"paused"}),
    Case("snapshot-l1-lost", "v3-basic",
         seq(sn_field(1, 0, ">Q", 0x400200),
             put(">Q", lambda g: g.snapshots[1].l1_table_offset, 0x7f00000000000001)), 2,
         {"snapshot-l1", "leak"}, qemu_exit=2, dropped={"second"}, damaged={"second"},
         leaks_exit=2),
    # iotest 080: header fields QEMU cannot open
    Case("080-nb-snapshots-huge", "v3-basic", put(">I", 60, 0x7FFFFFFF), 1,
         {"snapshot-count"}, qemu_exit=1, qemu_opens=False),
    Case("080-snapshots-offset-misaligned", "v3-basic",
         put(">Q", 64, lambda g: g.header.snapshots_offset + 0x200), 1,
         {"snapshot-table-offset"}, qemu_exit=1, qemu_opens=False),
    # iotest 261
    Case("261-3-incomplete-v3", "v2", seq(rewrite_extra({0: 0, 2: 8}), v2_as_v3), 2,
         {"snapshot-incomplete"}, qemu_exit=2, damaged={"s1", "s3"}),
    Case("261-6-extra-data-too-large", "v3-basic", sn_field(2, 36, ">I", 65536), 1,
         {"snapshot-extra-data"}, qemu_exit=1, damaged={"third"}),
    Case("extra-data-too-large-middle", "v3-basic", sn_field(1, 36, ">I", 4096), 1,
         {"snapshot-extra-data"}, qemu_exit=1, damaged={"second"}),
    Case("extra-data-wrong-but-small", "v3-basic", sn_field(2, 36, ">I", 200), 2,
         {"snapshot-extra-data"}, qemu_exit=None, damaged={"third"}),
    # names and counts that run past the table
    Case("name-runs-past-table-last", "v3-basic", sn_field(2, 14, ">H", 200), 2,
         {"snapshot-name"}, qemu_exit=0, damaged={"third"}),
    Case("name-runs-past-table-middle", "v3-basic", sn_field(0, 14, ">H", 60), 2,
         {"snapshot-name"}, qemu_exit=None, damaged={"first"}),
    Case("id-runs-past-table-last", "v3-basic", sn_field(2, 12, ">H", 60000), 2,
         {"snapshot-id"}, qemu_exit=0, damaged={"third"}),
    Case("id-runs-past-table-middle", "v3-basic", sn_field(0, 12, ">H", 40), 2,
         {"snapshot-id"}, qemu_exit=None, damaged={"first"}),
    Case("nb-snapshots-too-large", "v3-basic", put(">I", 60, 4), 2, {"snapshot-phantom"},
         qemu_exit=2),
    Case("nb-snapshots-far-too-large", "v3-basic",
         put(">I", 60, lambda g: 3 + (g.cluster_size // 40) * 4), 2,
         {"snapshot-phantom"}, qemu_exit=None),
    Case("duplicate-id", "v3-basic", sn_field(1, 40 + 24, ">B", ord("1")), 2,
         {"snapshot-duplicate-id"}, qemu_exit=0, new_id={"second"}),
]
CASES_BY_ID = {c.id: c for c in CASES}


def build(case: Case, fixture_dir: Path, dest: Path) -> tuple[Path, Geo, dict[Any, str]]:
    good = fixture_path(fixture_dir, case.fixture)
    geo = geometry(good)
    hashes = content_hashes(good)
    data = bytearray(good.read_bytes())
    case.patch(data, geo)
    dest.write_bytes(bytes(data))
    os.chmod(dest, 0o644)
    return dest, geo, hashes


def _real(hashes: dict[tuple[str, str], str], original: dict[tuple[str, str], str]
          ) -> set[tuple[str, str]]:
    """Snapshots identical (ID, name and content) to one before the damage."""
    return {k for k, v in hashes.items() if k[1] != "<active>" and original.get(k) == v}


def qemu_repaired_copy(qemu_img: str, path: Path, tmp_path: Path) -> Path:
    """A copy of ``path`` repaired by ``qemu-img check -r all``, to compare
    what QEMU's repair keeps with ours."""
    qcopy = tmp_path / "qemu.qcow2"
    shutil.copyfile(path, qcopy)
    qemu_img_check(qemu_img, qcopy, "-r", "all")
    return qcopy


def repair_all_to_clean(qemu_img: str, path: Path) -> Any:
    """``--repair all`` on ``path``: it must end clean, for us and for
    ``qemu-img check``."""
    result = repair_image(path, "all")
    assert result.exit_code == 0, [f.message for f in result.final.findings]
    assert_qemu_clean(qemu_img, path)
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_detect_and_repair(case: Case, fixture_dir: Path, tmp_path: Path, qemu_img: str) -> None:
    path, geo, original = build(case, fixture_dir, tmp_path / "damaged.qcow2")
    before = file_state(path)
    report = check_image(path)
    assert file_state(path) == before, "check without --repair wrote to the image"
    kinds = {f.kind for f in report.findings}
    assert case.kinds <= kinds, (kinds, [f.message for f in report.findings])
    assert report.exit_code == case.exit_code, [f.message for f in report.findings]
    if case.qemu_exit is not None:
        checked = qemu_img_check(qemu_img, path)
        rc, err = checked.returncode, checked.stderr
        assert rc == case.qemu_exit, err
    names_before = {s.name for s in geo.snapshots}
    # dry run: nothing written, same verdicts
    dry = repair_image(path, "all", dry_run=True)
    assert file_state(path) == before
    assert dry.dry_run and dry.exit_code == report.exit_code
    # QEMU's repair on a copy
    qemu_kept: set[tuple[str, str]] = set()
    if case.qemu_opens:
        qcopy = qemu_repaired_copy(qemu_img, path, tmp_path)
        try:
            qemu_kept = _real(content_hashes(qcopy), original)
        except qcow2snap.Qcow2Error:
            qemu_kept = set()
    # ours
    if case.leaks_exit is not None:
        lcopy = tmp_path / "leaks.qcow2"
        shutil.copyfile(path, lcopy)
        leaks = repair_image(lcopy, "leaks")
        assert leaks.exit_code == case.leaks_exit, [f.message for f in leaks.final.findings]
        checked = qemu_img_check(qemu_img, lcopy)
        rc, err = checked.returncode, checked.stderr
        if case.leaks_exit == 0:
            assert rc == 0, err
        # a lost snapshot's data is never freed by --repair leaks, nor is
        # what a snapshot with a found L1 table references
        if case.dropped:
            assert leaks.final.leaks == report.leaks
        if case.dropped or "snapshot-l1-located" in case.kinds:
            assert qemu_img_check(qemu_img, lcopy).report.get("leaks") == \
                qemu_img_check(qemu_img, path).report.get("leaks")
    result = repair_image(path, "all")
    assert result.exit_code == case.repaired_exit, [f.message for f in result.final.findings]
    checked = qemu_img_check(qemu_img, path)
    rc, qjson, err = checked.returncode, checked.report, checked.stderr
    if case.repaired_exit:
        # what cannot be repaired is left as it was, and nothing else broke
        assert rc == case.repaired_exit, err
        assert {f.kind for f in result.final.findings if f.severity != "info"} <= case.kinds
        assert _real(content_hashes(path), original) >= \
            {k for k in original if k[1] != "<active>"}
        return
    assert rc == 0, err
    assert "corruptions" not in qjson and "leaks" not in qjson
    with qcow2snap.open(path) as image:
        assert not image.dirty and not image.corrupt
    after = content_hashes(path)
    kept = _real(after, original)
    # every snapshot whose own metadata was intact survives byte-identically
    intact = {k for k in original if k[1] != "<active>"
              and k[1] not in case.damaged | case.new_id}
    assert intact <= kept, (intact - kept)
    by_name = {k[1]: v for k, v in after.items()}
    for name in case.new_id:
        assert by_name[name] == next(v for k, v in original.items() if k[1] == name)
    # damaged-but-recoverable ones survive too (under their ID and name)
    recovered = {k for k in original if k[1] in case.damaged - case.dropped}
    assert recovered <= kept, (recovered - kept, result.snapshots)
    dropped_names = {v.name for v in result.snapshots if v.status == "dropped"}
    assert case.dropped <= dropped_names | {""}
    assert {k[1] for k in after} >= names_before - case.dropped
    # the active layer is untouched
    assert after[("", "<active>")] == original[("", "<active>")]
    # at least what QEMU's repair keeps
    assert qemu_kept <= kept, (qemu_kept - kept)
    assert len(kept) >= len(qemu_kept)


# ---------------------------------------------------------------------------
# iotest 261 #7 and #9: tables beyond QEMU's limits
# ---------------------------------------------------------------------------

def _append_table(b: bytearray, g: Geo, table: bytes) -> None:
    """Put ``table`` at the end of the file (cluster aligned), give its
    clusters refcount 1 (16-bit refcounts, block 0) and point the header at
    it; the old table's clusters are released."""
    cs = g.cluster_size
    start = fmt.align_up(len(b), cs)
    b.extend(bytes(start - len(b)))
    b.extend(table)
    b.extend(bytes(fmt.align_up(len(b), cs) - len(b)))
    for c in range(start // cs, len(b) // cs):
        struct.pack_into(">H", b, g.refcount_offset(c), 1)
    old = g.header.snapshots_offset
    old_len = sum(40 + s.extra_data_size + len(s.id_bytes) + len(s.name_bytes) + 7
                  for s in g.snapshots)
    for c in range(old // cs, (old + old_len - 1) // cs + 1):
        struct.pack_into(">H", b, g.refcount_offset(c), 0)
    struct.pack_into(">Q", b, 64, start)


def _real_table(g: Geo) -> bytearray:
    out = bytearray()
    for sn in g.snapshots:
        out += bytes(fmt.align_up(len(out), 8) - len(out)) + sn.to_bytes()
    return out


def hashes_of(path: Path, names: set[str]) -> dict[tuple[str, str], str]:
    """Like content_hashes, for the snapshots named ``names`` only."""
    out: dict[tuple[str, str], str] = {}
    with qcow2snap.open(path) as image:
        for sn in image.snapshots:
            if sn.name in names:
                with image.open_disk(sn) as disk:
                    out[(sn.id, sn.name)] = hashlib.sha256(disk.read()).hexdigest()
    return out


def test_261_9_too_many_snapshots(fixture_dir: Path, tmp_path: Path, qemu_img: str) -> None:
    """v2, nb_snapshots = 65536 + 2: the real entries followed by all-zero
    40-byte entries (valid in v2).  QEMU cannot open it and its check exits
    1; both repairs keep 65536 entries."""
    good = fixture_path(fixture_dir, "v2")
    geo = geometry(good)
    names = {s.name for s in geo.snapshots}
    original = hashes_of(good, names)
    nb = fmt.QCOW_MAX_SNAPSHOTS + 2
    table = _real_table(geo)
    table += bytes(fmt.align_up(len(table), 8) - len(table))
    table += bytes(40 * (nb - len(geo.snapshots)))
    data = bytearray(good.read_bytes())
    _append_table(data, geo, bytes(table))
    struct.pack_into(">I", data, 60, nb)
    path = tmp_path / "many.qcow2"
    path.write_bytes(bytes(data))
    report = check_image(path)
    assert report.exit_code == 1
    assert "snapshot-count" in {f.kind for f in report.findings}
    assert qemu_img_check(qemu_img, path).returncode == 1
    qcopy = qemu_repaired_copy(qemu_img, path, tmp_path)
    result = repair_all_to_clean(qemu_img, path)
    with qcow2snap.open(path) as ours, qcow2snap.open(qcopy) as theirs:
        assert len(ours.snapshots) == fmt.QCOW_MAX_SNAPSHOTS >= len(theirs.snapshots)
    assert hashes_of(path, names) == original
    assert any("2 overhanging" in c for c in result.changes), result.changes


def test_261_7_table_too_big(fixture_dir: Path, tmp_path: Path, qemu_img: str) -> None:
    """A table over 64 MiB (entries with 1024 bytes of extra data and
    65535-byte IDs and names): the entry crossing the limit is dropped,
    everything before it is kept."""
    good = fixture_path(fixture_dir, "v3-basic")
    geo = geometry(good)
    names = {s.name for s in geo.snapshots}
    original = hashes_of(good, names)
    table = _real_table(geo)
    count = len(geo.snapshots)
    i = 0
    while len(table) <= fmt.QCOW_MAX_SNAPSHOTS_SIZE:
        i += 1
        ident = str(i).encode().rjust(65535, b"0")
        name = (b"filler-%d-" % i).ljust(65535, b"n")
        extra = struct.pack(">QQQ", 0, geo.header.size, 0) + bytes(1000)
        entry = struct.pack(">QIHHIIQII", 0, 0, len(ident), len(name), 0, 0, 0, 0,
                            len(extra)) + extra + ident + name
        table += bytes(fmt.align_up(len(table), 8) - len(table)) + entry
        count += 1
    data = bytearray(good.read_bytes())
    _append_table(data, geo, bytes(table))
    struct.pack_into(">I", data, 60, count)
    path = tmp_path / "big.qcow2"
    path.write_bytes(bytes(data))
    report = check_image(path)
    assert report.exit_code == 1
    assert "snapshot-table-size" in {f.kind for f in report.findings}
    assert qemu_img_check(qemu_img, path).returncode == 1
    qcopy = qemu_repaired_copy(qemu_img, path, tmp_path)
    repair_all_to_clean(qemu_img, path)
    with qcow2snap.open(path) as ours, qcow2snap.open(qcopy) as theirs:
        assert len(ours.snapshots) == count - 1 >= len(theirs.snapshots)
        assert [s.id for s in ours.snapshots] == [s.id for s in theirs.snapshots]
    assert hashes_of(path, names) == original


# ---------------------------------------------------------------------------
# good images
# ---------------------------------------------------------------------------

LUKS_ARGS = ["--object", "secret,id=sec0,data=qcow2snap", "--image-opts"]
QEMU_KEYS = ["image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
             "compressed-clusters", "check-errors", "leaks", "corruptions"]


@pytest.mark.parametrize("name", [f["name"] for f in FIXTURE_ENTRIES])
def test_good_fixture_is_clean_and_agrees_with_qemu(name: str, fixture_dir: Path,
                                                    qemu_img: str) -> None:
    path = fixture_path(fixture_dir, name)
    before = file_state(path)
    report = check_image(path)
    assert file_state(path) == before
    assert report.exit_code == 0, [f.message for f in report.findings]
    assert [f for f in report.findings if f.severity != "info"] == []
    assert {v.status for v in report.snapshots} <= {"ok"}
    if FIXTURES_BY_NAME[name].get("secret"):   # LUKS or AES
        spec = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
        checked = qemu_img_check(qemu_img, spec, *LUKS_ARGS, timeout=60)
    else:
        checked = qemu_img_check(qemu_img, path)
    rc, qjson = checked.returncode, checked.report
    assert rc == 0
    ours = describe_json(report)
    for key in QEMU_KEYS:
        assert ours.get(key, 0) == qjson.get(key, 0), key
    # same keys as qemu-img check (qcow2snap's own beside them)
    assert set(qjson) - {"filename"} <= set(ours)


def describe_json(report: Any) -> dict[str, Any]:
    from qcow2snap import describe
    return describe.check_json(report)


def test_repair_of_a_clean_image_writes_nothing(fixture_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "clean.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "v3-basic"), path)
    before = file_state(path)
    for mode in ("leaks", "all"):
        result = repair_image(path, mode)  # type: ignore[arg-type]
        assert result.exit_code == 0 and result.commit is None
        assert result.changes == ["nothing to repair"]
    assert file_state(path) == before


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------

def test_cli_exit_codes_and_json(fixture_dir: Path, tmp_path: Path, qemu_img: str) -> None:
    case = CASES_BY_ID["leak-data"]
    path, _, _ = build(case, fixture_dir, tmp_path / "leaky.qcow2")
    before = file_state(path)
    text = invoke("check", str(path))
    assert text.exit_code == 3
    assert "1 leaked clusters were found on the image." in text.stdout
    assert "Leaked cluster" in text.stdout
    out = invoke("check", "--json", str(path))
    assert out.exit_code == 3
    ours = json.loads(out.stdout)
    checked = qemu_img_check(qemu_img, path)
    rc, theirs = checked.returncode, checked.report
    assert rc == 3
    for key in QEMU_KEYS:
        assert ours.get(key, 0) == theirs.get(key, 0), key
    assert set(theirs) - {"filename"} <= set(ours)
    assert ours["findings"][0]["kind"] == "leak"
    assert set(ours["findings"][0]) >= {"kind", "offset", "structure", "message", "repairable"}
    assert ours["findings"][0]["repairable"] is True
    # --dry-run writes nothing
    dry = invoke("check", "--repair", "leaks", "--dry-run", "--json", str(path))
    assert dry.exit_code == 3 and json.loads(dry.stdout)["dry-run"] is True
    assert file_state(path) == before
    assert invoke("check", "--dry-run", str(path)).exit_code == 2   # usage: needs --repair
    fixed = invoke("check", "-r", "leaks", "--json", str(path))
    assert fixed.exit_code == 0
    obj = json.loads(fixed.stdout)
    assert obj["leaks-fixed"] == 1 and "leaks" not in obj
    # qemu-img reports the same after its own repair of the same input
    assert_qemu_clean(qemu_img, path)


def test_cli_check_of_a_non_image(tmp_path: Path) -> None:
    path = tmp_path / "not.qcow2"
    path.write_bytes(b"hello" * 100)
    result = invoke("check", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith("qcow2snap: error: Could not check")
    assert len(result.stderr.splitlines()) == 1


def test_cli_help() -> None:
    result = invoke("check", "--help")
    assert result.exit_code == 0
    for option in ("--repair", "--dry-run", "--json", "--progress"):
        assert option in result.stdout


def test_repair_refuses_an_image_qemu_holds(fixture_dir: Path, tmp_path: Path,
                                            qemu_io: str) -> None:
    import time

    from qcow2snap.locks import probe_locks
    path, _, _ = build(CASES_BY_ID["leak-data"], fixture_dir, tmp_path / "held.qcow2")
    before = file_state(path)
    holder = subprocess.Popen([qemu_io, "-f", "qcow2", "-c", "sleep 5000", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            deadline = time.monotonic() + 10
            while not probe_locks(fd).in_use:
                assert holder.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            os.close(fd)
        with pytest.raises(ImageInUseError):
            repair_image(path, "all")
        result = invoke("check", "--repair", "all", str(path))
        assert result.exit_code == 1 and "in use" in result.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert file_state(path) == before


def test_check_or_repair_without_mode_is_read_only(fixture_dir: Path, tmp_path: Path) -> None:
    path, _, _ = build(CASES_BY_ID["refcount-too-low"], fixture_dir, tmp_path / "low.qcow2")
    os.chmod(path, 0o444)
    before = file_state(path)
    report = check_or_repair(path)
    assert report.exit_code == 2 and file_state(path) == before
    # a dry run needs no write permission either
    assert repair_image(path, "all", dry_run=True).exit_code == 2
    assert file_state(path) == before


def test_check_or_repair_reports_what_stops_it_as_check_failed(tmp_path: Path) -> None:
    """The check operation turns an image it cannot open into one
    CheckFailedError (status 1, qemu-img check's "could not be completed"),
    the cause chained; a dry run without a mode is an API misuse."""
    path = tmp_path / "not.qcow2"
    path.write_bytes(b"not an image" * 100)
    with pytest.raises(CheckFailedError, match=r"^Could not check .*not\.qcow2.*not in qcow2 "
                       r"format") as info:
        check_or_repair(path)
    assert isinstance(info.value.__cause__, qcow2snap.NotQcow2Error)
    assert info.value.exit_code == 1
    with pytest.raises(ValueError, match="dry_run needs a repair mode"):
        check_or_repair(path, dry_run=True)


def test_repair_report_keeps_both_checks(fixture_dir: Path, tmp_path: Path) -> None:
    """A repair's result holds the first check and the re-check apart; a
    dry run has no re-check."""
    path, _, _ = build(CASES_BY_ID["refcount-too-low"], fixture_dir, tmp_path / "low.qcow2")
    dry = repair_image(path, "all", dry_run=True)
    assert isinstance(dry, RepairReport) and dry.after is None and dry.final is dry.before
    assert dry.before.corruptions and dry.exit_code == 2 and dry.changes
    result = repair_image(path, "all")
    assert result.before.exit_code == 2 and result.after is not None
    assert result.final is result.after and result.exit_code == 0
    assert result.corruptions_fixed == result.before.corruptions
    assert isinstance(check_or_repair(path), CheckReport)


def test_salvage_reads_a_table_wherever_it_lies(fixture_copy: Any) -> None:
    """salvage_snapshot_table_at reads a snapshot table at any offset: a
    copy of the table at the end of the file, and the table itself after
    the header lost its pointer, give back every snapshot byte for byte."""
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path) as image:
        snapshots = image.snapshots
        table_offset = image.header.snapshots_offset
        table = image.pread(table_offset, image.snapshot_table.size)
        cluster_size = image.cluster_size
    assert len(snapshots) >= 2
    copy_offset = -(-path.stat().st_size // cluster_size) * cluster_size
    with open(path, "r+b") as f:
        f.seek(copy_offset)
        f.write(table)
        f.seek(fmt.HEADER_OFFSET_NB_SNAPSHOTS)
        f.write(bytes(12))      # nb_snapshots and snapshots_offset: the table is "lost"
    with qcow2snap.open(path) as image:
        assert image.snapshots == ()
        for offset in (table_offset, copy_offset):
            found = salvage_snapshot_table_at(image, offset, len(snapshots))
            assert not found.findings and not found.qemu_errors
            assert [e.snapshot.index for e in found.entries] == list(range(len(snapshots)))
            for entry, snapshot in zip(found.entries, snapshots, strict=True):
                assert entry.snapshot == dataclasses.replace(
                    snapshot, entry_offset=snapshot.entry_offset - table_offset + offset)
                assert entry.to_bytes() == snapshot.to_bytes()
        with pytest.raises(ValueError, match="outside the file"):
            salvage_snapshot_table_at(image, image.file_size, 1)
        with pytest.raises(ValueError, match=r"nb_snapshots must be 1\.\.65536"):
            salvage_snapshot_table_at(image, table_offset, 0)


# ---------------------------------------------------------------------------
# crash safety of repairs
# ---------------------------------------------------------------------------

def _outcome(path: Path) -> tuple[Any, ...]:
    report = check_image(path)
    return (report.exit_code, tuple(sorted(f.message for f in report.findings)))


@pytest.mark.parametrize("case_id", ["snapshot-l1-lost", "copied-data-cleared",
                                     "reftable-reserved-bits", "261-6-extra-data-too-large"])
def test_power_loss_during_repair_leaves_a_committed_state(case_id: str, fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    """Every power loss during ``--repair all`` (lost, reordered and torn
    writes after the last fsync; tests/crashsim.py) leaves the image in a
    state some fsync boundary of the repair left: the damaged input, the
    repaired image, or (for a refcount rebuild) the image with new refcount
    structures and nothing else changed."""
    from crashsim import CrashReplay, RecordingIO, shadow_paging_violations
    path, _, _ = build(CASES_BY_ID[case_id], fixture_dir, tmp_path / "damaged.qcow2")
    before = tmp_path / "before.qcow2"
    shutil.copyfile(path, before)
    fd = os.open(path, os.O_RDWR)
    try:
        recorder = RecordingIO(fd)
        result = repair_image(path, "all", io=recorder)
    finally:
        os.close(fd)
    assert result.exit_code == 0
    ops = recorder.ops
    if not result.rebuilt_refcounts:   # one commit: the transaction's protocol
        assert shadow_paging_violations(before, path, ops) == []
    # the states at fsync boundaries: the only ones a crash may leave
    boundary = tmp_path / "boundary.qcow2"
    shutil.copyfile(before, boundary)
    allowed = {_outcome(boundary)}
    bfd = os.open(boundary, os.O_RDWR)
    try:
        for op in ops:
            if op.kind == "pwrite":
                os.pwrite(bfd, op.data, op.offset)
            elif op.kind == "truncate":
                os.ftruncate(bfd, op.length)
            elif op.kind == "punch":
                os.pwrite(bfd, bytes(op.length), op.offset)
            else:
                allowed.add(_outcome(boundary))
    finally:
        os.close(bfd)
    allowed.add(_outcome(path))
    assert len(allowed) <= 3
    replay = CrashReplay(before, ops, tmp_path / "crashed.qcow2")
    seen = set()
    for label in replay.variants(exhaustive_max=6, max_singles=8, random_subsets=4):
        outcome = _outcome(tmp_path / "crashed.qcow2")
        assert outcome in allowed, (label, outcome)
        seen.add(outcome)
    assert _outcome(path) in seen and _outcome(before) in seen
    assert replay.stats.variants > 3


# ---------------------------------------------------------------------------
# random refcount and COPIED damage, differential against qemu-img
# ---------------------------------------------------------------------------

HYPOTHESIS_FIXTURES = ["compressed-zlib", "extended-l2"]


@pytest.mark.parametrize("name", HYPOTHESIS_FIXTURES)
def test_random_refcount_damage_matches_qemu_and_repairs(name: str, fixture_dir: Path,
                                                         tmp_path_factory: Any,
                                                         qemu_img: str) -> None:
    good = fixture_path(fixture_dir, name)
    geo = geometry(good)
    original = content_hashes(good)
    clusters = len(geo.refcounts)

    @settings(max_examples=20, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, clusters - 1), st.integers(-2, 3)), min_size=1,
                    max_size=3),
           st.booleans())
    def run_one(changes: list[tuple[int, int]], flip_copied: bool) -> None:
        data = bytearray(good.read_bytes())
        changed = False
        for cluster, delta in changes:
            off = geo.refcount_offset(cluster)
            value = struct.unpack_from(">H", data, off)[0]
            new = max(0, value + delta)
            changed |= new != value
            struct.pack_into(">H", data, off, new)
        if flip_copied:
            off, value = geo.find_entry(lambda e: bool(e & fmt.QCOW_OFLAG_COPIED))
            struct.pack_into(">Q", data, off, value ^ fmt.QCOW_OFLAG_COPIED)
            changed = True
        work = tmp_path_factory.mktemp("random")
        path = work / "random.qcow2"
        path.write_bytes(bytes(data))
        report = check_image(path)
        checked = qemu_img_check(qemu_img, path)
        rc, qjson, err = checked.returncode, checked.report, checked.stderr
        assert (report.exit_code, report.leaks, report.corruptions) == \
            (rc, qjson.get("leaks", 0), qjson.get("corruptions", 0)), \
            ([f.message for f in report.findings], err)
        assert (report.exit_code != 0) == changed
        result = repair_image(path, "all")
        assert result.exit_code == 0, [f.message for f in result.final.findings]
        assert_qemu_clean(qemu_img, path)
        assert content_hashes(path) == original

    run_one()


def test_overlapping_metadata_is_reported(fixture_dir: Path, tmp_path: Path,
                                          qemu_img: str) -> None:
    """The active L1 table pointing at a snapshot's L1 table as if it were
    an L2 table: an overlap of two metadata structures (never "repaired"
    into something else: the overlap stays a corruption)."""
    good = fixture_path(fixture_dir, "v3-basic")
    geo = geometry(good)
    data = bytearray(good.read_bytes())
    struct.pack_into(">Q", data, geo.header.l1_table_offset,
                     geo.snapshots[0].l1_table_offset | fmt.QCOW_OFLAG_COPIED)
    path = tmp_path / "overlap.qcow2"
    path.write_bytes(bytes(data))
    report = check_image(path)
    overlaps = [f for f in report.findings if f.kind == "overlap"]
    assert overlaps and overlaps[0].repairable is None
    assert "overlaps a L1 table" in overlaps[0].message or "overlaps a L2 table" in \
        overlaps[0].message
    assert report.exit_code == 2 == qemu_img_check(qemu_img, path).returncode
    result = repair_image(path, "all")
    assert result.exit_code == 2
    assert "overlap" in {f.kind for f in result.final.findings}


def test_lazy_refcounts_crash_is_repaired(fixture_dir: Path, tmp_path: Path, qemu_img: str,
                                          qemu_io: str) -> None:
    """A real unclean shutdown: qemu-io writes to a lazy-refcounts image and
    aborts, leaving the dirty bit and refcounts of 0 for the new clusters.
    qcow2snap counts what qemu-img counts, and its repair gives the same
    image contents as QEMU's, clean and with the dirty bit cleared."""
    path = tmp_path / "lazy.qcow2"
    shutil.copyfile(fixture_path(fixture_dir, "lazy-refcounts"), path)
    os.chmod(path, 0o644)
    proc = subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x77 2M 256k",
                           "-c", "write -P 0x78 8M 64k", "-c", "abort", str(path)],
                          capture_output=True, check=False, timeout=60)
    assert proc.returncode != 0
    report = check_image(path)
    checked = qemu_img_check(qemu_img, path)
    rc, qjson = checked.returncode, checked.report
    assert report.dirty and report.exit_code == rc == 2
    assert (report.corruptions, report.leaks) == (qjson.get("corruptions", 0),
                                                  qjson.get("leaks", 0))
    qcopy = qemu_repaired_copy(qemu_img, path, tmp_path)
    result = repair_all_to_clean(qemu_img, path)
    assert any("dirty" in c for c in result.changes)
    with qcow2snap.open(path) as image:
        assert not image.dirty
    assert content_hashes(path) == content_hashes(qcopy)


# ---------------------------------------------------------------------------
# random byte damage: check and repair fail cleanly, and never lie
# ---------------------------------------------------------------------------

CHECK_FUZZ = [("v3-basic", 100), ("v2", 60), ("compressed-zlib", 60), ("savevm", 40),
              ("extended-l2", 80), ("clusters-512", 50), ("zero-clusters", 50)]


@pytest.mark.parametrize("name,examples", CHECK_FUZZ, ids=[n for n, _ in CHECK_FUZZ])
def test_mutated_images_check_and_repair_cleanly(name: str, examples: int, fixture_dir: Path,
                                                 tmp_path_factory: Any, qemu_img: str) -> None:
    """1-8 bytes of metadata changed at random (header, snapshot table, L1,
    L2 and refcount tables: test_damage's profile).  The check gives a
    report or one Qcow2Error, in bounded time, and writes nothing; a repair
    gives a report or one Qcow2Error; when a repair ends clean (exit 0),
    qemu-img check agrees."""
    from test_damage import apply_mutations, mutations, profile, time_limit
    prof = profile(fixture_dir, name)
    companions = prof.companions

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(mutations(prof))
    def run_one(changes: list[tuple[int, str, int]]) -> None:
        work = tmp_path_factory.mktemp("mutated")
        for companion in companions:
            place_companion(companion, work / companion.name)
        path = work / "damaged.qcow2"
        path.write_bytes(bytes(apply_mutations(prof.data, changes)))
        before = file_state(path)
        with time_limit(20.0, f"check {changes}"):
            try:
                report = check_image(path)
            except qcow2snap.Qcow2Error:
                assert file_state(path) == before
                return
        assert file_state(path) == before
        assert report.exit_code in (0, 1, 2, 3)
        qemu_opens = "Could not open" not in qemu_img_check(qemu_img, path).stderr
        with time_limit(30.0, f"repair {changes}"):
            try:
                result = repair_image(path, "all")
            except qcow2snap.Qcow2Error:
                return
        if result.exit_code == 0 and qemu_opens:
            checked = qemu_img_check(qemu_img, path)
            rc, err = checked.returncode, checked.stderr
            assert rc == 0, (changes, err, result.changes)

    run_one()


def test_cli_names_what_a_repair_drops(fixture_dir: Path, tmp_path: Path) -> None:
    path, _, _ = build(CASES_BY_ID["snapshot-l1-lost"], fixture_dir, tmp_path / "lost.qcow2")
    checked = json.loads(invoke("check", "--json", str(path)).stdout)
    assert [(v["name"], v["status"]) for v in checked["snapshots"]] == [
        ("first", "ok"), ("second", "lost"), ("third", "ok")]
    dry = invoke("check", "-r", "all", "--dry-run", str(path))
    assert dry.exit_code == 2
    assert "would rewrite the snapshot table" in dry.stdout
    assert "entry 1: ID '2' name 'second': dropped" in dry.stdout
    done = invoke("check", "-r", "all", "--json", str(path))
    assert done.exit_code == 0
    obj = json.loads(done.stdout)
    assert [(v["name"], v["status"]) for v in obj["snapshots"]] == [
        ("first", "ok"), ("second", "dropped"), ("third", "ok")]
    assert obj["repair"] == "all" and obj["dry-run"] is False
    assert obj["leaks-fixed"] == checked["leaks"] and obj["corruptions-fixed"] == 1


@pytest.mark.parametrize("run_batch", [1, 1 << 16])
def test_data_cluster_inside_metadata_is_reported(fixture_dir: Path, tmp_path: Path,
                                                  qemu_img: str, run_batch: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An L2 entry of a table the bulk scan keeps as runs, pointed at the
    refcount block: the overlap is found however the runs are batched."""
    import qcow2snap.ops.check_count as check_count
    monkeypatch.setattr(check_count, "RUN_BATCH", run_batch)
    good = fixture_path(fixture_dir, "v3-basic")
    geo = geometry(good)
    off, value = geo.find_entry(is_data)
    block = geo.refblock_offsets[0]
    data = bytearray(good.read_bytes())
    struct.pack_into(">Q", data, off, (value & ~fmt.L2E_OFFSET_MASK) | block)
    path = tmp_path / "data-in-refblock.qcow2"
    path.write_bytes(bytes(data))
    report = check_image(path)
    overlaps = [f.message for f in report.findings if f.kind == "overlap"]
    cluster = block // geo.cluster_size
    assert any(m.startswith(f"data cluster {cluster} ") and m.endswith("overlaps a refcount block")
               for m in overlaps), overlaps
    assert report.exit_code == qemu_img_check(qemu_img, path).returncode == 2
