"""A blocking call to one engine on its lane is read by the calling thread itself, on a
socket of its own (``Transport.submit(wait=True)``, path ``here``): results, records,
order, threads, Ctrl-C, a lost engine and a closing client all behave as on the IO
thread's path, and nothing is left open or waiting."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

import jupyter_ext as jx
from kernel_engine.errors import EngineError, RemoteError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0


def noop() -> int:
    return 0


def add(a: int, b: int) -> int:
    return a + b


def note(word: str, delay: float = 0.0) -> list[str]:
    """Append ``word`` to the engine's list of words, after ``delay`` s; returns it."""
    import time as _time

    _time.sleep(delay)
    words = globals().setdefault("_WORDS", [])
    words.append(word)
    return list(words)


def _mine(rc: Any) -> dict[int, Any]:
    """The calling thread's own sockets of ``rc``, by engine."""
    return getattr(rc.transport.io.lanes._mine, "heres", {})


def _live(rc: Any) -> list[Any]:
    transport = rc.transport
    with transport.requests.lock:
        return [r for r in transport.requests.live.values() if r.kind != "hub"]


def _until(condition: Any, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _stopped(call: Any, action: Any, raised: type[BaseException]) -> float:
    """Seconds ``call()`` took to raise ``raised`` once ``action()`` ran, 0.5 s into it."""
    timer = threading.Timer(0.5, action)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(raised):
            call()
    finally:
        timer.cancel()
    return time.monotonic() - started


def _lanes_ready(rc: Any) -> None:
    """Wait until every lane answered its ping (before, calls go through the controller)."""
    _lanes_ready_n(rc, 2)


def _lanes_ready_n(rc: Any, n: int) -> None:
    lanes = rc.transport.io.lanes
    assert _until(lambda: len(lanes.lanes) >= n and not lanes.unready), "lanes never ready"


def _recorded_elsewhere(rc: Any, msg_ids: list[str], first_result: Any = None) -> None:
    """A second client finds the controller's records of ``msg_ids``, finished (and the
    first one's result, when given)."""
    other = jx.Client(rc.connection_file)
    try:

        def recorded() -> bool:
            rows = other.db_query({"msg_id": {"$in": msg_ids}}, keys=["msg_id", "completed"])
            return len(rows) == len(msg_ids) and all(r["completed"] for r in rows)

        assert _until(recorded, 5), "the controller never recorded the blocking calls"
        if first_result is not None:
            assert other.get_result(msg_ids[0]).get(TIMEOUT) == first_result
    finally:
        other.close()


def test_a_blocking_call_reads_its_reply_itself_and_is_recorded(rc):
    _lanes_ready(rc)
    before = len(rc.history)
    assert rc[0].apply_sync(add, 2, 3) == 5
    assert rc[1].apply_sync(add, 4, 5) == 9
    here = _mine(rc)
    assert set(here) >= {0, 1} and not any(h.busy for h in here.values())
    msg_ids = rc.history[before:]
    assert len(msg_ids) == 2
    for msg_id, eid, value in zip(msg_ids, (0, 1), (5, 9)):
        md = rc.metadata[msg_id]
        assert md["engine_id"] == eid and md["status"] == "ok"
        assert md["started"] is not None and md["completed"] is not None
        assert rc.results[msg_id] == value
    # the controller heard of both (a second client asks: its own notices go first)
    _recorded_elsewhere(rc, msg_ids, first_result=5)
    # errors come back as they always did
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        rc[0].apply_sync(lambda: 1 / 0)
    assert rc[0].apply_sync(noop) == 0


def test_a_blocking_call_keeps_its_place_behind_work_in_flight(rc):
    rc[:].execute("_WORDS = []", block=True)
    first = rc[0].apply_async(note, "first", 0.3)
    assert rc[0].apply_sync(note, "second") == ["first", "second"]
    assert first.get(TIMEOUT) == ["first"]
    # and work sent after a blocking call waits for it, whichever thread sends it
    late: list[Any] = []
    timer = threading.Timer(0.1, lambda: late.append(rc[0].apply_async(note, "fourth")))
    timer.start()
    try:
        assert rc[0].apply_sync(note, "third", 0.4) == ["first", "second", "third"]
    finally:
        timer.join(TIMEOUT)
    assert late[0].get(TIMEOUT)[-2:] == ["third", "fourth"]


def test_threads_each_read_their_own_replies(rc):
    errors: list[BaseException] = []
    idents: list[bytes] = []

    def loop(k: int) -> None:
        try:
            for i in range(40):
                eid = (k + i) % 2
                assert rc[eid].apply_sync(add, k, i) == k + i
            idents.extend(h.socket.identity for h in _mine(rc).values())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors[:2]
    assert len(idents) == len(set(idents)) == 8  # each thread's own, one per engine
    assert not _live(rc)


def test_ctrl_c_in_a_blocking_call_interrupts_it_and_leaves_nothing_behind(rc):
    _lanes_ready(rc)
    busy: list[bool] = []

    def interrupt() -> None:
        busy.append(any(h.busy for h in list(rc.transport.io.lanes._heres)))
        os.kill(os.getpid(), signal.SIGINT)

    took = _stopped(lambda: rc[0].apply_sync(time.sleep, 20), interrupt, KeyboardInterrupt)
    assert busy == [True], "the call did not wait on its own socket"
    assert took < 10, "the engine was not interrupted"
    # the socket went to the IO thread, which read the reply, ended the request and
    # closed it; the thread's next call gets a socket of its own again
    assert 0 not in _mine(rc)
    assert _until(lambda: not _live(rc)), f"left waiting: {_live(rc)}"
    io = rc.transport.io
    assert _until(lambda: not io._taken and not io._given), "the given socket stayed open"
    assert rc[0].apply_sync(add, 1, 1) == 2
    assert 0 in _mine(rc)
    assert rc[:].apply_sync(noop) == [0, 0]


def test_a_lost_engine_ends_a_blocking_call_at_once(cluster_factory):
    _, rc = cluster_factory.start(2)
    _lanes_ready(rc)
    pid = rc[1].apply_sync(os.getpid)
    assert 1 in _mine(rc)
    kill = lambda: os.kill(pid, signal.SIGKILL)  # noqa: E731
    assert _stopped(lambda: rc[1].apply_sync(time.sleep, 30), kill, EngineError) < 10
    assert rc[0].apply_sync(add, 2, 2) == 4
    assert not _live(rc)


def test_closing_the_client_ends_a_blocking_call_in_another_thread(cluster_factory):
    cluster, rc = cluster_factory.start(2)
    _lanes_ready(rc)
    assert rc[0].apply_sync(noop) == 0  # (this thread's socket: idle at the close)
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(rc[1].apply_sync(time.sleep, 20))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    heres = rc.transport.io.lanes._heres
    assert _until(lambda: any(h.busy for h in list(heres)), 10), "not on its own socket"
    time.sleep(0.3)
    started = time.monotonic()
    rc.close()
    assert time.monotonic() - started < 5, "close waited for the blocking call"
    caller.join(5)
    assert not caller.is_alive(), "the blocking call did not end when its client closed"
    assert isinstance(outcome[0], RemoteError) and "closed" in str(outcome[0])
    assert not rc.transport.io.thread.is_alive()
    assert not rc.transport.io.lanes._heres  # every thread's socket closed
    # the cluster serves a new client
    other = jx.Client(cluster.connection_file)
    try:
        other.wait_for_engines(2, timeout=TIMEOUT)
        assert other[0].apply_sync(add, 3, 4) == 7
    finally:
        other.close()


def test_threads_that_ended_leave_no_socket_open(rc):
    """A thread's own socket is closed once the thread has ended (a new thread a call,
    for ever, must not run the process out of descriptors)."""
    _lanes_ready(rc)
    heres = rc.transport.io.lanes._heres
    for i in range(30):
        t = threading.Thread(target=lambda i=i: rc[i % 2].apply_sync(noop))
        t.start()
        t.join(TIMEOUT)
    assert len(heres) <= 4, f"{len(heres)} sockets of threads that ended are open"
    assert sum(1 for h in heres if not h.closed) == len(heres)


def test_jupyter_px_here_0_sends_every_reply_through_the_io_thread(cluster_factory, monkeypatch):
    monkeypatch.setenv("JUPYTER_PX_HERE", "0")
    _, rc = cluster_factory.start(2)
    _lanes_ready(rc)
    assert rc[0].apply_sync(add, 1, 2) == 3
    assert not _mine(rc) and not rc.transport.io.lanes._heres


# ----- what a review found (each of these failed before its fix)


def test_ctrl_c_right_after_the_send_leaves_nothing_waiting(rc, monkeypatch):
    """The interrupt comes between the send and the wait (a signal checked as the wait
    begins): the socket still goes to the IO thread, which reads the reply."""
    _lanes_ready(rc)
    transport = rc.transport
    real = transport.wait_here_all
    fired: list[int] = []

    def interrupted(pairs: Any, also: Any = ()) -> None:
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
        real(pairs, also)

    monkeypatch.setattr(transport, "wait_here_all", interrupted)
    view = rc[0]
    with pytest.raises(KeyboardInterrupt):
        view.apply_sync(add, 1, 1)
    assert fired
    assert len(view.history) == 1  # (the view knows of what it sent)
    assert _until(lambda: not _live(rc)), f"left waiting: {_live(rc)}"
    assert rc[0].apply_async(add, 2, 2).get(TIMEOUT) == 4
    assert rc[0].apply_sync(add, 3, 3) == 6


class LoadsWith:
    """A result that the client loads by calling ``loader(arg)`` (as it unpickles it)."""

    def __init__(self, loader: Any, arg: Any):
        self.loader, self.arg = loader, arg

    def __reduce__(self) -> Any:
        return (self.loader, (self.arg,))


def _load_slowly(seconds: float) -> str:
    time.sleep(seconds)
    return "loaded"


def print_then(seconds: float) -> Any:
    print("hello")
    return LoadsWith(_load_slowly, seconds)


def test_output_is_not_counted_twice_while_a_result_loads(rc):
    """The engine's output comes twice (in the reply, and through the controller): the
    IO thread must not add the second copy while the calling thread loads the result."""
    _lanes_ready(rc)
    view = rc[0]
    for _ in range(3):
        assert view.apply_sync(print_then, 0.3) == "loaded"
        time.sleep(0.2)  # (the copy through the controller has come by now)
        assert rc.metadata[view.history[-1]]["stdout"] == "hello\n"


def test_sockets_to_engines_that_are_gone_are_closed(cluster_factory):
    cluster, rc = cluster_factory.start(1)
    _lanes_ready_n(rc, 1)
    lanes = rc.transport.io.lanes
    for _ in range(3):
        old = rc.ids[-1]
        assert rc[old].apply_sync(noop) == 0
        (new,) = cluster.start_engines_sync(1)
        rc.wait_for_engines(2, timeout=TIMEOUT)
        cluster_factory.pids.append(rc.engine_info(new)["pid"])
        cluster.stop_engines_sync([old])
        assert _until(lambda old=old: old not in rc.ids and old not in lanes.lanes)
        _lanes_ready_n(rc, 1)
        assert rc[new].apply_sync(noop) == 0
    stale = [h for h in lanes._heres if lanes.lanes.get(h.lane.engine_id) is not h.lane]
    assert not stale, f"{len(stale)} sockets to gone engines are open"


def test_a_reply_after_the_controller_came_back_is_still_told_to_it(cluster_factory):
    """The controller is lost during a blocking call (paused past the heartbeats): the
    call fails; the engine's reply, which comes later, still reaches the controller's
    record once it is back."""
    cluster, rc = cluster_factory.start(2)
    _lanes_ready(rc)
    pid = cluster.controller_pid
    threading.Timer(0.5, lambda: os.kill(pid, signal.SIGSTOP)).start()
    try:
        with pytest.raises(EngineError):
            rc[0].apply_sync(note, "late", 7.0)
        msg_id = rc.history[-1]
    finally:
        time.sleep(max(0.0, 8.0 - 0.5))
        os.kill(pid, signal.SIGCONT)
    assert _until(lambda: not rc.transport.io.lost, TIMEOUT)

    def told() -> bool:
        record = rc.transport.fetch_records([msg_id]).get(msg_id)
        return record is not None and record[0].get("status") == "ok"

    assert _until(told, 10), rc.transport.fetch_records([msg_id])


@pytest.mark.parametrize("slow", [False, True])
def test_ctrl_c_while_a_reply_is_taken_in_sends_what_waited_behind_it(rc, monkeypatch, slow):
    """Taking its reply in, the calling thread sends the requests other threads queued
    behind its call: a Ctrl-C then (a real signal) waits until they have all left, also
    when that takes longer than an ordinary section's bound (``slow``)."""
    _lanes_ready(rc)
    transport = rc.transport
    real_send = transport._send
    main = threading.main_thread()
    releases: list[int] = []

    def interrupted_release(req: Any, path: str) -> bool:
        if threading.current_thread() is main:
            releases.append(1)
            if slow and len(releases) == 1:
                time.sleep(0.4)
            if len(releases) == 1 + slow:
                os.kill(os.getpid(), signal.SIGINT)  # (held back until the section's end)
        return real_send(req, path)

    monkeypatch.setattr(transport, "_send", interrupted_release)
    queued: list[Any] = []

    def queue() -> None:
        queued.extend(rc[0].apply_async(add, i, 1) for i in range(20))

    timer = threading.Timer(0.1, queue)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            rc[0].apply_sync(note, "slow", 0.8)
    finally:
        timer.join(TIMEOUT)
    monkeypatch.undo()
    assert len(releases) >= 20
    assert [ar.get(TIMEOUT) for ar in queued] == [i + 1 for i in range(20)]
    assert _until(lambda: not _live(rc)), f"left waiting: {_live(rc)}"
    assert rc[0].execute("y = 1", block=False).wait(TIMEOUT)


def test_a_lost_engine_owes_the_controller_nothing(cluster_factory):
    """Replies still owed to a controller (``_unreported``: their requests failed while
    it was lost) are forgotten when their engine dies: none can come, and a socket kept
    to read one would stay open until the client closes."""
    _, rc = cluster_factory.start(2)
    transport = rc.transport
    transport._unreported["m-of-1"] = 1
    transport._unreported["m-of-0"] = 0
    pid = rc.engine_info(1)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: 1 not in rc.ids)
    assert _until(lambda: "m-of-1" not in transport._unreported)
    assert "m-of-0" in transport._unreported


