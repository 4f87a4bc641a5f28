"""How messages travel: framing, signing, checking and parsing (what they mean is in
:mod:`kernel_engine.protocol`).

Messages are Jupyter messages (``idents..., <IDS|MSG>, hmac, header, parent, metadata,
content, buffers...``) signed with HMAC-SHA256 and the cluster's key, so ipykernel's own
``Session`` accepts what we send it and we accept what it sends. This module packs and
parses them with less work than ``jupyter_client.Session``: the header is parsed eagerly
(routing needs it), the other JSON parts only on first use, and dates stay ISO strings
until somebody asks for a ``datetime``.

Every message that arrives is hostile until checked, in this order: framing (a delimiter,
at least five frames after it), the signature (over the raw frames, before any parsing),
then the header (a JSON object whose ``msg_id`` and ``msg_type`` are short strings).
Anything that fails raises :class:`MessageError`; the other parts are checked by type when
they are first read. :class:`SeenWindow` refuses a msg_id seen lately (a replay), and
:class:`DropLog` turns a flood of bad input into one log line per interval.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import sys
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zmq

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
SIGNATURE_SCHEME = "hmac-sha256"

MAX_IDENTS = 32
"""Identity frames before the delimiter that a receiver looks through."""

MAX_ID_LENGTH = 256
"""Longest ``msg_id`` (and ``msg_type``) accepted."""

MAX_BATCH = 4096
"""Most messages in one batch lane message."""


class MessageError(ValueError):
    """Raised when a received message is malformed (framing, JSON or header)."""


class SignatureError(MessageError):
    """Raised when a message's HMAC signature does not match the cluster key."""


def utcnow_iso() -> str:
    """The current time as the ISO 8601 string Jupyter headers carry."""
    return datetime.now(timezone.utc).isoformat()


