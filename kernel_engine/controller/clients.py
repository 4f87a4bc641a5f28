"""Which clients are still there: pure logic, events in, lost clients out.

A client's IO thread sends a keepalive notice every
:data:`~kernel_engine.protocol.KEEPALIVE_EVERY` seconds, and any message from it counts as
a sign of life. The controller calls :meth:`Clients.tick`
once a second; a client not heard from during ``timeout`` consecutive ticks is gone, and
so is one that said goodbye. Silence is counted in the controller's own ticks, not in
wall-clock time, so a controller that was itself paused (SIGSTOP, a long GC, a laptop lid)
never takes that pause for the clients' silence.

What a lost client leaves (queued tasks, dispatched ones) is the controller's to clean up:
see ``Controller._client_lost``.
"""

from __future__ import annotations


class Clients:
    """Clients heard from lately.

    Parameters
    ----------
    timeout
        Ticks (seconds) of silence after which a client is gone.
    """

    def __init__(self, timeout: int = 30):
        self.timeout = max(int(timeout), 1)
        self._silent: dict[bytes, int] = {}  # client -> ticks without a word from it
        self._heard: set[bytes] = set()

    def seen(self, client: bytes) -> None:
        """A message came from ``client`` (its reply identity)."""
        self._heard.add(client)

    def goodbye(self, client: bytes) -> bool:
        """``client`` said it closes; True if it was known (so is now gone)."""
        known = client in self._heard or client in self._silent
        self._heard.discard(client)
        self._silent.pop(client, None)
        return known

    def tick(self) -> list[bytes]:
        """One interval passed: the clients that are now gone (forgotten here)."""
        heard, self._heard = self._heard, set()
        gone = []
        for client in heard:
            self._silent[client] = 0
        for client, ticks in list(self._silent.items()):
            if client in heard:
                continue
            if ticks + 1 >= self.timeout:
                del self._silent[client]
                gone.append(client)
            else:
                self._silent[client] = ticks + 1
        return gone

    def __contains__(self, client: object) -> bool:
        return client in self._silent or client in self._heard

    def __len__(self) -> int:
        return len(self._silent.keys() | self._heard)
