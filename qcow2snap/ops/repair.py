"""Repair (operations layer): ``qcow2snap check --repair leaks|all``.

A repair is planned from a :class:`~qcow2snap.ops.check.Checker` run and
written through the crash-safe :class:`~qcow2snap.ops.transaction.Transaction`
(shadow paging, one header write publishes the new state), so a crash
leaves the old image or the repaired one, never a mix.

What each mode does (QEMU's ``-r leaks`` / ``-r all`` semantics of
``qcow2_check_refcounts`` in ``block/qcow2-refcount.c``, with the salvage
rules of :mod:`qcow2snap.ops.salvage`):

``leaks``
    lowers refcounts that are higher than the references; fixes COPIED
    flags only when nothing but leaks and COPIED errors was found (as QEMU).
    If a snapshot's L1 pointer is broken and its L1 table cannot be found,
    no refcount is lowered at all: its data is among the "leaks".  Nor is
    the refcount of a compressed cluster whose L2 entry has a non-zero
    subcluster bitmap (QEMU's check does not count it, but QEMU reads it).
``all``
    also raises refcounts that are too low, rebuilds the refcount table and
    blocks when they are themselves damaged (in two crash-safe commits: the
    rebuild first, then the rest), fixes COPIED flags (an L2 table whose
    flags change is copied and every L1 table that shared it is pointed at
    the copy), clears the COPIED flag of compressed clusters, turns
    misaligned preallocated zero clusters into plain zero clusters, and
    rewrites the snapshot table from the salvaged entries: sound entries
    byte for byte, repaired ones as QEMU writes them; entries that are not
    snapshots, or whose L1 table is lost, are dropped and named.

When the image is clean afterwards the dirty and corrupt bits are cleared
(in the same commit).  The image is then checked again, as qemu-img does
("Double checking the fixed image now"): the result is a
:class:`~qcow2snap.ops.check_report.RepairReport` holding both checks.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from itertools import compress

from .. import format as fmt
from ..errors import CheckFailedError, RefcountOverflowError
from ..image import Qcow2Image
from ..model import snapshot_id_number
from ..refcount import self_describing_refcounts
from ..tables import (
    decode_u64_table,
    encode_refcount_block,
    encode_u64_table,
    refcount_block_entries,
    refcount_max,
)
from .check import Checker, check_image, refcount_differences
from .check_report import (
    Finding,
    Progress,
    RepairMode,
    RepairReport,
    SnapshotVerdict,
)
from .metadata_io import FileIO, MetadataIO
from .salvage import SalvagedEntry
from .transaction import CommitResult, Transaction

__all__ = ["RepairMode", "repair_image"]


class _RepairTransaction(Transaction):
    """A transaction that never allocates a cluster the image references,
    even where the on-disk refcount (wrongly) says it is free."""

    def __init__(self, image: Qcow2Image, io: MetadataIO,
                 referenced: Callable[[int], bool]) -> None:
        super().__init__(image, io)
        self._referenced = referenced

    def _is_free(self, cluster: int) -> bool:
        # (tests/test_check.py's refcount-zero case fails if this hook is
        # ever bypassed: the new table would land on the guest's data)
        if self._referenced(cluster):
            return False
        return super()._is_free(cluster)


def repair_image(path: str | os.PathLike[str], mode: RepairMode, *, dry_run: bool = False,
                 progress: Progress | None = None, io: MetadataIO | None = None
                 ) -> RepairReport:
    """Check the image and repair what ``mode`` allows.

    The image is opened for writing (refused with
    :class:`~qcow2snap.errors.ImageInUseError` while a QEMU process holds
    it), except with ``dry_run``, which opens it read-only and reports the
    planned changes.  Returns a :class:`RepairReport`: the first check
    (``before``), the re-check of the repaired image (``after``), the
    snapshot verdicts and the changes of the repair.
    """
    if mode not in ("leaks", "all"):
        raise ValueError(f"repair mode must be 'leaks' or 'all', not {mode!r}")
    image = Qcow2Image(path, "r" if dry_run else "r+", check_mode=True)
    try:
        checker = Checker(image, progress=progress)
        first = checker.run()
        result = RepairReport(mode=mode, dry_run=dry_run, before=first)
        if checker.rebuild_reasons:
            if mode != "all":
                checker.add("refcount-rebuild", "error", None, "refcount structures",
                            "ERROR need to rebuild refcount structures ("
                            + "; ".join(checker.rebuild_reasons) + "); use --repair all", None)
                result.changes = [("nothing changed: the refcount structures need a rebuild, "
                                   "which only --repair all does")]
                result.snapshots = _plan(checker, mode).verdicts
                return result
            result.changes.extend(_rebuild_refcounts(image, checker, io, dry_run))
            result.rebuilt_refcounts = True
            if dry_run:
                result.snapshots = _plan(checker, mode).verdicts
                result.changes.append("the other repairs are planned once the refcount "
                                      "structures are rebuilt (run without --dry-run)")
                return result
            image.reload()
            checker = Checker(image, progress=progress)
            checker.run()
        result.commit, result.snapshots = _repair_incremental(image, checker, mode, io, dry_run,
                                                              result.changes)
        if dry_run:
            return result
    finally:
        image.close()
    after = result.after = check_image(path)
    result.leaks_fixed = max(0, first.leaks - after.leaks)
    result.corruptions_fixed = max(0, first.corruptions + first.check_errors
                                   - after.corruptions - after.check_errors)
    return result


# ---------------------------------------------------------------------------
# What happens to each snapshot
# ---------------------------------------------------------------------------

class _Plan:
    def __init__(self) -> None:
        self.kept: list[SalvagedEntry] = []
        self.verdicts: list[SnapshotVerdict] = []
        self.table_rewrite = False
        self.lost: list[SalvagedEntry] = []       # L1 lost, kept (only --repair leaks)
        self.dropped: list[tuple[SalvagedEntry, str]] = []


def _plan(checker: Checker, mode: RepairMode) -> _Plan:
    """Decide, per snapshot table entry, keep / fix / drop."""
    assert checker.table is not None
    plan = _Plan()
    h = checker.h
    entries = checker.table.entries
    if mode != "all":
        for e in entries:
            l1 = e.effective_l1()
            if e.drop is not None:
                status, detail = "not-a-snapshot", e.drop + "; only --repair all drops it"
            elif e.l1_broken is not None and e.located_l1 is None:
                status, detail = "lost", "; ".join(e.problems) + "; only --repair all drops it"
                plan.lost.append(e)
            elif e.problems:
                status, detail = "damaged", "; ".join(e.problems) + "; --repair all fixes it"
            else:
                status, detail = "ok", ""
            plan.verdicts.append(SnapshotVerdict(
                e.index, e.id, e.name, status, detail,  # type: ignore[arg-type]
                l1[0] if l1 else e.l1_table_offset, l1[1] if l1 else e.l1_size))
            if e.drop is None:
                plan.kept.append(e)
        return plan
    seen: set[bytes] = set()
    survivors = [e for e in entries if e.drop is None
                 and (e.l1_broken is None or e.located_l1 is not None)]
    next_id = _next_id(survivors)
    for e in entries:
        if e.drop is not None:
            plan.dropped.append((e, e.drop))
            plan.verdicts.append(SnapshotVerdict(e.index, e.id, e.name, "dropped", e.drop))
            continue
        if e.l1_broken is not None and e.located_l1 is None:
            why = (f"its L1 table is lost ({e.l1_broken}, and no table matching its leaked "
                   f"clusters was found); the clusters only it referenced are freed")
            plan.dropped.append((e, why))
            plan.verdicts.append(SnapshotVerdict(e.index, e.id, e.name, "dropped", why,
                                                 e.l1_table_offset, e.l1_size))
            continue
        details = list(e.problems)
        if e.located_l1 is not None:
            l1_table_offset, l1_size = e.located_l1
            e.update(l1_table_offset=l1_table_offset, l1_size=l1_size)
            e.l1_broken = None
            e.located_l1 = None
            e.rewrite.append("L1 pointer repaired")
        if e.id_bytes in seen:
            old = e.id
            e.update(id_bytes=str(next_id).encode())
            next_id += 1
            details.append(f"ID {old!r} -> {e.id!r}")
            e.rewrite.append("new ID")
        seen.add(e.id_bytes)
        if e.rewrite:
            e.raw = b""
        status = "fixed" if details or e.rewrite else "ok"
        plan.verdicts.append(SnapshotVerdict(e.index, e.id, e.name, status,  # type: ignore[arg-type]
                                             "; ".join(details), e.l1_table_offset, e.l1_size))
        plan.kept.append(e)
    plan.table_rewrite = not checker.table.unreadable and (
        bool(plan.dropped) or any(e.rewrite for e in plan.kept) or checker.table.overhanging > 0
        or len(plan.kept) != h.nb_snapshots or checker.table.moved_from is not None)
    return plan


def _next_id(entries: list[SalvagedEntry]) -> int:
    """QEMU's ``find_new_snapshot_id``: the largest numeric ID plus one."""
    return (max((snapshot_id_number(e.id_bytes) for e in entries), default=0) + 1) % (1 << 64)


