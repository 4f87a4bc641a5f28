"""The controller process: owns the engines and multiplexes clients onto them.

Sockets: a ROUTER for clients' requests (``client_port``), a PUB relaying every engine's
iopub, tagged ``engine.<id>``, plus the controller's own events (``iopub_port``), and an
echo for clients' heartbeats on a thread of its own (``hb_port``, see :mod:`.heartbeat`).
The iopub socket is an XPUB: subscriptions to the status topic reach the
:class:`~.monitor.Monitor`, which publishes the cluster's status only while there are some.

Every message from a client passes the edge (:meth:`Controller.from_client`) before any
component sees it: framing, signature, header, a msg_id not seen before (a replay or a
duplicate gets an error reply and never disturbs the original), a known route, a request
its route serves. A frontend's comm message for an engine (``comm_msg``, ``comm_close`` on
a ``shell`` route) is checked there whole, by size and type, and forwarded without a
record, since no reply will come. Then the components take it, each owning one piece of
state and given only what it uses:

- :class:`~.router.Router`: requests to one engine, every engine reply, direct notices;
- :class:`~.broadcast.Broadcasts`: one request for many engines, checked and fanned out
  as routed requests;
- :class:`~.fanin.FanIn`: the replies to a broadcast's parts, sent back together;
- :class:`~.balancer.Balancer`: load-balanced tasks, around the pure scheduler;
- :class:`~.requests.HubRequests`: the requests the controller answers itself;
- :class:`~.inflight.Inflight`: what is on which engine, unanswered;
- :class:`~.hub.Hub`: the task records;
- :class:`~.engines.EngineSet`: the engines, their sockets and liveness;
- :class:`~.clients.Clients`: which clients are still there.

The controller parses headers (and reply parent headers) only and never unpickles user
data. It relays messages as their senders signed them, except the task replies it gathers
for one client, which it merges into messages of its own and signs
(:mod:`kernel_engine.replies`).

Restart (``restore=True``, ``--restore``): a controller started again on the folder of one
that died serves the same cluster, with its key, ports and task records, and adopts its
engines (see :mod:`.restore`, whose :class:`~.restore.Restorer` is one more component).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from kernel_engine import clusters, protocol, wire
from kernel_engine.errors import LaunchError
from kernel_engine.launchers.state import Report
from kernel_engine.wire import DropLog, Message

from .balancer import Balancer
from .broadcast import Broadcasts
from .clients import Clients
from .comms import CommPosts
from .engines import Engine, EngineSet
from .fanin import FanIn
from .heartbeat import Echo, bind
from .hub import Hub, open_log
from .inflight import Inflight
from .intake import BatchIntake
from .launching import Launches
from .loop import PollLoop
from .monitor import Monitor
from .outbox import PIPE_MESSAGES, Outbox
from .reads import Deferred, FileReads, Reply
from .requests import HubRequests
from .restore import Restorer, keypair, port, previous_connection, save_keypair
from .router import Router

log = logging.getLogger("kernel_engine.controller")

IOPUB_HWM = 2000
"""Messages the iopub socket holds for one slow subscriber before dropping its share (a
stalled subscriber must not grow the controller without bound). A client's IO thread
reads as messages come, far from this."""

PEER_HWM = 10_000
"""Messages from one peer the controller buffers unread before that peer must wait."""

CLIENT_POLICIES = ("finish", "abort")

TRIM_EVERY = 10
"""Seconds between giving freed heap memory back to the system (see :func:`_trim_heap`)."""

WRITE_SPACING = 10
"""After writing ``cluster.json`` took ``t`` s, the next write waits until this many
times ``t`` has passed (see :meth:`Controller._write_cluster_json`)."""

ADOPT_WAIT = 5.0
"""Seconds a restarted controller waits for the engines it adopts before it reports ready
(an engine busy with a task is set up when the task ends, and registers then)."""


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def max_sockets() -> int:
    """How many zmq sockets this process may open, once its soft limit on open files is
    raised to the hard one.

    The controller holds five sockets per engine (shell, control, iopub, heartbeat,
    lane), each taking two descriptors (its connection and its mailbox). zmq's default
    cap of 1023 sockets per context stopped registrations at about 200 engines (the
    sockets of the 205th failed with "Too many open files"); a soft limit of 1024 files,
    common elsewhere, stops them at about 100.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(1023, soft // 2)  # (1023: zmq's default)


def _trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc only; elsewhere nothing).

    A burst of queued tasks leaves many small freed blocks (zmq messages) behind; glibc
    keeps them, so the controller's RSS would stay at the burst's peak. Measured on a
    200,000-task run: about 135 MiB given back, in a few milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Controller:
    """One cluster's controller.

    Parameters
    ----------
    folder
        The cluster folder: connection file, engine logs and connection files.
    ip
        The interface clients and engines use (127.0.0.1 unless asked otherwise).
    cluster_id
        The cluster's name.
    parent_pid
        Stop when this process (the launching notebook or script) is gone.
    cwd
        The engines' working directory.
    client_timeout
        Seconds of silence after which a client counts as gone.
    on_client_lost
        What happens to a lost client's tasks already on engines: ``"finish"`` (they run;
        its queued tasks are dropped either way) or ``"abort"`` (those not started yet are
        aborted on the engines too).
    curve
        Encrypt everything with CurveZMQ (clients and engines; a peer that does not hold
        the connection file cannot even connect). None: whenever ``ip`` is not loopback.
    db, db_max_bytes, db_max_age
        The task store and its retention (see :func:`.hub.open_log`).
    engine_grace
        Seconds the engines this controller starts outlive it, should it die (None: this
        process's :data:`~kernel_engine.clusters.ENGINE_GRACE_ENV`, else the default).
    restore
        Serve the cluster of a controller that died in ``folder`` (see the module
        docstring); ``ip``, ``curve`` and ``cluster_id`` are then the folder's.
    engines, engine_options
        The launcher that starts engines (``"local"``, ``"mpi"``, ``"slurm"`` or
        ``"module:Class"``, see :mod:`.launching`) and its options.
    min_engines
        Report the start once this many engines are ready (None: all of them).
    start_timeout
        Seconds within which the start must be ready, else it fails quoting the
        launchers' output (None: no deadline here).

    Raises
    ------
    ClusterError
        When restoring while the folder's controller still runs, or a port is taken.
    """

    def __init__(
        self,
        folder: Path,
        ip: str = "127.0.0.1",
        cluster_id: str = "",
        parent_pid: int | None = None,
        cwd: str | None = None,
        client_timeout: float = 30.0,
        on_client_lost: str = "finish",
        curve: bool | None = None,
        db: str = "sqlite",
        db_max_bytes: int | None = None,
        db_max_age: float | None = None,
        engine_grace: float | None = None,
        restore: bool = False,
        engines: str = "local",
        engine_options: dict[str, Any] | None = None,
        min_engines: int | None = None,
        start_timeout: float | None = None,
    ):
        if on_client_lost not in CLIENT_POLICIES:
            raise ValueError(f"on_client_lost must be one of {CLIENT_POLICIES}")
        previous = previous_connection(folder) if restore else {}
        if previous:
            ip = str(previous.get("ip") or ip)
            cluster_id = str(previous.get("cluster_id") or cluster_id)
            curve = bool(previous.get("curve_serverkey"))
        self.folder = folder
        self.ip = ip
        self.cluster_id = cluster_id or folder.name
        self.parent_pid = parent_pid
        self.cwd = cwd
        self.on_client_lost = on_client_lost
        self.curve = protocol.curve_wanted(ip, curve)
        self.keypair = keypair(folder, previous) if self.curve else None
        grace = clusters.engine_grace() if engine_grace is None else engine_grace
        self.options: dict[str, Any] = {
            "db": db,
            "db_max_bytes": db_max_bytes,
            "db_max_age": db_max_age,
            "client_timeout": client_timeout,
            "on_client_lost": on_client_lost,
            "cwd": cwd,
            "engine_grace": grace,
        }
        """What a restarted controller serves the cluster with (in ``cluster.json``)."""
        self.record = clusters.controller_record()
        # cluster.json: when the next write may be, and whether one waits for then
        self._cluster_json_next = 0.0
        self._cluster_json_due = False
        self.loop = PollLoop()
        self.context: zmq.Context[Any] = self.loop.context()
        self.context.set(zmq.MAX_SOCKETS, max_sockets())
        # No high-water marks on the sockets that carry requests and replies: a busy engine
        # or a slow client must never block this loop (a DEALER blocks at its mark) nor
        # lose replies (a ROUTER drops at its mark). What a peer can pile up there is the
        # work it asked for; a lost client's queued work is dropped (see _client_lost).
        self.context.sndhwm = 0
        self.context.rcvhwm = 0
        key = str(previous["key"]).encode() if previous.get("key") else wire.new_key()
        self.wire = wire.Wire(key, username="controller")
        self.drops = DropLog(log, "controller")
        self.seen = wire.SeenWindow()
        self.hub = Hub(
            log=open_log(folder, db, db_max_bytes, db_max_age),
            engine_uuid=self._engine_uuid,
            sign=self.wire.sign,
        )
        self.inflight = Inflight()
        self.clients = Clients(timeout=max(1, round(client_timeout)))
        self.dead: dict[int, str] = {}
        self.clients_socket = self._server_socket(zmq.ROUTER)
        self.clients_socket.linger = 0
        # what one peer has sent and we have not read waits in its own process, not here
        # (a flood pushes back on the flooder; a client queues in its own memory)
        self.clients_socket.rcvhwm = PEER_HWM
        # what a client does not read: a bounded share here, the rest in the outbox, which
        # drops it past a bound, naming the client (see .outbox); mandatory, so a send past
        # the share fails at once rather than blocking or dropping without a word
        self.clients_socket.sndhwm = PIPE_MESSAGES
        self.clients_socket.router_mandatory = 1
        self.iopub = self._server_socket(zmq.XPUB)
        self.iopub.setsockopt(zmq.XPUB_VERBOSE, 1)  # (each subscriber to status gets one now)
        self.iopub.linger = 0
        self.iopub.sndhwm = IOPUB_HWM
        echo = self._server_socket(zmq.ROUTER)
        try:
            self.client_port = bind(self.clients_socket, ip, port(previous, "client"), "client")
            self.iopub_port = bind(self.iopub, ip, port(previous, "iopub"), "iopub")
            self.echo = Echo(echo, ip, port(previous, "hb"))
        except BaseException:
            for sock in (self.clients_socket, self.iopub, echo):
                sock.close(linger=0)
            self.hub.close()
            self.context.term()
            self.loop.close()
            raise
        self.echo.start()
        self.outbox = Outbox(self.clients_socket, self.drops, self.wire)
        self.fanin = FanIn(self.outbox.send, self.loop.call_later)
        self.engines = EngineSet(
            self.loop,
            self.context,
            self.wire,
            folder,
            ip,
            self.cluster_id,
            self.curve,
            grace,
        )
        self.balancer = Balancer(self.wire, self.engines, self.inflight, self.hub, self.send_client)
        self.router = Router(
            self.wire,
            self.engines,
            self.inflight,
            self.hub,
            self.balancer,
            self.send_client,
            self.dead,
            self.drops,
            send_reply=self.fanin.reply,
        )
        self.broadcasts = Broadcasts(
            self.wire,
            self.router.forward,
            self.seen,
            lambda m: self.hub.known(m) or m in self.inflight,
            self.send_client,
            self.drops,
            expect=self.fanin.expect,
        )
        self.intake = BatchIntake(
            self.wire,
            self.seen,
            lambda m: self.hub.known(m) or m in self.inflight,
            self.send_client,
            self.drops,
        )
        self.requests = HubRequests(
            self.cluster_id, self.engines, self.inflight, self.hub, self.balancer, self.dead, self
        )
        self.reads = FileReads(self.loop, self.context)
        self.comms = CommPosts()
        self.launches = Launches(
            self.loop,
            self.engines,
            folder,
            cwd,
            engines,
            engine_options,
            self._engine_env,
            min_engines,
            start_timeout,
            self._startup_done,
        )
        self.restorer = Restorer(
            folder, self.wire, self.engines, self.hub, self.balancer.outcome, self.loop.call_later
        )
        self.router.adopting = self.restorer.adopting
        self._ticks = 0
        self._startup_reported = False
        self.exit_code = 0
        self.engines.on_ready = self._engine_ready
        self.engines.on_dead = self._engine_dead
        self.engines.on_message = self.router.from_engine
        self.engines.on_iopub = self._relay_iopub
        self.monitor = Monitor(
            self.loop,
            self.wire,
            self._publish_status,
            self.engines,
            self.inflight,
            self.hub,
            lambda: int(self.balancer.queue_status().get("unassigned", 0)),
            self.dead,
            self.cluster_id,
        )
        self.hub.on_task = self.monitor.on_task
        self.engines.on_report = self.monitor.on_report
        self.loop.add_socket(self.iopub, self.monitor.subscription)
        self.loop.add_socket(self.clients_socket, self.from_client)
        self.loop.after_events.append(self.balancer.schedule)
        self.loop.before_poll.append(self.outbox.flush)
        self.loop.call_every(0.05, self.balancer.tick)
        self.loop.call_every(1.0, self._tick)
        if parent_pid:
            self.loop.call_every(0.5, self._check_parent)
        if restore:
            self.restorer.start()
            if self.restorer.adopting:
                self.loop.call_later(ADOPT_WAIT, lambda: self._report_if_ready(waited=True))

    def _server_socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self.context.socket(kind)
        if self.keypair is not None:
            wire.curve_server(sock, *self.keypair)
        return sock

    # ----- files

    @property
    def connection_file(self) -> Path:
        return self.folder / clusters.CLIENT_FILE

    def connection_info(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "ip": self.ip,
            "transport": "tcp",
            "client_port": self.client_port,
            "iopub_port": self.iopub_port,
            "hb_port": self.echo.port,
            "key": self.wire.key.decode(),
            "signature_scheme": wire.SIGNATURE_SCHEME,
            **({"curve_serverkey": self.keypair[0].decode()} if self.keypair else {}),
            "folder": str(self.folder),
            **self.record,
        }

    def write_files(self) -> None:
        """Write the client connection file (mode 0600) and the cluster description (and,
        for an encrypted cluster, the controller's secret key, for a restarted one)."""
        clusters.make_private_folder(self.folder)
        if self.keypair is not None:
            save_keypair(self.folder, self.keypair)
        clusters.write_private_json(self.connection_file, self.connection_info())
        self._write_cluster_json()

    def _write_cluster_json(self) -> None:
        """Write ``cluster.json`` now, or as soon as its writes are spaced enough.

        A write is O(engines) (about 0.1 s for 1,000 engines, 6 ms for 10), and one
        follows every registration, ready engine and death: 1,000 engines registering
        together cost O(N^2), and registrations queued behind the writes until engines
        timed out. So after a write that took ``t`` s, the next waits until
        ``WRITE_SPACING * t`` have passed, a second at most (changes meanwhile are
        written then, once): a tenth of the loop's time or less, and next to no wait for
        a few engines. The start's report and :meth:`close` write what is pending first.
        """
        now = time.monotonic()
        if now >= self._cluster_json_next:
            self._flush_cluster_json(force=True)
        elif not self._cluster_json_due:
            self._cluster_json_due = True
            self.loop.call_later(self._cluster_json_next - now, self._flush_cluster_json)

    def _flush_cluster_json(self, force: bool = False) -> None:
        if not (force or self._cluster_json_due):
            return
        started = time.monotonic()
        info = {
            "cluster_id": self.cluster_id,
            "connection_file": str(self.connection_file),
            "engines": {str(e.id): e.record() for e in self.engines.engines.values()},
            "ready": self.engines.ready_ids(),
            "updated": time.time(),
            "options": self.options,
            **self.record,
        }
        clusters.write_private_json(self.folder / clusters.CLUSTER_FILE, info)
        self._cluster_json_due = False
        done = time.monotonic()
        self._cluster_json_next = done + min(WRITE_SPACING * (done - started), 1.0)

    # ----- the edge: every client message

    def send_client(self, frames: list[Any]) -> None:
        """Send ``[client, route, DELIM, ...]`` to a client, in this loop turn (see
        :mod:`.outbox`)."""
        self.outbox.send(frames)

    def from_client(self, frames: list[Any]) -> None:
        """A client's message: ``[client, route, DELIM, signature, header, ...]`` (or a
        batch of load-balanced tasks, see :mod:`.intake`)."""
        if wire.is_batch(frames, 2):
            self._from_client_batch(frames)
            return
        if len(frames) < 8 or wire.delimiter_at(frames) != 2:
            self.drops.drop("malformed client message")
            return
        try:
            msg = self.wire.unpack(frames[3:])
        except wire.MessageError as exc:
            self.drops.drop(str(exc))
            return
        client = protocol.reply_identity(frames[0].bytes)
        self.clients.seen(client)
        if not self.seen.add(msg.msg_id):
            self._duplicate(client, msg)
            return
        try:
            channel, eid = protocol.parse_route(frames[1].bytes)
        except ValueError as exc:
            reply = protocol.fail_reply(self.wire, client, msg.header, None, "ValueError", str(exc))
            self.send_client(reply)
            return
        if channel == "hub":
            if msg.msg_type == protocol.REGISTER_REQUEST:
                self._register(client, msg)
            elif msg.msg_type in protocol.NOTICES:
                self._notice(client, msg)
            else:
                self._hub_request(client, msg)
            return
        if channel == "shell" and eid is not None and msg.msg_type in protocol.COMM_MESSAGES:
            self._comm_message(client, eid, msg, frames[3:])
            return
        if msg.msg_type not in protocol.SERVED[channel]:
            why = f"{channel} does not serve {msg.msg_type[:60]!r} (nobody would answer it)"
            self.send_client(
                protocol.fail_reply(self.wire, client, msg.header, eid, "ValueError", why)
            )
        elif self.hub.known(msg.msg_id) or msg.msg_id in self.inflight:
            self._duplicate(client, msg)
        elif channel == "broadcast":
            self.broadcasts.submit(client, msg, frames[3:])
        elif eid is None:
            self.balancer.submit(client, msg, frames[3:])
        else:
            self.router.forward(client, channel, eid, msg, frames[3:])

    def _from_client_batch(self, frames: list[Any]) -> None:
        """A batch of load-balanced tasks: each checked as at the edge, then submitted."""
        client, tasks = self.intake.take(frames)
        if tasks:
            self.clients.seen(client)
            self.balancer.submit_many(client, tasks)

    def _comm_message(self, client: bytes, eid: int, msg: Message, frames: list[Any]) -> None:
        """A frontend's message to a comm on engine ``eid`` (``frames``: signature onwards).

        No kernel answers it, so nothing waits for it and nothing is recorded: it is
        checked (size before parsing, then every part a kernel reads) and forwarded, or
        dropped without a reply; at most :data:`.comms.MAX_BYTES` of them wait for a busy
        engine (see :mod:`.comms`).
        """
        size = sum(len(f) for f in frames)
        try:
            protocol.check_comm_size(len(frames) - 5, size)
            protocol.CommMessage.from_content(msg.content)
            _ = msg.parent_header, msg.metadata  # JSON objects, or MessageError
        except (TypeError, ValueError) as exc:  # (wire.MessageError is a ValueError)
            self.drops.drop(f"invalid {msg.msg_type}: {str(exc)[:200]}")
            return
        if self.engines.ready(eid) is not None:
            refused = self.comms.admit(eid, msg.msg_id, size)
            if refused is not None:
                self.drops.drop(refused)
                return
        self.router.post(client, eid, frames)

    def _duplicate(self, client: bytes, msg: Message) -> None:
        self.drops.drop("a msg_id seen before (a replay or a duplicate)")
        why = f"msg_id {msg.msg_id} was seen before (a replay or a duplicate); ignored"
        self.send_client(
            protocol.fail_reply(self.wire, client, msg.header, None, protocol.DUPLICATE, why)
        )

    def _notice(self, client: bytes, msg: Message) -> None:
        if msg.msg_type == protocol.GOODBYE_NOTICE:
            if self.clients.goodbye(client):
                self._client_lost(client, "closed")
        elif msg.msg_type == protocol.DIRECT_NOTICE:
            try:
                self.router.direct_notice(client, msg)
            except (TypeError, ValueError) as exc:  # (wire.MessageError is a ValueError)
                who = protocol.client_uuid(client)
                self.drops.drop(f"invalid direct notice from client {who}: {str(exc)[:200]}")

    def _hub_request(self, client: bytes, msg: Message) -> None:
        """Answer a request the controller serves itself; one that reads the task file is
        finished off the loop (see :mod:`.reads`)."""
        answer: Any = None
        try:
            answer = self.requests.handle(msg, client)
        except Exception as exc:
            self._hub_reply(client, msg, None, exc)
            return
        if not isinstance(answer, Deferred):
            self._hub_reply(client, msg, answer, None)
            return

        finish, work, read = answer.finish, answer.work, answer.work
        if finish is None:  # the reply is work's: framed off the loop as well

            def packed() -> list[Any]:
                content, buffers = read()
                return self.wire.pack(
                    protocol.reply_type(msg.msg_type),
                    content,
                    msg.header,
                    buffers=buffers,
                    idents=[client, protocol.HUB_ROUTE],
                )[1]

            work = packed

        def then(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self._hub_reply(client, msg, None, error)
            elif finish is None:
                self.send_client(result)
            else:
                try:
                    reply = finish(result)
                except Exception as exc:
                    self._hub_reply(client, msg, None, exc)
                    return
                self._hub_reply(client, msg, reply, None)

        refused = self.reads.submit(work, then, owner=client)
        if refused is not None:
            self._hub_reply(client, msg, None, RuntimeError(refused))

    def _hub_reply(
        self, client: bytes, msg: Message, reply: Reply | None, error: BaseException | None
    ) -> None:
        content: dict[str, Any] | bytes
        buffers: list[Any] = []
        if reply is not None:
            content, buffers = reply
            if isinstance(content, dict):  # (bytes: JSON built off the loop, status in it)
                content.setdefault("status", "ok")
        else:
            assert error is not None
            if not isinstance(error, (TypeError, ValueError, KeyError)):
                self.loop._failed(f"controller request {msg.msg_type}", error)
            content = protocol.error_content(type(error).__name__, str(error))
        _, frames = self.wire.pack(
            protocol.reply_type(msg.msg_type),
            content,
            msg.header,
            buffers=buffers,
            idents=[client, protocol.HUB_ROUTE],
        )
        self.send_client(frames)  # (after what went to this client before)

    def _relay_iopub(self, engine: Engine, frames: list[Any]) -> None:
        """Re-publish an engine's iopub message, topic ``engine.<id>``; what tasks print
        goes to their records too (in memory, only what no reply carries: see
        :meth:`Hub.output`)."""
        self.iopub.send_multipart([b"engine.%d" % engine.id, *frames[1:]], copy=False)
        if self.comms.waiting(engine.id):
            self.comms.seen(engine.id, frames)
        self._record_output(engine, frames)

    def _record_output(self, engine: Engine, frames: list[Any]) -> None:
        """A ``stream`` message's text, into its task's record (others are skipped cheaply:
        only a header naming ``stream`` is parsed), unless the record names another
        engine (a registered engine's output is its own tasks', not another's)."""
        try:
            at = wire.delimiter_at(frames)
            if at < 0 or b'"stream"' not in wire.as_bytes(frames[at + 2]):
                return
            msg = self.wire.unpack(frames[at + 1 :])
            if msg.msg_type != "stream":
                return
            name = msg.content.get("name")
            text = msg.content.get("text")
            if name in ("stdout", "stderr") and isinstance(text, str):
                record = self.hub.get(msg.parent_id)
                if record is not None and record.engine_id not in (None, engine.id):
                    self.drops.drop(f"output from engine {engine.id} for another engine's task")
                    return
                self.hub.output(msg.parent_id, name, text)
        except (ValueError, IndexError):  # (wire.MessageError is a ValueError)
            return

    def resubmit(self, client: bytes, request: dict[str, Any], msg_id: str) -> None:
        """Submit a stored request again, load-balanced, as ``msg_id`` from ``client``."""
        header = dict(request["header"])
        header["msg_id"] = msg_id
        header["date"] = wire.utcnow_iso()
        _, frames = self.wire.pack(
            protocol.APPLY_REQUEST,
            request.get("content") or {},
            None,
            request.get("metadata") or {},
            request.get("buffers") or [],
            header=header,
        )
        msg = self.wire.unpack(frames[1:])
        self.balancer.submit(client, msg, frames[1:])

    def _engine_uuid(self, eid: int) -> str | None:
        engine = self.engines.engines.get(eid)
        return engine.uuid if engine is not None else None

    def client_reads(self, client: bytes, formats: tuple[str, ...]) -> None:
        """A client said which formats of replies it reads (at each connect)."""
        self.outbox.merge_for(protocol.reply_identity(client), protocol.MERGED_REPLIES in formats)

    def publish_event(self, msg_type: str, content: dict[str, Any]) -> None:
        self.wire.send(self.iopub, msg_type, content, idents=[protocol.EVENT_TOPIC])

    def _publish_status(self, content: dict[str, Any]) -> None:
        self.wire.send(self.iopub, protocol.CLUSTER_STATUS, content, idents=[protocol.STATUS_TOPIC])

    def status(self) -> dict[str, Any]:
        """The cluster's status now (what ``px_status_request`` answers)."""
        return self.monitor.snapshot()

    # ----- clients

    def _tick(self) -> None:
        for client in self.clients.tick():
            self._client_lost(client, f"was silent for {self.clients.timeout} s")
        self.drops.flush()
        self.loop.errors.flush()
        self._ticks += 1
        if self._ticks % TRIM_EVERY == 0:
            _trim_heap()

    def _client_lost(self, client: bytes, why: str) -> None:
        """A client is gone: its queued tasks fail; with the "abort" policy its tasks on
        engines that have not started are aborted there too.

        The requests it sent to lanes itself will never be reported finished (their
        replies went to it): their records end as ``unknown``, and tasks that depend on
        them fail instead of waiting for ever.
        """
        self.reads.drop(client)
        self.outbox.merge_for(protocol.reply_identity(client), False)
        self.outbox.forget(protocol.reply_identity(client))
        abort = self.on_client_lost == "abort"
        running = self.balancer.client_lost(client, abort)
        by_engine: dict[int, list[str]] = {}
        for eid, msg_id in running:
            by_engine.setdefault(eid, []).append(msg_id)
        for msg_id, pending in self.inflight.of_client(client):
            by_engine.setdefault(pending.engine_id, []).append(msg_id)
            if pending.kind == "direct":
                self.inflight.pop(msg_id, answered=False)
                self.hub.completed(msg_id, "unknown")
                self.balancer.outcome(msg_id, pending.engine_id, False)
        if abort:
            for eid, msg_ids in by_engine.items():
                self.tell_engines([eid], protocol.ENGINE_ABORT_REQUEST, {"msg_ids": msg_ids})
        log.info("client %s %s", protocol.client_uuid(client), why)

    # ----- engines

    def start_engines(self, n: int) -> list[int]:
        """Start ``n`` engines; returns their ids (they become ready asynchronously)."""
        return self.launches.start(n)

    def _engine_env(self) -> dict[str, str]:
        """What engines that register themselves need in their environment."""
        info = clusters.engine_connection(self.connection_info())
        return {
            clusters.CONNECTION_ENV: json.dumps(info),
            clusters.ENGINE_GRACE_ENV: str(self.options["engine_grace"]),
        }

    def _register(self, client: bytes, msg: Message) -> None:
        """An engine asks to join (see :mod:`.registration`): checked, then answered with
        its id (it is connected to and set up next) or why not."""
        self.clients.goodbye(client)  # (a registrant is no client: nothing to time out)
        try:
            request = protocol.RegisterRequest.from_content(msg.content)
            if self.curve and "curve_publickey" not in request.connection_info:
                raise ValueError("this cluster encrypts: an engine must give its CurveZMQ keys")
        except (TypeError, ValueError) as exc:
            self.drops.drop(f"invalid registration: {str(exc)[:200]}")
            content: dict[str, Any] = protocol.error_content(type(exc).__name__, str(exc))
        else:
            content = self.engines.register(request)
            if content.get("status") == "ok":
                self._write_cluster_json()
        _, frames = self.wire.pack(
            protocol.REGISTER_REPLY, content, msg.header, idents=[client, protocol.HUB_ROUTE]
        )
        self.send_client(frames)  # (never blocking the loop: see .outbox)

    def tell_engines(self, eids: list[int], msg_type: str, content: dict[str, Any]) -> None:
        """Send a message of the controller's own on the engines' control channels."""
        for eid in eids:
            engine = self.engines.engines.get(eid)
            sock = engine.sockets.get("control") if engine is not None else None
            if sock is not None:
                self.wire.send(sock, msg_type, content)

    def _engine_ready(self, engine: Engine) -> None:
        self.balancer.engine_added(engine.id)
        self.publish_event(protocol.ENGINE_REGISTERED, {"engine": engine.info().to_content()})
        self.dead.pop(engine.id, None)  # (an engine that came back with its id)
        self.restorer.engine_back(engine.id)
        self._write_cluster_json()
        self.launches.engine_ready(engine.id, held=bool(self.restorer.adopting))
        self._report_if_ready()

    def _report_if_ready(self, waited: bool = False) -> None:
        """Report startup once every engine started is ready and every adopted one too
        (or, with ``waited``, once :data:`ADOPT_WAIT` has passed)."""
        self.launches.check(held=bool(self.restorer.adopting) and not waited)

    def _startup_done(self, report: Report) -> None:
        """The start is over (see :mod:`.launching`): say so on stdout; a failed start
        ends this controller."""
        if self._startup_reported:
            return
        if not report.ready:
            self._report({"status": "error", "message": report.message})
            self.loop.stop()
            self.exit_code = 1
            return
        status: dict[str, Any] = {"status": "ready", "ids": self.engines.ready_ids()}
        adopting = self.restorer.adopting
        if adopting:
            status["adopting"] = sorted(adopting)
        self._report(status)

    def _engine_dead(self, engine: Engine, reason: str) -> None:
        self._engine_gone(engine.id, reason)
        self.launches.engine_dead(engine.id, reason)
        if engine.id in self.restorer.adopting:
            self.restorer.engine_lost(engine.id, reason.splitlines()[0])
            self._report_if_ready()

    def _engine_gone(self, eid: int, reason: str) -> None:
        """An engine left: fail what it held, tell the scheduler and every client."""
        self.dead[eid] = first = reason.splitlines()[0]
        self.comms.forget(eid)
        self.router.fail_engine(eid, first)
        self.balancer.engine_removed(eid, first)
        self.publish_event(protocol.ENGINE_UNREGISTERED, {"engine_id": eid, "reason": reason})
        self._write_cluster_json()

    def stop_engines(self, eids: list[int] | None = None, reason: str = "was stopped") -> None:
        """Stop engines; their unanswered requests fail with ``EngineError``."""
        for engine in self.engines.stop(eids):
            self._engine_gone(engine.id, f"engine {engine.id} {reason}")

    # ----- lifetime

    def start(self, n: int) -> None:
        """Start ``n`` engines, and report on stdout once they (and the adopted ones) are
        ready."""
        if n:
            try:
                self.start_engines(n)
            except LaunchError as exc:
                # (reported from the loop: a stop before it runs would not hold)
                failed = Report(False, message=str(exc))
                self.loop.call_later(0, lambda: self._startup_done(failed))
                return
        self._report_if_ready()

    def _report(self, status: dict[str, Any]) -> None:
        """Tell whoever launched us (on stdout) that startup finished, then leave stdout."""
        self._flush_cluster_json()  # (what it says is written before it is said)
        self._startup_reported = True
        status["connection_file"] = str(self.connection_file)
        try:
            sys.stdout.write(json.dumps(status) + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def _check_parent(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.warning("parent process %i is gone; stopping", self.parent_pid)
            self.loop.stop()

    def stop(self) -> None:
        """Stop serving (after the current message); :meth:`run` then closes everything."""
        self.loop.stop()

    def run(self) -> int:
        """Serve until stopped (a shutdown request, SIGTERM/SIGINT, or the parent's exit)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.loop.stop())
        try:
            self.loop.run()
        finally:
            self.close()
        return self.exit_code

    def close(self) -> None:
        """Stop every engine, tell clients, close sockets, remove the cluster folder files."""
        try:
            # what this loop turn answered (a shutdown request's reply) goes before the
            # stopping event, or the client takes the event for the answer's failure
            self.fanin.release_all()
            self.outbox.flush()
            self.stop_engines(reason="was stopped with its cluster")
            self._flush_cluster_json()
            self.publish_event(protocol.CONTROLLER_STOPPING, {})
            self.drops.flush()
        finally:
            self.fanin.release_all()
            self.outbox.flush()
            self.launches.stop_all()
            self.reads.close()
            try:
                self.hub.close()
            except Exception:
                log.exception("closing the task database")
            clusters.remove_key_files(self.folder)
            self.clients_socket.close(linger=0)
            self.iopub.close(linger=100)
            self.context.term()
            self.loop.close()