# ----- a blocking call to several engines: each reply read on the thread's own sockets


def sleep_if(pid: int, seconds: float) -> int:
    """Sleep ``seconds`` on the engine whose process is ``pid``; return the engine's pid."""
    import os as _os
    import time as _time

    if _os.getpid() == pid:
        _time.sleep(seconds)
    return _os.getpid()


def _busy_sockets(rc: Any) -> int:
    return sum(1 for h in list(rc.transport.io.lanes._heres) if h.busy)


def test_a_blocking_call_to_several_engines_reads_every_reply_itself(rc):
    _lanes_ready(rc)
    dv = rc[:]
    busy: list[int] = []
    timer = threading.Timer(0.3, lambda: busy.append(_busy_sockets(rc)))
    timer.start()
    before = len(rc.history)
    assert dv.apply_sync(note, "x", 0.6)[0][-1] == "x"
    timer.join(TIMEOUT)
    assert busy == [2], "the replies were not read on the thread's own sockets"
    msg_ids = rc.history[before:]
    assert len(msg_ids) == 2
    assert {rc.metadata[m]["engine_id"] for m in msg_ids} == {0, 1}
    assert all(rc.metadata[m]["status"] == "ok" for m in msg_ids)
    for _ in range(100):
        assert dv.apply_sync(add, 1, 2) == [3, 3]
    dv.push({"here_a": 5}, block=True)
    assert dv.pull("here_a", block=True) == [5, 5]
    with pytest.raises(jx.CompositeError, match="ZeroDivisionError"):
        dv.apply_sync(lambda: 1 / 0)
    assert not _live(rc)
    assert not any(h.busy for h in _mine(rc).values())
    _recorded_elsewhere(rc, msg_ids)


