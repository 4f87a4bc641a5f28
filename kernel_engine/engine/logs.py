"""An engine's log may not be flooded by what others send it.

An engine's sockets are reachable by every local user, and ipykernel logs each message it
cannot use on its shell and control channels (a traceback per message, with the bogus
signature spelled out: a few hundred kilobytes each). :class:`FloodGuard`, a logging
filter on the engine's handlers, lets the first records of each kind through, drops the
rest, says how many it dropped when it lets one through again, and shortens what it lets
through. Our own code counts dropped input itself (``kernel_engine.wire.DropLog``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

MAX_TEXT = 2000
"""Characters of a message, and of a traceback, that reach the log."""


class FloodGuard(logging.Filter):
    """At most ``burst`` records of one kind per ``interval`` seconds, each shortened.

    A kind is the logger, the level and the message's format string (not its arguments),
    so "Invalid Message" is one kind however many bad messages arrive.
    """

    def __init__(self, burst: int = 5, interval: float = 10.0):
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._kinds: dict[tuple[str, int, str], list[Any]] = {}  # kind -> [since, let, held]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.interval:
            held = state[2] if state is not None else 0
            if len(self._kinds) > 1000:
                self._kinds.clear()
            state = self._kinds[kind] = [now, 0, 0]
            if held:
                record.msg = f"({held} similar messages dropped) {record.getMessage()}"
                record.args = None
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        _shorten(record)
        return True


def _shorten(record: logging.LogRecord) -> None:
    text = record.getMessage()
    if len(text) > MAX_TEXT:
        record.msg, record.args = text[:MAX_TEXT] + " ... (shortened)", None
    if record.exc_info and not record.exc_text:
        formatted = logging.Formatter().formatException(record.exc_info)
        if len(formatted) > MAX_TEXT:
            formatted = formatted[:MAX_TEXT] + "\n... (shortened)"
        record.exc_text = formatted


NOISY = ("tornado.general", "tornado.application")
"""Loggers that report, one traceback each, the unusable messages ipykernel's streams get
(ipykernel's own reports go through its application's logger)."""


def guard(app_logger: logging.Logger) -> FloodGuard:
    """Put one :class:`FloodGuard` on the loggers that bad input reaches: the kernel
    application's and :data:`NOISY` (on the loggers, not their handlers: handlers may be
    set up later, and a logger's filter sees every record made on it)."""
    flood = FloodGuard()
    for logger in (app_logger, *map(logging.getLogger, NOISY)):
        logger.addFilter(flood)
    return flood
