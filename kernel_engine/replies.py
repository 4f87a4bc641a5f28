"""Several engines' task replies to one client as one message, which the controller signs.

Sent whole, even many to one batch message (:mod:`kernel_engine.controller.outbox`), each
engine reply cost its client nine frames received as objects, a signature checked and four
JSON parts parsed before its result was read: 44 us to check and parse, measured on 256
apply replies (and 30 us to send and receive them over an inproc pair). A broadcast to 32
engines paid that 32 times. So the replies to a broadcast's parts, which the controller
holds to send together (:mod:`kernel_engine.controller.fanin` tags them), go as one
message of :data:`REPLIES`::

    content = {"replies": [[parent_msg_id, engine_id, msg_type, metadata, content,
                            n_buffers], ...]}
    buffers = every reply's buffers, in order (passed on without a copy)

which costs the client about 8 us a reply (3 to send and receive, 5 to parse) and the
controller about 13 to check each reply before it vouches for it with its own signature:
the engine's signature (an engine's port, once the engine is dead, may be taken by any
local process, and the controller's socket reconnects to it; the router has checked it
too, but what this module signs it checks itself), the engine's header (an
``apply_reply``), the content as a JSON object (the router has parsed the parent header and
metadata already: :class:`EngineReply` keeps what it read), and a nesting depth that the
client can read at any stack depth (:data:`MAX_DEPTH`). What was not tagged (a reply the
controller made itself, a reply to a request that is not an apply) or what fails a check
goes whole, in its place, for the client to check or refuse as before: the order of a
client's messages is kept.

Load-balanced replies are not merged, though the outbox gathers them too: a map on 2
engines of this 2-core machine is bound by the controller, and merging moved work there
(the client saved about 25 us a task and the controller spent 15 to 40 more; 10,000-task
maps, four alternated runs each way: no faster).

The client reads each entry as it would the reply itself (:class:`Reply` has the
attributes of a :class:`~kernel_engine.wire.Message` that reading a reply uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from . import wire
from .protocol import APPLY_REPLY, HUB_ROUTE, MERGED_REPLIES
from .wire import MessageError, Wire

REPLIES = MERGED_REPLIES
"""The msg_type of a message carrying several engines' replies, route ``hub``; sent only
to a client that said it reads them (:class:`~kernel_engine.protocol.ConnectRequest`)."""

MAX_REPLIES = wire.MAX_BATCH
"""Replies one such message may carry (a message claiming more is dropped whole)."""

MAX_DEPTH = 200
"""Brackets and braces (``[`` and ``{``, counted anywhere) that a reply's metadata and content
may hold together to be merged: an upper bound on their nesting, which the merged message
deepens by three levels. A deeper reply alone fails to parse on the client (Python's
JSON parser recurses); merged, it would take the others down with it."""

_APPLY_REPLY = b'"%s"' % APPLY_REPLY.encode()


class EngineReply(list[Any]):
    """An engine's reply to a task as the router forwards it, ``[client, route, DELIM,
    signature, header, parent, metadata, content, *buffers]``, with what the router read
    of it: ``head`` = (parent msg_id, engine id, metadata frame as bytes)."""

    __slots__ = ("head",)
    head: tuple[str, int, bytes]


def tag(frames: list[Any], msg_id: str, engine_id: int, metadata: bytes) -> EngineReply:
    """``frames`` (an apply reply of engine ``engine_id``, whose parent is ``msg_id`` and
    whose metadata frame, already parsed as a JSON object, is ``metadata``) as a reply
    that may be sent with others."""
    out = EngineReply(frames)
    out.head = (msg_id, engine_id, metadata or b"{}")  # (an empty part reads as {})
    return out


@dataclass(slots=True)
class Reply:
    """One engine's reply, as carried in a :data:`REPLIES` message."""

    parent_id: str
    msg_type: str
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Any]


