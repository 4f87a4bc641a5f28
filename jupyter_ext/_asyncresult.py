"""AsyncResult: a ``concurrent.futures.Future`` over one or more remote tasks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import zmq

from kernel_engine import protocol
from kernel_engine.errors import CompositeError, RemoteError

from ._metadata import METADATA_KEYS, Metadata
from ._outputs import LiveOutput, display_outputs
from ._progress import wait_with_progress
from ._reprs import result_html
from ._request import Parts, Request, guarded, settle_all, watch

if TYPE_CHECKING:
    from ._client import Client


ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION
RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


def as_timeout(timeout: Any) -> float | None:
    """A timeout in seconds; None, or a negative number (IPython Parallel's -1), waits
    for ever. Anything else raises TypeError/ValueError naming ``timeout``."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout < 0:
        return None
    return protocol.check_seconds("timeout", timeout)


def _check_return_when(return_when: Any) -> None:
    if return_when is not None and return_when not in RETURN_WHEN:
        raise ValueError(f"return_when must be one of {RETURN_WHEN}, not {return_when!r}")


def _wait_one(future: concurrent.futures.Future, timeout: float | None) -> bool:  # type: ignore[type-arg]
    """Wait for one future without the waiter objects of ``concurrent.futures.wait``."""
    if future.done():
        return True
    try:
        future.exception(timeout)
    except concurrent.futures.TimeoutError:
        return False
    except concurrent.futures.CancelledError:
        pass
    return True


def interrupt_running(
    transport: Any,
    futures: Sequence[Request],
    grace: float = 5.0,
    signum: int = 2,
) -> list[int]:
    """Ctrl-C while waiting for ``futures``: interrupt the engines running those still
    pending (those still queued are aborted), and wait ``grace`` s for them to end.
    Returns the engines interrupted."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return []
    try:
        engines: list[int] = transport.interrupt([f.msg_id for f in pending], signum)
    except Exception:
        return []
    concurrent.futures.wait(pending, grace)
    return engines


def _fresh(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to raise: the error is also kept (``rc.results``, the metadata's
    ``error``, this AsyncResult), and raising it would give it a traceback holding the
    caller's frames, whose arguments (a 64 MiB array, say) then lived as long as it."""
    cls = type(exc)
    try:
        fresh = cls.__new__(cls, *exc.args)
        fresh.args = exc.args
        fresh.__dict__.update(exc.__dict__)
    except Exception:  # (a class that cannot be made so: raised as it is)
        return exc
    fresh.__cause__ = exc.__cause__
    return fresh


class AsyncResult(concurrent.futures.Future):  # type: ignore[type-arg]
    """The result of work submitted through a view, available later.

    A ``concurrent.futures.Future`` (so ``add_done_callback``, ``asyncio.wrap_future``
    and ``await ar`` work) with IPython Parallel's interface: ``get``, ``wait``, ``ready``,
    ``successful``, ``get_dict``, ``metadata``, timing properties and iteration as results
    arrive.
    """

    def __init__(
        self,
        client: Client,
        futures: list[Request],
        fname: str = "unknown",
        targets: Any = None,
        single: bool = False,
    ):
        super().__init__()
        self._client = client
        self._transport = client.transport
        self._children = list(futures)
        self.msg_ids = [f.msg_id for f in futures]
        self._fname = fname
        self._targets = targets
        self._single = single
        self._lock = threading.Lock()
        self._ndone = 0
        if not futures:
            self.set_result(None if single else [])
        else:
            self._watch(futures)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """As ``Future``'s, but a callback that raises SystemExit or KeyboardInterrupt
        (``sys.exit()`` in it, say) does not end the client's IO thread, which calls it
        (see :func:`._request.guarded`)."""
        super().add_done_callback(guarded(fn))

    def _watch(self, futures: list[Request]) -> None:
        """Call :meth:`_finish` once every one of ``futures`` is done: once for all the
        parts of one broadcast, else as the IO thread settles them, in bulk
        (:func:`~._request.watch`; a callback on each of those it cannot watch)."""
        parts = Parts.of(futures)
        if parts is not None:
            parts.add_done_callback(self._finish)
            return
        self._watch_rest(watch(futures, self))

    def _watch_rest(self, rest: list[Any]) -> None:
        """Count those of ``rest`` (what :func:`~._request.watch` left) that are done
        already, together, and have the others call back. A long map's tasks are mostly
        done before its result exists: one callback each, called at once, cost the map a
        fifth of its calling thread (10,000 tiny tasks)."""
        done: list[Any] = []
        pending: list[Any] = []
        for f in rest:
            (done if f.done() else pending).append(f)
        if done:
            self._children_done(done)
        for f in pending:  # (one done meanwhile calls back at once)
            f.add_done_callback(self._child_done)

    def _child_done(self, f: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        self._children_done((f,))

    def _children_done(self, futures: Sequence[concurrent.futures.Future]) -> None:  # type: ignore[type-arg]
        """``futures`` (children of this result) are done."""
        with self._lock:
            self._ndone += len(futures)
            last = self._ndone == len(self._children)
        if last:
            self._finish()

    def _finish(self) -> None:
        errors: list[RemoteError] = []
        results: list[Any] = []
        for f in self._children:
            if type(f) is Request and f._state == FINISHED:  # (what exception() and result() read)
                exc, value = f._exception, f._result
            else:
                exc = f.exception(0)  # (all are done: never wait here, on the IO thread)
                value = f.result() if exc is None else None
            if exc is None:
                results.append(value)
                continue
            errors.append(
                exc if isinstance(exc, RemoteError) else RemoteError(type(exc).__name__, str(exc))
            )
            results.append(exc)
        try:
            if errors:
                if self._single and len(self._children) == 1:
                    self.set_exception(errors[0])
                else:
                    self.set_exception(
                        CompositeError(f"one or more exceptions from call to {self._fname}", errors)
                    )
            else:
                self._set_reconstructed(results)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile

    def _set_reconstructed(self, results: list[Any]) -> None:
        """Resolve with the results put together; with the error if that fails (a chunk
        that is not a sequence, say), so that nobody waits for ever."""
        try:
            value = self._reconstruct(results)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # (Python 3.11 on; without it 3.10 never resolved)
                exc.add_note(f"(while putting the results of {self._fname} together)")
            self.set_exception(exc)
        else:
            self.set_result(value)

    def _reconstruct(self, results: list[Any]) -> Any:
        return results[0] if self._single else results

    def get(
        self,
        timeout: float | None = None,
        return_exceptions: bool | None = None,
        return_when: str | None = None,
    ) -> Any:
        """The result, waiting up to ``timeout`` s (None or negative: forever).

        ``return_exceptions``: a task that raised gives its error as its result instead
        of raising. ``return_when=FIRST_EXCEPTION``: raise as soon as one task fails,
        without waiting for the others.

        Raises
        ------
        TimeoutError
            When the result is not ready within ``timeout``.
        RemoteError, CompositeError
            When the task (or several) raised.
        """
        timeout = None if timeout is None else as_timeout(timeout)
        _check_return_when(return_when)
        try:
            if return_when == FIRST_EXCEPTION and not return_exceptions:
                started = time.monotonic()
                self._raise_first_error(timeout)
                if all(f.done() for f in self._children):
                    timeout = None  # (this result is being set from them: a moment)
                elif timeout is not None:  # (one timeout for both waits, not one each)
                    timeout = max(0.0, timeout - (time.monotonic() - started))
            if type(self).wait is AsyncResult.wait:  # (what it does, checks done already)
                if timeout != 0 and self._state not in _DONE:
                    self._transport.check_blocking("AsyncResult.wait")
                ready = _wait_one(self, timeout)
            else:
                ready = self.wait(timeout)
        except KeyboardInterrupt:
            self._interrupt_running()
            raise
        if not ready:
            raise TimeoutError(f"result not ready within {timeout} s: {self!r}")
        if return_exceptions and self._state not in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return self._reconstruct(self._outcomes())
        if self._state == FINISHED:  # (set once, never changed: read without the lock)
            exc = self._exception
            if exc is not None:
                raise _fresh(exc)
            return self._result
        exc = self.exception(0)
        if exc is not None:
            raise _fresh(exc)
        return super().result()

    def _raise_first_error(self, timeout: float | None) -> None:
        """Wait until a task fails (raise its error) or all are done."""
        if not self.done():
            self._transport.check_blocking("AsyncResult.get")
        concurrent.futures.wait(self._children, timeout, FIRST_EXCEPTION)
        for f in self._children:
            exc = f.exception() if f.done() and not f.cancelled() else None
            if exc is not None:
                raise _fresh(exc)

    def _outcomes(self) -> list[Any]:
        """Each task's result, or its error in its place."""
        return [f.exception() or f.result() for f in self._children]

    def _interrupt_running(self, grace: float = 5.0, signum: int = 2) -> list[int]:
        """Ctrl-C here: interrupt the engines running this work, wait ``grace`` s for them.

        Returns the engines interrupted.
        """
        engines = interrupt_running(self._transport, self._children, grace, signum)
        if all(f.done() for f in self._children):
            _wait_one(self, 1.0)  # (the whole is set from its parts in a moment)
        return engines

    def result(self, timeout: float | None = None) -> Any:
        """The Future API's ``result``; the same as :meth:`get`."""
        return self.get(timeout)

    @property
    def r(self) -> Any:
        """Shorthand for ``get()``."""
        return self.get()

    def wait(self, timeout: float | None = None, return_when: str | None = None) -> Any:
        """Wait until done or ``timeout`` s pass; returns whether done. Never raises
        (but for a ``timeout`` that is not a number of seconds, or a wait on the client's
        IO thread, which could never end).

        With ``return_when`` (``ALL_COMPLETED``, ``FIRST_COMPLETED``, ``FIRST_EXCEPTION``),
        waits as ``concurrent.futures.wait`` does and returns ``(done, pending)``: sets of
        this result's parts (:meth:`split`).
        """
        timeout = as_timeout(timeout)
        _check_return_when(return_when)
        if timeout != 0 and not self.done():
            self._transport.check_blocking("AsyncResult.wait")
        if return_when is None:
            return _wait_one(self, timeout)
        done, _ = concurrent.futures.wait(self._children, timeout, return_when)
        parts = self.split()
        finished = {p for p, f in zip(parts, self._children) if f in done}
        return finished, set(parts) - finished

    def wait_for_output(self, timeout: float | None = None) -> bool:
        """Wait until the tasks' output is complete (an ``execute`` ends only once its
        engine is idle again, so this is :meth:`wait`); returns whether it is."""
        return bool(self.wait(timeout))

    def split(self) -> tuple[AsyncResult, ...]:
        """One AsyncResult per message (per engine of an apply, per chunk of a map)."""
        return tuple(self._part(i) for i in range(len(self._children)))

    def _part(self, i: int) -> AsyncResult:
        return AsyncResult(self._client, [self._children[i]], self._fname, single=True)

    @classmethod
    def join(cls, *results: AsyncResult) -> AsyncResult:
        """One AsyncResult over the messages of several (of one client)."""
        if not results:
            raise ValueError("join needs at least one AsyncResult")
        children = [f for ar in results for f in ar._children]
        if all(isinstance(ar, AsyncMapResult) for ar in results):
            sizes = [n for ar in results for n in ar._chunk_sizes]  # type: ignore[attr-defined]
            return AsyncMapResult(results[0]._client, children, sizes, results[0]._fname)
        return AsyncResult(results[0]._client, children, results[0]._fname)

    @property
    def result_dict(self) -> dict[int, Any]:
        """:meth:`get_dict`."""
        return self.get_dict()

    owner = True
    """Kept for IPython Parallel: results are cached by the client either way."""

    def ready(self) -> bool:
        """Whether the result has arrived (successful or not)."""
        return self.done()

    def successful(self) -> bool:
        """Whether it completed without raising; AssertionError while not ready."""
        if not self.done():
            raise AssertionError("the result is not ready")
        return not self.cancelled() and self.exception() is None

    def get_dict(self, timeout: float | None = None) -> dict[int, Any]:
        """The results keyed by engine id (one result per engine)."""
        results = self.get(timeout)
        if self._single:
            results = [results]
        engine_ids = [md["engine_id"] for md in self._metadata_list()]
        if len(set(engine_ids)) != len(engine_ids):
            raise ValueError("cannot make a dict of results: several came from one engine")
        return dict(zip(engine_ids, results))

    def cancel(self) -> bool:
        """Abort the tasks that have not run; True if the future is now cancelled."""
        if self.done():
            return False
        self.abort()
        return super().cancel()

    def abort(self) -> None:
        """Ask the controller and engines not to run those tasks yet to start."""
        pending = [f.msg_id for f in self._children if not f.done()]
        if pending:
            self._transport.abort(pending, block=False)

    def _metadata_list(self) -> list[Metadata]:
        return [f.metadata for f in self._children]

    @property
    def metadata(self) -> Metadata | list[Metadata]:
        """Metadata of the task (a list of them for several tasks)."""
        mds = self._metadata_list()
        return mds[0] if self._single and len(mds) == 1 else mds

    def __getattr__(self, key: str) -> Any:
        if key in METADATA_KEYS:
            values = [md[key] for md in self._metadata_list()]
            return values[0] if self._single and len(values) == 1 else values
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(METADATA_KEYS))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return getattr(self, key) if key in METADATA_KEYS else self.__getattr__(key)
        results = self.get()
        if self._single:
            results = [results]
        return results[key]

    def __len__(self) -> int:
        return len(self.msg_ids)

    def __iter__(self) -> Iterator[Any]:
        """Results in order, each as soon as it (and those before it) arrived."""
        for f in self._children:
            if not f.done():
                self._transport.check_blocking("iterating an AsyncResult")
                try:
                    _wait_one(f, None)
                except KeyboardInterrupt:  # (as in get: the engines stop too)
                    self._interrupt_running()
                    raise
            exc = f.exception()
            if exc is not None:
                raise _fresh(exc)  # (as get: the kept error never takes the caller's frames)
            yield f.result()

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    @property
    def progress(self) -> int:
        """How many tasks have finished."""
        return sum(f.done() for f in self._children)

    @property
    def elapsed(self) -> float:
        """Seconds since the first task was submitted (until now, or until done)."""
        submitted = [md["submitted"] for md in self._metadata_list() if md["submitted"]]
        if not submitted:
            return 0.0
        end = self._received_last() if self.done() else None
        now = end or datetime.now(timezone.utc)
        return (now - min(submitted)).total_seconds()

    def _received_last(self) -> datetime | None:
        received = [md["received"] for md in self._metadata_list() if md["received"]]
        return max(received) if received else None

    def _require_done(self, what: str) -> None:
        if not self.done():
            raise TimeoutError(f"{what} is only known once every task is done")

    @property
    def serial_time(self) -> float:
        """Sum of the tasks' run times on their engines, in seconds (TimeoutError while
        some are pending)."""
        self._require_done("serial_time")
        return sum(md.duration() for md in self._metadata_list())

    @property
    def wall_time(self) -> float:
        """Seconds from the first submission to the last result received (TimeoutError
        while some are pending)."""
        self._require_done("wall_time")
        submitted = [md["submitted"] for md in self._metadata_list() if md["submitted"]]
        last = self._received_last()
        if not submitted or last is None:
            return 0.0
        return (last - min(submitted)).total_seconds()

    def timedelta(self, start: Any, end: Any, start_key: Any = min, end_key: Any = max) -> float:
        """Seconds between metadata times (``"submitted"``, ``"started"``, ``"completed"``,
        ``"received"``, or datetimes), reduced over tasks by ``start_key``/``end_key``."""

        def when(point: Any, reduce: Any) -> datetime:
            if isinstance(point, datetime):
                return point
            times = [md[point] for md in self._metadata_list() if md.get(point)]
            if not times:
                raise ValueError(f"no task has a {point!r} time yet")
            chosen: datetime = reduce(times)
            return chosen

        return (when(end, end_key) - when(start, start_key)).total_seconds()

    @property
    def sent(self) -> bool:
        """Whether zmq is done with every buffer sent (only tracked with ``track=True``)."""
        return all(
            (f.unsent is None or f.unsent.is_set()) and (f.tracker is None or f.tracker.done)
            for f in self._children
        )

    def wait_for_send(self, timeout: float | None = None) -> None:
        """IPython Parallel's name of :meth:`wait_on_send`."""
        self.wait_on_send(timeout)

    def wait_on_send(self, timeout: float | None = None) -> None:
        """Block until zmq is done with the buffers sent (``track=True``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self._children:
            if f.unsent is not None:
                remaining_s = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not f.unsent.wait(remaining_s):
                    raise TimeoutError(f"request still waiting to be sent after {timeout} s")
            if f.tracker is not None:
                remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    f.tracker.wait(remaining)
                except zmq.NotDone:
                    raise TimeoutError(f"buffers still being sent after {timeout} s") from None

    @contextlib.contextmanager
    def stream_output(self) -> Iterator[None]:
        """``with ar.stream_output():`` prints the tasks' output as it arrives, labelled
        ``[stdout:0]`` (output that came before is not repeated)."""
        msg_ids = set(self.msg_ids)

        output = LiveOutput()

        def show(eid: int, msg: Any) -> None:
            if msg.parent_id in msg_ids:
                output.show(eid, msg.msg_type, msg.content)

        self._transport.add_iopub_handler(show)
        try:
            yield
        finally:
            self._transport.remove_iopub_handler(show)
            output.flush()

    def display_outputs(self, groupby: str = "type", result_only: bool = False) -> None:
        """Show what the tasks printed and displayed, labelled ``[stdout:0]``, grouped by
        ``type``, ``engine`` or ``order`` (see :mod:`._outputs`)."""
        display_outputs(self._metadata_list(), groupby, result_only)

    def wait_interactive(
        self,
        interval: float = 0.1,
        timeout: float | None = None,
        widget: bool | None = None,
        return_when: str = ALL_COMPLETED,
        show: bool = True,
        per_engine: bool = False,
    ) -> None:
        """Wait, showing progress (a widget in a notebook, text elsewhere).

        ``return_when`` stops waiting early, as in :meth:`wait`. ``widget=False`` forces
        the text bar; ``show=False`` (or the environment variable
        ``JUPYTER_PX_PROGRESS=off``) shows nothing; ``per_engine=True`` adds a bar per
        engine (items, rate, time; red with the error's name when a task there fails).
        Returns nothing (so a notebook shows no ``Out``), like IPython Parallel's;
        ``ready()`` says whether it finished in time.
        """
        _check_return_when(return_when)
        timeout = as_timeout(timeout)

        def finished(wait: float) -> bool:
            if return_when == ALL_COMPLETED:
                return bool(self.wait(wait))
            done, _ = concurrent.futures.wait(self._children, wait, return_when)
            failed = any(not f.cancelled() and f.exception() for f in done)
            return self.done() or (bool(done) if return_when == FIRST_COMPLETED else failed)

        wait_with_progress(
            self,
            interval=interval,
            timeout=timeout,
            widget=widget,
            show=show,
            finished=finished,
            per_engine=per_engine,
        )

    def _total(self) -> int:
        return len(self._children)

    def _repr_html_(self) -> str:
        return result_html(self)

    def __repr__(self) -> str:
        state = "finished" if self.done() else "pending"
        return f"<{type(self).__name__}({self._fname}): {state}>"


class AsyncMapResult(AsyncResult):
    """The result of a map: chunks reassembled into one list of items.

    Iteration yields items as they arrive: in order, or with ``ordered=False`` in the
    order chunks complete; ``get()`` gives them in the order of the input either way.
    ``len`` and ``progress`` count items, not messages.
    """

    def __init__(
        self,
        client: Client,
        futures: list[Request],
        chunk_sizes: list[int],
        fname: str = "unknown",
        ordered: bool = True,
        return_exceptions: bool = False,
    ):
        self._chunk_sizes = list(chunk_sizes)
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._completion_order: list[int] = []
        self._arrived = threading.Condition()  # (guards _completion_order)
        self._index = {id(f): i for i, f in enumerate(futures)}
        super().__init__(client, futures, fname=fname)

    def _watch(self, futures: list[Request]) -> None:
        self._watch_rest(watch(futures, self))  # (not Parts: the order they complete in counts)

    def _children_done(self, futures: Sequence[concurrent.futures.Future]) -> None:  # type: ignore[type-arg]
        with self._arrived:
            self._completion_order.extend(self._index[id(f)] for f in futures)
            self._arrived.notify_all()
        super()._children_done(futures)

    def _finish(self) -> None:
        if not self._return_exceptions:
            super()._finish()
            return
        try:
            self._set_reconstructed([self._chunk_result(f) for f in self._children])
        except concurrent.futures.InvalidStateError:
            pass

    def _chunk_result(self, f: Request) -> Any:
        exc = f.exception(0)
        if exc is None:
            return f.result()
        size = self._chunk_sizes[self._index[id(f)]]
        return [exc] * size

    def _outcomes(self) -> list[Any]:
        return [self._chunk_result(f) for f in self._children]

    def get_dict(self, timeout: float | None = None) -> dict[int, Any]:
        """Each engine's items (the list its chunk gave), keyed by engine id: a
        DirectView's map sends one chunk to each engine. ValueError when one engine ran
        several chunks (as a load-balanced map's may): :meth:`split` gives each chunk's.

        (IPython Parallel pairs the engines with the first items instead, and drops the
        rest.)
        """
        self.get(timeout)  # (raises as get does)
        engine_ids = [md["engine_id"] for md in self._metadata_list()]
        if len(set(engine_ids)) != len(engine_ids):
            raise ValueError(
                f"cannot make a dict of results: {len(engine_ids)} chunks ran on "
                f"{len(set(engine_ids))} engines; split() gives each chunk's results"
            )
        return {eid: self._chunk_result(f) for eid, f in zip(engine_ids, self._children)}

    def _part(self, i: int) -> AsyncResult:
        return AsyncMapResult(
            self._client,
            [self._children[i]],
            [self._chunk_sizes[i]],
            self._fname,
            return_exceptions=self._return_exceptions,
        )

    def _reconstruct(self, results: list[Any]) -> list[Any]:
        # (in submission order even with ordered=False, as IPython Parallel's: ordered
        # is the order of iteration only)
        items: list[Any] = []
        for chunk in results:
            items.extend(chunk)
        return items

    def __len__(self) -> int:
        return sum(self._chunk_sizes)

    def _total(self) -> int:
        return len(self)

    @property
    def progress(self) -> int:
        """How many items (not chunks) have finished."""
        return sum(n for f, n in zip(self._children, self._chunk_sizes) if f.done())

    def __iter__(self) -> Iterator[Any]:
        if self._ordered:
            order: Iterator[int] = iter(range(len(self._children)))
        else:
            order = self._completion_iter()
        while True:
            try:
                i = next(order, None)
                if i is None:
                    return
                f = self._children[i]
                if not f.done():
                    self._transport.wait([f], None)
            except KeyboardInterrupt:  # (as in get: the engines stop too)
                self._interrupt_running()
                raise
            yield from self._chunk_result(f) if self._return_exceptions else self._raise(f)

    def _raise(self, f: Request) -> Any:
        exc = f.exception()
        if exc is not None:
            raise _fresh(exc)
        return f.result()

    def _completion_iter(self) -> Iterator[int]:
        seen = 0
        while seen < len(self._children):
            with self._arrived:
                while len(self._completion_order) <= seen:
                    self._transport.check_blocking("waiting")
                    self._arrived.wait()
                available = self._completion_order[seen:]
            for i in available:
                seen += 1
                yield i


class _HubPoller:
    """Asks the controller about pending :class:`AsyncHubResult` s in the background, so
    that they complete however they are waited for (iterated, awaited, passed to
    ``concurrent.futures.wait``), not only in ``get``/``wait``, which ask themselves.

    One thread for all of them (``jupyter-px-hub-poll``), started by the first pending
    one and ending once none is left: a result dropped by its owner is not kept alive
    (weak references), nor asked about. It asks every :data:`AsyncHubResult.interval` s
    at first, then less and less often, every :data:`SLOWEST` s at most: a long task
    costs the controller one question a second.
    """

    SLOWEST = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: weakref.WeakSet[AsyncHubResult] = weakref.WeakSet()
        self._running = False

    def add(self, ar: AsyncHubResult) -> None:
        with self._lock:
            self._results.add(ar)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="jupyter-px-hub-poll", daemon=True).start()

    def _pending(self) -> list[AsyncHubResult]:
        with self._lock:
            pending = [ar for ar in self._results if not ar.done()]
            if not pending:
                self._running = False
            return pending

    def _run(self) -> None:
        delay = AsyncHubResult.interval
        while True:
            time.sleep(delay)
            pending = self._pending()
            if not pending:
                return
            for ar in pending:
                ar._poll_quietly()
            del pending, ar  # (no strong reference while asleep)
            delay = min(self.SLOWEST, delay * 1.5)


class AsyncHubResult(AsyncResult):
    """Results another client submitted, fetched from the controller's records.

    While they are pending, ``wait`` asks the controller again every ``interval`` s,
    which costs more than the passive waiting of an ordinary AsyncResult; otherwise one
    thread asks now and then for all of them (see :class:`_HubPoller`), so that iterating,
    awaiting or ``concurrent.futures.wait`` see them end too.
    """

    interval = 0.1

    def __init__(self, client: Client, msg_ids: list[str], single: bool = False):
        futures = [Request(m, Metadata(msg_id=m)) for m in msg_ids]
        self._polling = threading.Lock()  # (wait's questions and the poller's)
        super().__init__(client, futures, "get_result", single=single)
        self._poll()
        if not self.done():
            _POLLER.add(self)

    def _poll_quietly(self) -> None:
        """:meth:`_poll` for the background poller: an error is for the next try, but
        once the client is closed none can come, and the pending tasks fail."""
        try:
            self._poll()
        except Exception:
            if not self._transport.closed:
                return
            why = RuntimeError("this Client is closed: the controller's records are out of reach")
            with self._polling:
                pending = [f for f in self._children if not f.done()]
                for f in pending:
                    f.outcome = False, why
                settle_all(pending)

    def _poll(self) -> None:
        with self._polling:
            self._poll_pending()

    def _poll_pending(self) -> None:
        pending = [f for f in self._children if not f.done()]
        if not pending:
            return
        records = self._transport.fetch_records([f.msg_id for f in pending])
        ended: list[Request] = []
        for f in pending:
            record, outcome = records.get(f.msg_id, (None, None))
            if record is None:
                f.outcome = False, KeyError(f"the controller has no record of {f.msg_id}")
            elif outcome is not None:
                f.outcome, md = outcome
                f.metadata.update(md)
            elif record["status"] == "ok":
                why = "results over 1 MiB are not kept, and the oldest go to bound memory"
                f.outcome = False, KeyError(f"the result of {f.msg_id} is not stored: {why}")
            elif record["status"] != "pending":
                status = record["status"]
                f.outcome = False, KeyError(f"{f.msg_id} ended {status!r}; no reply is stored")
            else:
                continue
            ended.append(f)
        settle_all(ended)  # (as the IO thread settles requests: watchers are told)

    def wait(self, timeout: float | None = None, return_when: str | None = None) -> Any:
        """Ask the controller until done, or as ``return_when`` says (or ``timeout`` s);
        then as :meth:`AsyncResult.wait`."""
        timeout = as_timeout(timeout)
        _check_return_when(return_when)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ended(return_when):
            self._poll()
            if self._ended(return_when):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(self.interval)
        return super().wait(0, return_when)

    def _ended(self, return_when: str | None) -> bool:
        """Whether a wait with ``return_when`` is over."""
        if self.done():
            return True
        done = [f for f in self._children if f.done()]
        if return_when == FIRST_COMPLETED:
            return bool(done)
        if return_when == FIRST_EXCEPTION:
            return any(not f.cancelled() and f.exception() is not None for f in done)
        return False


_POLLER = _HubPoller()
