"""The run state at save time, read from the stream's end only (part of
:mod:`qcow2snap.vmstate`, for listings): :func:`read_runstate` locates the
device sections backwards from the EOF marker with the VM description's
sizes and decodes ``globalstate``; :class:`RunstateCache` (with
``_Description``) keeps what one stream teaches for the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CorruptImageError
from .description import (
    _described_devices,
    _layout,
    _locate_vm_description,
    _parse_vm_description,
)
from .stream import (
    _BE32,
    QEMU_VM_EOF,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    Device,
    StreamFile,
    _Cursor,
)
from .walk import _Walker


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
