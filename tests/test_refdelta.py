"""The transaction's chunked refcount delta against a plain dict."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2snap.ops.refdelta import ClusterMarks, RefcountDelta

_CLUSTER = st.integers(0, 5000)
_OPS = st.lists(st.tuples(st.lists(_CLUSTER, max_size=150), st.integers(-3, 3), st.booleans()),
                max_size=30)


def _assert_same_as(delta: RefcountDelta, marks: ClusterMarks, reference: dict[int, int],
                    marked: set[int], group_bits: int) -> None:
    """``delta`` reads as the dict ``reference`` (its non-zero amounts) by
    every accessor, and ``marks`` holds exactly ``marked`` (clusters < 5,100)."""
    expected = {c: v for c, v in sorted(reference.items()) if v}
    assert dict(delta.items()) == expected
    assert bool(delta) == bool(expected)
    assert all(delta.get(c) == reference.get(c, 0) for c in range(0, 5100, 7))
    assert delta.changed_groups(group_bits) == {c >> group_bits for c in expected}
    assert delta.changed_groups(14) == {c >> 14 for c in expected}
    assert list(delta.span(100, 300)) == [reference.get(c, 0) for c in range(100, 400)]
    assert {c for c in range(5100) if c in marks} == marked


@given(_OPS, st.sampled_from([4, 8, 12]), st.booleans())
def test_delta_is_a_dict_of_nonzero_amounts(ops: list[tuple[list[int], int, bool]],
                                            chunk_bits: int, run: bool) -> None:
    delta, marks = RefcountDelta(chunk_bits), ClusterMarks(chunk_bits)
    reference: dict[int, int] = {}
    marked: set[int] = set()
    for clusters, amount, mark in ops:
        if run and clusters:                       # the contiguous-run fast path too
            clusters = list(range(clusters[0], clusters[0] + len(clusters)))
        delta.add_many(clusters, amount, marks if mark else None)
        for c in clusters:
            reference[c] = reference.get(c, 0) + amount
            if mark:
                marked.add(c)
    _assert_same_as(delta, marks, reference, marked, group_bits=6)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 300), min_size=64,
                                                       max_size=400),
                          st.sampled_from([1, -1, 1, -1, 2]), st.booleans()),
                min_size=1, max_size=6),
       st.sampled_from([4, 8]), st.lists(st.tuples(st.integers(0, 1600), st.integers(-130, 130)),
                                        max_size=20))
def test_scattered_bulk_adds_are_the_same_dict(
        ops: list[tuple[int, list[int], int, bool]], chunk_bits: int,
        before: list[tuple[int, int]]) -> None:
    """Bulk adds of +/-1 on clusters close together (an edit's references:
    counted in one scratch array, then added a chunk at a time) read as the
    dict of their sums: on top of amounts already there (chunks all zero,
    not zero, or widened), with repetitions up to and past a signed byte,
    marks merged with marks already set; and the scratch route is taken."""
    delta, marks = RefcountDelta(chunk_bits), ClusterMarks(chunk_bits)
    reference: dict[int, int] = {}
    marked: set[int] = set()
    for cluster, amount in before:
        delta.add(cluster, amount)
        reference[cluster] = reference.get(cluster, 0) + amount
    scattered = 0
    original = RefcountDelta._add_scattered

    def spy(self: RefcountDelta, *args: object) -> bool:
        nonlocal scattered
        done = original(self, *args)  # type: ignore[arg-type]
        scattered += done
        return done

    RefcountDelta._add_scattered = spy  # type: ignore[method-assign]
    try:
        for where, offsets, amount, mark in ops:
            clusters = [where * 400 + offset for offset in offsets]
            if mark and where == 1:
                clusters += [410] * 200      # one cluster named 200 times: the sorted route
            delta.add_many(clusters, amount, marks if mark else None)
            for c in clusters:
                reference[c] = reference.get(c, 0) + amount
                if mark:
                    marked.add(c)
    finally:
        RefcountDelta._add_scattered = original  # type: ignore[method-assign]
    _assert_same_as(delta, marks, reference, marked, group_bits=2)
    from collections import Counter
    if any(amount in (1, -1) and not (mark and where == 1)
           and max(Counter(offsets).values()) < 128 for where, offsets, amount, mark in ops):
        assert scattered, "the scratch route was never taken"


@given(st.lists(st.tuples(st.integers(-128, 127), st.integers(-128, 127)), max_size=300))
def test_signed_bytes_add_as_integers(pairs: list[tuple[int, int]]) -> None:
    """Entry-by-entry sums of signed bytes at C speed: the sums when every
    one fits -128..127, None when any does not (past 127 or below -128)."""
    from array import array

    from qcow2snap.ops.refdelta import add_signed_bytes
    a = array("b", [x for x, _ in pairs]).tobytes()
    b = array("b", [y for _, y in pairs]).tobytes()
    sums = [x + y for x, y in pairs]
    got = add_signed_bytes(a, b)
    if all(-128 <= v <= 127 for v in sums):
        assert got is not None and array("b", got).tolist() == sums
    else:
        assert got is None


class _Counts:
    """Stands in for a transaction: fixed new-state refcounts."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts

    def refcounts_of(self, clusters: list[int]) -> list[int]:
        return [self.counts.get(c, 1) for c in clusters]


