"""Image locks: QEMU's lock bytes, and qcow2snap's editor lock built on them
(QEMU >= 2.10, ``block/file-posix.c``).

QEMU takes open-file-description (OFD) byte-range read locks on the image
file: byte ``100 + i`` for every permission it holds and ``200 + i`` for
every permission it refuses to share with others, where ``i`` is
0 consistent-read, 1 write, 2 write-unchanged, 3 resize, 4 graph-mod.

Readers only *test* the bytes (``F_OFD_GETLK``: "could I take a write lock
on this byte?"), which takes no lock, changes nothing and works on a
read-only descriptor.

An editor must never go ahead beside another writer, so testing first and
locking afterwards is not enough: two editors could both test before either
locks.  :class:`EditorLock` does what QEMU's ``raw_apply_lock_bytes`` then
``raw_check_lock_bytes`` do: it *takes* its locks first and only then looks
for conflicting holders.  Of two editors racing, whichever looks last sees
the other's locks (they were taken before the other looked), so at least one
of them refuses; both may, which is QEMU's behaviour too.

OFD locks carry no owner a test could see (``l_pid`` is -1), so an editor
also locks one byte far from QEMU's range whose *offset* says who it is:
:data:`QCOW2SNAP_EDITOR_MARKER_BASE` plus its PID.  One ``F_OFD_GETLK`` over
the whole marker range finds another editor's byte, and its offset gives the
PID, so a refusal names the real holder: another qcow2snap editor and its
process, or QEMU.  (Being an OFD lock too, the marker lives exactly as long
as the editor's descriptor, whatever else the process opens and closes.)
Within one process a registry, guarded by a thread lock, keeps a second
editor of the same file out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass

from .errors import ImageInUseError

__all__ = [
    "EDITOR_LOCK_BYTES",
    "QCOW2SNAP_EDITOR_MARKER_BASE",
    "READER_LOCK_BYTES",
    "EditorLock",
    "LockState",
    "ReaderLock",
    "probe_locks",
]

QEMU_LOCK_PERM_BASE = 100
QEMU_LOCK_SHARED_BASE = 200
QEMU_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph modification")
BLK_PERM_CONSISTENT_READ_INDEX = 0
BLK_PERM_WRITE_INDEX = 1
BLK_PERM_RESIZE_INDEX = 3

#: Editors lock byte ``QCOW2SNAP_EDITOR_MARKER_BASE + pid``: far from QEMU's
#: lock range (100-104, 200-204); the file need not be that long.
QCOW2SNAP_EDITOR_MARKER_BASE = 0x7132736E << 32     # "q2sn"
_MARKER_RANGE = 1 << 32                              # any PID

#: What an editor holds, like a QEMU writer that shares nothing important:
#: consistent read and write held, write and resize not shared.
EDITOR_LOCK_BYTES = (QEMU_LOCK_PERM_BASE + BLK_PERM_CONSISTENT_READ_INDEX,
                     QEMU_LOCK_PERM_BASE + BLK_PERM_WRITE_INDEX,
                     QEMU_LOCK_SHARED_BASE + BLK_PERM_WRITE_INDEX,
                     QEMU_LOCK_SHARED_BASE + BLK_PERM_RESIZE_INDEX)

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")
#: Looks again before a holder without a marker is called QEMU.
_RELOOKS = 3
_RELOOK_SECONDS = 0.01
#: errors meaning "this file system or kernel has no such locks"
_NO_LOCKS = frozenset({errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


@dataclass(frozen=True, slots=True)
class LockState:
    """Who else holds the image: QEMU's lock bytes, and qcow2snap editors."""

    held_permissions: frozenset[int]
    unshared_permissions: frozenset[int]
    supported: bool = True
    #: another process edits the image with qcow2snap: its PID (-1 when
    #: the lock bytes are a qcow2snap editor's but its PID is not known)
    editor_pid: int | None = None
    #: this process holds qcow2snap's editor lock on the file (through
    #: another handle): the lock bytes are its own.
    edited_by_this_process: bool = False

    @property
    def in_use(self) -> bool:
        """Another process has the image open (any lock byte held)."""
        return bool(self.held_permissions or self.unshared_permissions
                    or self.editor_pid is not None)

    @property
    def has_writer(self) -> bool:
        """Another process holds the write permission: the image may change
        under us (a running or paused VM, qemu-io, a qcow2snap editor ...)."""
        return BLK_PERM_WRITE_INDEX in self.held_permissions or self.editor_pid is not None

    @property
    def forbids_writers(self) -> bool:
        """Another process refuses to share write: editing would break it."""
        return BLK_PERM_WRITE_INDEX in self.unshared_permissions

    @property
    def holder(self) -> str:
        """Who holds the image, in words: "another qcow2snap editor
        (process 1234)" or "a running QEMU process"."""
        if self.edited_by_this_process:
            return "a qcow2snap editor in this process"
        if self.editor_pid is not None:
            pid = f" (process {self.editor_pid})" if self.editor_pid > 0 else ""
            return f"another qcow2snap editor{pid}"
        return "a running QEMU process"

    def describe(self) -> str:
        if self.editor_pid is not None or self.edited_by_this_process:
            return f"being edited by {self.holder}"
        held = ", ".join(QEMU_PERM_NAMES[i] for i in sorted(self.held_permissions))
        unshared = ", ".join(QEMU_PERM_NAMES[i] for i in sorted(self.unshared_permissions))
        parts = []
        if held:
            parts.append(f"holds {held}")
        if unshared:
            parts.append(f"does not share {unshared}")
        return "; ".join(parts) or "no QEMU locks"


