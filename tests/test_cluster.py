"""Cluster and Client lifetime, the command line, and attaching Jupyter clients to engines."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import zmq
from conftest import wait_gone
from jupyter_client import BlockingKernelClient

import jupyter_ext as jx
from kernel_engine import clusters
from kernel_engine.launchers.local import ipc_unusable

cloudpickle.register_pickle_by_value(sys.modules[__name__])
JUPYTER_PX = str(Path(sys.executable).parent / "jupyter-px")


def test_with_cluster_starts_ready_and_stops_everything():
    t0 = time.monotonic()
    with jx.Cluster(n=2) as rc:
        assert time.monotonic() - t0 < 30
        assert rc.ids == [0, 1]  # ready on return: no waiting for engines
        pids = [rc.engine_info(i)["pid"] for i in rc.ids]
        controller = json.loads(Path(rc.connection_file).read_text())["controller_pid"]
        assert rc[:].apply_sync(os.getpid) == pids
    assert wait_gone([*pids, controller]) == []


def test_async_start_and_connect(cluster_factory):
    cluster = cluster_factory(2)

    async def main():
        rc = await cluster.start_and_connect()
        ids = rc.ids
        await cluster.stop_cluster()
        return ids

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [0, 1]
    assert not cluster.running


def test_async_with(cluster_factory):
    async def main():
        async with jx.Cluster(n=1) as rc:
            return await rc[0].apply(lambda: 3)

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 3


def test_connection_file_is_private_and_local(rc):
    path = Path(rc.connection_file)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["ip"] == "127.0.0.1"
    folder = path.parent
    assert folder.stat().st_mode & 0o777 == 0o700
    for i in rc.ids:
        # the engines listen on unix sockets in the cluster's folder, nowhere else
        conn = rc.engine_info(i)["connection_info"]
        assert conn["transport"] == "ipc" and conn["ip"] == str(folder / f"e{i}"), conn
        for name in ("shell", "control", "stdin", "iopub", "hb", "lane"):
            assert stat.S_ISSOCK(Path(f"{conn['ip']}-{conn[name + '_port']}").stat().st_mode)


def test_engines_use_unix_sockets_only_where_other_users_cannot_reach_them(tmp_path, monkeypatch):
    folder = tmp_path / "cluster"
    folder.mkdir(mode=0o700)
    assert ipc_unusable(folder) is None
    folder.chmod(0o750)
    assert "is not private" in str(ipc_unusable(folder))
    folder.chmod(0o700)
    deep = tmp_path / ("x" * 100)
    deep.mkdir(mode=0o700)
    assert "too long" in str(ipc_unusable(deep))
    assert "unusable" in str(ipc_unusable(folder / "missing"))
    # a folder above that others may write to: they could rename the cluster's away and
    # put theirs in its place, between this check and the engines' bind
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    inside = shared / "px" / "c1"
    clusters.make_private_folder(inside)
    assert "could replace the cluster folder" in str(ipc_unusable(inside))
    shared.chmod(0o1777)  # (sticky: only the owner renames what is in it, as in /tmp)
    assert ipc_unusable(inside) is None
    # (each missing level made private, whatever the umask)
    old_umask = os.umask(0)
    try:
        clusters.make_private_folder(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old_umask)
    for level in ("a", "a/b", "a/b/c"):
        assert (tmp_path / level).stat().st_mode & 0o777 == 0o700, level
    monkeypatch.setenv("JUPYTER_PX_IPC", "off")
    assert ipc_unusable(folder) == "JUPYTER_PX_IPC=off"
    assert list(folder.iterdir()) == []  # (the probe socket is gone)


def test_engine_info_and_a_jupyter_client_on_an_engine(rc):
    info = rc.engine_info(0)
    assert info["pid"] > 0 and info["hostname"]
    rc[0]["pushed"] = {"from": "direct view"}
    context = zmq.Context()  # (its own, destroyed after: a client's default one is never)
    kc = BlockingKernelClient(context=context)
    try:
        kc.load_connection_info(info["connection_info"])
        kc.start_channels()
        kc.wait_for_ready(timeout=10)
        reply = kc.execute_interactive("print(pushed['from'])", timeout=10)
        assert reply["content"]["status"] == "ok"
        kc.execute_interactive("from_console = 41 + 1", timeout=10)
    finally:
        kc.stop_channels()
        context.destroy(linger=0)
    assert rc[0]["from_console"] == 42


def test_start_stop_restart_engines(cluster_factory):
    cluster, rc = cluster_factory.start(1)
    new = cluster.start_engines_sync(1)
    assert new == [1] and rc.ids == [0, 1]
    cluster_factory.pids.append(rc.engine_info(1)["pid"])
    old_pid = rc.engine_info(0)["pid"]
    cluster.stop_engines_sync([0])
    assert wait_gone([old_pid]) == []
    assert rc.ids == [1]
    restarted = cluster.restart_engines_sync()
    assert rc.ids == restarted
    cluster_factory.pids += [rc.engine_info(i)["pid"] for i in rc.ids]


def test_shutdown_updates_ids_before_it_returns(cluster_factory):
    """The controller's event may come after the reply: ``ids`` must not wait for it."""
    _, rc = cluster_factory.start(2)
    transport = rc.transport
    on_event = transport._on_event
    transport._on_event = lambda m: None if m.msg_type == "px_engine_unregistered" else on_event(m)
    rc.shutdown(targets=[0])
    assert rc.ids == [1]
    with pytest.raises(jx.EngineError, match="engine 0 was shut down by a client"):
        rc[0].apply_sync(abs, 1)
    assert rc[1].apply_sync(abs, -2) == 2


