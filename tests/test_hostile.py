"""Hostile images: constructions made to take memory, time or files they
must not get (docs/security.md).

Every image here is built in the test by patching a good fixture.  Each
reading command runs in its own process under a data-segment limit
(``RLIMIT_DATA``: heap and every private writable mapping) of
:data:`MEMORY_BOUND` and a time limit, and its peak RSS is read back with
``wait4``: an allocation past the bound fails the process, so the bound is
enforced, not estimated.  The same bound is applied to the whole corpus of
damaged images in ``test_damage.py``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import fixture_path
from helpers import require_tool
from test_damage import CASES, Layout, build_case

import qcow2snap
from qcow2snap.errors import CorruptImageError

#: What any reading command may take, whatever the image declares.
MEMORY_BOUND = 256 << 20
TIME_BOUND = 60.0


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes


#: Runs in the child: the peak RSS must be the child's own (VmHWM of the
#: process image after exec; ru_maxrss would include the forked copy of
#: the test process before the exec).
_MEASURE = r"""
import atexit, sys
def report(path=sys.argv[1]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(l for l in status if l.startswith("VmHWM:")).split()[1])
atexit.register(report)
script, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
if script == "-m":
    from qcow2snap.cli import main
    sys.argv[0] = "qcow2snap"
    main(sys.argv[1:])
else:
    exec(compile(script, "<driver>", "exec"))
"""


def run_bounded(*args: str | os.PathLike[str], cwd: Path | None = None,
                env: dict[str, str] | None = None, timeout: float = TIME_BOUND,
                script: str = "-m") -> Run:
    """``qcow2snap ARGS`` (or the Python ``script`` with ARGS in sys.argv)
    in a child process under the memory bound, with its peak RSS."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_BOUND, MEMORY_BOUND))

    with tempfile.NamedTemporaryFile(prefix="hwm-") as hwm:
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, hwm.name, script,
                                 *map(os.fspath, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                env=env, preexec_fn=limit)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"qcow2snap {args} did not finish within {timeout} s") from None
        peak_kib = int(Path(hwm.name).read_text() or 0)
    assert peak_kib, "the child did not report its peak RSS"
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
               peak_kib * 1024)


def assert_bounded(run: Run) -> None:
    assert "Traceback" not in run.stderr and "MemoryError" not in run.stderr, run.stderr
    assert run.max_rss < MEMORY_BOUND, f"peak RSS {run.max_rss >> 20} MiB"


def one_error_line(run: Run) -> str:
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2snap: error: "), run.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# decompression bombs
# ---------------------------------------------------------------------------

