"""The SQLite task database's batched writer: multi-row upserts, blobs bound as
bytearrays, flattened frames, shared buffers, and ids it cannot bind (cases from an
attacker's review)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

FUNCTION = b"a pickled function, the same in every task of a map " * 6


def _refs_consistent(path) -> list[tuple[int, int, int]]:
    with sqlite3.connect(path) as con:
        return con.execute(
            "SELECT s.id, s.refs, (SELECT count(*) FROM tasks t WHERE t.request_shared = s.id)"
            " FROM shared s"
        ).fetchall()


def test_widest_records_stay_under_999_variables(open_store):
    # (every field set: the widest shape; the writer's connection limited to 999 variables,
    # as on SQLite builds before 3.32)
    store = open_store(batch_interval=3600.0, max_pending=10_000)
    store._con.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    ids = [f"w{i}" for i in range(200)]
    for i, msg_id in enumerate(ids):
        store.put(
            msg_id,
            msg_type="apply_request",
            client_uuid="c",
            engine_id=i,
            engine_uuid="e",
            label="l",
            status="ok",
            submitted=1.0,
            started=2.0,
            completed=3.0 + i,
            received=4.0,
            resubmitted="r",
            after=["a"],
            follow=["f"],
            request=[b"h", b"p", b"m", b"c", b"map", b"arg", FUNCTION],
            result=[b"h", b"p", b"m", b"c", b"r%d" % i],
        )
    got = store.get_many(ids, ["engine_id", "completed", "buffers", "result_buffers"])
    assert len(got) == 200
    for i, msg_id in enumerate(ids):
        assert got[msg_id]["engine_id"] == i
        assert got[msg_id]["completed"] == 3.0 + i
        assert got[msg_id]["result_buffers"] == [b"r%d" % i]
    assert all(r == a for _, r, a in _refs_consistent(store.path))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 72, 73, 129])
def test_pending_then_done_in_one_batch_at_every_chunk_boundary(open_store, n):
    store = open_store(batch_interval=3600.0, max_pending=10_000)
    ids = [f"m{i}" for i in range(n)]
    for i, msg_id in enumerate(ids):
        store.put(
            msg_id,
            msg_type="apply_request",
            client_uuid="c",
            status="pending",
            submitted=float(i),
            request=[b"h", b"p", b"m", b"c", b"map", b"%d" % i, FUNCTION],
        )
        if i % 2:
            store.put(
                msg_id,
                status="ok",
                completed=10.0 + i,
                result=[b"h", b"p", b"m", b"c", bytearray(b"x%d" % i)],
            )
    store.flush()
    for msg_id in ids[::-1]:  # (updates in another batch, other order)
        store.put(msg_id, label=f"'; DROP TABLE tasks; -- {msg_id}\x00")
    got = store.get_many(ids, ["status", "label", "buffers", "result_buffers", "completed"])
    for i, msg_id in enumerate(ids):
        record = got[msg_id]
        assert record["label"] == f"'; DROP TABLE tasks; -- {msg_id}\x00"
        assert record["status"] == ("ok" if i % 2 else "pending")
        assert record["completed"] == (10.0 + i if i % 2 else None)
        assert record["buffers"] == [b"map", b"%d" % i, FUNCTION]
        if i % 2:
            assert record["result_buffers"] == [b"x%d" % i]
            assert type(record["result_buffers"][0]) is bytes
    assert all(r == a for _, r, a in _refs_consistent(store.path))


def test_readers_get_bytes_never_bytearray(open_store):
    store = open_store(blob_threshold=2048)
    result = [b"h", b"p", b"m", b"c", bytearray(b"ba"), memoryview(b"mv"), np.arange(3.0), b""]
    store.put(
        "a",
        msg_type="x",
        status="ok",
        completed=1.0,
        result=result,
        request=[b"h", b"p", b"m", b"c", b"map", b"arg", FUNCTION],
    )
    store.put(
        "b",
        msg_type="x",
        status="ok",
        completed=1.0,
        result=[b"h"],
        request=[b"h", b"p", b"m", b"c", b"map", b"arg", FUNCTION],
    )
    store.put("c", msg_type="x", status="ok", completed=1.0, result=[])
    for frames in (store.frames("a"), store.frames("b", "request"), store.frames("a", "request")):
        assert frames and all(type(f) is bytes for f in frames)
    assert store.frames("a") == [
        b"h",
        b"p",
        b"m",
        b"c",
        b"ba",
        b"mv",
        np.arange(3.0).tobytes(),
        b"",
    ]
    assert store.frames("c") is None
    record = store.get("b", ["buffers", "result_buffers"])
    assert all(type(f) is bytes for f in record["buffers"])


def test_a_msg_id_that_is_not_utf8_does_not_kill_the_writer(open_store):
    from kernel_engine import protocol, wire

    bad = "bad\udc80"  # (what JSON gives for "bad\\udc80": a lone surrogate)
    store = open_store(batch_interval=0.01)
    for call in (
        lambda: store.put(bad, msg_type="x", status="pending"),
        lambda: store.put_queued(bad, msg_type="x", status="pending"),
        lambda: store.taken(bad),
        lambda: store.append_output(bad, "stdout", "hi"),
        lambda: store.purge([bad]),
        lambda: store.drop_results([bad]),
    ):
        with pytest.raises(ValueError, match="not valid Unicode"):
            call()
    store.flush(5)
    store.put("good", msg_type="x", status="pending")
    assert store.history()[-1] == "good"
    # refused where messages are read, too: a header, and the msg_ids a request names
    with pytest.raises(wire.MessageError, match="valid Unicode"):
        wire.check_header({"msg_id": bad, "msg_type": "apply_request"})
    with pytest.raises(ValueError, match="valid Unicode"):
        protocol.check_msg_ids("msg_ids", ["ok", bad])
    with pytest.raises(ValueError, match="valid Unicode"):
        protocol.check_msg_id("msg_id", bad)
    assert wire.is_unicode("naïve ✓") and protocol.check_msg_id("m", "naïve") == "naïve"