def parse_date(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 string from a header or metadata as an aware ``datetime`` (or None)."""
    if type(value) is not str:  # (most often it is: no more checks then)
        if value is None or isinstance(value, datetime):
            return value
        if not isinstance(value, str):
            return None
    try:
        return datetime.fromisoformat(value)  # (from 3.11, with its "Z" too: no copy)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


_ids: tuple[str, itertools.count[int]] = (os.urandom(10).hex(), itertools.count())


def _fresh_ids() -> None:
    global _ids
    _ids = (os.urandom(10).hex(), itertools.count())


os.register_at_fork(after_in_child=_fresh_ids)


def new_msg_id() -> str:
    """A msg_id unique to this process and time: a random prefix drawn when the process
    starts (again in a forked child) and a counter, as hex, 32 characters like a UUID's.

    The ids one process makes sort in the order it made them, so the task database's index
    of msg_ids grows at its end instead of at random pages (random UUIDs made a commit write
    about one index page per new record, and cost the store's writer 40% more per task)."""
    prefix, count = _ids
    return f"{prefix}{next(count):012x}"


def new_msg_ids(n: int) -> tuple[str, ...]:
    """``n`` msg_ids, as :func:`new_msg_id` makes them one by one (a broadcast's parts)."""
    prefix, count = _ids
    return tuple([f"{prefix}{i:012x}" for i in itertools.islice(count, n)])


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


_ENCODER = json.JSONEncoder(
    default=_json_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def dumps_json(obj: Any) -> bytes:
    """Compact JSON, the encoding of every JSON frame (NaN and infinities, which JSON does
    not have, raise ValueError: no peer would accept them). One encoder for all: making
    one per call, as ``json.dumps`` with options does, was a third of the cost.

    A lone surrogate in a string (``print(os.fsdecode(b"\\xff"))`` in a task, an error
    message made of a file name) is no UTF-8: it goes as its escape (``\\udcff``). It
    raised here, and a task that printed one never had its reply sent (its engine took
    no more work)."""
    text = _ENCODER.encode(obj)
    try:
        return text.encode("utf8")
    except UnicodeEncodeError:
        return text.encode("utf8", "backslashreplace")


_EMPTY = b"{}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads_json(data: bytes | memoryview, what: str = "frame") -> Any:
    """Parse a JSON frame; anything malformed (NaN included, or nesting too deep for the
    parser) raises :class:`MessageError`.

    A frame as peers write it (no whitespace around the value) is read by the decoder's
    ``raw_decode`` alone: ``decode`` adds a Python frame and two regular expression
    matches for the whitespace, a third of the cost of a header's parse, paid for every
    JSON frame of every message in each process. Anything else (whitespace, data left
    over, an empty frame) goes through ``decode``, which reads it or raises as always."""
    if data == _EMPTY:  # (most parents, metadata and contents: nothing to parse)
        return {}
    try:
        text = bytes(data).decode("utf-8")
        try:
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            return _DECODER.decode(text or "{}")
        if end != len(text):
            return _DECODER.decode(text)
        return value
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise MessageError(f"the {what} is not valid JSON: {str(exc)[:100]}") from None


def loads_object(data: bytes | memoryview, what: str) -> dict[str, Any]:
    """Parse a JSON frame that must hold an object."""
    obj = loads_json(data, what)
    if not isinstance(obj, dict):
        raise MessageError(f"the {what} is not a JSON object but {type(obj).__name__}")
    return obj


def _encode(part: dict[str, Any] | bytes | None) -> bytes:
    if not part:
        return _EMPTY
    if isinstance(part, bytes):
        return part
    return dumps_json(part)


def as_bytes(frame: Any) -> bytes:
    """A frame's bytes (a ``zmq.Frame`` or anything bytes-like)."""
    if isinstance(frame, bytes):  # (a batch's Part too)
        return frame
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def delimiter_at(frames: Sequence[Any]) -> int:
    """The index of the delimiter among the first :data:`MAX_IDENTS` frames, or -1."""
    for i, frame in enumerate(frames[:MAX_IDENTS]):
        if len(frame) == len(DELIM) and as_bytes(frame) == DELIM:
            return i
    return -1


def split_idents(frames: Sequence[Any]) -> tuple[list[bytes], list[Any]]:
    """Split received frames at the delimiter into (identity frames, message frames)."""
    i = delimiter_at(frames)
    if i < 0:
        raise MessageError("no <IDS|MSG> delimiter in message")
    return [as_bytes(f) for f in frames[:i]], list(frames[i + 1 :])


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded: JSON lets a lone surrogate (``"\\udc80"``) through,
    which then fails wherever the text is written (SQLite, a log, another message)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_header(header: Any) -> dict[str, Any]:
    """The header, if it is an object with a usable ``msg_id`` and ``msg_type``."""
    if not isinstance(header, dict):
        raise MessageError(f"the header is not a JSON object but {type(header).__name__}")
    for key in ("msg_id", "msg_type"):
        value = header.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
            raise MessageError(f"the header's {key} is not a string of 1 to {MAX_ID_LENGTH} chars")
        if not is_unicode(value):
            raise MessageError(f"the header's {key} is not valid Unicode")
    return header


def header_date(header: dict[str, Any]) -> str | None:
    """The header's ``date`` if it is a plausible ISO string, else None."""
    date = header.get("date")
    return date if isinstance(date, str) and len(date) <= 64 else None


@dataclass
class Message:
    """A parsed, verified message: header now, the other parts when first asked for.

    Reading ``parent_header``, ``metadata`` or ``content`` raises :class:`MessageError`
    when that part is not a JSON object.
    """

    header: dict[str, Any]
    frames: list[Any]
    idents: list[bytes] = field(default_factory=list)
    _parent: dict[str, Any] | None = None
    _metadata: dict[str, Any] | None = None
    _content: dict[str, Any] | None = None

    @property
    def msg_id(self) -> str:
        return str(self.header["msg_id"])

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])

    @property
    def parent_header(self) -> dict[str, Any]:
        if self._parent is None:
            self._parent = loads_object(as_bytes(self.frames[2]), "parent header")
        return self._parent

    @property
    def parent_id(self) -> str:
        """The msg_id this message answers ('' if none)."""
        value = self.parent_header.get("msg_id", "")
        return value if isinstance(value, str) else ""

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = loads_object(as_bytes(self.frames[3]), "metadata")
        return self._metadata

    @property
    def content(self) -> dict[str, Any]:
        if self._content is None:
            self._content = loads_object(as_bytes(self.frames[4]), "content")
        return self._content

    @property
    def buffers(self) -> list[Any]:
        return self.frames[5:]

    def as_dict(self, buffers: bool = True) -> dict[str, Any]:
        """The message in ``jupyter_client.Session`` dict form (for ipykernel's set_parent);
        without its buffers unless ``buffers``."""
        return {
            "header": self.header,
            "parent_header": self.parent_header,
            "metadata": self.metadata,
            "content": self.content,
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "buffers": self.buffers if buffers else [],
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
        # (the C object under the HMAC, when there is one: copying it and feeding it
        # directly costs half as much as through the Python wrapper, on every message)
        self._hmac_core = getattr(self._hmac, "_hmac", None) or self._hmac
        self._plain = all(c.isalnum() or c in "-_.:" for c in f"{self.session}{self.username}")

    def sign(self, parts: Sequence[Any]) -> bytes:
        """The hex HMAC of the four signed parts."""
        core = self._hmac_core
        if core is None:
            return b""
        h = core.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def header(
        self, msg_type: str, msg_id: str | None = None, date: str | None = None
    ) -> dict[str, Any]:
        """A fresh Jupyter header (``date``: :func:`utcnow_iso` of now, unless given)."""
        return {
            "msg_id": msg_id or new_msg_id(),
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": date or utcnow_iso(),
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
        date: str | None = None,
    ) -> tuple[dict[str, Any], list[Any]]:
        """Build a signed message; returns (header, frames ready for ``send_multipart``).

        ``content``, ``parent`` and ``metadata`` may be given already encoded (bytes from
        :func:`dumps_json`), so a map encodes its tasks' shared metadata once. ``date``
        is the new header's (:func:`utcnow_iso` of a moment just taken, which a caller
        that has one need not take twice).
        """
        if header is None:
            header = self.header(msg_type, date=date)
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
        content: dict[str, Any] | bytes | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Any] = (),
        idents: Sequence[bytes] = (),
        flags: int = 0,
    ) -> dict[str, Any]:
        """Pack and send a message (``content`` may be JSON already); returns its header."""
        header, frames = self.pack(msg_type, content, parent, metadata, buffers, idents)
        socket.send_multipart(frames, flags, copy=False)
        return header

    def verify(self, msg_frames: Sequence[Any]) -> list[bytes]:
        """Check the framing and signature of message frames (those after the delimiter);
        returns the four signed parts (header, parent, metadata, content) as bytes, so
        that a caller reading them does not copy them out of their frames again."""
        if len(msg_frames) < 5:
            raise MessageError(f"malformed message: {len(msg_frames)} frames after delimiter")
        last = msg_frames[-1]
        if len(last) == len(CUT) and as_bytes(last) == CUT:
            raise MessageError("a message its sender cut short (an exception between frames)")
        parts = [f if type(f) is bytes else as_bytes(f) for f in msg_frames[1:5]]
        if self._hmac is None:
            return parts
        signature = msg_frames[0]
        if len(signature) != 64:  # a hex SHA-256: no hashing for what cannot match
            raise SignatureError("invalid HMAC signature")
        if not hmac.compare_digest(as_bytes(signature), self.sign(parts)):
            raise SignatureError("invalid HMAC signature")
        return parts

    def unpack(self, msg_frames: list[Any]) -> Message:
        """Verify message frames (after the delimiter) and parse them into a Message."""
        header = check_header(loads_json(self.verify(msg_frames)[0], "header"))
        return Message(header=header, frames=msg_frames)

    def recv(self, frames: list[Any]) -> Message:
        """Split identities off received frames, verify and parse the rest."""
        idents, msg_frames = split_idents(frames)
        msg = self.unpack(msg_frames)
        msg.idents = idents
        return msg


