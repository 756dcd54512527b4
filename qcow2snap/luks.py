"""LUKS1 encryption of qcow2 data (layer 3, image model): unlocking the
LUKS header a qcow2 image embeds with a passphrase, and decrypting its data
clusters.  QEMU's ``crypto/block-luks.c``, ``crypto/afsplit.c`` and
``crypto/ivgen-*.c``.

Every primitive (PBKDF2, AES in XTS/CBC/ECB, the hashes) comes from the
``cryptography`` package, an optional extra (``pip install
qcow2snap[luks]``) imported only when an encrypted image is unlocked.

In a qcow2 image the LUKS payload offset is unused: data clusters are
encrypted in place with 512-byte sectors whose IV sector number is the
*host* offset of the sector (``crypt_physical_offset`` in QEMU's
``block/qcow2.c``: ``qcow2_co_encdec`` passes ``host_offset`` to
``qcrypto_block_decrypt``).  Compressed clusters are stored unencrypted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import format as fmt
from .crypto import DEFAULT_KDF_ITERATION_LIMIT, SectorCipher, need_crypto_libraries
from .errors import BadPassphraseError, CorruptImageError, UnsupportedImageError

__all__ = ["DEFAULT_KDF_ITERATION_LIMIT", "LuksHeader", "af_merge", "parse_luks_header",
           "unlock"]

SECTOR = fmt.QCRYPTO_BLOCK_LUKS_SECTOR_SIZE

#: LUKS hash names -> hashlib / cryptography names
_HASHES = {"sha1": "SHA1", "sha224": "SHA224", "sha256": "SHA256", "sha384": "SHA384",
           "sha512": "SHA512"}


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class LuksKeySlot:
    index: int
    active: bool
    iterations: int
    salt: bytes
    key_offset_sector: int
    stripes: int


@dataclass(frozen=True, slots=True)
class LuksHeader:
    """The LUKS1 header, as QEMU's ``qcrypto_block_luks_check_header``
    accepts it (``offset``/``length``: where the qcow2 file holds it)."""

    offset: int
    length: int
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    master_key_len: int
    master_key_digest: bytes
    master_key_salt: bytes
    master_key_iterations: int
    uuid: str
    key_slots: tuple[LuksKeySlot, ...]


def parse_luks_header(data: bytes, offset: int, length: int) -> LuksHeader:
    """Decode and validate the LUKS1 header ``data`` (592 bytes read at
    ``offset`` of the qcow2 file; the header area is ``length`` bytes)."""
    where = "LUKS header"
    size = fmt.QCRYPTO_BLOCK_LUKS_HEADER_SIZE
    if len(data) < size or length < size:
        raise CorruptImageError(f"LUKS header at offset {offset:#x} is truncated",
                                structure=where, offset=offset)
    h = fmt.parse_struct(fmt.QCryptoBlockLUKSHeader, data, structure=where, offset=offset)
    if h.magic != fmt.QCRYPTO_BLOCK_LUKS_MAGIC:
        raise CorruptImageError("Volume is not in LUKS format", structure=where, offset=offset)
    if h.version != fmt.QCRYPTO_BLOCK_LUKS_VERSION:
        raise UnsupportedImageError(f"Unsupported LUKS version {h.version}",
                                    feature="encryption")
    slots = []
    for i, s in enumerate(h.key_slots):
        if s.active not in (fmt.QCRYPTO_BLOCK_LUKS_KEY_SLOT_ENABLED,
                            fmt.QCRYPTO_BLOCK_LUKS_KEY_SLOT_DISABLED):
            raise CorruptImageError(f"Keyslot {i} state (active/disable) is corrupted",
                                    structure=where, offset=offset)
        if s.stripes != fmt.QCRYPTO_BLOCK_LUKS_STRIPES:
            raise CorruptImageError(
                f"Keyslot {i} is corrupted (stripes {s.stripes} != "
                f"{fmt.QCRYPTO_BLOCK_LUKS_STRIPES})", structure=where, offset=offset)
        active = s.active == fmt.QCRYPTO_BLOCK_LUKS_KEY_SLOT_ENABLED
        end = s.key_offset_sector * SECTOR + h.master_key_len * s.stripes
        if active and (s.key_offset_sector * SECTOR < fmt.QCRYPTO_BLOCK_LUKS_HEADER_SIZE
                       or end > length):
            raise CorruptImageError(f"Keyslot {i} is overlapping with the LUKS header or "
                                    f"lies past its end", structure=where, offset=offset)
        slots.append(LuksKeySlot(i, active, s.iterations, s.salt, s.key_offset_sector,
                                 s.stripes))
    if not 0 < h.master_key_len <= 256:
        raise CorruptImageError(f"LUKS master key length {h.master_key_len} is invalid",
                                structure=where, offset=offset)
    return LuksHeader(offset, length, _cstr(h.cipher_name).lower(), _cstr(h.cipher_mode).lower(),
                      _cstr(h.hash_spec).lower(), h.master_key_len, h.master_key_digest,
                      h.master_key_salt, h.master_key_iterations, _cstr(h.uuid),
                      tuple(slots))


def _hash_name(name: str) -> str:
    if name not in _HASHES:
        raise UnsupportedImageError(f"LUKS hash {name!r} is not supported "
                                    f"({', '.join(_HASHES)} are)", feature="encryption")
    return name


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    need_crypto_libraries()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    algorithm = getattr(hashes, _HASHES[_hash_name(hash_name)])()
    out: bytes = PBKDF2HMAC(algorithm=algorithm, length=length, salt=salt,
                            iterations=max(iterations, 1)).derive(secret)
    return out


def af_merge(hash_name: str, material: bytes | bytearray, block_len: int,
             stripes: int) -> bytes:
    """QEMU's ``qcrypto_afsplit_decode``: XOR the stripes together, each
    partial sum diffused with the hash (``qcrypto_afsplit_hash``)."""
    import hashlib  # loaded for encrypted images only (start-up time)
    digest_len = hashlib.new(_hash_name(hash_name)).digest_size
    if len(material) < block_len * stripes:
        raise ValueError("short AF-split key material")
    count, final = divmod(block_len, digest_len)
    if final:
        count += 1
    else:
        final = digest_len
    block = bytes(block_len)
    for i in range(stripes - 1):
        stripe = material[i * block_len:(i + 1) * block_len]
        mixed = (int.from_bytes(block, "little") ^ int.from_bytes(stripe, "little")
                 ).to_bytes(block_len, "little")
        out = bytearray()
        for j in range(count):
            n = final if j == count - 1 else digest_len
            h = hashlib.new(hash_name)
            h.update(j.to_bytes(4, "big"))
            h.update(mixed[j * digest_len:j * digest_len + n])
            out += h.digest()[:n]
        block = bytes(out)
    last = material[(stripes - 1) * block_len:stripes * block_len]
    return (int.from_bytes(block, "little") ^ int.from_bytes(last, "little")
            ).to_bytes(block_len, "little")


def unlock(header: LuksHeader, pread: Callable[[int, int], bytes], passphrase: bytes,
           *, path: str = "",
           kdf_iteration_limit: int = DEFAULT_KDF_ITERATION_LIMIT) -> SectorCipher:
    """Try ``passphrase`` on every active key slot, in order (as QEMU's
    ``qcrypto_block_luks_find_key``); the master key whose PBKDF2 digest
    matches gives the data cipher.  ``pread(offset, length)`` reads the qcow2
    file.  A slot asking for more than ``kdf_iteration_limit`` PBKDF2
    iterations is not tried (nor the digest, if it asks for more).

    Raises :class:`BadPassphraseError` when no slot opens (naming the slots
    the limit kept untried), :class:`UnsupportedImageError` for a cipher,
    mode or hash that cannot be used."""
    _hash_name(header.hash_spec)
    # the data cipher's parameters, validated before any PBKDF2 work
    SectorCipher(header.cipher_name, header.cipher_mode, bytes(header.master_key_len))
    prefix = f"{path}: " if path else ""
    limit_hint = ("; if the image is yours, raise the limit (kdf_iteration_limit=; CLI: "
                  "--kdf-iteration-limit N)")
    if header.master_key_iterations > kdf_iteration_limit:
        raise BadPassphraseError(
            f"{prefix}the LUKS master key digest asks for {header.master_key_iterations:,} "
            f"PBKDF2 iterations, over the limit of {kdf_iteration_limit:,}{limit_hint}")
    nkey = header.master_key_len
    untried: list[str] = []
    for slot in header.key_slots:
        if not slot.active:
            continue
        if slot.iterations > kdf_iteration_limit:
            untried.append(f"{slot.index} ({slot.iterations:,} iterations)")
            continue
        slot_key = pbkdf2(header.hash_spec, passphrase, slot.salt, slot.iterations, nkey)
        material_len = nkey * slot.stripes
        material = pread(header.offset + slot.key_offset_sector * SECTOR, material_len)
        if len(material) != material_len:
            raise CorruptImageError(f"LUKS key slot {slot.index} material is truncated",
                                    structure="LUKS header", offset=header.offset)
        split = SectorCipher(header.cipher_name, header.cipher_mode, slot_key
                             ).decrypt(0, material)
        candidate = af_merge(header.hash_spec, split, nkey, slot.stripes)
        digest = pbkdf2(header.hash_spec, candidate, header.master_key_salt,
                        header.master_key_iterations, fmt.QCRYPTO_BLOCK_LUKS_DIGEST_LEN)
        if digest == header.master_key_digest:
            return SectorCipher(header.cipher_name, header.cipher_mode, candidate)
    if untried:
        raise BadPassphraseError(
            f"{prefix}Invalid password, cannot unlock any keyslot; key slot(s) "
            f"{', '.join(untried)} not tried: over the limit of {kdf_iteration_limit:,} "
            f"PBKDF2 iterations{limit_hint}")
    raise BadPassphraseError(f"{prefix}Invalid password, cannot unlock any keyslot")