def _zstd_frame(content: bytes | None, *, declared: int | None) -> bytes:
    """A zstd frame of ``content`` (or ``declared`` bytes of zeros,
    streamed), declaring its size only when ``declared`` is given."""
    out = io.BytesIO()
    size = declared if declared is not None else -1
    with zstandard.ZstdCompressor(level=1).stream_writer(out, size=size,
                                                         closefd=False) as writer:
        if content is not None:
            writer.write(content)
        else:
            block = bytes(16 << 20)
            for _ in range(size // len(block)):
                writer.write(block)
    return out.getvalue()


def _raw_deflate(content: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -12, 9)
    return c.compress(content) + c.flush()


def with_compressed_cluster(fixture_dir: Path, fixture: str, payload: bytes,
                            tmp_path: Path) -> Path:
    """``fixture`` with its first compressed cluster's L2 entry pointed at
    ``payload``, appended sector-aligned at the end of the file."""
    data = bytearray(fixture_path(fixture_dir, fixture).read_bytes())
    lay = Layout(bytes(data))
    entry_offset, _, _ = lay.first_l2(lambda e, b: bool(e & (1 << 62)))
    host = (len(data) + 511) & ~511
    data += bytes(host - len(data)) + payload
    csize_shift = 62 - (lay.cluster_bits - 8)
    sectors = (len(payload) + 511) // 512
    assert sectors - 1 < 1 << (lay.cluster_bits - 8), "payload too large for one descriptor"
    struct.pack_into(">Q", data, entry_offset, (1 << 62) | ((sectors - 1) << csize_shift) | host)
    path = tmp_path / "bomb.qcow2"
    path.write_bytes(data)
    return path


BOMBS = {
    # a 65 KiB frame that declares (and holds) 2 GiB: one-shot decoding
    # allocated all of it, in every worker thread
    "zstd-declares-2GiB": ("compressed-zstd", lambda: _zstd_frame(None, declared=2 << 30)),
    # no declared size: only decoding shows the size
    "zstd-undeclared-1MiB": ("compressed-zstd", lambda: _zstd_frame(bytes(1 << 20),
                                                                    declared=None)),
    "zstd-declares-cluster-plus-one": ("compressed-zstd",
                                       lambda: _zstd_frame(bytes(65537), declared=65537)),
    "deflate-1MiB": ("compressed-zlib", lambda: _raw_deflate(bytes(1 << 20))),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_decompression_bomb_is_corruption_in_bounded_memory(bomb: str, fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    fixture, make = BOMBS[bomb]
    path = with_compressed_cluster(fixture_dir, fixture, make(), tmp_path)
    with qcow2snap.open(path) as image, image.open_disk() as disk, \
            pytest.raises(CorruptImageError, match="decompresses to more than one cluster"):
        disk.read()
    for command in (["extract", "-", path, "-o", tmp_path / "out.raw"],
                    ["extract", "-", path, "-o", tmp_path / "out.qcow2", "-O", "qcow2"]):
        run = run_bounded(*command)
        assert_bounded(run)
        assert run.returncode == CorruptImageError.exit_code, run.stderr
        assert "decompresses to more than one cluster (65536 bytes)" in one_error_line(run)
    assert sorted(os.listdir(tmp_path)) == ["bomb.qcow2"]


@pytest.mark.qemu
def test_qemu_refuses_the_zstd_bomb_too(fixture_dir: Path, tmp_path: Path,
                                        qemu_img: str) -> None:
    path = with_compressed_cluster(fixture_dir, "compressed-zstd",
                                   _zstd_frame(None, declared=2 << 30), tmp_path)
    proc = subprocess.run([qemu_img, "convert", "-O", "raw", path, tmp_path / "q.raw"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "Input/output error" in proc.stderr


def test_a_cluster_of_zstd_frames_still_reads(fixture_dir: Path, tmp_path: Path) -> None:
    """The bounded path keeps QEMU's reading of several frames per cluster
    (qcow2_zstd_decompress loops over frames until the cluster is full)."""
    content = bytes(range(256)) * 256
    frames = b"".join(_zstd_frame(content[i:i + 16384], declared=None)
                      for i in range(0, 65536, 16384))
    path = with_compressed_cluster(fixture_dir, "compressed-zstd", frames, tmp_path)
    with qcow2snap.open(path) as image:
        extent = next(e for e in image.extents() if e.kind.value == "compressed")
        with image.open_disk() as disk:
            disk.seek(extent.cluster_guest_offset)
            assert disk.read(65536) == content


# ---------------------------------------------------------------------------
# declared sizes: L1 tables, snapshot tables
# ---------------------------------------------------------------------------

def with_snapshot_copies(fixture_dir: Path, tmp_path: Path, count: int, *,
                         l1_size: int) -> Path:
    """The savevm fixture with ``count`` copies of its first (VM-state)
    snapshot whose L1 tables claim ``l1_size`` entries, each at its own
    offset past the end of the file (they read as zeros): a small file
    declaring ``count`` x ``l1_size`` x 8 bytes of tables."""
    data = bytearray(fixture_path(fixture_dir, "savevm").read_bytes())
    lay = Layout(bytes(data))
    first = lay.snapshot_entries[0]
    extra = lay.u32(first + 36)
    id_len, name_len = lay.u16(first + 12), lay.u16(first + 14)
    template = bytes(data[first:first + 40 + extra + id_len + name_len])
    cs = lay.cluster_size
    table_offset = (len(data) + cs - 1) // cs * cs
    l1_base = table_offset + (64 << 20)
    body = bytearray()
    for i in range(count):
        ident, name = str(i + 1).encode(), f"copy{i}".encode()
        entry = bytearray(template[:40 + extra]) + ident + name
        struct.pack_into(">QIHH", entry, 0, l1_base + i * l1_size * 8, l1_size, len(ident),
                         len(name))
        body += bytes(-len(body) % 8) + entry
    data += bytes(table_offset - len(data)) + body
    struct.pack_into(">IQ", data, 60, count, table_offset)
    path = tmp_path / "l1-bomb.qcow2"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("count", [64, 320])
def test_l1_tables_cost_what_is_read_not_what_is_declared(count: int, fixture_dir: Path,
                                                           tmp_path: Path) -> None:
    """64 snapshots whose L1 tables claim QEMU's maximum of 32 MiB each took
    2 GiB for ``info`` (the run-state column read every table whole, into
    an unbounded cache); 320 ended in a MemoryError."""
    path = with_snapshot_copies(fixture_dir, tmp_path, count, l1_size=0x2000000 // 8)
    assert path.stat().st_size < 4 << 20
    for command in (["info", path], ["info", "--json", path], ["list", path],
                    ["list", "--json", path]):
        run = run_bounded(*command, timeout=30)
        assert_bounded(run)
        assert run.returncode == 0, run.stderr
    listed = json.loads(run_bounded("list", "--json", path).stdout)
    assert len(listed) == count
    assert {s["runstate"] for s in listed} == {None}   # the tables map nothing


def test_extract_through_a_maximal_l1_table_is_bounded(fixture_dir: Path,
                                                       tmp_path: Path) -> None:
    path = with_snapshot_copies(fixture_dir, tmp_path, 2, l1_size=0x2000000 // 8)
    run = run_bounded("extract", "copy0", path, "-o", tmp_path / "out.raw")
    assert_bounded(run)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------------------
# the damaged corpus, under the same bound
# ---------------------------------------------------------------------------

_CORPUS_DRIVER = r"""
import json, os, sys
sys.setrecursionlimit(400)
import qcow2snap
from qcow2snap import describe
from qcow2snap.ops import inspection
from qcow2snap.errors import Qcow2Error
READ = 64 << 20
results = {}
for path in sys.argv[1:]:
    try:
        with qcow2snap.open(path) as image:
            describe.image_info_json(inspection.image_facts(image))
            describe.info_text(inspection.image_facts(image))
            describe.snapshot_table_text(list(inspection.snapshot_facts(image)))
            for layer in [None, *image.snapshots[:8]]:
                try:
                    with image.open_disk(layer) as disk:
                        while disk.tell() < min(disk.size, READ) and disk.read(4 << 20):
                            pass
                except Qcow2Error:
                    pass
            for sn in image.snapshots[:8]:
                if sn.has_vm_state:
                    try:
                        with image.open_vm_state(sn) as state:
                            state.read(READ)
                    except Qcow2Error:
                        pass
        results[path] = "ok"
    except Qcow2Error as exc:
        results[path] = type(exc).__name__
    except MemoryError:
        results[path] = "MemoryError"
print(json.dumps(results))
"""


def test_damaged_corpus_stays_in_bounded_memory(fixture_dir: Path, tmp_path: Path) -> None:
    """Every targeted corruption of test_damage.py (QEMU's iotest 080 and
    more), read the way every reading command reads, in one process under
    the bound: none raises anything but a Qcow2Error, none needs more."""
    paths = []
    for case in CASES:
        data, companions = build_case(case, fixture_dir)
        case_dir = tmp_path / case.id
        case_dir.mkdir()
        for companion in companions:
            shutil.copyfile(companion, case_dir / companion.name)
        path = case_dir / "damaged.qcow2"
        path.write_bytes(data)
        paths.append(os.fspath(path))

    run = run_bounded(*paths, script=_CORPUS_DRIVER, timeout=300)
    assert run.returncode == 0, run.stderr
    assert_bounded(run)
    results: dict[str, Any] = json.loads(run.stdout)
    assert len(results) == len(CASES)
    assert "MemoryError" not in results.values(), [p for p, r in results.items()
                                                   if r == "MemoryError"]


# ---------------------------------------------------------------------------
# backing chains: deep ones are read (iteratively), loops are caught
# ---------------------------------------------------------------------------

def make_chain(directory: Path, depth: int, qemu_img: str, qemu_io: str) -> Path:
    """``depth`` empty overlays (512-byte clusters, 1 MiB) over a base with
    a pattern; the overlays are clones of one made by qemu-img with its
    backing name patched (qemu-img itself takes quadratic time to make
    them, opening the whole chain for each)."""
    base = directory / "l0.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base,
                    "1M"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 0x5a 4096 8192", "-c", "write -P 0xa5 900k 4k",
                    base], check=True, capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
                    "l0.qcow2", "-F", "qcow2", directory / "l1.qcow2", "1M"], check=True,
                   cwd=directory)
    template = bytearray((directory / "l1.qcow2").read_bytes())
    offset, size = struct.unpack_from(">QI", template, 8)
    assert template[offset:offset + size] == b"l0.qcow2"
    for i in range(2, depth + 1):
        name = f"l{i - 1}.qcow2".encode()
        image = bytearray(template)
        image[offset:offset + 32] = name.ljust(32, b"\0")
        struct.pack_into(">I", image, 16, len(name))
        (directory / f"l{i}.qcow2").write_bytes(image)
    return directory / f"l{depth}.qcow2"


@pytest.mark.qemu
def test_deeper_chains_than_qemu_can_read(tmp_path: Path, qemu_img: str,
                                          qemu_io: str) -> None:
    """qemu-img 7.2 reads through ~1,050 backing files and crashes (stack
    overflow) at 1,100; info --backing-chain follows 2,000.  qcow2snap
    stopped at 64; it now reads chains iteratively, to 4,096 images."""
    top = make_chain(tmp_path, 1500, qemu_img, qemu_io)
    expected = tmp_path / "expected.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", tmp_path / "l0.qcow2", expected],
                   check=True)
    run = run_bounded("extract", "-", top, "-o", tmp_path / "out.raw", timeout=120)
    assert_bounded(run)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.raw").read_bytes() == expected.read_bytes()
    with qcow2snap.open(top) as image:
        links = image.backing_chain()
    assert len(links) == 1500 and all(link.followed for link in links)


def test_chain_depth_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    top = make_chain(tmp_path, 12, qemu_img, qemu_io)
    monkeypatch.setattr("qcow2snap.image.MAX_BACKING_CHAIN_DEPTH", 10)
    with qcow2snap.open(top) as image, pytest.raises(
            CorruptImageError, match=r"l3\.qcow2: backing chain longer than 10 images"):
        image.chain()


def test_backing_loop_is_caught_on_its_first_repeat(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    make_chain(tmp_path, 3, qemu_img, qemu_io)
    # l1 -> l0 becomes l1 -> l3: l3 -> l2 -> l1 -> l3 ...
    data = bytearray((tmp_path / "l1.qcow2").read_bytes())
    offset = struct.unpack_from(">Q", data, 8)[0]
    data[offset:offset + 8] = b"l3.qcow2"
    (tmp_path / "l1.qcow2").write_bytes(data)
    with qcow2snap.open(tmp_path / "l3.qcow2") as image:
        with pytest.raises(CorruptImageError,
                           match=r"l1\.qcow2: backing file '.*l3\.qcow2' creates an infinite "
                                 r"loop"):
            image.chain()
        links = image.backing_chain()
    assert [link.followed for link in links] == [True, True, False]
    assert "creates an infinite loop" in (links[-1].reason or "")


# ---------------------------------------------------------------------------
# the VM state: a hostile VM description
# ---------------------------------------------------------------------------

def with_vm_description(fixture_dir: Path, tmp_path: Path, description: bytes) -> Path:
    """A savevm-like snapshot whose VM state is the savevm fixture's stream
    with its VM description (JSON trailer) replaced by ``description``.  The
    stream is written by qemu-io at the VM-state offset of a 64 MiB disk,
    then ``qemu-img snapshot -c`` takes the snapshot and its entry is given
    the stream's size and that disk size."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    with qcow2snap.open(fixture_path(fixture_dir, "savevm")) as image, \
            image.open_vm_state(image.snapshots[0]) as state:
        stream = state.read()
    marker = stream.rfind(b"\x06")
    while not (stream[marker + 5:marker + 6] == b"{"
               and marker + 5 + struct.unpack_from(">I", stream, marker + 1)[0] == len(stream)):
        marker = stream.rfind(b"\x06", 0, marker)
    new = stream[:marker] + b"\x06" + struct.pack(">I", len(description)) + description
    vm_state_offset = 512 << 20          # size_to_l1(64 MiB) << (16 + 13)
    path, source = tmp_path / "vmdesc.qcow2", tmp_path / "stream.bin"
    source.write_bytes(new)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", path,
                    str(vm_state_offset + len(new) + (64 << 10))], check=True)
    subprocess.run([qemu_io, "-c", f"write -s {source} {vm_state_offset} {len(new)}", path],
                   check=True, capture_output=True)
    subprocess.run([qemu_img, "snapshot", "-c", "hostile", path], check=True)
    data = bytearray(path.read_bytes())
    entry = Layout(bytes(data)).snapshot_entries[0]
    struct.pack_into(">I", data, entry + 32, len(new))                    # vm_state_size
    struct.pack_into(">QQQ", data, entry + 40, len(new), 64 << 20, (1 << 64) - 1)
    path.write_bytes(data)
    return path


DESCRIPTIONS = {
    # 1.4 million empty objects: ~25 bytes of Python objects per byte of JSON
    "many-objects": b'{"page_size":4096,"devices":[' + b"{}," * 1_390_000 + b"{}]}",
    # nesting that makes json.loads raise RecursionError (a traceback before)
    "deep-nesting": b'{"page_size":4096,"devices":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.qemu
@pytest.mark.parametrize("kind", sorted(DESCRIPTIONS))
def test_hostile_vm_description(kind: str, fixture_dir: Path, tmp_path: Path) -> None:
    path = with_vm_description(fixture_dir, tmp_path, DESCRIPTIONS[kind])
    listed = run_bounded("list", "--json", path)
    assert_bounded(listed)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["runstate"] is None
    info = run_bounded("vmstate", "info", "--json", "1", path)
    assert_bounded(info)
    assert info.returncode == 0, info.stderr
    state = json.loads(info.stdout)
    assert state["machine-type"] == "pc-i440fx-7.2"
    assert state["complete"] is None and state["ram-size"] > 0   # RAM still walked
    assert state["problem"] == {
        "deep-nesting": "the VM description is nested too deeply",
        "many-objects": "VM description: device '' has no valid 'instance_id'"}[kind]
    dump = run_bounded("vmstate", "dump", "1", path, "-o", tmp_path / "state.qevm")
    assert_bounded(dump)
    assert dump.returncode == 0, dump.stderr


@pytest.mark.qemu
def test_crafted_vm_state_reads_like_the_original(fixture_dir: Path, tmp_path: Path) -> None:
    """The construction itself is sound: with the original description the
    crafted snapshot reads as the fixture's does."""
    with qcow2snap.open(fixture_path(fixture_dir, "savevm")) as image, \
            image.open_vm_state(image.snapshots[0]) as state:
        stream = state.read()
    description = stream[stream.rindex(b'{"page_size"'):]
    path = with_vm_description(fixture_dir, tmp_path, description)
    with qcow2snap.open(path) as image, image.open_vm_state(image.snapshots[0]) as state:
        assert state.read() == stream
    info = json.loads(run_bounded("vmstate", "info", "--json", "1", path).stdout)
    assert info["complete"] is True and info["runstate"] == "prelaunch"
