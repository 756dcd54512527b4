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

from .errors import (
    AmbiguousSnapshotError,
    CorruptImageError,
    ImageInUseError,
    NotQcow2Error,
    NoVMStateError,
    Qcow2Error,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from .image import ImageInUseWarning, Layer, Qcow2Image, RawImage
from .image import open as _open_read_only
from .model import Extension, FeatureName, Header, Snapshot
from .reader import DiskReader, Extent, ExtentKind

__version__ = "0.1.0"


def open(path, mode="r", **kwargs):  # type: ignore[no-untyped-def]  # noqa: A001
    """Open a qcow2 image; use as a context manager.

    ``mode="r"`` (default) never writes: see :class:`Qcow2Image`.
    ``mode="r+"`` opens for editing and returns an
    :class:`~qcow2snap.ops.edit.EditableImage` with ``create_snapshot``,
    ``delete_snapshot``, ``revert_to_snapshot`` and ``rename_snapshot``; it
    refuses an image that a running QEMU holds.

    Keyword arguments: ``backing_file`` (a path, or ``False`` to read
    unallocated clusters as zeros), ``backing_format``, ``data_file``,
    ``check_locks``.
    """
    if mode == "r":
        return _open_read_only(path, "r", **kwargs)
    if mode == "r+":
        from .ops.edit import EditableImage
        if not isinstance(path, (str, os.PathLike)):
            path = getattr(path, "name", path)
        kwargs.pop("check_locks", None)
        return EditableImage(path, **kwargs)
    raise ValueError(f"unsupported mode {mode!r} ('r' or 'r+')")

__all__ = [
    "open",
    "Qcow2Image",
    "RawImage",
    "Layer",
    "Header",
    "Extension",
    "FeatureName",
    "Snapshot",
    "DiskReader",
    "Extent",
    "ExtentKind",
    "ImageInUseWarning",
    "Qcow2Error",
    "NotQcow2Error",
    "CorruptImageError",
    "UnsupportedImageError",
    "ImageInUseError",
    "SnapshotNotFoundError",
    "AmbiguousSnapshotError",
    "NoVMStateError",
    "__version__",
]
