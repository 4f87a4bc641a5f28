"""Engines that register themselves: which id each gets, or why it is refused. Pure logic.

Any process holding the cluster's key can register an engine (``jupyter px engine``,
an MPI rank, a Slurm task): the controller's edge has checked its signature, replay and
fields (:class:`~kernel_engine.protocol.RegisterRequest`) before :func:`decide` sees it.
What is decided here:

- an id: the one asked for (an MPI rank asks for its rank; an engine that comes back asks
  for the id it had), else the next unused one (past the highest id, the lowest one no
  engine holds);
- a live engine is never displaced: an id in use by another engine (starting, ready or
  being adopted) is refused, with ``retry`` set, since that engine may just have died
  and not been noticed yet (its registrant tries again for a while);
- the same process registering again (its reply was lost) gets the same answer, and is
  not connected to twice;
- one process may not hold two ids, and engines not yet ready are bounded
  (:data:`MAX_PENDING`), so a flood of registrations cannot grow the controller.

Which process an engine is, is told by its kernel's session id (``uuid``, random per
process) with its host and pid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kernel_engine.protocol import MAX_ENGINE_ID, RegisterRequest

MAX_PENDING = 10_000
"""Registered engines not yet ready, at most (more registrations wait: ``retry``)."""


@dataclass(frozen=True, slots=True)
class Occupant:
    """What the controller knows of an engine that holds an id."""

    uuid: str
    pid: int | None
    hostname: str
    state: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a registration: an id (``again``: the same process registered
    before, nothing more to do) or why not (``retry``: it may work a little later)."""

    engine_id: int | None = None
    again: bool = False
    refusal: str = ""
    retry: bool = False

    @property
    def accepted(self) -> bool:
        return self.engine_id is not None


def decide(request: RegisterRequest, engines: Mapping[int, Occupant], next_id: int) -> Decision:
    """Where ``request`` goes, given the engines holding ids and the next unused id."""
    for eid, held in engines.items():
        if held.uuid == request.uuid:
            if request.engine_id is not None and request.engine_id != eid:
                why = (
                    f"this engine (kernel session {request.uuid[:40]}) is registered as "
                    f"engine {eid} already, not {request.engine_id}"
                )
                return Decision(refusal=why)
            return Decision(eid, again=True)
    pending = sum(1 for held in engines.values() if held.state != "ready")
    if pending >= MAX_PENDING:
        why = f"{pending} engines are registering already; try again later"
        return Decision(refusal=why, retry=True)
    wanted = request.engine_id
    if wanted is None:
        free = max(next_id, 0)
        while free in engines:
            free += 1
        if free > MAX_ENGINE_ID:
            # (one engine that asked for a high id must not leave none to the others:
            # the lowest that no engine holds)
            free = next(i for i in range(len(engines) + 1) if i not in engines)
            if free > MAX_ENGINE_ID:
                return Decision(refusal=f"no engine id left (the highest is {MAX_ENGINE_ID})")
        return Decision(free)
    holder = engines.get(wanted)
    if holder is None:
        return Decision(wanted)
    where = (
        f"pid {holder.pid} on {holder.hostname}" if holder.pid else holder.hostname or "elsewhere"
    )
    why = (
        f"engine id {wanted} is held by a live engine ({where}, {holder.state}); a "
        "registration never displaces one"
    )
    return Decision(refusal=why, retry=True)