def _entry(wire_: Wire, frames: Any) -> bytes | None:
    """The JSON entry of a tagged reply, or None for anything to send whole."""
    if type(frames) is not EngineReply or len(frames) < 8:
        return None
    msg_id, engine_id, metadata = frames.head
    try:
        header_bytes, _, _, content = wire_.verify(frames[3:])
    except MessageError:
        return None
    content = content or b"{}"  # (an empty part reads as {})
    depth = sum(part.count(b"{") + part.count(b"[") for part in (metadata, content))
    if depth > MAX_DEPTH or _APPLY_REPLY not in header_bytes:
        return None
    try:
        header = wire.check_header(wire.loads_json(header_bytes, "header"))
        wire.loads_object(content, "content")
    except MessageError:
        return None
    if header["msg_type"] != APPLY_REPLY:
        return None
    return b"[%s,%d,%s,%s,%s,%d]" % (
        encode_basestring_ascii(msg_id).encode(),
        engine_id,
        _APPLY_REPLY,
        metadata,
        content,
        len(frames) - 8,
    )


def pack(wire_: Wire, messages: Sequence[list[Any]]) -> list[list[Any]]:
    """The messages that carry ``messages``, to one client (each ``[client, route, DELIM,
    signature, ...]`` as the outbox takes them), in their order: each run of two or more
    tagged replies as one :data:`REPLIES` message, anything else whole."""
    if len(messages) < 2:
        return list(messages)
    out: list[list[Any]] = []
    run: list[tuple[list[Any], bytes]] = []  # (frames, entry)
    for frames in messages:
        entry = _entry(wire_, frames)
        if entry is None or len(run) == MAX_REPLIES:
            _flush(wire_, run, out)
        if entry is None:
            out.append(frames)
        else:
            run.append((frames, entry))
    _flush(wire_, run, out)
    return out


def _flush(wire_: Wire, run: list[tuple[list[Any], bytes]], out: list[list[Any]]) -> None:
    """Append ``run``'s replies to ``out`` (as one message when there are several), and
    empty it."""
    if len(run) == 1:
        out.append(run[0][0])
    elif run:
        buffers: list[Any] = []
        for frames, _ in run:
            buffers.extend(frames[8:])
        content = b'{"replies":[%s]}' % b",".join(entry for _, entry in run)
        client = run[0][0][0]
        out.append(wire_.pack(REPLIES, content, buffers=buffers, idents=[client, HUB_ROUTE])[1])
    run.clear()


Row = tuple[str, int, str, dict[str, Any], dict[str, Any], int]
"""An entry of a :data:`REPLIES` message, checked: (parent msg_id, engine id, msg_type,
metadata, content, number of buffers)."""


def rows(msg: wire.Message) -> tuple[list[Row], list[Any]]:
    """The entries a verified :data:`REPLIES` message carries, each checked, and its
    buffers (each entry's ``n`` of them in turn).

    Raises :class:`~kernel_engine.wire.MessageError` when it is malformed (nothing is
    unpacked then)."""
    entries = msg.content.get("replies")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_REPLIES:
        raise MessageError("malformed replies: no list of replies")
    buffers = msg.buffers
    left = len(buffers)
    for entry in entries:
        if type(entry) is not list or len(entry) != 6:
            raise MessageError("malformed replies: an entry is not a reply")
        msg_id, engine_id, msg_type, metadata, content, n = entry
        if not (
            type(msg_id) is str
            and type(engine_id) is int
            and type(msg_type) is str
            and type(metadata) is dict
            and type(content) is dict
            and type(n) is int
            and 0 <= n <= left
        ):
            raise MessageError("malformed replies: an entry is not a reply")
        left -= n
    if left:
        raise MessageError("malformed replies: buffers left over")
    return entries, buffers


def unpack(msg: wire.Message) -> list[tuple[int, Reply]]:
    """(engine id, reply) for each reply a verified :data:`REPLIES` message carries.

    Raises :class:`~kernel_engine.wire.MessageError` when it is malformed (nothing is
    unpacked then)."""
    entries, buffers = rows(msg)
    out: list[tuple[int, Reply]] = []
    pos = 0
    for msg_id, engine_id, msg_type, metadata, content, n in entries:
        out.append((engine_id, Reply(msg_id, msg_type, metadata, content, buffers[pos : pos + n])))
        pos += n
    return out
