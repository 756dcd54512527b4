"""What an image may reach on the host, and what an output may replace
(docs/security.md).

* A backing or data file named by an image is followed only inside the
  image's own directory (symlinks resolved) or a directory the user allowed
  (``--allow-dir`` / ``$QCOW2SNAP_ALLOW_DIR`` / ``allow_dirs=``), or when the
  user gives its path (``--backing-file`` / ``--data-file``).
* VM state is never read from a backing file.
* ``-f`` never replaces the input, a file of its chain, its data file, a
  device node or a FIFO.
* Evidence is read with O_NOATIME; text output escapes terminal control
  sequences; a FIFO given as IMAGE is refused at once.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import fixture_path, sha256_file
from helpers import REQUIRE_QEMU, missing, require_tool, run_cli
from test_damage import Layout, rename_extension

import qcow2snap
from qcow2snap.errors import CompanionRefusedError, NoVMStateError
from qcow2snap.ops.extract import OutputExistsError, dump_vm_state, extract

SECRET = b"HOST-SECRET!" * 4096  # 48 KiB that must never reach an output


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(the image's directory, another directory holding a host file)."""
    case, elsewhere = tmp_path / "case", tmp_path / "elsewhere"
    case.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.raw").write_bytes(SECRET)
    return case, elsewhere


def overlay(directory: Path, backing_name: str, *, fmt: str = "raw") -> Path:
    """An empty 1 MiB qcow2 in ``directory`` naming ``backing_name``."""
    qemu_img = require_tool("qemu-img")
    path = directory / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", backing_name, "-F",
                    fmt, path, "1M"], check=True, capture_output=True)
    return path


def no_secret_in(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET[:12] not in path.read_bytes(), f"{path} holds the host file"


@pytest.mark.parametrize("naming", ["absolute", "relative", "symlink"])
def test_backing_file_outside_the_directory_is_not_followed(
        naming: str, places: tuple[Path, Path]) -> None:
    case, elsewhere = places
    secret = elsewhere / "secret.raw"
    if naming == "absolute":
        name = os.fspath(secret)
    elif naming == "relative":
        name = "../elsewhere/secret.raw"
    else:
        (case / "link.raw").symlink_to(secret)
        name = "link.raw"
    image = overlay(case, name)
    out = case / "out.raw"
    proc = run_cli("extract", "-", image, "-o", out)
    assert proc.returncode == CompanionRefusedError.exit_code, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        f"qcow2snap: error: {image}: backing file {name!r}"
        + ("" if naming == "absolute" else f" (resolved: {secret})")
        + f" is outside the image's directory {case}: not followed; if it is meant, give it "
          f"with --backing-file {secret} or allow its directory with --allow-dir {elsewhere} "
          f"(API: backing_file=, allow_dirs=)\n")
    assert not out.exists()
    with qcow2snap.open(image) as img, img.open_disk() as disk, \
            pytest.raises(CompanionRefusedError) as info:
        disk.read()
    assert info.value.path == os.fspath(secret) and info.value.named == name
    no_secret_in(case)


def test_allowed_ways_to_follow_it(places: tuple[Path, Path]) -> None:
    case, elsewhere = places
    image = overlay(case, os.fspath(elsewhere / "secret.raw"))
    expected = SECRET + bytes((1 << 20) - len(SECRET))
    env = {**os.environ, "QCOW2SNAP_ALLOW_DIR": f"/nonexistent:{elsewhere}"}
    for i, (args, run_env) in enumerate([
            (["--allow-dir", elsewhere], None),
            ([], env),
            (["--backing-file", elsewhere / "secret.raw"], None)]):
        out = case / f"out{i}.raw"
        proc = run_cli("extract", "-", image, "-o", out, *args, env=run_env)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == expected
    with qcow2snap.open(image, allow_dirs=[elsewhere]) as img, img.open_disk() as disk:
        assert disk.read() == expected


