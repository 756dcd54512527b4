"""Space accounting of a qcow2 image (operations layer): what each layer
references, what deleting a snapshot would free, and where the file's
clusters go.

The references are QEMU's: :func:`usage` runs the checker
(:class:`~qcow2snap.ops.check.Checker`, QEMU's ``qcow2_check_refcounts``
rule: an L2 table reached by k L1 entries gives its data clusters k
references; a compressed cluster +1 on every host cluster its bytes touch)
for the computed references and the stored refcounts, then walks every
layer's L1 table once more to learn *which* layers the references of each
host cluster come from.

A host cluster is **exclusive** to a layer when every reference to it comes
from that layer's paths (its L1 table, the L2 tables it reaches, the data
and VM-state clusters those reach) and its stored refcount equals that
count: exactly the clusters whose refcount ``qemu-img snapshot -d`` drops
to zero (``qcow2_update_snapshot_refcount(..., -1)`` then freeing the L1
table, ``block/qcow2-snapshot.c``).  Deleting also rewrites the snapshot
table (QEMU allocates the new table before it frees the old one); that
change is reported on its own (:attr:`LayerUsage.table_freed_clusters`,
:attr:`LayerUsage.table_allocated_clusters`).

Memory is a few bytes per host cluster (the checker's arrays plus an owner
array); time is the check plus one pass over the distinct L2 tables.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress

from .. import format as fmt
from ..image import Qcow2Image
from ..model import Snapshot
from ..tables import decode_u64_table
from .check import Checker

__all__ = ["ImageUsage", "LayerUsage", "UsageReport", "usage"]

Progress = Callable[[int, int], None]

# cluster kinds (a bytearray, one byte per host cluster)
_NONE, _L1, _L2, _DATA, _VMSTATE = 0, 1, 2, 3, 4
# owner markers (an array of layer indexes)
_NOBODY, _SEVERAL = -1, -2
#: QEMU's fixed snapshot header and known extra data (qcow2_write_snapshots)
_SNAPSHOT_HEADER_SIZE = 40
_SNAPSHOT_EXTRA_SIZE = 24


@dataclass(frozen=True, slots=True)
class LayerUsage:
    """The clusters of one layer: a snapshot, or the active layer
    (``snapshot`` None)."""

    snapshot: Snapshot | None
    #: distinct host clusters the layer reaches (L1 table, L2 tables, data, VM state)
    referenced_clusters: int
    #: of those, the clusters only this layer references (freed by deleting it)
    exclusive_clusters: int
    exclusive_data_clusters: int
    exclusive_vm_state_clusters: int
    exclusive_l2_clusters: int
    exclusive_l1_clusters: int
    #: referenced clusters that something else references too
    shared_clusters: int
    #: deleting the snapshot frees the old snapshot table (these clusters) ...
    table_freed_clusters: int
    #: ... and writes a new one (these clusters); 0 for the active layer
    table_allocated_clusters: int


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """Where the clusters of the file go (each a count of host clusters)."""

    file_clusters: int
    referenced_clusters: int
    guest_data_clusters: int
    vm_state_clusters: int
    l1_clusters: int
    l2_clusters: int
    refcount_table_clusters: int
    refcount_block_clusters: int
    snapshot_table_clusters: int
    header_clusters: int
    #: referenced clusters of no kind above (LUKS header, persistent bitmaps)
    other_clusters: int
    #: unreferenced clusters whose stored refcount is 0
    free_clusters: int
    #: unreferenced clusters whose stored refcount is not 0
    leaked_clusters: int
    #: referenced clusters whose stored refcount exceeds their references
    #: (``qemu-img check`` counts them as leaks too)
    over_counted_clusters: int
    #: referenced clusters whose stored refcount is below their references
    under_counted_clusters: int

    @property
    def reclaimable_clusters(self) -> int:
        """What a compaction gives back: every cluster nothing references."""
        return self.free_clusters + self.leaked_clusters


@dataclass(frozen=True, slots=True)
class UsageReport:
    filename: str
    cluster_size: int
    image: ImageUsage
    active: LayerUsage
    snapshots: tuple[LayerUsage, ...]


def usage(image: str | os.PathLike[str] | Qcow2Image, *, progress: Progress | None = None
          ) -> UsageReport:
    """The space accounting of one image (opened read-only when a path is
    given; never written)."""
    if isinstance(image, Qcow2Image):
        return _Usage(image, progress).run()
    with Qcow2Image(image, "r") as opened:
        return _Usage(opened, progress).run()


def _cluster_range(offset: int, length: int, bits: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset >> bits, ((offset + length - 1) >> bits) + 1)


def snapshot_table_size(snapshots: list[Snapshot]) -> int:
    """Bytes QEMU's ``qcow2_write_snapshots`` writes for ``snapshots``."""
    size = 0
    for sn in snapshots:
        size = fmt.align_up(size, 8)
        size += (_SNAPSHOT_HEADER_SIZE + max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size)
                 + len(sn.id_bytes) + len(sn.name_bytes))
    return size


