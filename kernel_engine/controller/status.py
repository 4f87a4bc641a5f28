"""The cluster's status, for whoever watches it: pure accounting, no sockets.

:class:`StatusBoard` takes events (a task submitted, placed on an engine, finished; an
engine's report of itself) and gives JSON snapshots: per engine its state, current task,
queue, tasks done and failed, CPU and memory; per cluster the task counts and the
throughput over the last minute; the latest errors and the task events since the last
snapshot. The controller's :class:`~.monitor.Monitor` feeds it and publishes what it
gives.

Two costs, kept apart:

- *always*, O(1) per task: a few counters and one bucket of the throughput ring. So the
  counts are right whenever someone starts watching, and cost nothing that grows;
- *only while someone watches* (:attr:`StatusBoard.listening`): task events (bounded:
  the newest :data:`MAX_EVENTS` since the last snapshot, with a count of those dropped),
  when each task was placed on its engine (at most :data:`MAX_PLACED`), and snapshots,
  which the monitor takes on a timer, at most every
  :data:`~kernel_engine.protocol.STATUS_EVERY` seconds (:meth:`StatusBoard.due`).

An engine's current task is what it last reported running, while that task is still
unanswered. Reports come every :data:`~kernel_engine.protocol.ENGINE_REPORT_EVERY`
seconds, so a task shorter than that is rarely caught running: a busy engine without one
shows the oldest request the controller knows it holds instead (``"source": "queue"``),
named by its label or its kind (the function is in the request's pickled buffers, which
the controller never opens), since it was placed on the engine.

Every collection is bounded: errors (:data:`MAX_ERRORS`), events, dead engines shown
(:data:`MAX_DEAD`), one report per live engine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kernel_engine.protocol import ENGINE_REPORT_EVERY, STATUS_EVERY, EngineReport

WINDOW = 60
"""Seconds of throughput history (one bucket per second)."""

MAX_ERRORS = 10
"""Latest task errors kept (with their tracebacks) for the dashboard."""

MAX_EVENTS = 500
"""Task events kept between two snapshots; older ones are counted as dropped."""

MAX_DEAD = 64
"""Dead engines a snapshot lists (the most recent ones)."""

MAX_PLACED = 100_000
"""Tasks whose placing time is kept (while someone listens) for the current task shown."""

MAX_TRACEBACK_LINES = 80
MAX_TRACEBACK_CHARS = 8000

QUIET_EVERY = 1.0
"""Seconds after which a snapshot goes out even if no task moved (CPU, memory, time)."""

STATES = ("starting", "restarting", "idle", "busy", "stopping", "dead")


def engine_state(phase: str, adopted: bool, held: int) -> str:
    """What a dashboard calls an engine: ``phase`` is the engine set's (``ready``,
    ``starting``, ``connecting``, ``awaiting iopub``, ``stopping``, ``dead``); ``held``
    how many requests it holds unanswered (a request a client sent to its lane itself
    counts once the client's notice of it came, at most a few ms later)."""
    if phase == "dead":
        return "dead"
    if phase == "stopping":
        return "stopping"
    if phase != "ready":
        return "restarting" if adopted else "starting"
    return "busy" if held > 0 else "idle"


class Throughput:
    """Tasks finished per second over the last :data:`WINDOW` seconds: a ring of
    one-second buckets, O(1) per task."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self._counts = [0] * window
        self._seconds = [-1] * window

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        i = second % self.window
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._counts[i] = 0
        self._counts[i] += n

    def history(self, now: float) -> list[int]:
        """Tasks finished in each of the last ``window`` seconds, oldest first (the last
        one is the current, partial second)."""
        end = int(now)
        out = []
        for second in range(end - self.window + 1, end + 1):
            i = second % self.window
            out.append(self._counts[i] if self._seconds[i] == second else 0)
        return out

    def rate(self, now: float, since: float) -> float:
        """Tasks per second over the last window (or since ``since``, if that is later)."""
        span = min(float(self.window), max(1.0, now - since))
        return sum(self.history(now)) / span


@dataclass(slots=True)
class TaskError:
    """A task that failed: where, when, and (once known) its error's name, value and
    traceback."""

    msg_id: str
    engine_id: int | None
    time: float
    ename: str | None = None
    evalue: str = ""
    traceback: list[str] = field(default_factory=list)

    def to_content(self) -> dict[str, Any]:
        return {
            "msg_id": self.msg_id,
            "engine_id": self.engine_id,
            "time": self.time,
            "ename": self.ename or "error",
            "evalue": self.evalue,
            "traceback": self.traceback,
        }


def trim_traceback(lines: Any) -> list[str]:
    """A traceback as at most :data:`MAX_TRACEBACK_LINES` lines and
    :data:`MAX_TRACEBACK_CHARS` characters (its end kept: where it failed)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    if not isinstance(lines, list):
        return []
    kept = [str(line) for line in lines[-MAX_TRACEBACK_LINES:]]
    size = 0
    for i in range(len(kept) - 1, -1, -1):
        size += len(kept[i]) + 1
        if size > MAX_TRACEBACK_CHARS:
            return ["...", *kept[i + 1 :]]
    return kept


@dataclass(slots=True)
class EngineTally:
    """What one engine did, and what it last said of itself."""

    done: int = 0
    failed: int = 0
    report: EngineReport | None = None

    def current(self, unanswered: Callable[[str], bool]) -> EngineReport | None:
        """The latest report, if it names a task still ``unanswered`` (a report a second
        old may name a task that has ended since)."""
        report = self.report
        if report is None or report.task is None or not unanswered(report.task):
            return None
        return report


@dataclass(frozen=True, slots=True)
class HeldTask:
    """A request an engine holds, as the controller knows it: its msg_id, a name (its
    label, or its kind) and when it was submitted (a Unix time), if known."""

    msg_id: str
    name: str | None = None
    since: float | None = None


@dataclass(frozen=True, slots=True)
class EngineView:
    """What the controller knows of one engine when a snapshot is taken."""

    id: int
    phase: str
    adopted: bool = False
    held: int = 0
    host: str = ""
    pid: int | None = None


class StatusBoard:
    """Counts, errors, engine reports and (while someone listens) task events.

    Times given to it are ``time.monotonic()`` values (``now``); those put into snapshots
    for people to read come from ``clock`` (``time.time``), read only while someone
    listens or when a task fails.
    """

    def __init__(
        self, now: float, interval: float = STATUS_EVERY, clock: Callable[[], float] = time.time
    ):
        self.started = now
        self.clock = clock
        self.interval = interval
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self.tallies: dict[int, EngineTally] = {}
        self.throughput = Throughput()
        self.errors: deque[TaskError] = deque(maxlen=MAX_ERRORS)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.events_seen = 0  # events since the last snapshot, kept or not
        self.placed: dict[str, float] = {}  # msg_id -> when it went to its engine (wall)
        self.listening = False
        self.changed = True
        self.seq = 0
        self.published = float("-inf")
        self.reported = float("-inf")

    # ----- always: O(1) per task

    def _tally(self, eid: int) -> EngineTally:
        tally = self.tallies.get(eid)
        if tally is None:
            tally = self.tallies[eid] = EngineTally()
        return tally

    def task_submitted(self, msg_id: str, engine_id: int | None) -> None:
        """A new task (``engine_id``: the engine it goes to, when it was addressed)."""
        self.submitted += 1
        self.changed = True
        if engine_id is not None and self.listening:
            self.task_started(msg_id, engine_id)

    def task_started(self, msg_id: str, engine_id: int) -> None:
        """A task was placed on an engine (it runs once that engine's queue reaches it)."""
        self.changed = True
        if self.listening:
            wall = self.clock()
            if len(self.placed) >= MAX_PLACED:  # (tasks that never finished: start afresh)
                self.placed.clear()
            self.placed[msg_id] = wall
            self._event({"kind": "started", "msg_id": msg_id, "engine_id": engine_id, "time": wall})

    def task_finished(
        self,
        msg_id: str,
        engine_id: int | None,
        ok: bool,
        now: float,
        error: tuple[str, str, list[str]] | None = None,
    ) -> None:
        """A task's final outcome; for a failure, ``error`` is (ename, evalue,
        traceback) when the caller knows it (see :meth:`unresolved`)."""
        self.changed = True
        self.throughput.add(now)
        if self.placed:
            self.placed.pop(msg_id, None)
        tally = self.tallies.get(engine_id) if engine_id is not None else None
        if tally is None and engine_id is not None:
            tally = self.tallies[engine_id] = EngineTally()
        if ok:
            self.done += 1
            if tally is not None:
                tally.done += 1
            if self.listening:
                event = {"kind": "finished", "msg_id": msg_id, "engine_id": engine_id}
                self._event({**event, "time": self.clock()})
            return
        self.failed += 1
        if tally is not None:
            tally.failed += 1
        wall = self.clock()
        failure = TaskError(msg_id, engine_id, wall)
        if error is not None:
            self._describe(failure, *error)
        self.errors.append(failure)
        if self.listening:
            self._event(
                {
                    "kind": "failed",
                    "msg_id": msg_id,
                    "engine_id": engine_id,
                    "ename": failure.ename or "error",
                    "time": wall,
                }
            )

    def _event(self, event: dict[str, Any]) -> None:
        self.events_seen += 1
        self.events.append(event)

    @staticmethod
    def _describe(failure: TaskError, ename: str, evalue: str, traceback: Any) -> None:
        failure.ename = str(ename)[:200] or "error"
        failure.evalue = str(evalue)[:2000]
        failure.traceback = trim_traceback(traceback)

    def unresolved(self) -> list[str]:
        """msg_ids of kept errors whose name is not known yet (they failed while nobody
        listened: their replies were not read then)."""
        return [e.msg_id for e in self.errors if e.ename is None]

    def resolve(self, msg_id: str, error: tuple[str, str, list[str]] | None) -> None:
        """What :meth:`unresolved` asked for (None: not to be known; named ``error``)."""
        for failure in self.errors:
            if failure.msg_id == msg_id and failure.ename is None:
                if error is None:
                    failure.ename = "error"
                else:
                    self._describe(failure, *error)

    # ----- engines

    def engine_report(self, engine_id: int, report: EngineReport) -> None:
        self._tally(engine_id).report = report
        self.changed = True

    def engine_gone(self, engine_id: int) -> None:
        """An engine left: its report goes (its counts stay, for the dead listed)."""
        tally = self.tallies.get(engine_id)
        if tally is not None:
            tally.report = None
        self.changed = True

    def forget_engines(self, keep: Iterable[int]) -> None:
        """Drop the tallies of engines not in ``keep`` (dead ones no longer shown)."""
        kept = set(keep)
        for eid in [e for e in self.tallies if e not in kept]:
            del self.tallies[eid]

    # ----- listening

    def subscribe(self) -> None:
        """Someone watches: events are kept, snapshots are due."""
        if not self.listening:
            self.listening = True
            self.events.clear()
            self.events_seen = 0
        self.changed = True
        self.published = float("-inf")  # (a new subscriber gets one at once)

    def unsubscribe(self) -> None:
        """Nobody watches any more: nothing is kept for them."""
        self.listening = False
        self.events.clear()
        self.events_seen = 0
        self.placed.clear()

    def due(self, now: float) -> bool:
        """Whether a snapshot should go out now: never twice within :attr:`interval`;
        then when something changed, or :data:`QUIET_EVERY` s passed."""
        if not self.listening:
            return False
        since = now - self.published
        return since >= self.interval and (self.changed or since >= QUIET_EVERY)

    def reports_due(self, now: float) -> bool:
        """Whether to ask the engines for reports now (and count it as asked)."""
        if not self.listening or now - self.reported < ENGINE_REPORT_EVERY:
            return False
        self.reported = now
        return True

    def take_events(self) -> tuple[list[dict[str, Any]], int]:
        """The events since the last call, and how many more were dropped."""
        events = list(self.events)
        dropped = self.events_seen - len(events)
        self.events.clear()
        self.events_seen = 0
        return events, dropped

    # ----- snapshots

    def _current(
        self,
        engine_id: int,
        report: EngineReport | None,
        oldest: Callable[[int], HeldTask | None],
    ) -> dict[str, Any] | None:
        """A busy engine's current task: the one it reported, else the oldest it holds."""
        if report is not None:
            return {
                "msg_id": report.task,
                "name": report.task_name,
                "since": report.task_since,
                "source": "engine",
            }
        held = oldest(engine_id)
        if held is None:
            return None
        since = self.placed.get(held.msg_id, held.since)
        return {"msg_id": held.msg_id, "name": held.name, "since": since, "source": "queue"}

    def snapshot(
        self,
        now: float,
        wall: float,
        engines: Iterable[EngineView],
        dead: dict[int, str],
        queued: int,
        running: int,
        cluster_id: str = "",
        events: bool = True,
        unanswered: Callable[[str], bool] = lambda msg_id: False,
        oldest: Callable[[int], HeldTask | None] = lambda engine_id: None,
    ) -> dict[str, Any]:
        """The status as JSON. ``engines``: the live ones; ``dead``: why each one that
        left did (the :data:`MAX_DEAD` with the highest ids are listed); ``queued``:
        tasks waiting for the scheduler; ``running``: requests held by engines;
        ``unanswered``: whether a msg_id is still held by an engine (an engine's report
        names its current task only while it is); ``oldest``: the oldest request an engine
        holds, shown as its task when it reported none. With ``events``, the events since
        the last snapshot go with it (and are taken)."""
        rows = []
        live = sorted(engines, key=lambda e: e.id)
        for view in live:
            tally = self.tallies.get(view.id) or EngineTally()
            report = tally.report
            task = tally.current(unanswered)
            state = engine_state(view.phase, view.adopted, view.held)
            current = None
            if state == "busy":
                current = self._current(view.id, task, oldest)
            rows.append(
                {
                    "id": view.id,
                    "state": state,
                    "task": current,
                    "queue": view.held,
                    "done": tally.done,
                    "failed": tally.failed,
                    "cpu": report.cpu if report is not None else None,
                    "rss": report.rss if report is not None else None,
                    "host": view.host,
                    "pid": view.pid,
                    "reason": None,
                }
            )
        live_ids = {v.id for v in live}
        gone = sorted(e for e in dead if e not in live_ids)[-MAX_DEAD:]
        for eid in gone:
            tally = self.tallies.get(eid) or EngineTally()
            rows.append(
                {
                    "id": eid,
                    "state": "dead",
                    "task": None,
                    "queue": 0,
                    "done": tally.done,
                    "failed": tally.failed,
                    "cpu": None,
                    "rss": None,
                    "host": "",
                    "pid": None,
                    "reason": dead[eid],
                }
            )
        if len(self.tallies) > len(live_ids) + MAX_DEAD:
            self.forget_engines(live_ids | set(gone))
        states = [r["state"] for r in rows]
        content: dict[str, Any] = {
            "seq": self.seq,
            "time": wall,
            "cluster_id": cluster_id,
            "interval": self.interval,
            "cluster": {
                "engines": sum(s in ("idle", "busy") for s in states),
                "busy": states.count("busy"),
                "dead": states.count("dead"),
                "submitted": self.submitted,
                "queued": queued,
                "running": running,
                "done": self.done,
                "failed": self.failed,
                "throughput": round(self.throughput.rate(now, self.started), 3),
                "history": self.throughput.history(now),
            },
            "engines": rows,
            "errors": [e.to_content() for e in reversed(self.errors)],
        }
        if events:
            content["events"], content["events_dropped"] = self.take_events()
            self.seq += 1
            self.published = now
            self.changed = False
        return content
