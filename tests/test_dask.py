"""``become_dask()`` on engines that registered themselves (started by mpiexec): the
dask servers listen on the engines' own address only, a computation runs, and
``stop_dask()`` leaves no dask process (a nanny's worker) behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import psutil
import pytest
from conftest import MPI_ENV, kill_pids, wait_gone

pytest.importorskip("distributed", reason="dask.distributed is not installed (the test extra)")

pytestmark = pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (make system-deps installs Open MPI)"
)


@pytest.fixture
def mpi_env(monkeypatch) -> Iterator[None]:
    for name, value in MPI_ENV.items():
        monkeypatch.setenv(name, value)
    yield


def listening(pids: list[int]) -> set[str]:
    """The addresses these processes listen on (TCP)."""
    found = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections("tcp")
        except psutil.Error:
            continue
        found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def children(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return out


def test_become_dask_on_mpi_engines_and_stop_dask_leaves_no_process(mpi_env, cluster_factory):
    _, rc = cluster_factory.start(2, engines="mpi", mpi_args=["--oversubscribe"])
    engines = [rc.engine_info(i)["pid"] for i in rc.ids]
    before = children(engines)
    dask_client = rc.become_dask(nanny=True)
    try:
        # a nanny runs each worker in a process of its own, under its engine
        workers = dask_client.run(os.getpid)
        worker_pids = sorted(workers.values())
        assert len(worker_pids) == 2 and set(worker_pids) <= children(engines) - before
        assert dask_client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
        futures = dask_client.map(lambda x: x * x, range(20))
        assert sum(dask_client.gather(futures)) == sum(x * x for x in range(20))
        assert listening([*engines, *worker_pids]) == {"127.0.0.1"}
    finally:
        rc.stop_dask()
    assert dask_client.status == "closed"
    left = wait_gone(worker_pids, timeout=5)
    kill_pids(left)
    assert not left, f"dask workers left after stop_dask: {left}"
    extra = children(engines) - before
    assert not extra, [" ".join(psutil.Process(p).cmdline()) for p in extra]
    assert rc[:].apply_sync(lambda: "engines still serve") == ["engines still serve"] * 2
    assert rc._dask is None
