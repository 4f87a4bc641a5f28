"""The Client: what a user holds of a cluster, a thin facade over its transport.

Everything that moves requests and keeps their state is the :class:`~._transport.Transport`
(``client.transport``); this class adds IPython Parallel's names: views, waiting, and the
requests to the controller (queries, aborts, signals, shutdown, purges).
"""

from __future__ import annotations

import concurrent.futures
import numbers
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self  # (3.11; only type checkers read it)

from kernel_engine import protocol
from kernel_engine.errors import InvalidTarget, NoEnginesRegistered
from kernel_engine.wire import parse_date

from ._asyncresult import AsyncHubResult, AsyncResult, as_timeout
from ._dashboard import Dashboard, Dashboards, _in_kernel
from ._dependency import msg_ids_of
from ._lbview import LoadBalancedView
from ._metadata import Metadata
from ._progress import wait_futures_with_progress
from ._reprs import client_html
from ._request import Request
from ._transport import MAX_RESULT_BYTES, Transport, engine_id_of
from ._views import BroadcastView, DirectView
from ._widgets import WidgetRelay, attach
from .integrations import dask as _dask

ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION

_current: Client | None = None


def _jsonable_query(query: dict[str, Any]) -> dict[str, Any]:
    """A db_query's datetimes as timestamps (naive ones in local time, as Python's); any
    collection of values (``rc.history``, a range, an array) as a list, numpy's numbers
    as Python's (an engine id from an array is an id, as it is for a view)."""

    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (str, bytes, bool, int, float)) or value is None:
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, Iterable) and not isinstance(value, Mapping):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in query.items()}


