"""``qcow2snap hash`` / :func:`qcow2snap.ops.hashing.hash_image` against
QEMU: every fixture kind, each snapshot's disk digest is that of what
``qemu-img convert -l`` writes (a revert then ``convert`` for a snapshot
whose disk size differs from the image's, where ``convert -l`` pads or cuts
to the current size), the active layer's that of ``qemu-img convert``, each
VM state's that of ``vmstate dump``'s output; every algorithm is hashlib's
on those bytes; the image is never written; damage is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, fixture_path, run
from helpers import invoke

import qcow2snap
from qcow2snap.errors import CorruptImageError
from qcow2snap.ops import hashing
from qcow2snap.ops.hashing import ALGORITHMS, hash_image
from qcow2snap.reader import ExtentKind

READABLE = [f["name"] for f in FIXTURE_ENTRIES if not f.get("secret")]
VMSTATE = [f["name"] for f in FIXTURE_ENTRIES if "vmstate" in f.get("tags", [])]


def _file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sample(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """many-snapshots: a spread sample keeps qemu-img's share of the run short."""
    if len(snapshots) <= 12:
        return snapshots
    return [*snapshots[::len(snapshots) // 10], snapshots[-1]]


def _qemu_raw(qemu_img: str, path: Path, entry: dict[str, Any], sn: dict[str, Any] | None,
              current_size: int, out: Path, scratch: Path) -> Path:
    """What QEMU gives as the raw disk of ``sn`` (None: the active layer)."""
    if sn is None:
        # cwd: QEMU resolves a relative data-file name against it
        run(qemu_img, "convert", "-O", "raw", str(path), str(out), cwd=path.parent)
    elif sn["disk_size"] == current_size:
        names = [s["name"] for s in entry["snapshots"]]
        ids = [s["id"] for s in entry["snapshots"]]
        unique = names.count(sn["name"]) == 1 and sn["name"] not in ids
        option = f"snapshot.name={sn['name']}" if unique else f"snapshot.id={sn['id']}"
        run(qemu_img, "convert", "-l", option, "-O", "raw", str(path), str(out))
    else:
        copy_dir = scratch / "revert"
        copy_dir.mkdir()
        for name in [entry["file"], *entry.get("companions", [])]:
            shutil.copy(path.parent / name[:-3], copy_dir / name[:-3])
        copy = copy_dir / path.name
        os.chmod(copy, 0o644)
        run(qemu_img, "snapshot", "-a", sn["id"], str(copy))
        run(qemu_img, "convert", "-O", "raw", str(copy), str(out))
        shutil.rmtree(copy_dir)
    return out


@pytest.mark.qemu
@pytest.mark.parametrize("name", READABLE)
def test_disk_digests_equal_qemu_img_convert(name: str, fixture_dir: Path, qemu_img: str,
                                             tmp_path: Path) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = fixture_path(fixture_dir, name)
    before = _file_digest(path)
    with qcow2snap.open(path) as image:
        report = hash_image(image)   # every snapshot, then the active layer
        size = image.size
    assert [d.snapshot.id if d.snapshot else None for d in report.layers] == [
        *(s["id"] for s in entry["snapshots"]), None]
    by_id = {d.snapshot.id if d.snapshot else None: d for d in report.layers}
    for sn in [*_sample(entry["snapshots"]), None]:
        out = _qemu_raw(qemu_img, path, entry, sn, size, tmp_path / "ref.raw", tmp_path)
        digest = by_id[None if sn is None else sn["id"]]
        assert digest.disk_size == out.stat().st_size
        assert digest.disk_digest == _file_digest(out), f"{name}: {sn and sn['id']}"
        if sn is not None:
            assert digest.disk_digest == sn["sha256"]
        out.unlink()
    assert _file_digest(path) == before


@pytest.mark.parametrize("name", VMSTATE)
def test_vm_state_digest_equals_vmstate_dump(name: str, fixture_dir: Path,
                                             tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, name)
    report = hash_image(path, algorithm="sha512")
    for layer in report.layers:
        sn = layer.snapshot
        if sn is None or not sn.has_vm_state:
            assert layer.vm_state_digest is None and layer.vm_state_size == 0
            continue
        out = tmp_path / f"vm-{sn.id}"
        result = invoke("vmstate", "dump", "--by-id", sn.id, path, "-o", out)
        assert result.exit_code == 0, result.stderr
        assert layer.vm_state_size == out.stat().st_size == sn.vm_state_size
        assert layer.vm_state_digest == _file_digest(out, "sha512")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", ["compressed-zlib", "compressed-zstd", "extended-l2",
                                  "backing-chain", "raw-backing", "savevm"])
