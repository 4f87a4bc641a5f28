"""The status stream: the controller's :class:`~.status.StatusBoard`, fed and published.

Who feeds it: the hub calls :meth:`Monitor.on_task` for every task record it starts,
assigns and ends (O(1), always, so counts are right whenever someone starts watching);
engines' reports of themselves come in on their control channels
(:meth:`Monitor.on_report`).

Who watches: the controller's iopub socket is an XPUB, so a subscription to
:data:`~kernel_engine.protocol.STATUS_TOPIC` reaches :meth:`Monitor.subscription` (every
subscribe, since the socket is verbose; the unsubscribe only when the last subscriber
leaves or goes away). While at least one subscriber is there, and only then, a timer
runs on the controller's loop: every :data:`~kernel_engine.protocol.STATUS_EVERY` s it
publishes a snapshot if one is due (something changed, or a second passed), and every
:data:`~kernel_engine.protocol.ENGINE_REPORT_EVERY` s it asks each ready engine for a
report. When nobody listens no timer runs, no event is kept and no reply is parsed.

A snapshot is also answered at once to a ``px_status_request`` (route ``hub``), which is
how a client or ``jupyter px top --once`` gets the state without subscribing.

Error names come from the error reply's content (JSON, never user data), read only for
failures while someone listens; failures seen while nobody listened are described from
the hub's records when a snapshot needs them (at most :data:`~.status.MAX_ERRORS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kernel_engine import protocol, wire

from .engines import Engine, EngineSet
from .hub import Hub, TaskRecord
from .inflight import Inflight
from .loop import PollLoop
from .status import EngineView, HeldTask, StatusBoard

log = logging.getLogger("kernel_engine.controller")

_monotonic = time.monotonic

KINDS = {protocol.APPLY_REQUEST: "apply", "execute_request": "execute"}
"""What a held request without a label is called, by its message type."""

MAX_ERROR_CONTENT = 256 * 1024
"""Largest error reply content read for its error's name and traceback."""


def error_of(frames: list[Any] | None) -> tuple[str, str, list[str]] | None:
    """(ename, evalue, traceback) of an error reply, from its frames (the signature
    onwards: signature, header, parent, metadata, content); None if it cannot say."""
    if not frames or len(frames) < 5:
        return None
    if len(frames[4]) > MAX_ERROR_CONTENT:
        return None
    raw = wire.as_bytes(frames[4])
    try:
        content = wire.loads_object(raw, "content")
    except wire.MessageError:
        return None
    ename = content.get("ename")
    if not isinstance(ename, str):
        return None
    traceback = content.get("traceback")
    return ename, str(content.get("evalue", "")), traceback if isinstance(traceback, list) else []


class Monitor:
    """Keeps the status board and publishes it while someone subscribes.

    Parameters
    ----------
    loop
        The controller's loop (the timer runs on it, only while someone listens).
    wire
        Signs the requests to engines for their reports.
    publish
        Publishes a status message's content on the iopub socket (topic
        :data:`~kernel_engine.protocol.STATUS_TOPIC`).
    engines, inflight, hub
        The engine set, what is in flight (queues), the task records (errors' details).
    queued
        How many tasks wait for the scheduler.
    dead
        Why each engine that left did.
    cluster_id
        The cluster's name.
    """

    def __init__(
        self,
        loop: PollLoop,
        wire_: wire.Wire,
        publish: Callable[[dict[str, Any]], None],
        engines: EngineSet,
        inflight: Inflight,
        hub: Hub,
        queued: Callable[[], int],
        dead: Mapping[int, str],
        cluster_id: str = "",
    ):
        self.loop = loop
        self.wire = wire_
        self.publish = publish
        self.engines = engines
        self.inflight = inflight
        self.hub = hub
        self.queued = queued
        self.dead = dead
        self.cluster_id = cluster_id
        self.board = StatusBoard(time.monotonic())
        self._ticking = False

    # ----- fed

    def on_task(self, kind: str, record: TaskRecord, frames: list[Any] | None) -> None:
        """The hub started (``submitted``), placed (``assigned``) or ended (``completed``)
        a task record (``frames``: the reply's, from the signature on, when it has them)."""
        board = self.board
        if kind == "completed":
            ok = record.status == "ok"
            error = error_of(frames) if not ok and board.listening else None
            board.task_finished(record.msg_id, record.engine_id, ok, _monotonic(), error)
        elif kind == "submitted":
            board.task_submitted(record.msg_id, record.engine_id)
        elif kind == "assigned" and record.engine_id is not None:
            board.task_started(record.msg_id, record.engine_id)

    def on_report(self, engine: Engine, content: dict[str, Any]) -> None:
        """An engine's report of itself (a ``px_engine_status_reply``)."""
        try:
            report = protocol.EngineReport.from_content(content)
        except (TypeError, ValueError) as exc:
            log.debug("engine %i sent an invalid report: %s", engine.id, exc)
            return
        self.board.engine_report(engine.id, report)

    # ----- watched

    def subscription(self, frames: list[Any]) -> None:
        """A (un)subscription reaching the iopub XPUB: one frame, a 1 or 0 byte and the
        topic. Only the status topic matters; anything else is ignored."""
        if len(frames) != 1:
            return
        data = wire.as_bytes(frames[0])
        if data[1:] != protocol.STATUS_TOPIC or data[:1] not in (b"\x00", b"\x01"):
            return
        if data[:1] == b"\x01":
            self.board.subscribe()
            if not self._ticking:
                self._ticking = True
                self.loop.call_later(0.0, self._tick)
        else:
            self.board.unsubscribe()

    def _tick(self) -> None:
        board = self.board
        if not board.listening:
            self._ticking = False
            return
        try:
            now = time.monotonic()
            if board.reports_due(now):
                self._ask_reports()
            if board.due(now):
                self.publish(self.snapshot(events=True))
        finally:
            self.loop.call_later(board.interval, self._tick)

    def _ask_reports(self) -> None:
        for engine in list(self.engines.engines.values()):
            sock = engine.sockets.get("control") if engine.state == "ready" else None
            if sock is not None:
                self.wire.send(sock, protocol.ENGINE_STATUS_REQUEST, {})

    def snapshot(self, events: bool = False) -> dict[str, Any]:
        """The status now; with ``events``, the one to publish (it takes the events)."""
        board = self.board
        for msg_id in board.unresolved():
            record = self.hub.get(msg_id)
            frames = record.reply_frames() if record is not None else None
            board.resolve(msg_id, error_of(frames))
        views = [
            EngineView(e.id, e.state, e.adopted, self.inflight.count(e.id), e.hostname, e.pid)
            for e in list(self.engines.engines.values())
        ]
        return board.snapshot(
            time.monotonic(),
            time.time(),
            views,
            dict(self.dead),
            self.queued(),
            len(self.inflight),
            self.cluster_id,
            events=events,
            unanswered=self.inflight.__contains__,
            oldest=self._oldest,
        )

    def _oldest(self, engine_id: int) -> HeldTask | None:
        """The oldest request ``engine_id`` holds, named by its label or its kind."""
        msg_id = self.inflight.oldest(engine_id)
        if msg_id is None:
            return None
        record = self.hub.get(msg_id)
        if record is None:
            return HeldTask(msg_id)
        name = record.label or KINDS.get(record.msg_type, record.msg_type)
        return HeldTask(msg_id, name, record.submitted)
