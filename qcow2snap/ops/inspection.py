"""What ``info`` and ``list`` show, gathered (operations layer).

Presentation (:mod:`qcow2snap.describe`) does no I/O: everything it renders
that is not already in the opened image's parsed metadata is read here
first — the run state of each VM-state snapshot (from its stream), the
file's allocated size, the backing chain (opening each link the policy
allows) and the real paths of its links — into plain records.  The
multi-image comparison of ``list A B ...`` is computed here too; describe
only lays it out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..image import ChainLink, Qcow2Image
from ..model import Snapshot

__all__ = [
    "ChainLinkFacts",
    "ImageFacts",
    "SnapshotComparison",
    "SnapshotFacts",
    "compare_snapshots",
    "image_facts",
    "snapshot_facts",
]


@dataclass(frozen=True, slots=True)
class SnapshotFacts:
    """One snapshot with what listing it needs beyond its table entry."""

    snapshot: Snapshot
    #: guest offset of its VM state in its own mapping (None: disk-only)
    vm_state_offset: int | None = None
    #: the run state it was saved in (None: disk-only, or unreadable)
    runstate: str | None = None


@dataclass(frozen=True, slots=True)
class ChainLinkFacts:
    """A backing-chain link and the real path it resolves to."""

    link: ChainLink
    resolved: str | None


@dataclass(frozen=True)
class ImageFacts:
    """Everything ``info`` shows of one image."""

    image: Qcow2Image
    filename: str
    #: bytes the file takes on its file system (``st_blocks`` x 512)
    actual_size: int | None
    chain: tuple[ChainLinkFacts, ...]
    snapshots: tuple[SnapshotFacts, ...]


def snapshot_facts(image: Qcow2Image, snapshots: Iterable[Snapshot] | None = None
                   ) -> Iterator[SnapshotFacts]:
    """The facts of ``snapshots`` (default: all of the image's), one at a
    time, so a listing of 65,536 snapshots can be written as it is read."""
    # loaded on first use, by the first snapshot with a VM state: the
    # savevm-stream walker costs start-up time that listings of disk-only
    # snapshots should not pay
    for sn in image.snapshots if snapshots is None else snapshots:
        if sn.has_vm_state:
            from .runstate import snapshot_runstate
            yield SnapshotFacts(sn, image.vm_state_offset(sn), snapshot_runstate(image, sn))
        else:
            yield SnapshotFacts(sn)


def image_facts(image: Qcow2Image, filename: str | None = None) -> ImageFacts:
    """Gather what ``info`` shows: the allocated size, the resolved backing
    chain (links not followed say why) and every snapshot's facts."""
    try:
        actual: int | None = os.stat(image.path).st_blocks * 512
    except OSError:  # pragma: no cover - the file vanished
        actual = None
    chain = tuple(ChainLinkFacts(link, os.path.realpath(link.path) if link.path else None)
                  for link in image.backing_chain())
    return ImageFacts(image, image.path if filename is None else filename, actual, chain,
                      tuple(snapshot_facts(image)))


@dataclass(frozen=True)
class SnapshotComparison:
    """The snapshots of one VM's several disks, compared by name."""

    images: tuple[tuple[str, tuple[SnapshotFacts, ...]], ...]
    #: names present on every image, in first-seen order
    common: tuple[str, ...]
    #: every other name: where it is present and where it is missing
    partial: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]

    def common_in_first(self) -> list[SnapshotFacts]:
        """The first image's snapshots with a common name, one per name."""
        seen: set[str] = set()
        out = []
        for facts in self.images[0][1] if self.images else ():
            name = facts.snapshot.name
            if name in self.common and name not in seen:
                seen.add(name)
                out.append(facts)
        return out


def compare_snapshots(listed: Sequence[tuple[str, Sequence[SnapshotFacts]]]
                      ) -> SnapshotComparison:
    """Compare the snapshot names of several images (one VM's disks)."""
    names_by_image = [(path, {f.snapshot.name for f in facts}) for path, facts in listed]
    order: dict[str, None] = {}
    for _, facts in listed:
        for f in facts:
            order.setdefault(f.snapshot.name)
    common = []
    partial = []
    for name in order:
        present = tuple(path for path, names in names_by_image if name in names)
        if len(present) == len(names_by_image):
            common.append(name)
        else:
            partial.append((name, present,
                            tuple(p for p, _ in names_by_image if p not in present)))
    return SnapshotComparison(tuple((path, tuple(facts)) for path, facts in listed),
                              tuple(common), tuple(partial))
