"""Bulk tables: L1, L2, refcount table and refcount blocks (layer 1, like
:mod:`qcow2snap.format`, but for arrays of entries).

Tables are decoded in one step with :mod:`array` plus ``byteswap()``; entry
bits are tested with the mask constants from :mod:`qcow2snap.format`.  No
per-entry objects are created (the style reference measured construct per
entry at 20-80x, and a per-entry ``BitStruct`` at 800x, the cost of this).

Refcount blocks come in seven widths (``refcount_order`` 0..6 = 1..64 bits).
Widths of 8 bits and more map onto an ``array`` type code; the sub-byte
widths are unpacked and packed with ``bytes.translate`` (C speed), entry 0 in
the least significant bits of byte 0, as the spec says.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Sequence
from functools import cache
from itertools import compress
from typing import Literal

_LITTLE = sys.byteorder == "little"

#: array type code for 8/16/32/64-bit entries, chosen by itemsize
_TYPECODE_BY_BYTES: dict[int, str] = {}
for _code in "BHILQ":
    _TYPECODE_BY_BYTES.setdefault(array(_code).itemsize, _code)
if sorted(_TYPECODE_BY_BYTES) != [1, 2, 4, 8]:  # pragma: no cover - exotic platform
    raise ImportError("qcow2snap needs array type codes of 1, 2, 4 and 8 bytes")
_U64 = _TYPECODE_BY_BYTES[8]


def decode_u64_table(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian u64 entries -> ``array`` of ints (``len(data)`` must be a
    multiple of 8)."""
    table = array(_U64)
    table.frombytes(data)
    if _LITTLE:
        table.byteswap()
    return table


#: Entries per probe of :func:`nonzero_indexes` (4 KiB of a u64 table).
ZERO_PROBE_ENTRIES = 512
_ZERO_PROBE = bytes(8 * ZERO_PROBE_ENTRIES)
#: Entries whose bytes :func:`nonzero_indexes` takes at a time (1 MiB)
_PIECE_ENTRIES = 1 << 17


def nonzero_indexes(table: array[int]) -> Iterator[int]:
    """The indexes of the non-zero entries of a u64 table, in order, as
    they are found.

    Runs of zero entries are skipped 512 at a time by comparing their bytes
    with zeros (C speed, no int per entry), so the cost follows the entries
    that are set: an L1 table of a 64 TiB disk (131,072 entries) with a few
    L2 tables costs ~0.1 ms, where ``compress(range(n), table)`` boxes every
    entry (~10 ms).  Memory is fixed: the table's bytes are taken 1 MiB at
    a time, and no list of the indexes is built (QEMU's largest L1 table
    has 4 Mi entries, 160 MiB as a list of ints)."""
    step = ZERO_PROBE_ENTRIES
    size = len(table)
    zero = _ZERO_PROBE
    for piece in range(0, size, _PIECE_ENTRIES):
        raw = table[piece:piece + _PIECE_ENTRIES].tobytes()
        for start in range(piece, min(piece + _PIECE_ENTRIES, size), step):
            if raw[8 * (start - piece):8 * (start - piece + step)] == zero:
                continue
            end = min(start + step, size)
            yield from compress(range(start, end), table[start:end])


def encode_u64_table(table: array[int] | list[int]) -> bytes:
    """``array``/list of ints -> big-endian u64 bytes."""
    out = array(_U64, table)
    if _LITTLE:
        out.byteswap()
    return out.tobytes()


def split_extended_l2(table: array[int]) -> tuple[array[int], array[int]]:
    """Extended L2 tables interleave (entry, subcluster bitmap) pairs."""
    return table[0::2], table[1::2]


# --- refcount blocks --------------------------------------------------------

@cache
def _sub_byte_tables(refcount_order: int) -> tuple[list[bytes], list[bytes]]:
    """For a sub-byte width (``refcount_order`` 0..2): per position ``p`` in
    a byte, a translate table extracting entry ``p`` from a byte, and one
    shifting a value into place.  Made at first use (~0.5 ms: every command
    imports this module, few meet such widths)."""
    bits = 1 << refcount_order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    extract = [bytes(((b >> (p * bits)) & mask) for b in range(256)) for p in range(per_byte)]
    place = [bytes((((b & mask) << (p * bits)) & 0xFF) for b in range(256))
             for p in range(per_byte)]
    return extract, place



