"""Direct lanes: a client on the engines' host sends apply requests to the lanes itself.

These tests check what makes that safe: requests stay in order when an engine switches
from routed to direct, the controller still knows every request (records, queue status,
other clients' ``get_result``, dependencies), and a dead engine's direct requests fail
with or without the controller's event.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import pytest

import jupyter_ext as jx
from jupyter_ext._lanes import DEATH_GRACE

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _set_later(name, value, delay):
    """Wait, then set a name in the engine's namespace."""
    import time

    from IPython import get_ipython

    time.sleep(delay)
    get_ipython().user_ns[name] = value
    return value


def _path(rc, ar):
    """The path the (first) request of ``ar`` took, while it is live."""
    return rc.transport.requests.get(ar.msg_ids[0]).path


def _wait_ready(rc, ids, timeout=5.0):
    lanes = rc.transport.io.lanes
    deadline = time.monotonic() + timeout
    while not all(i in lanes.lanes and lanes.lanes[i].ready for i in ids):
        assert time.monotonic() < deadline, "lanes did not answer their pings"
        time.sleep(0.01)


def test_lanes_are_used_and_the_controller_keeps_records(rc):
    _wait_ready(rc, rc.ids)
    ar = rc[0].apply_async(time.sleep, 0.5)
    assert _path(rc, ar) == "direct"  # sent straight to engine 0's lane
    status = rc.queue_status(0)
    assert status["queue"] == 1  # the controller was told before it answered
    assert ar.get(5) is None
    assert rc[0].apply_sync(pow, 2, 10) == 1024
    last = rc.history[-1]
    records = {r["msg_id"]: r for r in rc.db_query({"engine_id": 0})}
    assert records[ar.msg_ids[0]]["status"] == "ok"
    assert records[last]["status"] == "ok" and records[last]["result_content"] is not None
    assert rc.queue_status(0)["queue"] == 0
    with jx.Client(rc.connection_file) as other:
        assert other.get_result(last).get(5) == 1024
        assert last in other.hub_history()


def test_switch_from_routed_to_direct_keeps_order(rc):
    _wait_ready(rc, [1])
    lane = rc.transport.io.lanes.lanes[1]
    lane.ready = False  # as if the ping had not come back yet
    first = rc[1].apply_async(_set_later, "order_x", 1, 0.3)
    assert _path(rc, first) == "routed"  # through the controller
    lane.ready = True
    # engine 1 still has a routed request in flight: this one waits, unsent
    second = rc[1].apply_async(lambda x: x, jx.Reference("order_x"))
    order = rc.transport.requests.order
    assert order.waiting(1) == 1 and not second.sent
    assert second.get(5) == 1
    assert second.sent and order.waiting(1) == 0
    third = rc[1].apply_async(lambda x: x + 1, jx.Reference("order_x"))
    assert third.get(5) == 2


def test_execute_and_apply_run_in_the_order_sent(rc):
    """Without blocking, as IPython Parallel users write it."""
    _wait_ready(rc, rc.ids)
    dv = rc[:]
    for i in range(3):
        dv.execute(f"import time; time.sleep(0.2); seq_z = {i}", block=False)
        assert dv.pull("seq_z", block=False).get(5) == [i, i]
    dv.push({"seq_w": 7}, block=False)
    assert dv.execute("print(seq_w)", block=False).get(5)[0].stdout == "7\n"
    dv.apply_async(_set_later, "seq_v", 8, 0.2)
    assert dv.execute("seq_v += 1", block=False).get(5)
    assert dv.pull("seq_v", block=True) == [9, 9]


def test_load_balanced_task_after_a_direct_one(rc):
    _wait_ready(rc, rc.ids)
    direct = rc[0].apply_async(_set_later, "dep_y", 5, 0.3)
    lview = rc.load_balanced_view()
    with lview.temp_flags(after=direct, block=False):
        later = lview.apply(lambda: time.time())
    finished = later.get(5)
    assert direct.get(5) == 5
    done = direct.metadata["completed"].timestamp()
    assert finished >= done - 0.01
    # the controller heard at once that the direct task was done, not FLUSH_EVERY later
    assert finished - done < 0.15


