"""Consistency check of a qcow2 image (operations layer), QEMU's
``qemu-img check`` rules with a salvaging reader of the snapshot table.

:func:`check_image` recomputes every reference the way QEMU's
``qcow2_check_refcounts`` does (reference §3.2, §7.2): the header cluster,
the refcount table and blocks, the active L1 table, every snapshot's L1
table, each L2 table once *per path* (an L2 shared by k L1 tables gives its
data clusters k references), compressed clusters +1 per touched host
cluster, the snapshot table's exact byte range, the LUKS header and the
persistent-bitmap structures.  Tables are decoded in bulk
(:mod:`qcow2snap.tables`) and counts are kept in one ``array`` indexed by
host cluster, so memory is one machine word per host cluster and time is
one pass over the metadata.

What is reported (each a :class:`Finding`): refcounts too high (leaks) and
too low, misaligned tables and data clusters, reserved bits, references
past the end of the file, metadata structures that overlap, COPIED flags of
the active layer (set iff refcount == 1), and snapshot-table problems (too
much extra data, a table over 64 MiB, more than 65536 entries, incomplete v3
entries, bad L1 offsets and sizes, IDs and names running off the table,
duplicate IDs, entries past the end of the table).

The snapshot table is read by :func:`salvage_snapshot_table`, which keeps
going where QEMU's reader stops: an implausible ``extra_data_size`` is
replaced by the size at which the entry's ID and name (and the next entry)
make sense, a name that runs past the table is cut back to where it really
ends, and a snapshot whose L1 pointer is broken gets its L1 table searched
among the leaked clusters (:meth:`Checker.locate_l1`).

Counting follows QEMU so the numbers agree with ``qemu-img check``; the exit
status does too (0 clean, 2 corruptions, 3 leaks only, 1 the check could not
be completed -- which QEMU also says when it cannot read the snapshot table
without ``-r all``; qcow2snap still reports everything else it found).

Repair lives in :mod:`qcow2snap.ops.repair`.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import reduce
from itertools import compress, islice, repeat
from operator import and_, or_, rshift, sub
from typing import Literal

from .. import format as fmt
from ..errors import Qcow2Error
from ..image import Qcow2Image
from ..tables import decode_refcount_block, decode_u64_table, refcount_block_entries

__all__ = [
    "MAX_FINDINGS_PER_KIND",
    "CheckReport",
    "Checker",
    "Finding",
    "SalvagedEntry",
    "Severity",
    "SnapshotVerdict",
    "VerdictStatus",
    "check_image",
    "refcount_differences",
    "salvage_snapshot_table",
]

Severity = Literal["leak", "corruption", "error", "info"]
VerdictStatus = Literal["ok", "damaged", "lost", "not-a-snapshot", "fixed", "dropped"]
Progress = Callable[[int, int], None]

#: Findings stored per kind (all are counted); a damaged 1 TiB image must
#: not produce a million objects.
MAX_FINDINGS_PER_KIND = 1000


class CheckFailedError(Qcow2Error):
    """The image could not be checked at all (its header, active L1 or
    refcount table location is unusable: QEMU cannot open it either)."""

    exit_code = 1


__all__ += ["CheckFailedError"]


@dataclass(frozen=True)
class Finding:
    """One problem.  ``severity`` says how it is counted (as qemu-img check
    counts it): ``leak``, ``corruption``, ``error`` (QEMU's "check error":
    the check could not be completed by QEMU's rules) or ``info`` (not
    counted).  ``repairable`` names the least ``--repair`` mode that fixes
    it (``"leaks"`` or ``"all"``), or is ``None``."""

    kind: str
    severity: Severity
    offset: int | None
    structure: str
    message: str
    repairable: Literal["leaks", "all"] | None

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "severity": self.severity, "offset": self.offset,
                "structure": self.structure, "message": self.message,
                "repairable": self.repairable is not None, "repair-mode": self.repairable}


@dataclass
class SnapshotVerdict:
    """What check (and repair) make of one snapshot table entry.

    ``status``:

    * ``ok``: sound (kept as is by any repair);
    * ``damaged``: its entry has problems that ``--repair all`` fixes while
      keeping the snapshot (``detail`` says which);
    * ``lost``: its L1 pointer is broken and its L1 table was not found;
      ``--repair all`` drops it (its data cannot be reached);
    * ``not-a-snapshot``: the entry is not one (an empty entry past the real
      end of the table); ``--repair all`` drops it;
    * after ``--repair all``: ``fixed`` (kept, entry rewritten) or
      ``dropped`` (removed, named here)."""

    index: int
    id: str
    name: str
    status: VerdictStatus
    detail: str = ""
    l1_table_offset: int = 0
    l1_size: int = 0

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "id": self.id, "name": self.name, "status": self.status,
                "detail": self.detail, "l1-table-offset": self.l1_table_offset,
                "l1-size": self.l1_size}


@dataclass
class CheckReport:
    """The result of a check (and of a repair: then the counts are the
    re-check's, and ``*_fixed`` and :attr:`before` describe the repair)."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[Finding] = field(default_factory=list)
    findings_omitted: int = 0
    snapshots: list[SnapshotVerdict] = field(default_factory=list)
    dirty: bool = False
    corrupt_bit: bool = False
    repair: Literal["leaks", "all"] | None = None
    dry_run: bool = False
    rebuilt_refcounts: bool = False
    changes: list[str] = field(default_factory=list)
    before: CheckReport | None = None
    commit: object | None = None   # ops.transaction.CommitResult of the repair

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 check not completed, 2 corruptions,
        3 only leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    @property
    def clean(self) -> bool:
        return self.exit_code == 0

    def kept(self) -> list[SnapshotVerdict]:
        return [v for v in self.snapshots if v.status in ("ok", "fixed", "damaged")]

    def dropped(self) -> list[SnapshotVerdict]:
        return [v for v in self.snapshots if v.status == "dropped"]


# ---------------------------------------------------------------------------
# Snapshot table salvage
# ---------------------------------------------------------------------------

_HDR = 40
#: entries whose real extra-data size is searched for (each try is ~130 reads)
_MAX_RECOVERIES = 1024
_MAX_EXTRA = fmt.QCOW_MAX_SNAPSHOT_EXTRA_DATA


@dataclass
class SalvagedEntry:
    """One snapshot table entry as salvaged (mutable: repair edits it).

    ``extra_data_size`` is the size the entry really has (recovered when the
    stored one was implausible); ``stored_extra_data_size`` what the field
    says.  ``problems`` lists what is wrong with the entry itself;
    ``rewrite`` is set when repairing means rewriting it; ``drop`` holds the
    reason when the entry is not a snapshot (or cannot be kept)."""

    index: int
    entry_offset: int
    l1_table_offset: int
    l1_size: int
    id_bytes: bytes
    name_bytes: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size_field: int
    stored_extra_data_size: int
    extra_data_size: int
    vm_state_size_large: int | None
    disk_size_field: int | None
    icount_field: int | None
    unknown_extra: bytes
    raw: bytes = b""
    problems: list[str] = field(default_factory=list)
    rewrite: list[str] = field(default_factory=list)
    drop: str | None = None
    l1_broken: str | None = None      # why the L1 pointer is unusable
    located_l1: tuple[int, int] | None = None   # (offset, size) found by the search
    current_size: int = 0     # the image's size: QEMU's disk_size for entries without one

    @property
    def id(self) -> str:
        return self.id_bytes.decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return self.name_bytes.decode("utf-8", "replace")

    @property
    def label(self) -> str:
        return f"snapshot {self.id or '?'} ({self.name})"

    @property
    def vm_state_size(self) -> int:
        if self.vm_state_size_large is not None:
            return self.vm_state_size_large
        return self.vm_state_size_field

    def disk_size(self, current_size: int) -> int:
        return current_size if self.disk_size_field is None else self.disk_size_field

    def effective_l1(self) -> tuple[int, int] | None:
        """The (offset, size) its references are counted from, or None."""
        if self.drop is not None:
            return None
        if self.l1_broken is None:
            return self.l1_table_offset, self.l1_size
        return self.located_l1

    def to_bytes(self, *, normalize: bool) -> bytes:
        """The entry's bytes: exactly as stored (``raw``) unless something
        changed; ``normalize`` writes it the way ``qcow2_write_snapshots``
        does (at least 24 bytes of extra data)."""
        from ..model import build_snapshot_entry
        if not normalize and not self.rewrite and self.raw:
            return self.raw
        known = fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE
        extra = max(known, self.extra_data_size) if normalize or self.rewrite else \
            self.extra_data_size
        unknown = self.unknown_extra if extra > known else b""
        vm_state = self.vm_state_size
        return build_snapshot_entry(
            l1_table_offset=self.l1_table_offset, l1_size=self.l1_size,
            id_bytes=self.id_bytes, name_bytes=self.name_bytes, date_sec=self.date_sec,
            date_nsec=self.date_nsec, vm_clock_nsec=self.vm_clock_nsec,
            vm_state_size_field=(self.vm_state_size_field if extra < 8
                                 else vm_state if vm_state <= 0xFFFFFFFF else 0),
            extra_data_size=extra,
            vm_state_size_large=vm_state if extra >= 8 else None,
            disk_size=(self.disk_size_field if self.disk_size_field is not None
                       else self.current_size) if extra >= 16 else None,
            icount=(self.icount_field if self.icount_field is not None
                    else fmt.QCOW_ICOUNT_NONE) if extra >= 24 else None,
            unknown_extra=unknown)


@dataclass
class SalvagedTable:
    entries: list[SalvagedEntry]
    #: the table's byte length as salvaged (QEMU's snapshots_size when
    #: nothing had to be salvaged): the range that holds references
    counted_size: int
    #: the messages QEMU's check would abort with (without -r all)
    qemu_errors: list[str]
    findings: list[Finding]
    overhanging: int = 0
    #: where the table was read (differs from the header when it was found
    #: next to a misaligned snapshots_offset, which is then ``moved_from``)
    offset: int = 0
    moved_from: int | None = None
    #: the table could not be located: a repair must leave it alone
    unreadable: bool = False


def _plausible_id(raw: bytes) -> bool:
    return 0 < len(raw) <= 127 and all(0x21 <= b <= 0x7E for b in raw)


def _plausible_name(raw: bytes) -> bool:
    if any(b < 0x20 or b == 0x7F for b in raw):
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _name_prefix(raw: bytes) -> bytes:
    """The longest prefix of ``raw`` that is a plausible name."""
    end = len(raw)
    for i, b in enumerate(raw):
        if b < 0x20 or b == 0x7F:
            end = i
            break
    prefix = raw[:end]
    while prefix:
        try:
            prefix.decode("utf-8")
            return prefix
        except UnicodeDecodeError as exc:
            prefix = prefix[:exc.start]
    return prefix


class _Header40:
    __slots__ = (
        "date_nsec",
        "date_sec",
        "extra_data_size",
        "id_str_size",
        "l1_size",
        "l1_table_offset",
        "name_size",
        "vm_clock_nsec",
        "vm_state_size",
    )

    def __init__(self, raw: bytes) -> None:
        i = int.from_bytes
        self.l1_table_offset = i(raw[0:8], "big")
        self.l1_size = i(raw[8:12], "big")
        self.id_str_size = i(raw[12:14], "big")
        self.name_size = i(raw[14:16], "big")
        self.date_sec = i(raw[16:20], "big")
        self.date_nsec = i(raw[20:24], "big")
        self.vm_clock_nsec = i(raw[24:32], "big")
        self.vm_state_size = i(raw[32:36], "big")
        self.extra_data_size = i(raw[36:40], "big")


def salvage_snapshot_table(image: Qcow2Image) -> SalvagedTable:
    """Read the snapshot table entry by entry, QEMU's way where QEMU can,
    and salvage where it cannot (see the module docstring)."""
    h = image.header
    cs = image.cluster_size
    file_size = image.file_size
    findings: list[Finding] = []
    qemu_errors: list[str] = []
    entries: list[SalvagedEntry] = []
    nb = h.nb_snapshots
    offset = h.snapshots_offset
    if nb == 0:
        return SalvagedTable([], 0, [], [])

    def add(kind: str, severity: Severity, off: int | None, structure: str, message: str,
            repairable: Literal["leaks", "all"] | None) -> None:
        findings.append(Finding(kind, severity, off, structure, message, repairable))

    moved_from: int | None = None
    if offset & (cs - 1) or offset > 0x7FFFFFFFFFFFFFFF - min(nb, fmt.QCOW_MAX_SNAPSHOTS) * _HDR:
        qemu_errors.append("Snapshot table offset invalid")
        aligned = offset & ~(cs - 1) & 0x00FFFFFFFFFFFE00
        if _entry_plausible_at(image, aligned):
            add("snapshot-table-offset", "error", 64, "header",
                f"Snapshot table offset invalid: snapshots_offset={offset:#x} is not cluster "
                f"aligned; the table was found at {aligned:#x}, where --repair all points "
                f"the header", "all")
            moved_from, offset = offset, aligned
        else:
            add("snapshot-table-offset", "error", 64, "header",
                f"Snapshot table offset invalid: snapshots_offset={offset:#x} is not cluster "
                f"aligned or out of range, and no table was found near it; the {nb} "
                f"snapshot(s) cannot be read (nothing is changed)", None)
            return SalvagedTable([], 0, qemu_errors, findings, unreadable=True)
    if offset >= file_size:
        add("snapshot-table-past-eof", "corruption", 64, "header",
            f"snapshot table offset {offset:#x} lies past the end of the file "
            f"({file_size:#x}): none of the {nb} snapshot(s) can be read (nothing is "
            f"changed)", None)
        return SalvagedTable([], 0, qemu_errors, findings, unreadable=True)
    overhanging = 0
    if nb > fmt.QCOW_MAX_SNAPSHOTS:
        overhanging = nb - fmt.QCOW_MAX_SNAPSHOTS
        qemu_errors.append("snapshot table too large")
        add("snapshot-count", "error", 60, "header",
            f"snapshot table too large: nb_snapshots={nb} exceeds QEMU's limit of "
            f"{fmt.QCOW_MAX_SNAPSHOTS}; the {overhanging} overhanging entries are dropped by "
            f"--repair all", "all")
        nb = fmt.QCOW_MAX_SNAPSHOTS

    limit = fmt.QCOW_MAX_SNAPSHOTS_SIZE
    # read the table lazily, bounded by the 64 MiB limit and the file
    readable = max(0, min(limit, file_size - offset))
    chunk = 1 << 20
    buf = bytearray()

    def data(start: int, length: int) -> bytes:
        end = min(start + length, readable)
        while len(buf) < end:
            buf.extend(image.pread(offset + len(buf), min(chunk, readable - len(buf))))
        return bytes(buf[start:end]) + bytes(max(0, start + length - max(end, start)))

    def header_plausible(pos: int) -> bool:
        if pos + _HDR > readable:
            return False
        hh = _Header40(data(pos, _HDR))
        if hh.l1_table_offset & (cs - 1) or hh.l1_table_offset >= max(file_size, cs):
            return False
        if hh.l1_size > fmt.QCOW_MAX_L1_SIZE // 8 or hh.extra_data_size > _MAX_EXTRA:
            return False
        if h.version >= 3 and hh.extra_data_size < 16:
            return False
        end = pos + _HDR + hh.extra_data_size + hh.id_str_size + hh.name_size
        if end > readable:
            return False
        id_raw = data(pos + _HDR + hh.extra_data_size, hh.id_str_size)
        return _plausible_id(id_raw) or (not id_raw and h.version < 3)

    pos = 0
    recoveries = 0
    for i in range(nb):
        start = fmt.align_up(pos, 8)
        entry_offset = offset + start
        structure = f"snapshot table entry {i}"
        if start + _HDR > limit:
            remaining = nb - i
            qemu_errors.append("Snapshot table is too big")
            add("snapshot-table-size", "error", entry_offset, structure,
                f"Snapshot table is too big: entries {i}..{nb - 1} ({remaining}) lie beyond "
                f"QEMU's 64 MiB limit and are dropped by --repair all", "all")
            overhanging += remaining
            break
        if entry_offset + _HDR > file_size:
            remaining = nb - i
            add("snapshot-table-past-eof", "corruption", entry_offset, structure,
                f"nb_snapshots={h.nb_snapshots} is larger than the table: entries "
                f"{i}..{nb - 1} ({remaining}) lie past the end of the file; --repair all "
                f"drops them", "all")
            for j in range(i, nb):
                entries.append(_phantom(j, offset + fmt.align_up(pos, 8) + (j - i) * _HDR,
                                        "lies past the end of the file"))
            break
        hh = _Header40(data(start, _HDR))
        raw_extra = hh.extra_data_size
        extra = raw_extra
        id_start = start + _HDR + extra
        problems: list[str] = []
        rewrite: list[str] = []
        recovered = None
        if (raw_extra > _MAX_EXTRA and recoveries < _MAX_RECOVERIES
                and not hh.l1_table_offset & (cs - 1)
                and hh.l1_size <= fmt.QCOW_MAX_L1_SIZE // 8):
            recoveries += 1
            recovered = _recover_extra(data, header_plausible, start, hh, i == nb - 1,
                                       readable, h.version)
        if recovered is None and _garbage(data, start, hh, h.version, cs, file_size):
            remaining = nb - i
            add("snapshot-garbage", "corruption", entry_offset, structure,
                f"snapshot table entries {i}..{nb - 1} ({remaining}) are not snapshots (entry "
                f"{i} has no readable ID, name or L1 pointer: nb_snapshots={h.nb_snapshots} "
                f"is larger than the table); --repair all drops them", "all")
            for j in range(i, nb):
                entries.append(_phantom(j, entry_offset, "not a snapshot (unreadable entry "
                                        "past the real end of the table)"))
            break
        if raw_extra > _MAX_EXTRA:
            qemu_errors.append(f"Too much extra metadata in snapshot table entry {i}")
            if recovered is not None:
                extra = recovered
                msg = (f"too much extra metadata ({raw_extra} > {_MAX_EXTRA} bytes); its ID "
                       f"and name were found at extra_data_size={recovered}")
            else:
                extra = _MAX_EXTRA
                msg = (f"too much extra metadata ({raw_extra} > {_MAX_EXTRA} bytes); no "
                       f"plausible layout found, extra data cut to {_MAX_EXTRA} bytes as "
                       f"QEMU does")
                id_start = start + _HDR + raw_extra
            problems.append(msg)
            rewrite.append(f"extra_data_size {raw_extra} -> {max(extra, 24)}")
            add("snapshot-extra-data", "error", entry_offset, structure,
                f"Too much extra metadata in snapshot table entry {i}: {msg}", "all")
            if recovered is not None:
                id_start = start + _HDR + extra
        elif (recoveries < _MAX_RECOVERIES and hh.id_str_size
              and not _plausible_id(data(id_start, hh.id_str_size))
              and not hh.l1_table_offset & (cs - 1)):
            # a plausible but wrong extra_data_size puts the ID in the wrong place
            recoveries += 1
            found = _recover_extra(data, header_plausible, start, hh, i == nb - 1, readable,
                                   h.version)
            if found is not None and found != raw_extra:
                extra = found
                id_start = start + _HDR + extra
                msg = (f"extra_data_size={raw_extra} does not fit the entry: its ID and name "
                       f"were found at extra_data_size={found}")
                problems.append(msg)
                rewrite.append(f"extra_data_size {raw_extra} -> {max(extra, 24)}")
                add("snapshot-extra-data", "corruption", entry_offset, structure,
                    f"snapshot table entry {i}: {msg}", "all")
        extra_raw = data(start + _HDR, min(extra, _MAX_EXTRA))
        id_raw = data(id_start, hh.id_str_size)
        name_start = id_start + hh.id_str_size
        name_size = hh.name_size
        end = name_start + name_size
        if id_raw and not _plausible_id(id_raw):
            # an id_str_size that runs past the ID: the ID and the name are
            # the text before the first control byte, the name its last
            # name_size bytes
            text = _name_prefix(id_raw)
            real_id, real_name = text[:len(text) - name_size], text[len(text) - name_size:]
            new_end = id_start + len(text)
            if (name_size and len(text) > name_size and _plausible_id(real_id)
                    and _plausible_name(real_name) and len(text) < len(id_raw)
                    and (i == nb - 1 or header_plausible(fmt.align_up(new_end, 8)))):
                problems.append(f"ID (id_str_size={hh.id_str_size}) runs past the end of the "
                                f"table; its real ID is {real_id.decode()!r}")
                rewrite.append(f"id_str_size {hh.id_str_size} -> {len(real_id)}")
                add("snapshot-id", "corruption", entry_offset, structure,
                    f"snapshot table entry {i}: ID (id_str_size={hh.id_str_size}) runs past "
                    f"the end of the table; --repair all keeps ID {real_id.decode()!r} and "
                    f"name {real_name.decode('utf-8', 'replace')!r}", "all")
                id_raw = real_id
                name_start = id_start + len(real_id)
                end = new_end
        if end > limit and recovered is None:
            remaining = nb - i
            qemu_errors.append("Snapshot table is too big")
            add("snapshot-table-size", "error", entry_offset, structure,
                f"Snapshot table is too big: entries {i}..{nb - 1} ({remaining}) end beyond "
                f"QEMU's 64 MiB limit and are dropped by --repair all", "all")
            overhanging += remaining
            break
        name_raw = data(name_start, name_size)
        if (end > readable or not _plausible_name(name_raw)) and name_size:
            prefix = _name_prefix(name_raw)
            new_end = name_start + len(prefix)
            nxt = fmt.align_up(new_end, 8)
            if i == nb - 1 or header_plausible(nxt):
                why = ("runs past the end of the file" if end > file_size - offset
                       else "runs past the end of the table")
                problems.append(f"name (name_size={name_size}) {why}; its real name is "
                                f"{prefix.decode('utf-8', 'replace')!r}")
                rewrite.append(f"name_size {name_size} -> {len(prefix)}")
                add("snapshot-name", "corruption", entry_offset, structure,
                    f"snapshot table entry {i}: name (name_size={name_size}) {why}; --repair "
                    f"all keeps the name {prefix.decode('utf-8', 'replace')!r}", "all")
                name_raw, end = prefix, new_end
            else:
                problems.append(f"name (name_size={name_size}) is not text")
                add("snapshot-name", "corruption", entry_offset, structure,
                    f"snapshot table entry {i}: name (name_size={name_size}) is not text "
                    f"and the entry's end cannot be found", None)
        if id_raw and not _plausible_id(id_raw):
            add("snapshot-id", "info", entry_offset, structure,
                f"snapshot table entry {i}: ID {id_raw[:32]!r} ({len(id_raw)} bytes) is not "
                f"a usual ID (printable, at most 127 bytes: QEMU's tools truncate longer ones)",
                None)
        known = _known_extra(extra_raw, extra)
        entry = SalvagedEntry(
            index=i, entry_offset=entry_offset, l1_table_offset=hh.l1_table_offset,
            l1_size=hh.l1_size, id_bytes=id_raw, name_bytes=name_raw, date_sec=hh.date_sec,
            date_nsec=hh.date_nsec, vm_clock_nsec=hh.vm_clock_nsec,
            vm_state_size_field=hh.vm_state_size, stored_extra_data_size=raw_extra,
            extra_data_size=extra, vm_state_size_large=known[0], disk_size_field=known[1],
            icount_field=known[2], unknown_extra=extra_raw[24:] if extra > 24 else b"",
            raw=b"" if rewrite else data(start, end - start), problems=problems,
            rewrite=rewrite, current_size=image.size)
        if h.version >= 3 and extra < 16:
            if not id_raw and not name_raw and hh.l1_size == 0 and hh.l1_table_offset == 0:
                remaining = nb - i
                add("snapshot-phantom", "corruption", entry_offset, structure,
                    f"snapshot table entries {i}..{nb - 1} ({remaining}) are not snapshots "
                    f"(entry {i} is empty: no ID, no name, no L1 table; nb_snapshots="
                    f"{h.nb_snapshots} is larger than the table); --repair all drops them",
                    "all")
                for j in range(i, nb):
                    entries.append(_phantom(j, entry_offset,
                                            "not a snapshot (empty entry past the real end "
                                            "of the table)"))
                break
            else:
                entry.problems.append(f"incomplete v3 entry (extra_data_size={extra} < 16)")
                entry.rewrite.append("incomplete: disk_size and icount added")
                entry.raw = b""
                add("snapshot-incomplete", "corruption", entry_offset, structure,
                    f"snapshot table entry {i} is incomplete (extra_data_size={extra} < 16, "
                    f"required in version 3 images); --repair all completes it", "all")
        entries.append(entry)
        pos = end
    # duplicate IDs: the first keeps its ID
    seen: dict[bytes, int] = {}
    for e in entries:
        if e.drop is not None:
            continue
        if not e.id_bytes:
            continue  # QEMU 7.2's own repair leaves empty IDs; not a clash
        if e.id_bytes in seen:
            add("snapshot-duplicate-id", "corruption", e.entry_offset,
                f"snapshot table entry {e.index}",
                f"snapshot table entry {e.index} ({e.name}) has ID {e.id!r}, like entry "
                f"{seen[e.id_bytes]}; --repair all gives it a new ID", "all")
            e.problems.append(f"duplicate ID {e.id!r}")
        else:
            seen[e.id_bytes] = e.index
    return SalvagedTable(entries, pos, qemu_errors, findings, overhanging, offset=offset,
                         moved_from=moved_from)


def _entry_plausible_at(image: Qcow2Image, offset: int) -> bool:
    """A snapshot table entry (aligned L1 pointer, sane sizes, printable ID)
    starts at ``offset``."""
    if offset + _HDR > image.file_size:
        return False
    hh = _Header40(image.pread(offset, _HDR))
    if hh.l1_table_offset & (image.cluster_size - 1) or hh.extra_data_size > _MAX_EXTRA:
        return False
    if hh.l1_size > fmt.QCOW_MAX_L1_SIZE // 8:
        return False
    return _plausible_id(image.pread(offset + _HDR + hh.extra_data_size, hh.id_str_size))


def _garbage(data: Callable[[int, int], bytes], start: int, hh: _Header40, version: int,
             cs: int, file_size: int) -> bool:
    """Neither a readable ID nor a usable L1 pointer: not an entry.  (An
    entry with a usable L1 pointer is kept whatever its ID looks like: its
    data is real.)"""
    id_raw = data(start + _HDR + min(hh.extra_data_size, _MAX_EXTRA), hh.id_str_size)
    if _plausible_id(id_raw) or (not id_raw and version < 3):
        return False
    if hh.l1_table_offset & (cs - 1) or hh.l1_size > fmt.QCOW_MAX_L1_SIZE // 8:
        return True
    if hh.l1_size and hh.l1_table_offset + hh.l1_size * 8 > file_size + cs:
        return True
    if hh.l1_size == 0:
        name_raw = data(start + _HDR + min(hh.extra_data_size, _MAX_EXTRA) + hh.id_str_size,
                        min(hh.name_size, 64))
        return hh.extra_data_size > _MAX_EXTRA or not _plausible_name(name_raw)
    return False


def _phantom(index: int, entry_offset: int, why: str) -> SalvagedEntry:
    return SalvagedEntry(index, entry_offset, 0, 0, b"", b"", 0, 0, 0, 0, 0, 0, None, None,
                         None, b"", drop=why)


def _known_extra(extra_raw: bytes, extra: int) -> tuple[int | None, int | None, int | None]:
    def field_at(off: int) -> int | None:
        if extra < off + 8:
            return None
        return int.from_bytes(extra_raw[off:off + 8], "big")
    return field_at(0), field_at(8), field_at(16)


def _recover_extra(data: Callable[[int, int], bytes], header_plausible: Callable[[int], bool],
                   start: int, hh: _Header40, last: bool, readable: int,
                   version: int) -> int | None:
    """The extra-data size at which the entry's fields, ID, name and the next
    entry all make sense (QEMU writes 24; older versions 16, v2 maybe 0)."""
    candidates = [24, 16, 8, 0] + [e for e in range(32, _MAX_EXTRA + 1, 8)]
    for extra in candidates:
        if version >= 3 and extra < 16:
            continue
        id_start = start + _HDR + extra
        end = id_start + hh.id_str_size + hh.name_size
        if end > readable:
            continue
        if not _plausible_id(data(id_start, hh.id_str_size)):
            continue
        if not _plausible_name(data(id_start + hh.id_str_size, hh.name_size)):
            continue
        raw = data(start + _HDR, extra)
        large, disk, _ = _known_extra(raw, extra)
        if large is not None and hh.vm_state_size and large != hh.vm_state_size:
            continue
        if disk is not None and (disk == 0 or disk % 512):
            continue
        if not last and not header_plausible(fmt.align_up(end, 8)):
            continue
        return extra
    return None


# ---------------------------------------------------------------------------
# The reference count pass
# ---------------------------------------------------------------------------

@dataclass
class _L2Info:
    """What one L2 table references (computed once, applied per path)."""

    hosts: list[int] | array[int]         # host clusters, with repetition
    findings: list[tuple[str, int | None, str, Literal["leaks", "all"] | None]]
    past_eof: list[int]
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    fixes: dict[int, int] = field(default_factory=dict)   # entry index -> fixed value (repair all)
    #: findings beyond the ones kept in ``findings`` (counted, not listed)
    more_findings: int = 0
    #: ``hosts`` is exactly one cluster per entry with a host offset, in order
    bulk: bool = False
    #: host clusters of compressed clusters that QEMU's check calls errors and
    #: so does not count (a non-zero subcluster bitmap), though QEMU reads them
    unreferenced_data: list[int] = field(default_factory=list)


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
        self.ref: array[int] = array("Q", bytes(8 * (self.file_clusters + 1)))
        self.past_eof: set[int] = set()
        #: host clusters holding guest data that QEMU reads but its check
        #: does not count (see _L2Info.unreferenced_data): a repair keeps them
        self.unreferenced_data: set[int] = set()
        self.owner: dict[int, str] = {}       # metadata cluster -> structure kind
        self.data_clusters: set[int] = set()  # only filled for overlap detection of metadata
        self._l2_info: dict[int, _L2Info] = {}
        self._pending: Counter[int] = Counter()   # L2 offset -> paths not yet counted
        self._walked: set[int] = set()            # L2 tables reached from a counted L1
        #: L2 entry problems counted but not listed (their kinds are unknown)
        self.unlisted_l2_findings = 0
        self.table: SalvagedTable | None = None
        #: (offset, length) of the snapshot table range that was counted
        self.table_counted: tuple[int, int] | None = None
        self.disk: array[int] = array("Q")
        self.rebuild_reasons: list[str] = []
        self.refblocks: list[tuple[int, int]] = []   # (table index, offset) of valid blocks
        self.refcount_structure_refs: list[int] = []
        self.active_l2: list[tuple[int, int]] = []    # (l1 index, l2 offset)
        self.l1_tables: list[tuple[str, int, int]] = []  # (label, offset, size) walked
        #: L1 tables whose own clusters were counted (not past the end of the file)
        self.l1_counted: set[tuple[int, int]] = set()
        self._done = 0
        self._total = 1

    # -- findings --------------------------------------------------------

    def add(self, kind: str, severity: Severity, offset: int | None, structure: str,
            message: str, repairable: Literal["leaks", "all"] | None) -> None:
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

    def _grow(self, cluster: int) -> None:
        if cluster >= len(self.ref):
            self.ref.extend(array("Q", bytes(8 * (cluster + 1 - len(self.ref)))))

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
        self._grow(last)
        ref = self.ref
        for c in range(first, last + 1):
            ref[c] += 1
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
        for index in compress(range(len(table)), table):
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
            counted = self.inc_range(l2, cs, f"L2 table (from {label} entry {index})")
            if l2 & (cs - 1):
                self.add("misaligned", "corruption", l1_offset + 8 * index, label,
                         f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry "
                         f"corrupted", None)
            if not counted:
                continue
            self.claim(l2, cs, "L2 table", f"L2 table at {l2:#x}")
            if active:
                self.active_l2.append((index, l2))
            info = self._l2(l2)
            self._apply_l2(info, l2, label, active)
            self._tick(cs)

    def _l2(self, l2: int) -> _L2Info:
        info = self._l2_info.get(l2)
        if info is None:
            info = self._scan_l2(l2)
            self._l2_info[l2] = info
        return info

    def _scan_l2(self, l2: int) -> _L2Info:
        image = self.image
        cs = self.cs
        bits = self.bits
        table = image.read_l2(l2)
        ext = image.extended_l2
        entries = table[0::2] if ext else table
        bitmaps = table[1::2] if ext else None
        info = _L2Info([], [], [])
        mask = fmt.L2E_OFFSET_MASK
        compressed = fmt.QCOW_OFLAG_COMPRESSED
        reserved = fmt.L2E_STD_RESERVED_MASK
        misalign = (cs - 1) & mask
        data_file = image.has_data_file
        live = list(compress(entries, entries))
        fast = not data_file and not reduce(or_, live, 0) & (compressed | reserved | misalign)
        if fast and not ext:
            # C-level passes: offsets, drop the zero ones, cluster indexes
            offsets = list(map(and_, live, repeat(mask)))
            hosts = array("Q", map(rshift, compress(offsets, offsets), repeat(bits)))
            info.allocated = len(hosts)
            if len(hosts) > 1:
                steps = list(map(sub, islice(hosts, 1, None), hosts))
                info.fragmented = len(steps) - steps.count(1)
            if hosts and max(hosts) >= self.file_clusters:
                info.past_eof = [hc for hc in hosts if hc >= self.file_clusters]
                info.hosts = [hc for hc in hosts if hc < self.file_clusters]
            else:
                info.hosts = hosts
                info.bulk = True
            return info
        next_contig = 0
        if bitmaps is not None:   # a bitmap can be wrong for an all-zero entry too
            live_index = [j for j in range(len(entries)) if entries[j] or bitmaps[j]]
            live = [entries[j] for j in live_index]
        else:
            live_index = list(compress(range(len(entries)), entries))
        for j, e in zip(live_index, live):
            bitmap = bitmaps[j] if bitmaps is not None else 0
            if e & compressed:
                coffset = e & image.cluster_offset_mask
                if e & fmt.QCOW_OFLAG_COPIED:
                    info.findings.append((
                        "copied-compressed", l2 + j * image.l2_entry_size,
                        (f"ERROR: coffset=0x{coffset:x}: copied flag must never be set for "
                        f"compressed clusters"), "all"))
                    info.fixes[j] = e & ~fmt.QCOW_OFLAG_COPIED
                    e &= ~fmt.QCOW_OFLAG_COPIED
                # QEMU's check_refcounts_l2 neither counts nor references a
                # compressed cluster it calls an error (so its host clusters
                # may show up as leaked)
                if data_file:
                    info.findings.append((
                        "compressed-data-file", l2 + j * image.l2_entry_size,
                        f"ERROR compressed cluster {j} with data file, entry=0x{e:x}", None))
                    continue
                nb = ((e >> image.csize_shift) & image.csize_mask) + 1
                csize = nb * 512 - (coffset & 511)
                if ext and bitmap:
                    info.findings.append((
                        "subcluster-bitmap", l2 + j * 16,
                        (f"ERROR compressed cluster {j} with non-zero subcluster allocation "
                        f"bitmap, entry=0x{e:x}"), None))
                    first = coffset >> bits
                    info.unreferenced_data.extend(
                        range(first, min((coffset + csize - 1) >> bits, first + 64) + 1))
                    continue
                info.allocated += 1
                info.compressed += 1
                info.fragmented += 1
                first = coffset >> bits
                last = (coffset + csize - 1) >> bits
                if coffset + csize - self.file_size >= cs:
                    info.past_eof.extend(range(first, min(last, first + 64) + 1))
                    continue
                info.hosts.extend(range(first, last + 1))
                continue
            if e & reserved and not (ext and e & reserved == 0):
                info.findings.append(("reserved-bits", l2 + j * image.l2_entry_size,
                                      f"ERROR found l2 entry with reserved bits set: {e:x}",
                                      None))
            host = e & mask
            zero = bool(e & fmt.QCOW_OFLAG_ZERO) and not ext
            if not host:
                if data_file and e & fmt.QCOW_OFLAG_COPIED and not zero:
                    # external data file: offset 0 + COPIED is a cluster at 0
                    info.allocated += 1
                    if next_contig and next_contig != cs:
                        info.fragmented += 1
                    next_contig = cs
                if ext and bitmap & fmt.QCOW_L2_BITMAP_ALL_ALLOC:
                    info.findings.append((
                        "subcluster-bitmap", l2 + j * 16,
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                        None))
                continue
            if ext and (bitmap >> 32) & bitmap:
                info.findings.append((
                    "subcluster-bitmap", l2 + j * 16,
                    (f"ERROR offset={host:x}: Allocated cluster has corrupted subcluster "
                    f"allocation bitmap"), None))
            if host & (cs - 1):
                contains_data = bool(bitmap & fmt.QCOW_L2_BITMAP_ALL_ALLOC) if ext else not zero
                if not contains_data:
                    info.findings.append((
                        "misaligned", l2 + j * image.l2_entry_size,
                        (f"ERROR offset={host:x}: Preallocated cluster is not properly aligned; "
                        f"L2 entry corrupted."), "all"))
                    info.fixes[j] = fmt.QCOW_OFLAG_ZERO if not ext else 0
                else:
                    info.findings.append((
                        "misaligned", l2 + j * image.l2_entry_size,
                        (f"ERROR offset={host:x}: Data cluster is not properly aligned; L2 "
                        f"entry corrupted."), None))
            info.allocated += 1
            if next_contig and host != next_contig:
                info.fragmented += 1
            next_contig = host + cs
            if data_file:
                continue
            if host + cs - self.file_size >= cs:
                info.past_eof.append(host >> bits)
                continue
            info.hosts.append(host >> bits)
            if host & (cs - 1):
                info.hosts.append((host >> bits) + 1)
        if len(info.findings) > 64:   # a table of garbage: count, list a few
            info.more_findings = len(info.findings) - 64
            del info.findings[64:]
        return info

    def _apply_l2(self, info: _L2Info, l2: int, label: str, active: bool) -> None:
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
        self._pending[l2] += 1
        self._walked.add(l2)
        if active:
            r = self.report
            r.allocated_clusters += info.allocated
            r.fragmented_clusters += info.fragmented
            r.compressed_clusters += info.compressed

    def _data_overlaps(self) -> None:
        """Data clusters that are also metadata (a C-level set test per L2
        table)."""
        meta = self.owner
        for l2, info in self._l2_info.items():
            if l2 not in self._walked or meta.keys().isdisjoint(info.hosts):
                continue
            for hc in sorted(set(info.hosts).intersection(meta)):
                self.add("overlap", "corruption", hc << self.bits, f"L2 table at {l2:#x}",
                         f"data cluster {hc} (in L2 table at {l2:#x}) overlaps a {meta[hc]}",
                         None)

    def _flush_pending(self) -> None:
        """Add the references of every L2 table walked so far, times its
        number of paths."""
        for l2, paths in self._pending.items():
            hosts = self._l2_info[l2].hosts
            if not hosts:
                continue
            top = max(hosts)
            if top >= len(self.ref):
                self._grow(top)
            ref = self.ref
            if paths == 1:
                for hc in hosts:
                    ref[hc] += 1
            else:
                for hc in hosts:
                    ref[hc] += paths
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

    def _count_bitmaps(self, b: object) -> None:
        from ..model import BitmapsExtension
        assert isinstance(b, BitmapsExtension)
        size = b.bitmap_directory_size
        if size > 1024 * 65535:
            self.add("bitmaps", "corruption", b.bitmap_directory_offset, "bitmap directory",
                     "bitmap directory too large", None)
            return
        self.inc_range(b.bitmap_directory_offset, size, "bitmap directory")
        raw = self.image.pread(b.bitmap_directory_offset, size)
        pos = 0
        for _ in range(min(b.nb_bitmaps, 65535)):
            if pos + 24 > len(raw):
                break
            table_offset = int.from_bytes(raw[pos:pos + 8], "big")
            table_size = int.from_bytes(raw[pos + 8:pos + 12], "big")
            name_size = int.from_bytes(raw[pos + 18:pos + 20], "big")
            extra = int.from_bytes(raw[pos + 20:pos + 24], "big")
            pos = fmt.align_up(pos + 24 + extra + name_size, 8)
            if table_size > (1 << 27) or table_offset & (self.cs - 1):
                continue
            self.inc_range(table_offset, table_size * 8, "bitmap table")
            table = decode_u64_table(self.image.pread(table_offset, table_size * 8))
            for entry in table:
                off = entry & 0x00FFFFFFFFFFFE00
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
        disk = array("Q", bytes(8 * n))
        for index in compress(range(len(table)), table):
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
            disk[base:stop] = array("Q", block[:stop - base])
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
            disk.extend(array("Q", bytes(8 * (len(ref) - len(disk)))))
        n = max(self.file_clusters, self._highest_ref() + 1)
        step = 4096
        highest = 0
        for base in range(0, n, step):
            a = disk[base:min(base + step, n)]
            b = ref[base:min(base + step, n)]
            if a != b:
                for k, (d, c) in enumerate(zip(a, b)):
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
            if any(a) or any(b):
                for k in range(len(a) - 1, -1, -1):
                    if a[k] or b[k]:
                        highest = max(highest, base + k)
                        break
        self.report.image_end_offset = (highest + 1) << self.bits

    def _highest_ref(self) -> int:
        ref = self.ref
        for i in range(len(ref) - 1, -1, -1):
            if ref[i]:
                return i
        return 0

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
        for index, l2 in self.active_l2:
            entry = l1[index]
            count = disk[l2 >> bits] if (l2 >> bits) < n else 0
            if (count == 1) != bool(entry & copied):
                self.add("copied", "corruption", self.h.l1_table_offset + 8 * index,
                         "active L1 table",
                         f"ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                         f"refcount={count}", "all")
            if l2 & (self.cs - 1):
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
                        for j, e, hc, w, hv in zip(where, values, hosts, want, have):
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
                if image.has_data_file:
                    count = 1
                else:
                    count = disk[host >> bits] if (host >> bits) < n else 0
                if (count == 1) != bool(e & copied):
                    self.add("copied", "corruption", l2 + j * image.l2_entry_size,
                             f"L2 table at {l2:#x}",
                             f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} "
                             f"refcount={count}", "all")
            seen_l2.add(l2)

    # -- salvage of broken L1 pointers ----------------------------------

    def expected_l1_size(self, e: SalvagedEntry) -> int:
        image = self.image
        disk_size = e.disk_size(image.size)
        if e.vm_state_size:
            vm_offset = image.size_to_l1(disk_size) << (self.bits + image.l2_bits)
            return image.size_to_l1(vm_offset + e.vm_state_size)
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
            info = self._l2(l2)
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


def refcount_differences(disk: array[int], ref: array[int]) -> Iterator[tuple[int, int, int]]:
    """``(cluster, stored, computed)`` wherever the stored refcounts and the
    computed references differ; equal stretches are skipped 4096 clusters at
    a time with one array comparison."""
    n = min(len(disk), len(ref))
    step = 4096
    for base in range(0, n, step):
        a = disk[base:base + step]
        b = ref[base:base + step]
        if a == b:
            continue
        for k, (d, r) in enumerate(zip(a, b)):
            if d != r:
                yield base + k, d, r


def check_image(path: str | os.PathLike[str], *, progress: Progress | None = None
                ) -> CheckReport:
    """Check an image without changing it (opened read-only, in QEMU's
    check mode so a broken snapshot table does not stop the check)."""
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        return Checker(image, progress=progress).run()
    finally:
        image.close()
