"""``qcow2snap trim``: free clusters punched and a free tail truncated, in place.

Images are made by QEMU (qemu-img create, qemu-io writes, snapshots, then a
snapshot deletion or a revert).  QEMU punches the clusters its own
snapshot operations free, so the test then writes junk into every cluster
an independent refcount parser (tests/crashsim.py's ``Refcounts``, not
qcow2snap's) says is free: that is an image edited by a tool that frees
without discarding.  The oracles: ``qemu-img check`` clean before and
after, every layer's disk read by ``qemu-img convert -l`` identical, the
file's allocated bytes (``st_blocks``) down by exactly the junk written,
the file size down to QEMU's "image end offset" when the free clusters are
at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, sha256_file
from crashsim import CrashReplay, RecordingIO, Refcounts
from helpers import assert_qemu_clean, invoke, qemu_img_check

from qcow2snap import ImageInUseError, ImageNeedsRepairError
from qcow2snap.ops.trim import trim_image

pytestmark = pytest.mark.qemu

MiB = 1 << 20
#: st_blocks also counts the file system's extent-tree blocks, which
#: punching may add or remove (ext4: one 4 KiB block at a time)
FS_SLACK = 16384


def qemu(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def build(tmp_path: Path, qemu_img: str, qemu_io: str, kind: str, cluster_size: int) -> Path:
    """An image whose free clusters lie inside the file ("inner": a deleted
    snapshot), at its end ("tail": a revert drops the active layer's newest
    clusters) or both."""
    path = tmp_path / f"{kind}.qcow2"
    cwd = tmp_path

    def io(*cmds: str) -> None:
        args = [qemu_io, "-f", "qcow2"]
        for c in cmds:
            args += ["-c", c]
        qemu(*args, path.name, cwd=cwd)

    qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         path.name, "16M", cwd=cwd)
    io("write -P 0x11 0 4M", "write -P 0x12 12M 1M")
    qemu(qemu_img, "snapshot", "-c", "first", path.name, cwd=cwd)
    io("write -P 0x21 0 2M", "write -P 0x22 8M 2M")
    qemu(qemu_img, "snapshot", "-c", "second", path.name, cwd=cwd)
    io("write -P 0x31 1M 1M")
    if kind in ("inner", "both"):
        qemu(qemu_img, "snapshot", "-d", "first", path.name, cwd=cwd)
    if kind in ("tail", "both"):
        qemu(qemu_img, "snapshot", "-c", "third", path.name, cwd=cwd)
        io("write -P 0x41 4M 3M")
        qemu(qemu_img, "snapshot", "-a", "third", path.name, cwd=cwd)
    return path


def free_clusters(path: Path) -> list[int]:
    """Clusters inside the file whose refcount is 0 (independent parser)."""
    rc = Refcounts(path)
    cs = rc.cluster_size
    size = path.stat().st_size
    return [c for c in range(1, (size + cs - 1) // cs) if rc.get(c) == 0]


def fill_free(path: Path) -> int:
    """Junk into every free cluster; returns the bytes written."""
    cs = Refcounts(path).cluster_size
    size = path.stat().st_size
    written = 0
    with open(path, "r+b") as f:
        for c in free_clusters(path):
            n = min(cs, size - c * cs)
            f.seek(c * cs)
            f.write(b"\xa5" * n)
            written += n
        f.flush()
        os.fsync(f.fileno())
    return written


def layers(qemu_img: str, path: Path) -> dict[str, str]:
    """sha256 of the active layer and of each snapshot's disk, read by QEMU."""
    info = json.loads(qemu(qemu_img, "info", "--output=json", path.name, cwd=path.parent))
    out: dict[str, str] = {}
    raw = path.parent / "layer.raw"
    for name in [None, *(s["name"] for s in info.get("snapshots", []))]:
        args = [qemu_img, "convert", "-f", "qcow2", "-O", "raw"]
        if name is not None:
            args += ["-l", f"snapshot.name={name}"]
        qemu(*args, path.name, raw.name, cwd=path.parent)
        out[name or "-"] = sha256_file(raw)
        raw.unlink()
    return out


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def image_end(qemu_img: str, path: Path) -> int:
    return int(qemu_img_check(qemu_img, path).report["image-end-offset"])


def trim_json(path: Path, *extra: str) -> dict[str, Any]:
    result = invoke("trim", "--json", *extra, path)
    assert result.exit_code == 0, (result.output, result.stderr)
    obj: dict[str, Any] = json.loads(result.stdout)
    return obj


@pytest.mark.parametrize("kind,cluster_size", [("inner", 65536), ("tail", 65536),
                                                ("both", 4096)])