def test_subdirectories_of_the_image_directory_are_inside(places: tuple[Path, Path]) -> None:
    case, _ = places
    (case / "base").mkdir()
    (case / "base" / "disk.raw").write_bytes(b"inside" * 100)
    image = overlay(case, "base/disk.raw")
    with qcow2snap.open(image) as img, img.open_disk() as disk:
        assert disk.read(600) == b"inside" * 100


def test_info_shows_the_resolved_chain_and_what_is_not_followed(
        places: tuple[Path, Path], fixture_dir: Path) -> None:
    case, elsewhere = places
    (case / "link.raw").symlink_to(elsewhere / "secret.raw")
    image = overlay(case, "link.raw")
    proc = run_cli("info", "--json", image)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    [link] = info["backing-chain"]
    assert link["named"] == "link.raw"
    assert link["filename"] == os.fspath(case / "link.raw")
    assert link["resolved"] == os.fspath(elsewhere / "secret.raw")
    assert link["followed"] is False
    assert "not followed" in link["reason"]
    assert "format" not in link and "virtual-size" not in link
    text = run_cli("info", image).stdout
    assert f"    1: link.raw -> {elsewhere / 'secret.raw'}: NOT FOLLOWED: " in text
    allowed = json.loads(run_cli("info", "--json", "--allow-dir", elsewhere, image).stdout)
    assert allowed["backing-chain"] == [{
        "filename": os.fspath(case / "link.raw"), "named": "link.raw",
        "resolved": os.fspath(elsewhere / "secret.raw"), "followed": True, "format": "raw",
        "virtual-size": len(SECRET)}]
    # a chain within the directory is followed to its end
    chain = json.loads(run_cli("info", "--json",
                               fixture_path(fixture_dir, "backing-chain")).stdout)["backing-chain"]
    assert [(c["named"], c["followed"], c["format"]) for c in chain] == [
        ("backing-chain.base.qcow2", True, "qcow2")]


def test_data_file_outside_the_directory_is_not_followed(places: tuple[Path, Path]) -> None:
    case, elsewhere = places
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    data_file = elsewhere / "vm.data"
    image = case / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data_file},data_file_raw=on", image, "1M"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 0x41 0 64k", image], check=True,
                   capture_output=True)
    proc = run_cli("extract", "-", image, "-o", case / "out.raw")
    assert proc.returncode == CompanionRefusedError.exit_code, proc.stderr
    assert proc.stderr.startswith(f"qcow2snap: error: {image}: data file '{data_file}' is "
                                  f"outside the image's directory {case}: not followed; ")
    assert f"--data-file {data_file}" in proc.stderr
    assert not (case / "out.raw").exists()
    proc = run_cli("extract", "-", image, "-o", case / "out.raw", "--data-file", data_file)
    assert proc.returncode == 0, proc.stderr
    assert (case / "out.raw").read_bytes()[:65536] == b"\x41" * 65536


def _unallocate_first_vm_state_cluster(path: Path) -> int:
    """Zero the L2 entry of the first VM-state cluster of snapshot 1;
    returns its offset in the VM state stream (0)."""
    with qcow2snap.open(path) as image:
        sn = image.snapshots[0]
        start = image.vm_state_offset(sn)
        first = next(image.extents(sn, start, sn.vm_state_size))
        host = first.host_offset
        l1 = (sn.l1_table_offset, sn.l1_size)
    data = bytearray(path.read_bytes())
    lay = Layout(bytes(data))
    for offset, entry, _ in lay.l2_entries(*l1):
        if entry & 0x00FFFFFFFFFFFE00 == host:
            data[offset:offset + 8] = bytes(8)
            break
    else:
        raise AssertionError("VM-state cluster not found")
    path.write_bytes(data)
    return 0