_L2_ENTRY = st.one_of(
    st.just(0), st.just(1),                                         # unallocated, ZERO_PLAIN
    st.tuples(st.integers(1, 40), st.booleans(), st.booleans()).map(   # NORMAL / ZERO_ALLOC
        lambda t: (t[0] << 16) | (1 << 63 if t[1] else 0) | (1 if t[2] else 0)),
    st.integers(0, 2**30).map(lambda v: (1 << 62) | v | (1 << 63) * (v & 1)))   # COMPRESSED


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(st.lists(_L2_ENTRY, min_size=1, max_size=100),
                 st.lists(_L2_ENTRY, min_size=512, max_size=1100),     # the bulk routes
                 st.lists(_L2_ENTRY.filter(lambda e: e > 1 and not e & (1 << 62)),
                          min_size=512, max_size=700),
                 # sparse: unallocated entries between clusters (every set entry has one)
                 st.lists(st.one_of(st.just(0), _L2_ENTRY.filter(
                     lambda e: e > 1 and not e & (1 << 62))), min_size=512, max_size=700)),
       st.dictionaries(st.integers(1, 40), st.integers(1, 300)), st.booleans())
def test_copied_recomputed_is_qemus_rule(values: list[int], counts: dict[int, int],
                                         extended: bool) -> None:
    """Set COPIED iff a NORMAL/ZERO_ALLOC entry's cluster has refcount 1,
    clear it elsewhere: the bulk routes give what the per-entry rule gives."""
    from array import array

    from qcow2snap.ops.copied import copied_recomputed
    step = 2 if extended else 1
    table = array("Q", [v for value in values for v in ((value, 7) if extended else (value,))])
    want = array("Q", table)
    for j, e in enumerate(values):
        host = (e & 0x00FFFFFFFFFFFE00) >> 16
        bit = 1 << 63 if host and not e & (1 << 62) and counts.get(host, 1) == 1 else 0
        want[j * step] = (e & ~(1 << 63)) | bit
    got = copied_recomputed(table, step, 16, _Counts(counts))  # type: ignore[arg-type]
    assert (got if got is not None else table) == want
    assert (got is None) == (want == table)
    # as the COPIED pass gets it after a refcount pass: the runs and hosts known
    from qcow2snap.tables import l2_live_hosts
    live_hosts = l2_live_hosts(table[0::step], 16)
    again = copied_recomputed(table, step, 16, _Counts(counts),  # type: ignore[arg-type]
                               live_hosts)
    assert again == got


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=64), st.booleans())
def test_copied_cleared_clears_the_entries_bit_only(values: list[int], extended: bool) -> None:
    """Every entry's COPIED bit cleared, an extended table's bitmaps left as
    they are (bit 63 included); None when no entry had it."""
    from array import array

    from qcow2snap.ops.copied import copied_cleared
    step = 2 if extended else 1
    table = array("Q", [v for value in values
                        for v in ((value, (1 << 63) | value) if extended else (value,))])
    want = array("Q", table)
    want[0::step] = array("Q", [v & ~(1 << 63) for v in values])
    got = copied_cleared(table, step)
    assert (got if got is not None else table) == want
    assert (got is None) == (want == table)


