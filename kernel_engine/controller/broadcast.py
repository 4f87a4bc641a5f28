"""Broadcasts: one client message fanned out to many engines.

Sending the same work to N engines used to cost the client N messages: N headers to make
and sign, N sends, and N copies of every buffer through its socket. A broadcast request
(:class:`~kernel_engine.protocol.BroadcastRequest`, route ``b"broadcast"``) names the
targets and one msg_id per target, made by the client; its metadata and buffers are
those of the work itself. The controller turns it into one request per target, as if the
client had sent each to ``lane:N`` (an apply) or ``shell:N`` (an execute) itself:

- each part's header is the broadcast's, with the part's msg_id and message type; its
  parent, metadata and content frames are shared by all parts (the content encoded once)
  and its buffers are the very frames that came in, sent again without a copy; only the
  header and the signature (with the cluster key, over the four JSON parts) are made per
  target;
- each part then goes the way of a routed request (:meth:`.router.Router.forward`): a
  record in the hub, an entry in :class:`~.inflight.Inflight`, and a reply routed back to
  the client tagged with its engine. So an unknown or dead target fails its own part with
  an error naming it, an engine that dies fails only its parts, and the other parts run.

The replies to the parts go back to the client together, as one batch message, rather
than one by one (:mod:`.fanin`): the controller is told the parts' msg_ids (``expect``)
before the first part is sent. A client that asks for it (``fold_replies`` in the
broadcast's content, :data:`kernel_engine.replies.FOLD_ASKED`) gets an apply's replies of
one common shape folded into columns (:func:`kernel_engine.replies.pack`).

A broadcast is checked whole before any part is sent: its content field by field, its
metadata and parent as JSON objects, and its msg_ids against every msg_id seen lately or
recorded (the parts' ids join the window of seen ids, so a part cannot be replayed as a
request of its own). A broadcast that fails a check is refused whole, with an error reply
to the broadcast's own msg_id naming what is wrong; no part of it runs.

The fan-out is pure (:func:`fan_out`); :class:`Broadcasts` is the controller's component
around it, given only what it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kernel_engine import protocol, replies, wire
from kernel_engine.wire import DropLog, Message, SeenWindow

Forward = Callable[[bytes, str, int, Message, list[Any], bool], None]
"""``forward(client, channel, engine_id, message, frames, keep_request)``: send one part
the way a routed request goes (``frames`` from the signature on)."""


def fan_out(
    signer: wire.Wire, request: protocol.BroadcastRequest, header: dict[str, Any], frames: list[Any]
) -> Iterator[tuple[int, Message, list[Any]]]:
    """Each target's part of a broadcast: ``(engine id, message, frames)``.

    ``header`` is the broadcast's header and ``frames`` its frames from the signature on.
    The parts' frames reuse the broadcast's parent, metadata and buffer frames (the same
    objects); each part's header names its own msg_id and is signed with ``signer``'s key.
    """
    parent, metadata = wire.as_bytes(frames[2]), wire.as_bytes(frames[3])
    content = wire.dumps_json(request.content)
    buffers = frames[5:]
    for eid, msg_id in zip(request.targets, request.msg_ids):
        part_header = {**header, "msg_id": msg_id, "msg_type": request.msg_type}
        parts = [wire.dumps_json(part_header), parent, metadata, content]
        part = [signer.sign(parts), *parts, *buffers]
        yield eid, Message(header=part_header, frames=part), part


class Broadcasts:
    """Checks broadcast requests and sends their parts on.

    Parameters
    ----------
    signer
        Signs the parts and the controller's error replies (the cluster key).
    forward
        Sends one part as a routed request (see :data:`Forward`).
    seen
        The window of msg_ids seen lately (the parts' ids are added to it).
    known
        Whether a msg_id is recorded already (a task record, or in flight).
    send_client
        Sends frames on the client socket (the refusal of a bad broadcast).
    drops
        Counts refused broadcasts.
    keep_bytes
        When the buffers times the parts add up to more than this many bytes, the parts
        are recorded without their request frames (each record would keep a copy: one
        broadcast of 10,000 parts could otherwise write gigabytes to the task store).
    expect
        ``expect(client, msg_ids, fold)``: told the parts' msg_ids before any is sent
        (their replies are gathered, see :class:`~.fanin.FanIn`; ``fold``: the client
        asked for an apply's replies folded, see :data:`kernel_engine.replies.FOLD_ASKED`).
    """

    def __init__(
        self,
        signer: wire.Wire,
        forward: Forward,
        seen: SeenWindow,
        known: Callable[[str], bool],
        send_client: Callable[[list[Any]], None],
        drops: DropLog,
        keep_bytes: int = protocol.MAX_STORED_RESULT,
        expect: Callable[[bytes, Sequence[str], bool], None] | None = None,
    ):
        self.signer = signer
        self.forward = forward
        self.seen = seen
        self.known = known
        self.send_client = send_client
        self.drops = drops
        self.keep_bytes = keep_bytes
        self.expect = expect

    def check(self, msg: Message) -> protocol.BroadcastRequest:
        """The broadcast's request, if every check passes (else TypeError/ValueError,
        :class:`~kernel_engine.wire.MessageError` included, saying what is wrong)."""
        request = protocol.BroadcastRequest.from_content(msg.content)
        _ = msg.parent_header, msg.metadata  # (each part carries them: JSON objects)
        for msg_id in request.msg_ids:
            if msg_id == msg.msg_id or msg_id in self.seen or self.known(msg_id):
                raise ValueError(f"msg_id {msg_id[:64]} was seen before (a replay or a duplicate)")
        return request

    def submit(self, client: bytes, msg: Message, frames: list[Any]) -> None:
        """A client's broadcast (``frames``: from the signature on): refused whole, or
        each part forwarded to its engine."""
        try:
            request = self.check(msg)
        except (TypeError, ValueError) as exc:
            why = f"invalid broadcast: {str(exc)[:300]}"
            self.drops.drop(why[:120])
            ename = "TypeError" if isinstance(exc, TypeError) else "ValueError"
            self.send_client(protocol.fail_reply(self.signer, client, msg.header, None, ename, why))
            return
        for msg_id in request.msg_ids:
            self.seen.add(msg_id)
        # (for the whole broadcast: each part's record would keep its own copy)
        keep = sum(len(f) for f in frames[5:]) * len(request.targets) <= self.keep_bytes
        channel = request.channel
        if self.expect is not None:
            fold = request.channel == "lane" and msg.content.get(replies.FOLD_ASKED) is True
            self.expect(client, request.msg_ids, fold)
        for eid, part, part_frames in fan_out(self.signer, request, msg.header, frames):
            self.forward(client, channel, eid, part, part_frames, keep)
