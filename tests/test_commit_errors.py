"""An I/O error during a commit is reported with the state the image is in.

The commit writes the new metadata, flushes, writes the header sector that
switches to the new state, and flushes again.  An error before the switch
leaves the old state (:class:`CommitFailedError`); an error on the flush
after it leaves the new state, not known to be durable
(:class:`CommitNotDurableError`); both are :class:`TransactionPoisoned`,
exit status 12.  Failing to give freed space back afterwards is no failure
of the edit (``CommitResult.reclaim_error``).

The old behaviour: every such error surfaced as a bare ``OSError`` (CLI:
"Input/output error", exit 1), which for the second flush said "failed"
about an edit that was applied.

The API tests fail the I/O through ``io=`` (a :class:`MetadataIO` that
records and fails one call); the CLI tests make the kernel call itself fail
(strace's fault injection on ``fdatasync``).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_qemu_clean, require_strace, run_cli

import qcow2snap
from qcow2snap import Qcow2Error
from qcow2snap.ops import transaction
from qcow2snap.ops.transaction import FileIO

pytestmark = pytest.mark.qemu

SNAPSHOTS = ["first", "second", "third"]        # the v3-basic fixture's
SNAPSHOT_LIST_HEADING = ("ID        TAG               VM SIZE                DATE     VM CLOCK"
                         "     ICOUNT")


def not_applied(path: Path) -> str:
    return (f"{path}: the edit was not applied: writing the new metadata failed (Input/output "
            f"error); the image is unchanged, in its old state")


def applied_not_durable(path: Path) -> str:
    return (f"{path}: the edit was applied (the image now reads as the new state) but flushing "
            f"it to disk failed (Input/output error), so it is not known to be durable: a "
            f"power loss before the storage recovers could bring back the old state (both are "
            f"consistent); check the storage, then verify with 'qcow2snap list'")


def header_write_failed(path: Path) -> str:
    return (f"{path}: writing the header sector that switches to the new state failed "
            f"(Input/output error); the image is in the old or the new state, both consistent: "
            f"reopen it (qcow2snap list) to see which")


Failure = Callable[[str, int, tuple[Any, ...]], bool]


def nth(operation: str, at: int) -> Failure:
    """Fail the ``at``-th call of ``operation``."""
    return lambda op, count, args: op == operation and count == at


def header_sector_write(op: str, count: int, args: tuple[Any, ...]) -> bool:
    """Fail the write inside the first sector: the switch to the new state."""
    return op == "pwrite" and args[1] < 512


class FailingIO:
    """A :class:`MetadataIO` over the image file that records each call
    (operation, offset or length) and fails the calls ``fails`` picks with
    EIO; a failed call does nothing, as a failed system call."""

    def __init__(self, path: Path, fails: Failure) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.inner = FileIO(self.fd)
        self.fails = fails
        self.calls: list[tuple[str, int]] = []

    def _call(self, operation: str, *args: Any) -> None:
        count = 1 + sum(op == operation for op, _ in self.calls)
        self.calls.append((operation, args[-2] if operation == "punch_hole"
                           else args[-1] if args else 0))
        if self.fails(operation, count, args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        getattr(self.inner, operation)(*args)

    def pwrite(self, data: bytes, offset: int) -> None:
        self._call("pwrite", data, offset)

    def fsync(self) -> None:
        self._call("fsync")

    def truncate(self, length: int) -> None:
        self._call("truncate", length)

    def punch_hole(self, offset: int, length: int) -> None:
        self._call("punch_hole", offset, length)

    def close(self) -> None:
        os.close(self.fd)


def edit_failing(path: Path, fails: Failure) -> tuple[Qcow2Error, list[tuple[str, int]]]:
    """create_snapshot("new") through a FailingIO: the error and the calls."""
    io = FailingIO(path, fails)
    try:
        with qcow2snap.open(path, "r+", io=io) as image, pytest.raises(Qcow2Error) as info:
            image.create_snapshot("new")
    finally:
        io.close()
    return info.value, io.calls


def qemu_snapshot_names(qemu_img: str, path: Path) -> list[str]:
    """The TAG column of ``qemu-img snapshot -l``."""
    proc = subprocess.run([qemu_img, "snapshot", "-l", str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["Snapshot list:", SNAPSHOT_LIST_HEADING], proc.stdout
    return [line.split()[1] for line in lines[2:]]


def assert_old_state_kept(qemu_img: str, path: Path, before: bytes,
                          before_check: dict[str, Any]) -> None:
    """Every byte of the old image is as it was and it reads as before.
    (New metadata clusters written past its end before the failure may stay
    in the file: nothing refers to them, qemu-img check counts nothing.)"""
    after = path.read_bytes()
    assert after[:len(before)] == before
    assert qemu_snapshot_names(qemu_img, path) == SNAPSHOTS
    assert assert_qemu_clean(qemu_img, path) == before_check


# --------------------------------------------------------------------------
# the API


def test_eio_on_the_flush_after_the_header_write_says_applied_not_durable(
        fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    error, calls = edit_failing(path, nth("fsync", 2))
    assert type(error) is transaction.CommitNotDurableError
    assert isinstance(error, transaction.TransactionPoisoned)
    assert error.exit_code == 12
    assert str(error) == applied_not_durable(path)
    assert isinstance(error.__cause__, OSError)
    # the new metadata, a flush, the header sector, the failed flush: no more
    operations = [op for op, _ in calls]
    assert operations[-3:] == ["fsync", "pwrite", "fsync"]
    assert set(operations[:-3]) == {"pwrite"}
    assert calls[-2][1] < 512
    # applied: it reads as the new state
    with qcow2snap.open(path) as image:
        assert [s.name for s in image.snapshots] == [*SNAPSHOTS, "new"]
    assert qemu_snapshot_names(qemu_img, path) == [*SNAPSHOTS, "new"]
    assert_qemu_clean(qemu_img, path)


@pytest.mark.parametrize(("fails", "error_type", "message"), [
    (nth("pwrite", 1), "CommitFailedError", not_applied),
    (nth("fsync", 1), "CommitFailedError", not_applied),
    (header_sector_write, "TransactionPoisoned", header_write_failed),
], ids=["metadata-write", "first-flush", "header-write"])
def test_eio_before_the_switch_leaves_the_old_state(
        fixture_copy: Any, qemu_img: str, fails: Failure, error_type: str,
        message: Callable[[Path], str]) -> None:
    path = fixture_copy("v3-basic")
    before = path.read_bytes()
    before_check = assert_qemu_clean(qemu_img, path)
    error, calls = edit_failing(path, fails)
    assert type(error) is getattr(transaction, error_type)
    assert isinstance(error, transaction.TransactionPoisoned)
    assert error.exit_code == 12
    assert str(error) == message(path)
    assert [op for op, _ in calls].count("fsync") <= 1    # stopped at the failure
    # a failed system call wrote nothing: the old state, every byte of it
    assert_old_state_kept(qemu_img, path, before, before_check)


def test_failing_to_give_space_back_is_no_failure_of_the_edit(fixture_copy: Any,
                                                              qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    io = FailingIO(path, nth("punch_hole", 1))
    try:
        with qcow2snap.open(path, "r+", io=io) as image:
            result = image.delete_snapshot(image.find_snapshot("first", by="name"))
    finally:
        io.close()
    freed = len(result.clusters_freed)
    assert freed > 0
    assert result.reclaim_error == (f"giving {freed} freed cluster(s) back to the file system "
                                    f"failed (Input/output error); they stay in the file, free")
    assert [op for op, _ in io.calls].count("fsync") == 2
    assert qemu_snapshot_names(qemu_img, path) == ["second", "third"]
    assert_qemu_clean(qemu_img, path)


# --------------------------------------------------------------------------
# the CLI, with the kernel's fdatasync failing


def _create_with_failing_fdatasync(path: Path, name: str, when: int
                                   ) -> subprocess.CompletedProcess[str]:
    return run_cli("create", name, path,
                   prefix=[require_strace(), "-f", "-qq", "-o", os.devnull, "-e", "trace=fdatasync",
                           "-e", f"inject=fdatasync:error=EIO:when={when}"])


def test_cli_eio_on_the_second_fdatasync_says_applied_not_durable(fixture_copy: Any,
                                                                  qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    proc = _create_with_failing_fdatasync(path, "NAME", when=2)
    assert (proc.returncode, proc.stdout) == (12, ""), proc.stderr
    assert proc.stderr == f"qcow2snap: error: {applied_not_durable(path)}\n"
    assert qemu_snapshot_names(qemu_img, path) == [*SNAPSHOTS, "NAME"]
    assert_qemu_clean(qemu_img, path)


def test_cli_eio_on_the_first_fdatasync_says_not_applied(fixture_copy: Any,
                                                         qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    before = path.read_bytes()
    before_check = assert_qemu_clean(qemu_img, path)
    proc = _create_with_failing_fdatasync(path, "NAME", when=1)
    assert (proc.returncode, proc.stdout) == (12, ""), proc.stderr
    assert proc.stderr == f"qcow2snap: error: {not_applied(path)}\n"
    assert_old_state_kept(qemu_img, path, before, before_check)


# ---------------------------------------------------------------------------
# the handle after a failed commit (h11's error state as the model)
# ---------------------------------------------------------------------------

def test_a_failed_commit_poisons_the_handle(fixture_copy: Any) -> None:
    """After any exception escapes a commit, every later edit through the
    same handle raises TransactionPoisoned until the image is reopened:
    what the handle knows of the image may be stale."""
    path = fixture_copy("v3-basic")
    io = FailingIO(path, nth("fsync", 1))
    try:
        with qcow2snap.open(path, "r+", io=io) as image:
            with pytest.raises(transaction.CommitFailedError):
                image.create_snapshot("lost")
            assert image.poisoned == f"CommitFailedError: {not_applied(path)}"
            for edit in (lambda: image.create_snapshot("again"),
                         lambda: image.delete_snapshot("first"),
                         lambda: image.rename_snapshot("first", "x"),
                         lambda: image.revert_to_snapshot("first")):
                with pytest.raises(transaction.TransactionPoisoned) as info:
                    edit()
                assert str(info.value) == (
                    f"{path}: an earlier edit through this handle failed (CommitFailedError: "
                    f"{not_applied(path)}); it takes no more edits: close it and open the "
                    f"image again")
                assert type(info.value) is transaction.TransactionPoisoned
    finally:
        os.close(io.fd)
    with qcow2snap.open(path, "r+") as image:      # a new handle edits again
        image.create_snapshot("again")
        assert [s.name for s in image.snapshots] == [*SNAPSHOTS, "again"]


def test_an_error_while_planning_poisons_nothing(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path, "r+") as image:
        with pytest.raises(qcow2snap.SnapshotNotFoundError):
            image.delete_snapshot("no-such-snapshot")
        assert image.poisoned is None
        image.create_snapshot("fine")
        assert [s.name for s in image.snapshots] == [*SNAPSHOTS, "fine"]


def test_a_transaction_commits_once(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path, "r+") as editable:
        txn = transaction.Transaction(editable.image, FileIO(editable.image._file.fd))
        txn.commit()
        with pytest.raises(RuntimeError, match=r"Transaction\.commit\(\) called twice"):
            txn.commit()