def test_every_algorithm_is_hashlibs(name: str, algorithm: str, fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, name)
    with qcow2snap.open(path) as image:
        report = hash_image(image, algorithm=algorithm, include_image=True)
        for layer in report.layers:
            data = image.open_disk(layer.snapshot).read()
            assert layer.disk_digest == hashlib.new(algorithm, data).hexdigest()
            if layer.vm_state_digest is not None:
                assert layer.snapshot is not None
                vm = image.open_vm_state(layer.snapshot).read()
                assert layer.vm_state_digest == hashlib.new(algorithm, vm).hexdigest()
    assert report.algorithm == algorithm
    assert report.file_size == path.stat().st_size
    assert report.image_digest == _file_digest(path, algorithm)


def test_small_pieces_give_the_same_digests(fixture_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking and the read-ahead window do not change what is hashed."""
    path = fixture_path(fixture_dir, "backing-chain")
    expected = hash_image(path, include_image=True)
    monkeypatch.setattr(hashing, "READ_CHUNK_BYTES", 4096 + 512)
    monkeypatch.setattr(hashing, "_ZEROS", bytes(1000))
    monkeypatch.setattr(hashing, "WINDOW_BYTES", 10000)
    monkeypatch.setattr(hashing, "WINDOW_PIECES", 3)
    assert hash_image(path, include_image=True) == expected


def test_cli_text_and_json(fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, "savevm")
    result = invoke("hash", path, "2", "-", "--json", "--image", "-a", "md5")
    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    assert obj["algorithm"] == "md5" and obj["image"] == str(path)
    assert obj["file-size"] == path.stat().st_size
    assert obj["image-digest"] == _file_digest(path, "md5")
    first, active = obj["layers"]
    assert (first["active"], first["id"], first["name"]) == (False, "2", "run")
    assert first["vm-state-size"] == 239520 and len(first["vm-state-digest"]) == 32
    assert active["active"] is True and "id" not in active
    assert active["vm-state-digest"] is None
    text = invoke("hash", path, "2", "-", "--image", "-a", "md5")
    assert text.exit_code == 0
    for digest in (first["disk-digest"], first["vm-state-digest"], active["disk-digest"],
                   obj["image-digest"]):
        assert digest in text.stdout
    assert "Active layer" in text.stdout and "md5" in text.stdout


def test_cli_by_name_and_ambiguity(fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, "ambiguous")
    ambiguous = invoke("hash", path, "1")
    assert ambiguous.exit_code != 0 and "ambiguous" in ambiguous.stderr
    by_name = json.loads(invoke("hash", path, "--by-name", "1", "--json").stdout)
    assert [layer["id"] for layer in by_name["layers"]] == ["2"]


def test_encrypted_image_refused(fixture_dir: Path) -> None:
    """Without its passphrase (with it: tests/test_luks.py)."""
    with pytest.raises(qcow2snap.BadPassphraseError):
        hash_image(fixture_path(fixture_dir, "luks"))


def _damage_l1(path: Path) -> None:
    with qcow2snap.open(path) as image:
        offset = image.header.l1_table_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(offset)
        f.write(struct.pack(">Q", entry | 0x200))


def _damage_compressed(path: Path) -> None:
    with qcow2snap.open(path) as image:
        ext = next(e for e in image.extents() if e.kind is ExtentKind.COMPRESSED)
    assert ext.host_offset is not None
    with open(path, "r+b") as f:
        f.seek(ext.host_offset)
        f.write(b"\xff" * ext.compressed_length)


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("v3-basic", _damage_l1, "L2 table offset 0x[0-9a-f]+ unaligned"),
    ("compressed-zlib", _damage_compressed, "does not decompress"),
    ("compressed-zstd", _damage_compressed, "does not decompress"),
])
def test_damaged_image_one_line_error(name: str, damage: Any, message: str,
                                      fixture_copy: Any) -> None:
    path = fixture_copy(name)
    damage(path)
    threads = threading.active_count()
    with pytest.raises(CorruptImageError, match=message):
        hash_image(path, [None])
    assert threading.active_count() == threads
    result = invoke("hash", path, "-")
    assert result.exit_code == CorruptImageError.exit_code
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("qcow2snap: error: ")
    assert result.stdout == ""


def test_interrupt_stops_every_worker(fixture_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arrives in the waiting thread (here: from the progress
    callback); every stream stops and no worker is left running."""
    monkeypatch.setattr(hashing, "PROGRESS_INTERVAL", 0.001)
    monkeypatch.setattr(hashing, "_ZEROS", bytes(512))   # slow: many small updates
    threads = threading.active_count()
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hash_image(fixture_path(fixture_dir, "many-snapshots"), progress=progress)
    assert threading.active_count() == threads
    assert calls[0][0] == 0 and calls[1][0] < calls[1][1]


def test_progress_reaches_the_total(fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, "savevm")
    seen: list[tuple[int, int]] = []
    report = hash_image(path, include_image=True, progress=lambda d, t: seen.append((d, t)))
    total = (sum(layer.disk_size + layer.vm_state_size for layer in report.layers)
             + report.file_size)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