def test_another_client_may_name_a_direct_task_at_once(rc):
    """Another client hears of a direct call's msg_id before the controller does (its
    client tells it up to FLUSH_EVERY later): a task that names it waits for it, where it
    used to fail with InvalidDependency; a msg_id no one ever sends still fails so, after
    the scheduler's grace."""
    from kernel_engine.controller.balancer import UNKNOWN_GRACE

    _wait_ready(rc, rc.ids)
    other = jx.Client(rc.connection_file)
    try:
        lview = other.load_balanced_view()
        # (the first runs past the grace: the controller heard of it while it ran)
        for seconds in (UNKNOWN_GRACE + 0.5, 0.3, 0.3):
            running = rc[0].apply_async(_set_later, "named_x", 3, seconds)
            answered = rc[1].apply_async(os.getpid)
            answered.get(5)
            with lview.temp_flags(after=[running.msg_ids[0], answered.msg_ids[0]]):
                later = lview.apply_async(time.time)
            started = later.get(10)
            assert started >= running.metadata["completed"].timestamp() - 0.01
        with lview.temp_flags(after=["never-sent"]):
            start = time.monotonic()
            with pytest.raises(jx.InvalidDependency, match="never-sent"):
                lview.apply_sync(abs, 1)
        assert UNKNOWN_GRACE - 0.1 < time.monotonic() - start < UNKNOWN_GRACE + 3
    finally:
        other.close()


@pytest.mark.parametrize("limit", ["count", "bytes"])
def test_notices_go_at_once_when_enough_wait(rc, monkeypatch, limit):
    """Notices wait up to FLUSH_EVERY (here a minute), unless MAX_WAITING of them or
    MAX_WAITING_BYTES of reply frames wait."""
    import jupyter_ext._lanes as lanes_module

    _wait_ready(rc, rc.ids)
    monkeypatch.setattr(lanes_module, "FLUSH_EVERY", 60.0)
    monkeypatch.setattr(lanes_module, "MAX_WAITING", 4 if limit == "count" else 1000)
    monkeypatch.setattr(lanes_module, "MAX_WAITING_BYTES", 50_000)
    with jx.Client(rc.connection_file) as other:
        rc.queue_status()  # (sends what waited before)
        small = [rc[0].apply_async(pow, 2, i) for i in range(3)]
        assert [ar.get(5) for ar in small] == [1, 2, 4]
        ids = [ar.msg_ids[0] for ar in small]
        time.sleep(0.6)
        assert not set(ids) & set(other.hub_history())  # still waiting
        call = (pow, 2, 3) if limit == "count" else (bytes, 60_000)  # (a reply of 60 kB)
        last = rc[0].apply_async(*call)
        last.get(5)
        ids.append(last.msg_ids[0])
        deadline = time.monotonic() + 5
        while not set(ids) <= set(other.hub_history()):
            assert time.monotonic() < deadline, "the notices were not sent"
            time.sleep(0.05)


def test_notices_go_as_soon_as_enough_wait_with_no_reply_to_wake_the_io_thread(rc, monkeypatch):
    """The note that makes MAX_WAITING wakes the IO thread (which else sleeps up to a
    quarter of a second) while nothing is answered."""
    import jupyter_ext._lanes as lanes_module

    _wait_ready(rc, rc.ids)
    monkeypatch.setattr(lanes_module, "FLUSH_EVERY", 60.0)
    monkeypatch.setattr(lanes_module, "MAX_WAITING", 4)
    with jx.Client(rc.connection_file) as other:
        delays = []
        for _ in range(5):
            rc.queue_status()  # (sends what waited before)
            busy = [rc[0].apply_async(time.sleep, 0.6)]  # (nothing answered meanwhile)
            t0 = time.monotonic()
            busy += [rc[0].apply_async(abs, -i) for i in range(3)]
            ids = {ar.msg_ids[0] for ar in busy}
            while not ids <= set(other.hub_history()):
                assert time.monotonic() - t0 < 5, "the notices were not sent"
                time.sleep(0.005)
            delays.append(time.monotonic() - t0)
            assert [ar.get(5) for ar in busy] == [None, 0, 1, 2]
        assert max(delays) < 0.15, delays


def test_a_client_closed_right_after_a_direct_call_leaves_its_record(rc):
    """The notices that wait go before the goodbye (on which the controller marks what
    the client did not report as answered as unknown)."""
    for wait in ("get", "blocking"):
        client = jx.Client(rc.connection_file)
        try:
            _wait_ready(client, client.ids)
            if wait == "get":
                ar = client[0].apply_async(_set_later, "closed_x", 7, 0.4)
                assert ar.get(5) == 7
                msg_id = ar.msg_ids[0]
            else:
                assert client[0].apply_sync(_set_later, "closed_x", 7, 0.4) == 7
                msg_id = client.history[-1]
        finally:
            client.close()
        deadline = time.monotonic() + 5
        while (
            status := rc.db_query({"msg_id": msg_id}, keys=["status"])[0]["status"]
        ) == "pending":
            assert time.monotonic() < deadline, "the record stayed pending"
            time.sleep(0.05)
        assert status == "ok", wait
        assert rc.get_result(msg_id).get(5) == 7


