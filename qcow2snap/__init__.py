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
from .image import ImageInUseWarning, Layer, Qcow2Image, RawImage, open
from .model import Extension, FeatureName, Header, Snapshot
from .reader import DiskReader, Extent, ExtentKind

__version__ = "0.1.0"

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
