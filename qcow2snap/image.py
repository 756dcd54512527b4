"""The image model (layer 3): open a qcow2 file, validate it the way QEMU
does, and give typed access to its metadata.

Opening for reading never writes.  The file is opened ``O_RDONLY`` (with
``O_NOATIME`` where the kernel allows it), nothing is repaired or cleared,
and a dirty or corrupt image is reported, not fixed.

Every count and offset taken from the header is checked against QEMU's limits
before it is used to size a read or an allocation, with QEMU's error texts,
so a hostile image costs at most the 32 MiB L1 / 64 MiB snapshot-table bounds.

The module is about 950 lines because :class:`Qcow2Image` is one object
with one open file, one lock and one set of caches: its opening follows
QEMU's ``qcow2_do_open`` check by check, and the lookups, the snapshot
references and the companion files (backing chain, external data file)
all share that state.  What does not need it lives elsewhere: guest reads
in :mod:`.reader`, bulk tables in :mod:`.tables`, host files in
:mod:`.hostfile`, locks in :mod:`.locks`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, BinaryIO, Literal, Self

from . import cache
from . import format as fmt
from .crypto import DEFAULT_KDF_ITERATION_LIMIT, SectorCipher, legacy_aes_cipher
from .errors import (
    AmbiguousSnapshotError,
    BadPassphraseError,
    CorruptImageError,
    ImageInUseWarning,
    NotQcow2Error,
    NoVMStateError,
    Qcow2Error,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from .hostfile import CompanionPolicy, HostFile, open_read_only, open_read_write
from .locks import EditorLock, LockState, ReaderLock, probe_locks
from .model import (
    Extension,
    FeatureName,
    Header,
    Snapshot,
    SnapshotTable,
    parse_extensions,
    parse_snapshot_table,
)
from .reader import DiskReader, Extent, GuestDisk, Layer, iter_extents
from .tables import decode_u64_table

if TYPE_CHECKING:
    from array import array

__all__ = ["ChainLink", "ImageInUseWarning", "L1Entries", "Layer", "Qcow2Image", "RawDisk",
           "RawImage", "open"]

#: L1 tables are read in chunks of this many entries, only where a read
#: needs them (a snapshot's 32 MiB L1 table costs 64 KiB to look at), and
#: kept in :data:`qcow2snap.cache.L1_CHUNKS`; L2 tables in
#: :data:`qcow2snap.cache.L2_TABLES`.  Both are bounded by bytes for the
#: whole process, so no image can make it hold more.
L1_CHUNK_ENTRIES = 8192
#: Backing chains deeper than this are refused.  QEMU has no fixed limit;
#: qemu-img converts through chains of 2,000 images here, and a loop is
#: caught on its first repeat, so this only bounds the resources a hostile
#: chain can take (one descriptor and a few KiB per image).
MAX_BACKING_CHAIN_DEPTH = 4096


_TOKENS = count(1)


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One link of a backing chain as :meth:`Qcow2Image.backing_chain`
    reports it: the name the image holds (``None`` for a path the user
    gave), the path it resolves to, and whether it was followed (else
    ``reason`` says why not)."""

    depth: int
    named: str | None
    path: str
    followed: bool
    format: str | None = None
    virtual_size: int | None = None
    reason: str | None = None


