"""The file operations a metadata commit uses (operations layer).

:class:`~.transaction.Transaction`, and the repairs and trim that write
through it or beside it, touch the image file only through a
:class:`MetadataIO`: positioned writes, ``fdatasync``, truncation and hole
punching.  :class:`FileIO` does them on a file descriptor; tests pass
their own to record the exact sequence of writes and fsyncs and to replay
a power loss at every cut point (``tests/crashsim.py``).
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

__all__ = ["FileIO", "MetadataIO", "punch_hole"]


class MetadataIO(Protocol):
    """What the transaction needs from the image file."""

    def pwrite(self, data: bytes, offset: int) -> None: ...
    def fsync(self) -> None: ...
    def truncate(self, length: int) -> None: ...
    def punch_hole(self, offset: int, length: int) -> None: ...


class FileIO:
    """:class:`MetadataIO` over a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def fsync(self) -> None:
        os.fdatasync(self.fd)  # data and the file size; mtime need not be durable

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def punch_hole(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)


_FALLOCATE = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); skipped where
    the file system cannot (space is then not returned, but nothing is
    wrong); any other failure (EIO) raises, for the caller to report."""
    global _FALLOCATE
    if _FALLOCATE is None:
        import ctypes
        # the C library the interpreter already links (ctypes.util's search
        # for it costs more than the whole punch)
        _FALLOCATE = ctypes.CDLL(None, use_errno=True).fallocate
        _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    if _FALLOCATE(fd, falloc_fl_punch_hole | falloc_fl_keep_size, offset, length) != 0:
        import ctypes
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):  # "cannot here" is not a failure
            raise OSError(err, os.strerror(err))
