"""A read-only file tree over a VM's images, and the FUSE mount serving it.

:class:`MountTree` is the file system without FUSE: one directory per
snapshot (``<id>-<name>``, made safe for a path) and ``active/`` for the
active layer, each holding the guest disk of every image as a raw file
(``disk.raw`` for one image, ``<image stem>.raw`` for several) and, for
snapshots with a saved VM state, ``vmstate.bin``, the guest memory as
``memory.raw``, ``memory.elf`` and ``memory.lime`` and ``info.json``.  Its
files answer ``read(offset, length)``, ``seek_data`` and ``seek_hole``
from any number of threads at once (the reader is thread-safe).

The memory files are made on first use (their size is not known before the
VM state is parsed): :func:`~qcow2snap.ops.memory.export_memory` writes
them, sparse, into a private temporary directory removed at unmount.

:func:`serve_fuse` puts the tree behind FUSE with ``mfusepy`` (the
``qcow2snap[mount]`` extra, imported here only): libfuse 3's ``lseek``
reports the holes, so ``cp --sparse`` and sparse-aware tools skip them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import ImageInUseError, MountError, Qcow2Error
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import DiskReader
from .inspection import SnapshotFacts, snapshot_facts
from .memory import export_memory

__all__ = ["ACTIVE_DIR", "MountFile", "MountTree", "check_mountpoint", "lock_images",
           "safe_name", "serve_fuse"]

#: The active layer's directory (snapshot directories always hold a '-').
ACTIVE_DIR = "active"
_NAME_MAX = 255
#: fuse_main's status when its loop ended by a signal (libfuse 3 fuse_main_real:
#: the loop's error, the signal number, becomes 8); mount failures give 1-7
_LOOP_ENDED_BY_SIGNAL = 8
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")

#: info.json's bytes for a snapshot: one image's facts, or several images'
#: facts by disk file name (the CLI renders them as ``list --json`` does)
InfoRenderer = Callable[[list[tuple[str, SnapshotFacts]]], bytes]


def safe_name(text: str) -> str:
    """``text`` as one path component: '/', backslash and control
    characters become '_', at most 255 bytes."""
    name = _UNSAFE.sub("_", text)
    while len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        name = name[:-1]
    return name


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name~2``, ``name~3`` ... when taken (a visible
    suffix: two snapshots never share a directory)."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        suffix = f"~{n}"
        candidate = safe_name(name[:_NAME_MAX - len(suffix)]) + suffix
    taken.add(candidate)
    return candidate


class MountFile(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def seek_data(self, offset: int) -> int | None: ...
    def seek_hole(self, offset: int) -> int: ...


class DiskFile:
    """A layer's guest disk, or a snapshot's VM state (holes from the
    layer's metadata)."""

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.size = reader.size

    def read(self, offset: int, length: int) -> bytes:
        return self.reader.pread(offset, length)

    def read_into(self, offset: int, out: memoryview) -> int:
        """Fill ``out`` from ``offset`` (clipped to the size): bytes read."""
        if offset >= self.size:
            return 0
        n = min(len(out), self.size - offset)
        self.reader.read_at(offset, out[:n])
        return n

    def seek_data(self, offset: int) -> int | None:
        return self.reader.seek_data(offset)

    def seek_hole(self, offset: int) -> int:
        return self.reader.seek_hole(offset)


class BytesFile:
    """A small file held in memory (info.json)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def seek_data(self, offset: int) -> int | None:
        return offset if offset < self.size else None

    def seek_hole(self, offset: int) -> int:
        return max(offset, self.size)


class MemoryFile:
    """Guest memory in one format, exported into ``workdir`` on first use
    (once, whichever thread asks first); its holes are the export's."""

    def __init__(self, image: Qcow2Image, snapshot: Snapshot,
                 fmt: Literal["raw", "elf", "lime"], workdir: Callable[[], str]) -> None:
        self._image = image
        self._snapshot = snapshot
        self._format = fmt
        self._workdir = workdir
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._error: str | None = None

    def _ready(self) -> int | None:
        if self._fd is None and self._error is None:
            with self._lock:
                if self._fd is None and self._error is None:
                    path = os.path.join(self._workdir(),
                                        f"{self._image.cache_token}-{self._snapshot.id}"
                                        f"-{id(self)}.{self._format}")
                    try:
                        export_memory(self._image, self._snapshot, path, format=self._format,
                                      overwrite=True)
                        self._fd = os.open(path, os.O_RDONLY)
                    except (Qcow2Error, OSError) as exc:
                        self._error = str(exc)
                        print(f"qcow2snap: warning: memory.{self._format} of snapshot "
                              f"{self._snapshot.id}: {self._error}", file=sys.stderr)
        return self._fd

    @property
    def size(self) -> int:
        fd = self._ready()
        return 0 if fd is None else os.fstat(fd).st_size

    def check(self) -> None:
        """Raise EIO when the memory cannot be exported (open fails)."""
        if self._ready() is None:
            raise OSError(errno.EIO, self._error or "memory export failed")

    def read(self, offset: int, length: int) -> bytes:
        fd = self._ready()
        return b"" if fd is None else os.pread(fd, length, offset)

    def seek_data(self, offset: int) -> int | None:
        fd = self._ready()
        if fd is None:
            return None
        try:
            return os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise

    def seek_hole(self, offset: int) -> int:
        fd = self._ready()
        return offset if fd is None else os.lseek(fd, offset, os.SEEK_HOLE)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Dir:
    entries: dict[str, Any] = field(default_factory=dict)


class MountTree:
    """The tree: ``lookup(path)`` gives a directory's entry names or a file.

    ``images`` are (file name, open image) pairs, one per disk of the VM;
    with several, snapshots are matched by (ID, name) and each directory
    holds the disks that have that snapshot.
    """

    def __init__(self, images: Sequence[tuple[str, Qcow2Image]],
                 info: InfoRenderer) -> None:
        self.images = list(images)
        self._tmp: str | None = None
        self._tmp_lock = threading.Lock()
        self._memory: list[MemoryFile] = []
        self.root = _Dir()
        single = len(self.images) == 1
        disk_names = self._disk_names([p for p, _ in self.images], single)
        active = _Dir()
        for (_, img), disk in zip(self.images, disk_names, strict=True):
            active.entries[disk] = DiskFile(img.open_disk(None))
        self.root.entries[ACTIVE_DIR] = active
        # snapshot directories, in the order of the first image's table
        by_key: dict[tuple[bytes, bytes], list[tuple[str, Qcow2Image, SnapshotFacts]]] = {}
        for (_, img), disk in zip(self.images, disk_names, strict=True):
            for facts in snapshot_facts(img):
                sn = facts.snapshot
                by_key.setdefault((sn.id_bytes, sn.name_bytes), []).append((disk, img, facts))
        taken = {ACTIVE_DIR}
        for members in by_key.values():
            sn = members[0][2].snapshot
            name = _unique(safe_name(f"{sn.id}-{sn.name}"), taken)
            folder = _Dir()
            with_state = [m for m in members if m[2].snapshot.has_vm_state]
            for disk, img, facts in members:
                folder.entries[disk] = DiskFile(img.open_disk(facts.snapshot))
            for disk, img, facts in with_state:
                prefix = "" if len(with_state) == 1 else disk.removesuffix(".raw") + "."
                folder.entries[prefix + "vmstate.bin"] = DiskFile(
                    img.open_vm_state(facts.snapshot))
                for fmt in ("raw", "elf", "lime"):
                    mem = MemoryFile(img, facts.snapshot, fmt, self._workdir)
                    self._memory.append(mem)
                    folder.entries[f"{prefix}memory.{fmt}"] = mem
            folder.entries["info.json"] = BytesFile(
                info([(disk, facts) for disk, _, facts in members]))
            self.root.entries[name] = folder
        self.mtime = time.time()

    @staticmethod
    def _disk_names(paths: list[str], single: bool) -> list[str]:
        if single:
            return ["disk.raw"]
        taken = {"info.json", "vmstate.bin"}
        names = []
        for path in paths:
            stem = os.path.basename(path)
            for ext in (".qcow2", ".qcow", ".img"):
                if stem.endswith(ext) and len(stem) > len(ext):
                    stem = stem[:-len(ext)]
                    break
            names.append(_unique(safe_name(stem + ".raw"), taken))
        return names

    def _workdir(self) -> str:
        with self._tmp_lock:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="qcow2snap-mount-")
            return self._tmp

    def lookup(self, path: str) -> _Dir | MountFile | None:
        node: Any = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, _Dir):
                return None
            node = node.entries.get(part)
            if node is None:
                return None
        return node

    def close(self) -> None:
        """Remove the memory exports."""
        for mem in self._memory:
            mem.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def lock_images(images: Sequence[Qcow2Image], *, force: bool) -> list[str]:
    """Refuse an image a running QEMU (or an editor) writes unless
    ``force``; take QEMU's reader lock bytes on each image.  Returns the
    warnings to show (forced past a writer)."""
    warnings_: list[str] = []
    for img in images:
        state = img.lock_state
        writer = state is not None and state.has_writer
        if writer and not force:
            assert state is not None
            raise ImageInUseError(
                f"{img.path}: {state.holder} holds this image open for writing "
                f"({state.describe()}); shut the VM down first, or mount anyway with --force "
                f"(what is read may then be inconsistent)")
        if writer:
            assert state is not None
            warnings_.append(f"{img.path}: {state.holder} holds this image open for writing; "
                             f"what is read through the mount may be inconsistent")
        img.hold_reader_lock(share_write=writer)
    return warnings_


