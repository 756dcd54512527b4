"""Layer 1: bulk table codecs, for every refcount width."""

from __future__ import annotations

import struct
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcow2snap import tables


@given(st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_u64_table_round_trip(values: list[int]) -> None:
    data = struct.pack(f">{len(values)}Q", *values)
    decoded = tables.decode_u64_table(data)
    assert list(decoded) == values
    assert tables.encode_u64_table(decoded) == data


def _reference_decode(data: bytes, order: int) -> list[int]:
    """Straight transcription of the spec's bit layout (slow, obviously right)."""
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        return [int.from_bytes(data[i:i + n], "big") for i in range(0, len(data), n)]
    out = []
    for i in range(len(data) * 8 // bits):
        byte = data[i * bits // 8]
        shift = (i * bits) % 8
        out.append((byte >> shift) & ((1 << bits) - 1))
    return out


@pytest.mark.parametrize("order", range(7))
@given(data=st.binary(min_size=0, max_size=256).map(lambda b: b[: len(b) // 8 * 8]))
def test_refcount_block_matches_spec_layout(order: int, data: bytes) -> None:
    decoded = tables.decode_refcount_block(data, order)
    assert list(decoded) == _reference_decode(data, order)
    assert tables.encode_refcount_block(decoded, order) == data


def test_sub_byte_entry_zero_is_least_significant() -> None:
    # spec: entry 0 in the low bits of byte 0
    assert list(tables.decode_refcount_block(b"\x01", 0))[:2] == [1, 0]
    assert list(tables.decode_refcount_block(b"\x21", 2)) == [1, 2]


def test_refcount_value_too_wide_is_refused() -> None:
    with pytest.raises(ValueError, match="too large for 2-bit"):
        tables.encode_refcount_block([4, 0, 0, 0], 1)


@pytest.mark.parametrize("order,expected", [(0, 1), (4, 65535), (6, 2**64 - 1)])
def test_refcount_max(order: int, expected: int) -> None:
    assert tables.refcount_max(order) == expected


def test_refcount_block_entries() -> None:
    assert tables.refcount_block_entries(16, 4) == 32768
    assert tables.refcount_block_entries(9, 0) == 4096
    assert tables.refcount_block_entries(9, 6) == 64


def test_extended_l2_split() -> None:
    entries, bitmaps = tables.split_extended_l2(tables.decode_u64_table(
        struct.pack(">4Q", 1, 2, 3, 4)))
    assert list(entries) == [1, 3] and list(bitmaps) == [2, 4]


_ENTRY = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.integers(1, 2**64 - 1).map(
    lambda v: v & ~(1 << 62)), st.sampled_from([1, 1 << 63, (1 << 63) | (5 << 16)]))


@given(st.lists(_ENTRY, max_size=200), st.sampled_from([9, 12, 16, 21, 24]))
def test_l2_host_clusters_is_the_per_entry_rule(values: list[int], cluster_bits: int) -> None:
    from array import array
    table = array("Q", values)
    hosts = tables.l2_host_clusters(table, cluster_bits)
    if any(v & (1 << 62) for v in values):      # COMPRESSED: the caller's per-entry route
        assert hosts is None
    else:
        assert hosts is not None
        assert list(hosts) == [(v & 0x00FFFFFFFFFFFE00) >> cluster_bits for v in values]


@given(st.one_of(
    st.lists(st.one_of(st.just(0), st.integers(0, 63).map(lambda b: 1 << b)), max_size=300),
    # dense tables, most with no eight zero bytes in a row (one stretch, one find)
    st.lists(st.one_of(st.integers(1 << 56, (1 << 64) - 1),
                       st.sampled_from([0x8000000000050000, 0x0000000000050000, 1])),
             max_size=300)))
def test_nonzero_runs(values: list[int]) -> None:
    from array import array
    runs = tables.nonzero_runs(array("Q", values))
    assert [i for start, stop in runs for i in range(start, stop)] == [
        i for i, v in enumerate(values) if v]
    assert all(a[1] < b[0] for a, b in pairwise(runs))   # maximal runs


@settings(deadline=None)
@given(size=st.integers(0, 3000),
       set_entries=st.lists(st.tuples(st.integers(0, 2999), st.integers(1, (1 << 64) - 1)),
                            max_size=40))
def test_nonzero_indexes_equal_a_plain_scan(size: int, set_entries: list[tuple[int, int]]
                                            ) -> None:
    table = tables.decode_u64_table(bytes(8 * size))
    for index, value in set_entries:
        if index < size:
            table[index] = value
    assert list(tables.nonzero_indexes(table)) == [i for i, e in enumerate(table) if e]


def test_nonzero_indexes_across_the_pieces_they_are_read_in(monkeypatch: Any) -> None:
    """The table's bytes are taken a piece at a time (1 MiB): entries at
    and around the pieces' edges, and a table ending inside a probe."""
    monkeypatch.setattr(tables, "_PIECE_ENTRIES", 1024)
    size = 5 * 1024 + 100
    want = [0, 511, 512, 1023, 1024, 1025, 2047, 4096, 5 * 1024, size - 1]
    table = tables.decode_u64_table(bytes(8 * size))
    for index in want:
        table[index] = index + 1
    assert list(tables.nonzero_indexes(table)) == want