# ---------------------------------------------------------------------------
# Rebuilding the refcount structures (--repair all, when they are damaged)
# ---------------------------------------------------------------------------

def _rebuild_refcounts(image: Qcow2Image, checker: Checker, io: MetadataIO | None,
                       dry_run: bool) -> list[str]:
    """New refcount blocks and table, computed from the references, written
    past everything the image references; one synced write of header bytes
    48-59 switches to them.  A crash before that write leaves the old
    image untouched (plus unreferenced clusters past its end)."""
    h = image.header
    bits = image.cluster_bits
    cs = image.cluster_size
    order = h.refcount_order
    counts = array("Q", checker.ref)
    for c in checker.refcount_structure_refs:
        counts[c] -= 1
    highest = len(counts) - 1
    while highest > 0 and not counts[highest]:
        highest -= 1
    start = max(checker.file_clusters, highest + 1)
    if checker.past_eof:
        top = max(checker.past_eof)
        if top < start + (1 << 24):
            start = max(start, top + 1)
    per_block = refcount_block_entries(bits, order)
    nb, nt = self_describing_refcounts(start, bits, order)
    if nt * cs > fmt.QCOW_MAX_REFTABLE_SIZE:
        raise RefcountOverflowError("the rebuilt refcount table would exceed QEMU's 8 MiB limit",
                                    feature="refcount table size")
    total = nb * per_block
    if len(counts) < total:
        counts.extend(array("Q", bytes(8 * (total - len(counts)))))
    for c in range(start, start + nb + nt):
        counts[c] = 1
    limit = refcount_max(order)
    if max(counts) > limit:
        worst = max(range(len(counts)), key=counts.__getitem__)
        raise RefcountOverflowError(
            f"cluster {worst} has {counts[worst]} references, more than {order}-order "
            f"refcounts can hold ({limit}); widen them with 'qemu-img amend -o "
            f"refcount_bits=16'", feature="refcount width")
    table_offset = (start + nb) << bits
    described = (f"rebuilt the refcount structures ({'; '.join(checker.rebuild_reasons)}): "
                 f"{nb} refcount block(s) at {start << bits:#x} and a {nt}-cluster refcount "
                 f"table at {table_offset:#x}")
    if dry_run:
        return ["would have " + described]
    buf = bytearray()
    for b in range(nb):
        buf += encode_refcount_block(list(counts[b * per_block:(b + 1) * per_block]), order)
    table = [(start + b) << bits for b in range(nb)]
    table += [0] * ((nt * cs) // 8 - len(table))
    buf += encode_u64_table(table)
    # the same commit protocol as every edit: blocks and table written past
    # everything referenced, flushed, then one header write switches to them
    Transaction(image, io or FileIO(image._file.fd)).commit_prebuilt(
        {start << bits: bytes(buf)}, refcount_table_offset=table_offset,
        refcount_table_clusters=nt)
    return [described]


# ---------------------------------------------------------------------------
# Everything else, in one transaction
# ---------------------------------------------------------------------------

def _fixable(f: Finding, mode: RepairMode, fix_leaks: bool, fix_copied: bool) -> bool:
    if f.severity == "info":
        return True
    if f.kind == "leak":
        return fix_leaks
    if f.kind == "copied":
        return fix_copied
    if f.repairable is None:
        return False
    return mode == "all" or f.repairable == "leaks"


def _repair_incremental(image: Qcow2Image, checker: Checker, mode: RepairMode,
                        io: MetadataIO | None, dry_run: bool, changes: list[str]
                        ) -> tuple[CommitResult | None, list[SnapshotVerdict]]:
    h = image.header
    bits = image.cluster_bits
    cs = image.cluster_size
    report = checker.report
    plan = _plan(checker, mode)
    ref = checker.ref
    disk = checker.disk
    past_eof = checker.past_eof
    n = len(ref)

    kept = checker.unreferenced_data

    def referenced(cluster: int) -> bool:
        return (cluster < n and ref[cluster] != 0) or cluster in past_eof or cluster in kept

    txn = _RepairTransaction(image, io or FileIO(image._file.fd), referenced)

    def did(past: str, planned: str) -> str:
        return ("would " + planned) if dry_run else past

    # 1. refcounts
    fix_leaks = not (mode == "leaks" and plan.lost)
    fix_low = mode == "all"
    lowered = raised = 0
    kept_data = 0
    for cluster, d, r in refcount_differences(disk, ref):
        if d > r and cluster in kept:
            # QEMU frees these (and its next allocation overwrites guest
            # data it still reads): keep them until the L2 entry is fixed
            kept_data += 1
        elif d > r and fix_leaks:
            txn.add_refcount(cluster, r - d)
            lowered += 1
        elif d < r and fix_low:
            txn.add_refcount(cluster, r - d)
            raised += 1
    if lowered:
        changes.append(did("lowered", "lower") + f" the refcount of {lowered} leaked cluster(s)")
    if raised:
        changes.append(did("raised", "raise")
                       + f" the refcount of {raised} cluster(s) that were too low")
    if kept_data:
        changes.append(f"kept {kept_data} leaked cluster(s) holding compressed clusters whose "
                       f"L2 entry has a non-zero subcluster bitmap: QEMU reads them")
    if not fix_leaks and report.leaks:
        names = ", ".join(e.label for e in plan.lost)
        changes.append(f"kept {report.leaks} leaked cluster(s): the L1 table of {names} is "
                       f"lost and its data may be among them; --repair all drops the "
                       f"snapshot and frees them")

    # 2. L2 fixes and COPIED flags
    others = [f for f in report.findings if f.severity in ("corruption", "error")
              and f.kind != "copied"]
    fix_copied = mode == "all" or (not others and not report.check_errors)
    # the L1 tables a repair may rewrite: counted ones (an L1 table that
    # runs past the end of the file is left alone, and so are its L2 tables)
    l1s: dict[object, tuple[int, int, array[int]]] = {}
    if h.l1_size and (h.l1_table_offset, h.l1_size) in checker.l1_counted:
        l1s["active"] = (h.l1_table_offset, h.l1_size,
                         array("Q", image.read_l1(image.layer())))
    for e in plan.kept:
        l1 = e.effective_l1()
        if l1 is not None and l1[1] and e.l1_broken is None and l1 in checker.l1_counted:
            l1s[e.index] = (l1[0], l1[1], decode_u64_table(image.pread(l1[0], l1[1] * 8)))
    editable = {(offset, size) for offset, size, _ in l1s.values()}
    frozen: set[int] = set()
    for _, offset, size in checker.l1_tables:
        if (offset, size) not in editable:
            table = decode_u64_table(image.pread(offset, size * 8))
            frozen.update(e & fmt.L1E_OFFSET_MASK for e in compress(table, table))
    referrers: dict[int, list[tuple[object, int]]] = {}
    for key, (_, _, entries) in l1s.items():
        for i, entry in enumerate(entries):
            off = entry & fmt.L1E_OFFSET_MASK
            if off and not off & (cs - 1) and off not in frozen:
                referrers.setdefault(off, []).append((key, i))
    changed_l1: set[object] = set()
    cleared = 0
    if mode == "all":   # L1 entries with flags but no offset become plain zeros
        for key, (_, _, entries) in l1s.items():
            for i in compress(range(len(entries)), entries):
                if not entries[i] & fmt.L1E_OFFSET_MASK:
                    entries[i] = 0
                    changed_l1.add(key)
                    cleared += 1
    if cleared:
        changes.append(did("cleared", "clear") + f" {cleared} L1 entr"
                       f"{'y' if cleared == 1 else 'ies'} without an L2 table offset")
    new_l2: dict[int, array[int]] = {}
    fixed_entries = 0
    if mode == "all":
        for l2, refs in referrers.items():
            info = checker._l2_info.get(l2)
            if info is None or not info.fixes:
                continue
            step2 = 2 if image.extended_l2 else 1
            content = array("Q", image.read_l2(l2))
            for j, value in info.fixes.items():
                old_entry = content[j * step2]
                content[j * step2] = value
                fixed_entries += 1
                host = old_entry & fmt.L2E_OFFSET_MASK
                if (host & (cs - 1) and not old_entry & fmt.QCOW_OFLAG_COMPRESSED
                        and host < checker.file_size):   # (past the end: never counted)
                    # a misaligned preallocation made a plain zero cluster: its
                    # references go away
                    for c in ((host >> bits), (host >> bits) + 1):
                        txn.add_refcount(c, -len(refs))
                if image.extended_l2 and not old_entry & fmt.QCOW_OFLAG_COMPRESSED:
                    content[j * step2 + 1] = fmt.QCOW_L2_BITMAP_ALL_ZEROES
            new_l2[l2] = content
        if fixed_entries:
            entries_word = "entry" if fixed_entries == 1 else "entries"
            changes.append(did("fixed", "fix") + f" {fixed_entries} L2 {entries_word} "
                           f"(COPIED on compressed clusters, misaligned preallocations)")
    copied_fixes = 0
    if fix_copied and "active" in l1s:
        copied_flag = fmt.QCOW_OFLAG_COPIED
        not_copied = ~copied_flag & ((1 << 64) - 1)
        step2 = 2 if image.extended_l2 else 1
        mask = fmt.L2E_OFFSET_MASK
        compressed = fmt.QCOW_OFLAG_COMPRESSED
        active_entries = l1s["active"][2]
        for index in range(len(active_entries)):
            l2 = active_entries[index] & fmt.L1E_OFFSET_MASK
            if not l2 or l2 & (cs - 1) or l2 not in referrers or (l2 >> bits) in past_eof:
                continue
            l2_content: array[int] | None = new_l2.get(l2)
            table = l2_content if l2_content is not None else image.read_l2(l2)
            l2_entries = table[0::step2] if step2 == 2 else table
            live = [j for j in range(len(l2_entries)) if l2_entries[j]]
            hosts = [(l2_entries[j] & mask) >> bits if not l2_entries[j] & compressed else 0
                     for j in live]
            counts = iter(txn.refcounts_of([hc for hc in hosts if hc]))
            edits = []
            for j, hc in zip(live, hosts, strict=True):
                value = l2_entries[j]
                want = value & not_copied
                data_file_cluster = (image.has_data_file and bool(hc or value & copied_flag)
                                     and not value & fmt.QCOW_OFLAG_ZERO)
                if (hc and next(counts) == 1 and not image.has_data_file) or data_file_cluster:
                    want |= copied_flag
                if want != value:
                    edits.append((j * step2, want))
            if edits:
                if l2_content is None:
                    l2_content = array("Q", table)
                    new_l2[l2] = l2_content
                for pos, new_value in edits:
                    l2_content[pos] = new_value
                copied_fixes += len(edits)
    # move every changed L2 table to a new cluster; repoint all its L1 entries
    for old, content in new_l2.items():
        refs = referrers[old]
        new = txn.allocate(cs)
        txn.add_refcount(new >> bits, len(refs) - 1)
        txn.add_refcount(old >> bits, -len(refs))
        txn.write_new(new, encode_u64_table(content))
        for key, i in refs:
            entries = l1s[key][2]
            entries[i] = (entries[i] & ~fmt.L1E_OFFSET_MASK) | new
            changed_l1.add(key)
    if fix_copied and "active" in l1s:
        active_entries = l1s["active"][2]
        offsets = [(i, active_entries[i] & fmt.L1E_OFFSET_MASK)
                   for i in range(len(active_entries))]
        offsets = [(i, o) for i, o in offsets if o and not o & (cs - 1)
                   and (o >> bits) not in past_eof]
        counts_l2 = txn.refcounts_of([o >> bits for _, o in offsets])
        for (i, _), count in zip(offsets, counts_l2, strict=True):
            entry = active_entries[i]
            want = (entry & ~fmt.QCOW_OFLAG_COPIED) | (fmt.QCOW_OFLAG_COPIED if count == 1 else 0)
            if want != entry:
                active_entries[i] = want
                changed_l1.add("active")
                copied_fixes += 1
    if copied_fixes:
        changes.append(did("fixed", "fix") + f" {copied_fixes} COPIED flag(s) of the active layer")
    if new_l2:
        changes.append(did("copied", "copy") + f" {len(new_l2)} L2 table(s) whose entries changed")

    # 3. L1 tables that changed go to new clusters
    by_index = {e.index: e for e in plan.kept}
    for key in sorted(changed_l1, key=str):
        offset, size, entries = l1s[key]
        new = txn.allocate(size * 8)
        txn.write_new(new, encode_u64_table(entries))
        txn.add_refcounts(txn.clusters_of(offset, size * 8), -1)
        if key == "active":
            txn.set_header(l1_table_offset=new)
            changes.append(did("rewrote", "rewrite") + f" the active L1 table (at {new:#x})")
        else:
            e = by_index[key]  # type: ignore[index]
            e.update(l1_table_offset=new)
            e.rewrite.append("L1 table copied")
            e.raw = b""
            plan.table_rewrite = True
            for v in plan.verdicts:
                if v.index == e.index:
                    v.l1_table_offset = new
                    if v.status == "ok":
                        v.status = "fixed"
                        v.detail = ("its L1 table was rewritten (a shared L2 table was copied "
                                    "or an entry without an L2 offset cleared); its data is "
                                    "unchanged")

    # 4. the snapshot table
    if mode == "all" and plan.table_rewrite:
        out = bytearray()
        for e in plan.kept:
            out += bytes(fmt.align_up(len(out), 8) - len(out))
            out += e.to_bytes()
        if len(out) > fmt.QCOW_MAX_SNAPSHOTS_SIZE:  # pragma: no cover - entries were capped
            raise RefcountOverflowError("the snapshot table would exceed 64 MiB",
                                        feature="snapshot table size")
        new_offset = 0
        if plan.kept:
            new_offset = txn.allocate(len(out))
            txn.write_new(new_offset, bytes(out))
        if checker.table_counted is not None:
            txn.add_refcounts(txn.clusters_of(*checker.table_counted), -1)
        txn.set_header(nb_snapshots=len(plan.kept), snapshots_offset=new_offset)
        fixed = sum(1 for v in plan.verdicts if v.status == "fixed")
        dropped = [v for v in plan.verdicts if v.status == "dropped"]
        overhang = checker.table.overhanging if checker.table else 0
        gone = len(dropped) + overhang
        line = (did("rewrote", "rewrite") + f" the snapshot table: {len(plan.kept)} snapshot(s) "
                f"kept ({fixed} fixed), {gone} entr{'y' if gone == 1 else 'ies'} dropped")
        if dropped:
            line += ": " + ", ".join(f"entry {v.index} ID {v.id!r} name {v.name!r}"
                                     for v in dropped[:20])
        if overhang:
            line += f" (+{overhang} overhanging entries past QEMU's limits)"
        changes.append(line)

    # 5. dirty / corrupt bits
    fixable_all = (not checker.unlisted_l2_findings
                   and all(_fixable(f, mode, fix_leaks, fix_copied) for f in report.findings))
    bits_set = h.incompatible_features & (fmt.QCOW2_INCOMPAT_DIRTY | fmt.QCOW2_INCOMPAT_CORRUPT)
    if fixable_all and bits_set and h.version >= 3:
        txn.set_header(incompatible_features=h.incompatible_features & ~bits_set)
        changes.append(did("cleared", "clear") + " the " + " and ".join(
            name for bit, name in ((fmt.QCOW2_INCOMPAT_DIRTY, "dirty"),
                                   (fmt.QCOW2_INCOMPAT_CORRUPT, "corrupt"))
            if bits_set & bit) + " bit")

    negative = [c for c in txn.delta if txn.refcount(c) < 0]
    if negative:   # pragma: no cover - the plan releases only what it counted
        raise CheckFailedError(
            f"{image.path}: the repair plan would make the refcount of cluster {negative[0]} "
            f"negative; nothing was written (please report this image)")
    if not (txn.delta or txn.new_data or txn.header_fields):
        changes.append("nothing to repair" if report.clean else
                       "nothing could be repaired in this mode")
        return None, plan.verdicts
    return txn.commit(dry_run=dry_run), plan.verdicts

