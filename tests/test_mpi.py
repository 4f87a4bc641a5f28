"""Engines started by mpiexec (Open MPI): ids are ranks, mpi4py works through %px, a bad
mpiexec argument raises with mpiexec's own message, and stopping leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator

import nbformat
import psutil
import pytest
from conftest import MPI_ENV, kill_pids, stop_leaves_nothing, wait_gone

from kernel_engine.errors import ClusterError

pytestmark = pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (make system-deps installs Open MPI)"
)


@pytest.fixture(scope="module", autouse=True)
def mpi_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in MPI_ENV}
    os.environ.update(MPI_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def launched_pids(cluster) -> list[int]:
    """mpiexec's pid and its whole process tree, from the controller's record."""
    records = json.loads((cluster.folder / "launchers.json").read_text())
    pids = [r["pid"] for r in records]
    for pid in list(pids):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return pids


def test_mpi_engines_have_their_ranks_as_ids_and_stop_completely(cluster_factory):
    started = time.monotonic()
    cluster, rc = cluster_factory.start(2, engines="mpi", mpi_args=["--oversubscribe"])
    took = time.monotonic() - started
    assert rc.ids == [0, 1]
    ranks = rc[:].apply_sync(lambda: int(__import__("os").environ["OMPI_COMM_WORLD_RANK"]))
    assert ranks == [0, 1]
    pids = launched_pids(cluster)
    engine_pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    assert set(engine_pids) <= set(pids)
    started = time.monotonic()
    cluster.stop_cluster_sync()
    stop_took = time.monotonic() - started
    assert stop_took < 10
    left = wait_gone(pids, timeout=5)
    kill_pids(left)
    assert not left, f"left running after stop: {left}"
    logs = cluster.engine_logs()
    assert {0, 1, "mpiexec-0"} <= set(logs)
    assert "mpiexec" in logs["mpiexec-0"] and "-n 2" in logs["mpiexec-0"]
    assert "registered with cluster" in logs[0]
    print(f"mpi: 2 engines ready in {took:.1f} s, stopped in {stop_took:.1f} s")


def test_a_bad_mpiexec_argument_raises_with_mpiexecs_message(cluster_factory):
    cluster = cluster_factory(2, engines="mpi", mpi_args=["--no-such-option"])
    started = time.monotonic()
    with pytest.raises(ClusterError, match="no-such-option") as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "mpiexec exited with code" in message
    assert "unknown option" in message  # (mpiexec's own words)


FAKE_MPIEXEC = """#!/bin/sh
case "$1" in --version) echo "fake mpiexec 1.0"; exit 0;; esac
pids="$(dirname "$0")/pids"
trap '' TERM
sleep 1000 & echo $! >>"$pids"
sleep 1001 & echo $! >>"$pids"
echo $$ >>"$pids"
wait
"""


def test_a_failed_start_stops_what_a_wrapper_that_does_not_exec_started(cluster_factory, tmp_path):
    # a site wrapper that runs mpiexec without exec: SIGTERM ends the wrapper, and what
    # it started (here deaf to SIGTERM, engines never coming) is reparented away from it
    fake = tmp_path / "fake-mpiexec"
    fake.write_text(FAKE_MPIEXEC)
    wrapper = tmp_path / "mpiexec-wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{fake}" "$@"\n')
    for script in (fake, wrapper):
        script.chmod(0o755)
    cluster = cluster_factory(2, engines="mpi", mpiexec=str(wrapper), start_timeout=2)
    with pytest.raises(ClusterError, match="0 of 2 engines ready"):
        cluster.start_cluster_sync()
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 3
    left = wait_gone(pids, timeout=5)
    kill_pids(left)
    assert not left, f"left running after a failed start: {left}"


def test_an_mpiexec_that_exits_cleanly_without_engines_fails_the_start_at_once(cluster_factory):
    # (mpiexec --version prints and exits with code 0: no engine will ever register)
    cluster = cluster_factory(2, engines="mpi", mpi_args=["--version"], start_timeout=60)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="before any of its engines registered") as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "mpiexec exited with code 0" in message
    assert "--version" in message  # (its own output, from the command line on)


NOTEBOOK = {
    "setup": "import jupyter_ext as jx\n"
    "cluster = jx.Cluster(n=4, engines='mpi', mpi_args=['--oversubscribe'])\n"
    "rc = cluster.start_and_connect_sync()\n"
    "%load_ext jupyter_ext",
    "allreduce": "%%px\n"
    "from mpi4py import MPI\n"
    "comm = MPI.COMM_WORLD\n"
    "total = comm.allreduce(comm.rank + 1)\n"
    "print('rank', comm.rank, 'of', comm.size, 'total', total)",
    "check": "print(rc.ids, rc[:].pull('total', block=True))",
    "ranks": "print(rc[:].apply_sync(lambda: __import__('mpi4py.MPI').MPI.COMM_WORLD.rank))",
    "stop": "cluster.stop_cluster_sync()\nprint('stopped')",
}


def test_mpi4py_allreduce_across_engines_through_px():
    pytest.importorskip("mpi4py")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"name": k}) for k, src in NOTEBOOK.items()]
    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True)
    with client.setup_kernel():
        kernel_pid = client.km.provisioner.process.pid
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        finally:
            leftovers = [p.pid for p in psutil.Process(kernel_pid).children(recursive=True)]
    kill_pids(wait_gone(leftovers, timeout=10))
    cells = {c.metadata["name"]: c for c in nb.cells}
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    def text(name: str) -> str:
        return "".join(o.get("text", "") for o in cells[name].outputs)

    out = text("allreduce")
    for rank in range(4):
        assert f"rank {rank} of 4 total 10" in out
    assert text("check").strip() == "[0, 1, 2, 3] [10, 10, 10, 10]"
    assert text("ranks").strip() == "[0, 1, 2, 3]"
    assert "stopped" in text("stop")


def test_stopping_a_cluster_whose_controller_was_killed_stops_mpiexec_too(cluster_factory):
    cluster, rc = cluster_factory.start(2, engines="mpi", mpi_args=["--oversubscribe"])
    stop_leaves_nothing(cluster, launched_pids(cluster), kill_controller_of=rc)
    assert not (cluster.folder / "launchers.json").exists()


@pytest.mark.skipif(
    shutil.which("mpiexec.mpich") is None, reason="no MPICH (make system-deps installs it)"
)
def test_mpich_engines_have_their_ranks_as_ids_and_stop_completely(cluster_factory):
    # MPICH's Hydra passes the whole environment and names ranks PMI_RANK (mpi4py here is
    # built for Open MPI, so only the launch is MPICH's)
    cluster, rc = cluster_factory.start(2, engines="mpi", mpiexec="mpiexec.mpich")
    assert rc.ids == [0, 1]
    assert rc[:].apply_sync(lambda: int(__import__("os").environ["PMI_RANK"])) == [0, 1]
    stop_leaves_nothing(cluster, launched_pids(cluster))
    assert "mpiexec.mpich" in cluster.engine_logs()["mpiexec-0"]
