"""On-disk layouts and constants of the qcow2 format (layer 1: bytes <-> fields).

Every fixed layout is a declarative ``construct`` definition named after the
structure in QEMU's ``docs/interop/qcow2.txt``, declared in
:mod:`qcow2snap.layouts` and reached here (``fmt.QCowHeaderV2``): that module
is loaded on first use, since importing construct costs about as much as
starting the interpreter.  Every field uses the spec's field name, every
constant QEMU's macro name (``block/qcow2.h``), so ``grep`` works in both
directions.  All integers are big-endian.

This module does no I/O and holds no logic beyond derived constants and one
error-translating parse helper.  Bulk tables (L1, L2, refcount) are *not*
described here: see :mod:`qcow2snap.tables`, which decodes them with
``array`` (construct per entry is 20-80x slower; docs/design.md).

Construct is used interpreted on image data, with two measured exceptions:

- the snapshot table (up to 65,536 entries) is unpacked, and packed when an
  edit rewrites it, with the ``struct.Struct`` that :func:`fixed_struct` derives
  from the *fixed-size, integer-only* entry header layout, and its extra data
  field by field as :data:`QCowSnapshotExtraData` lays it out (construct's
  compiled parser, used before, cost ~9 us an entry, 0.6-1 s of a
  65,536-entry listing; struct 0.3 us; its interpreted builder ~70 us an
  entry, 0.7 s of an edit at 10,000 entries);
- the header, its extension headers, the feature-name table and the bitmaps
  and encryption extensions are parsed with :data:`FIXED_LAYOUTS`, the
  ``struct.Struct`` form of each of those fixed layouts (what
  :func:`fixed_struct` derives from the declaration; a test derives each and
  compares), so that reading an image's metadata does not import construct
  (start-up: docs/performance.md, "Start-up, second pass").

The table reader zero-fills past EOF, so every unpack has its bytes and the
parse is total.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import CorruptImageError

if TYPE_CHECKING:  # loaded on first use: see __getattr__
    import construct

    # re-exported: fmt.QCowHeaderV2 and so on
    from .layouts import Qcow2BitmapHeaderExt as Qcow2BitmapHeaderExt
    from .layouts import Qcow2CryptoHeaderExtension as Qcow2CryptoHeaderExtension
    from .layouts import Qcow2Feature as Qcow2Feature
    from .layouts import QCowBitmapDirEntry as QCowBitmapDirEntry
    from .layouts import QCowExtensionHeader as QCowExtensionHeader
    from .layouts import QCowHeaderCompression as QCowHeaderCompression
    from .layouts import QCowHeaderV2 as QCowHeaderV2
    from .layouts import QCowHeaderV3 as QCowHeaderV3
    from .layouts import QCowNbSnapshotsAndOffset as QCowNbSnapshotsAndOffset
    from .layouts import QCowSnapshotEntry as QCowSnapshotEntry
    from .layouts import QCowSnapshotExtraData as QCowSnapshotExtraData
    from .layouts import QCowSnapshotHeader as QCowSnapshotHeader
    from .layouts import QCryptoBlockLUKSHeader as QCryptoBlockLUKSHeader
    from .layouts import QCryptoBlockLUKSKeySlot as QCryptoBlockLUKSKeySlot

# ---------------------------------------------------------------------------
# Magic numbers and limits (block/qcow2.h)
# ---------------------------------------------------------------------------

QCOW_MAGIC = b"QFI\xfb"
QCOW_VERSION_2 = 2
QCOW_VERSION_3 = 3

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_REFCOUNT_ORDER = 6
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS  # 64 MiB
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_L1_SIZE = 0x2000000  # 32 MiB of L1 table, in bytes
QCOW_MAX_REFTABLE_SIZE = 0x800000  # 8 MiB
QCOW_MAX_BACKING_FILE_NAME = 1023
L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8
QCOW2_COMPRESSED_SECTOR_SIZE = 512
BDRV_SECTOR_SIZE = 512
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2
CRYPT_METHOD_NAMES = {QCOW_CRYPT_NONE: "none", QCOW_CRYPT_AES: "aes", QCOW_CRYPT_LUKS: "luks"}

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_TYPE_NAMES = {QCOW2_COMPRESSION_TYPE_ZLIB: "zlib", QCOW2_COMPRESSION_TYPE_ZSTD: "zstd"}

# Feature bits (header offsets 72, 80, 88)
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
                       | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_COMPAT_FEAT_MASK = QCOW2_COMPAT_LAZY_REFCOUNTS
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW

QCOW2_FEAT_TYPE_INCOMPATIBLE = 0
QCOW2_FEAT_TYPE_COMPATIBLE = 1
QCOW2_FEAT_TYPE_AUTOCLEAR = 2

#: The names QEMU writes into the feature-name table (qcow2_update_header),
#: used when an image has no table of its own (v2, clusters <= 4 KiB).
KNOWN_FEATURE_NAMES: dict[tuple[int, int], str] = {
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 0): "dirty bit",
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 1): "corrupt bit",
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 2): "external data file",
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 3): "compression type",
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, 4): "extended L2 entries",
    (QCOW2_FEAT_TYPE_COMPATIBLE, 0): "lazy refcounts",
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 0): "bitmaps",
    (QCOW2_FEAT_TYPE_AUTOCLEAR, 1): "raw external data",
}

# Header extension types
QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
EXTENSION_NAMES = {
    QCOW2_EXT_MAGIC_END: "end",
    QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing format",
    QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature name table",
    QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    QCOW2_EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header",
    QCOW2_EXT_MAGIC_DATA_FILE: "external data file",
}

# L1 / L2 / refcount-table entry bits
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
QCOW_L2_BITMAP_ALL_ALLOC = 0x00000000FFFFFFFF
QCOW_L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF00000000

#: icount value meaning "record/replay not active"
QCOW_ICOUNT_NONE = 0xFFFFFFFFFFFFFFFF

# C integer limits QEMU's range checks are written with (INT32_MAX, INT64_MAX,
# UINT32_MAX of <stdint.h>)
INT32_MAX = 0x7FFFFFFF
INT64_MAX = 0x7FFFFFFFFFFFFFFF
UINT32_MAX = 0xFFFFFFFF
UINT64_MASK = 0xFFFFFFFFFFFFFFFF

# Bitmap table entries (block/qcow2-bitmap.c)
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_MAX_NAME_SIZE = 1023
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * 65535
QCOW2_MAX_BITMAPS = 65535

# Byte offsets inside the header of the fields that locate metadata
# (all within the first 512-byte sector, which is what makes a single header
# write an atomic commit point).
HEADER_OFFSET_L1_SIZE = 36
HEADER_OFFSET_L1_TABLE_OFFSET = 40
HEADER_OFFSET_REFCOUNT_TABLE_OFFSET = 48
HEADER_OFFSET_REFCOUNT_TABLE_CLUSTERS = 56
HEADER_OFFSET_NB_SNAPSHOTS = 60
HEADER_OFFSET_SNAPSHOTS_OFFSET = 64
HEADER_OFFSET_INCOMPATIBLE_FEATURES = 72

# ---------------------------------------------------------------------------
# Layouts: declared with construct in qcow2snap.layouts, loaded on first use
# (see __getattr__ below); their sizes and the constants they use are here
# ---------------------------------------------------------------------------

QCOW_HEADER_V2_SIZE = 72
QCOW_HEADER_V3_SIZE = 104
QCOW_HEADER_FULL_SIZE = 112
QCOW2_FEATURE_ENTRY_SIZE = 48

# LUKS1 (the header the full disk encryption header extension points at;
# QEMU's crypto/block-luks.c QCryptoBlockLUKSHeader, big-endian like qcow2)
QCRYPTO_BLOCK_LUKS_MAGIC = b"LUKS\xba\xbe"
QCRYPTO_BLOCK_LUKS_VERSION = 1
QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS = 8
QCRYPTO_BLOCK_LUKS_STRIPES = 4000
QCRYPTO_BLOCK_LUKS_SECTOR_SIZE = 512
QCRYPTO_BLOCK_LUKS_DIGEST_LEN = 20
QCRYPTO_BLOCK_LUKS_KEY_SLOT_ENABLED = 0x00AC71F3
QCRYPTO_BLOCK_LUKS_KEY_SLOT_DISABLED = 0x0000DEAD
QCRYPTO_BLOCK_LUKS_HEADER_SIZE = 592

QCOW_SNAPSHOT_HEADER_SIZE = 40
QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE = 24
QCOW_BITMAP_DIR_ENTRY_SIZE = 24

#: the layouts :mod:`qcow2snap.layouts` declares, reached as attributes of
#: this module (``fmt.QCowHeaderV2``)
LAYOUT_NAMES = frozenset({
    "QCowHeaderV2",
    "QCowHeaderV3",
    "QCowHeaderCompression",
    "QCowExtensionHeader",
    "Qcow2Feature",
    "Qcow2BitmapHeaderExt",
    "Qcow2CryptoHeaderExtension",
    "QCryptoBlockLUKSKeySlot",
    "QCryptoBlockLUKSHeader",
    "QCowSnapshotHeader",
    "QCowSnapshotExtraData",
    "QCowSnapshotEntry",
    "QCowBitmapDirEntry",
    "QCowNbSnapshotsAndOffset",
})


def __getattr__(name: str) -> Any:
    """PEP 562: a layout of :data:`LAYOUT_NAMES`, from :mod:`qcow2snap.layouts`
    (which imports construct) on first use."""
    if name in LAYOUT_NAMES:
        from . import layouts
        value = getattr(layouts, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_struct(layout: construct.Construct, data: bytes, *, structure: str,
                 offset: int | None = None, **params: Any) -> Any:
    """Parse ``data`` with ``layout``; translate every construct error into
    :class:`CorruptImageError` naming ``structure`` and ``offset``.

    This is the only place construct errors are caught.
    """
    import construct  # loaded already, with the layout
    try:
        return layout.parse(data, **params)
    except construct.ConstructError as exc:
        where = f" at offset {offset:#x}" if offset is not None else ""
        raise CorruptImageError(f"cannot parse {structure}{where}: {exc}",
                                structure=structure, offset=offset) from exc


def fixed_struct(layout: construct.Construct) -> struct.Struct:
    """A ``struct.Struct`` that unpacks the fields of ``layout`` (a Struct of
    big-endian integers and byte strings of a fixed length only, a
    ``Const`` among them), in its order.  See the module docstring."""
    import construct  # loaded already, with the layout
    inner = layout
    while isinstance(inner, construct.Renamed):  # the docstring wrapper
        inner = inner.subcon
    if not isinstance(inner, construct.Struct):
        raise TypeError(f"{layout!r} is not a Struct")
    formats = []
    for field in inner.subcons:
        sub = field.subcon if isinstance(field, construct.Renamed) else field
        if isinstance(sub, construct.Const):
            sub = sub.subcon
        if isinstance(sub, construct.Bytes) and isinstance(sub.length, int):
            formats.append(f"{sub.length}s")
        elif isinstance(sub, construct.FormatField) and sub.fmtstr[0] == ">":
            formats.append(sub.fmtstr[1:])
        else:
            raise TypeError(f"field {field.name!r} of {layout!r} is not a big-endian integer "
                            "or fixed bytes")
    return struct.Struct(">" + "".join(formats))


class Fields(dict[str, Any]):
    """The fields :func:`parse_fixed` unpacked, by name: ``fields["size"]``
    or ``fields.size``, as construct's ``Container`` gives them."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FixedLayout(NamedTuple):
    """A fixed layout of :mod:`qcow2snap.layouts` as ``struct`` unpacks it:
    ``fixed_struct(layout).format``, its field names in order, and the
    values of its ``Const`` fields by position.  A test derives all three
    from the declaration (``tests/test_model.py``)."""

    format: str
    names: tuple[str, ...]
    consts: tuple[tuple[int, bytes], ...] = ()


