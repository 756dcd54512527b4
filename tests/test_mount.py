"""``qcow2snap mount``: the FUSE tree read by real consumers.

Every file read through the mount is compared with what ``extract`` (and
``vmstate dump`` / ``vmstate memory``) writes for the same layer, and the
ext4 test with what ``qemu-img convert -l`` gives; holes (SEEK_DATA /
SEEK_HOLE) are compared with the layer's extents and checked to read as
zeros.  The mount runs as ``python -m qcow2snap mount`` in the foreground
and is always unmounted with ``fusermount3 -u``.

These tests skip without FUSE (``/dev/fuse``, ``fusermount3``, the
``mfusepy`` binding), or fail under ``QCOW2SNAP_REQUIRE_FUSE=1`` (.ci/run).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import FIXTURES_BY_NAME
from helpers import cli_argv, missing, require_tool, run_cli

import qcow2snap
from qcow2snap.reader import ExtentKind

REQUIRE_FUSE = "QCOW2SNAP_REQUIRE_FUSE"


@pytest.fixture(scope="module")
def fuse() -> str:
    """fusermount3's path, once FUSE is known to be usable here."""
    if not os.path.exists("/dev/fuse"):
        missing("FUSE", "/dev/fuse is missing", REQUIRE_FUSE)
    if importlib.util.find_spec("mfusepy") is None:
        missing("FUSE", "the mfusepy binding is not installed (qcow2snap[mount])", REQUIRE_FUSE)
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        missing("FUSE", "fusermount3 is not installed (fuse3)", REQUIRE_FUSE)
    return fusermount


@contextmanager
def mounted(fusermount: str, mountpoint: Path, *args: str | os.PathLike[str]
            ) -> Iterator[subprocess.Popen[str]]:
    """``qcow2snap mount ARGS MOUNTPOINT`` in the foreground until the block
    ends; unmounted with fusermount3 -u whatever happens."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(cli_argv("mount", *args, mountpoint), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"mount exited {proc.returncode}: {err}{out}")
            if time.monotonic() > deadline:
                pytest.fail("the mount did not appear within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        subprocess.run([fusermount, "-u", os.fspath(mountpoint)], capture_output=True,
                       check=False)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def extract(image: Path, ref: str, out: Path, *options: str) -> Path:
    by = () if ref == "-" else ("--by-id",)
    result = run_cli("extract", *by, ref, image, "-o", out, "--no-progress", *options)
    assert result.returncode == 0, result.stderr
    return out


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def seek_runs(path: Path) -> list[tuple[int, int]]:
    """The data runs SEEK_DATA / SEEK_HOLE report, as (start, end)."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == 6  # ENXIO: only a hole follows
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert end > start
            runs.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return runs


def expected_runs(image: Path, ref: str | None) -> list[tuple[int, int]]:
    """Data runs from the layer's extents: holes are zero clusters and
    unallocated ones without a backing file (the fixtures used here have
    none)."""
    runs: list[tuple[int, int]] = []
    with qcow2snap.open(image) as img:
        assert img.backing_path() is None
        sn = None if ref is None else img.find_snapshot(ref, by="id")
        for ext in img.extents(sn):
            if ext.kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED):
                continue
            if runs and runs[-1][1] == ext.guest_offset:
                runs[-1] = (runs[-1][0], ext.guest_end)
            else:
                runs.append((ext.guest_offset, ext.guest_end))
    return runs


# ---------------------------------------------------------------------------


