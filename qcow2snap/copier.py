"""The data path: copy host runs of an image into an output file fast, with
bounded memory (image-model layer; used by extraction).

The source image is mapped read-only with ``mmap`` and host runs arrive
already coalesced by :func:`qcow2snap.reader.iter_extents`.  Runs are cut
into pieces of at most :data:`PIECE_BYTES`; inside a piece every aligned
4 KiB block of zeros is skipped, so it stays a hole in the (sparse)
destination, like qemu-img's ``-S 4k`` zero detection (the mapping makes
that check one strided gather of each block's first byte).  Everything else
goes out with ``os.copy_file_range`` from the image file, so the kernel
copies page cache to page cache (or shares extents on a reflink file
system) and no byte passes through Python; where the kernel or file system
cannot, with ``os.pwrite`` straight from a memoryview of the mapping.
Copied pages are dropped from the mapping (``MADV_DONTNEED``) so RSS stays
bounded.  ``copy_file_range`` measured ~25% faster than ``pwrite`` from the
mapping on a warm page cache (docs/performance.md).

Why not write through an mmap of the destination: writing into a freshly
truncated sparse file through a mapping takes a page fault and a zero fill
per 4 KiB page and measured ~5x slower than ``pwrite`` here; see
docs/performance.md for the numbers behind the choice.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .hostfile import descriptor_size

__all__ = ["PIECE_BYTES", "ZERO_CHECK_BYTES", "ClusterCopier", "prefer_heap_reuse"]

#: Largest single pwrite; also the unit of progress reporting.
PIECE_BYTES = 4 << 20
#: Granularity of zero detection inside data runs (qemu-img convert's -S 4k).
ZERO_CHECK_BYTES = 4 << 10
_ZEROS = bytes(PIECE_BYTES)
#: Buffers per pwritev call (the kernel's UIO_MAXIOV).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: Compressed clusters closer than this are read with one pread.
_READ_GAP = 64 << 10
#: copy_file_range errors meaning "not between these files": fall back to pwrite
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                 errno.EBADF, errno.ETXTBSY, errno.EPERM})


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


def prefer_heap_reuse() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (process-wide).

    Every decompressed cluster is a new buffer; with glibc's defaults, freed
    buffers go back to the kernel (heap trimming, per-buffer mmap above
    128 KiB) and each new one takes a page fault per 4 KiB: 250,000 faults
    and ~15% of the wall time for 1 GiB of deflate clusters here.  Keeping
    up to 32 MiB of freed heap (and serving buffers up to 4 MiB from it)
    drops that to ~5,000.  The command line calls this at start; a program
    embedding qcow2snap may, since it changes the allocator for the whole
    process.  Returns False where the C library is not glibc."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 32 << 20)) and bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20))


def is_zero(buf: memoryview | bytes) -> bool:
    """True if ``buf`` holds only zero bytes (memcmp speed)."""
    n = len(buf)
    if n == 0:
        return True
    # cheap reject on the first and last bytes before a full compare
    if buf[0] or buf[n - 1]:
        return False
    if n <= PIECE_BYTES:
        return bytes(buf) == _ZEROS[:n]
    return all(is_zero(buf[i:i + PIECE_BYTES]) for i in range(0, n, PIECE_BYTES))


class ClusterCopier:
    """Copies from the source image file into ``dst_fd`` at guest offsets.

    ``progress(n)`` is called with the number of guest bytes handled since
    the last call (holes count too, so a bar reaches 100%).
    """

    def __init__(self, src_fd: int, dst_fd: int, *, zero_granularity: int = ZERO_CHECK_BYTES,
                 progress: Callable[[int], None] | None = None, workers: int | None = None,
                 src_path: str | None = None) -> None:
        #: named in read errors, so that they are not taken for write errors
        self.src_path = src_path
        self.src_size = descriptor_size(src_fd)
        self._src_fd = src_fd
        self._copy_file_range = hasattr(os, "copy_file_range")
        self._map = (mmap.mmap(src_fd, self.src_size, prot=mmap.PROT_READ)
                     if self.src_size > 0 else None)
        if self._map is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
            with contextlib.suppress(OSError):  # advisory only
                self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self.dst_fd = dst_fd
        self.zero_granularity = zero_granularity
        self._progress = progress or (lambda n: None)
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        # one more worker than cores: while one waits for the writer lock,
        # every core still has a cluster to decompress (measured: 1.32 s
        # against 1.34-2.0 s with one per core, 1 GiB of deflate, 2 cores)
        self._workers = workers or (os.cpu_count() or 1) + 1
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[Future[int]] = deque()
        self._batch: list[tuple[int, int, int, int, int]] = []
        self._batch_bytes = 0
        self._batch_clusters = 16
        self._decompress: Callable[[bytes, int], bytes] | None = None

    # -- plain data --------------------------------------------------------

    def source_view(self, offset: int, length: int) -> memoryview:
        """Bytes of the source file; the part past EOF is cut off."""
        end = min(offset + length, self.src_size)
        if offset >= end:
            return memoryview(b"")
        return self._view[offset:end]

    def copy(self, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy a host run; aligned all-zero blocks and the part past the
        source's EOF become holes."""
        done = 0
        while done < length:
            n = min(PIECE_BYTES, length - done)
            src = src_offset + done
            avail = max(0, min(n, self.src_size - src))
            if avail:
                # in this thread: copy_file_range is bound by the kernel's
                # page-cache copy; pieces on the pool measured within 3% and
                # took 10 MiB more RSS
                self._copy_sparse(src, dst_offset + done, avail)
                self._release(src, avail)
            self._progress(n)
            done += n

    def _copy_sparse(self, src: int, dst: int, length: int) -> None:
        """Write source ``[src, src+length)`` at ``dst``, skipping every
        ``zero_granularity`` block (aligned in the destination) that is all
        zeros.

        A block can only be all zeros if its first byte is zero, so one
        strided gather of every block's first byte (C speed, one byte per
        block) finds the few candidates; only those are compared in full.
        Data without zero blocks is therefore written in a single call."""
        gran = self.zero_granularity
        view = self._view
        shift = dst - src
        end = src + length
        first = src + (-(src + shift)) % gran      # first block boundary (dst-aligned)
        if first >= end:
            self._write_range(src, end, shift)
            return
        firsts = bytes(view[first:end:gran])
        pos = src                                  # start of pending non-zero data
        hit = firsts.find(0)
        while hit >= 0:
            block = first + hit * gran
            if block + gran <= end and is_zero(view[block:block + gran]):
                if block > pos:
                    self._write_range(pos, block, shift)
                pos = block + gran
            hit = firsts.find(0, hit + 1)
        if pos < end:
            self._write_range(pos, end, shift)

    def _write_range(self, start: int, end: int, shift: int) -> None:
        """Source ``[start, end)`` to ``start + shift``: in the kernel with
        ``copy_file_range`` (page cache to page cache, or a reflink where the
        file system shares extents), else ``pwrite`` from the mapping."""
        if self._copy_file_range:
            offset = start
            try:
                while offset < end:
                    copied = os.copy_file_range(self._src_fd, self.dst_fd, end - offset,
                                                offset, offset + shift)
                    if copied <= 0:  # source shorter than it was: let pwrite say so
                        break
                    with self._lock:
                        self.bytes_written += copied
                    offset += copied
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                self._copy_file_range = False  # another file system or kernel: pwrite
            start = offset
            if start >= end:
                return
        self._pwrite_all(start + shift, self._view[start:end])

    def _release(self, offset: int, length: int) -> None:
        """Drop copied pages from this process's mapping so RSS stays
        bounded; they stay in the page cache."""
        if self._map is None or length <= 0:
            return
        start = offset & ~(mmap.PAGESIZE - 1)
        with contextlib.suppress(OSError, ValueError):  # advisory only
            self._map.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def write(self, dst_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (e.g. from a backing file), skipping zero blocks."""
        self._write_nonzero(dst_offset, memoryview(data))

    def _write_nonzero(self, dst_offset: int, piece: memoryview) -> None:
        segments: list[tuple[int, memoryview]] = []
        self._nonzero_segments(dst_offset, piece, segments)
        self._write_segments(segments)

    def _nonzero_segments(self, dst_offset: int, piece: memoryview,
                          out: list[tuple[int, memoryview]]) -> None:
        """Append ``(destination offset, view)`` for ``piece`` minus its
        all-zero blocks (aligned in the destination): the strided
        first-byte gather of :meth:`_copy_sparse`, on a buffer."""
        gran = self.zero_granularity
        n = len(piece)
        first = min((-dst_offset) % gran, n)      # first destination-aligned block
        pos = 0                                   # start of pending non-zero data
        firsts = bytes(piece[first::gran]) if first < n else b""
        hit = firsts.find(0)
        while hit >= 0:
            block = first + hit * gran
            if block + gran <= n and is_zero(piece[block:block + gran]):
                if block > pos:
                    out.append((dst_offset + pos, piece[pos:block]))
                pos = block + gran
            hit = firsts.find(0, hit + 1)
        if pos < n:
            out.append((dst_offset + pos, piece[pos:n]))

    def _write_segments(self, segments: list[tuple[int, memoryview]]) -> None:
        """Write segments, one ``pwritev`` per run of destination-contiguous
        ones: decompressed clusters go out straight from the buffers the
        decompressor returned, never assembled into a new one (every fresh
        buffer costs a page fault per 4 KiB)."""
        i = 0
        while i < len(segments):
            offset, view = segments[i]
            iov = [view]
            end = offset + len(view)
            i += 1
            while i < len(segments) and segments[i][0] == end and len(iov) < _IOV_MAX:
                iov.append(segments[i][1])
                end += len(segments[i][1])
                i += 1
            self._pwritev_all(offset, iov)

    def _pwritev_all(self, offset: int, iov: list[memoryview]) -> None:
        # One writer at a time: buffered writes to one file serialise on the
        # inode lock in the kernel anyway, where a waiting worker spins
        # (measured: 17% of all CPU); waiting here it sleeps, and the other
        # core decompresses.
        with self._write_lock:
            self._pwritev_unlocked(offset, iov)

    def _pwritev_unlocked(self, offset: int, iov: list[memoryview]) -> None:
        while iov:
            written = os.pwritev(self.dst_fd, iov, offset)
            with self._lock:
                self.bytes_written += written
            offset += written
            while iov and written >= len(iov[0]):   # drop what went out
                written -= len(iov[0])
                iov.pop(0)
            if iov and written:
                iov[0] = iov[0][written:]

    def _pwrite_all(self, offset: int, data: memoryview) -> None:
        while len(data):
            written = os.pwrite(self.dst_fd, data, offset)
            with self._lock:
                self.bytes_written += written
            offset += written
            data = data[written:]

    # -- compressed clusters (decompressed in a thread pool) ---------------
    #
    # The main thread walks the tables and batches compressed clusters; each
    # worker reads its batch's compressed bytes (one pread per run of
    # neighbouring clusters: qemu-img writes them back to back), decompresses
    # them, drops zero blocks and pwrites the rest itself (os.pread, zlib,
    # zstandard and os.pwrite all release the GIL), so every core works and
    # the main thread touches neither compressed nor decompressed data.

    def add_compressed(self, host_offset: int, compressed_length: int, dst_offset: int,
                       inner_offset: int, length: int) -> None:
        """Queue one compressed cluster stored at ``host_offset`` (at most
        ``compressed_length`` bytes): its decompressed bytes
        ``[inner_offset, inner_offset + length)`` go to ``dst_offset``."""
        self._batch.append((host_offset, compressed_length, dst_offset, inner_offset, length))
        self._batch_bytes += compressed_length
        if len(self._batch) >= self._batch_clusters:
            self._submit_batch()

    def add_computed(self, dst_offset: int, produce: Callable[[], bytes | bytearray]) -> None:
        """Queue ``produce()`` (e.g. read and decrypt a run of an encrypted
        image) to run on the pool; its bytes go to ``dst_offset``, zero
        blocks skipped.  Reading, decrypting and writing of successive runs
        then overlap, as for compressed clusters."""
        self._submit(self._run_computed, dst_offset, produce)

    def _run_computed(self, dst_offset: int, produce: Callable[[], bytes | bytearray]) -> int:
        data = produce()
        self._write_nonzero(dst_offset, memoryview(data))
        return len(data)

    def _read_source(self, offset: int, length: int) -> bytes:
        """Source bytes, zeros past EOF (as QEMU reads a compressed cluster
        whose sector count runs past the end of the file)."""
        try:
            return self._read_source_unnamed(offset, length)
        except OSError as exc:
            if exc.filename is None and self.src_path is not None:
                raise OSError(exc.errno, exc.strerror, self.src_path) from exc
            raise

    def _read_source_unnamed(self, offset: int, length: int) -> bytes:
        data = os.pread(self._src_fd, length, offset) if offset < self.src_size else b""
        while 0 < len(data) < length and offset + len(data) < self.src_size:
            more = os.pread(self._src_fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data + bytes(length - len(data)) if len(data) < length else data

    def _read_compressed(self, batch: list[tuple[int, int, int, int, int]]) -> list[bytes]:
        """The compressed bytes of every cluster of ``batch``, read with one
        pread per run of clusters at most ``_READ_GAP`` bytes apart."""
        order = sorted(range(len(batch)), key=lambda i: batch[i][0])
        out: list[bytes] = [b""] * len(batch)
        i = 0
        while i < len(order):
            start = batch[order[i]][0]
            end = start + batch[order[i]][1]
            j = i + 1
            while j < len(order) and batch[order[j]][0] <= end + _READ_GAP:
                end = max(end, batch[order[j]][0] + batch[order[j]][1])
                j += 1
            window = memoryview(self._read_source(start, end - start))
            for k in order[i:j]:
                offset, size = batch[k][0] - start, batch[k][1]
                out[k] = bytes(window[offset:offset + size])
            i = j
        return out

    def set_decompressor(self, func: Callable[[bytes, int], bytes], cluster_size: int) -> None:
        """``func(raw, host_offset)`` returns one decompressed cluster."""
        self._decompress = func
        # ~1 MiB of output per task keeps the per-task overhead negligible
        self._batch_clusters = max(1, (1 << 20) // cluster_size)

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._submit(self._run_batch, batch)

    def _submit(self, task: Callable[..., int], *args: Any) -> None:
        """Run ``task(*args)`` (which returns the guest bytes it handled) on
        the pool, with at most two tasks per worker in flight."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers,
                                            thread_name_prefix="qcow2snap-copy")
        while len(self._inflight) >= 2 * self._workers:
            self._finish_one()
        self._inflight.append(self._pool.submit(task, *args))

    def _run_batch(self, batch: list[tuple[int, int, int, int, int]]) -> int:
        """Read, decompress and write a batch; guest-contiguous clusters go
        out with one pwritev (a 64 KiB pwrite costs nearly as much as a
        1 MiB one on ext4 here: see docs/performance.md)."""
        decompress = self._decompress
        assert decompress is not None
        done = 0
        segments: list[tuple[int, memoryview]] = []
        raws = self._read_compressed(batch)
        for raw, (host_offset, _, dst_offset, inner, length) in zip(raws, batch, strict=True):
            data = decompress(raw, host_offset)
            self._nonzero_segments(dst_offset, memoryview(data)[inner:inner + length], segments)
            done += length
        self._write_segments(segments)
        return done

    def _finish_one(self) -> None:
        future = self._inflight.popleft()
        self._progress(future.result())  # re-raises CorruptImageError from the worker

    def drain(self) -> None:
        """Wait for every queued compressed cluster to be written."""
        self._submit_batch()
        while self._inflight:
            self._finish_one()

    def close(self) -> None:
        for future in self._inflight:
            future.cancel()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        # After an error (ENOSPC, EIO ...) the traceback's frames may still
        # hold slices of the mapping; closing it would then fail with a
        # BufferError that hides the real error.  The mapping is read-only:
        # leave it to the garbage collector in that case.
        try:
            self._view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass
        self._map = None
