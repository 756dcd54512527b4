"""Typed, immutable views of the header, its extensions and the snapshot
table (layer 2: fields <-> domain objects).

Every object keeps what it does not understand (unknown header tail bytes,
unknown extensions with their padding, unknown snapshot extra data), so
``to_bytes()`` of a parsed object gives back the exact bytes it came from.
Construct containers never leave this module.

Semantic limits (QEMU's open-time checks) are applied by
:mod:`qcow2snap.image`; this module only refuses what it cannot parse.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import format as fmt
from .errors import CorruptImageError, NotQcow2Error, UnsupportedImageError

__all__ = [
    "BitmapsExtension",
    "CryptoHeaderExtension",
    "Extension",
    "FeatureName",
    "Header",
    "Snapshot",
    "SnapshotTable",
    "parse_extensions",
    "parse_snapshot_table",
    "snapshot_id_number",
]


# ---------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Header:
    """The qcow2 header, fields named as in qcow2.txt.

    For version 2 images the v3 fields hold their implied values
    (features 0, ``refcount_order`` 4, ``header_length`` 72).
    ``compression_type`` is ``None`` when the header is too short to hold it.
    ``compression_padding`` and ``tail`` keep bytes 105-111 and everything
    between byte 112 and ``header_length`` verbatim.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = fmt.QCOW_HEADER_V2_SIZE
    compression_type: int | None = None
    compression_padding: bytes = b""
    tail: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """Parse a header from the start of the file.

        ``data`` should hold at least the first ``min(cluster, file)`` bytes;
        raises :class:`NotQcow2Error` for a wrong magic or a file too short,
        :class:`UnsupportedImageError` for an unknown version and
        :class:`CorruptImageError` for an impossible ``header_length``.
        """
        if len(data) < 8 or data[:4] != fmt.QCOW_MAGIC:
            raise NotQcow2Error("Image is not in qcow2 format")
        # the version decides what the rest is; it is read before the length
        # is known to hold a whole version 2 header (QEMU's order of errors)
        padded = bytes(data[:fmt.QCOW_HEADER_V2_SIZE]).ljust(fmt.QCOW_HEADER_V2_SIZE, b"\0")
        version = fmt.parse_fixed("QCowHeaderV2", padded, structure="header",
                                  offset=0).version
        if version not in (fmt.QCOW_VERSION_2, fmt.QCOW_VERSION_3):
            raise UnsupportedImageError(f"Unsupported qcow2 version {version}",
                                        feature=f"version {version}")
        if len(data) < fmt.QCOW_HEADER_V2_SIZE:
            raise NotQcow2Error(
                f"Image is not in qcow2 format: file too short for a header ({len(data)} bytes)")
        v2 = fmt.parse_fixed("QCowHeaderV2", data[:fmt.QCOW_HEADER_V2_SIZE],
                             structure="header", offset=0)
        fields = {k: v2[k] for k in _V2_FIELDS}
        if version == fmt.QCOW_VERSION_2:
            return cls(**fields)
        if len(data) < fmt.QCOW_HEADER_V3_SIZE:
            raise CorruptImageError("qcow2 header too short", structure="header", offset=0)
        v3 = fmt.parse_fixed("QCowHeaderV3",
                             data[fmt.QCOW_HEADER_V2_SIZE:fmt.QCOW_HEADER_V3_SIZE],
                             structure="header", offset=fmt.QCOW_HEADER_V2_SIZE)
        header_length = v3.header_length
        if header_length < fmt.QCOW_HEADER_V3_SIZE:
            raise CorruptImageError("qcow2 header too short", structure="header", offset=100)
        if header_length > (1 << min(max(v2.cluster_bits, 0), 63)) or header_length > len(data):
            raise CorruptImageError("qcow2 header exceeds cluster size",
                                    structure="header", offset=100)
        compression_type = None
        padding = b""
        if header_length > fmt.QCOW_HEADER_V3_SIZE:
            if header_length < fmt.QCOW_HEADER_FULL_SIZE:
                # 105..111: a compression_type byte plus a partial pad
                compression_type = data[fmt.QCOW_HEADER_V3_SIZE]
                padding = bytes(data[fmt.QCOW_HEADER_V3_SIZE + 1:header_length])
                tail = b""
            else:
                comp = fmt.parse_fixed(
                    "QCowHeaderCompression",
                    data[fmt.QCOW_HEADER_V3_SIZE:fmt.QCOW_HEADER_FULL_SIZE],
                    structure="header", offset=fmt.QCOW_HEADER_V3_SIZE)
                compression_type = comp.compression_type
                padding = bytes(comp.padding)
                tail = bytes(data[fmt.QCOW_HEADER_FULL_SIZE:header_length])
        else:
            tail = b""
        return cls(**fields,
                   incompatible_features=v3.incompatible_features,
                   compatible_features=v3.compatible_features,
                   autoclear_features=v3.autoclear_features,
                   refcount_order=v3.refcount_order,
                   header_length=header_length,
                   compression_type=compression_type,
                   compression_padding=padding,
                   tail=tail)

    def to_bytes(self) -> bytes:
        """The header's ``header_length`` bytes (72 for version 2)."""
        out = fmt.build_struct(fmt.QCowHeaderV2, {k: getattr(self, k) for k in _V2_FIELDS})
        if self.version == fmt.QCOW_VERSION_2:
            return out
        out += fmt.build_struct(fmt.QCowHeaderV3, {
            "incompatible_features": self.incompatible_features,
            "compatible_features": self.compatible_features,
            "autoclear_features": self.autoclear_features,
            "refcount_order": self.refcount_order,
            "header_length": self.header_length,
        })
        if self.compression_type is not None:
            out += bytes([self.compression_type]) + self.compression_padding
        return out + self.tail

    # --- derived geometry -------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def effective_compression_type(self) -> int:
        return self.compression_type or fmt.QCOW2_COMPRESSION_TYPE_ZLIB

    @property
    def has_backing_file(self) -> bool:
        return self.backing_file_offset != 0

    def commit_fields_bytes(self) -> bytes:
        """Header bytes 36-71: every field that says where metadata lives.

        A single write of this range publishes a new metadata state
        (it lies inside the first 512-byte sector)."""
        return self.to_bytes()[fmt.HEADER_OFFSET_L1_SIZE:fmt.QCOW_HEADER_V2_SIZE]


