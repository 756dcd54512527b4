"""Guest memory out of a savevm snapshot (operations layer), with no QEMU.

The machine, the CPUs and the chipset registers come after the RAM in the
snapshot's VM state (:meth:`Qcow2Image.open_vm_state`):
:func:`qcow2snap.vmstate.walk.parse_layout` reads them from the stream's two
ends (the device sections found back from the VM description's sizes), and
only when that does not work out a first whole walk with
:func:`qcow2snap.vmstate.parse_stream` learns them; then one walk writes
every RAM page where it belongs (runs of pages with one ``pwritev``; see
``_PageWriter.pages``).  Should the whole walk disagree with the ends, the
output is written again from what it found.  Nothing per page is kept but
one bit (was it written), so memory stays bounded; zero pages are left as
holes of the sparse output.

Output forms:

``block``
    one RAM block as it is (``--block NAME``).
``raw``
    a guest-physical image: byte ``X`` of the file is guest-physical address
    ``X``; what is not RAM is a hole.
``elf``
    an ELF core with a PT_NOTE (per-CPU ``CORE`` prstatus and ``QEMU``
    CPU-state notes) and one PT_LOAD per guest-physical range, laid out as
    QEMU 7.2's ``dump-guest-memory`` (paging off, no filter) writes it.
``lime``
    a LiME file (the Linux Memory Extractor's format, which Volatility and
    other analysis tools open): for each guest-physical range, the same
    ranges as the ELF's PT_LOADs, a 32-byte :data:`LimeHeader` and then the
    range's bytes.  LiME has no sparse ranges: every byte of a range is in
    the file, and zero pages are holes of the sparse file (read as zeros).

The guest-physical map is rebuilt for x86 ``pc`` (i440FX) and ``q35``
machines the way QEMU's memory API flattens it: RAM below and above 4 GiB
(split from the machine type and RAM size as ``pc_init1`` /
``pc_q35_init`` do), the BIOS at the top of 4 GiB and its ISA alias, the
option-ROM area, the PAM registers that switch 0xC0000-0xFFFFF between RAM
and ROM, SMRAM and (q35) TSEG.  Adjacent ranges of one RAM block merge as in
QEMU's ``guest_phys_blocks_region_add``.

The module runs past 700 lines because the three parts that must agree
byte for byte with QEMU's dump live together: the guest-physical map, the
output layouts (ELF notes and headers, LiME) and the page writer with its
bulk paths; splitting them would spread one format's rules over modules.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from construct import Const, Int32ul, Int64ul, Padding, Struct

from ..errors import UnsupportedImageError
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import DiskReader
from ..vmstate import DeviceState, RamBlock, VMState, parse_stream
from ..vmstate.walk import parse_layout
from .extract import atomic_output, input_files
from .pcibars import pci_bar_ranges, vga_chain4_range
from .runstate import snapshot_runstate, vm_state_label

__all__ = [
    "MemoryResult",
    "PhysRange",
    "export_memory",
    "guest_physical_map",
    "ram_split",
    "snapshot_runstate",
    "vm_state_info",
]

ProgressCallback = Callable[[int, int], None]

GiB = 1 << 30
FOUR_GIB = 1 << 32

# hw/i386/pc.c, hw/pci-host/pam.h, i440fx.h, q35.h
PC_ROM_MIN_VGA = 0xC0000
PC_ROM_SIZE = 0x20000
ISA_BIOS_MAX_SIZE = 128 << 10
SMRAM_C_BASE = 0xA0000
SMRAM_C_SIZE = 0x20000
PAM_BIOS_BASE = 0xF0000
PAM_BIOS_SIZE = 0x10000
PAM_EXPAN_BASE = 0xC0000
PAM_EXPAN_SIZE = 0x4000
PAM_REGIONS_COUNT = 13
PAM_ATTR_BITS = 4
PAM_ATTR_MASK = 3
I440FX_PAM = 0x59
I440FX_SMRAM = 0x72
MCH_HOST_BRIDGE_PAM0 = 0x90
MCH_HOST_BRIDGE_SMRAM = 0x9D
MCH_HOST_BRIDGE_ESMRAMC = 0x9E
MCH_HOST_BRIDGE_EXT_TSEG_MBYTES = 0x50
MCH_HOST_BRIDGE_ESMRAMC_H_SMRAME = 0x80
MCH_HOST_BRIDGE_ESMRAMC_TSEG_SZ_MASK = 0x6
MCH_HOST_BRIDGE_ESMRAMC_T_EN = 0x1
MCH_HIGH_SMRAM = 0xFEDA0000
SMRAM_D_OPEN = 0x40
HF_LMA_MASK = 1 << 14


# include/elf.h
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_STRTAB = 3
NT_PRSTATUS = 1
ELFCLASS32 = 1
ELFCLASS64 = 2
#: QEMU 7.2 writes ``sizeof(elf_header)`` of a *pointer* into e_ehsize.
QEMU_DUMP_EHSIZE = 8
SHSTRTAB = b"\0.shstrtab\0"

# LiME (github.com/504ensicsLabs/LiME, src/lime.h: lime_mem_range_header)
LIME_MAGIC = 0x4C694D45          # "EMiL" as a little-endian u32
LIME_VERSION = 1
LimeHeader = "LiME range header (32 bytes, little-endian), then the range's bytes" * Struct(
    "magic" / Const(LIME_MAGIC, Int32ul),
    "version" / Const(LIME_VERSION, Int32ul),
    "s_addr" / Int64ul,              # first guest-physical address of the range
    "e_addr" / Int64ul,              # last one (inclusive)
    "reserved" / Padding(8),
)
LIME_HEADER_SIZE = 32

# target/i386/cpu.h register and segment indexes
R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI = range(8)
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)


@dataclass(frozen=True, slots=True)
class PhysRange:
    """``size`` bytes of RAM block ``block`` from ``block_offset`` on, seen
    at guest-physical address ``phys_start``."""

    phys_start: int
    size: int
    block: str
    block_offset: int

    @property
    def phys_end(self) -> int:
        return self.phys_start + self.size


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """What a memory export wrote."""

    output: str
    format: str
    size: int                     # bytes of the output file (holes included)
    bytes_written: int            # bytes of page data written
    ranges: tuple[PhysRange, ...]
    unmapped_blocks: tuple[str, ...]
    snapshot: Snapshot
    state: VMState


# ---------------------------------------------------------------------------
# The guest-physical map
# ---------------------------------------------------------------------------

def _machine_family(machine_type: str | None) -> tuple[str, tuple[int, int] | None]:
    """("i440fx" | "q35" | "other", (major, minor) of the versioned name)."""
    name = machine_type or ""
    m = re.fullmatch(r"pc-i440fx-(\d+)\.(\d+)", name)
    if m:
        return "i440fx", (int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"pc-(\d+)\.(\d+)", name)  # pc-0.x / pc-1.x are i440FX too
    if m:
        return "i440fx", (int(m.group(1)), int(m.group(2)))
    if name in ("pc", "pc-i440fx"):
        return "i440fx", None
    m = re.fullmatch(r"pc-q35-(\d+)\.(\d+)", name)
    if m:
        return "q35", (int(m.group(1)), int(m.group(2)))
    if name in ("q35", "pc-q35"):
        return "q35", None
    return "other", None


def ram_split(machine_type: str | None, ram_size: int,
              max_ram_below_4g: int | None = None) -> tuple[int, int]:
    """(below_4g_mem_size, above_4g_mem_size) as QEMU computes them.

    i440FX (``pc_init1``): max-ram-below-4g defaults to 3.5 GiB; when the RAM
    does not fit below it, machine types from 2.1 on (gigabyte_align) lower
    the split to 3 GiB.  q35 (``pc_q35_init``): 2.75 GiB below 4 GiB, or 2 GiB
    once the RAM reaches 2.75 GiB (for 2.0 and older: always 2.75 GiB),
    capped by max-ram-below-4g (default 4 GiB).
    """
    family, version = _machine_family(machine_type)
    if family == "i440fx":
        limit = max_ram_below_4g or 0xE0000000
        lowmem = limit
        gigabyte_align = version is None or version >= (2, 1)
        if ram_size >= limit and gigabyte_align:
            lowmem = min(lowmem, 0xC0000000)
    elif family == "q35":
        gigabyte_align = version is None or version >= (2, 1)
        lowmem = 0x80000000 if ram_size >= 0xB0000000 and gigabyte_align else 0xB0000000
        limit = max_ram_below_4g or FOUR_GIB
        lowmem = min(lowmem, limit)
    else:
        raise UnsupportedImageError(
            f"the guest-physical layout of machine type {machine_type!r} is not known "
            f"(only x86 pc and q35 machines); export RAM blocks with --block instead",
            feature="machine type")
    if ram_size >= lowmem:
        return lowmem, ram_size - lowmem
    return ram_size, 0


@dataclass(slots=True)
class _Layer:
    start: int
    end: int
    block: str | None        # None: a non-RAM region that hides what is below
    offset: int
    priority: int


def _pci_config(state: VMState, vmsd_name: str) -> bytes:
    found: list[DeviceState] = state.device_state(vmsd_name)
    if not found:
        raise UnsupportedImageError(
            f"the VM state has no {vmsd_name} device section, so the chipset's memory "
            f"mapping registers are unknown; export RAM blocks with --block instead",
            feature="chipset")
    dev = found[0]
    for name in ("parent_obj.config[0]", "parent_obj.config", "config[0]", "config"):
        if dev.has(name):
            return dev.raw(name)
    raise UnsupportedImageError(f"the {vmsd_name} device section has no PCI config space",
                                feature="chipset")


def guest_physical_map(state: VMState, *, max_ram_below_4g: int | None = None
                       ) -> list[PhysRange]:
    """The guest-physical RAM ranges of an x86 pc or q35 machine, in address
    order, merged as QEMU's dump merges them."""
    if state.complete is not True:
        raise UnsupportedImageError(
            f"the guest-physical layout needs the whole stream with its VM description "
            f"({state.problem}); export RAM blocks with --block instead",
            feature="VM description")
    family, _ = _machine_family(state.machine_type)
    blocks = {b.name: b for b in state.ram_blocks}
    if family == "other":
        ram_split(state.machine_type, 0)  # raises the explanatory error
    if "pc.ram" not in blocks:
        raise UnsupportedImageError(
            "the VM state has no 'pc.ram' RAM block (memory backends or NUMA nodes are "
            "not mapped); export RAM blocks with --block instead", feature="RAM layout")
    ram = blocks["pc.ram"]
    below, above = ram_split(state.machine_type, ram.size, max_ram_below_4g)
    layers: list[_Layer] = [_Layer(0, below, "pc.ram", 0, 0)]
    if above:
        layers.append(_Layer(FOUR_GIB, FOUR_GIB + above, "pc.ram", below, 0))
    # ROMs in the PCI address space (mapped beneath RAM at priority -1, shown
    # through the PAM "pci" aliases)
    pci: list[_Layer] = []
    if "pc.rom" in blocks:
        size = min(blocks["pc.rom"].size, PC_ROM_SIZE)
        pci.append(_Layer(PC_ROM_MIN_VGA, PC_ROM_MIN_VGA + size, "pc.rom", 0, 1))
    if "isa-bios" in blocks:  # a copy (pflash firmware)
        size = blocks["isa-bios"].size
        pci.append(_Layer(0x100000 - size, 0x100000, "isa-bios", 0, 1))
    elif "pc.bios" in blocks:  # an alias of the BIOS's last 128 KiB
        bios = blocks["pc.bios"]
        size = min(bios.size, ISA_BIOS_MAX_SIZE)
        pci.append(_Layer(0x100000 - size, 0x100000, "pc.bios", bios.size - size, 1))
    if "pc.bios" in blocks:
        bios = blocks["pc.bios"]
        layers.append(_Layer(FOUR_GIB - bios.size, FOUR_GIB, "pc.bios", 0, 0))
    vga = any(name.endswith(("vga.vram", "vgavram", "vmsvga.vram")) for name in blocks)
    layers += [_Layer(start, end, block, 0, -1)   # the PCI space: beneath system RAM
               for start, end, block in pci_bar_ranges(state, blocks)]
    config = _pci_config(state, "I440FX" if family == "i440fx" else "mch")
    pam_base = I440FX_PAM if family == "i440fx" else MCH_HOST_BRIDGE_PAM0
    for i in range(PAM_REGIONS_COUNT):
        start, size = ((PAM_BIOS_BASE, PAM_BIOS_SIZE) if i == 0
                       else (PAM_EXPAN_BASE + (i - 1) * PAM_EXPAN_SIZE, PAM_EXPAN_SIZE))
        value = config[pam_base + (i + 1) // 2]
        mode = (value >> ((not (i & 1)) * PAM_ATTR_BITS)) & PAM_ATTR_MASK
        if mode:   # read-only, write-only or read/write: all alias RAM in QEMU
            layers.append(_Layer(start, start + size, "pc.ram", start, 1))
        else:      # the PCI space: the ROMs where they are, else what lies below
            for rom in pci:
                lo, hi = max(start, rom.start), min(start + size, rom.end)
                if lo < hi:
                    layers.append(_Layer(lo, hi, rom.block, rom.offset + lo - rom.start, 1))
    smram = config[I440FX_SMRAM if family == "i440fx" else MCH_HOST_BRIDGE_SMRAM]
    if family == "i440fx":
        smram_region = not smram & SMRAM_D_OPEN
    else:
        esmramc = config[MCH_HOST_BRIDGE_ESMRAMC]
        h_smrame = bool(esmramc & MCH_HOST_BRIDGE_ESMRAMC_H_SMRAME)
        smram_region = h_smrame if smram & SMRAM_D_OPEN else True
        if smram & SMRAM_D_OPEN and h_smrame:
            layers.append(_Layer(MCH_HIGH_SMRAM, MCH_HIGH_SMRAM + SMRAM_C_SIZE, "pc.ram",
                                 SMRAM_C_BASE, 1))
        if esmramc & MCH_HOST_BRIDGE_ESMRAMC_T_EN:
            tseg = {0x0: 1 << 20, 0x2: 2 << 20, 0x4: 8 << 20}.get(
                esmramc & MCH_HOST_BRIDGE_ESMRAMC_TSEG_SZ_MASK)
            if tseg is None:
                ext = int.from_bytes(config[MCH_HOST_BRIDGE_EXT_TSEG_MBYTES:
                                            MCH_HOST_BRIDGE_EXT_TSEG_MBYTES + 2], "little")
                tseg = (ext if ext not in (0, 0xFFFF) else 16) << 20
            layers.append(_Layer(below - tseg, below, None, 0, 1))
    if smram_region and vga:  # the VGA window (MMIO) hides the RAM beneath
        layers.append(_Layer(SMRAM_C_BASE, SMRAM_C_BASE + SMRAM_C_SIZE, None, 0, 1))
        chain4 = vga_chain4_range(state, blocks)   # video RAM in it (mode 13h)
        if chain4 is not None:
            layers.append(_Layer(chain4[0], chain4[1], chain4[2], chain4[3], 1))
    return _flatten(layers, blocks)


def _flatten(layers: list[_Layer], blocks: dict[str, RamBlock]) -> list[PhysRange]:
    points = sorted({p for layer in layers for p in (layer.start, layer.end)})
    pieces: list[PhysRange] = []
    for lo, hi in itertools.pairwise(points):
        top: _Layer | None = None
        for layer in layers:  # later additions win ties, as in QEMU
            if layer.start <= lo and hi <= layer.end and (top is None
                                                           or layer.priority >= top.priority):
                top = layer
        if top is None or top.block is None:
            continue
        offset = top.offset + lo - top.start
        size = min(hi - lo, blocks[top.block].size - offset)
        if size <= 0:
            continue
        last = pieces[-1] if pieces else None
        if (last is not None and last.block == top.block and last.phys_end == lo
                and last.block_offset + last.size == offset):
            pieces[-1] = PhysRange(last.phys_start, last.size + size, last.block,
                                   last.block_offset)
        else:
            pieces.append(PhysRange(lo, size, top.block, offset))
    return pieces


# ---------------------------------------------------------------------------
# ELF notes (target/i386/arch_dump.c)
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Segment:
    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True, slots=True)
