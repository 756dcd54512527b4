"""Refcount structures (image-model layer): read the refcount table and
blocks of an image, and compute references the way QEMU's checker does.

``RefcountReader`` answers "what refcount does the image store for host
cluster N" with one decoded block cached per block touched.

``l2_references`` lists the host clusters one L2 table references (QEMU's
counting rule, QEMU's ``qcow2_check_refcounts``): NORMAL and ZERO_ALLOC entries reference
their cluster, a COMPRESSED entry references every host cluster its bytes
touch.  Operations multiply that by the number of L1 paths to the table.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from itertools import compress
from typing import TYPE_CHECKING, TypeAlias

from . import format as fmt
from .errors import CorruptImageError
from .tables import (
    decode_refcount_block,
    decode_u64_table,
    encode_refcount_block,
    encode_u64_table,
    l2_host_clusters,
    nonzero_runs,
    refcount_block_entries,
)

if TYPE_CHECKING:
    from .image import Qcow2Image

__all__ = ["RefcountReader", "compressed_extent", "l2_entry_references", "l2_references",
           "write_fresh_refcounts"]


#: decoded refcount blocks a :class:`RefcountReader` keeps (bytes; the
#: oldest read is dropped first past it, and read again if asked for)
READER_CACHE_BYTES = 16 << 20


class RefcountReader:
    """On-disk refcounts of an image (as of when it was opened).  Decoded
    blocks are kept up to ``cache_bytes`` (an edit of a fully allocated
    multi-TiB image reads thousands of them)."""

    def __init__(self, image: Qcow2Image, cache_bytes: int | None = None) -> None:
        h = image.header
        self.image = image
        #: bytes of decoded blocks kept (default :data:`READER_CACHE_BYTES`)
        self.cache_bytes = READER_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cluster_bits = image.cluster_bits
        self.refcount_order = h.refcount_order
        self.block_entries = refcount_block_entries(image.cluster_bits, h.refcount_order)
        self.block_bits = self.block_entries.bit_length() - 1
        self.table_offset = h.refcount_table_offset
        self.table_clusters = h.refcount_table_clusters
        raw = image.pread(h.refcount_table_offset, h.refcount_table_clusters << image.cluster_bits)
        self.table: array[int] = decode_u64_table(raw)
        self._blocks: dict[int, array[int]] = {}
        self._blocks_bytes = 0

    def block_offset(self, table_index: int) -> int:
        """Host offset of refcount block ``table_index`` (0 = not allocated)."""
        if table_index >= len(self.table):
            return 0
        entry = self.table[table_index]
        offset = entry & fmt.REFT_OFFSET_MASK
        if entry & fmt.REFT_RESERVED_MASK or offset & ((1 << self.cluster_bits) - 1):
            raise CorruptImageError(
                f"refcount table entry {table_index} is corrupt ({entry:#x}): reserved bits "
                f"set or block not cluster aligned; run 'qcow2snap check'",
                structure="refcount table", offset=self.table_offset + 8 * table_index)
        return offset

    def block(self, table_index: int) -> array[int] | None:
        """Decoded refcount block, or None when not allocated."""
        cached = self._blocks.get(table_index)
        if cached is not None:
            return cached
        offset = self.block_offset(table_index)
        if not offset:
            return None
        data = self.image.pread(offset, 1 << self.cluster_bits)
        block = decode_refcount_block(data, self.refcount_order)
        size = len(block) * block.itemsize
        while self._blocks and self._blocks_bytes + size > self.cache_bytes:
            dropped = self._blocks.pop(next(iter(self._blocks)))
            self._blocks_bytes -= len(dropped) * dropped.itemsize
        self._blocks[table_index] = block
        self._blocks_bytes += size
        return block

    def get(self, cluster_index: int) -> int:
        block = self.block(cluster_index >> self.block_bits)
        if block is None:
            return 0
        return block[cluster_index & (self.block_entries - 1)]

    def blocks_in_use(self) -> Iterable[tuple[int, int]]:
        """(table index, block host offset) of every allocated block."""
        for index in range(len(self.table)):
            offset = self.block_offset(index)
            if offset:
                yield index, offset


def compressed_extent(image: Qcow2Image, entry: int) -> tuple[int, int]:
    """The host bytes ``(offset, length)`` QEMU reads for a compressed L2
    entry: from its offset to the end of its last 512-byte sector."""
    coffset = entry & image.cluster_offset_mask
    nb_csectors = ((entry >> image.csize_shift) & image.csize_mask) + 1
    return coffset, nb_csectors * 512 - (coffset & 511)


def l2_entry_references(image: Qcow2Image, entry: int) -> list[int]:
    """Host cluster indexes one L2 entry holds a reference on."""
    cluster_bits = image.cluster_bits
    if entry & fmt.QCOW_OFLAG_COMPRESSED:
        coffset, csize = compressed_extent(image, entry)
        first = coffset >> cluster_bits
        last = (coffset + csize - 1) >> cluster_bits
        return list(range(first, last + 1))
    host = entry & fmt.L2E_OFFSET_MASK
    if host:
        return [host >> cluster_bits]
    return []


#: tables of fewer entries (small clusters) take the per-entry route: the
#: bulk one's fixed cost is more than a comprehension over 64 entries
BULK_ENTRIES = 512


#: what :func:`l2_live` returns
LiveEntries: TypeAlias = "tuple[list[tuple[int, int]], array[int], array[int] | list[int], bool]"


def l2_live(entries: array[int], cluster_bits: int) -> LiveEntries:
    """The entries of an L2 table that are not all-zero, as ``(runs, live,
    hosts, compressed)``: the index runs they occupy, their values, their
    host clusters (0 for a compressed entry or one without an offset), and
    whether any is compressed.  Big tables are done in bulk
    (:func:`~qcow2snap.tables.nonzero_runs`,
    :func:`~qcow2snap.tables.l2_host_clusters`), small ones entry by
    entry.  ``entries`` holds plain entries (``table[0::2]`` when extended)."""
    mask = fmt.L2E_OFFSET_MASK
    compressed = fmt.QCOW_OFLAG_COMPRESSED
    if len(entries) < BULK_ENTRIES:
        indexes = list(compress(range(len(entries)), entries))
        live = array(entries.typecode, [entries[j] for j in indexes])
        hosts = [(e & mask) >> cluster_bits if not e & compressed else 0 for e in live]
        return ([(j, j + 1) for j in indexes], live, hosts,
                any(e & compressed for e in live))
    runs = nonzero_runs(entries)
    live = array(entries.typecode)
    for start, stop in runs:
        live += entries[start:stop]
    all_hosts = l2_host_clusters(entries, cluster_bits)
    if all_hosts is None:
        return (runs, live, [(e & mask) >> cluster_bits if not e & compressed else 0
                             for e in live], True)
    bulk = array(all_hosts.typecode)
    for start, stop in runs:
        bulk += all_hosts[start:stop]
    return runs, live, bulk, False


def l2_references(image: Qcow2Image, l2_offset: int,
                  table: array[int] | None = None) -> list[int]:
    """Host cluster indexes referenced by the entries of one L2 table
    (with repetitions: one per referencing entry); ``table`` if the caller
    read it already."""
    if table is None:
        table = image.read_l2(l2_offset)
    entries = table[0::2] if image.extended_l2 else table
    _, live, hosts, has_compressed = l2_live(entries, image.cluster_bits)
    out = list(filter(None, hosts))   # the non-zero ones: filter is ~3x compress
    if has_compressed:
        for entry in live:
            if entry & fmt.QCOW_OFLAG_COMPRESSED:
                out.extend(l2_entry_references(image, entry))
    return out


def decode_l1(image: Qcow2Image, l1_table_offset: int, l1_size: int) -> array[int]:
    """An L1 table read from the file (not cached)."""
    return decode_u64_table(image.pread(l1_table_offset, l1_size * fmt.L1E_SIZE))


def table_clusters_for(blocks: int, cluster_bits: int) -> int:
    """Clusters of refcount table that hold ``blocks`` block pointers (at
    least one: QEMU refuses an image without a refcount table)."""
    return max(1, -(-blocks * fmt.REFTABLE_ENTRY_SIZE >> cluster_bits))


def self_describing_refcounts(first_cluster: int, cluster_bits: int, refcount_order: int,
                              *, min_blocks: int = 0, min_table_clusters: int = 1
                              ) -> tuple[int, int]:
    """Size refcount structures that describe themselves.

    Refcount blocks followed by a refcount table, placed contiguously from
    host cluster ``first_cluster``, must cover every cluster before them
    *and themselves*; adding a block can need another table cluster and the
    other way round, so this is a fixed point.  Returns (blocks, table
    clusters), at least ``min_blocks`` / ``min_table_clusters``.  The one
    sizing rule for every writer that lays out refcounts from scratch:
    repair's rebuild, qcow2 extraction, compaction."""
    per_block = refcount_block_entries(cluster_bits, refcount_order)
    blocks, table = min_blocks, min_table_clusters
    while True:
        end = first_cluster + blocks + table
        need_blocks = max(blocks, -(-end // per_block))
        need_table = max(table, table_clusters_for(need_blocks, cluster_bits))
        if (need_blocks, need_table) == (blocks, table):
            return blocks, table
        blocks, table = need_blocks, need_table


def write_fresh_refcounts(pwrite: Callable[[bytes, int], None], refcounts: dict[int, int],
                          first_cluster: int, cluster_bits: int, refcount_order: int = 4
                          ) -> tuple[int, int, int]:
    """Write the refcount blocks and table of a file being written from
    scratch, contiguously from host cluster ``first_cluster`` (after every
    other cluster): ``refcounts`` maps host cluster -> count (the blocks and
    the table are added, at 1).  ``pwrite(data, offset)`` writes the file.
    Returns (refcount table offset, its clusters, the first cluster after
    it: the file's end).  Used by qcow2 extraction and chain import."""
    entries_per_block = refcount_block_entries(cluster_bits, refcount_order)
    nb_blocks, nb_table_clusters = self_describing_refcounts(first_cluster, cluster_bits,
                                                             refcount_order, min_blocks=1)
    blocks_start = first_cluster
    table_start = blocks_start + nb_blocks
    for i in range(nb_blocks + nb_table_clusters):
        refcounts[blocks_start + i] = 1
    reftable = [0] * (nb_table_clusters << cluster_bits >> 3)
    blocks = [[0] * entries_per_block for _ in range(nb_blocks)]
    for cluster, count in refcounts.items():
        blocks[cluster // entries_per_block][cluster % entries_per_block] = count
    for b, block in enumerate(blocks):
        pwrite(encode_refcount_block(block, refcount_order), (blocks_start + b) << cluster_bits)
        reftable[b] = (blocks_start + b) << cluster_bits
    pwrite(encode_u64_table(reftable), table_start << cluster_bits)
    return table_start << cluster_bits, nb_table_clusters, table_start + nb_table_clusters
