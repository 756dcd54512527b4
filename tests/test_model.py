"""Layer 2: header, extensions and snapshot entries parse and rebuild
byte for byte, keep unknown parts, and refuse what cannot be parsed."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest
from conftest import FIXTURE_ENTRIES, fixture_path
from hypothesis import given
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import format as fmt
from qcow2snap.errors import CorruptImageError, NotQcow2Error, UnsupportedImageError
from qcow2snap.model import (
    Header,
    Snapshot,
    parse_extensions,
    parse_snapshot_table,
    serialize_snapshot_table,
    snapshot_id_number,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def _v2(**kw: int) -> bytes:
    f = dict(version=2, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
             size=1 << 26, crypt_method=0, l1_size=1, l1_table_offset=0x30000,
             refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=0,
             snapshots_offset=0)
    f.update(kw)
    return fmt.QCowHeaderV2.build(f)


@given(size=u64, l1_size=u32, nb=u32, soff=u64, inc=u64, comp=u64, auto=u64,
       order=st.integers(0, 6), tail=st.binary(max_size=64).map(lambda b: b[: len(b) // 8 * 8]),
       ctype=st.integers(0, 255), pad=st.binary(min_size=7, max_size=7))
def test_v3_header_round_trip(size: int, l1_size: int, nb: int, soff: int, inc: int, comp: int,
                              auto: int, order: int, tail: bytes, ctype: int, pad: bytes) -> None:
    raw = (_v2(version=3, size=size, l1_size=l1_size, nb_snapshots=nb, snapshots_offset=soff)
           + struct.pack(">QQQII", inc, comp, auto, order, 112 + len(tail))
           + bytes([ctype]) + pad + tail)
    header = Header.from_bytes(raw + bytes(64))
    assert header.to_bytes() == raw
    assert header.tail == tail and header.compression_padding == pad
    assert header.compression_type == ctype


def test_v3_header_without_compression_field() -> None:
    raw = _v2(version=3) + struct.pack(">QQQII", 0, 0, 0, 4, 104)
    header = Header.from_bytes(raw + bytes(100))
    assert header.compression_type is None
    assert header.effective_compression_type == 0
    assert header.to_bytes() == raw


def test_v2_header_round_trip_and_implied_fields() -> None:
    raw = _v2()
    header = Header.from_bytes(raw + bytes(100))
    assert header.to_bytes() == raw
    assert (header.refcount_order, header.header_length, header.incompatible_features) == (4, 72, 0)


@pytest.mark.parametrize("data,error,message", [
    (b"", NotQcow2Error, "not in qcow2 format"),
    (b"QFI\xfa" + bytes(100), NotQcow2Error, "not in qcow2 format"),
    (b"QFI\xfb\x00\x00\x00\x04" + bytes(100), UnsupportedImageError, "Unsupported qcow2 version 4"),
    (b"QFI\xfb\x00\x00\x00\x02" + bytes(20), NotQcow2Error, "too short"),
])
def test_header_refusals(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Header.from_bytes(data)


def test_header_length_limits() -> None:
    short = _v2(version=3) + struct.pack(">QQQII", 0, 0, 0, 4, 96)
    with pytest.raises(CorruptImageError, match="qcow2 header too short"):
        Header.from_bytes(short + bytes(100))
    huge = _v2(version=3) + struct.pack(">QQQII", 0, 0, 0, 4, 0xFFFFFFFF)
    with pytest.raises(CorruptImageError, match="qcow2 header exceeds cluster size"):
        Header.from_bytes(huge + bytes(100))


def _ext(etype: int, data: bytes, pad: bytes | None = None) -> bytes:
    if pad is None:
        pad = bytes(fmt.align_up(len(data), 8) - len(data))
    return struct.pack(">II", etype, len(data)) + data + pad


def test_extensions_keep_unknown_and_padding_bytes() -> None:
    area = (_ext(fmt.QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2", b"XYZ")
            + _ext(0x12345678, b"\x01\x02\x03")
            + _ext(0, b""))
    data = bytes(112) + area + bytes(100)
    exts = parse_extensions(data, 112, len(data))
    assert [e.kind for e in exts] == ["backing format", "unknown", "end"]
    assert exts[0].text() == "qcow2" and exts[0].padding == b"XYZ"
    assert b"".join(e.to_bytes() for e in exts) == area


def test_extension_too_large() -> None:
    data = bytes(112) + struct.pack(">II", 0x1234, 1000) + bytes(16)
    with pytest.raises(CorruptImageError, match="Header extension too large"):
        parse_extensions(data, 112, len(data))


def _entry(extra: bytes, id_: bytes = b"1", name: bytes = b"snap", **kw: int) -> bytes:
    h = dict(l1_table_offset=0x50000, l1_size=1, id_str_size=len(id_), name_size=len(name),
             date_sec=1, date_nsec=2000, vm_clock_nsec=3, vm_state_size=0,
             extra_data_size=len(extra))
    h.update(kw)
    return fmt.QCowSnapshotHeader.build(h) + extra + id_ + name


def _table(*entries: bytes, pad: bytes = b"\0") -> bytes:
    out = b""
    for e in entries:
        if len(out) % 8:
            out += pad * (8 - len(out) % 8)
        out += e
    return out


def _parse(table: bytes, nb: int, current_size: int = 1 << 20):
    return parse_snapshot_table(lambda off, n: (table + bytes(n))[off - 0x10000:off - 0x10000 + n],
                                0x10000, nb, current_size)


@given(extra=st.binary(max_size=80), id_=st.binary(max_size=20), name=st.binary(max_size=40),
       pad=st.sampled_from([b"\0", b"\xaa"]))
def test_snapshot_table_round_trip(extra: bytes, id_: bytes, name: bytes, pad: bytes) -> None:
    table = _table(_entry(extra, id_, name), _entry(extra[:5], b"22", b"x"), pad=pad)
    parsed = _parse(table, 2)
    assert parsed.to_bytes() == table
    assert parsed.size == len(table)
    first = parsed.snapshots[0]
    assert first.id_bytes == id_ and first.name_bytes == name
    assert len(first.unknown_extra) == max(0, len(extra) - 24) or len(extra) < 24


def test_snapshot_extra_data_semantics() -> None:
    big = 5 << 32
    extra = struct.pack(">QQQ", big, 1 << 30, 2**64 - 1) + b"unknown!"
    sn = _parse(_table(_entry(extra, vm_state_size=0)), 1).snapshots[0]
    assert sn.vm_state_size == big and sn.disk_size == 1 << 30
    assert sn.icount is None and sn.unknown_extra == b"unknown!"
    # no extra data: v2 defaults (current size, 32-bit VM state, no icount)
    sn = _parse(_table(_entry(b"", vm_state_size=1234)), 1, current_size=777).snapshots[0]
    assert (sn.vm_state_size, sn.disk_size, sn.icount, sn.icount_field) == (1234, 777, None, None)
    # qemu-img snapshot -c stores icount 0, which QEMU shows
    sn = _parse(_table(_entry(struct.pack(">QQQ", 0, 1, 0))), 1).snapshots[0]
    assert sn.icount == 0


def test_snapshot_too_much_extra_data() -> None:
    table = _table(_entry(b"", extra_data_size=1025))
    with pytest.raises(CorruptImageError,
                       match="Too much extra metadata in snapshot table entry 0"):
        _parse(table, 1)


def test_snapshot_table_too_big() -> None:
    # 1000 entries claiming 64 KiB id and name each push the table past 64 MiB
    entry = _entry(b"", b"", b"", id_str_size=65535, name_size=65535)

    def reader(off: int, n: int) -> bytes:
        # every entry header reads the same; return headers at each aligned entry start
        rel = off - 0x10000
        out = bytearray(n)
        step = fmt.align_up(40 + 65535 * 2, 8)
        for start in range((rel // step) * step, rel + n, step):
            for i, b in enumerate(entry[:40]):
                if rel <= start + i < rel + n:
                    out[start + i - rel] = b
        return bytes(out)

    with pytest.raises(CorruptImageError, match="Snapshot table is too big"):
        parse_snapshot_table(reader, 0x10000, 1000, 1 << 20)


def test_snapshot_to_bytes_is_identity_for_24_byte_extra() -> None:
    raw = _entry(struct.pack(">QQQ", 7, 8, 9))
    sn: Snapshot = _parse(raw, 1).snapshots[0]
    assert sn.to_bytes() == raw
    assert sn.entry_length == len(raw)


@pytest.mark.parametrize(("raw", "number"), [
    (b"", 0), (b"abc", 0), (b"7", 7), (b"  12x", 12), (b"+3", 3), (b"-1", (1 << 64) - 1),
    (b"-5", (1 << 64) - 5), (b"18446744073709551615", (1 << 64) - 1),
    (b"18446744073709551616", (1 << 64) - 1), (b"-18446744073709551616", (1 << 64) - 1),
    (b"0000000000000000000000000042", 42), (b"9" * 5000, (1 << 64) - 1), (b"12\x0034", 12),
])
def test_snapshot_id_number_is_strtoul(raw: bytes, number: int) -> None:
    """QEMU reads IDs with strtoul: saturating, wrapping negatives, and never
    limited by Python's int-from-string digit cap (IDs reach 65535 bytes)."""
    assert snapshot_id_number(raw) == number


