"""The engine kernel: ipykernel's IPython kernel plus a task lane.

Everything a Jupyter client expects (execute, complete, inspect, interrupt, widgets) is
ipykernel's own; the subclass adds the task lane socket, an ``engine`` section in
``kernel_info_reply`` (how the controller learns the lane's port, the pid and the host)
and four control messages: ``px_abort_request``, that marks msg_ids not to run,
``px_adopt_request``, by which a controller restarted on the cluster folder tells an
engine whose controller died to wait for it (see :mod:`.watch`),
``px_engine_status_request``, its report of itself for the status stream (see
:mod:`.usage`), and ``px_engine_signal_request``, a signal the engine sends itself (for
an engine on another host, whose process the controller cannot signal).
"""

from __future__ import annotations

import _signal
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Any as AnyTrait
from traitlets import Integer, Unicode

from kernel_engine import protocol, wire
from kernel_engine.clusters import ENGINE_DEBUGGER_ENV

from .lane import Interruptible, TaskLane, interrupt_user_code, signal_self
from .usage import Usage

_SIGINT = int(signal.SIGINT)

MAX_INTERRUPTED = 65536
"""msg_ids an engine keeps marked to interrupt when they start, at most (the oldest go
first; one is unmarked as its request starts). The controller sends an engine only the
ids of requests it holds, or that a client sent it directly."""


def without_debugger() -> None:
    """Have ipykernel's debugger module find no debugpy, so that an engine neither imports
    it nor offers the Jupyter debugger (the engine kernel spec says ``"debugger": false``:
    frontends do not offer it for engines).

    Importing debugpy was a third of what an engine imports (about 100 ms of the fork
    template's 330 ms here, on every cluster's start path). debugpy itself stays importable
    in engines: only ipykernel's module is imported while it is out of reach (a ``None``
    in ``sys.modules`` fails the import). Nothing is hidden where debugpy's server is
    imported already (a process started under debugpy: its cost is paid), nor with
    ``JUPYTER_PX_ENGINE_DEBUGGER=1`` (:data:`~kernel_engine.clusters.ENGINE_DEBUGGER_ENV`)
    where the cluster starts, for a frontend attached to an engine that wants to debug it.
    """
    if "ipykernel.debugger" in sys.modules or os.environ.get(ENGINE_DEBUGGER_ENV) == "1":
        return
    absent = object()
    saved = sys.modules.get("debugpy", absent)
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    try:
        import ipykernel.debugger  # noqa: F401
    finally:
        if saved is absent:
            sys.modules.pop("debugpy", None)
        else:
            sys.modules["debugpy"] = saved  # type: ignore[assignment]


without_debugger()


def in_subshell() -> bool:
    """Whether this request runs in a kernel subshell (ipykernel 7 runs those on threads
    of their own, beside the main thread's cells and tasks). Such a cell is left out of
    the engine's bookkeeping of interrupts, which is the main thread's: it took the slot
    of :attr:`EngineKernel.current_task` from the task the main thread ran (and cleared
    it), so that task's time limit, then its interrupts, were dropped, and it ran to its
    end; its ``Interruptible.armed`` disarmed that task too."""
    return threading.current_thread() is not threading.main_thread()