@pytest.mark.parametrize("step", [1, 2])
def test_copied_in_bulk_follows_each_run_of_live_entries(step: int) -> None:
    """A sparse table (live entries in runs of 1-7 between zero entries,
    some with COPIED set, some not): each live entry gets COPIED iff its own
    cluster's count is 1, through the bulk route, run after run."""
    from array import array

    from qcow2snap.ops.copied import copied_in_bulk
    from qcow2snap.tables import l2_live_hosts
    values: list[int] = []
    host = 1
    for run in range(120):
        values += [0] * (1 + run % 3)
        for _ in range(1 + run % 7):
            values.append((host << 16) | (1 << 63 if host % 3 == 0 else 0))
            host += 1
    counts_of = {h: 1 + (h * 7 % 5 == 0) + (h % 11 == 0) for h in range(1, host)}
    entries = array("Q", values)
    table = array("Q", [v for value in values for v in ((value, 5) if step == 2 else (value,))])
    live_hosts = l2_live_hosts(entries, 16)
    assert live_hosts is not None and len(live_hosts[0]) > 100
    runs, hosts = live_hosts
    got = copied_in_bulk(table, entries, step, [counts_of[h] for h in hosts], runs)
    assert got is not None and got is not False
    want = [(v & ~(1 << 63)) | (1 << 63 if v and counts_of[(v >> 16) & 0xFFFF] == 1 else 0)
            for v in values]
    assert list(got[0::step]) == want
    if step == 2:
        assert list(got[1::2]) == [5] * len(values)


def test_copied_recomputed_mixed_counts_in_bulk() -> None:
    """A big table whose clusters have counts 1, 2 and 3: only count 1 keeps
    (or gets) COPIED, whatever the flag was."""
    from array import array

    from qcow2snap.ops.copied import copied_recomputed
    values = [((1 + j % 40) << 16) | (1 << 63 if j % 2 else 0) for j in range(600)]
    counts = {h: 1 + h % 3 for h in range(1, 41)}
    got = copied_recomputed(array("Q", values), 1, 16, _Counts(counts))  # type: ignore[arg-type]
    assert got is not None
    assert list(got) == [(v & ~(1 << 63)) | (1 << 63 if counts[(v >> 16) & 0xFFFF] == 1 else 0)
                         for v in values]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([3, 4, 5]), st.data())
def test_block_plus_delta_is_old_plus_delta(order: int, data: st.DataObject) -> None:
    """A refcount block plus its planned changes, computed as integers: the
    per-entry sums and their encoding where every count fits the width,
    None (the per-entry route, which reports the error) where one does
    not; the freed clusters are those that dropped to 0."""
    from array import array
    from operator import add

    from qcow2snap.ops.refblock import block_plus_delta, freed_indexes, increases_fit
    from qcow2snap.tables import encode_refcount_block
    top = (1 << (1 << order)) - 1
    n = data.draw(st.sampled_from([8, 64, 4096]))
    count = st.one_of(st.sampled_from([0, 1, 2, top]), st.integers(0, top))
    old = array({3: "B", 4: "H", 5: "I"}[order], data.draw(st.lists(count, min_size=n,
                                                                      max_size=n)))
    if data.draw(st.booleans()):   # a chunk still in signed bytes
        delta = array("b", data.draw(st.lists(st.one_of(
            st.sampled_from([0, 0, 1, -1, -2, 127, -128]), st.integers(-128, 127)),
            min_size=n, max_size=n)))
    else:
        delta = array("q", data.draw(st.lists(st.one_of(st.sampled_from([0, 0, 1, -1, -2]),
                                                       st.integers(-top - 3, top + 3)),
                                             min_size=n, max_size=n)))
    values = list(map(add, old, delta))
    if increases_fit(old, delta, top):   # the quick bound is never wrong
        assert min(values) >= 0 and max(values) <= top
    elif delta.typecode == "b" and min(delta) >= 0 and max(old) < top // 2:
        raise AssertionError("the quick bound missed a block far from the maximum")
    got = block_plus_delta(old, delta, order)
    if min(values) < 0 or max(values) > top:
        assert got is None
        return
    assert got is not None
    assert got[0].tolist() == values
    assert got[1] == encode_refcount_block(values, order)
    assert freed_indexes(delta, got[0], 1000) == [
        1000 + i for i in range(n) if delta[i] < 0 and values[i] == 0]

