"""Broadcasts: one client message, fanned out to N engines by the controller.

First without processes: the request's checks (:class:`protocol.BroadcastRequest`), the
controller's fan-out and refusals (:mod:`kernel_engine.controller.broadcast`) and the
client's books (admitting a broadcast's parts all at once, or none). Then on one real
4-engine cluster: results in target order, per-engine msg_ids and metadata, errors per
engine, a client that sends one message for four engines, unknown and killed engines
that fail only their part, forged broadcasts refused while the controller serves on, and
the replies coming back together in one batch message (but not waiting for a slow part
past the hold, :mod:`kernel_engine.controller.fanin`). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import jupyter_ext as jx
from jupyter_ext._order import EngineOrder
from kernel_engine import protocol, replies, serialize, wire
from kernel_engine.controller.broadcast import Broadcasts, fan_out
from kernel_engine.engine import ops
from kernel_engine.serialize import pack_apply

KEY = b"k" * 32


def _content(**changes: Any) -> dict[str, Any]:
    content = {
        "msg_type": "apply_request",
        "targets": [0, 1, 2],
        "msg_ids": ["a", "b", "c"],
        "content": {},
    }
    content.update(changes)
    return content


# ----- without processes


def test_request_round_trip_and_channels() -> None:
    request = protocol.BroadcastRequest.from_content(_content())
    assert request.targets == (0, 1, 2) and request.msg_ids == ("a", "b", "c")
    assert request.channel == "lane"
    assert protocol.BroadcastRequest.from_content(request.to_content()) == request
    execute = protocol.BroadcastRequest.from_content(_content(msg_type="execute_request"))
    assert execute.channel == "shell"
    # a target may come twice (its msg_ids differ)
    assert protocol.BroadcastRequest.from_content(_content(targets=[0, 0, 1])).targets[1] == 0


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"msg_type": 3}, TypeError, "msg_type must be a string"),
        ({"msg_type": "shutdown_request"}, ValueError, "is not one of"),
        ({"targets": "0,1,2"}, TypeError, "targets must be a list"),
        ({"targets": [0, "1", 2]}, TypeError, "targets must be an int"),
        ({"targets": [0, True, 2]}, TypeError, "targets must be an int"),
        ({"targets": [0, -1, 2]}, ValueError, "targets must be between"),
        ({"msg_ids": ["a", 2, "c"]}, TypeError, "msg_ids must be a string"),
        ({"msg_ids": ["a", "b", "a"]}, ValueError, "msg_ids must differ"),
        ({"msg_ids": ["a", "b"]}, ValueError, "3 targets but 2 msg_ids"),
        ({"targets": [], "msg_ids": []}, ValueError, "1 to"),
        ({"content": []}, TypeError, "content must be a JSON object"),
        (
            {
                "targets": [0] * (protocol.MAX_BROADCAST_TARGETS + 1),
                "msg_ids": [str(i) for i in range(protocol.MAX_BROADCAST_TARGETS + 1)],
            },
            ValueError,
            "targets must name 1 to",
        ),
    ],
)
def test_request_checks_every_field(changes: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        protocol.BroadcastRequest.from_content(_content(**changes))


def _broadcast(signer: wire.Wire, content: dict[str, Any], buffers: list[Any]) -> wire.Message:
    _, frames = signer.pack(protocol.BROADCAST_REQUEST, content, None, {"label": "x"}, buffers)
    return signer.unpack(frames[1:])


def test_fan_out_signs_each_part_and_shares_the_buffers() -> None:
    signer = wire.Wire(KEY, username="client")
    buffers = pack_apply(ops.push, ({"a": b"z" * 100},), {})
    msg = _broadcast(signer, _content(), buffers)
    request = protocol.BroadcastRequest.from_content(msg.content)
    controller = wire.Wire(KEY, username="controller")
    parts = list(fan_out(controller, request, msg.header, msg.frames))
    assert [eid for eid, _, _ in parts] == [0, 1, 2]
    for (_, part, frames), msg_id in zip(parts, "abc"):
        got = wire.Wire(KEY).unpack(frames)  # (signed with the cluster key)
        assert got.msg_id == part.msg_id == msg_id
        assert got.msg_type == "apply_request"
        assert got.header["session"] == msg.header["session"]
        assert got.metadata == {"label": "x"} and got.content == {}
        assert all(a is b for a, b in zip(frames[5:], msg.frames[5:]))  # (no copies)
    with pytest.raises(wire.SignatureError):
        wire.Wire(b"other").unpack(parts[0][2])


class _Controller:
    """What :class:`Broadcasts` uses of the controller, recorded."""

    def __init__(self) -> None:
        self.wire = wire.Wire(KEY, username="controller")
        self.forwarded: list[tuple[bytes, str, int, str, bool]] = []
        self.sent: list[list[Any]] = []
        self.known: set[str] = set()
        self.seen = wire.SeenWindow()
        self.broadcasts = Broadcasts(
            self.wire,
            lambda client, channel, eid, msg, frames, keep: self.forwarded.append(
                (client, channel, eid, msg.msg_id, keep)
            ),
            self.seen,
            self.known.__contains__,
            self.sent.append,
            wire.DropLog(__import__("logging").getLogger("test"), "test"),
            keep_bytes=1000,
        )

    def submit(self, content: Any, buffers: list[Any] = ()) -> None:  # type: ignore[assignment]
        msg = _broadcast(wire.Wire(KEY, username="client"), content, list(buffers))
        self.broadcasts.submit(b"client", msg, msg.frames)

    def refusal(self) -> dict[str, Any]:
        assert len(self.sent) == 1
        return wire.Wire(KEY).unpack(self.sent.pop()[3:]).content


def test_broadcasts_forward_each_part_once() -> None:
    ctl = _Controller()
    ctl.submit(_content(msg_type="execute_request", content={"code": "1"}))
    assert ctl.forwarded == [
        (b"client", "shell", 0, "a", True),
        (b"client", "shell", 1, "b", True),
        (b"client", "shell", 2, "c", True),
    ]
    assert all(m in ctl.seen for m in "abc")
    ctl.forwarded.clear()
    ctl.submit(_content(msg_ids=["d", "e", "f"]), [b"x" * 2000])  # (too big to keep)
    assert [f[4] for f in ctl.forwarded] == [False] * 3
    assert not ctl.sent


def test_broadcasts_tell_the_fan_in_before_any_part_goes() -> None:
    events: list[tuple[Any, ...]] = []
    broadcasts = Broadcasts(
        wire.Wire(KEY, username="controller"),
        lambda client, channel, eid, msg, frames, keep: events.append(("part", msg.msg_id)),
        wire.SeenWindow(),
        lambda msg_id: False,
        lambda frames: events.append(("refused",)),
        wire.DropLog(__import__("logging").getLogger("test"), "test"),
        expect=lambda client, msg_ids, fold: events.append(
            ("expect", client, tuple(msg_ids), fold)
        ),
    )
    msg = _broadcast(wire.Wire(KEY, username="client"), _content(), [])
    broadcasts.submit(b"client", msg, msg.frames)
    assert events == [("expect", b"client", ("a", "b", "c"), False)] + [("part", m) for m in "abc"]
    events.clear()
    # (a client that asks for an apply's replies folded: the fan-in is told so; not for
    # an execute's, nor asked any other way than True)
    for changes, fold in [
        ({replies.FOLD_ASKED: True}, True),
        ({replies.FOLD_ASKED: 1}, False),
        ({replies.FOLD_ASKED: True, "msg_type": "execute_request"}, False),
    ]:
        ids = [wire.new_msg_id() for _ in range(3)]
        content = _content(msg_ids=ids, **changes)
        msg = _broadcast(wire.Wire(KEY, username="client"), content, [])
        broadcasts.submit(b"client", msg, msg.frames)
        assert events[0] == ("expect", b"client", tuple(ids), fold)
        events.clear()
    msg = _broadcast(wire.Wire(KEY, username="client"), _content(msg_ids=list("xxy")), [])
    broadcasts.submit(b"client", msg, msg.frames)
    assert events == [("refused",)]  # (nothing to gather)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (_content(targets=[0, "1", 2]), "TypeError.*targets must be an int"),
        (_content(msg_ids=["a", "a", "b"]), "msg_ids must differ"),
        (_content(targets=list(range(10_001)), msg_ids=[str(i) for i in range(10_001)]), "1 to"),
        ({"msg_type": "apply_request"}, "targets must be a list"),
    ],
)
def test_broadcasts_refuse_bad_requests_whole(content: dict[str, Any], match: str) -> None:
    ctl = _Controller()
    ctl.submit(content)
    assert not ctl.forwarded
    reply = ctl.refusal()
    assert reply["status"] == "error"
    assert __import__("re").search(match, f"{reply['ename']}: {reply['evalue']}")


def test_broadcasts_refuse_msg_ids_seen_before() -> None:
    ctl = _Controller()
    ctl.known.add("b")  # (a task record)
    ctl.submit(_content())
    assert "msg_id b was seen before" in ctl.refusal()["evalue"]
    ctl.seen.add("x")
    ctl.submit(_content(msg_ids=["a", "x", "c"]))
    assert "msg_id x was seen before" in ctl.refusal()["evalue"]
    assert not ctl.forwarded
    ctl.submit(_content())
    assert "msg_id b" in ctl.refusal()["evalue"]  # (still: nothing was taken in)


def test_order_admits_a_broadcast_whole_or_not_at_all() -> None:
    paths = {0: "direct", 1: "direct"}
    order = EngineOrder(lambda eid, channel: paths.get(eid, "routed"))
    assert order.admit(0, "m0", "lane") == "direct"  # (in flight on engine 0's lane)
    assert not order.admit_all([(0, "b0"), (1, "b1")], "routed")
    assert order.waiting(0) == 0 and order.waiting(1) == 0  # (nothing taken)
    order.done("m0", lambda m, p: True)
    assert order.admit_all([(0, "b0"), (1, "b1")], "routed")
    assert order.admit(1, "m1", "lane") is None  # (waits for the broadcast's part)
    sent: list[tuple[str, str]] = []
    order.done("b1", lambda m, p: sent.append((m, p)) or True)
    assert sent == [("m1", "direct")]


# ----- a real cluster


@pytest.fixture(scope="module")
def cluster4():
    from conftest import ClusterFactory

    factory = ClusterFactory()
    cluster, client = factory.start(4)
    yield cluster, client
    factory.stop_all()


@pytest.fixture
def rc4(cluster4):
    return cluster4[1]


def test_apply_execute_push_pull_in_target_order(rc4) -> None:
    bv = rc4.broadcast_view()
    ar = bv.apply_async(os.getpid)
    pids = ar.get(10)
    assert pids == [rc4.engine_info(i)["pid"] for i in rc4.ids]
    assert len(ar.msg_ids) == 4 and len(set(ar.msg_ids)) == 4
    assert [md["engine_id"] for md in ar.metadata] == rc4.ids
    assert all(md["status"] == "ok" and md["msg_id"] == m for md, m in zip(ar.metadata, ar.msg_ids))
    assert all(rc4.metadata[m]["engine_id"] == i for m, i in zip(ar.msg_ids, rc4.ids))

    view = rc4.broadcast_view(targets=[3, 1, 2], block=True)
    view.push({"a": 7})
    assert view.pull("a") == [7, 7, 7]
    assert view.apply(lambda x, y: x + y, 1, jx.Reference("a")) == [8, 8, 8]
    ex = view.execute("import os; b = os.getpid(); print('hi', a)")
    assert [md["stdout"] for md in ex.metadata] == ["hi 7\n"] * 3
    assert [md["engine_id"] for md in ex.metadata] == [3, 1, 2]
    assert view.pull("b") == [rc4.engine_info(i)["pid"] for i in (3, 1, 2)]


def test_errors_are_per_engine(rc4) -> None:
    bv = rc4.broadcast_view()
    ar = bv.apply_async(lambda: 1 / 0)
    with pytest.raises(jx.CompositeError) as info:
        ar.get(10)
    assert len(info.value.elist) == 4
    assert sorted(e.engine_info["engine_id"] for e in info.value.elist) == rc4.ids
    assert [md["status"] for md in ar.metadata] == ["error"] * 4


def _count_sends(rc, monkeypatch) -> list[bytes]:
    """Record the first frame (the route) of every message the client sends (``lane``
    for one to an engine's lane, the calling thread's own socket's included)."""
    io = rc.transport.io
    routes: list[bytes] = []
    real = io.send
    real_here = rc.transport._send_here

    def send(frames, track=False, lane=None):  # type: ignore[no-untyped-def]
        routes.append(b"lane" if lane is not None else frames[0])
        return real(frames, track=track, lane=lane)

    def send_here(req, here):  # type: ignore[no-untyped-def]
        routes.append(b"lane")
        return real_here(req, here)

    monkeypatch.setattr(io, "send", send)
    monkeypatch.setattr(rc.transport, "_send_here", send_here)
    return routes


def test_the_client_sends_one_message_for_four_engines(rc4, monkeypatch) -> None:
    bv = rc4.broadcast_view(block=True)
    bv.apply(abs, -1)  # (nothing of this client in flight after it)
    routes = _count_sends(rc4, monkeypatch)
    assert bv.apply(abs, -2) == [2] * 4
    bv.push({"c": 1})
    assert routes == [protocol.BROADCAST_ROUTE] * 2
    routes.clear()
    rc4[:].apply_sync(abs, -3)  # (a DirectView beside the engines: their lanes)
    assert len(routes) == 4 and protocol.BROADCAST_ROUTE not in routes


def test_an_unknown_target_fails_only_its_part(rc4) -> None:
    # (past the client's own check of targets: the controller's)
    parts = rc4.transport.submit_broadcast(
        [0, 99, 1], protocol.APPLY_REQUEST, {}, pack_apply(abs, (-4,), {})
    )
    assert parts is not None
    with pytest.raises(jx.EngineError, match="no engine with id 99"):
        parts[1].result(10)
    assert parts[0].result(10) == 4 and parts[2].result(10) == 4
    with pytest.raises(jx.InvalidTarget, match="no engine with id 99"):
        rc4.broadcast_view(targets=[0, 99]).apply_sync(abs, 1)


def test_forged_broadcasts_are_refused_and_the_controller_serves_on(rc4) -> None:
    info = json.loads(Path(rc4.connection_file).read_text())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    try:
        sock.connect(f"tcp://127.0.0.1:{info['client_port']}")
        signer = wire.Wire(info["key"].encode())
        buffers = pack_apply(abs, (-1,), {})

        def ask(content: dict[str, Any], answers: str | None = None) -> dict[str, Any]:
            header, frames = signer.pack(protocol.BROADCAST_REQUEST, content, None, {}, buffers)
            sock.send_multipart([protocol.BROADCAST_ROUTE, *frames])
            reply = signer.recv(sock.recv_multipart())
            assert reply.parent_id == (answers or header["msg_id"])
            return reply.content

        # a well-made broadcast from anyone with the key: its part's reply comes back
        ok = ask(_content(targets=[0], msg_ids=["forged-ok"]), answers="forged-ok")
        assert ok["status"] == "ok"
        bad = ask(_content(targets=[0, "1"], msg_ids=["f1", "f2"]))
        assert bad["ename"] == "TypeError" and "targets must be an int" in bad["evalue"]
        dup = ask(_content(targets=[0, 1], msg_ids=["f3", "f3"]))
        assert "msg_ids must differ" in dup["evalue"]
        again = ask(_content(targets=[0], msg_ids=["forged-ok"]))
        assert "seen before" in again["evalue"]
        many = protocol.MAX_BROADCAST_TARGETS + 1
        big = ask(_content(targets=[0] * many, msg_ids=[f"m{i}" for i in range(many)]))
        assert "targets must name 1 to" in big["evalue"]
        # unsigned, or signed with another key: dropped without a word
        _, frames = wire.Wire(b"").pack(protocol.BROADCAST_REQUEST, _content(msg_ids=list("xyz")))
        sock.send_multipart([protocol.BROADCAST_ROUTE, *frames])
        _, frames = wire.Wire(b"x" * 32).pack(protocol.BROADCAST_REQUEST, _content())
        sock.send_multipart([protocol.BROADCAST_ROUTE, *frames])
        sock.rcvtimeo = 300
        with pytest.raises(zmq.Again):
            sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()
    assert rc4.broadcast_view().apply_sync(abs, -5) == [5] * 4


def test_a_killed_engine_fails_only_its_part(cluster4, rc4) -> None:
    bv = rc4.broadcast_view()
    victim = rc4.ids[-1]
    pid = rc4.engine_info(victim)["pid"]
    ar = bv.apply_async(time.sleep, 0.5)
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(jx.CompositeError) as info:
        ar.get(10)
    errors = info.value.elist
    assert len(errors) == 1 and isinstance(errors[0], jx.EngineError)
    assert f"engine {victim}" in str(errors[0]) and "SIGKILL" in str(errors[0])
    assert [md["status"] for md in ar.metadata[:-1]] == ["ok"] * 3
    # sent before the client hears of the death: the controller fails the part
    late = rc4.transport.submit_broadcast(
        [0, victim], protocol.APPLY_REQUEST, {}, pack_apply(abs, (-6,), {})
    )
    assert late is not None and late[0].result(10) == 6
    with pytest.raises(jx.EngineError, match=f"engine {victim}"):
        late[1].result(10)
    deadline = time.monotonic() + 10
    while victim in rc4.ids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim not in rc4.ids
    assert rc4.broadcast_view().apply_sync(abs, -7) == [7] * 3


class _Receiver:
    """A client of its own: sends from ``<16 hex>:s``, and the controller answers its
    ``:r`` twin, as a jupyter-px client's (so replies may come in batches)."""

    def __init__(self, rc: Any) -> None:
        info = json.loads(Path(rc.connection_file).read_text())
        self.signer = wire.Wire(info["key"].encode())
        self.results: dict[str, tuple[int, Any]] = {}  # (engine id, result) of merged replies
        self.ctx = zmq.Context()
        uuid = os.urandom(8).hex().encode()
        self.sender, self.receiver = self.ctx.socket(zmq.DEALER), self.ctx.socket(zmq.DEALER)
        for sock, end in ((self.sender, b":s"), (self.receiver, b":r")):
            sock.linger = 0
            sock.identity = uuid + end
            sock.connect(f"tcp://127.0.0.1:{info['client_port']}")
        # replies for a peer the controller's socket does not know yet are lost: ask it
        # something from the receiving socket, and wait for the answer
        # (saying it reads several replies in one message, as a jupyter-px client does)
        ask = protocol.ConnectRequest(reads=(protocol.MERGED_REPLIES,))
        _, frames = self.signer.pack(protocol.CONNECT_REQUEST, ask.to_content())
        self.receiver.send_multipart([protocol.HUB_ROUTE, *frames])
        assert self.receiver.poll(10_000), "no answer from the controller"
        self.receiver.recv_multipart()

    def broadcast(self, targets: list[int], func: Any, *args: Any) -> list[str]:
        msg_ids = [wire.new_msg_id() for _ in targets]
        content = _content(targets=targets, msg_ids=msg_ids)
        buffers = pack_apply(func, args, {})
        _, frames = self.signer.pack(protocol.BROADCAST_REQUEST, content, None, {}, buffers)
        self.sender.send_multipart([protocol.BROADCAST_ROUTE, *frames])
        return msg_ids

    def messages(self, n: int, timeout: float = 10.0) -> list[tuple[float, list[str]]]:
        """The next messages that carry ``n`` replies: (when, the msg_ids each answers)."""
        got: list[tuple[float, list[str]]] = []
        deadline = time.monotonic() + timeout
        while sum(len(ids) for _, ids in got) < n:
            left = deadline - time.monotonic()
            assert left > 0 and self.receiver.poll(left * 1000), f"{n} replies: got {got}"
            frames = self.receiver.recv_multipart()
            batch = wire.unpack_batch(frames) if wire.is_batch(frames) else [frames]
            ids = []
            for m in batch:  # (each reply whole, or several in one message of the controller)
                msg = self.signer.unpack(m[2:])
                if msg.msg_type != replies.REPLIES:
                    ids.append(msg.parent_id)
                    continue
                for eid, reply in replies.unpack(msg):
                    self.results[reply.parent_id] = (eid, serialize.loads(reply.buffers))
                    ids.append(reply.parent_id)
            got.append((time.monotonic(), ids))
        return got

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.ctx.term()


def test_a_broadcasts_replies_come_back_together(rc4) -> None:
    receiver = _Receiver(rc4)
    try:
        # nothing much between the replies of a noop: one message for them all, nearly
        # always (a loaded machine may spread them over more than the hold)
        whole = 0
        for _ in range(5):
            msg_ids = receiver.broadcast(rc4.ids, abs, -1)
            got = receiver.messages(len(msg_ids))
            assert sorted(m for _, ids in got for m in ids) == sorted(msg_ids)
            whole += len(got) == 1
            # ... one message carrying each engine's result (each reply's signature checked
            # by the controller, which signs the whole), not a batch of the engines' replies
            for eid, msg_id in zip(rc4.ids, msg_ids):
                assert receiver.results.get(msg_id, (eid, 1)) == (eid, 1)
        assert whole >= 3 and len(receiver.results) >= 3 * len(rc4.ids)
        # a slow part: the others' replies do not wait for it past the hold
        rc4[rc4.ids[0]].push({"d": 1.0}, block=True)
        rc4[rc4.ids[1]].push({"d": 0.0}, block=True)
        sent = time.monotonic()
        fast, slow = receiver.broadcast(rc4.ids[:2], time.sleep, jx.Reference("d"))
        (first, ids), (last, later) = receiver.messages(2)
        assert ids == [slow] and later == [fast]
        assert first - sent < 0.7 and last - first > 0.3
    finally:
        receiver.close()


def test_thirty_two_engines_each_part_keeps_its_metadata_error_and_output(cluster_factory):
    """A broadcast to 32 engines (its parts made and settled in bulk, waited on once) is
    still 32 tasks to the user: each with its msg_id, metadata, output and error, in the
    order of the targets, in ``rc.metadata``, ``rc.results`` and ``rc.history``, and
    each one's own ``get_result``."""

    def work(failing: set[int]) -> int:  # (a function of the test: pickled by value)
        import os

        pid = os.getpid()
        print("pid", pid)
        if pid in failing:
            raise ValueError(f"no {pid}")
        return pid

    _, rc = cluster_factory.start(32)
    ids = rc.ids
    pids = [rc.engine_info(i)["pid"] for i in ids]
    failing = set(pids[::5])
    submitted: list[str] = []
    rc.transport.add_submit_hook(submitted.append)
    try:
        ar = rc.broadcast_view().apply_async(work, failing)
    finally:
        rc.transport.remove_handlers(submitted.append)
    assert submitted == ar.msg_ids and len(set(ar.msg_ids)) == 32
    with pytest.raises(jx.CompositeError) as info:
        ar.get(60)
    assert ar.ready() and ar.progress == 32 and not ar.successful()
    errors = info.value.elist
    assert [e.engine_info["engine_id"] for e in errors] == ids[::5]
    assert all(isinstance(e, jx.RemoteError) and e.ename == "ValueError" for e in errors)
    outcomes = ar.get(0, return_exceptions=True)
    for i, (eid, pid, msg_id) in enumerate(zip(ids, pids, ar.msg_ids)):
        md = ar.metadata[i]
        assert md is rc.metadata[msg_id] and md["msg_id"] == msg_id and md["engine_id"] == eid
        assert md["stdout"] == f"pid {pid}\n"
        assert md["submitted"] <= md["received"] and md["started"] <= md["completed"]
        if pid in failing:
            assert md["status"] == "error" and md["error"] is outcomes[i]
            assert f"no {pid}" in str(outcomes[i]) and rc.results[msg_id] is outcomes[i]
        else:
            assert md["status"] == "ok" and outcomes[i] == pid == rc.results[msg_id]
    assert list(rc.history)[-32:] == ar.msg_ids
    one = rc.get_result(ar.msg_ids[1])
    assert one.get(10) == pids[1] and one.metadata["engine_id"] == ids[1]
    with pytest.raises(jx.RemoteError, match=f"no {pids[0]}"):
        rc.get_result(ar.msg_ids[0]).get(10)
    assert [p.get(10) for p in ar.split()[1:3]] == pids[1:3]
    # ... and the next broadcast, to the same engines, after it
    assert rc.broadcast_view().apply_sync(os.getpid) == pids


def _parts(rc: Any, n: int) -> list[Any]:
    """``n`` parts of a broadcast to engine 0, taken into the client's table as sent (but
    sent nowhere: the test answers them itself)."""
    from datetime import datetime, timezone

    from jupyter_ext._metadata import Metadata
    from jupyter_ext._request import Request

    targets = [rc.ids[0]] * n
    msg_ids = wire.new_msg_ids(n)
    mds = Metadata.many(msg_ids, targets, submitted=datetime.now(timezone.utc))
    reqs = Request.many(msg_ids, mds, "apply", "lane")
    assert rc.transport.requests.add_all(reqs, "routed")
    return reqs


def _engine_replies(
    signer: wire.Wire, eid: int, reqs: list[Any], at: str, fold: bool = False
) -> list[list[Any]]:
    """Engine ``eid``'s replies to ``reqs`` as the controller would pass them on (tagged,
    to be folded if ``fold``): a result, a result printed beside, an error, a result that
    does not load, a result of two frames, a reply whose metadata lacks keys and holds
    others, and two more results (of the shape that folds)."""
    base = {"started": at, "engine_id": eid, "engine_uuid": signer.session}
    base.update(stdout="", stderr="", completed=at, status="ok")
    error = protocol.error_content("ValueError", "no", ["tb"])
    cases: list[tuple[dict[str, Any], dict[str, Any], list[Any]]] = [
        (base, {"status": "ok"}, serialize.dumps(7)),
        ({**base, "stdout": "hi\n"}, {"status": "ok"}, serialize.dumps([1])),
        ({**base, "status": "error"}, error, []),
        (base, {"status": "ok"}, [b"not a pickle"]),
        (base, {"status": "ok"}, serialize.dumps(bytearray(70_000))),
        ({"engine_uuid": "u", "msg_id": "forged", "started": ""}, {"status": "ok"}, [b"N."]),
        (base, {"status": "ok"}, serialize.dumps(None)),
        ({**base, "started": "", "completed": "not a date"}, {"status": "ok"}, [b"N."]),
    ]
    out = []
    for req, (md, content, buffers) in zip(reqs, cases):
        parent = {"msg_id": req.msg_id, "msg_type": "apply_request", "session": "s"}
        parent.update(username="u", date=wire.utcnow_iso(), version="5.3")
        _, frames = signer.pack(protocol.APPLY_REPLY, content, parent, md, buffers)
        tagged = [b"0123456789abcdef:r", str(eid).encode(), *frames]
        out.append(replies.tag(tagged, req.msg_id, eid, frames[4], fold))
    return out


def _take(rc: Any, messages: list[list[Any]], reqs: list[Any]) -> None:
    """Give the client's IO thread ``messages`` (each from its route frame on) as if the
    controller had sent them; wait until ``reqs`` are settled."""

    def take() -> None:
        for m in messages:
            rc.transport._on_reply([zmq.Frame(f if isinstance(f, bytes) else bytes(f)) for f in m])

    rc.transport.io.call_soon(take)
    for req in reqs:
        req.exception(10)


@pytest.mark.parametrize("fold", [False, True])
def test_merged_replies_read_in_one_pass_are_read_as_one_by_one(rc4, fold: bool) -> None:
    """A broadcast's replies merged in one message (the common ones read in one pass,
    folded or not, the others the general way) give each part the outcome and metadata
    that the same replies give when they come one by one."""
    merged, alone = _parts(rc4, 8), _parts(rc4, 8)
    engine = wire.Wire(rc4.transport.wire.key, username="engine")
    at, eid = wire.utcnow_iso(), rc4.ids[0]
    signer = wire.Wire(rc4.transport.wire.key, username="controller")
    (message,) = replies.pack(signer, _engine_replies(engine, eid, merged, at, fold))
    content = signer.unpack(message[3:]).content
    assert len(content.get("folded", {}).get("msg_ids", [])) == (4 if fold else 0)
    _take(rc4, [message[1:]], merged)
    _take(rc4, [r[1:] for r in _engine_replies(engine, eid, alone, at)], alone)
    skip = {"msg_id", "submitted", "received", "error"}
    for a, b in zip(merged, alone):
        assert {k: v for k, v in a.metadata.items() if k not in skip} == {
            k: v for k, v in b.metadata.items() if k not in skip
        }
        assert (a.exception() is None) == (b.exception() is None)
        assert a.metadata["received"] is not None and a.done() and b.done()
    values = [r.result() if r.exception() is None else r.exception() for r in merged]
    assert values[0] == 7 and values[1] == [1] and len(values[4]) == 70_000
    assert merged[1].metadata["stdout"] == "hi\n" and merged[0].metadata["engine_uuid"]
    assert isinstance(values[2], jx.RemoteError) and values[2].ename == "ValueError"
    assert isinstance(values[3], jx.RemoteError) and values[3].ename == "SerializationError"
    assert merged[3].metadata["status"] == "error" and merged[0].metadata["status"] == "ok"
    assert merged[5].metadata["msg_id"] == merged[5].msg_id and values[5] is None
    assert values[6] is None and merged[7].metadata["completed"] is None
    assert merged[7].metadata["started"] is None and merged[6].metadata["started"]
    assert merged[4].nbytes == alone[4].nbytes > 0 and merged[0].nbytes == 0
    for req in merged + alone:
        assert rc4.results[req.msg_id] is (req.exception() or req.result())


def test_an_engines_odd_metadata_neither_stalls_nor_relabels_the_other_parts(rc4) -> None:
    """An engine holds the cluster's key and may say anything in its replies' metadata;
    the controller passes it on. A reply naming a list for its engine_id made the table
    raise while it finished the merged message's parts: every part of it, the other
    engines' too, waited for ever (and one naming another engine, or a string, left its
    msg_id in the books of the engine it was sent to). Now each part keeps the engine it
    was sent to, and only the texts and aware dates of the engine's claims are taken."""
    reqs = _parts(rc4, 6)
    engine = wire.Wire(rc4.transport.wire.key, username="engine")
    signer = wire.Wire(rc4.transport.wire.key, username="controller")
    eid, at = rc4.ids[0], wire.utcnow_iso()
    base = {"started": at, "engine_id": eid, "engine_uuid": engine.session}
    base.update(stdout="", stderr="", completed=at, status="ok")
    odd: list[dict[str, Any]] = [
        {"engine_id": [1]},
        {"engine_id": {"a": 1}},
        {"engine_id": rc4.ids[1]},
        {"engine_id": "x", "stdout": 5, "stderr": [], "engine_uuid": [1]},
        {"started": "2026-01-02T03:04:05", "completed": 7, "status": 3},
        {},  # (the one of them that folds)
    ]
    tagged = []
    for req, changes in zip(reqs, odd):
        parent = {"msg_id": req.msg_id, "msg_type": "apply_request", "session": "s"}
        parent.update(username="u", date=at, version="5.3")
        md = {**base, **changes}
        _, frames = engine.pack(protocol.APPLY_REPLY, {"status": "ok"}, parent, md, [b"K\x01."])
        route = [b"0123456789abcdef:r", str(eid).encode()]
        tagged.append(replies.tag([*route, *frames], req.msg_id, eid, frames[4], True))
    (message,) = replies.pack(signer, tagged)
    assert len(signer.unpack(message[3:]).content["folded"]["msg_ids"]) == 1
    _take(rc4, [message[1:]], reqs)
    for req in reqs:
        md = req.metadata
        assert req.result() == 1 and md["engine_id"] == eid and md["status"] == "ok"
        assert type(md["stdout"]) is str and type(md["stderr"]) is str
        assert md["engine_uuid"] == (None if req is reqs[3] else engine.session)
        for key in ("started", "completed"):
            assert md[key] is None or md[key].tzinfo is not None
    assert reqs[4].metadata["started"] is None and reqs[5].metadata["started"] is not None
    assert not rc4.transport.requests.busy(eid)  # (nothing left in the books)
    assert rc4.broadcast_view().apply_sync(abs, -2) == [2] * len(rc4.ids)


def test_a_garbled_merged_message_fails_the_tasks_it_names(rc4) -> None:
    """Merged replies the controller garbled (signed, but malformed) fail the parts whose
    msg_ids can be read, saying so, rather than leave them waiting; the client serves on."""
    reqs = _parts(rc4, 3)
    signer = wire.Wire(rc4.transport.wire.key, username="controller")
    folded = {"msg_ids": [r.msg_id for r in reqs[1:]], "engine_ids": [0, 0], "sizes": [1, 1]}
    content = {"replies": [[reqs[0].msg_id, 0, "apply_reply", {}, {}, 0]], "folded": folded}
    _, frames = signer.pack(replies.REPLIES, content, buffers=[b"NN"])
    _take(rc4, [[protocol.HUB_ROUTE, *frames]], reqs)
    for req in reqs:
        error = req.exception()
        assert isinstance(error, jx.RemoteError) and error.ename == "MessageError"
        assert "garbled" in str(error) and "columns" in str(error)
        assert req.metadata["status"] == "error" and rc4.results[req.msg_id] is error
    assert rc4.broadcast_view().apply_sync(abs, -2) == [2] * len(rc4.ids)