class L1Entries:
    """A layer's L1 table as a sequence of entries, read from the file in
    chunks of :data:`L1_CHUNK_ENTRIES` only where a lookup needs them, so
    that looking at a few entries of a 32 MiB table costs one chunk."""

    __slots__ = ("_image", "_last", "offset", "size")

    def __init__(self, image: Qcow2Image, offset: int, size: int) -> None:
        self._image = image
        self.offset = offset
        self.size = size
        self._last: tuple[int, array[int]] | None = None

    def __len__(self) -> int:
        return self.size

    def _chunk(self, chunk_index: int) -> array[int]:
        last = self._last
        if last is not None and last[0] == chunk_index:
            return last[1]
        entries = min(L1_CHUNK_ENTRIES, self.size - chunk_index * L1_CHUNK_ENTRIES)
        chunk = self._image._l1_chunk(self.offset, chunk_index, entries)
        self._last = (chunk_index, chunk)
        return chunk

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError("L1 index out of range")
        return self._chunk(index // L1_CHUNK_ENTRIES)[index % L1_CHUNK_ENTRIES]

    def next_mapped(self, start: int, stop: int) -> int:
        """The first index in ``[start, stop)`` whose entry maps an L2 table
        (offset bits set), else ``min(stop, len)``.  Runs of zero entries
        are skipped at C speed, so a hostile table of millions of unmapped
        entries costs one pass over its bytes."""
        stop = min(stop, self.size)
        mask = fmt.L1E_OFFSET_MASK
        index = start
        while index < stop:
            chunk_index = index // L1_CHUNK_ENTRIES
            chunk = self._chunk(chunk_index)
            base = chunk_index * L1_CHUNK_ENTRIES
            inner = index - base
            limit = min(len(chunk), stop - base)
            probe_end = min(limit, inner + 16)   # neighbours first, one by one
            while inner < probe_end:
                if chunk[inner] & mask:
                    return base + inner
                inner += 1
            if inner < limit:                    # then skip zeros in bulk
                raw = bytes(memoryview(chunk).cast("B")[inner * fmt.L1E_SIZE:
                                                        limit * fmt.L1E_SIZE])
                inner += (len(raw) - len(raw.lstrip(b"\0"))) // fmt.L1E_SIZE
            index = base + inner
        return stop


class RawImage:
    """A raw backing file: guest offset = file offset, zeros past EOF."""

    def __init__(self, path: str, *, file: HostFile | None = None) -> None:
        self.path = path
        self._file = file if file is not None else HostFile.open(path)

    @property
    def size(self) -> int:
        return self._file.size

    def read(self, offset: int, length: int) -> bytes:
        return self._file.pread(offset, length)

    def open_disk(self) -> RawDisk:
        """The guest disk: the file itself (the same interface as a qcow2
        image's :meth:`Qcow2Image.open_disk`)."""
        return RawDisk(self._file)

    def close(self) -> None:
        self._file.close()


class RawDisk:
    """A raw file as a :class:`~qcow2snap.reader.GuestDisk`: guest offset =
    file offset, zeros past the end."""

    def __init__(self, file: HostFile) -> None:
        self._file = file
        self.size = file.size

    def pread(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self._file.pread(offset, min(length, self.size - offset))

    def read_at(self, offset: int, out: memoryview) -> None:
        self._file.pread_into(offset, out)


class Qcow2Image:
    """An open qcow2 image.  Use :func:`qcow2snap.open`.

    Attributes of interest: :attr:`header`, :attr:`extensions`,
    :attr:`snapshots`, :attr:`backing_file_name`, :attr:`backing_format`,
    :attr:`lock_state`, :attr:`dirty`, :attr:`corrupt`.

    Companion files the image names are followed only inside its own
    directory or the ``allow_dirs`` (see :mod:`qcow2snap.hostfile`); paths
    given as ``backing_file``/``data_file`` are always used.
    """

    def __init__(self, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r", *,
                 backing_file: str | os.PathLike[str] | bool | None = None,
                 backing_format: str | None = None,
                 data_file: str | os.PathLike[str] | None = None,
                 check_locks: bool = True,
                 check_mode: bool = False,
                 allow_dirs: Iterable[str | os.PathLike[str]] = (),
                 passphrase: bytes | str | None = None,
                 kdf_iteration_limit: int = DEFAULT_KDF_ITERATION_LIMIT,
                 _policy: CompanionPolicy | None = None,
                 _chain: tuple[tuple[int, int], ...] = (),
                 _file: HostFile | None = None) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"unsupported mode {mode!r} ('r' or 'r+')")
        self.path = os.fspath(path)
        self.mode = mode
        #: QEMU's BDRV_O_CHECK open (used by qcow2snap.ops.check): the snapshot
        #: table is not read (``snapshots`` is empty; the checker salvages the
        #: table itself) and a zero-cluster refcount table is allowed.
        self.check_mode = check_mode
        self._backing_override = backing_file
        self._backing_format_override = backing_format
        self._data_file_override = data_file
        self._backing: Qcow2Image | RawImage | None = None
        self._backing_opened = False
        self._data_file: HostFile | None = None
        #: the LUKS passphrase (also tried on encrypted backing images)
        self._passphrase = (passphrase.encode() if isinstance(passphrase, str)
                            else passphrase)
        self._kdf_iteration_limit = kdf_iteration_limit
        self._data_cipher: SectorCipher | None = None
        #: companions (backing image, data file, cipher) are set up once,
        #: whichever thread reading the image asks first
        self._lazy_lock = threading.RLock()
        #: identifies this open image in the process-wide caches (cache.py)
        self.cache_token = next(_TOKENS)
        self._editor_lock: EditorLock | None = None
        self._reader_lock: ReaderLock | None = None
        if _file is not None:
            self._file = _file
        else:
            self._file = HostFile(open_read_only(self.path) if mode == "r"
                                  else open_read_write(self.path), self.path)
        try:
            self.policy = (_policy if _policy is not None
                           else CompanionPolicy.for_image(self.path, allow_dirs))
            #: (st_dev, st_ino) of this image and the images above it in a
            #: backing chain: a repeat is a loop
            self._chain = (*_chain, self._file.identity())
            self.lock_state: LockState | None = None
            if mode == "r+":
                # take the editor locks first, then look for other holders
                # (QEMU's order), so two editors cannot both go ahead; the
                # locks also make a QEMU started meanwhile refuse the image
                self._editor_lock = EditorLock(self._file.fd, self.path)
                self.lock_state = self._editor_lock.acquire()
            self._load()
            if mode == "r" and check_locks:
                self.lock_state = probe_locks(self._file.fd)
        except BaseException:
            self._release_locks()
            self._file.close()
            raise
        state = self.lock_state
        if state is not None and state.has_writer:
            locks = "" if state.editor_pid is not None else f" ({state.describe()})"
            warnings.warn(
                f"{self.path}: {state.holder} holds this image open for writing{locks}; what "
                f"is read may be inconsistent", ImageInUseWarning, stacklevel=3)

    # ------------------------------------------------------------------
    # Opening and validation (QEMU's qcow2_do_open)
    # ------------------------------------------------------------------

    def _corrupt(self, message: str, structure: str,
                 offset: int | None = None) -> CorruptImageError:
        return CorruptImageError(message, structure=structure, offset=offset)

    def _load(self) -> None:
        f = self._file
        first = f.pread(0, fmt.QCOW_HEADER_FULL_SIZE)
        if f.size < 4 or first[:4] != fmt.QCOW_MAGIC:
            raise NotQcow2Error(f"Image is not in qcow2 format: {self.path}")
        if f.size < fmt.QCOW_HEADER_V2_SIZE:
            raise NotQcow2Error(
                f"Image is not in qcow2 format: file too short for a header ({f.size} bytes)")
        fields = fmt.parse_fixed("QCowHeaderV2", first[:fmt.QCOW_HEADER_V2_SIZE],
                                 structure="header", offset=0)
        cluster_bits, version = fields.cluster_bits, fields.version
        if version in (2, 3) and not fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
            raise UnsupportedImageError(f"Unsupported cluster size: 2^{cluster_bits}",
                                        feature=f"cluster_bits {cluster_bits}")
        cluster0 = f.pread(0, 1 << cluster_bits) if version in (2, 3) else first
        header = Header.from_bytes(cluster0)
        self.header = header
        cs = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs

        if (header.version == fmt.QCOW_VERSION_3
                and header.refcount_order > fmt.QCOW_MAX_REFCOUNT_ORDER):
            raise CorruptImageError(
                "Reference count entry width too large; may not exceed 64 bits",
                structure="header", offset=96)

        # Header extensions end at the backing file name, or the cluster end.
        if header.backing_file_offset:
            if header.backing_file_offset > cs:
                raise self._corrupt("Invalid backing file offset", "header", 8)
            ext_end = header.backing_file_offset
        else:
            ext_end = cs
        self.extensions: tuple[Extension, ...] = tuple(
            parse_extensions(cluster0, header.header_length, ext_end))
        self._check_extensions()

        # Incompatible features (names from the image's own feature table)
        unknown = header.incompatible_features & ~fmt.QCOW2_INCOMPAT_MASK
        if unknown:
            features = self._report_unsupported_feature(unknown)
            raise UnsupportedImageError(f"Unsupported qcow2 feature(s): {features}",
                                        feature=features)
        if header.crypt_method > fmt.QCOW_CRYPT_LUKS:
            raise UnsupportedImageError(f"Unsupported encryption method: {header.crypt_method}",
                                        feature="encryption")
        self._check_compression_type()
        self.extended_l2 = bool(header.incompatible_features & fmt.QCOW2_INCOMPAT_EXTL2)
        if self.extended_l2 and self.cluster_bits < 14:
            raise UnsupportedImageError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                feature="extended L2 entries")

        # Geometry (block/qcow2.h)
        self.l2_entry_size = fmt.L2E_SIZE_EXTENDED if self.extended_l2 else fmt.L2E_SIZE_NORMAL
        self.l2_bits = self.cluster_bits - (4 if self.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        self.subclusters_per_cluster = (fmt.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
                                        if self.extended_l2 else 1)
        self.subcluster_size = cs // self.subclusters_per_cluster
        self.subcluster_bits = self.subcluster_size.bit_length() - 1
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1

        # Active L1 (qcow2_validate_table, size_to_l1)
        if header.l1_size > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise self._corrupt("Active L1 table too large", "header", 36)
        self.l1_vm_state_index = self.size_to_l1(header.size)
        if self.l1_vm_state_index > fmt.INT32_MAX:
            raise self._corrupt("Image is too big", "header", 24)
        if header.l1_size < self.l1_vm_state_index:
            raise self._corrupt("L1 table is too small", "header", 36)
        self._validate_table(header.l1_table_offset, header.l1_size, fmt.L1E_SIZE,
                             fmt.QCOW_MAX_L1_SIZE, "Active L1 table", 40)

        # Refcount table
        if header.refcount_table_clusters == 0 and not self.check_mode:
            raise self._corrupt("Image does not contain a reference count table", "header", 56)
        reftable_entries = (header.refcount_table_clusters << self.cluster_bits) // 8
        self._validate_table(header.refcount_table_offset, reftable_entries,
                             fmt.REFTABLE_ENTRY_SIZE, fmt.QCOW_MAX_REFTABLE_SIZE,
                             "Reference count table", 48)

        # Snapshot table location
        if not self.check_mode:
            self._validate_table(header.snapshots_offset, header.nb_snapshots,
                                 fmt.QCOW_SNAPSHOT_HEADER_SIZE,
                                 fmt.QCOW_SNAPSHOT_HEADER_SIZE * fmt.QCOW_MAX_SNAPSHOTS,
                                 "Snapshot table", 64)

        # Backing file name
        self.backing_file_name: str | None = None
        self.backing_file_name_bytes: bytes | None = None
        if header.backing_file_offset:
            length = header.backing_file_size
            if length > min(fmt.QCOW_MAX_BACKING_FILE_NAME, cs - header.backing_file_offset):
                raise self._corrupt("Backing file name too long", "header", 16)
            raw = cluster0[header.backing_file_offset:header.backing_file_offset + length]
            self.backing_file_name_bytes = bytes(raw)
            self.backing_file_name = bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")

        # External data file
        self.has_data_file = bool(header.incompatible_features & fmt.QCOW2_INCOMPAT_DATA_FILE)
        if not self.has_data_file and header.autoclear_features & fmt.QCOW2_AUTOCLEAR_DATA_FILE_RAW:
            raise self._corrupt("data-file-raw requires a data file", "header", 88)

        # Snapshot table.  An entry without a disk_size field has QEMU's
        # bs->total_sectors * BDRV_SECTOR_SIZE (the rounded size).  With an
        # external data file QEMU still reads (and validates) the table at
        # open, but lists none of it: internal snapshots are not supported
        # there (qcow2_snapshot_list returns -ENOTSUP; qemu-img check calls
        # the entries an error).
        # A backing image's table is parsed only if someone asks for it:
        # reading through a chain uses active layers only, and a hostile
        # chain of thousands of images must not make each parse 65,536
        # entries (QEMU parses them all at open; qcow2snap is more lenient
        # with a backing file's snapshot table, never with the image's own).
        self._snapshot_table: SnapshotTable | None = None
        if self.check_mode:
            self._snapshot_table = SnapshotTable(header.snapshots_offset, (), 0, ())
        elif len(self._chain) == 1:
            self._snapshot_table = self._parse_snapshot_table()

    def _parse_snapshot_table(self) -> SnapshotTable:
        h = self.header
        return parse_snapshot_table(self._file.pread, h.snapshots_offset, h.nb_snapshots,
                                    self.size)

    @property
    def snapshot_table(self) -> SnapshotTable:
        """The parsed snapshot table (every entry, also where QEMU lists none)."""
        if self._snapshot_table is None:
            self._snapshot_table = self._parse_snapshot_table()
        return self._snapshot_table

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshots, as QEMU lists them: none with an external data file."""
        return () if self.has_data_file else self.snapshot_table.snapshots

    def _validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                        name: str, header_offset: int) -> None:
        if entries > max_bytes // entry_len:
            raise self._corrupt(f"{name} too large", "header", header_offset)
        if (fmt.INT64_MAX - entries * entry_len < offset
                or offset & (self.cluster_size - 1)):
            raise self._corrupt(f"{name} offset invalid", "header", header_offset)

    def _check_extensions(self) -> None:
        seen: set[int] = set()
        for ext in self.extensions:
            if ext.type == fmt.QCOW2_EXT_MAGIC_BACKING_FORMAT:
                if len(ext.data) >= 16:
                    raise self._corrupt(
                        f"ERROR: ext_backing_format: len={len(ext.data)} too large (>=16)",
                        "backing format extension", ext.offset)
            elif ext.type == fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
                if self.header.crypt_method != fmt.QCOW_CRYPT_LUKS:
                    raise self._corrupt(
                        "CRYPTO header extension only expected with LUKS encryption method",
                        "full disk encryption header extension", ext.offset)
                if len(ext.data) != 16:
                    raise self._corrupt(
                        f"CRYPTO header extension size {len(ext.data)}, but expected size 16",
                        "full disk encryption header extension", ext.offset)
            elif ext.type == fmt.QCOW2_EXT_MAGIC_BITMAPS:
                if len(ext.data) != 24:
                    raise self._corrupt("bitmaps_ext: Invalid extension length",
                                        "bitmaps extension", ext.offset)
                if self.header.autoclear_features & fmt.QCOW2_AUTOCLEAR_BITMAPS:
                    b = ext.bitmaps()
                    if b.reserved32 != 0:
                        raise self._corrupt("bitmaps_ext: Reserved field is not zero",
                                            "bitmaps extension", ext.offset)
                    if b.nb_bitmaps == 0:
                        raise self._corrupt("found bitmaps extension with zero bitmaps",
                                            "bitmaps extension", ext.offset)
                    if b.bitmap_directory_offset & (self.cluster_size - 1):
                        raise self._corrupt("bitmaps_ext: invalid bitmap directory offset",
                                            "bitmaps extension", ext.offset)
            if ext.type in fmt.EXTENSION_NAMES and ext.type != fmt.QCOW2_EXT_MAGIC_END:
                seen.add(ext.type)

    def _check_compression_type(self) -> None:
        h = self.header
        ctype = h.effective_compression_type
        if ctype not in fmt.COMPRESSION_TYPE_NAMES:
            raise UnsupportedImageError(f"qcow2: unknown compression type: {ctype}",
                                        feature="compression type")
        has_bit = bool(h.incompatible_features & fmt.QCOW2_INCOMPAT_COMPRESSION)
        if ctype == fmt.QCOW2_COMPRESSION_TYPE_ZLIB and has_bit:
            raise self._corrupt("qcow2: Compression type incompatible feature bit must not be set",
                                "header", 72)
        if ctype != fmt.QCOW2_COMPRESSION_TYPE_ZLIB and not has_bit:
            raise self._corrupt("qcow2: Compression type incompatible feature bit must be set",
                                "header", 72)

    # ------------------------------------------------------------------
    # Header-derived facts
    # ------------------------------------------------------------------

    def size_to_l1(self, size: int) -> int:
        """Number of L1 entries needed to map ``size`` guest bytes (QEMU
        ``size_to_l1``)."""
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift

    @property
    def size(self) -> int:
        """Virtual size of the active layer in bytes: the header's ``size``
        rounded down to a multiple of 512, as QEMU opens it
        (``bs->total_sectors = header.size / BDRV_SECTOR_SIZE``); the stored
        field stays ``header.size``."""
        return self.header.size & ~(fmt.BDRV_SECTOR_SIZE - 1)

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & fmt.QCOW2_INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & fmt.QCOW2_INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & fmt.QCOW2_COMPAT_LAZY_REFCOUNTS)

    @property
    def compression_type_name(self) -> str:
        return fmt.COMPRESSION_TYPE_NAMES[self.header.effective_compression_type]

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != fmt.QCOW_CRYPT_NONE

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    @property
    def unknown_extensions(self) -> tuple[Extension, ...]:
        return tuple(e for e in self.extensions if not e.is_known)

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(fmt.QCOW2_EXT_MAGIC_BACKING_FORMAT)
        return ext.text() if ext else None

    @property
    def data_file_name(self) -> str | None:
        ext = self.extension(fmt.QCOW2_EXT_MAGIC_DATA_FILE)
        return ext.text() if ext else None

    @property
    def feature_names(self) -> tuple[FeatureName, ...]:
        ext = self.extension(fmt.QCOW2_EXT_MAGIC_FEATURE_TABLE)
        return tuple(ext.feature_names()) if ext else ()

    def _feature_table(self) -> list[FeatureName]:
        """The feature-name table as QEMU walks it: in table order, up to
        the first entry whose name starts with NUL."""
        table = []
        for f in self.feature_names:
            if f.raw_name[:1] in (b"", b"\0"):
                break
            table.append(f)
        return table

    def _report_unsupported_feature(self, mask: int) -> str:
        """QEMU's ``report_unsupported_feature``: the name (at most 46
        bytes) of each incompatible-type table entry whose bit is in
        ``mask``, in table order, each clearing its bit; then whatever is
        left as one "Unknown incompatible feature: <hex mask>"."""
        items = []
        for f in self._feature_table():
            # QEMU tests mask & (1ULL << bit) with the stored u8 bit: x86-64
            # shifts by bit mod 64 (a C shift past 63 is undefined)
            bit = 1 << (f.bit & 63)
            if f.type == fmt.QCOW2_FEAT_TYPE_INCOMPATIBLE and mask & bit:
                items.append(f.name)
                mask &= ~bit
        if mask:
            items.append(f"Unknown incompatible feature: {mask:x}")
        return ", ".join(items)

    def describe_features(self, feature_type: int, bits: int) -> list[str]:
        """Names of the set ``bits`` of one feature word, from the image's
        feature-name table (as QEMU reads it: up to its first unnamed
        entry), else QEMU's names, else "bit N"."""
        table: dict[tuple[int, int], str] = {}
        for f in self._feature_table():
            table.setdefault((f.type, f.bit), f.name)
        names = []
        for bit in range(64):
            if bits & (1 << bit):
                name = table.get((feature_type, bit)) or fmt.KNOWN_FEATURE_NAMES.get(
                    (feature_type, bit))
                kind = ("incompatible", "compatible", "autoclear")[feature_type]
                names.append(name or f"Unknown {kind} feature: bit {bit}")
        return names

    # ------------------------------------------------------------------
    # Snapshots
    # ------------------------------------------------------------------

    def find_snapshot(self, ref: str | Snapshot, *,
                      by: Literal["id", "name"] | None = None) -> Snapshot:
        """Resolve a snapshot reference.

        With ``by=None`` the reference matches an ID or a name; if it matches
        more than one snapshot (one's ID and another's name, or several
        names) that is an :class:`AmbiguousSnapshotError` listing the
        candidates: QEMU silently picks one, we make the caller choose with
        ``by="id"`` or ``by="name"``.  ``by="name"`` with duplicate names is
        ambiguous too.
        """
        if isinstance(ref, Snapshot):
            return ref
        by_id = [s for s in self.snapshots if s.id == ref] if by in (None, "id") else []
        by_name = [s for s in self.snapshots if s.name == ref] if by in (None, "name") else []
        matches = list({s.index: s for s in by_id + by_name}.values())
        matches.sort(key=lambda s: s.index)
        if not matches:
            what = {"id": "with ID", "name": "named"}.get(by or "", "with ID or name")
            ignored = ""
            if self.ignored_snapshots:
                ignored = (f" ({len(self.ignored_snapshots)} snapshot table entries are "
                           f"ignored: QEMU does not support internal snapshots with an "
                           f"external data file)")
            raise SnapshotNotFoundError(f"{self.path}: no snapshot {what} {ref!r}{ignored}")
        if len(matches) > 1:
            listed = ", ".join(f"ID {s.id!r} name {s.name!r}" for s in matches)
            hint = ("select by ID instead" if by == "name"
                    else "select with by='id' / by='name' (CLI: --by-id / --by-name)")
            raise AmbiguousSnapshotError(
                f"{self.path}: snapshot reference {ref!r} is ambiguous: it matches {listed}; "
                f"{hint}", [(s.id, s.name) for s in matches])
        return matches[0]

    @property
    def ignored_snapshots(self) -> tuple[Snapshot, ...]:
        """Snapshot table entries QEMU ignores: all of them in an image with
        an external data file (where :attr:`snapshots` is empty)."""
        return self.snapshot_table.snapshots if self.has_data_file else ()

    def layer(self, snapshot: str | Snapshot | None = None) -> Layer:
        """The mapping of the active image (``None``) or of a snapshot.

        Sizes are whole 512-byte sectors, as QEMU's block layer has them: a
        snapshot's ``disk_size`` is rounded down like the header's size
        (QEMU cannot revert to a snapshot whose ``disk_size`` is not a
        multiple of 512: "The new size must be a multiple of 512")."""
        if snapshot is None:
            return Layer(self.header.l1_table_offset, self.header.l1_size, self.size)
        sn = self.find_snapshot(snapshot)
        self._check_snapshot_l1(sn)
        return Layer(sn.l1_table_offset, sn.l1_size,
                     sn.disk_size & ~(fmt.BDRV_SECTOR_SIZE - 1), sn)

    def _check_snapshot_l1(self, sn: Snapshot) -> None:
        structure = f"snapshot {sn.id} ({sn.name})"
        if sn.l1_size > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise CorruptImageError(f"Snapshot L1 table too large: {structure}",
                                    structure=structure, offset=sn.entry_offset + 8)
        if (sn.l1_table_offset & (self.cluster_size - 1)
                or sn.l1_table_offset > fmt.INT64_MAX - sn.l1_size * 8):
            raise CorruptImageError(f"Snapshot L1 table offset invalid: {structure}",
                                    structure=structure, offset=sn.entry_offset)
        # QEMU never makes a disk whose L1 table would exceed QCOW_MAX_L1_SIZE
        # (qcow2_grow_l1_table refuses it on revert); a larger disk_size is
        # damage, and would otherwise ask extraction for petabytes of holes.
        if self.size_to_l1(sn.disk_size) > fmt.QCOW_MAX_L1_SIZE // fmt.L1E_SIZE:
            raise CorruptImageError(
                f"Snapshot disk size too large: {structure} claims {sn.disk_size} bytes",
                structure=structure, offset=sn.entry_offset + 48)  # extra data: disk_size

    def vm_state_offset(self, snapshot: Snapshot) -> int:
        """Guest offset (in the snapshot's mapping) where its VM state starts
        (QEMU ``qcow2_vm_state_offset``, using the snapshot's disk size)."""
        return self.size_to_l1(snapshot.disk_size) << (self.cluster_bits + self.l2_bits)

    # ------------------------------------------------------------------
    # Tables
    # ------------------------------------------------------------------

    def read_l1(self, layer: Layer) -> array[int]:
        """The whole L1 table of a layer, decoded and not cached (editing
        and repair rewrite whole tables; QEMU's limit bounds one to 32 MiB).
        Readers use :meth:`l1_entries`, which reads only what is looked at."""
        return decode_u64_table(self._file.pread(layer.l1_table_offset,
                                                 layer.l1_size * fmt.L1E_SIZE))

    def l1_entries(self, layer: Layer) -> L1Entries:
        """The L1 table of a layer, read in chunks as lookups need them."""
        return L1Entries(self, layer.l1_table_offset, layer.l1_size)

    def _l1_chunk(self, l1_table_offset: int, chunk_index: int, entries: int) -> array[int]:
        key = (self.cache_token, l1_table_offset, chunk_index)
        chunk: array[int] | None = cache.L1_CHUNKS.get(key)  # type: ignore[assignment]
        if chunk is None:
            start = l1_table_offset + chunk_index * L1_CHUNK_ENTRIES * fmt.L1E_SIZE
            chunk = decode_u64_table(self._file.pread(start, entries * fmt.L1E_SIZE))
            cache.L1_CHUNKS.put(key, chunk, entries * fmt.L1E_SIZE)
        return chunk

    def read_l2(self, l2_offset: int) -> array[int]:
        """One L2 table, decoded; extended tables interleave entry, bitmap.
        Cached process-wide, bounded by bytes."""
        key = (self.cache_token, l2_offset)
        table: array[int] | None = cache.L2_TABLES.get(key)  # type: ignore[assignment]
        if table is None:
            table = decode_u64_table(self._file.pread(l2_offset, self.cluster_size))
            cache.L2_TABLES.put(key, table, self.cluster_size)
        return table

    def _forget_tables(self) -> None:
        cache.forget_image(self.cache_token)

    def pread(self, offset: int, length: int) -> bytes:
        """Raw bytes of the image file (zeros past EOF)."""
        return self._file.pread(offset, length)

    def pread_into(self, offset: int, out: memoryview) -> None:
        """:meth:`pread` straight into ``out``."""
        self._file.pread_into(offset, out)

    @property
    def file_size(self) -> int:
        return self._file.size

    # ------------------------------------------------------------------
    # Companion files
    # ------------------------------------------------------------------

    def _resolve_relative(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), name)

    @property
    def backing(self) -> Qcow2Image | RawImage | None:
        """The opened backing image (resolved relative to this image's
        directory, or the override given to :func:`open`), or ``None``.
        Opening it may raise :class:`CompanionRefusedError` (the image
        names a file outside the allowed places), ``UnsupportedImageError``
        (missing, not a file, unknown format) or ``CorruptImageError`` (a
        loop)."""
        if not self._backing_opened:
            with self._lazy_lock:
                if not self._backing_opened:
                    self._backing = self._open_backing()
                    self._backing_opened = True
        return self._backing

    def _backing_target(self) -> tuple[str | None, str | None]:
        """(path to open, name as the image holds it); the name is ``None``
        when the user gave the path (or said there is no backing file)."""
        override = self._backing_override
        if override is False:
            return None, None
        if override is not None and override is not True:
            return os.fspath(override), None
        name = self.backing_file_name
        if not name:
            return None, None  # QEMU: an empty name (or one starting with NUL) means none
        if ":" in name.split("/", 1)[0] and not os.path.exists(self._resolve_relative(name)):
            raise UnsupportedImageError(
                f"{self.path}: backing file {name!r} is not a local file; pass backing_file= "
                f"(CLI: --backing-file) to give its path", feature="protocol backing file")
        return self._resolve_relative(name), name

    def backing_path(self) -> str | None:
        """The path the backing file is opened from (``None``: none)."""
        return self._backing_target()[0]

    def _open_backing(self) -> Qcow2Image | RawImage | None:
        path, named = self._backing_target()
        if path is None:
            return None
        if len(self._chain) >= MAX_BACKING_CHAIN_DEPTH:
            raise CorruptImageError(
                f"{self.path}: backing chain longer than {MAX_BACKING_CHAIN_DEPTH} images",
                structure="backing file name", offset=self.header.backing_file_offset)
        policy = self.policy
        if named is not None:
            policy.check(owner=self.path, kind="backing file", named=named, path=path,
                         option="--backing-file", api_option="backing_file")
        else:  # the user named this file: its own chain may live beside it
            policy = policy.with_extra_dirs([os.path.dirname(os.path.realpath(path))])
        if not os.path.lexists(path):
            raise UnsupportedImageError(
                f"{self.path}: backing file {path!r} not found; pass backing_file= "
                f"(CLI: --backing-file PATH) to give its location", feature="backing file")
        try:
            file = HostFile.open(path)
        except OSError as exc:  # a name in a hostile image may point anywhere
            raise UnsupportedImageError(
                f"{self.path}: cannot open backing file {path!r}: {exc.strerror or exc}; pass "
                f"backing_file= (CLI: --backing-file PATH) to give its location",
                feature="backing file") from exc
        try:
            if file.identity() in self._chain:
                raise CorruptImageError(
                    f"{self.path}: backing file {path!r} creates an infinite loop",
                    structure="backing file name", offset=self.header.backing_file_offset)
            fmt_name = self._backing_format_override or self.backing_format
            if fmt_name is None:  # probe, reading through the same O_NOATIME descriptor
                fmt_name = "qcow2" if file.pread(0, 4) == fmt.QCOW_MAGIC else "raw"
            if fmt_name == "qcow2":
                return Qcow2Image(path, "r", check_locks=False, _policy=policy,
                                  _chain=self._chain, _file=file,
                                  passphrase=self._passphrase,
                                  kdf_iteration_limit=self._kdf_iteration_limit)
            if fmt_name == "raw":
                return RawImage(path, file=file)
            raise UnsupportedImageError(
                f"{self.path}: backing file format {fmt_name!r} is not supported (qcow2 and "
                f"raw are)", feature="backing format")
        except BaseException:
            file.close()
            raise

    def chain(self) -> list[Qcow2Image | RawImage]:
        """This image followed by its backing images."""
        out: list[Qcow2Image | RawImage] = [self]
        node: Qcow2Image | RawImage | None = self
        while isinstance(node, Qcow2Image):
            node = node.backing
            if node is not None:
                out.append(node)
        return out

    def backing_chain(self) -> list[ChainLink]:
        """Every link of the backing chain as far as it is followed, and the
        first one that is not (refused, missing, damaged) with the reason;
        never raises for a link."""
        links: list[ChainLink] = []
        node: Qcow2Image = self
        depth = 0
        while True:
            depth += 1
            try:
                path, named = node._backing_target()
            except Qcow2Error as exc:
                links.append(ChainLink(depth, node.backing_file_name, "", False,
                                       reason=str(exc)))
                break
            if path is None:
                break
            try:
                child = node.backing
            except Qcow2Error as exc:
                links.append(ChainLink(depth, named, path, False, reason=str(exc)))
                break
            assert child is not None
            links.append(ChainLink(
                depth, named, path, True,
                format="qcow2" if isinstance(child, Qcow2Image) else "raw",
                virtual_size=child.size))
            if not isinstance(child, Qcow2Image):
                break
            node = child
        return links

    def data_file(self) -> HostFile:
        """The external data file (``has_data_file`` images)."""
        if self._data_file is None:
            with self._lazy_lock:
                return self._open_data_file()
        return self._data_file

    def _open_data_file(self) -> HostFile:
        if self._data_file is None:
            override = self._data_file_override
            name = override or self.data_file_name
            if name is None:
                raise UnsupportedImageError(
                    f"{self.path}: 'data-file' is required for this image; pass data_file= "
                    f"(CLI: --data-file PATH)", feature="external data file")
            path = self._resolve_relative(os.fspath(name))
            if override is None:
                self.policy.check(owner=self.path, kind="data file", named=os.fspath(name),
                                  path=path, option="--data-file", api_option="data_file")
            try:
                self._data_file = HostFile.open(path)
            except OSError as exc:  # a name in a hostile image may point anywhere
                raise UnsupportedImageError(
                    f"{self.path}: cannot open data file {path!r}: {exc.strerror or exc}; pass "
                    f"data_file= (CLI: --data-file PATH) to give its location",
                    feature="external data file") from exc
        return self._data_file

    # ------------------------------------------------------------------
    # Data access
    # ------------------------------------------------------------------

    def open_disk(self, snapshot: str | Snapshot | None = None) -> DiskReader:
        """A read-only, seekable binary file over the guest disk of the
        active layer (``None``) or of a snapshot, at its own disk size."""
        return DiskReader(self, self.layer(snapshot))

    def data_cipher(self) -> SectorCipher | None:
        """The cipher of this image's data clusters (``None``: not encrypted),
        set up with the passphrase given to :func:`open` on first use.
        Raises :class:`BadPassphraseError` without a passphrase or with one
        that opens no LUKS key slot, :class:`UnsupportedImageError` without
        the ``qcow2snap[luks]`` extra."""
        if self.header.crypt_method == fmt.QCOW_CRYPT_NONE:
            return None
        if self._data_cipher is None:
            with self._lazy_lock:
                return self._setup_cipher()
        return self._data_cipher

    def _setup_cipher(self) -> SectorCipher | None:
        method = self.header.crypt_method
        if self._data_cipher is None:
            name = "LUKS" if method == fmt.QCOW_CRYPT_LUKS else "AES"
            if self._passphrase is None:
                raise BadPassphraseError(
                    f"{self.path}: the image is encrypted ({name}); give its passphrase "
                    f"(passphrase=; CLI: --passphrase-file FILE or QCOW2SNAP_PASSPHRASE)")
            if method == fmt.QCOW_CRYPT_AES:
                self._data_cipher = legacy_aes_cipher(self._passphrase)
                return self._data_cipher
            ext = self.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
            if ext is None:
                raise self._corrupt("Missing CRYPTO header for crypt method 2",
                                    "full disk encryption header extension")
            from .luks import parse_luks_header, unlock  # encrypted images only (start-up)
            where = ext.crypto_header()
            header = parse_luks_header(
                self.pread(where.offset, fmt.QCRYPTO_BLOCK_LUKS_HEADER_SIZE),
                where.offset, where.length)
            self._data_cipher = unlock(header, self.pread, self._passphrase, path=self.path,
                                       kdf_iteration_limit=self._kdf_iteration_limit)
        return self._data_cipher

    def backing_disk(self) -> GuestDisk | None:
        """The backing image's guest disk (qcow2 or raw, one interface), or
        None without a backing file."""
        backing = self.backing
        return None if backing is None else backing.open_disk()

    def open_vm_state(self, snapshot: str | Snapshot) -> DiskReader:
        """A file over a snapshot's saved VM state (the QEVM stream),
        exactly ``vm_state_size`` bytes long."""
        layer = self.layer(snapshot)
        sn = layer.snapshot
        assert sn is not None
        if not sn.has_vm_state:
            raise NoVMStateError(
                f"{self.path}: snapshot {sn.id} ({sn.name}) is disk-only: it has no saved VM "
                f"state (only snapshots taken with savevm / snapshot-save have one)")
        return DiskReader(self, layer, start=self.vm_state_offset(sn), length=sn.vm_state_size,
                          backing=False)

    def extents(self, snapshot: str | Snapshot | None = None, start: int = 0,
                length: int | None = None) -> Iterator[Extent]:
        """Runs of the layer's guest space: see :func:`qcow2snap.reader.iter_extents`."""
        layer = self.layer(snapshot)
        if length is None:
            length = max(layer.size - start, 0)
        return iter_extents(self, layer, start, length)

    # ------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the metadata from the file (after it was edited)."""
        self._forget_tables()
        self._file.refresh_size()
        self._load()

    def close(self) -> None:
        """Close the image and its backing chain (iteratively: a chain may
        be thousands of images deep)."""
        pending: list[Qcow2Image | RawImage] = [self]
        while pending:
            node = pending.pop()
            if isinstance(node, Qcow2Image):
                if node._backing is not None:
                    pending.append(node._backing)
                    node._backing = None
                node._close_own()
            else:
                node.close()

    def _close_own(self) -> None:
        if self._data_file is not None:
            self._data_file.close()
            self._data_file = None
        self._release_locks()
        self._file.close()

    def hold_reader_lock(self, *, share_write: bool = False) -> None:
        """Take QEMU's lock bytes of a reader on this image until it is
        closed (:class:`~qcow2snap.locks.ReaderLock`), as ``qemu-img`` does
        for a long read: a QEMU started meanwhile cannot open it for writing.
        ``share_write`` for reading beside a writer (forced)."""
        if self._reader_lock is None and self.mode == "r":
            lock = ReaderLock(self._file.fd, share_write=share_write)
            lock.acquire()
            self._reader_lock = lock

    def _release_locks(self) -> None:
        if self._reader_lock is not None:
            self._reader_lock.release()
            self._reader_lock = None
        if self._editor_lock is not None:
            self._editor_lock.release()
            self._editor_lock = None
        self._forget_tables()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Qcow2Image {self.path!r} v{self.header.version} size={self.size} "
                f"snapshots={len(self.snapshots)}>")



