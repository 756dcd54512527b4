"""Cross-checks against the live QEMU tools on every fixture.

These run when qemu-img is installed and are mandatory under CI
(QCOW2SNAP_REQUIRE_QEMU=1).  Each compares qcow2snap with what qemu-img
says *now* on the unpacked fixture, not only with the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, fixture_path, run, sha256_file
from helpers import assert_qemu_clean

import qcow2snap
from qcow2snap import describe
from qcow2snap.ops import inspection
from qcow2snap.ops.extract import extract

pytestmark = pytest.mark.qemu

ALL = [f["name"] for f in FIXTURE_ENTRIES]
READABLE = [f["name"] for f in FIXTURE_ENTRIES if not f.get("secret")]

QEMU_TOP_KEYS = ("virtual-size", "cluster-size", "format", "dirty-flag", "encrypted",
                 "backing-filename", "backing-filename-format")
QEMU_SNAPSHOT_KEYS = ("id", "name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec",
                      "vm-state-size", "icount")
QEMU_FORMAT_KEYS = ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                    "extended-l2", "data-file", "data-file-raw")


def _qemu_info(qemu_img: str, path: Path, *extra: str) -> dict[str, Any]:
    out = run(qemu_img, "info", "--output=json", *extra, path.name, cwd=path.parent).stdout
    return json.loads(out)


def _luks_args(name: str) -> list[str]:
    entry = FIXTURES_BY_NAME[name]
    if not entry.get("secret"):   # LUKS or AES
        return []
    return ["--object", f"secret,id=sec0,data={entry.get('secret', 'qcow2snap')}"]


def _project(obj: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: obj[k] for k in keys if k in obj}


@pytest.mark.parametrize("name", ALL)
def test_info_json_matches_qemu_img(name: str, fixture_dir: Path, qemu_img: str) -> None:
    path = fixture_path(fixture_dir, name)
    expected = _qemu_info(qemu_img, path)
    with qcow2snap.open(path) as image:
        ours = describe.image_info_json(inspection.image_facts(image, path.name))
    assert _project(ours, QEMU_TOP_KEYS) == _project(expected, QEMU_TOP_KEYS)
    assert (_project(ours["format-specific"]["data"], QEMU_FORMAT_KEYS)
            == _project(expected["format-specific"]["data"], QEMU_FORMAT_KEYS))
    assert ours["format-specific"]["type"] == expected["format-specific"]["type"]
    assert ("snapshots" in ours) == ("snapshots" in expected)
    ours_sn = [_project(s, QEMU_SNAPSHOT_KEYS) for s in ours.get("snapshots", [])]
    theirs_sn = [_project(s, QEMU_SNAPSHOT_KEYS) for s in expected.get("snapshots", [])]
    assert ours_sn == theirs_sn
    if "full-backing-filename" in expected:
        assert ours["full-backing-filename"] == expected["full-backing-filename"]


@pytest.mark.parametrize("name", ALL)
def test_info_json_matches_manifest(name: str, fixture_dir: Path) -> None:
    """The manifest's info was recorded by qemu-img when the fixture was made."""
    entry = FIXTURES_BY_NAME[name]
    with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
        ours = describe.image_info_json(inspection.image_facts(image))
        disk_sizes = [s.disk_size for s in image.snapshots]
    expected = entry["info"]
    assert _project(ours, QEMU_TOP_KEYS) == _project(expected, QEMU_TOP_KEYS)
    assert ([_project(s, QEMU_SNAPSHOT_KEYS) for s in ours.get("snapshots", [])]
            == [_project(s, QEMU_SNAPSHOT_KEYS) for s in expected.get("snapshots", [])])
    assert disk_sizes == [s["disk_size"] for s in entry["snapshots"]]


def _reference_sha(qemu_img: str, path: Path, snapshot: dict[str, Any], current_size: int,
                   scratch: Path) -> str:
    """sha256 of what QEMU considers the snapshot's content at its own size."""
    out = scratch / "ref.raw"
    if snapshot["disk_size"] == current_size:
        run(qemu_img, "convert", "-l", f"snapshot.id={snapshot['id']}", "-O", "raw",
            str(path), str(out))
    else:
        # convert -l pads/cuts to the current size: revert a copy instead
        copy_dir = scratch / "revert"
        copy_dir.mkdir(exist_ok=True)
        for p in path.parent.iterdir():
            shutil.copy(p, copy_dir / p.name)
        copy = copy_dir / path.name
        os.chmod(copy, 0o644)
        run(qemu_img, "snapshot", "-a", snapshot["id"], str(copy))
        run(qemu_img, "convert", "-O", "raw", str(copy), str(out))
        shutil.rmtree(copy_dir)
    digest = sha256_file(out)
    out.unlink()
    return digest


