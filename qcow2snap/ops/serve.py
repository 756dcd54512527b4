"""Serving a layer's guest disk read-only over NBD, through nbdkit.

The NBD server is the real one, nbdkit, with its Python plugin: no NBD
protocol is written here.  :func:`serve` starts ``nbdkit --foreground
--readonly ... python PLUGIN image=... snapshot-id=...`` with the package
importable inside nbdkit's embedded interpreter (``PYTHONPATH`` from this
interpreter's ``sys.path``), forwards SIGINT/SIGTERM/SIGHUP to it and waits.
The plugin, :mod:`qcow2snap.ops.nbdkit_plugin`, is a thin shell over
:class:`Export` (open the layer, ``pread``, block status).

A passphrase never appears on nbdkit's command line: it is handed over in
an anonymous memory file (``memfd``) that nbdkit inherits as a descriptor
(``passphrase-fd=N``); the plugin reads and closes it.

Thread safety (why the plugin declares ``THREAD_MODEL_PARALLEL``): host
reads are ``os.pread`` (no shared file position); the L1/L2/decompressed
caches are :class:`~qcow2snap.cache.BoundedCache`, which locks; zstd
contexts are per thread; the lazily opened companions (backing images,
their ciphers, data files) are opened once in :meth:`Export.open`, before
nbdkit starts serving, so no request races to open them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import NbdServerError
from ..image import Qcow2Image, RawImage
from ..image import open as open_image
from ..reader import DiskReader, Extent, ExtentKind, Layer, iter_extents

__all__ = ["EXTENT_HOLE", "EXTENT_ZERO", "Export", "ServeOptions", "block_status",
           "nbdkit_command", "plugin_path", "serve"]

#: nbdkit's extent flags (``NBDKIT_EXTENT_HOLE`` / ``NBDKIT_EXTENT_ZERO``,
#: the NBD protocol's ``NBD_STATE_HOLE`` / ``NBD_STATE_ZERO``)
EXTENT_HOLE = 1
EXTENT_ZERO = 2
#: At most this many extents per block-status reply: the client asks again
#: for the rest (a hostile image can make any range as fragmented as it likes).
MAX_EXTENTS = 4096
#: How long nbdkit may take to stop after the signal is forwarded.
STOP_TIMEOUT = 30.0

INSTALL_HINT = "install nbdkit and its Python plugin (Debian: apt-get install nbdkit " \
               "nbdkit-plugin-python)"


def plugin_path() -> str:
    """The plugin script nbdkit's Python plugin loads."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdkit_plugin.py")


# ---------------------------------------------------------------------------
# inside nbdkit: the export
# ---------------------------------------------------------------------------

def block_status(image: Qcow2Image, layer: Layer, offset: int, length: int, *,
                 limit: int = MAX_EXTENTS) -> list[tuple[int, int, int]]:
    """NBD block status of ``[offset, offset + length)`` of ``layer``:
    ``(offset, length, flags)`` runs in order from ``offset``, adjacent runs
    of equal flags merged, at most ``limit`` of them (a prefix of the range
    then).  Flags: 0 data (normal, compressed and encrypted clusters, a raw
    backing file's bytes), :data:`EXTENT_ZERO` (zero clusters, at any depth
    of the backing chain), ``EXTENT_HOLE | EXTENT_ZERO`` (unallocated down
    the whole chain, or past a backing file's end).  A hole or zero is never
    reported over bytes that may be non-zero."""
    out: list[tuple[int, int, int]] = []

    def emit(start: int, size: int, flags: int) -> None:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == start:
            prev = out.pop()
            out.append((prev[0], prev[1] + size, flags))
        else:
            out.append((start, size, flags))

    # a stack of (image, its runs), the backing chain walked without recursion
    stack: list[tuple[Qcow2Image | None, Iterator[Extent]]] = [
        (image, iter_extents(image, layer, offset, length))]
    while stack:
        node, runs = stack[-1]
        ext = next(runs, None)
        if ext is None:
            stack.pop()
            continue
        kind = ext.kind
        if kind in (ExtentKind.DATA, ExtentKind.COMPRESSED):
            emit(ext.guest_offset, ext.length, 0)
        elif kind is ExtentKind.ZERO:
            emit(ext.guest_offset, ext.length, EXTENT_ZERO)
        elif node is None:   # a hole stands for itself
            emit(ext.guest_offset, ext.length, EXTENT_HOLE | EXTENT_ZERO)
        else:
            below = node.backing
            below_size = 0 if below is None else below.size
            inside = max(0, min(ext.length, below_size - ext.guest_offset))
            if inside < ext.length:   # no backing file or past its end: zeros
                stack.append((None, iter([Extent(ext.guest_offset + inside,
                                                 ext.length - inside,
                                                 ExtentKind.UNALLOCATED)])))
            if inside:
                if isinstance(below, RawImage):
                    stack.append((None, iter([Extent(ext.guest_offset, inside,
                                                     ExtentKind.DATA)])))
                else:
                    assert below is not None
                    stack.append((below, iter_extents(below, below.layer(None),
                                                      ext.guest_offset, inside)))
        if len(out) > limit:
            del out[limit:]
            break
    return out


