"""Engines forked from a template (the ``jupyter-px-fork`` provisioner): real kernels,
started the way the kernel manager asked, watched, and gone when their cluster is."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from conftest import kill_pids, wait_gone
from jupyter_client import BlockingKernelClient, KernelManager

import jupyter_ext as jx
from kernel_engine import kernelspec
from kernel_engine.provisioner import PROVISIONER_NAME
from kernel_engine.templates import DEFAULT_PRELOAD, ForkedProcess, TemplatePool, TemplateProcess

TEMPLATE_MODULE = "kernel_engine.engine.template"


def _is_template(pid: int) -> bool:
    try:
        return TEMPLATE_MODULE in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _parent(pid: int) -> int:
    return psutil.Process(pid).ppid()


@pytest.fixture
def spec_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``JUPYTER_PATH`` holding the engine spec as installed, and one whose
    template cannot import what it is told to preload (``px-broken-template``)."""
    kernels = tmp_path / "jupyter" / "kernels"
    good = kernelspec.spec_dict()
    broken = json.loads(json.dumps(good))
    broken["metadata"]["kernel_provisioner"]["config"] = {"preload": ["no_such_module_px"]}
    for name, spec in ((kernelspec.KERNEL_NAME, good), ("px-broken-template", broken)):
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    yield tmp_path
    # templates started in this (the test) process: stopped, and checked gone by PID
    pool = TemplatePool.instance()
    pids = [t.pid for t in pool.templates.values() if t.pid]
    pool.close()
    assert wait_gone(pids, 5) == []


def _start(name: str, tmp_path: Path, **kwargs: object) -> tuple[KernelManager, Path]:
    km = KernelManager(kernel_name=name, connection_file=str(tmp_path / f"{name}.json"))
    log = tmp_path / f"{name}.log"
    with open(log, "ab") as logf:
        km.start_kernel(stdout=logf, stderr=logf, **kwargs)
    return km, log