def test_vm_state_is_never_read_from_a_backing_file(places: tuple[Path, Path],
                                                    fixture_dir: Path) -> None:
    """QEMU keeps no VM state in backing files: an unallocated VM-state
    cluster reads as zeros, even with a backing file that is allowed."""
    case, _ = places
    image = case / "vm.qcow2"
    image.write_bytes(fixture_path(fixture_dir, "savevm").read_bytes())
    with qcow2snap.open(image) as img:   # a backing file that reaches the VM-state area
        vm_state_offset = img.vm_state_offset(img.snapshots[0])
    with open(case / "secret.raw", "wb") as f:
        f.seek(vm_state_offset)
        f.write(SECRET * 8)
    qemu_img = require_tool("qemu-img")
    subprocess.run([qemu_img, "rebase", "-u", "-f", "qcow2", "-b", "secret.raw", "-F", "raw",
                    image], check=True)
    _unallocate_first_vm_state_cluster(image)
    with qcow2snap.open(image) as img:
        sn = img.snapshots[0]
        dump_vm_state(img, sn, case / "state.qevm")
        with img.open_vm_state(sn) as state:
            head = state.read(65536)
    assert head == bytes(65536)
    assert (case / "state.qevm").read_bytes()[:65536] == bytes(65536)
    proc = run_cli("vmstate", "dump", sn.id, image, "-o", case / "state2.qevm", "--no-backing")
    assert proc.returncode == 0, proc.stderr
    assert (case / "state2.qevm").read_bytes() == (case / "state.qevm").read_bytes()
    assert SECRET[:12] not in (case / "state.qevm").read_bytes()


# ---------------------------------------------------------------------------
# outputs that -f must not replace
# ---------------------------------------------------------------------------

def test_force_never_replaces_inputs(places: tuple[Path, Path], fixture_dir: Path) -> None:
    case, _ = places
    for name in ("backing-chain", "backing-chain.base"):
        src = fixture_dir / f"{name}.qcow2"
        (case / src.name).write_bytes(src.read_bytes())
    image = case / "backing-chain.qcow2"
    base = case / "backing-chain.base.qcow2"
    os.link(base, case / "base-hardlink.qcow2")
    before = {p: sha256_file(p) for p in (image, base)}
    for target, what in ((image, "the source image"),
                         (base, f"backing file {base}"),
                         (case / "base-hardlink.qcow2", f"backing file {base}")):
        proc = run_cli("extract", "-f", "-", image, "-o", target)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == (f"qcow2snap: error: {target}: refusing to write over {what}"
                               + ("" if what == "the source image" else
                                  ", which this extraction reads; choose another output")
                               + "\n")
    assert {p: sha256_file(p) for p in (image, base)} == before
    with qcow2snap.open(image) as img, pytest.raises(OutputExistsError):
        extract(img, None, base, overwrite=True)


def test_force_never_replaces_the_data_file(places: tuple[Path, Path],
                                            fixture_dir: Path) -> None:
    case, _ = places
    for name in ("data-file.qcow2", "data-file.data"):
        (case / name).write_bytes((fixture_dir / name).read_bytes())
    data_file = case / "data-file.data"
    before = sha256_file(data_file)
    proc = run_cli("extract", "-f", "-", case / "data-file.qcow2", "-o", data_file)
    assert proc.returncode == 1
    assert "refusing to write over the image's data file" in proc.stderr
    assert sha256_file(data_file) == before


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_force_never_replaces_special_files(kind: str, tmp_path: Path,
                                            fixture_dir: Path) -> None:
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
        what = "a FIFO"
    else:
        try:  # a device node of the test's own (/dev/null itself must never be at risk)
            os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
        what = "a character device"
    proc = run_cli("extract", "-f", "-", fixture_path(fixture_dir, "v3-basic"), "-o", target,
                   timeout=20)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"qcow2snap: error: {target}: is {what}; outputs are written as "
                           f"regular files and never replace {what} (qemu-img: \"Cannot grow "
                           f"device files\"); choose another output\n")
    assert not target.is_file() and target.exists()


