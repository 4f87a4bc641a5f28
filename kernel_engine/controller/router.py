"""Routing: clients' requests to engines, engines' replies and iopub back to clients.

This is the one place that decides where a message goes, so a later direct path (clients
talking to engines' lanes themselves) replaces this module only.
"""

from __future__ import annotations

import json
import logging
import signal
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol

from .engines import Engine, Pending

if TYPE_CHECKING:
    from .app import Controller

log = logging.getLogger("kernel_engine.controller")


class Router:
    """Forwards frames between the client socket and engine sockets."""

    def __init__(self, controller: Controller):
        self.c = controller
        self.wire = controller.wire
        self.handlers = {
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

    def from_client(self, frames: list[Any]) -> None:
        """A client's request: ``[client, route, DELIM, signature, header, ...]``."""
        if len(frames) < 8 or frames[2].bytes != protocol.DELIM:
            log.error("dropped a malformed client message (%i frames)", len(frames))
            return
        client = protocol.reply_identity(frames[0].bytes)
        try:
            msg = self.wire.unpack(frames[3:])
            channel, eid = protocol.parse_route(frames[1].bytes)
        except Exception as exc:
            log.error("dropped a client message: %s", exc)
            return
        if channel == "hub":
            if msg.msg_type == protocol.DIRECT_NOTICE:
                self._direct_notice(client, msg)
            else:
                self._hub_request(client, msg)
            return
        if channel == "lb":
            self.c.balancer.submit(client, msg, frames[3:])
            return
        pending = Pending(client, msg.header, channel)
        engine = self.c.engines.engines.get(eid) if eid is not None else None
        if engine is None or engine.state != "ready" or channel not in protocol.CHANNELS:
            if eid in self.c.dead:
                why = ("EngineError", self.c.dead[eid])
            else:
                why = ("InvalidTarget", f"no engine with id {eid} (channel {channel!r})")
            self._send_client(self._fail(pending, eid, *why))
            return
        engine.inflight[msg.msg_id] = pending
        self.c.hub.submitted(msg.header, client, engine.id)
        self.c.balancer.scheduler.note_known(msg.msg_id)
        engine.sockets[channel].send_multipart([client, protocol.DELIM, *frames[3:]], copy=False)

    def from_engine(self, engine: Engine, channel: str, frames: list[Any]) -> None:
        """An engine's reply: ``[client, DELIM, signature, header, parent, metadata, ...]``."""
        if protocol.is_batch(frames):
            for message in protocol.unpack_batch(frames):
                self.from_engine(engine, channel, message)
            return
        if len(frames) < 7 or frames[1].bytes != protocol.DELIM:
            log.error("dropped a malformed reply from engine %i", engine.id)
            return
        try:
            parent = json.loads(frames[4].bytes)
            metadata = json.loads(frames[5].bytes)
        except ValueError:
            log.error("dropped a reply with bad JSON from engine %i", engine.id)
            return
        msg_id = parent.get("msg_id", "")
        if engine.inflight.pop(msg_id, None) is not None:
            engine.completed += 1
        status = metadata.get("status") or "ok"
        balancer = self.c.balancer
        if balancer.owns(msg_id):
            if not balancer.reply(engine, msg_id, frames, metadata):
                return  # a retried attempt: the scheduler sent the task elsewhere
        elif channel != "control":
            balancer.record_direct(msg_id, engine.id, status == "ok")
        self.c.clients.send_multipart([frames[0], engine.route, *frames[1:]], copy=False)
        self.c.hub.completed(msg_id, status, metadata, frames[2:] if channel == "lane" else None)

    def _direct_notice(self, client: bytes, msg: protocol.Message) -> None:
        """A client's account of requests it sent to engines' lanes itself.

        Each submitted request becomes a hub record (and a valid dependency for the
        scheduler); each completed one gets its outcome and, when small, its reply frames,
        sliced out of the joined buffers.
        """
        engines = self.c.engines.engines
        content = msg.content
        for sub in content.get("submitted", []):
            eid = int(sub["engine_id"])
            header = {"msg_id": sub["msg_id"], "msg_type": sub["msg_type"], "date": sub["date"]}
            self.c.hub.submitted(header, client, eid, sub.get("label"))
            self.c.balancer.scheduler.note_known(sub["msg_id"])
            if eid in engines:
                engines[eid].direct.add(sub["msg_id"])
        blobs = iter(msg.buffers)
        for done in content.get("completed", []):
            msg_id, eid = done["msg_id"], done.get("engine_id")
            metadata = done.get("metadata") or {}
            status = metadata.get("status") or "error"
            frames = None
            sizes = done.get("sizes")
            if sizes:
                blob, frames, at = memoryview(next(blobs)), [], 0
                for size in sizes:
                    frames.append(blob[at : at + size])
                    at += size
            engine = engines.get(eid) if eid is not None else None
            if engine is not None and msg_id in engine.direct:
                engine.direct.discard(msg_id)
                engine.completed += 1
            if eid is not None:
                self.c.balancer.record_direct(msg_id, int(eid), status == "ok")
            self.c.hub.completed(msg_id, status, metadata, frames)

    def relay_iopub(self, engine: Engine, frames: list[Any]) -> None:
        """Re-publish an engine's iopub message, topic ``engine.<id>``."""
        self.c.iopub.send_multipart([f"engine.{engine.id}".encode(), *frames[1:]], copy=False)

    def publish_event(self, msg_type: str, content: dict[str, Any]) -> None:
        self.wire.send(self.c.iopub, msg_type, content, idents=[protocol.EVENT_TOPIC])

    def fail_inflight(self, engine: Engine, ename: str, evalue: str) -> None:
        """Answer every request an engine still held with an error (it died or stopped)."""
        pending = [p for m, p in engine.inflight.items() if not self.c.balancer.owns(m)]
        engine.inflight.clear()
        for p in pending:
            self.c.hub.completed(p.header.get("msg_id", ""), "error", {}, None)
            self._send_client(self._fail(p, engine.id, ename, evalue))

    def _fail(self, pending: Pending, eid: int | None, ename: str, evalue: str) -> list[Any]:
        return fail_reply(self.wire, pending, eid, ename, evalue)

    def _send_client(self, frames: list[Any]) -> None:
        self.c.clients.send_multipart(frames, copy=False)

    def _hub_request(self, client: bytes, msg: protocol.Message) -> None:
        handler = self.handlers.get(msg.msg_type)
        buffers: list[Any] = []
        if handler is None:
            content: dict[str, Any] = protocol.error_content(
                "ValueError", f"unknown controller request {msg.msg_type!r}"
            )
        else:
            try:
                content, buffers = handler(msg)
                content.setdefault("status", "ok")
            except Exception as exc:
                log.exception("controller request %s failed", msg.msg_type)
                content = protocol.error_content(type(exc).__name__, str(exc))
        reply_type = msg.msg_type.replace("_request", "_reply")
        self.wire.send(
            self.c.clients,
            reply_type,
            content,
            msg.header,
            buffers=buffers,
            idents=[client, protocol.HUB_ROUTE],
        )
        if msg.msg_type == protocol.SHUTDOWN_REQUEST and msg.content.get("hub"):
            self.c.loop.stop()

    def _targets(self, msg: protocol.Message) -> list[int]:
        targets = msg.content.get("targets")
        ready = self.c.engines.ready_ids()
        if targets is None or targets == "all":
            return ready
        if isinstance(targets, int):
            targets = [targets]
        missing = [t for t in targets if t not in self.c.engines.engines]
        if missing:
            raise ValueError(f"no engines with ids {missing}")
        return [int(t) for t in targets]

    def _connect(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        self.publish_event(protocol.IOPUB_WELCOME, {"token": msg.msg_id})
        engines = self.c.engines.engines
        return {
            "cluster_id": self.c.cluster_id,
            "engines": {str(e.id): e.info() for e in engines.values() if e.state == "ready"},
            "starting": sorted(e.id for e in engines.values() if e.state != "ready"),
            "dead": {str(k): v for k, v in self.c.dead.items()},
        }, []

    def _queue_status(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        status: dict[str, Any] = {}
        balanced = self.c.balancer.queue_status()
        for eid in self._targets(msg):
            engine = self.c.engines.engines[eid]
            tasks = balanced.get(str(eid), {})
            status[str(eid)] = {
                "queue": len(engine.inflight) + len(engine.direct),
                "completed": engine.completed,
                "tasks": tasks.get("tasks", 0) if isinstance(tasks, dict) else 0,
            }
        status["unassigned"] = balanced.get("unassigned", 0)
        return {"queue_status": status}, []

    def _result(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        records: dict[str, Any] = {}
        counts: dict[str, int] = {}
        buffers: list[Any] = []
        for msg_id in msg.content.get("msg_ids", []):
            record = self.c.hub.records.get(msg_id)
            if record is None:
                records[msg_id] = None
                continue
            records[msg_id] = record.summary()
            if record.reply is not None:
                counts[msg_id] = len(record.reply)
                buffers.extend(record.reply)
        return {"records": records, "frame_counts": counts}, buffers

    def _purge(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        content = msg.content
        msg_ids = content.get("msg_ids")
        if msg_ids == "all":
            msg_ids = None
        n = self.c.hub.purge(msg_ids, content.get("engine_ids"))
        if msg_ids:
            self.c.balancer.forget(msg_ids)
        return {"purged": n}, []

    def _abort(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        msg_ids = list(msg.content.get("msg_ids", []))
        self.c.balancer.abort(msg_ids)
        for eid in self._targets(msg):
            sock = self.c.engines.engines[eid].sockets.get("control")
            if sock is not None:
                self.wire.send(sock, protocol.ENGINE_ABORT_REQUEST, {"msg_ids": msg_ids})
        return {"msg_ids": msg_ids}, []

    def _signal(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        signum = int(msg.content.get("signum", signal.SIGINT))
        msg_ids = msg.content.get("msg_ids")
        if msg_ids is not None:  # the engines running (or holding) these requests
            wanted = set(msg_ids)
            engines = self.c.engines.engines
            held = {e.id for e in engines.values() if wanted & e.inflight.keys()}
            # a client names the engines of requests it sent to their lanes itself
            held.update(t for t in msg.content.get("targets") or () if t in engines)
            targets = sorted(held)
        else:
            targets = self._targets(msg)
        for eid in targets:
            self.c.engines.signal(eid, signum)
        return {"targets": targets}, []

    def _shutdown(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        targets = self._targets(msg)
        if msg.content.get("hub"):
            return {"targets": targets}, []
        self.c.stop_engines(targets, reason="was shut down by a client")
        return {"targets": targets, "reasons": {str(t): self.c.dead.get(t) for t in targets}}, []

    def _history(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        return {"history": self.c.hub.history()}, []

    def _db(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        return {"records": self.c.hub.query(dict(msg.content.get("query", {})))}, []

    def _start(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any]]:
        n = int(msg.content.get("n", 1))
        if n < 1:
            raise ValueError(f"cannot start {n} engines")
        return {"ids": self.c.start_engines(n)}, []


def fail_reply(
    wire: protocol.Wire,
    pending: Pending,
    engine_id: int | None,
    ename: str,
    evalue: str,
) -> list[Any]:
    """The frames of an error reply the controller makes for a request it cannot serve."""
    msg_type = pending.header.get("msg_type", "apply_request").replace("_request", "_reply")
    metadata = {
        "engine_id": engine_id,
        "status": "error",
        "completed": protocol.utcnow_iso(),
    }
    route = protocol.HUB_ROUTE if engine_id is None else str(engine_id).encode()
    content = protocol.error_content(ename, evalue)
    content["engine_info"] = {"engine_id": engine_id}
    return wire.pack(msg_type, content, pending.header, metadata, idents=[pending.client, route])[1]
