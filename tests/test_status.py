"""The status stream: the pure board (no processes), then a real controller and engines.

Pure: counts, throughput, state derivation, rate limit, bounded events and errors, the
text rendering. Real: states and counts during and after a map, a killed engine shown
dead with its cause, nothing published while nobody listens, the rate limit held under
a flood of tiny tasks.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from kernel_engine import protocol, wire
from kernel_engine.controller.monitor import error_of
from kernel_engine.controller.status import (
    MAX_ERRORS,
    MAX_EVENTS,
    MAX_TRACEBACK_LINES,
    QUIET_EVERY,
    EngineView,
    HeldTask,
    StatusBoard,
    Throughput,
    engine_state,
    trim_traceback,
)
from kernel_engine.protocol import EngineReport
from kernel_engine.top import render_text, sparkline, stream_status

# ----- pure


def snap(board: StatusBoard, now: float, views: list[EngineView], **kw: Any) -> dict[str, Any]:
    return board.snapshot(now, 1000.0 + now, views, kw.pop("dead", {}), 0, 0, "c", **kw)


def test_engine_state_from_phase_and_held_requests() -> None:
    assert engine_state("ready", False, 0) == "idle"
    assert engine_state("ready", False, 3) == "busy"
    assert engine_state("starting", False, 0) == "starting"
    assert engine_state("awaiting iopub", False, 0) == "starting"
    assert engine_state("connecting", True, 0) == "restarting"  # (adopted after a restart)
    assert engine_state("stopping", False, 2) == "stopping"
    assert engine_state("dead", False, 0) == "dead"


def test_throughput_ring_counts_the_last_minute() -> None:
    ring = Throughput(window=60)
    for t in range(100):  # one task a second for 100 s
        ring.add(1000.0 + t + 0.5)
    history = ring.history(1099.9)
    assert len(history) == 60 and history == [1] * 60
    assert ring.rate(1099.9, since=0.0) == 1.0
    ring.add(1099.9, 59)
    assert ring.history(1099.9)[-1] == 60
    assert ring.history(1200.0) == [0] * 60  # (a quiet minute later: old buckets are stale)
    young = Throughput()
    young.add(10.2, 20)
    assert young.rate(12.0, since=10.0) == 10.0  # (over its 2 s of life, not a minute)


def test_counts_are_kept_whether_or_not_anyone_listens() -> None:
    board = StatusBoard(now=0.0)
    views = [EngineView(0, "ready", held=1), EngineView(1, "ready")]
    board.task_submitted("a", None)
    board.task_started("a", 0)
    board.task_submitted("b", 1)
    board.task_finished("a", 0, True, 1.5)
    board.task_finished("b", 1, False, 1.6, ("ValueError", "bad", ["tb"]))
    assert not board.events, "no events kept while nobody listens"
    status = snap(board, 2.0, views, events=False)
    assert status["cluster"]["submitted"] == 2
    assert (status["cluster"]["done"], status["cluster"]["failed"]) == (1, 1)
    rows = {r["id"]: r for r in status["engines"]}
    assert (rows[0]["state"], rows[0]["done"], rows[0]["queue"]) == ("busy", 1, 1)
    assert (rows[1]["state"], rows[1]["failed"]) == ("idle", 1)
    assert status["errors"][0]["ename"] == "ValueError"
    assert status["errors"][0]["engine_id"] == 1


def test_rate_limit_and_quiet_snapshots() -> None:
    board = StatusBoard(now=0.0, interval=0.25)
    assert not board.due(0.0), "nobody listens: never due"
    board.subscribe()
    assert board.due(0.0)
    snap(board, 0.0, [])
    for t in range(1, 25):  # a task finishing every 10 ms: still at most one per 0.25 s
        board.task_finished(f"m{t}", None, True, t / 100)
        assert board.due(t / 100) == (t >= 25), t
    assert board.due(0.25)
    snap(board, 0.25, [])
    assert not board.due(0.6), "nothing changed and less than a second passed"
    assert board.due(0.25 + QUIET_EVERY), "a quiet snapshot every second (CPU, memory)"
    board.subscribe()  # another subscriber: one at once
    assert board.due(0.3)
    board.unsubscribe()
    assert not board.due(10.0)


def test_five_thousand_tasks_a_second_make_four_snapshots_a_second() -> None:
    """Simulated: 5,000 tasks a second for 2 s, the monitor's timer every 50 ms (it runs
    every 0.25 s; faster here to show that ``due`` is what limits)."""
    board = StatusBoard(now=0.0, interval=0.25, clock=lambda: 0.0)
    board.subscribe()
    published = []
    for ms in range(2000):
        now = ms / 1000
        for i in range(5):
            board.task_started(f"m{ms}-{i}", i % 2)
            board.task_finished(f"m{ms}-{i}", i % 2, True, now)
        if ms % 50 == 0 and board.due(now):
            published.append(snap(board, now, [EngineView(0, "ready"), EngineView(1, "ready")]))
    assert len(published) == 8  # (at 0, 0.25, ... 1.75 s)
    assert all(len(p["events"]) <= MAX_EVENTS for p in published)
    assert sum(len(p["events"]) + p["events_dropped"] for p in published) == 2 * 5 * 1751
    assert board.done == 10_000 and board.throughput.rate(2.0, 0.0) == 5000.0


def test_events_are_bounded_and_dropped_ones_counted() -> None:
    board = StatusBoard(now=0.0, clock=lambda: 1.0)
    board.subscribe()
    for i in range(MAX_EVENTS + 100):
        board.task_started(f"m{i}", 0)
    board.task_finished("m0", 0, False, 1.0, ("KeyError", "'x'", []))
    status = snap(board, 1.0, [EngineView(0, "ready", held=1)])
    events = status["events"]
    assert len(events) == MAX_EVENTS
    assert status["events_dropped"] == 101
    assert events[-1] == {
        "kind": "failed",
        "msg_id": "m0",
        "engine_id": 0,
        "ename": "KeyError",
        "time": 1.0,
    }
    assert events[0]["kind"] == "started" and events[0]["msg_id"] == "m101"
    assert status["seq"] == 0
    again = snap(board, 2.0, [])
    assert (again["events"], again["events_dropped"], again["seq"]) == ([], 0, 1)


def test_errors_are_bounded_and_described_later_when_nobody_listened() -> None:
    board = StatusBoard(now=0.0)
    for i in range(MAX_ERRORS + 5):
        board.task_finished(f"e{i}", i % 2, False, 1.0)
    assert len(board.errors) == MAX_ERRORS
    missing = board.unresolved()
    assert missing == [f"e{i}" for i in range(5, MAX_ERRORS + 5)]
    board.resolve("e5", ("ZeroDivisionError", "division by zero", ["l1", "l2"]))
    board.resolve("e6", None)
    status = snap(board, 2.0, [], events=False)
    by_id = {e["msg_id"]: e for e in status["errors"]}
    assert by_id["e5"]["ename"] == "ZeroDivisionError" and by_id["e5"]["traceback"] == ["l1", "l2"]
    assert by_id["e6"]["ename"] == "error"
    assert status["errors"][0]["msg_id"] == f"e{MAX_ERRORS + 4}", "newest first"


def test_tracebacks_are_trimmed_from_the_top() -> None:
    lines = [f"line {i}" for i in range(500)]
    kept = trim_traceback(lines)
    assert len(kept) == MAX_TRACEBACK_LINES and kept[-1] == "line 499"
    huge = trim_traceback(["x" * 3000, "y" * 3000, "z" * 3000])
    assert huge[0] == "..." and huge[-1] == "z" * 3000
    assert trim_traceback("a\nb") == ["a", "b"]
    assert trim_traceback(None) == []


def test_current_task_only_while_it_is_unanswered() -> None:
    board = StatusBoard(now=0.0)
    board.engine_report(0, EngineReport(50.0, 1 << 20, "t1", "f", 99.0))
    views = [EngineView(0, "ready", held=2)]
    status = snap(board, 1.0, views, unanswered=lambda m: m == "t1", events=False)
    row = status["engines"][0]
    assert row["task"] == {"msg_id": "t1", "name": "f", "since": 99.0, "source": "engine"}
    assert (row["cpu"], row["rss"]) == (50.0, 1 << 20)
    stale = snap(board, 1.0, views, unanswered=lambda m: False, events=False)
    assert stale["engines"][0]["task"] is None, "t1 ended since the report"


def test_a_busy_engine_without_a_reported_task_shows_the_oldest_it_holds() -> None:
    """Reports come every half second: a short task is rarely caught running. The oldest
    request the engine holds stands in, since it was placed there (while someone
    listened) or else since it was submitted."""
    wall = iter(range(500, 600))
    board = StatusBoard(now=0.0, clock=lambda: float(next(wall)))
    held = {0: HeldTask("m1", "apply", 42.0), 1: HeldTask("m9", "label9", 43.0)}
    views = [EngineView(0, "ready", held=3), EngineView(1, "ready", held=1), EngineView(2, "ready")]
    board.engine_report(0, EngineReport(1.0, 1, "gone", "f", 40.0))  # (answered since)
    status = snap(board, 1.0, views, events=False, oldest=held.get)
    rows = _engines(status)
    assert rows[0]["task"] == {"msg_id": "m1", "name": "apply", "since": 42.0, "source": "queue"}
    assert rows[1]["task"]["name"] == "label9" and rows[2]["task"] is None  # (2 is idle)
    board.subscribe()
    board.task_started("m1", 0)  # placed while someone listens: since then
    assert snap(board, 2.0, views, oldest=held.get)["engines"][0]["task"]["since"] == 500.0
    board.task_finished("m1", 0, True, 2.5)
    assert "m1" not in board.placed
    board.unsubscribe()
    assert board.placed == {}


def test_dead_engines_keep_their_counts_and_cause_bounded() -> None:
    board = StatusBoard(now=0.0)
    board.task_finished("a", 90, True, 1.0)
    dead = {i: f"engine {i} (pid 1) was killed by signal SIGKILL" for i in range(100)}
    status = snap(board, 2.0, [EngineView(200, "ready")], dead=dead, events=False)
    rows = status["engines"]
    assert rows[0]["id"] == 200 and len(rows) == 65  # (the 64 most recent dead)
    ninety = next(r for r in rows if r["id"] == 90)
    assert ninety["state"] == "dead" and ninety["done"] == 1 and "SIGKILL" in ninety["reason"]
    assert not any(r["id"] == 7 for r in rows)
    assert status["cluster"]["engines"] == 1 and status["cluster"]["dead"] == 64
    assert len(board.tallies) <= 65


def test_engine_reports_are_checked() -> None:
    good = {"cpu": 12.5, "rss": 1000, "task": "m", "task_name": "f", "task_since": 1.8e9}
    assert EngineReport.from_content(good) == EngineReport(12.5, 1000, "m", "f", 1.8e9)
    assert EngineReport.from_content({}) == EngineReport()
    for bad in ({"cpu": "x"}, {"cpu": float("nan")}, {"rss": -1}, {"task": 3}, {"cpu": True}):
        with pytest.raises((TypeError, ValueError)):
            EngineReport.from_content(bad)


def test_error_names_come_from_the_reply_content() -> None:
    w = wire.Wire(b"k")
    content = protocol.error_content("KeyError", "'x'", ["tb1", "tb2"])
    frames = w.pack(protocol.APPLY_REPLY, content, {"msg_id": "p"}, {"status": "error"})[1]
    at = frames.index(wire.DELIM)
    assert error_of(frames[at + 1 :]) == ("KeyError", "'x'", ["tb1", "tb2"])
    assert error_of(None) is None
    assert error_of([b"", b"{}", b"{}", b"{}", b"not json"]) is None


def test_text_rendering() -> None:
    board = StatusBoard(now=0.0)
    board.task_finished("a", 0, False, 1.0, ("ValueError", "boom\nmore", []))
    status = snap(board, 2.0, [EngineView(0, "ready", host="h1", pid=5)], events=False)
    text = render_text(status, width=200)
    assert "engine  state" in text and "ValueError: boom" in text and "more" not in text
    assert text.splitlines()[0].startswith("cluster c · 1 engines (0 busy)")
    assert all(len(line) <= 30 for line in render_text(status, width=30).splitlines())
    assert sparkline([0, 5, 10]) == " ▄█"


# ----- a real cluster

N_FLOOD = 3000
N_SUBMITTERS = 2
MIN_FLOOD_RATE = 1500
"""Tasks a second the flood must reach: half what a 2-core machine does (margin for a
loaded CI runner)."""


class Watcher:
    """Collects the status stream (as ``jupyter px top`` reads it) on a thread."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self.got: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream: Any = stream_status(self.info, poll=0.05)
        for status in stream:
            if status is not None:
                self.got.append((time.monotonic(), status))
            if self._stop.is_set():
                break
        stream.close()

    def wait(self, check: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for _, status in self.got[seen:]:
                if check(status):
                    return status
            seen = len(self.got)
            time.sleep(0.02)
        last = self.got[-1][1] if self.got else None
        raise AssertionError(f"no status matched within {timeout} s; last: {last}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def info(rc: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(Path(rc.connection_file).read_text())
    return loaded


@pytest.fixture
def watcher(info: dict[str, Any]) -> Iterator[Watcher]:
    w = Watcher(info)
    yield w
    w.close()


def _engines(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in status["engines"]}


def test_states_and_counts_during_and_after_a_map(rc: Any, watcher: Watcher) -> None:
    before = rc.status()["cluster"]
    watcher.wait(lambda s: len(s["engines"]) == 2)
    view = rc.load_balanced_view()
    ar = view.map(lambda x: (__import__("time").sleep(1.2), x)[1], range(4), chunksize=1)
    busy = watcher.wait(  # (as the engines reported them: named by their function)
        lambda s: all(
            r["state"] == "busy" and r["task"] and r["task"]["source"] == "engine"
            for r in _engines(s).values()
        )
    )
    for row in busy["engines"]:
        assert row["task"]["name"] == "<lambda>" and row["task"]["msg_id"] in ar.msg_ids
        assert row["queue"] >= 1 and isinstance(row["rss"], int) and row["rss"] > 1 << 20
    assert busy["cluster"]["running"] + busy["cluster"]["done"] - before["done"] >= 2
    assert ar.get(30) == list(range(4))
    after = watcher.wait(
        lambda s: (
            s["cluster"]["done"] - before["done"] == 4
            and all(r["state"] == "idle" for r in s["engines"])
        )
    )
    engines = _engines(after)
    assert sum(engines[e]["done"] for e in (0, 1)) >= 4
    assert after["cluster"]["throughput"] > 0 and sum(after["cluster"]["history"]) >= 4
    events = [e for _, s in watcher.got for e in s.get("events", []) if e["msg_id"] in ar.msg_ids]
    assert {e["kind"] for e in events} == {"started", "finished"}
    assert any(isinstance(r["cpu"], float) for _, s in watcher.got for r in s["engines"])
    # a failure: its event, and the latest errors with its traceback
    with pytest.raises(Exception, match="ZeroDivisionError"):
        view.apply_sync(lambda: 1 / 0)
    failed = watcher.wait(lambda s: any(e["kind"] == "failed" for e in s.get("events", [])))
    event = next(e for e in failed["events"] if e["kind"] == "failed")
    assert event["ename"] == "ZeroDivisionError" and event["engine_id"] in (0, 1)
    error = failed["errors"][0]
    assert error["ename"] == "ZeroDivisionError"
    assert any("ZeroDivisionError: division by zero" in line for line in error["traceback"])
    # the query answers the same (rc.status), counting everything sent before it
    now = rc.status()
    assert now["cluster"]["done"] - before["done"] == 4
    assert now["cluster"]["failed"] - before["failed"] == 1


def test_nothing_is_published_while_nobody_listens(info: dict[str, Any], rc: Any) -> None:
    """A spy on every topic sees no status until a status subscriber comes, and none
    again soon after it leaves."""
    context: zmq.Context[Any] = zmq.Context()
    spy = context.socket(zmq.SUB)
    spy.linger = 0
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.connect(f"tcp://{info['ip']}:{info['iopub_port']}")

    def statuses(seconds: float) -> int:
        n = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if spy.poll(int(left * 1000) + 1):
                n += spy.recv_multipart()[0] == protocol.STATUS_TOPIC
        return n

    try:
        rc.load_balanced_view().map_sync(lambda x: x, range(50))
        assert statuses(1.0) == 0
        watcher = Watcher(info)
        try:
            watcher.wait(lambda s: True)
            assert statuses(1.0) >= 2
        finally:
            watcher.close()
        statuses(0.3)  # (what was on its way)
        assert statuses(1.0) == 0
    finally:
        context.destroy(linger=0)


def test_rate_limit_holds_under_a_flood_of_tiny_tasks(rc: Any, watcher: Watcher) -> None:
    """Several submitters flood the cluster with tiny load-balanced tasks (batched by
    the client): thousands a second are reached (about 3,000/s on a 2-core machine, where
    client, controller and engines share the cores), and the controller still publishes
    at most one snapshot every STATUS_EVERY s, with bounded events."""
    watcher.wait(lambda s: True)
    done_before = rc.status()["cluster"]["done"]
    view = rc.load_balanced_view()
    view.map(lambda x: x, range(200)).get(30)  # (the function is known to the engines)
    ars: list[Any] = []
    ready = threading.Barrier(N_SUBMITTERS + 1)

    def submit() -> None:
        ready.wait(10)
        ars.append(view.map(lambda x: x, range(N_FLOOD), chunksize=1))

    threads = [threading.Thread(target=submit) for _ in range(N_SUBMITTERS)]
    for thread in threads:
        thread.start()
    start = len(watcher.got)
    ready.wait(10)
    t0 = time.monotonic()
    for thread in threads:
        thread.join(30)
    for ar in ars:
        ar.get(60)
    took = time.monotonic() - t0
    total = N_SUBMITTERS * N_FLOOD
    rate = total / took
    assert len(ars) == N_SUBMITTERS
    assert rate >= MIN_FLOOD_RATE, f"only {rate:.0f} tasks/s"
    last = watcher.wait(lambda s: s["cluster"]["done"] >= done_before + 200 + total)
    during = [s for t, s in watcher.got[start:] if t <= t0 + took + 0.3]
    times = [s["time"] for _, s in watcher.got[start:]]  # (when the controller sent them)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"{rate:.0f} tasks/s; {len(during)} snapshots in {took:.1f} s; min gap {min(gaps)}")
    assert min(gaps) >= protocol.STATUS_EVERY * 0.98, gaps
    assert len(during) <= took / protocol.STATUS_EVERY + 3, (len(during), took)
    assert len(during) / max(took, 1.0) <= 1 / protocol.STATUS_EVERY + 2  # (a few a second)
    dropped = sum(s.get("events_dropped", 0) for _, s in watcher.got[start:])
    kept = sum(len(s.get("events", [])) for _, s in watcher.got[start:])
    assert kept + dropped >= 2 * total, (kept, dropped)  # (started and finished each)
    assert all(len(s.get("events", [])) <= MAX_EVENTS for _, s in watcher.got)
    assert max(last["cluster"]["history"]) >= MIN_FLOOD_RATE / 2  # (the controller's count)


def test_short_tasks_show_a_current_task(rc: Any, watcher: Watcher) -> None:
    """Tasks far shorter than the engines' report interval: every engine shown busy
    names a task of the map (the oldest it holds, when it reported none)."""
    watcher.wait(lambda s: True)
    start = len(watcher.got)
    ar = rc.load_balanced_view().map(
        lambda x: (__import__("time").sleep(0.02), x)[1], range(100), chunksize=1
    )
    ar.get(30)
    busy = [
        row
        for _, s in watcher.got[start:]
        for row in s["engines"]
        if row["state"] == "busy" and s["cluster"]["running"]
    ]
    assert len(busy) >= 2, [s["engines"] for _, s in watcher.got[start:]]
    assert all(row["task"] is not None for row in busy), busy
    ours = [row["task"] for row in busy if row["task"]["msg_id"] in ar.msg_ids]
    assert ours and all(isinstance(t["since"], float) for t in ours)
    assert {t["name"] for t in ours} <= {"<lambda>", "apply"}


def test_a_killed_engine_is_shown_dead_with_its_cause(rc: Any, watcher: Watcher) -> None:
    [eid] = rc.cluster.start_engines_sync(1)
    pid = rc.engine_info(eid)["pid"]
    watcher.wait(lambda s: _engines(s).get(eid, {}).get("state") == "idle")
    os.kill(pid, signal.SIGKILL)
    dead = watcher.wait(lambda s: _engines(s).get(eid, {}).get("state") == "dead")
    row = _engines(dead)[eid]
    assert "SIGKILL" in row["reason"] and str(pid) in row["reason"]
    assert dead["cluster"]["dead"] >= 1
    assert "SIGKILL" in render_text(dead)
