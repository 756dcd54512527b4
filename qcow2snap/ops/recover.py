"""Snapshots recovered from lost tables (operations layer, read-only).

After a check (:class:`~qcow2snap.ops.check.Checker`), the clusters no live
structure references are where lost structures can still be:

* **stale snapshot tables**: a cluster whose start parses as one or more
  plausible snapshot table entries (salvage's rules,
  :func:`~qcow2snap.ops.salvage.salvage_snapshot_table_at`; entries are
  taken while they parse cleanly: printable ID, text name, L1 table inside
  the file);
* **orphaned L1 tables**: an L1-looking table (aligned entries inside the
  file, each pointing at an L2 table whose entries are all valid) that no
  live structure and no recovered table entry points at; it continues into
  the next free clusters (while they look like parts of it) when the live
  L1 table spans several clusters (512-byte clusters).

Each candidate's reliability is judged cluster by cluster: an L2 table or a
data cluster of the candidate that a live structure references now is
*reused* (its bytes may have been rewritten since), unless a live layer
maps that very cluster at the same guest position without the COPIED flag
(QEMU copies such a cluster before writing: it is shared, not reused;
the live entry may have gained the zero flag, QEMU keeps the cluster).
A compressed cluster is judged by its bytes, since one host cluster packs
several compressed clusters: when every live reference to its host
clusters is itself a compressed cluster (their refcount is the number of
live compressed entries touching them; the check's scan of the live L2
tables is reused, only those holding compressed clusters are read again,
and only the candidates' host clusters are remembered), none of those live
clusters' bytes overlaps the candidate's and the candidate's bytes still
decompress to exactly one cluster, it is not reused; otherwise it is.
QEMU packs compressed clusters byte by byte and rounds each one's size up
to its last 512-byte sector, so neighbours' nominal ranges share a sector:
the candidate's bytes end where the next live one starts, a live one
starting before it must decompress from the bytes before it, and a
zeroed or discarded range fails to decompress.
A candidate with any reused range is never reported intact.

Nothing is written; :mod:`qcow2snap.ops.recover_apply` re-creates the entries.
"""

from __future__ import annotations

from array import array
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from .. import format as fmt
from ..errors import Qcow2Error
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import Layer, decompress_cluster
from ..refcount import compressed_extent, l2_entry_references
from ..tables import decode_u64_table
from .check import Checker
from .salvage import _plausible_id, _plausible_name, salvage_snapshot_table_at

__all__ = ["RecoveredSnapshot", "RecoveryReport", "ReusedRange", "find_lost_snapshots",
           "recover_report"]

Progress = Callable[[int, int], None]

#: unreferenced clusters looked at (each costs at most a cluster read)
MAX_CANDIDATE_CLUSTERS = 1 << 16
#: entries tried per stale table
MAX_ENTRIES_PER_TABLE = 1024
#: bytes the search may read (tables, L2 tables), all candidates together
READ_BUDGET = 256 << 20
#: candidates reported
MAX_CANDIDATES = 4096
#: compressed clusters judged by their bytes (beyond: judged by host cluster)
MAX_COMPRESSED_JUDGED = 1 << 18


@dataclass(frozen=True, slots=True)
class ReusedRange:
    """A guest range of a candidate whose metadata or data cluster a live
    structure references now."""

    guest_offset: int
    length: int
    what: Literal["L2 table", "data cluster"]
    host_offset: int


@dataclass(frozen=True, slots=True)
class RecoveredSnapshot:
    """One snapshot found outside the live metadata."""

    source: Literal["stale-table", "orphan-l1"]
    #: the stale table's offset, or the orphaned L1 table's offset
    source_offset: int
    #: entry index in the stale table (None for an orphaned L1)
    entry_index: int | None
    #: the entry as recovered; for an orphaned L1 a generated entry
    #: (ID empty, name ``recovered-N``, disk size the L1 implies)
    snapshot: Snapshot
    reused: tuple[ReusedRange, ...] = ()
    #: clusters shared with a live layer at the same guest position (unchanged)
    shared_clusters: int = 0
    problems: tuple[str, ...] = ()
    #: L2 tables and data clusters whose stored refcount is 0: not reused,
    #: but free (QEMU may have discarded their bytes when it freed them)
    freed_clusters: int = 0
    #: its L1 table is the L1 table of a live layer (a copy of a live entry)
    live_duplicate: bool = False

    @property
    def reliable(self) -> bool:
        return not self.reused and not self.problems

    @property
    def layer(self) -> Layer:
        """The candidate's mapping, to read it (``DiskReader(image, layer)``)."""
        sn = self.snapshot
        return Layer(sn.l1_table_offset, sn.l1_size,
                     sn.disk_size & ~(fmt.BDRV_SECTOR_SIZE - 1), sn)

    @property
    def label(self) -> str:
        if self.source == "stale-table":
            return (f"stale table at {self.source_offset:#x} entry {self.entry_index}: "
                    f"snapshot {self.snapshot.id} ({self.snapshot.name})")
        return f"orphan L1 at {self.source_offset:#x}: {self.snapshot.name}"


