"""The client's request state machine and its table, without processes or sockets."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_ext._bounded import BoundedDict
from jupyter_ext._metadata import Metadata
from jupyter_ext._order import EngineOrder
from jupyter_ext._request import (
    DONE,
    OUTPUT_GRACE,
    REPLIED,
    SENT,
    WAITING,
    Parts,
    Refused,
    Request,
    Requests,
    settle_all,
    watch,
)
from kernel_engine.errors import EngineError

OK = (True, "result")


class Table:
    """A table whose lanes are usable for the engines in ``direct``; records sends."""

    def __init__(self, direct: set[int] | None = None):
        self.direct = set(direct or ())
        self.sent: list[tuple[str, str]] = []
        self.requests = Requests(self.path_of)
        self.n = 0

    def path_of(self, eid: int, channel: str) -> str:
        if channel == "shell":
            return "shell"
        return "direct" if eid in self.direct else "routed"

    def send(self, req: Request, path: str) -> bool:
        self.sent.append((req.msg_id, path))
        return True

    def new(self, engine: int | None = 0, channel: str = "lane", kind: str = "apply") -> Request:
        self.n += 1
        req = Request(f"m{self.n}", Metadata(engine_id=engine), kind, channel)
        path = self.requests.add(req)
        if path is not None:
            self.sent.append((req.msg_id, path))
        return req

    def reply(self, req: Request, outcome: tuple[bool, Any] = OK, now: float = 0.0) -> list[Any]:
        return self.requests.replied(req.msg_id, outcome, now, self.send)


def settle(done: list[Request]) -> None:
    for req in done:
        req.settle()


def test_a_request_is_sent_replied_and_done():
    t = Table(direct={0})
    req = t.new(0)
    assert req.state == SENT and req.path == "direct" and t.sent == [("m1", "direct")]
    done = t.reply(req)
    assert done == [req] and req.state == DONE and len(t.requests) == 0
    settle(done)
    assert req.result(0) == "result"


def test_load_balanced_and_controller_requests_need_no_order():
    t = Table()
    lb = t.new(engine=None, channel="controller")
    hub = t.new(engine=None, channel="controller", kind="hub")
    assert lb.path == hub.path == "controller"
    t.requests.replied(lb.msg_id, OK, 0.0, t.send, engine_id=3)
    assert lb.engine_id == 3 and lb.state == DONE
    assert t.requests.outstanding() == set()  # the hub request is not a task
    assert len(t.requests) == 1


def test_dropped_controller_requests_are_forgotten_and_tasks_are_not():
    """The copies of a client's first request nobody waits for any more leave the table;
    a late reply to one is a reply to an unknown request; a task cannot be dropped so."""
    t = Table()
    copies = [t.new(engine=None, channel="controller", kind="hub") for _ in range(3)]
    task = t.new(engine=None, channel="controller")
    t.requests.drop([copies[0].msg_id, copies[2].msg_id, task.msg_id, "no such id"])
    assert set(t.requests.live) == {copies[1].msg_id, task.msg_id}
    assert copies[0].state == DONE and not copies[0].done()  # (no outcome: nobody waits)
    assert t.reply(copies[0]) == []
    assert t.reply(copies[1]) == [copies[1]]


def test_a_request_on_another_path_waits_for_those_in_flight():
    """``dview.execute(...)`` then ``dview.apply(...)``: the apply waits, unsent."""
    t = Table(direct={0})
    execute = t.new(0, "shell", "execute")
    apply = t.new(0, "lane")
    behind = t.new(0, "lane")
    assert apply.state == behind.state == WAITING and not apply.unsent.is_set()
    assert t.sent == [("m1", "shell")]
    assert t.requests.order.waiting(0) == 2
    t.reply(execute)
    assert execute.state == REPLIED  # its output (idle status) has not ended yet
    assert t.sent[1:] == [("m2", "direct"), ("m3", "direct")]
    assert apply.state == behind.state == SENT and apply.unsent.is_set()
    assert t.requests.output_done(execute.msg_id) == [execute]


def test_an_execute_ends_with_its_output_whichever_comes_first():
    t = Table()
    first_reply = t.new(0, "shell", "execute")
    first_idle = t.new(1, "shell", "execute")
    assert t.reply(first_reply) == [] and first_reply.state == REPLIED
    assert t.requests.output_done(first_reply.msg_id) == [first_reply]
    assert t.requests.output_done(first_idle.msg_id) == []
    assert t.reply(first_idle) == [first_idle]


def test_an_execute_whose_output_never_ends_is_done_after_a_grace():
    t = Table()
    req = t.new(0, "shell", "execute")
    t.reply(req, now=100.0)
    assert t.requests.tick(100.0 + OUTPUT_GRACE / 2) == []
    assert t.requests.tick(100.0 + OUTPUT_GRACE) == [req]
    assert req.state == DONE


def test_fail_engine_ends_everything_addressed_to_it_and_nothing_else():
    t = Table(direct={0})
    running = t.new(0, "shell", "execute")
    waiting = t.new(0, "lane")
    other = t.new(1, "lane")
    balanced = t.new(engine=None, channel="controller")
    done = t.requests.fail_engine(0, lambda r: EngineError("EngineError", "engine 0 died"))
    settle(done)
    assert set(done) == {running, waiting}
    for req in done:
        assert isinstance(req.exception(0), EngineError)
    assert waiting.unsent.is_set()  # nobody waits for its sending forever
    assert not any(m == waiting.msg_id for m, _ in t.sent)
    assert other.state == balanced.state == SENT  # the controller retries or fails LB tasks
    assert t.requests.order.waiting(0) == 0


def test_an_execute_that_had_its_reply_keeps_it_when_its_engine_dies():
    t = Table()
    execute = t.new(1, "shell", "execute")
    t.reply(execute)  # its output has not ended yet
    done = t.requests.fail_engine(1, lambda r: EngineError("EngineError", "engine 1 died"))
    settle(done)
    assert done == [execute] and execute.result(0) == "result"


def test_fail_all_ends_everything_and_the_books_start_over():
    t = Table(direct={0})
    reqs = [t.new(0, "shell", "execute"), t.new(0, "lane"), t.new(None, "controller", "hub")]
    done = t.requests.fail_all(lambda r: EngineError("EngineError", "the controller is gone"))
    settle(done)
    assert set(done) == set(reqs) and len(t.requests) == 0
    assert all(isinstance(r.exception(0), EngineError) for r in reqs)
    again = t.new(0, "lane")  # nothing is in flight any more: it goes at once
    assert again.state == SENT


def test_replies_to_unknown_or_finished_requests_change_nothing():
    t = Table()
    req = t.new(0)
    t.reply(req)
    assert t.reply(req, (False, "late duplicate")) == []
    assert t.requests.replied("nobody", OK, 0.0, t.send) == []
    settle([req])
    assert req.result(0) == "result"


def test_a_send_that_fails_leaves_the_request_for_fail_engine():
    t = Table(direct={0})
    t.new(0, "shell", "execute")
    waiting = t.new(0, "lane")
    first = t.requests.live["m1"]
    t.requests.replied(first.msg_id, OK, 0.0, lambda req, path: False)
    assert waiting.state == SENT and waiting.unsent.is_set()
    done = t.requests.fail_engine(0, lambda r: EngineError("EngineError", "lane closed"))
    assert waiting in done


def test_after_fail_all_with_refuse_nothing_slips_in_until_accepted():
    t = Table()
    t.new(0)
    t.requests.fail_all(lambda r: EngineError("EngineError", "gone"), refuse="lost contact")
    with pytest.raises(Refused, match="lost contact"):
        t.new(1)
    assert len(t.requests) == 0
    t.requests.accept()
    assert t.new(1).state == SENT


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["lane", "shell", "reply", "idle", "tick", "fail_engine", "lb"]),
        st.integers(0, 2),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.sets(st.integers(0, 2)))
def test_random_histories_keep_the_table_consistent(events, direct):
    """Whatever happens in whatever order: a request is in the table exactly while it is
    not done, is sent at most once, every send to an engine follows the order of
    submission, and after fail_all nothing is left."""
    t = Table(direct=direct)
    submitted: dict[int, list[str]] = {}
    now = 0.0
    for what, k in events:
        now += 0.5
        live = list(t.requests.live.values())
        if what in ("lane", "shell"):
            kind = "execute" if what == "shell" else "apply"
            req = t.new(k, what, kind)
            submitted.setdefault(k, []).append(req.msg_id)
        elif what == "lb":
            t.new(None, "controller")
        elif what == "reply" and live:
            sent = [r for r in live if r.state == SENT]
            if sent:
                t.reply(sent[k % len(sent)], now=now)
        elif what == "idle" and live:
            t.requests.output_done(live[k % len(live)].msg_id)
        elif what == "tick":
            t.requests.tick(now)
        elif what == "fail_engine":
            t.requests.fail_engine(k, lambda r: EngineError("EngineError", "gone"))
        for req in t.requests.live.values():
            assert req.state != DONE
        ids = [m for m, _ in t.sent]
        assert len(ids) == len(set(ids)), "a request was sent twice"
        for eid, order in submitted.items():
            sent_here = [m for m in ids if m in order]
            assert sent_here == sorted(sent_here, key=order.index), f"engine {eid} out of order"
    t.requests.fail_all(lambda r: EngineError("EngineError", "gone"))
    assert len(t.requests) == 0


def test_future_keeps_the_attributes_a_request_makes_lazily():
    """A request makes ``concurrent.futures.Future``'s condition and lists itself, when
    first used: should a Python release rename them, this fails (not a hang)."""
    assert set(vars(concurrent.futures.Future())) == {
        "_condition",
        "_state",
        "_result",
        "_exception",
        "_waiters",
        "_done_callbacks",
    }


def test_a_request_nobody_waits_on_settles_without_a_condition():
    t = Table()
    req = t.new(0)
    settle(t.reply(req))
    assert req._cond is None  # nothing made: no lock, no lists
    assert req.done() and not req.cancelled() and req.result(0) == "result"
    assert req.exception(0) is None
    called = []
    req.add_done_callback(called.append)  # (after the end: called at once)
    assert called == [req]


def test_a_request_settles_its_waiters_and_callbacks():
    t = Table()
    req, failing = t.new(0), t.new(1)
    called = []
    req.add_done_callback(called.append)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(failing.exception(10)))
    waiter.start()
    while failing._cond is None:  # (the waiter made it: it waits on it now, or will)
        time.sleep(0.001)
    settle(t.reply(req))
    settle(t.reply(failing, (False, ValueError("no"))))
    waiter.join(10)
    assert called == [req] and isinstance(got[0], ValueError)
    done, _ = concurrent.futures.wait([req, failing], 0)
    assert done == {req, failing}
    with pytest.raises(ValueError, match="no"):
        failing.result(0)


def test_a_request_waited_on_by_many_threads_while_settled():
    """Threads that make the condition while the IO thread settles: each sees the end."""
    for _ in range(50):
        t = Table()
        req = t.new(0)
        got: list[Any] = []

        def wait(req: Request = req, got: list[Any] = got) -> None:
            got.append(req.result(10))

        waiters = [threading.Thread(target=wait) for _ in range(4)]
        for w in waiters:
            w.start()
        settle(t.reply(req))
        for w in waiters:
            w.join(10)
        assert got == ["result"] * 4


def new_parts(t: Table, engines: list[int], path: str = "routed") -> list[Request]:
    parts = Parts(len(engines))
    reqs = [
        Request(f"b{t.n}.{i}", Metadata(engine_id=e), "apply", "lane", parts=parts)
        for i, e in enumerate(engines)
    ]
    t.n += 1
    assert t.requests.add_all(reqs, path)
    return reqs


def test_the_parts_of_a_broadcast_call_back_once_when_the_last_settles():
    t = Table()
    reqs = new_parts(t, [0, 1, 2])
    parts = Parts.of(reqs)
    assert parts is not None and parts is reqs[0].parts
    assert Parts.of(reqs[:2]) is None and Parts.of([*reqs[:2], reqs[0]]) is None
    assert Parts.of([t.new(0)]) is None and Parts.of([]) is None
    called = []
    parts.add_done_callback(lambda: called.append(1))
    whole = parts.future()
    settle(t.requests.replied_all([(reqs[0].msg_id, OK, None)], 0.0, t.send))
    assert called == [] and not whole.done()
    assert not reqs[1].cancel() and not reqs[1].done()  # (only the table ends a request)
    settle(t.requests.fail_engine(1, lambda r: EngineError("EngineError", "engine 1 died")))
    error = EngineError("EngineError", "engine 2 died")
    settle(t.requests.fail_engine(2, lambda r: error))
    assert called == [1] and whole.done()
    assert [r.done() for r in reqs] == [True, True, True]
    assert reqs[2].exception(0) is error and all(r._cond is None for r in (reqs[0], reqs[2]))
    parts.add_done_callback(lambda: called.append(2))  # (after the end: at once)
    assert called == [1, 2]


class Watcher:
    """Records what :func:`settle_all` tells it, one list per call."""

    def __init__(self, fail: bool = False):
        self.told: list[list[str]] = []
        self.fail = fail

    def _children_done(self, reqs: list[Request]) -> None:
        assert all(r.done() for r in reqs)  # (told once they are finished)
        self.told.append([r.msg_id for r in reqs])
        if self.fail:
            raise RuntimeError("a watcher that fails")


def test_a_watcher_is_told_in_bulk_and_nobody_makes_a_condition():
    t = Table()
    reqs = [t.new(None, "controller") for _ in range(5)]
    w = Watcher()
    assert watch(reqs, w) == []
    settle_all([r for req in reqs[:3] for r in t.reply(req)])
    settle_all([r for req in reqs[3:] for r in t.reply(req)])
    assert w.told == [["m1", "m2", "m3"], ["m4", "m5"]]
    assert all(r._cond is None and r.watcher is None for r in reqs)  # (no cycle left)
    assert [r.result(0) for r in reqs] == ["result"] * 5


def test_watch_gives_back_what_it_cannot_watch():
    t = Table()
    done, pending, other = t.new(None, "controller"), t.new(None, "controller"), t.new(0)
    settle(t.reply(done))
    plain: concurrent.futures.Future[Any] = concurrent.futures.Future()
    w, w2 = Watcher(), Watcher()
    assert watch([other], w2) == []
    # finished already, not a Request, given twice, watched by another: the caller's
    assert watch([done, plain, pending, pending, other], w) == [done, plain, pending, other]
    settle(t.reply(pending))
    settle(t.reply(other))
    assert w.told == [["m2"]] and w2.told == [["m3"]]


def test_a_watched_request_someone_waits_on_still_tells_its_watcher():
    t = Table()
    req, quiet = t.new(None, "controller"), t.new(None, "controller")
    w = Watcher()
    watch([req, quiet], w)
    called = []
    req.add_done_callback(called.append)  # (makes its condition: settled the loud way)
    settle_all([*t.reply(req), *t.reply(quiet, (False, ValueError("no")))])
    assert called == [req] and sorted(w.told[0]) == ["m1", "m2"] and len(w.told) == 1
    assert isinstance(quiet.exception(0), ValueError)


def test_a_failing_watcher_does_not_stop_the_others(caplog):
    t = Table()
    a, b = t.new(None, "controller"), t.new(None, "controller")
    bad, good = Watcher(fail=True), Watcher()
    watch([a], bad)
    watch([b], good)
    settle_all([*t.reply(a), *t.reply(b)])
    assert bad.told == [["m1"]] and good.told == [["m2"]]
    assert "error in a watcher" in caplog.text


def test_watching_while_the_io_thread_settles_loses_no_request():
    """``watch`` on a user thread races ``settle_all`` on the IO thread: every request is
    either watched and told, or given back to the caller, never neither."""
    for _ in range(200):
        t = Table()
        reqs = [t.new(None, "controller") for _ in range(20)]
        for req in reqs[::3]:
            req.add_done_callback(lambda f: None)  # (some settle the loud way)
        done = [r for req in reqs for r in t.reply(req)]
        w = Watcher()
        settler = threading.Thread(target=settle_all, args=(done,))
        settler.start()
        rest = watch(reqs, w)
        settler.join(10)
        told = [m for batch in w.told for m in batch]
        assert sorted(told + [r.msg_id for r in rest]) == sorted(r.msg_id for r in reqs)
        assert all(r.done() for r in rest)


def test_a_failing_callback_of_parts_does_not_stop_the_others(caplog):
    t = Table()
    reqs = new_parts(t, [0, 1])
    parts = reqs[0].parts
    assert parts is not None
    called = []
    parts.add_done_callback(lambda: 1 / 0)
    parts.add_done_callback(lambda: called.append(1))
    settle(t.requests.replied_all([(r.msg_id, OK, None) for r in reqs], 0.0, t.send))
    assert called == [1] and "error in a callback" in caplog.text


def test_replied_all_is_replied_for_each_and_releases_those_waiting():
    """A broadcast's replies taken together free the engines' books as one by one would:
    a direct apply that waited behind a broadcast part goes once that part is answered."""
    t = Table(direct={0, 1})
    reqs = new_parts(t, [0, 1])
    behind = t.new(0, "lane")
    assert behind.state == WAITING
    done = t.requests.replied_all(
        [(reqs[0].msg_id, OK, None), ("nobody", OK, None), (reqs[1].msg_id, (False, "x"), 1)],
        0.0,
        t.send,
    )
    assert done == reqs and behind.state == SENT and t.sent == [(behind.msg_id, "direct")]
    assert len(t.requests) == 1


def test_bounded_dict_put_all_is_setitem_for_each_pair():
    one, many = BoundedDict[str, int](4), BoundedDict[str, int](4)
    for d in (one, many):
        d["a"] = 0
        d["b"] = 1
    for key, value in [("c", 2), ("a", 3), ("d", 4), ("e", 5)]:
        one[key] = value
    many.put_all(["c", "a", "d", "e"], [2, 3, 4, 5])
    # (the oldest key goes, even when set again since)
    assert list(one.items()) == list(many.items()) == [("b", 1), ("c", 2), ("d", 4), ("e", 5)]
    del many["c"]
    many.put_all(["f"], [6])
    assert list(many) == ["b", "d", "e", "f"]


def test_bounded_dict_forgets_the_oldest_weighed_beyond_its_byte_budget_never_the_newest():
    d = BoundedDict[str, int](100, max_bytes=10)
    d.put_all(["a", "b", "c"], [1, 2, 3], [4, 0, 4])  # (b has no size: it weighs nothing)
    assert list(d) == ["a", "b", "c"] and d.nbytes == 8
    d.put_all(["e"], [5], [4])  # 12 > 10: the oldest weighed go until it fits
    assert list(d) == ["b", "c", "e"] and d.nbytes == 8
    d.put_all(["big"], [6], [50])  # bigger than the budget alone: kept, the only weighed
    assert list(d) == ["b", "big"] and d.nbytes == 50
    d.put_all(["f", "g"], [7, 8], [3, 3])
    assert list(d) == ["b", "f", "g"] and d.nbytes == 6
    d["f"] = 9  # (set again without a size: weighs nothing now)
    assert d.nbytes == 3
    assert d.pop("g") == 8 and d.nbytes == 0
    d.put_all(["h", "h"], [1, 2], [4, 4])  # (a key given twice weighs once)
    assert d.nbytes == 4 and d["h"] == 2
    del d["h"]
    assert d.nbytes == 0 and list(d) == ["b", "f"]
    d.put_all(["i"], [1], [9])
    assert d.popitem() == ("i", 1) and d.nbytes == 0
    d.put_all(["j"], [1], [9])
    d.clear()
    assert d.nbytes == 0 and not d
    unbounded = BoundedDict[str, int](2)  # (no budget: sizes are not even kept)
    unbounded.put_all(["a", "b"], [1, 2], [10**12, 10**12])
    assert unbounded.nbytes == 0 and len(unbounded) == 2


def test_metadata_many_is_metadata_for_each_part():
    now = datetime.now(timezone.utc)
    mds = Metadata.many(["m1", "m2"], [3, 5], submitted=now, label="x")
    assert mds == [
        Metadata(msg_id=m, engine_id=e, submitted=now, label="x") for m, e in [("m1", 3), ("m2", 5)]
    ]
    assert all(type(md) is Metadata for md in mds) and mds[0].label == "x"
    assert mds[0]["outputs"] is not mds[1]["outputs"]  # (containers of its own)
    mds[0].update_from_reply({"started": "2026-01-02T03:04:05.000006Z", "engine_uuid": "u"})
    assert mds[0].started == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    mds[0].update_from_reply({"completed": "not a date", "stdout": "hi"})
    assert mds[0].completed is None and mds[0].stdout == "hi" and mds[0].engine_uuid == "u"


def test_metadata_takes_of_an_engines_reply_only_what_is_of_its_type():
    md = Metadata(msg_id="m", engine_id=3, stdout="", stderr="")
    md.update_from_reply(
        {"engine_id": 4, "engine_uuid": [1], "stdout": 5, "stderr": None, "status": {}}
    )
    assert md.engine_id == 3 and md.engine_uuid is None and md.stdout == "" and md.stderr == ""
    assert md.status is None
    md.update_from_reply({"started": "2026-01-02T03:04:05", "completed": 17})  # (naive, int)
    assert md.started is None and md.completed is None
    balanced = Metadata(msg_id="b")  # (its engine unknown until the reply names it)
    balanced.update_from_reply({"engine_id": [1]})
    assert balanced.engine_id is None
    balanced.update_from_reply({"engine_id": 2, "completed": "2026-01-02T03:04:05Z"})
    assert balanced.engine_id == 2 and balanced.completed.tzinfo is not None


def test_a_release_that_fails_loses_no_reply_of_the_batch(caplog):
    t = Table(direct={0, 1})
    reqs = new_parts(t, [0, 1])
    behind = t.new(0, "lane")

    def failing_send(req: Request, path: str) -> bool:
        raise RuntimeError("the socket is gone")

    done = t.requests.replied_all([(r.msg_id, OK, None) for r in reqs], 0.0, failing_send)
    assert done == reqs and "held behind" in caplog.text
    settle(done)
    assert all(r.done() for r in reqs) and behind.unsent is not None and behind.unsent.is_set()


def test_a_request_is_not_cancelled_but_ended_by_the_table():
    t = Table()
    req = t.new(0)
    assert not req.cancel() and not req.cancelled() and not req.done()
    settle(t.reply(req))
    assert req.result(0) == OK[1] and not req.cancel()


def test_metadata_many_refuses_what_each_part_has_of_its_own():
    with pytest.raises(TypeError, match="outputs"):
        Metadata.many(["m1"], [0], outputs=["shared"])


def _books(t: Table) -> Any:
    """What a table's books hold: each request's state, the engines busy, who waits."""
    order = t.requests.order
    return (
        {m: r.state for m, r in t.requests.live.items()},
        sorted(e for e in range(4) if t.requests.busy(e)),
        [order.waiting(e) for e in range(4)],
        dict(order._engine_of),
    )


def _replies_and_waiters(t: Table) -> tuple[list[Request], list[tuple[str, Any, int | None]]]:
    """Parts on engines 0, 1, 2, a direct apply behind the part of 0, an execute behind
    the part of 1, a load-balanced task; and replies to them all (with one to nobody, a
    second one to a part, and the engine that ran the load-balanced task)."""
    reqs = new_parts(t, [0, 1, 2])
    t.new(0, "lane")
    t.new(1, "shell", kind="execute")
    lb = t.new(None, "controller")
    got = [(r.msg_id, OK, None) for r in reqs]
    got[1:1] = [("nobody", OK, None), (lb.msg_id, OK, 3), (reqs[0].msg_id, (False, "x"), None)]
    return reqs, got


def test_replied_all_keeps_the_books_as_replies_one_by_one_do():
    one, together = Table(direct={0}), Table(direct={0})
    reqs_one, got_one = _replies_and_waiters(one)
    reqs_together, got_together = _replies_and_waiters(together)
    done_one: list[Request] = []
    for msg_id, outcome, eid in got_one:
        done_one += one.requests.replied(msg_id, outcome, 0.0, one.send, eid)
    done_together = together.requests.replied_all(got_together, 0.0, together.send)
    assert sorted(r.msg_id for r in done_one) == sorted(r.msg_id for r in done_together)
    assert one.sent == together.sent and _books(one) == _books(together)
    assert [r.outcome for r in reqs_one] == [r.outcome for r in reqs_together]
    assert all(r.state == DONE for r in done_together) and len(done_together) == 4
    (lb,) = [r for r in done_together if r.channel == "controller"]
    assert lb.metadata["engine_id"] == 3 and together.requests.get(lb.msg_id) is None


def test_a_release_that_fails_in_replied_all_still_releases_the_other_engines(caplog):
    t = Table(direct={0, 1})
    reqs = new_parts(t, [0, 1])
    behind = [t.new(0, "lane"), t.new(1, "lane")]
    sent: list[str] = []

    def send(req: Request, path: str) -> bool:
        if req is behind[0]:
            raise RuntimeError("the socket is gone")
        sent.append(req.msg_id)
        return True

    done = t.requests.replied_all([(r.msg_id, OK, None) for r in reqs], 0.0, send)
    assert done == reqs and sent == [behind[1].msg_id] and "held behind" in caplog.text
    assert behind[1].state == SENT and not t.requests.busy(2)


def test_order_done_all_is_done_for_each():
    sent: dict[str, list[tuple[str, str]]] = {"one": [], "all": []}
    books = {}
    for way in sent:
        order = EngineOrder(lambda eid, channel: "direct" if channel == "lane" else "shell")
        assert order.admit_all([(0, "a"), (1, "b"), (0, "c")], "routed")
        assert order.admit(0, "w1", "lane") is None and order.admit(1, "w2", "shell") is None
        assert order.admit(0, "w3", "lane") is None

        def send(msg_id: str, path: str, way: str = way) -> bool:
            sent[way].append((msg_id, path))
            return True

        if way == "one":
            for msg_id in ["a", "b", "nobody", "c", "a"]:
                order.done(msg_id, send)
        else:
            order.done_all(["a", "b", "nobody", "c", "a"], send)
        books[way] = (dict(order._engine_of), [order.waiting(e) for e in (0, 1)])
    assert sent["one"] == sent["all"] == [("w2", "shell"), ("w1", "direct"), ("w3", "direct")]
    assert books["one"] == books["all"]
