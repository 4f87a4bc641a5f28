"""Requests that read the task database, answered off the controller's loop.

A query over a large database, a history of 400,000 ids or a purge of most of a file
takes seconds; the loop routes every task and must not wait for it. A request handler that
needs the file returns a :class:`Deferred`: its ``work`` runs on one reader thread (it may
touch the file's reader and writer, never the loop's state), its ``finish`` on the loop
with what ``work`` returned (it may touch the loop's state, and acts on it as it is then).

At most :data:`MAX_PENDING` such requests wait at once, and at most :data:`PER_OWNER` of
one client; past that a request is refused at once with an error that says so (a client
looping on ``db_query`` cannot pile up work or memory here). Clients are served in turn,
one job each, so one client's long queue does not delay another's request.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from .loop import PollLoop

log = logging.getLogger("kernel_engine.controller")

Reply = tuple[dict[str, Any] | bytes, list[Any]]
"""A reply's content (or its JSON, when built off the loop) and buffers."""

MAX_PENDING = 64
PER_OWNER = 4

_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class Deferred:
    """A reply computed in two steps: ``work()`` on the reader thread, then
    ``finish(result)`` on the loop, which returns the reply. Without ``finish``, ``work``
    returns the reply itself, and it is signed and framed off the loop too: the loop only
    sends it."""

    work: Callable[[], Any]
    finish: Callable[[Any], Reply] | None = None


class FileReads:
    """One reader thread, its bounded queue of jobs, and a socket that wakes the loop
    when a job is done (the loop then finishes it)."""

    def __init__(
        self,
        loop: PollLoop,
        context: zmq.Context[Any],
        limit: int = MAX_PENDING,
        per_owner: int = PER_OWNER,
    ):
        self.limit = limit
        self.per_owner = per_owner
        self.pending = 0  # jobs submitted and not yet finished (loop thread only)
        self._owners: dict[Any, int] = {}  # the same, by owner (loop thread only)
        self._queues: dict[Any, deque[Any]] = {}  # jobs waiting, by owner (under _ready)
        self._turns: deque[Any] = deque()  # owners with jobs waiting, in turn
        self._ready = threading.Condition()
        self._closing = False
        self._done: deque[tuple[Any, Callable[[Any, BaseException | None], None], Any, Any]] = (
            deque()
        )
        address = f"inproc://px-file-reads-{next(_ids)}"
        self._wake = context.socket(zmq.PAIR)
        self._wake.linger = 0
        self._wake.bind(address)
        self._ping = context.socket(zmq.PAIR)  # used by the reader thread only
        self._ping.linger = 0
        self._ping.sndhwm = 1  # one wake-up waiting is enough; more would only be dropped
        self._ping.connect(address)
        self._loop = loop
        loop.add_socket(self._wake, self._finish)
        self._thread = threading.Thread(target=self._run, name="px-file-reads", daemon=True)
        self._thread.start()

    def submit(
        self,
        work: Callable[[], Any],
        then: Callable[[Any, BaseException | None], None],
        owner: Any = None,
    ) -> str | None:
        """Run ``work`` on the reader thread, then ``then(result, error)`` on the loop;
        None, or why not (nothing runs then): :attr:`limit` jobs waiting in all, or
        :attr:`per_owner` of ``owner`` (who asked)."""
        if self.pending >= self.limit:
            return f"{self.limit} task database reads are waiting already; try again"
        if self._owners.get(owner, 0) >= self.per_owner:
            return f"this client has {self.per_owner} task database reads waiting already"
        self.pending += 1
        self._owners[owner] = self._owners.get(owner, 0) + 1
        with self._ready:
            waiting = self._queues.get(owner)
            if waiting is None:
                self._queues[owner] = waiting = deque()
                self._turns.append(owner)
            waiting.append((owner, work, then))
            self._ready.notify()
        return None

    def drop(self, owner: Any) -> int:
        """Forget the jobs of ``owner`` (a client that is gone) not started yet; how many.
        (Their ``then`` is not called: nobody is left to answer.)"""
        with self._ready:
            waiting = self._queues.pop(owner, None)
            if not waiting:
                return 0
            self._turns.remove(owner)
        self.pending -= len(waiting)
        left = self._owners.pop(owner, 0) - len(waiting)
        if left > 0:
            self._owners[owner] = left
        return len(waiting)

    def _next(self) -> Any:
        """The next job, clients in turn (reader thread); None once closing."""
        with self._ready:
            while not self._turns and not self._closing:
                self._ready.wait()
            if self._closing:
                return None
            owner = self._turns.popleft()
            waiting = self._queues[owner]
            job = waiting.popleft()
            if waiting:
                self._turns.append(owner)
            else:
                del self._queues[owner]
            return job

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._ping.close(linger=0)  # (this thread's socket)

    def _serve(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            owner, work, then = job
            try:
                result, error = work(), None
            except BaseException as exc:  # (the loop turns it into an error reply)
                result, error = None, exc
            self._done.append((owner, then, result, error))
            try:
                self._ping.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already waiting, or the loop is closing

    def _finish(self, frames: list[Any]) -> None:
        while self._done:
            owner, then, result, error = self._done.popleft()
            self.pending -= 1
            left = self._owners.pop(owner, 1) - 1
            if left:
                self._owners[owner] = left
            then(result, error)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread once the job it runs ends (jobs still queued are dropped: the
        clients that asked are being told the controller stops). A job still running after
        ``timeout`` is left to end; the thread closes its socket then."""
        with self._ready:
            self._closing = True
            self._queues.clear()
            self._turns.clear()
            self._ready.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("a task database read was still running at exit")
        self._loop.remove_socket(self._wake)
        self._wake.close(linger=0)
