"""Crash safety: every power loss during an edit leaves exactly the old or
the new state, with no ``qemu-img check`` finding at all (no corruption, no
COPIED mismatch, no leak).

Each operation runs once through a recording I/O layer; then, from the
image as it was before, every state a power loss could leave is rebuilt
(see tests/crashsim.py: each cut point; writes after the last fsync lost,
kept, or torn per sector in random subsets) and checked with qemu-img and
with qcow2snap's reader (whose output the oracle tests tie to qemu-img).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qcow2snap
from qcow2snap.ops.edit import EditableImage

from conftest import run
from crashsim import RecordingIO, crash_images, write_image

pytestmark = pytest.mark.qemu


def state_of(path: Path) -> tuple[Any, ...]:
    """Everything a user can observe: snapshot list, sizes, every layer's content."""
    with qcow2snap.open(path) as image:
        snaps = tuple((s.id, s.name, s.disk_size, s.vm_state_size, s.icount)
                      for s in image.snapshots)
        hashes = []
        for sn in (None, *image.snapshots):
            h = hashlib.sha256()
            reader = image.open_disk(sn)
            while chunk := reader.read(1 << 22):
                h.update(chunk)
            hashes.append(h.hexdigest())
        return snaps, image.size, tuple(hashes)


def qemu_check(qemu_img: str, path: Path) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([qemu_img, "check", "--output=json", str(path)],
                          capture_output=True, text=True, cwd=path.parent)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"stdout": proc.stdout, "stderr": proc.stderr}
    return proc.returncode, report


def record(path: Path, operation: Callable[[EditableImage], object]) -> list[Any]:
    with qcow2snap.open(path, "r+") as image:
        recorder = RecordingIO(image._file.fd)
        image._io = recorder
        operation(image)
    return recorder.ops


def assert_crash_safe(path: Path, operation: Callable[[EditableImage], object],
                      qemu_img: str, tmp_path: Path) -> int:
    before_bytes = path.read_bytes()
    before = state_of(path)
    ops = record(path, operation)
    after = state_of(path)
    assert before != after, "the operation changed nothing observable"
    code, report = qemu_check(qemu_img, path)
    assert code == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert any(op.kind == "fsync" for op in ops)
    crashed = tmp_path / path.name
    # companions (backing files) sit beside the original
    for companion in path.parent.iterdir():
        if companion != path and not (tmp_path / companion.name).exists():
            (tmp_path / companion.name).symlink_to(companion)
    count = 0
    for label, data in crash_images(before_bytes, ops):
        write_image(crashed, data)
        code, report = qemu_check(qemu_img, crashed)
        assert code == 0 and not report.get("leaks") and not report.get("corruptions"), (
            label, report)
        state = state_of(crashed)
        assert state in (before, after), f"{label}: neither the old nor the new state"
        count += 1
    return count


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
    assert assert_crash_safe(path, OPERATIONS[operation], qemu_img, scratch) > 3


@pytest.mark.skip(reason="crash replay of an 8 MiB image keeps every variant in memory "
                         "(reached 10-16 GB); needs a streaming crashsim before it can run in CI")
def test_refcount_table_growth_is_crash_safe(qemu_img: str, qemu_io: str,
                                             tmp_path: Path) -> None:
    """512-byte clusters: one refcount block covers 128 KiB and a one-cluster
    refcount table 8 MiB of file.  Fill the image up to that edge, so that a
    snapshot needs new refcount blocks *and* a bigger refcount table."""
    path = tmp_path / "edge.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "16M")
    run(qemu_io, "-c", "write -P 0x5a 0 7400k", str(path))
    with qcow2snap.open(path) as image:
        table_clusters = image.header.refcount_table_clusters
        assert image.file_size > 7 << 20
    scratch = tmp_path / "crash"
    scratch.mkdir()

    def two_snapshots(im: EditableImage) -> None:
        im.create_snapshot("edge")

    count = assert_crash_safe(path, two_snapshots, qemu_img, scratch)
    assert count > 3
    with qcow2snap.open(path) as image:
        assert image.header.refcount_table_clusters > table_clusters