def check_mountpoint(mountpoint: str) -> None:
    """One-line errors, before any work: the mountpoint, the FUSE device,
    fusermount3 (not root), the binding and libfuse 3."""
    if not os.path.exists(mountpoint):
        raise MountError(f"mountpoint {mountpoint} does not exist; create it (mkdir -p "
                         f"{mountpoint})")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory; give an empty directory")
    try:
        entries = os.listdir(mountpoint)
    except PermissionError:
        raise MountError(f"no permission to read mountpoint {mountpoint}; use a directory "
                         f"you own") from None
    if entries:
        raise MountError(f"mountpoint {mountpoint} is not empty; give an empty directory "
                         f"(is something already mounted there? fusermount3 -u {mountpoint})")
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing; load the fuse module "
                         "(modprobe fuse), or give a container --device /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("no permission to use /dev/fuse; add yourself to the group that "
                         "owns it, or run as root")
    if os.geteuid() != 0:
        if not os.access(mountpoint, os.W_OK | os.X_OK):
            raise MountError(f"no permission to mount on {mountpoint}; use a directory you "
                             f"own")
        if shutil.which("fusermount3") is None:
            raise MountError("fusermount3 is missing; install it (Debian: apt-get install "
                             "fuse3)")
    _load_binding()


def _load_binding() -> Any:
    import importlib
    try:
        mfusepy = importlib.import_module("mfusepy")   # untyped: Any
    except ImportError:
        raise MountError("mounting needs the mount extra: pip install 'qcow2snap[mount]'"
                         ) from None
    except OSError as exc:   # the module loads libfuse when imported
        raise MountError(f"libfuse 3 cannot be loaded ({exc}); install it (Debian: apt-get "
                         f"install fuse3)") from None
    if getattr(mfusepy, "fuse_version_major", 3) != 3:
        raise MountError("mounting needs libfuse 3 (its lseek reports holes); install it "
                         "(Debian: apt-get install fuse3)")
    return mfusepy


