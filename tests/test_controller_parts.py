"""The controller's components as pure logic (no processes): what is in flight, the task
records, which clients are still there, the scheduler's new events, and the event loop
that nothing can stop."""

from __future__ import annotations

import time
from typing import Any

import pytest
import zmq

from kernel_engine import protocol, wire
from kernel_engine.controller.balancer import FLAGS_KEPT, FLAGS_KEPT_BYTES, Balancer
from kernel_engine.controller.clients import Clients
from kernel_engine.controller.engines import describe_exit, oom_kills
from kernel_engine.controller.hub import Hub
from kernel_engine.controller.inflight import Inflight, Pending
from kernel_engine.controller.loop import PollLoop
from kernel_engine.controller.scheduler import Fail, Scheduler, Task


def pending(eid: int, kind: str = "routed", client: bytes = b"c") -> Pending:
    return Pending(client, {"msg_id": "?"}, eid, "lane", kind)  # type: ignore[arg-type]


def test_inflight_knows_what_each_engine_holds():
    inflight = Inflight()
    inflight.add("a", pending(0))
    inflight.add("b", pending(0, "lb"))
    inflight.add("c", pending(1, client=b"other"))
    assert inflight.count(0) == 2 and inflight.engines_of(["a", "c", "zz"]) == {0, 1}
    assert inflight.pop("a") is not None and inflight.completed[0] == 1
    assert inflight.pop("a") is None
    assert [m for m, _ in inflight.of_client(b"other")] == ["c"]
    held = inflight.pop_engine(0)
    assert [m for m, _ in held] == ["b"] and inflight.count(0) == 0 and len(inflight) == 1


def submit(hub: Hub, msg_id: str, client: bytes = b"0123456789abcdef:r") -> None:
    hub.submitted(msg_id, "apply_request", client, None)


def test_the_hub_evicts_the_oldest_finished_records_and_never_live_ones():
    hub = Hub(max_records=10)
    for i in range(10):
        submit(hub, f"live{i}")
    for i in range(10):  # all records are live: none may go, the bound waits for them
        submit(hub, f"more{i}")
    assert len(hub.records) == 20
    for i in range(10):
        hub.completed(f"live{i}", "ok")
    submit(hub, "next")  # the finished ones make room; 11 live ones stay, over the bound
    assert len(hub.records) == 11
    assert all(hub.known(f"more{i}") for i in range(10)) and hub.known("next")
    assert not any(hub.known(f"live{i}") for i in range(10))
    for i in range(10):
        hub.completed(f"more{i}", "ok")
    submit(hub, "last")
    assert len(hub.records) == 10 and hub.known("more9") and not hub.known("more0")


def test_the_hub_bounds_stored_results_by_bytes():
    hub = Hub(max_result_bytes=100, max_one_result=60)
    for i in range(5):
        submit(hub, f"t{i}")
        hub.completed(f"t{i}", "ok", frames=[b"x" * 40])
    stored = [m for m, r in hub.records.items() if r.reply is not None]
    assert stored == ["t3", "t4"] and hub.result_bytes == 80
    submit(hub, "big")
    hub.completed("big", "ok", frames=[b"x" * 61])  # above the one-result limit: not kept
    assert hub.records["big"].reply is None and hub.records["big"].status == "ok"


def test_purging_everything_empties_the_eviction_queues():
    hub = Hub()
    for i in range(1000):
        submit(hub, f"t{i}")
        hub.completed(f"t{i}", "error", frames=[b"r"])
    submit(hub, "live")
    assert hub.purge(None, None) == 1000
    assert list(hub.records) == ["live"] and hub.result_bytes == 0
    assert not hub._finished and not hub._stored


def test_the_hub_answers_what_dependencies_need():
    hub = Hub()
    submit(hub, "a")
    assert hub.outcome("a") == "pending" and hub.outcome("nope") is None
    hub.assigned("a", 3)
    hub.completed("a", "ok")
    assert hub.outcome("a") == (3, True)


