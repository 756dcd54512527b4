"""Presentation: turn what the operations found into qemu-img-compatible
JSON objects and text (layer below the CLI; no click, no I/O).

Every function here takes records the operations layer filled in (an
image's parsed metadata, :mod:`qcow2snap.ops.inspection`'s facts, edit and
extraction results, check reports) and returns JSON-ready objects or text;
none reads a file.  JSON objects carry ``qemu-img info --output=json``'s
keys with the same values, plus qcow2snap's own keys beside them
(documented in docs/cli.md).  Text meant for a terminal goes through
:func:`escape_controls` in the CLI.

The module is about 1,100 lines because all rendering is here by design:
a new output format goes next to the ones it must agree with (text and
JSON of one record side by side, one banner-marked block per command), and
nothing else is here.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import format as fmt
from .image import Qcow2Image
from .model import Snapshot

if TYPE_CHECKING:
    import json

    from .ops.check_report import CheckReport, RepairReport
    from .ops.compact import CompactResult
    from .ops.edit import EditResult
    from .ops.extract import ExtractResult
    from .ops.inspection import ImageFacts, SnapshotComparison, SnapshotFacts
    from .ops.memory import MemoryResult
    from .ops.recover import RecoveredSnapshot, RecoveryReport
    from .ops.recover_apply import RecoverResult, RestoredSnapshot
    from .ops.usage import ImageUsage, LayerUsage, UsageReport
    from .vmstate import VMState

__all__ = [
    "check_json",
    "check_text",
    "comparison_json",
    "comparison_text",
    "edit_exit_status",
    "edit_results_json",
    "edit_results_text",
    "escape_controls",
    "extract_result_json",
    "image_info_json",
    "info_text",
    "json_list_parts",
    "json_parts",
    "memory_result_json",
    "size_to_str",
    "snapshot_json",
    "snapshot_list_text",
    "snapshot_table_text",
    "vm_state_dump_json",
    "vm_state_json",
    "vm_state_text",
]


# ---------------------------------------------------------------------------
# JSON text
# ---------------------------------------------------------------------------

def json_parts(value: Any) -> Iterator[str]:
    """``json.dumps(value, indent=4, ensure_ascii=False)`` in parts (see
    :func:`_json_parts`): what every ``--json`` prints."""
    return _json_parts(value, _json_encoder())


def json_list_parts(items: Iterable[Any]) -> Iterator[str]:
    """:func:`json_parts` of ``list(items)``, each item encoded as soon as it
    is made (a 65,536-snapshot listing need not hold 65,536 objects)."""
    return _json_list_parts(items, _json_encoder(), 0)


_JSON_INDENT = 4
#: List items encoded together (one call of the encoder for each batch)
_JSON_BATCH = 512


def _json_encoder() -> json.JSONEncoder:
    import json  # only --json prints it (start-up: docs/performance.md)
    return json.JSONEncoder(indent=_JSON_INDENT, ensure_ascii=False)


def _json_parts(value: Any, encoder: json.JSONEncoder, depth: int = 0) -> Iterator[str]:
    """The text ``encoder.encode(value)`` in parts: the outer container and
    the lists in it are opened here, and list items are encoded a batch at
    a time.

    Encoded whole, a large listing costs far more memory than its text: the
    indenting encoder is pure Python and gathers every small piece of the
    text (~50 an object) in one list before joining them.  The parts join to
    exactly the encoder's text: the text of a value nested N levels deep is
    its own text with N indents after every newline (strings are written
    with escapes, never with a raw newline)."""
    pad = "\n" + " " * (_JSON_INDENT * depth)
    if depth < 2 and isinstance(value, (list, tuple)):
        yield from _json_list_parts(value, encoder, depth)
    elif depth == 0 and isinstance(value, dict) and value:
        opening = "{"
        for key, item in value.items():
            # the key as the encoder writes it (a string, number, bool or
            # null), cut from '{\n    KEY: null\n}'
            key_text = encoder.encode({key: None})[2 + _JSON_INDENT:-8]
            yield f"{opening}{pad}{' ' * _JSON_INDENT}{key_text}: "
            yield from _json_parts(item, encoder, depth + 1)
            opening = ","
        yield pad + "}"
    else:
        yield encoder.encode(value).replace("\n", pad)


def _json_list_parts(items: Iterable[Any], encoder: json.JSONEncoder, depth: int
                     ) -> Iterator[str]:
    """:func:`_json_parts` of a list, for any iterable of its items."""
    pad = "\n" + " " * (_JSON_INDENT * depth)
    inner = pad + " " * _JSON_INDENT
    opening = "[" + inner
    from json.encoder import encode_basestring as quote  # the encoder's, ensure_ascii=False
    rest = iter(items)
    while batch := list(itertools.islice(rest, _JSON_BATCH)):
        texts = [text for item in batch
                 if (text := _flat_object_text(item, inner, quote)) is not None]
        if len(texts) == len(batch):
            yield opening + ("," + inner).join(texts)
        else:
            # the batch's text is '[\n    ITEM,\n    ITEM\n]': keep the items
            yield opening + encoder.encode(batch)[2 + _JSON_INDENT:-2].replace("\n", pad)
        opening = "," + inner
    yield "[]" if opening[0] == "[" else pad + "]"


def _flat_object_text(obj: Any, pad: str, quote: Callable[[str], str]) -> str | None:
    """The indenting encoder's text of a dict of string keys and string,
    integer, boolean or null values, starting a line that ``pad`` starts
    (the objects of a listing: the encoder is pure Python and costs ~5x
    this), or ``None`` for anything else.  ``quote`` is the encoder's
    string quoting (``json.encoder.encode_basestring``)."""
    if type(obj) is not dict or not obj:
        return None
    inner = pad + " " * _JSON_INDENT
    lines = []
    for key, value in obj.items():
        kind = type(value)
        if type(key) is not str:
            return None
        if kind is str:
            text = quote(value)
        elif value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif kind is int:
            text = int.__repr__(value)
        else:
            return None
        lines.append(f"{quote(key)}: {text}")
    return "{" + inner + ("," + inner).join(lines) + pad + "}"



def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` fit for a terminal: every character that is not printable
    (C0 and C1 controls such as ESC, which start CSI and OSC sequences; DEL;
    format characters such as bidirectional overrides; line separators) is
    shown as a Python-style escape (``\\x1b``, ``\\u202e``).  Names from an
    image are attacker-controlled and must never drive the terminal; JSON
    output escapes them by itself and keeps the exact text."""
    if text.isprintable():
        return text
    if keep_newlines and "\n" in text:
        return "\n".join(escape_controls(line, keep_newlines=False)
                         for line in text.split("\n"))
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def size_to_str(value: int) -> str:
    """QEMU's ``size_to_str``: "0 B", "999 B", "0.977 KiB", "1 KiB", "423 KiB"."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    # frexp(value / (1000/1024)): the binary exponent, then the unit below it
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    i = int((exponent - 1) / 10) * 10  # C division truncates toward zero
    if i < 0:
        i = 0
    number = value / float(1 << i)
    return f"{_format_g3(number)} {suffixes[i // 10]}B"


def _format_g3(number: float) -> str:
    return f"{number:0.3g}"


def _path_combine(base: str, name: str) -> str:
    """QEMU's ``path_combine``: a relative name is relative to the directory
    part of ``base`` (as given, not made absolute)."""
    if os.path.isabs(name) or not base or "/" not in base:
        return name
    return base[:base.rfind("/") + 1] + name


def snapshot_json(facts: SnapshotFacts) -> dict[str, Any]:
    """One snapshot as ``qemu-img info``'s SnapshotInfo, plus our keys."""
    snapshot = facts.snapshot
    obj: dict[str, Any] = {
        "id": _qemu_string(snapshot.id_bytes, 127),
        "name": _qemu_string(snapshot.name_bytes, 255),
        "date-sec": snapshot.date_sec,
        "date-nsec": snapshot.date_nsec,
        "vm-clock-sec": snapshot.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": snapshot.vm_clock_nsec % 1_000_000_000,
        "vm-state-size": snapshot.vm_state_size,
    }
    if snapshot.icount is not None:
        obj["icount"] = snapshot.icount
    # qcow2snap's own keys
    obj["disk-size"] = snapshot.disk_size
    obj["date"] = snapshot.date.isoformat()
    obj["l1-table-offset"] = snapshot.l1_table_offset
    obj["l1-size"] = snapshot.l1_size
    obj["extra-data-size"] = snapshot.extra_data_size
    if snapshot.unknown_extra:
        obj["unknown-extra-data"] = snapshot.unknown_extra.hex()
    if snapshot.id_bytes != obj["id"].encode() or snapshot.name_bytes != obj["name"].encode():
        obj["raw-id"] = snapshot.id_bytes.hex()
        obj["raw-name"] = snapshot.name_bytes.hex()
    if facts.vm_state_offset is not None:
        obj["vm-state-offset"] = facts.vm_state_offset
        obj["runstate"] = facts.runstate
    return obj


