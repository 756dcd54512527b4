"""The bulk scan of plain L2 tables (``check_l2._scan_bulk``) against the
per-entry rules it replaces, on generated tables: the same host clusters in
the same order, allocation and fragmentation counts and OFLAG_COPIED flags,
and no bulk answer for a table that needs the per-entry rules."""

from __future__ import annotations

import random
import struct
from itertools import pairwise

import pytest

from qcow2snap import format as fmt
from qcow2snap.ops.check_l2 import _geometry, _scan_bulk

COPIED = fmt.QCOW_OFLAG_COPIED
ZERO = fmt.QCOW_OFLAG_ZERO


def reference(entries: list[int], bits: int) -> tuple[list[int], int, int, list[bool]]:
    """Hosts, allocated, fragmented, COPIED per allocated entry: entry by entry."""
    hosts = []
    copied = []
    for e in entries:
        host = e & fmt.L2E_OFFSET_MASK
        if host:
            hosts.append(host >> bits)
            copied.append(bool(e & COPIED))
    fragmented = sum(1 for a, b in pairwise(hosts) if b != a + 1)
    return hosts, len(hosts), fragmented, copied


def table(entries: list[int]) -> bytes:
    return b"".join(struct.pack(">Q", e) for e in entries)


def generate(rng: random.Random, n: int, bits: int, density: float, run: int) -> list[int]:
    entries = []
    host = rng.randrange(1, 1 << 20)
    i = 0
    while i < n:
        if rng.random() < density:
            length = rng.randrange(1, run + 1)
            if rng.random() < 0.5:
                host = rng.randrange(1, 1 << 20)
            for _ in range(min(length, n - i)):
                flags = (COPIED if rng.random() < 0.7 else 0) | (ZERO if rng.random() < 0.05
                                                                 else 0)
                entries.append((host << bits) | flags)
                host += 1 if rng.random() < 0.95 else rng.randrange(2, 9)
                i += 1
        else:
            # unallocated, sometimes with flags but no offset
            entries.append(rng.choice([0, 0, 0, ZERO, COPIED, COPIED | ZERO]))
            i += 1
    return entries


@pytest.mark.parametrize("bits", [9, 12, 16, 21])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.7, 1.0])
def test_bulk_scan_matches_entry_rules(bits: int, density: float) -> None:
    rng = random.Random(bits * 1000 + int(density * 100))
    geom = _geometry(bits)
    for trial in range(6 if bits < 21 else 2):
        entries = generate(rng, geom.n, bits, density, [1, 4, 64, 100000][trial % 4])
        if trial == 5 or (bits == 21 and trial == 1):
            # every entry allocated, one run (a preallocated table)
            first = rng.randrange(1, 1 << 20)
            entries = [((first + i) << bits) | COPIED for i in range(geom.n)]
        info = _scan_bulk(table(entries), geom, 1 << 40)
        assert info is not None
        hosts, allocated, fragmented, copied = reference(entries, bits)
        assert list(info.hosts) == hosts
        assert (info.allocated, info.fragmented) == (allocated, fragmented)
        assert [f == 0xFD for f in info.copied] == copied


@pytest.mark.parametrize("bad", [fmt.QCOW_OFLAG_COMPRESSED, 1 << 58, 1 << 3, 1 << 8, 512])
def test_bulk_scan_declines_entries_needing_rules(bad: int) -> None:
    """Compressed, reserved and misaligned bits, with or without a host
    offset, and a host past the end of the file: the per-entry path decides."""
    geom = _geometry(16)
    for host in (0, 5 << 16):
        entries = [(7 << 16) | COPIED] * 10 + [host | bad] + [0] * (geom.n - 11)
        assert _scan_bulk(table(entries), geom, 1 << 30) is None
    entries = [((i + 3) << 16) for i in range(geom.n)]
    assert _scan_bulk(table(entries), geom, geom.n) is None
    assert _scan_bulk(table(entries), geom, geom.n + 3) is not None


@pytest.mark.parametrize("bits", [9, 16, 21])
def test_offset_runs_match_neighbour_steps(bits: int) -> None:
    """Runs of offsets that follow each other by one cluster, against the
    entry-by-entry definition, for steps of every kind (backwards, repeated,
    +1, +2, far) and lengths from one entry to a whole table."""
    from qcow2snap.ops.check_l2 import _offset_runs
    rng = random.Random(bits)
    geom = _geometry(bits)
    for trial in range(200):
        count = rng.choice([1, 2, 3, rng.randrange(1, geom.n + 1), geom.n])
        hosts = [rng.randrange(1, 1 << 30)]
        # a third of the tables: long runs with a few breaks (the bisection)
        breaks = rng.randrange(0, 20) if trial % 3 == 0 else count
        odd = set(rng.sample(range(count), min(breaks, count)))
        for index in range(count - 1):
            step = rng.choice([1, 1, 1, 1, 0, -1, 2, rng.randrange(1 << 30)]) \
                if index in odd else 1
            hosts.append(max(1, (hosts[-1] + step) % (1 << (56 - bits))))
        expected: list[int] = []
        for host in hosts:
            if expected and host == expected[-2] + expected[-1]:
                expected[-1] += 1
            else:
                expected += [host, 1]
        runs = _offset_runs(table([h << bits for h in hosts]), geom)
        assert list(runs) == expected, (trial, hosts[:20])