class _Usage:
    def __init__(self, image: Qcow2Image, progress: Progress | None) -> None:
        self.image = image
        self.progress = progress
        self.bits = image.cluster_bits
        self.cs = image.cluster_size

    def _check_progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, 2 * total)

    def run(self) -> UsageReport:
        image = self.image
        bits = self.bits
        checker = Checker(image, progress=self._check_progress)
        checker.run()
        ref, disk = checker.ref, checker.disk
        n = min(len(ref), len(disk))
        file_clusters = checker.file_clusters
        snapshots = list(image.snapshots)
        # layer 0 is the active layer, layer k the k-th snapshot
        layers: list[tuple[int, int, int]] = [
            (image.header.l1_table_offset, image.header.l1_size, image.size_to_l1(image.size))]
        layers += [(sn.l1_table_offset, sn.l1_size, image.size_to_l1(sn.disk_size))
                   for sn in snapshots]
        owner = array("l", [_NOBODY]) * n
        lref = array("Q", bytes(8 * n))     # references from layer paths
        kind = bytearray(n)
        # per L2 table: paths per layer, and whether any path maps guest data
        paths: dict[int, Counter[int]] = {}
        data_tables: set[int] = set()
        layer_tables: list[set[int]] = []
        layer_l1: list[range] = []

        def own(c: int, layer: int, what: int) -> None:
            o = owner[c]
            if o == _NOBODY:
                owner[c] = layer
            elif o != layer:
                owner[c] = _SEVERAL
            if kind[c] == _NONE or what < kind[c]:
                kind[c] = what

        for index, (l1_offset, l1_size, vm_index) in enumerate(layers):
            l1_clusters = _cluster_range(l1_offset, l1_size * fmt.L1E_SIZE, bits)
            layer_l1.append(l1_clusters)
            for c in l1_clusters:
                if c < n:
                    own(c, index, _L1)
                    lref[c] += 1
            tables: set[int] = set()
            if l1_size:
                table = decode_u64_table(image.pread(l1_offset, l1_size * fmt.L1E_SIZE))
                for i in compress(range(len(table)), table):
                    l2 = table[i] & fmt.L1E_OFFSET_MASK
                    if not l2 or l2 & (self.cs - 1) or (l2 >> bits) >= file_clusters:
                        continue   # damage the checker reported; nothing counted
                    paths.setdefault(l2, Counter())[index] += 1
                    tables.add(l2)
                    if i < vm_index:
                        data_tables.add(l2)
            layer_tables.append(tables)
        total = len(paths)
        hosts: dict[int, list[int] | array[int]] = {}
        for done, (l2, by_layer) in enumerate(paths.items()):
            count = sum(by_layer.values())
            single = next(iter(by_layer)) if len(by_layer) == 1 else _SEVERAL
            c = l2 >> bits
            for layer in by_layer:
                own(c, layer, _L2)
            lref[c] += count
            info = checker.l2_info(l2)   # scanned once, by the check
            hosts[l2] = info.hosts
            what = _DATA if l2 in data_tables else _VMSTATE
            for c in info.hosts:
                if c < n:
                    lref[c] += count
                    own(c, single, what)
            if self.progress is not None and done % 64 == 0:
                self.progress(total + done, 2 * total)
        # exclusive: every reference from one layer, and the stored refcount
        # drops to zero when those references go
        exclusive = [Counter[int]() for _ in layers]
        for c in compress(range(n), map((_NOBODY).__lt__, owner)):
            if lref[c] == ref[c] == disk[c]:
                exclusive[owner[c]][kind[c]] += 1
        # the snapshot table: QEMU frees the old one and writes a smaller one
        table_clusters = (_cluster_range(*checker.table_counted, bits)
                          if checker.table_counted else range(0))
        table_freed = sum(1 for c in table_clusters if c < n and disk[c] == 1)
        records = []
        # consecutive layers often reach the same L2 tables: their data once
        last: tuple[frozenset[int], set[int]] | None = None
        for index, (l1_clusters, tables) in enumerate(zip(layer_l1, layer_tables,
                                                          strict=True)):
            key = frozenset(tables)
            if last is not None and last[0] == key:
                data = last[1]
            else:
                data = set()
                for l2 in tables:
                    data.update(hosts[l2])
                last = (key, data)
            reached = set(l1_clusters)
            reached.update(l2 >> bits for l2 in tables)
            referenced = len(data) + len(reached) - len(reached.intersection(data))
            ex = exclusive[index]
            sn = snapshots[index - 1] if index else None
            allocated = 0
            if sn is not None:
                rest = snapshots[:index - 1] + snapshots[index:]
                allocated = -(-snapshot_table_size(rest) >> bits)
            total_ex = sum(ex.values())
            records.append(LayerUsage(
                sn, referenced, total_ex, ex[_DATA], ex[_VMSTATE], ex[_L2], ex[_L1],
                referenced - total_ex, table_freed if sn is not None else 0, allocated))
        # the file
        referenced_all = over = under = leaked = free = 0
        kinds = Counter[int]()
        for base in range(0, file_clusters, 4096):
            stop = min(base + 4096, file_clusters)
            r = ref[base:stop]
            d = disk[base:stop]
            if r == d and not any(r):
                free += stop - base
                continue
            for k, (rc, dc) in enumerate(zip(r, d, strict=True)):
                if rc:
                    referenced_all += 1
                    kinds[kind[base + k]] += 1
                    if dc > rc:
                        over += 1
                    elif dc < rc:
                        under += 1
                elif dc:
                    leaked += 1
                else:
                    free += 1
        h = image.header
        refcount_table = sum(1 for c in _cluster_range(
            h.refcount_table_offset, h.refcount_table_clusters << bits, bits)
            if c < file_clusters and ref[c])
        refcount_blocks = sum(1 for _, off in checker.refblocks if ref[off >> bits])
        snapshot_table = sum(1 for c in table_clusters if c < file_clusters and ref[c])
        header = 1 if file_clusters and ref[0] else 0
        unclassified = kinds[_NONE]
        other = max(0, unclassified - refcount_table - refcount_blocks - snapshot_table - header)
        totals = ImageUsage(
            file_clusters, referenced_all, kinds[_DATA], kinds[_VMSTATE], kinds[_L1],
            kinds[_L2], refcount_table, refcount_blocks, snapshot_table, header, other,
            free, leaked, over, under)
        if self.progress is not None:
            self.progress(1, 1)
        return UsageReport(image.path, self.cs, totals, records[0], tuple(records[1:]))
