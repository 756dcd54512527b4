"""The ``construct`` declarations of the qcow2 format's fixed layouts.

Every fixed layout is a declarative ``construct`` definition named after the
structure in QEMU's ``docs/interop/qcow2.txt``; every field uses the spec's
field name, so ``grep`` works in both directions.  All integers are
big-endian.  Their sizes and constants are in :mod:`qcow2snap.format`, which
is where the rest of the package reaches these layouts
(``fmt.QCowHeaderV2``); the three constants written here as numbers (the
magic, the LUKS digest length and key slot count) are format's, named
beside them (this module imports nothing of the package, which loads it
lazily; ``tests/test_model.py`` checks them against format's).

This module is loaded on first use (:mod:`qcow2snap.format`'s module
``__getattr__``), not at start-up: importing ``construct`` costs about as
much as starting the interpreter (it imports ``pdb``, ``hashlib`` and
``pickle`` for its debugger, compiler and ``Pickled``), and the commands
that only read the header, its extensions and the snapshot table (``info``,
``list``) parse them with the ``struct.Struct`` forms that
:data:`qcow2snap.format.FIXED_LAYOUTS` gives of these declarations (a test
derives each from its declaration here with
:func:`qcow2snap.format.fixed_struct`; docs/performance.md, "Start-up,
second pass").
"""

from __future__ import annotations

import construct
from construct import (
    Bytes,
    Const,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
    this,
)

__all__ = [
    "QCowBitmapDirEntry",
    "QCowExtensionHeader",
    "QCowHeaderCompression",
    "QCowHeaderV2",
    "QCowHeaderV3",
    "QCowNbSnapshotsAndOffset",
    "QCowSnapshotEntry",
    "QCowSnapshotExtraData",
    "QCowSnapshotHeader",
    "QCryptoBlockLUKSHeader",
    "QCryptoBlockLUKSKeySlot",
    "Qcow2BitmapHeaderExt",
    "Qcow2CryptoHeaderExtension",
    "Qcow2Feature",
]


QCowHeaderV2 = "qcow2 header, version 2 part (qcow2.txt 'Header', bytes 0-71)" * Struct(
    "magic" / Const(b"QFI\xfb"),             # bytes 0-3, format.QCOW_MAGIC
    "version" / Int32ub,                     # 4-7
    "backing_file_offset" / Int64ub,         # 8-15
    "backing_file_size" / Int32ub,           # 16-19
    "cluster_bits" / Int32ub,                # 20-23
    "size" / Int64ub,                        # 24-31  virtual disk size in bytes
    "crypt_method" / Int32ub,                # 32-35
    "l1_size" / Int32ub,                     # 36-39  entries in the active L1
    "l1_table_offset" / Int64ub,             # 40-47
    "refcount_table_offset" / Int64ub,       # 48-55
    "refcount_table_clusters" / Int32ub,     # 56-59
    "nb_snapshots" / Int32ub,                # 60-63
    "snapshots_offset" / Int64ub,            # 64-71
)

QCowHeaderV3 = "qcow2 header, version 3 additions (bytes 72-103)" * Struct(
    "incompatible_features" / Int64ub,       # 72-79
    "compatible_features" / Int64ub,         # 80-87
    "autoclear_features" / Int64ub,          # 88-95
    "refcount_order" / Int32ub,              # 96-99
    "header_length" / Int32ub,               # 100-103
)

QCowHeaderCompression = "optional header field 'compression_type' (bytes 104-111)" * Struct(
    "compression_type" / Int8ub,             # 104
    "padding" / Bytes(7),                    # 105-111, zero; kept as read
)

QCowExtensionHeader = "header extension header (qcow2.txt 'Header extensions')" * Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)

Qcow2Feature = "one feature-name table entry (48 bytes)" * Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)

Qcow2BitmapHeaderExt = "bitmaps extension data (24 bytes)" * Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

Qcow2CryptoHeaderExtension = "full disk encryption header pointer (16 bytes)" * Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

# LUKS1 (the header the full disk encryption header extension points at;
# QEMU's crypto/block-luks.c QCryptoBlockLUKSHeader, big-endian like qcow2)
QCryptoBlockLUKSKeySlot = "LUKS key slot (48 bytes)" * Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(32),
    "key_offset_sector" / Int32ub,
    "stripes" / Int32ub,
)

QCryptoBlockLUKSHeader = "LUKS1 partition header (592 bytes)" * Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipher_name" / Bytes(32),
    "cipher_mode" / Bytes(32),
    "hash_spec" / Bytes(32),
    "payload_offset_sector" / Int32ub,
    "master_key_len" / Int32ub,
    "master_key_digest" / Bytes(20),         # format.QCRYPTO_BLOCK_LUKS_DIGEST_LEN
    "master_key_salt" / Bytes(32),
    "master_key_iterations" / Int32ub,
    "uuid" / Bytes(40),
    "key_slots" / construct.Array(8, QCryptoBlockLUKSKeySlot),  # ..._LUKS_NUM_KEY_SLOTS
)

QCowSnapshotHeader = "snapshot table entry, fixed part (qcow2.txt 'Snapshot table entry')" * Struct(
    "l1_table_offset" / Int64ub,             # 0-7
    "l1_size" / Int32ub,                     # 8-11
    "id_str_size" / Int16ub,                 # 12-13
    "name_size" / Int16ub,                   # 14-15
    "date_sec" / Int32ub,                    # 16-19
    "date_nsec" / Int32ub,                   # 20-23
    "vm_clock_nsec" / Int64ub,               # 24-31
    "vm_state_size" / Int32ub,               # 32-35  legacy 32-bit field
    "extra_data_size" / Int32ub,             # 36-39
)

#: Known snapshot extra data.  Parse/build with ``extra_data_size=N``: a field
#: exists only when the extra data covers it; the rest is kept as ``unknown``.
QCowSnapshotExtraData = "snapshot extra data (qcow2.txt 'Snapshot table entry' bytes 40+)" * Struct(
    "vm_state_size_large" / If(this._params.extra_data_size >= 8, Int64ub),
    "disk_size" / If(this._params.extra_data_size >= 16, Int64ub),
    "icount" / If(this._params.extra_data_size >= 24, Int64ub),
    "unknown" / GreedyBytes,
)

QCowSnapshotEntry = "complete snapshot table entry, without inter-entry padding" * Struct(
    "header" / QCowSnapshotHeader,
    "extra_data" / Bytes(this.header.extra_data_size),
    "id_str" / Bytes(this.header.id_str_size),
    "name" / Bytes(this.header.name_size),
)

QCowBitmapDirEntry = "bitmap directory entry, fixed part (qcow2.txt 'Bitmap directory')" * Struct(
    "bitmap_table_offset" / Int64ub,         # 0-7
    "bitmap_table_size" / Int32ub,           # 8-11  entries
    "flags" / Int32ub,                       # 12-15
    "type" / Int8ub,                         # 16
    "granularity_bits" / Int8ub,             # 17
    "name_size" / Int16ub,                   # 18-19
    "extra_data_size" / Int32ub,             # 20-23
)

QCowNbSnapshotsAndOffset = "the 12-byte snapshot-table commit point (header bytes 60-71)" * Struct(
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)
