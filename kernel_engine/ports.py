"""Ports for engine kernels on this machine, taken outside the system's ephemeral range.

jupyter_client picks a kernel's five ports by binding port 0 and closing the socket; the
kernel binds them a moment later. Port 0 is in the ephemeral range, the one every
outgoing TCP connection takes its local port from, so in between a connection (the
controller's to another engine, a client's to the controller) may take one, and the
kernel then fails with "Address already in use". With many engines started at once the
moment is long enough for that to happen. The ports here come from a range the system
never hands out by itself (below the ephemeral range, else above it), are checked free by
binding, and are not handed out twice by this process while in use.
"""

from __future__ import annotations

import random
import socket
import threading

EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST = 10_000  # below this, services' well-known ports are common
TRIES = 200


def ephemeral_range(path: str = EPHEMERAL) -> tuple[int, int]:
    """The system's range for outgoing connections' ports (Linux's default if unknown)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def quiet_range(ephemeral: tuple[int, int]) -> tuple[int, int] | None:
    """The ports to take from, ``(first, last)``, given the ephemeral range: below it if
    at least 5,000 are there, else above it if at least 2,000 are, else None (then the
    system's own choice)."""
    low, high = ephemeral
    if low - 1 - LOWEST >= 5000:
        return LOWEST, low - 1
    if 65535 - high >= 2000:
        return high + 1, 65535
    return None


class PortPicker:
    """Free ports for local kernels, each handed out once until given back."""

    def __init__(self, span: tuple[int, int] | None = None):
        self.span = span if span is not None else quiet_range(ephemeral_range())
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def take(self, ip: str) -> int:
        """A port free on ``ip`` now (the system's choice when none is found in the span)."""
        with self._lock:
            if self.span is not None:
                first, last = self.span
                for _ in range(TRIES):
                    port = random.randint(first, last)
                    if port not in self._taken and _free(ip, port):
                        self._taken.add(port)
                        return port
            while True:
                port = _bound_port(ip, 0)
                if port not in self._taken:
                    self._taken.add(port)
                    return port

    def give_back(self, port: object) -> None:
        with self._lock:
            self._taken.discard(port)  # type: ignore[arg-type]


def _bound_port(ip: str, port: int) -> int:
    with socket.socket() as sock:
        sock.bind((ip, port))
        return int(sock.getsockname()[1])


def _free(ip: str, port: int) -> bool:
    try:
        _bound_port(ip, port)
    except OSError:
        return False
    return True


PICKER = PortPicker()
