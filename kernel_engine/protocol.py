"""The protocol: every message type jupyter-px sends, what its content holds, and where it
goes. How messages are framed, signed and checked is :mod:`kernel_engine.wire`.

Routing between client, controller and engines uses zmq identity frames in front of the
delimiter, never the signed parts, so the controller forwards frames without re-signing:

- client -> controller: one route frame (:func:`route_frame`) says where a request goes,
  ``b"lane:3"`` (engine 3's task lane), ``b"shell:3"``, ``b"control:3"``, ``b"hub"``
  (the controller itself) or ``b"lb"`` (the load-balancing scheduler);
  a frontend's messages to a comm on an engine (:data:`COMM_MESSAGES`) go to
  ``b"shell:3"`` too, and no reply comes back;
- controller -> client: one frame names the engine that answered (``b"3"``) or ``b"hub"``
  (the controller's own messages, among them :data:`MERGED_REPLIES`: several engines'
  task replies, checked and signed again by the controller, for a client that said it
  reads them; see :mod:`kernel_engine.replies`).

A client on the engines' host may also send ``apply_request`` straight to an engine's task
lane (see ``jupyter_ext._lanes``). It sends from a socket whose identity is
:func:`client_identity` ``+ b":s"`` and receives on a twin ending in ``:r``; the lane, like
the controller, answers the twin (:func:`reply_identity`). The client then tells the
controller what it sent and what came back, in batches (:data:`DIRECT_NOTICE`), so the
hub's records stay complete.

Contents are small typed structures (:class:`TaskFlags`, :class:`QueueRequest`, ...): the
sender builds them, the receiver parses them with ``from_content``, which checks every
field by type and range and raises ``TypeError``/``ValueError`` naming the field. So a bad
flag is refused in the client before it is sent, and again in the controller (as an error
reply naming the field) before anything acts on it.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from typing import Self  # (3.11; only type checkers read it)

from . import wire
from .wire import Wire, utcnow_iso

# Requests a client sends to an engine's task lane, and their replies. An apply_request's
# content is empty, or holds a shared-memory reference under ``px_shm`` that stands for
# some of its buffers (``kernel_engine.shm``: checked and mapped by the engine).
APPLY_REQUEST = "apply_request"
APPLY_REPLY = "apply_reply"
# The controller tells a newly started engine who it is (engine id, cluster id, its own
# pid), on the engine's task lane. An engine takes a second setup only from a controller
# started after its first one died (see ``kernel_engine.engine.watch``).
ENGINE_SETUP_REQUEST = "engine_setup_request"
ENGINE_SETUP_REPLY = "engine_setup_reply"
# Sent on an engine's control channel (answered even while a task runs) by a controller
# restarted on the cluster folder, before it sets the engine up: the engine, whose
# controller died, stops counting down its grace period and waits for that setup.
ENGINE_ADOPT_REQUEST = "px_adopt_request"
ENGINE_ADOPT_REPLY = "px_adopt_reply"
# An engine started anywhere (``jupyter px engine --file``, mpiexec, srun) asks the
# controller to take it in (route ``b"hub"`` of the client socket, signed like any client
# message): :class:`RegisterRequest`, answered ``{"status": "ok", "engine_id": N}`` or an
# error; the controller then connects to the engine and sets it up as one it started.
REGISTER_REQUEST = "px_register_request"
REGISTER_REPLY = "px_register_reply"
# Sent on an engine's control channel: do not run these msg_ids when they arrive.
ENGINE_ABORT_REQUEST = "px_abort_request"
ENGINE_ABORT_REPLY = "px_abort_reply"
# Sent on an engine's control channel for an engine on another host, whose process the
# controller cannot signal: ``{"signum": N}``, one of :data:`ENGINE_SIGNALS`; the engine
# signals itself (its process group, when it leads one). SIGINT goes as Jupyter's own
# ``interrupt_request`` instead.
ENGINE_SIGNAL_REQUEST = "px_engine_signal_request"
ENGINE_SIGNAL_REPLY = "px_engine_signal_reply"
# Sent on an engine's control channel to interrupt requests, ``{"msg_ids": [...]}``: the
# one the engine runs now (it sends itself SIGINT) and any of them that starts later (it
# ends with KeyboardInterrupt as it starts, and does not run). A bare SIGINT that reached
# an engine before the request it was meant for was lost, and the request ran in full.
ENGINE_INTERRUPT_REQUEST = "px_interrupt_request"
ENGINE_INTERRUPT_REPLY = "px_interrupt_reply"

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
RESUBMIT_REQUEST = "px_resubmit_request"
# A client's account of the tasks it sent to lanes directly (route ``b"hub"``, no reply),
# the completed tasks' reply frames joined into the buffers (see ``jupyter_ext._lanes``).
DIRECT_NOTICE = "px_direct_notice"
# A client that closes says so (route ``b"hub"``, no reply): its queued tasks are dropped.
GOODBYE_NOTICE = "px_goodbye_notice"
# Sent by a client's IO thread every few seconds (route ``b"hub"``, no reply): it is alive.
# (Whether the controller is alive, a client learns from the controller's heartbeat
# port, which echoes from a thread of its own, so a busy controller never seems dead.)
KEEPALIVE_NOTICE = "px_keepalive_notice"
KEEPALIVE_EVERY = 2.0
"""Seconds between a client's keepalive notices."""
NOTICES = frozenset({DIRECT_NOTICE, GOODBYE_NOTICE, KEEPALIVE_NOTICE})

