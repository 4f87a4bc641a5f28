"""The engine set: start engine kernels through jupyter_client, watch them, stop them.

Each engine is a kernel of the installed engine kernel spec started by a
``jupyter_client.KernelManager`` (so its provisioner decides how), with its stdout and
stderr in a log file in the cluster folder. It is ready when it has answered
``kernel_info_request`` on its shell channel (which also tells us its task lane port, pid
and host) and ``engine_setup_request`` on its lane (which tells it its id). It is watched
by polling its process (a death is seen within :attr:`EngineSet.poll_interval`) and by
heartbeats (for engines whose process we cannot poll, and hung hosts).

Heartbeats are counted from the pings this controller actually sent: an engine is lost
after :attr:`EngineSet.max_missed` pings in a row went unanswered, each given a whole
interval to come back. A controller that was itself paused sent no pings meanwhile, so
its pause never counts against healthy engines.

The controller's sockets to an engine have identities that zmq makes up (they start
with a zero byte, which no peer may choose), so nobody can take over the controller's
place on an engine's lane.

A controller restarted on the cluster folder *adopts* the engines that outlived the last
one (:meth:`EngineSet.adopt`): it connects to them with their connection files, tells
them on their control channel to wait for it (``px_adopt_request``, answered even while a
task runs), then sets them up as new ones. Engines started here are managed through their
kernel manager; adopted ones, which are not our children, by PID (a pidfd where there is
one): exit detection, signals and stopping.

An engine started elsewhere (mpiexec, srun, by hand) *registers* (:meth:`EngineSet.register`,
the id decided by :mod:`.registration`): the controller connects to the ports it gave and
sets it up like one it started. It is managed by PID too when it runs on this host (its
pid checked to run here when it registers, and to be the one its kernel reports), else by
heartbeats alone; it is never signalled unless it runs here.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from jupyter_client import KernelManager

from kernel_engine import clusters, processes, protocol, wire
from kernel_engine.errors import LaunchError
from kernel_engine.launchers.base import LaunchContext
from kernel_engine.launchers.local import LocalLauncher

from .loop import PollLoop
from .registration import Occupant, decide

log = logging.getLogger("kernel_engine.controller")

SECRET_KEYS = frozenset({"key"})
"""Connection info fields left out of what clients learn of an engine (``engine_info``
adds the key back: a client has it anyway). An encrypted engine's CurveZMQ keypair stays
in: Jupyter clients attach to a kernel with its keypair, and it only travels to clients
over encrypted channels."""

IOPUB_HWM = 10_000
"""Messages of an engine's output the controller buffers before the engine's side drops."""


@dataclass(eq=False)
class Engine:
    """One engine kernel and the controller's sockets to it."""

    id: int
    connection_info: dict[str, Any]
    km: KernelManager | None = None
    log_path: str | None = None
    state: str = "starting"
    uuid: str = ""
    pid: int | None = None
    hostname: str = ""
    # adopted from a controller that died: not our child, managed by PID
    adopted: bool = False
    pid_started: str | None = None  # (processes.start_time: tells it from a reuse of its PID)
    pidfd: int | None = None
    # registered by itself (not our child); ``local``: its PID names a process on this host
    registered: bool = False
    local: bool = True
    # a registered engine's kernel confirmed its pid (only then may it be signalled)
    verified: bool = False
    sockets: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    info_sent_at: float = 0.0
    iopub_seen: bool = False
    # heartbeats: the last ping sent, the last one echoed, pings unanswered in a row
    ping: int = 0
    pong: int = 0
    missed: int = 0

    @property
    def by_pid(self) -> bool:
        """Managed by PID (not a kernel manager's child): adopted or registered."""
        return self.adopted or self.registered

    @property
    def route(self) -> bytes:
        """The frame naming this engine in replies to clients."""
        return str(self.id).encode()

    def url(self, port: int) -> str:
        return protocol.endpoint(self.connection_info, port)

    def info(self) -> protocol.EngineInfo:
        """What clients learn about this engine (``Client.engine_info``), key left out."""
        conn = {k: v for k, v in self.connection_info.items() if k not in SECRET_KEYS}
        return protocol.EngineInfo(self.id, self.uuid, self.pid, self.hostname, self.state, conn)

    def record(self) -> dict[str, Any]:
        """What the cluster folder's ``cluster.json`` says of this engine (what a restarted
        controller adopts it by, and ``jupyter px stop`` stops it by)."""
        return {**self.info().to_content(), "pid_started": self.pid_started}

    def log_tail(self, lines: int = 30) -> str:
        """The end of the engine's stdout/stderr log, without ipykernel's TCP warning."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        kept = [ln for ln in text.splitlines() if "running over TCP without encryption" not in ln]
        return "\n".join(kept[-lines:])


FILES_PER_ENGINE = 10
"""Descriptors the controller holds per engine: five sockets, each a connection and a
mailbox."""
FILES_KEPT_FREE = 32
"""Descriptors a new engine must leave free. Past the limit, libzmq aborts the process
when it cannot make a poller (a kernel manager's new context does), and writes of the
cluster's files fail: an engine too many is refused instead."""


def files_left() -> int:
    """How many more files this process may open (a large number if unknown)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return 1 << 30
    return (1 << 30) if soft == resource.RLIM_INFINITY else soft - used


def _no_room(engines: int) -> str | None:
    """Why one more engine would bring the controller too near its limit on open files
    (it holds ``engines``; its descriptors are counted only when that may be so)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    guess = 256 + (engines + 1) * FILES_PER_ENGINE  # (a controller with no engine: ~60)
    if soft == resource.RLIM_INFINITY or guess + 4 * FILES_KEPT_FREE < soft:
        return None
    left = files_left()
    if left >= FILES_KEPT_FREE + FILES_PER_ENGINE:
        return None
    return _why(OSError(errno.EMFILE, f"only {max(left, 0)} more files may be opened"))


def _why(exc: BaseException) -> str:
    """What a failure to open a socket says, with the limit on open files when that is
    what ran out."""
    if getattr(exc, "errno", None) == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"{exc} (the controller may open {soft} files; each engine takes about "
            f"{FILES_PER_ENGINE}: raise the limit with `ulimit -n` before starting the cluster)"
        )
    return str(exc)


