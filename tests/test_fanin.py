"""Fan-in without processes: when the replies to a broadcast's parts are held and when
they go (:mod:`kernel_engine.controller.fanin`), on a simulated clock and timers. The real
path (a client's receiving socket getting one batch) is in ``test_broadcast.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kernel_engine import wire
from kernel_engine.controller.fanin import FanIn

CLIENT = b"0123456789abcdef:r"


class Sim:
    """A :class:`FanIn` with a clock and timers of its own; what it sends, recorded."""

    def __init__(self, **limits: Any) -> None:
        self.now = 0.0
        self.sent: list[list[Any]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.fanin = FanIn(self.sent.append, self._later, lambda: self.now, **limits)

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t[0] <= self.now), key=lambda t: t[0])
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, callback in due:
            callback()

    def reply(self, msg_id: str, size: int = 10, client: bytes = CLIENT) -> None:
        self.fanin.reply(msg_id, [client, b"engine.0", wire.DELIM, msg_id.encode(), b"x" * size])

    def taken(self) -> list[str]:
        """The msg_ids of what was sent since last asked, in order."""
        got = [bytes(frames[3]).decode() for frames in self.sent]
        self.sent.clear()
        return got


def test_replies_go_together_once_every_part_is_answered() -> None:
    sim = Sim(hold=0.05)
    sim.fanin.expect(CLIENT, ["a", "b", "c"])
    assert sim.fanin.expected == 3
    sim.reply("b")
    sim.advance(0.01)
    sim.reply("a")
    assert sim.taken() == [] and len(sim.fanin) == 2
    sim.reply("c")
    assert sim.taken() == ["b", "a", "c"]  # (in the order they came)
    assert len(sim.fanin) == 0 and sim.fanin.expected == 0
    sim.advance(1.0)  # (the deadline's timer finds nothing left to send)
    assert sim.taken() == []


def test_other_replies_and_other_peers_go_at_once() -> None:
    sim = Sim()
    sim.reply("not-a-part")  # (a load-balanced task's reply, a lone request's)
    assert sim.taken() == ["not-a-part"]
    other = b"some-tool-of-its-own"  # (takes no batches)
    sim.fanin.expect(other, ["a", "b"])
    sim.reply("a", client=other)
    assert sim.taken() == ["a"]
    sim.fanin.expect(CLIENT, ["lone"])  # (one target: nothing to gather)
    sim.reply("lone")
    assert sim.taken() == ["lone"] and sim.fanin.expected == 0


def test_a_reply_waits_at_most_the_hold() -> None:
    sim = Sim(hold=0.05)
    sim.fanin.expect(CLIENT, ["a", "b", "c", "d"])
    sim.reply("a")
    sim.advance(0.03)
    sim.reply("b")
    sim.advance(0.019)
    assert sim.taken() == []
    sim.advance(0.001)  # (0.05 s after the first reply held)
    assert sim.taken() == ["a", "b"]
    sim.advance(1.0)
    sim.reply("c")  # (a new wait starts with the next reply)
    sim.advance(0.049)
    assert sim.taken() == []
    sim.reply("d")
    assert sim.taken() == ["c", "d"]
    assert not sim.fanin.expected and not len(sim.fanin)


def test_a_failed_part_counts_as_answered() -> None:
    # (the controller's error reply for a part whose engine is unknown or dead comes
    # the same way, possibly before the other parts were even sent)
    sim = Sim()
    sim.fanin.expect(CLIENT, ["a", "b"])
    sim.reply("b")  # (engine 99: no such engine)
    sim.reply("a")
    assert sim.taken() == ["b", "a"]


def test_large_replies_are_not_kept() -> None:
    sim = Sim(hold=0.05, hold_bytes=1000, held_bytes=10_000)
    sim.fanin.expect(CLIENT, ["a", "b", "c"])
    sim.reply("a", size=10)
    sim.reply("b", size=2000)  # (past the budget of one broadcast: both go now)
    assert sim.taken() == ["a", "b"]
    sim.reply("c")
    assert sim.taken() == ["c"]
    # every broadcast's replies together past their budget: all go
    for n in range(11):
        sim.fanin.expect(CLIENT, [f"{n}.0", f"{n}.1"])
        sim.reply(f"{n}.0", size=950)  # (and about 40 bytes of route, ids, delimiter)
        assert len(sim.fanin) == n + 1 or n == 10
    assert sim.taken() == [f"{n}.0" for n in range(11)]  # (the 11th passed it)
    assert not len(sim.fanin) and sim.fanin.expected == 11


def test_broadcasts_interleave_and_release_all_sends_what_is_held() -> None:
    sim = Sim(hold=0.05)
    sim.fanin.expect(CLIENT, ["a1", "a2"])
    sim.fanin.expect(CLIENT, ["b1", "b2", "b3"])
    sim.reply("b1")
    sim.reply("a1")
    sim.reply("a2")
    assert sim.taken() == ["a1", "a2"]
    sim.reply("b2")
    sim.fanin.release_all()  # (the controller stops)
    assert sim.taken() == ["b1", "b2"]
    sim.advance(1.0)
    assert sim.taken() == [] and sim.fanin.expected == 1  # (b3, still to come)
    sim.reply("b3")
    assert sim.taken() == ["b3"]


def test_parts_never_answered_cannot_grow_it(monkeypatch) -> None:
    from kernel_engine.controller import fanin

    monkeypatch.setattr(fanin, "MAX_EXPECTED", 10)
    sim = Sim()
    sim.fanin.expect(CLIENT, ["a1", "a2", "a3", "a4"])  # (its client was lost: no reply)
    sim.reply("a1")  # (held)
    for n in range(20):
        sim.fanin.expect(CLIENT, [f"b{n}-1", f"b{n}-2"])
        assert sim.fanin.expected <= 10
    assert "a1" in sim.taken()  # (what was held went when the awaited were forgotten)
    sim.reply("b19-1")
    sim.reply("b19-2")
    assert sim.taken()[-2:] == ["b19-1", "b19-2"]