@dataclass
class RecoveryReport:
    filename: str
    candidates: list[RecoveredSnapshot] = field(default_factory=list)
    #: unreferenced clusters in the file, and how many were looked at
    unreferenced_clusters: int = 0
    scanned_clusters: int = 0
    #: the search stopped at a bound (clusters, reads or candidates)
    truncated: bool = False


class _Live:
    """The live layers' mappings, read lazily, to tell shared clusters from
    reused ones."""

    def __init__(self, image: Qcow2Image, l1_tables: list[tuple[int, int]]) -> None:
        self.image = image
        self.tables = set(l1_tables)
        self.l1s: list[array[int]] = []
        for offset, size in l1_tables:
            if 0 < size <= fmt.QCOW_MAX_L1_SIZE // 8 and offset + size * 8 <= image.file_size:
                self.l1s.append(decode_u64_table(image.pread(offset, size * 8)))

    def shares_l2(self, index: int, l2: int) -> bool:
        return any(index < len(l1) and l1[index] & fmt.L1E_OFFSET_MASK == l2
                   and not l1[index] & fmt.QCOW_OFLAG_COPIED for l1 in self.l1s)

    def shares_data(self, index: int, slot: int, entry: int) -> bool:
        """A live layer maps the cluster of ``entry`` at the same guest
        position without COPIED: the identical compressed entry, or a
        standard entry with the same host offset (perhaps now with the zero
        flag: QEMU keeps the cluster and copies it before writing)."""
        stride = 2 if self.image.extended_l2 else 1
        compressed = fmt.QCOW_OFLAG_COMPRESSED
        for l1 in self.l1s:
            if index >= len(l1):
                continue
            l2 = l1[index] & fmt.L1E_OFFSET_MASK
            if not l2 or l2 & (self.image.cluster_size - 1) or l2 >= self.image.file_size:
                continue
            live = self.image.read_l2(l2)[slot * stride]
            if live & fmt.QCOW_OFLAG_COPIED:
                continue
            if entry & compressed:
                if live == entry & ~fmt.QCOW_OFLAG_COPIED:
                    return True
            elif not live & compressed and \
                    live & fmt.L2E_OFFSET_MASK == entry & fmt.L2E_OFFSET_MASK:
                return True
        return False

    def compressed_refs(self, checker: Checker, interest: set[int]
                        ) -> tuple[Counter[int], dict[int, set[tuple[int, int]]]]:
        """For the host clusters in ``interest``: how many live references
        are compressed clusters (counted as the check counts them: once per
        path to their L2 table), and the byte ranges those occupy.  Only the
        walked L2 tables holding compressed clusters are read again."""
        image = self.image
        bits = image.cluster_bits
        cs = image.cluster_size
        counts: Counter[int] = Counter()
        ranges: dict[int, set[tuple[int, int]]] = defaultdict(set)
        walked = checker.walked_l2()
        paths: Counter[int] = Counter()
        for l1 in self.l1s:
            for entry in l1:
                l2 = entry & fmt.L1E_OFFSET_MASK
                if l2 in walked:
                    paths[l2] += 1
        if not interest or image.has_data_file:
            return counts, ranges
        ext = image.extended_l2
        for l2, info in walked.items():
            if not info.compressed or not paths[l2]:
                continue
            table = image.read_l2(l2)
            entries = table[0::2] if ext else table
            for j, e in enumerate(entries):
                if not e & fmt.QCOW_OFLAG_COMPRESSED or (ext and table[2 * j + 1]):
                    continue     # (the check counts no compressed cluster with a bitmap)
                off, length = compressed_extent(image, e)
                if off + length - image.file_size >= cs:
                    continue
                for h in range(off >> bits, ((off + length - 1) >> bits) + 1):
                    if h in interest:
                        counts[h] += paths[l2]
                        ranges[h].add((off, off + length))
        return counts, ranges


