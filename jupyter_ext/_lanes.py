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

Threads: the lane sockets are created, connected and closed on the client's IO thread;
user threads send on them under the IO thread's send lock. A thread's own sockets
(:class:`HereSocket`, for its blocking calls) are made by that thread and used by it
alone; they are closed by the IO thread when the client closes, by the next thread that
makes one once their thread has ended, or given to the IO thread when their thread stops
waiting on one. The notices waiting to be sent, and the set of those sockets, are guarded
by :attr:`DirectLanes.lock`. Which requests are in
flight on a lane is the request table's to know (:mod:`jupyter_ext._request`), not this
module's.
"""

from __future__ import annotations

import itertools
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

FLUSH_EVERY = 0.25
"""Seconds a notice may wait before the batch it is in is sent (as long as the IO
thread's longest sleep). Sooner when :data:`MAX_WAITING` notices or
:data:`MAX_WAITING_BYTES` of reply frames wait, when a request this client's own
load-balanced tasks depend on has finished (:meth:`DirectLanes.watch`), and before any
other message of the client's.

Each batch costs the calls around it: in a loop of blocking calls to one engine on this
2-core machine, the call that sends it and the one or two after it (while the
controller takes the batch in) were the loop's slowest. At 0.02 s, one call in 66 sent a
batch, and the p99 of the round trip was 1.6 to 1.8 ms (the p50 0.28); at 0.3 s, 0.65 to
0.93 ms, the p50 unchanged (loops of 3,000 ``rc[0].apply_sync(noop)``, alternated with
the old interval). The records of direct requests
reach the controller's store that much later: other clients' ``get_result`` and
``db_query`` see them at most this late."""

MAX_WAITING = 2000
"""Notices (requests sent, answered, or both) past which they are sent at once: a
controller takes in one batch in a single turn of its loop (about 30 us a notice)."""

MAX_WAITING_BYTES = 4 << 20
"""Bytes of reply frames kept for the controller past which the notices are sent at once."""

MAX_WATCHED = 100_000
"""Requests watched for dependents at most (past it, the set starts again: a dependent
task then starts up to :data:`FLUSH_EVERY` late, never wrongly)."""

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


def _said_no(name: str) -> bool:
    return os.environ.get(name, "1").lower() in ("0", "no", "off", "false")


def direct_enabled(controller_ip: str) -> bool:
    """Whether a client may use lanes: it runs beside the controller, and nobody said no."""
    return not _said_no("JUPYTER_PX_DIRECT") and controller_ip in protocol.LOCAL_IPS


def here_enabled() -> bool:
    """Whether threads may read the replies to their blocking calls themselves (see
    :class:`HereSocket`); ``JUPYTER_PX_HERE=0`` says no (every reply then comes through
    the IO thread, as before: to compare, or should a thread's own socket misbehave)."""
    return not _said_no("JUPYTER_PX_HERE")


class _Lane:
    """One engine's lane as this client sees it."""

    def __init__(
        self,
        engine_id: int,
        url: str,
        pid: int | None,
        sock: zmq.Socket[Any],
        server: str | None = None,
        login: tuple[int, str] | None = None,
    ):
        self.engine_id = engine_id
        self.url = url
        self.pid = pid
        self.socket = sock
        self.server = server  # the lane's CurveZMQ key, if it encrypts
        self.login = login  # (port, session) of its password, if it wants one
        self.ready = False
        self.added_at = time.monotonic()
        self.next_ping = 0.0
        self.ping_interval = PING_FIRST_RETRY
        self.gone_since: float | None = None


class HereSocket:
    """A thread's own socket to one engine's lane, for the blocking calls it makes to
    that engine (see :meth:`DirectLanes.here`). Only that thread uses it, while ``busy``;
    otherwise the IO thread may close it (at the end), and it takes over one whose thread
    stopped waiting for its reply (Ctrl-C)."""

    __slots__ = ("busy", "closed", "given", "lane", "msg_id", "poller", "socket", "thread")

    def __init__(self, sock: zmq.Socket[Any], lane: _Lane):
        self.socket = sock
        # (its thread's wait: made once, where ``socket.poll`` makes a poller every call)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.lane = lane
        self.thread = threading.current_thread()
        self.busy = True
        self.closed = False
        self.given = False  # to the IO thread: no longer its thread's
        self.msg_id = ""  # the request it carries now, not answered yet


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
        # (the notices waiting: sent and not answered yet, by msg_id; answered, of
        # requests sent before the last notice; sent and answered since, as pairs; and
        # the reply frames kept of the last two)
        self._submitted: dict[str, protocol.DirectSubmitted] = {}
        self._completed: list[protocol.DirectCompleted] = []
        self._done: list[tuple[protocol.DirectSubmitted, protocol.DirectCompleted]] = []
        self._blobs: list[bytes] = []
        self._done_blobs: list[bytes] = []
        self._first_pending = 0.0
        self._blob_bytes = 0  # (of _blobs and _done_blobs)
        self._urgent = False  # (a watched request finished: send at once)
        self._watched: set[str] = set()
        self._hostname = _socket.gethostname()
        # the threads' own sockets (here): each thread's by engine; all those open
        self._mine = threading.local()
        self._heres: set[HereSocket] = set()
        self._here_ids = itertools.count()
        self._closing = False
        self._then: Callable[[], None] | None = None  # (see after_heres)
        self._here_on = here_enabled()

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
        password = (int(port), session) if login else None
        with self.send_lock:
            sock = self._connect(self.identity + b":s", url, server, password)
        lane = _Lane(eid, url, info.get("pid"), sock, server, password)
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
        self.lanes[eid] = lane
        self.unready.add(eid)
        self._ping(self.lanes[eid])

    def _connect(
        self, identity: bytes, url: str, server: str | None, login: tuple[int, str] | None
    ) -> zmq.Socket[Any]:
        """A DEALER connected to a lane as ``identity`` (any thread)."""
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 1000
        sock.identity = identity
        if server:  # an encrypted cluster: the lane is a CurveZMQ server
            wire.curve_client(sock, server.encode(), self.keypair)
        elif login:  # the lane lets in only peers with its password
            wire.lane_client(sock, self.wire.key, *login)
        sock.connect(url)
        return sock

    def remove_engine(self, eid: int) -> None:
        """Stop using an engine's lane (its requests are the request table's to fail)."""
        lane = self.lanes.pop(eid, None)
        self.unready.discard(eid)
        if lane is not None:
            with self.lock:  # (the threads' own idle ones; a busy one closes when done)
                for here in [h for h in self._heres if h.lane is lane and not h.busy]:
                    self._close_here(here)
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

    def start(
        self, eid: int, header: dict[str, Any], label: str | None
    ) -> tuple[zmq.Socket[Any] | None, bool]:
        """Note a request about to go to ``eid``'s lane; returns the lane's socket (None
        if the engine is gone), and whether the IO thread needs waking (see :meth:`note`)."""
        lane = self.lanes.get(eid)
        if lane is None:
            return None, False
        return lane.socket, self.note(eid, header, label)

    def note(self, eid: int, header: dict[str, Any], label: str | None) -> bool:
        """Note a request about to go to ``eid``'s lane, for the controller; True if no
        other notice waited, or this one makes :data:`MAX_WAITING` (the IO thread then
        needs to know when to send them)."""
        entry = protocol.DirectSubmitted(
            header["msg_id"], header["msg_type"], header["date"], eid, label
        )
        with self.lock:
            first = not self._first_pending
            if first:
                self._first_pending = time.monotonic()
            self._submitted[entry.msg_id] = entry
            waiting = len(self._submitted) + len(self._completed) + len(self._done)
        return first or waiting == MAX_WAITING

    # ----- a thread's own sockets

    def here(self, eid: int) -> HereSocket | None:
        """The calling thread's own socket to ``eid``'s lane, now busy (see :class:`HereSocket`);
        None if the lane is not usable now, the thread's socket to it is busy still (a
        callback of its call calling again), the client is closing, or
        ``JUPYTER_PX_HERE=0``."""
        lane = self.lanes.get(eid)
        if lane is None or not lane.ready or not self._here_on:
            return None
        mine: dict[int, HereSocket] | None = getattr(self._mine, "heres", None)
        if mine is None:
            mine = self._mine.heres = {}
        here = mine.get(eid)
        with self.lock:
            if self._closing:
                return None
            if here is not None and here.lane is not lane:  # (its engine is gone)
                del mine[eid]
                self._close_here(here)
                here = None
            if here is None:
                for gone in [h for h in self._heres if not h.thread.is_alive()]:
                    self._close_here(gone)  # (a thread that ended: nobody else uses it)
                identity = b"%s:h%d" % (self.identity, next(self._here_ids))
                sock = self._connect(identity, lane.url, lane.server, lane.login)
                here = mine[eid] = HereSocket(sock, lane)
                self._heres.add(here)
                return here
            if here.busy or here.closed:
                return None
            here.busy = True
            return here

    def here_done(self, here: HereSocket) -> None:
        """The calling thread is done with its socket for now (nothing if it gave it
        away); closed if the client is closing or its engine is gone."""
        with self.lock:
            if here.given:
                return
            here.busy = False
            if self._closing or self.lanes.get(here.lane.engine_id) is not here.lane:
                self._close_here(here)

    def abandon(self, here: HereSocket, give: Callable[[zmq.Socket[Any]], None]) -> bool:
        """The calling thread stops waiting on its socket (Ctrl-C, say) before the reply
        came: the socket is no longer its own, but given to ``give`` (the IO thread's, to
        read that reply), or closed if the client is closing (False)."""
        mine = getattr(self._mine, "heres", {})
        if mine.get(here.lane.engine_id) is here:
            del mine[here.lane.engine_id]
        with self.lock:  # (not given once close_heres began: it would be left open)
            if here.given:
                return False
            here.busy = False
            if self._closing:
                self._close_here(here)
                return False
            here.given = True
            self._heres.discard(here)
            give(here.socket)
            return True

    def _close_here(self, here: HereSocket) -> None:
        if not here.closed:
            here.closed = True
            here.socket.close(linger=0)
        self._heres.discard(here)
        if self._closing and not self._heres and self._then is not None:
            then, self._then = self._then, None
            then()  # (the last one: see close_heres)

    def close_heres(self) -> None:
        """Close the threads' own idle sockets (IO thread, first thing at the end); from
        now on, none is made or given to the IO thread, and a busy one is closed by its
        thread when done (see :meth:`after_heres`)."""
        with self.lock:
            self._closing = True
            for here in [h for h in self._heres if not h.busy]:
                self._close_here(here)

    def after_heres(self, timeout: float, then: Callable[[], None]) -> None:
        """Call ``then`` (which terminates the context) once the threads' own sockets are
        closed, waiting ``timeout`` s at most (IO thread); past that, the thread that
        closes the last one calls it."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if not self._heres:
                    break
                if time.monotonic() > deadline:
                    log.warning("jupyter-px client: a thread still uses its socket at close")
                    self._then = then
                    return
            time.sleep(0.005)
        then()

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
                self._blob_bytes += len(blob)
            if msg_id in self._watched:
                self._watched.discard(msg_id)
                self._urgent = True
            sent = self._submitted.pop(msg_id, None)
            if sent is not None:  # (sent since the last notice: one entry for both)
                self._done.append((sent, entry))
                if blob is not None:
                    self._done_blobs.append(blob)
                return
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
        if (
            self._urgent
            or len(self._submitted) + len(self._completed) + len(self._done) >= MAX_WAITING
            or self._blob_bytes >= MAX_WAITING_BYTES
        ):
            return 0.0
        return max(0.0, first + FLUSH_EVERY - now)

    def watch(self, msg_ids: list[str]) -> None:
        """This client's load-balanced tasks wait for these requests: the notice of one of
        them that finishes goes at once (any thread)."""
        with self.lock:
            if len(self._watched) + len(msg_ids) > MAX_WATCHED:
                self._watched.clear()
            self._watched.update(msg_ids[:MAX_WATCHED])

    def flush(self, controller: zmq.Socket[Any]) -> None:
        """Send pending notices on ``controller`` (call with the send lock held)."""
        if not self._first_pending:
            return
        with self.lock:
            notice = protocol.DirectNotice(
                tuple(self._submitted.values()), tuple(self._completed), tuple(self._done)
            )
            blobs = self._done_blobs + self._blobs
            self._submitted, self._completed, self._done = {}, [], []
            self._blobs, self._done_blobs = [], []
            self._first_pending = 0.0
            self._blob_bytes = 0
            self._urgent = False
        content = notice.to_content()
        frames = self.wire.pack(
            protocol.DIRECT_NOTICE, content, None, None, blobs, idents=[protocol.HUB_ROUTE]
        )[1]
        try:  # never block: a stuck controller loses these records, nobody's results
            wire.send_frames(controller, frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning(
                "jupyter-px client: the controller is not reading; %i notices dropped",
                len(notice.submitted) + len(notice.completed) + len(notice.done),
            )

    def close(self) -> None:
        """Close the lane sockets (IO thread, send lock held by the caller)."""
        for lane in self.lanes.values():
            lane.socket.close(linger=1000)
        self.lanes.clear()
