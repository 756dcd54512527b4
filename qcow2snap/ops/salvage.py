"""Salvaging reader of the snapshot table (operations layer).

QEMU's ``qcow2_read_snapshots`` stops at the first entry it cannot read;
a check or repair that did the same would lose every snapshot after it.
:func:`salvage_snapshot_table` reads entry by entry, QEMU's way where QEMU
can, and keeps going where it cannot:

* an implausible ``extra_data_size`` is replaced by the size at which the
  entry's ID and name (and the next entry) make sense;
* an ID or name that runs past the table is cut back to where it really
  ends;
* entries past the real end of the table (``nb_snapshots`` too large) are
  recognised as not being snapshots;
* a snapshot table offset that is not cluster aligned is looked for at the
  aligned offset.

Every salvaged entry is a :class:`~qcow2snap.model.Snapshot` (the one
record type) plus what the salvage found out about it
(:class:`SalvagedEntry`).  A snapshot whose L1 pointer is broken gets its
L1 table searched among the leaked clusters by the checker
(:meth:`qcow2snap.ops.check.Checker.locate_l1`).
:func:`salvage_snapshot_table_at` reads a table at any offset, for
recovering tables the header no longer points at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .. import format as fmt
from ..image import Qcow2Image
from ..model import Snapshot
from .check_report import Finding, RepairMode, Severity

__all__ = [
    "SalvagedEntry",
    "SalvagedTable",
    "salvage_snapshot_table",
    "salvage_snapshot_table_at",
]

_HDR = 40
#: entries whose real extra-data size is searched for (each try is ~130 reads)
_MAX_RECOVERIES = 1024
_MAX_EXTRA = fmt.QCOW_MAX_SNAPSHOT_EXTRA_DATA


@dataclass
class SalvagedEntry:
    """One snapshot table entry as salvaged (mutable: repair edits it).

    ``snapshot`` is the entry as the one record type of the model, with the
    sizes it really has (``extra_data_size`` recovered when the stored one
    was implausible; ``stored_extra_data_size`` is what the field says).
    ``problems`` lists what is wrong with the entry itself; ``rewrite`` is
    set when repairing means rewriting it; ``drop`` holds the reason when the
    entry is not a snapshot (or cannot be kept); ``raw`` is the entry's
    bytes as stored (empty once it must be rewritten)."""

    snapshot: Snapshot
    stored_extra_data_size: int
    raw: bytes = b""
    problems: list[str] = field(default_factory=list)
    rewrite: list[str] = field(default_factory=list)
    drop: str | None = None
    l1_broken: str | None = None      # why the L1 pointer is unusable
    located_l1: tuple[int, int] | None = None   # (offset, size) found by the search

    # read-only views of the record (change it with :meth:`update`)
    @property
    def index(self) -> int:
        return self.snapshot.index

    @property
    def entry_offset(self) -> int:
        return self.snapshot.entry_offset

    @property
    def l1_table_offset(self) -> int:
        return self.snapshot.l1_table_offset

    @property
    def l1_size(self) -> int:
        return self.snapshot.l1_size

    @property
    def id_bytes(self) -> bytes:
        return self.snapshot.id_bytes

    @property
    def id(self) -> str:
        return self.snapshot.id

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def label(self) -> str:
        return f"snapshot {self.id or '?'} ({self.name})"

    def update(self, **fields: Any) -> None:
        """Change fields of the record (a new :class:`Snapshot`)."""
        self.snapshot = replace(self.snapshot, **fields)

    def effective_l1(self) -> tuple[int, int] | None:
        """The (offset, size) its references are counted from, or None."""
        if self.drop is not None:
            return None
        if self.l1_broken is None:
            return self.l1_table_offset, self.l1_size
        return self.located_l1

    def to_bytes(self) -> bytes:
        """The entry's bytes for a rewritten table: exactly as stored unless
        something in it changed, then as ``qcow2_write_snapshots`` writes
        it (:meth:`Snapshot.to_bytes` holds those rules)."""
        if self.raw and not self.rewrite:
            return self.raw
        return self.snapshot.to_bytes(normalize=bool(self.rewrite))


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


def salvage_snapshot_table(image: Qcow2Image) -> SalvagedTable:
    """Read the snapshot table entry by entry, QEMU's way where QEMU can,
    and salvage where it cannot (see the module docstring)."""
    h = image.header
    cs = image.cluster_size
    file_size = image.file_size
    findings: list[Finding] = []
    qemu_errors: list[str] = []
    nb = h.nb_snapshots
    offset = h.snapshots_offset
    if nb == 0:
        return SalvagedTable([], 0, [], [])

    def add(kind: str, severity: Severity, off: int | None, structure: str, message: str,
            repairable: RepairMode | None) -> None:
        findings.append(Finding(kind, severity, off, structure, message, repairable))

    moved_from: int | None = None
    if offset & (cs - 1) or offset > fmt.INT64_MAX - min(nb, fmt.QCOW_MAX_SNAPSHOTS) * _HDR:
        qemu_errors.append("Snapshot table offset invalid")
        aligned = offset & ~(cs - 1) & fmt.L1E_OFFSET_MASK   # an offset field's bits
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
    return _salvage_entries(image, offset, nb, findings=findings, qemu_errors=qemu_errors,
                            overhanging=overhanging, moved_from=moved_from)


def salvage_snapshot_table_at(image: Qcow2Image, offset: int, nb_snapshots: int
                              ) -> SalvagedTable:
    """Salvage ``nb_snapshots`` snapshot table entries starting at file
    offset ``offset``, wherever the header points: the entry point for
    recovering a table the header no longer (or never) pointed at.  The
    entries are read as :func:`salvage_snapshot_table` reads the header's
    table, with every salvage rule; findings name entries of this table.

    Raises :class:`ValueError` for an offset outside the file or a count
    outside 1..QCOW_MAX_SNAPSHOTS."""
    if not 0 <= offset < image.file_size:
        raise ValueError(f"offset {offset:#x} is outside the file ({image.file_size} bytes)")
    if not 0 < nb_snapshots <= fmt.QCOW_MAX_SNAPSHOTS:
        raise ValueError(f"nb_snapshots must be 1..{fmt.QCOW_MAX_SNAPSHOTS}, not {nb_snapshots}")
    return _salvage_entries(image, offset, nb_snapshots, findings=[], qemu_errors=[],
                            overhanging=0, moved_from=None)


def _salvage_entries(image: Qcow2Image, offset: int, nb: int, *, findings: list[Finding],
                     qemu_errors: list[str], overhanging: int, moved_from: int | None
                     ) -> SalvagedTable:
    """Read ``nb`` entries at ``offset``, salvaging (the module docstring says
    how); ``findings`` and ``qemu_errors`` already hold what the header's
    fields gave."""
    h = image.header
    declared = nb + overhanging    # what nb_snapshots says, for the messages
    cs = image.cluster_size
    file_size = image.file_size
    entries: list[SalvagedEntry] = []

    def add(kind: str, severity: Severity, off: int | None, structure: str, message: str,
            repairable: RepairMode | None) -> None:
        findings.append(Finding(kind, severity, off, structure, message, repairable))

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
        hh = fmt.unpack_snapshot_header(data(pos, _HDR))
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
                f"nb_snapshots={declared} is larger than the table: entries "
                f"{i}..{nb - 1} ({remaining}) lie past the end of the file; --repair all "
                f"drops them", "all")
            for j in range(i, nb):
                entries.append(_phantom(j, offset + fmt.align_up(pos, 8) + (j - i) * _HDR,
                                        "lies past the end of the file"))
            break
        hh = fmt.unpack_snapshot_header(data(start, _HDR))
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
                f"{i} has no readable ID, name or L1 pointer: nb_snapshots={declared} "
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
        large, disk_size, icount, known = fmt.unpack_snapshot_extra(extra_raw, 0, extra)
        entry = SalvagedEntry(
            Snapshot(
                index=i, id_bytes=id_raw, name_bytes=name_raw,
                l1_table_offset=hh.l1_table_offset, l1_size=hh.l1_size, date_sec=hh.date_sec,
                date_nsec=hh.date_nsec, vm_clock_nsec=hh.vm_clock_nsec,
                vm_state_size_field=hh.vm_state_size, extra_data_size=extra,
                vm_state_size_large_field=large, disk_size_field=disk_size,
                icount_field=icount, unknown_extra=extra_raw[known:],
                entry_offset=entry_offset,
                disk_size=image.size if disk_size is None else disk_size),
            stored_extra_data_size=raw_extra,
            raw=b"" if rewrite else data(start, end - start), problems=problems,
            rewrite=rewrite)
        if h.version >= 3 and extra < 16:
            if not id_raw and not name_raw and hh.l1_size == 0 and hh.l1_table_offset == 0:
                remaining = nb - i
                add("snapshot-phantom", "corruption", entry_offset, structure,
                    f"snapshot table entries {i}..{nb - 1} ({remaining}) are not snapshots "
                    f"(entry {i} is empty: no ID, no name, no L1 table; nb_snapshots="
                    f"{declared} is larger than the table); --repair all drops them",
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
    hh = fmt.unpack_snapshot_header(image.pread(offset, _HDR))
    if hh.l1_table_offset & (image.cluster_size - 1) or hh.extra_data_size > _MAX_EXTRA:
        return False
    if hh.l1_size > fmt.QCOW_MAX_L1_SIZE // 8:
        return False
    return _plausible_id(image.pread(offset + _HDR + hh.extra_data_size, hh.id_str_size))


def _garbage(data: Callable[[int, int], bytes], start: int, hh: fmt.SnapshotHeaderFields,
             version: int, cs: int, file_size: int) -> bool:
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
    """An entry that is not a snapshot (it is dropped, never written)."""
    empty = Snapshot(
        index=index, id_bytes=b"", name_bytes=b"", l1_table_offset=0, l1_size=0, date_sec=0,
        date_nsec=0, vm_clock_nsec=0, vm_state_size_field=0, extra_data_size=0,
        vm_state_size_large_field=None, disk_size_field=None, icount_field=None,
        unknown_extra=b"", entry_offset=entry_offset, disk_size=0)
    return SalvagedEntry(empty, stored_extra_data_size=0, drop=why)


def _recover_extra(data: Callable[[int, int], bytes], header_plausible: Callable[[int], bool],
                   start: int, hh: fmt.SnapshotHeaderFields, last: bool, readable: int,
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
        large, disk, _, _ = fmt.unpack_snapshot_extra(raw, 0, extra)
        if large is not None and hh.vm_state_size and large != hh.vm_state_size:
            continue
        if disk is not None and (disk == 0 or disk % 512):
            continue
        if not last and not header_plausible(fmt.align_up(end, 8)):
            continue
        return extra
    return None


