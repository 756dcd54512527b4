"""Re-creating lost snapshots (operations layer): ``qcow2snap recover --apply``.

:func:`recover_snapshots` takes the candidates
:func:`~qcow2snap.ops.recover.find_lost_snapshots` finds and writes a
snapshot-table entry for each one it restores, through the crash-safe
:class:`~qcow2snap.ops.transaction.Transaction`, holding the editor lock
as every edit does (:class:`~qcow2snap.ops.edit.EditableImage`).

Policy:

* Only RELIABLE candidates are restored.  An UNRELIABLE one (an L2 table or
  data cluster of it is used by a live structure now, or its metadata has a
  problem) is refused, not restored under a warning name: its reused
  cluster may now be a refcount block, an L2 table or another layer's data,
  so an entry pointing at it would make one cluster two structures (a
  revert or delete through it would corrupt the image), and its disk is not
  what the snapshot held.  It is reported as skipped with the reason.
* A candidate whose L1 table is a live layer's is skipped (it is already
  there); one L1 table is restored once: stale table entries come first
  (the newest table copy first: the one whose newest entry is the latest),
  then orphaned L1 tables.
* An entry from a stale table keeps its ID, name, dates, VM clock and
  VM-state size.  If its ID is taken (by a live snapshot or an entry
  restored before it) or its name is (by a live snapshot or an entry
  restored from another source: entries of one table may share a name, as
  QEMU allows and as they did), it gets a fresh ID (one no other restored
  entry keeps) and, if its name is taken, the name ``NAME-recovered``
  (``NAME-recovered-2``, ...); the result says so (``renamed_from``).
* An orphaned L1 table gets the name ``recovered-N`` (the first N whose
  name is free), a fresh ID (QEMU's rule: the largest numeric ID plus one),
  the date now, no VM state, and as disk size, when the L1 table's entries
  all lie within the image's current virtual size's L1 entries, the larger
  of that size (the likeliest size of a snapshot of this disk) and the end
  of the last cluster the table maps (a snapshot taken before a shrink
  keeps its data visible); otherwise (its entries reach where QEMU keeps
  VM state, or a larger disk) the size its entries cover (``l1_size``
  times what one L2 table maps).  Its ``l1_size`` is raised
  to what that disk size needs when the extra entries lie in the table's
  first cluster (they read as zero there).

Refcounts and crash safety.  Commit 1 is one transaction: every cluster of
the restored snapshots (L1 table, L2 tables, data and VM state, one
reference per path, QEMU's rule) gets the refcount the check computed for
the live structures plus the restored references (raised only: a refcount
that is already higher stays, a leak at worst), the COPIED flags of the
active L1 and L2 tables are recomputed from the new refcounts (as a
snapshot create does), and the new snapshot table is written; one header
write publishes all of it, so a crash leaves the old image or the new one,
never a table entry without its refcounts.  Commit 2 is the leak repair
(``check --repair all``'s incremental repair on the same locked handle):
it lowers what is left over (the lost table's clusters, stale copies).  It
runs only when no candidate was refused, because it frees, and may punch
holes in, the clusters that still hold a refused candidate; then the
leaks stay and the result says so.  A crash between the commits leaves
the recovered image with leaks only (``qemu-img check`` exit 3).
"""

from __future__ import annotations

import os
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

from .. import format as fmt
from ..errors import ImageNeedsRepairError, UnsupportedImageError
from ..image import Qcow2Image
from ..model import Snapshot, new_snapshot, snapshot_id_number
from ..refcount import l2_references
from ..tables import decode_u64_table
from .check import Checker
from .edit import EditableImage
from .metadata_io import FileIO, MetadataIO
from .recover import Progress, RecoveredSnapshot, find_lost_snapshots
from .snapshots import _L1, SnapshotEditor, _Slot
from .transaction import CommitResult, Transaction, TransactionPoisoned

__all__ = ["RecoverResult", "RestoredSnapshot", "SkippedCandidate", "recover_snapshots"]


@dataclass(frozen=True, slots=True)
class RestoredSnapshot:
    """A snapshot-table entry ``recover --apply`` wrote."""

    source: Literal["stale-table", "orphan-l1"]
    source_offset: int
    entry_index: int | None
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int
    vm_state_size: int
    #: "ID x name y": the identity the stale entry had, when it clashed
    renamed_from: str | None = None


