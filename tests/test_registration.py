"""Engines that register themselves: the pure decisions, then real engines and bogus peers.

The first part needs no process: registration fields, id assignment, the start's state
machine and the launcher names. The second starts one cluster for the module and engines
by hand (``python -m kernel_engine.engine.register``), and plays bogus registrants
against its controller's client socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import ClusterFactory, kill_pids, wait_gone

from kernel_engine import clusters, launchers, processes, protocol, wire
from kernel_engine.controller.registration import MAX_PENDING, Occupant, decide
from kernel_engine.launchers.mpi import check_args
from kernel_engine.launchers.state import Startup

PORTS = {
    "shell_port": 5001,
    "control_port": 5002,
    "iopub_port": 5003,
    "hb_port": 5004,
    "stdin_port": 5005,
    "lane_port": 5006,
}


def content(**changes):
    base = {
        "connection_info": {"ip": "127.0.0.1", "transport": "tcp", **PORTS},
        "pid": 1234,
        "hostname": "node1",
        "uuid": "u-1",
        "engine_id": None,
    }
    base.update(changes)
    return base


def request(**changes) -> protocol.RegisterRequest:
    return protocol.RegisterRequest.from_content(content(**changes))


# ----- fields


def test_a_registration_is_parsed_and_keeps_only_what_it_names():
    raw = content()
    raw["connection_info"]["extra"] = "ignored"
    req = protocol.RegisterRequest.from_content(raw)
    assert req.connection_info == {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        **PORTS,
    }
    assert (req.pid, req.hostname, req.uuid, req.engine_id) == (1234, "node1", "u-1", None)
    again = protocol.RegisterRequest.from_content(req.to_content())
    assert again == req
    # unix sockets: a path prefix instead of an address
    raw["connection_info"].update(ip="/run/px/c1/r42", transport="ipc")
    req = protocol.RegisterRequest.from_content(raw)
    assert req.connection_info["ip"] == "/run/px/c1/r42"
    assert req.connection_info["transport"] == "ipc"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"connection_info": "tcp://x"}, "connection_info"),
        ({"connection_info": {**PORTS, "ip": "a b"}}, "connection_info.ip"),
        ({"connection_info": {**PORTS, "ip": "tcp://1.2.3.4:5"}}, "connection_info.ip"),
        ({"connection_info": {**PORTS, "ip": "h", "transport": "udp"}}, "transport"),
        ({"connection_info": {**PORTS, "ip": "h", "transport": "ipc"}}, "connection_info.ip"),
        ({"connection_info": {**PORTS, "ip": "/a/../b", "transport": "ipc"}}, "unix socket"),
        ({"connection_info": {**PORTS, "ip": "/a/" + "b" * 90, "transport": "ipc"}}, "unix"),
        ({"connection_info": {**PORTS, "ip": "/a\nb", "transport": "ipc"}}, "unix socket"),
        ({"connection_info": {**PORTS, "ip": "a/b", "transport": "ipc"}}, "unix socket"),
        ({"connection_info": {**PORTS, "ip": 7, "transport": "ipc"}}, "unix socket"),
        ({"connection_info": {**PORTS, "ip": "h", "shell_port": "5001"}}, "shell_port"),
        ({"connection_info": {**PORTS, "ip": "h", "hb_port": 70000}}, "hb_port"),
        ({"connection_info": {**PORTS, "ip": "h", "lane_port": 5001}}, "same port"),
        ({"connection_info": {**PORTS, "ip": "h", "curve_publickey": "short"}}, "curve"),
        ({"pid": 0}, "pid"),
        ({"pid": True}, "pid"),
        ({"hostname": None}, "hostname"),
        ({"uuid": ""}, "uuid"),
        ({"uuid": "x" * 2000}, "uuid"),
        ({"engine_id": -1}, "engine_id"),
        ({"engine_id": protocol.MAX_ENGINE_ID + 1}, "engine_id"),
        ({"engine_id": 1.5}, "engine_id"),
    ],
)
def test_a_bad_field_is_refused_by_name(changes, named):
    with pytest.raises((TypeError, ValueError), match=named):
        protocol.RegisterRequest.from_content(content(**changes))


# ----- ids


def held(uuid="other", pid=99, host="node2", state="ready") -> Occupant:
    return Occupant(uuid, pid, host, state)


def test_an_engine_asking_for_no_id_gets_the_next_unused_one():
    assert decide(request(), {}, 0).engine_id == 0
    assert decide(request(), {0: held(), 1: held("b")}, 0).engine_id == 2
    assert decide(request(), {3: held()}, 3).engine_id == 4
    assert decide(request(), {}, 7).engine_id == 7


def test_an_engine_that_asked_for_the_highest_id_leaves_ids_to_the_others():
    """One registration of ``--id 999999`` moved the next id past the highest, and every
    engine asking for no id was refused ("no engine id left") for the controller's life."""
    past = protocol.MAX_ENGINE_ID + 1
    top = {protocol.MAX_ENGINE_ID: held()}
    assert decide(request(), top, past).engine_id == 0
    assert decide(request(), {**top, 0: held("a"), 2: held("b")}, past).engine_id == 1
    assert decide(request(), {}, past).engine_id == 0