# ---------------------------------------------------------------------------
# evidence stays untouched: atime, FIFOs, terminals
# ---------------------------------------------------------------------------

def _atime_is_updated_here(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, (1_000_000, 2_000_000))
    with open(probe, "rb") as f:
        f.read()
    return probe.stat().st_atime_ns != 1_000_000 * 10**9


def test_reading_never_changes_atime_of_image_or_companions(
        places: tuple[Path, Path]) -> None:
    """The format probe of a backing file without a format extension used a
    plain open(): reading the evidence changed its atime."""
    case, _ = places
    if not _atime_is_updated_here(case):
        pytest.skip("this file system does not update atime on reads (noatime)")
    (case / "base.raw").write_bytes(b"base" * 1024)
    qemu_img = require_tool("qemu-img")
    image = case / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw",
                    image, "1M"], check=True)
    # hide the backing-format extension, so that the format is probed
    data = bytearray(image.read_bytes())
    rename_extension(0xE2792ACA, new_type=0x12345678)(data, Layout(bytes(data)))
    image.write_bytes(data)
    with qcow2snap.open(image) as img:
        assert img.backing_format is None
    files = (image, case / "base.raw")
    for path in files:
        os.utime(path, (1_000_000, 2_000_000))
    for args in (["info", image], ["extract", "-", image, "-o", case / "out.raw"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    assert [p.stat().st_atime_ns for p in files] == [1_000_000 * 10**9] * 2


def test_a_fifo_as_image_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "image.qcow2"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = run_cli("info", fifo, timeout=20)
    assert time.monotonic() - start < 15
    assert proc.returncode == 1
    assert proc.stderr == (f"qcow2snap: error: not a regular file or block device (a FIFO): "
                           f"{fifo}\n")
    with pytest.raises(OSError, match="not a regular file or block device"):
        qcow2snap.open(fifo)


HOSTILE_NAME = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\u202eevil\x9b1m"
ESCAPED_NAME = "\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mred\\u202eevil\\x9b1m"


def test_names_from_the_image_never_reach_the_terminal_raw(fixture_copy: object,
                                                           tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")  # type: ignore[operator]
    with qcow2snap.open(path, "r+") as image:
        image.create_snapshot(HOSTILE_NAME)
    for args in (["list", path], ["info", path], ["list", path, path]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\x9b" not in proc.stdout
        assert "\x07" not in proc.stdout and "\u202e" not in proc.stdout
        assert ESCAPED_NAME in proc.stdout
    listed = json.loads(run_cli("list", "--json", path).stdout)
    assert listed[-1]["name"] == HOSTILE_NAME                # JSON keeps the exact name
    proc = run_cli("vmstate", "dump", HOSTILE_NAME, path, "-o", tmp_path / "x")
    assert proc.returncode == NoVMStateError.exit_code
    assert "\x1b" not in proc.stderr and ESCAPED_NAME in proc.stderr
    proc = run_cli("delete", HOSTILE_NAME, path)
    assert proc.returncode == 0 and ESCAPED_NAME in proc.stdout and "\x1b" not in proc.stdout


def test_tiny_file_system_gives_one_line(tmp_path: Path, fixture_dir: Path) -> None:
    """ENOSPC during a raw extraction ended in 'BufferError: cannot close
    exported pointers exist', hiding the real error."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # root can mount one: there it is required like QEMU's tools
        missing("a tmpfs mount", f"mount failed: {proc.stderr.strip()}",
                REQUIRE_QEMU if os.geteuid() == 0 else None)
    try:
        for fmt in ("raw", "qcow2"):
            out = mount / f"disk.{fmt}"
            proc = run_cli("extract", "-", fixture_path(fixture_dir, "v3-basic"), "-o", out,
                           "-O", fmt)
            assert proc.returncode == 1, proc.stderr
            assert proc.stderr == (f"qcow2snap: error: {out}: writing the output failed: No "
                                   f"space left on device; nothing was left under that name\n")
            assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", mount], check=False)