def _conflict_start(fd: int, offset: int, length: int = 1) -> int | None:
    """Start of a lock another open file description holds in ``[offset,
    offset + length)`` that keeps us from write-locking it, or None."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    answer = fcntl.fcntl(fd, _F_OFD_GETLK, request)
    l_type, _, l_start, _, _ = _FLOCK.unpack(answer)
    return None if l_type == fcntl.F_UNLCK else l_start


def _set_lock(fd: int, l_type: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(l_type, os.SEEK_SET, offset, 1, 0))


def _other_editor_pid(fd: int) -> int | None:
    """PID of another qcow2snap editor of the file (the offset of its
    marker byte), or None.  Our own marker never conflicts with our own
    descriptor's test."""
    start = _conflict_start(fd, QCOW2SNAP_EDITOR_MARKER_BASE, _MARKER_RANGE)
    return None if start is None else start - QCOW2SNAP_EDITOR_MARKER_BASE


def _probe_qemu_bytes(fd: int) -> tuple[frozenset[int], frozenset[int]]:
    held: set[int] = set()
    unshared: set[int] = set()
    for i in range(len(QEMU_PERM_NAMES)):
        if _conflict_start(fd, QEMU_LOCK_PERM_BASE + i) is not None:
            held.add(i)
        if _conflict_start(fd, QEMU_LOCK_SHARED_BASE + i) is not None:
            unshared.add(i)
    return frozenset(held), frozenset(unshared)


#: Files (st_dev, st_ino) this process edits, with the thread lock that
#: makes "look up, then register" one step.
_EDITED: set[tuple[int, int]] = set()
_EDITED_LOCK = threading.Lock()


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def probe_locks(fd: int) -> LockState:
    """Test who else holds the image open on ``fd`` (which may be
    read-only).  Takes no lock.  ``supported=False`` when the platform or
    file system has no OFD locks (then nothing can be told)."""
    with _EDITED_LOCK:
        if _file_key(fd) in _EDITED:
            return LockState(frozenset(), frozenset(), edited_by_this_process=True)
    try:
        held, unshared = _probe_qemu_bytes(fd)
        editor = _other_editor_pid(fd) if held or unshared else None
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return LockState(frozenset(), frozenset(), supported=False)
        raise
    return LockState(held, unshared, editor_pid=editor)


