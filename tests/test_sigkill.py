"""Real SIGKILLs during long edits: the image is always exactly the old state
or the new one, and ``qemu-img check`` finds nothing (no corruption, no
leak).

Run alone with ``pytest tests/test_sigkill.py`` (or ``-k sigkill``; about a
minute).  ``QCOW2SNAP_SIGKILLS=N`` sets the timed kills per operation (18),
``QCOW2SNAP_STRACE_KILLS=N`` the kills at chosen system calls (8).

The image (built with qemu-img and qemu-io: 512-byte clusters, a 512 MiB
disk, 24 MiB written in one run and 3000 scattered small writes around
three snapshots) has large metadata, so each operation runs for a few
tenths of a second.  Each operation (create, delete, revert) is first run
to completion on copies, timed while watching the file, to get the new
state; then, on fresh copies, ``python -m qcow2snap`` is killed with
SIGKILL at a moment drawn with a fixed seed: one third anywhere in the run,
two thirds a random time after its first write to the file is seen, within
the span its writes took.  The commit's writes take only milliseconds, so
a second test kills it with strace's fault injection on entry to chosen
I/O calls: before the first new cluster, before each fdatasync, before the
header write, during the hole punching, and at seeded picks.

After each kill: ``qemu-img check --output=json`` reports nothing; the
snapshot list (``qemu-img info --output=json``, creation dates aside) and
the active layer (``qemu-img map --output=json``, and the bytes at every
mapped host offset) are exactly those of the old state or of the new one;
a snapshot a timed kill left created is, for the first two such kills,
converted with ``qemu-img convert -l`` and compared with the old active
layer.  (Other snapshots' contents are covered by the check: their
clusters can only be lost by a wrong refcount.)

SIGKILL does not lose writes already in the page cache, so this tests the
order of the writes on a live system; power loss (lost and reordered
writes) is simulated in tests/test_crash.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
from collections import Counter
from pathlib import Path

import killsim
import pytest
from conftest import run
from helpers import cli_argv, qemu_img_check, require_strace, run_cli
from killsim import build_image, signature

pytestmark = pytest.mark.qemu

KILLS = int(os.environ.get("QCOW2SNAP_SIGKILLS", "18"))

OPERATIONS: dict[str, list[str]] = {
    "create": ["create", "killed-new"],
    "delete": ["delete", "--by-name", "s1"],
    "revert": ["revert", "--by-name", "s0"],
}
SEEDS = {"create": 101, "delete": 202, "revert": 303}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory, qemu_img: str, qemu_io: str) -> Path:
    path = tmp_path_factory.mktemp("sigkill") / "base.qcow2"
    build_image(path, qemu_img, qemu_io)
    return path


def content_digest(qemu_img: str, path: Path, snapshot: str | None, out: Path) -> str:
    """SHA-256 of a layer's guest content (via a sparse raw conversion)."""
    args = [qemu_img, "convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    run(*args, str(path), str(out))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for block in range(start, end, 1 << 20):
                chunk = os.pread(fd, min(1 << 20, end - block), block)
                if chunk.strip(b"\0"):
                    h.update(block.to_bytes(8, "big"))
                    h.update(chunk)
            pos = end
    out.unlink()
    return h.hexdigest()


def timed_run(operation: str, base: Path, path: Path) -> tuple[float, float, float]:
    """Run the operation to completion on a fresh copy of ``base``, watching
    the file: seconds from the start to its first write, to its last write,
    and to the exit."""
    first, last, duration, status, stderr = killsim.timed_run(
        cli_argv(*OPERATIONS[operation]), base, path)
    assert status == 0, stderr
    return first, last, duration


def kill_run(operation: str, path: Path, delay: float | None, after_write: float) -> int:
    """SIGKILL the operation on ``path`` (see :func:`killsim.kill_run`);
    returns the exit status."""
    status, stderr = killsim.kill_run(cli_argv(*OPERATIONS[operation]), path, delay,
                                      after_write)
    assert status in (0, -signal.SIGKILL), stderr
    return status


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_sigkill_leaves_old_or_new_state(operation: str, base_image: Path, qemu_img: str,
                                         tmp_path: Path) -> None:
    assert not qemu_img_check(qemu_img, base_image).problems
    old = killsim.observe(qemu_img, base_image)
    reference = tmp_path / "reference.qcow2"
    timings = sorted(timed_run(operation, base_image, reference) for _ in range(3))
    first_write, last_write, duration = timings[1]
    window = max(0.002, last_write - first_write) * 1.2
    assert not qemu_img_check(qemu_img, reference).problems
    new = killsim.observe(qemu_img, reference)
    assert old != new
    old_active = new_snapshot = None
    if operation == "create":
        old_active = content_digest(qemu_img, base_image, None, tmp_path / "raw")
        new_snapshot = content_digest(qemu_img, reference, "killed-new", tmp_path / "raw")
        assert new_snapshot == old_active

    rng = random.Random(SEEDS[operation])
    work = tmp_path / "work.qcow2"
    outcomes: Counter[str] = Counter()
    snapshots_compared = 0
    for kill in range(KILLS):
        shutil.copyfile(base_image, work)
        mtime = signature(work)
        if kill % 3:   # two thirds while it writes, the rest anywhere
            delay, after_write = None, rng.uniform(0.0, window)
            label = f"{operation}: kill {kill}, {after_write * 1000:.1f} ms after its first write"
        else:
            delay, after_write = rng.uniform(0.0, duration), 0.0
            label = f"{operation}: kill {kill} after {delay:.3f}s of ~{duration:.3f}s"
        status = kill_run(operation, work, delay, after_write)
        problems = qemu_img_check(qemu_img, work).problems
        assert not problems, (label, problems)
        state = killsim.observe(qemu_img, work)
        assert state in (old, new), f"{label}: neither the old nor the new state"
        which = "new" if state == new else "old"
        touched = signature(work) != mtime
        killed = status == -signal.SIGKILL
        outcomes[f"{which}{'-written' if touched and which == 'old' else ''}"
                 f"{'-killed' if killed else '-finished'}"] += 1
        if which == "new" and operation == "create" and snapshots_compared < 2:
            assert content_digest(qemu_img, work, "killed-new", tmp_path / "raw") == old_active
            snapshots_compared += 1
    print(f"\n{operation}: {KILLS} timed kills over ~{duration:.3f}s (writes from "
          f"~{first_write:.3f}s to ~{last_write:.3f}s): {dict(sorted(outcomes.items()))}")
    interrupted = sum(n for key, n in outcomes.items() if key.endswith("-killed"))
    # the campaign is not vacuous: a good share of kills interrupted the run
    assert interrupted >= KILLS // 3, outcomes


# ---------------------------------------------------------------------------
# kills at exact system calls (strace)

STRACE_KILLS = int(os.environ.get("QCOW2SNAP_STRACE_KILLS", "8"))
IO_CALLS = "pwrite64,fdatasync,fallocate,ftruncate"
TRACE_LINE = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+= ")


def traced_calls(operation: str, path: Path, tmp_path: Path) -> list[tuple[str, int]]:
    """[(system call, file offset or length)] of a complete run, in order."""
    out = tmp_path / "trace.txt"
    proc = run_cli(*OPERATIONS[operation], path, timeout=300,
                   prefix=[require_strace(), "-f", "-qq", "-s", "0", "-o", str(out),
                           "-e", f"trace={IO_CALLS}"])
    assert proc.returncode == 0, proc.stderr
    calls = []
    for line in out.read_text().splitlines():
        match = TRACE_LINE.match(line)
        if match:
            args = match.group(2).split(", ")
            calls.append((match.group(1), int(args[-1]) if args[-1].isdigit() else 0))
    return calls


def test_sigkill_at_every_phase_of_the_commit(base_image: Path, qemu_img: str,
                                              tmp_path: Path) -> None:
    """SIGKILL (strace's syscall fault injection) on entry to chosen I/O
    calls of each operation: the first and the last new-cluster write, both
    fdatasyncs, the header write, the first and the last hole punch or
    truncate, and seeded picks among the rest (``QCOW2SNAP_STRACE_KILLS``
    per operation, 8).  The timed kills rarely land before the commit,
    whose writes take a few milliseconds; these do, at chosen points."""
    strace = require_strace()
    old = killsim.observe(qemu_img, base_image)
    work = tmp_path / "work.qcow2"
    summary = {}
    for operation in sorted(OPERATIONS):
        shutil.copyfile(base_image, work)
        calls = traced_calls(operation, work, tmp_path)
        new = killsim.observe(qemu_img, work)
        syncs = [i for i, (name, _) in enumerate(calls) if name == "fdatasync"]
        assert len(syncs) >= 2, calls[:5]
        header = [i for i, (name, offset) in enumerate(calls)
                  if name == "pwrite64" and offset < 512]
        assert len(header) == 1, "expected one header write"
        reclaim = [i for i, (name, _) in enumerate(calls) if name in ("fallocate", "ftruncate")]
        rng = random.Random(SEEDS[operation])
        chosen = {0, header[0] - 2, *syncs, header[0]}
        if reclaim:
            chosen |= {reclaim[0], reclaim[-1]}
        rest = [i for i in range(len(calls)) if i not in chosen]
        chosen |= set(rng.sample(rest, min(len(rest), max(0, STRACE_KILLS - len(chosen)))))
        outcomes: Counter[str] = Counter()
        for index in sorted(chosen):
            name = calls[index][0]
            nth = sum(1 for c in calls[:index + 1] if c[0] == name)
            shutil.copyfile(base_image, work)
            proc = run_cli(*OPERATIONS[operation], work, timeout=300,
                           prefix=[strace, "-f", "-qq", "-o", os.devnull, "-e", f"trace={name}",
                                   "-e", f"inject={name}:signal=SIGKILL:when={nth}"])
            label = f"{operation}: SIGKILL on entry to {name} #{nth} (I/O call {index})"
            assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (
                label, proc.returncode, proc.stderr)
            problems = qemu_img_check(qemu_img, work).problems
            assert not problems, (label, problems)
            state = killsim.observe(qemu_img, work)
            assert state in (old, new), f"{label}: neither the old nor the new state"
            which = "new" if state == new else "old"
            assert which == ("old" if index <= header[0] else "new"), label
            outcomes[which] += 1
        summary[operation] = (len(calls), dict(outcomes))
    print(f"\nkills at I/O calls (calls in the run, outcomes): {summary}")


# ---------------------------------------------------------------------------
# the same kills with the memory bounds shrunk: shadow copies written while
# the edit is planned (and, for the timed kills, refcount deltas partly in a
# temporary file)

_TINY_MAIN = (
    "import runpy, sys\n"
    "from qcow2snap import refcount\n"
    "from qcow2snap.ops import refdelta, transaction\n"
    "transaction.WRITE_BUFFER_BYTES = 0\n"
    "refdelta.DELTA_MEMORY_BYTES = refdelta.MARKS_MEMORY_BYTES = {delta}\n"
    "refcount.READER_CACHE_BYTES = 1\n"
    "runpy.run_module('qcow2snap', run_name='__main__', alter_sys=True)\n")


def _tiny_bounds(monkeypatch: pytest.MonkeyPatch, delta_bytes: int) -> None:
    """``python -m qcow2snap`` of this module's tests, with tiny bounds."""
    import sys

    import helpers
    code = _TINY_MAIN.format(delta=delta_bytes)

    def tiny_argv(*args: str | os.PathLike[str]) -> list[str]:
        return [sys.executable, "-c", code, *(os.fspath(a) for a in args)]

    def tiny_run_cli(*args: str | os.PathLike[str], prefix: list[str] | tuple[str, ...] = (),
                     timeout: float = 120, **options: object) -> object:
        import subprocess
        if "stdout" not in options and "stderr" not in options:
            options["capture_output"] = True
        options.setdefault("check", False)
        return subprocess.run([*prefix, *tiny_argv(*args)], text=True, timeout=timeout,
                              **options)  # type: ignore[call-overload]

    monkeypatch.setattr(helpers, "cli_argv", tiny_argv)
    monkeypatch.setattr(sys.modules[__name__], "cli_argv", tiny_argv)
    monkeypatch.setattr(sys.modules[__name__], "run_cli", tiny_run_cli)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_sigkill_with_early_writes_and_spilled_deltas(
        operation: str, base_image: Path, qemu_img: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_bounds(monkeypatch, 64 << 10)
    test_sigkill_leaves_old_or_new_state(operation, base_image, qemu_img, tmp_path)


def test_sigkill_at_every_phase_with_early_writes(base_image: Path, qemu_img: str,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the deltas stay in memory here: the temporary file's writes would be
    # counted among the traced pwrite64 calls
    _tiny_bounds(monkeypatch, 1 << 30)
    test_sigkill_at_every_phase_of_the_commit(base_image, qemu_img, tmp_path)
