"""Hostile peers for the fuzz tests: a cluster's ports, broken and signed messages, raw TCP.

Written without the product's wire code (black-box): a message here is what any local user
(or, with the key, a peer) can put on a socket. Signing follows the Jupyter wire protocol:
``idents..., <IDS|MSG>, hmac_hex, header, parent, metadata, content, buffers...`` with
HMAC-SHA256 over the four JSON parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import socket
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import zmq

DELIM = b"<IDS|MSG>"
BATCH = b"<PX|BATCH2>"
CONTROLLER_IDENTITY = b"px-controller"
HUGE = 4 * 1024 * 1024
NAN = math.nan
INF = math.inf


# ----- the cluster's ports and processes


@dataclass(frozen=True)
class Port:
    """One listening port of a cluster."""

    owner: str  # "controller" or "engine 0"
    name: str  # client, iopub, shell, control, stdin, hb, lane
    port: int
    url: str  # tcp://127.0.0.1:<port>, or ipc://<path> (engines on unix sockets)

    @property
    def publishes(self) -> bool:
        """A PUB/XPUB port: peers send it subscriptions, not requests."""
        return self.name == "iopub"

    def __str__(self) -> str:
        return f"{self.owner} {self.name} port ({self.port})"


def endpoint(info: dict[str, Any], port: int) -> str:
    """The zmq URL of ``port`` of a connection info: TCP, or unix sockets (``ipc``)."""
    if info.get("transport") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"


def controller_info(rc: Any) -> dict[str, Any]:
    """The client connection file: client_port, iopub_port, key, ip."""
    info: dict[str, Any] = json.loads(Path(rc.connection_file).read_text())
    return info


LANE_LOGINS: dict[str, tuple[bytes, bytes, int]] = {}
"""The cluster key, the engine's kernel session and the lane's port of each lane url that
:func:`cluster_ports` found: a :class:`Peer` of a lane logs in with its password
(``kernel_engine.engine.guard``), signer or no signer, so the fuzzing reaches what is
behind the lane's door too (as a peer that got the password would)."""


def cluster_ports(rc: Any) -> tuple[bytes, list[Port]]:
    """The cluster key and every port the controller and the engines listen on."""
    info = controller_info(rc)
    assert info["ip"] == "127.0.0.1", info["ip"]
    ports = [
        Port("controller", name, int(info[f"{name}_port"]), endpoint(info, info[f"{name}_port"]))
        for name in ("client", "iopub", "hb")
    ]
    for eid in rc.ids:
        conn = rc.engine_info(eid)["connection_info"]
        assert conn.get("transport") == "ipc" or conn["ip"] == "127.0.0.1", conn
        for name in ("shell", "control", "stdin", "hb", "iopub", "lane"):
            port = int(conn[f"{name}_port"])
            ports.append(Port(f"engine {eid}", name, port, endpoint(conn, port)))
        if conn.get("lane_auth") == "plain":
            LANE_LOGINS[ports[-1].url] = (
                info["key"].encode(),
                rc.engine_info(eid)["uuid"].encode(),
                ports[-1].port,
            )
    return info["key"].encode(), ports


def port_of(ports: list[Port], owner: str, name: str) -> Port:
    return next(p for p in ports if p.owner == owner and p.name == name)


