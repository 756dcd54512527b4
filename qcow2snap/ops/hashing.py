"""Digests of snapshots (operations layer): ``qcow2snap hash``.

For each selected layer (a snapshot or the active layer) the digest of its
guest disk, i.e. of exactly the bytes ``qemu-img convert -l
snapshot.id=ID -O raw`` writes for a snapshot of the current size: the
snapshot's own ``disk_size`` bytes, read through the backing chain as QEMU
does.  For a snapshot with a saved VM state, the digest of that stream too
(the bytes ``vmstate dump`` writes).  Optionally the digest of the image
file itself.

How it is fast without holding the disk in memory:

- :func:`reader.iter_extents` gives the runs of each layer; zero and
  unallocated ranges (without a backing file, or past its end) are fed to
  the hash from one shared zero buffer, never read;
- data runs are read with large ``pread`` calls, compressed clusters are
  read and inflated, all in worker threads (``os.pread``, zlib/ISA-L, zstd
  and ``hashlib`` release the GIL), a bounded window ahead of the hash;
- independent streams (each snapshot's disk, each VM state, the file) are
  hashed in parallel, up to ``os.cpu_count()`` at once.

The caller's thread only waits: it reports progress and, on Ctrl-C, stops
the workers before the exception goes on.  The image is only read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from ..image import Qcow2Image
from ..image import open as open_image
from ..model import Snapshot
from ..reader import (
    DecryptedSource,
    DiskReader,
    Extent,
    ExtentKind,
    GuestDisk,
    MappedImage,
    decompress_cluster,
    iter_extents,
)

__all__ = ["ALGORITHMS", "HashReport", "LayerDigest", "hash_image"]

ProgressCallback = Callable[[int, int], None]

#: The digests offered (``hashlib`` names; blake2b is its 64-byte default,
#: as ``b2sum`` gives).
ALGORITHMS = ("sha256", "sha1", "md5", "sha512", "blake2b")

#: The one zero buffer: zero runs are fed to the hash in slices of it.
_ZEROS = bytes(1 << 20)
#: Bytes of one data read: under the 4 MiB mmap threshold the CLI sets
#: (copier.prefer_heap_reuse), so read buffers come from the reused heap
#: instead of a fresh, page-faulted mmap each (8 MiB reads spent 0.8 s of
#: system time per 4 GiB; 2 MiB reads 0.17 s)
READ_CHUNK_BYTES = 2 << 20
#: Bytes read or inflated ahead of one stream's hash.
WINDOW_BYTES = 64 << 20
#: Pieces queued ahead of one stream's hash (zero pieces cost no memory,
#: but a list of them must stay bounded too).
WINDOW_PIECES = 4096
#: How often (seconds) the waiting thread reports progress.
PROGRESS_INTERVAL = 0.2


@dataclass(frozen=True, slots=True)
class LayerDigest:
    """The digests of one layer: a snapshot, or the active layer
    (``snapshot`` is None)."""

    snapshot: Snapshot | None
    disk_size: int
    disk_digest: str
    #: bytes of the saved VM state (0: disk-only, or the active layer)
    vm_state_size: int = 0
    #: digest of the VM-state stream (None: there is none)
    vm_state_digest: str | None = None


@dataclass(frozen=True, slots=True)
class HashReport:
    """What :func:`hash_image` computed."""

    path: str
    algorithm: str
    file_size: int
    #: digest of the image file itself (None unless asked for)
    image_digest: str | None
    layers: tuple[LayerDigest, ...]


class _Cancelled(Exception):
    """Another stream failed or the caller was interrupted."""


# A piece of a stream, in order: ("zero", n) | ("read", source, offset, n) |
# ("inflate", image, extent, n); a source is anything with pread.
_Piece = tuple[Any, ...]


def _read(source: Any, offset: int, length: int) -> bytes:
    data: bytes = source.pread(offset, length)
    return data


def _inflate(image: MappedImage, ext: Extent) -> memoryview:
    assert ext.host_offset is not None
    raw = image.pread(ext.host_offset, ext.compressed_length)
    cluster = decompress_cluster(raw, image.header.effective_compression_type,
                                 image.cluster_size, ext.host_offset)
    inner = ext.guest_offset - ext.cluster_guest_offset
    return memoryview(cluster)[inner:inner + ext.length]


class _Backings:
    """Each image's backing disk, opened once (under a lock: streams of
    one image run in several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._disks: dict[int, GuestDisk | None] = {}

    def below(self, image: MappedImage) -> GuestDisk | None:
        with self._lock:
            key = id(image)
            if key not in self._disks:
                self._disks[key] = image.backing_disk()
            return self._disks[key]


