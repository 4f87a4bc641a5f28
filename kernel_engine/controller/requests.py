"""The requests the controller answers itself (route ``b"hub"``): queries and control.

Each request's content is parsed into its typed structure first
(:data:`kernel_engine.protocol.HUB_REQUESTS`); a field of the wrong type or range raises
``TypeError``/``ValueError`` naming it, which the controller turns into an error reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kernel_engine import protocol
from kernel_engine.wire import Message

from .balancer import Balancer
from .engines import EngineSet
from .hub import Hub
from .inflight import Inflight

Reply = tuple[dict[str, Any], list[Any]]


class Operations(Protocol):
    """What the controller does for requests (implemented by ``Controller``)."""

    def publish_event(self, msg_type: str, content: dict[str, Any]) -> None: ...

    def start_engines(self, n: int) -> list[int]: ...

    def stop_engines(self, eids: list[int] | None, reason: str) -> None: ...

    def stop(self) -> None: ...

    def tell_engines(self, eids: list[int], msg_type: str, content: dict[str, Any]) -> None: ...


class HubRequests:
    """Answers hub requests from the controller's state.

    Parameters
    ----------
    cluster_id
        The cluster's name.
    engines, inflight, hub, balancer
        The engine set, what is in flight, the task records, load balancing.
    dead
        Why each engine that left the cluster left.
    ops
        What the controller does for requests that change things.
    """

    def __init__(
        self,
        cluster_id: str,
        engines: EngineSet,
        inflight: Inflight,
        hub: Hub,
        balancer: Balancer,
        dead: Mapping[int, str],
        ops: Operations,
    ):
        self.cluster_id = cluster_id
        self.engines = engines
        self.inflight = inflight
        self.hub = hub
        self.balancer = balancer
        self.dead = dead
        self.ops = ops
        self.handlers: dict[str, Callable[[Any, Message], Reply]] = {
            protocol.CONNECT_REQUEST: self._connect,
            protocol.QUEUE_REQUEST: self._queue_status,
            protocol.RESULT_REQUEST: self._result,
            protocol.PURGE_REQUEST: self._purge,
            protocol.ABORT_REQUEST: self._abort,
            protocol.SIGNAL_REQUEST: self._signal,
            protocol.SHUTDOWN_REQUEST: self._shutdown,
            protocol.HISTORY_REQUEST: self._history,
            protocol.DB_REQUEST: self._db,
            protocol.START_REQUEST: self._start,
        }

    def handle(self, msg: Message) -> Reply:
        """The reply's content and buffers; raises for a request that cannot be served."""
        structure = protocol.HUB_REQUESTS.get(msg.msg_type)
        if structure is None:
            raise ValueError(f"unknown controller request {msg.msg_type!r}")
        request = structure.from_content(msg.content)
        content, buffers = self.handlers[msg.msg_type](request, msg)
        content.setdefault("status", "ok")
        return content, buffers

    def _targets(self, targets: tuple[int, ...] | None) -> list[int]:
        ready = self.engines.ready_ids()
        if targets is None:
            return ready
        missing = sorted(set(targets) - set(self.engines.engines))
        if missing:
            raise ValueError(f"no engines with ids {missing}")
        return list(dict.fromkeys(targets))

    def _connect(self, request: protocol.Empty, msg: Message) -> Reply:
        self.ops.publish_event(protocol.IOPUB_WELCOME, {"token": msg.msg_id})
        engines = self.engines.engines.values()
        return {
            "cluster_id": self.cluster_id,
            "engines": {str(e.id): e.info().to_content() for e in engines if e.state == "ready"},
            "starting": sorted(e.id for e in engines if e.state != "ready"),
            "dead": {str(k): v for k, v in self.dead.items()},
        }, []

    def _queue_status(self, request: protocol.QueueRequest, msg: Message) -> Reply:
        status: dict[str, Any] = {}
        balanced = self.balancer.queue_status()
        for eid in self._targets(request.targets):
            tasks = balanced.get(str(eid), {})
            status[str(eid)] = {
                "queue": self.inflight.count(eid),
                "completed": self.inflight.completed[eid],
                "tasks": tasks.get("tasks", 0) if isinstance(tasks, dict) else 0,
            }
        status["unassigned"] = balanced.get("unassigned", 0)
        return {"queue_status": status}, []

    def _result(self, request: protocol.ResultRequest, msg: Message) -> Reply:
        records: dict[str, Any] = {}
        counts: dict[str, int] = {}
        buffers: list[Any] = []
        for msg_id in request.msg_ids:
            record = self.hub.get(msg_id)
            if record is None:
                records[msg_id] = None
                continue
            records[msg_id] = record.summary()
            if record.reply is not None:
                frames = record.reply_frames()
                counts[msg_id] = len(frames)
                buffers.extend(frames)
        return {"records": records, "frame_counts": counts}, buffers

    def _purge(self, request: protocol.PurgeRequest, msg: Message) -> Reply:
        n = self.hub.purge(request.msg_ids, request.engine_ids)
        if request.engine_ids is None:
            self.balancer.forget(request.msg_ids)
        return {"purged": n}, []

    def _abort(self, request: protocol.AbortRequest, msg: Message) -> Reply:
        self.balancer.abort(request.msg_ids)
        content = {"msg_ids": list(request.msg_ids)}
        self.ops.tell_engines(
            self._targets(request.targets), protocol.ENGINE_ABORT_REQUEST, content
        )
        return content, []

    def _signal(self, request: protocol.SignalRequest, msg: Message) -> Reply:
        if request.msg_ids is not None:  # the engines running (or holding) these requests
            held = self.inflight.engines_of(request.msg_ids)
            # a client names the engines of requests it sent to their lanes itself
            held.update(t for t in request.targets or () if t in self.engines.engines)
            targets = sorted(held)
        else:
            targets = self._targets(request.targets)
        for eid in targets:
            self.engines.signal(eid, request.signum)
        return {"targets": targets}, []

    def _shutdown(self, request: protocol.ShutdownRequest, msg: Message) -> Reply:
        targets = self._targets(request.targets)
        if request.hub:
            self.ops.stop()
            return {"targets": targets}, []
        self.ops.stop_engines(targets, "was shut down by a client")
        return {"targets": targets, "reasons": {str(t): self.dead.get(t) for t in targets}}, []

    def _history(self, request: protocol.Empty, msg: Message) -> Reply:
        return {"history": self.hub.history()}, []

    def _db(self, request: protocol.DbRequest, msg: Message) -> Reply:
        return {"records": self.hub.query(request.query, request.keys)}, []

    def _start(self, request: protocol.StartRequest, msg: Message) -> Reply:
        return {"ids": self.ops.start_engines(request.n)}, []
