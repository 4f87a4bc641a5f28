"""``concurrent.futures.Executor`` over a view."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol

from ._views import DirectView, View

if TYPE_CHECKING:
    from ._asyncresult import AsyncResult


class OwnWork:
    """The AsyncResults one caller (an executor, a joblib backend) made that are not done
    yet: what it may abort without touching the rest of its view's work. Results end on
    the client's IO thread, so the set is guarded (a shutdown iterating it raced them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[AsyncResult] = set()

    def add(self, ar: AsyncResult) -> AsyncResult:
        with self._lock:
            self._pending.add(ar)
        ar.add_done_callback(self._discard)
        return ar

    def _discard(self, ar: AsyncResult) -> None:
        with self._lock:
            self._pending.discard(ar)

    def take(self) -> list[AsyncResult]:
        """Those not done, forgotten here."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        return pending


class ViewExecutor(concurrent.futures.Executor):
    """Submits through a view: ``submit`` is ``apply_async``; ``map`` is lazy.

    Futures are the view's AsyncResults (Futures themselves).
    """

    def __init__(self, view: View):
        self.view = view
        self._shutdown = False
        # (shutdown(cancel_futures=True) aborts these, not the rest of the view's work)
        self._own = OwnWork()
        self._track = self._own.add

    def __repr__(self) -> str:
        return f"<ViewExecutor {self.view!r}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        return self._track(self.view.apply_async(fn, *args, **kwargs))

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Results in order, as an iterator, as ``concurrent.futures``' map.

        ``timeout`` counts from this call: the iterator raises
        ``concurrent.futures.TimeoutError`` for a result not there by then (those there
        are still given), and aborts the rest of the map. Ctrl-C while it waits
        interrupts the engines running the map, as in ``AsyncResult.get``.
        ``chunksize``: elements per task of a load-balanced view; a DirectView's map
        sends one chunk per engine whatever it is (as ``ThreadPoolExecutor`` ignores it).
        """
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        # (a negative timeout has passed already, as in ``concurrent.futures``: only the
        # results there are given)
        protocol.check_seconds("timeout", timeout, past=True)
        chunksize = protocol.check_int("chunksize", chunksize, 1, protocol.MAX_IDS)
        kwargs: dict[str, Any] = {}
        if chunksize != 1 and not isinstance(self.view, DirectView):
            kwargs["chunksize"] = chunksize
        ar = self._track(self.view.map(fn, *iterables, block=False, **kwargs))
        deadline = None if timeout is None else time.monotonic() + timeout
        return _results(ar, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait``, wait for what this view submitted.

        ``cancel_futures``: abort the tasks of this executor's futures that have not
        started (they end with TaskAborted); the view's other work is left alone.
        """
        self._shutdown = True
        if cancel_futures:
            outstanding = self.view.client.outstanding
            mine = [m for ar in self._own.take() for m in ar.msg_ids if m in outstanding]
            if mine:
                self.view.abort(mine)
        if wait:
            self.view.wait()


def _results(ar: AsyncResult, deadline: float | None) -> Iterator[Any]:
    """The items of a map, chunk by chunk, each waited for until ``deadline`` at most."""
    for part in ar.split():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            ready = part.wait(left)
        except KeyboardInterrupt:
            ar._interrupt_running()
            raise
        if not ready:
            ar.abort()
            raise concurrent.futures.TimeoutError(f"{ar!r} not done by the map's timeout")
        yield from part  # (done: its items, or the error of its chunk as it was raised)