def refcount_block_entries(cluster_bits: int, refcount_order: int) -> int:
    """Entries in one refcount block (QEMU: 1 << refcount_block_bits)."""
    return (1 << (cluster_bits + 3)) >> refcount_order


def decode_refcount_block(data: bytes | bytearray | memoryview, refcount_order: int) -> array[int]:
    """Decode one refcount block of width ``1 << refcount_order`` bits."""
    if refcount_order >= 3:
        nbytes = 1 << (refcount_order - 3)
        block = array(_TYPECODE_BY_BYTES[nbytes])
        block.frombytes(data)
        if _LITTLE and nbytes > 1:
            block.byteswap()
        return block
    extract, _ = _sub_byte_tables(refcount_order)
    per_byte = len(extract)
    raw = bytes(data)
    out = bytearray(len(raw) * per_byte)
    for position, table in enumerate(extract):
        out[position::per_byte] = raw.translate(table)
    return array("B", out)


def encode_refcount_block(block: array[int] | list[int], refcount_order: int) -> bytes:
    """Inverse of :func:`decode_refcount_block`.  Values must fit the width."""
    if refcount_order >= 3:
        nbytes = 1 << (refcount_order - 3)
        out = array(_TYPECODE_BY_BYTES[nbytes], block)
        if _LITTLE and nbytes > 1:
            out.byteswap()
        return out.tobytes()
    _, place = _sub_byte_tables(refcount_order)
    per_byte = len(place)
    values = bytes(block)  # raises ValueError for values > 255
    if values and max(values) >= 1 << (1 << refcount_order):
        raise ValueError(f"refcount too large for {1 << refcount_order}-bit entries")
    count = len(values) // per_byte
    combined = 0
    for position, table in enumerate(place):
        combined |= int.from_bytes(values[position::per_byte].translate(table), "big")
    return combined.to_bytes(count, "big")


def refcount_max(refcount_order: int) -> int:
    """Largest refcount a width can hold."""
    return (1 << (1 << refcount_order)) - 1


# --- L2 entries -> host clusters, in bulk -------------------------------------

_KEEP_COMPRESSED_BIT = bytes(b & 0x40 for b in range(256))
#: per bit count n: byte -> byte with its n low bits cleared
_CLEAR_LOW = [bytes(b & (0xFF << n) & 0xFF for b in range(256)) for n in range(8)]


def _byte_index(k: int) -> int:
    """Position in an entry stored in native byte order of its byte k
    (bits 8k..8k+7)."""
    return k if _LITTLE else 7 - k