def test_an_engine_gets_the_id_it_asks_for_when_free():
    decision = decide(request(engine_id=5), {0: held()}, 1)
    assert (decision.engine_id, decision.again, decision.refusal) == (5, False, "")


def test_a_live_engine_is_never_displaced_and_the_registrant_may_retry():
    for state in ("starting", "connecting", "ready"):
        decision = decide(request(engine_id=0), {0: held(state=state)}, 1)
        assert decision.engine_id is None
        assert decision.retry
        assert "held by a live engine" in decision.refusal
        assert "pid 99 on node2" in decision.refusal


def test_the_same_process_registering_again_gets_the_same_answer():
    engines = {4: held(uuid="u-1", state="connecting")}
    assert decide(request(), engines, 5) == decide(request(engine_id=4), engines, 5)
    decision = decide(request(engine_id=4), engines, 5)
    assert (decision.engine_id, decision.again) == (4, True)
    other = decide(request(engine_id=6), engines, 5)
    assert other.engine_id is None and not other.retry
    assert "registered as engine 4 already" in other.refusal


def test_registrations_not_yet_ready_are_bounded():
    engines = {i: held(uuid=f"u{i}", state="starting") for i in range(MAX_PENDING)}
    decision = decide(request(), engines, MAX_PENDING)
    assert decision.engine_id is None and decision.retry
    engines[0] = held(uuid="u0", state="ready")
    assert decide(request(), engines, MAX_PENDING).engine_id == MAX_PENDING


# ----- the start


def test_the_start_is_ready_when_every_awaited_engine_is():
    s = Startup()
    s.expect([0, 1], now=0)
    assert s.engine_ready(0) is None
    assert s.engine_ready(7) is None  # (not awaited)
    report = s.engine_ready(1)
    assert report is not None and report.ready and report.ids == (0, 1)
    assert s.engine_dead(0, "late") is None  # (reported: nothing changes)


def test_the_start_may_end_at_a_minimum_and_the_rest_join_later():
    s = Startup(minimum=2)
    s.expect([0, 1, 2, 3], now=0)
    assert s.engine_ready(3) is None
    report = s.engine_ready(0)
    assert report is not None and report.ready and report.ids == (0, 3)
    assert s.engine_ready(1) is None


def test_the_start_fails_at_the_first_death_or_launcher_failure():
    s = Startup()
    s.expect([0, 1], now=0)
    s.engine_ready(0)
    report = s.engine_dead(1, "engine 1 exited with code 1")
    assert report is not None and not report.ready
    assert "engine 1 exited with code 1" in report.message
    s = Startup()
    s.expect([0], now=0)
    report = s.launcher_failed("mpiexec: Error: unknown option")
    assert report is not None and report.message == "mpiexec: Error: unknown option"
    assert s.launcher_failed("again") is None


def test_the_start_fails_after_its_timeout_naming_who_is_missing():
    s = Startup(timeout=10)
    assert s.tick(100) is None  # (nothing awaited yet: no deadline)
    s.expect([0, 1, 2], now=100)
    s.engine_ready(1)
    assert s.tick(109) is None
    report = s.tick(110.5)
    assert report is not None and not report.ready
    assert "1 of 3 engines ready within 10 s" in report.message
    assert "still waiting for 0, 2" in report.message


def test_a_held_start_waits_and_nothing_awaited_is_ready_at_once():
    s = Startup()
    assert s.check(held=True) is None
    report = s.check()
    assert report is not None and report.ready


# ----- launchers by name