# Replies the controller keeps for other clients' ``get_result`` (larger ones are dropped).
MAX_STORED_RESULT = 1024 * 1024

# Events the controller publishes to every client on its iopub socket.
EVENT_TOPIC = b"px.event"
ENGINE_REGISTERED = "px_engine_registered"
ENGINE_UNREGISTERED = "px_engine_unregistered"
CONTROLLER_STOPPING = "px_controller_stopping"
# Published for every connect request, so a new client knows its iopub subscription works.
IOPUB_WELCOME = "px_iopub_welcome"

# The status stream (see ``kernel_engine.controller.status``): the controller publishes
# CLUSTER_STATUS on its iopub socket under STATUS_TOPIC only while someone subscribes to
# that topic (the socket is an XPUB: subscriptions reach the controller), at most every
# STATUS_EVERY seconds. STATUS_REQUEST (route ``b"hub"``) answers one snapshot at once.
STATUS_TOPIC = b"px.status"
CLUSTER_STATUS = "px_cluster_status"
STATUS_REQUEST = "px_status_request"
STATUS_EVERY = 0.25
"""Seconds between two status messages, at least (whatever the task rate)."""
# While someone watches, the controller asks each engine for its own figures (CPU,
# memory, the task it runs) on its control channel, every ENGINE_REPORT_EVERY seconds.
ENGINE_STATUS_REQUEST = "px_engine_status_request"
ENGINE_STATUS_REPLY = "px_engine_status_reply"
ENGINE_REPORT_EVERY = 0.5

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
INTERRUPTED = "Interrupted"
"""``px_error`` of a task's reply when an interrupt that named it (see
:data:`ENGINE_INTERRUPT_REQUEST`) ended it: final, never retried on another engine."""
DUPLICATE = "DuplicateRequest"
"""``px_error`` of the reply to a request whose msg_id was seen before: the reply answers
the copy, never the original, so a client never resolves a request from it."""

HEARTBEAT_MAX_BYTES = 1024
"""The largest message a heartbeat socket takes (``maxmsgsize``; a larger one drops its
peer). Pings are a few bytes, but the limit also applies to a CurveZMQ handshake's
commands, a few hundred bytes each: below that, encrypted heartbeats never start."""

LOCAL_IPS = frozenset({"127.0.0.1", "localhost", "::1"})
"""Addresses that mean "this machine"."""


def on_this_host(connection_info: dict[str, Any]) -> bool:
    """Whether a kernel's connection info names this machine: unix sockets (``ipc``), or
    a loopback address."""
    return connection_info.get("transport") == "ipc" or connection_info.get("ip") in LOCAL_IPS


def curve_wanted(ip: str, curve: bool | None = None) -> bool:
    """Whether a cluster bound to ``ip`` encrypts (CurveZMQ): as asked, else whenever it
    binds anywhere but loopback (every local user could otherwise read its traffic, and
    every host on the network)."""
    return ip not in LOCAL_IPS if curve is None else bool(curve)


HUB_ROUTE = b"hub"
LB_ROUTE = b"lb"
# Load-balanced requests may also travel many to one message on the ``lb`` route,
# ``[b"lb", *wire.pack_batch(tasks)]``: each task a whole signed message of its
# own (signature onwards), so everything after the controller's edge sees single tasks.
# Replies to a client may come back batched the same way (``wire.pack_batch``).
MAX_SUBMIT_BATCH = 1024
"""Most tasks one batch message to the controller may carry (a larger one is dropped
whole)."""
# One request for several engines (:class:`BroadcastRequest`), fanned out by the controller.
BROADCAST_ROUTE = b"broadcast"
BROADCAST_REQUEST = "px_broadcast_request"
CHANNELS = ("lane", "shell", "control")

SERVED: dict[str, frozenset[str]] = {
    "lb": frozenset({APPLY_REQUEST}),
    "broadcast": frozenset({BROADCAST_REQUEST}),
    "lane": frozenset({APPLY_REQUEST}),
    "shell": frozenset(
        {
            "execute_request",
            "complete_request",
            "inspect_request",
            "history_request",
            "is_complete_request",
            "comm_info_request",
            "kernel_info_request",
        }
    ),
    "control": frozenset(
        {
            "shutdown_request",
            "interrupt_request",
            "kernel_info_request",
            "usage_request",
            "debug_request",
            ENGINE_ABORT_REQUEST,
        }
    ),
}
"""The requests each route takes: those its engine (or scheduler) answers. Anything else
is refused at the controller's edge: a request nobody answers would hold its place (an
engine's slot, a client's wait) for ever."""


COMM_MESSAGES = frozenset({"comm_msg", "comm_close"})
"""What a frontend sends a comm (a widget) that lives on an engine, passed on by a client
to the engine's shell (route ``shell:N``). No kernel answers these, so the controller
forwards them without recording anything (no reply will come to wait for) and drops, with
no reply, what is invalid or for an engine that is not ready."""

MAX_COMM_BYTES = 32 * 1024 * 1024
"""Largest comm message (all its frames) a client may pass on to an engine."""

MAX_COMM_BUFFERS = 1024
"""Most buffers one comm message may carry."""


def reply_type(msg_type: str) -> str:
    """The reply's message type for a request's (``x_request`` -> ``x_reply``)."""
    return msg_type[: -len("_request")] + "_reply" if msg_type.endswith("_request") else "error"


MAX_IDS = 1_000_000
"""Most msg_ids (or engine ids) one request may name."""