class EngineKernel(IPythonKernel):
    """An IPython kernel that also serves the task lane of a jupyter-px cluster."""

    implementation = "jupyter-px-engine"
    lane_socket = AnyTrait(None, allow_none=True, help="The bound ROUTER of the task lane.")
    lane_port = Integer(0, help="The task lane's port.")
    lane_auth = Unicode("", help="How peers log in to the lane: 'plain' or '' (none, or CurveZMQ).")
    engine_id = Integer(None, allow_none=True, help="This engine's id, set by the controller.")
    cluster_id = Unicode("", help="The cluster this engine belongs to.")
    controller_watch = AnyTrait(None, allow_none=True, help="The watch on the controller.")

    control_msg_types = [
        *IPythonKernel.control_msg_types,
        protocol.ENGINE_ABORT_REQUEST,
        protocol.ENGINE_ADOPT_REQUEST,
        protocol.ENGINE_STATUS_REQUEST,
        protocol.ENGINE_SIGNAL_REQUEST,
        protocol.ENGINE_INTERRUPT_REQUEST,
    ]

    interrupting: str | None = None
    """The msg_id of the running request an interrupt named (its reply says so)."""
    current_task: tuple[str, str, float] | None = None
    """(msg_id, function name, Unix time started) of what the main thread runs, if any: a
    plain attribute, set per task by the lane (and per cell), read by the control thread."""
    _usage: Usage | None = None
    task_lock: threading.Lock
    """Held by the main thread as a request ends (:attr:`current_task` cleared) and by the
    control thread from its reading of :attr:`current_task` to its SIGINT: an interrupt
    for a request is signalled before that request ends or not at all (the control thread
    read the request running, answered, then signalled: one that ended meanwhile left the
    SIGINT to the next request, which failed with a KeyboardInterrupt nobody asked for)."""
    interrupted: wire.SeenWindow
    """msg_ids to interrupt (:data:`protocol.ENGINE_INTERRUPT_REQUEST`): one that starts
    ends at once; added by the control thread, taken by the main thread as a request
    starts (after it sets :attr:`current_task`, which the control thread reads after
    adding: one of the two sees the other, so no interrupt is lost)."""

    def start(self) -> None:
        """Start ipykernel's channels, then the task lane on the same (main) event loop."""
        self.task_lock = threading.Lock()
        super().start()
        self.interrupted = wire.SeenWindow(MAX_INTERRUPTED)
        self._usage = Usage()  # (a first report tells the CPU used since the start)
        if self.lane_socket is not None:
            self.lane = TaskLane(self, self.lane_socket)
            self.lane.start()

    @property
    def kernel_info(self) -> dict[str, Any]:  # type: ignore[override]
        info = dict(super().kernel_info)
        info["engine"] = {
            "lane_port": self.lane_port,
            "lane_auth": self.lane_auth,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "engine_id": self.engine_id,
            "python": sys.executable,
        }
        return info

    async def execute_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """ipykernel's, noting the cell as the engine's current task meanwhile (a cell of
        the main shell: see :func:`in_subshell`)."""
        if in_subshell():
            await super().execute_request(stream, ident, parent)
            return
        msg_id = str(parent.get("header", {}).get("msg_id", ""))
        self.current_task = (msg_id, "execute", time.time())
        try:
            await super().execute_request(stream, ident, parent)
        finally:
            with self.task_lock:  # (see task_lock)
                self.current_task = None

    # Interrupts (SIGINT: jupyter_client's interrupt, the controller's time limits) cut
    # user code short and nothing else. ipykernel's hooks install Python's
    # default_int_handler for every shell message, so an interrupt raised anywhere in
    # its handling: one between the cell's end and its reply lost the reply (ipykernel
    # logs "KeyboardInterrupt caught in kernel" and sends none), and every later request
    # to the engine waited behind it; one pending when the hook put the handler back
    # raised out of ipykernel's dispatch.

    def pre_handler_hook(self) -> None:
        self.saved_sigint_handler = _signal.signal(_SIGINT, interrupt_user_code)

    def post_handler_hook(self) -> None:
        _signal.signal(_SIGINT, self.saved_sigint_handler)

    async def do_execute(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """ipykernel's, with interrupts armed; one that escapes IPython's own handling of
        the cell (raised in its steps around the code) still gets an error reply."""
        if in_subshell():  # (SIGINT reaches the main thread only)
            return await super().do_execute(*args, **kwargs)  # type: ignore[no-any-return]
        outer, Interruptible.armed = Interruptible.armed, True
        raised = Interruptible.raised
        try:
            if self.interrupt_due():
                raise KeyboardInterrupt
            return await super().do_execute(*args, **kwargs)  # type: ignore[no-any-return]
        except KeyboardInterrupt:
            Interruptible.armed = False
            return self._execute_failed("KeyboardInterrupt", "interrupted")
        except Exception as exc:
            # (IPython's own steps, cut by an interrupt: its run_cell then raised
            # UnboundLocalError from a ``finally: return result``, or, where a bare
            # ``except: pass`` swallowed the interrupt, from the ``return result`` after
            # it, with no interrupt in its context; escaping, it left the cell with no
            # reply, and every later request to the engine waited behind it. Only that
            # error counts the interrupts raised: another fault of the kernel's steps,
            # in a cell whose code handled an interrupt, is reported as itself)
            Interruptible.armed = False
            swallowed = isinstance(exc, UnboundLocalError) and Interruptible.raised != raised
            if isinstance(exc.__context__, KeyboardInterrupt) or swallowed:
                return self._execute_failed("KeyboardInterrupt", f"interrupted ({exc!r:.200})")
            self.log.error("executing a cell failed in the kernel", exc_info=True)
            return self._execute_failed(type(exc).__name__, str(exc))
        finally:
            Interruptible.armed = outer

    def _execute_failed(self, ename: str, evalue: str) -> dict[str, Any]:
        """The content of the error reply to a cell that failed outside its code."""
        return {
            "status": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": [],
            "execution_count": self.execution_count,
            "user_expressions": {},
            "payload": [],
        }

    async def px_engine_status_request(
        self, stream: Any, ident: Any, parent: dict[str, Any]
    ) -> None:
        """Control channel: CPU, memory and current task, for the controller's status
        stream (answered even while a task runs)."""
        if self._usage is None:
            self._usage = Usage()
        report = self._usage.report(self.current_task)
        self.session.send(  # type: ignore[union-attr]
            stream, protocol.ENGINE_STATUS_REPLY, report.to_content(), parent, ident
        )

    async def px_abort_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Control channel: do not run the given msg_ids if they reach the lane."""
        try:
            msg_ids = list(protocol.check_msg_ids("msg_ids", parent["content"].get("msg_ids", [])))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            reply: dict[str, Any] = protocol.error_content(type(exc).__name__, str(exc))
        else:
            lane = getattr(self, "lane", None)
            if lane is not None:
                lane.abort(msg_ids)
            reply = {"status": "ok", "msg_ids": msg_ids}
        self.session.send(  # type: ignore[union-attr]
            stream, protocol.ENGINE_ABORT_REPLY, reply, parent, ident
        )

    def interrupt_due(self) -> bool:
        """Whether the request :attr:`current_task` names was interrupted before it
        started (see :data:`protocol.ENGINE_INTERRUPT_REQUEST`)."""
        task = self.current_task
        return task is not None and self.interrupted.take(task[0])

    async def px_interrupt_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Control channel: interrupt these requests, running or yet to start."""
        try:
            msg_ids = protocol.check_msg_ids("msg_ids", parent["content"].get("msg_ids", []))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            reply: dict[str, Any] = protocol.error_content(type(exc).__name__, str(exc))
            msg_ids = ()
        else:
            reply = {"status": "ok"}
        for msg_id in msg_ids:  # (first: see interrupted)
            self.interrupted.add(msg_id)
        self.session.send(  # type: ignore[union-attr]
            stream, protocol.ENGINE_INTERRUPT_REPLY, reply, parent, ident
        )
        with self.task_lock:  # (the request cannot end between the check and the signal)
            task = self.current_task
            if task is not None and task[0] in msg_ids:
                self.interrupting = task[0]
                signal_self(signal.SIGINT)

    async def px_engine_signal_request(
        self, stream: Any, ident: Any, parent: dict[str, Any]
    ) -> None:
        """Control channel: send this engine a signal of :data:`protocol.ENGINE_SIGNALS`
        (to its process group when it leads one, as a kernel manager signals a kernel);
        answered first, since the signal may end the engine."""
        try:
            signum = protocol.check_engine_signal("signum", parent["content"].get("signum"))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            reply: dict[str, Any] = protocol.error_content(type(exc).__name__, str(exc))
            signum = None
        else:
            reply = {"status": "ok", "signum": signum}
        self.session.send(  # type: ignore[union-attr]
            stream, protocol.ENGINE_SIGNAL_REPLY, reply, parent, ident
        )
        if signum is None:
            return
        signal_self(signum)

    async def px_adopt_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Control channel: a restarted controller will set this engine up; answered at
        once, even while a task runs, so the engine does not leave meanwhile."""
        reply: dict[str, Any]
        try:
            setup = protocol.EngineSetup.from_content(parent["content"])
            if setup.controller_pid is None:
                raise ValueError("controller_pid is required")
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            reply = protocol.error_content(type(exc).__name__, str(exc))
        else:
            watch = self.controller_watch
            lane = getattr(self, "lane", None)
            first = lane is None or lane.controller is None
            why = (
                "this engine has no watch"
                if watch is None
                else watch.follow(setup.controller_pid, first)
            )
            reply = {"status": "ok"} if why is None else protocol.error_content("ValueError", why)
        self.session.send(  # type: ignore[union-attr]
            stream, protocol.ENGINE_ADOPT_REPLY, reply, parent, ident
        )