class _X86CPU:
    regs: tuple[int, ...]
    eip: int
    eflags: int
    hflags: int
    segs: tuple[_Segment, ...]
    ldt: _Segment
    tr: _Segment
    gdt: _Segment
    idt: _Segment
    cr: tuple[int, int, int, int, int]
    kernelgsbase: int


def _x86_cpus(state: VMState) -> list[_X86CPU]:
    cpus = sorted(state.device_state("cpu"), key=lambda d: d.device.instance_id)
    if not cpus:
        raise UnsupportedImageError("the VM state has no x86 'cpu' sections, so the ELF "
                                    "notes cannot be written; use --format raw",
                                    feature="cpu state")
    out = []
    for dev in cpus:
        nregs = sum(1 for i in range(16) if dev.has(f"env.regs[{i}]"))

        def seg(prefix: str, dev: DeviceState = dev) -> _Segment:
            return _Segment(dev.uint(f"{prefix}.selector"), dev.uint(f"{prefix}.base"),
                            dev.uint(f"{prefix}.limit"), dev.uint(f"{prefix}.flags"))

        out.append(_X86CPU(
            regs=tuple(dev.uint(f"env.regs[{i}]") for i in range(nregs)) + (0,) * (16 - nregs),
            eip=dev.uint("env.eip"), eflags=dev.uint("env.eflags"),
            hflags=dev.uint("env.hflags"),
            segs=tuple(seg(f"env.segs[{i}]") for i in range(6)),
            ldt=seg("env.ldt"), tr=seg("env.tr"), gdt=seg("env.gdt"), idt=seg("env.idt"),
            cr=(dev.uint("env.cr[0]"), 0, dev.uint("env.cr[2]"), dev.uint("env.cr[3]"),
                dev.uint("env.cr[4]")),
            kernelgsbase=dev.uint("env.kernelgsbase") if dev.has("env.kernelgsbase") else 0))
    return out


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    namesz = len(name) + 1
    pad_name = (name + b"\0").ljust((namesz + 3) & ~3, b"\0")
    return (struct.pack("<III", namesz, len(desc), note_type) + pad_name
            + desc.ljust((len(desc) + 3) & ~3, b"\0"))


