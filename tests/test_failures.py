"""Failures: dead engines, bad targets, engines that cannot start, a dead controller."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sigkill_engine_fails_its_work_fast(cluster_factory):
    _, rc = cluster_factory.start(2)
    pid = rc.engine_info(1)["pid"]
    ar = rc[1].apply_async(time.sleep, 60)
    queued = rc[1].apply_async(abs, -1)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(jx.EngineError, match="SIGKILL") as info:
        ar.get(5)
    assert time.monotonic() - t0 < 5
    assert "engine 1" in str(info.value)
    with pytest.raises(jx.EngineError):
        queued.get(5)
    deadline = time.monotonic() + 5
    while 1 in rc.ids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rc.ids == [0]
    assert rc[0].apply_sync(lambda: "still here") == "still here"
    with pytest.raises(jx.EngineError, match="SIGKILL"):
        rc[0, 1]
    with pytest.raises(jx.EngineError, match="SIGKILL"):
        jx.DirectView(rc, 1).apply_sync(abs, 1)


def test_engine_exit_code_is_reported(cluster_factory):
    _, rc = cluster_factory.start(1)
    with pytest.raises(jx.EngineError, match="exited with code 7"):
        rc[0].apply_sync(os._exit, 7)
    assert rc.ids == [] or rc.wait_for_engines(0) is None


def test_unknown_target_is_a_clear_error(rc):
    with pytest.raises(jx.InvalidTarget, match="no engine with id 9"):
        rc.direct_view([9]).apply_sync(abs, 1)
    with pytest.raises(jx.InvalidTarget):
        rc.engine_info(9)


def test_engine_that_cannot_start_raises_with_its_stderr(cluster_factory, tmp_path, monkeypatch):
    spec_dir = tmp_path / "kernels" / "jupyter-px-engine"
    spec_dir.mkdir(parents=True)
    code = "import sys; sys.stderr.write('boom: no such module frobnicate\\n'); sys.exit(3)"
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", code, "{connection_file}"],
                "display_name": "broken",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    cluster = cluster_factory(2, start_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(jx.ClusterError) as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - t0 < 15
    message = str(info.value)
    assert "exited with code 3" in message
    assert "boom: no such module frobnicate" in message
    cluster_factory.pids.append(cluster.controller_pid)


def test_dead_controller_fails_waiting_calls(cluster_factory):
    cluster, rc = cluster_factory.start(1)
    ar = rc[0].apply_async(time.sleep, 60)
    time.sleep(0.2)
    os.kill(cluster.controller_pid, signal.SIGKILL)
    with pytest.raises(jx.EngineError, match="controller"):
        ar.get(5)
    with pytest.raises(jx.EngineError, match="controller"):
        rc[0].apply_sync(abs, 1)


def test_garbage_and_unsigned_messages_do_not_hurt_the_controller(rc):
    import zmq

    from kernel_engine import protocol, wire

    info = json.loads(Path(rc.connection_file).read_text())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{info['client_port']}")
    try:
        pending = rc[0].apply_async(time.sleep, 0.3)
        bad_wire = wire.Wire(b"wrong key")
        sock.send_multipart([b"garbage"])
        sock.send_multipart([b"lane:0", wire.DELIM, b"sig", b"not json", b"{}", b"{}", b"{}"])
        bad_wire.send(sock, "apply_request", {}, idents=[b"lane:0"])
        bad_wire.send(sock, protocol.SHUTDOWN_REQUEST, {"hub": True}, idents=[b"hub"])
        good_wire = wire.Wire(info["key"].encode())
        nonsense = good_wire.send(sock, "apply_request", {}, idents=[b"nonsense-route"])
        unknown = good_wire.send(sock, "no_such_request", {}, idents=[b"hub"])
        replies = {}
        for _ in range(2):
            assert sock.poll(5000), "the controller should answer both signed requests"
            reply = good_wire.recv(sock.recv_multipart(copy=False))
            replies[reply.parent_id] = reply.content
        assert "not a route" in replies[nonsense["msg_id"]]["evalue"]
        assert "unknown" in replies[unknown["msg_id"]]["evalue"]
        assert pending.get(10) is None
        assert rc[:].apply_sync(abs, -5) == [5, 5]
    finally:
        sock.close()
        ctx.term()
