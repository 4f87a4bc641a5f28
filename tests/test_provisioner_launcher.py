"""Engines started from a kernel spec by its kernel provisioner (``engines="provisioner"``).

The specs live in a temporary folder on ``$JUPYTER_PATH`` (set for these tests only):
one naming jupyter_client's ``local-provisioner`` explicitly, one naming this project's
``jupyter-px-fork``, and broken ones. Each started cluster runs tasks, shows its engines'
output and leaves no process once stopped; a broken spec fails within seconds with a
message naming it (and quoting its kernel's own output when it ran).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ClusterFactory, kill_pids, stop_leaves_nothing, wait_gone

import jupyter_ext as jx
from kernel_engine.errors import ClusterError
from kernel_engine.launchers.provisioner import ProvisionerLauncher, check_spec, engine_spec

FAILING = "import sys; sys.stderr.write('px-spec-boom: no such thing\\n'); sys.exit(3)"
SILENT = "import time; print('px-spec-silent: up', flush=True); time.sleep(60)"
SLOW_NAME = "px-test-slow-provisioner"
SLOW = """
import asyncio
from jupyter_client.provisioning import LocalProvisioner

class SlowProvisioner(LocalProvisioner):
    async def pre_launch(self, **kwargs):
        await asyncio.sleep(1.5)  # (a container or a pod being made)
        return await super().pre_launch(**kwargs)
"""


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernel specs in a temporary Jupyter path, the user's own ones untouched."""
    root = tmp_path_factory.mktemp("jupyter-path")
    python = sys.executable
    kernels = {
        "px-test-local": engine_spec("local-provisioner"),
        "px-test-fork": engine_spec("jupyter-px-fork"),
        "px-test-failing": {**engine_spec(), "argv": [python, "-c", FAILING]},
        "px-test-silent": {**engine_spec(), "argv": [python, "-c", SILENT]},
        "px-test-ipykernel": {
            **engine_spec(),
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        },
        "px-test-nowhere": engine_spec("px-test-no-such-provisioner"),
        "px-test-slow": engine_spec(SLOW_NAME),
    }
    for name, spec in kernels.items():
        folder = root / "kernels" / name
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(json.dumps(spec))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = saved


def kernel_pids(cluster) -> list[int]:
    """The kernels' PIDs and everything under them, from the launcher's record."""
    records = json.loads((cluster.folder / "launchers.json").read_text())
    pids = [pid for record in records for pid, _ in record["pids"]]
    for pid in list(pids):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return pids


@pytest.mark.parametrize(
    ("spec", "engines"), [("px-test-local", "provisioner"), ("px-test-fork", None)]
)
def test_engines_from_a_spec_run_tasks_show_output_and_stop_completely(
    specs: Path, cluster_factory: ClusterFactory, spec: str, engines: str | None
) -> None:
    kwargs = {"engines": engines} if engines else {}  # (kernel_name alone implies it)
    cluster, rc = cluster_factory.start(2, kernel_name=spec, start_timeout=30, **kwargs)
    assert cluster.engines == "provisioner"
    assert rc.ids == [0, 1]
    pids = kernel_pids(cluster)
    engine_pids = sorted(rc.engine_info(i)["pid"] for i in rc.ids)
    assert sorted(rc[:].apply_sync(os.getpid)) == engine_pids
    assert set(engine_pids) <= set(pids)  # (the registered engines are the kernels started)
    # (the id came in the environment, which the engine does not pass on to what it starts)
    assert rc[:].apply_sync(lambda: os.environ.get("JUPYTER_PX_ENGINE_ID")) == [None, None]

    rc[:].apply_sync(lambda: print("px-provisioner-output", flush=True))
    rc[:].apply_sync(lambda: print("px-provisioner-stderr", file=sys.__stderr__, flush=True))
    logs = cluster.engine_logs()
    for eid in (0, 1):
        assert f"as engine {eid}" in logs[eid]  # (the engine's own stderr, in its log)
        assert "px-provisioner-stderr" in logs[eid]
    assert spec in logs["provisioner-0"]

    started = time.monotonic()
    cluster.stop_cluster_sync(timeout=10)
    assert time.monotonic() - started < 10
    left = wait_gone(pids, timeout=5)
    kill_pids(left)
    assert not left, f"left running: {left}"


