"""Shared fixtures: the fixture corpus and the QEMU oracle (the helpers
that run the CLI, qemu-img check and judge requirements are in
``helpers.py``).

Fixtures live gzipped in ``fixtures/`` with ``fixtures/manifest.json``
(made by ``tools/make_fixtures.py``).  ``fixture_dir`` unpacks the whole
corpus once per session into a read-only directory; ``fixture_copy`` gives a
test its own writable copy of one image and its companions.

Oracle tests use the ``qemu_img`` fixture: they skip when qemu-img is not
installed, unless ``QCOW2SNAP_REQUIRE_QEMU=1`` (set by ``.ci/run``), which
turns the skip into a failure (:func:`helpers.require_tool`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("QCOW2SNAP_FIXTURES_DIR", ROOT / "fixtures"))
MANIFEST_PATH = FIXTURES / "manifest.json"


def load_manifest() -> dict[str, Any]:
    if not MANIFEST_PATH.exists():
        return {"fixtures": []}
    return json.loads(MANIFEST_PATH.read_text())


MANIFEST = load_manifest()
FIXTURE_ENTRIES: list[dict[str, Any]] = MANIFEST["fixtures"]
FIXTURES_BY_NAME = {f["name"]: f for f in FIXTURE_ENTRIES}


def fixtures_with(*tags: str, without: tuple[str, ...] = ()) -> list[str]:
    """Names of fixtures carrying all ``tags`` and none of ``without``."""
    return [f["name"] for f in FIXTURE_ENTRIES
            if all(t in f.get("tags", []) for t in tags)
            and not any(t in f.get("tags", []) for t in without)]


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return require_tool("qemu-io")


def _unpack(gz_name: str, dest_dir: Path) -> Path:
    out_name = gz_name[:-3] if gz_name.endswith(".gz") else gz_name
    out = dest_dir / out_name
    if not out.exists():
        with gzip.open(FIXTURES / gz_name, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fixture unpacked once, made read-only (tests must not write)."""
    dest = tmp_path_factory.mktemp("fixtures")
    for entry in FIXTURE_ENTRIES:
        for name in [entry["file"], *entry.get("companions", [])]:
            path = _unpack(name, dest)
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return dest


def fixture_path(fixture_dir: Path, name: str) -> Path:
    entry = FIXTURES_BY_NAME[name]
    return fixture_dir / entry["file"][:-3]


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Iterator[Any]:
    """``fixture_copy(name)`` -> writable path of a fresh copy (with companions)."""
    def make(name: str) -> Path:
        entry = FIXTURES_BY_NAME[name]
        for companion in entry.get("companions", []):
            _unpack(companion, tmp_path)
        return _unpack(entry["file"], tmp_path)
    yield make


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def place_companion(source: Path | str, destination: Path | str) -> None:
    """Put a companion file (backing or data file) beside an image in another
    directory: a hard link, else a copy.  Not a symlink: qcow2snap follows a
    companion named by an image only where its real path lies in the
    image's directory (or an allowed one)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def run(*args: str, cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, check=check, capture_output=True, text=True)
