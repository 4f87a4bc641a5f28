"""Containers that keep only the newest entries, evicting the oldest in O(1).

A client keeps results, metadata and the msg_ids it submitted for IPython Parallel's
``rc.results``, ``rc.metadata`` and ``rc.history``; however many tasks run, these must not
grow without bound, and evicting must not cost more as they fill (``next(iter(d))`` on a
dict that is evicted from the front rescans the holes left behind: it is O(n) per call).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class BoundedDict(dict[K, V]):
    """A dict that forgets its oldest keys beyond ``maxlen`` (insertion order).

    Deleting a key early is allowed; its place in the eviction queue is skipped later.
    """

    def __init__(self, maxlen: int):
        super().__init__()
        self.maxlen = maxlen
        self._order: deque[K] = deque()

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            dict.__setitem__(self, key, value)
            return
        self._order.append(key)
        dict.__setitem__(self, key, value)
        if len(self) > self.maxlen or len(self._order) > 2 * self.maxlen + 1024:
            self._trim()

    def put_all(self, keys: Iterable[K], values: Iterable[V]) -> None:
        """``self[key] = value`` for each pair, in order (a broadcast's parts, say), at
        the cost of one ``dict.update`` when every key is new."""
        keys, values = list(keys), list(values)
        if any(key in self for key in keys):
            for key, value in zip(keys, values):
                self[key] = value
            return
        self._order.extend(keys)
        dict.update(self, zip(keys, values))
        self._trim()

    def _trim(self) -> None:
        """Forget the oldest keys beyond ``maxlen``."""
        order = self._order
        while len(self) > self.maxlen and order:
            dict.pop(self, order.popleft(), None)
        if len(order) > 2 * self.maxlen + 1024:  # many keys were deleted early
            self._order = deque(k for k in order if k in self)

    def clear(self) -> None:
        super().clear()
        self._order.clear()


class History(deque[T]):
    """IPython Parallel's ``history`` list, keeping the newest ``maxlen`` items.

    A deque that also takes slices (``rc.history[-10:]`` gives a list).
    """

    def __init__(self, maxlen: int, items: Iterable[T] = ()):
        super().__init__(items, maxlen=maxlen)

    @overload  # type: ignore[override]
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            n = len(self)
            start, stop, step = index.indices(n)
            if step != 1 or start >= stop:
                return list(self)[index]
            if start > n // 2:  # the newest items: walk from the right end
                return list(itertools.islice(reversed(self), n - stop, n - start))[::-1]
            return list(itertools.islice(self, start, stop))
        return super().__getitem__(index)