class EditorLock:
    """qcow2snap's lock for editing one image file, held while the
    descriptor is open.

    :meth:`acquire` registers the file in this process, takes the marker
    and QEMU's lock bytes of a writer, and only then tests for other
    holders; on a conflict it gives everything back and raises
    :class:`ImageInUseError` naming the holder.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._key: tuple[int, int] | None = None
        self._marker = QCOW2SNAP_EDITOR_MARKER_BASE + os.getpid()
        #: False where the file system has no OFD locks (nothing is held)
        self.supported = True

    def acquire(self) -> LockState:
        key = _file_key(self.fd)
        with _EDITED_LOCK:
            if key in _EDITED:
                raise ImageInUseError(
                    f"{self.path} is already open for editing (mode 'r+') in this process; close "
                    f"that handle before opening another for editing")
            _EDITED.add(key)
        self._key = key
        try:
            state = self._lock_then_test()
        except BaseException:
            self.release()
            raise
        return state

    def _lock_then_test(self) -> LockState:
        fd = self.fd
        try:
            # the marker first: whoever sees our QEMU bytes sees it too
            _set_lock(fd, fcntl.F_RDLCK, self._marker)
            for offset in EDITOR_LOCK_BYTES:
                _set_lock(fd, fcntl.F_RDLCK, offset)
            # only now look: our own OFD locks never conflict with our tests
            held, unshared = _probe_qemu_bytes(fd)
            editor = _other_editor_pid(fd) if held or unshared else None
            for _ in range(_RELOOKS):
                if not (held or unshared) or editor is not None:
                    break
                # Lock bytes but no marker: QEMU, or an editor that was
                # letting go of its locks as we looked.  We still hold ours,
                # so looking again is as safe as the first look; a QEMU stays.
                time.sleep(_RELOOK_SECONDS)
                held, unshared = _probe_qemu_bytes(fd)
                editor = _other_editor_pid(fd) if held or unshared else None
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                self.supported = False
                return LockState(frozenset(), frozenset(), supported=False)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                # a write lock on a byte QEMU only read-locks: not QEMU's
                raise ImageInUseError(
                    f"{self.path} is locked by another program (a write lock on QEMU's "
                    f"lock bytes); close it before editing") from exc
            raise
        state = LockState(held, unshared, editor_pid=editor)
        if state.editor_pid is not None:
            raise ImageInUseError(
                f"{self.path} is being edited by {state.holder}; wait for it to finish, "
                f"then try again")
        if state.in_use:
            raise ImageInUseError(
                f"{self.path} is in use by {state.holder} ({state.describe()}); shut the VM "
                f"down (or close the qemu-img/qemu-io holding it) before editing")
        return state

    def release(self) -> None:
        """Give the locks back (call before the descriptor is closed), then
        forget the file: in this order, an editor opened in between still
        sees this one by its registry entry, never by bare lock bytes."""
        try:
            for offset in (*EDITOR_LOCK_BYTES, self._marker):
                _set_lock(self.fd, fcntl.F_UNLCK, offset)
        except OSError:
            pass  # closing the descriptor releases them anyway
        if self._key is not None:
            with _EDITED_LOCK:
                _EDITED.discard(self._key)
            self._key = None


#: What a long-lived reader holds, like ``qemu-img`` reading an image: the
#: consistent-read permission held, write not shared (a QEMU that wants to
#: write the image refuses to start meanwhile).
READER_LOCK_BYTES = (QEMU_LOCK_PERM_BASE + BLK_PERM_CONSISTENT_READ_INDEX,
                     QEMU_LOCK_SHARED_BASE + BLK_PERM_WRITE_INDEX)


class ReaderLock:
    """QEMU's lock bytes of a reader (:data:`READER_LOCK_BYTES`), taken on a
    read-only descriptor for as long as it is open (``qemu-img`` without
    ``-U`` does the same).  With ``share_write`` (reading beside a writer,
    forced) only the consistent-read byte is taken."""

    def __init__(self, fd: int, *, share_write: bool = False) -> None:
        self.fd = fd
        self.offsets = READER_LOCK_BYTES[:1] if share_write else READER_LOCK_BYTES
        #: False where the file system has no OFD locks (nothing is held)
        self.supported = True

    def acquire(self) -> None:
        try:
            for offset in self.offsets:
                _set_lock(self.fd, fcntl.F_RDLCK, offset)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                self.supported = False
                return
            self.release()
            raise

    def release(self) -> None:
        try:
            for offset in self.offsets:
                _set_lock(self.fd, fcntl.F_UNLCK, offset)
        except OSError:
            pass  # closing the descriptor releases them anyway
