"""A controller that dies (SIGKILL) is started again on its cluster folder, and everything
carries on: the same clients reconnect, finished results stay, tasks in flight end (with
their real reply when their engine kept it, else a clear error), the engines that outlived
it are adopted with their ids, pids and state, and an engine nobody adopts leaves after
its grace period. Real processes, stopped and checked by PID; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from conftest import descendants, wait_gone

import jupyter_ext as jx
from kernel_engine import clusters, processes, protocol, wire
from kernel_engine.controller.hub import DB_FILE
from kernel_engine.engine.watch import ControllerWatch
from kernel_engine.errors import ClusterError

# (a lambda: pickled by value, where a function of this module would be by reference)
_sleep_then = lambda seconds, value: (__import__("time").sleep(seconds), value)[1]  # noqa: E731


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid], timeout=10) == [], f"controller {pid} still runs after SIGKILL"


def _engine_pids(rc: jx.Client) -> dict[int, int]:
    return {i: rc.engine_info(i)["pid"] for i in rc.ids}


def _wait(what: str, check: Any, timeout: float = 15.0, rc: jx.Client | None = None) -> Any:
    """Poll ``check()`` until it returns something true, at most ``timeout`` s (the
    failure says how ``rc`` sees its cluster)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            seen = "" if rc is None else f"; ids {rc.ids}, lost {rc.transport.io.lost!r}"
            raise AssertionError(f"{what}: not within {timeout} s{seen}")
        time.sleep(0.05)


def _status(rc: jx.Client, msg_id: str) -> dict[str, Any]:
    [record] = rc.db_query({"msg_id": msg_id}, keys=["status", "engine_id", "result_content"])
    return dict(record)


def _ended(rc: jx.Client, msg_id: str) -> dict[str, Any] | None:
    """The record of ``msg_id`` once it is no longer pending."""
    record = _status(rc, msg_id)
    return None if record["status"] == "pending" else record


def _connection(folder: Path) -> dict[str, Any]:
    """What a client connects with, from the folder's connection file (not the pid)."""
    info = json.loads((folder / clusters.CLIENT_FILE).read_text())
    keys = ("cluster_id", "key", "ip", "client_port", "iopub_port", "hb_port", "curve_serverkey")
    return {k: info.get(k) for k in keys}


def _controller_pid(folder: Path) -> int:
    return int(json.loads((folder / clusters.CLIENT_FILE).read_text())["controller_pid"])


