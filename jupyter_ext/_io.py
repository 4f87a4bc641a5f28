"""The client's IO thread: the one owner of the client's sockets.

Thread ``jupyter-px-io`` (one per :class:`~jupyter_ext.Client`) polls the DEALER on which
replies arrive, the SUB on the controller's iopub (engine output and cluster events), a
DEALER that pings the controller's heartbeat echo, and the sockets of direct lanes.
Everything it receives is handed to the transport's ``on_reply`` / ``on_iopub`` on this
thread, a message at a time (replies the controller gathered into one batch message are
taken apart here); those resolve futures, which wakes whoever waits on them.

Requests do not pass through this thread: user threads send them on a second DEALER,
one at a time under a lock (a zmq socket must not be used by two threads at once, and
this one is used by no thread but the sender of the moment). Its identity is
``<16 hex>:s`` and the receiving socket's ``<16 hex>:r``, and the controller answers the
``:r`` twin, so a blocking call costs one thread hand-off (the reply), not three.

Liveness, both ways:

- this thread pings the controller's heartbeat echo every :data:`HEARTBEAT_EVERY` s; after
  :data:`MAX_MISSED` pings in a row without an echo (counted from pings actually sent, so
  a pause of this process is not the controller's silence), the controller is lost and
  everything waiting fails with a clear error, wherever the controller runs;
- a controller on this machine whose process is gone is lost at once;
- when echoes come back (after a pause, or from a controller restarted on the cluster
  folder, which takes over its key and ports, so every socket here reconnects by itself;
  the connection file then names it), ``on_answer`` lets the transport rejoin: its
  replies and iopub must reach this client again before it takes requests (see
  ``Transport._answering``), and then :meth:`IOThread.back`;
- it sends the controller a keepalive notice every few seconds, and a goodbye when the
  client closes, so the controller drops a vanished client's queued work.

On the engines' host, requests to engines' task lanes skip the controller: see
:mod:`jupyter_ext._lanes`, whose sockets this thread also owns.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from kernel_engine import processes, protocol, wire

from ._interrupts import deferred_interrupts
from ._lanes import DirectLanes, direct_enabled

log = logging.getLogger("jupyter_ext")

THREAD_NAME = "jupyter-px-io"

HEARTBEAT_EVERY = 1.0
"""Seconds between pings to the controller's heartbeat echo."""

MAX_MISSED = 4
"""Pings in a row without an echo after which the controller counts as lost."""

IOPUB_HWM = 10_000
"""Output messages buffered for this client before the controller's side drops some."""

HERE_CLOSE_WAIT = 4.0
"""Seconds the IO thread, closing, waits for threads to be done with their own sockets (a
thread waiting on one sees the client closed within :data:`._transport.HERE_POLL_MS`; one
taking a large result in finishes, within the 5 s that :meth:`IOThread.stop` waits)."""


def _nothing() -> None:
    pass


