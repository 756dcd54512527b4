"""The savevm stream's vocabulary and byte cursor (part of
:mod:`qcow2snap.vmstate`): QEMU's constants (``migration/savevm.c``,
``migration/ram.c``), the records a walk returns (:class:`VMState` and the
:class:`RamBlock`, :class:`Section`, :class:`Device`, :class:`DeviceState`
in it), the :class:`StreamFile` and :class:`RamSink` protocols, and
``_Cursor``, the sequential reader every other submodule reads through.

The stream is decoded with ``struct`` on a memoryview window instead of
construct: the RAM walk decodes one record per guest page (four million for
a 16 GiB guest), and construct costs 20-50x more per record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CorruptImageError, UnsupportedImageError

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

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_WINDOW = 1 << 20
#: The window the RAM walk's bulk step reads (runs of page records).
BULK_WINDOW = 16 << 20


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


class BulkRamSink(RamSink, Protocol):
    """A :class:`RamSink` that also takes runs of records of consecutive
    pages at once (the walk finds them at C speed; see ``_Walker.bulk``)."""

    def pages(self, block: RamBlock, offset: int, count: int, records: memoryview,
              stride: int) -> None:
        """``count`` normal pages at ``offset``, ``offset + page_size``, ...
        of ``block``: page ``j``'s bytes are ``records[j * stride + 8:
        (j + 1) * stride]`` (each record is its 8-byte header and the page;
        ``records`` is valid only during the call)."""

    def zeros(self, block: RamBlock, offset: int, count: int) -> None:
        """``count`` zero pages (fill 0) at ``offset``, ``offset +
        page_size``, ... of ``block``."""


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

    def _fill(self, offset: int, length: int) -> memoryview:
        """Up to ``length`` bytes from ``offset`` (fewer at the file's end),
        in a new buffer."""
        self.f.seek(offset)
        view = memoryview(bytearray(length))
        got = 0
        while got < length:
            n = self.f.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]

    def _read_at(self, offset: int, length: int) -> bytes:
        return bytes(self._fill(offset, length))

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

    def window(self, need: int, read: int) -> int:
        """Make ``need`` bytes at pos available (fewer at the end of the
        stream), reading ``read`` bytes from pos when fewer are buffered;
        return their index in buf (``len(buf) - index`` bytes are there:
        fewer only if the file is shorter than the stream's size)."""
        index = self.pos - self.buf_start
        left = self.size - self.pos
        if index >= 0 and len(self.buf) - index >= min(need, left):
            return index
        self.buf = self._fill(self.pos, min(max(need, read), left))
        self.buf_start = self.pos
        return 0

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
