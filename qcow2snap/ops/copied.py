"""COPIED flags of L2 tables recomputed in bulk (operations layer), as
QEMU's ``qcow2_update_snapshot_refcount(..., 0)`` sets them: on every
NORMAL or ZERO_ALLOC entry whose cluster has a refcount of exactly 1,
cleared on every other entry.  The snapshot edits
(:mod:`qcow2snap.ops.snapshots`) call these for each table of the active
layer after planning the refcounts; per-entry Python work here was what
made edits slow (issue 16), so the common cases work on the table's bytes
at C speed."""

from __future__ import annotations

import re
import sys
from array import array
from itertools import chain
from typing import Literal

from .. import format as fmt
from ..refcount import l2_live
from ..tables import decode_u64_table, encode_u64_table, l2_live_hosts
from .transaction import Transaction

__all__ = ["LiveHosts", "copied_cleared", "copied_in_bulk", "copied_recomputed"]

#: :func:`~qcow2snap.tables.l2_live_hosts` of an L2 table: the index runs
#: of its live entries, and the host clusters of those that have one
LiveHosts = tuple[list[tuple[int, int]], list[int]]

_COPIED_BIT_IN_TOP_BYTE = 0x80
#: byte -> byte with / without bit 7 (COPIED is bit 63: bit 7 of an entry's
#: most significant byte)
_KEEP_TOP_BIT = bytes(b & 0x80 for b in range(256))
_CLEAR_TOP_BIT = bytes(b & 0x7F for b in range(256))
#: a refcount (0-255) -> the COPIED bit in the top byte iff it is 1
_ONE_TO_TOP_BIT = bytes(0x80 if b == 1 else 0 for b in range(256))


#: an entry's top byte (native order: the last) -> 2 if COPIED is set, else 1
_TOP_TO_CODE = bytes(2 if b & 0x80 else 1 for b in range(256))
#: a refcount (0-255) -> 2 if it is 1 (COPIED wanted), else 1
_COUNT_TO_CODE = bytes(2 if b == 1 else 1 for b in range(256))
#: the live entries' mask bytes (a table has at most 2**16 entries)
_ALL_FF = b"\xff" * (1 << 16)
_TOP_BYTE = 7 if sys.byteorder == "little" else 0


def _index_digits(count: int) -> list[int]:
    """Per 7-bit digit of an entry index (least significant first), the
    bytes ``digit + 1`` of every index 0..count-1 as one integer (never a
    zero byte; cached per table size)."""
    digits = _INDEX_DIGITS.get(count)
    if digits is None:
        digits = []
        shift = 0
        while not digits or count > 1 << shift:
            digits.append(int.from_bytes(bytes(((j >> shift) & 0x7F) + 1 for j in range(count)),
                                         "little"))
            shift += 7
        _INDEX_DIGITS[count] = digits
    return digits


_INDEX_DIGITS: dict[int, list[int]] = {}
_CHANGED_RUN = re.compile(rb"\x03+")
_FLIP_TOP_BIT = bytes(b ^ 0x80 for b in range(256))


def copied_in_bulk(table: array[int], entries: array[int], step: int,
                    counts: list[int], runs: list[tuple[int, int]]
                    ) -> array[int] | Literal[False] | None:
    """:func:`copied_recomputed` of a table whose counts are known for
    every referenced cluster (in entry order) and at most 255, without the
    runs of live entries and without a Python step per entry: per live
    entry a code byte (its COPIED bit now, and as its count wants it) is
    gathered by deleting the zero bytes of a per-entry byte string, the two
    strings are compared, and the runs of entries that change are located
    by the same deletion applied to the digits of the entry indexes, then
    flipped a slice at a time.  False when some live entry has no cluster
    (the caller's per-entry route handles those).  ``runs``: the index
    runs of the live entries (:func:`l2_live_hosts`)."""
    count = len(entries)
    raw = entries.tobytes()
    if sum(stop - start for start, stop in runs) != len(counts):
        return False
    live = bytearray(count)
    for start, stop in runs:
        live[start:stop] = _ALL_FF[:stop - start]
    live_mask = int.from_bytes(live, "little")
    top = raw[_TOP_BYTE::8]
    now = (int.from_bytes(top.translate(_TOP_TO_CODE), "little")
           & live_mask).to_bytes(count, "little").translate(None, b"\0")
    wanted = bytes(counts).translate(_COUNT_TO_CODE)
    if now == wanted:
        return None
    changed = (int.from_bytes(now, "little") ^ int.from_bytes(wanted, "little")
               ).to_bytes(len(now), "little")
    # the index of the k-th live entry: its 7-bit digits, gathered the same way
    digits = [(d & live_mask).to_bytes(count, "little").translate(None, b"\0")
              for d in _index_digits(count)]

    if len(digits) == 1:        # tables of up to 128 entries
        low = digits[0]

        def position(k: int) -> int:
            return low[k] - 1
    elif len(digits) == 2:      # up to 16,384 entries (64 KiB clusters)
        low, high = digits

        def position(k: int) -> int:
            return (high[k] << 7) + low[k] - 129
    else:
        def position(k: int) -> int:
            return sum((digit[k] - 1) << (7 * i) for i, digit in enumerate(digits))

    lane = bytearray(top)
    for match in _CHANGED_RUN.finditer(changed):
        first, stop = match.span()
        start, last = position(first), position(stop - 1)
        if last - start == stop - 1 - first:   # consecutive entries: one slice
            lane[start:last + 1] = lane[start:last + 1].translate(_FLIP_TOP_BIT)
        else:
            for k in range(first, stop):
                lane[position(k)] ^= 0x80
    out = bytearray(raw)
    out[_TOP_BYTE::8] = lane
    new_entries = array(entries.typecode)
    new_entries.frombytes(out)
    if step == 1:
        return new_entries
    desired = array(table.typecode, table)
    desired[0::step] = new_entries
    return desired


