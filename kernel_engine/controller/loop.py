"""The controller's event loop: one thread, a zmq poller and timers.

A plain poll loop rather than asyncio: per message it costs a poll and a callback, which
is the controller's latency budget. Each readable socket is drained (up to a bound, for
fairness between sockets) before the next poll.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

log = logging.getLogger("kernel_engine.controller")

Handler = Callable[[list[Any]], None]

DRAIN_LIMIT = 512


class PollLoop:
    """Runs socket handlers and timers on the calling thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self._handlers: dict[Any, Handler] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._running = False
        self.after_events: list[Callable[[], None]] = []

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
            timeout_ms = None
            if self._timers:
                timeout_ms = max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)
            for socket, _ in self.poller.poll(timeout_ms):
                handler = self._handlers.get(socket)
                if handler is None:
                    continue
                self._drain(socket, handler)
            for callback in self.after_events:
                callback()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._running:
                _, _, callback = heapq.heappop(self._timers)
                self._safely(callback)

    def _drain(self, socket: zmq.Socket[Any], handler: Handler) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.error("receive failed: %s", exc)
                return
            try:
                handler(frames)
            except Exception:
                log.exception("error handling a message; message dropped")
            if socket not in self._handlers:
                return

    @staticmethod
    def _safely(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("error in timer callback")
