"""Direct lanes: ``apply_request`` sent straight to an engine's task lane.

Through the controller a request takes two more hops, each a receive, a routing decision
and a send in another process: on this 2-core machine about a third of a round trip. A
client on the engines' host can skip them. Per engine it connects a sending DEALER
(identity ``<id>:s``) to the lane, and its receiving DEALER (``<id>:r``, the one that
also receives the controller's replies) to the lane too; the lane answers the ``:r`` twin
(:func:`kernel_engine.protocol.reply_identity`).

The controller still learns of every request: the client sends it notices
(:data:`~kernel_engine.protocol.DIRECT_NOTICE`) of what it submitted and what came back,
in batches, at most :data:`FLUSH_EVERY` seconds late and always before any other message
of the client's reaches the controller. So the hub's records, ``queue_status``,
dependencies of load-balanced tasks on direct ones, and other clients' ``get_result`` see
direct requests as they see routed ones.

Rules that keep this as safe as routing through the controller:

- A lane is used only for engines on this host (loopback address, this hostname), once it
  has answered a ping on the receiving socket (so replies cannot be dropped for an
  unconnected twin).
- Requests to one engine stay in order when an engine switches from routed to direct
  (and between lane and shell): see :mod:`jupyter_ext._order`.
- A dead engine's requests fail: the controller's ``ENGINE_UNREGISTERED`` event does it
  (with the controller's account of how it died); should that event never come, the IO
  thread's own check of the engine's process does, :data:`DEATH_GRACE` seconds later.

Threads: sockets are created, connected and closed on the client's IO thread; user threads
send on the per-engine sockets under the IO thread's send lock. The notices waiting to be
sent, shared by both, are guarded by :attr:`DirectLanes.lock`. Which requests are in
flight on a lane is the request table's to know (:mod:`jupyter_ext._request`), not this
module's.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from kernel_engine import protocol, wire

log = logging.getLogger("jupyter_ext")

FLUSH_EVERY = 0.02
"""Seconds a notice may wait before the IO thread sends the batch it is in."""

PING_FIRST_RETRY = 0.005
"""Seconds before a lane that has not answered is pinged again; doubles every time, up
to :data:`PING_MAX_INTERVAL` (a ping is lost when it beats the receiving socket's
connection)."""

PING_MAX_INTERVAL = 0.5

PING_GIVE_UP = 30.0
"""Seconds after which an unanswering lane is left alone (requests stay routed)."""

DEATH_GRACE = 2.0
"""Seconds between seeing an engine's process gone and failing its direct requests,
when the controller's event has not done it first."""


def direct_enabled(controller_ip: str) -> bool:
    """Whether a client may use lanes: it runs beside the controller, and nobody said no."""
    if os.environ.get("JUPYTER_PX_DIRECT", "1").lower() in ("0", "no", "off", "false"):
        return False
    return controller_ip in protocol.LOCAL_IPS


class _Lane:
    """One engine's lane as this client sees it."""

    def __init__(self, engine_id: int, url: str, pid: int | None, sock: zmq.Socket[Any]):
        self.engine_id = engine_id
        self.url = url
        self.pid = pid
        self.socket = sock
        self.ready = False
        self.added_at = time.monotonic()
        self.next_ping = 0.0
        self.ping_interval = PING_FIRST_RETRY
        self.gone_since: float | None = None


