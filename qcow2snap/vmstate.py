"""The savevm stream (layer 1, beside :mod:`qcow2snap.format`): QEMU's
migration stream ("QEVM", QEMU's ``migration/savevm.c``) that ``savevm`` stores inside a
snapshot.

:func:`parse_stream` walks a stream sequentially, as QEMU's loader does:
the header, the configuration section (machine type), the RAM sections
(``ram``: block list, zero and normal pages) and the device sections.
Device sections carry no length, so they are stepped over with the sizes in
the VM-description JSON trailer that follows the EOF marker (the data QEMU's
``scripts/analyze-migration.py`` uses); without a trailer the walk stops at
the first device section and ``globalstate`` is found by its byte pattern.

Guest RAM is handed page by page to an optional :class:`RamSink`; the parser
itself keeps nothing per page, so memory stays bounded whatever the guest
size.  The module does no I/O of its own beyond reading the stream it is
given and depends only on :mod:`qcow2snap.errors`.

The stream is decoded with ``struct`` on a memoryview window instead of
construct: the RAM walk decodes one record per guest page (four million for
a 16 GiB guest), and construct costs 20-50x more per record.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import CorruptImageError, Qcow2Error, UnsupportedImageError

__all__ = [
    "QEMU_VM_FILE_MAGIC",
    "RAM_SAVE_FLAG_NAMES",
    "Device",
    "DeviceState",
    "RamBlock",
    "RamSink",
    "RunState",
    "RunstateCache",
    "Section",
    "StreamFile",
    "VMState",
    "parse_stream",
    "read_runstate",
]

# migration/savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    QEMU_VM_SECTION_START: "start",
    QEMU_VM_SECTION_PART: "part",
    QEMU_VM_SECTION_END: "end",
    QEMU_VM_SECTION_FULL: "full",
}

# migration/ram.c
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02          # historic name RAM_SAVE_FLAG_COMPRESS
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_SAVE_FLAG_NAMES = {
    RAM_SAVE_FLAG_FULL: "RAM_SAVE_FLAG_FULL",
    RAM_SAVE_FLAG_ZERO: "RAM_SAVE_FLAG_ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "RAM_SAVE_FLAG_MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "RAM_SAVE_FLAG_PAGE",
    RAM_SAVE_FLAG_EOS: "RAM_SAVE_FLAG_EOS",
    RAM_SAVE_FLAG_CONTINUE: "RAM_SAVE_FLAG_CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "RAM_SAVE_FLAG_XBZRLE",
    RAM_SAVE_FLAG_HOOK: "RAM_SAVE_FLAG_HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "RAM_SAVE_FLAG_COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "RAM_SAVE_FLAG_MULTIFD_FLUSH",
}

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

#: Upper bounds that keep a damaged stream from costing unbounded memory.
#: The VM description QEMU 7.2 writes for a pc machine is ~100 KiB; parsed
#: JSON takes up to ~25 times its text (a 3-byte ``{},`` becomes a 64-byte
#: dict), so a larger one is not parsed (the stream is read as one without
#: a description) rather than let a hostile one take gigabytes.
MAX_VM_DESCRIPTION_SIZE = 4 << 20
MAX_KEPT_SECTION_SIZE = 1 << 20
MAX_RAM_BLOCKS = 65536

#: Device sections whose bytes are kept for later decoding (CPU registers
#: for ELF notes, the chipset's PAM/SMRAM registers, the run state).
KEEP_VMSD_NAMES = frozenset({"cpu", "I440FX", "mch", "globalstate"})

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_WINDOW = 1 << 20

#: The bytes a run state name may hold (0x20-0x7E).
_PRINTABLE = bytes(range(0x20, 0x7F))


class StreamFile(Protocol):
    """What the parser reads: a seekable binary file (``io.BytesIO``, an
    open file, :class:`~qcow2snap.reader.DiskReader`)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def readinto(self, buffer: Any, /) -> int | None: ...


