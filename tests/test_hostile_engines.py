"""A peer holding the cluster's key, posing as an engine (a stand-in that registered
itself), against a real controller and a real engine: what it sends about tasks it was
never given must neither reach their clients nor take their real results away.

Everything started here is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

from kernel_engine import protocol, wire
from kernel_engine.serialize import dumps_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from standins import Fleet  # (benchmarks/ is not a package)


def _forge_reply(standin: Any, msg_id: str, msg_type: str, value: Any) -> None:
    """The stand-in answers ``msg_id``, which it was never sent, with ``value``."""
    now = wire.utcnow_iso()
    metadata = {
        "started": now,
        "completed": now,
        "engine_id": standin.engine_id,
        "engine_uuid": standin.uuid,
        "status": "ok",
        "stdout": "",
        "stderr": "",
    }
    parent = {"msg_id": msg_id, "msg_type": msg_type, "date": now}
    _, frames = standin.wire.pack(
        protocol.APPLY_REPLY,
        {"status": "ok"},
        parent,
        metadata,
        dumps_result(value),
        idents=[standin.controller, b"client-of-nobody"],
    )
    standin.sockets["lane"].send_multipart(frames, copy=False)


def _with_standin(cluster_factory: Any) -> tuple[Any, Any, Any, threading.Event, threading.Thread]:
    cluster = cluster_factory(n=1)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    fleet = Fleet(json.loads(cluster.connection_file.read_text()), 1, "standin-test")
    stop = threading.Event()
    server = threading.Thread(target=fleet.serve, args=(stop,), name="standins", daemon=True)
    server.start()
    fleet.register(timeout=30)
    rc.wait_for_engines(2, timeout=30)
    return cluster, rc, fleet, stop, server


def _stop(cluster: Any, fleet: Any, stop: threading.Event, server: threading.Thread) -> None:
    cluster.stop_cluster_sync(timeout=20)
    server.join(10)
    stop.set()
    server.join(5)
    fleet.close()


def test_an_engines_reply_to_another_engines_task_is_dropped(cluster_factory):
    # (before: the forged reply ended the request, routed or load-balanced, in the
    # controller's books and went to whatever client it named; the real engine's reply
    # was then dropped as "to nothing it was sent", and its client waited for ever; the
    # scheduler kept counting the task on the real engine)
    cluster, rc, fleet, stop, server = _with_standin(cluster_factory)
    try:
        impostor = fleet.standins[0]
        real = next(i for i in rc.ids if i != impostor.engine_id)

        def _slow(x: Any) -> Any:
            import time

            time.sleep(1.5)
            return x

        direct = rc[real].apply_async(_slow, "real direct")
        balanced = rc.load_balanced_view(targets=[real]).apply_async(_slow, "real balanced")
        cell = rc[real].execute("x = 1", block=False)  # (routed through the controller)
        time.sleep(0.3)  # (all on the real engine: the first runs, the others wait there)
        for ar in (direct, balanced):
            _forge_reply(impostor, ar.msg_ids[0], protocol.APPLY_REQUEST, "forged")
        _forge_reply(impostor, cell.msg_ids[0], "execute_request", "forged")
        assert direct.get(timeout=20) == "real direct"
        cell.get(timeout=20)
        assert balanced.get(timeout=20) == "real balanced"
        assert direct.engine_id == real and balanced.engine_id == real and cell.engine_id == real
        # the real engine's place in the scheduler is free again: it takes more work
        more = rc.load_balanced_view(targets=[real]).map_async(lambda x: x, range(20))
        assert more.get(timeout=20) == list(range(20))
    finally:
        _stop(cluster, fleet, stop, server)
    log = (cluster.folder / "controller.log").read_text()
    assert f"engine {impostor.engine_id}" in log


def test_a_peer_that_never_reads_its_replies_does_not_grow_the_controller(cluster_factory):
    # (before: the client socket had no high-water mark, so every reply to a keyed peer
    # that never read them stayed in the controller: requests of 48 KiB to no engine, each
    # answered with an error naming the request, grew it by about as much as they sent)
    cluster, rc = cluster_factory.start(1, db="memory")
    info = json.loads((cluster.folder / "client.json").read_text())
    signer = wire.Wire(info["key"].encode())
    context = zmq.Context()
    stalled = context.socket(zmq.DEALER)
    stalled.linger = 0
    stalled.rcvhwm = 1
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.sndhwm = 0
    stalled.connect(f"tcp://127.0.0.1:{info['client_port']}")
    pid = cluster.controller_pid
    pad = "x" * (48 << 10)
    try:
        before = psutil.Process(pid).memory_info().rss
        for i in range(12_000):  # (about 560 MiB of replies)
            if i % 100 == 0:
                time.sleep(0.02)  # (what the controller has not read yet is not the point)
            header = signer.header(protocol.APPLY_REQUEST)
            header["pad"] = pad
            _, frames = signer.pack(protocol.APPLY_REQUEST, {}, header=header, idents=[b"lane:999"])
            stalled.send_multipart(frames, copy=False)
        # the others are served meanwhile, and once the flood is read, so is a new request
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert rc[0].apply_sync(abs, -3) == 3
            if "which does not read them" in (cluster.folder / "controller.log").read_text():
                break
            time.sleep(0.5)
        grown = psutil.Process(pid).memory_info().rss - before
    finally:
        stalled.close(linger=0)
        context.term()
    assert grown < 300 << 20, f"the controller grew by {grown >> 20} MiB"
    assert rc[0].apply_sync(abs, -4) == 4


def _phantoms(prefix: str, n: int) -> dict[str, Any]:
    """A direct notice naming ``n`` requests sent to engine 0's lane that nobody sent."""
    date = wire.utcnow_iso()
    return {
        "submitted": [
            {
                "msg_id": f"{prefix}{i:012d}",
                "msg_type": "apply_request",
                "engine_id": 0,
                "date": date,
            }
            for i in range(n)
        ]
    }


