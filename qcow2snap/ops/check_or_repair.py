"""The ``check`` command's entry (operations layer): a read-only check, or
a repair.

Its own module so that a plain check loads neither the repair nor its
transaction (about 30 ms of start-up: the transaction, the copier's
threads, ctypes), and so that neither ``check`` nor ``repair`` imports the
other's caller.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import CheckFailedError, ImageInUseError, Qcow2Error
from .check import check_image
from .check_report import CheckReport, Progress, RepairMode, RepairReport

if TYPE_CHECKING:
    from .metadata_io import MetadataIO

__all__ = ["check_or_repair"]


def check_or_repair(path: str | os.PathLike[str], repair: RepairMode | None = None, *,
                    dry_run: bool = False, progress: Progress | None = None,
                    io: MetadataIO | None = None) -> CheckReport | RepairReport:
    """``qcow2snap check``: without ``repair`` a read-only check
    (:func:`~qcow2snap.ops.check.check_image`); otherwise
    :func:`~qcow2snap.ops.repair.repair_image` (imported then).

    Whatever stops the check itself is one :class:`CheckFailedError` (exit
    status 1, as qemu-img check's "could not be completed"), the cause
    chained: an image that cannot be opened, or a repair refused because a
    running QEMU holds the image."""
    if dry_run and repair is None:
        raise ValueError("dry_run needs a repair mode")
    try:
        if repair is None:
            return check_image(path, progress=progress)
        from .repair import repair_image
        return repair_image(path, repair, dry_run=dry_run, progress=progress, io=io)
    except ImageInUseError as exc:
        raise CheckFailedError(f"{exc} (repair refused)") from exc
    except CheckFailedError:
        raise
    except Qcow2Error as exc:
        raise CheckFailedError(f"Could not check {os.fspath(path)!r}: {exc}") from exc