def describe_exit(code: int | None, oom: bool = False) -> str:
    """How a process ended, in words: ``was killed by signal SIGKILL`` or ``exited with
    code 1``; ``oom``: the kernel's OOM killer struck meanwhile."""
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        why = " (most likely out of memory: the kernel's OOM killer ran)" if oom else ""
        return f"was killed by signal {name}{why}"
    return f"exited with code {code}"


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed since boot (0 if unknown)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class EngineSet:
    """Starts, watches and stops engines; reports through the ``on_*`` callbacks."""

    poll_interval = 0.1
    heartbeat_interval = 1.0
    max_missed = 10
    start_timeout = 60.0

    def __init__(
        self,
        loop: PollLoop,
        context: zmq.Context[Any],
        wire: wire.Wire,
        folder: Path,
        ip: str = "127.0.0.1",
        cluster_id: str = "",
        curve: bool = False,
        grace: float = clusters.DEFAULT_ENGINE_GRACE,
    ):
        self.loop = loop
        self.context = context
        self.wire = wire
        self.folder = folder
        self.ip = ip
        self.cluster_id = cluster_id
        self.curve = curve
        self.grace = grace
        self._oom_kills = oom_kills()
        self.engines: dict[int, Engine] = {}
        self._next_id = 0
        self.on_ready: Callable[[Engine], None] = lambda e: None
        self.on_dead: Callable[[Engine, str], None] = lambda e, why: None
        self.on_message: Callable[[Engine, str, list[Any]], None] = lambda e, ch, f: None
        self.on_iopub: Callable[[Engine, list[Any]], None] = lambda e, f: None
        # an engine's report of itself (CPU, memory, its task), asked for by the monitor
        self.on_report: Callable[[Engine, dict[str, Any]], None] = lambda e, c: None
        loop.call_every(self.poll_interval, self._watch)
        loop.call_every(self.heartbeat_interval, self._beat)

    def ready_ids(self) -> list[int]:
        return sorted(e.id for e in self.engines.values() if e.state == "ready")

    def start(self, n: int, cwd: str | None = None) -> list[Engine]:
        """Start ``n`` engine kernels; they become ready (or die) asynchronously."""
        options = {"ip": self.ip, "key": self.wire.key, "curve": self.curve, "grace": self.grace}
        context = LaunchContext(self.folder, n, self.reserve(n), cwd=cwd, options=options)
        launcher = LocalLauncher(context)
        started = []
        for eid in launcher.ids:  # (one at a time: each is watched as soon as it starts)
            full = _no_room(len(self.engines))
            if full is not None:
                raise LaunchError(f"engine {eid} not started: {full}")
            try:
                kernel = launcher.start_kernel(eid)
            except OSError as exc:
                raise LaunchError(f"engine {eid} could not be started: {_why(exc)}") from exc
            engine = Engine(eid, kernel.connection_info, km=kernel.km, log_path=kernel.log_path)
            why = self._connect(engine)
            if why is not None:
                self._cleanup(engine, kill=True)
                raise LaunchError(f"engine {eid}: {why}")
            self.engines[eid] = engine
            self._send_kernel_info(engine)
            started.append(engine)
        return started

    def reserve(self, n: int) -> int:
        """Take ``n`` consecutive new ids (for engines being launched); the first."""
        first = self._next_id
        self._next_id += n
        return first

    def register(self, request: protocol.RegisterRequest) -> dict[str, Any]:
        """An engine that registers itself: the reply's content (its id, or why not).

        Accepted, it is connected to and set up asynchronously like one started here; its
        connection file goes to the cluster folder (for a restarted controller, and for
        Jupyter clients attaching to it).
        """
        held = {
            eid: Occupant(e.uuid, e.pid, e.hostname, e.state) for eid, e in self.engines.items()
        }
        decision = decide(request, held, self._next_id)
        if decision.engine_id is None:
            content = protocol.error_content("RegistrationError", decision.refusal)
            content["retry"] = decision.retry
            return content
        eid = decision.engine_id
        reply = {"status": "ok", "engine_id": eid, "cluster_id": self.cluster_id}
        if decision.again:
            return reply
        here = request.hostname == socket.gethostname()
        if here and not processes.running(request.pid):
            why = f"pid {request.pid} does not run on {request.hostname}, this host"
            return {**protocol.error_content("RegistrationError", why), "retry": False}
        unusable = self._unusable_sockets(request.connection_info, here, request.pid)
        if unusable is not None:
            return {**protocol.error_content("RegistrationError", unusable), "retry": False}
        info = {**request.connection_info, "key": self.wire.key.decode()}
        engine = Engine(
            eid,
            info,
            log_path=str(self.folder / f"engine-{eid}.log"),
            uuid=request.uuid,
            pid=request.pid,
            hostname=request.hostname,
            registered=True,
            local=here,
            pid_started=processes.start_time(request.pid) if here else None,
        )
        if here:
            try:
                engine.pidfd = os.pidfd_open(request.pid)
            except (AttributeError, OSError):
                engine.pidfd = None
        unreachable = self._connect(engine)
        if unreachable is None:
            try:
                clusters.write_private_json(self.folder / f"engine-{eid}.json", info)
            except OSError as exc:
                self._close(engine)
                unreachable = f"the controller cannot write engine {eid}'s file: {_why(exc)}"
        if unreachable is not None:
            self._close_pidfd(engine)
            return {**protocol.error_content("RegistrationError", unreachable), "retry": False}
        self.engines[eid] = engine
        self._next_id = max(self._next_id, eid + 1)
        log.info(
            "engine %i registered (pid %i on %s, %s)",
            eid,
            request.pid,
            request.hostname,
            (
                info["ip"]
                if info.get("transport") == "ipc"
                else engine.url(info["shell_port"]).rsplit(":", 1)[0]
            ),
        )
        self._send_kernel_info(engine)
        return reply

    def adopt(
        self, eid: int, connection_info: dict[str, Any], pid: int, pid_started: str | None
    ) -> Engine | None:
        """Take over engine ``eid`` (process ``pid``, checked to be it) that outlived the
        controller this one replaces; it becomes ready (or fails) asynchronously, like a
        new one (None: no sockets to it could be opened). New engines get ids above the
        highest adopted."""
        engine = Engine(
            eid,
            dict(connection_info),
            log_path=str(self.folder / f"engine-{eid}.log"),
            pid=pid,
            hostname=socket.gethostname(),  # (checked to run here, by its pid)
            adopted=True,
            pid_started=pid_started,
        )
        try:
            engine.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            engine.pidfd = None
        self._next_id = max(self._next_id, eid + 1)
        why = self._connect(engine)
        if why is not None:
            self._close_pidfd(engine)
            log.error("engine %i (pid %i) not adopted: %s", eid, pid, why)
            return None
        self.engines[eid] = engine
        self._send_kernel_info(engine)
        setup = protocol.EngineSetup(eid, self.cluster_id, os.getpid())
        self.wire.send(engine.sockets["control"], protocol.ENGINE_ADOPT_REQUEST, setup.to_content())
        return engine

    def skip_ids(self, ids: list[int]) -> None:
        """Ids used before (by a controller this one replaces): new engines get others."""
        self._next_id = max([self._next_id, *(i + 1 for i in ids)])

    def _connect(self, engine: Engine) -> str | None:
        """Open the sockets to ``engine``'s channels (its lane's come with its kernel
        info); None, or why they could not all be opened (then none is left open)."""
        full = _no_room(len(self.engines))
        if full is not None:
            return f"the controller cannot take engine {engine.id}: {full}"
        try:
            self._open_sockets(engine)
        except (zmq.ZMQError, OSError) as exc:
            self._close(engine)
            return f"the controller cannot open sockets to engine {engine.id}: {_why(exc)}"
        return None

    def _open_sockets(self, engine: Engine) -> None:
        info = engine.connection_info
        for channel in ("shell", "control"):
            sock = self._socket(engine, zmq.DEALER)
            sock.linger = 0
            sock.connect(engine.url(info[f"{channel}_port"]))
            engine.sockets[channel] = sock
            self.loop.add_socket(sock, self._handler(engine, channel))
        iopub = self._socket(engine, zmq.SUB)
        iopub.linger = 0
        iopub.rcvhwm = IOPUB_HWM
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        iopub.connect(engine.url(info["iopub_port"]))
        engine.sockets["iopub"] = iopub
        self.loop.add_socket(iopub, lambda frames: self._iopub(engine, frames))
        hb = self._socket(engine, zmq.DEALER)
        hb.linger = 0
        hb.maxmsgsize = protocol.HEARTBEAT_MAX_BYTES
        hb.connect(engine.url(info["hb_port"]))
        engine.sockets["hb"] = hb
        self.loop.add_socket(hb, lambda frames: self._beat_received(engine, frames))

    def _socket(self, engine: Engine, kind: int) -> zmq.Socket[Any]:
        """A socket to an engine: a CurveZMQ client when the engine's channels encrypt
        (with the engine's own keypair, as Jupyter clients of a kernel do)."""
        sock = self.context.socket(kind)
        # a starting engine binds a little after we connect: retry within 10 ms rather
        # than zmq's 100, backing off to 1 s for an engine that is gone
        sock.reconnect_ivl = 10
        sock.reconnect_ivl_max = 1000
        info = engine.connection_info
        if info.get("curve_publickey"):
            public = info["curve_publickey"].encode()
            wire.curve_client(sock, public, (public, info["curve_secretkey"].encode()))
        return sock

    def _handler(self, engine: Engine, channel: str) -> Callable[[list[Any]], None]:
        def handle(frames: list[Any]) -> None:
            if frames and len(frames[0]) == len(wire.DELIM) and frames[0].bytes == wire.DELIM:
                self._own_reply(engine, frames)
            else:
                self.on_message(engine, channel, frames)

        return handle

    def _iopub(self, engine: Engine, frames: list[Any]) -> None:
        if not engine.iopub_seen:
            engine.iopub_seen = True
            if engine.state == "awaiting iopub":
                self._ready(engine)
        self.on_iopub(engine, frames)

    def _ready(self, engine: Engine) -> None:
        engine.state = "ready"
        engine.missed = 0
        engine.pong = engine.ping
        log.info("engine %i ready (pid %s)", engine.id, engine.pid)
        self.on_ready(engine)

    def _send_kernel_info(self, engine: Engine) -> None:
        engine.info_sent_at = time.monotonic()
        self.wire.send(engine.sockets["shell"], "kernel_info_request")

    def _own_reply(self, engine: Engine, frames: list[Any]) -> None:
        """Replies to the controller's own requests: the steps of becoming ready."""
        msg = self.wire.recv(frames)
        if msg.msg_type == protocol.ENGINE_STATUS_REPLY:
            if engine.state == "ready":
                self.on_report(engine, msg.content)
        elif msg.msg_type in (protocol.ENGINE_SIGNAL_REPLY, protocol.ENGINE_INTERRUPT_REPLY):
            if msg.content.get("status") != "ok":
                why = str(msg.content.get("evalue", "no reason given"))[:200]
                log.warning("engine %i refused a signal: %s", engine.id, why)
        elif msg.msg_type == protocol.ENGINE_ADOPT_REPLY and engine.adopted:
            if msg.content.get("status") != "ok" and engine.state != "dead":
                why = str(msg.content.get("evalue", "no reason given"))[:200]
                # not ours to stop: another controller has it, or it is leaving anyway
                self._fail(engine, f"refused to be adopted: {why}", release=True)
        elif msg.msg_type == "kernel_info_reply" and engine.state == "starting":
            px = msg.content.get("engine")
            if not isinstance(px, dict) or not isinstance(px.get("lane_port"), int):
                self._fail(engine, "is not a jupyter-px engine kernel (no task lane)")
                return
            pid = px.get("pid")
            session = str(msg.header.get("session", ""))
            if engine.registered and (pid != engine.pid or session != engine.uuid):
                why = (
                    f"is not the process that registered: its kernel says pid {pid}, "
                    f"session {session[:40]}"
                )
                self._fail(engine, why, release=True)
                return
            engine.verified = True
            engine.state = "connecting"
            engine.uuid = session
            if not engine.by_pid:
                engine.pid = pid if isinstance(pid, int) else None
                local = protocol.on_this_host(engine.connection_info)
                if engine.pid is not None and local:
                    engine.pid_started = processes.start_time(engine.pid)
            engine.hostname = str(px.get("hostname", ""))
            engine.connection_info["lane_port"] = px["lane_port"]
            if px.get("lane_auth") == wire.LANE_AUTH:
                engine.connection_info["lane_auth"] = wire.LANE_AUTH
            else:
                engine.connection_info.pop("lane_auth", None)
            try:
                lane = self._socket(engine, zmq.DEALER)
                lane.linger = 0
                info = engine.connection_info
                if info.get("lane_auth") and not info.get("curve_publickey"):
                    wire.lane_client(lane, self.wire.key, px["lane_port"], session)
                engine.sockets["lane"] = lane
                lane.connect(engine.url(px["lane_port"]))
                self.loop.add_socket(lane, self._handler(engine, "lane"))
            except (zmq.ZMQError, OSError) as exc:
                self._fail(engine, f"got no socket to its lane: {_why(exc)}")
                return
            # (a pid means nothing to an engine on another host: it watches none)
            pid_here = os.getpid() if engine.local else None
            setup = protocol.EngineSetup(engine.id, self.cluster_id, pid_here)
            self.wire.send(lane, protocol.ENGINE_SETUP_REQUEST, setup.to_content())
        elif msg.msg_type == protocol.ENGINE_SETUP_REPLY and engine.state == "connecting":
            if msg.content.get("status") != "ok":
                why = str(msg.content.get("evalue", "no reason given"))[:200]
                self._fail(
                    engine,
                    f"refused to be set up by this controller: {why}",
                    release=engine.by_pid,
                )
                return
            # Ready only once its iopub reaches us too: a subscription takes effect a little
            # after connecting, and output published before that would be lost.
            if engine.iopub_seen:
                self._ready(engine)
            else:
                engine.state = "awaiting iopub"
                self._send_kernel_info(engine)
                self._nudge(engine, 0.02)

    def exit_code(self, engine: Engine) -> int | None:
        """The engine's exit code if its process ended, else None (an adopted engine's
        exit code is not ours to know: see :meth:`running`)."""
        km = engine.km
        if km is None:
            return None
        process = getattr(km.provisioner, "process", None)
        if process is not None:
            code: int | None = process.poll()
            return code
        return None if km.is_alive() else -1

    def running(self, engine: Engine) -> bool:
        """Whether the engine's process runs (for engines whose process we can see)."""
        if not engine.by_pid:
            return engine.km is not None and self.exit_code(engine) is None
        if not engine.local:  # (registered from another host: its heartbeats tell)
            return True
        if engine.pidfd is not None:  # readable once the process has exited
            return not processes.readable([engine.pidfd], 0)
        pid = engine.pid
        if pid is None or not processes.running(pid):
            return False
        return engine.pid_started is None or processes.start_time(pid) == engine.pid_started

    def _nudge(self, engine: Engine, delay: float) -> None:
        """Ask an engine awaiting its iopub for its info again after ``delay`` s, twice as
        long each time up to the watch's interval (its status messages then reach us as
        soon as the subscription holds, rather than at the next watch)."""

        def again() -> None:
            if engine.state == "awaiting iopub" and self.engines.get(engine.id) is engine:
                self._send_kernel_info(engine)
                if delay < self.poll_interval:
                    self._nudge(engine, delay * 2)

        self.loop.call_later(delay, again)

    def _watch(self) -> None:
        now = time.monotonic()
        for engine in list(self.engines.values()):
            code = self.exit_code(engine)
            if code is not None:
                kills = oom_kills() if code == -signal.SIGKILL else self._oom_kills
                self._fail(engine, describe_exit(code, kills > self._oom_kills))
                self._oom_kills = kills
            elif engine.by_pid and not self.running(engine):
                kind = "an adopted" if engine.adopted else "a registered"
                self._fail(engine, f"exited ({kind} engine: its log may say how)")
            elif engine.state != "ready":
                # (an adopted engine is set up once the task it runs ends: no time limit)
                if not engine.adopted and now - engine.started_at > self.start_timeout:
                    self._fail(engine, f"did not become ready within {self.start_timeout:.0f} s")
                elif engine.state == "starting" and now - engine.info_sent_at > 2.0:
                    self._send_kernel_info(engine)
                elif engine.state == "awaiting iopub" and now - engine.info_sent_at > 0.1:
                    self._send_kernel_info(engine)  # its status messages go out on iopub

    def _beat(self) -> None:
        """Every interval: count the last ping if it went unanswered, then ping again."""
        for engine in list(self.engines.values()):
            if engine.state != "ready":
                continue
            engine.missed = 0 if engine.pong == engine.ping else engine.missed + 1
            if engine.missed >= self.max_missed:
                span = engine.missed * self.heartbeat_interval
                self._fail(engine, f"missed {engine.missed} heartbeats in a row ({span:.0f} s)")
                continue
            engine.ping += 1
            try:
                engine.sockets["hb"].send_multipart([b"", b"%d" % engine.ping], zmq.NOBLOCK)
            except zmq.Again:
                pass

    @staticmethod
    def _beat_received(engine: Engine, frames: list[Any]) -> None:
        """The echo of a ping: only the latest ping's echo answers it."""
        if len(frames) == 2 and frames[1].bytes == b"%d" % engine.ping:
            engine.pong = engine.ping

    def send(self, eid: int, channel: str, frames: list[Any]) -> bool:
        """Send frames on ``channel`` of a ready engine; False if it has no such socket."""
        engine = self.engines.get(eid)
        sock = engine.sockets.get(channel) if engine is not None else None
        if sock is None:
            return False
        wire.send_frames(sock, frames)
        return True

    def ready(self, eid: int | None) -> Engine | None:
        """The engine ``eid`` if it is ready, else None."""
        engine = self.engines.get(eid) if eid is not None else None
        return engine if engine is not None and engine.state == "ready" else None

    def _fail(self, engine: Engine, why: str, release: bool = False) -> None:
        """Forget a dead (or hopeless) engine and tell the controller how it died;
        ``release``: an adopted engine that is not ours after all, left alone."""
        if engine.state == "dead":
            return
        was_ready = engine.state == "ready"
        engine.state = "dead"
        what = f"engine {engine.id}" + (f" (pid {engine.pid})" if engine.pid else "")
        reason = f"{what} {why}"
        if not was_ready:
            tail = engine.log_tail()
            if tail:
                reason += f"\n--- engine {engine.id} output ---\n{tail}"
        log.warning("%s", reason.splitlines()[0])
        self._close(engine)
        if release:
            self._close_pidfd(engine)
        else:
            self._cleanup(engine, kill=True)
        self.engines.pop(engine.id, None)
        self.on_dead(engine, reason)

    def _close(self, engine: Engine) -> None:
        for sock in engine.sockets.values():
            self.loop.remove_socket(sock)
            sock.close(linger=0)
        engine.sockets.clear()

    def _cleanup(self, engine: Engine, kill: bool) -> None:
        if engine.by_pid:
            if kill:
                self._signal_adopted(engine, signal.SIGKILL)
            self._close_pidfd(engine)
            # (a kernel manager removes its kernel's connection file; this one is ours)
            (self.folder / f"engine-{engine.id}.json").unlink(missing_ok=True)
            self._remove_sockets(engine)
            return
        km = engine.km
        if km is None:
            return
        try:
            if kill:
                km.shutdown_kernel(now=True)
            else:
                km.cleanup_resources()
        except Exception:
            log.exception("cleaning up engine %i", engine.id)
        self._remove_sockets(engine)

    def _unusable_sockets(self, info: dict[str, Any], here: bool, pid: int) -> str | None:
        """Why a registering engine's unix sockets (``ipc``) will not do (None: they will,
        or it listens on TCP): they must be on this host, in this cluster's folder (whose
        mode keeps other users out, and where the controller removes them when the engine
        is gone) under the name its pid gives (``r<pid>``: never another engine's), and
        visible from here."""
        if info.get("transport") != "ipc":
            return None
        prefix = Path(info["ip"])
        if not here:
            return "it listens on unix sockets, but runs on another host"
        if prefix.name != f"r{pid}":
            return f"its unix sockets {prefix}-* are not named after its pid (r{pid}-*)"
        try:
            inside = prefix.parent.resolve() == self.folder.resolve()
            visible = Path(f"{prefix}-{info['shell_port']}").is_socket()
        except OSError:
            inside = visible = False
        if not inside:
            return f"its unix sockets {prefix}-* are not in the cluster's folder {self.folder}"
        if not visible:
            return (
                f"its unix sockets {prefix}-* are not visible to the controller (another "
                "filesystem?): start it with --ip 127.0.0.1 to listen on TCP"
            )
        return None

    def _remove_sockets(self, engine: Engine) -> None:
        """Remove the unix socket files of an engine that is gone or going, in this
        cluster's folder (its kernel manager removes only the kernel's own, and an adopted
        or killed engine none)."""
        clusters.remove_engine_sockets(self.folder, engine.connection_info)

    @staticmethod
    def _close_pidfd(engine: Engine) -> None:
        if engine.pidfd is not None:
            os.close(engine.pidfd)
            engine.pidfd = None

    def _signal_adopted(self, engine: Engine, signum: int) -> None:
        """Signal an adopted engine's process group (as a kernel manager does: the engine
        leads its own session), else its process; nothing if it is gone."""
        pid = engine.pid
        if engine.registered and not engine.verified:
            return  # (a pid only claimed: perhaps not the engine's)
        if pid is None or not engine.local or not self.running(engine):
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)
            elif engine.pidfd is not None:
                signal.pidfd_send_signal(engine.pidfd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def signal_problem(self, eid: int, signum: int) -> str | None:
        """Why :meth:`signal` cannot send ``signum`` to engine ``eid`` (None: it can)."""
        engine = self.engines[eid]
        if engine.by_pid:
            if engine.local or signum == signal.SIGINT:
                return None
            try:
                protocol.check_engine_signal("signal", signum)
            except ValueError as exc:
                return f"engine {eid} runs on {engine.hostname or 'another host'}: {exc}"
            return None
        return None if engine.km is not None else f"engine {eid} was not started by this controller"

    def interrupt(self, eid: int, msg_ids: tuple[str, ...]) -> bool:
        """Interrupt these requests on engine ``eid`` (see
        :data:`protocol.ENGINE_INTERRUPT_REQUEST`: unlike a bare SIGINT, one that has not
        started yet is not missed); False if it has no control channel to ask on."""
        engine = self.engines[eid]
        control = engine.sockets.get("control")
        if control is None or engine.state != "ready":
            return False
        self.wire.send(control, protocol.ENGINE_INTERRUPT_REQUEST, {"msg_ids": list(msg_ids)})
        return True

    def signal(self, eid: int, signum: int) -> None:
        """Send a signal to an engine's process (SIGINT through its kernel manager). An
        engine on another host signals itself, asked on its control channel (SIGINT as
        Jupyter's ``interrupt_request``, others as :data:`protocol.ENGINE_SIGNAL_REQUEST`,
        only those of :data:`protocol.ENGINE_SIGNALS`)."""
        why = self.signal_problem(eid, signum)
        if why is not None:
            raise ValueError(why)
        engine = self.engines[eid]
        if engine.by_pid:
            if not engine.local:
                control = engine.sockets.get("control")
                if control is None:
                    return  # (not connected yet: nothing of it runs a task)
                if signum == signal.SIGINT:
                    self.wire.send(control, "interrupt_request", {})
                else:
                    content = {"signum": signum}
                    self.wire.send(control, protocol.ENGINE_SIGNAL_REQUEST, content)
                return
            self._signal_adopted(engine, signum)
            return
        assert engine.km is not None
        if signum == signal.SIGINT:
            engine.km.interrupt_kernel()
        else:
            engine.km.signal_kernel(signum)

    def stop(self, eids: list[int] | None = None, grace: float = 3.0) -> list[Engine]:
        """Stop engines: shutdown_request first, then kill what is left after ``grace`` s."""
        chosen = [self.engines[e] for e in (eids if eids is not None else list(self.engines))]
        for engine in chosen:
            engine.state = "stopping"
            sock = engine.sockets.get("control")
            if sock is not None:
                self.wire.send(sock, "shutdown_request", {"restart": False})
        deadline = time.monotonic() + grace
        waiting = [e for e in chosen if e.km is not None or (e.by_pid and e.local)]
        while waiting and time.monotonic() < deadline:
            waiting = [e for e in waiting if self.running(e)]
            if waiting:
                time.sleep(0.02)
        for engine in chosen:
            self._close(engine)
            self._cleanup(engine, kill=engine in waiting)
            engine.state = "dead"
            self.engines.pop(engine.id, None)
        return chosen
