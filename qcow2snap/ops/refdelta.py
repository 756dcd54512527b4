"""Planned refcount changes of a transaction (operations layer), held in
bulk: :class:`RefcountDelta` (host cluster -> signed amount) and
:class:`ClusterMarks` (a set of host clusters), both in chunks that lie
inside one refcount block.

A dict entry per cluster cost ~100 bytes (an int key and an int value):
an edit of a fully allocated 2 GiB disk with 512-byte clusters touches
four million clusters, which took 774 MiB (issue 16).  Here memory follows
the refcount blocks touched (8 bytes a cluster of a touched block, at most
2**16 clusters a chunk), and whole chunks are compared, sliced and added
at C speed.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import compress, repeat
from operator import add, and_

__all__ = ["MAX_CHUNK_BITS", "ClusterMarks", "RefcountDelta", "last_nonzero", "one_chunk_run"]


#: most clusters per chunk of :class:`RefcountDelta` / :class:`ClusterMarks`
#: (a chunk is one refcount block's clusters, or a part of it)
MAX_CHUNK_BITS = 16
#: :meth:`RefcountDelta.add_many` sorts a list of at least this many
#: clusters and adds chunk by chunk
BULK_ADD = 64


def one_chunk_run(clusters: list[int], chunk_bits: int) -> bool:
    """Whether ``clusters`` is first, first + 1, ... inside one chunk."""
    n = len(clusters)
    if n < 8:
        return False
    first = clusters[0]
    return (clusters[-1] - first == n - 1 and first >> chunk_bits == clusters[-1] >> chunk_bits
            and clusters == list(range(first, first + n)))


def last_nonzero(values: array[int]) -> int:
    """Index of the last non-zero entry (-1: none), at C speed."""
    raw = values.tobytes().rstrip(b"\0")
    return (len(raw) - 1) // values.itemsize if raw else -1


class RefcountDelta:
    """Planned refcount changes, host cluster -> signed amount.

    Held in chunks of int64 (one per refcount block, at most 2**16 entries;
    created when first touched), not a dict entry per cluster: an edit of a
    fully allocated image with 512-byte clusters touches millions of
    clusters, and an int key plus an int value in a dict cost ~100 bytes
    each (the 774 MiB peak of issue 16).  Memory follows the blocks
    touched.  Reads as a mapping of the clusters whose amount is not zero."""

    __slots__ = ("bits", "chunks", "mask", "size", "view", "zero")

    def __init__(self, chunk_bits: int = 12) -> None:
        self.bits = chunk_bits
        self.size = 1 << chunk_bits
        self.mask = self.size - 1
        self.zero = array("q", bytes(8 * self.size))
        self.chunks: dict[int, array[int]] = {}
        #: new refcounts (old + delta) of clusters 0..len-1, kept up to date
        #: by every change once built (:meth:`Transaction.refcounts_of`)
        self.view: list[int] | None = None

    def chunk(self, key: int) -> array[int]:
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = array("q", self.zero)
        return chunk

    def get(self, cluster: int, default: int = 0) -> int:
        chunk = self.chunks.get(cluster >> self.bits)
        if chunk is None:
            return default
        return chunk[cluster & self.mask] or default

    def add(self, cluster: int, amount: int) -> None:
        self.chunk(cluster >> self.bits)[cluster & self.mask] += amount
        view = self.view
        if view is not None and cluster < len(view):
            view[cluster] += amount

    def add_many(self, clusters: Iterable[int], amount: int,
                 marks: ClusterMarks | None = None) -> None:
        """``amount`` on each of ``clusters`` (repetitions add up), also
        marking them in ``marks`` (of the same chunk size): one pass, the
        chunk looked up only when it changes."""
        bits, mask = self.bits, self.mask
        if self.view is not None:
            clusters = list(clusters)
            view = self.view
            for cluster in clusters:
                if cluster < len(view):
                    view[cluster] += amount
        if type(clusters) is list and one_chunk_run(clusters, bits):
            # a contiguous run (a sequentially written table): slices
            n = len(clusters)
            key, start = clusters[0] >> bits, clusters[0] & mask
            chunk = self.chunk(key)
            chunk[start:start + n] = array("q", map(add, chunk[start:start + n],
                                                    repeat(amount, n)))
            if marks is not None:
                marks.chunk(key)[start:start + n] = b"\x01" * n
            return
        if type(clusters) is list and len(clusters) >= BULK_ADD:
            self._add_sorted(sorted(clusters), amount, marks)
            return
        key = -1
        chunk = self.zero
        marked = bytearray()
        for cluster in clusters:
            if cluster >> bits != key:
                key = cluster >> bits
                chunk = self.chunk(key)
                if marks is not None:
                    marked = marks.chunk(key)
            chunk[cluster & mask] += amount
            if marks is not None:
                marked[cluster & mask] = 1

    def _add_sorted(self, clusters: list[int], amount: int, marks: ClusterMarks | None) -> None:
        """:meth:`add_many` of many clusters, in cluster order: each chunk's
        share found by bisection, then a loop of one subscript per cluster
        with no chunk test (half the per-cluster work of the general loop)."""
        bits, mask = self.bits, self.mask
        start, count = 0, len(clusters)
        while start < count:
            key = clusters[start] >> bits
            stop = bisect_left(clusters, (key + 1) << bits, start)
            chunk = self.chunk(key)
            offsets = map(and_, clusters[start:stop], repeat(mask, stop - start))
            if marks is None:
                for i in offsets:
                    chunk[i] += amount
            else:
                marked = marks.chunk(key)
                for i in offsets:
                    chunk[i] += amount
                    marked[i] = 1
            start = stop

    def span(self, first: int, count: int) -> array[int]:
        """The amounts of clusters ``[first, first + count)`` (a copy)."""
        out = array("q")
        cluster = first
        end = first + count
        while cluster < end:
            key, start = cluster >> self.bits, cluster & self.mask
            stop = min(self.size, start + end - cluster)
            out.extend((self.chunks.get(key) or self.zero)[start:stop])
            cluster += stop - start
        return out

    def changed_groups(self, group_bits: int) -> set[int]:
        """``cluster >> group_bits`` of every cluster with a non-zero amount
        (refcount block indexes), at C speed per chunk."""
        out: set[int] = set()
        if group_bits >= self.bits:
            for key, chunk in self.chunks.items():
                if chunk != self.zero:
                    out.add(key >> (group_bits - self.bits))
            return out
        size = 1 << group_bits
        zero = self.zero[:size]
        for key, chunk in self.chunks.items():
            if chunk == self.zero:
                continue
            for i in range(self.size >> group_bits):
                if chunk[i * size:(i + 1) * size] != zero:
                    out.add((key << (self.bits - group_bits)) + i)
        return out

    def items(self) -> Iterator[tuple[int, int]]:
        """(cluster, amount) of every non-zero amount, in cluster order."""
        for key in sorted(self.chunks):
            chunk = self.chunks[key]
            if chunk == self.zero:
                continue
            base = key << self.bits
            for i in compress(range(self.size), chunk):
                yield base + i, chunk[i]

    def __iter__(self) -> Iterator[int]:
        return (cluster for cluster, _ in self.items())

    def __bool__(self) -> bool:
        return any(chunk != self.zero for chunk in self.chunks.values())


class ClusterMarks:
    """A set of host clusters, as chunks of one byte per cluster."""

    __slots__ = ("bits", "chunks", "mask")

    def __init__(self, chunk_bits: int = 12) -> None:
        self.bits = chunk_bits
        self.mask = (1 << chunk_bits) - 1
        self.chunks: dict[int, bytearray] = {}

    def chunk(self, key: int) -> bytearray:
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = bytearray(1 << self.bits)
        return chunk

    def update(self, clusters: Iterable[int]) -> None:
        key = -1
        chunk = bytearray()
        for cluster in clusters:
            if cluster >> self.bits != key:
                key = cluster >> self.bits
                chunk = self.chunk(key)
            chunk[cluster & self.mask] = 1

    def __contains__(self, cluster: object) -> bool:
        if not isinstance(cluster, int):
            return False
        chunk = self.chunks.get(cluster >> self.bits)
        return chunk is not None and bool(chunk[cluster & self.mask])
