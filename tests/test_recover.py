"""recover: snapshots found in stale snapshot tables, against QEMU's own
digests (the manifest's ``qemu-img convert -l`` hashes) and maps."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES_BY_NAME, sha256_file
from helpers import invoke, run_cli

import qcow2snap
from qcow2snap import ImageInUseError
from qcow2snap.image import Qcow2Image
from qcow2snap.ops.edit import EditableImage
from qcow2snap.ops.recover import RecoveryReport, find_lost_snapshots
from qcow2snap.ops.recover_apply import recover_snapshots
from qcow2snap.reader import DiskReader, ExtentKind, Layer, iter_extents


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


def _reuse_lost_clusters(path: Path, qemu_img: str, qemu_io: str, tmp_path: Path,
                         names: tuple[str, ...]
                         ) -> tuple[dict[str, list[dict[str, int]]], int, set[int]]:
    """Lose the table (a stale copy past the end), free the lost snapshots'
    own data clusters and let QEMU reuse some: (maps, copy offset, reused
    host offsets)."""
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
    return maps, copy_at, new


def test_reused_cluster_makes_candidate_unreliable(fixture_copy, qemu_img, qemu_io,
                                                   tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    names = ("first", "second", "third")
    maps, copy_at, new = _reuse_lost_clusters(path, qemu_img, qemu_io, tmp_path, names)
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


# ---------------------------------------------------------------------------
# recover --apply: the entries re-created, checked against QEMU
# ---------------------------------------------------------------------------

def qemu_digest(qemu_img: str, path: Path, snapshot: str, tmp: Path, *,
                by: str = "name") -> str:
    """sha256 of what ``qemu-img convert -l snapshot.<by>=SNAPSHOT`` writes."""
    out = tmp / f"disk-{by}-{snapshot}.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", "-l", f"snapshot.{by}={snapshot}",
                    str(path), str(out)], check=True, capture_output=True)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def qemu_snapshots(qemu_img: str, path: Path) -> list[tuple[str, str]]:
    out = subprocess.run([qemu_img, "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [(s["id"], s["name"]) for s in json.loads(out).get("snapshots", [])]


def assert_qemu_clean(qemu_img: str, path: Path) -> None:
    proc = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout, proc.stdout


def _zero_nb_snapshots(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(bytes(4))


def _garbage_table_with_stale_copy(path: Path) -> None:
    """A stale copy of the table past the end of the file; the header loses
    the table and the table's cluster is overwritten with garbage."""
    with open(path, "rb") as f:
        f.seek(64)
        table_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(table_offset)
        table = f.read(65536)
    copy_at = (path.stat().st_size + 65535) // 65536 * 65536 + 4 * 65536
    lose_table(path)
    with open(path, "r+b") as f:
        f.seek(copy_at)
        f.write(table)
        f.seek(table_offset)
        f.write(hashlib.sha512(b"garbage").digest() * (65536 // 64))


def _table_gone(path: Path) -> None:
    table_offset = lose_table(path)
    with open(path, "r+b") as f:
        f.seek(table_offset)
        f.write(bytes(65536))


DAMAGES = {"header-pointer-zeroed": lose_table, "nb-snapshots-zeroed": _zero_nb_snapshots,
           "garbage-table-stale-copy": _garbage_table_with_stale_copy,
           "table-gone-orphans": _table_gone}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_apply_restores_what_qemu_reads_back(damage: str, fixture_copy, qemu_img,
                                             tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    names = [s["name"] for s in FIXTURES_BY_NAME["v3-basic"]["snapshots"]]
    before = {n: qemu_digest(qemu_img, path, n, tmp_path) for n in names}
    active = qemu_digest_active(qemu_img, path, tmp_path)
    DAMAGES[damage](path)
    assert qemu_snapshots(qemu_img, path) == []
    check = invoke("check", path)
    assert check.exit_code == 3 and "lost snapshot(s) found" in check.output, check.output
    result = invoke("recover", "--apply", "--json", path)
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.output)
    assert not [s for s in data["skipped"] if s["refused"]]
    assert_qemu_clean(qemu_img, path)
    listed = qemu_snapshots(qemu_img, path)
    assert listed == [(r["id"], r["name"]) for r in data["restored"]]
    if damage == "table-gone-orphans":
        # recovered-1, -2, ... with fresh IDs; the same disks, in some order
        assert sorted(n for _, n in listed) == [f"recovered-{i}" for i in (1, 2, 3)]
        after = {qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in listed}
        assert after == set(before.values())
    else:
        # the stale entries keep their IDs and names
        assert listed == [(s["id"], s["name"])
                          for s in FIXTURES_BY_NAME["v3-basic"]["snapshots"]]
        for n in names:
            assert qemu_digest(qemu_img, path, n, tmp_path) == before[n], n
    assert qemu_digest_active(qemu_img, path, tmp_path) == active
    # nothing more to find, and check has nothing to say
    check = invoke("check", path)
    assert check.exit_code == 0 and "lost snapshot" not in check.output, check.output


def qemu_digest_active(qemu_img: str, path: Path, tmp: Path) -> str:
    out = tmp / "active.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(path), str(out)], check=True)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def test_check_names_lost_snapshots_only_when_there_are_some(fixture_copy, qemu_img) -> None:
    path = fixture_copy("v3-basic")
    clean = invoke("check", path)
    assert clean.exit_code == 0 and "lost snapshot" not in clean.output
    assert "lost-snapshots" not in json.loads(invoke("check", "--json", path).output)
    # a leak that holds no snapshot: no line either
    leaky = path.with_name("leaky.qcow2")
    leaky.write_bytes(path.read_bytes())
    with open(leaky, "r+b") as f:
        f.seek(48)
        f.seek(struct.unpack(">Q", f.read(8))[0])
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * 7)
        count = struct.unpack(">H", f.read(2))[0]
        f.seek(block + 2 * 7)
        f.write(struct.pack(">H", count + 1))
    leak = invoke("check", leaky)
    assert leak.exit_code == 3 and "lost snapshot" not in leak.output, leak.output
    assert "lost-snapshots" not in json.loads(invoke("check", "--json", leaky).output)
    _table_gone(path)
    text = invoke("check", path)
    assert text.exit_code == 3        # qemu-img's: only leaks
    line = [ln for ln in text.output.splitlines() if "lost snapshot(s) found" in ln]
    assert len(line) == 1 and line[0].count("orphaned L1 table at 0x") == 3, text.output
    assert f"qcow2snap recover {path} --apply" in line[0]
    data = json.loads(invoke("check", "--json", path).output)
    assert data["leaks"] > 0
    assert [c["source"] for c in data["lost-snapshots"]] == ["orphan-l1"] * 3


def test_apply_renames_a_clashing_entry(fixture_copy, qemu_img, tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    before = qemu_digest(qemu_img, path, "first", tmp_path)
    lose_table(path)
    # a new "first" takes ID 1 and the name
    subprocess.run([qemu_img, "snapshot", "-c", "first", str(path)], check=True)
    new_first = qemu_digest(qemu_img, path, "first", tmp_path)
    result = recover_snapshots(path)
    renamed = [r for r in result.restored if r.renamed_from]
    assert [(r.name, r.renamed_from) for r in renamed] == [("first-recovered", "ID 1 name first")]
    assert_qemu_clean(qemu_img, path)
    listed = qemu_snapshots(qemu_img, path)
    assert sorted(listed) == sorted([("1", "first"), ("2", "second"), ("3", "third"),
                                     (renamed[0].id, "first-recovered")])
    assert renamed[0].id == "4"       # QEMU's rule: the largest numeric ID plus one
    assert qemu_digest(qemu_img, path, "first-recovered", tmp_path) == before
    assert qemu_digest(qemu_img, path, "first", tmp_path) == new_first


def test_apply_refuses_without_the_lock(fixture_copy) -> None:
    path = fixture_copy("v3-basic")
    lose_table(path)
    before = sha256_file(path)
    with qcow2snap.open(path, "r+"):
        with pytest.raises(ImageInUseError):
            recover_snapshots(path)
        # another process: refused, one line, exit 5
        proc = run_cli("recover", "--apply", path)
        assert (proc.returncode, proc.stdout) == (ImageInUseError.exit_code, ""), proc.stderr
        assert "editor" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert sha256_file(path) == before


def test_apply_dry_run_writes_nothing(fixture_copy) -> None:
    path = fixture_copy("v3-basic")
    lose_table(path)
    before = sha256_file(path)
    result = invoke("recover", "--apply", "--dry-run", path)
    assert result.exit_code == 0, result.output
    assert result.output.count("would restore: ID") == 3
    assert sha256_file(path) == before
    assert invoke("recover", "--dry-run", path).exit_code == 2     # usage: needs --apply


def test_apply_refuses_unreliable_candidates(fixture_copy, qemu_img, qemu_io,
                                             tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    names = ("first", "second", "third")
    before = {n: qemu_digest(qemu_img, path, n, tmp_path) for n in names}
    _, copy_at, _ = _reuse_lost_clusters(path, qemu_img, qemu_io, tmp_path, names)
    report = recover(path)
    unreliable = {c.snapshot.name for c in report.candidates
                  if c.source_offset == copy_at and not c.reliable}
    assert unreliable, "the damage made no candidate unreliable"
    line = invoke("check", path).output.splitlines()[-1]
    assert "lost snapshot(s) found" in line and "unreliable" in line, line
    if all(not c.reliable for c in report.candidates if not c.live_duplicate):
        assert "none is reliable enough to restore" in line and "--apply" not in line
    data = json.loads(invoke("recover", "--apply", "--json", path).output)
    restored = {r["name"] for r in data["restored"]}
    assert not restored & unreliable
    refused = [s for s in data["skipped"] if s["refused"]]
    assert {s["candidate"].rsplit("(", 1)[1].rstrip(")") for s in refused
            if s["source-offset"] == copy_at} == unreliable
    assert all(s["reason"].startswith("UNRELIABLE") for s in refused)
    assert not data["leaks-released"]     # the refused ones still live in the leaks
    # QEMU: no corruption (the refused candidates' clusters stay leaked)
    proc = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout
    listed = qemu_snapshots(qemu_img, path)
    assert [n for _, n in listed] == [r["name"] for r in data["restored"]]
    for n in restored:
        assert qemu_digest(qemu_img, path, n, tmp_path) == before[n], n
    # the refused candidates are still there to be found
    again = recover(path)
    assert {c.snapshot.name for c in again.candidates if c.source_offset == copy_at
            and not c.live_duplicate} >= unreliable


def test_apply_restores_each_l1_once_newest_table_first(fixture_copy, qemu_img,
                                                        tmp_path: Path) -> None:
    path = fixture_copy("v3-basic")
    with open(path, "rb") as f:
        f.seek(64)
        f.seek(struct.unpack(">Q", f.read(8))[0])
        older = f.read(65536)          # first, second, third
    subprocess.run([qemu_img, "snapshot", "-c", "fourth", str(path)], check=True)
    names = ("first", "second", "third", "fourth")
    before = {n: qemu_digest(qemu_img, path, n, tmp_path) for n in names}
    copy_at = (path.stat().st_size + 65535) // 65536 * 65536 + 4 * 65536
    with open(path, "r+b") as f:
        f.seek(copy_at)
        f.write(older)
    newer_at = lose_table(path)
    result = recover_snapshots(path)
    assert [(r.id, r.name, r.source_offset) for r in result.restored] == \
        [(str(i), n, newer_at) for i, n in enumerate(names, 1)]
    dupes = [s for s in result.skipped if s.source_offset == copy_at]
    assert len(dupes) == 3 and not any(s.refused for s in dupes)
    assert "restored already" in dupes[0].reason
    assert result.cleanup is not None       # nothing refused: the leaks are released
    assert_qemu_clean(qemu_img, path)
    assert qemu_snapshots(qemu_img, path) == [(str(i), n) for i, n in enumerate(names, 1)]
    for n in names:
        assert qemu_digest(qemu_img, path, n, tmp_path) == before[n], n


def test_apply_keeps_a_stale_entry_with_its_vm_state(fixture_copy, qemu_img) -> None:
    path = fixture_copy("savevm-seabios")
    info = FIXTURES_BY_NAME["savevm-seabios"]["info"]["snapshots"]
    before = json.loads(invoke("hash", "--json", path).output)["layers"]
    lose_table(path)
    result = invoke("recover", "--apply", path)
    assert result.exit_code == 0 and "restored: ID 1 'run'" in result.output, result.output
    assert_qemu_clean(qemu_img, path)
    out = subprocess.run([qemu_img, "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out)["snapshots"] == info     # dates, VM clock, VM-state size: QEMU's
    # the disk and the VM state read back byte for byte
    assert json.loads(invoke("hash", "--json", path).output)["layers"] == before


def test_apply_refuses_a_dirty_image(fixture_copy) -> None:
    path = fixture_copy("v3-basic")
    lose_table(path)
    with open(path, "r+b") as f:       # incompatible feature bit 0: dirty
        f.seek(72)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", features | 1))
    before = sha256_file(path)
    result = invoke("recover", "--apply", path)
    assert result.exit_code == 10 and "dirty" in result.output, result.output
    assert sha256_file(path) == before


@pytest.mark.parametrize("damage", ["header-pointer-zeroed", "table-gone-orphans"])
def test_power_loss_during_apply_leaves_at_most_leaks(damage: str, fixture_copy, qemu_img,
                                                      tmp_path: Path) -> None:
    """Both commits recorded; every simulated power loss (torn, reordered
    writes between fsyncs) leaves an image QEMU finds no corruption in,
    with either no snapshot or every restored one (between the commits:
    the restored table, leaks only)."""
    from crashsim import CrashReplay, RecordingIO

    path = fixture_copy("v3-basic")
    DAMAGES[damage](path)
    before = tmp_path / "before.qcow2"
    before.write_bytes(path.read_bytes())
    fd = os.open(path, os.O_RDWR)
    try:
        recorder = RecordingIO(fd)
        with EditableImage(path, io=recorder) as editable:
            result = recover_snapshots(editable)
    finally:
        os.close(fd)
    assert result.commit is not None and result.cleanup is not None
    restored = [(r.id, r.name) for r in result.restored]
    assert len(restored) == 3
    states = set()
    replay = CrashReplay(before, recorder.ops, tmp_path / "crashed.qcow2")
    for label in replay.variants(exhaustive_max=6, max_singles=8, random_subsets=4):
        crashed = tmp_path / "crashed.qcow2"
        proc = subprocess.run([qemu_img, "check", "--output=json", str(crashed)],
                              capture_output=True, text=True)
        assert proc.returncode in (0, 3), (label, proc.stdout, proc.stderr)
        report = json.loads(proc.stdout)
        assert not report.get("corruptions") and not report.get("check-errors"), label
        listed = qemu_snapshots(qemu_img, crashed)
        assert listed in ([], restored), (label, listed)
        states.add((bool(listed), bool(report.get("leaks"))))
    # the old state, the state between the commits, and the end state were all seen
    assert {(False, True), (True, True), (True, False)} <= states, states


def test_apply_raises_refcounts_a_leak_fix_lowered(fixture_copy, qemu_img,
                                                   tmp_path: Path) -> None:
    """The refcounts of the lost snapshots' own clusters (L1, L2 tables,
    data no live layer uses) lowered to 0 without discarding them: the
    restored entries must bring them back up, or QEMU finds refcounts too
    low."""
    path = fixture_copy("v3-basic")
    names = [s["name"] for s in FIXTURES_BY_NAME["v3-basic"]["snapshots"]]
    before = {n: qemu_digest(qemu_img, path, n, tmp_path) for n in names}
    table_offset = lose_table(path)
    proc = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    leaked = [tuple(int(x) for x in m) for m in
              re.findall(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)", out)]
    assert len(leaked) > 10
    with open(path, "r+b") as f:
        f.seek(48)
        rt_offset = struct.unpack(">Q", f.read(8))[0]
        for cluster, reference in leaked:
            if cluster == table_offset // 65536 or reference:
                continue      # the lost table, and clusters live layers share, stay leaks
            f.seek(rt_offset + 8 * (cluster // 32768))
            block = struct.unpack(">Q", f.read(8))[0]
            f.seek(block + 2 * (cluster % 32768))
            f.write(struct.pack(">H", reference))
    proc = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3 and "ERROR" not in out, out
    lowered = len(leaked) - out.count("Leaked cluster")
    assert lowered > 5, out
    result = recover_snapshots(path)
    assert [r.name for r in result.restored] == names
    assert_qemu_clean(qemu_img, path)
    for n in names:
        assert qemu_digest(qemu_img, path, n, tmp_path) == before[n], n


def test_apply_orphan_disk_size_survives_a_shrink(fixture_copy, qemu_img,
                                                  tmp_path: Path) -> None:
    """at-64M was taken before the image shrank to 24M: its orphaned L1
    gets the disk size its last mapped cluster implies, at-24M the image's."""
    path = fixture_copy("resized-shrink")
    expected = FIXTURES_BY_NAME["resized-shrink"]["snapshots"]
    # (qemu-img convert -l writes the image's current size for either)
    before = {qemu_digest(qemu_img, path, s["id"], tmp_path, by="id") for s in expected}
    assert len(before) == 2
    _table_gone(path)
    result = recover_snapshots(path)
    assert sorted(r.disk_size for r in result.restored) == \
        sorted(s["disk_size"] for s in expected)
    assert_qemu_clean(qemu_img, path)
    listed = qemu_snapshots(qemu_img, path)
    assert len(listed) == 2
    assert {qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in listed} == before
    # and reverting to each (QEMU resizes to the snapshot's disk size) gives its own disk
    by_size = {s["disk_size"]: s for s in expected}
    for r in result.restored:
        sid, s = r.id, by_size[r.disk_size]
        copy = tmp_path / f"revert-{sid}.qcow2"
        copy.write_bytes(path.read_bytes())
        subprocess.run([qemu_img, "snapshot", "-a", sid, str(copy)], check=True)
        assert qemu_digest_active(qemu_img, copy, tmp_path) == s["sha256"], s["name"]


def test_apply_keeps_duplicate_names_of_one_table(fixture_copy, qemu_img,
                                                  tmp_path: Path) -> None:
    """ambiguous: IDs 1-4 named x, 1, dup, dup; the table comes back as it was."""
    path = fixture_copy("ambiguous")
    listed = qemu_snapshots(qemu_img, path)
    before = {sid: qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in listed}
    lose_table(path)
    result = recover_snapshots(path)
    assert not any(r.renamed_from for r in result.restored)
    assert_qemu_clean(qemu_img, path)
    assert qemu_snapshots(qemu_img, path) == listed
    for sid, digest_before in before.items():
        assert qemu_digest(qemu_img, path, sid, tmp_path, by="id") == digest_before, sid


SWEEP = ["clusters-512", "clusters-2m", "refcount-1", "refcount-2", "refcount-8",
         "refcount-64", "compressed-zlib", "compressed-zstd", "extended-l2", "zero-clusters",
         "resized-grow", "empty-snapshot", "lazy-refcounts", "savevm-seabios"]


@pytest.mark.parametrize("name", SWEEP)
def test_apply_never_corrupts(name: str, fixture_copy, qemu_img, tmp_path: Path) -> None:
    """Across layouts (cluster sizes, refcount widths, compression, extended
    L2, zero clusters, resizes, VM state): after losing the table and
    ``recover --apply``, QEMU finds no corruption, every restored entry is
    the one lost (ID, name, the disk QEMU reads), and when nothing was
    refused the table is whole again and nothing leaks."""
    path = fixture_copy(name)
    listed = qemu_snapshots(qemu_img, path)
    before = {sid: qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in listed}
    lose_table(path)
    result = recover_snapshots(path)
    proc = subprocess.run([qemu_img, "check", "--output=json", str(path)],
                          capture_output=True, text=True)
    report = json.loads(proc.stdout)
    assert proc.returncode in (0, 3) and not report.get("corruptions"), proc.stdout
    after = qemu_snapshots(qemu_img, path)
    assert after == [(r.id, r.name) for r in result.restored]
    assert set(after) <= set(listed)
    for sid, _ in after:
        assert qemu_digest(qemu_img, path, sid, tmp_path, by="id") == before[sid], sid
    if not any(s.refused for s in result.skipped):
        assert after == listed and proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------
# compressed clusters: the reuse rule at byte level
# ---------------------------------------------------------------------------

def _table_cluster_gone(path: Path) -> None:
    """``_table_gone`` for 512-byte clusters: only the table's cluster."""
    table_offset = lose_table(path)
    with open(path, "r+b") as f:
        f.seek(table_offset)
        f.write(bytes(512))


@pytest.mark.parametrize(("name", "damage"), [
    *[(n, d) for n in ("compressed-zlib", "compressed-zstd", "zero-clusters")
      for d in sorted(DAMAGES)],
    # (the 64 KiB damages would wipe a 512-byte-cluster image's metadata)
    ("clusters-512", "header-pointer-zeroed"), ("clusters-512", "nb-snapshots-zeroed"),
    ("clusters-512", "table-gone-orphans")])
def test_apply_restores_compressed_snapshots(name: str, damage: str, fixture_copy, qemu_img,
                                             tmp_path: Path) -> None:
    """A host cluster packs several compressed clusters: live compressed
    clusters beside a lost snapshot's own, in the same host cluster, do not
    make it unreliable (nor does a shared cluster the active layer now maps
    with the zero flag, zero-clusters; nor is the second cluster of a
    two-cluster L1 table a candidate of its own, clusters-512); every lost
    snapshot comes back as QEMU read it."""
    path = fixture_copy(name)
    expected = FIXTURES_BY_NAME[name]["snapshots"]
    listed = qemu_snapshots(qemu_img, path)
    assert listed == [(s["id"], s["name"]) for s in expected]
    before = {sid: qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in listed}
    active = qemu_digest_active(qemu_img, path, tmp_path)
    if name == "clusters-512" and damage == "table-gone-orphans":
        _table_cluster_gone(path)
    else:
        DAMAGES[damage](path)
    assert qemu_snapshots(qemu_img, path) == []
    report = recover(path)
    unreliable = [(c.label, c.reused, c.problems) for c in report.candidates if not c.reliable]
    assert not unreliable, unreliable
    result = invoke("recover", "--apply", "--json", path)
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.output)
    assert not [s for s in data["skipped"] if s["refused"]], data["skipped"]
    assert_qemu_clean(qemu_img, path)
    after = qemu_snapshots(qemu_img, path)
    assert after == [(r["id"], r["name"]) for r in data["restored"]]
    if damage == "table-gone-orphans":
        assert sorted(n for _, n in after) == [f"recovered-{i}" for i in (1, 2)]
        assert {qemu_digest(qemu_img, path, sid, tmp_path, by="id") for sid, _ in after} \
            == set(before.values())
    else:
        assert after == listed
        for sid, _ in after:
            assert qemu_digest(qemu_img, path, sid, tmp_path, by="id") == before[sid], sid
    assert qemu_digest_active(qemu_img, path, tmp_path) == active


def _compressed(image: Qcow2Image, layer: Layer) -> dict[int, tuple[int, int]]:
    """guest cluster offset -> (host offset, length) of a layer's compressed clusters."""
    return {e.cluster_guest_offset: (e.host_offset, e.compressed_length)
            for e in iter_extents(image, layer, 0, layer.size)
            if e.kind is ExtentKind.COMPRESSED and e.host_offset is not None}


def _lost_compressed_beside_live(path: Path) -> tuple[str, int, int]:
    """Lose the table; a lost snapshot's compressed cluster (not shared) in a
    host cluster live compressed clusters use too: (name, guest, host offset)."""
    lose_table(path)
    report = recover(path)
    assert report.candidates and all(c.reliable for c in report.candidates)
    image = Qcow2Image(path, "r", check_mode=True)
    try:
        live = _compressed(image, image.layer())
        live_clusters = {off >> 16 for off, length in live.values()
                         for off in range(off, off + length, 512)}
        for cand in report.candidates:
            for guest, (off, length) in _compressed(image, cand.layer).items():
                if live.get(guest) == (off, length) or off in {o for o, _ in live.values()}:
                    continue     # shared with the live layer
                if off >> 16 in live_clusters:
                    return cand.snapshot.name, guest, off
    finally:
        image.close()
    raise AssertionError("no lost compressed cluster shares a host cluster with a live one")


@pytest.mark.parametrize("name", ["compressed-zlib", "compressed-zstd"])
def test_discarded_compressed_bytes_make_candidate_unreliable(name: str, fixture_copy, qemu_img,
                                                               tmp_path: Path) -> None:
    """A lost snapshot's compressed cluster whose bytes were zeroed (as a
    discard of its sectors would) while live compressed clusters still share
    its host cluster: the candidate is UNRELIABLE, names the range, and
    ``--apply`` refuses it."""
    path = fixture_copy(name)
    active = qemu_digest_active(qemu_img, path, tmp_path)
    victim, guest, off = _lost_compressed_beside_live(path)
    with open(path, "r+b") as f:    # its first bytes: a live neighbour ends before them
        f.seek(off)
        f.write(bytes(16))
    report = recover(path)
    cand = next(c for c in report.candidates if c.snapshot.name == victim)
    assert not cand.reliable
    assert any(r.guest_offset <= guest < r.guest_offset + r.length for r in cand.reused), \
        cand.reused
    assert any(f"{off:#x}" in p and "do not hold it" in p for p in cand.problems), cand.problems
    data = json.loads(invoke("recover", "--apply", "--json", path).output)
    refused = [s for s in data["skipped"] if s["refused"]]
    assert [s["candidate"] for s in refused] == [cand.label], data
    assert "UNRELIABLE" in refused[0]["reason"]
    assert victim not in {r["name"] for r in data["restored"]}
    proc = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    assert proc.returncode in (0, 3) and "ERROR" not in proc.stdout, proc.stdout
    assert qemu_digest_active(qemu_img, path, tmp_path) == active


@pytest.mark.parametrize("name", ["compressed-zlib", "compressed-zstd"])
def test_live_compressed_cluster_on_lost_bytes_makes_candidate_unreliable(
        name: str, fixture_copy) -> None:
    """The active layer maps (at another guest position) a compressed entry
    on the lost snapshot's very bytes: its bytes are a live structure's now."""
    path = fixture_copy(name)
    victim, guest, off = _lost_compressed_beside_live(path)
    report = recover(path)
    cand = next(c for c in report.candidates if c.snapshot.name == victim)
    with open(path, "rb") as f:     # the victim's L2 entry
        f.seek(cand.snapshot.l1_table_offset + 8 * (guest >> 29))
        l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        f.seek(l2 + 8 * ((guest >> 16) & 8191))
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(40)
        l1_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        active_l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        f.seek(active_l2)
        table = struct.unpack(">8192Q", f.read(65536))
    slot = next(j for j in range(8191, -1, -1) if not table[j])
    assert entry >> 62 & 1 and (slot << 16) != guest
    with open(path, "r+b") as f:
        f.seek(active_l2 + 8 * slot)
        f.write(struct.pack(">Q", entry))
    cand = next(c for c in recover(path).candidates if c.snapshot.name == victim)
    assert not cand.reliable
    assert any(r.guest_offset <= guest < r.guest_offset + r.length for r in cand.reused), \
        cand.reused
    assert any(f"{off:#x}" in p and "overlaps a live compressed cluster" in p
               for p in cand.problems), cand.problems
