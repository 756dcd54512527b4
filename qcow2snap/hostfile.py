"""Host files (image-model layer): opening evidence without side effects,
sizing regular files and block devices, and the rule that decides which
companion files (backing files, external data files) an image may pull in.

An image is attacker-controlled, and so are the file names it holds.  Two
promises rest on this module:

* **Reading has no side effects.**  Every file qcow2snap reads (the image,
  its backing files, its data file) is opened ``O_RDONLY | O_NOATIME``
  (``O_NOATIME`` needs ownership or CAP_FOWNER; without it the open falls
  back to plain ``O_RDONLY``) and ``O_NONBLOCK``, so a FIFO or a terminal
  cannot make the open wait; anything but a regular file or a block device
  is refused before a byte is read.
* **An image reaches only what the user allowed.**  A companion file named
  *by the image* is followed only if its real path (symlinks resolved) lies
  in the directory of the image the user opened, in one of its
  subdirectories, or under a directory the user allowed
  (:class:`CompanionPolicy`).  A path the user gave explicitly
  (``backing_file=``/``--backing-file``, ``data_file=``/``--data-file``) is
  always followed: the user named it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import CompanionRefusedError

__all__ = ["CompanionPolicy", "HostFile", "descriptor_size", "file_kind", "open_read_only",
           "open_read_write"]

_O_NOATIME = getattr(os, "O_NOATIME", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def file_kind(mode: int) -> str:
    """What a file is, in words (for refusals)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def open_read_only(path: str) -> int:
    """Open ``path`` for reading without touching its atime where permitted,
    without blocking on a FIFO, and only if it is a regular file or a block
    device.

    Raises ``IsADirectoryError`` for a directory and ``OSError(EINVAL, "not
    a regular file or block device (a FIFO)")`` for other kinds, with the
    path as ``filename``."""
    flags = os.O_RDONLY | os.O_CLOEXEC | _O_NONBLOCK
    if _O_NOATIME:
        try:
            fd = os.open(path, flags | _O_NOATIME)
        except PermissionError:
            fd = os.open(path, flags)  # O_NOATIME needs ownership; fall back
    else:  # pragma: no cover - Linux has O_NOATIME
        fd = os.open(path, flags)
    return _only_files(fd, path)


def open_read_write(path: str) -> int:
    """Open an image for editing: like :func:`open_read_only`, read-write."""
    return _only_files(os.open(path, os.O_RDWR | os.O_CLOEXEC | _O_NONBLOCK), path)


def _only_files(fd: int, path: str) -> int:
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL,
                          f"not a regular file or block device ({file_kind(mode)})", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def descriptor_size(fd: int) -> int:
    """Size in bytes of a regular file or a block device (whose ``st_size``
    is 0: its size is where ``SEEK_END`` lands)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class HostFile:
    """Positional reads over an open descriptor of a regular file or block
    device; reads past the end return zeros, as QEMU's file driver does."""

    __slots__ = ("_owned", "fd", "is_block_device", "path", "size")

    def __init__(self, fd: int, path: str, owned: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        self.size = descriptor_size(fd)
        self._owned = owned

    @classmethod
    def open(cls, path: str) -> HostFile:
        """:func:`open_read_only`, wrapped."""
        return cls(open_read_only(path), path)

    def refresh_size(self) -> None:
        self.size = descriptor_size(self.fd)

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; an OSError names this file (an EIO
        on the evidence must not read as a problem of the output)."""
        try:
            return self._pread(offset, length)
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, self.path) from exc
            raise

    def pread_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``offset`` (zeros past EOF), read
        straight into it; errors as :meth:`pread`."""
        n = len(out)
        done = 0
        try:
            while done < n and offset < self.size:   # as _pread: zeros from size on
                got = os.preadv(self.fd, [out[done:]], offset + done)
                if not got:
                    break
                done += got
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, self.path) from exc
            raise
        if done < n:
            fill_zeros(out[done:])

    def _pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if offset >= self.size:
            return bytes(length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # short read at EOF: keep reading in case of a partial read, then pad
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
            data += bytes(length - len(data))
        return data

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): the same file under any name."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def _within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # pragma: no cover - different drives (not on POSIX)
        return False


@dataclass(frozen=True, slots=True)
class CompanionPolicy:
    """Which directories companion files named by an image may come from.

    ``allowed_dirs`` are real paths (symlinks resolved).  Build one with
    :meth:`for_image` for the image the user opened; backing images share
    their top image's policy, so a chain cannot walk out of the allowed
    places one link at a time.
    """

    image_dirs: tuple[str, ...]
    extra_dirs: tuple[str, ...] = ()

    @property
    def allowed_dirs(self) -> tuple[str, ...]:
        return self.image_dirs + self.extra_dirs

    @classmethod
    def for_image(cls, image_path: str, allow_dirs: Iterable[str | os.PathLike[str]] = ()
                  ) -> CompanionPolicy:
        """The image's own directory (both the one it was named in and the
        one it really lies in, when a symlink leads there) plus
        ``allow_dirs``."""
        named_dir = os.path.realpath(os.path.dirname(os.path.abspath(image_path)))
        real_dir = os.path.dirname(os.path.realpath(image_path))
        image_dirs = (named_dir,) if real_dir == named_dir else (named_dir, real_dir)
        extra = tuple(dict.fromkeys(os.path.realpath(os.fspath(a)) for a in allow_dirs))
        return cls(image_dirs, extra)

    def with_extra_dirs(self, allow_dirs: Iterable[str | os.PathLike[str]]) -> CompanionPolicy:
        extra = tuple(dict.fromkeys([*self.extra_dirs,
                                     *(os.path.realpath(os.fspath(a)) for a in allow_dirs)]))
        return CompanionPolicy(self.image_dirs, extra)

    def allows(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(_within(real, d) for d in self.allowed_dirs)

    def check(self, *, owner: str, kind: str, named: str, path: str, option: str,
              api_option: str) -> str:
        """Return the real path of companion ``path`` (named ``named`` in
        image ``owner``) if the policy allows it, else raise
        :class:`CompanionRefusedError` saying how to allow it."""
        real = os.path.realpath(path)
        if any(_within(real, d) for d in self.allowed_dirs):
            return real
        where = " or ".join(self.image_dirs)
        also = " and the allowed directories" if self.extra_dirs else ""
        resolved = f" (resolved: {real})" if real != named else ""
        raise CompanionRefusedError(
            f"{owner}: {kind} {named!r}{resolved} is outside the image's directory {where}"
            f"{also}: not followed; if it is meant, give it with {option} {real} or allow its "
            f"directory with --allow-dir {os.path.dirname(real)} (API: {api_option}=, "
            f"allow_dirs=)", kind=kind, path=real, named=named)


_ZEROS = memoryview(bytes(1 << 20))


def fill_zeros(out: memoryview) -> None:
    """Zero ``out`` without allocating its size."""
    pos, n = 0, len(out)
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        out[pos:pos + step] = _ZEROS[:step]
        pos += step
