"""The savevm stream (layer 1, beside :mod:`qcow2snap.format`): QEMU's
migration stream ("QEVM", QEMU's ``migration/savevm.c``) that ``savevm`` stores inside a
snapshot.

:func:`parse_stream` walks a stream sequentially, as QEMU's loader does:
the header, the configuration section (machine type), the RAM sections
(``ram``: block list, zero and normal pages) and the device sections.
Device sections carry no length, so they are stepped over with the sizes in
the VM-description JSON trailer that follows the EOF marker (the data QEMU's
``scripts/analyze-migration.py`` uses); without a trailer the walk stops at
the first device section and ``globalstate`` is found by its byte pattern.

Guest RAM is handed page by page to an optional :class:`RamSink`; the parser
itself keeps nothing per page, so memory stays bounded whatever the guest
size.  The package does no I/O of its own beyond reading the stream it is
given and depends only on :mod:`qcow2snap.errors`.

Which submodule owns what (each imports only those above it):

- :mod:`~qcow2snap.vmstate.stream`: QEMU's constants and flags, the records
  (:class:`RamBlock`, :class:`Section`, :class:`Device`,
  :class:`DeviceState`, :class:`VMState`), the :class:`StreamFile` and
  :class:`RamSink` protocols and the byte cursor.  The stream is decoded
  with ``struct`` on a memoryview window instead of construct: the RAM walk
  decodes one record per guest page (four million for a 16 GiB guest), and
  construct costs 20-50x more per record.
- :mod:`~qcow2snap.vmstate.description`: the VM-description JSON trailer:
  locating it, parsing it (4 MiB cap), field layouts, the described devices.
- :mod:`~qcow2snap.vmstate.walk`: :func:`parse_stream` and the section walk.
- :mod:`~qcow2snap.vmstate.runstate`: :func:`read_runstate` (the run state
  from the stream's end only), :class:`RunState`, :class:`RunstateCache`.

This module only re-exports: import from ``qcow2snap.vmstate`` as before.
"""

# __all__ is the public API.  The names imported "as" themselves are
# re-exported too, outside __all__: qcow2snap.ops.runstate reaches
# VM_DESCRIPTION_FIRST_SPAN here, tests/test_vmstate.py and
# tests/test_listing.py the others.
from .description import VM_DESCRIPTION_FIRST_SPAN as VM_DESCRIPTION_FIRST_SPAN
from .description import _layout as _layout
from .description import _layout_size as _layout_size
from .description import _parse_vm_description as _parse_vm_description
from .runstate import RUNSTATE_REACH as RUNSTATE_REACH
from .runstate import RunState, RunstateCache, read_runstate
from .stream import (
    QEMU_VM_FILE_MAGIC,
    RAM_SAVE_FLAG_NAMES,
    Device,
    DeviceState,
    RamBlock,
    RamSink,
    Section,
    StreamFile,
    VMState,
)
from .stream import QEMU_VM_SECTION_FOOTER as QEMU_VM_SECTION_FOOTER
from .stream import RAM_SAVE_FLAG_CONTINUE as RAM_SAVE_FLAG_CONTINUE
from .stream import RAM_SAVE_FLAG_EOS as RAM_SAVE_FLAG_EOS
from .stream import RAM_SAVE_FLAG_MEM_SIZE as RAM_SAVE_FLAG_MEM_SIZE
from .stream import RAM_SAVE_FLAG_PAGE as RAM_SAVE_FLAG_PAGE
from .stream import RAM_SAVE_FLAG_XBZRLE as RAM_SAVE_FLAG_XBZRLE
from .stream import RAM_SAVE_FLAG_ZERO as RAM_SAVE_FLAG_ZERO
from .walk import parse_stream

__all__ = [
    "QEMU_VM_FILE_MAGIC",
    "RAM_SAVE_FLAG_NAMES",
    "Device",
    "DeviceState",
    "RamBlock",
    "RamSink",
    "RunState",
    "RunstateCache",
    "Section",
    "StreamFile",
    "VMState",
    "parse_stream",
    "read_runstate",
]
