"""Planned refcount changes of a transaction (operations layer), held in
bulk: :class:`RefcountDelta` (host cluster -> signed amount) and
:class:`ClusterMarks` (a set of host clusters), both in chunks that lie
inside one refcount block.

A dict entry per cluster cost ~100 bytes (an int key and an int value):
an edit of a fully allocated 2 GiB disk with 512-byte clusters touches
four million clusters, which took 774 MiB (issue 16).  Here a chunk holds
one byte a cluster (a signed byte: amounts are -128..127 until one is not,
and that chunk is widened to int64), at most 2**16 clusters a chunk, and
whole chunks are compared, sliced and added at C speed.  Memory is bounded
whatever the image: past :data:`DELTA_MEMORY_BYTES` (and
:data:`MARKS_MEMORY_BYTES` for the marks) the chunks loaded longest ago go
to an unlinked temporary file and come back when touched again
(:class:`_Chunks`).
"""

from __future__ import annotations

import os
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from heapq import merge
from itertools import compress, islice, repeat
from operator import add, and_, sub
from typing import IO, Generic, TypeVar

__all__ = ["DELTA_MEMORY_BYTES", "FLIP_SIGN_BIT", "MARKS_MEMORY_BYTES", "MAX_CHUNK_BITS",
           "ClusterMarks", "RefcountDelta", "add_signed_bytes", "consecutive", "last_nonzero",
           "one_chunk_run", "repeated_lanes", "widen_signed_bytes"]


#: most clusters per chunk of :class:`RefcountDelta` / :class:`ClusterMarks`
#: (a chunk is one refcount block's clusters, or a part of it)
MAX_CHUNK_BITS = 16
#: :meth:`RefcountDelta.add_many` adds a list of at least this many
#: clusters chunk by chunk (:meth:`RefcountDelta._add_grouped`)
BULK_ADD = 64

#: bytes of chunks a :class:`RefcountDelta` keeps in memory (module
#: constants, read when one is made: tests shrink them to exercise the spill)
DELTA_MEMORY_BYTES = 64 << 20
#: the same for :class:`ClusterMarks`
MARKS_MEMORY_BYTES = 32 << 20

_Chunk = TypeVar("_Chunk", "array[int]", bytearray)
#: what a spilled chunk's slot holds, by code (0: nothing): a signed-byte
#: or an int64 array (:class:`RefcountDelta`), or a bytearray (:class:`ClusterMarks`)
_SPILL_KINDS = ("-", "b", "q", "")
#: keys (chunk numbers) whose slot is found by position (:attr:`_Chunks.spilled`,
#: a byte each: at most 4 MiB; 2**22 chunks of 256 clusters are a 512 GiB
#: file of 512-byte clusters)
_DENSE_KEYS = 1 << 22


def consecutive(clusters: list[int]) -> bool:
    """Whether ``clusters`` is first, first + 1, ... (at least 8 of them)."""
    n = len(clusters)
    if n < 8:
        return False
    first = clusters[0]
    return clusters[-1] - first == n - 1 and clusters == list(range(first, first + n))


def one_chunk_run(clusters: list[int], chunk_bits: int) -> bool:
    """Whether ``clusters`` is first, first + 1, ... inside one chunk."""
    return (len(clusters) >= 8 and clusters[0] >> chunk_bits == clusters[-1] >> chunk_bits
            and consecutive(clusters))


def last_nonzero(values: array[int]) -> int:
    """Index of the last non-zero entry (-1: none), at C speed."""
    raw = values.tobytes().rstrip(b"\0")
    return (len(raw) - 1) // values.itemsize if raw else -1


#: a signed byte -> its sign-extension byte (0xFF if it is negative, else 0)
_SIGN_FILL = bytes(0xFF if b & 0x80 else 0 for b in range(256))


def widen_signed_bytes(values: array[int] | bytes) -> array[int]:
    """An int64 array of signed bytes (an ``array('b')`` or its bytes), at
    C speed: the bytes go to the low byte of each 64-bit lane and, if any
    is negative, their sign bytes to the seven above, by strided slices
    (``array('q', chunk)`` converts one Python int per entry: 1.3 ms for a
    32,768-entry refcount block, several times per edit)."""
    raw = bytes(values)
    lanes = bytearray(8 * len(raw))
    low = 0 if sys.byteorder == "little" else 7
    lanes[low::8] = raw
    fill = raw.translate(_SIGN_FILL)
    if 0xFF in fill:
        for k in range(8):
            if k != low:
                lanes[k::8] = fill
    out = array("q")
    out.frombytes(lanes)
    return out


