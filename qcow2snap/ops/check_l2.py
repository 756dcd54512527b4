"""What one L2 table references, for the check (operations layer).

:func:`scan_l2` reads an L2 table once and classifies every entry as
QEMU's ``check_refcounts_l2`` does: the host clusters it references (a
compressed cluster +1 per host cluster it touches), allocation and
fragmentation counts (``qemu-img check``'s statistics), and the entry
problems QEMU reports (reserved bits, misaligned clusters, COPIED on a
compressed cluster, subcluster bitmaps that contradict the entry).  The
checker applies the result once per path to the table
(:meth:`qcow2snap.ops.check.Checker.walk_l1`).

Tables of plain entries (nearly all) are scanned in bulk, with no Python
work per entry: their references become *runs* (first host cluster,
count) of clusters that follow each other.  A table whose entries are all
allocated (preallocated images) is one integer XORed with the run its first
entry starts (the highest bit left is where the next run starts); others
are cut into stretches of allocated entries with ``bytes.find``, their host
clusters moved into place with strided slices.  Any entry the bulk path
cannot vouch for sends the table to the per-entry rules.
"""

from __future__ import annotations

import sys
from array import array
from functools import lru_cache, reduce
from itertools import accumulate, chain, compress, islice, pairwise, repeat
from operator import and_, or_, rshift, sub
from typing import Any

from .. import format as fmt
from ..image import Qcow2Image
from ..tables import nonzero_spans
from .check_report import RepairMode

__all__ = ["L2Info", "scan_l2"]

_LITTLE = sys.byteorder == "little"


#: the empty containers of every table scanned in bulk, shared (a table
#: scanned per entry gets its own: only that scan fills them)
_SHARED_LIST: list[Any] = []
_SHARED_FIXES: dict[int, int] = {}


class L2Info:
    """What one L2 table references (computed once, applied per path).

    A table of plain entries (nearly all) keeps its references as *runs*:
    ``runs`` is a flat ``array`` of (first host cluster, cluster count)
    pairs, maximal stretches of entries (in entry order, unallocated entries
    skipped) whose host clusters follow each other, and ``copied`` one byte
    per allocated entry (0xFD: OFLAG_COPIED set, 0xFF: clear).  ``hosts``
    then expands the runs on demand; other tables store ``hosts``."""

    __slots__ = (
        "_hosts",
        "allocated",
        "bulk",
        "compressed",
        "copied",
        "findings",
        "fixes",
        "fragmented",
        "more_findings",
        "past_eof",
        "paths",
        "runs",
        "unreferenced_data",
        "walked",
    )

    def __init__(self, hosts: list[int] | array[int], findings: list[tuple[str, int | None,
                 str, RepairMode | None]], past_eof: list[int]) -> None:
        self._hosts = hosts                   # host clusters, with repetition
        self.findings = findings
        self.past_eof = past_eof
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        #: entry index -> fixed value (repair all)
        self.fixes: dict[int, int] = _SHARED_FIXES
        #: findings beyond the ones kept in ``findings`` (counted, not listed)
        self.more_findings = 0
        #: ``hosts`` is exactly one cluster per entry with a host offset, in order
        self.bulk = False
        #: host clusters of compressed clusters that QEMU's check calls errors and
        #: so does not count (a non-zero subcluster bitmap), though QEMU reads them
        self.unreferenced_data: list[int] = _SHARED_LIST
        self.runs: array[int] | None = None
        #: the checker's: paths to this table not yet counted; reached at all
        self.paths = 0
        self.walked = False
        self.copied: bytes = b""

    @property
    def hosts(self) -> list[int] | array[int]:
        runs = self.runs
        if runs is None:
            return self._hosts
        return array("Q", chain.from_iterable(map(range, runs[0::2], map(
            int.__add__, runs[0::2], runs[1::2]))))

    @hosts.setter
    def hosts(self, value: list[int] | array[int]) -> None:
        self._hosts = value
        self.runs = None


