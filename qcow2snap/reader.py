"""Guest-data access (layer 3, below :mod:`qcow2snap.image`): the mapping
walk from guest offsets to host bytes, and the file-like reader built on it.

The reader depends on what it needs of an image, :class:`MappedImage` (the
geometry, the L1/L2 lookups, ``pread``, the data file and the disk below),
not on :class:`~qcow2snap.image.Qcow2Image`; every backing layer, qcow2 or
raw, is read through one interface, :class:`GuestDisk`.  So this module
imports nothing of :mod:`qcow2snap.image`, which imports it.

:func:`iter_extents` walks a layer's L1 and L2 tables and yields coalesced
runs of guest space with their kind and host location.  It follows QEMU's
classification (``qcow2_get_cluster_type`` / ``qcow2_get_subcluster_type``)
and raises QEMU's corruption messages for entries QEMU refuses to read.

:class:`DiskReader` is an ``io.RawIOBase`` over those runs: unallocated
ranges come from the backing file (zeros past its end or without one), zero
ranges are zeros, normal ranges are host bytes, compressed clusters are
decompressed (deflate or zstd).  Its ``data_runs``, ``seek_data`` and
``seek_hole`` tell data from holes (``lseek`` SEEK_DATA / SEEK_HOLE for the
FUSE mount), and ``pread`` may be called from many threads at once.

It is some 750 lines because the mapping walk, the decompressors and the
reader share the extent model and are read together: splitting them would
spread one walk over modules that import each other's internals.
"""

from __future__ import annotations

import io
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from . import format as fmt
from .cache import DECOMPRESSED_CLUSTERS
from .crypto import SECTOR, SectorCipher
from .errors import CorruptImageError, UnsupportedImageError
from .hostfile import fill_zeros
from .model import Header, Snapshot

__all__ = ["DecryptedSource", "DiskReader", "Extent", "ExtentKind", "GuestDisk", "L1Lookup",
           "Layer", "MappedImage", "decompress_cluster", "iter_extents", "read_decrypted"]


@dataclass(frozen=True, slots=True)
class Layer:
    """One mapping of guest offsets to the host file: the active image or a
    snapshot.  ``size`` is its virtual disk size."""

    l1_table_offset: int
    l1_size: int
    size: int
    snapshot: Snapshot | None = None

    @property
    def name(self) -> str:
        if self.snapshot is None:
            return "active layer"
        return f"snapshot {self.snapshot.id} ({self.snapshot.name})"


class GuestDisk(Protocol):
    """A guest disk to read from: a qcow2 layer (:class:`DiskReader`) or a
    raw file (:class:`qcow2snap.image.RawDisk`).  Reads past ``size`` are
    clipped (``pread``) or must not be asked for (``read_at``)."""

    @property
    def size(self) -> int: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def read_at(self, offset: int, out: memoryview) -> None: ...


class ByteSource(Protocol):
    """Positional reads of a host file (zeros past its end)."""

    def pread(self, offset: int, length: int) -> bytes: ...


class L1Lookup(Protocol):
    """A layer's L1 table, entry by entry."""

    def __getitem__(self, index: int) -> int: ...
    def next_mapped(self, start: int, stop: int) -> int: ...


class MappedImage(Protocol):
    """What the reader needs of an image (:class:`qcow2snap.image.Qcow2Image`
    provides it)."""

    header: Header
    cluster_bits: int
    cluster_size: int
    l2_bits: int
    l2_entries: int
    extended_l2: bool
    subcluster_bits: int
    subclusters_per_cluster: int
    csize_shift: int
    csize_mask: int
    cluster_offset_mask: int
    has_data_file: bool
    cache_token: int

    @property
    def path(self) -> str: ...
    @property
    def encrypted(self) -> bool: ...
    def data_cipher(self) -> SectorCipher | None: ...
    def l1_entries(self, layer: Layer) -> L1Lookup: ...
    def read_l2(self, l2_offset: int) -> array[int]: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def data_file(self) -> ByteSource: ...
    def backing_disk(self) -> GuestDisk | None: ...


