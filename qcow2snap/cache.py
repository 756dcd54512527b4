"""A cache bounded by bytes (image-model layer; no qcow2 knowledge).

Every cache that holds what an image's metadata points at (L1 chunks, L2
tables, decompressed clusters) is one of these, shared by all open images
of the process: an image can choose how many tables it has and how deep its
backing chain is, but not how much memory the process keeps for them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["DECOMPRESSED_CLUSTERS", "L1_CHUNKS", "L2_TABLES", "BoundedCache", "forget_image"]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class BoundedCache(Generic[_K, _V]):
    """A thread-safe LRU cache bounded by the bytes of what it holds (each
    value's size is given when it is put), not by a count an image could
    choose.  The newest entry is kept even when it alone exceeds the bound."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[_K, tuple[_V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: _K, value: _V, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def discard_where(self, predicate: Callable[[_K], bool]) -> None:
        """Drop every entry whose key satisfies ``predicate``."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                self._bytes -= self._items.pop(key)[1]

    @property
    def size_bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


#: Decoded L2 tables, keyed (image token, L2 offset): at least one table of
#: the largest cluster size (2 MiB).
L2_TABLES: BoundedCache[tuple[int, int], object] = BoundedCache(8 << 20)
#: Decoded chunks of L1 tables, keyed (image token, L1 offset, chunk index).
L1_CHUNKS: BoundedCache[tuple[int, int, int], object] = BoundedCache(4 << 20)
#: Decompressed clusters, keyed (image token, host offset): a cluster read
#: in pieces is decompressed once.
DECOMPRESSED_CLUSTERS: BoundedCache[tuple[int, int], bytes] = BoundedCache(8 << 20)


def forget_image(token: int) -> None:
    """Drop everything cached for one open image (closed, or re-read after
    an edit)."""
    for cache in (L2_TABLES, L1_CHUNKS, DECOMPRESSED_CLUSTERS):
        cache.discard_where(lambda key: key[0] == token)