def px(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``jupyter px ARGS`` (the runtime dir is the session's, from conftest)."""
    return subprocess.run(
        [sys.executable, "-m", "kernel_engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_killed_controller_restarts_and_the_same_client_carries_on(cluster_factory):
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    pids = _engine_pids(rc)
    connection = _connection(cluster.folder)
    lb = rc.load_balanced_view()

    # finished work, direct and load-balanced
    direct_done = rc[:].apply_async(lambda x: x * 2, 21)
    lb_done = lb.map_async(lambda x: x + 1, range(6))
    assert direct_done.get(10) == [42, 42] and lb_done.get(10) == list(range(1, 7))
    rc[:].execute("state = 'kept'", block=True)
    # work in flight when the controller dies
    lb_running = lb.map_async(_sleep_then, [1.5, 1.5], ["a", "b"])
    direct_running = rc[0].apply_async(_sleep_then, 1.0, "direct")
    time.sleep(0.4)

    t0 = time.monotonic()
    _kill(cluster.controller_pid)
    # the client was told: a clear error for what was in flight, never a hang
    for ar in (lb_running, direct_running):
        with pytest.raises((jx.EngineError, jx.CompositeError), match="controller"):
            ar.get(8)
    assert time.monotonic() - t0 < 5
    assert direct_done.get(0) == [42, 42]  # finished results stay with the client
    with pytest.raises(jx.EngineError, match="controller"):
        rc[:].apply_async(abs, -1)
    assert all(processes.running(p) for p in pids.values()), "engines must outlive it"
    # a record the controller had not written when it died (it commits every 50 ms): the
    # kept reply makes it again
    with sqlite3.connect(cluster.folder / DB_FILE) as db:
        gone = db.execute("DELETE FROM tasks WHERE msg_id = ?", lb_running.msg_ids[1:])
        assert gone.rowcount == 1
    db.close()

    t1 = time.monotonic()
    cluster.restart_controller_sync()
    restart_seconds = time.monotonic() - t1
    cluster_factory.pids.append(cluster.controller_pid)
    assert not rc.transport.io.lost
    assert _connection(cluster.folder) == connection  # the same key, ports and cluster id
    _wait("both engines back", lambda: rc.ids == [0, 1], rc=rc)
    assert _engine_pids(rc) == pids  # no engine lost: the same processes, the same ids
    # the same client works again, on the same engines, with their state
    assert rc[:].apply_sync(os.getpid) == [pids[0], pids[1]]
    assert rc[:].pull("state", block=True) == ["kept", "kept"]
    assert lb.map_sync(abs, [-1, -2, -3]) == [1, 2, 3]

    # old results: from this client and from the store
    assert rc.get_result(direct_done.msg_ids).get(10) == [42, 42]
    records = rc.db_query({"msg_id": {"$in": lb_done.msg_ids}}, keys=["status"])
    assert [r["status"] for r in records] == ["ok"] * 6
    # the load-balanced tasks that were running completed on their engines, which kept
    # their replies for the new controller
    for msg_id, value in zip(lb_running.msg_ids, ["a", "b"], strict=True):
        record = _wait("the kept reply", lambda m=msg_id: _ended(rc, m))
        assert record["status"] == "ok", record
        assert rc.get_result(msg_id).get(10) == [value]  # (a chunk of the map)
    # the direct task's reply went to the client, which the controller had lost: its
    # record ends, with the client's account or with the restart's error
    record = _wait("the direct task's record", lambda: _ended(rc, direct_running.msg_ids[0]))
    if record["status"] != "ok":
        assert "controller restarted" in record["result_content"]["evalue"], record
    assert not rc.db_query({"status": "pending"}, keys=["msg_id"])

    # a second client, by cluster id, sees it all
    other = jx.Client(cluster.cluster_id)
    try:
        assert other.ids == [0, 1]
        assert other.get_result(lb_done.msg_ids).get(10) == [[i] for i in range(1, 7)]
        assert set(lb_running.msg_ids) <= set(other.hub_history())
        assert other[1].apply_sync(os.getpid) == pids[1]
    finally:
        other.close()
    # new engines get ids above the adopted ones
    assert cluster.start_engines_sync(1) == [2]
    cluster_factory.pids.append(rc.engine_info(2)["pid"])
    print(f"restart took {restart_seconds:.2f} s")
    # the adopted engines' unix sockets go with them too (no kernel manager knew them)
    cluster.stop_cluster_sync()
    assert [p.name for p in Path(cluster.folder).glob("e*-*") if p.is_socket()] == []


def test_direct_calls_answered_just_before_the_controller_died_keep_their_outcome(
    cluster_factory,
):
    """Their replies went to the client, whose notices of them had not left when the
    controller was killed: the restarted controller waits for them (NOTICE_GRACE) before
    it ends the records with the restart's error."""
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    lanes = rc.transport.io.lanes
    _wait("the lanes", lambda: all(lanes.usable(i) for i in (0, 1)), rc=rc)
    # (its sending was reported while it ran; its answer waits in the client)
    slow = rc[0].apply_async(_sleep_then, 0.4, "slow")
    assert slow.get(5) == "slow"
    assert rc[1].apply_sync(_sleep_then, 0, "quick") == "quick"
    quick = rc.history[-1]
    _kill(cluster.controller_pid)
    _wait("the client to see its controller gone", lambda: rc.transport.io.lost, rc=rc)
    cluster.restart_controller_sync()
    cluster_factory.pids.append(cluster.controller_pid)
    for msg_id, value in ((slow.msg_ids[0], "slow"), (quick, "quick")):
        record = _wait("the record", lambda m=msg_id: _ended(rc, m), timeout=20, rc=rc)
        assert record["status"] == "ok", record
        with jx.Client(cluster.cluster_id) as other:
            assert other.get_result(msg_id).get(10) == value


def test_restore_by_cli_then_stop_after_another_death(cluster_factory):
    cluster = cluster_factory(1, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    [pid] = _engine_pids(rc).values()
    done = rc[0].apply_async(abs, -5)
    assert done.get(10) == 5

    # a live controller keeps its cluster and its engines
    refused = px("start", "--restore", "--cluster-id", cluster.cluster_id)
    assert refused.returncode != 0 and "still runs" in refused.stderr, refused.stderr
    with pytest.raises(jx.ClusterError, match="still runs"):
        cluster.restart_controller_sync()

    _kill(cluster.controller_pid)
    # (a request sent before the client sees its controller gone, within 0.5 s, is in
    # flight when it does, and fails: the restore may be faster than that)
    _wait("the client to see its controller gone", lambda: rc.transport.io.lost, rc=rc)
    out = px("start", "--restore", "--cluster-id", cluster.cluster_id)
    assert out.returncode == 0, out.stderr
    assert f"cluster {cluster.cluster_id} restored: 1 engines ready [0]" in out.stdout
    restored = _controller_pid(cluster.folder)
    cluster_factory.pids.append(restored)
    # the client that was connected reconnects at its next request
    assert rc[0].apply_sync(os.getpid) == pid
    assert rc.get_result(done.msg_ids[0]).get(10) == 5

    # the restored controller dies too: stopping the cluster leaves no process behind
    _kill(restored)
    assert processes.running(pid)
    cluster.stop_cluster_sync()
    assert wait_gone([pid], timeout=10) == []
    assert not clusters.key_files(cluster.folder)
    assert [p.name for p in Path(cluster.folder).glob("e*-*") if p.is_socket()] == []


def test_an_engine_nobody_adopts_leaves_after_its_grace(cluster_factory):
    cluster = cluster_factory(1, engine_grace=1.0)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    [pid] = _engine_pids(rc).values()
    done = rc[0].apply_async(abs, -3)
    assert done.get(10) == 3
    busy = rc[0].apply_async(time.sleep, 30)  # (it leaves even while it works)
    _wait("the task's record", lambda: rc.db_query({"msg_id": busy.msg_ids[0]}, ["status"]))
    _kill(cluster.controller_pid)
    t0 = time.monotonic()
    time.sleep(0.5)
    assert processes.running(pid), "the engine left before its grace period"
    assert wait_gone([pid], timeout=8) == [], "the engine outlived its grace period"
    gone_after = time.monotonic() - t0
    assert 1.0 <= gone_after < 4, gone_after
    with pytest.raises(jx.EngineError):
        busy.get(1)

    # restarted without engines, by a Cluster attached from the folder: the old results
    # are there, the task in flight failed
    attached = jx.Cluster.from_file(cluster_id=cluster.cluster_id)
    cluster_factory.clusters.append(attached)  # (stopped by the fixture too)
    assert not attached.running
    attached.restart_controller_sync()
    cluster_factory.pids.append(attached.controller_pid)
    assert attached.running
    _wait("the engine gone from ids", lambda: rc.ids == [], rc=rc)
    assert rc.get_result(done.msg_ids[0]).get(10) == 3
    record = _status(rc, busy.msg_ids[0])
    assert record["status"] == "error"
    assert "controller restarted" in record["result_content"]["evalue"]
    assert "engine 0 did not outlive it" in record["result_content"]["evalue"]
    assert cluster.start_engines_sync(1) == [1]
    assert rc[1].apply_sync(abs, -4) == 4
    cluster_factory.pids.append(rc.engine_info(1)["pid"])


def test_a_live_controllers_engine_cannot_be_adopted(cluster_factory):
    """An imposter with the key asks a live controller's engine to wait for it (control
    channel), then to take its setup (lane): both are refused, and the engine still
    answers its controller."""
    _, rc = cluster_factory.start(1)
    info = rc.engine_info(0)
    conn = info["connection_info"]
    signer = wire.Wire(conn["key"].encode(), username="imposter")
    ctx: zmq.Context[Any] = zmq.Context()
    replies = {}
    try:
        for channel, msg_type in (
            ("control_port", protocol.ENGINE_ADOPT_REQUEST),
            ("lane_port", protocol.ENGINE_SETUP_REQUEST),
        ):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if channel == "lane_port":  # (the key opens the lane's door too)
                wire.lane_client(sock, conn["key"].encode(), conn[channel], info["uuid"])
            sock.connect(protocol.endpoint(conn, conn[channel]))
            setup = protocol.EngineSetup(0, "evil", os.getpid())
            signer.send(sock, msg_type, setup.to_content())
            assert sock.poll(5000), f"no reply to {msg_type}"
            replies[msg_type] = signer.recv(sock.recv_multipart(copy=False)).content
            sock.close()
    finally:
        ctx.term()
    for msg_type, content in replies.items():
        assert content["status"] == "error", (msg_type, content)
    assert "runs" in replies[protocol.ENGINE_ADOPT_REQUEST]["evalue"]
    assert rc[0].apply_sync(os.getpid) == info["pid"]


def test_the_watch_follows_owner_and_adopter_without_processes_of_its_own():
    """The grace watch, by itself: a live owner keeps the engine; once it is gone an
    adopter is followed; with no live controller at all, the engine leaves."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    adopter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    left = []
    try:
        watch = ControllerWatch(owner.pid, grace=0.5, exit=left.append)
        assert watch.claim(None, first=True) is None  # the first setup always may
        assert "runs" in (watch.claim(adopter.pid, first=False) or "")
        assert "still runs" in (watch.follow(adopter.pid, first=False) or "")
        now = time.monotonic()
        assert not watch._check(now)
        owner.kill()
        owner.wait(10)
        assert not watch._check(now)  # gone: the grace period starts
        assert not watch._check(now + 0.4)
        assert watch.follow(adopter.pid, first=False) is None
        assert not watch._check(now + 10)  # the adopter runs: no leaving
        adopter.kill()
        adopter.wait(10)
        assert not watch._check(now + 11)
        assert watch._check(now + 11.6)  # nobody for longer than the grace: leave
        assert watch.exiting and watch.claim(os.getpid(), first=False) is not None
    finally:
        for proc in (owner, adopter):
            proc.kill()
            proc.wait(10)
    assert left == []  # (only the thread's loop calls exit)


def test_an_encrypted_cluster_restarts_with_its_keys(cluster_factory):
    """CurveZMQ: the restarted controller serves with the dead one's keypair, so clients
    holding its public key reconnect; heartbeats (whose sockets also carry the handshake)
    keep working on both sides."""
    cluster = cluster_factory(1, curve=True, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    [pid] = _engine_pids(rc).values()
    connection = _connection(cluster.folder)
    assert connection["curve_serverkey"]
    _kill(cluster.controller_pid)
    _wait("the client to see its controller gone", lambda: rc.transport.io.lost, rc=rc)
    cluster.restart_controller_sync()
    cluster_factory.pids.append(cluster.controller_pid)
    assert _connection(cluster.folder) == connection
    assert rc[0].apply_sync(os.getpid) == pid
    time.sleep(5)  # longer than a client takes to lose a controller that does not echo
    assert not rc.transport.io.lost
    assert rc.ids == [0] and rc[0].apply_sync(abs, -2) == 2


def _alive(pids: dict[int, int]) -> dict[int, bool]:
    out = {}
    for eid, pid in pids.items():
        try:
            out[eid] = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            out[eid] = False
    return out


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_a_failed_restore_leaves_the_cluster_for_the_next_one(cluster_factory):
    """A restore that fails (a port of the dead controller taken meanwhile by another
    process) kills only the controller it started: the engines, the key files and the
    records stay, and once the port is free a restore adopts the engines with their
    state, the same key and ports, and the client carries on."""
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    pids = _engine_pids(rc)
    rc[:].execute("state = 'kept'", block=True)
    connection = _connection(cluster.folder)
    _kill(cluster.controller_pid)
    squatter = socket.socket()
    try:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # (the client's reconnecting sockets may hold the port a moment: a TCP connection
        # to a local port nobody listens on can connect to itself)
        _wait("the iopub port bound", lambda: _bind(squatter, connection["iopub_port"]))
        squatter.listen()
        with pytest.raises(ClusterError, match="iopub port"):
            cluster.restart_controller_sync(timeout=30)
        cluster_factory.pids.append(cluster.controller_pid)
    finally:
        squatter.close()
    assert _alive(pids) == {0: True, 1: True}
    assert _connection(cluster.folder) == connection
    cluster.restart_controller_sync(timeout=30)
    cluster_factory.pids.append(cluster.controller_pid)
    assert _connection(cluster.folder) == connection
    _wait("both engines adopted", lambda: rc.ids == [0, 1], rc=rc)
    assert _engine_pids(rc) == pids
    assert rc[:].pull("state", block=True) == ["kept", "kept"]


def test_a_restart_with_a_bad_timeout_starts_nothing(cluster_factory):
    """A timeout that is no number of seconds is refused before a controller starts: the
    wait for it failed after it was started, and left it running behind a TypeError that
    did not name the argument."""
    cluster = cluster_factory(1, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    [pid] = _engine_pids(rc).values()
    _kill(cluster.controller_pid)
    before = set(descendants())
    for bad, error in (("5", TypeError), (float("nan"), ValueError), (-1, ValueError)):
        with pytest.raises(error, match="timeout"):
            cluster.restart_controller_sync(timeout=bad)
    # (fewer is fine: the killed controller, not reaped yet when ``before`` was read)
    assert not set(descendants()) - before, "a controller was started"
    assert clusters.read_cluster(cluster.folder).state == "dead"
    cluster.restart_controller_sync(timeout=30)
    cluster_factory.pids.append(cluster.controller_pid)
    _wait("the engine back", lambda: rc.ids == [0], rc=rc)
    assert rc[0].apply_sync(os.getpid) == pid


def test_an_interrupted_restore_leaves_the_cluster_for_the_next_one(cluster_factory):
    """Ctrl-C while a restore waits for engines still busy with a task of the dead
    controller's: the engines it had begun to adopt stay (their host not known yet: they
    had not answered), and the next restore adopts them with their state; stopping the
    cluster then stops them too."""
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    pids = _engine_pids(rc)
    rc[:].execute("state = 'kept'", block=True)
    rc[:].apply_async(_sleep_then, 4, None)  # (busy: the restore waits for them)
    time.sleep(0.3)
    _kill(cluster.controller_pid)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(KeyboardInterrupt):
            cluster.restart_controller_sync(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    cluster_factory.pids.append(cluster.controller_pid)
    assert _alive(pids) == {0: True, 1: True}
    assert clusters.engine_records(cluster.folder).keys() == {0, 1}
    cluster.restart_controller_sync(timeout=30)
    cluster_factory.pids.append(cluster.controller_pid)
    _wait("both engines adopted", lambda: rc.ids == [0, 1], timeout=20, rc=rc)
    assert _engine_pids(rc) == pids
    assert rc[:].pull("state", block=True) == ["kept", "kept"]


def _restarted_with_engine_0_busy(cluster_factory: Any) -> tuple[jx.Client, dict[int, int], Any]:
    """A 2-engine cluster whose controller was killed while engine 0 ran a long task, and
    restarted: engine 1 adopted, engine 0 still being adopted. (client, pids, the task)"""
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    pids = _engine_pids(rc)
    runaway = rc[0].apply_async(_sleep_then, 120, "never")
    time.sleep(0.5)
    _kill(cluster.controller_pid)
    cluster.restart_controller_sync(timeout=30)
    cluster_factory.pids.append(cluster.controller_pid)
    _wait("engine 1 adopted", lambda: 1 in rc.ids, rc=rc)
    assert 0 not in rc.ids  # (still busy: being adopted)
    return rc, pids, runaway


def test_an_engine_still_being_adopted_can_be_interrupted_by_id(cluster_factory):
    """An engine busy with a long task when its controller died is adopted only once the
    task ends (its main thread answers then): until that, it is not in ``ids``, but a
    signal naming it reaches it, so Ctrl-C's SIGINT can end a runaway task; an id nobody
    knows is refused by the controller."""
    rc, pids, runaway = _restarted_with_engine_0_busy(cluster_factory)
    assert rc.send_signal(signal.SIGINT, targets=[0]) == [0]
    _wait("engine 0 adopted once its task ended", lambda: rc.ids == [0, 1], timeout=20, rc=rc)
    assert _engine_pids(rc) == pids
    assert rc[0].apply_sync(abs, -3) == 3
    with pytest.raises(jx.InvalidTarget, match="77"):
        rc.send_signal(signal.SIGINT, targets=[77])
    with pytest.raises(Exception):  # noqa: B017  (its client lost it with the controller)
        runaway.get(10)


def test_an_engine_still_being_adopted_can_be_shut_down_by_id(cluster_factory):
    """As a signal, a shutdown naming an engine the restarted controller is still adopting
    (busy with a task) reaches it: the engine's process ends, its id is gone, the other
    engine works on; an id nobody knows is refused by the controller."""
    rc, pids, _ = _restarted_with_engine_0_busy(cluster_factory)
    with pytest.raises(jx.InvalidTarget, match="77"):
        rc.shutdown(targets=[77])
    rc.shutdown(targets=[0])
    _wait("engine 0's process gone", lambda: not processes.running(pids[0]), timeout=15, rc=rc)
    assert rc.ids == [1]
    assert rc[1].apply_sync(abs, -3) == 3


def test_a_restarted_controllers_records_of_a_long_history_are_all_read(cluster_factory):
    """After a restart the controller's memory holds no record: every one is read from
    the file, at most 10,000 for one request, and the result status (or get_result) of a
    longer history failed with a ValueError. The client asks in parts."""
    cluster = cluster_factory(2, engine_grace=60)
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    ar = rc.load_balanced_view().map_async(abs, range(-10_500, 0), chunksize=1)
    assert ar.get(timeout=120)[:2] == [10_500, 10_499]
    time.sleep(1)  # (the writer commits every 0.05 s: what it had not is lost to a SIGKILL)
    _kill(cluster.controller_pid)
    cluster.restart_controller_sync(timeout=60)
    cluster_factory.pids.append(cluster.controller_pid)
    _wait("both engines adopted", lambda: rc.ids == [0, 1], rc=rc)
    status = rc.result_status(ar.msg_ids)
    assert len(status["completed"]) == 10_500 and status["pending"] == []
