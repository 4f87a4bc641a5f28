"""A request's life on the client: one state machine per request, one table for them all.

Each request a client sends (an apply, an execute, a controller query) is a
:class:`Request`, a ``concurrent.futures.Future`` that moves through these states::

    new --admit--> waiting --release--> sent --reply--> replied --end of output--> done
     \\--admit (nothing to wait for)--> sent --reply (no output to wait for)-----> done
    every state but done --fail (its engine or the controller is gone)--------> done

- **waiting**: held in the order books (:mod:`._order`) until this client's requests on
  another path to the same engine have been answered;
- **sent**: on its path: ``direct`` (the engine's lane), ``routed`` (the lane through the
  controller), ``shell`` (an execute through the controller) or ``controller`` (load
  balanced, or a request to the controller itself);
- **replied**: the reply came; an execute also waits for the end of its output (the
  engine's idle status on iopub), at most :data:`OUTPUT_GRACE` seconds;
- **done**: it has its outcome (a result or an error) and has left the table.

:class:`Requests` is the one owner of live requests: a table by msg_id, an index by engine
(so "engine 3 is gone" finds its requests at once), the order books, and the executes
waiting for their output. It is pure logic: no sockets and no threads of its own. The
transport (:mod:`._transport`) feeds it what arrives and sends what it releases; every
method returns the requests it finished, whose futures the caller then resolves outside
the lock (so no callback runs while the table is locked).

A broadcast to N engines makes N requests at once, and their replies come back in one
message (``kernel_engine.replies``): what each costs the client is paid N times a call.
So a request is a future that makes the lock and lists of its
``concurrent.futures.Future`` only once something waits on it or adds a callback
(:meth:`Request.settle` of a request nobody waits on just stores its outcome), and the
parts of one broadcast share a :class:`Parts`, which tells its AsyncResult once when the
last of them settles (instead of a callback per part). Fewer objects a part also means
fewer garbage collections: at 32 engines, about one a call before.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import Any

import zmq

from kernel_engine.errors import short_id

from ._metadata import Metadata
from ._order import EngineOrder

log = logging.getLogger("jupyter_ext")

NEW, WAITING, SENT, REPLIED, DONE = "new", "waiting", "sent", "replied", "done"

OUTPUT_GRACE = 2.0
"""Seconds an execute whose reply came waits for the end of its output (a lost idle
status must not keep it pending forever)."""

ORDERED_CHANNELS = ("lane", "shell")
"""Channels whose requests keep this client's order per engine (see :mod:`._order`)."""

LANE_PATHS = frozenset({"direct", "here"})
"""The paths of requests sent to an engine's task lane by this client itself: on the
lane's shared sending socket (``direct``), or on the calling thread's own socket, which
that thread reads the reply from (``here``, see :meth:`.Transport.wait_here`)."""


_MAKING = threading.Lock()
"""Held to make a request's condition and to settle a request that has none (one lock
for all: both are rare or brief)."""


