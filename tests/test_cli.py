"""The ``qcow2snap`` command line, driven through click's CliRunner.

What is checked here is the CLI's contract: the JSON keys and values (the
qemu-img ones against ``qemu-img info --output=json`` as recorded in the
manifest), the text layouts, snapshot resolution, exit codes and the
one-line error messages.  Data correctness of extraction is checked on a few
fixtures through the manifest's hashes; the exhaustive comparison with
qemu-img lives in the oracle tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import Result
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, fixture_path, fixtures_with, sha256_file
from helpers import assert_qemu_clean, invoke, run_cli

import qcow2snap
from qcow2snap import errors
from qcow2snap.cli import cli
from qcow2snap.describe import size_to_str
from qcow2snap.lazy_group import LazyGroup

ALL_FIXTURES = [e["name"] for e in FIXTURE_ENTRIES]
WITH_SNAPSHOTS = [e["name"] for e in FIXTURE_ENTRIES if e["snapshots"]]

# The keys of ``qemu-img info --output=json`` that qcow2snap reproduces with
# the same values (the manifest drops filename, actual-size and
# full-backing-filename, which depend on the machine).
QEMU_TOP_KEYS = ("virtual-size", "cluster-size", "format", "dirty-flag", "encrypted",
                 "backing-filename", "backing-filename-format")
QEMU_FORMAT_DATA_KEYS = ("compat", "compression-type", "lazy-refcounts", "refcount-bits",
                         "corrupt", "extended-l2", "data-file", "data-file-raw")
QEMU_SNAPSHOT_KEYS = ("id", "name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec",
                      "vm-state-size")

ERROR_PREFIX = "qcow2snap: error: "


def test_lazy_commands_table_is_the_commands() -> None:
    """The group lists the commands it loads on first use (cli._LAZY_COMMANDS)
    with the help click gives the loaded commands, at any width, and every
    command is in the table or defined with the group (info, list)."""
    import subprocess
    import sys

    from qcow2snap import cli as cli_module

    def listing(columns: int, *, load_all: bool) -> str:
        code = ("from qcow2snap.cli import cli, main\n"
                + ("cli.load_all()\n" if load_all else "") + "main(['--help'])")
        env = {**os.environ, "COLUMNS": str(columns)}
        return subprocess.run([sys.executable, "-c", code], env=env,
                              capture_output=True, text=True, check=True).stdout

    for columns in (40, 100, 200):
        lazy = listing(columns, load_all=False)
        assert "export-chain" in lazy
        assert lazy == listing(columns, load_all=True)
    cli.load_all()
    assert set(cli.commands) == {*cli_module._LAZY_COMMANDS, "info", "list"}


def test_unknown_command_suggests_a_lazy_one() -> None:
    """click's "Did you mean" looks at every command, loaded or not."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qcow2snap", "extrac"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "No such command 'extrac'. Did you mean 'extract'?" in proc.stderr


def ok(*args: str | os.PathLike[str]) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    return result


