"""The guest-to-host mapping of a layer, as ``qemu-img map`` prints it.

:func:`map_layer` walks the L1/L2 tables of the active layer or of a
snapshot and gives the runs ``qemu-img map --output=json`` gives (for a
snapshot: what it gives after ``qemu-img snapshot -a`` on a copy, which
shares the snapshot's clusters, so host offsets are the same), merged the
way ``img_map`` merges them (``entry_mergeable``), with the backing chain
followed as ``get_block_status`` follows it (depth 0 is the image).

The flags follow QEMU 7.2's ``qcow2_co_block_status`` and
``bdrv_co_block_status`` (``block/qcow2.c``, ``block/io.c``):

- normal (sub)clusters: present, data, offset;
- compressed clusters: present, data, no offset (``compressed`` is kept
  in the record; QEMU 7.2's JSON has no such key);
- zero clusters: present, zero; with a preallocated cluster also its offset;
- unallocated ranges read from the backing layer one depth down; without one
  (or past its end) they are zero and not present, at this depth, with the
  offset of a preallocated cluster (extended L2) if there is one;
- a raw backing file maps to itself, split into data and holes
  (``SEEK_DATA``/``SEEK_HOLE``, as QEMU's file driver does).

Not modelled: QEMU's metadata-preallocation heuristic, which for an image
file sparse inside its allocated clusters adds ``zero`` to data runs over
host holes.

Beside the mapping, :class:`MapProvenance` says where it came from in the
file (the snapshot table entry, the L1 table, each L2 table and the guest
range it covers).  Damaged tables (an unaligned or out-of-file L2 pointer,
an L2 entry QEMU refuses, an L1 table QEMU refuses) give entries marked
``damaged`` with the reason, and the walk goes on; ``strict=True`` raises
the :class:`~qcow2snap.errors.CorruptImageError` instead.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import format as fmt
from ..errors import CorruptImageError
from ..image import Qcow2Image, RawImage
from ..model import Snapshot
from ..reader import Layer

__all__ = ["L2TableUse", "MapEntry", "MapProvenance", "MapResult", "map_layer"]

Progress = Callable[[int, int], None]

# QEMU's QCow2SubclusterType, as small ints for the inner loop
_NORMAL, _COMPRESSED, _ZERO_PLAIN, _ZERO_ALLOC, _UNALLOC_PLAIN, _UNALLOC_ALLOC, _DAMAGED = range(7)
_HAS_HOST = (_NORMAL, _ZERO_ALLOC, _UNALLOC_ALLOC)


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One merged run, with ``qemu-img map``'s fields.  ``offset`` is None
    where QEMU prints none; ``file`` names the host file ``offset`` is in
    (the text format's File column).  A ``damaged`` run (its ``reason``
    given) could not be mapped; its flags are all false."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    file: str | None = None
    compressed: bool = False
    damaged: bool = False
    reason: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class L2TableUse:
    """An L2 table the mapping read: where it is, which L1 entry points at
    it, and the guest range it covers (clipped to the disk size)."""

    l1_index: int
    l2_table_offset: int
    guest_offset: int
    guest_length: int


@dataclass(frozen=True, slots=True)
class MapProvenance:
    """Where the mapping of the image itself (depth 0) comes from."""

    snapshot_entry_offset: int | None
    snapshot_entry_bytes: int | None
    l1_table_offset: int
    l1_size: int
    l2_tables: tuple[L2TableUse, ...]

    @property
    def l1_table_bytes(self) -> int:
        return self.l1_size * fmt.L1E_SIZE


@dataclass(frozen=True, slots=True)
class MapResult:
    """The mapping of one layer: merged :class:`MapEntry` runs covering
    ``[0, virtual_size)`` and their provenance."""

    image: str
    snapshot: Snapshot | None
    virtual_size: int
    entries: tuple[MapEntry, ...]
    provenance: MapProvenance
    damaged: tuple[MapEntry, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """True when no range is damaged."""
        return not self.damaged


@dataclass(slots=True)
class _Run:
    start: int
    length: int
    kind: int
    host: int | None = None
    reason: str | None = None


def _path_combine(base: str, name: str) -> str:
    """QEMU's ``path_combine``: ``name`` relative to the directory of ``base``."""
    if os.path.isabs(name):
        return name
    return base[:base.rfind("/") + 1] + name


def _backing_name(node: Qcow2Image, name: str) -> str:
    """The backing file's name as QEMU shows it: the image's name for it
    combined with the image's (a path given instead stays as given)."""
    path = node.backing_path() or ""
    named = node.backing_file_name
    if named:
        combined = _path_combine(name, named)
        if os.path.abspath(combined) == os.path.abspath(path):
            return combined
    return path


