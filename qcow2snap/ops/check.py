"""Consistency check of a qcow2 image (operations layer): QEMU's
``qemu-img check`` rules.

:func:`check_image` recomputes every reference the way QEMU's
``qcow2_check_refcounts`` (``block/qcow2-refcount.c``) does: the header
cluster, the refcount table and blocks, the active L1 table, every
snapshot's L1 table, each L2 table once *per path* (an L2 shared by k L1
tables gives its data clusters k references), compressed clusters +1 per
touched host cluster, the snapshot table's exact byte range, the LUKS
header and the persistent-bitmap structures.  Tables are decoded in bulk
(:mod:`qcow2snap.tables`; one L2 table by :mod:`.check_l2`, into runs of
consecutive host clusters) and counted in bulk by :mod:`.check_count`, in
one ``array`` indexed by host cluster in the width of the image's
refcounts, so memory is two bytes per host cluster (twice: computed and
stored) and time is one pass over the metadata with a few operations per
run.

What is reported (each a :class:`~.check_report.Finding`): refcounts too
high (leaks) and too low, misaligned tables and data clusters, reserved
bits, references past the end of the file, metadata structures that
overlap, COPIED flags of the active layer (set iff refcount == 1), and the
snapshot-table problems the salvaging reader (:mod:`.salvage`) finds.  A
snapshot whose L1 pointer is broken gets its L1 table searched among the
leaked clusters (:meth:`Checker.locate_l1`).

Counting follows QEMU so the numbers agree with ``qemu-img check``; the exit
status does too (0 clean, 2 corruptions, 3 leaks only, 1 the check could not
be completed -- which QEMU also says when it cannot read the snapshot table
without ``-r all``; qcow2snap still reports everything else it found).

This module is about 800 lines because the checker is one pass with
shared state (the cluster owners, the L2 results, the findings, and the
search for lost L1 tables among the leaks, which walks tables as the
check does); its independent parts live beside it: one L2 table's scan
(:mod:`.check_l2`), the counting (:mod:`.check_count`), the report types
(:mod:`.check_report`).  Repair is :mod:`qcow2snap.ops.repair`.
"""

from __future__ import annotations

import os
import sys
from array import array
from bisect import bisect_left
from collections import Counter
from functools import reduce
from itertools import compress, repeat
from operator import and_, or_, rshift

from .. import format as fmt
from ..errors import CheckFailedError
from ..image import Qcow2Image
from ..model import BitmapsExtension
from ..tables import (
    decode_refcount_block,
    decode_u64_table,
    nonzero_indexes,
    refcount_block_entries,
)
from .check_count import (
    ReferenceCounts,
    last_nonzero,
    refcount_differences,
    refcount_typecode,
    zeros,
)
from .check_l2 import L2Info, scan_l2
from .check_report import (
    MAX_FINDINGS_PER_KIND,
    CheckReport,
    Finding,
    Progress,
    RepairMode,
    Severity,
    SnapshotVerdict,
    VerdictStatus,
)
from .salvage import SalvagedEntry, SalvagedTable, salvage_snapshot_table

__all__ = ["Checker", "check_image", "refcount_differences"]
# where these were defined before the split; importing them from here works
__all__ += ["CheckFailedError", "CheckReport", "Finding", "SalvagedEntry",
            "SnapshotVerdict", "salvage_snapshot_table"]