def test_trim_gives_back_every_free_cluster(kind: str, cluster_size: int, tmp_path: Path,
                                            qemu_img: str, qemu_io: str) -> None:
    path = build(tmp_path, qemu_img, qemu_io, kind, cluster_size)
    junk = fill_free(path)
    assert junk > 0, "the image has no free cluster: the test would mean nothing"
    assert_qemu_clean(qemu_img, path)
    before_layers = layers(qemu_img, path)
    size_before = path.stat().st_size
    end = image_end(qemu_img, path)
    free = free_clusters(path)

    # --dry-run: the plan, nothing written
    digest, mtime = sha256_file(path), path.stat().st_mtime_ns
    plan = trim_json(path, "--dry-run")
    assert sha256_file(path) == digest and path.stat().st_mtime_ns == mtime
    assert plan["dry-run"] is True and plan["given-back"] == 0
    assert plan["free-clusters"] == len(free)
    assert plan["planned-bytes"] == junk
    assert plan["file-size-after"] == min(size_before, end)

    blocks_before = allocated(path)
    done = trim_json(path)
    blocks_after = allocated(path)
    assert_qemu_clean(qemu_img, path)
    assert layers(qemu_img, path) == before_layers
    assert done["planned-bytes"] == junk
    assert done["given-back"] == blocks_before - blocks_after
    # the file system's own extent-tree blocks count in st_blocks too
    assert abs(done["given-back"] - junk) <= FS_SLACK, (done["given-back"], junk)
    assert path.stat().st_size == min(size_before, end)
    if kind in ("tail", "both"):
        assert path.stat().st_size < size_before
        assert done["planned-truncate-bytes"] > 0
    if kind == "inner":
        assert done["punched"] and done["planned-punch-bytes"] == junk
    # what is left free is holes, and trim finds nothing more to do
    again = trim_json(path)
    assert again["given-back"] == 0 and again["planned-bytes"] == 0 and again["punched"] == []
    assert again["already-holes-bytes"] == again["free-clusters"] * cluster_size