def running(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cluster_pids(cluster: Any, rc: Any) -> dict[str, int]:
    """``{"controller": pid, "engine 0": pid, ...}``."""
    pids = {"controller": cluster.controller_pid}
    for eid in rc.ids:
        pids[f"engine {eid}"] = rc.engine_info(eid)["pid"]
    return pids


def dead_processes(pids: dict[str, int]) -> list[str]:
    return [f"{name} (pid {pid}) is gone" for name, pid in pids.items() if not running(pid)]


def log_sizes(folder: Path) -> dict[str, int]:
    """Sizes of the cluster's log files (controller.log, engine-N.log)."""
    out = {}
    for path in Path(folder).glob("*.log"):
        with contextlib.suppress(OSError):
            out[path.name] = path.stat().st_size
    return out


def wait_logs_quiet(folder: Path, quiet: float = 1.0, timeout: float = 15.0) -> dict[str, int]:
    """Log sizes once no log grew for ``quiet`` seconds (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    sizes = log_sizes(folder)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = log_sizes(folder)
        if now != sizes:
            sizes, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return sizes


def log_growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: size - before.get(name, 0) for name, size in sorted(after.items())}


# ----- messages


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def encode(part: Any) -> bytes:
    """A JSON part (bytes are sent as they are). NaN and Infinity are written as JSON
    allows Python to write them, since a hostile peer can."""
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part)
    return json.dumps(part, separators=(",", ":")).encode()


class Signer:
    """Packs Jupyter messages signed with one key: the cluster's, or somebody else's."""

    def __init__(self, key: bytes, username: str = "fuzz"):
        self.key = key
        self.session = uuid.uuid4().hex
        self.username = username

    def sign(self, parts: Sequence[bytes]) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def header(self, msg_type: Any, msg_id: Any = None) -> dict[str, Any]:
        return {
            "msg_id": uuid.uuid4().hex if msg_id is None else msg_id,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": now_iso(),
            "version": "5.3",
        }

    def parts(
        self,
        msg_type: Any,
        content: Any = None,
        metadata: Any = None,
        header: Any = None,
        parent: Any = None,
    ) -> tuple[Any, list[bytes]]:
        """(header, the four signed parts)."""
        if header is None:
            header = self.header(msg_type)
        return header, [
            encode(header),
            encode({} if parent is None else parent),
            encode({} if metadata is None else metadata),
            encode({} if content is None else content),
        ]

    def pack(
        self,
        msg_type: Any,
        content: Any = None,
        metadata: Any = None,
        buffers: Sequence[bytes] = (),
        idents: Sequence[bytes] = (),
        header: Any = None,
        parent: Any = None,
    ) -> tuple[Any, list[bytes]]:
        """(header, frames ready to send)."""
        header, parts = self.parts(msg_type, content, metadata, header, parent)
        return header, [*idents, DELIM, self.sign(parts), *parts, *buffers]


@dataclass
class Reply:
    """A message received by a peer."""

    idents: list[bytes]
    header: dict[str, Any]
    parent: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    signed: bool = True

    @property
    def status(self) -> str:
        return str(self.content.get("status") or self.metadata.get("status") or "")

    @property
    def error_text(self) -> str:
        c = self.content
        return f"{c.get('ename', '')}: {c.get('evalue', '')} {c.get('px_error', '')}".strip()

    def summary(self) -> str:
        if self.status == "error":
            return f"error reply ({self.error_text[:200]})"
        return f"{self.status or 'no status'} reply ({self.header.get('msg_type')})"


def parse(frames: list[bytes], signer: Signer) -> Reply | None:
    """A received message, or None if it is not one (replies must be signed too)."""
    try:
        at = frames.index(DELIM)
        sig, *parts = frames[at + 1 : at + 6]
        header, parent, metadata, content = (json.loads(p) for p in parts)
    except (ValueError, TypeError):
        return None
    if not all(isinstance(p, dict) for p in (header, parent, metadata, content)):
        return None
    ok = hmac.compare_digest(sig, signer.sign(parts))
    return Reply(frames[:at], header, parent, metadata, content, frames[at + 6 :], ok)


class Peer:
    """A zmq DEALER of a peer, with what it receives sorted by parent msg_id."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        url: str,
        signer: Signer,
        identity: bytes | None = None,
        linger: int = 0,
    ):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = linger
        self.sock.sndhwm = 0
        self.sock.rcvhwm = 0
        if identity is not None:
            self.sock.identity = identity
        login = LANE_LOGINS.get(url)
        if login is not None:  # ZMQ PLAIN: user "px", the password the README gives
            key, session, port = login
            text = b"jupyter-px lane %d %s" % (port, session)
            self.sock.plain_username = b"px"
            self.sock.plain_password = hmac.new(key, text, "sha256").hexdigest().encode()
        self.sock.connect(url)
        self.signer = signer
        self.received: list[Reply] = []

    def send(self, frames: Sequence[Any]) -> bool:
        try:
            self.sock.send_multipart(list(frames), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def request(
        self,
        msg_type: Any,
        content: Any = None,
        metadata: Any = None,
        buffers: Sequence[bytes] = (),
        route: bytes | None = None,
        header: Any = None,
    ) -> Any:
        """Send a signed request (through ``route`` when talking to the controller)."""
        idents = [] if route is None else [route]
        header, frames = self.signer.pack(msg_type, content, metadata, buffers, idents, header)
        self.send(frames)
        return header["msg_id"] if isinstance(header, dict) else None

    def poll(self, timeout: float) -> bool:
        """Receive what arrives within ``timeout`` seconds; whether anything did."""
        got = False
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if not self.sock.poll(max(0, int(left * 1000))):
                return got
            while self.sock.poll(0):
                reply = parse(self.sock.recv_multipart(), self.signer)
                if reply is not None:
                    self.received.append(reply)
                    got = True
            if left <= 0:
                return got

    def replies_to(self, msg_id: Any) -> list[Reply]:
        return [r for r in self.received if r.parent.get("msg_id") == msg_id]

    def wait_replies(self, msg_id: Any, timeout: float, count: int = 1) -> list[Reply]:
        """Replies to ``msg_id``: at least ``count`` of them, or all that came in time."""
        deadline = time.monotonic() + timeout
        while len(self.replies_to(msg_id)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.poll(min(left, 0.2))
        return self.replies_to(msg_id)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def result_of(reply: Reply) -> Any:
    """The value an ``apply_reply`` carries."""
    from kernel_engine.serialize import loads

    return loads(reply.buffers)


def apply_payload(f: Any, *args: Any) -> list[bytes]:
    """The buffers of an ``apply_request`` calling ``f(*args)``."""
    from kernel_engine.serialize import pack_apply

    return [bytes(b) for b in pack_apply(f, args, {})]


def lb_flags(**overrides: Any) -> dict[str, Any]:
    """A load-balanced task's metadata flags, as a client sends them."""
    flags: dict[str, Any] = {
        "targets": None,
        "after": None,
        "follow": None,
        "timeout": None,
        "retries": 0,
        "time_limit": None,
        "label": None,
    }
    flags.update(overrides)
    return flags


def dependency(*msg_ids: str) -> dict[str, Any]:
    return {"msg_ids": list(msg_ids), "all": True, "success": True, "failure": False}


# ----- garbage


ROUTES = [
    b"hub",
    b"lb",
    b"lane:0",
    b"lane:1",
    b"shell:0",
    b"shell:1",
    b"control:0",
    b"lane:99",
    b"lane:-1",
    b"lane:x",
    b"lane:",
    b":",
    b"",
    b"hub\x00",
    b"lane:0:0",
    b"lane:99999999999999999999999",
    b"\xff\xfe\x00",
]


def int64s(*values: int) -> bytes:
    """A batch index: little-endian int64s (the layout of ``kernel_engine.wire.pack_batch``,
    written here again so that the fuzzer does not trust the code it tests)."""
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


def packed(messages: list[list[bytes]]) -> list[bytes]:
    """``[BATCH, index, joined]`` of small ``messages``, as pack_batch makes them."""
    counts = [len(m) for m in messages]
    lengths = [len(f) for m in messages for f in m]
    return [
        BATCH,
        int64s(len(messages), *counts, *lengths),
        b"".join(f for m in messages for f in m),
    ]


BATCH_INDEX_LIES = [
    int64s(100_000_000, 1, 0),
    int64s(2, -5, 3),
    int64s(-1_000_000_000),
    int64s(1, 3, 1, 1, 2**62),  # lengths past the joined frame
    int64s(1, 2, 0, -1),  # a frame of its own that is not there
    int64s(1, 1, -7),
    int64s(4096, *[1] * 4096, *[2**40] * 4096),
    int64s(1, 1024 * 1024, *[0] * 1000),
    int64s(1, 2)[:-3],
    b"[3, 3]",  # the old format's counts
    b"not json",
    b"",
    b"\xff\xfe",
]


def identity(rng: random.Random) -> bytes:
    """A random socket identity (zmq reserves those starting with a zero byte)."""
    return bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(0, 12))


def hex_identity(rng: random.Random, suffix: bytes) -> bytes:
    """What a client's twin sockets are called: 16 hex digits and ``:s`` or ``:r``."""
    return rng.randbytes(8).hex().encode() + suffix


class Garbage:
    """Hostile messages for one port, shaped like what that port expects, or not at all.

    ``harmful`` payloads would do damage if accepted (stop the controller, start or
    signal engines, make an engine exit): they are sent unsigned, signed with another key
    or with a signature of another message, so that a check that let them through shows
    as a dead or extra process.
    """

    KINDS = {  # kind: messages per port
        "random": 60,
        "no-delimiter": 30,
        "truncated": 40,
        "unsigned": 30,
        "wrong-key": 40,
        "forged": 20,
        "bad-signature": 20,
        "bad-json": 10,
        "batch": len(BATCH_INDEX_LIES) + 3,
        "many-frames": 2,
        "huge": 2,
    }

    def __init__(self, rng: random.Random, key: bytes, port: Port, engine_ids: list[int]):
        self.rng = rng
        self.port = port
        self.good = Signer(key)
        self.other = Signer(uuid.uuid4().hex.encode())
        self.engine_ids = engine_ids
        self.exit_payload = apply_payload(os._exit, 3)
        self._batch_lies = list(BATCH_INDEX_LIES)

    def messages(self) -> Iterator[tuple[str, list[bytes]]]:
        """(kind, frames) in a random order."""
        plan = [k for k, n in self.KINDS.items() for _ in range(n)]
        if self.port.name == "lane":
            plan.append("amplifier")
        self.rng.shuffle(plan)
        for kind in plan:
            yield kind, getattr(self, "_" + kind.replace("-", "_"))()

    # -- building blocks

    def _route(self) -> list[bytes]:
        if self.port.name != "client":
            return []
        return [self.rng.choice(ROUTES)]

    def _harmful(self) -> tuple[list[bytes], str, dict[str, Any], list[bytes]]:
        """(route frames, msg_type, content, buffers) that would hurt if accepted."""
        rng, name = self.rng, self.port.name
        eid = str(rng.choice(self.engine_ids)).encode()
        exit_code = {"code": "import os; os._exit(4)", "silent": False, "store_history": False}
        if name == "client":
            return rng.choice(
                [
                    ([b"hub"], "px_shutdown_request", {"hub": True}, []),
                    ([b"hub"], "px_start_request", {"n": 1}, []),
                    ([b"hub"], "px_signal_request", {"signum": 9}, []),
                    ([b"lb"], "apply_request", {}, self.exit_payload),
                    ([b"lane:" + eid], "apply_request", {}, self.exit_payload),
                    ([b"shell:" + eid], "execute_request", exit_code, []),
                    ([b"control:" + eid], "shutdown_request", {"restart": False}, []),
                ]
            )
        if name == "lane":
            return rng.choice(
                [
                    ([], "apply_request", {}, self.exit_payload),
                    ([], "engine_setup_request", {"engine_id": 77, "cluster_id": "evil"}, []),
                ]
            )
        if name == "shell":
            return [], "execute_request", exit_code, []
        if name == "control":
            return [], "shutdown_request", {"restart": False}, []
        return [], "input_reply", {"value": "x"}, []

    def _junk_frames(self, n: int, size: int = 300) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randrange(0, size)) for _ in range(n)]

    # -- kinds

    def _random(self) -> list[bytes]:
        return self._junk_frames(self.rng.randrange(1, 8))

    def _no_delimiter(self) -> list[bytes]:
        header = encode(self.good.header("apply_request"))
        return [*self._route(), b"0" * 64, header, b"{}", b"{}", b"{}"]

    def _truncated(self) -> list[bytes]:
        route, msg_type, content, _ = self._harmful()
        _, parts = self.good.parts(msg_type, content)
        frames = [self.good.sign(parts), *parts]
        return [*route, DELIM, *frames[: self.rng.randrange(0, 5)]]

    def _unsigned(self) -> list[bytes]:
        route, msg_type, content, buffers = self._harmful()
        _, parts = self.good.parts(msg_type, content)
        return [*route, DELIM, b"", *parts, *buffers]

    def _wrong_key(self) -> list[bytes]:
        route, msg_type, content, buffers = self._harmful()
        return self.other.pack(msg_type, content, None, buffers, route)[1]

    def _forged(self) -> list[bytes]:
        """The signature of a harmless message over the parts of a harmful one."""
        route, msg_type, content, buffers = self._harmful()
        _, harmless = self.good.parts("px_lane_ping_request", {})
        _, parts = self.good.parts(msg_type, content)
        return [*route, DELIM, self.good.sign(harmless), *parts, *buffers]

    def _bad_signature(self) -> list[bytes]:
        route, msg_type, content, buffers = self._harmful()
        _, parts = self.good.parts(msg_type, content)
        good = self.good.sign(parts)
        sig = self.rng.choice(
            [
                good.upper(),
                good[:-1],
                good + b"0",
                b"\xff" * 64,
                self.rng.randbytes(32).hex().encode(),
                b"a" * 200_000,
            ]
        )
        return [*route, DELIM, sig, *parts, *buffers]

    def _bad_json(self) -> list[bytes]:
        route = self._route()
        header = self.rng.choice(
            [b"{not json", b"[" * 50_000, b'"a string"', b"\xff\xfe\xfd", b"1e400", b"NaN"]
        )
        parts = [header, b"{", b"[]", b"null"]
        return [*route, DELIM, self.other.sign(parts), *parts]

    def _batch(self) -> list[bytes]:
        if self._batch_lies:  # an index that lies, with anything after it
            body = self._junk_frames(self.rng.randrange(0, 6))
            return [*self._route(), BATCH, self._batch_lies.pop(), *body]
        unsigned = [DELIM, b"", b"{}", b"{}", b"{}", b"{}"]
        if self.rng.random() < 0.5:  # a well-formed batch of unsigned messages
            return [*self._route(), *packed([unsigned, unsigned])]
        junk = [self._junk_frames(self.rng.randrange(1, 6)) for _ in range(3)]
        return [*self._route(), *packed(junk)]

    def _amplifier(self) -> list[bytes]:
        """One well-formed batch of 4,096 one-frame messages (the most a batch may carry),
        each junk: 4,096 drops if counted one by one."""
        return packed([[b"x"]] * 4096)

    def _many_frames(self) -> list[bytes]:
        frames = [b"x"] * 3000
        if self.rng.random() < 0.5:
            frames[1] = DELIM
        return [*self._route(), *frames]

    def _huge(self) -> list[bytes]:
        blob = os.urandom(HUGE)
        if self.rng.random() < 0.5:
            return [*self._route(), blob]
        route, msg_type, content, _ = self._harmful()
        return self.other.pack(msg_type, content, None, [blob], route)[1]


