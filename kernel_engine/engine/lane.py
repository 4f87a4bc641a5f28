"""The task lane: ``apply_request`` served with the least work per message.

The lane is one ROUTER socket read on the engine's main thread event loop (the thread that
runs cells), so tasks and cells never run at the same time and both see one namespace.
Per message: verify, unpack, call, pack, reply. Output a task prints goes to iopub with the
task's request as parent (ipykernel's own streams) and is also returned in the reply's
metadata, so the client has it with the result. A lane message may be a batch
(:func:`kernel_engine.wire.pack_batch`): each task gets its own reply, and the replies
go back as one batch.

Anyone on the host can connect to the lane, so nothing is trusted before it is checked:
every message's signature is verified before any of it is parsed; batches are taken only
from the controller (the peer that sent the signed ``engine_setup_request``; its identity
is one zmq made up, which no other peer can claim), and only once their index matches
their frames; a message from anyone else whose msg_id was seen lately is a replay and
gets an error reply instead of running twice. Dropped input is counted and logged once
per interval.

A controller that dies leaves its engines running for a grace period (see
:mod:`.watch`). A controller restarted on the cluster folder then sets the lane up again:
a second ``engine_setup_request`` is taken only once the first controller's process is
gone (a live controller keeps its engines). The socket is a mandatory router, so a reply
for a controller that is gone is not dropped silently: it is kept (bounded) and sent to
the controller that adopts the engine, right before its setup reply, so tasks that were
running when the controller died still complete in its records.
"""

from __future__ import annotations

import _signal
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.eventloop.zmqstream import ZMQStream

from kernel_engine import protocol, shm, wire
from kernel_engine.errors import SerializationError
from kernel_engine.serialize import dumps_result, unpack_apply

from .usage import task_name

if TYPE_CHECKING:
    from .kernel import EngineKernel

FLUSH_AFTER = 0.005
"""Seconds of work after which a batch's finished replies are sent."""

DRAIN_LIMIT = 1000
"""Messages read per wake-up before the kernel's other channels get their turn."""

MAX_KEPT = 10_000
"""Replies kept for a controller that is gone, at most (the oldest are dropped)."""

MAX_KEPT_BYTES = 256 * 1024 * 1024
"""Bytes of replies kept for a controller that is gone, at most."""

_SIGINT = int(signal.SIGINT)


class Interruptible:
    """Whether an interrupt (SIGINT) may cut what runs short now: user code (a task, a
    cell) runs armed; the engine's own steps around it do not."""

    armed = False
    raised = 0
    """KeyboardInterrupts raised so far (one that code swallowed still counts)."""


def interrupt_user_code(signum: int, frame: Any) -> None:
    """SIGINT's handler while the engine handles a request: KeyboardInterrupt in user
    code; dropped anywhere else. Raised in the engine's own steps (after a task ended,
    while its error was written up, in the swap of handlers back), it left the lane's
    loop and ended the engine, or lost a cell's reply."""
    if Interruptible.armed:
        Interruptible.raised += 1
        raise KeyboardInterrupt


def signal_self(signum: int) -> None:
    """A signal to this engine, as a kernel manager signals a kernel: to its process
    group when it leads one (a task's child processes too)."""
    pid = os.getpid()
    if os.getpgid(0) == pid:
        os.killpg(pid, signum)
    else:
        os.kill(pid, signum)


def time_limit_of(parent: dict[str, Any]) -> float | None:
    """A request's ``time_limit`` (seconds it may run, from its start), if it has a valid one."""
    metadata = parent.get("metadata")
    value = metadata.get("time_limit") if isinstance(metadata, dict) else None
    try:
        return protocol.check_seconds("time_limit", value, positive=True)
    except (TypeError, ValueError):
        return None


REPEAT_INTERRUPT = 1.0
"""Seconds between the interrupts a task over its time limit gets while it still runs
(user code that catches KeyboardInterrupt and carries on gets the next one)."""


