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

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from collections.abc import Callable

__all__ = ["ClusterCopier", "PIECE_BYTES", "ZERO_CHECK_BYTES"]

#: Largest single pwrite; also the unit of progress reporting.
PIECE_BYTES = 4 << 20
#: Granularity of zero detection inside data runs (qemu-img convert's -S 4k).
ZERO_CHECK_BYTES = 4 << 10
_ZEROS = bytes(PIECE_BYTES)
#: copy_file_range errors meaning "not between these files": fall back to pwrite
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                 errno.EBADF, errno.ETXTBSY, errno.EPERM})


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
                 progress: Callable[[int], None] | None = None, workers: int | None = None) -> None:
        self.src_size = os.fstat(src_fd).st_size
        self._src_fd = src_fd
        self._copy_file_range = hasattr(os, "copy_file_range")
        self._map = (mmap.mmap(src_fd, 0, prot=mmap.PROT_READ)
                     if self.src_size > 0 else None)
        if self._map is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
            try:
                self._map.madvise(mmap.MADV_SEQUENTIAL)
            except OSError:  # pragma: no cover - advisory only
                pass
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self.dst_fd = dst_fd
        self.zero_granularity = zero_granularity
        self._progress = progress or (lambda n: None)
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._workers = workers or max(1, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[Future[int]] = deque()
        self._batch: list[tuple[bytes, int, int, int, int]] = []
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
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):  # pragma: no cover - advisory only
            pass

    def write(self, dst_offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` (e.g. from a backing file), skipping zero blocks."""
        self._write_nonzero(dst_offset, memoryview(data))

    def _write_nonzero(self, dst_offset: int, piece: memoryview) -> None:
        gran = self.zero_granularity
        n = len(piece)
        # blocks aligned in the destination
        start = 0
        head = (-dst_offset) % gran
        if head and not is_zero(piece[:min(head, n)]):
            self._pwrite_all(dst_offset, piece[:min(head, n)])
        start = min(head, n)
        while start < n:
            while start < n and is_zero(piece[start:start + gran]):
                start += gran
            if start >= n:
                break
            end = start + gran
            while end < n and not is_zero(piece[end:end + gran]):
                end += gran
            end = min(end, n)
            self._pwrite_all(dst_offset + start, piece[start:end])
            start = end

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
    # worker decompresses its batch, drops zero blocks and pwrites the rest
    # itself (zlib, zstandard and os.pwrite all release the GIL), so every
    # core works and the main thread never touches decompressed data.

    def add_compressed(self, raw: bytes, host_offset: int, dst_offset: int, inner_offset: int,
                       length: int) -> None:
        """Queue one compressed cluster: its decompressed bytes
        ``[inner_offset, inner_offset + length)`` go to ``dst_offset``."""
        self._batch.append((raw, host_offset, dst_offset, inner_offset, length))
        self._batch_bytes += len(raw)
        if len(self._batch) >= self._batch_clusters:
            self._submit_batch()

    def set_decompressor(self, func: Callable[[bytes, int], bytes], cluster_size: int) -> None:
        """``func(raw, host_offset)`` returns one decompressed cluster."""
        self._decompress = func
        # ~1 MiB of output per task keeps the per-task overhead negligible
        self._batch_clusters = max(1, (1 << 20) // cluster_size)

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers,
                                            thread_name_prefix="qcow2snap-inflate")
        while len(self._inflight) >= 2 * self._workers:
            self._finish_one()
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._inflight.append(self._pool.submit(self._run_batch, batch))

    def _run_batch(self, batch: list[tuple[bytes, int, int, int, int]]) -> int:
        """Decompress a batch; guest-contiguous clusters are assembled and
        written with one pwrite (a 64 KiB pwrite costs nearly as much as a
        1 MiB one on ext4 here: see docs/performance.md)."""
        decompress = self._decompress
        assert decompress is not None
        done = 0
        run = bytearray()
        run_start = -1
        for raw, host_offset, dst_offset, inner, length in batch:
            data = decompress(raw, host_offset)
            if run_start < 0 or dst_offset != run_start + len(run):
                if run:
                    self._write_nonzero(run_start, memoryview(run))
                run = bytearray()
                run_start = dst_offset
            run += memoryview(data)[inner:inner + length]
            done += length
        if run:
            self._write_nonzero(run_start, memoryview(run))
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
        self._view.release()
        if self._map is not None:
            self._map.close()
            self._map = None
