"""The controller's side of load balancing: the pure scheduler, wired to sockets.

Load-balanced requests (route ``b"lb"``) have their flags checked here
(:class:`~kernel_engine.protocol.TaskFlags`: a bad flag gets an error reply naming it and
never reaches the scheduler), then wait, as frames, until the scheduler dispatches them;
several tasks for one engine go as one batch lane message. A task's frames are kept until
its final outcome, so a retry (after an error or an engine's death) resends them; replies
that the scheduler does not take as final (a retried attempt) are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel_engine import protocol, wire
from kernel_engine.wire import Message

from .engines import EngineSet
from .hub import PENDING, Hub
from .inflight import Inflight, Pending
from .scheduler import (
    Action,
    Dependency,
    Dispatch,
    Fail,
    Resubmit,
    Scheduler,
    Task,
)

log = logging.getLogger("kernel_engine.controller")

FLAGS_KEPT = 64
"""Metadata frames whose checked flags are kept: a map's tasks carry the same metadata
(the client encodes it once for the map), so its flags are parsed and checked once, not
for each task (4% of the controller's loop with tiny tasks, measured with py-spy)."""

FLAGS_KEPT_BYTES = 4096
"""Metadata frames longer than this are checked each time, not kept."""

UNKNOWN_GRACE = 2.0
"""Seconds a task waits on a dependency no record names yet before it fails with
InvalidDependency: a client tells the controller of the requests it sends to engines
itself up to 0.25 s later (``jupyter_ext._lanes.FLUSH_EVERY``), so another client that
names one at once would otherwise be refused (see :class:`.scheduler.Scheduler`)."""


def _dependency(spec: protocol.DependencySpec | None) -> Dependency | None:
    if spec is None:
        return None
    return Dependency(frozenset(spec.msg_ids), spec.all, spec.success, spec.failure)


@dataclass(slots=True)
class _Queued:
    """A load-balanced task without a final outcome: who asked, and its frames."""

    client: bytes
    header: dict[str, Any]
    frames: list[Any]


class Balancer:
    """Feeds the scheduler events and carries out its actions.

    Parameters
    ----------
    wire
        Packs the error replies the balancer makes itself.
    engines, inflight, hub
        The engine set (to send and to interrupt), what is in flight, the task records.
    send_client
        Sends frames on the client socket.
    """

    def __init__(
        self,
        wire: wire.Wire,
        engines: EngineSet,
        inflight: Inflight,
        hub: Hub,
        send_client: Callable[[list[Any]], None],
        hwm: int = 16,
        max_batch: int = 32,
    ):
        self.wire = wire
        self.engines = engines
        self.inflight = inflight
        self.hub = hub
        self.send_client = send_client
        self.scheduler = Scheduler(hwm=hwm, max_batch=max_batch, unknown_grace=UNKNOWN_GRACE)
        self.tasks: dict[str, _Queued] = {}
        self._flags: dict[bytes, protocol.TaskFlags] = {}  # metadata frame -> its flags

    def submit(self, client: bytes, msg: Message, frames: list[Any]) -> None:
        """A load-balanced request (``frames``: signature onwards); its msg_id is new."""
        self.submit_many(client, [(msg, frames)])

    def submit_many(self, client: bytes, requests: list[tuple[Message, list[Any]]]) -> None:
        """Load-balanced requests of one client, in order (a batch, or one request):
        each is checked, recorded and submitted as it would be alone, and one that is
        refused is refused alone; the scheduler takes them together."""
        tasks: list[Task] = []
        batch = {msg.msg_id for msg, _ in requests} if len(requests) > 1 else set()
        unknown: dict[str, None] = {}  # dependencies to look up, in one go for the message
        for msg, frames in requests:
            task = self._task(client, msg, frames, batch, unknown)
            if task is not None:
                tasks.append(task)
        if not tasks:
            return
        self._declare(list(unknown))
        actions, refused = self.scheduler.submit_many(tasks, time.monotonic())
        for msg_id, why in refused:
            queued = self.tasks.pop(msg_id, None)
            if queued is not None:
                self._reply_error(_Queued(client, queued.header, []), "ValueError", why)
        self.apply(actions)

    def _task(
        self,
        client: bytes,
        msg: Message,
        frames: list[Any],
        batch: set[str],
        unknown: dict[str, None],
    ) -> Task | None:
        """A request's flags checked (else it is refused: None), its record made; the
        dependencies it names that the scheduler does not know (and are not of its own
        ``batch``) added to ``unknown``."""
        try:
            flags = self._flags_of(msg)
        except (TypeError, ValueError) as exc:  # (wire.MessageError is a ValueError)
            ename = "TypeError" if isinstance(exc, TypeError) else "ValueError"
            self._refuse(client, msg.header, ename, f"invalid flag: {exc}")
            return None
        for spec in (flags.after, flags.follow):
            for msg_id in spec.msg_ids if spec is not None else ():
                if not (self.scheduler.knows(msg_id) or msg_id in batch or msg_id == msg.msg_id):
                    unknown[msg_id] = None
        task = Task(
            msg_id=msg.msg_id,
            client=client,
            targets=None if flags.targets is None else frozenset(flags.targets),
            after=_dependency(flags.after),
            follow=_dependency(flags.follow),
            timeout=flags.timeout,
            retries=flags.retries,
            time_limit=flags.time_limit,
        )
        self.hub.submitted(
            msg.msg_id,
            msg.msg_type,
            client,
            None,
            wire.header_date(msg.header),
            flags.label,
            request=frames[1:],  # (from the header on)
            after=() if flags.after is None else flags.after.msg_ids,
            follow=() if flags.follow is None else flags.follow.msg_ids,
        )
        # (once recorded: a task the records refused raising would be held for ever)
        self.tasks[msg.msg_id] = _Queued(client, msg.header, frames)
        return task

    def _flags_of(self, msg: Message) -> protocol.TaskFlags:
        """The checked flags of a request (raises as :meth:`TaskFlags.from_content` does),
        kept by metadata frame (:data:`FLAGS_KEPT`). Flags are immutable, and a frame
        that failed the check is never kept, so it fails again."""
        frame = wire.as_bytes(msg.frames[3])
        flags = self._flags.get(frame)
        if flags is None:
            flags = protocol.TaskFlags.from_content(msg.metadata)
            if len(frame) <= FLAGS_KEPT_BYTES:
                if len(self._flags) >= FLAGS_KEPT:
                    self._flags.clear()
                self._flags[frame] = flags
        return flags

    def _declare(self, msg_ids: list[str]) -> None:
        """Tell the scheduler what the records know of dependencies it has forgotten (or
        never saw: requests routed to one engine, or sent to a lane directly): one lookup
        for a whole message's, however many it names (one each could hold the loop up
        for seconds)."""
        if not msg_ids:
            return
        for msg_id, outcome in self.hub.outcomes(msg_ids).items():
            if outcome == PENDING:
                self.scheduler.note_known(msg_id)
            elif isinstance(outcome, tuple):
                self.apply(self.scheduler.record_outcome(msg_id, *outcome))

    def owns(self, msg_id: str) -> bool:
        return msg_id in self.tasks

    def runs_on(self, msg_id: str, eid: int) -> bool:
        """Whether the load-balanced task ``msg_id`` was dispatched to ``eid`` and has not
        finished there (only then is ``eid``'s reply to it taken)."""
        return self.scheduler.runs_on(msg_id, eid)

    def queued(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is a load-balanced task not dispatched to an engine yet."""
        return msg_id in self.tasks and msg_id not in self.inflight

    def reply(self, eid: int, msg_id: str, frames: list[Any], status: str) -> bool:
        """An engine answered a load-balanced task; returns whether to forward the reply."""
        verdict: Any = "ok" if status == "ok" else "error"
        if verdict != "ok":
            try:
                content = wire.loads_object(frames[6].bytes, "content")
            except (wire.MessageError, IndexError):
                content = {}
            if content.get("px_error") == "UnmetDependency":
                verdict = "unmet"
            elif content.get("px_error") in ("TaskTimeout", protocol.INTERRUPTED):
                verdict = "final"  # (its engine timed it, or an interrupt named it)
        actions = self.scheduler.finished(msg_id, eid, verdict, time.monotonic())
        final = not any(isinstance(a, (Fail, Resubmit)) and a.msg_id == msg_id for a in actions)
        if final:
            self.tasks.pop(msg_id, None)
        self.apply(actions)
        return final

    def heard_of(self, msg_id: str) -> None:
        """A request outside load balancing was recorded: tasks that named it before
        the controller heard of it wait for its outcome now."""
        self.scheduler.heard_of(msg_id)

    def outcome(self, msg_id: str, engine_id: int | None, success: bool) -> None:
        """A request outside load balancing finished (its dependents may run now)."""
        self.apply(self.scheduler.record_outcome(msg_id, engine_id, success))

    def engine_added(self, eid: int) -> None:
        self.scheduler.add_engine(eid)

    def engine_removed(self, eid: int, reason: str) -> None:
        self.apply(self.scheduler.remove_engine(eid, time.monotonic(), reason))

    def abort(self, msg_ids: tuple[str, ...]) -> None:
        self.apply(self.scheduler.abort(msg_ids, time.monotonic()))

    def client_lost(self, client: bytes, abort: bool = False) -> list[tuple[int, str]]:
        """A client is gone: its queued tasks fail (TaskAborted); returns (engine, msg_id)
        of its tasks already dispatched, which with ``abort`` count as aborted (an engine
        told to skip them replies TaskAborted, and that is final, retries or not)."""
        now = time.monotonic()
        self.apply(self.scheduler.drop_client(client, now))
        running = self.scheduler.running_of(client)
        if abort:
            self.apply(self.scheduler.abort([m for _, m in running], now))
        return running

    def forget(self, msg_ids: tuple[str, ...] | None) -> None:
        self.scheduler.forget(msg_ids)

    def schedule(self) -> None:
        if self.tasks:
            self.apply(self.scheduler.schedule(time.monotonic()))

    def tick(self) -> None:
        deadline = self.scheduler.next_deadline()
        if deadline is not None and deadline <= time.monotonic():
            self.apply(self.scheduler.tick(time.monotonic()))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self._dispatch(action)
            elif isinstance(action, Fail):
                queued = self.tasks.pop(action.msg_id, None)
                self.inflight.pop(action.msg_id, answered=False)
                if queued is not None:
                    self._reply_error(queued, action.kind, action.reason, action.eid)
            elif isinstance(action, Resubmit):
                log.info("task %s goes to another engine: %s", action.msg_id, action.reason)

    def _dispatch(self, action: Dispatch) -> None:
        messages = []
        for msg_id in action.msg_ids:
            queued = self.tasks[msg_id]
            pending = Pending(queued.client, queued.header, action.eid, "lane", "lb")
            self.inflight.add(msg_id, pending)
            self.hub.assigned(msg_id, action.eid)
            messages.append([queued.client, wire.DELIM, *queued.frames])
        for frames in wire.batches(messages):
            if not self.engines.send(action.eid, "lane", frames):
                log.error("the scheduler chose engine %i, which is gone", action.eid)
                return

    def _refuse(
        self,
        client: bytes,
        header: dict[str, Any],
        ename: str,
        evalue: str,
        eid: int | None = None,
    ) -> None:
        """A request refused before it became a task (no record), or a task that failed
        (on engine ``eid``, if it got that far)."""
        self.send_client(protocol.fail_reply(self.wire, client, header, eid, ename, evalue))

    def _reply_error(self, queued: _Queued, kind: str, reason: str, eid: int | None = None) -> None:
        frames = protocol.fail_reply(self.wire, queued.client, queued.header, eid, kind, reason)
        self.send_client(frames)
        msg_id = str(queued.header.get("msg_id", ""))
        self.hub.completed(msg_id, "error", frames=frames[3:])  # (from the signature on)

    def queue_status(self) -> dict[str, Any]:
        return self.scheduler.queue_status()