class Checker:
    """One check of one image: build with the image (opened with
    ``check_mode=True``), then :meth:`run`."""

    def __init__(self, image: Qcow2Image, *, progress: Progress | None = None) -> None:
        self.image = image
        self.h = image.header
        self.cs = image.cluster_size
        self.bits = image.cluster_bits
        self.file_size = image.file_size
        self.file_clusters = (self.file_size + self.cs - 1) >> self.bits
        self.progress = progress
        self.report = CheckReport(filename=image.path)
        self._counts: Counter[str] = Counter()
        #: computed references per host cluster (:attr:`ref`)
        self.refs = ReferenceCounts(self.h.refcount_order, self.file_clusters + 1)
        self.past_eof: set[int] = set()
        #: host clusters holding guest data that QEMU reads but its check
        #: does not count (see L2Info.unreferenced_data): a repair keeps them
        self.unreferenced_data: set[int] = set()
        self.owner: dict[int, str] = {}       # metadata cluster -> structure kind
        self.data_clusters: set[int] = set()  # only filled for overlap detection of metadata
        self._l2_info: dict[int, L2Info] = {}
        #: L2 tables with paths not yet counted (the count is ``L2Info.paths``;
        #: ``L2Info.walked``: reached from a counted L1 table)
        self._pending: list[int] = []
        #: L2 entry problems counted but not listed (their kinds are unknown)
        self.unlisted_l2_findings = 0
        self.table: SalvagedTable | None = None
        #: (offset, length) of the snapshot table range that was counted
        self.table_counted: tuple[int, int] | None = None
        self.disk: array[int] = array("Q")
        self.rebuild_reasons: list[str] = []
        self.refblocks: list[tuple[int, int]] = []   # (table index, offset) of valid blocks
        self.refcount_structure_refs: list[int] = []
        #: the active L1 table's entries leading to a counted L2 table: their
        #: indexes, and the L2 tables' offsets
        self.active_l1_index: array[int] = array("Q")
        self.active_l2: array[int] = array("Q")
        self.l1_tables: list[tuple[str, int, int]] = []  # (label, offset, size) walked
        #: L1 tables whose own clusters were counted (not past the end of the file)
        self.l1_counted: set[tuple[int, int]] = set()
        self._done = 0
        self._total = 1

    @property
    def ref(self) -> array[int]:
        """The computed references per host cluster (in the width of the
        image's refcounts, or 8 bytes once a count outgrew it)."""
        return self.refs.counts

    # -- findings --------------------------------------------------------

    def add(self, kind: str, severity: Severity, offset: int | None, structure: str,
            message: str, repairable: RepairMode | None) -> None:
        r = self.report
        if severity == "corruption":
            r.corruptions += 1
        elif severity == "leak":
            r.leaks += 1
        elif severity == "error":
            r.check_errors += 1
        self._counts[kind] += 1
        if self._counts[kind] <= MAX_FINDINGS_PER_KIND:
            r.findings.append(Finding(kind, severity, offset, structure, message, repairable))
        else:
            r.findings_omitted += 1

    # -- reference counting ----------------------------------------------

    def inc_range(self, offset: int, length: int, structure: str) -> bool:
        """+1 on every cluster of ``[offset, offset+length)``; QEMU's rule for
        ranges past the end of the file.  False if not counted."""
        if length <= 0:
            return True
        if offset + length - self.file_size >= self.cs:
            self.add("past-eof", "corruption", offset, structure,
                     f"ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {length:#x} ({structure})",
                     None)
            for c in range(offset >> self.bits, min((offset + length - 1) >> self.bits,
                                                    (offset >> self.bits) + 4096) + 1):
                self.past_eof.add(c)
            return False
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        self.refs.grow(last)
        self.refs.add(first, last - first + 1, 1)
        return True

    def claim(self, offset: int, length: int, kind: str, structure: str) -> None:
        """Record metadata ownership for overlap detection."""
        for c in range(offset >> self.bits, ((offset + max(length, 1) - 1) >> self.bits) + 1):
            other = self.owner.get(c)
            if other is None:
                self.owner[c] = kind
            elif other != kind or kind in ("L1 table", "snapshot table", "refcount table"):
                if other == kind and kind == "L1 table":
                    continue  # two L1 tables at one place: the refcount check reports it
                self.add("overlap", "corruption", c << self.bits, structure,
                         f"{structure} at cluster {c} overlaps a {other}", None)

    # -- the passes --------------------------------------------------------

    def run(self) -> CheckReport:
        h = self.h
        image = self.image
        r = self.report
        r.dirty = image.dirty
        r.corrupt_bit = image.corrupt
        # QEMU's bfi.total_clusters: of bs->total_sectors, the rounded size
        r.total_clusters = (image.size + self.cs - 1) >> self.bits
        if image.dirty:
            self.add("dirty-bit", "info", 72, "header",
                     "the dirty bit is set (refcounts may be stale); a repair clears it once "
                     "the image is consistent", None)
        if image.corrupt:
            self.add("corrupt-bit", "info", 72, "header",
                     "the corrupt bit is set; a repair clears it once the image is consistent",
                     None)
        # snapshot table
        self.table = salvage_snapshot_table(image)
        for f in self.table.findings:
            self.add(f.kind, f.severity, f.offset, f.structure, f.message, f.repairable)
        if image.has_data_file and self.table.entries:
            self.add("data-file-snapshots", "corruption", 60, "header",
                     f"ERROR {len(self.table.entries)} snapshots in image with data file", None)
        entries = [e for e in self.table.entries if e.drop is None]
        # estimate work for the progress callback: L1 entries to walk
        self._total = max(1, (h.l1_size + sum(min(e.l1_size, 1 << 22) for e in entries))
                          * self.cs)
        # header
        self.inc_range(0, self.cs, "header")
        self.claim(0, self.cs, "header", "header")
        # active layer
        self.walk_l1(h.l1_table_offset, h.l1_size, "active L1 table", active=True)
        # snapshots
        for e in entries:
            self._check_snapshot_l1(e)
        for e in entries:
            l1 = e.effective_l1()
            if l1 is not None and e.l1_broken is None:
                self.walk_l1(l1[0], l1[1], f"{e.label} L1 table", active=False)
        self._flush_pending()
        # snapshot table
        if self.table.counted_size:
            table_offset = self.table.offset
            if self.inc_range(table_offset, self.table.counted_size, "snapshot table"):
                self.table_counted = (table_offset, self.table.counted_size)
            self.claim(table_offset, self.table.counted_size, "snapshot table",
                       "snapshot table")
        self._count_extensions()
        # refcount structures last (QEMU's order: their refcount must be 1)
        self._read_refcounts()
        self._data_overlaps()
        # broken snapshot L1 pointers: search their tables among the leaks
        broken = [e for e in entries if e.l1_broken is not None]
        if broken:
            excess, candidates = self._leaked_candidates()
            budget = [self.LOCATE_READ_BUDGET]
            for number, e in enumerate(broken):
                if number < self.LOCATE_MAX_SNAPSHOTS:
                    self.locate_l1(e, excess, candidates, budget)
                else:
                    e.problems.append(f"L1 pointer broken ({e.l1_broken}); not searched "
                                      f"(more than {self.LOCATE_MAX_SNAPSHOTS} such snapshots)")
        self._compare()
        self._check_copied()
        self._verdicts()
        return r

    def _tick(self, nbytes: int) -> None:
        if self.progress is not None:
            self._done += nbytes
            self.progress(min(self._done, self._total), self._total)

    def _check_snapshot_l1(self, e: SalvagedEntry) -> None:
        structure = f"snapshot table entry {e.index}"
        if e.l1_table_offset & (self.cs - 1):
            e.l1_broken = "L1 table is not cluster aligned"
            self.add("snapshot-l1", "corruption", e.entry_offset, structure,
                     f"ERROR snapshot {e.id} ({e.name}) l1_offset="
                     f"{fmt.c_hex(e.l1_table_offset)}: L1 table is not cluster aligned; snapshot "
                     f"table entry corrupted", "all")
        elif e.l1_size > fmt.QCOW_MAX_L1_SIZE // 8:
            e.l1_broken = "L1 table is too large"
            self.add("snapshot-l1", "corruption", e.entry_offset, structure,
                     f"ERROR snapshot {e.id} ({e.name}) l1_size={fmt.c_hex(e.l1_size)}: L1 "
                     f"table is too large; snapshot table entry corrupted", "all")
        elif e.l1_size and e.l1_table_offset + e.l1_size * 8 - self.file_size >= self.cs:
            e.l1_broken = "L1 table lies past the end of the file"
            self.add("snapshot-l1", "corruption", e.entry_offset, structure,
                     f"snapshot {e.id} ({e.name}) l1_offset={e.l1_table_offset:#x} "
                     f"l1_size={e.l1_size}: L1 table lies past the end of the file; snapshot "
                     f"table entry corrupted", "all")

    def walk_l1(self, l1_offset: int, l1_size: int, label: str, *, active: bool) -> None:
        if l1_size == 0:
            return
        cs = self.cs
        self.l1_tables.append((label, l1_offset, l1_size))
        if self.inc_range(l1_offset, l1_size * 8, label):
            self.l1_counted.add((l1_offset, l1_size))
            self.claim(l1_offset, l1_size * 8, "L1 table", label)
        # walked even when not counted, as QEMU does (zeros past the end)
        table = decode_u64_table(self.image.pread(l1_offset, l1_size * 8))
        reserved = fmt.L1E_RESERVED_MASK
        mask = fmt.L1E_OFFSET_MASK
        bits = self.bits
        file_size = self.file_size
        owner = self.owner
        pending = self._pending
        refs = self.refs
        r = self.report
        progress = self.progress is not None
        for index in nonzero_indexes(table):   # zero runs skipped at C speed
            entry = table[index]
            if entry & reserved:
                self.add("reserved-bits", "corruption", l1_offset + 8 * index, label,
                         f"ERROR found L1 entry with reserved bits set: {entry:x}", None)
            l2 = entry & mask
            if not l2:
                # QEMU's check tests the raw entry: it would read the header
                # cluster as this entry's L2 table; readers see no L2 table
                self.add("l1-entry", "corruption", l1_offset + 8 * index, label,
                         f"L1 entry {index} ({entry:#x}) has flags but no L2 table offset "
                         f"(qemu-img check reads the header cluster as its L2 table)", "all")
                continue
            cluster = l2 >> bits
            if not l2 & (cs - 1) and l2 < file_size and owner.get(cluster, _L2) is _L2:
                # the usual case, without the strings of the general one
                refs.add_one(cluster)
                owner[cluster] = _L2
                if active:
                    self.active_l1_index.append(index)
                    self.active_l2.append(l2)
                info = self._l2_info.get(l2)
                if info is None:
                    info = self.l2_info(l2)
                if info.findings or info.more_findings or info.past_eof or \
                        info.unreferenced_data:
                    self._apply_l2(info, l2, label, active)
                else:
                    if not info.paths:
                        pending.append(l2)
                    info.paths += 1
                    info.walked = True
                    if active:
                        r.allocated_clusters += info.allocated
                        r.fragmented_clusters += info.fragmented
                        r.compressed_clusters += info.compressed
                if progress:
                    self._tick(cs)
                continue
            counted = self.inc_range(l2, cs, f"L2 table (from {label} entry {index})")
            if l2 & (cs - 1):
                self.add("misaligned", "corruption", l1_offset + 8 * index, label,
                         f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry "
                         f"corrupted", None)
            if not counted:
                continue
            self.claim(l2, cs, "L2 table", f"L2 table at {l2:#x}")
            if active:
                self.active_l1_index.append(index)
                self.active_l2.append(l2)
            info = self.l2_info(l2)
            self._apply_l2(info, l2, label, active)
            self._tick(cs)

    def l2_info(self, l2: int) -> L2Info:
        """What the L2 table at ``l2`` references, scanned once per check
        (:func:`~.check_l2.scan_l2`) however many layers reach it."""
        info = self._l2_info.get(l2)
        if info is None:
            info = scan_l2(self.image, l2)
            self._l2_info[l2] = info
        return info

    def walked_l2(self) -> dict[int, L2Info]:
        """The L2 tables the live layers reach (each scanned once), after
        :meth:`run`."""
        return {l2: info for l2, info in self._l2_info.items() if info.walked}

    def _apply_l2(self, info: L2Info, l2: int, label: str, active: bool) -> None:
        """One more path to an L2 table: its findings now (QEMU counts them
        per path), its references later, all paths at once
        (:meth:`_flush_pending`)."""
        for kind, off, message, repairable in info.findings:
            self.add(kind, "corruption", off, f"L2 table at {l2:#x}", message, repairable)
        if info.more_findings:
            self.report.corruptions += info.more_findings
            self.report.findings_omitted += info.more_findings
            self.unlisted_l2_findings += info.more_findings
        for hc in info.past_eof:
            self.add("past-eof", "corruption", hc << self.bits, f"L2 table at {l2:#x}",
                     f"ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {hc << self.bits:#x} size {self.cs:#x} "
                     f"(data cluster in L2 table at {l2:#x}, {label})", None)
            self.past_eof.add(hc)
        self.unreferenced_data.update(info.unreferenced_data)
        if not info.paths:
            self._pending.append(l2)
        info.paths += 1
        info.walked = True
        if active:
            r = self.report
            r.allocated_clusters += info.allocated
            r.fragmented_clusters += info.fragmented
            r.compressed_clusters += info.compressed

    def _data_overlaps(self) -> None:
        """Data clusters that are also metadata: a bisection per metadata
        cluster into the references of all tables kept as runs, then a
        C-level set test per table that is not (and per table, only when
        a metadata cluster lies in some run)."""
        meta = self.owner
        ordered = sorted(meta)
        in_runs = self.refs.any_run_holds(ordered)
        for l2, info in self._l2_info.items():
            if not info.walked:
                continue
            runs = info.runs
            if runs is not None:
                if not in_runs:
                    continue
                # a run overlaps metadata iff a metadata cluster lies in it
                if not any(ordered[i] < a + c for i, a, c in zip(
                        map(bisect_left, repeat(ordered), runs[0::2]), runs[0::2], runs[1::2],
                        strict=True) if i < len(ordered)):
                    continue
            elif meta.keys().isdisjoint(info.hosts):
                continue
            for hc in sorted(set(info.hosts).intersection(meta)):
                self.add("overlap", "corruption", hc << self.bits, f"L2 table at {l2:#x}",
                         f"data cluster {hc} (in L2 table at {l2:#x}) overlaps a {meta[hc]}",
                         None)

    def _flush_pending(self) -> None:
        """Count the references of every L2 table walked so far, times its
        number of paths (:meth:`.ReferenceCounts.add_tables`)."""
        l2_info = self._l2_info
        self.refs.add_tables(map(l2_info.__getitem__, self._pending))
        self._pending.clear()

    def _count_extensions(self) -> None:
        image = self.image
        ext = image.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        if ext is not None and len(ext.data) == 16:
            crypto = ext.crypto_header()
            if crypto.length:
                self.inc_range(crypto.offset, crypto.length, "LUKS header")
                self.claim(crypto.offset, crypto.length, "LUKS header", "LUKS header")
        ext = image.extension(fmt.QCOW2_EXT_MAGIC_BITMAPS)
        if ext is not None and len(ext.data) == 24 and \
                image.header.autoclear_features & fmt.QCOW2_AUTOCLEAR_BITMAPS:
            self._count_bitmaps(ext.bitmaps())

    def _count_bitmaps(self, b: BitmapsExtension) -> None:
        size = b.bitmap_directory_size
        if size > fmt.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            self.add("bitmaps", "corruption", b.bitmap_directory_offset, "bitmap directory",
                     "bitmap directory too large", None)
            return
        self.inc_range(b.bitmap_directory_offset, size, "bitmap directory")
        raw = self.image.pread(b.bitmap_directory_offset, size)
        pos = 0
        entry_size = fmt.QCOW_BITMAP_DIR_ENTRY_SIZE
        for _ in range(min(b.nb_bitmaps, fmt.QCOW2_MAX_BITMAPS)):
            if pos + entry_size > len(raw):
                break
            entry = fmt.parse_struct(fmt.QCowBitmapDirEntry, raw[pos:pos + entry_size],
                                     structure="bitmap directory entry",
                                     offset=b.bitmap_directory_offset + pos)
            table_offset = entry.bitmap_table_offset
            table_size = entry.bitmap_table_size
            pos = fmt.align_up(pos + entry_size + entry.extra_data_size + entry.name_size, 8)
            if table_size > (1 << 27) or table_offset & (self.cs - 1):
                continue
            self.inc_range(table_offset, table_size * 8, "bitmap table")
            table = decode_u64_table(self.image.pread(table_offset, table_size * 8))
            for table_entry in table:
                off = table_entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK
                if off:
                    self.inc_range(off, self.cs, "bitmap data")

    def _read_refcounts(self) -> None:
        """Decode the refcount table and blocks into :attr:`disk`; count
        their references; note why a rebuild is needed."""
        h = self.h
        cs = self.cs
        order = h.refcount_order
        entries_per_block = refcount_block_entries(self.bits, order)
        block_bits = entries_per_block.bit_length() - 1
        table_len = h.refcount_table_clusters << self.bits
        if h.refcount_table_clusters == 0:
            self.rebuild_reasons.append("the image has no refcount table")
            self.add("refcount-table", "corruption", 56, "header",
                     "the image has no refcount table (refcount_table_clusters is 0)", "all")
            table = array("Q")
        else:
            counted = self.inc_range(h.refcount_table_offset, table_len, "refcount table")
            if counted:
                self.refcount_structure_refs.extend(
                    range(h.refcount_table_offset >> self.bits,
                          ((h.refcount_table_offset + table_len - 1) >> self.bits) + 1))
            else:
                self.rebuild_reasons.append("the refcount table lies past the end of the file")
            self.claim(h.refcount_table_offset, table_len, "refcount table", "refcount table")
            table = decode_u64_table(self.image.pread(h.refcount_table_offset, table_len))
        n = max(len(self.ref), self.file_clusters + 1)
        disk = zeros(refcount_typecode(order), n)
        for index in nonzero_indexes(table):
            entry = table[index]
            off = entry & fmt.REFT_OFFSET_MASK
            where = h.refcount_table_offset + 8 * index
            if entry & fmt.REFT_RESERVED_MASK:
                self.add("reserved-bits", "corruption", where, "refcount table",
                         f"ERROR refcount table entry {index} has reserved bits set", "all")
                self.rebuild_reasons.append(f"refcount table entry {index} has reserved bits")
                continue
            if off & (cs - 1):
                self.add("misaligned", "corruption", where, "refcount table",
                         f"ERROR refcount block {index} is not cluster aligned; refcount table "
                         f"entry corrupted", "all")
                self.rebuild_reasons.append(f"refcount block {index} is not cluster aligned")
                continue
            if (off >> self.bits) >= self.file_clusters:
                self.add("past-eof", "corruption", where, "refcount table",
                         f"ERROR refcount block {index} is outside image", "all")
                self.rebuild_reasons.append(f"refcount block {index} is outside the image")
                continue
            self.inc_range(off, cs, f"refcount block {index}")
            self.refcount_structure_refs.append(off >> self.bits)
            self.claim(off, cs, "refcount block", f"refcount block {index}")
            self.refblocks.append((index, off))
            base = index << block_bits
            if base >= n:
                continue
            block = decode_refcount_block(self.image.pread(off, cs), order)
            stop = min(n, base + entries_per_block)
            part = block[:stop - base]
            disk[base:stop] = part if part.typecode == disk.typecode else array(
                disk.typecode, part)
        self.disk = disk
        for index, off in self.refblocks:
            count = self.ref[off >> self.bits]
            if count != 1:
                self.add("refcount-block", "corruption", off, f"refcount block {index}",
                         f"ERROR refcount block {index} refcount={count}", "all")
                self.rebuild_reasons.append(f"refcount block {index} has {count} references")

    def _compare(self) -> None:
        """On-disk vs computed refcounts, chunk by chunk (C-speed equality
        on unchanged chunks)."""
        ref = self.ref
        disk = self.disk
        if len(disk) < len(ref):
            disk.extend(zeros(disk.typecode, len(ref) - len(disk)))
        n = max(self.file_clusters, self.refs.highest() + 1)
        step = 4096
        for base in range(0, n, step):
            a = disk[base:min(base + step, n)]
            b = ref[base:min(base + step, n)]
            if a != b:
                for k, (d, c) in enumerate(zip(a, b, strict=True)):
                    if d == c:
                        continue
                    cluster = base + k
                    if d < c:
                        self.add("refcount-too-low", "corruption", cluster << self.bits,
                                 f"cluster {cluster}",
                                 f"ERROR cluster {cluster} refcount={d} reference={c}", "all")
                    else:
                        self.add("leak", "leak", cluster << self.bits, f"cluster {cluster}",
                                 f"Leaked cluster {cluster} refcount={d} reference={c}",
                                 "leaks")
        highest = max(last_nonzero(disk, n), last_nonzero(ref, n), 0)
        self.report.image_end_offset = (highest + 1) << self.bits

    def _check_copied(self) -> None:
        """OFLAG_COPIED in the active L1 and its L2 tables, against the
        on-disk refcounts (as QEMU's check_oflag_copied)."""
        image = self.image
        disk = self.disk
        bits = self.bits
        copied = fmt.QCOW_OFLAG_COPIED
        l1 = decode_u64_table(image.pread(self.h.l1_table_offset, self.h.l1_size * 8)) \
            if self.h.l1_size else array("Q")
        mask = fmt.L2E_OFFSET_MASK
        compressed = fmt.QCOW_OFLAG_COMPRESSED
        ext = image.extended_l2
        step = 2 if ext else 1
        seen_l2: set[int] = set()
        n = len(disk)
        for index, l2 in zip(self.active_l1_index, self.active_l2, strict=True):
            entry = l1[index]
            count = disk[l2 >> bits] if (l2 >> bits) < n else 0
            if (count == 1) != bool(entry & copied):
                self.add("copied", "corruption", self.h.l1_table_offset + 8 * index,
                         "active L1 table",
                         f"ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                         f"refcount={count}", "all")
            if l2 & (self.cs - 1):
                continue
            info = self._l2_info.get(l2)
            if info is not None and info.runs is not None and _copied_agree(info, disk):
                continue
            table = image.read_l2(l2)
            entries = table[0::step] if ext else table
            live = list(compress(entries, entries))
            if not image.has_data_file and not reduce(or_, live, 0) & compressed:
                # bulk: entries with a host offset, their refcounts, their flags
                values = list(compress(live, map(and_, live, repeat(mask))))
                info = self._l2_info.get(l2)
                hosts = (info.hosts if info is not None and info.bulk
                         else list(map(rshift, map(and_, values, repeat(mask)), repeat(bits))))
                if not hosts or max(hosts) < n:
                    want = list(map((1).__eq__, map(disk.__getitem__, hosts)))
                    have = list(map(rshift, values, repeat(63)))
                    if want != have:
                        where = [j for j in compress(range(len(entries)), entries)
                                 if entries[j] & mask]
                        for j, e, hc, w, hv in zip(where, values, hosts, want, have,
                                                   strict=True):
                            if w != hv:
                                self.add("copied", "corruption",
                                         l2 + j * image.l2_entry_size,
                                         f"L2 table at {l2:#x}",
                                         f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} "
                                         f"refcount={disk[hc]}", "all")
                    continue
            for j in compress(range(len(entries)), entries):
                e = entries[j]
                if e & compressed:
                    continue
                host = e & mask
                if not host:
                    if image.has_data_file and e & copied and not e & fmt.QCOW_OFLAG_ZERO:
                        continue
                    continue
                count = (1 if image.has_data_file
                         else disk[host >> bits] if (host >> bits) < n else 0)
                if (count == 1) != bool(e & copied):
                    self.add("copied", "corruption", l2 + j * image.l2_entry_size,
                             f"L2 table at {l2:#x}",
                             f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} "
                             f"refcount={count}", "all")
            seen_l2.add(l2)

    # -- salvage of broken L1 pointers ----------------------------------

    def expected_l1_size(self, e: SalvagedEntry) -> int:
        image = self.image
        disk_size = e.snapshot.disk_size
        vm_state_size = e.snapshot.vm_state_size
        if vm_state_size:
            vm_offset = image.size_to_l1(disk_size) << (self.bits + image.l2_bits)
            return image.size_to_l1(vm_offset + vm_state_size)
        return image.size_to_l1(disk_size)

    def _references_of_l1(self, offset: int, size: int, budget: list[int]
                          ) -> Counter[int] | None:
        """Every cluster a candidate L1 table references (itself included),
        or None when it does not look like an L1 table (or the read budget
        runs out)."""
        cs = self.cs
        if offset + size * 8 > self.file_size + cs - 1:
            return None
        table = decode_u64_table(self.image.pread(offset, size * 8))
        refs: Counter[int] = Counter(range(offset >> self.bits,
                                           ((offset + size * 8 - 1) >> self.bits) + 1))
        for entry in compress(table, table):
            if entry & fmt.L1E_RESERVED_MASK:
                return None
            l2 = entry & fmt.L1E_OFFSET_MASK
            if not l2:
                return None
            if l2 & (cs - 1) or (l2 >> self.bits) >= self.file_clusters:
                return None
            refs[l2 >> self.bits] += 1
            if l2 not in self._l2_info:
                budget[0] -= cs
                if budget[0] < 0:
                    return None
            info = self.l2_info(l2)
            if info.findings or info.past_eof:
                return None
            refs.update(info.hosts)
        return refs

    #: the L1 search reads at most this much (candidates are leaked clusters)
    LOCATE_READ_BUDGET = 256 << 20
    #: snapshots with a broken L1 pointer whose table is searched for
    LOCATE_MAX_SNAPSHOTS = 64

    def _leaked_candidates(self) -> tuple[dict[int, int], list[int]]:
        """Clusters whose stored refcount exceeds the references (the surplus
        per cluster), and those of them nothing references (where a lost L1
        table can be)."""
        ref = self.ref
        excess = {cluster: d - r for cluster, d, r in refcount_differences(self.disk, ref)
                  if d > r}
        return excess, [c for c in sorted(excess) if ref[c] == 0]

    def locate_l1(self, e: SalvagedEntry, excess: dict[int, int], candidates: list[int],
                  budget: list[int]) -> None:
        """Find the L1 table of a snapshot whose pointer is broken: an
        L1-sized table among the leaked clusters (stored refcount above the
        computed one) all of whose references fit in the leaked surplus, so
        that counting it explains leaks and can never create an over-count.
        ``excess``/``candidates`` are shared by the searches of one check
        (a found table's references are taken out); ``budget`` holds the
        bytes the search may still read."""
        cs = self.cs
        max_entries = fmt.QCOW_MAX_L1_SIZE // 8
        expected = self.expected_l1_size(e)
        sizes = [sz for sz in dict.fromkeys(
            [e.l1_size if 0 < e.l1_size <= max_entries else expected, expected])
            if 0 < sz <= max_entries]
        aligned = e.l1_table_offset & ~(cs - 1) & fmt.L1E_OFFSET_MASK
        ordered = sorted(candidates, key=lambda c: (c << self.bits) != aligned)
        for c in ordered[:4096]:
            if budget[0] <= 0:
                break
            offset = c << self.bits
            # a quick look at the first cluster rules out most data clusters
            budget[0] -= cs
            head = decode_u64_table(self.image.pread(offset, cs))
            if not self._looks_like_l1(head):
                continue
            for sz in sizes:
                budget[0] -= sz * 8
                refs = self._references_of_l1(offset, sz, budget)
                if refs is None:
                    continue
                own = ((offset + sz * 8 - 1) >> self.bits) - c + 1
                if sum(refs.values()) <= own and offset != aligned:
                    continue   # an empty table proves nothing, unless it is where the pointer says
                if any(excess.get(k, 0) < v for k, v in refs.items()):
                    continue
                e.located_l1 = (offset, sz)
                for k, v in refs.items():
                    excess[k] -= v
                candidates[:] = [x for x in candidates if excess.get(x, 0) > 0]
                # its references are real: count them
                self.walk_l1(offset, sz, f"{e.label} L1 table (located)", active=False)
                self._flush_pending()
                e.problems.append(f"L1 pointer broken ({e.l1_broken}); its L1 table was found "
                                  f"at {offset:#x} ({sz} entries)")
                self.add("snapshot-l1-located", "info", e.entry_offset,
                         f"snapshot table entry {e.index}",
                         f"{e.label}: L1 table found at {offset:#x} ({sz} entries); --repair "
                         f"all points the entry at it", "all")
                return
        e.problems.append(f"L1 pointer broken ({e.l1_broken}) and its L1 table was not found")

    def _looks_like_l1(self, table: array[int]) -> bool:
        cs = self.cs
        limit = self.file_clusters << self.bits
        for entry in compress(table, table):
            if entry & fmt.L1E_RESERVED_MASK:
                return False
            l2 = entry & fmt.L1E_OFFSET_MASK
            if not l2 or l2 & (cs - 1) or l2 >= limit:
                return False
        return True

    # -- verdicts --------------------------------------------------------

    def _verdicts(self) -> None:
        assert self.table is not None
        out = self.report.snapshots
        for e in self.table.entries:
            l1 = e.effective_l1()
            status: VerdictStatus
            if e.drop is not None:
                status = "not-a-snapshot"
                detail = e.drop
            elif e.l1_broken is not None and e.located_l1 is None:
                status = "lost"
                detail = "; ".join(e.problems)
            elif e.problems or e.rewrite:
                status = "damaged"
                detail = "; ".join(e.problems)
            else:
                status = "ok"
                detail = ""
            out.append(SnapshotVerdict(e.index, e.id, e.name, status, detail,
                                       l1[0] if l1 else e.l1_table_offset,
                                       l1[1] if l1 else e.l1_size))


