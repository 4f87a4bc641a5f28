"""Sections of the client that Ctrl-C cannot cut in half.

Sending a request is several steps: the request table takes it (and counts it in flight
to its engine, see :mod:`._order`), then its message leaves, frame by frame (pyzmq sends
a multipart message one frame at a time, from Python). A ``KeyboardInterrupt`` raised in
between, which Ctrl-C in a loop of ``apply_async`` calls does, left a request counted as
sent that never was: every later request of the client to that engine, on another path,
waited behind it for ever (``rc.wait()``, ``%px`` and ``execute`` hung). Raised between
two frames, it left half a message in the socket, to which the next message was glued.

Python runs signal handlers in the main thread only, between bytecodes, so
:func:`deferred_interrupts` holds Ctrl-C back for the few microseconds of such a section
by swapping in a handler that only takes note, and delivers the interrupt to the handler
that was there (Python's ``KeyboardInterrupt``, or the user's own) as the section ends.
Nothing in these sections waits (the client's sockets never block a send: their
high-water mark is 0), so an interrupt is held back for no longer than that.
"""

from __future__ import annotations

import _signal
import contextlib
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

_NOTHING = contextlib.nullcontext()


class _Deferred:
    """Ctrl-C taken note of while the section runs, delivered at its end."""

    __slots__ = ("_got", "_old")

    def __enter__(self) -> _Deferred:
        self._got: tuple[int, FrameType | None] | None = None
        self._old: Any = _signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._got = (signum, frame)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        old = self._old
        _signal.signal(signal.SIGINT, old)
        got = self._got
        if got is None:
            return
        if callable(old):  # (Python's default raises KeyboardInterrupt)
            old(*got)
        elif old == signal.SIG_DFL:  # (what the signal would have done: end the process)
            os.kill(os.getpid(), signal.SIGINT)


def deferred_interrupts() -> contextlib.AbstractContextManager[Any]:
    """A context in which Ctrl-C waits until the end (in the main thread; elsewhere, or
    when the SIGINT handler was set by C code and cannot be put back, nothing changes:
    no interrupt is raised in another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return _NOTHING
    if _signal.getsignal(signal.SIGINT) is None:
        return _NOTHING
    return _Deferred()
