"""LUKS-encrypted images read with their passphrase, against QEMU: every
layer qcow2snap reads or extracts is what ``qemu-img convert`` (``-l
snapshot.name=X``) decrypts, on the ``luks`` fixture and on images
qemu-img makes here with several ciphers; a wrong passphrase is one line
(exit status 13) and writes nothing; a passphrase file is used byte for
byte, as QEMU's ``secret,file=`` reads it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path, run, sha256_file
from helpers import invoke

import qcow2snap
from qcow2snap import format as fmt
from qcow2snap.errors import BadPassphraseError, UnsupportedImageError
from qcow2snap.ops.hashing import hash_image

LUKS = FIXTURES_BY_NAME["luks"]
SECRET = LUKS["secret"]
LAYERS = [("-", LUKS["active"]["sha256"])] + [(s["name"], s["sha256"]) for s in LUKS["snapshots"]]


@pytest.fixture(autouse=True)
def _no_passphrase_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QCOW2SNAP_PASSPHRASE", raising=False)


def _pw_file(tmp_path: Path, data: bytes, name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------
# the luks fixture (aes-128-xts-plain64, sha256), against its manifest
# ---------------------------------------------------------------------------

def _layers(name: str) -> list[tuple[str, str]]:
    entry = FIXTURES_BY_NAME[name]
    return [("-", entry["active"]["sha256"])] + [(s["name"], s["sha256"])
                                                 for s in entry["snapshots"]]


@pytest.mark.parametrize("name", ["luks", "aes"])
def test_fixture_hashes_decrypt_as_qemu(fixture_dir: Path, name: str) -> None:
    """Both encryption methods, against the digests of qemu-img's
    decryption in the manifest, through the reader and through hash."""
    secret = FIXTURES_BY_NAME[name]["secret"]
    with qcow2snap.open(fixture_path(fixture_dir, name), passphrase=secret) as image:
        for ref, digest in _layers(name):
            with image.open_disk(None if ref == "-" else ref) as disk:
                assert hashlib.sha256(disk.read()).hexdigest() == digest, ref
        report = hash_image(image)
    assert {("-" if d.snapshot is None else d.snapshot.name): d.disk_digest
            for d in report.layers} == dict(_layers(name))


@pytest.mark.parametrize("passphrase", [SECRET, SECRET.encode()])
def test_fixture_layers_read_as_qemu_decrypts_them(fixture_dir: Path, passphrase: str | bytes,
                                                   ) -> None:
    with qcow2snap.open(fixture_path(fixture_dir, "luks"), passphrase=passphrase) as image:
        for ref, digest in LAYERS:
            with image.open_disk(None if ref == "-" else ref) as disk:
                assert hashlib.sha256(disk.read()).hexdigest() == digest, ref
        # unaligned positional reads inside and across encrypted sectors
        with image.open_disk("s2") as disk:
            assert disk.pread(0x7FF, 3) == b"\x11\x21\x21"
            assert disk.pread(0x17FE, 4) == b"\x21\x21\x11\x11"


@pytest.mark.parametrize("out_format", ["raw", "qcow2"])
def test_fixture_extract_with_passphrase_file(fixture_dir: Path, tmp_path: Path,
                                              out_format: str) -> None:
    pw = _pw_file(tmp_path, SECRET.encode())
    for ref, digest in LAYERS:
        out = tmp_path / f"{ref}.{out_format}"
        result = invoke("extract", ref, fixture_path(fixture_dir, "luks"), "-o", out,
                        "-O", out_format, "--passphrase-file", pw)
        assert result.exit_code == 0, result.stderr
        if out_format == "raw":
            assert sha256_file(out) == digest, ref
        else:
            with qcow2snap.open(out) as copy:
                assert not copy.encrypted
                assert hashlib.sha256(copy.open_disk().read()).hexdigest() == digest, ref


def test_fixture_hash_image_decrypts(fixture_dir: Path) -> None:
    with qcow2snap.open(fixture_path(fixture_dir, "luks"), passphrase=SECRET) as image:
        report = hash_image(image)
    digests = {("-" if d.snapshot is None else d.snapshot.name): d.disk_digest
               for d in report.layers}
    assert digests == dict(LAYERS)


def test_fixture_passphrase_from_environment(fixture_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOW2SNAP_PASSPHRASE", SECRET)
    out = tmp_path / "s1.raw"
    result = invoke("extract", "s1", fixture_path(fixture_dir, "luks"), "-o", out)
    assert result.exit_code == 0, result.stderr
    assert sha256_file(out) == LAYERS[1][1]
    result = invoke("hash", "--json", fixture_path(fixture_dir, "luks"))
    assert result.exit_code == 0, result.stderr
    for ref, digest in LAYERS:
        assert digest in result.stdout, ref


def test_fixture_wrong_passphrase_is_one_line_and_no_output(fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    image = fixture_path(fixture_dir, "luks")
    before = sha256_file(image)
    # the secret with a trailing newline is another passphrase
    for data in (b"wrong", SECRET.encode() + b"\n"):
        pw = _pw_file(tmp_path, data)
        for args in (["extract", "s1", image, "-o", tmp_path / "out.raw"],
                     ["extract", "s1", image, "-o", tmp_path / "out.qcow2", "-O", "qcow2"],
                     ["hash", image], ["diff", "--content", "s1", "s2", image]):
            result = invoke(*args, "--passphrase-file", pw)
            assert result.exit_code == BadPassphraseError.exit_code == 13, args
            lines = result.stderr.splitlines()
            assert lines == [f"qcow2snap: error: {image}: Invalid password, cannot unlock "
                             f"any keyslot"], args
    assert sorted(os.listdir(tmp_path)) == ["pw"]
    with pytest.raises(BadPassphraseError):
        qcow2snap.open(image, passphrase="wrong").open_disk()
    assert sha256_file(image) == before


def test_fixture_without_passphrase_lists_but_does_not_read(fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    image = fixture_path(fixture_dir, "luks")
    assert invoke("info", image).exit_code == 0
    result = invoke("extract", "s1", image, "-o", tmp_path / "o.raw")
    assert result.exit_code == 13
    assert "--passphrase-file" in result.stderr and "QCOW2SNAP_PASSPHRASE" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", ["cryptography", "numpy"])
def test_without_a_crypto_library_the_error_names_it_and_the_extra(
        fixture_dir: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)   # import raises ImportError
    with (qcow2snap.open(fixture_path(fixture_dir, "luks"), passphrase=SECRET) as image,
          pytest.raises(UnsupportedImageError, match=rf"'{module}'.*qcow2snap\[luks\]")):
        image.open_disk()


def test_passphrase_is_for_reading_only(fixture_copy) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="passphrase"):
        qcow2snap.open(fixture_copy("luks"), "r+", passphrase=SECRET)


# ---------------------------------------------------------------------------
# images qemu-img makes here, several ciphers, against qemu-img convert
# ---------------------------------------------------------------------------

CIPHERS = {
    "aes-256-xts-plain64-sha256": "",   # qemu-img's defaults
    "aes-128-cbc-essiv-sha256": ("encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                                 "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"),
    # (aes-192: qemu-img 7.2 aborts, its key material is not whole sectors)
    "aes-256-cbc-plain64-sha1": ("encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,"
                                 "encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1"),
    "aes-256-xts-plain-sha512": ("encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,"
                                 "encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512"),
}


def _secret(pw: Path) -> list[str]:
    return ["--object", f"secret,id=s,file={pw}"]


def _opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=s"


def run_timing_pbkdf2(*args: str) -> None:
    """Run a qemu-img command that makes a LUKS key slot.  QEMU times PBKDF2
    with the thread's CPU clock and fails now and then ("Unable to get
    accurate CPU usage") where that clock is coarse or the machine busy: try
    again, waiting a little longer each time."""
    for attempt in range(20):
        result = run(*args, check=False)
        if result.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in result.stderr, result.stderr
        time.sleep(0.05 * attempt)
    pytest.fail(f"{args[0]} {args[1]} failed twenty times: {result.stderr}")


def _create(qemu_img: str, pw: Path, image: Path, options: str, size: str = "4M") -> None:
    """qemu-img create of a LUKS-encrypted image of 4 KiB clusters."""
    opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=4k"
    if options:
        opts += "," + options
    run_timing_pbkdf2(qemu_img, "create", "-q", *_secret(pw), "-f", "qcow2", "-o", opts,
                      str(image), size)


def _qemu_io(qemu_io: str, pw: Path, image: Path, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    run(qemu_io, *_secret(pw), "--image-opts", *args, _opts(image))


def _qemu_convert(qemu_img: str, pw: Path, image: Path, out: Path,
                  snapshot: str | None) -> None:
    extra = [] if snapshot is None else ["-l", f"snapshot.name={snapshot}"]
    run(qemu_img, "convert", *_secret(pw), "--image-opts", _opts(image), *extra, "-O", "raw",
        str(out))


def _assert_layers_match_qemu_img_convert(qemu_img: str, pw: Path, image: Path,
                                          secret: bytes, tmp_path: Path) -> None:
    """The active layer and snapshots "one" and "two", extracted (CLI) and
    read (API), equal qemu-img convert's decryption."""
    for snapshot in (None, "one", "two"):
        expected = tmp_path / f"qemu-{snapshot}.raw"
        _qemu_convert(qemu_img, pw, image, expected, snapshot)
        ours = tmp_path / f"ours-{snapshot}.raw"
        result = invoke("extract", snapshot or "-", image, "-o", ours, "--passphrase-file", pw)
        assert result.exit_code == 0, result.stderr
        assert sha256_file(ours) == sha256_file(expected), snapshot
        with qcow2snap.open(image, passphrase=secret) as opened:
            assert opened.open_disk(snapshot).read() == expected.read_bytes(), snapshot