def test_a_client_is_lost_after_its_timeout_in_ticks_not_in_wall_time():
    clients = Clients(timeout=3)
    clients.seen(b"a")
    clients.seen(b"b")
    assert clients.tick() == []  # both heard during this interval
    clients.seen(b"a")
    assert clients.tick() == [] and clients.tick() == []
    # b has been silent for 3 ticks; a controller that was paused meanwhile never ticked,
    # so a pause never costs a client anything
    assert clients.tick() == [b"b"]
    assert b"b" not in clients and b"a" in clients
    clients.seen(b"b")  # it came back: a client again
    assert b"b" in clients


def test_a_client_that_says_goodbye_is_gone_at_once():
    clients = Clients(timeout=30)
    clients.seen(b"a")
    assert clients.goodbye(b"a")  # even before its first tick
    assert not clients.goodbye(b"a") and clients.tick() == []


def test_a_lost_clients_queued_tasks_fail_and_stop_taking_engines():
    s = Scheduler(hwm=1, max_batch=1)
    s.add_engine(0)
    for i in range(3):
        s.submit(Task(f"gone{i}", b"gone"), 0.0)
    s.submit(Task("mine", b"mine"), 0.0)
    dispatched = s.schedule(0.0)
    assert [d.msg_ids for d in dispatched] == [("gone0",)]
    fails = s.drop_client(b"gone", 1.0)
    assert {f.msg_id for f in fails if isinstance(f, Fail)} == {"gone1", "gone2"}
    assert all(f.kind == "TaskAborted" for f in fails if isinstance(f, Fail))
    assert s.running_of(b"gone") == [(0, "gone0")]
    s.finished("gone0", 0, "ok", 2.0)
    assert [d.msg_ids for d in s.schedule(2.0)] == [("mine",)]


def test_an_engine_death_is_reported_with_its_cause():
    s = Scheduler()
    s.add_engine(1)
    s.submit(Task("t", b"c"), 0.0)
    s.schedule(0.0)
    (fail,) = s.remove_engine(1, 1.0, "engine 1 (pid 42) was killed by signal SIGKILL")
    assert isinstance(fail, Fail) and fail.kind == "EngineError"
    assert fail.reason == "engine 1 (pid 42) was killed by signal SIGKILL"


def test_deaths_are_described_with_their_cause():
    assert describe_exit(-9) == "was killed by signal SIGKILL"
    assert "out of memory" in describe_exit(-9, oom=True)
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "stopped responding"
    assert oom_kills() >= 0


def test_outcomes_are_a_bounded_memory():
    s = Scheduler(max_outcomes=100)
    s.add_engine(0)
    for i in range(1000):
        s.record_outcome(f"d{i}", 0, True)
    assert len(s._outcomes) <= 100 and not s.knows("d0") and s.knows("d999")
    s.forget(None)
    assert not s.knows("d999") and not s._order