#: Readahead asked of the kernel for the mount (its default, 128 KiB, makes
#: a sequential reader's requests 128 KiB each: several times slower)
READAHEAD_KB = 1024


def _finish_start(mountpoint: str, ready_fd: int | None,
                  kib: int = READAHEAD_KB) -> None:
    """Once the kernel has taken libfuse's INIT reply: set the mount's own
    readahead (its backing device info in sysfs; root only, best effort:
    where it cannot be set, reads are just smaller), then, for
    ``--background``, tell the waiting parent the mount is ready
    (:func:`_fork_to_background`).  Nothing here keeps a file in the mount
    open: an unmount right after the command returns must not find the
    mount busy."""
    path = os.path.abspath(mountpoint)
    try:
        before = os.stat(os.path.dirname(path)).st_dev
        deadline = time.monotonic() + 10
        while (dev := os.stat(path).st_dev) == before:   # not mounted yet
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        # FUSE_STATFS waits for the kernel to take libfuse's INIT reply,
        # which lowers the readahead to what that reply allows: set it after
        os.statvfs(path)
        if os.geteuid() == 0:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb",
                      "w") as f:
                f.write(str(kib))
    except OSError:
        pass
    finally:
        if ready_fd is not None:
            _detach(ready_fd)


def _fork_to_background() -> int:
    """``--background``: fork; the parent waits until the child's mount is
    ready (``_finish_start`` writes one byte to the pipe) and exits 0, or
    exits with the child's status when the child fails first (its message
    is already on stderr).  Returns the pipe's write end, in the child.

    Not libfuse's own fork: its parent returns before the kernel has the
    INIT reply, so the readahead was set after the command returned, while
    the user's ``fusermount3 -u`` could find the mount busy."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        said = os.read(read_fd, 1)
        if said == b"1":
            os._exit(0)   # not exit(): the child owns the images, locks and temp files
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_fd)
    os.setsid()
    return write_fd


def _detach(ready_fd: int) -> None:
    """The background child is serving: release the parent, leave the
    terminal and the working directory (as a daemon does)."""
    try:
        os.write(ready_fd, b"1")
    finally:
        os.close(ready_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


@contextmanager
def _as_eio(path: str | None) -> Iterator[None]:
    """A damaged image read through the mount: EIO for the reader, one line
    on the mount's stderr (never a traceback)."""
    try:
        yield
    except Qcow2Error as exc:
        print(f"qcow2snap: error: {path}: {' '.join(str(exc).split())}", file=sys.stderr)
        raise OSError(errno.EIO, str(exc)) from None