def find_lost_snapshots(image: Qcow2Image, progress: Progress | None = None, *,
                        checker: Checker | None = None) -> RecoveryReport:
    """Search ``image`` (opened read-only, ``check_mode=True`` for a damaged
    table) for snapshots outside its live metadata; nothing is written.
    ``checker``: a :class:`Checker` already run on ``image`` (its references
    are used instead of checking again)."""
    if checker is None:
        checker = Checker(image, progress=progress)
        checker.run()
    bits = image.cluster_bits
    ref = checker.ref
    file_clusters = checker.file_clusters
    report = RecoveryReport(filename=image.path)
    unreferenced = [c for c in range(1, file_clusters) if ref[c] == 0]
    report.unreferenced_clusters = len(unreferenced)
    if len(unreferenced) > MAX_CANDIDATE_CLUSTERS:
        report.truncated = True
        unreferenced = unreferenced[:MAX_CANDIDATE_CLUSTERS]
    budget = [READ_BUDGET]
    live_l1 = [(off, size) for _label, off, size in checker.l1_tables]
    live = _Live(image, live_l1)
    # compressed clusters whose host clusters a live structure references,
    # judged by their bytes once every candidate is in: (candidate, guest, entry)
    pending: list[tuple[int, int, int]] = []
    # (a) stale snapshot tables
    claimed_l1: set[int] = set()   # L1 tables a recovered entry points at
    l1_clusters: set[int] = set()  # ... and every cluster of them (and of orphans found)
    table_clusters: set[int] = set()
    for c in unreferenced:
        if budget[0] <= 0 or len(report.candidates) >= MAX_CANDIDATES:
            report.truncated = True
            break
        report.scanned_clusters += 1
        if c in table_clusters:
            continue
        offset = c << bits
        budget[0] -= 64
        if not _entry_start_plausible(image, offset):
            continue
        entries = _stale_entries(image, offset, budget)
        if not entries:
            continue
        end = max(e.entry_offset for e in entries) + 1
        table_clusters.update(range(c, ((end - 1) >> bits) + 1))
        for sn in entries:
            claimed_l1.add(sn.l1_table_offset)
            l1_clusters.update(range(sn.l1_table_offset >> bits,
                                     ((sn.l1_table_offset + max(sn.l1_size * 8, 1) - 1) >> bits)
                                     + 1))
            report.candidates.append(_judge(image, ref, checker.disk, live, "stale-table", offset,
                                            sn.index, sn, budget, pending))
            _own(pending, len(report.candidates) - 1)
    # (b) orphaned L1 tables
    number = 0
    for c in unreferenced:
        if budget[0] <= 0 or len(report.candidates) >= MAX_CANDIDATES:
            report.truncated = True
            break
        offset = c << bits
        if c in table_clusters or offset in claimed_l1 or c in l1_clusters:
            continue
        # an L1 table spans several clusters when the live one does
        # (512-byte clusters): continue into free clusters that look like one
        span = max(1, (image.header.l1_size * 8 + image.cluster_size - 1) >> bits)
        found = _orphan_l1(image, ref, offset, budget, range(c + 1, c + span),
                           lambda k: k < len(ref) and not ref[k] and k not in table_clusters)
        if found is None:
            continue
        number += 1
        size = found
        l1_clusters.update(range(c, ((offset + size * 8 - 1) >> bits) + 1))
        disk_size = size << (bits + image.l2_bits)
        sn = Snapshot(
            index=number - 1, id_bytes=b"", name_bytes=f"recovered-{number}".encode(),
            l1_table_offset=offset, l1_size=size, date_sec=0, date_nsec=0, vm_clock_nsec=0,
            vm_state_size_field=0, extra_data_size=0, vm_state_size_large_field=None,
            disk_size_field=None, icount_field=None, unknown_extra=b"", entry_offset=0,
            disk_size=disk_size)
        report.candidates.append(_judge(image, ref, checker.disk, live, "orphan-l1", offset,
                                        None, sn, budget, pending))
        _own(pending, len(report.candidates) - 1)
    _judge_compressed(image, checker, live, report, pending, budget)
    return report


