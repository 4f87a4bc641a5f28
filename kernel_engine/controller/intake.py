"""Batches of load-balanced tasks: one client message carrying many tasks.

A client sends the tasks of a map in batch messages on the ``lb`` route,
``[client, b"lb", BATCH, index, joined, big frames...]``
(:func:`kernel_engine.wire.pack_batch`), at most
:data:`~kernel_engine.protocol.MAX_SUBMIT_BATCH` tasks each. Every task is a whole signed
message of its own (signature onwards), with its own msg_id, header, metadata and
buffers: the batch saves the client and the controller a send, a receive and a wake-up
per task, and nothing after this edge knows that tasks came together (records, retries,
dependencies, resubmits and the engines see single tasks, signed by the client, which the
controller forwards without re-signing).

Each task is checked as a single request is at the edge (``Controller.from_client``): its
signature before anything of it is parsed, its header, a msg_id seen neither lately nor in
the records, a message type the route serves. A task that fails is refused alone: with
an error reply to its msg_id once its signature holds; dropped and logged when it does
not (nothing unauthenticated is answered). A batch whose framing is wrong (an index that
does not match its frames or names too few frames a task, too many tasks, a route other
than ``lb``) is dropped whole and logged: nothing in it can be trusted to name whom to
answer. The size bound also bounds the work one message costs the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kernel_engine import protocol, wire
from kernel_engine.wire import DropLog, Message, SeenWindow

TASK_FRAMES = 5
"""Frames of the smallest task in a batch: signature, header, parent, metadata, content."""


class BatchIntake:
    """Checks the tasks of a client's batch message, one by one.

    Parameters
    ----------
    wire
        Verifies the tasks' signatures; packs the refusals.
    seen
        The window of msg_ids seen lately (a replay is refused), shared with the edge.
    known
        Whether a msg_id is taken already (a record, or a request in flight).
    send_client
        Sends frames on the client socket.
    drops
        Counts dropped input.
    """

    def __init__(
        self,
        wire: wire.Wire,
        seen: SeenWindow,
        known: Callable[[str], bool],
        send_client: Callable[[list[Any]], None],
        drops: DropLog,
    ):
        self.wire = wire
        self.seen = seen
        self.known = known
        self.send_client = send_client
        self.drops = drops

    def take(self, frames: list[Any]) -> tuple[bytes, list[tuple[Message, list[Any]]]]:
        """The client to answer and the tasks of a batch (``frames``: as received, from
        the sender's identity on) that passed, in order, each with its frames (signature
        onwards); the others are refused or dropped here."""
        client = protocol.reply_identity(wire.as_bytes(frames[0]))
        if wire.as_bytes(frames[1]) != protocol.LB_ROUTE:
            self.drops.drop("a batch on a route other than lb")
            return client, []
        try:
            parts = wire.unpack_batch(frames[2:], protocol.MAX_SUBMIT_BATCH, TASK_FRAMES)
        except wire.MessageError as exc:
            limit = f"at most {protocol.MAX_SUBMIT_BATCH} tasks of {TASK_FRAMES}+ frames"
            self.drops.drop(f"a client's batch: {exc} ({limit})")
            return client, []
        taken: list[tuple[Message, list[Any]]] = []
        for part in parts:
            try:
                msg = self.wire.unpack(part)
            except wire.MessageError as exc:
                self.drops.drop(f"a task in a batch: {exc}")
                continue
            if not self.seen.add(msg.msg_id) or self.known(msg.msg_id):
                why = f"msg_id {msg.msg_id} was seen before (a replay or a duplicate); ignored"
                self._refuse(client, msg, protocol.DUPLICATE, why)
            elif msg.msg_type not in protocol.SERVED["lb"]:
                why = f"lb does not serve {msg.msg_type[:60]!r} (nobody would answer it)"
                self._refuse(client, msg, "ValueError", why)
            else:
                taken.append((msg, part))
        return client, taken

    def _refuse(self, client: bytes, msg: Message, ename: str, why: str) -> None:
        if ename == protocol.DUPLICATE:
            self.drops.drop("a msg_id seen before (a replay or a duplicate)")
        self.send_client(protocol.fail_reply(self.wire, client, msg.header, None, ename, why))
