"""``diff``: the difference between two layers of an image, against QEMU.

The oracle: both layers extracted with ``qemu-img convert -l ... -O raw``
and compared byte by byte here.  Every differing sector must lie inside a
reported range (the tail only one side has is reported whole); with
``--content`` every reported cluster within the common size must really
differ.  The image must be unchanged after a diff.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import FIXTURE_ENTRIES, fixture_path, run, sha256_file
from helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import CorruptImageError
from qcow2snap import format as fmt
from qcow2snap.model import Snapshot
from qcow2snap.ops.diff import DiffResult, diff_layers

pytestmark = pytest.mark.qemu

SECTOR = 512

#: fixtures with snapshots whose data qemu-img can extract without a secret
WITH_SNAPSHOTS = [f["name"] for f in FIXTURE_ENTRIES
                  if f.get("snapshots") and not f.get("secret")]


def _extract(qemu_img: str, image: Path, snapshot_id: str | None, out: Path) -> bytes:
    """The layer's disk at its own size: ``qemu-img convert -l snapshot.id=ID
    -O raw`` where the snapshot has the image's size (convert -l pads or cuts
    to the current size), else ``convert`` of a reverted copy."""
    with qcow2snap.open(image) as img:
        resized = (snapshot_id is not None
                   and img.layer(_ref(img, snapshot_id)).size != img.size)
    if resized:
        copy_dir = out.parent / "revert"
        copy_dir.mkdir()
        for p in image.parent.iterdir():
            if p.is_file() and p.suffix in (".qcow2", ".raw") and p != out:
                shutil.copyfile(p, copy_dir / p.name)
        copy = copy_dir / image.name
        run(qemu_img, "snapshot", "-a", str(snapshot_id), str(copy))
        run(qemu_img, "convert", "-O", "raw", copy.name, str(out), cwd=copy_dir)
        shutil.rmtree(copy_dir)
    else:
        args = [qemu_img, "convert"]
        if snapshot_id is not None:
            args += ["-l", f"snapshot.id={snapshot_id}"]
        run(*args, "-O", "raw", image.name, str(out), cwd=image.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def _covered(result: DiffResult, start: int, end: int) -> bool:
    """Is ``[start, end)`` inside the union of the reported ranges?"""
    starts = [r.guest_offset for r in result.ranges]
    pos = start
    while pos < end:
        i = bisect_right(starts, pos) - 1
        if i < 0 or result.ranges[i].guest_end <= pos:
            return False
        pos = result.ranges[i].guest_end
    return True


def _differing_sectors(raw_a: bytes, raw_b: bytes) -> list[int]:
    """Offsets of the sectors of the common size whose bytes differ."""
    common = min(len(raw_a), len(raw_b))
    out = []
    view_a, view_b = memoryview(raw_a), memoryview(raw_b)
    chunk = 1 << 20
    for base in range(0, common, chunk):
        end = min(base + chunk, common)
        if view_a[base:end] == view_b[base:end]:
            continue
        for pos in range(base, end, SECTOR):
            if raw_a[pos:pos + SECTOR] != raw_b[pos:pos + SECTOR]:
                out.append(pos)
    return out


def check_against_raw(result: DiffResult, raw_a: bytes, raw_b: bytes,
                      cluster_size: int) -> None:
    assert (result.a.size, result.b.size) == (len(raw_a), len(raw_b))
    common = min(len(raw_a), len(raw_b))
    for sector in _differing_sectors(raw_a, raw_b):
        assert _covered(result, sector, sector + SECTOR), f"missed difference at {sector:#x}"
    # a tail only one side has is reported whole
    assert _covered(result, common, max(len(raw_a), len(raw_b)))
    # ranges are sorted, disjoint, non-empty
    for prev, cur in zip(result.ranges, result.ranges[1:], strict=False):
        assert prev.guest_end <= cur.guest_offset
    assert all(r.length > 0 for r in result.ranges)
    assert result.total_bytes == sum(r.length for r in result.ranges)
    if result.content:
        for r in result.ranges:
            pos = r.guest_offset
            while pos < min(r.guest_end, common):
                end = min(r.guest_end, common, (pos // cluster_size + 1) * cluster_size)
                assert raw_a[pos:end] != raw_b[pos:end], \
                    f"--content reported equal bytes at {pos:#x}"
                pos = end


def _ref(image: qcow2snap.Qcow2Image, snapshot_id: str | None) -> Snapshot | None:
    return None if snapshot_id is None else image.find_snapshot(snapshot_id, by="id")


def _pairs(snapshot_ids: Sequence[str]) -> list[tuple[str | None, str | None]]:
    """Layer pairs to diff: first/last snapshot, each against the active
    layer, and the active layer against the first snapshot."""
    first, last = snapshot_ids[0], snapshot_ids[-1]
    pairs: list[tuple[str | None, str | None]] = [(first, None), (None, first)]
    if last != first:
        pairs += [(first, last), (last, None)]
    return pairs


@pytest.mark.parametrize("name", WITH_SNAPSHOTS)
def test_diff_covers_every_differing_byte(name: str, fixture_dir: Path, qemu_img: str,
                                          tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, name)
    before = sha256_file(path)
    with qcow2snap.open(path) as image:
        ids = [s.id for s in image.snapshots]
        raws = {ref: _extract(qemu_img, path, ref, tmp_path / "layer.raw")
                for ref in {ref for pair in _pairs(ids) for ref in pair}}
        for a, b in _pairs(ids):
            for content in (False, True):
                result = diff_layers(image, _ref(image, a), _ref(image, b), content=content)
                assert result.complete
                check_against_raw(result, raws[a], raws[b], image.cluster_size)
        same = diff_layers(image, _ref(image, ids[0]), _ref(image, ids[0]), content=True)
        assert same.ranges == ()
    assert sha256_file(path) == before


def test_metadata_diff_reports_a_rewrite_content_drops_it(qemu_img: str, qemu_io: str,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "rw.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), "8M")
    run(qemu_io, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 64k", str(path))
    run(qemu_img, "snapshot", "-c", "s1", str(path))
    # the same bytes again, zeroes where there were none, new bytes
    run(qemu_io, "-c", "write -P 0x11 0 128k", "-c", "write -z 4M 64k",
        "-c", "write -P 0x33 2M 64k", str(path))
    with qcow2snap.open(path) as image:
        meta = diff_layers(image, "s1", None)
        content = diff_layers(image, "s1", None, content=True)
    assert [(r.guest_offset, r.length) for r in meta.ranges] == [
        (0, 128 << 10), (2 << 20, 64 << 10), (4 << 20, 64 << 10)]
    assert [r.a.kind for r in meta.ranges] == ["data", "data", "unallocated"]
    assert [r.b.kind for r in meta.ranges] == ["data", "data", "zero"]
    assert [(r.guest_offset, r.length) for r in content.ranges] == [(2 << 20, 64 << 10)]
    assert content.bytes_read == meta.total_bytes


def _patch_l2_entry(path: Path, l2_index: int, value: int) -> None:
    with qcow2snap.open(path) as image:
        l1_offset = image.header.l1_table_offset
        l2_offset = image.l1_entries(image.layer(None))[0] & fmt.L1E_OFFSET_MASK
    assert l1_offset and l2_offset
    with open(path, "r+b") as f:
        f.seek(l2_offset + 8 * l2_index)
        f.write(struct.pack(">Q", value))


def test_damaged_l2_is_reported_or_strict_stops(qemu_img: str, qemu_io: str,
                                                tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), "8M")
    run(qemu_io, "-c", "write -P 0x11 0 256k", str(path))
    run(qemu_img, "snapshot", "-c", "s1", str(path))
    run(qemu_io, "-c", "write -P 0x22 0 64k", "-c", "write -P 0x22 1M 64k", str(path))
    # active entry 2 (guest 128k): an unaligned host offset
    _patch_l2_entry(path, 2, fmt.QCOW_OFLAG_COPIED | 0x50200)
    with qcow2snap.open(path) as image:
        result = diff_layers(image, "s1", None)
        assert not result.complete
        assert [(d.side, d.guest_offset, d.length) for d in result.damaged] == [
            ("b", 128 << 10, 64 << 10)]
        assert "unaligned" in result.damaged[0].message
        damaged = [r for r in result.ranges if r.b.kind == "damaged"]
        assert [(r.guest_offset, r.length) for r in damaged] == [(128 << 10, 64 << 10)]
        # the rest is still diffed
        assert _covered(result, 0, 64 << 10) and _covered(result, 1 << 20, (1 << 20) + 65536)
        with pytest.raises(CorruptImageError, match="unaligned"):
            diff_layers(image, "s1", None, strict=True)
    text = invoke("diff", "s1", "-", path)
    assert text.exit_code == 0, text.stderr
    assert "damaged" in text.stdout and "incomplete" in text.stdout
    strict = invoke("diff", "--strict", "s1", "-", path)
    assert strict.exit_code == CorruptImageError.exit_code
    assert len(strict.stderr.splitlines()) == 1 and strict.stdout == ""


def test_cli_json_and_text(fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, "resized-grow")
    result = invoke("diff", "--json", "--by-name", "at-32M", "at-80M", path)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["a"]["name"] == "at-32M" and data["b"]["disk-size"] == 80 << 20
    assert data["range-count"] == len(data["ranges"])
    assert data["total-bytes"] == sum(r["length-bytes"] for r in data["ranges"])
    last = data["ranges"][-1]
    assert last["a"]["kind"] == "absent"
    assert last["start-offset"] + last["length-bytes"] == 80 << 20
    text = invoke("diff", "1", "-", path)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0].startswith("A: snapshot 1 (at-32M)")
    assert "ranges differ" in text.stdout
    missing = invoke("diff", "nope", "-", path)
    assert missing.exit_code != 0 and len(missing.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------
# property: random writes and snapshots never give a diff that misses a byte
# ---------------------------------------------------------------------------

_SIZE = 4 << 20
_CLUSTER = 64 << 10

_write = st.tuples(st.sampled_from(["write", "zero"]),
                   st.integers(0, _SIZE // 4096 - 1).map(lambda n: n * 4096),
                   st.sampled_from([4096, 64 << 10, 192 << 10]),
                   st.sampled_from([0x00, 0x5A, 0xA5]))
_step = st.one_of(_write, st.just(("snapshot", 0, 0, 0)), st.just(("create", 0, 0, 0)))


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, min_size=2, max_size=8),
       extended=st.booleans())
def test_random_histories_never_miss_a_byte(steps: list[tuple[str, int, int, int]],
                                            extended: bool, qemu_img: str, qemu_io: str,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    path = tmp / "p.qcow2"
    options = "extended_l2=on,cluster_size=64k" if extended else "cluster_size=64k"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", options, str(path), str(_SIZE))
    run(qemu_io, "-c", "write -P 0x77 0 1M", str(path))
    run(qemu_img, "snapshot", "-c", "s0", str(path))
    for n, (op, offset, length, pattern) in enumerate(steps):
        length = min(length, _SIZE - offset)
        if op == "write":
            run(qemu_io, "-c", f"write -P {pattern:#x} {offset} {length}", str(path))
        elif op == "zero":
            run(qemu_io, "-c", f"write -z {offset} {length}", str(path))
        elif op == "snapshot":
            run(qemu_img, "snapshot", "-c", f"q{n}", str(path))
        else:
            assert invoke("create", f"c{n}", path).exit_code == 0
    before = sha256_file(path)
    with qcow2snap.open(path) as image:
        ids = [s.id for s in image.snapshots]
        refs: list[str | None] = [ids[0], ids[-1], None]
        raws = {ref: _extract(qemu_img, path, ref, tmp / "layer.raw") for ref in set(refs)}
        for a, b in [(ids[0], None), (ids[0], ids[-1]), (ids[-1], None)]:
            for content in (False, True):
                check_against_raw(diff_layers(image, _ref(image, a), _ref(image, b),
                                              content=content),
                                  raws[a], raws[b], _CLUSTER)
    assert sha256_file(path) == before
    for leftover in tmp.iterdir():
        os.unlink(leftover)