@pytest.mark.parametrize("cipher", list(CIPHERS))
def test_qemu_made_image_every_layer_matches_qemu_img_convert(
        qemu_img: str, qemu_io: str, tmp_path: Path, cipher: str) -> None:
    pw = _pw_file(tmp_path, b"pw")
    image = tmp_path / "enc.qcow2"
    _create(qemu_img, pw, image, CIPHERS[cipher])
    _qemu_io(qemu_io, pw, image, "write -P 0x11 0 10k", "write -P 0x12 0x101200 0x600")
    run(qemu_img, "snapshot", *_secret(pw), "--image-opts", "-c", "one", _opts(image))
    # a compressed cluster (stored unencrypted) and an unaligned overwrite
    _qemu_io(qemu_io, pw, image, "write -c -P 0x21 0x200000 4k", "write -P 0x22 0x7ff 0x1002",
             "write -z 0x101000 0x1000")
    run(qemu_img, "snapshot", *_secret(pw), "--image-opts", "-c", "two", _opts(image))
    _qemu_io(qemu_io, pw, image, "write -P 0x31 0x3ff000 0x1000", "discard 0 4k")
    before = sha256_file(image)
    _assert_layers_match_qemu_img_convert(qemu_img, pw, image, b"pw", tmp_path)
    assert sha256_file(image) == before   # reading never writes


