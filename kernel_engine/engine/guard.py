"""The lane's door: only peers that know the cluster's key connect to the task lane.

The lane is read on the kernel's main thread. While a task runs there, whatever peers
send waits in the lane socket's queue, which zmq bounds by count (10,000 messages) but
not by size: without a login, any local process could have a busy engine hold gigabytes.
So the lane is a ZMQ PLAIN server. libzmq asks this process's ZAP handler (RFC 27), this
thread, about every new connection before any message of it reaches the lane; only
``LANE_USER`` with the lane's password (:func:`kernel_engine.wire.lane_password`,
derived from the key) gets in. Everyone else's handshake fails. Without a ZAP handler,
libzmq refuses every PLAIN peer, so a handler that is gone fails closed.

Not bounded by this: the handshake's own commands, which libzmq reads whole (of any size)
before it asks here. Engines on one host with their peers would need an ``ipc://`` lane
in a private folder for that (the operating system checks before libzmq reads).

The handler runs on a thread of its own: a peer connecting while a long task runs (a
client, a restarted controller) is let in at once.
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Any

import zmq

from kernel_engine import wire

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq sends a context's authentication requests (fixed by RFC 27)."""

STOP_TIMEOUT = 5.0


class LaneGuard:
    """Answers the ZAP requests of ``context``: PLAIN logins to ``domain`` with
    ``password`` pass, every other request is refused."""

    def __init__(
        self, context: zmq.Context[Any], password: bytes, domain: bytes = wire.LANE_DOMAIN
    ):
        self.context = context
        self.password = password
        self.domain = domain
        self.refused = 0
        self.errors = wire.DropLog(log, "lane guard: refused logins for errors")
        self._zap = context.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self._stop_endpoint = f"inproc://px-lane-guard-{id(self):x}"
        self._stop_in = context.socket(zmq.PAIR)
        self._stop_in.linger = 0
        self._stop_in.bind(self._stop_endpoint)
        self._thread = threading.Thread(target=self._run, name="px-lane-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._stop_in, zmq.POLLIN)
        stopped = False
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_in in events:
                    stopped = True
                    return
                self._serve_one()
        except BaseException:
            log.exception("lane guard: ended (new peers of the task lane are refused)")
            raise
        finally:
            if not stopped:
                log.error("lane guard: ended (new peers of the task lane are refused)")
            self._zap.close(linger=0)
            self._stop_in.close(linger=0)

    def _serve_one(self) -> None:
        """Read one request and answer it: a REP socket takes no new request before it
        has replied, so an answer that fails is a refusal, never a silence."""
        request = self._zap.recv_multipart()
        try:
            reply = self.answer(request)
        except Exception as exc:  # (a MemoryError in a nearly exhausted engine, say)
            self.errors.drop(f"{type(exc).__name__}: {exc}")
            reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"error", b"", b""]
        try:
            self._zap.send_multipart(reply)
        except zmq.ZMQError as exc:
            self.errors.drop(f"could not answer: {exc}")

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to ``request``: ``[version, request id, code, text, user, meta]``."""
        if len(request) < 6 or request[0] != b"1.0":
            self.refused += 1
            version = b"1.0"
            request_id = request[1] if len(request) > 1 else b""
            return [version, request_id, b"400", b"malformed request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if (
            domain == self.domain
            and mechanism == b"PLAIN"
            and len(credentials) == 2
            and hmac.compare_digest(credentials[0], wire.LANE_USER)
            and hmac.compare_digest(credentials[1], self.password)
        ):
            return [version, request_id, b"200", b"OK", wire.LANE_USER, b""]
        self.refused += 1
        return [version, request_id, b"400", b"not a peer of this cluster", b"", b""]

    def stop(self) -> None:
        """End the thread (its sockets closed, so the context can terminate)."""
        if not self._thread.is_alive():
            return
        with self.context.socket(zmq.PAIR) as stop:
            stop.linger = 0
            stop.connect(self._stop_endpoint)
            stop.send(b"")
            self._thread.join(STOP_TIMEOUT)