def test_tree_disks_vmstate_info(fuse: str, fixture_copy, tmp_path: Path) -> None:
    image = fixture_copy("savevm")
    before = fingerprint(image)
    listed = json.loads(run_cli("list", "--json", image).stdout)
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, image):
        assert sorted(os.listdir(mnt)) == ["1-pre", "2-run", "3-paused", "active"]
        assert os.listdir(mnt / "active") == ["disk.raw"]
        assert (mnt / "active" / "disk.raw").read_bytes() == extract(
            image, "-", tmp_path / "active.raw").read_bytes()
        for entry in listed:
            folder = mnt / f"{entry['id']}-{entry['name']}"
            assert sorted(os.listdir(folder)) == sorted(
                ["disk.raw", "info.json", "vmstate.bin", "memory.raw", "memory.elf",
                 "memory.lime"])
            assert json.loads((folder / "info.json").read_text()) == entry
            out = extract(image, entry["id"], tmp_path / f"{entry['id']}.raw")
            assert (folder / "disk.raw").stat().st_size == out.stat().st_size
            assert subprocess.run(["cmp", out, folder / "disk.raw"]).returncode == 0
            state = tmp_path / f"{entry['id']}.vmstate"
            dumped = run_cli("vmstate", "dump", "--by-id", entry["id"], image, "-o", state,
                             "--no-progress")
            assert dumped.returncode == 0, dumped.stderr
            assert (folder / "vmstate.bin").read_bytes() == state.read_bytes()
        # guest memory: the exports `vmstate memory` writes
        folder = mnt / "2-run"
        for fmt in ("elf", "lime", "raw"):
            out = tmp_path / f"memory.{fmt}"
            made = run_cli("vmstate", "memory", "--by-id", "2", image, "-o", out,
                           "--format", fmt, "--no-progress")
            assert made.returncode == 0, made.stderr
            assert (folder / f"memory.{fmt}").stat().st_size == out.stat().st_size
            if fmt != "raw":   # raw is 4 GiB of mostly holes: its data runs below
                assert subprocess.run(["cmp", out, folder / f"memory.{fmt}"]).returncode == 0
        mounted_raw = folder / "memory.raw"
        with open(out, "rb") as want, open(mounted_raw, "rb") as got:
            for start, end in seek_runs(mounted_raw):
                want.seek(start)
                got.seek(start)
                assert got.read(end - start) == want.read(end - start)
    assert not os.path.ismount(mnt)
    assert fingerprint(image) == before


def test_holes_and_sparse_copy(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    image = fixture_dir / "zero-clusters.qcow2"
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, image):
        for ref, folder in ((None, "active"), ("1", "1-s1"), ("2", "2-s2")):
            disk = mnt / folder / "disk.raw"
            runs = seek_runs(disk)
            assert runs == expected_runs(image, ref), folder
            out = extract(image, ref or "-", tmp_path / f"{folder}.raw")
            data = out.read_bytes()
            holes, offset = [], 0
            for start, end in runs:
                holes.append((offset, start))
                offset = end
            holes.append((offset, len(data)))
            assert any(hi > lo for lo, hi in holes), "the fixture has holes"
            for lo, hi in holes:   # never a hole over data
                assert data[lo:hi] == bytes(hi - lo), (folder, lo, hi)
            copy = tmp_path / f"{folder}.copy"
            subprocess.run(["cp", "--sparse=always", disk, copy], check=True)
            assert copy.read_bytes() == data
            assert copy.stat().st_blocks * 512 < len(data)


def qemu_data_runs(qemu_img: str, image: Path) -> list[tuple[int, int]]:
    """The ``data: true`` ranges of ``qemu-img map`` (the whole chain)."""
    runs: list[tuple[int, int]] = []
    mapped = json.loads(subprocess.run([qemu_img, "map", "--output=json", image],
                                       capture_output=True, text=True, check=True).stdout)
    for entry in mapped:
        if not entry["data"]:
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def test_holes_through_a_backing_chain(fuse: str, qemu_img: str, fixture_dir: Path,
                                       tmp_path: Path) -> None:
    """Over unallocated clusters the holes are the backing file's: the data
    runs are qemu-img map's, and every hole reads as zeros."""
    image = fixture_dir / "backing-chain.qcow2"
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, image):
        disk = mnt / "active" / "disk.raw"
        data = extract(image, "-", tmp_path / "active.raw").read_bytes()
        runs = seek_runs(disk)
        assert runs == qemu_data_runs(qemu_img, image)
        offset = 0
        for start, end in [*runs, (len(data), len(data))]:
            assert data[offset:start] == bytes(start - offset)
            offset = end
        assert subprocess.run(["cmp", tmp_path / "active.raw", disk]).returncode == 0


def test_holes_over_a_raw_backing_file_are_data(fixture_dir: Path) -> None:
    with qcow2snap.open(fixture_dir / "raw-backing.qcow2") as img:
        disk = img.open_disk()
        below = img.backing.size if img.backing is not None else 0
        assert below > 0
        for start, length, is_data in disk.data_runs():
            if not is_data:   # a hole only where the qcow2 layer says zeros, or past the raw file
                assert all(e.kind is ExtentKind.ZERO or e.guest_offset >= below
                           for e in img.extents(None, start, length))


