"""Load-balanced maps sent in batches, with real engines: what a task keeps of its own
(order, msg_id, metadata, retries, dependencies, failures, its engine's death), and what
the controller does with forged batch messages."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq

import jupyter_ext as jx
from jupyter_ext._metadata import Metadata
from jupyter_ext._request import Request
from kernel_engine import protocol, serialize, wire

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_batched_map_keeps_each_tasks_order_id_and_metadata(rc):
    view = rc.load_balanced_view()
    amr = view.map(lambda x: x * 2, range(700), track=True)
    assert amr.get(60) == [2 * x for x in range(700)]
    ids = amr.msg_ids
    assert len(set(ids)) == 700
    trackers = {id(f.tracker) for f in amr._children}
    assert len(trackers) < 700 / 8  # (tasks left together, a tracker per message)
    for md in (amr.metadata[0], amr.metadata[350], amr.metadata[-1]):
        assert md["engine_id"] in rc.ids and md["status"] == "ok"
        assert md["submitted"] <= md["started"] <= md["completed"]
    records = rc.db_query({"msg_id": {"$in": [ids[0], ids[500]]}}, keys=["msg_id", "engine_id"])
    assert {r["msg_id"] for r in records} == {ids[0], ids[500]}
    assert rc.get_result(ids[500]).get(10) == [1000]


def test_one_failing_task_in_a_batch_fails_alone(rc):
    view = rc.load_balanced_view()
    out = view.map_sync(lambda x: 1 / (x - 137), range(300), return_exceptions=True)
    errors = [i for i, r in enumerate(out) if isinstance(r, Exception)]
    assert errors == [137]
    assert isinstance(out[137], jx.RemoteError) and out[137].ename == "ZeroDivisionError"


def test_retries_and_dependencies_across_batches(rc, tmp_path):
    view = rc.load_balanced_view()
    view.retries = 1
    marks = str(tmp_path)

    def once_in_a_while(x):  # every 40th item fails its first attempt
        mark = os.path.join(marks, str(x))
        if x % 40 == 0 and not os.path.exists(mark):
            open(mark, "w").close()
            raise RuntimeError("first attempt")
        return x

    first = view.map(once_in_a_while, range(400))
    after = rc.load_balanced_view()
    after.after = first
    second = after.map(lambda x: x, range(300))
    assert first.get(60) == list(range(400))
    assert second.get(60) == list(range(300))
    assert len(os.listdir(marks)) == 10
    last_done = max(md["completed"] for md in first.metadata)
    assert min(md["started"] for md in second.metadata) >= last_done


def test_many_unknown_dependencies_are_looked_up_at_once(rc):
    # each dependency the scheduler does not know is looked up in the task store: one
    # wait for the writer per message, not per id (a map whose tasks named 3,000 unknown
    # ids each held the controller's loop up for half a minute)
    import uuid

    lv = rc.load_balanced_view()
    finished = lv.map_async(abs, range(5))
    finished.get(10)
    ids = [uuid.uuid4().hex for _ in range(3000)] + list(finished.msg_ids)
    started = time.monotonic()
    with lv.temp_flags(after=ids):
        ar = lv.map_async(abs, range(-100, 0), chunksize=1)
    with pytest.raises(jx.CompositeError, match="InvalidDependency"):
        ar.get(60)
    assert time.monotonic() - started < 15
    with lv.temp_flags(after=finished.msg_ids):  # (known to the store: met)
        assert lv.apply_sync(abs, -7) == 7


def test_a_killed_engine_fails_only_its_own_tasks(cluster_factory):
    _, rc = cluster_factory.start(2)
    view = rc.load_balanced_view()
    amr = view.map(lambda x: (time.sleep(0.01), x)[1], range(400), return_exceptions=True)
    deadline = time.monotonic() + 30
    while amr.progress < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(rc.engine_info(1)["pid"], signal.SIGKILL)
    out = amr.get(60)
    lost = [i for i, r in enumerate(out) if isinstance(r, Exception)]
    assert 0 < len(lost) <= 64, lost  # (what was dispatched to engine 1: a pipeline's worth)
    assert all(isinstance(out[i], jx.EngineError) for i in lost)
    assert {amr.metadata[i]["engine_id"] for i in lost} == {1}
    assert [out[i] for i in range(400) if i not in lost] == [i for i in range(400) if i not in lost]
    assert view.map_sync(lambda x: x, range(100)) == list(range(100))


class Forger:
    """A peer that holds the cluster key and speaks to the controller's client socket raw."""

    def __init__(self, rc: Any):
        info = json.loads(Path(rc.transport.connection_file).read_text())
        self.wire = wire.Wire(info["key"].encode())
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(f"tcp://127.0.0.1:{info['client_port']}")

    def task(self, metadata: Any = None, key: wire.Wire | None = None) -> tuple[str, list[Any]]:
        buffers = serialize.pack_apply(abs, (-3,), {})
        header, frames = (key or self.wire).pack(
            protocol.APPLY_REQUEST, {}, None, metadata or {}, buffers
        )
        return header["msg_id"], frames[1:]

    def send_batch(self, parts: list[list[Any]], counts: bytes | None = None) -> None:
        frames = wire.pack_batch(parts)
        if counts is not None:
            frames[1] = counts
        self.sock.send_multipart([protocol.LB_ROUTE, *frames])

    def replies(self, n: int, timeout: float = 20.0) -> list[tuple[str, dict[str, Any]]]:
        """(parent msg_id, content) of the next ``n`` replies (batched or not)."""
        out: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"{len(out)} of {n} replies"
            frames = self.sock.recv_multipart()
            messages = wire.unpack_batch(frames) if wire.is_batch(frames) else [frames]
            for m in messages:
                msg = self.wire.unpack(m[2:])
                out.append((msg.parent_id, msg.content))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def forger(rc):
    f = Forger(rc)
    yield f
    f.close()