def test_second_key_slot_opens_too(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    """A passphrase added in key slot 3 (qemu-img amend) opens the image;
    the first still does."""
    pw = _pw_file(tmp_path, b"pw")
    other = _pw_file(tmp_path, b"other", "other")
    image = tmp_path / "slots.qcow2"
    _create(qemu_img, pw, image, "")
    _qemu_io(qemu_io, pw, image, "write -P 0x77 0x1000 8k")
    run_timing_pbkdf2(qemu_img, "amend", *_secret(pw), "--object", f"secret,id=n,file={other}",
                      "--image-opts", _opts(image), "-o",
                      "encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=3,"
                      "encrypt.iter-time=10")
    expected = tmp_path / "qemu.raw"
    _qemu_convert(qemu_img, pw, image, expected, None)
    for secret in (b"pw", "other"):
        with qcow2snap.open(image, passphrase=secret) as opened:
            assert opened.open_disk().read() == expected.read_bytes(), secret


def test_passphrase_file_with_trailing_newline_is_used_as_is(
        qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    pw = _pw_file(tmp_path, b"pw\n")        # QEMU's secret file=: the newline included
    image = tmp_path / "nl.qcow2"
    _create(qemu_img, pw, image, "")
    _qemu_io(qemu_io, pw, image, "write -P 0x5a 0 64k")
    expected = tmp_path / "qemu.raw"
    _qemu_convert(qemu_img, pw, image, expected, None)
    ours = tmp_path / "ours.raw"
    result = invoke("extract", "-", image, "-o", ours, "--passphrase-file", pw)
    assert result.exit_code == 0, result.stderr
    assert sha256_file(ours) == sha256_file(expected)
    stripped = _pw_file(tmp_path, b"pw", "stripped")
    result = invoke("extract", "-", image, "-o", tmp_path / "no.raw", "--passphrase-file",
                    stripped)
    assert result.exit_code == 13 and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "no.raw").exists()


@pytest.mark.parametrize(("where", "value", "message"), [
    (0, b"LUKX", "not in LUKS format"),                     # magic
    (208 + 44, b"\0\0\0\1", "stripes 1 != 4000"),           # key slot 0's stripes
    (208 + 40, b"\x7f\xff\xff\xff", "Keyslot 0"),           # key material far past the header
])
def test_damaged_luks_header_is_one_line(fixture_copy, tmp_path: Path,  # type: ignore[no-untyped-def]
                                         where: int, value: bytes, message: str) -> None:
    image = fixture_copy("luks")
    with qcow2snap.open(image) as opened:
        ext = opened.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        offset = ext.crypto_header().offset
    with open(image, "r+b") as f:
        f.seek(offset + where)
        f.write(value)
    pw = _pw_file(tmp_path, SECRET.encode())
    result = invoke("extract", "s1", image, "-o", tmp_path / "o.raw", "--passphrase-file", pw)
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "o.raw").exists()