def l2_host_clusters(table: array[int], cluster_bits: int) -> array[int] | None:
    """Host cluster index of every entry of an L2 table (its
    ``L2E_OFFSET_MASK`` bits >> ``cluster_bits``; 0 where there is none), at
    C speed: the flag byte and the bits below ``cluster_bits`` are cleared
    with strided slices, then the whole table, read as one integer, is
    shifted right by ``cluster_bits`` (each entry's cleared low bits are
    what the entry below receives, so no bits cross from one entry to the
    next).  None when the table holds a COMPRESSED entry, whose bits mean
    something else (the caller takes the entry-by-entry route).  ``table``
    holds plain entries (for extended L2, the caller passes ``table[0::2]``)."""
    raw = bytearray(table.tobytes())
    top = _byte_index(7)
    flags = raw[top::8]
    if 0x40 in flags.translate(_KEEP_COMPRESSED_BIT):
        return None
    zeros = bytes(len(flags))
    if cluster_bits % 8 == 0:
        # whole bytes (64 KiB clusters): move byte lanes down, no integer work
        q = cluster_bits // 8
        out_raw = bytearray(len(raw))
        for k in range(q, 7):                 # bits 8q..55 -> 0..55-8q
            out_raw[_byte_index(k - q)::8] = raw[_byte_index(k)::8]
        lanes = array(_U64)
        lanes.frombytes(out_raw)
        return lanes
    raw[top::8] = zeros                       # bits 56-63: flags, reserved
    for k in range(cluster_bits // 8):        # whole low bytes
        raw[_byte_index(k)::8] = zeros
    if cluster_bits % 8:
        k = _byte_index(cluster_bits // 8)
        raw[k::8] = raw[k::8].translate(_CLEAR_LOW[cluster_bits % 8])
    if cluster_bits < 9:                      # pragma: no cover - clusters are >= 512 bytes
        raise ValueError("cluster_bits below 9")
    order: Literal["little", "big"] = "little" if _LITTLE else "big"
    shifted = (int.from_bytes(raw, order) >> cluster_bits).to_bytes(len(raw), order)
    out = array(_U64)
    out.frombytes(shifted)
    return out


#: byte -> 1 if it is not zero; an entry's last byte: 2 if it is zero, so
#: that an all-zero entry (seven zeros, then 2) matches only whole entries
_NONZERO_BYTE = bytes([0] + [1] * 255)
_LAST_BYTE_ZERO_2 = bytes([2] + [1] * 255)
_ZERO_ENTRY = bytes(7) + b"\x02"
_ZERO_BYTES_8 = bytes(8)


def add_at(values: array[int], indexes: Sequence[int], amount: int) -> int:
    """``amount`` added at each of ``indexes`` of ``values`` (repetitions
    add up), stopping before the first sum the array's type cannot hold;
    returns how many were added (``len(indexes)``: all), so that the caller
    can widen the array and go on from there."""
    done = 0
    try:
        for index in indexes:
            values[index] += amount
            done += 1
    except OverflowError:
        pass
    return done


def nonzero_spans(raw: bytes | bytearray, limit: int | None = None
                  ) -> list[tuple[int, int]] | None:
    """``(start, stop)`` byte ranges of the stretches of u64 entries of
    ``raw`` (a table's bytes, either byte order) that are not all zero, at
    C speed: ``find`` the next non-zero byte in a map of ``raw``'s non-zero
    bytes, then the next all-zero entry (the map marks an entry's last byte
    apart, so that it matches only whole entries).  A sparse table costs
    per stretch, not per entry; None past ``limit`` stretches.  A table
    with no eight zero bytes in a row anywhere has no zero entry: one
    stretch, found by one ``find`` (a fully allocated table: 3x faster)."""
    size = len(raw)
    if raw.find(_ZERO_BYTES_8) < 0:
        return [(0, size)] if size and limit != 0 else ([] if not size else None)
    nonzero = bytearray(raw).translate(_NONZERO_BYTE)
    nonzero[7::8] = raw[7::8].translate(_LAST_BYTE_ZERO_2)
    find = nonzero.find
    spans: list[tuple[int, int]] = []
    append = spans.append
    position = find(1)
    while position >= 0:
        if len(spans) == limit:
            return None
        start = position & ~7
        stop = find(_ZERO_ENTRY, start)
        if stop < 0:
            stop = size
        append((start, stop))
        position = find(1, stop)
    return spans


def nonzero_runs(table: array[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` index ranges of the runs of non-zero entries of a
    u64 table (:func:`nonzero_spans` of its bytes)."""
    spans = nonzero_spans(table.tobytes())
    assert spans is not None
    return [(start >> 3, stop >> 3) for start, stop in spans]


def live_entries(table: array[int]) -> tuple[list[tuple[int, int]], array[int]]:
    """The index runs of the non-zero entries of a u64 table and those
    entries, gathered at C speed (one slice per run)."""
    raw = table.tobytes()
    spans = nonzero_spans(raw)
    assert spans is not None
    live = array(table.typecode)
    live.frombytes(b"".join([raw[start:stop] for start, stop in spans]))
    return [(start >> 3, stop >> 3) for start, stop in spans], live


def l2_live_hosts(entries: array[int], cluster_bits: int
                  ) -> tuple[list[tuple[int, int]], list[int]] | None:
    """The index runs of an L2 table's live (non-zero) entries and the host
    clusters of those that have one, in entry order (plain entries:
    ``table[0::2]`` for extended L2), or None when an entry is COMPRESSED.
    The live entries are gathered first, so a sparse table costs per
    stretch of live entries, not per entry of the table (filtering all
    8,192 entries of a 64 KiB table was a fifth of an edit)."""
    runs, live = live_entries(entries)
    hosts = l2_host_clusters(live, cluster_bits)
    return None if hosts is None else (runs, list(filter(None, hosts)))
