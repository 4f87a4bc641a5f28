"""One client's requests to one engine run in the order it sent them, whatever their path.

A client reaches an engine by three paths: the engine's task lane directly
(:mod:`jupyter_ext._lanes`), the lane through the controller, and the engine's shell
through the controller (``execute``). Each path is first in, first out; across paths
nothing is: a direct ``apply`` overtakes an ``execute`` still on its way through the
controller, and even two messages that reach the engine in order may run out of order,
since ipykernel dispatches its shell asynchronously. IPython Parallel users rely on order
(``dview.execute("import numpy"); dview.apply(f)`` without blocking), so:

- a request whose path differs from the path of this client's requests still in flight
  to that engine waits, unsent, until they have all been answered;
- a request behind a waiting one waits too, so the order stays the order of sending;
- when the last one in flight is answered, the waiting requests at the head that share a
  path are released together.

This module keeps the books (under one lock, from any thread); the client sends. Released
requests are sent while the lock is held, so none sent later can overtake them. Which path
a request takes is asked of ``path_of(engine_id, channel)`` when it is admitted and again
when it is released (a lane may have become usable in between).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Engine:
    path: str = ""
    inflight: int = 0
    waiting: deque[tuple[str, str]] = field(default_factory=deque)  # (msg_id, channel)


class EngineOrder:
    """The books: per engine, the path in use, how many are in flight, who waits."""

    def __init__(self, path_of: Callable[[int, str], str]):
        self.path_of = path_of
        self.lock = threading.RLock()  # ``send`` may fail an engine: forget_engine
        self._engines: dict[int, _Engine] = {}
        self._engine_of: dict[str, int] = {}  # msg_ids in flight -> engine id

    def admit(self, eid: int, msg_id: str, channel: str) -> str | None:
        """The path to send ``msg_id`` on now, or None: it waits (see :meth:`done`)."""
        path = self.path_of(eid, channel)
        with self.lock:
            state = self._engines.get(eid)
            if state is None:
                state = self._engines[eid] = _Engine()
            if state.waiting or (state.inflight and state.path != path):
                state.waiting.append((msg_id, channel))
                return None
            state.path = path
            state.inflight += 1
            self._engine_of[msg_id] = eid
            return path

    def admit_alone(self, eid: int, msg_id: str, path: str) -> bool:
        """Admit ``msg_id`` on ``path`` if nothing of this client's is in flight to
        ``eid`` or waits for it; else admit nothing and return False. (``path`` is one
        that :attr:`path_of` never gives: a request released later goes another way.)"""
        with self.lock:
            state = self._engines.get(eid)
            if state is None:
                state = self._engines[eid] = _Engine()
            elif state.inflight or state.waiting:
                return False
            state.path = path
            state.inflight = 1
            self._engine_of[msg_id] = eid
            return True

    def admit_all(self, items: list[tuple[int, str]], path: str) -> bool:
        """Admit several ``(engine id, msg_id)`` on ``path`` at once (the parts of one
        broadcast), if every one of them could go now; else admit none and return False."""
        with self.lock:
            for eid, _ in items:
                state = self._engines.get(eid)
                if state is not None and (state.waiting or (state.inflight and state.path != path)):
                    return False
            for eid, msg_id in items:
                state = self._engines.get(eid)
                if state is None:
                    state = self._engines[eid] = _Engine()
                state.path = path
                state.inflight += 1
                self._engine_of[msg_id] = eid
            return True

    def done(self, msg_id: str, send: Callable[[str, str], bool]) -> None:
        """``msg_id`` was answered: ``send(msg_id, path)`` the requests that may go now.

        ``send`` returns False for a request that was not sent after all (it failed
        meanwhile); it then does not count as in flight.
        """
        if msg_id not in self._engine_of:
            return
        with self.lock:
            eid = self._engine_of.pop(msg_id, None)
            state = self._engines.get(eid) if eid is not None else None
            if state is None or eid is None:
                return
            state.inflight -= 1
            while state.inflight == 0 and state.waiting and self._engines.get(eid) is state:
                state.path = path = self.path_of(eid, state.waiting[0][1])
                while state.waiting and self.path_of(eid, state.waiting[0][1]) == path:
                    waiting_id, _ = state.waiting.popleft()
                    self._engine_of[waiting_id] = eid
                    state.inflight += 1
                    if not send(waiting_id, path):
                        self._engine_of.pop(waiting_id, None)
                        state.inflight -= 1

    def done_all(self, msg_ids: list[str], send: Callable[[str, str], bool]) -> None:
        """:meth:`done` for each of ``msg_ids`` (the replies one message carried), under
        one hold of the lock. What a ``send`` raises is raised once every msg_id is done
        (the first of them, if several failed)."""
        error: Exception | None = None
        with self.lock:
            for msg_id in msg_ids:
                try:
                    self.done(msg_id, send)
                except Exception as exc:
                    error = error or exc
        if error is not None:
            raise error

    def reset(self) -> None:
        """Forget every engine's books (the controller is gone: nothing is in flight)."""
        with self.lock:
            self._engines.clear()
            self._engine_of.clear()

    def waiting(self, eid: int) -> int:
        state = self._engines.get(eid)
        return len(state.waiting) if state is not None else 0

    def forget_engine(self, eid: int) -> list[str]:
        """The engine is gone: returns the msg_ids that waited for it, unsent."""
        with self.lock:
            state = self._engines.pop(eid, None)
            if state is None:
                return []
            for msg_id in [m for m, e in self._engine_of.items() if e == eid]:
                del self._engine_of[msg_id]
            waiting = [msg_id for msg_id, _ in state.waiting]
            state.waiting.clear()
            return waiting