class RamSink(Protocol):
    """Receives guest RAM as the stream is walked."""

    def page(self, block: RamBlock, offset: int, data: memoryview) -> None:
        """A normal page: ``data`` (valid only during the call) belongs at
        ``offset`` of ``block``."""

    def zero(self, block: RamBlock, offset: int, fill: int) -> None:
        """A zero page (every byte is ``fill``, 0 from any modern QEMU)."""


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAM block of the ``ram`` section's block list (``used_length``)."""

    name: str
    size: int
    index: int


@dataclass(frozen=True, slots=True)
class Section:
    """One section of the stream: where it starts and where its data ends."""

    type: int               # QEMU_VM_SECTION_*
    section_id: int
    name: str               # idstr ("ram", "cpu", "0000:00:00.0/I440FX", ...)
    instance_id: int | None
    version_id: int | None
    offset: int             # stream offset of the section type byte
    data_offset: int
    end_offset: int         # end of the data (the footer, if any, follows)

    @property
    def type_name(self) -> str:
        return SECTION_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True, slots=True)
class Device:
    """One device section as the VM description lists it."""

    name: str
    instance_id: int
    vmsd_name: str
    version: int
    size: int               # bytes of section data


@dataclass(frozen=True)
class DeviceState:
    """A kept device section: its bytes and the layout of its fields."""

    device: Device
    data: bytes
    fields: dict[str, tuple[int, int]]   # flattened name -> (offset, size)

    def raw(self, name: str) -> bytes:
        try:
            offset, size = self.fields[name]
        except KeyError:
            raise CorruptImageError(
                f"VM state: device {self.device.name!r} has no field {name!r} in its "
                f"VM description", structure="VM state") from None
        return self.data[offset:offset + size]

    def uint(self, name: str) -> int:
        """A VMState integer field (big-endian, as qemu_put_be* writes it)."""
        return int.from_bytes(self.raw(name), "big")

    def has(self, name: str) -> bool:
        return name in self.fields


@dataclass(frozen=True)
class VMState:
    """What a walk of one stream found."""

    size: int
    file_version: int
    machine_type: str | None
    page_size: int
    page_size_source: str                 # "vm-description", "configuration", "default"
    capabilities: tuple[str, ...]
    uuid: str | None
    ram_blocks: tuple[RamBlock, ...]
    ram_total_size: int
    normal_pages: int
    zero_pages: int
    sections: tuple[Section, ...]
    devices: tuple[Device, ...]
    vm_description: dict[str, Any] | None
    saved_runstate: str | None            # the string in globalstate
    vm_was_suspended: bool | None         # QEMU >= 9.0 layout only
    globalstate_layout: str | None        # "qemu<=8.2", "qemu>=9.0"
    complete: bool | None                 # None: cannot be verified
    problem: str | None                   # why complete is not True
    device_states: tuple[DeviceState, ...] = field(default=())

    @property
    def runstate(self) -> str | None:
        """The run state at save time; a guest that was in S3 is
        ``"suspended"`` whichever globalstate layout recorded it."""
        if self.saved_runstate is None:
            return None
        if self.vm_was_suspended:
            return "suspended"
        return self.saved_runstate

    def ram_block(self, name: str) -> RamBlock:
        for block in self.ram_blocks:
            if block.name == name:
                return block
        known = ", ".join(b.name for b in self.ram_blocks) or "none"
        raise UnsupportedImageError(f"VM state has no RAM block {name!r} (blocks: {known})",
                                    feature="RAM block")

    def device_state(self, vmsd_name: str) -> list[DeviceState]:
        return [d for d in self.device_states if d.device.vmsd_name == vmsd_name]


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

