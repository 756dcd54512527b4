"""An edit's memory does not grow with the image (issue 16: "peak memory
for any edit at most 256 MiB, whatever the image"), and the compact forms
that bound it (ops/clustersets.py) read as the lists and maps they replace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_qemu_clean
from hypothesis import given
from hypothesis import strategies as st

import qcow2snap
from qcow2snap.ops.clustersets import ClusterRuns, ClusterSet, L2Moves, SortedClusters

MiB = 1 << 20


@pytest.fixture
def no_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fixed budget shrunk to (almost) nothing, so that what is left
    of an edit's peak is what grows with the image."""
    from qcow2snap import cache, refcount
    from qcow2snap.ops import clustersets, refdelta, snapshots, transaction
    monkeypatch.setattr(transaction, "WRITE_BUFFER_BYTES", 0)
    monkeypatch.setattr(transaction, "SETS_MEMORY_BYTES", 1)
    monkeypatch.setattr(transaction, "VIEW_MAX_CLUSTERS", 0)
    monkeypatch.setattr(refdelta, "DELTA_MEMORY_BYTES", 1)
    monkeypatch.setattr(refdelta, "MARKS_MEMORY_BYTES", 1)
    monkeypatch.setattr(refcount, "READER_CACHE_BYTES", 1)
    monkeypatch.setattr(snapshots, "MEMO_BYTES", 1)
    monkeypatch.setattr(snapshots, "REFS_PER_CALL", 1024)
    monkeypatch.setattr(snapshots, "L1_SLICE_ENTRIES", 256)
    monkeypatch.setattr(clustersets, "RUNS_MEMORY_BYTES", 1024)
    monkeypatch.setattr(cache.L2_TABLES, "max_bytes", 1)


def _peak(path: Path, edit: Callable[[Any], Any]) -> tuple[int, Any]:
    with qcow2snap.open(path, "r+") as image:
        tracemalloc.start()
        try:
            result = edit(image)
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()


