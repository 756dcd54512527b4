"""Power-loss simulation for the metadata transaction.

``RecordingIO`` performs a commit's I/O and records every write, fsync,
truncate and hole punch.  ``CrashReplay`` then rebuilds, from the image as it
was before the commit, the states a power loss could leave, *one at a time on
a single scratch file* (memory stays bounded by the touched ranges, never a
copy of the image per state):

* The ops are cut into segments at each fsync.  A power loss anywhere in
  segment ``j`` (including during its closing fsync) leaves everything
  before the segment durable and any subset of the segment's writes, torn
  at 512-byte sector granularity and reordered, on disk.  The states
  reachable from an earlier cut point inside the segment are a subset of
  those reachable at its end, so one durable prefix per segment is applied
  once and every cut point of that segment is covered by its subsets.
* A subset is applied sector by sector in program order, the image is
  yielded, then the subset is undone from an undo log.  Two writes to the
  same sector in one segment: "earlier wins" is the subset without the
  later one, so program order loses no outcome.
* Subsets per segment: all of them when the segment has at most
  ``exhaustive_max`` pieces (sectors of pwrites; a truncate or punch is one
  piece); otherwise a sample with a fixed seed: all lost, all kept, each
  single write lost / kept alone, the clean cut before each write (no
  reordering), each single sector lost / kept alone (all of them up to
  ``max_singles``, else a seeded sample of that many), and
  ``random_subsets`` random torn subsets.
* Identical resulting images are yielded once (SHA-256 of the file size and
  of every range any op touches; the rest of the file never differs).

``shadow_paging_violations`` checks the protocol the replay relies on, over
*every* recorded write rather than a sample: before the header commit only
clusters free in the old image are written; the commit is one write inside
the first sector with an fsync on each side; afterwards only clusters free in
the new image are truncated or punched.  It reads refcounts with its own
small parser (not qcow2snap's).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qcow2snap.ops.transaction import FileIO

SECTOR = 512


@dataclass(frozen=True)
class Op:
    kind: str                 # "pwrite", "fsync", "truncate", "punch"
    offset: int = 0
    data: bytes = b""
    length: int = 0


class RecordingIO:
    """A MetadataIO that performs and records (pass it as ``io=``)."""

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


def _pieces(op: Op) -> list[Op]:
    """A pwrite torn into its sectors (aligned in the file); other ops whole."""
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


def segments(ops: list[Op]) -> list[tuple[int, list[int]]]:
    """[(number of ops durable before the segment, indices of its pending ops)]."""
    out: list[tuple[int, list[int]]] = []
    start = 0
    for i, op in enumerate([*ops, Op("fsync")]):
        if op.kind == "fsync":
            out.append((start, [k for k in range(start, i) if ops[k].kind != "fsync"]))
            start = i + 1
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def subsets(op_of_piece: list[int], rng: random.Random, *, exhaustive_max: int = 10,
            max_singles: int = 32, random_subsets: int = 8
            ) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(label, indices of the pieces that reach the disk) for one segment.

    ``op_of_piece[i]`` numbers the write piece ``i`` belongs to (0, 1, ...).
    """
    n = len(op_of_piece)
    everything = tuple(range(n))
    if n <= exhaustive_max:
        for mask in range(1 << n):
            kept = tuple(i for i in everything if mask >> i & 1)
            yield f"sectors kept {kept}", kept
        return
    yield "all pending writes lost", ()
    yield "all pending writes kept", everything
    writes = sorted(set(op_of_piece))

    def sample(items: list[int]) -> list[int]:
        if len(items) <= max_singles:
            return items
        return [items[0], *sorted(rng.sample(items[1:-1], max_singles - 2)), items[-1]]

    if len(writes) > 1:
        for w in sample(writes):
            yield (f"only write {w} lost",
                   tuple(i for i in everything if op_of_piece[i] != w))
            yield f"only write {w} kept", tuple(i for i in everything if op_of_piece[i] == w)
        for w in sample(writes[1:]):
            yield f"clean cut before write {w}", tuple(i for i in everything if op_of_piece[i] < w)
    for i in sample(list(everything)):
        yield f"only sector {i} lost", everything[:i] + everything[i + 1:]
        yield f"only sector {i} kept", (i,)
        # torn in the middle of its write, every earlier write complete
        yield (f"torn: write {op_of_piece[i]} up to sector {i}",
               tuple(k for k in everything if k <= i))
    for r in range(random_subsets):
        p = rng.choice((0.1, 0.5, 0.9))
        yield f"random torn subset {r} (p={p})", tuple(i for i in everything if rng.random() < p)