#: The layouts the read path parses without construct (see the module
#: docstring), by the name of their declaration.
FIXED_LAYOUTS: dict[str, FixedLayout] = {
    "QCowHeaderV2": FixedLayout(
        ">4sLQLLQLLQQLLQ",
        ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits",
         "size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
         "refcount_table_clusters", "nb_snapshots", "snapshots_offset"),
        ((0, QCOW_MAGIC),)),
    "QCowHeaderV3": FixedLayout(
        ">QQQLL",
        ("incompatible_features", "compatible_features", "autoclear_features",
         "refcount_order", "header_length")),
    "QCowHeaderCompression": FixedLayout(">B7s", ("compression_type", "padding")),
    "QCowExtensionHeader": FixedLayout(">LL", ("type", "length")),
    "Qcow2Feature": FixedLayout(">BB46s", ("type", "bit", "name")),
    "Qcow2BitmapHeaderExt": FixedLayout(
        ">LLQQ",
        ("nb_bitmaps", "reserved32", "bitmap_directory_size", "bitmap_directory_offset")),
    "Qcow2CryptoHeaderExtension": FixedLayout(">QQ", ("offset", "length")),
    "QCowSnapshotHeader": FixedLayout(
        ">QLHHLLQLL",
        ("l1_table_offset", "l1_size", "id_str_size", "name_size", "date_sec", "date_nsec",
         "vm_clock_nsec", "vm_state_size", "extra_data_size")),
}
_FIXED_STRUCTS = {name: struct.Struct(layout.format) for name, layout in FIXED_LAYOUTS.items()}


