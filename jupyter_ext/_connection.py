"""A connection to one cluster: sockets, sending, receiving, and the futures of requests.

:class:`Connection` is the machinery under :class:`jupyter_ext.Client` (which adds the
requests to the controller): it sends requests on the path each takes (the controller, or
an engine's task lane, :mod:`._lanes`) in the order :mod:`._order` keeps, and resolves
their futures from what the IO thread (:mod:`._io`) receives.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import zmq

from kernel_engine import protocol, serialize
from kernel_engine.errors import (
    REMOTE_ERROR_CLASSES,
    ClusterError,
    EngineError,
    InvalidTarget,
    NoEnginesRegistered,
    RemoteError,
)

from ._asyncresult import AsyncResult, MessageFuture
from ._io import IOThread, process_alive
from ._metadata import ExecuteReply, Metadata
from ._order import EngineOrder
from ._paths import find_connection_file
from ._progress import wait_futures_with_progress

current: Connection | None = None
"""The connection most recently made in this process and still open."""


class Connection:
    """A connection to a cluster: engines, views, results (see :class:`jupyter_ext.Client`).

    Parameters
    ----------
    connection_file
        The cluster's ``client.json`` (or a cluster id); by default the newest running
        cluster's.
    timeout
        Seconds to wait for the controller to answer the first request.
    max_results
        How many finished tasks' results and metadata ``results``/``metadata`` keep; the
        oldest go first (AsyncResults keep their own), so memory stays bounded.
    """

    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        timeout: float | None = 10.0,
        max_results: int = 100_000,
    ):
        global current
        path = find_connection_file(connection_file)
        self.connection_file = str(path)
        self._info: dict[str, Any] = json.loads(Path(path).read_text())
        self.cluster_id: str = self._info.get("cluster_id", "")
        self.wire = protocol.Wire(self._info["key"].encode(), username="client")
        self._futures: dict[str, MessageFuture] = {}
        self.outstanding: set[str] = set()
        self.history: list[str] = []
        self.results: dict[str, Any] = {}
        self.metadata: dict[str, Metadata] = {}
        self.max_results = max_results
        self._engines: dict[int, dict[str, Any]] = {}
        self._dead: dict[int, str] = {}
        self._iopub_handlers: list[Any] = []
        self._closed = False
        self._welcomed = threading.Event()
        self._dask: tuple[str, list[int]] | None = None
        self._io = IOThread(
            self._info, self.wire, self._on_reply, self._on_iopub, self._on_controller_lost
        )
        self._io.on_tick = self._tick
        self._order = EngineOrder(self._path_of)
        try:
            reply = self._hub_request(protocol.CONNECT_REQUEST, {}, timeout=timeout)
        except TimeoutError:
            self.close()
            raise TimeoutError(
                f"the controller at {self._info['ip']}:{self._info['client_port']} did not "
                f"answer within {timeout} s (connection file {self.connection_file})"
            ) from None
        self._engines = {int(k): v for k, v in reply["engines"].items()}
        lanes = self._io.lanes
        if lanes is not None:
            known = list(self._engines.values())
            self._io.call_soon(lambda: lanes.add_engines(known))
        self._await_iopub(timeout)
        current = self

    def _await_iopub(self, timeout: float | None) -> None:
        """Return once this client's iopub subscription receives (so no output is missed).

        A zmq subscription takes effect a little after connecting; until then the engines'
        output and status messages would be dropped. Each connect request makes the
        controller publish a welcome; we repeat it until one arrives.
        """

        deadline = time.monotonic() + (timeout or 10.0)
        while not self._welcomed.wait(0.05):
            if time.monotonic() > deadline:
                raise TimeoutError("no message from the controller's iopub socket")
            self._send(protocol.HUB_ROUTE, protocol.CONNECT_REQUEST, {}, kind="hub")

    # ----- engines and views

    @property
    def ids(self) -> list[int]:
        """The ids of the engines that are ready, sorted."""
        return sorted(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def engine_info(self, engine_id: int) -> dict[str, Any]:
        """``pid``, ``hostname``, ``uuid`` and ``connection_info`` of one engine.

        ``connection_info`` is the engine kernel's Jupyter connection info (with the
        cluster key), so any Jupyter client can attach to the engine.
        """
        try:
            info = dict(self._engines[engine_id])
        except KeyError:
            raise InvalidTarget(f"no engine with id {engine_id}; ids are {self.ids}") from None
        conn = dict(info["connection_info"])
        conn["key"] = self.wire.key.decode()
        info["connection_info"] = conn
        return info

    def _build_targets(self, targets: Any) -> list[int]:
        """Engine ids for ``targets``: None/'all', an id, a slice, or ids."""
        ids = self.ids
        if targets is None or targets == "all":
            if not ids:
                raise NoEnginesRegistered("the cluster has no engines")
            return ids
        if isinstance(targets, slice):
            return ids[targets]
        if isinstance(targets, int):
            targets = [targets]
        out = []
        for t in targets:
            if isinstance(t, int) and t in self._dead and t not in self._engines:
                raise EngineError("EngineError", self._dead[t], None, {"engine_id": t})
            if not isinstance(t, int) or t not in self._engines:
                raise InvalidTarget(f"no engine with id {t!r}; ids are {ids}")
            out.append(t)
        return out

    # ----- sending

    def _new_metadata(
        self, header: dict[str, Any], engine_id: int | None, **extra: Any
    ) -> Metadata:
        md = Metadata(
            msg_id=header["msg_id"],
            submitted=datetime.now(timezone.utc),
            engine_id=engine_id,
            **extra,
        )
        return md

    def _send(
        self,
        route: bytes,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: Sequence[Any] = (),
        metadata: dict[str, Any] | bytes | None = None,
        engine_id: int | None = None,
        track: bool = False,
        kind: str = "apply",
        md_extra: dict[str, Any] | None = None,
    ) -> MessageFuture:
        if self._closed:
            raise RuntimeError("this Client is closed")
        if self._io.lost:
            raise EngineError("EngineError", self._io.lost)
        header, frames = self.wire.pack(msg_type, content, None, metadata, buffers)
        msg_id = header["msg_id"]
        md = self._new_metadata(header, engine_id, **(md_extra or {}))
        future = MessageFuture(msg_id, md, kind=kind)
        self._futures[msg_id] = future
        if kind != "hub":
            self.metadata[msg_id] = md
            self.outstanding.add(msg_id)
            self.history.append(msg_id)
        if engine_id is not None and kind != "hub":
            channel = route.split(b":", 1)[0].decode()
            if channel in ("lane", "shell"):
                future.pending = (route, frames, track, header)
                path = self._order.admit(engine_id, msg_id, channel)
                if path is None:  # waits for requests on another path to this engine
                    future.unsent = threading.Event()
                else:
                    self._dispatch(future, path)
                return future
        future.tracker = self._io.send([route, *frames], track=track)
        return future

    def _dispatch(self, future: MessageFuture, path: str) -> None:
        """Send a request admitted by the engine order, on its path (any thread)."""
        assert future.pending is not None
        route, frames, track, header = future.pending
        future.pending = None
        try:
            if path != "direct":
                future.tracker = self._io.send([route, *frames], track=track)
                return
            eid = future.metadata["engine_id"]
            lanes = self._io.lanes
            lane = lanes.start(eid, header, future.metadata.get("label")) if lanes else None
            try:
                if lane is None:
                    raise zmq.ZMQError(msg="no lane")
                future.tracker = self._io.send(frames, track=track, lane=lane)
            except zmq.ZMQError:  # the lane closed under us: its engine just died
                reason = self._dead.get(eid) or f"engine {eid} is gone"
                self._fail_engine_requests(eid, reason)
                self._fail_request(future.msg_id, reason)
        finally:
            if future.unsent is not None:
                future.unsent.set()

    def _release(self, msg_id: str) -> None:
        """``msg_id`` was answered: send what waited for it (see :mod:`._order`)."""
        self._order.done(msg_id, self._send_released)

    def _send_released(self, msg_id: str, path: str) -> bool:
        future = self._futures.get(msg_id)
        if future is None or future.pending is None:
            return False  # failed meanwhile (a lost controller)
        self._dispatch(future, path)
        return True

    def _path_of(self, eid: int, channel: str) -> str:
        if channel == "shell":
            return "shell"
        lanes = self._io.lanes
        return "direct" if lanes is not None and lanes.usable(eid) else "routed"

    def _hub_request(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float | None = 30.0,
    ) -> dict[str, Any]:
        future = self._send(protocol.HUB_ROUTE, msg_type, content, kind="hub")
        try:
            reply: dict[str, Any] = future.result(timeout)
        except concurrent.futures.TimeoutError:
            self._futures.pop(future.msg_id, None)
            raise TimeoutError(f"the controller did not answer {msg_type} in {timeout} s") from None
        return reply

    # ----- receiving (on the IO thread)

    def _on_reply(self, frames: list[Any]) -> None:
        route = frames[0].bytes
        if route == protocol.DELIM:  # straight from an engine's lane
            self._on_lane_reply(frames)
            return
        msg = self.wire.unpack(frames[2:])
        msg_id = msg.parent_header.get("msg_id", "")
        self._release(msg_id)
        future = self._futures.get(msg_id)
        if future is None:
            return
        if future.kind == "hub":
            self._futures.pop(msg_id, None)
            content = msg.content
            content["_buffers"] = msg.buffers
            future.set_result(content)
            return
        if route != protocol.HUB_ROUTE and future.metadata.get("engine_id") is None:
            future.metadata["engine_id"] = int(route)
        self._take_reply(future, msg, msg.metadata)

    def _take_reply(
        self, future: MessageFuture, msg: protocol.Message, reply_md: dict[str, Any]
    ) -> None:
        """An engine's reply to ``future``'s request: its metadata and outcome."""
        md = future.metadata
        md["received"] = datetime.now(timezone.utc)
        md.update_from_reply(reply_md)
        future.outcome = outcome = self._outcome(msg, md, future.msg_id)
        md["status"] = "ok" if outcome[0] else "error"
        future.reply_seen = True
        if future.idle_seen:
            self._resolve(future)

    def _on_lane_reply(self, frames: list[Any]) -> None:
        lanes = self._io.lanes
        assert lanes is not None
        msg = self.wire.unpack(frames[1:])
        msg_id = msg.parent_header.get("msg_id", "")
        if msg.msg_type == protocol.LANE_PING_REPLY:
            lanes.on_ping_reply(msg_id)
            return
        reply_md = msg.metadata
        lanes.direct_done(msg_id, reply_md, frames[1:])
        self._release(msg_id)
        future = self._futures.get(msg_id)
        if future is not None:
            self._take_reply(future, msg, reply_md)

    def _fail_engine_requests(self, eid: int, reason: str) -> None:
        """An engine is gone: fail this client's requests sent to its lane or waiting to be
        sent to it (the controller fails those it routed)."""
        lanes = self._io.lanes
        if lanes is not None:
            for msg_id in lanes.remove_engine(eid):
                lanes.direct_done(msg_id, {"status": "error"})
                self._fail_request(msg_id, reason)
        for msg_id in self._order.forget_engine(eid):
            self._fail_request(msg_id, reason)

    def _fail_request(self, msg_id: str, reason: str) -> None:
        future = self._futures.get(msg_id)
        if future is None or future.done():
            return
        future.pending = None
        md = future.metadata
        md["status"] = "error"
        content = protocol.error_content("EngineError", reason)
        future.outcome = (False, self._error(content, md, msg_id))
        self._resolve(future)
        if future.unsent is not None:
            future.unsent.set()

    def _tick(self) -> None:
        """Every 0.5 s on the IO thread: late execute replies, silent lanes, dead engines."""
        self._finish_idle_stragglers()
        lanes = self._io.lanes
        if lanes is not None:
            for eid, reason in lanes.tick(time.monotonic(), process_alive):
                self._fail_engine_requests(eid, reason)

    def _outcome(self, msg: protocol.Message, md: Metadata, msg_id: str) -> tuple[bool, Any]:
        """(succeeded, result or error) of a reply."""
        content = msg.content
        if content.get("status") != "ok":
            return False, self._error(content, md, msg_id)
        if msg.msg_type != protocol.APPLY_REPLY:
            return True, ExecuteReply(msg_id, content, md)
        try:
            return True, serialize.loads(msg.buffers)
        except Exception as exc:
            info = {"engine_id": md["engine_id"], "msg_id": msg_id}
            return False, RemoteError(
                "SerializationError", f"could not load the result: {exc}", None, info
            )

    def _error(self, content: dict[str, Any], md: Metadata, msg_id: str) -> RemoteError:
        info = {
            "engine_id": md.get("engine_id"),
            "engine_uuid": md.get("engine_uuid"),
            "msg_id": msg_id,
        }
        cls = REMOTE_ERROR_CLASSES.get(content.get("px_error", ""), RemoteError)
        err = cls(
            content.get("ename", "Error"),
            content.get("evalue", ""),
            content.get("traceback", []),
            info,
        )
        md["error"] = err
        return err

    def _resolve(self, future: MessageFuture) -> None:
        msg_id = future.msg_id
        self._futures.pop(msg_id, None)
        self.outstanding.discard(msg_id)
        ok, value = future.outcome or (False, EngineError("EngineError", "no reply"))
        self.results[msg_id] = value
        if len(self.results) > self.max_results:
            self._trim()
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _trim(self) -> None:
        while len(self.results) > self.max_results:
            oldest = next(iter(self.results))
            self.results.pop(oldest, None)
            self.metadata.pop(oldest, None)

    def _on_iopub(self, frames: list[Any]) -> None:
        topic = frames[0].bytes
        if len(frames) < 7:
            return  # not a Jupyter message (ipykernel's XPUB welcome, say)
        msg = self.wire.unpack(frames[2:])
        if topic == protocol.EVENT_TOPIC:
            self._on_event(msg)
            return
        try:
            engine_id = int(topic.rsplit(b".", 1)[1])
        except (IndexError, ValueError):
            return
        msg_id = msg.parent_header.get("msg_id", "")
        future = self._futures.get(msg_id)
        for handler in list(self._iopub_handlers):
            handler(engine_id, msg)
        if future is None:
            return
        md = future.metadata
        msg_type, content = msg.msg_type, msg.content
        if msg_type == "stream" and (future.kind == "execute" or not future.reply_seen):
            name = content.get("name", "stdout")
            md[name] = md.get(name, "") + content.get("text", "")
        elif msg_type in ("display_data", "update_display_data"):
            md["outputs"] = [*md["outputs"], content]
        elif msg_type == "execute_result":
            md["execute_result"] = content
        elif msg_type == "execute_input":
            md["execute_input"] = content.get("code")
        elif msg_type == "error":
            md["error"] = content
        elif msg_type == "status" and content.get("execution_state") == "idle":
            future.idle_seen = True
            if future.reply_seen:
                self._resolve(future)

    def _on_event(self, msg: protocol.Message) -> None:
        content = msg.content
        if msg.msg_type == protocol.ENGINE_REGISTERED:
            info = content["engine"]
            self._engines[int(info["id"])] = info
            if self._io.lanes is not None:
                self._io.lanes.add_engine(info)
        elif msg.msg_type == protocol.ENGINE_UNREGISTERED:
            eid = int(content["engine_id"])
            self._engine_gone(eid, content.get("reason") or f"engine {eid} died")
        elif msg.msg_type == protocol.IOPUB_WELCOME:
            self._welcomed.set()
        elif msg.msg_type == protocol.CONTROLLER_STOPPING:
            self._on_controller_lost("the controller stopped")

    def _engine_gone(self, eid: int, reason: str) -> None:
        """An engine left the cluster (IO thread; a second call changes nothing)."""
        self._engines.pop(eid, None)
        self._dead[eid] = reason
        self._fail_waiting_for(eid, reason)
        self._fail_engine_requests(eid, reason.splitlines()[0])

    def _engines_gone(self, reasons: dict[int, str], timeout: float = 10.0) -> None:
        """Apply what the controller said of engines it stopped now, not when its event
        arrives (any thread; returns once the IO thread has done it)."""
        done = threading.Event()

        def apply() -> None:
            for eid, reason in reasons.items():
                self._engine_gone(eid, reason)
            done.set()

        self._io.call_soon(apply)
        done.wait(timeout)

    def _finish_idle_stragglers(self) -> None:
        """Execute replies whose idle status never came (lost iopub) finish after 2 s."""
        now = datetime.now(timezone.utc)
        for future in list(self._futures.values()):
            received = future.metadata.get("received")
            late = received is not None and (now - received).total_seconds() > 2.0
            if future.reply_seen and not future.idle_seen and late:
                future.idle_seen = True
                self._resolve(future)

    def _fail_waiting_for(self, eid: int, reason: str) -> None:
        """Execute requests whose reply came but whose idle never will (engine died)."""
        for future in list(self._futures.values()):
            if future.reply_seen and future.metadata.get("engine_id") == eid:
                future.idle_seen = True
                self._resolve(future)

    def _on_controller_lost(self, reason: str) -> None:
        for future in list(self._futures.values()):
            if future.kind == "hub":
                self._futures.pop(future.msg_id, None)
                if not future.done():
                    future.set_exception(EngineError("EngineError", reason))
                continue
            if future.outcome is None:
                future.outcome = (
                    False,
                    EngineError("EngineError", reason, None, {"msg_id": future.msg_id}),
                )
            future.pending = None
            self._resolve(future)
            if future.unsent is not None:
                future.unsent.set()

    # ----- waiting

    def _wait_futures(
        self, futures: Iterable[Any], timeout: float | None, first: bool = False
    ) -> bool:
        futures = list(futures)
        done, not_done = concurrent.futures.wait(
            futures,
            timeout,
            concurrent.futures.FIRST_COMPLETED if first else concurrent.futures.ALL_COMPLETED,
        )
        return not not_done if not first else bool(done)

    def _futures_for(self, jobs: Any) -> list[concurrent.futures.Future]:  # type: ignore[type-arg]
        if jobs is None:
            jobs = list(self.outstanding)
        if isinstance(jobs, (str, AsyncResult)):
            jobs = [jobs]
        out: list[concurrent.futures.Future] = []  # type: ignore[type-arg]
        for job in jobs:
            if isinstance(job, concurrent.futures.Future):
                out.append(job)
            elif isinstance(job, str):
                f = self._futures.get(job)
                if f is not None:
                    out.append(f)
            else:
                raise TypeError(f"cannot wait for {type(job).__name__}")
        return out

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for msg_ids or AsyncResults (default: everything outstanding).

        Returns whether they are all done; never raises on timeout.
        """
        return self._wait_futures(self._futures_for(jobs), timeout)

    def wait_interactive(
        self, jobs: Any = None, interval: float = 0.1, timeout: float | None = None
    ) -> None:
        """Wait with a progress display for outstanding work (or ``jobs``)."""
        wait_futures_with_progress(self._futures_for(jobs), interval, timeout)

    def spin(self) -> None:
        """Kept for IPython Parallel compatibility: results arrive on the IO thread."""

    def wait_for_engines(self, n: int, timeout: float | None = 60.0) -> None:
        """Wait until at least ``n`` engines are ready."""

        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._engines) < n:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._engines)} of {n} engines ready after {timeout} s")
            time.sleep(0.02)

    def wait_for_engines_ready(self, ids: Sequence[int], timeout: float | None = 60.0) -> None:
        """Wait until engines ``ids`` are ready; raise ClusterError if one dies starting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            dead = [i for i in ids if i in self._dead]
            if dead:
                raise ClusterError(f"engine {dead[0]} failed to start: {self._dead[dead[0]]}")
            if all(i in self._engines for i in ids):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"engines {list(ids)} not ready after {timeout} s")
            time.sleep(0.02)

    # ----- lifetime

    def close(self) -> None:
        """Stop the IO thread and close the sockets (the cluster keeps running)."""
        global current
        if self._closed:
            return
        self._closed = True
        if current is self:
            current = None
        self._io.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client cluster={self.cluster_id!r} engines={self.ids}>"
