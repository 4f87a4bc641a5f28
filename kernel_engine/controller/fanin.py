"""Fan-in: the replies to one broadcast's parts, held a moment and sent to the client together.

A broadcast (:mod:`.broadcast`) costs its client one message out, but its N replies came
back in several: engines finish at different moments, and the outbox gathers only what
one loop turn sends (at N = 32 on this 2-core machine, 2 to 4 messages a call; on a busy
one, up to one per engine), each a receive and a wake-up of the client's IO thread. So
the replies to a broadcast's parts wait here, and leave for the outbox together (which
sends them as one message, see :mod:`.outbox` and :mod:`kernel_engine.replies`):

- when every part has been answered (a part that failed here, its engine unknown or dead,
  is answered by the controller's error reply, which waits here like the others);
- when :data:`HOLD_SECONDS` have passed since the first reply held (so results of a long
  call still arrive as they come, at most that late, and nothing waits for a part that
  never ends);
- at once, when the held replies of that broadcast pass :data:`HOLD_BYTES`, or those of
  every broadcast :data:`HELD_BYTES` (a large result is not kept in this process longer
  than it takes to send it).

Holding never delays a call's end: the last reply releases the others with it. Only a
jupyter-px client's receiving socket (identity ``<16 hex>:r``) gets its replies held, as
only it takes batches; any other peer gets them one by one, as they come. Replies held
here may be overtaken by later messages to the same client (a client matches replies to
requests by msg_id, so their order does not matter).

:class:`FanIn` is pure logic, given a ``send`` for the replies it lets go and a
``call_later`` for its deadlines; it has no sockets and reads time from ``clock``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from kernel_engine import replies

HOLD_SECONDS = 0.05
"""The longest a reply waits for the rest of its broadcast. A noop on 32 engines of this
2-core machine takes 35 to 55 ms a call, and its replies came back in one message in
every call measured (``benchmarks/broadcast.py``); a longer call's results still come as
they finish, at most this late, which is half the progress display's refresh (0.1 s) and
below what a person notices."""

HOLD_BYTES = 1 << 20
"""Bytes of one broadcast's replies past which they are sent at once (the outbox sends
as much to one client in one batch, :data:`.outbox.MAX_BYTES`)."""

HELD_BYTES = 16 << 20
"""Bytes of every broadcast's replies past which all are sent at once."""

MAX_EXPECTED = 100_000
"""Parts whose replies are awaited, at most: past it, those awaited are forgotten (their
replies then go one by one), so parts never answered (their client lost, say) cannot grow
this process."""


class _Parts:
    """One broadcast's replies: the msg_ids not answered yet and the replies held."""

    __slots__ = ("deadline", "fold", "held", "size", "waiting")

    def __init__(self, msg_ids: Sequence[str], fold: bool = False):
        self.fold = fold
        self.waiting = set(msg_ids)
        self.held: list[list[Any]] = []
        self.size = 0
        self.deadline: float | None = None


class FanIn:
    """Holds the replies to broadcasts' parts until they can go together.

    Parameters
    ----------
    send
        Sends one message ``[client, route, DELIM, signature, ...]`` (the outbox's send).
    call_later
        ``call_later(delay, callback)``: a timer on the controller's loop.
    clock
        Seconds, monotonic.
    hold, hold_bytes, held_bytes
        See :data:`HOLD_SECONDS`, :data:`HOLD_BYTES`, :data:`HELD_BYTES`.
    """

    def __init__(
        self,
        send: Callable[[list[Any]], None],
        call_later: Callable[[float, Callable[[], None]], None],
        clock: Callable[[], float] = time.monotonic,
        hold: float = HOLD_SECONDS,
        hold_bytes: int = HOLD_BYTES,
        held_bytes: int = HELD_BYTES,
    ):
        self.send = send
        self.call_later = call_later
        self.clock = clock
        self.hold = hold
        self.hold_bytes = hold_bytes
        self.held_bytes = held_bytes
        self._parts: dict[str, _Parts] = {}  # by the msg_id of each part not answered yet
        self._due: deque[tuple[float, _Parts]] = deque()  # (deadline, parts), in order
        self._size = 0  # bytes held, all broadcasts

    def expect(self, client: bytes, msg_ids: Sequence[str], fold: bool = False) -> None:
        """A broadcast of ``client``'s is about to send its parts (before the first is
        sent): their replies are to be held (for a jupyter-px receiver only); ``fold``:
        the client asked for them folded (:func:`kernel_engine.replies.pack`)."""
        if len(msg_ids) < 2 or not client.endswith(b":r"):
            return
        if len(self._parts) + len(msg_ids) > MAX_EXPECTED:
            self.release_all()
            self._parts.clear()
        parts = _Parts(msg_ids, fold)
        for msg_id in msg_ids:
            self._parts[msg_id] = parts

    def reply(self, msg_id: str, frames: list[Any], head: tuple[int, bytes] | None = None) -> None:
        """``frames`` (``[client, route, DELIM, signature, ...]``) answers ``msg_id``: sent
        now (with the replies held beside it) or held. ``head``: for an engine's apply
        reply, (engine id, metadata frame) as the router read them; a reply held with it
        may then go merged with the others (:func:`kernel_engine.replies.tag`)."""
        parts = self._parts.pop(msg_id, None)
        if parts is None:
            self.send(frames)
            return
        if head is not None:
            frames = replies.tag(frames, msg_id, *head, fold=parts.fold)
        parts.waiting.discard(msg_id)
        size = sum(map(len, frames))
        parts.held.append(frames)
        parts.size += size
        self._size += size
        if self._size >= self.held_bytes:
            self.release_all()  # (this broadcast's with them, if it had a deadline)
            self._release(parts)
        elif not parts.waiting or parts.size >= self.hold_bytes:
            self._release(parts)
        elif parts.deadline is None:
            parts.deadline = self.clock() + self.hold
            self._due.append((parts.deadline, parts))
            self.call_later(self.hold, self._expire)

    def release_all(self) -> None:
        """Send every reply held (the controller stops, or too much is held)."""
        while self._due:
            deadline, parts = self._due.popleft()
            if parts.deadline == deadline:
                self._release(parts)

    def _expire(self) -> None:
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            deadline, parts = self._due.popleft()
            if parts.deadline == deadline:  # (else released already)
                self._release(parts)

    def _release(self, parts: _Parts) -> None:
        held, parts.held = parts.held, []
        self._size -= parts.size
        parts.size = 0
        parts.deadline = None
        for frames in held:
            self.send(frames)

    def __len__(self) -> int:
        """Replies held now."""
        return sum(len(parts.held) for deadline, parts in self._due if parts.deadline == deadline)

    @property
    def expected(self) -> int:
        """Parts whose replies are still to come."""
        return len(self._parts)