def test_ctrl_c_in_a_blocking_call_to_several_engines_interrupts_them_together(rc):
    _lanes_ready(rc)
    busy: list[int] = []

    def interrupt() -> None:
        busy.append(_busy_sockets(rc))
        os.kill(os.getpid(), signal.SIGINT)

    took = _stopped(lambda: rc[:].apply_sync(time.sleep, 20), interrupt, KeyboardInterrupt)
    assert busy == [2], "the call did not wait on its own sockets"
    assert took < 8, "the engines were not interrupted"
    assert _until(lambda: not _live(rc)), f"left waiting: {_live(rc)}"
    io = rc.transport.io
    assert _until(lambda: not io._taken and not io._given), "the given sockets stayed open"
    assert rc[:].apply_sync(add, 1, 1) == [2, 2]


def test_ctrl_c_between_the_sends_to_several_engines_leaves_nothing_waiting(rc, monkeypatch):
    """A real Ctrl-C during the first engine's send (held back to the end of its section):
    the request that left goes to the IO thread (``leave_here_all``), which reads its
    reply; its engine is interrupted."""
    _lanes_ready(rc)
    transport = rc.transport
    real_send, real_leave = transport._send_here, transport.leave_here_all
    sent: list[str] = []
    left: list[int] = []

    def send_then_ctrl_c(req: Any, here: Any) -> None:
        real_send(req, here)
        sent.append(req.msg_id)
        if len(sent) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def leave(pairs: Any, *args: Any, **kwargs: Any) -> None:
        left.append(len(pairs))
        real_leave(pairs, *args, **kwargs)

    monkeypatch.setattr(transport, "_send_here", send_then_ctrl_c)
    monkeypatch.setattr(transport, "leave_here_all", leave)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rc[:].apply_sync(note, "between", 1.0)
    monkeypatch.undo()
    assert len(sent) == 1 and left == [1]
    assert time.monotonic() - started < 8
    assert _until(lambda: not _live(rc), 8), f"left waiting: {_live(rc)}"
    io = rc.transport.io
    assert _until(lambda: not io._taken and not io._given), "the given socket stayed open"
    assert rc[:].apply_sync(add, 2, 2) == [4, 4]


