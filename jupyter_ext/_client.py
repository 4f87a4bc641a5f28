"""The Client: a connection to one cluster, and what it asks of the controller."""

from __future__ import annotations

import concurrent.futures
import signal as _signal
from collections.abc import Sequence
from typing import Any

from kernel_engine import protocol
from kernel_engine.errors import InvalidTarget, NoEnginesRegistered

from . import _connection
from ._asyncresult import AsyncHubResult, AsyncResult, MessageFuture
from ._connection import Connection
from ._dependency import msg_ids_of
from ._lbview import LoadBalancedView
from ._metadata import Metadata
from ._reprs import client_html
from ._views import DirectView
from .integrations import dask as _dask

ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION


def current_client() -> Client | None:
    """The Client most recently connected in this process and still open (for %px)."""
    client = _connection.current
    return client if isinstance(client, Client) else None


class Client(Connection):
    """A connection to a cluster: engines, views, results.

    ``Client(connection_file=None, timeout=10.0, max_results=100_000)``: see
    :class:`~jupyter_ext._connection.Connection` for the parameters. The machinery (sockets,
    sending, receiving, futures) lives there; this class adds views and the requests to
    the controller.
    """

    # ----- views

    def __getitem__(self, key: Any) -> DirectView:
        """``rc[0]``, ``rc[-1]``, ``rc[::2]``, ``rc[0, 1]``, ``rc[:]``: DirectViews."""

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

    def direct_view(self, targets: Any = "all") -> DirectView:
        """A DirectView; ``targets='all'`` follows engines as they come and go."""

        return DirectView(self, targets)

    def load_balanced_view(self, targets: Any = None) -> LoadBalancedView:
        """A LoadBalancedView over ``targets`` (None: all engines)."""

        return LoadBalancedView(self, targets)

    def executor(self, targets: Any = None) -> Any:
        """A ``concurrent.futures.Executor`` over a load-balanced view."""
        return self.load_balanced_view(targets).executor

    # ----- requests to the controller

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """An AsyncResult for earlier work: history indices, msg_ids or AsyncResults.

        Work this client submitted resolves as usual; work another client submitted
        comes from the controller's records (an :class:`AsyncHubResult`).
        """
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
        lanes = self._io.lanes
        direct = [] if lanes is None else [lanes.inflight.get(m) for m in msg_ids]
        content = {
            "signum": int(_signal.SIGINT),
            "msg_ids": list(msg_ids),
            "targets": sorted({e for e in direct if e is not None}),
        }
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
        if not block:
            self._send(protocol.HUB_ROUTE, protocol.SHUTDOWN_REQUEST, content, kind="hub")
            return
        reply = self._hub_request(protocol.SHUTDOWN_REQUEST, content, timeout=60)
        if not hub:  # gone from ``ids`` on return, whenever the controller's event comes
            reasons = reply.get("reasons") or {}
            self._engines_gone(
                {int(k): v or f"engine {k} was shut down" for k, v in reasons.items()}
            )

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
        return _dask.become_dask(self, targets, port, nanny, scheduler_args, **worker_args)

    def stop_dask(self, targets: Any = None) -> None:
        """Stop the dask scheduler and workers that ``become_dask`` started."""
        _dask.stop_dask(self, targets)

    def _repr_html_(self) -> str:

        return client_html(self)
