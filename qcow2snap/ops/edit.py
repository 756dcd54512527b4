"""Editing entry points (operations layer): an image opened ``"r+"`` with
snapshot methods, and the same operations over a VM's several disks.

Every edit is one :class:`~qcow2snap.ops.transaction.Transaction`: the image
is, at every instant, in the old state or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import Qcow2Error, SnapshotNotFoundError
from ..image import Qcow2Image
from ..locks import LockState
from ..model import Header, Snapshot
from ..reader import DiskReader
from .metadata_io import FileIO, MetadataIO
from .snapshots import SnapshotEditor, SnapshotExistsError
from .transaction import CommitResult, Transaction, TransactionPoisoned

__all__ = ["EditResult", "EditableImage", "Operation", "edit_images"]

Operation = Literal["create", "delete", "revert", "rename"]


@dataclass(frozen=True)
class EditResult:
    """The outcome of one operation on one image."""

    path: str
    operation: str
    snapshot_id: str | None
    snapshot_name: str | None
    commit: CommitResult | None
    error: Qcow2Error | OSError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class EditableImage:
    """A qcow2 image opened for editing (``qcow2snap.open(path, "r+")``).

    It wraps an image opened read-write (:attr:`image`, a
    :class:`~qcow2snap.image.Qcow2Image` holding the editor lock: opening
    refuses an image another editor or a running QEMU holds, and holds
    QEMU-style locks so no QEMU opens it for writing meanwhile), and adds
    the edits.  Each edit method is one crash-safe transaction; afterwards
    the image shows the new state.  The reading API of the wrapped image
    (``snapshots``, ``header``, ``find_snapshot``, ``open_disk``, ...) is
    available here too.  ``io`` replaces the file I/O of commits (tests
    record through it).
    """

    def __init__(self, path: str | os.PathLike[str], *, io: MetadataIO | None = None,
                 **kwargs: Any) -> None:
        self.image = Qcow2Image(path, "r+", **kwargs)
        self._io = io
        #: why this handle takes no more edits (an exception escaped a commit)
        self.poisoned: str | None = None

    # the wrapped image's reading API ---------------------------------------

    @property
    def path(self) -> str:
        return self.image.path

    @property
    def header(self) -> Header:
        return self.image.header

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        return self.image.snapshots

    @property
    def lock_state(self) -> LockState | None:
        return self.image.lock_state

    @property
    def size(self) -> int:
        return self.image.size

    def find_snapshot(self, ref: str | Snapshot, *,
                      by: Literal["id", "name"] | None = None) -> Snapshot:
        return self.image.find_snapshot(ref, by=by)

    def open_disk(self, snapshot: str | Snapshot | None = None) -> DiskReader:
        return self.image.open_disk(snapshot)

    def open_vm_state(self, snapshot: str | Snapshot) -> DiskReader:
        return self.image.open_vm_state(snapshot)

    def __getattr__(self, name: str) -> Any:
        """The rest of the wrapped image's reading API (``dirty``,
        ``extents``, ``layer``, ...), read-only."""
        if name.startswith("__") or "image" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["image"], name)

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> EditableImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EditableImage {self.image!r}>"

    # edits ------------------------------------------------------------------

    def _edit(self, plan: Callable[[SnapshotEditor], object], dry_run: bool
              ) -> tuple[CommitResult, object]:
        """Plan an edit and commit it.  After any exception escapes a
        commit, the handle is poisoned (as h11's connection enters its
        error state): what it knows of the image may be stale, so every
        later edit raises :class:`TransactionPoisoned` until the image is
        reopened.  An error while planning leaves the image as it was
        (shadow copies written early are cut off again,
        :meth:`Transaction.abort`) and poisons nothing."""
        if self.poisoned is not None:
            raise TransactionPoisoned(
                f"{self.path}: an earlier edit through this handle failed ({self.poisoned}); "
                f"it takes no more edits: close it and open the image again")
        image = self.image
        io = self._io or FileIO(image._file.fd)
        txn = Transaction(image, io, early_writes=not dry_run)
        try:
            editor = SnapshotEditor(image, txn)
            outcome = plan(editor)
        except BaseException:
            txn.abort()
            raise
        try:
            result = editor.commit(dry_run=dry_run)
            if not dry_run:
                image.reload()
        except BaseException as exc:
            self.poisoned = f"{type(exc).__name__}: {exc}"
            raise
        return result, outcome

    def create_snapshot(self, name: str, *, overwrite: bool = False,
                        dry_run: bool = False) -> tuple[str, CommitResult]:
        """Create a disk-only snapshot; returns (new ID, commit result)."""
        result, new_id = self._edit(lambda e: e.create(name, overwrite=overwrite), dry_run)
        return str(new_id), result

    def delete_snapshot(self, snapshot: str | Snapshot, *,
                        dry_run: bool = False) -> CommitResult:
        result, _ = self._edit(lambda e: e.delete(snapshot), dry_run)
        return result

    def revert_to_snapshot(self, snapshot: str | Snapshot, *,
                           dry_run: bool = False) -> CommitResult:
        result, _ = self._edit(lambda e: e.revert(snapshot), dry_run)
        return result

    def rename_snapshot(self, snapshot: str | Snapshot, new_name: str, *,
                        dry_run: bool = False) -> CommitResult:
        result, _ = self._edit(lambda e: e.rename(snapshot, new_name), dry_run)
        return result


def _resolve(image: Qcow2Image | EditableImage, ref: str,
             by: Literal["id", "name"] | None) -> Snapshot:
    return image.find_snapshot(ref, by=by)


def edit_images(paths: Sequence[str | os.PathLike[str]], operation: Operation, *,
                snapshot: str | None = None, name: str | None = None,
                by: Literal["id", "name"] | None = None, overwrite: bool = False,
                dry_run: bool = False) -> list[EditResult]:
    """Apply one snapshot operation to a VM's disks, like QEMU's
    save/load/delete over a device list.

    First every image is opened for editing and validated (it exists, is
    writable, is not held by QEMU, is not dirty, and the snapshot is present
    or absent as the operation needs).  If any check fails, nothing is
    changed and the first error is raised.  Then the operation is applied
    image by image; the results (with per-image errors) are returned.
    """
    opened: list[EditableImage] = []
    try:
        for path in paths:
            opened.append(EditableImage(path))
        for editable in opened:
            image = editable.image
            SnapshotEditor(image, Transaction(image, FileIO(-1))).check_editable()
            if operation == "create":
                assert name is not None
                clash = [s for s in image.snapshots if s.name == name]
                if clash and not overwrite:
                    raise SnapshotExistsError(
                        f"{image.path}: a snapshot named {name!r} exists (ID {clash[0].id}); "
                        f"use --overwrite to replace it")
            else:
                assert snapshot is not None
                _resolve(image, snapshot, by)
        results: list[EditResult] = []
        for editable in opened:
            sn_id: str | None = None
            sn_name: str | None = None
            try:
                if operation == "create":
                    assert name is not None
                    sn_id, commit = editable.create_snapshot(name, overwrite=overwrite,
                                                             dry_run=dry_run)
                    sn_name = name
                else:
                    assert snapshot is not None
                    target = _resolve(editable, snapshot, by)
                    sn_id, sn_name = target.id, target.name
                    if operation == "delete":
                        commit = editable.delete_snapshot(target, dry_run=dry_run)
                    elif operation == "revert":
                        commit = editable.revert_to_snapshot(target, dry_run=dry_run)
                    elif operation == "rename":
                        assert name is not None
                        commit = editable.rename_snapshot(target, name, dry_run=dry_run)
                        sn_name = name
                    else:  # pragma: no cover
                        raise ValueError(operation)
                results.append(EditResult(editable.path, operation, sn_id, sn_name, commit))
            except (Qcow2Error, OSError) as exc:
                results.append(EditResult(editable.path, operation, sn_id, sn_name, None, exc))
        return results
    finally:
        for editable in opened:
            editable.close()


__all__ += ["SnapshotNotFoundError"]
