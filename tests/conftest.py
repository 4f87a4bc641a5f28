"""Fixtures: real clusters (controller + engine kernels), stopped and checked by PID;
task stores opened in a test's folder, closed after it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

_RUNTIME = tempfile.mkdtemp(prefix="px-test-runtime-")
os.environ["JUPYTER_RUNTIME_DIR"] = _RUNTIME


def descendants() -> dict[int, str]:
    """Processes this test process started (directly or not), by PID."""
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            out[proc.pid] = " ".join(proc.cmdline())[:200]
        except psutil.Error:
            continue
    return out


def kill_pids(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL these PIDs (if alive); return those that were still alive."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            alive.append(pid)
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs([psutil.Process(p) for p in alive if psutil.pid_exists(p)], timeout=timeout)
    return alive


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of the PIDs runs; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _running(p)]
        if left:
            time.sleep(0.05)
    return left


def stop_leaves_nothing(cluster, pids: list[int], kill_controller_of=None) -> None:
    """Stop ``cluster`` (after SIGKILLing its controller, closing the client
    ``kill_controller_of``, when one is given): within 10 s, and none of ``pids`` left."""
    if kill_controller_of is not None:
        kill_controller_of.close()
        cluster.controller.kill()
        cluster.controller.wait(10)
    started = time.monotonic()
    cluster.stop_cluster_sync(timeout=5)
    took = time.monotonic() - started
    assert took < 10, f"stopping took {took:.1f} s"
    left = wait_gone(pids, timeout=5)
    kill_pids(left)
    assert not left, f"left running after stop: {left}"


MPI_ENV = {
    # ranks on loopback and shared memory only (see RIG.md)
    "OMPI_MCA_btl": "self,vader",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
}
"""Open MPI's settings for ranks on this machine (tests that run mpiexec set them)."""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ClusterFactory:
    """Starts clusters for a test and stops them, checking every PID is gone."""

    def __init__(self) -> None:
        self.clusters: list = []
        self.pids: list[int] = []

    def __call__(self, n: int = 2, **kwargs):
        import jupyter_ext as jx

        cluster = jx.Cluster(n=n, **kwargs)
        self.clusters.append(cluster)
        return cluster

    def start(self, n: int = 2, **kwargs):
        cluster = self(n, **kwargs)
        rc = cluster.start_and_connect_sync()
        self.record(cluster, rc)
        return cluster, rc

    def record(self, cluster, rc) -> None:
        self.pids.append(cluster.controller_pid)
        self.pids += [rc.engine_info(i)["pid"] for i in rc.ids]

    def stop_all(self) -> None:
        for cluster in self.clusters:
            try:
                cluster.stop_cluster_sync(timeout=20)
            except Exception:
                pass
        left = wait_gone([p for p in self.pids if p])
        if left:
            kill_pids(left)
            pytest.fail(f"processes left after stopping clusters: {left}")


@pytest.fixture
def cluster_factory() -> Iterator[ClusterFactory]:
    factory = ClusterFactory()
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def rc():
    """A 2-engine cluster shared by a module's tests (engine namespaces are cleared)."""
    factory = ClusterFactory()
    _, client = factory.start(2)
    yield client
    factory.stop_all()


@pytest.fixture
def dv(rc):
    view = rc[:]
    view.block = True
    yield view


@pytest.fixture
def open_store(tmp_path) -> Iterator[Callable[..., Any]]:
    """Opens stores in tmp_path; closes them all afterwards."""
    from kernel_engine.controller.sqlite_store import SqliteLog, StoreError

    opened: list[SqliteLog] = []

    def open_(name: str = "tasks.db", **kwargs: Any) -> Any:
        store = SqliteLog(tmp_path / name, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        try:
            store.close()
        except StoreError:
            pass


@pytest.fixture(autouse=True, scope="session")
def no_leftover_processes() -> Iterator[None]:
    before = set(descendants())
    yield
    time.sleep(0.2)
    left = {p: c for p, c in descendants().items() if p not in before}
    left = {p: c for p, c in left.items() if _running(p)}
    if left:
        kill_pids(list(left))
        pytest.fail(f"the test session left processes behind: {left}")


@pytest.fixture(autouse=True, scope="session")
def engine_kernelspec() -> None:
    from kernel_engine.kernelspec import ensure_installed

    ensure_installed()


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil

    shutil.rmtree(_RUNTIME, ignore_errors=True)