def test_forged_batches_get_clear_refusals_and_the_controller_serves_on(rc, forger):
    good = [forger.task() for _ in range(3)]
    typed = forger.task({"retries": "many"})
    ranged = forger.task({"time_limit": -1})
    unsigned = forger.task(key=wire.Wire(b"a guess"))
    forger.send_batch(
        [good[0][1], typed[1], unsigned[1], good[1][1], good[1][1], ranged[1], good[2][1]]
    )
    got = forger.replies(6)
    ok = sorted(m for m, c in got if c["status"] == "ok")
    refused = {m: c for m, c in got if c["status"] != "ok"}
    assert ok == sorted(m for m, _ in good) and len(refused) == 3
    assert refused[typed[0]]["ename"] == "TypeError" and "retries" in refused[typed[0]]["evalue"]
    assert refused[ranged[0]]["ename"] == "ValueError"
    assert "time_limit" in refused[ranged[0]]["evalue"]
    assert refused[good[1][0]]["px_error"] == protocol.DUPLICATE  # (its copy, alone)
    # batches refused whole: too many tasks, counts that lie; then the controller serves on
    one = forger.task()
    forger.send_batch([one[1]] * (protocol.MAX_SUBMIT_BATCH + 1))
    lie = b"".join(n.to_bytes(8, "little") for n in (2, 6, 7))  # (frames for 13: none)
    forger.send_batch([forger.task()[1], forger.task()[1]], counts=lie)
    forger.send_batch([forger.task()[1]], counts=b'["6"]')
    late = [forger.task() for _ in range(2)]
    forger.send_batch([p for _, p in late])
    got = forger.replies(2)
    assert sorted(m for m, _ in got) == sorted(m for m, _ in late)
    assert not forger.sock.poll(200)  # (nothing answered the dropped batches)
    assert rc.load_balanced_view().apply_sync(abs, -5) == 5
    assert rc.db_query({"msg_id": one[0]}, ["msg_id"]) == []
    assert unsigned[0] not in {r["msg_id"] for r in rc.db_query({}, ["msg_id"])}


def _deliver_batch(rc: Any, messages: list[list[Any]]) -> None:
    """Have the client's IO thread take ``messages`` as one batch from the controller."""
    io = rc.transport.io
    packed = wire.pack_batch(messages)
    assert io.call_and_wait(lambda: io._batch(rc.transport._on_reply, packed, io.on_replies), 10)


