"""Snapshot editing (operations layer): create, delete, revert, rename.

The semantics are QEMU's (``block/qcow2-snapshot.c`` and ``block/qcow2-refcount.c``):

* new IDs are the largest numeric ID plus one (so IDs get reused);
* refcounts count paths: an L2 table reachable from k L1 tables gives each
  of its data clusters k references;
* a new snapshot's L1 is the active L1 as it was, COPIED bits included;
* COPIED flags are recomputed on the active L1 and the L2 tables it
  reaches, exactly as QEMU's ``qcow2_update_snapshot_refcount(..., 0)``;
* the snapshot table is rewritten the way ``qcow2_write_snapshots`` writes
  it (at least 24 bytes of extra data per entry, unknown extra data kept);
* revert to a snapshot of another disk size resizes the image first.

What differs is *where* things are written, never what they mean: QEMU
updates L1/L2 tables and refcount blocks in place, which is what leaves its
images corrupt after a crash.  Here every changed table is a fresh copy and
all L1 tables that shared the old one are pointed at the copy, so sharing
(and hence refcounts) stays exactly what QEMU's in-place update gives; the
whole new state is published by one header write
(:mod:`qcow2snap.ops.transaction`).
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import filterfalse

from .. import format as fmt
from ..errors import (
    ImageNeedsRepairError,
    Qcow2Error,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from ..image import Qcow2Image
from ..model import Snapshot, new_snapshot, serialize_snapshot_table, snapshot_id_number
from ..refcount import decode_l1, l2_references
from ..tables import decode_u64_table, encode_u64_table, l2_live_hosts, nonzero_indexes
from .copied import LiveHosts, copied_cleared, copied_recomputed
from .refdelta import consecutive
from .transaction import CommitResult, Transaction

__all__ = [
    "QEMU_MAX_ID_BYTES",
    "QEMU_MAX_NAME_BYTES",
    "ImageNeedsRepairError",
    "SnapshotEditor",
    "SnapshotExistsError",
    "next_snapshot_id",
]

#: bytes of L2 tables kept between an edit's refcount and COPIED passes
MEMO_BYTES = 32 << 20
#: references handed to the transaction per call by a refcount pass
REFS_PER_CALL = 1 << 16
#: entries of the active L1 table the COPIED pass takes at a time (its
#: per-entry lists stay this long whatever the table: up to 4 Mi entries)
L1_SLICE_ENTRIES = 1 << 15

#: QEMU's tools hold names in char[256] and IDs in char[128]
QEMU_MAX_NAME_BYTES = 255
QEMU_MAX_ID_BYTES = 127


def next_snapshot_id(snapshots: Iterable[Snapshot]) -> str:
    """QEMU's ``find_new_snapshot_id``: max(strtoul(id)) + 1."""
    highest = max((snapshot_id_number(s.id_bytes) for s in snapshots), default=0)
    return str((highest + 1) % (1 << 64))


@dataclass
class _L1:
    """An L1 table of the new state."""

    offset: int           # where it lives in the old state (0 = nowhere yet)
    size: int             # entries
    entries: array[int]
    moved: bool = False   # must be written to new clusters

    def byte_length(self) -> int:
        return self.size * fmt.L1E_SIZE


@dataclass
class _Slot:
    """A snapshot of the new state: its table entry (replaced, never
    mutated, as the edit changes it) and, once loaded, its L1 table."""

    snapshot: Snapshot
    original: Snapshot | None = None     # as read; None for one this edit creates
    l1: _L1 | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.snapshot.label