@dataclass(frozen=True, slots=True)
class SkippedCandidate:
    """A candidate not restored, and why."""

    source: Literal["stale-table", "orphan-l1"]
    source_offset: int
    entry_index: int | None
    label: str
    reason: str
    #: its clusters may still hold it (refused, not a duplicate)
    refused: bool


@dataclass
class RecoverResult:
    filename: str
    dry_run: bool = False
    restored: list[RestoredSnapshot] = field(default_factory=list)
    skipped: list[SkippedCandidate] = field(default_factory=list)
    #: the transaction writing the entries (None: nothing to restore)
    commit: CommitResult | None = None
    #: the leak repair after it (None: not run)
    cleanup: CommitResult | None = None
    notes: list[str] = field(default_factory=list)


class _RecoverTransaction(Transaction):
    """Never allocates a cluster a restored snapshot references, even where
    its stored refcount is still 0."""

    def __init__(self, image: Qcow2Image, io: MetadataIO) -> None:
        super().__init__(image, io)
        self.reserved: set[int] = set()

    def _is_free(self, cluster: int) -> bool:
        if cluster in self.reserved:
            return False
        return super()._is_free(cluster)


def _table_order(candidates: list[RecoveredSnapshot]) -> list[RecoveredSnapshot]:
    """Stale entries grouped by table, newest table first (its newest
    entry's date, then its offset), entries in table order; then orphans."""
    newest: dict[int, tuple[int, int]] = {}
    for c in candidates:
        if c.source == "stale-table":
            date = (c.snapshot.date_sec, c.snapshot.date_nsec)
            newest[c.source_offset] = max(newest.get(c.source_offset, date), date)
    stale = sorted((c for c in candidates if c.source == "stale-table"),
                   key=lambda c: (tuple(-x for x in newest[c.source_offset]),
                                  -c.source_offset, c.entry_index or 0))
    return stale + [c for c in candidates if c.source == "orphan-l1"]


def _free_name(base: bytes, taken: set[bytes]) -> bytes:
    if base not in taken:
        return base
    n = 1
    while True:
        name = base + (b"-recovered" if n == 1 else b"-recovered-%d" % n)
        if name not in taken:
            return name
        n += 1


def _orphan_entry(image: Qcow2Image, c: RecoveredSnapshot, name: bytes, new_id: bytes
                  ) -> Snapshot:
    sn = c.snapshot
    size = sn.l1_size
    if size <= image.size_to_l1(image.size):
        disk_size = max(image.size, _mapped_end(image, sn))
        want = image.size_to_l1(disk_size)
        if (sn.l1_table_offset + want * fmt.L1E_SIZE
                <= min(image.file_size, sn.l1_table_offset + image.cluster_size)):
            size = want
    else:
        disk_size = size << (image.cluster_bits + image.l2_bits)
    micros = round(time.time() * 1_000_000)
    return new_snapshot(
        id_bytes=new_id, name_bytes=name, l1_table_offset=sn.l1_table_offset, l1_size=size,
        date_sec=micros // 1_000_000 & fmt.UINT32_MAX, date_nsec=(micros % 1_000_000) * 1000,
        vm_clock_nsec=0, vm_state_size=0, disk_size=disk_size, icount=0)


