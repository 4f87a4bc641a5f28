"""What the controller sends its clients, gathered per client and sent once per loop turn.

A client running a map gets thousands of replies a second. Sent one by one, each cost the
controller a send (a quarter of its time, measured), and the client a receive and a
wake-up. So the controller's messages to a client wait in this outbox until the loop is
about to poll again (:attr:`~.loop.PollLoop.before_poll`), or until that client's share
fills (:data:`MAX_MESSAGES`, :data:`MAX_BYTES`), and then leave as one message: the only
one as it is, several as a batch ``[client, BATCH, index, joined, big frames...]``
(:func:`kernel_engine.wire.pack_batch`), each message whole (its route frame, delimiter
and signature as the engine or the controller made it), but for the runs of a broadcast's
replies to a client that reads them merged: each run one message the controller signs
(:mod:`kernel_engine.replies`; it costs the client a seventh of what the replies whole
do). A lone request's reply is sent in the same loop turn its engine's answer arrived
in, so a round trip waits for nothing.

Only a jupyter-px client's receiving socket (identity ``<16 hex>:r``, see
:func:`kernel_engine.protocol.reply_identity`) is sent batches; any other peer (a tool of
its own speaking the protocol) gets the same messages one by one. Every message to a
client goes through here, so a client gets them in the order the controller sent them
(the replies to a broadcast's parts reach here together, once :mod:`.fanin` lets them
go).

A client that does not read what it is sent (a peer that never reads its replies, one
SIGSTOPped) must not grow the controller without bound: the socket holds at most
:data:`PIPE_MESSAGES` messages for one client (``router_mandatory``: a send past it fails
at once instead of blocking the loop or dropping silently); what does not fit waits here,
in order, and goes as the client reads; past :data:`MAX_BACKLOG_BYTES` waiting, that
client's waiting messages are dropped and logged, naming it, and the client is told first
thing when it reads again (:data:`~kernel_engine.protocol.REPLIES_DROPPED`): it then
asks for its tasks' outcomes anew, so that none of its results waits for ever.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import zmq

from kernel_engine import protocol, replies, wire
from kernel_engine.wire import DropLog, Wire

MAX_MESSAGES = 256
"""Messages to one client gathered before they are sent at once."""

MAX_BYTES = 1 << 20
"""Bytes to one client gathered before they are sent at once (a large result goes at
once)."""

PIPE_MESSAGES = 64
"""Messages the client socket holds for one client that has not read them (its
``sndhwm``; each up to about :data:`MAX_BYTES`, but for a single large one)."""

MAX_BACKLOG_BYTES = 128 << 20
"""Bytes waiting here for one client whose share of the socket is full, at most: past it,
they are dropped (the client reads nothing, or far too slowly)."""

MAX_MERGED = 100_000
"""Clients remembered as reading merged replies, at most: past it, the one that said so
longest ago is forgotten (and gets its replies whole, which it reads too, until it
connects again). Clients that leave are forgotten as they go."""


class Outbox:
    """Messages for clients, by client, until :meth:`flush`.

    Parameters
    ----------
    socket
        The controller's client socket (a ROUTER; frame 0 of a message names its client).
    drops
        Counts messages that could not be sent.
    signer
        Signs the messages that carry several task replies (:mod:`kernel_engine.replies`),
        which the clients that said they read them (:meth:`merge_for`) get instead: in a
        batch, each run of two or more replies to tasks as one message.
    """

    def __init__(self, socket: zmq.Socket[Any], drops: DropLog, signer: Wire | None = None):
        self.socket = socket
        self.drops = drops
        self.signer = signer
        self._merged: dict[bytes, None] = {}  # clients that read merged replies, oldest first
        self._queued: dict[bytes, list[list[Any]]] = {}
        self._bytes: dict[bytes, int] = {}
        # messages for clients whose share of the socket is full, in order, and their bytes
        self._backlog: dict[bytes, deque[list[Any]]] = {}
        self._backlog_bytes: dict[bytes, int] = {}

    def send(self, frames: list[Any]) -> None:
        """Queue ``[client, route, DELIM, signature, ...]`` for its client."""
        client = wire.as_bytes(frames[0])
        queued = self._queued.get(client)
        if queued is None:
            queued = self._queued[client] = []
            self._bytes[client] = 0
        queued.append(frames)
        size = self._bytes[client] = self._bytes[client] + sum(map(len, frames))
        if len(queued) >= MAX_MESSAGES or size >= MAX_BYTES:
            self._send(client, self._queued.pop(client))
            del self._bytes[client]

    def merge_for(self, client: bytes, merged: bool) -> None:
        """Whether ``client`` (a receiving identity) is sent its task replies merged."""
        self._merged.pop(client, None)
        if merged and self.signer is not None and client.endswith(b":r"):
            if len(self._merged) >= MAX_MERGED:
                del self._merged[next(iter(self._merged))]
            self._merged[client] = None

    def flush(self) -> None:
        """Send what is queued (one message per client), after what waits for clients
        that read slowly."""
        if self._backlog:
            self._send_backlog()
        if not self._queued:
            return
        queued, self._queued = self._queued, {}
        self._bytes.clear()
        for client, messages in queued.items():
            self._send(client, messages)

    def _send(self, client: bytes, messages: list[list[Any]]) -> None:
        if len(messages) > 1 and client.endswith(b":r"):
            if self.signer is not None and client in self._merged:
                messages = replies.pack(self.signer, messages)
            if len(messages) > 1:
                messages = [[client, *m] for m in wire.batches([m[1:] for m in messages])]
        if client in self._backlog:  # (behind what waits already: in order)
            self._hold(client, messages)
            return
        sent = 0
        try:
            for frames in messages:
                wire.send_frames(self.socket, frames, wire.NOBLOCK)
                sent += 1
        except zmq.Again:  # (its share of the socket is full: nothing of it was sent)
            self._hold(client, messages[sent:])
        except zmq.ZMQError as exc:
            self.drops.drop(f"{len(messages) - sent} message(s) for a client: {exc}")

    def _hold(self, client: bytes, messages: list[list[Any]]) -> None:
        """Keep ``messages`` for ``client`` until it reads; drop what it has waiting
        once that is more than :data:`MAX_BACKLOG_BYTES`."""
        backlog = self._backlog.get(client)
        if backlog is None:
            backlog = self._backlog[client] = deque()
            self._backlog_bytes[client] = 0
        backlog.extend(messages)
        size = self._backlog_bytes[client] + sum(sum(map(len, m)) for m in messages)
        self._backlog_bytes[client] = size
        if size > MAX_BACKLOG_BYTES:
            self.forget(client)
            who = protocol.client_uuid(client)
            self.drops.drop(
                f"{len(backlog)} message(s) for client {who}, which does not read them "
                f"({size >> 20} MiB waiting)"
            )
            if self.signer is not None:  # (first when it reads again: it asks anew)
                notice = self.signer.pack(
                    protocol.REPLIES_DROPPED,
                    {"messages": len(backlog)},
                    idents=[client, protocol.HUB_ROUTE],
                )[1]
                self._backlog[client] = deque([notice])
                self._backlog_bytes[client] = sum(map(len, notice))

    def _send_backlog(self) -> None:
        for client in list(self._backlog):
            backlog = self._backlog[client]
            try:
                while backlog:
                    frames = backlog[0]
                    wire.send_frames(self.socket, frames, wire.NOBLOCK)
                    backlog.popleft()
                    self._backlog_bytes[client] -= sum(map(len, frames))
            except zmq.Again:
                continue  # (still full: later)
            except zmq.ZMQError as exc:
                self.drops.drop(f"{len(backlog)} message(s) for a client: {exc}")
            self.forget(client)

    def forget(self, client: bytes) -> None:
        """Drop what waits for ``client`` (it is gone)."""
        self._backlog.pop(client, None)
        self._backlog_bytes.pop(client, None)

    def waiting(self, client: bytes) -> int:
        """Bytes waiting for ``client`` to read its share of the socket."""
        return self._backlog_bytes.get(client, 0)

    def __len__(self) -> int:
        return sum(map(len, self._queued.values()))
