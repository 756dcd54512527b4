"""recover: snapshots found in stale snapshot tables, against QEMU's own
digests (the manifest's ``qemu-img convert -l`` hashes) and maps."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

from conftest import FIXTURES_BY_NAME, sha256_file
from helpers import invoke

from qcow2snap.image import Qcow2Image
from qcow2snap.ops.recover import RecoveryReport, find_lost_snapshots
from qcow2snap.reader import DiskReader


def lose_table(path: Path) -> int:
    """Zero nb_snapshots and snapshots_offset; the old table's offset."""
    with open(path, "r+b") as f:
        f.seek(64)
        offset: int = struct.unpack(">Q", f.read(8))[0]
        f.seek(60)
        f.write(bytes(12))
    return offset


def recover(path: Path) -> RecoveryReport:
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        return find_lost_snapshots(image)
    finally:
        image.close()


def digest(path: Path, report: RecoveryReport, name: str) -> str:
    cand = next(c for c in report.candidates if c.snapshot.name == name)
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        reader = DiskReader(image, cand.layer)
        h = hashlib.sha256()
        while block := reader.read(1 << 20):
            h.update(block)
        return h.hexdigest()
    finally:
        image.close()


def test_lost_header_pointer_recovers_every_snapshot(fixture_copy, qemu_img) -> None:
    path = fixture_copy("v3-basic")
    expected = FIXTURES_BY_NAME["v3-basic"]["snapshots"]
    lose_table(path)
    before = sha256_file(path)
    report = recover(path)
    found = [(c.snapshot.id, c.snapshot.name) for c in report.candidates
             if c.source == "stale-table"]
    assert found == [(s["id"], s["name"]) for s in expected]
    for s in expected:
        assert digest(path, report, s["name"]) == s["sha256"]
        cand = next(c for c in report.candidates if c.snapshot.name == s["name"])
        assert cand.reliable and not cand.reused
    result = invoke("recover", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [c["name"] for c in data["candidates"]] == [s["name"] for s in expected]
    assert invoke("recover", path).exit_code == 0
    assert sha256_file(path) == before      # read-only


def test_stale_copy_after_delete(fixture_copy, qemu_img, tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    expected = FIXTURES_BY_NAME["v3-basic"]["snapshots"]
    with open(path, "rb") as f:
        f.seek(64)
        table_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(table_offset)
        table = f.read(65536)
    subprocess.run([qemu_img, "snapshot", "-d", "second", str(path)], check=True)
    # a stale copy of the old table in a free cluster past the end of the file
    size = path.stat().st_size
    copy_at = (size + 65535) // 65536 * 65536 + 4 * 65536
    with open(path, "r+b") as f:
        f.seek(copy_at)
        f.write(table)
    report = recover(path)
    stale = [c for c in report.candidates if c.source_offset == copy_at]
    assert [(c.snapshot.id, c.snapshot.name) for c in stale] == \
        [(s["id"], s["name"]) for s in expected]
    by_name = {c.snapshot.name: c for c in stale}
    # the two live ones are copies of live entries, and read as QEMU says
    assert by_name["first"].live_duplicate and by_name["third"].live_duplicate
    for s in expected:
        if s["name"] != "second":
            assert digest(path, report, s["name"]) == s["sha256"]
    assert not by_name["second"].live_duplicate


def _map(qemu_img: str, path: Path, tmp: Path, snapshot: str) -> list[dict[str, int]]:
    copy = tmp / f"map-{snapshot}.qcow2"
    copy.write_bytes(path.read_bytes())
    subprocess.run([qemu_img, "snapshot", "-a", snapshot, str(copy)], check=True)
    out = subprocess.run([qemu_img, "map", "--output=json", str(copy)], check=True,
                         capture_output=True, text=True).stdout
    return [e for e in json.loads(out) if e.get("data")]


def _set_refcount(path: Path, cluster: int) -> None:
    """Set the 16-bit refcount of ``cluster`` to 0 (64 KiB clusters)."""
    with open(path, "r+b") as f:
        f.seek(48)
        rt_offset = struct.unpack(">Q", f.read(8))[0]
        per_block = 65536 // 2
        f.seek(rt_offset + 8 * (cluster // per_block))
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * (cluster % per_block))
        f.write(bytes(2))


def test_reused_cluster_makes_candidate_unreliable(fixture_copy, qemu_img, qemu_io,
                                                   tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    names = ("first", "second", "third")
    maps = {s: _map(qemu_img, path, tmp_path, s) for s in names}
    with open(path, "rb") as f:
        f.seek(64)
        f.seek(struct.unpack(">Q", f.read(8))[0])
        table = f.read(65536)
    lose_table(path)
    # a stale copy past the end (refcount 0: a leak repair leaves it alone)
    copy_at = (path.stat().st_size + 65535) // 65536 * 65536 + 4 * 65536
    with open(path, "r+b") as f:
        f.seek(copy_at)
        f.write(table)
    # the lost snapshots' own data clusters become free (as a leak repair
    # would make them, without discarding the tables), then QEMU reuses some
    active = {e["offset"] + k for e in json.loads(subprocess.run(
        [qemu_img, "map", "--output=json", str(path)], check=True, capture_output=True,
        text=True).stdout) if e.get("data") for k in range(0, e["length"], 65536)}
    for s in names:
        for e in maps[s]:
            for k in range(0, e["length"], 65536):
                if e["offset"] + k not in active:
                    _set_refcount(path, (e["offset"] + k) // 65536)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x5a 40M 256k", str(path)],
                   check=True, capture_output=True)
    now = json.loads(subprocess.run([qemu_img, "map", "--output=json", str(path)],
                                    check=True, capture_output=True, text=True).stdout)
    new = {e["offset"] + k for e in now if e.get("data") and
           41943040 <= e["start"] < 41943040 + 262144 for k in range(0, e["length"], 65536)}
    before = sha256_file(path)
    report = recover(path)
    stale = {c.snapshot.name: c for c in report.candidates if c.source_offset == copy_at}
    assert sorted(stale) == sorted(names)
    hits = ranged = 0
    for s in names:
        for e in maps[s]:
            for k in range(0, e["length"], 65536):
                if e["offset"] + k in new:
                    hits += 1
                    guest = e["start"] + k
                    cand = stale[s]
                    assert not cand.reliable
                    if any("is empty" in p for p in cand.problems):
                        continue    # its L1/L2 table was discarded: no range to name
                    ranged += 1
                    assert any(r.guest_offset <= guest < r.guest_offset + r.length
                               for r in cand.reused), (s, guest, cand.reused)
    assert hits, "QEMU reused none of the lost snapshots' data clusters"
    assert ranged, "no reused range could be checked"
    text = invoke("recover", path).output
    assert "UNRELIABLE" in text
    assert sha256_file(path) == before


def test_orphaned_l1_tables_without_any_table(fixture_copy, qemu_img) -> None:
    path = fixture_copy("v3-basic")
    expected = FIXTURES_BY_NAME["v3-basic"]["snapshots"]
    table_offset = lose_table(path)
    with open(path, "r+b") as f:          # the table itself is gone too
        f.seek(table_offset)
        f.write(bytes(65536))
    before = sha256_file(path)
    report = recover(path)
    orphans = [c for c in report.candidates if c.source == "orphan-l1"]
    assert all(c.snapshot.name.startswith("recovered-") for c in orphans)
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        found = set()
        for c in orphans:
            reader = DiskReader(image, c.layer)
            h = hashlib.sha256()
            size = expected[0]["disk_size"]
            done = 0
            while done < size and (block := reader.read(min(1 << 20, size - done))):
                h.update(block)
                done += len(block)
            found.add(h.hexdigest())
    finally:
        image.close()
    # every lost snapshot's disk is there (the L1 covers more than the disk)
    assert {s["sha256"] for s in expected} <= found
    assert sha256_file(path) == before
