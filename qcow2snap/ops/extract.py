"""Extraction (operations layer): a snapshot, the active layer or a VM
state out of an image, into a raw file, a standalone qcow2 image or the raw
QEVM stream.

The output is written under a temporary name in the destination directory,
fsynced, and renamed into place only when complete: an interrupt, a full
disk or an error leaves nothing under the final name (and no temporary file
either).  The source image is only read.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

from .. import format as fmt
from ..copier import ClusterCopier, is_zero
from ..errors import OutputError, OutputExistsError, UnsupportedImageError
from ..hostfile import file_kind
from ..image import Qcow2Image
from ..model import Header, Snapshot
from ..reader import (
    DiskReader,
    ExtentKind,
    GuestDisk,
    Layer,
    decompress_cluster,
    iter_extents,
    read_decrypted,
)
from ..refcount import write_fresh_refcounts
from ..tables import encode_u64_table
from .qcow2_writer import BatchWriter, CopyRuns, zero_clusters

__all__ = ["ExtractResult", "OutputError", "OutputExistsError", "atomic_output", "dump_vm_state",
           "extract", "input_files"]

ProgressCallback = Callable[[int, int], None]

#: Bytes of clusters allowed in flight in qcow2 output's compression pool.
INFLIGHT_BYTES = 16 << 20
#: Bytes of encrypted data read and decrypted per step: 1 MiB stays below
#: the CLI's 4 MiB mmap threshold, so the buffers are reused from the heap
#: instead of being mapped and faulted in afresh each step.
DECRYPT_STEP_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What an extraction wrote."""

    output: str
    format: str
    virtual_size: int
    bytes_written: int
    snapshot: Snapshot | None


