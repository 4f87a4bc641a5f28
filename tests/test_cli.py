"""``jupyter px`` as real subprocesses: start, list, engines, stop and clean; what a killed
controller leaves behind; PID reuse; and kernel_engine importing nothing of jupyter_ext."""

from __future__ import annotations

import ast
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import kill_pids, wait_gone

from kernel_engine import clusters, processes
from kernel_engine.cli import main as px_main

ROOT = Path(__file__).resolve().parent.parent
KEY_FILES = {"client.json", "cluster.json", "engine-0.json"}


def px(
    *args: str, timeout: float = 90, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``jupyter px ARGS`` (the runtime dir is the session's, from conftest; ``env``:
    more environment)."""
    return subprocess.run(
        [sys.executable, "-m", "kernel_engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


class CliClusters:
    """Clusters started by ``jupyter px start``; stopped, and checked gone, by PID."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pids: list[int] = []
        self.output: subprocess.CompletedProcess[str] | None = None
        """What the last ``jupyter px start`` printed."""

    def start(
        self, n: int, *extra: str, env: dict[str, str] | None = None
    ) -> clusters.ClusterState:
        cluster_id = f"cli-{uuid.uuid4().hex[:8]}"
        self.ids.append(cluster_id)
        out = self.output = px("start", "-n", str(n), "--cluster-id", cluster_id, *extra, env=env)
        assert out.returncode == 0, out.stderr
        assert f"{n} engines ready" in out.stdout
        state = clusters.read_cluster(clusters.cluster_folder(cluster_id))
        assert state.running and state.controller_pid
        self.pids.append(state.controller_pid)
        self.pids += engine_pids(state)
        return state

    def stop_all(self) -> None:
        for cluster_id in self.ids:
            if clusters.read_cluster(clusters.cluster_folder(cluster_id)).running:
                px("stop", "--cluster-id", cluster_id)
        left = wait_gone(self.pids, timeout=20)
        if left:
            kill_pids(left)
            pytest.fail(f"processes left after stopping clusters: {left}")


def engine_pids(state: clusters.ClusterState) -> list[int]:
    return [int(e["pid"]) for e in state.info.get("engines", {}).values()]


@pytest.fixture
def cli() -> Iterator[CliClusters]:
    started = CliClusters()
    yield started
    started.stop_all()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process, whose PID a stale record may name."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(10)


def test_start_list_engines_stop(cli):
    state = cli.start(1)
    cid, folder = state.cluster_id, state.folder
    assert stat.S_IMODE(state.connection_file.stat().st_mode) == 0o600

    listed = px("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [mine] = [c for c in json.loads(listed.stdout) if c["cluster_id"] == cid]
    assert mine["controller_pid"] == state.controller_pid and mine["ready"] == [0]
    assert cid in px("list").stdout

    engines = px("engines", "--cluster-id", cid)
    assert engines.returncode == 0, engines.stderr
    [pid] = engine_pids(state)
    assert f"engine 0: pid {pid} on " in engines.stdout and "(ready)" in engines.stdout
    assert processes.running(pid)

    stopped = px("stop", "--cluster-id", cid)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped cluster {cid}" in stopped.stdout
    assert wait_gone([state.controller_pid, pid]) == []
    assert not names(folder) & KEY_FILES
    assert {"controller.log", "engine-0.log"} <= names(folder)  # logs stay
    assert cid not in px("list").stdout
    assert px("engines", "--cluster-id", cid).returncode == 1


def test_start_engines_mpi_then_stop_leaves_no_process(cli):
    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec (make system-deps installs Open MPI)")
    # (ranks on loopback and shared memory only; see test_mpi)
    env = {
        "OMPI_MCA_btl": "self,vader",
        "OMPI_MCA_oob_tcp_if_include": "lo",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    }
    state = cli.start(2, "--engines", "mpi", "--mpi-args=--oversubscribe", env=env)
    engines = sorted(state.info["engines"].items(), key=lambda item: int(item[0]))
    assert [int(eid) for eid, _ in engines] == [0, 1]
    [record] = json.loads((state.folder / "launchers.json").read_text())
    assert record["launcher"] == "mpi" and record["ids"] == [0, 1]
    tree = [record["pid"], *(p.pid for p in psutil.Process(record["pid"]).children(True))]
    assert set(engine_pids(state)) <= set(tree)
    cli.pids += tree
    shown = px("engines", "--cluster-id", state.cluster_id)
    assert shown.stdout.count("(ready)") == 2, shown.stdout

    stopped = px("stop", "--cluster-id", state.cluster_id, timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    left = wait_gone([state.controller_pid, *tree], timeout=10)
    kill_pids(left)
    assert not left, f"left running after jupyter px stop: {left}"
    assert "-n 2 --oversubscribe" in (state.folder / "mpiexec-0.log").read_text()


BAD_STARTS = [
    (["-n", "two"], "argument -n/--n: expected a whole number, not 'two'"),
    (["-n", "-1"], "argument -n/--n: expected a whole number from 0 to 4096, not '-1'"),
    (["--n", "1.5"], "expected a whole number, not '1.5'"),
    (["--timeout", "soon"], "argument --timeout: expected a number"),
    (["--engine-grace", "-3"], "argument --engine-grace: expected a number at least 0"),
    (["--engines", "nope"], "--engines: engines='nope' names no launcher"),
    (["--engines", "no.such.module:Launcher"], "cannot load launcher"),
    (["--mpi-args=--oversubscribe"], "--mpi-args: not an option of --engines local"),
    (["--engines", "mpi", "--hosts", "a=2"], "--hosts: not an option of --engines mpi"),
    (["--engines", "mpi", "--mpi-args", "'unclosed"], "argument --mpi-args: cannot split"),
    (["--engines", "ssh"], "--engines ssh needs --hosts"),
    (["--engines", "ssh", "--hosts", "a=two"], "'a=two': the count after '=' must be a number"),
    (["--engines", "ssh", "--hosts", "a=0"], "hosts['a'] must be between 1 and 4096"),
    (["--engines", "ssh", "--hosts", "a,a"], "'a' is named twice"),
    (["--engines", "ssh", "--hosts", "10.77.9.9"], "--ip: engines on 10.77.9.9 cannot reach"),
    (["--engines", "slurm", "--walltime", "soon"], "argument --walltime: expected minutes"),
    (["--min-engines", "0"], "argument --min-engines: expected a whole number from 1"),
    (["-n", "2", "--min-engines", "3"], "--min-engines 3 is more than the 2 engines"),
]


@pytest.mark.parametrize(("args", "message"), BAD_STARTS, ids=[" ".join(a) for a, _ in BAD_STARTS])
def test_a_bad_start_flag_says_what_is_wrong_and_starts_nothing(args, message, capsys):
    cluster_id = f"cli-bad-{uuid.uuid4().hex[:8]}"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        code = px_main(["start", "--cluster-id", cluster_id, *args])
    except SystemExit as exc:  # (argparse's own errors)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "jupyter px start: error: " in err and message in err, err
    assert not clusters.cluster_folder(cluster_id).exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_a_bad_start_flag_exits_with_code_2():
    cluster_id = f"cli-bad-{uuid.uuid4().hex[:8]}"
    out = px("start", "--cluster-id", cluster_id, "--engines", "mpi", "-n", "x")
    assert out.returncode == 2
    assert "argument -n/--n: expected a whole number, not 'x'" in out.stderr
    assert not clusters.cluster_folder(cluster_id).exists()


@pytest.mark.parametrize("bad", ["nan", "-1", "inf", "soon"])
def test_a_bad_stop_timeout_is_refused_before_anything_is_stopped(bad, capsys):
    """``jupyter px stop --timeout nan`` (or -1) was taken, and SIGKILLed the controller at
    once instead of letting it stop its engines and close its task store."""
    with pytest.raises(SystemExit) as exc:
        px_main(["stop", "--cluster-id", "any", "--timeout", bad])
    assert exc.value.code == 2
    assert "argument --timeout: expected a number" in capsys.readouterr().err


def _kill_controller(state: clusters.ClusterState) -> None:
    """SIGKILL a controller; its engines then exit by themselves, leaving their files."""
    assert state.controller_pid is not None
    os.kill(state.controller_pid, signal.SIGKILL)
    assert wait_gone([state.controller_pid]) == []
    assert wait_gone(engine_pids(state), timeout=30) == []
    assert names(state.folder) >= KEY_FILES
    assert clusters.read_cluster(state.folder).state == "dead"


@pytest.mark.parametrize(
    "remover", ["px start", "Cluster.start_cluster_sync", "px stop", "px list"]
)
def test_a_killed_controllers_key_files_are_removed(cli, cluster_factory, remover, monkeypatch):
    # engines wait this long for a restarted controller before they leave
    monkeypatch.setenv("JUPYTER_PX_ENGINE_GRACE", "2")
    state = cli.start(1)
    _kill_controller(state)
    cid = state.cluster_id
    if remover == "px start":
        cli.start(0)
        assert cli.output is not None
        assert f"removed the key files of dead cluster {cid}" in cli.output.stderr
    elif remover == "Cluster.start_cluster_sync":
        cluster = cluster_factory(0)
        cluster.start_cluster_sync()
        cluster_factory.pids.append(cluster.controller_pid)
    elif remover == "px stop":
        out = px("stop", "--cluster-id", cid)
        assert out.returncode == 0, out.stderr
        assert f"cluster {cid} was not running" in out.stdout
        assert "removed its key files: client.json, cluster.json, engine-0.json" in out.stdout
    else:
        out = px("list")
        assert out.returncode == 0, out.stderr
        assert f"removed the key files of dead cluster {cid}" in out.stderr
        assert cid not in out.stdout
    assert not names(state.folder) & KEY_FILES
    assert "controller.log" in names(state.folder)

    cleaned = px("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed dead cluster {cid}" in cleaned.stdout
    assert not state.folder.exists()


def _fake_cluster(folder: Path, record: str, **fields: object) -> None:
    folder.mkdir(parents=True)
    for name in ("client.json", "engine-0.json"):
        (folder / name).write_text(json.dumps({"key": "secret", **fields}))
    (folder / record).write_text(json.dumps({"cluster_id": folder.name, **fields}))
    (folder / "controller.log").write_text("a log\n")


def test_clean_removes_dead_clusters_only(cli, sleeper):
    running = cli.start(0)
    dead = clusters.cluster_folder(f"cli-dead-{uuid.uuid4().hex[:8]}")
    _fake_cluster(dead, "cluster.json", controller_pid=sleeper.pid)
    starting = clusters.cluster_folder(f"cli-starting-{uuid.uuid4().hex[:8]}")
    starting.mkdir()
    (starting / "controller.log").write_text("no record yet: a controller may be starting\n")

    out = px("clean")
    assert out.returncode == 0, out.stderr
    assert f"removed dead cluster {dead.name}" in out.stdout
    assert not dead.exists()
    assert starting.exists()  # within clusters.STARTING_GRACE
    assert {"client.json", "cluster.json", "launch.json"} <= names(running.folder)
    assert clusters.read_cluster(running.folder).running
    assert sleeper.poll() is None


def test_a_reused_pid_is_not_a_live_cluster(sleeper):
    """Stale records naming a PID now used by an unrelated process: not running, not
    signalled, and their key files go."""
    pid = sleeper.pid
    by_cmdline = clusters.cluster_folder(f"cli-reused-{uuid.uuid4().hex[:8]}")
    _fake_cluster(by_cmdline, "cluster.json", controller_pid=pid)
    by_start = clusters.cluster_folder(f"cli-reused-{uuid.uuid4().hex[:8]}")
    _fake_cluster(by_start, "launch.json", controller_pid=pid, controller_started="x:1")
    assert clusters.read_cluster(by_cmdline).state == "dead"
    assert clusters.read_cluster(by_start).state == "dead"
    # what does identify a process: its start time, or a command line naming the folder
    assert clusters.is_controller(pid, by_start, processes.start_time(pid))
    code = "import time; print('up', flush=True); time.sleep(120)"
    named = subprocess.Popen(
        [sys.executable, "-c", code, "--folder", str(by_cmdline)], stdout=subprocess.PIPE
    )
    try:
        # its command line is the one asked for only once it runs (after exec)
        assert select.select([named.stdout], [], [], 30)[0]
        assert clusters.is_controller(named.pid, by_cmdline)
    finally:
        named.kill()
        named.communicate(timeout=10)

    listed = px("list", "--json")
    ids = [c["cluster_id"] for c in json.loads(listed.stdout)]
    assert by_cmdline.name not in ids and by_start.name not in ids
    assert not names(by_cmdline) & KEY_FILES
    stopped = px("stop", "--cluster-id", by_start.name)
    assert stopped.returncode == 0, stopped.stderr
    assert "was not running" in stopped.stdout
    assert not names(by_start) & KEY_FILES
    assert sleeper.poll() is None  # never signalled


def test_private_json_is_written_whole_and_0600(tmp_path):
    path = tmp_path / "client.json"
    clusters.write_private_json(path, {"key": "k1"})
    clusters.write_private_json(path, {"key": "k2"})
    assert json.loads(path.read_text()) == {"key": "k2"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["client.json"]
    record = clusters.controller_record()
    assert record["controller_pid"] == os.getpid()
    assert record["controller_started"] == processes.start_time(os.getpid())


def test_kernel_engine_imports_nothing_from_jupyter_ext():
    code = (
        "import importlib, pkgutil, sys\n"
        "import kernel_engine, kernel_engine.cli\n"
        "for m in pkgutil.walk_packages(kernel_engine.__path__, 'kernel_engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'jupyter_ext'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # imports inside functions too, which importing the modules does not run
    for path in (ROOT / "kernel_engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not [m for m in modules if m.split(".")[0] == "jupyter_ext"], path
