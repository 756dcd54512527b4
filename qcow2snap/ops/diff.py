"""The difference between two layers of one image (operations layer): two
snapshots, or a snapshot and the active layer.

The metadata diff reads no guest data.  It walks the two L1 tables side by
side, in bulk: where both entries point at the same L2 table (or neither
maps one) the whole L2 range maps the same and is skipped unread; where the
L2 tables differ, they are compared as arrays in blocks and then entry by
entry (the COPIED flag ignored), and only the runs of differing entries are
classified through :func:`qcow2snap.reader.iter_extents` on both sides.  A
range is reported where the two mappings differ: another host cluster or
another state (data, zero, unallocated, compressed; with extended L2 per
subcluster).  Two unallocated ranges read the same backing file at the same
offset, two zero ranges read zeros, two data ranges at the same host offset
read the same bytes: those are equal without reading them.

With ``content=True`` only the reported ranges are read, on both sides
(through the backing file where unallocated), and the clusters whose bytes
are equal are dropped: the cost follows the changed data, never the disk
size.

Layers of different sizes: the tail of the larger one, past the smaller
size, is reported whole (the other side has ``absent`` there), even where
it reads as zeros.

Damaged L1/L2 entries on either side are reported as ``damaged`` ranges
(with QEMU's message) and the diff goes on, unless ``strict``, which raises
the :class:`~qcow2snap.errors.CorruptImageError`.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import format as fmt
from ..errors import CorruptImageError
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import DiskReader, Layer, iter_extents
from ..tables import decode_u64_table

__all__ = ["DamagedRange", "DiffRange", "DiffResult", "Mapping", "diff_layers"]

ProgressCallback = Callable[[int, int], None]

#: L1 entries compared as one array slice before looking at single entries
_L1_BLOCK = 512
#: L2 entries compared as one array slice before looking at single entries
_L2_BLOCK = 64
#: bytes read per side and step by the content comparison
_READ_BYTES = 4 << 20   # at least two clusters of the largest size (2 MiB)
_NOT_COPIED = ((1 << 64) - 1) & ~fmt.QCOW_OFLAG_COPIED


@dataclass(frozen=True, slots=True)
class Mapping:
    """What one side has at a range: ``kind`` is ``data``, ``zero``,
    ``unallocated`` (reads from the backing file, or zeros), ``compressed``,
    ``damaged`` (its metadata cannot be read) or ``absent`` (past that
    side's disk size).  ``host_offset``: where the range starts in the image
    file for ``data``; the compressed cluster's bytes for ``compressed``."""

    kind: str
    host_offset: int | None = None


ABSENT = Mapping("absent")
DAMAGED = Mapping("damaged")


@dataclass(frozen=True, slots=True)
class DiffRange:
    """A run of guest space where the two layers differ."""

    guest_offset: int
    length: int
    a: Mapping
    b: Mapping

    @property
    def guest_end(self) -> int:
        return self.guest_offset + self.length

    def slice(self, start: int, end: int) -> DiffRange:
        """The part ``[start, end)`` of this range (data host offsets moved)."""
        return DiffRange(start, end - start, _shift(self.a, start - self.guest_offset),
                         _shift(self.b, start - self.guest_offset))


@dataclass(frozen=True, slots=True)
class DamagedRange:
    """Guest space of one side (``a`` or ``b``) whose metadata is damaged."""

    side: str
    guest_offset: int
    length: int
    message: str


@dataclass(frozen=True)
class DiffResult:
    """The differences of layer ``b`` from layer ``a`` of one image."""

    path: str
    a: Layer
    b: Layer
    content: bool
    ranges: tuple[DiffRange, ...]
    damaged: tuple[DamagedRange, ...] = ()
    #: guest bytes read per side by the content comparison
    bytes_read: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    @property
    def range_count(self) -> int:
        return len(self.ranges)

    @property
    def complete(self) -> bool:
        """False where damage kept part of either side from being compared."""
        return not self.damaged


def _shift(mapping: Mapping, delta: int) -> Mapping:
    if mapping.kind == "data" and mapping.host_offset is not None:
        return Mapping("data", mapping.host_offset + delta)
    return mapping


#: one side's run: (start, end, kind, host offset at start)
_Run = tuple[int, int, str, int | None]


def _contiguous(prev: Mapping, prev_length: int, new: Mapping) -> bool:
    if prev.kind != new.kind:
        return False
    if prev.kind == "data":
        return (prev.host_offset is not None and new.host_offset is not None
                and prev.host_offset + prev_length == new.host_offset)
    return prev.host_offset == new.host_offset


def _append(ranges: list[DiffRange], new: DiffRange) -> None:
    """Add ``new``, merged into the last range where it continues it."""
    if ranges:
        last = ranges[-1]
        if (last.guest_end == new.guest_offset and _contiguous(last.a, last.length, new.a)
                and _contiguous(last.b, last.length, new.b)):
            ranges[-1] = DiffRange(last.guest_offset, last.length + new.length, last.a, last.b)
            return
    ranges.append(new)


def _same(a: Mapping, b: Mapping) -> bool:
    """Do two mappings of the same guest offset read the same bytes?"""
    if a.kind != b.kind or a.kind in ("damaged", "absent"):
        return False
    if a.kind in ("zero", "unallocated"):
        return True
    return a.host_offset == b.host_offset


@dataclass
class _Walk:
    image: Qcow2Image
    strict: bool
    damaged: list[DamagedRange] = field(default_factory=list)

    def runs(self, side: str, layer: Layer, start: int, end: int) -> list[_Run]:
        """The runs of ``[start, end)`` of one side; damaged parts become
        ``damaged`` runs (narrowed down to the L2 range of a bad L1 entry,
        or to single clusters), or raise under ``strict``."""
        out: list[_Run] = []
        self._runs_into(out, side, layer, start, end)
        return out

    def _runs_into(self, out: list[_Run], side: str, layer: Layer, start: int, end: int) -> None:
        try:
            found = [(e.guest_offset, e.guest_end, e.kind.value,
                      e.host_offset) for e in iter_extents(self.image, layer, start, end - start)]
        except CorruptImageError as exc:
            if self.strict:
                raise
            image = self.image
            l1_shift = image.cluster_bits + image.l2_bits
            one_l2 = start >> l1_shift == (end - 1) >> l1_shift
            one_cluster = start >> image.cluster_bits == (end - 1) >> image.cluster_bits
            if one_cluster or (one_l2 and exc.structure == "L1 table"):
                out.append((start, end, "damaged", None))
                last = self.damaged[-1] if self.damaged else None
                if (last is not None and last.side == side and last.message == str(exc)
                        and last.guest_offset + last.length == start):
                    self.damaged[-1] = DamagedRange(side, last.guest_offset,
                                                    end - last.guest_offset, str(exc))
                else:
                    self.damaged.append(DamagedRange(side, start, end - start, str(exc)))
                return
            unit = image.cluster_size if one_l2 else 1 << l1_shift
            first = (start // unit + 1) * unit
            last_boundary = ((end - 1) // unit) * unit
            mid = min(max((start + end) // 2 // unit * unit, first), last_boundary)
            self._runs_into(out, side, layer, start, mid)
            self._runs_into(out, side, layer, mid, end)
            return
        out.extend(found)

    def compare(self, ranges: list[DiffRange], a: Layer, b: Layer, start: int, end: int) -> None:
        """Classify ``[start, end)`` on both sides and add where they differ."""
        _intersect(ranges, self.runs("a", a, start, end), self.runs("b", b, start, end))


def _intersect(ranges: list[DiffRange], runs_a: list[_Run], runs_b: list[_Run]) -> None:
    i = j = 0
    while i < len(runs_a) and j < len(runs_b):
        sa, ea, ka, ha = runs_a[i]
        sb, eb, kb, hb = runs_b[j]
        lo = max(sa, sb)
        hi = min(ea, eb)
        if lo < hi:
            ma = Mapping(ka, ha if ka != "data" or ha is None else ha + lo - sa)
            mb = Mapping(kb, hb if kb != "data" or hb is None else hb + lo - sb)
            if not _same(ma, mb):
                _append(ranges, DiffRange(lo, hi - lo, ma, mb))
        if ea <= eb:
            i += 1
        if eb <= ea:
            j += 1


def _l1_prefix(image: Qcow2Image, layer: Layer, count: int) -> array[int]:
    """The first ``count`` L1 entries of a layer (zeros past its table)."""
    mine = min(count, layer.l1_size)
    table = decode_u64_table(image.pread(layer.l1_table_offset, mine * fmt.L1E_SIZE))
    if mine < count:
        table.extend(array(table.typecode, bytes(8 * (count - mine))))
    return table


def _differing_entries(image: Qcow2Image, ta: array[int], tb: array[int],
                       count: int) -> Iterator[tuple[int, int]]:
    """Runs ``[first, end)`` of L2 indices below ``count`` whose entries
    differ (COPIED ignored; with extended L2, the bitmaps too)."""
    width = 2 if image.extended_l2 else 1
    run_start: int | None = None
    for block in range(0, count, _L2_BLOCK):
        block_end = min(block + _L2_BLOCK, count)
        if ta[block * width:block_end * width] == tb[block * width:block_end * width]:
            if run_start is not None:
                yield run_start, block
                run_start = None
            continue
        for index in range(block, block_end):
            k = index * width
            differs = (ta[k] ^ tb[k]) & _NOT_COPIED or (width == 2 and ta[k + 1] != tb[k + 1])
            if differs:
                if run_start is None:
                    run_start = index
            elif run_start is not None:
                yield run_start, index
                run_start = None
    if run_start is not None:
        yield run_start, count


def _metadata_diff(walk: _Walk, a: Layer, b: Layer,
                   progress: ProgressCallback | None) -> list[DiffRange]:
    image = walk.image
    cluster_bits = image.cluster_bits
    cs = image.cluster_size
    l1_shift = cluster_bits + image.l2_bits
    common = min(a.size, b.size)
    total = max(a.size, b.size)
    n_l1 = (common + (1 << l1_shift) - 1) >> l1_shift
    la = _l1_prefix(image, a, n_l1)
    lb = _l1_prefix(image, b, n_l1)
    mask = fmt.L1E_OFFSET_MASK
    ranges: list[DiffRange] = []
    for block in range(0, n_l1, _L1_BLOCK):
        block_end = min(block + _L1_BLOCK, n_l1)
        if la[block:block_end] != lb[block:block_end]:
            for index in range(block, block_end):
                oa = la[index] & mask
                ob = lb[index] & mask
                if oa == ob:
                    continue            # the same L2 table, or neither maps one
                gs = index << l1_shift
                ge = min(common, gs + (1 << l1_shift))
                if not oa or not ob or (oa | ob) & (cs - 1):
                    walk.compare(ranges, a, b, gs, ge)
                    continue
                count = (ge - gs + cs - 1) >> cluster_bits
                for first, end in _differing_entries(image, image.read_l2(oa),
                                                     image.read_l2(ob), count):
                    walk.compare(ranges, a, b, gs + (first << cluster_bits),
                                 min(ge, gs + (end << cluster_bits)))
        if progress is not None:
            progress(min(block_end << l1_shift, common), total)
    if a.size != b.size:
        bigger, side = (a, "a") if a.size > b.size else (b, "b")
        for start, end, kind, host in walk.runs(side, bigger, common, bigger.size):
            mapping = Mapping(kind, host)
            _append(ranges, DiffRange(start, end - start, mapping if side == "a" else ABSENT,
                                      mapping if side == "b" else ABSENT))
    if progress is not None:
        progress(total, total)
    return ranges


def _content_filter(image: Qcow2Image, a: Layer, b: Layer, ranges: list[DiffRange],
                    progress: ProgressCallback | None) -> tuple[list[DiffRange], int]:
    """Keep the clusters of ``ranges`` whose bytes differ (ranges with a
    damaged or absent side are kept whole).  Returns them and the bytes
    read per side."""
    cs = image.cluster_size
    to_read = [r for r in ranges if "damaged" not in (r.a.kind, r.b.kind)
               and "absent" not in (r.a.kind, r.b.kind)]
    total = sum(r.length for r in to_read)
    reader_a = DiskReader(image, a)
    reader_b = DiskReader(image, b)
    # one buffer per side, filled in place: a fresh 4 MiB object per step
    # would be a fresh mmap (the CLI fixes glibc's mmap threshold at 4 MiB,
    # copier.prefer_heap_reuse) and a page fault per 4 KiB of it
    step_bytes = max(cs, _READ_BYTES // cs * cs)
    buf_a = bytearray(step_bytes)
    buf_b = bytearray(step_bytes)
    view_a = memoryview(buf_a)
    view_b = memoryview(buf_b)
    kept: list[DiffRange] = []
    done = 0
    for r in ranges:
        if "damaged" in (r.a.kind, r.b.kind) or "absent" in (r.a.kind, r.b.kind):
            _append(kept, r)
            continue
        pos = r.guest_offset
        while pos < r.guest_end:
            # steps end on cluster boundaries, so clusters are compared whole
            step_end = min(r.guest_end, (pos + step_bytes) // cs * cs)
            n = step_end - pos
            reader_a.read_at(pos, view_a[:n])
            reader_b.read_at(pos, view_b[:n])
            # bytearray equality is a memcmp; memoryview equality is not
            if n == step_bytes:
                bytes_a, bytes_b = buf_a, buf_b
            else:
                bytes_a, bytes_b = buf_a[:n], buf_b[:n]
            if bytes_a != bytes_b:
                piece = pos
                while piece < step_end:
                    piece_end = min(step_end, (piece // cs + 1) * cs)
                    lo = piece - pos
                    hi = piece_end - pos
                    if bytes_a[lo:hi] != bytes_b[lo:hi]:
                        _append(kept, r.slice(piece, piece_end))
                    piece = piece_end
            done += step_end - pos
            pos = step_end
            if progress is not None:
                progress(done, total)
    return kept, total


def diff_layers(image: Qcow2Image, a: str | Snapshot | None, b: str | Snapshot | None, *,
                content: bool = False, progress: ProgressCallback | None = None,
                strict: bool = False) -> DiffResult:
    """The guest ranges where layer ``b`` differs from layer ``a`` of
    ``image`` (a snapshot reference or :class:`Snapshot`, ``None`` for the
    active layer).

    Metadata only by default (no guest data read); ``content=True`` then
    reads the differing ranges of both sides and drops the clusters whose
    bytes are equal.  ``progress(done, total)`` is called as the walk goes
    (guest bytes; with ``content``, bytes read).  Damaged L1/L2 entries
    give ``damaged`` ranges and :attr:`DiffResult.damaged` unless
    ``strict``, which raises the :class:`CorruptImageError` instead.
    The image is only read.
    """
    layer_a = image.layer(a)
    layer_b = image.layer(b)
    walk = _Walk(image, strict)
    ranges = _metadata_diff(walk, layer_a, layer_b, None if content else progress)
    bytes_read = 0
    if content:
        ranges, bytes_read = _content_filter(image, layer_a, layer_b, ranges, progress)
    return DiffResult(image.path, layer_a, layer_b, content, tuple(ranges),
                      tuple(walk.damaged), bytes_read)