@dataclass
class Export:
    """One layer's disk, opened read-only for nbdkit (:meth:`open` once,
    before serving; then :meth:`pread` and :meth:`extents` from any thread)."""

    image_path: str
    snapshot_id: str | None = None        #: ``None``: the active layer
    backing_file: str | None = None
    no_backing: bool = False
    data_file: str | None = None
    allow_dirs: list[str] = field(default_factory=list)
    passphrase: bytes | None = None
    kdf_iteration_limit: int | None = None
    check_locks: bool = True
    image: Qcow2Image | None = None
    disk: DiskReader | None = None

    def config(self, key: str, value: str) -> None:
        """One ``key=value`` of nbdkit's command line."""
        if key == "image":
            self.image_path = value
        elif key == "snapshot-id":
            self.snapshot_id = value
        elif key == "backing-file":
            self.backing_file = value
        elif key == "no-backing":
            self.no_backing = value in ("1", "yes", "true")
        elif key == "data-file":
            self.data_file = value
        elif key == "allow-dir":
            self.allow_dirs.append(value)
        elif key == "passphrase-fd":
            fd = int(value)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
                self.passphrase = b"".join(chunks)
            finally:
                os.close(fd)
        elif key == "kdf-iteration-limit":
            self.kdf_iteration_limit = int(value)
        elif key == "check-locks":
            self.check_locks = value in ("1", "yes", "true")
        else:
            raise ValueError(f"unknown parameter {key!r}")

    def open(self) -> None:
        """Open the image and the layer; open every companion now (backing
        images, their ciphers, data files) so that requests only read."""
        if not self.image_path:
            raise ValueError("image= is required")
        options: dict[str, Any] = {}
        if self.kdf_iteration_limit is not None:
            options["kdf_iteration_limit"] = self.kdf_iteration_limit
        image = open_image(self.image_path,
                           backing_file=False if self.no_backing else self.backing_file,
                           data_file=self.data_file, allow_dirs=self.allow_dirs,
                           passphrase=self.passphrase, check_locks=self.check_locks,
                           **options)
        try:
            sn = None if self.snapshot_id is None else image.find_snapshot(self.snapshot_id,
                                                                           by="id")
            disk = image.open_disk(sn)
            for node in image.chain():   # opens the whole backing chain
                if isinstance(node, Qcow2Image):
                    node.data_cipher()
                    if node.has_data_file:
                        node.data_file()
        except BaseException:
            image.close()
            raise
        self.image, self.disk = image, disk

    @property
    def size(self) -> int:
        assert self.disk is not None
        return self.disk.size

    def pread(self, buf: bytearray, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (inside the disk)."""
        assert self.disk is not None
        self.disk.read_at(offset, memoryview(buf))

    def extents(self, count: int, offset: int, one: bool = False) -> list[tuple[int, int, int]]:
        assert self.image is not None and self.disk is not None
        count = max(0, min(count, self.disk.size - offset))
        return block_status(self.image, self.disk.layer, offset, count,
                            limit=1 if one else MAX_EXTENTS)

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = self.disk = None


# ---------------------------------------------------------------------------
# outside: starting nbdkit
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeOptions:
    """What ``qcow2snap serve`` hands to the plugin."""

    image: str
    snapshot_id: str | None = None        #: ``None``: the active layer
    socket: str | None = None
    port: int | None = None
    bind: str | None = None
    backing_file: str | None = None
    no_backing: bool = False
    data_file: str | None = None
    allow_dirs: Sequence[str] = ()
    kdf_iteration_limit: int | None = None
    threads: int | None = None


def find_nbdkit() -> str:
    """nbdkit's path, checked to have its Python plugin; else
    :class:`NbdServerError` saying what to install."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdServerError(f"nbdkit is not installed: {INSTALL_HINT}")
    try:
        probe = subprocess.run([nbdkit, "python", "--dump-plugin"], capture_output=True,
                               text=True, timeout=60, check=False)
    except OSError as exc:
        raise NbdServerError(f"cannot run {nbdkit}: {exc.strerror or exc}; {INSTALL_HINT}"
                             ) from exc
    if probe.returncode != 0:
        raise NbdServerError(f"nbdkit's Python plugin is not installed: {INSTALL_HINT}")
    return nbdkit


def _python_path() -> str:
    """PYTHONPATH for nbdkit's embedded interpreter: this package's parent
    directory, then this interpreter's ``sys.path`` (its dependencies, a
    virtual environment's site-packages), then any PYTHONPATH already set."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../qcow2snap
    entries = [os.path.dirname(package_dir)]
    entries += [os.path.abspath(p) for p in sys.path if p and os.path.exists(p)]
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    seen: dict[str, None] = dict.fromkeys(entries)
    return os.pathsep.join(seen)


def nbdkit_command(nbdkit: str, options: ServeOptions, *,
                   passphrase_fd: int | None = None) -> list[str]:
    """nbdkit's argument list (no secret in it)."""
    argv = [nbdkit, "--foreground", "--readonly", "--exit-with-parent"]
    if options.socket is not None:
        argv += ["--unix", os.path.abspath(options.socket)]
    else:
        if options.port is None:
            raise ValueError("a socket or a port is needed")
        argv += ["--port", str(options.port)]
        if options.bind:
            argv += ["--ipaddr", options.bind]
    if options.threads is not None:
        argv += ["--threads", str(options.threads)]
    argv += ["python", plugin_path(), f"image={os.path.abspath(options.image)}",
             "check-locks=0"]   # serve checked them and warned already
    if options.snapshot_id is not None:
        argv.append(f"snapshot-id={options.snapshot_id}")
    if options.no_backing:
        argv.append("no-backing=1")
    elif options.backing_file is not None:
        argv.append(f"backing-file={os.path.abspath(options.backing_file)}")
    if options.data_file is not None:
        argv.append(f"data-file={os.path.abspath(options.data_file)}")
    argv += [f"allow-dir={os.path.abspath(d)}" for d in options.allow_dirs]
    if options.kdf_iteration_limit is not None:
        argv.append(f"kdf-iteration-limit={options.kdf_iteration_limit}")
    if passphrase_fd is not None:
        argv.append(f"passphrase-fd={passphrase_fd}")
    return argv


def _secret_fd(passphrase: bytes) -> int:
    """An anonymous in-memory file holding ``passphrase``, at offset 0."""
    fd = os.memfd_create("qcow2snap-passphrase", os.MFD_CLOEXEC)
    try:
        view = memoryview(passphrase)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(options: ServeOptions, *, passphrase: bytes | None = None,
          nbdkit: str | None = None, stderr: Any = None) -> int:
    """Run nbdkit in the foreground until it stops.  SIGINT, SIGTERM and
    SIGHUP are forwarded to it (this function must run in the main thread
    then) and it is waited for; a stop by signal returns 0.  nbdkit failing
    on its own (address in use, the plugin refusing the image) raises
    :class:`NbdServerError`.  Returns nbdkit's exit status otherwise."""
    nbdkit = nbdkit or find_nbdkit()
    fd = None if passphrase is None else _secret_fd(passphrase)
    try:
        argv = nbdkit_command(nbdkit, options, passphrase_fd=fd)
        env = dict(os.environ, PYTHONPATH=_python_path())
        env.pop("QCOW2SNAP_PASSPHRASE", None)   # handed over in the descriptor
        proc = subprocess.Popen(argv, env=env, pass_fds=() if fd is None else (fd,),
                                stdin=subprocess.DEVNULL, stderr=stderr)
    finally:
        if fd is not None:
            os.close(fd)
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    try:
        try:
            status = proc.wait()
        except BaseException:
            proc.terminate()
            raise
        finally:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _remove_socket(options.socket)
    if stopped:
        return 0
    if status != 0:
        raise NbdServerError(f"nbdkit stopped with exit status {status}")
    return status


def _remove_socket(path: str | None) -> None:
    """nbdkit removes its socket on a clean exit; after a crash it would
    stay (only a socket is ever removed)."""
    import stat
    if path is None:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def export_summary(options: ServeOptions) -> Iterable[str]:
    """The NBD URI(s) a client connects to."""
    if options.socket is not None:
        yield f"nbd+unix:///?socket={os.path.abspath(options.socket)}"
    else:
        host = options.bind or "localhost"
        if ":" in host:
            host = f"[{host}]"
        yield f"nbd://{host}:{options.port}/"