def test_launchers_are_found_by_name_or_import_path():
    assert launchers.find("mpi").name == "mpi"
    assert launchers.find("slurm").name == "slurm"
    assert launchers.find("kernel_engine.launchers.mpi:MPILauncher").name == "mpi"
    assert launchers.launcher_name("local") == "local"
    assert (
        launchers.launcher_name(launchers.mpi.MPILauncher)
        == "kernel_engine.launchers.mpi:MPILauncher"
    )
    with pytest.raises(ValueError, match="engines='pbs' names no launcher"):
        launchers.find("pbs")
    with pytest.raises(ValueError, match="not a subclass"):
        launchers.find("os.path:join")
    with pytest.raises(TypeError):
        launchers.launcher_name(42)

    class Mine(launchers.Launcher):  # (defined in a function: not importable)
        pass

    with pytest.raises(ValueError, match="importable"):
        launchers.launcher_name(Mine)


def test_launcher_options_are_checked_before_anything_starts(tmp_path):
    assert check_args("mpi_args", "--oversubscribe -x A") == ["--oversubscribe", "-x", "A"]
    with pytest.raises(TypeError, match="mpi_args"):
        check_args("mpi_args", [1])
    with pytest.raises(ValueError, match=r"^slurm_args .*No closing quotation"):
        check_args("slurm_args", "--job-name='my job")  # (an unclosed quote)
    ctx = launchers.LaunchContext(tmp_path, 2, options={"slurm_args": ["--time=1"]})
    with pytest.raises(TypeError, match="takes no option slurm_args"):
        launchers.find("mpi")(ctx)
    import jupyter_ext as jx

    with pytest.raises(ValueError, match="slurm_args do not apply"):
        jx.Cluster(n=1, engines="mpi", slurm_args=["--time=1"])
    with pytest.raises(ValueError, match="names no launcher"):
        jx.Cluster(n=1, engines="nope")


# ----- real engines


@pytest.fixture(scope="module")
def cluster_rc():
    factory = ClusterFactory()
    cluster, rc = factory.start(1)
    yield cluster, rc, factory
    factory.stop_all()


