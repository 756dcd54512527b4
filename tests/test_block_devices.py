"""qcow2 images and backing files on block devices (oVirt/RHV keep them on
logical volumes), checked against qemu-img reading the same devices.

A block device's ``st_size`` is 0: its size is where ``SEEK_END`` lands.  The
old code sized files with ``st_size``, so an image on a device was "not in
qcow2 format" and a raw backing file on a device read as zeros (exit 0).
Edits on a device never truncate it; freed space is punched instead.

Loop devices stand in for the logical volumes.  Without ``losetup`` (or the
rights to attach one) the tests skip, unless ``QCOW2SNAP_REQUIRE_BLOCKDEV=1``
(CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, sha256_file
from helpers import REQUIRE_BLOCKDEV, assert_qemu_clean, missing, run_cli

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """A loop device over ``backing`` (detached afterwards)."""
    losetup = shutil.which("losetup")
    if losetup is None:
        missing("a loop device", "losetup is not installed", REQUIRE_BLOCKDEV)
    proc = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True,
                          text=True, timeout=60, check=False)
    device = proc.stdout.strip()
    if proc.returncode != 0 or not device.startswith("/dev/"):
        missing("a loop device",
                f"'losetup -f --show' failed: {proc.stderr.strip() or proc.returncode}",
                REQUIRE_BLOCKDEV)
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], capture_output=True, timeout=60, check=False)


def disk_with(image: Path, size: int) -> Path:
    """A ``size``-byte disk (file) holding ``image`` at its start, zeros after
    it, as ``dd`` onto a volume leaves it."""
    disk = image.with_name(image.name + ".disk")
    shutil.copyfile(image, disk)
    assert disk.stat().st_size <= size
    os.truncate(disk, size)
    return disk


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert (proc.returncode, proc.stderr) == (0, ""), f"{proc.args}: {proc.stderr}"
    return proc.stdout


def qemu(*args: str) -> str:
    return ok(subprocess.run(list(args), capture_output=True, text=True, timeout=120,
                             check=False))


def convert(qemu_img: str, image: str | Path, snapshot_id: str | None, out: Path) -> str:
    """sha256 of qemu-img's raw conversion of a snapshot (None: the active layer)."""
    selection = [] if snapshot_id is None else ["-l", f"snapshot.id={snapshot_id}"]
    qemu(qemu_img, "convert", "-f", "qcow2", *selection, "-O", "raw", str(image), str(out))
    digest = sha256_file(out)
    out.unlink()
    return digest


def extract(image: str | Path, snapshot_id: str | None, out: Path, *options: str) -> str:
    """sha256 of ``qcow2snap extract`` of a snapshot (None: the active layer)."""
    ref = ["-"] if snapshot_id is None else ["--by-id", snapshot_id]
    ok(run_cli("extract", *ref, str(image), "-o", str(out), *options))
    digest = sha256_file(out)
    out.unlink()
    return digest


def snapshot_ids(qemu_img: str, image: str | Path) -> list[tuple[str, str]]:
    info = json.loads(qemu(qemu_img, "info", "-f", "qcow2", "--output=json", str(image)))
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v3-basic", "compressed-zlib"])
def test_image_on_a_block_device_reads_as_the_file(name: str, fixture_copy: Any,
                                                   tmp_path: Path, qemu_img: str) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = fixture_copy(name)
    disk = disk_with(path, 8 * MiB)
    out = tmp_path / "out.raw"
    with loop_device(disk) as device:
        assert device_size(device) == 8 * MiB
        device_info = json.loads(ok(run_cli("info", "--json", device)))
        file_info = json.loads(ok(run_cli("info", "--json", str(path))))
        # the same image: only the name, the length and the blocks differ
        assert device_info["file-length"] == 8 * MiB
        for key in ("filename", "actual-size", "file-length"):
            device_info.pop(key, None)
            file_info.pop(key, None)
        assert device_info == file_info
        qemu_info = json.loads(qemu(qemu_img, "info", "-f", "qcow2", "--output=json", device))
        assert device_info["virtual-size"] == qemu_info["virtual-size"] == entry["info"][
            "virtual-size"]
        assert [(s["id"], s["name"]) for s in device_info["snapshots"]] == [
            (s["id"], s["name"]) for s in qemu_info["snapshots"]] == [
            (s["id"], s["name"]) for s in entry["snapshots"]]
        # every snapshot and the active layer: qemu-img's bytes, the file's bytes
        expected = {s["id"]: s["sha256"] for s in entry["snapshots"]}
        expected[None] = entry["active"]["sha256"]
        for snapshot_id, digest in expected.items():
            assert extract(device, snapshot_id, out) == digest, snapshot_id
            assert convert(qemu_img, device, snapshot_id, out) == digest, snapshot_id
            assert extract(path, snapshot_id, out) == digest, snapshot_id


