"""The listing's fast paths (``list`` / ``info`` of 65,536 savevm snapshots)
give exactly what the plain paths give.

- ``vmstate.read_runstate`` with a shared :class:`RunstateCache` (a first
  read sized by the descriptions seen, each description decoded once)
  against ``read_runstate`` alone: every VM-state stream of the fixtures,
  crafted variants of them (no VM description, globalstate not last, no
  footers, the QEMU 9.0 globalstate, damaged length fields, ...) and random
  damage near the end of a stream;
- ``_layout_size`` (the device list's sizes) against ``_layout``;
- ``ops.runstate`` (one state per image for a listing) against a fresh image
  per snapshot, on image files whose VM state or its mapping is damaged;
- the snapshot table unpacked with struct against construct's layouts;
- the CLI's JSON, written in parts, against ``json.dumps``.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path, fixtures_with
from helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import describe, vmstate
from qcow2snap import format as fmt
from qcow2snap.model import parse_snapshot_table
from qcow2snap.ops import inspection
from qcow2snap.ops import runstate as runstate_module
from qcow2snap.ops.runstate import snapshot_runstate
from qcow2snap.vmstate import RunstateCache, parse_stream, read_runstate

VM_SNAPSHOTS = [(name, s["name"]) for name in fixtures_with("vmstate")
                for s in FIXTURES_BY_NAME[name]["snapshots"] if s["vm_state_size"]]


# ---------------------------------------------------------------------------
# Streams and their variants
# ---------------------------------------------------------------------------

@functools.cache
def _streams(fixture_dir: Path) -> dict[tuple[str, str], bytes]:
    out = {}
    for name, snapshot in VM_SNAPSHOTS:
        with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
            out[name, snapshot] = image.open_vm_state(snapshot).read()
    return out


def _marker(stream: bytes) -> int:
    """Offset of the VM description's 0x06 marker (in a well-formed stream)."""
    p = len(stream)
    while True:
        p = stream.rindex(b"\x06", 0, p)
        if p + 5 + struct.unpack_from(">I", stream, p + 1)[0] == len(stream):
            return p


def _sections(stream: bytes) -> list[vmstate.Section]:
    return list(parse_stream(io.BytesIO(stream), len(stream)).sections)


def _globalstate_data(stream: bytes) -> int:
    return next(s.data_offset for s in _sections(stream) if s.name == "globalstate")


def _redescribe(stream: bytes, edit: Callable[[dict[str, Any]], None],
                before_eof: bytes = b"") -> bytes:
    """The stream with its VM description edited (and ``before_eof``
    inserted before the EOF marker)."""
    p = _marker(stream)
    desc = json.loads(stream[p + 5:])
    edit(desc)
    text = json.dumps(desc, separators=(",", ":")).encode()
    return stream[:p - 1] + before_eof + stream[p - 1:p + 1] + struct.pack(">I", len(text)) + text


def _patch(stream: bytes, offset: int, data: bytes) -> bytes:
    return stream[:offset] + data + stream[offset + len(data):]


def _length(stream: bytes, delta: int) -> bytes:
    p = _marker(stream)
    length = struct.unpack_from(">I", stream, p + 1)[0]
    return _patch(stream, p + 1, struct.pack(">I", (length + delta) & 0xFFFFFFFF))


def _footers_off(stream: bytes) -> bytes:
    out = b""
    pos = 0
    for section in _sections(stream):
        if stream[section.end_offset] == vmstate.QEMU_VM_SECTION_FOOTER:
            out += stream[pos:section.end_offset]
            pos = section.end_offset + 5
    return out + stream[pos:]


def _globalstate_not_last(size: int) -> Callable[[bytes], bytes]:
    """A device section of ``size`` bytes after globalstate."""
    section = (b"\x04" + struct.pack(">I", 99) + b"\x02zz" + struct.pack(">II", 0, 1)
               + b"\xaa" * size + b"\x7e" + struct.pack(">I", 99))
    return lambda stream: _redescribe(stream, lambda d: d["devices"].append(
        {"name": "zz", "instance_id": 0, "vmsd_name": "zz", "version": 1,
         "fields": [{"name": "x", "type": "buffer", "size": size}]}), before_eof=section)


