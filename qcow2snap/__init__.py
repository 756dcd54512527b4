"""qcow2snap: inspect and edit internal snapshots of stopped qcow2 images.

Typical use::

    import qcow2snap

    with qcow2snap.open("vm.qcow2") as image:
        for snapshot in image.snapshots:
            print(snapshot.id, snapshot.name, snapshot.disk_size)
        with image.open_disk("before-upgrade") as disk:
            mbr = disk.read(512)

Layers (one direction of imports): :mod:`.format` and :mod:`.tables`
(bytes <-> fields), :mod:`.model` (typed header, extensions, snapshots),
:mod:`.image` and :mod:`.reader` (the opened image and its data),
operations, and :mod:`.cli` on top.
"""

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO, Literal, overload

from .crypto import DEFAULT_KDF_ITERATION_LIMIT
from .errors import (
    AmbiguousSnapshotError,
    BadPassphraseError,
    CheckFailedError,
    CommitFailedError,
    CommitNotDurableError,
    CompanionRefusedError,
    CorruptImageError,
    ImageInUseError,
    ImageInUseWarning,
    ImageNeedsRepairError,
    MountError,
    NbdServerError,
    NotQcow2Error,
    NoVMStateError,
    OutputError,
    OutputExistsError,
    Qcow2Error,
    RefcountOverflowError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TransactionPoisoned,
    UnsupportedImageError,
)
from .image import Layer, Qcow2Image, RawImage
from .image import open as _open_read_only
from .model import Extension, FeatureName, Header, Snapshot
from .reader import DiskReader, Extent, ExtentKind

if TYPE_CHECKING:  # the editing layer loads only when an image is opened "r+"
    from .ops.edit import EditableImage
    from .ops.metadata_io import MetadataIO

__version__ = "0.1.0"


@overload
def open(path: str | os.PathLike[str] | BinaryIO, mode: Literal["r"] = "r", *,
         backing_file: str | os.PathLike[str] | bool | None = None,
         backing_format: str | None = None,
         data_file: str | os.PathLike[str] | None = None,
         check_locks: bool = True,
         allow_dirs: Iterable[str | os.PathLike[str]] = (),
         passphrase: bytes | str | None = None,
         kdf_iteration_limit: int = DEFAULT_KDF_ITERATION_LIMIT) -> Qcow2Image: ...


@overload
def open(path: str | os.PathLike[str] | BinaryIO, mode: Literal["r+"], *,
         backing_file: str | os.PathLike[str] | bool | None = None,
         backing_format: str | None = None,
         data_file: str | os.PathLike[str] | None = None,
         check_locks: bool = True, io: "MetadataIO | None" = None,
         allow_dirs: Iterable[str | os.PathLike[str]] = ()) -> "EditableImage": ...


def open(path: str | os.PathLike[str] | BinaryIO, mode: Literal["r", "r+"] = "r", *,
         backing_file: str | os.PathLike[str] | bool | None = None,
         backing_format: str | None = None,
         data_file: str | os.PathLike[str] | None = None,
         check_locks: bool = True, io: "MetadataIO | None" = None,
         allow_dirs: Iterable[str | os.PathLike[str]] = (),
         passphrase: bytes | str | None = None,
         kdf_iteration_limit: int = DEFAULT_KDF_ITERATION_LIMIT,
         ) -> "Qcow2Image | EditableImage":
    """Open a qcow2 image; use as a context manager.

    ``mode="r"`` (default) never writes: see :class:`Qcow2Image`.
    ``mode="r+"`` opens for editing and returns an
    :class:`~qcow2snap.ops.edit.EditableImage` with ``create_snapshot``,
    ``delete_snapshot``, ``revert_to_snapshot`` and ``rename_snapshot``; it
    refuses an image that a running QEMU holds.

    Keyword arguments: ``backing_file`` (a path, or ``False`` to read
    unallocated clusters as zeros), ``backing_format``, ``data_file``,
    ``allow_dirs`` (directories besides the image's own from which
    backing and data files named by the image may be read: a name that
    leads elsewhere raises :class:`CompanionRefusedError`),
    ``check_locks`` (reading only: an editor always checks),
    ``passphrase`` (reading only: the LUKS passphrase of an encrypted
    image, bytes or str, used as given; needs ``qcow2snap[luks]``; for the
    legacy AES method, its key, which nothing can verify),
    ``kdf_iteration_limit`` (reading only: the most PBKDF2 iterations a LUKS
    key slot may ask for before it is not tried; a hostile header can ask
    for hours), and for
    ``"r+"`` ``io``, an object with ``pwrite``/``fsync``/``truncate``/
    ``punch_hole`` that receives every metadata write instead of the file
    (the crash tests record and replay through it).
    """
    if io is not None and mode != "r+":
        raise ValueError("io= is for mode='r+' (it carries the editor's metadata writes)")
    if mode == "r":
        return _open_read_only(path, "r", backing_file=backing_file,
                               backing_format=backing_format, data_file=data_file,
                               check_locks=check_locks, allow_dirs=allow_dirs,
                               passphrase=passphrase,
                               kdf_iteration_limit=kdf_iteration_limit)
    if mode == "r+":
        if passphrase is not None:
            raise ValueError("passphrase= is for mode='r' (encrypted images are read only)")
        from .ops.edit import EditableImage
        if not isinstance(path, (str, os.PathLike)):
            name = getattr(path, "name", None)  # an open file: edit it by its path
            if not isinstance(name, str):
                raise ValueError("mode 'r+' needs a path (or a file object with a name)")
            path = name
        # an editor always checks QEMU's locks (and holds its own): check_locks
        # cannot turn that off
        return EditableImage(path, io=io, backing_file=backing_file,
                             backing_format=backing_format, data_file=data_file,
                             allow_dirs=allow_dirs)
    raise ValueError(f"unsupported mode {mode!r} ('r' or 'r+')")


__all__ = [
    "DEFAULT_KDF_ITERATION_LIMIT",
    "AmbiguousSnapshotError",
    "BadPassphraseError",
    "CheckFailedError",
    "CommitFailedError",
    "CommitNotDurableError",
    "CompanionRefusedError",
    "CorruptImageError",
    "DiskReader",
    "Extension",
    "Extent",
    "ExtentKind",
    "FeatureName",
    "Header",
    "ImageInUseError",
    "ImageInUseWarning",
    "ImageNeedsRepairError",
    "Layer",
    "MountError",
    "NbdServerError",
    "NoVMStateError",
    "NotQcow2Error",
    "OutputError",
    "OutputExistsError",
    "Qcow2Error",
    "Qcow2Image",
    "RawImage",
    "RefcountOverflowError",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "TransactionPoisoned",
    "UnsupportedImageError",
    "__version__",
    "open",
]