def _own(pending: list[tuple[int, int, int]], index: int) -> None:
    """The pending compressed clusters just added are candidate ``index``'s."""
    k = len(pending) - 1
    while k >= 0 and pending[k][0] < 0:
        pending[k] = (index, pending[k][1], pending[k][2])
        k -= 1


def _entry_start_plausible(image: Qcow2Image, offset: int) -> bool:
    """A cheap look at the first entry's fixed part and ID."""
    if offset + 40 > image.file_size:
        return False
    hh = fmt.unpack_snapshot_header(image.pread(offset, 40))
    if not _fields_plausible(image, hh):
        return False
    id_raw = image.pread(offset + 40 + hh.extra_data_size, hh.id_str_size)
    return _plausible_id(id_raw)


def _fields_plausible(image: Qcow2Image, hh: fmt.SnapshotHeaderFields) -> bool:
    cs = image.cluster_size
    if hh.l1_table_offset & (cs - 1) or not hh.l1_table_offset:
        return False
    if hh.l1_size > fmt.QCOW_MAX_L1_SIZE // 8:
        return False
    if hh.l1_table_offset + hh.l1_size * 8 > image.file_size:
        return False
    if hh.extra_data_size > fmt.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
        return False
    return not (image.header.version >= 3 and hh.extra_data_size < 16)


def _stale_entries(image: Qcow2Image, offset: int, budget: list[int]) -> list[Snapshot]:
    """The clean prefix of the table at ``offset``, trying increasing entry
    counts until an entry stops being plausible."""
    good: list[Snapshot] = []
    n = 1
    while n <= MAX_ENTRIES_PER_TABLE:
        table = salvage_snapshot_table_at(image, offset, n)
        budget[0] -= 1024
        if len(table.entries) < n:
            break
        e = table.entries[n - 1]
        if e.drop is not None or e.problems or e.rewrite:
            break
        sn = e.snapshot
        hh = fmt.unpack_snapshot_header(image.pread(sn.entry_offset, 40))
        if (not _fields_plausible(image, hh) or not _plausible_id(sn.id_bytes)
                or not _plausible_name(sn.name_bytes)):
            break
        if sn.disk_size <= 0 or sn.disk_size % fmt.BDRV_SECTOR_SIZE:
            break
        if image.size_to_l1(sn.disk_size) > sn.l1_size and sn.l1_size == 0:
            break
        good.append(sn)
        n += 1
        if budget[0] <= 0:
            break
    return good


def _orphan_l1(image: Qcow2Image, ref: array[int], offset: int, budget: list[int],
               more: range = range(0), free: Callable[[int], bool] = bool) -> int | None:
    """The entry count of an L1-looking table at ``offset`` (its last
    non-zero entry bounds it), or None.  ``more``: the clusters that may
    continue it, in order, while each is ``free`` and a non-empty valid part."""
    bits = image.cluster_bits
    first = _l1_part(image, offset, budget)
    if first is None:
        return None
    last = max((i for i, entry in enumerate(first) if entry), default=-1)
    if last < 0:
        return None
    for n, k in enumerate(more, 1):
        if budget[0] <= 0 or not free(k):
            break
        part = _l1_part(image, k << bits, budget)
        if part is None or not any(part):
            break
        last = n * len(first) + max(i for i, entry in enumerate(part) if entry)
    return last + 1


def _l1_part(image: Qcow2Image, offset: int, budget: list[int]) -> array[int] | None:
    """One cluster of an L1-looking table: every entry zero or pointing at
    a valid L2 table (not this cluster), or None."""
    cs = image.cluster_size
    budget[0] -= cs
    table = decode_u64_table(image.pread(offset, cs))
    for entry in table:
        if entry == 0:
            continue
        if entry & fmt.L1E_RESERVED_MASK:
            return None
        l2 = entry & fmt.L1E_OFFSET_MASK
        if not l2 or l2 & (cs - 1) or l2 + cs > image.file_size or l2 == offset:
            return None
    for entry in table:
        l2 = entry & fmt.L1E_OFFSET_MASK
        if not l2:
            continue
        budget[0] -= cs
        if budget[0] < 0 or not _l2_valid(image, l2):
            return None
    return table


