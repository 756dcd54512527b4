"""``usage``: space accounting held to what QEMU really frees.

For every snapshot the exclusive figure is checked against ``qemu-img
snapshot -d`` on a copy: the clusters with a non-zero refcount are counted
before and after (by a small refcount reader written here, independent of
qcow2snap's), and the drop minus the snapshot table's own change must equal
the reported exclusive clusters.  Totals must partition the file, leaks must
agree with ``qemu-img check``, and the image must not change.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, sha256_file
from helpers import invoke, qemu_img_check

import qcow2snap
from qcow2snap.ops.usage import UsageReport, usage

pytestmark = pytest.mark.qemu

WITH_SNAPSHOTS = [f["name"] for f in FIXTURE_ENTRIES
                  if f.get("snapshots") and "many-snapshots" not in f.get("tags", [])
                  and not f.get("secret")]


def nonzero_refcounts(path: Path) -> int:
    """Clusters with a non-zero stored refcount, read straight from the
    header, refcount table and blocks (QEMU's layout, docs/interop/qcow2.txt)."""
    with open(path, "rb") as f:
        header = f.read(104)
        version = struct.unpack_from(">I", header, 4)[0]
        cluster_bits = struct.unpack_from(">I", header, 20)[0]
        table_offset = struct.unpack_from(">Q", header, 48)[0]
        table_clusters = struct.unpack_from(">I", header, 56)[0]
        order = struct.unpack_from(">I", header, 96)[0] if version >= 3 else 4
        cs = 1 << cluster_bits
        f.seek(table_offset)
        table = f.read(table_clusters * cs)
        count = 0
        width = 1 << order
        for (entry,) in struct.iter_unpack(">Q", table):
            block_offset = entry & 0x00FFFFFFFFFFFE00
            if not block_offset:
                continue
            f.seek(block_offset)
            block = f.read(cs)
            if width >= 8:
                step = width // 8
                count += sum(1 for i in range(0, cs, step)
                             if any(block[i:i + step]))
            else:
                mask = (1 << width) - 1
                count += sum(1 for byte in block for shift in range(0, 8, width)
                             if (byte >> shift) & mask)
        return count


def qemu_delete_frees(qemu_img: str, image: Path, name: str, work: Path) -> int:
    """Clusters whose refcount ``qemu-img snapshot -d NAME`` drops to zero on
    a copy (qemu-img deletes the first snapshot of that name)."""
    copy = work / "deleted.qcow2"
    shutil.copyfile(image, copy)
    before = nonzero_refcounts(copy)
    subprocess.run([qemu_img, "snapshot", "-d", name, str(copy)], check=True,
                   capture_output=True, text=True)
    after = nonzero_refcounts(copy)
    copy.unlink()
    return before - after


def assert_exact(qemu_img: str, image: Path, work: Path) -> UsageReport:
    digest = sha256_file(image)
    report = usage(image)
    assert sha256_file(image) == digest, "usage changed the image"
    totals = report.image
    # the file's clusters partition into referenced, free and leaked ones
    assert (totals.referenced_clusters + totals.free_clusters + totals.leaked_clusters
            == totals.file_clusters)
    assert totals.file_clusters == -(-image.stat().st_size // report.cluster_size)
    kinds = (totals.guest_data_clusters + totals.vm_state_clusters + totals.l1_clusters
             + totals.l2_clusters + totals.refcount_table_clusters
             + totals.refcount_block_clusters + totals.snapshot_table_clusters
             + totals.header_clusters + totals.other_clusters)
    assert kinds == totals.referenced_clusters
    # QEMU counts clusters with a refcount above their references as leaks
    check = qemu_img_check(qemu_img, image)
    assert totals.leaked_clusters + totals.over_counted_clusters == \
        check.report.get("leaks", 0)
    if not totals.under_counted_clusters:
        assert nonzero_refcounts(image) == totals.referenced_clusters + totals.leaked_clusters
    names: set[str] = set()
    for layer in report.snapshots:
        assert layer.snapshot is not None
        assert layer.exclusive_clusters == (
            layer.exclusive_data_clusters + layer.exclusive_vm_state_clusters
            + layer.exclusive_l2_clusters + layer.exclusive_l1_clusters)
        assert layer.referenced_clusters == layer.exclusive_clusters + layer.shared_clusters
        if layer.snapshot.name in names:
            continue   # qemu-img -d NAME reaches only the first of a name
        names.add(layer.snapshot.name)
        freed = qemu_delete_frees(qemu_img, image, layer.snapshot.name, work)
        table_change = layer.table_freed_clusters - layer.table_allocated_clusters
        assert freed - table_change == layer.exclusive_clusters, (
            f"snapshot {layer.snapshot.id}: qemu-img frees {freed} "
            f"(table change {table_change}), usage says {layer.exclusive_clusters}")
    return report


@pytest.mark.parametrize("name", WITH_SNAPSHOTS)
def test_fixture_exclusive_matches_qemu_delete(name: str, fixture_copy: object,
                                               qemu_img: str, tmp_path: Path) -> None:
    image = fixture_copy(name)  # type: ignore[operator]
    report = assert_exact(qemu_img, image, tmp_path)
    assert len(report.snapshots) == len(FIXTURES_BY_NAME[name]["snapshots"])
    if "vmstate" in FIXTURES_BY_NAME[name].get("tags", []):
        assert report.image.vm_state_clusters > 0
        assert any(s.exclusive_vm_state_clusters for s in report.snapshots)


def _qemu_io(qemu_io: str, image: Path, *commands: str) -> None:
    args = [qemu_io, "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("cluster_size", ["65536", "512", "2097152"])
def test_made_by_qemu_sharing_and_rewriting(cluster_size: str, qemu_img: str, qemu_io: str,
                                            tmp_path: Path) -> None:
    image = tmp_path / "made.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
                    str(image), "16M"], check=True, capture_output=True)
    _qemu_io(qemu_io, image, "write -P 1 0 1M", "write -P 2 8M 512k")
    subprocess.run([qemu_img, "snapshot", "-c", "a", str(image)], check=True)
    subprocess.run([qemu_img, "snapshot", "-c", "a-again", str(image)], check=True)
    compressed = max(int(cluster_size), 65536)   # whole clusters
    _qemu_io(qemu_io, image, "write -P 3 0 256k", f"write -c -P 4 12M {compressed}")
    subprocess.run([qemu_img, "snapshot", "-c", "b", str(image)], check=True)
    _qemu_io(qemu_io, image, "write -P 5 128k 512k", "write -z 8M 64k",
             "discard 12M 128k", "write -P 6 15M 1M")
    subprocess.run([qemu_img, "snapshot", "-c", "c", str(image)], check=True)
    _qemu_io(qemu_io, image, "write -P 7 0 64k")
    report = assert_exact(qemu_img, image, tmp_path)
    # "a" and "a-again" share everything: neither frees a data cluster alone
    assert report.snapshots[0].exclusive_data_clusters == 0
    assert report.snapshots[1].exclusive_data_clusters == 0


def test_made_by_qcow2snap_create(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    image = tmp_path / "ours.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", str(image), "8M"], check=True,
                   capture_output=True)
    for round_ in range(3):
        _qemu_io(qemu_io, image, f"write -P {round_ + 1} {round_ * 64}k 192k")
        with qcow2snap.open(image, "r+") as editable:
            editable.create_snapshot(f"s{round_}")
    report = assert_exact(qemu_img, image, tmp_path)
    # s0 alone keeps its clusters 1 and 2 (64k-192k, rewritten in round 1)
    assert report.snapshots[0].exclusive_data_clusters == 2