class _Cursor:
    """Sequential reads over a stream of known size through a 1 MiB window."""

    __slots__ = ("buf", "buf_start", "f", "label", "pos", "size")

    def __init__(self, f: StreamFile, size: int, label: str) -> None:
        self.f = f
        self.size = size
        self.label = label
        self.buf = memoryview(b"")
        self.buf_start = 0
        self.pos = 0

    def _read_at(self, offset: int, length: int) -> bytes:
        self.f.seek(offset)
        out = bytearray(length)
        view = memoryview(out)
        got = 0
        while got < length:
            n = self.f.readinto(view[got:])
            if not n:
                break
            got += n
        return bytes(out) if got == length else bytes(out[:got])

    def _need(self, n: int, what: str) -> int:
        """Make ``n`` bytes at pos available; return their index in buf."""
        if self.pos + n > self.size:
            raise CorruptImageError(f"{self.label}: the stream ends at byte {self.size} inside "
                             f"{what} (at offset {self.pos:#x}, {n} bytes needed)",
                             structure="VM state")
        index = self.pos - self.buf_start
        if index < 0 or index + n > len(self.buf):
            length = min(max(n, _WINDOW), self.size - self.pos)
            data = self._read_at(self.pos, length)
            if len(data) < n:
                raise CorruptImageError(f"{self.label}: could read only {len(data)} of {n} bytes "
                                 f"at offset {self.pos:#x} ({what})", structure="VM state")
            self.buf = memoryview(data)
            self.buf_start = self.pos
            index = 0
        return index

    def u8(self, what: str) -> int:
        i = self._need(1, what)
        self.pos += 1
        return self.buf[i]

    def peek_u8(self) -> int | None:
        if self.pos >= self.size:
            return None
        i = self._need(1, "a section marker")
        return self.buf[i]

    def u16(self, what: str) -> int:
        i = self._need(2, what)
        self.pos += 2
        return int(_BE16.unpack_from(self.buf, i)[0])

    def u32(self, what: str) -> int:
        i = self._need(4, what)
        self.pos += 4
        return int(_BE32.unpack_from(self.buf, i)[0])

    def u64(self, what: str) -> int:
        i = self._need(8, what)
        self.pos += 8
        return int(_BE64.unpack_from(self.buf, i)[0])

    def view(self, n: int, what: str) -> memoryview:
        """``n`` bytes (n <= window), valid until the next read."""
        i = self._need(n, what)
        self.pos += n
        return self.buf[i:i + n]

    def read(self, n: int, what: str) -> bytes:
        if n <= _WINDOW:
            return bytes(self.view(n, what))
        if self.pos + n > self.size:
            self._need(n, what)  # raises
        data = self._read_at(self.pos, n)
        if len(data) < n:
            raise CorruptImageError(f"{self.label}: short read at offset {self.pos:#x} ({what})",
                             structure="VM state")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            self._need(n, what)  # raises
        self.pos += n

    def string(self, what: str) -> str:
        """``u8 len, bytes`` (QEMU's qemu_get_counted_string)."""
        n = self.u8(what)
        return bytes(self.view(n, what)).decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# The VM description (JSON trailer)
# ---------------------------------------------------------------------------

#: The first span of the stream's end searched for the VM description
#: (then 8x as much, up to :data:`MAX_VM_DESCRIPTION_SIZE`).
VM_DESCRIPTION_FIRST_SPAN = 1 << 20


def _locate_vm_description(cur: _Cursor, first_span: int | None = None
                           ) -> tuple[int, int, bytes]:
    """(offset of the 0x06 marker or -1, start, tail): ``tail`` is the
    stream from ``start`` to its end, the last span read.

    The trailer is ``0x06, u32 len, len bytes of JSON`` ending the stream;
    JSON text holds no 0x06 byte, so the last 0x06 whose length field
    reaches exactly the end and that is followed by ``{`` is the marker.
    The spans read only decide the cost: the marker found is always the last
    one in the final span (the last ``MAX_VM_DESCRIPTION_SIZE`` bytes), so
    ``first_span`` (when it is smaller than the usual first span) is tried
    before the usual ones without changing the result.
    """
    size = cur.size
    spans = [min(size, VM_DESCRIPTION_FIRST_SPAN)]
    while spans[-1] < min(size, MAX_VM_DESCRIPTION_SIZE):
        spans.append(min(size, spans[-1] * 8, MAX_VM_DESCRIPTION_SIZE))
    if first_span is not None and 0 < first_span < spans[0]:
        spans.insert(0, first_span)
    for span in spans:
        start = size - span
        tail = cur._read_at(start, span)
        p = len(tail)
        while True:
            p = tail.rfind(b"\x06", 0, p)
            if p < 0:
                break
            if p + 5 < len(tail) and tail[p + 5] == 0x7B:  # "{"
                (length,) = _BE32.unpack_from(tail, p + 1)
                if start + p + 5 + length == size:
                    return start + p, start, tail
    return -1, start, tail