@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["B", "H", "I", "Q"]), st.data())
def test_increases_leave_shared_as_entry_by_entry(typecode: str, data: st.DataObject) -> None:
    """The C-speed test that a delta chunk only increases counts and leaves
    none at exactly 1 (``Transaction.increases_leave_shared``) agrees with
    the per-entry rule: None for any decrease or a widened chunk, and an
    increment of 1 on a zero count found whatever its position and width."""
    from array import array

    from qcow2snap.ops.refblock import any_zero_at, increments_of_one
    n = data.draw(st.sampled_from([1, 8, 64, 2048]))
    amounts = st.one_of(st.sampled_from([0, 0, 0, 1, 2, -1, 127, -128]), st.integers(-128, 127))
    chunk = array("b", data.draw(st.lists(amounts, min_size=n, max_size=n)))
    top = min((1 << (8 * array(typecode).itemsize)) - 1, 1 << 40)
    counts = st.one_of(st.sampled_from([v for v in (0, 0, 1, 256, 1 << 16, top) if v <= top]),
                       st.integers(0, top))
    old = array(typecode, data.draw(st.lists(counts, min_size=n, max_size=n)))
    ones = increments_of_one(chunk)
    if min(chunk) < 0:
        assert ones is None
        return
    assert ones is not None
    assert ones == (b"" if 1 not in chunk else bytes(int(a == 1) for a in chunk))
    leaves_one = any(a == 1 and c == 0 for a, c in zip(chunk, old, strict=True))
    if ones:
        assert any_zero_at(old, ones) == leaves_one
    else:
        assert not leaves_one
    assert increments_of_one(array("q", chunk)) is None


@pytest.mark.parametrize("typecode", ["B", "H", "I", "Q"])
def test_an_increment_of_one_on_a_zero_count_is_found_in_every_byte(typecode: str) -> None:
    """Every byte of a count is looked at: a count that is non-zero in one
    byte only does not look like 0 (the case the drawn test rarely hits)."""
    from array import array

    from qcow2snap.ops.refblock import any_zero_at, increments_of_one
    width = array(typecode).itemsize
    for position in (0, 1, 37, 63):
        chunk = array("b", bytes(64))
        chunk[position] = 1
        ones = increments_of_one(chunk)
        assert ones is not None and ones.find(1) == position
        assert any_zero_at(array(typecode, bytes(64 * width)), ones)
        for lane in range(width):
            old = array(typecode, bytes(64 * width))
            old[position] = 1 << (8 * lane)
            assert not any_zero_at(old, ones), (position, lane)


@given(st.lists(st.integers(-128, 127), max_size=5000), st.integers(0, 7))
def test_widened_signed_bytes_are_the_same_numbers(values: list[int], skip: int) -> None:
    """The C-speed sign extension gives what a per-entry conversion gives,
    for whole chunks and for slices of them, negative or not."""
    from array import array

    from qcow2snap.ops.refdelta import widen_signed_bytes
    chunk = array("b", values)
    assert widen_signed_bytes(chunk) == array("q", values)
    assert widen_signed_bytes(chunk[skip:]) == array("q", values[skip:])
    assert widen_signed_bytes(bytes(chunk)).tolist() == values


def test_a_bulk_add_that_overflows_midway_counts_each_cluster_once() -> None:
    """A bulk add whose amounts leave the signed-byte range part way
    through a chunk widens the chunk and adds every cluster exactly once
    (not again on top of the ones done before the overflow); every
    cluster is marked."""
    clusters = [5] * 100 + list(range(10, 80))
    for base in (0, 3 << 12):
        delta = RefcountDelta(12)
        marks = ClusterMarks(12)
        delta.add(base + 11, 1)
        delta.add_many([base + c for c in clusters], 2, marks)
        assert delta.get(base + 5) == 200
        assert delta.get(base + 11) == 3
        assert [delta.get(base + c) for c in range(12, 80)] == [2] * 68
        assert all(base + c in marks for c in clusters) and base + 6 not in marks


