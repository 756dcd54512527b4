"""RAM that PCI devices map through their BARs, placed from the device's
saved PCI config space as QEMU places it (hw/pci/pci.c ``pci_bar_address``,
``pci_update_mappings``): the standard VGA's video RAM (BAR 0) and any
device's option ROM when its ROM BAR is enabled.

Which device owns a RAM block is in the names: ``vmstate_register_ram``
prefixes a device's blocks with its device path, as the device's section
is named (``0000:00:02.0/vga.vram`` and ``0000:00:02.0/vga``); the walk
keeps such owners' sections (:mod:`qcow2snap.vmstate.walk`).
"""

from __future__ import annotations

import re

from ..vmstate import DeviceState, RamBlock, VMState

__all__ = ["pci_bar_ranges"]

# hw/pci/pci_regs.h and hw/pci/pci.c
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_ROM_ADDRESS = 0x30
PCI_ROM_ADDRESS_ENABLE = 0x1
PCI_ROM_SLOT = 6
U64_MAX = (1 << 64) - 1
#: RAM blocks that a device maps through one of its BARs, by the device's
#: vmsd name and the block's name after the device path (hw/display/vga-pci.c
#: registers the video RAM as BAR 0).  A "<type>.rom" block is the device's
#: option ROM (pci_add_option_rom), mapped by the ROM BAR of any device.
PCI_RAM_BARS = {("vga", "vga.vram"): 0}
#: "0000:00:02.0": a device on root bus 0 (its BARs are not behind a bridge's
#: windows); only these are placed.
_ROOT_BUS_DEVICE = re.compile(r"[0-9a-f]{4}:00:[0-9a-f]{2}\.[0-7]")


def _device_config(dev: DeviceState) -> bytes | None:
    """The PCI config space of a device section (``dev.config[0]`` for
    ``VMSTATE_PCI_DEVICE(dev, ...)``, ``parent_obj.config[0]``, ...)."""
    for name in dev.fields:
        base = name.rpartition(".")[2]
        if base in ("config[0]", "config") and dev.fields[name][1] >= 0x40:
            return dev.raw(name)
    return None


def _pci_bar_address(config: bytes, reg: int, size: int) -> int | None:
    """hw/pci/pci.c ``pci_bar_address`` for a memory BAR of ``size`` bytes
    (a power of two) on a pc/q35 bus (``pci_allow_0_address`` is false):
    None when the BAR is not mapped."""
    if not int.from_bytes(config[PCI_COMMAND:PCI_COMMAND + 2], "little") & PCI_COMMAND_MEMORY:
        return None
    if reg == PCI_ROM_SLOT:
        if config[PCI_HEADER_TYPE] & 0x7F != 0:    # a bridge's ROM BAR is elsewhere
            return None
        bar, bar_type = PCI_ROM_ADDRESS, 0           # pci_add_option_rom: 32-bit memory
    else:
        bar = PCI_BASE_ADDRESS_0 + 4 * reg
        bar_type = config[bar] & 0x7
        if bar_type & PCI_BASE_ADDRESS_SPACE_IO:
            return None
    wide = bool(bar_type & PCI_BASE_ADDRESS_MEM_TYPE_64)
    addr = int.from_bytes(config[bar:bar + (8 if wide else 4)], "little")
    if reg == PCI_ROM_SLOT and not addr & PCI_ROM_ADDRESS_ENABLE:
        return None
    addr &= ~(size - 1) & U64_MAX
    last = (addr + size - 1) & U64_MAX
    if last <= addr or last == U64_MAX or addr == 0:
        return None
    if not wide and last >= 0xFFFFFFFF:
        return None
    return addr


def pci_bar_ranges(state: VMState, blocks: dict[str, RamBlock]
                   ) -> list[tuple[int, int, str]]:
    """(start, end, block name) of each RAM block mapped through a BAR of a
    PCI device on root bus 0, where its saved config space puts it
    (``pci_update_mappings``).  The PCI address space lies beneath system
    RAM (a priority -1 subregion of system memory)."""
    owners: dict[str, DeviceState] = {}
    for kept in state.device_states:
        path, _, _ = kept.device.name.rpartition("/")
        if _ROOT_BUS_DEVICE.fullmatch(path) and _device_config(kept) is not None:
            owners.setdefault(path, kept)   # the device's section with its config
    ranges: list[tuple[int, int, str]] = []
    for name, block in blocks.items():
        path, _, region = name.rpartition("/")
        dev = owners.get(path)
        if dev is None or block.size <= 0 or block.size & (block.size - 1):
            continue
        if region.endswith(".rom"):
            reg: int | None = PCI_ROM_SLOT
        else:
            reg = PCI_RAM_BARS.get((dev.device.vmsd_name, region))
        config = _device_config(dev)
        if reg is None or config is None:
            continue
        addr = _pci_bar_address(config, reg, block.size)
        if addr is not None:
            ranges.append((addr, addr + block.size, name))
    return ranges


# hw/display/vga_regs.h
VGA_SEQ_PLANE_WRITE = 0x02
VGA_SR02_ALL_PLANES = 0x0F
VGA_SEQ_MEMORY_MODE = 0x04
VGA_SR04_CHN_4M = 0x08
VGA_GFX_MISC = 0x06


def _field(dev: DeviceState, name: str) -> bytes | None:
    """Field ``name`` of a device section, nested or not (``vga.sr``)."""
    for full in dev.fields:
        if full == name or full.endswith("." + name):
            return dev.raw(full)
    return None


def vga_chain4_range(state: VMState, blocks: dict[str, RamBlock]
                     ) -> tuple[int, int, str, int] | None:
    """(start, end, block, block offset) of the "vga.chain4" alias of the
    standard VGA's video RAM in the legacy window (hw/display/vga.c
    ``vga_update_memory_access``: all planes written, chain-4 mode, e.g.
    mode 13h), or None.  It lies in the PCI address space above
    "vga-lowmem", so it shows wherever the SMRAM region shows that window."""
    for dev in state.device_states:
        path, _, _ = dev.device.name.rpartition("/")
        block = blocks.get(f"{path}/vga.vram")
        if dev.device.vmsd_name != "vga" or not _ROOT_BUS_DEVICE.fullmatch(path) or not block:
            continue
        sr, gr, bank = _field(dev, "sr"), _field(dev, "gr"), _field(dev, "bank_offset")
        if sr is None or gr is None or len(sr) < 8 or len(gr) <= VGA_GFX_MISC:
            return None
        if ((sr[VGA_SEQ_PLANE_WRITE] & VGA_SR02_ALL_PLANES) != VGA_SR02_ALL_PLANES
                or not sr[VGA_SEQ_MEMORY_MODE] & VGA_SR04_CHN_4M):
            return None
        offset = 0
        mode = (gr[VGA_GFX_MISC] >> 2) & 3
        if mode == 0:
            base, size = 0xA0000, 0x20000
        elif mode == 1:
            base, size = 0xA0000, 0x10000
            offset = int.from_bytes(bank, "big", signed=True) if bank else 0
        elif mode == 2:
            base, size = 0xB0000, 0x8000
        else:
            base, size = 0xB8000, 0x8000
        if offset < 0 or offset + size > block.size:   # QEMU asserts it cannot be
            return None
        return base, base + size, block.name, offset
    return None