class Parts:
    """The parts of one broadcast: calls its callbacks once, when the last part settled.

    Parameters
    ----------
    n
        How many parts.
    """

    __slots__ = ("_callbacks", "_lock", "n", "remaining")

    def __init__(self, n: int):
        self.n = n
        self.remaining = n
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @staticmethod
    def of(futures: Sequence[concurrent.futures.Future[Any]]) -> Parts | None:
        """The :class:`Parts` whose parts ``futures`` are, each once (None if they are
        not)."""
        parts = getattr(futures[0], "parts", None) if futures else None
        if parts is None or len(futures) != parts.n:
            return None
        if any(getattr(f, "parts", None) is not parts for f in futures):
            return None
        return parts if len({id(f) for f in futures}) == parts.n else None

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once every part settled (now, if they have)."""
        with self._lock:
            if self.remaining:
                self._callbacks.append(fn)
                return
        fn()

    def future(self) -> concurrent.futures.Future[None]:
        """A future done once every part settled."""
        whole: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.add_done_callback(lambda: whole.set_result(None))
        return whole

    def part_done(self, n: int = 1) -> None:
        """``n`` more parts settled."""
        with self._lock:
            self.remaining -= n
            if self.remaining:
                return
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # (as a future's callbacks: logged, the others still run)
                log.exception("jupyter-px client: error in a callback of a broadcast")


class Request(concurrent.futures.Future):  # type: ignore[type-arg]
    """One request and its future; its state changes only through :class:`Requests`.

    Parameters
    ----------
    msg_id
        The request's msg_id.
    metadata
        Its metadata (``engine_id`` is None for a load-balanced task until it is answered).
    kind
        ``"apply"``, ``"execute"`` (which also waits for the end of its output) or
        ``"hub"`` (a request to the controller; not a task).
    channel
        ``"lane"``, ``"shell"`` or ``"control"`` of engine ``metadata["engine_id"]``, or
        ``"controller"``.
    frames
        The signed frames to send (kept until sent).
    parts
        The :class:`Parts` of the broadcast this request is a part of.

    The future's lock and lists (``concurrent.futures.Future``'s ``_condition``,
    ``_waiters``, ``_done_callbacks``) are made when first used: every method of
    ``Future`` works as ever, and a request that nobody waits on (a broadcast's part,
    whose AsyncResult waits on :class:`Parts`) never makes them.
    """

    # what most requests leave as it is (set on the instance when not)
    path: str | None = None
    outcome: tuple[bool, Any] | None = None
    replied_at = 0.0
    frames: list[Any] | None = None
    route = b""
    track = False
    tracker: zmq.MessageTracker | None = None
    unsent: threading.Event | None = None  # set once a request that had to wait is sent
    parts: Parts | None = None
    watcher: Any = None  # told in bulk when this settles (see watch)
    nbytes = 0  # the result's size as received, when it is weighed (see Transport)
    _cond: threading.Condition | None = None
    _waiters: Any = ()  # (lists of its own come with the condition)
    _done_callbacks: Any = ()

    def __init__(
        self,
        msg_id: str,
        metadata: Metadata,
        kind: str = "apply",
        channel: str = "controller",
        frames: list[Any] | None = None,
        route: bytes = b"",
        track: bool = False,
        header: dict[str, Any] | None = None,
        parts: Parts | None = None,
    ):
        # (not Future.__init__: see _condition)
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self.msg_id = msg_id
        self.metadata = metadata
        self.kind = kind
        self.channel = channel
        self.state = NEW
        self.output_seen = kind != "execute"
        if frames is not None:
            self.frames = frames
        if route:
            self.route = route
        if track:
            self.track = track
        self.header = header
        if parts is not None:
            self.parts = parts

    @classmethod
    def many(
        cls,
        msg_ids: Sequence[str],
        metadata: Sequence[Metadata],
        kind: str,
        channel: str,
        track: bool = False,
    ) -> list[Request]:
        """The parts of one broadcast: a request for each msg_id (with its metadata),
        sharing one :class:`Parts`."""
        parts = Parts(len(msg_ids))
        return [
            cls(msg_id, md, kind, channel, track=track, parts=parts)
            for msg_id, md in zip(msg_ids, metadata)
        ]

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _MAKING:
                cond = self._cond
                if cond is None:
                    self._waiters = []
                    self._done_callbacks = []
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def engine_id(self) -> int | None:
        eid: int | None = self.metadata.get("engine_id")
        return eid

    def done(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def settle(self) -> None:
        """Resolve the future from the outcome (the table finished this request)."""
        settle_all((self,))

    def _notify(self) -> bool:
        """Resolve the future the way of ``Future`` (waiters woken, callbacks called);
        False if it was resolved (or cancelled) already."""
        ok, value = self.outcome or (False, RuntimeError("no outcome"))
        try:
            if ok:
                self.set_result(value)
            else:
                self.set_exception(value)
        except concurrent.futures.InvalidStateError:
            return False
        # called, and never needed again (a callback added from now on runs at once):
        # an AsyncResult's callback here and the AsyncResult holding this request made a
        # cycle, which kept the result (a pulled 512 MiB array, say) alive until the
        # garbage collector's next full pass
        self._done_callbacks = []
        return True

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """As ``Future``'s, but a callback that raises SystemExit or KeyboardInterrupt
        does not end the client's IO thread (see :func:`guarded`)."""
        super().add_done_callback(guarded(fn))

    def cancel(self) -> bool:
        """False: a request ends only through the table (its reply, its engine's or the
        controller's loss), as a running future does. Users stop work with
        ``AsyncResult.abort()`` or ``cancel()``. (A part cancelled from two threads at once
        was counted twice by its :class:`Parts`, which could block the IO thread, and a
        cancelled child left its AsyncResult pending for ever.)"""
        return False

    def __repr__(self) -> str:
        return f"<Request {short_id(self.msg_id)} {self.kind} {self.state}>"