class _Geometry:
    """Per cluster size constants of the bulk scan."""

    def __init__(self, cluster_bits: int) -> None:
        cs = 1 << cluster_bits
        n = cs // 8
        self.n = n
        self.zero = bytes(cs)
        bad = (fmt.QCOW_OFLAG_COMPRESSED | fmt.L2E_STD_RESERVED_MASK
               | ((cs - 1) & fmt.L2E_OFFSET_MASK))
        self.bad = bad
        #: (byte position in an entry, byte values allowed there)
        self.checks: list[tuple[int, bytes]] = []
        for position in range(8):
            m = (bad >> (8 * (7 - position))) & 0xFF
            if m:
                self.checks.append((position, bytes(v for v in range(256) if not v & m)))
        #: byte 0 of an entry -> marker: 0xFD with OFLAG_COPIED, 0xFF without
        self.mark = bytes(0xFD if v & 0x80 else 0xFF for v in range(256))
        self.zeros_n = bytes(n)
        #: offset bytes of five entries spread over a table
        self.samples = sorted({8 * ((n - 1) * k // 4) + 1 for k in range(5)})
        self.nonzero = bytes([0] + [1] * 255)
        # an entry without a host offset, once marked; it cannot match
        # across two entries (its 0xFE would have to be one of its zeros)
        self.unallocated = (b"\xff" + bytes(6) + b"\xfe", b"\xfd" + bytes(6) + b"\xfe")
        #: n big-endian u64 slots each holding one cluster's size
        self.step = int.from_bytes((bytes(7) + b"\x01") * n, "big") << cluster_bits
        self.cs = cs
        self.bits = cluster_bits


@lru_cache(maxsize=8)
def _geometry(cluster_bits: int) -> _Geometry:
    return _Geometry(cluster_bits)


#: a table with more stretches of non-zero entries than this is taken whole
_MAX_SPANS = 1024


_SIX_ZEROS = bytes(6)


def _offset_runs(offsets: bytes | bytearray, geom: _Geometry) -> array[int]:
    """Flat (first host cluster, count) pairs of the stretches of
    ``offsets`` (big-endian host offsets, flag bits cleared, at least one)
    that follow each other by one cluster, with no Python work per entry:
    the offsets are one integer, one cluster is added to every entry at
    once, and XORing entries 1.. with the sums of entries ..n-2 leaves
    non-zero exactly the slots where a run breaks (none: one comparison;
    a few in a long table: bisection); each slot is folded onto its low
    byte, and splitting those bytes at the non-zero ones gives the run
    lengths."""
    count = len(offsets) >> 3
    whole = int.from_bytes(offsets, "big")
    step = geom.step if count == geom.n else geom.step >> (64 * (geom.n - count))
    nexts = (whole + step).to_bytes(8 * count, "big")   # each offset plus one cluster
    if nexts[:-8] == offsets[8:]:
        return array("Q", (whole >> (64 * (count - 1) + geom.bits), count))
    if count >= _FEW_BREAKS_MIN_ENTRIES:
        pairs = _break_pairs(nexts, offsets, count)
        if pairs is not None:
            starts = [0, *(pair + 1 for pair in pairs), count]
            return array("Q", chain.from_iterable(
                (int.from_bytes(offsets[8 * a:8 * a + 8], "big") >> geom.bits, b - a)
                for a, b in pairwise(starts)))
    breaks = ((whole + step) >> 64) ^ (whole & ((1 << (64 * (count - 1))) - 1))
    # fold each slot onto its low byte (the bits shifted in from the slot
    # above land in the upper bytes only)
    breaks |= breaks >> 32
    breaks |= breaks >> 16
    breaks |= breaks >> 8
    # one byte per pair of neighbours: 1 where the second starts a run
    marks = breaks.to_bytes(8 * (count - 1), "big")[7::8].translate(geom.nonzero)
    lengths = array("Q", map((1).__add__, map(len, marks.split(b"\x01"))))
    firsts = array("Q")
    firsts.frombytes(offsets)
    if _LITTLE:
        firsts.byteswap()
    runs = array("Q", bytes(16 * len(lengths)))
    runs[0::2] = array("Q", map(rshift, map(firsts.__getitem__, accumulate(
        lengths[:-1], initial=0)), repeat(geom.bits)))
    runs[1::2] = lengths
    return runs


#: long tables (preallocated ones: a few breaks where metadata sits between
#: their data) look for their breaks by bisection first, up to
#: :data:`_FEW_BREAKS` of them
_FEW_BREAKS_MIN_ENTRIES = 1024
_FEW_BREAKS = 16


def _break_pairs(nexts: bytes, offsets: bytes | bytearray, count: int) -> list[int] | None:
    """The neighbour pairs (j, j+1) of ``offsets`` where entry j+1 is not
    entry j plus one cluster (``nexts``: every entry plus one cluster), in
    order, by bisecting byte ranges that differ (a memcmp each); None past
    :data:`_FEW_BREAKS` of them."""
    found: list[int] = []
    ranges = [(0, count - 1)]   # pair ranges [first, stop)
    while ranges:
        first, stop = ranges.pop()
        if nexts[8 * first:8 * stop] == offsets[8 * first + 8:8 * stop + 8]:
            continue
        if stop - first == 1:
            if len(found) == _FEW_BREAKS:
                return None
            found.append(first)
            continue
        middle = (first + stop) >> 1
        ranges += ((middle, stop), (first, middle))
    return found


def _runs_end(runs: array[int]) -> int:
    """One past the last host cluster of flat (first, count) ``runs``."""
    return max(map(int.__add__, runs[0::2], runs[1::2]))


@lru_cache(maxsize=64)
def _uniform(flags: bytes) -> bytes:
    return flags


def _flags(flags: bytes) -> bytes:
    """``flags``, one shared object when all are alike (most tables)."""
    if flags.count(flags[:1]) == len(flags):
        return _uniform(flags)
    return flags


def _scan_bulk(raw: bytes, geom: _Geometry, file_clusters: int) -> L2Info | None:
    """The references of a table of plain entries as host-cluster runs, by
    whole-table byte operations; None when an entry needs the per-entry
    rules (compressed, reserved bits, misaligned, past the end of the file)."""
    info = L2Info(_SHARED_LIST, _SHARED_LIST, _SHARED_LIST)
    info.bulk = True
    info.runs = array("Q")
    if raw == geom.zero:
        return info
    if all(raw[at:at + 6] != _SIX_ZEROS for at in geom.samples):
        # five entries spread over the table allocated: likely all are (a
        # preallocated image), so the whole table at once
        live = raw
    else:
        spans = nonzero_spans(raw, _MAX_SPANS)
        live = raw if spans is None else b"".join([raw[a:b] for a, b in spans])
    # all entries outside ``live`` are zero: the column checks need only it
    for position, allowed in geom.checks:
        if live[position::8].translate(None, allowed):
            return None
    count = len(live) >> 3
    flags = live[0::8].translate(geom.mark)
    offsets = bytearray(live)
    offsets[0::8] = offsets[7::8] = bytes(count)
    runs = _offset_runs(offsets, geom)
    if 0 in runs[0::2]:
        # entries without a host offset (flags only, or zero): an entry
        # without one, once marked, matches only whole entries
        offsets[0::8] = flags
        offsets[7::8] = b"\xfe" * count
        p1, p2 = geom.unallocated
        offsets = offsets.replace(p1, b"").replace(p2, b"")
        count = len(offsets) >> 3
        if not count:
            return info
        flags = bytes(offsets[0::8])
        offsets[0::8] = offsets[7::8] = bytes(count)
        runs = _offset_runs(offsets, geom)
    if _runs_end(runs) > file_clusters:
        return None
    info.runs = runs
    info.allocated = count
    info.fragmented = (len(runs) >> 1) - 1
    info.copied = _flags(flags)
    return info


def scan_l2(image: Qcow2Image, l2: int) -> L2Info:
    """What the L2 table at ``l2`` references (host clusters, with
    repetition, in entry order), its allocation counts and the problems of
    its entries, computed once and applied per path by the checker.  Tables
    without compressed, misaligned or reserved entries (nearly all) take a
    bulk path of C-level passes."""
    cs = image.cluster_size
    bits = image.cluster_bits
    file_size = image.file_size
    file_clusters = (file_size + cs - 1) >> bits
    ext = image.extended_l2
    data_file = image.has_data_file
    if not ext and not data_file:
        bulk = _scan_bulk(image.pread(l2, cs), _geometry(bits), file_clusters)
        if bulk is not None:
            return bulk
    table = image.read_l2(l2)
    entries = table[0::2] if ext else table
    bitmaps = table[1::2] if ext else None
    info = L2Info([], [], [])
    info.fixes = {}
    info.unreferenced_data = []
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
        if hosts and max(hosts) >= file_clusters:
            info.past_eof = [hc for hc in hosts if hc >= file_clusters]
            info.hosts = [hc for hc in hosts if hc < file_clusters]
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
    for j, e in zip(live_index, live, strict=True):
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
            if coffset + csize - file_size >= cs:
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
        if host + cs - file_size >= cs:
            info.past_eof.append(host >> bits)
            continue
        info.hosts.append(host >> bits)
        if host & (cs - 1):
            info.hosts.append((host >> bits) + 1)
    if len(info.findings) > 64:   # a table of garbage: count, list a few
        info.more_findings = len(info.findings) - 64
        del info.findings[64:]
    return info