def assert_error(result: Result, exit_code: int, *fragments: str) -> str:
    """One ``qcow2snap: error:`` line on stderr, nothing on stdout, no
    traceback; returns the message."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0][len(ERROR_PREFIX):]


def image(fixture_dir: Path, name: str) -> Path:
    return fixture_path(fixture_dir, name)


def snapshot_entries(name: str) -> list[dict[str, Any]]:
    return FIXTURES_BY_NAME[name]["snapshots"]


def assert_qemu_snapshot_keys(ours: dict[str, Any], qemu: dict[str, Any]) -> None:
    for key in QEMU_SNAPSHOT_KEYS:
        assert ours[key] == qemu[key], key
        assert type(ours[key]) is type(qemu[key]), key
    # icount: present exactly when qemu-img shows it (absent for savevm snapshots)
    assert ("icount" in ours) == ("icount" in qemu)
    if "icount" in qemu:
        assert ours["icount"] == qemu["icount"]


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_info_json_matches_qemu_img(fixture_dir: Path, name: str) -> None:
    entry = FIXTURES_BY_NAME[name]
    qemu = entry["info"]
    ours = json.loads(ok("info", "--json", image(fixture_dir, name)).stdout)

    for key in QEMU_TOP_KEYS:
        assert (key in ours) == (key in qemu), key
        if key in qemu:
            assert ours[key] == qemu[key], key
    assert ours["format-specific"]["type"] == qemu["format-specific"]["type"] == "qcow2"
    qdata = qemu["format-specific"]["data"]
    odata = ours["format-specific"]["data"]
    for key in QEMU_FORMAT_DATA_KEYS:
        assert (key in odata) == (key in qdata), key
        if key in qdata:
            assert odata[key] == qdata[key], key
    if "encrypt" in qdata:  # qemu-img shows the LUKS header; we show its format
        assert odata["encrypt"]["format"] == qdata["encrypt"]["format"]

    # "snapshots" is omitted, as by qemu-img, when there are none
    assert ("snapshots" in ours) == ("snapshots" in qemu)
    snaps = ours.get("snapshots", [])
    assert len(snaps) == len(qemu.get("snapshots", [])) == len(entry["snapshots"])
    for o, q, m in zip(snaps, qemu.get("snapshots", []), entry["snapshots"], strict=True):
        assert_qemu_snapshot_keys(o, q)
        # qcow2snap's own keys
        assert o["disk-size"] == m["disk_size"]
        assert "vm-state-offset" in o if m["vm_state_size"] else "vm-state-offset" not in o

    # machine-specific qemu keys are there too, and our own top-level keys
    assert ours["filename"] == os.fspath(image(fixture_dir, name))
    assert isinstance(ours["actual-size"], int)
    assert ours["version"] == (2 if "v2" in entry["tags"] else 3)
    assert ours["nb-snapshots"] == len(entry["snapshots"])
    assert ours["file-length"] == entry["size"]
    assert set(ours["features"]) == {"incompatible", "compatible", "autoclear"}
    assert ours["in-use"] is False


def test_info_json_backing_chain(fixture_dir: Path) -> None:
    ours = json.loads(ok("info", "--json", image(fixture_dir, "backing-chain")).stdout)
    base = fixture_dir / "backing-chain.base.qcow2"
    assert ours["full-backing-filename"] == os.fspath(base)
    assert [(b["filename"], b["format"]) for b in ours["backing-chain"]] == [
        (os.fspath(base), "qcow2")]
    ours = json.loads(ok("info", "--json", image(fixture_dir, "raw-backing")).stdout)
    assert ours["backing-chain"][0]["format"] == "raw"


@pytest.mark.parametrize("name", ["v2", "v3-basic", "backing-chain", "savevm", "luks",
                                  "data-file"])
def test_info_text(fixture_dir: Path, name: str) -> None:
    entry = FIXTURES_BY_NAME[name]
    path = image(fixture_dir, name)
    lines = ok("info", path).stdout.splitlines()
    size = entry["info"]["virtual-size"]
    assert lines[0] == f"image: {path}"
    assert lines[1] == "file format: qcow2"
    assert lines[2] == f"virtual size: {size_to_str(size)} ({size} bytes)"
    assert f"cluster_size: {entry['info']['cluster-size']}" in lines
    assert "Format specific information:" in lines
    assert f"    compat: {entry['info']['format-specific']['data']['compat']}" in lines
    if "backing-filename" in entry["info"]:
        assert f"backing file: {entry['info']['backing-filename']}" in lines
    if entry["snapshots"]:
        start = lines.index("Snapshot list:")
        assert lines[start + 1].split()[:4] == ["ID", "TAG", "VM_SIZE", "DISK_SIZE"]
        rows = lines[start + 2:start + 2 + len(entry["snapshots"])]
        assert [r.split()[:2] for r in rows] == [[s["id"], s["name"]]
                                                 for s in entry["snapshots"]]
    else:
        assert "Snapshot list:" not in lines


# ---------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------

def parse_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a snapshot table (names have no spaces in the
    fixtures, so whitespace splitting is exact)."""
    lines = text.splitlines()
    return lines[0].split(), [line.split() for line in lines[1:]]


@pytest.mark.parametrize("name", ["v2", "v3-basic", "ambiguous", "resized-shrink",
                                  "resized-grow", "savevm", "many-snapshots"])
def test_list_text(fixture_dir: Path, name: str) -> None:
    out = ok("list", image(fixture_dir, name)).stdout
    assert out.startswith("Snapshot list:\n")
    header, rows = parse_rows(out.split("\n", 1)[1])
    snaps = snapshot_entries(name)
    # images with VM-state snapshots get a last RUNSTATE column
    runstate = ["RUNSTATE"] if any(s["vm_state_size"] for s in snaps) else []
    assert header == ["ID", "TAG", "VM_SIZE", "DISK_SIZE", "DATE", "VM_CLOCK", "ICOUNT",
                      *runstate]
    assert len(rows) == len(snaps)
    for row, snap in zip(rows, snaps, strict=True):
        assert row[0] == snap["id"]
        assert row[1] == snap["name"]
        assert " ".join(row[2:4]) == size_to_str(snap["vm_state_size"])
        assert " ".join(row[4:6]) == size_to_str(snap["disk_size"])
        if runstate:
            assert row[-1] == snap.get("runstate", "--")


def test_list_disk_size_column_follows_resize(fixture_dir: Path) -> None:
    _, rows = parse_rows(ok("list", image(fixture_dir, "resized-shrink")).stdout
                         .split("\n", 1)[1])
    assert [" ".join(r[4:6]) for r in rows] == ["64 MiB", "24 MiB"]


def test_list_icount_column(fixture_dir: Path) -> None:
    # qemu-img snapshot -c stores icount 0; savevm (without icount mode) stores none
    _, rows = parse_rows(ok("list", image(fixture_dir, "v3-basic")).stdout.split("\n", 1)[1])
    assert {r[-1] for r in rows} == {"0"}
    _, rows = parse_rows(ok("list", image(fixture_dir, "savevm")).stdout.split("\n", 1)[1])
    assert {r[9] for r in rows} == {"--"}  # r[10] is RUNSTATE


@pytest.mark.parametrize("name", ["v3-basic", "savevm", "ambiguous", "many-snapshots"])
def test_list_text_agrees_with_qemu_img(fixture_dir: Path, qemu_img: str, name: str) -> None:
    """ID, tag, VM size, date (local time) and VM clock agree with
    ``qemu-img snapshot -l`` (7.2 layout: 2-digit hours, no DISK_SIZE)."""
    path = image(fixture_dir, name)
    qemu = subprocess.run([qemu_img, "snapshot", "-l", os.fspath(path)], check=True,
                          capture_output=True, text=True).stdout.splitlines()
    ours = ok("list", path).stdout.splitlines()
    assert qemu[0] == ours[0] == "Snapshot list:"
    assert len(qemu) == len(ours)

    def clock(text: str) -> tuple[int, ...]:
        hms, ms = text.split(".")
        return (*(int(x) for x in hms.split(":")), int(ms))

    for q, o in zip(qemu[2:], ours[2:], strict=True):
        qf, of = q.split(), o.split()
        assert of[:4] == qf[:4]             # id, tag, vm size (number, unit)
        assert of[6:8] == qf[4:6]           # date, time
        assert clock(of[8]) == clock(qf[6])