def _prstatus32(cpu: _X86CPU, pid: int) -> bytes:
    r, s = cpu.regs, cpu.segs
    m = 0xFFFFFFFF
    regs = struct.pack(
        "<7I8H2IHH2IHH",
        r[R_EBX] & m, r[R_ECX] & m, r[R_EDX] & m, r[R_ESI] & m, r[R_EDI] & m, r[R_EBP] & m,
        r[R_EAX] & m,
        s[R_DS].selector & 0xFFFF, 0, s[R_ES].selector & 0xFFFF, 0,
        s[R_FS].selector & 0xFFFF, 0, s[R_GS].selector & 0xFFFF, 0,
        0, cpu.eip & m, s[R_CS].selector & 0xFFFF, 0, cpu.eflags & m, r[R_ESP] & m,
        s[R_SS].selector & 0xFFFF, 0)
    return bytes(24) + struct.pack("<I", pid) + bytes(44) + regs + bytes(4)


def _prstatus64(cpu: _X86CPU, pid: int) -> bytes:
    r, s = cpu.regs, cpu.segs
    regs = struct.pack(
        "<27Q", r[15], r[14], r[13], r[12], r[R_EBP], r[R_EBX], r[11], r[10],
        r[9], r[8], r[R_EAX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], 0,
        cpu.eip, s[R_CS].selector, cpu.eflags, r[R_ESP], s[R_SS].selector,
        s[R_FS].base, s[R_GS].base, s[R_DS].selector, s[R_ES].selector,
        s[R_FS].selector, s[R_GS].selector)
    return bytes(32) + struct.pack("<I", pid) + bytes(76) + regs + bytes(8)


