"""``qcow2snap map`` against ``qemu-img map`` on every fixture kind.

Active layer: ``qemu-img map --output=json`` of the image.  A snapshot:
``qemu-img snapshot -a`` on a copy, then ``qemu-img map`` (reverting
shares the snapshot's clusters, so host offsets are the same).  Where QEMU
cannot revert (2-bit refcounts overflow on the shared clusters), the copy's
refcounts are widened first with ``qemu-img amend -o refcount_bits=16``,
which moves no data or L2 cluster.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, run, sha256_file
from helpers import invoke

import qcow2snap
from qcow2snap import describe
from qcow2snap.errors import CorruptImageError
from qcow2snap.format import c_hex
from qcow2snap.ops.map import map_layer

pytestmark = pytest.mark.qemu

ALL = [f["name"] for f in FIXTURE_ENTRIES]
SECRET = "qcow2snap"


def _snapshot_cases() -> list[tuple[str, str]]:
    cases = []
    for entry in FIXTURE_ENTRIES:
        ids = [s["id"] for s in entry.get("snapshots", [])]
        if len(ids) > 6:   # many-snapshots: the first, a middle and the last
            ids = [ids[0], ids[len(ids) // 2], ids[-1]]
        cases += [(entry["name"], sid) for sid in ids]
    return cases


def _is_luks(name: str) -> bool:
    return bool(FIXTURES_BY_NAME[name].get("secret"))   # LUKS or AES


def _qemu_map(qemu_img: str, path: Path, name: str, *, text: bool = False) -> Any:
    if _is_luks(name):
        args = ["--object", f"secret,id=sec0,data={SECRET}", "--image-opts",
                f"driver=qcow2,file.filename={path.name},encrypt.key-secret=sec0"]
    else:
        args = [path.name]
    out = run(qemu_img, "map", *([] if text else ["--output=json"]), *args,
              cwd=path.parent).stdout
    return out if text else json.loads(out)


def _ours(path: Path, snapshot: str | None) -> dict[str, Any]:
    with qcow2snap.open(path) as image:
        return describe.map_json(map_layer(image, snapshot, name=path.name))


@pytest.mark.parametrize("name", ALL)
def test_active_layer_matches_qemu_img_map(name: str, fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy(name)
    before = sha256_file(path)
    ours = _ours(path, None)
    assert ours["complete"]
    assert ours["map"] == _qemu_map(qemu_img, path, name)
    assert sha256_file(path) == before


@pytest.mark.parametrize(("name", "snapshot_id"), _snapshot_cases())
def test_snapshot_matches_qemu_img_map_after_revert(name: str, snapshot_id: str,
                                                    fixture_copy: Any, qemu_img: str,
                                                    tmp_path: Path) -> None:
    path = fixture_copy(name)
    before = sha256_file(path)
    result = invoke("map", "--by-id", snapshot_id, path, "--json")
    assert result.exit_code == 0, result.stderr
    ours = json.loads(result.stdout)
    assert sha256_file(path) == before            # mapping never writes
    assert ours["snapshot"]["id"] == snapshot_id
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot(snapshot_id, by="id")
        assert ours["virtual-size"] == sn.disk_size
        prov = ours["provenance"]
        assert prov["snapshot_entry_offset"] == sn.entry_offset
        assert (prov["l1_table_offset"], prov["l1_size"]) == (sn.l1_table_offset, sn.l1_size)
        l1 = image.read_l1(image.layer(sn))
        assert [t["l2_table_offset"] for t in prov["l2_tables"]] == [
            e & 0x00FFFFFFFFFFFE00 for e in l1[:image.size_to_l1(sn.disk_size)]
            if e & 0x00FFFFFFFFFFFE00]  # the VM state's L2 tables lie past the disk
    secret = (["--object", f"secret,id=sec0,data={SECRET}"] if _is_luks(name) else [])
    if _is_luks(name):
        target = [f"driver=qcow2,file.filename={path.name},encrypt.key-secret=sec0"]
        revert = run(qemu_img, "snapshot", *secret, "--image-opts", "-a", snapshot_id,
                     *target, cwd=path.parent, check=False)
    else:
        revert = run(qemu_img, "snapshot", "-a", snapshot_id, path.name, cwd=path.parent,
                     check=False)
    if revert.returncode:
        run(qemu_img, "amend", "-o", "refcount_bits=16", path.name, cwd=path.parent)
        run(qemu_img, "snapshot", "-a", snapshot_id, path.name, cwd=path.parent)
    assert ours["map"] == _qemu_map(qemu_img, path, name)


TEXT_CASES = [n for n in ALL if not any(t in FIXTURES_BY_NAME[n].get("tags", [])
                                        for t in ("zlib", "zstd", "luks", "aes"))]


@pytest.mark.parametrize("name", TEXT_CASES)
def test_text_table_matches_qemu_img_map(name: str, fixture_copy: Any, qemu_img: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixture_copy(name)
    theirs = _qemu_map(qemu_img, path, name, text=True).splitlines()
    monkeypatch.chdir(path.parent)    # file names as qemu-img prints them
    result = invoke("map", "-", path.name)
    assert result.exit_code == 0, result.stderr
    ours = result.stdout.splitlines()
    assert ours[:len(theirs)] == theirs
    assert ours[len(theirs)] == ""
    assert "Provenance of the active layer:" in result.stdout


def _break_first_l2_pointer(path: Path, snapshot_id: str) -> tuple[int, int]:
    """Point the snapshot's first mapped L1 entry 512 bytes off its L2 table
    (unaligned: QEMU's "L2 table offset ... unaligned"); returns (L1 index,
    the bad offset)."""
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot(snapshot_id, by="id")
        l1 = image.read_l1(image.layer(sn))
        index = next(i for i, e in enumerate(l1) if e & 0x00FFFFFFFFFFFE00)
        entry_offset = sn.l1_table_offset + 8 * index
        bad = l1[index] + 0x200
    with open(path, "r+b") as f:
        f.seek(entry_offset)
        f.write(struct.pack(">Q", bad))
    return index, bad & 0x00FFFFFFFFFFFE00


def test_damaged_l2_pointer_is_a_damaged_range(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    good = _ours(path, "2")
    index, bad = _break_first_l2_pointer(path, "2")
    before = sha256_file(path)
    result = invoke("map", "--by-id", "2", path, "--json")
    assert result.exit_code == 3, result.stderr
    ours = json.loads(result.stdout)
    assert not ours["complete"] and ours["damaged_ranges"] == 1
    with qcow2snap.open(path) as image:
        span = 1 << (image.cluster_bits + image.l2_bits)
    damaged = [e for e in ours["map"] if e.get("damaged")]
    assert damaged == [{"start": index * span, "length": min(span, ours["virtual-size"]),
                        "depth": 0, "damaged": True,
                        "reason": f"L2 table offset {bad:#x} unaligned (L1 index: {c_hex(index)}) "
                                  f"in snapshot 2 (second)"}]
    # the rest is what it was
    assert [e for e in ours["map"] if not e.get("damaged")] == [
        e for e in good["map"] if e["start"] + e["length"] <= index * span
        or e["start"] >= (index + 1) * span]
    text = invoke("map", "--by-id", "2", path)
    assert text.exit_code == 3
    assert "DAMAGED" in text.stdout and "the map is incomplete" in text.stdout
    strict = invoke("map", "--by-id", "2", path, "--strict")
    assert strict.exit_code == CorruptImageError.exit_code
    assert strict.stdout == ""
    assert strict.stderr.count("\n") == 1
    assert f"L2 table offset {bad:#x} unaligned" in strict.stderr
    with qcow2snap.open(path) as image, pytest.raises(CorruptImageError):
        map_layer(image, "2", strict=True)
    assert sha256_file(path) == before


def test_damaged_l2_entry_is_a_damaged_cluster(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot("1", by="id")
        l2_offset = image.read_l1(image.layer(sn))[0] & 0x00FFFFFFFFFFFE00
        entry = image.read_l2(l2_offset)[0]
    with open(path, "r+b") as f:
        f.seek(l2_offset)
        f.write(struct.pack(">Q", entry + 0x200))    # unaligned host cluster
    with qcow2snap.open(path) as image:
        result = map_layer(image, "1")
        assert [(e.start, e.length) for e in result.damaged] == [(0, image.cluster_size)]
        assert "Cluster allocation offset" in (result.damaged[0].reason or "")
        assert result.entries[1].start == image.cluster_size
        with pytest.raises(CorruptImageError, match="unaligned"):
            map_layer(image, "1", strict=True)


def test_map_help() -> None:
    result = invoke("map", "--help")
    assert result.exit_code == 0
    assert "--strict" in result.stdout and "--json" in result.stdout

