"""``Client.become_dask()``: turn a cluster's engines into a dask.distributed cluster.

The scheduler runs in one engine and a worker in each engine, all on the engines' own
event loops (the kernels' main-thread asyncio loops), so the engines keep serving
everything else meanwhile. Each engine-side step only schedules a coroutine; the client
then polls until it has finished, since a task on the lane must not block the loop.

Whatever launched the engines (local, mpiexec, Slurm, ssh, a registered engine), each
dask server listens on the address its engine's kernel listens on, the one the
controller and clients already reach it by: 127.0.0.1 for engines on this machine,
the host's own address for an engine elsewhere. dask's default, every interface of the
host, would break the cluster's rule of binding nothing the user did not ask for.
``stop_dask`` returns once every server it stopped has closed (a nanny's worker
process has exited, and the helper process multiprocessing starts for it too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jupyter_ext._client import Client

WILDCARDS = frozenset({"", "*", "0.0.0.0", "::"})

_state: dict[str, Any] = {}
_closing: list[Any] = []


@dataclass
class DaskState:
    """What :func:`become_dask` started, kept on the Client for :func:`stop_dask`."""

    address: str
    ids: list[int]
    client: Any = field(default=None, repr=False)
    """The ``distributed.Client`` it returned."""


def _schedule(coro: Any) -> Any:
    import asyncio

    return asyncio.get_event_loop().create_task(coro)


def _with_host(kwargs: dict[str, Any], host: str | None) -> dict[str, Any]:
    """``kwargs`` with ``host`` unless the user chose an address or interface."""
    if host is not None and "host" not in kwargs and "interface" not in kwargs:
        kwargs = {**kwargs, "host": host}
    return kwargs


def start_scheduler(port: int, host: str | None, kwargs: dict[str, Any]) -> None:
    """On an engine: start a dask Scheduler on this kernel's loop."""
    from distributed import Scheduler

    kwargs = _with_host(kwargs, host)
    scheduler = Scheduler(
        port=port, dashboard_address=kwargs.pop("dashboard_address", None), **kwargs
    )
    _state["scheduler"] = scheduler
    _schedule(scheduler.start())


def scheduler_address() -> str | None:
    """On an engine: the scheduler's address once it listens."""
    scheduler = _state.get("scheduler")
    try:
        return str(scheduler.address) if scheduler is not None else None
    except ValueError:
        return None


def start_worker(address: str, nanny: bool, host: str | None, kwargs: dict[str, Any]) -> None:
    """On an engine: start a dask Worker (or Nanny) on this kernel's loop."""
    from distributed import Nanny, Worker

    cls = Nanny if nanny else Worker
    if nanny:
        _state.setdefault("tracker", not _tracker_running())
    kwargs = _with_host(kwargs, host)
    kwargs.setdefault("nthreads", 1)
    worker = cls(address, **kwargs)
    _state["worker"] = worker
    _schedule(worker.start())


def worker_running() -> bool:
    """On an engine: whether its worker has joined the scheduler."""
    from distributed.core import Status

    worker = _state.get("worker")
    return worker is not None and worker.status == Status.running


def stop(names: tuple[str, ...] = ("worker", "scheduler")) -> None:
    """On an engine: start closing its worker and scheduler (of ``names``), if any."""
    for name in names:
        server = _state.pop(name, None)
        if server is not None:
            _closing.append(_schedule(server.close()))


def stopped() -> bool:
    """On an engine: whether everything :func:`stop` closes has closed."""
    _closing[:] = [task for task in _closing if not task.done()]
    if _closing:
        return False
    if "worker" not in _state and _state.pop("tracker", False):
        _stop_tracker()
    return True


def _tracker_running() -> bool:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None) is not None