def _l2_runs(image: Qcow2Image, l2_offset: int, pos: int, end: int,
             strict: bool) -> Iterator[_Run]:
    """The (sub)cluster runs of guest ``[pos, end)``, all inside one L2
    table's span, classified as ``qcow2_get_subcluster_type`` does."""
    cs = image.cluster_size
    cluster_bits = image.cluster_bits
    l2_mask = image.l2_entries - 1
    extended = image.extended_l2
    data_file = image.has_data_file
    v2 = image.header.version < 3
    sc_bits = image.subcluster_bits
    sc_count = image.subclusters_per_cluster
    l2 = image.read_l2(l2_offset)
    cur: _Run | None = None
    while pos < end:
        l2_index = (pos >> cluster_bits) & l2_mask
        cluster_start = (pos >> cluster_bits) << cluster_bits
        cluster_end = min(cluster_start + cs, end)
        if extended:
            entry, bitmap = l2[2 * l2_index], l2[2 * l2_index + 1]
        else:
            entry, bitmap = l2[l2_index], 0
        host_cluster = entry & fmt.L2E_OFFSET_MASK
        where = f"(L2 offset: {fmt.c_hex(l2_offset)}, L2 index: {fmt.c_hex(l2_index)})"
        pieces: list[tuple[int, int, int | None]] = []   # (length, kind, host)
        problem: str | None = None
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            if data_file:
                problem = f"Compressed cluster entry found in image with external data file {where}"
            else:
                pieces.append((cluster_end - pos, _COMPRESSED, None))
        else:
            normal = bool(host_cluster) or bool(data_file and entry & fmt.QCOW_OFLAG_COPIED)
            if not extended:
                if entry & fmt.QCOW_OFLAG_ZERO:
                    kind = _ZERO_ALLOC if host_cluster else _ZERO_PLAIN
                    if v2:
                        problem = f"Zero cluster entry found in pre-v3 image {where}"
                else:
                    kind = _NORMAL if normal else _UNALLOC_PLAIN
                pieces.append((cluster_end - pos, kind, None))
            elif (bitmap & fmt.QCOW_L2_BITMAP_ALL_ALLOC if not normal
                  else (bitmap >> 32) & bitmap):
                problem = f"Invalid cluster entry found  {where}"
            else:
                sc_pos = pos
                while sc_pos < cluster_end:
                    sc_index = (sc_pos >> sc_bits) & (sc_count - 1)
                    sc_end = min(cluster_start + ((sc_index + 1) << sc_bits), cluster_end)
                    if bitmap & (1 << (32 + sc_index)):
                        kind = _ZERO_ALLOC if normal else _ZERO_PLAIN
                    elif normal:
                        kind = _NORMAL if bitmap & (1 << sc_index) else _UNALLOC_ALLOC
                    else:
                        kind = _UNALLOC_PLAIN
                    pieces.append((sc_end - sc_pos, kind, None))
                    sc_pos = sc_end
            if problem is None and normal and any(p[1] in _HAS_HOST for p in pieces):
                if host_cluster & (cs - 1):
                    problem = (f"Cluster allocation offset {fmt.c_hex(host_cluster)} "
                               f"unaligned {where}")
                elif data_file and host_cluster != cluster_start:
                    problem = (f"External data file host cluster offset "
                               f"{fmt.c_hex(host_cluster)} does not match guest cluster "
                               f"offset: {fmt.c_hex(cluster_start)}, L2 index: "
                               f"{fmt.c_hex(l2_index)})")
        if problem is not None:
            if strict:
                raise CorruptImageError(problem, structure="L2 table", offset=l2_offset)
            pieces = [(cluster_end - pos, _DAMAGED, None)]
        for length, kind, _ in pieces:
            host = host_cluster + (pos - cluster_start) if kind in _HAS_HOST else None
            if (cur is not None and cur.kind == kind and kind != _DAMAGED
                    and (host is None or (cur.host is not None
                                          and cur.host + cur.length == host))):
                cur.length += length
            else:
                if cur is not None:
                    yield cur
                cur = _Run(pos, length, kind, host, problem)
            pos += length
    if cur is not None:
        yield cur