def parse_fixed(name: str, data: bytes | bytearray | memoryview, *, structure: str,
                offset: int | None = None) -> Fields:
    """:func:`parse_struct` of the layout ``name`` of :data:`FIXED_LAYOUTS`,
    with ``struct``: the same fields (bytes past the layout's size are
    ignored, as construct does) and a :class:`CorruptImageError` naming
    ``structure`` and ``offset`` where it fails (too few bytes, a wrong
    constant), without loading construct."""
    layout = FIXED_LAYOUTS[name]
    unpacker = _FIXED_STRUCTS[name]
    where = f" at offset {offset:#x}" if offset is not None else ""
    if len(data) < unpacker.size:
        raise CorruptImageError(f"cannot parse {structure}{where}: {len(data)} bytes where "
                                f"{unpacker.size} are needed",
                                structure=structure, offset=offset)
    values = unpacker.unpack_from(data)
    for index, expected in layout.consts:
        if values[index] != expected:
            raise CorruptImageError(f"cannot parse {structure}{where}: {layout.names[index]} "
                                    f"is {values[index]!r}, expected {expected!r}",
                                    structure=structure, offset=offset)
    return Fields(zip(layout.names, values, strict=True))


class SnapshotHeaderFields(NamedTuple):
    """The fields of :data:`QCowSnapshotHeader`, in its order (a test keeps
    the two in step)."""

    l1_table_offset: int
    l1_size: int
    id_str_size: int
    name_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int


