"""What the controller sends its clients, gathered per client and sent once per loop turn.

A client running a map gets thousands of replies a second. Sent one by one, each cost the
controller a send (a quarter of its time, measured), and the client a receive and a
wake-up. So the controller's messages to a client wait in this outbox until the loop is
about to poll again (:attr:`~.loop.PollLoop.before_poll`), or until that client's share
fills (:data:`MAX_MESSAGES`, :data:`MAX_BYTES`), and then leave as one message: the only
one as it is, several as a batch ``[client, BATCH, counts, message frames...]``
(:func:`kernel_engine.wire.pack_batch`), each message whole (its route frame, delimiter
and signature as the engine or the controller made it). A lone request's reply is sent
in the same loop turn its engine's answer arrived in, so a round trip waits for nothing.

Only a jupyter-px client's receiving socket (identity ``<16 hex>:r``, see
:func:`kernel_engine.protocol.reply_identity`) is sent batches; any other peer (a tool of
its own speaking the protocol) gets the same messages one by one. Every message to a
client goes through here, so a client gets them in the order the controller sent them
(the replies to a broadcast's parts reach here together, once :mod:`.fanin` lets them
go).
"""

from __future__ import annotations

from typing import Any

import zmq

from kernel_engine import wire
from kernel_engine.wire import DropLog

MAX_MESSAGES = 256
"""Messages to one client gathered before they are sent at once."""

MAX_BYTES = 1 << 20
"""Bytes to one client gathered before they are sent at once (a large result goes at
once)."""


class Outbox:
    """Messages for clients, by client, until :meth:`flush`.

    Parameters
    ----------
    socket
        The controller's client socket (a ROUTER; frame 0 of a message names its client).
    drops
        Counts messages that could not be sent.
    """

    def __init__(self, socket: zmq.Socket[Any], drops: DropLog):
        self.socket = socket
        self.drops = drops
        self._queued: dict[bytes, list[list[Any]]] = {}
        self._bytes: dict[bytes, int] = {}

    def send(self, frames: list[Any]) -> None:
        """Queue ``[client, route, DELIM, signature, ...]`` for its client."""
        client = wire.as_bytes(frames[0])
        message = frames[1:]
        queued = self._queued.get(client)
        if queued is None:
            queued = self._queued[client] = []
            self._bytes[client] = 0
        queued.append(message)
        size = self._bytes[client] = self._bytes[client] + sum(map(len, message))
        if len(queued) >= MAX_MESSAGES or size >= MAX_BYTES:
            self._send(client, self._queued.pop(client))
            del self._bytes[client]

    def flush(self) -> None:
        """Send what is queued (one message per client)."""
        if not self._queued:
            return
        queued, self._queued = self._queued, {}
        self._bytes.clear()
        for client, messages in queued.items():
            self._send(client, messages)

    def _send(self, client: bytes, messages: list[list[Any]]) -> None:
        if len(messages) == 1:
            sends = [messages[0]]
        elif client.endswith(b":r"):
            sends = [wire.pack_batch(messages)]
        else:
            sends = messages
        try:
            for frames in sends:
                wire.send_frames(self.socket, [client, *frames])
        except zmq.ZMQError as exc:
            self.drops.drop(f"{len(messages)} message(s) for a client: {exc}")

    def __len__(self) -> int:
        return sum(map(len, self._queued.values()))
