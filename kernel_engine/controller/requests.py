"""The requests the controller answers itself (route ``b"hub"``): queries and control.

Each request's content is parsed into its typed structure first
(:data:`kernel_engine.protocol.HUB_REQUESTS`); a field of the wrong type or range raises
``TypeError``/``ValueError`` naming it, which the controller turns into an error reply.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from kernel_engine import protocol
from kernel_engine.errors import InvalidTarget
from kernel_engine.wire import Message, dumps_json, parse_date

from .balancer import Balancer
from .engines import EngineSet
from .hub import PENDING, Hub, TaskRecord
from .inflight import Inflight
from .query import check_keys, check_query
from .reads import Deferred, Reply

Answer = Reply | Deferred
"""A reply, or how to compute it off the loop (requests that read the task database)."""

MAX_DB_RECORDS = 100_000
"""Most records one ``db_query`` reply carries (``truncated`` says when more matched)."""

MAX_DB_BYTES = 64 * 2**20
"""Most bytes of buffers and texts one ``db_query`` reply carries (``truncated`` too)."""

MAX_FILE_IDS = 10_000
"""Most tasks one request may need read from the task database (results, resubmit)."""

DATE_KEYS = ("submitted", "started", "completed", "received")


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def _stamped(query: dict[str, Any]) -> dict[str, Any]:
    """A client's query with its dates (ISO strings) as timestamps, as records hold them."""

    def stamp(key: str, value: Any) -> Any:
        if isinstance(value, str):
            parsed = parse_date(value)
            if parsed is None:
                raise ValueError(f"{key}: {value!r} is not an ISO date")
            return parsed.timestamp()
        if isinstance(value, list):
            return [stamp(key, v) for v in value]
        return value

    out: dict[str, Any] = {}
    for key, value in query.items():
        if key not in DATE_KEYS:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = {op: stamp(key, v) for op, v in value.items()}
        else:
            out[key] = stamp(key, value)
    return out