MAX_NOTICE_ENTRIES = 20_000
"""Most requests one :data:`DIRECT_NOTICE` may name (submitted, completed and done
together): ten times what a client gathers before it sends them at once
(``jupyter_ext._lanes.MAX_WAITING``). The controller records them in one turn of its loop
(about 10 us each), which a notice of a million held for seconds, every client waiting."""

MAX_NOTICE_BYTES = 16 << 20
"""Most bytes of a :data:`DIRECT_NOTICE`'s content (its JSON), checked before it is read."""

MAX_SECONDS = 1e9
"""Longest timeout or time limit accepted (about 31 years: finite, so deadlines are)."""

MAX_RETRIES = 1_000_000

_CLIENT_ID = re.compile(rb"[0-9a-f]{16}:[sr]\Z")


def client_identity(raw: bytes) -> bytes:
    """The identity stem of a client's twin sockets (16 hex digits)."""
    return raw.hex()[:16].encode()


@functools.lru_cache(maxsize=1024)  # (asked for every message; a peer has one identity)
def reply_identity(sender: bytes) -> bytes:
    """Where replies to a client's request go.

    A client sends from one socket (any thread, under a lock) and receives on another
    (its IO thread): identities ``<16 hex>:s`` and ``<16 hex>:r``. Any other peer (the
    controller's own sockets have identities zmq makes up, which start with a zero byte)
    gets replies on the socket it sent from.
    """
    if _CLIENT_ID.match(sender) and sender.endswith(b":s"):
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
    """Split a route frame into (channel, engine id); ``("hub", None)`` for the controller.

    Raises ValueError for anything that is not a route.
    """
    if frame == HUB_ROUTE:
        return "hub", None
    if frame == LB_ROUTE:
        return "lb", None
    if frame == BROADCAST_ROUTE:
        return "broadcast", None
    channel, _, eid = frame.partition(b":")
    name = channel.decode("ascii", "replace")
    if name not in CHANNELS or not eid.isdigit() or len(eid) > 9:
        raise ValueError(f"not a route: {frame[:40]!r}")
    return name, int(eid)


def error_content(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    """The content of an error reply that the controller or lane makes itself."""
    content: dict[str, Any] = {
        "status": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": traceback or [],
    }
    if ename in CONTROLLER_ERRORS or ename == DUPLICATE:
        content["px_error"] = ename
    return content


def fail_reply(
    wire: Wire,
    client: bytes,
    request_header: dict[str, Any],
    engine_id: int | None,
    ename: str,
    evalue: str,
) -> list[Any]:
    """The frames of an error reply made for a request that will not run (or was lost).

    ``client`` is the identity the reply goes to; the reply's parent is the request's
    header, so the client matches it to its request.
    """
    msg_type = reply_type(str(request_header.get("msg_type", APPLY_REQUEST)))
    metadata = {"engine_id": engine_id, "status": "error", "completed": utcnow_iso()}
    route = HUB_ROUTE if engine_id is None else str(engine_id).encode()
    content = error_content(ename, evalue)
    content["engine_info"] = {"engine_id": engine_id}
    return wire.pack(msg_type, content, request_header, metadata, idents=[client, route])[1]


# ----- field checks: each raises TypeError or ValueError naming the field


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"


def check_seconds(
    name: str, value: Any, positive: bool = False, past: bool = False
) -> float | None:
    """A number of seconds (or None): finite, at least 0 (above 0 when ``positive``; any
    when ``past``: a negative timeout has passed already), returned as a float; any real
    number (numpy's ``float32``...), not a bool."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise TypeError(f"{name} must be a number of seconds or None, not {_kind(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or (seconds < 0 and not past) or (positive and seconds == 0):
        low = "above 0" if positive else "at least 0"
        raise ValueError(f"{name} must be a finite number of seconds {low}, not {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS} seconds, not {value!r}")
    return seconds


def client_uuid(route: bytes) -> str:
    """A client's name in logs and records: its routing id's first 16 bytes, as text."""
    return route[:16].decode("ascii", "replace")


def check_int(name: str, value: Any, low: int = 0, high: int = MAX_IDS) -> int:
    """An integer in ``[low, high]``, returned as an int: an int or any integral type
    (``operator.index``: numpy's ``int64``...), not a bool (numpy's neither)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {_kind(value)}")
    if not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, not {_kind(value)}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {_kind(value)}")
    return value


def check_label(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, not {_kind(value)}")
    if len(value) > 1024:
        raise ValueError(f"{name} must be at most 1024 characters, not {len(value)}")
    return value


def check_ids(name: str, value: Any, allow_none: bool = True) -> tuple[int, ...] | None:
    """Engine ids: a list of ints (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of engine ids, not {_kind(value)}")
    if len(value) > MAX_IDS:
        raise ValueError(f"{name} names {len(value)} engines, more than {MAX_IDS}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold engine ids (ints), not {_kind(item)}")
        if item < 0:
            raise ValueError(f"{name} must hold engine ids (ints at least 0), not {item}")
    return tuple(value)


def check_msg_id(name: str, value: Any) -> str:
    """A msg_id (or message type): a string of 1 to 256 characters."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {_kind(value)}")
    if not 0 < len(value) <= 256:
        raise ValueError(f"{name} must have 1 to 256 characters, not {len(value)}")
    if not wire.is_unicode(value):
        raise ValueError(f"{name} must be valid Unicode (a lone surrogate is not)")
    return value


def check_msg_ids(name: str, value: Any) -> tuple[str, ...]:
    """msg_ids: a list of non-empty strings."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of msg_ids, not {_kind(value)}")
    if len(value) > MAX_IDS:
        raise ValueError(f"{name} names {len(value)} msg_ids, more than {MAX_IDS}")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= 256:
            raise TypeError(f"{name} must hold msg_ids (strings), not {_kind(item)}")
        if not wire.is_unicode(item):
            raise ValueError(f"{name} must hold valid Unicode (a lone surrogate is not)")
    return tuple(value)


def _plain_id(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a msg_id :func:`check_msg_id` takes, found without a call of
    it: a ``str`` of 1 to 256 ASCII characters (the others go through it, which says why
    it refuses one)."""
    return type(value) is str and 0 < len(value) <= 256 and value.isascii()


_INTS = frozenset({int})


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object, not {_kind(value)}")
    return value


# ----- contents


@dataclass(frozen=True, slots=True)
class DependencySpec:
    """The ``after``/``follow`` of a load-balanced task: msg_ids and how they count."""

    msg_ids: tuple[str, ...]
    all: bool = True
    success: bool = True
    failure: bool = False

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_ids": list(self.msg_ids),
            "all": self.all,
            "success": self.success,
            "failure": self.failure,
        }

    @classmethod
    def from_content(cls, name: str, value: Any) -> DependencySpec | None:
        """None for no dependency (None, or no msg_ids)."""
        if value is None:
            return None
        spec = _mapping(name, value)
        unknown = set(spec) - {"msg_ids", "all", "success", "failure"}
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}")
        dep = cls(
            check_msg_ids(f"{name}.msg_ids", spec.get("msg_ids", [])),
            check_bool(f"{name}.all", spec.get("all", True)),
            check_bool(f"{name}.success", spec.get("success", True)),
            check_bool(f"{name}.failure", spec.get("failure", False)),
        )
        if not (dep.success or dep.failure):
            raise ValueError(f"{name} counts neither success nor failure as met")
        return dep if dep.msg_ids else None