class Watchdog:
    """The engine's time limits: one thread that interrupts the running task once its
    limit, counted from its start, has run out, and again every ``REPEAT_INTERRUPT``
    seconds while it still runs; the task's reply then says TaskTimeout. Counted here, in
    the engine: the controller, which can only count from its dispatch, timed out tasks
    that waited behind others on their engine.

    One task runs at a time, so one slot and one thread serve every task: arming and
    disarming take a lock and set the slot (a thread per task, as before, cost a tiny task
    more than its own run). The thread wakes only at the deadline it last read, or when a
    task is armed with an earlier one.

    ``running()`` gives the msg_id of the task the engine runs now (or None) and ``fire()``
    interrupts it; both are called on the watchdog's thread, under its lock, so a task
    that has disarmed cannot be interrupted for its limit afterwards.
    """

    def __init__(self, running: Callable[[], str | None], fire: Callable[[], None]):
        self._running, self._fire = running, fire
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slot: tuple[str, float] | None = None
        self._wakes_at = math.inf
        self._ran_out: str | None = None
        self._thread: threading.Thread | None = None

    def arm(self, msg_id: str, seconds: float) -> None:
        """Time ``msg_id``, which starts now, for ``seconds``."""
        deadline = time.monotonic() + seconds
        with self._lock:
            self._slot, self._ran_out = (msg_id, deadline), None
            if self._thread is None:  # (started on first use: engines may be forked)
                self._thread = threading.Thread(
                    target=self._run, name="px-time-limits", daemon=True
                )
                self._thread.start()
            elif deadline < self._wakes_at:
                self._wake.notify()

    def disarm(self, msg_id: str) -> bool:
        """Stop timing ``msg_id``; whether its limit ran out (it was interrupted for it)."""
        with self._lock:
            ran_out = self._ran_out == msg_id
            if self._slot is not None and self._slot[0] == msg_id:
                self._slot = None
            if ran_out:
                self._ran_out = None
            return ran_out

    def _run(self) -> None:
        with self._lock:
            while True:
                slot = self._slot
                if slot is None:
                    self._wakes_at = math.inf
                    self._wake.wait()
                    continue
                msg_id, deadline = slot
                now = time.monotonic()
                if now < deadline:
                    self._wakes_at = deadline
                    self._wake.wait(deadline - now)
                    continue
                if self._running() != msg_id:  # (ended, its disarm not yet taken)
                    self._slot = None
                    continue
                self._ran_out = msg_id
                self._slot = (msg_id, now + REPEAT_INTERRUPT)
                try:
                    self._fire()
                except Exception:  # (an engine that cannot signal itself: the thread stays)
                    pass


_OK = {"status": "ok"}
_OK_JSON = wire.dumps_json(_OK)
"""The content of a successful reply, encoded once (it is the same for every task)."""
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tee:
    """Writes go to the kernel's stream (so iopub sees them) and to a local copy.

    Not an ``io.IOBase``: that would flush the kernel's stream when garbage-collected.
    """

    def __init__(self, stream: Any):
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return int(self.stream.write(text) or len(text))

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def text(self) -> str:
        return "".join(self.parts)


