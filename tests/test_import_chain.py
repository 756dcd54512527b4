"""``qcow2snap import-chain``: an external backing chain to internal snapshots.

Oracles: QEMU.  Each snapshot of the output, read by ``qemu-img convert -l
snapshot.id=N``, and its active layer equal what ``qemu-img convert`` reads
from the corresponding chain file; ``qemu-img check`` finds the output
clean; ``qemu-img snapshot -l`` lists the layers' names; clusters shared:
the data clusters written are exactly those where a layer reads differently
from the one below.  Chains made by ``export-chain`` (every fixture kind,
round trip) and by QEMU itself (``qemu-img create -b``, other cluster sizes,
``write -z``, a resize).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, sha256_file
from helpers import assert_qemu_clean, invoke

pytestmark = pytest.mark.qemu

ROUND_TRIP = [f["name"] for f in FIXTURE_ENTRIES if f["name"] != "many-snapshots"]


def qemu(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def raw_sha(qemu_img: str, image: Path, tmp_path: Path, snapshot: str | None = None) -> str:
    """The disk of ``image`` (through its backing chain), or of its internal
    ``snapshot``: reverted to on a copy (``qemu-img snapshot -a``), since
    ``convert -l`` reads a snapshot of another disk size at the current size."""
    if snapshot is not None:
        copy = tmp_path / "reverted.qcow2"
        shutil.copyfile(image, copy)
        qemu(qemu_img, "snapshot", "-a", snapshot, copy.name, cwd=tmp_path)
        image = copy
    out = tmp_path / "layer.raw"
    qemu(qemu_img, "convert", "-O", "raw", image.name, str(out), cwd=image.parent)
    digest = sha256_file(out)
    out.unlink()
    return digest


def import_and_compare(qemu_img: str, chain: list[Path], tmp_path: Path) -> dict[str, Any]:
    """Import ``chain`` (oldest first) and compare every layer with QEMU."""
    out = tmp_path / "imported.qcow2"
    result = invoke("import-chain", chain[-1], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert_qemu_clean(qemu_img, out)
    info = json.loads(qemu(qemu_img, "info", "--output=json", out.name, cwd=tmp_path))
    listed = info.get("snapshots", [])
    assert [(s["id"], s["name"]) for s in listed] == [
        (str(i), path.name.removesuffix(".qcow2")) for i, path in enumerate(chain[:-1], 1)]
    assert "backing-filename" not in info
    for i, path in enumerate(chain[:-1], 1):
        assert raw_sha(qemu_img, out, tmp_path, str(i)) == raw_sha(qemu_img, path, tmp_path)
    assert raw_sha(qemu_img, out, tmp_path) == raw_sha(qemu_img, chain[-1], tmp_path)
    assert [layer["snapshot-id"] for layer in report["layers"]] == [
        *(str(i) for i in range(1, len(chain))), None]
    return report


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_of_an_exported_chain(name: str, qemu_img: str, fixture_copy: Any,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = FIXTURES_BY_NAME[name]
    if entry.get("secret"):
        monkeypatch.setenv("QCOW2SNAP_PASSPHRASE", entry["secret"])
    image = fixture_copy(name)
    directory = tmp_path / "chain"
    exported = invoke("export-chain", image, directory, "--json")
    assert exported.exit_code == 0, exported.stderr
    files = json.loads(exported.stdout)["files"]
    monkeypatch.delenv("QCOW2SNAP_PASSPHRASE", raising=False)   # the chain is not encrypted
    report = import_and_compare(qemu_img, [directory / f["file"] for f in files], tmp_path)
    # shared: above the first layer, exactly the clusters each overlay holds as data
    assert [layer["new-clusters"] for layer in report["layers"][1:]] == [
        f["data-clusters"] for f in files[1:]]
    # the original snapshots' disks again
    for i, f in enumerate(files[:-1], 1):
        sn = next(s for s in entry["snapshots"] if s["id"] == f["snapshot-id"])
        assert raw_sha(qemu_img, tmp_path / "imported.qcow2", tmp_path, str(i)) == sn["sha256"]


def test_chain_made_by_qemu(qemu_img: str, tmp_path: Path) -> None:
    """base (4 KiB clusters) <- mid (64 KiB, zeroed and rewritten ranges,
    grown) <- top (128 KiB clusters)."""
    qemu_io = qemu_img.replace("qemu-img", "qemu-io")

    def io(image: str, *cmds: str) -> None:
        args = [qemu_io, "-f", "qcow2"]
        for c in cmds:
            args += ["-c", c]
        qemu(*args, image, cwd=tmp_path)

    qemu(qemu_img, "create", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "8M",
         cwd=tmp_path)
    io("base.qcow2", "write -P 0x11 0 1M", "write -P 0x12 3M 12k", "write -P 0x13 0x7ff000 4k")
    qemu(qemu_img, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2",
         "12M", cwd=tmp_path)
    io("mid.qcow2", "write -z 64k 128k", "write -P 0x21 0x1000 0x200", "write -P 0x22 10M 64k",
       "write -P 0x11 512k 64k")
    qemu(qemu_img, "create", "-f", "qcow2", "-o", "cluster_size=131072", "-b", "mid.qcow2",
         "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    io("top.qcow2", "write -P 0x31 3M 4k", "write -z 10M 64k")
    import_and_compare(qemu_img, [tmp_path / "base.qcow2", tmp_path / "mid.qcow2",
                                  tmp_path / "top.qcow2"], tmp_path)


def test_a_single_image_has_no_snapshots(qemu_img: str, fixture_copy: Any,
                                         tmp_path: Path) -> None:
    image = fixture_copy("zero-clusters")
    report = import_and_compare(qemu_img, [image], tmp_path)
    assert len(report["layers"]) == 1


def test_raw_backing_file_refused(fixture_copy: Any, tmp_path: Path) -> None:
    image = fixture_copy("raw-backing")
    result = invoke("import-chain", image, "-o", tmp_path / "out.qcow2")
    assert result.exit_code == 4
    assert "raw file" in result.stderr
    assert not (tmp_path / "out.qcow2").exists()


def test_existing_output_refused(fixture_copy: Any, tmp_path: Path) -> None:
    image = fixture_copy("backing-chain")
    out = tmp_path / "out.qcow2"
    out.write_text("mine")
    result = invoke("import-chain", image, "-o", out)
    assert result.exit_code == 1 and out.read_text() == "mine"
    assert invoke("import-chain", image, "-o", out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"QFI\xfb"
