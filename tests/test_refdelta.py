"""The transaction's chunked refcount delta against a plain dict."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qcow2snap.ops.refdelta import ClusterMarks, RefcountDelta

_CLUSTER = st.integers(0, 5000)
_OPS = st.lists(st.tuples(st.lists(_CLUSTER, max_size=40), st.integers(-3, 3), st.booleans()),
                max_size=30)


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
    expected = {c: v for c, v in sorted(reference.items()) if v}
    assert dict(delta.items()) == expected
    assert bool(delta) == bool(expected)
    assert all(delta.get(c) == reference.get(c, 0) for c in range(0, 5100, 7))
    assert delta.changed_groups(6) == {c >> 6 for c in expected}
    assert delta.changed_groups(14) == {c >> 14 for c in expected}
    assert list(delta.span(100, 300)) == [reference.get(c, 0) for c in range(100, 400)]
    assert {c for c in range(5001) if c in marks} == marked