class DirectLanes:
    """Per-engine lane sockets, which requests are in flight on them, and the notices."""

    def __init__(
        self,
        context: zmq.Context[Any],
        wire_: wire.Wire,
        identity: bytes,
        receiver: zmq.Socket[Any],
        send_lock: threading.Lock,
        keypair: tuple[bytes, bytes] | None = None,
        controller_key: bytes | None = None,
    ):
        self.context = context
        self.wire = wire_
        self.identity = identity
        self.receiver = receiver
        self.send_lock = send_lock
        self.keypair = keypair
        self.controller_key = controller_key
        self.lock = threading.Lock()
        self.lanes: dict[int, _Lane] = {}
        self.unready: set[int] = set()  # lanes being pinged
        self._pings: dict[str, int] = {}
        self._submitted: list[protocol.DirectSubmitted] = []
        self._completed: list[protocol.DirectCompleted] = []
        self._blobs: list[bytes] = []
        self._first_pending = 0.0
        self._hostname = _socket.gethostname()

    # ----- engines (IO thread)

    def add_engines(self, infos: list[dict[str, Any]]) -> None:
        for info in infos:
            self.add_engine(info)

    def add_engine(self, info: dict[str, Any]) -> None:
        """Start using an engine's lane, if it is on this host and has one."""
        eid = int(info["id"])
        conn = info.get("connection_info") or {}
        port = conn.get("lane_port")
        if eid in self.lanes or not port or not protocol.on_this_host(conn):
            return
        if info.get("hostname") and info["hostname"] != self._hostname:
            return
        url = protocol.endpoint(conn, port)
        server = conn.get("curve_publickey")
        login = not server and conn.get("lane_auth") == wire.LANE_AUTH
        session = str(info.get("uuid") or "")
        with self.send_lock:
            sock = self.context.socket(zmq.DEALER)
            sock.linger = 1000
            sock.identity = self.identity + b":s"
            if server:  # an encrypted cluster: the lane is a CurveZMQ server
                wire.curve_client(sock, server.encode(), self.keypair)
            elif login:  # the lane lets in only peers with its password
                wire.lane_client(sock, self.wire.key, int(port), session)
            sock.connect(url)
        # a connection keeps the options it was made with: the receiver's link to the
        # controller is not changed by these
        if server:
            self.receiver.curve_serverkey = server.encode()
            self.receiver.connect(url)
            if self.controller_key is not None:
                self.receiver.curve_serverkey = self.controller_key
        elif login:
            wire.lane_client(self.receiver, self.wire.key, int(port), session)
            try:
                self.receiver.connect(url)
            finally:
                wire.null_client(self.receiver)
        else:
            self.receiver.connect(url)
        self.lanes[eid] = _Lane(eid, url, info.get("pid"), sock)
        self.unready.add(eid)
        self._ping(self.lanes[eid])

    def remove_engine(self, eid: int) -> None:
        """Stop using an engine's lane (its requests are the request table's to fail)."""
        lane = self.lanes.pop(eid, None)
        self.unready.discard(eid)
        if lane is not None:
            with self.send_lock:
                lane.socket.close(linger=0)
            try:
                self.receiver.disconnect(lane.url)
            except zmq.ZMQError:
                pass
        self._pings = {m: e for m, e in self._pings.items() if e != eid}

    def _ping(self, lane: _Lane) -> None:
        lane.next_ping = time.monotonic() + lane.ping_interval
        lane.ping_interval = min(2 * lane.ping_interval, PING_MAX_INTERVAL)
        header, frames = self.wire.pack(protocol.LANE_PING_REQUEST, {})
        self._pings[header["msg_id"]] = lane.engine_id
        with self.send_lock:  # (never blocking the IO thread: a lost ping is pinged again)
            try:
                lane.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass

    def on_ping_reply(self, msg_id: str) -> None:
        eid = self._pings.pop(msg_id, None)
        lane = self.lanes.get(eid) if eid is not None else None
        if lane is not None:
            lane.ready = True
            self.unready.discard(lane.engine_id)
            self._pings = {m: e for m, e in self._pings.items() if e != eid}

    def ping_silent(self, now: float) -> float | None:
        """Ping the lanes that are due; returns seconds until the next is due, or None."""
        soonest: float | None = None
        for eid in list(self.unready):
            lane = self.lanes[eid]
            if now - lane.added_at > PING_GIVE_UP:
                self.unready.discard(eid)  # its requests stay routed through the controller
                continue
            if now >= lane.next_ping:
                self._ping(lane)
            wait = max(0.0, lane.next_ping - now)
            soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def tick(
        self, now: float, busy: Callable[[int], bool], alive: Callable[[int], bool]
    ) -> list[tuple[int, str]]:
        """Returns (engine id, reason) for engines with requests in flight (``busy``)
        whose process is gone."""
        dead: list[tuple[int, str]] = []
        for lane in list(self.lanes.values()):
            if lane.pid is None or not busy(lane.engine_id):
                continue
            if alive(lane.pid):
                lane.gone_since = None
            elif lane.gone_since is None:
                lane.gone_since = now
            elif now - lane.gone_since > DEATH_GRACE:
                dead.append((lane.engine_id, f"engine {lane.engine_id} (pid {lane.pid}) is gone"))
        return dead

    # ----- sending (any thread)

    def usable(self, eid: int) -> bool:
        """Whether requests to ``eid`` may go to its lane directly now."""
        lane = self.lanes.get(eid)
        return lane is not None and lane.ready

    def start(self, eid: int, header: dict[str, Any], label: str | None) -> zmq.Socket[Any] | None:
        """Note a request about to go to ``eid``'s lane; returns the lane's socket (None
        if the engine is gone)."""
        lane = self.lanes.get(eid)
        if lane is None:
            return None
        entry = protocol.DirectSubmitted(
            header["msg_id"], header["msg_type"], header["date"], eid, label
        )
        with self.lock:
            if not self._first_pending:
                self._first_pending = time.monotonic()
            self._submitted.append(entry)
        return lane.socket

    # ----- receiving (IO thread)

    def direct_done(
        self,
        msg_id: str,
        engine_id: int | None,
        metadata: dict[str, Any],
        reply: list[Any] | None = None,
    ) -> None:
        """A direct request finished (or failed): note it for the controller.

        ``reply`` (the frames after the delimiter) is kept for the hub when small.
        """
        status = metadata.get("status")
        started, completed = metadata.get("started"), metadata.get("completed")
        sizes, blob = None, None
        if reply is not None:
            sizes = tuple(map(len, reply))
            if sum(sizes) <= protocol.MAX_STORED_RESULT:
                blob = b"".join(reply)  # (zmq frames and bytes alike: buffers)
            else:
                sizes = None
        entry = protocol.DirectCompleted(
            msg_id,
            engine_id,
            "ok" if status == "ok" else "error",
            started if isinstance(started, str) else None,
            completed if isinstance(completed, str) else wire.utcnow_iso(),
            sizes,
        )
        with self.lock:
            if blob is not None:
                self._blobs.append(blob)
            if not self._first_pending:
                self._first_pending = time.monotonic()
            self._completed.append(entry)

    # ----- notices

    def flush_due(self, now: float) -> float | None:
        """Seconds until the pending notices must go (0: now), or None if none wait."""
        first = self._first_pending
        if not first:
            return None
        return max(0.0, first + FLUSH_EVERY - now)

    def flush(self, controller: zmq.Socket[Any]) -> None:
        """Send pending notices on ``controller`` (call with the send lock held)."""
        if not self._first_pending:
            return
        with self.lock:
            notice = protocol.DirectNotice(tuple(self._submitted), tuple(self._completed))
            blobs = self._blobs
            self._submitted, self._completed, self._blobs = [], [], []
            self._first_pending = 0.0
        content = notice.to_content()
        frames = self.wire.pack(
            protocol.DIRECT_NOTICE, content, None, None, blobs, idents=[protocol.HUB_ROUTE]
        )[1]
        try:  # never block: a stuck controller loses these records, nobody's results
            wire.send_frames(controller, frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning(
                "jupyter-px client: the controller is not reading; %i notices dropped",
                len(content["submitted"]) + len(content["completed"]),
            )

    def close(self) -> None:
        """Close the lane sockets (IO thread, send lock held by the caller)."""
        for lane in self.lanes.values():
            lane.socket.close(linger=1000)
        self.lanes.clear()
