"""The check's computed references (operations layer).

:class:`ReferenceCounts` holds what the checker (:mod:`.check`) counts: one
reference count per host cluster, kept in one ``array`` in the width of the
image's refcounts (two bytes at least, QEMU's default), so that comparing
them with the stored refcounts is a memcmp per stretch and the stored
blocks need no conversion.  Counts are added in bulk:

- an L2 table scanned into *runs* (:class:`~.check_l2.L2Info`) adds each
  run once with the sum of its paths; the layers' copies of one table
  (after a snapshot) share most runs, so runs are gathered in a
  ``Counter`` keyed ``first << RUN_KEY_BITS | count`` and counted in
  batches of at most :data:`RUN_BATCH`;
- a run's counts are raised through their low bytes (a strided view of
  the little-endian array), translated through an adding table, when no
  count carries out of its low byte (the usual case); a long run whose
  counts are all still zero is one slice assignment; anything else is
  counted item by item, and the array is widened to 8 bytes when a count
  would outgrow its width.

The runs counted stay available (sorted, per batch) for the check of data
clusters that lie inside metadata (:meth:`ReferenceCounts.any_run_holds`).
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import accumulate, chain, repeat
from operator import and_, lshift, or_, rshift

from ..tables import add_at
from .check_l2 import L2Info

__all__ = ["RUN_BATCH", "RUN_KEY_BITS", "ReferenceCounts", "last_nonzero",
           "refcount_differences", "refcount_typecode", "zeros"]

_LITTLE = sys.byteorder == "little"
#: amount below 256 -> (the byte values to which adding it does not carry,
#: the translate table adding it), made at first use (all 256 at import
#: cost ~3 ms of every check's start-up; a check uses a few amounts)
_ADDING: dict[int, tuple[bytes, bytes]] = {}
#: array type codes by item size
_TYPECODE = {array(code).itemsize: code for code in "QLIHB"}
_MAX = {code: (1 << (8 * array(code).itemsize)) - 1 for code in "QLIHB"}
#: a run at least this long, all of whose counts are still zero, is set by
#: one slice assignment (:meth:`ReferenceCounts.add_runs`)
_LONG_RUN = 64
#: a run this short or shorter is counted item by item (cheaper than a view)
_SHORT_RUN = 8
#: bits of a run key that hold the run's cluster count: an L2 table has at
#: most 2^18 entries (2 MiB clusters)
RUN_KEY_BITS = 24
_COUNT_MASK = (1 << RUN_KEY_BITS) - 1
#: runs added at once (:meth:`ReferenceCounts.add_tables`): bounds the
#: memory of their counter (about 100 bytes a run)
RUN_BATCH = 1 << 16


class ReferenceCounts:
    """Computed references per host cluster, added in bulk."""

    __slots__ = ("counts", "run_keys")

    def __init__(self, refcount_order: int, clusters: int) -> None:
        #: the counts, in the width of the image's refcounts; replaced by an
        #: 8-byte array when a count outgrows it
        self.counts: array[int] = zeros(refcount_typecode(refcount_order), clusters)
        #: the runs counted by :meth:`add_tables`, per batch, as sorted keys
        #: ``first << RUN_KEY_BITS | count``
        self.run_keys: list[array[int]] = []

    def grow(self, cluster: int) -> None:
        """Make room for counts up to ``cluster``."""
        counts = self.counts
        if cluster >= len(counts):
            counts.extend(zeros(counts.typecode, cluster + 1 - len(counts)))

    def add_one(self, cluster: int) -> None:
        """+1 on one cluster (grown as needed)."""
        counts = self.counts
        if cluster >= len(counts):
            self.grow(cluster)
        self.add(cluster, 1, 1)

    def add(self, first: int, count: int, amount: int) -> None:
        """+``amount`` on the ``count`` clusters from ``first`` (grown before)."""
        counts = self.counts
        if count == 1:
            value = counts[first] + amount
            if value > _MAX[counts.typecode]:
                self.counts = counts = array("Q", counts)
            counts[first] = value
            return
        stop = first + count
        if count <= _SHORT_RUN:
            self.add_each(range(first, stop), amount)
            return
        if _LITTLE and amount < 256:
            size = counts.itemsize
            with memoryview(counts) as view, view.cast("B") as octets, octets[0::size] as low:
                if _add_in_low_bytes(low, first, stop, amount):
                    return
        segment = counts[first:stop]
        value = segment[0] + amount
        if value > _MAX[counts.typecode]:
            self.counts = array("Q", counts)
            self.add(first, count, amount)
        elif segment.count(segment[0]) == count:
            counts[first:stop] = array(counts.typecode, (value,)) * count
        else:
            self.add_each(range(first, stop), amount)

    def add_each(self, hosts: list[int] | array[int] | range, amount: int) -> None:
        """+``amount`` on every cluster of ``hosts`` (grown before)."""
        done = add_at(self.counts, hosts, amount)
        if done < len(hosts):
            self.counts = array("Q", self.counts)
            add_at(self.counts, hosts[done:], amount)

    def add_tables(self, infos: Iterable[L2Info]) -> None:
        """Add the references of L2 tables, each times its ``paths`` (then
        zeroed).  Runs that several tables share are added once, with the
        sum of their paths, in batches of at most :data:`RUN_BATCH` runs."""
        runs_paths: Counter[int] = Counter()
        for info in infos:
            paths = info.paths
            info.paths = 0
            runs = info.runs
            if runs is not None:
                if runs:
                    keys = map(or_, map(lshift, runs[0::2], repeat(RUN_KEY_BITS)), runs[1::2])
                    if paths == 1:
                        runs_paths.update(keys)
                    else:
                        for key in keys:
                            runs_paths[key] += paths
                    if len(runs_paths) >= RUN_BATCH:
                        self.add_runs(runs_paths)
                continue
            hosts = info.hosts
            if hosts:
                self.grow(max(hosts))
                self.add_each(hosts, paths)
        self.add_runs(runs_paths)

    def add_runs(self, runs_paths: Counter[int]) -> None:
        """Add (then forget) a batch of runs keyed ``first << RUN_KEY_BITS
        | count``, each with its paths; their keys are kept, sorted, in
        :attr:`run_keys`."""
        if not runs_paths:
            return
        self.grow(max(_run_ends(runs_paths)) - 1)
        items: Iterator[tuple[int, int]] = iter(runs_paths.items())
        if _LITTLE:
            # the usual case inline, through one view: a long run counted for
            # the first time is one slice assignment, others go through the
            # low bytes; the first run that would carry and all after it
            # take :meth:`add`
            counts = self.counts
            size = counts.itemsize
            typecode = counts.typecode
            most = _MAX[typecode]
            with memoryview(counts) as view, view.cast("B") as octets, \
                    octets[0::size] as low:
                for key, paths in items:
                    first = key >> RUN_KEY_BITS
                    count = key & _COUNT_MASK
                    stop = first + count
                    if count >= _LONG_RUN and paths <= most and not \
                            octets[first * size:stop * size].tobytes().strip(b"\0"):
                        counts[first:stop] = array(typecode, (paths,)) * count
                        continue
                    if not _add_in_low_bytes(low, first, stop, paths):
                        items = chain(((key, paths),), items)
                        break
        add = self.add
        for key, paths in items:
            add(key >> RUN_KEY_BITS, key & _COUNT_MASK, paths)
        self.run_keys.append(array("Q", sorted(runs_paths)))
        runs_paths.clear()

    def any_run_holds(self, clusters: list[int]) -> bool:
        """Whether some run counted by :meth:`add_tables` contains one of
        ``clusters`` (sorted): a bisection per cluster into each batch's
        sorted runs, with their running maximum end."""
        for keys in self.run_keys:
            firsts = array("Q", map(rshift, keys, repeat(RUN_KEY_BITS)))
            # the furthest end of the runs starting at or before each first
            reach = array("Q", accumulate(_run_ends(keys), max))
            if any(i and reach[i - 1] > cluster for i, cluster in zip(
                    map(bisect_right, repeat(firsts), clusters), clusters, strict=True)):
                return True
        return False

    def highest(self) -> int:
        """The highest cluster with a reference, 0 if none."""
        return max(last_nonzero(self.counts, len(self.counts)), 0)


def _add_in_low_bytes(low: memoryview, first: int, stop: int, amount: int) -> bool:
    """+``amount`` on the counts ``[first, stop)`` through their low bytes
    (``low``: the low byte of every count, a strided view of a
    little-endian array), translated through an adding table, when none
    carries out of its low byte; False, and nothing changed, otherwise."""
    if amount > 255:
        return False
    tables = _ADDING.get(amount)
    if tables is None:
        tables = _ADDING[amount] = (bytes(range(256 - amount)),
                                    bytes(range(amount, 256)) + bytes(range(amount)))
    old = low[first:stop].tobytes()
    if old.translate(None, tables[0]):
        return False
    low[first:stop] = old.translate(tables[1])
    return True


def _run_ends(keys: Iterable[int]) -> Iterator[int]:
    """One past the last cluster of each run key (first, count), at C speed."""
    keys = list(keys)
    return map(int.__add__, map(rshift, keys, repeat(RUN_KEY_BITS)),
               map(and_, keys, repeat(_COUNT_MASK)))


def refcount_typecode(refcount_order: int) -> str:
    """The array type holding refcounts of ``1 << refcount_order`` bits
    (two bytes at least)."""
    return _TYPECODE[min(8, max(2, 1 << max(0, refcount_order - 3)))]


def zeros(typecode: str, count: int) -> array[int]:
    """An array of ``count`` zero items."""
    out = array(typecode)
    out.frombytes(bytes(out.itemsize * count))
    return out


def last_nonzero(counts: array[int], stop: int) -> int:
    """Index of the last non-zero item of ``counts[:stop]``, -1 if none
    (zero bytes stripped at C speed, 64 KiB at a time from the end)."""
    size = counts.itemsize
    end = min(stop, len(counts)) * size
    with memoryview(counts) as view, view.cast("B") as octets:
        while end > 0:
            start = max(0, end - (1 << 16))
            kept = len(octets[start:end].tobytes().rstrip(b"\0"))
            if kept:
                return (start + kept + size - 1) // size - 1
            end = start
    return -1


def refcount_differences(disk: array[int], ref: array[int]) -> Iterator[tuple[int, int, int]]:
    """``(cluster, stored, computed)`` wherever the stored refcounts and the
    computed references differ; equal stretches are skipped 4096 clusters at
    a time with one array comparison."""
    n = min(len(disk), len(ref))
    step = 4096
    for base in range(0, n, step):
        a = disk[base:base + step]
        b = ref[base:base + step]
        if a == b:
            continue
        for k, (d, r) in enumerate(zip(a, b, strict=True)):
            if d != r:
                yield base + k, d, r
