"""Failures: dead engines, bad targets, engines that cannot start, a dead controller."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import zmq

import jupyter_ext as jx
from kernel_engine import protocol, wire

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sigkill_engine_fails_its_work_fast(cluster_factory):
    cluster, rc = cluster_factory.start(2)
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
    # (its unix sockets went with it: the kernel manager's five and the lane)
    assert [p.name for p in Path(cluster.folder).glob("e1-*") if p.is_socket()] == []
    assert len([p for p in Path(cluster.folder).glob("e0-*") if p.is_socket()]) == 6
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


class HoldingRelay:
    """A TCP relay to ``upstream`` that holds back, ``seconds`` long, what a connection
    sends once it has shown ``marker`` in its first bytes (a zmq peer's identity is in
    its handshake): that peer's connection then completes late."""

    def __init__(self, upstream: tuple[str, int], marker: bytes, seconds: float):
        self.upstream, self.marker, self.seconds = upstream, marker, seconds
        self.held = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                near.close()
                continue
            far.settimeout(None)
            self.sockets += [near, far]
            for args in ((near, far, True), (far, near, False)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, outward: bool) -> None:
        seen = b""
        try:
            while chunk := src.recv(65536):
                if outward and len(seen) < 512:
                    seen += chunk
                    if self.marker in seen:
                        self.held += 1
                        time.sleep(self.seconds)
                        seen = b"x" * 512  # (held once)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for thread in self.threads:
            thread.join(5)
        assert not any(t.is_alive() for t in self.threads), "a relay thread did not end"


def test_a_client_connects_when_its_receiving_socket_connects_after_its_first_request(
    cluster_factory, tmp_path
):
    """Replies come to the client's receiving socket, requests leave from its sending one:
    should the first request reach the controller before the receiving socket's connection
    is complete, its reply is lost (seen in CI, a just-started cluster's client waited its
    10 s out). A relay holds the receiving socket's handshake back 0.5 s here (it finds the
    identity in the handshake, which CurveZMQ would encrypt: this cluster is on loopback,
    unencrypted); the client asks again and connects long before its timeout, and leaves
    no copy of its request waiting."""
    _, rc = cluster_factory.start(1)
    info = json.loads(Path(rc.connection_file).read_text())
    relay = HoldingRelay(("127.0.0.1", info["client_port"]), marker=b":r", seconds=0.5)
    try:
        info["client_port"] = relay.port
        path = tmp_path / "client.json"
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        t0 = time.monotonic()
        late = jx.Client(path, timeout=5)
        try:
            took = time.monotonic() - t0
            assert relay.held == 1, "the relay never held the receiving socket back"
            assert took < 3, f"the client took {took:.1f} s to connect"
            assert late.ids == rc.ids
            assert late[0].apply_sync(abs, -2) == 2
            table = late.transport.requests
            deadline = time.monotonic() + 5  # (the welcome loop's copies are answered too)
            while [r for r in list(table.live.values()) if r.kind == "hub"]:
                assert time.monotonic() < deadline, "copies of the connect request left"
                time.sleep(0.02)
        finally:
            late.close()
    finally:
        relay.close()


def _io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "jupyter-px-io"}


def test_a_client_that_fails_to_connect_leaves_no_io_thread(tmp_path):
    """A stand-in controller (a ROUTER speaking the wire) refuses the client's connect
    request: the client raises the refusal and closes, its IO thread gone."""
    key = os.urandom(16).hex()
    signer = wire.Wire(key.encode())
    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.linger = pub.linger = 0
    info = {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "key": key,
        "client_port": router.bind_to_random_port("tcp://127.0.0.1"),
        "iopub_port": pub.bind_to_random_port("tcp://127.0.0.1"),
    }
    path = tmp_path / "client.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    stop = threading.Event()

    def refuse() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            frames = router.recv_multipart()
            msg = signer.unpack(frames[frames.index(wire.DELIM) + 1 :])
            no = protocol.error_content("ValueError", "this stand-in refuses everyone")
            reply = signer.pack(protocol.reply_type(msg.msg_type), no, msg.header)[1]
            router.send_multipart([protocol.reply_identity(frames[0]), protocol.HUB_ROUTE, *reply])

    before = _io_threads()
    server = threading.Thread(target=refuse, daemon=True)
    server.start()
    try:
        with pytest.raises(ValueError, match="refuses everyone"):
            jx.Client(path, timeout=5)
        deadline = time.monotonic() + 5
        while _io_threads() - before:
            assert time.monotonic() < deadline, "the failed client's IO thread still runs"
            time.sleep(0.02)
    finally:
        stop.set()
        server.join(5)
        router.close()
        pub.close()
        ctx.term()
