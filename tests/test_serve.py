"""``qcow2snap serve``: a snapshot's disk over NBD through the real nbdkit,
read by QEMU and libnbd's tools.

Each served export is checked against qcow2snap's own outputs: ``qemu-img
convert`` and ``nbdcopy`` from the NBD URI equal ``qcow2snap extract``
(nbdcopy's copy sparse), and ``qemu-img map`` / ``nbdinfo --map`` of the
export show data, zeros and holes exactly where ``qcow2snap map`` does.
Two clients at once read correctly, a write is refused, the image's bytes
and mtime stay as they were, and SIGTERM stops nbdkit and removes the
socket; QEMU opens the export for the documented boot line (snapshot=on).
Needs nbdkit, its Python plugin and nbdinfo/nbdcopy (libnbd-bin):
skipped without them unless ``QCOW2SNAP_REQUIRE_NBD=1`` (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import FIXTURES_BY_NAME, sha256_file
from helpers import cli_argv, invoke, missing, require_tool, run_cli

REQUIRE_NBD = "QCOW2SNAP_REQUIRE_NBD"


@pytest.fixture(scope="module")
def nbd_tools() -> dict[str, str]:
    tools = {}
    for name in ("nbdkit", "nbdinfo", "nbdcopy"):
        path = shutil.which(name)
        if path is None:
            missing(name, "it is not installed (apt-get install nbdkit nbdkit-plugin-python "
                          "libnbd-bin)", REQUIRE_NBD)
        tools[name] = path
    if subprocess.run([tools["nbdkit"], "python", "--dump-plugin"], capture_output=True,
                      check=False).returncode != 0:
        missing("nbdkit's Python plugin", "it is not installed (nbdkit-plugin-python)",
                REQUIRE_NBD)
    return tools


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


class Served:
    def __init__(self, uri: str, proc: subprocess.Popen[str], nbdkit_pid: int) -> None:
        self.uri = uri
        self.proc = proc
        self.nbdkit_pid = nbdkit_pid


@contextmanager
def serving(*args: str | os.PathLike[str], env: dict[str, str] | None = None
            ) -> Iterator[Served]:
    """``qcow2snap serve ARGS --socket S`` in a process until the block
    ends; then SIGTERM, which must stop nbdkit, remove S and exit 0."""
    sockdir = tempfile.mkdtemp(prefix="q2s-", dir="/tmp")   # sun_path is short
    sock = os.path.join(sockdir, "nbd.sock")
    proc = subprocess.Popen(cli_argv("serve", *args, "--socket", sock), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env if env is not None else os.environ.copy())
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None:
                pytest.fail(f"serve exited {proc.returncode}: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("nbdkit did not create its socket within 30 s")
            time.sleep(0.05)
        children = _children(proc.pid)
        assert len(children) == 1, children
        served = Served(f"nbd+unix:///?socket={sock}", proc, children[0])
        yield served
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not os.path.exists(sock)
        with pytest.raises(ProcessLookupError):
            os.kill(served.nbdkit_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


def _ranges(items: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Adjacent runs of one kind merged."""
    out: list[tuple[int, int, str]] = []
    for start, length, kind in items:
        if length == 0:
            continue
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((start, length, kind))
    return out


def _qcow2snap_map(image: Path, snapshot: str, env: dict[str, str]) -> list[tuple[int, int, str]]:
    proc = run_cli("map", "--json", snapshot, image, env=env)
    assert proc.returncode == 0, proc.stderr
    return _ranges([(e["start"], e["length"],
                     "data" if e["data"] else "zero" if e["present"] else "hole")
                    for e in json.loads(proc.stdout)["map"]])


def _nbdinfo_map(nbdinfo: str, uri: str) -> list[tuple[int, int, str]]:
    out = subprocess.run([nbdinfo, "--map", "--json", uri], capture_output=True, text=True,
                         check=True).stdout
    kinds = {0: "data", 2: "zero", 3: "hole"}
    return _ranges([(e["offset"], e["length"], kinds[e["type"]]) for e in json.loads(out)])


def _qemu_map(qemu_img: str, uri: str) -> list[tuple[int, int, str]]:
    """qemu-img map of the raw export: QEMU's NBD client reads NBD_STATE_HOLE
    as no data, NBD_STATE_ZERO as zero."""
    out = subprocess.run([qemu_img, "map", "--output=json", "-f", "raw", uri],
                         capture_output=True, text=True, check=True).stdout
    return _ranges([(e["start"], e["length"],
                     "hole" if not e["data"] else "zero" if e["zero"] else "data")
                    for e in json.loads(out)])