GLOBALSTATE_9_0_FIELDS = [{"name": "size", "type": "uint32", "size": 4},
                          {"name": "runstate", "type": "buffer", "size": 32},
                          {"name": "has_vm_was_suspended", "type": "bool", "size": 1},
                          {"name": "vm_was_suspended", "type": "bool", "size": 1},
                          {"name": "unused", "type": "buffer", "size": 66}]


def _qemu_9_0(suspended: bool) -> Callable[[bytes], bytes]:
    """The 8.2 globalstate (u32 size, runstate[100]) rewritten as 9.0's."""
    def variant(stream: bytes) -> bytes:
        data = _globalstate_data(stream)
        name = stream[data + 4:data + 104].split(b"\0")[0]
        payload = (struct.pack(">I", len(name) + 1) + name.ljust(32, b"\0")
                   + bytes([1, int(suspended)]) + bytes(66))

        def edit(desc: dict[str, Any]) -> None:
            for device in desc["devices"]:
                if device["name"] == "globalstate":
                    device["fields"] = GLOBALSTATE_9_0_FIELDS
        return _redescribe(_patch(stream, data, payload), edit)
    return variant


def _device(index: int, key: str, value: Any) -> Callable[[bytes], bytes]:
    def variant(stream: bytes) -> bytes:
        def edit(desc: dict[str, Any]) -> None:
            desc["devices"][index][key] = value
        return _redescribe(stream, edit)
    return variant


VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "as-saved": lambda s: s,
    "no-description": lambda s: s[:_marker(s)],
    "description-cut": lambda s: s[:-1000],
    "length+1": lambda s: _length(s, 1),
    "length-1": lambda s: _length(s, -1),
    "length-huge": lambda s: _length(s, 1 << 31),
    "json-byte": lambda s: _patch(s, _marker(s) + 5 + 50_000, b"\x00"),
    "json-0x06": lambda s: _patch(s, len(s) - 10, b"\x06"),
    "later-marker": lambda s: s + b"\x06" + struct.pack(">I", 2) + b"{}",
    "eof-marker": lambda s: _patch(s, _marker(s) - 1, b"\x01"),
    "runstate-garbage": lambda s: _patch(s, _globalstate_data(s) + 4, b"\x01"),
    "runstate-size": lambda s: _patch(s, _globalstate_data(s), b"\xff" * 4),
    "section-name": lambda s: _patch(s, _globalstate_data(s) - 19, b"G"),
    "footer-id": lambda s: _patch(s, _globalstate_data(s) + 104 + 4, b"\xee"),
    "footers-off": _footers_off,
    "globalstate-not-last": _globalstate_not_last(7),
    # globalstate before the bytes a first read sized by the description covers
    "globalstate-far": _globalstate_not_last(4 * vmstate.RUNSTATE_REACH),
    # a description longer than any seen, so the short first read misses it;
    # then read without it, the stream would give a run state
    "description-longer": lambda s: _redescribe(s, lambda d: (
        d.update(pad="x" * 30_000), d["devices"][-1].update(vmsd_name="other"))),
    "qemu-9.0": _qemu_9_0(False),
    "qemu-9.0-suspended": _qemu_9_0(True),
    "device-size": _device(3, "fields", [{"name": "x", "size": -1}]),
    "device-version": _device(3, "version", "x"),   # was a ValueError traceback
    "no-globalstate": _device(-1, "vmsd_name", "other"),
}


def outcome(stream: bytes, cache: RunstateCache | None = None) -> Any:
    """What read_runstate gives: a RunState, None, or (exception type, message)."""
    try:
        return read_runstate(io.BytesIO(stream), len(stream), label="x", cache=cache)
    except Exception as exc:
        return type(exc), str(exc)


def warm_cache(fixture_dir: Path) -> RunstateCache:
    """A cache that has seen every fixture stream (its descriptions, and the
    longest of them sizing the first read)."""
    cache = RunstateCache()
    for stream in _streams(fixture_dir).values():
        outcome(stream, cache)
    assert cache.description_length > 90_000
    return cache


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("name", "snapshot"), VM_SNAPSHOTS)
def test_cached_read_runstate_is_the_plain_one(fixture_dir: Path, name: str, snapshot: str,
                                               variant: str) -> None:
    stream = VARIANTS[variant](_streams(fixture_dir)[name, snapshot])
    expected = outcome(stream)
    cache = warm_cache(fixture_dir)
    assert outcome(stream, cache) == expected
    assert outcome(stream, cache) == expected      # its own description now cached
    assert outcome(stream, RunstateCache()) == expected