def copied_cleared(table: array[int], step: int) -> array[int] | None:
    """The L2 table with COPIED cleared on every entry (every cluster it
    references has a refcount of 2 or more), or None if none had it: bit 7
    of every entry's top byte, on the table's bytes."""
    if _COPIED_BIT_IN_TOP_BYTE not in table.tobytes()[_TOP_BYTE::8 * step].translate(
            _KEEP_TOP_BIT):   # told on the native bytes: most tables end here
        return None
    raw = bytearray(encode_u64_table(table))   # big-endian: top byte first
    raw[0::8 * step] = raw[0::8 * step].translate(_CLEAR_TOP_BIT)
    return decode_u64_table(raw)


def copied_recomputed(table: array[int], step: int, cluster_bits: int, txn: Transaction,
                       live_hosts: LiveHosts | None = None) -> array[int] | None:
    """The L2 table with COPIED recomputed from the new refcounts (set iff
    a NORMAL/ZERO_ALLOC entry's cluster has refcount exactly 1), or None
    when no entry changes.  ``live_hosts``: :func:`l2_live_hosts` of the
    table (the runs of its live entries and the host clusters of those
    that have one; there is no COMPRESSED entry), if a refcount pass
    computed it already.

    Per-entry Python work is what made edits slow (issue 16), so the
    common cases are done on the table's bytes at C speed: every referenced
    cluster has a count of 2 or more (after a create, always) - COPIED
    cleared everywhere, found without the runs of live entries; every live
    entry has a cluster (no compressed or offset-less entry) - the top
    bytes of the live entries rewritten from the counts in one integer
    operation.  Other tables take the entry-by-entry route."""
    entries = table[0::2] if step == 2 else table
    if live_hosts is None:
        live_hosts = l2_live_hosts(entries, cluster_bits)   # None: compressed entries
    bulk_ok = live_hosts is not None
    if live_hosts is None:
        runs, live, hosts, _ = l2_live(entries, cluster_bits)
        if not runs:
            return None
        counted = list(filter(None, hosts))
    else:
        runs, counted = live_hosts
    copied = fmt.QCOW_OFLAG_COPIED
    counts = txn.refcounts_of(counted)
    if not counts or min(counts) >= 2:
        return copied_cleared(table, step)
    if bulk_ok and min(counts) >= 0 and max(counts) <= 255:
        bulk = copied_in_bulk(table, entries, step, counts, runs)
        if bulk is not False:
            return bulk
    if bulk_ok:   # the runs of live entries, needed from here on
        runs, live, hosts, _ = l2_live(entries, cluster_bits)
    if len(counted) == len(live) and min(counts) >= 0 and max(counts) <= 255:
        # every live entry has a cluster: its top byte becomes (top & 0x7F)
        # | (0x80 if its count is 1), computed on the bytes of those top
        # bytes (one per live entry) as integers, written back per run
        raw = bytearray(encode_u64_table(table))   # big-endian: top byte first
        lane = raw[0::8 * step]
        live_top = b"".join(lane[start:stop] for start, stop in runs)
        new_top = (int.from_bytes(live_top.translate(_CLEAR_TOP_BIT), "big")
                   | int.from_bytes(bytes(counts).translate(_ONE_TO_TOP_BIT), "big")
                   ).to_bytes(len(live_top), "big")
        if new_top == live_top:
            return None
        done = 0
        for start, stop in runs:
            lane[start:stop] = new_top[done:done + stop - start]
            done += stop - start
        raw[0::8 * step] = lane
        return decode_u64_table(raw)
    not_copied = ~copied & ((1 << 64) - 1)
    count_iter = iter(counts)
    wants = array(live.typecode, [
        (e & not_copied) | copied if h and next(count_iter) == 1 else e & not_copied
        for e, h in zip(live, hosts, strict=True)])
    if wants == live:
        return None
    desired = array(table.typecode, table)
    indexes = chain.from_iterable(range(start, stop) for start, stop in runs)
    for j, want, e in zip(indexes, wants, live, strict=True):
        if want != e:
            desired[j * step] = want
    return desired
