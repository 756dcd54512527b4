"""The run state of each VM-state snapshot, for listings (operations layer).

A listing asks for the run state of every snapshot, one after another.
Each answer is what :func:`qcow2snap.vmstate.read_runstate` gives for the
snapshot's stream alone; what one answer learns makes the next cheap:

- snapshots whose VM state is the same bytes (same L1 table, same
  ``vm_state_size`` and ``disk_size``) share one answer;
- a :class:`~qcow2snap.vmstate.RunstateCache` keeps the VM descriptions
  already decoded and sizes the first read of the next stream to the
  description's length (~100 KB instead of 1 MiB).

Reading less than the first MiB of the stream must not hide damage that
reading it would have met: before a short first read, the mapping of the
rest of that MiB is walked (L1/L2 entries only, no data), which raises what
the long read would raise there, and a compressed cluster there (which
only reading can check) keeps the long read.

The state lives with the image and is dropped when the image is reloaded
(an edit), like the image's own L1/L2 caches.  Memory is bounded.
"""

from __future__ import annotations

import weakref

from ..errors import Qcow2Error
from ..image import Qcow2Image
from ..model import Snapshot
from ..reader import DiskReader, ExtentKind, iter_extents
from ..vmstate import VM_DESCRIPTION_FIRST_SPAN, RunstateCache, read_runstate

__all__ = ["snapshot_runstate", "vm_state_label"]


class _ImageRunstates:
    """The run states read from one image (until it is reloaded)."""

    #: answers kept, keyed by what makes two VM states the same bytes
    MAX_ANSWERS = 4096

    def __init__(self, image: Qcow2Image) -> None:
        self.table = image.snapshot_table
        self.cache = RunstateCache()
        self.answers: dict[tuple[int, int, int, int], str | None] = {}

    def get(self, image: Qcow2Image, snapshot: Snapshot) -> str | None:
        key = (snapshot.l1_table_offset, snapshot.l1_size, snapshot.vm_state_size,
               snapshot.disk_size)
        answers = self.answers
        if key in answers:
            return answers[key]
        answer = self._read(image, snapshot)
        if len(answers) >= self.MAX_ANSWERS:
            del answers[next(iter(answers))]
        answers[key] = answer
        return answer

    def _read(self, image: Qcow2Image, snapshot: Snapshot) -> str | None:
        try:
            reader = image.open_vm_state(snapshot)
            found = read_runstate(reader, snapshot.vm_state_size,
                                  label=vm_state_label(image, snapshot), cache=self.cache,
                                  quick=self._quick(image, snapshot, reader))
        except Qcow2Error:
            return None
        return None if found is None else found.runstate

    def _quick(self, image: Qcow2Image, snapshot: Snapshot, reader: DiskReader) -> bool:
        """May read_runstate read less than the stream's usual first span?
        Walks the mapping of the part of that span the short read leaves
        out, raising what reading it would raise; a compressed cluster there
        says no."""
        short = self.cache.first_span()
        span = min(snapshot.vm_state_size, VM_DESCRIPTION_FIRST_SPAN)
        if short is None or short >= span:
            return True     # the short read is the usual one
        end = image.vm_state_offset(snapshot) + snapshot.vm_state_size
        return all(ext.kind is not ExtentKind.COMPRESSED
                   for ext in iter_extents(image, reader.layer, end - span, span - short))


_BY_IMAGE: weakref.WeakKeyDictionary[Qcow2Image, _ImageRunstates] = weakref.WeakKeyDictionary()


def vm_state_label(image: Qcow2Image, sn: Snapshot) -> str:
    return f"{image.path}: VM state of snapshot {sn.id} ({sn.name})"


def snapshot_runstate(image: Qcow2Image, snapshot: Snapshot) -> str | None:
    """The run state a VM-state snapshot was taken in (``prelaunch``,
    ``running``, ``paused``, ``suspended``, ...), read from the end of its
    stream only; ``None`` for a disk-only snapshot or when the stream holds
    no readable globalstate (a damaged stream is not an error here: listings
    must still work).  Calls for the snapshots of one image share what they
    read (see the module docstring), so a listing costs little per snapshot."""
    if not snapshot.has_vm_state:
        return None
    state = _BY_IMAGE.get(image)
    if state is None or state.table is not image.snapshot_table:
        state = _BY_IMAGE[image] = _ImageRunstates(image)
    return state.get(image, snapshot)
