"""Sets and lists of host clusters of one edit, in memory that does not
grow with the image (operations layer): :class:`ClusterSet` (the clusters
a transaction allocated), :class:`SortedClusters` (the old metadata it
relocated), :class:`ClusterRuns` (an ascending list of clusters held as
runs: what a commit allocated and freed) and :class:`L2Moves` (the L2
tables an edit copied, old offset -> new).

A Python set or list costs 60-100 bytes a cluster: a delete on a fully
written 512-byte-cluster disk frees millions of clusters, and a create on
a fully allocated multi-TiB image copies tens of thousands of L2 tables
(issue 16: "peak memory for any edit at most 256 MiB, whatever the
image").  Here the allocated clusters are :class:`~.refdelta.ClusterMarks`'
byte a cluster in chunks, spilled past a budget; the relocated ones, one
per copied table, 8 bytes each (:class:`SortedClusters`); a list is 16
bytes a run, spilled past :data:`RUNS_MEMORY_BYTES`; the moves are 16
bytes a copied table (at most one per entry of the active L1 table: 4 Mi
entries, QEMU's limit).
"""

from __future__ import annotations

import os
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from heapq import merge
from itertools import islice
from operator import itemgetter, lt
from typing import IO, overload

from .. import format as fmt
from .refdelta import ClusterMarks

__all__ = ["RUNS_MEMORY_BYTES", "ClusterRuns", "ClusterSet", "L2Moves", "SortedClusters",
           "joined_runs", "sorted_array"]

#: bytes of runs a :class:`ClusterRuns` keeps in memory before the older
#: ones go to an unlinked temporary file (a module constant, read when it
#: is needed: tests shrink it)
RUNS_MEMORY_BYTES = 4 << 20
#: pairs :class:`L2Moves` sorts at a time (the sorted pieces are merged)
_SORT_PIECE = 1 << 16
_MARKED = re.compile(rb"\x01+")


