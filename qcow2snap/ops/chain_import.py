"""An external backing chain to internal snapshots (operations layer):
``qcow2snap import-chain``, the reverse of ``export-chain``.

TOP's backing chain (qcow2 files only) becomes one new qcow2 v3 image: each
layer below TOP, oldest first, an internal snapshot named after its file's
stem (dated by the file's modification time), and TOP's disk the active
layer.  Each layer's disk is what QEMU reads from that file through its own
backing chain.  A data cluster is written once and shared by every layer
that reads the same bytes there: a layer starts from the previous one's
mapping and gets new clusters only where its own file maps something (or
past a shorter previous disk) and the bytes differ; clusters that read as
zeros are left unallocated (no backing file: they read zeros).  Each layer
has its own L2 tables, refcounts count every reference (QEMU's rule), and
OFLAG_COPIED is set exactly where the refcount is 1 in the active layer.

The output is written under a temporary name and renamed into place when
complete (``extract.atomic_output``); the chain is only read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import format as fmt
from ..copier import is_zero
from ..errors import UnsupportedImageError
from ..image import Qcow2Image
from ..model import Header, new_snapshot, serialize_snapshot_table
from ..reader import DiskReader, ExtentKind, iter_extents
from ..refcount import write_fresh_refcounts
from ..tables import encode_u64_table
from .extract import _Progress, atomic_output, input_files

__all__ = ["ChainImport", "ImportedLayer", "import_chain"]

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ImportedLayer:
    """One layer of the chain as it became part of the output."""

    file: str
    name: str | None          #: the snapshot's name (None: the active layer)
    snapshot_id: str | None
    disk_size: int
    #: data clusters written for this layer (the others are shared or zeros)
    new_clusters: int


@dataclass(frozen=True)
class ChainImport:
    """What :func:`import_chain` wrote."""

    output: str
    cluster_size: int
    layers: tuple[ImportedLayer, ...]
    file_size: int


def _members(top: Qcow2Image) -> list[Qcow2Image]:
    members = top.chain()
    for member in members:
        if not isinstance(member, Qcow2Image):
            raise UnsupportedImageError(
                f"{top.path}: its backing chain ends in a raw file; import-chain makes qcow2 "
                f"layers into snapshots (convert the raw base to qcow2 first: qemu-img convert "
                f"-O qcow2, then qemu-img rebase -u)", feature="raw backing file")
    return [m for m in members if isinstance(m, Qcow2Image)][::-1]


def _own_clusters(member: Qcow2Image, bits: int) -> set[int]:
    """Output clusters (of ``1 << bits`` bytes) where ``member`` itself maps
    something (data, compressed or zero): what may differ from below."""
    found: set[int] = set()
    layer = member.layer(None)
    for ext in iter_extents(member, layer, 0, layer.size):
        if ext.kind is not ExtentKind.UNALLOCATED:
            found.update(range(ext.guest_offset >> bits, ((ext.guest_end - 1) >> bits) + 1))
    return found


def import_chain(top: Qcow2Image, output: str | os.PathLike[str], *, overwrite: bool = False,
                 progress: ProgressCallback | None = None) -> ChainImport:
    """Write ``output``: ``top``'s backing chain as internal snapshots and
    ``top`` as the active layer (see the module's description).
    ``progress(done, total)`` counts the guest bytes of every layer."""
    members = _members(top)
    bits = top.cluster_bits
    cs = 1 << bits
    l2_bits = bits - 3
    l2_entries = 1 << l2_bits
    tracker = _Progress(sum(m.size for m in members), progress)
    refcounts: dict[int, int] = {0: 1}
    imported: list[ImportedLayer] = []
    l1_tables: list[tuple[int, int]] = []      # (offset, entries) per layer
    with atomic_output(output, overwrite=overwrite, inputs=input_files(top)) as fd:
        write_offset = cs

        def pwrite(data: bytes, offset: int) -> None:
            view = memoryview(data)
            while len(view):
                n = os.pwrite(fd, view, offset)
                offset += n
                view = view[n:]

        def allocate(data: bytes) -> int:
            nonlocal write_offset
            offset = write_offset
            pwrite(data, offset)
            write_offset += len(data)
            return offset

        def emit_tables(mapping: dict[int, int], size: int, active: bool) -> None:
            """A layer's L2 tables and L1 table (OFLAG_COPIED where the
            refcount is 1, in the active layer only)."""
            tables: dict[int, list[int]] = {}
            for cluster, host in mapping.items():
                entry = host
                if active and refcounts[host >> bits] == 1:
                    entry |= fmt.QCOW_OFLAG_COPIED
                tables.setdefault(cluster >> l2_bits, [0] * l2_entries)[
                    cluster & (l2_entries - 1)] = entry
            l1_size = top.size_to_l1(size)
            l1 = [0] * l1_size
            for l1_index in sorted(tables):
                offset = allocate(encode_u64_table(tables[l1_index]))
                refcounts[offset >> bits] = 1
                l1[l1_index] = offset | (fmt.QCOW_OFLAG_COPIED if active else 0)
            l1_offset = write_offset
            if l1_size:
                allocate(encode_u64_table(l1) + bytes(-l1_size * 8 % cs))
            for cluster in range(l1_offset >> bits, write_offset >> bits):
                refcounts[cluster] = 1
            l1_tables.append((l1_offset, l1_size))

        prev_size = 0
        prev_reader: DiskReader | None = None
        mapping: dict[int, int] = {}
        for index, member in enumerate(members):
            layer = member.layer(None)
            size = layer.size
            reader = DiskReader(member, layer)
            nb_clusters = (size + cs - 1) >> bits
            mapping = {c: h for c, h in mapping.items() if c < nb_clusters}
            # the base has no backing file: only what it maps can be non-zero
            own = _own_clusters(member, bits)
            if prev_reader is not None and size > prev_size:
                own.update(range(prev_size >> bits, nb_clusters))
            candidates: Iterable[int] = sorted(c for c in own if c < nb_clusters)
            boundary = prev_size >> bits if prev_size & (cs - 1) and size > prev_size else -1
            written = 0
            for cluster in candidates:
                start = cluster << bits
                n = min(cs, size - start)
                new = reader.pread(start, n)
                if prev_reader is not None and cluster != boundary:
                    old = prev_reader.pread(start, n)
                    if new == old + bytes(n - len(old)):
                        continue
                if is_zero(new):
                    mapping.pop(cluster, None)
                    continue
                mapping[cluster] = allocate(new + bytes(cs - n))
                written += 1
            tracker(size)
            for host in mapping.values():
                refcounts[host >> bits] = refcounts.get(host >> bits, 0) + 1
            is_top = index == len(members) - 1
            emit_tables(mapping, size, is_top)
            stem = os.path.basename(member.path).rsplit(".", 1)[0] or f"layer-{index + 1}"
            imported.append(ImportedLayer(member.path, None if is_top else stem,
                                          None if is_top else str(index + 1), size, written))
            prev_size, prev_reader = size, reader

        # then the snapshot table, the refcount blocks and the table
        next_cluster = write_offset >> bits
        snapshots = []
        for (l1_offset, l1_size), layer_info, member in zip(l1_tables[:-1], imported[:-1],
                                                            members[:-1], strict=True):
            mtime = os.stat(member.path).st_mtime_ns
            assert layer_info.name is not None and layer_info.snapshot_id is not None
            snapshots.append(new_snapshot(
                id_bytes=layer_info.snapshot_id.encode(), name_bytes=os.fsencode(layer_info.name),
                l1_table_offset=l1_offset, l1_size=l1_size, date_sec=mtime // 10**9,
                date_nsec=mtime % 10**9, vm_clock_nsec=0, vm_state_size=0,
                disk_size=layer_info.disk_size, icount=None))
        table = serialize_snapshot_table(snapshots)
        snapshots_offset = (next_cluster << bits) if snapshots else 0
        if snapshots:
            pwrite(table, snapshots_offset)
            for _ in range((len(table) + cs - 1) >> bits):
                refcounts[next_cluster] = 1
                next_cluster += 1

        reftable_offset, nb_table_clusters, end_cluster = write_fresh_refcounts(
            pwrite, refcounts, next_cluster, bits)
        active_l1 = l1_tables[-1]
        header = Header(
            version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=bits,
            size=top.size, crypt_method=0, l1_size=active_l1[1], l1_table_offset=active_l1[0],
            refcount_table_offset=reftable_offset, refcount_table_clusters=nb_table_clusters,
            nb_snapshots=len(snapshots), snapshots_offset=snapshots_offset,
            incompatible_features=0, compatible_features=0, autoclear_features=0,
            refcount_order=4, header_length=fmt.QCOW_HEADER_FULL_SIZE,
            compression_type=fmt.QCOW2_COMPRESSION_TYPE_ZLIB, compression_padding=bytes(7),
            tail=b"")
        pwrite(header.to_bytes() + bytes(8), 0)
        file_size = end_cluster << bits
        os.ftruncate(fd, file_size)
    return ChainImport(os.fspath(output), cs, tuple(imported), file_size)
