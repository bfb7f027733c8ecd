"""A least-recently-used cache bounded by the bytes of what it holds (slide arrays, bags)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Values kept by recency until their bytes exceed a limit.

    Args:
        limit_mb: keep at most this many MiB.
        nbytes: size of a value in bytes (e.g. ``lambda a: a.nbytes``).
        keep_last: always keep the most recent value, even when it alone exceeds the limit
            (an environment's current slide); otherwise a value larger than the limit is
            returned but not kept.
    """

    def __init__(
        self, limit_mb: float, nbytes: Callable[[V], int], keep_last: bool = False
    ) -> None:
        self.limit = int(limit_mb * (1 << 20))
        self._nbytes, self._keep_last = nbytes, keep_last
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The value under ``key``, from ``load()`` on a miss (then kept if it fits)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        size = self._nbytes(value)
        if size > self.limit and not self._keep_last:
            return value
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.limit and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._nbytes(old)
        return value

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key fails ``keep`` (e.g. arrays rewritten in the store)."""
        for key in [k for k in self._items if not keep(k)]:
            self.bytes -= self._nbytes(self._items.pop(key))
