"""Load-balanced tasks sent to the controller many to a message.

A map of tiny tasks used to cost the client a send per task (a fifth of its time) and the
controller a receive, a wake-up and a turn of its loop per task. :class:`SubmitBatch`
gathers the tasks of one call (``map``, a refill of ``imap``) and sends them as batch
messages on the ``lb`` route (:func:`kernel_engine.wire.pack_batch`; the controller's
side is :mod:`kernel_engine.controller.intake`). Each task is still a whole signed
message with its own msg_id, header, metadata and buffers, and its own
:class:`~._request.Request`, so everything downstream (records, retries, dependencies,
resubmits, per-task metadata) sees single tasks.

The first batch is small, so engines start while the client is still packing, and each
next one is twice as big, up to :data:`MAX_TASKS` tasks or :data:`MAX_BYTES` bytes.
Whatever has been added is sent by :meth:`SubmitBatch.close` (also when the caller fails
halfway: the tasks it has futures for run). The request table takes a batch's tasks as
the batch is sent, so that Ctrl-C cannot leave one in the table that never left. A
single ``apply`` does not come here: it is sent at once, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol, wire

from ._interrupts import deferred_interrupts
from ._metadata import Metadata
from ._request import Refused, Request

if TYPE_CHECKING:
    from ._transport import Transport

FIRST_TASKS = 8
"""Tasks in the first batch of a call."""

MAX_TASKS = min(256, protocol.MAX_SUBMIT_BATCH)
"""Most tasks in one batch message."""

MAX_BYTES = 1 << 20
"""A batch is sent once its frames reach this many bytes (tasks with large arguments)."""


class SubmitBatch:
    """Load-balanced requests of one call, sent in batches (any thread; one user).

    Parameters
    ----------
    transport
        The client's transport (its request table, IO thread and what it keeps).
    hooks
        Called with each msg_id before the task is sent (as :meth:`Transport.submit`
        calls its submit hooks).
    msg_type, metadata
        Every task's message type and metadata (JSON, encoded once for the call).
    track
        Give each task the zmq tracker of the message that carried it.
    md_extra
        Added to each task's client-side metadata.
    """

    def __init__(
        self,
        transport: Transport,
        hooks: Sequence[Callable[[str], None]],
        msg_type: str,
        metadata: bytes,
        track: bool = False,
        md_extra: dict[str, Any] | None = None,
    ):
        self.transport = transport
        self.hooks = hooks
        self.msg_type = msg_type
        self.metadata = metadata
        self.track = track
        self.md_extra = md_extra
        self.limit = FIRST_TASKS
        self._tasks: list[tuple[list[Any], Request]] = []  # (frames from the signature on)
        self._bytes = 0

    def add(self, buffers: Sequence[Any]) -> Request:
        """Pack one task (its arguments' ``buffers``) and return its future; it leaves
        with its batch, which is also when the request table takes it."""
        transport = self.transport
        if transport.closed:
            raise RuntimeError("this Client is closed")
        header, frames = transport.wire.pack(self.msg_type, None, None, self.metadata, buffers)
        msg_id = header["msg_id"]
        md = Metadata(msg_id=msg_id, submitted=datetime.now(timezone.utc), engine_id=None)
        if self.md_extra:
            md.update(self.md_extra)
        req = Request(
            msg_id, md, "apply", "controller", None, protocol.LB_ROUTE, self.track, header
        )
        for hook in self.hooks:  # (before it is sent: before any of its output)
            hook(msg_id)
        part = frames[1:]  # (signature onwards; fewer than wire.MAX_MESSAGE_FRAMES frames,
        # as pickles take serialize.MAX_OOB_BUFFERS buffers at most: no batch is refused)
        self._tasks.append((part, req))
        self._bytes += sum(memoryview(f).nbytes for f in part)
        if len(self._tasks) >= self.limit or self._bytes >= MAX_BYTES:
            self.flush()
        return req

    def flush(self) -> None:
        """Send the tasks added since the last flush, as one message; the request table
        takes them as it is sent, in one section that Ctrl-C waits for (a task in the
        table whose message never left would be waited for for ever; one that left
        without being in the table only has its reply go unread)."""
        with deferred_interrupts():
            tasks = self._tasks
            if not tasks:
                return
            self._tasks, self._bytes = [], 0
            self.limit = min(2 * self.limit, MAX_TASKS)
            reqs = [req for _, req in tasks]
            transport = self.transport
            try:
                transport.requests.add_balanced(reqs)
                msg_ids = [req.msg_id for req in reqs]
                transport.metadata.put_all(msg_ids, [req.metadata for req in reqs])
                transport.history.extend(msg_ids)
                if len(tasks) == 1:
                    frames = [protocol.LB_ROUTE, wire.DELIM, *tasks[0][0]]
                else:
                    frames = [protocol.LB_ROUTE, *wire.pack_batch([part for part, _ in tasks])]
                tracker = transport.io.send(frames, track=self.track)
            except Refused as exc:  # (none taken: their futures end with the error)
                error = transport.refused(exc)
                transport._withdraw(reqs, error)
                raise error from None
            except BaseException as exc:  # (not sent: nobody is to wait for them)
                transport._withdraw(reqs, exc)
                raise
        for req in reqs:
            req.tracker = tracker

    def close(self) -> None:
        """Send what is left (what a flush cut short never reached the table: nothing
        waits for it)."""
        try:
            self.flush()
        finally:
            self._tasks, self._bytes = [], 0

    def __enter__(self) -> SubmitBatch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
