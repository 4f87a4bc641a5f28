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


class Echo:
    """A ROUTER (``socket``, not bound yet) bound to a random port of ``ip``, that sends
    every message back to its sender."""

    def __init__(self, socket: zmq.Socket[Any], ip: str):
        self.socket = socket
        self.socket.linger = 0
        self.socket.maxmsgsize = 64  # pings are a few bytes; anything else is dropped
        self.socket.rcvhwm = self.socket.sndhwm = 1000
        self.port = self.socket.bind_to_random_port(f"tcp://{ip}")
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