def test_many_threads_read_one_file(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    """8 threads at random offsets and lengths of one mounted file (page
    cache dropped between rounds) read what extract writes."""
    image = fixture_dir / "compressed-zstd.qcow2"
    want = extract(image, "1", tmp_path / "want.raw").read_bytes()
    mnt = tmp_path / "mnt"
    errors: list[str] = []
    with mounted(fuse, mnt, image):
        path = mnt / "1-s1" / "disk.raw"

        def hammer(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(150):
                    offset = rng.randrange(len(want))
                    length = rng.choice((1, 511, 4096, 65536, 300_000, 1 << 20))
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    got = os.pread(fd, length, offset)
                    if got != want[offset:offset + length]:
                        errors.append(f"seed {seed}: {length} bytes at {offset}")
            finally:
                os.close(fd)

        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.parametrize("name", ["backing-chain", "compressed-zlib", "compressed-zstd",
                                  "luks"])
def test_reader_api_from_many_threads(name: str, fixture_dir: Path) -> None:
    """The reader the mount uses: one DiskReader's pread from 8 threads at
    once reads what one thread reads (a fresh image, one range at a time)."""
    image = fixture_dir / f"{name}.qcow2"
    secret = FIXTURES_BY_NAME["luks"]["secret"] if name == "luks" else None
    with qcow2snap.open(image, passphrase=secret) as img:
        want = img.open_disk().read()
    errors: list[str] = []
    with qcow2snap.open(image, passphrase=secret) as img:
        disk = img.open_disk()

        def hammer(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                offset = rng.randrange(len(want))
                length = rng.choice((1, 4096, 70_000, 1 << 20))
                if disk.pread(offset, length) != want[offset:offset + length]:
                    errors.append(f"{length} at {offset}")

        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_backing_file_opened_once_by_concurrent_readers(fixture_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads reading unallocated clusters at once open the backing image
    once (they used to race, each opening its own and leaking the others)."""
    opened: list[object] = []
    original = qcow2snap.Qcow2Image._open_backing

    def slow_open(self: qcow2snap.Qcow2Image) -> object:
        time.sleep(0.05)
        result = original(self)
        opened.append(self)
        return result

    monkeypatch.setattr(qcow2snap.Qcow2Image, "_open_backing", slow_open)
    with qcow2snap.open(fixture_dir / "backing-chain.qcow2") as img:
        disk = img.open_disk()
        size = disk.size
        threads = [threading.Thread(target=disk.pread, args=(i * size // 8, 4096))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(o is img for o in opened) == 1


def test_mountpoint_errors(tmp_path: Path, fixture_dir: Path) -> None:
    image = fixture_dir / "v3-basic.qcow2"
    result = run_cli("mount", image, tmp_path / "missing")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"qcow2snap: error: mountpoint {tmp_path / 'missing'} does not exist; create it "
        f"(mkdir -p {tmp_path / 'missing'})"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = run_cli("mount", image, tmp_path / "full")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "is not empty" in result.stderr


def _hold_write_lock_bytes(path: Path) -> int:
    """Hold QEMU's write-permission byte (101) as a running QEMU does."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 101, 1, 0))  # F_OFD_SETLK
    return fd


def test_refuses_an_image_a_qemu_writes(fuse: str, fixture_copy, tmp_path: Path) -> None:
    image = fixture_copy("v3-basic")
    (tmp_path / "mnt").mkdir()
    fd = _hold_write_lock_bytes(image)
    try:
        result = run_cli("mount", image, tmp_path / "mnt")
        assert result.returncode == 5, result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert "--force" in result.stderr
        with mounted(fuse, tmp_path / "mnt", "--force", image) as proc:
            assert os.listdir(tmp_path / "mnt" / "active") == ["disk.raw"]
        assert "may be inconsistent" in proc.stderr.read() if proc.stderr else False
    finally:
        os.close(fd)


def test_holds_the_reader_lock(fuse: str, fixture_copy, tmp_path: Path) -> None:
    """While mounted, a QEMU writer cannot open the image (qemu-io)."""
    qemu_io = require_tool("qemu-io")
    image = fixture_copy("v3-basic")
    before = fingerprint(image)
    with mounted(fuse, tmp_path / "mnt", image):
        result = subprocess.run([qemu_io, "-f", "qcow2", "-c", "write 0 512", image],
                                capture_output=True, text=True, check=False)
        assert result.returncode != 0
        assert "lock" in (result.stderr + result.stdout)
    assert fingerprint(image) == before


def test_sigterm_unmounts(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, fixture_dir / "v3-basic.qcow2") as proc:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)


# ---------------------------------------------------------------------------
# ext4 inside snapshots, read by The Sleuth Kit and debugfs through the mount
# ---------------------------------------------------------------------------


def _ext4_raw(directory: Path, raw: Path) -> None:
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-U",
                    "11111111-2222-3333-4444-555555555555", "-d", directory, raw],
                   check=True, capture_output=True)


def _tsk_cat(fls: str, icat: str, disk: Path, name: str) -> bytes:
    listing = subprocess.run([fls, "-r", "-p", disk], capture_output=True, text=True,
                             check=True).stdout
    for line in listing.splitlines():
        _kind, rest = line.split(" ", 1)
        inode, path = rest.split(":\t", 1)
        if path == name:
            return subprocess.run([icat, disk, inode.strip().rstrip("*").strip()],
                                  capture_output=True, check=True).stdout
    raise AssertionError(f"{name} not in {listing}")


def test_ext4_files_through_the_mount(fuse: str, qemu_img: str, tmp_path: Path) -> None:
    fls, icat = require_tool("fls"), require_tool("icat")
    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        missing("e2fsprogs", "mkfs.ext4/debugfs are not installed", REQUIRE_FUSE)
    contents = {"v1": {"notes/hello.txt": b"hello, first\n", "big.bin": os.urandom(300_000)},
                "v2": {"notes/hello.txt": b"hello, second version\n",
                       "big.bin": os.urandom(200_000), "new.txt": b"only in v2\n"}}
    image = tmp_path / "vm.qcow2"
    for n, (snap, files) in enumerate(contents.items()):
        tree = tmp_path / snap
        for name, data in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        raw = tmp_path / f"{snap}.raw"
        _ext4_raw(tree, raw)
        if n == 0:
            subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, image],
                           check=True)
        else:   # into the existing image: its snapshots stay
            subprocess.run([qemu_img, "convert", "-n", "-f", "raw", "-O", "qcow2", raw, image],
                           check=True)
        subprocess.run([qemu_img, "snapshot", "-c", snap, image], check=True)
    before = fingerprint(image)
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, image):
        assert sorted(os.listdir(mnt)) == ["1-v1", "2-v2", "active"]
        for sid, snap in (("1", "v1"), ("2", "v2")):
            disk = mnt / f"{sid}-{snap}" / "disk.raw"
            oracle = tmp_path / f"oracle-{snap}.raw"
            subprocess.run([qemu_img, "convert", "-l", f"snapshot.name={snap}", "-O", "raw",
                            image, oracle], check=True)
            assert subprocess.run(["cmp", oracle, disk]).returncode == 0
            for name, data in contents[snap].items():
                through_mount = _tsk_cat(fls, icat, disk, name)
                assert through_mount == _tsk_cat(fls, icat, oracle, name) == data
                debugfs = subprocess.run(["debugfs", "-R", f"cat /{name}", disk],
                                         capture_output=True, check=True).stdout
                assert debugfs == data
            if snap == "v1":
                listing = subprocess.run([fls, "-r", "-p", disk], capture_output=True,
                                         text=True, check=True).stdout
                assert "new.txt" not in listing
        _loop_mount_check(mnt / "2-v2" / "disk.raw", tmp_path / "loop", contents["v2"])
    assert fingerprint(image) == before


