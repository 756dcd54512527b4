"""The walk of a savevm stream (part of :mod:`qcow2snap.vmstate`):
:func:`parse_stream` and ``_Walker``, which reads the header, the
configuration section, the RAM records (handed to a
:class:`~qcow2snap.vmstate.stream.RamSink`) and the device sections, stepped
over with the sizes in the VM description; ``globalstate`` is decoded from
its section or, without a VM description, found by its byte pattern.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

from ..errors import CorruptImageError, Qcow2Error, UnsupportedImageError
from .description import _described_devices, _find_vm_description, _layout
from .stream import (
    BULK_WINDOW,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_NAMES,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    Device,
    DeviceState,
    RamBlock,
    RamSink,
    Section,
    StreamFile,
    VMState,
    _Cursor,
)

#: Why a page kind cannot be decoded offline.
_UNDECODABLE = {
    RAM_SAVE_FLAG_FULL: "an obsolete (pre-2009) full-RAM record",
    RAM_SAVE_FLAG_XBZRLE: "an XBZRLE delta against a page sent earlier (xbzrle capability)",
    RAM_SAVE_FLAG_HOOK: "an RDMA control hook (rdma migration)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "a multi-threaded-compression page (compress capability)",
}

#: The default target page size when neither the VM description nor the
#: configuration section states one (TARGET_PAGE_BITS 12: x86, and most).
DEFAULT_PAGE_SIZE = 4096

#: Upper bounds that keep a damaged stream from costing unbounded memory
#: (the VM description's is :data:`~.description.MAX_VM_DESCRIPTION_SIZE`).
MAX_KEPT_SECTION_SIZE = 1 << 20
MAX_RAM_BLOCKS = 65536

#: Device sections whose bytes are kept for later decoding (CPU registers
#: for ELF notes, the chipset's PAM/SMRAM registers, the run state).
KEEP_VMSD_NAMES = frozenset({"cpu", "I440FX", "mch", "globalstate"})

#: Also kept: the section of a device that owns a RAM block (the section's
#: name and the block's share the device path, "0000:00:02.0/vga" and
#: "0000:00:02.0/vga.vram"): its PCI config places the block's BAR.  All
#: such sections together are kept up to this many bytes.
MAX_KEPT_OWNER_BYTES = 4 << 20


def _device_path(name: str) -> str:
    """"0000:00:02.0" of "0000:00:02.0/vga"; "" when the name has no path."""
    path, sep, _ = name.rpartition("/")
    return path if sep and path and not path.startswith("/") else ""

#: The RAM walk's bulk step (``_Walker.bulk``): 4 KiB pages, whose record
#: flags are the header's last byte and the low half of the one before it;
#: at most this many records a step (a page run: 1 MiB of pages).
BULK_PAGE_SIZE = 4096
BULK_RECORDS = 256
_ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_PAGE_CONTINUE = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


@functools.lru_cache(maxsize=2 * BULK_RECORDS)
def _run_struct(stride: int, count: int) -> struct.Struct:
    """The headers of ``count`` records of ``stride`` bytes, in one unpack."""
    return struct.Struct(">" + f"Q{stride - 8}x" * count)


#: The bytes a run state name may hold (0x20-0x7E).
_PRINTABLE = bytes(range(0x20, 0x7F))


class _Walker:
    def __init__(self, cur: _Cursor, sink: RamSink | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.cur = cur
        self.label = cur.label
        self.sink = sink
        self.bulk_sink = hasattr(sink, "pages") and hasattr(sink, "zeros")
        self.progress = progress
        self.machine_type: str | None = None
        self.page_size = DEFAULT_PAGE_SIZE
        self.page_size_source = "default"
        self.capabilities: list[str] = []
        self.uuid: str | None = None
        self.blocks: list[RamBlock] = []
        self.blocks_by_name: dict[str, RamBlock] = {}
        self.ram_total = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.sections: list[Section] = []
        self.started: dict[int, str] = {}
        self.kept: list[DeviceState] = []
        self.kept_owner_bytes = 0
        self.owner_paths: set[str] = set()
        self.owner_paths_of = 0
        self.saved_runstate: str | None = None
        self.vm_was_suspended: bool | None = None
        self.globalstate_layout: str | None = None
        self.last_block: RamBlock | None = None
        self.next_progress = 0

    def corrupt(self, message: str) -> CorruptImageError:
        return CorruptImageError(f"{self.label}: {message}", structure="VM state")

    # -- header and configuration -----------------------------------------

    def header(self) -> int:
        cur = self.cur
        magic = cur.u32("the file magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise self.corrupt(f"not a QEMU VM state stream (magic {magic:#010x}, expected "
                               f"{QEMU_VM_FILE_MAGIC:#010x} 'QEVM')")
        version = cur.u32("the file version")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedImageError(f"{self.label}: savevm stream version 2 is obsolete "
                                        f"(QEMU refuses it too)", feature="savevm v2")
        if version != QEMU_VM_FILE_VERSION:
            raise UnsupportedImageError(f"{self.label}: unknown savevm stream version "
                                        f"{version}", feature="savevm version")
        return version

    def configuration(self) -> None:
        cur = self.cur
        n = cur.u32("the configuration section")
        if n > 4096:
            raise self.corrupt(f"machine type name of {n} bytes in the configuration section")
        self.machine_type = cur.read(n, "the machine type").decode("utf-8", "replace")
        while cur.peek_u8() == QEMU_VM_SUBSECTION:
            cur.u8("a subsection marker")
            name = cur.string("a configuration subsection name")
            cur.u32("a subsection version")
            if name == "configuration/target-page-bits":
                bits = cur.u32("target-page-bits")
                if not 9 <= bits <= 30:
                    raise self.corrupt(f"target-page-bits {bits} out of range")
                if self.page_size_source != "vm-description":
                    self.page_size = 1 << bits
                    self.page_size_source = "configuration"
            elif name == "configuration/capabilities":
                count = cur.u32("the capability count")
                if count > 256:
                    raise self.corrupt(f"{count} capabilities in the configuration section")
                self.capabilities = [cur.string("a capability name") for _ in range(count)]
            elif name == "configuration/uuid":
                self.uuid = bytes(cur.view(16, "the VM UUID")).hex()
            else:
                raise UnsupportedImageError(
                    f"{self.label}: unknown configuration subsection {name!r} at offset "
                    f"{cur.pos:#x}; its length is not in the stream", feature="configuration")

    # -- RAM ----------------------------------------------------------------

    def ram_block_list(self, total: int) -> None:
        cur = self.cur
        if self.blocks:
            raise self.corrupt("a second RAM block list (RAM_SAVE_FLAG_MEM_SIZE)")
        if "mapped-ram" in self.capabilities:
            raise UnsupportedImageError(f"{self.label}: mapped-ram streams are not supported",
                                        feature="mapped-ram")
        remaining = total
        while remaining > 0:
            if len(self.blocks) >= MAX_RAM_BLOCKS:
                raise self.corrupt("too many RAM blocks in the block list")
            name = cur.string("a RAM block name")
            used = cur.u64(f"the size of RAM block {name!r}")
            if "x-ignore-shared" in self.capabilities:
                cur.u64("a RAM block address")
            if used == 0 or used > remaining:
                raise self.corrupt(f"RAM block {name!r} of {used} bytes does not fit the "
                                   f"{total} bytes the block list announces")
            if name in self.blocks_by_name:
                raise self.corrupt(f"RAM block {name!r} listed twice")
            block = RamBlock(name, used, len(self.blocks))
            self.blocks.append(block)
            self.blocks_by_name[name] = block
            remaining -= used
        self.ram_total = total

    def ram_records(self, first: bool) -> None:
        """Records up to and including RAM_SAVE_FLAG_EOS."""
        cur = self.cur
        page_size = self.page_size
        low = page_size - 1
        sink = self.sink
        blocks_by_name = self.blocks_by_name
        progress = self.progress
        bulk = page_size == BULK_PAGE_SIZE
        while True:
            if bulk and self.last_block is not None and self.bulk(self.last_block):
                if progress is not None and cur.pos >= self.next_progress:
                    progress(cur.pos, cur.size)
                    self.next_progress = cur.pos + (8 << 20)
                continue
            record_offset = cur.pos
            word = cur.u64("a RAM record")
            flags = word & low
            addr = word ^ flags
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind == RAM_SAVE_FLAG_EOS:
                return
            if kind == RAM_SAVE_FLAG_MEM_SIZE:
                if not first:
                    raise self.corrupt(f"RAM block list outside the first RAM section "
                                       f"(offset {record_offset:#x})")
                self.ram_block_list(addr)
                first = False
                continue
            if kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                continue
            if kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
                self._bad_flags(flags, record_offset)
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = self.last_block
                if block is None:
                    raise self.corrupt(f"RAM page at offset {record_offset:#x} continues a "
                                       f"block but no block came before")
            else:
                name = cur.string("a RAM block name")
                found = blocks_by_name.get(name)
                if found is None:
                    raise self.corrupt(f"RAM page at offset {record_offset:#x} names RAM "
                                       f"block {name!r}, which is not in the block list")
                block = self.last_block = found
            if addr >= block.size:
                raise self.corrupt(f"RAM page at offset {record_offset:#x} lies at "
                                   f"{addr:#x} of RAM block {block.name!r}, beyond its "
                                   f"{block.size:#x} bytes")
            if kind == RAM_SAVE_FLAG_ZERO:
                fill = cur.u8("a zero page's fill byte")
                self.zero_pages += 1
                if sink is not None:
                    sink.zero(block, addr, fill)
            else:
                self.normal_pages += 1
                if sink is not None:
                    sink.page(block, addr, cur.view(page_size, "a RAM page"))
                else:
                    cur.skip(page_size, "a RAM page")
            if progress is not None and cur.pos >= self.next_progress:
                progress(cur.pos, cur.size)
                self.next_progress = cur.pos + (8 << 20)

    def bulk(self, block: RamBlock) -> bool:
        """Take the run of records at pos that continue ``block`` and are
        all zero pages (fill 0) or all normal pages, up to
        :data:`BULK_RECORDS` of them, at C speed: their flag bytes are
        checked through strided slices of the window, their headers
        unpacked by one ``struct`` call, and a run of consecutive pages
        handed to the sink at once.  Return False (nothing taken) when the
        record at pos is anything else; the record-by-record walk then takes
        it (and reports any problem).  Only for 4 KiB pages, whose flags
        fill the header's last byte and the low half of the one before."""
        cur = self.cur
        index = cur.window(BULK_RECORDS * (8 + BULK_PAGE_SIZE), BULK_WINDOW)
        buf = cur.buf
        avail = len(buf) - index
        if avail < 9:
            return False
        flag_byte = buf[index + 7]
        if flag_byte == _ZERO_CONTINUE:
            stride = 9
        elif flag_byte == _PAGE_CONTINUE:
            stride = 8 + BULK_PAGE_SIZE
        else:
            return False
        limit = min(avail // stride, BULK_RECORDS)
        if not limit:
            return False
        end = index + limit * stride
        run = bytes(buf[index + 7:end:stride])
        count = len(run) - len(run.lstrip(bytes((flag_byte,))))
        high = bytes(buf[index + 6:index + 6 + count * stride:stride]).translate(_LOW_NIBBLE)
        count = len(high) - len(high.lstrip(b"\0"))   # flag bits 8-11: must be clear
        if stride == 9 and count:                       # fill bytes: must be 0
            fills = bytes(buf[index + 8:index + 8 + count * 9:9])
            count = len(fills) - len(fills.lstrip(b"\0"))
        if not count:
            return False
        words = _run_struct(stride, count).unpack_from(buf, index)
        first = words[0] ^ flag_byte
        last = words[-1] ^ flag_byte
        if max(words) ^ flag_byte >= block.size or \
                words != tuple(range(words[0], words[0] + count * BULK_PAGE_SIZE, BULK_PAGE_SIZE)):
            return False   # beyond the block, or not consecutive: record by record
        sink = self.sink
        if stride == 9:
            self.zero_pages += count
            if sink is not None:
                if self.bulk_sink:
                    sink.zeros(block, first, count)  # type: ignore[attr-defined]
                else:
                    for addr in range(first, last + 1, BULK_PAGE_SIZE):
                        sink.zero(block, addr, 0)
        else:
            self.normal_pages += count
            if sink is not None:
                records = buf[index:index + count * stride]
                if self.bulk_sink:
                    sink.pages(block, first, count, records, stride)  # type: ignore[attr-defined]
                else:
                    for j in range(count):
                        sink.page(block, first + j * BULK_PAGE_SIZE,
                                  records[j * stride + 8:(j + 1) * stride])
        cur.pos += count * stride
        return True

    def _bad_flags(self, flags: int, offset: int) -> None:
        for bit, why in _UNDECODABLE.items():
            if flags & bit:
                raise UnsupportedImageError(
                    f"{self.label}: RAM record at offset {offset:#x} is "
                    f"{RAM_SAVE_FLAG_NAMES[bit]} ({why}); such pages cannot be decoded "
                    f"offline", feature=RAM_SAVE_FLAG_NAMES[bit])
        names = "|".join(n for b, n in RAM_SAVE_FLAG_NAMES.items() if flags & b) or "none"
        raise self.corrupt(f"RAM record at offset {offset:#x} has an unknown combination of "
                           f"flags {flags:#x} ({names})")

    # -- sections -------------------------------------------------------------

    def footer(self, section_id: int) -> None:
        cur = self.cur
        if cur.peek_u8() == QEMU_VM_SECTION_FOOTER:
            cur.u8("a section footer")
            got = cur.u32("a section footer")
            if got != section_id:
                raise self.corrupt(f"section footer at offset {cur.pos - 5:#x} names section "
                                   f"{got}, expected {section_id}")

    def wanted(self, device: Device) -> bool:
        """Keep this device section's bytes (see :data:`KEEP_VMSD_NAMES`)?"""
        if device.size > MAX_KEPT_SECTION_SIZE:
            return False
        if device.vmsd_name in KEEP_VMSD_NAMES:
            return True
        if self.owner_paths_of != len(self.blocks):  # the block list is read once
            self.owner_paths = {_device_path(b.name) for b in self.blocks} - {""}
            self.owner_paths_of = len(self.blocks)
        if (_device_path(device.name) not in self.owner_paths
                or self.kept_owner_bytes + device.size > MAX_KEPT_OWNER_BYTES):
            return False
        self.kept_owner_bytes += device.size
        return True

    def keep(self, device: Device, desc: dict[str, Any], data: bytes) -> None:
        layout: dict[str, tuple[int, int]] = {}
        _layout(desc, "", 0, layout, f"device {device.name!r}")
        self.kept.append(DeviceState(device, data, layout))
        if device.vmsd_name == "globalstate":
            self.globalstate(data, layout)

    def globalstate(self, data: bytes, layout: dict[str, tuple[int, int]]) -> None:
        if "runstate" not in layout or "size" not in layout:
            raise self.corrupt("the globalstate section has no runstate field")
        roff, rsize = layout["runstate"]
        soff, _ = layout["size"]
        size = int.from_bytes(data[soff:soff + 4], "big")
        self._set_runstate(data[roff:roff + rsize], size)
        if "has_vm_was_suspended" in layout:
            self.globalstate_layout = "qemu>=9.0"
            hoff, _ = layout["has_vm_was_suspended"]
            woff, _ = layout.get("vm_was_suspended", (hoff + 1, 1))
            self.vm_was_suspended = bool(data[hoff]) and bool(data[woff])
        else:
            self.globalstate_layout = "qemu<=8.2"
        if self.saved_runstate == "suspended":
            self.vm_was_suspended = True

    def _set_runstate(self, buf: bytes, size: int) -> None:
        # bytes before the first NUL: QEMU 7.2 leaves stale bytes after it
        text = buf[:max(0, min(size - 1, len(buf)))] if size else buf
        text = text.split(b"\0", 1)[0]
        if not text or text.translate(None, _PRINTABLE):  # a byte outside 0x20-0x7E
            raise self.corrupt(f"globalstate holds no readable run state ({bytes(buf[:32])!r})")
        self.saved_runstate = text.decode("ascii")

    def search_globalstate(self, start: int) -> None:
        """Without a VM description: find ``04 <id> 0b "globalstate" 0 1``."""
        cur = self.cur
        needle = b"\x0bglobalstate\x00\x00\x00\x00\x00\x00\x00\x01"
        pos = start
        overlap = len(needle) + 5
        while pos < cur.size:
            chunk = cur._read_at(pos, min(4 << 20, cur.size - pos))
            i = chunk.find(needle)
            if i >= 5 and chunk[i - 5] == QEMU_VM_SECTION_FULL:
                data = cur._read_at(pos + i + len(needle), 4 + 100)
                if len(data) < 4 + 34:
                    raise self.corrupt("the globalstate section is cut short")
                size = int.from_bytes(data[:4], "big")
                # QEMU >= 9.0: runstate[32], has_vm_was_suspended (always 1), ...;
                # QEMU <= 8.2: runstate[100], whose byte 32 is never part of a name
                if data[4 + 32] == 1:
                    self.globalstate_layout = "qemu>=9.0"
                    self._set_runstate(data[4:4 + 32], size)
                    self.vm_was_suspended = bool(data[4 + 33])
                else:
                    self.globalstate_layout = "qemu<=8.2"
                    self._set_runstate(data[4:4 + 100], size)
                if self.saved_runstate == "suspended":
                    self.vm_was_suspended = True
                return
            if len(chunk) < 4 << 20:
                return
            pos += len(chunk) - overlap


def parse_stream(f: StreamFile, size: int, *, ram_sink: RamSink | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 strict: bool = True, label: str = "VM state") -> VMState:
    """Walk the savevm stream in ``f`` (seekable, ``size`` bytes).

    ``ram_sink`` receives every RAM page in stream order.  With
    ``strict=True`` a truncated or corrupt stream raises
    :class:`~qcow2snap.errors.CorruptImageError` and an undecodable page kind
    :class:`~qcow2snap.errors.UnsupportedImageError`; with ``strict=False``
    what was found up to the problem is returned, with ``complete=False``
    (``None`` when it could not be decided) and ``problem`` saying why.
    ``label`` starts every error message.
    """
    cur = _Cursor(f, size, label)
    walker = _Walker(cur, ram_sink, progress)
    desc_offset, desc, desc_problem = _find_vm_description(cur)
    described: list[tuple[Device, dict[str, Any]]] = []
    complete: bool | None = True
    problem: str | None = None
    version = 0
    try:
        if desc is not None:
            page_size = desc.get("page_size")
            if isinstance(page_size, int) and page_size >= 512 and not page_size & (
                    page_size - 1):
                walker.page_size = page_size
                walker.page_size_source = "vm-description"
        if desc is not None:
            try:
                described = _described_devices(desc)
            except CorruptImageError as exc:   # still walk what needs no description
                desc_problem = str(exc)
        version = walker.header()
        complete, problem = _walk_sections(walker, described, desc_offset)
        if desc_problem is not None and complete:
            complete, problem = False, desc_problem
        elif desc_problem is not None and complete is None:
            problem = desc_problem  # the trailer is there, but unusable: say why
    except Qcow2Error as exc:
        if strict:
            raise
        complete = None if isinstance(exc, UnsupportedImageError) else False
        problem = str(exc)
    if strict and complete is False:
        raise walker.corrupt(problem or "the stream is incomplete")
    return _state(walker, size, version, described, desc, complete, problem)


def _state(walker: _Walker, size: int, version: int,
           described: list[tuple[Device, dict[str, Any]]], desc: dict[str, Any] | None,
           complete: bool | None, problem: str | None) -> VMState:
    return VMState(
        size=size, file_version=version, machine_type=walker.machine_type,
        page_size=walker.page_size, page_size_source=walker.page_size_source,
        capabilities=tuple(walker.capabilities), uuid=walker.uuid,
        ram_blocks=tuple(walker.blocks), ram_total_size=walker.ram_total,
        normal_pages=walker.normal_pages, zero_pages=walker.zero_pages,
        sections=tuple(walker.sections), devices=tuple(d for d, _ in described),
        vm_description=desc, saved_runstate=walker.saved_runstate,
        vm_was_suspended=walker.vm_was_suspended,
        globalstate_layout=walker.globalstate_layout, complete=complete, problem=problem,
        device_states=tuple(walker.kept))


def parse_layout(f: StreamFile, size: int, *, label: str = "VM state") -> VMState | None:
    """What a full walk learns of the machine, without walking the RAM: the
    header, the configuration and the RAM block list from the start of the
    stream, then the device sections, found from its end (they fill the
    bytes between the last RAM section and the EOF marker before the VM
    description, whose sizes they have).  ``None`` when that does not work
    out (no usable description, sections other than QEMU's savevm order,
    anything damaged): the caller walks the whole stream instead.  The
    page counts and sections of the result cover only the first RAM
    section (QEMU's holds just the block list)."""
    cur = _Cursor(f, size, label)
    walker = _Walker(cur, None, None)
    try:
        desc_offset, desc, desc_problem = _find_vm_description(cur)
        if desc is None or desc_problem is not None:
            return None
        page_size = desc.get("page_size")
        if isinstance(page_size, int) and page_size >= 512 and not page_size & (page_size - 1):
            walker.page_size = page_size
            walker.page_size_source = "vm-description"
        described = _described_devices(desc)
        version = walker.header()
        kind = cur.u8("a section type")
        if kind == QEMU_VM_CONFIGURATION:
            walker.configuration()
            kind = cur.u8("a section type")
        if kind != QEMU_VM_SECTION_START:
            return None
        section_id = cur.u32("a section id")
        if cur.string("a section name") != "ram":
            return None
        cur.u32("an instance id")
        cur.u32("a version id")
        walker.started[section_id] = "ram"
        walker.ram_records(first=True)
        if not walker.blocks:
            return None
        footer = 5 if cur.peek_u8() == QEMU_VM_SECTION_FOOTER else 0
        walker.footer(section_id)
        tail = 1 + sum(1 + 4 + 1 + len(d.name.encode()) + 4 + 4 + d.size + footer
                       for d, _ in described)
        start = desc_offset - tail
        if start < cur.pos or not described:
            return None
        cur.pos = start
        if cur.peek_u8() != QEMU_VM_SECTION_FULL:
            return None
        complete, problem = _walk_sections(walker, described, desc_offset)
    except Qcow2Error:
        return None
    if complete is not True:
        return None
    return _state(walker, size, version, described, desc, complete, problem)


def _walk_sections(walker: _Walker, described: list[tuple[Device, dict[str, Any]]],
                   desc_offset: int) -> tuple[bool | None, str | None]:
    cur = walker.cur
    next_device = 0
    first_section = True
    while True:
        offset = cur.pos
        if offset >= cur.size:
            raise walker.corrupt(f"the stream ends at byte {cur.size} without the EOF marker")
        kind = cur.u8("a section type")
        if kind == QEMU_VM_CONFIGURATION:
            if not first_section:
                raise walker.corrupt(f"configuration section at offset {offset:#x} is not "
                                     f"the first section")
            walker.configuration()
            first_section = False
            continue
        first_section = False
        if kind == QEMU_VM_EOF:
            break
        if kind == QEMU_VM_COMMAND:
            cur.u16("a command number")
            length = cur.u16("a command length")
            cur.skip(length, "a command's data")
            continue
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            section_id = cur.u32("a section id")
            name = cur.string("a section name")
            instance_id = cur.u32("an instance id")
            version_id = cur.u32("a version id")
            data_offset = cur.pos
            if kind == QEMU_VM_SECTION_START:
                if section_id in walker.started:
                    raise walker.corrupt(f"section id {section_id} started twice")
                walker.started[section_id] = name
                if name != "ram":
                    raise UnsupportedImageError(
                        f"{walker.label}: iterative section {name!r} at offset {offset:#x} "
                        f"cannot be decoded offline", feature=f"section {name}")
                walker.ram_records(first=True)
                if not walker.blocks:
                    raise walker.corrupt("the RAM section has no block list")
            else:
                if next_device >= len(described):
                    if not described:
                        walker.sections.append(Section(kind, section_id, name, instance_id,
                                                       version_id, offset, data_offset,
                                                       data_offset))
                        walker.search_globalstate(offset)
                        return None, ("the stream has no VM description (JSON trailer), so "
                                      "its device sections cannot be walked")
                    raise walker.corrupt(f"device section {name!r} at offset {offset:#x} is "
                                         f"not in the VM description")
                device, desc = described[next_device]
                next_device += 1
                if device.name != name or device.instance_id != instance_id:
                    raise walker.corrupt(
                        f"device section {name!r} instance {instance_id} at offset "
                        f"{offset:#x} does not match the VM description's "
                        f"{device.name!r} instance {device.instance_id}")
                if walker.wanted(device):
                    walker.keep(device, desc, cur.read(device.size, f"section {name!r}"))
                else:
                    cur.skip(device.size, f"section {name!r}")
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            section_id = cur.u32("a section id")
            name = walker.started.get(section_id, "")
            if not name:
                raise walker.corrupt(f"section {section_id} at offset {offset:#x} continues "
                                     f"a section that never started")
            data_offset = cur.pos
            walker.ram_records(first=False)
            walker.sections.append(Section(kind, section_id, name, None, None, offset,
                                           data_offset, cur.pos))
            walker.footer(section_id)
            continue
        else:
            raise walker.corrupt(f"unknown section type {kind:#04x} at offset {offset:#x}")
        walker.sections.append(Section(kind, section_id, name, instance_id, version_id,
                                       offset, data_offset, cur.pos))
        walker.footer(section_id)
    # after EOF: nothing, or the VM description
    if next_device != len(described):
        return False, (f"the stream has {next_device} device sections but its VM description "
                       f"lists {len(described)}")
    if cur.pos == cur.size:
        return True, None
    if desc_offset != cur.pos:
        return False, (f"{cur.size - cur.pos} bytes after the EOF marker at offset "
                       f"{cur.pos - 1:#x} are not a VM description")
    return True, None