class _SameTable:
    """The L1 indexes at which two L1 tables name the same L2 table (a
    revert's snapshot and active layer), told entry by entry when asked:
    no set of them is built (QEMU's largest L1 table has 4 Mi entries)."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: array[int], second: array[int]) -> None:
        self._first, self._second = first, second

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or index >= len(self._second):
            return False
        entry = self._first[index]
        return bool(entry & fmt.L1E_OFFSET_MASK) and not (
            (entry ^ self._second[index]) & fmt.L1E_OFFSET_MASK)

    def indexes(self) -> Iterator[int]:
        """Every such index, in order."""
        return filter(self.__contains__, nonzero_indexes(self._first))


class SnapshotEditor:
    """Plans snapshot operations on one image into a :class:`Transaction`.

    Use one editor per commit: call one or more operations, then
    :meth:`commit`.
    """

    def __init__(self, image: Qcow2Image, txn: Transaction) -> None:
        self.image = image
        self.txn = txn
        self.cluster_bits = image.cluster_bits
        self.cluster_size = image.cluster_size
        h = image.header
        # QEMU's bs->total_sectors * BDRV_SECTOR_SIZE: what a new snapshot
        # records as its disk size and what a revert compares with (the
        # header's stored size is rewritten only when a revert resizes)
        self.size = image.size
        self.slots = [_Slot(s, s) for s in image.snapshots]
        self.table_dirty = False
        # read_l1 decodes a fresh array: the editor owns it
        self.active = _L1(h.l1_table_offset, h.l1_size, image.read_l1(image.layer()))
        #: the L2 tables this edit copied, old -> new: the L1 tables that
        #: point at them are redirected when loaded, or one at a time at the
        #: commit (not all held with a referrer map: 100 snapshots of a 64
        #: TiB disk have 100 MiB of L1 tables)
        self._moves = txn.moved_l2
        self._l1s_checked = False
        #: L2 tables a refcount pass read, kept for the COPIED pass that
        #: follows (bounded: the process-wide cache holds 8 MiB, and 512-byte
        #: clusters make 65,536 tables of a 2 GiB disk)
        self._memo: dict[int, tuple[array[int], LiveHosts | None]] = {}
        self._memo_bytes = 0
        self.check_editable()
        txn.mark_in_use([0])
        txn.mark_in_use(txn.clusters_of(h.l1_table_offset, h.l1_size * 8))
        txn.mark_in_use(txn.clusters_of(h.snapshots_offset, image.snapshot_table.size))

    # ------------------------------------------------------------------
    # gates

    def check_editable(self) -> None:
        image = self.image
        if image.dirty:
            raise ImageNeedsRepairError(
                f"{image.path}: the dirty bit is set (it was not closed cleanly; refcounts may "
                f"be stale): run 'qcow2snap check --repair all' or 'qemu-img check -r all' first")
        if image.corrupt:
            raise ImageNeedsRepairError(
                f"{image.path}: the corrupt bit is set: run 'qcow2snap check --repair all' or "
                f"'qemu-img check -r all' first")
        if image.has_data_file:
            raise UnsupportedImageError(
                f"{image.path}: internal snapshots are not supported with an external data "
                f"file (QEMU refuses them too)", feature="external data file")

    # ------------------------------------------------------------------
    # helpers

    def _find(self, ref: str | Snapshot) -> _Slot:
        sn = self.image.find_snapshot(ref)
        for slot in self.slots:
            if slot.original is sn:
                return slot
        raise SnapshotNotFoundError(f"{self.image.path}: snapshot {ref!r} is being removed")

    def _snapshot_l1(self, slot: _Slot) -> _L1:
        """The slot's L1 table, loaded and kept (pointing at the L2 copies
        made so far)."""
        if slot.l1 is None:
            slot.l1 = self._load_l1(slot)
        return slot.l1

    def _check_l1(self, slot: _Slot) -> None:
        """Refuse a snapshot's L1 table QEMU refuses, and mark its clusters
        in use (never allocated over, even if their refcount says 0)."""
        sn = slot.snapshot
        structure = f"snapshot {slot.label}"
        if sn.l1_size > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise Qcow2Error(f"{self.image.path}: Snapshot L1 table too large: {structure}")
        if sn.l1_table_offset & (self.cluster_size - 1):
            raise Qcow2Error(f"{self.image.path}: Snapshot L1 table offset invalid: "
                             f"{structure}")
        self.txn.mark_in_use(self.txn.clusters_of(sn.l1_table_offset, sn.l1_size * 8))

    def _load_l1(self, slot: _Slot) -> _L1:
        """A snapshot's L1 table read from the old state, pointed at the L2
        copies made so far."""
        self._check_l1(slot)
        sn = slot.snapshot
        l1 = _L1(sn.l1_table_offset, sn.l1_size,
                 decode_l1(self.image, sn.l1_table_offset, sn.l1_size))
        if self._moves and self._moves.redirect(l1.entries, nonzero_indexes(l1.entries)):
            l1.moved = True
        return l1

    def _l2_offset(self, l1_entry: int, where: str) -> int:
        offset = l1_entry & fmt.L1E_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise Qcow2Error(f"{self.image.path}: L2 table offset {offset:#x} unaligned in "
                             f"{where}; run 'qcow2snap check'")
        return offset

    def _refupdate(self, l1: _L1, addend: int, where: str,
                   indexes: Iterable[int] | None = None,
                   uncounted: Container[int] = ()) -> None:
        """+/-1 on every L2 table of ``l1`` and every cluster they reference
        (QEMU's ``qcow2_update_snapshot_refcount``, without its COPIED pass).
        ``indexes``: only the tables of these L1 entries (default: every
        one that is set); ``uncounted``: L1 indexes whose tables are read
        and kept for the COPIED pass but not counted (a revert's tables
        shared with the active layer, see :meth:`revert`).

        A table's references are its entries' host clusters, taken at C
        speed from its live entries (:func:`l2_live_hosts`: a sparse table
        costs per stretch of live entries), and the references of many tables go
        to the transaction in one call (at most :data:`REFS_PER_CALL` at a
        time): one call per table cost more than the additions."""
        txn = self.txn
        bits = self.cluster_bits
        entries = l1.entries
        refs: list[int] = []   # the tables' own clusters, and what they reference
        if indexes is None:   # cost follows the L2 tables, not the disk size
            indexes = nonzero_indexes(entries)
        for index in indexes:
            l2 = self._l2_offset(entries[index], where)
            if not l2:
                continue
            if index in uncounted:
                self._table_and_hosts(l2)
                continue
            refs.append(l2 >> bits)
            table, live_hosts = self._table_and_hosts(l2)
            if live_hosts is None:   # compressed entries
                refs += l2_references(self.image, l2, table)
            elif consecutive(live_hosts[1]):
                # consecutive clusters (a preallocated or sequentially
                # written table): one slice, not one addition per cluster
                txn.add_reference_run(live_hosts[1][0], len(live_hosts[1]), addend)
            else:
                refs += live_hosts[1]
            if len(refs) >= REFS_PER_CALL:
                txn.add_references(refs, addend)
                refs = []
        txn.add_references(refs, addend)

    def _table_and_hosts(self, l2: int) -> tuple[array[int], LiveHosts | None]:
        """The L2 table at ``l2`` (of the old state) and its
        :func:`l2_live_hosts` (None: it has compressed entries), kept for
        the COPIED pass while :data:`MEMO_BYTES` allow (scaled with the
        transaction's other budgets, :func:`edit_memory_scale`)."""
        memo = self._memo.get(l2)
        if memo is not None:
            return memo
        table = self.image.read_l2(l2)
        live_hosts = l2_live_hosts(table[0::2] if self.image.extended_l2 else table,
                                   self.cluster_bits)
        if self._memo_bytes < MEMO_BYTES * self.txn.memory_scale:   # spares the COPIED pass
            self._memo[l2] = (table, live_hosts)
            self._memo_bytes += (len(table) * 8 + 128 if live_hosts is None else
                                 len(table) * 8 + len(live_hosts[1]) * 40
                                 + len(live_hosts[0]) * 72 + 128)
        return table, live_hosts

    def _table_references(self, l2: int) -> list[int]:
        """Every cluster the L2 table at ``l2`` references, as
        :meth:`_refupdate` counts them (its own cluster not included)."""
        table, live_hosts = self._table_and_hosts(l2)
        return (l2_references(self.image, l2, table) if live_hosts is None
                else live_hosts[1])

    def _skipped_increments_fit(self, sn_l1: _L1, shared: _SameTable, where: str) -> bool:
        """Whether QEMU's increments of the ``shared`` tables (skipped by
        the revert) would have stayed within the refcount width, on top of
        the increments planned so far: QEMU adds all of the snapshot's
        references before it takes the active layer's away, and refuses an
        overflow on the way (:meth:`Transaction.check_increments_fit`).

        Told from bounds on what a cluster gains from those tables: at most
        one for each of their references and each table (a table is
        counted once per L1 entry), or, tighter, ``tables * (multiplicity +
        1)`` (once per table it is in, or more where a table references it
        twice, and the table's own cluster); the highest planned count of
        their clusters plus that must fit.  False (count them after all)
        when no bound fits, which takes a count near the maximum or a very
        large image with narrow refcounts."""
        txn = self.txn
        bits = self.cluster_bits
        highest = references = tables = 0
        batch: list[int] = []
        for index in shared.indexes():
            l2 = self._l2_offset(sn_l1.entries[index], where)
            tables += 1
            batch.append(l2 >> bits)
            hosts = self._table_references(l2)
            if hosts:
                references += len(hosts)
                highest = max(highest, max(txn.refcounts_of(hosts)))
            if len(batch) >= REFS_PER_CALL:
                highest = max(highest, max(txn.refcounts_of(batch)))
                batch = []
        if batch:
            highest = max(highest, max(txn.refcounts_of(batch)))
        room = txn.refcount_max - highest
        if room >= references + tables:
            return True
        multiplicity = 1
        for index in shared.indexes():
            hosts = self._table_references(self._l2_offset(sn_l1.entries[index], where))
            if not consecutive(hosts) and len(set(hosts)) != len(hosts):
                multiplicity = max(multiplicity, max(Counter(hosts).values()))
        return room >= tables * (multiplicity + 1)

    def _l2_table(self, offset: int) -> tuple[array[int], LiveHosts | None]:
        """An L2 table of the new state, with its :func:`l2_live_hosts` if
        known."""
        if offset >> self.cluster_bits in self.txn.allocated:   # a copy this edit made
            return decode_u64_table(self.txn.read_new(offset, self.cluster_size)), None
        memo = self._memo.get(offset)
        return memo if memo is not None else (self.image.read_l2(offset), None)

    def _fix_active_copied(self, shared: bool = False) -> None:
        """Recompute COPIED on the active L1 and its L2 tables from the new
        refcounts, as QEMU's ``qcow2_update_snapshot_refcount(active, 0)``
        does: set iff the refcount is exactly 1; NORMAL and ZERO_ALLOC
        entries are refcounted, ZERO_PLAIN/UNALLOCATED count as 0 and
        compressed as 2, so those never carry it.  An L2 table whose flags
        change is copied, and every L1 table that shared it is pointed at the
        copy.  ``shared``: every table and cluster of the active layer is
        known to have a count of 2 or more (a create; see
        :meth:`Transaction.increases_leave_shared`), so COPIED is cleared
        everywhere without looking the counts up."""
        txn = self.txn
        bits = self.cluster_bits
        step = 2 if self.image.extended_l2 else 1
        copied = fmt.QCOW_OFLAG_COPIED
        active = self.active
        moved = False
        for first in range(0, active.size, L1_SLICE_ENTRIES):
            set_indexes = [first + i for i in nonzero_indexes(
                active.entries[first:first + L1_SLICE_ENTRIES])]
            l2_offsets = [self._l2_offset(active.entries[i], "the active L1 table")
                          for i in set_indexes]
            l2_counts = ([2] * len(l2_offsets) if shared
                         else txn.refcounts_of([o >> bits for o in l2_offsets if o]))
            l2_count = iter(l2_counts)
            for i, l2 in zip(set_indexes, l2_offsets, strict=True):
                entry = active.entries[i]
                if not l2:
                    continue
                paths = next(l2_count)
                table, live_hosts = self._l2_table(l2)
                desired = (copied_cleared(table, step) if shared
                           else copied_recomputed(table, step, bits, txn, live_hosts))
                if desired is not None:
                    if not self._l1s_checked:   # before the first copy is allocated
                        for slot in self.slots:
                            if slot.l1 is None:   # (a loaded one was checked, or is new)
                                self._check_l1(slot)
                        self._l1s_checked = True
                    l2 = self._move_l2(l2, desired)
                    moved = True
                flags = copied if paths == 1 else 0
                new_entry = (entry & ~(copied | fmt.L1E_OFFSET_MASK)) | l2 | flags
                if new_entry != entry:
                    active.entries[i] = new_entry
                    active.moved = True
        if moved:   # the loaded L1 tables that shared the old tables: at the copies
            for l1 in (active, *(slot.l1 for slot in self.slots if slot.l1 is not None)):
                if self._moves.redirect(l1.entries, nonzero_indexes(l1.entries)):
                    l1.moved = True
        self._memo.clear()
        self._memo_bytes = 0

    def _move_l2(self, old: int, content: array[int]) -> int:
        txn = self.txn
        bits = self.cluster_bits
        paths = txn.refcount(old >> bits)
        new = txn.allocate(self.cluster_size)
        txn.add_refcount(new >> bits, paths - 1)
        txn.relocate_l2(old, new, paths)
        txn.write_new(new, encode_u64_table(content))
        return new

    # ------------------------------------------------------------------
    # operations

    def create(self, name: str | bytes, *, overwrite: bool = False,
               date: float | None = None) -> str:
        """A disk-only snapshot of the active layer, as ``qemu-img snapshot -c``
        makes it (icount 0, vm clock 0, date now).  With ``overwrite``, the
        first snapshot of that name is deleted first, in the same commit."""
        name_bytes = name.encode() if isinstance(name, str) else name
        if not name_bytes:
            raise ValueError("a snapshot name must not be empty")
        if len(name_bytes) > QEMU_MAX_NAME_BYTES or b"\0" in name_bytes:
            raise ValueError(f"snapshot names are at most {QEMU_MAX_NAME_BYTES} bytes without "
                             f"NUL (QEMU would truncate longer ones)")
        existing = [slot for slot in self.slots if slot.snapshot.name_bytes == name_bytes]
        if existing:
            if not overwrite:
                raise SnapshotExistsError(
                    f"{self.image.path}: a snapshot named "
                    f"{name_bytes.decode('utf-8', 'replace')!r} exists (ID "
                    f"{existing[0].snapshot.id}); pass overwrite=True (CLI: --overwrite) to "
                    f"replace it")
            self._delete_slot(existing[0])
        if len(self.slots) >= fmt.QCOW_MAX_SNAPSHOTS:
            raise UnsupportedImageError(
                f"{self.image.path}: the image already holds {fmt.QCOW_MAX_SNAPSHOTS} snapshots, "
                f"QEMU's limit (File too large)", feature="snapshot count")
        now = time.time() if date is None else date
        micros = round(now * 1_000_000)
        snapshot_l1 = _L1(0, self.active.size, array(self.active.entries.typecode,
                                                      self.active.entries), moved=True)
        fresh = not self.txn.delta   # nothing planned before (no --overwrite delete)
        self._refupdate(self.active, +1, "the active L1 table")
        new_id = next_snapshot_id(slot.snapshot for slot in self.slots).encode()
        snapshot = new_snapshot(
            id_bytes=new_id, name_bytes=name_bytes, l1_table_offset=0,
            l1_size=self.active.size, date_sec=micros // 1_000_000 & fmt.UINT32_MAX,
            date_nsec=(micros % 1_000_000) * 1000, vm_clock_nsec=0, vm_state_size=0,
            disk_size=self.size, icount=0)
        self.slots.append(_Slot(snapshot, None, snapshot_l1))
        self.table_dirty = True
        self._fix_active_copied(shared=fresh and self.txn.increases_leave_shared())
        return new_id.decode()

    def delete(self, ref: str | Snapshot) -> Snapshot:
        slot = self._find(ref)
        self._delete_slot(slot)
        self._fix_active_copied()
        return slot.snapshot

    def _delete_slot(self, slot: _Slot) -> None:
        l1 = self._snapshot_l1(slot)
        self.slots.remove(slot)
        self._refupdate(l1, -1, f"snapshot {slot.label}")
        if slot.original is not None and l1.size:
            self.txn.add_refcounts(self.txn.clusters_of(l1.offset, l1.byte_length()), -1)
        self.table_dirty = True

    def revert(self, ref: str | Snapshot) -> Snapshot:
        """Make the active layer the snapshot's content (``qemu-img snapshot -a``),
        resizing the image to the snapshot's disk size."""
        slot = self._find(ref)
        record = slot.snapshot
        sn_l1 = self._snapshot_l1(slot)
        image = self.image
        if record.disk_size != self.size:
            if record.disk_size % fmt.BDRV_SECTOR_SIZE:
                # qcow2_snapshot_goto truncates to it, and qcow2_co_truncate refuses
                raise UnsupportedImageError(
                    f"{image.path}: cannot revert to snapshot {record.label}: its disk size "
                    f"{record.disk_size} is not a multiple of 512 (QEMU: \"The new size must "
                    f"be a multiple of 512\")", feature="snapshot disk size")
            if image.header.version < 3 and self.slots:
                raise UnsupportedImageError(
                    f"{image.path}: Can't resize a v2 image which has snapshots (snapshot "
                    f"{record.label} has disk size {record.disk_size}, the image "
                    f"{self.size})", feature="resize of v2 image with snapshots")
            self.size = record.disk_size
            self.txn.set_header(size=record.disk_size)
        new_size = max(self.active.size, sn_l1.size, image.size_to_l1(record.disk_size))
        if new_size > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise UnsupportedImageError("Active L1 table too large", feature="L1 size")
        entries = array(sn_l1.entries.typecode, sn_l1.entries)
        entries.extend([0] * (new_size - sn_l1.size))
        where = f"snapshot {record.label}"
        what = f"reverting to snapshot {record.label}"
        # A table the snapshot shares with the active layer at the same L1
        # index (a revert right after a create, or a second revert) gains 1
        # and loses 1, with every cluster it references: skipped, unless
        # the skipped increments could have overflowed on the way, which
        # QEMU refuses (then they are counted as it counts them)
        shared = _SameTable(sn_l1.entries, self.active.entries)
        self._refupdate(sn_l1, +1, where, uncounted=shared)
        self.txn.check_increments_fit(what)
        if not self._skipped_increments_fit(sn_l1, shared, where):
            self._refupdate(sn_l1, +1, where, indexes=shared.indexes())
            self.txn.check_increments_fit(what)
            shared = _SameTable(sn_l1.entries, array("Q"))   # none skipped
        self._refupdate(self.active, -1, "the active L1 table",
                        indexes=filterfalse(shared.__contains__,
                                            nonzero_indexes(self.active.entries)))
        old = self.active
        if old.size:   # QEMU overwrites the active L1 in place: relocated metadata
            self.txn.release_relocated(self.txn.clusters_of(old.offset, old.byte_length()))
        self.active = _L1(0, new_size, entries, moved=True)
        self._fix_active_copied()
        return record

    def rename(self, ref: str | Snapshot, new_name: str | bytes) -> Snapshot:
        slot = self._find(ref)
        name_bytes = new_name.encode() if isinstance(new_name, str) else new_name
        if not name_bytes or len(name_bytes) > QEMU_MAX_NAME_BYTES or b"\0" in name_bytes:
            raise ValueError(f"snapshot names are 1 to {QEMU_MAX_NAME_BYTES} bytes without NUL")
        slot.snapshot = replace(slot.snapshot, name_bytes=name_bytes)
        self.table_dirty = True
        return slot.snapshot

    # ------------------------------------------------------------------

    def commit(self, *, dry_run: bool = False) -> CommitResult:
        txn = self.txn
        image = self.image
        h = image.header
        # L1 tables that changed go to new clusters
        if self.active.moved:
            l1 = self.active
            if l1.offset:
                # old location freed (revert already released it)
                txn.release_relocated(txn.clusters_of(l1.offset, l1.byte_length()))
            l1.offset = txn.allocate(l1.byte_length()) if l1.size else 0
            if l1.size:
                txn.write_new_table(l1.offset, l1.entries)
        for slot in self.slots:
            # an L1 table not loaded yet is loaded now if some L2 table
            # moved, pointed at the copies, written if it changed, and
            # dropped: one at a time
            loaded = slot.l1 if slot.l1 is not None or not self._moves else self._load_l1(slot)
            if loaded is None or not loaded.moved:
                continue
            l1 = loaded
            if slot.original is not None and l1.offset:
                txn.release_relocated(txn.clusters_of(l1.offset, l1.byte_length()))
            l1.offset = txn.allocate(l1.byte_length()) if l1.size else 0
            if l1.size:
                txn.write_new_table(l1.offset, l1.entries)
            slot.snapshot = replace(slot.snapshot, l1_table_offset=l1.offset, l1_size=l1.size)
            self.table_dirty = True
        fields: dict[str, int] = {}
        if self.active.offset != h.l1_table_offset or self.active.size != h.l1_size:
            fields.update(l1_table_offset=self.active.offset, l1_size=self.active.size)
        if self.table_dirty:
            table = serialize_snapshot_table([slot.snapshot for slot in self.slots])
            if len(table) > fmt.QCOW_MAX_SNAPSHOTS_SIZE:
                raise UnsupportedImageError(
                    f"{image.path}: the snapshot table would exceed QEMU's 64 MiB limit "
                    f"(File too large)", feature="snapshot table size")
            if self.slots:
                offset = txn.allocate(len(table))
                txn.write_new(offset, table)
            else:
                offset = 0
            if h.nb_snapshots:
                txn.release_relocated(txn.clusters_of(h.snapshots_offset,
                                                      image.snapshot_table.size))
            fields.update(nb_snapshots=len(self.slots), snapshots_offset=offset)
        txn.set_header(**fields)
        return txn.commit(dry_run=dry_run)