def _qemu_cpu_state(cpu: _X86CPU) -> bytes:
    r, s = cpu.regs, cpu.segs

    def seg(x: _Segment) -> bytes:
        return struct.pack("<IIIIQ", x.selector, x.limit, x.flags, 0, x.base)

    body = struct.pack(
        "<18Q", r[R_EAX], r[R_EBX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], r[R_ESP],
        r[R_EBP], *r[8:16], cpu.eip, cpu.eflags)
    body += b"".join(seg(x) for x in (s[R_CS], s[R_DS], s[R_ES], s[R_FS], s[R_GS], s[R_SS],
                                      cpu.ldt, cpu.tr, cpu.gdt, cpu.idt))
    body += struct.pack("<5QQ", *cpu.cr, cpu.kernelgsbase)
    return struct.pack("<II", 1, 8 + len(body)) + body


def _elf_layout(state: VMState, ranges: list[PhysRange]) -> tuple[bytes, int, bytes]:
    """(headers + notes, memory offset, trailing string table) of QEMU 7.2's
    ELF dump: Ehdr, two section headers, PT_NOTE, PT_LOADs, notes, memory,
    ".shstrtab"."""
    cpus = _x86_cpus(state)
    lma = bool(cpus[0].hflags & HF_LMA_MASK)
    machine = EM_X86_64 if lma else EM_386
    elf64 = lma or any(r.phys_end > 0xFFFFFFFF for r in ranges)
    notes = b"".join(_note(b"CORE", NT_PRSTATUS, _prstatus64(c, i + 1) if lma
                           else _prstatus32(c, i + 1)) for i, c in enumerate(cpus))
    notes += b"".join(_note(b"QEMU", 0, _qemu_cpu_state(c)) for c in cpus)
    phnum = 1 + len(ranges)
    if phnum >= 0xFFFF:
        raise UnsupportedImageError(f"{phnum} program headers do not fit an ELF header",
                                    feature="ELF")
    if elf64:
        ehsize, shentsize, phentsize = 64, 64, 56
    else:
        ehsize, shentsize, phentsize = 52, 40, 32
    shoff = ehsize
    phoff = shoff + 2 * shentsize
    note_offset = phoff + phnum * phentsize
    memory_offset = note_offset + len(notes)
    memory_size = sum(r.size for r in ranges)
    strtab_offset = memory_offset + memory_size
    ident = b"\x7fELF" + bytes([ELFCLASS64 if elf64 else ELFCLASS32, 1, 1]) + bytes(9)
    if elf64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, machine, 1, 0, phoff, shoff, 0,
                                   QEMU_DUMP_EHSIZE, phentsize, phnum, shentsize, 2, 1)
        shdrs = bytes(shentsize) + struct.pack("<IIQQQQIIQQ", 1, SHT_STRTAB, 0, 0,
                                               strtab_offset, len(SHSTRTAB), 0, 0, 0, 0)
        phdrs = struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_offset, 0, 0, len(notes),
                            len(notes), 0)
        offset = memory_offset
        for r in ranges:
            phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 0, offset, r.phys_start, r.phys_start,
                                 r.size, r.size, 0)
            offset += r.size
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", ET_CORE, machine, 1, 0, phoff, shoff, 0,
                                   QEMU_DUMP_EHSIZE, phentsize, phnum, shentsize, 2, 1)
        shdrs = bytes(shentsize) + struct.pack("<10I", 1, SHT_STRTAB, 0, 0, strtab_offset,
                                               len(SHSTRTAB), 0, 0, 0, 0)
        phdrs = struct.pack("<8I", PT_NOTE, note_offset, 0, 0, len(notes), len(notes), 0, 0)
        offset = memory_offset
        for r in ranges:
            phdrs += struct.pack("<8I", PT_LOAD, offset, r.phys_start, r.phys_start, r.size,
                                 r.size, 0, 0)
            offset += r.size
    head = ehdr + shdrs + phdrs + notes
    assert len(head) == memory_offset
    return head, memory_offset, SHSTRTAB