BATCH = b"<PX|BATCH2>"
"""First frame of a lane message that carries several messages (tasks or replies), packed
by :func:`pack_batch`."""

INLINE_BELOW = 65536
"""A batch's frames shorter than this travel joined in one zmq frame; longer ones (arrays,
big arguments) as frames of their own, never copied."""

MAX_MESSAGE_FRAMES = 1024
"""Most frames one message of a batch may have (a task's buffers are fewer)."""

_LITTLE = sys.byteorder == "little"


class Part(bytes):
    """A small frame of a batch message, cut out of the batch's joined frame: ``bytes``
    that also answers ``.bytes`` and ``.buffer`` as a ``zmq.Frame`` does, so that code
    reading frames takes either."""

    __slots__ = ()

    @property
    def bytes(self) -> bytes:
        return self

    @property
    def buffer(self) -> memoryview:
        return memoryview(self)


LEN_IS_BYTES = frozenset({bytes, bytearray, zmq.Frame, Part})
"""Frame types whose ``len`` is their size in bytes and that ``bytes.join`` takes as they
are (a memoryview's ``len`` counts items, and each costs a view to join)."""


def pack_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """Frames of one lane message carrying several complete messages (each with its
    idents): ``[BATCH, index, joined, big frames...]``.

    ``joined`` is every frame shorter than :data:`INLINE_BELOW` bytes, one after the
    other; the others follow as frames of their own (zero-copy). ``index`` is int64s,
    little-endian: the number of messages, each message's frame count, then each frame's
    length in ``joined`` (-1: the next frame of its own). A task is eight frames or so,
    and each zmq frame costs a send and a receive in Python: one frame for all of them
    saves both ends about 9 us a task.
    """
    index = array("q", [len(messages)])
    index.extend(len(m) for m in messages)
    small: list[Any] = []
    big: list[Any] = []
    for m in messages:
        for frame in m:
            if isinstance(frame, (bytes, zmq.Frame)):
                n = len(frame)
            else:
                view = memoryview(frame)
                n = view.nbytes if view.c_contiguous else INLINE_BELOW  # (join needs it)
            if n < INLINE_BELOW:
                small.append(frame)
                index.append(n)
            else:
                big.append(frame)
                index.append(-1)
    if not _LITTLE:
        index.byteswap()
    return [BATCH, index.tobytes(), b"".join(small), *big]


