"""The wire: every message type jupyter-px sends, and how frames are packed and signed.

Messages are Jupyter messages (``idents..., <IDS|MSG>, hmac, header, parent, metadata,
content, buffers...``) signed with HMAC-SHA256 and the cluster's key, so ipykernel's own
``Session`` accepts what we send it and we accept what it sends. This module packs and
parses them with less work than ``jupyter_client.Session``: the header is parsed eagerly
(routing needs it), the other JSON parts only on first use, and dates stay ISO strings
until somebody asks for a ``datetime``.

Routing between client, controller and engines uses zmq identity frames in front of the
delimiter, never the signed parts, so the controller forwards frames without re-signing:

- client -> controller: one route frame (:func:`route_frame`) says where a request goes,
  ``b"lane:3"`` (engine 3's task lane), ``b"shell:3"``, ``b"control:3"``, ``b"hub"``
  (the controller itself) or ``b"lb"`` (the load-balancing scheduler);
- controller -> client: one frame names the engine that answered (``b"3"``) or ``b"hub"``.

A client on the engines' host may also send ``apply_request`` straight to an engine's task
lane (see ``jupyter_ext._lanes``). It sends from a socket whose identity ends in ``:s`` and
receives on a twin ending in ``:r``; the lane, like the controller, answers the twin
(:func:`reply_identity`). The client then tells the controller what it sent and what came
back, in batches (:data:`DIRECT_NOTICE`), so the hub's records stay complete.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zmq

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
SIGNATURE_SCHEME = "hmac-sha256"

# Requests a client sends to an engine's task lane, and their replies.
APPLY_REQUEST = "apply_request"
APPLY_REPLY = "apply_reply"
# The controller tells a newly started engine who it is (engine id, cluster id).
ENGINE_SETUP_REQUEST = "engine_setup_request"
ENGINE_SETUP_REPLY = "engine_setup_reply"
# Sent on an engine's control channel: do not run these msg_ids when they arrive.
ENGINE_ABORT_REQUEST = "px_abort_request"
ENGINE_ABORT_REPLY = "px_abort_reply"

# A client checks that a lane's replies reach it before sending tasks to it directly.
LANE_PING_REQUEST = "px_lane_ping_request"
LANE_PING_REPLY = "px_lane_ping_reply"

# Requests a client sends to the controller (route ``b"hub"``); each has a ``*_reply``.
CONNECT_REQUEST = "px_connect_request"
QUEUE_REQUEST = "px_queue_request"
RESULT_REQUEST = "px_result_request"
PURGE_REQUEST = "px_purge_request"
ABORT_REQUEST = "px_abort_request"
SIGNAL_REQUEST = "px_signal_request"
SHUTDOWN_REQUEST = "px_shutdown_request"
HISTORY_REQUEST = "px_history_request"
DB_REQUEST = "px_db_request"
START_REQUEST = "px_start_request"
HUB_REQUESTS = frozenset(
    {
        CONNECT_REQUEST,
        QUEUE_REQUEST,
        RESULT_REQUEST,
        PURGE_REQUEST,
        ABORT_REQUEST,
        SIGNAL_REQUEST,
        SHUTDOWN_REQUEST,
        HISTORY_REQUEST,
        DB_REQUEST,
        START_REQUEST,
    }
)
# A client's account of the tasks it sent to lanes directly (route ``b"hub"``, no reply):
# content ``{"submitted": [...], "completed": [...]}``, the completed tasks' reply frames
# joined into the buffers (see ``jupyter_ext._lanes``).
DIRECT_NOTICE = "px_direct_notice"
# Replies the controller keeps for other clients' ``get_result`` (larger ones are dropped).
MAX_STORED_RESULT = 1024 * 1024
# The identity of the controller's DEALER on each engine's lane (never ends in ``:s``).
CONTROLLER_IDENTITY = b"px-controller"

# Events the controller publishes to every client on its iopub socket.
EVENT_TOPIC = b"px.event"
ENGINE_REGISTERED = "px_engine_registered"
ENGINE_UNREGISTERED = "px_engine_unregistered"
CONTROLLER_STOPPING = "px_controller_stopping"
# Published for every connect request, so a new client knows its iopub subscription works.
IOPUB_WELCOME = "px_iopub_welcome"

# Error classes the controller or the lane report by name in an error reply's content
# (``"px_error"``), so the client raises the matching class of ``kernel_engine.errors``.
CONTROLLER_ERRORS = frozenset(
    {
        "EngineError",
        "TaskAborted",
        "TaskTimeout",
        "DependencyTimeout",
        "ImpossibleDependency",
        "InvalidDependency",
        "UnmetDependency",
        "NoEnginesRegistered",
        "InvalidTarget",
    }
)

HUB_ROUTE = b"hub"
LB_ROUTE = b"lb"
CHANNELS = ("lane", "shell", "control")


def reply_identity(sender: bytes) -> bytes:
    """Where replies to a client's request go.

    A client sends from one socket (any thread, under a lock) and receives on another
    (its IO thread); their identities end in ``:s`` and ``:r``. Other peers (a bare
    DEALER) get replies on the socket they sent from.
    """
    if sender.endswith(b":s"):
        return sender[:-1] + b"r"
    return sender


def endpoint(connection_info: dict[str, Any], port: int) -> str:
    """The zmq URL of ``port`` of a Jupyter connection info (``tcp`` or ``ipc``)."""
    ip = connection_info["ip"]
    if connection_info.get("transport", "tcp") == "ipc":
        return f"ipc://{ip}-{port}"
    return f"tcp://{ip}:{port}"


def route_frame(channel: str, engine_id: int) -> bytes:
    """The route frame a client puts before the delimiter to reach ``channel`` of an engine."""
    return f"{channel}:{engine_id}".encode()


def parse_route(frame: bytes) -> tuple[str, int | None]:
    """Split a route frame into (channel, engine id); ``("hub", None)`` for the controller."""
    if frame == HUB_ROUTE:
        return "hub", None
    if frame == LB_ROUTE:
        return "lb", None
    channel, _, eid = frame.partition(b":")
    return channel.decode("ascii", "replace"), int(eid)


def utcnow_iso() -> str:
    """The current time as the ISO 8601 string Jupyter headers carry."""
    return datetime.now(timezone.utc).isoformat()


def parse_date(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 string from a header or metadata as an aware ``datetime``."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def new_key() -> bytes:
    """A fresh HMAC key for a cluster."""
    return uuid.uuid4().hex.encode("ascii") + os.urandom(8).hex().encode("ascii")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps_json(obj: Any) -> bytes:
    """Compact JSON, the encoding of every JSON frame."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode(
        "utf8"
    )


