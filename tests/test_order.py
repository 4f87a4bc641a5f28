"""The per-engine order books of a client (pure logic; the end-to-end checks are in
test_lanes.py)."""

from __future__ import annotations

from jupyter_ext._order import EngineOrder


def _order(direct: set[int]) -> EngineOrder:
    return EngineOrder(
        lambda eid, ch: "shell" if ch == "shell" else ("direct" if eid in direct else "routed")
    )


def _done(order: EngineOrder, msg_id: str, fail: frozenset[str] = frozenset()) -> list:
    """What answering ``msg_id`` sends, as (msg_id, path); those in ``fail`` fail to go."""
    sent: list = []

    def send(waiting_id: str, path: str) -> bool:
        sent.append((waiting_id, path))
        return waiting_id not in fail

    order.done(msg_id, send)
    return sent


def test_same_path_goes_at_once():
    order = _order({0})
    assert [order.admit(0, f"m{i}", "lane") for i in range(3)] == ["direct"] * 3
    assert _done(order, "m0") == [] and _done(order, "m1") == [] and _done(order, "m2") == []


def test_another_path_waits_and_keeps_its_place():
    order = _order({0})
    assert order.admit(0, "exec", "shell") == "shell"
    assert order.admit(0, "a1", "lane") is None
    assert order.admit(0, "a2", "lane") is None
    assert order.admit(0, "e2", "shell") is None  # behind waiting ones, even on its path
    assert order.admit(1, "other", "lane") == "routed"  # other engines are independent
    assert order.waiting(0) == 3
    assert _done(order, "exec") == [("a1", "direct"), ("a2", "direct")]
    assert _done(order, "a1") == []
    assert _done(order, "a2") == [("e2", "shell")]
    assert _done(order, "e2") == [] and order.waiting(0) == 0


def test_path_is_decided_again_at_release():
    direct: set[int] = set()
    order = _order(direct)
    assert order.admit(0, "r1", "lane") == "routed"
    direct.add(0)  # the lane answered its ping meanwhile
    assert order.admit(0, "d1", "lane") is None
    assert _done(order, "r1") == [("d1", "direct")]


def test_a_gone_engine_returns_its_waiting_requests():
    order = _order(set())
    order.admit(0, "x", "shell")
    order.admit(0, "y", "lane")
    assert order.forget_engine(0) == ["y"]
    assert _done(order, "x") == []
    assert order.admit(0, "z", "lane") == "routed"


def test_a_request_that_fails_to_go_lets_the_next_group_go():
    order = _order({0})
    order.admit(0, "e1", "shell")
    order.admit(0, "a1", "lane")
    order.admit(0, "e2", "shell")
    assert _done(order, "e1", fail=frozenset({"a1"})) == [("a1", "direct"), ("e2", "shell")]
    assert order.waiting(0) == 0
    assert _done(order, "e2") == []
    assert order.admit(0, "a2", "lane") == "direct"


def test_a_request_alone_goes_only_to_an_engine_with_nothing_in_flight_or_waiting():
    """``admit_alone``: a blocking call's own path, taken only when nothing of this
    client's is in flight to the engine or waits for it; requests after it wait for it
    and are released on a path of their own, never on that one."""
    order = _order({0})
    assert order.admit_alone(0, "h1", "here")
    assert order.admit(0, "a1", "lane") is None  # behind it: waits
    assert not order.admit_alone(0, "h2", "here")  # not alone: nothing admitted
    assert order.waiting(0) == 1
    assert _done(order, "h1") == [("a1", "direct")]
    assert not order.admit_alone(0, "h3", "here")  # a1 in flight
    assert _done(order, "a1") == []
    assert order.admit(0, "e1", "shell") == "shell"
    assert not order.admit_alone(0, "h4", "here")
    assert _done(order, "e1") == []
    assert order.admit_alone(0, "h5", "here") and order.admit_alone(1, "h6", "here")
    assert _done(order, "h5") == [] and _done(order, "h6") == []
    assert order.forget_engine(0) == []
