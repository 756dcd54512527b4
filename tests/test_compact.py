"""``qcow2snap compact``: QEMU is the oracle.

Over every fixture kind with snapshots: the compacted image passes
``qemu-img check``, lists the same snapshots, and every snapshot's disk
(``qemu-img convert -l``) and VM state, and the active layer, are equal;
it is never larger than the source, and on an image with freed space it is
smaller and bounded by its distinct clusters plus metadata.  A savevm
snapshot can be loaded by QEMU from the compacted image.  Killed part-way,
the source is untouched and nothing appears under the output's name.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, fixture_path, sha256_file
from helpers import invoke, qemu_img_check, require_tool

import qcow2snap
from qcow2snap import format as fmt
from qcow2snap.errors import (
    ImageInUseError,
    OutputExistsError,
    Qcow2Error,
    RefcountOverflowError,
    UnsupportedImageError,
)
from qcow2snap.ops.compact import compact, compact_in_place
from qcow2snap.ops.edit import EditableImage
from qcow2snap.ops.hashing import hash_image

SECRET = ["--object", "secret,id=sec0,data=qcow2snap"]
REFUSED = {"luks", "data-file"}
COMPACTABLE = [f["name"] for f in FIXTURE_ENTRIES
               if f["snapshots"] and f["name"] not in REFUSED]


def _qemu_target(name: str, path: Path) -> list[str]:
    """qemu-img arguments naming ``path`` (with its key where it has one)."""
    if FIXTURES_BY_NAME.get(name, {}).get("secret"):
        return [*SECRET, "--image-opts",
                f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    return [os.fspath(path)]


def _snapshot_list(qemu_img: str, name: str, path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([qemu_img, "info", "--output=json", "--force-share",
                           *_qemu_target(name, path)],
                          capture_output=True, text=True, check=True, cwd=path.parent)
    return [{k: s[k] for k in ("id", "name", "date-sec", "date-nsec", "vm-clock-sec",
                               "vm-clock-nsec", "vm-state-size", "icount") if k in s}
            for s in json.loads(proc.stdout).get("snapshots", [])]


def _convert_digest(qemu_img: str, name: str, path: Path, snapshot_id: str | None,
                    tmp: Path) -> str:
    raw = tmp / "layer.raw"
    args = [qemu_img, "convert", "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    subprocess.run([*args, *_qemu_target(name, path), os.fspath(raw)], check=True,
                   capture_output=True, cwd=path.parent, timeout=120)
    try:
        return sha256_file(raw)
    finally:
        raw.unlink()


def _digests(path: Path, passphrase: str | None) -> list[tuple[str | None, str, str | None]]:
    with qcow2snap.open(path, backing_file=False, passphrase=passphrase) as image:
        report = hash_image(image, backing=False)
    return [(None if d.snapshot is None else d.snapshot.id, d.disk_digest, d.vm_state_digest)
            for d in report.layers]


def _check_clean(qemu_img: str, name: str, path: Path) -> dict[str, Any]:
    target = _qemu_target(name, path)
    check = qemu_img_check(qemu_img, target[-1], *target[:-1])
    assert check.clean, check.problems
    return check.report


@pytest.mark.parametrize("name", COMPACTABLE)
def test_compact_keeps_every_layer(fixture_copy: Any, qemu_img: str, tmp_path: Path,
                                   name: str) -> None:
    src = fixture_copy(name)
    out = tmp_path / "out.qcow2"
    before = sha256_file(src)
    passphrase = FIXTURES_BY_NAME[name].get("secret")
    with qcow2snap.open(src, backing_file=False) as image:
        cs = image.cluster_size
        result = compact(image, out)
        header = image.header
    assert sha256_file(src) == before, "the source was written"
    assert result.output_size == out.stat().st_size
    assert out.stat().st_size <= fmt.align_up(src.stat().st_size, cs)
    _check_clean(qemu_img, name, out)
    assert _snapshot_list(qemu_img, name, out) == _snapshot_list(qemu_img, name, src)
    # every layer: disk and VM state digests (qcow2snap's reader) ...
    assert _digests(out, passphrase) == _digests(src, passphrase)
    # ... and QEMU's reading of the active layer and of (a sample of) the snapshots
    snapshots = FIXTURES_BY_NAME[name]["snapshots"]
    sample = snapshots if len(snapshots) <= 4 else snapshots[::len(snapshots) // 3]
    for ref in [None, *(s["id"] for s in sample)]:
        assert (_convert_digest(qemu_img, name, out, ref, tmp_path)
                == _convert_digest(qemu_img, name, src, ref, tmp_path)), ref
    with qcow2snap.open(out, backing_file=False) as copy:
        new = copy.header
        assert (new.cluster_bits, new.refcount_order, new.effective_compression_type,
                new.version, new.crypt_method, new.size) == (
            header.cluster_bits, header.refcount_order, header.effective_compression_type,
            header.version, header.crypt_method, header.size)
        assert copy.extended_l2 == bool(header.incompatible_features & fmt.QCOW2_INCOMPAT_EXTL2)
        with qcow2snap.open(src, backing_file=False) as image:
            assert copy.backing_file_name == image.backing_file_name
            assert copy.backing_format == image.backing_format
            assert [s.to_bytes()[8:] for s in copy.snapshots] == [
                s.to_bytes()[8:] for s in image.snapshots]   # all but the L1 offset


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_images(fixture_copy: Any, tmp_path: Path, name: str) -> None:
    src = fixture_copy(name)
    with qcow2snap.open(src, backing_file=False) as image, \
            pytest.raises(UnsupportedImageError):
        compact(image, tmp_path / "out.qcow2")
    assert not (tmp_path / "out.qcow2").exists()
    assert [p.name for p in tmp_path.iterdir() if "qcow2snap-tmp" in p.name] == []


def _qemu_io(qemu_io: str, path: Path, *commands: str) -> None:
    args = [qemu_io, "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, os.fspath(path)], check=True, capture_output=True, timeout=300)


def _fragmented(qemu_img: str, qemu_io: str, path: Path, size: str = "64M",
                step: int = 1 << 20) -> None:
    """Snapshots that share most of their data, two of them deleted again
    (the file keeps their freed clusters), compressed clusters among them."""
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(path), size], check=True,
                   capture_output=True)
    total = int(size[:-1]) << 20
    _qemu_io(qemu_io, path, *(f"write -P {0x10 + i % 200} {i * step} {step // 2}"
                              for i in range(total // step // 2)))
    _qemu_io(qemu_io, path, f"write -c -P 0x77 {total - (1 << 20)} 64k")
    for n in range(1, 5):
        subprocess.run([qemu_img, "snapshot", "-c", f"s{n}", os.fspath(path)], check=True)
        _qemu_io(qemu_io, path, *(f"write -P {0x40 + n} {i * step * 4 + 4096 * n} 8k"
                                  for i in range(total // step // 4)))
    for n in (2, 3):
        subprocess.run([qemu_img, "snapshot", "-d", f"s{n}", os.fspath(path)], check=True)


def _needed_clusters(path: Path) -> int:
    """Distinct host clusters the layers reference (data and L2 tables),
    plus L1 tables, snapshot table and header: a compacted image needs
    these plus its refcount structures, nothing more."""
    return sum(_referenced(path))


def _referenced(path: Path) -> tuple[int, int]:
    """(distinct data clusters, metadata clusters) of :func:`_needed_clusters`."""
    with qcow2snap.open(path, backing_file=False) as image:
        cs = image.cluster_size
        data: set[int] = set()
        l2s: set[int] = set()
        l1_clusters = 0
        table = 0
        layers = [image.layer(None), *(image.layer(s) for s in image.snapshots)]
        for layer in layers:
            l1 = image.read_l1(layer)
            l1_clusters += -(-len(l1) * 8 // cs)
            for e in l1:
                l2 = e & fmt.L1E_OFFSET_MASK
                if not l2 or l2 in l2s:
                    continue
                l2s.add(l2)
                for entry in image.read_l2(l2):
                    if entry & fmt.QCOW_OFLAG_COMPRESSED:
                        data.add((entry & image.cluster_offset_mask) >> image.cluster_bits)
                    elif entry & fmt.L2E_OFFSET_MASK and not entry & fmt.QCOW_OFLAG_ZERO:
                        data.add((entry & fmt.L2E_OFFSET_MASK) >> image.cluster_bits)
        for s in image.snapshots:
            table += s.entry_length + 8
        return len(data), len(l2s) + l1_clusters + -(-table // cs) + 1


def test_compact_gives_back_freed_space_and_keeps_sharing(qemu_img: str, qemu_io: str,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "frag.qcow2"
    _fragmented(qemu_img, qemu_io, src)
    out = tmp_path / "out.qcow2"
    result = invoke("compact", src, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["output-size"] == out.stat().st_size < src.stat().st_size
    assert report["bytes-given-back"] == src.stat().st_size - out.stat().st_size
    _check_clean(qemu_img, "frag", out)
    assert _digests(out, None) == _digests(src, None)
    # no larger than its distinct clusters plus metadata (refcounts: 2 clusters here)
    cs = 65536
    needed = _needed_clusters(src)
    assert out.stat().st_size <= (needed + 2) * cs
    # sharing kept: the two remaining snapshots and the active layer share
    # most of 16 MiB of data; unshared they would need three times that
    assert report["data-clusters"] < 1.5 * (16 << 20) / cs
    for ref in (None, "1", "4"):
        assert (_convert_digest(qemu_img, "frag", out, ref, tmp_path)
                == _convert_digest(qemu_img, "frag", src, ref, tmp_path))
    # compacting again changes nothing in size
    again = tmp_path / "again.qcow2"
    assert invoke("compact", out, "-o", again).exit_code == 0
    assert again.stat().st_size == out.stat().st_size


def test_layout_is_guest_ordered(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    """Written in reverse guest order, the active layer comes out in guest order."""
    src = tmp_path / "rev.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(src), "16M"], check=True,
                   capture_output=True)
    _qemu_io(qemu_io, src, *(f"write -P {i + 1} {i << 16} 64k" for i in reversed(range(64))))
    subprocess.run([qemu_img, "snapshot", "-c", "s", os.fspath(src)], check=True)
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(src) as image:
        compact(image, out)
    proc = subprocess.run([qemu_img, "map", "--output=json", os.fspath(out)], check=True,
                          capture_output=True, text=True)
    runs = [r for r in json.loads(proc.stdout) if r["data"]]
    assert len(runs) == 1 and runs[0]["length"] == 64 << 16   # one host run, in order


def test_output_rules(fixture_copy: Any, tmp_path: Path) -> None:
    src = fixture_copy("v3-basic")
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"keep")
    with qcow2snap.open(src) as image:
        with pytest.raises(OutputExistsError):
            compact(image, out)
        assert out.read_bytes() == b"keep"
        with pytest.raises(OutputExistsError, match="source image"):
            compact(image, src, overwrite=True)
        compact(image, out, overwrite=True)
    assert invoke("compact", src).exit_code == 2          # neither -o nor --in-place
    assert invoke("compact", src, "-o", out, "--in-place").exit_code == 2


def test_in_place(fixture_copy: Any, qemu_img: str, tmp_path: Path) -> None:
    src = fixture_copy("savevm")
    digests = _digests(src, None)
    listing = _snapshot_list(qemu_img, "savevm", src)
    inode = src.stat().st_ino
    result = invoke("compact", "--in-place", src)
    assert result.exit_code == 0, result.output
    assert "Verified" in result.output
    assert src.stat().st_ino != inode          # replaced by the new file
    _check_clean(qemu_img, "savevm", src)
    assert _digests(src, None) == digests
    assert _snapshot_list(qemu_img, "savevm", src) == listing
    assert [p.name for p in tmp_path.iterdir() if "qcow2snap-tmp" in p.name] == []


def test_in_place_refused_while_edited(fixture_copy: Any) -> None:
    src = fixture_copy("v3-basic")
    before = sha256_file(src)
    with EditableImage(src), pytest.raises(ImageInUseError):
        compact_in_place(src)
    assert sha256_file(src) == before


def test_editors_refused_during_in_place(fixture_copy: Any, monkeypatch: Any) -> None:
    from qcow2snap.ops import compact as compact_module
    src = fixture_copy("v3-basic")
    seen: list[type[BaseException]] = []
    real_verify = compact_module.verify

    def verify_and_try_editing(source: Any, copy_path: str, **options: Any) -> None:
        try:
            EditableImage(src).close()
        except ImageInUseError as exc:
            seen.append(type(exc))
        real_verify(source, copy_path, **options)

    monkeypatch.setattr(compact_module, "verify", verify_and_try_editing)
    compact_in_place(src)
    assert seen == [ImageInUseError]


def test_loadvm_from_compacted(fixture_copy: Any, tmp_path: Path) -> None:
    qemu = require_tool("qemu-system-x86_64")
    entry = FIXTURES_BY_NAME["savevm"]
    src = fixture_copy("savevm")   # unpacks its companion BIOS beside it
    bios = tmp_path / entry["savevm"]["bios"][:-3]
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(src) as image:
        compact(image, out)

    def dump(path: Path, tag: str) -> bytes:
        monitor = f"loadvm run\ndump-guest-memory {tag}.elf\nquit\n"
        proc = subprocess.run([qemu, "-machine", "pc,accel=tcg", "-nodefaults", "-display",
                               "none", "-m", "16", "-drive", f"file={path},format=qcow2,if=ide",
                               "-monitor", "stdio", "-S", "-bios", os.fspath(bios)],
                              input=monitor, text=True, cwd=tmp_path, capture_output=True,
                              timeout=120, check=True)
        assert "rror" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return (tmp_path / f"{tag}.elf").read_bytes()

    ours, theirs = dump(out, "out"), dump(src, "src")
    fill = entry["savevm"]["ram_fill"]
    assert bytes.fromhex(fill["bytes_hex"]) * (fill["length"] // 2) in ours   # the RAM saved
    assert ours == theirs


def _big_image(qemu_img: str, qemu_io: str, path: Path) -> None:
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(path), "512M"], check=True,
                   capture_output=True)
    _qemu_io(qemu_io, path, "write -P 0x5a 0 384M")
    subprocess.run([qemu_img, "snapshot", "-c", "a", os.fspath(path)], check=True)
    _qemu_io(qemu_io, path, "write -P 0x6b 0 64M")
    subprocess.run([qemu_img, "snapshot", "-c", "b", os.fspath(path)], check=True)


def _start_and_kill(args: list[str], tmp_path: Path, sig: int) -> int:
    """Run the CLI, and send ``sig`` once its temporary file exists."""
    proc = subprocess.Popen([sys.executable, "-m", "qcow2snap", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any("qcow2snap-tmp" in p.name for p in tmp_path.iterdir()):
            time.sleep(0.05)
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_compaction_leaves_source_and_no_output(qemu_img: str, qemu_io: str,
                                                       tmp_path: Path, sig: int) -> None:
    src = tmp_path / "big.qcow2"
    _big_image(qemu_img, qemu_io, src)
    before = sha256_file(src)
    out = tmp_path / "out.qcow2"
    code = _start_and_kill(["compact", os.fspath(src), "-o", os.fspath(out)], tmp_path, sig)
    assert code != 0, "finished before the signal: make the image larger"
    assert not out.exists()
    assert sha256_file(src) == before
    if sig == signal.SIGINT:   # an interrupt cleans up its temporary file too
        assert [p.name for p in tmp_path.iterdir()] == ["big.qcow2"]
    # --in-place, killed: the image is the old one
    code = _start_and_kill(["compact", "--in-place", os.fspath(src)], tmp_path, sig)
    assert code != 0
    assert sha256_file(src) == before
    _check_clean(qemu_img, "big", src)
    if sig == signal.SIGINT:
        assert [p.name for p in tmp_path.iterdir()] == ["big.qcow2"]


def test_compacted_hashes_match_manifest(fixture_copy: Any, qemu_img: str,
                                         tmp_path: Path) -> None:
    """The oracle digests recorded when the fixture was made by QEMU."""
    src = fixture_copy("compressed-zstd")
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(src) as image:
        compact(image, out)
    for s in FIXTURES_BY_NAME["compressed-zstd"]["snapshots"]:
        assert _convert_digest(qemu_img, "x", out, s["id"], tmp_path) == s["sha256"]


def test_bitmaps_dropped(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    src = tmp_path / "bm.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(src), "16M"], check=True,
                   capture_output=True)
    _qemu_io(qemu_io, src, "write -P 0x11 0 1M")
    subprocess.run([qemu_img, "snapshot", "-c", "s", os.fspath(src)], check=True)
    subprocess.run([qemu_img, "bitmap", "--add", os.fspath(src), "b0"], check=True)
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(src) as image:
        assert image.extension(fmt.QCOW2_EXT_MAGIC_BITMAPS) is not None
        result = compact(image, out)
    assert result.dropped == ("persistent bitmaps",)
    _check_clean(qemu_img, "bm", out)
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", os.fspath(out)],
                                     check=True, capture_output=True, text=True).stdout)
    assert "bitmaps" not in info["format-specific"]["data"]
    assert _digests(out, None) == _digests(src, None)


def test_output_elsewhere_keeps_the_backing_file_reachable(fixture_copy: Any, qemu_img: str,
                                                           tmp_path: Path) -> None:
    src = fixture_copy("backing-chain")
    other = tmp_path / "sub" / "dir"
    other.mkdir(parents=True)
    out = other / "out.qcow2"
    with qcow2snap.open(src) as image:
        compact(image, out)
        base_name = image.backing_file_name
    with qcow2snap.open(out, backing_file=False) as copy:
        assert copy.backing_file_name == os.path.join("..", "..", base_name or "")
    for ref in (None, "1", "2"):   # QEMU follows the rewritten name to the same base
        assert (_convert_digest(qemu_img, "b", out, ref, tmp_path)
                == _convert_digest(qemu_img, "b", src, ref, tmp_path))


def test_damaged_image_is_refused_without_output(fixture_copy: Any, tmp_path: Path) -> None:
    src = fixture_copy("v3-basic")
    with qcow2snap.open(src) as image:
        l1 = image.read_l1(image.layer(None))
        l1_offset = image.header.l1_table_offset
        index = next(i for i, e in enumerate(l1) if e & fmt.L1E_OFFSET_MASK)
    with open(src, "r+b") as f:   # the active L1 entry points past the end of the file
        f.seek(l1_offset + 8 * index)
        f.write(((1 << 40) | fmt.QCOW_OFLAG_COPIED).to_bytes(8, "big"))
    out = tmp_path / "out.qcow2"
    result = invoke("compact", src, "-o", out)
    assert result.exit_code == 3, result.output   # CorruptImageError
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "qcow2snap-tmp" in p.name] == []


COMPRESSIBLE = ["v3-basic", "compressed-zlib", "compressed-zstd", "savevm", "clusters-512",
                "clusters-2m", "backing-chain", "resized-shrink", "zero-clusters"]


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_compress_every_layer(fixture_copy: Any, qemu_img: str, tmp_path: Path, name: str,
                              kind: str) -> None:
    src = fixture_copy(name)
    out = tmp_path / "out.qcow2"
    result = invoke("compact", src, "-o", out, "--compress", kind, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["compressed-clusters"] > 0
    _check_clean(qemu_img, name, out)
    assert _snapshot_list(qemu_img, name, out) == _snapshot_list(qemu_img, name, src)
    assert _digests(out, None) == _digests(src, None)
    snapshots = FIXTURES_BY_NAME[name]["snapshots"]
    for ref in [None, snapshots[0]["id"], snapshots[-1]["id"]]:
        assert (_convert_digest(qemu_img, name, out, ref, tmp_path)
                == _convert_digest(qemu_img, name, src, ref, tmp_path)), ref
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", os.fspath(out)],
                                     check=True, capture_output=True, text=True,
                                     cwd=tmp_path).stdout)
    assert info["format-specific"]["data"]["compression-type"] == kind
    if name in ("v3-basic", "savevm", "clusters-512"):   # compressible data: smaller
        assert out.stat().st_size < src.stat().st_size / 2


@pytest.mark.parametrize(("name", "kind", "error"), [
    ("aes", "zlib", UnsupportedImageError), ("extended-l2", "zlib", UnsupportedImageError),
    ("v2", "zstd", UnsupportedImageError), ("refcount-2", "zlib", RefcountOverflowError)])
def test_compress_refused(fixture_copy: Any, tmp_path: Path, name: str, kind: str,
                          error: type[Exception]) -> None:
    src = fixture_copy(name)
    with qcow2snap.open(src, backing_file=False) as image, pytest.raises(error):
        compact(image, tmp_path / "out.qcow2", compress=kind)
    assert not (tmp_path / "out.qcow2").exists()
    assert [p.name for p in tmp_path.iterdir() if "qcow2snap-tmp" in p.name] == []


def test_compress_in_place(fixture_copy: Any, qemu_img: str) -> None:
    src = fixture_copy("savevm")
    digests = _digests(src, None)
    size = src.stat().st_size
    result = compact_in_place(src, compress="zstd")
    assert result.verified and result.output_size == src.stat().st_size < size
    _check_clean(qemu_img, "savevm", src)
    assert _digests(src, None) == digests


def _digests_through_backing(path: Path) -> list[tuple[str | None, str, str | None]]:
    with qcow2snap.open(path) as image:
        report = hash_image(image, backing=True)
    return [(None if d.snapshot is None else d.snapshot.id, d.disk_digest, d.vm_state_digest)
            for d in report.layers]


@pytest.mark.parametrize("compress", [None, "zlib"])
@pytest.mark.parametrize("name", ["backing-chain", "raw-backing"])
def test_no_backing_merges_the_chain(fixture_copy: Any, qemu_img: str, tmp_path: Path,
                                     name: str, compress: str | None) -> None:
    src = fixture_copy(name)
    out = tmp_path / "merged.qcow2"
    args = ["compact", src, "-o", out, "--no-backing", "--json"]
    if compress:
        args += ["--compress", compress]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["backing-merged"] is True
    assert json.loads(result.output)["compress"] == compress
    _check_clean(qemu_img, name, out)
    with qcow2snap.open(out) as copy:
        assert copy.backing_file_name is None and copy.backing_format is None
    assert _digests(out, None) == _digests_through_backing(src)
    for ref in (None, "1", "2"):
        assert (_convert_digest(qemu_img, name, out, ref, tmp_path)
                == _convert_digest(qemu_img, name, src, ref, tmp_path)), ref
    # the same backing cluster seen by several layers is written once
    with qcow2snap.open(src) as image:
        below = image.backing_disk()
        assert below is not None
        cs = image.cluster_size
        base_clusters = sum(1 for g in range(-(-image.size // cs))
                            if any(below.pread(g * cs, cs)))
    if compress is None:
        assert base_clusters > 0
        data, metadata = _referenced(src)
        assert json.loads(result.output)["data-clusters"] <= data + base_clusters
        assert out.stat().st_size <= (data + base_clusters + metadata + 2) * cs


def test_no_backing_in_place(fixture_copy: Any, qemu_img: str) -> None:
    src = fixture_copy("backing-chain")
    digests = _digests_through_backing(src)
    result = compact_in_place(src, merge_backing=True)
    assert result.verified
    _check_clean(qemu_img, "backing-chain", src)
    with qcow2snap.open(src) as copy:
        assert copy.backing_file_name is None
    assert _digests(src, None) == digests


def test_no_backing_writes_each_backing_cluster_once(qemu_img: str, qemu_io: str,
                                                     tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(base), "16M"], check=True,
                   capture_output=True)
    _qemu_io(qemu_io, base, "write -P 0x21 0 4M")
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    os.fspath(top)], check=True, capture_output=True, cwd=tmp_path)
    _qemu_io(qemu_io, top, "write -P 0x31 8M 64k")
    subprocess.run([qemu_img, "snapshot", "-c", "s1", os.fspath(top)], check=True)
    # the active layer's L2 table is copied on this write: the two layers
    # then reach the 4 MiB of backing data through different L2 tables
    _qemu_io(qemu_io, top, "write -P 0x32 8M 64k")
    out = tmp_path / "merged.qcow2"
    with qcow2snap.open(top) as image:
        result = compact(image, out, merge_backing=True)
    # 4 MiB of backing data once, two own clusters, and ten of metadata at most
    assert result.data_clusters == 64 + 2
    assert out.stat().st_size <= (64 + 2 + 10) << 16
    _check_clean(qemu_img, "top", out)
    assert _digests(out, None) == _digests_through_backing(top)


@pytest.mark.parametrize("compress", [None, "zlib"])
def test_reserved_bits_of_unallocated_entries_are_dropped(fixture_copy: Any, qemu_img: str,
                                                          tmp_path: Path,
                                                          compress: str | None) -> None:
    src = fixture_copy("savevm")
    with qcow2snap.open(src) as image:
        l1 = image.read_l1(image.layer(None))
        l2 = next(e & fmt.L1E_OFFSET_MASK for e in l1 if e & fmt.L1E_OFFSET_MASK)
        index = next(i for i, e in enumerate(image.read_l2(l2)) if e == 0)
    with open(src, "r+b") as f:   # a reserved bit in an unallocated entry
        f.seek(l2 + 8 * index)
        f.write((1 << 61).to_bytes(8, "big"))
    out = tmp_path / "out.qcow2"
    with qcow2snap.open(src) as image:
        compact(image, out, compress=compress)
    _check_clean(qemu_img, "savevm", out)
    assert _digests(out, None) == _digests(src, None)


def test_damaged_images_give_only_qcow2_errors(fixture_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(15)
    names = ["v3-basic", "compressed-zlib", "extended-l2", "savevm", "clusters-512", "v2"]
    path, out = tmp_path / "damaged.qcow2", tmp_path / "out.qcow2"
    for _ in range(40):
        data = bytearray(fixture_path(fixture_dir, rng.choice(names)).read_bytes())
        for _ in range(rng.randint(1, 6)):
            limit = min(len(data), 1 << 18) if rng.random() < 0.5 else len(data)
            data[rng.randrange(limit)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        for compress in (None, "zlib"):
            try:
                with qcow2snap.open(path, backing_file=False) as image:
                    compact(image, out, compress=compress, overwrite=True)
            except Qcow2Error:
                pass


def test_no_backing_with_a_shrunk_active_layer(qemu_img: str, qemu_io: str,
                                               tmp_path: Path) -> None:
    """The active layer (16 MiB, walked first) is smaller than its 32 MiB
    snapshot: the snapshot still gets the backing data past 16 MiB."""
    base = tmp_path / "base.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", os.fspath(base), "32M"], check=True,
                   capture_output=True)
    _qemu_io(qemu_io, base, "write -P 0x21 0 32M")
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    os.fspath(top)], check=True, capture_output=True, cwd=tmp_path)
    _qemu_io(qemu_io, top, "write -P 0x31 0 64k")
    subprocess.run([qemu_img, "snapshot", "-c", "s1", os.fspath(top)], check=True)
    subprocess.run([qemu_img, "resize", "--shrink", os.fspath(top), "16M"], check=True,
                   capture_output=True, cwd=tmp_path)
    out = tmp_path / "merged.qcow2"
    with qcow2snap.open(top) as image:
        compact(image, out, merge_backing=True)
    _check_clean(qemu_img, "top", out)
    assert _digests(out, None) == _digests_through_backing(top)
    for ref in (None, "1"):
        assert (_convert_digest(qemu_img, "top", out, ref, tmp_path)
                == _convert_digest(qemu_img, "top", top, ref, tmp_path)), ref
