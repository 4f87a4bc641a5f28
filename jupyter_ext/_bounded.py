"""Containers that keep only the newest entries, evicting the oldest in O(1).

A client keeps results, metadata and the msg_ids it submitted for IPython Parallel's
``rc.results``, ``rc.metadata`` and ``rc.history``; however many tasks run, these must not
grow without bound, and evicting must not cost more as they fill (``next(iter(d))`` on a
dict that is evicted from the front rescans the holes left behind: it is O(n) per call).

A count alone does not bound memory: ten thousand pulled arrays of 512 MiB each are ten
thousand results. So a :class:`BoundedDict` may also hold a byte budget, which the values
that were given a size (``put_all(..., sizes=...)``) count against; the oldest go first,
never the newest one.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_GONE: Any = object()


class BoundedDict(dict[K, V]):
    """A dict that forgets its oldest keys beyond ``maxlen`` (insertion order), and
    beyond ``max_bytes`` of the sizes given to :meth:`put_all` (None: no byte bound).

    Deleting a key early is allowed; its place in the eviction queue is skipped later.
    A value set by ``d[key] = value`` weighs nothing (its size is not known).
    """

    def __init__(self, maxlen: int, max_bytes: int | None = None):
        super().__init__()
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.nbytes = 0
        """The sizes of the values held that were given one."""
        self._order: deque[K] = deque()
        self._sizes: dict[K, int] = {}
        self._weighing = threading.Lock()  # (the IO thread adds results, a user pops some)

    def __setitem__(self, key: K, value: V) -> None:
        if self._sizes:
            self._unweigh(key)
        if key in self:
            dict.__setitem__(self, key, value)
            return
        self._order.append(key)
        dict.__setitem__(self, key, value)
        if len(self) > self.maxlen or len(self._order) > 2 * self.maxlen + 1024:
            self._trim()

    def put_all(
        self, keys: Iterable[K], values: Iterable[V], sizes: Iterable[int] | None = None
    ) -> None:
        """``self[key] = value`` for each pair, in order (a broadcast's parts, say), at
        the cost of one ``dict.update`` when every key is new; ``sizes`` (bytes, one for
        each) count against ``max_bytes``."""
        keys, values = list(keys), list(values)
        if any(key in self for key in keys):
            for key, value in zip(keys, values):
                self[key] = value
        else:
            self._order.extend(keys)
            dict.update(self, zip(keys, values))
        if sizes is not None and self.max_bytes is not None:
            weights = self._sizes
            with self._weighing:
                for key, size in zip(keys, sizes):
                    if size and key in self:  # (a key given twice weighs once)
                        self.nbytes += size - weights.get(key, 0)
                        weights[key] = size
        self._trim()

    def _unweigh(self, key: K) -> None:
        with self._weighing:
            self.nbytes -= self._sizes.pop(key, 0)

    def _trim(self) -> None:
        """Forget the oldest keys beyond ``maxlen`` and ``max_bytes`` (never the newest)."""
        order = self._order
        limit = self.max_bytes
        while order and (len(self) > self.maxlen or (limit is not None and self.nbytes > limit)):
            if len(self) <= 1 and len(self) <= self.maxlen:
                break  # (the newest stays, however big)
            key = order.popleft()
            if dict.pop(self, key, _GONE) is not _GONE and self._sizes:
                self._unweigh(key)
        if len(order) > 2 * self.maxlen + 1024:  # many keys were deleted early
            self._order = deque(k for k in order if k in self)

    def __delitem__(self, key: K) -> None:
        dict.__delitem__(self, key)
        if self._sizes:
            self._unweigh(key)

    def pop(self, key: K, *default: Any) -> Any:
        value = dict.pop(self, key, *default)
        if self._sizes:
            self._unweigh(key)
        return value

    def popitem(self) -> tuple[K, V]:
        key, value = dict.popitem(self)
        if self._sizes:
            self._unweigh(key)
        return key, value

    def clear(self) -> None:
        super().clear()
        self._order.clear()
        with self._weighing:
            self._sizes.clear()
            self.nbytes = 0


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