#: a byte with its top bit flipped (a signed byte + 128, as unsigned)
FLIP_SIGN_BIT = bytes(b ^ 0x80 for b in range(256))
_LANES: dict[tuple[int, int, int], int] = {}


def repeated_lanes(count: int, value: int, width: int = 8) -> int:
    """``value`` in each of ``count`` little-endian lanes of ``width``
    bytes, as one integer (cached: a few per block or chunk size)."""
    lanes = _LANES.get((count, value, width))
    if lanes is None:
        if len(_LANES) > 8:
            _LANES.clear()
        lanes = _LANES[count, value, width] = int.from_bytes(
            value.to_bytes(width, "little") * count, "little")
    return lanes


def add_signed_bytes(a: bytes, b: bytes) -> bytes | None:
    """The sums of two strings of signed bytes of one length, entry by
    entry, as signed bytes; None when a sum leaves -128..127.  At C speed:
    each entry plus 128 goes to the low byte of a 16-bit lane, the two
    strings become two integers, and their sum minus 128 per lane holds
    each entry's sum plus 128, valid iff every lane's high byte is 0 (a sum
    past 127 sets it; one below -128 borrows, which sets it too)."""
    count = len(a)
    lanes = bytearray(2 * count)
    lanes[0::2] = a.translate(FLIP_SIGN_BIT)
    total = int.from_bytes(lanes, "little")
    lanes[0::2] = b.translate(FLIP_SIGN_BIT)
    total += int.from_bytes(lanes, "little") - repeated_lanes(count, 128, 2)
    if total < 0:
        return None
    out = total.to_bytes(2 * count, "little")
    if out[1::2].count(0) != count:
        return None
    return out[0::2].translate(FLIP_SIGN_BIT)


#: a bulk add of +/-1 counts its clusters in one scratch byte array of at
#: most this many clusters (:meth:`RefcountDelta._add_scattered`: 4 MiB),
#: when it names at least one cluster in :data:`_SCATTER_DENSITY` of them;
#: a wider or sparser one is sorted into chunks instead
SCATTER_MAX_CLUSTERS = 1 << 22
_SCATTER_DENSITY = 16
#: byte -> its negation as a signed byte; byte -> 1 if it is not zero
_NEGATE = bytes((-b) & 0xFF for b in range(256))
_NONZERO_TO_ONE = bytes(int(b != 0) for b in range(256))
#: the counts a signed byte holds (a scratch count outside them: widen)
_SIGNED_COUNTS = bytes(range(128))

#: amount -> (a translate table adding it to signed bytes, the byte that
#: would wrap)
_STEP_BYTES = {1: (bytes((b + 1) & 0xFF for b in range(256)), 0x7F),
               -1: (bytes((b - 1) & 0xFF for b in range(256)), 0x80)}


def _nbytes(chunk: array[int] | bytearray) -> int:
    return len(chunk) * chunk.itemsize if isinstance(chunk, array) else len(chunk)