def test_a_kernel_that_dies_is_reported_with_its_exit(
    specs: Path, cluster_factory: ClusterFactory
) -> None:
    _, rc = cluster_factory.start(2, kernel_name="px-test-fork", start_timeout=30)
    pid = rc.engine_info(1)["pid"]
    rc[1].apply_async(os._exit, 7)
    deadline = time.monotonic() + 10
    while 1 in rc.ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rc.ids == [0]
    assert not wait_gone([pid], timeout=5)
    assert rc[0].apply_sync(lambda: 6 * 7) == 42


def test_an_unknown_spec_or_provisioner_is_refused_before_anything_starts(specs: Path) -> None:
    import jupyter_ext as jx

    with pytest.raises(ValueError, match="no kernel spec named 'px-test-no-such-spec'"):
        jx.Cluster(n=1, kernel_name="px-test-no-such-spec")
    with pytest.raises(ValueError, match=r"'px-test-nowhere'.*'px-test-no-such-provisioner'"):
        jx.Cluster(n=1, engines="provisioner", kernel_name="px-test-nowhere")
    with pytest.raises(ValueError, match="'px-test-ipykernel' runs `-m ipykernel_launcher`"):
        jx.Cluster(n=1, kernel_name="px-test-ipykernel")
    with pytest.raises(ValueError, match="needs kernel_name"):
        jx.Cluster(n=1, engines="provisioner")
    with pytest.raises(ValueError, match="kernel_name"):
        jx.Cluster(n=1, engines="mpi", kernel_name="px-test-local")
    with pytest.raises(TypeError, match="kernel_name"):
        check_spec(3)
    assert check_spec("px-test-local").argv[2] == "kernel_engine.engine.register"
    assert ProvisionerLauncher.options == {"kernel_name"}


def _failed_start(cluster_factory: ClusterFactory, n: int, spec: str, timeout: float) -> str:
    """The message of the ClusterError that starting ``n`` engines of ``spec`` raises
    (within 10 s)."""
    cluster = cluster_factory(n, kernel_name=spec, start_timeout=timeout)
    started = time.monotonic()
    with pytest.raises(ClusterError) as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 10
    return str(info.value)


def test_a_spec_whose_kernel_fails_raises_quickly_with_its_stderr(
    specs: Path, cluster_factory: ClusterFactory
) -> None:
    message = _failed_start(cluster_factory, 2, "px-test-failing", 30)
    assert "kernel spec 'px-test-failing'" in message
    assert "exited with code 3" in message
    assert "px-spec-boom: no such thing" in message  # (the kernel's own stderr)


def test_a_spec_whose_kernel_never_registers_fails_at_the_timeout_with_its_output(
    specs: Path, cluster_factory: ClusterFactory
) -> None:
    message = _failed_start(cluster_factory, 1, "px-test-silent", 2)
    assert "0 of 1 engines ready within 2 s" in message
    assert "px-test-silent" in message  # (the launcher's account names the spec)
    assert "px-spec-silent: up" in message  # (and the kernel's own output)


def test_stopping_a_cluster_whose_controller_was_killed_stops_its_kernels(
    specs: Path, cluster_factory: ClusterFactory
) -> None:
    cluster, rc = cluster_factory.start(2, kernel_name="px-test-local", start_timeout=30)
    stop_leaves_nothing(cluster, kernel_pids(cluster), kill_controller_of=rc)


