"""COPIED flags of L2 tables recomputed in bulk (operations layer), as
QEMU's ``qcow2_update_snapshot_refcount(..., 0)`` sets them: on every
NORMAL or ZERO_ALLOC entry whose cluster has a refcount of exactly 1,
cleared on every other entry.  The snapshot edits
(:mod:`qcow2snap.ops.snapshots`) call these for each table of the active
layer after planning the refcounts; per-entry Python work here was what
made edits slow (issue 16), so the common cases work on the table's bytes
at C speed."""

from __future__ import annotations

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
#: an entry's most significant byte in native order
_TOP_BYTE = 7 if sys.byteorder == "little" else 0


def copied_in_bulk(table: array[int], entries: array[int], step: int,
                    counts: list[int], runs: list[tuple[int, int]]
                    ) -> array[int] | Literal[False] | None:
    """:func:`copied_recomputed` of a table whose counts are known for
    every live entry's cluster (in entry order) and at most 255, without a
    Python step per entry: the COPIED bit each live entry wants (its count
    is 1) as one byte per entry, laid out at the entries' positions a run of
    live entries at a time, ORed as integers into the top bytes with COPIED
    cleared (QEMU clears it on every other entry; an all-zero entry's top
    byte stays 0).  False when some live entry has no cluster (the caller's
    per-entry route handles those).  ``runs``: the index runs of the live
    (non-zero) entries (:func:`l2_live_hosts`)."""
    if sum(stop - start for start, stop in runs) != len(counts):
        return False
    raw = entries.tobytes()
    top = raw[_TOP_BYTE::8]
    wanted = bytes(counts).translate(_ONE_TO_TOP_BIT)
    placed = bytearray(len(top))
    done = 0
    for start, stop in runs:
        placed[start:stop] = wanted[done:done + stop - start]
        done += stop - start
    lane = (int.from_bytes(top.translate(_CLEAR_TOP_BIT), "little")
            | int.from_bytes(placed, "little")).to_bytes(len(top), "little")
    if lane == top:
        return None
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
