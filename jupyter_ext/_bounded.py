"""Containers that keep only the newest entries, evicting the oldest in O(1).

A client keeps results, metadata and the msg_ids it submitted for IPython Parallel's
``rc.results``, ``rc.metadata`` and ``rc.history``; however many tasks run, these must not
grow without bound, and evicting must not cost more as they fill (``next(iter(d))`` on a
dict that is evicted from the front rescans the holes left behind: it is O(n) per call).

A count alone does not bound memory: ten thousand pulled arrays of 512 MiB each are ten
thousand results. So a :class:`BoundedDict` may also hold a byte budget, which the values
that were given a size (``put_all(..., sizes=...)``) count against; the oldest go first,
never the newest one, and only values that were weighed.
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
    """A dict that forgets its oldest keys beyond ``maxlen`` (insertion order), and its
    oldest weighed keys beyond ``max_bytes`` of the sizes given to :meth:`put_all` (None:
    no byte bound; the newest weighed key stays, however big).

    Deleting a key early is allowed; its place in the eviction queues is skipped later.
    A value set by ``d[key] = value`` weighs nothing (its size is not known). Copies and
    pickles are plain dicts. Changes are made under a lock: the client's IO thread adds
    results while a user may pop some.
    """

    def __init__(self, maxlen: int, max_bytes: int | None = None):
        super().__init__()
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.nbytes = 0
        """The sizes of the values held that were given one."""
        self._order: deque[K] = deque()
        self._weighed: deque[K] = deque()  # keys given a size, oldest first
        self._sizes: dict[K, int] = {}
        self._lock = threading.RLock()

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
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
        with self._lock:
            if any(key in self for key in keys):
                for key, value in zip(keys, values):
                    self[key] = value
            else:
                self._order.extend(keys)
                dict.update(self, zip(keys, values))
            if sizes is not None and self.max_bytes is not None:
                weights = self._sizes
                for key, size in zip(keys, sizes):
                    if size:
                        self.nbytes += size - weights.get(key, 0)  # (a key given twice: once)
                        weights[key] = size
                        self._weighed.append(key)
            self._trim()

    def _unweigh(self, key: K) -> None:
        if self._sizes:
            self.nbytes -= self._sizes.pop(key, 0)

    def _trim(self) -> None:
        """Forget the oldest keys beyond ``maxlen``, then the oldest weighed keys beyond
        ``max_bytes`` (never the newest weighed one); call with the lock held."""
        order = self._order
        while len(self) > self.maxlen and order:
            key = order.popleft()
            if dict.pop(self, key, _GONE) is not _GONE:
                self._unweigh(key)
        limit, weighed, sizes = self.max_bytes, self._weighed, self._sizes
        while limit is not None and self.nbytes > limit and len(sizes) > 1 and weighed:
            key = weighed.popleft()
            if key in sizes:
                dict.pop(self, key, None)
                self._unweigh(key)
        if len(order) > 2 * self.maxlen + 1024:  # many keys were deleted early
            self._order = deque(k for k in order if k in self)
        if len(weighed) > 2 * len(sizes) + 1024:
            self._weighed = deque(k for k in weighed if k in sizes)

    def __delitem__(self, key: K) -> None:
        with self._lock:
            dict.__delitem__(self, key)
            self._unweigh(key)

    def pop(self, key: K, *default: Any) -> Any:
        with self._lock:
            value = dict.pop(self, key, *default)
            self._unweigh(key)
            return value

    def popitem(self) -> tuple[K, V]:
        with self._lock:
            key, value = dict.popitem(self)
            self._unweigh(key)
            return key, value

    def clear(self) -> None:
        with self._lock:
            super().clear()
            self._order.clear()
            self._weighed.clear()
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
