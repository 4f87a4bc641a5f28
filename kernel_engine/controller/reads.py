"""Requests that read the task database, answered off the controller's loop.

A query over a large database, a history of 400,000 ids or a purge of most of a file
takes seconds; the loop routes every task and must not wait for it. A request handler that
needs the file returns a :class:`Deferred`: its ``work`` runs on one reader thread (it may
touch the file's reader and writer, never the loop's state), its ``finish`` on the loop
with what ``work`` returned (it may touch the loop's state, and acts on it as it is then).

At most :data:`MAX_PENDING` such requests wait at once; past that a request is refused at
once with an error that says so (a client looping on ``db_query`` cannot pile up work or
memory here).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from .loop import PollLoop

log = logging.getLogger("kernel_engine.controller")

Reply = tuple[dict[str, Any], list[Any]]

MAX_PENDING = 64

_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class Deferred:
    """A reply computed in two steps: ``work()`` on the reader thread, then
    ``finish(result)`` on the loop, which returns the reply."""

    work: Callable[[], Any]
    finish: Callable[[Any], Reply]


class FileReads:
    """One reader thread, its bounded queue of jobs, and a socket that wakes the loop
    when a job is done (the loop then finishes it)."""

    def __init__(self, loop: PollLoop, context: zmq.Context[Any], limit: int = MAX_PENDING):
        self.limit = limit
        self.pending = 0  # jobs submitted and not yet finished (loop thread only)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: deque[tuple[Callable[[Any, BaseException | None], None], Any, Any]] = deque()
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
        self, work: Callable[[], Any], then: Callable[[Any, BaseException | None], None]
    ) -> bool:
        """Run ``work`` on the reader thread, then ``then(result, error)`` on the loop;
        False (and nothing runs) when :attr:`limit` jobs are already waiting."""
        if self.pending >= self.limit:
            return False
        self.pending += 1
        self._jobs.put((work, then))
        return True

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._ping.close(linger=0)  # (this thread's socket)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            work, then = job
            try:
                result, error = work(), None
            except BaseException as exc:  # (the loop turns it into an error reply)
                result, error = None, exc
            self._done.append((then, result, error))
            try:
                self._ping.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already waiting, or the loop is closing

    def _finish(self, frames: list[Any]) -> None:
        while self._done:
            then, result, error = self._done.popleft()
            self.pending -= 1
            then(result, error)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread once the job it runs ends (jobs still queued are dropped: the
        clients that asked are being told the controller stops). A job still running after
        ``timeout`` is left to end; the thread closes its socket then."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("a task database read was still running at exit")
        self._loop.remove_socket(self._wake)
        self._wake.close(linger=0)