@given(digits=st.text("0123456789", min_size=1, max_size=24))
def test_snapshot_id_number_fast_path_is_the_general_one(digits: str) -> None:
    """Plain digit IDs take a short cut; a leading blank forces the general
    strtoul path, which must agree."""
    raw = digits.encode()
    assert snapshot_id_number(raw) == snapshot_id_number(b" " + raw)
    assert snapshot_id_number(raw) == min(int(digits), 2**64 - 1)


def test_snapshot_header_fields_follow_the_layout() -> None:
    """fmt.SnapshotHeaderFields names QCowSnapshotHeader's fields in order,
    and unpacks what the layout parses."""
    names = [sub.name for sub in fmt.QCowSnapshotHeader.subcon.subcons]
    assert list(fmt.SnapshotHeaderFields._fields) == names
    raw = bytes(range(1, 41))
    parsed = fmt.QCowSnapshotHeader.parse(raw)
    assert fmt.unpack_snapshot_header(b"xx" + raw, 2) == tuple(parsed[n] for n in names)


def test_every_declared_layout_is_reached_through_format() -> None:
    """fmt.LAYOUT_NAMES (what format's __getattr__ loads) is every layout
    qcow2snap.layouts declares."""
    from qcow2snap import layouts

    assert set(layouts.__all__) == fmt.LAYOUT_NAMES
    assert all(getattr(fmt, name) is getattr(layouts, name) for name in layouts.__all__)
    with pytest.raises(AttributeError):
        fmt.QCowNoSuchLayout  # noqa: B018
    # the constants layouts.py writes as numbers are format's
    fields = {sub.name: sub.subcon for sub in fmt.QCryptoBlockLUKSHeader.subcon.subcons}
    assert fields["master_key_digest"].length == fmt.QCRYPTO_BLOCK_LUKS_DIGEST_LEN
    assert fields["key_slots"].count == fmt.QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS
    assert fmt.QCryptoBlockLUKSHeader.sizeof() == fmt.QCRYPTO_BLOCK_LUKS_HEADER_SIZE
    assert fmt.FIXED_LAYOUTS["QCowHeaderV2"].consts == ((0, fmt.QCOW_MAGIC),)