def test_a_registering_engine_takes_its_id_and_ports_from_what_a_kernel_manager_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_engine.engine import register
    from kernel_engine.errors import RegistrationError

    args = register.parser().parse_args(["-f", str(tmp_path / "kernel.json")])
    monkeypatch.setenv(register.ID_ENV, "5")
    assert register.requested_id(args) == 5
    assert register.ID_ENV not in os.environ
    assert register.requested_id(register.parser().parse_args(["--id", "2"])) == 2
    monkeypatch.setenv(register.ID_ENV, "five")
    with pytest.raises(RegistrationError, match="JUPYTER_PX_ENGINE_ID"):
        register.requested_id(args)
    ports = {"shell_port": 6001, "iopub_port": 6002, "stdin_port": 6003}
    ports |= {"control_port": 6004, "hb_port": 6005}
    (tmp_path / "kernel.json").write_text(json.dumps({"ip": "127.0.0.1", "key": "k", **ports}))
    assert register.given_ports(args.connection_file) == ("127.0.0.1", ports)
    conn = register.kernel_connection_file(tmp_path, "127.0.0.1", {"key": "cluster"}, ports)
    assert json.loads(conn.read_text()) == {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "key": "cluster",  # (the cluster's key, not the file's)
        "signature_scheme": "hmac-sha256",
        **ports,
    }
    (tmp_path / "kernel.json").write_text(json.dumps({"transport": "ipc"}))
    with pytest.raises(RegistrationError, match="not the connection file of a TCP kernel"):
        register.given_ports(args.connection_file)


def test_a_slow_provisioner_does_not_hold_up_the_controller(
    specs: Path, cluster_factory: ClusterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a provisioner installed for this test only: its module and entry point on the path
    # of this process and of the controller)
    (tmp_path / "px_slow_provisioner.py").write_text(SLOW)
    info = tmp_path / "px_slow_provisioner-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: px-slow-provisioner\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[jupyter_client.kernel_provisioners]\n{SLOW_NAME} = px_slow_provisioner:SlowProvisioner\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))

    cluster = cluster_factory(3, kernel_name="px-test-slow", start_timeout=60)
    started = threading.Thread(target=cluster.start_cluster_sync, daemon=True)
    t0 = time.monotonic()
    started.start()
    deadline = t0 + 20
    while not cluster.connection_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    rc = jx.Client(cluster.connection_file)
    try:
        asked = time.monotonic()
        status = rc.queue_status()
        answered = time.monotonic() - asked
        # the controller answers at once while its kernels are still being made (4.5 s)
        assert answered < 1.0 and time.monotonic() - t0 < 4.0, (answered, status)
        assert len(rc.ids) < 3
        started.join(30)
        assert not started.is_alive()
        rc.wait_for_engines(3, timeout=30)
        assert sorted(rc[:].apply_sync(lambda: 1)) == [1, 1, 1]
        cluster_factory.record(cluster, rc)
    finally:
        rc.close()


def test_a_kernel_still_starting_when_the_launcher_stops_is_stopped_too(
    specs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (no processes: a kernel start that takes 1 s, and a stop that waits 0.25 s for it)
    from types import SimpleNamespace

    from kernel_engine.launchers import provisioner
    from kernel_engine.launchers.base import LaunchContext

    stopped: list[int] = []

    def slow_start(self: ProvisionerLauncher, eid: int) -> SimpleNamespace:
        time.sleep(1.0)
        km = SimpleNamespace(
            request_shutdown=lambda: None, shutdown_kernel=lambda now: stopped.append(eid)
        )
        return SimpleNamespace(
            eid=eid, km=km, pid=None, started=None, exit_code=lambda: (eid in stopped, 0)
        )

    monkeypatch.setattr(ProvisionerLauncher, "_start_kernel", slow_start)
    monkeypatch.setattr(provisioner, "kill_recorded", lambda trees, wait: None)
    context = LaunchContext(tmp_path, 3, 0, options={"kernel_name": "px-test-local"})
    launcher = ProvisionerLauncher(context)
    assert launcher.start() == [0, 1, 2] and not launcher.start_done()
    time.sleep(0.2)
    t0 = time.monotonic()
    launcher.stop(0.5)
    assert time.monotonic() - t0 < 1.0 and stopped == []  # (engine 0 still starting)
    deadline = time.monotonic() + 5
    while not launcher.start_done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.start_done()
    assert stopped == [0]  # (the start thread stopped it, and started no other)
    assert launcher.kernels == [] and launcher.poll() is None