_SNAPSHOT_EXTRA_U64 = struct.Struct(">Q")
#: :data:`QCowSnapshotExtraData`'s three known fields, all present
#: (``extra_data_size`` >= :data:`QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE`): the table
#: reader's one-call path for the entries QEMU writes
SNAPSHOT_KNOWN_EXTRA_STRUCT = struct.Struct(">QQQ")


def unpack_snapshot_header(data: bytes | bytearray, offset: int = 0) -> SnapshotHeaderFields:
    """:data:`QCowSnapshotHeader` at ``data[offset:]`` (40 bytes must be there)."""
    return SnapshotHeaderFields._make(SNAPSHOT_HEADER_STRUCT.unpack_from(data, offset))


def unpack_snapshot_extra(data: bytes | bytearray, offset: int, extra_data_size: int
                          ) -> tuple[int | None, int | None, int | None, int]:
    """The known fields of :data:`QCowSnapshotExtraData` at ``data[offset:]``:
    ``(vm_state_size_large, disk_size, icount, known_length)``, each field
    ``None`` where ``extra_data_size`` does not cover it, and the number of
    bytes they take (the rest of the extra data is unknown to QEMU and kept).
    The layout's own parse gives the same (a test compares them); this is
    the fast path for tables of 65,536 entries."""
    if extra_data_size >= QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE:
        large, disk, count = SNAPSHOT_KNOWN_EXTRA_STRUCT.unpack_from(data, offset)
        return large, disk, count, QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE
    unpack = _SNAPSHOT_EXTRA_U64.unpack_from
    vm_state_size_large = unpack(data, offset)[0] if extra_data_size >= 8 else None
    disk_size = unpack(data, offset + 8)[0] if extra_data_size >= 16 else None
    icount = unpack(data, offset + 16)[0] if extra_data_size >= 24 else None
    known_length = min(extra_data_size, QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE) & ~7
    return vm_state_size_large, disk_size, icount, known_length


def pack_snapshot_extra(vm_state_size_large: int | None, disk_size: int | None,
                        icount: int | None, unknown: bytes, extra_data_size: int) -> bytes:
    """:data:`QCowSnapshotExtraData` built with ``extra_data_size``: each
    known field that size covers (it must then not be ``None``), then
    ``unknown``.  The inverse of :func:`unpack_snapshot_extra`; the layout's
    own build gives the same bytes (a test compares them), this is the fast
    path for rewriting tables of 65,536 entries."""
    if extra_data_size >= QCOW_SNAPSHOT_KNOWN_EXTRA_SIZE:
        return SNAPSHOT_KNOWN_EXTRA_STRUCT.pack(vm_state_size_large, disk_size, icount) + unknown
    pack = _SNAPSHOT_EXTRA_U64.pack
    out = pack(vm_state_size_large) if extra_data_size >= 8 else b""
    if extra_data_size >= 16:
        out += pack(disk_size)
    return out + unknown


def build_struct(layout: construct.Construct, value: Any, **params: Any) -> bytes:
    """Build ``value`` with ``layout``.  Values come from validated model
    objects, so a failure here is a programming error and propagates."""
    return bytes(layout.build(value, **params))


#: :data:`QCowSnapshotHeader` as a ``struct.Struct`` (see the module docstring)
SNAPSHOT_HEADER_STRUCT = _FIXED_STRUCTS["QCowSnapshotHeader"]


def c_hex(value: int) -> str:
    """``value`` as C's ``printf("%#x")`` prints it, for reproducing QEMU's
    messages: "0x1f", but "0" for zero (the ``#`` flag adds no prefix to
    zero), where Python's ``f"{0:#x}"`` gives "0x0"."""
    return f"{value:#x}" if value else "0"


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)
