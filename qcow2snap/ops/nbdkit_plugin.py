"""The nbdkit Python plugin behind ``qcow2snap serve`` (loaded by nbdkit as
a script: ``nbdkit python .../nbdkit_plugin.py image=PATH [snapshot-id=ID]
[backing-file=PATH | no-backing=1] [data-file=PATH] [allow-dir=DIR]...
[passphrase-fd=N] [kdf-iteration-limit=N] [check-locks=0]``).

A thin shell: :class:`qcow2snap.ops.serve.Export` does the work.  Read-only:
no ``pwrite``, ``can_write`` false (and ``serve`` runs nbdkit ``--readonly``).
``nbdkit`` exists only inside nbdkit's interpreter, so it is imported inside
the callbacks (importing this module elsewhere must work).
"""

from __future__ import annotations

import errno
from typing import Any

from qcow2snap.errors import Qcow2Error
from qcow2snap.ops.serve import EXTENT_HOLE, EXTENT_ZERO, Export

API_VERSION = 2

#: nbdkit's ``NBDKIT_FLAG_REQ_ONE``
_FLAG_REQ_ONE = 1 << 3
#: nbdkit's ``NBDKIT_THREAD_MODEL_PARALLEL``: see qcow2snap.ops.serve on why
_THREAD_MODEL_PARALLEL = 3

_export = Export("")

assert EXTENT_HOLE == 1 and EXTENT_ZERO == 2   # nbdkit's values, passed through as they are


def _nbdkit() -> Any:
    import nbdkit  # type: ignore[import-not-found]  # only inside nbdkit
    return nbdkit


def _fail(exc: BaseException) -> None:
    """Tell the client EIO for a damaged image (nbdkit logs the message)."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    _nbdkit().set_error(code)


def thread_model() -> int:
    return int(getattr(_nbdkit(), "THREAD_MODEL_PARALLEL", _THREAD_MODEL_PARALLEL))


def config(key: str, value: str) -> None:
    _export.config(key, value)


def get_ready() -> None:
    try:
        _export.open()
    except Qcow2Error as exc:
        raise RuntimeError(f"qcow2snap: {exc}") from None


def cleanup() -> None:
    _export.close()


def open(readonly: bool) -> int:  # the name nbdkit calls
    return 1


def get_size(h: int) -> int:
    return _export.size


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_extents(h: int) -> bool:
    return True


def is_rotational(h: int) -> bool:
    return False


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    try:
        _export.pread(buf, offset)
    except (Qcow2Error, OSError) as exc:
        _fail(exc)
        raise


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        return _export.extents(count, offset, one=bool(flags & _FLAG_REQ_ONE))
    except (Qcow2Error, OSError) as exc:
        _fail(exc)
        raise
