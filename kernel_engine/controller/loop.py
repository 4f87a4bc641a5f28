"""The controller's event loop: one thread, an ``epoll`` over its sockets, and timers.

A plain poll loop rather than asyncio: per message it costs a poll and a callback, which
is the controller's latency budget. Each readable socket is drained (up to a bound, for
fairness between sockets) before the next poll.

Why ``epoll`` and not ``zmq.Poller``: the controller holds five sockets per engine, and a
``zmq.Poller`` looks at every one of them on each pass (about 0.1 ms at 50 sockets, 1.5 ms
at 500, 23 ms at 5,000: most of the controller's time with 1,000 engines). ``epoll``
reports only the sockets whose descriptor fired. A zmq socket's descriptor fires once when
its state may have changed (an edge, not a level), and an operation on the socket can take
that news in silently: a send processes the socket's pending commands, among them "a
message came". So a socket is looked at (its ``EVENTS`` read, and drained if readable)
when its descriptor fires, after the loop sent on it (the sockets of the context from
:meth:`PollLoop.context` tell the loop when they are sent on; a socket from another
context has its ``EVENTS`` read before each poll, which re-arms its descriptor), when its
draining stopped at the bound, when it is added, and every few seconds all of them (a
safety net, which logs what it finds).

Nothing a handler or timer raises ends the loop: each call is guarded, the first failure
of each kind is logged with its traceback and later ones are counted (a peer that found a
way to make a handler raise cannot fill the log either). Only :meth:`PollLoop.stop` ends
it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import zmq

from kernel_engine.wire import NOBLOCK, DropLog, recv_frames

log = logging.getLogger("kernel_engine.controller")

Handler = Callable[[list[Any]], None]

DRAIN_LIMIT = 512

DRAIN_SECONDS = 0.02
"""Time after which a socket's draining stops, however few messages it read (one message
may carry a batch of many tasks), so the other sockets and the timers get their turn."""

SWEEP_SECONDS = 5.0
"""How often every socket is looked at, whether or not its descriptor fired (a socket
costs about 4 us: 20 ms for 1,000 engines)."""

_get = zmq.backend.Socket.get  # (getsockopt without making an enum of the answer)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class PollLoop:
    """Runs socket handlers and timers on the calling thread until :meth:`stop`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[Any, Handler] = {}
        self._by_fd: dict[int, Any] = {}
        self._fds: dict[Any, int] = {}
        self._sent: set[Any] = set()  # sockets of :meth:`context` sent on since the last pass
        self._again: set[Any] = set()  # to look at on the next pass, without waiting
        self._untracked: set[Any] = set()  # sockets of other contexts: looked at every pass
        self._next_sweep = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._running = False
        self._logged: set[str] = set()
        self.errors = DropLog(log, "controller: errors handling input")
        self.swept = 0  # messages the sweep found that no event announced (should stay 0)
        self.after_events: list[Callable[[], None]] = []
        # called right before each poll, after the timers: what they gathered goes out
        self.before_poll: list[Callable[[], None]] = []

    def context(self) -> zmq.Context[Any]:
        """A zmq context whose sockets tell this loop when they are sent on."""
        sent = self._sent

        class LoopSocket(zmq.Socket):  # type: ignore[type-arg]
            def send(self, *args: Any, **kwargs: Any) -> Any:
                sent.add(self)
                return super().send(*args, **kwargs)

        context: zmq.Context[Any] = zmq.Context()
        context._socket_class = LoopSocket  # type: ignore[assignment]
        return context

    def add_socket(self, socket: zmq.Socket[Any], handler: Handler) -> None:
        """Call ``handler(frames)`` for every message ``socket`` receives."""
        if socket in self._handlers:
            self.remove_socket(socket)
        fd = int(socket.getsockopt(zmq.FD))
        stale = self._by_fd.get(fd)
        if stale is not None:  # (a socket closed without remove_socket had this number)
            self.remove_socket(stale)
        self._handlers[socket] = handler
        self._by_fd[fd] = socket
        self._fds[socket] = fd
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)
        if type(socket).__name__ != "LoopSocket":
            self._untracked.add(socket)
        self._again.add(socket)  # (messages may be waiting already)

    def remove_socket(self, socket: zmq.Socket[Any]) -> None:
        """Stop watching ``socket`` (before closing it)."""
        if self._handlers.pop(socket, None) is None:
            return
        fd = self._fds.pop(socket)
        if self._by_fd.get(fd) is socket:  # (else another socket has the number now)
            del self._by_fd[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # (closed already)
                pass
        self._untracked.discard(socket)
        self._again.discard(socket)
        self._sent.discard(socket)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), callback))

    def call_every(self, interval: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` every ``interval`` seconds (first after one interval)."""

        def tick() -> None:
            try:
                callback()
            finally:
                if self._running:
                    self.call_later(interval, tick)

        self.call_later(interval, tick)

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        """Release the ``epoll`` descriptor (the loop cannot run again)."""
        self._epoll.close()

    def run(self) -> None:
        self._running = True
        poll, by_fd, sent, handlers = self._epoll.poll, self._by_fd, self._sent, self._handlers
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        while self._running:
            for callback in self.before_poll:
                self._safely(callback)
            for socket in self._untracked:  # (reading EVENTS re-arms the descriptor)
                if self._readable(socket):
                    self._again.add(socket)
            timeout = -1.0
            if self._again or sent:
                timeout = 0.0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = poll(min(timeout, SWEEP_SECONDS) if timeout >= 0 else SWEEP_SECONDS)
            except OSError as exc:
                self._failed("poll", exc)
                events = []
            look, self._again = self._again, set()
            if sent:
                look |= sent
                sent.clear()
            for fd, _ in events:
                socket = by_fd.get(fd)
                if socket is not None:
                    look.add(socket)
            for socket in look:
                handler = handlers.get(socket)
                if handler is not None and self._readable(socket):
                    self._drain(socket, handler)
            for callback in self.after_events:
                self._safely(callback)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._running:
                _, _, callback = heapq.heappop(self._timers)
                self._safely(callback)
            if now >= self._next_sweep:
                self._sweep()
                self._next_sweep = time.monotonic() + SWEEP_SECONDS

    def _sweep(self) -> None:
        """Look at every socket: one readable here had its news taken in unannounced."""
        for socket, handler in list(self._handlers.items()):
            if socket in self._handlers and self._readable(socket):
                if socket not in self._untracked:
                    self.swept += 1
                    if self.swept == 1:
                        log.warning("a socket had messages its descriptor did not announce")
                self._drain(socket, handler)

    @staticmethod
    def _readable(socket: zmq.Socket[Any]) -> bool:
        """Whether ``socket`` has a message (reading its ``EVENTS`` also takes in its news,
        so that its descriptor fires again for the next)."""
        try:
            return bool(_get(socket, _EVENTS) & _POLLIN)  # type: ignore[operator]
        except zmq.ZMQError:
            return False

    def _drain(self, socket: zmq.Socket[Any], handler: Handler) -> None:
        """Handle ``socket``'s messages (it is readable), up to the bounds."""
        deadline = time.monotonic() + DRAIN_SECONDS
        readable = self._readable
        for _ in range(DRAIN_LIMIT):
            try:
                frames = recv_frames(socket, NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._failed("receive", exc)
                return
            try:
                handler(frames)
            except Exception as exc:
                self._failed(getattr(handler, "__qualname__", "handler"), exc)
            if socket not in self._handlers or not readable(socket):
                return
            if time.monotonic() > deadline:
                break
        self._again.add(socket)  # (stopped at the bound: more may wait, unannounced)

    def _safely(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as exc:
            self._failed(getattr(callback, "__qualname__", "callback"), exc)

    def _failed(self, where: str, exc: BaseException) -> None:
        """Log the first failure of each kind with its traceback; count the rest."""
        kind = f"{where}: {type(exc).__name__}"
        if kind not in self._logged and len(self._logged) < 1000:
            self._logged.add(kind)
            log.error("error in %s (later ones are counted)", where, exc_info=exc)
        else:
            self.errors.drop(kind)
