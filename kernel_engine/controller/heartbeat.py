"""The controller's heartbeat: an echo on its own thread, for clients to ping.

A client learns that its controller is gone when pings it sends here go unanswered (see
``jupyter_ext._io``). The echo runs in a thread of its own, not in the controller's event
loop, so a controller busy with a flood of requests still answers at once: only a
controller that is dead, stopped or cut off looks dead. (ipykernel's heartbeat works the
same way.)
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from kernel_engine import protocol
from kernel_engine.errors import ClusterError


def bind(socket: zmq.Socket[Any], ip: str, port: int, what: str) -> int:
    """Bind ``socket`` to ``port`` of ``ip`` (a random port if 0); returns the port.

    Raises
    ------
    ClusterError
        When that port is taken (a controller restarted on its cluster's ports).
    """
    if not port:
        return socket.bind_to_random_port(f"tcp://{ip}")
    try:
        socket.bind(f"tcp://{ip}:{port}")
    except zmq.ZMQError as exc:
        raise ClusterError(
            f"cannot bind the {what} port {ip}:{port} again ({exc.strerror}): another "
            "process holds it"
        ) from None
    return port


class Echo:
    """A ROUTER (``socket``, not bound yet) bound to ``port`` of ``ip`` (a random one if
    0), that sends every message back to its sender."""

    def __init__(self, socket: zmq.Socket[Any], ip: str, port: int = 0):
        self.socket = socket
        self.socket.linger = 0
        # pings are a few bytes; anything much larger drops its sender
        self.socket.maxmsgsize = protocol.HEARTBEAT_MAX_BYTES
        self.socket.rcvhwm = self.socket.sndhwm = 1000
        self.port = bind(self.socket, ip, port, "heartbeat")
        self.thread = threading.Thread(target=self._run, name="px-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy(self.socket, self.socket)
        except zmq.ZMQError:
            pass  # the context was terminated: the controller is closing
        finally:
            self.socket.close(linger=0)