def subscriptions(rng: random.Random, n: int) -> Iterator[list[bytes]]:
    """What an XSUB can send a PUB port: (un)subscriptions, big ones, and non-messages.

    (libzmq 4.3.5 crashes the *sending* process on an XSUB subscription of about 1 MB, so
    the huge ones go by raw TCP: see ``raw_tcp``.)
    """
    for i in range(n):
        r = rng.random()
        if i == 0:
            yield [b"\x01" + b"a" * 60_000]
        elif r < 0.3:
            yield [b"\x01" + rng.randbytes(rng.randrange(0, 64))]
        elif r < 0.6:
            yield [b"\x01" + rng.randbytes(rng.randrange(0, 32)).hex().encode()]
        elif r < 0.8:
            yield [b"\x00" + rng.randbytes(rng.randrange(0, 64))]
        else:
            yield [bytes([rng.randrange(2, 256)]) + rng.randbytes(50), b"more"]


# ----- raw TCP


def zmtp_greeting(mechanism: bytes = b"NULL", major: int = 3) -> bytes:
    """The 64-byte ZMTP 3 greeting."""
    return (
        b"\xff" + b"\x00" * 7 + b"\x01\x7f" + bytes([major, 0]) + mechanism.ljust(20, b"\x00")
    ) + b"\x00" * 32