class IOThread:
    """Owns the sockets of one client; started on construction, stopped by :meth:`stop`."""

    def __init__(
        self,
        info: dict[str, Any],
        wire_: wire.Wire,
        on_reply: Callable[[list[Any]], None],
        on_iopub: Callable[[list[Any]], None],
        on_lost: Callable[[str], None],
        on_answer: Callable[[], None],
        connection_file: str | None = None,
    ):
        self.context: zmq.Context[Any] = zmq.Context()
        # no high-water marks: pipelining many requests must not block the sending thread
        self.context.sndhwm = 0
        self.context.rcvhwm = 0
        self.wire = wire_
        self.on_reply = on_reply
        self.on_iopub = on_iopub
        self.on_lost = on_lost
        self.on_answer = on_answer
        self.on_tick: Callable[[], None] = lambda: None
        # the messages of a batch on the reply socket, all at once (None: one at a time)
        self.on_replies: Callable[[list[list[Any]]], None] | None = None
        self.drops = wire.DropLog(log, "jupyter-px client")
        ip, transport = info["ip"], info.get("transport", "tcp")
        self.address = f"{ip}:{info['client_port']}"
        identity = os.urandom(8).hex().encode()
        url = f"{transport}://{ip}:{info['client_port']}"
        # an encrypted cluster (CurveZMQ): this client's keypair, the controller's key
        server = info.get("curve_serverkey")
        self.keypair = zmq.curve_keypair() if server else None
        self.dealer = self._socket(zmq.DEALER, server)
        self.dealer.linger = 0
        self.dealer.identity = identity + b":r"
        self.dealer.connect(url)
        self._sender = self._socket(zmq.DEALER, server)
        self._sender.linger = 1000
        self._sender.identity = identity + b":s"
        self._sender.connect(url)
        self.sub = self._socket(zmq.SUB, server)
        self.sub.linger = 0
        self.sub.rcvhwm = IOPUB_HWM
        # engine output and cluster events; the status stream only while someone watches
        # (see subscribe: a subscription is what makes the controller publish it)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"engine.")
        self.sub.setsockopt(zmq.SUBSCRIBE, protocol.EVENT_TOPIC)
        self.sub.connect(f"{transport}://{ip}:{info['iopub_port']}")
        self.hb: zmq.Socket[Any] | None = None
        if info.get("hb_port"):
            self.hb = self._socket(zmq.DEALER, server)
            self.hb.linger = 0
            self.hb.maxmsgsize = protocol.HEARTBEAT_MAX_BYTES
            self.hb.connect(f"{transport}://{ip}:{info['hb_port']}")
        self._ping = self._pong = self._missed = 0
        self._send_lock = threading.Lock()
        # work for this thread from others (call_soon), and the socket pair that wakes it
        self._calls: deque[Callable[[], None]] = deque()
        # sockets other threads gave this one, to read the replies they stopped waiting
        # for: given, and taken (each with a test of whether it is still wanted)
        self._given: deque[tuple[zmq.Socket[Any], Callable[[], bool]]] = deque()
        self._taken: dict[zmq.Socket[Any], Callable[[], bool]] = {}
        self._wake_url = f"inproc://px-wake-{identity.decode()}"
        self._wake_in = self.context.socket(zmq.PAIR)
        self._wake_in.bind(self._wake_url)
        self._wake_out = self.context.socket(zmq.PAIR)
        self._wake_out.connect(self._wake_url)
        self.lanes: DirectLanes | None = None
        if direct_enabled(ip):
            self.lanes = DirectLanes(
                self.context,
                wire_,
                identity,
                self.dealer,
                self._send_lock,
                self.keypair,
                server.encode() if server else None,
            )
        self._controller_pid = int(info.get("controller_pid") or 0)
        self._local = ip in protocol.LOCAL_IPS
        self._connection_file = connection_file
        self._running = True
        self.lost: str | None = None
        self._lost_by_heartbeat = False
        self._back = threading.Condition()
        self._backs = 0  # times the client got in step with a controller that came back
        self._answering_pid = 0  # the controller that answers while we are lost
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.thread.start()
        self.thread_id = self.thread.ident  # (compared with threading.get_ident())

    def _socket(self, kind: int, server: str | None) -> zmq.Socket[Any]:
        """A socket to the controller (a CurveZMQ client of ``server`` if it is given)."""
        sock = self.context.socket(kind)
        if server:
            wire.curve_client(sock, server.encode(), self.keypair)
        return sock

    def send(
        self, frames: list[Any], track: bool = False, lane: zmq.Socket[Any] | None = None
    ) -> zmq.MessageTracker | None:
        """Queue frames (any thread) for the controller, or on ``lane`` (an engine's task
        lane, from :meth:`DirectLanes.start`); returns a tracker when ``track``.

        Notices of direct requests go first, so the controller never hears of anything of
        this client's before it knows of them. Ctrl-C waits until the message has left
        whole (:mod:`._interrupts`).
        """
        with deferred_interrupts(), self._send_lock:
            sock = self._sender
            if lane is not None:
                sock = lane
            elif self.lanes is not None:
                self.lanes.flush(sock)
            return wire.send_frames(sock, frames, track=track)

    def _notify(self, msg_type: str) -> None:
        """Send a notice (no reply) to the controller, never blocking (IO thread)."""
        frames = self.wire.pack(msg_type, {}, idents=[protocol.HUB_ROUTE])[1]
        with self._send_lock:
            if not self._sender.closed:
                try:
                    self._sender.send_multipart(frames, zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    pass

    def subscribe(self, topic: bytes, on: bool) -> None:
        """Subscribe to (or unsubscribe from) ``topic`` of the controller's iopub (IO
        thread: it owns the socket)."""
        self.sub.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, topic)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on this thread (which owns the sockets) soon."""
        self._calls.append(callback)
        with self._send_lock:
            if not self._wake_out.closed:  # else the thread has stopped (see stop)
                self._wake_out.send(b"", zmq.NOBLOCK)

    def take_over(self, sock: zmq.Socket[Any], wanted: Callable[[], bool]) -> None:
        """Give this thread ``sock`` (any thread, which no longer uses it), whose replies
        it then reads as the controller's (see :meth:`on_reply`) and which it closes once
        ``wanted()`` is false; call :meth:`wake` after."""
        self._given.append((sock, wanted))

    def wake(self) -> None:
        self.call_soon(_nothing)

    def flush_if_due(self) -> None:
        """Send the notices of direct requests if they are due (any thread)."""
        lanes = self.lanes
        if lanes is not None and lanes.flush_due(time.monotonic()) == 0.0:
            with self._send_lock:
                if not self._sender.closed:
                    lanes.flush(self._sender)

    def call_and_wait(self, callback: Callable[[], None], timeout: float) -> bool:
        """Run ``callback`` on this thread and wait for it, ``timeout`` seconds at most
        (any other thread); whether it ran."""
        ran = threading.Event()

        def run() -> None:
            try:
                callback()
            finally:
                ran.set()

        self.call_soon(run)
        return ran.wait(timeout)

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.dealer, self.sub, self._wake_in, self.hb):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        now = time.monotonic()
        next_check, next_beat, next_keepalive = now + 0.5, now, now + protocol.KEEPALIVE_EVERY
        lanes = self.lanes
        timeout = 250
        while self._running:
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError:
                break
            if self.dealer in events:
                self._drain(self.dealer, self.on_reply)
            if self.sub in events:
                self._drain(self.sub, self.on_iopub)
            if self.hb is not None and self.hb in events:
                self._drain(self.hb, self._on_echo)
            if self._wake_in in events:
                self._run_calls()
            if self._given or self._taken:
                self._serve_taken(poller, events)
            now = time.monotonic()
            timeout = 250
            if lanes is not None:
                due = lanes.flush_due(now)
                if due == 0.0:
                    with self._send_lock:
                        lanes.flush(self._sender)
                elif due is not None:
                    timeout = min(timeout, int(due * 1000) + 1)
                if lanes.unready:
                    ping = lanes.ping_silent(now)
                    if ping is not None:
                        timeout = min(timeout, int(ping * 1000) + 1)
            if now >= next_beat:
                next_beat = now + HEARTBEAT_EVERY
                self._heartbeat()
            if now >= next_keepalive:
                next_keepalive = now + protocol.KEEPALIVE_EVERY
                self._notify(protocol.KEEPALIVE_NOTICE)
            if now >= next_check:
                next_check = now + 0.5
                self._check_controller()
                self._safely(self.on_tick)
                self.drops.flush(now)
        try:
            self._close(lanes)
        finally:
            self.thread_id = None  # (an ended thread's ident is given to the next one)

    def _serve_taken(self, poller: zmq.Poller, events: dict[Any, int]) -> None:
        """Read the sockets other threads gave this one; close those no longer wanted."""
        while self._given:
            sock, wanted = self._given.popleft()
            self._taken[sock] = wanted
            poller.register(sock, zmq.POLLIN)
            self._drain(sock, self.on_reply)  # (its reply may be there already)
        for sock, wanted in list(self._taken.items()):
            if sock in events:
                self._drain(sock, self.on_reply)
            if not wanted():
                poller.unregister(sock)
                del self._taken[sock]
                sock.close(linger=0)

    def _close(self, lanes: DirectLanes | None) -> None:
        if lanes is not None:  # (first: from then on, no socket is given to this thread)
            lanes.close_heres()
            # (before the goodbye, on which the controller marks what this client sent to
            # lanes and did not report as answered unknown)
            with self._send_lock:
                lanes.flush(self._sender)
        self._notify(protocol.GOODBYE_NOTICE)
        with self._send_lock:
            if lanes is not None:
                lanes.flush(self._sender)  # (what other threads noted meanwhile)
                lanes.close()
            self._sender.close(linger=1000)
            self._wake_out.close(linger=0)
        for sock in (self.dealer, self.sub, self._wake_in, self.hb, *self._taken):
            if sock is not None:
                sock.close(linger=0)
        while self._given:
            self._given.popleft()[0].close(linger=0)
        if lanes is None:
            self.context.term()
        else:  # (once the threads' own sockets are closed: term would wait for them)
            lanes.after_heres(HERE_CLOSE_WAIT, self.context.term)

    def _run_calls(self) -> None:
        while True:
            try:
                self._wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while self._calls:
            self._safely(self._calls.popleft())

    def _drain(self, sock: zmq.Socket[Any], handler: Callable[[list[Any]], None]) -> None:
        for i in range(1000):
            # (the poll said a message waits; after it, the socket's events say whether
            # another does: cheaper than the zmq.Again a receive raises, in the IO
            # thread's steps between waking a caller and letting it run)
            if i and not int(sock.getsockopt(wire.EVENTS)) & wire.POLLIN:
                return
            try:
                frames = wire.recv_frames(sock, wire.NOBLOCK)
            except zmq.Again:
                return
            if wire.is_batch(frames):
                bulk = self.on_replies if sock is self.dealer else None
                self._batch(handler, frames, bulk)
            else:
                self._safely(handler, frames)

    def _batch(
        self,
        handler: Callable[[list[Any]], None],
        frames: list[Any],
        bulk: Callable[[list[list[Any]]], None] | None = None,
    ) -> None:
        """Several messages the controller sent at once (its replies gathered in one loop
        turn, see ``kernel_engine.controller.outbox``): given to ``bulk`` together, else
        each handled as if alone."""
        try:
            messages = wire.unpack_batch(frames)
        except wire.MessageError as exc:
            self.drops.drop(str(exc))
            return
        if bulk is not None:
            self._safely(bulk, messages)
            return
        for message in messages:
            self._safely(handler, message)

    def _safely(self, call: Callable[..., None], *args: Any) -> None:
        """Run ``call(*args)``; what it raises is counted (the first one logged in full)."""
        try:
            call(*args)
        except wire.MessageError as exc:
            self.drops.drop(str(exc))
        except Exception as exc:
            if not self.drops.total:
                log.exception("jupyter-px client: error handling a message")
            self.drops.drop(f"{type(exc).__name__}: {exc}")

    # ----- liveness

    def _heartbeat(self) -> None:
        """Every interval: count the last ping if it went unanswered, then ping again."""
        if self.hb is None:
            return
        self._missed = 0 if self._pong == self._ping else self._missed + 1
        if self._missed >= MAX_MISSED and not self.lost:
            span = self._missed * HEARTBEAT_EVERY
            self._lost_by_heartbeat = True
            self._set_lost(
                f"lost contact with the controller at {self.address}: no heartbeat for {span:.0f} s"
            )
        self._ping += 1
        try:
            self.hb.send(b"%d" % self._ping, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _ping_now(self) -> None:
        """Ping at once (IO thread), between the regular pings."""
        if self.hb is None:
            return
        self._ping += 1
        try:
            self.hb.send(b"%d" % self._ping, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_echo(self, frames: list[Any]) -> None:
        if len(frames) != 1 or frames[0].bytes != b"%d" % self._ping:
            return
        self._pong = self._ping
        self._missed = 0
        if not self.lost:
            return
        if self._local and self._controller_pid:
            # an echo on the old port: a controller restarted there, or the old one
            # after a pause; the connection file says which, and that it runs
            pid = self.successor()
            if pid is None:
                return
            self._answering_pid = pid
        # answers again: the transport rejoins (and then calls back())
        self._safely(self.on_answer)

    @property
    def lost_by_heartbeat(self) -> bool:
        """Whether the controller is lost because its heartbeat went unanswered (paused,
        or out of reach) rather than known to be gone (its process ended)."""
        return bool(self.lost) and self._lost_by_heartbeat

    def back(self) -> None:
        """The client is in step with the controller that answers again (IO thread; the
        transport calls it once it has rejoined): nothing is lost any more, and whoever
        waits in :meth:`wait_back` wakes up."""
        pid = self._answering_pid
        if pid and pid != self._controller_pid:
            log.warning("jupyter-px client: a new controller (pid %i) took over", pid)
            self._controller_pid = pid
        self.lost = None
        self._lost_by_heartbeat = False
        log.warning("jupyter-px client: the controller at %s answers again", self.address)
        with self._back:
            self._backs += 1
            self._back.notify_all()

    def successor(self) -> int | None:
        """The PID of the controller the connection file names, if it runs and serves
        this client's cluster (the same key); None if not, or not known (any thread)."""
        if not self._connection_file:
            return None
        try:
            with open(self._connection_file) as f:
                info = json.load(f)
            pid = int(info.get("controller_pid") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if info.get("key") != self.wire.key.decode() or not processes.running(pid):
            return None
        return pid

    def wait_back(self, timeout: float, only_if_restarted: bool = False) -> bool:
        """Wait up to ``timeout`` s for a lost controller to answer again and the client
        to rejoin it; whether that happened (any thread but this one, which would wait
        for itself). ``only_if_restarted``: return at once unless the connection file
        names a running controller other than the lost one (a dead controller costs no
        wait)."""
        with self._back:
            backs = self._backs
        if not self.lost:
            return True
        if threading.current_thread() is self.thread or timeout <= 0:
            return False
        if only_if_restarted:
            pid = self.successor() if self._local and self._controller_pid else None
            if pid is None or pid == self._controller_pid:
                return False
        self.call_soon(self._ping_now)
        deadline = time.monotonic() + timeout
        with self._back:
            while self._backs == backs and self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._back.wait(min(left, 0.1))
                if self._backs == backs:
                    self.call_soon(self._ping_now)
        return not self.lost

    def notice_lost(self, timeout: float = 5.0) -> bool:
        """Have the IO thread look at the controller now, rather than at its next check
        (any other thread; a caller that knows it died, and restarts it, needs the client
        to have noticed first, or the client would rejoin nothing); whether it noticed it
        gone within ``timeout`` seconds."""
        if self.lost:
            return True
        if threading.current_thread() is self.thread:
            return False
        self.call_and_wait(self._check_controller, timeout)
        return bool(self.lost)

    def _check_controller(self) -> None:
        """A controller on this machine that has exited fails everything still waiting."""
        if not (self._local and self._controller_pid):
            return
        if self.lost and not self._lost_by_heartbeat:
            return
        if not processes.running(self._controller_pid):
            gone = f"the controller (pid {self._controller_pid}) is gone"
            self._lost_by_heartbeat = False
            if self.lost:  # (lost by heartbeat first: paused, then killed; what waits
                self.lost = gone  # for it to answer again, in _back_in_time, stops)
                return
            self._set_lost(gone)

    def _set_lost(self, reason: str) -> None:
        self.lost = reason
        self._answering_pid = 0
        self._safely(self.on_lost, reason)

    def stop(self, timeout: float = 5.0) -> None:
        self._running = False
        if threading.current_thread() is not self.thread:
            self.call_soon(lambda: None)  # wake the thread up now
            self.thread.join(timeout)