class Engines:
    """Registering engines started by a test, stopped by PID at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, cli: bool = False
    ) -> subprocess.Popen[bytes]:
        """``python -m kernel_engine.engine.register ARGS`` (``cli``: as ``jupyter px
        engine ARGS``)."""
        module = ["kernel_engine.cli", "engine"] if cli else ["kernel_engine.engine.register"]
        log = open(self.folder / f"hand-{len(self.processes)}.log", "ab")  # noqa: SIM115
        with log:
            p = subprocess.Popen(
                [sys.executable, "-m", *module, *args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        self.processes.append(p)
        return p

    def stop(self) -> None:
        kill_pids([p.pid for p in self.processes if p.poll() is None])
        for p in self.processes:
            p.wait(10)


@pytest.fixture
def hand(tmp_path):
    engines = Engines(tmp_path)
    yield engines
    engines.stop()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_engine_started_by_hand_joins_leaves_when_killed_and_comes_back_with_its_id(
    cluster_rc, hand
):
    cluster, rc, _ = cluster_rc
    first = hand.start("--file", str(cluster.connection_file), "--id", "7")
    rc.wait_for_engines(2, timeout=30)
    assert sorted(rc.ids) == [0, 7]
    assert rc[7].apply_sync(os.getpid) == first.pid
    info = rc.engine_info(7)
    assert info["pid"] == first.pid
    # on this host, it listens on unix sockets in the cluster's folder, as started ones do
    conn = info["connection_info"]
    prefix = Path(cluster.folder) / f"r{first.pid}"
    assert conn["transport"] == "ipc" and conn["ip"] == str(prefix), conn
    rc[7].push({"mark": "first life"}, block=True)

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: 7 not in rc.ids, timeout=10)  # (its pid is watched: seen at once)
    wait_for(lambda: not list(prefix.parent.glob(f"{prefix.name}-*")), timeout=10)

    second = hand.start("--cluster-id", cluster.cluster_id, "--id", "7", cli=True)
    wait_for(lambda: 7 in rc.ids)
    assert rc[7].apply_sync(os.getpid) == second.pid
    assert rc[7].apply_sync(lambda: "mark" in globals()) is False
    assert rc[:].apply_sync(lambda: 1) == [1, 1]
    second.send_signal(signal.SIGTERM)
    second.wait(10)
    wait_for(lambda: 7 not in rc.ids, timeout=10)


def test_an_engine_joins_with_connection_info_in_its_environment(cluster_rc, hand):
    cluster, rc, _ = cluster_rc
    info = clusters.engine_connection(json.loads(cluster.connection_file.read_text()))
    assert "key" in info and "folder" not in info
    p = hand.start(env={clusters.CONNECTION_ENV: json.dumps(info)})
    wait_for(lambda: len(rc.ids) == 2)
    new = max(rc.ids)
    assert new > 7  # (the next unused id)
    assert rc[new].apply_sync(os.getpid) == p.pid
    rc.shutdown(targets=[new], block=True)
    assert p.wait(10) == 0
    assert not list(Path(cluster.folder).glob(f"r{p.pid}-*"))
    # an address asked for: TCP there
    tcp = hand.start("--file", str(cluster.connection_file), "--ip", "127.0.0.1")
    wait_for(lambda: len(rc.ids) == 2)
    conn = rc.engine_info(max(rc.ids))["connection_info"]
    assert conn["transport"] == "tcp" and conn["ip"] == "127.0.0.1", conn
    assert rc[max(rc.ids)].apply_sync(os.getpid) == tcp.pid
    rc.shutdown(targets=[max(rc.ids)], block=True)
    assert tcp.wait(10) == 0


def test_a_shut_down_engine_closes_nothing_while_its_control_thread_runs(
    cluster_rc, hand, tmp_path
):
    # The shutdown request stops the engine's main loop while the control thread still
    # finishes that request (flushes, idle status). Tearing down the IOPub thread and the
    # sockets meanwhile made libzmq abort now and then (SIGABRT, signaler.cpp), or hang
    # the exit in a flush nobody would do: a slow flush makes that interleaving certain.
    def slow_control_flushes(path: str, delay: float) -> None:
        """(Run on an engine.) The control thread's stdout flushes, which ipykernel does after
        each control message (the shutdown request's too), take ``delay`` s more; each then
        notes in ``path`` whether the IOPub thread it flushes through still runs."""
        import threading
        import time

        from ipykernel.iostream import OutStream

        plain = OutStream.flush

        def flush(self):
            if threading.current_thread().name == "Control" and self.name == "stdout":
                time.sleep(delay)
                pub = self.pub_thread
                alive = pub is not None and pub.thread is not None and pub.thread.is_alive()
                with open(path, "a") as f:
                    f.write(f"{alive}\n")
            return plain(self)

        OutStream.flush = flush

    cluster, rc, _ = cluster_rc
    p = hand.start("--file", str(cluster.connection_file), "--id", "9")
    wait_for(lambda: 9 in rc.ids)
    marks = tmp_path / "flushes.txt"
    rc[9].apply_sync(slow_control_flushes, str(marks), 1.0)
    rc.shutdown(targets=[9], block=True)  # (SIGKILL after the controller's 3 s grace)
    assert p.wait(10) == 0
    said = marks.read_text().split()
    assert said and set(said) == {"True"}, said
    assert "Assertion failed" not in (tmp_path / "hand-0.log").read_text()
    wait_for(lambda: 9 not in rc.ids, timeout=10)


def test_an_engine_that_finds_no_controller_says_so_and_exits(tmp_path, hand):
    with socketpair_port() as port:
        dead = {"ip": "127.0.0.1", "client_port": port, "key": "k", "cluster_id": "gone"}
        (tmp_path / "client.json").write_text(json.dumps(dead))
        started = time.monotonic()
        p = hand.start("--file", str(tmp_path / "client.json"), "--timeout", "1.5")
        assert p.wait(30) == 1
    assert time.monotonic() - started < 20
    said = (tmp_path / "hand-0.log").read_text()
    assert "not registered with the controller" in said


def test_an_engine_given_a_stale_file_says_its_controller_is_gone_at_once(tmp_path, hand):
    # (a controller of this host that was killed leaves its client.json behind)
    dead = subprocess.Popen(["true"])
    started = processes.start_time(dead.pid)  # (not reaped yet: still readable)
    dead.wait(10)
    with socketpair_port() as port:
        stale = {
            "ip": "127.0.0.1",
            "client_port": port,
            "key": "k",
            "cluster_id": "gone",
            "controller_pid": dead.pid,
            "controller_started": started,
            "hostname": socket.gethostname(),
        }
        (tmp_path / "client.json").write_text(json.dumps(stale))
        begun = time.monotonic()
        p = hand.start("--file", str(tmp_path / "client.json"), "--timeout", "30", cli=True)
        assert p.wait(20) == 1
    assert time.monotonic() - begun < 10
    said = (tmp_path / "hand-0.log").read_text()
    assert "is stale: the controller of cluster gone" in said and "is not running" in said


@pytest.mark.parametrize("timeout", ["nan", "-5", "0", "soon"])
def test_an_engine_refuses_a_timeout_that_is_no_wait_before_starting(tmp_path, hand, timeout):
    dead = {"ip": "127.0.0.1", "client_port": 9, "key": "k", "cluster_id": "gone"}
    (tmp_path / "client.json").write_text(json.dumps(dead))
    p = hand.start("--file", str(tmp_path / "client.json"), "--timeout", timeout, cli=True)
    assert p.wait(30) == 2  # (a usage error, before any kernel starts)
    said = (tmp_path / "hand-0.log").read_text()
    assert "--timeout" in said and "not registered" not in said


class socketpair_port:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc) -> None:
        pass


def _ask(cluster, msg_content, key: bytes | None = None, timeout: float = 5.0):
    """Send one registration to the controller; its reply's content (None: no reply)."""
    info = json.loads(cluster.connection_file.read_text())
    w = wire.Wire(key or info["key"].encode())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://127.0.0.1:{info['client_port']}")
        w.send(sock, protocol.REGISTER_REQUEST, msg_content, idents=[protocol.HUB_ROUTE])
        if not sock.poll(int(timeout * 1000)):
            return None
        msg = w.recv(sock.recv_multipart())
        assert msg.msg_type == protocol.REGISTER_REPLY
        return msg.content
    finally:
        sock.close()
        ctx.term()


def test_bogus_registrations_are_refused_and_displace_nobody(cluster_factory):
    cluster, rc = cluster_factory.start(1)
    pid0 = rc.engine_info(0)["pid"]
    # not signed with the cluster's key: dropped unread
    assert _ask(cluster, content(), key=b"not the key", timeout=1.0) is None
    # signed, but a field is wrong: an error naming it
    reply = _ask(cluster, content(pid="1"))
    assert reply["status"] == "error" and "pid" in reply["evalue"]
    reply = _ask(cluster, {"connection_info": None})
    assert reply["status"] == "error" and "connection_info" in reply["evalue"]
    # a pid said to run here that does not
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = socket.gethostname()
    reply = _ask(cluster, content(pid=gone.pid, hostname=here, uuid="bogus-0"))
    assert reply["status"] == "error" and "does not run" in reply["evalue"]
    # the id of a live engine: refused (retry), and that engine is untouched
    reply = _ask(cluster, content(engine_id=0, pid=os.getpid(), hostname=here, uuid="bogus-1"))
    assert reply["status"] == "error" and reply["retry"] is True
    assert "held by a live engine" in reply["evalue"]
    # accepted, but nothing answers at its ports, and its pid is this test's own: the
    # controller may never signal a pid it was only told
    reply = _ask(cluster, content(engine_id=40, pid=os.getpid(), hostname=here, uuid="bogus-2"))
    assert reply == {"status": "ok", "engine_id": 40, "cluster_id": cluster.cluster_id}
    # (the same process registering again gets the same answer)
    assert _ask(cluster, content(pid=os.getpid(), hostname=here, uuid="bogus-2")) == reply
    # an engine on another host, never answering
    reply = _ask(cluster, content(engine_id=41, pid=1, hostname="elsewhere", uuid="bogus-3"))
    assert reply["status"] == "ok"
    # unix sockets the controller would not reach, or that are not in its folder
    mine = f"r{os.getpid()}"
    for prefix, host, why in (
        (f"{cluster.folder}/{mine}", "elsewhere", "another host"),
        (f"/tmp/elsewhere/{mine}", here, "not in the cluster's folder"),
        (f"{cluster.folder}/{mine}", here, "not visible to the controller"),
        (f"{cluster.folder}/e0", here, "not named after its pid"),  # (engine 0's sockets)
    ):
        conn = {**PORTS, "ip": prefix, "transport": "ipc"}
        asked = content(connection_info=conn, pid=os.getpid(), hostname=host, uuid="bogus-4")
        reply = _ask(cluster, asked)
        assert reply["status"] == "error" and why in reply["evalue"], reply
        assert reply["retry"] is False
    assert rc.ids == [0]
    assert rc[0].apply_sync(os.getpid) == pid0
    assert 40 not in rc.ids and 41 not in rc.ids
    # stopping the cluster stops what it started; the test process is still here
    started = time.monotonic()
    cluster.stop_cluster_sync()
    assert time.monotonic() - started < 10
    assert not wait_gone([pid0], timeout=10)


def test_an_engine_joins_an_encrypted_cluster_with_a_keypair_of_its_own(cluster_factory, hand):
    cluster, rc = cluster_factory.start(1, curve=True)
    p = hand.start("--file", str(cluster.connection_file), "--id", "3")
    rc.wait_for_engines(2, timeout=30)
    conn = rc.engine_info(3)["connection_info"]
    assert conn["curve_publickey"] and conn["curve_publickey"] != json.loads(
        cluster.connection_file.read_text()
    ).get("curve_serverkey")
    assert rc[3].apply_sync(os.getpid) == p.pid
    # a registration without a keypair is refused by an encrypted cluster
    info = json.loads(cluster.connection_file.read_text())
    w = wire.Wire(info["key"].encode())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    wire.curve_client(sock, info["curve_serverkey"].encode())
    try:
        sock.connect(f"tcp://127.0.0.1:{info['client_port']}")
        w.send(sock, protocol.REGISTER_REQUEST, content(uuid="plain"), idents=[protocol.HUB_ROUTE])
        assert sock.poll(5000)
        reply = w.recv(sock.recv_multipart()).content
    finally:
        sock.close()
        ctx.term()
    assert reply["status"] == "error" and "CurveZMQ" in reply["evalue"]


def test_an_engine_binds_unix_sockets_the_controller_takes(tmp_path, monkeypatch):
    """The engine's choice of unix sockets agrees with the controller's checks: a folder
    name of any characters (an '@' in a home folder), a relative runtime folder, and TCP
    when the controller would refuse them (a copy of the folder)."""
    import shutil

    from kernel_engine.engine import register as engine_register

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "u@c"))
    folder = clusters.cluster_folder("c1")
    clusters.make_private_folder(folder)
    clusters.write_private_json(folder / "client.json", {"key": "k", "cluster_id": "c1"})
    cluster = {"ip": "127.0.0.1", "cluster_id": "c1", "key": "k", "hostname": socket.gethostname()}
    prefix = engine_register.socket_prefix(cluster)
    assert prefix == str(folder / f"r{os.getpid()}")
    assert protocol.check_socket_prefix("ip", prefix) == prefix
    copy = tmp_path / "copy"
    clusters.make_private_folder(copy)
    shutil.copy(folder / "client.json", copy / "client.json")
    assert engine_register.socket_prefix(cluster, str(copy / "client.json")) is None
    assert engine_register.socket_prefix(cluster, str(folder / "client.json")) == prefix
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", "u@c")
    assert engine_register.socket_prefix(cluster) == prefix