class ExtentKind(str, Enum):  # noqa: UP042 (StrEnum would change str() of members)
    """What a run of guest space reads as."""

    DATA = "data"                 #: host bytes at ``host_offset``
    ZERO = "zero"                 #: reads as zeros (zero flag / zero subclusters)
    UNALLOCATED = "unallocated"   #: reads from the backing file, or zeros
    COMPRESSED = "compressed"     #: one compressed cluster at ``host_offset``


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest space of one kind.

    For ``DATA``, ``host_offset`` is the host file offset of ``guest_offset``
    (in the external data file when ``in_data_file``).  For ``COMPRESSED``
    the run lies inside one guest cluster; ``host_offset`` and
    ``compressed_length`` locate the compressed bytes of the whole cluster
    and ``cluster_guest_offset`` is where that cluster starts.  ``ZERO``
    runs backed by a preallocated cluster carry its ``host_offset`` too.
    """

    guest_offset: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None
    compressed_length: int = 0
    cluster_guest_offset: int = 0
    in_data_file: bool = False

    @property
    def guest_end(self) -> int:
        return self.guest_offset + self.length


class _Where:
    """QEMU's "(L2 offset: ..., L2 index: ...)" suffix, formatted only when
    an error message needs it."""

    __slots__ = ("l2_index", "l2_offset")

    def __init__(self, l2_offset: int, l2_index: int) -> None:
        self.l2_offset = l2_offset
        self.l2_index = l2_index

    def __str__(self) -> str:
        return f"(L2 offset: {fmt.c_hex(self.l2_offset)}, L2 index: {fmt.c_hex(self.l2_index)})"

    def __format__(self, spec: str) -> str:
        return str(self)


#: bits that must be clear for an L2 entry to be a "plain" one: everything
#: but COPIED and the host offset (so: not compressed, not zero, no reserved bit)
_PLAIN_MASK = ((1 << 64) - 1) & ~(fmt.QCOW_OFLAG_COPIED | fmt.L2E_OFFSET_MASK)
#: an unallocated plain entry: nothing set but perhaps COPIED
_UNALLOC_MASK = ((1 << 64) - 1) & ~fmt.QCOW_OFLAG_COPIED


def _merge(prev: Extent | None, new: Extent) -> tuple[Extent | None, Extent]:
    """Coalesce ``new`` into ``prev`` when contiguous; returns
    (extent to emit or None, new pending extent)."""
    if prev is not None and prev.kind is new.kind and prev.guest_end == new.guest_offset:
        if new.kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED):
            return None, Extent(prev.guest_offset, prev.length + new.length, prev.kind)
        if (new.kind is ExtentKind.DATA and prev.host_offset is not None
                and new.host_offset == prev.host_offset + prev.length
                and prev.in_data_file == new.in_data_file):
            return None, Extent(prev.guest_offset, prev.length + new.length, prev.kind,
                                prev.host_offset, in_data_file=prev.in_data_file)
    return prev, new


def iter_extents(image: MappedImage, layer: Layer, start: int, length: int) -> Iterator[Extent]:
    """Yield the runs covering guest range ``[start, start + length)`` of
    ``layer``, in order, coalesced where kind and host contiguity allow.

    The range is not clipped to the layer's size (the VM state lives past
    it).  Raises :class:`CorruptImageError` for entries QEMU would refuse.
    """
    if start < 0 or length < 0:
        raise ValueError("negative guest range")
    end = start + length
    cluster_bits = image.cluster_bits
    cs = image.cluster_size
    l2_bits = image.l2_bits
    l1_shift = cluster_bits + l2_bits
    l2_mask = image.l2_entries - 1
    extended = image.extended_l2
    data_file = image.has_data_file
    version = image.header.version
    sc_bits = image.subcluster_bits
    sc_count = image.subclusters_per_cluster
    l1 = image.l1_entries(layer)
    l1_size = layer.l1_size
    pending: Extent | None = None
    pos = start
    while pos < end:
        l1_index = pos >> l1_shift
        l1_entry = l1[l1_index] if l1_index < l1_size else 0
        l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            # One step for a whole run of unmapped L1 entries, and for all of
            # the range past the L1 table (a hostile image may have 4M empty
            # L1 entries, or a snapshot disk_size of petabytes).
            j = l1.next_mapped(l1_index + 1, ((end - 1) >> l1_shift) + 1)
            span_end = end if j >= l1_size else min(end, j << l1_shift)
            emit, pending = _merge(pending, Extent(pos, span_end - pos, ExtentKind.UNALLOCATED))
            if emit:
                yield emit
            pos = span_end
            continue
        span_end = min(end, (l1_index + 1) << l1_shift)
        if l2_offset & (cs - 1):
            raise CorruptImageError(
                f"L2 table offset {fmt.c_hex(l2_offset)} unaligned (L1 index: "
                f"{fmt.c_hex(l1_index)}) in {layer.name}", structure="L1 table",
                offset=layer.l1_table_offset + 8 * l1_index)
        l2 = image.read_l2(l2_offset)
        while pos < span_end:
            l2_index = (pos >> cluster_bits) & l2_mask
            cluster_start = (pos >> cluster_bits) << cluster_bits
            cluster_end = min(cluster_start + cs, span_end)
            if not extended and not data_file:
                # Fast path: a run of plain entries (no flag but COPIED, no
                # reserved bit), either unallocated or host-contiguous data,
                # is measured in one tight loop.
                entry = l2[l2_index]
                if entry & _PLAIN_MASK == 0:
                    host = entry & fmt.L2E_OFFSET_MASK
                    if host & (cs - 1) == 0:
                        last_index = min(((span_end - 1) >> cluster_bits) & l2_mask,
                                         image.l2_entries - 1)
                        j = l2_index + 1
                        if host:
                            expect = host + cs
                            while j <= last_index:
                                e = l2[j]
                                if e & _PLAIN_MASK or e & fmt.L2E_OFFSET_MASK != expect:
                                    break
                                expect += cs
                                j += 1
                        else:
                            while j <= last_index and l2[j] & _UNALLOC_MASK == 0:
                                j += 1
                        run_end = min(cluster_start + ((j - l2_index) << cluster_bits), span_end)
                        if host:
                            new = Extent(pos, run_end - pos, ExtentKind.DATA,
                                         host + (pos - cluster_start))
                        else:
                            new = Extent(pos, run_end - pos, ExtentKind.UNALLOCATED)
                        emit, pending = _merge(pending, new)
                        if emit:
                            yield emit
                        pos = run_end
                        continue
            if extended:
                entry = l2[2 * l2_index]
                bitmap = l2[2 * l2_index + 1]
            else:
                entry = l2[l2_index]
                bitmap = 0
            where = _Where(l2_offset, l2_index)
            host_cluster = entry & fmt.L2E_OFFSET_MASK
            if entry & fmt.QCOW_OFLAG_COMPRESSED:
                if data_file:
                    raise CorruptImageError(
                        f"Compressed cluster entry found in image with external data file {where}",
                        structure="L2 table", offset=l2_offset)
                # QCOW2_SUBCLUSTER_COMPRESSED whatever the bitmap holds: QEMU
                # reads the cluster (only qemu-img check calls a non-zero
                # bitmap an error, as qcow2snap.ops.check does)
                coffset = entry & image.cluster_offset_mask
                nb_csectors = ((entry >> image.csize_shift) & image.csize_mask) + 1
                csize = nb_csectors * fmt.QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511)
                new = Extent(pos, cluster_end - pos, ExtentKind.COMPRESSED, coffset, csize,
                             cluster_start)
                if pending is not None:
                    yield pending
                pending = None
                yield new
                pos = cluster_end
                continue
            # has_host: the (sub)cluster types with a host offset, which
            # qcow2_get_host_offset checks: NORMAL, ZERO_ALLOC and (extended
            # L2) UNALLOCATED_ALLOC, i.e. every subcluster of an entry whose
            # cluster type is NORMAL, whatever its bitmap says
            if not extended:
                if entry & fmt.QCOW_OFLAG_ZERO:
                    if version < 3:
                        raise CorruptImageError(
                            f"Zero cluster entry found in pre-v3 image {where}",
                            structure="L2 table", offset=l2_offset)
                    kinds = [(cluster_end - pos, ExtentKind.ZERO)]
                    has_host = host_cluster != 0          # ZERO_ALLOC
                elif host_cluster or (data_file and entry & fmt.QCOW_OFLAG_COPIED):
                    kinds = [(cluster_end - pos, ExtentKind.DATA)]
                    has_host = True
                else:
                    kinds = [(cluster_end - pos, ExtentKind.UNALLOCATED)]
                    has_host = False
            else:
                if host_cluster == 0 and not (data_file and entry & fmt.QCOW_OFLAG_COPIED):
                    if bitmap & fmt.QCOW_L2_BITMAP_ALL_ALLOC:
                        raise CorruptImageError(f"Invalid cluster entry found  {where}",
                                                structure="L2 table", offset=l2_offset)
                    allocated = False
                else:
                    if (bitmap >> 32) & bitmap:
                        raise CorruptImageError(f"Invalid cluster entry found  {where}",
                                                structure="L2 table", offset=l2_offset)
                    allocated = True
                has_host = allocated
                kinds = []
                sc_pos = pos
                while sc_pos < cluster_end:
                    sc_index = (sc_pos >> sc_bits) & (sc_count - 1)
                    sc_end = min(cluster_start + ((sc_index + 1) << sc_bits), cluster_end)
                    if allocated and bitmap & (1 << sc_index):
                        kind = ExtentKind.DATA
                    elif bitmap & (1 << (32 + sc_index)):
                        kind = ExtentKind.ZERO
                    else:
                        kind = ExtentKind.UNALLOCATED
                    if kinds and kinds[-1][1] is kind:
                        kinds[-1] = (kinds[-1][0] + sc_end - sc_pos, kind)
                    else:
                        kinds.append((sc_end - sc_pos, kind))
                    sc_pos = sc_end
            if has_host:
                if host_cluster & (cs - 1):
                    raise CorruptImageError(
                        f"Cluster allocation offset {fmt.c_hex(host_cluster)} unaligned {where}",
                        structure="L2 table", offset=l2_offset)
                if data_file and host_cluster != cluster_start:
                    raise CorruptImageError(
                        f"External data file host cluster offset {fmt.c_hex(host_cluster)} does "
                        f"not match guest cluster offset: {fmt.c_hex(cluster_start)}, L2 index: "
                        f"{fmt.c_hex(l2_index)})", structure="L2 table", offset=l2_offset)
            for run_length, kind in kinds:
                if kind is ExtentKind.DATA:
                    new = Extent(pos, run_length, kind, host_cluster + (pos - cluster_start),
                                 in_data_file=data_file)
                else:
                    new = Extent(pos, run_length, kind)
                emit, pending = _merge(pending, new)
                if emit:
                    yield emit
                pos += run_length
    if pending is not None:
        yield pending


# ---------------------------------------------------------------------------
# Compressed clusters
# ---------------------------------------------------------------------------

_THREAD = threading.local()

#: Largest zstd window a compressed cluster may ask the decoder to keep.
#: QEMU's frames declare their content size (one cluster, at most 2 MiB) and
#: need no more; a hostile frame must not make each decoder take the 128 MiB
#: zstd's default limit would allow.
ZSTD_MAX_WINDOW_BYTES = 8 << 20
#: Input fed to a zstd decoder per step on the bounded path: a zstd block of
#: up to 128 KiB of output can be 4 bytes long, so a step can yield at most
#: ~2 MiB, however large a size the frame declares.
_ZSTD_STEP_BYTES = 64

#: ISA-L's inflate (same output, about twice zlib's speed): ``isal.isal_zlib``,
#: imported at the first compressed cluster (~5 ms of start-up that ``info``
#: and ``list`` would pay for nothing: docs/performance.md), ``None`` where
#: it is not installed
_isal_zlib: Any = ...


def _load_isal() -> Any:
    global _isal_zlib
    try:
        import isal.isal_zlib
        _isal_zlib = isal.isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency; platforms without a wheel
        _isal_zlib = None
    return _isal_zlib


class _ClusterOverflow(Exception):
    """A compressed cluster holds more than one cluster of data."""


def _inflate_with(module: Any, data: bytes, cluster_size: int) -> bytes:
    """Raw deflate into at most one cluster (``max_length``: memory stays
    bounded whatever the stream encodes).  QEMU's deflate writer ends each
    stream right after one cluster; a stream that would go on producing
    data is damage (or a bomb), not a cluster."""
    inflater = module.decompressobj(-12)
    out: bytes = inflater.decompress(data, cluster_size)
    if (len(out) == cluster_size and not inflater.eof
            and inflater.decompress(inflater.unconsumed_tail, 1)):
        raise _ClusterOverflow("the deflate stream holds more than one cluster")
    return out


def _inflate(data: bytes, cluster_size: int) -> bytes:
    """Raw deflate with QEMU's window (-12), at most one cluster of output.

    ISA-L decodes the stream when it can; anything it rejects goes to zlib,
    which QEMU itself uses, so damaged clusters fail with zlib's verdict and
    message.  (ISA-L always keeps a 32 KiB window: a stream whose distances
    exceed the 4 KiB one QEMU declares, which no QEMU ever writes, decodes
    here where QEMU refuses it.)"""
    isal_zlib = _load_isal() if _isal_zlib is ... else _isal_zlib
    if isal_zlib is not None:
        try:
            out = _inflate_with(isal_zlib, data, cluster_size)
            if len(out) == cluster_size:
                return out
        except _ClusterOverflow:
            raise
        except Exception:
            pass
    import zlib  # the fallback (loaded here with isal: start-up of info/list)
    return _inflate_with(zlib, data, cluster_size)


def _zstd_decompressor() -> Any:
    """This thread's zstd context (creating one per cluster cost more than
    decompressing it; a context must not be shared between threads)."""
    dctx = getattr(_THREAD, "zstd", None)
    if dctx is None:
        import zstandard
        dctx = _THREAD.zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
    return dctx


def _zstd(data: bytes, cluster_size: int) -> bytes:
    """zstd frames until one cluster is full, as ``qcow2_zstd_decompress``
    reads them, in bounded memory.

    QEMU writes one frame per cluster that declares its content size; such a
    frame is decoded in one call into a buffer of exactly that size.  A frame
    declaring more than a cluster is refused before anything is allocated
    (one-shot decoding would allocate whatever it declares).  Anything else
    (frames without a declared size, several frames) is decoded frame by
    frame from small input steps, so no step yields more than ~2 MiB, and
    refused as soon as it yields more than a cluster: QEMU refuses a frame
    that is not fully flushed when the cluster is full."""
    import zstandard
    dctx = _zstd_decompressor()
    declared = zstandard.frame_content_size(data)
    if declared == cluster_size:
        out: bytes = dctx.decompress(data, read_across_frames=False, allow_extra_data=True)
        return out
    if declared > cluster_size:
        raise _ClusterOverflow(f"its zstd frame declares {declared} bytes")
    out_buf = bytearray()
    pos = 0
    while len(out_buf) < cluster_size and pos < len(data):
        frame = dctx.decompressobj()
        while not frame.eof and pos < len(data):
            step = data[pos:pos + _ZSTD_STEP_BYTES]
            pos += len(step)
            out_buf += frame.decompress(step)
            if len(out_buf) > cluster_size:
                raise _ClusterOverflow("its zstd frames hold more than one cluster")
        pos -= len(frame.unused_data)   # input after the frame: the next frame
        if not frame.eof:
            break                       # input ended inside a frame
    return bytes(out_buf)


def decompress_cluster(data: bytes, compression_type: int, cluster_size: int,
                       host_offset: int = 0) -> bytes:
    """Decompress one compressed cluster the way QEMU does.

    deflate: raw deflate (no zlib header), window bits -12, trailing input
    ignored; zstd: frames until ``cluster_size`` bytes.  The output must be
    exactly one cluster; more is damage.  Memory is bounded by a few
    clusters whatever sizes the compressed data declares.
    """
    where = f"compressed cluster at host offset {host_offset:#x}"
    try:
        if compression_type == fmt.QCOW2_COMPRESSION_TYPE_ZLIB:
            out = _inflate(data, cluster_size)
        elif compression_type == fmt.QCOW2_COMPRESSION_TYPE_ZSTD:
            out = _zstd(data, cluster_size)
        else:  # pragma: no cover - rejected at open
            raise UnsupportedImageError(f"unknown compression type {compression_type}")
    except _ClusterOverflow as exc:
        raise CorruptImageError(
            f"{where} decompresses to more than one cluster ({cluster_size} bytes): {exc}",
            structure="compressed cluster", offset=host_offset) from None
    except UnsupportedImageError:
        raise
    except Exception as exc:  # zlib.error, zstandard.ZstdError and relatives
        raise CorruptImageError(f"{where} does not decompress: {exc}",
                                structure="compressed cluster", offset=host_offset) from exc
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"{where} decompresses to {len(out)} bytes, not {cluster_size}",
            structure="compressed cluster", offset=host_offset)
    return out


# ---------------------------------------------------------------------------
# File-like reader
# ---------------------------------------------------------------------------

def read_decrypted(cipher: SectorCipher, source: ByteSource, host_offset: int,
                   length: int, guest_offset: int) -> bytearray:
    """``length`` bytes of data at ``host_offset`` (guest offset
    ``guest_offset``), decrypted: the 512-byte sectors around them are read
    and decrypted, each with its sector number as IV, counted in the file
    (LUKS: QEMU's ``crypt_physical_offset``) or in the guest disk (legacy AES)."""
    first = host_offset - host_offset % SECTOR
    end = host_offset + length
    end += -end % SECTOR
    raw = source.pread(first, end - first)
    if len(raw) < end - first:   # past the end of the file reads zeros (pread)
        raw += bytes(end - first - len(raw))
    skip = host_offset - first
    iv_offset = host_offset if cipher.iv_from_host_offset else guest_offset
    plain = cipher.decrypt((iv_offset - skip) // SECTOR, raw)
    return plain if len(plain) == length else plain[skip:skip + length]


class DecryptedSource:
    """A :class:`ByteSource` whose reads are decrypted with ``cipher``;
    ``guest_minus_host``: what turns a host offset into its guest offset
    (constant along one extent; the legacy AES IVs count guest sectors)."""

    def __init__(self, cipher: SectorCipher, source: ByteSource, guest_minus_host: int) -> None:
        self.cipher = cipher
        self.source = source
        self.guest_minus_host = guest_minus_host

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(read_decrypted(self.cipher, self.source, offset, length,
                                    offset + self.guest_minus_host))


#: How many backing layers :meth:`DiskReader.data_runs` looks through for
#: holes (deeper, unallocated clusters count as data)
HOLE_SEARCH_DEPTH = 16


class DiskReader(io.RawIOBase):
    """A read-only, seekable binary file over a layer's guest space.

    ``size`` is the layer's virtual size, or ``length`` for a window such as
    the VM state (which starts at ``start`` in the layer's guest space).
    """

    def __init__(self, image: MappedImage, layer: Layer, *, start: int = 0,
                 length: int | None = None, backing: bool = True) -> None:
        super().__init__()
        #: decrypts the data clusters of an encrypted image (LUKS or legacy
        #: AES; raises without the passphrase or with a wrong LUKS one)
        self._cipher = image.data_cipher() if image.encrypted else None
        if layer.snapshot is not None and image.has_data_file:
            raise UnsupportedImageError(
                f"{image.path}: internal snapshots are not supported with an external data file",
                feature="external data file")
        self.image = image
        self.layer = layer
        self._start = start
        self.size = layer.size if length is None else length
        self._pos = 0
        self._use_backing = backing
        #: what unallocated ranges read from (the backing layer), or None
        self._below: GuestDisk | None = None
        self._below_known = False
        #: opens the disk below once, whichever thread asks first
        self._below_lock = threading.Lock()

    # io.RawIOBase protocol ------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise OSError(22, "negative seek position")
        self._pos = new
        return new

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        if self._pos >= self.size:
            return 0
        length = min(len(view), self.size - self._pos)
        self.read_at(self._pos, view[:length])
        self._pos += length
        return length

    def readall(self) -> bytes:
        self._checkClosed()
        if self._pos >= self.size:
            return b""
        out = bytearray(self.size - self._pos)
        n = self.readinto(out)
        return bytes(out[:n])

    # positional access ------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (clipped to the size) without
        moving the file position."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        out = bytearray(length)
        self.read_at(offset, memoryview(out))
        return bytes(out)

    def read_at(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``offset`` (within the size).

        Unallocated ranges are read from the backing chain with a work list,
        not by recursion: a chain may be thousands of images deep."""
        work: list[tuple[DiskReader, int, memoryview]] = [(self, self._start + offset, out)]
        while work:
            reader, guest, view = work.pop()
            image = reader.image
            for ext in iter_extents(image, reader.layer, guest, len(view)):
                lo = ext.guest_offset - guest
                hi = lo + ext.length
                kind = ext.kind
                if kind is ExtentKind.DATA:
                    assert ext.host_offset is not None
                    source = image.data_file() if ext.in_data_file else image
                    into = getattr(source, "pread_into", None)
                    if reader._cipher is None and into is not None:   # no copy
                        into(ext.host_offset, view[lo:hi])
                    elif reader._cipher is None:
                        view[lo:hi] = source.pread(ext.host_offset, ext.length)
                    else:
                        view[lo:hi] = read_decrypted(reader._cipher, source, ext.host_offset,
                                                     ext.length, ext.guest_offset)
                elif kind is ExtentKind.ZERO:
                    fill_zeros(view[lo:hi])
                elif kind is ExtentKind.UNALLOCATED:
                    below = reader._backing()
                    inside = 0 if below is None else max(0, min(ext.length,
                                                                below.size - ext.guest_offset))
                    if inside < ext.length:     # past the backing file's end: zeros
                        fill_zeros(view[lo + inside:hi])
                    if inside:
                        assert below is not None  # inside > 0 needs a backing file
                        if isinstance(below, DiskReader):   # iterate, do not recurse
                            work.append((below, ext.guest_offset, view[lo:lo + inside]))
                        else:
                            below.read_at(ext.guest_offset, view[lo:lo + inside])
                else:
                    cluster = reader._decompressed(ext)
                    inner = ext.guest_offset - ext.cluster_guest_offset
                    view[lo:hi] = cluster[inner:inner + ext.length]

    def _backing(self) -> GuestDisk | None:
        """The backing layer's disk (opened on first use, once even when
        several threads read at the same time), or None."""
        if not self._below_known:
            with self._below_lock:
                if not self._below_known:
                    self._below = self.image.backing_disk() if self._use_backing else None
                    self._below_known = True
        return self._below

    # holes (SEEK_DATA / SEEK_HOLE) ----------------------------------------

    def data_runs(self, offset: int = 0, length: int | None = None, *, _depth: int = 0
                  ) -> Iterator[tuple[int, int, bool]]:
        """``(offset, length, is_data)`` runs of this file from ``offset``
        (coalesced, in order, covering ``[offset, offset + length)`` clipped to
        the size).  A run is a hole (``is_data`` False) only where the layer
        reads as zeros by the metadata: zero clusters, and unallocated
        clusters with nothing below them (no backing file, or past its end)
        or with a hole below them in a qcow2 backing file.  A raw backing
        file, or a chain deeper than :data:`HOLE_SEARCH_DEPTH`, counts as
        data, so a hole is never reported over data."""
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        below = self._backing()
        below_end = -1 if below is None else below.size
        deeper = isinstance(below, DiskReader) and _depth < HOLE_SEARCH_DEPTH
        base = self._start
        run_start, run_data = offset, None
        for ext in iter_extents(self.image, self.layer, base + offset, end - offset):
            lo = ext.guest_offset - base
            hi = lo + ext.length
            kind = ext.kind
            pieces: list[tuple[int, int, bool]]
            if kind is ExtentKind.UNALLOCATED:
                # what is below up to the end of the disk below, a hole past it
                split = min(max(ext.guest_offset, below_end), ext.guest_end)
                if deeper and split > ext.guest_offset:
                    assert isinstance(below, DiskReader)
                    pieces = [(o - base, o + n - base, d) for o, n, d in below.data_runs(
                        ext.guest_offset, split - ext.guest_offset, _depth=_depth + 1)]
                else:
                    pieces = [(lo, split - base, True)]
                pieces.append((split - base, hi, False))
            else:
                pieces = [(lo, hi, kind is not ExtentKind.ZERO)]
            for p_lo, p_hi, is_data in pieces:
                if p_lo >= p_hi:
                    continue
                if run_data is None:
                    run_data = is_data
                elif is_data != run_data:
                    yield run_start, p_lo - run_start, run_data
                    run_start, run_data = p_lo, is_data
        if run_data is not None:
            yield run_start, end - run_start, run_data

    def seek_data(self, offset: int) -> int | None:
        """``lseek(SEEK_DATA)``: the first data offset at or after
        ``offset``, or None when only a hole follows (ENXIO)."""
        for start, _, is_data in self.data_runs(offset):
            if is_data:
                return start
        return None

    def seek_hole(self, offset: int) -> int:
        """``lseek(SEEK_HOLE)``: the first hole offset at or after
        ``offset``; the end of the file counts as a hole."""
        for start, _, is_data in self.data_runs(offset):
            if not is_data:
                return start
        return max(offset, self.size)

    def _decompressed(self, ext: Extent) -> bytes:
        assert ext.host_offset is not None
        image = self.image
        key = (image.cache_token, ext.host_offset)
        cached = DECOMPRESSED_CLUSTERS.get(key)
        if cached is not None:
            return cached
        raw = image.pread(ext.host_offset, ext.compressed_length)
        data = decompress_cluster(raw, image.header.effective_compression_type,
                                  image.cluster_size, ext.host_offset)
        DECOMPRESSED_CLUSTERS.put(key, data, len(data))
        return data

