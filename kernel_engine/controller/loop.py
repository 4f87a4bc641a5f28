"""The controller's event loop: one thread, a zmq poller and timers.

A plain poll loop rather than asyncio: per message it costs a poll and a callback, which
is the controller's latency budget. Each readable socket is drained (up to a bound, for
fairness between sockets) before the next poll.

Nothing a handler or timer raises ends the loop: each call is guarded, the first failure
of each kind is logged with its traceback and later ones are counted (a peer that found a
way to make a handler raise cannot fill the log either). Only :meth:`PollLoop.stop` ends
it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
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


class PollLoop:
    """Runs socket handlers and timers on the calling thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self._handlers: dict[Any, Handler] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._running = False
        self._logged: set[str] = set()
        self.errors = DropLog(log, "controller: errors handling input")
        self.after_events: list[Callable[[], None]] = []
        # called right before each poll, after the timers: what they gathered goes out
        self.before_poll: list[Callable[[], None]] = []

    def add_socket(self, socket: zmq.Socket[Any], handler: Handler) -> None:
        """Call ``handler(frames)`` for every message ``socket`` receives."""
        self._handlers[socket] = handler
        self.poller.register(socket, zmq.POLLIN)

    def remove_socket(self, socket: zmq.Socket[Any]) -> None:
        if self._handlers.pop(socket, None) is not None:
            self.poller.unregister(socket)

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

    def run(self) -> None:
        self._running = True
        while self._running:
            for callback in self.before_poll:
                self._safely(callback)
            timeout_ms = None
            if self._timers:
                timeout_ms = max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)
            try:
                ready = self.poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                self._failed("poll", exc)
                continue
            for socket, _ in ready:
                handler = self._handlers.get(socket)
                if handler is None:
                    continue
                self._drain(socket, handler)
            for callback in self.after_events:
                self._safely(callback)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._running:
                _, _, callback = heapq.heappop(self._timers)
                self._safely(callback)

    def _drain(self, socket: zmq.Socket[Any], handler: Handler) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
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
            if socket not in self._handlers or time.monotonic() > deadline:
                return

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