@dataclass(frozen=True, slots=True)
class TaskFlags:
    """The metadata of a load-balanced ``apply_request``: the view's flags.

    ``timeout`` bounds the wait for dependencies, ``time_limit`` the run time (seconds);
    ``retries`` resubmits a task that failed or whose engine died.
    """

    targets: tuple[int, ...] | None = None
    after: DependencySpec | None = None
    follow: DependencySpec | None = None
    timeout: float | None = None
    retries: int = 0
    time_limit: float | None = None
    label: str | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "targets": None if self.targets is None else list(self.targets),
            "after": self.after.to_content() if self.after else None,
            "follow": self.follow.to_content() if self.follow else None,
            "timeout": self.timeout,
            "retries": self.retries,
            "time_limit": self.time_limit,
            "label": self.label,
        }

    @classmethod
    def from_content(cls, md: dict[str, Any]) -> TaskFlags:
        return cls(
            targets=check_ids("targets", md.get("targets")),
            after=DependencySpec.from_content("after", md.get("after")),
            follow=DependencySpec.from_content("follow", md.get("follow")),
            timeout=check_seconds("timeout", md.get("timeout")),
            retries=check_int("retries", md.get("retries", 0) or 0, 0, MAX_RETRIES),
            time_limit=check_seconds("time_limit", md.get("time_limit"), positive=True),
            label=check_label("label", md.get("label")),
        )