def _mapped_end(image: Qcow2Image, sn: Snapshot) -> int:
    """The guest end of the last cluster the L1 table maps (one L2 table read)."""
    l1 = decode_u64_table(image.pread(sn.l1_table_offset, sn.l1_size * fmt.L1E_SIZE))
    stride = 2 if image.extended_l2 else 1
    for i in range(len(l1) - 1, -1, -1):
        l2 = l1[i] & fmt.L1E_OFFSET_MASK
        if not l2:
            continue
        table = image.read_l2(l2)
        for j in range(len(table) // stride - 1, -1, -1):
            if table[j * stride] or (stride == 2 and table[j * stride + 1]):
                return ((i << image.l2_bits) + j + 1) << image.cluster_bits
    return 0


def recover_snapshots(target: str | os.PathLike[str] | EditableImage, *,
                      dry_run: bool = False, progress: Progress | None = None,
                      io: MetadataIO | None = None) -> RecoverResult:
    """Restore the reliable lost snapshots of ``target`` (a path, opened
    ``"r+"`` with the editor lock, or an open :class:`EditableImage`) as
    snapshot-table entries; see the module docstring for the policy and the
    commit order.  ``dry_run`` plans and reports without writing."""
    if isinstance(target, EditableImage):
        return _recover(target, dry_run, progress, io)
    with EditableImage(target) as editable:
        return _recover(editable, dry_run, progress, io)


def _recover(editable: EditableImage, dry_run: bool, progress: Progress | None,
             io: MetadataIO | None) -> RecoverResult:
    if editable.poisoned is not None:
        raise TransactionPoisoned(
            f"{editable.path}: an earlier edit through this handle failed "
            f"({editable.poisoned}); it takes no more edits: close it and open the image again")
    image = editable.image
    io = io or editable._io or FileIO(image._file.fd)
    txn = _RecoverTransaction(image, io)
    editor = SnapshotEditor(image, txn)          # refuses dirty/corrupt images
    checker = Checker(image, progress=progress)
    check = checker.run()
    if check.corruptions or check.check_errors:
        raise ImageNeedsRepairError(
            f"{image.path}: the check found {check.corruptions} corruption(s) and "
            f"{check.check_errors} error(s): run 'qcow2snap check --repair all' first "
            f"(recover only adds entries to a consistent image)")
    report = find_lost_snapshots(image, checker=checker)
    result = RecoverResult(filename=image.path, dry_run=dry_run)
    if report.truncated:
        result.notes.append("the search stopped at a bound: more candidates may exist")
    taken_ids = {s.snapshot.id_bytes for s in editor.slots}
    taken_names = {s.snapshot.name_bytes for s in editor.slots}
    #: names restored, by source: entries of one stale table may share a
    #: name, as they did (QEMU allows it); only other sources clash
    restored_names: dict[bytes, set[int]] = {}
    bits = image.cluster_bits
    restored_l1: set[int] = set()
    claimed: set[int] = set()        # L1 table clusters of restored entries
    new_slots: list[_Slot] = []
    orphan_number = 0

    def skip(c: RecoveredSnapshot, reason: str, refused: bool) -> None:
        result.skipped.append(SkippedCandidate(c.source, c.source_offset, c.entry_index,
                                               c.label, reason, refused))

    ordered = _table_order(report.candidates)
    # IDs the stale entries may keep: a fresh ID never takes one of them
    kept_ids = {c.snapshot.id_bytes for c in ordered if c.source == "stale-table"
                and c.reliable and not c.live_duplicate
                and c.snapshot.id_bytes not in taken_ids
                and c.snapshot.name_bytes not in taken_names}

    def fresh_id() -> bytes:
        """QEMU's rule (the largest numeric ID plus one) over the entries
        and the IDs still to be kept."""
        ids = [s.snapshot.id_bytes for s in editor.slots] + list(kept_ids)
        return str((max(map(snapshot_id_number, ids), default=0) + 1) % (1 << 64)).encode()

    for c in ordered:
        sn = c.snapshot
        if c.live_duplicate:
            skip(c, "its L1 table is a live layer's: already in the image", False)
            continue
        if sn.l1_table_offset in restored_l1:
            skip(c, f"its L1 table at {sn.l1_table_offset:#x} is restored already "
                    f"(from a newer source)", False)
            continue
        if not c.reliable:
            why = [f"{r.what} at {r.host_offset:#x} (guest {r.guest_offset:#x}) is used by a "
                   f"live structure" for r in c.reused[:3]] + list(c.problems[:3])
            skip(c, "UNRELIABLE, refused: " + "; ".join(why), True)
            continue
        if not sn.l1_size:
            skip(c, "its L1 table is empty", True)
            continue
        l1_clusters = set(txn.clusters_of(sn.l1_table_offset, sn.l1_size * fmt.L1E_SIZE))
        if l1_clusters & claimed:
            skip(c, f"its L1 table at {sn.l1_table_offset:#x} overlaps one restored already",
                 True)
            continue
        renamed: str | None = None
        if c.source == "stale-table":
            name_clash = sn.name_bytes in taken_names and (
                restored_names.get(sn.name_bytes, set()) != {c.source_offset})
            if sn.id_bytes in taken_ids or name_clash:
                renamed = f"ID {sn.id} name {sn.name}"
                sn = replace(sn, id_bytes=fresh_id(),
                             name_bytes=_free_name(sn.name_bytes, taken_names)
                             if name_clash else sn.name_bytes)
        else:
            while True:
                orphan_number += 1
                name = b"recovered-%d" % orphan_number
                if name not in taken_names:
                    break
            sn = _orphan_entry(image, c, name, fresh_id())
        if len(editor.slots) >= fmt.QCOW_MAX_SNAPSHOTS:
            raise UnsupportedImageError(
                f"{image.path}: the image would hold more than {fmt.QCOW_MAX_SNAPSHOTS} "
                f"snapshots, QEMU's limit", feature="snapshot count")
        entries = decode_u64_table(image.pread(sn.l1_table_offset, sn.l1_size * fmt.L1E_SIZE))
        if len(entries) < sn.l1_size:
            skip(c, "its L1 table is cut short by the end of the file", True)
            continue
        slot = _Slot(sn, sn, _L1(sn.l1_table_offset, sn.l1_size, array("Q", entries)))
        editor.slots.append(slot)
        new_slots.append(slot)
        restored_l1.add(c.snapshot.l1_table_offset)
        claimed |= l1_clusters
        taken_ids.add(sn.id_bytes)
        taken_names.add(sn.name_bytes)
        restored_names.setdefault(sn.name_bytes, set()).add(c.source_offset)
        result.restored.append(RestoredSnapshot(
            c.source, c.source_offset, c.entry_index, sn.id, sn.name, sn.l1_table_offset,
            sn.l1_size, sn.disk_size, sn.vm_state_size, renamed))
    if not new_slots:
        result.notes.append("nothing to restore")
        return result
    # the references the restored snapshots add, one per path
    added: Counter[int] = Counter()
    for slot in new_slots:
        assert slot.l1 is not None
        added.update(txn.clusters_of(slot.l1.offset, slot.l1.byte_length()))
        for entry in slot.l1.entries:
            l2 = entry & fmt.L1E_OFFSET_MASK
            if not l2:
                continue
            added[l2 >> bits] += 1
            added.update(l2_references(image, l2))
    ref = checker.ref
    txn.reserved.update(added)
    for cluster, count in added.items():
        want = (ref[cluster] if cluster < len(ref) else 0) + count
        have = txn.refcount(cluster)
        if want > have:
            txn.add_refcount(cluster, want - have)
    txn.check_increments_fit("recovering snapshots")
    editor.table_dirty = True
    editor._fix_active_copied()
    try:
        result.commit = editor.commit(dry_run=dry_run)
        if dry_run:
            return result
        image.reload()
        refused = [s for s in result.skipped if s.refused]
        if refused:
            result.notes.append(
                f"leaked clusters are left as they are: {len(refused)} refused candidate(s) "
                f"still live in them; run 'qcow2snap check --repair leaks' once they are "
                f"not needed")
            return result
        result.cleanup = _cleanup(image, io, result.notes)
        image.reload()
    except BaseException as exc:
        editable.poisoned = f"{type(exc).__name__}: {exc}"
        raise
    return result


def _cleanup(image: Qcow2Image, io: MetadataIO, notes: list[str]) -> CommitResult | None:
    """Commit 2: lower the leaked refcounts left over (the incremental
    repair of ``check --repair all``, only when nothing but leaks is found)."""
    from .repair import _repair_incremental
    checker = Checker(image)
    check = checker.run()
    if check.corruptions or check.check_errors or checker.rebuild_reasons:
        notes.append(f"after restoring, the check found {check.corruptions} corruption(s) "
                     f"and {check.check_errors} error(s): no leak repair done; run "
                     f"'qcow2snap check'")
        return None
    if not check.leaks:
        return None
    changes: list[str] = []
    commit, _ = _repair_incremental(image, checker, "all", io, False, changes)
    notes.append(f"{check.leaks} leaked cluster(s) released")
    return commit