def test_ctrl_c_interrupts_the_engines_a_call_reached_through_the_controller(rc):
    """Ctrl-C in a blocking call to several engines, one of them reached the general way
    (its lane not answering yet): every engine is interrupted, not only the others."""
    _lanes_ready(rc)
    lanes = rc.transport.io.lanes
    lanes.lanes[1].ready = False  # (as a lane that has not answered its ping yet)
    try:
        sigint = lambda: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
        took = _stopped(lambda: rc[:].apply_sync(time.sleep, 20), sigint, KeyboardInterrupt)
        assert took < 8
        assert _until(lambda: not _live(rc), 3), f"still running: {_live(rc)}"
    finally:
        lanes.lanes[1].ready = True
    assert rc[:].apply_sync(add, 1, 2) == [3, 3]


def _load_nested(pid: int) -> Any:
    """Loading a result makes a blocking call to engine 1 (in the client only)."""
    import builtins
    import os as _os

    rc = getattr(builtins, "_px_here_test_rc", None)  # (set in the client only)
    return ("loaded", pid, None if rc is None else rc[1].apply_sync(_os.getpid))


def nested_result(slow_pid: int) -> LoadsWith:
    import os as _os
    import time as _time

    if _os.getpid() == slow_pid:
        _time.sleep(0.5)
    return LoadsWith(_load_nested, _os.getpid())