def zmtp_ready(socket_type: bytes, identity: bytes = b"") -> bytes:
    """A ZMTP 3 READY command (NULL mechanism)."""
    props = b""
    for name, value in ((b"Socket-Type", socket_type), (b"Identity", identity)):
        props += bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    body = b"\x05READY" + props
    return b"\x04" + bytes([len(body)]) + body


RAW_KINDS = (
    "connect-and-close",
    "random-bytes",
    "http",
    "greeting-then-garbage",
    "unknown-mechanism",
    "old-version",
    "wrong-socket-type",
    "frame-of-4-exabytes",
    "truncated-frame",
    "huge-subscription",
)


def _raw_payload(kind: str, rng: random.Random) -> tuple[bytes, bytes]:
    """(what to send at once, what to send once the peer's handshake arrived)."""
    if kind == "connect-and-close":
        return b"", b""
    if kind == "random-bytes":
        return rng.randbytes(rng.randrange(1, 64 * 1024)), b""
    if kind == "http":
        return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3, b""
    if kind == "greeting-then-garbage":
        return zmtp_greeting() + rng.randbytes(4096), b""
    if kind == "unknown-mechanism":
        return zmtp_greeting(b"GSSAPI") + rng.randbytes(64), b""
    if kind == "old-version":
        return zmtp_greeting(major=1) + rng.randbytes(64), b""
    if kind == "wrong-socket-type":
        return zmtp_greeting() + zmtp_ready(b"PUB"), b"\x00\x03abc"
    dealer = zmtp_greeting() + zmtp_ready(b"DEALER", b"raw")
    if kind == "frame-of-4-exabytes":  # must not be allocated
        return dealer, b"\x02" + struct.pack(">Q", 1 << 62)
    if kind == "truncated-frame":
        return dealer, b"\x02" + struct.pack(">Q", 1 << 20) + b"x" * 100
    if kind == "huge-subscription":  # a SUB subscribing to a 4 MB topic
        topic = b"\x01" + b"a" * HUGE
        return zmtp_greeting() + zmtp_ready(b"SUB"), b"\x02" + struct.pack(">Q", len(topic)) + topic
    raise ValueError(kind)