def _pieces(image: MappedImage, start: int, length: int, layer: Any, *, backing: bool,
            backings: _Backings) -> Iterator[_Piece]:
    """The pieces of guest range ``[start, start + length)`` of ``layer``,
    in order.  Unallocated runs descend into the backing chain with an
    explicit stack (a chain may be thousands of images deep)."""
    stack: list[tuple[MappedImage | None, Iterator[Extent]]] = [
        (image, iter_extents(image, layer, start, length))]
    while stack:
        img, extents = stack[-1]
        ext = next(extents, None)
        if ext is None:
            stack.pop()
            continue
        kind = ext.kind
        if img is None or kind is ExtentKind.ZERO:
            yield ("zero", ext.length)
        elif kind is ExtentKind.DATA:
            assert ext.host_offset is not None
            source: Any = img.data_file() if ext.in_data_file else img
            if img.encrypted:   # decrypted as read (the key is unlocked once)
                cipher = img.data_cipher()
                assert cipher is not None
                source = DecryptedSource(cipher, source, ext.guest_offset - ext.host_offset)
            done = 0
            while done < ext.length:
                n = min(READ_CHUNK_BYTES, ext.length - done)
                yield ("read", source, ext.host_offset + done, n)
                done += n
        elif kind is ExtentKind.COMPRESSED:
            yield ("inflate", img, ext, ext.length)
        else:  # UNALLOCATED: the backing file, zeros past its end or without one
            below = backings.below(img) if (backing or len(stack) > 1) else None
            inside = 0 if below is None else max(0, min(ext.length,
                                                        below.size - ext.guest_offset))
            if inside < ext.length:   # after the part inside the backing file
                tail = Extent(ext.guest_offset + inside, ext.length - inside, ExtentKind.ZERO)
                stack.append((None, iter((tail,))))
            if inside:
                assert below is not None
                if isinstance(below, DiskReader):
                    stack.append((below.image,
                                  iter_extents(below.image, below.layer, ext.guest_offset,
                                               inside)))
                else:   # a raw backing file
                    done = 0
                    while done < inside:
                        n = min(READ_CHUNK_BYTES, inside - done)
                        yield ("read", below, ext.guest_offset + done, n)
                        done += n


class _Stream:
    """One digest to compute: a sequence of pieces into one hash."""

    def __init__(self, pieces: Iterable[_Piece], total: int, algorithm: str) -> None:
        self.pieces = pieces
        self.total = total
        self.algorithm = algorithm
        self.done = 0
        self.digest: str | None = None

    def run(self, pool: ThreadPoolExecutor, cancel: threading.Event) -> None:
        h = hashlib.new(self.algorithm)
        window: deque[tuple[int, Future[Any] | None]] = deque()
        ahead = 0

        def feed_one() -> None:
            nonlocal ahead
            n, fut = window.popleft()
            if fut is None:
                zeros = memoryview(_ZEROS)
                while n:
                    step = min(n, len(zeros))
                    h.update(zeros[:step])
                    n -= step
                    self.done += step
                    if cancel.is_set():
                        raise _Cancelled
            else:
                data = fut.result()
                if len(data) != n:  # pragma: no cover - the reader's contract
                    raise AssertionError(f"short piece: {len(data)} of {n} bytes")
                h.update(data)
                ahead -= n
                self.done += n

        for piece in self.pieces:
            if cancel.is_set():
                raise _Cancelled
            what, n = piece[0], piece[-1]
            if what == "zero":
                window.append((n, None))
            else:
                fut = (pool.submit(_read, piece[1], piece[2], n) if what == "read"
                       else pool.submit(_inflate, piece[1], piece[2]))
                window.append((n, fut))
                ahead += n
            while window and (ahead > WINDOW_BYTES or len(window) > WINDOW_PIECES):
                feed_one()
        while window:
            feed_one()
        self.digest = h.hexdigest()


