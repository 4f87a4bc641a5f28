"""``concurrent.futures.Executor`` over a view."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._asyncresult import AsyncResult
    from ._views import View


class ViewExecutor(concurrent.futures.Executor):
    """Submits through a view: ``submit`` is ``apply_async``; ``map`` is lazy.

    Futures are the view's AsyncResults (Futures themselves).
    """

    def __init__(self, view: View):
        self.view = view
        self._shutdown = False
        # (what this executor made and is not done: shutdown(cancel_futures=True)
        # aborts these, not the rest of the view's work)
        self._pending: set[AsyncResult] = set()

    def _track(self, ar: AsyncResult) -> AsyncResult:
        self._pending.add(ar)
        ar.add_done_callback(self._pending.discard)
        return ar

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
        """Results in order, as an iterator; ``timeout`` bounds the whole map."""
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        kwargs: dict[str, Any] = {}
        if chunksize != 1:
            kwargs["chunksize"] = chunksize
        ar = self._track(self.view.map(fn, *iterables, block=False, **kwargs))
        if timeout is None:
            return iter(ar)

        def bounded() -> Iterator[Any]:
            if not ar.wait(timeout):
                ar.abort()
                raise TimeoutError(f"map did not finish within {timeout} s")
            yield from ar

        return bounded()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait``, wait for what this view submitted.

        ``cancel_futures``: abort the tasks of this executor's futures that have not
        started (they end with TaskAborted); the view's other work is left alone.
        """
        self._shutdown = True
        if cancel_futures:
            outstanding = self.view.client.outstanding
            mine = [m for ar in list(self._pending) for m in ar.msg_ids if m in outstanding]
            if mine:
                self.view.abort(mine)
        if wait:
            self.view.wait()
