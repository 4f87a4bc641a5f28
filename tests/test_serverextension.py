"""The cluster REST API on a real Jupyter server: list, create, start, scale, stop; refusals;
and ``jupyter px install`` enabling the extension.

One server per module (its own runtime and config dirs, so it sees only the clusters made
here), stopped by PID; every process it started is checked gone by PID at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import kill_pids, wait_gone

from kernel_engine import cli, kernelspec, ports

PREFIXES = ("/ipyparallel/clusters", "/jupyter-px/clusters")
# other extensions installed here, off: a faster start, and ipyparallel's own handlers
# would answer /ipyparallel/clusters
OTHER_EXTENSIONS = (
    "ipyparallel",
    "jupyterlab",
    "jupyter_lsp",
    "notebook_shim",
    "jupyter_server_terminals",
)


def _free_port() -> int:
    """A free port outside the ephemeral range, where an outgoing connection cannot take
    it before the server binds it (see kernel_engine.ports)."""
    return ports.PICKER.take("127.0.0.1")


class JupyterServer:
    """A ``jupyter server`` with the extension enabled; records every PID under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.pids: set[int] = set()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        env = dict(os.environ)
        env["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
        env["JUPYTER_CONFIG_DIR"] = str(root / "config")
        argv = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root"]
        argv += ["--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0"]
        argv += [f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}"]
        argv += ["--ServerApp.jpserver_extensions", "jupyter_ext.serverextension=True"]
        for name in OTHER_EXTENSIONS:
            argv += ["--ServerApp.jpserver_extensions", f"{name}=False"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"jupyter server exited: {self.log_tail()}")
            status = urllib.request.Request(f"{self.url}/api/status")
            status.add_header("Authorization", f"token {self.token}")
            try:
                with self.opener.open(status, timeout=2):
                    return
            except OSError:
                time.sleep(0.1)  # nothing to wait on but the port itself
        pytest.fail(f"jupyter server not up within {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def note_pids(self) -> set[int]:
        """Record (and return) the PIDs of every process under the server now."""
        try:
            found = {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.Error:
            found = set()
        self.pids |= found
        return found

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: Any = True,
    ) -> tuple[int, Any, dict[str, str]]:
        """One request: status, decoded JSON body (None if empty) and headers."""
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"token {self.token if token is True else token}")
        try:
            with self.opener.open(request, timeout=90) as response:
                status, text, headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            with exc:
                status, text, headers = exc.code, exc.read(), dict(exc.headers)
        self.note_pids()
        assert b"Traceback" not in text
        return status, json.loads(text) if text else None, headers

    def stop(self) -> None:
        """SIGTERM the server (its clusters stop with it), then check every PID gone."""
        self.note_pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        left = wait_gone(sorted(self.pids), timeout=20)
        if left:
            kill_pids(left)
            pytest.fail(f"processes left after stopping the server: {left}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    started = JupyterServer(tmp_path_factory.mktemp("jupyter-server"))
    try:
        started.wait_up()
        yield started
    finally:
        started.stop()


def running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_list_is_empty_at_first(server: JupyterServer) -> None:
    for prefix in PREFIXES:
        status, listed, _ = server.call("GET", prefix)
        assert (status, listed) == (200, [])


def test_create_start_scale_and_delete(server: JupyterServer) -> None:
    status, model, _ = server.call("POST", PREFIXES[0], {"cluster_id": "rest-a", "n": 1})
    assert status == 201
    assert model["id"] == "rest-a" and model["state"] == "stopped"
    assert model["engines"]["n"] == 0 and model["controller"] is None
    assert not server.note_pids()  # created, not started

    status, model, _ = server.call("POST", f"{PREFIXES[0]}/rest-a", {"start_timeout": 30})
    assert status == 400 and "start_timeout" in model["message"]  # not a start field
    status, model, _ = server.call("POST", f"{PREFIXES[0]}/rest-a", {"n": 1})
    assert status == 200 and model["state"] == "running"
    assert model["engines"] == {"n": 1, "ids": [0], "pids": model["engines"]["pids"]}
    controller = model["controller"]["pid"]
    first_engine = model["engines"]["pids"]["0"]
    assert running(controller) and running(first_engine)
    assert {controller, first_engine} <= server.note_pids()

    # the same cluster, through the other prefix, in the list and by key
    status, listed, _ = server.call("GET", PREFIXES[1])
    assert status == 200 and [m["id"] for m in listed] == ["rest-a"]
    assert listed[0]["engines"]["n"] == 1 and listed[0]["state"] == "running"
    status, model, _ = server.call("GET", f"{PREFIXES[1]}/rest-a")
    assert status == 200 and model["controller"] == {"pid": controller}

    # started again without n: left as it is
    status, model, _ = server.call("POST", f"{PREFIXES[1]}/rest-a")
    assert status == 200 and model["engines"]["n"] == 1

    status, model, _ = server.call("POST", f"{PREFIXES[1]}/rest-a", {"n": 2})
    assert status == 200 and model["engines"]["ids"] == [0, 1] and model["n"] == 2
    second_engine = model["engines"]["pids"]["1"]
    assert running(second_engine)
    status, model, _ = server.call("POST", f"{PREFIXES[0]}/rest-a", {"n": 1})
    assert status == 200 and model["engines"]["ids"] == [0]
    assert wait_gone([second_engine]) == [] and running(first_engine)
    status, listed, _ = server.call("GET", PREFIXES[0])
    assert listed[0]["engines"]["n"] == 1

    status, body, _ = server.call("DELETE", f"{PREFIXES[0]}/rest-a")
    assert (status, body) == (204, None)
    assert not running(controller)  # the DELETE returns once the controller is gone
    assert wait_gone([first_engine]) == []
    assert server.call("GET", f"{PREFIXES[0]}/rest-a")[0] == 404
    assert server.call("GET", PREFIXES[1])[1] == []


def test_create_started_and_conflicts(server: JupyterServer) -> None:
    body = {"cluster_id": "rest-b", "n": 1, "start": True, "start_timeout": 30}
    with ThreadPoolExecutor(1) as pool:
        creating = pool.submit(server.call, "POST", PREFIXES[1], body)
        # while it starts, it is listed as starting, and nothing else may change it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not creating.done():
            status, model, _ = server.call("GET", f"{PREFIXES[0]}/rest-b")
            if status == 200:
                break
        else:
            pytest.fail(f"rest-b was never listed while it started: {creating.result()}")
        assert model["state"] == "starting"
        for method, path_body in [("DELETE", None), ("POST", {"n": 2})]:
            status, reply, _ = server.call(method, f"{PREFIXES[0]}/rest-b", path_body)
            assert status == 409 and "starting" in reply["message"]
        status, model, headers = creating.result(timeout=90)
    assert status == 201 and model["state"] == "running" and model["engines"]["n"] == 1
    assert headers["Location"] == f"{PREFIXES[1]}/rest-b"
    controller = model["controller"]["pid"]
    assert running(controller)
    status, model, _ = server.call("POST", PREFIXES[0], {"cluster_id": "rest-b"})
    assert status == 409 and "rest-b" in model["message"]
    status, _, _ = server.call("DELETE", f"{PREFIXES[1]}/rest-b")
    assert status == 204 and not running(controller)

    # a cluster made without an id gets one; a stopped one deletes at once
    status, model, _ = server.call("POST", PREFIXES[0], {})
    assert status == 201 and model["id"].startswith("px-") and model["state"] == "stopped"
    assert server.call("DELETE", f"{PREFIXES[0]}/{model['id']}")[0] == 204
    assert server.call("GET", PREFIXES[0])[1] == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"n": "2"}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"n": 1.5}, "n must be an integer"),
        ({"n": -1}, "n must be between"),
        ({"start": "yes"}, "start must be true or false"),
        ({"cluster_id": 7}, "cluster_id must be a string"),
        ({"cluster_id": "../../etc"}, "cluster_id"),
        ({"curve": 1}, "curve must be true or false"),
        ({"start_timeout": "30"}, "start_timeout must be"),
        ({"on_client_lost": "explode"}, "on_client_lost"),
        ({"engines": "warp-drive"}, "engines"),
        ({"nn": 1}, "unknown field 'nn'"),
        ([1, 2], "JSON object"),
        ("n", "JSON object"),
        (b"{not json", "Invalid JSON"),
    ],
)
def test_bad_bodies_are_refused(server: JupyterServer, body: Any, named: str) -> None:
    raw, body = (body, None) if isinstance(body, bytes) else (None, body)
    for prefix in PREFIXES:
        status, reply, _ = server.call("POST", prefix, body, raw=raw)
        assert status == 400 and named in reply["message"], reply
    assert server.call("GET", PREFIXES[0])[1] == []  # nothing made


