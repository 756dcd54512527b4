"""Compaction (operations layer): rewrite an image without its free, leaked
and punched space, keeping every internal snapshot.

This is a cluster-level copy that renumbers host clusters, not a
re-encoding of guest data: every distinct host cluster the source's layers
reference (through the active L1 table and each snapshot's L1 table) is
written once, and every L2 entry that pointed at it points at that one
copy, so what layers shared stays shared.  L2 tables shared between layers
stay shared too.  Compressed clusters are copied as their compressed bytes
and repacked at byte granularity; zero entries stay zero flags (a zero
cluster's preallocation, ``ZERO_ALLOC``, is dropped: it reads as zeros
either way); the extended-L2 subcluster bitmaps are kept as they are.

Layout of the output, in file order: the header cluster (header, kept
extensions, backing file name); the data clusters, laid out layer by layer
in guest order -- the active layer first (it is what a running guest
reads, so its sequential reads become sequential file reads), then each
snapshot in table order, each placing only the clusters no earlier layer
placed; the L2 tables (in the same order); the L1 tables (active, then the
snapshots'); the snapshot table; the refcount blocks and table, built from
scratch for the new layout (``refcount.write_fresh_refcounts``).  The
``COPIED`` flag is set exactly where a refcount is 1, as QEMU's check
expects.

Kept as they are: cluster size, refcount width, compression type, extended
L2, version, lazy-refcounts, the backing file reference and format, the
feature-name table, legacy AES encryption (its IVs are guest sector numbers,
so ciphertext stays valid at new host offsets), every snapshot table entry
field (ID, name, dates, VM clock, icount, disk size, VM state size, extra
data).  Dropped as ``qemu-img convert`` drops them: persistent dirty
bitmaps (and their autoclear bit), unknown header extensions and header
bytes, the dirty bit (refcounts are rebuilt).  Refused: LUKS encryption
(its IVs are host sector numbers: ciphertext moved to other host offsets
would decrypt to garbage), external data files, images carrying the
corrupt bit.

The output is written under a temporary name and renamed only when
complete (``extract.atomic_output``); ``in_place`` writes the temporary
file beside the source, verifies it (every layer's disk and VM state
digest, :mod:`qcow2snap.ops.hashing`, and the snapshot table) and only
then renames it over the source, holding the editor lock on the source
throughout.

The module is about 850 lines because the plan (``_Layout``: where each
distinct cluster goes, the remapped tables), its two data paths (the
kernel copy of planned runs, and ``--compress``'s placement of clusters
whose place depends on their compressed size, ``--no-backing``'s backing
clusters and L2 tables) and the writer of the metadata share that private
plan's state; the public surface is
``compact``, ``compact_in_place``, ``verify`` and ``CompactResult``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from .. import format as fmt
from ..copier import is_zero
from ..errors import (
    CorruptImageError,
    ImageNeedsRepairError,
    OutputError,
    RefcountOverflowError,
    UnsupportedImageError,
)
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import GuestDisk
from ..refcount import write_fresh_refcounts
from ..tables import (
    encode_u64_table,
    refcount_max,
)
from .extract import atomic_output, input_files
from .qcow2_writer import BatchWriter, CopyRuns

__all__ = ["CompactResult", "compact", "compact_in_place", "verify"]

ProgressCallback = Callable[[int, int], None]

_SLOT = 1 << 61       # marks a --compress placeholder in a remapped L2 table
_FAKE_L2 = 1 << 55    # keys of L2 tables made for --no-backing (beyond any real offset)
_COMPRESSION_TYPES = {"zlib": fmt.QCOW2_COMPRESSION_TYPE_ZLIB,
                      "zstd": fmt.QCOW2_COMPRESSION_TYPE_ZSTD}


@dataclass(frozen=True, slots=True)
class CompactResult:
    """What a compaction wrote."""

    source: str
    output: str
    in_place: bool
    #: file sizes before and after
    source_size: int
    output_size: int
    #: distinct host data clusters written (uncompressed)
    data_clusters: int
    #: distinct compressed clusters repacked
    compressed_clusters: int
    #: distinct L2 tables written
    l2_tables: int
    snapshots: int
    #: bytes of data copied (clusters and compressed bytes)
    data_bytes: int
    #: the copy was re-read and compared with the source (``in_place`` always)
    verified: bool
    #: what of the source was not carried over (e.g. "persistent bitmaps")
    dropped: tuple[str, ...]
    #: the backing chain was merged in (the output has no backing file)
    merged_backing: bool = False
    #: the data clusters' compression ("zlib", "zstd"), None: as the source's
    compress: str | None = None


class _Layout:
    """The new image's plan: where every distinct host cluster goes, the
    remapped L2 tables, and the refcounts."""

    def __init__(self, image: Qcow2Image, compress: str | None = None) -> None:
        self.image = image
        #: --compress: every data cluster becomes a slot, compressed and
        #: placed in :meth:`place_slots` (its place depends on its size)
        self.compress = compress
        self.slots: list[tuple[int, int]] = []   # (kind, old offset or entry)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.slot_entries: list[int] = []
        #: --no-backing: the backing disk read into unallocated clusters
        self.below: GuestDisk | None = None
        self.fd = -1
        self.backing_map: dict[int, int] = {}        # guest cluster -> new entry (0: zeros)
        self.backing_tables: dict[tuple[int, int], int] = {}   # (L1 index, limit) -> key
        self.cs = image.cluster_size
        self.cb = image.cluster_bits
        self.ext = image.extended_l2
        self.file_size = image.file_size
        self.cursor = self.cs               # next free cluster of the data area
        self.data_map: dict[int, int] = {}  # old host cluster offset -> new
        self.comp_map: dict[int, int] = {}  # old compressed entry -> new entry
        self.l2_new: dict[int, array[int]] = {}   # old L2 offset -> remapped table
        self.l2_refs: dict[int, list[int]] = {}   # old L2 offset -> new clusters referenced
        self.l2_l1refs: dict[int, int] = {}       # old L2 offset -> L1 entries pointing at it
        self.l2_order: list[int] = []
        self.copies = CopyRuns()   # [src, dst, length] runs, coalesced
        self.data_bytes = 0
        #: --compress's placed bytes and every table, written by contiguous run
        self.out: BatchWriter | None = None
        #: the last run of compressed bytes copied: [source start, source end, new start]
        self.comp_run: list[int] | None = None
        #: next free byte for compressed data, and the end of the clusters
        #: taken for compressed data
        self.comp_pos: int | None = None
        self.comp_limit = 0

    def _copy(self, src: int, dst: int, length: int) -> None:
        self.data_bytes += length
        self.copies.add(src, dst, length)

    def _write(self, fd: int, data: bytes, offset: int) -> None:
        if self.out is None:
            self.out = BatchWriter(fd)
        self.out.write(data, offset)

    def _corrupt(self, what: str, offset: int) -> CorruptImageError:
        return CorruptImageError(
            f"{self.image.path}: {what}; run 'qcow2snap check'", structure="L2 table",
            offset=offset)

    def data_cluster(self, old: int, where: int) -> int:
        new = self.data_map.get(old)
        if new is None:
            if old & (self.cs - 1) or old + self.cs > fmt.align_up(self.file_size, self.cs):
                raise self._corrupt(f"data cluster offset {old:#x} is invalid", where)
            new = self.cursor
            self.cursor = new + self.cs
            self.data_map[old] = new
            self._copy(old, new, self.cs)
        return new

    def _fits(self, n: int) -> bool:
        """Whether ``n`` compressed bytes can go at :attr:`comp_pos`: inside
        the clusters taken for compressed bytes, or growing them when they
        end where the next free cluster starts."""
        return self.comp_pos is not None and (self.comp_pos + n <= self.comp_limit
                                              or self.comp_limit == self.cursor)

    def _take_bytes(self, n: int, residue: int | None) -> int:
        """Room for ``n`` compressed bytes starting at an offset ``residue``
        modulo 512 (None: anywhere) (QEMU's free-byte packing,
        ``qcow2_alloc_bytes``)."""
        pos = self.comp_pos
        if pos is not None and residue is not None:
            pos += (residue - pos) & 511
        if pos is None or not (pos + n <= self.comp_limit or self.comp_limit == self.cursor):
            pos = self.cursor + (0 if residue is None else (residue - self.cursor) & 511)
        self.comp_pos = pos + n
        if self.comp_pos > self.comp_limit:
            self.cursor = fmt.align_up(self.comp_pos, self.cs)
            self.comp_limit = self.cursor
        return pos

    def compressed(self, entry: int, where: int) -> tuple[int, list[int]]:
        """The new entry of a compressed cluster, and the new host clusters
        it references."""
        image = self.image
        key = entry & ~fmt.QCOW_OFLAG_COPIED
        new_entry = self.comp_map.get(key)
        if new_entry is None:
            coffset = entry & image.cluster_offset_mask
            nb = (entry >> image.csize_shift) & image.csize_mask
            length = (nb + 1) * 512 - (coffset & 511)
            if coffset >= self.file_size:
                raise self._corrupt(f"compressed cluster offset {coffset:#x} is invalid", where)
            end = coffset + length
            run = self.comp_run
            if (run is not None and run[0] <= coffset < run[1]
                    and run[2] + (run[1] - run[0]) == self.comp_pos
                    and (end <= run[1] or self._fits(end - run[1]))):
                # QEMU packs compressed clusters back to back, sharing
                # sectors: continue the source run at the same distance
                new = run[2] + (coffset - run[0])
                if end > run[1]:
                    at = self._take_bytes(end - run[1], run[1] & 511)
                    assert at == run[2] + (run[1] - run[0])
                    self._copy(run[1], at, end - run[1])
                    run[1] = end
            else:
                # a new run keeps each offset's place within its sector, so
                # every entry keeps its sector count
                new = self._take_bytes(length, coffset & 511)
                self._copy(coffset, new, length)
                self.comp_run = [coffset, end, new]
            new_entry = fmt.QCOW_OFLAG_COMPRESSED | (nb << image.csize_shift) | new
            self.comp_map[key] = new_entry
        new = new_entry & image.cluster_offset_mask
        new_nb = (new_entry >> image.csize_shift) & image.csize_mask
        end = (new & ~511) + (new_nb + 1) * 512
        return new_entry, list(range(new >> self.cb, ((end - 1) >> self.cb) + 1))

    def _slot(self, entry: int, where: int) -> int:
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            key = (1, entry & ~fmt.QCOW_OFLAG_COPIED)
            if entry & self.image.cluster_offset_mask >= self.file_size:
                raise self._corrupt("compressed cluster offset is invalid", where)
        else:
            old = entry & fmt.L2E_OFFSET_MASK
            if old & (self.cs - 1) or old + self.cs > fmt.align_up(self.file_size, self.cs):
                raise self._corrupt(f"data cluster offset {old:#x} is invalid", where)
            key = (0, old)
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self.slot_of[key] = len(self.slots)
            self.slots.append(key)
        return slot

    def place_slots(self, fd: int, advance: Callable[[int], None]) -> None:
        """--compress: read, compress and place every slot in order
        (compression on a thread pool, a bounded window in flight)."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from ..reader import decompress_cluster
        from .extract import INFLIGHT_BYTES, _compressor
        assert self.compress is not None
        image, cs = self.image, self.cs
        squeeze = _compressor(self.compress)
        source_type = image.header.effective_compression_type
        same_type = source_type == _COMPRESSION_TYPES[self.compress]

        def produce(kind: int, value: int) -> tuple[bytes, bytes | None, int]:
            """(cluster data or the compressed bytes kept, compressed, residue)"""
            if kind == 0:
                data = image.pread(value, cs)
                return data, squeeze(data), -1
            if kind == 2:
                assert self.below is not None
                data = self.below.pread(value * cs, cs).ljust(cs, b"\0")
                return data, squeeze(data), -1
            coffset = value & image.cluster_offset_mask
            nb = (value >> image.csize_shift) & image.csize_mask
            raw = image.pread(coffset, (nb + 1) * 512 - (coffset & 511))
            if same_type:
                return raw, None, coffset & 511
            data = decompress_cluster(raw, source_type, cs, coffset)
            return data, squeeze(data), -1

        window: list[Future[tuple[bytes, bytes | None, int]]] = []
        limit = max(4, INFLIGHT_BYTES // cs)
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            try:
                for kind, value in self.slots:
                    window.append(pool.submit(produce, kind, value))
                    if len(window) >= limit:
                        self._place(fd, window.pop(0).result())
                        advance(cs)
                while window:
                    self._place(fd, window.pop(0).result())
                    advance(cs)
            finally:
                for future in window:
                    future.cancel()

    def _place(self, fd: int, produced: tuple[bytes, bytes | None, int]) -> None:
        data, packed, residue = produced
        image = self.image
        if residue >= 0:   # compressed bytes kept as they are, in their sector place
            pos = self._take_bytes(len(data), residue)
            nb = ((residue + len(data) - 1) >> 9)
        elif packed is not None and len(packed) < self.cs:
            data = packed
            pos = self._take_bytes(len(data), None)
            nb = ((pos + len(data) - 1) >> 9) - (pos >> 9)
        else:
            pos = self.cursor
            self.cursor += self.cs
            self._write(fd, data, pos)
            self.data_bytes += self.cs
            self.slot_entries.append(pos)
            return
        self._write(fd, data, pos)
        self.data_bytes += len(data)
        self.slot_entries.append(fmt.QCOW_OFLAG_COMPRESSED | (nb << image.csize_shift) | pos)

    def resolve_slots(self) -> None:
        """--compress: the placed entries into the L2 tables, and what each
        table references."""
        cb = self.cb
        image = self.image
        step = 2 if self.ext else 1
        for old in self.l2_order:
            table = self.l2_new[old]
            refs = self.l2_refs[old]
            for i in range(0, len(table), step):
                entry = table[i]
                if not entry & _SLOT:
                    continue
                new = self.slot_entries[entry & (_SLOT - 1)]
                table[i] = new
                if new & fmt.QCOW_OFLAG_COMPRESSED:
                    start = new & image.cluster_offset_mask
                    nb = (new >> image.csize_shift) & image.csize_mask
                    end = (start & ~511) + (nb + 1) * 512
                    refs.extend(range(start >> cb, ((end - 1) >> cb) + 1))
                else:
                    refs.append(new >> cb)

    def backing_cluster(self, guest_cluster: int) -> int:
        """--no-backing: the new entry holding the backing disk's content of
        one guest cluster (0 where it reads as zeros), placed once."""
        new = self.backing_map.get(guest_cluster)
        if new is not None:
            return new
        assert self.below is not None
        data = self.below.pread(guest_cluster * self.cs, self.cs)
        if is_zero(data):
            new = 0
        elif self.compress is not None:
            key = (2, guest_cluster)
            new = _SLOT | len(self.slots)
            self.slot_of[key] = len(self.slots)
            self.slots.append(key)
        else:
            new = self.cursor
            self.cursor += self.cs
            self._write(self.fd, data, new)
            self.data_bytes += len(data)
        self.backing_map[guest_cluster] = new
        return new

    def _fill(self, table: array[int], refs: list[int], first: int, limit: int) -> None:
        """Unallocated entries of ``table`` (guest cluster ``first`` at index
        0) below guest cluster ``limit``: the backing disk's data."""
        for i in range(min(len(table), limit - first)):
            if table[i] == 0:
                new = self.backing_cluster(first + i)
                if new:
                    table[i] = new
                    if not new & _SLOT:
                        refs.append(new >> self.cb)

    def backing_table(self, l1_index: int, limit: int) -> int:
        """--no-backing: a new L2 table for an unmapped L1 entry, holding
        the backing disk's data (0: it is all zeros); one per L1 index and
        layer size, shared by the layers that need it."""
        key = (l1_index, limit)
        fake = self.backing_tables.get(key)
        if fake is None:
            table = array("Q", bytes(self.cs))
            refs: list[int] = []
            self._fill(table, refs, l1_index * len(table), limit)
            fake = 0
            if any(table):
                fake = _FAKE_L2 + len(self.backing_tables) * self.cs
                self.l2_new[fake] = table
                self.l2_refs[fake] = refs
                self.l2_order.append(fake)
            self.backing_tables[key] = fake
        if fake:
            self.l2_l1refs[fake] = self.l2_l1refs.get(fake, 0) + 1
        return fake

    def l2_table(self, old: int, first: int = 0, limit: int = 0) -> None:
        """Remap one L2 table (once), placing its clusters in guest order;
        with --no-backing, its unallocated entries below guest cluster
        ``limit`` (guest cluster ``first`` at index 0) take the backing
        disk's data."""
        self.l2_l1refs[old] = self.l2_l1refs.get(old, 0) + 1
        if old in self.l2_new:
            return
        image = self.image
        if old & (self.cs - 1) or old + self.cs > self.file_size:
            raise CorruptImageError(f"{image.path}: L2 table offset {old:#x} is invalid; run "
                                    f"'qcow2snap check'", structure="L1 table", offset=old)
        cached = image.read_l2(old)
        table = array(cached.typecode, cached)
        step = 2 if self.ext else 1
        refs: list[int] = []
        mask = fmt.L2E_OFFSET_MASK
        cb = self.cb
        for i in range(0, len(table), step):
            entry = table[i]
            if not entry:
                continue
            where = old + i * 8
            if self.compress is not None and (
                    entry & fmt.QCOW_OFLAG_COMPRESSED
                    or (entry & mask and not entry & fmt.QCOW_OFLAG_ZERO)):
                table[i] = _SLOT | self._slot(entry, where)
                continue
            if entry & fmt.QCOW_OFLAG_COMPRESSED:
                new_entry, touched = self.compressed(entry, where)
                table[i] = new_entry
                refs.extend(touched)
                continue
            host = entry & mask
            if not host:   # unallocated or zero: only the zero flag means anything
                table[i] = 0 if self.ext else entry & fmt.QCOW_OFLAG_ZERO
                continue
            if not self.ext and entry & fmt.QCOW_OFLAG_ZERO:
                table[i] = fmt.QCOW_OFLAG_ZERO   # reads as zeros: drop the preallocation
                continue
            new = self.data_cluster(host, where)
            table[i] = new
            refs.append(new >> cb)
        if self.below is not None:
            self._fill(table, refs, first, limit)
        self.l2_new[old] = table
        self.l2_refs[old] = refs
        self.l2_order.append(old)


def _check_source(image: Qcow2Image, compress: str | None = None) -> list[str]:
    """Refuse what cannot be compacted; return what will be dropped."""
    h = image.header
    if compress is not None:
        if compress not in _COMPRESSION_TYPES:
            raise ValueError(f"unknown compression {compress!r} (zlib or zstd)")
        if image.encrypted:
            raise UnsupportedImageError(f"{image.path}: encrypted images cannot be compressed "
                                        f"(QEMU: compression can't be used with encryption)",
                                        feature="compression with encryption")
        if image.extended_l2:
            raise UnsupportedImageError(f"{image.path}: --compress is not supported with "
                                        f"extended L2 entries", feature="extended L2")
        if h.version < 3 and compress != "zlib":
            raise UnsupportedImageError(f"{image.path}: version 2 images have no compression "
                                        f"type: only zlib", feature="compression type")
    if h.crypt_method == fmt.QCOW_CRYPT_LUKS:
        raise UnsupportedImageError(
            f"{image.path}: LUKS-encrypted images cannot be compacted: LUKS derives each "
            f"sector's IV from its host offset, so encrypted clusters cannot move",
            feature="LUKS encryption")
    if image.has_data_file:
        raise UnsupportedImageError(
            f"{image.path}: images with an external data file cannot be compacted (their "
            f"data lives in the data file)", feature="external data file")
    if image.corrupt:
        raise ImageNeedsRepairError(
            f"{image.path}: the image is marked corrupt; run 'qcow2snap check --repair' first")
    dropped = []
    if image.extension(fmt.QCOW2_EXT_MAGIC_BITMAPS) is not None:
        dropped.append("persistent bitmaps")
    if image.unknown_extensions:
        dropped.append(f"{len(image.unknown_extensions)} unknown header extension(s)")
    if h.version == 3 and h.tail:
        dropped.append("unknown header fields")
    return dropped


def _backing_name(image: Qcow2Image, out_dir: str) -> bytes:
    """The backing file name for an output in ``out_dir``: a relative name
    is rewritten to stay relative to the output's directory."""
    raw = image.backing_file_name_bytes or b""
    if not raw:
        return raw
    name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    src_dir = os.path.dirname(os.path.abspath(image.path))
    if (os.path.isabs(name) or ":" in name
            or os.path.realpath(src_dir) == os.path.realpath(out_dir)):
        return raw
    return os.path.relpath(os.path.join(src_dir, name), out_dir).encode("utf-8",
                                                                      "surrogateescape")


def _write(image: Qcow2Image, fd: int, out_dir: str, progress: ProgressCallback | None,
           compress: str | None = None, merge: bool = False) -> tuple[_Layout, int]:
    """Write the compacted image to ``fd``; return the plan and the file size."""
    h = image.header
    plan = _Layout(image, compress)
    plan.fd = fd
    if merge:
        plan.below = image.backing_disk()
    cs, cb = plan.cs, plan.cb
    layers = [image.layer(None)] + [image.layer(sn) for sn in image.snapshots]
    l1_tables = []
    per_table = image.l2_entries
    l1s = [image.read_l1(layer) for layer in layers]
    limits = [-(-layer.size // cs) for layer in layers]   # guest clusters of each disk
    table_limit: dict[int, int] = {}
    if plan.below is not None:
        # an L2 table shared by layers of different sizes takes the backing
        # data up to the largest of them (past a layer's size it is not read)
        for l1, limit in zip(l1s, limits, strict=True):
            for entry in l1:
                offset = entry & fmt.L1E_OFFSET_MASK
                if offset:
                    table_limit[offset] = max(table_limit.get(offset, 0), limit)
    for l1, limit in zip(l1s, limits, strict=True):
        for i, entry in enumerate(l1):
            offset = entry & fmt.L1E_OFFSET_MASK
            if offset:
                plan.l2_table(offset, i * per_table, table_limit.get(offset, limit))
            elif plan.below is not None and i * per_table < limit:
                l1[i] = plan.backing_table(i, limit)
        l1_tables.append(l1)

    # data: one pass of coalesced copies (kernel copy_file_range where possible)
    total = len(plan.slots) * cs if compress else plan.data_bytes
    done = 0
    if progress:
        progress(0, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(min(done, total), total)

    if compress:
        plan.place_slots(fd, advance)
        plan.resolve_slots()
    else:
        plan.copies.copy(image._file.fd, image.file_size, fd, image.path, advance)
    if progress:
        progress(total, total)   # bytes past the source's end were not copied, but are done

    # refcounts of data clusters: each L2 reference counts once per L1 path
    out = plan.out if plan.out is not None else BatchWriter(fd)
    refcounts: dict[int, int] = {0: 1}
    for old in plan.l2_order:
        times = plan.l2_l1refs[old]
        for cluster in plan.l2_refs[old]:
            refcounts[cluster] = refcounts.get(cluster, 0) + times

    # L2 tables, with COPIED where the data refcount is 1
    next_cluster = plan.cursor >> cb
    l2_offsets: dict[int, int] = {}
    step = 2 if plan.ext else 1
    mask = fmt.L2E_OFFSET_MASK
    for old in plan.l2_order:
        table = plan.l2_new[old]
        for i in range(0, len(table), step):
            entry = table[i]
            if entry and not entry & fmt.QCOW_OFLAG_COMPRESSED:
                host = entry & mask
                if host and refcounts[host >> cb] == 1:
                    table[i] = entry | fmt.QCOW_OFLAG_COPIED
        new = next_cluster << cb
        out.write(encode_u64_table(table), new)
        l2_offsets[old] = new
        refcounts[next_cluster] = plan.l2_l1refs[old]
        next_cluster += 1

    # L1 tables: the active one, then each snapshot's
    l1_offsets = []
    for l1 in l1_tables:
        l1_out = array(l1.typecode, bytes(len(l1) * 8))
        for i, entry in enumerate(l1):
            old = entry & fmt.L1E_OFFSET_MASK
            if old:
                new = l2_offsets[old]
                l1_out[i] = new | (fmt.QCOW_OFLAG_COPIED if refcounts[new >> cb] == 1 else 0)
        offset = next_cluster << cb
        l1_offsets.append(offset if len(l1) else 0)
        nclusters = -(-len(l1) * 8 // cs)
        if nclusters:
            out.write(encode_u64_table(l1_out), offset)
        for c in range(nclusters):
            refcounts[next_cluster + c] = 1
        next_cluster += nclusters

    # snapshot table, each entry as stored, with its new L1 offset
    table_bytes = bytearray()
    for sn, l1_offset in zip(image.snapshots, l1_offsets[1:], strict=True):
        table_bytes += bytes(fmt.align_up(len(table_bytes), 8) - len(table_bytes))
        table_bytes += dataclasses.replace(sn, l1_table_offset=l1_offset).to_bytes()
    snapshots_offset = 0
    if image.snapshots:
        snapshots_offset = next_cluster << cb
        out.write(bytes(table_bytes), snapshots_offset)
        nclusters = -(-len(table_bytes) // cs)
        for c in range(nclusters):
            refcounts[next_cluster + c] = 1
        next_cluster += nclusters

    # refcount blocks and table, describing everything including themselves
    order = h.refcount_order
    limit = refcount_max(order)
    for cluster, count in refcounts.items():
        if count > limit:
            raise RefcountOverflowError(
                f"{image.path}: host cluster {cluster} needs refcount {count}, more than "
                f"{1 << order}-bit refcounts hold", feature="refcount width")
    reftable_offset, nb_table, end_cluster = write_fresh_refcounts(
        out.write, refcounts, next_cluster, cb, order)
    file_end = end_cluster << cb

    # header cluster
    active = layers[0]
    backing = b"" if merge else _backing_name(image, out_dir)
    incompatible = h.incompatible_features & (fmt.QCOW2_INCOMPAT_COMPRESSION
                                              | fmt.QCOW2_INCOMPAT_EXTL2)
    compression_type = h.effective_compression_type
    if compress:
        compression_type = _COMPRESSION_TYPES[compress]
        incompatible &= ~fmt.QCOW2_INCOMPAT_COMPRESSION
        if compression_type != fmt.QCOW2_COMPRESSION_TYPE_ZLIB:
            incompatible |= fmt.QCOW2_INCOMPAT_COMPRESSION
    if h.version == 3:
        header = dataclasses.replace(
            h, l1_table_offset=l1_offsets[0], refcount_table_offset=reftable_offset,
            refcount_table_clusters=nb_table, nb_snapshots=len(image.snapshots),
            snapshots_offset=snapshots_offset, incompatible_features=incompatible,
            compatible_features=h.compatible_features & fmt.QCOW2_COMPAT_LAZY_REFCOUNTS,
            autoclear_features=0, header_length=fmt.QCOW_HEADER_FULL_SIZE,
            compression_type=compression_type, compression_padding=bytes(7),
            tail=b"", l1_size=active.l1_size, backing_file_offset=0, backing_file_size=0)
    else:
        header = dataclasses.replace(
            h, l1_table_offset=l1_offsets[0], refcount_table_offset=reftable_offset,
            refcount_table_clusters=nb_table, nb_snapshots=len(image.snapshots),
            snapshots_offset=snapshots_offset, l1_size=active.l1_size,
            backing_file_offset=0, backing_file_size=0)
    extensions = b""
    for ext in image.extensions:
        if ext.type == fmt.QCOW2_EXT_MAGIC_FEATURE_TABLE or (
                ext.type == fmt.QCOW2_EXT_MAGIC_BACKING_FORMAT and not merge):
            data = ext.data
            extensions += (fmt.build_struct(fmt.QCowExtensionHeader,
                                            {"type": ext.type, "length": len(data)})
                           + data + bytes(fmt.align_up(len(data), 8) - len(data)))
    extensions += bytes(8)   # end marker
    head_len = len(header.to_bytes()) + len(extensions)
    if backing:
        header = dataclasses.replace(header, backing_file_offset=head_len,
                                     backing_file_size=len(backing))
    blob = header.to_bytes() + extensions + backing
    if len(blob) > cs:
        raise OutputError(f"{image.path}: the header, its extensions and the backing file name "
                          f"({len(blob)} bytes) do not fit in one {cs}-byte cluster")
    out.write(blob, 0)
    out.flush()
    os.ftruncate(fd, file_end)
    return plan, file_end


def _snapshot_fields(sn: Snapshot) -> tuple[object, ...]:
    return (sn.id_bytes, sn.name_bytes, sn.l1_size, sn.date_sec, sn.date_nsec,
            sn.vm_clock_nsec, sn.vm_state_size, sn.disk_size, sn.icount_field,
            sn.extra_data_size, sn.unknown_extra)


def verify(source: Qcow2Image, copy_path: str, *, merged: bool = False) -> None:
    """Compare a compacted copy with its source: the snapshot table's
    fields, and every layer's disk and VM state digest (backing files not
    read: unallocated clusters must stay unallocated; with ``merged``, the
    source is read through its backing chain).  Raises
    :class:`OutputError` on a difference."""
    from .hashing import hash_image
    with Qcow2Image(copy_path, backing_file=False, check_locks=False) as copy:
        if [_snapshot_fields(s) for s in copy.snapshots] != [
                _snapshot_fields(s) for s in source.snapshots]:
            raise OutputError(f"{copy_path}: verification failed: the snapshot table differs")
        if copy.size != source.size or copy.header.size != source.header.size:
            raise OutputError(f"{copy_path}: verification failed: the virtual size differs")
        ours = hash_image(copy, backing=False)
    theirs = hash_image(source, backing=merged)
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        if (a.disk_digest, a.vm_state_digest) != (b.disk_digest, b.vm_state_digest):
            what = "the active layer" if b.snapshot is None else f"snapshot {b.snapshot.label}"
            raise OutputError(f"{copy_path}: verification failed: {what} differs")


def compact_in_place(path: str | os.PathLike[str], *, progress: ProgressCallback | None = None,
                     sync: bool = True, compress: str | None = None,
                     merge_backing: bool = False,
                     allow_dirs: tuple[str | os.PathLike[str], ...] = ()) -> CompactResult:
    """Compact the image at ``path`` over itself: the copy is written beside
    it under a temporary name, verified against it, and renamed over it
    only then.  The editor lock is held on the image throughout, so editors
    (qcow2snap's and QEMU's) are refused meanwhile.  Interrupted at any
    point, the image is untouched and the temporary file removed."""
    from .edit import EditableImage
    with EditableImage(path, backing_file=None if merge_backing else False,
                       allow_dirs=allow_dirs) as editable:
        return compact(editable.image, in_place=True, progress=progress, sync=sync,
                       compress=compress, merge_backing=merge_backing)


def compact(image: Qcow2Image, output: str | os.PathLike[str] | None = None, *,
            in_place: bool = False, overwrite: bool = False,
            progress: ProgressCallback | None = None, sync: bool = True,
            compress: str | None = None, merge_backing: bool = False) -> CompactResult:
    """Write ``image`` compacted to ``output``, or with ``in_place`` over
    itself (``image`` must then be opened for editing, holding the editor
    lock: use :func:`compact_in_place`).

    ``progress(done, total)`` counts data bytes copied.  ``sync`` fsyncs the
    new file before it is renamed into place (and the directory after).
    ``in_place`` also re-reads the result and compares every layer with
    the source before the rename.  ``compress`` ("zlib" or "zstd")
    compresses every data cluster of every layer (each distinct cluster
    once; one that does not shrink stays uncompressed) and sets the image's
    compression type.  ``merge_backing`` reads the backing chain into
    every layer's unallocated clusters (each distinct backing cluster
    written once) and drops the backing file reference: the output stands
    alone (``image`` must have been opened with its backing file)."""
    dropped = tuple(_check_source(image, compress))
    if merge_backing and image.extended_l2 and image.backing_file_name:
        raise UnsupportedImageError(f"{image.path}: merging the backing chain is not supported "
                                    f"with extended L2 entries", feature="extended L2")
    source_size = image.file_size
    if in_place:
        if output is not None:
            raise ValueError("give an output or in_place, not both")
        if image.mode != "r+":
            raise ValueError("in_place needs the image opened for editing (compact_in_place)")
        target = os.path.realpath(image.path)
        plan, size = _replace_in_place(image, target, progress, sync, compress, merge_backing)
        verified = True
    else:
        if output is None:
            raise ValueError("an output path is needed (or in_place=True)")
        target = os.fspath(output)
        out_dir = os.path.dirname(os.path.abspath(target))
        with atomic_output(target, overwrite=overwrite, inputs=input_files(image),
                           sync=sync) as fd:
            plan, size = _write(image, fd, out_dir, progress, compress, merge_backing)
        verified = False
    return CompactResult(
        source=image.path, output=image.path if in_place else target, in_place=in_place,
        source_size=source_size,
        output_size=size, data_clusters=len(plan.data_map) + sum(
            1 for e in plan.slot_entries if not e & fmt.QCOW_OFLAG_COMPRESSED) + sum(
            1 for e in plan.backing_map.values() if e and not e & _SLOT),
        compressed_clusters=len(plan.comp_map) + sum(
            1 for e in plan.slot_entries if e & fmt.QCOW_OFLAG_COMPRESSED),
        l2_tables=len(plan.l2_order),
        snapshots=len(image.snapshots), data_bytes=plan.data_bytes, verified=verified,
        dropped=dropped, merged_backing=merge_backing and plan.below is not None,
        compress=compress)


def _replace_in_place(image: Qcow2Image, target: str, progress: ProgressCallback | None,
                      sync: bool, compress: str | None, merge: bool) -> tuple[_Layout, int]:
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                   suffix=".qcow2snap-tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{target}: cannot create the compacted copy in {directory}: "
                          f"{exc.strerror or exc}") from exc
    try:
        try:
            os.fchmod(fd, stat.S_IMODE(os.fstat(image._file.fd).st_mode))
            plan, size = _write(image, fd, directory, progress, compress, merge)
            if sync:
                os.fsync(fd)
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise OutputError(f"{target}: writing the compacted copy failed: "
                              f"{exc.strerror or exc}; the image is unchanged") from exc
        verify(image, tmp, merged=merge)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        tmp = ""
        if sync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return plan, size