class _Operations:
    """The FUSE callbacks (paths in, errno out), over a :class:`MountTree`."""

    use_ns = True

    def __init__(self, tree: MountTree, mountpoint: str = "",
                 ready_fd: int | None = None) -> None:
        self.tree = tree
        self.mountpoint = mountpoint
        self.ready_fd = ready_fd
        self.uid, self.gid = os.getuid(), os.getgid()
        self._files: dict[int, Any] = {}
        self._next = 1
        self._lock = threading.Lock()

    def _node(self, path: str) -> Any:
        node = self.tree.lookup(path)
        if node is None:
            raise OSError(errno.ENOENT, path)
        return node

    def init(self, path: str) -> None:
        """The mount is up (libfuse is answering the kernel's INIT): raise
        its readahead and release a ``--background`` parent once the kernel
        has taken the answer."""
        if self.mountpoint and (os.geteuid() == 0 or self.ready_fd is not None):
            threading.Thread(target=_finish_start, args=(self.mountpoint, self.ready_fd),
                             daemon=True).start()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path)
        when = int(self.tree.mtime * 1e9)
        common = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": when,
                  "st_mtime": when, "st_ctime": when}
        if isinstance(node, _Dir):
            return {**common, "st_mode": stat.S_IFDIR | 0o555,
                    "st_nlink": 2 + sum(isinstance(e, _Dir) for e in node.entries.values())}
        size = node.size
        return {**common, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": 1 << 20}

    def readdir(self, path: str, fh: int) -> list[str]:
        node = self._node(path)
        if not isinstance(node, _Dir):
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *node.entries]

    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if isinstance(node, _Dir):
            raise OSError(errno.EISDIR, path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, path)
        if isinstance(node, MemoryFile):
            node.check()
        with self._lock:
            fh = self._next
            self._next += 1
            self._files[fh] = node
        return fh

    def file_of(self, path: str | None, fh: int) -> Any:
        node = self._files.get(fh)
        if node is None:
            node = self._node(path or "")
        return node

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with _as_eio(path):
            data: bytes = self.file_of(path, fh).read(offset, size)
        return data

    def lseek(self, path: str | None, offset: int, whence: int, fh: int) -> int:
        with _as_eio(path):
            return self._lseek(path, offset, whence, fh)

    def _lseek(self, path: str | None, offset: int, whence: int, fh: int) -> int:
        node = self.file_of(path, fh)
        if whence == os.SEEK_DATA:
            if offset >= node.size:
                raise OSError(errno.ENXIO, "past the end")
            found = node.seek_data(offset)
            if found is None:
                raise OSError(errno.ENXIO, "no data after the offset")
            return int(found)
        if whence == os.SEEK_HOLE:
            if offset >= node.size:
                raise OSError(errno.ENXIO, "past the end")
            return int(node.seek_hole(offset))
        if whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            # the kernel handles these itself; answer plainly if asked
            return offset + (node.size if whence == os.SEEK_END else 0)
        raise OSError(errno.EINVAL, "whence")

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            self._files.pop(fh, None)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": _NAME_MAX}