@pytest.mark.parametrize("name", sorted(fmt.FIXED_LAYOUTS))
def test_fixed_layouts_are_their_declarations(name: str) -> None:
    """Each struct form of fmt.FIXED_LAYOUTS is what fixed_struct derives
    from its construct declaration: the format, the field names in order and
    the Const fields' values."""
    import construct

    layout = getattr(fmt, name)
    fixed = fmt.FIXED_LAYOUTS[name]
    assert fixed.format == fmt.fixed_struct(layout).format
    fields = layout.subcon.subcons
    assert fixed.names == tuple(sub.name for sub in fields)
    assert fixed.consts == tuple((i, sub.subcon.value) for i, sub in enumerate(fields)
                                 if isinstance(sub.subcon, construct.Const))


@given(data=st.data())
def test_parse_fixed_parses_as_the_layout(data: st.DataObject) -> None:
    """parse_fixed gives construct's fields for any bytes, and a
    CorruptImageError where construct's parse fails (too short, a wrong
    magic)."""
    name = data.draw(st.sampled_from(sorted(fmt.FIXED_LAYOUTS)))
    layout = getattr(fmt, name)
    size = layout.sizeof()
    raw = data.draw(st.one_of(st.binary(min_size=0, max_size=size + 8),
                              st.binary(min_size=size - 4, max_size=size).map(
                                  lambda b: fmt.QCOW_MAGIC + b)))
    try:
        expected = fmt.parse_struct(layout, raw, structure="x", offset=0)
    except CorruptImageError:
        with pytest.raises(CorruptImageError, match=r"^cannot parse x at offset 0x0: "):
            fmt.parse_fixed(name, raw, structure="x", offset=0)
        return
    parsed = fmt.parse_fixed(name, raw, structure="x", offset=0)
    assert parsed == {k: v for k, v in expected.items() if not k.startswith("_")}
    assert [getattr(parsed, k) for k in parsed] == list(parsed.values())


