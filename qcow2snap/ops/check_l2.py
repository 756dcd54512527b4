"""What one L2 table references, for the check (operations layer).

:func:`scan_l2` reads an L2 table once and classifies every entry as
QEMU's ``check_refcounts_l2`` does: the host clusters it references (a
compressed cluster +1 per host cluster it touches), allocation and
fragmentation counts (``qemu-img check``'s statistics), and the entry
problems QEMU reports (reserved bits, misaligned clusters, COPIED on a
compressed cluster, subcluster bitmaps that contradict the entry).  The
checker applies the result once per path to the table
(:meth:`qcow2snap.ops.check.Checker.walk_l1`).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from functools import reduce
from itertools import compress, islice, repeat
from operator import and_, or_, rshift, sub

from .. import format as fmt
from ..image import Qcow2Image
from .check_report import RepairMode

__all__ = ["L2Info", "scan_l2"]


@dataclass
class L2Info:
    """What one L2 table references (computed once, applied per path)."""

    hosts: list[int] | array[int]         # host clusters, with repetition
    findings: list[tuple[str, int | None, str, RepairMode | None]]
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
    table = image.read_l2(l2)
    ext = image.extended_l2
    entries = table[0::2] if ext else table
    bitmaps = table[1::2] if ext else None
    info = L2Info([], [], [])
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

