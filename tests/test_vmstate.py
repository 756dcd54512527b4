"""VM-state forensics: the savevm stream parser (qcow2snap.vmstate), the
memory export (qcow2snap.ops.memory) and the ``vmstate info`` / ``vmstate
memory`` commands.

Oracles: QEMU's own ``dump-guest-memory`` ELF files stored beside the
``savevm-suspended`` fixture (made right after each savevm, see the
manifest), and, where qemu-system-x86_64 is installed, ``loadvm`` +
``dump-guest-memory`` of every snapshot of the other savevm fixtures.
The raw oracle is the ELF's PT_LOADs placed at their physical addresses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path, fixtures_with
from helpers import invoke, require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import CorruptImageError, NoVMStateError, Qcow2Error, UnsupportedImageError
from qcow2snap.ops.extract import OutputExistsError
from qcow2snap.ops.memory import (
    MemoryResult,
    _PageWriter,
    export_memory,
    ram_split,
    snapshot_runstate,
    vm_state_info,
)
from qcow2snap.vmstate import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RamBlock,
    parse_stream,
    read_runstate,
)
from qcow2snap.vmstate.walk import parse_layout

VM_FIXTURES = fixtures_with("vmstate")
VM_SNAPSHOTS = [(name, s["name"]) for name in VM_FIXTURES
                for s in FIXTURES_BY_NAME[name]["snapshots"] if s["vm_state_size"]]
ORACLES = [(snap, info["file"][:-3])
           for snap, info in FIXTURES_BY_NAME["savevm-suspended"]["savevm"]["oracles"].items()]
GiB = 1 << 30


def stream_of(path: Path, snapshot: str) -> bytes:
    with qcow2snap.open(path) as image:
        return image.open_vm_state(snapshot).read()


def pt_loads(elf: bytes) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of every PT_LOAD of an ELF64 core."""
    assert elf[4] == 2
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phnum, = struct.unpack_from("<H", elf, 0x38)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + 56 * i)
        if p_type == 1:
            out.append((p_offset, p_paddr, p_filesz))
    return out


# ---------------------------------------------------------------------------
# vmstate info
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "snapshot"), VM_SNAPSHOTS)
def test_info_agrees_with_manifest(fixture_dir: Path, name: str, snapshot: str) -> None:
    entry = FIXTURES_BY_NAME[name]
    expected = {s["name"]: s for s in entry["snapshots"]}[snapshot]
    with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
        state = vm_state_info(image, snapshot)
        assert state.runstate == expected["runstate"]
        assert state.complete is True and state.problem is None
        assert state.size == expected["vm_state_size"]
        assert state.machine_type == "pc-i440fx-7.2"  # "pc" is its alias in QEMU 7.2
        assert state.page_size == 4096 and state.page_size_source == "vm-description"
        assert state.globalstate_layout == "qemu<=8.2"
        blocks = {b.name: b.size for b in state.ram_blocks}
        assert blocks["pc.ram"] == entry["savevm"]["memory_mib"] << 20
        assert sum(blocks.values()) == state.ram_total_size
        assert state.normal_pages + state.zero_pages >= state.ram_total_size // 4096
        names = [d.name for d in state.devices]
        assert names[-1] == "globalstate" and "cpu" in names
        # the quick tail-only reading used by `list` agrees with the full walk
        sn = image.find_snapshot(snapshot)
        assert snapshot_runstate(image, sn) == state.runstate


def test_suspended_guest_is_reported_suspended(fixture_dir: Path) -> None:
    with qcow2snap.open(fixture_path(fixture_dir, "savevm-suspended")) as image:
        state = vm_state_info(image, "susp")
        assert (state.runstate, state.saved_runstate, state.vm_was_suspended) == (
            "suspended", "suspended", True)


