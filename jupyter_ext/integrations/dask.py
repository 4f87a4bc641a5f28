"""``Client.become_dask()``: turn a cluster's engines into a dask.distributed cluster.

The scheduler runs in one engine and a worker in each engine, all on the engines' own
event loops (the kernels' main-thread asyncio loops), so the engines keep serving
everything else meanwhile. Each engine-side step only schedules a coroutine; the client
then polls until it has finished, since a task on the lane must not block the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jupyter_ext._client import Client

_state: dict[str, Any] = {}


def _schedule(coro: Any) -> None:
    import asyncio

    asyncio.get_event_loop().create_task(coro)


def start_scheduler(port: int, kwargs: dict[str, Any]) -> None:
    """On an engine: start a dask Scheduler on this kernel's loop."""
    from distributed import Scheduler

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


def start_worker(address: str, nanny: bool, kwargs: dict[str, Any]) -> None:
    """On an engine: start a dask Worker (or Nanny) on this kernel's loop."""
    from distributed import Nanny, Worker

    cls = Nanny if nanny else Worker
    kwargs.setdefault("nthreads", 1)
    worker = cls(address, **kwargs)
    _state["worker"] = worker
    _schedule(worker.start())


def worker_running() -> bool:
    """On an engine: whether its worker has joined the scheduler."""
    from distributed.core import Status

    worker = _state.get("worker")
    return worker is not None and worker.status == Status.running


def stop() -> None:
    """On an engine: close its worker and scheduler, if any."""
    for name in ("worker", "scheduler"):
        server = _state.pop(name, None)
        if server is not None:
            _schedule(server.close())


def _poll(call: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = call()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"dask {what} not ready within {timeout} s")
        time.sleep(0.05)


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

    Returns a connected ``distributed.Client``.
    """
    import distributed

    ids = client.transport.targets(targets)
    first = client[ids[0]]
    first.apply_sync(start_scheduler, port, dict(scheduler_args or {}))
    address = _poll(lambda: first.apply_sync(scheduler_address), "scheduler", timeout)
    workers = client.direct_view(ids)
    workers.apply_sync(start_worker, address, nanny, dict(worker_args))
    _poll(lambda: all(workers.apply_sync(worker_running)), "workers", timeout)
    client._dask = (address, ids)
    dask_client = distributed.Client(address, timeout=timeout)
    dask_client.wait_for_workers(len(ids), timeout=timeout)
    return dask_client


def stop_dask(client: Client, targets: Any = None) -> None:
    """Close the dask workers and scheduler that :func:`become_dask` started (only those
    on ``targets``, if given: the scheduler's engine stops it for all)."""
    started = getattr(client, "_dask", None)
    if started is None:
        return
    address, ids = started
    chosen = ids if targets is None else client.transport.targets(targets)
    live = [i for i in chosen if i in ids and i in client.ids]
    if live:
        client.direct_view(live).apply_sync(stop)
    rest = [i for i in ids if i not in chosen]
    client._dask = (address, rest) if rest and ids[0] not in chosen else None