def test_a_batch_of_replies_is_settled_together_and_a_bad_one_alone(rc):
    """The client takes the replies of one batch from the controller into its table at once;
    a message of it that is malformed is dropped and counted, and the others still settle."""
    transport = rc.transport
    busy = rc[:].apply_async(time.sleep, 2)  # (so that the tasks below wait, unanswered)
    view = rc.load_balanced_view()
    first, second = view.apply_async(abs, -1), view.apply_async(abs, -2)
    time.sleep(0.2)
    assert not first.done() and not second.done()
    drops = transport.io.drops.total
    unsigned = [b"1", wire.DELIM, b"0" * 64, b"{}", b"{}", b"{}", b"{}"]
    replies = [_signed_reply(rc, b"1", ar._children[0], v) for ar, v in ((first, 41), (second, 42))]
    _deliver_batch(rc, [replies[0], unsigned, replies[1]])
    assert first.get(5) == 41 and second.get(5) == 42
    assert transport.io.drops.total == drops + 1
    assert first.metadata["engine_id"] == 1 and first.metadata["received"] is not None
    busy.get(10)


def test_a_task_of_more_frames_than_a_batch_holds_runs_beside_the_others(rc, forger):
    """A signed task with more buffers than a batch message may hold: the controller sends
    it to its engine alone, so the tasks dispatched with it still run (in one batch, the
    engine refused them all, and they stayed in flight; found by review)."""
    busy = rc[:].apply_async(time.sleep, 1)  # (the tasks below queue up, then go together)
    buffers = [*serialize.pack_apply(abs, (-3,), {}), *[b"z"] * (wire.MAX_MESSAGE_FRAMES + 10)]
    header, frames = forger.wire.pack(protocol.APPLY_REQUEST, {}, None, {}, buffers)
    tasks = [forger.task() for _ in range(400)]  # (more than the engines' pipelines take)
    forger.send_batch([p for _, p in tasks[:300]])
    forger.sock.send_multipart([protocol.LB_ROUTE, *frames])
    forger.send_batch([p for _, p in tasks[300:]])
    got = dict(forger.replies(401))
    assert set(got) == {header["msg_id"], *(m for m, _ in tasks)}
    assert all(content["status"] == "ok" for content in got.values())
    busy.get(10)


def _live(rc: Any, kind: str = "apply") -> Request:
    """A request in the client's table for which nothing was sent (so no real reply races
    a forged one)."""
    wire_ = rc.transport.wire
    header = wire_.header(protocol.APPLY_REQUEST if kind != "hub" else protocol.STATUS_REQUEST)
    msg_id = header["msg_id"]
    md = Metadata(msg_id=msg_id, engine_id=None)
    req = Request(msg_id, md, kind, "controller", None, b"", False, header)
    assert rc.transport.requests.add(req) == "controller"
    rc.transport.metadata[msg_id] = md
    return req


def _signed_reply(rc: Any, route: bytes, req: Request, value: Any = None, ok: bool = True) -> Any:
    wire_ = rc.transport.wire
    if req.kind == "hub":
        _, frames = wire_.pack("status_reply", {"status": "ok"}, req.header, {})
    elif ok:  # (from the engine the route names)
        md = {"status": "ok", "engine_id": int(route), "started": wire.utcnow_iso()}
        md["completed"] = md["started"]
        content = {"status": "ok"}
        _, frames = wire_.pack(
            protocol.APPLY_REPLY, content, req.header, md, serialize.dumps(value)
        )
    else:
        content = {"status": "error", "ename": "Boom", "evalue": "dup", "traceback": []}
        _, frames = wire_.pack(protocol.APPLY_REPLY, content, req.header, {"status": "error"})
    return [route, *frames]


def test_a_batchs_replies_settle_in_the_order_they_came(rc):
    """A task's reply before a controller's reply in one batch is settled first: whoever
    the controller's answer wakes sees the task done (found by review: the task's came
    last, with the others of the batch)."""
    task, hub = _live(rc), _live(rc, "hub")
    seen: list[bool] = []
    hub.add_done_callback(lambda _: seen.append(task.done()))
    _deliver_batch(rc, [_signed_reply(rc, b"0", task, 42), _signed_reply(rc, b"hub", hub)])
    assert task.result(5) == 42 and hub.done() and seen == [True]


def test_a_second_reply_to_a_task_in_one_batch_changes_nothing(rc):
    """As alone: the first reply is the task's; a second one to the same msg_id in the same
    batch leaves its result and its metadata alone (found by review: its metadata said
    error beside the result)."""
    task = _live(rc)
    _deliver_batch(rc, [_signed_reply(rc, b"0", task, 7), _signed_reply(rc, b"0", task, ok=False)])
    md = rc.transport.metadata[task.msg_id]
    assert task.result(5) == 7 and md["status"] == "ok" and md.get("error") is None