def test_from_file_in_another_process(cluster_factory):
    cluster, rc = cluster_factory.start(2)
    code = (
        "import jupyter_ext as jx, sys\n"
        f"c = jx.Cluster.from_file({cluster.cluster_id!r})\n"
        "rc = c.connect_client_sync()\n"
        "print(rc.ids, rc[:].apply_sync(abs, -3))\n"
        "rc.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1] [3, 3]"
    attached = jx.Cluster.from_file(rc.connection_file)
    assert attached.controller_pid == cluster.controller_pid and attached.running


def test_shutdown_from_the_client(cluster_factory):
    """Engines by id, then the controller: with ``hub=True`` the targets name nothing more
    (IPython Parallel's), not even a dead engine's id."""
    cluster, rc = cluster_factory.start(2)
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    with pytest.raises(jx.InvalidTarget):  # (the client's own refusal, as for any call)
        rc.shutdown(targets=99)
    with pytest.raises(jx.InvalidTarget):
        rc.shutdown(targets=-3)
    assert rc.queue_status(targets=-1) == rc.queue_status()[1]  # (the last, as in IPP)
    assert rc.direct_view(targets=-1).apply_sync(os.getpid) == pids[1]
    rc.shutdown(targets=[0])
    assert wait_gone(pids[:1]) == [] and rc.ids == [1]
    rc.shutdown(targets=[0], hub=True)
    assert wait_gone([*pids, cluster.controller_pid]) == []


def test_cli_install_start_list_stop(tmp_path):
    prefix = tmp_path / "prefix"
    out = subprocess.run(
        [JUPYTER_PX, "install", "--prefix", str(prefix)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/jupyter-px-engine/kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "kernel_engine.engine"]

    t0 = time.monotonic()
    out = subprocess.run(
        [JUPYTER_PX, "start", "-n", "2", "--cluster-id", "cli-test"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    assert "2 engines ready" in out.stdout and time.monotonic() - t0 < 60
    rc = jx.Client("cli-test")
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    controller = json.loads(Path(rc.connection_file).read_text())["controller_pid"]
    try:
        assert rc.ids == [0, 1]
        listed = subprocess.run(
            [JUPYTER_PX, "list", "--json"], capture_output=True, text=True, timeout=30
        )
        assert "cli-test" in listed.stdout
        engines = subprocess.run(
            [JUPYTER_PX, "engines", "--cluster-id", "cli-test"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert f"pid {pids[0]}" in engines.stdout
    finally:
        rc.close()
        stopped = subprocess.run(
            [JUPYTER_PX, "stop", "--cluster-id", "cli-test"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        left = wait_gone([*pids, controller])
    assert stopped.returncode == 0, stopped.stderr
    assert left == []


def test_client_finds_the_newest_cluster(rc):
    other = jx.Client()
    try:
        assert other.ids == rc.ids
    finally:
        other.close()


def test_close_after_the_io_thread_stopped(rc):
    """close() must not fail when the IO thread has already left its loop (a race with
    its own poll timing out)."""
    other = jx.Client(rc.connection_file)
    io = other.transport.io
    io._running = False
    io.thread.join(5)
    assert not io.thread.is_alive()
    other.close()


def test_missing_cluster_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no cluster"):
        jx.Client("no-such-cluster")


def test_first_execute_after_connecting_gets_its_output_promptly(cluster_factory):
    """A new client's iopub subscription works before Client() returns: no lost idle."""
    _, rc = cluster_factory.start(2)
    t0 = time.monotonic()
    ar = rc[:].execute("print('first')", block=True)
    assert time.monotonic() - t0 < 1.5
    assert ar.stdout == ["first\n", "first\n"]


def test_the_controller_brings_an_outdated_engine_spec_up_to_date(
    cluster_factory, tmp_path, monkeypatch
):
    """The engine kernel spec is checked (and installed or replaced) by the controller as
    it starts, while its fork template imports, not by the client before launching it."""
    from kernel_engine import kernelspec

    old = kernelspec.spec_dict()
    old["metadata"]["jupyter_px"]["spec_version"] = 1
    old["metadata"].pop("kernel_provisioner")
    folder = tmp_path / "kernels" / kernelspec.KERNEL_NAME
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(old))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    _, rc = cluster_factory.start(1)
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["metadata"]["jupyter_px"]["spec_version"] == kernelspec.SPEC_VERSION
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "jupyter-px-fork"
    assert rc[0].apply_sync(abs, -3) == 3


def test_min_engines_and_engine_logs_arguments_are_checked(cluster_factory):
    """``Cluster(n=2, min_engines=5)`` was taken (``jupyter px start`` refuses it): the start
    waited for engines that never come. ``engine_logs(lines=0)`` gave whole logs, and
    ``lines="5"`` a TypeError naming nothing."""
    with pytest.raises(ValueError, match="min_engines=5 is more than the 2 engines"):
        jx.Cluster(n=2, min_engines=5)
    cluster = jx.Cluster(n=3, min_engines=3)
    with pytest.raises(ValueError, match="min_engines=3 is more than the 1 engines"):
        cluster.start_cluster_sync(1)
    assert not cluster.running
    cluster, rc = cluster_factory.start(1)
    rc[0].apply_sync(print, "hello")
    whole = cluster.engine_logs()[0]
    assert whole and cluster.engine_logs(lines=0)[0] == ""
    assert cluster.engine_logs(lines=1)[0] == whole.splitlines()[-1]
    with pytest.raises(TypeError, match="lines"):
        cluster.engine_logs(lines="5")


def test_an_ip_that_is_not_this_machines_is_refused_before_anything_starts():
    """``Cluster(ip=...)`` of an address this machine does not have started a controller
    that failed with zmq's traceback; now a ClusterError names the address, and no
    controller is started. (192.0.2.1 is a documentation address: binding to it fails
    here without a packet sent.)"""
    cluster = jx.Cluster(n=1, ip="192.0.2.1")
    with pytest.raises(jx.ClusterError, match=r"ip='192\.0\.2\.1' is not an address of this"):
        cluster.start_cluster_sync()
    assert cluster.controller_pid is None and not cluster.folder.exists()


def test_cluster_takes_ipython_parallels_constructor_names():
    """``Cluster(n=2, controller_ip=..., engine_timeout=..., delay=..., load_profile=...,
    send_engines_connection_env=..., controller="local")``, as IPython Parallel's code
    writes it, was a TypeError (unexpected keyword argument)."""
    cluster = jx.Cluster(
        n=2,
        controller_ip="127.0.0.1",
        engine_timeout=30,
        delay=0.5,
        load_profile=False,
        send_engines_connection_env=True,
        controller="local",
    )
    assert cluster.ip == "127.0.0.1" and cluster.start_timeout == 30 and cluster.delay == 0.5
    with pytest.raises(ValueError, match="not both"):
        jx.Cluster(n=1, ip="127.0.0.2", controller_ip="127.0.0.1")
    with pytest.raises(ValueError, match="not both"):
        jx.Cluster(n=1, start_timeout=10, engine_timeout=30)
    with pytest.raises(ValueError, match="controller='ssh'"):
        jx.Cluster(n=1, controller="ssh")
    with pytest.raises(TypeError, match="delay"):
        jx.Cluster(n=1, delay="1")
    with pytest.raises(TypeError, match="load_profile"):
        jx.Cluster(n=1, load_profile=1)


def test_engine_calls_take_ipython_parallels_engine_set_id(cluster_factory):
    """``start_engines(n, engine_set_id=...)``, ``stop_engines(engine_set_id=...)``,
    ``restart_engines(engine_set_id=...)`` and ``signal_engines(sig, engine_set_id=...)``
    (IPython Parallel's argument name) raised TypeError; the ids start_engines returns
    are the engine set's handle."""
    import signal

    cluster, rc = cluster_factory.start(1)
    added = cluster.start_engines_sync(1, engine_set_id="more")
    assert len(added) == 1 and added[0] in rc.ids and len(rc.ids) == 2
    cluster.signal_engines_sync(signal.SIGINT, engine_set_id=added)
    again = cluster.restart_engines_sync(engine_set_id=added)
    assert len(again) == 1 and again[0] not in added
    asyncio.run(cluster.stop_engines(engine_set_id=again))
    deadline = time.monotonic() + 30
    while again[0] in rc.ids and time.monotonic() < deadline:
        time.sleep(0.1)
    assert again[0] not in rc.ids and len(rc.ids) == 1
    with pytest.raises(TypeError, match="not both"):
        cluster.stop_engines_sync(again, engine_set_id=again)


def test_file_retention_with_the_in_memory_store_is_refused():
    """``Cluster(db="memory", db_max_bytes=...)`` was taken and did nothing (retention
    bounds the SQLite file): now a ValueError says so."""
    for retention in ({"db_max_bytes": 64 << 20}, {"db_max_age": 3600}):
        with pytest.raises(ValueError, match="db='memory' keeps none"):
            jx.Cluster(n=1, db="memory", **retention)
    assert jx.Cluster(n=1, db="sqlite", db_max_bytes=64 << 20).db_max_bytes == 64 << 20
