"""``qcow2snap export-chain``: internal snapshots to an external backing chain.

The oracles are QEMU's: every exported file, read by ``qemu-img convert``
through its backing chain (run from its directory, so the relative backing
names must resolve), has the sha256 QEMU gave the corresponding layer
(``qemu-img convert -l snapshot.id=N`` recorded in fixtures/manifest.json,
checked once more live here); ``qemu-img check`` finds nothing;
``qemu-img info --backing-chain`` shows the relative names and the qcow2
backing format; ``qemu-img map`` shows what each overlay holds itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, sha256_file
from helpers import assert_qemu_clean, invoke

pytestmark = pytest.mark.qemu

#: a chain 301 files deep: checked in its own, sampling test
DEEP = "many-snapshots"
#: no snapshots (an external data file has none); nothing to export but the active layer
NO_SNAPSHOTS = {f["name"] for f in FIXTURE_ENTRIES if not f.get("snapshots")}
EXPORTABLE = [f["name"] for f in FIXTURE_ENTRIES if f["name"] != DEEP]


def qemu(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def raw_sha(qemu_img: str, directory: Path, name: str, tmp_path: Path) -> str:
    out = tmp_path / f"{name}.raw"
    qemu(qemu_img, "convert", "-O", "raw", name, str(out), cwd=directory)
    digest = sha256_file(out)
    out.unlink()
    return digest


def export(tmp_path: Path, fixture_copy: Any, name: str, monkeypatch: pytest.MonkeyPatch,
           *options: str) -> tuple[Path, Path, dict[str, Any]]:
    entry = FIXTURES_BY_NAME[name]
    if entry.get("secret"):
        monkeypatch.setenv("QCOW2SNAP_PASSPHRASE", entry["secret"])
    image = fixture_copy(name)
    out = tmp_path / "chain"
    result = invoke("export-chain", image, out, "--json", *options)
    assert result.exit_code == 0, result.output + result.stderr
    return image, out, json.loads(result.stdout)


def expected_sha(entry: dict[str, Any], snapshot_id: str | None) -> str:
    if snapshot_id is None:
        return str(entry["active"]["sha256"])
    return str(next(s["sha256"] for s in entry["snapshots"] if s["id"] == snapshot_id))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_every_file_reads_as_its_layer(name: str, qemu_img: str, fixture_copy: Any,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = FIXTURES_BY_NAME[name]
    image_sha = sha256_file(fixture_copy(name))
    image, out, report = export(tmp_path, fixture_copy, name, monkeypatch)
    # the source is only read
    assert sha256_file(image) == image_sha
    files = report["files"]
    snapshots = entry.get("snapshots", [])
    assert len(files) == len(snapshots) + 1
    assert files[-1]["snapshot-id"] is None and files[-1]["file"].endswith("-active.qcow2")
    # default order: by date, ties by ID
    listed = {s["id"]: s for s in entry["info"].get("snapshots", [])}
    keys = [(listed[f["snapshot-id"]]["date-sec"], listed[f["snapshot-id"]]["date-nsec"],
             int(f["snapshot-id"])) for f in files[:-1]]
    assert keys == sorted(keys)
    assert sorted(os.listdir(out)) == sorted(
        ["chain.json", *(f["file"] for f in files),
         *(f["vm-state-file"] for f in files if f["vm-state-file"])])
    assert json.loads((out / "chain.json").read_text()) == {
        k: v for k, v in report.items() if k not in ("directory", "manifest")}
    info = json.loads(qemu(qemu_img, "info", "--output=json", "--backing-chain",
                           files[-1]["file"], cwd=out))
    assert [i["filename"] for i in info] == [f["file"] for f in reversed(files)]
    for position, f in enumerate(files):
        sid = f["snapshot-id"]
        assert raw_sha(qemu_img, out, f["file"], tmp_path) == expected_sha(entry, sid), f
        assert_qemu_clean(qemu_img, out / f["file"])
        layer_info = info[len(files) - 1 - position]
        disk_size = (entry["active"]["size"] if sid is None
                     else next(s["disk_size"] for s in snapshots if s["id"] == sid))
        assert layer_info["virtual-size"] == f["disk-size"] == disk_size
        if position == 0:
            assert "backing-filename" not in layer_info and f["backing-file"] is None
        else:
            assert layer_info["backing-filename"] == files[position - 1]["file"]   # relative
            assert layer_info["backing-filename-format"] == "qcow2"
            assert f["backing-file"] == files[position - 1]["file"]
        if sid is not None:
            sn = listed[sid]
            assert (f["name"], f["date-sec"], f["date-nsec"]) == (
                sn["name"], sn["date-sec"], sn["date-nsec"])
            assert f["vm-clock-nsec"] == sn["vm-clock-sec"] * 10**9 + sn["vm-clock-nsec"]
            assert f["vm-state-size"] == sn["vm-state-size"]
            assert (f["vm-state-file"] is not None) == (sn["vm-state-size"] > 0)
    # one live check of the recorded oracle: the first snapshot by qemu-img convert -l
    if snapshots and not entry.get("secret") and snapshots[0]["how"] == "convert-l":
        first = next(f for f in files if f["snapshot-id"] == snapshots[0]["id"])
        live = tmp_path / "live.raw"
        qemu(qemu_img, "convert", "-l", f"snapshot.id={snapshots[0]['id']}", "-O", "raw",
             str(image), str(live), cwd=image.parent)
        assert sha256_file(live) == raw_sha(qemu_img, out, first["file"], tmp_path)


@pytest.mark.parametrize("name", ["savevm", "savevm-suspended", "savevm-seabios"])
def test_vm_states_equal_vmstate_dump(name: str, fixture_copy: Any, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image, out, report = export(tmp_path, fixture_copy, name, monkeypatch)
    dumped = 0
    for f in report["files"]:
        if f["vm-state-file"] is None:
            continue
        assert f["vm-state-file"] == f["file"].removesuffix(".qcow2") + ".vmstate"
        reference = tmp_path / "ref.vmstate"
        result = invoke("vmstate", "dump", "--by-id", f["snapshot-id"], image, "-o", reference,
                        "-f")
        assert result.exit_code == 0, result.stderr
        assert (out / f["vm-state-file"]).read_bytes() == reference.read_bytes()
        dumped += 1
    assert dumped == len(FIXTURES_BY_NAME[name]["snapshots"])


def test_source_untouched(fixture_copy: Any, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    image = fixture_copy("savevm")
    before = (sha256_file(image), os.stat(image).st_mtime_ns)
    result = invoke("export-chain", image, tmp_path / "chain")
    assert result.exit_code == 0, result.stderr
    assert (sha256_file(image), os.stat(image).st_mtime_ns) == before


def map_of(qemu_img: str, directory: Path, name: str) -> list[dict[str, Any]]:
    return list(json.loads(qemu(qemu_img, "map", "--output=json", name, cwd=directory)))


def test_unchanged_layer_overlay_holds_nothing(qemu_img: str, fixture_copy: Any,
                                               tmp_path: Path) -> None:
    """The active layer equal to the last snapshot: its overlay maps
    nothing itself (every range at depth >= 1) and is only metadata."""
    image = fixture_copy("v3-basic")
    qemu(qemu_img, "snapshot", "-c", "now", str(image), cwd=image.parent)
    out = tmp_path / "chain"
    result = invoke("export-chain", image, out, "--json")
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [f["name"] for f in files] == ["first", "second", "third", "now", None]
    active = files[-1]
    assert (active["data-clusters"], active["zero-clusters"]) == (0, 0)
    assert all(e["depth"] >= 1 for e in map_of(qemu_img, out, active["file"]))
    assert os.path.getsize(out / active["file"]) <= 4 * 65536   # header, L1, refcounts
    # and the overlays that do change hold only what changed: fewer clusters than their disk
    second = map_of(qemu_img, out, files[1]["file"])
    own = sum(e["length"] for e in second if e["depth"] == 0)
    assert 0 < own == files[1]["data-clusters"] * 65536


def test_zeroed_range_is_a_zero_cluster(qemu_img: str, fixture_copy: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """v2: 'write -z 5M 64k' between s2 and s3, over data s2 has there: s3's
    overlay holds a zero cluster at 5M (reads zeros, not s2's data)."""
    _, out, report = export(tmp_path, fixture_copy, "v2", monkeypatch)
    s3 = next(f for f in report["files"] if f["name"] == "s3")
    assert s3["zero-clusters"] == 1
    entries = [e for e in map_of(qemu_img, out, s3["file"])
               if e["start"] <= 5 << 20 < e["start"] + e["length"]]
    assert len(entries) == 1
    assert entries[0]["depth"] == 0 and entries[0]["zero"] and not entries[0]["data"]
    s2 = next(f for f in report["files"] if f["name"] == "s2")
    for f, zeros in ((s2, False), (s3, True)):
        raw = tmp_path / "layer.raw"
        qemu(qemu_img, "convert", "-O", "raw", f["file"], str(raw), cwd=out)
        with open(raw, "rb") as disk:
            disk.seek(5 << 20)
            assert (disk.read(65536) == bytes(65536)) is zeros


@pytest.mark.parametrize("order", ["id", "name"])
def test_orders(order: str, qemu_img: str, fixture_copy: Any, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    """ambiguous: IDs 1-4 named x, 1, dup, dup."""
    entry = FIXTURES_BY_NAME["ambiguous"]
    _, out, report = export(tmp_path, fixture_copy, "ambiguous", monkeypatch, "--order", order)
    ids = [f["snapshot-id"] for f in report["files"]]
    assert ids == (["1", "2", "3", "4", None] if order == "id" else ["2", "3", "4", "1", None])
    assert report["order"] == order
    names = [f["file"] for f in report["files"]]
    assert names[:4] == (["01-1-x.qcow2", "02-2-1.qcow2", "03-3-dup.qcow2", "04-4-dup.qcow2"]
                         if order == "id" else
                         ["01-2-1.qcow2", "02-3-dup.qcow2", "03-4-dup.qcow2", "04-1-x.qcow2"])
    for f in report["files"]:
        assert raw_sha(qemu_img, out, f["file"], tmp_path) == expected_sha(entry, f["snapshot-id"])


def test_deep_chain(qemu_img: str, fixture_copy: Any, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """300 snapshots, 30 distinct disks: 301 files; a sample of them (and
    the top, through all 300 backing files) read as their layers, and an
    overlay of a layer equal to the previous one holds nothing."""
    entry = FIXTURES_BY_NAME[DEEP]
    _, out, report = export(tmp_path, fixture_copy, DEEP, monkeypatch)
    files = report["files"]
    assert len(files) == 301
    assert files[0]["file"] == "001-1-snap-001.qcow2" and files[-1]["file"] == "301-active.qcow2"
    for f in [files[0], files[1], files[149], files[299], files[300]]:
        assert raw_sha(qemu_img, out, f["file"], tmp_path) == expected_sha(entry, f["snapshot-id"])
    assert_qemu_clean(qemu_img, out / files[-1]["file"])
    shas = [expected_sha(entry, f["snapshot-id"]) for f in files]
    for position in range(1, 301):
        if shas[position] == shas[position - 1]:
            assert files[position]["data-clusters"] == files[position]["zero-clusters"] == 0


def test_refuses_a_non_empty_directory(fixture_copy: Any, tmp_path: Path) -> None:
    image = fixture_copy("v3-basic")
    out = tmp_path / "chain"
    out.mkdir()
    (out / "keep").write_text("mine")
    result = invoke("export-chain", image, out)
    assert result.exit_code == 1
    assert "not empty" in result.stderr and (out / "keep").read_text() == "mine"
    result = invoke("export-chain", image, out, "--force")
    assert result.exit_code == 0, result.stderr
    assert not (out / "keep").exists() and (out / "chain.json").exists()
    # an empty directory is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("export-chain", image, empty).exit_code == 0
    # no temporary directory is left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [image.name, "chain", "empty"])


def test_refuses_the_directory_holding_the_image(fixture_copy: Any, tmp_path: Path) -> None:
    image = fixture_copy("backing-chain")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("export-chain", image, tmp_path, "--force")
    assert result.exit_code == 1
    assert "which this export reads" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_interrupted_export_leaves_nothing(fixture_copy: Any, tmp_path: Path) -> None:
    """An interrupt half-way (from the progress callback): no DIR, no
    temporary directory."""
    from qcow2snap.image import open as open_image
    from qcow2snap.ops.chain import export_chain
    image = fixture_copy("v3-basic")
    seen: list[int] = []

    def stop(done: int, total: int) -> None:
        seen.append(done)
        if done > total // 2:
            raise KeyboardInterrupt

    with open_image(image) as img, pytest.raises(KeyboardInterrupt):
        export_chain(img, tmp_path / "chain", progress=stop)
    assert seen
    assert sorted(p.name for p in tmp_path.iterdir()) == [image.name]


def test_unsafe_names_become_safe_file_names(qemu_img: str, fixture_copy: Any,
                                             tmp_path: Path) -> None:
    """Snapshot names with separators, dots and non-ASCII text: file names
    stay inside DIR; the manifest keeps the names as they are."""
    image = fixture_copy("empty-snapshot")
    for name in ("../../escape", "a/b c", ".hidden", "été"):
        qemu(qemu_img, "snapshot", "-c", name, str(image), cwd=image.parent)
    out = tmp_path / "chain"
    result = invoke("export-chain", image, out, "--json")
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [f["file"] for f in files] == [
        "01-1-empty.qcow2", "02-2-data.qcow2", "03-3-escape.qcow2", "04-4-a_b_c.qcow2",
        "05-5-hidden.qcow2", "06-6-t.qcow2", "07-active.qcow2"]
    assert [f["name"] for f in files][2:6] == ["../../escape", "a/b c", ".hidden", "été"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name, "chain"])
    assert sorted(os.listdir(out)) == sorted(["chain.json", *(f["file"] for f in files)])