def test_interrupting_a_direct_task(rc):
    _wait_ready(rc, rc.ids)
    ar = rc[1].apply_async(time.sleep, 30)
    time.sleep(0.3)
    assert rc.transport.interrupt(ar.msg_ids) == [1]
    with pytest.raises(jx.RemoteError, match="KeyboardInterrupt"):
        ar.get(5)
    assert rc[1].apply_sync(abs, -3) == 3


@pytest.mark.parametrize("path", ["lane", "cell"])
def test_an_interrupt_meant_for_a_request_not_started_yet_is_not_lost(rc, path):
    """A bare SIGINT hit whatever ran on the engine (here the request before), and the
    one it was meant for ran in full when its turn came; the engine is now told which
    requests to interrupt."""
    _wait_ready(rc, rc.ids)
    rc[1].execute("meant_ran = False", block=True)
    if path == "lane":
        first = rc[1].apply_async(_set_later, "first_done", 1, 0.8)
        meant = rc[1].apply_async(_set_later, "meant_ran", True, 0.0)  # (waits behind it)
    else:
        first = rc[1].execute("import time; time.sleep(0.8); first_done = 1", block=False)
        meant = rc[1].execute("meant_ran = True", block=False)
    time.sleep(0.3)
    assert rc.transport.interrupt(meant.msg_ids) == [1]
    with pytest.raises(jx.RemoteError, match="KeyboardInterrupt"):
        meant.get(10)
    first.get(10)  # (not its target: it ran to its end)
    assert rc[1].pull(["first_done", "meant_ran"], block=True) == [1, False]
    assert rc[1].apply_sync(abs, -3) == 3


def _end_once_interrupt_is_asked():
    """Spins until the engine is asked to interrupt it, then ends: the interrupt's signal
    comes when the engine already runs the next request. (Threads switch often meanwhile,
    so that the main thread ends it while the control thread answers the interrupt.)"""
    import sys
    import time

    from IPython import get_ipython

    kernel = get_ipython().kernel
    me = kernel.current_task[0]
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        end = time.monotonic() + 5
        while me not in kernel.interrupted and time.monotonic() < end:
            pass
    finally:
        sys.setswitchinterval(saved)
    return "ended"


def test_an_interrupt_for_a_request_that_just_ended_spares_the_next_one(rc):
    """The control thread checked that the request runs, answered, then signalled: a
    request that ended meanwhile left the SIGINT to the next one, which failed with a
    KeyboardInterrupt nobody asked for."""
    _wait_ready(rc, rc.ids)
    for _ in range(25):
        meant = rc[1].apply_async(_end_once_interrupt_is_asked)
        after = rc[1].apply_async(time.sleep, 0.15)
        time.sleep(0.05)
        assert rc.transport.interrupt(meant.msg_ids) == [1]
        try:
            meant.get(10)
        except jx.RemoteError as exc:
            assert exc.ename == "KeyboardInterrupt"
        assert after.get(10) is None


def test_a_task_run_while_a_cell_awaits_leaves_the_cell_interruptible(rc):
    """Another client's task, sent to the lane, runs while a cell awaits; at its end it
    cleared the engine's current request, so an interrupt of the cell found nothing
    running there and the cell ran to its end."""
    _wait_ready(rc, rc.ids)
    cell = rc[1].execute(
        "import asyncio\nfor _ in range(100):\n    await asyncio.sleep(0.05)\nawaited = 1",
        block=False,
    )
    time.sleep(0.3)  # (the cell awaits)
    with jx.Client(rc.connection_file) as other:
        _wait_ready(other, [1])
        ar = other[1].apply_async(abs, -2)
        assert _path(other, ar) == "direct"
        assert ar.get(2) == 2  # (it ran meanwhile)
    t0 = time.monotonic()
    assert rc.transport.interrupt(cell.msg_ids) == [1]
    with pytest.raises(jx.RemoteError):
        cell.get(10)
    assert time.monotonic() - t0 < 3
    assert rc[1].apply_sync(abs, -3) == 3


def test_lanes_can_be_switched_off(rc, monkeypatch):
    monkeypatch.setenv("JUPYTER_PX_DIRECT", "0")
    with jx.Client(rc.connection_file) as routed:
        assert routed.transport.io.lanes is None
        assert routed[:].apply_sync(os.getpid) == [rc.engine_info(i)["pid"] for i in routed.ids]


def test_engines_on_tcp_when_unix_sockets_are_off(cluster_factory, monkeypatch):
    """``JUPYTER_PX_IPC=0``: the engines listen on loopback TCP, and lanes still serve."""
    monkeypatch.setenv("JUPYTER_PX_IPC", "0")
    _, rc = cluster_factory.start(1)
    conn = rc.engine_info(0)["connection_info"]
    assert conn["transport"] == "tcp" and conn["ip"] == "127.0.0.1", conn
    _wait_ready(rc, rc.ids)
    ar = rc[0].apply_async(pow, 2, 5)
    assert _path(rc, ar) == "direct"
    assert ar.get(10) == 32