def test_info_cli_json(fixture_dir: Path) -> None:
    path = fixture_path(fixture_dir, "savevm-suspended")
    result = invoke("vmstate", "info", "susp", path, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["machine-type"] == "pc-i440fx-7.2"
    assert data["runstate"] == "suspended"
    assert data["complete"] is True
    assert data["page-size"] == 4096
    assert {"name": "pc.ram", "size": 16 << 20} in data["ram-blocks"]
    assert data["devices"][-1]["name"] == "globalstate"
    text = invoke("vmstate", "info", "--by-id", "1", path)
    assert text.exit_code == 0
    assert "run state: prelaunch" in text.stdout and "complete: yes" in text.stdout


def test_info_of_disk_only_snapshot(fixture_dir: Path) -> None:
    result = invoke("vmstate", "info", "first", fixture_path(fixture_dir, "v3-basic"))
    assert result.exit_code == NoVMStateError.exit_code
    assert "disk-only" in result.stderr and "Traceback" not in result.stderr


def test_list_shows_runstate(fixture_dir: Path) -> None:
    out = invoke("list", fixture_path(fixture_dir, "savevm-suspended")).stdout.splitlines()
    assert out[1].split()[-1] == "RUNSTATE"
    assert [line.split()[-1] for line in out[2:]] == ["prelaunch", "suspended"]
    data = json.loads(invoke("list", "--json", fixture_path(fixture_dir, "savevm")).stdout)
    assert [s["runstate"] for s in data] == ["prelaunch", "running", "paused"]
    # disk-only images keep qemu-img's columns and keys
    out = invoke("list", fixture_path(fixture_dir, "v3-basic")).stdout.splitlines()
    assert out[1].split()[-1] == "ICOUNT"
    data = json.loads(invoke("list", "--json", fixture_path(fixture_dir, "v3-basic")).stdout)
    assert all("runstate" not in s for s in data)


# ---------------------------------------------------------------------------
# vmstate memory against QEMU's dump-guest-memory

def _raw_matches_loads(raw: Path, elf: bytes) -> None:
    """The raw image holds each PT_LOAD of ``elf`` at its physical address
    and nothing but zeros elsewhere."""
    loads = pt_loads(elf)
    assert raw.stat().st_size == max(paddr + size for _, paddr, size in loads)
    with open(raw, "rb") as f:
        for offset, paddr, size in loads:
            f.seek(paddr)
            assert f.read(size) == elf[offset:offset + size], hex(paddr)
        fd = f.fileno()
        pos = 0
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for a in range(start, end, 1 << 20):
                b = min(end, a + (1 << 20))
                if not any(p <= a and b <= p + s for _, p, s in loads):
                    f.seek(a)
                    assert not any(f.read(b - a)), hex(a)
            pos = end


@pytest.mark.parametrize(("snapshot", "oracle"), ORACLES)
def test_elf_equals_dump_guest_memory(fixture_dir: Path, tmp_path: Path, snapshot: str,
                                      oracle: str) -> None:
    out = tmp_path / "mem.elf"
    with qcow2snap.open(fixture_path(fixture_dir, "savevm-suspended")) as image:
        result = export_memory(image, snapshot, out, format="elf")
    expected = (fixture_dir / oracle).read_bytes()
    assert out.read_bytes() == expected
    assert result.size == len(expected)
    assert [(r.phys_start, r.size) for r in result.ranges] == [
        (paddr, size) for _, paddr, size in pt_loads(expected)]


@pytest.mark.parametrize(("snapshot", "oracle"), ORACLES)
def test_raw_equals_dump_guest_memory_loads(fixture_dir: Path, tmp_path: Path, snapshot: str,
                                            oracle: str) -> None:
    out = tmp_path / "mem.raw"
    expected = (fixture_dir / oracle).read_bytes()
    with qcow2snap.open(fixture_path(fixture_dir, "savevm-suspended")) as image:
        result = export_memory(image, snapshot, out, format="raw")
    assert out.stat().st_size == result.size
    _raw_matches_loads(out, expected)   # nothing but zeros outside; zero pages are holes
    assert out.stat().st_blocks * 512 <= result.bytes_written + (1 << 20)


def test_block_export(fixture_dir: Path, tmp_path: Path) -> None:
    expected = (fixture_dir / "savevm-suspended.pre.elf").read_bytes()
    offset, paddr, size = pt_loads(expected)[-1]       # pc.bios at the top of 4 GiB
    assert paddr + size == 4 * GiB
    out = tmp_path / "bios.bin"
    result = invoke("vmstate", "memory", "pre", fixture_path(fixture_dir, "savevm-suspended"),
                    "-o", out, "--block", "pc.bios", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "block" and data["size"] == size
    assert out.read_bytes() == expected[offset:offset + size]
    out2 = tmp_path / "ram.bin"
    with qcow2snap.open(fixture_path(fixture_dir, "savevm-suspended")) as image:
        export_memory(image, "susp", out2, block="pc.ram")
    susp = (fixture_dir / "savevm-suspended.susp.elf").read_bytes()
    offset, paddr, size = pt_loads(susp)[0]
    assert (paddr, size) == (0, 16 << 20)
    assert out2.read_bytes() == susp[offset:offset + size]
    fill = out2.read_bytes()[0x20000:0x30000]
    assert fill == bytes.fromhex("5ac3") * 0x8000      # the boot sector's work


def test_memory_cli_errors(fixture_dir: Path, tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, "savevm")
    out = tmp_path / "m.raw"
    ok = invoke("vmstate", "memory", "run", path, "-o", out)
    assert ok.exit_code == 0, ok.stderr
    again = invoke("vmstate", "memory", "run", path, "-o", out)
    assert again.exit_code == OutputExistsError.exit_code and "exists" in again.stderr
    assert invoke("vmstate", "memory", "run", path, "-o", out, "--force").exit_code == 0
    bad = invoke("vmstate", "memory", "run", path, "-o", tmp_path / "x", "--block", "nope")
    assert bad.exit_code == UnsupportedImageError.exit_code
    assert "no RAM block 'nope'" in bad.stderr and "pc.ram" in bad.stderr
    assert not (tmp_path / "x").exists()
    usage = invoke("vmstate", "memory", "run", path, "-o", tmp_path / "y", "--block", "pc.ram",
                   "--format", "elf")
    assert usage.exit_code == 2
    disk_only = invoke("vmstate", "memory", "first", fixture_path(fixture_dir, "v3-basic"),
                       "-o", tmp_path / "z")
    assert disk_only.exit_code == NoVMStateError.exit_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.raw"]


def test_ram_split_follows_qemu() -> None:
    # pc_init1: 3.5 GiB default limit; 3 GiB once RAM reaches it (>= 2.1)
    assert ram_split("pc-i440fx-7.2", 16 << 20) == (16 << 20, 0)
    assert ram_split("pc-i440fx-7.2", 0xE0000000 - 4096) == (0xE0000000 - 4096, 0)
    assert ram_split("pc-i440fx-7.2", 4 * GiB) == (3 * GiB, GiB)
    assert ram_split("pc-i440fx-2.0", 4 * GiB) == (0xE0000000, 4 * GiB - 0xE0000000)
    assert ram_split("pc-1.7", 4 * GiB) == (3584 << 20, 512 << 20)
    assert ram_split("pc-i440fx-7.2", 4 * GiB, 2 * GiB) == (2 * GiB, 2 * GiB)
    assert ram_split("pc-i440fx-7.2", 3968 << 20, 4 * GiB) == (3968 << 20, 0)
    # pc_q35_init: 2.75 GiB, or 2 GiB once RAM reaches 2.75 GiB
    assert ram_split("pc-q35-7.2", 0xB0000000 - 4096) == (0xB0000000 - 4096, 0)
    assert ram_split("pc-q35-7.2", 0xB0000000) == (2 * GiB, 0xB0000000 - 2 * GiB)
    assert ram_split("pc-q35-9.2", 8 * GiB, GiB) == (GiB, 7 * GiB)
    with pytest.raises(UnsupportedImageError, match=r"virt-7\.2"):
        ram_split("virt-7.2", GiB)


# QEMU itself as the oracle for snapshots without a stored dump -------------

def _qemu_dumps(path: Path, snapshots: list[str], bios: Path | None, cwd: Path) -> None:
    monitor = "".join(f"loadvm {s}\ndump-guest-memory {s}.elf\n" for s in snapshots) + "quit\n"
    cmd = [require_tool("qemu-system-x86_64"), "-machine", "pc,accel=tcg", "-nodefaults",
           "-display", "none", "-m", "16", "-drive", f"file={path},format=qcow2,if=ide",
           "-monitor", "stdio", "-S"]
    if bios is not None:
        cmd += ["-bios", os.fspath(bios)]
    subprocess.run(cmd, input=monitor, text=True, cwd=cwd, capture_output=True, timeout=120,
                   check=True)


@pytest.mark.parametrize("name", ["savevm", "savevm-seabios"])
def test_elf_equals_loadvm_dump(fixture_copy: Any, tmp_path: Path, name: str) -> None:
    require_tool("qemu-system-x86_64")
    path = fixture_copy(name)
    entry = FIXTURES_BY_NAME[name]
    bios = entry["savevm"]["bios"]
    snapshots = [s["name"] for s in entry["snapshots"]]
    with qcow2snap.open(path) as image:
        for s in snapshots:
            export_memory(image, s, tmp_path / f"{s}.ours", format="elf")
    _qemu_dumps(path, snapshots, tmp_path / bios[:-3] if bios else None, tmp_path)
    for s in snapshots:
        assert (tmp_path / f"{s}.ours").read_bytes() == (tmp_path / f"{s}.elf").read_bytes(), s


# ---------------------------------------------------------------------------
# Damaged streams and images
# ---------------------------------------------------------------------------

def _suspended_stream(fixture_dir: Path) -> bytes:
    return stream_of(fixture_path(fixture_dir, "savevm-suspended"), "susp")


def test_truncated_stream(fixture_dir: Path) -> None:
    data = _suspended_stream(fixture_dir)
    ram_end = max(s.end_offset for s in parse_stream(io.BytesIO(data), len(data)).sections
                  if s.name == "ram")
    for cut in (3, 8, 40, 5000, len(data) // 2, len(data) - 20):
        if cut < ram_end:   # inside the RAM: refused
            with pytest.raises(CorruptImageError, match="the stream ends at byte"):
                parse_stream(io.BytesIO(data[:cut]), cut)
        else:               # the trailer is gone: the device sections cannot be checked
            state = parse_stream(io.BytesIO(data[:cut]), cut)
            assert state.complete is None and "no VM description" in (state.problem or "")
        state = parse_stream(io.BytesIO(data[:cut]), cut, strict=False)
        assert state.complete is not True and state.problem


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_streams_give_only_qcow2_errors(fixture_dir: Path, data: st.DataObject) -> None:
    stream = bytearray(_suspended_stream(fixture_dir))
    cut = data.draw(st.integers(0, len(stream)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1),
                                         st.integers(0, 255)), max_size=4))
    for offset, value in flips:
        stream[offset] = value
    stream = stream[:cut]
    for strict in (True, False):
        try:
            parse_stream(io.BytesIO(bytes(stream)), len(stream), strict=strict,
                         ram_sink=_NullSink())
        except Qcow2Error:
            assert strict
    with contextlib.suppress(Qcow2Error):
        read_runstate(io.BytesIO(bytes(stream)), len(stream))


class _NullSink:
    def page(self, block: RamBlock, offset: int, data: memoryview) -> None:
        assert offset + len(data) <= block.size + 4096 and offset < block.size

    def zero(self, block: RamBlock, offset: int, fill: int) -> None:
        assert offset < block.size


def _vm_state_host_offset(path: Path, snapshot: str) -> int:
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot(snapshot)
        start = image.vm_state_offset(sn)
        ext = next(image.extents(sn, start, 4096))
        assert ext.host_offset is not None
        return ext.host_offset + start - ext.guest_offset


def test_corrupt_image_leaves_no_output(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("savevm")
    data = stream_of(path, "run")
    host = _vm_state_host_offset(path, "run")
    # the first RAM page record after the block list: make it an unknown flag mix
    record = data.index(b"pc.ram", data.index(b"pc.ram") + 6) - 9
    word, = struct.unpack_from(">Q", data, record)
    with open(path, "r+b") as f:
        f.seek(host + record)
        f.write(struct.pack(">Q", word | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with qcow2snap.open(path) as image:
        with pytest.raises(CorruptImageError, match="unknown combination of flags"):
            export_memory(image, "run", out_dir / "mem.raw")
        state = vm_state_info(image, "run")
        assert state.complete is False and "unknown combination" in (state.problem or "")
    assert list(out_dir.iterdir()) == []
    result = invoke("vmstate", "memory", "run", path, "-o", out_dir / "mem.elf",
                    "--format", "elf")
    assert result.exit_code == CorruptImageError.exit_code
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []
    info = invoke("vmstate", "info", "run", path)
    assert info.exit_code == 0 and "complete: NO" in info.stdout


# ---------------------------------------------------------------------------
# Synthetic streams: what QEMU 7.2 never writes here
# ---------------------------------------------------------------------------

def _section_header(kind: int, section_id: int, name: str) -> bytes:
    return (bytes([kind]) + struct.pack(">I", section_id) + bytes([len(name)]) + name.encode()
            + struct.pack(">II", 0, 1 if name == "globalstate" else 4))


def synthetic(records: bytes, *, devices: list[tuple[dict[str, Any], bytes]] = (),  # type: ignore[assignment]
              blocks: tuple[tuple[str, int], ...] = (("pc.ram", 0x4000),),
              machine: str = "pc-i440fx-9.2", description: bool = True) -> bytes:
    """QEVM v3: configuration, ram START (block list + ``records``), FULL
    device sections with footers, EOF and the VM description."""
    total = sum(size for _, size in blocks)
    out = b"QEVM" + struct.pack(">I", 3)
    out += b"\x07" + struct.pack(">I", len(machine)) + machine.encode()
    out += _section_header(1, 1, "ram")
    out += struct.pack(">Q", total | RAM_SAVE_FLAG_MEM_SIZE)
    for name, size in blocks:
        out += bytes([len(name)]) + name.encode() + struct.pack(">Q", size)
    out += records + struct.pack(">Q", RAM_SAVE_FLAG_EOS) + b"\x7e" + struct.pack(">I", 1)
    for i, (desc, payload) in enumerate(devices, start=2):
        out += _section_header(4, i, desc["name"]) + payload + b"\x7e" + struct.pack(">I", i)
    out += b"\x00"
    if description:
        text = json.dumps({"page_size": 4096, "devices": [d for d, _ in devices]}).encode()
        out += b"\x06" + struct.pack(">I", len(text)) + text
    return out


def page(offset: int, flags: int, block: str | None = "pc.ram", payload: bytes = b"") -> bytes:
    head = struct.pack(">Q", offset | flags)
    if block is not None:
        head += bytes([len(block)]) + block.encode()
    return head + payload


GLOBALSTATE_9_0 = {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate",
                   "version": 1, "fields": [
                       {"name": "size", "type": "uint32", "size": 4},
                       {"name": "runstate", "type": "buffer", "size": 32},
                       {"name": "has_vm_was_suspended", "type": "bool", "size": 1},
                       {"name": "vm_was_suspended", "type": "bool", "size": 1},
                       {"name": "unused", "type": "buffer", "size": 66}]}
GLOBALSTATE_8_2 = {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate",
                   "version": 1, "fields": [
                       {"name": "size", "type": "uint32", "size": 4},
                       {"name": "runstate", "type": "buffer", "size": 100}]}


def globalstate_9_0(runstate: str, suspended: bool) -> bytes:
    return (struct.pack(">I", len(runstate) + 1) + runstate.encode().ljust(32, b"\0")
            + bytes([1, int(suspended)]) + bytes(66))


@pytest.mark.parametrize("description", [True, False])
@pytest.mark.parametrize(("runstate", "suspended", "expected"), [
    ("paused", True, "suspended"),       # 9.0+: stopped while in S3
    ("suspended", True, "suspended"),
    ("running", False, "running"),
    ("paused", False, "paused"),
])
def test_globalstate_qemu_9_layout(runstate: str, suspended: bool, expected: str,
                                   description: bool) -> None:
    data = synthetic(page(0, RAM_SAVE_FLAG_ZERO, payload=b"\0"),
                     devices=[(GLOBALSTATE_9_0, globalstate_9_0(runstate, suspended))],
                     description=description)
    state = parse_stream(io.BytesIO(data), len(data))
    assert (state.runstate, state.saved_runstate, state.globalstate_layout) == (
        expected, runstate, "qemu>=9.0")
    assert state.complete is (True if description else None)
    quick = read_runstate(io.BytesIO(data), len(data))
    assert quick is not None and quick.runstate == expected


def test_globalstate_stale_bytes_after_nul() -> None:
    payload = struct.pack(">I", 8) + b"running\0h".ljust(100, b"\0")
    data = synthetic(b"", devices=[(GLOBALSTATE_8_2, payload)])
    assert parse_stream(io.BytesIO(data), len(data)).runstate == "running"
    assert read_runstate(io.BytesIO(data), len(data)).runstate == "running"  # type: ignore[union-attr]


def test_page_beyond_its_block_is_refused() -> None:
    data = synthetic(page(0x4000, RAM_SAVE_FLAG_PAGE, payload=bytes(4096)))
    with pytest.raises(CorruptImageError, match="beyond its 0x4000 bytes"):
        parse_stream(io.BytesIO(data), len(data), ram_sink=_NullSink())


def test_unknown_block_and_orphan_continue_are_refused() -> None:
    data = synthetic(page(0, RAM_SAVE_FLAG_PAGE, "other", bytes(4096)))
    with pytest.raises(CorruptImageError, match="'other', which is not in the block list"):
        parse_stream(io.BytesIO(data), len(data))
    data = synthetic(page(0, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, None, bytes(4096)))
    with pytest.raises(CorruptImageError, match="no block came before"):
        parse_stream(io.BytesIO(data), len(data))


@pytest.mark.parametrize(("flag", "name"), [(RAM_SAVE_FLAG_XBZRLE, "RAM_SAVE_FLAG_XBZRLE"),
                                            (0x100, "RAM_SAVE_FLAG_COMPRESS_PAGE"),
                                            (0x80, "RAM_SAVE_FLAG_HOOK")])
def test_undecodable_page_kinds_are_named(flag: int, name: str) -> None:
    data = synthetic(page(0, flag, payload=bytes(16)))
    with pytest.raises(UnsupportedImageError, match=name) as info:
        parse_stream(io.BytesIO(data), len(data))
    assert info.value.feature == name
    state = parse_stream(io.BytesIO(data), len(data), strict=False)
    assert state.complete is None and name in (state.problem or "")


def test_resent_page_as_zero_is_written_as_zeros(tmp_path: Path) -> None:
    """A page sent with data and later as a zero page ends up zero (and a
    zero page with a fill byte, as 7.2 allows, is filled)."""
    records = (page(0x1000, RAM_SAVE_FLAG_PAGE, payload=b"\xaa" * 4096)
               + page(0x2000, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, None, b"\xbb" * 4096)
               + page(0x1000, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, None, b"\0")
               + page(0x3000, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, None, b"\x07"))
    data = synthetic(records)
    out = tmp_path / "block"
    with open(out, "wb") as f:
        f.truncate(0x4000)
        block = RamBlock("pc.ram", 0x4000, 0)
        writer = _PageWriter(f.fileno(), 4096, {"pc.ram": [(0, 0x4000, 0)]}, (block,))
        state = parse_stream(io.BytesIO(data), len(data), ram_sink=writer)
        writer.flush()
    assert (state.normal_pages, state.zero_pages) == (2, 2)
    assert out.read_bytes() == bytes(0x2000) + b"\xbb" * 4096 + b"\x07" * 4096


class _PerPageWriter(_PageWriter):
    """The writer without its bulk methods: the walk hands it every record
    one by one (the reference for the bulk path)."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("pages", "zeros"):
            raise AttributeError(name)
        return super().__getattribute__(name)


_RUN = st.tuples(st.sampled_from(["page", "zero", "fill"]), st.integers(0, 599),
                 st.integers(1, 300), st.integers(1, 255))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(_RUN, min_size=1, max_size=8), split=st.integers(0, 100),
       gap=st.booleans())
def test_bulk_walk_equals_page_by_page(tmp_path_factory: Any, runs: list[tuple[str, int, int,
                                                                                int]],
                                       split: int, gap: bool) -> None:
    """Runs of records (consecutive pages, long ones past the bulk step's
    limit, pages written twice, zero pages over written ones, fill bytes,
    a block's last pages) give the same output and counts through the bulk
    step as record by record, and as a model of the stream."""
    ps, npages = 4096, 600
    size = npages * ps - (512 if gap else 0)    # gap: a partial last page
    records = b""
    model = bytearray(npages * ps)
    first = True
    for kind, start, count, byte in runs:
        for index in range(start, min(start + count, npages)):
            flags = RAM_SAVE_FLAG_PAGE if kind == "page" else RAM_SAVE_FLAG_ZERO
            block = "pc.ram" if first else None
            flags |= 0 if first else RAM_SAVE_FLAG_CONTINUE
            first = False
            fill = byte if kind == "fill" else 0
            payload = bytes([byte]) * ps if kind == "page" else bytes([fill])
            if index == npages // 2 and split:    # one stray record names its block
                block, flags = "pc.ram", flags & ~RAM_SAVE_FLAG_CONTINUE
            records += page(index * ps, flags, block, payload)
            model[index * ps:(index + 1) * ps] = payload if kind == "page" else bytes([fill]) * ps
    blocks = (("pc.ram", size), ("pad", 512)) if gap else (("pc.ram", size),)
    data = synthetic(records, blocks=blocks)   # the total stays page-aligned
    # a segment boundary inside the block, page-aligned or not
    cut = split * ps if split % 2 else split * ps + 100
    cut = min(cut, size)
    segments = {"pc.ram": [(0, cut, 0), (cut, size, cut + 8192)]}
    outputs = []
    counts = []
    for cls in (_PageWriter, _PerPageWriter):
        out = tmp_path_factory.mktemp("bulk") / "out"
        with open(out, "wb") as f:
            f.truncate(size + 8192)
            writer = cls(f.fileno(), ps, segments, (RamBlock("pc.ram", size, 0),))
            state = parse_stream(io.BytesIO(data), len(data), ram_sink=writer)
            writer.flush()
        outputs.append(out.read_bytes())
        counts.append((state.normal_pages, state.zero_pages, writer.bytes_written))
    assert outputs[0] == outputs[1]
    assert counts[0] == counts[1]
    expected = bytearray(size + 8192)
    expected[:cut] = model[:cut]
    expected[cut + 8192:size + 8192] = model[cut:size]
    assert outputs[0] == bytes(expected)
    plain = parse_stream(io.BytesIO(data), len(data))
    assert (plain.normal_pages, plain.zero_pages) == counts[0][:2]


def test_layout_from_the_ends_equals_the_whole_walk() -> None:
    """parse_layout finds the device sections back from the VM description
    and agrees with the whole walk; it gives None (the caller then walks
    everything) without a description or when the sections do not fill the
    end exactly."""
    records = (page(0, RAM_SAVE_FLAG_PAGE, payload=b"\x11" * 4096)
               + page(0x1000, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, None, b"\0"))
    devices = [(GLOBALSTATE_9_0, globalstate_9_0("running", False))]
    data = synthetic(records, devices=devices)
    quick = parse_layout(io.BytesIO(data), len(data))
    full = parse_stream(io.BytesIO(data), len(data))
    assert quick is not None
    assert (quick.machine_type, quick.page_size, quick.ram_blocks, quick.device_states,
            quick.complete, quick.runstate) == (full.machine_type, full.page_size,
                                                full.ram_blocks, full.device_states,
                                                full.complete, full.runstate)
    bare = synthetic(records, devices=devices, description=False)
    assert parse_layout(io.BytesIO(bare), len(bare)) is None
    # a device section without its footer: the sizes no longer reach back
    # to a section start
    cut = data.index(b"\x7e", data.index(b"globalstate"))
    unfooted = data[:cut] + data[cut + 5:]
    assert parse_layout(io.BytesIO(unfooted), len(unfooted)) is None
    assert parse_stream(io.BytesIO(unfooted), len(unfooted)).complete is True


def test_not_a_stream() -> None:
    with pytest.raises(CorruptImageError, match="not a QEMU VM state stream"):
        parse_stream(io.BytesIO(b"QFI\xfb" + bytes(100)), 104)
    v2 = b"QEVM" + struct.pack(">I", 2) + b"\0"
    with pytest.raises(UnsupportedImageError, match="obsolete"):
        parse_stream(io.BytesIO(v2), len(v2))


# A default machine (no -nodefaults): the VGA's video RAM at its PCI BAR ----

def _default_guest(qemu_img: str, tmp_path: Path, machine: str,
                   boot_sector: bytes | None = None) -> tuple[Path, bytes]:
    """A guest started as a user would (default devices: the standard VGA,
    a NIC with its option ROM, the system's SeaBIOS), booting
    ``boot_sector`` if given, stopped after 3 s (SeaBIOS has programmed
    the BARs), saved as ``s1`` and dumped: (the image, QEMU's dump)."""
    qemu = require_tool("qemu-system-x86_64")
    disk = tmp_path / "vm.qcow2"
    if boot_sector is None:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", disk, "8M"], check=True)
    else:
        raw = tmp_path / "boot.raw"
        raw.write_bytes(boot_sector.ljust(510, b"\0") + b"\x55\xaa")
        os.truncate(raw, 1 << 20)
        subprocess.run([qemu_img, "convert", "-O", "qcow2", raw, disk], check=True)
    proc = subprocess.Popen(
        [qemu, "-machine", f"{machine},accel=tcg", "-m", "32", "-display", "none",
         "-drive", f"file={disk},format=qcow2,if=ide", "-monitor", "stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path)
    try:
        time.sleep(3)
        out, _ = proc.communicate("stop\nsavevm s1\ndump-guest-memory s1.elf\nquit\n",
                                  timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return disk, (tmp_path / "s1.elf").read_bytes()


def _exports_equal_dump(disk: Path, expected: bytes, tmp_path: Path) -> MemoryResult:
    with qcow2snap.open(disk) as image:
        elf = export_memory(image, "s1", tmp_path / "ours.elf", format="elf")
        export_memory(image, "s1", tmp_path / "ours.raw", format="raw")
    assert [(r.phys_start, r.size, r.block) for r in elf.ranges][:1] == [(0, 0xA0000, "pc.ram")]
    assert [(r.phys_start, r.size) for r in elf.ranges] == [
        (paddr, size) for _, paddr, size in pt_loads(expected)]
    assert (tmp_path / "ours.elf").read_bytes() == expected
    _raw_matches_loads(tmp_path / "ours.raw", expected)
    return elf


VGA_ADDRESS = {"pc": "0000:00:02.0", "q35": "0000:00:01.0"}


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_default_machine_vga_bar_equals_dump(qemu_img: str, tmp_path: Path,
                                             machine: str) -> None:
    """QEMU's dump has the VGA's video RAM at its BAR 0, and so must ours;
    the ROM BARs SeaBIOS left disabled stay out."""
    disk, expected = _default_guest(qemu_img, tmp_path, machine)
    vga = VGA_ADDRESS[machine]
    result = _exports_equal_dump(disk, expected, tmp_path)
    assert f"{vga}/vga.vram" in [r.block for r in result.ranges]
    assert f"{vga}/vga.vram" not in result.unmapped_blocks
    assert f"{vga}/vga.rom" in result.unmapped_blocks


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_mode_13h_and_enabled_rom_bar_equal_dump(qemu_img: str, tmp_path: Path,
                                                 machine: str) -> None:
    """A boot sector that switches to VGA mode 13h (chain-4: QEMU maps the
    video RAM at 0xA0000 too) and enables the VGA's ROM BAR where SeaBIOS
    assigned it (read-modify-write of config 0x30 through 0xCF8/0xCFC)."""
    vga = VGA_ADDRESS[machine]
    slot = int(vga[8:10], 16)
    config = struct.pack("<I", 0x80000030 | slot << 11)
    code = (bytes.fromhex("b81300cd10")               # mov ax, 13h; int 10h
            + bytes.fromhex("baf80c66b8") + config    # mov dx, 0cf8h; mov eax, ...
            + bytes.fromhex("66efbafc0c66ed0c0166ef")  # out; mov dx, 0cfch; in; or al, 1; out
            + bytes.fromhex("faf4ebfd"))               # cli; hlt; jmp $-1
    disk, expected = _default_guest(qemu_img, tmp_path, machine, code)
    result = _exports_equal_dump(disk, expected, tmp_path)
    blocks = {(r.phys_start, r.size): r.block for r in result.ranges}
    assert blocks[(0xA0000, 0x10000)] == f"{vga}/vga.vram"
    assert f"{vga}/vga.rom" in blocks.values() and f"{vga}/vga.rom" not in result.unmapped_blocks