def test_list_empty_image_prints_nothing(fixture_dir: Path) -> None:
    assert not snapshot_entries("data-file")
    result = ok("list", image(fixture_dir, "data-file"))
    assert result.stdout == ""
    assert result.stderr == ""
    assert json.loads(ok("list", "--json", image(fixture_dir, "data-file")).stdout) == []


@pytest.mark.parametrize("name", WITH_SNAPSHOTS)
def test_list_json_matches_qemu_img(fixture_dir: Path, name: str) -> None:
    ours = json.loads(ok("list", "--json", image(fixture_dir, name)).stdout)
    entry = FIXTURES_BY_NAME[name]
    assert isinstance(ours, list)
    assert len(ours) == len(entry["info"]["snapshots"])
    for o, q, m in zip(ours, entry["info"]["snapshots"], entry["snapshots"], strict=True):
        assert_qemu_snapshot_keys(o, q)
        assert o["disk-size"] == m["disk_size"]
    # the same objects as in info --json
    info = json.loads(ok("info", "--json", image(fixture_dir, name)).stdout)
    assert ours == info["snapshots"]


@pytest.fixture
def two_disks(fixture_copy: Any, tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    """Two copies of v3-basic; QEMU deleted snapshot "second" from the second."""
    a = fixture_copy("v3-basic")
    b = tmp_path / "b.qcow2"
    shutil.copyfile(a, b)
    subprocess.run([qemu_img, "snapshot", "-d", "second", os.fspath(b)], check=True)
    return a, b


def test_list_several_images_text(two_disks: tuple[Path, Path]) -> None:
    a, b = two_disks
    out = ok("list", a, b).stdout
    common_part, missing_part = out.split("\n\n")
    lines = common_part.splitlines()
    assert lines[0] == "Snapshots present on all 2 images:"
    header, rows = parse_rows("\n".join(lines[1:]))
    assert header[:4] == ["ID", "TAG", "VM_SIZE", "DISK_SIZE"]
    assert [r[:2] for r in rows] == [["--", "first"], ["--", "third"]]  # IDs may differ
    assert missing_part.splitlines() == [
        "Snapshots missing on some images:",
        f"  second: present on {a}; missing on {b}",
    ]


def test_list_several_images_json(two_disks: tuple[Path, Path]) -> None:
    a, b = two_disks
    data = json.loads(ok("list", "--json", a, b).stdout)
    assert set(data) == {"images", "common", "partial"}
    assert [i["filename"] for i in data["images"]] == [os.fspath(a), os.fspath(b)]
    assert [[s["name"] for s in i["snapshots"]] for i in data["images"]] == [
        ["first", "second", "third"], ["first", "third"]]
    assert data["common"] == ["first", "third"]
    assert data["partial"] == [{"name": "second", "present": [os.fspath(a)],
                                "missing": [os.fspath(b)]}]


def test_list_several_images_nothing_in_common(fixture_dir: Path) -> None:
    a, b = image(fixture_dir, "v3-basic"), image(fixture_dir, "data-file")
    out = ok("list", a, b).stdout
    assert out.startswith("No snapshot is present on all 2 images.\n")
    assert f"  first: present on {a}; missing on {b}" in out.splitlines()


def test_list_needs_an_image() -> None:
    result = invoke("list")
    assert result.exit_code == 2
    assert "Missing argument" in result.stderr


# ---------------------------------------------------------------------------
# Errors: one line, the exit status of the exception class, --debug
# ---------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_stable() -> None:
    assert errors.Qcow2Error.exit_code == 1
    assert errors.NotQcow2Error.exit_code == 1
    assert errors.CorruptImageError.exit_code == 3
    assert errors.UnsupportedImageError.exit_code == 4
    assert errors.ImageInUseError.exit_code == 5
    assert errors.SnapshotNotFoundError.exit_code == 6
    assert errors.AmbiguousSnapshotError.exit_code == 7
    assert errors.NoVMStateError.exit_code == 8


def test_error_nonexistent_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    cases: list[list[str | Path]] = [
        ["info", missing],
        ["info", "--json", missing],
        ["list", missing],
        ["extract", "1", missing, "-o", tmp_path / "out.raw"],
        ["vmstate", "dump", "1", missing, "-o", tmp_path / "out.vm"],
    ]
    for args in cases:
        message = assert_error(invoke(*args), 1, os.fspath(missing))
        assert "No such file or directory" in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"QFI", b"hello, world\n" * 100,
                                     b"QFI\xfb" + bytes(20)])
