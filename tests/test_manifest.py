"""Consistency of fixtures/manifest.json with the files in fixtures/.

Checks only the manifest and the gzip files (stdlib + pytest); it does not
need QEMU or the qcow2snap library.  Regenerate the fixtures with
``python tools/make_fixtures.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
NON_FIXTURE_FILES = {"manifest.json", "README.md"}

TAGS = {
    "v2", "v3", "small-clusters", "large-clusters",
    "refcount-1", "refcount-2", "refcount-4", "refcount-8",
    "refcount-16", "refcount-32", "refcount-64",
    "zlib", "zstd", "extended-l2", "zero-clusters", "backing", "raw-backing",
    "resized-grow", "resized-shrink", "empty", "many-snapshots", "data-file",
    "luks", "aes", "savevm", "vmstate",
}


def _load() -> dict:
    return json.loads(MANIFEST.read_text())


MANIFEST_DATA = _load() if MANIFEST.exists() else {"fixtures": []}
ENTRIES = MANIFEST_DATA["fixtures"]
IDS = [e.get("name", str(i)) for i, e in enumerate(ENTRIES)]


def _gunzip_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def test_manifest_exists_and_has_header() -> None:
    assert MANIFEST.exists(), "fixtures/manifest.json is missing"
    data = _load()
    assert data["generator"] == "tools/make_fixtures.py"
    assert data["qemu_version"].startswith("qemu-img version ")
    assert data["fixtures"], "manifest lists no fixtures"


def test_names_and_files_unique() -> None:
    names = [e["name"] for e in ENTRIES]
    assert len(names) == len(set(names))
    files = [e["file"] for e in ENTRIES] + [c for e in ENTRIES for c in e["companions"]]
    assert len(files) == len(set(files)), "a file is listed twice"


def test_every_fixture_file_is_in_manifest() -> None:
    listed = {e["file"] for e in ENTRIES} | {c for e in ENTRIES for c in e["companions"]}
    on_disk = {p.name for p in FIXTURES.iterdir() if p.is_file()} - NON_FIXTURE_FILES
    assert on_disk - listed == set(), "files in fixtures/ missing from the manifest"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_entry_fields(entry: dict) -> None:
    assert entry["file"] == entry["name"] + ".qcow2.gz"
    assert entry["description"].strip()
    assert isinstance(entry["commands"], list) and entry["commands"]
    assert all(isinstance(c, str) and c for c in entry["commands"])
    assert set(entry["tags"]) <= TAGS, set(entry["tags"]) - TAGS
    assert ("v2" in entry["tags"]) != ("v3" in entry["tags"])
    assert all(c.endswith(".gz") for c in entry["companions"])
    assert set(entry.get("companion_sha256", {})) == set(entry["companions"])

    info = entry["info"]
    for key in ("filename", "actual-size", "full-backing-filename", "backing-filename-full"):
        assert key not in info
    assert info["format"] == "qcow2"
    assert entry["active"]["size"] == info["virtual-size"]
    if "luks" in entry["tags"] or "aes" in entry["tags"]:
        assert entry.get("secret")
    else:
        assert len(entry["active"]["sha256"]) == 64

    snaps = entry["snapshots"]
    info_snaps = info.get("snapshots", [])
    assert [(s["id"], s["name"], s["vm_state_size"]) for s in snaps] == [
        (s["id"], s["name"], s["vm-state-size"]) for s in info_snaps
    ]
    for s in snaps:
        assert s["how"] in ("convert-l", "revert-copy")
        assert (s["how"] == "convert-l") == (s["disk_size"] == info["virtual-size"])
        assert s["sha256"] is None or len(s["sha256"]) == 64
        if "savevm" in entry:
            assert s["runstate"] in ("prelaunch", "running", "paused", "suspended")
    if "vmstate" in entry["tags"]:
        assert any(s["vm_state_size"] > 0 for s in snaps)
    if "data-file" in entry["tags"]:
        assert snaps == []


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_files_exist_and_hashes_match(entry: dict) -> None:
    image = FIXTURES / entry["file"]
    assert image.is_file(), f"{entry['file']} missing"
    digest, size = _gunzip_digest(image)
    assert size == entry["size"]
    assert digest == entry["sha256"]
    with gzip.open(image, "rb") as f:
        assert f.read(4) == b"QFI\xfb"
    for comp in entry["companions"]:
        path = FIXTURES / comp
        assert path.is_file(), f"companion {comp} missing"
        digest, size = _gunzip_digest(path)
        assert digest == entry["companion_sha256"][comp]
        if "companion_size" in entry:
            assert size == entry["companion_size"][comp]