@dataclass(frozen=True, slots=True)
class Empty:
    """A request without content (connect, history)."""

    def to_content(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class QueueRequest:
    """``queue_status``: per engine of ``targets`` (None: all)."""

    targets: tuple[int, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else list(self.targets)}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(check_ids("targets", content.get("targets")))


@dataclass(frozen=True, slots=True)
class ResultRequest:
    """The controller's records (and stored results) of these msg_ids."""

    msg_ids: tuple[str, ...]

    def to_content(self) -> dict[str, Any]:
        return {"msg_ids": list(self.msg_ids)}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(check_msg_ids("msg_ids", content.get("msg_ids", [])))


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    """Forget finished records: ``msg_ids`` (None: all), or those of ``engine_ids``."""

    msg_ids: tuple[str, ...] | None
    engine_ids: tuple[int, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_ids": "all" if self.msg_ids is None else list(self.msg_ids),
            "engine_ids": None if self.engine_ids is None else list(self.engine_ids),
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        raw = content.get("msg_ids", "all")
        msg_ids = None if raw == "all" else check_msg_ids("msg_ids", raw)
        return cls(msg_ids, check_ids("engine_ids", content.get("engine_ids")))


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Do not run these msg_ids (queued ones fail with TaskAborted); ``targets`` are the
    engines to tell (None: all)."""

    msg_ids: tuple[str, ...]
    targets: tuple[int, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_ids": list(self.msg_ids),
            "targets": None if self.targets is None else list(self.targets),
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(
            check_msg_ids("msg_ids", content.get("msg_ids", [])),
            check_ids("targets", content.get("targets")),
        )


_SIGNALS = frozenset(int(s) for s in signal.Signals)

ENGINE_SIGNALS = frozenset(
    int(getattr(signal, name))
    for name in ("SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
"""The signals an engine sends itself on request (:data:`ENGINE_SIGNAL_REQUEST`): those
that interrupt, end or notify it; not SIGSTOP and the like, which nothing could undo
through the engine."""


def check_engine_signal(name: str, value: Any) -> int:
    """One of :data:`ENGINE_SIGNALS`, as an int (ValueError/TypeError naming ``name``)."""
    signum = check_int(name, value, 1, 64)
    if signum not in ENGINE_SIGNALS:
        allowed = ", ".join(signal.Signals(s).name for s in sorted(ENGINE_SIGNALS))
        raise ValueError(
            f"{name} {signum} is not a signal an engine sends itself (one of {allowed})"
        )
    return signum


@dataclass(frozen=True, slots=True)
class SignalRequest:
    """Signal engines: ``targets`` (None: all), or those running ``msg_ids`` (plus the
    ``targets`` a client names for requests it sent to lanes itself)."""

    signum: int
    targets: tuple[int, ...] | None = None
    msg_ids: tuple[str, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "signum": self.signum,
            "targets": None if self.targets is None else list(self.targets),
            "msg_ids": None if self.msg_ids is None else list(self.msg_ids),
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        signum = check_int("signum", content.get("signum", int(signal.SIGINT)), 1, 64)
        if signum not in _SIGNALS:
            raise ValueError(f"signum {signum} is not a signal of this system")
        raw = content.get("msg_ids")
        return cls(
            signum,
            check_ids("targets", content.get("targets")),
            None if raw is None else check_msg_ids("msg_ids", raw),
        )


@dataclass(frozen=True, slots=True)
class ShutdownRequest:
    """Stop engines ``targets`` (None: all); with ``hub``, the controller and everything."""

    targets: tuple[int, ...] | None = None
    hub: bool = False

    def to_content(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else list(self.targets), "hub": self.hub}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(
            check_ids("targets", content.get("targets")),
            check_bool("hub", content.get("hub", False)),
        )


@dataclass(frozen=True, slots=True)
class DbRequest:
    """Records whose fields match ``query`` (field -> value), with ``keys`` (None: all)."""

    query: dict[str, Any]
    keys: tuple[str, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {"query": self.query, "keys": None if self.keys is None else list(self.keys)}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        query = _mapping("query", content.get("query", {}))
        keys = content.get("keys")
        if keys is not None:
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise TypeError(f"keys must be a list of strings or None, not {_kind(keys)}")
            keys = tuple(keys)
        return cls(query, keys)


@dataclass(frozen=True, slots=True)
class ResubmitRequest:
    """Run finished tasks again: each ``(old, new)`` pair submits ``old``'s request anew,
    load-balanced, as ``new`` (a msg_id the client made, so that it can wait for it)."""

    pairs: tuple[tuple[str, str], ...]

    def to_content(self) -> dict[str, Any]:
        return {"msg_ids": dict(self.pairs)}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        raw = _mapping("msg_ids", content.get("msg_ids"))
        if len(raw) > MAX_IDS:
            raise ValueError(f"msg_ids names {len(raw)} tasks, more than {MAX_IDS}")
        pairs = tuple(
            (check_msg_id("msg_ids", k), check_msg_id("new msg_id", v)) for k, v in raw.items()
        )
        if len({new for _, new in pairs}) != len(pairs):
            raise ValueError("the new msg_ids must differ from each other")
        return cls(pairs)


@dataclass(frozen=True, slots=True)
class StartRequest:
    """Start ``n`` more engines."""

    n: int = 1

    def to_content(self) -> dict[str, Any]:
        return {"n": self.n}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(check_int("n", content.get("n", 1), 1, 4096))


REPLIES_DROPPED = "px_replies_dropped"
"""The controller's notice to a client that did not read what it was sent for so long that
messages for it were dropped (see ``controller.outbox``): the client then asks for the
outcome of every task of its own still pending on the controller's paths (their records
keep them), so that none waits for a reply that will never come."""

MERGED_REPLIES = "px_replies"
"""A format of the controller's replies a client may say it reads (:class:`ConnectRequest`):
several engines' task replies in one message, see :mod:`kernel_engine.replies`."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A client arrives (or asks again). ``reads``: the formats of the controller's
    replies, beyond single messages, that it understands (:data:`MERGED_REPLIES`); a
    client that names none gets every reply as the engine made it. Names not known here
    are ignored (a newer client's)."""

    reads: tuple[str, ...] = ()

    def to_content(self) -> dict[str, Any]:
        return {"reads": list(self.reads)}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        reads = content.get("reads", [])
        if not isinstance(reads, list) or len(reads) > 16:
            raise ValueError(f"reads must be a list of at most 16 names, not {_kind(reads)}")
        for name in reads:
            if not isinstance(name, str) or len(name) > 64:
                raise ValueError(f"reads must name formats as strings, not {_kind(name)}")
        return cls(tuple(reads))


HUB_REQUESTS: dict[str, Any] = {
    CONNECT_REQUEST: ConnectRequest,
    HISTORY_REQUEST: Empty,
    QUEUE_REQUEST: QueueRequest,
    RESULT_REQUEST: ResultRequest,
    PURGE_REQUEST: PurgeRequest,
    ABORT_REQUEST: AbortRequest,
    SIGNAL_REQUEST: SignalRequest,
    SHUTDOWN_REQUEST: ShutdownRequest,
    DB_REQUEST: DbRequest,
    START_REQUEST: StartRequest,
    RESUBMIT_REQUEST: ResubmitRequest,
    STATUS_REQUEST: Empty,
}
"""Each request the controller answers itself, and the structure of its content."""


@dataclass(frozen=True, slots=True)
class DirectSubmitted:
    """One request a client sent to a lane directly."""

    msg_id: str
    msg_type: str
    date: str
    engine_id: int
    label: str | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "date": self.date,
            "engine_id": self.engine_id,
            "label": self.label,
        }

    @classmethod
    def from_content(cls, item: Any) -> Self:
        if type(item) is dict:  # (the common case, checked at once: same checks as below)
            get = item.get
            msg_id, msg_type, date, eid, label = (
                get("msg_id"),
                get("msg_type"),
                get("date"),
                get("engine_id"),
                get("label"),
            )
            if (
                _plain_id(msg_id)
                and _plain_id(msg_type)
                and _plain_id(date)
                and type(eid) is int
                and 0 <= eid <= MAX_IDS
                and (label is None or (type(label) is str and len(label) <= 1024))
            ):
                return cls(msg_id, msg_type, date, eid, label)
        item = _mapping("submitted", item)
        return cls(
            check_msg_id("msg_id", item.get("msg_id")),
            check_msg_id("msg_type", item.get("msg_type")),
            check_msg_id("date", item.get("date")),
            check_int("engine_id", item.get("engine_id")),
            check_label("label", item.get("label")),
        )


@dataclass(frozen=True, slots=True)
class DirectCompleted:
    """One direct request that finished: its outcome, and the sizes of its reply frames
    (in the notice's buffers) when small enough to keep."""

    msg_id: str
    engine_id: int | None
    status: str
    started: str | None = None
    completed: str | None = None
    sizes: tuple[int, ...] | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_id": self.msg_id,
            "engine_id": self.engine_id,
            "status": self.status,
            "started": self.started,
            "completed": self.completed,
            "sizes": None if self.sizes is None else list(self.sizes),
        }

    @classmethod
    def from_content(cls, item: Any) -> Self:
        if type(item) is dict:  # (the common case, checked at once: same checks as below)
            get = item.get
            msg_id, eid, status, started, completed, sizes = (
                get("msg_id"),
                get("engine_id"),
                get("status"),
                get("started"),
                get("completed"),
                get("sizes"),
            )
            if (
                _plain_id(msg_id)
                and (eid is None or (type(eid) is int and 0 <= eid <= MAX_IDS))
                and type(status) is str
                and status in ("ok", "error", "aborted")
                and (started is None or (type(started) is str and len(started) <= 1024))
                and (completed is None or (type(completed) is str and len(completed) <= 1024))
                and (
                    sizes is None
                    or (
                        type(sizes) is list
                        and len(sizes) <= MAX_IDS
                        and _INTS.issuperset(map(type, sizes))
                        and (not sizes or min(sizes) >= 0)
                    )
                )
            ):
                return cls(
                    msg_id, eid, status, started, completed, None if sizes is None else tuple(sizes)
                )
        item = _mapping("completed", item)
        msg_id = check_msg_id("msg_id", item.get("msg_id"))
        eid = item.get("engine_id")
        status = item.get("status")
        if status not in ("ok", "error", "aborted"):
            raise ValueError(f"status must be 'ok', 'error' or 'aborted', not {_kind(status)}")
        sizes = check_ids("sizes", item.get("sizes"))
        return cls(
            msg_id,
            None if eid is None else check_int("engine_id", eid),
            status,
            check_label("started", item.get("started")),
            check_label("completed", item.get("completed")),
            sizes,
        )


