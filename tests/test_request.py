"""The client's request state machine and its table, without processes or sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_ext._metadata import Metadata
from jupyter_ext._request import (
    DONE,
    OUTPUT_GRACE,
    REPLIED,
    SENT,
    WAITING,
    Refused,
    Request,
    Requests,
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