def _parse_vm_description(text: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the parsed JSON object, or None and why it is not one)."""
    try:
        desc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"the VM description is not valid JSON ({exc})"
    except RecursionError:
        return None, "the VM description is nested too deeply"
    if not isinstance(desc, dict):
        return None, "the VM description is not a JSON object"
    return desc, None


def _find_vm_description(cur: _Cursor) -> tuple[int, dict[str, Any] | None, str | None]:
    """(offset of the 0x06 marker or -1, parsed JSON, problem)."""
    offset, start, tail = _locate_vm_description(cur)
    if offset < 0:
        return -1, None, None
    desc, problem = _parse_vm_description(tail[offset - start + 5:])
    return offset, desc, problem


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptImageError(f"VM description: {where} has no valid {key!r}",
                                structure="VM state")
    return value


def _fields(desc: dict[str, Any], where: str, depth: int
            ) -> Iterator[tuple[str, int, int, dict[str, Any] | None]]:
    """The checked fields of a VMSD description: (name, size, count or -1
    when not an array, the nested description to lay out per element)."""
    if depth > 32:
        raise CorruptImageError(f"VM description: {where} nests too deeply",
                                structure="VM state")
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise CorruptImageError(f"VM description: {where} has invalid fields",
                                structure="VM state")
    for f in fields:
        if not isinstance(f, dict):
            raise CorruptImageError(f"VM description: {where} has an invalid field",
                                    structure="VM state")
        name = str(f.get("name", "?"))
        size = _int(f, "size", f"field {name!r} of {where}")
        count = f.get("array_len", 1)
        if not isinstance(count, int) or count < 0 or count > 1 << 24:
            raise CorruptImageError(f"VM description: field {name!r} of {where} has an "
                                    f"invalid array_len", structure="VM state")
        inner = f.get("struct") if isinstance(f.get("struct"), dict) else (
            f if f.get("type") == "tmp" else None)
        yield name, size, count if "array_len" in f else -1, (
            inner if count <= 4096 else None)


def _subsections(desc: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The checked subsections of a VMSD description: (vmsd_name, description)."""
    subsections = desc.get("subsections", [])
    if not isinstance(subsections, list):
        raise CorruptImageError(f"VM description: {where} has invalid subsections",
                                structure="VM state")
    for sub in subsections:
        if not isinstance(sub, dict):
            raise CorruptImageError(f"VM description: {where} has an invalid subsection",
                                    structure="VM state")
        yield str(sub.get("vmsd_name", "")), sub


def _layout(desc: dict[str, Any], prefix: str, base: int,
            out: dict[str, tuple[int, int]], where: str, depth: int = 0) -> int:
    """Flatten a VMSD description (fields, then subsections) into ``out``;
    return the number of stream bytes it covers."""
    offset = base
    for name, size, count, inner in _fields(desc, where, depth):
        for i in range(max(count, 1) if count else 0):
            full = f"{prefix}{name}[{i}]" if count >= 0 else f"{prefix}{name}"
            out[full] = (offset, size)
            if inner is not None:
                nested: dict[str, tuple[int, int]] = {}
                if _layout(inner, full + ".", offset, nested, where, depth + 1) == size:
                    out.update(nested)
            offset += size
    for sub_name, sub in _subsections(desc, where):
        # 0x05, u8 len, name, u32 version_id
        offset += 6 + len(sub_name.encode())
        offset += _layout(sub, f"{sub_name}:", offset, out, f"{where}/{sub_name}", depth + 1)
    return offset - base


def _layout_size(desc: dict[str, Any], where: str, depth: int = 0) -> int:
    """What :func:`_layout` returns, with the same checks and errors, without
    naming every array element (the cost of a VM description's layout)."""
    total = 0
    for _, size, count, inner in _fields(desc, where, depth):
        n = max(count, 1) if count else 0
        if inner is not None and n:
            # every element lays out the same description (only the names
            # differ): checking it once raises what the first element would
            _layout_size(inner, where, depth + 1)
        total += n * size
    for sub_name, sub in _subsections(desc, where):
        total += 6 + len(sub_name.encode()) + _layout_size(sub, f"{where}/{sub_name}",
                                                           depth + 1)
    return total


