"""The exception tree of qcow2snap.

Every problem that qcow2snap detects in an image, and every refusal, is a
subclass of :class:`Qcow2Error`.  Callers can therefore catch "everything this
library reports about an image" with one ``except Qcow2Error``.  Misuse of the
API (a wrong argument type, an unknown mode string) stays ``ValueError`` /
``TypeError``; operating-system errors on the image file itself (permission
denied, file not found) stay ``OSError``.

Each class carries ``exit_code``, the process exit status the CLI uses for it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AmbiguousSnapshotError",
    "BadPassphraseError",
    "CheckFailedError",
    "CommitFailedError",
    "CommitNotDurableError",
    "CompanionRefusedError",
    "CorruptImageError",
    "ImageInUseError",
    "ImageInUseWarning",
    "ImageNeedsRepairError",
    "MountError",
    "NbdServerError",
    "NoVMStateError",
    "NotQcow2Error",
    "OutputError",
    "OutputExistsError",
    "Qcow2Error",
    "RefcountOverflowError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "TransactionPoisoned",
    "UnsupportedImageError",
]


class Qcow2Error(Exception):
    """Base class of every error qcow2snap raises about an image."""

    exit_code = 1


class NotQcow2Error(Qcow2Error):
    """The file is not a qcow2 image (wrong magic, or too short for a header)."""

    exit_code = 1


class CorruptImageError(Qcow2Error):
    """A structure in the image is inconsistent or out of bounds.

    ``structure`` names the structure ("header", "L1 table", "snapshot table
    entry 3", ...) and ``offset`` is its byte offset in the host file, when one
    is known.
    """

    exit_code = 3

    def __init__(self, message: str, *, structure: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.structure = structure
        self.offset = offset


class UnsupportedImageError(Qcow2Error):
    """The image is valid but uses something qcow2snap does not implement,
    or something QEMU itself refuses (``feature`` names it)."""

    exit_code = 4

    def __init__(self, message: str, *, feature: str | None = None) -> None:
        super().__init__(message)
        self.feature = feature


class ImageInUseError(Qcow2Error):
    """A running QEMU process holds the image (QEMU's byte-range locks)."""

    exit_code = 5


class ImageInUseWarning(UserWarning):
    """Reading an image that a running QEMU (or a qcow2snap editor) holds
    open for writing (a warning: reading goes on)."""


class SnapshotNotFoundError(Qcow2Error, LookupError):
    """No snapshot matches the given ID or name."""

    exit_code = 6


class AmbiguousSnapshotError(Qcow2Error, LookupError):
    """A snapshot reference matches more than one snapshot.

    ``candidates`` lists ``(id, name)`` of every match, in table order.
    """

    exit_code = 7

    def __init__(self, message: str, candidates: Sequence[tuple[str, str]]) -> None:
        super().__init__(message)
        self.candidates = tuple(candidates)


class NoVMStateError(Qcow2Error):
    """The snapshot is disk-only (made by ``qemu-img snapshot -c`` or
    ``qcow2snap create``): it holds no saved VM state."""

    exit_code = 8


class CompanionRefusedError(Qcow2Error):
    """The image names a companion file (backing file, external data file)
    outside the places the user allowed: it was not opened.

    ``kind`` says which companion, ``named`` is the name the image holds
    and ``path`` the real path it resolves to.  Give the file explicitly
    (``backing_file=``/``data_file=``) or allow its directory
    (``allow_dirs=``; CLI ``--allow-dir``) to follow it.
    """

    exit_code = 11

    def __init__(self, message: str, *, kind: str, path: str, named: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.named = named


class RefcountOverflowError(UnsupportedImageError):
    """A refcount would exceed what the image's refcount width can hold
    (an edit or repair is refused before anything is written)."""


class SnapshotExistsError(Qcow2Error):
    """A snapshot of that name exists (create without ``overwrite``)."""

    exit_code = 9


class ImageNeedsRepairError(Qcow2Error):
    """The image carries the dirty or corrupt bit: refcounts cannot be
    trusted, so it must be checked and repaired before it is edited."""

    exit_code = 10


class TransactionPoisoned(Qcow2Error):
    """A commit failed part-way (an I/O error).  The editable image it ran
    on is poisoned: every later edit through it raises this error until the
    image is reopened.  The image itself is in the old or the new state; the
    subclasses, raised by the failing commit, say which."""

    exit_code = 12


class CommitFailedError(TransactionPoisoned):
    """Writing or flushing the new metadata failed before the switch: the
    image is unchanged, in its old state."""


class CommitNotDurableError(TransactionPoisoned):
    """The switch to the new state was written, but flushing it failed: the
    image reads as the new state, which is not known to be durable (a power
    loss could still bring back the old one)."""


class OutputError(Qcow2Error):
    """The output file cannot be created or written (the message names it)."""

    exit_code = 1


class OutputExistsError(OutputError):
    """The output file exists and overwriting was not allowed."""


class CheckFailedError(Qcow2Error):
    """The image could not be checked at all (its header, active L1 or
    refcount table location is unusable: QEMU cannot open it either), or a
    repair was refused (a running QEMU holds the image)."""

    exit_code = 1


class BadPassphraseError(Qcow2Error):
    """The image's data is encrypted (LUKS) and no passphrase was given, or
    the one given opens none of its key slots."""

    exit_code = 13


class NbdServerError(Qcow2Error):
    """``serve``: nbdkit or its Python plugin is not installed, or nbdkit
    stopped with an error of its own (its message is on stderr above)."""

    exit_code = 15


class MountError(Qcow2Error):
    """A mount cannot be set up: no FUSE device or binding, the mountpoint
    is missing, not a directory, not empty or not ours (the message says
    what to do)."""

    exit_code = 1
