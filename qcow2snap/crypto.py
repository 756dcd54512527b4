"""Sector ciphers of encrypted qcow2 data (layer 3, image model): AES in XTS
or CBC mode over 512-byte sectors with QEMU's IV generators (``plain``,
``plain64``, ``essiv``), and the legacy qcow2 AES key (QEMU's
``crypto/cipher.c``, ``crypto/ivgen-*.c``, ``crypto/block-qcow.c``).

The AES primitive comes from the ``cryptography`` package; the per-sector
arithmetic around it (IVs, XTS tweaks, the XORs) is vectorised with
``numpy``.  Both are the optional extra ``qcow2snap[luks]``, imported only
when an encrypted image is unlocked.

Why not one ``cryptography`` XTS/CBC context per sector: every 512-byte
sector has its own IV, and a context per sector costs ~5 us of key setup
under the GIL, six times what QEMU takes for the whole sector.  So the
sectors of a run are decrypted together: one AES-ECB call over every block
of the run, with the IVs (and, for XTS, the tweaks ``E(K2, IV) * alpha^j``,
IEEE 1619) computed for all sectors at once.  The result is the same bytes
``cryptography``'s XTS/CBC modes give sector by sector
(``tests/test_luks.py`` checks it for every mode and IV generator).
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedImageError

__all__ = ["DEFAULT_KDF_ITERATION_LIMIT", "SECTOR", "SectorCipher", "legacy_aes_cipher"]

#: the most PBKDF2 iterations one key slot (or the master key digest) may
#: ask for before unlocking refuses it: a hostile header can ask for 2^32-1,
#: hours of work.  QEMU's default ``iter-time`` of 2 s calibrates to a few
#: million on today's machines; 20 million leaves ample room (~10 s here).
#: :mod:`qcow2snap.luks` applies it; it is here so that opening an image
#: (whose signatures name it) does not load luks.
DEFAULT_KDF_ITERATION_LIMIT = 20_000_000

#: QEMU's encryption sector size (``QCRYPTO_BLOCK_LUKS_SECTOR_SIZE``,
#: ``QCRYPTO_BLOCK_QCOW_SECTOR_SIZE``)
SECTOR = 512
_BLOCK = 16                      # the AES block
_BLOCKS_PER_SECTOR = SECTOR // _BLOCK
#: sectors decrypted per vectorised step (1 MiB: the arrays stay in cache)
_BATCH_SECTORS = 2048
#: the XTS reduction polynomial x^128 + x^7 + x^2 + x + 1, low byte
_GF_128_FEEDBACK = 0x87


def need_crypto_libraries() -> None:
    """``cryptography`` and ``numpy`` importable, or one clear error naming the extra."""
    try:
        import cryptography  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        raise UnsupportedImageError(
            f"reading encrypted data needs the {exc.name!r} package: "
            f"pip install 'qcow2snap[luks]'", feature="encryption") from None


def _essiv_hash(name: str) -> str:
    if name not in ("sha1", "sha224", "sha256", "sha384", "sha512"):
        raise UnsupportedImageError(f"ESSIV hash {name!r} is not supported "
                                    f"(sha1, sha224, sha256, sha384 or sha512 are)",
                                    feature="encryption")
    return name


class SectorCipher:
    """AES over 512-byte sectors: ``decrypt(first_sector, data)``.

    ``cipher_mode`` is LUKS's spelling (``xts-plain64``, ``cbc-essiv:sha256``,
    ...).  ``iv_from_host_offset``: the IV's sector number is the sector's
    offset in the qcow2 file (LUKS in qcow2, QEMU's ``crypt_physical_offset``)
    or in the guest disk (the legacy AES method).  Immutable and safe to share
    between threads (every call makes its own cipher contexts).
    """

    def __init__(self, cipher_name: str, cipher_mode: str, key: bytes, *,
                 iv_from_host_offset: bool = True) -> None:
        need_crypto_libraries()
        from cryptography.hazmat.primitives.ciphers import algorithms
        if cipher_name != "aes":
            raise UnsupportedImageError(f"cipher {cipher_name!r} is not supported (aes is)",
                                        feature="encryption")
        mode, _, ivgen = cipher_mode.partition("-")
        ivgen, _, ivhash = ivgen.partition(":")
        if mode not in ("xts", "cbc") or ivgen not in ("plain", "plain64", "essiv"):
            raise UnsupportedImageError(f"cipher mode {cipher_mode!r} is not supported "
                                        f"(xts or cbc with plain, plain64 or essiv)",
                                        feature="encryption")
        if len(key) not in ((32, 48, 64) if mode == "xts" else (16, 24, 32)):
            raise UnsupportedImageError(f"{len(key) * 8}-bit keys are not supported for "
                                        f"aes-{mode}", feature="encryption")
        self.mode = mode
        self.ivgen = ivgen
        self.iv_from_host_offset = iv_from_host_offset
        half = len(key) // 2
        #: the data key and, for XTS, the tweak key (IEEE 1619's K1, K2)
        self._data_key = algorithms.AES(key[:half] if mode == "xts" else key)
        self._tweak_key = algorithms.AES(key[half:]) if mode == "xts" else None
        self._essiv_key: Any = None
        if ivgen == "essiv":
            import hashlib  # loaded for encrypted images only (start-up time)
            salt = hashlib.new(_essiv_hash(ivhash), key).digest()
            if len(salt) not in (16, 24, 32):
                raise UnsupportedImageError(   # QEMU's qcrypto_block_luks_essiv_cipher
                    f"No AES cipher with key size {len(salt)} available (ESSIV hash "
                    f"{ivhash})", feature="encryption")
            self._essiv_key = algorithms.AES(salt)

    @staticmethod
    def _ecb(key: Any, encrypt: bool, data: bytes | memoryview,
             into: memoryview | None = None) -> bytes | memoryview:
        """AES-ECB of ``data``: a new bytes object, or written into ``into``
        (at least ``len(data) + 15`` bytes, ``update_into``'s rule), whose
        first ``len(data)`` bytes are returned as a view.  Writing into a
        reused buffer saves a fresh allocation, and its page faults, per call."""
        from cryptography.hazmat.primitives.ciphers import Cipher, modes
        cipher = Cipher(key, modes.ECB())
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        if into is None:
            out: bytes = ctx.update(data)
            return out
        n = ctx.update_into(data, into)
        return into[:n]

    def _ivs(self, first_sector: int, count: int) -> Any:
        """The IVs of ``count`` sectors from ``first_sector``: a (count, 2)
        array of little-endian 64-bit halves."""
        import numpy as np
        ivs: Any = np.zeros((count, 2), dtype="<u8")
        numbers: Any
        if self.ivgen == "plain":            # the low 32 bits of the sector number
            numbers = (np.arange(count, dtype="<u8") + (first_sector & 0xFFFFFFFF)
                       ) & 0xFFFFFFFF
        else:                                # plain64 / essiv: 64 bits (wraps as QEMU's)
            numbers = np.arange(count, dtype="<u8") + np.uint64(first_sector & (2**64 - 1))
        ivs[:, 0] = numbers
        if self._essiv_key is not None:
            ivs = np.frombuffer(self._ecb(self._essiv_key, True, ivs.tobytes()),
                                dtype="<u8").reshape(count, 2)
        return ivs

    def decrypt(self, first_sector: int, data: bytes | bytearray | memoryview) -> bytearray:
        """Decrypt ``data`` (whole AES blocks; 512-byte sectors, the last may
        be shorter, as LUKS key material may end) whose first sector has IV
        number ``first_sector``."""
        import numpy as np
        if len(data) % _BLOCK:
            raise ValueError("encrypted data must be whole cipher blocks")
        out = bytearray(len(data))
        out_blocks = np.frombuffer(out, dtype="<u8").reshape(-1, 2)
        view = memoryview(data)
        step = _BATCH_SECTORS * SECTOR
        scratch = memoryview(bytearray(min(step, len(data)) + _BLOCK))
        for start in range(0, len(data), step):
            chunk = view[start:start + step]
            self._decrypt_batch(first_sector + start // SECTOR, chunk,
                                out_blocks[start // _BLOCK:(start + len(chunk)) // _BLOCK],
                                scratch)
        return out

    def _decrypt_batch(self, first_sector: int, data: memoryview, out: Any,
                       scratch: memoryview) -> None:
        """Decrypt ``data`` (at most one batch) into ``out``, a (blocks, 2)
        array of 64-bit halves, using ``scratch`` (``len(data) + 16`` bytes)."""
        import numpy as np
        length = len(data)
        sectors = -(-length // SECTOR)
        blocks = length // _BLOCK
        ivs = self._ivs(first_sector, sectors)
        cipher_blocks = np.frombuffer(data, dtype="<u8").reshape(blocks, 2)
        if self.mode == "xts":
            # IEEE 1619: T_0 = E(K2, IV), T_j+1 = T_j * alpha in GF(2^128)
            # (little-endian: shift left one bit, fold the carry with 0x87)
            first = np.frombuffer(self._ecb(self._tweak_key, True, ivs.tobytes()),
                                  dtype="<u8").reshape(sectors, 2)
            tweaks = np.empty((sectors, _BLOCKS_PER_SECTOR, 2), dtype="<u8")
            lo, hi = first[:, 0].copy(), first[:, 1].copy()
            one, top = np.uint64(1), np.uint64(63)
            for j in range(_BLOCKS_PER_SECTOR):
                tweaks[:, j, 0] = lo
                tweaks[:, j, 1] = hi
                carry = hi >> top
                hi = (hi << one) | (lo >> top)
                lo = (lo << one) ^ (carry * np.uint64(_GF_128_FEEDBACK))
            mask = tweaks.reshape(-1, 2)[:blocks]
            np.bitwise_xor(cipher_blocks, mask, out=out)
            plain = np.frombuffer(self._ecb(self._data_key, False, out.data.cast("B"),
                                            scratch), dtype="<u8").reshape(blocks, 2)
            np.bitwise_xor(plain, mask, out=out)
            return
        # CBC: P_j = D(C_j) ^ C_j-1, with the sector's IV before its first block
        previous = np.empty((sectors * _BLOCKS_PER_SECTOR, 2), dtype="<u8")
        previous[1:blocks] = cipher_blocks[:blocks - 1]
        previous[0::_BLOCKS_PER_SECTOR] = ivs
        plain = np.frombuffer(self._ecb(self._data_key, False, data, scratch),
                              dtype="<u8").reshape(blocks, 2)
        np.bitwise_xor(plain, previous[:blocks], out=out)


def legacy_aes_cipher(passphrase: bytes) -> SectorCipher:
    """The data cipher of the legacy qcow2 AES method (``crypt_method`` 1,
    QEMU's ``crypto/block-qcow.c``): AES-128-CBC with ``plain64`` IVs of the
    *guest* sector number, keyed by the passphrase's first 16 bytes (up to a
    NUL, as ``strlen``), zero-padded.  The method stores nothing to check a
    passphrase against: a wrong one decrypts to noise, in QEMU as here."""
    key = passphrase.split(b"\0", 1)[0][:16].ljust(16, b"\0")
    return SectorCipher("aes", "cbc-plain64", key, iv_from_host_offset=False)
