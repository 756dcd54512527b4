"""Editing and checking LUKS-encrypted images without their passphrase.

A qcow2 image's metadata (header, L1/L2 tables, refcounts, snapshot table)
is not encrypted, only guest data is; so qcow2snap's ``create``,
``delete``, ``revert``, ``rename`` and ``check [--repair leaks|all]`` need
no key.  QEMU (7.2) refuses all of them without ``encrypt.key-secret``
("Parameter 'encrypt.key-secret' is required for cipher", exit 1: it opens
the crypto layer for anything but ``info``), so the oracle here runs QEMU
*with* the key on one copy and qcow2snap *without* it on another, and
compares:

* ``qemu-img check`` (with the key) finds nothing on qcow2snap's copy;
* the snapshot lists agree (IDs, names, VM state sizes, clocks; disk sizes
  as qcow2snap reads them);
* every layer's decrypted content (``qemu-img convert`` with the key, and
  qcow2snap's reader with ``passphrase=``) is the expected one;
* the LUKS header extension and the LUKS header clusters are byte for byte
  what they were (no edit or repair touches them), and a repair counts the
  header clusters as used.

``extract -O qcow2`` of an encrypted layer writes a decrypted, unencrypted
standalone image; without the passphrase it is one line, exit status 13 and
no output file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, run, sha256_file
from helpers import assert_qemu_clean, invoke, qemu_img_check
from test_luks import _create, _qemu_io, _secret, run_timing_pbkdf2

import qcow2snap
from qcow2snap import format as fmt
from qcow2snap.errors import BadPassphraseError

pytestmark = pytest.mark.qemu

LUKS = FIXTURES_BY_NAME["luks"]
SECRET = LUKS["secret"]
#: layer -> sha256 of its decrypted disk, from the manifest ("-": active)
DIGESTS = {"-": LUKS["active"]["sha256"]} | {s["name"]: s["sha256"] for s in LUKS["snapshots"]}
KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"


@pytest.fixture(autouse=True)
def _no_passphrase_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QCOW2SNAP_PASSPHRASE", raising=False)


@pytest.fixture
def pw(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.write_bytes(SECRET.encode())
    return path


def _opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=s"


def _qemu(qemu_img: str, pw: Path, sub: str, image: Path, *args: str,
          check: bool = True) -> Any:
    """``qemu-img SUB`` with the key (``--image-opts``)."""
    return run(qemu_img, sub, *_secret(pw), "--image-opts", *args, _opts(image), check=check)


def _snapshots(qemu_img: str, pw: Path, image: Path) -> list[tuple[Any, ...]]:
    info = json.loads(_qemu(qemu_img, pw, "info", image, "--output=json").stdout)
    return [(s["id"], s["name"], s["vm-state-size"], s["vm-clock-sec"], s["vm-clock-nsec"],
             s["icount"]) for s in info.get("snapshots", [])]


def _layer_digest(qemu_img: str, pw: Path, image: Path, layer: str) -> str:
    out = image.with_name(image.name + ".layer.raw")
    extra = [] if layer == "-" else ["-l", f"snapshot.name={layer}"]
    run(qemu_img, "convert", *_secret(pw), "--image-opts", _opts(image), *extra, "-O", "raw",
        str(out))
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def _layers(qemu_img: str, pw: Path, image: Path) -> dict[str, str]:
    """Every layer's decrypted sha256 as qemu-img reads it, checked against
    qcow2snap's reader with the passphrase."""
    names = ["-"] + [s[1] for s in _snapshots(qemu_img, pw, image)]
    digests = {n: _layer_digest(qemu_img, pw, image, n) for n in names}
    with qcow2snap.open(image, passphrase=SECRET) as opened:
        for n in names:
            with opened.open_disk(None if n == "-" else n) as disk:
                assert hashlib.sha256(disk.read()).hexdigest() == digests[n], n
    return digests


def _disk_sizes(image: Path) -> list[tuple[str, int]]:
    with qcow2snap.open(image) as opened:
        return [(s.name, s.disk_size) for s in opened.snapshots]


def _luks_region(image: Path) -> tuple[bytes, bytes, int, int]:
    """(the crypto header extension's data, the LUKS header's bytes, its
    offset, its length)."""
    with qcow2snap.open(image) as opened:
        ext = opened.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        header = ext.crypto_header()
    with open(image, "rb") as f:
        f.seek(header.offset)
        data = f.read(header.length)
    assert len(data) == header.length and data[:6] == b"LUKS\xba\xbe"
    return ext.data, data, header.offset, header.length


def _qemu_clean(qemu_img: str, pw: Path, image: Path) -> None:
    assert_qemu_clean(qemu_img, _opts(image), *_secret(pw), "--image-opts")