def input_files(image: Qcow2Image) -> dict[tuple[int, int], str]:
    """The files an extraction reads from, by (st_dev, st_ino), with what
    each is: the image, every file of its backing chain (also a link that
    is not followed) and its external data file.  An output must never
    replace one of them."""
    found: dict[tuple[int, int], str] = {image._file.identity(): "the input image"}
    for link in image.backing_chain():
        try:
            st = os.stat(link.path)
        except OSError:
            continue
        found.setdefault((st.st_dev, st.st_ino), f"backing file {link.path}")
    data_name = image._data_file_override or image.data_file_name
    if image.has_data_file and data_name:
        try:
            st = os.stat(image._resolve_relative(os.fspath(data_name)))
            found.setdefault((st.st_dev, st.st_ino), "the image's data file")
        except OSError:
            pass
    return found


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False,
                  inputs: dict[tuple[int, int], str] | None = None,
                  sync: bool = False) -> Iterator[int]:
    """Yield an fd of a temporary file beside ``path``; on success rename it
    to ``path``.  On any exception, including KeyboardInterrupt, the
    temporary file is removed, so nothing appears under ``path`` unless it
    is complete.

    An existing ``path`` is replaced only with ``overwrite``, only if it is
    a regular file (or a symlink, which is replaced, not followed), and
    never if it is one of ``inputs`` (see :func:`input_files`): ``-f`` must
    not destroy the evidence it reads, nor turn a device node or FIFO into
    a regular file.  An OSError while writing becomes an
    :class:`OutputError` naming ``path``.

    ``sync=True`` also makes the result durable against power loss: the data
    is fsynced before the rename and the directory after it.  Like
    ``qemu-img convert`` and ``cp``, the default leaves flushing to the
    kernel."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot use as output: {exc.strerror or exc}") from exc
    if st is not None:
        targets = [st]
        if stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):
                targets.append(os.stat(path))
        for target in targets:
            what = (inputs or {}).get((target.st_dev, target.st_ino))
            if what is not None:
                if what == "the input image":
                    raise OutputExistsError(f"{path}: refusing to write over the source image")
                raise OutputExistsError(f"{path}: refusing to write over {what}, which this "
                                        f"extraction reads; choose another output")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise OutputExistsError(
                f"{path}: is {file_kind(st.st_mode)}; outputs are written as regular files "
                f"and never replace {file_kind(st.st_mode)} (qemu-img: \"Cannot grow device "
                f"files\"); choose another output")
        if not overwrite:
            raise OutputExistsError(f"{path}: output exists; pass overwrite=True (CLI: --force) "
                                    f"to replace it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                   suffix=".qcow2snap-tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the output in {directory}: "
                          f"{exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; behave like open()
        try:
            yield fd
            if sync:
                os.fsync(fd)
        except OSError as exc:
            if exc.filename is not None:
                raise  # reading an input failed (it names the file), not writing the output
            raise OutputError(f"{path}: writing the output failed: {exc.strerror or exc}; "
                              f"nothing was left under that name") from exc
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = ""
        if sync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback
        if callback:
            callback(0, total)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.callback:
            self.callback(min(self.done, self.total), self.total)


def _copy_range_raw(image: Qcow2Image, layer: Layer, start: int, length: int,
                    copier: ClusterCopier, *, backing: bool, progress: _Progress) -> None:
    """Write guest range ``[start, start+length)`` of ``layer`` to the copier's
    destination at offset ``guest - start``, leaving holes for zeros."""
    cs = image.cluster_size
    compression_type = image.header.effective_compression_type
    below: GuestDisk | None = None   # the backing layer, opened at the first need

    def inflate(raw: bytes, host_offset: int) -> bytes:
        return decompress_cluster(raw, compression_type, cs, host_offset)

    copier.set_decompressor(inflate, cs)
    cipher = image.data_cipher() if image.encrypted else None   # LUKS/AES: decrypt data

    for ext in iter_extents(image, layer, start, length):
        dst = ext.guest_offset - start
        kind = ext.kind
        if kind is ExtentKind.DATA:
            assert ext.host_offset is not None  # DATA extents always carry one
            if cipher is not None:   # read and decrypted by the copier's workers
                source = image.data_file() if ext.in_data_file else image
                done = 0
                while done < ext.length:
                    n = min(DECRYPT_STEP_BYTES, ext.length - done)
                    copier.add_computed(dst + done, partial(
                        read_decrypted, cipher, source, ext.host_offset + done, n,
                        ext.guest_offset + done))
                    done += n
            elif ext.in_data_file:
                data_file = image.data_file()
                done = 0
                while done < ext.length:
                    n = min(4 << 20, ext.length - done)
                    copier.write(dst + done, data_file.pread(ext.host_offset + done, n))
                    progress(n)
                    done += n
            else:
                assert ext.host_offset is not None
                copier.copy(ext.host_offset, dst, ext.length)
        elif kind is ExtentKind.COMPRESSED:
            assert ext.host_offset is not None
            # read by the worker that inflates it (pread, not the mapping:
            # mapped pages would stay in our RSS)
            copier.add_compressed(ext.host_offset, ext.compressed_length, dst,
                                  ext.guest_offset - ext.cluster_guest_offset, ext.length)
        elif kind is ExtentKind.UNALLOCATED and backing and image.backing is not None:
            if below is None:
                below = image.backing_disk()
                assert below is not None
            done = 0
            while done < ext.length:
                n = min(4 << 20, ext.length - done)
                data = below.pread(ext.guest_offset + done, n)   # clipped at its end
                if data:
                    copier.write(dst + done, data)
                progress(n)
                done += n
        else:
            progress(ext.length)
    copier.drain()


def extract(image: Qcow2Image, snapshot: str | Snapshot | None, output: str | os.PathLike[str],
            *, format: Literal["raw", "qcow2"] = "raw",
            compress: Literal["zlib", "zstd"] | None = None,
            progress: ProgressCallback | None = None, overwrite: bool = False,
            backing: bool = True, sync: bool = False) -> ExtractResult:
    """Write the guest disk of ``snapshot`` (``None`` = the active layer) to
    ``output``.

    ``format="raw"`` gives exactly what ``qemu-img convert -l
    snapshot.id=ID -O raw`` gives for a snapshot of the current size: the
    snapshot's own ``disk_size`` bytes, sparse (zero ranges are holes).
    ``format="qcow2"`` writes a standalone qcow2 v3 image (no backing file,
    no snapshots) with the same guest content; ``compress`` compresses its
    data clusters with deflate ("zlib") or zstd.

    ``progress(done, total)`` is called as guest bytes are handled.
    ``sync=True`` fsyncs the output before it is renamed into place.
    """
    layer = image.layer(snapshot)
    if image.encrypted:   # unlock (or refuse) before the output is created
        image.data_cipher()
    if layer.snapshot is not None and image.has_data_file:
        raise UnsupportedImageError(
            f"{image.path}: internal snapshots are not supported with an external data file",
            feature="external data file")
    if format == "raw" and compress:
        raise ValueError("compression applies to qcow2 output only")
    tracker = _Progress(layer.size, progress)
    with atomic_output(output, overwrite=overwrite, inputs=input_files(image), sync=sync) as fd:
        if format == "raw":
            os.ftruncate(fd, layer.size)
            copier = ClusterCopier(image._file.fd, fd, progress=tracker, src_path=image.path)
            try:
                _copy_range_raw(image, layer, 0, layer.size, copier, backing=backing,
                                progress=tracker)
            finally:
                copier.close()
            written = copier.bytes_written
        elif format == "qcow2":
            written = _write_qcow2(image, layer, fd, compress=compress, progress=tracker,
                                   backing=backing)
        else:
            raise ValueError(f"unknown output format {format!r}")
    return ExtractResult(os.fspath(output), format, layer.size, written, layer.snapshot)


def dump_vm_state(image: Qcow2Image, snapshot: str | Snapshot, output: str | os.PathLike[str],
                  *, progress: ProgressCallback | None = None,
                  overwrite: bool = False, sync: bool = False) -> ExtractResult:
    """Write a snapshot's saved VM state (exactly ``vm_state_size`` bytes of
    the QEMU migration stream) to ``output``."""
    reader = image.open_vm_state(snapshot)  # validates: raises for disk-only snapshots
    sn = reader.layer.snapshot
    assert sn is not None
    start = image.vm_state_offset(sn)
    tracker = _Progress(sn.vm_state_size, progress)
    with atomic_output(output, overwrite=overwrite, inputs=input_files(image), sync=sync) as fd:
        os.ftruncate(fd, sn.vm_state_size)
        copier = ClusterCopier(image._file.fd, fd, progress=tracker, src_path=image.path)
        try:
            _copy_range_raw(image, reader.layer, start, sn.vm_state_size, copier,
                            backing=False, progress=tracker)
        finally:
            copier.close()
    return ExtractResult(os.fspath(output), "vmstate", sn.vm_state_size, copier.bytes_written, sn)


# ---------------------------------------------------------------------------
# Standalone qcow2 output
# ---------------------------------------------------------------------------

def _compressor(kind: str) -> Callable[[bytes | memoryview], bytes]:
    if kind == "zlib":
        def deflate(data: bytes | memoryview) -> bytes:
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            return c.compress(data) + c.flush()
        return deflate
    if kind == "zstd":
        import zstandard
        return lambda data: zstandard.ZstdCompressor().compress(data)
    raise ValueError(f"unknown compression {kind!r} (zlib or zstd)")


@dataclass(frozen=True)
class Overlay:
    """What makes :func:`_write_qcow2` write an overlay instead of a
    standalone image: only ``clusters`` (guest cluster index and its
    content, ``None`` for a zero cluster: QCOW_OFLAG_ZERO, reading zeros
    whatever the backing file holds), and a backing-file reference
    ``backing_file`` (written as given: relative names resolve from the
    overlay's directory) with its format ``backing_format``."""

    backing_file: str
    clusters: Iterable[tuple[int, bytes | None]]
    backing_format: str = "qcow2"


def _write_qcow2(image: Qcow2Image, layer: Layer, fd: int, *, compress: str | None,
                 progress: _Progress, backing: bool, overlay: Overlay | None = None) -> int:
    """Write a standalone qcow2 v3 image of ``layer``'s guest content (with
    ``overlay``: an overlay of only its clusters over its backing file).

    Layout: header cluster(s); data clusters in guest order (compressed
    ones packed at byte granularity, as QEMU packs them); L2 tables; the
    L1 table; refcount blocks and table sized to describe the whole file
    including themselves.

    The data path (:mod:`.qcow2_writer`): a cluster that is a whole host
    cluster of the image file, read as it is, goes out with its neighbours
    as one kernel copy of consecutive host clusters (compressed output:
    read with them in one ``pread``); only the other clusters (compressed,
    encrypted, partly allocated, from the backing file or the data file)
    are read one by one.  All-zero clusters are left out, as ``qemu-img
    convert`` leaves them out.  Computed bytes and the metadata are written
    with one ``pwritev`` per contiguous run.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    cs = image.cluster_size
    cluster_bits = image.cluster_bits
    l2_bits = cluster_bits - 3
    l2_entries = 1 << l2_bits
    size = layer.size
    l1_size = (size + (cs << l2_bits) - 1) >> (cluster_bits + l2_bits)
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    reader = DiskReader(image, layer, backing=backing)
    compressor = _compressor(compress) if compress else None

    l2_tables: dict[int, array[int]] = {}
    header_tail = b""                      # overlay: extensions and backing file name
    if overlay is not None:
        fmt_name = overlay.backing_format.encode()
        header_tail = (fmt.build_struct(fmt.QCowExtensionHeader,
                                        {"type": fmt.QCOW2_EXT_MAGIC_BACKING_FORMAT,
                                         "length": len(fmt_name)})
                       + fmt_name + bytes(-len(fmt_name) % 8) + bytes(8))
    backing_name = overlay.backing_file.encode() if overlay is not None else b""
    if len(backing_name) > fmt.QCOW_MAX_BACKING_FILE_NAME:
        raise ValueError(f"backing file name longer than {fmt.QCOW_MAX_BACKING_FILE_NAME} bytes")
    header_bytes = fmt.QCOW_HEADER_FULL_SIZE + max(len(header_tail), 8) + len(backing_name)
    header_clusters = (header_bytes + cs - 1) >> cluster_bits
    refcounts: dict[int, int] = dict.fromkeys(range(header_clusters), 1)  # host cluster -> count
    write_offset = header_clusters * cs    # next free byte (data area)
    out = BatchWriter(fd)
    copies = CopyRuns()
    src_fd = image._file.fd
    src_size = image.file_size

    def table(guest_cluster: int) -> array[int]:
        found = l2_tables.get(guest_cluster >> l2_bits)
        if found is None:
            found = l2_tables[guest_cluster >> l2_bits] = array("Q", bytes(l2_entries * 8))
        return found

    def set_l2(guest_cluster: int, entry: int) -> None:
        table(guest_cluster)[guest_cluster & (l2_entries - 1)] = entry

    def store(guest_cluster: int, data: bytes | memoryview, packed: bytes | None) -> None:
        nonlocal write_offset
        if packed is not None and len(packed) < cs:
            offset = write_offset
            out.write(packed, offset)
            end = offset + len(packed)
            for host_cluster in range(offset >> cluster_bits, ((end - 1) >> cluster_bits) + 1):
                refcounts[host_cluster] = refcounts.get(host_cluster, 0) + 1
            nb_sectors = ((end - 1) >> 9) - (offset >> 9)  # additional sectors
            set_l2(guest_cluster, fmt.QCOW_OFLAG_COMPRESSED | (nb_sectors << csize_shift)
                   | offset)
            assert nb_sectors <= csize_mask
            write_offset = end
            return
        offset = fmt.align_up(write_offset, cs)
        out.write(data, offset)
        refcounts[offset >> cluster_bits] = 1
        set_l2(guest_cluster, fmt.QCOW_OFLAG_COPIED | offset)
        write_offset = offset + cs

    def place_run(first: int, host: int, count: int) -> None:
        """Uncompressed output: guest clusters ``first ...`` are the host
        clusters from ``host`` on; plan their copy, leaving zeros out."""
        nonlocal write_offset
        zeros = set(zero_clusters(src_fd, host, count, cs))
        offset = fmt.align_up(write_offset, cs)
        l2_index = -1
        l2 = table(first)
        for i in range(count):
            if i in zeros:
                continue
            guest_cluster = first + i
            if guest_cluster >> l2_bits != l2_index:
                l2_index = guest_cluster >> l2_bits
                l2 = table(guest_cluster)
            l2[guest_cluster & (l2_entries - 1)] = fmt.QCOW_OFLAG_COPIED | offset
            refcounts[offset >> cluster_bits] = 1
            copies.add(host + i * cs, offset, cs)
            offset += cs
        write_offset = offset
        if len(copies.runs) >= 1024 or copies.bytes >= 64 << 20:
            copies.copy(src_fd, src_size, fd, image.path, wait=False)

    def items() -> Iterator[tuple[int, int, int]]:
        """``(first guest cluster, host offset, count)``, in guest order:
        runs of whole host clusters of the image file read as they are
        (host offset >= 0), and single clusters to be read through the
        reader (host offset -1)."""
        hole_kinds = {ExtentKind.ZERO}
        if not backing or image.backing is None:
            hole_kinds.add(ExtentKind.UNALLOCATED)
        direct = not image.encrypted
        pending: set[int] = set()   # clusters read through the reader, not yet sent
        for ext in iter_extents(image, layer, 0, size):
            if ext.kind in hole_kinds:
                continue
            first = ext.guest_offset >> cluster_bits
            last = (ext.guest_end - 1) >> cluster_bits
            whole_lo = -(-ext.guest_offset // cs)
            whole_hi = ext.guest_end >> cluster_bits
            host = ext.host_offset
            if (ext.kind is ExtentKind.DATA and direct and not ext.in_data_file
                    and host is not None and whole_lo < whole_hi):
                host += (whole_lo << cluster_bits) - ext.guest_offset
                if host + ((whole_hi - whole_lo) << cluster_bits) > src_size:
                    whole_hi = whole_lo    # past the file's end: the reader's zeros
            else:
                whole_hi = whole_lo
            if pending:   # every cluster before this extent's first is complete
                ready = sorted(c for c in pending if c < first)
                for c in ready:
                    pending.discard(c)
                    yield c, -1, 1
            pending.update(range(first, whole_lo))
            if whole_lo < whole_hi:
                assert host is not None
                yield whole_lo, host, whole_hi - whole_lo
                pending.update(range(whole_hi, last + 1))
            else:
                pending.update(range(whole_lo, last + 1))
        for c in sorted(pending):
            yield c, -1, 1

    def contents() -> Iterator[tuple[int, bytes | memoryview | None]]:
        """Compressed output: every cluster's content, in guest order (runs
        read in one ``pread`` per megabyte)."""
        step = max(1, (1 << 20) >> cluster_bits)
        for first, host, count in items():
            if host < 0:
                yield first, _cluster_bytes(reader, first, cs, size)
                continue
            for i in range(0, count, step):
                n = min(step, count - i)
                chunk = memoryview(image.pread(host + (i << cluster_bits), n << cluster_bits))
                for j in range(n):
                    yield first + i + j, chunk[j << cluster_bits:(j + 1) << cluster_bits]

    # at least 4 compressing threads, as QEMU's qcow2 driver (QCOW2_MAX_THREADS)
    pool = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) if compressor else None
    try:
        last_done = 0
        if compressor is None and overlay is None:   # plan kernel copies of runs
            for first, host, count in items():
                progress(first * cs - last_done)
                last_done = first * cs
                if host >= 0:
                    place_run(first, host, count)
                else:
                    computed = _cluster_bytes(reader, first, cs, size)
                    if not is_zero(computed):
                        store(first, computed, None)
            copies.copy(src_fd, src_size, fd, image.path)
        else:
            window: list[tuple[int, bytes | memoryview, Future[bytes] | None]] = []
            window_max = max(4, INFLIGHT_BYTES // cs)

            def flush_window() -> None:
                for guest_cluster, data, fut in window:
                    store(guest_cluster, data, fut.result() if fut is not None else None)
                window.clear()

            stream = overlay.clusters if overlay is not None else contents()
            for guest_cluster, content in stream:
                progress(guest_cluster * cs - last_done)
                last_done = guest_cluster * cs
                if content is None:          # an overlay's zero cluster
                    set_l2(guest_cluster, fmt.QCOW_OFLAG_ZERO)
                    continue
                data = content
                if overlay is None and is_zero(data):
                    continue
                fut = pool.submit(compressor, data) if pool is not None and compressor else None
                window.append((guest_cluster, data, fut))
                if len(window) >= window_max:
                    flush_window()
            flush_window()
        progress(size - last_done)
    finally:
        copies.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # Metadata after the data: L2 tables, L1, refcount blocks, refcount table
    next_cluster = (fmt.align_up(write_offset, cs)) >> cluster_bits
    l1 = array("Q", bytes(l1_size * 8))
    for l1_index in sorted(l2_tables):
        offset = next_cluster << cluster_bits
        out.write(encode_u64_table(l2_tables[l1_index]), offset)
        refcounts[next_cluster] = 1
        l1[l1_index] = fmt.QCOW_OFLAG_COPIED | offset
        next_cluster += 1
    l1_offset = next_cluster << cluster_bits
    l1_clusters = (l1_size * 8 + cs - 1) >> cluster_bits
    if l1_size:
        out.write(encode_u64_table(l1), l1_offset)
    for i in range(l1_clusters):
        refcounts[next_cluster + i] = 1
    next_cluster += l1_clusters

    reftable_offset, nb_table_clusters, end_cluster = write_fresh_refcounts(
        out.write, refcounts, next_cluster, cluster_bits)

    incompatible = 0
    compression_type = fmt.QCOW2_COMPRESSION_TYPE_ZLIB
    if compress == "zstd":
        incompatible |= fmt.QCOW2_INCOMPAT_COMPRESSION
        compression_type = fmt.QCOW2_COMPRESSION_TYPE_ZSTD
    header = Header(
        version=3, backing_file_offset=(header_bytes - len(backing_name)) if backing_name else 0,
        backing_file_size=len(backing_name), cluster_bits=cluster_bits,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=nb_table_clusters, nb_snapshots=0, snapshots_offset=0,
        incompatible_features=incompatible, compatible_features=0, autoclear_features=0,
        refcount_order=4, header_length=fmt.QCOW_HEADER_FULL_SIZE,
        compression_type=compression_type, compression_padding=bytes(7), tail=b"")
    out.write(header.to_bytes() + (header_tail or bytes(8)) + backing_name, 0)
    out.flush()
    os.ftruncate(fd, end_cluster << cluster_bits)
    return out.written + copies.copied


def _cluster_bytes(reader: DiskReader, guest_cluster: int, cs: int, size: int) -> bytes:
    start = guest_cluster * cs
    data = reader.pread(start, min(cs, size - start))
    if len(data) < cs:
        data += bytes(cs - len(data))
    return data
