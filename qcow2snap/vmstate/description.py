"""The VM description (part of :mod:`qcow2snap.vmstate`): the JSON trailer
QEMU writes after the EOF marker (``0x06, u32 len, JSON``, the data
``scripts/analyze-migration.py`` uses): locating it from the stream's end,
parsing it (at most :data:`MAX_VM_DESCRIPTION_SIZE`), the field layouts of
its device descriptions and the device list with each section's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..errors import CorruptImageError
from .stream import _BE32, Device, _Cursor

#: Upper bound that keeps a damaged stream from costing unbounded memory.
#: The VM description QEMU 7.2 writes for a pc machine is ~100 KiB; parsed
#: JSON takes up to ~25 times its text (a 3-byte ``{},`` becomes a 64-byte
#: dict), so a larger one is not parsed (the stream is read as one without
#: a description) rather than let a hostile one take gigabytes.
MAX_VM_DESCRIPTION_SIZE = 4 << 20

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