class _Chunks(Generic[_Chunk]):
    """chunk key -> chunk, at most ``limit_bytes`` of them in memory
    (:attr:`resident`, in the order they were loaded); past that one goes
    to an unlinked temporary file, in the slot of its key (``key *
    slot_bytes``: the file is sparse, and what is where costs one byte a
    key, :attr:`spilled`, not a dict entry: ~100 bytes a chunk, which with
    512-byte clusters was 100 bytes per 256 clusters), and comes back when
    :meth:`load` asks for it.  The one to go is the third most recently
    loaded: the two latest stay for a caller moving between neighbouring
    chunks, and the ones loaded first stay for good, so the passes of an
    edit over all its chunks in the same order (references, COPIED,
    refcount blocks) move only the excess in and out each time (evicting
    the oldest would move every chunk on every pass).  Whoever holds a
    chunk from :meth:`load` or :meth:`admit` may change it only until the
    next call of either (which may move it out)."""

    __slots__ = ("far", "file", "limit", "resident", "resident_bytes", "slot_bytes", "spilled")

    def __init__(self, limit_bytes: int, slot_bytes: int) -> None:
        self.resident: dict[int, _Chunk] = {}
        self.resident_bytes = 0
        self.limit = limit_bytes
        self.slot_bytes = slot_bytes                 # the widest chunk's size
        #: per key, what its slot in the file holds: 0 nothing, else a
        #: code of :data:`_SPILL_KINDS`
        self.spilled = bytearray()
        #: keys past :data:`_DENSE_KEYS` (clusters far beyond any real
        #: file's end, which only a damaged table names): key -> (slot
        #: after the dense ones, code)
        self.far: dict[int, tuple[int, int]] = {}
        self.file: IO[bytes] | None = None

    def admit(self, key: int, chunk: _Chunk) -> _Chunk:
        """Make ``chunk`` the resident chunk of ``key`` (replacing any)."""
        old = self.resident.pop(key, None)
        if old is not None:
            self.resident_bytes -= _nbytes(old)
        while self.resident and self.resident_bytes + _nbytes(chunk) > self.limit:
            self._spill_one()
        self.resident[key] = chunk
        self.resident_bytes += _nbytes(chunk)
        return chunk

    def _spill_one(self) -> None:
        latest = list(islice(reversed(self.resident), 3))   # most recent first
        key = latest[-1]
        chunk = self.resident.pop(key)
        self.resident_bytes -= _nbytes(chunk)
        if self.file is None:
            import tempfile
            self.file = tempfile.TemporaryFile(prefix="qcow2snap-refdelta-")  # noqa: SIM115 - closed by close()
        data = memoryview(chunk).cast("B")
        kind = _SPILL_KINDS.index(chunk.typecode if isinstance(chunk, array) else "")
        if key < _DENSE_KEYS:
            if key >= len(self.spilled):
                self.spilled.extend(bytes(key + 1 - len(self.spilled)))
            self.spilled[key] = kind
        else:
            self.far[key] = (self.far.get(key, (len(self.far), 0))[0], kind)
        offset = self._slot_offset(key)
        fd = self.file.fileno()
        while len(data):
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written

    def _in_file(self, key: int) -> int:
        """The :data:`_SPILL_KINDS` code of ``key``'s slot (0: none)."""
        if key < _DENSE_KEYS:
            return self.spilled[key] if 0 <= key < len(self.spilled) else 0
        return self.far[key][1] if key in self.far else 0

    def _slot_offset(self, key: int) -> int:
        if key < _DENSE_KEYS:
            return key * self.slot_bytes
        return (_DENSE_KEYS + self.far[key][0]) * self.slot_bytes

    def peek(self, key: int) -> _Chunk | None:
        """The chunk of ``key`` without loading it (read only), or None."""
        chunk = self.resident.get(key)
        kind = self._in_file(key) if chunk is None else 0
        if not kind:
            return chunk
        assert self.file is not None
        typecode = _SPILL_KINDS[kind]
        # a signed-byte chunk is an eighth of the widest (int64) one
        nbytes = self.slot_bytes // 8 if typecode == "b" else self.slot_bytes
        data = os.pread(self.file.fileno(), nbytes, self._slot_offset(key))
        if len(data) != nbytes:  # pragma: no cover - a regular file reads whole
            raise OSError(f"short read of the refcount delta's temporary file ({len(data)})")
        if not typecode:
            return bytearray(data)  # type: ignore[return-value]
        out = array(typecode)
        out.frombytes(data)
        return out  # type: ignore[return-value]

    def load(self, key: int) -> _Chunk | None:
        """The chunk of ``key``, made resident, or None."""
        chunk = self.resident.get(key)
        if chunk is not None or not self._in_file(key):
            return chunk
        chunk = self.peek(key)
        assert chunk is not None
        return self.admit(key, chunk)

    def items(self) -> Iterator[tuple[int, _Chunk]]:
        """Every (key, chunk), resident or not, in key order (read only)."""
        resident = sorted(self.resident)   # bounded: the chunks in memory
        spilled = self.spilled
        in_file = (key for key in range(len(spilled)) if spilled[key]) if any(spilled) else ()
        previous = -1
        for key in merge(resident, in_file, sorted(self.far)):
            if key == previous:   # resident and in the file: the resident one is current
                continue
            previous = key
            chunk = self.peek(key)
            assert chunk is not None
            yield key, chunk

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RefcountDelta:
    """Planned refcount changes, host cluster -> signed amount.

    Held in chunks (one per refcount block, at most 2**16 entries; created
    when first touched) of signed bytes, widened to int64 when an amount
    leaves -128..127, not a dict entry per cluster: an edit of a fully
    allocated image with 512-byte clusters touches millions of clusters,
    and an int key plus an int value in a dict cost ~100 bytes each (the
    774 MiB peak of issue 16).  At most ``memory_bytes`` of chunks stay in
    memory (:class:`_Chunks`).  Reads as a mapping of the clusters whose
    amount is not zero."""

    __slots__ = ("_zeros", "bits", "mask", "size", "store", "view", "zero")

    def __init__(self, chunk_bits: int = 12, memory_bytes: int | None = None) -> None:
        self.bits = chunk_bits
        self.size = 1 << chunk_bits
        self.mask = self.size - 1
        #: zeros of every chunk width (a chunk compares equal to its own)
        self._zeros = {"b": array("b", bytes(self.size)), "q": array("q", bytes(8 * self.size))}
        self.zero = self._zeros["b"]
        self.store: _Chunks[array[int]] = _Chunks(
            DELTA_MEMORY_BYTES if memory_bytes is None else memory_bytes, 8 * self.size)
        #: new refcounts (old + delta) of clusters 0..len-1, kept up to date
        #: by every change once built (:meth:`Transaction.refcounts_of`)
        self.view: array[int] | None = None

    def chunk(self, key: int) -> array[int]:
        """The chunk of ``key`` to change (created if missing)."""
        chunk = self.store.load(key)
        if chunk is None:
            chunk = self.store.admit(key, array("b", self.zero))
        return chunk

    def peek(self, key: int) -> array[int] | None:
        """The chunk of ``key`` to read, or None."""
        return self.store.load(key)

    def _widen(self, key: int) -> array[int]:
        return self.store.admit(key, widen_signed_bytes(self.chunk(key)))

    def _is_zero(self, chunk: array[int]) -> bool:
        return chunk == self._zeros[chunk.typecode]

    def get(self, cluster: int, default: int = 0) -> int:
        chunk = self.store.load(cluster >> self.bits)
        if chunk is None:
            return default
        return chunk[cluster & self.mask] or default

    def add(self, cluster: int, amount: int) -> None:
        key, index = cluster >> self.bits, cluster & self.mask
        try:
            self.chunk(key)[index] += amount
        except OverflowError:
            self._widen(key)[index] += amount
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
            self._add_run_in_chunk(clusters[0], len(clusters), amount, marks)
            return
        if type(clusters) is list and len(clusters) >= BULK_ADD:
            self._add_grouped(clusters, amount, marks)
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
            try:
                chunk[cluster & mask] += amount
            except OverflowError:
                chunk = self._widen(key)
                chunk[cluster & mask] += amount
            if marks is not None:
                marked[cluster & mask] = 1

    def add_run(self, first: int, count: int, amount: int,
                marks: ClusterMarks | None = None) -> None:
        """``amount`` on the clusters ``[first, first + count)``, also
        marking them: a slice per chunk they cross."""
        view = self.view
        if view is not None and first < len(view):
            stop = min(first + count, len(view))
            view[first:stop] = array("q", map(add, view[first:stop],
                                              repeat(amount, stop - first)))
        end = first + count
        while first < end:
            piece = min(end, ((first >> self.bits) + 1) << self.bits) - first
            self._add_run_in_chunk(first, piece, amount, marks)
            first += piece

    def _add_run_in_chunk(self, first: int, n: int, amount: int,
                          marks: ClusterMarks | None) -> None:
        key, start = first >> self.bits, first & self.mask
        chunk = self.chunk(key)
        step = _STEP_BYTES.get(amount)
        if step is not None and chunk.typecode == "b":
            # +/-1 on signed bytes: one translate, unless a byte would wrap
            segment = chunk[start:start + n].tobytes()
            if step[1] not in segment:
                chunk[start:start + n] = array("b", segment.translate(step[0]))
                if marks is not None:
                    marks.chunk(key)[start:start + n] = b"\x01" * n
                return
        try:
            chunk[start:start + n] = array(chunk.typecode, map(
                add, chunk[start:start + n], repeat(amount, n)))
        except OverflowError:
            chunk = self._widen(key)
            chunk[start:start + n] = array("q", map(add, chunk[start:start + n],
                                                    repeat(amount, n)))
        if marks is not None:
            marks.chunk(key)[start:start + n] = b"\x01" * n

    def _add_grouped(self, clusters: list[int], amount: int, marks: ClusterMarks | None) -> None:
        """:meth:`add_many` of many clusters, chunk by chunk.  +/-1 on
        clusters that lie close together (an edit's references) is counted
        in one scratch array and added a chunk at a time
        (:meth:`_add_scattered`).  Otherwise, when they all lie in one chunk
        (an image of up to 2**16 clusters: most of them) as they are, else
        sorted and each chunk's share found by bisection; then one
        subscript per cluster, with no chunk test and no counter
        (:meth:`_add_in_chunk`)."""
        bits = self.bits
        low, high = min(clusters), max(clusters)
        if amount in (1, -1):
            base = (low >> bits) << bits
            end = ((high >> bits) + 1) << bits
            if end - base <= min(SCATTER_MAX_CLUSTERS, len(clusters) * _SCATTER_DENSITY) \
                    and self._add_scattered(clusters, base, end, amount, marks):
                return
        if low >> bits == high >> bits:
            key = low >> bits
            self._add_in_chunk(key, clusters if not key else
                               list(map(sub, clusters, repeat(key << bits, len(clusters)))),
                               amount, marks)
            return
        clusters = sorted(clusters)
        start, count = 0, len(clusters)
        while start < count:
            key = clusters[start] >> bits
            stop = bisect_left(clusters, (key + 1) << bits, start)
            self._add_in_chunk(key, list(map(and_, clusters[start:stop],
                                             repeat(self.mask, stop - start))), amount, marks)
            start = stop

    def _add_scattered(self, clusters: list[int], base: int, end: int, amount: int,
                       marks: ClusterMarks | None) -> bool:
        """+/-1 on each of ``clusters`` (all in ``[base, end)``, whole
        chunks), counted first in one scratch byte array (one subscript per
        cluster, no sort: sorting an edit's references into chunks cost
        more than adding them), then added to each chunk it touches and
        marked, a chunk at a time at C speed (:meth:`_add_amounts`).  False,
        with nothing changed, when a cluster is named 128 times or more."""
        counts = bytearray(end - base)
        try:
            for offset in map(sub, clusters, repeat(base)) if base else clusters:
                counts[offset] += 1
        except ValueError:   # named 256 times or more
            return False
        if counts.translate(None, _SIGNED_COUNTS):
            return False
        size = self.size
        with memoryview(counts) as view:
            for key in range(base >> self.bits, end >> self.bits):
                start = (key << self.bits) - base
                piece = view[start:start + size].tobytes()
                if piece.count(0) == size:
                    continue
                self._add_amounts(key, piece if amount > 0 else piece.translate(_NEGATE),
                                  marks)
        return True

    def _add_amounts(self, key: int, amounts: bytes, marks: ClusterMarks | None) -> None:
        """A whole chunk's amounts (signed bytes) added to chunk ``key``,
        and the clusters whose amount is not zero marked: copied into a
        chunk that is all zero, summed as integers into one that is not
        (:func:`add_signed_bytes`), the chunk widened first when a sum would
        leave the signed-byte range."""
        chunk = self.chunk(key)
        if chunk.typecode == "b":
            with memoryview(chunk) as view, view.cast("B") as octets:
                old = octets.tobytes()
                new = amounts if old.count(0) == len(old) else add_signed_bytes(old, amounts)
                if new is not None:
                    octets[:] = new
            if new is None:
                chunk = self._widen(key)
        if chunk.typecode == "q":
            chunk[:] = array("q", map(add, chunk, widen_signed_bytes(amounts)))
        if marks is not None:
            ones = amounts.translate(_NONZERO_TO_ONE)
            marked = marks.chunk(key)
            assert len(marked) == len(ones), "marks and delta chunks differ in size"
            if marked.count(0) == len(marked):
                marked[:] = ones
            else:
                marked[:] = (int.from_bytes(marked, "little")
                             | int.from_bytes(ones, "little")).to_bytes(len(marked), "little")

    def _add_in_chunk(self, key: int, offsets: list[int], amount: int,
                      marks: ClusterMarks | None) -> None:
        """``amount`` at each of ``offsets`` of chunk ``key`` (and marked):
        a plain loop, the marks set in the same pass; a chunk whose amounts
        leave the signed-byte range is put back as it was, widened, and
        added again (so the loop keeps no count of where it stopped)."""
        chunk = self.chunk(key)
        marked = marks.chunk(key) if marks is not None else None
        if chunk.typecode == "b":
            before = chunk.tobytes()
            try:
                if marked is None:
                    for i in offsets:
                        chunk[i] += amount
                else:
                    for i in offsets:
                        chunk[i] += amount
                        marked[i] = 1
                return
            except OverflowError:
                chunk[:] = array("b", before)
                chunk = self._widen(key)
                if marks is not None:
                    marked = marks.chunk(key)
        for i in offsets:
            chunk[i] += amount
        if marked is not None:
            for i in offsets:
                marked[i] = 1

    def span(self, first: int, count: int) -> array[int]:
        """The amounts of clusters ``[first, first + count)`` (a copy, int64)."""
        out = array("q")
        cluster = first
        end = first + count
        while cluster < end:
            key, start = cluster >> self.bits, cluster & self.mask
            stop = min(self.size, start + end - cluster)
            part = (self.store.peek(key) or self.zero)[start:stop]
            out.extend(part if part.typecode == "q" else widen_signed_bytes(part))
            cluster += stop - start
        return out

    def amounts(self, first: int, count: int) -> array[int]:
        """The amounts of clusters ``[first, first + count)``: the chunk's
        own signed bytes when they lie in one chunk not widened (a slice,
        no conversion), else :meth:`span` (int64)."""
        key, start = first >> self.bits, first & self.mask
        if start + count <= self.size:
            chunk = self.store.peek(key)
            if chunk is None:
                return self.zero[start:start + count]
            if chunk.typecode == "b":
                return chunk[start:start + count]
        return self.span(first, count)

    def changed_groups(self, group_bits: int) -> set[int]:
        """``cluster >> group_bits`` of every cluster with a non-zero amount
        (refcount block indexes), at C speed per chunk."""
        out: set[int] = set()
        if group_bits >= self.bits:
            for key, chunk in self.store.items():
                if not self._is_zero(chunk):
                    out.add(key >> (group_bits - self.bits))
            return out
        size = 1 << group_bits
        for key, chunk in self.store.items():
            if self._is_zero(chunk):
                continue
            zero = self._zeros[chunk.typecode][:size]
            for i in range(self.size >> group_bits):
                if chunk[i * size:(i + 1) * size] != zero:
                    out.add((key << (self.bits - group_bits)) + i)
        return out

    def items(self) -> Iterator[tuple[int, int]]:
        """(cluster, amount) of every non-zero amount, in cluster order."""
        for key, chunk in self.store.items():
            if self._is_zero(chunk):
                continue
            base = key << self.bits
            for i in compress(range(self.size), chunk):
                yield base + i, chunk[i]

    def __iter__(self) -> Iterator[int]:
        return (cluster for cluster, _ in self.items())

    def __bool__(self) -> bool:
        return any(not self._is_zero(chunk) for _, chunk in self.store.items())

    def close(self) -> None:
        """Drop the temporary file, if the chunks ever needed one."""
        self.store.close()


class ClusterMarks:
    """A set of host clusters, as chunks of one byte per cluster (at most
    ``memory_bytes`` of them in memory, see :class:`_Chunks`)."""

    __slots__ = ("bits", "mask", "store")

    def __init__(self, chunk_bits: int = 12, memory_bytes: int | None = None) -> None:
        self.bits = chunk_bits
        self.mask = (1 << chunk_bits) - 1
        self.store: _Chunks[bytearray] = _Chunks(
            MARKS_MEMORY_BYTES if memory_bytes is None else memory_bytes, 1 << chunk_bits)

    def chunk(self, key: int) -> bytearray:
        chunk = self.store.load(key)
        if chunk is None:
            chunk = self.store.admit(key, bytearray(1 << self.bits))
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
        chunk = self.store.load(cluster >> self.bits)
        return chunk is not None and bool(chunk[cluster & self.mask])

    def close(self) -> None:
        self.store.close()