def test_leaks_counted_like_qemu(qemu_img: str, fixture_copy: object, tmp_path: Path) -> None:
    """A leaked cluster (refcount 1, nothing references it) made by patching
    the refcount block of a copy: usage and qemu-img check agree."""
    image = fixture_copy("v3-basic")  # type: ignore[operator]
    before = usage(image)
    with qcow2snap.open(image) as opened:
        from qcow2snap.refcount import RefcountReader
        reader = RefcountReader(opened)
        block = reader.block_offset(0)
    # the first cluster past the file's end inside block 0: refcount 1 -> leak
    leaked = before.image.file_clusters
    with open(image, "r+b") as f:
        f.seek(block + 2 * leaked)
        f.write(struct.pack(">H", 1))
        f.seek(0, 2)
        f.write(bytes(before.cluster_size))
    after = assert_exact(qemu_img, image, tmp_path)
    assert after.image.leaked_clusters == 1
    assert after.image.reclaimable_clusters == after.image.free_clusters + 1


def test_cli_json_several_images(fixture_copy: object) -> None:
    a = fixture_copy("v2")  # type: ignore[operator]
    b = fixture_copy("savevm")  # type: ignore[operator]
    result = invoke("usage", a, b, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["filename"] for d in data] == [str(a), str(b)]
    for d, path in zip(data, (a, b), strict=True):
        ours = usage(path)
        assert d["image"]["leaked-clusters"] == ours.image.leaked_clusters
        assert d["image"]["reclaimable-bytes"] == \
            ours.image.reclaimable_clusters * ours.cluster_size
        assert [s["exclusive-clusters"] for s in d["snapshots"]] == \
            [s.exclusive_clusters for s in ours.snapshots]
        assert d["active"]["referenced-clusters"] == ours.active.referenced_clusters


def test_cli_text(fixture_copy: object) -> None:
    image = fixture_copy("v3-basic")  # type: ignore[operator]
    result = invoke("usage", image)
    assert result.exit_code == 0, result.output
    assert "exclusive" in result.output
    assert "snapshot table" in result.output
    assert "reclaimable" in result.output


def test_damaged_image_one_error(fixture_copy: object) -> None:
    image = fixture_copy("v3-basic")  # type: ignore[operator]
    with open(image, "r+b") as f:      # refcount table offset not cluster aligned
        f.seek(48)
        f.write(struct.pack(">Q", 0x12345))
    result = invoke("usage", image)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("qcow2snap: error:")
