"""Editing entry points (operations layer): an image opened ``"r+"`` with
snapshot methods, and the same operations over a VM's several disks.

Every edit is one :class:`~qcow2snap.ops.transaction.Transaction`: the image
is, at every instant, in the old state or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import Qcow2Error, SnapshotNotFoundError
from ..image import Qcow2Image
from ..model import Snapshot
from .snapshots import SnapshotEditor, SnapshotExistsError
from .transaction import CommitResult, FileIO, MetadataIO, Transaction

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


class EditableImage(Qcow2Image):
    """A qcow2 image opened for editing (``qcow2snap.open(path, "r+")``).

    Opening refuses an image a running QEMU holds and then holds QEMU-style
    locks so no QEMU opens it for writing meanwhile.  Each method is one
    crash-safe transaction; afterwards the object shows the new state.
    ``io`` replaces the file I/O of commits (tests record through it).
    """

    def __init__(self, path: str | os.PathLike[str], *, io: MetadataIO | None = None,
                 **kwargs: object) -> None:
        super().__init__(path, "r+", **kwargs)  # type: ignore[arg-type]
        self._io = io

    def _edit(self, plan: Callable[[SnapshotEditor], object], dry_run: bool
              ) -> tuple[CommitResult, object]:
        io = self._io or FileIO(self._file.fd)
        editor = SnapshotEditor(self, Transaction(self, io))
        outcome = plan(editor)
        result = editor.commit(dry_run=dry_run)
        if not dry_run:
            self.reload()
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


def _resolve(image: Qcow2Image, ref: str, by: Literal["id", "name"] | None) -> Snapshot:
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
        for image in opened:
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
        for image in opened:
            sn_id: str | None = None
            sn_name: str | None = None
            try:
                if operation == "create":
                    assert name is not None
                    sn_id, commit = image.create_snapshot(name, overwrite=overwrite,
                                                          dry_run=dry_run)
                    sn_name = name
                else:
                    assert snapshot is not None
                    target = _resolve(image, snapshot, by)
                    sn_id, sn_name = target.id, target.name
                    if operation == "delete":
                        commit = image.delete_snapshot(target, dry_run=dry_run)
                    elif operation == "revert":
                        commit = image.revert_to_snapshot(target, dry_run=dry_run)
                    elif operation == "rename":
                        assert name is not None
                        commit = image.rename_snapshot(target, name, dry_run=dry_run)
                        sn_name = name
                    else:  # pragma: no cover
                        raise ValueError(operation)
                results.append(EditResult(str(image.path), operation, sn_id, sn_name, commit))
            except (Qcow2Error, OSError) as exc:
                results.append(EditResult(str(image.path), operation, sn_id, sn_name, None, exc))
        return results
    finally:
        for image in opened:
            image.close()


__all__ += ["SnapshotNotFoundError"]