def _loop_mount_check(disk: Path, target: Path, files: dict[str, bytes]) -> None:
    """mount -o loop,ro of a mounted disk file, where the machine allows it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return
    target.mkdir()
    done = subprocess.run(["mount", "-o", "loop,ro", disk, target], capture_output=True,
                          check=False)
    if done.returncode != 0:
        return   # no loop devices or no permission here: the other readers suffice
    try:
        for name, data in files.items():
            assert (target / name).read_bytes() == data
    finally:
        subprocess.run(["umount", target], check=False)


# ---------------------------------------------------------------------------
# several disks, names, background, damage
# ---------------------------------------------------------------------------


def test_several_disks_side_by_side(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    boot, data = tmp_path / "boot.qcow2", tmp_path / "data.qcow2"
    shutil.copyfile(fixture_dir / "v3-basic.qcow2", boot)
    shutil.copyfile(fixture_dir / "v3-basic.qcow2", data)
    listed = json.loads(run_cli("list", "--json", boot).stdout)
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, boot, data):
        assert sorted(os.listdir(mnt)) == ["1-first", "2-second", "3-third", "active"]
        assert sorted(os.listdir(mnt / "active")) == ["boot.raw", "data.raw"]
        for entry in listed:
            folder = mnt / f"{entry['id']}-{entry['name']}"
            assert sorted(os.listdir(folder)) == ["boot.raw", "data.raw", "info.json"]
            info = json.loads((folder / "info.json").read_text())
            assert info == {"boot.raw": entry, "data.raw": entry}
            out = extract(boot, entry["id"], tmp_path / f"{entry['id']}.raw")
            for disk in ("boot.raw", "data.raw"):
                assert subprocess.run(["cmp", out, folder / disk]).returncode == 0


def test_snapshot_names_made_safe(fuse: str, qemu_img: str, tmp_path: Path) -> None:
    image = tmp_path / "names.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", image, "1M"], check=True)
    for name in ("a/b", "..", "tab\there"):
        subprocess.run([qemu_img, "snapshot", "-c", name, image], check=True)
    with mounted(fuse, tmp_path / "mnt", image):
        assert sorted(os.listdir(tmp_path / "mnt")) == ["1-a_b", "2-..", "3-tab_here",
                                                        "active"]


def test_names_collide_visibly() -> None:
    from qcow2snap.ops.mount import _unique, safe_name
    taken = {"active"}
    assert [_unique(safe_name(n), taken) for n in ("1-a/b", "1-a_b", "1-a\nb")] == [
        "1-a_b", "1-a_b~2", "1-a_b~3"]
    assert len(safe_name("x" * 300).encode()) == 255
    assert len(_unique("y" * 255, {"y" * 255}).encode()) == 255


def test_background(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        result = run_cli("mount", "--background", fixture_dir / "v3-basic.qcow2", mnt,
                         timeout=30)
        assert result.returncode == 0, result.stderr
        # ready when the command returns: the readahead is already raised
        # (root), and nothing of the server keeps the mount busy
        dev = os.stat(mnt).st_dev
        if os.geteuid() == 0:
            bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            assert bdi.read_text().strip() == "1024"
        unmount = subprocess.run([fuse, "-u", mnt], capture_output=True, text=True)
        assert unmount.returncode == 0, unmount.stderr
        result = run_cli("mount", "--background", fixture_dir / "v3-basic.qcow2", mnt,
                         timeout=30)
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mnt)
        assert sorted(os.listdir(mnt)) == ["1-first", "2-second", "3-third", "active"]
    finally:
        subprocess.run([fuse, "-u", mnt], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mnt)


def test_damaged_table_reads_as_eio(fuse: str, fixture_copy, tmp_path: Path) -> None:
    image = fixture_copy("v3-basic")
    with qcow2snap.open(image) as img:
        l2_offset = img.l1_entries(img.layer(None))[0] & 0x00FFFFFFFFFFFE00
        cluster = img.cluster_size
    with open(image, "r+b") as f:   # guest cluster 0: an unaligned data offset
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | (cluster * 5 + 512)))
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, image) as proc:
        with pytest.raises(OSError) as caught, open(mnt / "active" / "disk.raw", "rb") as f:
            f.read(4096)
        assert caught.value.errno == 5
        # the other layers still read
        assert len((mnt / "1-first" / "disk.raw").read_bytes()) == 64 << 20
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert errors and all(line.startswith("qcow2snap: error: ") for line in errors)
    assert "Traceback" not in stderr


def test_direct_io(fuse: str, fixture_dir: Path, tmp_path: Path) -> None:
    """--direct-io: the same bytes and holes, without the page cache."""
    image = fixture_dir / "zero-clusters.qcow2"
    mnt = tmp_path / "mnt"
    with mounted(fuse, mnt, "--direct-io", image):
        for ref, folder in ((None, "active"), ("2", "2-s2")):
            disk = mnt / folder / "disk.raw"
            out = extract(image, ref or "-", tmp_path / f"{folder}.raw")
            assert subprocess.run(["cmp", out, disk]).returncode == 0
            assert seek_runs(disk) == expected_runs(image, ref)
            with open(disk, "rb") as f:   # odd sizes and offsets reach the reader as they are
                f.seek(12345)
                assert f.read(777) == out.read_bytes()[12345:12345 + 777]