class Operations(Protocol):
    """What the controller does for requests (implemented by ``Controller``)."""

    def publish_event(self, msg_type: str, content: dict[str, Any]) -> None: ...

    def start_engines(self, n: int) -> list[int]: ...

    def stop_engines(self, eids: list[int] | None, reason: str) -> None: ...

    def stop(self) -> None: ...

    def tell_engines(self, eids: list[int], msg_type: str, content: dict[str, Any]) -> None: ...

    def resubmit(self, client: bytes, request: dict[str, Any], msg_id: str) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def client_reads(self, client: bytes, formats: tuple[str, ...]) -> None: ...


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
        self.handlers: dict[str, Callable[[Any, Message, bytes], Answer]] = {
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
            protocol.RESUBMIT_REQUEST: self._resubmit,
            protocol.STATUS_REQUEST: self._status,
        }

    def handle(self, msg: Message, client: bytes = b"") -> Answer:
        """The reply's content and buffers (``client``: who asked), or a :class:`Deferred`
        that computes them; raises for a request that cannot be served."""
        structure = protocol.HUB_REQUESTS.get(msg.msg_type)
        if structure is None:
            raise ValueError(f"unknown controller request {msg.msg_type!r}")
        request = structure.from_content(msg.content)
        return self.handlers[msg.msg_type](request, msg, client)

    def _targets(self, targets: tuple[int, ...] | None) -> list[int]:
        ready = self.engines.ready_ids()
        if targets is None:
            return ready
        missing = sorted(set(targets) - set(self.engines.engines))
        if missing:
            raise InvalidTarget(f"no engines with ids {missing}")
        return list(dict.fromkeys(targets))

    def _connect(self, request: protocol.ConnectRequest, msg: Message, client: bytes) -> Answer:
        self.ops.client_reads(client, request.reads)
        self.ops.publish_event(protocol.IOPUB_WELCOME, {"token": msg.msg_id})
        engines = self.engines.engines.values()
        return {
            "cluster_id": self.cluster_id,
            "engines": {str(e.id): e.info().to_content() for e in engines if e.state == "ready"},
            "starting": sorted(e.id for e in engines if e.state != "ready"),
            "dead": {str(k): v for k, v in self.dead.items()},
        }, []

    def _status(self, request: protocol.Empty, msg: Message, client: bytes) -> Answer:
        """The cluster's status now (the status stream's snapshot, without its events)."""
        return self.ops.status(), []

    def _queue_status(self, request: protocol.QueueRequest, msg: Message, client: bytes) -> Answer:
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

    def _result(self, request: protocol.ResultRequest, msg: Message, client: bytes) -> Answer:
        parts: dict[str, tuple[dict[str, Any], list[Any]] | None] = {}
        missing: list[str] = []
        file = self.hub.log is not None
        for msg_id in request.msg_ids:
            record = self.hub.get(msg_id)
            # (a finished record whose reply memory did not keep, over its bound or evicted
            # for bytes, may have it in the file)
            if record is None or (file and record.finished and record.reply is None):
                missing.append(msg_id)
            parts[msg_id] = None if record is None else _result_part(record)
        if not missing or self.hub.log is None:
            return _results(parts, {})
        if len(missing) > MAX_FILE_IDS:
            raise ValueError(
                f"{len(missing)} of these tasks are read from the task database: ask for at "
                f"most {MAX_FILE_IDS} such at once"
            )
        hub = self.hub

        def read() -> Reply:
            return _encoded(_results(parts, hub.read_many(missing)))

        return Deferred(read)

    def _purge(self, request: protocol.PurgeRequest, msg: Message, client: bytes) -> Answer:
        # (the scheduler still knows the purged tasks' outcomes, within its bound: a task
        # may depend on one after it was purged, as IPython Parallel's may)
        n = self.hub.forget_finished(request.msg_ids, request.engine_ids)
        if self.hub.log is None:
            return {"purged": n}, []
        hub = self.hub
        return Deferred(
            lambda: hub.purge_file(request.msg_ids, request.engine_ids),
            lambda purged: ({"purged": purged}, []),
        )

    def _abort(self, request: protocol.AbortRequest, msg: Message, client: bytes) -> Answer:
        self.balancer.abort(request.msg_ids)
        content = {"msg_ids": list(request.msg_ids)}
        self.ops.tell_engines(
            self._targets(request.targets), protocol.ENGINE_ABORT_REQUEST, content
        )
        return content, []

    def _signal(self, request: protocol.SignalRequest, msg: Message, client: bytes) -> Answer:
        # the engines running (or holding) these requests, and each one's share of them
        named = self._named(request)
        targets = sorted(named) if request.msg_ids is not None else self._targets(request.targets)
        for eid in targets:  # (all or none)
            why = self.engines.signal_problem(eid, request.signum)
            if why is not None:
                raise ValueError(why)
        if request.signum != signal.SIGINT:
            named = {}
        elif request.msg_ids:
            # load-balanced tasks not on an engine yet do not run: an interrupt of work
            # still queued here (Ctrl-C in a wait) is answered at once, not by a grace
            queued = [m for m in request.msg_ids if self.balancer.queued(m)]
            if queued:
                self.balancer.abort(tuple(queued))
        for eid in targets:
            if eid not in named or not self.engines.interrupt(eid, named[eid]):
                self.engines.signal(eid, request.signum)
        return {"targets": targets}, []

    def _named(self, request: protocol.SignalRequest) -> dict[int, tuple[str, ...]]:
        """For a signal to requests: each engine's share of them (those it holds; those
        the controller has no engine for, a client's direct ones, to the engines the
        client named)."""
        if request.msg_ids is None:
            return {}
        named: dict[int, list[str]] = {}
        direct = [t for t in request.targets or () if t in self.engines.engines]
        for msg_id in request.msg_ids:
            held = self.inflight.get(msg_id)
            for eid in (held.engine_id,) if held is not None else direct:
                named.setdefault(eid, []).append(msg_id)
        return {eid: tuple(ids) for eid, ids in named.items()}

    def _shutdown(self, request: protocol.ShutdownRequest, msg: Message, client: bytes) -> Answer:
        targets = self._targets(request.targets)
        if request.hub:
            self.ops.stop()
            return {"targets": targets}, []
        self.ops.stop_engines(targets, "was shut down by a client")
        return {"targets": targets, "reasons": {str(t): self.dead.get(t) for t in targets}}, []

    def _history(self, request: protocol.Empty, msg: Message, client: bytes) -> Answer:
        if self.hub.log is None:
            return {"history": self.hub.history()}, []
        hub = self.hub
        return Deferred(lambda: _encoded(({"history": hub.history()}, [])))

    def _db(self, request: protocol.DbRequest, msg: Message, client: bytes) -> Answer:
        """Records matching the query, dates as ISO strings, buffers as frames (each
        ``buffers`` value the indices of its frames); at most :data:`MAX_DB_RECORDS`."""
        query = check_query(_stamped(request.query))
        keys = None if request.keys is None else tuple(check_keys(list(request.keys)))
        if self.hub.log is None:
            return _db_reply(self.hub.query(query, keys, MAX_DB_RECORDS + 1), False)
        hub = self.hub

        def read() -> Reply:
            rows, cut = hub.query_capped(query, keys, MAX_DB_RECORDS + 1, MAX_DB_BYTES)
            return _encoded(_db_reply(rows, cut))

        return Deferred(read)

    def _start(self, request: protocol.StartRequest, msg: Message, client: bytes) -> Answer:
        return {"ids": self.ops.start_engines(request.n)}, []

    def _resubmit(self, request: protocol.ResubmitRequest, msg: Message, client: bytes) -> Answer:
        """Finished tasks' requests, load-balanced again under new msg_ids; all or none
        (a ValueError names every task that cannot be). What memory does not hold is read
        from the file first, off the loop."""
        if self.hub.log is None:
            return self._resubmit_known(request, client, {})
        if 2 * len(request.pairs) > MAX_FILE_IDS:
            raise ValueError(f"resubmit at most {MAX_FILE_IDS // 2} tasks at once")
        hub = self.hub
        ids = [m for pair in request.pairs for m in pair]  # (new ids too: taken in the file?)
        return Deferred(
            lambda: hub.read_requests(ids),
            lambda found: self._resubmit_known(request, client, found),
        )

    def _resubmit_known(
        self,
        request: protocol.ResubmitRequest,
        client: bytes,
        read: Mapping[str, tuple[Any, dict[str, Any] | None]],
    ) -> Reply:
        """(``read``: each task's outcome and request as the file had them; memory's
        outcome, fresher, wins.)"""
        problems: list[str] = []
        plans: list[tuple[str, str, dict[str, Any]]] = []
        for old, new in request.pairs:
            outcome, stored = read.get(old, (None, None))
            if self.hub.get(old) is not None:
                outcome = self.hub.outcome(old)
                stored = self.hub.kept_request(old) or stored
            if self.hub.known(new) or new in self.inflight or new in read:
                problems.append(f"{new}: that new msg_id is taken")
            elif outcome is None:
                problems.append(f"{old}: no such task")
            elif outcome == PENDING:
                problems.append(f"{old}: still in flight (only finished tasks run again)")
            elif stored is None:
                problems.append(
                    f"{old}: its request was not kept (sent to an engine's lane "
                    "directly, over the size kept, or purged)"
                )
            elif (stored.get("header") or {}).get("msg_type") != protocol.APPLY_REQUEST:
                problems.append(f"{old}: only function calls (apply) can run again")
            else:
                plans.append((old, new, stored))
        if problems:
            raise ValueError("cannot resubmit " + "; ".join(problems))
        for old, new, stored in plans:
            self.ops.resubmit(client, stored, new)
            self.hub.resubmitted(old, new)
        return {"resubmitted": {old: new for old, new, _ in plans}}, []