def _extract(image: Path, snapshot: str, out: Path, env: dict[str, str]) -> Path:
    proc = run_cli("extract", snapshot, image, "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    return out


CASES = [
    ("backing-chain", "1"),       # holes, zero clusters, data from the backing file
    ("backing-chain", "-"),
    ("compressed-zlib", "s1"),
    ("compressed-zstd", "s2"),
    ("extended-l2", "s1"),        # zero subclusters
    ("resized-shrink", "at-64M"),  # a snapshot larger than the active layer
    ("resized-grow", "at-32M"),   # and one smaller
    ("luks", "s1"),               # encrypted: the passphrase from the environment
]


@pytest.mark.parametrize(("name", "snapshot"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_export_equals_extract_and_map(nbd_tools: dict[str, str], qemu_img: str,
                                       fixture_copy, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       name: str, snapshot: str) -> None:
    image = fixture_copy(name)
    env = os.environ.copy()
    secret = FIXTURES_BY_NAME[name].get("secret")
    if secret:
        env["QCOW2SNAP_PASSPHRASE"] = secret
    before = (sha256_file(image), os.stat(image).st_mtime_ns)
    expected = _extract(image, snapshot, tmp_path / "extract.raw", env)
    with serving(snapshot, image, env=env) as served:
        if secret:   # neither on nbdkit's command line nor in its environment (the
            # secret, "qcow2snap", is in paths: look for it as a whole value)
            for what in ("cmdline", "environ"):
                words = Path(f"/proc/{served.nbdkit_pid}/{what}").read_bytes().split(b"\0")
                assert not [w for w in words
                            if w.split(b"=")[-1] == secret.encode() or b"PASSPHRASE" in w]
        converted = tmp_path / "convert.raw"
        subprocess.run([qemu_img, "convert", "-f", "raw", served.uri, "-O", "raw",
                        converted], check=True)
        assert converted.read_bytes() == expected.read_bytes()
        copied = tmp_path / "nbdcopy.raw"
        subprocess.run([nbd_tools["nbdcopy"], served.uri, copied], check=True)
        assert copied.read_bytes() == expected.read_bytes()
        reference = _qcow2snap_map(image, snapshot, env)
        assert _nbdinfo_map(nbd_tools["nbdinfo"], served.uri) == reference
        assert _qemu_map(qemu_img, served.uri) == reference
        data = sum(length for _, length, kind in reference if kind == "data")
        # sparse: nbdcopy wrote no more than the data (+ a block per run of slack)
        assert os.stat(copied).st_blocks * 512 <= data + 64 * 1024 * len(reference)
    assert (sha256_file(image), os.stat(image).st_mtime_ns) == before


def test_two_clients_at_once_and_writes_refused(nbd_tools: dict[str, str], qemu_img: str,
                                                qemu_io: str, fixture_copy,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    image = fixture_copy("compressed-zlib")
    before = (sha256_file(image), os.stat(image).st_mtime_ns)
    expected = _extract(image, "s2", tmp_path / "extract.raw", os.environ.copy())
    with serving("s2", image) as served:
        assert subprocess.run([nbd_tools["nbdinfo"], "--can", "multi-conn", served.uri],
                              check=False).returncode == 0
        assert subprocess.run([nbd_tools["nbdinfo"], "--is", "read-only", served.uri],
                              check=False).returncode == 0

        def convert(i: int) -> bytes:
            out = tmp_path / f"client{i}.raw"
            subprocess.run([qemu_img, "convert", "-f", "raw", served.uri, "-O", "raw", out],
                           check=True)
            return out.read_bytes()

        with ThreadPoolExecutor(3) as pool:
            copies = list(pool.map(convert, range(3)))
        assert all(c == expected.read_bytes() for c in copies)
        write = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0xaa 0 512", served.uri],
                               capture_output=True, text=True, check=False)
        assert write.returncode != 0, write.stdout
        # the export still reads as before
        assert subprocess.run([qemu_io, "-r", "-f", "raw", "-c", "read -P 0xaa 0 512",
                               served.uri], capture_output=True, text=True,
                              check=False).stdout.count("Pattern verification failed") == 1
    assert (sha256_file(image), os.stat(image).st_mtime_ns) == before


def test_missing_nbdkit_is_one_line(fixture_copy, tmp_path: Path,  # type: ignore[no-untyped-def]
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = invoke("serve", "s1", fixture_copy("compressed-zlib"), "--socket",
                    tmp_path / "s.sock")
    assert result.exit_code == 15
    assert result.stderr.count("\n") == 1
    assert "nbdkit-plugin-python" in result.stderr


@pytest.mark.parametrize("args", [(), ("--socket", "s.sock", "--port", "10809")])
def test_exactly_one_listener(args: tuple[str, ...], fixture_copy) -> None:  # type: ignore[no-untyped-def]
    result = invoke("serve", "s1", fixture_copy("compressed-zlib"), *args)
    assert result.exit_code == 2
    assert "exactly one of --socket PATH and --port N" in result.stderr


def test_snapshot_refused_before_nbdkit_starts(fixture_copy) -> None:  # type: ignore[no-untyped-def]
    result = invoke("serve", "nope", fixture_copy("compressed-zlib"), "--socket", "s.sock")
    assert result.exit_code in (6, 15)   # 15 only where nbdkit is missing


def test_qemu_system_opens_the_export_with_snapshot_on(nbd_tools: dict[str, str],
                                                       fixture_copy) -> None:  # type: ignore[no-untyped-def]
    """The documented boot line: QEMU opens the export under a temporary
    overlay (-S: no guest code runs), and the image is unchanged."""
    qemu = require_tool("qemu-system-x86_64")
    image = fixture_copy("backing-chain")
    before = (sha256_file(image), os.stat(image).st_mtime_ns)
    with serving("1", image) as served:
        proc = subprocess.run(
            [qemu, "-S", "-display", "none", "-nodefaults", "-monitor", "stdio",
             "-drive", f"file={served.uri},format=raw,snapshot=on,if=virtio"],
            input="info block\nquit\n", capture_output=True, text=True, timeout=60,
            check=False)
        assert proc.returncode == 0, proc.stderr
        assert served.uri.split("socket=")[1] in proc.stdout
    assert (sha256_file(image), os.stat(image).st_mtime_ns) == before
