"""The Client: a connection to one cluster's controller."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal as _signal
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernel_engine import protocol, serialize
from kernel_engine.errors import (
    REMOTE_ERROR_CLASSES,
    EngineError,
    InvalidTarget,
    NoEnginesRegistered,
    RemoteError,
)

from ._asyncresult import AsyncResult, MessageFuture
from ._dependency import msg_ids_of
from ._io import IOThread
from ._metadata import ExecuteReply, Metadata
from ._paths import find_connection_file

ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION

_current: Client | None = None


def current_client() -> Client | None:
    """The most recently connected client (what ``%px`` uses by default)."""
    return _current


class Client:
    """A connection to a cluster: engines, views, results.

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
        global _current
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
        self._io = IOThread(self._info, self._on_reply, self._on_iopub, self._on_controller_lost)
        self._io.on_tick = self._finish_idle_stragglers
        try:
            reply = self._hub_request(protocol.CONNECT_REQUEST, {}, timeout=timeout)
        except TimeoutError:
            self.close()
            raise TimeoutError(
                f"the controller at {self._info['ip']}:{self._info['client_port']} did not "
                f"answer within {timeout} s (connection file {self.connection_file})"
            ) from None
        self._engines = {int(k): v for k, v in reply["engines"].items()}
        self._await_iopub(timeout)
        _current = self

    def _await_iopub(self, timeout: float | None) -> None:
        """Return once this client's iopub subscription receives (so no output is missed).

        A zmq subscription takes effect a little after connecting; until then the engines'
        output and status messages would be dropped. Each connect request makes the
        controller publish a welcome; we repeat it until one arrives.
        """
        import time

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

    def __getitem__(self, key: Any) -> Any:
        """``rc[0]``, ``rc[-1]``, ``rc[::2]``, ``rc[0, 1]``, ``rc[:]``: DirectViews."""
        from ._views import DirectView

        ids = self.ids
        if not ids:
            raise NoEnginesRegistered("the cluster has no engines")
        if isinstance(key, int):
            try:
                return DirectView(self, ids[key] if key < 0 else self._build_targets(key)[0])
            except IndexError:
                raise InvalidTarget(f"no engine at index {key}; ids are {ids}") from None
        if isinstance(key, slice):
            return DirectView(self, ids[key])
        if isinstance(key, (tuple, list, range)):
            return DirectView(self, self._build_targets(list(key)))
        raise TypeError(f"engines are indexed by int, slice or ids, not {type(key).__name__}")

    def direct_view(self, targets: Any = "all") -> Any:
        """A DirectView; ``targets='all'`` follows engines as they come and go."""
        from ._views import DirectView

        return DirectView(self, targets)

    def load_balanced_view(self, targets: Any = None) -> Any:
        """A LoadBalancedView over ``targets`` (None: all engines)."""
        from ._lbview import LoadBalancedView

        return LoadBalancedView(self, targets)

    def executor(self, targets: Any = None) -> Any:
        """A ``concurrent.futures.Executor`` over a load-balanced view."""
        return self.load_balanced_view(targets).executor

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
        header, frames = self.wire.pack(msg_type, content, None, metadata, buffers, idents=[route])
        msg_id = header["msg_id"]
        md = self._new_metadata(header, engine_id, **(md_extra or {}))
        future = MessageFuture(msg_id, md, kind=kind)
        self._futures[msg_id] = future
        if kind != "hub":
            self.metadata[msg_id] = md
            self.outstanding.add(msg_id)
            self.history.append(msg_id)
        future.tracker = self._io.send(frames, track=track)
        return future

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
        msg = self.wire.unpack(frames[2:])
        msg_id = msg.parent_header.get("msg_id", "")
        future = self._futures.get(msg_id)
        if future is None:
            return
        if future.kind == "hub":
            self._futures.pop(msg_id, None)
            content = msg.content
            content["_buffers"] = msg.buffers
            future.set_result(content)
            return
        md = future.metadata
        md["received"] = datetime.now(timezone.utc)
        md.update_from_reply(msg.metadata)
        if route != protocol.HUB_ROUTE and md.get("engine_id") is None:
            md["engine_id"] = int(route)
        outcome = self._outcome(msg, md, msg_id)
        md["status"] = "ok" if outcome[0] else "error"
        future.outcome = outcome
        future.reply_seen = True
        if future.idle_seen:
            self._resolve(future)

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

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """An AsyncResult for earlier work: history indices, msg_ids or AsyncResults.

        Work this client submitted resolves as usual; work another client submitted
        comes from the controller's records (an :class:`AsyncHubResult`).
        """
        from ._asyncresult import AsyncHubResult

        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        items = (
            indices_or_msg_ids
            if isinstance(indices_or_msg_ids, (list, tuple))
            else [indices_or_msg_ids]
        )
        msg_ids: list[str] = []
        for item in items:
            if isinstance(item, int):
                msg_ids.append(self.history[item])
            elif isinstance(item, AsyncResult):
                msg_ids.extend(item.msg_ids)
            else:
                msg_ids.append(str(item))
        single = len(msg_ids) == 1
        local = [self._local_future(m) for m in msg_ids]
        if all(f is not None for f in local):
            ar = AsyncResult(self, [f for f in local if f is not None], "get_result", single=single)
        else:
            ar = AsyncHubResult(self, msg_ids, single=single)
        return ar.get() if block else ar

    def _local_future(self, msg_id: str) -> MessageFuture | None:
        future = self._futures.get(msg_id)
        if future is not None:
            return future
        if msg_id not in self.results:
            return None
        value = self.results[msg_id]
        done = MessageFuture(msg_id, self.metadata.get(msg_id) or Metadata(msg_id=msg_id))
        if isinstance(value, BaseException):
            done.set_exception(value)
        else:
            done.set_result(value)
        return done

    def _fetch_records(self, msg_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], Any]]:
        """The controller's records of these tasks, with their outcome when stored."""
        reply = self._hub_request(protocol.RESULT_REQUEST, {"msg_ids": list(msg_ids)})
        frames = list(reply["_buffers"])
        out: dict[str, tuple[dict[str, Any], Any]] = {}
        for msg_id, record in reply["records"].items():
            if record is None:
                continue
            outcome = None
            n = reply["frame_counts"].get(msg_id)
            if n:
                part, frames = frames[:n], frames[n:]
                msg = self.wire.unpack(part)
                md = Metadata(msg_id=msg_id, engine_id=record.get("engine_id"))
                md.update_from_reply(msg.metadata)
                outcome = (self._outcome(msg, md, msg_id), md)
            out[msg_id] = (record, outcome)
        return out

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
        elif msg.msg_type == protocol.ENGINE_UNREGISTERED:
            eid = int(content["engine_id"])
            self._engines.pop(eid, None)
            self._dead[eid] = content.get("reason", "")
            self._fail_waiting_for(eid, content.get("reason", f"engine {eid} died"))
        elif msg.msg_type == protocol.IOPUB_WELCOME:
            self._welcomed.set()
        elif msg.msg_type == protocol.CONTROLLER_STOPPING:
            self._on_controller_lost("the controller stopped")

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
            self._resolve(future)

    # ----- waiting

    def _wait_futures(
        self, futures: Iterable[Any], timeout: float | None, first: bool = False
    ) -> bool:
        futures = list(futures)
        done, not_done = concurrent.futures.wait(
            futures, timeout, FIRST_COMPLETED if first else ALL_COMPLETED
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
        from ._progress import wait_futures_with_progress

        wait_futures_with_progress(self._futures_for(jobs), interval, timeout)

    def spin(self) -> None:
        """Kept for IPython Parallel compatibility: results arrive on the IO thread."""

    def wait_for_engines(self, n: int, timeout: float | None = 60.0) -> None:
        """Wait until at least ``n`` engines are ready."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._engines) < n:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._engines)} of {n} engines ready after {timeout} s")
            time.sleep(0.02)

    def wait_for_engines_ready(self, ids: Sequence[int], timeout: float | None = 60.0) -> None:
        """Wait until engines ``ids`` are ready; raise ClusterError if one dies starting."""
        import time

        from kernel_engine.errors import ClusterError

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

    # ----- controller requests

    def abort(self, jobs: Any = None, targets: Any = None, block: bool = True) -> None:
        """Do not run these tasks (msg_ids or AsyncResults; default: all outstanding)."""
        msg_ids = list(self.outstanding) if jobs is None else msg_ids_of(jobs)
        content = {
            "msg_ids": msg_ids,
            "targets": None if targets is None else self._build_targets(targets),
        }
        if block:
            self._hub_request(protocol.ABORT_REQUEST, content)
        else:
            self._send(protocol.HUB_ROUTE, protocol.ABORT_REQUEST, content, kind="hub")

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict[Any, Any]:
        """Per engine: requests queued or running (``queue``), ``completed``, ``tasks``."""
        ids = None if targets is None else self._build_targets(targets)
        status = self._hub_request(protocol.QUEUE_REQUEST, {"targets": ids})["queue_status"]
        out: dict[Any, Any] = {}
        for key, value in status.items():
            out[int(key) if key.isdigit() else key] = value
        if isinstance(targets, int):
            return dict(out[targets])
        return out

    def send_signal(self, sig: int, targets: Any = None, block: bool = True) -> None:
        """Send a signal to engines' processes (``SIGINT`` interrupts running work)."""
        content = {"signum": int(sig), "targets": self._build_targets(targets)}
        if block:
            self._hub_request(protocol.SIGNAL_REQUEST, content)
        else:
            self._send(protocol.HUB_ROUTE, protocol.SIGNAL_REQUEST, content, kind="hub")

    def _interrupt_tasks(self, msg_ids: list[str]) -> list[int]:
        """SIGINT the engines running these requests (wherever the scheduler put them)."""
        content = {"signum": int(_signal.SIGINT), "msg_ids": list(msg_ids)}
        targets: list[int] = self._hub_request(protocol.SIGNAL_REQUEST, content, timeout=10)[
            "targets"
        ]
        return targets

    def interrupt(self, targets: Any = None) -> None:
        """Interrupt what the engines are running (SIGINT through their kernel managers)."""
        self.send_signal(_signal.SIGINT, targets)

    def clear(self, targets: Any = None, block: bool = True) -> Any:
        """Remove every name from the engines' namespaces."""
        return self.direct_view(self._build_targets(targets)).clear(block=block)

    def shutdown(self, targets: Any = "all", hub: bool = False, block: bool = True) -> None:
        """Stop engines (and with ``hub=True`` the controller and every engine)."""
        ids = self._build_targets(targets) if self._engines else []
        content = {"targets": ids, "hub": hub}
        if block:
            self._hub_request(protocol.SHUTDOWN_REQUEST, content, timeout=60)
        else:
            self._send(protocol.HUB_ROUTE, protocol.SHUTDOWN_REQUEST, content, kind="hub")

    def hub_history(self) -> list[str]:
        """Every msg_id the controller has a record of, oldest first."""
        return list(self._hub_request(protocol.HISTORY_REQUEST, {})["history"])

    def db_query(self, query: dict[str, Any], keys: Sequence[str] | None = None) -> list[Any]:
        """The controller's task records whose fields equal ``query``'s values."""
        records = self._hub_request(protocol.DB_REQUEST, {"query": query})["records"]
        if keys is not None:
            records = [{k: r.get(k) for k in keys} for r in records]
        return list(records)

    def result_status(self, msg_ids: Sequence[str]) -> dict[str, Any]:
        """The controller's records of these tasks (``pending``, ``completed``)."""
        records = self._hub_request(protocol.RESULT_REQUEST, {"msg_ids": list(msg_ids)})["records"]
        status: dict[str, Any] = {"pending": [], "completed": []}
        for msg_id, record in records.items():
            done = record is not None and record["status"] != "pending"
            status["completed" if done else "pending"].append(msg_id)
        return status

    def purge_local_results(self, jobs: Any = "all") -> None:
        """Forget finished results held by this client."""
        if jobs == "all":
            done = [m for m in self.results if m not in self.outstanding]
        else:
            done = [j for j in msg_ids_of(jobs) if j not in self.outstanding]
        for msg_id in done:
            self.results.pop(msg_id, None)
            self.metadata.pop(msg_id, None)

    def purge_hub_results(self, jobs: Any = "all", targets: Any = None) -> int:
        """Forget finished task records on the controller; returns how many."""
        content = {
            "msg_ids": "all" if jobs == "all" else msg_ids_of(jobs),
            "engine_ids": None if targets is None else self._build_targets(targets),
        }
        return int(self._hub_request(protocol.PURGE_REQUEST, content)["purged"])

    def purge_results(self, jobs: Any = "all", targets: Any = None) -> None:
        """Forget finished results here and on the controller."""
        self.purge_local_results(jobs)
        self.purge_hub_results(jobs, targets)

    # ----- integrations

    def become_dask(
        self,
        targets: Any = "all",
        port: int = 0,
        nanny: bool = False,
        scheduler_args: dict[str, Any] | None = None,
        **worker_args: Any,
    ) -> Any:
        """Make the engines a dask.distributed cluster; returns a ``distributed.Client``.

        The scheduler runs in the first target engine, a worker in every target engine.
        """
        from .integrations.dask import become_dask

        return become_dask(self, targets, port, nanny, scheduler_args, **worker_args)

    def stop_dask(self, targets: Any = None) -> None:
        """Stop the dask scheduler and workers that ``become_dask`` started."""
        from .integrations.dask import stop_dask

        stop_dask(self, targets)

    # ----- lifetime

    def close(self) -> None:
        """Stop the IO thread and close the sockets (the cluster keeps running)."""
        global _current
        if self._closed:
            return
        self._closed = True
        self._io.stop()
        if _current is self:
            _current = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client cluster={self.cluster_id!r} engines={self.ids}>"

    def _repr_html_(self) -> str:
        from ._reprs import client_html

        return client_html(self)