def _layer_runs(image: Qcow2Image, layer: Layer, start: int, end: int, strict: bool,
                l2_used: list[L2TableUse] | None) -> Iterator[_Run]:
    """The runs of guest ``[start, end)`` of a qcow2 layer, one L1 entry's
    span at a time; damage confined to the span (or cluster) it hits."""
    cs = image.cluster_size
    l1_shift = image.cluster_bits + image.l2_bits
    l1 = image.l1_entries(layer)
    l1_size = layer.l1_size
    file_size = image.file_size
    # L1 entries past the end of the file (QEMU would read zeros there)
    l1_in_file = max(0, min(l1_size, (file_size - layer.l1_table_offset) // fmt.L1E_SIZE))
    pos = start
    while pos < end:
        l1_index = pos >> l1_shift
        span_end = min(end, (l1_index + 1) << l1_shift)
        problem: str | None = None
        if l1_in_file <= l1_index < l1_size:
            problem = (f"L1 table entry {fmt.c_hex(l1_index)} at "
                       f"{fmt.c_hex(layer.l1_table_offset + fmt.L1E_SIZE * l1_index)} lies past "
                       f"the end of the file ({file_size} bytes) in {layer.name}")
            span_end = min(end, l1_size << l1_shift)
            l2_offset = 0
        else:
            l2_offset = (l1[l1_index] if l1_index < l1_size else 0) & fmt.L1E_OFFSET_MASK
        if problem is None and not l2_offset:
            stop = ((end - 1) >> l1_shift) + 1
            # one step for a run of unmapped entries (stopping where the
            # table leaves the file), and for all of the range past the table
            j = (l1.next_mapped(l1_index + 1, min(stop, l1_in_file)) if l1_index < l1_size
                 else l1_size)
            span_end = end if j >= l1_size else min(end, j << l1_shift)
            yield _Run(pos, span_end - pos, _UNALLOC_PLAIN)
            pos = span_end
            continue
        if problem is None:
            if l2_used is not None:
                l2_used.append(L2TableUse(l1_index, l2_offset, l1_index << l1_shift,
                                          min(end, (l1_index + 1) << l1_shift)
                                          - (l1_index << l1_shift)))
            if l2_offset & (cs - 1):
                problem = (f"L2 table offset {fmt.c_hex(l2_offset)} unaligned (L1 index: "
                           f"{fmt.c_hex(l1_index)}) in {layer.name}")
            elif l2_offset + cs > file_size:
                problem = (f"L2 table offset {fmt.c_hex(l2_offset)} (L1 index: "
                           f"{fmt.c_hex(l1_index)}) lies past the end of the file "
                           f"({file_size} bytes) in {layer.name}")
        if problem is not None:
            if strict:
                raise CorruptImageError(problem, structure="L1 table",
                                        offset=layer.l1_table_offset + fmt.L1E_SIZE * l1_index)
            yield _Run(pos, span_end - pos, _DAMAGED, reason=problem)
        else:
            yield from _l2_runs(image, l2_offset, pos, span_end, strict)
        pos = span_end


def _raw_entries(raw: RawImage, start: int, end: int, depth: int, name: str) -> Iterator[MapEntry]:
    """A raw file's data and holes (QEMU's file driver: ``find_allocation``)."""
    fd = os.open(raw.path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:     # trailing hole
                    yield MapEntry(pos, end - pos, depth, True, True, False, pos, name)
                else:                            # no information: all data
                    yield MapEntry(pos, end - pos, depth, True, False, True, pos, name)
                return
            if data > pos:
                stop = min(data, end)
                yield MapEntry(pos, stop - pos, depth, True, True, False, pos, name)
            else:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                stop = min(end, hole + (-hole % fmt.BDRV_SECTOR_SIZE))
                yield MapEntry(pos, stop - pos, depth, True, False, True, pos, name)
            pos = stop
    finally:
        os.close(fd)


def _layer_size(node: Qcow2Image | RawImage) -> int:
    """``bdrv_getlength``: whole sectors (a raw file's size rounded up)."""
    if isinstance(node, Qcow2Image):
        return node.size
    return node.size + (-node.size % fmt.BDRV_SECTOR_SIZE)


_Item = _Run | MapEntry
_Frame = tuple[int, Qcow2Image, Iterator[_Item]]


def _status_entries(image: Qcow2Image, layer: Layer, name: str, strict: bool,
                    backing: bool, l2_used: list[L2TableUse],
                    progress: Progress | None) -> Iterator[MapEntry]:
    """Unmerged entries covering the layer, depth first through the chain
    (iteratively: a chain may be thousands of images deep)."""
    size = layer.size
    names = [name]
    stack: list[_Frame] = [(0, image, iter(_layer_runs(image, layer, 0, size, strict, l2_used)))]
    while stack:
        depth, node, items = stack[-1]
        item = next(items, None)
        if item is None:
            stack.pop()
            continue
        if isinstance(item, MapEntry):
            yield item
            continue
        if depth == 0 and progress is not None:
            progress(item.start + item.length, size)
        kind = item.kind
        host = item.host
        file = None
        if node.encrypted:   # QEMU gives no offset for encrypted clusters
            host = None
        if host is not None:
            file = (_path_combine(names[depth], node.data_file_name or "")
                    if node.has_data_file else names[depth])
        if kind == _DAMAGED:
            yield MapEntry(item.start, item.length, depth, False, False, False, damaged=True,
                           reason=item.reason)
            continue
        if kind not in (_UNALLOC_PLAIN, _UNALLOC_ALLOC):
            yield MapEntry(item.start, item.length, depth, True,
                           kind in (_ZERO_PLAIN, _ZERO_ALLOC),
                           kind in (_NORMAL, _COMPRESSED), host, file,
                           compressed=kind == _COMPRESSED)
            continue
        below = node.backing if backing else None
        below_size = _layer_size(below) if below is not None else 0
        inside = max(0, min(item.length, below_size - item.start))
        if inside < item.length:   # no backing layer, or past its end: zero here
            at = item.start + inside
            rest = MapEntry(at, item.length - inside, depth, False, True, False,
                            None if host is None else host + inside, file)
            stack.append((depth, node, iter([rest])))
        if inside:
            assert below is not None
            if len(names) == depth + 1:
                names.append(_backing_name(node, names[depth]))
            below_name = names[depth + 1]
            end = item.start + inside
            if isinstance(below, RawImage):
                stack.append((depth + 1, node,
                              _raw_entries(below, item.start, end, depth + 1, below_name)))
            else:
                stack.append((depth + 1, below,
                              _layer_runs(below, below.layer(None), item.start, end, strict,
                                          None)))


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    """``img_map``'s ``entry_mergeable``; damaged runs stand alone."""
    if a.damaged or b.damaged:
        return False
    if (a.zero, a.data, a.depth, a.present, a.file is None, a.offset is None) != (
            b.zero, b.data, b.depth, b.present, b.file is None, b.offset is None):
        return False
    if a.file is not None and a.file != b.file:
        return False
    return a.offset is None or b.offset == a.offset + a.length


def _merged(entries: Iterator[MapEntry]) -> Iterator[MapEntry]:
    cur: MapEntry | None = None
    for e in entries:
        if e.length == 0:
            continue
        if cur is not None and _mergeable(cur, e) and cur.compressed == e.compressed:
            cur = MapEntry(cur.start, cur.length + e.length, cur.depth, cur.present, cur.zero,
                           cur.data, cur.offset, cur.file, cur.compressed)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def _entry_bytes(sn: Snapshot) -> int:
    """The snapshot table entry's length (header, extra data, ID, name)."""
    return (fmt.QCOW_SNAPSHOT_HEADER_SIZE + sn.extra_data_size + len(sn.id_bytes)
            + len(sn.name_bytes))


def map_layer(image: Qcow2Image, snapshot: str | Snapshot | None = None, *,
              name: str | None = None, backing: bool = True, strict: bool = False,
              progress: Progress | None = None) -> MapResult:
    """Map the active layer (``snapshot=None``) or a snapshot of ``image``.

    ``name`` is the image's name for the File column (default: its path);
    ``backing=False`` maps without the backing chain (unallocated ranges are
    zero at depth 0).  Damaged ranges are entries with ``damaged=True``
    (listed in :attr:`MapResult.damaged` too) unless ``strict``, which raises
    the :class:`~qcow2snap.errors.CorruptImageError` of the first one.
    ``progress(done_bytes, total_bytes)`` is called as the walk advances.
    """
    sn = None if snapshot is None else image.find_snapshot(snapshot)
    label = name if name is not None else image.path
    l2_used: list[L2TableUse] = []
    try:
        layer = image.layer(sn)
    except CorruptImageError as exc:
        assert sn is not None
        if strict or image.size_to_l1(sn.disk_size) > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise
        size = sn.disk_size & ~(fmt.BDRV_SECTOR_SIZE - 1)
        bad = MapEntry(0, size, 0, False, False, False, damaged=True, reason=str(exc))
        entries: tuple[MapEntry, ...] = (bad,) if size else ()
        layer = Layer(sn.l1_table_offset, sn.l1_size, size, sn)
    else:
        entries = tuple(_merged(_status_entries(image, layer, label, strict, backing, l2_used,
                                                progress)))
    provenance = MapProvenance(
        None if sn is None else sn.entry_offset, None if sn is None else _entry_bytes(sn),
        layer.l1_table_offset, layer.l1_size, tuple(l2_used))
    return MapResult(label, sn, layer.size, entries, provenance,
                     tuple(e for e in entries if e.damaged))