def test_the_loop_survives_handlers_and_callbacks_that_raise():
    """Nothing that arrives can end the controller's loop: only stop() does."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://loop-test")
    b.connect("inproc://loop-test")
    loop = PollLoop()
    seen: list[bytes] = []

    def handler(frames: list[zmq.Frame]) -> None:
        seen.append(frames[0].bytes)
        if frames[0].bytes == b"boom":
            raise TypeError("a handler bug")
        if frames[0].bytes == b"stop":
            loop.stop()

    def after() -> None:
        raise ValueError("an after_events bug")

    loop.add_socket(a, handler)
    loop.after_events.append(after)
    loop.call_later(0.01, lambda: 1 / 0)
    for msg in (b"boom", b"boom", b"fine"):
        b.send(msg)
    loop.call_later(0.05, lambda: b.send(b"stop"))
    loop.run()
    assert seen == [b"boom", b"boom", b"fine", b"stop"]
    assert loop.errors.total >= 1  # the second handler error was counted, not logged again
    for sock in (a, b):
        sock.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("tracked", [True, False])
def test_the_loop_sees_a_message_that_a_send_took_the_news_of(tracked):
    """A reply reaches the loop's DEALER while a callback sleeps, then the callback sends
    on that DEALER (which takes in the socket's "a message came", so its descriptor does
    not fire): the loop still handles the reply on its next pass, not at the sweep."""
    import threading
    import time

    loop = PollLoop()
    ctx = loop.context() if tracked else zmq.Context()
    peer_ctx = zmq.Context()
    dealer, router = ctx.socket(zmq.DEALER), peer_ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    seen: list[tuple[bytes, float]] = []

    def echo() -> None:  # the peer: answers each message at once
        while router.poll(2000):
            frames = router.recv_multipart()
            router.send_multipart(frames)
            if frames[-1] == b"stop":
                return

    peer = threading.Thread(target=echo, daemon=True)
    peer.start()

    def handler(frames: list[zmq.Frame]) -> None:
        seen.append((frames[0].bytes, time.monotonic()))
        if frames[0].bytes == b"stop":
            loop.stop()

    sent_b: list[float] = []

    def send_then_sleep_then_send() -> None:
        dealer.send(b"a")
        time.sleep(0.2)  # (the echo of "a" arrives meanwhile)
        dealer.send(b"b")
        sent_b.append(time.monotonic())
        loop.call_later(0.3, lambda: dealer.send(b"stop"))

    loop.add_socket(dealer, handler)
    loop.call_later(0.05, send_then_sleep_then_send)
    loop.call_later(10, loop.stop)
    loop.run()
    peer.join(5)
    assert [m for m, _ in seen] == [b"a", b"b", b"stop"]
    assert seen[0][1] - sent_b[0] < 0.1, "the echo waited for the sweep"
    assert loop.swept == 0
    loop.close()
    for sock in (dealer, router):
        sock.close(linger=0)
    ctx.term()
    peer_ctx.term()


def test_an_idle_loop_sleeps_and_a_reused_descriptor_keeps_its_socket():
    import os
    import time

    loop, plain = PollLoop(), zmq.Context()
    ctx = loop.context()
    idle = plain.socket(zmq.PULL)  # (another context's socket: looked at before each poll)
    idle.bind("inproc://idle")
    loop.add_socket(idle, lambda frames: None)
    # a socket closed without remove_socket, and a new one given its descriptor number
    old = ctx.socket(zmq.PAIR)
    loop.add_socket(old, lambda frames: None)
    fd = old.getsockopt(zmq.FD)
    old.close(linger=0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # (zmq's reaper closes the descriptor a bit later)
        try:
            os.fstat(fd)
        except OSError:
            break
        time.sleep(0.01)
    got: list[bytes] = []
    spare = []
    new = ctx.socket(zmq.PAIR)
    while new.getsockopt(zmq.FD) != fd and len(spare) < 20:  # (the lowest free number)
        spare.append(new)
        new = ctx.socket(zmq.PAIR)
    assert new.getsockopt(zmq.FD) == fd
    peer = ctx.socket(zmq.PAIR)
    new.bind("inproc://reused")
    peer.connect("inproc://reused")
    loop.add_socket(new, lambda frames: (got.append(frames[0].bytes), loop.stop()))
    loop.remove_socket(old)  # (late: must not unregister the new socket's descriptor)
    loop.call_later(0.5, lambda: peer.send(b"hello"))
    loop.call_later(5, loop.stop)
    cpu, wall = time.process_time(), time.monotonic()
    loop.run()
    assert got == [b"hello"] and time.monotonic() - wall < 1.0
    assert time.process_time() - cpu < 0.2, "the loop spun while idle"
    loop.close()
    for sock in (idle, new, peer, *spare):
        sock.close(linger=0)
    ctx.term()
    plain.term()


def test_database_reads_run_off_the_loop_are_bounded_and_served_in_turn():
    import threading
    import time

    from kernel_engine.controller.reads import FileReads

    loop, context = PollLoop(), zmq.Context()
    reads = FileReads(loop, context, limit=5, per_owner=3)
    release = threading.Event()
    ticks: list[float] = []
    order: list[str] = []
    answers: list[tuple[object, object]] = []

    def slow() -> str:
        assert release.wait(10)
        order.append("slow")
        return "read"

    def boom() -> None:
        order.append("boom")
        raise OSError("disk gone")

    def mine(i: int):  # type: ignore[no-untyped-def]
        return lambda: order.append(f"a{i}")

    def then(result: object, error: object) -> None:
        answers.append((result, error))
        if len(answers) == 5:
            loop.stop()

    assert reads.submit(slow, then, owner=b"a") is None
    assert reads.submit(mine(1), then, owner=b"a") is None
    assert reads.submit(mine(2), then, owner=b"a") is None
    refused = reads.submit(mine(3), then, owner=b"a")  # past this client's share
    assert refused is not None and "this client" in refused
    assert reads.submit(boom, then, owner=b"b") is None
    assert reads.submit(mine(9), then, owner=b"c") is None
    refused = reads.submit(mine(4), then, owner=b"d")  # past the limit: nothing queued
    assert refused is not None and "5 task database reads" in refused
    loop.call_every(0.01, lambda: ticks.append(time.monotonic()))
    loop.call_later(0.3, release.set)  # the loop keeps serving while the read waits
    loop.call_later(10, loop.stop)
    loop.run()
    assert len(ticks) >= 10, "the loop waited for the read"
    # each client in turn: b's and c's jobs do not wait behind all of a's
    assert order == ["slow", "boom", "a9", "a1", "a2"] or order[:3] == ["slow", "boom", "a9"]
    assert ("read", None) in answers
    assert any(isinstance(e, OSError) and str(e) == "disk gone" for _, e in answers)
    assert reads.pending == 0 and reads.submit(lambda: 1, then, owner=b"a") is None
    reads.close()
    # a client that is gone: its jobs not started are forgotten, and its share freed
    reads = FileReads(loop, context, limit=5, per_owner=3)
    hold = threading.Event()
    assert reads.submit(lambda: hold.wait(5), then, owner=b"x") is None
    time.sleep(0.1)  # (the reader took it)
    assert reads.submit(mine(5), then, owner=b"gone") is None
    assert reads.submit(mine(6), then, owner=b"gone") is None
    assert reads.drop(b"gone") == 2 and reads.pending == 1
    assert reads.submit(mine(7), then, owner=b"gone") is None
    hold.set()
    reads.close()
    context.term()


def test_comm_messages_waiting_for_an_engine_are_bounded_until_it_is_idle():
    from kernel_engine import wire
    from kernel_engine.controller.comms import CommPosts, idle_parent

    posts = CommPosts(max_messages=3, max_bytes=1000)
    assert posts.admit(0, "a", 400) is None and posts.admit(0, "b", 400) is None
    refused = posts.admit(0, "c", 400)  # past the bytes
    assert refused is not None and "engine 0" in refused
    assert posts.admit(1, "z", 400) is None  # each engine has its own share
    w = wire.Wire(b"k")

    def iopub(msg_type: str, content: dict, parent: str) -> list:
        frames = w.pack(msg_type, content, {"msg_id": parent}, idents=[b"engine.0"])[1]
        return frames

    assert idle_parent(iopub("status", {"execution_state": "idle"}, "a")) == "a"
    assert idle_parent(iopub("status", {"execution_state": "busy"}, "a")) is None
    assert idle_parent(iopub("stream", {"name": "stdout", "text": "idle"}, "a")) is None
    assert idle_parent([b"garbage"]) is None
    posts.seen(0, iopub("status", {"execution_state": "idle"}, "a"))
    assert posts.admit(0, "c", 400) is None and posts.waiting(0)
    posts.forget(0)
    assert not posts.waiting(0) and posts.waiting(1)


def test_engine_ports_come_from_outside_the_ephemeral_range(tmp_path):
    from kernel_engine import ports

    assert ports.quiet_range((32768, 60999)) == (10_000, 32767)
    assert ports.quiet_range((12000, 60999)) == (61000, 65535)
    assert ports.quiet_range((12000, 65000)) is None
    bad = tmp_path / "range"
    bad.write_text("garbage")
    assert ports.ephemeral_range(str(bad)) == (32768, 60999)
    picker = ports.PortPicker((20000, 20999))
    taken = {picker.take("127.0.0.1") for _ in range(10)}
    assert len(taken) == 10 and taken <= set(range(20000, 21000))
    some = next(iter(taken))
    picker.give_back(some)
    assert some not in picker._taken
    # a span whose only port is in use: the system's choice, never one handed out already
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        full = ports.PortPicker((port, port))
        first = full.take("127.0.0.1")
        assert first != port and full.take("127.0.0.1") not in (port, first)


def _lb_request(w: Any, metadata: bytes) -> Any:
    _, frames = w.pack(protocol.APPLY_REQUEST, {}, None, metadata)
    return w.unpack(frames[1:])


def test_a_maps_flags_are_checked_once_and_a_bad_frame_every_time(monkeypatch):
    """Tasks whose metadata frame is the same (a map's) share one check of their flags;
    a frame that fails the check fails it again, and what is kept stays bounded."""
    w = wire.Wire(b"key")
    balancer = Balancer(w, None, None, None, lambda frames: None)  # type: ignore[arg-type]
    checked = []
    real = protocol.TaskFlags.from_content

    def counting(md: dict[str, Any]) -> protocol.TaskFlags:
        checked.append(md)
        return real(md)

    monkeypatch.setattr(protocol.TaskFlags, "from_content", counting)
    good = wire.dumps_json({"retries": 2, "label": "a map"})
    first, again = (balancer._flags_of(_lb_request(w, good)) for _ in range(2))
    assert first is again and first.retries == 2 and first.label == "a map"
    assert len(checked) == 1
    bad = wire.dumps_json({"retries": -1})
    for _ in range(2):
        with pytest.raises(ValueError, match="retries"):
            balancer._flags_of(_lb_request(w, bad))
    assert len(checked) == 3
    for i in range(FLAGS_KEPT * 3):
        balancer._flags_of(_lb_request(w, wire.dumps_json({"label": f"task {i}"})))
    assert len(balancer._flags) <= FLAGS_KEPT
    long = wire.dumps_json({"label": "x" * 255, "targets": list(range(1000))})
    assert len(long) > FLAGS_KEPT_BYTES
    balancer._flags_of(_lb_request(w, long))
    assert long not in balancer._flags


@pytest.mark.parametrize("kind", [bytes, wire.Part, zmq.Frame, memoryview, bytearray, "mixed"])
def test_the_hub_keeps_a_reply_s_frames_whatever_their_type(kind):
    """Frames the hub keeps as they are joined (bytes, received frames) and those it
    views first (memoryviews...) give the same record: the same bytes, cut alike."""
    raw = [b"sig", b'{"msg_id": "r"}', b"{}", b'{"status": "ok"}', b"{}", b"", b"x" * 5000]
    if kind == "mixed":
        frames: list[Any] = [raw[0], wire.Part(raw[1]), zmq.Frame(raw[2]), *raw[3:5]]
        frames += [memoryview(raw[5]), bytearray(raw[6])]
    else:
        frames = [kind(f) for f in raw]
    hub = Hub()
    hub.submitted("m", protocol.APPLY_REQUEST, b"client", 0)
    hub.completed("m", "ok", "2026-01-02T03:04:05.678901+00:00", "2026-01-02T03:04:06Z", frames)
    record = hub.get("m")
    assert record is not None and record.reply is not None
    assert type(record.reply) is bytes
    assert [bytes(f) for f in record.reply_frames()] == raw
    assert record.started == wire.parse_date("2026-01-02T03:04:05.678901+00:00").timestamp()
    assert record.completed == wire.parse_date("2026-01-02T03:04:06+00:00").timestamp()


@pytest.mark.parametrize(
    "date", ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.5+01:00", "2026-01-02", "", "x", 5, None]
)
def test_the_hub_reads_a_date_as_parse_date_does(date):
    hub = Hub()
    hub.submitted("m", protocol.APPLY_REQUEST, b"client", 0, date=date)
    record = hub.get("m")
    assert record is not None
    parsed = wire.parse_date(date) if isinstance(date, str) else None
    if parsed is not None:
        assert record.submitted == parsed.timestamp()
    else:  # (unreadable: the time it was recorded)
        assert abs(record.submitted - time.time()) < 60