def _l2_valid(image: Qcow2Image, l2: int) -> bool:
    """Every entry of the table at ``l2`` is a valid L2 entry inside the
    file (and at least one is allocated)."""
    cs = image.cluster_size
    stride = 2 if image.extended_l2 else 1
    table = image.read_l2(l2)
    any_data = False
    for k in range(0, len(table), stride):
        entry = table[k]
        if entry == 0:
            continue
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            if entry & fmt.QCOW_OFLAG_COPIED:
                return False
            if (entry & image.cluster_offset_mask) >= image.file_size:
                return False
            any_data = True
            continue
        if entry & fmt.L2E_STD_RESERVED_MASK:
            return False
        host = entry & fmt.L2E_OFFSET_MASK
        if host & (cs - 1) or host + cs > image.file_size + cs - 1:
            return False
        if host:
            any_data = True
        elif not entry & fmt.QCOW_OFLAG_ZERO and not image.extended_l2:
            return False
    return any_data


def _judge(image: Qcow2Image, ref: array[int], disk: array[int], live: _Live,
           source: Literal["stale-table", "orphan-l1"], source_offset: int,
           entry_index: int | None, sn: Snapshot, budget: list[int],
           pending: list[tuple[int, int, int]] | None = None) -> RecoveredSnapshot:
    """Which guest ranges of the candidate a live structure uses now.
    Compressed clusters in referenced host clusters go to ``pending``
    (:func:`_judge_compressed` decides), while it has room."""
    cs = image.cluster_size
    bits = image.cluster_bits
    l2_span = image.l2_entries << bits
    stride = 2 if image.extended_l2 else 1
    problems: list[str] = []
    reused: list[ReusedRange] = []
    shared = 0

    def referenced(cluster: int) -> bool:
        return cluster < len(ref) and ref[cluster] > 0

    def free(cluster: int) -> bool:
        return cluster >= len(disk) or disk[cluster] == 0

    freed = 0

    size = sn.l1_size
    if size > fmt.QCOW_MAX_L1_SIZE // 8 or sn.l1_table_offset + size * 8 > image.file_size:
        return RecoveredSnapshot(source, source_offset, entry_index, sn,
                                 problems=("L1 table lies outside the file",))
    l1 = decode_u64_table(image.pread(sn.l1_table_offset, size * 8))
    duplicate = (sn.l1_table_offset, size) in live.tables
    first_l1 = sn.l1_table_offset >> bits
    for c in range(first_l1, ((sn.l1_table_offset + max(size * 8, 1) - 1) >> bits) + 1):
        if referenced(c) and not duplicate:
            problems.append(f"its L1 table at {c << bits:#x} is referenced by a live structure")
    if size and not any(l1):
        problems.append(f"its L1 table at {sn.l1_table_offset:#x} is empty: discarded, "
                        f"or the snapshot was empty")
    for i, l1e in enumerate(l1):
        l2 = l1e & fmt.L1E_OFFSET_MASK
        if not l2:
            continue
        guest = i * l2_span
        if l1e & fmt.L1E_RESERVED_MASK or l2 & (cs - 1) or l2 + cs > image.file_size:
            problems.append(f"L1 entry {i} is invalid ({l1e:#x})")
            continue
        if referenced(l2 >> bits):
            if live.shares_l2(i, l2):
                shared += 1
                continue
            reused.append(ReusedRange(guest, l2_span, "L2 table", l2))
            continue
        budget[0] -= cs
        if budget[0] < 0:
            problems.append("read budget exhausted before every L2 table was judged")
            break
        table = image.read_l2(l2)
        if free(l2 >> bits):
            freed += 1
        if not any(table):
            problems.append(f"its L2 table at {l2:#x} (guest {guest:#x}) is empty: "
                            f"discarded or never written")
            continue
        for slot in range(len(table) // stride):
            entry = table[slot * stride]
            if not entry & ~fmt.QCOW_OFLAG_COPIED:
                continue
            hosts = l2_entry_references(image, entry)
            if not any(referenced(h) for h in hosts):
                freed += any(free(h) for h in hosts)
                continue
            if live.shares_data(i, slot, entry):
                shared += 1
                continue
            if (pending is not None and entry & fmt.QCOW_OFLAG_COMPRESSED
                    and len(pending) < MAX_COMPRESSED_JUDGED):
                pending.append((-1, guest + (slot << bits), entry))
                continue
            reused.append(ReusedRange(guest + (slot << bits), cs, "data cluster",
                                      hosts[0] << bits if hosts else 0))
    return RecoveredSnapshot(source, source_offset, entry_index, sn, tuple(_merge(reused)),
                             shared, tuple(problems), freed, duplicate)


def _judge_compressed(image: Qcow2Image, checker: Checker, live: _Live,
                      report: RecoveryReport, pending: list[tuple[int, int, int]],
                      budget: list[int]) -> None:
    """Judge the pending compressed clusters by their bytes (the module's
    rule); a reused one adds a reused range (and a problem saying why) to
    its candidate."""
    if not pending:
        return
    bits = image.cluster_bits
    cs = image.cluster_size
    ref = checker.ref
    interest = {h for _c, _g, e in pending for h in l2_entry_references(image, e)
                if h < len(ref) and ref[h]}
    counts, ranges = live.compressed_refs(checker, interest)
    extra: dict[int, tuple[list[ReusedRange], list[str]]] = defaultdict(lambda: ([], []))
    for ci, guest, entry in pending:
        off, length = compressed_extent(image, entry)
        hosts = [h for h in l2_entry_references(image, entry) if h < len(ref) and ref[h]]
        problem = None
        end = off + length
        near = {(lo, hi) for h in hosts for lo, hi in ranges[h] if lo < end and off < hi}
        # QEMU packs compressed clusters byte by byte and rounds each one's
        # size up to a sector: a neighbour's range may share a sector with
        # this one's.  Its bytes end before the first live one starting
        # after it, and a live one starting before it must inflate from the
        # bytes before it.
        cut = min([lo for lo, _hi in near if lo > off], default=end)
        before = [(lo, hi) for lo, hi in near if lo <= off]
        if any(ref[h] != counts[h] for h in hosts):
            pass     # another kind of structure uses a host cluster
        elif budget[0] < length * (1 + len(before)):
            problem = (f"compressed cluster at {off:#x} (guest {guest:#x}): read budget "
                       f"exhausted before it was judged")
        elif any(lo == off or not _inflates(image, lo, off - lo, budget) for lo, _ in before):
            problem = (f"compressed cluster at {off:#x} (guest {guest:#x}) overlaps a live "
                       f"compressed cluster")
        else:
            budget[0] -= cut - off
            try:
                decompress_cluster(image.pread(off, cut - off),
                                   image.header.effective_compression_type, cs, off)
                continue     # its own bytes: intact beside live compressed clusters
            except Qcow2Error as exc:
                problem = (f"compressed cluster at {off:#x} (guest {guest:#x}) shares its "
                           f"host cluster with live compressed clusters and its bytes "
                           f"(to {cut:#x}) do not hold it: {exc}")
        rr, probs = extra[ci]
        rr.append(ReusedRange(guest, cs, "data cluster", (hosts[0] if hosts else off >> bits)
                              << bits))
        if problem:
            probs.append(problem)
    for ci, (rr, probs) in extra.items():
        c = report.candidates[ci]
        ranges_all = sorted([*c.reused, *rr], key=lambda r: (r.guest_offset, r.what))
        report.candidates[ci] = replace(c, reused=tuple(_merge(ranges_all)),
                                        problems=c.problems + tuple(probs[:8]))


def _inflates(image: Qcow2Image, offset: int, length: int, budget: list[int]) -> bool:
    """The ``length`` bytes at ``offset`` decompress to exactly one cluster."""
    budget[0] -= length
    try:
        decompress_cluster(image.pread(offset, length), image.header.effective_compression_type,
                           image.cluster_size, offset)
    except Qcow2Error:
        return False
    return True


def _merge(ranges: list[ReusedRange]) -> list[ReusedRange]:
    out: list[ReusedRange] = []
    for r in ranges:
        if out:
            p = out[-1]
            if (p.what == r.what == "data cluster" and p.guest_offset + p.length == r.guest_offset
                    and p.host_offset + p.length == r.host_offset):
                out[-1] = ReusedRange(p.guest_offset, p.length + r.length, p.what, p.host_offset)
                continue
        out.append(r)
    return out


def recover_report(path: str, *, progress: Progress | None = None) -> RecoveryReport:
    """Open ``path`` read-only (check mode) and search it for lost snapshots."""
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        return find_lost_snapshots(image, progress=progress)
    finally:
        image.close()