def test_bad_start_bodies_are_refused(server: JupyterServer) -> None:
    assert server.call("POST", PREFIXES[0], {"cluster_id": "rest-c"})[0] == 201
    try:
        for body, named in [({"n": "3"}, "n must be"), ({"n": 9999}, "n must be"), ([], "JSON")]:
            status, reply, _ = server.call("POST", f"{PREFIXES[1]}/rest-c", body)
            assert status == 400 and named in reply["message"], reply
        assert server.call("GET", f"{PREFIXES[0]}/rest-c")[1]["state"] == "stopped"
        assert not server.note_pids()
    finally:
        assert server.call("DELETE", f"{PREFIXES[0]}/rest-c")[0] == 204


def test_unknown_key_is_404(server: JupyterServer) -> None:
    for prefix in PREFIXES:
        for method, body in [("GET", None), ("POST", {"n": 1}), ("DELETE", None)]:
            status, reply, _ = server.call(method, f"{prefix}/no-such-cluster", body)
            assert status == 404 and "no-such-cluster" in reply["message"]


def test_no_token_is_403(server: JupyterServer) -> None:
    for token in (False, "not-the-token"):
        for prefix in PREFIXES:
            calls = [
                ("GET", prefix, None),
                ("POST", prefix, {"cluster_id": "intruder", "n": 1, "start": True}),
                ("GET", f"{prefix}/intruder", None),
                ("POST", f"{prefix}/intruder", {"n": 1}),
                ("DELETE", f"{prefix}/intruder", None),
            ]
            for method, path, body in calls:
                status, _, _ = server.call(method, path, body, token=token)
                assert status == 403, (method, path, token)
    assert server.call("GET", PREFIXES[0])[1] == []
    assert not server.note_pids()