def test_dead_engine_fails_direct_requests_without_the_event(cluster_factory):
    """Should the controller's event be lost, the client's own check fails the requests."""
    _, rc = cluster_factory.start(2)
    _wait_ready(rc, rc.ids)
    on_event = rc.transport._on_event

    def drop_unregistered(msg):
        if msg.msg_type != "px_engine_unregistered":
            on_event(msg)

    rc.transport._on_event = drop_unregistered
    pid = rc.engine_info(1)["pid"]
    ar = rc[1].apply_async(time.sleep, 60)
    assert _path(rc, ar) == "direct"
    time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(jx.EngineError, match=f"engine 1 \\(pid {pid}\\) is gone"):
        ar.get(DEATH_GRACE + 5)
    assert time.monotonic() - t0 < DEATH_GRACE + 2
    assert rc[0].apply_sync(abs, -1) == 1


def test_thousands_queued_behind_a_busy_engine_never_block(rc, tmp_path):
    """No high-water mark stops a sender: 10,000 requests wait while the engine sleeps.

    (With zmq's default marks, sending blocks after a thousand or so until the engine
    wakes: the busy task would then be done before the last request is sent.)
    """
    _wait_ready(rc, [0])
    go = tmp_path / "go"
    busy = rc[0].apply_async(_wait_for_file, str(go), 60.0)  # (busy until we say so)
    queued = [rc[0].apply_async(abs, -i) for i in range(10_000)]
    assert not busy.done(), "sending blocked until the busy engine woke up"
    go.touch()
    assert _path(rc, queued[-1]) == "direct"
    assert busy.get(15) is True
    assert [ar.get(60) for ar in queued] == list(range(10_000))


def _wait_for_file(path: str, timeout: float) -> bool:
    import os
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_threads_and_clients_share_the_lanes(rc):
    """Several threads of one client, and a second client, on the same lanes at once."""
    import concurrent.futures

    _wait_ready(rc, rc.ids)

    def work(k):
        view = rc[k % 2]
        out = []
        for i in range(200):
            if i % 50 == 0:  # a shell request among the lane ones
                view.execute(f"t{k} = {i}", block=False)
                out.append(view.pull(f"t{k}", block=False).get(10) == i)
            else:
                out.append(view.apply_async(pow, k, 2).get(10) == k * k)
        return all(out)

    with jx.Client(rc.connection_file) as other:
        _wait_ready(other, other.ids)
        theirs = [other[i % 2].apply_async(abs, -i) for i in range(500)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(4)))
        assert [ar.get(10) for ar in theirs] == list(range(500))


def test_task_after_a_direct_one_whose_engine_died(cluster_factory):
    """The controller hears of the direct task's failure, so its dependents do not wait."""
    _, rc = cluster_factory.start(2)
    _wait_ready(rc, rc.ids)
    direct = rc[1].apply_async(time.sleep, 60)
    assert _path(rc, direct) == "direct"
    lview = rc.load_balanced_view(targets=[0])
    with lview.temp_flags(after=direct, block=False):
        dependent = lview.apply(abs, -1)
    time.sleep(0.2)
    os.kill(rc.engine_info(1)["pid"], signal.SIGKILL)
    with pytest.raises(jx.EngineError):
        direct.get(5)
    with pytest.raises(jx.ImpossibleDependency):
        dependent.get(5)


def test_replies_resolve_in_order_and_callbacks_may_send_direct(rc):
    """Futures resolve in the order their replies came, with their results and metadata
    kept first, and a done-callback (run on the IO thread) that sends to a lane gets its
    reply, the controller told of it."""
    _wait_ready(rc, rc.ids)
    seen, chained = [], []

    def done(ar):
        msg_id = ar.msg_ids[0]
        seen.append((ar.get(0), msg_id in rc.results, ar.metadata["status"]))
        if len(chained) < 3:
            chained.append(rc[0].apply_async(pow, 3, len(chained)))

    ars = [rc[0].apply_async(abs, -i) for i in range(200)]
    for ar in ars:
        ar.add_done_callback(done)
    assert [ar.get(10) for ar in ars] == list(range(200))
    assert seen == [(i, True, "ok") for i in range(200)]
    deadline = time.monotonic() + 10
    while len(chained) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [c.get(10) for c in chained] == [1, 3, 9]
    md = chained[-1].metadata
    assert md["engine_id"] == 0 and md["submitted"] <= md["completed"] <= md["received"]
    while rc.queue_status(0)["queue"]:  # (the controller heard of the chained ones too)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    records = {r["msg_id"]: r for r in rc.db_query({"engine_id": 0})}
    assert all(records[c.msg_ids[0]]["status"] == "ok" for c in chained)
