"""Widgets (and any Jupyter comm) made on engines, live in the notebook that drives them.

An engine is a real ipykernel, so ``ipywidgets.IntSlider()`` inside ``%%px`` opens a comm
there: the engine publishes ``comm_open`` on its iopub, which the controller relays to
clients like all engine output. When the client runs inside a notebook kernel, a
:class:`WidgetRelay` joins the engine's half of the comm to the frontend's:

- engine -> frontend: an engine's ``comm_open`` for work this client submitted is
  published again on the notebook kernel's iopub, as the notebook kernel's own message
  with the same comm_id, its parent the notebook message (the cell) that submitted the
  work; an :class:`EngineComm` stands in for the comm in the notebook kernel's comm
  manager. The comm's later ``comm_msg`` and ``comm_close`` follow the same way. (A
  widget's view is display data, which the ``%px`` magics show in the cell already.)
- frontend -> engine: what the frontend sends the comm reaches the stand-in, which passes
  it on to the engine's shell through the controller (:meth:`Transport.post`). Kernels
  do not answer comm messages, so nothing waits for a reply. What the engine publishes
  in answer (a widget's ``echo_update``, what a callback prints) is published again with
  the frontend's message as its parent, as a kernel of its own would.

Threads: the client's IO thread republishes. ipykernel's iopub socket is a
``BackgroundSocket``: any thread may send on it, the kernel's IOPub thread does the
sending, in the order sends were made (ipykernel's own comms publish from any thread the
same way). The notebook kernel's shell thread runs the stand-ins' handlers, which only
send on the client's sending socket, under its lock. The relay's tables are shared
under one lock of their own.

Outside a kernel (a script, a terminal) nothing is attached and nothing changes.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from typing import TYPE_CHECKING, Any

from comm.base_comm import BaseComm

from kernel_engine import wire
from kernel_engine.protocol import CommMessage

from ._bounded import BoundedDict

if TYPE_CHECKING:
    from ._transport import Transport

log = logging.getLogger("jupyter_ext")

COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})

CALLBACK_OUTPUT = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "error"}
)
"""What an engine publishes while it handles a frontend's comm message (a widget's
callback printing, say) that is published again in the notebook."""

MAX_COMMS = 100_000
"""Engine comms one client relays at once; more are not relayed (and a warning says so)."""

MAX_PARENTS = 10_000
"""msg_ids remembered with the notebook message each answers (tasks sent, comm messages
passed on); the oldest are forgotten first."""


class EngineComm(BaseComm):
    """The notebook kernel's stand-in for a comm that lives on engine ``engine_id``: what
    the frontend sends the comm goes to the engine."""

    def __init__(self, relay: WidgetRelay, engine_id: int, comm_id: str, target_name: str):
        self.relay = relay
        self.engine_id = engine_id
        super().__init__(target_name=target_name, comm_id=comm_id, primary=False)

    def publish_msg(
        self,
        msg_type: str,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
        **keys: Any,
    ) -> None:
        """Nothing: the comm on the engine speaks for itself (see :class:`WidgetRelay`)."""

    def handle_msg(self, msg: dict[str, Any]) -> None:
        self.relay.forward(self, "comm_msg", msg)

    def handle_close(self, msg: dict[str, Any]) -> None:
        self.relay.forward(self, "comm_close", msg)


class WidgetRelay:
    """Relays the comms of engines between one client and the notebook kernel it runs in.

    Parameters
    ----------
    transport
        The client's transport: engine output comes from it, comm messages go through it.
    kernel
        The ipykernel kernel of this process (its ``session``, ``iopub_socket`` and
        ``get_parent``).
    manager
        The kernel's comm manager, where the stand-ins are registered.
    """

    def __init__(self, transport: Transport, kernel: Any, manager: Any):
        self.transport = transport
        self.kernel = kernel
        self.manager = manager
        self.lock = threading.Lock()
        self.comms: dict[str, EngineComm] = {}
        # the msg_id of a task this client sent -> the notebook message (cell) that sent it
        self.parents: BoundedDict[str, dict[str, Any]] = BoundedDict(MAX_PARENTS)
        # the msg_id of a comm message passed on to an engine -> the frontend's message
        self.forwarded: BoundedDict[str, dict[str, Any]] = BoundedDict(MAX_PARENTS)
        self.drops = wire.DropLog(log, "jupyter-px widgets")
        self.closed = False
        transport.add_iopub_handler(self.on_iopub)
        transport.add_submit_hook(self.submitted)
        transport.add_engine_gone_handler(self.engine_gone)

    # ----- what the client sends and receives

    def submitted(self, msg_id: str) -> None:
        """A task is about to be sent (the submitting thread): remember the cell."""
        parent = self.kernel.get_parent()  # (one dict for all the tasks a cell sends)
        if parent:
            with self.lock:
                self.parents[msg_id] = parent

    def on_iopub(self, engine_id: int, msg: wire.Message) -> None:
        """An engine's output (IO thread): comm messages, and what answers the frontend."""
        msg_type = msg.msg_type
        if msg_type in COMM_TYPES:
            relay = self._comm_from_engine
        elif msg_type in CALLBACK_OUTPUT and self.forwarded:
            relay = self._callback_output
        else:
            return
        try:
            relay(engine_id, msg)
        except Exception as exc:  # (this message is still the transport's to handle)
            self.drops.drop(f"{msg_type} from engine {engine_id}: {type(exc).__name__}: {exc}")

    def _comm_from_engine(self, engine_id: int, msg: wire.Message) -> None:
        msg_type, content = msg.msg_type, msg.content
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str) or not comm_id:
            raise ValueError("no comm_id")
        if msg_type == "comm_open":
            parent = self._parent(msg.parent_id, ours_only=True)
            if parent is None:
                return  # opened by another client's work: that client's to show
            stand_in = self._open(engine_id, comm_id, content.get("target_name"))
            if stand_in is None:
                return
        else:
            with self.lock:
                stand_in = self.comms.get(comm_id)
                if stand_in is None or stand_in.engine_id != engine_id:
                    return  # not a comm this client relays
                if msg_type == "comm_close":
                    del self.comms[comm_id]
            if msg_type == "comm_close":
                self._unregister(stand_in)
            parent = self._parent(msg.parent_id)
        self._publish(msg_type, content, msg.metadata, msg.buffers, parent, stand_in.topic)

    def _open(self, engine_id: int, comm_id: str, target: Any) -> EngineComm | None:
        """A stand-in for a new engine comm, registered (None: not relayed)."""
        if not isinstance(target, str):
            raise ValueError("a comm_open without a target_name")
        with self.lock:
            if self.closed or comm_id in self.comms:
                return None
            if self.manager.comms.get(comm_id) is not None:
                raise ValueError(f"comm_id {comm_id[:40]} is taken in this kernel")
            if len(self.comms) >= MAX_COMMS:
                raise ValueError(f"more than {MAX_COMMS} engine comms open")
            stand_in = EngineComm(self, engine_id, comm_id, target)
            self.comms[comm_id] = stand_in
        self.manager.register_comm(stand_in)  # (before the frontend can learn of it)
        return stand_in

    def _callback_output(self, engine_id: int, msg: wire.Message) -> None:
        with self.lock:
            parent = self.forwarded.get(msg.parent_id)
        if parent is None:
            return
        content = msg.content
        if msg.msg_type == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            content = {"name": name, "text": f"[{name}:{engine_id}] {content.get('text', '')}"}
        topic = f"engine.{engine_id}.{msg.msg_type}".encode()
        self._publish(msg.msg_type, content, msg.metadata, msg.buffers, parent, topic)

    def _parent(self, msg_id: str, ours_only: bool = False) -> dict[str, Any] | None:
        """The notebook message an engine's message answers: the frontend's comm message
        passed on, or the cell that sent the task; else (unless ``ours_only``) the
        notebook kernel's current one."""
        with self.lock:
            parent = self.forwarded.get(msg_id) or self.parents.get(msg_id)
        if parent is None and not ours_only:
            parent = self.kernel.get_parent("shell")
        return parent

    def _publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any],
        buffers: list[Any],
        parent: dict[str, Any] | None,
        topic: bytes,
    ) -> None:
        """Publish on the notebook kernel's iopub, as its own message (any thread)."""
        self.kernel.session.send(
            self.kernel.iopub_socket,
            msg_type,
            content,
            parent=parent or {},
            ident=topic,
            buffers=[memoryview(b) for b in buffers] or None,
            metadata=metadata,
        )

    # ----- what the frontend sends

    def forward(self, stand_in: EngineComm, msg_type: str, msg: dict[str, Any]) -> None:
        """The frontend's ``comm_msg``/``comm_close`` for a comm on an engine (the notebook
        kernel's shell thread): pass it on to the engine."""
        content = msg.get("content") or {}
        data = content.get("data")
        metadata = msg.get("metadata")
        msg_id = uuid.uuid4().hex
        with self.lock:
            # the engine's answers name msg_id as parent: they answer the frontend's message
            # (its header only: its buffers may be large)
            self.forwarded[msg_id] = {"header": msg.get("header") or {}}
            if msg_type == "comm_close":
                self.comms.pop(stand_in.comm_id, None)
        try:
            sent = self.transport.post(
                stand_in.engine_id,
                msg_type,
                CommMessage(stand_in.comm_id, data if isinstance(data, dict) else {}).to_content(),
                metadata if isinstance(metadata, dict) else None,
                list(msg.get("buffers") or []),
                msg_id,
            )
        except ValueError as exc:  # (too large to pass on)
            log.warning(
                "jupyter-px: a %s for comm %s on engine %i was not passed on: %s",
                msg_type,
                stand_in.comm_id,
                stand_in.engine_id,
                exc,
            )
            return
        if not sent:  # its engine (or this client) is gone: nothing more to pass on
            with self.lock:
                self.comms.pop(stand_in.comm_id, None)
            self._unregister(stand_in)

    # ----- the end of engines and of the client

    def engine_gone(self, engine_id: int) -> None:
        """An engine is gone (IO thread): forget its comms here. The frontend keeps their
        last views (a progress bar stays at its last value); messages to them are dropped."""
        with self.lock:
            gone = [c for c in self.comms.values() if c.engine_id == engine_id]
            for stand_in in gone:
                del self.comms[stand_in.comm_id]
        for stand_in in gone:
            self._unregister(stand_in)

    def close(self) -> None:
        """Stop relaying (the client closes): forget every stand-in."""
        self.transport.remove_handlers(self.on_iopub, self.submitted, self.engine_gone)
        with self.lock:
            self.closed = True
            gone = list(self.comms.values())
            self.comms.clear()
            self.parents.clear()
            self.forwarded.clear()
        for stand_in in gone:
            self._unregister(stand_in)

    def _unregister(self, stand_in: EngineComm) -> None:
        stand_in._closed = True  # (so that collecting it publishes nothing)
        if self.manager.comms.get(stand_in.comm_id) is stand_in:
            try:
                self.manager.unregister_comm(stand_in)
            except KeyError:  # the frontend closed it meanwhile
                pass


def running_kernel() -> Any:
    """The ipykernel kernel this process runs, or None (a script, a terminal IPython).

    Never imports ipykernel: a process that has not imported it runs no kernel.
    """
    kernelbase = sys.modules.get("ipykernel.kernelbase")
    if kernelbase is None:
        return None
    kernel_class = kernelbase.Kernel
    if not kernel_class.initialized():
        return None
    kernel = kernel_class.instance()
    if getattr(kernel, "session", None) is None or getattr(kernel, "iopub_socket", None) is None:
        return None
    return kernel


def attach(transport: Transport) -> WidgetRelay | None:
    """A relay of engines' comms for a client in a kernel; None (nothing) elsewhere."""
    kernel = running_kernel()
    if kernel is None:
        return None
    import comm

    return WidgetRelay(transport, kernel, comm.get_comm_manager())