def _chunk_runs(chunk: bytes | bytearray, base: int, pattern: re.Pattern[bytes],
                start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    for match in pattern.finditer(chunk, start, len(chunk) if stop is None else stop):
        yield base + match.start(), match.end() - match.start()


def joined_runs(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Ascending runs (start, count) with the ones that meet joined."""
    pending: tuple[int, int] | None = None
    for start, count in runs:
        if pending is not None and pending[0] + pending[1] == start:
            pending = (pending[0], pending[1] + count)
            continue
        if pending is not None:
            yield pending
        pending = (start, count)
    if pending is not None:
        yield pending


def sorted_array(values: array[int]) -> array[int]:
    """``values`` (an ``array('Q')``) sorted, from pieces of
    :data:`_SORT_PIECE` sorted and merged: no list of every value."""
    pieces = [array("Q", sorted(values[i:i + _SORT_PIECE]))
              for i in range(0, len(values), _SORT_PIECE)]
    return pieces[0] if len(pieces) == 1 else array("Q", merge(*pieces))


def strictly_ascending(values: array[int]) -> bool:
    """Whether each of ``values`` is greater than the one before (at C
    speed, no copy): tables copied in L1 order usually are, and then need
    no sorting (which holds the values twice)."""
    return all(map(lt, values, islice(values, 1, None)))


class SortedClusters:
    """A set of clusters known to be few (the old metadata a transaction
    relocated: one cluster per copied table), 8 bytes each: appended, and
    sorted (and deduplicated) when read.  Byte-per-cluster marks cost more
    for these: the old L2 tables of a preallocated image lie one every 512
    MiB, a chunk of marks each."""

    __slots__ = ("_tail", "_values")

    def __init__(self) -> None:
        self._values = array("Q")   # sorted, no repeats
        self._tail = array("Q")     # added since, as added

    def update(self, clusters: Iterable[int]) -> None:
        self._tail.extend(clusters)

    def _sort(self) -> array[int]:
        """The members, sorted: the values added since the last call are
        appended when they follow on in order (tables copied in L1 order,
        one at a time: most of them), else sorted on their own and merged
        in, repeats dropped in the same pass (so the set is held at most
        twice, never as sorted pieces, a merge and a deduplicated copy at
        once: ~100 MiB at QEMU's largest L1 table)."""
        tail, values = self._tail, self._values
        if not tail:
            return values
        if (not values or values[-1] < tail[0]) and strictly_ascending(tail):
            values.extend(tail)
        else:
            merged = merge(values, sorted_array(tail))
            out = array("Q")
            last = -1
            for value in merged:
                if value != last:
                    out.append(value)
                    last = value
            self._values = values = out
        self._tail = array("Q")
        return values

    def __len__(self) -> int:
        return len(self._sort())

    def __contains__(self, cluster: object) -> bool:
        if not isinstance(cluster, int):
            return False
        values = self._sort()
        i = bisect_left(values, cluster)
        return i < len(values) and values[i] == cluster

    def runs_outside(self, first: int, count: int) -> Iterator[tuple[int, int]]:
        """The runs (start, count) of clusters ``[first, first + count)``
        not in the set."""
        values = self._sort()
        end = first + count
        i = bisect_left(values, first)
        cluster = first
        while i < len(values) and values[i] < end:
            if values[i] > cluster:
                yield cluster, values[i] - cluster
            cluster = values[i] + 1
            i += 1
        if cluster < end:
            yield cluster, end - cluster


class ClusterSet(ClusterMarks):
    """:class:`~.refdelta.ClusterMarks` that also knows how many clusters it
    holds and the largest, and gives its members in order as runs."""

    __slots__ = ("_highest", "count")

    def __init__(self, chunk_bits: int = 12, memory_bytes: int | None = None) -> None:
        super().__init__(chunk_bits, memory_bytes)
        self.count = 0
        self._highest: int | None = -1   # None: to be found again (after a discard)

    def add(self, cluster: int) -> None:
        chunk = self.chunk(cluster >> self.bits)
        if not chunk[cluster & self.mask]:
            chunk[cluster & self.mask] = 1
            self.count += 1
            if self._highest is not None and cluster > self._highest:
                self._highest = cluster

    def update(self, clusters: Iterable[int]) -> None:
        for cluster in clusters:
            self.add(cluster)

    def discard(self, cluster: int) -> None:
        chunk = self.store.load(cluster >> self.bits)
        if chunk is not None and chunk[cluster & self.mask]:
            chunk[cluster & self.mask] = 0
            self.count -= 1
            if cluster == self._highest:
                self._highest = None

    def __len__(self) -> int:
        return self.count

    def highest(self, default: int = -1) -> int:
        """The largest member, or ``default`` when there is none."""
        if self._highest is None:
            self._highest = -1
            for start, count in self.runs():
                self._highest = start + count - 1
        return default if self._highest < 0 else self._highest

    def runs(self) -> Iterator[tuple[int, int]]:
        """The members as runs (start, count), ascending; runs that meet at
        a chunk boundary are joined."""
        return joined_runs(run for key, chunk in self.store.items()
                           for run in _chunk_runs(chunk, key << self.bits, _MARKED))


class ClusterRuns(Sequence[int]):
    """An ascending list of host clusters held as runs: 16 bytes a run,
    and past :data:`RUNS_MEMORY_BYTES` the older runs go to an unlinked
    temporary file.  It reads as a sequence of cluster numbers (``len``,
    iteration, ``in``, indexing, ``==`` with a list), which is what
    :class:`~.transaction.CommitResult` held as a list before; :meth:`runs`
    gives the runs themselves."""

    __slots__ = ("_file", "_filed", "_length", "_tail")

    def __init__(self, clusters: Iterable[int] = ()) -> None:
        self._tail = array("Q")          # start, count, start, count, ... (in memory)
        self._file: IO[bytes] | None = None
        self._filed = 0                  # runs in the file
        self._length = 0
        self += clusters

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int]]) -> ClusterRuns:
        out = cls()
        for start, count in runs:
            out.add_run(start, count)
        return out

    def add_run(self, start: int, count: int) -> None:
        """Append ``start .. start + count - 1`` (after every cluster held)."""
        if count <= 0:
            return
        tail = self._tail
        if tail:
            end = tail[-2] + tail[-1]
            if start < end:
                raise ValueError(f"cluster {start} is not after the last one held ({end - 1})")
            if start == end:
                tail[-1] += count
                self._length += count
                return
        tail.append(start)
        tail.append(count)
        self._length += count
        if len(tail) * tail.itemsize > RUNS_MEMORY_BYTES:
            self._spill()

    def __iadd__(self, clusters: Iterable[int]) -> ClusterRuns:
        """Append ``clusters`` (ascending, after every cluster held)."""
        if type(clusters) is list and clusters and (
                clusters[-1] - clusters[0] == len(clusters) - 1
                and clusters == list(range(clusters[0], clusters[-1] + 1))):
            self.add_run(clusters[0], len(clusters))   # consecutive: one run
            return self
        start = count = 0
        for cluster in clusters:
            if count and cluster == start + count:
                count += 1
                continue
            self.add_run(start, count)
            start, count = cluster, 1
        self.add_run(start, count)
        return self

    def _spill(self) -> None:
        """Move every run but the last to the temporary file."""
        if self._file is None:
            import tempfile
            self._file = tempfile.TemporaryFile(prefix="qcow2snap-runs-")  # noqa: SIM115 - closed with the object
        keep = self._tail[-2:]
        data = memoryview(self._tail[:-2]).cast("B")
        offset = self._filed * 16
        fd = self._file.fileno()
        while len(data):
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        self._filed += len(self._tail) // 2 - 1
        self._tail = keep

    def runs(self) -> Iterator[tuple[int, int]]:
        """The runs (start, count), ascending."""
        if self._file is not None:
            fd = self._file.fileno()
            piece = 1 << 16   # runs read at a time
            for first in range(0, self._filed, piece):
                part = array("Q")
                part.frombytes(os.pread(fd, 16 * min(piece, self._filed - first), 16 * first))
                yield from zip(part[0::2], part[1::2], strict=True)
        tail = self._tail
        yield from zip(tail[0::2], tail[1::2], strict=True)

    def run_count(self) -> int:
        return self._filed + len(self._tail) // 2

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        for start, count in self.runs():
            yield from range(start, start + count)

    def __contains__(self, cluster: object) -> bool:
        if not isinstance(cluster, int):
            return False
        return any(start <= cluster < start + count for start, count in self.runs())

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("ClusterRuns index out of range")
        for start, count in self.runs():
            if index < count:
                return start + index
            index -= count
        raise IndexError("ClusterRuns index out of range")  # pragma: no cover

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClusterRuns):
            return self._length == other._length and list(self.runs()) == list(other.runs())
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return self._length == len(other) and all(
                a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ClusterRuns(len={self._length}, runs={self.run_count()})"

    def close(self) -> None:
        """Drop the temporary file (the object then holds only its last run)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class L2Moves:
    """The L2 tables an edit copied: (old offset, new offset) pairs, 16 bytes
    a table, and :meth:`redirect` to point an L1 table's entries at the
    copies.  A copy copied again is followed to its last copy; a table
    copied twice (one the active L1 table points at from two entries) keeps
    its first copy, as the referrer lists this replaced did."""

    __slots__ = ("_new", "_old", "_sorted_new", "_sorted_old")

    def __init__(self) -> None:
        self._old = array("Q")
        self._new = array("Q")
        self._sorted_old = array("Q")
        self._sorted_new = array("Q")

    def __bool__(self) -> bool:
        return bool(self._old) or bool(self._sorted_old)

    def __len__(self) -> int:
        self._sort()
        return len(self._sorted_old)

    def add(self, old: int, new: int) -> None:
        self._old.append(old)
        self._new.append(new)

    def _sort(self) -> None:
        """Merge the pairs added since the last call into the sorted arrays
        (sorted in pieces, so no list of every pair is ever built)."""
        if not self._old:
            return
        olds = self._old
        if (not self._sorted_old or self._sorted_old[-1] < olds[0]) and strictly_ascending(olds):
            # pairs added in ascending order past the sorted ones (tables
            # copied in L1 order, as they usually lie): appended, no merge
            if self._sorted_old:
                self._sorted_old.extend(olds)
                self._sorted_new.extend(self._new)
            else:
                self._sorted_old, self._sorted_new = olds, self._new
            self._old, self._new = array("Q"), array("Q")
            return
        # earlier pieces first: merge keeps their order among equal olds, and
        # sorted() keeps the order added inside a piece
        pieces: list[Iterable[tuple[int, int]]] = [
            zip(self._sorted_old, self._sorted_new, strict=True)]
        olds, news = self._old, self._new
        for first in range(0, len(olds), _SORT_PIECE):
            order = sorted(range(first, min(first + _SORT_PIECE, len(olds))),
                           key=olds.__getitem__)
            pieces.append(zip(array("Q", map(olds.__getitem__, order)),
                              array("Q", map(news.__getitem__, order)), strict=True))
        old_out, new_out = array("Q"), array("Q")
        for old, new in merge(*pieces, key=itemgetter(0)):
            if old_out and old_out[-1] == old:
                continue
            old_out.append(old)
            new_out.append(new)
        self._sorted_old, self._sorted_new = old_out, new_out
        self._old, self._new = array("Q"), array("Q")

    def runs_outside(self, first: int, count: int, cluster_bits: int
                     ) -> Iterator[tuple[int, int]]:
        """The runs (start, count) of clusters ``[first, first + count)``
        that are not the cluster of a moved table's old offset."""
        self._sort()
        olds = self._sorted_old
        end = first + count
        i = bisect_left(olds, first << cluster_bits)
        cluster = first
        while i < len(olds) and olds[i] >> cluster_bits < end:
            old = olds[i] >> cluster_bits
            if old > cluster:
                yield cluster, old - cluster
            cluster = max(cluster, old + 1)
            i += 1
        if cluster < end:
            yield cluster, end - cluster

    def lookup(self, offset: int) -> int:
        """Where the table at ``offset`` is now (``offset`` if not moved)."""
        self._sort()
        olds, news = self._sorted_old, self._sorted_new
        for _ in range(len(olds) + 1):   # a chain of copies ends (each is new)
            i = bisect_left(olds, offset)
            if i == len(olds) or olds[i] != offset:
                return offset
            offset = news[i]
        raise AssertionError("a cycle among L2 table copies")  # pragma: no cover

    def redirect(self, entries: array[int], indexes: Iterable[int]) -> bool:
        """Point the entries at ``indexes`` (the set ones) of an L1 table at
        the copies of their L2 tables; whether any changed."""
        self._sort()
        if not self._sorted_old:
            return False
        mask = fmt.L1E_OFFSET_MASK
        olds = self._sorted_old
        low, high = olds[0], olds[-1]
        changed = False
        for i in indexes:
            entry = entries[i]
            offset = entry & mask
            if offset < low or offset > high:
                continue
            new = self.lookup(offset)
            if new != offset:
                entries[i] = (entry & ~mask) | new
                changed = True
        return changed