@dataclass(frozen=True, slots=True)
class DirectNotice:
    """What a client sent to lanes directly, and what came back (see ``_lanes``).

    ``done``: requests both sent and answered since the last notice, each as the pair of
    its two entries, which go as one JSON object (the union of their fields; the
    submitted entry's engine id, which is never None). A controller records them at
    once, without holding them in flight. In a loop of blocking calls that is every
    request: one object to write and read instead of two. Their reply frames come first
    in the buffers, in order, then those of ``completed``."""

    submitted: tuple[DirectSubmitted, ...] = ()
    completed: tuple[DirectCompleted, ...] = ()
    done: tuple[tuple[DirectSubmitted, DirectCompleted], ...] = ()

    def to_content(self) -> dict[str, Any]:
        content = {
            "submitted": [s.to_content() for s in self.submitted],
            "completed": [c.to_content() for c in self.completed],
        }
        if self.done:
            content["done"] = [c.to_content() | s.to_content() for s, c in self.done]
        return content

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        submitted = content.get("submitted", [])
        completed = content.get("completed", [])
        done = content.get("done", [])
        for name, items in (("submitted", submitted), ("completed", completed), ("done", done)):
            if not isinstance(items, list):
                raise TypeError(f"{name} must be a list, not {_kind(items)}")
        total = len(submitted) + len(completed) + len(done)
        if total > MAX_NOTICE_ENTRIES:
            raise ValueError(
                f"a direct notice names at most {MAX_NOTICE_ENTRIES} requests, not {total}"
            )
        return cls(
            tuple(DirectSubmitted.from_content(s) for s in submitted),
            tuple(DirectCompleted.from_content(c) for c in completed),
            tuple(map(_done_pair, done)),
        )


def _done_pair(item: Any) -> tuple[DirectSubmitted, DirectCompleted]:
    """A ``done`` entry of a :class:`DirectNotice`: both entries, read from one object
    (so with one engine id, which the submitted entry's check makes an int)."""
    return DirectSubmitted.from_content(item), DirectCompleted.from_content(item)


MAX_BROADCAST_TARGETS = 10_000
"""Most engines one broadcast request may name."""