def raw_connect(url: str, timeout: float = 2.0) -> socket.socket:
    """A plain socket connected to the zmq endpoint ``url`` (``tcp://`` or ``ipc://``)."""
    scheme, _, where = url.partition("://")
    if scheme == "ipc":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(where)
        except OSError:
            s.close()
            raise
        return s
    host, _, port = where.rpartition(":")
    return socket.create_connection((host, int(port)), timeout)


def raw_tcp(url: str, kind: str, rng: random.Random) -> None:
    """One hostile connection (TCP, or a unix socket) that does ``kind`` and hangs up."""
    first, then = _raw_payload(kind, rng)
    with contextlib.suppress(OSError), raw_connect(url) as s:
        s.settimeout(2)
        if first:
            s.sendall(first)
        if not then:
            s.settimeout(0.1)
            with contextlib.suppress(OSError):  # (what the peer makes of it)
                s.recv(4096)
            return
        received = b""
        with contextlib.suppress(OSError):  # the peer's greeting and READY (or a hang-up)
            while len(received) < 64 + 8 and (data := s.recv(4096)):
                received += data
        s.sendall(then)
        s.settimeout(0.3)
        with contextlib.suppress(OSError):
            s.recv(4096)


class SlowLoris:
    """TCP connections that send half a greeting and then nothing, held open."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def open(self, url: str, n: int = 3) -> None:
        for _ in range(n):
            with contextlib.suppress(OSError):
                s = raw_connect(url)
                s.sendall(zmtp_greeting()[:5])
                self.socks.append(s)

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        self.socks.clear()
