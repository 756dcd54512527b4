"""``vmstate memory --format lime``: the LiME export (qcow2snap.ops.memory).

Oracles: the raw guest-physical export (itself checked against QEMU's
``dump-guest-memory`` in test_vmstate.py) and the ELF core (byte-identical
to QEMU's there), read back through Volatility 3's ``LimeLayer`` and
``Elf64Layer``, the layers analysts open these files with; and the LiME
headers parsed here against the ELF's PT_LOADs.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path, fixtures_with
from helpers import invoke, missing

import qcow2snap
from qcow2snap.ops.memory import LIME_HEADER_SIZE, LIME_MAGIC, LimeHeader, export_memory

VM_SNAPSHOTS = [(name, s["name"]) for name in fixtures_with("vmstate")
                for s in FIXTURES_BY_NAME[name]["snapshots"] if s["vm_state_size"]]
PAGE = 4096


def pt_loads(elf: Path) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of every PT_LOAD of an ELF64 core."""
    with open(elf, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phnum, = struct.unpack_from("<H", head, 0x38)
        f.seek(phoff)
        table = f.read(56 * phnum)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", table, 56 * i)
        if p_type == 1:
            out.append((p_offset, p_paddr, p_filesz))
    return out


def lime_ranges(path: Path) -> list[tuple[int, int, int]]:
    """(file offset of the data, s_addr, e_addr) of every LiME range, walked
    header to header as a LiME reader does; the walk must end at EOF."""
    out = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            f.seek(offset)
            raw = f.read(LIME_HEADER_SIZE)
            magic, version, s_addr, e_addr, reserved = struct.unpack("<IIQQQ", raw)
            assert (magic, version, reserved) == (LIME_MAGIC, 1, 0), hex(offset)
            assert raw[:4] == b"EMiL"
            assert LimeHeader.parse(raw) == LimeHeader.parse(LimeHeader.build(
                {"s_addr": s_addr, "e_addr": e_addr}))
            out.append((offset + LIME_HEADER_SIZE, s_addr, e_addr))
            offset += LIME_HEADER_SIZE + e_addr - s_addr + 1
        assert offset == size
    return out


@pytest.fixture(scope="module")
def exports(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[tuple[str, str], dict[str, Path]]:
    """raw, elf and lime exports of every savevm snapshot, made once."""
    out: dict[tuple[str, str], dict[str, Path]] = {}
    base = tmp_path_factory.mktemp("lime")
    for name, snapshot in VM_SNAPSHOTS:
        files = {}
        with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
            for fmt in ("raw", "elf", "lime"):
                files[fmt] = base / f"{name}.{snapshot}.{fmt}"
                result = export_memory(image, snapshot, files[fmt], format=fmt)  # type: ignore[arg-type]
                assert result.format == fmt and result.size == files[fmt].stat().st_size
        out[(name, snapshot)] = files
    return out


@pytest.mark.parametrize(("name", "snapshot"), VM_SNAPSHOTS)
def test_lime_ranges_are_the_elf_loads(exports: dict[tuple[str, str], dict[str, Path]],
                                       name: str, snapshot: str) -> None:
    files = exports[(name, snapshot)]
    loads = pt_loads(files["elf"])
    ranges = lime_ranges(files["lime"])
    assert len(ranges) >= 2     # pc.ram and the BIOS at the top of 4 GiB at least
    assert [(s, e + 1 - s) for _, s, e in ranges] == [(p, n) for _, p, n in loads]
    # each range's bytes are the raw image's at that address, and the ELF's
    with open(files["raw"], "rb") as raw, open(files["lime"], "rb") as lime, \
            open(files["elf"], "rb") as elf:
        for (data_offset, s_addr, e_addr), (elf_offset, _, _) in zip(ranges, loads, strict=True):
            for at in range(s_addr, e_addr + 1, 1 << 20):
                n = min(1 << 20, e_addr + 1 - at)
                raw.seek(at)
                lime.seek(data_offset + at - s_addr)
                elf.seek(elf_offset + at - s_addr)
                expected = raw.read(n)
                assert len(expected) == n
                assert lime.read(n) == expected == elf.read(n), hex(at)
    # the raw image ends with the last range (test_vmstate.py checks that it
    # holds nothing but zeros outside them), the LiME file with its bytes
    assert files["raw"].stat().st_size == ranges[-1][2] + 1
    lime_data = sum(e + 1 - s for _, s, e in ranges)
    assert files["lime"].stat().st_size == lime_data + LIME_HEADER_SIZE * len(ranges)


def _volatility_layers(lime: Path, elf: Path) -> tuple[Any, Any]:
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import elf as vol_elf
        from volatility3.framework.layers import lime as vol_lime
        from volatility3.framework.layers import physical
    except ImportError as exc:
        missing("volatility3", f"it is not importable ({exc}); install the test extra")
    ctx = contexts.Context()
    layers = []
    for tag, path, cls in (("lime", lime, vol_lime.LimeLayer),
                           ("elf", elf, vol_elf.Elf64Layer)):
        base = f"{tag}_file"
        ctx.config[f"{base}.location"] = path.resolve().as_uri()
        ctx.add_layer(physical.FileLayer(ctx, base, base))
        ctx.config[f"{tag}.base_layer"] = base
        layer = cls(ctx, tag, tag)
        ctx.add_layer(layer)
        layers.append(layer)
    return layers[0], layers[1]


@pytest.mark.parametrize(("name", "snapshot"), VM_SNAPSHOTS)
def test_volatility_reads_lime_and_elf_as_raw(
        exports: dict[tuple[str, str], dict[str, Path]], name: str, snapshot: str) -> None:
    """Volatility 3's LiME and ELF layers give, at sampled guest-physical
    addresses (start, end and random pages of each range, and pages that
    straddle a range's edges), exactly the raw image's bytes."""
    files = exports[(name, snapshot)]
    lime, elf = _volatility_layers(files["lime"], files["elf"])
    loads = pt_loads(files["elf"])
    assert [(s, n) for s, _, n, _ in lime._segments] == [(p, n) for _, p, n in loads]
    assert (lime.minimum_address, lime.maximum_address) == (
        loads[0][1], loads[-1][1] + loads[-1][2] - 1)
    rng = random.Random(f"{name}/{snapshot}")
    nonzero = 0
    with open(files["raw"], "rb") as raw:
        for _, paddr, size in loads:
            end = paddr + size
            samples = [(paddr, min(PAGE, size)), (end - min(PAGE, size), min(PAGE, size)),
                       (paddr, 1), (end - 1, 1), (paddr, size if size <= 1 << 20 else 1 << 20)]
            for _ in range(16):
                page = paddr + rng.randrange(max(1, size // PAGE)) * PAGE
                samples.append((page, min(PAGE, end - page)))
                at = rng.randrange(paddr, end)
                samples.append((at, rng.randint(1, end - at)))
            for at, n in samples:
                raw.seek(at)
                expected = raw.read(n)
                assert len(expected) == n
                nonzero += any(expected)
                for layer in (lime, elf):
                    assert layer.is_valid(at, n), (layer.name, hex(at), n)
                    assert layer.read(at, n) == expected, (layer.name, hex(at), n)
            # just outside the range: not mapped, unless the next range starts there
            if not any(p == end for _, p, _ in loads):
                assert not lime.is_valid(end, 1) and not elf.is_valid(end, 1)
    assert nonzero > 0      # the samples saw real data, not only holes


def test_lime_cli(fixture_dir: Path, tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, "savevm-suspended")
    out = tmp_path / "susp.lime"
    result = invoke("vmstate", "memory", "susp", path, "-o", out, "--format", "lime", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "lime" and data["size"] == out.stat().st_size
    assert [(r["phys-start"], r["size"]) for r in data["ranges"]] == [
        (s, e + 1 - s) for _, s, e in lime_ranges(out)]
    # zero pages stay holes of the sparse file
    assert out.stat().st_blocks * 512 <= data["bytes-written"] + (1 << 20)
    excl = invoke("vmstate", "memory", "susp", path, "-o", tmp_path / "x", "--format", "lime",
                  "--block", "pc.ram")
    assert excl.exit_code == 2 and "--format lime" in excl.stderr
    assert sorted(os.listdir(tmp_path)) == ["susp.lime"]