def open(path: str | os.PathLike[str] | BinaryIO, mode: Literal["r"] = "r", *,
         backing_file: str | os.PathLike[str] | bool | None = None,
         backing_format: str | None = None,
         data_file: str | os.PathLike[str] | None = None,
         check_locks: bool = True,
         allow_dirs: Iterable[str | os.PathLike[str]] = (),
         passphrase: bytes | str | None = None,
         kdf_iteration_limit: int = DEFAULT_KDF_ITERATION_LIMIT) -> Qcow2Image:
    """Open a qcow2 image; use as a context manager.

    ``mode="r"`` never writes to the image.  ``backing_file`` overrides the
    backing file's path (``False`` reads unallocated clusters as zeros);
    ``data_file`` overrides the external data file's path.  Companion files
    the image names are followed only inside its own directory and
    ``allow_dirs``.
    """
    if not isinstance(path, (str, os.PathLike)):
        name = getattr(path, "name", None)
        if not isinstance(name, (str, os.PathLike)):
            raise TypeError("qcow2snap.open() needs a path (str or os.PathLike)")
        path = name
    return Qcow2Image(path, mode, backing_file=backing_file,
                      backing_format=backing_format, data_file=data_file,
                      check_locks=check_locks, allow_dirs=allow_dirs,
                      passphrase=passphrase, kdf_iteration_limit=kdf_iteration_limit)