def test_edits_with_thousands_of_changed_tables_stay_small(
        no_budgets: None, qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    """64 MiB of 512-byte clusters, written, snapshot, written again: the
    delete of the snapshot frees 133,696 clusters (the list of them alone
    took 4.6 MiB), and the create that follows copies all 2,048 L2 tables
    (COPIED changes everywhere; the map from every L2 table to the L1
    entries pointing at it, the sets of allocated and relocated clusters
    took 1.4 MiB).  With the fixed budgets shrunk to nothing, both stay
    under 1 MiB."""
    path = tmp_path / "many-tables.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                    str(path), "64M"], check=True)
    subprocess.run([qemu_io, "-t", "unsafe", "-c", "write -P 1 0 64M", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([qemu_img, "snapshot", "-c", "s1", str(path)], check=True)
    subprocess.run([qemu_io, "-t", "unsafe", "-c", "write -P 2 0 64M", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    warm = tmp_path / "warm.qcow2"   # every lazy import done before measuring
    shutil.copyfile(path, warm)
    with qcow2snap.open(warm, "r+") as image:
        image.create_snapshot("x")
        image.delete_snapshot("x")

    peak, deleted = _peak(path, lambda image: image.delete_snapshot("s1"))
    assert len(deleted.clusters_freed) > 130_000
    assert peak < 1 * MiB, f"delete: {peak / MiB:.2f} MiB"
    assert_qemu_clean(qemu_img, path)

    peak, (_, created) = _peak(path, lambda image: image.create_snapshot("new"))
    assert len(created.clusters_allocated) > 2048
    assert peak < 1 * MiB, f"create: {peak / MiB:.2f} MiB"
    assert_qemu_clean(qemu_img, path)
    with qcow2snap.open(path) as image, image.open_disk("new") as disk:
        assert disk.read(512) == b"\x02" * 512


def test_the_budgets_fit_their_accounting() -> None:
    """The budgets an edit takes at full size, their objects included (the
    memo's and the write buffer's Python objects cost up to ~1.2x their
    bytes), stay within what :func:`edit_memory_scale` reserves for them:
    a budget raised without the accounting fails here."""
    from qcow2snap import refcount
    from qcow2snap.ops import refdelta, snapshots, transaction
    nominal = (refdelta.DELTA_MEMORY_BYTES + refdelta.MARKS_MEMORY_BYTES
               + transaction.SETS_MEMORY_BYTES + transaction.WRITE_BUFFER_BYTES
               + refcount.READER_CACHE_BYTES + snapshots.MEMO_BYTES)
    assert nominal * 1.2 <= transaction.BUDGETS_BYTES


def test_an_edit_at_qemus_l1_limit_stays_within_256_mib(qemu_img: str, qemu_io: str,
                                                        tmp_path: Path) -> None:
    """A 2 PiB disk has QEMU's largest L1 table (4 Mi entries, 32 MiB), and
    each snapshot one more: a revert holds three of them.  The budgets give
    way (a fraction of their size), and each edit's peak RSS, the whole
    CLI process, stays within the bound; qemu-img check is clean after."""
    from qcow2snap.ops import transaction
    path = tmp_path / "2p.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "2P"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 1 0 64k", "-c", "write -P 2 1P 64k",
                    "-c", "write -P 3 2047T 64k", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([qemu_img, "snapshot", "-c", "s1", str(path)], check=True)
    with qcow2snap.open(path) as image:
        assert image.header.l1_size == 4 << 20
        scale = transaction.edit_memory_scale(image)
    assert scale < 0.1
    for args in (["create", "s2"], ["revert", "s1"], ["delete", "s2"]):
        peak = _peak_rss_kib([sys.executable, "-m", "qcow2snap", *args, str(path)])
        assert peak < 256 * 1024, f"{args[0]}: {peak / 1024:.0f} MiB"
        assert_qemu_clean(qemu_img, path)


def _peak_rss_kib(command: list[str]) -> int:
    """Peak RSS of ``command`` (KiB), which must succeed: run in a child
    that measures its own child, so that no earlier child of this process
    counts."""
    probe = ("import resource, subprocess, sys; "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def test_the_old_tables_a_create_copies_are_freed_but_not_punched(
        qemu_img: str, qemu_io: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create copies every active L2 table (their COPIED flags change) and
    frees the old ones; like QEMU's metadata (pass-discard-other=off) they
    are not punched, one fallocate each, but left for the next allocation.
    They are known from the moves alone (not kept a second time), so the
    punches must consult those: none of them may touch an old table."""
    from qcow2snap import format as fmt
    from qcow2snap.ops.transaction import FileIO
    path = tmp_path / "t.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "4G"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 1 0 64k", "-c", "write -P 2 1G 64k",
                    "-c", "write -P 3 3G 64k", str(path)], check=True, stdout=subprocess.DEVNULL)
    with qcow2snap.open(path) as image:
        old_tables = [e & fmt.L1E_OFFSET_MASK for e in image.read_l1(image.layer()) if e]
    assert len(old_tables) == 3
    punched: list[tuple[int, int]] = []
    punch_hole = FileIO.punch_hole

    def spy(self: FileIO, offset: int, length: int) -> None:
        punched.append((offset, length))
        punch_hole(self, offset, length)

    monkeypatch.setattr(FileIO, "punch_hole", spy)
    with qcow2snap.open(path, "r+") as image:
        _, result = image.create_snapshot("s")
    assert all(table >> 16 in result.clusters_freed for table in old_tables)
    assert not [(o, n) for o, n in punched for t in old_tables if o < t + 65536 and t < o + n]
    assert_qemu_clean(qemu_img, path)


_ASCENDING = st.lists(st.integers(0, 3000), max_size=300).map(lambda c: sorted(set(c)))


@given(_ASCENDING, st.sampled_from([16, 64, 1 << 20]))
def test_cluster_runs_read_as_the_list(clusters: list[int], memory: int) -> None:
    from qcow2snap.ops import clustersets
    old, clustersets.RUNS_MEMORY_BYTES = clustersets.RUNS_MEMORY_BYTES, memory
    try:
        runs = ClusterRuns()
        half = len(clusters) // 2
        runs += clusters[:half]
        runs += clusters[half:]
    finally:
        clustersets.RUNS_MEMORY_BYTES = old
    assert list(runs) == clusters and runs == clusters and len(runs) == len(clusters)
    assert bool(runs) == bool(clusters)
    assert all(runs[i] == c for i, c in enumerate(clusters))
    assert runs[-1:] == clusters[-1:]
    assert all(c in runs for c in clusters[:20]) and -1 not in runs
    assert sum(count for _, count in runs.runs()) == len(clusters)
    assert ClusterRuns.from_runs(runs.runs()) == runs
    runs.close()


def test_cluster_runs_refuse_going_back() -> None:
    runs = ClusterRuns([5, 6, 7])
    assert list(runs.runs()) == [(5, 3)]
    with pytest.raises(ValueError):
        runs += [6]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2000)), max_size=200),
       st.sampled_from([1, 1 << 20]))
def test_cluster_set_is_a_set(ops: list[tuple[bool, int]], memory: int) -> None:
    members = ClusterSet(4, memory)
    reference: set[int] = set()
    for add, cluster in ops:
        if add:
            members.add(cluster)
            reference.add(cluster)
        else:
            members.discard(cluster)
            reference.discard(cluster)
    assert len(members) == len(reference)
    assert members.highest(default=-7) == max(reference, default=-7)
    assert list(ClusterRuns.from_runs(members.runs())) == sorted(reference)
    assert all((c in members) == (c in reference) for c in range(0, 2001, 3))
    relocated = SortedClusters()
    relocated.update([cluster for add, cluster in ops if add])   # repeated: kept once
    added = {cluster for add, cluster in ops if add}
    assert len(relocated) == len(added)
    assert all((c in relocated) == (c in added) for c in range(0, 2001, 3))
    free = [c for first, n in relocated.runs_outside(100, 700) for c in range(first, first + n)]
    assert free == [c for c in range(100, 800) if c not in added]
    members.close()


def test_l2_moves_follow_copies_and_keep_the_first() -> None:
    from array import array
    moves = L2Moves()
    assert not moves
    moves.add(0x1000, 0x9000)
    moves.add(0x2000, 0xA000)
    moves.add(0x2000, 0xB000)      # copied twice: the first copy stays
    assert moves.lookup(0x1000) == 0x9000 and moves.lookup(0x2000) == 0xA000
    moves.add(0x9000, 0xC000)      # a copy copied again: followed
    assert moves.lookup(0x1000) == 0xC000 and moves.lookup(0x3000) == 0x3000
    copied = 1 << 63
    l1 = array("Q", [0x1000 | copied, 0, 0x3000, 0x2000, 0x9000])
    assert moves.redirect(l1, [0, 2, 3, 4])
    assert list(l1) == [0xC000 | copied, 0, 0x3000, 0xA000, 0xC000]
    assert not moves.redirect(l1, [0, 2, 3, 4])
    assert len(moves) == 3


@given(batches=st.lists(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)).map(
    lambda pair: (pair[0], pair[0] + pair[1])), max_size=12), max_size=5),
       ascending=st.booleans())
def test_l2_moves_are_the_first_copy_followed(batches: list[list[tuple[int, int]]],
                                              ascending: bool) -> None:
    """Pairs added in batches, each batch looked up before the next (so the
    ascending batches take the append route, the others the merge): every
    offset leads to the first copy made of it, followed through copies of
    copies (a copy lies past its original, so there is no cycle), as a
    plain dict does."""
    moves, first = L2Moves(), {}
    for batch in batches:
        if ascending:
            batch = sorted({old: new for old, new in batch}.items())
        for old, new in batch:
            moves.add(old, new)
            first.setdefault(old, new)
        for offset in range(1, 101):
            want = offset
            while want in first:
                want = first[want]
            assert moves.lookup(offset) == want


@given(batches=st.lists(st.tuples(st.lists(st.integers(0, 200), max_size=30), st.booleans()),
                        max_size=5))
def test_sorted_clusters_are_the_set(batches: list[tuple[list[int], bool]]) -> None:
    """Batches added, each read before the next (so ascending batches past
    the members take the append route, the others the merge): the members
    are the set of everything added, in order."""
    clusters, model = SortedClusters(), set()
    for values, ascending in batches:
        clusters.update(sorted(set(values)) if ascending else values)
        model.update(values)
        assert len(clusters) == len(model)
        assert all(v in clusters for v in model) and -1 not in clusters
        outside = [c for start, count in clusters.runs_outside(0, 202)
                   for c in range(start, start + count)]
        assert outside == [c for c in range(202) if c not in model]