# ---------------------------------------------------------------------------
# what QEMU does without the key (docs/cli.md's table)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["snapshot", "-l"], ["snapshot", "-c", "new"],
                                  ["snapshot", "-a", "s1"], ["snapshot", "-d", "s1"],
                                  ["check"], ["check", "-r", "leaks"], ["check", "-r", "all"]])
def test_qemu_refuses_without_the_key(qemu_img: str, fixture_copy: Any,
                                      args: list[str]) -> None:
    image = fixture_copy("luks")
    before = sha256_file(image)
    result = run(qemu_img, *args, str(image), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"qemu-img: Could not open '{image}': {KEY_REQUIRED}"
    assert sha256_file(image) == before


# ---------------------------------------------------------------------------
# each edit, qcow2snap without the key against qemu-img with it
# ---------------------------------------------------------------------------

EDITS = {
    # edit: (qcow2snap argv before IMAGE, qemu-img snapshot argv or None,
    #        expected layers: name -> layer of the original it holds)
    "create": (["create", "n1"], ["-c", "n1"], {"-": "-", "s1": "s1", "s2": "s2", "n1": "-"}),
    "delete": (["delete", "s1"], ["-d", "s1"], {"-": "-", "s2": "s2"}),
    "revert": (["revert", "s1"], ["-a", "s1"], {"-": "s1", "s1": "s1", "s2": "s2"}),
    "rename": (["rename", "s2", "r2"], None, {"-": "-", "s1": "s1", "r2": "s2"}),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_without_passphrase_matches_qemu_with_it(qemu_img: str, fixture_copy: Any,
                                                      tmp_path: Path, pw: Path,
                                                      edit: str) -> None:
    ours = fixture_copy("luks")
    theirs = tmp_path / "qemu.qcow2"
    shutil.copyfile(ours, theirs)
    ext_before, luks_before, _, _ = _luks_region(ours)

    result = invoke(*EDITS[edit][0], ours)
    assert result.exit_code == 0, result.stderr
    qemu_args = EDITS[edit][1]
    if qemu_args is not None:
        _qemu(qemu_img, pw, "snapshot", theirs, *qemu_args)

    _qemu_clean(qemu_img, pw, ours)
    ext_after, luks_after, _, _ = _luks_region(ours)
    assert (ext_after, luks_after) == (ext_before, luks_before)

    expected = EDITS[edit][2]
    layers = _layers(qemu_img, pw, ours)
    assert layers == {name: DIGESTS[source] for name, source in expected.items()}
    ours_list = _snapshots(qemu_img, pw, ours)
    theirs_list = _snapshots(qemu_img, pw, theirs)
    if edit == "rename":   # qemu-img has no rename: the same list, one name changed
        theirs_list = [(s[0], "r2" if s[1] == "s2" else s[1], *s[2:]) for s in theirs_list]
    assert ours_list == theirs_list
    assert [n for n, _ in _disk_sizes(ours)] == [s[1] for s in ours_list]
    assert {size for _, size in _disk_sizes(ours)} == {LUKS["active"]["size"]}
    if qemu_args is not None:
        assert _layers(qemu_img, pw, theirs) == layers


def test_edit_sequence_on_qemu_made_image(qemu_img: str, qemu_io: str, tmp_path: Path,
                                          pw: Path) -> None:
    """The brief's image (qemu-img's default cipher, 64 KiB clusters): a run
    of edits without the key, guest writes by qemu-io with it in between;
    every layer decrypts to the pattern written."""
    image = tmp_path / "enc.qcow2"
    _create(qemu_img, pw, image, "", "4M")
    # _create makes 4 KiB clusters; QEMU's default (64 KiB) is the other case
    default = tmp_path / "default.qcow2"
    run_timing_pbkdf2(qemu_img, "create", "-q", *_secret(pw), "-f", "qcow2", "-o",
                      "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
                      str(default), "4M")
    for img in (image, default):
        ext_before, luks_before, _, _ = _luks_region(img)
        _qemu_io(qemu_io, pw, img, "write -P 0x11 0 1M")
        one = b"\x11" * (1 << 20) + bytes(3 << 20)
        assert invoke("create", "one", img).exit_code == 0
        _qemu_io(qemu_io, pw, img, "write -P 0x22 0x80000 0x100000")
        two = one[:0x80000] + b"\x22" * 0x100000 + one[0x180000:]
        assert invoke("create", "two", img).exit_code == 0
        _qemu_io(qemu_io, pw, img, "write -P 0x33 0x3ff000 0x1000")
        three = two[:0x3FF000] + b"\x33" * 0x1000
        want = {"-": three, "one": one, "two": two}
        assert _layers(qemu_img, pw, img) == {k: hashlib.sha256(v).hexdigest()
                                              for k, v in want.items()}
        for argv, now in ((["revert", "one"], {"-": one, "one": one, "two": two}),
                          (["rename", "one", "first"], {"-": one, "first": one, "two": two}),
                          (["delete", "first"], {"-": one, "two": two}),
                          (["revert", "two"], {"-": two, "two": two}),
                          (["create", "again"], {"-": two, "two": two, "again": two}),
                          (["delete", "two"], {"-": two, "again": two})):
            result = invoke(*argv, img)
            assert result.exit_code == 0, (argv, result.stderr)
            _qemu_clean(qemu_img, pw, img)
            assert _layers(qemu_img, pw, img) == {k: hashlib.sha256(v).hexdigest()
                                                  for k, v in now.items()}, argv
            assert _luks_region(img)[:2] == (ext_before, luks_before), argv
        # QEMU keeps writing it with the key
        _qemu_io(qemu_io, pw, img, "write -P 0x44 0 4k")
        _qemu_clean(qemu_img, pw, img)


# ---------------------------------------------------------------------------
# check and repairs without the key
# ---------------------------------------------------------------------------

def _refcount_entry(image: Path, cluster: int) -> int:
    """File offset of ``cluster``'s 16-bit refcount."""
    with open(image, "rb") as f:
        header = f.read(104)
        cluster_bits, = struct.unpack_from(">I", header, 20)
        table, = struct.unpack_from(">Q", header, 48)
        order, = struct.unpack_from(">I", header, 96)
        assert order == 4   # refcount-16
        per_block = (1 << cluster_bits) // 2
        f.seek(table + 8 * (cluster // per_block))
        block, = struct.unpack(">Q", f.read(8))
    assert block
    return block + 2 * (cluster % per_block)


def _set_refcount(image: Path, cluster: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(_refcount_entry(image, cluster))
        f.write(struct.pack(">H", value))


def test_check_without_passphrase_agrees_with_qemu(fixture_copy: Any,
                                                   qemu_img: str, pw: Path) -> None:
    image = fixture_copy("luks")
    before = sha256_file(image)
    theirs = qemu_img_check(qemu_img, _opts(image), *_secret(pw), "--image-opts")
    assert theirs.clean
    result = invoke("check", "--json", image)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("allocated-clusters", "total-clusters", "image-end-offset", "check-errors",
                "corruptions", "leaks"):
        assert report.get(key, 0) == theirs.report.get(key, 0), key
    for mode in ("leaks", "all"):
        result = invoke("check", "--repair", mode, image)
        assert result.exit_code == 0, result.stderr
    assert sha256_file(image) == before   # nothing to repair: nothing written


@pytest.mark.parametrize(("where", "value", "mode", "status"), [
    ("first", 0, "all", 2),     # refcount 0 of a used cluster: a corruption
    ("last", 0, "all", 2),
    ("first", 2, "leaks", 3),   # refcount 2 of a cluster used once: a leak
    ("last", 5, "all", 3),
])
def test_repair_counts_luks_header_clusters(fixture_copy: Any, qemu_img: str, tmp_path: Path,
                                            pw: Path, where: str, value: int, mode: str,
                                            status: int) -> None:
    image = fixture_copy("luks")
    ext_before, luks_before, offset, length = _luks_region(image)
    cluster_size = LUKS["info"]["cluster-size"]
    first, last = offset // cluster_size, (offset + length - 1) // cluster_size
    _set_refcount(image, first if where == "first" else last, value)
    # the damage is real, as QEMU sees it
    damaged = qemu_img_check(qemu_img, _opts(image), *_secret(pw), "--image-opts")
    assert damaged.returncode == status, damaged.problems

    result = invoke("check", image)
    assert result.exit_code == status, result.stderr
    result = invoke("check", "--repair", mode, image)
    assert result.exit_code == 0, result.stderr
    _qemu_clean(qemu_img, pw, image)
    assert _luks_region(image)[:2] == (ext_before, luks_before)
    # QEMU still unlocks it, and every layer is what it was
    assert _layers(qemu_img, pw, image) == DIGESTS


def test_refcount_rebuild_keeps_luks_header(fixture_copy: Any, qemu_img: str,
                                            pw: Path) -> None:
    """The refcount table's only entry zeroed: --repair all rebuilds the
    refcount structures, counting the LUKS header's clusters."""
    image = fixture_copy("luks")
    ext_before, luks_before, _, _ = _luks_region(image)
    with open(image, "r+b") as f:
        table, = struct.unpack_from(">Q", f.read(104), 48)
        f.seek(table)
        f.write(bytes(8))
    assert qemu_img_check(qemu_img, _opts(image), *_secret(pw), "--image-opts").returncode == 2
    assert invoke("check", image).exit_code == 2
    result = invoke("check", "--repair", "all", image)
    assert result.exit_code == 0, result.stderr
    _qemu_clean(qemu_img, pw, image)
    assert _luks_region(image)[:2] == (ext_before, luks_before)
    assert _layers(qemu_img, pw, image) == DIGESTS


# ---------------------------------------------------------------------------
# extract -O qcow2 of an encrypted layer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["s1", "s2", "-"])
def test_extract_qcow2_is_decrypted_and_unencrypted(fixture_copy: Any,
                                                    qemu_img: str, tmp_path: Path, pw: Path,
                                                    layer: str) -> None:
    image = fixture_copy("luks")
    out = tmp_path / "out.qcow2"
    result = invoke("extract", layer, image, "-O", "qcow2", "-o", out, "--passphrase-file", pw)
    assert result.exit_code == 0, result.stderr
    info = json.loads(run(qemu_img, "info", "--output=json", str(out)).stdout)
    assert not info.get("encrypted") and "encrypt" not in info["format-specific"]["data"]
    assert not info.get("snapshots") and "backing-filename" not in info
    assert_qemu_clean(qemu_img, out)
    raw = tmp_path / "out.raw"
    run(qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    assert sha256_file(raw) == DIGESTS[layer]


@pytest.mark.parametrize("how", ["none", "wrong"])
def test_extract_qcow2_needs_the_passphrase(fixture_copy: Any, tmp_path: Path,
                                            how: str) -> None:
    image = fixture_copy("luks")
    before = sha256_file(image)
    outdir = tmp_path / "out"
    outdir.mkdir()
    extra: list[str | Path] = []
    if how == "wrong":
        wrong = tmp_path / "wrong"
        wrong.write_bytes(b"not it")
        extra = ["--passphrase-file", wrong]
    result = invoke("extract", "s1", image, "-O", "qcow2", "-o", outdir / "o.qcow2", *extra)
    assert result.exit_code == BadPassphraseError.exit_code == 13
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"qcow2snap: error: {image}: ")
    assert os.listdir(outdir) == []
    assert sha256_file(image) == before


# ---------------------------------------------------------------------------
# the legacy AES method: qemu-img 7.2 still makes and writes such images
# ---------------------------------------------------------------------------

def test_edits_of_aes_image_without_passphrase(qemu_img: str, qemu_io: str, tmp_path: Path,
                                               pw: Path) -> None:
    """qcow2snap cannot decrypt AES data, but edits the metadata; qemu-img
    with the key finds the result clean and every layer as written."""
    image = tmp_path / "aes.qcow2"
    run(qemu_img, "create", "-q", *_secret(pw), "-f", "qcow2", "-o",
        "encrypt.format=aes,encrypt.key-secret=s", str(image), "4M")
    _qemu_io(qemu_io, pw, image, "write -P 0x11 0 192k")
    one = hashlib.sha256(b"\x11" * 0x30000 + bytes((4 << 20) - 0x30000)).hexdigest()
    assert invoke("create", "one", image).exit_code == 0
    _qemu_io(qemu_io, pw, image, "write -P 0x22 64k 64k")
    two = hashlib.sha256(b"\x11" * 0x10000 + b"\x22" * 0x10000 + b"\x11" * 0x10000
                         + bytes((4 << 20) - 0x30000)).hexdigest()
    for argv, want in ((["create", "two"], {"-": two, "one": one, "two": two}),
                       (["revert", "one"], {"-": one, "one": one, "two": two}),
                       (["rename", "two", "deux"], {"-": one, "one": one, "deux": two}),
                       (["delete", "one"], {"-": one, "deux": two})):
        result = invoke(*argv, image)
        assert result.exit_code == 0, (argv, result.stderr)
        _qemu_clean(qemu_img, pw, image)
        names = ["-"] + [s[1] for s in _snapshots(qemu_img, pw, image)]
        assert {n: _layer_digest(qemu_img, pw, image, n) for n in names} == want, argv
    assert invoke("check", "--repair", "all", image).exit_code == 0
    _qemu_clean(qemu_img, pw, image)
    # reading its data needs the passphrase, and decrypts as qemu-img does
    out = tmp_path / "o.raw"
    result = invoke("extract", "-", image, "-o", out, "--passphrase-file", pw)
    assert result.exit_code == 0, result.stderr
    assert sha256_file(out) == one