def test_a_blocking_call_made_while_a_result_loads_is_refused_not_hung(rc):
    """Engine 0's result loads while engine 1's reply still waits for this thread to read
    it; the loading code's blocking call to engine 1 would wait behind it for ever."""
    import builtins

    _lanes_ready(rc)
    pids = rc[:].apply_sync(os.getpid)
    builtins._px_here_test_rc = rc  # type: ignore[attr-defined]
    started = time.monotonic()
    try:
        with pytest.raises(jx.CompositeError, match="would wait for ever"):
            rc[:].apply_sync(nested_result, pids[1])
    finally:
        del builtins._px_here_test_rc  # type: ignore[attr-defined]
    assert time.monotonic() - started < 10
    assert _until(lambda: not _live(rc)), f"left waiting: {_live(rc)}"
    assert rc[:].apply_sync(add, 1, 1) == [2, 2]


def test_a_lost_engine_ends_a_blocking_call_to_several_engines(cluster_factory):
    _, rc = cluster_factory.start(2)
    _lanes_ready(rc)
    pids = rc[:].apply_sync(os.getpid)
    kill = lambda: os.kill(pids[1], signal.SIGKILL)  # noqa: E731
    took = _stopped(lambda: rc[:].apply_sync(sleep_if, pids[1], 30), kill, jx.CompositeError)
    assert took < 10
    assert rc[0].apply_sync(add, 2, 2) == 4
    assert not _live(rc)