def test_variants_cover_what_they_say(fixture_dir: Path) -> None:
    """The variants reach the outcomes they are meant to (else the test above
    would compare trivial cases)."""
    stream = _streams(fixture_dir)["savevm-suspended", "susp"]
    found = {v: outcome(VARIANTS[v](stream)) for v in VARIANTS}
    runstates = {v: r.runstate for v, r in found.items() if isinstance(r, vmstate.RunState)}
    assert runstates == {"as-saved": "suspended", "no-description": "suspended",
                         "description-cut": "suspended", "length+1": "suspended",
                         "length-1": "suspended", "length-huge": "suspended",
                         "runstate-size": "suspended", "footers-off": "suspended",
                         "globalstate-not-last": "suspended", "globalstate-far": "suspended",
                         "qemu-9.0": "suspended",
                         "qemu-9.0-suspended": "suspended"}
    assert found["qemu-9.0"].layout == "qemu>=9.0"
    assert found["no-globalstate"] is None and found["description-longer"] is None
    for variant in ("json-byte", "json-0x06", "later-marker", "eof-marker", "runstate-garbage",
                    "section-name", "footer-id", "device-size", "device-version"):
        assert found[variant][0] is qcow2snap.CorruptImageError, variant
    pre = _streams(fixture_dir)["savevm-suspended", "pre"]
    assert outcome(_qemu_9_0(True)(pre)).runstate == "suspended"
    assert outcome(_qemu_9_0(False)(pre)).runstate == "prelaunch"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damage_near_the_end_reads_the_same_with_a_cache(fixture_dir: Path,
                                                         data: st.DataObject) -> None:
    streams = _streams(fixture_dir)
    stream = bytearray(streams[data.draw(st.sampled_from(sorted(streams)))])
    near_end = st.integers(max(0, len(stream) - 110_000), len(stream) - 1)
    for offset, value in data.draw(st.lists(st.tuples(near_end, st.integers(0, 255)),
                                            max_size=3)):
        stream[offset] = value
    if data.draw(st.booleans()):
        del stream[data.draw(near_end):]
    damaged = bytes(stream)
    assert outcome(damaged, warm_cache(fixture_dir)) == outcome(damaged)


class _CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n
        return n


