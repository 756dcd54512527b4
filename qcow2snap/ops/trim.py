"""Trim (operations layer): ``qcow2snap trim IMAGE`` gives the free clusters
of an image back to the file system, in place.

QEMU frees clusters (snapshot deletion, overwrites of compressed data,
discards) but punches them only when the image is opened with
``discard=unmap``; images edited without it keep the bytes of clusters
whose refcount is 0.  Trim punches those clusters
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``) and truncates the free clusters
after the last cluster in use.

A cluster is given back only when both say it is free: its refcount in the
image is 0, and a full check (:class:`~qcow2snap.ops.check.Checker`, QEMU's
``qcow2_check_refcounts``) finds no live structure that references it
(nor data QEMU reads that the check does not count).  The check runs first
and trim refuses (:class:`~qcow2snap.errors.ImageNeedsRepairError`) an
image that is dirty or corrupt, whose check finds corruptions or errors
(a cluster in use whose refcount is 0 would be destroyed by punching it),
or leaks (leaked clusters are not free: ``check --repair leaks`` frees
them first, and the message says how many bytes that would give back).

Crash safety: trim writes no metadata.  The clusters it punches or cuts
off are free in the image as it is and stays, so the image reads the same
at every instant; a crash anywhere leaves the old image with some of its
free clusters already given back.  The refcount blocks may describe
clusters past the new end of the file: their refcounts are 0, which
``qemu-img check`` accepts (QEMU itself truncates so after discards).  The
last cluster in use, and so every header and refcount structure, stays.
The holes and the new size are flushed (``fdatasync``) at the end.

Clusters that are already holes (``SEEK_HOLE``) are not punched again and
do not count as given back.  Block devices are refused: a device has no
end to truncate, and punching one is a discard whose effect (zeroes,
unmapped thin-provisioned space, or nothing) depends on the device, so no
space could be promised or measured (``st_blocks`` of a device is 0).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ImageNeedsRepairError, UnsupportedImageError
from ..image import Qcow2Image
from .check import Checker
from .check_report import Progress
from .metadata_io import FileIO, MetadataIO

__all__ = ["TrimResult", "trim_image"]


@dataclass
class TrimResult:
    """What a trim did (or, for a dry run, would do)."""

    filename: str
    dry_run: bool
    cluster_size: int
    #: clusters inside the file that are free (refcount 0, unreferenced)
    free_clusters: int
    file_size_before: int
    file_size_after: int
    #: (offset, length) ranges punched (or to punch): the data parts of free clusters
    punched: list[tuple[int, int]]
    #: bytes of data in free clusters inside the file, to be punched
    planned_punch_bytes: int
    #: bytes of data in the free clusters after the last cluster in use
    planned_truncate_bytes: int
    #: bytes of free clusters that are holes already
    already_holes_bytes: int
    #: allocated bytes of the file (st_blocks * 512) before and after
    allocated_before: int
    allocated_after: int

    @property
    def planned_bytes(self) -> int:
        """Bytes the plan gives back (data in free clusters)."""
        return self.planned_punch_bytes + self.planned_truncate_bytes

    @property
    def given_back(self) -> int:
        """Bytes the file system got back (st_blocks before minus after); 0
        for a dry run."""
        return max(0, self.allocated_before - self.allocated_after)


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def data_ranges(fd: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[lo, hi)`` that hold data (not holes), by
    ``SEEK_DATA``/``SEEK_HOLE``; all of it where the file system cannot
    tell."""
    pos = lo
    while pos < hi:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # no data after pos
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, hi
                return
            raise
        if start >= hi:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = hi
        end = min(end, hi)
        if end <= start:  # pragma: no cover - a file system bug; do not loop
            end = hi
        yield start, end
        pos = end


def trim_image(path: str | os.PathLike[str], *, dry_run: bool = False,
               progress: Progress | None = None, io: MetadataIO | None = None
               ) -> TrimResult:
    """Punch the free clusters of the image at ``path`` and truncate its free
    tail; see the module docstring.  Opened for writing with the editor
    lock (refused with :class:`~qcow2snap.errors.ImageInUseError` while
    another editor or a running QEMU holds it), read-only for ``dry_run``.
    ``io`` replaces the file I/O (tests record through it)."""
    image = Qcow2Image(path, "r" if dry_run else "r+", check_mode=True)
    try:
        return _trim(image, dry_run, progress, io)
    finally:
        image.close()