def _encoded(reply: Reply) -> Reply:
    """A reply with its content already JSON (built off the loop, sent as is). A long list
    is encoded an item at a time: the reader thread then lets the loop take the GIL in
    between, where one call encoding megabytes would hold it throughout."""
    content, buffers = reply
    if not isinstance(content, dict):
        return content, buffers
    content.setdefault("status", "ok")
    parts = []
    for key, value in content.items():
        if isinstance(value, list) and len(value) > 100:
            encoded = b"[" + b",".join(dumps_json(item) for item in value) + b"]"
        elif isinstance(value, dict) and len(value) > 100:
            encoded = (
                b"{"
                + b",".join(dumps_json(k) + b":" + dumps_json(v) for k, v in value.items())
                + b"}"
            )
        else:
            encoded = dumps_json(value)
        parts.append(dumps_json(key) + b":" + encoded)
    return b"{" + b",".join(parts) + b"}", buffers


def _result_part(record: TaskRecord) -> tuple[dict[str, Any], list[Any]]:
    return record.summary(), record.reply_frames() if record.reply is not None else []


def _results(
    parts: dict[str, tuple[dict[str, Any], list[Any]] | None], found: Mapping[str, TaskRecord]
) -> Reply:
    """The reply to a result request: each task's summary and reply frames, from memory
    (``parts``, None where memory has none) or else from the file (``found``, also where
    memory has the record without its reply)."""
    summaries: dict[str, Any] = {}
    counts: dict[str, int] = {}
    buffers: list[Any] = []
    for msg_id, part in parts.items():
        record = found.get(msg_id)
        if record is not None and (part is None or not part[1]):
            part = _result_part(record)
        if part is None:
            summaries[msg_id] = None
            continue
        summaries[msg_id], frames = part
        if frames:
            counts[msg_id] = len(frames)
            buffers.extend(frames)
    return {"records": summaries, "frame_counts": counts}, buffers


def _db_reply(rows: list[dict[str, Any]], cut: bool) -> Reply:
    """(``cut``: the file left rows out, past :data:`MAX_DB_BYTES`.)"""
    buffers: list[Any] = []
    records: list[dict[str, Any]] = []
    weight = 0
    for row in rows[:MAX_DB_RECORDS]:
        row = dict(row)
        weight += sum(len(f) for k in ("buffers", "result_buffers") for f in row.get(k) or ())
        if weight > MAX_DB_BYTES and records:
            cut = True
            break
        for key in DATE_KEYS:
            if isinstance(row.get(key), (int, float)):
                row[key] = _iso(row[key])
        for key in ("buffers", "result_buffers"):
            frames = row.get(key)
            if frames is not None:
                row[key] = {"frames": list(range(len(buffers), len(buffers) + len(frames)))}
                buffers.extend(frames)
        records.append(row)
    return {"records": records, "truncated": cut or len(rows) > MAX_DB_RECORDS}, buffers