@given(extra=st.binary(min_size=0, max_size=48), size=st.integers(0, 48))
def test_snapshot_extra_fast_path_matches_the_layout(extra: bytes, size: int) -> None:
    extra = extra.ljust(size, b"\x5a")[:size]
    parsed = fmt.QCowSnapshotExtraData.parse(extra, extra_data_size=size)
    large, disk, icount, known = fmt.unpack_snapshot_extra(b"\0" * 3 + extra + bytes(24), 3,
                                                          size)
    assert (large, disk, icount) == (parsed.vm_state_size_large, parsed.disk_size,
                                     parsed.icount)
    assert extra[known:] == parsed.unknown


def test_normalized_entry_holds_qemus_write_rules() -> None:
    """Snapshot.to_bytes(normalize=True) writes what qcow2_write_snapshots
    writes: 24 known bytes of extra data, disk_size filled in, icount -1
    where none was stored, the legacy VM-state field 0 over 4 GiB, and
    unknown extra data only past the 24 known bytes."""
    # v2 entry without extra data: disk size from the image, no icount
    sn = _parse(_table(_entry(b"", vm_state_size=1234)), 1, current_size=777).snapshots[0]
    out = _parse(sn.to_bytes(normalize=True), 1).snapshots[0]
    assert out.extra_data_size == 24
    assert (out.vm_state_size_field, out.vm_state_size_large_field) == (1234, 1234)
    assert (out.disk_size_field, out.icount_field) == (777, fmt.QCOW_ICOUNT_NONE)
    # a VM state over 4 GiB: old readers see none rather than a truncated one
    big = 5 << 32
    sn = _parse(_table(_entry(struct.pack(">QQQ", big, 1 << 30, 0) + b"more")), 1).snapshots[0]
    out = _parse(sn.to_bytes(normalize=True), 1).snapshots[0]
    assert (out.vm_state_size_field, out.vm_state_size) == (0, big)
    assert out.unknown_extra == b"more" and out.extra_data_size == 28
    # 20 bytes of extra data: the 4 bytes past disk_size are not kept
    sn = _parse(_table(_entry(struct.pack(">QQ", 0, 1 << 20) + b"abcd")), 1).snapshots[0]
    assert sn.unknown_extra == b"abcd" and sn.to_bytes() == _entry(
        struct.pack(">QQ", 0, 1 << 20) + b"abcd")
    out = _parse(sn.to_bytes(normalize=True), 1).snapshots[0]
    assert out.unknown_extra == b"" and out.extra_data_size == 24


def test_serialized_table_aligns_entries_like_qemu() -> None:
    first = _parse(_table(_entry(b"", b"1", b"abc")), 1).snapshots[0]
    second = dataclasses.replace(first, id_bytes=b"22", name_bytes=b"x")
    table = serialize_snapshot_table([first, second])
    assert table == _table(first.to_bytes(normalize=True), second.to_bytes(normalize=True))
    parsed = _parse(table, 2)
    assert [s.id_bytes for s in parsed.snapshots] == [b"1", b"22"]
    assert parsed.size == len(table)


# -- the table serializer against construct's builder -------------------------
# Edits pack entries with struct (model._build_entry); the layout's own
# builder is the reference and must give the same bytes.