def _qemu_string(raw: bytes, limit: int) -> str:
    """How QEMU's tools show a stored string: up to the first NUL, at most
    ``limit`` bytes (``id_str[128]`` / ``name[256]``)."""
    return raw.split(b"\0", 1)[0][:limit].decode("utf-8", "replace")


def _format_specific(image: Qcow2Image) -> dict[str, Any]:
    h = image.header
    data: dict[str, Any]
    if h.version == fmt.QCOW_VERSION_2:
        data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": h.refcount_bits}
    else:
        data = {
            "compat": "1.1",
            "compression-type": image.compression_type_name,
            "lazy-refcounts": image.lazy_refcounts,
            "refcount-bits": h.refcount_bits,
            "corrupt": image.corrupt,
            "extended-l2": image.extended_l2,
        }
        if image.data_file_name is not None:
            data["data-file"] = image.data_file_name
        if image.has_data_file:
            data["data-file-raw"] = bool(h.autoclear_features & fmt.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
    if image.encrypted:
        data["encrypt"] = {"format": fmt.CRYPT_METHOD_NAMES.get(h.crypt_method, "unknown")}
    return {"type": "qcow2", "data": data}


def image_info_json(facts: ImageFacts) -> dict[str, Any]:
    """``qemu-img info --output=json`` for one image, plus our keys."""
    image = facts.image
    h = image.header
    filename = facts.filename
    obj: dict[str, Any] = {}
    if facts.snapshots:
        obj["snapshots"] = [snapshot_json(s) for s in facts.snapshots]
    obj["virtual-size"] = image.size
    obj["filename"] = filename
    obj["cluster-size"] = image.cluster_size
    obj["format"] = "qcow2"
    if facts.actual_size is not None:
        obj["actual-size"] = facts.actual_size
    if image.encrypted:
        obj["encrypted"] = True
    obj["format-specific"] = _format_specific(image)
    if image.backing_file_name is not None:
        obj["backing-filename"] = image.backing_file_name
        obj["full-backing-filename"] = _path_combine(filename, image.backing_file_name)
        if image.backing_format is not None:
            obj["backing-filename-format"] = image.backing_format
    obj["dirty-flag"] = image.dirty
    # qcow2snap's own keys
    obj["version"] = h.version
    obj["header-length"] = h.header_length
    obj["l1-table-offset"] = h.l1_table_offset
    obj["l1-size"] = h.l1_size
    obj["refcount-table-offset"] = h.refcount_table_offset
    obj["refcount-table-clusters"] = h.refcount_table_clusters
    obj["snapshot-table-offset"] = h.snapshots_offset
    obj["snapshot-table-size"] = image.snapshot_table.size
    obj["nb-snapshots"] = h.nb_snapshots
    if image.ignored_snapshots:
        # entries QEMU does not list (external data file): not "snapshots"
        obj["ignored-snapshots"] = [{"id": _qemu_string(s.id_bytes, 127),
                                     "name": _qemu_string(s.name_bytes, 255)}
                                    for s in image.ignored_snapshots]
    obj["file-length"] = image.file_size
    obj["features"] = {
        "incompatible": image.describe_features(fmt.QCOW2_FEAT_TYPE_INCOMPATIBLE,
                                                h.incompatible_features),
        "compatible": image.describe_features(fmt.QCOW2_FEAT_TYPE_COMPATIBLE,
                                              h.compatible_features),
        "autoclear": image.describe_features(fmt.QCOW2_FEAT_TYPE_AUTOCLEAR,
                                             h.autoclear_features),
    }
    obj["extensions"] = [
        {"type": f"{e.type:#010x}", "kind": e.kind, "length": e.declared_length,
         "offset": e.offset}
        for e in image.extensions if e.type != fmt.QCOW2_EXT_MAGIC_END]
    chain = []
    for link_facts in facts.chain:
        link = link_facts.link
        entry: dict[str, Any] = {"filename": link.path, "named": link.named,
                                 "resolved": link_facts.resolved, "followed": link.followed}
        if link.followed:
            entry["format"] = link.format
            entry["virtual-size"] = link.virtual_size
        else:
            entry["reason"] = link.reason
            obj["backing-chain-error"] = link.reason
        chain.append(entry)
    obj["backing-chain"] = chain
    if image.lock_state is not None:
        obj["in-use"] = image.lock_state.in_use
        if image.lock_state.in_use:
            obj["qemu-locks"] = image.lock_state.describe()
    return obj


# ---------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------

_ROW = "%-7s %-16s %8s %10s %19s %15s %10s"


def _clock(vm_clock_nsec: int) -> str:
    secs = vm_clock_nsec // 1_000_000_000
    return (f"{secs // 3600:04d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
            f"{(vm_clock_nsec // 1_000_000) % 1000:03d}")


def _date(date_sec: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date_sec))


def snapshot_row(snapshot: Snapshot, *, show_id: bool = True) -> str:
    """One row of the snapshot table (without the RUNSTATE column)."""
    icount = snapshot.icount
    return _ROW % (
        _qemu_string(snapshot.id_bytes, 127) if show_id else "--",
        _qemu_string(snapshot.name_bytes, 255),
        size_to_str(snapshot.vm_state_size),
        size_to_str(snapshot.disk_size),
        _date(snapshot.date_sec),
        _clock(snapshot.vm_clock_nsec),
        "--" if icount is None else str(icount),
    )


