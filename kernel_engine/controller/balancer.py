"""The controller's side of load balancing: the pure scheduler, wired to sockets.

Load-balanced requests (route ``b"lb"``) wait here, as frames, until the scheduler
dispatches them; several tasks for one engine go as one batch lane message. A task's frames
are kept until its final outcome, so a retry (after an error or an engine's death) resends
them; replies that the scheduler does not take as final (a retried attempt) are dropped.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol

from .engines import Engine, Pending
from .router import fail_reply
from .scheduler import (
    Action,
    Dependency,
    Dispatch,
    Fail,
    Interrupt,
    Resubmit,
    Scheduler,
    Status,
    Task,
)

if TYPE_CHECKING:
    from .app import Controller

log = logging.getLogger("kernel_engine.controller")


def _dependency(spec: Any) -> Dependency | None:
    if not spec:
        return None
    ids = frozenset(str(m) for m in spec.get("msg_ids", []))
    if not ids:
        return None
    return Dependency(
        ids,
        all=bool(spec.get("all", True)),
        success=bool(spec.get("success", True)),
        failure=bool(spec.get("failure", False)),
    )


class Balancer:
    """Feeds the scheduler events and carries out its actions."""

    def __init__(self, controller: Controller, hwm: int = 16, max_batch: int = 32):
        self.c = controller
        self.scheduler = Scheduler(hwm=hwm, max_batch=max_batch)
        self.tasks: dict[str, tuple[Pending, list[Any]]] = {}
        controller.loop.after_events.append(self.schedule)
        controller.loop.call_every(0.05, self.tick)

    def submit(self, client: bytes, msg: protocol.Message, frames: list[Any]) -> None:
        """A load-balanced request (``frames``: signature onwards)."""
        md = msg.metadata
        targets = md.get("targets")
        task = Task(
            msg_id=msg.msg_id,
            client=client,
            targets=None if targets is None else frozenset(int(t) for t in targets),
            after=_dependency(md.get("after")),
            follow=_dependency(md.get("follow")),
            timeout=md.get("timeout") or None,
            retries=int(md.get("retries") or 0),
            time_limit=md.get("time_limit") or None,
        )
        self.tasks[msg.msg_id] = (Pending(client, msg.header, "lane"), frames)
        self.c.hub.submitted(msg.header, client, None, label=md.get("label"))
        try:
            actions = self.scheduler.submit(task, time.monotonic())
        except ValueError as exc:
            self.tasks.pop(msg.msg_id, None)
            self._reply_error(Pending(client, msg.header, "lane"), "InvalidTarget", str(exc))
            return
        self.apply(actions)

    def owns(self, msg_id: str) -> bool:
        return msg_id in self.tasks

    def reply(
        self, engine: Engine, msg_id: str, frames: list[Any], metadata: dict[str, Any]
    ) -> bool:
        """An engine answered a load-balanced task; returns whether to forward the reply."""
        status: Status = "ok" if (metadata.get("status") or "ok") == "ok" else "error"
        if status != "ok":
            try:
                content = json.loads(frames[6].bytes)
            except (ValueError, IndexError):
                content = {}
            if content.get("px_error") == "UnmetDependency":
                status = "unmet"
        actions = self.scheduler.finished(msg_id, engine.id, status, time.monotonic())
        final = not any(isinstance(a, (Fail, Resubmit)) and a.msg_id == msg_id for a in actions)
        if final:
            self.tasks.pop(msg_id, None)
        self.apply(actions)
        return final

    def record_direct(self, msg_id: str, engine_id: int, success: bool) -> None:
        self.apply(self.scheduler.record_outcome(msg_id, engine_id, success))

    def engine_added(self, engine: Engine) -> None:
        self.scheduler.add_engine(engine.id)

    def engine_removed(self, engine: Engine) -> None:
        self.apply(self.scheduler.remove_engine(engine.id, time.monotonic()))

    def abort(self, msg_ids: list[str]) -> None:
        self.apply(self.scheduler.abort(msg_ids, time.monotonic()))

    def forget(self, msg_ids: list[str]) -> None:
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
                entry = self.tasks.pop(action.msg_id, None)
                if entry is not None:
                    self._reply_error(entry[0], action.kind, action.reason)
                for engine in self.c.engines.engines.values():
                    engine.inflight.pop(action.msg_id, None)
            elif isinstance(action, Interrupt):
                self._interrupt(action)
            elif isinstance(action, Resubmit):
                log.info("task %s goes to another engine: %s", action.msg_id, action.reason)

    def _dispatch(self, action: Dispatch) -> None:
        engine = self.c.engines.engines.get(action.eid)
        if engine is None or "lane" not in engine.sockets:
            log.error("scheduler chose engine %i, which is gone", action.eid)
            return
        messages = []
        for msg_id in action.msg_ids:
            pending, frames = self.tasks[msg_id]
            engine.inflight[msg_id] = pending
            self.c.hub.assigned(msg_id, engine.id)
            messages.append([pending.client, protocol.DELIM, *frames])
        if len(messages) == 1:
            engine.sockets["lane"].send_multipart(messages[0], copy=False)
        else:
            engine.sockets["lane"].send_multipart(protocol.pack_batch(messages), copy=False)

    def _interrupt(self, action: Interrupt) -> None:
        if action.msg_id in self.scheduler.in_flight(action.eid):
            try:
                self.c.engines.signal(action.eid, signal.SIGINT)
            except (KeyError, ValueError) as exc:
                log.error("could not interrupt engine %i: %s", action.eid, exc)

    def _reply_error(self, pending: Pending, kind: str, reason: str) -> None:
        self.c.hub.completed(pending.header.get("msg_id", ""), "error", {}, None)
        self.c.clients.send_multipart(
            fail_reply(self.c.wire, pending, None, kind, reason), copy=False
        )

    def queue_status(self) -> dict[str, Any]:
        return self.scheduler.queue_status()