def _register_magics() -> None:
    """In IPython, the first client registers ``%px`` and friends (as IPython Parallel's
    does); ``%load_ext jupyter_ext`` or ``view.activate()`` also do."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is None or "px" in shell.magics_manager.magics["line"]:
        return
    from ._magics import load_ipython_extension

    load_ipython_extension(shell)


def current_client() -> Client | None:
    """The Client most recently connected in this process and still open (for %px)."""
    return _current if _current is not None and not _current.transport.closed else None


class Client:
    """A connection to a cluster: engines, views, results.

    ``Client(connection_file=None, timeout=10.0, max_results=10_000,
    max_result_bytes=256 MiB)``: the parameters are
    :class:`~jupyter_ext._transport.Transport`'s (a cluster's connection file or id, by
    default the newest running cluster; seconds to wait for the controller; how many
    finished tasks' results, metadata and msg_ids in ``history`` to keep; how many bytes
    of results to keep, the newest result always kept).
    """

    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        timeout: float | None = 10.0,
        max_results: int = 10_000,
        max_result_bytes: int | None = MAX_RESULT_BYTES,
    ):
        global _current
        self.transport = Transport(connection_file, timeout, max_results, max_result_bytes)
        # in a notebook kernel: engines' widgets (comms) show and work in the notebook
        self._widgets: WidgetRelay | None = attach(self.transport)
        self._dashboards = Dashboards(self.transport)
        self._dask: _dask.DaskState | None = None
        self.cluster: Any = None  # the Cluster that made this client, if one did
        self.block = False
        self.debug = False
        self.profile = "default"
        _current = self
        _register_magics()

    # ----- state kept by the transport

    @property
    def connection_file(self) -> str:
        return self.transport.connection_file

    @property
    def cluster_id(self) -> str:
        return self.transport.cluster_id

    @property
    def ids(self) -> list[int]:
        """The ids of the engines that are ready, sorted."""
        return self.transport.ids

    def __len__(self) -> int:
        return len(self.transport.engines)

    def __iter__(self) -> Iterator[DirectView]:
        """One DirectView per engine ready now."""
        return iter([DirectView(self, eid) for eid in self.ids])

    @property
    def outstanding(self) -> set[str]:
        """msg_ids of tasks submitted and not finished."""
        return self.transport.outstanding

    @property
    def history(self) -> Any:
        """msg_ids submitted, oldest first (the newest ``max_results`` of them)."""
        return self.transport.history

    @property
    def results(self) -> dict[str, Any]:
        """Results (or errors) of finished tasks by msg_id (the newest ``max_results``,
        within ``max_result_bytes``)."""
        return self.transport.results

    @property
    def metadata(self) -> dict[str, Metadata]:
        """Metadata of tasks by msg_id (the newest ``max_results``)."""
        return self.transport.metadata

    def engine_info(self, engine_id: int) -> dict[str, Any]:
        """``pid``, ``hostname``, ``uuid`` and ``connection_info`` of one engine.

        ``connection_info`` is the engine kernel's Jupyter connection info (with the
        cluster key), so any Jupyter client can attach to the engine.
        """
        return self.transport.engine_info(engine_id)

    # ----- views

    def __getitem__(self, key: Any) -> DirectView:
        """``rc[0]``, ``rc[-1]``, ``rc[::2]``, ``rc[0, 1]``, ``rc[:]``: DirectViews."""
        ids = self.ids
        if not ids:
            raise NoEnginesRegistered("the cluster has no engines")
        if not isinstance(key, (int, slice, tuple, list, range)):
            index = engine_id_of(key)  # (numpy's integers)
            if index is not None:
                key = index
        if isinstance(key, int) and not isinstance(key, bool):
            try:
                return DirectView(self, ids[key] if key < 0 else self.transport.targets(key)[0])
            except IndexError:
                raise InvalidTarget(f"no engine at index {key}; ids are {ids}") from None
        if isinstance(key, slice):
            return DirectView(self, ids[key])
        if isinstance(key, (tuple, list, range)):
            return DirectView(self, self.transport.targets(list(key)))
        raise TypeError(f"engines are indexed by int, slice or ids, not {type(key).__name__}")

    def direct_view(self, targets: Any = "all", **flags: Any) -> DirectView:
        """A DirectView (with ``flags`` set); ``targets='all'`` follows engines as they
        come and go."""
        view = DirectView(self, targets)
        view.set_flags(**flags)
        return view

    def load_balanced_view(self, targets: Any = None, **flags: Any) -> LoadBalancedView:
        """A LoadBalancedView over ``targets`` (None: all engines), with ``flags`` set."""
        view = LoadBalancedView(self, None)
        view.set_flags(targets=targets, **flags)  # (bad targets refused here, not at first use)
        return view

    def broadcast_view(
        self, targets: Any = "all", is_coalescing: bool = False, **flags: Any
    ) -> BroadcastView:
        """A BroadcastView (the same work on every target), with ``flags`` set."""
        view = BroadcastView(self, targets, is_coalescing)
        view.set_flags(**flags)
        return view

    def executor(self, targets: Any = None) -> Any:
        """A ``concurrent.futures.Executor`` over a load-balanced view."""
        return self.load_balanced_view(targets).executor

    # ----- waiting

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for msg_ids, history indices or AsyncResults (default: everything
        outstanding); ``timeout`` None or negative waits for ever.

        Returns whether they are all done; never raises on timeout.
        """
        timeout = as_timeout(timeout)
        return self.transport.wait(self.transport.futures_for(self._jobs(jobs)), timeout)

    def _jobs(self, jobs: Any) -> Any:
        """History indices (ints) as msg_ids; the rest as given."""
        if isinstance(jobs, int) and not isinstance(jobs, bool):
            return self._history_at(jobs)
        if isinstance(jobs, (list, tuple)):
            return [self._history_at(j) if isinstance(j, int) else j for j in jobs]
        return jobs

    def _history_at(self, index: int) -> str:
        """The msg_id at this index of :attr:`history` (IndexError saying so)."""
        try:
            return self.history[index]
        except IndexError:
            n = len(self.history)
            raise IndexError(f"no task at history index {index}: the history holds {n}") from None

    def _msg_ids_of_jobs(self, jobs: Any) -> list[str]:
        """msg_ids from history indices (ints), msg_ids, AsyncResults, or a collection of
        those, as IPython Parallel's ``_msg_ids_from_jobs`` takes them (None: none)."""
        if isinstance(jobs, str) or not isinstance(jobs, (list, tuple, set, Iterator)):
            jobs = [jobs]
        out: list[str] = []
        for job in jobs:
            if isinstance(job, int) and not isinstance(job, bool):
                out.append(self._history_at(job))
            else:
                out.extend(msg_ids_of(job))
        return out

    def wait_interactive(
        self, jobs: Any = None, interval: float = 0.1, timeout: float | None = None
    ) -> None:
        """Wait with a progress display for outstanding work (or ``jobs``: as for
        :meth:`wait`)."""
        futures = self.transport.futures_for(self._jobs(jobs))
        wait_futures_with_progress(futures, interval, timeout)

    def spin(self) -> None:
        """Kept for IPython Parallel compatibility: results arrive on the IO thread."""

    def spin_thread(self, interval: float = 1) -> None:
        """Kept for IPython Parallel compatibility: the IO thread always runs."""

    def stop_spin_thread(self) -> None:
        """Kept for IPython Parallel compatibility."""

    def wait_for_engines(
        self,
        n: int | None = None,
        *,
        timeout: float | None = -1,
        block: bool = True,
        interactive: bool | None = None,
        widget: bool | None = None,
    ) -> Any:
        """Wait until at least ``n`` engines are ready (default: as many as the Cluster
        that made this client started); ``timeout`` None or negative waits for ever.

        With ``block=False``, returns a ``concurrent.futures.Future`` at once. Raises
        TimeoutError when they are not ready in time.
        """
        if n is None:
            n = self.cluster.n if self.cluster is not None else len(self.ids)
        n = protocol.check_int("n", n, 0, protocol.MAX_IDS)
        wait = as_timeout(timeout)
        protocol.check_bool("block", block)
        if block:
            self.transport.wait_for_engines(n, wait)
            return None
        future: concurrent.futures.Future[None] = concurrent.futures.Future()

        def waiter() -> None:
            try:
                self.transport.wait_for_engines(n, wait)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

        threading.Thread(target=waiter, name="jupyter-px-wait-engines", daemon=True).start()
        return future

    def activate(self, targets: Any = "all", suffix: str = "") -> DirectView:
        """A blocking DirectView on ``targets`` whose magics are ``%px<suffix>``,
        ``%%px<suffix>``, ``%autopx<suffix>``... (registered in IPython)."""
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    # ----- results of earlier work

    def get_result(
        self, indices_or_msg_ids: Any = None, block: bool | None = None, owner: bool = True
    ) -> Any:
        """An AsyncResult for earlier work: history indices, msg_ids or AsyncResults.

        Work this client submitted resolves as usual; work another client submitted
        comes from the controller's records (an :class:`AsyncHubResult`).
        """
        msg_ids = self._msg_ids_from(indices_or_msg_ids)
        single = len(msg_ids) == 1
        local = [self._local_future(m) for m in msg_ids]
        if all(f is not None for f in local):
            ar = AsyncResult(self, [f for f in local if f is not None], "get_result", single=single)
        else:
            ar = AsyncHubResult(self, msg_ids, single=single)
        return ar.get() if block else ar

    def _msg_ids_from(self, indices_or_msg_ids: Any) -> list[str]:
        """msg_ids from history indices (default: the last), msg_ids or AsyncResults."""
        return self._msg_ids_of_jobs(-1 if indices_or_msg_ids is None else indices_or_msg_ids)

    def _local_future(self, msg_id: str) -> Request | None:
        transport = self.transport
        live = transport.requests.get(msg_id)
        if live is not None:
            return live
        if msg_id not in transport.results:
            return None
        value = transport.results[msg_id]
        done = Request(msg_id, transport.metadata.get(msg_id) or Metadata(msg_id=msg_id))
        done.outcome = (not isinstance(value, BaseException), value)
        done.settle()
        return done

    # ----- requests to the controller

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = True) -> None:
        """Do not run these tasks (msg_ids or AsyncResults; default: all outstanding);
        ``block`` None: the client's :attr:`block`, as IPython Parallel's."""
        block = protocol.check_bool("block", self.block if block is None else block)
        msg_ids = list(self.outstanding) if jobs is None else msg_ids_of(jobs)
        ids = None if targets is None else self.transport.targets(targets)
        self.transport.abort(msg_ids, ids, block)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict[Any, Any]:
        """Per engine: requests queued or running (``queue``), ``completed``, ``tasks``."""
        protocol.check_bool("verbose", verbose)
        ids = None if targets is None else tuple(self.transport.targets(targets))
        reply = self.transport.ask(protocol.QUEUE_REQUEST, protocol.QueueRequest(ids))
        out: dict[Any, Any] = {}
        for key, value in reply["queue_status"].items():
            out[int(key) if key.isdigit() else key] = value
        if isinstance(targets, int) and ids:  # (-1: the last engine's)
            return dict(out[ids[0]])
        return out

    def send_signal(self, sig: int | str, targets: Any = None, block: bool = True) -> Any:
        """Send a signal (a number, or a name such as ``"SIGINT"``) to engines' processes
        (``SIGINT`` interrupts running work), wherever they run: an engine on another
        host signals itself when asked, and takes only SIGINT, SIGTERM, SIGKILL, SIGHUP,
        SIGQUIT, SIGUSR1 and SIGUSR2 (anything else is refused, for all targets, with a
        ValueError). Returns the engines signalled (an AsyncResult-like future of them
        without ``block``).

        An engine named by id that the controller is still adopting (busy with a task
        when its last controller died: not in ``ids`` until that task ends) is signalled
        too, so that ``SIGINT`` can end a runaway task; the controller refuses ids it
        does not know (InvalidTarget)."""
        if isinstance(sig, str):
            name = sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
            try:
                sig = int(signal.Signals[name])
            except KeyError:
                raise ValueError(f"no signal named {sig!r}") from None
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError(f"a signal is a number or a name, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"{sig} is not a signal of this system")
        request = protocol.SignalRequest(int(sig), tuple(self._named_targets(targets)))
        if block:
            return list(self.transport.ask(protocol.SIGNAL_REQUEST, request)["targets"])
        return self.transport.tell(protocol.SIGNAL_REQUEST, request)

    def _named_targets(self, targets: Any) -> list[int]:
        """The ids a signal or a shutdown goes to: as for any call, but an explicit id this
        client does not know (and has not seen die) is left for the controller to check
        (one it is still adopting, say)."""
        explicit = [targets] if isinstance(targets, int) else targets
        if isinstance(explicit, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in explicit
        ):
            known = self.transport.engines
            if any(t not in known and t not in self.transport.dead for t in explicit):
                return list(dict.fromkeys(explicit))
        return self.transport.targets(targets)

    def interrupt(self, targets: Any = None) -> None:
        """Interrupt what the engines are running (SIGINT through their kernel managers)."""
        self.send_signal(signal.SIGINT, targets)

    def clear(self, targets: Any = None, block: bool = True) -> Any:
        """Remove every name from the engines' namespaces."""
        return self.direct_view(self.transport.targets(targets)).clear(block=block)

    def shutdown(
        self, targets: Any = "all", restart: bool = False, hub: bool = False, block: bool = True
    ) -> None:
        """Stop engines (and with ``hub=True`` the controller and every engine).

        An engine named by id that the controller is still adopting (see
        :meth:`send_signal`) is stopped too; the controller refuses ids it does not know
        (InvalidTarget). ``restart`` is not available (nor is it in IPython Parallel):
        NotImplementedError.
        """
        if restart:
            raise NotImplementedError("engines cannot be restarted in place: use Cluster")
        if hub:  # (the controller stops every engine: targets name nothing more)
            ids = []
        elif self.transport.engines or (targets is not None and not isinstance(targets, str)):
            ids = self._named_targets(targets)
        else:
            ids = []
        request = protocol.ShutdownRequest(tuple(ids), hub)
        if not block:
            self.transport.tell(protocol.SHUTDOWN_REQUEST, request)
            return
        reply = self.transport.ask(protocol.SHUTDOWN_REQUEST, request, timeout=60)
        if not hub:  # gone from ``ids`` on return, whenever the controller's event comes
            reasons = reply.get("reasons") or {}
            self.transport.engines_gone(
                {int(k): v or f"engine {k} was shut down" for k, v in reasons.items()}
            )

    def hub_history(self) -> list[str]:
        """Every msg_id the controller has a record of, oldest first."""
        return list(self.transport.ask(protocol.HISTORY_REQUEST, protocol.Empty())["history"])

    def db_query(self, query: dict[str, Any], keys: Sequence[str] | None = None) -> list[Any]:
        """The controller's task records matching ``query``, as IPython Parallel's:
        ``{"engine_id": 1}``, or operators ``{"completed": {"$gt": a_datetime}}``
        (``$in $nin $lt $gt $lte $gte $ne $eq``). ``keys``: the fields wanted, or one
        field's name (default: all but ``buffers`` and ``result_buffers``). Dates come
        back as datetimes, buffers as bytes."""
        if not isinstance(query, dict):
            raise TypeError(f"query must be a dict of record keys to values, not {query!r}")
        if isinstance(keys, str):  # (one key, as IPython Parallel's takes it)
            keys = [keys]
        elif isinstance(keys, Iterable) and not isinstance(keys, (bytes, Mapping)):
            keys = list(keys)  # (read once: a generator's keys are checked, then sent)
        if keys is not None and (
            not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
        ):
            raise TypeError(f"keys must be a list of record keys, not {keys!r}")
        request = protocol.DbRequest(_jsonable_query(query), None if keys is None else tuple(keys))
        reply = self.transport.ask(protocol.DB_REQUEST, request, timeout=120)
        frames = [bytes(f) for f in reply["_buffers"]]
        records = []
        for record in reply["records"]:
            for key in ("submitted", "started", "completed", "received"):
                if isinstance(record.get(key), str):
                    record[key] = parse_date(record[key])
            for key in ("buffers", "result_buffers"):
                if isinstance(record.get(key), dict):
                    record[key] = [frames[i] for i in record[key]["frames"]]
            records.append(record)
        if reply.get("truncated"):
            warnings.warn(
                f"db_query: more records matched than the {len(records)} returned; "
                "narrow the query",
                stacklevel=2,
            )
        return records

    def resubmit(
        self, indices_or_msg_ids: Any = None, metadata: Any = None, block: bool | None = None
    ) -> Any:
        """Run finished tasks again (their function and arguments, load-balanced), from
        history indices, msg_ids or AsyncResults; returns an :class:`AsyncHubResult` over
        the new tasks (their results, or ``get()``'s value with ``block=True``).

        Raises ValueError naming each task that cannot run again (unknown, still in flight,
        or its request not kept), and then none runs. A task named twice runs once."""
        old = list(dict.fromkeys(self._msg_ids_from(indices_or_msg_ids)))  # (each once)
        pairs = tuple((m, self.transport.wire.header("apply_request")["msg_id"]) for m in old)
        request = protocol.ResubmitRequest(pairs)
        self.transport.ask(protocol.RESUBMIT_REQUEST, request)
        ar = AsyncHubResult(self, [new for _, new in pairs], single=len(pairs) == 1)
        block = self.block if block is None else block
        return ar.get() if block else ar

    def result_status(self, msg_ids: Any, status_only: bool = True) -> dict[str, Any]:
        """Which of these tasks are ``pending`` and which ``completed``, by the
        controller's records; with ``status_only=False`` also each completed one's
        result (or error) under its msg_id.

        Raises KeyError naming the msg_ids that neither the controller has a record of
        nor this client has outstanding (never sent, or forgotten: purged, or past the
        database's limits), as IPython Parallel does; they were reported pending, for
        ever. (This client's own requests still waiting to be sent are pending.)"""
        wanted = self._msg_ids_of_jobs(msg_ids)
        outstanding = self.outstanding  # (before asking: one may end while the answer comes)
        records = self.transport.fetch_records(wanted)
        missing = [m for m in wanted if m not in records]
        if missing:
            unknown = [m for m in missing if m not in outstanding]
            if unknown:
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise KeyError(f"the controller has no record of {', '.join(unknown[:5])}{more}")
        status: dict[str, Any] = {"pending": [], "completed": []}
        for msg_id in wanted:
            record, outcome = records.get(msg_id, (None, None))
            done = record is not None and record["status"] != "pending"
            status["completed" if done else "pending"].append(msg_id)
            if done and not status_only and outcome is not None:
                status[msg_id] = outcome[0][1]
        return status

    def purge_local_results(self, jobs: Any = None, targets: Any = None) -> None:
        """Forget results held by this client: ``jobs`` (history indices, msg_ids,
        AsyncResults, or ``"all"``) and those of the engines ``targets``. Neither given:
        ValueError, as IPython Parallel's (a bare call used to forget everything). Work
        still outstanding cannot be purged: RuntimeError."""
        _check_purge(jobs, targets)
        results, metadata = self.transport.results, self.transport.metadata
        outstanding = self.outstanding
        everything = _purges_everything(jobs, targets)
        if everything:  # (every result and every metadata, as IPython Parallel's "all")
            chosen = [*results, *metadata]
        else:
            chosen = self._msg_ids_of_jobs(jobs)
            if targets is not None:
                engines = set(self.transport.targets(targets))
                chosen += [m for m, md in metadata.items() if md.get("engine_id") in engines]
        busy = sorted(outstanding if everything else outstanding.intersection(chosen))
        if busy:
            raise RuntimeError(f"cannot purge outstanding work: {busy[:5]}")
        for msg_id in chosen:
            results.pop(msg_id, None)
            metadata.pop(msg_id, None)

    def purge_hub_results(self, jobs: Any = None, targets: Any = None) -> int:
        """Forget finished task records on the controller: ``jobs`` (or ``"all"``) and those
        of the engines ``targets`` (neither given: ValueError); returns how many."""
        _check_purge(jobs, targets)
        everything = _purges_everything(jobs, targets)  # (with targets: just theirs)
        request = protocol.PurgeRequest(
            None if everything else tuple(self._msg_ids_of_jobs(jobs)),
            None if targets is None else tuple(self.transport.targets(targets)),
        )
        return int(self.transport.ask(protocol.PURGE_REQUEST, request)["purged"])

    def purge_results(self, jobs: Any = None, targets: Any = None) -> None:
        """Forget finished results here and on the controller: ``jobs`` (history indices,
        msg_ids, AsyncResults) and those of the engines ``targets``; ``jobs="all"``
        forgets every one (neither given: ValueError, nothing forgotten)."""
        self.purge_local_results(jobs, targets)
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

        The scheduler runs in the first target engine, a worker in every target engine,
        each listening on its engine's own address (127.0.0.1 for engines on this
        machine), whatever launched the engines.
        """
        return _dask.become_dask(self, targets, port, nanny, scheduler_args, **worker_args)

    def purge_everything(self) -> None:
        """Forget every finished result, here and on the controller, and :attr:`history`
        (as IPython Parallel does). Work still outstanding cannot be purged: RuntimeError,
        and nothing is forgotten."""
        self.purge_results("all")
        self.transport.history.clear()

    def become_distributed(self, *args: Any, **kwargs: Any) -> Any:
        """IPython Parallel's other name of :meth:`become_dask`."""
        return self.become_dask(*args, **kwargs)

    def stop_distributed(self, targets: Any = None) -> None:
        """IPython Parallel's other name of :meth:`stop_dask`."""
        self.stop_dask(targets)

    def stop_dask(self, targets: Any = None) -> None:
        """Stop the dask scheduler and workers that ``become_dask`` started (and close the
        ``distributed.Client`` it returned, with the scheduler); returns once they have
        closed."""
        _dask.stop_dask(self, targets)

    # ----- seeing it work

    def dashboard(self, title: str = "") -> Dashboard:
        """A live view of the cluster: engines (state, current task, queue, done, failed,
        CPU, memory), throughput over the last minute, the latest errors with their
        tracebacks. Shown as a cell's value (or with ``display``): plain ipywidgets in a
        notebook, a static snapshot elsewhere. It updates only while shown, and stops
        when this client closes (or with its ``close()``)."""
        return self._dashboards.new(title)

    def status(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The cluster's status now, as the dashboard shows it (a JSON-ready dict:
        ``cluster`` counts and throughput, ``engines``, ``errors``)."""
        return self.transport.status(timeout)

    # ----- lifetime

    def close(self, linger: int | None = None) -> None:
        """Stop the IO thread and close the sockets (the cluster keeps running)."""
        global _current
        if _current is self:
            _current = None
        if not self.transport.closed:
            self._dashboards.close()  # (their final state, while the controller answers)
        if self._widgets is not None:
            self._widgets.close()
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client cluster={self.cluster_id!r} engines={self.ids}>"

    def _repr_html_(self) -> str:
        return client_html(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """In a notebook kernel, the live dashboard (the HTML summary beside it, for front
        ends without widgets); elsewhere None (the HTML summary and repr)."""
        own = self._own_dashboard(lambda: (client_html(self), repr(self)))
        return None if own is None else own.mimebundle()

    def _ipython_display_(self) -> None:
        """As :meth:`_repr_mimebundle_`, shown so that closing the client leaves the
        static snapshot of the final state in its place."""
        self._show(lambda: (client_html(self), repr(self)))

    def _own_dashboard(self, heading: Callable[[], tuple[str, str]]) -> Any:
        """The dashboard of this client's rich display, under ``heading``; None outside
        a notebook kernel or once closed."""
        if not _in_kernel() or self.transport.closed:
            return None
        own = self._dashboards.own()
        own.heading = heading
        return own

    def _show(self, heading: Callable[[], tuple[str, str]]) -> None:
        from IPython.display import display

        own = self._own_dashboard(heading)
        if own is None:
            html, plain = heading()
            display({"text/plain": plain, "text/html": html}, raw=True)
            return
        own._ipython_display_()


def _check_purge(jobs: Any, targets: Any) -> None:
    """A purge names what it forgets: a bare ``purge_results()`` is refused, as IPython
    Parallel refuses it, rather than taken to mean everything (empty lists name nothing
    and forget nothing)."""
    if jobs is None and targets is None:
        raise ValueError('name the jobs or targets to purge (jobs="all" purges every one)')


def _purges_everything(jobs: Any, targets: Any) -> bool:
    """Whether a purge's ``jobs`` name every result (``"all"``)."""
    return isinstance(jobs, str) and jobs == "all"
