"""Batches of load-balanced tasks without processes: the controller's intake of a client's
batch message, and the outbox that gathers the replies to a client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kernel_engine import protocol, wire
from kernel_engine.controller.intake import BatchIntake
from kernel_engine.controller.outbox import MAX_MESSAGES, Outbox

KEY = b"k" * 32
SENDER = b"0123456789abcdef:s"


def task(w: wire.Wire, msg_type: str = protocol.APPLY_REQUEST) -> tuple[str, list[Any]]:
    """A signed task: its msg_id and its frames from the signature on."""
    header, frames = w.pack(msg_type, {}, None, {"retries": 0}, [b"args"])
    return header["msg_id"], frames[1:]


class Edge:
    """A BatchIntake with what it talks to."""

    def __init__(self) -> None:
        self.wire = wire.Wire(KEY)
        self.sent: list[list[Any]] = []
        self.known: set[str] = set()
        self.drops = wire.DropLog(logging.getLogger("test"), "test")
        self.intake = BatchIntake(
            self.wire, wire.SeenWindow(), self.known.__contains__, self.sent.append, self.drops
        )

    def take(self, frames: list[Any]) -> list[str]:
        client, taken = self.intake.take(frames)
        assert client == b"0123456789abcdef:r"
        return [msg.msg_id for msg, _ in taken]

    def refusals(self) -> dict[str, str]:
        """msg_id -> ename of the error replies sent."""
        out = {}
        for frames in self.sent:
            msg = self.wire.unpack(frames[3:])
            out[msg.parent_id] = msg.content["ename"]
        return out


def batch(parts: list[list[Any]], route: bytes = protocol.LB_ROUTE) -> list[Any]:
    return [SENDER, route, *wire.pack_batch(parts)]


def test_a_batch_gives_its_tasks_in_order_each_as_sent() -> None:
    edge = Edge()
    tasks = [task(edge.wire) for _ in range(5)]
    assert edge.take(batch([p for _, p in tasks])) == [m for m, _ in tasks]
    _, taken = edge.intake.take(batch([task(edge.wire)[1]]))
    msg, frames = taken[0]
    assert msg.metadata == {"retries": 0} and msg.buffers == [b"args"] and len(frames) == 6
    assert edge.sent == [] and edge.drops.total == 0


def test_a_bad_task_is_refused_alone(caplog: pytest.LogCaptureFixture) -> None:
    edge = Edge()
    forger = wire.Wire(b"not the key")
    good = [task(edge.wire) for _ in range(3)]
    seen_before, known, execute = (
        task(edge.wire),
        task(edge.wire),
        task(edge.wire, "execute_request"),
    )
    edge.take(batch([seen_before[1]]))
    edge.known.add(known[0])
    parts = [
        good[0][1],
        task(forger)[1],  # bad signature: dropped, not answered
        seen_before[1],  # a replay
        good[1][1],
        good[1][1],  # twice in the batch
        known[1],  # a msg_id the records hold
        execute[1],  # not what the lb route serves
        good[2][1],
    ]
    assert edge.take(batch(parts)) == [m for m, _ in good]
    assert edge.refusals() == {
        seen_before[0]: protocol.DUPLICATE,
        good[1][0]: protocol.DUPLICATE,
        known[0]: protocol.DUPLICATE,
        execute[0]: "ValueError",
    }
    edge.drops.flush()
    assert "a task in a batch: invalid HMAC signature" in caplog.text


def _counts(frames: list[Any], counts: bytes) -> list[Any]:
    return [*frames[:3], counts, *frames[4:]]


@pytest.mark.parametrize(
    "case",
    ["route", "counts", "types", "strings", "short", "too many", "not json", "huge header"],
)
def test_a_malformed_batch_is_dropped_whole(case: str) -> None:
    edge = Edge()
    parts = [task(edge.wire)[1] for _ in range(3)]
    frames = batch(parts)
    if case == "route":
        frames = batch(parts, route=b"lane:0")
    elif case == "counts":
        frames = _counts(frames, b"[6,6,5]")
    elif case == "types":
        frames = _counts(frames, b"[6,6,6.0]")
    elif case == "strings":
        frames = _counts(frames, b'[6,6,"6"]')
    elif case == "short":  # counts that add up but cut tasks below a whole message
        frames = _counts(frames, b"[3,3,6,6]")
    elif case == "too many":
        one = task(edge.wire)[1]
        frames = batch([one] * (protocol.MAX_SUBMIT_BATCH + 1))
    elif case == "not json":
        frames = _counts(frames, b"[6,6,")
    elif case == "huge header":
        frames = _counts(frames, b"[" + b"6," * 20_000 + b"6]")
    assert edge.take(frames) == []
    assert edge.sent == [] and edge.drops.total == 1


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx: zmq.Context[Any] = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    dealer.identity = b"0123456789abcdef:r"  # (a jupyter-px client's receiving socket)
    router.bind("inproc://outbox")
    dealer.connect("inproc://outbox")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


def _reply(n: int, client: bytes = b"0123456789abcdef:r") -> list[Any]:
    return [client, b"3", wire.DELIM, b"sig", b'{"n":%d}' % n, b"{}", b"{}", b"{}"]


def _received(dealer: zmq.Socket[Any]) -> list[list[bytes]]:
    out = []
    while dealer.poll(0):
        out.append(dealer.recv_multipart())
    return out


def test_the_outbox_sends_a_clients_replies_once_per_turn(pair: Any) -> None:
    router, dealer = pair
    box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"))
    box.send(_reply(0))
    box.flush()
    assert dealer.poll(1000)
    assert _received(dealer) == [_reply(0)[1:]]  # one reply goes as it is
    for n in range(3):
        box.send(_reply(n))
    assert not dealer.poll(50) and len(box) == 3
    box.flush()
    assert dealer.poll(1000)
    (got,) = _received(dealer)
    assert wire.is_batch(got)
    assert wire.unpack_batch(got) == [_reply(n)[1:] for n in range(3)]
    for n in range(MAX_MESSAGES + 1):  # a client's full share goes at once
        box.send(_reply(n))
    assert dealer.poll(1000) and len(box) == 1
    (got,) = _received(dealer)
    assert len(wire.unpack_batch(got)) == MAX_MESSAGES


def test_the_outbox_sends_a_message_of_many_frames_alone_and_the_client_reads_all(
    pair: Any,
) -> None:
    """A message of more frames than a batch may hold (a reply with the records of
    thousands of tasks) leaves alone, in its place: in a batch it took the replies beside it
    down with it, whose requests then waited for ever (found by review)."""
    router, dealer = pair
    box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"))
    records = [*_reply(1)[:-1], *[b"x"] * (wire.MAX_MESSAGE_FRAMES + 100)]
    sent = [_reply(0), records, _reply(2), _reply(3)]
    for frames in sent:
        box.send(frames)
    box.flush()
    got: list[list[Any]] = []
    while len(got) < 3 and dealer.poll(1000):
        frames = dealer.recv_multipart()
        got += wire.unpack_batch(frames) if wire.is_batch(frames) else [frames]
    assert got == [m[1:] for m in sent]


def test_the_outbox_sends_other_peers_their_messages_one_by_one(pair: Any) -> None:
    router, _ = pair
    peer = router.context.socket(zmq.DEALER)
    peer.identity = b"a tool of its own"
    peer.connect("inproc://outbox")
    try:
        box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"))
        for n in range(3):
            box.send(_reply(n, b"a tool of its own"))
        box.flush()
        got = []
        while len(got) < 3 and peer.poll(1000):
            got.append(peer.recv_multipart())
        assert got == [_reply(n)[1:] for n in range(3)]
    finally:
        peer.close(0)