def test_a_cache_makes_the_next_stream_cheap(fixture_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    parses = []
    parse = vmstate._parse_vm_description
    monkeypatch.setattr(vmstate.runstate, "_parse_vm_description",
                        lambda text: parses.append(len(text)) or parse(text))
    streams = _streams(fixture_dir)
    run, paused = streams["savevm", "run"], streams["savevm", "paused"]
    cache = RunstateCache()
    first, second = _CountingFile(run), _CountingFile(paused)
    assert read_runstate(first, len(run), cache=cache).runstate == "running"  # type: ignore[union-attr]
    assert read_runstate(second, len(paused), cache=cache).runstate == "paused"  # type: ignore[union-attr]
    assert len(parses) == 1                       # the same description, decoded once
    description = len(run) - _marker(run) - 5
    assert first.bytes_read == len(run)           # the first MiB (here all of it)
    assert second.bytes_read <= description + 6 + vmstate.RUNSTATE_REACH
    # quick=False: the usual first read, the same answer
    third = _CountingFile(paused)
    assert read_runstate(third, len(paused), cache=cache, quick=False) == read_runstate(
        io.BytesIO(paused), len(paused))
    assert third.bytes_read == len(paused)


def test_the_description_cache_is_bounded(fixture_dir: Path) -> None:
    stream = _streams(fixture_dir)["savevm", "run"]
    cache = RunstateCache()
    for i in range(RunstateCache.MAX_DESCRIPTIONS + 3):
        outcome(_device(0, "name", f"timer{i}")(stream), cache)
    assert len(cache._known) == RunstateCache.MAX_DESCRIPTIONS


# ---------------------------------------------------------------------------
# The device list's sizes
# ---------------------------------------------------------------------------

def _both_layouts(desc: Any) -> tuple[Any, Any]:
    def run(fn: Callable[[], int]) -> Any:
        try:
            return fn()
        except Exception as exc:
            return type(exc), str(exc)
    return (run(lambda: vmstate._layout(desc, "", 0, {}, "device 'd'")),
            run(lambda: vmstate._layout_size(desc, "device 'd'")))


def test_layout_size_of_every_fixture_device(fixture_dir: Path) -> None:
    for stream in _streams(fixture_dir).values():
        desc = json.loads(stream[_marker(stream) + 5:])
        for device in desc["devices"]:
            full, size = _both_layouts(device)
            assert isinstance(full, int) and full == size


_names = st.sampled_from(["a", "b", "c"])
_fields = st.fixed_dictionaries(
    {"name": _names},
    optional={"size": st.one_of(st.integers(-2, 40), st.just("4"), st.none(), st.just(True)),
              "array_len": st.one_of(st.integers(-1, 5), st.just(5000), st.booleans(),
                                     st.just("2")),
              "type": st.sampled_from(["tmp", "uint8", "struct"])})


def _descriptions(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    field = st.one_of(_fields, st.tuples(_fields, inner).map(lambda t: {**t[0], "struct": t[1]}),
                      st.just(7))
    return st.fixed_dictionaries({}, optional={
        "fields": st.one_of(st.lists(field, max_size=4), st.just("x")),
        "subsections": st.one_of(st.lists(inner, max_size=3), st.just({}), st.just([1])),
        "vmsd_name": st.one_of(_names, st.integers(0, 3))})


@settings(max_examples=400, deadline=None)
@given(desc=st.recursive(_descriptions(st.just({})), _descriptions, max_leaves=12))
def test_layout_size_is_layout(desc: Any) -> None:
    full, size = _both_layouts(desc)
    assert full == size


def test_layout_size_nests_as_deeply() -> None:
    desc: dict[str, Any] = {"fields": [{"name": "x", "size": 1}]}
    for _ in range(40):
        desc = {"fields": [{"name": "s", "size": 1, "struct": desc}], "subsections": [desc]}
    full, size = _both_layouts(desc)
    assert full == size and "nests too deeply" in full[1]


# ---------------------------------------------------------------------------
# One image, many snapshots (ops.runstate)
# ---------------------------------------------------------------------------

def _rewrite_stream(path: Path, snapshot: str, edit: Callable[[bytes], bytes]) -> None:
    """Replace a snapshot's VM state in place (it must stay in its clusters)."""
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot(snapshot)
        start = image.vm_state_offset(sn)
        (ext,) = image.extents(sn, start, sn.vm_state_size)
        assert ext.host_offset is not None
        old = image.open_vm_state(sn).read()
    new = edit(old)
    assert len(new) <= -(-len(old) // 65536) * 65536
    with open(path, "r+b") as f:
        f.seek(ext.host_offset)
        f.write(new)
        f.seek(sn.entry_offset + 32)
        f.write(struct.pack(">I", len(new)))
        assert sn.extra_data_size >= 8
        f.seek(sn.entry_offset + 40)
        f.write(struct.pack(">Q", len(new)))


def _damage_vm_state_mapping(path: Path, snapshot: str, cluster: int) -> None:
    """An unaligned L2 entry for a cluster of the snapshot's VM state."""
    with qcow2snap.open(path) as image:
        sn = image.find_snapshot(snapshot)
        start = image.vm_state_offset(sn) + cluster * image.cluster_size
        l1 = image.read_l1(image.layer(sn))
        l2_offset = l1[start >> (image.cluster_bits + image.l2_bits)] & fmt.L1E_OFFSET_MASK
        entry = l2_offset + 8 * ((start >> image.cluster_bits) & (image.l2_entries - 1))
    with open(path, "r+b") as f:
        f.seek(entry)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(entry)
        f.write(struct.pack(">Q", value | 0x200))


def listed_and_alone(path: Path) -> tuple[list[str | None], list[str | None]]:
    """Run states as one listing reads them, and each read by a fresh image."""
    with qcow2snap.open(path) as image:
        listed = [snapshot_runstate(image, s) for s in image.snapshots]
        count = len(image.snapshots)
    alone = []
    for i in range(count):
        with qcow2snap.open(path) as image:
            alone.append(snapshot_runstate(image, image.snapshots[i]))
    return listed, alone


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_listing_reads_what_each_snapshot_alone_reads(fixture_copy: Any, variant: str) -> None:
    path = fixture_copy("savevm")
    _rewrite_stream(path, "run", VARIANTS[variant])   # the second: read with a warm cache
    listed, alone = listed_and_alone(path)
    assert listed == alone
    assert listed[0] == "prelaunch" and listed[2] == "paused"


@pytest.mark.parametrize("cluster", [0, 3])
def test_listing_meets_damage_in_the_mapping(fixture_copy: Any, cluster: int) -> None:
    """The first MiB of a stream is read whole by the plain path; a short
    first read must fail where that read fails: in the clusters the short
    read leaves out (0) and in those it reads (3, the last)."""
    path = fixture_copy("savevm")
    _damage_vm_state_mapping(path, "run", cluster)
    listed, alone = listed_and_alone(path)
    assert listed == alone == ["prelaunch", None, "paused"]


def test_the_mapping_walk_is_what_meets_it(fixture_copy: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixture_copy("savevm")
    _damage_vm_state_mapping(path, "run", 0)
    # without the mapping walk the short read would have answered
    monkeypatch.setattr(runstate_module._ImageRunstates, "_quick", lambda *_: True)
    with qcow2snap.open(path) as image:
        assert [snapshot_runstate(image, s) for s in image.snapshots] == [
            "prelaunch", "running", "paused"]


def _duplicated(source: Path, dest: Path, count: int) -> Path:
    """``source`` with a new snapshot table: ``count`` copies of its entry 1
    (fresh IDs and names), as tools/bench_list.py builds its images."""
    shutil.copy(source, dest)
    with qcow2snap.open(dest) as image:
        seed = image.snapshots[1]
        end, cs = image.file_size, image.cluster_size
    entry = seed.to_bytes()[:fmt.QCOW_SNAPSHOT_HEADER_SIZE + seed.extra_data_size]
    table = b""
    for i in range(count):
        id_, name = str(i + 1).encode(), f"copy{i}".encode()
        head = entry[:12] + struct.pack(">HH", len(id_), len(name)) + entry[16:]
        table += bytes(-len(table) % 8) + head + id_ + name
    offset = fmt.align_up(end, cs)
    with open(dest, "r+b") as f:
        f.seek(offset)
        f.write(table)
        f.seek(fmt.HEADER_OFFSET_NB_SNAPSHOTS)
        f.write(struct.pack(">IQ", count, offset))
    return dest


def test_snapshots_sharing_a_vm_state_read_it_once(fixture_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _duplicated(fixture_path(fixture_dir, "savevm"), tmp_path / "dup.qcow2", 300)
    reads = []
    real = runstate_module.read_runstate
    monkeypatch.setattr(runstate_module, "read_runstate",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    with qcow2snap.open(path) as image:
        assert {snapshot_runstate(image, s) for s in image.snapshots} == {"running"}
        assert len(reads) == 1
        state = runstate_module._BY_IMAGE[image]
        image.reload()                              # an edit: start again
        assert snapshot_runstate(image, image.snapshots[0]) == "running"
        assert runstate_module._BY_IMAGE[image] is not state and len(reads) == 2


def test_answers_kept_are_bounded(fixture_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runstate_module._ImageRunstates, "MAX_ANSWERS", 2)
    with qcow2snap.open(fixture_path(fixture_dir, "savevm")) as image:
        assert [snapshot_runstate(image, s) for s in image.snapshots] == [
            "prelaunch", "running", "paused"]
        assert len(runstate_module._BY_IMAGE[image].answers) == 2


# ---------------------------------------------------------------------------
# The snapshot table
# ---------------------------------------------------------------------------

_entries = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                     st.binary(max_size=12), st.binary(max_size=20),
                     st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                     st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                     st.binary(max_size=44))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(_entries, min_size=1, max_size=6), current=st.integers(0, 2**40))
def test_snapshot_table_unpacks_as_construct_parses(entries: list[Any], current: int) -> None:
    table = b""
    starts = []
    for l1_offset, l1_size, id_, name, dsec, dnsec, clock, vm_size, extra in entries:
        table += bytes(-len(table) % 8)
        starts.append(len(table))
        table += fmt.QCowSnapshotHeader.build(dict(
            l1_table_offset=l1_offset, l1_size=l1_size, id_str_size=len(id_),
            name_size=len(name), date_sec=dsec, date_nsec=dnsec, vm_clock_nsec=clock,
            vm_state_size=vm_size, extra_data_size=len(extra))) + extra + id_ + name
    parsed = parse_snapshot_table(lambda off, n: (table + bytes(n))[off - 4096:off - 4096 + n],
                                  4096, len(entries), current)
    assert parsed.to_bytes() == table
    for sn, start, (*_, extra) in zip(parsed.snapshots, starts, entries, strict=True):
        head = fmt.QCowSnapshotHeader.parse(table[start:start + 40])
        more = fmt.QCowSnapshotExtraData.parse(extra, extra_data_size=len(extra))
        assert (sn.l1_table_offset, sn.l1_size, sn.date_sec, sn.date_nsec, sn.vm_clock_nsec,
                sn.vm_state_size_field, sn.extra_data_size) == (
            head.l1_table_offset, head.l1_size, head.date_sec, head.date_nsec,
            head.vm_clock_nsec, head.vm_state_size, head.extra_data_size)
        assert (sn.vm_state_size_large_field, sn.disk_size_field, sn.icount_field,
                sn.unknown_extra) == (more.vm_state_size_large, more.disk_size, more.icount,
                                      more.unknown)
        assert sn.entry_offset == 4096 + start


def test_fixed_struct_is_the_header_layout() -> None:
    unpack = fmt.fixed_struct(fmt.QCowSnapshotHeader)
    assert unpack.size == fmt.QCOW_SNAPSHOT_HEADER_SIZE == fmt.QCowSnapshotHeader.sizeof()
    with pytest.raises(TypeError):
        fmt.fixed_struct(fmt.QCowSnapshotExtraData)


# ---------------------------------------------------------------------------
# JSON written in parts
# ---------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True), st.text(max_size=6))
_keys = st.one_of(st.text(max_size=4), st.integers(-3, 3), st.booleans(), st.none(),
                  st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(_keys, inner, max_size=5)), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(value=_values)
def test_json_parts_are_json_dumps(value: Any) -> None:
    assert "".join(describe.json_parts(value)) == json.dumps(value, indent=4,
                                                            ensure_ascii=False)


def test_json_lists_in_batches_and_flat_objects() -> None:
    flat = [{"id": str(i), "n": i, "x": None, "t": i % 2 == 0, "s": "é\n\"\x01"}
            for i in range(2 * describe._JSON_BATCH + 3)]
    mixed = [*flat[:5], {"nested": [1]}, {"f": 1.5}, {1: "int key"}, {}, [], 3]
    for value in (flat, mixed, {"a": flat, "b": {"c": flat[:2]}}, []):
        parts = describe.json_parts(value)
        assert "".join(parts) == json.dumps(value, indent=4, ensure_ascii=False)


@pytest.mark.parametrize("name", ["savevm", "savevm-suspended", "many-snapshots", "v3-basic",
                                  "empty-snapshot"])
def test_cli_json_is_json_dumps(fixture_dir: Path, name: str) -> None:
    path = fixture_path(fixture_dir, name)
    listed = invoke("list", "--json", path)
    info = invoke("info", "--json", path)
    assert listed.exit_code == info.exit_code == 0
    with qcow2snap.open(path) as image:
        objs = [describe.snapshot_json(f) for f in inspection.snapshot_facts(image)]
        info_obj = describe.image_info_json(inspection.image_facts(image, str(path)))
    assert listed.stdout == json.dumps(objs, indent=4, ensure_ascii=False) + "\n"
    assert info.stdout == json.dumps(info_obj, indent=4, ensure_ascii=False) + "\n"