def _lime_layout(ranges: list[PhysRange]
                 ) -> tuple[list[tuple[int, bytes]], dict[str, list[tuple[int, int, int]]], int]:
    """(range headers with their file offsets, page segments, file size) of
    a LiME file: header, bytes, header, bytes... in address order."""
    headers: list[tuple[int, bytes]] = []
    segments: dict[str, list[tuple[int, int, int]]] = {}
    offset = 0
    for r in ranges:
        headers.append((offset, LimeHeader.build(
            {"s_addr": r.phys_start, "e_addr": r.phys_end - 1})))
        offset += LIME_HEADER_SIZE
        segments.setdefault(r.block, []).append(
            (r.block_offset, r.block_offset + r.size, offset))
        offset += r.size
    return headers, segments, offset


# ---------------------------------------------------------------------------
# Writing pages
# ---------------------------------------------------------------------------

#: Coalesced page data is written once it reaches this size.
FLUSH_BYTES = 4 << 20


#: The most buffers one ``pwritev`` takes (Linux's IOV_MAX).
_IOV_MAX = 1024


def _set_bits(bits: bytearray, start: int, count: int) -> None:
    """Set bits ``start`` .. ``start + count - 1`` (bit ``i``: byte ``i >> 3``,
    value ``1 << (i & 7)``)."""
    end = start + count
    while start < end and start & 7:
        bits[start >> 3] |= 1 << (start & 7)
        start += 1
    whole = (end - start) >> 3
    if whole:
        bits[start >> 3:(start >> 3) + whole] = b"\xff" * whole
        start += whole << 3
    while start < end:
        bits[start >> 3] |= 1 << (start & 7)
        start += 1