def _sha_of_reader(reader: qcow2snap.DiskReader) -> str:
    h = hashlib.sha256()
    while chunk := reader.read(4 << 20):
        h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("name", READABLE)
def test_snapshot_content_matches_qemu_img(name: str, fixture_dir: Path, qemu_img: str,
                                           tmp_path: Path) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = fixture_path(fixture_dir, name)
    snapshots = entry["snapshots"]
    if len(snapshots) > 12:  # many-snapshots: a spread sample keeps the run short
        snapshots = [*snapshots[::max(1, len(snapshots) // 12)], snapshots[-1]]
    with qcow2snap.open(path) as image:
        active_ref = tmp_path / "active.raw"
        run(qemu_img, "convert", "-O", "raw", str(path), str(active_ref), cwd=path.parent)
        assert _sha_of_reader(image.open_disk()) == sha256_file(active_ref)
        active_ref.unlink()
        for sn in snapshots:
            expected = _reference_sha(qemu_img, path, sn, image.size, tmp_path)
            assert expected == sn["sha256"], "fixture manifest disagrees with qemu-img"
            reader = image.open_disk(image.find_snapshot(sn["id"], by="id"))
            assert reader.size == sn["disk_size"]
            assert _sha_of_reader(reader) == expected, f"snapshot {sn['id']}"


@pytest.mark.parametrize("name", READABLE)
def test_extract_raw_equals_qemu_img_and_is_sparse(name: str, fixture_dir: Path, qemu_img: str,
                                                  tmp_path: Path) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = fixture_path(fixture_dir, name)
    targets: list[dict[str, Any] | None] = [None, *entry["snapshots"][:4]]
    with qcow2snap.open(path) as image:
        for sn in targets:
            out = tmp_path / "ours.raw"
            ref = tmp_path / "ref.raw"
            if sn is None:
                extract(image, None, out)
                # QEMU resolves a relative data-file name against the cwd
                run(qemu_img, "convert", "-O", "raw", str(path), str(ref), cwd=path.parent)
                assert out.stat().st_size == image.size
            else:
                extract(image, image.find_snapshot(sn["id"], by="id"), out)
                assert out.stat().st_size == sn["disk_size"]
                if sn["disk_size"] == image.size:
                    run(qemu_img, "convert", "-l", f"snapshot.id={sn['id']}", "-O", "raw",
                        str(path), str(ref))
            if ref.exists():
                assert sha256_file(out) == sha256_file(ref)
                # sparse: no more blocks allocated than qemu-img's own output (+1 cluster slack)
                assert out.stat().st_blocks * 512 <= ref.stat().st_blocks * 512 + 65536
                ref.unlink()
            else:
                assert sha256_file(out) == sn["sha256"]
            out.unlink()


@pytest.mark.parametrize("name", ["v3-basic", "compressed-zlib", "compressed-zstd",
                                  "extended-l2", "backing-chain", "resized-shrink",
                                  "clusters-512", "clusters-2m", "savevm"])
@pytest.mark.parametrize("compress", [None, "zlib", "zstd"])
def test_extract_qcow2_is_clean_and_equal(name: str, compress: str | None, fixture_dir: Path,
                                          qemu_img: str, tmp_path: Path) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = fixture_path(fixture_dir, name)
    sn = entry["snapshots"][0]
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(path) as image:
        snapshot = image.find_snapshot(sn["id"], by="id")
        extract(image, snapshot, out, format="qcow2", compress=compress)  # type: ignore[arg-type]
        raw = tmp_path / "ours.raw"
        extract(image, snapshot, raw)
    assert_qemu_clean(qemu_img, out)
    info = _qemu_info(qemu_img, out)
    assert info["virtual-size"] == sn["disk_size"]
    assert "backing-filename" not in info and "snapshots" not in info
    if compress:
        assert info["format-specific"]["data"]["compression-type"] == compress
    cmp = run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert sha256_file(raw) == sn["sha256"]


@pytest.mark.parametrize("name", [f["name"] for f in FIXTURE_ENTRIES
                                  if "vmstate" in f.get("tags", [])])
def test_vm_state_stream(name: str, fixture_dir: Path, tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, name)
    with qcow2snap.open(path) as image:
        for sn in image.snapshots:
            if not sn.has_vm_state:
                continue
            reader = image.open_vm_state(sn)
            data = reader.read()
            assert len(data) == sn.vm_state_size
            assert data[:8] == b"QEVM\x00\x00\x00\x03"
            # the VM-description trailer ends the stream: 0x00 EOF, 0x06, u32 len, JSON
            tail_json = data.rfind(b'{"page_size"')
            assert tail_json > 0
            assert data[tail_json - 5] == 0x06
            assert int.from_bytes(data[tail_json - 4:tail_json], "big") == len(data) - tail_json