def snapshot_table_text(snapshots: Sequence[SnapshotFacts], *, show_id: bool = True,
                        runstates: bool = True) -> str:
    """The snapshot list in the layout of ``qemu-img snapshot -l`` (QEMU >= 9
    columns) with a DISK_SIZE column after VM_SIZE.  With ``runstates`` and
    when a snapshot has VM state, a last RUNSTATE column shows the run state
    it was saved in ("--" for disk-only snapshots, "?" when unreadable)."""
    lines = [_ROW % ("ID", "TAG", "VM_SIZE", "DISK_SIZE", "DATE", "VM_CLOCK", "ICOUNT")]
    rows = [snapshot_row(f.snapshot, show_id=show_id) for f in snapshots]
    if runstates and any(f.snapshot.has_vm_state for f in snapshots):
        lines[0] += " RUNSTATE"
        for i, f in enumerate(snapshots):
            state = (f.runstate or "?") if f.snapshot.has_vm_state else "--"
            rows[i] += f" {state}"
    lines += rows
    return "\n".join(lines)


def info_text(facts: ImageFacts) -> str:
    """Human ``info`` output, in the spirit of ``qemu-img info``."""
    image = facts.image
    h = image.header
    lines = [
        f"image: {facts.filename}",
        "file format: qcow2",
        f"virtual size: {size_to_str(image.size)} ({image.size} bytes)",
        f"disk size: {size_to_str(facts.actual_size or 0)}",
        f"cluster_size: {image.cluster_size}",
    ]
    if image.backing_file_name is not None:
        lines.append(f"backing file: {image.backing_file_name}")
        if image.backing_format:
            lines.append(f"backing file format: {image.backing_format}")
    if facts.chain:
        lines.append("backing chain:")
        for link_facts in facts.chain:
            link = link_facts.link
            named = "" if link.named is None else f"{link.named} -> "
            target = link_facts.resolved or "?"
            if link.followed:
                size = size_to_str(link.virtual_size or 0)
                lines.append(f"    {link.depth}: {named}{target} ({link.format}, {size})")
            else:
                lines.append(f"    {link.depth}: {named}{target}: NOT FOLLOWED: {link.reason}")
    if facts.snapshots:
        lines.append("Snapshot list:")
        lines.append(snapshot_table_text(facts.snapshots))
    if image.ignored_snapshots:
        lines.append(f"{len(image.ignored_snapshots)} snapshot table entries are present and "
                     f"ignored: QEMU does not support internal snapshots with an external "
                     f"data file")
    spec = _format_specific(image)["data"]
    lines.append("Format specific information:")
    for key, value in spec.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"    {key.replace('-', ' ')}: {value}")
    lines.append("qcow2snap details:")
    lines.append(f"    version: {h.version}")
    lines.append(f"    dirty: {'yes' if image.dirty else 'no'}")
    lines.append(f"    active L1: {h.l1_size} entries at {h.l1_table_offset:#x}")
    lines.append(f"    refcount table: {h.refcount_table_clusters} cluster(s) at "
                 f"{h.refcount_table_offset:#x}")
    lines.append(f"    snapshot table: {h.nb_snapshots} entries, "
                 f"{image.snapshot_table.size} bytes at {h.snapshots_offset:#x}")
    for kind, word in (("incompatible", h.incompatible_features),
                       ("compatible", h.compatible_features),
                       ("autoclear", h.autoclear_features)):
        ftype = {"incompatible": 0, "compatible": 1, "autoclear": 2}[kind]
        names = image.describe_features(ftype, word)
        if names:
            lines.append(f"    {kind} features: {', '.join(names)}")
    for ext in image.unknown_extensions:
        lines.append(f"    unknown header extension {ext.type:#010x}: "
                     f"{ext.declared_length} bytes (kept)")
    if image.lock_state is not None and image.lock_state.in_use:
        lines.append(f"    in use by QEMU: {image.lock_state.describe()}")
    return "\n".join(lines)


def snapshot_list_text(snapshots: Sequence[SnapshotFacts]) -> str:
    """``list`` of one image: nothing when there are no snapshots."""
    if not snapshots:
        return ""
    return "Snapshot list:\n" + snapshot_table_text(snapshots)


def comparison_json(comparison: SnapshotComparison) -> dict[str, Any]:
    """``list --json`` of several images (one VM's disks)."""
    return {
        "images": [{"filename": path, "snapshots": [snapshot_json(f) for f in facts]}
                   for path, facts in comparison.images],
        "common": list(comparison.common),
        "partial": [{"name": name, "present": list(present), "missing": list(missing)}
                    for name, present, missing in comparison.partial],
    }


def comparison_text(comparison: SnapshotComparison) -> str:
    """``list`` of several images: the snapshots present on all of them (the
    first image's entries), then which names are missing where."""
    count = len(comparison.images)
    if comparison.common:
        lines = [f"Snapshots present on all {count} images:",
                 snapshot_table_text(comparison.common_in_first(), show_id=False,
                                     runstates=False)]
    else:
        lines = [f"No snapshot is present on all {count} images."]
    if comparison.partial:
        lines += ["", "Snapshots missing on some images:"]
        lines += [f"  {name}: present on {', '.join(present)}; missing on {', '.join(missing)}"
                  for name, present, missing in comparison.partial]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Edits and extractions
# ---------------------------------------------------------------------------

_PAST = {"create": "created", "delete": "deleted", "revert": "reverted to", "rename": "renamed"}
_PLANNED = {"create": "would create", "delete": "would delete", "revert": "would revert to",
            "rename": "would rename"}


def edit_results_json(results: Sequence[EditResult], *, dry_run: bool) -> list[dict[str, Any]]:
    """One object per image of an edit command."""
    objs = []
    for r in results:
        obj: dict[str, Any] = {"filename": r.path, "operation": r.operation,
                               "snapshot-id": r.snapshot_id, "snapshot-name": r.snapshot_name,
                               "ok": r.ok, "dry-run": dry_run}
        c = r.commit
        if c is not None:
            obj.update({
                "clusters-allocated": len(c.clusters_allocated),
                "clusters-freed": len(c.clusters_freed),
                "bytes-allocated": c.bytes_allocated,
                "bytes-freed": c.bytes_freed,
                "metadata-bytes-written": c.metadata_bytes_written,
                "file-size-before": c.file_size_before,
                "file-size-after": c.file_size_after,
                "header-changes": {k: {"before": v[0], "after": v[1]}
                                   for k, v in c.header_changes.items()},
            })
        if r.error is not None:
            obj["error"] = " ".join(str(r.error).split("\n"))
        objs.append(obj)
    return objs


def edit_results_text(results: Sequence[EditResult], *, dry_run: bool
                      ) -> tuple[list[str], list[str], list[str]]:
    """An edit command's report for people: (stdout lines, error lines,
    warning lines), one line per image and per problem."""
    out: list[str] = []
    errors: list[str] = []
    warnings: list[str] = []
    for r in results:
        if r.error is not None:
            errors.append(" ".join(str(r.error).split("\n")))
            continue
        verb = (_PLANNED if dry_run else _PAST)[r.operation]
        c = r.commit
        line = f"{r.path}: {verb} snapshot {r.snapshot_id} ({r.snapshot_name})"
        if c is not None:
            line += (f"; {len(c.clusters_allocated)} cluster(s) allocated, "
                     f"{len(c.clusters_freed)} freed ({size_to_str(c.bytes_freed)} "
                     f"reclaimed), file {size_to_str(c.file_size_before)} -> "
                     f"{size_to_str(c.file_size_after)}")
        out.append(line)
        if c is not None and c.reclaim_error:
            warnings.append(f"{r.path}: {c.reclaim_error}")
        if dry_run and c is not None:
            out += [f"    header {name}: {before:#x} -> {after:#x}"
                    for name, (before, after) in c.header_changes.items()]
    return out, errors, warnings


