"""Several engines' task replies as one message (:mod:`kernel_engine.replies`), without
processes but for an inproc socket pair: what the controller merges, what it sends whole
and in which order, and what a client refuses. The real path (a broadcast's or a map's
replies reaching a client as one message) is in ``test_broadcast.py`` and
``test_lb_batches.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kernel_engine import protocol, replies, serialize, wire
from kernel_engine.controller import outbox
from kernel_engine.controller.fanin import FanIn
from kernel_engine.controller.outbox import Outbox

KEY = b"k" * 32
CLIENT = b"0123456789abcdef:r"


def _reply(
    signer: wire.Wire, eid: int, result: Any, status: str = "ok", tagged: bool = True
) -> list[Any]:
    """An engine's reply to a fresh apply request, as the router forwards it (tagged with
    what it read, unless ``tagged`` is false)."""
    request = signer.header(protocol.APPLY_REQUEST)
    content: dict[str, Any] = {"status": status}
    if status != "ok":
        content.update(ename="ValueError", evalue="no", traceback=["tb"])
    metadata = {"engine_id": eid, "status": status, "started": wire.utcnow_iso()}
    _, frames = signer.pack(
        protocol.APPLY_REPLY, content, request, metadata, serialize.dumps(result)
    )
    out = [CLIENT, str(eid).encode(), *frames]
    return replies.tag(out, request["msg_id"], eid, frames[4]) if tagged else out


def _read(signer: wire.Wire, frames: list[Any]) -> list[tuple[int, replies.Reply]]:
    """The replies a merged message carries (``frames`` from its client identity on)."""
    assert wire.as_bytes(frames[0]) == CLIENT and wire.as_bytes(frames[1]) == protocol.HUB_ROUTE
    msg = signer.unpack(frames[3:])
    assert msg.msg_type == replies.REPLIES
    return replies.unpack(msg)


def _parent(signer: wire.Wire, frames: list[Any]) -> str:
    return signer.unpack(frames[3:]).parent_id


def test_replies_merge_in_order_with_their_results_and_metadata() -> None:
    signer = wire.Wire(KEY)
    held = [_reply(signer, 3, {"x": 1}), _reply(signer, 0, None), _reply(signer, 7, 1, "error")]
    (merged,) = replies.pack(signer, held)
    got = _read(signer, merged)
    assert [eid for eid, _ in got] == [3, 0, 7]
    assert [r.parent_id for _, r in got] == [_parent(signer, f) for f in held]
    assert {r.msg_type for _, r in got} == {protocol.APPLY_REPLY}
    assert serialize.loads(got[0][1].buffers) == {"x": 1}
    assert serialize.loads(got[1][1].buffers) is None
    assert got[2][1].content["ename"] == "ValueError" and got[2][1].metadata["engine_id"] == 7
    assert got[0][1].buffers[0] is held[0][8]  # (buffers pass on without a copy)


def test_a_msg_id_is_written_as_json_whatever_it_holds() -> None:
    signer = wire.Wire(KEY)
    held = [_reply(signer, eid, eid) for eid in range(2)]
    odd = 'a"b\\c\u00e9\n'
    held[0].head = (odd, 0, held[0].head[2])
    assert _read(signer, replies.pack(signer, held)[0])[0][1].parent_id == odd


def _change(signer: wire.Wire, frames: list[Any], at: int, part: bytes) -> list[Any]:
    """``frames`` with ``part`` at ``at``, signed again (by ``signer``)."""
    frames[at] = part
    frames[3] = signer.sign([bytes(f) for f in frames[4:8]])
    return frames


def test_empty_parts_read_as_empty_objects() -> None:
    signer = wire.Wire(KEY)
    held = [_reply(signer, eid, eid) for eid in range(2)]
    _change(signer, held[0], 7, b"")
    held[1] = replies.tag(held[1], held[1].head[0], 1, b"")
    got = _read(signer, replies.pack(signer, held)[0])
    assert got[0][1].content == {} and got[1][1].metadata == {}


def test_what_is_not_a_tagged_reply_goes_whole_in_its_place() -> None:
    signer = wire.Wire(KEY)
    untagged = _reply(signer, 1, 1, tagged=False)  # (the controller's own, say)
    not_json = _change(signer, _reply(signer, 2, 2), 7, b"{not json")  # (signed, still bad)
    nan = _change(signer, _reply(signer, 3, 3), 7, b'{"status": NaN}')  # (no client reads it)
    short = replies.tag(_reply(signer, 4, 4)[:7], "x", 4, b"{}")
    # (an engine's port taken over by another process: its reply is not signed with the key)
    forged = _reply(signer, 9, 9)
    forged[3] = wire.Wire(b"another key").sign([bytes(f) for f in forged[4:8]])
    header = json.loads(bytes(forged[4]))
    execute = _change(
        signer, _reply(signer, 10, 10), 4, wire.dumps_json({**header, "msg_type": "execute_reply"})
    )
    bad_header = _change(signer, _reply(signer, 11, 11), 4, b'{"msg_type": "apply_reply"')
    deep = _change(signer, _reply(signer, 12, 12), 7, b'{"a":' + b"[" * 250 + b"]" * 250 + b"}")
    nested = b'{"b":' + b"[" * 110 + b"]" * 110 + b"}"  # (deep enough with the content's)
    deeper = replies.tag(_reply(signer, 13, 13), "x", 13, nested)
    _change(signer, deeper, 7, b'{"c":[' + b"{}," * 99 + b"{}]}")  # (counted, not nested)
    odd = [untagged, not_json, nan, short, forged, execute, bad_header, deep, deeper]
    good = [_reply(signer, eid, eid) for eid in (5, 6, 7, 8)]
    out = replies.pack(signer, [*good[:2], *odd, *good[2:]])
    assert out[1:-1] == odd
    assert [eid for eid, _ in _read(signer, out[0])] == [5, 6]
    assert [eid for eid, _ in _read(signer, out[-1])] == [7, 8]
    with pytest.raises(wire.SignatureError):  # (the client refuses it, as before)
        signer.unpack(forged[3:])
    # as deep as may be merged: the client reads it, its own stack deep too
    fine = _change(signer, _reply(signer, 14, 14), 7, b'{"a":' + b"[" * 190 + b"]" * 190 + b"}")
    (merged,) = replies.pack(signer, [fine, good[0]])
    assert _deep(lambda: _read(signer, merged), 600)[0][1].content["a"]
    # one alone, or one between others sent whole, is sent as it is
    assert replies.pack(signer, good[:1]) == good[:1]
    assert replies.pack(signer, [good[0], untagged, good[1]]) == [good[0], untagged, good[1]]


def _deep(call: Any, frames: int) -> Any:
    """``call()`` from ``frames`` Python frames deeper than here."""
    return call() if frames <= 0 else _deep(call, frames - 1)


def test_a_long_run_is_cut_at_the_most_one_message_carries(monkeypatch) -> None:
    monkeypatch.setattr(replies, "MAX_REPLIES", 3)
    signer = wire.Wire(KEY)
    out = replies.pack(signer, [_reply(signer, eid, eid) for eid in range(7)])
    assert [[eid for eid, _ in _read(signer, m)] for m in out[:2]] == [[0, 1, 2], [3, 4, 5]]
    assert signer.unpack(out[2][3:]).msg_type == protocol.APPLY_REPLY  # (the seventh alone)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("inproc://replies")
    dealer.identity = CLIENT
    dealer.connect("inproc://replies")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


def test_the_outbox_merges_a_turns_replies_and_keeps_the_order(pair: Any) -> None:
    router, dealer = pair
    signer = wire.Wire(KEY)
    box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"), signer)
    box.merge_for(CLIENT, True)
    sent = [_reply(signer, 0, 0), _reply(signer, 1, 1), _reply(signer, 2, 2, tagged=False)]
    sent.append(_reply(signer, 3, 3))
    for frames in sent:
        box.send(frames)
    box.flush()
    assert dealer.poll(1000)
    got = dealer.recv_multipart(copy=False)
    first, whole, last = wire.unpack_batch(got)
    merged = _read(signer, [CLIENT, *first])
    assert [r.parent_id for _, r in merged] == [_parent(signer, f) for f in sent[:2]]
    assert bytes(whole[3]) == bytes(sent[2][4])  # (the untagged one, whole, in its place)
    assert _parent(signer, [CLIENT, *last]) == _parent(signer, sent[3])
    # a turn of replies only: one message, not a batch
    for eid in range(4):
        box.send(_reply(signer, eid, eid * 10))
    box.flush()
    assert dealer.poll(1000)
    got = dealer.recv_multipart(copy=False)
    results = [serialize.loads(r.buffers) for _, r in _read(signer, [CLIENT, *got])]
    assert results == [0, 10, 20, 30]


def _merged(entries: Any, buffers: list[bytes]) -> wire.Message:
    signer = wire.Wire(KEY)
    _, frames = signer.pack(replies.REPLIES, {"replies": entries}, buffers=buffers)
    return signer.unpack(frames[1:])


@pytest.mark.parametrize(
    "entries, buffers",
    [
        (None, []),
        ([], []),
        ([["a", 0, "apply_reply", {}, {}]], []),  # (five fields)
        ([["a", "0", "apply_reply", {}, {}, 0]], []),  # (engine id a string)
        ([["a", 0, "apply_reply", [], {}, 0]], []),  # (metadata not an object)
        ([["a", 0, "apply_reply", {}, {}, 2]], [b"x"]),  # (more buffers than there are)
        ([["a", 0, "apply_reply", {}, {}, -1]], [b"x"]),
        ([["a", 0, "apply_reply", {}, {}, 0]], [b"x"]),  # (a buffer left over)
        ([["a", True, "apply_reply", {}, {}, 0]], []),  # (a bool is not an engine id)
        ([["a", 0, "apply_reply", {}, {}, 0]] * (replies.MAX_REPLIES + 1), []),
    ],
)
def test_a_malformed_message_is_refused_whole(entries: Any, buffers: list[bytes]) -> None:
    with pytest.raises(wire.MessageError, match="malformed replies"):
        replies.unpack(_merged(entries, buffers))


def test_a_client_that_did_not_say_it_reads_them_gets_the_replies_whole(pair: Any) -> None:
    router, dealer = pair
    signer = wire.Wire(KEY)
    box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"), signer)
    for merged in (False, True, False):  # (never told; told; told no more, as when lost)
        box.merge_for(CLIENT, merged)
        sent = [_reply(signer, eid, eid) for eid in range(3)]
        for frames in sent:
            box.send(frames)
        box.flush()
        assert dealer.poll(1000)
        got = dealer.recv_multipart(copy=False)
        got = wire.unpack_batch(got) if wire.is_batch(got) else [got]
        if merged:
            assert len(got) == 1 and len(_read(signer, [CLIENT, *got[0]])) == 3
        else:
            assert [_parent(signer, [CLIENT, *m]) for m in got] == [
                _parent(signer, f) for f in sent
            ]


def test_the_connect_request_checks_what_a_client_reads() -> None:
    ask = protocol.ConnectRequest(reads=(protocol.MERGED_REPLIES, "a newer format"))
    assert protocol.ConnectRequest.from_content(ask.to_content()) == ask
    assert protocol.ConnectRequest.from_content({}) == protocol.ConnectRequest()
    for reads in ("px_replies", [1], ["x" * 65], ["x"] * 17):
        with pytest.raises(ValueError, match="reads must"):
            protocol.ConnectRequest.from_content({"reads": reads})


def test_past_its_bound_the_outbox_forgets_the_client_that_said_so_longest_ago(
    pair: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(outbox, "MAX_MERGED", 2)
    router, _ = pair
    box = Outbox(router, wire.DropLog(logging.getLogger("test"), "test"), wire.Wire(KEY))
    a, b, c = (b"%016x:r" % n for n in range(3))
    box.merge_for(a, True)
    box.merge_for(b, True)
    box.merge_for(a, True)  # (said again: now the newest)
    box.merge_for(c, True)
    assert list(box._merged) == [a, c]
    box.merge_for(b"%016x:s" % 4, True)  # (not a receiving socket: never merged)
    assert list(box._merged) == [a, c]


def test_only_a_broadcasts_held_replies_are_tagged_to_go_merged() -> None:
    signer = wire.Wire(KEY)
    sent: list[list[Any]] = []
    fanin = FanIn(sent.append, lambda delay, callback: None)
    parts = [_reply(signer, eid, eid, tagged=False) for eid in range(3)]
    ids = [_parent(signer, f) for f in parts]
    fanin.expect(CLIENT, ids)
    lone = _reply(signer, 7, 7, tagged=False)  # (a load-balanced task's, say: not held)
    fanin.reply(_parent(signer, lone), lone, (7, lone[6]))
    for msg_id, frames in zip(ids, parts):
        fanin.reply(msg_id, frames, (int(frames[1]), frames[6]))
    assert type(sent[0]) is list  # (sent as it came, untagged)
    (merged,) = replies.pack(signer, sent[1:])
    assert [r.parent_id for _, r in _read(signer, merged)] == ids


def _engine_reply(
    signer: wire.Wire, eid: int, fold: bool = True, result: list[Any] | None = None, **md: Any
) -> list[Any]:
    """An engine lane's reply (the metadata it sends, changed by ``md``), tagged as the
    fan-in tags the reply to a part of a broadcast that asked for folding (``fold``)."""
    request = signer.header(protocol.APPLY_REQUEST)
    metadata = {"started": wire.utcnow_iso(), "engine_id": eid, "engine_uuid": f"u{eid}"}
    metadata.update(stdout="", stderr="", completed=wire.utcnow_iso(), status="ok")
    metadata.update(md)
    metadata = {k: v for k, v in metadata.items() if v is not _GONE}
    buffers = serialize.dumps(eid) if result is None else result
    _, frames = signer.pack(protocol.APPLY_REPLY, {"status": "ok"}, request, metadata, buffers)
    return replies.tag(
        [CLIENT, str(eid).encode(), *frames], request["msg_id"], eid, frames[4], fold
    )


_GONE = object()


def test_replies_of_the_common_shape_fold_and_read_as_merged_ones_do() -> None:
    signer = wire.Wire(KEY)
    folding = [_engine_reply(signer, eid) for eid in range(4)]
    others = [
        _engine_reply(signer, 4, stdout="hi\n"),  # (printed)
        _engine_reply(signer, 5, status="error"),
        _engine_reply(signer, 6, result=[*serialize.dumps(6), b"more"]),  # (two frames)
        _engine_reply(signer, 7, result=[b"x" * replies.FOLD_BELOW]),  # (large)
        _engine_reply(signer, 8, label="x"),  # (a key more)
        _engine_reply(signer, 9, stderr=_GONE),  # (a key less)
        _engine_reply(signer, 10, engine_id=11),  # (another engine's)
        _engine_reply(signer, 12, engine_id=True),
        _engine_reply(signer, 13, started=None),
        _engine_reply(signer, 14, fold=False),  # (not asked)
    ]
    held = [*folding[:2], *others, *folding[2:]]
    (merged,) = replies.pack(signer, held)
    msg = signer.unpack(merged[3:])
    assert msg.content["folded"]["msg_ids"] == [f.head[0] for f in folding]
    assert [e[0] for e in msg.content["replies"]] == [f.head[0] for f in others]
    assert len(msg.buffers) == 1 + sum(len(f) - 8 for f in others)  # (folded: one frame)
    got = dict((r.parent_id, (eid, r)) for eid, r in replies.unpack(msg))
    # ... each read as the reply merged whole is read
    unfolded = [replies.tag(f, *f.head) for f in held]
    (whole,) = replies.pack(signer, unfolded)
    for eid, reply in replies.unpack(signer.unpack(whole[3:])):
        folded_eid, folded = got[reply.parent_id]
        assert (folded_eid, folded.msg_type, folded.metadata, folded.content) == (
            eid,
            reply.msg_type,
            reply.metadata,
            reply.content,
        )
        assert [bytes(b) for b in folded.buffers] == [bytes(b) for b in reply.buffers]
    assert [serialize.loads(got[f.head[0]][1].buffers) for f in folding] == [0, 1, 2, 3]


def _folded(**changes: Any) -> tuple[dict[str, Any], list[bytes]]:
    columns: dict[str, Any] = {
        "msg_ids": ["a", "b"],
        "engine_ids": [0, 1],
        "engine_uuids": ["u", "v"],
        "started": ["", ""],
        "completed": ["", ""],
        "sizes": [1, 2],
    }
    columns.update(changes)
    return columns, [b"xyz"]


@pytest.mark.parametrize(
    "columns, buffers, msg_ids",
    [
        ({**_folded()[0], "sizes": [1, 1]}, [b"xyz"], ["a", "b"]),  # (results do not add up)
        ({**_folded()[0], "sizes": [-1, 4]}, [b"xyz"], ["a", "b"]),
        (_folded()[0], [], ["a", "b"]),  # (no frame of results)
        (_folded(engine_ids=[0, "1"])[0], [b"xyz"], ["a", "b"]),
        (_folded(engine_ids=[0, True])[0], [b"xyz"], ["a", "b"]),
        (_folded(started=[""])[0], [b"xyz"], ["a", "b"]),  # (a column short)
        (_folded(msg_ids=["a", 2])[0], [b"xyz"], ["a"]),
        ({k: v for k, v in _folded()[0].items() if k != "sizes"}, [b"xyz"], ["a", "b"]),
        (["a", "b"], [b"xyz"], []),
        (
            _folded(msg_ids=[], engine_ids=[], engine_uuids=[], started=[], completed=[], sizes=[])[
                0
            ],
            [b""],
            [],
        ),
    ],
)
def test_a_malformed_fold_is_refused_naming_the_replies_it_carried(
    columns: Any, buffers: list[bytes], msg_ids: list[str]
) -> None:
    signer = wire.Wire(KEY)
    content = {"replies": [["c", 0, "apply_reply", {}, {}, 0]], "folded": columns}
    _, frames = signer.pack(replies.REPLIES, content, buffers=buffers)
    with pytest.raises(replies.MalformedReplies, match="malformed replies") as info:
        replies.unpack(signer.unpack(frames[1:]))
    assert info.value.msg_ids == ["c", *msg_ids]
