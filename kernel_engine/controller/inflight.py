"""Requests on their way to engines and not answered yet: the one record of what is where.

Three components put requests on engines: the router (requests a client addressed to an
engine), the balancer (load-balanced tasks the scheduler placed) and, through a client's
notices, the client itself (requests it sent to a lane directly). All of them record the
request here, and only here, so "what does engine 3 hold" and "which engine runs msg_id X"
have one answer, and an engine's death finds every request it took with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["routed", "lb", "direct"]

MAX_DIRECT = 200_000
"""Requests that clients said they sent to lanes themselves and that are not answered yet,
held at most (all clients together): only a client's notice says when one ends, so a peer
naming requests that never end would otherwise grow this without bound."""


@dataclass(slots=True)
class Pending:
    """A request forwarded to an engine (or sent to its lane by a client).

    ``client`` is the identity replies go to; ``header`` the request's header (an error
    reply names it as parent); ``kind`` says who put it there.
    """

    client: bytes
    header: dict[str, Any]
    engine_id: int
    channel: str
    kind: Kind


class Inflight:
    """Pending requests by msg_id and by engine; every operation is O(1) per request."""

    def __init__(self) -> None:
        self._by_id: dict[str, Pending] = {}
        self._by_engine: dict[int, dict[str, None]] = {}
        self.completed: Counter[int] = Counter()
        self.direct = 0
        """How many of the requests held are ``direct`` ones."""

    def add(self, msg_id: str, pending: Pending) -> None:
        if pending.kind == "direct":
            self.direct += 1
        self._by_id[msg_id] = pending
        self._by_engine.setdefault(pending.engine_id, {})[msg_id] = None

    def get(self, msg_id: str) -> Pending | None:
        return self._by_id.get(msg_id)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def pop(self, msg_id: str, answered: bool = True) -> Pending | None:
        """Forget ``msg_id``; ``answered`` counts it as completed by its engine."""
        pending = self._by_id.pop(msg_id, None)
        if pending is not None:
            if pending.kind == "direct":
                self.direct -= 1
            held = self._by_engine.get(pending.engine_id)
            if held is not None:
                held.pop(msg_id, None)
            if answered:
                self.completed[pending.engine_id] += 1
        return pending

    def count(self, engine_id: int) -> int:
        """How many requests ``engine_id`` holds."""
        return len(self._by_engine.get(engine_id, ()))

    def oldest(self, engine_id: int) -> str | None:
        """The msg_id of the oldest request ``engine_id`` holds (None: it holds none)."""
        held = self._by_engine.get(engine_id)
        return next(iter(held), None) if held else None

    def on_engine(self, engine_id: int) -> list[str]:
        """The msg_ids ``engine_id`` holds, oldest first."""
        return list(self._by_engine.get(engine_id, ()))

    def engines_of(self, msg_ids: list[str] | tuple[str, ...]) -> set[int]:
        """The engines holding any of these msg_ids."""
        return {p.engine_id for m in msg_ids if (p := self._by_id.get(m)) is not None}

    def pop_engine(self, engine_id: int) -> list[tuple[str, Pending]]:
        """Forget everything ``engine_id`` held (it died or stopped), oldest first."""
        held = self._by_engine.pop(engine_id, {})
        self.completed.pop(engine_id, None)
        gone = [(m, p) for m in held if (p := self._by_id.pop(m, None)) is not None]
        self.direct -= sum(p.kind == "direct" for _, p in gone)
        return gone

    def of_client(self, client: bytes) -> list[tuple[str, Pending]]:
        """The requests of one client (a scan: only for rare events, a client lost)."""
        return [(m, p) for m, p in self._by_id.items() if p.client == client]
