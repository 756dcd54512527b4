"""Crash safety: every power loss during an edit leaves exactly the old or
the new state, with no ``qemu-img check`` finding at all (no corruption, no
COPIED mismatch, no leak).

Each operation runs once through a recording I/O layer (the public ``io=``
of ``qcow2snap.open(path, "r+")``); then, from the image as it was before,
the states a power loss could leave are rebuilt one at a time on a scratch
file (tests/crashsim.py: per fsync segment, every subset of the pending
sector writes when there are at most 10, else a seeded sample with all
lost, all kept, each write / sector lost or kept alone, clean cuts, torn
writes and random subsets) and checked with qemu-img and with qcow2snap's
reader (whose output the oracle tests tie to qemu-img).  A variant whose
first sector is the old header must be exactly the old state, one with the
new header exactly the new state.  Separately, every recorded write (not a
sample) is checked against the shadow-paging protocol with an independent
refcount parser.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import place_companion, run
from crashsim import CrashReplay, Op, RecordingIO, Refcounts, shadow_paging_violations
from helpers import assert_qemu_clean, qemu_img_check

import qcow2snap
from qcow2snap import ExtentKind
from qcow2snap.ops.edit import EditableImage

pytestmark = pytest.mark.qemu


def state_of(path: Path) -> tuple[Any, ...]:
    """Everything a user can observe: the snapshot list, the virtual size, and
    per layer the mapping (runs of data / zero / unallocated) and a hash of
    every byte that is not plain zero or backing-file content; plus each
    saved VM state.  (The backing file is never written, so an unallocated
    run reads the same in every state.)"""
    with qcow2snap.open(path) as image:
        snaps = tuple((s.id, s.name, s.disk_size, s.vm_state_size, s.icount)
                      for s in image.snapshots)
        layers = []
        for sn in (None, *image.snapshots):
            h = hashlib.sha256()
            runs: list[tuple[str, int, int]] = []
            with image.open_disk(sn) as reader:
                for ext in image.extents(sn):
                    kind = {ExtentKind.ZERO: "zero",
                            ExtentKind.UNALLOCATED: "unallocated"}.get(ext.kind, "data")
                    if kind == "data":
                        pos = ext.guest_offset
                        while pos < ext.guest_end:
                            n = min(ext.guest_end - pos, 1 << 22)
                            h.update(reader.pread(pos, n))
                            pos += n
                    if runs and runs[-1][0] == kind and runs[-1][2] == ext.guest_offset:
                        runs[-1] = (kind, runs[-1][1], ext.guest_end)
                    else:
                        runs.append((kind, ext.guest_offset, ext.guest_end))
            vm = ""
            if sn is not None and sn.has_vm_state:
                with image.open_vm_state(sn) as vm_reader:
                    vm = hashlib.sha256(vm_reader.read()).hexdigest()
            layers.append((h.hexdigest(), tuple(runs), vm))
        return snaps, image.size, tuple(layers)


def record(path: Path, operation: Callable[[EditableImage], object]) -> list[Op]:
    fd = os.open(path, os.O_RDWR)
    try:
        recorder = RecordingIO(fd)
        with qcow2snap.open(path, "r+", io=recorder) as image:
            assert isinstance(image, EditableImage)
            operation(image)
    finally:
        os.close(fd)
    return recorder.ops


def assert_crash_safe(path: Path, operation: Callable[[EditableImage], object],
                      qemu_img: str, tmp_path: Path, **replay: int) -> CrashReplay:
    """Run ``operation`` on ``path`` recorded, then replay its power losses in
    ``tmp_path``; returns the replay (``.stats`` counts the variants)."""
    before_copy = tmp_path / ("before-" + path.name)
    before_copy.write_bytes(path.read_bytes())
    before = state_of(path)
    with open(path, "rb") as f:
        old_head = f.read(512)
    ops = record(path, operation)
    after = state_of(path)
    with open(path, "rb") as f:
        new_head = f.read(512)
    assert before != after, "the operation changed nothing observable"
    assert_qemu_clean(qemu_img, path)
    assert any(op.kind == "fsync" for op in ops)
    assert shadow_paging_violations(before_copy, path, ops) == []
    crashed = tmp_path / path.name
    # companions (backing files) sit beside the original
    for companion in path.parent.iterdir():
        if (companion != path and companion.is_file()
                and not (tmp_path / companion.name).exists()):
            place_companion(companion, tmp_path / companion.name)
    replayer = CrashReplay(before_copy, ops, crashed)
    seen = set()
    for label in replayer.variants(**replay):
        problems = qemu_img_check(qemu_img, crashed).problems
        assert not problems, (label, problems)
        with open(crashed, "rb") as f:
            head = f.read(512)
        expected = {old_head: ("old", before), new_head: ("new", after)}.get(head)
        assert expected is not None, f"{label}: the header sector is neither old nor new"
        assert state_of(crashed) == expected[1], f"{label}: not exactly the {expected[0]} state"
        seen.add(expected[0])
    assert seen == {"old", "new"}, seen
    assert replayer.stats.variants == replayer.stats.subsets - replayer.stats.duplicates
    return replayer


OPERATIONS: dict[str, Callable[[EditableImage], object]] = {
    "create": lambda im: im.create_snapshot("crash-new"),
    "create-overwrite": lambda im: im.create_snapshot(im.snapshots[0].name, overwrite=True),
    "delete-first": lambda im: im.delete_snapshot(im.snapshots[0]),
    "delete-last": lambda im: im.delete_snapshot(im.snapshots[-1]),
    "revert-first": lambda im: im.revert_to_snapshot(im.snapshots[0]),
    "rename": lambda im: im.rename_snapshot(im.snapshots[0], "renamed"),
}

CASES = [
    ("v3-basic", "create"), ("v3-basic", "create-overwrite"), ("v3-basic", "delete-first"),
    ("v3-basic", "delete-last"), ("v3-basic", "revert-first"), ("v3-basic", "rename"),
    ("v2", "create"), ("v2", "delete-first"), ("v2", "revert-first"),
    ("clusters-512", "create"), ("clusters-512", "delete-first"),
    ("clusters-512", "revert-first"),
    ("compressed-zstd", "delete-first"), ("compressed-zlib", "revert-first"),
    ("extended-l2", "create"), ("extended-l2", "revert-first"),
    ("resized-shrink", "revert-first"), ("resized-grow", "revert-first"),
    ("backing-chain", "create"), ("savevm", "delete-first"), ("savevm", "revert-first"),
    ("refcount-8", "create"), ("refcount-64", "delete-first"),
]


@pytest.mark.parametrize("name,operation", CASES)
def test_power_loss_leaves_old_or_new_state(name: str, operation: str, fixture_copy: Any,
                                            qemu_img: str, tmp_path: Path) -> None:
    path = fixture_copy(name)
    scratch = tmp_path / "crash"
    scratch.mkdir()
    replay = assert_crash_safe(path, OPERATIONS[operation], qemu_img, scratch)
    assert replay.stats.variants > 3


# ---------------------------------------------------------------------------
# refcount structures at their edges (512-byte clusters keep them small)


def free_and_end(path: Path) -> tuple[int, int]:
    """(first cluster with refcount 0, one past the last with refcount > 0)."""
    refcounts = Refcounts(path)
    clusters = (path.stat().st_size + 511) // 512
    used = [bool(refcounts.get(c)) for c in range(clusters)]
    end = max(c for c in range(clusters) if used[c]) + 1
    return ([*used, False]).index(False), end


def build_edge_image(path: Path, qemu_img: str, qemu_io: str, refcount_bits: int,
                     end: int, snapshots: int = 1) -> None:
    """A 512-byte-cluster image with ``snapshots`` snapshots (taken by
    qemu-img) whose clusters ``[0, end)`` are all in use and nothing beyond.

    ``write -z`` over the whole disk after the snapshots allocates every L2
    table up front (and fills the holes the snapshots left), so each guest
    cluster written later allocates exactly one host cluster, plus one
    refcount block (qemu puts it at the start of its own range) whenever the
    end enters a range no block covers yet; the writes are sized for that.
    """
    virtual = (end * 512 * 17 // 16 // 32768 + 2) * 32768   # just enough guest space
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size=512,refcount_bits={refcount_bits}", str(path), str(virtual))
    guest = 0
    for n in range(snapshots):
        run(qemu_io, "-c", f"write -P {0x30 + n} {guest} 8k", str(path))
        guest += 8 << 10
        run(qemu_img, "snapshot", "-c", f"base{n}", str(path))
    run(qemu_io, "-c", f"write -z {guest} {virtual - guest}", str(path))
    entries = (512 * 8) >> (refcount_bits.bit_length() - 1)
    for _ in range(50):
        free, top = free_and_end(path)
        if free < top:      # fill a hole one cluster at a time
            run(qemu_io, *[a for i in range(top - free)
                           for a in ("-c", f"write -P 0x2f {guest + i * 512} 512")], str(path))
            guest += (top - free) * 512
            continue
        if top >= end:
            break
        new_blocks = (end - 1) // entries - (top - 1) // entries
        count = max(1, end - top - new_blocks)
        run(qemu_io, "-c", f"write -P 0x{0x41 + top % 40:x} {guest} {count * 512}", str(path))
        guest += count * 512
    assert free_and_end(path) == (end, end), "could not place the image end exactly"
    assert guest <= virtual


def table_location(path: Path) -> tuple[int, int]:
    with qcow2snap.open(path) as image:
        return image.header.refcount_table_offset, image.header.refcount_table_clusters


@pytest.mark.parametrize("refcount_bits,end,singles", [(16, 16384 - 96, 24), (64, 4096 - 48, 64)])
def test_refcount_table_growth_is_crash_safe(refcount_bits: int, end: int, singles: int,
                                             qemu_img: str, qemu_io: str,
                                             tmp_path: Path) -> None:
    """512-byte clusters: a one-cluster refcount table holds 64 blocks, which
    cover 8 MiB of file at refcount_bits=16 and 2 MiB at 64.  The image ends
    just below that, so a snapshot create (new L1, a copy of every L2 table
    whose COPIED flags change, new refcount blocks) runs past it: it needs
    refcount blocks for clusters no block covers yet, which describe
    themselves, and a bigger refcount table somewhere else.

    The create writes a few hundred sectors before its commit, so subsets
    are sampled (seed 0): each single write and sector lost / kept alone, and
    the clean cut before each write, for ``singles`` of them (64 at
    refcount_bits=64, 24 at 16 where each check reads an 8 MiB image), plus
    16 random subsets.  The protocol check covers every write."""
    path = tmp_path / "edge.qcow2"
    build_edge_image(path, qemu_img, qemu_io, refcount_bits, end)
    assert_qemu_clean(qemu_img, path)
    old_table = table_location(path)
    assert old_table[1] == 1
    old_blocks = set(Refcounts(path).blocks)
    assert len(old_blocks) == 64, "the old table is not full"
    scratch = tmp_path / "crash"
    scratch.mkdir()
    replay = assert_crash_safe(path, lambda im: im.create_snapshot("edge"), qemu_img,
                               scratch, max_singles=singles, random_subsets=16)
    new_table = table_location(path)
    assert new_table[1] > old_table[1] and new_table[0] != old_table[0], (old_table, new_table)
    # the new table lies beyond what the old one could describe, and so do
    # new refcount blocks, at least one of them inside the range it describes
    refcounts = Refcounts(path)
    assert new_table[0] // 512 >= 64 * refcounts.entries
    added = [i for i in refcounts.blocks if i not in old_blocks]
    assert added and min(added) >= 64
    assert any(refcounts.table[i] // 512 // refcounts.entries == i for i in added), added
    assert replay.stats.variants > 100, replay.stats


BLOCK_64 = 64   # clusters one refcount block describes at 512-byte clusters, 64-bit refcounts


@pytest.mark.parametrize("operation", ["create", "rename", "delete-first"])
@pytest.mark.parametrize("offset", [-2, -1, 0, 2])
def test_refcount_block_boundary_is_crash_safe(offset: int, operation: str, qemu_img: str,
                                               qemu_io: str, tmp_path: Path) -> None:
    """The first free cluster sits ``offset`` clusters from a refcount-block
    boundary (64-bit refcounts, 512-byte clusters: 64 clusters per block), so
    the clusters the edit allocates straddle it: the new block for the next
    range is allocated inside that range and counts itself (offset -2 .. 0),
    or the self-describing block qemu made is itself shadowed (offset 2)."""
    path = tmp_path / "boundary.qcow2"
    build_edge_image(path, qemu_img, qemu_io, 64, 12 * BLOCK_64 + offset, snapshots=2)
    old_blocks = Refcounts(path).blocks.keys()
    scratch = tmp_path / "crash"
    scratch.mkdir()
    replay = assert_crash_safe(path, OPERATIONS[operation], qemu_img, scratch)
    assert replay.stats.variants > 3
    if offset <= 0:
        new = Refcounts(path)
        assert 12 in new.blocks and 12 not in old_blocks
        assert new.table[12] // 512 // BLOCK_64 == 12, "the new block does not describe itself"


# ---------------------------------------------------------------------------
# the simulator itself must be able to fail


def test_subsets_exhaustive_and_sampled() -> None:
    import random

    from crashsim import subsets
    small = list(subsets([0, 0, 1, 2], random.Random(0)))
    assert len({kept for _, kept in small}) == 16
    big = [kept for _, kept in subsets([0] * 20 + [1] * 20, random.Random(0), max_singles=8)]
    everything = tuple(range(40))
    assert () in big and everything in big
    assert tuple(range(20)) in big and tuple(range(20, 40)) in big   # each write alone
    singles_lost = {k for k in big if len(k) == 39}
    singles_kept = {k for k in big if len(k) == 1}
    assert len(singles_lost) == len(singles_kept) == 8
    assert (0,) in singles_kept and (39,) in singles_kept


def test_replay_catches_a_commit_before_its_clusters(fixture_copy: Any, qemu_img: str,
                                                     tmp_path: Path) -> None:
    """Move the header write in front of the fsync that makes the new
    clusters durable: the replay must find states that are neither old nor
    new, and the protocol check must object."""
    path = fixture_copy("clusters-512")
    before = tmp_path / "before.qcow2"
    before.write_bytes(path.read_bytes())
    ops = record(path, OPERATIONS["create"])
    commit = next(i for i, op in enumerate(ops) if op.kind == "pwrite" and op.offset < 512)
    broken = [ops[commit], *ops[:commit], *ops[commit + 1:]]
    assert shadow_paging_violations(before, path, broken)
    old, new = state_of(before), state_of(path)
    replay = CrashReplay(before, broken, tmp_path / "crashed.qcow2")
    bad = 0
    for _ in replay.variants():
        ok = qemu_img_check(qemu_img, tmp_path / "crashed.qcow2").clean
        try:
            ok = ok and state_of(tmp_path / "crashed.qcow2") in (old, new)
        except qcow2snap.Qcow2Error:
            ok = False
        bad += not ok
    assert bad > 0


def test_protocol_check_catches_in_place_writes(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    before = tmp_path / "before.qcow2"
    before.write_bytes(path.read_bytes())
    with qcow2snap.open(path) as image:
        l1 = image.header.l1_table_offset
    ops = record(path, OPERATIONS["delete-first"])
    assert shadow_paging_violations(before, path, ops) == []
    in_place = [Op("pwrite", l1, bytes(8)), *ops]
    assert any("in use" in p for p in shadow_paging_violations(before, path, in_place))
    punch_live = [*ops, Op("punch", l1, length=512)]
    assert any("punch" in p for p in shadow_paging_violations(before, path, punch_live))
    no_sync = [op for op in ops if op.kind != "fsync"]
    assert shadow_paging_violations(before, path, no_sync)


# ---------------------------------------------------------------------------
# bounded memory: shadow copies written while planning, refcount deltas in a
# temporary file (tiny bounds, so the fixtures take those paths)


@pytest.fixture
def tiny_bounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every queued copy written at once, one delta/marks chunk and one
    refcount block in memory; returns a list that counts the early writes."""
    from qcow2snap import refcount
    from qcow2snap.ops import refdelta, transaction
    monkeypatch.setattr(transaction, "WRITE_BUFFER_BYTES", 0)
    monkeypatch.setattr(refdelta, "DELTA_MEMORY_BYTES", 1)
    monkeypatch.setattr(refdelta, "MARKS_MEMORY_BYTES", 1)
    monkeypatch.setattr(refcount, "READER_CACHE_BYTES", 1)
    early: list[int] = []
    write_queued = transaction.Transaction._write_queued

    def counted(self: transaction.Transaction) -> None:
        early.append(len(self.new_data))
        write_queued(self)

    monkeypatch.setattr(transaction.Transaction, "_write_queued", counted)
    return early


