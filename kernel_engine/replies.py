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

A broadcast's replies are mostly alike: at 32 engines a noop's or a push's replies cost
the client about 13 us each, their metadata parsed as 32 JSON objects and their results
received as 32 frames. So a client that asks for it in its broadcast
(:data:`FOLD_ASKED`) gets those of one shape, an apply's ``{"status": "ok"}`` with a result
of one frame under :data:`FOLD_BELOW` bytes and an engine's metadata that printed nothing
(:data:`FOLD_KEYS`), folded into columns beside the entries::

    content = {"replies": [...], "folded": {"msg_ids": [...], "engine_ids": [...],
               "engine_uuids": [...], "started": [...], "completed": [...], "sizes": [...]}}
    buffers = the entries' buffers, then the folded results joined in one frame

The controller parses such a reply's metadata to fold it (about 2 us); the client checks
every column (its type, its length, the sizes adding up to the last frame) and reads each
folded reply as it would the reply whole (:func:`parts`). A message malformed in any
way is refused whole, naming the msg_ids it could read (:class:`MalformedReplies`), so that
the client fails those tasks instead of waiting for them.

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


FOLD_BELOW = 4096
"""Bytes of a result under which a reply may be folded (its one frame then travels joined
with the others'; results this small are not weighed by the client either)."""

FOLD_KEYS = frozenset(
    ("started", "completed", "engine_id", "engine_uuid", "stdout", "stderr", "status")
)
"""The keys of the metadata of a reply that may be folded: what an engine's lane sends."""

FOLD_COLUMNS = ("msg_ids", "engine_ids", "engine_uuids", "started", "completed", "sizes")
"""The columns of the folded replies of a :data:`REPLIES` message, one item a reply."""

FOLD_ASKED = "fold_replies"
"""The key of a broadcast request's content by which a client asks for its parts' replies
folded (``True``); a controller that does not know it sends them merged, as ever."""

_OK_CONTENT = b'{"status":"ok"}'


class MalformedReplies(MessageError):
    """Raised when a :data:`REPLIES` message is malformed; ``msg_ids`` are the parents
    that could be read of it (their requests are failed, not left waiting)."""

    def __init__(self, why: str, msg_ids: Sequence[str] = ()):
        super().__init__(f"malformed replies: {why}")
        self.msg_ids = list(msg_ids)


class EngineReply(list[Any]):
    """An engine's reply to a task as the router forwards it, ``[client, route, DELIM,
    signature, header, parent, metadata, content, *buffers]``, with what the router read
    of it: ``head`` = (parent msg_id, engine id, metadata frame as bytes); ``fold``:
    whether its client reads it folded (see :func:`pack`)."""

    __slots__ = ("fold", "head")
    head: tuple[str, int, bytes]
    fold: bool


def tag(
    frames: list[Any], msg_id: str, engine_id: int, metadata: bytes, fold: bool = False
) -> EngineReply:
    """``frames`` (an apply reply of engine ``engine_id``, whose parent is ``msg_id`` and
    whose metadata frame, already parsed as a JSON object, is ``metadata``) as a reply
    that may be sent with others (``fold``: folded, for a client that asked)."""
    out = EngineReply(frames)
    out.head = (msg_id, engine_id, metadata or b"{}")  # (an empty part reads as {})
    out.fold = fold
    return out


Folded = tuple[str, int, str, str, str, bytes]
"""A reply folded: (parent msg_id, engine id, engine_uuid, started, completed, result)."""


@dataclass(slots=True)
class Reply:
    """One engine's reply, as carried in a :data:`REPLIES` message."""

    parent_id: str
    msg_type: str
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Any]


def _entry(wire_: Wire, frames: Any) -> bytes | Folded | None:
    """The JSON entry of a tagged reply (or the reply folded), or None for anything to
    send whole."""
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
    if frames.fold and len(frames) == 9 and content == _OK_CONTENT:
        folded = _folded(msg_id, engine_id, metadata, wire.as_bytes(frames[8]))
        if folded is not None:
            return folded
    return b"[%s,%d,%s,%s,%s,%d]" % (
        encode_basestring_ascii(msg_id).encode(),
        engine_id,
        _APPLY_REPLY,
        metadata,
        content,
        len(frames) - 8,
    )