def test_error_not_qcow2(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not.qcow2"
    path.write_bytes(content)
    for command in ("info", "list"):
        message = assert_error(invoke(command, path), errors.NotQcow2Error.exit_code)
        assert message.startswith("Image is not in qcow2 format")


def test_error_ambiguous_reference(fixture_dir: Path, tmp_path: Path) -> None:
    # id 1 is named 'x'; id 2 is named '1': "1" matches both
    path = image(fixture_dir, "ambiguous")
    out = tmp_path / "out.raw"
    message = assert_error(invoke("extract", "1", path, "-o", out), 7,
                           "ambiguous", "ID '1' name 'x'", "ID '2' name '1'",
                           "--by-id", "--by-name")
    assert os.fspath(path) in message
    assert not out.exists()
    # duplicate names are ambiguous too, also with --by-name
    assert_error(invoke("extract", "dup", path, "-o", out), 7,
                 "ID '3' name 'dup'", "ID '4' name 'dup'")
    assert_error(invoke("extract", "--by-name", "dup", path, "-o", out), 7,
                 "ID '3' name 'dup'", "ID '4' name 'dup'")
    assert_error(invoke("vmstate", "dump", "1", path, "-o", out), 7, "ID '2' name '1'")
    assert os.listdir(tmp_path) == []


def test_by_id_and_by_name_resolve_ambiguity(fixture_dir: Path, tmp_path: Path) -> None:
    path = image(fixture_dir, "ambiguous")
    snaps = {s["id"]: s for s in snapshot_entries("ambiguous")}
    cases = [(["--by-id", "1"], "1"), (["--by-name", "1"], "2"), (["--by-id", "4"], "4"),
             (["x"], "1"), (["--by-name", "x"], "1")]
    for i, (ref, expected_id) in enumerate(cases):
        out = tmp_path / f"out{i}.raw"
        data = json.loads(ok("extract", *ref, path, "-o", out, "--json").stdout)
        assert data["snapshot"] == expected_id
        assert sha256_file(out) == snaps[expected_id]["sha256"]


def test_by_id_and_by_name_exclude_each_other(fixture_dir: Path, tmp_path: Path) -> None:
    result = invoke("extract", "--by-id", "--by-name", "1", image(fixture_dir, "ambiguous"),
                    "-o", tmp_path / "out.raw")
    assert result.exit_code == 2
    assert "--by-id and --by-name exclude each other" in result.stderr


def test_error_snapshot_not_found(fixture_dir: Path, tmp_path: Path) -> None:
    path = image(fixture_dir, "v3-basic")
    out = tmp_path / "out.raw"
    assert_error(invoke("extract", "nope", path, "-o", out), 6, "'nope'")
    # by ID, a name does not match (and the reverse)
    assert_error(invoke("extract", "--by-id", "first", path, "-o", out), 6, "ID")
    assert_error(invoke("extract", "--by-name", "1", path, "-o", out), 6, "named")
    assert_error(invoke("vmstate", "dump", "nope", image(fixture_dir, "savevm"), "-o", out), 6)
    assert os.listdir(tmp_path) == []


def test_error_vmstate_of_disk_only_snapshot(fixture_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "vm.bin"
    assert_error(invoke("vmstate", "dump", "first", image(fixture_dir, "v3-basic"), "-o", out),
                 8, "disk-only")
    assert not out.exists()


def test_error_encrypted_extract(fixture_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a passphrase: one line naming the ways to give it."""
    monkeypatch.delenv("QCOW2SNAP_PASSPHRASE", raising=False)
    assert_error(invoke("extract", "1", image(fixture_dir, "luks"), "-o", tmp_path / "o.raw"),
                 errors.BadPassphraseError.exit_code, "encrypted")
    assert os.listdir(tmp_path) == []


def test_debug_shows_traceback(fixture_dir: Path, tmp_path: Path) -> None:
    result = invoke("--debug", "extract", "1", image(fixture_dir, "ambiguous"),
                    "-o", tmp_path / "o.raw")
    assert result.exit_code == 7
    assert "Traceback (most recent call last)" in result.stderr
    assert "AmbiguousSnapshotError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(ERROR_PREFIX)

    missing = tmp_path / "missing.qcow2"
    result = invoke("--debug", "info", missing)
    assert result.exit_code == 1
    assert "FileNotFoundError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(ERROR_PREFIX)


def test_errors_from_a_real_process(fixture_dir: Path) -> None:
    """Exit status and stderr as a shell sees them (python -m qcow2snap)."""
    proc = run_cli("extract", "dup", image(fixture_dir, "ambiguous"), "-o", os.devnull)
    assert proc.returncode == 7
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(ERROR_PREFIX)


# ---------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------

EXTRACT_CASES = [
    ("v2", "2"),
    ("v3-basic", "1"),
    ("v3-basic", "3"),
    ("clusters-512", "1"),
    ("compressed-zstd", "1"),
    ("extended-l2", "1"),
    ("backing-chain", "1"),
    ("raw-backing", "2"),
    ("resized-grow", "1"),     # taken at 32 MiB, image now 80 MiB
    ("resized-shrink", "1"),   # taken at 64 MiB, image now 24 MiB
    ("savevm", "2"),
]


@pytest.mark.parametrize(("name", "snapshot_id"), EXTRACT_CASES,
                         ids=[f"{n}-{i}" for n, i in EXTRACT_CASES])
def test_extract_raw_matches_manifest(fixture_dir: Path, tmp_path: Path, name: str,
                                      snapshot_id: str) -> None:
    snap = next(s for s in snapshot_entries(name) if s["id"] == snapshot_id)
    out = tmp_path / "out.raw"
    result = ok("extract", "--by-id", snapshot_id, image(fixture_dir, name), "-o", out)
    assert result.stdout == ""
    assert result.stderr == ""          # no progress bar: stderr is not a terminal
    # the snapshot's own disk size, not the image's current one
    assert out.stat().st_size == snap["disk_size"]
    assert sha256_file(out) == snap["sha256"]
    assert os.listdir(tmp_path) == ["out.raw"]   # no temporary file left


@pytest.mark.parametrize("name", ["v3-basic", "resized-shrink", "backing-chain",
                                  "compressed-zlib"])
def test_extract_active_layer(fixture_dir: Path, tmp_path: Path, name: str) -> None:
    active = FIXTURES_BY_NAME[name]["active"]
    out = tmp_path / "active.raw"
    data = json.loads(ok("extract", "-", image(fixture_dir, name), "-o", out, "--json").stdout)
    assert data["snapshot"] is None
    assert data["virtual-size"] == active["size"] == out.stat().st_size
    assert sha256_file(out) == active["sha256"]


def test_extract_json(fixture_dir: Path, tmp_path: Path) -> None:
    snap = snapshot_entries("resized-grow")[0]
    out = tmp_path / "s.raw"
    data = json.loads(ok("extract", snap["name"], image(fixture_dir, "resized-grow"),
                         "-o", out, "--json").stdout)
    assert data == {"output": os.fspath(out), "format": "raw",
                    "virtual-size": snap["disk_size"],
                    "bytes-written": data["bytes-written"], "snapshot": snap["id"]}
    assert 0 < data["bytes-written"] <= snap["disk_size"]
    assert out.stat().st_blocks * 512 < snap["disk_size"]  # sparse


def test_extract_refuses_existing_output_unless_forced(fixture_dir: Path,
                                                       tmp_path: Path) -> None:
    path = image(fixture_dir, "v3-basic")
    out = tmp_path / "out.raw"
    out.write_bytes(b"keep me")
    assert_error(invoke("extract", "first", path, "-o", out), 1, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    ok("extract", "first", path, "-o", out, "-f")
    assert sha256_file(out) == snapshot_entries("v3-basic")[0]["sha256"]
    ok("extract", "second", path, "-o", out, "--force")
    assert sha256_file(out) == snapshot_entries("v3-basic")[1]["sha256"]
    assert os.listdir(tmp_path) == ["out.raw"]


def test_extract_refuses_to_overwrite_its_source(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    before = sha256_file(path)
    assert_error(invoke("extract", "first", path, "-o", path, "-f"), 1, "source image")
    assert sha256_file(path) == before


def test_extract_usage_errors(fixture_dir: Path, tmp_path: Path) -> None:
    path = image(fixture_dir, "v3-basic")
    result = invoke("extract", "first", path)                # -o is required
    assert result.exit_code == 2
    assert "'-o' / '--output'" in result.stderr
    for compress in (["-c"], ["--compression-type", "zstd"]):
        result = invoke("extract", "first", path, "-o", tmp_path / "o", *compress)
        assert result.exit_code == 2
        assert "--compress needs -O qcow2" in result.stderr
    result = invoke("extract", "first", path, "-o", tmp_path / "o", "-O", "vmdk")
    assert result.exit_code == 2
    assert os.listdir(tmp_path) == []


def test_extract_compress_flag_takes_no_value(fixture_dir: Path, tmp_path: Path) -> None:
    """-c is a plain flag: the word after it stays an argument."""
    path = image(fixture_dir, "v3-basic")
    out = tmp_path / "o.qcow2"
    data = json.loads(ok("extract", "-O", "qcow2", "-c", "first", path, "-o", out,
                         "--json").stdout)
    assert data["format"] == "qcow2" and out.exists()
    with qcow2snap.open(out) as extracted:
        assert extracted.compression_type_name == "zlib"


def test_extract_snapshot_named_dash(fixture_copy: Any, tmp_path: Path, qemu_img: str) -> None:
    """'-' is the active layer; a snapshot really named '-' needs --by-name."""
    path = fixture_copy("v3-basic")
    subprocess.run([qemu_img, "snapshot", "-c", "-", os.fspath(path)], check=True)
    subprocess.run([qemu_img, "snapshot", "-c", "dash-is-not-this", os.fspath(path)],
                   check=True)
    data = json.loads(ok("extract", "--by-name", "-", path, "-o", tmp_path / "named.raw",
                         "--json").stdout)
    assert data["snapshot"] == "4"
    data = json.loads(ok("extract", "-", path, "-o", tmp_path / "active.raw", "--json").stdout)
    assert data["snapshot"] is None
    active = FIXTURES_BY_NAME["v3-basic"]["active"]["sha256"]
    assert sha256_file(tmp_path / "named.raw") == sha256_file(tmp_path / "active.raw") == active


@pytest.mark.parametrize(("name", "compress"), [("v3-basic", None), ("compressed-zstd", "zstd"),
                                                ("backing-chain", "zlib"),
                                                ("resized-shrink", None)])
def test_extract_qcow2_passes_check_and_compare(fixture_dir: Path, tmp_path: Path,
                                                qemu_img: str, name: str,
                                                compress: str | None) -> None:
    snap = snapshot_entries(name)[0]
    src = image(fixture_dir, name)
    raw, q2 = tmp_path / "out.raw", tmp_path / "out.qcow2"
    ok("extract", "--by-id", snap["id"], src, "-o", raw)
    args = ["extract", "--by-id", snap["id"], src, "-o", q2, "-O", "qcow2", "--json"]
    if compress:
        args += ["-c", "--compression-type", compress]
    data = json.loads(ok(*args).stdout)
    assert data["format"] == "qcow2"
    assert data["virtual-size"] == snap["disk_size"]

    assert_qemu_clean(qemu_img, q2)
    compare = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "raw",
                              os.fspath(q2), os.fspath(raw)], capture_output=True, text=True,
                             check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", os.fspath(q2)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == snap["disk_size"]
    assert "snapshots" not in info and "backing-filename" not in info
    expected_type = "zstd" if compress == "zstd" else "zlib"
    assert info["format-specific"]["data"]["compression-type"] == expected_type
    # the standalone image reads back through qcow2snap too
    ok("extract", "-", q2, "-o", tmp_path / "back.raw")
    assert sha256_file(tmp_path / "back.raw") == snap["sha256"]


def test_extract_no_backing(fixture_dir: Path, tmp_path: Path) -> None:
    path = image(fixture_dir, "backing-chain")
    with_backing, without = tmp_path / "with.raw", tmp_path / "without.raw"
    ok("extract", "1", path, "-o", with_backing)
    ok("extract", "1", path, "-o", without, "--no-backing")
    assert sha256_file(with_backing) == snapshot_entries("backing-chain")[0]["sha256"]
    assert sha256_file(without) != sha256_file(with_backing)
    assert without.stat().st_size == with_backing.stat().st_size


def test_extract_backing_file_override(fixture_dir: Path, tmp_path: Path) -> None:
    """An image whose backing file moved: --backing-file gives its path."""
    overlay = tmp_path / "overlay.qcow2"
    shutil.copyfile(image(fixture_dir, "backing-chain"), overlay)
    out = tmp_path / "out.raw"
    assert_error(invoke("extract", "1", overlay, "-o", out), 4, "--backing-file")
    ok("extract", "1", overlay, "-o", out,
       "--backing-file", fixture_dir / "backing-chain.base.qcow2")
    assert sha256_file(out) == snapshot_entries("backing-chain")[0]["sha256"]


def test_extract_progress_bar(fixture_dir: Path, tmp_path: Path) -> None:
    """--progress forces the bar (on stderr); stdout keeps only the JSON."""
    result = ok("extract", "first", image(fixture_dir, "v3-basic"), "-o", tmp_path / "o.raw",
                "--progress", "--json")
    assert json.loads(result.stdout)["snapshot"] == "1"
    assert "extract snapshot 1 (first)" in result.stderr
    # drawn even though stderr is a pipe: the finished bar with bytes done/total
    assert "100%" in result.stderr and "64 MiB/64 MiB" in result.stderr
    result = ok("extract", "first", image(fixture_dir, "v3-basic"), "-o", tmp_path / "o.raw",
                "-f", "--no-progress")
    assert result.stderr == ""


# ---------------------------------------------------------------------------
# vmstate dump
# ---------------------------------------------------------------------------

VMSTATE_CASES = [(name, s["id"]) for name in fixtures_with("vmstate")
                 for s in snapshot_entries(name) if s["vm_state_size"]]


@pytest.mark.parametrize(("name", "snapshot_id"), VMSTATE_CASES,
                         ids=[f"{n}-{i}" for n, i in VMSTATE_CASES])
def test_vmstate_dump(fixture_dir: Path, tmp_path: Path, name: str, snapshot_id: str) -> None:
    snap = next(s for s in snapshot_entries(name) if s["id"] == snapshot_id)
    out = tmp_path / "vm.bin"
    data = json.loads(ok("vmstate", "dump", "--by-id", snapshot_id, image(fixture_dir, name),
                         "-o", out, "--json").stdout)
    assert data == {"output": os.fspath(out), "vm-state-size": snap["vm_state_size"],
                    "snapshot": snapshot_id}
    assert out.stat().st_size == snap["vm_state_size"]
    with open(out, "rb") as f:
        head = f.read(8)
    assert head == b"QEVM\x00\x00\x00\x03"   # magic, stream version 3


def test_vmstate_dump_existing_output(fixture_dir: Path, tmp_path: Path) -> None:
    path = image(fixture_dir, "savevm")
    out = tmp_path / "vm.bin"
    out.write_bytes(b"old")
    assert_error(invoke("vmstate", "dump", "run", path, "-o", out), 1, "exists")
    assert out.read_bytes() == b"old"
    ok("vmstate", "dump", "run", path, "-o", out, "--force")
    assert out.read_bytes()[:4] == b"QEVM"


# ---------------------------------------------------------------------------
# Editing commands: create, delete, revert, rename (the CLI contract; the
# editing itself is tested against QEMU in the test_edit_* modules)
# ---------------------------------------------------------------------------

EDIT_JSON_KEYS = {"filename", "operation", "snapshot-id", "snapshot-name", "ok", "dry-run",
                  "clusters-allocated", "clusters-freed", "bytes-allocated", "bytes-freed",
                  "metadata-bytes-written", "file-size-before", "file-size-after",
                  "header-changes"}


def names_in(path: Path) -> list[tuple[str, str]]:
    return [(s["id"], s["name"]) for s in json.loads(ok("list", "--json", path).stdout)]


def test_create_and_list(fixture_copy: Any, qemu_img: str) -> None:
    path = fixture_copy("v3-basic")
    result = ok("create", "before-upgrade", path)
    assert result.stdout.startswith(f"{path}: created snapshot 4 (before-upgrade); ")
    assert result.stderr == ""
    assert names_in(path)[-1] == ("4", "before-upgrade")
    assert_qemu_clean(qemu_img, path)
    listing = subprocess.run([qemu_img, "snapshot", "-l", os.fspath(path)], check=True,
                             capture_output=True, text=True).stdout
    assert "before-upgrade" in listing
    # the new snapshot is the active layer of the time
    ok("extract", "before-upgrade", path, "-o", path.with_suffix(".raw"))
    assert sha256_file(path.with_suffix(".raw")) == FIXTURES_BY_NAME["v3-basic"]["active"]["sha256"]


def test_create_existing_name(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    before = sha256_file(path)
    assert_error(invoke("create", "second", path), 9, "exists", "--overwrite")
    assert sha256_file(path) == before
    data = json.loads(ok("create", "--overwrite", "second", path, "--json").stdout)
    assert data[0]["ok"] is True
    assert [n for _, n in names_in(path)].count("second") == 1


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_create_invalid_name(fixture_copy: Any, name: str) -> None:
    path = fixture_copy("v3-basic")
    before = sha256_file(path)
    assert_error(invoke("create", name, path), 2)
    assert sha256_file(path) == before


@pytest.mark.parametrize("args", [["create", "new"], ["delete", "second"], ["revert", "first"],
                                  ["rename", "second", "renamed"]],
                         ids=lambda a: a[0])
def test_dry_run_writes_nothing(fixture_copy: Any, args: list[str]) -> None:
    path = fixture_copy("v3-basic")
    before = sha256_file(path)
    result = ok(*args, "--dry-run", path)
    assert result.stdout.startswith(f"{path}: would ")
    assert "    header " in result.stdout
    data = json.loads(ok(*args, "--dry-run", "--json", path).stdout)
    assert data[0]["dry-run"] is True
    assert sha256_file(path) == before


@pytest.mark.parametrize(("args", "operation", "snapshot"), [
    (["create", "new"], "create", ("4", "new")),
    (["delete", "second"], "delete", ("2", "second")),
    (["revert", "first"], "revert", ("1", "first")),
    (["rename", "--by-id", "2", "renamed"], "rename", ("2", "renamed")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_edit_json(fixture_copy: Any, qemu_img: str, args: list[str], operation: str,
                   snapshot: tuple[str, str]) -> None:
    path = fixture_copy("v3-basic")
    data = json.loads(ok(*args, path, "--json").stdout)
    assert isinstance(data, list) and len(data) == 1
    obj = data[0]
    assert set(obj) >= EDIT_JSON_KEYS
    assert obj["filename"] == os.fspath(path)
    assert (obj["operation"], obj["snapshot-id"], obj["snapshot-name"]) == (operation, *snapshot)
    assert obj["ok"] is True and obj["dry-run"] is False
    assert obj["file-size-after"] == path.stat().st_size
    assert_qemu_clean(qemu_img, path)


def test_delete_rename_revert(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    snaps = {s["name"]: s for s in snapshot_entries("v3-basic")}
    assert ok("delete", "second", path).stdout.startswith(f"{path}: deleted snapshot 2 (second)")
    assert names_in(path) == [("1", "first"), ("3", "third")]
    assert ok("rename", "third", "last", path).stdout.startswith(
        f"{path}: renamed snapshot 3 (last)")
    assert names_in(path) == [("1", "first"), ("3", "last")]
    assert ok("revert", "first", path).stdout.startswith(f"{path}: reverted to snapshot 1 (first)")
    ok("extract", "-", path, "-o", tmp_path / "active.raw")
    assert sha256_file(tmp_path / "active.raw") == snaps["first"]["sha256"]
    ok("extract", "last", path, "-o", tmp_path / "last.raw")
    assert sha256_file(tmp_path / "last.raw") == snaps["third"]["sha256"]


def test_revert_takes_the_snapshots_size(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("resized-shrink")
    snap = snapshot_entries("resized-shrink")[0]            # taken at 64 MiB, disk now 24 MiB
    data = json.loads(ok("revert", "--by-id", "1", path, "--json").stdout)
    assert data[0]["header-changes"]["size"] == {"before": 24 << 20, "after": snap["disk_size"]}
    info = json.loads(ok("info", "--json", path).stdout)
    assert info["virtual-size"] == snap["disk_size"]
    ok("extract", "-", path, "-o", tmp_path / "active.raw")
    assert sha256_file(tmp_path / "active.raw") == snap["sha256"]


def test_edit_errors_change_nothing(fixture_copy: Any, tmp_path: Path) -> None:
    path = fixture_copy("ambiguous")
    before = sha256_file(path)
    assert_error(invoke("delete", "1", path), 7, "ID '1' name 'x'", "ID '2' name '1'")
    assert_error(invoke("rename", "dup", "z", path), 7)
    assert_error(invoke("revert", "nope", path), 6)
    result = invoke("delete", "--by-id", "--by-name", "1", path)
    assert result.exit_code == 2
    assert "--by-id and --by-name exclude each other" in result.stderr
    assert sha256_file(path) == before
    assert ok("delete", "--by-name", "1", path).stdout.startswith(
        f"{path}: deleted snapshot 2 (1)")


def test_edit_several_images_checks_all_first(fixture_copy: Any, tmp_path: Path,
                                              qemu_img: str) -> None:
    """The disks of one VM: a snapshot missing on one disk changes none."""
    a = fixture_copy("v3-basic")
    b = tmp_path / "b.qcow2"
    shutil.copyfile(a, b)
    subprocess.run([qemu_img, "snapshot", "-d", "second", os.fspath(b)], check=True)
    before = (sha256_file(a), sha256_file(b))
    assert_error(invoke("delete", "second", a, b), 6, os.fspath(b))
    assert (sha256_file(a), sha256_file(b)) == before
    result = ok("create", "both", a, b)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        os.fspath(a), os.fspath(b)]
    data = json.loads(ok("delete", "first", a, b, "--json").stdout)
    assert [(d["filename"], d["ok"]) for d in data] == [(os.fspath(a), True),
                                                        (os.fspath(b), True)]
    for path in (a, b):
        assert "first" not in [n for _, n in names_in(path)]
        assert_qemu_clean(qemu_img, path)


def test_edit_refuses_dirty_image(fixture_copy: Any) -> None:
    path = fixture_copy("v3-basic")
    with open(path, "r+b") as f:                  # incompatible_features: the dirty bit
        f.seek(72)
        word = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((word | 1).to_bytes(8, "big"))
    before = sha256_file(path)
    assert_error(invoke("create", "x", path), 10, "dirty")
    assert sha256_file(path) == before
    assert json.loads(ok("info", "--json", path).stdout)["dirty-flag"] is True


def test_edit_failure_on_apply_exits_with_its_status(fixture_copy: Any) -> None:
    """An error while applying (here: 1-bit refcounts cannot share a cluster)
    is reported per image, and the command exits with the error's status."""
    path = fixture_copy("refcount-1")
    status = errors.UnsupportedImageError.exit_code
    result = invoke("create", "second", path)
    assert result.exit_code == status
    assert result.stderr.startswith(ERROR_PREFIX) and "refcount" in result.stderr
    result = invoke("create", "second", path, "--json")
    assert result.exit_code == status
    data = json.loads(result.stdout)
    assert data[0]["ok"] is False and "refcount" in data[0]["error"]
    assert names_in(path) == [("1", "empty")]


# ---------------------------------------------------------------------------
# Images held by a running QEMU: reads warn on stderr
# ---------------------------------------------------------------------------

@pytest.fixture
def held_image(fixture_copy: Any, qemu_io: str) -> Iterator[Path]:
    """A copy of v3-basic opened read-write by a qemu-io process."""
    from qcow2snap.locks import probe_locks

    path = fixture_copy("v3-basic")
    proc = subprocess.Popen([qemu_io, "-c", "sleep 30000", os.fspath(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            fd = os.open(path, os.O_RDONLY)
            try:
                if probe_locks(fd).has_writer:
                    break
            finally:
                os.close(fd)
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("qemu-io did not take its locks")
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_reading_an_image_in_use_warns(held_image: Path, tmp_path: Path) -> None:
    result = ok("list", held_image)
    assert result.stdout.startswith("Snapshot list:")
    warning = result.stderr.splitlines()
    assert len(warning) == 1
    assert warning[0].startswith("qcow2snap: warning: ")
    assert "running QEMU process holds this image open for writing" in warning[0]

    info = json.loads(ok("info", "--json", held_image).stdout)
    assert info["in-use"] is True
    assert "write" in info["qemu-locks"]

    result = ok("extract", "first", held_image, "-o", tmp_path / "o.raw")
    assert result.stderr.startswith("qcow2snap: warning: ")
    assert sha256_file(tmp_path / "o.raw") == snapshot_entries("v3-basic")[0]["sha256"]


def test_editing_an_image_in_use_is_refused(held_image: Path) -> None:
    before = sha256_file(held_image)
    for args in (["create", "x"], ["delete", "first"], ["revert", "first"],
                 ["rename", "first", "y"]):
        assert_error(invoke(*args, held_image), errors.ImageInUseError.exit_code, "in use")
    assert sha256_file(held_image) == before


# ---------------------------------------------------------------------------
# --help, --version
# ---------------------------------------------------------------------------

def all_commands(group: click.Group = cli,
                 prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(group, LazyGroup):
        group.load_all()   # at collection time, too: the commands not yet used
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += all_commands(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def test_command_tree() -> None:
    # new commands must be documented in docs/cli.md (checked by test_docs.py)
    assert {(), ("create",), ("delete",), ("extract",), ("info",), ("list",), ("rename",),
            ("revert",), ("vmstate",), ("vmstate", "dump")} <= set(all_commands())


def test_help_covers_every_command() -> None:
    """test_help's parameters, made at collection time, hold every
    command, the lazily loaded ones too."""
    marks = [m for m in test_help.pytestmark if m.name == "parametrize"]   # type: ignore[attr-defined]
    collected = {tuple(p) for m in marks if m.args[0] == "path" for p in m.args[1]}
    assert isinstance(cli, LazyGroup)
    assert {(name,) for name in cli.lazy_commands} <= collected
    assert ("vmstate", "memory") in collected


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "qcow2snap")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(path: tuple[str, ...], flag: str) -> None:
    result = ok(*path, flag)
    assert result.stdout.startswith(f"Usage: {' '.join(('qcow2snap', *path))} ")
    assert "Options:" in result.stdout
    assert result.stderr == ""


def test_group_without_command_shows_usage() -> None:
    for path in [(), ("vmstate",)]:
        result = invoke(*path)
        assert result.exit_code == 2
        assert "Usage:" in result.stderr


def test_version_in_process() -> None:
    assert ok("--version").stdout == f"qcow2snap, version {qcow2snap.__version__}\n"


def test_python_m_version() -> None:
    proc = run_cli("--version", check=True)
    assert proc.stdout == f"qcow2snap, version {qcow2snap.__version__}\n"
    proc = run_cli("--help", check=True)
    assert proc.stdout.startswith("Usage: qcow2snap ")
