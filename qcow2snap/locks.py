"""Detect QEMU's image locks (QEMU >= 2.10, ``block/file-posix.c``).

QEMU takes open-file-description (OFD) byte-range read locks on the image
file: byte ``100 + i`` for every permission it holds and ``200 + i`` for
every permission it refuses to share with others, where ``i`` is
0 consistent-read, 1 write, 2 write-unchanged, 3 resize, 4 graph-mod.
We only *test* for locks with ``F_OFD_GETLK`` (asking "could I take a write
lock on this byte?"); testing takes no lock, changes nothing and works on a
read-only descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

QEMU_LOCK_PERM_BASE = 100
QEMU_LOCK_SHARED_BASE = 200
QEMU_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph modification")
BLK_PERM_WRITE_INDEX = 1

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")


@dataclass(frozen=True, slots=True)
class LockState:
    """Which QEMU lock bytes another process holds on the image."""

    held_permissions: frozenset[int]
    unshared_permissions: frozenset[int]
    supported: bool = True
    #: this process holds qcow2snap's editor locks on the file (through
    #: another handle): the lock bytes are its own, and since they refuse
    #: writers to QEMU, no QEMU writer can hold the image besides.
    edited_by_this_process: bool = False

    @property
    def in_use(self) -> bool:
        """Some QEMU process has the image open (any lock byte held)."""
        return bool(self.held_permissions or self.unshared_permissions)

    @property
    def has_writer(self) -> bool:
        """A QEMU process holds the write permission: the image may change
        under us (a running or paused VM, qemu-io, qemu-img commit ...)."""
        return BLK_PERM_WRITE_INDEX in self.held_permissions

    @property
    def forbids_writers(self) -> bool:
        """A QEMU process refuses to share write: editing would break it."""
        return BLK_PERM_WRITE_INDEX in self.unshared_permissions

    def describe(self) -> str:
        held = ", ".join(QEMU_PERM_NAMES[i] for i in sorted(self.held_permissions))
        unshared = ", ".join(QEMU_PERM_NAMES[i] for i in sorted(self.unshared_permissions))
        parts = []
        if held:
            parts.append(f"holds {held}")
        if unshared:
            parts.append(f"does not share {unshared}")
        return "; ".join(parts) or "no QEMU locks"


def _byte_locked(fd: int, offset: int) -> bool:
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    answer = fcntl.fcntl(fd, _F_OFD_GETLK, request)
    l_type = _FLOCK.unpack(answer)[0]
    return l_type != fcntl.F_UNLCK


#: Files (st_dev, st_ino) on which this process holds editor locks, with the
#: number of handles holding them.  OFD locks carry no owner a test could
#: see (l_pid is -1), so without this a second handle would take our own
#: locks for a running QEMU.
_EDITOR_LOCKED: dict[tuple[int, int], int] = {}


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def probe_qemu_locks(fd: int) -> LockState:
    """Test QEMU's lock bytes on ``fd``.  Returns ``supported=False`` when the
    platform or file system has no OFD locks (then nothing can be told)."""
    if _EDITOR_LOCKED.get(_file_key(fd)):
        return LockState(frozenset(), frozenset(), edited_by_this_process=True)
    held: set[int] = set()
    unshared: set[int] = set()
    try:
        for i in range(len(QEMU_PERM_NAMES)):
            if _byte_locked(fd, QEMU_LOCK_PERM_BASE + i):
                held.add(i)
            if _byte_locked(fd, QEMU_LOCK_SHARED_BASE + i):
                unshared.add(i)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return LockState(frozenset(), frozenset(), supported=False)
        raise
    return LockState(frozenset(held), frozenset(unshared))


#: What an offline editor holds, like a QEMU writer that shares nothing
#: important: consistent read and write held, write and resize not shared.
EDITOR_LOCK_BYTES = (QEMU_LOCK_PERM_BASE + 0, QEMU_LOCK_PERM_BASE + 1,
                     QEMU_LOCK_SHARED_BASE + 1, QEMU_LOCK_SHARED_BASE + 3)


def take_editor_locks(fd: int) -> bool:
    """Take QEMU-style shared OFD locks on ``fd`` (opened read-write) so that
    a QEMU started while we edit sees the image as in use and refuses to
    write it.  Returns False where OFD locks are unavailable.  The locks go
    away when ``fd`` is closed."""
    try:
        for offset in EDITOR_LOCK_BYTES:
            request = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0)
            fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37), request)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    key = _file_key(fd)
    _EDITOR_LOCKED[key] = _EDITOR_LOCKED.get(key, 0) + 1
    return True


def release_editor_locks(fd: int) -> None:
    """Forget the editor locks of ``fd`` just before it is closed (closing
    releases the locks themselves)."""
    key = _file_key(fd)
    count = _EDITOR_LOCKED.get(key, 0) - 1
    if count > 0:
        _EDITOR_LOCKED[key] = count
    else:
        _EDITOR_LOCKED.pop(key, None)