def _stop_tracker() -> None:
    """Stop multiprocessing's resource tracker, started for a nanny's worker process
    (else it would stay as long as the engine). ``_stop`` exists from Python 3.8 to
    3.13 at least; a tracker needed again is started again."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        stop()


def _poll(call: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = call()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"dask {what} not ready within {timeout} s")
        time.sleep(0.05)


def _hosts(client: Client, ids: list[int]) -> dict[int, str | None]:
    """Each engine's address, as its kernel's connection info says (None: any; loopback
    for a kernel on unix sockets)."""
    hosts: dict[int, str | None] = {}
    for eid in ids:
        conn = client.engine_info(eid).get("connection_info", {})
        ip = "127.0.0.1" if conn.get("transport") == "ipc" else conn.get("ip")
        hosts[eid] = None if not isinstance(ip, str) or ip in WILDCARDS else ip
    return hosts


def become_dask(
    client: Client,
    targets: Any = "all",
    port: int = 0,
    nanny: bool = False,
    scheduler_args: dict[str, Any] | None = None,
    timeout: float = 60.0,
    **worker_args: Any,
) -> Any:
    """Start a dask scheduler on the first target and a worker on every target.

    Returns a connected ``distributed.Client``. Called again while the cluster it
    started runs, it keeps that cluster (and its client) and adds workers on the targets
    that have none, as IPython Parallel's does.
    """
    import distributed

    ids = client.transport.targets(targets)
    before = client._dask
    if before is not None and before.ids[0] not in client.ids:
        stop_dask(client, timeout=timeout)  # (its scheduler died with its engine)
        before = None
    if before is not None:
        # a cluster runs already (IPython Parallel's keeps it): its scheduler stays, and
        # workers join it on the targets that have none; starting a second one left the
        # first running, unknown to stop_dask, on every engine
        address = before.address
        ids = [*before.ids, *(i for i in ids if i not in before.ids)]
        new = ids[len(before.ids) :]
    else:
        hosts = _hosts(client, ids[:1])
        first = client[ids[0]]
        first.apply_sync(start_scheduler, port, hosts[ids[0]], dict(scheduler_args or {}))
        address = _poll(lambda: first.apply_sync(scheduler_address), "scheduler", timeout)
        new = ids
    hosts = _hosts(client, new)
    started = [
        client[eid].apply_async(start_worker, address, nanny, hosts[eid], dict(worker_args))
        for eid in new
    ]
    for ar in started:
        ar.get(timeout)
    workers = client.direct_view(ids)
    _poll(lambda: all(workers.apply_sync(worker_running)), "workers", timeout)
    dask_client = before.client if before is not None else None
    if dask_client is None or dask_client.status != "running":
        dask_client = distributed.Client(address, timeout=timeout)
    client._dask = DaskState(address, ids, dask_client)
    dask_client.wait_for_workers(len(ids), timeout=timeout)
    return dask_client


def stop_dask(client: Client, targets: Any = None, timeout: float = 30.0) -> None:
    """Close the dask workers and scheduler that :func:`become_dask` started (only those
    on ``targets``, if given: the scheduler's engine stops it for all); returns once
    they have closed."""
    started = client._dask
    if started is None:
        return
    ids = started.ids
    chosen = ids if targets is None else client.transport.targets(targets)
    live = [i for i in chosen if i in ids and i in client.ids]
    scheduler_too = ids[0] in chosen
    if scheduler_too and started.client is not None:
        started.client.close(timeout=timeout)
    if live:
        view = client.direct_view(live)
        view.apply_sync(stop, ("worker",))
        _poll(lambda: all(view.apply_sync(stopped)), "workers' close", timeout)
    if scheduler_too and ids[0] in client.ids:
        first = client[ids[0]]
        first.apply_sync(stop, ("scheduler",))
        _poll(lambda: first.apply_sync(stopped), "scheduler's close", timeout)
    rest = [i for i in ids if i not in chosen]
    client._dask = (
        None if scheduler_too or not rest else DaskState(started.address, rest, started.client)
    )