def _any_bits(bits: bytearray, start: int, count: int) -> bool:
    """Is any of bits ``start`` .. ``start + count - 1`` set?"""
    end = start + count
    while start < end and start & 7:
        if bits[start >> 3] & (1 << (start & 7)):
            return True
        start += 1
    whole = (end - start) >> 3
    if whole and bits[start >> 3:(start >> 3) + whole].strip(b"\0"):
        return True
    start += whole << 3
    while start < end:
        if bits[start >> 3] & (1 << (start & 7)):
            return True
        start += 1
    return False


class _PageWriter:
    """RamSink writing pages to the output through per-block segment lists
    (block offset range -> file offset); one bit per page records whether it
    holds data, so a later zero page of the same page is written as zeros."""

    def __init__(self, fd: int, page_size: int,
                 segments: dict[str, list[tuple[int, int, int]]],
                 blocks: tuple[RamBlock, ...]) -> None:
        self.fd = fd
        self.page_size = page_size
        self.segments = segments
        self.written = {b.name: bytearray((b.size // page_size + 8) // 8) for b in blocks
                        if b.name in segments}
        self.pending = bytearray()
        self.pending_offset = -1
        self.bytes_written = 0

    def _targets(self, block: RamBlock, offset: int, length: int
                 ) -> list[tuple[int, int, int]]:
        """(file offset, start within the page, length) of each mapped part."""
        out = []
        end = offset + length
        for lo, hi, file_offset in self.segments.get(block.name, ()):
            a, b = max(lo, offset), min(hi, end)
            if a < b:
                out.append((file_offset + a - lo, a - offset, b - a))
        return out

    def _write(self, file_offset: int, data: bytes | memoryview) -> None:
        if self.pending and self.pending_offset + len(self.pending) == file_offset \
                and len(self.pending) < FLUSH_BYTES:
            self.pending += data
            return
        self.flush()
        self.pending_offset = file_offset
        self.pending += data

    def flush(self) -> None:
        if self.pending:
            view = memoryview(self.pending)
            offset = self.pending_offset
            while len(view):
                n = os.pwrite(self.fd, view, offset)
                offset += n
                view = view[n:]
            self.bytes_written += len(self.pending)
            self.pending = bytearray()

    def page(self, block: RamBlock, offset: int, data: memoryview) -> None:
        length = min(self.page_size, block.size - offset)  # never beyond the block
        targets = self._targets(block, offset, length)
        if not targets:
            return
        bits = self.written[block.name]
        index = offset // self.page_size
        bits[index >> 3] |= 1 << (index & 7)
        for file_offset, start, n in targets:
            self._write(file_offset, data[start:start + n])

    def pages(self, block: RamBlock, offset: int, count: int, records: memoryview,
              stride: int) -> None:
        """A run of consecutive pages: each mapped part written with one
        ``pwritev`` of the pages' slices (no copy)."""
        ps = self.page_size
        end = offset + count * ps
        targets = self._targets(block, offset, count * ps)
        if end > block.size or any((start % ps) or (n % ps) for _, start, n in targets):
            for j in range(count):   # a part not on page boundaries: page by page
                self.page(block, offset + j * ps, records[j * stride + 8:(j + 1) * stride])
            return
        if not targets:
            return
        _set_bits(self.written[block.name], offset // ps, count)
        self.flush()
        for file_offset, start, n in targets:
            first = start // ps
            views = [records[j * stride + 8:(j + 1) * stride]
                     for j in range(first, first + n // ps)]
            for k in range(0, len(views), _IOV_MAX):
                chunk = views[k:k + _IOV_MAX]
                length = len(chunk) * ps
                done = os.pwritev(self.fd, chunk, file_offset)
                if done < length:   # a short write: the rest one piece at a time
                    rest = memoryview(b"".join(chunk))[done:]
                    at = file_offset + done
                    while len(rest):
                        n_done = os.pwrite(self.fd, rest, at)
                        at += n_done
                        rest = rest[n_done:]
                file_offset += length
                self.bytes_written += length

    def zeros(self, block: RamBlock, offset: int, count: int) -> None:
        """A run of consecutive zero pages: nothing to write (the output is
        sparse) unless one of them was written before."""
        bits = self.written.get(block.name)
        if bits is None:
            return
        ps = self.page_size
        if _any_bits(bits, offset // ps, count):
            for j in range(count):
                self.zero(block, offset + j * ps, 0)

    def zero(self, block: RamBlock, offset: int, fill: int) -> None:
        bits = self.written.get(block.name)
        if bits is None:
            return
        index = offset // self.page_size
        if not fill and not bits[index >> 3] & (1 << (index & 7)):
            return  # already a hole
        length = min(self.page_size, block.size - offset)
        self.flush()
        page = bytes([fill]) * length
        for file_offset, start, n in self._targets(block, offset, length):
            self._write(file_offset, page[start:start + n])
        self.flush()
        if fill:
            bits[index >> 3] |= 1 << (index & 7)
        else:
            bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def vm_state_info(image: Qcow2Image, snapshot: str | Snapshot, *,
                  progress: ProgressCallback | None = None) -> VMState:
    """Walk a snapshot's VM state and report what it holds.  A damaged or
    truncated stream is reported (``complete`` False, ``problem``), not
    raised; a disk-only snapshot raises NoVMStateError."""
    reader = image.open_vm_state(snapshot)
    sn = reader.layer.snapshot
    assert sn is not None
    return parse_stream(reader, sn.vm_state_size, strict=False, progress=progress,
                        label=vm_state_label(image, sn))


def export_memory(image: Qcow2Image, snapshot: str | Snapshot,
                  output: str | os.PathLike[str], *,
                  format: Literal["raw", "elf", "lime"] = "raw",
                  block: str | None = None, max_ram_below_4g: int | None = None,
                  progress: ProgressCallback | None = None, overwrite: bool = False,
                  sync: bool = False) -> MemoryResult:
    """Write the guest RAM saved in ``snapshot`` to ``output``.

    ``block`` writes that one RAM block as it is (``format`` is then
    ignored); otherwise ``format="raw"`` gives a guest-physical image and
    ``format="elf"`` the ELF core QEMU's ``dump-guest-memory`` writes, and
    ``format="lime"`` a LiME file with one range per ELF PT_LOAD.
    ``max_ram_below_4g`` is the machine option of that name, if the VM was
    started with it.  Raises CorruptImageError for a damaged stream and
    UnsupportedImageError for page kinds or machines that cannot be decoded;
    nothing is left at ``output`` then.
    """
    if format not in ("raw", "elf", "lime"):
        raise ValueError(f"unknown memory format {format!r} (raw, elf or lime)")
    reader = image.open_vm_state(snapshot)
    sn = reader.layer.snapshot
    assert sn is not None
    size = sn.vm_state_size
    label = vm_state_label(image, sn)

    # the layout from the stream's two ends when they give it (one walk of
    # the RAM), else from a first whole walk (two)
    layout_state = parse_layout(reader, size, label=label)
    passes = 1 if layout_state is not None else 2

    def pass_progress(base: int) -> ProgressCallback | None:
        if progress is None:
            return None
        return lambda done, total: progress(base + done, passes * total)

    if progress is not None:
        progress(0, passes * size)
    if layout_state is None:
        layout_state = parse_stream(reader, size, progress=pass_progress(0), label=label)
    result = _export(image, reader, sn, size, label, layout_state, output, format, block,
                     max_ram_below_4g, pass_progress((passes - 1) * size), overwrite, sync)
    if passes == 1 and not _same_layout(result.state, layout_state):
        # the ends said something the whole walk does not: write it again
        # with what the whole walk found (never for QEMU's streams)
        result = _export(image, reader, sn, size, label, result.state, output, format, block,
                         max_ram_below_4g, None, True, sync)
    if progress is not None:
        progress(passes * size, passes * size)
    return result


def _same_layout(a: VMState, b: VMState) -> bool:
    """Do two walks agree on everything the output's layout depends on?"""
    return (a.machine_type, a.page_size, a.ram_blocks, a.device_states, a.complete) == (
        b.machine_type, b.page_size, b.ram_blocks, b.device_states, b.complete)


def _export(image: Qcow2Image, reader: DiskReader, sn: Snapshot, size: int, label: str,
            state: VMState, output: str | os.PathLike[str], format: str, block: str | None,
            max_ram_below_4g: int | None, progress: ProgressCallback | None,
            overwrite: bool, sync: bool) -> MemoryResult:
    """Write the pages of the stream in ``reader`` laid out as ``state``
    says; the result carries the state of this (whole, strict) walk."""
    unmapped: tuple[str, ...]
    headers: list[tuple[int, bytes]] = []     # (file offset, bytes) written after the pages
    if block is not None:
        found = state.ram_block(block)
        ranges = [PhysRange(0, found.size, found.name, 0)]
        segments = {found.name: [(0, found.size, 0)]}
        out_size = found.size
        head = tail = b""
        out_format = "block"
        unmapped = tuple(b.name for b in state.ram_blocks if b.name != block)
    else:
        ranges = guest_physical_map(state, max_ram_below_4g=max_ram_below_4g)
        mapped = {r.block for r in ranges}
        unmapped = tuple(b.name for b in state.ram_blocks if b.name not in mapped)
        segments = {}
        if format == "elf":
            head, memory_offset, tail = _elf_layout(state, ranges)
            offset = memory_offset
            for r in ranges:
                segments.setdefault(r.block, []).append(
                    (r.block_offset, r.block_offset + r.size, offset))
                offset += r.size
            out_size = offset + len(tail)
        elif format == "lime":
            head = tail = b""
            headers, segments, out_size = _lime_layout(ranges)
        else:
            head = tail = b""
            for r in ranges:
                segments.setdefault(r.block, []).append(
                    (r.block_offset, r.block_offset + r.size, r.phys_start))
            out_size = max((r.phys_end for r in ranges), default=0)
        out_format = format
    with atomic_output(output, overwrite=overwrite, inputs=input_files(image), sync=sync) as fd:
        os.ftruncate(fd, out_size)
        writer = _PageWriter(fd, state.page_size, segments, state.ram_blocks)
        walked = parse_stream(reader, size, ram_sink=writer, progress=progress, label=label)
        writer.flush()
        if head:
            os.pwrite(fd, head, 0)
        if tail:
            os.pwrite(fd, tail, out_size - len(tail))
        for at, data in headers:
            os.pwrite(fd, data, at)
    return MemoryResult(os.fspath(output), out_format, out_size, writer.bytes_written,
                        tuple(ranges), unmapped, sn, walked)
