"""Power-loss simulation for the metadata transaction.

``RecordingIO`` performs a commit's I/O on a scratch copy and records every
write, fsync, truncate and hole punch.  ``crash_images`` then rebuilds, from
the image as it was before the commit, every state a power loss could leave:
for each cut point in the sequence, everything before the last fsync is
durable, and the writes after it may each be lost, kept, or torn at 512-byte
sector granularity (so any subset, in any order, of the pending sectors).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from qcow2snap.ops.transaction import FileIO

SECTOR = 512


@dataclass(frozen=True)
class Op:
    kind: str                 # "pwrite", "fsync", "truncate", "punch"
    offset: int = 0
    data: bytes = b""
    length: int = 0


class RecordingIO:
    """A MetadataIO that performs and records."""

    def __init__(self, fd: int) -> None:
        self.inner = FileIO(fd)
        self.ops: list[Op] = []

    def pwrite(self, data: bytes, offset: int) -> None:
        self.ops.append(Op("pwrite", offset, bytes(data)))
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        self.ops.append(Op("fsync"))
        self.inner.fsync()

    def truncate(self, length: int) -> None:
        self.ops.append(Op("truncate", length=length))
        self.inner.truncate(length)

    def punch_hole(self, offset: int, length: int) -> None:
        self.ops.append(Op("punch", offset, length=length))
        self.inner.punch_hole(offset, length)


def _apply(image: bytearray, op: Op) -> None:
    if op.kind == "pwrite":
        end = op.offset + len(op.data)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[op.offset:end] = op.data
    elif op.kind == "truncate":
        del image[op.length:]
        if len(image) < op.length:  # pragma: no cover - never grows
            image.extend(bytes(op.length - len(image)))
    elif op.kind == "punch":
        end = min(op.offset + op.length, len(image))
        if op.offset < end:
            image[op.offset:end] = bytes(end - op.offset)


def _pieces(op: Op) -> list[Op]:
    """A pwrite torn into its sectors (aligned in the file)."""
    if op.kind != "pwrite":
        return [op]
    out = []
    pos = op.offset
    end = op.offset + len(op.data)
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append(Op("pwrite", pos, op.data[pos - op.offset:nxt - op.offset]))
        pos = nxt
    return out


def crash_images(before: bytes, ops: list[Op], *, random_subsets: int = 3,
                 seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield (description, image bytes) for every simulated power loss."""
    rng = random.Random(seed)
    seen: set[bytes] = set()
    for cut in range(len(ops) + 1):
        last_sync = max((i for i in range(cut) if ops[i].kind == "fsync"), default=-1)
        durable = bytearray(before)
        for op in ops[:last_sync + 1]:
            _apply(durable, op)
        pending = [op for op in ops[last_sync + 1:cut] if op.kind != "fsync"]
        pieces = [p for op in pending for p in _pieces(op)]
        choices: list[tuple[str, list[Op]]] = [("none of the pending writes", []),
                                               ("all pending writes", pieces)]
        if len(pending) > 1:
            for i, op in enumerate(pending):
                choices.append((f"only pending op {i} ({op.kind} at {op.offset:#x})",
                                _pieces(op)))
        for r in range(random_subsets if len(pieces) > 1 else 0):
            subset = [p for p in pieces if rng.random() < 0.5]
            rng.shuffle(subset)
            choices.append((f"random torn subset {r}", subset))
        for label, applied in choices:
            image = bytearray(durable)
            for op in applied:
                _apply(image, op)
            data = bytes(image)
            if data in seen:
                continue
            seen.add(data)
            yield f"cut {cut}/{len(ops)}, {label}", data


def write_image(path: str | os.PathLike[str], data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