def _layout_entry(sn: Snapshot, *, normalize: bool = False) -> bytes:
    """``sn.to_bytes(normalize=...)`` through construct's interpreted builder
    (the serializer's code before it packed with struct)."""
    if normalize:
        unknown = sn.qemu_unknown_extra
        legacy = sn.vm_state_size if sn.vm_state_size <= fmt.UINT32_MAX else 0
        extra_size = fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE + len(unknown)
        large, disk = sn.vm_state_size, sn.disk_size
        icount = fmt.QCOW_ICOUNT_NONE if sn.icount_field is None else sn.icount_field
    else:
        unknown, legacy, extra_size = sn.unknown_extra, sn.vm_state_size_field, sn.extra_data_size
        large, disk, icount = sn.vm_state_size_large_field, sn.disk_size_field, sn.icount_field
    extra = fmt.QCowSnapshotExtraData.build(
        {"vm_state_size_large": large, "disk_size": disk, "icount": icount, "unknown": unknown},
        extra_data_size=extra_size)
    return fmt.QCowSnapshotEntry.build({
        "header": {"l1_table_offset": sn.l1_table_offset, "l1_size": sn.l1_size,
                   "id_str_size": len(sn.id_bytes), "name_size": len(sn.name_bytes),
                   "date_sec": sn.date_sec, "date_nsec": sn.date_nsec,
                   "vm_clock_nsec": sn.vm_clock_nsec, "vm_state_size": legacy,
                   "extra_data_size": extra_size},
        "extra_data": extra, "id_str": sn.id_bytes, "name": sn.name_bytes})


def _layout_table(snapshots: list[Snapshot]) -> bytes:
    return _table(*(_layout_entry(s, normalize=True) for s in snapshots))


@given(extra=st.binary(max_size=48), id_=st.binary(max_size=20), name=st.binary(max_size=40),
       l1=u64, l1_size=u32, date=u32, nsec=u32, clock=u64, vm_state=u32,
       large=u64, disk=u64, icount=u64)
def test_entry_packing_matches_the_layout_builder(
        extra: bytes, id_: bytes, name: bytes, l1: int, l1_size: int, date: int, nsec: int,
        clock: int, vm_state: int, large: int, disk: int, icount: int) -> None:
    """Every extra-data size (0-48, so each known field present or not, with
    unknown bytes or without), both as stored and normalized."""
    known = struct.pack(">QQQ", large, disk, icount)
    extra = (known + extra)[:len(extra)]
    sn = _parse(_entry(extra, id_, name, l1_table_offset=l1, l1_size=l1_size, date_sec=date,
                       date_nsec=nsec, vm_clock_nsec=clock, vm_state_size=vm_state),
                1, current_size=disk ^ 1).snapshots[0]
    assert sn.to_bytes() == _layout_entry(sn)
    assert sn.to_bytes(normalize=True) == _layout_entry(sn, normalize=True)
    second = dataclasses.replace(sn, id_bytes=id_ + b"9", name_bytes=b"n")
    assert serialize_snapshot_table([sn, second, sn]) == _layout_table([sn, second, sn])


def test_entry_packing_refuses_what_the_layout_refuses() -> None:
    """A known field that the extra-data size covers must be present, and the
    extra data must fill the size (construct's Bytes field checks that)."""
    sn = _parse(_table(_entry(bytes(24))), 1).snapshots[0]
    with pytest.raises(struct.error):
        dataclasses.replace(sn, icount_field=None).to_bytes()
    with pytest.raises(ValueError, match="extra data is 28 bytes"):
        dataclasses.replace(sn, unknown_extra=b"abcd").to_bytes()


def _fixtures_with_snapshots() -> list[str]:
    return [f["name"] for f in FIXTURE_ENTRIES if f.get("info", {}).get("snapshots")]


@pytest.mark.parametrize("name", _fixtures_with_snapshots())
def test_fixture_tables_serialize_as_qemu_wrote_them(fixture_dir: Path, name: str) -> None:
    """For every fixture with snapshots (QEMU wrote each table):
    serialize_snapshot_table gives the bytes on disk, the bytes construct's
    builder gives, and each entry as stored rebuilds the same way."""
    path = fixture_path(fixture_dir, name)
    with qcow2snap.open(path) as image:
        table = image.snapshot_table
        snapshots = list(table.snapshots)
    assert snapshots
    on_disk = path.read_bytes()[table.offset:table.offset + table.size]
    out = serialize_snapshot_table(snapshots)
    assert out == on_disk
    assert out == _layout_table(snapshots)
    assert table.to_bytes() == b"".join(
        pad + _layout_entry(s) for pad, s in zip(table.paddings, table.snapshots, strict=True))