def test_huge_direct_notices_neither_stall_the_controller_nor_grow_it(cluster_factory):
    # (before: a notice could name a million requests, all recorded and held in flight in
    # one turn of the loop: 300,000 of them held every request to the controller for
    # about 1.7 s, and each such notice held some 170 MiB more until its sender was lost)
    cluster, rc = cluster_factory.start(1, db="memory")
    info = json.loads((cluster.folder / "client.json").read_text())
    signer = wire.Wire(info["key"].encode())
    context = zmq.Context()
    peer = context.socket(zmq.DEALER)
    peer.linger = 0
    peer.setsockopt(zmq.IDENTITY, b"0123456789abcdef:s")
    peer.connect(f"tcp://127.0.0.1:{info['client_port']}")

    def notice(content: dict[str, Any]) -> None:
        _, frames = signer.pack(protocol.DIRECT_NOTICE, content, idents=[protocol.HUB_ROUTE])
        peer.send_multipart(frames, copy=False)

    try:
        notice(_phantoms("huge", 300_000))
        notice(_phantoms("many", 20_001))
        slowest, until = 0.0, time.monotonic() + 4
        while time.monotonic() < until:  # (while the controller reads them)
            t0 = time.monotonic()
            rc.queue_status()  # (answered by the controller's loop)
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 1.0, f"a round trip took {slowest:.2f} s"
        for k in range(12):  # (20,000 each: more than the controller holds)
            notice(_phantoms(f"held{k:02d}", 20_000))
        assert rc[0].apply_sync(abs, -2) == 2
        deadline = time.monotonic() + 30
        log = cluster.folder / "controller.log"
        while "are held unanswered already" not in log.read_text():
            assert time.monotonic() < deadline, "the phantom requests were all held"
            time.sleep(0.2)
    finally:
        peer.close(linger=0)
        context.term()
    text = log.read_text()
    assert "invalid direct notice from client 0123456789abcdef" in text
    assert "direct request of client 0123456789abcdef" in text
    assert rc[0].apply_sync(abs, -3) == 3


def test_an_engines_output_for_another_engines_task_is_not_recorded(cluster_factory):
    # (before: a stream message on any engine's iopub went into the record its parent
    # named, so a registered engine could write into another engine's task's stdout)
    cluster, rc, fleet, stop, server = _with_standin(cluster_factory)
    try:
        impostor = fleet.standins[0]
        real = next(i for i in rc.ids if i != impostor.engine_id)

        def _printing() -> None:
            import time

            print("real")
            time.sleep(1.5)

        ar = rc.load_balanced_view(targets=[real]).apply_async(_printing)
        time.sleep(0.5)  # (it runs, and prints, on the real engine)
        parent = {"msg_id": ar.msg_ids[0], "msg_type": protocol.APPLY_REQUEST}
        for _ in range(3):
            impostor.wire.send(
                impostor.sockets["iopub"],
                "stream",
                {"name": "stdout", "text": "forged\n"},
                parent,
                idents=[impostor.topic],
            )
        ar.get(timeout=20)
        deadline = time.monotonic() + 20
        while True:
            stdout = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["stdout"])[0]["stdout"]
            if stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # (what the impostor sent had as long to reach the record)
        stdout = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["stdout"])[0]["stdout"]
    finally:
        _stop(cluster, fleet, stop, server)
    assert "real" in stdout
    assert "forged" not in stdout