def _file_pieces(image: Qcow2Image) -> Iterator[_Piece]:
    size = image.file_size
    for offset in range(0, size, READ_CHUNK_BYTES):
        yield ("read", image, offset, min(READ_CHUNK_BYTES, size - offset))


def hash_image(image: Qcow2Image | str | os.PathLike[str],
               snapshots: Iterable[str | Snapshot | None] | None = None, *,
               algorithm: str = "sha256", include_image: bool = False,
               by: Literal["id", "name"] | None = None, backing: bool = True,
               progress: ProgressCallback | None = None) -> HashReport:
    """Digests of snapshots' disks and VM states, and of the active layer.

    ``snapshots``: references (ID or name, matched as
    :meth:`Qcow2Image.find_snapshot` does with ``by``), :class:`Snapshot`
    objects, or ``None`` for the active layer; by default every snapshot and
    then the active layer.  ``algorithm`` is one of :data:`ALGORITHMS`.
    ``include_image`` also hashes the image file as it is on disk.
    ``backing=False`` reads unallocated clusters as zeros.

    ``progress(done, total)`` is called from the calling thread with bytes
    hashed of all streams.  A path is opened read-only and closed again.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    if not isinstance(image, Qcow2Image):
        with open_image(image) as opened:
            return hash_image(opened, snapshots, algorithm=algorithm,
                              include_image=include_image, by=by, backing=backing,
                              progress=progress)
    refs: list[str | Snapshot | None] = (
        [*image.snapshots, None] if snapshots is None else list(snapshots))
    backings = _Backings()
    if image.has_data_file:
        image.data_file()   # opened here, not raced for by the workers
    planned: list[tuple[Snapshot | None, int, _Stream, _Stream | None]] = []
    for ref in refs:
        sn = None if ref is None else image.find_snapshot(ref, by=by)
        disk = DiskReader(image, image.layer(sn))   # refuses what cannot be read
        disk_stream = _Stream(_pieces(image, 0, disk.size, disk.layer, backing=backing,
                                      backings=backings), disk.size, algorithm)
        vm_stream = None
        if sn is not None and sn.has_vm_state:
            vm = image.open_vm_state(sn)
            vm_stream = _Stream(_pieces(image, image.vm_state_offset(sn), vm.size, vm.layer,
                                        backing=False, backings=backings), vm.size, algorithm)
        planned.append((sn, disk.size, disk_stream, vm_stream))
    file_stream = (_Stream(_file_pieces(image), image.file_size, algorithm)
                   if include_image else None)
    streams = [s for _, _, d, v in planned for s in (d, v) if s is not None]
    if file_stream is not None:
        streams.append(file_stream)
    _run_streams(streams, progress)
    layers = tuple(
        LayerDigest(sn, size, d.digest or "", 0 if v is None else v.total,
                    None if v is None else v.digest)
        for sn, size, d, v in planned)
    return HashReport(image.path, algorithm, image.file_size,
                      None if file_stream is None else file_stream.digest, layers)


def _run_streams(streams: list[_Stream], progress: ProgressCallback | None) -> None:
    """Hash ``streams`` in parallel; report progress from this thread; on
    an error or an interrupt, stop every stream before raising."""
    total = sum(s.total for s in streams)
    if progress:
        progress(0, total)
    if not streams:
        return
    workers = max(1, os.cpu_count() or 1)
    cancel = threading.Event()
    # two pools: a stream waits on its pieces, so they must not share workers
    io_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash-io")
    stream_pool = ThreadPoolExecutor(max_workers=min(workers, len(streams)),
                                     thread_name_prefix="hash")
    try:
        # the largest first: the parallel streams finish closer together
        order = sorted(streams, key=lambda s: -s.total)
        futures = [stream_pool.submit(s.run, io_pool, cancel) for s in order]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=PROGRESS_INTERVAL, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
            if progress:
                progress(min(sum(s.done for s in streams), total), total)
    except BaseException:
        cancel.set()
        raise
    finally:
        stream_pool.shutdown(wait=True, cancel_futures=True)
        io_pool.shutdown(wait=True, cancel_futures=True)