def _folded(msg_id: str, engine_id: int, metadata: bytes, result: bytes) -> Folded | None:
    """The reply folded, if it is of the one shape folded: ``{"status": "ok"}`` with a
    small result of one frame, and an engine's metadata with nothing printed."""
    if len(result) >= FOLD_BELOW:
        return None
    try:
        md = wire.loads_json(metadata, "metadata")
    except MessageError:
        return None
    if type(md) is not dict or md.keys() != FOLD_KEYS:
        return None
    uuid, started, completed = md["engine_uuid"], md["started"], md["completed"]
    if (
        type(md["engine_id"]) is int
        and md["engine_id"] == engine_id
        and md["status"] == "ok"
        and md["stdout"] == ""
        and md["stderr"] == ""
        and type(uuid) is str
        and type(started) is str
        and type(completed) is str
    ):
        return msg_id, engine_id, uuid, started, completed, result
    return None


def pack(wire_: Wire, messages: Sequence[list[Any]]) -> list[list[Any]]:
    """The messages that carry ``messages``, to one client (each ``[client, route, DELIM,
    signature, ...]`` as the outbox takes them), in their order: each run of two or more
    tagged replies as one :data:`REPLIES` message, anything else whole."""
    if len(messages) < 2:
        return list(messages)
    out: list[list[Any]] = []
    run: list[tuple[list[Any], bytes | Folded]] = []  # (frames, entry)
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


def _flush(wire_: Wire, run: list[tuple[list[Any], bytes | Folded]], out: list[list[Any]]) -> None:
    """Append ``run``'s replies to ``out`` (as one message when there are several), and
    empty it."""
    if len(run) == 1:
        out.append(run[0][0])
    elif run:
        buffers: list[Any] = []
        entries: list[bytes] = []
        folded: list[Folded] = []
        for frames, entry in run:
            if type(entry) is bytes:
                entries.append(entry)
                buffers.extend(frames[8:])
            else:
                folded.append(entry)  # type: ignore[arg-type]
        content = b'{"replies":[%s]' % b",".join(entries)
        if folded:
            *columns, results = zip(*folded)
            sizes = [len(result) for result in results]
            named = dict(zip(FOLD_COLUMNS, [*columns, sizes]))
            content += b',"folded":%s' % wire.dumps_json(named)
            buffers.append(b"".join(results))
        content += b"}"
        client = run[0][0][0]
        out.append(wire_.pack(REPLIES, content, buffers=buffers, idents=[client, HUB_ROUTE])[1])
    run.clear()


Row = tuple[str, int, str, dict[str, Any], dict[str, Any], int]
"""An entry of a :data:`REPLIES` message, checked: (parent msg_id, engine id, msg_type,
metadata, content, number of buffers)."""

Columns = tuple[list[str], list[int], list[str], list[str], list[str], list[bytes]]
"""The folded replies of a :data:`REPLIES` message, checked: their parents' msg_ids,
engine ids, engine_uuids, started, completed, and each one's result (one frame)."""


def rows(msg: wire.Message) -> tuple[list[Row], list[Any], Columns | None]:
    """The entries a verified :data:`REPLIES` message carries, each checked, its buffers
    (each entry's ``n`` of them in turn), and its folded replies.

    Raises :class:`MalformedReplies` when it is malformed (nothing is unpacked then)."""
    content = msg.content
    entries = content.get("replies")
    if not isinstance(entries, list):
        raise MalformedReplies("no list of replies", _readable(content))
    buffers = msg.buffers
    folded = content.get("folded")
    columns = None if folded is None else _columns(folded, buffers, content)
    if columns is not None:
        buffers = buffers[:-1]  # (the folded results, joined)
    if not 0 < len(entries) + (len(columns[0]) if columns else 0) <= MAX_REPLIES:
        raise MalformedReplies("no replies, or too many", _readable(content))
    left = len(buffers)
    for entry in entries:
        if type(entry) is not list or len(entry) != 6:
            raise MalformedReplies("an entry is not a reply", _readable(content))
        msg_id, engine_id, msg_type, metadata, content_, n = entry
        if not (
            type(msg_id) is str
            and type(engine_id) is int
            and type(msg_type) is str
            and type(metadata) is dict
            and type(content_) is dict
            and type(n) is int
            and 0 <= n <= left
        ):
            raise MalformedReplies("an entry is not a reply", _readable(content))
        left -= n
    if left:
        raise MalformedReplies("buffers left over", _readable(content))
    return entries, buffers, columns