def _described_devices(desc: dict[str, Any] | None) -> list[tuple[Device, dict[str, Any]]]:
    if desc is None:
        return []
    devices = desc.get("devices", [])
    if not isinstance(devices, list):
        raise CorruptImageError("VM description: 'devices' is not a list", structure="VM state")
    out = []
    for d in devices:
        if not isinstance(d, dict):
            raise CorruptImageError("VM description: a device entry is not an object",
                                    structure="VM state")
        name = str(d.get("name", ""))
        size = _layout_size(d, f"device {name!r}")
        version = d.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CorruptImageError(f"VM description: device {name!r} has no valid 'version'",
                                    structure="VM state")
        out.append((Device(name, _int(d, "instance_id", f"device {name!r}"),
                           str(d.get("vmsd_name", name)), version, size), d))
    return out


# ---------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------

class _Walker:
    def __init__(self, cur: _Cursor, sink: RamSink | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.cur = cur
        self.label = cur.label
        self.sink = sink
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
        while True:
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
                if device.vmsd_name in KEEP_VMSD_NAMES and device.size <= MAX_KEPT_SECTION_SIZE:
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


@dataclass(frozen=True, slots=True)
class RunState:
    """The ``globalstate`` record, read without walking the stream."""

    saved_runstate: str
    vm_was_suspended: bool | None
    layout: str

    @property
    def runstate(self) -> str:
        return "suspended" if self.vm_was_suspended else self.saved_runstate


#: How far from the end :func:`read_runstate` looks for ``globalstate``
#: when the stream has no VM description.
RUNSTATE_SEARCH_SPAN = 4 << 20

#: How many devices before the EOF marker :func:`read_runstate` looks at.
RUNSTATE_DEVICES = 64

#: Bytes read before a VM description of a known length, for the sections
#: that end the stream (``globalstate``: 134 bytes with its footer).
RUNSTATE_REACH = 4096


class _Description:
    """One VM description text, as :func:`read_runstate` uses it: parsed
    once; its device list laid out on first use, then only the last
    :data:`RUNSTATE_DEVICES` devices kept."""

    __slots__ = ("_desc", "_devices", "_error", "_layouts", "problem")

    def __init__(self, text: bytes) -> None:
        self._desc, self.problem = _parse_vm_description(text)
        self._devices: tuple[tuple[Device, dict[str, Any]], ...] | None = None
        self._error: CorruptImageError | None = None
        self._layouts: dict[int, dict[str, tuple[int, int]]] = {}

    def last_devices(self) -> tuple[tuple[Device, dict[str, Any]], ...]:
        """The last devices, last first, with their descriptions; raises
        what laying out the device list raises."""
        if self._devices is None:
            if self._error is not None:
                raise self._error.with_traceback(None)
            try:
                described = _described_devices(self._desc)[-RUNSTATE_DEVICES:]
            except CorruptImageError as exc:
                self._error, self._desc = exc, None
                raise
            self._devices, self._desc = tuple(reversed(described)), None
        return self._devices

    def layout(self, index: int) -> dict[str, tuple[int, int]]:
        """The field layout of device ``index`` of :meth:`last_devices`."""
        layout = self._layouts.get(index)
        if layout is None:
            layout = {}
            _layout(self.last_devices()[index][1], "", 0, layout, "device 'globalstate'")
            self._layouts[index] = layout
        return layout


class RunstateCache:
    """What :func:`read_runstate` learns from one stream that makes the next
    cheap; share one across the snapshots of a listing.

    Snapshots of one VM carry the same few VM descriptions (JSON texts of
    ~100 KB, whose parse and layout cost milliseconds): the last
    :attr:`MAX_DESCRIPTIONS` distinct texts are kept with what was taken from
    them, and a new text is compared byte for byte with those of its length.
    The longest description seen sizes the first span read from the end of
    the next stream (the stream's last ~100 KB instead of 1 MiB).  Neither
    changes any result: a text is reused only when it is identical, and the
    spans read do not decide which marker is found.
    """

    MAX_DESCRIPTIONS = 8

    def __init__(self) -> None:
        self.description_length = 0
        self._known: list[tuple[bytes, _Description]] = []

    def first_span(self) -> int | None:
        """How much of a stream's end :func:`read_runstate` reads first
        with this cache (``None``: the usual first span)."""
        if not self.description_length:
            return None
        return self.description_length + 6 + RUNSTATE_REACH

    def description(self, tail: bytes, start: int) -> _Description:
        """The description whose text is ``tail[start:]`` (compared in
        place: no copy of the text unless it is new)."""
        known = self._known
        length = len(tail) - start
        self.description_length = max(self.description_length, length)
        for i, (seen, found) in enumerate(known):
            if len(seen) == length and tail.startswith(seen, start):
                if i:
                    known.insert(0, known.pop(i))
                return found
        text = tail[start:]
        found = _Description(text)
        known.insert(0, (text, found))
        del known[self.MAX_DESCRIPTIONS:]
        return found


def read_runstate(f: StreamFile, size: int, *, label: str = "VM state",
                  cache: RunstateCache | None = None, quick: bool = True) -> RunState | None:
    """The run state at save time, read from the end of the stream only
    (for listings): the device sections are located backwards from the EOF
    marker with the sizes in the VM description, and ``globalstate`` is
    decoded where it is found.  ``None`` if the stream has no globalstate;
    CorruptImageError if what is found is damaged.

    ``cache`` (shared by the calls of one listing) makes the next call cheap
    without changing its result; ``quick=False`` keeps it from sizing the
    first read (then the last :data:`VM_DESCRIPTION_FIRST_SPAN` bytes are
    read first, whatever the description's length)."""
    cur = _Cursor(f, size, label)
    walker = _Walker(cur, None, None)
    first_span = cache.first_span() if cache is not None and quick else None
    desc_offset, tail_start, tail = _locate_vm_description(cur, first_span)
    tail_end = tail_start + len(tail)

    def read(offset: int, length: int) -> bytes:
        if tail_start <= offset and offset + length <= tail_end:
            return tail[offset - tail_start:offset - tail_start + length]
        return cur._read_at(offset, length)

    if desc_offset < 0:
        walker.search_globalstate(max(0, size - RUNSTATE_SEARCH_SPAN))
    else:
        text_start = desc_offset - tail_start + 5
        if cache is None:
            described = _Description(tail[text_start:])
        else:
            described = cache.description(tail, text_start)
        if described.problem is not None:
            raise walker.corrupt(described.problem)
        end = desc_offset - 1
        if end < 0 or read(end, 1) != bytes([QEMU_VM_EOF]):
            raise walker.corrupt("no EOF marker before the VM description")
        for index, (device, _) in enumerate(described.last_devices()):
            name = device.name.encode()
            header_size = 1 + 4 + 1 + len(name) + 4 + 4
            for footer in (5, 0):
                data_start = end - footer - device.size
                start = data_start - header_size
                if start < 0:
                    continue
                head = read(start, header_size)
                foot = read(end - footer, footer)
                section_id = head[1:5]
                if (head[0] == QEMU_VM_SECTION_FULL and head[5] == len(name)
                        and head[6:6 + len(name)] == name
                        and head[6 + len(name):10 + len(name)] == _BE32.pack(device.instance_id)
                        and (not footer or foot == bytes([QEMU_VM_SECTION_FOOTER]) + section_id)):
                    break
            else:
                raise walker.corrupt(f"device section {device.name!r} is not where the VM "
                                     f"description puts it")
            if device.vmsd_name == "globalstate":
                walker.globalstate(read(data_start, device.size), described.layout(index))
                break
            end = start
    if walker.saved_runstate is None or walker.globalstate_layout is None:
        return None
    return RunState(walker.saved_runstate, walker.vm_was_suspended, walker.globalstate_layout)