def watch(futures: Iterable[concurrent.futures.Future[Any]], watcher: Any) -> list[Any]:
    """Have ``watcher._children_done(requests)`` told, in bulk, when each of ``futures``
    settles: a map's thousands of tasks then need no callback (and no lock and lists of
    their futures) each. Returns the futures it cannot watch so (not a pending
    :class:`Request`, one watched already, or one given twice): the caller adds a
    callback to those."""
    rest: list[Any] = []
    with _MAKING:  # (settle_all reads a watcher under it once a request is finished)
        for f in futures:
            if isinstance(f, Request) and f._state == PENDING and f.watcher is None:
                f.watcher = watcher
            else:
                rest.append(f)
    return rest


def settle_all(reqs: Iterable[Request]) -> None:
    """Resolve the futures of ``reqs`` (that the table finished) from their outcomes.

    Those that nobody waits on and that have no callback (no condition made) just take
    their outcome, all under one hold of the lock; the others are resolved the way of
    ``Future``. Then each broadcast's :class:`Parts` is told once how many of its parts
    settled, and each watcher (:func:`watch`) once which of its requests did.
    """
    loud: list[Request] = []
    settled: dict[Parts, int] = {}
    watched: dict[Any, list[Request]] = {}
    with _MAKING:
        for req in reqs:
            if req._cond is not None or req._state != PENDING:
                loud.append(req)
                continue
            ok, value = req.outcome or (False, RuntimeError("no outcome"))
            if ok:
                req._result = value
            else:
                req._exception = value
            req._state = FINISHED
            parts = req.parts
            if parts is not None:
                settled[parts] = settled.get(parts, 0) + 1
            if req.watcher is not None:
                _to_watcher(req, watched)
    notified = [req for req in loud if req._notify()]
    if notified:
        with _MAKING:  # (a watcher set while _notify ran is seen here: see watch)
            for req in notified:
                _to_watcher(req, watched)
    for req in notified:
        if req.parts is not None:
            settled[req.parts] = settled.get(req.parts, 0) + 1
    for parts, n in settled.items():
        parts.part_done(n)
    for watcher, done in watched.items():
        try:
            watcher._children_done(done)
        except Exception:  # (as a future's callbacks: logged, the others still run)
            log.exception("jupyter-px client: error in a watcher of requests")


def _to_watcher(req: Request, watched: dict[Any, list[Request]]) -> None:
    """Add settled ``req`` to its watcher's list, once (call with ``_MAKING`` held); the
    request forgets its watcher, so no cycle is left with what holds the request."""
    watcher = req.watcher
    if watcher is not None:
        req.watcher = None
        watched.setdefault(watcher, []).append(req)


Send = Callable[[Request, str], bool]


def guarded(fn: Callable[[Any], object]) -> Callable[[Any], None]:
    """A done-callback ``fn`` that cannot end the thread that calls it.

    ``Future`` logs what a callback raises, but lets SystemExit or KeyboardInterrupt
    (a callback calling ``sys.exit()``) through: on the client's IO thread, which calls
    the callbacks of what it settles, that ended the thread, and with it every reply
    still to come, and the rest of the batch it was settling was never resolved. Off the
    main thread such an exception is logged as any other; on the main thread it passes
    as ever."""

    def call(future: Any) -> None:
        try:
            fn(future)
        except Exception:
            raise  # (Future logs it)
        except BaseException:
            if threading.current_thread() is threading.main_thread():
                raise
            log.exception("jupyter-px: a done-callback of %r raised", future)

    return call