def test_cwd_is_relative_to_the_root_dir(server: JupyterServer) -> None:
    """Engines run in the server's root dir, or in a relative ``cwd`` below it (the
    server process runs elsewhere: the tests' folder)."""
    (server.root / "project").mkdir(exist_ok=True)
    assert os.getcwd() != str(server.root)
    for key, body, where in [
        ("cwd-default", {}, server.root),
        ("cwd-relative", {"cwd": "project"}, server.root / "project"),
        ("cwd-absolute", {"cwd": str(server.root / "project")}, server.root / "project"),
    ]:
        status, model, _ = server.call(
            "POST", PREFIXES[1], {"cluster_id": key, "n": 1, "start": True, **body}
        )
        try:
            assert status == 201, model
            engine_pid = model["engines"]["pids"]["0"]
            assert psutil.Process(engine_pid).cwd() == str(where)
        finally:
            server.call("DELETE", f"{PREFIXES[1]}/{key}")


def test_a_cluster_stopped_elsewhere_is_forgotten(
    server: JupyterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster found running in the runtime dir, then stopped by its owner, is no longer
    listed, nor started again from here (it would outlive the server: adopted clusters
    have no shutdown_atexit)."""
    import jupyter_ext as jx

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server.root / "runtime"))
    cluster = jx.Cluster(n=1, cluster_id="found-elsewhere")
    try:
        cluster.start_cluster_sync()
        listed = server.call("GET", PREFIXES[1])[1]
        assert [(m["id"], m["state"]) for m in listed] == [("found-elsewhere", "running")]
        assert server.call("GET", f"{PREFIXES[1]}/found-elsewhere")[0] == 200
        cluster.stop_cluster_sync()
        assert server.call("GET", PREFIXES[1])[1] == []
        for method, body in [("GET", None), ("POST", {}), ("POST", {"n": 1}), ("DELETE", None)]:
            status, reply, _ = server.call(method, f"{PREFIXES[0]}/found-elsewhere", body)
            assert status == 404 and "found-elsewhere" in reply["message"], (method, reply)
        assert not server.note_pids()

        # running again (its owner started it anew): found again
        cluster.start_cluster_sync()
        status, model, _ = server.call("GET", f"{PREFIXES[1]}/found-elsewhere")
        assert (status, model["controller"]) == (200, {"pid": cluster.controller_pid})
    finally:
        cluster.stop_cluster_sync()
    assert server.call("GET", PREFIXES[1])[1] == []


def test_install_enables_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jupyter_server.extension.config import ExtensionConfigManager

    config_d = tmp_path / "prefix" / "etc" / "jupyter" / "jupyter_server_config.d"
    assert cli.main(["install", "--prefix", str(tmp_path / "prefix")]) == 0
    written = config_d / "jupyter_px.json"
    assert json.loads(written.read_text()) == {
        "ServerApp": {"jpserver_extensions": {"jupyter_ext.serverextension": True}}
    }
    assert (tmp_path / "prefix/share/jupyter/kernels/jupyter-px-engine/kernel.json").is_file()
    # what jupyter_server itself reads from there
    found = ExtensionConfigManager(read_config_path=[str(config_d.parent)])
    assert found.get_jpserver_extensions() == {"jupyter_ext.serverextension": True}

    # idempotent: the same file, untouched; other settings in it are kept
    mtime = written.stat().st_mtime_ns
    assert cli.main(["install", "--prefix", str(tmp_path / "prefix")]) == 0
    assert written.stat().st_mtime_ns == mtime
    written.write_text(json.dumps({"ServerApp": {"jpserver_extensions": {"other": True}}}))
    kernelspec.enable_server_extension(prefix=str(tmp_path / "prefix"))
    assert json.loads(written.read_text())["ServerApp"]["jpserver_extensions"] == {
        "other": True,
        "jupyter_ext.serverextension": True,
    }

    # --user: the Jupyter config dir; --no-server-extension: the kernel spec only
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "user-config"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user-data"))
    assert cli.main(["install", "--user"]) == 0
    assert (tmp_path / "user-config/jupyter_server_config.d/jupyter_px.json").is_file()
    assert cli.main(["install", "--prefix", str(tmp_path / "p2"), "--no-server-extension"]) == 0
    assert not (tmp_path / "p2/etc").exists()
    assert "Enabled the jupyter-px server extension" in capsys.readouterr().out