def format_traceback(exc: BaseException) -> list[str]:
    """The traceback of a task's exception, without the lane's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).splitlines()


class TaskLane:
    """Receives tasks on ``socket`` and runs them on the kernel's main thread."""

    def __init__(self, kernel: EngineKernel, socket: Any):
        self.kernel = kernel
        self.socket = socket
        session = kernel.session
        assert session is not None, "the kernel has no session"
        self.wire = wire.Wire(session.key, session=session.session)
        self.aborted = wire.SeenWindow(16384)
        self.seen = wire.SeenWindow(16384)
        self.controller: bytes | None = None
        # earlier controllers' identities: replies still addressed to them go to the current
        self._former: deque[bytes] = deque(maxlen=16)
        self._kept: deque[list[Any]] = deque()
        self._kept_bytes = 0
        self.watch = getattr(kernel, "controller_watch", None)
        self.drops = wire.DropLog(kernel.log, "task lane")
        self.stream: ZMQStream | None = None
        self._asyncio_loop: Any = None
        self.watchdog = Watchdog(self._running, lambda: signal_self(signal.SIGINT))
        self.result_segments = shm.ResultSegments()

    def _running(self) -> str | None:
        task = self.kernel.current_task
        return None if task is None else task[0]

    def start(self) -> None:
        """Serve the lane on the kernel's main event loop.

        The socket's file descriptor is watched directly by the asyncio loop under
        ipykernel's tornado loop (cheaper per message than a ZMQStream); the handler drains
        every queued message, since a zmq descriptor only signals edges.
        """
        asyncio_loop = getattr(self.kernel.io_loop, "asyncio_loop", None)
        if asyncio_loop is None:
            self.stream = ZMQStream(self.socket, self.kernel.io_loop)
            self.stream.on_recv(self._on_recv, copy=False)
            return
        self._asyncio_loop = asyncio_loop
        asyncio_loop.add_reader(self.socket.FD, self._on_readable)
        # messages that arrived before the reader was added raise no new edge
        asyncio_loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        # A wake-up is nearly always for a message: it is read at once, and ``EVENTS`` is
        # asked only after each one (asking first too cost a second command round in
        # libzmq per task). Both ways out leave the descriptor armed again: a NOBLOCK
        # receive that finds nothing processes the socket's commands as ``EVENTS`` does.
        socket = self.socket
        for _ in range(DRAIN_LIMIT):
            try:
                frames = wire.recv_frames(socket, wire.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_recv(frames)
            except Exception as exc:
                self.drops.drop(f"error handling a message: {type(exc).__name__}: {exc}")
            if not socket.getsockopt(wire.EVENTS) & wire.POLLIN:
                return
        # more are waiting: let the kernel's other channels run, then go on (a zmq
        # descriptor signals edges only, so nobody else would wake us)
        self._asyncio_loop.call_soon(self._on_readable)

    def abort(self, msg_ids: list[str]) -> None:
        """Tasks with these ids fail with ``TaskAborted`` instead of running."""
        for msg_id in msg_ids:
            self.aborted.add(msg_id)

    def _on_recv(self, frames: list[Any]) -> None:
        peer = frames[0].bytes
        if wire.is_batch(frames, 1):
            if peer != self.controller:
                self.drops.drop("a batch not from the controller")
                return
            try:
                messages = wire.unpack_batch(frames[1:])
            except wire.MessageError as exc:
                self.drops.drop(str(exc))
                return
            self._run_batch(peer, messages)
            return
        reply = self._handle(frames[1:], peer)
        if reply is not None:
            self._send(reply)

    def _send(self, frames: list[Any]) -> None:
        """Send ``frames`` (the first names the peer). Replies for an earlier controller go
        to the current one; those for a controller that is gone are kept for the next."""
        peer = frames[0]
        if self._former and peer in self._former and self.controller is not None:
            frames = [self.controller, *frames[1:]]
        try:
            wire.send_frames(self.socket, frames)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if peer == self.controller or peer in self._former:
                self._keep(frames[1:])
            else:
                self.drops.drop("a reply to a peer that has left")
                if len(self.result_segments):
                    self._drop_result_segment(frames)

    def _drop_result_segment(self, frames: list[Any]) -> None:
        """The segment of a result in a reply that no client will read (its peer has
        left) goes now, not :data:`~kernel_engine.shm.REPLY_TTL` s later: its memory is
        the host's RAM."""
        delim = len(wire.DELIM)
        at = next((i for i, f in enumerate(frames) if len(f) == delim and f == wire.DELIM), -1)
        if at < 0 or len(frames) <= at + 5:
            return
        try:
            content = wire.loads_object(wire.as_bytes(frames[at + 5]), "content")
        except wire.MessageError:
            return
        shared = content.get(shm.CONTENT_KEY)
        if isinstance(shared, dict):
            self.result_segments.drop(shared.get("name"))

    def _keep(self, frames: list[Any]) -> None:
        """Keep a reply whose controller is gone, within :data:`MAX_KEPT` and
        :data:`MAX_KEPT_BYTES` (dropping the oldest)."""
        self._kept.append(frames)
        self._kept_bytes += sum(memoryview(f).nbytes for f in frames)
        while len(self._kept) > MAX_KEPT or self._kept_bytes > MAX_KEPT_BYTES:
            dropped = self._kept.popleft()
            self._kept_bytes -= sum(memoryview(f).nbytes for f in dropped)
            self.drops.drop("a reply kept for a lost controller (too many kept)")

    def _resend_kept(self) -> None:
        """Send the replies kept for a lost controller to the current one."""
        kept, self._kept, self._kept_bytes = list(self._kept), deque(), 0
        if kept:
            self.kernel.log.warning("sending %i replies to the new controller", len(kept))
        for frames in kept:
            self._send([self.controller, *frames])

    def _run_batch(self, router_ident: bytes, messages: list[list[Any]]) -> None:
        """Run a batch; replies go back together, but never held more than FLUSH_AFTER s.

        Tiny tasks share one reply message (throughput); slower ones are answered as they
        finish, so results and progress arrive as they happen.
        """
        replies: list[list[Any]] = []
        last_flush = time.monotonic()
        for message in messages:
            reply = self._handle(message)
            if reply is not None:
                replies.append(reply)
            if replies and time.monotonic() - last_flush > FLUSH_AFTER:
                self._send_replies(router_ident, replies)
                replies = []
                last_flush = time.monotonic()
        if replies:
            self._send_replies(router_ident, replies)

    def _send_replies(self, router_ident: bytes, replies: list[list[Any]]) -> None:
        for frames in wire.batches(replies):
            self._send([router_ident, *frames])

    def _handle(self, frames: list[Any], router_ident: bytes | None = None) -> list[Any] | None:
        """Run one message; return the reply's frames (with the idents to route it back).

        ``router_ident`` is the peer that sent it; None for a message of a batch (which
        only the controller sends).
        """
        try:
            msg = self.wire.recv(frames)
        except wire.MessageError as exc:
            self.drops.drop(str(exc))
            return None
        if router_ident is None:
            idents = msg.idents
        else:  # a client sending directly gets the reply on its receiving twin
            idents = [protocol.reply_identity(router_ident), *msg.idents]
            if router_ident != self.controller and not self.seen.add(msg.msg_id):
                self.drops.drop("a msg_id seen before (a replay or a duplicate)")
                why = f"msg_id {msg.msg_id} was seen before (a replay or a duplicate); ignored"
                duplicate = protocol.error_content(protocol.DUPLICATE, why)
                return self.wire.pack(
                    protocol.APPLY_REPLY, duplicate, msg.header, {"status": "error"}, idents=idents
                )[1]
        if msg.msg_type == protocol.APPLY_REQUEST:
            direct = router_ident is not None and router_ident != self.controller
            return self._apply(msg, idents, direct)
        if msg.msg_type == protocol.LANE_PING_REQUEST:
            return self.wire.pack(
                protocol.LANE_PING_REPLY,
                {"status": "ok", "engine_id": self.kernel.engine_id},
                msg.header,
                idents=idents,
            )[1]
        if msg.msg_type == protocol.ENGINE_SETUP_REQUEST and router_ident is not None:
            return self._setup(msg, router_ident, idents)
        # a signed request nobody would answer: answered with an error, so that whoever
        # waits for it (the controller's books, a client) does not wait for ever
        self.drops.drop(f"unknown message type {msg.msg_type[:40]!r}")
        refused = protocol.error_content(
            "ValueError", f"a task lane does not serve {msg.msg_type[:60]!r}"
        )
        metadata = {"status": "error", "engine_id": self.kernel.engine_id}
        return self.wire.pack(
            protocol.reply_type(msg.msg_type), refused, msg.header, metadata, idents=idents
        )[1]

    def _setup(
        self, msg: wire.Message, router_ident: bytes, idents: list[bytes]
    ) -> list[Any] | None:
        """A controller sets this engine up: the first one always may, a later one only
        once the owner's process is gone (see :mod:`.watch`)."""
        first = self.controller is None
        watch = self.watch
        if not first and (watch is None or not watch.owner_gone()):
            return self._refuse_setup(msg, idents, "this engine is set up already")
        try:
            setup = protocol.EngineSetup.from_content(msg.content)
        except (TypeError, ValueError, wire.MessageError) as exc:
            self.drops.drop(f"invalid engine setup: {exc}")
            return None
        why = None if watch is None else watch.claim(setup.controller_pid, first)
        if why is not None:
            return self._refuse_setup(msg, idents, why)
        if self.controller is not None:
            self._former.append(self.controller)
            self.kernel.log.warning(
                "adopted by a new controller (pid %s) as engine %i",
                setup.controller_pid,
                setup.engine_id,
            )
        self.controller = router_ident
        self.kernel.engine_id = setup.engine_id
        self.kernel.cluster_id = setup.cluster_id
        self._resend_kept()  # (before the setup reply: the controller counts on that order)
        return self.wire.pack(
            protocol.ENGINE_SETUP_REPLY, {"status": "ok"}, msg.header, idents=idents
        )[1]

    def _refuse_setup(self, msg: wire.Message, idents: list[bytes], why: str) -> list[Any]:
        refused = protocol.error_content("ValueError", why)
        return self.wire.pack(protocol.ENGINE_SETUP_REPLY, refused, msg.header, idents=idents)[1]

    def _apply(self, msg: wire.Message, idents: list[bytes], direct: bool = False) -> list[Any]:
        """Run an ``apply_request``; its reply's frames. ``direct``: it came from a client
        itself, not through the controller (see :meth:`_share_result`)."""
        kernel = self.kernel
        started = wire.utcnow_iso()
        metadata: dict[str, Any] = {
            "started": started,
            "engine_id": kernel.engine_id,
            "engine_uuid": self.wire.session,
        }
        if msg.msg_id in self.aborted:
            aborted = protocol.error_content("TaskAborted", f"task {msg.msg_id} was aborted")
            return self._reply(msg, idents, aborted, metadata, [])
        try:
            # (without the request's buffers: ipykernel keeps its parent after the task,
            # and a pushed 512 MiB array held that way stayed until the next request)
            parent = msg.as_dict(buffers=False)
        except wire.MessageError as exc:
            bad = protocol.error_content("ValueError", f"malformed apply_request: {exc}")
            return self._reply(msg, idents, bad, metadata, [])
        kernel.set_parent(idents, parent, channel="shell")
        out, err = _Tee(sys.stdout), _Tee(sys.stderr)
        saved_out, saved_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
        # (the C function: signal.signal converts both handlers to and from enums, an
        # exception caught on each call when the handler is a function)
        saved_sigint = _signal.signal(_SIGINT, interrupt_user_code)
        outer = Interruptible.armed  # (a cell awaiting meanwhile: armed again after)
        outer_task = kernel.current_task  # (that cell: its interrupts still find it after)
        buffers: list[Any] = []
        content: dict[str, Any]
        limit = time_limit_of(parent)
        try:
            kernel.current_task = (msg.msg_id, "apply", time.time())
            if limit is not None:  # (before interrupts are armed: none cuts it in half)
                self.watchdog.arm(msg.msg_id, limit)
            Interruptible.armed = True
            if kernel.interrupted.take(msg.msg_id):  # (after current_task: see interrupted)
                kernel.interrupting = msg.msg_id
                raise KeyboardInterrupt
            frames = msg.buffers
            shared = parent["content"].get(shm.CONTENT_KEY)
            if shared is not None:  # buffers in a shared-memory segment (see ..shm)
                frames = shm.attach(shared, frames)
            f, args, kwargs = unpack_apply(frames, kernel.shell.user_ns)  # type: ignore[union-attr]
            kernel.current_task = (msg.msg_id, task_name(f, args), time.time())
            result = f(*args, **kwargs)
            buffers = dumps_result(result)
            Interruptible.armed = False
            content = {"status": "ok"}
        except SerializationError as exc:
            Interruptible.armed = False
            content = protocol.error_content(
                "SerializationError", f"the result could not be sent back: {exc}"
            )
        except BaseException as exc:
            Interruptible.armed = False  # (first: no handler runs between the raise and here)
            if limit is not None and self.watchdog.disarm(msg.msg_id):
                why = f"over its {limit}s time limit"
                content = protocol.error_content("TaskTimeout", why, format_traceback(exc))
            else:
                tb = format_traceback(exc)
                content = protocol.error_content(type(exc).__name__, str(exc), tb)
                # (the user's own exception: a class of theirs named TaskTimeout, say,
                # is not the controller's verdict, which skips retries)
                content.pop("px_error", None)
            if type(exc).__name__ == "UnmetDependency":
                content["px_error"] = "UnmetDependency"
            elif kernel.interrupting == msg.msg_id and content.get("px_error") is None:
                content["px_error"] = protocol.INTERRUPTED  # (final: not retried)
        finally:
            Interruptible.armed = False
            if limit is not None:
                self.watchdog.disarm(msg.msg_id)
            with kernel.task_lock:  # (an interrupt for it is signalled by now, or never)
                kernel.current_task = outer_task
            if kernel.interrupting is not None:
                kernel.interrupting = None
                kernel.interrupted.take(msg.msg_id)  # (a mark added while it ran)
            # (a SIGINT pending now runs interrupt_user_code, disarmed, before the swap:
            # with default_int_handler it raised here, out of the lane)
            _signal.signal(_SIGINT, saved_sigint)
            Interruptible.armed = outer
            sys.stdout, sys.stderr = saved_out, saved_err
            if out.parts:
                saved_out.flush()
            if err.parts:
                saved_err.flush()
        if direct and len(buffers) > 1 and content.get("status") == "ok":
            segment = self._share_result(parent, buffers)
            if segment is not None:
                content = {"status": "ok", shm.CONTENT_KEY: segment.reference}
                buffers = segment.placeholders(buffers)
        metadata["stdout"] = out.text()
        metadata["stderr"] = err.text()
        return self._reply(msg, idents, content, metadata, buffers)

    def _share_result(self, parent: dict[str, Any], buffers: list[Any]) -> shm.Segment | None:
        """A segment of a result's very large buffers, for a client of this host that
        asked for one (:data:`kernel_engine.shm.REPLY_KEY`) and sent the request itself:
        a request that came through the controller may be a remote client's, and a reply
        the controller passes on or keeps (for another client's ``get_result``) must hold
        its buffers. None: the buffers go in the reply."""
        request_md = parent.get("metadata")
        if not isinstance(request_md, dict) or request_md.get(shm.REPLY_KEY) is not True:
            return None
        if not shm.worth_sharing(buffers, 1, first=1) or not shm.enabled():
            return None
        try:
            segment = self.result_segments.share(buffers)
        except Exception as exc:  # (MemoryError, say: the reply carries the buffers)
            self.kernel.log.warning("no shared-memory segment for a result: %s", exc)
            return None
        if segment is not None and self.kernel.io_loop is not None:
            self.kernel.io_loop.call_later(shm.REPLY_TTL + 1, self.result_segments.expire)
        return segment

    def _reply(
        self,
        msg: wire.Message,
        idents: list[bytes],
        content: dict[str, Any],
        metadata: dict[str, Any],
        buffers: list[Any],
    ) -> list[Any]:
        completed = metadata["completed"] = wire.utcnow_iso()
        metadata["status"] = content["status"]
        if content["status"] == "error":
            content.setdefault("engine_info", {"engine_id": self.kernel.engine_id})
        encoded = _OK_JSON if content == _OK else content
        # (the parent: the request's header as it came, not encoded again)
        parent = wire.as_bytes(msg.frames[1])
        return self.wire.pack(
            protocol.APPLY_REPLY, encoded, parent, metadata, buffers, idents=idents, date=completed
        )[1]