# ---------------------------------------------------------------------------
# the vectorised sector cipher, against cryptography's own modes sector by sector
# ---------------------------------------------------------------------------

def _reference_decrypt(mode: str, ivgen: str, key: bytes, first_sector: int,
                       data: bytes) -> bytes:
    """One cryptography XTS/CBC context per 512-byte sector, as QEMU's
    ``qcrypto_block_cipher_decrypt_helper`` sets an IV per sector."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    ivgen_name, _, ivhash = ivgen.partition(":")
    essiv = None
    if ivgen_name == "essiv":
        essiv = Cipher(algorithms.AES(hashlib.new(ivhash, key).digest()), modes.ECB())
    out = bytearray()
    for i in range(0, len(data), 512):
        sector = first_sector + i // 512
        if ivgen_name == "plain":
            iv = (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
        else:
            iv = (sector & (2**64 - 1)).to_bytes(8, "little") + bytes(8)
            if essiv is not None:
                iv = essiv.encryptor().update(iv)
        cipher_mode = modes.XTS(iv) if mode == "xts" else modes.CBC(iv)
        out += Cipher(algorithms.AES(key), cipher_mode).decryptor().update(data[i:i + 512])
    return bytes(out)


@pytest.mark.parametrize(("mode", "ivgen", "key_bytes"), [
    ("xts", "plain64", 64), ("xts", "plain64", 32), ("xts", "plain", 64),
    ("xts", "essiv:sha256", 64), ("cbc", "plain64", 32), ("cbc", "plain", 16),
    ("cbc", "essiv:sha256", 16), ("cbc", "essiv:sha256", 32),
])
@pytest.mark.parametrize("first_sector", [0, 2**32 - 7, 2**64 - 5])
def test_sector_cipher_equals_a_context_per_sector(mode: str, ivgen: str, key_bytes: int,
                                                   first_sector: int) -> None:
    """Whole batches, a batch boundary, and a short last sector (as LUKS key
    material ends), across the 32-bit (plain) and 64-bit (plain64) wraps."""
    from qcow2snap.crypto import SectorCipher
    key = hashlib.sha512(f"{mode}{ivgen}{key_bytes}".encode()).digest()[:key_bytes]
    data = hashlib.shake_256(key).digest(2050 * 512 + 48)
    cipher = SectorCipher("aes", f"{mode}-{ivgen}", key)
    assert cipher.decrypt(first_sector, data) == _reference_decrypt(mode, ivgen, key,
                                                                    first_sector, data)


def test_essiv_hash_without_an_aes_key_size_is_refused_as_qemu_does() -> None:
    from qcow2snap.crypto import SectorCipher
    with pytest.raises(UnsupportedImageError, match="No AES cipher with key size 20 available"):
        SectorCipher("aes", "cbc-essiv:sha1", bytes(32))


# ---------------------------------------------------------------------------
# PBKDF2 iteration limit: a hostile header cannot ask for hours of work
# ---------------------------------------------------------------------------

def _slot0_iterations_offset(image: Path) -> int:
    with qcow2snap.open(image) as opened:
        ext = opened.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        return ext.crypto_header().offset + 208 + 4      # key slot 0: active, iterations


def test_hostile_iteration_count_is_refused_quickly(fixture_copy, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    ) -> None:
    import time
    image = fixture_copy("luks")
    offset = _slot0_iterations_offset(image)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xff\xff\xff")        # 4,294,967,295 iterations
    pw = _pw_file(tmp_path, SECRET.encode())
    started = time.monotonic()
    result = invoke("extract", "s1", image, "-o", tmp_path / "o.raw", "--passphrase-file", pw)
    assert time.monotonic() - started < 10
    assert result.exit_code == 13, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert ("key slot(s) 0 (4,294,967,295 iterations) not tried: over the limit of "
            "20,000,000 PBKDF2 iterations") in result.stderr
    assert "--kdf-iteration-limit" in result.stderr
    assert not (tmp_path / "o.raw").exists()


def test_kdf_iteration_limit_is_the_users_to_raise(fixture_dir: Path, tmp_path: Path) -> None:
    image = fixture_path(fixture_dir, "luks")
    with qcow2snap.open(image) as opened:
        ext = opened.extension(fmt.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        where = ext.crypto_header()
        from qcow2snap.luks import parse_luks_header
        header = parse_luks_header(opened.pread(where.offset, 592), where.offset, where.length)
    iterations = header.key_slots[0].iterations
    assert iterations > 1
    with (qcow2snap.open(image, passphrase=SECRET, kdf_iteration_limit=iterations - 1) as low,
          pytest.raises(BadPassphraseError, match="over the limit")):
        low.open_disk()
    pw = _pw_file(tmp_path, SECRET.encode())
    out = tmp_path / "o.raw"
    result = invoke("extract", "-", image, "-o", out, "--passphrase-file", pw,
                    "--kdf-iteration-limit", str(max(iterations, header.master_key_iterations)))
    assert result.exit_code == 0, result.stderr
    assert sha256_file(out) == LUKS["active"]["sha256"]


# ---------------------------------------------------------------------------
# the legacy AES method (encrypt.format=aes), against qemu-img convert
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [b"pw", b"a passphrase over sixteen bytes"])
def test_legacy_aes_every_layer_matches_qemu_img_convert(qemu_img: str, qemu_io: str,
                                                         tmp_path: Path, secret: bytes) -> None:
    """AES-128-CBC, plain64 IVs of the GUEST sector, the key the
    passphrase's first 16 bytes: data, a compressed cluster (stored
    unencrypted), snapshots, unaligned overwrites."""
    pw = _pw_file(tmp_path, secret)
    image = tmp_path / "aes.qcow2"
    run(qemu_img, "create", "-q", *_secret(pw), "-f", "qcow2", "-o",
        "encrypt.format=aes,encrypt.key-secret=s,cluster_size=4k", str(image), "4M")
    _qemu_io(qemu_io, pw, image, "write -P 0x11 0 10k", "write -P 0x12 0x101200 0x600")
    run(qemu_img, "snapshot", *_secret(pw), "--image-opts", "-c", "one", _opts(image))
    _qemu_io(qemu_io, pw, image, "write -c -P 0x21 0x200000 4k", "write -P 0x22 0x7ff 0x1002")
    run(qemu_img, "snapshot", *_secret(pw), "--image-opts", "-c", "two", _opts(image))
    _qemu_io(qemu_io, pw, image, "write -P 0x31 0x3ff000 0x1000")
    before = sha256_file(image)
    _assert_layers_match_qemu_img_convert(qemu_img, pw, image, secret, tmp_path)
    with qcow2snap.open(image, passphrase=secret) as opened:
        digests = {("-" if d.snapshot is None else d.snapshot.name): d.disk_digest
                   for d in hash_image(opened).layers}
    assert digests["one"] == sha256_file(tmp_path / "qemu-one.raw")
    assert sha256_file(image) == before   # reading never writes
    result = invoke("extract", "-", image, "-o", tmp_path / "none.raw")
    assert result.exit_code == 13 and "(AES)" in result.stderr