_V2_FIELDS = ("version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
              "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
              "refcount_table_clusters", "nb_snapshots", "snapshots_offset")


# ---------------------------------------------------------------------------
# Header extensions
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FeatureName:
    """One entry of the feature-name table."""

    type: int
    bit: int
    name: str
    raw_name: bytes = field(repr=False, default=b"")


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """The bitmaps extension's fields (qcow2.txt, "Bitmaps extension")."""

    nb_bitmaps: int
    reserved32: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclass(frozen=True, slots=True)
class CryptoHeaderExtension:
    """Where the encryption header (LUKS) lies in the image file."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension, kept byte for byte.

    ``offset`` is where its 8-byte type/length header starts in the file;
    ``padding`` holds the bytes between the end of ``data`` and the next
    8-byte boundary as they were read (QEMU writes zeros; readers must not
    rely on it).  The end marker is an ``Extension`` of type 0 too.
    """

    type: int
    data: bytes
    padding: bytes
    offset: int
    declared_length: int

    @property
    def kind(self) -> str:
        return fmt.EXTENSION_NAMES.get(self.type, "unknown")

    @property
    def is_known(self) -> bool:
        return self.type in fmt.EXTENSION_NAMES

    def to_bytes(self) -> bytes:
        return (fmt.build_struct(fmt.QCowExtensionHeader,
                                 {"type": self.type, "length": self.declared_length})
                + self.data + self.padding)

    # Typed views of the known kinds -------------------------------------

    def text(self) -> str:
        """Backing format / data-file name: a string, not NUL-terminated."""
        return self.data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def feature_names(self) -> list[FeatureName]:
        """The feature-name table's entries.  A trailing entry shorter than
        48 bytes counts, zero-padded: QEMU reads the extension's bytes into
        a zero-filled buffer of whole entries (qcow2_read_extensions)."""
        size = fmt.QCOW2_FEATURE_ENTRY_SIZE
        entries = []
        count = -(-len(self.data) // size)
        for i in range(count):
            chunk = self.data[i * size:(i + 1) * size].ljust(size, b"\0")
            entry = fmt.parse_fixed("Qcow2Feature", chunk, structure="feature name table")
            name = bytes(entry.name).split(b"\0", 1)[0].decode("utf-8", "replace")
            entries.append(FeatureName(entry.type, entry.bit, name, bytes(entry.name)))
        return entries

    def bitmaps(self) -> BitmapsExtension:
        e = fmt.parse_fixed("Qcow2BitmapHeaderExt", self.data,
                            structure="bitmaps extension", offset=self.offset)
        return BitmapsExtension(e.nb_bitmaps, e.reserved32, e.bitmap_directory_size,
                                e.bitmap_directory_offset)

    def crypto_header(self) -> CryptoHeaderExtension:
        e = fmt.parse_fixed("Qcow2CryptoHeaderExtension", self.data,
                            structure="full disk encryption header extension",
                            offset=self.offset)
        return CryptoHeaderExtension(e.offset, e.length)


def parse_extensions(data: bytes, start_offset: int, end_offset: int) -> list[Extension]:
    """Parse header extensions in ``data[start_offset:end_offset]`` like
    QEMU's ``qcow2_read_extensions``: stop at the end marker or at
    ``end_offset``; an extension whose data runs past ``end_offset`` is
    "Header extension too large".  ``data`` is the start of the file."""
    extensions: list[Extension] = []
    offset = start_offset
    end_offset = min(end_offset, len(data))
    while offset < end_offset:
        if end_offset - offset < 8:
            raise CorruptImageError("Header extension too large", structure="header extension",
                                    offset=offset)
        ext = fmt.parse_fixed("QCowExtensionHeader", data[offset:offset + 8],
                              structure="header extension", offset=offset)
        data_start = offset + 8
        if ext.length > end_offset - data_start:
            raise CorruptImageError("Header extension too large", structure="header extension",
                                    offset=offset)
        if ext.type == fmt.QCOW2_EXT_MAGIC_END:
            extensions.append(Extension(ext.type, b"", b"", offset, ext.length))
            break
        data_end = data_start + ext.length
        padded_end = min(fmt.align_up(data_end, 8), end_offset)
        extensions.append(Extension(ext.type, bytes(data[data_start:data_end]),
                                    bytes(data[data_end:padded_end]), offset, ext.length))
        offset = fmt.align_up(data_end, 8)
    return extensions


# ---------------------------------------------------------------------------
# Snapshot table
# ---------------------------------------------------------------------------

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot, as stored in the snapshot table.

    ``id`` and ``name`` are the stored strings (``id_bytes``/``name_bytes``
    are the exact bytes).  Size fields are the effective values QEMU uses:
    ``vm_state_size`` prefers the 64-bit extra field, ``disk_size`` falls
    back to the image's current size when the entry does not store it, and
    ``icount`` is ``None`` where QEMU shows none.  The ``*_field`` attributes
    hold what is really stored (``None`` = not present in the entry).
    """

    index: int
    id_bytes: bytes
    name_bytes: bytes
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size_field: int
    extra_data_size: int
    vm_state_size_large_field: int | None
    disk_size_field: int | None
    icount_field: int | None
    unknown_extra: bytes
    entry_offset: int
    disk_size: int

    @property
    def id(self) -> str:
        return _text(self.id_bytes)

    @property
    def name(self) -> str:
        return _text(self.name_bytes)

    @property
    def vm_state_size(self) -> int:
        if self.vm_state_size_large_field is not None:
            return self.vm_state_size_large_field
        return self.vm_state_size_field

    @property
    def has_vm_state(self) -> bool:
        return self.vm_state_size != 0

    @property
    def icount(self) -> int | None:
        if self.icount_field is None or self.icount_field == fmt.QCOW_ICOUNT_NONE:
            return None
        return self.icount_field

    @property
    def date(self) -> _dt.datetime:
        """Creation time (UTC), from ``date_sec`` and ``date_nsec``."""
        return _EPOCH + _dt.timedelta(seconds=self.date_sec, microseconds=self.date_nsec // 1000)

    @property
    def vm_clock_sec(self) -> int:
        return self.vm_clock_nsec // 1_000_000_000

    @property
    def label(self) -> str:
        """``ID (name)``, as messages name a snapshot."""
        return f"{self.id} ({self.name})"

    @property
    def entry_length(self) -> int:
        """Bytes of this entry in the table, without inter-entry padding."""
        return (fmt.QCOW_SNAPSHOT_HEADER_SIZE + self.extra_data_size + len(self.id_bytes)
                + len(self.name_bytes))

    @property
    def qemu_unknown_extra(self) -> bytes:
        """The extra data QEMU keeps without knowing it: what lies past the
        24 known bytes (``qcow2_read_snapshots`` keeps nothing of an entry
        with 24 bytes or fewer)."""
        if self.extra_data_size > fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE:
            return self.unknown_extra
        return b""

    def to_bytes(self, *, normalize: bool = False) -> bytes:
        """The entry, without padding.

        By default exactly as stored.  With ``normalize``, as QEMU's
        ``qcow2_write_snapshots`` writes it back -- the one place these
        rules live: the 24 known bytes of extra data always (then the
        unknown extra data it keeps), ``disk_size`` filled with the size the
        entry stands for, a missing ``icount`` as ``QCOW_ICOUNT_NONE``, and
        the legacy 32-bit ``vm_state_size`` 0 for a VM state over 4 GiB (an
        old reader then sees a disk-only snapshot rather than a truncated
        state)."""
        if not normalize:
            return _build_entry(
                self, vm_state_size_field=self.vm_state_size_field,
                extra_data_size=self.extra_data_size,
                vm_state_size_large=self.vm_state_size_large_field,
                disk_size=self.disk_size_field, icount=self.icount_field,
                unknown_extra=self.unknown_extra)
        unknown = self.qemu_unknown_extra
        vm_state_size = self.vm_state_size
        return _build_entry(
            self,
            vm_state_size_field=vm_state_size if vm_state_size <= fmt.UINT32_MAX else 0,
            extra_data_size=fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE + len(unknown),
            vm_state_size_large=vm_state_size, disk_size=self.disk_size,
            icount=fmt.QCOW_ICOUNT_NONE if self.icount_field is None else self.icount_field,
            unknown_extra=unknown)


def new_snapshot(*, id_bytes: bytes, name_bytes: bytes, l1_table_offset: int, l1_size: int,
                 date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size: int,
                 disk_size: int, icount: int | None) -> Snapshot:
    """A snapshot that is not in a table yet, with the fields QEMU's
    ``qcow2_write_snapshots`` stores for it (``index`` and ``entry_offset``
    are -1 until it is written)."""
    return Snapshot(
        index=-1, id_bytes=id_bytes, name_bytes=name_bytes, l1_table_offset=l1_table_offset,
        l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec,
        vm_state_size_field=vm_state_size if vm_state_size <= fmt.UINT32_MAX else 0,
        extra_data_size=fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE,
        vm_state_size_large_field=vm_state_size, disk_size_field=disk_size,
        icount_field=fmt.QCOW_ICOUNT_NONE if icount is None else icount, unknown_extra=b"",
        entry_offset=-1, disk_size=disk_size)


def serialize_snapshot_table(snapshots: Sequence[Snapshot]) -> bytes:
    """A snapshot table as QEMU's ``qcow2_write_snapshots`` writes it: the
    entries normalized (:meth:`Snapshot.to_bytes`), back to back, each
    starting 8-byte aligned (padding before an entry, none after the last)."""
    parts: list[bytes] = []
    pos = 0
    for snapshot in snapshots:
        entry = snapshot.to_bytes(normalize=True)
        pad = -pos & 7
        if pad:
            parts.append(bytes(pad))
        parts.append(entry)
        pos += pad + len(entry)
    return b"".join(parts)


def _build_entry(snapshot: Snapshot, *, vm_state_size_field: int, extra_data_size: int,
                 vm_state_size_large: int | None, disk_size: int | None,
                 icount: int | None, unknown_extra: bytes) -> bytes:
    """One snapshot table entry (no padding) as :data:`fmt.QCowSnapshotEntry`
    lays it out; extra-data fields that ``extra_data_size`` does not cover
    must be ``None``.  Packed with the header layout's ``struct.Struct`` and
    :func:`fmt.pack_snapshot_extra` (an edit rewrites up to 65,536 entries;
    construct's builder gives the same bytes, tests/test_model.py compares)."""
    extra = fmt.pack_snapshot_extra(vm_state_size_large, disk_size, icount, unknown_extra,
                                    extra_data_size)
    if len(extra) != extra_data_size:  # what the layout's Bytes(extra_data_size) refuses
        raise ValueError(f"snapshot extra data is {len(extra)} bytes, its size field says "
                         f"{extra_data_size}")
    return b"".join((
        _pack_header(snapshot.l1_table_offset, snapshot.l1_size, len(snapshot.id_bytes),
                     len(snapshot.name_bytes), snapshot.date_sec, snapshot.date_nsec,
                     snapshot.vm_clock_nsec, vm_state_size_field, extra_data_size),
        extra, snapshot.id_bytes, snapshot.name_bytes))


_pack_header = fmt.SNAPSHOT_HEADER_STRUCT.pack


@dataclass(frozen=True, slots=True)
class SnapshotTable:
    """The parsed table: entries plus QEMU's ``snapshots_size`` (bytes from
    the table start to the end of the last name; no trailing padding) and the
    padding bytes found before each entry (kept for byte-exact rebuilding)."""

    offset: int
    snapshots: tuple[Snapshot, ...]
    size: int
    paddings: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        out = bytearray()
        for pad, snapshot in zip(self.paddings, self.snapshots, strict=True):
            out += pad
            out += snapshot.to_bytes()
        return bytes(out)


_READ_CHUNK = 256 * 1024


def parse_snapshot_table(pread: Callable[[int, int], bytes], snapshots_offset: int,
                         nb_snapshots: int, current_size: int) -> SnapshotTable:
    """Read and parse the snapshot table the way QEMU's
    ``qcow2_read_snapshots`` does, with its limits and messages.

    ``pread(offset, length)`` returns file bytes (zero-filled past the end of
    the file, as QEMU reads).  Memory is bounded by the 64 MiB table limit.
    """
    snapshots: list[Snapshot] = []
    paddings: list[bytes] = []
    if nb_snapshots == 0:
        return SnapshotTable(snapshots_offset, (), 0, ())
    buf = bytearray()

    def need(end: int) -> None:
        # make buf cover table bytes [0, end)
        if end > len(buf):
            grow = max(end - len(buf), _READ_CHUNK)
            buf.extend(pread(snapshots_offset + len(buf), grow))

    # Entries are unpacked with struct (the header layout's fixed_struct; the
    # extra data by fmt.unpack_snapshot_extra): this loop runs up to 65536
    # times, and construct costs ~9 us an entry.  need() zero-fills past EOF,
    # so every unpack has the bytes it needs.
    unpack_header = fmt.SNAPSHOT_HEADER_STRUCT.unpack_from
    unpack_known_extra = fmt.SNAPSHOT_KNOWN_EXTRA_STRUCT.unpack_from
    unpack_extra = fmt.unpack_snapshot_extra
    known_size = fmt.QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE
    header_size = fmt.QCOW_SNAPSHOT_HEADER_SIZE
    max_extra = fmt.QCOW_MAX_SNAPSHOT_EXTRA_DATA
    pos = 0
    for i in range(nb_snapshots):
        entry_start = (pos + 7) & ~7
        need(entry_start + header_size)
        (l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_data_size) = unpack_header(buf, entry_start)
        if extra_data_size > max_extra:
            raise CorruptImageError(
                f"Too much extra metadata in snapshot table entry {i}",
                structure=f"snapshot table entry {i}", offset=snapshots_offset + entry_start)
        extra_start = entry_start + header_size
        id_start = extra_start + extra_data_size
        name_start = id_start + id_str_size
        entry_end = name_start + name_size
        if entry_end > fmt.QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptImageError(
                f"Snapshot table is too big ({nb_snapshots - i} overhanging snapshots)",
                structure=f"snapshot table entry {i}", offset=snapshots_offset + entry_start)
        need(entry_end)
        if extra_data_size >= known_size:    # what QEMU writes: one C call
            vm_state_size_large, disk_size_field, icount_field = unpack_known_extra(
                buf, extra_start)
            known_extra = known_size
        else:
            vm_state_size_large, disk_size_field, icount_field, known_extra = unpack_extra(
                buf, extra_start, extra_data_size)
        snapshots.append(Snapshot(
            i,                                       # index
            bytes(buf[id_start:name_start]),         # id_bytes
            bytes(buf[name_start:entry_end]),        # name_bytes
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,                           # vm_state_size_field
            extra_data_size,
            vm_state_size_large,                     # vm_state_size_large_field
            disk_size_field,
            icount_field,
            bytes(buf[extra_start + known_extra:id_start]),  # unknown_extra
            snapshots_offset + entry_start,          # entry_offset
            current_size if disk_size_field is None else disk_size_field,  # disk_size
        ))
        paddings.append(bytes(buf[pos:entry_start]))
        pos = entry_end
    return SnapshotTable(snapshots_offset, tuple(snapshots), pos, tuple(paddings))


_ULONG_MAX = (1 << 64) - 1


def snapshot_id_number(id_bytes: bytes) -> int:
    """C ``strtoul(id, NULL, 10)`` on a 64-bit host, as QEMU's
    ``find_new_snapshot_id`` reads IDs: leading blanks, an optional sign,
    then digits; a value past ULONG_MAX saturates to it (whatever the sign),
    a negative one wraps.  IDs may be 65535 digits long, so the digits are
    never handed whole to ``int``."""
    if len(id_bytes) <= 19 and id_bytes.isdigit():  # what IDs are: < 10**19 < ULONG_MAX
        return int(id_bytes)
    s = id_bytes.split(b"\0", 1)[0].lstrip(b" \t\n\r\f\v")
    negative = s[:1] == b"-"
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    n = 0
    while n < len(s) and 48 <= s[n] <= 57:
        n += 1
    digits = s[:n].lstrip(b"0")
    if not digits:
        return 0
    if len(digits) > 20 or int(digits) > _ULONG_MAX:
        return _ULONG_MAX
    value = int(digits)
    return (-value) % (1 << 64) if negative else value