@dataclass
class ReplayStats:
    segments: int = 0
    subsets: int = 0
    variants: int = 0
    duplicates: int = 0
    per_segment: list[tuple[int, int, int]] = field(default_factory=list)  # ops, pieces, variants


class CrashReplay:
    """Every simulated power-loss image of one recorded commit, in turn, on
    ``scratch`` (a copy of ``before``; the file is left in the last state)."""

    def __init__(self, before: str | os.PathLike[str], ops: list[Op],
                 scratch: str | os.PathLike[str]) -> None:
        self.before = Path(before)
        self.ops = ops
        self.scratch = Path(scratch)
        self.stats = ReplayStats()
        size = self.before.stat().st_size
        reach = max([size, *(op.offset + len(op.data) for op in ops if op.kind == "pwrite")])
        self.touched = _merge(
            [(op.offset, op.offset + len(op.data)) for op in ops if op.kind == "pwrite"]
            + [(op.offset, op.offset + op.length) for op in ops if op.kind == "punch"]
            + [(op.length, reach) for op in ops if op.kind == "truncate"])

    # -- file primitives (with an undo log) ---------------------------------

    def _apply(self, fd: int, op: Op, undo: list[tuple[int, bytes]] | None) -> None:
        size = os.fstat(fd).st_size
        if op.kind == "pwrite":
            if undo is not None:
                undo.append((op.offset, os.pread(fd, len(op.data), op.offset)))
            os.pwrite(fd, op.data, op.offset)
        elif op.kind == "punch":
            end = min(op.offset + op.length, size)
            if op.offset < end:
                if undo is not None:
                    undo.append((op.offset, os.pread(fd, end - op.offset, op.offset)))
                os.pwrite(fd, bytes(end - op.offset), op.offset)
        elif op.kind == "truncate":
            if undo is not None and op.length < size:
                undo.append((op.length, os.pread(fd, size - op.length, op.length)))
            os.ftruncate(fd, op.length)
        else:  # pragma: no cover
            raise ValueError(op.kind)

    def _digest(self, fd: int) -> bytes:
        size = os.fstat(fd).st_size
        h = hashlib.sha256(struct.pack(">Q", size))
        for lo, hi in self.touched:
            pos = lo
            while pos < min(hi, size):
                chunk = os.pread(fd, min(1 << 22, min(hi, size) - pos), pos)
                h.update(chunk)
                pos += len(chunk)
        return h.digest()

    # -- the replay ---------------------------------------------------------

    def variants(self, *, exhaustive_max: int = 10, max_singles: int = 32,
                 random_subsets: int = 8, seed: int = 0) -> Iterator[str]:
        """Yield a label while ``scratch`` holds each distinct crash state."""
        rng = random.Random(seed)
        shutil.copyfile(self.before, self.scratch)
        seen: set[bytes] = set()
        fd = os.open(self.scratch, os.O_RDWR)
        try:
            segs = segments(self.ops)
            self.stats.segments = len(segs)
            done = 0
            for number, (durable, pending) in enumerate(segs):
                while done < durable:               # the durable prefix, applied once
                    if self.ops[done].kind != "fsync":
                        self._apply(fd, self.ops[done], None)
                    done += 1
                pieces: list[Op] = []
                op_of_piece: list[int] = []
                for w, k in enumerate(pending):
                    for piece in _pieces(self.ops[k]):
                        pieces.append(piece)
                        op_of_piece.append(w)
                yielded = 0
                for label, kept in subsets(op_of_piece, rng, exhaustive_max=exhaustive_max,
                                           max_singles=max_singles,
                                           random_subsets=random_subsets):
                    self.stats.subsets += 1
                    size = os.fstat(fd).st_size
                    undo: list[tuple[int, bytes]] = []
                    for i in kept:
                        self._apply(fd, pieces[i], undo)
                    digest = self._digest(fd)
                    if digest in seen:
                        self.stats.duplicates += 1
                    else:
                        seen.add(digest)
                        self.stats.variants += 1
                        yielded += 1
                        yield (f"segment {number}/{len(segs) - 1} (after {durable} ops; "
                               f"{len(pending)} pending writes, {len(pieces)} pieces): {label}")
                    for offset, old in reversed(undo):
                        os.pwrite(fd, old, offset)
                    os.ftruncate(fd, size)
                self.stats.per_segment.append((len(pending), len(pieces), yielded))
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# an independent look at refcounts, for the protocol check