BROADCAST_TYPES = {APPLY_REQUEST: "lane", "execute_request": "shell"}
"""What a broadcast may carry, and the engine channel each goes to."""


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    """One request for several engines (:data:`BROADCAST_REQUEST`, route
    :data:`BROADCAST_ROUTE`): the controller sends ``msg_type`` with ``content`` and the
    broadcast's own metadata and buffers to each of ``targets``, as a request whose msg_id
    is the matching one of ``msg_ids`` (made by the client, so each engine's part is a
    task of its own: its record, its reply, its error). A target may appear more than
    once; the msg_ids must differ."""

    msg_type: str
    targets: tuple[int, ...]
    msg_ids: tuple[str, ...]
    content: dict[str, Any]

    @property
    def channel(self) -> str:
        """The engine channel the parts go to."""
        return BROADCAST_TYPES[self.msg_type]

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_type": self.msg_type,
            "targets": list(self.targets),
            "msg_ids": list(self.msg_ids),
            "content": self.content,
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        msg_type = content.get("msg_type")
        if not isinstance(msg_type, str):
            raise TypeError(f"msg_type must be a string, not {_kind(msg_type)}")
        if msg_type not in BROADCAST_TYPES:
            raise ValueError(f"msg_type {msg_type[:60]!r} is not one of {sorted(BROADCAST_TYPES)}")
        targets = content.get("targets")
        msg_ids = content.get("msg_ids")
        for name, items in (("targets", targets), ("msg_ids", msg_ids)):
            if not isinstance(items, list):
                raise TypeError(f"{name} must be a list, not {_kind(items)}")
            if not 0 < len(items) <= MAX_BROADCAST_TARGETS:
                raise ValueError(
                    f"{name} must name 1 to {MAX_BROADCAST_TARGETS} items, not {len(items)}"
                )
        assert isinstance(targets, list) and isinstance(msg_ids, list)
        if len(targets) != len(msg_ids):
            raise ValueError(f"{len(targets)} targets but {len(msg_ids)} msg_ids")
        ids = tuple(check_int("targets", t, 0, MAX_ENGINE_ID) for t in targets)
        mids = tuple(check_msg_id("msg_ids", m) for m in msg_ids)
        if len(set(mids)) != len(mids):
            raise ValueError("msg_ids must differ from each other")
        return cls(msg_type, ids, mids, _mapping("content", content.get("content", {})))


@dataclass(frozen=True, slots=True)
class CommMessage:
    """The content of a ``comm_msg`` or ``comm_close`` for a comm on an engine."""

    comm_id: str
    data: dict[str, Any]

    def to_content(self) -> dict[str, Any]:
        return {"comm_id": self.comm_id, "data": self.data}

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        return cls(
            check_msg_id("comm_id", content.get("comm_id")),
            _mapping("data", content.get("data", {})),
        )


def check_comm_size(n_buffers: int, n_bytes: int) -> None:
    """A comm message of ``n_buffers`` buffers and ``n_bytes`` in all its frames: within
    :data:`MAX_COMM_BUFFERS` and :data:`MAX_COMM_BYTES`, else ValueError."""
    if n_buffers > MAX_COMM_BUFFERS:
        raise ValueError(f"a comm message has {n_buffers} buffers, more than {MAX_COMM_BUFFERS}")
    if n_bytes > MAX_COMM_BYTES:
        raise ValueError(f"a comm message of {n_bytes} bytes is over {MAX_COMM_BYTES}")


