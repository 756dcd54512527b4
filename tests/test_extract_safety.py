"""Extraction never leaves a half-written file under the final name.

Interrupts (Ctrl-C, SIGTERM, SIGHUP), a full disk (a file-size limit stands
in for it, so the test needs no small filesystem), damaged source images and
a closed stdout must all end in one clean error with no output file, no
temporary file left behind, an existing output untouched, and the source
image unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME
from helpers import require_strace, run_cli

import qcow2snap
from qcow2snap.errors import CorruptImageError
from qcow2snap.ops.extract import OutputError, extract
from qcow2snap.reader import ExtentKind


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Interrupt:
    """A progress callback that presses Ctrl-C half-way."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if done >= total // 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("name", "out_format", "compress"), [
    ("v3-basic", "raw", None),
    ("compressed-zlib", "raw", None),
    ("v3-basic", "qcow2", None),
    ("v3-basic", "qcow2", "zstd"),
])
def test_ctrl_c_leaves_no_output(fixture_copy: Any, tmp_path: Path, name: str,
                                 out_format: str, compress: str | None) -> None:
    path = fixture_copy(name)
    before = _sha256(path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "disk.img"
    interrupt = _Interrupt()
    with qcow2snap.open(path) as image, pytest.raises(KeyboardInterrupt):
        extract(image, image.snapshots[0], out, format=out_format,  # type: ignore[arg-type]
                compress=compress, progress=interrupt)  # type: ignore[arg-type]
    assert interrupt.calls > 0
    assert os.listdir(outdir) == []          # neither the output nor its temporary file
    assert _sha256(path) == before


def test_ctrl_c_keeps_an_existing_output(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    out = tmp_path / "disk.raw"
    out.write_bytes(b"the previous extraction")
    with qcow2snap.open(path) as image, pytest.raises(KeyboardInterrupt):
        extract(image, "first", out, overwrite=True, progress=_Interrupt())
    assert out.read_bytes() == b"the previous extraction"
    assert sorted(os.listdir(tmp_path)) == ["disk.raw", path.name]


def _extract_signalled(path: Path, output: Path, signum: int,
                       disposition: Any = signal.SIG_DFL) -> subprocess.CompletedProcess[str]:
    """``qcow2snap extract first PATH -o OUTPUT`` whose progress hook sends
    ``signum`` to the process itself at its first update (a real signal,
    delivered by the kernel while the CLI copies).  The process starts with
    ``disposition`` for it, whatever the test runner inherited (a shell
    ignores SIGINT in background jobs, nohup ignores SIGHUP)."""
    script = (
        "import os, signal, sys\n"
        "import qcow2snap.ops.extract as ex\n"
        "real = ex.extract\n"
        "def extract(*a, progress=None, **k):\n"
        "    def hook(done, total):\n"
        "        if done:\n"
        f"            os.kill(os.getpid(), {int(signum)})\n"
        "    return real(*a, progress=hook, **k)\n"
        "ex.extract = extract\n"
        "from qcow2snap.cli import main\n"
        "main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", script, "extract", "first", os.fspath(path),
                           "-o", os.fspath(output)],
                          capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=lambda: signal.signal(signum, disposition))


@pytest.mark.parametrize(("signum", "status", "message"), [
    (signal.SIGINT, 130, "qcow2snap: interrupted\n"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "qcow2snap: terminated by SIGTERM\n"),
    (signal.SIGHUP, 128 + signal.SIGHUP, "qcow2snap: terminated by SIGHUP\n"),
], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_to_the_cli_leaves_no_output(fixture_copy: Any, tmp_path: Path, signum: int,
                                            status: int, message: str) -> None:
    """Ctrl-C, kill (SIGTERM) and a closed terminal (SIGHUP) all unwind and
    clean up; the status is the shell's 128 + signal number."""
    path = fixture_copy("v3-basic")
    outdir = tmp_path / "out"
    outdir.mkdir()
    proc = _extract_signalled(path, outdir / "disk.raw", signum)
    # exit status, one line, and neither the output nor its temporary file
    assert (proc.returncode, proc.stderr, os.listdir(outdir)) == (status, message, [])


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_an_ignored_signal_stays_ignored(fixture_copy: Any, tmp_path: Path,
                                         signum: int) -> None:
    """``nohup qcow2snap extract ...``: a hangup the caller chose to ignore
    does not stop the copy (the handler that cleans up on SIGHUP / SIGTERM
    is installed only over the default disposition)."""
    path = fixture_copy("v3-basic")
    out = tmp_path / "disk.raw"
    proc = _extract_signalled(path, out, signum, signal.SIG_IGN)
    assert (proc.returncode, proc.stderr) == (0, "")
    first = next(s for s in FIXTURES_BY_NAME["v3-basic"]["snapshots"] if s["name"] == "first")
    assert _sha256(out) == first["sha256"]
    assert sorted(os.listdir(tmp_path)) == sorted(["disk.raw", path.name])


def _limit_file_size() -> None:
    # Stand-in for a full disk: writes past 256 KiB fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


@pytest.mark.parametrize("out_format", ["raw", "qcow2"])
def test_full_disk_leaves_no_output(fixture_copy: Any, tmp_path: Path, out_format: str) -> None:
    path = fixture_copy("v3-basic")
    outdir = tmp_path / "out"
    outdir.mkdir()
    proc = run_cli("extract", "first", path, "-o", outdir / "disk.img", "-O", out_format,
                   preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"qcow2snap: error: {outdir / 'disk.img'}: writing the output "
                           f"failed: File too large; nothing was left under that name\n")
    assert os.listdir(outdir) == []


def test_missing_output_directory_is_a_clean_error(fixture_dir: Path, tmp_path: Path) -> None:
    source = fixture_dir / FIXTURES_BY_NAME["v3-basic"]["file"][:-3]
    with qcow2snap.open(source) as image, pytest.raises(OutputError) as info:
        extract(image, "first", tmp_path / "no" / "such" / "dir" / "disk.raw")
    assert str(info.value) == (f"{tmp_path}/no/such/dir/disk.raw: cannot create the output in "
                               f"{tmp_path}/no/such/dir: No such file or directory")


def _compressed_extent(path: Path) -> tuple[str, int]:
    with qcow2snap.open(path) as image:
        for snapshot in image.snapshots:
            for extent in image.extents(snapshot):
                if extent.kind is ExtentKind.COMPRESSED:
                    assert extent.host_offset is not None
                    return snapshot.id, extent.host_offset
    raise AssertionError("no compressed cluster")


@pytest.mark.parametrize("name", ["compressed-zlib", "compressed-zstd"])
@pytest.mark.parametrize("out_format", ["raw", "qcow2"])
def test_damaged_compressed_cluster_leaves_no_output(fixture_copy: Any, tmp_path: Path,
                                                     name: str, out_format: str) -> None:
    path = fixture_copy(name)
    snapshot_id, host_offset = _compressed_extent(path)
    with open(path, "r+b") as f:
        f.seek(host_offset)
        f.write(b"\xff" * 64)                 # neither a deflate nor a zstd stream
    before = _sha256(path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with qcow2snap.open(path) as image, pytest.raises(CorruptImageError) as info:
        extract(image, image.find_snapshot(snapshot_id, by="id"), outdir / "disk.img",
                format=out_format)  # type: ignore[arg-type]
    assert "compressed cluster" in str(info.value)
    assert os.listdir(outdir) == []
    assert _sha256(path) == before


def test_damaged_l2_pointer_leaves_no_output(fixture_copy: Any, tmp_path: Path) -> None:
    """An L2 table offset that is not cluster-aligned: QEMU's 'L2 table offset
    ... unaligned' corruption, found half-way through the copy."""
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path) as image:
        snapshot = image.snapshots[0]
        l1_offset = snapshot.l1_table_offset
        entry = int.from_bytes(image.pread(l1_offset, 8), "big")
    assert entry
    with open(path, "r+b") as f:
        f.seek(l1_offset)
        f.write((entry + 512).to_bytes(8, "big"))
    before = _sha256(path)
    out = tmp_path / "disk.raw"
    with qcow2snap.open(path) as image, pytest.raises(CorruptImageError):
        extract(image, image.snapshots[0], out)
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert _sha256(path) == before


def test_damaged_disk_size_is_refused(fixture_copy: Any, tmp_path: Path) -> None:
    """A snapshot whose extra data claims an absurd disk size (an L1 table
    beyond QEMU's 32 MiB limit) is refused, not extracted into petabytes."""
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path) as image:
        snapshot = image.snapshots[0]
        assert snapshot.extra_data_size >= 16
        disk_size_offset = snapshot.entry_offset + 48
    with open(path, "r+b") as f:
        f.seek(disk_size_offset)
        f.write((1 << 62).to_bytes(8, "big"))
    out = tmp_path / "disk.raw"
    with qcow2snap.open(path) as image, pytest.raises(CorruptImageError) as info:
        extract(image, image.snapshots[0], out)
    assert str(info.value) == (f"Snapshot disk size too large: snapshot 1 (first) claims "
                               f"{1 << 62} bytes")
    assert not out.exists()


def test_closed_stdout_is_not_a_traceback(fixture_dir: Path) -> None:
    """`qcow2snap list ... | head`: the reader goes away; click's EPIPE
    handling ends the run with status 1 and nothing on stderr."""
    source = fixture_dir / FIXTURES_BY_NAME["many-snapshots"]["file"][:-3]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run_cli("list", source, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_copy_falls_back_to_pwrite_where_copy_file_range_cannot(
        fixture_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range between file systems (EXDEV on older kernels) or on
    file systems without it: the copier switches to pwrite, same output."""
    calls: list[int] = []

    def refuse(*args: Any) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    entry = FIXTURES_BY_NAME["v3-basic"]
    source = fixture_dir / entry["file"][:-3]
    out = tmp_path / "disk.raw"
    with qcow2snap.open(source) as image:
        extract(image, "first", out)
    assert len(calls) == 1                   # tried once, then pwrite for the rest
    snapshot = next(s for s in entry["snapshots"] if s["name"] == "first")
    assert _sha256(out) == snapshot["sha256"]
    assert out.stat().st_blocks * 512 < out.stat().st_size   # still sparse


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib-only"])
def test_deflate_clusters_decode_with_and_without_isal(
        fixture_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isal: bool) -> None:
    """ISA-L speeds up inflate; without it (no wheel for the platform) zlib,
    QEMU's own library, decodes the same bytes."""
    from qcow2snap import reader
    if not isal:
        monkeypatch.setattr(reader, "_isal_zlib", None)
    else:
        assert reader._load_isal() is not None, "isal is a dependency"
    entry = FIXTURES_BY_NAME["compressed-zlib"]
    source = fixture_dir / entry["file"][:-3]
    snapshot = entry["snapshots"][0]
    out = tmp_path / "disk.raw"
    with qcow2snap.open(source) as image:
        extract(image, image.find_snapshot(snapshot["id"], by="id"), out)
    assert _sha256(out) == snapshot["sha256"]


@pytest.mark.parametrize("first_failing_read", [1, 2, 3])
def test_a_read_error_on_the_image_names_the_image(fixture_copy: Any, tmp_path: Path,
                                                   first_failing_read: int) -> None:
    """An EIO reading the evidence was reported as a failure to write the
    output ("OUT: writing the output failed: Input/output error")."""
    strace = require_strace()
    path = fixture_copy("v3-basic")
    outdir = tmp_path / "out"
    outdir.mkdir()
    proc = run_cli("extract", "first", path, "-o", outdir / "disk.raw",
                   prefix=[strace, "-f", "-qq", "-o", "/dev/null", "-P", os.fspath(path),
                           "-e", "trace=pread64",
                           "-e", f"inject=pread64:error=EIO:when={first_failing_read}+"])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"qcow2snap: error: Input/output error: {path}\n"
    assert os.listdir(outdir) == []