def test_trim_text_output(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    junk = fill_free(path)
    result = invoke("trim", path)
    assert result.exit_code == 0, result.stderr
    found = re.search(r"^gave back (\d+) bytes \(planned (\d+); allocated (\d+) -> (\d+)\)$",
                      result.stdout, re.MULTILINE)
    assert found, result.stdout
    given, planned, before, after = map(int, found.groups())
    assert planned == junk and given == before - after
    assert abs(given - junk) <= FS_SLACK
    assert f"punched {junk} bytes in " in result.stdout


# -- refusals ------------------------------------------------------------------

def set_refcount(path: Path, cluster: int, value: int) -> None:
    rc = Refcounts(path)
    assert rc.order == 4
    block = rc.table[cluster // rc.entries]
    with open(path, "r+b") as f:
        f.seek(block + (cluster % rc.entries) * 2)
        f.write(struct.pack(">H", value))


def test_leaked_image_is_refused_until_repaired(tmp_path: Path, qemu_img: str,
                                                qemu_io: str) -> None:
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    junk = fill_free(path)
    leaked = free_clusters(path)[0]
    set_refcount(path, leaked, 1)
    assert qemu_img_check(qemu_img, path).report["leaks"] == 1
    digest = sha256_file(path)
    for extra in ([], ["--dry-run"]):
        result = invoke("trim", *extra, path)
        assert result.exit_code == ImageNeedsRepairError.exit_code
        assert "check --repair leaks" in result.stderr
        assert "1 leaked cluster(s)" in result.stderr and "it frees 65536 bytes" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sha256_file(path) == digest
    assert invoke("check", "--repair", "leaks", path).exit_code == 0
    # the repair itself moves refcount structures (into free clusters) and
    # punches what it frees; trim gives back the rest of the junk
    done = trim_json(path)
    assert 0 < done["planned-bytes"] <= junk
    # the file system's own extent-tree blocks count in st_blocks too
    assert abs(done["given-back"] - done["planned-bytes"]) <= FS_SLACK, done
    assert_qemu_clean(qemu_img, path)


def test_refcount_too_low_is_refused(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """A cluster in use whose refcount is 0 looks free: punching it would
    destroy guest data.  The check finds it first."""
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    fill_free(path)
    rc = Refcounts(path)
    used = max(c for c in range(path.stat().st_size // rc.cluster_size) if rc.get(c) == 1)
    set_refcount(path, used, 0)
    assert qemu_img_check(qemu_img, path).report["corruptions"] >= 1
    digest = sha256_file(path)
    result = invoke("trim", path)
    assert result.exit_code == ImageNeedsRepairError.exit_code
    assert "check --repair all" in result.stderr
    assert sha256_file(path) == digest


def test_dirty_image_is_refused(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    with open(path, "r+b") as f:
        f.seek(72)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features | 1))
    digest = sha256_file(path)
    result = invoke("trim", path)
    assert result.exit_code == ImageNeedsRepairError.exit_code
    assert "dirty bit" in result.stderr
    assert sha256_file(path) == digest


def test_editor_lock(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    fill_free(path)
    digest = sha256_file(path)
    # another qcow2snap editor (a process holding the image open for editing)
    code = ("import sys, qcow2snap; im = qcow2snap.open(sys.argv[1], 'r+'); "
            "print('ready', flush=True); sys.stdin.read()")
    editor = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert editor.stdout is not None and editor.stdout.readline() == "ready\n"
        with pytest.raises(ImageInUseError, match="another qcow2snap editor"):
            trim_image(path)
        result = invoke("trim", path)
        assert result.exit_code == ImageInUseError.exit_code
        assert f"(process {editor.pid})" in result.stderr
    finally:
        editor.kill()
        editor.wait(timeout=30)
    assert sha256_file(path) == digest
    # a running QEMU (qemu-io holding the image open)
    holder = subprocess.Popen([qemu_io, "-f", "qcow2", "-c", "sleep 5000", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from test_edit_gates import _wait_for_locks
        _wait_for_locks(path, holder)
        result = invoke("trim", path)
        assert result.exit_code == ImageInUseError.exit_code
        assert "running QEMU" in result.stderr
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert sha256_file(path) == digest


def test_block_device_is_refused(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    from test_block_devices import loop_device
    path = build(tmp_path, qemu_img, qemu_io, "inner", 65536)
    fill_free(path)
    disk = tmp_path / "disk.img"
    disk.write_bytes(path.read_bytes() + bytes(MiB))
    with loop_device(disk) as device:
        result = invoke("trim", device)
        assert result.exit_code == 4, result.stderr
        assert "block device" in result.stderr
    assert disk.read_bytes()[:path.stat().st_size] == path.read_bytes()


# -- crash safety --------------------------------------------------------------

def test_power_loss_during_trim(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """Every state a power loss can leave (any subset of the punches and the
    truncation, torn) is clean and reads exactly as before; trim touches
    only clusters whose refcount is 0 and writes no byte."""
    from test_crash import state_of
    path = build(tmp_path, qemu_img, qemu_io, "both", 65536)
    fill_free(path)
    before_copy = tmp_path / "before.qcow2"
    before_copy.write_bytes(path.read_bytes())
    before = state_of(path)
    free = set(free_clusters(path))
    cs = 65536
    fd = os.open(path, os.O_RDWR)
    try:
        recorder = RecordingIO(fd)
        trim_image(path, io=recorder)
    finally:
        os.close(fd)
    ops = recorder.ops
    kinds = [op.kind for op in ops]
    assert "pwrite" not in kinds and "punch" in kinds and "truncate" in kinds
    assert kinds[-1] == "fsync"
    size = before_copy.stat().st_size
    for op in ops:
        lo, hi = ((op.offset, op.offset + op.length) if op.kind == "punch"
                  else (op.length, size) if op.kind == "truncate" else (0, 0))
        assert set(range(lo // cs, (hi + cs - 1) // cs)) <= free, op
    assert state_of(path) == before
    scratch = tmp_path / "crashed.qcow2"
    replay = CrashReplay(before_copy, ops, scratch)
    for label in replay.variants(exhaustive_max=4, max_singles=8, random_subsets=4):
        assert qemu_img_check(qemu_img, scratch).clean, label
        assert state_of(scratch) == before, label
    assert replay.stats.variants >= 3
    assert hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(
        before_copy.read_bytes()).digest()


# -- every fixture kind ----------------------------------------------------------

ENCRYPTED = {"luks", "aes"}
FIXTURE_NAMES = [e["name"] for e in FIXTURE_ENTRIES]


def used_bytes_digest(path: Path, free: set[int], cs: int) -> str:
    """sha256 of every cluster whose refcount is not 0, in file order."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for c in range((size + cs - 1) // cs):
            if c not in free:
                h.update(os.pread(f.fileno(), cs, c * cs))
    return h.hexdigest()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_trim_every_fixture(name: str, fixture_copy: Any, qemu_img: str) -> None:
    """Junk in every free cluster of each fixture, then trim: qemu-img check
    stays clean, no cluster in use changes, every layer reads the same."""
    path = fixture_copy(name)
    check: tuple[tuple[str, ...], str | Path] = ((), path)
    if name in ENCRYPTED:   # qemu-img opens these with the secret only
        secret = next(e["secret"] for e in FIXTURE_ENTRIES if e["name"] == name)
        check = (("--object", f"secret,id=sec0,data={secret}", "--image-opts"),
                 f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0")
    assert_qemu_clean(qemu_img, check[1], *check[0], cwd=path.parent)
    junk = fill_free(path)
    cs = Refcounts(path).cluster_size
    free = set(free_clusters(path))
    used = used_bytes_digest(path, free, cs)
    before_layers = None if name in ENCRYPTED else layers(qemu_img, path)
    end = int(qemu_img_check(qemu_img, check[1], *check[0], cwd=path.parent)
              .report["image-end-offset"])
    size_before = path.stat().st_size
    done = trim_json(path)
    assert_qemu_clean(qemu_img, check[1], *check[0], cwd=path.parent)
    assert done["planned-bytes"] == junk
    assert path.stat().st_size == min(size_before, end)
    assert used_bytes_digest(path, free, cs) == used
    if before_layers is not None:
        assert layers(qemu_img, path) == before_layers
    assert trim_json(path)["planned-bytes"] == 0
