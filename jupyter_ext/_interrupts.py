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
by installing a handler that only takes note (:func:`_note`), and delivers the interrupt
to the handler that was there (Python's ``KeyboardInterrupt``, or the user's own) as the
outermost section ends. Nothing in these sections waits (the client's sockets never block
a send: their high-water mark is 0), so an interrupt is held back for no longer than that.

Another signal's handler that raises (a ``SIGALRM`` timeout, say) can cut the swap itself
short, where Python cannot be stopped from checking for signals. The state is kept so that
this never swallows Ctrl-C for good: the note-taking handler passes an interrupt straight
on when no section is running, or when the sections have lasted longer than any can
(:data:`STALE`: one cut short before it could end), and puts the saved handler back.
"""

from __future__ import annotations

import _signal
import contextlib
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

STALE = 0.25
"""Seconds after which sections still counted as running are taken as cut short (by an
exception that skipped their end): a section sends one message and never waits. (A
Ctrl-C within this time of a section cut short waits for the next section's end, or for
a Ctrl-C after it.)"""

_NOTHING = contextlib.nullcontext()


class _State:
    """The main thread's sections (only the main thread runs signal handlers)."""

    depth = 0  # sections running
    saved: Any = None  # the handler to give SIGINT back to
    pending: tuple[int, FrameType | None] | None = None  # an interrupt held back
    since = 0.0  # when the outermost section began


_state = _State()


def _deliver(handler: Any, signum: int, frame: FrameType | None) -> None:
    """What ``handler`` would have done with the signal (raise KeyboardInterrupt, for
    Python's default)."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:  # (the signal's own default: end the process)
        os.kill(os.getpid(), signal.SIGINT)


def _note(signum: int, frame: FrameType | None) -> None:
    """SIGINT's handler while sections run: note the interrupt for their end, or, when
    none is running (or they are stale), give SIGINT back and pass it on now."""
    state = _state
    if state.depth and time.monotonic() - state.since < STALE:
        state.pending = (signum, frame)
        return
    saved = state.saved
    state.depth, state.pending = 0, None
    _signal.signal(signal.SIGINT, saved)
    _deliver(saved, signum, frame)


class _Section:
    """One section: the first to begin installs :func:`_note`, the last to end puts the
    saved handler back and delivers what was held back."""

    __slots__ = ()

    def __enter__(self) -> _Section:
        state = _state
        now = time.monotonic()
        if state.depth and now - state.since >= STALE:
            state.depth = 0  # (sections cut short before their end: see STALE)
        if state.depth == 0:
            state.since = now
            handler = _signal.getsignal(signal.SIGINT)
            if handler is not _note:
                state.pending, state.saved = None, handler
                _signal.signal(signal.SIGINT, _note)
        state.depth += 1
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = _state
        state.depth = max(0, state.depth - 1)
        if state.depth:
            return
        pending, state.pending = state.pending, None
        saved = state.saved
        _signal.signal(signal.SIGINT, saved)
        if pending is not None:
            _deliver(saved, *pending)


_SECTION = _Section()


LONG_STALE = 60.0
"""Seconds after which a long section (``deferred_interrupts(long=True)``) counts as cut
short."""


class _LongSection(_Section):
    """A section that may last longer than :data:`STALE` (sending many messages, none
    of which waits): while it runs, the sections count as stale only after
    :data:`LONG_STALE` s, nested ones included."""

    __slots__ = ("_since",)  # (the sections' start before it: one instance a section)

    def __init__(self) -> None:
        self._since: float | None = None

    def __enter__(self) -> _Section:
        super().__enter__()
        state = _state
        self._since = state.since
        state.since = time.monotonic() + LONG_STALE - STALE  # (last: see STALE)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._since is not None:
            _state.since = self._since
        super().__exit__(*exc)


def deferred_interrupts(long: bool = False) -> contextlib.AbstractContextManager[Any]:
    """A context in which Ctrl-C waits until the end (in the main thread; elsewhere, or
    when the SIGINT handler was set by C code and cannot be put back, nothing changes:
    no interrupt is raised in another thread). ``long``: a section that may send many
    messages (a reply taken in releases every request queued behind it), so may last
    longer than :data:`STALE`; it still never waits."""
    if threading.current_thread() is not threading.main_thread():
        return _NOTHING
    if _signal.getsignal(signal.SIGINT) is None:
        return _NOTHING
    return _LongSection() if long else _SECTION