class Refcounts:
    """Refcounts of a qcow2 file, parsed here from the spec (qcow2.txt)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as f:
            self.data_size = os.fstat(f.fileno()).st_size
            head = f.read(104)
            if head[:4] != b"QFI\xfb":
                raise ValueError(f"{path}: not qcow2")
            version = struct.unpack_from(">I", head, 4)[0]
            self.cluster_bits = struct.unpack_from(">I", head, 20)[0]
            table_offset = struct.unpack_from(">Q", head, 48)[0]
            table_clusters = struct.unpack_from(">I", head, 56)[0]
            self.order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
            f.seek(table_offset)
            raw = f.read(table_clusters << self.cluster_bits)
            self.table = [e & ~0x1FF for e in struct.unpack(f">{len(raw) // 8}Q", raw)]
            self.blocks: dict[int, bytes] = {}
            for index, offset in enumerate(self.table):
                if offset:
                    f.seek(offset)
                    self.blocks[index] = f.read(1 << self.cluster_bits)
        self.cluster_size = 1 << self.cluster_bits
        self.entries = (self.cluster_size * 8) >> self.order

    def get(self, cluster: int) -> int:
        block = self.blocks.get(cluster // self.entries)
        if block is None:
            return 0
        i = cluster % self.entries
        bits = 1 << self.order
        if bits < 8:
            return (block[i * bits // 8] >> (i * bits % 8)) & ((1 << bits) - 1)
        width = bits // 8
        return int.from_bytes(block[i * width:(i + 1) * width], "big")


def shadow_paging_violations(before: str | os.PathLike[str], after: str | os.PathLike[str],
                             ops: list[Op]) -> list[str]:
    """Where the recorded commit breaks the documented protocol (empty: none)."""
    old, new = Refcounts(before), Refcounts(after)
    cs = old.cluster_size
    size = max([os.stat(before).st_size,
                *(op.offset + len(op.data) for op in ops if op.kind == "pwrite")])
    problems: list[str] = []
    commits = [i for i, op in enumerate(ops) if op.kind == "pwrite" and op.offset < cs]
    if len(commits) != 1:
        return [f"expected exactly one write into the header cluster, got ops {commits}"]
    commit = commits[0]
    head = ops[commit]
    if head.offset + len(head.data) > SECTOR:
        problems.append(f"the commit write {head.offset}+{len(head.data)} leaves sector 0")
    writes_before = [i for i in range(commit) if ops[i].kind != "fsync"]
    if writes_before and "fsync" not in [op.kind for op in ops[writes_before[-1] + 1:commit]]:
        problems.append("no fsync between the new clusters and the commit write")
    syncs_after = [i for i in range(commit + 1, len(ops)) if ops[i].kind == "fsync"]
    if not syncs_after:
        problems.append("no fsync after the commit write")
    first_sync = syncs_after[0] if syncs_after else len(ops)
    for i, op in enumerate(ops):
        if op.kind == "fsync" or i == commit:
            continue
        if i < commit:
            if op.kind != "pwrite":
                problems.append(f"op {i}: {op.kind} before the commit")
                continue
            for c in range(op.offset // cs, (op.offset + len(op.data) + cs - 1) // cs):
                if old.get(c):
                    problems.append(f"op {i}: pwrite before the commit into cluster {c}, "
                                    f"in use (refcount {old.get(c)}) in the old state")
            continue
        if i < first_sync:
            problems.append(f"op {i}: {op.kind} after the commit before its fsync")
        if op.kind == "truncate":
            lo, hi = op.length, max(size, op.length)
        elif op.kind == "punch":
            lo, hi = op.offset, op.offset + op.length
        else:
            lo, hi = op.offset, op.offset + len(op.data)
        for c in range(lo // cs, (hi + cs - 1) // cs):
            if new.get(c):
                problems.append(f"op {i}: {op.kind} after the commit touches cluster {c}, "
                                f"in use (refcount {new.get(c)}) in the new state")
    return sorted(set(problems))


__all__ = [
    "SECTOR",
    "CrashReplay",
    "Op",
    "RecordingIO",
    "Refcounts",
    "segments",
    "shadow_paging_violations",
    "subsets",
]