def _refuse_unless_consistent(image: Qcow2Image, checker: Checker) -> None:
    report = checker.report
    if image.dirty:
        raise ImageNeedsRepairError(
            f"{image.path}: the dirty bit is set (refcounts may be stale): run "
            f"'qcow2snap check --repair all' or 'qemu-img check -r all' first")
    if image.corrupt:
        raise ImageNeedsRepairError(
            f"{image.path}: the corrupt bit is set: run 'qcow2snap check --repair all' or "
            f"'qemu-img check -r all' first")
    if report.corruptions or report.check_errors or checker.rebuild_reasons:
        raise ImageNeedsRepairError(
            f"{image.path}: the check found {report.corruptions} corruption(s) and "
            f"{report.check_errors} error(s); a cluster in use could look free: run "
            f"'qcow2snap check --repair all' first (trim only gives back clusters of a "
            f"consistent image)")
    if report.leaks:
        disk, ref = checker.disk, checker.ref
        cs = image.cluster_size
        end = image.file_size
        freed = 0
        for c in range(min(len(disk), len(ref))):
            if disk[c] and not ref[c] and c not in checker.unreferenced_data:
                freed += max(0, min(cs, end - (c << image.cluster_bits)))
        raise ImageNeedsRepairError(
            f"{image.path}: the check found {report.leaks} leaked cluster(s): leaked clusters "
            f"are not free; run 'qcow2snap check --repair leaks' first (it frees {freed} "
            f"bytes for trim to give back)")


def _trim(image: Qcow2Image, dry_run: bool, progress: Progress | None,
          io: MetadataIO | None) -> TrimResult:
    if image._file.is_block_device:
        raise UnsupportedImageError(
            f"{image.path}: trim gives space back to a file system; a block device has no "
            f"end to truncate and what a discard does to it depends on the device",
            feature="trim of a block device")
    checker = Checker(image, progress=progress)
    checker.run()
    _refuse_unless_consistent(image, checker)
    fd = image._file.fd
    cs, bits = image.cluster_size, image.cluster_bits
    size = image.file_size
    file_clusters = (size + cs - 1) >> bits
    disk, ref = checker.disk, checker.ref
    keep = checker.unreferenced_data

    def in_use(c: int) -> bool:
        return ((c < len(disk) and disk[c] != 0) or (c < len(ref) and ref[c] != 0)
                or c in keep or c == 0)

    last = 0          # the last cluster in use (the header's at least)
    for c in range(max(len(disk), len(ref)) - 1, 0, -1):
        if in_use(c):
            last = c
            break
    last = max([last, *keep])
    new_end = min(size, (last + 1) << bits)
    free_runs: list[tuple[int, int]] = []      # (first cluster, count) inside [0, new_end)
    free = 0
    for c in range(1, file_clusters):
        if in_use(c):
            continue
        free += 1
        if (c << bits) >= new_end:
            continue
        if free_runs and free_runs[-1][0] + free_runs[-1][1] == c:
            free_runs[-1] = (free_runs[-1][0], free_runs[-1][1] + 1)
        else:
            free_runs.append((c, 1))
    punched: list[tuple[int, int]] = []
    free_bytes = 0
    for first, count in free_runs:
        lo, hi = first << bits, min(new_end, (first + count) << bits)
        free_bytes += hi - lo
        for start, stop in data_ranges(fd, lo, hi):
            punched.append((start, stop - start))
    tail_data = sum(stop - start for start, stop in data_ranges(fd, new_end, size))
    punch_bytes = sum(length for _, length in punched)
    result = TrimResult(
        filename=image.path, dry_run=dry_run, cluster_size=cs, free_clusters=free,
        file_size_before=size, file_size_after=new_end, punched=punched,
        planned_punch_bytes=punch_bytes, planned_truncate_bytes=tail_data,
        already_holes_bytes=(free_bytes - punch_bytes) + (size - new_end - tail_data),
        allocated_before=_allocated(fd), allocated_after=_allocated(fd))
    if dry_run:
        return result
    if not punched and new_end >= size:
        return result
    out = io or FileIO(fd)
    for offset, length in punched:
        out.punch_hole(offset, length)
    if new_end < size:
        out.truncate(new_end)
    out.fsync()
    result.allocated_after = _allocated(fd)
    return result