def test_runs_of_consecutive_clusters_add_past_the_signed_byte_range() -> None:
    """A run of consecutive clusters (a preallocated table) is added as one
    slice; +1 and -1 a hundred and thirty times go past -128..127 and on,
    and the marks cover the run."""
    for amount in (1, -1):
        delta = RefcountDelta(12)
        marks = ClusterMarks(12)
        delta.add(150, 5)
        run = list(range(100, 200))
        for _ in range(130):
            delta.add_many(list(run), amount, marks)
        assert delta.get(99) == delta.get(200) == 0
        assert delta.get(150) == 5 + 130 * amount
        assert all(delta.get(c) == 130 * amount for c in run if c != 150)
        assert all(c in marks for c in run) and 99 not in marks and 200 not in marks
    # add_run (the refcount pass's route for such a table) keeps the view too
    from array import array
    delta = RefcountDelta(12)
    delta.view = array("q", [3] * 160)
    delta.add_run(100, 100, -1)
    assert delta.view[99] == 3 and delta.view[100:] == array("q", [2] * 60)
    assert [delta.get(c) for c in (99, 100, 199, 200)] == [0, -1, -1, 0]
    # across chunks (4,096 clusters each here)
    delta.add_run(4000, 9000, 1)
    assert [delta.get(c) for c in (3999, 4000, 4095, 4096, 8191, 8192, 12999, 13000)] == [
        0, 1, 1, 1, 1, 1, 1, 0]


def test_amounts_are_the_chunk_or_the_span() -> None:
    """A range inside one chunk comes back as the chunk's signed bytes, a
    range across chunks or in a widened chunk as int64; the numbers are the
    same either way."""
    delta = RefcountDelta(4)
    delta.add_many([3, 5, 5, 17], 1)
    delta.add(20, -3)
    inside = delta.amounts(0, 16)
    assert inside.typecode == "b" and inside.tolist() == [0, 0, 0, 1, 0, 2] + [0] * 10
    across = delta.amounts(4, 20)
    assert across.typecode == "q" and across.tolist() == [
        delta.get(c) for c in range(4, 24)]
    assert delta.amounts(48, 16).tolist() == [0] * 16   # an untouched chunk
    delta.add(21, 1000)                                  # widens chunk 1
    widened = delta.amounts(16, 16)
    assert widened.typecode == "q" and widened[4:6].tolist() == [-3, 1000]


@given(st.lists(st.tuples(st.lists(_CLUSTER, max_size=100), st.integers(-200, 200),
                          st.booleans(), st.booleans()), max_size=30),
       st.sampled_from([4, 8]), st.sampled_from([1, 40, 300]))
def test_spilled_and_widened_chunks_are_the_same_dict(
        ops: list[tuple[list[int], int, bool, bool]], chunk_bits: int, memory: int) -> None:
    """With room for one or a few chunks in memory (the rest in the
    temporary file) and amounts past a signed byte (chunks widened, also
    midway through the sorted bulk path of 64 clusters or more), the delta
    and the marks still read as a dict and a set."""
    delta = RefcountDelta(chunk_bits, memory_bytes=memory)
    marks = ClusterMarks(chunk_bits, memory_bytes=memory)
    reference: dict[int, int] = {}
    marked: set[int] = set()
    for clusters, amount, mark, run in ops:
        if run and clusters:
            clusters = list(range(clusters[0], clusters[0] + len(clusters)))
        if len(clusters) == 1:
            delta.add(clusters[0], amount)
        else:
            delta.add_many(clusters, amount, marks if mark else None)
        for c in clusters:
            reference[c] = reference.get(c, 0) + amount
            if mark and len(clusters) > 1:
                marked.add(c)
    _assert_same_as(delta, marks, reference, marked, group_bits=2)
    if memory == 1 and len({c >> chunk_bits for c in reference}) > 1:
        assert any(delta.store.spilled) or delta.store.far, "nothing went to the temporary file"
    delta.close()
    marks.close()


def test_chunks_far_past_the_dense_keys_spill_by_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk keys past the positional range (a damaged table naming a
    cluster near 2**47) spill to slots of their own, not a byte per key up
    to them."""
    from qcow2snap.ops import refdelta
    monkeypatch.setattr(refdelta, "_DENSE_KEYS", 4)
    delta = RefcountDelta(4, memory_bytes=1)
    clusters = [1, 17, 1 << 47, (1 << 47) + 1, 1 << 40, 33, 1 << 40]
    for c in clusters:
        delta.add(c, 300 if c == 33 else -1)
    assert len(delta.store.spilled) <= 4 and delta.store.far
    assert dict(delta.items()) == {1: -1, 17: -1, 33: 300, 1 << 40: -2, 1 << 47: -1,
                                   (1 << 47) + 1: -1}
    delta.close()
