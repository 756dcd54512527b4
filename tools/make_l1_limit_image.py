#!/usr/bin/env python3
"""Write a qcow2 image at QEMU's L1 limit, for the memory benchmark of edits
(docs/performance.md, "the bound at QEMU's L1 limit").

512-byte clusters and 16-bit refcounts; an L1 table of ``--entries`` entries
(default 4 Mi: 32 MiB, QEMU's QCOW_MAX_L1_SIZE), each pointing at its own L2
table whose first entry maps one data cluster (COPIED set, refcount 1), the
data left as holes; 128 GiB virtual at the default.  qemu-img cannot build
it in reasonable time (preallocating metadata on 512-byte clusters writes
~0.2 MB/s), so the structures are written directly; ``qemu-img check``
finds the result clean (5 minutes at the default size).

    python tools/make_l1_limit_image.py /var/tmp/limit.qcow2
    /usr/bin/time -f '%e s %M KiB' qcow2snap create q1 /var/tmp/limit.qcow2
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

CLUSTER_BITS = 9
CLUSTER_SIZE = 1 << CLUSTER_BITS
REFCOUNTS_PER_BLOCK = CLUSTER_SIZE // 2     # 16-bit refcounts
QCOW_OFLAG_COPIED = 1 << 63
PIECE = 1 << 16                             # entries written at a time


def layout(entries: int) -> dict[str, int]:
    """First cluster of each structure, in file order: header, L1, L2
    tables, data, refcount blocks, refcount table."""
    l1_first = 1
    l2_first = l1_first + (entries * 8 + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    data_first = l2_first + entries
    used = data_first + entries
    blocks = (used + REFCOUNTS_PER_BLOCK - 1) // REFCOUNTS_PER_BLOCK
    while True:   # the blocks and the table count themselves
        table_clusters = (blocks * 8 + CLUSTER_SIZE - 1) // CLUSTER_SIZE
        total = used + blocks + table_clusters
        needed = (total + REFCOUNTS_PER_BLOCK - 1) // REFCOUNTS_PER_BLOCK
        if needed == blocks:
            break
        blocks = needed
    return {"l1": l1_first, "l2": l2_first, "data": data_first, "blocks_first": used,
            "blocks": blocks, "table": used + blocks, "table_clusters": table_clusters,
            "total": total}


def write_image(path: Path, entries: int) -> dict[str, int]:
    at = layout(entries)
    size = entries * (CLUSTER_SIZE // 8) * CLUSTER_SIZE
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, size, 0,
                         entries, at["l1"] * CLUSTER_SIZE, at["table"] * CLUSTER_SIZE,
                         at["table_clusters"], 0, 0, 0, 0, 0, 4, 104)
    with path.open("wb") as f:
        f.truncate(at["total"] * CLUSTER_SIZE)
        f.write(header + bytes(8))                       # no header extensions
        f.seek(at["l1"] * CLUSTER_SIZE)
        for start in range(0, entries, PIECE):
            n = min(PIECE, entries - start)
            f.write(struct.pack(f">{n}Q", *[((at["l2"] + start + i) << CLUSTER_BITS)
                                            | QCOW_OFLAG_COPIED for i in range(n)]))
        f.seek(at["l2"] * CLUSTER_SIZE)
        rest = bytes(CLUSTER_SIZE - 8)
        for start in range(0, entries, PIECE):
            n = min(PIECE, entries - start)
            f.write(b"".join(struct.pack(">Q", ((at["data"] + start + i) << CLUSTER_BITS)
                                         | QCOW_OFLAG_COPIED) + rest for i in range(n)))
        f.seek(at["blocks_first"] * CLUSTER_SIZE)
        one = struct.pack(">H", 1)
        for block in range(at["blocks"]):
            n = max(0, min(REFCOUNTS_PER_BLOCK, at["total"] - block * REFCOUNTS_PER_BLOCK))
            f.write(one * n + bytes(2 * (REFCOUNTS_PER_BLOCK - n)))
        f.seek(at["table"] * CLUSTER_SIZE)
        f.write(struct.pack(f">{at['blocks']}Q", *[(at["blocks_first"] + b) << CLUSTER_BITS
                                                    for b in range(at["blocks"])]))
    return at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--entries", type=int, default=1 << 22,
                        help="L1 entries, each with its own L2 table (default 4 Mi)")
    args = parser.parse_args()
    at = write_image(args.path, args.entries)
    print(f"{args.path}: {args.entries} L2 tables, {at['total']} clusters, "
          f"{at['total'] * CLUSTER_SIZE} bytes")


if __name__ == "__main__":
    main()