def serve_fuse(tree: MountTree, mountpoint: str, *, background: bool = False,
               debug: bool = False, direct_io: bool = False) -> None:
    """Mount ``tree`` read-only at ``mountpoint`` and serve it until it is
    unmounted (``fusermount3 -u``) or the process gets SIGINT, SIGTERM or
    SIGHUP (libfuse unmounts then).  ``background``: fork into the
    background; the caller's process exits 0 once the mount is ready and
    its readahead set, or with the serving process's status if it fails.
    ``direct_io``: the disk files bypass the kernel's page cache (faster
    big sequential reads; no shared mmap, nothing cached between reads)."""
    check_mountpoint(mountpoint)
    mfusepy = _load_binding()
    mountpoint = os.path.abspath(mountpoint)   # the background child leaves the cwd
    ready_fd = _fork_to_background() if background else None

    base: Any = mfusepy.FUSE

    class _FUSE(base):
        """mfusepy with libfuse 3's lseek and reads straight into FUSE's
        buffer."""

        def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
            name = None if path is None else path.decode(self.encoding, self.errors)
            return int(self.operations.lseek(name, offset, whence, fip.contents.fh))

        def open(self, path: bytes, fip: Any) -> int:
            result: int = super().open(path, fip)
            if direct_io and isinstance(self.operations.file_of(None, fip.contents.fh),
                                        DiskFile):
                fip.contents.direct_io = 1   # each read() straight to us, no page cache
            return result

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            import ctypes
            name = None if path is None else path.decode(self.encoding, self.errors)
            node = self.operations.file_of(name, fip.contents.fh)
            if isinstance(node, DiskFile):
                view = memoryview((ctypes.c_char * size).from_address(
                    ctypes.cast(buf, ctypes.c_void_p).value or 0)).cast("B")
                with _as_eio(name):
                    return node.read_into(offset, view)
            result: int = super().read(path, buf, size, offset, fip)
            return result

    # libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers (unmount and
    # return) only over the default ones; Python's would never run while
    # the main thread waits inside libfuse
    import signal
    saved = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            saved[signum] = signal.signal(signum, signal.SIG_DFL)
    try:
        # max_idle_threads given: libfuse 3.14 complains about its default
        _FUSE(_Operations(tree, mountpoint, ready_fd), mountpoint,
              foreground=True, debug=debug, nothreads=False, ro=True,
              fsname="qcow2snap", subtype="qcow2snap", default_permissions=True,
              max_idle_threads=10)
    except RuntimeError as exc:
        if exc.args == (_LOOP_ENDED_BY_SIGNAL,):
            return      # SIGINT/SIGTERM/SIGHUP: libfuse unmounted, as asked
        raise MountError(f"FUSE could not mount {mountpoint} (libfuse said {exc}; its "
                         f"message is above)") from None
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        tree.close()