def edit_exit_status(results: Sequence[EditResult]) -> int:
    """0 when every image was edited; else the failing error's own status
    when every failure agrees, else 1."""
    codes = [getattr(r.error, "exit_code", 1) for r in results if r.error is not None]
    if not codes:
        return 0
    return codes[0] if len(set(codes)) == 1 else 1


def extract_result_json(result: ExtractResult) -> dict[str, Any]:
    """``extract --json``."""
    return {"output": result.output, "format": result.format,
            "virtual-size": result.virtual_size, "bytes-written": result.bytes_written,
            "snapshot": None if result.snapshot is None else result.snapshot.id}


def vm_state_dump_json(result: ExtractResult) -> dict[str, Any]:
    """``vmstate dump --json``."""
    assert result.snapshot is not None
    return {"output": result.output, "vm-state-size": result.virtual_size,
            "snapshot": result.snapshot.id}


def compact_json(result: CompactResult) -> dict[str, Any]:
    """``compact --json``."""
    return {"source": result.source, "output": result.output, "in-place": result.in_place,
            "source-size": result.source_size, "output-size": result.output_size,
            "bytes-given-back": max(0, result.source_size - result.output_size),
            "snapshots": result.snapshots, "data-clusters": result.data_clusters,
            "compressed-clusters": result.compressed_clusters, "l2-tables": result.l2_tables,
            "data-bytes": result.data_bytes, "verified": result.verified,
            "dropped": list(result.dropped), "backing-merged": result.merged_backing,
            "compress": result.compress}


def compact_text(result: CompactResult) -> str:
    """``compact``'s report."""
    target = "in place" if result.in_place else f"into {escape_controls(result.output)}"
    saved = result.source_size - result.output_size
    lines = [f"Compacted {escape_controls(result.source)} {target}: "
             f"{size_to_str(result.source_size)} -> {size_to_str(result.output_size)} "
             + (f"({size_to_str(saved)} given back)" if saved >= 0
                else f"({size_to_str(-saved)} more)"),
             f"{result.snapshots} snapshot(s) and the active layer kept: "
             f"{result.data_clusters} data cluster(s), {result.compressed_clusters} compressed "
             f"cluster(s), {result.l2_tables} L2 table(s), each written once"]
    if result.compress:
        lines.append(f"Data clusters compressed with {result.compress}")
    if result.merged_backing:
        lines.append("Backing chain merged in: the output has no backing file")
    if result.dropped:
        lines.append("Dropped (as qemu-img convert drops them): " + ", ".join(result.dropped))
    if result.verified:
        lines.append("Verified: every layer's disk and VM state equal the source's")
    return "\n".join(lines)


__all__ += ["compact_json", "compact_text"]


# ---------------------------------------------------------------------------
# VM state (vmstate info / vmstate memory)
# ---------------------------------------------------------------------------

def vm_state_json(state: VMState, snapshot: Snapshot) -> dict[str, Any]:
    """``vmstate info --json``."""
    return {
        "snapshot": {"id": snapshot.id, "name": snapshot.name},
        "vm-state-size": state.size,
        "machine-type": state.machine_type,
        "runstate": state.runstate,
        "saved-runstate": state.saved_runstate,
        "vm-was-suspended": state.vm_was_suspended,
        "globalstate-layout": state.globalstate_layout,
        "page-size": state.page_size,
        "page-size-source": state.page_size_source,
        "ram-size": state.ram_total_size,
        "ram-blocks": [{"name": b.name, "size": b.size} for b in state.ram_blocks],
        "normal-pages": state.normal_pages,
        "zero-pages": state.zero_pages,
        "devices": [{"name": d.name, "instance-id": d.instance_id, "vmsd-name": d.vmsd_name,
                     "version": d.version, "size": d.size} for d in state.devices],
        "capabilities": list(state.capabilities),
        "uuid": state.uuid,
        "stream-version": state.file_version,
        "sections": len(state.sections),
        "has-vm-description": state.vm_description is not None,
        "complete": state.complete,
        "problem": state.problem,
    }


def vm_state_text(state: VMState, snapshot: Snapshot) -> str:
    """``vmstate info`` for people."""
    complete = {True: "yes", False: "NO", None: "unknown"}[state.complete]
    runstate = state.runstate or "unknown (no globalstate section)"
    if state.saved_runstate is not None and state.runstate != state.saved_runstate:
        runstate += f" (globalstate says {state.saved_runstate!r})"
    lines = [
        f"snapshot: {snapshot.id} ({snapshot.name})",
        f"vm state size: {size_to_str(state.size)} ({state.size} bytes)",
        f"machine type: {state.machine_type or 'unknown (no configuration section)'}",
        f"run state: {runstate}",
        f"page size: {state.page_size}",
        (f"RAM: {size_to_str(state.ram_total_size)} in {len(state.ram_blocks)} block(s), "
         f"{state.normal_pages} page(s) with data, {state.zero_pages} zero page(s)"),
    ]
    width = max((len(b.name) for b in state.ram_blocks), default=0)
    for block in state.ram_blocks:
        lines.append(f"    {block.name:<{width}}  {size_to_str(block.size):>10} "
                     f"({block.size} bytes)")
    lines.append(f"devices: {len(state.devices)}"
                 + ("" if state.vm_description is not None else " (no VM description)"))
    for dev in state.devices:
        lines.append(f"    {dev.name} (instance {dev.instance_id}, version {dev.version}, "
                     f"{dev.size} bytes)")
    lines.append(f"complete: {complete}" + (f" ({state.problem})" if state.problem else ""))
    return "\n".join(lines)


def memory_result_json(result: MemoryResult) -> dict[str, Any]:
    """``vmstate memory --json``."""
    return {
        "output": result.output,
        "format": result.format,
        "size": result.size,
        "bytes-written": result.bytes_written,
        "snapshot": result.snapshot.id,
        "machine-type": result.state.machine_type,
        "ranges": [{"phys-start": r.phys_start, "size": r.size, "block": r.block,
                    "block-offset": r.block_offset} for r in result.ranges],
        "unmapped-blocks": list(result.unmapped_blocks),
    }


# ---------------------------------------------------------------------------
# check / repair reports
# ---------------------------------------------------------------------------