_EMPTY = b"{}"


def _encode(part: dict[str, Any] | bytes | None) -> bytes:
    if not part:
        return _EMPTY
    if isinstance(part, bytes):
        return part
    return dumps_json(part)


def _as_bytes(frame: Any) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def split_idents(frames: Sequence[Any]) -> tuple[list[bytes], list[Any]]:
    """Split received frames at the delimiter into (identity frames, message frames)."""
    for i, frame in enumerate(frames[:32]):
        if len(frame) == len(DELIM) and _as_bytes(frame) == DELIM:
            return [_as_bytes(f) for f in frames[:i]], list(frames[i + 1 :])
    raise ValueError("no <IDS|MSG> delimiter in message")


class SignatureError(ValueError):
    """Raised when a message's HMAC signature does not match the cluster key."""


@dataclass
class Message:
    """A parsed message: header now, the other parts when first asked for."""

    header: dict[str, Any]
    frames: list[Any]
    idents: list[bytes] = field(default_factory=list)
    _parent: dict[str, Any] | None = None
    _metadata: dict[str, Any] | None = None
    _content: dict[str, Any] | None = None

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_header(self) -> dict[str, Any]:
        if self._parent is None:
            self._parent = json.loads(_as_bytes(self.frames[2]) or b"{}")
        return self._parent

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = json.loads(_as_bytes(self.frames[3]) or b"{}")
        return self._metadata

    @property
    def content(self) -> dict[str, Any]:
        if self._content is None:
            self._content = json.loads(_as_bytes(self.frames[4]) or b"{}")
        return self._content

    @property
    def buffers(self) -> list[Any]:
        return self.frames[5:]

    def as_dict(self) -> dict[str, Any]:
        """The message in ``jupyter_client.Session`` dict form (for ipykernel's set_parent)."""
        return {
            "header": self.header,
            "parent_header": self.parent_header,
            "metadata": self.metadata,
            "content": self.content,
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "buffers": self.buffers,
        }


