"""Internal snapshots to an external backing chain (operations layer):
``qcow2snap export-chain``.

One qcow2 file per snapshot and one for the active layer (always, even when
it equals the last snapshot), in the chosen order (by date by default, ties
by ID).  The first file holds its layer's whole disk (a standalone qcow2,
the source's backing chain merged in); each next one is an overlay with a
relative backing-file reference to the previous file (backing format
qcow2) that holds only the clusters where its layer reads differently from
the previous one: the metadata diff (:func:`qcow2snap.ops.diff.diff_layers`)
finds the candidate ranges without reading data, then each candidate
cluster is read on both sides and written only where the bytes differ;
one that became zeros is written as a zero cluster (QCOW_OFLAG_ZERO), so it
reads as zeros whatever the backing file holds.  A layer of another disk
size gets its own size: QEMU reads zeros past the end of a shorter backing
file, so zeros there need no cluster.

Beside the files: ``chain.json`` (the manifest: per file its snapshot's ID,
name, date, VM clock, disk size, VM-state file and backing file) and each
saved VM state as a ``vmstate dump`` file.  Everything is written into a
temporary directory beside DIR and renamed to DIR only when complete; the
source image is only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from ..copier import is_zero
from ..errors import OutputError, OutputExistsError
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import DiskReader, Layer
from .diff import diff_layers
from .extract import Overlay, _Progress, _write_qcow2, dump_vm_state

__all__ = ["MANIFEST_NAME", "ChainExport", "ChainFile", "Order", "export_chain", "order_layers"]

ProgressCallback = Callable[[int, int], None]
Order = Literal["date", "id", "name"]

#: the manifest's file name in DIR
MANIFEST_NAME = "chain.json"
#: manifest format version
MANIFEST_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True, slots=True)
class ChainFile:
    """One exported layer: its file, what it came from and what it refers to."""

    file: str
    snapshot: Snapshot | None      #: None: the active layer
    disk_size: int
    backing_file: str | None
    vm_state_file: str | None
    #: an overlay's data clusters and zero clusters (None: the first file,
    #: which holds its whole disk)
    data_clusters: int | None
    zero_clusters: int | None

    def to_json(self) -> dict[str, object]:
        sn = self.snapshot
        return {
            "file": self.file,
            "snapshot-id": None if sn is None else sn.id,
            "name": None if sn is None else sn.name,
            "date-sec": None if sn is None else sn.date_sec,
            "date-nsec": None if sn is None else sn.date_nsec,
            "vm-clock-nsec": None if sn is None else sn.vm_clock_nsec,
            "icount": None if sn is None else sn.icount,
            "disk-size": self.disk_size,
            "vm-state-size": 0 if sn is None else sn.vm_state_size,
            "vm-state-file": self.vm_state_file,
            "backing-file": self.backing_file,
            "backing-format": None if self.backing_file is None else "qcow2",
            "data-clusters": self.data_clusters,
            "zero-clusters": self.zero_clusters,
        }


@dataclass(frozen=True)
class ChainExport:
    """What :func:`export_chain` wrote into ``directory``."""

    source: str
    directory: str
    order: str
    files: tuple[ChainFile, ...]
    manifest: str

    def to_json(self) -> dict[str, object]:
        """The manifest, ``chain.json``."""
        return {"version": MANIFEST_VERSION, "source": self.source, "order": self.order,
                "files": [f.to_json() for f in self.files]}


def _id_key(sn: Snapshot) -> tuple[int, int, str]:
    """IDs in numeric order where they are numbers (QEMU's are), then as text."""
    return (0, int(sn.id), "") if sn.id.isdigit() else (1, 0, sn.id)


def order_layers(snapshots: tuple[Snapshot, ...], order: Order = "date") -> list[Snapshot]:
    """The snapshots in export order: by ``date`` (then ID), ``id`` or
    ``name`` (then ID)."""
    if order == "date":
        return sorted(snapshots, key=lambda s: (s.date_sec, s.date_nsec, _id_key(s)))
    if order == "id":
        return sorted(snapshots, key=_id_key)
    if order == "name":
        return sorted(snapshots, key=lambda s: (s.name, _id_key(s)))
    raise ValueError(f"unknown order {order!r} (date, id or name)")


def _safe(text: str, limit: int = 48) -> str:
    """``text`` as a piece of a file name: no separators, no leading dot."""
    return _UNSAFE.sub("_", text).strip("._")[:limit]


def _stem(position: int, width: int, sn: Snapshot | None) -> str:
    number = f"{position:0{width}d}"
    if sn is None:
        return f"{number}-active"
    return "-".join(p for p in (number, _safe(sn.id, 16) or "x", _safe(sn.name)) if p)


def _changed_clusters(image: Qcow2Image, prev: Layer, layer: Layer,
                      counts: list[int]) -> Iterator[tuple[int, bytes | None]]:
    """The clusters of ``layer`` that read differently from ``prev`` (zeros
    past ``prev``'s end), with their content; ``None`` for a cluster that
    became zeros where ``prev`` still has data.  ``counts`` gets the data
    and zero clusters yielded."""
    cs = image.cluster_size
    bits = image.cluster_bits
    result = diff_layers(image, prev.snapshot, layer.snapshot, strict=True)
    new_reader = DiskReader(image, layer)
    old_reader = DiskReader(image, prev)
    last_cluster = (layer.size - 1) >> bits if layer.size else -1
    done = -1
    for r in result.ranges:
        first = max(r.guest_offset >> bits, done + 1)
        end = min((r.guest_end - 1) >> bits, last_cluster)
        for cluster in range(first, end + 1):
            start = cluster << bits
            n = min(cs, layer.size - start)
            new = new_reader.pread(start, n)
            old = old_reader.pread(start, n)       # clipped at prev's end
            old += bytes(n - len(old))             # QEMU reads zeros past it
            done = cluster
            if new == old:
                continue
            if is_zero(new):
                counts[1] += 1
                yield cluster, None
            else:
                counts[0] += 1
                yield cluster, new + bytes(cs - n)


def _check_directory(directory: str, image: Qcow2Image, overwrite: bool) -> bool:
    """Refuse a DIR that is not a directory, is not empty (without
    ``overwrite``) or holds a file the export reads.  Returns whether it
    exists."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise OutputExistsError(f"{directory}: exists and is not a directory") from None
    except OSError as exc:
        raise OutputError(f"{directory}: cannot use as output: {exc.strerror or exc}") from exc
    if os.path.islink(directory):
        raise OutputExistsError(f"{directory}: is a symbolic link; name the directory itself")
    real = os.path.realpath(directory)
    for what in [image.path, *(link.path for link in image.backing_chain())]:
        inside = os.path.realpath(what)
        if os.path.commonpath([real, inside]) == real:
            raise OutputExistsError(f"{directory}: holds {what}, which this export reads; "
                                    f"choose another directory")
    if entries and not overwrite:
        raise OutputExistsError(f"{directory}: not empty; pass overwrite=True (CLI: --force) "
                                f"to replace it")
    return True


def export_chain(image: Qcow2Image, directory: str | os.PathLike[str], *,
                 order: Order = "date", overwrite: bool = False,
                 progress: ProgressCallback | None = None) -> ChainExport:
    """Export every snapshot of ``image`` and its active layer as a chain of
    qcow2 files in ``directory`` (see the module's description).

    ``directory`` must not exist or be empty; ``overwrite=True`` replaces a
    non-empty one (its old content is removed once the new one is in
    place).  ``progress(done, total)`` counts guest bytes of every layer
    and VM-state bytes."""
    directory = os.fspath(directory).rstrip("/") or "/"
    snapshots = order_layers(image.snapshots, order)
    layers = [image.layer(sn) for sn in snapshots] + [image.layer(None)]
    if image.encrypted:          # unlock (or refuse) before anything is written
        image.data_cipher()
    exists = _check_directory(directory, image, overwrite)
    total = (sum(layer.size for layer in layers)
             + sum(sn.vm_state_size for sn in snapshots))
    done = 0

    def step(base: int) -> ProgressCallback:
        def report(part: int, _total: int) -> None:
            if progress is not None:
                progress(min(base + part, total), total)
        return report

    if progress is not None:
        progress(0, total)
    parent = os.path.dirname(os.path.abspath(directory))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.",
                               suffix=".qcow2snap-tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot create the output in {parent}: "
                          f"{exc.strerror or exc}") from exc
    files: list[ChainFile] = []
    width = max(2, len(str(len(layers))))
    try:
        previous: tuple[Layer, str] | None = None
        for position, layer in enumerate(layers, 1):
            sn = layer.snapshot
            stem = _stem(position, width, sn)
            name = f"{stem}.qcow2"
            tracker = _Progress(layer.size, step(done))
            counts = [0, 0]
            fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                if previous is None:
                    _write_qcow2(image, layer, fd, compress=None, progress=tracker, backing=True)
                else:
                    overlay = Overlay(previous[1],
                                      _changed_clusters(image, previous[0], layer, counts))
                    _write_qcow2(image, layer, fd, compress=None, progress=tracker,
                                 backing=True, overlay=overlay)
            finally:
                os.close(fd)
            done += layer.size
            vm_file = None
            if sn is not None and sn.has_vm_state:
                vm_file = f"{stem}.vmstate"
                dump_vm_state(image, sn, os.path.join(tmp, vm_file), progress=step(done))
                done += sn.vm_state_size
            data_clusters, zero_clusters = counts if previous else (None, None)
            files.append(ChainFile(name, sn, layer.size, previous[1] if previous else None,
                                   vm_file, data_clusters, zero_clusters))
            previous = (layer, name)
        result = ChainExport(image.path, directory, order, tuple(files),
                             os.path.join(directory, MANIFEST_NAME))
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as out:
            json.dump(result.to_json(), out, indent=4, ensure_ascii=False)
            out.write("\n")
        _install(tmp, directory, exists)
        tmp = ""
    except OSError as exc:
        if exc.filename is not None and not os.fspath(exc.filename).startswith(tmp or "\0"):
            raise   # reading an input failed (it names the file), not writing the output
        raise OutputError(f"{directory}: writing the export failed: {exc.strerror or exc}; "
                          f"nothing was left under that name") from exc
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(total, total)
    return result


def _install(tmp: str, directory: str, exists: bool) -> None:
    """Put the finished ``tmp`` at ``directory``: a rename over an absent or
    empty directory; a non-empty one is moved aside first and removed once
    the new one is in place."""
    os.chmod(tmp, 0o777 & ~_umask())
    if not exists or not os.listdir(directory):
        os.replace(tmp, directory)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.",
                             suffix=".qcow2snap-old", dir=os.path.dirname(tmp))
    os.rmdir(aside)
    os.rename(directory, aside)
    try:
        os.rename(tmp, directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, directory)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