def check_json(result: CheckReport | RepairReport) -> dict[str, Any]:
    """``qemu-img check --output=json``'s object (its optional keys only
    when non-zero, as QEMU prints them) plus qcow2snap's: ``findings``,
    ``snapshots`` (verdict per table entry), ``dirty-flag``, ``corrupt``,
    ``exit-code`` and, for a repair, ``repair``, ``dry-run``, ``changes``
    and ``rebuilt-refcounts``.  A repair's counts and findings are the
    final check's (the re-check), its snapshots the repair's verdicts."""
    from .ops.check_report import RepairReport  # the check commands load it
    repair = result if isinstance(result, RepairReport) else None
    report = result.final if isinstance(result, RepairReport) else result
    obj: dict[str, Any] = {"filename": report.filename, "format": report.format,
                           "check-errors": report.check_errors}
    for key, value in (("image-end-offset", report.image_end_offset),
                       ("corruptions", report.corruptions),
                       ("leaks", report.leaks),
                       ("corruptions-fixed", repair.corruptions_fixed if repair else 0),
                       ("leaks-fixed", repair.leaks_fixed if repair else 0),
                       ("total-clusters", report.total_clusters),
                       ("allocated-clusters", report.allocated_clusters),
                       ("fragmented-clusters", report.fragmented_clusters),
                       ("compressed-clusters", report.compressed_clusters)):
        if value:
            obj[key] = value
    obj["findings"] = [f.to_json() for f in report.findings]
    if report.findings_omitted:
        obj["findings-omitted"] = report.findings_omitted
    obj["snapshots"] = [v.to_json() for v in (repair or report).snapshots]
    obj["dirty-flag"] = report.dirty
    obj["corrupt"] = report.corrupt_bit
    if repair is not None:
        obj["repair"] = repair.mode
        obj["dry-run"] = repair.dry_run
        obj["rebuilt-refcounts"] = repair.rebuilt_refcounts
        obj["changes"] = list(repair.changes)
    obj["exit-code"] = report.exit_code
    return obj