def test_raw_backing_file_on_a_block_device(fixture_copy: Any, tmp_path: Path,
                                            qemu_img: str) -> None:
    """The overlay names a raw file beside it; the user gives a device
    instead (--backing-file): reads fall through to the device's bytes."""
    overlay = fixture_copy("raw-backing")
    volume = tmp_path / "volume.raw"
    volume.write_bytes(random.Random(7).randbytes(16 * MiB))   # not the named file's bytes
    out = tmp_path / "out.raw"
    snapshots: list[str | None] = [None, "1", "2"]
    with loop_device(volume) as device:
        # qemu-img's reference: a copy that names the device
        reference = tmp_path / "reference.qcow2"
        shutil.copyfile(overlay, reference)
        qemu(qemu_img, "rebase", "-u", "-f", "qcow2", "-b", device, "-F", "raw", str(reference))
        for snapshot_id in snapshots:
            expected = convert(qemu_img, reference, snapshot_id, out)
            assert extract(overlay, snapshot_id, out, "--backing-file", device) == expected, (
                snapshot_id)
            # the named file reads differently: the device was really read
            assert extract(overlay, snapshot_id, out) != expected, snapshot_id
        info = json.loads(ok(run_cli("info", "--json", "--backing-file", device,
                                       str(overlay))))
        assert [(link["filename"], link["followed"], link["format"], link["virtual-size"])
                for link in info["backing-chain"]] == [(device, True, "raw", 16 * MiB)]


def test_edits_on_a_block_device(fixture_copy: Any, tmp_path: Path, qemu_img: str) -> None:
    """create and delete on an image on a device, as qemu-img does them on a
    twin file; the device keeps its size and qemu-img check is clean."""
    path = fixture_copy("v3-basic")
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(path, twin)
    qemu(qemu_img, "snapshot", "-c", "NEW", str(twin))
    qemu(qemu_img, "snapshot", "-d", "second", str(twin))
    disk = disk_with(path, 16 * MiB)
    out = tmp_path / "out.raw"
    with loop_device(disk) as device:
        created = ok(run_cli("create", "NEW", device))
        assert created.startswith(f"{device}: created snapshot 4 (NEW); ")
        assert created.endswith(", file 16 MiB -> 16 MiB\n")
        deleted = json.loads(ok(run_cli("delete", "--json", "second", device)))
        assert [(d["ok"], d["snapshot-id"], d["file-size-before"], d["file-size-after"])
                for d in deleted] == [(True, "2", 16 * MiB, 16 * MiB)]
        assert deleted[0]["clusters-freed"] > 0
        # never truncated: the device and the file under it keep their sizes
        assert device_size(device) == 16 * MiB
        assert_qemu_clean(qemu_img, device, "-f", "qcow2")
        assert snapshot_ids(qemu_img, device) == snapshot_ids(qemu_img, twin) == [
            ("1", "first"), ("3", "third"), ("4", "NEW")]
        assert ok(run_cli("list", device)) == ok(run_cli("list", str(disk)))
        for snapshot_id in (None, "1", "3", "4"):
            assert (convert(qemu_img, device, snapshot_id, out)
                    == convert(qemu_img, twin, snapshot_id, out)), snapshot_id
    assert disk.stat().st_size == 16 * MiB
    assert_qemu_clean(qemu_img, disk, "-f", "qcow2")