def batches(
    messages: Sequence[list[Any]], limit: int = MAX_BATCH, most: int = MAX_MESSAGE_FRAMES
) -> list[list[Any]]:
    """The lane messages that carry ``messages``, in order: runs of up to ``limit`` of
    them packed together (:func:`pack_batch`), a run of one as it is, and so each message
    of more than ``most`` frames (a batch holding one is refused whole by
    :func:`unpack_batch`: a controller's reply with thousands of records would take the
    others down with it)."""
    out: list[list[Any]] = []
    run: list[list[Any]] = []
    for message in [*messages, None]:  # (None: the end, where the last run leaves)
        if run and (message is None or len(message) > most or len(run) == limit):
            out.append(run[0] if len(run) == 1 else pack_batch(run))
            run = []
        if message is not None:
            (out if len(message) > most else run).append(message)
    return out


def unpack_batch(frames: Sequence[Any], limit: int = MAX_BATCH, least: int = 1) -> list[list[Any]]:
    """The messages of a :func:`pack_batch` lane message (``frames`` starts at ``BATCH``).

    The index must name 1 to ``limit`` messages of ``least`` to
    :data:`MAX_MESSAGE_FRAMES` frames each, whose lengths add up to the joined frame and
    whose frames of their own are those present; else :class:`MessageError` (nothing is
    unpacked). Small frames come as :class:`Part` (copies: a message kept keeps only its
    own bytes), the others as received.
    """
    if len(frames) < 3:
        raise MessageError("malformed batch")
    raw = memoryview(frames[1])
    size = raw.nbytes
    if size % 8 or not 16 <= size <= 8 * (1 + limit * (1 + MAX_MESSAGE_FRAMES)):
        raise MessageError("malformed batch: its index has a wrong size")
    index = array("q")
    index.frombytes(raw.cast("B"))
    if not _LITTLE:
        index.byteswap()
    k = index[0]
    if not 0 < k <= limit or len(index) < 1 + k:
        raise MessageError("malformed batch: its count of messages is wrong")
    counts = index[1 : 1 + k]
    lengths = index[1 + k :]
    joined = memoryview(frames[2]).cast("B")
    own = len(frames) - 3
    if (
        min(counts) < max(least, 1)
        or max(counts) > MAX_MESSAGE_FRAMES
        or sum(counts) != len(lengths)
        or (lengths and min(lengths) < -1)
        or lengths.count(-1) != own
        or sum(lengths) + own != joined.nbytes
    ):
        raise MessageError("malformed batch: its index does not match its frames")
    out: list[list[Any]] = []
    pos = 0
    at = 3
    li = 0
    for n in counts:
        message: list[Any] = []
        for length in lengths[li : li + n]:
            if length < 0:
                message.append(frames[at])
                at += 1
            else:
                message.append(Part(joined[pos : pos + length]))
                pos += length
        li += n
        out.append(message)
    return out


_SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
"""``zmq.NOBLOCK`` as a plain int (flags that are enums cost an enum operation a frame)."""
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
"""The same for testing ``sock.getsockopt(EVENTS) & POLLIN`` (two enum operations else)."""

_COPY_BELOW = 65536
"""Bytes objects shorter than this are copied into zmq (pyzmq copies them anyway)."""

_SUGAR_SEND = zmq.Socket.send
_BACKEND_SEND = zmq.backend.Socket.send


def send_frames(
    sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0, track: bool = False
) -> zmq.MessageTracker | None:
    """``sock.send_multipart(frames, flags, copy=False)`` for less: pyzmq's version costs
    about 3 us more a frame (an enum operation and type checks per frame), which a batch
    of tasks of eight frames each paid for every task. Large buffers still go without a
    copy; a received ``zmq.Frame`` is passed on as it is. With ``track``, the tracker of
    the message (pyzmq's own path).

    Frames go one call each, from Python: an exception between two (a signal handler's,
    which Python runs between any two bytecodes) would leave part of a message in the
    socket, and the next message would be glued to it, a garbled message its peer drops
    (and a request lost with it). So an exception ends the message with :data:`CUT`,
    which makes the fragment one that every peer refuses (:meth:`Wire.verify`): ended
    with an empty frame instead, a fragment cut among its buffers (which the signature
    does not cover) was a valid message with an argument missing, and ran. When the
    exception came after the last frame, ``CUT`` goes alone, a malformed message dropped."""
    try:
        if track:
            return sock.send_multipart(frames, flags, copy=False, track=True)
        more = flags | _SNDMORE
        last = len(frames) - 1
        send = sock.send
        if type(sock).send is _SUGAR_SEND:
            # (the C method under pyzmq's ``send``, which only adds DRAFT routing ids and
            # groups to it: a third of a small frame's cost; a subclass's own send, an
            # asyncio socket's say, is called as it is)
            send = _BACKEND_SEND.__get__(sock)
        for i, frame in enumerate(frames):
            copy = isinstance(frame, bytes) and len(frame) < _COPY_BELOW
            send(frame, more if i < last else flags, copy)
        return None
    except BaseException:
        try:
            sock.send(CUT, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # (closed, or nothing could be sent: then no fragment either)
        raise


CUT = b"\x00<PX|MESSAGE CUT SHORT BY ITS SENDER>\x00"
"""The frame that ends a message whose sending an exception cut short (see
:func:`send_frames`); a message ending with it is refused."""


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)`` for less (pyzmq's asks the socket
    whether more frames follow with an option read per frame; a frame knows)."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(0, copy=False)
        frames.append(frame)
    return frames


def is_batch(frames: Sequence[Any], at: int = 0) -> bool:
    """Whether ``frames[at]`` is the batch marker."""
    return len(frames) > at and len(frames[at]) == len(BATCH) and as_bytes(frames[at]) == BATCH


