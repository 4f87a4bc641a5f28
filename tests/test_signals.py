"""Signals to engines the controller cannot signal itself: an engine on another host
signals itself when asked on its control channel, only with the signals it allows.

"Another host" here is an engine that registers from its own UTS namespace (``unshare
--uts``, a hostname of its own): the controller sees a hostname that is not its own,
as for an engine on an ssh host, so it may not send signals to that PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import kill_pids
from jupyter_client import BlockingKernelClient

from kernel_engine import protocol

ELSEWHERE = "px-elsewhere"
ENGINE_ID = 5


def _unshare() -> tuple[list[str], str]:
    """The command prefix that runs a process with a hostname of its own (as root, or
    as an unprivileged user in a user namespace of its own), or [] and why none does."""
    if shutil.which("unshare") is None:
        return [], "no unshare command (util-linux)"
    said = ""
    for prefix in (["unshare", "--uts"], ["unshare", "--user", "--map-root-user", "--uts"]):
        done = subprocess.run(
            [*prefix, "hostname", ELSEWHERE], capture_output=True, text=True, timeout=10
        )
        if done.returncode == 0:
            return prefix, ""
        said = done.stderr.strip()
    return [], f"cannot make a UTS namespace here: {said}"


def wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[Any, subprocess.Popen[bytes], Path]]:
    """A cluster with no engines of its own, and one engine that registers from a
    hostname of its own."""
    unshare, why = _unshare()
    if not unshare:
        pytest.skip(why)
    from conftest import ClusterFactory

    factory = ClusterFactory()
    cluster, rc = factory.start(0)
    log_path = cluster.folder / "elsewhere.log"
    script = 'hostname "$1" && shift && exec "$@"'
    cmd = [sys.executable, "-m", "kernel_engine.engine.register"]
    cmd += ["--file", str(cluster.connection_file), "--id", str(ENGINE_ID)]
    with open(log_path, "ab") as log:
        engine = subprocess.Popen(
            [*unshare, "sh", "-c", script, "sh", ELSEWHERE, *cmd],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        rc.wait_for_engines(1, timeout=30)
        yield rc, engine, log_path
    finally:
        kill_pids([engine.pid])
        engine.wait(10)
        factory.stop_all()


INSTALL_HANDLER = """
import signal
signals_seen = []
signal.signal(signal.SIGUSR1, lambda signum, frame: signals_seen.append(signum))
"""


def test_the_engine_counts_as_on_another_host(remote):
    rc, engine, _ = remote
    info = rc.engine_info(ENGINE_ID)
    assert info["hostname"] == ELSEWHERE
    assert rc[ENGINE_ID].apply_sync(os.getpid) == engine.pid


def test_sigusr1_reaches_an_engine_on_another_host(remote):
    rc, _, _ = remote
    view = rc[ENGINE_ID]
    view.execute(INSTALL_HANDLER, block=True)
    assert rc.send_signal("SIGUSR1", targets=[ENGINE_ID]) == [ENGINE_ID]
    seen = wait_for(lambda: view.pull("signals_seen", block=True))
    assert seen == [int(signal.SIGUSR1)]
    assert rc.send_signal(int(signal.SIGUSR1), targets=ENGINE_ID) == [ENGINE_ID]
    wait_for(lambda: len(view.pull("signals_seen", block=True)) == 2)


def test_a_signal_an_engine_does_not_take_is_refused_by_name(remote):
    rc, engine, _ = remote
    refused = (
        f"engine {ENGINE_ID} runs on {ELSEWHERE}: signal {int(signal.SIGSTOP)} is not a "
        "signal an engine sends itself (one of SIGHUP, SIGINT, "
    )
    with pytest.raises(ValueError, match=re.escape(refused)):
        rc.send_signal("SIGSTOP", targets=[ENGINE_ID])
    with pytest.raises(TypeError, match="a signal is a number or a name"):
        rc.send_signal(10.0, targets=[ENGINE_ID])
    with pytest.raises(TypeError, match="a signal is a number or a name"):
        rc.send_signal(True, targets=[ENGINE_ID])
    with pytest.raises(ValueError, match="not a signal of this system"):
        rc.send_signal(99, targets=[ENGINE_ID])
    assert engine.poll() is None
    assert rc[ENGINE_ID].apply_sync(lambda: "still here") == "still here"


def test_the_engine_checks_what_it_is_asked_for(remote):
    """Whoever holds the key may talk to the engine's control channel directly: the
    engine itself refuses what is not an allowed signal number."""
    rc, engine, _ = remote
    context = zmq.Context()  # (its own, destroyed after: a client's default one is never)
    kc = BlockingKernelClient(context=context)
    try:
        kc.load_connection_info(rc.engine_info(ENGINE_ID)["connection_info"])
        kc.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
        for bad in ("15", 15.0, True, None, int(signal.SIGSTOP), 0, 1000):
            msg = kc.session.msg(protocol.ENGINE_SIGNAL_REQUEST, {"signum": bad})
            kc.control_channel.send(msg)
            reply = kc.control_channel.get_msg(timeout=10)
            assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
            assert reply["content"]["status"] == "error", (bad, reply["content"])
            assert reply["content"]["ename"] in ("TypeError", "ValueError")
    finally:
        kc.stop_channels()
        context.destroy(linger=0)
    assert engine.poll() is None


def test_sigterm_ends_an_engine_on_another_host(remote):
    rc, engine, _ = remote
    assert rc.send_signal(signal.SIGTERM, targets=[ENGINE_ID]) == [ENGINE_ID]
    # (the default action: the engine ends at once; the controller, which cannot watch a
    # PID on another host, then notices its silence through its heartbeats)
    assert engine.wait(10) == -signal.SIGTERM
