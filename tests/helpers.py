"""Shared test helpers, one of each kind:

- the command line: :func:`invoke` runs it in-process (click's CliRunner),
  :func:`run_cli` as a real ``python -m qcow2snap`` process
  (:func:`cli_argv` is its argument list);
- ``qemu-img check``: :func:`qemu_img_check` runs it with JSON output and
  gives a :class:`QemuCheck` that judges it (``clean``, ``problems``);
  :func:`assert_qemu_clean` asserts that it finds nothing;
- what a test needs from the machine: :func:`require_tool`,
  :func:`require_strace` and :func:`missing`, which skips a test, or fails it
  where the environment makes the requirement mandatory
  (``QCOW2SNAP_REQUIRE_QEMU=1``, ``QCOW2SNAP_REQUIRE_QEMU_SYSTEM=1`` and
  ``QCOW2SNAP_REQUIRE_BLOCKDEV=1``, as ``.ci/run`` sets them).

The tests import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``);
the fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
from click.testing import CliRunner, Result

from qcow2snap.cli import cli

# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def invoke(*args: str | os.PathLike[str]) -> Result:
    """Run the CLI in-process; stdout and stderr stay separate (click >= 8.2)."""
    return CliRunner().invoke(cli, [os.fspath(a) for a in args], prog_name="qcow2snap")


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    """The argument list of ``python -m qcow2snap ARGS`` with this interpreter."""
    return [sys.executable, "-m", "qcow2snap", *(os.fspath(a) for a in args)]


def run_cli(*args: str | os.PathLike[str], prefix: Sequence[str] = (), timeout: float = 120,
            **options: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qcow2snap ARGS`` as a process (after ``prefix``: strace
    and its options, say), with text output captured unless ``stdout`` or
    ``stderr`` is given; other ``options`` go to :func:`subprocess.run`.  The
    exit status is the caller's to judge (``check=False`` unless given)."""
    if "stdout" not in options and "stderr" not in options:
        options["capture_output"] = True
    options.setdefault("check", False)
    return subprocess.run([*prefix, *cli_argv(*args)], text=True, timeout=timeout, **options)


# ---------------------------------------------------------------------------
# qemu-img check
# ---------------------------------------------------------------------------

#: What ``qemu-img check --output=json`` counts; a clean image has none.
CHECK_COUNTS = ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed")


@dataclass(frozen=True)
class QemuCheck:
    """One ``qemu-img check --output=json``: its exit status, its report
    (``{}`` where it printed no JSON object) and its output."""

    returncode: int
    report: dict[str, Any]
    stdout: str
    stderr: str

    @classmethod
    def of(cls, proc: subprocess.CompletedProcess[str]) -> QemuCheck:
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            report = None
        return cls(proc.returncode, report if isinstance(report, dict) else {}, proc.stdout,
                   proc.stderr)

    @property
    def problems(self) -> list[str]:
        """Everything qemu-img check counts or fails with (empty: a clean image)."""
        found = [f"{key}={self.report[key]}" for key in CHECK_COUNTS if self.report.get(key)]
        if self.returncode != 0 or not self.report:
            said = " | ".join((self.stderr.strip() or self.stdout.strip()).splitlines()[:3])
            found.append(f"exit {self.returncode}: {said}")
        return found

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def error_lines(self) -> list[str]:
        """The ``ERROR ...`` lines on stderr (one a corruption)."""
        return [line for line in self.stderr.splitlines() if line.startswith("ERROR")]


def _image_dir(image: str | os.PathLike[str],
               cwd: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """Where to run a QEMU tool on ``image``: ``cwd``, else the directory of
    an image file (QEMU finds a relative external data file name there)."""
    if cwd is None and os.path.isfile(image):
        return os.path.dirname(os.path.abspath(image))
    return cwd


def qemu_img_check(qemu_img: str, image: str | os.PathLike[str], *options: str,
                   cwd: str | os.PathLike[str] | None = None, timeout: float = 120) -> QemuCheck:
    """``qemu-img check --output=json OPTIONS IMAGE``, run in ``cwd`` (by
    default the image file's directory)."""
    proc = subprocess.run([qemu_img, "check", "--output=json", *options, os.fspath(image)],
                          cwd=_image_dir(image, cwd), capture_output=True, text=True,
                          timeout=timeout, check=False)
    return QemuCheck.of(proc)


def assert_qemu_clean(qemu_img: str, image: str | os.PathLike[str], *options: str,
                      cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """qemu-img check finds nothing in ``image``; returns its JSON report.  A
    failure shows what it found, and its human-readable output."""
    check = qemu_img_check(qemu_img, image, *options, cwd=cwd)
    if not check.clean:
        human = subprocess.run([qemu_img, "check", *options, os.fspath(image)],
                               cwd=_image_dir(image, cwd), capture_output=True, text=True,
                               timeout=120, check=False)
        raise AssertionError(f"qemu-img check {os.fspath(image)}: {check.problems}\n"
                             f"{human.stdout}{human.stderr}")
    return check.report


# ---------------------------------------------------------------------------
# requirements: skip, or fail where the environment makes them mandatory
# ---------------------------------------------------------------------------

REQUIRE_QEMU = "QCOW2SNAP_REQUIRE_QEMU"
REQUIRE_QEMU_SYSTEM = "QCOW2SNAP_REQUIRE_QEMU_SYSTEM"
REQUIRE_BLOCKDEV = "QCOW2SNAP_REQUIRE_BLOCKDEV"


def missing(what: str, reason: str, env: str | None = REQUIRE_QEMU) -> NoReturn:
    """``what`` is not available here (``reason``): skip the test, or fail it
    where the environment variable ``env`` is ``1`` (``None``: always skip)."""
    if env is not None and os.environ.get(env) == "1":
        pytest.fail(f"{what} is required ({env}=1) but {reason}")
    pytest.skip(f"{what}: {reason}" + (f" (set {env}=1 to fail instead)" if env else ""))


def require_tool(name: str) -> str:
    """The path of the program ``name``; missing, it is required under
    ``QCOW2SNAP_REQUIRE_QEMU_SYSTEM=1`` for ``qemu-system-*``, under
    ``QCOW2SNAP_REQUIRE_QEMU=1`` for the others (qemu-img, qemu-io, strace)."""
    path = shutil.which(name)
    if path is None:
        missing(name, "it is not installed",
                REQUIRE_QEMU_SYSTEM if name.startswith("qemu-system-") else REQUIRE_QEMU)
    return path


def require_strace() -> str:
    """strace, able to trace here (ptrace may be forbidden)."""
    strace = require_tool("strace")
    if subprocess.run([strace, "-qq", "-o", os.devnull, "true"], check=False,
                      capture_output=True).returncode != 0:
        missing("strace", "it cannot trace here (ptrace not permitted)")
    return strace