def test_a_dead_clusters_engine_sockets_go_with_its_key_files(tmp_path, monkeypatch):
    """`jupyter px list` (clean_dead_clusters) removes the key files of a dead cluster,
    engine connection files included: the socket files those name go first."""
    import socket as sockets

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    folder = clusters.cluster_folder("dead1")
    clusters.make_private_folder(folder)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    engines = {str(i): {"pid": gone.pid, "hostname": here, "pid_started": "0"} for i in (0, 1)}
    clusters.write_private_json(
        folder / "cluster.json", {"controller_pid": gone.pid, "engines": engines}
    )
    clusters.write_private_json(
        folder / "engine-1.json", {"transport": "ipc", "ip": str(folder / f"r{gone.pid}")}
    )
    bound = []
    for name in ("e0-1", f"r{gone.pid}-1", f"r{gone.pid}0-1"):  # (the last: not theirs)
        s = sockets.socket(sockets.AF_UNIX)
        s.bind(str(folder / name))
        bound.append(s)
    old = time.time() - 60
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (old, old), follow_symlinks=False)
    assert [c.folder for c in clusters.clean_dead_clusters()] == [folder]
    assert sorted(p.name for p in folder.iterdir() if p.is_socket()) == [f"r{gone.pid}0-1"]
    for s in bound:
        s.close()
