"""The client's IO thread: the one owner of the client's sockets.

Thread ``jupyter-px-io`` (one per :class:`~jupyter_ext.Client`) polls three sockets: the
DEALER on which replies arrive and the SUB on the controller's iopub (engine output and
cluster events). Everything it receives is handed to the client's ``_on_reply`` /
``_on_iopub`` on this thread; those resolve futures, which wakes whoever waits on them.

Requests do not pass through this thread: user threads send them on a second DEALER,
one at a time under a lock (a zmq socket must not be used by two threads at once, and
this one is used by no thread but the sender of the moment). Its identity ends in ``:s``
and the receiving socket's in ``:r``, and the controller answers the ``:r`` twin, so a
blocking call costs one thread hand-off (the reply), not three.

On the engines' host, requests to engines' task lanes skip the controller: see
:mod:`jupyter_ext._lanes`, whose sockets this thread also owns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from kernel_engine import protocol

from ._lanes import LOCAL_IPS, DirectLanes, direct_enabled

log = logging.getLogger("jupyter_ext")

THREAD_NAME = "jupyter-px-io"


class IOThread:
    """Owns the sockets of one client; started on construction, stopped by :meth:`stop`."""

    def __init__(
        self,
        info: dict[str, Any],
        wire: protocol.Wire,
        on_reply: Callable[[list[Any]], None],
        on_iopub: Callable[[list[Any]], None],
        on_controller_lost: Callable[[str], None],
    ):
        self.context: zmq.Context[Any] = zmq.Context()
        # no high-water marks: pipelining many requests must not block the sending thread
        self.context.sndhwm = 0
        self.context.rcvhwm = 0
        self.on_reply = on_reply
        self.on_iopub = on_iopub
        self.on_controller_lost = on_controller_lost
        ip, transport = info["ip"], info.get("transport", "tcp")
        identity = os.urandom(8).hex().encode()
        url = f"{transport}://{ip}:{info['client_port']}"
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.identity = identity + b":r"
        self.dealer.connect(url)
        self._sender = self.context.socket(zmq.DEALER)
        self._sender.linger = 1000
        self._sender.identity = identity + b":s"
        self._sender.connect(url)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.rcvhwm = 0
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"{transport}://{ip}:{info['iopub_port']}")
        self._send_lock = threading.Lock()
        # work for this thread from others (call_soon), and the socket pair that wakes it
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_url = f"inproc://px-wake-{identity.decode()}"
        self._wake_in = self.context.socket(zmq.PAIR)
        self._wake_in.bind(self._wake_url)
        self._wake_out = self.context.socket(zmq.PAIR)
        self._wake_out.connect(self._wake_url)
        self.lanes: DirectLanes | None = None
        if direct_enabled(ip):
            self.lanes = DirectLanes(self.context, wire, identity, self.dealer, self._send_lock)
        self._controller_pid = int(info.get("controller_pid") or 0)
        self._local = ip in LOCAL_IPS
        self._running = True
        self.lost: str | None = None
        self.on_tick: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.thread.start()

    def send(
        self, frames: list[Any], track: bool = False, lane: zmq.Socket[Any] | None = None
    ) -> zmq.MessageTracker | None:
        """Queue frames (any thread) for the controller, or on ``lane`` (an engine's task
        lane, from :meth:`DirectLanes.start`); returns a tracker when ``track``.

        Notices of direct requests go first, so the controller never hears of anything of
        this client's before it knows of them.
        """
        with self._send_lock:
            sock = self._sender
            if lane is not None:
                sock = lane
            elif self.lanes is not None:
                self.lanes.flush(sock)
            if track:
                tracker: zmq.MessageTracker | None = sock.send_multipart(
                    frames, copy=False, track=True
                )
                return tracker
            sock.send_multipart(frames, copy=False)
        return None

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on this thread (which owns the sockets) soon."""
        self._calls.append(callback)
        with self._send_lock:
            if not self._wake_out.closed:  # else the thread has stopped (see stop)
                self._wake_out.send(b"", zmq.NOBLOCK)

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.dealer, self.sub, self._wake_in):
            poller.register(sock, zmq.POLLIN)
        next_check = time.monotonic() + 0.5
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
            if self._wake_in in events:
                self._run_calls()
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
            if now >= next_check:
                next_check = now + 0.5
                self._check_controller()
                try:
                    self.on_tick()
                except Exception:
                    log.exception("jupyter-px client: error in periodic check")
        with self._send_lock:
            if lanes is not None:
                lanes.flush(self._sender)
                lanes.close()
            self._sender.close(linger=1000)
            self._wake_out.close(linger=0)
        for sock in (self.dealer, self.sub, self._wake_in):
            sock.close(linger=0)
        self.context.term()

    def _run_calls(self) -> None:
        while True:
            try:
                self._wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception:
                log.exception("jupyter-px client: error in a call on the IO thread")

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handler: Callable[[list[Any]], None]) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:
                log.exception("jupyter-px client: error handling a message")

    def _check_controller(self) -> None:
        """A controller on this machine that has exited fails everything still waiting."""
        if self.lost or not (self._local and self._controller_pid):
            return
        if not process_alive(self._controller_pid):
            self.lost = f"the controller (pid {self._controller_pid}) is gone"
            self.on_controller_lost(self.lost)

    def stop(self, timeout: float = 5.0) -> None:
        self._running = False
        if threading.current_thread() is not self.thread:
            self.call_soon(lambda: None)  # wake the thread up now
            self.thread.join(timeout)


def process_alive(pid: int) -> bool:
    """Whether a local process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"