def curve_server(sock: zmq.Socket[Any], public: bytes, secret: bytes) -> None:
    """Make ``sock`` (before it binds) a CurveZMQ server: only a peer that knows ``public``
    completes a handshake, and all traffic is encrypted."""
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def curve_client(
    sock: zmq.Socket[Any], server_public: bytes, keypair: tuple[bytes, bytes] | None = None
) -> None:
    """Make ``sock`` (before it connects) a CurveZMQ client of the server ``server_public``.

    ``keypair`` (public, secret) is the client's own: a fresh one by default. Jupyter
    clients of a kernel reuse the kernel's keypair from its connection file instead.
    """
    public, secret = keypair or zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


LANE_AUTH = "plain"
"""An engine's ``lane_auth`` (in its kernel info and connection info) when its task lane
takes only peers that log in with the lane's password (ZMQ PLAIN, checked by the
engine's ZAP handler, :mod:`kernel_engine.engine.guard`). Without it, any local process
could connect and, while the engine runs a task, have it hold whatever it sends (the lane
reads nothing then). Engines that encrypt use CurveZMQ instead."""
LANE_USER = b"px"
LANE_DOMAIN = b"px-lane"


def lane_password(key: bytes, port: int, session: str) -> bytes:
    """The password of the task lane on ``port`` of the engine whose kernel session id is
    ``session``, in a cluster signing with ``key``.

    Bound to the engine: PLAIN sends it in the clear, and a process that takes over a dead
    engine's port learns the password of that engine only, which opens no other lane (nor
    the lane of a later engine on the same port)."""
    text = b"jupyter-px lane %d %s" % (port, session.encode("utf-8", "replace"))
    return hmac.new(key, text, hashlib.sha256).hexdigest().encode()


def lane_client(sock: zmq.Socket[Any], key: bytes, port: int, session: str) -> None:
    """Make ``sock``'s next connection (to the lane on ``port`` of the engine of kernel
    session ``session``) log in with its password; a connection keeps the options it was
    made with (see :func:`null_client`)."""
    sock.plain_username = LANE_USER
    sock.plain_password = lane_password(key, port, session)


def null_client(sock: zmq.Socket[Any]) -> None:
    """Make ``sock``'s next connections use no security mechanism again."""
    sock.plain_server = False  # (libzmq: setting it to 0 sets the NULL mechanism)


class SeenWindow:
    """The msg_ids of the last ``size`` messages accepted: a replay of one is refused.

    Jupyter's ``Session`` keeps a bounded history of signatures for the same purpose. A
    FIFO window (a deque and a set) evicts in O(1); a message replayed after ``size``
    others is no longer recognised here, which is why the controller also refuses msg_ids
    its task records know (see ``kernel_engine.controller.tasks``).
    """

    def __init__(self, size: int = 65536):
        self.size = size
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def add(self, msg_id: str) -> bool:
        """Remember ``msg_id``; False if it was seen already (a replay or a duplicate)."""
        if msg_id in self._ids:
            return False
        self._ids.add(msg_id)
        self._order.append(msg_id)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())
        return True

    def take(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is remembered; it is not any more (its place in the order
        passes out in its turn)."""
        if msg_id not in self._ids:
            return False
        self._ids.discard(msg_id)
        return True

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def __len__(self) -> int:
        return len(self._order)


class DropLog:
    """Counts input that was dropped, by reason, and logs it at most once per interval.

    The first drop is logged at once (one bad message is worth a line); after that a flood
    costs one summary line per ``interval`` seconds, however many messages it has.
    """

    def __init__(self, log: logging.Logger, what: str, interval: float = 10.0):
        self.log = log
        self.what = what
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.total = 0
        self._next = 0.0

    def drop(self, reason: str) -> None:
        """Count one dropped message (``reason``: a short phrase, not the message)."""
        self.counts[reason[:120]] += 1
        self.total += 1
        now = time.monotonic()
        if now >= self._next:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log what was counted since the last line (call it now and then)."""
        if not self.counts:
            return
        now = time.monotonic() if now is None else now
        n = sum(self.counts.values())
        reasons = "; ".join(f"{count} {why}" for why, count in self.counts.most_common(5))
        more = "" if len(self.counts) <= 5 else f"; {len(self.counts) - 5} other reasons"
        self.log.warning("%s: dropped %i message(s): %s%s", self.what, n, reasons, more)
        self.counts.clear()
        self._next = now + self.interval