class Wire:
    """Packs, signs, verifies and parses messages with one cluster key.

    Parameters
    ----------
    key
        The cluster's HMAC key; empty disables signing (never used by jupyter-px itself).
    session
        This peer's session id, written into every header it makes.
    username
        The header's ``username``.
    """

    def __init__(self, key: bytes, session: str | None = None, username: str = "jupyter-px"):
        self.key = key
        self.session = session or uuid.uuid4().hex
        self.username = username
        self._hmac = hmac.new(key, digestmod=hashlib.sha256) if key else None
        self._plain = all(c.isalnum() or c in "-_.:" for c in f"{self.session}{self.username}")

    def sign(self, parts: Sequence[Any]) -> bytes:
        """The hex HMAC of the four signed parts."""
        if self._hmac is None:
            return b""
        h = self._hmac.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def header(self, msg_type: str, msg_id: str | None = None) -> dict[str, Any]:
        """A fresh Jupyter header."""
        return {
            "msg_id": msg_id or uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": utcnow_iso(),
            "version": PROTOCOL_VERSION,
        }

    def pack(
        self,
        msg_type: str,
        content: dict[str, Any] | bytes | None = None,
        parent: dict[str, Any] | bytes | None = None,
        metadata: dict[str, Any] | bytes | None = None,
        buffers: Sequence[Any] = (),
        idents: Sequence[bytes] = (),
        header: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], list[Any]]:
        """Build a signed message; returns (header, frames ready for ``send_multipart``).

        ``content``, ``parent`` and ``metadata`` may be given already encoded (bytes from
        :func:`dumps_json`), so a map encodes its tasks' shared metadata once.
        """
        if header is None:
            header = self.header(msg_type)
            encoded_header = self._encode_header(header)
        else:
            encoded_header = dumps_json(header)
        parts = [encoded_header, _encode(parent), _encode(metadata), _encode(content)]
        return header, [*idents, DELIM, self.sign(parts), *parts, *buffers]

    def _encode_header(self, header: dict[str, Any]) -> bytes:
        """The JSON of a header this Wire made (plain ASCII fields: no escaping needed)."""
        if not (header["msg_type"].isidentifier() and self._plain):
            return dumps_json(header)
        return (
            f'{{"msg_id":"{header["msg_id"]}","msg_type":"{header["msg_type"]}",'
            f'"username":"{self.username}","session":"{self.session}",'
            f'"date":"{header["date"]}","version":"{PROTOCOL_VERSION}"}}'
        ).encode()

    def send(
        self,
        socket: zmq.Socket[Any],
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Any] = (),
        idents: Sequence[bytes] = (),
    ) -> dict[str, Any]:
        """Pack and send a message; returns its header."""
        header, frames = self.pack(msg_type, content, parent, metadata, buffers, idents)
        socket.send_multipart(frames, copy=False)
        return header

    def verify(self, msg_frames: Sequence[Any]) -> None:
        """Check the signature of message frames (those after the delimiter)."""
        if self._hmac is None:
            return
        if len(msg_frames) < 5:
            raise SignatureError(f"malformed message: {len(msg_frames)} frames after delimiter")
        signature = _as_bytes(msg_frames[0])
        expected = self.sign([_as_bytes(f) for f in msg_frames[1:5]])
        if not hmac.compare_digest(signature, expected):
            raise SignatureError("invalid HMAC signature")

    def unpack(self, msg_frames: list[Any], verify: bool = True) -> Message:
        """Parse message frames (after the delimiter) into a :class:`Message`."""
        if verify:
            self.verify(msg_frames)
        elif len(msg_frames) < 5:
            raise SignatureError(f"malformed message: {len(msg_frames)} frames after delimiter")
        header = json.loads(_as_bytes(msg_frames[1]))
        if not isinstance(header, dict):
            raise ValueError("message header is not a JSON object")
        return Message(header=header, frames=msg_frames)

    def recv(self, frames: list[Any], verify: bool = True) -> Message:
        """Split identities off received frames and parse the rest."""
        idents, msg_frames = split_idents(frames)
        msg = self.unpack(msg_frames, verify=verify)
        msg.idents = idents
        return msg


def error_content(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    """The content of an error reply that the controller or lane makes itself."""
    content: dict[str, Any] = {
        "status": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": traceback or [],
    }
    if ename in CONTROLLER_ERRORS:
        content["px_error"] = ename
    return content


BATCH = b"<PX|BATCH>"
"""First frame of a lane message that carries several messages (tasks or replies)."""


def pack_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """Frames of one lane message carrying several complete messages (each with idents)."""
    counts = dumps_json([len(m) for m in messages])
    frames: list[Any] = [BATCH, counts]
    for m in messages:
        frames.extend(m)
    return frames


def unpack_batch(frames: Sequence[Any]) -> list[list[Any]]:
    """The messages of a :func:`pack_batch` lane message (``frames`` starts at ``BATCH``)."""
    counts = json.loads(_as_bytes(frames[1]))
    out: list[list[Any]] = []
    pos = 2
    for n in counts:
        out.append(list(frames[pos : pos + n]))
        pos += n
    return out


def is_batch(frames: Sequence[Any], at: int = 0) -> bool:
    """Whether ``frames[at]`` is the batch marker."""
    return len(frames) > at and len(frames[at]) == len(BATCH) and _as_bytes(frames[at]) == BATCH