def _execute(km: KernelManager, code: str) -> str:
    """Run ``code`` on the kernel through a Jupyter client of its connection file; its
    stdout."""
    context = zmq.Context()  # (its own, destroyed after: a client's default one is never)
    kc = BlockingKernelClient(connection_file=km.connection_file, context=context)
    out: list[str] = []

    def output(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    try:
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive(code, timeout=20, output_hook=output)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        context.destroy(linger=0)
    return "".join(out)


def test_the_engine_spec_names_the_fork_provisioner():
    spec = kernelspec.spec_dict()
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == PROVISIONER_NAME


def test_a_forked_kernel_is_a_real_kernel_with_its_env_cwd_and_output(spec_path: Path):
    cwd = spec_path / "work"
    cwd.mkdir()
    (cwd / "px_local_mod.py").write_text("WHERE = 'cwd'\n")
    env = {**os.environ, "PX_FORK_TEST": "given"}
    km, log = _start(kernelspec.KERNEL_NAME, spec_path, env=env, cwd=str(cwd))
    try:
        assert km.provisioner.forked
        pid = km.provisioner.pid
        assert isinstance(km.provisioner.process, ForkedProcess)
        assert _is_template(_parent(pid))
        assert os.getpgid(pid) == pid  # (its own session, as a launched kernel's)
        out = _execute(
            km,
            "import os, sys, px_local_mod\n"
            "print(os.getpid(), os.getcwd(), os.environ['PX_FORK_TEST'], px_local_mod.WHERE,"
            " os.environ['JPY_PARENT_PID'], sys.argv[1:])\n"
            "os.write(1, b'to the log\\n')",
        )
        got_pid, got_cwd, value, where, parent, argv = out.split(maxsplit=5)
        assert int(got_pid) == pid and got_cwd == str(cwd)
        assert (value, where, int(parent)) == ("given", "cwd", os.getpid())
        assert km.connection_file in argv
        deadline = time.monotonic() + 5
        while b"to the log" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"to the log" in log.read_bytes()
        # a second kernel of the same environment comes from the same template
        km2, _ = _start(kernelspec.KERNEL_NAME, spec_path, env=env, cwd=str(cwd))
        try:
            assert _parent(km2.provisioner.pid) == _parent(pid)
            assert _execute(km2, "print(41 + 1)").strip() == "42"
        finally:
            km2.shutdown_kernel(now=True)
    finally:
        km.shutdown_kernel()
    assert km.provisioner is None or not km.provisioner.has_process
    assert wait_gone([pid], 5) == []


def test_signals_and_exit_codes_of_a_forked_kernel(spec_path: Path):
    km, _ = _start(kernelspec.KERNEL_NAME, spec_path)
    try:
        process = km.provisioner.process
        assert isinstance(process, ForkedProcess) and process.poll() is None
        km.signal_kernel(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() == -signal.SIGKILL
        assert not km.is_alive()
    finally:
        km.shutdown_kernel(now=True)
    km, _ = _start(kernelspec.KERNEL_NAME, spec_path)
    try:
        context = zmq.Context()  # (its own, destroyed after: a client's default one is never)
        kc = BlockingKernelClient(connection_file=km.connection_file, context=context)
        try:
            kc.load_connection_file()
            kc.start_channels()
            kc.wait_for_ready(timeout=30)
            kc.execute("import os; os._exit(7)")
        finally:
            kc.stop_channels()
            context.destroy(linger=0)
        assert km.provisioner.process.wait(10) == 7
    finally:
        km.shutdown_kernel(now=True)


def test_a_template_that_cannot_start_falls_back_to_the_plain_launch(
    spec_path: Path, caplog: pytest.LogCaptureFixture
):
    t0 = time.monotonic()
    km, _ = _start("px-broken-template", spec_path)
    try:
        assert not km.provisioner.forked
        assert _parent(km.provisioner.pid) == os.getpid()
        assert _execute(km, "print('plain')").strip() == "plain"
    finally:
        km.shutdown_kernel(now=True)
    assert time.monotonic() - t0 < 20
    assert any("without a fork template" in r.getMessage() for r in caplog.records)


def test_a_template_started_ahead_and_not_needed_exits_by_itself(tmp_path: Path):
    template = TemplateProcess(
        sys.executable, dict(os.environ), str(tmp_path), list(DEFAULT_PRELOAD), idle_exit=0.2
    )
    try:
        assert template.pid is not None and _is_template(template.pid)
        assert template.process is not None
        assert template.process.wait(15) == 0
        assert template.check() == "dead"
    finally:
        template.stop()


def test_a_cluster_forks_its_engines_and_reports_their_deaths(cluster_factory):
    cluster, rc = cluster_factory.start(2)
    controller = cluster.controller_pid
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    template = _parent(pids[0])
    assert _is_template(template) and _parent(pids[1]) == template
    assert _parent(template) == controller
    # their ports are outside the range outgoing connections take theirs from
    from kernel_engine import ports

    low, high = ports.ephemeral_range()
    for eid in rc.ids:
        info = rc.engine_info(eid)["connection_info"]
        for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
            assert not low <= info[name] <= high, (name, info[name])
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(jx.EngineError, match="SIGKILL"):
        rc[1].apply_sync(time.sleep, 30)
    # the template gone: new engines start the plain way, and work
    os.kill(template, signal.SIGKILL)
    assert wait_gone([template], 5) == []
    new = cluster.start_engines_sync(1)
    cluster_factory.pids.append(rc.engine_info(new[0])["pid"])
    assert _parent(rc.engine_info(new[0])["pid"]) == controller
    assert rc[new[0]].apply_sync(abs, -3) == 3
    assert rc[0].apply_sync(abs, -2) == 2  # (forked before, still served)
    cluster.stop_cluster_sync()
    assert wait_gone([controller, *pids], 10) == []


def test_nothing_is_left_after_stop_cluster(cluster_factory):
    cluster, rc = cluster_factory.start(2)
    controller = cluster.controller_pid
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    template = _parent(pids[0])
    assert _is_template(template)
    sockets = [p for p in Path(cluster.folder).glob("e*-*") if p.is_socket()]
    assert len(sockets) == 2 * 6  # (each engine's five kernel channels and its lane)
    cluster.stop_cluster_sync()
    assert wait_gone([controller, template, *pids], 10) == []
    assert [p for p in sockets if p.exists()] == []


def test_a_crashed_engines_task_processes_are_gone_after_stop_cluster(cluster_factory):
    # (a task's subprocess outlives its kernel when the kernel crashes, or is OOM
    # killed, alone; nothing signals a forked kernel's process group once it has ended)
    cluster, rc = cluster_factory.start(2)
    child = rc[0].apply_sync(lambda: __import__("subprocess").Popen(["sleep", "300"]).pid)
    with pytest.raises(jx.EngineError):
        rc[0].apply_sync(lambda: __import__("os")._exit(1))
    assert psutil.pid_exists(child)
    cluster.stop_cluster_sync()
    left = wait_gone([child], 5)
    kill_pids(left)
    assert not left, "a crashed engine's task process outlived stop_cluster"


def test_nothing_is_left_after_the_controller_is_killed(cluster_factory):
    cluster, rc = cluster_factory.start(2, engine_grace=1.0)
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    template = _parent(pids[0])
    assert _is_template(template)
    os.kill(cluster.controller_pid, signal.SIGKILL)
    left = wait_gone([template], 5)
    if left:
        kill_pids(left)
    assert left == [], "the template outlived its controller"
    assert wait_gone(pids, 15) == []  # (after their grace period)
    # (nobody else would remove their unix sockets: they do, as they leave)
    assert [p.name for p in Path(cluster.folder).glob("e*-*") if p.is_socket()] == []
    rc.close()


if sys.platform != "linux":
    pytestmark = pytest.mark.skip("engines are forked on Linux only")


def _features(rc: jx.Client, engine_id: int) -> list[str]:
    """What an engine's ``kernel_info_reply`` says it supports (asked on its own channels)."""
    context = zmq.Context()  # (its own, destroyed after: a client's default one is never)
    kc = BlockingKernelClient(context=context)
    try:
        kc.load_connection_info(rc.engine_info(engine_id)["connection_info"])
        kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
        reply = kc.kernel_info(reply=True, timeout=10)
    finally:
        kc.stop_channels()
        context.destroy(linger=0)
    assert reply["content"]["engine"]["lane_port"]
    return list(reply["content"].get("supported_features", []))


@pytest.mark.parametrize("path", ["forked", "plain"])
def test_engines_neither_import_debugpy_nor_offer_the_debugger_and_users_can_import_it(
    cluster_factory, monkeypatch, path
):
    """The engine spec says ``"debugger": false``; importing debugpy for ipykernel's
    debugger was a third of an engine's imports. User code can still import it."""
    monkeypatch.delenv("JUPYTER_PX_ENGINE_DEBUGGER", raising=False)
    if path == "plain":
        monkeypatch.setenv("JUPYTER_PX_NO_FORK", "1")
    _, rc = cluster_factory.start(1)
    assert rc[0].apply_sync(lambda: "debugpy" in __import__("sys").modules) is False
    assert "debugger" not in _features(rc, 0)
    assert rc[0].apply_sync(lambda: __import__("debugpy").__name__) == "debugpy"


def test_engines_offer_the_debugger_when_the_cluster_starts_with_it_asked_for(
    cluster_factory, monkeypatch
):
    """``JUPYTER_PX_ENGINE_DEBUGGER=1`` where the cluster starts: a frontend attached to an
    engine can debug it again (the fork template that serves it imported debugpy)."""
    monkeypatch.setenv("JUPYTER_PX_ENGINE_DEBUGGER", "1")
    _, rc = cluster_factory.start(1)
    assert "debugger" in _features(rc, 0)
    assert rc[0].apply_sync(lambda: "debugpy" in __import__("sys").modules) is True
    pid = rc.engine_info(0)["pid"]
    assert _is_template(_parent(pid))


def test_the_template_key_names_the_debugger_variable():
    """A template's engines read it as they are imported, so it keys the template."""
    from kernel_engine.clusters import ENGINE_DEBUGGER_ENV

    with_it = TemplatePool.key("py", {ENGINE_DEBUGGER_ENV: "1"}, "/", [])
    without = TemplatePool.key("py", {}, "/", [])
    assert with_it != without