def _columns(folded: Any, buffers: list[Any], content: dict[str, Any]) -> Columns:
    """The folded replies of ``content``, checked (``buffers``: the message's, the last
    of which joins their results)."""
    got = [folded.get(name) for name in FOLD_COLUMNS] if type(folded) is dict else [None]
    columns: list[list[Any]] = [column for column in got if type(column) is list]
    if len(columns) != len(FOLD_COLUMNS):
        raise MalformedReplies("folded replies without their columns", _readable(content))
    msg_ids, engine_ids, uuids, started, completed, sizes = columns
    n = len(msg_ids)
    if not n or any(len(column) != n for column in columns):
        raise MalformedReplies("folded columns of different lengths", _readable(content))
    for column, kind in (
        (msg_ids, str),
        (uuids, str),
        (started, str),
        (completed, str),
        (engine_ids, int),
        (sizes, int),
    ):
        if set(map(type, column)) != {kind}:
            raise MalformedReplies(f"a folded column not of {kind.__name__}s", _readable(content))
    if min(sizes) < 0 or not buffers or sum(sizes) != len(buffers[-1]):
        raise MalformedReplies("folded results that do not add up", _readable(content))
    joined = wire.as_bytes(buffers[-1])
    results, pos = [], 0
    for size in sizes:
        results.append(joined[pos : pos + size])
        pos += size
    return msg_ids, engine_ids, uuids, started, completed, results


def _readable(content: dict[str, Any]) -> list[str]:
    """The msg_ids that can be read of a malformed :data:`REPLIES` message's content."""
    out: list[str] = []
    entries = content.get("replies")
    if isinstance(entries, list):
        out += [e[0] for e in entries if type(e) is list and e and type(e[0]) is str]
    folded = content.get("folded")
    msg_ids = folded.get("msg_ids") if isinstance(folded, dict) else None
    if isinstance(msg_ids, list):
        out += [m for m in msg_ids if type(m) is str]
    return out[:MAX_REPLIES]


Part = tuple[str, int, str, dict[str, Any], dict[str, Any], list[Any]]
"""A reply of a :data:`REPLIES` message, checked: (parent msg_id, engine id, msg_type,
metadata, content, buffers)."""


def parts(msg: wire.Message) -> list[Part]:
    """Each reply a verified :data:`REPLIES` message carries: its entries, then its folded
    replies, each as the engine sent it.

    Raises :class:`MalformedReplies` when it is malformed (nothing is unpacked then)."""
    entries, buffers, columns = rows(msg)
    out: list[Part] = []
    pos = 0
    for msg_id, engine_id, msg_type, metadata, content, n in entries:
        out.append((msg_id, engine_id, msg_type, metadata, content, buffers[pos : pos + n]))
        pos += n
    if columns is not None:
        msg_ids, engine_ids, uuids, started, completed, results = columns
        for i, msg_id in enumerate(msg_ids):
            eid = engine_ids[i]
            metadata = {"started": started[i], "engine_id": eid, "engine_uuid": uuids[i]}
            metadata.update(stdout="", stderr="", completed=completed[i], status="ok")
            out.append((msg_id, eid, APPLY_REPLY, metadata, {"status": "ok"}, [results[i]]))
    return out


def unpack(msg: wire.Message) -> list[tuple[int, Reply]]:
    """(engine id, reply) for each reply a verified :data:`REPLIES` message carries.

    Raises :class:`~kernel_engine.wire.MessageError` when it is malformed (nothing is
    unpacked then)."""
    return [(eid, Reply(m, t, md, content, bufs)) for m, eid, t, md, content, bufs in parts(msg)]