@dataclass(frozen=True, slots=True)
class EngineSetup:
    """What the controller tells an engine when it sets it up or adopts it
    (:data:`ENGINE_SETUP_REQUEST`, :data:`ENGINE_ADOPT_REQUEST`): its id, the cluster's,
    and the controller's pid, which the engine watches (None: a controller on another
    host, or one that does not say)."""

    engine_id: int
    cluster_id: str = ""
    controller_pid: int | None = None

    def to_content(self) -> dict[str, Any]:
        content: dict[str, Any] = {"engine_id": self.engine_id, "cluster_id": self.cluster_id}
        if self.controller_pid is not None:
            content["controller_pid"] = self.controller_pid
        return content

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        pid = content.get("controller_pid")
        return cls(
            check_int("engine_id", content.get("engine_id")),
            check_label("cluster_id", content.get("cluster_id", "")) or "",
            None if pid is None else check_int("controller_pid", pid, 1, 2**31),
        )


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What clients learn about an engine (events, the connect reply, ``engine_info``)."""

    id: int
    uuid: str
    pid: int | None
    hostname: str
    state: str
    connection_info: dict[str, Any]

    def to_content(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "uuid": self.uuid,
            "pid": self.pid,
            "hostname": self.hostname,
            "state": self.state,
            "connection_info": self.connection_info,
        }

    @classmethod
    def from_content(cls, info: Any) -> Self:
        info = _mapping("engine", info)
        pid = info.get("pid")
        return cls(
            check_int("id", info.get("id")),
            check_label("uuid", info.get("uuid", "")) or "",
            None if pid is None else check_int("pid", pid, 1, 2**31),
            check_label("hostname", info.get("hostname", "")) or "",
            check_label("state", info.get("state", "")) or "",
            _mapping("connection_info", info.get("connection_info", {})),
        )


@dataclass(frozen=True, slots=True)
class EngineReport:
    """What an engine says of itself (:data:`ENGINE_STATUS_REPLY`): CPU use since its last
    report (percent of one core), resident memory (bytes), and the task it runs (msg_id,
    function name, since when as a Unix time), each None when unknown."""

    cpu: float | None = None
    rss: int | None = None
    task: str | None = None
    task_name: str | None = None
    task_since: float | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "rss": self.rss,
            "task": self.task,
            "task_name": self.task_name,
            "task_since": self.task_since,
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        cpu = content.get("cpu")
        rss = content.get("rss")
        since = content.get("task_since")
        task = content.get("task")
        return cls(
            None if cpu is None else _finite("cpu", cpu, 1e6),
            None if rss is None else check_int("rss", rss, 0, 2**62),
            None if task is None else check_msg_id("task", task),
            check_label("task_name", content.get("task_name")),
            None if since is None else _finite("task_since", since, 1e11),
        )


def _finite(name: str, value: Any, high: float) -> float:
    """A number in ``[0, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {_kind(value)}")
    if not (math.isfinite(value) and 0 <= value <= high):
        raise ValueError(f"{name} must be a finite number from 0 to {high:g}, not {value!r}")
    return float(value)


MAX_ENGINE_ID = 999_999
"""The highest engine id a registrant may ask for."""

_HOST = re.compile(r"[A-Za-z0-9_.:%-]{1,253}\Z")
_CURVE_KEY = re.compile(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}\Z")
_KERNEL_PORTS = ("shell_port", "control_port", "iopub_port", "hb_port", "stdin_port", "lane_port")


def check_host(name: str, value: Any) -> str:
    """A host name or IP address (letters, digits, ``_.:%-``; no URL, no spaces)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a host name or address, not {_kind(value)}")
    if not _HOST.match(value):
        raise ValueError(f"{name} {value[:60]!r} is not a host name or address")
    return value


SOCKET_PREFIX_MAX = 92
"""The longest unix socket path prefix, in bytes: what
:func:`kernel_engine.launchers.local.ipc_unusable` lets an engine use (``IPC_PATH_MAX``
100, less 8 for ``-<port>``)."""

_SOCKET_PREFIX_BAD = re.compile(r"[\x00-\x1f\x7f]")


def check_socket_prefix(name: str, value: Any) -> str:
    """The path a kernel's unix sockets start with (``<path>-<port>`` each): absolute,
    short enough for a socket's address, no control characters, no ``..``. (Any other
    character a folder's name may hold is fine: the controller takes only a prefix whose
    folder resolves to its own.)"""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a unix socket path, not {_kind(value)}")
    try:
        size = len(value.encode())
    except UnicodeError:
        size = SOCKET_PREFIX_MAX + 1
    if (
        not value.startswith("/")
        or size > SOCKET_PREFIX_MAX
        or value.endswith("/")
        or _SOCKET_PREFIX_BAD.search(value)
        or "/../" in value + "/"
        or "//" in value
    ):
        raise ValueError(f"{name} {value[:100]!r} is not a usable unix socket path")
    return value


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """An engine that asks to join the cluster (:data:`REGISTER_REQUEST`).

    ``connection_info`` is its kernel's (address and transport ``tcp``, or a path in the
    cluster's folder and transport ``ipc`` for unix sockets, the five Jupyter ports,
    ``lane_port`` and, when it encrypts, its CurveZMQ keypair), which the controller
    connects to; ``engine_id`` the id it asks for (None: any; an MPI rank asks for its
    rank); ``pid``, ``hostname`` and ``uuid`` (its kernel's session id) say which process
    it is, so a repeated registration of the same process gets the same answer.
    """

    connection_info: dict[str, Any]
    pid: int
    hostname: str
    uuid: str
    engine_id: int | None = None

    def to_content(self) -> dict[str, Any]:
        return {
            "connection_info": self.connection_info,
            "pid": self.pid,
            "hostname": self.hostname,
            "uuid": self.uuid,
            "engine_id": self.engine_id,
        }

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> Self:
        raw = _mapping("connection_info", content.get("connection_info"))
        transport = raw.get("transport", "tcp")
        if transport == "ipc":
            info: dict[str, Any] = {"ip": check_socket_prefix("connection_info.ip", raw.get("ip"))}
        elif transport == "tcp":
            info = {"ip": check_host("connection_info.ip", raw.get("ip"))}
        else:
            raise ValueError(
                f"connection_info.transport must be 'tcp' or 'ipc', not {_kind(transport)}"
            )
        info["transport"] = transport
        ports = [check_int(f"connection_info.{p}", raw.get(p), 1, 65535) for p in _KERNEL_PORTS]
        if len(set(ports)) != len(ports):
            raise ValueError("connection_info has the same port twice")
        info.update(zip(_KERNEL_PORTS, ports))
        scheme = raw.get("signature_scheme", "hmac-sha256")
        if scheme != "hmac-sha256":
            raise ValueError(f"signature_scheme must be 'hmac-sha256', not {_kind(scheme)}")
        info["signature_scheme"] = scheme
        public, secret = raw.get("curve_publickey"), raw.get("curve_secretkey")
        if public is not None or secret is not None:
            for name, key in (("curve_publickey", public), ("curve_secretkey", secret)):
                if not isinstance(key, str) or not _CURVE_KEY.match(key):
                    raise ValueError(f"connection_info.{name} must be a Z85 CurveZMQ key")
            info["curve_publickey"], info["curve_secretkey"] = public, secret
        uuid = check_label("uuid", content.get("uuid"))
        if not uuid:
            raise ValueError("uuid (the engine kernel's session id) is required")
        eid = content.get("engine_id")
        return cls(
            info,
            check_int("pid", content.get("pid"), 1, 2**31),
            check_host("hostname", content.get("hostname")),
            uuid,
            None if eid is None else check_int("engine_id", eid, 0, MAX_ENGINE_ID),
        )
