"""The metadata transaction: the one place that writes metadata.

Crash-safety by shadow paging.  Every metadata cluster an operation changes
(L1 tables, L2 tables, refcount blocks, the refcount table, the snapshot
table) gets a new copy in clusters that are free in the old state; nothing
the old state references is written.  The commit is then:

1. write every new cluster;
2. ``fsync``;
3. one ``pwrite`` of the changed header bytes, all inside the first 512-byte
   sector (``size`` at 24, the six metadata locators at 36-71, and the
   autoclear word at 88 when unknown bits are cleared): this single write
   switches from the old state to the new one;
4. ``fsync``;
5. only now are clusters that the new state no longer uses given back:
   trailing ones are truncated away, inner ones are punched out
   (``fallocate(PUNCH_HOLE)``, as QEMU does), except old metadata that a
   shadow copy replaced (see :meth:`Transaction._reclaim`).

With ``early_writes`` (the snapshot edits), step 1 starts while the edit
is still being planned: once the queued copies pass
:data:`WRITE_BUFFER_BYTES` they are written, so memory stays bounded
whatever the image (a fully allocated multi-TiB image changes thousands of
64 KiB L2 tables).  They go to clusters free in the old state like every
other copy, so nothing the old state reads changes, and the commit point
and its order are the same; an error before the header write cuts the file
back to its old size (:meth:`Transaction.abort`).

A crash before step 3's write leaves the old state, whose refcount blocks
were never touched and say 0 for every new cluster: no leak, no corruption.
A crash after it leaves the new state, whose refcounts were computed to be
exact.  Either way ``qemu-img check`` finds nothing.

All I/O goes through a :class:`MetadataIO`, so tests can record the exact
sequence of writes and fsyncs and replay power losses at every cut point.

It runs past 700 lines because allocation, the refcount fixed point, the
early writes and the commit protocol share one state (what is allocated,
queued and already written) whose consistency is the crash-safety
argument; the planned changes are kept by :mod:`.refdelta` and added to
whole refcount blocks by :mod:`.refblock`.
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import add, itemgetter
from typing import Any

from .. import format as fmt
from .. import refcount as refcount_layer
from ..errors import (  # the commit errors are re-exported here, where they were defined
    CommitFailedError,
    CommitNotDurableError,
    CorruptImageError,
    Qcow2Error,
    RefcountOverflowError,
    TransactionPoisoned,
    UnsupportedImageError,
)
from ..image import Qcow2Image
from ..model import Header
from ..refcount import RefcountReader, table_clusters_for
from ..tables import encode_refcount_block, encode_u64_table, nonzero_indexes, refcount_max
from . import refdelta
from .clustersets import ClusterRuns, ClusterSet, L2Moves, SortedClusters, joined_runs
from .metadata_io import FileIO, MetadataIO
from .refblock import (
    FAST_BLOCK_ENTRIES,
    any_zero_at,
    block_plus_delta,
    encode_count_lanes,
    freed_indexes,
    increases_fit,
    increments_of_one,
)
from .refdelta import (
    MAX_CHUNK_BITS,
    ClusterMarks,
    RefcountDelta,
    last_nonzero,
    one_chunk_run,
    widen_signed_bytes,
)

__all__ = [
    "CommitFailedError",
    "CommitNotDurableError",
    "CommitResult",
    "FileIO",
    "MetadataIO",
    "RefcountOverflowError",
    "Transaction",
    "TransactionPoisoned",
]

HEADER_COMMIT_LIMIT = 512


#: the refcount view (:meth:`Transaction._build_view`) is built for files of
#: at most this many clusters (a list of 8 bytes a cluster: 32 MiB), once a
#: lookup asks for this many clusters at once
VIEW_MAX_CLUSTERS = 1 << 22
VIEW_AFTER = 256

#: bytes of new metadata a transaction with ``early_writes`` queues before
#: writing it (a module constant, read when it is needed: tests shrink it
#: to run the early path on small images)
WRITE_BUFFER_BYTES = 16 << 20
#: what a queued entry costs besides its bytes (the bytes object and its
#: dict slot): 512-byte clusters queue tens of thousands of them
_QUEUED_ENTRY_BYTES = 160

#: bytes of chunks a transaction's set of allocated clusters keeps in
#: memory before spilling (see :class:`ClusterMarks`)
SETS_MEMORY_BYTES = 8 << 20
#: clusters per chunk of that set: small, because the copies of refcount
#: blocks go one into each block's own range (a chunk of a block's 32,768
#: clusters each: 64 MiB on a 4 TiB image)
SET_CHUNK_BITS = 9


#: entries of a table :meth:`Transaction.write_new_table` encodes at a time
TABLE_PIECE_ENTRIES = 1 << 17
#: the most memory an edit may take, whatever the image (issue 16)
EDIT_MEMORY_BYTES = 256 << 20
#: what an edit holds outside the budgets: the interpreter and its modules
#: (~26 MiB), the process-wide L2 cache (8 MiB of tables, ~13 MiB with their
#: objects) and allocator slack
_FIXED_BYTES = 48 << 20
#: what an edit holds per entry of the image's largest L1 table, outside
#: the budgets: up to three decoded L1 tables (the active one, a snapshot's,
#: and the snapshot's new one or the revert's copy: 24 bytes) and per L2 table
#: it copies 16 bytes of moves and 8 of relocated clusters (one per entry)
_PER_L1_ENTRY_BYTES = 48
#: what the budgets take at full size, their objects included: the delta's
#: and the marks' chunks, the allocated set, the write buffer, the refcount
#: blocks read and the editor's table memo (168 MiB of bytes, ~1.2x that
#: with their objects: see tests/test_edit_memory.py)
BUDGETS_BYTES = 208 << 20
#: a budget is never scaled below this share of its full size (the image's
#: own L1 tables could then take more than the bound, which only an image
#: past QEMU's limits has)
_LEAST_SCALE = 1 / 32


def edit_memory_scale(image: Qcow2Image) -> float:
    """The share of their full size the memory budgets of an edit of
    ``image`` get, so that the edit stays within :data:`EDIT_MEMORY_BYTES`:
    1 unless the image's L1 tables are large (QEMU allows 4 Mi entries,
    which with a copied L2 table each hold 192 MiB outside the budgets);
    then the budgets give way, at the cost of more spilling."""
    entries = max([image.header.l1_size, *(s.l1_size for s in image.snapshots)])
    room = EDIT_MEMORY_BYTES - _FIXED_BYTES - _PER_L1_ENTRY_BYTES * entries
    return max(_LEAST_SCALE, min(1.0, room / BUDGETS_BYTES))


def scaled(budget: int, scale: float) -> int:
    """``budget`` (bytes) at ``scale``, at least 1 (0 means none in memory
    to the structures that take a budget)."""
    return max(1, int(budget * scale))


@dataclass
class CommitResult:
    """What a transaction did (or, for a dry run, would do).

    ``clusters_allocated`` and ``clusters_freed`` are ascending sequences
    of cluster numbers held as runs (:class:`ClusterRuns`: ``len``,
    iteration, ``in``, indexing and ``==`` with a list work as on the lists
    they were; ``.runs()`` gives (start, count) pairs): a delete can free
    millions of clusters."""

    clusters_allocated: ClusterRuns = field(default_factory=ClusterRuns)
    clusters_freed: ClusterRuns = field(default_factory=ClusterRuns)
    bytes_allocated: int = 0
    bytes_freed: int = 0
    file_size_before: int = 0
    file_size_after: int = 0
    header_changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    metadata_bytes_written: int = 0
    dry_run: bool = False
    #: the edit is applied and durable, but giving freed space back to the
    #: file system failed (the clusters stay allocated in the file, free)
    reclaim_error: str | None = None


class Transaction:
    """Collects a new metadata state for one image and commits it atomically.

    Operations (:mod:`qcow2snap.ops.snapshots`) use :meth:`allocate`,
    :meth:`write_new`, :meth:`add_refcount` and :meth:`set_header`; they
    never write the file themselves.  With ``early_writes``, queued copies
    past :data:`WRITE_BUFFER_BYTES` are written before the commit (to
    clusters free in the old state; :meth:`read_new` reads them back), and
    whoever plans must call :meth:`abort` if planning fails.
    """

    def __init__(self, image: Qcow2Image, io: MetadataIO, *, early_writes: bool = False
                 ) -> None:
        self.image = image
        self.io = io
        self.cluster_bits = image.cluster_bits
        self.cluster_size = image.cluster_size
        self.old_header = image.header
        #: the share of their full size this transaction's memory budgets
        #: get (:func:`edit_memory_scale`), read by whoever plans with it too
        self.memory_scale = scale = edit_memory_scale(image)
        self.refcounts = RefcountReader(image, scaled(refcount_layer.READER_CACHE_BYTES, scale))
        self.refcount_max = refcount_max(self.old_header.refcount_order)
        # chunks inside refcount blocks: a lookup in the one finds the other
        chunk_bits = min(self.refcounts.block_bits, MAX_CHUNK_BITS)
        self.delta = RefcountDelta(chunk_bits, scaled(refdelta.DELTA_MEMORY_BYTES, scale))
        #: clusters this transaction allocated (a byte a cluster in chunks,
        #: spilled past :data:`SETS_MEMORY_BYTES`: a Python set cost ~70
        #: bytes a cluster, and a create on a fully allocated 512-byte-cluster
        #: image copies millions of clusters' worth of tables)
        self.allocated = ClusterSet(SET_CHUNK_BITS, scaled(SETS_MEMORY_BYTES, scale))
        #: clusters known to be referenced
        self.in_use_hint = ClusterMarks(chunk_bits, scaled(refdelta.MARKS_MEMORY_BYTES, scale))
        #: old-state metadata the new state replaced by a shadow copy (L1/L2
        #: tables, refcount blocks and table, the snapshot table): freed, but
        #: not punched (see :meth:`_reclaim`)
        self.relocated = SortedClusters()   # 8 bytes a cluster
        #: the L2 tables copied (:meth:`relocate_l2`): old -> new offsets
        self.moved_l2 = L2Moves()
        self.new_data: dict[int, bytes] = {}   # host offset -> bytes (allocated clusters only)
        self.early_writes = early_writes
        self._queued_bytes = 0   # with each entry's own cost (small clusters: many entries)
        self._wrote_early = False
        self._written_early_bytes = 0
        self._written_early_end = 0
        self.header_fields: dict[str, int] = {}
        self._free_cursor = 1
        self._committed = False
        self._switched = False   # the header write was attempted
        self._no_view = False
        self._file_size = image.file_size
        self._end_cluster = (self._file_size + self.cluster_size - 1) >> self.cluster_bits

    # ------------------------------------------------------------------
    # building the new state

    def refcount(self, cluster: int) -> int:
        """Refcount of ``cluster`` in the new state as planned so far."""
        return self.refcounts.get(cluster) + self.delta.get(cluster, 0)

    def add_refcount(self, cluster: int, amount: int) -> None:
        self.delta.add(cluster, amount)

    def add_refcounts(self, clusters: Iterable[int], amount: int) -> None:
        self.delta.add_many(clusters, amount)

    def add_references(self, clusters: Iterable[int], amount: int) -> None:
        """:meth:`mark_in_use` and :meth:`add_refcounts` in one pass."""
        self.delta.add_many(clusters, amount, self.in_use_hint)

    def add_reference_run(self, first: int, count: int, amount: int) -> None:
        """:meth:`add_references` of the consecutive clusters ``[first,
        first + count)``: a slice per delta chunk."""
        self.delta.add_run(first, count, amount, self.in_use_hint)

    def release_relocated(self, clusters: Iterable[int], amount: int = 1) -> None:
        """Drop ``amount`` references to old-state metadata that a shadow copy
        replaces (see :attr:`relocated`)."""
        clusters = list(clusters)
        self.relocated.update(clusters)
        self.delta.add_many(clusters, -amount)

    def relocate_l2(self, old: int, new: int, paths: int) -> None:
        """Drop the ``paths`` references to the old-state L2 table at
        ``old`` (bytes) that its copy at ``new`` takes over: the move is
        kept in :attr:`moved_l2` (where the L1 tables pointing at the old
        table are redirected from), which also keeps the old table from
        being punched, as :attr:`relocated` metadata is (16 bytes a table,
        not 8 more in :attr:`relocated`)."""
        self.delta.add(old >> self.cluster_bits, -paths)
        self.moved_l2.add(old, new)

    def check_increments_fit(self, what: str) -> None:
        """Refuse when the increases planned so far take a refcount past the
        width's maximum, even if later decreases would bring it back.

        QEMU applies an operation's increments before its decrements (revert
        adds the snapshot's references, then drops the active layer's), so
        it refuses any operation whose intermediate state overflows; a
        netted plan would succeed where QEMU fails.  Call this where QEMU's
        increments end."""
        if self._counts_in_range():
            return
        refcount_max = self.refcount_max
        get = self.refcounts.get
        for cluster, amount in self.delta.items():
            if amount > 0 and get(cluster) + amount > refcount_max:
                order = self.old_header.refcount_order
                raise RefcountOverflowError(
                    f"{what}: the refcount of cluster {cluster} would exceed the maximum of "
                    f"{refcount_max} for {1 << order}-bit refcounts on the way (QEMU refuses "
                    f"this too); widen the refcounts with 'qemu-img amend -o "
                    f"refcount_bits=16' first", feature="refcount width")

    def _counts_in_range(self) -> bool:
        """Whether every planned count (old + delta) of every block the plan
        touches is within 0..maximum, block by block at C speed
        (:func:`block_plus_delta`); False when that cannot be told that
        way (the caller then checks entry by entry)."""
        rc = self.refcounts
        order = self.old_header.refcount_order
        for b in self.delta.changed_groups(rc.block_bits):
            old = rc.block(b)
            if old is None:
                return False
            amounts = self.delta.amounts(b << rc.block_bits, rc.block_entries)
            if not increases_fit(old, amounts, self.refcount_max) and block_plus_delta(
                    old, amounts, order) is None:
                return False
        return True

    def increases_leave_shared(self) -> bool:
        """Whether the plan only increases counts and leaves every cluster
        it increases with a new refcount of at least 2 (after a create: no
        entry of the active layer keeps COPIED), decided per delta chunk at
        C speed (the positions whose amount is exactly 1 against the zero
        counts of the old block) instead of a count per cluster.  False
        whenever it cannot be told that way (a decrease, a widened chunk, a
        missing block): the caller then asks :meth:`refcounts_of`."""
        rc = self.refcounts
        delta = self.delta
        block_mask = rc.block_entries - 1
        for key, chunk in delta.store.items():
            ones = increments_of_one(chunk)
            if ones is None:
                return False
            if not ones:
                continue
            first = key << delta.bits
            block = rc.block(first >> rc.block_bits)
            if block is None:
                return False
            start = first & block_mask
            if any_zero_at(block[start:start + len(chunk)], ones):
                return False
        return True

    def mark_in_use(self, clusters: Iterable[int]) -> None:
        """Record clusters the old state references (never allocated over)."""
        self.in_use_hint.update(clusters)

    def clusters_of(self, offset: int, length: int) -> range:
        """Host clusters touched by ``[offset, offset+length)``."""
        if length <= 0:
            return range(0)
        return range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1)

    def refcounts_of(self, clusters: Iterable[int]) -> list[int]:
        """New-state refcounts of many clusters at once (the hot path of
        COPIED recomputation: the refcount block and the delta chunk are
        looked up only when they change from one cluster to the next)."""
        rc = self.refcounts
        bits = rc.block_bits
        mask = rc.block_entries - 1
        zero = array("B", bytes(rc.block_entries))
        delta = self.delta
        if type(clusters) is list and len(clusters) > 1:
            view = delta.view
            if view is None and len(clusters) >= VIEW_AFTER and not self._no_view:
                view = self._build_view()
            if view is not None and max(clusters) < len(view):
                return list(itemgetter(*clusters)(view))   # a gather, at C speed
        peek, chunk_bits, chunk_mask = delta.peek, delta.bits, delta.mask
        if (type(clusters) is list and one_chunk_run(clusters, chunk_bits)):
            # a contiguous run in one chunk (so one block): two slices
            first, n = clusters[0], len(clusters)
            run_block = rc.block(first >> bits) or zero
            run_chunk = peek(first >> chunk_bits) or delta.zero
            start = first & chunk_mask
            return list(map(add, run_block[first & mask:(first & mask) + n],
                            run_chunk[start:start + n]))
        out: list[int] = []
        append = out.append
        key = -1
        block: array[int] = zero
        chunk = delta.zero
        for c in clusters:
            if c >> chunk_bits != key:   # a chunk lies inside one block
                key = c >> chunk_bits
                chunk = peek(key) or delta.zero
                block = rc.block(c >> bits) or zero
            append(block[c & mask] + chunk[c & chunk_mask])
        return out

    def _build_view(self) -> array[int] | None:
        """:attr:`RefcountDelta.view` of every cluster of the file, when the
        file has at most :data:`VIEW_MAX_CLUSTERS` (8 bytes a cluster); once
        built, many lookups are one ``itemgetter`` call.  None (and never
        again) past that size or if a refcount block cannot be read (the
        per-cluster route then reports what it touches)."""
        rc = self.refcounts
        if self._end_cluster > VIEW_MAX_CLUSTERS:
            self._no_view = True
            return None
        view = array("q")
        order = self.old_header.refcount_order
        try:
            for b in range(-(-self._end_cluster // rc.block_entries)):
                old = rc.block(b)
                amounts = self.delta.amounts(b << rc.block_bits, rc.block_entries)
                fast = None if old is None else block_plus_delta(old, amounts, order)
                if fast is not None:      # whole blocks at C speed
                    view += fast[0]
                else:
                    span = widen_signed_bytes(amounts) if amounts.typecode == "b" else amounts
                    view += span if old is None else array("q", map(add, old, span))
        except Qcow2Error:
            self._no_view = True
            return None
        self.delta.view = view
        return view

    def _next_free_candidate(self, cluster: int, stop: int | None = None) -> int:
        """The first cluster >= ``cluster`` whose old refcount is 0 (using
        ``array.index`` on decoded blocks rather than one lookup per
        cluster), or ``stop`` if there is none before it."""
        rc = self.refcounts
        bits = rc.block_bits
        mask = rc.block_entries - 1
        while True:
            if stop is not None and cluster >= stop:
                return stop
            b = cluster >> bits
            if b >= len(rc.table):
                return cluster
            block = rc.block(b)
            if block is None:
                return cluster
            try:
                return (b << bits) + block.index(0, cluster & mask)
            except ValueError:
                cluster = (b + 1) << bits

    def allocate(self, length: int) -> int:
        """First-fit allocation of ``ceil(length / cluster)`` contiguous clusters
        that are free in the old state and not yet used by this transaction;
        their new refcount is 1.  Returns the host offset."""
        count = max(1, (length + self.cluster_size - 1) >> self.cluster_bits)
        start = self._next_free_candidate(self._free_cursor)
        self._free_cursor = start
        run = 0
        cluster = start
        while run < count:
            if self._is_free(cluster):
                run += 1
                cluster += 1
            else:
                run = 0
                cluster = self._next_free_candidate(cluster + 1)
                start = cluster
        for c in range(start, start + count):
            self.allocated.add(c)
            self.add_refcount(c, 1)
        if count == 1 or start == self._free_cursor:
            self._free_cursor = start + count
        return start << self.cluster_bits

    def _allocate_within(self, first: int, stop: int) -> int:
        """One cluster in ``[first, stop)`` free in the old state and not yet
        used by this transaction (new refcount 1), as a host offset; 0 when
        the range has none."""
        cluster = self._next_free_candidate(max(first, 1), stop)
        while cluster < stop:
            if self._is_free(cluster):
                self.allocated.add(cluster)
                self.add_refcount(cluster, 1)
                return cluster << self.cluster_bits
            cluster = self._next_free_candidate(cluster + 1, stop)
        return 0

    def _is_free(self, cluster: int) -> bool:
        if cluster in self.allocated or cluster == 0:
            return False
        old = self.refcounts.get(cluster)
        if old:
            return False
        if cluster in self.in_use_hint:
            raise CorruptImageError(
                f"cluster {cluster} is referenced but its refcount is 0; the image is "
                f"corrupt, editing it could destroy data: run 'qcow2snap check --repair all' "
                f"first", structure="refcount block", offset=cluster << self.cluster_bits)
        return True

    def write_new(self, offset: int, data: bytes) -> None:
        """Queue ``data`` for clusters this transaction allocated."""
        for cluster in self.clusters_of(offset, max(len(data), 1)):
            if cluster not in self.allocated:
                raise AssertionError(f"write to cluster {cluster} not allocated by this "
                                     f"transaction")
        self._queue(offset, data)

    def write_new_table(self, offset: int, entries: array[int]) -> None:
        """:meth:`write_new` of a u64 table (an L1 table: up to 32 MiB),
        encoded and queued 1 MiB at a time, so that no second copy of the
        whole table is ever held."""
        for start in range(0, len(entries), TABLE_PIECE_ENTRIES):
            self.write_new(offset + 8 * start,
                           encode_u64_table(entries[start:start + TABLE_PIECE_ENTRIES]))

    def _queue(self, offset: int, data: bytes) -> None:
        self.new_data[offset] = data
        self._queued_bytes += len(data) + _QUEUED_ENTRY_BYTES
        if self.early_writes and self._queued_bytes > WRITE_BUFFER_BYTES * self.memory_scale:
            self._write_queued()

    def _write_queued(self) -> None:
        """Write the queued new clusters now, before the commit point (all
        of them are free in the old state: the old state reads none)."""
        try:
            for offset in sorted(self.new_data):
                data = self.new_data[offset]
                self._written_early_end = max(self._written_early_end, offset + len(data))
                self._wrote_early = True
                self.io.pwrite(data, offset)
                self._written_early_bytes += len(data)
        except OSError as exc:
            raise CommitFailedError(
                f"{self.image.path}: the edit was not applied: writing the new metadata failed "
                f"({exc.strerror or exc}); the image is unchanged, in its old state") from exc
        self.new_data.clear()
        self._queued_bytes = 0

    def read_new(self, offset: int, length: int) -> bytes:
        """The ``length`` bytes :meth:`write_new` queued at ``offset``, still
        queued or already written."""
        data = self.new_data.get(offset)
        if data is not None:
            return data[:length]
        if not self._wrote_early or offset >> self.cluster_bits not in self.allocated:
            raise KeyError(offset)
        data = self.image.pread(offset, length)
        if len(data) != length:
            raise CommitFailedError(f"{self.image.path}: reading back new metadata at "
                                    f"{offset:#x} failed (short read); the image is unchanged")
        return data

    def abort(self) -> None:
        """After an error before the commit point: cut off what was written
        early past the old end of the file.  The old state references none
        of it (clusters inside the file stay free, as they were); failing
        to truncate leaves only unreferenced space, so it is not an error."""
        self._close_sets()
        if not self._wrote_early or self.image._file.is_block_device:
            return
        self._wrote_early = False
        if self._written_early_end > self._file_size:
            with contextlib.suppress(OSError):
                self.io.truncate(self._file_size)

    def _close_sets(self) -> None:
        """Drop the temporary files of the delta and the cluster sets."""
        for store in (self.delta, self.in_use_hint, self.allocated):
            store.close()

    def set_header(self, **fields: int) -> None:
        for name, value in fields.items():
            if not hasattr(self.old_header, name):
                raise AttributeError(name)
            self.header_fields[name] = value

    # ------------------------------------------------------------------
    # refcount structures

    def _finalize_refcounts(self) -> tuple[dict[int, int], int, int]:
        """Shadow every refcount block whose counts change, and the refcount
        table.  Allocating those copies changes counts too, so this iterates
        to a fixed point (two or three rounds in practice).

        Returns ({table index: new block offset}, table offset, table clusters).
        """
        rc = self.refcounts
        block_bits = rc.block_bits
        old_entries = len(rc.table)
        new_blocks: dict[int, int] = {}
        table: tuple[int, int] | None = None   # (offset, clusters) of the new table
        while True:
            changed = self.delta.changed_groups(block_bits)
            missing = sorted(changed - new_blocks.keys())
            for b in missing:
                # inside the block's own range when it has room: its old
                # location is there too (copies put there before), so the
                # copy changes no other block; first-fit elsewhere changed
                # the block covering the copy, whose copy changed another,
                # and so on through most of the table (a rename rewrote
                # ~260 blocks of 512)
                new_blocks[b] = self._allocate_within(b << block_bits, (b + 1) << block_bits) \
                    or self.allocate(self.cluster_size)
                old = rc.block_offset(b)
                if old:
                    self.release_relocated([old >> self.cluster_bits])
            needed = max(old_entries, max(new_blocks, default=-1) + 1)
            capacity = (table[1] << self.cluster_bits) // 8 if table else 0
            if table is None or needed > capacity:
                if table is None:
                    self.release_relocated(self.clusters_of(
                        self.old_header.refcount_table_offset,
                        self.old_header.refcount_table_clusters << self.cluster_bits))
                else:  # outgrown: give our too-small copy back
                    for c in self.clusters_of(table[0], table[1] << self.cluster_bits):
                        self.allocated.discard(c)
                        self.add_refcount(c, -1)
                grow = needed * 3 // 2 if needed > old_entries else needed
                clusters = max(self.old_header.refcount_table_clusters,
                               table_clusters_for(grow, self.cluster_bits))
                table = (self.allocate(clusters << self.cluster_bits), clusters)
                continue
            if not missing:
                break
        if table[1] << self.cluster_bits > fmt.QCOW_MAX_REFTABLE_SIZE:
            raise UnsupportedImageError("the refcount table would exceed QEMU's 8 MiB limit",
                                        feature="refcount table size")
        return new_blocks, table[0], table[1]

    def _refcount_writes(self, new_blocks: dict[int, int], table_offset: int,
                         table_clusters: int) -> ClusterRuns:
        """Encode every new refcount block (old block + delta, whole blocks at
        C speed) and the new refcount table; returns the clusters the edit
        frees (sorted).  Notes, per block, the last cluster in use, for
        :meth:`_new_end_cluster`."""
        rc = self.refcounts
        entries = rc.block_entries
        order = self.old_header.refcount_order
        freed = ClusterRuns()
        self._last_in_use: dict[int, int] = {}
        for b, offset in sorted(new_blocks.items()):
            old = rc.block(b)
            base = b << rc.block_bits
            amounts = self.delta.amounts(base, entries)
            fast = None
            if old is not None and entries >= FAST_BLOCK_ENTRIES:
                fast = self._view_block(base, entries, order) or block_plus_delta(
                    old, amounts, order)
            if fast is not None:
                values, encoded = fast
                self._queue(offset, encoded)
                freed += freed_indexes(amounts, values, base)
                self._last_in_use[b] = last_nonzero(values)
                continue
            delta = widen_signed_bytes(amounts) if amounts.typecode == "b" else amounts
            values = delta if old is None else array("q", map(add, old, delta))
            try:
                # the width's own range check (unsigned array types, or the
                # sub-byte encoder's): no min()/max() pass per block
                self._queue(offset, encode_refcount_block(
                    values if order >= 3 else values.tolist(), order))
            except (OverflowError, ValueError):
                self._refcount_range_error(values, base, order)
                raise
            freed += freed_indexes(delta, values, base)
            self._last_in_use[b] = last_nonzero(values)
        table = list(rc.table) + [0] * ((table_clusters << self.cluster_bits) // 8 - len(rc.table))
        for b, offset in new_blocks.items():
            table[b] = offset
        self._queue(table_offset, encode_u64_table(table))
        return freed

    def _view_block(self, base: int, entries: int, order: int
                    ) -> tuple[array[int], bytes] | None:
        """(new counts, encoded block) of the block of clusters ``[base,
        base + entries)`` from :attr:`RefcountDelta.view` when it covers
        them (it is kept up to date by every change: a slice and strided
        copies instead of adding the delta again), else None."""
        view = self.delta.view
        if view is None or base + entries > len(view) or not 3 <= order <= 5 \
                or sys.byteorder != "little":
            return None
        values = view[base:base + entries]
        encoded = encode_count_lanes(values.tobytes(), order)
        return None if encoded is None else (values, encoded)

    def _refcount_range_error(self, values: array[int], base: int, order: int) -> None:
        """Raise what is wrong with a new refcount block that its width's
        encoder refused: a negative count (a planning bug) or one past the
        width's maximum."""
        refcount_max = self.refcount_max
        if min(values) < 0:
            i = next(i for i, v in enumerate(values) if v < 0)
            raise AssertionError(f"refcount of cluster {base + i} would become {values[i]}")
        if max(values) > refcount_max:
            i = next(i for i, v in enumerate(values) if v > refcount_max)
            raise RefcountOverflowError(
                f"refcount of cluster {base + i} would exceed the maximum of "
                f"{refcount_max} for {1 << order}-bit refcounts (QEMU refuses "
                f"this too); widen the refcounts with 'qemu-img amend -o "
                f"refcount_bits=16' first", feature="refcount width")

    def _new_header(self, table_offset: int, table_clusters: int) -> Header:
        from dataclasses import replace
        fields: dict[str, Any] = dict(self.header_fields)
        fields["refcount_table_offset"] = table_offset
        fields["refcount_table_clusters"] = table_clusters
        # A writer must clear autoclear bits it does not know (qcow2.txt)
        fields.setdefault("autoclear_features",
                          self.old_header.autoclear_features & fmt.QCOW2_AUTOCLEAR_MASK)
        return replace(self.old_header, **fields)

    # ------------------------------------------------------------------

    def _start_commit(self) -> None:
        if self._committed:
            raise RuntimeError("Transaction.commit() called twice: a transaction commits once; "
                               "start a new one for the next change")
        self._committed = True

    def commit(self, *, dry_run: bool = False) -> CommitResult:
        """Write the new state and switch to it (see the module docstring).
        A transaction commits once; a second call is an API misuse
        (``RuntimeError``)."""
        self._start_commit()
        try:
            return self._commit(dry_run)
        except BaseException:
            if not self._switched:
                self.abort()
            raise
        finally:
            self._close_sets()

    def _commit(self, dry_run: bool) -> CommitResult:
        new_blocks, table_offset, table_clusters = self._finalize_refcounts()
        freed = self._refcount_writes(new_blocks, table_offset, table_clusters)
        new_header = self._new_header(table_offset, table_clusters)
        result = CommitResult(dry_run=dry_run, file_size_before=self._file_size)
        for name in ("size", "l1_size", "l1_table_offset", "refcount_table_offset",
                     "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
                     "autoclear_features"):
            before, after = getattr(self.old_header, name), getattr(new_header, name)
            if before != after:
                result.header_changes[name] = (before, after)
        result.clusters_allocated = ClusterRuns.from_runs(self.allocated.runs())
        result.clusters_freed = freed
        result.bytes_allocated = len(self.allocated) << self.cluster_bits
        result.metadata_bytes_written = (self._written_early_bytes
                                         + sum(len(d) for d in self.new_data.values()))
        size_after_writes = max([self._file_size, self._written_early_end,
                                 *(o + len(d) for o, d in self.new_data.items())])
        new_end = self._new_end_cluster(new_blocks) << self.cluster_bits
        result.file_size_after = min(size_after_writes, max(new_end, 0))
        if self.image._file.is_block_device:  # a device keeps its size
            result.file_size_after = self._file_size
        result.bytes_freed = sum(self._bytes_in_file(start, count) for start, count in freed.runs())
        if dry_run:
            self.abort()   # (a dry run should not write early: pass early_writes=False)
            return result
        self._publish(self.new_data, new_header)
        try:
            self._reclaim(freed, size_after_writes, result.file_size_after)
        except OSError as exc:  # the new state is durable; only space is not returned
            result.reclaim_error = (f"giving {len(freed)} freed cluster(s) back to the file "
                                    f"system failed ({exc.strerror or exc}); they stay in the "
                                    f"file, free")
        return result

    def commit_prebuilt(self, new_data: dict[int, bytes], **header_fields: int) -> None:
        """Publish structures the caller built whole (repair's rebuilt
        refcount blocks and table, whose refcounts describe themselves) by
        the same protocol as :meth:`commit`: write ``new_data`` to clusters
        no old structure uses, flush, switch with one write of the changed
        header bytes (through the header model), flush."""
        self._start_commit()
        for name in header_fields:
            if not hasattr(self.old_header, name):
                raise AttributeError(name)
        from dataclasses import replace
        fields: dict[str, Any] = dict(header_fields)
        self._publish(new_data, replace(self.old_header, **fields))

    def _publish(self, new_data: dict[int, bytes], new_header: Header) -> None:
        """The commit protocol: new clusters, flush, the one-sector header
        write that switches states, flush; every I/O error says which state
        the image is left in."""
        old_bytes = self.old_header.to_bytes()
        new_bytes = new_header.to_bytes()
        if len(old_bytes) != len(new_bytes):  # pragma: no cover - header length never changes
            raise AssertionError("header length changed")
        diff = [i for i in range(len(old_bytes)) if old_bytes[i] != new_bytes[i]]
        if diff and diff[-1] >= HEADER_COMMIT_LIMIT:  # pragma: no cover - by construction
            raise AssertionError("header change outside the first sector")
        io = self.io
        path = self.image.path
        try:
            for offset in sorted(new_data):
                io.pwrite(new_data[offset], offset)
            io.fsync()
        except OSError as exc:
            raise CommitFailedError(
                f"{path}: the edit was not applied: writing the new metadata failed "
                f"({exc.strerror or exc}); the image is unchanged, in its old state") from exc
        self._switched = True
        if diff:
            lo, hi = diff[0], diff[-1] + 1
            try:
                io.pwrite(new_bytes[lo:hi], lo)          # the commit point
            except OSError as exc:
                raise TransactionPoisoned(
                    f"{path}: writing the header sector that switches to the new state failed "
                    f"({exc.strerror or exc}); the image is in the old or the new state, both "
                    f"consistent: reopen it (qcow2snap list) to see which") from exc
        try:
            io.fsync()
        except OSError as exc:
            raise CommitNotDurableError(
                f"{path}: the edit was applied (the image now reads as the new state) but "
                f"flushing it to disk failed ({exc.strerror or exc}), so it is not known to be "
                f"durable: a power loss before the storage recovers could bring back the old "
                f"state (both are consistent); check the storage, then verify with "
                f"'qcow2snap list'") from exc

    def _bytes_in_file(self, start: int, count: int) -> int:
        """Bytes of clusters ``[start, start + count)`` inside the old file."""
        first, end = start << self.cluster_bits, (start + count) << self.cluster_bits
        return max(0, min(end, self._file_size) - first)

    def _new_end_cluster(self, new_blocks: dict[int, int]) -> int:
        """One past the highest cluster in use in the new state."""
        rc = self.refcounts
        highest = self.allocated.highest(default=0)
        # scan blocks from the last one in either state for the last cluster
        # still in use (only the table's set entries: it has room for
        # thousands of blocks an image does not have)
        candidates = set(nonzero_indexes(rc.table)).union(new_blocks)
        for b in sorted(candidates, reverse=True):
            if b in new_blocks:
                last = self._last_in_use[b]
            elif rc.table[b] and rc.block_offset(b):
                old = rc.block(b)
                assert old is not None
                last = last_nonzero(old)
            else:
                continue
            if last >= 0:
                return max(highest, (b << rc.block_bits) + last) + 1
        return highest + 1

    def _reclaim(self, freed: ClusterRuns, size_now: int, size_after: int) -> None:
        """Give freed clusters back to the file system (after the commit):
        truncate a free tail, punch holes for the rest, except old metadata
        that a shadow copy replaced (:attr:`relocated`).

        That exception is QEMU's policy: it discards what a snapshot
        operation frees (``pass-discard-snapshot=on``: the deleted snapshot's
        data, L2 and L1 tables) but not clusters its own metadata handling
        frees (``pass-discard-other=off``).  QEMU rewrites tables in place
        and frees none; the shadow copies here free one old cluster per
        changed table, scattered through the file, and punching each was
        one ``fallocate`` apiece (67 of them, 0.08 s of a 0.3 s create on
        a 32 GiB image).  They stay allocated in the file, free in the
        refcounts, and the next edit's first-fit allocation reuses them;
        a free tail is still truncated and ``qcow2snap trim`` punches
        them on request."""
        cs = self.cluster_size
        # a block device keeps its size: its freed tail is discarded instead
        truncate = size_after < size_now and not self.image._file.is_block_device
        tail = (size_after + cs - 1) >> self.cluster_bits if truncate else None
        if truncate:
            self.io.truncate(size_after)
        for start, count in self._punch_runs(freed, tail):
            self.io.punch_hole(start * cs, count * cs)

    def _punch_runs(self, freed: ClusterRuns, tail: int | None) -> Iterator[tuple[int, int]]:
        """The runs of ``freed`` to punch: below cluster ``tail`` (None: all)
        and not relocated metadata or moved L2 tables, adjacent pieces
        joined."""
        def pieces() -> Iterator[tuple[int, int]]:
            for start, count in freed.runs():
                if tail is not None:
                    count = min(count, tail - start)
                    if count <= 0:
                        return
                for piece_start, piece_count in self.relocated.runs_outside(start, count):
                    yield from self.moved_l2.runs_outside(piece_start, piece_count,
                                                          self.cluster_bits)

        return joined_runs(pieces())