class Refused(Exception):
    """Raised by :meth:`Requests.add` while the table takes no requests (the controller is
    lost, or the client closed); the message says why."""


class Requests:
    """The live requests of one client.

    Parameters
    ----------
    path_of
        ``path_of(engine_id, channel)``: the path a request to that engine and channel
        takes now (``"direct"``, ``"routed"`` or ``"shell"``).
    """

    def __init__(self, path_of: Callable[[int, str], str]):
        self.order = EngineOrder(path_of)
        self.lock = self.order.lock  # one lock for the table and the books
        self.live: dict[str, Request] = {}
        self._by_engine: dict[int, dict[str, None]] = {}
        self._awaiting_output: dict[str, Request] = {}  # replied executes, oldest first
        self.refusing: str | None = None  # why no request is taken now (None: they are)

    # ----- events

    def add(self, req: Request) -> str | None:
        """Take a new request: the path to send it on now, or None (it waits; ``unsent``
        is set once :meth:`replied` releases it)."""
        with self.lock:
            if self.refusing is not None:
                raise Refused(self.refusing)
            self.live[req.msg_id] = req
            eid = req.engine_id
            if eid is not None:
                self._by_engine.setdefault(eid, {})[req.msg_id] = None
            if eid is None or req.channel not in ORDERED_CHANNELS:
                req.state, req.path = SENT, "controller"
                return "controller"
            path = self.order.admit(eid, req.msg_id, req.channel)
            if path is None:
                req.state = WAITING
                req.unsent = threading.Event()
                return None
            req.state, req.path = SENT, path
            return path

    def add_alone(self, req: Request, path: str) -> bool:
        """Take a request for its engine on ``path`` if nothing else of this client's is
        in flight to that engine or waits for it (see :meth:`.EngineOrder.admit_alone`);
        else take nothing and return False."""
        eid = req.engine_id
        assert eid is not None
        with self.lock:
            if self.refusing is not None:
                raise Refused(self.refusing)
            if not self.order.admit_alone(eid, req.msg_id, path):
                return False
            self.live[req.msg_id] = req
            self._by_engine.setdefault(eid, {})[req.msg_id] = None
            req.state, req.path = SENT, path
            return True

    def add_all(self, reqs: list[Request], path: str) -> bool:
        """Take the parts of one broadcast, all sent on ``path`` in one message: True, or
        False (none taken) when one of them would have to wait (see :mod:`._order`)."""
        with self.lock:
            if self.refusing is not None:
                raise Refused(self.refusing)
            items = [(eid, r.msg_id) for r in reqs if (eid := r.engine_id) is not None]
            if len(items) != len(reqs) or not self.order.admit_all(items, path):
                return False
            live, by_engine = self.live, self._by_engine
            for (eid, msg_id), req in zip(items, reqs):
                live[msg_id] = req
                held = by_engine.get(eid)
                if held is None:
                    by_engine[eid] = {msg_id: None}
                else:
                    held[msg_id] = None
                req.state = SENT
                req.path = path
            return True

    def add_balanced(self, reqs: list[Request]) -> None:
        """Take load-balanced requests (no engine: no order to keep), sent now in one
        message (:mod:`._batch`), under one hold of the lock."""
        with self.lock:
            if self.refusing is not None:
                raise Refused(self.refusing)
            live = self.live
            for req in reqs:
                live[req.msg_id] = req
                req.state, req.path = SENT, "controller"

    def replied(
        self,
        msg_id: str,
        outcome: tuple[bool, Any],
        now: float,
        send: Send,
        engine_id: int | None = None,
    ) -> list[Request]:
        """The reply to ``msg_id`` came with ``outcome``; requests it held back are sent
        with ``send(request, path)`` (under the lock, so none sent later overtakes them).
        ``engine_id`` names the engine that answered a load-balanced task."""
        done: list[Request] = []
        with self.lock:
            self._replied(msg_id, outcome, now, self._releaser(send), engine_id, done)
        return done

    def replied_all(
        self,
        replies: Iterable[tuple[str, tuple[bool, Any], int | None]],
        now: float,
        send: Send,
    ) -> list[Request]:
        """:meth:`replied` for each ``(msg_id, outcome, engine_id)`` of ``replies`` (the
        replies one message carried), under one hold of the lock."""
        done: list[Request] = []
        with self.lock:
            release = self._releaser(send)
            live, replied = self.live, self._replied
            finished: list[Request] = []
            for msg_id, outcome, engine_id in replies:
                req = live.get(msg_id)
                if (
                    req is not None
                    and req.output_seen
                    and req.outcome is None
                    and req.state == SENT
                    and req.metadata.get("engine_id") is not None
                ):
                    # (a broadcast's part, mostly: the steps of _replied and _finish,
                    # in one pass below, with the order books told all at once)
                    req.outcome = outcome
                    finished.append(req)
                else:
                    replied(msg_id, outcome, now, release, engine_id, done)
            if finished:
                self._finish_all(finished, release)
                done += finished
        return done

    def _finish_all(self, reqs: list[Request], release: Callable[[str, str], bool]) -> None:
        """:meth:`_finish` the replied ``reqs`` (each with its engine id), after the
        order books were told."""
        try:
            self.order.done_all([req.msg_id for req in reqs], release)
        except Exception:  # (a release whose send failed: these replies are still taken)
            log.exception("jupyter-px client: sending the requests held behind a reply")
        for req in reqs:
            self._finish(req)

    def _releaser(self, send: Send) -> Callable[[str, str], bool]:
        return lambda msg_id, path: self._release(msg_id, path, send)

    def _replied(
        self,
        msg_id: str,
        outcome: tuple[bool, Any],
        now: float,
        release: Callable[[str, str], bool],
        engine_id: int | None,
        done: list[Request],
    ) -> None:
        try:
            self.order.done(msg_id, release)
        except Exception:  # (a release whose send failed: this reply is still taken)
            log.exception("jupyter-px client: sending the requests held behind %s", msg_id)
        req = self.live.get(msg_id)
        if req is None or req.outcome is not None or req.state != SENT:
            return
        if engine_id is not None and req.engine_id is None:
            req.metadata["engine_id"] = engine_id
        req.outcome = outcome
        if req.output_seen:
            done.append(self._finish(req))
            return
        req.state, req.replied_at = REPLIED, now
        self._awaiting_output[msg_id] = req

    def _release(self, msg_id: str, path: str, send: Send) -> bool:
        req = self.live.get(msg_id)
        if req is None or req.state != WAITING:
            return False  # failed meanwhile
        req.state, req.path = SENT, path
        try:
            return send(req, path)
        finally:
            if req.unsent is not None:
                req.unsent.set()

    def withdraw(self, reqs: Iterable[Request], error: BaseException, send: Send) -> list[Request]:
        """Requests whose message never left (its sending failed): they end with
        ``error``; those the table took (:meth:`add`, :meth:`add_all`,
        :meth:`add_balanced`) count no more as in flight to their engine, and what waited
        behind them is sent with ``send``, as after a reply."""
        done: list[Request] = []
        with self.lock:
            release = self._releaser(send)
            for req in reqs:
                if self.live.get(req.msg_id) is not req:
                    if req.state == NEW and req.outcome is None:  # (never taken: ends too)
                        req.outcome = (False, error)
                        req.state = DONE
                        done.append(req)
                    continue  # (else ended meanwhile: its engine died, say)
                try:
                    self.order.done(req.msg_id, release)
                except Exception:
                    log.exception("jupyter-px client: sending the requests behind %s", req.msg_id)
                if req.outcome is None:
                    req.outcome = (False, error)
                self._awaiting_output.pop(req.msg_id, None)
                done.append(self._finish(req))
        return done

    def output_done(self, msg_id: str) -> list[Request]:
        """The engine's idle status for ``msg_id``: its output is complete."""
        with self.lock:
            req = self.live.get(msg_id)
            if req is None:
                return []
            req.output_seen = True
            if req.state != REPLIED:
                return []
            del self._awaiting_output[msg_id]
            return [self._finish(req)]

    def fail_engine(
        self, engine_id: int, error_of: Callable[[Request], BaseException]
    ) -> list[Request]:
        """Engine ``engine_id`` is gone: every request addressed to it ends, failed with
        ``error_of(request)`` (an execute that had its reply keeps it: only its output
        ends). Load-balanced tasks are the controller's to retry or fail."""
        with self.lock:
            self.order.forget_engine(engine_id)
            done = []
            for msg_id in list(self._by_engine.pop(engine_id, ())):
                req = self.live.get(msg_id)
                if req is None:
                    continue
                if req.outcome is None:
                    req.outcome = (False, error_of(req))
                self._awaiting_output.pop(msg_id, None)
                done.append(self._finish(req))
            return done

    def fail_all(
        self, error_of: Callable[[Request], BaseException], refuse: str | None = None
    ) -> list[Request]:
        """The controller is gone (or the client closes): every live request ends, failed
        with ``error_of``; with ``refuse``, new ones are refused from now on (in the same
        step, so none slips in between), until :meth:`accept`."""
        with self.lock:
            if refuse is not None:
                self.refusing = refuse
            self.order.reset()
            done = []
            for req in list(self.live.values()):
                if req.outcome is None:
                    req.outcome = (False, error_of(req))
                done.append(self._finish(req))
            self._awaiting_output.clear()
            return done

    def accept(self) -> None:
        """Take requests again (the controller answers again)."""
        with self.lock:
            self.refusing = None

    def tick(self, now: float) -> list[Request]:
        """Executes whose output did not end within :data:`OUTPUT_GRACE` of their reply
        (a lost idle status) end now."""
        with self.lock:
            done = []
            for msg_id, req in list(self._awaiting_output.items()):
                if now - req.replied_at < OUTPUT_GRACE:
                    break  # (oldest first)
                del self._awaiting_output[msg_id]
                done.append(self._finish(req))
            return done

    def drop(self, msg_ids: Iterable[str]) -> None:
        """Forget requests to the controller that nobody waits for any more (the copies of
        a client's first request, see ``Transport._connect``): they end without an
        outcome, and a reply to one that comes later is a reply to an unknown request."""
        with self.lock:
            for msg_id in msg_ids:
                req = self.live.get(msg_id)
                if req is not None and req.kind == "hub":
                    self._finish(req)

    def _finish(self, req: Request) -> Request:
        req.state = DONE
        if req.frames is not None:
            req.frames = None
        if req.unsent is not None:
            req.unsent.set()  # (nobody waits on the sending of a request that never will be)
        msg_id = req.msg_id
        self.live.pop(msg_id, None)
        eid = req.engine_id
        held = self._by_engine.get(eid) if eid is not None else None
        if held is not None:
            held.pop(msg_id, None)
            if not held:
                del self._by_engine[eid]  # type: ignore[arg-type]
        return req

    # ----- queries

    def get(self, msg_id: str) -> Request | None:
        return self.live.get(msg_id)

    def busy(self, engine_id: int) -> bool:
        """Whether any live request is addressed to ``engine_id``."""
        return engine_id in self._by_engine

    def outstanding(self) -> set[str]:
        """msg_ids of live tasks (not controller queries)."""
        with self.lock:
            return {m for m, r in self.live.items() if r.kind != "hub"}

    def direct_engines(self, msg_ids: list[str]) -> list[int]:
        """The engines of those requests that went to a lane directly."""
        with self.lock:
            reqs = [r for m in msg_ids if (r := self.live.get(m)) is not None]
        return sorted({e for r in reqs if r.path in LANE_PATHS and (e := r.engine_id) is not None})

    def __len__(self) -> int:
        return len(self.live)