TINY_CASES = [("clusters-512", "create"), ("clusters-512", "delete-first"),
              ("clusters-512", "revert-first"), ("v3-basic", "create"),
              ("compressed-zstd", "delete-first"), ("extended-l2", "revert-first"),
              ("resized-grow", "revert-first"), ("refcount-8", "create")]


@pytest.mark.parametrize("name,operation", TINY_CASES)
def test_power_loss_with_early_writes_and_spilled_deltas(
        name: str, operation: str, fixture_copy: Any, qemu_img: str, tmp_path: Path,
        tiny_bounds: list[int]) -> None:
    """The same replay with the memory bounds shrunk: copies written while
    the edit is planned are still only in clusters free in the old state,
    before the one fsync ahead of the header write."""
    path = fixture_copy(name)
    scratch = tmp_path / "crash"
    scratch.mkdir()
    replay = assert_crash_safe(path, OPERATIONS[operation], qemu_img, scratch)
    assert replay.stats.variants > 3
    assert tiny_bounds, "nothing was written early"


@pytest.mark.parametrize("failure", ["refcount overflow", "planning error"])
def test_an_error_after_early_writes_leaves_the_image_as_it_was(
        failure: str, fixture_copy: Any, qemu_img: str, tmp_path: Path,
        tiny_bounds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies already written when the edit fails: the file is cut back to
    its old size, and the image reads exactly as before, check clean."""
    from qcow2snap.ops import snapshots
    if failure == "refcount overflow":   # 1-bit refcounts: the new snapshot overflows them
        path, expected = fixture_copy("refcount-1"), qcow2snap.RefcountOverflowError
    else:
        path, expected = fixture_copy("clusters-512"), OSError

        def failing(self: snapshots.SnapshotEditor, *args: Any) -> None:
            raise OSError("injected after the copies were written")

        fix = snapshots.SnapshotEditor._fix_active_copied

        def fix_then_fail(self: snapshots.SnapshotEditor, **options: Any) -> None:
            fix(self, **options)
            failing(self)

        monkeypatch.setattr(snapshots.SnapshotEditor, "_fix_active_copied", fix_then_fail)
    size = path.stat().st_size
    before = state_of(path)
    with qcow2snap.open(path, "r+") as image, pytest.raises(expected):
        image.create_snapshot("too-many")
    assert tiny_bounds, "nothing was written early"
    assert path.stat().st_size == size
    assert state_of(path) == before
    assert_qemu_clean(qemu_img, path)
