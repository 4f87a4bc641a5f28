#!/usr/bin/env python
"""Engines at scale: stand-in engines for a 1,000-engine controller, and real engines on
this machine up to 64.

A *stand-in* is an engine as the controller sees it, minus the kernel: its own bound zmq
sockets (shell, control, stdin, heartbeat, iopub and the task lane), a registration
signed with the cluster's key (``px_register_request``, as ``jupyter px engine`` sends),
a ``kernel_info_reply`` naming its lane, pid and host, an ``engine_setup_reply``, a
heartbeat echo, ``status`` messages on iopub, and an ``apply_reply`` (status ``ok``, the
result ``[its engine id]``, packed like a real result: a map flattens it) to every
``apply_request``, batches included. It never runs the function it is sent. A
:class:`Fleet` holds many stand-ins in one process, on one zmq context and one ``epoll``
over the sockets' descriptors, so a fleet costs what its messages cost, not a thread or
a poll over every socket per message.

Stand-ins say they run on another host (``--hostname``, by default ``standin-<n>``): a
client then reaches them through the controller, as it would engines of a cluster too
big for one machine, and the controller watches them by heartbeats alone. ``--local``
makes them claim this host (clients then send to their lanes directly).

Commands (tables on stdout, progress on stderr)::

    python benchmarks/standins.py controller [--n 10,100,1000] [--rounds 3] [--tasks 5000]
    python benchmarks/standins.py engines [--n 2,8,32,64] [--rounds 3]
    python benchmarks/standins.py serve --file CLIENT_FILE -n 250   # (what ``controller`` runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from kernel_engine import protocol, wire
from kernel_engine.serialize import dumps

BENCH_DIR = Path(__file__).resolve().parent
SOCKETS_PER_STANDIN = 6
CHANNELS = ("shell", "control", "stdin", "hb", "lane")  # (ROUTERs; iopub is a PUB)
POLLED = ("shell", "control", "hb", "lane")  # (nobody sends on stdin)
SWEEP_EVERY = 1.0
"""Seconds between looks at every socket, besides epoll (a lost wake-up costs at most this)."""


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def tiny(*args: Any) -> None:
    """The function sent to stand-ins (which never run it)."""
    return None


class StandIn:
    """One stand-in engine: its sockets and what the controller told it."""

    def __init__(self, fleet: Fleet, index: int):
        self.fleet = fleet
        self.index = index
        self.uuid = uuid.uuid4().hex
        self.wire = wire.Wire(fleet.key, session=self.uuid, username="engine")
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.ports: dict[str, int] = {}
        for name in (*CHANNELS, "iopub"):
            sock = fleet.context.socket(zmq.PUB if name == "iopub" else zmq.ROUTER)
            sock.linger = 0
            if name == "hb":
                sock.maxmsgsize = protocol.HEARTBEAT_MAX_BYTES
            self.ports[name] = sock.bind_to_random_port(f"tcp://{fleet.ip}")
            self.sockets[name] = sock
        self.topic = f"kernel.{self.uuid}.status".encode()
        self.engine_id: int | None = None
        self.controller: bytes | None = None
        self.result: list[Any] = []
        self.applied = 0
        self.stopped = False

    def connection_info(self) -> dict[str, Any]:
        """What the registration carries (the kernel's connection info)."""
        return {
            "ip": self.fleet.ip,
            "transport": "tcp",
            "signature_scheme": wire.SIGNATURE_SCHEME,
            **{f"{name}_port": port for name, port in self.ports.items()},
        }

    def register_request(self) -> protocol.RegisterRequest:
        return protocol.RegisterRequest(
            self.connection_info(), os.getpid(), self.fleet.hostname, self.uuid
        )

    def handle(self, channel: str, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        if channel == "hb":
            sock.send_multipart(frames, copy=False)  # (the echo: identity and ping)
        elif channel == "lane":
            self._lane(sock, frames)
        else:
            try:
                msg = self.wire.recv(frames)
            except wire.MessageError:
                self.fleet.dropped += 1
                return
            self._request(channel, sock, msg)

    def _status(self, state: str, parent: dict[str, Any]) -> None:
        self.wire.send(
            self.sockets["iopub"], "status", {"execution_state": state}, parent, idents=[self.topic]
        )

    def _request(self, channel: str, sock: zmq.Socket[Any], msg: wire.Message) -> None:
        """A shell or control request, answered as a kernel would (status around it)."""
        kind = msg.msg_type
        self._status("busy", msg.header)
        reply: dict[str, Any]
        if kind == "kernel_info_request":
            reply = {
                "status": "ok",
                "protocol_version": wire.PROTOCOL_VERSION,
                "implementation": "px-standin",
                "implementation_version": "0",
                "language_info": {"name": "python"},
                "banner": "",
                "engine": {
                    "lane_port": self.ports["lane"],
                    "pid": os.getpid(),
                    "hostname": self.fleet.hostname,
                    "engine_id": self.engine_id,
                    "python": sys.executable,
                },
            }
        elif kind == protocol.ENGINE_STATUS_REQUEST:
            reply = protocol.EngineReport(cpu=0.0).to_content()
        elif kind == protocol.ENGINE_ABORT_REQUEST:
            reply = {"status": "ok", "msg_ids": msg.content.get("msg_ids", [])}
        elif kind in ("shutdown_request", "interrupt_request", "execute_request"):
            reply = {"status": "ok", "restart": False, "execution_count": 0}
        else:
            why = f"a stand-in engine does not serve {kind[:60]!r}"
            reply = protocol.error_content("ValueError", why)
        self.wire.send(sock, protocol.reply_type(kind), reply, msg.header, idents=msg.idents)
        self._status("idle", msg.header)
        if kind == "shutdown_request":
            self.fleet.retire(self)

    def _lane(self, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        peer = frames[0].bytes
        if wire.is_batch(frames, 1):
            if peer != self.controller:
                self.fleet.dropped += 1
                return
            try:
                messages = wire.unpack_batch(frames[1:])
            except wire.MessageError:
                self.fleet.dropped += 1
                return
            replies = [r for r in map(self._lane_message, messages) if r is not None]
            if len(replies) == 1:
                sock.send_multipart([peer, *replies[0]], copy=False)
            elif replies:
                sock.send_multipart([peer, *wire.pack_batch(replies)], copy=False)
            return
        reply = self._lane_message(frames[1:], peer)
        if reply is not None:
            sock.send_multipart(reply, copy=False)

    def _lane_message(self, frames: list[Any], peer: bytes | None = None) -> list[Any] | None:
        """The reply's frames (idents first) to one lane message; ``peer``: its sender, None
        for a message of the controller's batch."""
        try:
            msg = self.wire.recv(frames)
        except wire.MessageError:
            self.fleet.dropped += 1
            return None
        idents = msg.idents if peer is None else [protocol.reply_identity(peer), *msg.idents]
        kind = msg.msg_type
        if kind == protocol.APPLY_REQUEST:
            self.applied += 1
            now = wire.utcnow_iso()
            metadata = {
                "started": now,
                "completed": now,
                "engine_id": self.engine_id,
                "engine_uuid": self.uuid,
                "status": "ok",
                "stdout": "",
                "stderr": "",
            }
            return self.wire.pack(
                protocol.APPLY_REPLY, {"status": "ok"}, msg.header, metadata, self.result, idents
            )[1]
        if kind == protocol.ENGINE_SETUP_REQUEST and peer is not None:
            if self.controller is not None and peer != self.controller:
                refused = protocol.error_content("ValueError", "this stand-in is set up already")
                return self.wire.pack(
                    protocol.ENGINE_SETUP_REPLY, refused, msg.header, idents=idents
                )[1]
            setup = protocol.EngineSetup.from_content(msg.content)
            self.controller, self.engine_id = peer, setup.engine_id
            self.result = dumps([setup.engine_id])
            return self.wire.pack(
                protocol.ENGINE_SETUP_REPLY, {"status": "ok"}, msg.header, idents=idents
            )[1]
        if kind == protocol.LANE_PING_REQUEST:
            content = {"status": "ok", "engine_id": self.engine_id}
            return self.wire.pack(protocol.LANE_PING_REPLY, content, msg.header, idents=idents)[1]
        refused = protocol.error_content("ValueError", f"a lane does not serve {kind[:60]!r}")
        return self.wire.pack(protocol.reply_type(kind), refused, msg.header, idents=idents)[1]

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()


class Fleet:
    """Many stand-ins in this process: one zmq context, one epoll, one thread.

    Parameters
    ----------
    cluster
        The cluster's client connection info (``client.json``): key, address, port.
    n
        How many stand-ins.
    hostname
        The host they say they run on (not this one's: clients reach them through the
        controller; this one's: clients use their lanes directly, as for local engines).
    """

    def __init__(self, cluster: dict[str, Any], n: int, hostname: str):
        if cluster.get("curve_serverkey"):
            raise ValueError("stand-ins speak plain TCP: start the cluster without curve")
        raise_fd_limit()
        self.cluster = cluster
        self.key = str(cluster["key"]).encode()
        self.ip = "127.0.0.1"
        self.hostname = hostname
        self.context: zmq.Context[Any] = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, SOCKETS_PER_STANDIN * n + 64)
        self.context.sndhwm = self.context.rcvhwm = 0
        self.dropped = 0
        self.standins = [StandIn(self, i) for i in range(n)]
        self._by_fd: dict[int, tuple[StandIn, str, zmq.Socket[Any]]] = {}
        self._epoll = select.epoll()
        for s in self.standins:
            for name in POLLED:
                sock = s.sockets[name]
                self._by_fd[sock.FD] = (s, name, sock)
                self._epoll.register(sock.FD, select.EPOLLIN)

    @property
    def live(self) -> int:
        return sum(not s.stopped for s in self.standins)

    def register(self, timeout: float = 60.0) -> list[int]:
        """Register every stand-in with the controller (one DEALER sends them all); their
        engine ids. The controller connects to each and sets it up next (served by
        :meth:`serve`, which may already be running in another thread).

        Raises
        ------
        RuntimeError
            When the controller refuses one, or does not answer within ``timeout``.
        """
        w = wire.Wire(self.key, username="engine")
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(protocol.endpoint({"ip": self.cluster["ip"]}, self.cluster["client_port"]))
        waiting: dict[str, StandIn] = {}
        ids: dict[int, int] = {}
        deadline = time.monotonic() + timeout

        def send(s: StandIn) -> None:
            content = s.register_request().to_content()
            header = w.send(sock, protocol.REGISTER_REQUEST, content, idents=[protocol.HUB_ROUTE])
            waiting[header["msg_id"]] = s

        try:
            for s in self.standins:
                send(s)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    raise RuntimeError(f"{len(waiting)} registrations unanswered in {timeout} s")
                msg = w.recv(sock.recv_multipart())
                if msg.parent_id not in waiting:
                    continue
                s = waiting.pop(msg.parent_id)
                if msg.content.get("status") == "ok":
                    ids[s.index] = int(msg.content["engine_id"])
                elif msg.content.get("retry"):
                    time.sleep(0.05)
                    send(s)
                else:
                    raise RuntimeError(f"registration refused: {msg.content.get('evalue')}")
        finally:
            sock.close(linger=0)
        return [ids[i] for i in range(len(self.standins))]

    def retire(self, s: StandIn) -> None:
        """A stand-in told to shut down: its sockets go."""
        if s.stopped:
            return
        s.stopped = True
        for name in POLLED:
            fd = s.sockets[name].FD
            self._epoll.unregister(fd)
            self._by_fd.pop(fd, None)
        s.close()

    def serve(self, stop: threading.Event, until_all_stopped: bool = True) -> None:
        """Answer the controller (and clients) until ``stop`` is set or, with
        ``until_all_stopped``, every stand-in was shut down."""
        next_sweep = time.monotonic() + SWEEP_EVERY
        while not stop.is_set() and not (until_all_stopped and not self.live):
            for fd, _ in self._epoll.poll(0.1):
                entry = self._by_fd.get(fd)
                if entry is not None:
                    self._drain(*entry)
            if time.monotonic() >= next_sweep:
                for entry in list(self._by_fd.values()):
                    self._drain(*entry)
                next_sweep = time.monotonic() + SWEEP_EVERY

    def _drain(self, s: StandIn, channel: str, sock: zmq.Socket[Any]) -> None:
        # (a zmq descriptor says only that its events may have changed: read them, and
        # read every message, since the descriptor will not say it again for those)
        while not s.stopped and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            s.handle(channel, sock, sock.recv_multipart(copy=False))

    def close(self) -> None:
        for s in self.standins:
            s.close()
        self._epoll.close()
        self.context.term()


def serve_main(args: argparse.Namespace) -> int:
    """``serve``: a fleet of ``-n`` stand-ins, registered, served until all are shut down
    (or SIGTERM, or ``--lifetime`` seconds). Prints their ids as one JSON line."""
    cluster = json.loads(Path(args.file).read_text())
    hostname = socket.gethostname() if args.local else args.hostname
    fleet = Fleet(cluster, args.n, hostname)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = threading.Thread(target=fleet.serve, args=(stop,), name="standins", daemon=True)
    server.start()
    try:
        ids = fleet.register(timeout=args.timeout)
        print(json.dumps({"ids": ids, "pid": os.getpid()}), flush=True)
        server.join(args.lifetime)
    finally:
        stop.set()
        server.join(5)
        fleet.close()
    return 0


class ServeProcesses:
    """Stand-in fleets in child processes (``serve``), stopped by PID."""

    def __init__(self, client_file: Path, n: int, per_process: int, local: bool = False):
        self.procs: list[subprocess.Popen[bytes]] = []
        sizes = [per_process] * (n // per_process) + ([n % per_process] if n % per_process else [])
        for k, size in enumerate(sizes):
            cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--file"]
            cmd += [str(client_file), "-n", str(size), "--hostname", f"standin-{k}"]
            cmd += ["--local"] if local else []
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))

    def registered(self, timeout: float) -> list[int]:
        """The ids every child registered (each prints them once registered)."""
        ids: list[int] = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError(f"stand-in process {proc.pid} did not register in time")
            ids += json.loads(line)["ids"]
        return ids

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Wait for the children to leave (their stand-ins were shut down), then
        SIGTERM, then SIGKILL by PID; the PIDs that had to be signalled."""
        signalled = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signalled.append(proc.pid)
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        return signalled


# ----- measuring


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_mib(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = f()
    return time.perf_counter() - t0, value


def measure_controller(n: int, tasks: int, idle: float, per_process: int) -> dict[str, Any]:
    """One round: a cluster with no engines of its own, ``n`` stand-ins registered, then
    idle, load-balanced and apply-to-all measurements (see benchmarks/README.md)."""
    import jupyter_ext as jx

    out: dict[str, Any] = {"n": n}
    cluster = jx.Cluster(n=0, log_level="WARNING", start_timeout=120)
    fleets: ServeProcesses | None = None
    try:
        rc = cluster.start_and_connect_sync()
        pid = cluster.controller_pid
        assert pid is not None
        t0 = time.perf_counter()
        fleets = ServeProcesses(cluster.connection_file, n, per_process)
        fleets.registered(timeout=120 + n / 10)
        rc.wait_for_engines(n, timeout=120 + n / 10)
        out["register_s"] = time.perf_counter() - t0
        time.sleep(1.0)  # (setups and first heartbeats settle)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        time.sleep(idle)
        out["idle_cpu_pct"] = 100 * (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
        view = rc.load_balanced_view()
        view.map(tiny, range(min(tasks, 10 * n)), chunksize=1, block=False).get(timeout=120)
        c0 = cpu_seconds(pid)
        dt, results = timed(
            lambda: view.map(tiny, range(tasks), chunksize=1, block=False).get(timeout=600)
        )
        out["lb_tasks_s"] = tasks / dt
        out["lb_cpu_us"] = 1e6 * (cpu_seconds(pid) - c0) / tasks
        ids = set(rc.ids)
        if len(results) != tasks or not set(results) <= ids:  # (a map flattens [eid])
            raise RuntimeError(f"load-balanced map: {len(results)} results, not from engines")
        out["lb_engines"] = len(set(results))
        dview = rc[:]
        dview.apply_async(tiny).get(timeout=120)
        samples, cpu, client_cpu = [], [], []
        for _ in range(5):
            c0, own = cpu_seconds(pid), cpu_seconds(os.getpid())
            dt, got = timed(lambda: dview.apply_async(tiny).get(timeout=300))
            cpu.append(cpu_seconds(pid) - c0)
            client_cpu.append(cpu_seconds(os.getpid()) - own)
            samples.append(dt)
            if sorted(r[0] for r in got) != sorted(ids):
                raise RuntimeError("apply-to-all: not every stand-in answered with its id")
        out["all_ms"] = 1000 * statistics.median(samples)
        out["all_cpu_us"] = 1e6 * statistics.median(cpu) / n
        out["all_client_us"] = 1e6 * statistics.median(client_cpu) / n
        out["ctrl_rss_mib"] = rss_mib(pid)
        out["alive"] = len(rc.ids)
    finally:
        cluster.stop_cluster_sync(timeout=60)
        if fleets is not None:
            left = fleets.stop()
            if left:
                out["note"] = f"stand-in processes {left} had to be signalled"
    return out


def measure_engines(n: int, calls: int) -> dict[str, Any]:
    """One round with ``n`` real engines: start to ready, apply-to-all, memory, stop."""
    import psutil

    import jupyter_ext as jx

    sys.path.insert(0, str(BENCH_DIR))
    import workloads as W

    out: dict[str, Any] = {"n": n}
    t0 = time.perf_counter()
    cluster = jx.Cluster(n=n, log_level="WARNING", start_timeout=300)
    pids: list[int] = []
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=300)
        out["start_s"] = time.perf_counter() - t0
        assert cluster.controller_pid is not None
        pids = [cluster.controller_pid]
        pids += [p.pid for p in psutil.Process(cluster.controller_pid).children(recursive=True)]
        engine_pids = [int(rc.engine_info(i)["pid"]) for i in rc.ids]
        pids += [p for p in engine_pids if p not in pids]
        dview = rc[:]
        dt, _ = timed(lambda: dview.apply_async(tiny).get(timeout=120))
        out["first_all_ms"] = 1000 * dt
        samples = [timed(lambda: dview.apply_async(tiny).get(timeout=120))[0] for _ in range(calls)]
        out["all_ms"] = 1000 * statistics.median(samples)
        memory = [W.memory_mib(p) for p in engine_pids]
        if None in memory:
            raise RuntimeError("an engine has no /proc/<pid>/smaps_rollup")
        out["uss_mib"] = statistics.median(m["uss"] for m in memory if m)
        out["rss_mib"] = statistics.median(m["rss"] for m in memory if m)
        out["total_uss_mib"] = sum(m["uss"] for m in memory if m)
        out["ctrl_rss_mib"] = rss_mib(cluster.controller_pid)
    finally:
        t1 = time.perf_counter()
        cluster.stop_cluster_sync(timeout=60)
        out["stop_s"] = time.perf_counter() - t1
        left = [p for p in pids if _running(p)]
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if _running(p)]
        out["left"] = len(left)
        for pid in left:  # (reported in the table; never by name)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return out


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


# ----- tables


def _median(rows: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def table(columns: list[tuple[str, str, int]], by_n: dict[int, list[dict[str, Any]]]) -> list[str]:
    """A Markdown table: one row per N, the median over rounds of each column
    (``columns``: key, heading, digits)."""
    lines = ["| N | " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|---:|" + "---:|" * len(columns))
    for n, rows in by_n.items():
        cells = [_cell(_median(rows, key), digits) for key, _, digits in columns]
        errors = [r["error"] for r in rows if "error" in r]
        last = errors[0].strip().splitlines()[-1][:200] if errors else ""
        note = f" ({len(errors)} failed: {last})" if errors else ""
        lines.append(f"| {n} | " + " | ".join(cells) + f" |{note}")
    return lines


CONTROLLER_COLUMNS = [
    ("register_s", "Register all (s)", 2),
    ("idle_cpu_pct", "Idle CPU (% of a core)", 1),
    ("lb_tasks_s", "LB map (tasks/s)", 0),
    ("lb_cpu_us", "CPU per LB task (us)", 0),
    ("lb_engines", "Engines used", 0),
    ("all_ms", "Apply-to-all (ms)", 1),
    ("all_cpu_us", "CPU per engine of an apply-to-all (us)", 0),
    ("all_client_us", "Client CPU per engine (us)", 0),
    ("ctrl_rss_mib", "Controller RSS (MiB)", 0),
    ("alive", "Engines alive at the end", 0),
]
ENGINE_COLUMNS = [
    ("start_s", "Start to ready (s)", 2),
    ("first_all_ms", "First apply-to-all (ms)", 1),
    ("all_ms", "Apply-to-all (ms)", 1),
    ("uss_mib", "USS per engine (MiB)", 1),
    ("rss_mib", "RSS per engine (MiB)", 1),
    ("total_uss_mib", "USS of all engines (MiB)", 0),
    ("ctrl_rss_mib", "Controller RSS (MiB)", 0),
    ("stop_s", "Stop (s)", 2),
    ("left", "Processes left", 0),
]


def run_rounds(
    ns: list[int], rounds: int, one: Callable[[int], dict[str, Any]]
) -> dict[int, list[dict[str, Any]]]:
    by_n: dict[int, list[dict[str, Any]]] = {n: [] for n in ns}
    for r in range(rounds):
        for n in ns:
            try:
                row = one(n)
            except Exception as exc:
                row = {"n": n, "error": f"{type(exc).__name__}: {exc}"}
            by_n[n].append(row)
            print(f"round {r + 1}/{rounds} N={n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return by_n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("controller", help="stand-in engines against one controller")
    c.add_argument("--n", default="10,100,1000", help="stand-ins, comma-separated")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--tasks", type=int, default=5000, help="tasks of the load-balanced map")
    c.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    c.add_argument("--per-process", type=int, default=500, help="stand-ins per process")
    e = sub.add_parser("engines", help="real engines on this machine")
    e.add_argument("--n", default="2,8,32,64", help="engines, comma-separated")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--calls", type=int, default=20, help="timed apply-to-all calls")
    s = sub.add_parser("serve", help="run registered stand-ins (what `controller` starts)")
    s.add_argument("--file", required=True, help="the cluster's client.json")
    s.add_argument("-n", type=int, default=100)
    s.add_argument("--hostname", default="standin-0", help="the host they say they run on")
    s.add_argument("--local", action="store_true", help="say they run on this host")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to register")
    s.add_argument("--lifetime", type=float, default=3600.0, help="leave after this long")
    args = p.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    ns = [int(x) for x in args.n.split(",") if x]
    if args.command == "controller":
        raise_fd_limit()
        by_n = run_rounds(
            ns,
            args.rounds,
            lambda n: measure_controller(n, args.tasks, args.idle, args.per_process),
        )
        heading = f"Controller with N stand-in engines ({args.tasks} LB tasks; median of "
        columns = CONTROLLER_COLUMNS
    else:
        by_n = run_rounds(ns, args.rounds, lambda n: measure_engines(n, args.calls))
        heading = "N real engines on this machine (median of "
        columns = ENGINE_COLUMNS
    print(f"{heading}{args.rounds} rounds)\n")
    print("\n".join(table(columns, by_n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