_LITTLE = sys.byteorder == "little"
_L2 = "L2 table"
#: byte -> 1 if it is 1 / 0 / an entry's marked flag byte with OFLAG_COPIED
_IS_ONE = bytes(value == 1 for value in range(256))
_IS_ZERO = bytes(value == 0 for value in range(256))
_COPIED_IS_ONE = bytes(value == 0xFD for value in range(256))


def _copied_agree(info: L2Info, disk: array[int]) -> bool:
    """Whether every entry of a table scanned into runs has OFLAG_COPIED set
    exactly when its cluster's stored refcount is 1: the runs' refcounts
    joined, one byte per entry made of them (1 where the count is 1: the low
    byte translated, the others tested for zero, ANDed as integers) and
    compared with the entries' flags."""
    runs = info.runs
    assert runs is not None
    if not runs:
        return True
    size = disk.itemsize
    firsts = array("Q", map(size.__mul__, runs[0::2]))
    ends = array("Q", map(int.__add__, firsts, map(size.__mul__, runs[1::2])))
    if max(ends) > len(disk) * size:
        return False
    with memoryview(disk) as view, view.cast("B") as octets:
        stored = b"".join(map(octets.__getitem__, map(slice, firsts, ends)))
    low = 0 if _LITTLE else size - 1
    is_one = int.from_bytes(stored[low::size].translate(_IS_ONE), "big")
    for lane in range(size):
        if lane != low:
            is_one &= int.from_bytes(stored[lane::size].translate(_IS_ZERO), "big")
    count = len(stored) // size
    return is_one.to_bytes(count, "big") == info.copied.translate(_COPIED_IS_ONE)


def check_image(path: str | os.PathLike[str], *, progress: Progress | None = None
                ) -> CheckReport:
    """Check an image without changing it (opened read-only, in QEMU's
    check mode so a broken snapshot table does not stop the check)."""
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        return Checker(image, progress=progress).run()
    finally:
        image.close()