def _check_summary(report: CheckReport) -> list[str]:
    """qemu-img check's human summary."""
    lines: list[str] = []
    if not (report.corruptions or report.leaks or report.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if report.corruptions:
            lines += ["", f"{report.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if report.leaks:
            lines += ["", f"{report.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if report.check_errors:
            lines += ["", (f"{report.check_errors} internal errors have occurred during "
                           f"the check.")]
    if report.total_clusters and report.allocated_clusters is not None:
        total = report.total_clusters
        lines.append(f"{report.allocated_clusters}/{total} = "
                     f"{report.allocated_clusters * 100.0 / total:.2f}% allocated, "
                     f"{report.fragmented_clusters * 100.0 / max(report.allocated_clusters, 1):.2f}"
                     f"% fragmented, "
                     f"{report.compressed_clusters * 100.0 / max(report.allocated_clusters, 1):.2f}"
                     f"% compressed clusters")
    if report.image_end_offset:
        lines.append(f"Image end offset: {report.image_end_offset}")
    return lines


def check_text(result: CheckReport | RepairReport) -> str:
    """The human report: QEMU's per-problem lines (first pass), what
    qcow2snap makes of each snapshot that is not simply ok, the repair's
    changes, then qemu-img check's summary (of the re-check after a
    repair)."""
    from .ops.check_report import RepairReport  # the check commands load it
    repair = result if isinstance(result, RepairReport) else None
    first = result.before if isinstance(result, RepairReport) else result
    report = result.final if isinstance(result, RepairReport) else result
    lines = [f.message for f in first.findings if f.severity != "info"]
    if first.findings_omitted:
        lines.append(f"... and {first.findings_omitted} more problems of the same kinds")
    lines += [f"Note: {f.message}" for f in first.findings if f.severity == "info"]
    odd = [v for v in (repair or report).snapshots if v.status != "ok"]
    if odd:
        lines += ["", "Snapshots:"]
        for v in odd:
            label = f"entry {v.index}: ID {v.id!r} name {v.name!r}"
            lines.append(f"    {label}: {v.status}" + (f" ({v.detail})" if v.detail else ""))
    if repair is not None:
        title = ("Dry run, nothing was written. A repair would make these changes:"
                 if repair.dry_run else f"Repair ({repair.mode}):")
        lines += ["", title] if lines else [title]
        lines += [f"    {c}" for c in repair.changes] or ["    nothing"]
        if not repair.dry_run and (repair.leaks_fixed or repair.corruptions_fixed):
            lines += ["", "The following inconsistencies were found and repaired:", "",
                      f"    {repair.leaks_fixed} leaked clusters",
                      f"    {repair.corruptions_fixed} corruptions", "",
                      "Double checking the fixed image now..."]
            lines += [f.message for f in report.findings if f.severity != "info"]
    summary = _check_summary(report)
    if lines and summary[:1] != [""]:
        lines.append("")
    lines += summary
    return "\n".join(lines)


# --- usage ---

def _usage_layer_json(layer: LayerUsage, cluster_size: int) -> dict[str, Any]:
    sn = layer.snapshot
    obj: dict[str, Any] = {}
    if sn is not None:
        obj["id"] = sn.id
        obj["name"] = sn.name
    for key, clusters in (("referenced", layer.referenced_clusters),
                          ("exclusive", layer.exclusive_clusters),
                          ("exclusive-data", layer.exclusive_data_clusters),
                          ("exclusive-vm-state", layer.exclusive_vm_state_clusters),
                          ("exclusive-l2", layer.exclusive_l2_clusters),
                          ("exclusive-l1", layer.exclusive_l1_clusters),
                          ("shared", layer.shared_clusters)):
        obj[f"{key}-clusters"] = clusters
        obj[f"{key}-bytes"] = clusters * cluster_size
    if sn is not None:
        obj["snapshot-table-freed-clusters"] = layer.table_freed_clusters
        obj["snapshot-table-allocated-clusters"] = layer.table_allocated_clusters
    return obj


_USAGE_IMAGE_ROWS = (
    ("guest-data", "guest data"), ("vm-state", "VM state"), ("l1", "L1 tables"),
    ("l2", "L2 tables"), ("refcount-table", "refcount table"),
    ("refcount-block", "refcount blocks"), ("snapshot-table", "snapshot table"),
    ("header", "header"), ("other", "other metadata"), ("free", "free"),
    ("leaked", "leaked"))


def _usage_image_counts(totals: ImageUsage) -> dict[str, int]:
    return {"guest-data": totals.guest_data_clusters, "vm-state": totals.vm_state_clusters,
            "l1": totals.l1_clusters, "l2": totals.l2_clusters,
            "refcount-table": totals.refcount_table_clusters,
            "refcount-block": totals.refcount_block_clusters,
            "snapshot-table": totals.snapshot_table_clusters,
            "header": totals.header_clusters, "other": totals.other_clusters,
            "free": totals.free_clusters, "leaked": totals.leaked_clusters}


def usage_json(report: UsageReport) -> dict[str, Any]:
    """One image's space accounting: ``image`` (where the file's clusters
    go), ``active`` and ``snapshots`` (per layer); every count as
    ``*-clusters`` and ``*-bytes`` (clusters x cluster size)."""
    cs = report.cluster_size
    totals = report.image
    image: dict[str, Any] = {"file-clusters": totals.file_clusters,
                             "referenced-clusters": totals.referenced_clusters}
    for key, clusters in _usage_image_counts(totals).items():
        image[f"{key}-clusters"] = clusters
        image[f"{key}-bytes"] = clusters * cs
    image["over-counted-clusters"] = totals.over_counted_clusters
    image["under-counted-clusters"] = totals.under_counted_clusters
    image["reclaimable-clusters"] = totals.reclaimable_clusters
    image["reclaimable-bytes"] = totals.reclaimable_clusters * cs
    return {"filename": report.filename, "cluster-size": cs, "image": image,
            "active": _usage_layer_json(report.active, cs),
            "snapshots": [_usage_layer_json(s, cs) for s in report.snapshots]}


def usage_text(report: UsageReport) -> str:
    """The accounting as two tables: the file, then one row per layer."""
    cs = report.cluster_size
    totals = report.image
    lines = [f"image: {report.filename}", f"cluster_size: {cs}",
             f"file: {totals.file_clusters} clusters "
             f"({size_to_str(totals.file_clusters * cs)})", ""]
    lines.append(f"{'kind':<18}{'clusters':>10}  {'size':>10}")
    for key, label in _USAGE_IMAGE_ROWS:
        clusters = _usage_image_counts(totals)[key]
        lines.append(f"{label:<18}{clusters:>10}  {size_to_str(clusters * cs):>10}")
    lines.append(f"{'reclaimable':<18}{totals.reclaimable_clusters:>10}  "
                 f"{size_to_str(totals.reclaimable_clusters * cs):>10}")
    if totals.over_counted_clusters or totals.under_counted_clusters:
        lines.append(f"refcounts above their references: {totals.over_counted_clusters} "
                     f"clusters, below: {totals.under_counted_clusters} "
                     f"(run 'qcow2snap check')")
    lines += ["", f"{'layer':<24}{'referenced':>11}{'exclusive':>11}{'shared':>9}  "
                  f"{'frees':>10}  exclusive: data/vm state/L2/L1"]
    for layer in (report.active, *report.snapshots):
        sn = layer.snapshot
        label = "active layer" if sn is None else f"{sn.id} {sn.name}"
        if len(label) > 23:
            label = label[:22] + "…"
        lines.append(f"{label:<24}{layer.referenced_clusters:>11}"
                     f"{layer.exclusive_clusters:>11}{layer.shared_clusters:>9}  "
                     f"{size_to_str(layer.exclusive_clusters * cs):>10}  "
                     f"{layer.exclusive_data_clusters}/{layer.exclusive_vm_state_clusters}/"
                     f"{layer.exclusive_l2_clusters}/{layer.exclusive_l1_clusters}")
    if report.snapshots:
        sample = report.snapshots[0]
        freed, allocated = sample.table_freed_clusters, sample.table_allocated_clusters
        lines += ["", f"snapshot table: deleting a snapshot also frees the old table "
                      f"({freed} cluster{'' if freed == 1 else 's'}) and writes a new one "
                      f"({allocated} cluster{'' if allocated == 1 else 's'} with one entry "
                      f"less)"]
    return "\n".join(lines)


# --- hash ---

if TYPE_CHECKING:
    from .ops.hashing import HashReport, LayerDigest


def _hash_layer_json(layer: LayerDigest) -> dict[str, Any]:
    sn = layer.snapshot
    obj: dict[str, Any] = {"active": sn is None}
    if sn is not None:
        obj.update({"id": _qemu_string(sn.id_bytes, 127),
                    "name": _qemu_string(sn.name_bytes, 255),
                    "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                    "date": sn.date.isoformat()})
    obj["disk-size"] = layer.disk_size
    obj["disk-digest"] = layer.disk_digest
    obj["vm-state-size"] = layer.vm_state_size
    obj["vm-state-digest"] = layer.vm_state_digest
    return obj


def hash_json(report: HashReport) -> dict[str, Any]:
    """``hash --json``."""
    return {"image": report.path, "file-size": report.file_size,
            "algorithm": report.algorithm, "image-digest": report.image_digest,
            "layers": [_hash_layer_json(layer) for layer in report.layers]}


def hash_text(report: HashReport) -> str:
    """``hash``: a block per layer, fit to paste into a case record."""
    algo = report.algorithm
    lines = [f"Image:      {report.path}",
             f"File size:  {report.file_size} bytes ({size_to_str(report.file_size)})",
             f"Algorithm:  {algo}"]
    if report.image_digest is not None:
        lines.append(f"File {algo}: {report.image_digest}")
    for layer in report.layers:
        sn = layer.snapshot
        lines.append("")
        if sn is None:
            lines.append("Active layer")
        else:
            lines.append(f"Snapshot ID {_qemu_string(sn.id_bytes, 127)} "
                         f"name {_qemu_string(sn.name_bytes, 255)!r}")
            lines.append(f"    date:      {sn.date.strftime('%Y-%m-%d %H:%M:%S')} UTC "
                         f"({_date(sn.date_sec)} local)")
        lines.append(f"    disk:      {layer.disk_size} bytes  {algo} {layer.disk_digest}")
        if layer.vm_state_digest is not None:
            lines.append(f"    vm state:  {layer.vm_state_size} bytes  {algo} "
                         f"{layer.vm_state_digest}")
        elif sn is not None:
            lines.append("    vm state:  none (disk-only snapshot)")
    return "\n".join(lines)


# --- map ---

def _map_entry_json(entry: Any) -> dict[str, Any]:
    """One entry with ``qemu-img map --output=json``'s keys, in its order
    (QEMU 7.2 prints no ``compressed`` key); a damaged range has
    ``damaged`` and ``reason`` instead of the flags."""
    if entry.damaged:
        return {"start": entry.start, "length": entry.length, "depth": entry.depth,
                "damaged": True, "reason": entry.reason}
    out: dict[str, Any] = {"start": entry.start, "length": entry.length, "depth": entry.depth,
                           "present": entry.present, "zero": entry.zero, "data": entry.data}
    if entry.offset is not None:
        out["offset"] = entry.offset
    return out


def map_json(result: Any) -> dict[str, Any]:
    """A :class:`~qcow2snap.ops.map.MapResult`: ``map`` is what
    ``qemu-img map --output=json`` prints, ``provenance`` where it comes from."""
    prov = result.provenance
    sn = result.snapshot
    return {
        "image": result.image,
        "snapshot": None if sn is None else {"id": sn.id, "name": sn.name},
        "virtual-size": result.virtual_size,
        "complete": result.complete,
        "damaged_ranges": len(result.damaged),
        "map": [_map_entry_json(e) for e in result.entries],
        "provenance": {
            "snapshot_entry_offset": prov.snapshot_entry_offset,
            "snapshot_entry_bytes": prov.snapshot_entry_bytes,
            "l1_table_offset": prov.l1_table_offset,
            "l1_size": prov.l1_size,
            "l1_table_bytes": prov.l1_table_bytes,
            "l2_tables": [{"l1_index": t.l1_index, "l2_table_offset": t.l2_table_offset,
                           "guest_offset": t.guest_offset, "guest_length_bytes": t.guest_length}
                          for t in prov.l2_tables],
        },
    }


def _c_hex16(value: int) -> str:
    """C's ``%#-16"PRIx64``: ``0`` for zero, else ``0x...``, padded to 16."""
    return f"{value:#x}".ljust(16) if value else "0".ljust(16)


def map_text(result: Any) -> str:
    """``qemu-img map``'s table (the data runs: Offset, Length, Mapped to,
    File), with compressed and damaged runs shown where qemu-img stops
    with an error, then the provenance."""
    lines = ["Offset          Length          Mapped to       File"]
    for e in result.entries:
        if e.damaged:
            lines.append(f"{_c_hex16(e.start)}{_c_hex16(e.length)}DAMAGED         {e.reason}")
        elif e.data and not e.zero:
            mapped = "compressed".ljust(16) if e.offset is None else _c_hex16(e.offset)
            lines.append(f"{_c_hex16(e.start)}{_c_hex16(e.length)}{mapped}{e.file or ''}")
    prov = result.provenance
    sn = result.snapshot
    lines += ["", "Provenance of " + ("the active layer" if sn is None
                                       else f"snapshot {sn.id} ({sn.name})") + ":"]
    if prov.snapshot_entry_offset is not None:
        lines.append(f"  snapshot table entry: {prov.snapshot_entry_offset:#x} "
                     f"({prov.snapshot_entry_bytes} bytes)")
    lines.append(f"  L1 table: {prov.l1_table_offset:#x}, {prov.l1_size} entries "
                 f"({prov.l1_table_bytes} bytes)")
    lines.append(f"  L2 tables: {len(prov.l2_tables)}")
    for t in prov.l2_tables:
        lines.append(f"    L1[{t.l1_index}] -> L2 at {t.l2_table_offset:#x}: guest "
                     f"{t.guest_offset:#x}..{t.guest_offset + t.guest_length:#x}")
    if result.damaged:
        lines += ["", f"{len(result.damaged)} damaged range(s): the map is incomplete "
                      "(--strict stops at the first)"]
    return "\n".join(lines)


# --- diff ---

if TYPE_CHECKING:
    from .ops.diff import DiffResult, Mapping
    from .reader import Layer


def _diff_layer_json(layer: Layer) -> dict[str, Any]:
    sn = layer.snapshot
    return {"id": None if sn is None else sn.id, "name": None if sn is None else sn.name,
            "layer": layer.name, "disk-size": layer.size}


def _diff_side_json(mapping: Mapping) -> dict[str, Any]:
    return {"kind": mapping.kind, "host-offset": mapping.host_offset}


def diff_json(result: DiffResult) -> dict[str, Any]:
    """``diff --json``: the layers, the merged ranges and the totals."""
    return {
        "image": result.path,
        "a": _diff_layer_json(result.a),
        "b": _diff_layer_json(result.b),
        "mode": "content" if result.content else "metadata",
        "ranges": [{"start-offset": r.guest_offset, "length-bytes": r.length,
                    "a": _diff_side_json(r.a), "b": _diff_side_json(r.b)}
                   for r in result.ranges],
        "total-bytes": result.total_bytes,
        "range-count": result.range_count,
        "bytes-read": result.bytes_read,
        "complete": result.complete,
        "damaged": [{"side": d.side, "start-offset": d.guest_offset, "length-bytes": d.length,
                     "message": d.message} for d in result.damaged],
    }


def _diff_side_text(mapping: Mapping) -> str:
    if mapping.host_offset is None:
        return mapping.kind
    return f"{mapping.kind}@{mapping.host_offset:#x}"


def diff_text(result: DiffResult) -> str:
    """``diff``: one line per range (guest offset, length, A, B), then the
    totals and the damage found."""
    mode = "content" if result.content else "metadata"
    lines = [f"A: {result.a.name}, {size_to_str(result.a.size)} ({result.a.size} bytes)",
             f"B: {result.b.name}, {size_to_str(result.b.size)} ({result.b.size} bytes)"]
    if result.ranges:
        rows = [(f"{r.guest_offset:#x}", str(r.length), _diff_side_text(r.a),
                 _diff_side_text(r.b)) for r in result.ranges]
        header = ("Offset", "Length", "A", "B")
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(3)]
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(widths[i]) if i < 3 else cell
                                   for i, cell in enumerate(row)).rstrip())
    lines.append(f"{result.range_count} ranges differ, {result.total_bytes} bytes "
                 f"({size_to_str(result.total_bytes)}) ({mode} diff)")
    for d in result.damaged:
        lines.append(f"damaged: {d.side.upper()} {d.guest_offset:#x}+{d.length}: {d.message}")
    if result.damaged:
        lines.append("incomplete: damaged metadata; the damaged ranges are reported as "
                     "differences")
    return "\n".join(lines)


__all__ += ["diff_json", "diff_text"]


def _recovered_json(c: RecoveredSnapshot) -> dict[str, Any]:
    sn = c.snapshot
    return {"source": c.source, "source-offset": c.source_offset,
            "entry-index": c.entry_index,
            "id": sn.id if c.source == "stale-table" else None, "name": sn.name,
            "date-sec": sn.date_sec if c.source == "stale-table" else None,
            "vm-state-size": sn.vm_state_size if c.source == "stale-table" else None,
            "disk-size": sn.disk_size, "l1-table-offset": sn.l1_table_offset,
            "l1-size": sn.l1_size, "reliable": c.reliable,
            "live-duplicate": c.live_duplicate,
            "reused": [{"guest-offset": r.guest_offset, "length": r.length, "what": r.what,
                        "host-offset": r.host_offset} for r in c.reused],
            "shared-clusters": c.shared_clusters, "freed-clusters": c.freed_clusters,
            "problems": list(c.problems)}


def recover_json(report: RecoveryReport) -> dict[str, Any]:
    """The candidates ``recover`` found, each with its source and reliability."""
    return {"filename": report.filename,
            "unreferenced-clusters": report.unreferenced_clusters,
            "scanned-clusters": report.scanned_clusters, "truncated": report.truncated,
            "candidates": [_recovered_json(c) for c in report.candidates]}


def recover_text(report: RecoveryReport) -> str:
    """One paragraph per candidate: source, identity, reliability."""
    lines = [f"image: {report.filename}",
             f"unreferenced clusters: {report.unreferenced_clusters} "
             f"({report.scanned_clusters} scanned"
             f"{', search bounded' if report.truncated else ''})",
             f"candidates: {len(report.candidates)}"]
    for c in report.candidates:
        sn = c.snapshot
        lines.append("")
        if c.source == "stale-table":
            lines.append(f"stale snapshot table at {c.source_offset:#x}, entry {c.entry_index}: "
                         f"ID {sn.id} name {sn.name!r}")
            lines.append(f"  date: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(sn.date_sec))}"
                         f" UTC  vm-state: {size_to_str(sn.vm_state_size)}  "
                         f"disk: {size_to_str(sn.disk_size)}")
        else:
            lines.append(f"orphaned L1 table at {c.source_offset:#x}: {sn.name}  "
                         f"disk: {size_to_str(sn.disk_size)} (as the L1 table implies)")
        lines.append(f"  L1 table: {sn.l1_table_offset:#x} ({sn.l1_size} entries)"
                     f"{'  (the L1 table of a live layer)' if c.live_duplicate else ''}")
        verdict = "intact as far as metadata shows" if c.reliable else "UNRELIABLE"
        lines.append(f"  reliability: {verdict}; {c.shared_clusters} cluster(s) shared with "
                     f"live layers, {c.freed_clusters} freed")
        for r in c.reused:
            lines.append(f"  reused: guest {r.guest_offset:#x}+{r.length:#x} ({r.what} at "
                         f"{r.host_offset:#x} is referenced by a live structure)")
        for p in c.problems:
            lines.append(f"  problem: {p}")
    return "\n".join(lines)


__all__ += ["recover_json", "recover_text"]


def _lost(report: RecoveryReport) -> list[RecoveredSnapshot]:
    return [c for c in report.candidates if not c.live_duplicate]


def lost_snapshots_line(report: RecoveryReport, image: str) -> str | None:
    """The line ``check`` adds when the leaked clusters hold lost snapshots
    (None when they hold none)."""
    lost = _lost(report)
    if not lost:
        return None
    where = [f"orphaned L1 table at {c.source_offset:#x}" if c.source == "orphan-l1" else
             f"stale snapshot table at {c.source_offset:#x} entry {c.entry_index} "
             f"(ID {c.snapshot.id} {c.snapshot.name!r})" for c in lost[:4]]
    if len(lost) > 4:
        where.append(f"{len(lost) - 4} more")
    unreliable = sum(not c.reliable for c in lost)
    note = f" ({unreliable} unreliable)" if unreliable else ""
    advice = (f"run `qcow2snap recover {image} --apply`" if unreliable < len(lost) else
              f"none is reliable enough to restore; `qcow2snap recover {image}` says why")
    return f"{len(lost)} lost snapshot(s) found{note}: {', '.join(where)}; {advice}"


def lost_snapshots_json(report: RecoveryReport) -> list[dict[str, Any]]:
    """``check --json``'s ``lost-snapshots``: the candidates, as ``recover``."""
    return [_recovered_json(c) for c in _lost(report)]


def _restored_json(r: RestoredSnapshot) -> dict[str, Any]:
    return {"source": r.source, "source-offset": r.source_offset,
            "entry-index": r.entry_index, "id": r.id, "name": r.name,
            "l1-table-offset": r.l1_table_offset, "l1-size": r.l1_size,
            "disk-size": r.disk_size, "vm-state-size": r.vm_state_size,
            "renamed-from": r.renamed_from}


def recover_apply_json(result: RecoverResult) -> dict[str, Any]:
    """``recover --apply --json``: what was restored, what was skipped and why."""
    return {"filename": result.filename, "dry-run": result.dry_run,
            "restored": [_restored_json(r) for r in result.restored],
            "skipped": [{"source": s.source, "source-offset": s.source_offset,
                         "entry-index": s.entry_index, "candidate": s.label,
                         "reason": s.reason, "refused": s.refused} for s in result.skipped],
            "committed": result.commit is not None and not result.dry_run,
            "leaks-released": result.cleanup is not None,
            "notes": list(result.notes)}


def recover_apply_text(result: RecoverResult) -> str:
    """One line per restored entry and per skipped candidate."""
    lines = [f"image: {result.filename}"]
    verb = "would restore" if result.dry_run else "restored"
    for r in result.restored:
        renamed = f" (was ID {r.renamed_from.removeprefix('ID ')}: renamed, the ID or name " \
                  f"is taken)" if r.renamed_from else ""
        source = (f"orphaned L1 table at {r.source_offset:#x}" if r.source == "orphan-l1" else
                  f"stale table at {r.source_offset:#x} entry {r.entry_index}")
        lines.append(f"{verb}: ID {r.id} {r.name!r} from {source}, disk "
                     f"{size_to_str(r.disk_size)}, vm-state {size_to_str(r.vm_state_size)}"
                     f"{renamed}")
    for s in result.skipped:
        lines.append(f"skipped: {s.label}: {s.reason}")
    if not result.restored:
        lines.append("nothing restored")
    if result.dry_run:
        lines.append("dry run: nothing was written")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


__all__ += ["lost_snapshots_json", "lost_snapshots_line", "recover_apply_json",
            "recover_apply_text"]


# -- trim -------------------------------------------------------------------

if TYPE_CHECKING:
    from .ops.trim import TrimResult


def trim_json(result: TrimResult) -> dict[str, Any]:
    """``trim --json``."""
    return {
        "filename": result.filename,
        "dry-run": result.dry_run,
        "cluster-size": result.cluster_size,
        "free-clusters": result.free_clusters,
        "file-size-before": result.file_size_before,
        "file-size-after": result.file_size_after,
        "punched": [{"offset": o, "length": n} for o, n in result.punched],
        "planned-punch-bytes": result.planned_punch_bytes,
        "planned-truncate-bytes": result.planned_truncate_bytes,
        "planned-bytes": result.planned_bytes,
        "already-holes-bytes": result.already_holes_bytes,
        "allocated-before": result.allocated_before,
        "allocated-after": result.allocated_after,
        "given-back": result.given_back,
    }


def trim_text(result: TrimResult) -> str:
    """``trim``'s report for people."""
    lines = [f"{result.free_clusters} free cluster(s) of {result.cluster_size} bytes; "
             f"{result.already_holes_bytes} bytes of them are holes already"]
    verb = "would punch" if result.dry_run else "punched"
    lines.append(f"{verb} {result.planned_punch_bytes} bytes in {len(result.punched)} range(s)")
    if result.file_size_after < result.file_size_before:
        verb = "would truncate" if result.dry_run else "truncated"
        lines.append(f"{verb} the file from {result.file_size_before} to "
                     f"{result.file_size_after} bytes ({result.planned_truncate_bytes} bytes of "
                     f"data)")
    if result.dry_run:
        lines.append(f"would give back {result.planned_bytes} bytes (dry run: nothing written)")
    else:
        lines.append(f"gave back {result.given_back} bytes (planned {result.planned_bytes}; "
                     f"allocated {result.allocated_before} -> {result.allocated_after})")
    return "\n".join(lines)


# -- export-chain -----------------------------------------------------------

if TYPE_CHECKING:
    from .ops.chain import ChainExport


def export_chain_json(result: ChainExport) -> dict[str, Any]:
    """``export-chain --json``: the directory and its manifest's content."""
    return {"directory": result.directory, "manifest": result.manifest, **result.to_json()}


def export_chain_text(result: ChainExport) -> str:
    """``export-chain``'s report for people: one line per file."""
    lines = [f"{len(result.files)} file(s) in {result.directory} (order: {result.order}), "
             f"manifest {os.path.basename(result.manifest)}"]
    for f in result.files:
        sn = f.snapshot
        what = "active layer" if sn is None else f"snapshot {sn.id} ({sn.name})"
        if f.backing_file is None:
            held = "whole disk"
        else:
            held = (f"{f.data_clusters} data + {f.zero_clusters} zero cluster(s) over "
                    f"{f.backing_file}")
        extra = f", VM state {f.vm_state_file}" if f.vm_state_file else ""
        lines.append(f"{f.file}: {what}, {size_to_str(f.disk_size)}, {held}{extra}")
    return "\n".join(lines)


# -- import-chain -----------------------------------------------------------

if TYPE_CHECKING:
    from .ops.chain_import import ChainImport


def import_chain_json(result: ChainImport) -> dict[str, Any]:
    """``import-chain --json``."""
    return {"output": result.output, "cluster-size": result.cluster_size,
            "file-size": result.file_size,
            "layers": [{"file": layer.file, "snapshot-id": layer.snapshot_id,
                        "name": layer.name, "disk-size": layer.disk_size,
                        "new-clusters": layer.new_clusters} for layer in result.layers]}


def import_chain_text(result: ChainImport) -> str:
    """``import-chain``'s report for people: one line per layer."""
    lines = [f"{result.output}: {len(result.layers) - 1} snapshot(s) and the active layer, "
             f"{size_to_str(result.file_size)}"]
    for layer in result.layers:
        what = ("active layer" if layer.snapshot_id is None
                else f"snapshot {layer.snapshot_id} ({layer.name})")
        lines.append(f"{what}: {layer.file}, {size_to_str(layer.disk_size)}, "
                     f"{layer.new_clusters} new cluster(s)")
    return "\n".join(lines)
